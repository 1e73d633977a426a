//! The training driver (spec sections 5-8): the ACT carry across steps,
//! halting with seeded exploration, the loss head, AdamATan2 on the dense
//! weights, sparse sign-SGD on the puzzle-embedding rows, the LR schedule,
//! EMA, evaluation every `eval_interval` epochs, full-state checkpoints with
//! an exact resume, and telemetry.
//!
//! Design rule: one step is `carry update -> forward -> loss -> backward ->
//! collectives -> optimisers`; the network and the optimisers run in an
//! engine ([`crate::model::engine::Engine`]), the ACT rules come from
//! [`crate::model::act`], and everything a rank exchanges goes through
//! [`crate::dist::Collective`]: the dense gradients as ONE flat buffer (the
//! layout of [`crate::model::layout::FlatLayout`], the reference's parameter
//! order), the puzzle-embedding rows as (ids, rows), metrics as sums.
//! Everything random is seeded and keyed by global sample slot, never by
//! rank: the data order (its position saved), and the halting-exploration
//! draws, keyed by (seed, step, slot) with no state. So a resumed run
//! continues bit-identically, N ranks follow the one-rank trajectory up to
//! float summation order, and checkpoints (whose carry is the global
//! batch's, `world_carry`) resume on any world size with the same global
//! batch.
//!
//! By job: `state` (the trainer's state and one step), `contents` (what a
//! checkpoint holds and the resume), `world_carry` (the global batch's
//! carry from every rank's slots), `eval` (evaluation during a run),
//! `telemetry` (where a step's numbers go), `estimate` (the run's expected
//! duration), `run` (the run loop), `start_point` (what `--resume` means for
//! the run folder), `dry_run` (`trm train --dry-run`: the start-up checks
//! alone).

mod contents;
mod dry_run;
mod estimate;
mod eval;
mod run;
mod start_point;
mod state;
mod telemetry;
mod world_carry;

pub use dry_run::{dry_run, DryRunError, DryRunReport};
pub use run::{arc_pass_ks, mean_row, run_dir, train, train_in_world, train_with};
pub use start_point::{start_point, StartPoint, LATEST_IF_ANY};
pub use state::TrainerState;

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::data::loader::LoaderError;
use crate::model::act::ActError;
use crate::model::device_choice::DeviceKind;
use crate::model::trm::TrmError;
use crate::optim::OptimError;
use crate::telemetry::TelemetryError;

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
    Join(#[from] crate::dist::JoinError),
    #[error(transparent)]
    Cuda(#[from] crate::backend::cuda::CudaError),
    #[error(transparent)]
    Device(#[from] crate::model::device_choice::DeviceError),
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

pub(crate) type Result<T> = std::result::Result<T, TrainError>;

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
    /// folder; `"latest-if-any"` = that, or a fresh start when there is none
    /// yet (restarts by a scheduler); else a checkpoint folder.
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
    /// `--device`: wins over the config's `device`; with neither, a usable
    /// GPU else the CPU.
    pub device: Option<DeviceKind>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            resume: None,
            progress: true,
            verbose: true,
            start_over: false,
            handle_signals: false,
            device: None,
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
