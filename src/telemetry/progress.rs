//! Training progress: an indicatif bar on a terminal; on anything else (CI
//! logs, `nohup`, files) one plain line at most every `interval`, so logs
//! stay readable instead of filling with carriage returns.
//!
//! Rate and ETA are computed here from the steps done by this process (a
//! resumed run starts at its checkpoint step), not by indicatif.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
pub enum ProgressMode {
    /// A bar if stderr is a terminal, plain lines otherwise.
    Auto,
    /// Always the bar.
    Bar,
    /// Plain lines to `sink`, at most one per `interval` (and the last step).
    Plain {
        interval: Duration,
        sink: Box<dyn Write + Send>,
    },
    /// Nothing (e.g. ranks other than 0).
    Hidden,
}

/// Default interval between plain lines.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(30);

enum Out {
    Bar(ProgressBar),
    Plain {
        interval: Duration,
        sink: Box<dyn Write + Send>,
        last: Option<Instant>,
    },
    Hidden,
}

/// Reports training progress toward `total` steps.
pub struct Progress {
    out: Out,
    total: u64,
    start_step: u64,
    started: Instant,
    /// Samples per step, for a samples/s figure (0: none shown).
    samples_per_step: u64,
    /// Device memory in use, shown when known (a GPU engine).
    device_memory: Option<u64>,
    /// What is counted (`None`: training steps).
    unit: Option<&'static str>,
}

impl Progress {
    /// Starts reporting at `start_step` of `total`.
    pub fn new(total: u64, start_step: u64, mode: ProgressMode) -> Progress {
        let out = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => {
                Out::Bar(bar(total, start_step))
            }
            ProgressMode::Auto => Out::Plain {
                interval: PLAIN_INTERVAL,
                sink: Box::new(std::io::stderr()),
                last: None,
            },
            ProgressMode::Bar => Out::Bar(bar(total, start_step)),
            ProgressMode::Plain { interval, sink } => Out::Plain {
                interval,
                sink,
                last: None,
            },
            ProgressMode::Hidden => Out::Hidden,
        };
        Progress {
            out,
            total,
            start_step,
            started: Instant::now(),
            samples_per_step: 0,
            device_memory: None,
            unit: None,
        }
    }

    /// Counts `unit` (e.g. `examples`) instead of steps: lines read
    /// `examples 120/4004` and the rate `12.0 examples/s`.
    pub fn with_unit(mut self, unit: &'static str) -> Progress {
        self.unit = Some(unit);
        self
    }

    /// Shows samples/s too, at `n` samples per step (the global batch).
    pub fn with_samples_per_step(mut self, n: u64) -> Progress {
        self.samples_per_step = n;
        self
    }

    /// Shows `bytes` of device memory in use from the next update on.
    pub fn set_device_memory(&mut self, bytes: Option<u64>) {
        self.device_memory = bytes;
    }

    /// Records that `step` is done, with the current loss if known.
    pub fn update(&mut self, step: u64, loss: Option<f64>) {
        self.update_at(step, loss, Instant::now());
    }

    fn update_at(&mut self, step: u64, loss: Option<f64>, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        let mut stats = Stats::new(step, self.total, self.start_step, elapsed, loss);
        if self.samples_per_step > 0 {
            stats.samples_per_s = Some(stats.rate * self.samples_per_step as f64);
        }
        stats.device_memory = self.device_memory;
        stats.unit = self.unit;
        match &mut self.out {
            Out::Bar(b) => {
                b.set_position(step);
                b.set_message(stats.message());
            }
            Out::Plain {
                interval,
                sink,
                last,
            } => {
                let due = last.is_none_or(|t| now.saturating_duration_since(t) >= *interval);
                if due || step >= self.total {
                    *last = Some(now);
                    // Progress output is best effort: a closed stderr must
                    // not stop training.
                    let _ = writeln!(sink, "{}", stats.line());
                    let _ = sink.flush();
                }
            }
            Out::Hidden => {}
        }
    }

    /// Prints a message without breaking the bar.
    pub fn println(&mut self, msg: &str) {
        match &mut self.out {
            Out::Bar(b) => b.println(msg),
            Out::Plain { sink, .. } => {
                let _ = writeln!(sink, "{msg}");
            }
            Out::Hidden => {}
        }
    }

    /// Leaves the bar on screen in its final state.
    pub fn finish(&mut self) {
        if let Out::Bar(b) = &self.out {
            b.finish();
        }
    }
}

fn bar(total: u64, start_step: u64) -> ProgressBar {
    let b = ProgressBar::new(total).with_position(start_step);
    // The template is a constant; if indicatif ever rejects it, fall back to
    // its default style rather than fail.
    if let Ok(style) =
        ProgressStyle::with_template("[{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} {msg}")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

/// Numbers shown for one update.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub step: u64,
    pub total: u64,
    /// Steps per second since this process started reporting.
    pub rate: f64,
    /// Time left at that rate (`None` until a step is done).
    pub eta: Option<Duration>,
    pub loss: Option<f64>,
    /// Samples per second at that rate, when the samples per step are known.
    pub samples_per_s: Option<f64>,
    /// Device memory in use (bytes), when the engine runs on a GPU.
    pub device_memory: Option<u64>,
    /// What is counted (`None`: steps).
    pub unit: Option<&'static str>,
}

