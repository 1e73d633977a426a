//! `trm package` and `trm infer`: the offline binary reproduces the
//! training-time ARC evaluation of the same checkpoint exactly, fits unknown
//! puzzles' embeddings with the weights frozen, and refuses bad input with
//! clear errors.
//!
//! One small model is trained once (the demo's pipeline at a reduced size)
//! and shared by every test of this file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use trm::demo::DemoOptions;

mod device;
mod kaggle;
use device::Dev;
use kaggle::check_kaggle_format;
use trm::infer::{infer, InferOptions};
use trm::model::weights::PUZZLE_EMB;
use trm::package::{package, ModelPackage};

const NUM_AUG: usize = 3;
const EVAL_PUZZLES: usize = 8;

struct Fixture {
    root: PathBuf,
    /// The last checkpoint and the evaluator folder of the same step.
    checkpoint: PathBuf,
    evaluator: PathBuf,
    /// `ARC/pass@K` the training run logged at that step.
    logged: Vec<(String, f64)>,
    challenges: PathBuf,
    solutions: PathBuf,
    /// The checkpoint packaged by the library.
    model: PathBuf,
}

/// The `trm` binary: cargo's, or `TRM_TEST_BIN` where the test binary runs
/// away from its build (tools/gpu-check.sh --prebuilt on a device machine).
fn trm_bin() -> PathBuf {
    std::env::var_os("TRM_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_trm")))
}

/// Scratch space: cargo's, or `TRM_TEST_TMPDIR` (as `TRM_TEST_BIN`).
fn tmp_dir() -> PathBuf {
    std::env::var_os("TRM_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
}

/// Trains the demo's model on a reduced synthetic set once per test binary.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = tmp_dir().join("infer-fixture");
        let _ = std::fs::remove_dir_all(&root);
        let opts = DemoOptions {
            out_dir: root.clone(),
            train_puzzles: 24,
            eval_puzzles: EVAL_PUZZLES,
            num_aug: NUM_AUG,
            seed: 3,
            verbose: false,
            overrides: [
                "epochs=60",
                "eval_interval=60",
                "ema=True",
                "ema_rate=0.9",
                "global_batch_size=16",
            ]
            .map(String::from)
            .to_vec(),
            ..DemoOptions::default()
        };
        let s = trm::demo::run(&opts).expect("demo training");
        let checkpoint = s.train.checkpoints.last().expect("a checkpoint").clone();
        let (step, metrics) = s.train.eval_log.last().expect("an evaluation").clone();
        let evaluator = s.train.run_dir.join(format!("evaluator_ARC_step_{step}"));
        let logged = metrics
            .into_iter()
            .filter(|(k, _)| k.starts_with("ARC/"))
            .collect();
        let arc = root.join("arc");
        let model = root.join("model");
        package(&checkpoint, &model, None).expect("package");
        Fixture {
            checkpoint,
            evaluator,
            logged,
            challenges: arc.join("synthetic_evaluation_challenges.json"),
            solutions: arc.join("synthetic_evaluation_solutions.json"),
            model,
            root,
        }
    })
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn options(f: &Fixture, model: &Path, challenges: &Path) -> InferOptions {
    InferOptions {
        solutions: Some(f.solutions.clone()),
        num_aug: Some(NUM_AUG),
        ..InferOptions::new(model, challenges)
    }
}

