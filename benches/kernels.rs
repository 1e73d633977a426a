//! Kernel microbenchmarks: every kernel family at the model's sizes (B*S =
//! 4 * 916 rows, D = 512, SwiGLU width 1536, AdamATan2 over 7M parameters)
//! and the linear-layer GEMMs (3664 x 512 x 2048, and 8192^3), timed with
//! CUDA events on GPU 0, reported against the H200's measured ceilings
//! (docs: ~4.3 TB/s device copy, ~790 TFLOP/s bf16 GEMM).
//!
//!   cargo bench --bench kernels            # GPU; without one: a message,
//!                                          # and one tiny pass on the emulator
//!
//! Bytes are the minimum each op must move (inputs read once, outputs
//! written once), so GB/s is a lower bound of the traffic.

use std::time::Instant;

use half::bf16;
use trm::backend::cuda::{gemm, ops, CudaError, Device, GemmOut};

const PEAK_GBS: f64 = 4300.0;
const PEAK_TFLOPS: f64 = 790.0;

/// Sizes of one run.
struct Sizes {
    rows: usize,
    d: usize,
    f: usize,
    heads: usize,
    params: usize,
    gemms: Vec<(usize, usize, usize)>,
    reps: usize,
}

enum Work {
    Bytes(f64),
    Flops(f64),
}

fn time(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    f()?; // warm-up (module load, cuBLASLt heuristics)
    dev.synchronize()?;
    match dev.as_gpu() {
        Some(g) => {
            let start = g.record_event(None)?;
            for _ in 0..reps {
                f()?;
            }
            let end = g.record_event(None)?;
            Ok(end.elapsed_ms_since(&start)? as f64 / reps as f64)
        }
        None => {
            let t = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() * 1e3 / reps as f64)
        }
    }
}

fn report(name: &str, ms: f64, work: Work) {
    let s = ms * 1e-3;
    match work {
        Work::Bytes(b) => {
            let gbs = b / s / 1e9;
            println!(
                "{name:<44} {:>10.1} us {:>9.1} GB/s  {:>5.1}% of {PEAK_GBS} GB/s",
                ms * 1e3,
                gbs,
                100.0 * gbs / PEAK_GBS
            );
        }
        Work::Flops(fl) => {
            let tf = fl / s / 1e12;
            println!(
                "{name:<44} {:>10.1} us {:>9.1} TFLOP/s {:>5.1}% of {PEAK_TFLOPS} TFLOP/s",
                ms * 1e3,
                tf,
                100.0 * tf / PEAK_TFLOPS
            );
        }
    }
}

