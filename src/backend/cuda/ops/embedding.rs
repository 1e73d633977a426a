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
/// Token rows each backward block sums before flushing to global memory.
const ROWS_PER_BLOCK: usize = 64;

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

/// `dembed [V, D] += scale * dx` at the token rows (accumulated: zero it
/// first for a fresh gradient); `dpuzzle [B, ndim] = scale * dx` at the
/// puzzle positions when given.
pub fn input_embedding_backward(
    dev: &Device,
    dembed: &Buffer<f32>,
    dpuzzle: Option<&Buffer<f32>>,
    dx: &Buffer<bf16>,
    tokens: &Buffer<i32>,
    scale: f32,
    s: EmbeddingShape,
) -> Result<(), CudaError> {
    let what = "input_embedding_backward";
    dev.check_buffers(what, &[dembed, &dpuzzle, dx, tokens])?;
    let n = s.check(what)?;
    dx.check_len("input_embedding_backward: dx", n)?;
    let table = mul(what, &[s.v, s.d])?;
    dembed.check_len("input_embedding_backward: dembed", table)?;
    let rows = mul(what, &[s.b, s.t])?;
    tokens.check_len("input_embedding_backward: tokens", rows)?;
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
    // Summing a block's rows in shared memory turns most atomics into
    // shared adds; worth it when the table fits.
    let shared = table * 4 <= SHARED_LIMIT;
    let blocks = grid_stride(dev, rows.div_ceil(ROWS_PER_BLOCK) * BLOCK as usize, BLOCK);
    let cfg = LaunchConfig {
        shared_bytes: if shared { (table * 4) as u32 } else { 0 },
        ..blocks
    };
    let args = InputEmbeddingBackwardArgs {
        dembed: dembed.ptr(),
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
        shared_accumulate: shared as i32,
    };
    launch(dev, INPUT_EMBEDDING_BACKWARD_BF16, cfg, &args)
}