/// A copy of the fixture's model folder to damage.
fn model_copy(name: &str) -> PathBuf {
    let f = fixture();
    let dst = f.root.join(name);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&f.model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Rewrites one file of a model folder and its manifest entry (as a
/// package written by another tool would be: consistent, but unsupported).
fn rewrite_consistently(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
    let entry = trm::checkpoint::hash_file(&dir.join(name)).unwrap();
    let mpath = dir.join("manifest.json");
    let mut m = read_json(&mpath);
    m["files"][name] = serde_json::to_value(entry).unwrap();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn infer_reproduces_the_training_evaluation() {
    let f = fixture();
    let out = infer(&options(f, &f.model, &f.challenges)).unwrap();
    assert!(out.unknown_puzzles.is_empty(), "{:?}", out.unknown_puzzles);
    assert_eq!(out.known_rows, out.names.len());
    assert_eq!(out.puzzle_ids.len(), EVAL_PUZZLES);
    // One test input per puzzle, original + NUM_AUG copies each.
    assert_eq!(out.examples, EVAL_PUZZLES * (NUM_AUG + 1));

    // pass@K: bit-identical to what training logged.
    assert_eq!(out.result.metrics, f.logged);
    // submission.json and report.json (pass@K, and per puzzle and test
    // input: votes, candidates with their vote counts, mean q and hashes,
    // the rank of the solution) byte for byte as the evaluator wrote them.
    let mine = f.root.join("lib-results");
    trm::eval::write_results(&mine, &out.result).unwrap();
    for name in ["submission.json", "report.json"] {
        assert_eq!(
            std::fs::read_to_string(mine.join(name)).unwrap(),
            std::fs::read_to_string(f.evaluator.join(name)).unwrap(),
            "{name}"
        );
    }
    let report = read_json(&f.evaluator.join("report.json"));
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(report["examples"], (EVAL_PUZZLES * (NUM_AUG + 1)) as u64);
    assert_eq!(report["unmatched_examples"], 0);

    // The comparison is not vacuous: every test input got all its votes,
    // and some augmented copies agree on a prediction.
    let tests: Vec<&Value> = report["puzzles"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["tests"].as_array().unwrap())
        .collect();
    assert!(tests.iter().all(|t| t["votes"] == (NUM_AUG + 1) as u64));
    assert!(
        tests
            .iter()
            .any(|t| t["top"][0]["votes"].as_u64() >= Some(2)),
        "no two augmented copies agree: {report}"
    );
    let pass = |k: &str| out.result.metrics.iter().find(|(n, _)| n == k).unwrap().1;
    eprintln!(
        "infer = training evaluation: pass@1 {}, pass@2 {}, pass@1000 {}",
        pass("ARC/pass@1"),
        pass("ARC/pass@2"),
        pass("ARC/pass@1000")
    );
    // A model this small and short-trained solves none of them (pass@K is
    // 0 on both sides); the candidates, votes and q values above are what
    // the comparison rests on.
    assert!(tests
        .iter()
        .all(|t| t["top"][0]["mean_q"].as_f64().is_some_and(|q| q > 0.0)));

    // Another batch size regroups the examples; the votes still go to the
    // same puzzles (the predictions may differ in the last bits only if the
    // CPU GEMMs depend on the batch, so compare shapes, not values).
    let small = infer(&InferOptions {
        batch_size: Some(5),
        ..options(f, &f.model, &f.challenges)
    })
    .unwrap();
    assert_eq!(small.examples, out.examples);
    assert_eq!(keys(&small.result.submission), keys(&out.result.submission));
}

#[test]
fn cli_package_and_infer_match_the_training_evaluation() {
    let f = fixture();
    let trm = trm_bin();
    let model = f.root.join("cli-model");
    let _ = std::fs::remove_dir_all(&model);
    let out = Command::new(&trm)
        .args(["package", "--checkpoint"])
        .arg(&f.checkpoint)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same bytes as the library's package (deterministic).
    for name in ["model.safetensors", "identifiers.json", "manifest.json"] {
        assert_eq!(
            std::fs::read(model.join(name)).unwrap(),
            std::fs::read(f.model.join(name)).unwrap(),
            "{name}"
        );
    }

    let sub = f.root.join("cli-sub").join("submission.json");
    let out = Command::new(&trm)
        .args(["infer", "--model"])
        .arg(&model)
        .arg("--challenges")
        .arg(&f.challenges)
        .arg("--solutions")
        .arg(&f.solutions)
        .arg("--out")
        .arg(&sub)
        .args(["--num-aug", &NUM_AUG.to_string(), "--threads", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // stderr is not a terminal here: progress as plain lines.
    assert!(
        stderr.contains(&format!("running {EVAL_PUZZLES} puzzles")),
        "{stderr}"
    );
    assert!(!stderr.contains("warning"), "{stderr}");
    assert_eq!(
        read_json(&sub),
        read_json(&f.evaluator.join("submission.json"))
    );
    for (k, v) in &f.logged {
        let line = format!("{k} {v:.4}");
        assert!(stdout.contains(&line), "no `{line}` in {stdout}");
    }

    // A folder holding something else is not overwritten.
    let other = f.root.join("not-a-model");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let out = Command::new(&trm)
        .args(["package", "--checkpoint"])
        .arg(&f.checkpoint)
        .arg("--out")
        .arg(&other)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refusing to replace"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "keep me"
    );

    // An altered model file is named, through the binary too.
    let bad = model_copy("cli-bad-model");
    let mut bytes = std::fs::read(bad.join("model.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(bad.join("model.safetensors"), bytes).unwrap();
    let out = Command::new(&trm)
        .args(["infer", "--quiet", "--model"])
        .arg(&bad)
        .arg("--challenges")
        .arg(&f.challenges)
        .arg("--out")
        .arg(f.root.join("cli-bad.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("SHA-256"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!f.root.join("cli-bad.json").exists());
}

/// Challenges with one puzzle renamed (unknown to the model) beside the
/// known ones.
fn with_unknown_puzzle(f: &Fixture, name: &str) -> (PathBuf, PathBuf, String) {
    let mut chal = read_json(&f.challenges);
    let mut sols = read_json(&f.solutions);
    let first = chal.as_object().unwrap().keys().next().unwrap().clone();
    let new_id = format!("unseen{first}");
    let p = chal[&first].clone();
    let s = sols[&first].clone();
    chal.as_object_mut().unwrap().insert(new_id.clone(), p);
    sols.as_object_mut().unwrap().insert(new_id.clone(), s);
    let c = f.root.join(format!("{name}_challenges.json"));
    let s_path = f.root.join(format!("{name}_solutions.json"));
    std::fs::write(&c, chal.to_string()).unwrap();
    std::fs::write(&s_path, sols.to_string()).unwrap();
    (c, s_path, new_id)
}

#[test]
fn fit_steps_fit_only_the_unknown_puzzles_rows() {
    let f = fixture();
    let (chal, sols, new_id) = with_unknown_puzzle(f, "unseen");
    let pkg = ModelPackage::open(&f.model).unwrap();
    let table = &pkg.weights.get(PUZZLE_EMB).data;
    let nd = pkg.arch.puzzle_emb_ndim;
    let known = pkg.identifiers.len();
    let base = InferOptions {
        solutions: Some(sols),
        num_aug: Some(NUM_AUG),
        ..InferOptions::new(&f.model, &chal)
    };

    // Without fitting: the new puzzle's copies get blank rows (row 0).
    let blank = infer(&base).unwrap();
    assert_eq!(blank.unknown_puzzles, vec![new_id.clone()]);
    assert!(blank.fit.is_none());
    let new_rows = blank.names.len() - known;
    assert_eq!(new_rows, NUM_AUG + 1);
    assert!(blank.names[known..].iter().all(|n| n.starts_with(&new_id)));
    let row = |t: &[f32], r: usize| t[r * nd..(r + 1) * nd].to_vec();
    for r in known..known + new_rows {
        assert_eq!(row(&blank.params.puzzle_emb, r), row(table, 0));
    }

    // Fitting: the rows move, nothing else does. Sign-SGD at the run's
    // constant puzzle lr is noisy over a few dozen steps on this tiny model:
    // with the gemm crate's products (AVX-512 CPUs) the probe went 1.088 ->
    // 1.074 / 1.092 / 1.095 / 0.997 after 10 / 20 / 40 / 160 steps, so the
    // test fits 160 (the own sgemm's products fell by 40 already).
    let steps = 160;
    let fitted = infer(&InferOptions {
        fit_steps: steps,
        batch_size: Some(8),
        ..base.clone()
    })
    .unwrap();
    let fit = fitted.fit.clone().expect("a fit report");
    assert_eq!(fit.steps, steps);
    assert_eq!(fit.rows, new_rows);
    eprintln!(
        "fit: demonstration lm_loss {} -> {}",
        fit.loss_before, fit.loss_after
    );
    assert!(
        fit.loss_after < fit.loss_before,
        "demonstration loss did not fall: {} -> {}",
        fit.loss_before,
        fit.loss_after
    );
    // Dense weights bit for bit.
    let after = fitted.params.to_map(&fitted.arch);
    for (name, t) in &pkg.weights.tensors {
        if name == PUZZLE_EMB {
            continue;
        }
        let a = &after[name];
        assert_eq!(a.shape, t.shape, "{name}");
        assert!(
            a.data
                .iter()
                .zip(&t.data)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} changed"
        );
    }
    // Trained rows bit for bit; every new row moved from its start (the
    // table's mean row, as the reference resizes a table).
    let emb = &fitted.params.puzzle_emb;
    assert!(emb[..known * nd]
        .iter()
        .zip(table)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    let start = trm::train::mean_row(table, nd);
    for r in known..known + new_rows {
        assert_ne!(row(emb, r), start, "row {r} did not move");
    }
    // The known puzzles' predictions are untouched by the fit: their
    // submission entries are the plain run's.
    for id in fitted.puzzle_ids.iter().filter(|id| **id != new_id) {
        assert_eq!(
            fitted.result.submission[id], blank.result.submission[id],
            "{id}"
        );
    }
}

fn infer_err(model: &Path, challenges: &Path) -> String {
    let f = fixture();
    match infer(&options(f, model, challenges)) {
        Ok(_) => panic!("infer accepted bad input"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_model_folders_are_named() {
    let f = fixture();
    // altered file
    let dir = model_copy("bad-altered");
    let p = dir.join("identifiers.json");
    let mut text = std::fs::read_to_string(&p).unwrap();
    text = text.replacen("<blank>", "<blanc>", 1);
    std::fs::write(&p, text).unwrap();
    let e = infer_err(&dir, &f.challenges);
    assert!(
        e.contains("identifiers.json") && e.contains("SHA-256") && e.contains("altered"),
        "{e}"
    );

    // missing file
    let dir = model_copy("bad-missing");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = infer_err(&dir, &f.challenges);
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");
    let dir = model_copy("bad-no-manifest");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let e = infer_err(&dir, &f.challenges);
    assert!(
        e.contains("manifest.json") && e.contains("trm package"),
        "{e}"
    );

    // unsupported configs, with a consistent manifest
    let config = read_json(&f.model.join("config.json"));
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: [(&str, Edit, &str); 4] = [
        (
            "mlp_t",
            Box::new(|c| c["arch"]["mlp_t"] = true.into()),
            "mlp_t",
        ),
        (
            "learned",
            Box::new(|c| c["arch"]["pos_encodings"] = "learned".into()),
            "pos_encodings: learned",
        ),
        (
            "arch-field",
            Box::new(|c| c["arch"]["use_moe"] = true.into()),
            "use_moe",
        ),
        (
            "top-field",
            Box::new(|c| c["backend"] = "tpu".into()),
            "backend",
        ),
    ];
    for (name, edit, expect) in cases {
        let dir = model_copy(&format!("bad-config-{name}"));
        let mut c = config.clone();
        edit(&mut c);
        rewrite_consistently(&dir, "config.json", &serde_json::to_vec(&c).unwrap());
        let e = infer_err(&dir, &f.challenges);
        assert!(
            e.contains("config.json") && e.contains(expect),
            "{name}: {e}"
        );
    }

    // weights of another shape than the config says
    let dir = model_copy("bad-shape");
    let mut c = config.clone();
    c["arch"]["hidden_size"] = 32.into();
    c["arch"]["puzzle_emb_ndim"] = 32.into();
    rewrite_consistently(&dir, "config.json", &serde_json::to_vec(&c).unwrap());
    let e = infer_err(&dir, &f.challenges);
    assert!(
        e.contains("model.safetensors") && e.contains("shape"),
        "{e}"
    );

    // packaging a damaged checkpoint is refused, naming the file
    let ck = f.root.join("bad-checkpoint");
    let _ = std::fs::remove_dir_all(&ck);
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(&f.checkpoint).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    let mut bytes = std::fs::read(ck.join("puzzle_emb.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(ck.join("puzzle_emb.safetensors"), bytes).unwrap();
    let e = package(&ck, &f.root.join("bad-package"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("puzzle_emb.safetensors"), "{e}");
    assert!(!f.root.join("bad-package").exists());
}

#[test]
fn bad_challenges_are_named() {
    let f = fixture();
    let write = |name: &str, text: &str| {
        let p = f.root.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let p = write("bad1.json", "{\"abc\": {\"train\": [");
    let e = infer_err(&f.model, &p);
    assert!(
        e.contains("bad1.json") && e.contains("malformed JSON"),
        "{e}"
    );

    let p = write("bad2.json", "[1, 2]");
    let e = infer_err(&f.model, &p);
    assert!(e.contains("expected a JSON object"), "{e}");

    let p = write(
        "bad3.json",
        r#"{"p1": {"train": [{"input": [[1,2],[3]], "output": [[1]]}], "test": [{"input": [[1]]}]}}"#,
    );
    let e = match infer(&InferOptions::new(&f.model, &p)) {
        Ok(_) => panic!("accepted a ragged grid"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("'p1'") && e.contains("train example 0 'input'") && e.contains("ragged"),
        "{e}"
    );

    let p = write("bad4.json", r#"{"p2": {"train": []}}"#);
    let e = match infer(&InferOptions::new(&f.model, &p)) {
        Ok(_) => panic!("accepted a puzzle without examples"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("'p2'"), "{e}");

    // A grid larger than the model's canvas (5x5 here).
    let p = write(
        "bad5.json",
        r#"{"p3": {"train": [{"input": [[1,2,3,4,5,6]], "output": [[1]]}], "test": [{"input": [[1]]}]}}"#,
    );
    let e = match infer(&InferOptions::new(&f.model, &p)) {
        Ok(_) => panic!("accepted a grid larger than the canvas"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("'p3'") && e.contains("1x6") && e.contains("5x5"),
        "{e}"
    );

    // Solutions that do not cover a puzzle.
    let s = write("bad-sol.json", "{}");
    let e = match infer(&InferOptions {
        solutions: Some(s),
        ..InferOptions::new(&f.model, &f.challenges)
    }) {
        Ok(_) => panic!("accepted solutions without the puzzles"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("bad-sol.json") && e.contains("no solutions"),
        "{e}"
    );
}

/// Runs `trm infer` on the fixture's model and evaluation set.
fn cli_infer(f: &Fixture, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(trm_bin())
        .args(["infer", "--threads", "1", "--model"])
        .arg(&f.model)
        .arg("--challenges")
        .arg(&f.challenges)
        .arg("--solutions")
        .arg(&f.solutions)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// The README's command line, without --num-aug, uses the model's dataset
/// value and so reproduces training's evaluation.
#[test]
fn infer_defaults_num_aug_to_the_models_dataset() {
    let f = fixture();
    let out = infer(&InferOptions {
        solutions: Some(f.solutions.clone()),
        ..InferOptions::new(&f.model, &f.challenges)
    })
    .unwrap();
    assert_eq!(out.examples, EVAL_PUZZLES * (NUM_AUG + 1));
    assert!(out.unknown_puzzles.is_empty(), "{:?}", out.unknown_puzzles);
    assert_eq!(out.result.metrics, f.logged);

    let sub = f.root.join("default-aug").join("submission.json");
    let run = cli_infer(f, &sub, &[]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        !stderr.contains("warning") && !stderr.contains("note:"),
        "{stderr}"
    );
    assert_eq!(
        read_json(&sub),
        read_json(&f.evaluator.join("submission.json"))
    );
    for (k, v) in &f.logged {
        let line = format!("{k} {v:.4}");
        assert!(stdout.contains(&line), "no `{line}` in {stdout}");
    }
}

/// Another --num-aug draws other augmentations: the model's own puzzles
/// come out untrained, and the output says why.
#[test]
fn infer_with_another_num_aug_says_why_puzzles_are_untrained() {
    let f = fixture();
    let other = NUM_AUG + 2;
    let out = infer(&InferOptions {
        num_aug: Some(other),
        ..options(f, &f.model, &f.challenges)
    })
    .unwrap();
    assert_eq!(out.examples, EVAL_PUZZLES * (other + 1));
    assert!(!out.unknown_puzzles.is_empty());

    let sub = f.root.join("other-aug.json");
    let run = cli_infer(f, &sub, &["--num-aug", &other.to_string()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("no trained puzzle embedding"), "{stderr}");
    let note = format!(
        "note: --num-aug {other} / --seed 3 differ from the model's dataset ({NUM_AUG} augmentations, seed 3)"
    );
    assert!(stderr.contains(&note), "no `{note}` in {stderr}");
    assert!(stderr.contains("drop --num-aug/--seed"), "{stderr}");
}

/// `--out` replaces a previous submission, but nothing else unless --force.
#[test]
fn infer_out_refuses_a_file_it_did_not_write() {
    let f = fixture();
    let dir = f.root.join("out-guard");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // A previous submission is replaced.
    let sub = dir.join("submission.json");
    for _ in 0..2 {
        let run = cli_infer(f, &sub, &["--quiet"]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }

    // Weights, or any other file, are refused and left as they were.
    for (name, bytes) in [
        (
            "weights.safetensors",
            std::fs::read(f.model.join("model.safetensors")).unwrap(),
        ),
        ("notes.json", br#"{"keep": "me"}"#.to_vec()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let run = cli_infer(f, &path, &["--quiet"]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("not a previous submission") && stderr.contains("--force"),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}");
    }
    let path = dir.join("notes.json");
    let run = cli_infer(f, &path, &["--quiet", "--force"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(read_json(&path), read_json(&sub));
}

/// Without --device, `trm infer` runs on the device the model's run config
/// names (the fixture trained `cpu-tiny`, `device: cpu`), on any machine.
#[test]
fn infer_defaults_to_the_device_of_the_models_run_config() {
    let f = fixture();
    let out = Command::new(trm_bin())
        .args(["infer", "--model"])
        .arg(&f.model)
        .arg("--challenges")
        .arg(&f.challenges)
        .arg("--out")
        .arg(f.root.join("device-sub").join("submission.json"))
        .args(["--num-aug", &NUM_AUG.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("device: cpu (requested)"), "{stderr}");
}

/// Whether GPU 0 is there for the `_gpu` tests, which without one say so
/// and assert nothing (unless TRM_REQUIRE_GPU=1: then they fail).
fn gpu_present() -> bool {
    Dev::gpu().is_some()
}

/// The submission pipeline on the CUDA engine (`device`: emu or cuda): it
/// runs end to end, and its bf16 votes agree with the CPU engine's f32 ones
/// up to voting noise: pass@K within one puzzle in four, most first
/// attempts equal.
fn cuda_engine_matches_the_cpu_engine(device: &str) {
    let f = fixture();
    let sub = f.root.join(format!("{device}-sub")).join("submission.json");
    let run = cli_infer(f, &sub, &["--device", device, "--quiet"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    for (k, v) in &f.logged {
        let got = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{k} ")))
            .and_then(|x| x.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no `{k}` in {stdout}"));
        println!("{k}: {device} {got:.4}, CPU {v:.4}");
        assert!(
            (got - v).abs() <= 0.25 + 1e-9,
            "{k}: {got} on {device}, {v} on the CPU"
        );
    }
    let (got, cpu) = (
        read_json(&sub),
        read_json(&f.evaluator.join("submission.json")),
    );
    let (mut same, mut total) = (0, 0);
    for (task, outs) in cpu.as_object().expect("a submission object") {
        for (i, o) in outs
            .as_array()
            .expect("attempts per test input")
            .iter()
            .enumerate()
        {
            total += 1;
            if got[task][i]["attempt_1"] == o["attempt_1"] {
                same += 1;
            }
        }
    }
    println!("first attempts equal: {same} of {total}");
    assert!(
        total > 0 && 2 * same >= total,
        "{same} of {total} first attempts agree"
    );
}

#[test]
fn infer_on_the_cuda_engine_emulator_matches_the_cpu_engine() {
    cuda_engine_matches_the_cpu_engine("emu");
}

#[test]
fn infer_on_the_cuda_engine_matches_the_cpu_engine_gpu() {
    if gpu_present() {
        cuda_engine_matches_the_cpu_engine("cuda");
    }
}

/// Several devices split the batches and the votes are gathered here in
/// the one-device order, so the submission is byte-equal to one device's.
/// Batches of 4 over 16 examples, so every device runs some. `device`:
/// emu (two emulated devices) or cuda (every GPU of the machine, which
/// must be of one model; on a one-GPU machine this checks the pool on the
/// hardware).
fn several_devices_write_the_one_device_submission(device: &str, devices: &str, shown: &str) {
    let f = fixture();
    let dir = f.root.join(format!("{device}-devices"));
    let common = ["--device", device, "--max-aug", "1", "--batch-size", "4"];
    let one = dir.join("one").join("submission.json");
    let run = cli_infer(f, &one, &[&common[..], &["--devices", "0"]].concat());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let several = dir.join("several").join("submission.json");
    let run = cli_infer(
        f,
        &several,
        &[&common[..], &["--devices", devices]].concat(),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "{} test examples, 1 augmented copies per puzzle, on {shown}",
            EVAL_PUZZLES * 2
        )),
        "{stdout}"
    );
    assert!(stderr.contains("4 batches of 4 on"), "{stderr}");
    assert_eq!(
        std::fs::read(&one).unwrap(),
        std::fs::read(&several).unwrap()
    );
}

#[test]
fn two_emulated_devices_write_the_one_device_submission() {
    several_devices_write_the_one_device_submission("emu", "0,1", "emu:0, emu:1");
}

#[test]
fn every_gpu_writes_the_one_gpu_submission_gpu() {
    if !gpu_present() {
        return;
    }
    let n = trm::backend::cuda::runtime::device_count().expect("a GPU count");
    let shown: Vec<String> = (0..n).map(|i| format!("cuda:{i}")).collect();
    several_devices_write_the_one_device_submission("cuda", "all", &shown.join(", "));
}

/// A time limit the run fits in changes nothing (the probe batches are
/// not counted); one it cannot fit lowers the copies up front, says so,
/// stops at the limit and still writes a whole submission.
#[test]
fn time_limit_lowers_the_augmentations_up_front() {
    let f = fixture();
    let dir = f.root.join("time-limit");
    let plain = dir.join("plain.json");
    let run = cli_infer(f, &plain, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let roomy = dir.join("roomy.json");
    let run = cli_infer(f, &roomy, &["--time-limit", "1h"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("time limit 1h00m00s: the run is estimated at"),
        "{stderr}"
    );
    assert!(!stderr.contains("lowering"), "{stderr}");
    assert_eq!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&roomy).unwrap()
    );

    // 1 ms: not even the originals fit, and the limit has passed after the
    // first batch.
    let tight = dir.join("tight.json");
    let run = cli_infer(f, &tight, &["--time-limit", "0.001", "--batch-size", "4"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{NUM_AUG} augmented copies per puzzle would take about"
        )) && stderr.contains("lowering to 0 (the first of the model's draw; same as --max-aug 0)")
            && stderr.contains("still over the time left"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--time-limit reached after 4 of 8 examples"),
        "{stderr}"
    );
    assert!(
        stdout.contains("4 test examples, 0 augmented copies per puzzle, on cpu"),
        "{stdout}"
    );
    check_kaggle_format(&read_json(&tight), &read_json(&f.challenges));
    check_kaggle_format(&read_json(&plain), &read_json(&f.challenges));
}

/// `--max-aug` keeps the first copies of each puzzle's group, which keep
/// their trained embeddings: no warning about untrained puzzles.
#[test]
fn max_aug_runs_a_prefix_of_the_trained_copies() {
    let f = fixture();
    let out = infer(&InferOptions {
        max_aug: Some(1),
        ..options(f, &f.model, &f.challenges)
    })
    .unwrap();
    assert_eq!(out.examples, EVAL_PUZZLES * 2);
    assert_eq!(out.augmentations, 1);
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let full = infer(&options(f, &f.model, &f.challenges)).unwrap();
    assert_eq!(full.examples, EVAL_PUZZLES * (NUM_AUG + 1));
    assert_eq!(full.augmentations, NUM_AUG);
}

/// `--devices` that cannot apply are refused before any work, naming why.
#[test]
fn bad_device_lists_are_refused() {
    let f = fixture();
    let out = f.root.join("bad-devices.json");
    for (extra, want) in [
        (
            &["--device", "cpu", "--devices", "0,1"][..],
            "--device cuda or emu",
        ),
        (&["--devices", "0,x"][..], "not a device number"),
        (&["--devices", "1,1"][..], "listed twice"),
        (&["--time-limit", "soon"][..], "not a duration"),
        (&["--time-limit", "0"][..], "more than 0"),
    ] {
        let run = cli_infer(f, &out, extra);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{extra:?} accepted");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!out.exists());
    }
}
