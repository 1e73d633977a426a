//! The network of `src/model/trm.rs` on a [`Device`], op for op and with
//! the same function names; the derivations are in trm.rs. Activations are
//! bf16 and every op rounds its output to bf16 as the bf16 reference does;
//! GEMMs accumulate in f32; norms, softmax and losses run in f32; weight
//! gradients accumulate in the flat f32 gradient buffer.
//!
//! What differs from the CPU engine, by design: attention takes the qkv
//! projection before RoPE (the kernels rotate tiles on the fly, forward and
//! backward); the LM head runs over all `S` positions with the loss
//! ignoring the puzzle rows, so every head GEMM is one contiguous product;
//! the L-module calls work in the preallocated buffers of [`Activations`].

use half::bf16;

use crate::backend::cuda::gemm::{
    linear_backward_input, linear_backward_weight, linear_forward, GemmOut, MatRef,
};
use crate::backend::cuda::ops::{
    self, add_bf16, attention_backward, attention_forward, rmsnorm_backward, rmsnorm_forward,
    swiglu_backward, swiglu_forward, AttentionShape, EmbeddingShape,
};
use crate::backend::cuda::{Buffer, CudaError, Device};
use crate::model::gpu::plan::{self, Activations, BlockSlot, TapeCall};
use crate::model::gpu::weights::{LayerOffsets, Offsets};
use crate::model::trm::Dims;

/// What every op of one forward or backward reads: the device, the sizes,
/// the bf16 weights in use (live or EMA) and where each tensor sits in them.
pub struct Net<'a> {
    pub dev: &'a Device,
    pub dm: Dims,
    pub eps: f32,
    pub w: &'a Buffer<bf16>,
    pub off: &'a Offsets,
    /// The number of puzzle-embedding ids (the table's rows).
    pub num_puzzle_ids: usize,
    /// `[S, d]` RoPE tables (identity without RoPE).
    pub cos: &'a Buffer<f32>,
    pub sin: &'a Buffer<f32>,
}

/// The f32 gradient buffer and where each tensor's gradient sits in it.
pub struct GradSink<'a> {
    pub grad: &'a Buffer<f32>,
    pub off: &'a Offsets,
}

impl Net<'_> {
    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            batch: self.dm.b,
            seq: self.dm.s,
            heads: self.dm.h,
            head_dim: self.dm.hd,
        }
    }

    /// A weight `[rows, cols]` at `offset` of the bf16 weights.
    fn weight(&self, offset: usize, rows: usize, cols: usize) -> MatRef<'_, bf16> {
        MatRef::at(self.w, offset, rows, cols)
    }

    fn md(&self) -> usize {
        self.dm.m() * self.dm.d
    }
}

/// A contiguous `[rows, cols]` bf16 activation.
fn act(buf: &Buffer<bf16>, rows: usize, cols: usize) -> MatRef<'_, bf16> {
    MatRef::new(buf, rows, cols)
}

fn out16(buf: &Buffer<bf16>, rows: usize, cols: usize) -> GemmOut<'_> {
    GemmOut::Bf16(MatRef::new(buf, rows, cols))
}

/// The gradient of the weight `[rows, cols]` at `offset`.
fn grad_of<'g>(g: &GradSink<'g>, offset: usize, rows: usize, cols: usize) -> GemmOut<'g> {
    GemmOut::F32(MatRef::at(g.grad, offset, rows, cols))
}

// ---------------------------------------------------------------------------
// input embedding

/// `x = sqrt(D) [puzzle rows ; token embeddings]` (trm.rs
/// `input_embedding_forward`); `embed` is the bf16 token table of the
/// weights in use, `puzzle` the f32 table.
pub fn input_embedding_forward(
    net: &Net<'_>,
    acts: &Activations,
    embed: &Buffer<bf16>,
    puzzle: &Buffer<f32>,
) -> Result<(), CudaError> {
    let table = (net.dm.ndim > 0).then_some((puzzle, &acts.puzzle_ids));
    let scale = (net.dm.d as f64).sqrt() as f32;
    ops::input_embedding_forward(
        net.dev,
        &acts.x,
        embed,
        &acts.tokens,
        table,
        scale,
        embedding_shape(net),
    )
}

