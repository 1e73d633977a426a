//! The device choice through the commands: `--device` on `trm train`,
//! `trm infer` and `trm step-dump`, the run config's `device` key, the flag
//! winning over the key, and `emu` reaching the CUDA engine.
//!
//! On a machine where CUDA is usable the "cuda is refused" cases are
//! skipped (the GPU checks cover that path there).

use std::path::Path;
use std::process::{Command, Output};

use trm::config::{ConfigSource, RunConfig};
use trm::model::device_choice::{self, DeviceKind};
use trm::train::{train, TrainError, TrainOptions};

mod common;

fn trm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trm"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const TINY: [&str; 7] = [
    "arch.hidden_size=16",
    "arch.L_layers=1",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "global_batch_size=8",
    "epochs=2",
    "eval_interval=2",
];

fn train_cmd(tmp: &Path, data: &Path) -> Command {
    let mut c = trm();
    c.current_dir(tmp)
        .args(["train", "--config", "cpu-tiny"])
        .arg(format!("data_paths=[{}]", data.display()))
        .args(TINY);
    c
}

/// Whether `--device cuda` is usable here (then its refusal is not tested).
fn cuda_usable() -> bool {
    let usable = device_choice::resolve(Some(DeviceKind::Cuda), 0).is_ok();
    if usable {
        eprintln!("a usable GPU is here: the refusal of --device cuda is not tested");
    }
    usable
}

/// What `--device cuda` must say on this machine: how to rebuild when the
/// build has no kernels, else that there is no usable GPU.
fn assert_cuda_refused(out: &Output) {
    let err = stderr(out);
    assert!(!out.status.success(), "--device cuda was accepted: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("error: device cuda: "), "{err}");
    if trm::backend::cuda::kernels_compiled() {
        assert!(err.contains("no usable CUDA GPU"), "{err}");
    } else {
        assert!(err.contains("tools/install-nvcc.sh"), "{err}");
    }
    assert!(err.contains("--device cpu"), "{err}");
}

/// `trm train --device cuda` (or `device=cuda` in the config) without a
/// usable GPU stops at once with the reason and writes nothing; `--device
/// cpu` wins over the config's key, and the run says its device and the
/// expected time before the first step.
#[test]
fn train_device_flag_and_key() {
    if cuda_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_dataset(tmp.path(), "data", 4, 1, 2, (1, 42));

    let out = train_cmd(tmp.path(), &data)
        .args(["--quiet", "--device", "cuda"])
        .output()
        .unwrap();
    assert_cuda_refused(&out);
    let out = train_cmd(tmp.path(), &data)
        .args(["--quiet", "device=cuda"])
        .output()
        .unwrap();
    assert_cuda_refused(&out);
    assert!(
        !tmp.path().join("checkpoints").exists(),
        "a refused device must not start a run folder"
    );

    let out = train_cmd(tmp.path(), &data)
        .args(["device=cuda", "--device", "cpu"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("device: cpu (requested)"), "{err}");
    assert!(
        err.contains("work: ") && err.contains("per sample and ACT step"),
        "{err}"
    );
    // before the first step (a timed block) and after the second
    assert_eq!(err.matches("expected: ").count(), 2, "{err}");
    assert!(!err.contains("WARNING"), "{err}");
    let yaml = std::fs::read_to_string(
        tmp.path()
            .join("checkpoints/data-ACT-trm/run/all_config.yaml"),
    )
    .unwrap();
    assert!(
        yaml.contains("device: cuda"),
        "the config is kept as given: {yaml}"
    );
}

/// `trm infer` and `trm step-dump` refuse `--device cuda` the same way,
/// before reading any input.
#[test]
fn infer_and_step_dump_device_flag() {
    if cuda_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let out = trm()
        .args(["infer", "--device", "cuda", "--model"])
        .arg(&missing)
        .arg("--challenges")
        .arg(&missing)
        .arg("--out")
        .arg(tmp.path().join("submission.json"))
        .output()
        .unwrap();
    assert_cuda_refused(&out);
    let out = trm()
        .args([
            "step-dump",
            "--device",
            "cuda",
            "--init-seed",
            "1",
            "--arch",
        ])
        .arg(&missing)
        .arg("--batch")
        .arg(&missing)
        .arg("--out")
        .arg(tmp.path().join("dump.safetensors"))
        .output()
        .unwrap();
    assert_cuda_refused(&out);
    let out = trm().args(["train", "--device", "tpu"]).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("tpu") && err.contains("cpu") && err.contains("cuda") && err.contains("emu"),
        "{err}"
    );
}

/// The test build has the kernel emulator: `--device emu` passes the device
/// choice and reaches the CUDA engine. Until that engine runs, its own error
/// comes back; once it runs, training succeeds. Either way the device
/// choice does not refuse it and nothing panics.
#[test]
fn emu_trains_through_the_cuda_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_dataset(tmp.path(), "data", 4, 1, 2, (1, 42));
    let mut o: Vec<String> = TINY.iter().map(|s| s.to_string()).collect();
    // Head dim 32: the smallest the attention kernels take.
    o.push("arch.hidden_size=64".into());
    o.push(format!("data_paths=[{}]", data.display()));
    o.push(format!(
        "checkpoint_path={}",
        tmp.path().join("lib").display()
    ));
    let cfg = RunConfig::load(ConfigSource::builtin("cpu-tiny").unwrap(), &o).unwrap();
    let opts = TrainOptions {
        progress: false,
        verbose: false,
        device: Some(DeviceKind::Emu),
        ..TrainOptions::default()
    };
    match train(&cfg, &opts) {
        Ok(r) => assert!(r.steps_run > 0),
        Err(TrainError::Device(e)) => panic!("the device choice refused emu: {e}"),
        Err(e) => panic!("training on the emulator failed: {e}"),
    }

    let out = train_cmd(tmp.path(), &data)
        .args(["--quiet", "--device", "emu", "arch.hidden_size=64"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !err.contains("--features emu"),
        "the binary lacks the emulator: {err}"
    );
    assert!(out.status.success(), "trm train --device emu failed: {err}");
}
