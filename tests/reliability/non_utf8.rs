//! Output folders whose names are not UTF-8 get an error naming the option,
//! never a panic, and nothing is left behind.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use trm::data::builder::{build_dataset, BuildOptions, BuildUi};

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn build_dataset_refuses_a_non_utf8_output_dir_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("syn");
    trm::data::synthetic::write_arc_files(&prefix, 3, 1, 4, 0).unwrap();
    let before = entries(dir.path());
    let out = dir.path().join(OsStr::from_bytes(b"out\xff"));
    let opts = BuildOptions {
        num_aug: 1,
        canvas_side: 5,
        ..BuildOptions::new(
            &prefix.display().to_string(),
            &out,
            &["training", "evaluation"],
            "evaluation",
        )
    };
    let e = build_dataset(&opts, BuildUi::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "--output-dir '{}' is not valid UTF-8; it is recorded as text, so choose a name in UTF-8",
            out.display()
        )
    );
    assert_eq!(
        entries(dir.path()),
        before,
        "no .partial or other folder left"
    );
}

#[test]
fn demo_refuses_a_non_utf8_out_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(OsStr::from_bytes(b"demo\x80"));
    let opts = trm::demo::DemoOptions {
        out_dir: out.clone(),
        verbose: false,
        ..Default::default()
    };
    let e = trm::demo::run(&opts).unwrap_err().to_string();
    assert!(
        e.starts_with("--out '") && e.contains("is not valid UTF-8"),
        "{e}"
    );
    assert!(entries(dir.path()).is_empty());
}
