//! The TRM inner model on the CPU reference backend: input embedding, the
//! post-norm block, the reasoning module `L(z, inj)`, one ACT step (H_cycles-1
//! no-grad cycles, then the gradient cycle), the LM and Q heads, the ACT loss
//! head, and the hand-written backward through the last H cycle.
//!
//! Design rule: all math is generic over [`Real`] so the same code runs in f32
//! (real runs, golden parity) and f64 (finite-difference checks). Weights are
//! unpacked once into [`Params`] (typed fields, reference names only at the
//! boundary). The gradient cycle keeps a [`BlockCache`] per block call (its
//! input, post-RoPE qkv, attention lse and output, both norm outputs and rstd,
//! the gate/up activations); the SwiGLU product and the attention
//! probabilities are recomputed in backward.
//!
//! Dimensions: B batch, S = seq_len + P tokens, P puzzle positions, D hidden,
//! H heads, d = D/H, F SwiGLU width, V vocab, M = B*S rows.

use std::collections::BTreeMap;

use crate::backend::cpu::attention::{attention_backward, attention_forward};
use crate::backend::cpu::embedding::{embedding_backward, embedding_forward};
use crate::backend::cpu::linear::{linear_backward, linear_forward};
use crate::backend::cpu::rmsnorm::{rmsnorm_backward, rmsnorm_forward_inplace};
use crate::backend::cpu::rope::{rope_backward, rope_forward, rope_tables, RopeTables};
use crate::backend::cpu::stablemax_ce::{
    bce_with_logits_backward, bce_with_logits_forward, stablemax_ce_backward, stablemax_ce_forward,
    IGNORE_LABEL,
};
use crate::backend::cpu::swiglu::{swiglu_backward, swiglu_forward};
use crate::backend::cpu::{cast_slice, Real};
use crate::model::act;
use crate::model::config::{ArchConfig, PosEncodings};
use crate::model::engine::ActNet;
use crate::model::pool::BufPool;
use crate::model::weights::Weights;
use crate::tensor::Tensor;

/// Everything that can be wrong with a model call's inputs.
#[derive(Debug, thiserror::Error)]
pub enum TrmError {
    #[error("trm: {0} is not supported")]
    Unsupported(String),
    #[error("trm: missing weight `{0}`")]
    MissingWeight(String),
    #[error("trm: weight `{name}` has {got} values, expected shape {expected:?}")]
    WeightShape {
        name: String,
        got: usize,
        expected: Vec<usize>,
    },
    #[error("trm: `{what}` has {got} values, expected {expected} (batch {batch})")]
    BatchShape {
        what: &'static str,
        got: usize,
        expected: usize,
        batch: usize,
    },
    #[error("trm: token id {id} at flat index {index} is outside the vocabulary 0..{vocab}")]
    BadToken { id: i32, index: usize, vocab: usize },
    #[error("trm: label {label} at flat index {index} is neither -100 nor in 0..{vocab}")]
    BadLabel {
        label: i32,
        index: usize,
        vocab: usize,
    },
    #[error("trm: puzzle identifier {id} of sample {index} is outside 0..{count}")]
    BadPuzzleId { id: i32, index: usize, count: usize },
    #[error("trm: batch size must be at least 1")]
    EmptyBatch,
    /// An engine's step calls came out of order (a bug, not a user error).
    /// The device an engine runs on failed (a CUDA or emulator error).
    #[error("trm: device: {0}")]
    Device(String),
    #[error("trm: engine step calls out of order: inner_step must come before the bootstrap, the loss and the optimiser")]
    StepOrder,
}

/// The sizes of one call, derived from the config and the batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    /// Total tokens per sample, `seq_len + P`.
    pub s: usize,
    pub p: usize,
    pub seq: usize,
    pub d: usize,
    pub h: usize,
    pub hd: usize,
    pub f: usize,
    pub v: usize,
    /// Puzzle-embedding width (`puzzle_emb_ndim`, may be 0).
    pub ndim: usize,
}

impl Dims {
    pub fn new(cfg: &ArchConfig, b: usize) -> Dims {
        Dims {
            b,
            s: cfg.total_seq_len(),
            p: cfg.puzzle_len(),
            seq: cfg.seq_len,
            d: cfg.hidden_size,
            h: cfg.num_heads,
            hd: cfg.hidden_size / cfg.num_heads,
            f: cfg.intermediate_size(),
            v: cfg.vocab_size,
            ndim: cfg.puzzle_emb_ndim,
        }
    }
    /// Rows of the flattened activations, `B * S`.
    pub fn m(&self) -> usize {
        self.b * self.s
    }
}

/// Weights of one block (reference layout: `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerParams<T> {
    /// `self_attn.qkv_proj.weight` [3D, D].
    pub qkv: Vec<T>,
    /// `self_attn.o_proj.weight` [D, D].
    pub o: Vec<T>,
    /// `mlp.gate_up_proj.weight` [2F, D].
    pub gate_up: Vec<T>,
    /// `mlp.down_proj.weight` [D, F].
    pub down: Vec<T>,
}

/// All weights and buffers of the network, unpacked and typed.
#[derive(Debug, Clone, PartialEq)]
pub struct Params<T> {
    /// `inner.embed_tokens.embedding_weight` [V, D].
    pub embed: Vec<T>,
    /// `inner.puzzle_emb.weights` [N_ids, ndim] (empty when ndim = 0).
    pub puzzle_emb: Vec<T>,
    pub layers: Vec<LayerParams<T>>,
    /// `inner.lm_head.weight` [V, D].
    pub lm_head: Vec<T>,
    /// `inner.q_head.weight` [2, D].
    pub q_w: Vec<T>,
    /// `inner.q_head.bias` [2].
    pub q_b: Vec<T>,
    /// `inner.H_init` [D].
    pub h_init: Vec<T>,
    /// `inner.L_init` [D].
    pub l_init: Vec<T>,
}

/// Gradients of every trainable tensor (same layout as [`Params`]) plus the
/// batch's puzzle-embedding rows `[B, ndim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads<T> {
    pub embed: Vec<T>,
    pub layers: Vec<LayerParams<T>>,
    pub lm_head: Vec<T>,
    pub q_w: Vec<T>,
    pub q_b: Vec<T>,
    /// `inner.puzzle_emb.local_weights` [B, ndim].
    pub puzzle_local: Vec<T>,
}

/// Reference state-dict name of layer `i`'s tensor `what`
/// (`self_attn.qkv_proj`, `self_attn.o_proj`, `mlp.gate_up_proj`, `mlp.down_proj`).
pub fn layer_name(i: usize, what: &str) -> String {
    format!("inner.L_level.layers.{i}.{what}.weight")
}

const LAYER_PARTS: [&str; 4] = [
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
];

