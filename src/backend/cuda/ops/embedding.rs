//! embedding.cu: token and puzzle embeddings into the input rows.

use half::bf16;

use super::{dim, grid_stride, launch, mul};
use crate::backend::cuda::abi::*;
use crate::backend::cuda::{Buffer, CudaError, Device};

const BLOCK: u32 = 256;
/// Outputs per thread per step (16-byte packs).
const PACK: usize = 8;
/// The backward sums rows in shared memory when the table fits this.
const SHARED_LIMIT: usize = 48 * 1024;
/// Bounds of the backward's slice count (see [`backward_slices`]).
const MIN_ROWS_PER_SLICE: usize = 64;
const MAX_SLICES: usize = 256;
const MAX_SCRATCH_BYTES: usize = 64 << 20;

/// Shapes of the input embedding: `B` samples of `P` puzzle positions and
/// `T` tokens, width `D`, vocabulary `V`; `ndim` puzzle-embedding values
/// (0: none) of `num_puzzle_ids` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingShape {
    pub b: usize,
    pub t: usize,
    pub p: usize,
    pub d: usize,
    pub v: usize,
    pub ndim: usize,
    pub num_puzzle_ids: usize,
}

impl EmbeddingShape {
    fn check(&self, what: &str) -> Result<usize, CudaError> {
        let rows = mul(what, &[self.b, self.p + self.t, self.d])?;
        if self.ndim > self.p * self.d {
            return Err(CudaError::Shape(format!(
                "{what}: ndim {} exceeds P * D = {}",
                self.ndim,
                self.p * self.d
            )));
        }
        Ok(rows)
    }
}

/// `x [B, P + T, D] = scale * [puzzle rows ; embed[tokens]]`; `puzzle` is
/// the f32 table [num_puzzle_ids, ndim] and the ids [B] (None when ndim = 0).
pub fn input_embedding_forward(
    dev: &Device,
    x: &Buffer<bf16>,
    embed: &Buffer<bf16>,
    tokens: &Buffer<i32>,
    puzzle: Option<(&Buffer<f32>, &Buffer<i32>)>,
    scale: f32,
    s: EmbeddingShape,
) -> Result<(), CudaError> {
    let what = "input_embedding_forward";
    let (pt, pi) = (puzzle.map(|p| p.0), puzzle.map(|p| p.1));
    dev.check_buffers(what, &[x, embed, tokens, &pt, &pi])?;
    let n = s.check(what)?;
    x.check_len("input_embedding_forward: x", n)?;
    embed.check_len("input_embedding_forward: embed", mul(what, &[s.v, s.d])?)?;
    tokens.check_len("input_embedding_forward: tokens", mul(what, &[s.b, s.t])?)?;
    let (pe, pid) = match puzzle {
        Some((table, ids)) if s.ndim > 0 => {
            table.check_len(
                "input_embedding_forward: puzzle_emb",
                mul(what, &[s.num_puzzle_ids, s.ndim])?,
            )?;
            ids.check_len("input_embedding_forward: puzzle_ids", s.b)?;
            (table.cptr(), ids.cptr())
        }
        None if s.ndim == 0 => (std::ptr::null(), std::ptr::null()),
        _ => {
            return Err(CudaError::Shape(format!(
                "{what}: the puzzle table and ids are given exactly when ndim > 0 (ndim {})",
                s.ndim
            )))
        }
    };
    let args = InputEmbeddingForwardArgs {
        x: x.ptr(),
        embed: embed.cptr(),
        tokens: tokens.cptr(),
        puzzle_emb: pe,
        puzzle_ids: pid,
        scale,
        B: dim("B", s.b)?,
        T: dim("T", s.t)?,
        P: dim("P", s.p)?,
        D: dim("D", s.d)?,
        V: dim("V", s.v)?,
        ndim: dim("ndim", s.ndim)?,
        num_puzzle_ids: dim("num_puzzle_ids", s.num_puzzle_ids)?,
    };
    let cfg = grid_stride(dev, n.div_ceil(PACK), BLOCK);
    launch(dev, INPUT_EMBEDDING_FORWARD_BF16, cfg, &args)
}

