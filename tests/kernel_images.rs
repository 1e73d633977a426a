//! The embedded kernel images on a real GPU: the compute_80 PTX (compiled by
//! the driver at load time: what Blackwell GPUs run, and the source of the
//! sm_80/sm_86/sm_89 SASS, so on an H200 this runs the portable kernels'
//! code) against the device's own image (sm_90a SASS on an H200), on the same
//! inputs: every module loads from both, and the attention forward and
//! backward (head dims 32, 64 at the ARC shape, 128), rmsnorm, SwiGLU, the
//! stablemax cross-entropy and AdamATan2 give the same results.
//!
//! Expected: bit-equal, as both run the same arithmetic in the same order
//! (the sm_8x forward re-reads Q from shared memory instead of keeping it in
//! registers). Accepted: bf16 rounding, since ptxas may fuse a PTX multiply
//! and add differently for the two targets: relative L2 difference < 4e-3
//! (half a bf16 step) for bf16 outputs, < 1e-5 for f32 ones; argmax
//! predictions equal. The bit-equal fraction is printed.
//!
//! Without a GPU the test says "no CUDA device" and asserts nothing;
//! TRM_REQUIRE_GPU=1 (tools/gpu-check.sh) makes that a failure.

use half::bf16;
use trm::backend::cpu::rope as cpu_rope;
use trm::backend::cuda::images::ImageKind;
use trm::backend::cuda::ops::attention::{attention_backward, attention_forward, AttentionShape};
use trm::backend::cuda::ops::{
    adam_atan2, rmsnorm_backward, rmsnorm_forward, stablemax_ce_forward, swiglu_forward,
    AdamAtan2Step, CeOutputs,
};
use trm::backend::cuda::{Device, ImageRequest};

mod device;
use device::{rng, to_bf16, to_f32, uniform, Dev};

/// One output of a kernel run: its name, values, and whether they are bf16.
struct Output {
    name: String,
    values: Vec<f32>,
    bf16: bool,
}

fn bf16_out(name: String, values: &[bf16]) -> Output {
    Output {
        name,
        values: to_f32(values),
        bf16: true,
    }
}

fn f32_out(name: String, values: Vec<f32>) -> Output {
    Output {
        name,
        values,
        bf16: false,
    }
}

/// Runs the kernels of this test on `dev`; every output, in a fixed order.
fn run_kernels(dev: &Dev) -> Vec<Output> {
    let d = dev.device();
    let mut out = Vec::new();
    for (seed, s) in [
        (
            1,
            AttentionShape {
                batch: 2,
                seq: 916,
                heads: 8,
                head_dim: 64,
            },
        ),
        (
            2,
            AttentionShape {
                batch: 2,
                seq: 129,
                heads: 3,
                head_dim: 32,
            },
        ),
        (
            3,
            AttentionShape {
                batch: 1,
                seq: 70,
                heads: 2,
                head_dim: 128,
            },
        ),
    ] {
        let mut r = rng(seed);
        let qkv = dev.upload(&to_bf16(&uniform(&mut r, s.qkv_len().unwrap(), 2.0)));
        let dout = dev.upload(&to_bf16(&uniform(&mut r, s.o_len().unwrap(), 1.0)));
        let t = cpu_rope::rope_tables::<f32>(s.seq, s.head_dim, 10000.0);
        let (cos, sin) = (dev.upload(&t.cos), dev.upload(&t.sin));
        let o = dev.zeros::<bf16>(s.o_len().unwrap());
        let lse = dev.zeros::<f32>(s.rows().unwrap());
        let dqkv = dev.zeros::<bf16>(s.qkv_len().unwrap());
        let delta = dev.zeros::<f32>(s.rows().unwrap());
        dev.ok(
            "attention_forward",
            attention_forward(d, &o, &lse, &qkv, &cos, &sin, s),
        );
        dev.ok(
            "attention_backward",
            attention_backward(d, &dqkv, &delta, &qkv, &cos, &sin, &o, &lse, &dout, s),
        );
        let at = format!("attention d {}", s.head_dim);
        out.push(bf16_out(format!("{at} o"), &dev.download(&o)));
        out.push(f32_out(format!("{at} lse"), dev.download(&lse)));
        out.push(bf16_out(format!("{at} dqkv"), &dev.download(&dqkv)));
    }

    // rmsnorm over ARC-width rows, forward and backward.
    let (m, width) = (2 * 916, 512);
    let mut r = rng(10);
    let x = dev.upload(&to_bf16(&uniform(&mut r, m * width, 3.0)));
    let res = dev.upload(&to_bf16(&uniform(&mut r, m * width, 1.0)));
    let dy = dev.upload(&to_bf16(&uniform(&mut r, m * width, 1.0)));
    let (y, rstd, dx) = (
        dev.zeros::<bf16>(m * width),
        dev.zeros::<f32>(m),
        dev.zeros::<bf16>(m * width),
    );
    dev.ok(
        "rmsnorm_forward",
        rmsnorm_forward(d, &y, &rstd, &x, Some(&res), m, width, 1e-5),
    );
    dev.ok(
        "rmsnorm_backward",
        rmsnorm_backward(d, &dx, &dy, &y, &rstd, m, width),
    );
    out.push(bf16_out("rmsnorm y".into(), &dev.download(&y)));
    out.push(f32_out("rmsnorm rstd".into(), dev.download(&rstd)));
    out.push(bf16_out("rmsnorm dx".into(), &dev.download(&dx)));

    // SwiGLU at the ARC config's MLP width.
    let f = 1536;
    let gu = dev.upload(&to_bf16(&uniform(&mut r, m * 2 * f, 4.0)));
    let a = dev.zeros::<bf16>(m * f);
    dev.ok("swiglu_forward", swiglu_forward(d, &a, &gu, m, f));
    out.push(bf16_out("swiglu a".into(), &dev.download(&a)));

    // The LM head's loss and predictions (vocabulary 12, as ARC's).
    let (b, t, v) = (4, 916, 12);
    let logits = dev.upload(&to_bf16(&uniform(&mut r, b * t * v, 6.0)));
    let labels: Vec<i32> = (0..b * t).map(|i| (i * 7 % 13) as i32 - 1).collect();
    let labels = dev.upload(&labels);
    let (loss, preds) = (dev.zeros::<f32>(b * t), dev.zeros::<i32>(b * t));
    let outputs = CeOutputs {
        loss: Some(&loss),
        preds: Some(&preds),
        ..CeOutputs::default()
    };
    dev.ok(
        "stablemax_ce_forward",
        stablemax_ce_forward(d, &logits, Some(&labels), outputs, b, t, v),
    );
    out.push(f32_out("stablemax_ce loss".into(), dev.download(&loss)));
    let preds: Vec<f32> = dev.download(&preds).iter().map(|&p| p as f32).collect();
    out.push(f32_out("stablemax_ce preds".into(), preds));

    // Three AdamATan2 steps.
    let n = 100_003;
    let w = dev.upload(&uniform(&mut r, n, 1.0));
    let (mom, var) = (dev.zeros::<f32>(n), dev.zeros::<f32>(n));
    let w16 = dev.zeros::<bf16>(n);
    for step in 1..=3 {
        let g = dev.upload(&uniform(&mut r, n, 0.1));
        let h = AdamAtan2Step {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            step,
        };
        dev.ok(
            "adam_atan2",
            adam_atan2(d, &w, &mom, &var, &g, Some(&w16), h),
        );
    }
    out.push(f32_out("adam w".into(), dev.download(&w)));
    out.push(f32_out("adam m".into(), dev.download(&mom)));
    out.push(f32_out("adam v".into(), dev.download(&var)));
    out.push(bf16_out("adam w bf16".into(), &dev.download(&w16)));
    out
}

