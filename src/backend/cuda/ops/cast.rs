//! cast.cu: f32 <-> bf16 and fills.

use half::bf16;

use super::{grid_stride, launch};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

/// Elements per thread per step: the kernels move 16-byte packs.
const PACK: usize = 8;
const BLOCK: u32 = 256;

/// `y[i] = bf16(x[i])` for every element of `x`.
pub fn cast_f32_to_bf16(dev: &Device, y: &Buffer<bf16>, x: &Buffer<f32>) -> Result<(), CudaError> {
    dev.check_buffers("cast_f32_to_bf16", &[y, x])?;
    let n = x.len();
    y.check_len("cast_f32_to_bf16: y", n)?;
    let args = CastF32ToBf16Args {
        x: x.cptr(),
        y: y.ptr(),
        n: n as i64,
    };
    launch(
        dev,
        CAST_F32_TO_BF16,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}

/// `y[i] = f32(x[i])` for every element of `x`.
pub fn cast_bf16_to_f32(dev: &Device, y: &Buffer<f32>, x: &Buffer<bf16>) -> Result<(), CudaError> {
    dev.check_buffers("cast_bf16_to_f32", &[y, x])?;
    let n = x.len();
    y.check_len("cast_bf16_to_f32: y", n)?;
    let args = CastBf16ToF32Args {
        x: x.cptr(),
        y: y.ptr(),
        n: n as i64,
    };
    launch(
        dev,
        CAST_BF16_TO_F32,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}

/// Every element of `y` set to `v`.
pub fn fill_f32(dev: &Device, y: &Buffer<f32>, v: f32) -> Result<(), CudaError> {
    dev.check_buffers("fill_f32", &[y])?;
    let n = y.len();
    let args = FillF32Args {
        y: y.ptr(),
        v,
        n: n as i64,
    };
    launch(
        dev,
        FILL_F32,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}

/// Every element of `y` set to `v`.
pub fn fill_bf16(dev: &Device, y: &Buffer<bf16>, v: bf16) -> Result<(), CudaError> {
    dev.check_buffers("fill_bf16", &[y])?;
    let n = y.len();
    let args = FillBf16Args {
        y: y.ptr(),
        v,
        n: n as i64,
    };
    launch(
        dev,
        FILL_BF16,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}
