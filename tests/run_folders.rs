//! Reliability of the `trm` command line (issue 14): one owner per run
//! folder, no run overwritten by a fresh one, graceful preemption with an
//! exact resume, metrics without replayed duplicates, config keys that do
//! nothing refused. Each test runs the real binary on a tiny dataset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

fn trm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trm"))
}

const TINY: [&str; 6] = [
    "arch.hidden_size=16",
    "arch.L_layers=1",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "global_batch_size=8",
    "seed=3",
];

fn train_cmd(data: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut c = trm();
    c.args(["train", "--config", "cpu-tiny", "--quiet"])
        .arg(format!("data_paths=[{}]", data.display()))
        .arg(format!("checkpoint_path={}", run.display()))
        .args(TINY)
        .args(extra);
    c
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failed: {stderr}");
    stderr
}

fn fails(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "was accepted: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn steps(run: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(run)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_prefix("step_")?.parse().ok()
        })
        .collect();
    v.sort();
    v
}

/// (step, has train/lm_loss) of every metrics record.
fn metric_steps(run: &Path) -> Vec<(u64, bool)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v.get("train/lm_loss").is_some(),
            )
        })
        .collect()
}

#[test]
fn a_fresh_run_never_overwrites_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_dataset(tmp.path(), "data", 4, 1, 2, (1, 42));
    let run = tmp.path().join("v");
    ok(&train_cmd(&data, &run, &["epochs=2", "eval_interval=1"])
        .output()
        .unwrap());
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let err = fails(
        &train_cmd(
            &data,
            &run,
            &["epochs=2", "eval_interval=1", "checkpoint_keep_last=1"],
        )
        .output()
        .unwrap(),
    );
    assert!(err.contains("already holds a run"), "{err}");
    assert!(
        err.contains("--resume latest") && err.contains("--start-over"),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
    // asked explicitly: the old run is moved aside whole, not mixed
    ok(&train_cmd(&data, &run, &["epochs=2", "eval_interval=1"])
        .arg("--start-over")
        .output()
        .unwrap());
    let aside = tmp.path().join("v.previous-1");
    assert_eq!(std::fs::read(aside.join("metrics.jsonl")).unwrap(), before);
    assert!(!steps(&aside).is_empty());
}

#[test]
fn config_keys_that_do_nothing_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_dataset(tmp.path(), "data", 4, 1, 2, (1, 42));
    let run = tmp.path().join("r");
    let cases: [(&[&str], &str); 4] = [
        (&["backend=cuda"], "--device"),
        (&["checkpoint_path="], "checkpoint_path"),
        (&["eval_save_outputs=[inputs]"], "eval_save_outputs"),
        (&["global_batch_size=100000"], "0 steps"),
    ];
    for (args, want) in cases {
        let err = fails(&train_cmd(&data, &run, args).output().unwrap());
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(!run.join("metrics.jsonl").exists());
    // a run that would never checkpoint says so at start, with the numbers
    let err = ok(&train_cmd(
        &data,
        &run,
        &["epochs=2", "eval_interval=1", "min_eval_interval=5"],
    )
    .output()
    .unwrap());
    assert!(
        err.contains("min_eval_interval 5") && err.contains("checkpoint"),
        "{err}"
    );
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real SIGTERM to a real `trm train`: it finishes the step, checkpoints,
/// exits 75; while it runs a second writer is refused with its pid; then
/// `--resume latest` ends bit-identical to an uninterrupted run, and
/// metrics.jsonl holds no replayed step twice.
#[test]
fn sigterm_checkpoints_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_dataset(tmp.path(), "data", 4, 1, 2, (1, 42));
    let args = ["epochs=6", "eval_interval=3"];
    let full = tmp.path().join("full");
    ok(&train_cmd(&data, &full, &args).output().unwrap());

    let run = tmp.path().join("cut");
    let child = train_cmd(&data, &run, &args)
        .env("TRM_STEP_PAUSE_MS", "150")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let lines = |p: &PathBuf| {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    wait_for("the first steps", Duration::from_secs(60), || {
        lines(&run) >= 2
    });

    let err = fails(&train_cmd(&data, &run, &args).output().unwrap());
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    let err = fails(
        &train_cmd(&data, &run, &args)
            .args(["--resume", "latest"])
            .output()
            .unwrap(),
    );
    assert!(err.contains(&format!("pid {pid}")), "{err}");

    // SAFETY: a plain kill(2) to the child this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("SIGTERM") && stderr.contains("--resume latest"),
        "{stderr}"
    );
    let last_full = *steps(&full).last().unwrap();
    let cut_at = *steps(&run).last().unwrap();
    assert!(cut_at < last_full, "stopped at {cut_at} of {last_full}");

    ok(&train_cmd(&data, &run, &args)
        .args(["--resume", "latest"])
        .output()
        .unwrap());
    let a = full.join(format!("step_{last_full}"));
    let b = run.join(format!("step_{last_full}"));
    let mut n = 0;
    for e in std::fs::read_dir(&a).unwrap() {
        let name = e.unwrap().file_name();
        if name == "manifest.json" {
            // its SHA-256 of state.json covers the folder name; the rest is compared here
            continue;
        }
        let (x, mut y) = (
            std::fs::read(a.join(&name)).unwrap(),
            std::fs::read(b.join(&name)).unwrap(),
        );
        if name == "state.json" {
            // the saved config names its own run folder
            let t = String::from_utf8(y).unwrap();
            y = t
                .replace(&run.display().to_string(), &full.display().to_string())
                .into_bytes();
        }
        assert!(x == y, "{name:?} differs after the resume");
        n += 1;
    }
    assert!(n > 0);
    // the replayed steps were cut from metrics.jsonl before the resume
    let (ma, mb) = (metric_steps(&full), metric_steps(&run));
    assert_eq!(ma, mb);
}

