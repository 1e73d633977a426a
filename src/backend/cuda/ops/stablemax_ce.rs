//! stablemax_ce.cu: the token cross-entropy of the LM head and the BCE of the
//! Q head.

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

const BLOCK: u32 = 256;
/// The forward's block: one per sample, threads over its tokens.
const SAMPLE_BLOCK: u32 = 128;
/// The kernels keep a row of logits in registers.
const MAX_VOCAB: usize = 32;

/// The optional outputs of [`stablemax_ce_forward`] (each `None` is skipped).
#[derive(Debug, Clone, Copy, Default)]
pub struct CeOutputs<'a> {
    /// [B, T] `-log p(label)`, 0 where ignored.
    pub loss: Option<&'a Buffer<f32>>,
    /// [B, T] argmax.
    pub preds: Option<&'a Buffer<i32>>,
    /// [B] mean loss over the labelled tokens.
    pub sample_loss: Option<&'a Buffer<f32>>,
    /// [B] labelled tokens.
    pub count: Option<&'a Buffer<i32>>,
    /// [B] labelled tokens predicted right.
    pub correct: Option<&'a Buffer<i32>>,
    /// [B] 1 where every labelled token is right.
    pub seq_correct: Option<&'a Buffer<i32>>,
}

fn check_vocab(what: &str, v: usize) -> Result<(), CudaError> {
    if v == 0 || v > MAX_VOCAB {
        return Err(CudaError::Shape(format!(
            "{what}: vocabulary {v} outside 1..={MAX_VOCAB}"
        )));
    }
    Ok(())
}

fn opt<T: crate::backend::cuda::Elem>(
    what: &str,
    b: Option<&Buffer<T>>,
    need: usize,
) -> Result<*mut T, CudaError> {
    match b {
        Some(b) => {
            b.check_len(what, need)?;
            Ok(b.ptr())
        }
        None => Ok(std::ptr::null_mut()),
    }
}

/// Loss, predictions and per-sample reductions of `logits` [B, T, V] against
/// `labels` [B, T] (None: predictions only). Labels outside 0..V are ignored.
pub fn stablemax_ce_forward(
    dev: &Device,
    logits: &Buffer<bf16>,
    labels: Option<&Buffer<i32>>,
    out: CeOutputs<'_>,
    b: usize,
    t: usize,
    v: usize,
) -> Result<(), CudaError> {
    let what = "stablemax_ce_forward";
    check_vocab(what, v)?;
    let bt = mul(what, &[b, t])?;
    dev.check_buffers(
        what,
        &[
            logits,
            &labels,
            &out.loss,
            &out.preds,
            &out.sample_loss,
            &out.count,
            &out.correct,
            &out.seq_correct,
        ],
    )?;
    logits.check_len("stablemax_ce_forward: logits", mul(what, &[bt, v])?)?;
    let args = StablemaxCeForwardArgs {
        logits: logits.cptr(),
        labels: opt("stablemax_ce_forward: labels", labels, bt)?.cast_const(),
        loss: opt("stablemax_ce_forward: loss", out.loss, bt)?,
        preds: opt("stablemax_ce_forward: preds", out.preds, bt)?,
        sample_loss: opt("stablemax_ce_forward: sample_loss", out.sample_loss, b)?,
        count: opt("stablemax_ce_forward: count", out.count, b)?,
        correct: opt("stablemax_ce_forward: correct", out.correct, b)?,
        seq_correct: opt("stablemax_ce_forward: seq_correct", out.seq_correct, b)?,
        B: dim("B", b)?,
        T: dim("T", t)?,
        V: dim("V", v)?,
    };
    let cfg = grid_stride(dev, b * SAMPLE_BLOCK as usize, SAMPLE_BLOCK);
    launch(dev, STABLEMAX_CE_FORWARD_BF16, cfg, &args)
}

