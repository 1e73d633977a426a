#!/usr/bin/env python3
"""Baseline timing of one TRM ACT training step in plain PyTorch on the CPU.

This is an independent, minimal restatement of the math in
docs/trm-spec.md (sections 3, 4 and 6) written for timing only: float32,
2 threads, random weights and tokens. It measures

  fwd      one ACT step with no autograd at all (all H cycles under no_grad)
  fwd+bwd  the training step: H_cycles-1 cycles without grad, the last cycle
           with grad, the heads and the stablemax + BCE loss, then backward

and prints milliseconds (median over --iters timed runs after a warm-up) and
the GFLOP/s that the forward matmuls and attention amount to.

Run through tools/bench-torch-cpu.sh, which provides a venv with torch.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

# name, hidden, heads, total tokens S (seq_len + P), batch sizes
CONFIGS = [
    ("a", 512, 8, 916, [1, 4]),
    ("b", 128, 4, 104, [16]),
    ("c", 64, 2, 38, [64]),
]
H_CYCLES, L_CYCLES, LAYERS, EXPANSION, VOCAB, PUZZLE_LEN = 3, 4, 2, 4.0, 12, 16


def swiglu_width(hidden, expansion):
    inner = round(expansion * hidden * 2 / 3)
    return -(-inner // 256) * 256


def trunc_normal(shape, std, gen):
    # Scale is all that matters for timing; clamp a normal at 2 sigma.
    return (torch.randn(shape, generator=gen) * std).clamp_(-2 * std, 2 * std)


class Net:
    """The weights of one TRM network and its forward math."""

    def __init__(self, hidden, heads, tokens, gen):
        self.d, self.h, self.s = hidden, heads, tokens
        self.hd = hidden // heads
        f = swiglu_width(hidden, EXPANSION)
        lecun = lambda out, inp: trunc_normal((out, inp), inp ** -0.5, gen).requires_grad_()
        self.embed = trunc_normal((VOCAB, hidden), hidden ** -0.5, gen).requires_grad_()
        self.lm_head = lecun(VOCAB, hidden)
        self.q_w = torch.zeros(2, hidden, requires_grad=True)
        self.q_b = torch.full((2,), -5.0, requires_grad=True)
        self.layers = [
            dict(qkv=lecun(3 * hidden, hidden), o=lecun(hidden, hidden),
                 gu=lecun(2 * f, hidden), down=lecun(hidden, f))
            for _ in range(LAYERS)
        ]
        self.h_init = trunc_normal((hidden,), 1.0, gen)
        self.l_init = trunc_normal((hidden,), 1.0, gen)
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        ang = torch.outer(torch.arange(tokens, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.cos, self.sin = ang.cos(), ang.sin()

    def params(self):
        ps = [self.embed, self.lm_head, self.q_w, self.q_b]
        for layer in self.layers:
            ps.extend(layer.values())
        return ps

    def rope(self, x):  # x: B, S, H, hd
        half = self.hd // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos[:, None, :] + rot * self.sin[:, None, :]

    @staticmethod
    def norm(x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5)

    def block(self, x, w):
        b, s, _ = x.shape
        qkv = (x @ w["qkv"].t()).view(b, s, 3 * self.h, self.hd)
        q = self.rope(qkv[:, :, : self.h]).transpose(1, 2)
        k = self.rope(qkv[:, :, self.h: 2 * self.h]).transpose(1, 2)
        v = qkv[:, :, 2 * self.h:].transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, self.d)
        x = self.norm(x + a @ w["o"].t())
        g, u = (x @ w["gu"].t()).chunk(2, dim=-1)
        return self.norm(x + (F.silu(g) * u) @ w["down"].t())

    def level(self, z, inj):
        z = z + inj
        for w in self.layers:
            z = self.block(z, w)
        return z

    def step(self, tokens, puzzle_rows, labels, grad):
        b = tokens.shape[0]
        x = torch.cat((puzzle_rows.view(b, 1, self.d),
                       torch.zeros(b, PUZZLE_LEN - 1, self.d),
                       F.embedding(tokens, self.embed)), dim=1) * math.sqrt(self.d)
        zh = self.h_init.expand(b, self.s, self.d)
        zl = self.l_init.expand(b, self.s, self.d)
        with torch.no_grad():
            for _ in range(H_CYCLES - 1):
                for _ in range(L_CYCLES):
                    zl = self.level(zl, zh + x)
                zh = self.level(zh, zl)
        with torch.set_grad_enabled(grad):
            for _ in range(L_CYCLES):
                zl = self.level(zl, zh + x)
            zh = self.level(zh, zl)
            logits = zh[:, PUZZLE_LEN:] @ self.lm_head.t()
            q = zh[:, 0] @ self.q_w.t() + self.q_b
            return loss_head(logits, q[:, 0], labels)


def loss_head(logits, q_halt, labels):
    """Stablemax cross-entropy (float64) plus 0.5 * BCE of the halt logit."""
    lg = logits.double()
    s = torch.where(lg < 0, 1 / (1 - lg), lg + 1)
    logp = torch.log(s / s.sum(-1, keepdim=True))
    mask = labels != -100
    safe = torch.where(mask, labels, 0)
    nll = -torch.gather(logp, -1, safe.unsqueeze(-1)).squeeze(-1)
    count = mask.sum(-1, keepdim=True).clamp_min(1)
    lm = (torch.where(mask, nll, 0) / count).sum()
    correct = ((logits.argmax(-1) == labels) | ~mask).all(-1)
    qh = F.binary_cross_entropy_with_logits(q_halt, correct.to(q_halt.dtype), reduction="sum")
    return lm + 0.5 * qh


def forward_gflop(hidden, tokens, batch):
    f = swiglu_width(hidden, EXPANSION)
    per_token = 2 * hidden * (3 * hidden + hidden + 2 * f + f) + 4 * tokens * hidden
    passes = H_CYCLES * (L_CYCLES + 1) * LAYERS
    return per_token * tokens * batch * passes / 1e9


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out), min(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3, help="timed runs per measurement")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated config names (a,b,c)")
    ap.add_argument("--batch", type=int, default=0, help="only this batch size (0 = all)")
    ap.add_argument("--parts", default="both", choices=["both", "fwd", "step"],
                    help="time the forward, the training step, or both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"H_cycles {H_CYCLES}, L_cycles {L_CYCLES}, {LAYERS} layers, expansion {EXPANSION}")
    print(f"{'cfg':<4}{'D':>5}{'heads':>6}{'S':>5}{'B':>4}{'GFLOP':>8}"
          f"{'fwd ms':>10}{'GFLOP/s':>9}{'fwd+bwd ms':>12}{'min':>9}")
    only = set(filter(None, args.only.split(",")))
    for name, hidden, heads, tokens, batches in CONFIGS:
        if only and name not in only:
            continue
        gen = torch.Generator().manual_seed(0)
        net = Net(hidden, heads, tokens, gen)
        for batch in batches:
            if args.batch and batch != args.batch:
                continue
            seq = tokens - PUZZLE_LEN
            inputs = torch.randint(0, VOCAB, (batch, seq), generator=gen)
            labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
            labels[:, seq // 2:] = -100
            rows = trunc_normal((batch, hidden), 0.02, gen).requires_grad_()

            def fwd():
                with torch.no_grad():
                    net.step(inputs, rows, labels, grad=False)

            def fwd_bwd():
                for p in net.params() + [rows]:
                    p.grad = None
                net.step(inputs, rows, labels, grad=True).backward()

            nan = (float("nan"), float("nan"))
            fwd_ms, _ = time_ms(fwd, args.warmup, args.iters) if args.parts != "step" else nan
            fb_ms, fb_min = time_ms(fwd_bwd, args.warmup, args.iters) if args.parts != "fwd" else nan
            gf = forward_gflop(hidden, tokens, batch)
            print(f"{name:<4}{hidden:>5}{heads:>6}{tokens:>5}{batch:>4}{gf:>8.1f}"
                  f"{fwd_ms:>10.1f}{gf / fwd_ms * 1e3:>9.1f}{fb_ms:>12.1f}{fb_min:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
