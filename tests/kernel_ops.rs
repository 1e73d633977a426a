//! Kernel parity: every kernel family of `kernels/` against the CPU reference
//! of `src/backend/cpu` (the optimisers against an f64 implementation of
//! docs/optimizer.md written here), on random inputs at several shapes,
//! including odd sizes and unaligned pointers (which take the scalar paths).
//!
//! Each op has one test body over a launch target (`tests/device`): the
//! `_emu` test runs it on the CPU emulator of the kernels, the `_gpu` test on
//! GPU 0 when there is one (tools/gpu-check.sh runs them on the H200; without
//! a GPU they print "no CUDA device: GPU variant not run").
//!
//! Tolerances: outputs stored as bf16 are compared with a relative 1e-2
//! (bf16 keeps 8 significant bits, 2^-9 relative per rounding, and the
//! kernels round where the bf16 PyTorch reference rounds while the CPU
//! reference runs in f32) plus 1e-2 of the output's largest magnitude for
//! elements that come out of cancellation; f32 outputs of f32 math are
//! compared with relative 1e-5 (stablemax: the f64 reference, see
//! kernels/stablemax_ce.cu) or tighter where stated.

use half::bf16;
use rand::Rng;
use trm::backend::cpu::{embedding, rmsnorm, rope, stablemax_ce, swiglu};
use trm::backend::cuda::abi::*;

mod device;
use device::{rng, to_bf16, to_f32, uniform, Dev};

// ---------------------------------------------------------------------------
// Helpers

/// Asserts |got - want| <= rtol |want| + atol_frac * max|want| element-wise.
fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol_frac: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let atol = atol_frac * scale;
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let excess = err / (rtol * w.abs() + atol).max(f64::MIN_POSITIVE);
        if excess > worst.0 || g.is_nan() {
            worst = (if g.is_nan() { f64::INFINITY } else { excess }, i);
        }
    }
    let (excess, i) = worst;
    assert!(
        excess <= 1.0,
        "{what}: element {i}: got {}, want {} (error {:.3e}, allowed {:.3e} = {rtol:e} rel + {atol:.3e} abs)",
        got[i],
        want[i],
        (got[i] as f64 - want[i]).abs(),
        rtol * want[i].abs() + atol
    );
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Blocks of `block` threads for `n` grid-stride items, at most `cap` blocks
/// (small caps make every thread loop).
fn grid_for(n: usize, block: u32, cap: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, cap as usize) as u32;
    LaunchConfig::linear(blocks, block, 0)
}

// ---------------------------------------------------------------------------
// cast

fn cast_matches_half(dev: &Dev) {
    let mut r = rng(1);
    for (n, offset) in [
        (0usize, 0usize),
        (1, 0),
        (7, 0),
        (8, 0),
        (1000, 0),
        (1003, 1),
        (64, 3),
    ] {
        let mut x = uniform(&mut r, n + offset, 1e3);
        if n > 5 {
            x[offset] = f32::NAN;
            x[offset + 1] = f32::INFINITY;
            x[offset + 2] = f32::from_bits(0x3f80_8000); // a tie
        }
        let xb = dev.upload(&x);
        let yb = dev.zeros::<bf16>(n + offset);
        let cfg = grid_for(n / 8 + 1, 64, 3);
        dev.run(
            CAST_F32_TO_BF16,
            cfg,
            &CastF32ToBf16Args {
                x: dev.cptr(&xb, offset),
                y: dev.ptr(&yb, offset),
                n: n as i64,
            },
        );
        let y = dev.download(&yb);
        for i in offset..offset + n {
            if x[i].is_nan() {
                assert_eq!(y[i].to_bits(), 0x7fff, "NaN -> canonical NaN");
            } else {
                assert_eq!(y[i], bf16::from_f32(x[i]), "n {n} i {i}");
            }
        }
        let back = dev.zeros::<f32>(n + offset);
        dev.run(
            CAST_BF16_TO_F32,
            cfg,
            &CastBf16ToF32Args {
                x: dev.cptr(&yb, offset),
                y: dev.ptr(&back, offset),
                n: n as i64,
            },
        );
        let back = dev.download(&back);
        for i in offset..offset + n {
            assert_eq!(back[i].to_bits(), y[i].to_f32().to_bits());
        }
        let fb = dev.zeros::<f32>(n + offset + 1);
        dev.run(
            FILL_F32,
            cfg,
            &FillF32Args {
                y: dev.ptr(&fb, offset),
                v: 2.5,
                n: n as i64,
            },
        );
        let f = dev.download(&fb);
        assert!(f[offset..offset + n].iter().all(|&v| v == 2.5));
        assert_eq!(f[offset + n], 0.0, "fill wrote past n");
        let hb = dev.zeros::<bf16>(n + offset + 1);
        dev.run(
            FILL_BF16,
            cfg,
            &FillBf16Args {
                y: dev.ptr(&hb, offset),
                v: bf16::from_f32(-3.0),
                n: n as i64,
            },
        );
        let h = dev.download(&hb);
        assert!(h[offset..offset + n].iter().all(|&v| v.to_f32() == -3.0));
        assert_eq!(h[offset + n].to_f32(), 0.0);
    }
}

on_both!(cast_emu, cast_gpu, cast_matches_half);

// ---------------------------------------------------------------------------
// rmsnorm

