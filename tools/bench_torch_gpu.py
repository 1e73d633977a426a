#!/usr/bin/env python3
"""PyTorch baseline of one TRM training ACT step on a GPU (issue 13, section 4).

What it measures
    The training step of the Tiny Recursive Model at the ARC config, written in
    plain PyTorch from docs/trm-spec.md (sections 3-7) and docs/optimizer.md:
    the ACT carry (halted slots take a new sample and reset to H_init/L_init),
    H_cycles-1 cycles without gradient then the gradient cycle, the LM and Q
    heads, stablemax cross-entropy + 0.5 * Q-halt BCE (no Q-continue target:
    the reference config has no_ACT_continue = True), the backward, AdamATan2
    on the dense weights and sparse sign-SGD on the batch's puzzle-embedding
    rows. bf16 autocast (the reference's forward_dtype: bfloat16), RMSNorm in
    fp32, RoPE in fp32 then F.scaled_dot_product_attention.

    Shapes: hidden 512, 8 heads, 2 layers, expansion 4 (SwiGLU width 1536),
    H_cycles 3, L_cycles 4 and 6, S = 900 grid tokens + 16 puzzle positions =
    916, vocab 12, a puzzle-embedding table of 10,000 rows (the real ARC table
    has ~1.2 M rows; only the batch's rows are touched, so the table size
    changes memory, not time). Inputs, labels and puzzle ids are random
    (fixed seed), never zeros.

    For each (L_cycles, local batch, mode in eager / torch.compile) it reports
    ms per step (median of the timed steps, CUDA events), sample-steps/s (one
    ACT step of the whole batch = batch sample-steps), peak device memory
    (torch.cuda.max_memory_allocated), and MFU against 790 TFLOP/s with the
    FLOPs counted analytically (model FLOPs: forward of every cycle plus 2x
    forward for the backward of the gradient cycle; flash attention's
    recomputation of the scores in its backward is not counted): 398.1 GFLOP
    per sample-step at L_cycles 4 (the issue's ~398), 557.3 at L_cycles 6. Compile
    warm-up time is reported separately. A configuration that runs out of
    memory is reported as OOM and the run carries on.

    torch.compile scope: by default the L-level function (z + inj, then the
    two blocks) is compiled once per batch size and grad mode and reused by
    all 15-21 level calls of a step (--compile-scope level); --compile-scope
    step compiles the whole forward + loss like the reference's
    torch.compile(model), which unrolls every cycle and takes much longer to
    compile. The optimiser runs eagerly in both modes.

    Without CUDA it runs a tiny CPU smoke of the same step (a few steps at tiny
    dims, checks that the loss is finite) and checks the analytic FLOP count
    against torch.utils.flop_counter.FlopCounterMode, then exits 0.

How to run
    python tools/bench_torch_gpu.py                       # full default run (~4 min on an H200)
    python tools/bench_torch_gpu.py --quick               # one small config (smoke test)
    python tools/bench_torch_gpu.py --batches 96 --l-cycles 4 --modes eager --steps 10 --json out.json
"""

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PEAK_TFLOPS = 790.0  # H200 dense bf16, the reference for MFU
COMPILE_LIMIT_S = 120.0


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 512
    heads: int = 8
    layers: int = 2
    expansion: float = 4.0
    h_cycles: int = 3
    l_cycles: int = 4
    seq_len: int = 900
    puzzle_len: int = 16
    vocab: int = 12
    num_ids: int = 10_000
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    lr: float = 1e-4
    lr_warmup: int = 2000
    lr_min_ratio: float = 1.0
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    puzzle_lr: float = 1e-2
    puzzle_wd: float = 0.1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def tokens(self):
        """S: grid tokens plus the puzzle positions."""
        return self.seq_len + self.puzzle_len

    @property
    def head_dim(self):
        return self.hidden // self.heads

    @property
    def inter(self):
        """SwiGLU width: round(expansion * D * 2/3) rounded up to a multiple of 256."""
        return -(-round(self.expansion * self.hidden * 2 / 3) // 256) * 256


ARC = Config()
TINY = Config(hidden=64, heads=2, layers=2, h_cycles=2, l_cycles=2, seq_len=36,
              puzzle_len=4, num_ids=32, lr=1e-3, lr_warmup=1, puzzle_lr=1e-2)


# --------------------------------------------------------------------------- FLOPs


def step_flops(cfg):
    """Analytic matmul FLOPs of one ACT training step for ONE sample (a dict).

    Per block and token: the four projections 2*D*(3D + D + 2F + F), and
    attention's QK^T and PV, 2*S*D each. A step runs H_cycles*(L_cycles+1)
    level calls of `layers` blocks; the backward of the gradient cycle's
    L_cycles+1 calls costs twice their forward. The heads run once.
    """
    d, s, f = cfg.hidden, cfg.tokens, cfg.inter
    block = s * 2 * d * (3 * d + d + 2 * f + f) + s * 4 * s * d
    grad_blocks = (cfg.l_cycles + 1) * cfg.layers
    nograd_blocks = (cfg.h_cycles - 1) * grad_blocks
    heads_fwd = 2 * cfg.seq_len * d * cfg.vocab + 2 * d * 2
    out = {
        "no_grad_forward": nograd_blocks * block,
        "grad_forward": grad_blocks * block,
        "backward": 2 * grad_blocks * block,
        "heads_fwd_bwd": 3 * heads_fwd,
        # flash attention recomputes QK^T in its backward (FlopCounterMode counts it)
        "attn_bwd_recompute": grad_blocks * s * 2 * s * d,
    }
    out["total"] = out["no_grad_forward"] + out["grad_forward"] + out["backward"] + out["heads_fwd_bwd"]
    return out


# --------------------------------------------------------------------------- weights


def trunc_normal(shape, std, gen, device):
    """JAX-style truncated normal: cut at +-2 sigma, rescaled so the std is `std`."""
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    mass = cdf(2.0) - cdf(-2.0)
    unit_var = 1.0 - 2.0 * 2.0 * pdf(2.0) / mass  # variance of N(0,1) cut at +-2
    scale = std / math.sqrt(unit_var)
    u = torch.rand(shape, generator=gen, device=device) * mass + cdf(-2.0)
    z = torch.erfinv(2.0 * u - 1.0) * math.sqrt(2.0)
    return (z.clamp_(-2.0, 2.0) * scale).float()


class Weights:
    """Every tensor of the network: dense f32 masters, buffers, RoPE tables."""

    def __init__(self, cfg, device, dtype, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        d, f = cfg.hidden, cfg.inter
        lecun = lambda out, inp: trunc_normal((out, inp), inp ** -0.5, gen, device)
        self.embed = trunc_normal((cfg.vocab, d), d ** -0.5, gen, device)
        self.layers = [
            (lecun(3 * d, d), lecun(d, d), lecun(2 * f, d), lecun(d, f))  # qkv, o, gate_up, down
            for _ in range(cfg.layers)
        ]
        self.lm_head = lecun(cfg.vocab, d)
        self.q_weight = torch.zeros(2, d, device=device)
        self.q_bias = torch.full((2,), -5.0, device=device)
        for p in self.dense():
            p.requires_grad_(True)
        # The spec inits the table with zeros; random rows keep the inputs non-zero.
        self.puzzle_table = trunc_normal((cfg.num_ids, d), 0.02, gen, device)
        self.h_init = trunc_normal((d,), 1.0, gen, device).to(dtype)
        self.l_init = trunc_normal((d,), 1.0, gen, device).to(dtype)
        self.cos, self.sin = rope_tables(cfg, device)

    def dense(self):
        """The weights that AdamATan2 trains."""
        out = [self.embed, self.lm_head, self.q_weight, self.q_bias]
        for layer in self.layers:
            out.extend(layer)
        return out


def rope_tables(cfg, device):
    """cos and sin (S x head_dim, f32) for positions 0..S-1, angles duplicated."""
    hd = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
    angles = torch.outer(torch.arange(cfg.tokens, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------- network


def rms_norm(x, eps):
    """RMSNorm without a scale, statistics in f32, result in the input dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x, cos, sin):
    """x: B x S x H x d. Rotates in f32: x*cos + rotate_half(x)*sin, rotate_half([a,b]) = [-b,a]."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def attention(h, w_qkv, w_o, cos, sin, heads):
    """Non-causal multi-head self-attention with RoPE on q and k."""
    b, s, d = h.shape
    qkv = F.linear(h, w_qkv).view(b, s, 3 * heads, d // heads)
    q = apply_rope(qkv[:, :, :heads], cos, sin).transpose(1, 2)
    k = apply_rope(qkv[:, :, heads:2 * heads], cos, sin).transpose(1, 2)
    v = qkv[:, :, 2 * heads:].transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d_head)
    return F.linear(out.transpose(1, 2).reshape(b, s, d), w_o)


def swiglu(h, w_gate_up, w_down):
    gate, up = F.linear(h, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def block(h, layer, cos, sin, heads, eps):
    """Post-norm transformer block."""
    w_qkv, w_o, w_gate_up, w_down = layer
    h = rms_norm(h + attention(h, w_qkv, w_o, cos, sin, heads), eps)
    return rms_norm(h + swiglu(h, w_gate_up, w_down), eps)


def level_forward(z, inj, layers, cos, sin, heads: int, eps: float):
    """The reasoning module L(z, inj): h = z + inj, then the blocks in order.

    The same weights serve the z_L and z_H updates. This is the function that
    --compile-scope level compiles.
    """
    h = z + inj
    for layer in layers:
        h = block(h, layer, cos, sin, heads, eps)
    return h


def input_embedding(w, tokens, puzzle_rows, cfg, dtype):
    """x = sqrt(D) * [puzzle row, P-1 zero rows, token embeddings]  (B x S x D)."""
    b = tokens.shape[0]
    tok = F.embedding(tokens, w.embed.to(dtype))
    pad = torch.zeros(b, cfg.puzzle_len - 1, cfg.hidden, dtype=dtype, device=tokens.device)
    x = torch.cat((puzzle_rows.to(dtype).unsqueeze(1), pad, tok), dim=1)
    return x * math.sqrt(cfg.hidden)


def act_inner(w, zh, zl, x, cfg, level_fn):
    """One ACT step: H_cycles-1 cycles without gradient, then one with gradient."""
    run = lambda z, inj: level_fn(z, inj, w.layers, w.cos, w.sin, cfg.heads, cfg.norm_eps)
    with torch.no_grad():
        for _ in range(cfg.h_cycles - 1):
            for _ in range(cfg.l_cycles):
                zl = run(zl, zh + x)
            zh = run(zh, zl)
    for _ in range(cfg.l_cycles):
        zl = run(zl, zh + x)
    zh = run(zh, zl)
    return zh, zl


def act_loss(logits, q_halt, labels, global_batch):
    """Stablemax CE (f64) summed over samples (mean over each sample's tokens)
    plus 0.5 * BCE(q_halt, sequence correct), divided by the global batch."""
    mask = labels != -100
    count = mask.sum(-1).clamp_min(1)
    lg = logits.double()
    s = torch.where(lg < 0, 1.0 / (1.0 - lg.clamp_max(0.0)), lg + 1.0)
    logp = torch.log(s) - torch.log(s.sum(-1, keepdim=True))
    nll = -torch.gather(logp, -1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    lm_loss = (torch.where(mask, nll, 0.0).sum(-1) / count).sum()
    correct = (logits.argmax(-1) == labels) | ~mask
    seq_correct = correct.all(-1)
    q_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.float(), reduction="sum")
    return (lm_loss + 0.5 * q_loss) / global_batch


def forward_loss(w, zh, zl, tokens, labels, puzzle_rows, cfg, dtype, level_fn):
    """Embedding, the ACT step, LM and Q heads, the loss. Returns (loss, zH, zL, q_halt)."""
    x = input_embedding(w, tokens, puzzle_rows, cfg, dtype)
    zh, zl = act_inner(w, zh, zl, x, cfg, level_fn)
    logits = F.linear(zh[:, cfg.puzzle_len:], w.lm_head)
    q = F.linear(zh[:, 0], w.q_weight, w.q_bias).float()
    q_halt = q[:, 0]  # q[:, 1] is Q-continue, unused with no_ACT_continue
    loss = act_loss(logits, q_halt, labels, tokens.shape[0])
    return loss, zh, zl, q_halt


# --------------------------------------------------------------------------- optimisers


def lr_at(step, base, cfg):
    """Linear warm-up then cosine to lr_min_ratio (step is 1-based)."""
    if step < cfg.lr_warmup:
        return base * step / cfg.lr_warmup
    return base  # lr_min_ratio = 1.0 in the reference config: constant after warm-up


class AdamATan2:
    """Adam with atan2 in place of m / (sqrt(v) + eps), adam-atan2 0.0.3 rule."""

    def __init__(self, params, betas, weight_decay):
        self.params = params
        self.betas, self.wd, self.t = betas, weight_decay, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, lr):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            p.mul_(1 - lr * self.wd)
            m.lerp_(g, 1 - b1)
            v.lerp_(g * g, 1 - b2)
            p.add_(torch.atan2(m, v.sqrt() / math.sqrt(bc2)), alpha=-lr / bc1)
            p.grad = None


@torch.no_grad()
def sign_sgd_rows(table, ids, row_grads, lr, wd):
    """Sum the batch rows' gradients per distinct id, then w <- w(1 - lr wd) - lr sign(g)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    g = torch.zeros(uniq.shape[0], table.shape[1], device=table.device).index_add_(0, inverse, row_grads)
    table[uniq] = table[uniq] * (1 - lr * wd) - lr * torch.sign(g)


# --------------------------------------------------------------------------- ACT carry and trainer


def random_batch(cfg, batch, gen, device):
    """Random grid tokens (1..11), labels (some -100) and puzzle ids (1..N-1)."""
    tokens = torch.randint(1, cfg.vocab, (batch, cfg.seq_len), generator=gen, device=device)
    labels = torch.randint(1, cfg.vocab, (batch, cfg.seq_len), generator=gen, device=device)
    pad = torch.rand(batch, cfg.seq_len, generator=gen, device=device) < 0.3
    labels = labels.masked_fill(pad, -100)
    ids = torch.randint(1, cfg.num_ids, (batch,), generator=gen, device=device)
    return tokens, labels, ids


class Trainer:
    """The ACT carry of `batch` slots, the weights, both optimisers, one step()."""

    def __init__(self, cfg, batch, device, dtype, forward_fn, seed=0):
        self.cfg, self.device, self.dtype, self.forward_fn = cfg, device, dtype, forward_fn
        self.w = Weights(cfg, device, dtype, seed)
        self.adam = AdamATan2(self.w.dense(), cfg.betas, cfg.weight_decay)
        self.gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.tokens, self.labels, self.ids = random_batch(cfg, batch, self.gen, device)
        shape = (batch, cfg.tokens, cfg.hidden)
        self.zh = torch.zeros(shape, dtype=dtype, device=device)
        self.zl = torch.zeros(shape, dtype=dtype, device=device)
        self.steps = torch.zeros(batch, dtype=torch.int32, device=device)
        self.halted = torch.ones(batch, dtype=torch.bool, device=device)
        self.global_step = 0

    def adopt_new_samples(self, new):
        """Halted slots take the new sample and reset their carry and step count."""
        h = self.halted
        tokens, labels, ids = new
        self.tokens = torch.where(h[:, None], tokens, self.tokens)
        self.labels = torch.where(h[:, None], labels, self.labels)
        self.ids = torch.where(h, ids, self.ids)
        self.zh = torch.where(h[:, None, None], self.w.h_init, self.zh)
        self.zl = torch.where(h[:, None, None], self.w.l_init, self.zl)
        self.steps = torch.where(h, 0, self.steps)

    def update_halting(self, q_halt):
        """Training halting rule with exploration (no_ACT_continue)."""
        cfg = self.cfg
        self.steps = self.steps + 1
        halted = self.steps >= cfg.halt_max_steps
        if cfg.halt_max_steps > 1:
            halted = halted | (q_halt > 0)
            b = self.steps.shape[0]
            explore = torch.rand(b, generator=self.gen, device=self.device) < cfg.halt_exploration_prob
            draw = torch.randint(2, cfg.halt_max_steps + 1, (b,), generator=self.gen, device=self.device)
            min_steps = torch.where(explore, draw, 0)
            halted = halted & (self.steps >= min_steps)
        self.halted = halted

    def step(self, new_batch):
        """One training step; returns the loss as a device tensor (no host sync)."""
        cfg = self.cfg
        self.adopt_new_samples(new_batch)
        rows = self.w.puzzle_table[self.ids].detach().requires_grad_(True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            loss, zh, zl, q_halt = self.forward_fn(self.w, self.zh, self.zl, self.tokens, self.labels, rows)
        self.zh, self.zl = zh.detach(), zl.detach()
        self.update_halting(q_halt.detach())
        loss.backward()
        self.global_step += 1
        self.adam.step(lr_at(self.global_step, cfg.lr, cfg))
        sign_sgd_rows(self.w.puzzle_table, self.ids, rows.grad,
                      lr_at(self.global_step, cfg.puzzle_lr, cfg), cfg.puzzle_wd)
        return loss.detach()


def make_forward(cfg, dtype, mode, scope):
    """forward_fn(w, zh, zl, tokens, labels, rows) for eager or torch.compile."""
    level_fn = level_forward
    if mode == "compile" and scope == "level":
        level_fn = compiled_level()

    def fwd(w, zh, zl, tokens, labels, rows):
        return forward_loss(w, zh, zl, tokens, labels, rows, cfg, dtype, level_fn)

    if mode == "compile" and scope == "step":
        return torch.compile(fwd)
    return fwd


_COMPILED_LEVEL = None


def compiled_level():
    """One compiled level function for the whole run: its graphs (per batch size
    and grad mode) are shared by every config with the same shapes."""
    global _COMPILED_LEVEL
    if _COMPILED_LEVEL is None:
        _COMPILED_LEVEL = torch.compile(level_forward, dynamic=False)
    return _COMPILED_LEVEL


# --------------------------------------------------------------------------- GPU benchmark


def is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(cfg, batch, mode, args, device):
    """Run one config; returns a result dict. Raises on OOM / compile failure."""
    dtype = torch.bfloat16
    trainer = Trainer(cfg, batch, device, dtype, make_forward(cfg, dtype, mode, args.compile_scope))
    gen = torch.Generator(device=device).manual_seed(1234)
    batches = [random_batch(cfg, batch, gen, device) for _ in range(4)]
    warm_s = []
    for i in range(args.warmup):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = trainer.step(batches[i % 4])
        torch.cuda.synchronize()
        warm_s.append(time.perf_counter() - t0)
    events = []
    losses = []
    for i in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses.append(trainer.step(batches[i % 4]))
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in events)
    loss_vals = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in loss_vals):
        raise FloatingPointError(f"non-finite loss {loss_vals}")
    flops = step_flops(cfg)["total"] * batch
    return {
        "status": "ok",
        "ms_per_step": ms,
        "sample_steps_per_s": batch / ms * 1e3,
        "tflops": flops / ms / 1e9,
        "mfu": flops / (ms * 1e-3) / (PEAK_TFLOPS * 1e12),
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
        "warmup_s": warm_s,
        "first_step_s": warm_s[0] if warm_s else None,
        "loss_last": loss_vals[-1],
    }


def release_memory():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_config(cfg, batch, mode, args, device):
    """measure() with OOM and compile failures turned into a result row."""
    release_memory()
    row = {"l_cycles": cfg.l_cycles, "batch": batch, "mode": mode}
    error = None
    try:
        row.update(measure(cfg, batch, mode, args, device))
    except Exception as exc:  # noqa: BLE001 - reported per config, the run goes on
        error = exc
    if error is not None:
        row["status"] = "OOM" if is_oom(error) else f"error: {type(error).__name__}: {str(error)[:300]}"
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        error = None
        release_memory()
    return row


def describe_row(r):
    if r["status"] != "ok":
        return f"L{r['l_cycles']} B{r['batch']} {r['mode']}: {r['status']} (peak {r['peak_gib']:.1f} GiB)"
    return (f"L{r['l_cycles']} B{r['batch']} {r['mode']}: {r['ms_per_step']:.1f} ms/step, "
            f"{r['sample_steps_per_s']:.1f} sample-steps/s, MFU {100 * r['mfu']:.1f} %, "
            f"peak {r['peak_gib']:.1f} GiB, warm-up {sum(r['warmup_s']):.1f} s "
            f"(first step {r['first_step_s']:.1f} s), loss {r['loss_last']:.4f}")


def print_table(rows):
    head = f"{'L':>2} {'B':>4} {'mode':<8}{'ms/step':>9}{'samp-st/s':>11}{'TFLOP/s':>9}{'MFU%':>6}{'peakGiB':>9}{'warm s':>8}  status"
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['l_cycles']:>2} {r['batch']:>4} {r['mode']:<8}{r['ms_per_step']:>9.1f}"
                  f"{r['sample_steps_per_s']:>11.1f}{r['tflops']:>9.1f}{100 * r['mfu']:>6.1f}"
                  f"{r['peak_gib']:>9.1f}{sum(r['warmup_s']):>8.1f}  ok")
        else:
            print(f"{r['l_cycles']:>2} {r['batch']:>4} {r['mode']:<8}{'-':>9}{'-':>11}{'-':>9}{'-':>6}"
                  f"{r['peak_gib']:>9.1f}{'-':>8}  {r['status'][:60]}")


def print_flops(l_cycles_list, base=ARC):
    for lc in l_cycles_list:
        f = step_flops(dataclasses.replace(base, l_cycles=lc))
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f.items() if k != "total")
        print(f"FLOPs per sample-step at L_cycles {lc}: {f['total'] / 1e9:.2f} GFLOP ({parts} GFLOP)")


def run_gpu(args, base=ARC, device="cuda"):
    """Every (L_cycles, batch, mode) of the benchmark; prints rows as they finish, then the table."""
    device = torch.device(device)
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, 64)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, Python {sys.version.split()[0]}")
    print(f"config: D {base.hidden}, heads {base.heads}, layers {base.layers}, F {base.inter}, H_cycles {base.h_cycles}, "
          f"S {base.tokens} ({base.seq_len} + {base.puzzle_len} puzzle), vocab {base.vocab}, puzzle table {base.num_ids} rows, "
          f"bf16 autocast, compile scope {args.compile_scope}; warm-up {args.warmup} + timed {args.steps} steps")
    print_flops(args.l_cycles, base)
    rows, compile_dead = [], None
    t_start = time.perf_counter()
    for lc in args.l_cycles:
        cfg = dataclasses.replace(base, l_cycles=lc)
        for batch in args.batches:
            for mode in args.modes:
                if mode == "compile" and compile_dead:
                    rows.append({"l_cycles": lc, "batch": batch, "mode": mode,
                                 "status": f"skipped ({compile_dead})", "peak_gib": 0.0})
                    continue
                row = run_config(cfg, batch, mode, args, device)
                if mode == "compile":
                    if row["status"].startswith("error"):
                        compile_dead = "compile failed earlier"
                    elif row["status"] == "ok" and row["first_step_s"] > COMPILE_LIMIT_S:
                        compile_dead = f"compile took {row['first_step_s']:.0f} s > {COMPILE_LIMIT_S:.0f} s"
                rows.append(row)
                print(describe_row(row), flush=True)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    print_table(rows)
    return rows


# --------------------------------------------------------------------------- CPU path


def cpu_smoke(steps=3):
    """The same training step at tiny dims on the CPU, bf16 autocast; checks the loss is finite."""
    device = torch.device("cpu")
    trainer = Trainer(TINY, 4, device, torch.bfloat16, make_forward(TINY, torch.bfloat16, "eager", "level"))
    gen = torch.Generator().manual_seed(7)
    new = random_batch(TINY, 4, gen, device)  # one batch: with q_halt = -5 no slot halts early
    losses = [float(trainer.step(new)) for _ in range(steps)]
    print(f"CPU smoke (D {TINY.hidden}, S {TINY.tokens}, B 4, H {TINY.h_cycles} L {TINY.l_cycles}, bf16 autocast): "
          f"losses {', '.join(f'{x:.5f}' for x in losses)}")
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit("CPU smoke: non-finite loss")
    trend = "lower" if losses[-1] < losses[0] else "not lower"
    print(f"CPU smoke: loss finite; {trend} at step {steps} than at step 1 "
          "(the carry deepens every step, so it need not fall monotonically)")


def flop_self_check():
    """Analytic FLOPs vs FlopCounterMode on one forward+backward of the ACT step (f32, CPU)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = dataclasses.replace(TINY, l_cycles=3, h_cycles=3)
    batch = 2
    w = Weights(cfg, torch.device("cpu"), torch.float32, seed=0)
    gen = torch.Generator().manual_seed(3)
    tokens, labels, ids = random_batch(cfg, batch, gen, torch.device("cpu"))
    zh = w.h_init.expand(batch, cfg.tokens, cfg.hidden).contiguous()
    zl = w.l_init.expand(batch, cfg.tokens, cfg.hidden).contiguous()
    rows = w.puzzle_table[ids].detach().requires_grad_(True)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, *_ = forward_loss(w, zh, zl, tokens, labels, rows, cfg, torch.float32, level_forward)
        loss.backward()
    measured = counter.get_total_flops()
    f = step_flops(cfg)
    analytic, with_recompute = f["total"] * batch, (f["total"] + f["attn_bwd_recompute"]) * batch
    print(f"FLOP self-check (D {cfg.hidden}, S {cfg.tokens}, H {cfg.h_cycles} L {cfg.l_cycles}, B {batch}): "
          f"analytic {analytic:,} model FLOPs (+ flash-bwd QK^T recompute = {with_recompute:,}); "
          f"FlopCounterMode {measured:,}")
    ok = measured == with_recompute
    print(f"FLOP self-check: {'match' if ok else 'MISMATCH'} (FlopCounterMode counts the recompute)")
    return ok


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=ints, default=[96, 192, 384], help="local batch sizes (default 96,192,384)")
    ap.add_argument("--l-cycles", type=ints, default=[4, 6], help="L_cycles values (default 4,6)")
    ap.add_argument("--modes", type=lambda s: [x for x in s.split(",") if x], default=["eager", "compile"],
                    help="eager,compile (default both)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per config (default 5)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per config, compile included (default 3)")
    ap.add_argument("--compile-scope", choices=["level", "step"], default="level",
                    help="what torch.compile wraps: the L-level function (default) or the whole forward+loss")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="one small config (L_cycles 4, batch 16, 2+3 steps)")
    args = ap.parse_args(argv)
    bad = set(args.modes) - {"eager", "compile"}
    if bad:
        ap.error(f"unknown modes {sorted(bad)}")
    if args.quick:
        args.batches, args.l_cycles, args.warmup, args.steps = [16], [4], 2, 3
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        print(f"torch {torch.__version__}: no CUDA device; running the CPU smoke instead of the benchmark")
        print_flops(args.l_cycles)
        cpu_smoke()
        ok = flop_self_check()
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"cuda": False, "flop_check_ok": ok}, fh, indent=1)
        print("no CUDA: CPU smoke done, benchmark skipped")
        return 0 if ok else 1
    rows = run_gpu(args)
    if args.json:
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                "peak_tflops": PEAK_TFLOPS, "compile_scope": args.compile_scope,
                "puzzle_table_rows": ARC.num_ids, "warmup": args.warmup, "steps": args.steps,
                "flops_per_sample_step": {lc: step_flops(dataclasses.replace(ARC, l_cycles=lc))
                                          for lc in args.l_cycles}}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
