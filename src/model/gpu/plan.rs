//! The CUDA engine's memory plan: every activation buffer of one ACT step,
//! sized once from the config and the local batch, and what it costs, so the
//! engine can refuse a batch that does not fit (naming the largest that
//! does) before it allocates anything.
//!
//! The gradient cycle keeps, per L-module call, the call's input `h0` and
//! per block what its backward reads (qkv before RoPE, the attention lse and
//! output, both norm outputs and their rstd, gate/up); a block's input is
//! the previous block's output, so it is not stored twice. The no-gradient
//! cycles, the Q-continue bootstrap and evaluation reuse one block's worth
//! of scratch, which the backward reuses again for its gradients.

use half::bf16;

use crate::backend::cuda::ops::{input_embedding_backward_scratch_len, EmbeddingShape};
use crate::backend::cuda::{Buffer, CudaError, Device};
use crate::model::trm::Dims;

/// What the backward of one block reads (see the module comment).
pub struct BlockSlot {
    /// `[M, 3D]` the qkv projection, before RoPE.
    pub qkv: Buffer<bf16>,
    /// `[B, H, S]`
    pub lse: Buffer<f32>,
    /// `[M, D]` attention output (o_proj input).
    pub o: Buffer<bf16>,
    /// `[M, D]` and `[M]`
    pub y1: Buffer<bf16>,
    pub rstd1: Buffer<f32>,
    /// `[M, 2F]`
    pub gu: Buffer<bf16>,
    /// `[M, D]` block output and `[M]`
    pub y2: Buffer<bf16>,
    pub rstd2: Buffer<f32>,
}

/// One L-module call of the gradient cycle.
pub struct TapeCall {
    /// `[M, D]` the call's input `z + inj`.
    pub h0: Buffer<bf16>,
    pub blocks: Vec<BlockSlot>,
}

impl TapeCall {
    /// The input of block `i`: `h0`, then the previous block's output.
    pub fn block_input(&self, i: usize) -> &Buffer<bf16> {
        if i == 0 {
            &self.h0
        } else {
            &self.blocks[i - 1].y2
        }
    }

    /// The call's output (its last block's), or `h0` without blocks.
    pub fn output(&self) -> &Buffer<bf16> {
        self.blocks.last().map_or(&self.h0, |b| &b.y2)
    }
}

/// Every activation buffer of a step (all `[M, D]` bf16 unless stated).
pub struct Activations {
    /// The batch: tokens `[B, seq]`, puzzle ids `[B]`, labels over all `S`
    /// positions `[B, S]` (ignored at the puzzle positions), halted flags `[B]`.
    pub tokens: Buffer<i32>,
    pub puzzle_ids: Buffer<i32>,
    pub labels: Buffer<i32>,
    pub halted: Buffer<i32>,
    /// Input embeddings and the injection `z_H + x`.
    pub x: Buffer<bf16>,
    pub inj: Buffer<bf16>,
    /// The training carry.
    pub z_h: Buffer<bf16>,
    pub z_l: Buffer<bf16>,
    /// A second carry: the bootstrap's and evaluation's, so neither
    /// touches the training carry.
    pub side_h: Buffer<bf16>,
    pub side_l: Buffer<bf16>,
    /// No-gradient L calls: the input, one block's buffers, the SwiGLU output `[M, F]`.
    pub h0: Buffer<bf16>,
    pub scratch: BlockSlot,
    pub a: Buffer<bf16>,
    /// The backward's `[M, F]` gradient of the SwiGLU output.
    pub da: Buffer<bf16>,
    pub tape: Vec<TapeCall>,
    /// The running gradient of the backward and the input-embedding gradient.
    pub g: Buffer<bf16>,
    pub dx: Buffer<bf16>,
    /// `[B, H, S]` attention backward scratch.
    pub delta: Buffer<f32>,
    /// `[M, V]` the LM head over all positions (puzzle rows are ignored by
    /// the loss) and its gradient.
    pub logits: Buffer<bf16>,
    pub dlogits: Buffer<bf16>,
    /// `[B, 2]` Q logits before the bias, and their gradient as a GEMM operand.
    pub q: Buffer<f32>,
    pub dq: Buffer<bf16>,
    /// `[B]` loss reductions of the CE kernel.
    pub sample_loss: Buffer<f32>,
    pub count: Buffer<i32>,
    pub correct: Buffer<i32>,
    pub seq_correct: Buffer<i32>,
    /// `[V, D]` token-embedding gradient, `[B, ndim]` puzzle rows' gradient.
    pub dembed: Buffer<f32>,
    pub dpuzzle: Buffer<f32>,
    /// The embedding backward's per-slice partial sums (its length from
    /// [`input_embedding_backward_scratch_len`]).
    pub dembed_scratch: Buffer<f32>,
    /// `[S, d]` RoPE tables (identity without RoPE).
    pub cos: Buffer<f32>,
    pub sin: Buffer<f32>,
}