fn run(dev: &Device, z: &Sizes) -> Result<(), CudaError> {
    let (m, d, f) = (z.rows, z.d, z.f);
    let b2 = 2.0; // bytes per bf16
    let x = dev.upload(&vec![bf16::from_f32(0.5); m * d])?;
    let r = dev.upload(&vec![bf16::from_f32(0.25); m * d])?;
    let y = dev.zeros::<bf16>(m * d)?;
    let rstd = dev.zeros::<f32>(m)?;
    let t = time(dev, z.reps, || {
        ops::rmsnorm_forward(dev, &y, &rstd, &x, Some(&r), m, d, 1e-5)
    })?;
    report(
        &format!("rmsnorm_forward [{m}, {d}] + residual"),
        t,
        Work::Bytes(3.0 * b2 * (m * d) as f64),
    );
    let t = time(dev, z.reps, || {
        ops::rmsnorm_backward(dev, &r, &x, &y, &rstd, m, d)
    })?;
    report(
        &format!("rmsnorm_backward [{m}, {d}]"),
        t,
        Work::Bytes(3.0 * b2 * (m * d) as f64),
    );

    let gu = dev.upload(&vec![bf16::from_f32(0.5); m * 2 * f])?;
    let a = dev.zeros::<bf16>(m * f)?;
    let t = time(dev, z.reps, || ops::swiglu_forward(dev, &a, &gu, m, f))?;
    report(
        &format!("swiglu_forward [{m}, {f}]"),
        t,
        Work::Bytes(3.0 * b2 * (m * f) as f64),
    );
    let dgu = dev.zeros::<bf16>(m * 2 * f)?;
    let t = time(dev, z.reps, || {
        ops::swiglu_backward(dev, &dgu, &a, &gu, m, f)
    })?;
    report(
        &format!("swiglu_backward [{m}, {f}]"),
        t,
        Work::Bytes(5.0 * b2 * (m * f) as f64),
    );

    let hd = d / z.heads;
    let shape = ops::RopeShape {
        batch: 1,
        seq: m,
        heads: z.heads,
        head_dim: hd,
    };
    let qkv = dev.upload(&vec![bf16::from_f32(0.5); m * 3 * d])?;
    let cos = dev.upload(&vec![0.5f32; m * hd])?;
    let sin = dev.upload(&vec![0.5f32; m * hd])?;
    let t = time(dev, z.reps, || {
        ops::rope_forward(dev, &qkv, &cos, &sin, shape)
    })?;
    report(
        &format!("rope_forward [{m}, 3 x {d}]"),
        t,
        Work::Bytes(2.0 * 2.0 * b2 * (m * d) as f64),
    );

    let v = 12;
    let logits = dev.upload(&vec![bf16::from_f32(0.5); m * v])?;
    let labels = dev.upload(&vec![3i32; m])?;
    let loss = dev.zeros::<f32>(m)?;
    let count = dev.zeros::<i32>(4)?;
    let out = ops::CeOutputs {
        loss: Some(&loss),
        count: Some(&count),
        ..Default::default()
    };
    let t = time(dev, z.reps, || {
        ops::stablemax_ce_forward(dev, &logits, Some(&labels), out, 4, m / 4, v)
    })?;
    report(
        &format!("stablemax_ce_forward [{m}, {v}]"),
        t,
        Work::Bytes((m * (v * 2 + 8)) as f64),
    );

    let n = z.params;
    let w = dev.upload(&vec![0.5f32; n])?;
    let mo = dev.zeros::<f32>(n)?;
    let ve = dev.zeros::<f32>(n)?;
    let g = dev.upload(&vec![0.01f32; n])?;
    let wh = dev.zeros::<bf16>(n)?;
    let h = ops::AdamAtan2Step {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        step: 1,
    };
    let t = time(dev, z.reps, || {
        ops::adam_atan2(dev, &w, &mo, &ve, &g, Some(&wh), h)
    })?;
    // reads w, m, v, g; writes w, m, v and the bf16 copy
    report(
        &format!("adam_atan2 [{n}]"),
        t,
        Work::Bytes((n * (7 * 4 + 2)) as f64),
    );
    let t = time(dev, z.reps, || ops::cast_f32_to_bf16(dev, &wh, &w))?;
    report(
        &format!("cast_f32_to_bf16 [{n}]"),
        t,
        Work::Bytes((n * 6) as f64),
    );

    for &(gm, gk, gn) in &z.gemms {
        let xa = dev.upload(&vec![bf16::from_f32(0.5); gm * gk])?;
        let wb = dev.upload(&vec![bf16::from_f32(0.5); gn * gk])?;
        let yo = dev.zeros::<bf16>(gm * gn)?;
        let flops = 2.0 * (gm * gk * gn) as f64;
        let t = time(dev, z.reps, || {
            gemm::linear_forward(dev, GemmOut::Bf16(&yo), &xa, &wb, gm, gk, gn, false)
        })?;
        report(
            &format!("linear_forward {gm}x{gk}x{gn} -> bf16"),
            t,
            Work::Flops(flops),
        );
        let dy = dev.upload(&vec![bf16::from_f32(0.5); gm * gn])?;
        let dw = dev.zeros::<f32>(gn * gk)?;
        let t = time(dev, z.reps, || {
            gemm::linear_backward_weight(dev, GemmOut::F32(&dw), &dy, &xa, gm, gk, gn, true)
        })?;
        report(
            &format!("linear_backward_weight {gm}x{gk}x{gn} += f32"),
            t,
            Work::Flops(flops),
        );
        let t = time(dev, z.reps, || {
            gemm::linear_backward_input(dev, GemmOut::Bf16(&xa), &dy, &wb, gm, gk, gn, false)
        })?;
        report(
            &format!("linear_backward_input {gm}x{gk}x{gn} -> bf16"),
            t,
            Work::Flops(flops),
        );
    }
    dev.synchronize()
}

fn main() {
    match Device::gpu(0) {
        Ok(dev) => {
            println!("kernel benchmarks on {}", dev.name());
            let sizes = Sizes {
                rows: 4 * 916,
                d: 512,
                f: 1536,
                heads: 8,
                params: 7_000_000,
                gemms: vec![(3664, 512, 2048), (3664, 2048, 512), (8192, 8192, 8192)],
                reps: 20,
            };
            if let Err(e) = run(&dev, &sizes) {
                eprintln!("kernel benchmarks failed: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            println!("{e}: GPU kernel benchmarks not run");
            emulator_pass();
        }
    }
}

/// One pass at tiny sizes on the emulator, so the bench's code path is
/// exercised without a GPU (its times mean nothing).
#[cfg(feature = "emu")]
fn emulator_pass() {
    println!("one tiny pass on the CPU emulator (times are not GPU times):");
    let sizes = Sizes {
        rows: 16,
        d: 64,
        f: 96,
        heads: 2,
        params: 1000,
        gemms: vec![(16, 64, 32)],
        reps: 1,
    };
    if let Err(e) = run(&Device::Emu, &sizes) {
        eprintln!("emulator pass failed: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(feature = "emu"))]
fn emulator_pass() {}
