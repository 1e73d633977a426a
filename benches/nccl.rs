//! The NCCL all-reduce of the CUDA engine's whole gradient buffer at the
//! ARC config (hidden 512, 2 layers), through the device path the engine
//! uses ([`DeviceCollective`]): one call, and the per-layer buckets the
//! backward starts, each with the wait for completion; and the per-step
//! metric all-reduce through the host.
//!
//! On one GPU the communicator has one rank, so this times NCCL's fixed
//! cost per step (launches, the deadline's polling), not a network: the
//! multi-GPU expectation is in the README ("On many GPUs"). Without a GPU
//! or NCCL it says it did not run and exits 0 (`cargo test --all-targets`
//! runs it so). `TRM_BENCH_ITERS` (50) sets the timed repetitions.

use std::time::{Duration, Instant};

use trm::backend::cuda::Device;
use trm::dist::nccl::{library_summary, NcclCollective};
use trm::dist::{Collective, World};
use trm::model::config::{ArchConfig, PosEncodings};
use trm::model::engine::EngineConfig;
use trm::model::gpu::GpuEngine;
use trm::model::trm::Params;
use trm::model::weights::Weights;
use trm::optim::AdamAtan2Config;

fn arc_config() -> ArchConfig {
    let mut c = ArchConfig::trm_default(900, 12, 1000);
    c.hidden_size = 512;
    c.num_heads = 8;
    c.expansion = 4.0;
    c.l_layers = 2;
    c.h_cycles = 3;
    c.l_cycles = 6;
    c.puzzle_emb_ndim = 512;
    c.puzzle_emb_len = 16;
    c.pos_encodings = PosEncodings::Rope;
    c
}

/// Median and minimum of `iters` timed runs of `f` (after 3 warm-ups).
fn time(iters: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<Duration> = (0..iters)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    (t[t.len() / 2], t[0])
}

fn main() {
    // `cargo test --all-targets` passes no `--bench`: a smoke run is enough.
    let iters: usize = std::env::var("TRM_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
        .max(1);
    let dev = match Device::gpu(0) {
        Ok(d) => d,
        Err(e) => {
            println!("GPU NCCL benchmark not run: {e}");
            return;
        }
    };
    let nccl = match NcclCollective::join(&World::single(), 0, Duration::from_secs(60)) {
        Ok(c) => c,
        Err(e) => {
            println!("GPU NCCL benchmark not run: {e}");
            return;
        }
    };
    println!("{}", library_summary().unwrap_or_else(|e| e.to_string()));
    let arch = arc_config();
    let params = match Params::from_weights(&arch, &Weights::init(&arch, 0)) {
        Ok(p) => p,
        Err(e) => {
            println!("GPU NCCL benchmark failed: {e}");
            std::process::exit(1);
        }
    };
    let cfg = EngineConfig {
        adam: AdamAtan2Config {
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
        },
        ema_rate: None,
        puzzle_emb_weight_decay: 0.1,
    };
    // The engine only for its bucket plan (a batch of one: little memory).
    let engine = match GpuEngine::new(dev, arch.clone(), params, 1, cfg) {
        Ok(e) => e,
        Err(e) => {
            println!("GPU NCCL benchmark failed: {e}");
            std::process::exit(1);
        }
    };
    let plan = engine.bucket_plan().clone();
    drop(engine);
    let dev = Device::gpu(0).expect("GPU 0 opened above");
    let n = plan.buckets.iter().map(|b| b.range.end).max().unwrap_or(0);
    let dc = nccl.device().expect("NCCL has a device side");
    let buf = dev.upload(&vec![1e-3f32; n]).expect("upload");
    let fail = |e: &dyn std::fmt::Display| -> ! {
        println!("GPU NCCL benchmark failed: {e}");
        std::process::exit(1)
    };
    let mb = n as f64 * 4.0 / 1e6;
    println!(
        "ARC config gradient buffer: {n} f32 values ({mb:.1} MB), {} buckets {:?}",
        plan.buckets.len(),
        plan.buckets
            .iter()
            .map(|b| format!("{:.1} MB", b.range.len() as f64 * 4.0 / 1e6))
            .collect::<Vec<_>>()
    );
    let (med, min) = time(iters, || {
        dc.start_all_reduce(&dev, &buf, 0..n)
            .and_then(|()| dc.finish(&dev))
            .unwrap_or_else(|e| fail(&e));
        dev.synchronize().unwrap_or_else(|e| fail(&e));
    });
    let row = |what: &str, med: Duration, min: Duration| {
        println!(
            "{what:<44} median {:8.3} ms  min {:8.3} ms  ({:.0} GB/s over the buffer at the median)",
            med.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            mb / 1e3 / med.as_secs_f64()
        )
    };
    row("all-reduce, whole buffer, one call", med, min);
    let (med, min) = time(iters, || {
        for b in &plan.buckets {
            dc.start_all_reduce(&dev, &buf, b.range.clone())
                .unwrap_or_else(|e| fail(&e));
        }
        dc.finish(&dev).unwrap_or_else(|e| fail(&e));
        dev.synchronize().unwrap_or_else(|e| fail(&e));
    });
    row("all-reduce, the engine's buckets", med, min);
    let (med, min) = time(iters, || {
        let mut sums = [1.0f64; 8];
        nccl.all_reduce_sum_f64(&mut sums)
            .unwrap_or_else(|e| fail(&e));
    });
    println!(
        "{:<44} median {:8.3} ms  min {:8.3} ms",
        "metric sums (8 f64) through the host",
        med.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3
    );
}
