//! Whether a command may replace the file at its `--out`: only when nothing
//! is there, when it is a previous output of the same command (recognised by
//! its content), or when the user passed `--force`. A typo such as
//! `--out model/weights.safetensors` must never destroy a user's file.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Submissions larger than this are not read to recognise them (an ARC
/// submission is a few MB; anything far larger is not one of ours).
const MAX_SUBMISSION_BYTES: u64 = 512 << 20;

/// Which command's output a file should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `trm infer`: a Kaggle `submission.json`.
    Submission,
    /// `trm step-dump`: a safetensors dump of one ACT step.
    StepDump,
}

impl OutputKind {
    fn what(self) -> &'static str {
        match self {
            OutputKind::Submission => "submission written by `trm infer`",
            OutputKind::StepDump => "dump written by `trm step-dump`",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "--out {path} exists and is not a previous {what}; refusing to overwrite it: \
         choose another --out, or pass --force to replace it"
    )]
    NotOurs { path: PathBuf, what: &'static str },
    #[error("--out {path} is a folder; give a file path (e.g. {path}/{example})")]
    IsFolder {
        path: PathBuf,
        example: &'static str,
    },
    #[error("--out {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Ok when `path` may be written as output of `kind`.
pub fn check_replaceable(path: &Path, kind: OutputKind, force: bool) -> Result<(), OutputError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(OutputError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if meta.is_dir() {
        return Err(OutputError::IsFolder {
            path: path.to_path_buf(),
            example: match kind {
                OutputKind::Submission => "submission.json",
                OutputKind::StepDump => "dump.safetensors",
            },
        });
    }
    if force || is_previous_output(path, kind, meta.len()) {
        return Ok(());
    }
    Err(OutputError::NotOurs {
        path: path.to_path_buf(),
        what: kind.what(),
    })
}

fn is_previous_output(path: &Path, kind: OutputKind, len: u64) -> bool {
    match kind {
        OutputKind::Submission => len <= MAX_SUBMISSION_BYTES && is_submission(path),
        OutputKind::StepDump => is_step_dump(path),
    }
}

/// A JSON object of puzzle id -> list of {"attempt_1": grid, ...}.
fn is_submission(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Ok(Value::Object(puzzles)) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    puzzles.values().all(|v| {
        v.as_array().is_some_and(|tests| {
            tests.iter().all(|t| {
                t.as_object()
                    .is_some_and(|o| !o.is_empty() && o.keys().all(|k| k.starts_with("attempt_")))
            })
        })
    })
}

/// A safetensors file holding the step's scalar outputs (no weights file
/// has a `loss` tensor).
fn is_step_dump(path: &Path) -> bool {
    let Ok(names) = crate::model::safetensors_io::list_tensors(path) else {
        return false;
    };
    ["loss", "lm_loss", "q_halt_loss", "logits", "z_H", "z_L"]
        .iter()
        .all(|n| names.contains_key(*n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submission_is_recognised_and_others_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let sub = tmp.path().join("s.json");
        assert!(check_replaceable(&sub, OutputKind::Submission, false).is_ok());
        std::fs::write(&sub, r#"{"a1":[{"attempt_1":[[1]],"attempt_2":[[0]]}]}"#).unwrap();
        assert!(check_replaceable(&sub, OutputKind::Submission, false).is_ok());
        let other = tmp.path().join("notes.json");
        std::fs::write(&other, r#"{"a1":{"train":[]}}"#).unwrap();
        let e = check_replaceable(&other, OutputKind::Submission, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force") && e.contains("another --out"), "{e}");
        assert!(check_replaceable(&other, OutputKind::Submission, true).is_ok());
        // Not a step dump either.
        assert!(check_replaceable(&sub, OutputKind::StepDump, false).is_err());
        let e = check_replaceable(tmp.path(), OutputKind::Submission, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a folder"), "{e}");
    }
}
