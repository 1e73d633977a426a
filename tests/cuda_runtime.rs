//! The CUDA runtime: the probe and its errors, the typed launchers of
//! `backend::cuda::ops` (one per kernel) and the GEMMs on strided views of
//! `backend::cuda::gemm`, each on the emulator target always and on GPU 0
//! when there is one (`tests/device`).
//!
//! Tolerances: bf16 outputs relative 1e-2 plus 1e-2 of the largest magnitude
//! (as tests/kernel_ops.rs: 8 significant bits, roundings where the bf16
//! reference rounds); f32 outputs of f32 math relative 1e-5. GEMMs against an
//! f64 product of the same bf16 inputs: |got - want| <= 2^-8 |want| (one bf16
//! rounding of the output, bf16 outputs only) + 1e-4 * sum_k |a_ik b_kj|
//! (f32 accumulation over K <= 2048 terms in any order or split: K * 2^-24
//! = 1.2e-4 at worst, far less in practice).

use half::bf16;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use trm::backend::cpu::{embedding, rmsnorm, rope, stablemax_ce, swiglu};
use trm::backend::cuda::{gemm, ops, runtime, Buffer, CudaError, Device, Elem, GemmOut, MatRef};

mod device;
use device::{rng, to_bf16, to_f32, uniform, Dev};

/// Values exactly representable in bf16.
fn bf16_values(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    to_f32(&to_bf16(&uniform(r, n, scale)))
}

/// |got - want| <= rtol |want| + atol_frac max|want|, element-wise.
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f64, atol_frac: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let allowed = rtol * w.abs() + atol_frac * scale;
        assert!(
            (g - w).abs() <= allowed,
            "{what}: element {i}: got {g}, want {w} (allowed {allowed:.3e})"
        );
    }
}

// ---------------------------------------------------------------------------
// probe and errors

