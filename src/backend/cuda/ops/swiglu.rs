//! swiglu.cu: `a = silu(g) * u` with `gu = [g | u]` per row.

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

/// Outputs per thread per step (16-byte packs).
const PACK: usize = 8;
const BLOCK: u32 = 256;

/// `a[M, F] = silu(g) * u`, `gu` [M, 2F].
pub fn swiglu_forward(
    dev: &Device,
    a: &Buffer<bf16>,
    gu: &Buffer<bf16>,
    m: usize,
    f: usize,
) -> Result<(), CudaError> {
    let n = mul("swiglu_forward", &[m, f])?;
    dev.check_buffers("swiglu_forward", &[a, gu])?;
    a.check_len("swiglu_forward: a", n)?;
    gu.check_len("swiglu_forward: gu", 2 * n)?;
    let args = SwigluForwardArgs {
        a: a.ptr(),
        gu: gu.cptr(),
        M: m as i64,
        F: dim("F", f)?,
    };
    launch(
        dev,
        SWIGLU_FORWARD_BF16,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}

/// `dgu [M, 2F]` from `da [M, F]`; `dgu` may be `gu`.
pub fn swiglu_backward(
    dev: &Device,
    dgu: &Buffer<bf16>,
    da: &Buffer<bf16>,
    gu: &Buffer<bf16>,
    m: usize,
    f: usize,
) -> Result<(), CudaError> {
    let n = mul("swiglu_backward", &[m, f])?;
    dev.check_buffers("swiglu_backward", &[dgu, da, gu])?;
    dgu.check_len("swiglu_backward: dgu", 2 * n)?;
    da.check_len("swiglu_backward: da", n)?;
    gu.check_len("swiglu_backward: gu", 2 * n)?;
    let args = SwigluBackwardArgs {
        dgu: dgu.ptr(),
        da: da.cptr(),
        gu: gu.cptr(),
        M: m as i64,
        F: dim("F", f)?,
    };
    launch(
        dev,
        SWIGLU_BACKWARD_BF16,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}
