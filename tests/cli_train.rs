//! The `trm` binary: `train` with the reference's override syntax, config
//! errors, `plot`, and the `demo` job at a reduced size.

use std::path::Path;
use std::process::Command;

mod common;

fn trm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trm"))
}

fn tiny_dataset(root: &Path) -> std::path::PathBuf {
    common::synthetic_dataset(root, "data", 4, 1, 2, (1, 42))
}

const TINY: [&str; 6] = [
    "arch.hidden_size=16",
    "arch.L_layers=1",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "global_batch_size=8",
    "epochs=2",
];

/// The reference's command line, pasted (the shell has already removed the
/// quotes around the list): every override lands in all_config.yaml.
#[test]
fn train_takes_reference_style_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_dataset(tmp.path());
    let out = trm()
        .current_dir(tmp.path())
        .args(["train", "--config", "cpu-tiny", "--quiet"])
        .arg(format!("data_paths=[{}]", data.display()))
        .args(TINY)
        .args([
            "arch.L_cycles=1",
            "+run_name=x",
            "ema=True",
            "eval_interval=1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("trained"), "{stdout}");
    // checkpoints/<dataset>-ACT-trm/x
    let run = tmp
        .path()
        .join("checkpoints")
        .join("data-ACT-trm")
        .join("x");
    let yaml = std::fs::read_to_string(run.join("all_config.yaml")).unwrap();
    assert!(yaml.contains("run_name: x"), "{yaml}");
    assert!(yaml.contains("ema: true"), "{yaml}");
    assert!(run.join("metrics.jsonl").is_file());
    let has_step = std::fs::read_dir(&run).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("step_")
    });
    assert!(has_step, "no checkpoint in {}", run.display());
    // the ARC evaluator ran after each evaluation and logged pass@K
    let evals: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("evaluator_ARC_step_")
        })
        .collect();
    assert_eq!(evals.len(), 2, "{evals:?}");
    for e in &evals {
        let sub: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.join("submission.json")).unwrap()).unwrap();
        let puzzles = sub.as_object().unwrap();
        assert_eq!(puzzles.len(), 1, "one evaluation puzzle");
        for entries in puzzles.values() {
            for entry in entries.as_array().unwrap() {
                assert!(entry.get("attempt_1").is_some() && entry.get("attempt_2").is_some());
            }
        }
        assert!(e.join("report.json").is_file());
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"ARC/pass@1\""), "{metrics}");
    // plot the run
    let out = trm().args(["plot"]).arg(&run).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.join("plots").join("losses.png").is_file());
}

/// Typos and impossible schedules are errors that name the key, with a hint.
#[test]
fn config_errors_name_the_key() {
    let cases: [(&[&str], &str); 3] = [
        (&["arch.L_cycle=4"], "arch.L_cycles"),
        (&["epochs=abc"], "epochs"),
        (&["epochs=10", "eval_interval=3"], "eval_interval"),
    ];
    for (args, want) in cases {
        let out = trm()
            .args(["train", "--config", "cpu-tiny"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = trm()
        .args(["train", "--config", "no-such-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpu-tiny"));
}

/// The demo end to end at a reduced size: it trains, the loss falls, and it
/// leaves a checkpoint, metrics and charts.
#[test]
fn demo_trains_and_the_loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("demo");
    let opts = trm::demo::DemoOptions {
        out_dir: out_dir.clone(),
        train_puzzles: 8,
        eval_puzzles: 2,
        num_aug: 4,
        verbose: false,
        overrides: [
            "arch.hidden_size=32",
            "epochs=16",
            "eval_interval=8",
            "global_batch_size=16",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..trm::demo::DemoOptions::default()
    };
    let s = trm::demo::run(&opts).unwrap();
    let loss = |i: usize| {
        s.train.train_log[i]
            .1
            .iter()
            .find(|(k, _)| k == "train/lm_loss")
            .unwrap()
            .1
    };
    let n = s.train.train_log.len();
    assert!(n >= 20, "only {n} steps");
    let first: f64 = (0..4).map(loss).sum::<f64>() / 4.0;
    let last: f64 = (n - 4..n).map(loss).sum::<f64>() / 4.0;
    assert!(last < 0.8 * first, "lm_loss {first} -> {last}");
    assert_eq!(s.train.eval_log.len(), 2);
    assert!(s
        .train
        .checkpoints
        .last()
        .unwrap()
        .join("manifest.json")
        .is_file());
    assert!(!s.plots.is_empty());
}
