//! Typed launchers: one function per kernel, named after it
//! (`rmsnorm_forward` / `rmsnorm_backward`, ...), one file per kernel family.
//! Each checks its buffers belong to the device ([`Device::check_buffers`]:
//! a [`CudaError::WrongDevice`], never an address of another device reaching
//! a kernel) and against the shapes (a [`CudaError::Shape`], never an
//! out-of-bounds launch), picks grid and block from the shapes, and
//! launches on a [`Device`], so the same call runs on the GPU or the emulator.

pub mod attention;
pub mod cast;
pub mod elementwise;
pub mod embedding;
pub mod optim;
pub mod rmsnorm;
pub mod rope;
pub mod stablemax_ce;
pub mod swiglu;

use super::abi::{Kernel, KernelArgs, LaunchConfig};
use super::device::Device;
use super::CudaError;

pub use attention::{attention_backward, attention_forward, AttentionShape};
pub use cast::{cast_bf16_to_f32, cast_f32_to_bf16, fill_bf16, fill_f32};
pub use elementwise::{add_bf16, carry_reset, scale_f32};
pub use embedding::{
    input_embedding_backward, input_embedding_backward_scratch_len, input_embedding_forward,
    EmbeddingShape,
};
pub use optim::{adam_atan2, ema, puzzle_sign_sgd, AdamAtan2Step};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward, RopeShape};
pub use stablemax_ce::{
    q_bce_backward, q_bce_forward, stablemax_ce_backward, stablemax_ce_forward, CeOutputs,
};
pub use swiglu::{swiglu_backward, swiglu_forward};

/// Blocks per multiprocessor a grid-stride launch asks for: enough to fill
/// every SM several times over, few enough that each thread loops on big
/// inputs (the kernels are written grid-stride).
const BLOCKS_PER_SM: u32 = 8;

/// `block` threads per block, enough blocks for `items` thread-sized work
/// items, at most `BLOCKS_PER_SM` per multiprocessor, at least one.
pub(crate) fn grid_stride(dev: &Device, items: usize, block: u32) -> LaunchConfig {
    let cap = dev.multiprocessors().saturating_mul(BLOCKS_PER_SM) as usize;
    let blocks = items.div_ceil(block as usize).clamp(1, cap) as u32;
    LaunchConfig::linear(blocks, block, 0)
}

/// A dimension as the kernels' `int32_t`.
pub(crate) fn dim(what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v)
        .map_err(|_| CudaError::Shape(format!("{what} = {v} does not fit the kernel's int32")))
}

/// `a * b` without overflow.
pub(crate) fn mul(what: &str, dims: &[usize]) -> Result<usize, CudaError> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| CudaError::Shape(format!("{what}: size {dims:?} overflows")))
    })
}

/// Launches with the pointers the launcher took from checked buffers.
pub(crate) fn launch<A: KernelArgs>(
    dev: &Device,
    kernel: Kernel<A>,
    cfg: LaunchConfig,
    args: &A,
) -> Result<(), CudaError> {
    // SAFETY: every launcher builds `args` from buffers of `dev` it checked
    // against the kernel's shapes (or null where the kernel allows), and the
    // buffers are borrowed for the call; on a GPU they must outlive the
    // launch, which holds because a Buffer frees its memory stream-ordered.
    unsafe { dev.launch(kernel, &cfg, args) }
}
