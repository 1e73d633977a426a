//! Sizes too large for the machine are refused before allocating, with the
//! estimate, the limit and what to change (no abort, no panic).

use trm::config::{ConfigSource, RunConfig};
use trm::train::{train, TrainOptions};

use super::fixture::fixture;

/// A refusal from the memory check: the estimate, the limit and the hint.
fn assert_refused(e: &str, what: &str, hint: &str) {
    assert!(e.starts_with(&format!("{what} would need about ")), "{e}");
    assert!(e.contains(" of memory, more than the limit of "), "{e}");
    assert!(
        e.contains("MemAvailable in /proc/meminfo; TRM_MEMORY_LIMIT overrides it"),
        "{e}"
    );
    assert!(e.ends_with(hint), "{e}");
}

fn train_err(overrides: &[&str]) -> String {
    let f = fixture();
    let mut o = vec![
        format!("data_paths=[{}]", f.dataset.display()),
        format!(
            "checkpoint_path={}",
            f.root.join("scratch").join(overrides.join("_")).display()
        ),
    ];
    o.extend(overrides.iter().map(|s| s.to_string()));
    let opts = TrainOptions {
        progress: false,
        verbose: false,
        ..Default::default()
    };
    match RunConfig::load(ConfigSource::builtin("cpu-tiny").unwrap(), &o) {
        Err(e) => e.to_string(),
        Ok(cfg) => refused(train(&cfg, &opts)),
    }
}

#[test]
fn build_dataset_with_a_huge_num_aug_is_refused() {
    use trm::data::builder::{build_dataset, BuildOptions, BuildUi};
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("syn");
    trm::data::synthetic::write_arc_files(&prefix, 3, 1, 4, 0).unwrap();
    let out = dir.path().join("out");
    let opts = BuildOptions {
        num_aug: 99_999_999_999,
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
    assert_refused(&e, "the build", "lower --num-aug or build fewer subsets");
    assert!(!out.exists());
}

#[test]
fn train_with_a_huge_batch_or_width_is_refused() {
    let hint = "lower global_batch_size or the model's size (arch.hidden_size, arch.expansion)";
    assert_refused(
        &train_err(&["global_batch_size=100000000"]),
        "training this model",
        hint,
    );
    assert_refused(
        &train_err(&["arch.expansion=1e9"]),
        "training this model",
        hint,
    );
}

#[test]
fn epochs_at_u64_max_give_an_error_not_a_panic() {
    let e = train_err(&[
        "epochs=18446744073709551615",
        "eval_interval=18446744073709551615",
    ]);
    assert!(e.starts_with("the data order of one iteration"), "{e}");
    assert!(
        e.ends_with("lower eval_interval (epochs per evaluation)"),
        "{e}"
    );
}

#[test]
fn infer_with_a_huge_batch_or_num_aug_is_refused() {
    let f = fixture();
    for (num_aug, batch) in [(3, Some(100_000_000)), (100_000_000_000, None)] {
        let opts = trm::infer::InferOptions {
            num_aug: Some(num_aug),
            batch_size: batch,
            ..trm::infer::InferOptions::new(&f.model, &f.challenges)
        };
        let e = refused(trm::infer::infer(&opts));
        assert_refused(
            &e,
            "this inference",
            "lower --num-aug or --batch-size, or use fewer --devices",
        );
    }
}

#[test]
fn demo_with_huge_puzzle_counts_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let opts = trm::demo::DemoOptions {
        out_dir: dir.path().join("demo"),
        train_puzzles: 100_000_000,
        verbose: false,
        ..Default::default()
    };
    let e = trm::demo::run(&opts).unwrap_err().to_string();
    assert_refused(
        &e,
        "the demo's puzzles",
        "lower --train-puzzles, --eval-puzzles or --num-aug",
    );
    assert!(!dir.path().join("demo").exists());
}

/// The error of a call that must be refused.
fn refused<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("not refused"),
        Err(e) => e.to_string(),
    }
}