fn rmsnorm_matches_cpu(dev: &Dev) {
    let eps = 1e-5;
    // (M, D, residual, pointer offset in elements, in place, grid cap)
    let cases = [
        (1usize, 8usize, true, 0usize, false, 64u32),
        (5, 7, true, 0, false, 64),
        (17, 100, true, 0, false, 1),
        (33, 512, true, 0, false, 64),
        (33, 512, false, 0, true, 2),
        (9, 1024, true, 0, true, 64),
        (3, 1030, true, 0, false, 64),
        (6, 64, true, 1, false, 64),
        (4, 2048, false, 0, false, 64),
    ];
    let mut r = rng(2);
    for (m, d, with_r, off, in_place, cap) in cases {
        let what =
            format!("rmsnorm M {m} D {d} residual {with_r} offset {off} in place {in_place}");
        let x = to_f32(&to_bf16(&uniform(&mut r, m * d, 2.0)));
        let res = to_f32(&to_bf16(&uniform(&mut r, m * d, 2.0)));
        let dy = to_f32(&to_bf16(&uniform(&mut r, m * d, 1.0)));

        // CPU reference in f32 on the bf16 values.
        let mut y_ref = vec![0.0f32; m * d];
        let mut rstd_ref = vec![0.0f32; m];
        rmsnorm::rmsnorm_forward(
            &mut y_ref,
            &mut rstd_ref,
            &x,
            with_r.then_some(&res[..]),
            d,
            eps,
        );
        let mut dx_ref = dy.clone();
        rmsnorm::rmsnorm_backward(&mut dx_ref, &y_ref, &rstd_ref, d);

        let pad = |v: &[f32]| {
            let mut p = vec![0.0f32; off];
            p.extend_from_slice(v);
            to_bf16(&p)
        };
        let xb = dev.upload(&pad(&x));
        let rb = dev.upload(&pad(&res));
        let yb = if in_place {
            None
        } else {
            Some(dev.zeros::<bf16>(m * d + off))
        };
        let y_ptr = yb.as_ref().map_or(dev.ptr(&xb, off), |b| dev.ptr(b, off));
        let rstd = dev.zeros::<f32>(m);
        let cfg = grid_for(m, 256 / 32, cap);
        let cfg = LaunchConfig::linear(cfg.grid.x, 256, 0);
        dev.run(
            RMSNORM_FORWARD_BF16,
            cfg,
            &RmsnormForwardArgs {
                y: y_ptr,
                rstd: dev.ptr(&rstd, 0),
                x: dev.cptr(&xb, off),
                r: if with_r {
                    dev.cptr(&rb, off)
                } else {
                    std::ptr::null()
                },
                M: m as i64,
                D: d as i32,
                eps: eps as f32,
            },
        );
        let y = to_f32(&dev.download(yb.as_ref().unwrap_or(&xb))[off..]);
        assert_close(&format!("{what}: y"), &y, &f64s(&y_ref), 1e-2, 1e-2);
        assert_close(
            &format!("{what}: rstd"),
            &dev.download(&rstd),
            &f64s(&rstd_ref),
            5e-3,
            0.0,
        );

        let dyb = dev.upload(&pad(&dy));
        let y_dev = yb.as_ref().unwrap_or(&xb);
        let dxb = if in_place {
            None
        } else {
            Some(dev.zeros::<bf16>(m * d + off))
        };
        let dx_ptr = dxb.as_ref().map_or(dev.ptr(&dyb, off), |b| dev.ptr(b, off));
        dev.run(
            RMSNORM_BACKWARD_BF16,
            cfg,
            &RmsnormBackwardArgs {
                dx: dx_ptr,
                dy: dev.cptr(&dyb, off),
                y: dev.cptr(y_dev, off),
                rstd: dev.cptr(&rstd, 0),
                M: m as i64,
                D: d as i32,
            },
        );
        let dx = to_f32(&dev.download(dxb.as_ref().unwrap_or(&dyb))[off..]);
        assert_close(&format!("{what}: dx"), &dx, &f64s(&dx_ref), 1e-2, 1e-2);
    }
}

on_both!(rmsnorm_emu, rmsnorm_gpu, rmsnorm_matches_cpu);

// ---------------------------------------------------------------------------
// swiglu

fn swiglu_matches_cpu(dev: &Dev) {
    let mut r = rng(3);
    // (M, F, pointer offset, in-place backward)
    for (m, f, off, in_place) in [
        (1usize, 8usize, 0usize, false),
        (3, 5, 0, false),
        (7, 24, 0, true),
        (16, 1536, 0, false),
        (5, 100, 0, false),
        (4, 16, 1, true),
    ] {
        let what = format!("swiglu M {m} F {f} offset {off}");
        let gu = to_f32(&to_bf16(&uniform(&mut r, m * 2 * f, 6.0)));
        let da = to_f32(&to_bf16(&uniform(&mut r, m * f, 1.0)));
        let mut a_ref = vec![0.0f32; m * f];
        swiglu::swiglu_forward(&mut a_ref, &gu, f);
        let mut dgu_ref = vec![0.0f32; m * 2 * f];
        swiglu::swiglu_backward(&mut dgu_ref, &da, &gu, f);

        let pad = |v: &[f32]| {
            let mut p = vec![0.0f32; off];
            p.extend_from_slice(v);
            to_bf16(&p)
        };
        let gub = dev.upload(&pad(&gu));
        let ab = dev.zeros::<bf16>(m * f + off);
        let cfg = grid_for(m * f / 8 + 1, 128, 4);
        dev.run(
            SWIGLU_FORWARD_BF16,
            cfg,
            &SwigluForwardArgs {
                a: dev.ptr(&ab, off),
                gu: dev.cptr(&gub, off),
                M: m as i64,
                F: f as i32,
            },
        );
        let a = to_f32(&dev.download(&ab)[off..]);
        assert_close(&format!("{what}: a"), &a, &f64s(&a_ref), 1e-2, 1e-2);

        let dab = dev.upload(&pad(&da));
        let dgub = if in_place {
            None
        } else {
            Some(dev.zeros::<bf16>(m * 2 * f + off))
        };
        dev.run(
            SWIGLU_BACKWARD_BF16,
            cfg,
            &SwigluBackwardArgs {
                dgu: dgub
                    .as_ref()
                    .map_or(dev.ptr(&gub, off), |b| dev.ptr(b, off)),
                da: dev.cptr(&dab, off),
                gu: dev.cptr(&gub, off),
                M: m as i64,
                F: f as i32,
            },
        );
        let dgu = to_f32(&dev.download(dgub.as_ref().unwrap_or(&gub))[off..]);
        assert_close(&format!("{what}: dgu"), &dgu, &f64s(&dgu_ref), 1e-2, 1e-2);
    }
}

