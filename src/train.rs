//! The training driver (spec sections 5-8): the ACT carry across steps,
//! halting with seeded exploration, the loss head, AdamATan2 on the dense
//! weights, sparse sign-SGD on the puzzle-embedding rows, the LR schedule,
//! EMA, evaluation every `eval_interval` epochs, full-state checkpoints with
//! an exact resume, and telemetry.
//!
//! Design rule: one step is `carry update -> forward -> loss -> backward ->
//! collectives -> optimisers`, and everything a rank exchanges goes through
//! [`Collective`]: the dense gradients as ONE flat buffer (the layout of
//! [`FlatLayout`], the reference's parameter order), the puzzle-embedding
//! rows as (ids, rows), metrics as sums. The master weights live in that
//! flat f32 buffer; the model's typed [`Params`] are refreshed from it after
//! each update. Everything random (exploration, data order) is seeded and
//! its position saved, so a resumed run continues bit-identically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointContents, CheckpointDir, CheckpointError, TrainState};
use crate::config::{RunConfig, Schedule};
use crate::data::loader::{
    Batch as LoaderBatch, LoaderError, LoaderState, PuzzleDataset, PuzzleDatasetConfig, Split,
};
use crate::dist::{Collective, SingleProcess};
use crate::loss::StepMetrics;
use crate::model::act::{
    self, check_batch_shape, evaluate_batches, exploration_rng, reduce_metrics, ActError, Carry,
    EvalOutputs,
};
use crate::model::config::ArchConfig;
use crate::model::cpu::{CpuEngine, CpuEngineConfig};
use crate::model::engine::{Engine, EngineError, EngineState, OptimStep};
use crate::model::layout::FlatLayout;
use crate::model::trm::{Dims, Params, TrmError};
use crate::model::weights::{Weights, PUZZLE_EMB};
use crate::optim::{AdamAtan2Config, OptimError};
use crate::telemetry::metrics::MetricsWriter;
use crate::telemetry::progress::{Progress, ProgressMode};
use crate::telemetry::tensorboard::EventWriter;
use crate::telemetry::TelemetryError;
use crate::tensor::Tensor;

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("dataset: {0}")]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Model(#[from] TrmError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error("telemetry: {0}")]
    Telemetry(#[from] TelemetryError),
    #[error("ARC evaluator: {0}")]
    Eval(#[from] crate::eval::EvalError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the loss is not finite at step {step} (lm_loss {lm_loss}, q_halt_loss {q_halt_loss}, lr {lr:e}); \
         stopped before updating the weights. The last good checkpoint is kept; \
         try a lower lr or a longer warm-up"
    )]
    NonFinite {
        step: u64,
        lm_loss: f64,
        q_halt_loss: f64,
        lr: f64,
    },
    #[error("cannot resume from {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error(transparent)]
    Collective(#[from] crate::dist::CollectiveError),
    #[error(transparent)]
    Folder(#[from] crate::run_folder::FolderError),
    #[error(
        "this run would train 0 steps: the dataset gives {batches} full batches of \
         global_batch_size {global} per epoch; lower global_batch_size or use a larger dataset"
    )]
    NoSteps { batches: u64, global: usize },
    #[error("global_batch_size {global} is not divisible by the {world} ranks")]
    BatchSplit { global: usize, world: usize },
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
}

type Result<T> = std::result::Result<T, TrainError>;

// The shared ACT rules fail with the model's or the collective's own
// errors; they keep those variants here.
impl From<ActError> for TrainError {
    fn from(e: ActError) -> Self {
        match e {
            ActError::Model(e) => TrainError::Model(e),
            ActError::Collective(e) => TrainError::Collective(e),
        }
    }
}

/// How to run (what is not in the config).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// `None` = start fresh; `"latest"` = the newest checkpoint of this run's
    /// folder; else a checkpoint folder.
    pub resume: Option<String>,
    /// A progress bar (plain lines when stderr is not a terminal).
    pub progress: bool,
    /// Print the schedule and per-evaluation summaries.
    pub verbose: bool,
    /// A fresh run into a folder holding a run moves that run aside
    /// (else it is refused).
    pub start_over: bool,
    /// Catch SIGTERM/SIGINT (with `checkpoint_on_signal`): checkpoint and stop.
    pub handle_signals: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            resume: None,
            progress: true,
            verbose: true,
            start_over: false,
            handle_signals: false,
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub total_steps: u64,
    /// Steps run by this process (after a resume: only the new ones).
    pub steps_run: u64,
    /// Per step run: (step, the logged train metrics).
    pub train_log: Vec<(u64, Vec<(String, f64)>)>,
    /// Per evaluation: (step, metrics).
    pub eval_log: Vec<(u64, Vec<(String, f64)>)>,
    pub checkpoints: Vec<PathBuf>,
    pub seconds: f64,
    /// The signal that stopped the run early (its checkpoint is the last one).
    pub stopped_by: Option<i32>,
}