/// The shape of the plan: sizes, L-module calls kept by the tape, blocks
/// per call.
#[derive(Debug, Clone, Copy)]
pub struct PlanShape {
    pub dm: Dims,
    pub tape_calls: usize,
    pub layers: usize,
}

/// The input embedding's sizes for `dm`, with a table of `num_puzzle_ids` rows.
pub(super) fn embedding_shape(dm: &Dims, num_puzzle_ids: usize) -> EmbeddingShape {
    EmbeddingShape {
        b: dm.b,
        t: dm.seq,
        p: dm.p,
        d: dm.d,
        v: dm.v,
        ndim: dm.ndim,
        num_puzzle_ids,
    }
}

/// f32 elements of [`Activations::dembed_scratch`] for the sizes `dm`
/// (the table's rows do not size the scratch).
fn dembed_scratch_len(dm: &Dims) -> usize {
    input_embedding_backward_scratch_len(&embedding_shape(dm, 0))
}

/// Element counts of the plan's buffers by kind (bf16, f32, i32), in the
/// order [`Activations::allocate`] makes them.
fn counts(p: &PlanShape) -> (usize, usize, usize) {
    let dm = &p.dm;
    let (m, d, f) = (dm.m(), dm.d, dm.f);
    let rows = dm.b * dm.h * dm.s;
    let slot_bf16 = m * (3 * d + d + d + 2 * f + d);
    let slot_f32 = rows + 2 * m;
    let tape_bf16 = p.tape_calls * (m * d + p.layers * slot_bf16);
    let tape_f32 = p.tape_calls * p.layers * slot_f32;
    let bf16s = m * d * 9 + slot_bf16 + 2 * m * f + tape_bf16 + 2 * m * dm.v + 2 * dm.b;
    let f32s = slot_f32
        + tape_f32
        + rows
        + 2 * dm.b
        + dm.b
        + dm.v * d
        + (dm.b * dm.ndim).max(1)
        + dembed_scratch_len(dm)
        + 2 * dm.s * dm.hd;
    let i32s = dm.b * dm.seq + dm.b + m + dm.b + 3 * dm.b;
    (bf16s, f32s, i32s)
}

impl PlanShape {
    /// Bytes of every activation buffer.
    pub fn bytes(&self) -> usize {
        let (h, f, i) = counts(self);
        2 * h + 4 * f + 4 * i
    }