/// Fails with a clear error for config features the engine does not run yet.
pub fn check_supported(cfg: &ArchConfig) -> Result<(), TrmError> {
    if cfg.mlp_t {
        return Err(TrmError::Unsupported("mlp_t = true".into()));
    }
    if cfg.pos_encodings == PosEncodings::Learned {
        return Err(TrmError::Unsupported("pos_encodings = learned".into()));
    }
    if cfg.num_heads == 0 || cfg.hidden_size % cfg.num_heads != 0 {
        return Err(TrmError::Unsupported(format!(
            "hidden_size {} with num_heads {}",
            cfg.hidden_size, cfg.num_heads
        )));
    }
    if cfg.puzzle_emb_ndim > cfg.puzzle_len() * cfg.hidden_size {
        return Err(TrmError::Unsupported(format!(
            "puzzle_emb_ndim {} wider than puzzle_len * hidden_size",
            cfg.puzzle_emb_ndim
        )));
    }
    Ok(())
}

impl<T: Real> Params<T> {
    /// Unpacks a name -> tensor map (reference names), checking sizes.
    pub fn from_map(cfg: &ArchConfig, map: &BTreeMap<String, Tensor>) -> Result<Self, TrmError> {
        check_supported(cfg)?;
        let dm = Dims::new(cfg, 1);
        let get = |name: &str, shape: &[usize]| -> Result<Vec<T>, TrmError> {
            let t = map
                .get(name)
                .ok_or_else(|| TrmError::MissingWeight(name.to_string()))?;
            let n: usize = shape.iter().product();
            if t.data.len() != n {
                return Err(TrmError::WeightShape {
                    name: name.to_string(),
                    got: t.data.len(),
                    expected: shape.to_vec(),
                });
            }
            Ok(cast_slice(&t.data))
        };
        let (d, f, v) = (dm.d, dm.f, dm.v);
        let mut layers = Vec::with_capacity(cfg.l_layers);
        for i in 0..cfg.l_layers {
            layers.push(LayerParams {
                qkv: get(&layer_name(i, LAYER_PARTS[0]), &[3 * d, d])?,
                o: get(&layer_name(i, LAYER_PARTS[1]), &[d, d])?,
                gate_up: get(&layer_name(i, LAYER_PARTS[2]), &[2 * f, d])?,
                down: get(&layer_name(i, LAYER_PARTS[3]), &[d, f])?,
            });
        }
        let puzzle_emb = if dm.ndim > 0 {
            get(
                "inner.puzzle_emb.weights",
                &[cfg.num_puzzle_identifiers, dm.ndim],
            )?
        } else {
            Vec::new()
        };
        Ok(Params {
            embed: get("inner.embed_tokens.embedding_weight", &[v, d])?,
            puzzle_emb,
            layers,
            lm_head: get("inner.lm_head.weight", &[v, d])?,
            q_w: get("inner.q_head.weight", &[2, d])?,
            q_b: get("inner.q_head.bias", &[2])?,
            h_init: get("inner.H_init", &[d])?,
            l_init: get("inner.L_init", &[d])?,
        })
    }

    /// Unpacks a checked [`Weights`].
    pub fn from_weights(cfg: &ArchConfig, w: &Weights) -> Result<Self, TrmError> {
        Self::from_map(cfg, &w.tensors)
    }

    /// Packs back to reference names (f32 tensors).
    pub fn to_map(&self, cfg: &ArchConfig) -> BTreeMap<String, Tensor> {
        let dm = Dims::new(cfg, 1);
        let (d, f, v) = (dm.d, dm.f, dm.v);
        let t = |shape: &[usize], x: &[T]| Tensor::new(shape, cast_slice(x));
        let mut m = BTreeMap::new();
        m.insert(
            "inner.embed_tokens.embedding_weight".into(),
            t(&[v, d], &self.embed),
        );
        if dm.ndim > 0 {
            m.insert(
                "inner.puzzle_emb.weights".into(),
                t(&[cfg.num_puzzle_identifiers, dm.ndim], &self.puzzle_emb),
            );
        }
        for (i, l) in self.layers.iter().enumerate() {
            m.insert(layer_name(i, LAYER_PARTS[0]), t(&[3 * d, d], &l.qkv));
            m.insert(layer_name(i, LAYER_PARTS[1]), t(&[d, d], &l.o));
            m.insert(layer_name(i, LAYER_PARTS[2]), t(&[2 * f, d], &l.gate_up));
            m.insert(layer_name(i, LAYER_PARTS[3]), t(&[d, f], &l.down));
        }
        m.insert("inner.lm_head.weight".into(), t(&[v, d], &self.lm_head));
        m.insert("inner.q_head.weight".into(), t(&[2, d], &self.q_w));
        m.insert("inner.q_head.bias".into(), t(&[2], &self.q_b));
        m.insert("inner.H_init".into(), t(&[d], &self.h_init));
        m.insert("inner.L_init".into(), t(&[d], &self.l_init));
        m
    }
}

/// Where a dense trainable tensor lives in [`Params`] / [`Grads`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DenseSlot {
    Embed,
    LmHead,
    QW,
    QB,
    Layer(usize, usize),
}

fn dense_slot(name: &str) -> Option<DenseSlot> {
    Some(match name {
        "inner.embed_tokens.embedding_weight" => DenseSlot::Embed,
        "inner.lm_head.weight" => DenseSlot::LmHead,
        "inner.q_head.weight" => DenseSlot::QW,
        "inner.q_head.bias" => DenseSlot::QB,
        _ => {
            let rest = name.strip_prefix("inner.L_level.layers.")?;
            let (i, part) = rest.split_once('.')?;
            let part = part.strip_suffix(".weight")?;
            let k = LAYER_PARTS.iter().position(|p| *p == part)?;
            DenseSlot::Layer(i.parse().ok()?, k)
        }
    })
}

fn layer_part_mut<T>(l: &mut LayerParams<T>, k: usize) -> &mut Vec<T> {
    match k {
        0 => &mut l.qkv,
        1 => &mut l.o,
        2 => &mut l.gate_up,
        _ => &mut l.down,
    }
}

fn layer_part<T>(l: &LayerParams<T>, k: usize) -> &Vec<T> {
    match k {
        0 => &l.qkv,
        1 => &l.o,
        2 => &l.gate_up,
        _ => &l.down,
    }
}

impl<T: Real> Params<T> {
    /// The dense trainable tensor with reference name `name` (None for other names).
    pub fn dense(&self, name: &str) -> Option<&Vec<T>> {
        Some(match dense_slot(name)? {
            DenseSlot::Embed => &self.embed,
            DenseSlot::LmHead => &self.lm_head,
            DenseSlot::QW => &self.q_w,
            DenseSlot::QB => &self.q_b,
            DenseSlot::Layer(i, k) => layer_part(self.layers.get(i)?, k),
        })
    }