on_both!(swiglu_emu, swiglu_gpu, swiglu_matches_cpu);

// ---------------------------------------------------------------------------
// rope

fn rope_matches_cpu(dev: &Dev) {
    let mut r = rng(4);
    // (B, S, H, d, pointer offset)
    for (b, s, h, d, off) in [
        (1usize, 3usize, 1usize, 4usize, 0usize),
        (2, 5, 2, 6, 0),
        (2, 7, 2, 16, 0),
        (1, 9, 3, 64, 0),
        (2, 4, 1, 16, 1),
    ] {
        let what = format!("rope B {b} S {s} H {h} d {d} offset {off}");
        let tables = rope::rope_tables::<f32>(s, d, 10000.0);
        let n = b * s * 3 * h * d;
        let x = to_f32(&to_bf16(&uniform(&mut r, n, 2.0)));
        let mut fwd_ref = x.clone();
        rope::rope_forward(&mut fwd_ref, &tables, h);
        let mut bwd_ref = x.clone();
        rope::rope_backward(&mut bwd_ref, &tables, h);

        let cos = dev.upload(&tables.cos);
        let sin = dev.upload(&tables.sin);
        for (kernel, want, dir) in [
            (ROPE_FORWARD_BF16, &fwd_ref, "forward"),
            (ROPE_BACKWARD_BF16, &bwd_ref, "backward"),
        ] {
            let mut padded = vec![bf16::ZERO; off];
            padded.extend(to_bf16(&x));
            let qkv = dev.upload(&padded);
            dev.run(
                kernel,
                grid_for(n / 16 + 1, 64, 3),
                &RopeArgs {
                    qkv: dev.ptr(&qkv, off),
                    cos: dev.cptr(&cos, 0),
                    sin: dev.cptr(&sin, 0),
                    tokens: (b * s) as i64,
                    S: s as i32,
                    H: h as i32,
                    d: d as i32,
                },
            );
            let got = to_f32(&dev.download(&qkv)[off..]);
            assert_close(&format!("{what}: {dir}"), &got, &f64s(want), 1e-2, 1e-2);
            // v heads are untouched, bit for bit
            for (tok, row) in got.chunks(3 * h * d).enumerate() {
                assert_eq!(
                    &row[2 * h * d..],
                    &x[tok * 3 * h * d + 2 * h * d..(tok + 1) * 3 * h * d],
                    "{what}: {dir}: v of token {tok}"
                );
            }
        }
    }
}

on_both!(rope_emu, rope_gpu, rope_matches_cpu);

// ---------------------------------------------------------------------------
// stablemax_ce

/// First index of the maximum, as the CPU reference's argmax.
fn argmax(row: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as i32
}

fn stablemax_ce_matches_cpu(dev: &Dev) {
    let ignore = stablemax_ce::IGNORE_LABEL;
    let mut r = rng(5);
    for (b, t, v) in [
        (1usize, 1usize, 12usize),
        (3, 37, 12),
        (2, 900, 12),
        (4, 10, 5),
        (2, 33, 32),
    ] {
        let what = format!("stablemax_ce B {b} T {t} V {v}");
        let logits = to_f32(&to_bf16(&uniform(&mut r, b * t * v, 4.0)));
        let mut labels: Vec<i32> = (0..b * t)
            .map(|_| {
                if r.gen_bool(0.3) {
                    ignore
                } else {
                    r.gen_range(0..v as i32)
                }
            })
            .collect();
        // sample 0: every label right (seq_correct = 1); the last sample of a
        // batch of several: every label ignored (count 0)
        for i in 0..t {
            if labels[i] != ignore {
                labels[i] = argmax(&logits[i * v..(i + 1) * v]);
            }
        }
        if b > 1 {
            labels[(b - 1) * t..].fill(ignore);
        }

        let mut loss_ref = vec![0.0f64; b * t];
        stablemax_ce::stablemax_ce_forward(&mut loss_ref, &logits, &labels, v);
        let preds_ref: Vec<i32> = logits.chunks(v).map(argmax).collect();
        let mut count_ref = vec![0i32; b];
        let mut correct_ref = vec![0i32; b];
        let mut sample_ref = vec![0.0f64; b];
        for i in 0..b * t {
            if labels[i] != ignore {
                count_ref[i / t] += 1;
                correct_ref[i / t] += (preds_ref[i] == labels[i]) as i32;
                sample_ref[i / t] += loss_ref[i];
            }
        }
        for i in 0..b {
            sample_ref[i] /= count_ref[i].max(1) as f64;
        }

        let lb = dev.upload(&to_bf16(&logits));
        let labb = dev.upload(&labels);
        let loss = dev.zeros::<f32>(b * t);
        let preds = dev.zeros::<i32>(b * t);
        let sample = dev.zeros::<f32>(b);
        let count = dev.zeros::<i32>(b);
        let correct = dev.zeros::<i32>(b);
        let seq = dev.zeros::<i32>(b);
        dev.run(
            STABLEMAX_CE_FORWARD_BF16,
            LaunchConfig::linear(b.min(2) as u32, 128, 0),
            &StablemaxCeForwardArgs {
                logits: dev.cptr(&lb, 0),
                labels: dev.cptr(&labb, 0),
                loss: dev.ptr(&loss, 0),
                preds: dev.ptr(&preds, 0),
                sample_loss: dev.ptr(&sample, 0),
                count: dev.ptr(&count, 0),
                correct: dev.ptr(&correct, 0),
                seq_correct: dev.ptr(&seq, 0),
                B: b as i32,
                T: t as i32,
                V: v as i32,
            },
        );
        assert_close(
            &format!("{what}: loss"),
            &dev.download(&loss),
            &loss_ref,
            1e-5,
            1e-6,
        );
        assert_eq!(dev.download(&preds), preds_ref, "{what}: preds");
        assert_eq!(dev.download(&count), count_ref, "{what}: count");
        assert_eq!(dev.download(&correct), correct_ref, "{what}: correct");
        let seq_ref: Vec<i32> = (0..b)
            .map(|i| (correct_ref[i] == count_ref[i]) as i32)
            .collect();
        assert_eq!(dev.download(&seq), seq_ref, "{what}: seq_correct");
        assert_eq!(seq_ref[0], 1);
        assert_close(
            &format!("{what}: sample_loss"),
            &dev.download(&sample),
            &sample_ref,
            1e-5,
            1e-6,
        );

        // predictions only: no labels, no other outputs
        let preds2 = dev.zeros::<i32>(b * t);
        dev.run(
            STABLEMAX_CE_FORWARD_BF16,
            LaunchConfig::linear(b as u32, 64, 0),
            &StablemaxCeForwardArgs {
                logits: dev.cptr(&lb, 0),
                preds: dev.ptr(&preds2, 0),
                B: b as i32,
                T: t as i32,
                V: v as i32,
                ..Default::default()
            },
        );
        assert_eq!(dev.download(&preds2), preds_ref, "{what}: preds only");

        // backward: weight grad_scale / max(1, n_b) per labelled token
        let grad_scale = 1.0 / 768.0;
        let weights: Vec<f64> = (0..b * t)
            .map(|i| grad_scale / count_ref[i / t].max(1) as f64)
            .collect();
        let logits64 = f64s(&logits);
        let mut dl_ref = vec![0.0f64; b * t * v];
        stablemax_ce::stablemax_ce_backward(&mut dl_ref, &weights, &logits64, &labels, v);
        let dl = dev.zeros::<bf16>(b * t * v);
        dev.run(
            STABLEMAX_CE_BACKWARD_BF16,
            grid_for(b * t, 64, 5),
            &StablemaxCeBackwardArgs {
                dlogits: dev.ptr(&dl, 0),
                logits: dev.cptr(&lb, 0),
                labels: dev.cptr(&labb, 0),
                count: dev.cptr(&count, 0),
                grad_scale: grad_scale as f32,
                B: b as i32,
                T: t as i32,
                V: v as i32,
            },
        );
        // bf16 outputs: relative 1e-2, no absolute slack beyond a tiny floor
        assert_close(
            &format!("{what}: dlogits"),
            &to_f32(&dev.download(&dl)),
            &dl_ref,
            1e-2,
            1e-6,
        );
    }
}

