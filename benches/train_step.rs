//! One training ACT step of the CUDA engine at the ARC config: sample-steps
//! per second, MFU, device memory and time per phase.
//!
//! `cargo bench --bench train_step` on a machine with an H200 (or its binary
//! from `tools/gpu-check.sh --prepare`): hidden 512, 8 heads, 2 layers,
//! H_cycles 3, L_cycles 4 and 6, S = 900 + 16, vocab 12, local batches 96,
//! 192, 384. Each configuration runs 2 warm-up steps (plain launches, then
//! the CUDA-graph capture) and then `TRM_BENCH_STEPS` (5) timed steps: a
//! whole ACT step as the trainer runs it (every slot restarted, the inner
//! step, the loss and backward, AdamATan2 and sign-SGD). MFU counts the
//! model FLOPs of `trm::model::flops` (398 GFLOP per sample-step at
//! L_cycles 4) against the H200's 790 TFLOP/s dense bf16.
//!
//! Knobs: `TRM_BENCH_BATCHES=96,192`, `TRM_BENCH_L_CYCLES=4`,
//! `TRM_BENCH_STEPS`, `TRM_BENCH_TRAIN_JSON=<file>` (the rows as JSON).
//! Without a GPU it prints that the GPU benchmark did not run and times one
//! step of a small config on the emulator; `cargo test --all-targets` runs
//! that smoke pass (no `--bench` argument).

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trm::backend::cuda::Device;
use trm::dist::SingleProcess;
use trm::model::act;
use trm::model::config::{ArchConfig, PosEncodings};
use trm::model::engine::{Engine, EngineConfig, OptimStep};
use trm::model::flops::act_step_flops;
use trm::model::gpu::GpuEngine;
use trm::model::trm::{Batch, Params};
use trm::model::weights::Weights;
use trm::optim::AdamAtan2Config;

/// H200 dense bf16 tensor-core peak.
const PEAK_FLOPS: f64 = 790e12;

fn arc_config(l_cycles: usize) -> ArchConfig {
    let mut c = ArchConfig::trm_default(900, 12, 10_000);
    c.hidden_size = 512;
    c.num_heads = 8;
    c.expansion = 4.0;
    c.l_layers = 2;
    c.h_cycles = 3;
    c.l_cycles = l_cycles;
    c.puzzle_emb_ndim = 512;
    c.puzzle_emb_len = 16;
    c.pos_encodings = PosEncodings::Rope;
    c.halt_exploration_prob = 0.0;
    c
}

fn small_config() -> ArchConfig {
    let mut c = ArchConfig::trm_default(30, 12, 20);
    c.hidden_size = 64;
    c.num_heads = 2;
    c.l_layers = 1;
    c.h_cycles = 2;
    c.l_cycles = 2;
    c.puzzle_emb_ndim = 64;
    c.puzzle_emb_len = 1;
    c
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => default.to_vec(),
    }
}

struct Row {
    l_cycles: usize,
    batch: usize,
    result: Result<Measured, String>,
}

struct Measured {
    ms_per_step: f64,
    samples_per_s: f64,
    mfu: f64,
    memory: String,
    device_used_gib: f64,
    phases: Vec<(&'static str, f64)>,
    graphs: Vec<&'static str>,
}

/// Random tokens, labels and puzzle ids for `b` samples.
fn batch_data(arch: &ArchConfig, b: usize, seed: u64) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = b * arch.seq_len;
    let v = arch.vocab_size as i32;
    let inputs = (0..n).map(|_| rng.gen_range(0..v)).collect();
    let labels = (0..n).map(|_| rng.gen_range(0..v)).collect();
    let ids = (0..b)
        .map(|_| rng.gen_range(0..arch.num_puzzle_identifiers as i32))
        .collect();
    (inputs, labels, ids)
}

fn step(
    engine: &mut GpuEngine,
    arch: &ArchConfig,
    data: &(Vec<i32>, Vec<i32>, Vec<i32>),
) -> Result<(), String> {
    let (inputs, labels, ids) = data;
    let b = ids.len();
    engine
        .reset_halted(&vec![true; b])
        .map_err(|e| e.to_string())?;
    let batch = Batch {
        inputs,
        labels,
        puzzle_ids: ids,
        b,
    };
    act::act_step(engine, arch, &batch, &vec![1; b], None).map_err(|e| e.to_string())?;
    let up = OptimStep {
        grad_scale: 1.0 / b as f32,
        lr: 1e-4,
        puzzle_emb_lr: 1e-2,
        update_dense: true,
    };
    engine
        .optimizer_step(&up, ids, &SingleProcess)
        .map_err(|e| e.to_string())
}