    /// Mutable [`Params::dense`].
    pub fn dense_mut(&mut self, name: &str) -> Option<&mut Vec<T>> {
        Some(match dense_slot(name)? {
            DenseSlot::Embed => &mut self.embed,
            DenseSlot::LmHead => &mut self.lm_head,
            DenseSlot::QW => &mut self.q_w,
            DenseSlot::QB => &mut self.q_b,
            DenseSlot::Layer(i, k) => layer_part_mut(self.layers.get_mut(i)?, k),
        })
    }
}

impl<T: Real> Grads<T> {
    /// The gradient of the dense tensor with reference name `name`.
    pub fn dense(&self, name: &str) -> Option<&Vec<T>> {
        Some(match dense_slot(name)? {
            DenseSlot::Embed => &self.embed,
            DenseSlot::LmHead => &self.lm_head,
            DenseSlot::QW => &self.q_w,
            DenseSlot::QB => &self.q_b,
            DenseSlot::Layer(i, k) => layer_part(self.layers.get(i)?, k),
        })
    }

    /// Mutable [`Grads::dense`].
    pub fn dense_mut(&mut self, name: &str) -> Option<&mut Vec<T>> {
        Some(match dense_slot(name)? {
            DenseSlot::Embed => &mut self.embed,
            DenseSlot::LmHead => &mut self.lm_head,
            DenseSlot::QW => &mut self.q_w,
            DenseSlot::QB => &mut self.q_b,
            DenseSlot::Layer(i, k) => layer_part_mut(self.layers.get_mut(i)?, k),
        })
    }
}

impl<T: Real> Grads<T> {
    /// All-zero gradients for `params` and batch size `b`.
    pub fn zeros_like(p: &Params<T>, dm: &Dims) -> Self {
        let z = |x: &Vec<T>| vec![T::zero(); x.len()];
        Grads {
            embed: z(&p.embed),
            layers: p
                .layers
                .iter()
                .map(|l| LayerParams {
                    qkv: z(&l.qkv),
                    o: z(&l.o),
                    gate_up: z(&l.gate_up),
                    down: z(&l.down),
                })
                .collect(),
            lm_head: z(&p.lm_head),
            q_w: z(&p.q_w),
            q_b: z(&p.q_b),
            puzzle_local: vec![T::zero(); dm.b * dm.ndim],
        }
    }

    /// `grad.<reference name>` -> f32 tensor, as in the golden files.
    pub fn to_map(&self, cfg: &ArchConfig, b: usize) -> BTreeMap<String, Tensor> {
        let dm = Dims::new(cfg, b);
        let (d, f, v) = (dm.d, dm.f, dm.v);
        let t = |shape: &[usize], x: &[T]| Tensor::new(shape, cast_slice(x));
        let g = |n: &str| format!("grad.{n}");
        let mut m = BTreeMap::new();
        m.insert(
            g("inner.embed_tokens.embedding_weight"),
            t(&[v, d], &self.embed),
        );
        for (i, l) in self.layers.iter().enumerate() {
            m.insert(g(&layer_name(i, LAYER_PARTS[0])), t(&[3 * d, d], &l.qkv));
            m.insert(g(&layer_name(i, LAYER_PARTS[1])), t(&[d, d], &l.o));
            m.insert(
                g(&layer_name(i, LAYER_PARTS[2])),
                t(&[2 * f, d], &l.gate_up),
            );
            m.insert(g(&layer_name(i, LAYER_PARTS[3])), t(&[d, f], &l.down));
        }
        m.insert(g("inner.lm_head.weight"), t(&[v, d], &self.lm_head));
        m.insert(g("inner.q_head.weight"), t(&[2, d], &self.q_w));
        m.insert(g("inner.q_head.bias"), t(&[2], &self.q_b));
        if dm.ndim > 0 {
            m.insert(
                g("inner.puzzle_emb.local_weights"),
                t(&[b, dm.ndim], &self.puzzle_local),
            );
        }
        m
    }
}

/// One training batch: `inputs`, `labels` [B, seq_len], `puzzle_ids` [B].
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub inputs: &'a [i32],
    pub labels: &'a [i32],
    pub puzzle_ids: &'a [i32],
    pub b: usize,
}