on_both!(stablemax_ce_emu, stablemax_ce_gpu, stablemax_ce_matches_cpu);

fn q_bce_matches_cpu(dev: &Dev) {
    let mut r = rng(6);
    let b = 7;
    let mut q = uniform(&mut r, 2 * b, 6.0);
    q[0] = 30.0; // saturated sigmoid
    q[2] = -30.0;
    let seq: Vec<i32> = (0..b).map(|i| (i % 3 == 0) as i32).collect();
    let target: Vec<f32> = (0..b).map(|_| r.gen_range(0.0..1.0)).collect();
    let grad_scale = 0.5f32 / 768.0;
    let qb = dev.upload(&q);
    let sb = dev.upload(&seq);
    let tb = dev.upload(&target);
    for with_target in [true, false] {
        let loss = dev.zeros::<f32>(2 * b);
        let dq = dev.zeros::<f32>(2 * b);
        let args = QHeadBceArgs {
            q: dev.cptr(&qb, 0),
            seq_correct: dev.cptr(&sb, 0),
            q_continue_target: if with_target {
                dev.cptr(&tb, 0)
            } else {
                std::ptr::null()
            },
            loss: dev.ptr(&loss, 0),
            dq: dev.ptr(&dq, 0),
            grad_scale,
            B: b as i32,
        };
        let cfg = LaunchConfig::linear(2, 4, 0);
        dev.run(Q_BCE_FORWARD_F32, cfg, &args);
        dev.run(Q_BCE_BACKWARD_F32, cfg, &args);
        let mut loss_ref = vec![0.0f64; 2 * b];
        let mut dq_ref = vec![0.0f64; 2 * b];
        for i in 0..b {
            let y = seq[i] as f32;
            loss_ref[2 * i] = stablemax_ce::bce_with_logits_forward(q[2 * i], y) as f64;
            dq_ref[2 * i] =
                (grad_scale * stablemax_ce::bce_with_logits_backward(q[2 * i], y)) as f64;
            if with_target {
                let t = target[i];
                loss_ref[2 * i + 1] = stablemax_ce::bce_with_logits_forward(q[2 * i + 1], t) as f64;
                dq_ref[2 * i + 1] =
                    (grad_scale * stablemax_ce::bce_with_logits_backward(q[2 * i + 1], t)) as f64;
            }
        }
        let what = format!("q_bce target {with_target}");
        assert_close(
            &format!("{what}: loss"),
            &dev.download(&loss),
            &loss_ref,
            1e-5,
            1e-7,
        );
        assert_close(
            &format!("{what}: dq"),
            &dev.download(&dq),
            &dq_ref,
            1e-5,
            1e-7,
        );
    }
}

on_both!(q_bce_emu, q_bce_gpu, q_bce_matches_cpu);

// ---------------------------------------------------------------------------
// embedding