/// Demo options: subset lists never swallow overrides, options that need
/// `--arc-prefix` say so, and the config is checked before any build.
#[test]
fn demo_options_are_checked_together_and_first() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d");
    let err = fails(
        &trm()
            .args(["demo", "--out"])
            .arg(&out)
            .args(["--arc-subsets", "concept", "epochs=1"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("--arc-prefix"), "{err}");
    // `epochs=20` reaches the config (cpu-tiny's eval_interval does not divide it)
    let err = fails(
        &trm()
            .args(["demo", "--out"])
            .arg(&out)
            .args([
                "--arc-prefix",
                "/nonexistent/arc",
                "--arc-test-set",
                "concept",
            ])
            .args(["--arc-subsets", "concept", "epochs=20"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("epochs 20"), "{err}");
    assert!(
        !out.join("data").exists(),
        "built before the config was checked"
    );
}

/// A checkpoint finds its dataset from any folder (it records the absolute
/// path), says which dataset it needs when it has moved, and takes a moved
/// copy whose build hash matches.
#[test]
fn package_finds_the_dataset_from_another_folder_or_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    ok(&trm()
        .current_dir(&a)
        .args(["demo", "--out", "demo", "--train-puzzles", "6"])
        .args(["--eval-puzzles", "2", "epochs=4", "eval_interval=4"])
        .args(TINY)
        .output()
        .unwrap());
    let run = a.join("demo/run");
    let step = *steps(&run).last().expect("a checkpoint");
    let ck = run.join(format!("step_{step}"));
    let package = |out: &str, dataset: Option<&Path>| {
        let mut c = trm();
        c.current_dir(&b)
            .args(["package", "--checkpoint"])
            .arg(&ck)
            .args(["--out", out]);
        if let Some(d) = dataset {
            c.arg("--dataset").arg(d);
        }
        c.output().unwrap()
    };
    // The issue's case: the config says `demo/data`, run from another folder.
    ok(&package("m1", None));

    let moved = a.join("moved");
    std::fs::rename(a.join("demo/data"), &moved).unwrap();
    let err = fails(&package("m2", None));
    let data = a.join("demo/data");
    assert!(
        err.contains(&data.display().to_string())
            && err.contains("build hash")
            && err.contains("--dataset PATH"),
        "{err}"
    );
    assert!(!b.join("m2").exists());
    ok(&package("m2", Some(&moved)));

    // Another dataset under --dataset is named as such.
    let other = a.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let info = std::fs::read_to_string(moved.join("build_info.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["input_hash"] = "0".repeat(64).into();
    std::fs::write(other.join("build_info.json"), v.to_string()).unwrap();
    let err = fails(&package("m3", Some(&other)));
    assert!(err.contains("another dataset"), "{err}");
}