impl Batch<'_> {
    /// Checks sizes and id ranges against the config (typed errors).
    pub fn validate(&self, cfg: &ArchConfig) -> Result<(), TrmError> {
        let b = self.b;
        if b == 0 {
            return Err(TrmError::EmptyBatch);
        }
        let check = |what, got: usize, expected| {
            if got != expected {
                Err(TrmError::BatchShape {
                    what,
                    got,
                    expected,
                    batch: b,
                })
            } else {
                Ok(())
            }
        };
        check("inputs", self.inputs.len(), b * cfg.seq_len)?;
        check("labels", self.labels.len(), b * cfg.seq_len)?;
        check("puzzle_identifiers", self.puzzle_ids.len(), b)?;
        let vocab = cfg.vocab_size;
        for (index, &id) in self.inputs.iter().enumerate() {
            if id < 0 || id as usize >= vocab {
                return Err(TrmError::BadToken { id, index, vocab });
            }
        }
        for (index, &label) in self.labels.iter().enumerate() {
            if label != IGNORE_LABEL && (label < 0 || label as usize >= vocab) {
                return Err(TrmError::BadLabel {
                    label,
                    index,
                    vocab,
                });
            }
        }
        if cfg.puzzle_emb_ndim > 0 {
            let count = cfg.num_puzzle_identifiers;
            for (index, &id) in self.puzzle_ids.iter().enumerate() {
                if id < 0 || id as usize >= count {
                    return Err(TrmError::BadPuzzleId { id, index, count });
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// input embedding

/// `x` [B, S, D] = sqrt(D) * [puzzle rows (flattened into the first P*D
/// values: the ndim-long row, then zeros) ; token embeddings].
pub fn input_embedding_forward<T: Real>(
    dm: &Dims,
    p: &Params<T>,
    inputs: &[i32],
    puzzle_ids: &[i32],
) -> Vec<T> {
    let (s, d) = (dm.s, dm.d);
    let scale = T::of(d as f64).sqrt();
    let mut x = vec![T::zero(); dm.m() * d];
    for bi in 0..dm.b {
        let xb = &mut x[bi * s * d..(bi + 1) * s * d];
        if dm.ndim > 0 {
            let id = puzzle_ids[bi] as usize;
            let row = &p.puzzle_emb[id * dm.ndim..(id + 1) * dm.ndim];
            for (o, &w) in xb[..dm.ndim].iter_mut().zip(row) {
                *o = w * scale;
            }
        }
        embedding_forward(
            &mut xb[dm.p * d..],
            &p.embed,
            &inputs[bi * dm.seq..(bi + 1) * dm.seq],
            d,
            scale,
        );
    }
    x
}

/// Backward of [`input_embedding_forward`]: scatter-adds into `g.embed` and
/// writes the puzzle rows' gradient `g.puzzle_local[b] = sqrt(D) * dx[b, first ndim]`.
pub fn input_embedding_backward<T: Real>(dm: &Dims, g: &mut Grads<T>, dx: &[T], inputs: &[i32]) {
    let (s, d) = (dm.s, dm.d);
    let scale = T::of(d as f64).sqrt();
    for bi in 0..dm.b {
        let db = &dx[bi * s * d..(bi + 1) * s * d];
        for (o, &v) in g.puzzle_local[bi * dm.ndim..(bi + 1) * dm.ndim]
            .iter_mut()
            .zip(&db[..dm.ndim])
        {
            *o += v * scale;
        }
        embedding_backward(
            &mut g.embed,
            &db[dm.p * d..],
            &inputs[bi * dm.seq..(bi + 1) * dm.seq],
            d,
            scale,
        );
    }
}

// ---------------------------------------------------------------------------
// block

/// What the backward of one block needs (see the module comment).
#[derive(Debug, Clone, Default)]
pub struct BlockCache<T> {
    /// Block input `h` [M, D].
    pub h_in: Vec<T>,
    /// qkv after RoPE [M, 3D].
    pub qkv: Vec<T>,
    /// Attention row log-sum-exp [B, H, S].
    pub lse: Vec<T>,
    /// Attention output (o_proj input) [M, D].
    pub o: Vec<T>,
    /// `y1 = rmsnorm(h + o_proj(o))` [M, D] and its rstd [M].
    pub y1: Vec<T>,
    pub rstd1: Vec<T>,
    /// `gate_up_proj(y1)` [M, 2F].
    pub gu: Vec<T>,
    /// Block output `y2 = rmsnorm(y1 + down(swiglu(gu)))` [M, D] and rstd [M].
    pub y2: Vec<T>,
    pub rstd2: Vec<T>,
}

/// Shared per-call context: sizes, config scalars, RoPE tables, and the
/// pool that recycles activation buffers between block calls.
pub struct Ctx<T> {
    pub dm: Dims,
    pub eps: f64,
    pub rope: Option<RopeTables<T>>,
    pub pool: BufPool<T>,
}

impl<T: Real> Ctx<T> {
    pub fn new(cfg: &ArchConfig, b: usize) -> Self {
        let dm = Dims::new(cfg, b);
        let rope = match cfg.pos_encodings {
            PosEncodings::Rope => Some(rope_tables(dm.s, dm.hd, cfg.rope_theta)),
            _ => None,
        };
        Ctx {
            dm,
            eps: cfg.rms_norm_eps,
            rope,
            pool: BufPool::new(),
        }
    }
}

/// Forward of one post-norm block:
/// `y1 = rmsnorm(h + Attn(h))`, `y2 = rmsnorm(y1 + SwiGLU(y1))`.
pub fn block_forward<T: Real>(ctx: &Ctx<T>, lp: &LayerParams<T>, h_in: Vec<T>) -> BlockCache<T> {
    let dm = &ctx.dm;
    let pool = &ctx.pool;
    let (m, d, f) = (dm.m(), dm.d, dm.f);
    let mut qkv = pool.take(m * 3 * d);
    linear_forward(&mut qkv, &h_in, &lp.qkv, None, m, d, 3 * d);
    if let Some(t) = &ctx.rope {
        rope_forward(&mut qkv, t, dm.h);
    }
    let mut o = pool.take(m * d);
    let mut lse = pool.take(dm.b * dm.h * dm.s);
    attention_forward(&mut o, &mut lse, &qkv, dm.b, dm.s, dm.h, dm.hd);
    let mut y1 = pool.take(m * d);
    linear_forward(&mut y1, &o, &lp.o, None, m, d, d);
    let mut rstd1 = pool.take(m);
    rmsnorm_forward_inplace(&mut y1, &mut rstd1, Some(&h_in), d, ctx.eps);
    let mut gu = pool.take(m * 2 * f);
    linear_forward(&mut gu, &y1, &lp.gate_up, None, m, d, 2 * f);
    let mut a = pool.take(m * f);
    swiglu_forward(&mut a, &gu, f);
    let mut y2 = pool.take(m * d);
    linear_forward(&mut y2, &a, &lp.down, None, m, f, d);
    pool.give(a);
    let mut rstd2 = pool.take(m);
    rmsnorm_forward_inplace(&mut y2, &mut rstd2, Some(&y1), d, ctx.eps);
    BlockCache {
        h_in,
        qkv,
        lse,
        o,
        y1,
        rstd1,
        gu,
        y2,
        rstd2,
    }
}

/// Backward of [`block_forward`]: given `dy2`, accumulates the layer's weight
/// gradients into `gl` and returns `dh_in`.
///
/// Chain (each step is the op's own backward):
/// `g2 = rmsnorm'(dy2)` flows to both `y1` (residual) and `down(swiglu(gu))`;
/// `da = g2 W_down`, `dgu = swiglu'(da)`, `dy1 = g2 + dgu W_gu`;
/// `g1 = rmsnorm'(dy1)` flows to both `h` (residual) and `o_proj(o)`;
/// `do = g1 W_o`, `dqkv = rope'(attn'(do))`, `dh = g1 + dqkv W_qkv`.
pub fn block_backward<T: Real>(
    ctx: &Ctx<T>,
    lp: &LayerParams<T>,
    c: &BlockCache<T>,
    gl: &mut LayerParams<T>,
    dy2: Vec<T>,
) -> Vec<T> {
    let dm = &ctx.dm;
    let pool = &ctx.pool;
    let (m, d, f) = (dm.m(), dm.d, dm.f);
    let mut g2 = dy2;
    rmsnorm_backward(&mut g2, &c.y2, &c.rstd2, d);
    // MLP
    let mut a = pool.take(m * f);
    swiglu_forward(&mut a, &c.gu, f);
    let mut da = pool.take(m * f);
    linear_backward(
        Some(&mut da),
        false,
        Some(&mut gl.down),
        None,
        &g2,
        &a,
        &lp.down,
        m,
        f,
        d,
    );
    pool.give(a);
    let mut dgu = pool.take(m * 2 * f);
    swiglu_backward(&mut dgu, &da, &c.gu, f);
    pool.give(da);
    let mut g1 = g2;
    linear_backward(
        Some(&mut g1),
        true,
        Some(&mut gl.gate_up),
        None,
        &dgu,
        &c.y1,
        &lp.gate_up,
        m,
        d,
        2 * f,
    );
    pool.give(dgu);
    rmsnorm_backward(&mut g1, &c.y1, &c.rstd1, d);
    // attention
    let mut d_o = pool.take(m * d);
    linear_backward(
        Some(&mut d_o),
        false,
        Some(&mut gl.o),
        None,
        &g1,
        &c.o,
        &lp.o,
        m,
        d,
        d,
    );
    let mut dqkv = pool.take(m * 3 * d);
    attention_backward(&mut dqkv, &d_o, &c.qkv, &c.lse, dm.b, dm.s, dm.h, dm.hd);
    pool.give(d_o);
    if let Some(t) = &ctx.rope {
        rope_backward(&mut dqkv, t, dm.h);
    }
    let mut dh = g1;
    linear_backward(
        Some(&mut dh),
        true,
        Some(&mut gl.qkv),
        None,
        &dqkv,
        &c.h_in,
        &lp.qkv,
        m,
        d,
        3 * d,
    );
    pool.give(dqkv);
    dh
}

/// Reasoning module `L(z, inj)`: `h = z + inj`, then every block in order.
/// With `caches = Some(..)` each block's cache is pushed for the backward.
pub fn l_forward<T: Real>(
    ctx: &Ctx<T>,
    p: &Params<T>,
    z: &[T],
    inj: &[T],
    mut caches: Option<&mut Vec<BlockCache<T>>>,
) -> Vec<T> {
    let mut h = add_pooled(&ctx.pool, z, inj);
    for lp in &p.layers {
        let c = block_forward(ctx, lp, h);
        match caches.as_deref_mut() {
            Some(cs) => {
                h = ctx.pool.take(c.y2.len());
                h.copy_from_slice(&c.y2);
                cs.push(c);
            }
            None => h = recycle_cache(&ctx.pool, c),
        }
    }
    h
}

/// Gives a no-grad block's buffers back to the pool; returns its output.
fn recycle_cache<T: Real>(pool: &BufPool<T>, c: BlockCache<T>) -> Vec<T> {
    for v in [c.h_in, c.qkv, c.lse, c.o, c.y1, c.rstd1, c.gu, c.rstd2] {
        pool.give(v);
    }
    c.y2
}

/// `a + b` into a pooled buffer, in parallel chunks.
fn add_pooled<T: Real>(pool: &BufPool<T>, a: &[T], b: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    assert_eq!(a.len(), b.len(), "add: lengths differ");
    let mut out = pool.take(a.len());
    out.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14))
        .zip(b.par_chunks(1 << 14))
        .for_each(|((o, x), y)| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = x + y;
            }
        });
    out
}

