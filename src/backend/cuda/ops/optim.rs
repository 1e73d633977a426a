//! optim.cu: AdamATan2, sparse sign-SGD on puzzle-embedding rows, EMA.

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

const BLOCK: u32 = 256;
/// Elements per thread per step (16-byte f32 packs).
const PACK: usize = 4;

/// The hyper-parameters of one AdamATan2 step (docs/optimizer.md); `step`
/// counts from 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamAtan2Step {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub step: u32,
}

/// One AdamATan2 step over every element of `w` (and `m`, `v`, `g`), and
/// the bf16 copy of the updated weights into `w_bf16` when given.
pub fn adam_atan2(
    dev: &Device,
    w: &Buffer<f32>,
    m: &Buffer<f32>,
    v: &Buffer<f32>,
    g: &Buffer<f32>,
    w_bf16: Option<&Buffer<bf16>>,
    h: AdamAtan2Step,
) -> Result<(), CudaError> {
    dev.check_buffers("adam_atan2", &[w, m, v, g, &w_bf16])?;
    let n = w.len();
    for (what, b) in [("m", m), ("v", v), ("g", g)] {
        b.check_len(&format!("adam_atan2: {what}"), n)?;
    }
    if let Some(b) = w_bf16 {
        b.check_len("adam_atan2: w_bf16", n)?;
    }
    if h.step == 0 {
        return Err(CudaError::Shape("adam_atan2: steps count from 1".into()));
    }
    // The bias corrections in f64 on the host, once per step.
    let t = h.step as i32;
    let bc1 = 1.0 - h.beta1.powi(t);
    let bc2 = 1.0 - h.beta2.powi(t);
    let args = AdamAtan2Args {
        w: w.ptr(),
        m: m.ptr(),
        v: v.ptr(),
        g: g.cptr(),
        w_bf16: w_bf16.map_or(std::ptr::null_mut(), Buffer::ptr),
        n: n as i64,
        decay: (1.0 - h.lr * h.weight_decay) as f32,
        one_minus_beta1: (1.0 - h.beta1) as f32,
        one_minus_beta2: (1.0 - h.beta2) as f32,
        step_size: (h.lr / bc1) as f32,
        sqrt_bc2: bc2.sqrt() as f32,
    };
    launch(
        dev,
        ADAM_ATAN2_F32,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}

/// Sign-SGD on the rows `ids` [N] of `table` [num_ids, D] with the summed
/// gradient rows `grad` [N, D]; out-of-range ids are skipped.
#[allow(clippy::too_many_arguments)]
pub fn puzzle_sign_sgd(
    dev: &Device,
    table: &Buffer<f32>,
    grad: &Buffer<f32>,
    ids: &Buffer<i32>,
    n: usize,
    d: usize,
    num_ids: usize,
    lr: f64,
    weight_decay: f64,
) -> Result<(), CudaError> {
    let what = "puzzle_sign_sgd";
    dev.check_buffers(what, &[table, grad, ids])?;
    table.check_len(what, mul(what, &[num_ids, d])?)?;
    grad.check_len(what, mul(what, &[n, d])?)?;
    ids.check_len(what, n)?;
    let args = PuzzleSignSgdArgs {
        table: table.ptr(),
        grad: grad.cptr(),
        ids: ids.cptr(),
        N: dim("N", n)?,
        D: dim("D", d)?,
        num_ids: dim("num_ids", num_ids)?,
        lr: lr as f32,
        decay: (1.0 - lr * weight_decay) as f32,
    };
    // One block per gradient row (grid-stride over rows).
    launch(
        dev,
        PUZZLE_SIGN_SGD_F32,
        grid_stride(dev, n * BLOCK as usize, BLOCK),
        &args,
    )
}

/// `shadow = (1 - rate) w + rate shadow` over every element of `shadow`.
pub fn ema(
    dev: &Device,
    shadow: &Buffer<f32>,
    w: &Buffer<f32>,
    rate: f64,
) -> Result<(), CudaError> {
    dev.check_buffers("ema", &[shadow, w])?;
    let n = shadow.len();
    w.check_len("ema: w", n)?;
    let args = EmaArgs {
        shadow: shadow.ptr(),
        w: w.cptr(),
        n: n as i64,
        rate: rate as f32,
        one_minus_rate: (1.0 - rate) as f32,
    };
    launch(
        dev,
        EMA_F32,
        grid_stride(dev, n.div_ceil(PACK), BLOCK),
        &args,
    )
}