#[test]
fn probe_without_gpu_is_a_typed_error() {
    match runtime::probe() {
        Ok(devices) => {
            // A machine with a GPU: the probe lists it and a bad ordinal is
            // still a typed error.
            assert!(!devices.is_empty());
            eprintln!("probe: {devices:?}");
            match Device::gpu(devices.len() + 7) {
                Err(CudaError::NoDevice(m)) => assert!(m.contains("requested"), "{m}"),
                other => panic!("expected NoDevice for a missing ordinal, got {other:?}"),
            }
        }
        Err(e) => {
            assert!(
                matches!(e, CudaError::NoDevice(_)),
                "expected NoDevice, got {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.starts_with("no CUDA device: "), "{msg}");
            assert!(msg.contains("CPU backend"), "{msg}");
            // Requesting a GPU fails the same way, without a panic.
            assert!(matches!(Device::gpu(0), Err(CudaError::NoDevice(_))));
            assert!(matches!(
                runtime::device_count(),
                Err(CudaError::NoDevice(_))
            ));
            if !runtime::driver_library_present() {
                assert!(msg.contains("libcuda"), "{msg}");
            }
        }
    }
}

#[test]
fn kernels_missing_says_how_to_build_them() {
    let msg = CudaError::KernelsMissing.to_string();
    assert!(msg.contains("without nvcc"), "{msg}");
    assert!(msg.contains("tools/install-nvcc.sh"), "{msg}");
    assert!(msg.contains("NVCC="), "{msg}");
    if trm::backend::cuda::kernels_compiled() {
        assert!(!trm::backend::cuda::embedded_modules().unwrap().is_empty());
    } else {
        assert!(matches!(
            trm::backend::cuda::embedded_modules(),
            Err(CudaError::KernelsMissing)
        ));
        assert!(matches!(
            trm::backend::cuda::module("rmsnorm"),
            Err(CudaError::KernelsMissing)
        ));
    }
}

#[test]
fn launchers_reject_short_buffers() {
    let dev = Device::Emu;
    let x = dev.upload(&[bf16::ONE; 10]).unwrap();
    let y = dev.zeros::<bf16>(9).unwrap();
    let rstd = dev.zeros::<f32>(2).unwrap();
    let e = ops::rmsnorm_forward(&dev, &y, &rstd, &x, None, 2, 5, 1e-5).unwrap_err();
    assert!(
        matches!(&e, CudaError::Shape(m) if m.contains("rmsnorm_forward: y")),
        "{e}"
    );
    let e = gemm::linear_forward(
        &dev,
        GemmOut::Bf16(MatRef::new(&y, 3, 3)),
        MatRef::new(&x, 3, 5),
        MatRef::new(&x, 3, 5),
        false,
    )
    .unwrap_err();
    assert!(
        matches!(&e, CudaError::Shape(m) if m.contains("linear_forward")),
        "{e}"
    );
    assert!(matches!(x.ptr_at(11), Err(CudaError::Shape(_))));
    let e =
        ops::stablemax_ce_forward(&dev, &x, None, ops::CeOutputs::default(), 1, 1, 40).unwrap_err();
    assert!(e.to_string().contains("vocabulary 40"), "{e}");
}

// ---------------------------------------------------------------------------
// launchers vs the CPU reference

fn cast_and_fill(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(11);
    let x = uniform(&mut r, 1003, 100.0);
    let xb = dev.upload(&x);
    let yb = dev.zeros::<bf16>(1003);
    dev.ok("cast_f32_to_bf16", ops::cast_f32_to_bf16(d, &yb, &xb));
    let y = dev.download(&yb);
    assert_eq!(y, to_bf16(&x));
    let back = dev.zeros::<f32>(1003);
    dev.ok("cast_bf16_to_f32", ops::cast_bf16_to_f32(d, &back, &yb));
    assert_eq!(dev.download(&back), to_f32(&y));
    dev.ok("fill_f32", ops::fill_f32(d, &back, -1.5));
    assert!(dev.download(&back).iter().all(|&v| v == -1.5));
    dev.ok("fill_bf16", ops::fill_bf16(d, &yb, bf16::from_f32(0.25)));
    assert!(dev.download(&yb).iter().all(|&v| v.to_f32() == 0.25));
    dev.ok("zero", d.zero(&yb));
    assert!(dev.download(&yb).iter().all(|&v| v.to_f32() == 0.0));
}
on_both!(cast_launchers_emu, cast_launchers_gpu, cast_and_fill);

fn rmsnorm_launchers(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(12);
    let (m, w) = (37usize, 512usize);
    let x = bf16_values(&mut r, m * w, 2.0);
    let res = bf16_values(&mut r, m * w, 2.0);
    let dy = bf16_values(&mut r, m * w, 1.0);
    let mut y_ref = vec![0.0f32; m * w];
    let mut rstd_ref = vec![0.0f32; m];
    rmsnorm::rmsnorm_forward(&mut y_ref, &mut rstd_ref, &x, Some(&res), w, 1e-5);
    let mut dx_ref = dy.clone();
    rmsnorm::rmsnorm_backward(&mut dx_ref, &y_ref, &rstd_ref, w);

    let (xb, rb, dyb) = (
        dev.upload(&to_bf16(&x)),
        dev.upload(&to_bf16(&res)),
        dev.upload(&to_bf16(&dy)),
    );
    let yb = dev.zeros::<bf16>(m * w);
    let rstd = dev.zeros::<f32>(m);
    dev.ok(
        "rmsnorm_forward",
        ops::rmsnorm_forward(d, &yb, &rstd, &xb, Some(&rb), m, w, 1e-5),
    );
    assert_close("rmsnorm y", &to_f32(&dev.download(&yb)), &y_ref, 1e-2, 1e-2);
    assert_close("rmsnorm rstd", &dev.download(&rstd), &rstd_ref, 5e-3, 0.0);
    // in place: dx over dy
    dev.ok(
        "rmsnorm_backward",
        ops::rmsnorm_backward(d, &dyb, &dyb, &yb, &rstd, m, w),
    );
    assert_close(
        "rmsnorm dx",
        &to_f32(&dev.download(&dyb)),
        &dx_ref,
        1e-2,
        1e-2,
    );
}
on_both!(
    rmsnorm_launchers_emu,
    rmsnorm_launchers_gpu,
    rmsnorm_launchers
);

fn swiglu_launchers(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(13);
    let (m, f) = (9usize, 1536usize);
    let gu = bf16_values(&mut r, m * 2 * f, 6.0);
    let da = bf16_values(&mut r, m * f, 1.0);
    let mut a_ref = vec![0.0f32; m * f];
    swiglu::swiglu_forward(&mut a_ref, &gu, f);
    let mut dgu_ref = vec![0.0f32; m * 2 * f];
    swiglu::swiglu_backward(&mut dgu_ref, &da, &gu, f);
    let gub = dev.upload(&to_bf16(&gu));
    let ab = dev.zeros::<bf16>(m * f);
    dev.ok("swiglu_forward", ops::swiglu_forward(d, &ab, &gub, m, f));
    assert_close("swiglu a", &to_f32(&dev.download(&ab)), &a_ref, 1e-2, 1e-2);
    let dab = dev.upload(&to_bf16(&da));
    let dgub = dev.zeros::<bf16>(m * 2 * f);
    dev.ok(
        "swiglu_backward",
        ops::swiglu_backward(d, &dgub, &dab, &gub, m, f),
    );
    assert_close(
        "swiglu dgu",
        &to_f32(&dev.download(&dgub)),
        &dgu_ref,
        1e-2,
        1e-2,
    );
}
on_both!(swiglu_launchers_emu, swiglu_launchers_gpu, swiglu_launchers);

fn rope_launchers(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(14);
    let shape = ops::RopeShape {
        batch: 2,
        seq: 9,
        heads: 4,
        head_dim: 64,
    };
    let tables = rope::rope_tables::<f32>(shape.seq, shape.head_dim, 10000.0);
    let n = shape.batch * shape.seq * 3 * shape.heads * shape.head_dim;
    let x = bf16_values(&mut r, n, 2.0);
    let (cos, sin) = (dev.upload(&tables.cos), dev.upload(&tables.sin));
    let mut fwd = x.clone();
    rope::rope_forward(&mut fwd, &tables, shape.heads);
    let mut bwd = x.clone();
    rope::rope_backward(&mut bwd, &tables, shape.heads);
    let q = dev.upload(&to_bf16(&x));
    dev.ok("rope_forward", ops::rope_forward(d, &q, &cos, &sin, shape));
    assert_close("rope forward", &to_f32(&dev.download(&q)), &fwd, 1e-2, 1e-2);
    let q = dev.upload(&to_bf16(&x));
    dev.ok(
        "rope_backward",
        ops::rope_backward(d, &q, &cos, &sin, shape),
    );
    assert_close(
        "rope backward",
        &to_f32(&dev.download(&q)),
        &bwd,
        1e-2,
        1e-2,
    );
}
on_both!(rope_launchers_emu, rope_launchers_gpu, rope_launchers);

fn stablemax_launchers(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(15);
    let (b, t, v) = (3usize, 50usize, 12usize);
    let ignore = stablemax_ce::IGNORE_LABEL;
    let logits = bf16_values(&mut r, b * t * v, 4.0);
    let labels: Vec<i32> = (0..b * t)
        .map(|_| {
            if r.gen_bool(0.3) {
                ignore
            } else {
                r.gen_range(0..v as i32)
            }
        })
        .collect();
    let mut loss_ref = vec![0.0f64; b * t];
    stablemax_ce::stablemax_ce_forward(&mut loss_ref, &logits, &labels, v);
    let mut count = vec![0i32; b];
    for (i, &l) in labels.iter().enumerate() {
        count[i / t] += (l != ignore) as i32;
    }
    let grad_scale = 0.5f32;
    let dloss: Vec<f64> = (0..b * t)
        .map(|i| grad_scale as f64 / count[i / t].max(1) as f64)
        .collect();
    let mut dlogits_ref = vec![0.0f32; b * t * v];
    stablemax_ce::stablemax_ce_backward(&mut dlogits_ref, &dloss, &logits, &labels, v);

    let lb = dev.upload(&to_bf16(&logits));
    let labb = dev.upload(&labels);
    let loss = dev.zeros::<f32>(b * t);
    let countb = dev.zeros::<i32>(b);
    let out = ops::CeOutputs {
        loss: Some(&loss),
        count: Some(&countb),
        ..Default::default()
    };
    dev.ok(
        "stablemax_ce_forward",
        ops::stablemax_ce_forward(d, &lb, Some(&labb), out, b, t, v),
    );
    let want: Vec<f32> = loss_ref.iter().map(|&x| x as f32).collect();
    assert_close("stablemax loss", &dev.download(&loss), &want, 1e-5, 1e-6);
    assert_eq!(dev.download(&countb), count);
    let dl = dev.zeros::<bf16>(b * t * v);
    dev.ok(
        "stablemax_ce_backward",
        ops::stablemax_ce_backward(d, &dl, &lb, &labb, &countb, grad_scale, b, t, v),
    );
    assert_close(
        "stablemax dlogits",
        &to_f32(&dev.download(&dl)),
        &dlogits_ref,
        1e-2,
        1e-2,
    );

    // Q head: BCE of q_halt against seq_correct, q_continue against a target.
    let q = uniform(&mut r, 2 * b, 3.0);
    let seq = vec![1i32, 0, 1];
    let target = uniform(&mut r, b, 0.5)
        .iter()
        .map(|x| x + 0.5)
        .collect::<Vec<_>>();
    let (qb, sb, tb) = (dev.upload(&q), dev.upload(&seq), dev.upload(&target));
    let lossq = dev.zeros::<f32>(2 * b);
    dev.ok(
        "q_bce_forward",
        ops::q_bce_forward(d, &lossq, &qb, &sb, Some(&tb), b),
    );
    let dq = dev.zeros::<f32>(2 * b);
    dev.ok(
        "q_bce_backward",
        ops::q_bce_backward(d, &dq, &qb, &sb, Some(&tb), 2.0, b),
    );
    let (mut lw, mut dw) = (vec![0.0f32; 2 * b], vec![0.0f32; 2 * b]);
    for i in 0..b {
        let y = [seq[i] as f32, target[i]];
        for j in 0..2 {
            lw[2 * i + j] = stablemax_ce::bce_with_logits_forward(q[2 * i + j], y[j]);
            dw[2 * i + j] = 2.0 * stablemax_ce::bce_with_logits_backward(q[2 * i + j], y[j]);
        }
    }
    assert_close("q bce loss", &dev.download(&lossq), &lw, 1e-5, 1e-6);
    assert_close("q bce dq", &dev.download(&dq), &dw, 1e-5, 1e-6);
}
on_both!(
    stablemax_launchers_emu,
    stablemax_launchers_gpu,
    stablemax_launchers
);

fn embedding_launchers(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(16);
    let s = ops::EmbeddingShape {
        b: 2,
        t: 30,
        p: 2,
        d: 64,
        v: 12,
        ndim: 100,
        num_puzzle_ids: 5,
    };
    let scale = (s.d as f32).sqrt();
    let table = bf16_values(&mut r, s.v * s.d, 1.0);
    let tokens: Vec<i32> = (0..s.b * s.t).map(|_| r.gen_range(0..s.v as i32)).collect();
    let pemb = uniform(&mut r, s.num_puzzle_ids * s.ndim, 1.0);
    let pids = vec![3i32, 0];
    let rows = s.p + s.t;
    // Reference: the token rows through the CPU op, the puzzle rows by hand.
    let mut x_ref = vec![0.0f32; s.b * rows * s.d];
    for bi in 0..s.b {
        let base = bi * rows * s.d;
        for k in 0..s.ndim {
            let v = bf16::from_f32(pemb[pids[bi] as usize * s.ndim + k]).to_f32();
            x_ref[base + k] = v * scale;
        }
        embedding::embedding_forward(
            &mut x_ref[base + s.p * s.d..base + rows * s.d],
            &table,
            &tokens[bi * s.t..(bi + 1) * s.t],
            s.d,
            scale,
        );
    }
    let (tb, tokb) = (dev.upload(&to_bf16(&table)), dev.upload(&tokens));
    let (pe, pi) = (dev.upload(&pemb), dev.upload(&pids));
    let xb = dev.zeros::<bf16>(s.b * rows * s.d);
    dev.ok(
        "input_embedding_forward",
        ops::input_embedding_forward(d, &xb, &tb, &tokb, Some((&pe, &pi)), scale, s),
    );
    assert_close(
        "embedding x",
        &to_f32(&dev.download(&xb)),
        &x_ref,
        1e-2,
        1e-2,
    );

    let dx = bf16_values(&mut r, s.b * rows * s.d, 1.0);
    let mut dembed_ref = vec![0.0f32; s.v * s.d];
    let mut dpuzzle_ref = vec![0.0f32; s.b * s.ndim];
    for bi in 0..s.b {
        let base = bi * rows * s.d;
        embedding::embedding_backward(
            &mut dembed_ref,
            &dx[base + s.p * s.d..base + rows * s.d],
            &tokens[bi * s.t..(bi + 1) * s.t],
            s.d,
            scale,
        );
        for k in 0..s.ndim {
            dpuzzle_ref[bi * s.ndim + k] = scale * dx[base + k];
        }
    }
    let dxb = dev.upload(&to_bf16(&dx));
    let de = dev.zeros::<f32>(s.v * s.d);
    let dp = dev.zeros::<f32>(s.b * s.ndim);
    let scratch = dev.zeros::<f32>(ops::input_embedding_backward_scratch_len(&s));
    dev.ok(
        "input_embedding_backward",
        ops::input_embedding_backward(d, &de, Some(&dp), &dxb, &tokb, &scratch, scale, s),
    );
    assert_close(
        "embedding dembed",
        &dev.download(&de),
        &dembed_ref,
        1e-5,
        1e-6,
    );
    assert_close(
        "embedding dpuzzle",
        &dev.download(&dp),
        &dpuzzle_ref,
        1e-6,
        0.0,
    );
}
on_both!(
    embedding_launchers_emu,
    embedding_launchers_gpu,
    embedding_launchers
);

fn optim_launchers(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(17);
    let n = 2053usize;
    let h = ops::AdamAtan2Step {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        step: 1,
    };
    let w0 = uniform(&mut r, n, 1.0);
    let g = uniform(&mut r, n, 0.1);
    // One step from zero moments, in f64 (docs/optimizer.md).
    let want: Vec<f32> = (0..n)
        .map(|i| {
            let (w, g) = (w0[i] as f64, g[i] as f64);
            let m = (1.0 - h.beta1) * g;
            let v = (1.0 - h.beta2) * g * g;
            let (bc1, bc2) = (1.0 - h.beta1, 1.0 - h.beta2);
            (w * (1.0 - h.lr * h.weight_decay) - h.lr / bc1 * m.atan2(v.sqrt() / bc2.sqrt())) as f32
        })
        .collect();
    let (wb, mb, vb, gb) = (
        dev.upload(&w0),
        dev.zeros::<f32>(n),
        dev.zeros::<f32>(n),
        dev.upload(&g),
    );
    let hb = dev.zeros::<bf16>(n);
    dev.ok(
        "adam_atan2",
        ops::adam_atan2(d, &wb, &mb, &vb, &gb, Some(&hb), h),
    );
    let w = dev.download(&wb);
    assert_close("adam w", &w, &want, 1e-6, 1e-5 * h.lr);
    assert_eq!(dev.download(&hb), to_bf16(&w));

    let rate = 0.999;
    let shadow0 = uniform(&mut r, n, 1.0);
    let sb = dev.upload(&shadow0);
    dev.ok("ema", ops::ema(d, &sb, &wb, rate));
    let want: Vec<f32> = (0..n)
        .map(|i| ((1.0 - rate) * w[i] as f64 + rate * shadow0[i] as f64) as f32)
        .collect();
    assert_close("ema", &dev.download(&sb), &want, 1e-6, 1e-7);

    let (rows, width, ids) = (5usize, 300usize, vec![2i32, 0, 2, 7, -1]);
    let table0 = uniform(&mut r, 4 * width, 1.0);
    let grad = uniform(&mut r, rows * width, 1.0);
    let (lr, wd) = (1e-2f64, 0.1f64);
    let mut want: Vec<f32> = table0.clone();
    for id in [0usize, 2] {
        for c in 0..width {
            let gsum: f32 = (0..rows)
                .filter(|&j| ids[j] == id as i32)
                .map(|j| grad[j * width + c])
                .sum();
            want[id * width + c] = (table0[id * width + c] as f64 * (1.0 - lr * wd)
                - lr * gsum.signum() as f64) as f32;
        }
    }
    let (tb, grb, ib) = (dev.upload(&table0), dev.upload(&grad), dev.upload(&ids));
    dev.ok(
        "puzzle_sign_sgd",
        ops::puzzle_sign_sgd(d, &tb, &grb, &ib, rows, width, 4, lr, wd),
    );
    assert_close("puzzle_sign_sgd", &dev.download(&tb), &want, 1e-6, 1e-7);
}
on_both!(optim_launchers_emu, optim_launchers_gpu, optim_launchers);

// ---------------------------------------------------------------------------
// GEMMs

/// `c[i, j] = sum_k a(i, k) b(k, j)` in f64, and the bound's `sum |a b|`.
fn product(
    rows: usize,
    cols: usize,
    inner: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; rows * cols];
    let mut abs = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            for k in 0..inner {
                let p = a(i, k) * b(k, j);
                c[i * cols + j] += p;
                abs[i * cols + j] += p.abs();
            }
        }
    }
    (c, abs)
}