/// Backward of [`l_forward`] over its cached blocks: returns `dh`, which is
/// both `dz` and `dinj` (the first op is `z + inj`).
pub fn l_backward<T: Real>(
    ctx: &Ctx<T>,
    p: &Params<T>,
    caches: Vec<BlockCache<T>>,
    g: &mut Grads<T>,
    dout: Vec<T>,
) -> Vec<T> {
    let mut dh = dout;
    for (i, c) in caches.into_iter().enumerate().rev() {
        dh = block_backward(ctx, &p.layers[i], &c, &mut g.layers[i], dh);
        // the tape's buffers serve the next step's forward
        ctx.pool.give(recycle_cache(&ctx.pool, c));
    }
    dh
}

// ---------------------------------------------------------------------------
// one ACT step

/// What one inner forward returns (generic precision).
#[derive(Debug, Clone)]
pub struct InnerOut<T> {
    /// [B, seq_len, V]
    pub logits: Vec<T>,
    /// [B, 2]: (q_halt, q_continue) per sample.
    pub q: Vec<T>,
    /// New carry, [B, S, D] each.
    pub z_h: Vec<T>,
    pub z_l: Vec<T>,
}

/// Saved state of the gradient cycle.
pub struct GradTape<T> {
    x: Vec<T>,
    /// Caches of the L_cycles zL updates, then of the zH update.
    l_calls: Vec<Vec<BlockCache<T>>>,
    h_call: Vec<BlockCache<T>>,
}

/// Broadcasts a [D] init vector to [B, S, D].
pub fn broadcast_init<T: Real>(dm: &Dims, v: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(dm.m() * dm.d);
    for _ in 0..dm.m() {
        out.extend_from_slice(v);
    }
    out
}

/// One inner forward (spec section 4) from carry `(z_h, z_l)`:
/// `n_nograd` H cycles without gradient (the reference runs `H_cycles - 1`),
/// then the gradient cycle. With `tape = true` it records the gradient cycle
/// for [`inner_backward`].
#[allow(clippy::too_many_arguments)]
pub fn inner_forward<T: Real>(
    ctx: &Ctx<T>,
    cfg: &ArchConfig,
    p: &Params<T>,
    inputs: &[i32],
    puzzle_ids: &[i32],
    z_h: Vec<T>,
    z_l: Vec<T>,
    n_nograd: usize,
    tape: bool,
) -> (InnerOut<T>, Option<GradTape<T>>) {
    let dm = &ctx.dm;
    let x = input_embedding_forward(dm, p, inputs, puzzle_ids);
    let (mut z_h, mut z_l) = (z_h, z_l);
    for _ in 0..n_nograd {
        for _ in 0..cfg.l_cycles {
            let inj = add_pooled(&ctx.pool, &z_h, &x);
            let new_l = l_forward(ctx, p, &z_l, &inj, None);
            ctx.pool.give(inj);
            ctx.pool.give(std::mem::replace(&mut z_l, new_l));
        }
        let new_h = l_forward(ctx, p, &z_h, &z_l, None);
        ctx.pool.give(std::mem::replace(&mut z_h, new_h));
    }
    let mut l_calls = Vec::new();
    let mut h_call = Vec::new();
    for _ in 0..cfg.l_cycles {
        let inj = add_pooled(&ctx.pool, &z_h, &x);
        let mut cs = Vec::new();
        z_l = l_forward(ctx, p, &z_l, &inj, tape.then_some(&mut cs));
        l_calls.push(cs);
    }
    z_h = l_forward(ctx, p, &z_h, &z_l, tape.then_some(&mut h_call));
    let (logits, q) = heads_forward(dm, p, &z_h);
    let out = InnerOut {
        logits,
        q,
        z_h,
        z_l,
    };
    let tape = tape.then_some(GradTape { x, l_calls, h_call });
    (out, tape)
}

/// LM head on positions P.. and Q head on position 0.
pub fn heads_forward<T: Real>(dm: &Dims, p: &Params<T>, z_h: &[T]) -> (Vec<T>, Vec<T>) {
    let (s, d, v) = (dm.s, dm.d, dm.v);
    let mut logits = vec![T::zero(); dm.b * dm.seq * v];
    let mut q = vec![T::zero(); dm.b * 2];
    for bi in 0..dm.b {
        let zb = &z_h[bi * s * d..(bi + 1) * s * d];
        linear_forward(
            &mut logits[bi * dm.seq * v..(bi + 1) * dm.seq * v],
            &zb[dm.p * d..],
            &p.lm_head,
            None,
            dm.seq,
            d,
            v,
        );
        linear_forward(
            &mut q[bi * 2..bi * 2 + 2],
            &zb[..d],
            &p.q_w,
            Some(&p.q_b),
            1,
            d,
            2,
        );
    }
    (logits, q)
}