    /// The largest local batch whose activations fit in `budget` bytes (0
    /// when not even one sample does).
    pub fn largest_batch(&self, budget: usize) -> usize {
        let fits = |b: usize| {
            PlanShape {
                dm: Dims { b, ..self.dm },
                ..*self
            }
            .bytes()
                <= budget
        };
        // The bytes grow with B but not linearly (the embedding scratch is
        // capped), so search: double past the answer, then bisect. The
        // doubling stops at 2^32 samples, far past any device and short of
        // overflowing the counts.
        if !fits(1) {
            return 0;
        }
        let mut hi = 2;
        while hi < 1 << 32 && fits(hi) {
            hi *= 2;
        }
        let mut lo = hi / 2;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

impl BlockSlot {
    fn allocate(dev: &Device, dm: &Dims) -> Result<BlockSlot, CudaError> {
        let (m, d, f) = (dm.m(), dm.d, dm.f);
        Ok(BlockSlot {
            qkv: dev.zeros(m * 3 * d)?,
            lse: dev.zeros(dm.b * dm.h * dm.s)?,
            o: dev.zeros(m * d)?,
            y1: dev.zeros(m * d)?,
            rstd1: dev.zeros(m)?,
            gu: dev.zeros(m * 2 * f)?,
            y2: dev.zeros(m * d)?,
            rstd2: dev.zeros(m)?,
        })
    }

    fn bytes(&self) -> usize {
        self.qkv.bytes()
            + self.lse.bytes()
            + self.o.bytes()
            + self.y1.bytes()
            + self.rstd1.bytes()
            + self.gu.bytes()
            + self.y2.bytes()
            + self.rstd2.bytes()
    }
}

impl Activations {
    /// Allocates the plan on `dev`; `cos` / `sin` are the `[S, d]` tables.
    pub fn allocate(
        dev: &Device,
        p: &PlanShape,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<Activations, CudaError> {
        let dm = &p.dm;
        let (m, d, f) = (dm.m(), dm.d, dm.f);
        let md = || dev.zeros::<bf16>(m * d);
        let tape = (0..p.tape_calls)
            .map(|_| {
                Ok(TapeCall {
                    h0: md()?,
                    blocks: (0..p.layers)
                        .map(|_| BlockSlot::allocate(dev, dm))
                        .collect::<Result<_, CudaError>>()?,
                })
            })
            .collect::<Result<_, CudaError>>()?;
        Ok(Activations {
            tokens: dev.zeros(dm.b * dm.seq)?,
            puzzle_ids: dev.zeros(dm.b)?,
            labels: dev.zeros(m)?,
            halted: dev.zeros(dm.b)?,
            x: md()?,
            inj: md()?,
            z_h: md()?,
            z_l: md()?,
            side_h: md()?,
            side_l: md()?,
            h0: md()?,
            scratch: BlockSlot::allocate(dev, dm)?,
            a: dev.zeros(m * f)?,
            da: dev.zeros(m * f)?,
            tape,
            g: md()?,
            dx: md()?,
            delta: dev.zeros(dm.b * dm.h * dm.s)?,
            logits: dev.zeros(m * dm.v)?,
            dlogits: dev.zeros(m * dm.v)?,
            q: dev.zeros(2 * dm.b)?,
            dq: dev.zeros(2 * dm.b)?,
            sample_loss: dev.zeros(dm.b)?,
            count: dev.zeros(dm.b)?,
            correct: dev.zeros(dm.b)?,
            seq_correct: dev.zeros(dm.b)?,
            dembed: dev.zeros(dm.v * d)?,
            dpuzzle: dev.zeros((dm.b * dm.ndim).max(1))?,
            dembed_scratch: dev.zeros(dembed_scratch_len(dm))?,
            cos: dev.upload(cos)?,
            sin: dev.upload(sin)?,
        })
    }

    /// Bytes actually allocated (the plan's [`PlanShape::bytes`]).
    pub fn bytes(&self) -> usize {
        let tape: usize = self
            .tape
            .iter()
            .map(|c| c.h0.bytes() + c.blocks.iter().map(BlockSlot::bytes).sum::<usize>())
            .sum();
        let bf16s = [
            &self.x,
            &self.inj,
            &self.z_h,
            &self.z_l,
            &self.side_h,
            &self.side_l,
            &self.h0,
            &self.a,
            &self.da,
            &self.g,
            &self.dx,
            &self.logits,
            &self.dlogits,
            &self.dq,
        ];
        let f32s = [
            &self.delta,
            &self.q,
            &self.sample_loss,
            &self.dembed,
            &self.dpuzzle,
            &self.dembed_scratch,
            &self.cos,
            &self.sin,
        ];
        let i32s = [
            &self.tokens,
            &self.puzzle_ids,
            &self.labels,
            &self.halted,
            &self.count,
            &self.correct,
            &self.seq_correct,
        ];
        tape + self.scratch.bytes()
            + bf16s.iter().map(|b| b.bytes()).sum::<usize>()
            + f32s.iter().map(|b| b.bytes()).sum::<usize>()
            + i32s.iter().map(|b| b.bytes()).sum::<usize>()
    }
}

#[cfg(all(test, feature = "emu"))]
mod tests {
    use super::*;
    use crate::model::config::ArchConfig;

    fn shape(b: usize) -> PlanShape {
        let mut c = ArchConfig::trm_default(9, 10, 6);
        c.hidden_size = 64;
        c.num_heads = 2;
        c.l_layers = 2;
        c.l_cycles = 3;
        c.puzzle_emb_ndim = 64;
        c.puzzle_emb_len = 2;
        PlanShape {
            dm: Dims::new(&c, b),
            tape_calls: c.l_cycles + 1,
            layers: c.l_layers,
        }
    }

    /// The plan's arithmetic is what allocation makes, byte for byte.
    #[test]
    fn planned_bytes_are_the_allocated_bytes() {
        for b in [1, 3] {
            let p = shape(b);
            let s = p.dm.s * p.dm.hd;
            let acts = Activations::allocate(&Device::Emu, &p, &vec![1.0; s], &vec![0.0; s])
                .expect("allocate");
            assert_eq!(acts.bytes(), p.bytes(), "batch {b}");
        }
    }

    /// The largest batch for a budget fits it, and one more does not.
    #[test]
    fn largest_batch_is_the_largest_that_fits() {
        let p = shape(1);
        for budget in [0, p.bytes() - 1, p.bytes(), 10 * p.bytes() + 12345] {
            let n = p.largest_batch(budget);
            let at = |b: usize| PlanShape {
                dm: Dims { b, ..p.dm },
                ..p
            };
            if n > 0 {
                assert!(at(n).bytes() <= budget, "{n} for {budget}");
            }
            assert!(at(n + 1).bytes() > budget, "{} fits {budget}", n + 1);
        }
    }

    /// The ARC config's activations per local batch (the README's table).
    #[test]
    fn arc_config_activation_sizes() {
        let mut c = ArchConfig::trm_default(900, 12, 1);
        c.hidden_size = 512;
        c.num_heads = 8;
        c.expansion = 4.0;
        c.l_layers = 2;
        c.puzzle_emb_ndim = 512;
        c.puzzle_emb_len = 16;
        for l_cycles in [4, 6] {
            for b in [96, 192, 384] {
                let p = PlanShape {
                    dm: Dims::new(&c, b),
                    tape_calls: l_cycles + 1,
                    layers: 2,
                };
                let gib = p.bytes() as f64 / (1u64 << 30) as f64;
                println!("L_cycles {l_cycles} batch {b}: {gib:.1} GiB");
                // Linear in the batch: about 0.1 GiB per sample at L_cycles 4.
                assert!(gib > 0.05 * b as f64 && gib < 0.2 * b as f64, "{gib}");
            }
        }
    }
}
