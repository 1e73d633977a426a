//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Whether `python` runs and imports numpy.
fn has_numpy(python: &std::path::Path) -> bool {
    Command::new(python)
        .args(["-c", "import numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A python interpreter with numpy, for cross-checking files with numpy:
/// `$TRM_PYTHON` if set, else `python3`, else the venv that
/// `tools/install-test-python.sh` creates. Panics (the test fails, it is
/// never skipped) when none has numpy.
pub fn python_with_numpy() -> PathBuf {
    let mut tried = Vec::new();
    let candidates: Vec<PathBuf> = match std::env::var_os("TRM_PYTHON") {
        // An explicit choice is the only candidate: a wrong one should fail loudly.
        Some(p) if !p.is_empty() => vec![PathBuf::from(p)],
        _ => {
            let mut c = vec![PathBuf::from("python3")];
            let cache = std::env::var_os("TRM_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/trm")));
            if let Some(cache) = cache {
                c.push(cache.join("pyenv/bin/python"));
            }
            c
        }
    };
    for p in candidates {
        if has_numpy(&p) {
            return p;
        }
        tried.push(p.display().to_string());
    }
    panic!(
        "no python with numpy found (tried: {}). This test needs one: run \
         `tools/install-test-python.sh` and set TRM_PYTHON to the path it prints, e.g.\n  \
         TRM_PYTHON=\"$(tools/install-test-python.sh)\" cargo test",
        tried.join(", ")
    );
}

/// Builds `n_train + n_eval` synthetic puzzles into `root/name` with the real
/// builder on an 8x8 canvas (small, fast datasets for training tests).
pub fn synthetic_dataset(
    root: &std::path::Path,
    name: &str,
    n_train: usize,
    n_eval: usize,
    num_aug: usize,
    seeds: (u64, u64),
) -> PathBuf {
    use trm::data::builder::{build_dataset, BuildOptions, BuildUi};
    let prefix = root.join(format!("{name}-arc")).join("syn");
    trm::data::synthetic::write_arc_files(&prefix, n_train, n_eval, 6, seeds.0).unwrap();
    let out = root.join(name);
    let opts = BuildOptions {
        num_aug,
        seed: seeds.1,
        canvas_side: 8,
        ..BuildOptions::new(
            &prefix.display().to_string(),
            &out,
            &["training", "evaluation"],
            "evaluation",
        )
    };
    let ui = BuildUi {
        verbose: false,
        force: false,
    };
    build_dataset(&opts, ui).unwrap();
    out
}