/// Backward of [`heads_forward`] and of the gradient cycle: given
/// `dlogits` [B, seq, V] and `dq` [B, 2], accumulates all weight gradients.
///
/// `zH1 = L(zH0, zL_n)`, `zL_{i+1} = L(zL_i, zH0 + x)`; zH0, zL_0 are
/// constants (the no-grad cycles), so `dzL_n = dinj(H call)`, then for each
/// L call in reverse `dh = L'(dzL_{i+1})`, `dx += dh`, `dzL_i = dh`.
pub fn inner_backward<T: Real>(
    ctx: &Ctx<T>,
    p: &Params<T>,
    tape: GradTape<T>,
    z_h: &[T],
    inputs: &[i32],
    dlogits: &[T],
    dq: &[T],
) -> Grads<T> {
    let dm = &ctx.dm;
    let (s, d, v) = (dm.s, dm.d, dm.v);
    let mut g = Grads::zeros_like(p, dm);
    let mut dz_h = vec![T::zero(); dm.m() * d];
    for bi in 0..dm.b {
        let zb = &z_h[bi * s * d..(bi + 1) * s * d];
        let dzb = &mut dz_h[bi * s * d..(bi + 1) * s * d];
        let (dz0, dzt) = dzb.split_at_mut(dm.p * d);
        linear_backward(
            Some(dzt),
            false,
            Some(&mut g.lm_head),
            None,
            &dlogits[bi * dm.seq * v..(bi + 1) * dm.seq * v],
            &zb[dm.p * d..],
            &p.lm_head,
            dm.seq,
            d,
            v,
        );
        // position 0 gets the Q-head gradient (P >= 1 whenever there is a
        // puzzle embedding; with P = 0 it adds to token 0's gradient)
        let dz_first: &mut [T] = if dm.p > 0 {
            &mut dz0[..d]
        } else {
            &mut dzt[..d]
        };
        linear_backward(
            Some(dz_first),
            true,
            Some(&mut g.q_w),
            Some(&mut g.q_b),
            &dq[bi * 2..bi * 2 + 2],
            &zb[..d],
            &p.q_w,
            1,
            d,
            2,
        );
    }
    let GradTape { x, l_calls, h_call } = tape;
    ctx.pool.give(x);
    let mut dz_l = l_backward(ctx, p, h_call, &mut g, dz_h);
    let mut dx = vec![T::zero(); dm.m() * d];
    for cs in l_calls.into_iter().rev() {
        let dh = l_backward(ctx, p, cs, &mut g, dz_l);
        for (a, &b) in dx.iter_mut().zip(&dh) {
            *a += b;
        }
        dz_l = dh;
    }
    ctx.pool.give(dz_l);
    input_embedding_backward(dm, &mut g, &dx, inputs);
    g
}

// ---------------------------------------------------------------------------
// ACT loss head

/// Loss values and per-sample stats of one step (spec section 6).
#[derive(Debug, Clone)]
pub struct LossOut {
    pub loss: f64,
    pub lm_loss: f64,
    pub q_halt_loss: f64,
    /// Only when `no_ACT_continue = false`.
    pub q_continue_loss: f64,
    /// Per sample: count of non-ignored labels.
    pub counts: Vec<usize>,
    /// Per sample: every non-ignored token predicted right.
    pub seq_correct: Vec<bool>,
    /// Per sample: number of correct non-ignored tokens.
    pub correct: Vec<usize>,
}

/// First index of the maximum (torch.argmax semantics for finite values).
fn argmax<T: Real>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// ACT loss head forward + gradient of `loss` w.r.t. logits and q logits.
/// `loss = lm_loss + 0.5 * (q_halt_loss + q_continue_loss)`;
/// `lm_loss = sum_b sum_t mask * CE_t / max(1, n_b)`;
/// `q_halt_loss = sum_b BCE(q_halt_b, seq_correct_b)`;
/// `q_continue_loss = sum_b BCE(q_continue_b, target_b)` if a target is given.
/// Returns (loss stats, dlogits, dq).
pub fn act_loss<T: Real>(
    dm: &Dims,
    logits: &[T],
    q: &[T],
    labels: &[i32],
    target_q_continue: Option<&[f64]>,
) -> (LossOut, Vec<T>, Vec<T>) {
    let (seq, v, b) = (dm.seq, dm.v, dm.b);
    let mut tok = vec![0.0f64; b * seq];
    stablemax_ce_forward(&mut tok, logits, labels, v);
    let mut counts = vec![0usize; b];
    let mut correct = vec![0usize; b];
    let mut weights = vec![0.0f64; b * seq];
    let mut lm_loss = 0.0;
    for bi in 0..b {
        let lab = &labels[bi * seq..(bi + 1) * seq];
        let n = lab.iter().filter(|&&l| l != IGNORE_LABEL).count();
        counts[bi] = n;
        let div = n.max(1) as f64;
        let mut sample = 0.0;
        for (t, &lt) in lab.iter().enumerate() {
            let i = bi * seq + t;
            if lt != IGNORE_LABEL {
                if argmax(&logits[i * v..(i + 1) * v]) == lt as usize {
                    correct[bi] += 1;
                }
                sample += tok[i] / div;
                weights[i] = 1.0 / div;
            }
        }
        lm_loss += sample;
    }
    let seq_correct: Vec<bool> = (0..b).map(|i| correct[i] == counts[i]).collect();
    let mut dlogits = vec![T::zero(); b * seq * v];
    stablemax_ce_backward(&mut dlogits, &weights, logits, labels, v);
    let (q_halt_loss, q_continue_loss, dq) = q_head_loss(q, &seq_correct, target_q_continue);
    let loss = lm_loss + 0.5 * (q_halt_loss + q_continue_loss);
    (
        LossOut {
            loss,
            lm_loss,
            q_halt_loss,
            q_continue_loss,
            counts,
            seq_correct,
            correct,
        },
        dlogits,
        dq,
    )
}

/// The Q head's share of the ACT loss (spec section 6), for every engine:
/// `q_halt_loss = sum_b BCE(q_halt_b, seq_correct_b)`, `q_continue_loss =
/// sum_b BCE(q_continue_b, target_b)` when targets are given, and the
/// gradient of `0.5 (q_halt_loss + q_continue_loss)` w.r.t. `q` [B, 2].
/// The BCE terms are in the logits' precision and summed in it, as the
/// reference does.
pub fn q_head_loss<T: Real>(
    q: &[T],
    seq_correct: &[bool],
    target_q_continue: Option<&[f64]>,
) -> (f64, f64, Vec<T>) {
    let b = seq_correct.len();
    let mut q_halt_sum = T::zero();
    let mut q_continue_sum = T::zero();
    let half = T::of(0.5);
    let mut dq = vec![T::zero(); b * 2];
    for bi in 0..b {
        let y = if seq_correct[bi] { T::one() } else { T::zero() };
        let xh = q[bi * 2];
        q_halt_sum += bce_with_logits_forward(xh, y);
        dq[bi * 2] = half * bce_with_logits_backward(xh, y);
        if let Some(tq) = target_q_continue {
            let (xc, t) = (q[bi * 2 + 1], T::of(tq[bi]));
            q_continue_sum += bce_with_logits_forward(xc, t);
            dq[bi * 2 + 1] = half * bce_with_logits_backward(xc, t);
        }
    }
    (q_halt_sum.f64(), q_continue_sum.f64(), dq)
}