fn embedding_shape(net: &Net<'_>) -> EmbeddingShape {
    plan::embedding_shape(&net.dm, net.num_puzzle_ids)
}

/// Backward of [`input_embedding_forward`] from `acts.dx`: the token-table
/// gradient into `acts.dembed` (zeroed here) and the puzzle rows' into
/// `acts.dpuzzle`.
pub fn input_embedding_backward(net: &Net<'_>, acts: &Activations) -> Result<(), CudaError> {
    net.dev.zero(&acts.dembed)?;
    let scale = (net.dm.d as f64).sqrt() as f32;
    let dpuzzle = (net.dm.ndim > 0).then_some(&acts.dpuzzle);
    ops::input_embedding_backward(
        net.dev,
        &acts.dembed,
        dpuzzle,
        &acts.dx,
        &acts.tokens,
        &acts.dembed_scratch,
        scale,
        embedding_shape(net),
    )
}

// ---------------------------------------------------------------------------
// block

/// One post-norm block (trm.rs `block_forward`): `h_in` in, `slot.y2` out;
/// `a` `[M, F]` is scratch. `h_in` may be `slot.y2`: its last read (the
/// first norm's residual) comes before the down projection writes `y2`.
pub fn block_forward(
    net: &Net<'_>,
    lw: &LayerOffsets,
    h_in: &Buffer<bf16>,
    slot: &BlockSlot,
    a: &Buffer<bf16>,
) -> Result<(), CudaError> {
    let dev = net.dev;
    let dm = &net.dm;
    let (m, d, f) = (dm.m(), dm.d, dm.f);
    linear_forward(
        dev,
        out16(&slot.qkv, m, 3 * d),
        act(h_in, m, d),
        net.weight(lw.qkv, 3 * d, d),
        false,
    )?;
    attention_forward(
        dev,
        &slot.o,
        &slot.lse,
        &slot.qkv,
        net.cos,
        net.sin,
        net.attention_shape(),
    )?;
    linear_forward(
        dev,
        out16(&slot.y1, m, d),
        act(&slot.o, m, d),
        net.weight(lw.o, d, d),
        false,
    )?;
    rmsnorm_forward(
        dev,
        &slot.y1,
        &slot.rstd1,
        &slot.y1,
        Some(h_in),
        m,
        d,
        net.eps,
    )?;
    linear_forward(
        dev,
        out16(&slot.gu, m, 2 * f),
        act(&slot.y1, m, d),
        net.weight(lw.gate_up, 2 * f, d),
        false,
    )?;
    swiglu_forward(dev, a, &slot.gu, m, f)?;
    linear_forward(
        dev,
        out16(&slot.y2, m, d),
        act(a, m, f),
        net.weight(lw.down, d, f),
        false,
    )?;
    rmsnorm_forward(
        dev,
        &slot.y2,
        &slot.rstd2,
        &slot.y2,
        Some(&slot.y1),
        m,
        d,
        net.eps,
    )
}

