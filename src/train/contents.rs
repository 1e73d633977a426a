//! What a checkpoint holds of the trainer's state, and the exact resume.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::{engine_error, TrainerState};
use super::world_carry;
use super::{Result, TrainError};
use crate::checkpoint::{self, CheckpointContents, TrainState};
use crate::config::RunConfig;
use crate::data::loader::LoaderState;
use crate::dist::Collective;
use crate::model::act::Carry;
use crate::model::engine::{EngineError, EngineState};
use crate::model::trm::Params;
use crate::model::weights::{Weights, PUZZLE_EMB};

/// The halting-exploration draws: keyed by (seed, step, global slot), so
/// the seed is all a checkpoint needs (the step is saved with it). Older
/// checkpoints also hold a stream position (`word_pos`); it is ignored, so
/// they resume with the slot-keyed draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RngState {
    seed: u64,
}

impl TrainerState {
    /// The checkpoint contents of this state, for the whole world: a
    /// collective that EVERY rank calls at the same point. The carry of
    /// every rank is gathered into the global batch's carry (global slot
    /// order); the weights, optimiser states and EMA are the same on every
    /// rank, so rank 0's copy is the state. Returns `Some` on rank 0, the
    /// one that writes the checkpoint, and `None` on the others.
    pub fn checkpoint_contents(
        &self,
        cfg: &RunConfig,
        loader: &LoaderState,
        coll: &dyn Collective,
    ) -> Result<Option<CheckpointContents>> {
        let dm = self.dm;
        if coll.rank() != 0 {
            let (z_h, z_l) = self.engine.export_carry().map_err(engine_error)?;
            world_carry::gather(&self.carry.to_map(&z_h, &z_l, dm.s, dm.d), coll)?;
            return Ok(None);
        }
        let e = self.engine.export_state().map_err(engine_error)?;
        let carry = world_carry::gather(&self.carry.to_map(&e.z_h, &e.z_l, dm.s, dm.d), coll)?;
        let mut model = e.params.to_map(&self.arch);
        let mut puzzle_emb = BTreeMap::new();
        if let Some(t) = model.remove(PUZZLE_EMB) {
            puzzle_emb.insert(PUZZLE_EMB.to_string(), t);
        }
        let m = self.layout.to_map(&e.adam_m, "");
        let v = self.layout.to_map(&e.adam_v, "");
        let rng = RngState {
            seed: self.exploration_seed,
        };
        Ok(Some(CheckpointContents {
            model,
            ema: e.ema.as_ref().map(|s| self.layout.to_map(s, "")),
            optim: checkpoint::pack_adam(&m, &v),
            puzzle_emb,
            carry: Some(carry),
            state: TrainState {
                step: self.step,
                optimizer_steps: e.optimizer_steps,
                rng: serde_json::to_value(rng).unwrap_or_default(),
                loader: serde_json::to_value(loader).unwrap_or_default(),
                config: cfg.to_yaml()?,
                // Absolute paths and build hashes, so `trm package` finds
                // the datasets again from anywhere (the config has them as typed).
                extra: serde_json::json!({
                    "iters_done": self.iters_done,
                    // Informational: any world size with this global batch resumes it.
                    "world_size": coll.world_size(),
                    crate::dataset_ref::EXTRA_KEY: crate::dataset_ref::record(&cfg.data_paths),
                }),
            },
        }))
    }

    /// Restores a state saved by [`TrainerState::checkpoint_contents`] on
    /// any world size with the same global batch: this rank takes its own
    /// slots of the saved global carry. Returns the loader position to restore.
    pub fn restore(&mut self, path: &Path, c: CheckpointContents) -> Result<LoaderState> {
        let bad = |reason: String| TrainError::Resume {
            path: path.to_path_buf(),
            reason,
        };
        let dm = self.dm;
        let mut weights = c.model.clone();
        weights.extend(c.puzzle_emb.clone());
        let w = Weights::from_tensors(&self.arch, weights).map_err(|e| bad(e.to_string()))?;
        let params = Params::from_weights(&self.arch, &w)?;
        let (m, v) = checkpoint::unpack_adam(c.optim);
        let adam_m = self.layout.from_map(&m, "").map_err(&bad)?;
        let adam_v = self.layout.from_map(&v, "").map_err(&bad)?;
        let ema = match c.ema {
            Some(shadow) => Some(self.layout.from_map(&shadow, "").map_err(&bad)?),
            None => None,
        };
        let carry = c
            .carry
            .ok_or_else(|| bad("the checkpoint has no ACT carry".into()))?;
        let carry =
            world_carry::rows_of_rank(&carry, self.rank, self.local_batch, self.global_batch)
                .map_err(&bad)?;
        let (carry, z_h, z_l) = Carry::from_map(&carry, dm.b, dm.s, dm.seq, dm.d).map_err(&bad)?;
        self.engine
            .import_state(EngineState {
                params,
                adam_m,
                adam_v,
                optimizer_steps: c.state.optimizer_steps,
                ema,
                z_h,
                z_l,
            })
            .map_err(|e| match e {
                EngineError::State(reason) => bad(reason),
                e => engine_error(e),
            })?;
        self.carry = carry;
        let rng: RngState = serde_json::from_value(c.state.rng.clone())
            .map_err(|e| bad(format!("RNG state: {e}")))?;
        self.exploration_seed = rng.seed;
        self.step = c.state.step;
        self.iters_done = c
            .state
            .extra
            .get("iters_done")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("state.json lacks extra.iters_done".into()))?
            as usize;
        let loader: LoaderState = serde_json::from_value(c.state.loader)
            .map_err(|e| bad(format!("loader state: {e}")))?;
        Ok(loader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint from before the slot-keyed draws (a stream position
    /// beside the seed) still reads: the seed is kept, the position ignored.
    #[test]
    fn older_rng_states_read() {
        let old = serde_json::json!({"seed": 7, "word_pos": "12345678901"});
        let rng: RngState = serde_json::from_value(old).unwrap();
        assert_eq!(rng, RngState { seed: 7 });
        assert!(serde_json::from_value::<RngState>(serde_json::json!({})).is_err());
    }
}
