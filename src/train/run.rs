//! The run loop: datasets, run folder, state (fresh or resumed), then
//! iterations of training steps, each followed by evaluation and
//! checkpoints on schedule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::estimate::RunEstimate;
use super::eval;
use super::start_point::{start_point, StartPoint};
use super::state::TrainerState;
use super::telemetry::{self, Sinks};
use super::{Result, TrainError, TrainOptions, TrainReport};
use crate::checkpoint::{self, CheckpointDir};
use crate::config::{RunConfig, Schedule};
use crate::data::loader::{PuzzleDataset, PuzzleDatasetConfig, Split};
use crate::dist::{Collective, SingleProcess, World};
use crate::eval::ArcEvaluator;
use crate::model::config::ArchConfig;
use crate::model::device_choice::{self, DeviceChoice, DeviceKind};
use crate::model::weights::{Weights, PUZZLE_EMB};
use crate::telemetry::progress::{Progress, ProgressMode};
use crate::tensor::Tensor;

/// The run folder: `checkpoint_path`, else `checkpoints/<project>/<run>`.
pub fn run_dir(cfg: &RunConfig) -> PathBuf {
    if let Some(p) = &cfg.checkpoint_path {
        return p.clone();
    }
    let project = cfg.project_name.clone().unwrap_or_else(|| {
        let data = cfg
            .data_paths
            .first()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "data".into());
        format!("{data}-ACT-trm")
    });
    let run = cfg.run_name.clone().unwrap_or_else(|| "run".into());
    PathBuf::from("checkpoints").join(project).join(run)
}

/// Opens the datasets, builds or restores the state, and trains.
pub fn train(cfg: &RunConfig, opts: &TrainOptions) -> Result<TrainReport> {
    train_with(cfg, opts, &SingleProcess)
}

/// [`train`] over an explicit collective (ranks in one process, tests); a
/// GPU engine runs on GPU 0.
pub fn train_with(
    cfg: &RunConfig,
    opts: &TrainOptions,
    coll: &dyn Collective,
) -> Result<TrainReport> {
    let t0 = Instant::now();
    let device = resolve_device(cfg, opts.device, 0)?;
    train_on(cfg, opts, coll, device, t0)
}

/// `trm train` as one rank of `world` (a process a launcher started): its
/// GPU by [`crate::dist::gpu_ordinal`], the collective joining the other
/// ranks (waiting at most `timeout`, at the start and in every operation),
/// then the run.
pub fn train_in_world(
    cfg: &RunConfig,
    opts: &TrainOptions,
    world: &World,
    timeout: Duration,
) -> Result<TrainReport> {
    let t0 = Instant::now();
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let ordinal = crate::dist::gpu_ordinal(world, visible.as_deref());
    // The device picks the transport; joining comes before the data is
    // opened, so a rank that fails there stops the others at once.
    let device = resolve_device(cfg, opts.device, ordinal)?;
    let coll = crate::dist::join(world, device.kind, device.ordinal, timeout)?;
    train_on(cfg, opts, &*coll, device, t0)
}