/// `round_base[i]`: the magnitude a bf16 output rounding is relative to.
fn assert_gemm(
    what: &str,
    got: &[f32],
    want: &[f64],
    abs: &[f64],
    round_base: &[f64],
    bf16_out: bool,
) {
    let rel = if bf16_out { 1.0 / 256.0 } else { 0.0 };
    for i in 0..want.len() {
        let allowed = rel * round_base[i] + 1e-4 * abs[i] + 1e-30;
        let err = (got[i] as f64 - want[i]).abs();
        assert!(
            err <= allowed,
            "{what}: element {i}: got {}, want {} (error {err:.3e}, allowed {allowed:.3e})",
            got[i],
            want[i]
        );
    }
}

/// The expected output of a GEMM whose output view started at `init`:
/// `(want, abs, round_base)` for [`assert_gemm`], from the product's `want`
/// and `abs`.
fn expected(
    want: &[f64],
    abs: &[f64],
    init: &[f32],
    accumulate: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    if !accumulate {
        let base = want.iter().map(|w| w.abs()).collect();
        return (want.to_vec(), abs.to_vec(), base);
    }
    // Accumulating into a bf16 output, cuBLASLt on the H200 (13.1) may round
    // the product to bf16 before adding C (seen: 0.87 ulp off): two
    // roundings, of A B and of D.
    (
        want.iter().zip(init).map(|(w, &c)| w + c as f64).collect(),
        abs.iter()
            .zip(init)
            .map(|(a, &c)| a + (c as f64).abs())
            .collect(),
        want.iter()
            .zip(init)
            .map(|(w, &c)| w.abs() + (w + c as f64).abs())
            .collect(),
    )
}

