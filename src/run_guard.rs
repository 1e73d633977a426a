//! Checks a run's schedule before any work: a run that would train nothing
//! is an error, one that would never checkpoint gets a loud warning.

use std::time::Duration;

use crate::config::{RunConfig, Schedule};
use crate::train::TrainError;

/// Refuses a 0-step schedule; returns warnings (with the numbers) for one
/// that is legal but surprising.
pub fn schedule_warnings(cfg: &RunConfig, s: &Schedule) -> Result<Vec<String>, TrainError> {
    if s.total_steps == 0 || s.steps_per_iter == 0 {
        let examples = s.total_groups as f64 * s.mean_puzzle_examples;
        return Err(TrainError::NoSteps {
            batches: (examples / s.global_batch_size.max(1) as f64) as u64,
            global: s.global_batch_size,
        });
    }
    let mut out = Vec::new();
    if s.min_eval_interval >= s.total_iters {
        out.push(format!(
            "min_eval_interval {} is not below the run's {} train/evaluate iterations: \
             this run will neither evaluate nor save a checkpoint (lower min_eval_interval)",
            cfg.min_eval_interval, s.total_iters
        ));
    }
    Ok(out)
}

/// A pause after each training step, from `TRM_STEP_PAUSE_MS` (a test hook:
/// it lets preemption tests signal a run mid-way on any machine; it changes
/// no result).
pub fn step_pause() -> Option<Duration> {
    let ms: u64 = std::env::var("TRM_STEP_PAUSE_MS").ok()?.parse().ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}