impl TrainReport {
    /// The value of `key` in the last evaluation that logged it.
    pub fn last_eval(&self, key: &str) -> Option<f64> {
        self.eval_log
            .iter()
            .rev()
            .find_map(|(_, m)| m.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
    }
}

// ---------------------------------------------------------------------------
// RNG state (serialisable)

/// The halting-exploration stream: a seed and a position, saved with
/// checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RngState {
    seed: u64,
    /// ChaCha word position, as a decimal string (u128 does not fit JSON numbers).
    word_pos: String,
}

// ---------------------------------------------------------------------------
// the training state

/// Model, optimisers, carry and counters: everything a checkpoint holds.
/// The engine owns the weights, the optimiser states and the carry's hidden
/// states; the host keeps the carry's slots and the exploration stream.
pub struct TrainerState {
    pub arch: ArchConfig,
    pub layout: FlatLayout,
    pub engine: CpuEngine,
    pub carry: Carry,
    rng: ChaCha8Rng,
    rng_seed: u64,
    pub step: u64,
    /// Train/eval iterations completed.
    pub iters_done: usize,
    dm: Dims,
    local_batch: usize,
}

impl TrainerState {
    /// A fresh state: weights from `init` (seeded), or `weights` when given.
    pub fn new(
        cfg: &RunConfig,
        arch: ArchConfig,
        weights: Weights,
        local_batch: usize,
        rank: usize,
    ) -> Result<TrainerState> {
        let params = Params::<f32>::from_weights(&arch, &weights)?;
        let engine = CpuEngine::new(
            arch.clone(),
            params,
            local_batch,
            CpuEngineConfig {
                adam: AdamAtan2Config {
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    weight_decay: cfg.weight_decay,
                },
                ema_rate: cfg.ema.then_some(cfg.ema_rate),
                puzzle_emb_weight_decay: cfg.puzzle_emb_weight_decay,
            },
        );
        let dm = engine.ctx().dm;
        Ok(TrainerState {
            layout: engine.layout().clone(),
            engine,
            carry: Carry::new(local_batch, dm.seq),
            rng: exploration_rng(cfg.seed, rank),
            rng_seed: cfg.seed,
            step: 0,
            iters_done: 0,
            dm,
            local_batch,
            arch,
        })
    }