fn measure(
    dev: Device,
    arch: &ArchConfig,
    b: usize,
    warmup: usize,
    steps: usize,
) -> Result<Measured, String> {
    let params =
        Params::<f32>::from_weights(arch, &Weights::init(arch, 0)).map_err(|e| e.to_string())?;
    let cfg = EngineConfig {
        adam: AdamAtan2Config {
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
        },
        ema_rate: None,
        puzzle_emb_weight_decay: 0.1,
    };
    let mut engine =
        GpuEngine::new(dev, arch.clone(), params, b, cfg).map_err(|e| e.to_string())?;
    let data = batch_data(arch, b, 1);
    for _ in 0..warmup {
        step(&mut engine, arch, &data)?;
    }
    engine.synchronize().map_err(|e| e.to_string())?;
    engine.set_profiling(true);
    let t0 = Instant::now();
    for _ in 0..steps {
        step(&mut engine, arch, &data)?;
    }
    engine.synchronize().map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64() / steps as f64;
    let phases = engine
        .take_phase_times()
        .map_err(|e| e.to_string())?
        .phases
        .into_iter()
        .map(|(p, ms)| (p, ms / steps as f64))
        .collect();
    let flops = act_step_flops(arch, b).total();
    Ok(Measured {
        ms_per_step: secs * 1e3,
        samples_per_s: b as f64 / secs,
        mfu: flops / secs / PEAK_FLOPS,
        memory: engine.memory_summary(),
        device_used_gib: Engine::device_memory_used(&engine).unwrap_or(0) as f64
            / (1u64 << 30) as f64,
        phases,
        graphs: engine.captured_regions(),
    })
}

fn print_row(r: &Row) {
    match &r.result {
        Ok(m) => {
            let phases: Vec<String> = m
                .phases
                .iter()
                .map(|(p, ms)| format!("{p} {ms:.2}"))
                .collect();
            println!(
                "L_cycles {} batch {:4}: {:9.2} ms/step  {:8.1} sample-steps/s  MFU {:5.1} %  device {:.1} GiB ({})",
                r.l_cycles,
                r.batch,
                m.ms_per_step,
                m.samples_per_s,
                100.0 * m.mfu,
                m.device_used_gib,
                m.memory
            );
            println!("    phases (ms/step): {}", phases.join(", "));
            println!(
                "    from CUDA graphs: {}",
                if m.graphs.is_empty() {
                    "none".to_string()
                } else {
                    m.graphs.join(", ")
                }
            );
        }
        Err(e) => println!("L_cycles {} batch {:4}: not run: {e}", r.l_cycles, r.batch),
    }
}

fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| match &r.result {
            Ok(m) => {
                let phases: Vec<String> = m
                    .phases
                    .iter()
                    .map(|(p, ms)| format!("\"{p}\": {ms:.4}"))
                    .collect();
                format!(
                    "{{\"l_cycles\": {}, \"batch\": {}, \"ms_per_step\": {:.4}, \"samples_per_s\": {:.3}, \"mfu\": {:.5}, \"device_used_gib\": {:.3}, \"phases_ms\": {{{}}}}}",
                    r.l_cycles,
                    r.batch,
                    m.ms_per_step,
                    m.samples_per_s,
                    m.mfu,
                    m.device_used_gib,
                    phases.join(", ")
                )
            }
            Err(e) => format!(
                "{{\"l_cycles\": {}, \"batch\": {}, \"error\": {:?}}}",
                r.l_cycles, r.batch, e
            ),
        })
        .collect();
    format!("[{}]\n", items.join(",\n "))
}

fn main() {
    let gpu_ok = Device::gpu(0).is_ok();
    if !gpu_ok {
        println!("GPU train-step benchmark not run: no CUDA device; one step of a small config on the emulator");
        let arch = small_config();
        let r = Row {
            l_cycles: arch.l_cycles,
            batch: 2,
            result: measure(Device::Emu, &arch, 2, 1, 1),
        };
        print_row(&r);
        if let Err(e) = &r.result {
            eprintln!("the emulator step failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let steps = env_list("TRM_BENCH_STEPS", &[5])[0].max(1);
    let mut rows = Vec::new();
    for l in env_list("TRM_BENCH_L_CYCLES", &[4, 6]) {
        for b in env_list("TRM_BENCH_BATCHES", &[96, 192, 384]) {
            let arch = arc_config(l);
            let result = Device::gpu(0)
                .map_err(|e| e.to_string())
                .and_then(|dev| measure(dev, &arch, b, 2, steps));
            let row = Row {
                l_cycles: l,
                batch: b,
                result,
            };
            print_row(&row);
            rows.push(row);
        }
    }
    if let Ok(path) = std::env::var("TRM_BENCH_TRAIN_JSON") {
        if let Err(e) = std::fs::write(&path, json(&rows)) {
            eprintln!("cannot write {path}: {e}");
        }
    }
}