fn gemm_layouts(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(18);
    for (m, k, n) in [(7usize, 5usize, 3usize), (64, 128, 96), (37, 512, 130)] {
        let x = bf16_values(&mut r, m * k, 1.0);
        let w = bf16_values(&mut r, n * k, 1.0);
        let dy = bf16_values(&mut r, m * n, 1.0);
        let (xb, wb, dyb) = (
            dev.upload(&to_bf16(&x)),
            dev.upload(&to_bf16(&w)),
            dev.upload(&to_bf16(&dy)),
        );
        let (xm, wm, dym) = (
            MatRef::new(&xb, m, k),
            MatRef::new(&wb, n, k),
            MatRef::new(&dyb, m, n),
        );
        let xv = |i: usize, j: usize| x[i * k + j] as f64;
        let wv = |i: usize, j: usize| w[i * k + j] as f64;
        let dyv = |i: usize, j: usize| dy[i * n + j] as f64;
        // y = x W^T; dx = dy W; dW = dy^T x
        let (y, y_abs) = product(m, n, k, xv, |kk, j| wv(j, kk));
        let (dx, dx_abs) = product(m, k, n, dyv, wv);
        let (dw, dw_abs) = product(n, k, m, |i, kk| dyv(kk, i), xv);
        let shape = format!("M {m} K {k} N {n}");

        for bf16_out in [false, true] {
            let run =
                |name: &str,
                 (rows, cols): (usize, usize),
                 want: &[f64],
                 abs: &[f64],
                 call: &dyn Fn(GemmOut<'_>, bool) -> Result<(), CudaError>| {
                    let len = rows * cols;
                    let init = uniform(&mut rng(len as u64), len, 1.0);
                    let init = to_f32(&to_bf16(&init));
                    for accumulate in [false, true] {
                        let what =
                            format!("{name} {shape} bf16 out {bf16_out} accumulate {accumulate}");
                        let (want, abs, round_base) = expected(want, abs, &init, accumulate);
                        let got = if bf16_out {
                            let out = dev.upload(&to_bf16(&init));
                            let view = MatRef::new(&out, rows, cols);
                            dev.ok(&what, call(GemmOut::Bf16(view), accumulate));
                            to_f32(&dev.download(&out))
                        } else {
                            let out = dev.upload(&init);
                            let view = MatRef::new(&out, rows, cols);
                            dev.ok(&what, call(GemmOut::F32(view), accumulate));
                            dev.download(&out)
                        };
                        assert_gemm(&what, &got, &want, &abs, &round_base, bf16_out);
                    }
                };
            run("linear_forward", (m, n), &y, &y_abs, &|o, acc| {
                gemm::linear_forward(d, o, xm, wm, acc)
            });
            run("linear_backward_input", (m, k), &dx, &dx_abs, &|o, acc| {
                gemm::linear_backward_input(d, o, dym, wm, acc)
            });
            run("linear_backward_weight", (n, k), &dw, &dw_abs, &|o, acc| {
                gemm::linear_backward_weight(d, o, dym, xm, acc)
            });
        }
    }
}
on_both!(gemm_layouts_emu, gemm_layouts_gpu, gemm_layouts);