/// Backward of [`block_forward`] in place: `g` holds `dy2` on entry and
/// `dh_in` on return; the layer's weight gradients accumulate into `gs`.
/// Scratch: `acts.scratch` (qkv for dqkv, o for do, gu for dgu), `acts.a`
/// (the recomputed SwiGLU output), `acts.da`, `acts.delta`.
#[allow(clippy::too_many_arguments)]
pub fn block_backward(
    net: &Net<'_>,
    lw: &LayerOffsets,
    h_in: &Buffer<bf16>,
    c: &BlockSlot,
    acts: &Activations,
    gs: &GradSink<'_>,
) -> Result<(), CudaError> {
    let dev = net.dev;
    let dm = &net.dm;
    let (m, d, f) = (dm.m(), dm.d, dm.f);
    let g = &acts.g;
    let sc = &acts.scratch;
    // g2 = rmsnorm'(dy2), in place
    rmsnorm_backward(dev, g, g, &c.y2, &c.rstd2, m, d)?;
    // MLP: da = g2 W_down, dW_down += g2^T a, dgu = swiglu'(da)
    linear_backward_input(
        dev,
        out16(&acts.da, m, f),
        act(g, m, d),
        net.weight(lw.down, d, f),
        false,
    )?;
    swiglu_forward(dev, &acts.a, &c.gu, m, f)?;
    linear_backward_weight(
        dev,
        grad_of(gs, lw.down, d, f),
        act(g, m, d),
        act(&acts.a, m, f),
        true,
    )?;
    swiglu_backward(dev, &sc.gu, &acts.da, &c.gu, m, f)?;
    // dy1 = g2 + dgu W_gu; dW_gu += dgu^T y1
    linear_backward_input(
        dev,
        out16(g, m, d),
        act(&sc.gu, m, 2 * f),
        net.weight(lw.gate_up, 2 * f, d),
        true,
    )?;
    linear_backward_weight(
        dev,
        grad_of(gs, lw.gate_up, 2 * f, d),
        act(&sc.gu, m, 2 * f),
        act(&c.y1, m, d),
        true,
    )?;
    // g1 = rmsnorm'(dy1), in place
    rmsnorm_backward(dev, g, g, &c.y1, &c.rstd1, m, d)?;
    // attention: do = g1 W_o, dW_o += g1^T o, dqkv = rope'(attn'(do))
    linear_backward_input(
        dev,
        out16(&sc.o, m, d),
        act(g, m, d),
        net.weight(lw.o, d, d),
        false,
    )?;
    linear_backward_weight(
        dev,
        grad_of(gs, lw.o, d, d),
        act(g, m, d),
        act(&c.o, m, d),
        true,
    )?;
    attention_backward(
        dev,
        &sc.qkv,
        &acts.delta,
        &c.qkv,
        net.cos,
        net.sin,
        &c.o,
        &c.lse,
        &sc.o,
        net.attention_shape(),
    )?;
    // dh = g1 + dqkv W_qkv; dW_qkv += dqkv^T h
    linear_backward_input(
        dev,
        out16(g, m, d),
        act(&sc.qkv, m, 3 * d),
        net.weight(lw.qkv, 3 * d, d),
        true,
    )?;
    linear_backward_weight(
        dev,
        grad_of(gs, lw.qkv, 3 * d, d),
        act(&sc.qkv, m, 3 * d),
        act(h_in, m, d),
        true,
    )
}

// ---------------------------------------------------------------------------
// reasoning module

/// `out = L(z, inj)` without a tape (trm.rs `l_forward` with no caches),
/// through `acts.h0` and the scratch block; `out` may be `z`.
pub fn l_forward(
    net: &Net<'_>,
    z: &Buffer<bf16>,
    inj: &Buffer<bf16>,
    out: &Buffer<bf16>,
    acts: &Activations,
) -> Result<(), CudaError> {
    add_bf16(net.dev, &acts.h0, z, inj, net.md())?;
    let mut h = &acts.h0;
    for lw in &net.off.layers {
        block_forward(net, lw, h, &acts.scratch, &acts.a)?;
        h = &acts.scratch.y2;
    }
    net.dev.copy((out, 0), (h, 0), net.md())
}

/// `L(z, inj)` recording what the backward reads into `call` (trm.rs
/// `l_forward` with caches); the result is `call.output()`.
pub fn l_forward_taped(
    net: &Net<'_>,
    z: &Buffer<bf16>,
    inj: &Buffer<bf16>,
    call: &TapeCall,
    a: &Buffer<bf16>,
) -> Result<(), CudaError> {
    add_bf16(net.dev, &call.h0, z, inj, net.md())?;
    for (i, lw) in net.off.layers.iter().enumerate() {
        block_forward(net, lw, call.block_input(i), &call.blocks[i], a)?;
    }
    Ok(())
}