fn embedding_matches_cpu(dev: &Dev) {
    let mut r = rng(7);
    // (B, T, P, D, V, ndim, puzzle ids)
    for (b, t, p, d, v, ndim, n_ids) in [
        (2usize, 5usize, 2usize, 8usize, 12usize, 8usize, 4usize),
        (3, 7, 3, 5, 12, 7, 6),
        (2, 30, 16, 64, 12, 64, 10),
        (2, 6, 1, 16, 12, 0, 0),
        (2, 4, 2, 8, 9, 16, 3),
    ] {
        let what = format!("embedding B {b} T {t} P {p} D {d} V {v} ndim {ndim}");
        let s = p + t;
        let scale = (d as f32).sqrt();
        let embed = to_f32(&to_bf16(&uniform(&mut r, v * d, 1.0)));
        let puzzle = uniform(&mut r, n_ids * ndim, 1.0);
        let mut tokens: Vec<i32> = (0..b * t).map(|_| r.gen_range(0..v as i32)).collect();
        tokens[1] = v as i32; // out of range: a zero row
        let mut pids: Vec<i32> = (0..b)
            .map(|_| r.gen_range(0..n_ids.max(1) as i32))
            .collect();
        if ndim > 0 {
            pids[b - 1] = -1; // out of range: zero puzzle rows
        }

        // reference: the CPU embedding op for valid tokens, puzzle rows by the spec
        let mut x_ref = vec![0.0f32; b * s * d];
        for bi in 0..b {
            let xb = &mut x_ref[bi * s * d..(bi + 1) * s * d];
            if ndim > 0 && pids[bi] >= 0 {
                let id = pids[bi] as usize;
                for k in 0..ndim {
                    xb[k] = puzzle[id * ndim + k] * scale;
                }
            }
            for ti in 0..t {
                let tok = tokens[bi * t + ti];
                if tok >= 0 && (tok as usize) < v {
                    embedding::embedding_forward(
                        &mut xb[(p + ti) * d..(p + ti + 1) * d],
                        &embed,
                        &[tok],
                        d,
                        scale,
                    );
                }
            }
        }
        let eb = dev.upload(&to_bf16(&embed));
        let tb = dev.upload(&tokens);
        let pb = dev.upload(&puzzle);
        let ib = dev.upload(&pids);
        let xb = dev.zeros::<bf16>(b * s * d);
        dev.run(
            INPUT_EMBEDDING_FORWARD_BF16,
            grid_for(b * s * d / 8 + 1, 64, 4),
            &InputEmbeddingForwardArgs {
                x: dev.ptr(&xb, 0),
                embed: dev.cptr(&eb, 0),
                tokens: dev.cptr(&tb, 0),
                puzzle_emb: if ndim > 0 {
                    dev.cptr(&pb, 0)
                } else {
                    std::ptr::null()
                },
                puzzle_ids: if ndim > 0 {
                    dev.cptr(&ib, 0)
                } else {
                    std::ptr::null()
                },
                scale,
                B: b as i32,
                T: t as i32,
                P: p as i32,
                D: d as i32,
                V: v as i32,
                ndim: ndim as i32,
                num_puzzle_ids: n_ids as i32,
            },
        );
        let x = to_f32(&dev.download(&xb));
        assert_close(&format!("{what}: x"), &x, &f64s(&x_ref), 1e-2, 0.0);

        // backward: dembed starts at 1 (it accumulates), dpuzzle is written
        let dx = to_f32(&to_bf16(&uniform(&mut r, b * s * d, 1.0)));
        let mut dembed_ref = vec![1.0f32; v * d];
        let mut dpuzzle_ref = vec![0.0f32; b * ndim];
        for bi in 0..b {
            let db = &dx[bi * s * d..(bi + 1) * s * d];
            for k in 0..ndim {
                dpuzzle_ref[bi * ndim + k] = scale * db[k];
            }
            for ti in 0..t {
                let tok = tokens[bi * t + ti];
                if tok >= 0 && (tok as usize) < v {
                    embedding::embedding_backward(
                        &mut dembed_ref,
                        &db[(p + ti) * d..(p + ti + 1) * d],
                        &[tok],
                        d,
                        scale,
                    );
                }
            }
        }
        let dxb = dev.upload(&to_bf16(&dx));
        // (shared, slices, grid): a grid below the slice count makes blocks
        // run several slices in turn.
        for (shared, slices, grid) in [
            (true, 1usize, 1u32),
            (true, 3, 3),
            (false, 2, 2),
            (true, 64, 64),
            (true, 5, 2),
            (false, 4, 1),
        ] {
            let dembed = dev.upload(&vec![1.0f32; v * d]);
            let dpuzzle = dev.zeros::<f32>(b * ndim);
            // NaN scratch: stage 1 must write every element it owns.
            let partial = dev.upload(&vec![f32::NAN; slices * v * d]);
            embedding_backward_raw(
                dev,
                &EmbeddingRaw {
                    dembed: &dembed,
                    dpuzzle: (ndim > 0).then_some(&dpuzzle),
                    partial: &partial,
                    dx: &dxb,
                    tokens: &tb,
                    scale,
                    shape: [b, t, p, d, v, ndim],
                },
                slices,
                grid,
                shared,
            );
            let w = format!("{what}: shared {shared} slices {slices} grid {grid}");
            assert_close(
                &format!("{w}: dembed"),
                &dev.download(&dembed),
                &f64s(&dembed_ref),
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("{w}: dpuzzle"),
                &dev.download(&dpuzzle),
                &f64s(&dpuzzle_ref),
                1e-6,
                0.0,
            );
        }
    }
}

/// The buffers and shapes `[B, T, P, D, V, ndim]` of one raw launch of the
/// embedding backward's two kernels.
struct EmbeddingRaw<'a> {
    dembed: &'a trm::backend::cuda::Buffer<f32>,
    dpuzzle: Option<&'a trm::backend::cuda::Buffer<f32>>,
    partial: &'a trm::backend::cuda::Buffer<f32>,
    dx: &'a trm::backend::cuda::Buffer<bf16>,
    tokens: &'a trm::backend::cuda::Buffer<i32>,
    scale: f32,
    shape: [usize; 6],
}

