//! The engine seam: what the trainer asks of whatever runs the network.
//!
//! The trainer crosses it a few times per ACT step, never per op, so an
//! engine keeps its own memory plan and fusions (the CPU engine in
//! `trm.rs` / `cpu.rs`; a CUDA engine later). Everything an engine does
//! not own, the halting and target rules and the carry's sample slots,
//! stays on the host in [`crate::model::act`], which drives these calls.
//!
//! One step, in order: [`Engine::reset_halted`], [`ActNet::inner_step`],
//! [`ActNet::bootstrap_q`] (only when the Q-continue head trains),
//! [`ActNet::loss_and_backward`], [`Engine::optimizer_step`].

use crate::backend::cpu::Real;
use crate::dist::{Collective, CollectiveError};
use crate::model::trm::{Batch, Grads, LossOut, Params, TrmError};
use crate::optim::AdamAtan2Config;
use crate::optim::OptimError;

/// The network part of one ACT step, as [`crate::model::act::act_step`]
/// drives it. Generic over the precision so the CPU engine's f64 gradient
/// checks run through the same driver as training.
pub trait ActNet<T: Real> {
    /// The inner step from the engine's carry: the no-gradient H cycles,
    /// then the gradient cycle, keeping what the backward needs. Returns the
    /// Q logits `[B, 2]` (q_halt, q_continue): all the host needs to halt.
    fn inner_step(&mut self, batch: &Batch<'_>) -> Result<Vec<T>, TrmError>;

    /// The Q-continue bootstrap: a no-gradient inner step from the carry
    /// that [`ActNet::inner_step`] produced; returns its Q logits `[B, 2]`.
    fn bootstrap_q(&mut self, batch: &Batch<'_>) -> Result<Vec<T>, TrmError>;

    /// The loss head on the inner step's outputs (with the Q-continue
    /// targets when given) and the backward of `loss` (not divided by the
    /// batch size); the inner step's new carry becomes the engine's carry.
    fn loss_and_backward(
        &mut self,
        batch: &Batch<'_>,
        target_q_continue: Option<&[f64]>,
    ) -> Result<LossOut, TrmError>;
}

/// The network part of evaluation, as [`crate::model::act::evaluate_with`]
/// drives it: one call per batch, so an engine keeps the carry to itself.
pub trait EvalNet {
    /// Restarts every slot from `H_init` / `L_init` and runs `n` no-gradient
    /// inner steps; returns the last step's logits `[B, seq_len, V]` and Q
    /// logits `[B, 2]`.
    fn eval_steps(&mut self, batch: &Batch<'_>, n: usize)
        -> Result<(Vec<f32>, Vec<f32>), TrmError>;
}

/// How an engine's optimisers are set up (from the run config).
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub adam: AdamAtan2Config,
    /// `Some(rate)`: keep an EMA shadow of the dense weights.
    pub ema_rate: Option<f64>,
    pub puzzle_emb_weight_decay: f64,
}

/// What the last [`ActNet::loss_and_backward`] produced, on the host: for
/// `trm step-dump` and the parity tests, never on the training path.
#[derive(Debug, Clone)]
pub struct StepTrace {
    /// `[B, seq_len, V]`
    pub logits: Vec<f32>,
    /// The new carry `[B, S, D]`.
    pub z_h: Vec<f32>,
    pub z_l: Vec<f32>,
    /// Unscaled gradients of the summed loss.
    pub grads: Grads<f32>,
}

/// The learning rates and scale of one optimiser update.
#[derive(Debug, Clone, Copy)]
pub struct OptimStep {
    /// Gradients are of the summed loss; this makes them of the mean over
    /// the global batch (`1 / global_batch_size`).
    pub grad_scale: f32,
    /// AdamATan2 on the dense weights.
    pub lr: f64,
    /// Sparse sign-SGD on the puzzle-embedding rows.
    pub puzzle_emb_lr: f64,
    /// `false` (`freeze_weights`): only the puzzle embeddings learn.
    pub update_dense: bool,
}

/// An engine's full state, as checkpoints hold it: the dense vectors are in
/// the order of [`crate::model::layout::FlatLayout`].
#[derive(Debug, Clone)]
pub struct EngineState {
    /// Every weight, the puzzle-embedding table included.
    pub params: Params<f32>,
    /// AdamATan2 first and second moments, and its step count.
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    pub optimizer_steps: u64,
    /// The EMA shadow, when the run keeps one.
    pub ema: Option<Vec<f32>>,
    /// The carry's hidden states `[B, S, D]`.
    pub z_h: Vec<f32>,
    pub z_l: Vec<f32>,
}

/// What an engine's host-facing calls fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] TrmError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Cuda(#[from] crate::backend::cuda::CudaError),
    /// The device asked for is not in this build.
    #[error(transparent)]
    Device(#[from] crate::model::device_choice::DeviceError),
    /// A state to import that does not fit this engine.
    #[error("{0}")]
    State(String),
}

/// A training engine: the ACT step's network plus the optimisers, the
/// weights and the carry's hidden states, all owned by the engine. Its
/// [`EvalNet`] evaluates with [`Engine::eval_params`]'s weights and a carry
/// of its own (the training carry is left as it was).
pub trait Engine: ActNet<f32> + EvalNet {
    /// Where it runs, for the start-up line (e.g. `cpu`, `cuda:0 (NVIDIA H200)`).
    fn device_name(&self) -> String;

    /// Device memory in use, for the progress line (`None` on the CPU).
    fn device_memory_used(&self) -> Option<usize> {
        None
    }

    /// The last backward's outputs on the host (see [`StepTrace`]).
    fn step_trace(&self) -> Result<StepTrace, EngineError>;

    /// Restarts the hidden state of every slot whose `halted` flag is set
    /// from `H_init` / `L_init` (before the host loads new samples there).
    fn reset_halted(&mut self, halted: &[bool]) -> Result<(), EngineError>;

    /// One optimiser update from the last backward: dense gradients summed
    /// over ranks through `coll`, AdamATan2 and EMA, then sign-SGD on the
    /// puzzle-embedding rows of `puzzle_ids` gathered from every rank.
    fn optimizer_step(
        &mut self,
        update: &OptimStep,
        puzzle_ids: &[i32],
        coll: &dyn Collective,
    ) -> Result<(), EngineError>;

    /// The live weights, on the host.
    fn params(&self) -> Result<Params<f32>, EngineError>;

    /// The weights evaluation uses: the EMA shadow when EMA is on (with the
    /// live puzzle-embedding table), else the live weights.
    fn eval_params(&self) -> Result<Params<f32>, EngineError>;

    /// The full state for a checkpoint.
    fn export_state(&self) -> Result<EngineState, EngineError>;

    /// The carry's hidden states `(z_h, z_l)` `[B, S, D]` on the host: all
    /// a checkpoint needs from ranks other than 0. The default goes through
    /// [`Engine::export_state`]; an engine with large weights overrides it.
    fn export_carry(&self) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let s = self.export_state()?;
        Ok((s.z_h, s.z_l))
    }

    /// Replaces the full state (a resume); fails when it does not fit.
    fn import_state(&mut self, state: EngineState) -> Result<(), EngineError>;
}
