//! `trm doctor` run as a user runs it: text and JSON, on whatever this
//! machine has (CI has no GPU), always exiting 0.

use std::process::{Command, Output};

use serde_json::Value;

/// The launcher variables `World::from_env` reads, cleared so the world is
/// the single process unless a test sets them.
const LAUNCHER_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "TRM_JOB_ID",
];

fn doctor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trm"));
    cmd.arg("doctor").args(args);
    for v in LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd.env_remove("TRM_KERNEL_IMAGE");
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("the trm binary runs");
    assert!(
        out.status.success(),
        "trm doctor {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(env: &[(&str, &str)]) -> Value {
    let out = doctor(&["--json"], env);
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

/// `{"ok": ...}` or `{"error": "..."}`, exactly one of them.
fn is_probe(v: &Value) -> bool {
    let Some(map) = v.as_object() else {
        return false;
    };
    map.len() == 1
        && (map.contains_key("ok") || map.get("error").is_some_and(|e| e.as_str().is_some()))
}

#[test]
fn json_reports_the_build_cpu_engine_and_world() {
    let v = json(&[]);
    let build = &v["build"];
    assert_eq!(build["version"], env!("CARGO_PKG_VERSION"));
    let commit = build["commit"].as_str().unwrap();
    assert!(
        commit == "unknown"
            || (commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
    let kernels = build["cuda_kernels"].as_bool().unwrap();
    let archs = build["architectures"].as_array().unwrap();
    let modules = build["kernel_modules"].as_u64().unwrap();
    // kernels compiled <=> modules and architectures named
    assert_eq!(kernels, modules > 0, "{build}");
    assert_eq!(kernels, !archs.is_empty(), "{build}");
    assert!(build["emulator"].is_boolean());

    for probe in [
        &v["cuda"]["driver"],
        &v["cuda"]["gpus"],
        &v["libraries"]["cublaslt"],
        &v["libraries"]["nccl"],
        &v["engine"],
        &v["world"],
    ] {
        assert!(is_probe(probe), "not a probe: {probe}");
    }
    // NCCL: loaded, or every place searched named
    if v["libraries"]["nccl"].get("error").is_some() {
        let searched = v["libraries"]["nccl_searched"].as_array().unwrap();
        assert!(!searched.is_empty(), "{}", v["libraries"]);
    }

    let cpu = &v["cpu"];
    assert!(cpu["logical_threads"].as_u64().unwrap() >= 1);
    assert!(cpu["worker_threads"].as_u64().unwrap() >= 1);
    for f in ["avx2", "avx512f", "amx"] {
        let word = cpu[f].as_str().unwrap();
        assert!(
            ["yes", "no", "n/a", "unknown"].contains(&word),
            "{f}: {word}"
        );
    }
    if cfg!(target_arch = "x86_64") {
        assert_ne!(cpu["avx2"], "n/a");
    }

    // auto never picks the emulator; cuda only with a GPU the kernels run on
    let engine = &v["engine"]["ok"];
    let device = engine["device"].as_str().unwrap();
    assert!(
        engine["why"].as_str().unwrap().starts_with("auto"),
        "{engine}"
    );
    let runnable_gpu = v["cuda"]["gpus"]["ok"]
        .as_array()
        .is_some_and(|gpus| gpus.iter().any(|g| g["kernels_run"] == true));
    match device {
        "cuda" => assert!(runnable_gpu && kernels, "{v}"),
        "cpu" => {}
        other => panic!("auto picked {other}"),
    }
    if v["cuda"]["gpus"].get("error").is_some() {
        assert_eq!(device, "cpu");
    }

    assert_eq!(v["world"]["ok"], "single process (no launcher)");
}

#[test]
fn kernel_image_variable_is_shown_and_checked() {
    let v = json(&[]);
    let auto = v["cuda"]["kernel_image"]["ok"].as_str().unwrap();
    assert!(
        auto.starts_with("auto") && auto.contains("TRM_KERNEL_IMAGE=ptx"),
        "{auto}"
    );
    let v = json(&[("TRM_KERNEL_IMAGE", "ptx")]);
    let forced = v["cuda"]["kernel_image"]["ok"].as_str().unwrap();
    assert!(forced.contains("compute_80 PTX"), "{forced}");
    // Every GPU the kernels run on then loads the PTX.
    for gpu in v["cuda"]["gpus"]["ok"].as_array().into_iter().flatten() {
        if gpu["kernels_run"] == true {
            assert_eq!(gpu["kernel_image"], "compute_80 PTX (JIT)", "{gpu}");
        }
    }

    // A value it does not know: reported, never a crash.
    let v = json(&[("TRM_KERNEL_IMAGE", "sass")]);
    let err = v["cuda"]["kernel_image"]["error"].as_str().unwrap();
    assert!(err.contains("TRM_KERNEL_IMAGE=\"sass\""), "{err}");
    // The engine choice reads it once a GPU would be used: then it says why not.
    let gpu_seen = v["cuda"]["gpus"]["ok"]
        .as_array()
        .is_some_and(|g| !g.is_empty());
    if v["build"]["cuda_kernels"] == true && gpu_seen {
        let why = v["engine"]["error"].as_str().unwrap();
        assert!(why.contains("TRM_KERNEL_IMAGE"), "{why}");
    } else {
        assert_eq!(v["engine"]["ok"]["device"], "cpu", "{v}");
    }
    let text = String::from_utf8(doctor(&[], &[("TRM_KERNEL_IMAGE", "sass")]).stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("  kernel image       invalid: TRM_KERNEL_IMAGE=")),
        "{text}"
    );
}

#[test]
fn bad_launcher_variables_are_reported_not_fatal() {
    let v = json(&[("WORLD_SIZE", "two"), ("RANK", "0")]);
    let err = v["world"]["error"].as_str().expect("world error");
    assert!(err.contains("WORLD_SIZE"), "{err}");
}

#[test]
fn text_has_every_section_and_aligned_rows() {
    let out = doctor(&[], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    for heading in ["build", "CUDA", "libraries", "CPU", "run"] {
        assert!(text.lines().any(|l| l == heading), "no {heading}: {text}");
    }
    let version = format!("  {:<18} {}", "version", env!("CARGO_PKG_VERSION"));
    assert!(text.lines().any(|l| l == version), "{text}");
    for label in [
        "driver",
        "kernel image",
        "cuBLASLt",
        "NCCL",
        "logical threads",
        "auto engine",
        "world",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("  {label} "))),
            "no {label} row: {text}"
        );
    }
}

#[test]
fn bad_arguments_fail() {
    let out = Command::new(env!("CARGO_BIN_EXE_trm"))
        .args(["doctor", "--no-such-flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