    /// One training step on `batch` (spec sections 5-7). Returns the step's
    /// metric sums (already reduced over ranks), or `None` past `total_steps`.
    pub fn train_step(
        &mut self,
        cfg: &RunConfig,
        schedule: &Schedule,
        batch: &LoaderBatch,
        coll: &dyn Collective,
    ) -> Result<Option<StepMetrics>> {
        self.step += 1;
        if self.step > schedule.total_steps {
            return Ok(None);
        }
        let dm = self.dm;
        check_batch_shape(&dm, batch, "inputs")?;
        // Halted slots take new samples and restart from H_init / L_init.
        self.engine.reset_halted(&self.carry.halted);
        self.carry.load_halted(batch);
        for s in self.carry.steps.iter_mut() {
            *s += 1;
        }
        let c = &self.carry;
        let slots = crate::model::trm::Batch {
            inputs: &c.inputs,
            labels: &c.labels,
            puzzle_ids: &c.puzzle_ids,
            b: dm.b,
        };
        let r = act::act_step(
            &mut self.engine,
            &self.arch,
            &slots,
            &c.steps,
            Some(&mut self.rng),
        )?;
        let lr = schedule.lr_at(self.step);
        if !r.loss.loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step,
                lm_loss: r.loss.lm_loss,
                q_halt_loss: r.loss.q_halt_loss,
                lr,
            });
        }
        let q_halt: Vec<f32> = (0..dm.b).map(|b| r.q[b * 2]).collect();
        let mut metrics = StepMetrics::from_step(
            &r.loss,
            &q_halt,
            &r.halted,
            &self.carry.steps,
            r.has_q_continue,
        );
        self.carry.halted = r.halted;
        // gradients of loss / global_batch_size, reduced over ranks
        let update = OptimStep {
            grad_scale: 1.0 / cfg.global_batch_size as f32,
            lr,
            puzzle_emb_lr: schedule.puzzle_emb_lr_at(self.step),
            update_dense: !cfg.freeze_weights,
        };
        self.engine
            .optimizer_step(&update, &self.carry.puzzle_ids, coll)
            .map_err(engine_error)?;
        reduce_metrics(&mut metrics, coll)?;
        Ok(Some(metrics))
    }

    /// The live weights (a host copy).
    pub fn params(&self) -> Params<f32> {
        self.engine.params()
    }

    /// The weights evaluation uses: the EMA shadow when EMA is on (with the
    /// live puzzle-embedding table), else the live weights.
    pub fn eval_params(&self) -> Params<f32> {
        self.engine.eval_params()
    }

    /// Runs every test batch for `halt_max_steps` steps (spec section 5,
    /// evaluation) and returns per-set metric sums and the outputs.
    pub fn evaluate(
        &self,
        params: &Params<f32>,
        test: &PuzzleDataset,
        coll: &dyn Collective,
    ) -> Result<(BTreeMap<String, StepMetrics>, EvalOutputs)> {
        evaluate_batches(
            self.engine.ctx(),
            &self.arch,
            params,
            test.test_batches(),
            test.metadata().blank_identifier_id,
            coll,
            &mut |_| {},
        )
        .map_err(TrainError::from)
    }

    /// The checkpoint contents of this state.
    pub fn checkpoint_contents(
        &self,
        cfg: &RunConfig,
        loader: &LoaderState,
    ) -> Result<CheckpointContents> {
        let dm = self.dm;
        let e = self.engine.export_state();
        let mut model = e.params.to_map(&self.arch);
        let mut puzzle_emb = BTreeMap::new();
        if let Some(t) = model.remove(PUZZLE_EMB) {
            puzzle_emb.insert(PUZZLE_EMB.to_string(), t);
        }
        let m = self.layout.to_map(&e.adam_m, "");
        let v = self.layout.to_map(&e.adam_v, "");
        let rng = RngState {
            seed: self.rng_seed,
            word_pos: self.rng.get_word_pos().to_string(),
        };
        Ok(CheckpointContents {
            model,
            ema: e.ema.as_ref().map(|s| self.layout.to_map(s, "")),
            optim: checkpoint::pack_adam(&m, &v),
            puzzle_emb,
            carry: Some(self.carry.to_map(&e.z_h, &e.z_l, dm.s, dm.d)),
            state: TrainState {
                step: self.step,
                optimizer_steps: e.optimizer_steps,
                rng: serde_json::to_value(rng).unwrap_or_default(),
                loader: serde_json::to_value(loader).unwrap_or_default(),
                config: cfg.to_yaml()?,
                // Absolute paths and build hashes, so `trm package` finds
                // the datasets again from anywhere (the config has them as typed).
                extra: serde_json::json!({
                    "iters_done": self.iters_done,
                    crate::dataset_ref::EXTRA_KEY: crate::dataset_ref::record(&cfg.data_paths),
                }),
            },
        })
    }

    /// Restores a state saved by [`TrainerState::checkpoint_contents`];
    /// returns the loader position to restore.
    pub fn restore(&mut self, path: &Path, c: CheckpointContents) -> Result<LoaderState> {
        let bad = |reason: String| TrainError::Resume {
            path: path.to_path_buf(),
            reason,
        };
        let dm = self.dm;
        let mut weights = c.model.clone();
        weights.extend(c.puzzle_emb.clone());
        let w = Weights::from_tensors(&self.arch, weights).map_err(|e| bad(e.to_string()))?;
        let params = Params::from_weights(&self.arch, &w)?;
        let (m, v) = checkpoint::unpack_adam(c.optim);
        let adam_m = self.layout.from_map(&m, "").map_err(&bad)?;
        let adam_v = self.layout.from_map(&v, "").map_err(&bad)?;
        let ema = match c.ema {
            Some(shadow) => Some(self.layout.from_map(&shadow, "").map_err(&bad)?),
            None => None,
        };
        let carry = c
            .carry
            .ok_or_else(|| bad("the checkpoint has no ACT carry".into()))?;
        let (carry, z_h, z_l) = Carry::from_map(&carry, dm.b, dm.s, dm.seq, dm.d).map_err(&bad)?;
        self.engine
            .import_state(EngineState {
                params,
                adam_m,
                adam_v,
                optimizer_steps: c.state.optimizer_steps,
                ema,
                z_h,
                z_l,
            })
            .map_err(|e| match e {
                EngineError::State(reason) => bad(reason),
                e => engine_error(e),
            })?;
        self.carry = carry;
        let rng: RngState = serde_json::from_value(c.state.rng.clone())
            .map_err(|e| bad(format!("RNG state: {e}")))?;
        let pos: u128 = rng
            .word_pos
            .parse()
            .map_err(|e| bad(format!("RNG position: {e}")))?;
        self.rng = exploration_rng(rng.seed, 0);
        self.rng.set_word_pos(pos);
        self.rng_seed = rng.seed;
        self.step = c.state.step;
        self.iters_done = c
            .state
            .extra
            .get("iters_done")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("state.json lacks extra.iters_done".into()))?
            as usize;
        let loader: LoaderState = serde_json::from_value(c.state.loader)
            .map_err(|e| bad(format!("loader state: {e}")))?;
        Ok(loader)
    }

    pub fn local_batch(&self) -> usize {
        self.local_batch
    }
}

