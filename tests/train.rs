//! The training driver end to end on a tiny synthetic dataset (8x8 canvas):
//! exact resume, non-finite loss, frozen weights, EMA, weight loading with a
//! resized puzzle table, and bad inputs.

use std::path::{Path, PathBuf};

use trm::checkpoint;

mod common;
use trm::config::{ConfigSource, RunConfig};
use trm::train::{train, TrainError, TrainOptions, TrainReport};

/// Builds a synthetic dataset of `n_train + n_eval` puzzles on an 8x8 canvas.
fn dataset(root: &Path, name: &str, n_train: usize, n_eval: usize) -> PathBuf {
    common::synthetic_dataset(root, name, n_train, n_eval, 3, (3, 5))
}

/// A very small model so each test runs in seconds.
fn config(data: &Path, run: &Path, extra: &[&str]) -> RunConfig {
    let mut o: Vec<String> = vec![
        format!("data_paths=[{}]", data.display()),
        format!("checkpoint_path={}", run.display()),
        "arch.hidden_size=16".into(),
        "arch.num_heads=2".into(),
        "arch.L_layers=1".into(),
        "arch.H_cycles=2".into(),
        "arch.L_cycles=1".into(),
        "arch.halt_max_steps=3".into(),
        "arch.halt_exploration_prob=0.5".into(),
        "global_batch_size=8".into(),
        "epochs=4".into(),
        "eval_interval=1".into(),
        "lr_warmup_steps=2".into(),
        "checkpoint_keep_last=0".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::load(ConfigSource::builtin("cpu-tiny").unwrap(), &o).unwrap()
}

fn quiet(resume: Option<String>) -> TrainOptions {
    TrainOptions {
        resume,
        progress: false,
        verbose: false,
        ..TrainOptions::default()
    }
}

fn losses(r: &TrainReport) -> Vec<(u64, u64)> {
    r.train_log
        .iter()
        .map(|(s, m)| {
            let v = m.iter().find(|(k, _)| k == "train/lm_loss").unwrap().1;
            (*s, v.to_bits())
        })
        .collect()
}

/// N steps straight and k steps + resume + (N - k) steps give bit-identical
/// losses, weights, EMA, Adam moments and carry.
#[test]
fn resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "data", 6, 2);
    let run_a = tmp.path().join("a");
    let cfg_a = config(&data, &run_a, &["ema=True"]);
    let a = train(&cfg_a, &quiet(None)).unwrap();
    assert_eq!(a.checkpoints.len(), 4, "one checkpoint per evaluation");
    assert!(a.steps_run >= 8, "steps run: {}", a.steps_run);
    // resume from the second checkpoint into another folder
    let mid = &a.checkpoints[1];
    let run_b = tmp.path().join("b");
    let cfg_b = config(&data, &run_b, &["ema=True"]);
    let b = train(&cfg_b, &quiet(Some(mid.display().to_string()))).unwrap();
    let la = losses(&a);
    let lb = losses(&b);
    let mid_step = checkpoint::load(mid).unwrap().state.step;
    let tail: Vec<_> = la.iter().filter(|(s, _)| *s > mid_step).cloned().collect();
    assert!(!tail.is_empty());
    assert_eq!(lb, tail, "losses after the resume point");
    let last_a = a.checkpoints.last().unwrap();
    let last_b = b.checkpoints.last().unwrap();
    assert_eq!(last_a.file_name(), last_b.file_name());
    for f in [
        "model.safetensors",
        "ema.safetensors",
        "optim.safetensors",
        "puzzle_emb.safetensors",
        "carry.safetensors",
    ] {
        let x = std::fs::read(last_a.join(f)).unwrap();
        let y = std::fs::read(last_b.join(f)).unwrap();
        assert!(x == y, "{f} differs after resume");
    }
    // the EMA shadow is not the live weights
    assert_ne!(
        std::fs::read(last_a.join("model.safetensors")).unwrap(),
        std::fs::read(last_a.join("ema.safetensors")).unwrap()
    );
    // the run folder has its config, metrics and TensorBoard events
    assert!(run_a.join("all_config.yaml").is_file());
    assert!(run_a.join("metrics.jsonl").is_file());
    let events = std::fs::read_dir(&run_a)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
        .count();
    assert_eq!(events, 1);
    // `latest` resolves in the run folder: a finished run has nothing left to do
    let again = train(&cfg_a, &quiet(Some("latest".into()))).unwrap();
    assert_eq!(again.steps_run, 0);
}

