//! Where a run's numbers go: `metrics.jsonl` and TensorBoard events (rank
//! 0), the progress bar, and the lines printed between its updates.

use std::path::Path;

use super::estimate::Say;
use super::Result;
use crate::config::{RunConfig, Schedule};
use crate::loss::StepMetrics;
use crate::telemetry::metrics::MetricsWriter;
use crate::telemetry::progress::Progress;
use crate::telemetry::tensorboard::EventWriter;

/// The run's outputs for numbers and messages. Every rank holds one; only
/// rank 0's writes anything.
pub(super) struct Sinks {
    metrics: Option<MetricsWriter>,
    events: Option<EventWriter>,
    pub(super) progress: Option<Progress>,
    verbose: bool,
    rank0: bool,
}

impl Sinks {
    /// Opens the writers in `dir` on rank 0. After a resume at `step`, the
    /// replayed steps' old records are cut and the event log marks the restart.
    pub(super) fn open(
        dir: &Path,
        rank0: bool,
        resumed: bool,
        step: u64,
        verbose: bool,
    ) -> Result<Sinks> {
        let mut sinks = Sinks {
            metrics: None,
            events: None,
            progress: None,
            verbose,
            rank0,
        };
        if rank0 {
            if resumed {
                MetricsWriter::cut_after(dir, step)?;
            }
            sinks.metrics = Some(MetricsWriter::create(dir)?);
            let mut ev = EventWriter::create(dir)?;
            if resumed {
                ev.mark_restart(step)?;
            }
            sinks.events = Some(ev);
        }
        Ok(sinks)
    }

    /// A message for the user (rank 0, verbose runs only).
    pub(super) fn say(&self, msg: &str) {
        if self.verbose && self.rank0 {
            eprintln!("{msg}");
        }
    }

    /// A message printed above the progress bar when there is one.
    pub(super) fn note(&mut self, line: &str) {
        match &mut self.progress {
            Some(p) if self.verbose => p.println(line),
            _ => self.say(line),
        }
    }

    /// An estimate line: notes as [`Sinks::note`], warnings on rank 0 even
    /// in quiet runs (above the progress bar when there is one).
    pub(super) fn tell(&mut self, line: Say) {
        match line {
            Say::Note(l) => self.note(&l),
            Say::Warning(w) if self.rank0 => match &mut self.progress {
                Some(p) if self.verbose => p.println(&w),
                _ => eprintln!("{w}"),
            },
            Say::Warning(_) => {}
        }
    }

    /// Writes `log` at `step` to `metrics.jsonl` and the event log.
    pub(super) fn log(&mut self, step: u64, log: &[(String, f64)]) -> Result<()> {
        if let Some(w) = &mut self.metrics {
            w.log(step, log)?;
        }
        if let Some(e) = &mut self.events {
            let l: Vec<(&str, f32)> = log.iter().map(|(k, v)| (k.as_str(), *v as f32)).collect();
            e.add_scalars(step, &l)?;
        }
        Ok(())
    }

    /// Moves the progress bar to `step`, showing the step's mean loss.
    pub(super) fn progress(
        &mut self,
        step: u64,
        m: &StepMetrics,
        global_batch: usize,
        device_memory: Option<u64>,
    ) {
        if let Some(p) = &mut self.progress {
            p.set_device_memory(device_memory);
            let loss =
                (m.lm_loss + 0.5 * (m.q_halt_loss + m.q_continue_loss)) / global_batch as f64;
            p.update(step, Some(loss));
        }
    }

    pub(super) fn finish(&mut self) {
        if let Some(p) = &mut self.progress {
            p.finish();
        }
    }
}

/// The logged numbers of one training step that took `secs` seconds.
pub(super) fn step_log(
    m: &StepMetrics,
    cfg: &RunConfig,
    schedule: &Schedule,
    step: u64,
    secs: f64,
) -> Vec<(String, f64)> {
    let mut log = m.train_view(cfg.global_batch_size);
    log.push(("train/lr".into(), schedule.lr_at(step)));
    log.push((
        "train/samples_per_s".into(),
        cfg.global_batch_size as f64 / secs.max(1e-9),
    ));
    log
}
