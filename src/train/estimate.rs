//! The expected duration of a run, said at its start: the FLOPs of one ACT
//! step ([`crate::model::flops`]) over a measured rate, times the steps of
//! the schedule. On the CPU engine a timed block forward gives the rate
//! before the first step (a CPU step of the full ARC model can take an hour,
//! too long to wait for before warning); on every engine the second step's
//! time then gives the estimate from the steps themselves (the first pays
//! for one-time allocations). A CPU run expected to take more than a day
//! gets a WARNING line.

use std::time::{Duration, Instant};

use crate::model::config::ArchConfig;
use crate::model::device_choice::DeviceKind;
use crate::model::flops::{act_step_flops, block_forward_flops};
use crate::model::trm::{block_forward, Ctx, LayerParams};

const DAY_SECS: f64 = 86_400.0;

/// A line for the user.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Say {
    Note(String),
    Warning(String),
}

/// The estimate of one run, from its start to its second step.
pub(super) struct RunEstimate {
    device: DeviceKind,
    local_batch: usize,
    /// FLOPs of one step of this rank's batch.
    step_flops: f64,
    total_steps: u64,
    steps_left: u64,
    timed: u32,
    warned: bool,
}

impl RunEstimate {
    /// A run of `total_steps` of which `done` are behind it (a resume), on
    /// `device` with local batches of `local_batch`.
    pub(super) fn new(
        arch: &ArchConfig,
        local_batch: usize,
        device: DeviceKind,
        total_steps: u64,
        done: u64,
    ) -> RunEstimate {
        RunEstimate {
            device,
            local_batch,
            step_flops: act_step_flops(arch, local_batch).total(),
            total_steps,
            steps_left: total_steps.saturating_sub(done),
            timed: 0,
            warned: false,
        }
    }

    /// Before the first step: the work of a step and, on the CPU engine,
    /// the expected duration at the rate of a timed block forward.
    pub(super) fn before_first_step(&mut self, arch: &ArchConfig) -> Vec<Say> {
        let per_sample = self.step_flops / self.local_batch.max(1) as f64;
        let mut out = vec![Say::Note(format!(
            "work: {} per sample and ACT step, {} per step of {} samples",
            human_flops(per_sample),
            human_flops(self.step_flops),
            self.local_batch
        ))];
        if self.device == DeviceKind::Cpu && self.steps_left > 0 {
            let rate = cpu_block_rate(arch);
            let how = format!("at the {}/s of a timed block", human_flops(rate));
            out.extend(self.expected(self.step_flops / rate, &how));
        }
        if self.device == DeviceKind::Cuda && self.steps_left > 0 {
            // A first guess until the second step is timed.
            let rate = GPU_ASSUMED_MFU * GPU_PEAK_FLOPS;
            let how = format!(
                "assuming {:.0} % of an H200's {}/s until a step is timed",
                100.0 * GPU_ASSUMED_MFU,
                human_flops(GPU_PEAK_FLOPS)
            );
            out.extend(self.expected(self.step_flops / rate, &how));
        }
        out
    }

    /// After each step this process ran, with its seconds: the estimate
    /// from the second one.
    pub(super) fn after_step(&mut self, secs: f64) -> Vec<Say> {
        self.timed += 1;
        if self.timed != 2 {
            return Vec::new();
        }
        let how = format!(
            "measured at the second step, {}/s",
            human_flops(self.step_flops / secs.max(1e-9))
        );
        self.expected(secs, &how)
    }

    /// The expected-duration line for `secs_per_step`, and the warning
    /// (once) when the CPU engine is asked for more than a day.
    fn expected(&mut self, secs_per_step: f64, how: &str) -> Vec<Say> {
        let whole = secs_per_step * self.total_steps as f64;
        let left = secs_per_step * self.steps_left as f64;
        let mut line = format!(
            "expected: {} per step ({how}), {} for the run's {} steps",
            human_secs(secs_per_step),
            human_secs(whole),
            self.total_steps
        );
        if self.steps_left != self.total_steps {
            line.push_str(&format!(
                ", {} for the {} left",
                human_secs(left),
                self.steps_left
            ));
        }
        let mut out = vec![Say::Note(line)];
        if let Some(w) = cpu_warning(self.device, left, self.steps_left, secs_per_step) {
            if !self.warned {
                self.warned = true;
                out.push(Say::Warning(w));
            }
        }
        out
    }
}

/// Dense bf16 tensor-core peak of an H100/H200 (the sm_90a kernels' GPUs).
const GPU_PEAK_FLOPS: f64 = 790e12;
/// The share of it a step is assumed to reach before one is timed (the
/// PyTorch reference compiled reaches about 46 % at the ARC config).
const GPU_ASSUMED_MFU: f64 = 0.3;

/// The WARNING for a CPU run expected to take more than a day.
fn cpu_warning(device: DeviceKind, secs: f64, steps: u64, per_step: f64) -> Option<String> {
    (device == DeviceKind::Cpu && secs > DAY_SECS).then(|| {
        format!(
            "WARNING: the CPU engine is expected to need {} for this run ({steps} steps of {} each); \
             train on a GPU (--device cuda) or make the run smaller (fewer epochs, a smaller \
             model or global_batch_size; --config cpu-tiny is sized for CPUs)",
            human_secs(secs),
            human_secs(per_step)
        )
    })
}