/// Both stages of the embedding backward with the slice count, stage 1's
/// grid and its accumulator chosen here (the launcher picks them from the
/// shapes); stage 2 runs on a grid of its own (at most 3 blocks of 64).
fn embedding_backward_raw(dev: &Dev, a: &EmbeddingRaw, slices: usize, grid: u32, shared: bool) {
    let [b, t, p, d, v, ndim] = a.shape;
    let smem = if shared { (v * d * 4) as u32 } else { 0 };
    dev.run(
        INPUT_EMBEDDING_BACKWARD_BF16,
        LaunchConfig::linear(grid, 64, smem),
        &InputEmbeddingBackwardArgs {
            partial: dev.ptr(a.partial, 0),
            dpuzzle: a
                .dpuzzle
                .map_or(std::ptr::null_mut(), |buf| dev.ptr(buf, 0)),
            dx: dev.cptr(a.dx, 0),
            tokens: dev.cptr(a.tokens, 0),
            scale: a.scale,
            B: b as i32,
            T: t as i32,
            P: p as i32,
            D: d as i32,
            V: v as i32,
            ndim: ndim as i32,
            nblocks: slices as i32,
            shared_accumulate: shared as i32,
        },
    );
    dev.run(
        INPUT_EMBEDDING_BACKWARD_REDUCE,
        grid_for(v * d, 64, 3),
        &InputEmbeddingReduceArgs {
            dembed: dev.ptr(a.dembed, 0),
            partial: dev.cptr(a.partial, 0),
            n: (v * d) as i64,
            nblocks: slices as i32,
        },
    );
}

on_both!(embedding_emu, embedding_gpu, embedding_matches_cpu);

/// The backward's bits depend on the shapes alone: most tokens on one id,
/// gradients spanning 2^16 in magnitude (so the f32 sums round differently
/// in another order: checked below), and the same dembed bits from the
/// launcher, from the emulator running blocks and threads last to first (on
/// a GPU: another run), from stage 1 on other grids and with the other
/// accumulator, and from stage 2 on another grid. A table under 48 KiB
/// (summed in shared memory) and one over it (summed in the scratch).
fn embedding_backward_is_deterministic(dev: &Dev) {
    use trm::backend::cuda::emu::{self, EmuOptions};
    use trm::backend::cuda::ops;
    let mut r = rng(8);
    for (b, t, p, d, v) in [
        (4usize, 200usize, 2usize, 64usize, 12usize),
        (2, 300, 1, 2048, 12),
    ] {
        let what = format!("embedding backward B {b} T {t} D {d} V {v}");
        let s = ops::EmbeddingShape {
            b,
            t,
            p,
            d,
            v,
            ndim: 0,
            num_puzzle_ids: 0,
        };
        let scale = (d as f32).sqrt();
        let mut tokens: Vec<i32> = (0..b * t)
            .map(|_| {
                if r.gen_bool(0.9) {
                    3
                } else {
                    r.gen_range(0..v as i32)
                }
            })
            .collect();
        tokens[7] = -1; // out of range: skipped
        let dx: Vec<f32> = (0..b * (p + t) * d)
            .map(|_| r.gen_range(-1.0f32..1.0) * 2f32.powi(r.gen_range(-8..8)))
            .collect();
        let dx = to_f32(&to_bf16(&dx));
        let (dxb, tb) = (dev.upload(&to_bf16(&dx)), dev.upload(&tokens));
        let len = ops::input_embedding_backward_scratch_len(&s);
        let slices = len / (v * d);
        assert!(slices > 1, "{what}: {slices} slice(s) test no order");
        let scratch = dev.zeros::<f32>(len);
        // dembed accumulates onto 0.5 in every run.
        let bits = |f: &dyn Fn(&trm::backend::cuda::Buffer<f32>)| -> Vec<u32> {
            let dembed = dev.upload(&vec![0.5f32; v * d]);
            f(&dembed);
            dev.download(&dembed).iter().map(|x| x.to_bits()).collect()
        };
        let launcher = |de: &trm::backend::cuda::Buffer<f32>| {
            let d0 = dev.device();
            dev.ok(
                "input_embedding_backward",
                ops::input_embedding_backward(d0, de, None, &dxb, &tb, &scratch, scale, s),
            );
        };
        let (scratch_r, dx_r, tokens_r) = (&scratch, &dxb, &tb);
        let raw = |slices: usize, grid: u32, shared: bool| {
            move |de: &trm::backend::cuda::Buffer<f32>| {
                embedding_backward_raw(
                    dev,
                    &EmbeddingRaw {
                        dembed: de,
                        dpuzzle: None,
                        partial: scratch_r,
                        dx: dx_r,
                        tokens: tokens_r,
                        scale,
                        shape: [b, t, p, d, v, 0],
                    },
                    slices,
                    grid,
                    shared,
                )
            }
        };
        let want = bits(&launcher);

        // Sanity against an f64 sum (parity proper is embedding_matches_cpu):
        // f32 sums of up to ~700 terms of mixed magnitude, so 1e-4.
        let mut exact = vec![0.5f64; v * d];
        for (row, &tok) in tokens.iter().enumerate() {
            if (0..v as i32).contains(&tok) {
                let (bi, ti) = (row / t, row % t);
                let src = &dx[(bi * (p + t) + p + ti) * d..][..d];
                for (c, &g) in src.iter().enumerate() {
                    exact[tok as usize * d + c] += scale as f64 * g as f64;
                }
            }
        }
        let got: Vec<f32> = want.iter().map(|&x| f32::from_bits(x)).collect();
        assert_close(&what, &got, &exact, 1e-4, 1e-4);

        let reversed = EmuOptions {
            reverse_order: true,
            ..EmuOptions::default()
        };
        let runs: Vec<(String, Vec<u32>)> = vec![
            (
                "reverse order".into(),
                emu::with_options(reversed, || bits(&launcher)),
            ),
            ("again".into(), bits(&launcher)),
            ("grid 1".into(), bits(&raw(slices, 1, false))),
            ("grid 3, shared".into(), bits(&raw(slices, 3, true))),
            (
                format!("grid {slices}, scratch"),
                bits(&raw(slices, slices as u32, false)),
            ),
            (
                format!("grid {slices}, shared"),
                bits(&raw(slices, slices as u32, true)),
            ),
        ];
        for (how, got) in runs {
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                diff, 0,
                "{what}: {how}: {diff} elements differ in their bits"
            );
        }
        // Another slice count is another summation order: other bits, so the
        // equalities above are not luck of the data.
        let other = bits(&raw(slices - 1, slices as u32, false));
        assert_ne!(
            other, want,
            "{what}: the data do not tell summation orders apart"
        );
    }
}