/// The loss going non-finite stops the run with a diagnostic, before any
/// update, and leaves the existing checkpoints intact.
#[test]
fn non_finite_loss_stops_and_keeps_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "data", 4, 1);
    let run = tmp.path().join("run");
    let good = train(&config(&data, &run, &["epochs=2"]), &quiet(None)).unwrap();
    let last = good.checkpoints.last().unwrap().clone();
    // a huge learning rate blows the weights up on the first resumed update
    let cfg = config(
        &data,
        &run,
        &[
            "epochs=4",
            "lr=1e30",
            "puzzle_emb_lr=1e30",
            "lr_warmup_steps=0",
        ],
    );
    let err = train(&cfg, &quiet(Some("latest".into()))).unwrap_err();
    match &err {
        TrainError::NonFinite { step, .. } => assert!(*step > good.checkpoints.len() as u64),
        other => panic!("expected NonFinite, got {other}"),
    }
    assert!(err.to_string().contains("not finite"));
    checkpoint::verify(&last).unwrap();
    assert_eq!(
        checkpoint::latest(&run).unwrap().as_deref(),
        Some(last.as_path())
    );
}

/// `freeze_weights` trains only the puzzle embeddings.
#[test]
fn freeze_weights_changes_only_puzzle_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "data", 4, 1);
    let base = train(
        &config(&data, &tmp.path().join("base"), &["epochs=1"]),
        &quiet(None),
    )
    .unwrap();
    let start = base.checkpoints.last().unwrap();
    let run = tmp.path().join("frozen");
    let load = format!("+load_checkpoint={}", start.display());
    let r = train(
        &config(&data, &run, &["epochs=1", "freeze_weights=True", &load]),
        &quiet(None),
    )
    .unwrap();
    let before = checkpoint::load(start).unwrap();
    let after = checkpoint::load(r.checkpoints.last().unwrap()).unwrap();
    for (name, t) in &before.model {
        assert_eq!(
            t.data, after.model[name].data,
            "{name} changed while frozen"
        );
    }
    assert_ne!(
        before.puzzle_emb, after.puzzle_emb,
        "puzzle embeddings did not train"
    );
}

/// `+load_checkpoint` from a dataset with another number of puzzles: the
/// table becomes its mean row repeated; everything else is loaded as is.
#[test]
fn load_checkpoint_resizes_the_puzzle_table_to_its_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let small = dataset(tmp.path(), "small", 3, 1);
    let big = dataset(tmp.path(), "big", 5, 2);
    let a = train(
        &config(&small, &tmp.path().join("a"), &["epochs=1"]),
        &quiet(None),
    )
    .unwrap();
    let src = checkpoint::load(a.checkpoints.last().unwrap()).unwrap();
    let table = &src.puzzle_emb["inner.puzzle_emb.weights"];
    let (rows, nd) = (table.shape[0], table.shape[1]);
    let mean: Vec<f32> = (0..nd)
        .map(|j| {
            ((0..rows)
                .map(|r| table.data[r * nd + j] as f64)
                .sum::<f64>()
                / rows as f64) as f32
        })
        .collect();
    // epochs=1 with lr 0: the loaded weights come back unchanged
    let load = format!(
        "+load_checkpoint={}",
        a.checkpoints.last().unwrap().display()
    );
    let b = train(
        &config(
            &big,
            &tmp.path().join("b"),
            &[
                "epochs=1",
                "lr=0",
                "puzzle_emb_lr=0",
                "weight_decay=0",
                "puzzle_emb_weight_decay=0",
                &load,
            ],
        ),
        &quiet(None),
    )
    .unwrap();
    let dst = checkpoint::load(b.checkpoints.last().unwrap()).unwrap();
    let t = &dst.puzzle_emb["inner.puzzle_emb.weights"];
    assert_ne!(t.shape[0], rows);
    for r in 0..t.shape[0] {
        assert_eq!(&t.data[r * nd..(r + 1) * nd], &mean[..], "row {r}");
    }
    assert_eq!(
        src.model["inner.lm_head.weight"].data,
        dst.model["inner.lm_head.weight"].data
    );
}