/// `dlogits` [B, T, V] of the mean-per-sample loss times `grad_scale`;
/// `count` [B] is the forward's.
#[allow(clippy::too_many_arguments)]
pub fn stablemax_ce_backward(
    dev: &Device,
    dlogits: &Buffer<bf16>,
    logits: &Buffer<bf16>,
    labels: &Buffer<i32>,
    count: &Buffer<i32>,
    grad_scale: f32,
    b: usize,
    t: usize,
    v: usize,
) -> Result<(), CudaError> {
    let what = "stablemax_ce_backward";
    check_vocab(what, v)?;
    let bt = mul(what, &[b, t])?;
    dev.check_buffers("stablemax_ce_backward", &[dlogits, logits, labels, count])?;
    dlogits.check_len("stablemax_ce_backward: dlogits", bt * v)?;
    logits.check_len("stablemax_ce_backward: logits", bt * v)?;
    labels.check_len("stablemax_ce_backward: labels", bt)?;
    count.check_len("stablemax_ce_backward: count", b)?;
    let args = StablemaxCeBackwardArgs {
        dlogits: dlogits.ptr(),
        logits: logits.cptr(),
        labels: labels.cptr(),
        count: count.cptr(),
        grad_scale,
        B: dim("B", b)?,
        T: dim("T", t)?,
        V: dim("V", v)?,
    };
    launch(
        dev,
        STABLEMAX_CE_BACKWARD_BF16,
        grid_stride(dev, bt, BLOCK),
        &args,
    )
}

fn q_args(
    what: &str,
    q: &Buffer<f32>,
    seq_correct: &Buffer<i32>,
    q_continue_target: Option<&Buffer<f32>>,
    b: usize,
) -> Result<QHeadBceArgs, CudaError> {
    q.check_len(what, 2 * b)?;
    seq_correct.check_len(what, b)?;
    Ok(QHeadBceArgs {
        q: q.cptr(),
        seq_correct: seq_correct.cptr(),
        q_continue_target: opt(what, q_continue_target, b)?.cast_const(),
        loss: std::ptr::null_mut(),
        dq: std::ptr::null_mut(),
        grad_scale: 0.0,
        B: dim("B", b)?,
    })
}

/// `loss` [B, 2]: BCE of q_halt against `seq_correct` and of q_continue
/// against `q_continue_target` (0 without one).
pub fn q_bce_forward(
    dev: &Device,
    loss: &Buffer<f32>,
    q: &Buffer<f32>,
    seq_correct: &Buffer<i32>,
    q_continue_target: Option<&Buffer<f32>>,
    b: usize,
) -> Result<(), CudaError> {
    let what = "q_bce_forward";
    dev.check_buffers(what, &[loss, q, seq_correct, &q_continue_target])?;
    loss.check_len(what, 2 * b)?;
    let args = QHeadBceArgs {
        loss: loss.ptr(),
        ..q_args(what, q, seq_correct, q_continue_target, b)?
    };
    launch(dev, Q_BCE_FORWARD_F32, grid_stride(dev, b, BLOCK), &args)
}

/// `dq` [B, 2] of [`q_bce_forward`]'s loss times `grad_scale`.
pub fn q_bce_backward(
    dev: &Device,
    dq: &Buffer<f32>,
    q: &Buffer<f32>,
    seq_correct: &Buffer<i32>,
    q_continue_target: Option<&Buffer<f32>>,
    grad_scale: f32,
    b: usize,
) -> Result<(), CudaError> {
    let what = "q_bce_backward";
    dev.check_buffers(what, &[dq, q, seq_correct, &q_continue_target])?;
    dq.check_len(what, 2 * b)?;
    let args = QHeadBceArgs {
        dq: dq.ptr(),
        grad_scale,
        ..q_args(what, q, seq_correct, q_continue_target, b)?
    };
    launch(dev, Q_BCE_BACKWARD_F32, grid_stride(dev, b, BLOCK), &args)
}
