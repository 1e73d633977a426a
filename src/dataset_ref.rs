//! Which dataset a checkpoint was trained on, found again later: the run
//! config keeps the path as typed (relative to where training ran), so a
//! checkpoint also records the absolute path and the dataset's identity, its
//! build hash (`input_hash` of `build_info.json`). A dataset that moved is
//! recognised by that hash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::builder::BUILD_INFO_FILE;

/// Key of the list in a checkpoint state's `extra`.
pub const EXTRA_KEY: &str = "datasets";

/// One training dataset as recorded at the start of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRef {
    /// Absolute path when the run started.
    pub path: PathBuf,
    /// `None` for a dataset without `build_info.json` (not built by trm).
    pub build_hash: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetRefError {
    #[error(
        "the checkpoint was trained on the dataset at {path}{hash}, which is no longer there \
         (tried {tried}); give its folder with --dataset PATH (a copy or a moved folder is \
         accepted when its build hash matches)"
    )]
    Gone {
        path: PathBuf,
        hash: String,
        tried: String,
    },
    #[error(
        "--dataset {given} is another dataset (build hash {found}) than the one the checkpoint \
         was trained on ({path}, build hash {expected}); give that dataset's folder"
    )]
    Mismatch {
        given: PathBuf,
        found: String,
        path: PathBuf,
        expected: String,
    },
}

/// The absolute form of `p` (relative to the current folder).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The build hash of the dataset in `dir`, if it has a readable build info.
pub fn build_hash(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(BUILD_INFO_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("input_hash")?.as_str().map(str::to_owned)
}

/// What a run records about its datasets, for the checkpoint's `extra`.
pub fn record(paths: &[PathBuf]) -> serde_json::Value {
    let refs: Vec<DatasetRef> = paths
        .iter()
        .map(|p| DatasetRef {
            path: absolute(p),
            build_hash: build_hash(p),
        })
        .collect();
    serde_json::to_value(refs).unwrap_or_default()
}

/// The datasets a checkpoint's `extra` records (none for older checkpoints).
pub fn recorded(extra: &serde_json::Value) -> Vec<DatasetRef> {
    extra
        .get(EXTRA_KEY)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// The folder of the dataset a checkpoint trained on: `given` if the user
/// named one (refused if its build hash differs from the recorded one), else
/// the recorded absolute path, else the config's path as typed, each taken
/// only when its build hash matches.
pub fn resolve(
    typed: &Path,
    recorded: Option<&DatasetRef>,
    given: Option<&Path>,
) -> Result<PathBuf, DatasetRefError> {
    let expected = recorded.and_then(|r| r.build_hash.clone());
    if let Some(g) = given {
        if let (Some(want), Some(found)) = (&expected, build_hash(g)) {
            if &found != want {
                return Err(DatasetRefError::Mismatch {
                    given: g.to_path_buf(),
                    found,
                    path: recorded.map(|r| r.path.clone()).unwrap_or_default(),
                    expected: want.clone(),
                });
            }
        }
        return Ok(g.to_path_buf());
    }
    let mut candidates: Vec<PathBuf> = recorded.map(|r| r.path.clone()).into_iter().collect();
    if !candidates.iter().any(|c| c == typed) {
        candidates.push(typed.to_path_buf());
    }
    for c in &candidates {
        let Some(found) = build_hash(c) else { continue };
        if expected.as_ref().is_none_or(|want| *want == found) {
            return Ok(c.clone());
        }
    }
    match recorded {
        // Old checkpoint, no record: the caller's own message on the typed path.
        None => Ok(typed.to_path_buf()),
        Some(r) => Err(DatasetRefError::Gone {
            path: r.path.clone(),
            hash: r
                .build_hash
                .as_ref()
                .map(|h| format!(" (build hash {h})"))
                .unwrap_or_default(),
            tried: candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(dir: &Path, hash: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join(BUILD_INFO_FILE),
            format!(r#"{{"input_hash": "{hash}"}}"#),
        )
        .unwrap();
    }

    #[test]
    fn a_moved_dataset_is_found_by_its_hash_and_another_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        dataset(&a, "h1");
        let r = DatasetRef {
            path: a.clone(),
            build_hash: Some("h1".into()),
        };
        assert_eq!(resolve(Path::new("rel/a"), Some(&r), None).unwrap(), a);
        std::fs::rename(&a, &b).unwrap();
        let e = resolve(Path::new("rel/a"), Some(&r), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--dataset") && e.contains("h1"), "{e}");
        assert_eq!(resolve(Path::new("x"), Some(&r), Some(&b)).unwrap(), b);
        dataset(&c, "h2");
        let e = resolve(Path::new("x"), Some(&r), Some(&c))
            .unwrap_err()
            .to_string();
        assert!(e.contains("h2") && e.contains("h1"), "{e}");
    }
}