// ---------------------------------------------------------------------------
// public entry points

/// One training ACT step from a fresh carry (generic precision).
#[derive(Debug, Clone)]
pub struct StepResult<T> {
    pub out: InnerOut<T>,
    pub loss: LossOut,
    pub halted: Vec<bool>,
    pub steps: Vec<i32>,
    pub grads: Grads<T>,
}

/// One ACT step in training mode from a fresh carry (every slot halted, so
/// reset to H_init / L_init, steps = 1), exploration off, then backward of
/// `loss` (not divided by the batch size).
pub fn act_step_train_generic<T: Real>(
    cfg: &ArchConfig,
    p: &Params<T>,
    batch: &Batch<'_>,
) -> Result<StepResult<T>, TrmError> {
    let dm = Dims::new(cfg, batch.b);
    if batch.b == 0 {
        return Err(TrmError::EmptyBatch);
    }
    let z_h0 = broadcast_init(&dm, &p.h_init);
    let z_l0 = broadcast_init(&dm, &p.l_init);
    act_step_train_from_carry(cfg, p, batch, z_h0, z_l0, cfg.h_cycles.saturating_sub(1))
}

/// What every step entry point checks: a supported config, a valid batch
/// of the context's size, carries of the context's shape.
fn check_step_inputs<T>(
    cfg: &ArchConfig,
    dm: &Dims,
    batch: &Batch<'_>,
    z_h: &[T],
    z_l: &[T],
) -> Result<(), TrmError> {
    check_supported(cfg)?;
    batch.validate(cfg)?;
    if dm.b != batch.b {
        return Err(TrmError::BatchShape {
            what: "context batch",
            got: batch.b,
            expected: dm.b,
            batch: dm.b,
        });
    }
    for (what, z) in [("z_H", z_h), ("z_L", z_l)] {
        if z.len() != dm.m() * dm.d {
            return Err(TrmError::BatchShape {
                what,
                got: z.len(),
                expected: dm.m() * dm.d,
                batch: dm.b,
            });
        }
    }
    Ok(())
}

/// The no-gradient part of a step: `n` H cycles from `(z_h, z_l)`; returns
/// the state the gradient cycle starts from.
pub fn nograd_cycles<T: Real>(
    cfg: &ArchConfig,
    p: &Params<T>,
    batch: &Batch<'_>,
    z_h: Vec<T>,
    z_l: Vec<T>,
    n: usize,
) -> Result<(Vec<T>, Vec<T>), TrmError> {
    check_step_inputs(cfg, &Dims::new(cfg, batch.b), batch, &z_h, &z_l)?;
    let ctx = Ctx::<T>::new(cfg, batch.b);
    let x = input_embedding_forward(&ctx.dm, p, batch.inputs, batch.puzzle_ids);
    let (mut z_h, mut z_l) = (z_h, z_l);
    for _ in 0..n {
        for _ in 0..cfg.l_cycles {
            let inj = add_pooled(&ctx.pool, &z_h, &x);
            let new_l = l_forward(&ctx, p, &z_l, &inj, None);
            ctx.pool.give(inj);
            ctx.pool.give(std::mem::replace(&mut z_l, new_l));
        }
        let new_h = l_forward(&ctx, p, &z_h, &z_l, None);
        ctx.pool.give(std::mem::replace(&mut z_h, new_h));
    }
    Ok((z_h, z_l))
}

/// [`act_step_train_generic`] from an explicit carry `(z_h, z_l)` [B, S, D]
/// with `n_nograd` no-gradient H cycles before the gradient cycle (the
/// reference uses a reset carry and `H_cycles - 1`). Steps are reported as 1.
pub fn act_step_train_from_carry<T: Real>(
    cfg: &ArchConfig,
    p: &Params<T>,
    batch: &Batch<'_>,
    z_h0: Vec<T>,
    z_l0: Vec<T>,
    n_nograd: usize,
) -> Result<StepResult<T>, TrmError> {
    let ctx = Ctx::<T>::new(cfg, batch.b);
    act_step_train_in(&ctx, cfg, p, batch, z_h0, z_l0, n_nograd)
}

/// [`act_step_train_from_carry`] in a caller's context, whose buffer pool
/// then serves every step (as in training): no per-step allocation of the
/// activations and the tape.
pub fn act_step_train_in<T: Real>(
    ctx: &Ctx<T>,
    cfg: &ArchConfig,
    p: &Params<T>,
    batch: &Batch<'_>,
    z_h0: Vec<T>,
    z_l0: Vec<T>,
    n_nograd: usize,
) -> Result<StepResult<T>, TrmError> {
    // A fresh carry: every slot at its first step, exploration off.
    let steps = vec![1i32; ctx.dm.b];
    act_step_in(ctx, cfg, p, batch, z_h0, z_l0, n_nograd, steps, None)
}

/// One training ACT step of the CPU engine from a carry `(z_h0, z_l0)`
/// whose slots have taken `steps` steps counting this one, driven by the
/// shared rules of [`act::act_step`] (exploration when `explore` is given).
#[allow(clippy::too_many_arguments)]
pub fn act_step_in<T: Real>(
    ctx: &Ctx<T>,
    cfg: &ArchConfig,
    p: &Params<T>,
    batch: &Batch<'_>,
    z_h0: Vec<T>,
    z_l0: Vec<T>,
    n_nograd: usize,
    steps: Vec<i32>,
    explore: Option<&act::Exploration>,
) -> Result<StepResult<T>, TrmError> {
    let mut net = CpuStep {
        ctx,
        cfg,
        p,
        n_nograd,
        state: StepState::new(z_h0, z_l0),
    };
    let r = act::act_step(&mut net, cfg, batch, &steps, explore)?;
    let st = net.state;
    Ok(StepResult {
        out: InnerOut {
            logits: st.logits,
            q: r.q,
            z_h: st.z_h,
            z_l: st.z_l,
        },
        loss: r.loss,
        halted: r.halted,
        steps,
        grads: st.grads.expect("backward ran"),
    })
}

// ---------------------------------------------------------------------------
// the CPU engine's side of the engine seam

