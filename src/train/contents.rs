//! What a checkpoint holds of the trainer's state, and the exact resume.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::{engine_error, TrainerState};
use super::{Result, TrainError};
use crate::checkpoint::{self, CheckpointContents, TrainState};
use crate::config::RunConfig;
use crate::data::loader::LoaderState;
use crate::model::act::{exploration_rng, Carry};
use crate::model::engine::{EngineError, EngineState};
use crate::model::trm::Params;
use crate::model::weights::{Weights, PUZZLE_EMB};

/// The halting-exploration stream: a seed and a position, saved with
/// checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RngState {
    seed: u64,
    /// ChaCha word position, as a decimal string (u128 does not fit JSON numbers).
    word_pos: String,
}

impl TrainerState {
    /// The checkpoint contents of this state.
    pub fn checkpoint_contents(
        &self,
        cfg: &RunConfig,
        loader: &LoaderState,
    ) -> Result<CheckpointContents> {
        let dm = self.dm;
        let e = self.engine.export_state().map_err(engine_error)?;
        let mut model = e.params.to_map(&self.arch);
        let mut puzzle_emb = BTreeMap::new();
        if let Some(t) = model.remove(PUZZLE_EMB) {
            puzzle_emb.insert(PUZZLE_EMB.to_string(), t);
        }
        let m = self.layout.to_map(&e.adam_m, "");
        let v = self.layout.to_map(&e.adam_v, "");
        let rng = RngState {
            seed: self.rng_seed,
            word_pos: self.rng.get_word_pos().to_string(),
        };
        Ok(CheckpointContents {
            model,
            ema: e.ema.as_ref().map(|s| self.layout.to_map(s, "")),
            optim: checkpoint::pack_adam(&m, &v),
            puzzle_emb,
            carry: Some(self.carry.to_map(&e.z_h, &e.z_l, dm.s, dm.d)),
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
                    crate::dataset_ref::EXTRA_KEY: crate::dataset_ref::record(&cfg.data_paths),
                }),
            },
        })
    }

    /// Restores a state saved by [`TrainerState::checkpoint_contents`];
    /// returns the loader position to restore.
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
        let pos: u128 = rng
            .word_pos
            .parse()
            .map_err(|e| bad(format!("RNG position: {e}")))?;
        self.rng = exploration_rng(rng.seed, 0);
        self.rng.set_word_pos(pos);
        self.rng_seed = rng.seed;
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