/// Relative L2 difference of `b` from `a` (NaN anywhere: infinite).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (x as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn ptx_matches_the_native_image_gpu() {
    // Presence first, with the `_gpu` conventions (TRM_REQUIRE_GPU=1: a failure).
    if Dev::gpu().is_none() {
        return;
    }
    let open = |request| {
        Device::gpu_with_image(0, request).unwrap_or_else(|e| panic!("GPU 0, {request:?}: {e}"))
    };
    let native = Dev(open(ImageRequest::Best));
    let ptx = Dev(open(ImageRequest::Ptx));
    let native_image = native.device().as_gpu().unwrap().kernel_image().unwrap();
    let ptx_image = ptx.device().as_gpu().unwrap().kernel_image().unwrap();
    assert_eq!(
        (ptx_image.name, ptx_image.kind),
        ("compute_80", ImageKind::Ptx)
    );
    assert!(
        ptx.name().contains("compute_80 PTX (JIT)"),
        "{}",
        ptx.name()
    );
    eprintln!("native: {}; forced: {}", native.name(), ptx.name());
    if native_image.kind == ImageKind::Ptx {
        eprintln!("this GPU has no SASS image: both sides run the PTX");
    }

    // Every module loads from both images (the driver JIT-compiles the PTX).
    for dev in [&native, &ptx] {
        let gpu = dev.device().as_gpu().unwrap();
        let loaded = gpu
            .load_all_modules()
            .unwrap_or_else(|e| panic!("{}: {e}", dev.name()));
        assert_eq!(
            loaded,
            trm::backend::cuda::embedded_modules().unwrap().len()
        );
    }

    let want = run_kernels(&native);
    let got = run_kernels(&ptx);
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w.name, g.name);
        assert_eq!(w.values.len(), g.values.len(), "{}", w.name);
        let same = w
            .values
            .iter()
            .zip(&g.values)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        let diff = rel_diff(&w.values, &g.values);
        eprintln!(
            "{}: {:.4} % bit-equal, relative L2 difference {diff:.1e}",
            w.name,
            100.0 * same as f64 / w.values.len().max(1) as f64
        );
        let tolerance = if w.name.ends_with("preds") {
            0.0
        } else if w.bf16 {
            4e-3
        } else {
            1e-5
        };
        assert!(
            diff <= tolerance,
            "{}: PTX ({}) differs from {} by {diff:.2e} (relative L2 > {tolerance:.0e})",
            w.name,
            ptx_image.describe(),
            native_image.describe()
        );
    }
}
