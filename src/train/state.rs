//! The trainer's state and one training step through the engine.

use std::path::PathBuf;

use super::{Result, TrainError};
use crate::config::{RunConfig, Schedule};
use crate::data::loader::Batch as LoaderBatch;
use crate::dist::Collective;
use crate::loss::StepMetrics;
use crate::model::act::{self, check_batch_shape, reduce_metrics, Carry, Exploration};
use crate::model::config::ArchConfig;
use crate::model::device_choice::{build_engine, DeviceChoice};
use crate::model::engine::{Engine, EngineConfig, EngineError, OptimStep};
use crate::model::layout::FlatLayout;
use crate::model::trm::{Dims, Params};
use crate::model::weights::Weights;
use crate::optim::AdamAtan2Config;

/// Model, optimisers, carry and counters: everything a checkpoint holds.
/// The engine owns the weights, the optimiser states and the carry's hidden
/// states; the host keeps the carry's slots. The exploration draws are keyed
/// by (seed, step, global slot), so they need no state of their own.
pub struct TrainerState {
    pub arch: ArchConfig,
    pub layout: FlatLayout,
    /// The CPU or the CUDA engine, as the device choice opened it.
    pub engine: Box<dyn Engine>,
    pub carry: Carry,
    /// The seed of the halting-exploration draws.
    pub(super) exploration_seed: u64,
    /// Which rank this process is: its batch rows are the global slots
    /// `rank * local_batch..(rank + 1) * local_batch`.
    pub(super) rank: usize,
    /// `global_batch_size`: the slots a checkpoint's carry holds.
    pub(super) global_batch: usize,
    pub step: u64,
    /// Train/eval iterations completed.
    pub iters_done: usize,
    pub(super) dm: Dims,
    pub(super) local_batch: usize,
}

/// The optimiser settings an engine takes from the run config.
fn engine_config(cfg: &RunConfig) -> EngineConfig {
    EngineConfig {
        adam: AdamAtan2Config {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            weight_decay: cfg.weight_decay,
        },
        ema_rate: cfg.ema.then_some(cfg.ema_rate),
        puzzle_emb_weight_decay: cfg.puzzle_emb_weight_decay,
    }
}

impl TrainerState {
    /// A fresh state on the engine of `device`: weights from `init`
    /// (seeded), or `weights` when given.
    pub fn new(
        cfg: &RunConfig,
        arch: ArchConfig,
        weights: Weights,
        local_batch: usize,
        rank: usize,
        device: &DeviceChoice,
    ) -> Result<TrainerState> {
        let params = Params::<f32>::from_weights(&arch, &weights)?;
        // The weights now live in `params` only (the puzzle table can be GBs).
        drop(weights);
        let engine = build_engine(
            device.kind,
            device.ordinal,
            arch.clone(),
            params,
            local_batch,
            engine_config(cfg),
        )
        .map_err(engine_error)?;
        let dm = Dims::new(&arch, local_batch);
        Ok(TrainerState {
            layout: FlatLayout::new(&arch),
            engine,
            carry: Carry::new(local_batch, dm.seq),
            exploration_seed: cfg.seed,
            rank,
            global_batch: cfg.global_batch_size,
            step: 0,
            iters_done: 0,
            dm,
            local_batch,
            arch,
        })
    }

    /// One training step on `batch` (spec sections 5-7). Returns the step's
    /// metric sums (already reduced over ranks), or `None` past `total_steps`.
    pub fn train_step(
        &mut self,
        cfg: &RunConfig,
        schedule: &Schedule,
        batch: &LoaderBatch,
        coll: &dyn Collective,
    ) -> Result<Option<StepMetrics>> {
        self.step += 1;
        if self.step > schedule.total_steps {
            return Ok(None);
        }
        let dm = self.dm;
        check_batch_shape(&dm, batch, "inputs")?;
        // Halted slots take new samples and restart from H_init / L_init.
        self.engine
            .reset_halted(&self.carry.halted)
            .map_err(engine_error)?;
        self.carry.load_halted(batch);
        for s in self.carry.steps.iter_mut() {
            *s += 1;
        }
        let explore = Exploration {
            seed: self.exploration_seed,
            step: self.step,
            first_slot: self.rank * self.local_batch,
        };
        let c = &self.carry;
        let slots = crate::model::trm::Batch {
            inputs: &c.inputs,
            labels: &c.labels,
            puzzle_ids: &c.puzzle_ids,
            b: dm.b,
        };
        let r = act::act_step(
            &mut *self.engine,
            &self.arch,
            &slots,
            &c.steps,
            Some(&explore),
        )?;
        let lr = schedule.lr_at(self.step);
        if !r.loss.loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step,
                lm_loss: r.loss.lm_loss,
                q_halt_loss: r.loss.q_halt_loss,
                lr,
            });
        }
        let q_halt: Vec<f32> = (0..dm.b).map(|b| r.q[b * 2]).collect();
        let mut metrics = StepMetrics::from_step(
            &r.loss,
            &q_halt,
            &r.halted,
            &self.carry.steps,
            r.has_q_continue,
        );
        self.carry.halted = r.halted;
        // gradients of loss / global_batch_size, reduced over ranks
        let update = OptimStep {
            grad_scale: 1.0 / cfg.global_batch_size as f32,
            lr,
            puzzle_emb_lr: schedule.puzzle_emb_lr_at(self.step),
            update_dense: !cfg.freeze_weights,
        };
        self.engine
            .optimizer_step(&update, &self.carry.puzzle_ids, coll)
            .map_err(engine_error)?;
        reduce_metrics(&mut metrics, coll)?;
        Ok(Some(metrics))
    }

    /// The live weights (a host copy).
    pub fn params(&self) -> Result<Params<f32>> {
        self.engine.params().map_err(engine_error)
    }

    /// The weights evaluation uses: the EMA shadow when EMA is on (with the
    /// live puzzle-embedding table), else the live weights.
    pub fn eval_params(&self) -> Result<Params<f32>> {
        self.engine.eval_params().map_err(engine_error)
    }

    pub fn local_batch(&self) -> usize {
        self.local_batch
    }
}

/// An engine error as the trainer's (a state mismatch is a bad resume).
pub(super) fn engine_error(e: EngineError) -> TrainError {
    match e {
        EngineError::Model(e) => TrainError::Model(e),
        EngineError::Optim(e) => TrainError::Optim(e),
        EngineError::Collective(e) => TrainError::Collective(e),
        EngineError::Cuda(e) => TrainError::Cuda(e),
        EngineError::Device(e) => TrainError::Device(e),
        EngineError::State(reason) => TrainError::Resume {
            path: PathBuf::new(),
            reason,
        },
    }
}
