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
//!
//! Fused attention (RoPE + softmax attention, `kernels/attention.cu`) is
//! timed at the ARC shape (B 96, H 8, S 916, d 64) and a long one (B 8, H 8,
//! S 4096, d 64) on random inputs: forward, backward, and forward + backward,
//! in TFLOP/s (forward 4 B H S^2 d, backward 2.5 times that). With
//! `TRM_BENCH_ATTENTION_JSON=FILE` the attention rows are also written there
//! as JSON, for tools/gpu-check.sh to set beside PyTorch's SDPA.
//!
//! `TRM_BENCH_ONLY=attention` runs the attention rows alone and
//! `TRM_BENCH_REPS=N` sets the repetitions (for a profiler: tools/profile-attention.sh).

use std::time::Instant;

use half::bf16;
use trm::backend::cuda::{gemm, ops, CudaError, Device, GemmOut, MatRef};

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
    /// (batch, heads, seq, head_dim) of the attention runs.
    attention: Vec<(usize, usize, usize, usize)>,
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

/// `n` values uniform in (-scale, scale), fixed seed (never constants: they
/// can time faster than real data).
fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-scale..scale)).collect()
}

fn random_bf16(n: usize, scale: f32, seed: u64) -> Vec<bf16> {
    random(n, scale, seed)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

/// Forward, backward and forward + backward of the fused attention at each
/// shape; returns the JSON rows.
fn attention(dev: &Device, z: &Sizes) -> Result<Vec<String>, CudaError> {
    let mut rows = Vec::new();
    for &(b, h, s, d) in &z.attention {
        let shape = ops::AttentionShape {
            batch: b,
            seq: s,
            heads: h,
            head_dim: d,
        };
        let qkv = dev.upload(&random_bf16(shape.qkv_len()?, 2.0, 1))?;
        let dout = dev.upload(&random_bf16(shape.o_len()?, 1.0, 2))?;
        let t = trm::backend::cpu::rope::rope_tables::<f32>(s, d, 10000.0);
        let (cos, sin) = (dev.upload(&t.cos)?, dev.upload(&t.sin)?);
        let o = dev.zeros::<bf16>(shape.o_len()?)?;
        let lse = dev.zeros::<f32>(shape.rows()?)?;
        let delta = dev.zeros::<f32>(shape.rows()?)?;
        let dqkv = dev.zeros::<bf16>(shape.qkv_len()?)?;
        let fwd = || ops::attention_forward(dev, &o, &lse, &qkv, &cos, &sin, shape);
        let bwd = || {
            ops::attention_backward(dev, &dqkv, &delta, &qkv, &cos, &sin, &o, &lse, &dout, shape)
        };
        let flops = 4.0 * (b * h * s * s * d) as f64;
        let tf = time(dev, z.reps, fwd)?;
        let tb = time(dev, z.reps, bwd)?;
        let tfb = time(dev, z.reps, || fwd().and_then(|()| bwd()))?;
        let name = format!("B{b} H{h} S{s} d{d}");
        for (pass, ms, fl) in [
            ("forward", tf, flops),
            ("backward", tb, 2.5 * flops),
            ("forward+backward", tfb, 3.5 * flops),
        ] {
            report(&format!("attention {pass} {name}"), ms, Work::Flops(fl));
            rows.push(format!(
                "{{\"shape\": \"{name}\", \"pass\": \"{pass}\", \"ms\": {ms:.6}, \"tflops\": {:.3}}}",
                fl / (ms * 1e-3) / 1e12
            ));
        }
    }
    Ok(rows)
}

fn run(dev: &Device, z: &Sizes) -> Result<(), CudaError> {
    let rows = attention(dev, z)?;
    if let Ok(path) = std::env::var("TRM_BENCH_ATTENTION_JSON") {
        let json = format!("[\n  {}\n]\n", rows.join(",\n  "));
        if let Err(e) = std::fs::write(&path, json) {
            eprintln!("could not write {path}: {e}");
        }
    }
    if std::env::var("TRM_BENCH_ONLY").is_ok_and(|v| v == "attention") {
        return dev.synchronize();
    }

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
            gemm::linear_forward(
                dev,
                GemmOut::Bf16(MatRef::new(&yo, gm, gn)),
                MatRef::new(&xa, gm, gk),
                MatRef::new(&wb, gn, gk),
                false,
            )
        })?;
        report(
            &format!("linear_forward {gm}x{gk}x{gn} -> bf16"),
            t,
            Work::Flops(flops),
        );
        let dy = dev.upload(&vec![bf16::from_f32(0.5); gm * gn])?;
        let dw = dev.zeros::<f32>(gn * gk)?;
        let t = time(dev, z.reps, || {
            gemm::linear_backward_weight(
                dev,
                GemmOut::F32(MatRef::new(&dw, gn, gk)),
                MatRef::new(&dy, gm, gn),
                MatRef::new(&xa, gm, gk),
                true,
            )
        })?;
        report(
            &format!("linear_backward_weight {gm}x{gk}x{gn} += f32"),
            t,
            Work::Flops(flops),
        );
        let t = time(dev, z.reps, || {
            gemm::linear_backward_input(
                dev,
                GemmOut::Bf16(MatRef::new(&xa, gm, gk)),
                MatRef::new(&dy, gm, gn),
                MatRef::new(&wb, gn, gk),
                false,
            )
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
                attention: vec![(96, 8, 916, 64), (8, 8, 4096, 64)],
                reps: std::env::var("TRM_BENCH_REPS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(20),
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
        attention: vec![(1, 2, 37, 32)],
        reps: 1,
    };
    if let Err(e) = run(&Device::Emu, &sizes) {
        eprintln!("emulator pass failed: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(feature = "emu"))]
fn emulator_pass() {}
