//! `RUN_DIR/metrics.jsonl`: one JSON object per line,
//! `{"step": N, "time": unix_secs, "train/loss": ..., ...}`.
//!
//! Each line goes out in one write, so a crash can only tear the last line;
//! the reader skips a torn last line and the writer cuts it off before
//! appending (a resumed run keeps appending to the same file). Non-finite
//! values are written as `null` (JSON has no NaN) and read back as NaN.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{io_err, TelemetryError};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Keys every record has; metric names may not use them.
const RESERVED: [&str; 2] = ["step", "time"];

type Result<T> = std::result::Result<T, TelemetryError>;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends metrics records to `RUN_DIR/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens (or creates) `run_dir/metrics.jsonl` for appending, creating the
    /// folder if needed and cutting off a line torn by an earlier crash.
    pub fn create(run_dir: &Path) -> Result<MetricsWriter> {
        fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
        let path = run_dir.join(METRICS_FILE);
        drop_torn_tail(&path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(MetricsWriter { path, file })
    }

    /// Drops the records past `step` (those a resume from `step` replays),
    /// rewriting the file atomically; returns how many were dropped.
    pub fn cut_after(run_dir: &Path, step: u64) -> Result<usize> {
        let path = run_dir.join(METRICS_FILE);
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(0);
        };
        let mut kept = String::with_capacity(text.len());
        let mut dropped = 0;
        for line in text.lines() {
            let later = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s > step);
            if later {
                dropped += 1;
            } else {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if dropped > 0 {
            let tmp = run_dir.join(format!("{METRICS_FILE}.tmp"));
            fs::write(&tmp, kept).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        Ok(dropped)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one record for `step`, stamped with the current time.
    pub fn log<S: AsRef<str>>(&mut self, step: u64, values: &[(S, f64)]) -> Result<()> {
        self.log_at(step, unix_time(), values)
    }

    /// Writes one record with an explicit time (seconds since the epoch).
    pub fn log_at<S: AsRef<str>>(
        &mut self,
        step: u64,
        time: f64,
        values: &[(S, f64)],
    ) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".to_string(), step.into());
        obj.insert("time".to_string(), time.into());
        for (name, value) in values {
            let name = name.as_ref();
            if RESERVED.contains(&name) {
                return Err(TelemetryError::ReservedName {
                    path: self.path.clone(),
                    name: name.to_string(),
                });
            }
            // serde_json turns NaN and infinities into null.
            obj.insert(name.to_string(), (*value).into());
        }
        let mut line = serde_json::Value::Object(obj).to_string();
        line.push('\n');
        // One write per line, unbuffered: the record is in the file (and
        // visible to `tail -f`) as soon as this returns.
        self.file
            .write_all(line.as_bytes())
            .map_err(io_err(&self.path))
    }
}

/// Truncates `path` after its last newline, if the file exists and does not
/// end with one.
fn drop_torn_tail(path: &Path) -> Result<()> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    if bytes.last().is_none_or(|&b| b == b'\n') {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(keep as u64).map_err(io_err(path))
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRecord {
    pub step: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// Metric name -> value (`null` on disk reads back as NaN).
    pub values: BTreeMap<String, f64>,
}

/// Reads every record of a metrics.jsonl file, in file order. A torn last
/// line (no trailing newline, not valid JSON) is skipped; a bad line anywhere
/// else is an error naming its line number. Non-numeric fields are ignored.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let ends_cleanly = bytes.last().is_none_or(|&b| b == b'\n');
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let n = lines.len();
    let mut out = Vec::new();
    for (i, line) in lines.into_iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let torn_ok = i + 1 == n && !ends_cleanly;
        let value: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(_) if torn_ok => break,
            Err(source) => {
                return Err(TelemetryError::BadLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source,
                })
            }
        };
        match parse_record(value) {
            Ok(r) => out.push(r),
            Err(_) if torn_ok => break,
            Err(reason) => {
                return Err(TelemetryError::BadRecord {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason,
                })
            }
        }
    }
    Ok(out)
}

fn parse_record(value: serde_json::Value) -> std::result::Result<MetricRecord, String> {
    let serde_json::Value::Object(obj) = value else {
        return Err("expected a JSON object".to_string());
    };
    let step = obj
        .get("step")
        .and_then(serde_json::Value::as_u64)
        .ok_or("no non-negative integer `step`")?;
    let time = obj
        .get("time")
        .and_then(serde_json::Value::as_f64)
        .ok_or("no numeric `time`")?;
    let mut values = BTreeMap::new();
    for (k, v) in obj {
        if RESERVED.contains(&k.as_str()) {
            continue;
        }
        match v {
            serde_json::Value::Null => {
                values.insert(k, f64::NAN);
            }
            serde_json::Value::Number(x) => {
                if let Some(x) = x.as_f64() {
                    values.insert(k, x);
                }
            }
            _ => {}
        }
    }
    Ok(MetricRecord { step, time, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_nan_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut w = MetricsWriter::create(&run).unwrap();
        w.log_at(1, 100.5, &[("train/loss", 2.5), ("train/lr", 1e-4)])
            .unwrap();
        w.log_at(2, 101.0, &[("train/loss", f64::NAN)]).unwrap();
        let path = w.path().to_path_buf();
        assert_eq!(path, run.join(METRICS_FILE));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"step":1,"time":100.5,"train/loss":2.5,"train/lr":0.0001}"#
        );

        // A crash mid-line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"step":3,"time":10"#).unwrap();
        drop(f);

        let r = read_metrics(&path).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].step, 1);
        assert_eq!(r[0].time, 100.5);
        assert_eq!(r[0].values["train/loss"], 2.5);
        assert_eq!(r[0].values["train/lr"], 1e-4);
        assert!(r[1].values["train/loss"].is_nan());

        // Reopening (resume) cuts the torn line off and appends after it.
        let mut w = MetricsWriter::create(&run).unwrap();
        w.log_at(3, 102.0, &[("train/loss", 1.25)]).unwrap();
        let r = read_metrics(&path).unwrap();
        assert_eq!(r.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(r[2].values["train/loss"], 1.25);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        fs::write(
            &path,
            "{\"step\":1,\"time\":1}\n{oops\n{\"step\":2,\"time\":2}\n",
        )
        .unwrap();
        let e = read_metrics(&path).unwrap_err();
        assert!(matches!(e, TelemetryError::BadLine { line: 2, .. }), "{e}");

        fs::write(&path, "{\"time\":1}\n").unwrap();
        let e = read_metrics(&path).unwrap_err();
        assert!(e.to_string().contains("step"), "{e}");
    }

    #[test]
    fn reserved_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path()).unwrap();
        let e = w.log(1, &[("step", 1.0)]).unwrap_err();
        assert!(matches!(e, TelemetryError::ReservedName { .. }), "{e}");
        w.log(1, &[("x", 1.0)]).unwrap();
        let r = read_metrics(w.path()).unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].time > 1.6e9);
    }
}