on_both!(
    embedding_backward_deterministic_emu,
    embedding_backward_deterministic_gpu,
    embedding_backward_is_deterministic
);

/// The slice rule of the backward's scratch (ops/embedding.rs): at least
/// max(64, V) rows a slice, at most 256 slices and 64 MiB, at least one.
#[test]
fn embedding_scratch_len_follows_the_rule() {
    use trm::backend::cuda::ops::{input_embedding_backward_scratch_len, EmbeddingShape};
    let len = |b, t, d, v| {
        input_embedding_backward_scratch_len(&EmbeddingShape {
            b,
            t,
            p: 1,
            d,
            v,
            ndim: 0,
            num_puzzle_ids: 0,
        })
    };
    assert_eq!(len(2, 5, 8, 12), 12 * 8, "10 rows: one slice");
    assert_eq!(len(0, 5, 8, 12), 12 * 8, "no rows: still one slice");
    assert_eq!(len(1, 81, 512, 12), 2 * 12 * 512, "81 rows: 2 slices of 64");
    assert_eq!(
        len(768, 81, 512, 12),
        256 * 12 * 512,
        "972 slices of 64 capped at 256"
    );
    assert_eq!(len(10, 100, 8, 100), 10 * 100 * 8, "slices of V = 100 rows");
    assert_eq!(
        len(1000, 100, 8192, 32),
        64 * 32 * 8192,
        "1 MiB tables: 64 slices fill the 64 MiB"
    );
    assert_eq!(
        len(4, 100, 1 << 20, 32),
        32 << 20,
        "a table over 64 MiB: one slice"
    );
}