/// An empty sum (K = 0) zeroes only the output's view (the buffer may be
/// longer), or leaves it when accumulating.
fn gemm_empty_sum(dev: &Dev) {
    let d = dev.device();
    let (m, n) = (3usize, 4usize);
    let empty = dev.zeros::<bf16>(0);
    let full = dev.upload(&[bf16::ONE; 12]);
    let tail = 5;
    for accumulate in [false, true] {
        let want = |len: usize| -> Vec<f32> {
            (0..len + tail)
                .map(|i| if i < len && !accumulate { 0.0 } else { 7.0 })
                .collect()
        };
        // y [M, N] = x [M, 0] W [N, 0]^T
        let y = dev.upload(&vec![7.0f32; m * n + tail]);
        dev.ok(
            "linear_forward, K = 0",
            gemm::linear_forward(
                d,
                GemmOut::F32(MatRef::new(&y, m, n)),
                MatRef::new(&empty, m, 0),
                MatRef::new(&empty, n, 0),
                accumulate,
            ),
        );
        assert_eq!(
            dev.download(&y),
            want(m * n),
            "forward, accumulate {accumulate}"
        );
        // dx [M, K] = dy [M, 0] W [0, K]
        let dx = dev.upload(&to_bf16(&vec![7.0f32; m * n + tail]));
        dev.ok(
            "linear_backward_input, N = 0",
            gemm::linear_backward_input(
                d,
                GemmOut::Bf16(MatRef::new(&dx, m, n)),
                MatRef::new(&empty, m, 0),
                MatRef::new(&empty, 0, n),
                accumulate,
            ),
        );
        assert_eq!(
            to_f32(&dev.download(&dx)),
            want(m * n),
            "input, accumulate {accumulate}"
        );
        // dW [N, K] = dy [0, N]^T x [0, K]
        let dw = dev.upload(&vec![7.0f32; m * n + tail]);
        dev.ok(
            "linear_backward_weight, M = 0",
            gemm::linear_backward_weight(
                d,
                GemmOut::F32(MatRef::new(&dw, n, m)),
                MatRef::new(&empty, 0, n),
                MatRef::new(&full, 0, m),
                accumulate,
            ),
        );
        assert_eq!(
            dev.download(&dw),
            want(m * n),
            "weight, accumulate {accumulate}"
        );
    }
}
on_both!(gemm_empty_sum_emu, gemm_empty_sum_gpu, gemm_empty_sum);

/// Where a row-major `[rows, cols]` view with leading dimension `cols + gap`
/// sits in a buffer of `len` elements: from `offset`, with `tail` more
/// elements after its last row.
#[derive(Debug, Clone, Copy)]
struct Layout {
    offset: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    len: usize,
}

impl Layout {
    fn new(offset: usize, (rows, cols): (usize, usize), gap: usize, tail: usize) -> Layout {
        let ld = cols + gap;
        let span = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        Layout {
            offset,
            rows,
            cols,
            ld,
            len: offset + span + tail,
        }
    }
    /// The buffer index of element (r, c).
    fn at(&self, r: usize, c: usize) -> usize {
        self.offset + r * self.ld + c
    }
    /// Whether buffer index `i` is an element of the view.
    fn inside(&self, i: usize) -> bool {
        i >= self.offset
            && (i - self.offset) / self.ld < self.rows
            && (i - self.offset) % self.ld < self.cols
    }
    fn view<'a, T: Elem>(&self, buf: &'a Buffer<T>) -> MatRef<'a, T> {
        MatRef::strided(buf, self.offset, self.rows, self.cols, self.ld)
    }
    /// The view's elements of `buf`, row-major.
    fn read(&self, buf: &[f32]) -> Vec<f32> {
        (0..self.rows)
            .flat_map(|r| (0..self.cols).map(move |c| buf[self.at(r, c)]))
            .collect()
    }
}

/// Every element of `got` outside `view` still holds its `start` value
/// (bit for bit).
fn assert_outside(what: &str, got: &[f32], start: &[f32], view: &Layout) {
    assert_eq!(got.len(), start.len(), "{what}: length");
    for (i, (g, s)) in got.iter().zip(start).enumerate() {
        if !view.inside(i) {
            assert_eq!(
                g.to_bits(),
                s.to_bits(),
                "{what}: element {i} outside the output view changed: {g} (was {s})"
            );
        }
    }
}

/// A value no GEMM here produces, set around the output views.
const SENTINEL: f32 = -7.5;

/// `matmul` on strided views: every operand at an offset with ld > cols,
/// all four transpose combinations, f32 and bf16 outputs, with and without
/// accumulation. The operands' buffers hold other values around their views
/// (which must not enter the product); the output's gaps between rows and
/// the rest of its buffer keep the sentinel.
fn gemm_strided_views(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(21);
    for (m, k, n) in [(5usize, 7usize, 6usize), (33, 96, 40)] {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            // Stored shapes: op(a) is [M, K], op(b) is [K, N].
            let la = Layout::new(3, if trans_a { (k, m) } else { (m, k) }, 5, 4);
            let lb = Layout::new(11, if trans_b { (n, k) } else { (k, n) }, 2, 1);
            let a = bf16_values(&mut r, la.len, 1.0);
            let b = bf16_values(&mut r, lb.len, 1.0);
            let (ab, bb) = (dev.upload(&to_bf16(&a)), dev.upload(&to_bf16(&b)));
            let av = |i: usize, kk: usize| {
                let at = if trans_a { la.at(kk, i) } else { la.at(i, kk) };
                a[at] as f64
            };
            let bv = |kk: usize, j: usize| {
                let at = if trans_b { lb.at(j, kk) } else { lb.at(kk, j) };
                b[at] as f64
            };
            let (want, abs) = product(m, n, k, av, bv);
            let lc = Layout::new(4, (m, n), 3, 5);
            for bf16_out in [false, true] {
                for accumulate in [false, true] {
                    let what = format!(
                        "matmul M {m} K {k} N {n} trans_a {trans_a} trans_b {trans_b} \
                         bf16 out {bf16_out} accumulate {accumulate}"
                    );
                    // The view starts at `init`, everything else at the sentinel.
                    let init = bf16_values(&mut r, m * n, 1.0);
                    let mut start = vec![SENTINEL; lc.len];
                    for i in 0..m {
                        for j in 0..n {
                            start[lc.at(i, j)] = init[i * n + j];
                        }
                    }
                    let (want, abs, base) = expected(&want, &abs, &init, accumulate);
                    let (av, bv) = (la.view(&ab), lb.view(&bb));
                    let got = if bf16_out {
                        let out = dev.upload(&to_bf16(&start));
                        let c = GemmOut::Bf16(lc.view(&out));
                        let res = gemm::matmul(d, c, av, trans_a, bv, trans_b, accumulate);
                        dev.ok(&what, res);
                        to_f32(&dev.download(&out))
                    } else {
                        let out = dev.upload(&start);
                        let c = GemmOut::F32(lc.view(&out));
                        let res = gemm::matmul(d, c, av, trans_a, bv, trans_b, accumulate);
                        dev.ok(&what, res);
                        dev.download(&out)
                    };
                    assert_gemm(&what, &lc.read(&got), &want, &abs, &base, bf16_out);
                    assert_outside(&what, &got, &start, &lc);
                }
            }
        }
    }
}
on_both!(
    gemm_strided_views_emu,
    gemm_strided_views_gpu,
    gemm_strided_views
);

