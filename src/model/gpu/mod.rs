//! The CUDA engine: the network of `trm.rs` on a [`Device`] (an H200, or
//! the CPU emulator of the same kernels), op for op with the CPU engine's
//! function names, bf16 activations and GEMM operands, f32 master weights,
//! gradients and optimiser states, all resident on the device.

use crate::backend::cuda::{CudaError, Device};
use crate::dist::Collective;
use crate::model::config::ArchConfig;
use crate::model::engine::{
    ActNet, Engine, EngineConfig, EngineError, EngineState, EvalNet, OptimStep, StepTrace,
};
use crate::model::trm::{Batch, LossOut, Params, TrmError};

/// The CUDA engine (being written: every call fails until it lands).
pub struct GpuEngine {
    dev: Device,
}

impl GpuEngine {
    /// An engine on `dev` for local batches of `local_batch`.
    pub fn new(
        dev: Device,
        _arch: ArchConfig,
        _params: Params<f32>,
        _local_batch: usize,
        _cfg: EngineConfig,
    ) -> Result<GpuEngine, EngineError> {
        Err(EngineError::Cuda(CudaError::NoDevice(format!(
            "the CUDA engine does not run yet on {}",
            dev.name()
        ))))
    }
}

fn not_yet() -> TrmError {
    TrmError::Unsupported("the CUDA engine".into())
}

impl ActNet<f32> for GpuEngine {
    fn inner_step(&mut self, _batch: &Batch<'_>) -> Result<Vec<f32>, TrmError> {
        Err(not_yet())
    }
    fn bootstrap_q(&mut self, _batch: &Batch<'_>) -> Result<Vec<f32>, TrmError> {
        Err(not_yet())
    }
    fn loss_and_backward(
        &mut self,
        _batch: &Batch<'_>,
        _target: Option<&[f64]>,
    ) -> Result<LossOut, TrmError> {
        Err(not_yet())
    }
}

impl EvalNet for GpuEngine {
    fn eval_steps(
        &mut self,
        _batch: &Batch<'_>,
        _n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), TrmError> {
        Err(not_yet())
    }
}

impl Engine for GpuEngine {
    fn device_name(&self) -> String {
        self.dev.name()
    }
    fn step_trace(&self) -> Result<StepTrace, EngineError> {
        Err(not_yet().into())
    }
    fn reset_halted(&mut self, _halted: &[bool]) {}
    fn optimizer_step(
        &mut self,
        _update: &OptimStep,
        _puzzle_ids: &[i32],
        _coll: &dyn Collective,
    ) -> Result<(), EngineError> {
        Err(not_yet().into())
    }
    fn params(&self) -> Params<f32> {
        unimplemented!("the CUDA engine")
    }
    fn eval_params(&self) -> Params<f32> {
        unimplemented!("the CUDA engine")
    }
    fn export_state(&self) -> EngineState {
        unimplemented!("the CUDA engine")
    }
    fn import_state(&mut self, _state: EngineState) -> Result<(), EngineError> {
        Err(not_yet().into())
    }
}