/// The run on `device` over `coll`.
fn train_on(
    cfg: &RunConfig,
    opts: &TrainOptions,
    coll: &dyn Collective,
    device: DeviceChoice,
    t0: Instant,
) -> Result<TrainReport> {
    let Prepared {
        device,
        mut train_ds,
        test_ds,
        mut arc_evals,
        arch,
        schedule,
        local_batch,
        warnings,
    } = prepare(cfg, device, coll.rank(), coll.world_size())?;
    let world = coll.world_size();
    for w in warnings {
        if coll.rank() == 0 {
            eprintln!("warning: {w}");
        }
    }
    let dir = run_dir(cfg);
    // One writer per run folder, for the whole run (rank 0 writes it).
    let _lock = if coll.rank() == 0 {
        Some(crate::run_folder::lock(&dir)?)
    } else {
        None
    };
    let start = start_point(opts.resume.as_deref(), &dir)?;
    let moved_aside = match (&_lock, &start) {
        (Some(l), StartPoint::Fresh { .. }) => {
            crate::run_folder::claim_fresh(l, start.moves_old_run_aside(opts.start_over))?
        }
        _ => None,
    };
    let ckpt = CheckpointDir::new(dir.clone()).with_keep_last(cfg.checkpoint_keep_last);

    let rank0 = coll.rank() == 0;
    // weights: +load_checkpoint, else seeded init
    let weights = match &cfg.load_checkpoint {
        Some(p) => load_initial_weights(&arch, p, rank0)?,
        None => Weights::init(&arch, cfg.seed),
    };
    let mut st = TrainerState::new(cfg, arch, weights, local_batch, coll.rank(), &device)?;
    let mut resumed_from = None;
    if let StartPoint::Checkpoint(path) = start {
        let c = checkpoint::load(&path)?;
        same_checkpoint_on_every_rank(&path, coll)?;
        let loader = st.restore(&path, c)?;
        train_ds.restore(loader)?;
        resumed_from = Some(path);
    }

    if rank0 {
        let yaml = cfg.to_yaml()?;
        let p = dir.join("all_config.yaml");
        std::fs::write(&p, yaml).map_err(|source| TrainError::Io { path: p, source })?;
    }
    // After a resume the steps after the checkpoint are replayed: their old
    // records go.
    let mut sinks = Sinks::open(&dir, rank0, resumed_from.is_some(), st.step, opts.verbose)?;
    let say = |msg: &str| sinks.say(msg);
    say(&format!("run folder: {}", dir.display()));
    say(&device.describe(&st.engine.device_name()));
    if let Some(p) = &moved_aside {
        say(&format!(
            "{}: the previous run was moved to {}",
            if opts.start_over {
                "--start-over"
            } else {
                "--resume latest-if-any found no checkpoint"
            },
            p.display()
        ));
    }
    say(&format!("{schedule}"));
    say(&format!(
        "model: {} dense parameters, puzzle embedding {} x {}; {} ranks, local batch {}",
        st.layout.len, st.arch.num_puzzle_identifiers, st.arch.puzzle_emb_ndim, world, local_batch
    ));
    if let Some(p) = &resumed_from {
        say(&format!(
            "resumed from {} at step {} (iteration {} of {})",
            p.display(),
            st.step,
            st.iters_done,
            schedule.total_iters
        ));
    }
    if test_ds.is_none() {
        say("no test split found: evaluation is skipped");
    }
    let mut estimate = RunEstimate::new(
        &st.arch,
        local_batch,
        device.kind,
        schedule.total_steps,
        st.step,
    );
    if rank0 {
        for line in estimate.before_first_step(&st.arch) {
            sinks.tell(line);
        }
    }

    let mut report = TrainReport {
        run_dir: dir.clone(),
        total_steps: schedule.total_steps,
        steps_run: 0,
        train_log: Vec::new(),
        eval_log: Vec::new(),
        checkpoints: Vec::new(),
        seconds: 0.0,
        stopped_by: None,
    };
    if opts.handle_signals && cfg.checkpoint_on_signal {
        crate::signals::install();
    }
    let pause = crate::run_guard::step_pause();
    sinks.progress = rank0.then(|| {
        Progress::new(
            schedule.total_steps,
            st.step,
            if opts.progress {
                ProgressMode::Auto
            } else {
                ProgressMode::Hidden
            },
        )
        .with_samples_per_step(cfg.global_batch_size as u64)
    });
    for it in st.iters_done..schedule.total_iters {
        let mut batches = train_ds.train_batches();
        loop {
            let t = Instant::now();
            let Some(batch) = batches.next() else { break };
            let Some(m) = st.train_step(cfg, &schedule, &batch, coll)? else {
                continue;
            };
            let secs = t.elapsed().as_secs_f64();
            report.steps_run += 1;
            let log = telemetry::step_log(&m, cfg, &schedule, st.step, secs);
            sinks.log(st.step, &log)?;
            let mem = st.engine.device_memory_used().map(|b| b as u64);
            sinks.progress(st.step, &m, cfg.global_batch_size, mem);
            report.train_log.push((st.step, log));
            if rank0 {
                for line in estimate.after_step(secs) {
                    sinks.tell(line);
                }
            }
            if let Some(d) = pause {
                std::thread::sleep(d);
            }
            let stop = opts.handle_signals && cfg.checkpoint_on_signal;
            if let (true, Some(sig)) = (stop, agreed_stop(coll)?) {
                // Mid-iteration checkpoint: the loader saves its position in
                // the walk, so a resume continues with the next batch.
                if let Some(c) = st.checkpoint_contents(cfg, batches.state(), coll)? {
                    report.checkpoints.push(ckpt.save(&c)?);
                }
                sinks.finish();
                report.stopped_by = Some(sig);
                report.seconds = t0.elapsed().as_secs_f64();
                return Ok(report);
            }
        }
        st.iters_done = it + 1;
        if !schedule.evaluates_after(it) {
            continue;
        }
        let loader_state = train_ds.state().clone();
        if let Some(test) = &test_ds {
            let log = eval::evaluate_run(&mut st, test, &mut arc_evals, &dir, coll)?;
            sinks.log(st.step, &log)?;
            sinks.note(&eval::summary_line(st.step, &log));
            report.eval_log.push((st.step, log));
        }
        // Every rank takes part (the carry is gathered); rank 0 writes.
        if cfg.checkpoint_every_eval || it + 1 == schedule.total_iters {
            if let Some(c) = st.checkpoint_contents(cfg, &loader_state, coll)? {
                let path = ckpt.save(&c)?;
                sinks.note(&format!("checkpoint: {}", path.display()));
                report.checkpoints.push(path);
            }
        }
    }
    sinks.finish();
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The signal the ranks stop on after this step: a signal any rank
/// received stops every rank after the same step, so that they checkpoint
/// one state together (the first signalled rank's signal, in rank order).
/// A world of one asks no one.
fn agreed_stop(coll: &dyn Collective) -> Result<Option<i32>> {
    let mine = crate::signals::requested();
    if coll.world_size() == 1 {
        return Ok(mine);
    }
    let all = coll.all_gather_bytes(&mine.unwrap_or(0).to_le_bytes())?;
    Ok(all
        .iter()
        .filter_map(|b| Some(i32::from_le_bytes(b.as_slice().try_into().ok()?)))
        .find(|&s| s != 0))
}

/// Every rank verified its checkpoint on loading; this checks they all
/// loaded the same one (by the SHA-256 of its manifest, which covers every
/// file), e.g. that no rank resolved `latest` in another copy of the folder.
fn same_checkpoint_on_every_rank(path: &Path, coll: &dyn Collective) -> Result<()> {
    if coll.world_size() == 1 {
        return Ok(());
    }
    let manifest = checkpoint::hash_file(&path.join(checkpoint::MANIFEST_FILE))?;
    // "<sha256> <path>": a hex digest has no space.
    let mine = format!("{} {}", manifest.sha256, path.display());
    let all = coll.all_gather_bytes(mine.as_bytes())?;
    let loaded: Vec<(String, String)> = all
        .iter()
        .map(|b| {
            let text = String::from_utf8_lossy(b);
            let (sha, place) = text.split_once(' ').unwrap_or((&text, ""));
            (sha.to_string(), place.to_string())
        })
        .collect();
    let mismatch = |reason: String| TrainError::Resume {
        path: path.to_path_buf(),
        reason,
    };
    let (sha0, place0) = loaded
        .first()
        .ok_or_else(|| mismatch("the ranks' checkpoints could not be compared".into()))?;
    match loaded.iter().enumerate().find(|(_, (sha, _))| sha != sha0) {
        None => Ok(()),
        Some((rank, (sha, place))) => Err(mismatch(format!(
            "rank {rank} loaded {place} but rank 0 loaded {place0}, another checkpoint \
             (manifest SHA-256 {sha} vs {sha0}); every rank must resume from the same one"
        ))),
    }
}

/// Everything a run checks and opens before it touches its run folder.
pub(super) struct Prepared {
    pub device: DeviceChoice,
    pub train_ds: PuzzleDataset,
    pub test_ds: Option<PuzzleDataset>,
    pub arc_evals: Vec<ArcEvaluator>,
    pub arch: ArchConfig,
    pub schedule: Schedule,
    pub local_batch: usize,
    /// Legal but surprising settings, for rank 0 to print.
    pub warnings: Vec<String>,
}

/// The first checks of a run, before any data is read: the config, then
/// the device (`requested` wins over the config's; `ordinal` is the GPU).
pub(super) fn resolve_device(
    cfg: &RunConfig,
    requested: Option<DeviceKind>,
    ordinal: usize,
) -> Result<DeviceChoice> {
    cfg.validate()?;
    Ok(device_choice::resolve(requested.or(cfg.device), ordinal)?)
}

/// The checks a run makes before its first write, after
/// [`resolve_device`], in order: the split of the global batch over
/// `world` ranks, the datasets and evaluators, the arch they imply, the
/// memory limits and the schedule. Shared by the run and `trm train
/// --dry-run`.
pub(super) fn prepare(
    cfg: &RunConfig,
    device: DeviceChoice,
    rank: usize,
    world: usize,
) -> Result<Prepared> {
    if cfg.global_batch_size % world != 0 {
        return Err(TrainError::BatchSplit {
            global: cfg.global_batch_size,
            world,
        });
    }
    let (train_ds, test_ds) = open_datasets(cfg, rank, world)?;
    let arc_evals = eval::arc_evaluators(cfg, test_ds.is_some(), rank)?;
    let meta = train_ds.metadata().clone();
    let arch = cfg.arch_for_dataset(meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers)?;
    crate::limits::check(
        "training this model",
        crate::limits::model_bytes(&arch, cfg.global_batch_size, true),
        "lower global_batch_size or the model's size (arch.hidden_size, arch.expansion)",
    )?;
    // The loader holds one iteration's group order: groups x epochs per iteration.
    crate::limits::check(
        "the data order of one iteration",
        crate::limits::product(&[meta.total_groups as u64, cfg.epochs_per_iter() as u64, 8]),
        "lower eval_interval (epochs per evaluation)",
    )?;
    let schedule = Schedule::new(cfg, meta.total_groups, meta.mean_puzzle_examples);
    let local_batch = train_ds.local_batch_size();
    let warnings = crate::run_guard::schedule_warnings(cfg, &schedule)?;
    Ok(Prepared {
        device,
        train_ds,
        test_ds,
        arc_evals,
        arch,
        schedule,
        local_batch,
        warnings,
    })
}

/// The train split and, when the data has one, the test split, both checked.
fn open_datasets(
    cfg: &RunConfig,
    rank: usize,
    world: usize,
) -> Result<(PuzzleDataset, Option<PuzzleDataset>)> {
    let ds_cfg = |test: bool| PuzzleDatasetConfig {
        seed: cfg.seed,
        dataset_paths: if test && !cfg.data_paths_test.is_empty() {
            cfg.data_paths_test.clone()
        } else {
            cfg.data_paths.clone()
        },
        global_batch_size: cfg.global_batch_size,
        test_set_mode: test,
        epochs_per_iter: if test { 1 } else { cfg.epochs_per_iter() },
        rank,
        num_replicas: world,
    };
    let train_ds = PuzzleDataset::open(ds_cfg(false), Split::Train)?;
    train_ds.validate()?;
    // A dataset without a test split trains without evaluation, as the reference.
    let test_cfg = ds_cfg(true);
    let has_test = test_cfg
        .dataset_paths
        .iter()
        .any(|p| p.join(Split::Test.dir_name()).join("dataset.json").exists());
    let test_ds = if has_test {
        let ds = PuzzleDataset::open(test_cfg, Split::Test)?;
        ds.validate()?;
        Some(ds)
    } else {
        None
    };
    Ok((train_ds, test_ds))
}

/// The K lists of the config's ARC evaluators (`arc@ARC` entries of
/// `evaluators`): each one's `pass_Ks` option, else the reference's default.
pub fn arc_pass_ks(cfg: &RunConfig) -> Vec<Vec<usize>> {
    cfg.evaluators
        .iter()
        .map(|ev| {
            ev.options
                .get("pass_Ks")
                .and_then(|v| v.as_sequence())
                .map(|seq| {
                    seq.iter()
                        .filter_map(|k| k.as_u64())
                        .map(|k| k as usize)
                        .collect()
                })
                .unwrap_or_else(|| crate::eval::DEFAULT_PASS_KS.to_vec())
        })
        .collect()
}

/// `+load_checkpoint=PATH`: a checkpoint folder (its EMA weights when it has
/// them, as the reference saves the EMA model) or a reference-named
/// safetensors file. A puzzle-embedding table of another size is replaced by
/// its mean row repeated, as the reference does.
fn load_initial_weights(arch: &ArchConfig, path: &Path, rank0: bool) -> Result<Weights> {
    let mut map = checkpoint::load_weights_only(path)?;
    if path.is_dir() {
        let c = checkpoint::load(path)?;
        if let Some(ema) = c.ema {
            map.extend(ema);
        }
    }
    let mut map: BTreeMap<String, Tensor> = map
        .into_iter()
        .map(|(k, v)| {
            (
                crate::model::weights::strip_wrapper_prefixes(&k).to_string(),
                v,
            )
        })
        .collect();
    if arch.puzzle_emb_ndim > 0 {
        let want = [arch.num_puzzle_identifiers, arch.puzzle_emb_ndim];
        if let Some(t) = map.get(PUZZLE_EMB) {
            if t.shape != want && t.shape.len() == 2 && t.shape[1] == want[1] && t.shape[0] > 0 {
                let nd = t.shape[1];
                let mean = mean_row(&t.data, nd);
                let mut data = Vec::with_capacity(want[0] * nd);
                for _ in 0..want[0] {
                    data.extend_from_slice(&mean);
                }
                if rank0 {
                    eprintln!(
                        "load_checkpoint: puzzle embedding {:?} resized to {:?} with its mean row",
                        t.shape, want
                    );
                }
                map.insert(PUZZLE_EMB.into(), Tensor::new(&want, data));
            }
        }
    }
    Weights::from_tensors(arch, map).map_err(|e| TrainError::Resume {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The mean row of a `[rows, nd]` table (accumulated in f64): what the
/// reference fills a resized puzzle-embedding table with.
pub fn mean_row(table: &[f32], nd: usize) -> Vec<f32> {
    let rows = table.len() / nd.max(1);
    let mut mean = vec![0.0f64; nd];
    for row in table.chunks_exact(nd.max(1)) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x as f64;
        }
    }
    mean.iter()
        .map(|&x| (x / rows.max(1) as f64) as f32)
        .collect()
}
