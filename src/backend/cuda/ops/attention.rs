//! attention.cu: fused RoPE + non-causal softmax attention over the qkv
//! GEMM's output (q and k not yet rotated), forward and backward.
//!
//! The tile sizes here mirror the kernel's constants (see the top comment of
//! `kernels/attention.cu`); they set each launch's grid and dynamic shared
//! memory, which is above the 48 KiB default for head dims 64 and 128, so the
//! runtime opts each kernel in before its first launch. The shared memory
//! depends on the device ([`attention_plan`]): the forward and dQ kernels
//! stage the next K tile's RoPE rows in shared memory where they fit (every
//! head dim on sm_90's 227 KiB) and read them from global memory where they
//! do not (the dQ kernel at d 64 on the 99 KiB of sm_86 and sm_89: an L4).

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

/// Threads per block of the tile kernels (4 warps).
const THREADS: u32 = 128;
/// Key rows per tile (forward, dQ) and keys per block (dK/dV).
const BK: usize = 64;
const DELTA_BLOCK: u32 = 256;

/// The qkv layout: `[batch, seq, 3 * heads * head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    /// 32, 64 or 128.
    pub head_dim: usize,
}

impl AttentionShape {
    /// `batch * seq * 3 * heads * head_dim`, the qkv and dqkv length.
    pub fn qkv_len(&self) -> Result<usize, CudaError> {
        mul(
            "attention",
            &[self.batch, self.seq, 3, self.heads, self.head_dim],
        )
    }
    /// `batch * seq * heads * head_dim`, the o and do length.
    pub fn o_len(&self) -> Result<usize, CudaError> {
        mul(
            "attention",
            &[self.batch, self.seq, self.heads, self.head_dim],
        )
    }
    /// `batch * heads * seq`, the lse and delta length.
    pub fn rows(&self) -> Result<usize, CudaError> {
        mul("attention", &[self.batch, self.heads, self.seq])
    }
    /// The softmax scale `1 / sqrt(head_dim)`, as the CPU engine computes it.
    pub fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }
}

/// Query rows per block of the forward for head dim `d`.
fn forward_queries(d: usize) -> usize {
    if d <= 64 {
        128
    } else {
        64
    }
}

/// Queries per block of the dQ kernel for head dim `d` (as the forward).
fn dq_queries(d: usize) -> usize {
    forward_queries(d)
}

/// Queries per inner tile of the dK/dV kernel for head dim `d`.
fn dkdv_queries(d: usize) -> usize {
    if d <= 64 {
        64
    } else {
        16
    }
}

/// Bytes of one bf16 tile of `rows` rows of head dim `d` (rows padded by 8).
fn tile_bytes(rows: usize, d: usize) -> usize {
    rows * (d + 8) * 2
}

/// Bytes of the cos and sin table rows of `rows` positions (f32).
fn table_bytes(rows: usize, d: usize) -> usize {
    2 * rows * d * 4
}

/// Dynamic shared memory of the forward without the table rows: the Q tile,
/// two K and two V tiles.
fn forward_tile_bytes(d: usize) -> usize {
    tile_bytes(forward_queries(d) + 4 * BK, d)
}

/// Dynamic shared memory of the dK/dV kernel: the K and V tiles, two Q and
/// two dO tiles, two lse and two delta vectors.
fn dkdv_shared_bytes(d: usize) -> usize {
    let bq = dkdv_queries(d);
    tile_bytes(2 * BK + 4 * bq, d) + 4 * bq * 4
}

/// Dynamic shared memory of the dQ kernel without the table rows: the Q and
/// dO tiles, two K and two V tiles.
fn dq_tile_bytes(d: usize) -> usize {
    tile_bytes(2 * dq_queries(d) + 4 * BK, d)
}

/// One kernel's launch: its dynamic shared memory and whether the next K
/// tile's RoPE rows are staged in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedPlan {
    pub bytes: usize,
    pub stage_tables: bool,
}

/// The shared memory of the three tile kernels of head dim `d` on a device
/// allowing `max_shared` bytes per block. Over `max_shared` only when even
/// the unstaged tiles do not fit (the launch is then refused with
/// [`CudaError::SharedMemory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    pub forward: SharedPlan,
    pub dkdv: SharedPlan,
    pub dq: SharedPlan,
}

