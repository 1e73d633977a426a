//! rmsnorm.cu: one warp per row.

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

/// 8 warps, so 8 rows per block (the kernels' launch bound is 256).
const BLOCK: u32 = 256;
const ROWS_PER_BLOCK: usize = BLOCK as usize / 32;

fn rows_cfg(dev: &Device, m: usize) -> crate::backend::cuda::abi::LaunchConfig {
    grid_stride(dev, m.div_ceil(ROWS_PER_BLOCK) * BLOCK as usize, BLOCK)
}

/// `y = rmsnorm(x + r)` over rows of `d`, `rstd` per row; `y` may be `x`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    dev: &Device,
    y: &Buffer<bf16>,
    rstd: &Buffer<f32>,
    x: &Buffer<bf16>,
    r: Option<&Buffer<bf16>>,
    m: usize,
    d: usize,
    eps: f32,
) -> Result<(), CudaError> {
    dev.check_buffers("rmsnorm_forward", &[y, rstd, x, &r])?;
    let n = mul("rmsnorm_forward", &[m, d])?;
    y.check_len("rmsnorm_forward: y", n)?;
    x.check_len("rmsnorm_forward: x", n)?;
    rstd.check_len("rmsnorm_forward: rstd", m)?;
    if let Some(r) = r {
        r.check_len("rmsnorm_forward: r", n)?;
    }
    let args = RmsnormForwardArgs {
        y: y.ptr(),
        rstd: rstd.ptr(),
        x: x.cptr(),
        r: r.map_or(std::ptr::null(), Buffer::cptr),
        M: m as i64,
        D: dim("D", d)?,
        eps,
    };
    launch(dev, RMSNORM_FORWARD_BF16, rows_cfg(dev, m), &args)
}

/// `dx = rstd (dy - y mean(dy y))` per row; `dx` may be `dy`.
pub fn rmsnorm_backward(
    dev: &Device,
    dx: &Buffer<bf16>,
    dy: &Buffer<bf16>,
    y: &Buffer<bf16>,
    rstd: &Buffer<f32>,
    m: usize,
    d: usize,
) -> Result<(), CudaError> {
    dev.check_buffers("rmsnorm_backward", &[dx, dy, y, rstd])?;
    let n = mul("rmsnorm_backward", &[m, d])?;
    dx.check_len("rmsnorm_backward: dx", n)?;
    dy.check_len("rmsnorm_backward: dy", n)?;
    y.check_len("rmsnorm_backward: y", n)?;
    rstd.check_len("rmsnorm_backward: rstd", m)?;
    let args = RmsnormBackwardArgs {
        dx: dx.ptr(),
        dy: dy.cptr(),
        y: y.cptr(),
        rstd: rstd.cptr(),
        M: m as i64,
        D: dim("D", d)?,
    };
    launch(dev, RMSNORM_BACKWARD_BF16, rows_cfg(dev, m), &args)
}