/// What the CPU engine keeps between the calls of one ACT step: the carry,
/// the gradient cycle's outputs and tape until the backward, then the
/// step's logits and gradients.
pub struct StepState<T> {
    /// The carry `[B, S, D]`: before the inner step the old one, after the
    /// backward the new one.
    pub z_h: Vec<T>,
    pub z_l: Vec<T>,
    pending: Option<(InnerOut<T>, GradTape<T>)>,
    /// The last step's logits `[B, seq_len, V]`.
    pub logits: Vec<T>,
    /// The last backward's gradients, until the optimiser takes them.
    pub grads: Option<Grads<T>>,
}

impl<T: Real> StepState<T> {
    pub fn new(z_h: Vec<T>, z_l: Vec<T>) -> Self {
        StepState {
            z_h,
            z_l,
            pending: None,
            logits: Vec::new(),
            grads: None,
        }
    }

    /// The inner step from the carry (see [`ActNet::inner_step`]).
    pub fn inner_step(
        &mut self,
        ctx: &Ctx<T>,
        cfg: &ArchConfig,
        p: &Params<T>,
        batch: &Batch<'_>,
        n_nograd: usize,
    ) -> Result<Vec<T>, TrmError> {
        check_step_inputs(cfg, &ctx.dm, batch, &self.z_h, &self.z_l)?;
        let (out, tape) = inner_forward(
            ctx,
            cfg,
            p,
            batch.inputs,
            batch.puzzle_ids,
            std::mem::take(&mut self.z_h),
            std::mem::take(&mut self.z_l),
            n_nograd,
            true,
        );
        let q = out.q.clone();
        self.pending = Some((out, tape.expect("tape requested")));
        Ok(q)
    }

    /// The Q-continue bootstrap forward (see [`ActNet::bootstrap_q`]).
    pub fn bootstrap_q(
        &mut self,
        ctx: &Ctx<T>,
        cfg: &ArchConfig,
        p: &Params<T>,
        batch: &Batch<'_>,
    ) -> Result<Vec<T>, TrmError> {
        let (out, _) = self.pending.as_ref().ok_or(TrmError::StepOrder)?;
        let (next, _) = inner_forward(
            ctx,
            cfg,
            p,
            batch.inputs,
            batch.puzzle_ids,
            out.z_h.clone(),
            out.z_l.clone(),
            cfg.h_cycles.saturating_sub(1),
            false,
        );
        Ok(next.q)
    }

    /// The loss head and the backward (see [`ActNet::loss_and_backward`]).
    pub fn loss_and_backward(
        &mut self,
        ctx: &Ctx<T>,
        p: &Params<T>,
        batch: &Batch<'_>,
        target: Option<&[f64]>,
    ) -> Result<LossOut, TrmError> {
        let (out, tape) = self.pending.take().ok_or(TrmError::StepOrder)?;
        let (loss, dlogits, dq) = act_loss(&ctx.dm, &out.logits, &out.q, batch.labels, target);
        let grads = inner_backward(ctx, p, tape, &out.z_h, batch.inputs, &dlogits, &dq);
        self.grads = Some(grads);
        self.z_h = out.z_h;
        self.z_l = out.z_l;
        self.logits = out.logits;
        Ok(loss)
    }
}

/// The CPU network over borrowed weights and context: one ACT step for
/// [`act_step_in`] (golden files, gradient checks, benchmarks).
struct CpuStep<'a, T> {
    ctx: &'a Ctx<T>,
    cfg: &'a ArchConfig,
    p: &'a Params<T>,
    n_nograd: usize,
    state: StepState<T>,
}

impl<T: Real> ActNet<T> for CpuStep<'_, T> {
    fn inner_step(&mut self, batch: &Batch<'_>) -> Result<Vec<T>, TrmError> {
        self.state
            .inner_step(self.ctx, self.cfg, self.p, batch, self.n_nograd)
    }

    fn bootstrap_q(&mut self, batch: &Batch<'_>) -> Result<Vec<T>, TrmError> {
        self.state.bootstrap_q(self.ctx, self.cfg, self.p, batch)
    }

    fn loss_and_backward(
        &mut self,
        batch: &Batch<'_>,
        target: Option<&[f64]>,
    ) -> Result<LossOut, TrmError> {
        self.state
            .loss_and_backward(self.ctx, self.p, batch, target)
    }
}

/// The f32 result of [`act_step_train`], in the golden files' terms.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// [B, seq_len, V]
    pub logits: Tensor,
    /// [B]
    pub q_halt_logits: Tensor,
    /// [B]
    pub q_continue_logits: Tensor,
    pub loss: f64,
    pub lm_loss: f64,
    pub q_halt_loss: f64,
    pub halted: Vec<bool>,
    pub steps: Vec<i32>,
    /// New carry [B, S, D].
    pub z_h: Tensor,
    pub z_l: Tensor,
    /// `grad.<reference name>` for every trainable weight plus
    /// `grad.inner.puzzle_emb.local_weights` [B, puzzle_emb_ndim].
    pub grads: BTreeMap<String, Tensor>,
}

/// One training ACT step in f32 over checked weights (see [`act_step_train_generic`]).
pub fn act_step_train(
    cfg: &ArchConfig,
    weights: &Weights,
    inputs: &[i32],
    labels: &[i32],
    puzzle_ids: &[i32],
    b: usize,
) -> Result<StepOutput, TrmError> {
    let p = Params::<f32>::from_weights(cfg, weights)?;
    act_step_train_params(cfg, &p, inputs, labels, puzzle_ids, b)
}

/// [`act_step_train`] over already unpacked f32 params.
pub fn act_step_train_params(
    cfg: &ArchConfig,
    p: &Params<f32>,
    inputs: &[i32],
    labels: &[i32],
    puzzle_ids: &[i32],
    b: usize,
) -> Result<StepOutput, TrmError> {
    let batch = Batch {
        inputs,
        labels,
        puzzle_ids,
        b,
    };
    let r = act_step_train_generic(cfg, p, &batch)?;
    let dm = Dims::new(cfg, b);
    let qh: Vec<f32> = (0..b).map(|i| r.out.q[i * 2]).collect();
    let qc: Vec<f32> = (0..b).map(|i| r.out.q[i * 2 + 1]).collect();
    Ok(StepOutput {
        logits: Tensor::new(&[b, dm.seq, dm.v], r.out.logits),
        q_halt_logits: Tensor::new(&[b], qh),
        q_continue_logits: Tensor::new(&[b], qc),
        loss: r.loss.loss,
        lm_loss: r.loss.lm_loss,
        q_halt_loss: r.loss.q_halt_loss,
        halted: r.halted,
        steps: r.steps,
        z_h: Tensor::new(&[b, dm.s, dm.d], r.out.z_h),
        z_l: Tensor::new(&[b, dm.s, dm.d], r.out.z_l),
        grads: r.grads.to_map(cfg, b),
    })
}