/// Bad inputs are clear errors, never panics.
#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "data", 3, 1);
    // a dataset folder missing a file
    let broken = tmp.path().join("broken");
    copy_dir(&data, &broken);
    std::fs::remove_file(broken.join("train").join("all__inputs.npy")).unwrap();
    let err = train(&config(&broken, &tmp.path().join("r1"), &[]), &quiet(None)).unwrap_err();
    assert!(err.to_string().contains("all__inputs.npy"), "{err}");
    // resume from a damaged checkpoint
    let run = tmp.path().join("r2");
    let r = train(&config(&data, &run, &["epochs=1"]), &quiet(None)).unwrap();
    let ck = r.checkpoints.last().unwrap();
    let f = ck.join("optim.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    let err = train(
        &config(&data, &run, &["epochs=2"]),
        &quiet(Some("latest".into())),
    )
    .unwrap_err();
    assert!(err.to_string().contains("optim.safetensors"), "{err}");
    // resume when there is no checkpoint
    let err = train(
        &config(&data, &tmp.path().join("empty"), &[]),
        &quiet(Some("latest".into())),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no checkpoint"), "{err}");
    // a config the dataset contradicts
    let cfg = config(&data, &tmp.path().join("r3"), &["arch.seq_len=100"]);
    let err = train(&cfg, &quiet(None)).unwrap_err();
    assert!(err.to_string().contains("seq_len"), "{err}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// A collective that fails on its Nth gradient all-reduce (a rank lost).
struct FailingCollective {
    calls: std::cell::Cell<usize>,
    fail_at: usize,
}

impl trm::dist::Collective for FailingCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), trm::dist::CollectiveError> {
        let n = self.calls.get() + 1;
        self.calls.set(n);
        if n == self.fail_at {
            return Err(trm::dist::CollectiveError {
                op: "test all-reduce",
                rank: 0,
                world: 2,
                message: "peer closed the connection".into(),
            });
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), trm::dist::CollectiveError> {
        Ok(())
    }
    fn all_gather_rows(
        &self,
        ids: &[i32],
        rows: &[f32],
    ) -> Result<(Vec<i32>, Vec<f32>), trm::dist::CollectiveError> {
        Ok((ids.to_vec(), rows.to_vec()))
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, trm::dist::CollectiveError> {
        Ok(vec![mine.to_vec()])
    }
}

/// A failed collective stops training with a typed error (no panic, no
/// update from a partial sum) and the checkpoints written before it stay
/// valid and `latest`.
#[test]
fn failed_collective_stops_training_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "data", 4, 1);
    let run = tmp.path().join("run");
    let cfg = config(&data, &run, &["epochs=4"]);
    // the step count from a full run of the same config
    let full = train(&cfg, &quiet(None)).unwrap();
    assert!(!full.checkpoints.is_empty());
    let run2 = tmp.path().join("run2");
    let cfg2 = config(&data, &run2, &["epochs=4"]);
    let total_steps = full.train_log.len();
    let coll = FailingCollective {
        calls: std::cell::Cell::new(0),
        fail_at: total_steps - 1,
    };
    let err = trm::train::train_with(&cfg2, &quiet(None), &coll).unwrap_err();
    match &err {
        TrainError::Collective(e) => {
            assert_eq!(e.op, "test all-reduce");
            assert!(err.to_string().contains("peer closed the connection"));
        }
        other => panic!("expected a collective error, got {other}"),
    }
    let latest = checkpoint::latest(&run2)
        .unwrap()
        .expect("earlier checkpoints kept");
    checkpoint::verify(&latest).unwrap();
}
