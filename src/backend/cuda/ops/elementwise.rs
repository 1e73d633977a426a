//! elementwise.cu: bf16 sums, f32 scaling, the carry reset.

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

const BLOCK: u32 = 256;
/// bf16 elements per 16-byte pack.
const PACK_BF16: usize = 8;
/// f32 elements per 16-byte pack.
const PACK_F32: usize = 4;

/// `y[..n] = bf16(a + b)`; `y` may be `a` or `b`.
pub fn add_bf16(
    dev: &Device,
    y: &Buffer<bf16>,
    a: &Buffer<bf16>,
    b: &Buffer<bf16>,
    n: usize,
) -> Result<(), CudaError> {
    dev.check_buffers("add_bf16", &[y, a, b])?;
    for (what, buf) in [("y", y), ("a", a), ("b", b)] {
        buf.check_len(&format!("add_bf16: {what}"), n)?;
    }
    let args = AddBf16Args {
        y: y.ptr(),
        a: a.cptr(),
        b: b.cptr(),
        n: n as i64,
    };
    launch(
        dev,
        ADD_BF16,
        grid_stride(dev, n.div_ceil(PACK_BF16), BLOCK),
        &args,
    )
}

/// `y[..n] *= s`.
pub fn scale_f32(dev: &Device, y: &Buffer<f32>, s: f32, n: usize) -> Result<(), CudaError> {
    dev.check_buffers("scale_f32", &[y])?;
    y.check_len("scale_f32: y", n)?;
    let args = ScaleF32Args {
        y: y.ptr(),
        s,
        n: n as i64,
    };
    launch(
        dev,
        SCALE_F32,
        grid_stride(dev, n.div_ceil(PACK_F32), BLOCK),
        &args,
    )
}

/// `z[b] = init` broadcast over the `s` rows of every sample `b` whose
/// `halted[b]` is non-zero; `z` is `[b, s, d]`, `init` `[d]`.
pub fn carry_reset(
    dev: &Device,
    z: &Buffer<bf16>,
    init: &Buffer<bf16>,
    halted: &Buffer<i32>,
    (b, s, d): (usize, usize, usize),
) -> Result<(), CudaError> {
    let what = "carry_reset";
    dev.check_buffers(what, &[z, init, halted])?;
    let n = mul(what, &[b, s, d])?;
    z.check_len("carry_reset: z", n)?;
    init.check_len("carry_reset: init", d)?;
    halted.check_len("carry_reset: halted", b)?;
    let args = CarryResetArgs {
        z: z.ptr(),
        init: init.cptr(),
        halted: halted.cptr(),
        B: dim("B", b)?,
        S: dim("S", s)?,
        D: dim("D", d)?,
    };
    launch(dev, CARRY_RESET_BF16, grid_stride(dev, n, BLOCK), &args)
}
