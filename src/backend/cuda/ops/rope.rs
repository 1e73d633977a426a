//! rope.cu: in-place rotation of the q and k heads of a fused qkv.

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

/// Rotation pairs per thread per step (16-byte packs of 8 bf16 pairs).
const PACK: usize = 8;
const BLOCK: u32 = 256;

/// The qkv layout: `[batch, seq, 3 * heads * head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    /// Even.
    pub head_dim: usize,
}

fn rope(
    dev: &Device,
    kernel: Kernel<RopeArgs>,
    qkv: &Buffer<bf16>,
    cos: &Buffer<f32>,
    sin: &Buffer<f32>,
    s: RopeShape,
) -> Result<(), CudaError> {
    let what = kernel.name();
    if s.head_dim % 2 != 0 {
        return Err(CudaError::Shape(format!(
            "{what}: head_dim {} is odd",
            s.head_dim
        )));
    }
    let tokens = mul(what, &[s.batch, s.seq])?;
    dev.check_buffers(what, &[qkv, cos, sin])?;
    qkv.check_len(what, mul(what, &[tokens, 3, s.heads, s.head_dim])?)?;
    cos.check_len(what, mul(what, &[s.seq, s.head_dim])?)?;
    sin.check_len(what, mul(what, &[s.seq, s.head_dim])?)?;
    let args = RopeArgs {
        qkv: qkv.ptr(),
        cos: cos.cptr(),
        sin: sin.cptr(),
        tokens: tokens as i64,
        S: dim("S", s.seq)?,
        H: dim("H", s.heads)?,
        d: dim("d", s.head_dim)?,
    };
    // Pairs: head_dim / 2 per head, 2H rotated heads per token.
    let pairs = mul(what, &[tokens, s.heads, s.head_dim])?;
    launch(
        dev,
        kernel,
        grid_stride(dev, pairs.div_ceil(PACK), BLOCK),
        &args,
    )
}

/// Rotates q and k by +angle in place.
pub fn rope_forward(
    dev: &Device,
    qkv: &Buffer<bf16>,
    cos: &Buffer<f32>,
    sin: &Buffer<f32>,
    shape: RopeShape,
) -> Result<(), CudaError> {
    rope(dev, ROPE_FORWARD_BF16, qkv, cos, sin, shape)
}

/// The transpose of [`rope_forward`] (rotation by -angle), in place on the gradient.
pub fn rope_backward(
    dev: &Device,
    dqkv: &Buffer<bf16>,
    cos: &Buffer<f32>,
    sin: &Buffer<f32>,
    shape: RopeShape,
) -> Result<(), CudaError> {
    rope(dev, ROPE_BACKWARD_BF16, dqkv, cos, sin, shape)
}
