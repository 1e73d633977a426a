//! Training telemetry: what a person watching a run sees.
//!
//! - [`metrics`]: `RUN_DIR/metrics.jsonl`, one JSON object per logged step,
//!   the source of truth for everything else (plots read it back).
//! - [`tensorboard`]: the same scalars as TensorBoard event files, written by
//!   hand (TFRecord framing + a few protobuf fields) so no TensorFlow or
//!   protobuf dependency is needed.
//! - [`plot`]: PNG line charts of metrics.jsonl drawn with a built-in bitmap
//!   font, so machines without system fonts can still plot.
//! - [`progress`]: a progress bar on a terminal, plain periodic lines in logs.
//!
//! Each writer appends and flushes per record, so a crash loses at most the
//! record being written, and readers tolerate that torn last record.

pub mod font;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod tensorboard;

use std::path::PathBuf;

/// A telemetry file that cannot be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, line {line}: not a metrics record: {source}")]
    BadLine {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}, line {line}: {reason}")]
    BadRecord {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: metric name `{name}` is reserved (every record has it)")]
    ReservedName { path: PathBuf, name: String },
    #[error("cannot encode PNG {path}: {source}")]
    Png {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TelemetryError + '_ {
    move |source| TelemetryError::Io {
        path: path.to_path_buf(),
        source,
    }
}