/// Backward of [`l_forward_taped`] in place on `acts.g`: `dout` in, `dh`
/// out, which is both `dz` and `dinj` (the first op is `z + inj`).
pub fn l_backward(
    net: &Net<'_>,
    call: &TapeCall,
    acts: &Activations,
    gs: &GradSink<'_>,
) -> Result<(), CudaError> {
    for (i, lw) in net.off.layers.iter().enumerate().rev() {
        block_backward(net, lw, call.block_input(i), &call.blocks[i], acts, gs)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// one inner step

/// `n` H cycles without gradient from the carry `(z_h, z_l)`, in place
/// (trm.rs `nograd_cycles`); `acts.x` holds the input embeddings.
pub fn nograd_cycles(
    net: &Net<'_>,
    z_h: &Buffer<bf16>,
    z_l: &Buffer<bf16>,
    n: usize,
    l_cycles: usize,
    acts: &Activations,
) -> Result<(), CudaError> {
    for _ in 0..n {
        add_bf16(net.dev, &acts.inj, z_h, &acts.x, net.md())?;
        for _ in 0..l_cycles {
            l_forward(net, z_l, &acts.inj, z_l, acts)?;
        }
        l_forward(net, z_h, z_l, z_h, acts)?;
    }
    Ok(())
}

/// The gradient cycle from the training carry, taped (trm.rs
/// `inner_forward`'s last cycle): `zL_{i+1} = L(zL_i, zH + x)` for each L
/// cycle, then `zH' = L(zH, zL_n)`; the new carry replaces the old one.
pub fn grad_cycle(net: &Net<'_>, l_cycles: usize, acts: &Activations) -> Result<(), CudaError> {
    let md = net.md();
    add_bf16(net.dev, &acts.inj, &acts.z_h, &acts.x, md)?;
    let mut z_l = &acts.z_l;
    for call in &acts.tape[..l_cycles] {
        l_forward_taped(net, z_l, &acts.inj, call, &acts.a)?;
        z_l = call.output();
    }
    let h_call = &acts.tape[l_cycles];
    l_forward_taped(net, &acts.z_h, z_l, h_call, &acts.a)?;
    if l_cycles > 0 {
        net.dev.copy((&acts.z_l, 0), (z_l, 0), md)?;
    }
    net.dev.copy((&acts.z_h, 0), (h_call.output(), 0), md)
}

/// The new `z_H` of the gradient cycle, which the heads read.
pub fn grad_cycle_z_h(acts: &Activations, l_cycles: usize) -> &Buffer<bf16> {
    acts.tape[l_cycles].output()
}

/// LM head over all `S` positions into `acts.logits` `[M, V]` and the Q
/// head into `acts.q` (trm.rs `heads_forward`).
pub fn heads_forward(
    net: &Net<'_>,
    z_h: &Buffer<bf16>,
    acts: &Activations,
) -> Result<(), CudaError> {
    let dm = &net.dm;
    let (m, d, v) = (dm.m(), dm.d, dm.v);
    linear_forward(
        net.dev,
        out16(&acts.logits, m, v),
        act(z_h, m, d),
        net.weight(net.off.lm_head, v, d),
        false,
    )?;
    q_head_forward(net, z_h, &acts.q)
}

/// `q [B, 2]` = position 0 of each sample (a view with row stride `S D`)
/// times the Q head, without the bias (added on the host, which reads q).
pub fn q_head_forward(net: &Net<'_>, z_h: &Buffer<bf16>, q: &Buffer<f32>) -> Result<(), CudaError> {
    let dm = &net.dm;
    linear_forward(
        net.dev,
        GemmOut::F32(MatRef::new(q, dm.b, 2)),
        MatRef::strided(z_h, 0, dm.b, dm.d, dm.s * dm.d),
        net.weight(net.off.q_w, 2, dm.d),
        false,
    )
}

/// Backward of [`heads_forward`] and of the gradient cycle (trm.rs
/// `inner_backward`), from `acts.dlogits` and `acts.dq`: every dense weight
/// gradient but the Q bias accumulates into `gs` (zeroed by the caller),
/// the input-embedding gradients land in `acts.dembed` / `acts.dpuzzle`.
/// Written as its three parts, which data-parallel runs launch separately
/// to reduce each layer's gradient as soon as it is final
/// ([`super::buckets`]).
pub fn inner_backward(
    net: &Net<'_>,
    l_cycles: usize,
    acts: &Activations,
    gs: &GradSink<'_>,
) -> Result<(), CudaError> {
    inner_backward_until_last_call(net, l_cycles, acts, gs)?;
    for layer in (0..net.off.layers.len()).rev() {
        last_call_layer_backward(net, acts, gs, layer)?;
    }
    inner_backward_tail(net, l_cycles, acts)
}

/// [`inner_backward`] up to the backward of the first L call (`tape[0]`,
/// which runs last): the heads, the H call, the other L calls.
pub fn inner_backward_until_last_call(
    net: &Net<'_>,
    l_cycles: usize,
    acts: &Activations,
    gs: &GradSink<'_>,
) -> Result<(), CudaError> {
    let dev = net.dev;
    let dm = &net.dm;
    let (m, d, v) = (dm.m(), dm.d, dm.v);
    let z_h = grad_cycle_z_h(acts, l_cycles);
    let g = &acts.g;
    // heads: dzH = dlogits W_lm (+ dq W_q at position 0 of each sample)
    linear_backward_input(
        dev,
        out16(g, m, d),
        act(&acts.dlogits, m, v),
        net.weight(net.off.lm_head, v, d),
        false,
    )?;
    linear_backward_weight(
        dev,
        grad_of(gs, net.off.lm_head, v, d),
        act(&acts.dlogits, m, v),
        act(z_h, m, d),
        true,
    )?;
    linear_backward_input(
        dev,
        GemmOut::Bf16(MatRef::strided(g, 0, dm.b, d, dm.s * d)),
        act(&acts.dq, dm.b, 2),
        net.weight(net.off.q_w, 2, d),
        true,
    )?;
    linear_backward_weight(
        dev,
        grad_of(gs, net.off.q_w, 2, d),
        act(&acts.dq, dm.b, 2),
        MatRef::strided(z_h, 0, dm.b, d, dm.s * d),
        true,
    )?;
    // zH' = L(zH, zL_n): dzL_n = dinj; then each L call in reverse:
    // dh = L'(dzL_{i+1}), dx += dh, dzL_i = dh. With no L call the H call
    // is tape[0], left for the last part.
    if l_cycles > 0 {
        l_backward(net, &acts.tape[l_cycles], acts, gs)?;
    }
    dev.zero(&acts.dx)?;
    for call in acts.tape[1..l_cycles.max(1)].iter().rev() {
        l_backward(net, call, acts, gs)?;
        add_bf16(dev, &acts.dx, &acts.dx, g, net.md())?;
    }
    Ok(())
}

/// The backward of `layer` in the first L call (`tape[0]`): after it, that
/// layer's weight gradients are final. Layers run from the last to the first.
pub fn last_call_layer_backward(
    net: &Net<'_>,
    acts: &Activations,
    gs: &GradSink<'_>,
    layer: usize,
) -> Result<(), CudaError> {
    let call = &acts.tape[0];
    let lw =
        net.off.layers.get(layer).ok_or_else(|| {
            CudaError::Shape(format!("layer {layer} of {}", net.off.layers.len()))
        })?;
    block_backward(
        net,
        lw,
        call.block_input(layer),
        &call.blocks[layer],
        acts,
        gs,
    )
}

/// The rest of [`inner_backward`]: the first L call's input gradient into
/// `dx` (when that call is an L call), then the input embeddings' backward.
pub fn inner_backward_tail(
    net: &Net<'_>,
    l_cycles: usize,
    acts: &Activations,
) -> Result<(), CudaError> {
    if l_cycles > 0 {
        add_bf16(net.dev, &acts.dx, &acts.dx, &acts.g, net.md())?;
    }
    input_embedding_backward(net, acts)
}
