//! The world size does not change the math (issue 15): N data-parallel
//! ranks follow the one-rank trajectory at the same global batch, a
//! checkpoint written by N ranks resumes on M, and evaluation split over
//! ranks gives the one-rank outputs. Ranks are threads of this process
//! joined by the real TCP collective over localhost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trm::checkpoint::{self, CheckpointContents};
use trm::config::{ConfigSource, RunConfig};
use trm::data::loader::{PuzzleDataset, PuzzleDatasetConfig, Split};
use trm::dist::{tcp, Collective, Launcher, World};
use trm::model::device_choice::{self, DeviceKind};
use trm::model::safetensors_io::{save_tensors, FloatDtype};
use trm::model::weights::Weights;
use trm::tensor::Tensor;
use trm::train::{train_with, TrainOptions, TrainReport, TrainerState};

mod common;

/// Largest difference allowed between a weight, EMA value or Adam moment
/// trained on N ranks and on one. The ranks sum the same per-sample
/// gradients in another order (partial sums per rank, then the all-reduce):
/// a few f32 ulps per step. AdamATan2 bounds each update by about `lr`
/// (1e-4 here) whatever the gradient's size, so rounding noise in the
/// gradients moves weights by far less than that. Measured over 12 steps
/// on 2 and 3 ranks: at most 6e-8 (printed with --nocapture).
const WEIGHT_TOL: f32 = 1e-6;
/// The same for the carried hidden states z_H, z_L (values of order one
/// after the RMS norms): they go through up to 3 recursions of 2 H cycles of
/// the network, which amplify the weights' differences. Measured: at most
/// 8e-6.
const CARRY_TOL: f32 = 1e-4;
/// The same for a logged loss or metric (means over the batch, in f64).
/// Measured: at most 5e-7. A wrong draw (exploration keyed by rank instead
/// of global slot) changes `train/steps` and the losses by ~0.1 at once.
const METRIC_TOL: f64 = 1e-5;

fn dataset(root: &Path) -> PathBuf {
    common::synthetic_dataset(root, "data", 6, 2, 3, (3, 5))
}

/// A tiny model with halting exploration that matters (prob 0.5, up to 3
/// steps; see [`eager_halting_weights`]) and a global batch that 1, 2 and 3
/// ranks divide.
fn config(data: &Path, run: &Path) -> RunConfig {
    let o: Vec<String> = vec![
        format!("data_paths=[{}]", data.display()),
        format!("checkpoint_path={}", run.display()),
        "arch.hidden_size=16".into(),
        "arch.num_heads=2".into(),
        "arch.L_layers=1".into(),
        "arch.H_cycles=2".into(),
        "arch.L_cycles=1".into(),
        "arch.halt_max_steps=3".into(),
        "arch.halt_exploration_prob=0.5".into(),
        "global_batch_size=6".into(),
        "epochs=3".into(),
        "eval_interval=1".into(),
        "lr_warmup_steps=2".into(),
        "ema=True".into(),
        "checkpoint_keep_last=0".into(),
    ];
    let mut cfg = RunConfig::load(ConfigSource::builtin("cpu-tiny").unwrap(), &o).unwrap();
    cfg.load_checkpoint = Some(eager_halting_weights(&cfg, data));
    cfg
}

/// Initial weights whose Q head halts every sample at once (q_halt bias +5,
/// q_continue -5), so the exploration draws alone decide how long a sample
/// stays: with the usual init (both -5) nothing halts early in a short run
/// and the draws would never show. Written once next to the dataset.
fn eager_halting_weights(cfg: &RunConfig, data: &Path) -> PathBuf {
    let path = data.with_extension("eager-halting.safetensors");
    if path.exists() {
        return path;
    }
    let train = PuzzleDataset::open(
        PuzzleDatasetConfig {
            seed: cfg.seed,
            dataset_paths: vec![data.to_path_buf()],
            global_batch_size: cfg.global_batch_size,
            test_set_mode: false,
            epochs_per_iter: 1,
            rank: 0,
            num_replicas: 1,
        },
        Split::Train,
    )
    .unwrap();
    let meta = train.metadata();
    let arch = cfg
        .arch_for_dataset(meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers)
        .unwrap();
    let mut w = Weights::init(&arch, cfg.seed);
    let bias = w.tensors.get_mut("inner.q_head.bias").unwrap();
    bias.data = vec![5.0, -5.0];
    save_tensors(&path, &w.tensors, FloatDtype::F32).unwrap();
    path
}