/// A scratch shorter than the rule's is a shape error naming it, and
/// nothing runs; the exact length works.
fn embedding_scratch_too_short(dev: &Dev) {
    use trm::backend::cuda::{ops, CudaError};
    let s = ops::EmbeddingShape {
        b: 2,
        t: 100,
        p: 1,
        d: 16,
        v: 12,
        ndim: 0,
        num_puzzle_ids: 0,
    };
    let len = ops::input_embedding_backward_scratch_len(&s);
    assert_eq!(len, 4 * 12 * 16, "200 rows: 4 slices of 64");
    let tokens = dev.upload(&vec![5i32; s.b * s.t]);
    let dx = dev.upload(&vec![bf16::ONE; s.b * (s.p + s.t) * s.d]);
    let dembed = dev.zeros::<f32>(s.v * s.d);
    let short = dev.zeros::<f32>(len - 1);
    let e =
        ops::input_embedding_backward(dev.device(), &dembed, None, &dx, &tokens, &short, 2.0, s)
            .unwrap_err();
    match &e {
        CudaError::Shape(m) => assert!(
            m.contains("scratch") && m.contains(&format!("needs {len}")),
            "{m}"
        ),
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert!(
        dev.download(&dembed).iter().all(|&x| x == 0.0),
        "ran anyway"
    );
    let scratch = dev.zeros::<f32>(len);
    dev.ok(
        "input_embedding_backward",
        ops::input_embedding_backward(dev.device(), &dembed, None, &dx, &tokens, &scratch, 2.0, s),
    );
    // Id 5 gets 200 rows of 2 * 1 in every column, the other ids nothing.
    let got = dev.download(&dembed);
    for (i, &x) in got.iter().enumerate() {
        let want = if i / s.d == 5 { 400.0 } else { 0.0 };
        assert_eq!(x, want, "dembed[{i}]");
    }
}

on_both!(
    embedding_scratch_too_short_emu,
    embedding_scratch_too_short_gpu,
    embedding_scratch_too_short
);

// ---------------------------------------------------------------------------
// optim

/// AdamATan2 per docs/optimizer.md in f64; returns the host scalars too.
struct AdamRef {
    w: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

const LR: f64 = 1e-3;
const WD: f64 = 0.1;
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.95;

impl AdamRef {
    fn step(&mut self, g: &[f32], t: i32) {
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        for i in 0..self.w.len() {
            let g = g[i] as f64;
            self.w[i] *= 1.0 - LR * WD;
            self.m[i] += (1.0 - BETA1) * (g - self.m[i]);
            self.v[i] += (1.0 - BETA2) * (g * g - self.v[i]);
            self.w[i] -= (LR / bc1) * self.m[i].atan2(self.v[i].sqrt() / bc2.sqrt());
        }
    }
}

fn adam_atan2_matches_f64(dev: &Dev) {
    let mut r = rng(8);
    for (n, off) in [(1003usize, 0usize), (37, 1), (8, 0)] {
        let w0 = uniform(&mut r, n, 1.0);
        let mut reference = AdamRef {
            w: f64s(&w0),
            m: vec![0.0; n],
            v: vec![0.0; n],
        };
        let pad = |v: &[f32]| {
            let mut p = vec![0.0f32; off];
            p.extend_from_slice(v);
            p
        };
        let wb = dev.upload(&pad(&w0));
        let mb = dev.zeros::<f32>(n + off);
        let vb = dev.zeros::<f32>(n + off);
        let hb = dev.zeros::<bf16>(n + off);
        for t in 1..=3 {
            let mut g = uniform(&mut r, n, 0.1);
            g[0] = 0.0; // atan2(0, 0) = 0 at t = 1
            g[n / 2] *= 1e-6;
            reference.step(&g, t);
            let gb = dev.upload(&pad(&g));
            let bc1 = 1.0 - BETA1.powi(t);
            let bc2 = 1.0 - BETA2.powi(t);
            dev.run(
                ADAM_ATAN2_F32,
                grid_for(n / 4 + 1, 64, 3),
                &AdamAtan2Args {
                    w: dev.ptr(&wb, off),
                    m: dev.ptr(&mb, off),
                    v: dev.ptr(&vb, off),
                    g: dev.cptr(&gb, off),
                    w_bf16: dev.ptr(&hb, off),
                    n: n as i64,
                    decay: (1.0 - LR * WD) as f32,
                    one_minus_beta1: (1.0 - BETA1) as f32,
                    one_minus_beta2: (1.0 - BETA2) as f32,
                    step_size: (LR / bc1) as f32,
                    sqrt_bc2: bc2.sqrt() as f32,
                },
            );
            let what = format!("adam_atan2 n {n} offset {off} step {t}");
            let w = dev.download(&wb)[off..].to_vec();
            assert_close(&format!("{what}: w"), &w, &reference.w, 1e-6, 1e-5 * LR);
            assert_close(
                &format!("{what}: m"),
                &dev.download(&mb)[off..],
                &reference.m,
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("{what}: v"),
                &dev.download(&vb)[off..],
                &reference.v,
                1e-5,
                1e-6,
            );
            let h = dev.download(&hb);
            for i in 0..n {
                assert_eq!(h[off + i], bf16::from_f32(w[i]), "{what}: bf16 copy {i}");
            }
        }
    }
}

on_both!(adam_atan2_emu, adam_atan2_gpu, adam_atan2_matches_f64);

fn puzzle_sign_sgd_matches_f64(dev: &Dev) {
    let mut r = rng(9);
    let (lr, wd) = (1e-2f64, 0.1f64);
    for (d, block) in [(5usize, 32u32), (600, 256), (1300, 256)] {
        let num_ids = 8usize;
        let ids = [3, 1, 3, 7, 1, 3, 0, 9, -1];
        let n = ids.len();
        let table0 = uniform(&mut r, num_ids * d, 1.0);
        let mut grad = uniform(&mut r, n * d, 1.0);
        // column 2 of id 1 sums to exactly zero: sign(0) = 0, decay only
        grad[d + 2] = 0.5;
        grad[4 * d + 2] = -0.5;
        let mut want = f64s(&table0);
        let mut seen = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            if id < 0 || id as usize >= num_ids || seen.contains(&id) {
                continue;
            }
            seen.push(id);
            let id = id as usize;
            for c in 0..d {
                // the kernel sums in f32 in row order; so does this
                let mut g = 0.0f32;
                for (j, &other) in ids.iter().enumerate().skip(i) {
                    if other == id as i32 {
                        g += grad[j * d + c];
                    }
                }
                let sign = if g > 0.0 {
                    1.0
                } else if g < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                want[id * d + c] = want[id * d + c] * (1.0 - lr * wd) - lr * sign;
            }
        }
        let tb = dev.upload(&table0);
        let gb = dev.upload(&grad);
        let ib = dev.upload(&ids[..]);
        dev.run(
            PUZZLE_SIGN_SGD_F32,
            LaunchConfig::linear(4, block, 0),
            &PuzzleSignSgdArgs {
                table: dev.ptr(&tb, 0),
                grad: dev.cptr(&gb, 0),
                ids: dev.cptr(&ib, 0),
                N: n as i32,
                D: d as i32,
                num_ids: num_ids as i32,
                lr: lr as f32,
                decay: (1.0 - lr * wd) as f32,
            },
        );
        let got = dev.download(&tb);
        let what = format!("puzzle_sign_sgd D {d}");
        assert_close(&what, &got, &want, 1e-6, 1e-7);
        // rows of ids not in the batch are untouched, bit for bit
        for id in [2usize, 4, 5, 6] {
            assert_eq!(
                &got[id * d..(id + 1) * d],
                &table0[id * d..(id + 1) * d],
                "{what}: row {id}"
            );
        }
        let decayed = (table0[d + 2] as f64) * (1.0 - lr * wd);
        assert!(
            ((got[d + 2] as f64) - decayed).abs() < 1e-6,
            "{what}: sign(0) must not step"
        );
    }
}

on_both!(
    puzzle_sign_sgd_emu,
    puzzle_sign_sgd_gpu,
    puzzle_sign_sgd_matches_f64
);

fn ema_matches_f64(dev: &Dev) {
    let mut r = rng(10);
    let rate = 0.999f64;
    for (n, off) in [(1001usize, 0usize), (13, 3)] {
        let shadow0 = uniform(&mut r, n + off, 1.0);
        let w = uniform(&mut r, n + off, 1.0);
        let sb = dev.upload(&shadow0);
        let wb = dev.upload(&w);
        dev.run(
            EMA_F32,
            grid_for(n / 4 + 1, 64, 2),
            &EmaArgs {
                shadow: dev.ptr(&sb, off),
                w: dev.cptr(&wb, off),
                n: n as i64,
                rate: rate as f32,
                one_minus_rate: (1.0 - rate) as f32,
            },
        );
        let want: Vec<f64> = (off..n + off)
            .map(|i| (1.0 - rate) * w[i] as f64 + rate * shadow0[i] as f64)
            .collect();
        let got = dev.download(&sb);
        assert_close(&format!("ema n {n}"), &got[off..], &want, 1e-6, 1e-7);
        assert_eq!(&got[..off], &shadow0[..off], "ema wrote before its start");
    }
}

on_both!(ema_emu, ema_gpu, ema_matches_f64);
