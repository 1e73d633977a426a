//! Golden parity: for every case folder under ../shared/golden, run the
//! step-dump code path in-process and compare every tensor of the PyTorch
//! reference's `expected.safetensors` by relative error ||out - ref|| / ||ref||.
//!
//! The case list is whatever folders exist (held-out cases get added later);
//! no cases at all is a failure, not a pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use trm::model::config::ArchConfig;
use trm::model::safetensors_io;
use trm::model::weights::Weights;
use trm::stepdump;
use trm::tensor::Tensor;

const TOLERANCE: f64 = 1e-4;

fn golden_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden"))
}

/// Folders holding a complete case (config, weights, batch, expected).
fn cases() -> Vec<PathBuf> {
    let root = golden_root();
    let entries = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list golden cases in {}: {e}", root.display()));
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    for case in &out {
        for f in [
            "config.json",
            "weights.safetensors",
            "batch.safetensors",
            "expected.safetensors",
        ] {
            assert!(
                case.join(f).is_file(),
                "golden case {} lacks {f}",
                case.display()
            );
        }
    }
    assert!(!out.is_empty(), "no golden cases under {}", root.display());
    out
}

fn load_case(case: &Path) -> (ArchConfig, Weights, stepdump::Batch) {
    let config = ArchConfig::from_json_file(&case.join("config.json")).expect("config");
    let weights =
        stepdump::load_weights(&config, &case.join("weights.safetensors")).expect("weights");
    let batch = stepdump::load_batch(&case.join("batch.safetensors"), &config).expect("batch");
    (config, weights, batch)
}

/// Relative error plus where the largest absolute difference sits.
struct Diff {
    rel: f64,
    max_abs: f64,
    at: usize,
    got: f32,
    want: f32,
}

fn diff(out: &Tensor, reference: &Tensor) -> Diff {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut worst = Diff {
        rel: 0.0,
        max_abs: -1.0,
        at: 0,
        got: 0.0,
        want: 0.0,
    };
    for (i, (&x, &y)) in out.data.iter().zip(&reference.data).enumerate() {
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
        // A NaN difference must count as the worst, not be skipped by `>`.
        if d.abs() > worst.max_abs || d.is_nan() && !worst.max_abs.is_nan() {
            worst.max_abs = d.abs();
            worst.at = i;
            worst.got = x;
            worst.want = y;
        }
    }
    // An all-zero reference (e.g. `halted` all false) is compared absolutely.
    worst.rel = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    worst
}

/// Compares every expected tensor; returns the lines describing failures.
fn compare(
    case: &str,
    out: &BTreeMap<String, Tensor>,
    expected: &BTreeMap<String, Tensor>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (name, want) in expected {
        let Some(got) = out.get(name) else {
            failures.push(format!("{case}: `{name}` missing from the step dump"));
            continue;
        };
        if got.shape != want.shape {
            failures.push(format!(
                "{case}: `{name}` has shape {:?}, reference {:?}",
                got.shape, want.shape
            ));
            continue;
        }
        let d = diff(got, want);
        let line = format!(
            "{case}: {name:<55} rel {:.3e}  max |diff| {:.3e} at {} (got {}, ref {})",
            d.rel, d.max_abs, d.at, d.got, d.want
        );
        // Written so that a NaN error counts as a failure.
        if d.rel.is_nan() || d.rel >= TOLERANCE {
            failures.push(line.clone());
        }
        report.push(line);
    }
    // Printed on success too (visible with --nocapture) to track the margin.
    for line in &report {
        println!("{line}");
    }
    failures
}

#[test]
fn golden_cases_match_reference() {
    let mut failures = Vec::new();
    let mut errors = Vec::new();
    for case in cases() {
        let label = case.file_name().unwrap().to_string_lossy().to_string();
        let (config, weights, batch) = load_case(&case);
        let expected = safetensors_io::load_tensors_as_f32(&case.join("expected.safetensors"))
            .expect("expected");
        match stepdump::step_dump(&config, &weights, &batch) {
            Ok(out) => failures.extend(compare(&label, &out, &expected)),
            Err(e) => errors.push(format!("{label}: step dump failed: {e}")),
        }
    }
    errors.extend(failures);
    assert!(
        errors.is_empty(),
        "{} golden tensor(s) off (tolerance {TOLERANCE:e}):\n{}",
        errors.len(),
        errors.join("\n")
    );
}