fn quiet(resume: Option<&Path>) -> TrainOptions {
    TrainOptions {
        resume: resume.map(|p| p.display().to_string()),
        progress: false,
        verbose: false,
        ..TrainOptions::default()
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs `f` on `size` ranks, one thread each, joined by the TCP collective
/// over localhost; results in rank order.
fn on_ranks<R: Send>(size: usize, f: impl Fn(&dyn Collective) -> R + Sync) -> Vec<R> {
    let port = free_port();
    std::thread::scope(|sc| {
        let f = &f;
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                sc.spawn(move || {
                    let world = World {
                        rank,
                        world_size: size,
                        local_rank: rank,
                        local_world_size: size,
                        master_addr: Some("127.0.0.1".into()),
                        master_port: Some(port),
                        job_id: "world-size-test".into(),
                        launcher: Launcher::Torchrun,
                    };
                    let coll = tcp::connect(&world, Duration::from_secs(60)).unwrap();
                    f(&coll)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Trains `cfg` on `size` ranks (optionally resuming); rank 0's report.
fn train_on(size: usize, cfg: &RunConfig, resume: Option<&Path>) -> TrainReport {
    let mut reports = on_ranks(size, |coll| train_with(cfg, &quiet(resume), coll).unwrap());
    for r in &reports[1..] {
        assert!(r.checkpoints.is_empty(), "only rank 0 writes checkpoints");
    }
    reports.swap_remove(0)
}

/// Largest absolute difference between two tensor maps of the same names
/// and shapes.
fn max_diff(what: &str, a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f32 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: names"
    );
    let mut worst = 0.0f32;
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.shape, y.shape, "{what}/{name}: shape");
        for (p, q) in x.data.iter().zip(&y.data) {
            assert!(p.is_finite() && q.is_finite(), "{what}/{name}: not finite");
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

/// Compares two checkpoints: the carry's integer parts (steps, halted flags,
/// samples) exactly, the weights within [`WEIGHT_TOL`], the hidden states
/// within [`CARRY_TOL`].
fn compare_checkpoints(what: &str, a: &Path, b: &Path) {
    let (x, y): (CheckpointContents, CheckpointContents) =
        (checkpoint::load(a).unwrap(), checkpoint::load(b).unwrap());
    assert_eq!(x.state.step, y.state.step, "{what}: step");
    assert_eq!(x.state.loader, y.state.loader, "{what}: loader position");
    let (cx, cy) = (x.carry.unwrap(), y.carry.unwrap());
    for k in ["steps", "halted", "inputs", "labels", "puzzle_identifiers"] {
        assert_eq!(cx[k].shape, cy[k].shape, "{what}: carry {k} shape");
        assert!(cx[k].data == cy[k].data, "{what}: carry {k} differs");
    }
    let diffs = [
        max_diff("model", &x.model, &y.model),
        max_diff("ema", x.ema.as_ref().unwrap(), y.ema.as_ref().unwrap()),
        max_diff("optim", &x.optim, &y.optim),
        max_diff("puzzle_emb", &x.puzzle_emb, &y.puzzle_emb),
    ];
    let carry = max_diff("carry", &cx, &cy);
    println!(
        "{what}: largest difference of model, ema, optim, puzzle_emb {diffs:?}, carry {carry:e}"
    );
    for d in diffs {
        assert!(d <= WEIGHT_TOL, "{what}: {diffs:?} above {WEIGHT_TOL}");
    }
    assert!(
        carry <= CARRY_TOL,
        "{what}: carry {carry} above {CARRY_TOL}"
    );
}

/// Every logged value of `a` within [`METRIC_TOL`] of `b`'s, step by step.
fn compare_logs(what: &str, a: &[(u64, Vec<(String, f64)>)], b: &[(u64, Vec<(String, f64)>)]) {
    assert_eq!(a.len(), b.len(), "{what}: entries");
    let mut worst = 0.0f64;
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb, "{what}: steps");
        for ((ka, va), (kb, vb)) in la.iter().zip(lb) {
            assert_eq!(ka, kb, "{what} at step {sa}");
            if ka.contains("time") || ka.contains("per_s") {
                continue;
            }
            let d = (va - vb).abs();
            assert!(d <= METRIC_TOL, "{what}: {ka} at step {sa}: {va} vs {vb}");
            worst = worst.max(d);
        }
    }
    println!("{what}: largest difference {worst:e}");
}

/// Only the values that do not depend on timing.
fn timeless(log: &[(u64, Vec<(String, f64)>)]) -> Vec<(u64, Vec<(String, f64)>)> {
    log.iter()
        .map(|(s, m)| {
            let kept = m
                .iter()
                .filter(|(k, _)| !k.contains("time") && !k.contains("per_s"))
                .cloned()
                .collect();
            (*s, kept)
        })
        .collect()
}

/// 2 and 3 ranks train like 1 rank at the same global batch: the same
/// exploration draws (the carry's step counts and halted flags match
/// exactly), the same losses and evaluations, and weights, EMA, Adam
/// moments and hidden states within float summation noise.
#[test]
fn ranks_train_like_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let one = train_on(1, &config(&data, &tmp.path().join("w1")), None);
    assert!(one.steps_run >= 6, "steps run: {}", one.steps_run);
    assert!(!one.eval_log.is_empty());
    // The draws matter: without exploration every slot would halt after
    // each step (eager Q head) and every saved step count would be 1.
    let carry = checkpoint::load(one.checkpoints.last().unwrap())
        .unwrap()
        .carry
        .unwrap();
    assert!(
        carry["steps"].data.iter().any(|&s| s > 1.0),
        "{:?}",
        carry["steps"].data
    );
    for size in [2, 3] {
        let run = tmp.path().join(format!("w{size}"));
        let many = train_on(size, &config(&data, &run), None);
        assert_eq!(many.steps_run, one.steps_run);
        assert_eq!(many.checkpoints.len(), one.checkpoints.len());
        compare_logs(
            &format!("{size} ranks: train log"),
            &timeless(&many.train_log),
            &timeless(&one.train_log),
        );
        compare_logs(
            &format!("{size} ranks: evaluations"),
            &many.eval_log,
            &one.eval_log,
        );
        for (a, b) in many.checkpoints.iter().zip(&one.checkpoints) {
            compare_checkpoints(&format!("{size} ranks: {}", a.display()), a, b);
        }
        // The evaluator's files: the same votes, hence the same submission.
        let last = format!("evaluator_ARC_step_{}", one.train_log.last().unwrap().0);
        let sub = |dir: &Path| std::fs::read(dir.join(&last).join("submission.json")).unwrap();
        assert_eq!(
            sub(&run),
            sub(&tmp.path().join("w1")),
            "{size} ranks: submission"
        );
    }
}

/// A checkpoint written by 2 ranks resumes on 1 and on 3 ranks and
/// continues like the uninterrupted 2-rank run.
#[test]
fn a_checkpoint_resumes_on_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let two = train_on(2, &config(&data, &tmp.path().join("two")), None);
    assert!(two.checkpoints.len() >= 3);
    let mid = &two.checkpoints[0];
    let mid_step = checkpoint::load(mid).unwrap().state.step;
    let tail: Vec<_> = two
        .train_log
        .iter()
        .filter(|(s, _)| *s > mid_step)
        .cloned()
        .collect();
    assert!(!tail.is_empty());
    for size in [1, 3] {
        let run = tmp.path().join(format!("resumed{size}"));
        let r = train_on(size, &config(&data, &run), Some(mid));
        compare_logs(
            &format!("2 ranks resumed on {size}: train log"),
            &timeless(&r.train_log),
            &timeless(&tail),
        );
        compare_checkpoints(
            &format!("2 ranks resumed on {size}"),
            r.checkpoints.last().unwrap(),
            two.checkpoints.last().unwrap(),
        );
    }
    // Another global batch is refused with both sizes, not misread.
    let mut cfg = config(&data, &tmp.path().join("other-batch"));
    cfg.global_batch_size = 4;
    let err = on_ranks(2, |coll| {
        train_with(&cfg, &quiet(Some(mid)), coll)
            .unwrap_err()
            .to_string()
    });
    for e in err {
        assert!(
            e.contains("holds 6 batch slots") && e.contains("is 4"),
            "{e}"
        );
    }
}

/// Evaluation split over 2 and 3 ranks gives one rank's metrics, and the
/// same outputs in the same order, so the ARC evaluator votes identically.
#[test]
fn evaluation_split_over_ranks_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let cfg = config(&data, &tmp.path().join("run"));
    let device = device_choice::resolve(Some(DeviceKind::Cpu), 0).unwrap();
    let evaluate = |coll: &dyn Collective| {
        let open = |split, test| {
            PuzzleDataset::open(
                PuzzleDatasetConfig {
                    seed: cfg.seed,
                    dataset_paths: vec![data.clone()],
                    global_batch_size: cfg.global_batch_size,
                    test_set_mode: test,
                    epochs_per_iter: 1,
                    rank: coll.rank(),
                    num_replicas: coll.world_size(),
                },
                split,
            )
            .unwrap()
        };
        let test = open(Split::Test, true);
        let meta = test.metadata().clone();
        let arch = cfg
            .arch_for_dataset(meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers)
            .unwrap();
        let weights = Weights::init(&arch, 11);
        let local = cfg.global_batch_size / coll.world_size();
        let mut st = TrainerState::new(&cfg, arch, weights, local, coll.rank(), &device).unwrap();
        st.evaluate(&test, coll).unwrap()
    };
    let (one_metrics, one_outs) = on_ranks(1, evaluate).remove(0);
    assert!(one_outs.q_halt.len() > 6, "several test batches");
    let arc = |outs: &trm::model::act::EvalOutputs| {
        let mut ev = trm::eval::ArcEvaluator::new(&data, &trm::eval::DEFAULT_PASS_KS).unwrap();
        ev.add(outs).unwrap();
        let r = ev.result();
        (
            r.metrics,
            r.submission,
            serde_json::to_value(&r.report).unwrap(),
        )
    };
    let one_arc = arc(&one_outs);
    for size in [2, 3] {
        for (rank, (metrics, outs)) in on_ranks(size, evaluate).into_iter().enumerate() {
            let what = format!("{size} ranks, rank {rank}");
            assert_eq!(outs.puzzle_ids, one_outs.puzzle_ids, "{what}: puzzle ids");
            assert_eq!(outs.inputs, one_outs.inputs, "{what}: inputs");
            assert_eq!(outs.preds, one_outs.preds, "{what}: predictions");
            assert_eq!(outs.q_halt, one_outs.q_halt, "{what}: q_halt");
            assert_eq!(
                metrics.keys().collect::<Vec<_>>(),
                one_metrics.keys().collect::<Vec<_>>()
            );
            for (set, m) in &metrics {
                let o = &one_metrics[set];
                assert_eq!(m.count, o.count, "{what}: {set} count");
                for (x, y) in [
                    (m.accuracy, o.accuracy),
                    (m.exact_accuracy, o.exact_accuracy),
                    (m.lm_loss, o.lm_loss),
                    (m.q_halt_loss, o.q_halt_loss),
                ] {
                    assert!(
                        (x - y).abs() <= METRIC_TOL * y.abs().max(1.0),
                        "{what}: {set}"
                    );
                }
            }
            assert_eq!(arc(&outs), one_arc, "{what}: ARC evaluator");
        }
    }
}