/// An engine error as the trainer's (a state mismatch is a bad resume).
fn engine_error(e: EngineError) -> TrainError {
    match e {
        EngineError::Model(e) => TrainError::Model(e),
        EngineError::Optim(e) => TrainError::Optim(e),
        EngineError::Collective(e) => TrainError::Collective(e),
        EngineError::State(reason) => TrainError::Resume {
            path: PathBuf::new(),
            reason,
        },
    }
}

// ---------------------------------------------------------------------------
// the run

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

/// [`train`] over an explicit collective (data-parallel ranks).
pub fn train_with(
    cfg: &RunConfig,
    opts: &TrainOptions,
    coll: &dyn Collective,
) -> Result<TrainReport> {
    let t0 = Instant::now();
    cfg.validate()?;
    let world = coll.world_size();
    if cfg.global_batch_size % world != 0 {
        return Err(TrainError::BatchSplit {
            global: cfg.global_batch_size,
            world,
        });
    }
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
        rank: coll.rank(),
        num_replicas: world,
    };
    let mut train_ds = PuzzleDataset::open(ds_cfg(false), Split::Train)?;
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
    // ARC evaluators (`arc@ARC` in `evaluators`), on the first test dataset
    // as the reference does; `pass_Ks` in its options overrides the K list.
    let arc_ks = if test_ds.is_some() {
        arc_pass_ks(cfg)
    } else {
        Vec::new()
    };
    let eval_data_dir = cfg
        .data_paths_test
        .first()
        .or(cfg.data_paths.first())
        .cloned()
        .unwrap_or_default();
    // Loaded once (identifiers and test puzzles), so a broken evaluator file
    // fails the run at start, not at the first evaluation.
    let mut arc_evals = if coll.rank() == 0 {
        arc_ks
            .iter()
            .map(|ks| crate::eval::ArcEvaluator::new(&eval_data_dir, ks))
            .collect::<std::result::Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
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

    for w in crate::run_guard::schedule_warnings(cfg, &schedule)? {
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
    let moved_aside = match (&_lock, &opts.resume) {
        (Some(l), None) => crate::run_folder::claim_fresh(l, opts.start_over)?,
        _ => None,
    };
    let ckpt = CheckpointDir::new(dir.clone()).with_keep_last(cfg.checkpoint_keep_last);

    // weights: +load_checkpoint, else seeded init
    let weights = match &cfg.load_checkpoint {
        Some(p) => load_initial_weights(&arch, p)?,
        None => Weights::init(&arch, cfg.seed),
    };
    let mut st = TrainerState::new(cfg, arch, weights, local_batch, coll.rank())?;
    let mut resumed_from = None;
    if let Some(spec) = &opts.resume {
        let path = ckpt.resolve(spec)?;
        let c = checkpoint::load(&path)?;
        let loader = st.restore(&path, c)?;
        train_ds.restore(loader)?;
        resumed_from = Some(path);
    }

    let rank0 = coll.rank() == 0;
    let mut metrics_out = None;
    let mut events = None;
    if rank0 {
        let yaml = cfg.to_yaml()?;
        let p = dir.join("all_config.yaml");
        std::fs::write(&p, yaml).map_err(|source| TrainError::Io { path: p, source })?;
        if resumed_from.is_some() {
            // The steps after the checkpoint are replayed: their old records go.
            MetricsWriter::cut_after(&dir, st.step)?;
        }
        metrics_out = Some(MetricsWriter::create(&dir)?);
        let mut ev = EventWriter::create(&dir)?;
        if resumed_from.is_some() {
            ev.mark_restart(st.step)?;
        }
        events = Some(ev);
    }
    let say = |msg: &str| {
        if opts.verbose && rank0 {
            eprintln!("{msg}");
        }
    };
    say(&format!("run folder: {}", dir.display()));
    if let Some(p) = &moved_aside {
        say(&format!(
            "--start-over: the previous run was moved to {}",
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
    if opts.handle_signals && cfg.checkpoint_on_signal && world == 1 {
        crate::signals::install();
    }
    let pause = crate::run_guard::step_pause();
    let mut progress = rank0.then(|| {
        Progress::new(
            schedule.total_steps,
            st.step,
            if opts.progress {
                ProgressMode::Auto
            } else {
                ProgressMode::Hidden
            },
        )
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
            let mut log = m.train_view(cfg.global_batch_size);
            log.push(("train/lr".into(), schedule.lr_at(st.step)));
            log.push((
                "train/samples_per_s".into(),
                cfg.global_batch_size as f64 / secs.max(1e-9),
            ));
            if let Some(w) = &mut metrics_out {
                w.log(st.step, &log)?;
            }
            if let Some(e) = &mut events {
                let l: Vec<(&str, f32)> =
                    log.iter().map(|(k, v)| (k.as_str(), *v as f32)).collect();
                e.add_scalars(st.step, &l)?;
            }
            if let Some(p) = &mut progress {
                let loss = (m.lm_loss + 0.5 * (m.q_halt_loss + m.q_continue_loss))
                    / cfg.global_batch_size as f64;
                p.update(st.step, Some(loss));
            }
            report.train_log.push((st.step, log));
            if let Some(d) = pause {
                std::thread::sleep(d);
            }
            if let (true, Some(sig)) = (opts.handle_signals, crate::signals::requested()) {
                // Mid-iteration checkpoint: the loader saves its position in
                // the walk, so a resume continues with the next batch.
                let c = st.checkpoint_contents(cfg, batches.state())?;
                let path = ckpt.save(&c)?;
                if let Some(p) = &mut progress {
                    p.finish();
                }
                report.checkpoints.push(path);
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
            let params = st.eval_params();
            let (per_set, outs) = st.evaluate(&params, test, coll)?;
            let mut log = Vec::new();
            for (set, m) in &per_set {
                log.extend(m.eval_view(set));
            }
            if rank0 {
                for ev in &mut arc_evals {
                    ev.clear();
                    ev.add(&outs)?;
                    let res = ev.result();
                    let out_dir = dir.join(format!("evaluator_ARC_step_{}", st.step));
                    crate::eval::write_results(&out_dir, &res)?;
                    log.extend(res.metrics.iter().cloned());
                }
            }
            if let Some(w) = &mut metrics_out {
                w.log(st.step, &log)?;
            }
            if let Some(e) = &mut events {
                let l: Vec<(&str, f32)> =
                    log.iter().map(|(k, v)| (k.as_str(), *v as f32)).collect();
                e.add_scalars(st.step, &l)?;
            }
            let summary: Vec<String> = log
                .iter()
                .filter(|(k, _)| {
                    k.ends_with("/accuracy")
                        || k.ends_with("exact_accuracy")
                        || k.ends_with("lm_loss")
                        || k == "ARC/pass@1"
                        || k == "ARC/pass@2"
                })
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            let line = format!("eval at step {}: {}", st.step, summary.join(", "));
            match &mut progress {
                Some(p) if opts.verbose => p.println(&line),
                _ => say(&line),
            }
            report.eval_log.push((st.step, log));
        }
        if rank0 && (cfg.checkpoint_every_eval || it + 1 == schedule.total_iters) {
            let c = st.checkpoint_contents(cfg, &loader_state)?;
            let path = ckpt.save(&c)?;
            let line = format!("checkpoint: {}", path.display());
            match &mut progress {
                Some(p) if opts.verbose => p.println(&line),
                _ => say(&line),
            }
            report.checkpoints.push(path);
        }
    }
    if let Some(p) = &mut progress {
        p.finish();
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
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
fn load_initial_weights(arch: &ArchConfig, path: &Path) -> Result<Weights> {
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
                eprintln!(
                    "load_checkpoint: puzzle embedding {:?} resized to {:?} with its mean row",
                    t.shape, want
                );
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