/// The Q head's GEMMs as the engine issues them: `q [B, 2] = x0 w^T` with
/// x0 the first position of each sample of a [B, S, D] activation buffer
/// (ld S * D) and w [2, D] at an offset of a flat weight buffer; backward,
/// `dw += dq^T x0` into a flat f32 gradient buffer at that offset, and
/// `dx0 = dq w` into the first position of each sample of a [B, S, D]
/// gradient buffer, whose other positions keep their values.
fn gemm_q_head(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(22);
    let (b, s, dm) = (3usize, 5usize, 64usize);
    // Other tensors before and after the head's weight in the flat buffer.
    let w_off = 1000;
    let flat_len = w_off + 2 * dm + 77;
    let x = bf16_values(&mut r, b * s * dm, 1.0);
    let flat = bf16_values(&mut r, flat_len, 0.5);
    let dq = bf16_values(&mut r, b * 2, 1.0);
    let (xb, flatb, dqb) = (
        dev.upload(&to_bf16(&x)),
        dev.upload(&to_bf16(&flat)),
        dev.upload(&to_bf16(&dq)),
    );
    let x0 = MatRef::strided(&xb, 0, b, dm, s * dm);
    let w = MatRef::at(&flatb, w_off, 2, dm);
    let xv = |i: usize, c: usize| x[i * s * dm + c] as f64;
    let wv = |j: usize, c: usize| flat[w_off + j * dm + c] as f64;
    let dqv = |i: usize, j: usize| dq[i * 2 + j] as f64;

    // Forward, into a fresh f32 [B, 2].
    let (want, abs) = product(b, 2, dm, xv, |c, j| wv(j, c));
    let q = dev.upload(&vec![SENTINEL; b * 2]);
    dev.ok(
        "q head forward",
        gemm::linear_forward(d, GemmOut::F32(MatRef::new(&q, b, 2)), x0, w, false),
    );
    let base: Vec<f64> = want.iter().map(|v| v.abs()).collect();
    assert_gemm(
        "q head forward",
        &dev.download(&q),
        &want,
        &abs,
        &base,
        false,
    );

    // Weight gradient, summed into the flat gradient buffer.
    let g0 = bf16_values(&mut r, flat_len, 1.0);
    let lg = Layout::new(w_off, (2, dm), 0, 77);
    let (want, abs) = product(2, dm, b, |j, i| dqv(i, j), xv);
    let (want, abs, base) = expected(&want, &abs, &lg.read(&g0), true);
    let grads = dev.upload(&g0);
    dev.ok(
        "q head dw",
        gemm::linear_backward_weight(
            d,
            GemmOut::F32(MatRef::at(&grads, w_off, 2, dm)),
            MatRef::new(&dqb, b, 2),
            x0,
            true,
        ),
    );
    let got = dev.download(&grads);
    assert_gemm("q head dw", &lg.read(&got), &want, &abs, &base, false);
    assert_outside("q head dw", &got, &g0, &lg);

    // Input gradient, bf16, into position 0 of each sample.
    let start = vec![SENTINEL; b * s * dm];
    let lx = Layout::new(0, (b, dm), (s - 1) * dm, (s - 1) * dm);
    let (want, abs) = product(b, dm, 2, dqv, wv);
    let base: Vec<f64> = want.iter().map(|v| v.abs()).collect();
    let dx = dev.upload(&to_bf16(&start));
    dev.ok(
        "q head dx",
        gemm::linear_backward_input(
            d,
            GemmOut::Bf16(MatRef::strided(&dx, 0, b, dm, s * dm)),
            MatRef::new(&dqb, b, 2),
            w,
            false,
        ),
    );
    let got = to_f32(&dev.download(&dx));
    assert_gemm("q head dx", &lx.read(&got), &want, &abs, &base, true);
    assert_outside("q head dx", &got, &start, &lx);
}
on_both!(gemm_q_head_emu, gemm_q_head_gpu, gemm_q_head);

/// An empty sum on a strided output view sets only the view's elements to
/// zero (not the gaps between its rows, not the rest of the buffer), and
/// changes nothing when accumulating; every transpose combination, f32 and
/// bf16 outputs.
fn gemm_empty_sum_view(dev: &Dev) {
    let d = dev.device();
    let (m, n) = (4usize, 3usize);
    let lc = Layout::new(2, (m, n), 4, 3);
    // Small integers: exact in bf16.
    let start: Vec<f32> = (0..lc.len).map(|i| 1.0 + i as f32).collect();
    let empty = dev.zeros::<bf16>(6);
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        // K = 0 operands at offsets of a short buffer.
        let a = if trans_a {
            MatRef::at(&empty, 1, 0, m)
        } else {
            MatRef::at(&empty, 1, m, 0)
        };
        let b = if trans_b {
            MatRef::at(&empty, 6, n, 0)
        } else {
            MatRef::at(&empty, 6, 0, n)
        };
        for bf16_out in [false, true] {
            for accumulate in [false, true] {
                let what = format!(
                    "K = 0, trans_a {trans_a} trans_b {trans_b} bf16 out {bf16_out} \
                     accumulate {accumulate}"
                );
                let got = if bf16_out {
                    let out = dev.upload(&to_bf16(&start));
                    let c = GemmOut::Bf16(lc.view(&out));
                    dev.ok(
                        &what,
                        gemm::matmul(d, c, a, trans_a, b, trans_b, accumulate),
                    );
                    to_f32(&dev.download(&out))
                } else {
                    let out = dev.upload(&start);
                    let c = GemmOut::F32(lc.view(&out));
                    dev.ok(
                        &what,
                        gemm::matmul(d, c, a, trans_a, b, trans_b, accumulate),
                    );
                    dev.download(&out)
                };
                let want: Vec<f32> = (0..lc.len)
                    .map(|i| {
                        if lc.inside(i) && !accumulate {
                            0.0
                        } else {
                            start[i]
                        }
                    })
                    .collect();
                assert_eq!(got, want, "{what}");
            }
        }
    }
}
on_both!(
    gemm_empty_sum_view_emu,
    gemm_empty_sum_view_gpu,
    gemm_empty_sum_view
);