/// How many slices the backward cuts the `B * T` token rows into -- a
/// function of the shapes only, never of the device, since it fixes the
/// summation order and so the bits of dembed. Each slice gets at least
/// max(64, V) rows, so its V * D clear and flush cost no more than its rows;
/// at most 256 slices, and at most 64 MiB of scratch (`slices * V * D` f32),
/// but always one.
fn backward_slices(s: &EmbeddingShape) -> usize {
    let rows = s.b.saturating_mul(s.t);
    let table_bytes = s.v.saturating_mul(s.d).saturating_mul(4).max(1);
    let cap = MAX_SLICES.min(MAX_SCRATCH_BYTES / table_bytes).max(1);
    rows.div_ceil(MIN_ROWS_PER_SLICE.max(s.v)).clamp(1, cap)
}

/// f32 elements of the scratch [`input_embedding_backward`] needs for
/// shapes `s` (allocate it once per shape).
pub fn input_embedding_backward_scratch_len(s: &EmbeddingShape) -> usize {
    backward_slices(s).saturating_mul(s.v.saturating_mul(s.d))
}

/// `dembed [V, D] += scale * dx` at the token rows (accumulated: zero it
/// first for a fresh gradient); `dpuzzle [B, ndim] = scale * dx` at the
/// puzzle positions when given. Deterministic: no float atomics, and the
/// summation order depends on the shapes only (kernels/embedding.cu), so
/// the same inputs give the same bits on every run. `scratch` holds at
/// least [`input_embedding_backward_scratch_len`] elements; its contents
/// are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn input_embedding_backward(
    dev: &Device,
    dembed: &Buffer<f32>,
    dpuzzle: Option<&Buffer<f32>>,
    dx: &Buffer<bf16>,
    tokens: &Buffer<i32>,
    scratch: &Buffer<f32>,
    scale: f32,
    s: EmbeddingShape,
) -> Result<(), CudaError> {
    let what = "input_embedding_backward";
    dev.check_buffers(what, &[dembed, &dpuzzle, dx, tokens, scratch])?;
    let n = s.check(what)?;
    dx.check_len("input_embedding_backward: dx", n)?;
    let table = mul(what, &[s.v, s.d])?;
    dembed.check_len("input_embedding_backward: dembed", table)?;
    let rows = mul(what, &[s.b, s.t])?;
    tokens.check_len("input_embedding_backward: tokens", rows)?;
    let slices = backward_slices(&s);
    scratch.check_len(
        "input_embedding_backward: scratch",
        mul(what, &[slices, table])?,
    )?;
    let dp = match dpuzzle {
        Some(buf) => {
            buf.check_len(
                "input_embedding_backward: dpuzzle",
                mul(what, &[s.b, s.ndim])?,
            )?;
            buf.ptr()
        }
        None => std::ptr::null_mut(),
    };
    // Summing a slice in shared memory keeps its scattered adds on chip;
    // worth it when the table fits.
    let shared = table * 4 <= SHARED_LIMIT;
    let cfg = LaunchConfig::linear(
        slices as u32,
        BLOCK,
        if shared { (table * 4) as u32 } else { 0 },
    );
    let args = InputEmbeddingBackwardArgs {
        partial: scratch.ptr(),
        dpuzzle: dp,
        dx: dx.cptr(),
        tokens: tokens.cptr(),
        scale,
        B: dim("B", s.b)?,
        T: dim("T", s.t)?,
        P: dim("P", s.p)?,
        D: dim("D", s.d)?,
        V: dim("V", s.v)?,
        ndim: dim("ndim", s.ndim)?,
        nblocks: dim("nblocks", slices)?,
        shared_accumulate: shared as i32,
    };
    launch(dev, INPUT_EMBEDDING_BACKWARD_BF16, cfg, &args)?;
    let reduce = InputEmbeddingReduceArgs {
        dembed: dembed.ptr(),
        partial: scratch.cptr(),
        n: table as i64,
        nblocks: args.nblocks,
    };
    launch(
        dev,
        INPUT_EMBEDDING_BACKWARD_REDUCE,
        grid_stride(dev, table, BLOCK),
        &reduce,
    )
}
