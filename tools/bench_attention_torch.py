#!/usr/bin/env python3
"""PyTorch baseline for the attention kernel: RoPE on q and k, then
non-causal scaled dot-product attention, bf16, from a packed qkv tensor
[B*S, 3*H*d] (q heads, then k heads, then v heads), the input our kernel
takes.

For every SDPA backend PyTorch offers here (flash, cuDNN, memory-efficient),
times the forward pass and forward + backward (the backward runs through
RoPE into qkv) with CUDA events: the median of many repetitions after a
warm-up. FLOPs: forward 4*B*H*S^2*d, backward 2.5x that, so fwd+bwd 3.5x;
the peak is the measured ~790 TFLOP/s bf16 GEMM ceiling of the H200.

Prints one line per (shape, backend, pass) and, with --json PATH, writes the
numbers there (tools/gpu-check.sh keeps them next to our kernel's). Without
torch or a CUDA device it says so and exits 0, so the GPU check never fails
on a missing baseline.

    python3 tools/bench_attention_torch.py [--json out.json]
"""

import argparse
import json
import statistics
import sys
import time

PEAK_TFLOPS = 790.0
# (B, H, S, d, warm-up, repetitions): a training batch of 916-token puzzles,
# and one long sequence shape.
SHAPES = [(96, 8, 916, 64, 5, 40), (8, 8, 4096, 64, 5, 25)]
ROPE_THETA = 10000.0


def write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def rope_tables(torch, s, d, device):
    """cos and sin [S, d] f32: frequencies theta^(-2j/d), j < d/2, repeated twice."""
    inv = ROPE_THETA ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    ang = torch.arange(s, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(torch, x, cos, sin):
    """Rotate-half RoPE of x [B, S, H, d] in f32, back to x's dtype:
    out_i = x_i cos_i - x_{i+h} sin_i, out_{i+h} = x_{i+h} cos_{i+h} + x_i sin_{i+h}."""
    h = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([-xf[..., h:], xf[..., :h]], dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * c + rot * s).to(x.dtype)


def attention(torch, F, qkv, b, h, s, d, cos, sin):
    """qkv [B*S, 3*H*d] -> out [B*S, H*d]: RoPE on q and k, then SDPA."""
    x = qkv.view(b, s, 3, h, d)
    q = apply_rope(torch, x[:, :, 0], cos, sin).transpose(1, 2)
    k = apply_rope(torch, x[:, :, 1], cos, sin).transpose(1, 2)
    v = x[:, :, 2].transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    return o.transpose(1, 2).reshape(b * s, h * d)


def time_ms(torch, fn, warmup, reps):
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"attention baseline: PyTorch is missing ({e}); nothing measured")
        write_json(args.json, {"status": "skipped", "reason": f"no torch: {e}"})
        return 0
    if not torch.cuda.is_available():
        print(f"attention baseline: no CUDA device (torch {torch.__version__}); nothing measured")
        write_json(args.json, {"status": "skipped", "reason": "no CUDA device"})
        return 0

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"attention baseline: torch {torch.__version__}, {name}, bf16, RoPE + SDPA non-causal, "
          f"peak {PEAK_TFLOPS:.0f} TFLOP/s")
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    results, skipped = [], []
    header = f"{'B':>3} {'H':>2} {'S':>5} {'d':>3}  {'backend':<9} {'pass':<8} {'ms':>8} {'TFLOP/s':>8} {'% peak':>6}"
    print(header)
    t_start = time.time()
    for b, h, s, d, warmup, reps in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(1234 + s)
        qkv = torch.randn(b * s, 3 * h * d, device=dev, dtype=torch.bfloat16, generator=gen)
        grad = torch.randn(b * s, h * d, device=dev, dtype=torch.bfloat16, generator=gen)
        cos, sin = rope_tables(torch, s, d, dev)
        fwd_flops = 4.0 * b * h * s * s * d
        reference = None
        for bname, backend in backends:
            try:
                with sdpa_kernel([backend]):
                    with torch.no_grad():
                        out = attention(torch, F, qkv, b, h, s, d, cos, sin)
                    torch.cuda.synchronize()
                    # Backends must agree (bf16 output: a loose bound).
                    if reference is None:
                        reference = out.float()
                        diff = 0.0
                    else:
                        diff = (out.float() - reference).abs().max().item()
                    del out

                    def fwd():
                        with torch.no_grad():
                            attention(torch, F, qkv, b, h, s, d, cos, sin)

                    x = qkv.detach().clone().requires_grad_(True)

                    def fwd_bwd():
                        x.grad = None
                        attention(torch, F, x, b, h, s, d, cos, sin).backward(grad)

                    for pname, fn, flops in (("fwd", fwd, fwd_flops),
                                             ("fwd+bwd", fwd_bwd, 3.5 * fwd_flops)):
                        ms = time_ms(torch, fn, warmup, reps)
                        tflops = flops / (ms * 1e-3) / 1e12
                        print(f"{b:>3} {h:>2} {s:>5} {d:>3}  {bname:<9} {pname:<8} {ms:>8.3f} "
                              f"{tflops:>8.1f} {100 * tflops / PEAK_TFLOPS:>5.1f}%")
                        results.append({"B": b, "H": h, "S": s, "d": d, "backend": bname,
                                        "pass": pname, "ms": ms, "tflops": tflops,
                                        "flops": flops, "reps": reps,
                                        "max_abs_diff_vs_first_backend": diff})
                    del x
            except Exception as e:  # a backend this build or GPU lacks
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                print(f"{b:>3} {h:>2} {s:>5} {d:>3}  {bname:<9} skipped: {reason}")
                skipped.append({"B": b, "H": h, "S": s, "d": d, "backend": bname, "reason": reason})
            torch.cuda.empty_cache()
    print(f"attention baseline: {len(results)} timings, {len(skipped)} backends skipped, "
          f"{time.time() - t_start:.1f} s")
    write_json(args.json, {"status": "ok", "device": name, "torch": torch.__version__,
                           "peak_tflops": PEAK_TFLOPS, "dtype": "bf16", "causal": False,
                           "flops": "fwd 4*B*H*S^2*d, bwd 2.5x fwd, fwd+bwd 3.5x fwd",
                           "results": results, "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