/// Every view that does not fit is a typed shape error naming the operation
/// and the operand, before anything is written; a single row needs no ld.
fn gemm_shape_errors(dev: &Dev) {
    let d = dev.device();
    let x = dev.upload(&[bf16::ONE; 24]);
    let y = dev.upload(&[3.0f32; 24]);
    let out = |rows, cols| GemmOut::F32(MatRef::new(&y, rows, cols));
    let shape = |what: &str, got: Result<(), CudaError>, needles: &[&str]| match got {
        Err(CudaError::Shape(m)) => {
            for s in needles {
                assert!(m.contains(s), "{what}: {s:?} not in {m:?}");
            }
        }
        other => panic!("{what}: expected a shape error, got {other:?}"),
    };
    shape(
        "inner dimensions, linear_forward",
        gemm::linear_forward(
            d,
            out(2, 4),
            MatRef::new(&x, 2, 3),
            MatRef::new(&x, 4, 5),
            false,
        ),
        &[
            "linear_forward: inner dimensions differ",
            "x is [2, 3]",
            "wᵀ is [5, 4]",
        ],
    );
    shape(
        "inner dimensions, matmul",
        gemm::matmul(
            d,
            out(2, 2),
            MatRef::new(&x, 2, 3),
            false,
            MatRef::new(&x, 2, 2),
            false,
            false,
        ),
        &[
            "matmul: inner dimensions differ",
            "a is [2, 3]",
            "b is [2, 2]",
        ],
    );
    shape(
        "output shape",
        gemm::linear_forward(
            d,
            out(3, 4),
            MatRef::new(&x, 2, 3),
            MatRef::new(&x, 4, 3),
            false,
        ),
        &["linear_forward: y is [3, 4]", "is [2, 4]"],
    );
    // w [4, 3] at offset 13 ends at 25 of 24.
    shape(
        "operand past the end",
        gemm::linear_forward(
            d,
            out(2, 4),
            MatRef::new(&x, 2, 3),
            MatRef::at(&x, 13, 4, 3),
            false,
        ),
        &["linear_forward: w [4, 3] at offset 13", "past the end"],
    );
    // x [2, 3] with ld 22 ends at 25.
    shape(
        "strided operand past the end",
        gemm::linear_forward(
            d,
            out(2, 4),
            MatRef::strided(&x, 0, 2, 3, 22),
            MatRef::new(&x, 4, 3),
            false,
        ),
        &[
            "linear_forward: x [2, 3] at offset 0 with ld 22",
            "past the end",
        ],
    );
    shape(
        "output past the end",
        gemm::linear_backward_weight(
            d,
            GemmOut::F32(MatRef::at(&y, 20, 2, 3)),
            MatRef::new(&x, 4, 2),
            MatRef::new(&x, 4, 3),
            false,
        ),
        &[
            "linear_backward_weight: dw [2, 3] at offset 20",
            "past the end",
        ],
    );
    shape(
        "ld < cols",
        gemm::linear_backward_input(
            d,
            GemmOut::Bf16(MatRef::strided(&x, 0, 2, 3, 2)),
            MatRef::new(&x, 2, 4),
            MatRef::new(&x, 4, 3),
            false,
        ),
        &[
            "linear_backward_input: dx [2, 3]",
            "ld is less than its 3 columns",
        ],
    );
    shape(
        "ld < cols, empty sum",
        gemm::matmul(
            d,
            GemmOut::F32(MatRef::strided(&y, 0, 2, 2, 1)),
            MatRef::new(&x, 2, 0),
            false,
            MatRef::new(&x, 0, 2),
            false,
            false,
        ),
        &["matmul: c [2, 2] at offset 0 with ld 1", "ld is less"],
    );
    shape(
        "overflow",
        gemm::matmul(
            d,
            out(2, 2),
            MatRef::strided(&x, 0, 2, 2, usize::MAX),
            false,
            MatRef::new(&x, 2, 2),
            false,
            false,
        ),
        &["matmul: a [2, 2]", "overflows"],
    );
    // Nothing was written by the refused calls.
    assert!(dev.download(&y).iter().all(|&v| v == 3.0));
    assert!(dev.download(&x).iter().all(|&v| v == bf16::ONE));

    // One row: its ld is never used, so any value is accepted.
    let q = dev.upload(&[SENTINEL; 3]);
    dev.ok(
        "one row, ld 0",
        gemm::linear_forward(
            d,
            GemmOut::F32(MatRef::strided(&q, 1, 1, 2, 0)),
            MatRef::strided(&x, 5, 1, 3, 0),
            MatRef::new(&x, 2, 3),
            false,
        ),
    );
    assert_eq!(dev.download(&q), [SENTINEL, 3.0, 3.0]);
}
on_both!(
    gemm_shape_errors_emu,
    gemm_shape_errors_gpu,
    gemm_shape_errors
);

/// The same GEMM shape reuses one cached cuBLASLt plan (GPU), and repeated
/// calls keep giving the right product.
fn gemm_plan_cache(dev: &Dev) {
    let d = dev.device();
    let mut r = rng(19);
    // A shape no other test uses, so the count is this test's alone.
    let (m, k, n) = (11usize, 24usize, 13usize);
    let x = bf16_values(&mut r, m * k, 1.0);
    let w = bf16_values(&mut r, n * k, 1.0);
    let (xb, wb) = (dev.upload(&to_bf16(&x)), dev.upload(&to_bf16(&w)));
    let (want, abs) = product(
        m,
        n,
        k,
        |i, kk| x[i * k + kk] as f64,
        |kk, j| w[j * k + kk] as f64,
    );
    let y = dev.zeros::<f32>(m * n);
    for round in 0..20 {
        dev.ok(
            "linear_forward",
            gemm::linear_forward(
                d,
                GemmOut::F32(MatRef::new(&y, m, n)),
                MatRef::new(&xb, m, k),
                MatRef::new(&wb, n, k),
                false,
            ),
        );
        assert_gemm(
            &format!("round {round}"),
            &dev.download(&y),
            &want,
            &abs,
            &abs,
            false,
        );
    }
    // Column-major, linear_forward is [N, K] x [K, M].
    let plans = gemm::cached_plans(d, (n, m, k));
    match d {
        Device::Gpu(_) => assert_eq!(plans, 1, "one plan for 20 identical GEMMs"),
        _ => assert_eq!(plans, 0),
    }
}
on_both!(gemm_plan_cache_emu, gemm_plan_cache_gpu, gemm_plan_cache);

// ---------------------------------------------------------------------------
// shared memory