/// FLOP/s of the CPU engine's block forward on one sample of `arch`, timed
/// over at least 50 ms after an untimed call (thread start-up, page faults).
fn cpu_block_rate(arch: &ArchConfig) -> f64 {
    let ctx = Ctx::<f32>::new(arch, 1);
    let (d, f) = (arch.hidden_size, arch.intermediate_size());
    // The values do not change the time of these ops; small ones keep the
    // activations finite.
    let lp = LayerParams {
        qkv: vec![0.01; 3 * d * d],
        o: vec![0.01; d * d],
        gate_up: vec![0.01; 2 * f * d],
        down: vec![0.01; d * f],
    };
    let h = vec![0.1f32; ctx.dm.m() * d];
    let run = || drop(block_forward(&ctx, &lp, h.clone()));
    run();
    let t = Instant::now();
    let mut calls = 0u32;
    while calls == 0 || (calls < 64 && t.elapsed() < Duration::from_millis(50)) {
        run();
        calls += 1;
    }
    block_forward_flops(arch, 1) * calls as f64 / t.elapsed().as_secs_f64().max(1e-9)
}

/// `12.3 MFLOP`, `398.1 GFLOP`, `305.7 TFLOP`.
fn human_flops(x: f64) -> String {
    let units = [
        (1e15, "PFLOP"),
        (1e12, "TFLOP"),
        (1e9, "GFLOP"),
        (1e6, "MFLOP"),
    ];
    for (scale, unit) in units {
        if x >= scale {
            return format!("{:.1} {unit}", x / scale);
        }
    }
    format!("{x:.0} FLOP")
}

/// `0.42 s`, `95 s`, `41 min`, `6.4 h`, `41.6 days`.
fn human_secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 2.0 * DAY_SECS {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} days", s / DAY_SECS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ArchConfig {
        let mut c = ArchConfig::trm_default(16, 12, 4);
        c.hidden_size = 16;
        c.num_heads = 2;
        c.l_layers = 1;
        c.h_cycles = 2;
        c.l_cycles = 1;
        c.puzzle_emb_ndim = 16;
        c.puzzle_emb_len = 1;
        c
    }

    #[test]
    fn formats() {
        assert_eq!(human_flops(398.1e9), "398.1 GFLOP");
        assert_eq!(human_flops(305.7e12), "305.7 TFLOP");
        assert_eq!(human_flops(12.0), "12 FLOP");
        assert_eq!(human_secs(0.4213), "0.42 s");
        assert_eq!(human_secs(95.0), "95 s");
        assert_eq!(human_secs(41.0 * 60.0), "41 min");
        assert_eq!(human_secs(6.4 * 3600.0), "6.4 h");
        assert_eq!(human_secs(41.6 * DAY_SECS), "41.6 days");
    }

    #[test]
    fn warns_for_cpu_runs_over_a_day_only() {
        let w = cpu_warning(DeviceKind::Cpu, 2.0 * DAY_SECS, 1000, 172.8).unwrap();
        assert!(w.starts_with("WARNING: ") && w.contains("2.0 days"), "{w}");
        assert!(
            w.contains("--device cuda") && w.contains("1000 steps"),
            "{w}"
        );
        assert_eq!(
            cpu_warning(DeviceKind::Cpu, 0.9 * DAY_SECS, 1000, 1.0),
            None
        );
        assert_eq!(
            cpu_warning(DeviceKind::Cuda, 9.0 * DAY_SECS, 1000, 1.0),
            None
        );
    }

    #[test]
    fn second_step_gives_the_estimate_and_one_warning() {
        let c = tiny();
        // 10_000 steps of which 4_000 are done, 20 s each: 2.3 days for
        // the whole run, 33.3 h for what is left.
        let mut e = RunEstimate::new(&c, 8, DeviceKind::Cpu, 10_000, 4_000);
        assert!(e.after_step(99.0).is_empty(), "the first step is not used");
        let says = e.after_step(20.0);
        let Say::Note(line) = &says[0] else {
            panic!("{says:?}")
        };
        assert!(line.starts_with("expected: 20 s per step"), "{line}");
        assert!(
            line.contains("2.3 days for the run's 10000 steps"),
            "{line}"
        );
        assert!(line.contains("33.3 h for the 6000 left"), "{line}");
        assert!(matches!(&says[1], Say::Warning(w) if w.contains("33.3 h")));
        assert!(e.after_step(20.0).is_empty());
        // a short run says the estimate and no warning
        let mut e = RunEstimate::new(&c, 8, DeviceKind::Cpu, 100, 0);
        e.after_step(1.0);
        assert_eq!(e.after_step(1.0).len(), 1);
    }

    #[test]
    fn before_the_first_step_the_cpu_engine_times_a_block() {
        let c = tiny();
        let mut e = RunEstimate::new(&c, 8, DeviceKind::Cpu, 100, 0);
        let says = e.before_first_step(&c);
        assert_eq!(says.len(), 2, "{says:?}");
        assert!(matches!(&says[0], Say::Note(l) if l.starts_with("work: ")));
        assert!(matches!(&says[1], Say::Note(l) if l.contains("timed block")));
        assert!(cpu_block_rate(&c) > 0.0);
        // the CUDA engine starts from an assumed share of the GPU's peak
        let mut e = RunEstimate::new(&c, 8, DeviceKind::Cuda, 100, 0);
        let says = e.before_first_step(&c);
        assert_eq!(says.len(), 2, "{says:?}");
        let Say::Note(line) = &says[1] else {
            panic!("{says:?}")
        };
        let per_step = e.step_flops / (GPU_ASSUMED_MFU * GPU_PEAK_FLOPS);
        assert!(
            line.contains(&human_secs(per_step)),
            "{line} ({per_step} s)"
        );
        assert!(line.contains("assuming 30 %"), "{line}");
        // the emulator is timed by its steps only
        let mut e = RunEstimate::new(&c, 8, DeviceKind::Emu, 100, 0);
        assert_eq!(e.before_first_step(&c).len(), 1);
    }
}
