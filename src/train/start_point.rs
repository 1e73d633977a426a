//! Where a run starts: fresh, or from a checkpoint named by `--resume`.
//!
//! `--resume latest-if-any` exists for launchers that restart a job with
//! the same command line (SLURM `--requeue`, a Kubernetes Job's retries):
//! the first start finds no checkpoint and starts fresh, every restart
//! continues the newest one. `--resume latest` stays strict (no checkpoint
//! is an error), so a typo in the run folder is not silently a new run.

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, CheckpointError};

/// The `--resume` value that falls back to a fresh start.
pub const LATEST_IF_ANY: &str = "latest-if-any";

/// How a run begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPoint {
    /// From scratch. `was_optional`: `--resume latest-if-any` found no
    /// checkpoint, so an earlier attempt that never checkpointed may have
    /// left logs behind; they are moved aside, as `--start-over` does.
    Fresh { was_optional: bool },
    /// From this checkpoint folder.
    Checkpoint(PathBuf),
}

impl StartPoint {
    /// Whether a fresh start may move an earlier run in `dir` aside.
    pub fn moves_old_run_aside(&self, start_over: bool) -> bool {
        match self {
            StartPoint::Fresh { was_optional } => start_over || *was_optional,
            StartPoint::Checkpoint(_) => false,
        }
    }
}

/// What `resume` (the `--resume` value) means for the run folder `dir` now.
/// Reads the folder only; nothing is created or locked.
pub fn start_point(resume: Option<&str>, dir: &Path) -> Result<StartPoint, CheckpointError> {
    match resume {
        None => Ok(StartPoint::Fresh {
            was_optional: false,
        }),
        Some(LATEST_IF_ANY) => Ok(match checkpoint::latest(dir)? {
            Some(p) => StartPoint::Checkpoint(p),
            None => StartPoint::Fresh { was_optional: true },
        }),
        Some(spec) => checkpoint::resolve(dir, spec).map(StartPoint::Checkpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder that `checkpoint::latest` accepts (it looks for the manifest).
    fn fake_checkpoint(root: &Path, step: u64) -> PathBuf {
        let p = root.join(format!("step_{step}"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("manifest.json"), "{}").unwrap();
        p
    }

    #[test]
    fn latest_if_any_is_fresh_on_an_empty_or_missing_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("not-yet");
        let fresh = StartPoint::Fresh { was_optional: true };
        assert_eq!(start_point(Some(LATEST_IF_ANY), &missing).unwrap(), fresh);
        assert!(
            !missing.exists(),
            "a start point must not create the folder"
        );
        assert_eq!(start_point(Some(LATEST_IF_ANY), tmp.path()).unwrap(), fresh);
        assert!(fresh.moves_old_run_aside(false));
    }

    #[test]
    fn latest_if_any_takes_the_newest_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        fake_checkpoint(tmp.path(), 2);
        let newest = fake_checkpoint(tmp.path(), 10);
        let got = start_point(Some(LATEST_IF_ANY), tmp.path()).unwrap();
        assert_eq!(got, StartPoint::Checkpoint(newest));
        assert!(!got.moves_old_run_aside(true));
    }

    #[test]
    fn latest_stays_strict_and_no_flag_is_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        let e = start_point(Some("latest"), tmp.path()).unwrap_err();
        assert!(matches!(e, CheckpointError::NoCheckpoint { .. }), "{e}");
        let plain = start_point(None, tmp.path()).unwrap();
        assert_eq!(
            plain,
            StartPoint::Fresh {
                was_optional: false
            }
        );
        assert!(!plain.moves_old_run_aside(false));
        assert!(plain.moves_old_run_aside(true));
        let p = fake_checkpoint(tmp.path(), 3);
        assert_eq!(
            start_point(Some("step_3"), tmp.path()).unwrap(),
            StartPoint::Checkpoint(p)
        );
    }
}