/// The plan for head dim `d` under `max_shared` bytes per block (the
/// device's opt-in maximum): a query-tile kernel stages its table rows when
/// tiles plus rows fit.
pub fn attention_plan(d: usize, max_shared: usize) -> AttentionPlan {
    let query_tile = |tiles: usize| {
        let staged = tiles + table_bytes(BK, d);
        if staged <= max_shared {
            SharedPlan {
                bytes: staged,
                stage_tables: true,
            }
        } else {
            SharedPlan {
                bytes: tiles,
                stage_tables: false,
            }
        }
    };
    AttentionPlan {
        forward: query_tile(forward_tile_bytes(d)),
        dkdv: SharedPlan {
            bytes: dkdv_shared_bytes(d),
            stage_tables: false,
        },
        dq: query_tile(dq_tile_bytes(d)),
    }
}

/// The three kernels of one head dim.
struct Kernels {
    forward: Kernel<AttentionForwardArgs>,
    dkdv: Kernel<AttentionBackwardArgs>,
    dq: Kernel<AttentionBackwardArgs>,
}

fn kernels(what: &str, s: &AttentionShape) -> Result<Kernels, CudaError> {
    Ok(match s.head_dim {
        32 => Kernels {
            forward: ATTENTION_FORWARD_D32,
            dkdv: ATTENTION_BACKWARD_DKDV_D32,
            dq: ATTENTION_BACKWARD_DQ_D32,
        },
        64 => Kernels {
            forward: ATTENTION_FORWARD_D64,
            dkdv: ATTENTION_BACKWARD_DKDV_D64,
            dq: ATTENTION_BACKWARD_DQ_D64,
        },
        128 => Kernels {
            forward: ATTENTION_FORWARD_D128,
            dkdv: ATTENTION_BACKWARD_DKDV_D128,
            dq: ATTENTION_BACKWARD_DQ_D128,
        },
        d => {
            return Err(CudaError::Shape(format!(
                "{what}: head_dim {d} has no kernel (32, 64 or 128)"
            )))
        }
    })
}

/// Refuses a buffer whose start is not 16-byte aligned: the kernels copy
/// rows and tables in 16-byte pieces (whole allocations always are aligned).
fn check_aligned<T: crate::backend::cuda::Elem>(
    what: &str,
    name: &str,
    b: &Buffer<T>,
) -> Result<(), CudaError> {
    if b.cptr() as usize % 16 != 0 {
        return Err(CudaError::Shape(format!(
            "{what}: {name} must start 16-byte aligned"
        )));
    }
    Ok(())
}

/// The checks every entry point shares: a non-empty shape whose blocks and
/// sizes fit the kernels' 32-bit indices, the tables' lengths, alignment.
fn check_common(
    what: &str,
    s: &AttentionShape,
    qkv: &Buffer<bf16>,
    cos: &Buffer<f32>,
    sin: &Buffer<f32>,
) -> Result<(), CudaError> {
    if s.batch == 0 || s.seq == 0 || s.heads == 0 {
        return Err(CudaError::Shape(format!(
            "{what}: empty shape {s:?} (batch, seq and heads must be >= 1)"
        )));
    }
    qkv.check_len(what, s.qkv_len()?)?;
    cos.check_len(what, mul(what, &[s.seq, s.head_dim])?)?;
    sin.check_len(what, mul(what, &[s.seq, s.head_dim])?)?;
    check_aligned(what, "qkv", qkv)?;
    check_aligned(what, "cos", cos)?;
    check_aligned(what, "sin", sin)?;
    Ok(())
}

/// A 1-D grid of `tiles` blocks per (sample, head).
fn tile_grid(
    what: &str,
    s: &AttentionShape,
    rows_per_tile: usize,
    shared: usize,
) -> Result<LaunchConfig, CudaError> {
    let blocks = mul(what, &[s.batch, s.heads, s.seq.div_ceil(rows_per_tile)])?;
    let blocks = u32::try_from(blocks)
        .map_err(|_| CudaError::Shape(format!("{what}: {blocks} blocks exceed the grid limit")))?;
    Ok(LaunchConfig::linear(blocks, THREADS, shared as u32))
}