/// Above 48 KiB of dynamic shared memory a launch needs the function's
/// opt-in, which the launch path makes; past the device's maximum (static
/// plus dynamic) it is a typed error before anything runs.
fn shared_memory_opt_in(dev: &Dev) {
    use trm::backend::cuda::abi::{
        InputEmbeddingBackwardArgs, LaunchConfig, INPUT_EMBEDDING_BACKWARD_BF16,
    };
    let d = dev.device();
    let mut r = rng(20);
    // The embedding backward sums rows in V * D floats of dynamic shared
    // memory: 16 * 1600 * 4 = 100 KiB here (its launcher stays under 48 KiB).
    let (b, t, p, w, v) = (2usize, 40usize, 1usize, 1600usize, 16usize);
    let rows = p + t;
    let tokens: Vec<i32> = (0..b * t).map(|_| r.gen_range(0..v as i32)).collect();
    let dx = bf16_values(&mut r, b * rows * w, 1.0);
    let scale = 2.0f32;
    let mut want = vec![0.0f32; v * w];
    for bi in 0..b {
        let base = (bi * rows + p) * w;
        embedding::embedding_backward(
            &mut want,
            &dx[base..base + t * w],
            &tokens[bi * t..(bi + 1) * t],
            w,
            scale,
        );
    }
    let (dxb, tokb) = (dev.upload(&to_bf16(&dx)), dev.upload(&tokens));
    // Stage 1 alone, two slices: their partial sums add up to dembed.
    let partial = dev.zeros::<f32>(2 * v * w);
    let args = InputEmbeddingBackwardArgs {
        partial: partial.ptr(),
        dpuzzle: std::ptr::null_mut(),
        dx: dxb.cptr(),
        tokens: tokb.cptr(),
        scale,
        B: b as i32,
        T: t as i32,
        P: p as i32,
        D: w as i32,
        V: v as i32,
        ndim: 0,
        nblocks: 2,
        shared_accumulate: 1,
    };
    let shared = (v * w * 4) as u32;
    assert!(shared > 48 * 1024);
    dev.run(
        INPUT_EMBEDDING_BACKWARD_BF16,
        LaunchConfig::linear(2, 256, shared),
        &args,
    );
    let slices = dev.download(&partial);
    let (first, second) = slices.split_at(v * w);
    let dembed: Vec<f32> = first.iter().zip(second).map(|(a, b)| a + b).collect();
    assert_close(
        "dembed, 100 KiB of shared memory",
        &dembed,
        &want,
        1e-5,
        1e-6,
    );

    // Over the maximum: refused with the sizes, on both targets.
    let max = d.max_shared_per_block();
    assert_eq!(max, 227 * 1024, "sm_90's opt-in maximum");
    let over = LaunchConfig::linear(2, 256, max + 1);
    // SAFETY: refused before anything runs (checked below).
    let e = unsafe { d.launch(INPUT_EMBEDDING_BACKWARD_BF16, &over, &args) }.unwrap_err();
    match &e {
        CudaError::SharedMemory {
            dynamic_bytes,
            max: m,
            ..
        } => assert_eq!((*dynamic_bytes, *m), (max + 1, max), "{e}"),
        other => panic!("expected SharedMemory, got {other:?}"),
    }
    assert!(
        e.to_string().contains("input_embedding_backward_bf16"),
        "{e}"
    );
    // Static memory counts too: stablemax_ce_forward has block_sum's
    // partials, so the whole maximum as dynamic memory is too much. The sizes
    // come from the nvcc build's ptxas report: without nvcc there is none.
    if !trm::backend::cuda::kernels_compiled() {
        assert!(
            std::env::var("TRM_REQUIRE_KERNELS").map_or(true, |v| v != "1"),
            "TRM_REQUIRE_KERNELS=1 but this build has no CUDA kernels"
        );
        eprintln!("no nvcc build: the static shared-memory part was not run");
        return;
    }
    let stat = trm::backend::cuda::ptxas_report()
        .unwrap()
        .into_iter()
        .find(|k| k.kernel == "stablemax_ce_forward_bf16")
        .map(|k| k.shared_bytes)
        .unwrap();
    assert!(
        stat > 0,
        "stablemax_ce_forward_bf16 has static shared memory"
    );
    let logits = dev.zeros::<bf16>(16);
    // SAFETY: a C struct of pointers and integers, for which zero is null and 0.
    let zeroed: trm::backend::cuda::abi::StablemaxCeForwardArgs = unsafe { std::mem::zeroed() };
    let ce = trm::backend::cuda::abi::StablemaxCeForwardArgs {
        logits: logits.cptr(),
        ..zeroed
    };
    for (dynamic, ok) in [(max, false), (max - stat, true)] {
        let cfg = LaunchConfig::linear(1, 32, dynamic);
        // SAFETY: rejected launches run nothing; the accepted one gets B = 0
        // rows (zeroed arguments), so it reads and writes nothing.
        let got = unsafe {
            d.launch(
                trm::backend::cuda::abi::STABLEMAX_CE_FORWARD_BF16,
                &cfg,
                &ce,
            )
        }
        .and_then(|()| d.synchronize());
        match (got, ok) {
            (Ok(()), true) => {}
            (Err(CudaError::SharedMemory { static_bytes, .. }), false) => {
                assert_eq!(static_bytes, stat)
            }
            (got, _) => panic!("{dynamic} dynamic + {stat} static bytes: got {got:?}"),
        }
    }
}
on_both!(
    shared_memory_opt_in_emu,
    shared_memory_opt_in_gpu,
    shared_memory_opt_in
);

// ---------------------------------------------------------------------------
// devices, contexts and buffers

/// Every handle of GPU 0 shares one context, from any thread; a buffer of
/// one handle (or of the emulator) is refused by another with a typed error.
#[test]
fn gpu_handles_share_one_context() {
    let Some(first) = Dev::gpu() else {
        return;
    };
    let Device::Gpu(g0) = first.device() else {
        unreachable!()
    };
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let dev = Dev::gpu().expect("GPU 0 seen by the first handle");
                let d = dev.device();
                let x = dev.upload(&vec![i as f32; 1000]);
                let y = dev.zeros::<bf16>(1000);
                dev.ok("cast", ops::cast_f32_to_bf16(d, &y, &x));
                let w = dev.upload(&[bf16::ONE; 8 * 4]);
                let out = dev.zeros::<f32>(4 * 4);
                dev.ok(
                    "gemm",
                    gemm::linear_forward(
                        d,
                        GemmOut::F32(MatRef::new(&out, 4, 4)),
                        MatRef::new(&w, 4, 8),
                        MatRef::new(&w, 4, 8),
                        false,
                    ),
                );
                assert!(dev.download(&out).iter().all(|&v| v == 8.0));
                assert!(dev.download(&y).iter().all(|&v| v.to_f32() == i as f32));
                dev
            })
        })
        .map(|h| h.join().expect("thread"))
        .collect();
    for dev in &threads {
        let Device::Gpu(g) = dev.device() else {
            unreachable!()
        };
        assert!(g0.shares_context_with(g));
    }

    // A buffer of another handle, or of the emulator, is refused.
    let other = &threads[0];
    let d0 = first.device();
    let theirs = other.upload(&[1.0f32; 16]);
    let mine = first.zeros::<bf16>(16);
    let wrong = |r: Result<(), CudaError>| {
        assert!(matches!(r, Err(CudaError::WrongDevice(_))), "{r:?}");
    };
    wrong(ops::cast_f32_to_bf16(d0, &mine, &theirs));
    wrong(d0.download(&theirs).map(drop));
    wrong(d0.write(&theirs, &[0.0]));
    wrong(d0.zero(&theirs));
    let emu = Device::Emu;
    let host = emu.upload(&[bf16::ONE; 16]).unwrap();
    wrong(ops::cast_bf16_to_f32(d0, &first.zeros::<f32>(16), &host));
    wrong(gemm::linear_forward(
        d0,
        GemmOut::Bf16(MatRef::new(&mine, 4, 4)),
        MatRef::new(&host, 4, 4),
        MatRef::new(&mine, 4, 4),
        false,
    ));
    wrong(ops::cast_f32_to_bf16(&emu, &host, &theirs));
    wrong(emu.download(&theirs).map(drop));
    wrong(gemm::linear_forward(
        &emu,
        GemmOut::Bf16(MatRef::new(&host, 4, 4)),
        MatRef::new(&mine, 4, 4),
        MatRef::new(&host, 4, 4),
        false,
    ));
    // Streams of the same context are fine for events.
    let s = other.device().as_gpu().unwrap().new_stream().unwrap();
    g0.record_event(Some(&s)).unwrap();
}