/// Plumbing that must hold before any math: every golden case's config,
/// weights and batch load with all names and shapes accepted, and the
/// expected file holds exactly the names the step dump produces.
#[test]
fn golden_inputs_load() {
    for case in cases() {
        let (config, weights, batch) = load_case(&case);
        config.validate_supported().expect("supported config");
        weights.check_finite().expect("finite weights");
        assert_eq!(batch.inputs.len(), batch.batch_size * config.seq_len);
        let expected = safetensors_io::load_tensors_as_f32(&case.join("expected.safetensors"))
            .expect("expected");
        let mut want: Vec<String> = stepdump::expected_output_names(&config);
        want.sort();
        let have: Vec<String> = expected.keys().cloned().collect();
        assert_eq!(have, want, "{}: expected.safetensors names", case.display());
        // Shapes the dump must produce, derived from the config.
        let (b, s, d) = (batch.batch_size, config.total_seq_len(), config.hidden_size);
        assert_eq!(expected["z_H"].shape, vec![b, s, d]);
        assert_eq!(
            expected["logits"].shape,
            vec![b, config.seq_len, config.vocab_size]
        );
        assert_eq!(
            expected["grad.inner.puzzle_emb.local_weights"].shape,
            vec![b, config.puzzle_emb_ndim]
        );
        for (name, _) in weights
            .tensors
            .iter()
            .filter(|(n, _)| weights.trainable_names().contains(n))
        {
            assert_eq!(
                expected[&format!("grad.{name}")].shape,
                weights.get(name).shape,
                "grad shape of {name}"
            );
        }
    }
}

/// A save/load round trip of real weights keeps every value (F32) and
/// still passes the name/shape check.
#[test]
fn golden_weights_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let (config, weights, _) = load_case(&case);
        let p = dir.path().join("w.safetensors");
        safetensors_io::save_tensors(&p, &weights.tensors, safetensors_io::FloatDtype::F32)
            .unwrap();
        let back = stepdump::load_weights(&config, &p).unwrap();
        assert_eq!(back.tensors, weights.tensors, "{}", case.display());
    }
}

/// The CLI path end to end on the smallest case: files in, file out, and the
/// written dump matches the in-process one exactly.
#[test]
fn step_dump_run_writes_file() {
    let case = cases().into_iter().next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump.safetensors");
    let args = stepdump::StepDumpArgs {
        arch: case.join("config.json"),
        weights: Some(case.join("weights.safetensors")),
        init_seed: None,
        batch: case.join("batch.safetensors"),
        out: out.clone(),
        force: false,
    };
    stepdump::run(&args).expect("step-dump run");
    let written = safetensors_io::load_tensors(&out).expect("dump readable");
    let (config, weights, batch) = load_case(&case);
    let direct = stepdump::step_dump(&config, &weights, &batch).expect("step dump");
    assert_eq!(written, direct);

    // --init-seed works too and gives finite output.
    let args = stepdump::StepDumpArgs {
        weights: None,
        init_seed: Some(1),
        ..args
    };
    stepdump::run(&args).expect("step-dump with --init-seed");
    let seeded = safetensors_io::load_tensors(&out).unwrap();
    assert!(seeded["loss"].data[0].is_finite());

    // Anything that is not a previous dump (here: the weights) is refused
    // and left alone unless --force.
    let weights_copy = dir.path().join("weights.safetensors");
    std::fs::copy(case.join("weights.safetensors"), &weights_copy).unwrap();
    let before = std::fs::read(&weights_copy).unwrap();
    let onto_weights = stepdump::StepDumpArgs {
        out: weights_copy.clone(),
        ..args.clone()
    };
    let e = stepdump::run(&onto_weights).unwrap_err().to_string();
    assert!(e.contains("--force") && e.contains("not a previous"), "{e}");
    assert_eq!(std::fs::read(&weights_copy).unwrap(), before);
    stepdump::run(&stepdump::StepDumpArgs {
        force: true,
        ..onto_weights
    })
    .expect("--force replaces it");
    assert!(safetensors_io::load_tensors(&weights_copy)
        .unwrap()
        .contains_key("loss"));
}

/// `trm step-dump` names a missing architecture field instead of filling in
/// a default (which would describe another model).
#[test]
fn step_dump_names_a_missing_arch_field() {
    let case = cases().into_iter().next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(case.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["num_heads", "L_cycles", "hidden_size"] {
        let mut cfg = v.clone();
        cfg.as_object_mut().unwrap().remove(key);
        let path = dir.path().join(format!("no_{key}.json"));
        std::fs::write(&path, cfg.to_string()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_trm"))
            .args(["step-dump", "--init-seed", "1", "--arch"])
            .arg(&path)
            .arg("--batch")
            .arg(case.join("batch.safetensors"))
            .arg("--out")
            .arg(dir.path().join("d.safetensors"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("missing field `{key}`")),
            "{key}: {err}"
        );
        assert!(!err.contains("not supported yet"), "{err}");
    }
}