/// B, S, H, d as the kernels' `int32_t`.
fn dims(s: &AttentionShape) -> Result<(i32, i32, i32, i32), CudaError> {
    Ok((
        dim("B", s.batch)?,
        dim("S", s.seq)?,
        dim("H", s.heads)?,
        dim("d", s.head_dim)?,
    ))
}

/// Writes `o` [B, S, H d] and `lse` [B, H, S] from the unrotated `qkv`.
pub fn attention_forward(
    dev: &Device,
    o: &Buffer<bf16>,
    lse: &Buffer<f32>,
    qkv: &Buffer<bf16>,
    cos: &Buffer<f32>,
    sin: &Buffer<f32>,
    s: AttentionShape,
) -> Result<(), CudaError> {
    let what = "attention_forward";
    let k = kernels(what, &s)?;
    dev.check_buffers(what, &[o, lse, qkv, cos, sin])?;
    check_common(what, &s, qkv, cos, sin)?;
    o.check_len(what, s.o_len()?)?;
    lse.check_len(what, s.rows()?)?;
    check_aligned(what, "o", o)?;
    let (b, sq, h, d) = dims(&s)?;
    let plan = attention_plan(s.head_dim, dev.max_shared_per_block() as usize);
    let args = AttentionForwardArgs {
        o: o.ptr(),
        lse: lse.ptr(),
        qkv: qkv.cptr(),
        cos: cos.cptr(),
        sin: sin.cptr(),
        B: b,
        S: sq,
        H: h,
        d,
        scale: s.scale(),
        stage_tables: plan.forward.stage_tables as i32,
    };
    let cfg = tile_grid(what, &s, forward_queries(s.head_dim), plan.forward.bytes)?;
    launch(dev, k.forward, cfg, &args)
}

/// Writes `dqkv` [B, S, 3 H d] (the RoPE backward applied to dq and dk) from
/// the forward's inputs and outputs and `dout` [B, S, H d]; `delta` [B, H, S]
/// is scratch (it receives `rowsum(dout * o)`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dev: &Device,
    dqkv: &Buffer<bf16>,
    delta: &Buffer<f32>,
    qkv: &Buffer<bf16>,
    cos: &Buffer<f32>,
    sin: &Buffer<f32>,
    o: &Buffer<bf16>,
    lse: &Buffer<f32>,
    dout: &Buffer<bf16>,
    s: AttentionShape,
) -> Result<(), CudaError> {
    let what = "attention_backward";
    let k = kernels(what, &s)?;
    dev.check_buffers(what, &[dqkv, delta, qkv, cos, sin, o, lse, dout])?;
    check_common(what, &s, qkv, cos, sin)?;
    dqkv.check_len(what, s.qkv_len()?)?;
    o.check_len(what, s.o_len()?)?;
    dout.check_len(what, s.o_len()?)?;
    lse.check_len(what, s.rows()?)?;
    delta.check_len(what, s.rows()?)?;
    check_aligned(what, "o", o)?;
    check_aligned(what, "dout", dout)?;
    let (b, sq, h, d) = dims(&s)?;
    let delta_args = AttentionDeltaArgs {
        delta: delta.ptr(),
        o: o.cptr(),
        dout: dout.cptr(),
        B: b,
        S: sq,
        H: h,
        d,
    };
    launch(
        dev,
        ATTENTION_DELTA,
        grid_stride(dev, s.rows()?, DELTA_BLOCK),
        &delta_args,
    )?;
    let args = AttentionBackwardArgs {
        dqkv: dqkv.ptr(),
        qkv: qkv.cptr(),
        cos: cos.cptr(),
        sin: sin.cptr(),
        dout: dout.cptr(),
        lse: lse.cptr(),
        delta: delta.cptr(),
        B: b,
        S: sq,
        H: h,
        d,
        scale: s.scale(),
        stage_tables: 0,
    };
    let plan = attention_plan(s.head_dim, dev.max_shared_per_block() as usize);
    let dkdv = tile_grid(what, &s, BK, plan.dkdv.bytes)?;
    launch(dev, k.dkdv, dkdv, &args)?;
    let dq = tile_grid(what, &s, dq_queries(s.head_dim), plan.dq.bytes)?;
    let dq_args = AttentionBackwardArgs {
        stage_tables: plan.dq.stage_tables as i32,
        ..args
    };
    launch(dev, k.dq, dq, &dq_args)
}