impl Stats {
    pub fn new(
        step: u64,
        total: u64,
        start_step: u64,
        elapsed: Duration,
        loss: Option<f64>,
    ) -> Stats {
        let done = step.saturating_sub(start_step);
        let secs = elapsed.as_secs_f64();
        let rate = if done > 0 && secs > 0.0 {
            done as f64 / secs
        } else {
            0.0
        };
        let eta =
            (rate > 0.0).then(|| Duration::from_secs_f64(total.saturating_sub(step) as f64 / rate));
        Stats {
            step,
            total,
            rate,
            eta,
            loss,
            samples_per_s: None,
            device_memory: None,
            unit: None,
        }
    }

    /// The bar's message: rate, ETA and loss.
    pub fn message(&self) -> String {
        let eta = self.eta.map_or_else(|| "?".to_string(), format_duration);
        let mut s = match self.unit {
            Some(unit) => format!("{:.1} {unit}/s", self.rate),
            None => format!("{:.2} it/s", self.rate),
        };
        if let Some(sps) = self.samples_per_s {
            s.push_str(&format!(" {sps:.1} samples/s"));
        }
        if let Some(bytes) = self.device_memory {
            s.push_str(&format!(
                " gpu mem {:.1} GiB",
                bytes as f64 / (1u64 << 30) as f64
            ));
        }
        s.push_str(&format!(" eta {eta}"));
        if let Some(l) = self.loss {
            s.push_str(&format!(" loss {l:.4}"));
        }
        s
    }

    /// A plain log line.
    pub fn line(&self) -> String {
        let pct = if self.total > 0 {
            100.0 * self.step as f64 / self.total as f64
        } else {
            100.0
        };
        format!(
            "{} {}/{} ({pct:.1}%) {}",
            self.unit.unwrap_or("step"),
            self.step,
            self.total,
            self.message()
        )
    }
}

/// `1h02m03s`, `4m05s` or `6s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn stats_and_formatting() {
        let s = Stats::new(150, 1000, 100, Duration::from_secs(10), Some(1.23456));
        assert_eq!(s.rate, 5.0);
        assert_eq!(s.eta, Some(Duration::from_secs(170)));
        assert_eq!(
            s.line(),
            "step 150/1000 (15.0%) 5.00 it/s eta 2m50s loss 1.2346"
        );
        let s = Stats::new(100, 1000, 100, Duration::from_secs(10), None);
        assert_eq!(s.eta, None);
        assert_eq!(s.message(), "0.00 it/s eta ?");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
        assert_eq!(format_duration(Duration::from_secs(6)), "6s");
    }

    #[test]
    fn plain_mode_prints_at_most_once_per_interval() {
        let sink = Shared::default();
        let mut p = Progress::new(
            10,
            0,
            ProgressMode::Plain {
                interval: Duration::from_secs(5),
                sink: Box::new(sink.clone()),
            },
        );
        let t0 = p.started;
        for step in 1..=10u64 {
            // One step per second: lines at 1 s, 6 s and the final step.
            p.update_at(step, Some(0.5), t0 + Duration::from_secs(step));
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("step 1/10 (10.0%) 1.00 it/s eta 9s"),
            "{text}"
        );
        assert!(lines[1].starts_with("step 6/10"), "{text}");
        assert!(lines[2].starts_with("step 10/10 (100.0%)"), "{text}");
        p.println("eval done");
        assert!(String::from_utf8(sink.0.lock().unwrap().clone())
            .unwrap()
            .ends_with("eval done\n"));
    }

    #[test]
    fn samples_per_second_when_the_batch_is_known() {
        let s = Stats {
            samples_per_s: Some(5.0 * 768.0),
            ..Stats::new(150, 1000, 100, Duration::from_secs(10), Some(1.23456))
        };
        assert_eq!(
            s.line(),
            "step 150/1000 (15.0%) 5.00 it/s 3840.0 samples/s eta 2m50s loss 1.2346"
        );
        let sink = Shared::default();
        let mut p = Progress::new(
            4,
            0,
            ProgressMode::Plain {
                interval: Duration::from_secs(60),
                sink: Box::new(sink.clone()),
            },
        )
        .with_samples_per_step(8);
        let t0 = p.started;
        p.update_at(1, None, t0 + Duration::from_secs(2));
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "step 1/4 (25.0%) 0.50 it/s 4.0 samples/s eta 6s\n");
        // A GPU engine's memory joins the line once known.
        p.set_device_memory(Some(3 << 29));
        p.update_at(4, None, t0 + Duration::from_secs(8));
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.ends_with("step 4/4 (100.0%) 0.50 it/s 4.0 samples/s gpu mem 1.5 GiB eta 0s\n"),
            "{text}"
        );
    }

    #[test]
    fn hidden_and_bar_modes_do_not_panic() {
        let mut p = Progress::new(5, 0, ProgressMode::Hidden);
        p.update(1, None);
        p.finish();
        let mut p = Progress::new(5, 2, ProgressMode::Bar);
        p.update(3, Some(0.1));
        p.println("x");
        p.finish();
    }
}
