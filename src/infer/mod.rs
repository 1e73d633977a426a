//! `trm infer`: a model folder (`trm package`) + an ARC challenges file ->
//! the Kaggle `submission.json`, with no dataset on disk and no Python.
//!
//! The augmented test set is built in memory by the builder's own code
//! ([`puzzle_group`], [`render_split`]), so a puzzle gets the augmentations
//! `trm build-dataset` would have given it with the model's build seed: its
//! position in the build order is its original's position among the
//! originals of identifiers.json, and every augmented name the model knows
//! maps to its trained embedding row. Every example runs for
//! `halt_max_steps` ACT steps, batched as the training-time evaluation
//! batches (by default the same batch size), and the ARC evaluator votes.
//!
//! Puzzles the model does not know (a new hidden test set) get new rows:
//! without fitting they are copies of the blank row, as the reference's
//! blank id 0; with `fit_steps > 0` they start from the mean row (as the
//! reference resizes a table) and are fitted on the puzzles' demonstration
//! pairs by the trainer itself with the weights frozen (`freeze_weights`:
//! sparse sign-SGD on the new rows only).

mod budget;
mod devices;
mod rows;
mod stream;

pub use budget::parse_duration;
pub use devices::DeviceList;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::config::Schedule;
use crate::data::arc::{parse_challenges, parse_json_bytes, ArcError, Puzzle};
use crate::data::augment::Augmentation;
use crate::data::builder::{puzzle_group, render_split, SplitMember};
use crate::data::grid::VOCAB_SIZE;
use crate::data::loader::{LoaderError, MemorySplit, PuzzleDataset, PuzzleDatasetConfig, Split};
use crate::data::metadata::DatasetMetadata;
use crate::dist::SingleProcess;
use crate::eval::{ArcEvaluator, ArcResult, EvalError};
use crate::model::act::ActError;
use crate::model::config::ArchConfig;
use crate::model::device_choice::{CudaOffer, DeviceChoice, DeviceError, DeviceKind};
use crate::model::engine::{EngineConfig, EngineError};
use crate::model::trm::Params;
use crate::model::weights::{Weights, PUZZLE_EMB};
use crate::optim::CosineWarmup;
use crate::package::{ModelPackage, PackageError};
use crate::telemetry::progress::{Progress, ProgressMode};
use crate::tensor::Tensor;
use crate::train::{mean_row, TrainError, TrainerState};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Package(Box<PackageError>),
    #[error(transparent)]
    Arc(#[from] ArcError),
    #[error("{path}: puzzle '{puzzle}': {place} is {rows}x{cols}, larger than the model's {side}x{side} canvas")]
    GridTooLarge {
        path: PathBuf,
        puzzle: String,
        place: String,
        rows: usize,
        cols: usize,
        side: usize,
    },
    #[error("{path}: {what}")]
    Input { path: PathBuf, what: String },
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
    #[error("invalid option: {0}")]
    Options(String),
    #[error("building the test set: {0}")]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Run(Box<TrainError>),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Engine(Box<EngineError>),
    #[error("ARC evaluator: {0}")]
    Eval(#[from] EvalError),
    #[error("device {device}: {source}")]
    OnDevice {
        device: String,
        #[source]
        source: Box<InferError>,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, InferError>;

// Boxed: these carry paths and nested errors, and every result pays for
// the largest variant.
impl From<PackageError> for InferError {
    fn from(e: PackageError) -> Self {
        InferError::Package(Box::new(e))
    }
}

impl From<EngineError> for InferError {
    fn from(e: EngineError) -> Self {
        InferError::Engine(Box::new(e))
    }
}

impl From<TrainError> for InferError {
    fn from(e: TrainError) -> Self {
        InferError::Run(Box::new(e))
    }
}

// The evaluation loop's errors read as the trainer's, as before it moved.
impl From<ActError> for InferError {
    fn from(e: ActError) -> Self {
        InferError::Run(Box::new(TrainError::from(e)))
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct InferOptions {
    pub model_dir: PathBuf,
    pub challenges: PathBuf,
    /// Test outputs, for pass@K (the submission does not depend on them, but
    /// the augmentations do, as in the builder: without solutions the test
    /// outputs are `[[0]]`, as `trm build-dataset` fills them).
    pub solutions: Option<PathBuf>,
    /// Augmented copies per puzzle; `None` = the model's dataset value (the
    /// augmentation draw depends on it, so only that value gives puzzles the
    /// model trained on their trained embeddings).
    pub num_aug: Option<usize>,
    /// Augmentation seed; `None` = the seed the model's dataset was built with.
    pub seed: Option<u64>,
    /// Examples per forward batch; `None` = the training run's global batch size.
    pub batch_size: Option<usize>,
    /// Steps of fitting the embeddings of unknown puzzles (0 = no fitting).
    pub fit_steps: u64,
    /// `None` = the model's `pass_Ks`.
    pub pass_ks: Option<Vec<usize>>,
    /// Progress bar (plain lines when stderr is not a terminal).
    pub progress: bool,
    /// Messages (warnings, phases) on stderr.
    pub verbose: bool,
    /// The engine (`--device`); `None`: the `device` of the model's run
    /// config, else a usable GPU, else the CPU.
    pub device: Option<DeviceKind>,
    /// `--devices`: the GPUs (or emulated devices) to split the batches
    /// over; `None`: every usable GPU for `cuda`, one device otherwise.
    pub devices: Option<DeviceList>,
    /// Vote with at most this many augmented copies per puzzle: the first
    /// ones of the model's draw, so they keep their trained embeddings.
    pub max_aug: Option<usize>,
    /// Lower the augmented copies up front so the whole run (from the call
    /// on) is estimated to fit, and stop taking batches near the limit.
    pub time_limit: Option<Duration>,
}

impl InferOptions {
    pub fn new(model_dir: &Path, challenges: &Path) -> InferOptions {
        InferOptions {
            model_dir: model_dir.to_path_buf(),
            challenges: challenges.to_path_buf(),
            solutions: None,
            num_aug: None,
            seed: None,
            batch_size: None,
            fit_steps: 0,
            pass_ks: None,
            progress: false,
            verbose: false,
            device: None,
            devices: None,
            max_aug: None,
            time_limit: None,
        }
    }
}

/// What fitting did.
#[derive(Debug, Clone)]
pub struct FitReport {
    pub steps: u64,
    /// Embedding rows fitted.
    pub rows: usize,
    /// Mean lm_loss per example over the demonstration pairs of each fitted
    /// puzzle's first fitted member, before and after (full ACT depth).
    pub loss_before: f64,
    pub loss_after: f64,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct InferOutput {
    pub result: ArcResult,
    /// Warnings (also printed at once when verbose).
    pub warnings: Vec<String>,
    /// Whether pass@K means something (solutions were given).
    pub scored: bool,
    /// Original puzzles, in the order they were run and scored.
    pub puzzle_ids: Vec<String>,
    /// Test examples run (augmented copies included).
    pub examples: usize,
    /// Augmented copies per puzzle that ran (fewer than asked when
    /// `--max-aug` or `--time-limit` lowered them).
    pub augmentations: usize,
    /// The devices the batches ran on: `cpu`, `cuda:0`, `emu:1`.
    pub devices: Vec<String>,
    /// Original puzzles with at least one augmented copy the model has no
    /// trained embedding for.
    pub unknown_puzzles: Vec<String>,
    /// Row -> name of the embedding table used: the model's rows, then one
    /// per unknown augmented puzzle.
    pub names: Vec<String>,
    /// Rows that came from the model.
    pub known_rows: usize,
    /// The network as run (its table has `names.len()` rows).
    pub arch: ArchConfig,
    /// The weights as run (after fitting, if any).
    pub params: Params<f32>,
    pub fit: Option<FitReport>,
}

/// Memory of a run: the batches in flight (rendered canvases and their
/// outputs; the test set is streamed, never whole), the vote tally's
/// per-example record, and one model per device at `batch` examples.
fn infer_memory(
    puzzles: &[Puzzle],
    num_aug: usize,
    seq_len: usize,
    arch: &crate::model::config::ArchConfig,
    batch: usize,
    devices: usize,
) -> Option<u64> {
    use crate::limits::{product, sum};
    let members = (num_aug as u64).checked_add(1)?;
    let tests: u64 = puzzles.iter().map(|p| p.test.len() as u64).sum();
    // In flight: the queue (2 per device), one batch per device and the
    // render-ahead of a few puzzles' groups; tokens as i32 in and out.
    let in_flight = product(&[3 * devices as u64 + 2, batch as u64, 4 * seq_len as u64, 3])?;
    let largest_group = puzzles
        .iter()
        .map(|p| p.test.len() as u64)
        .max()
        .unwrap_or(0);
    let render_ahead = product(&[
        rayon::current_num_threads() as u64 + 1,
        members,
        largest_group,
        2 * seq_len as u64 + 64,
    ])?;
    // Votes: per example, a predicted grid hash and counts.
    let votes = product(&[members, tests, 64])?;
    sum(&[
        Some(in_flight),
        Some(render_ahead),
        Some(votes),
        product(&[
            devices as u64,
            crate::limits::model_bytes(arch, batch, false)?,
        ]),
    ])
}

/// Reads and validates the challenges (and solutions) file.
fn read_puzzles(challenges: &Path, solutions: Option<&Path>) -> Result<Vec<Puzzle>> {
    let read = |p: &Path| -> Result<serde_json::Value> {
        let bytes = std::fs::read(p).map_err(|source| ArcError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        Ok(parse_json_bytes(p, &bytes)?)
    };
    let chal = read(challenges)?;
    let sols = solutions.map(|p| read(p).map(|v| (p, v))).transpose()?;
    let puzzles = parse_challenges(challenges, chal, sols.as_ref().map(|(p, v)| (*p, v)))?;
    if puzzles.is_empty() {
        return Err(InferError::Input {
            path: challenges.to_path_buf(),
            what: "holds no puzzles".into(),
        });
    }
    Ok(puzzles)
}

/// Every grid must fit the model's canvas (in both orientations, since
/// augmentations transpose).
fn check_fits(path: &Path, puzzles: &[Puzzle], side: usize) -> Result<()> {
    for p in puzzles {
        if let Some((place, g)) = p.grids().find(|(_, g)| g.rows().max(g.cols()) > side) {
            return Err(InferError::GridTooLarge {
                path: path.to_path_buf(),
                puzzle: p.id.clone(),
                place: place.to_string(),
                rows: g.rows(),
                cols: g.cols(),
                side,
            });
        }
    }
    Ok(())
}

/// One original puzzle as run: build-order index, group and row per member.
struct Planned {
    puzzle: Puzzle,
    index: usize,
    group: Vec<Augmentation>,
    ids: Vec<i32>,
    /// Per member: whether the model has a trained row for it.
    known: Vec<bool>,
}

/// The metadata of an in-memory split, as the builder writes it.
fn split_metadata(
    seq_len: usize,
    rows: usize,
    blank_id: i64,
    data: &MemorySplit,
) -> DatasetMetadata {
    let puzzles = data.puzzle_identifiers.len();
    let examples = data.inputs.len() / seq_len.max(1);
    DatasetMetadata {
        pad_id: 0,
        ignore_label_id: Some(0),
        blank_identifier_id: blank_id,
        vocab_size: VOCAB_SIZE,
        seq_len,
        num_puzzle_identifiers: rows,
        total_groups: data.group_indices.len().saturating_sub(1),
        mean_puzzle_examples: if puzzles > 0 {
            examples as f64 / puzzles as f64
        } else {
            0.0
        },
        total_puzzles: puzzles,
        sets: vec!["all".to_string()],
    }
}

/// What every in-memory split of one run shares.
#[derive(Clone, Copy)]
struct Space<'a> {
    seq_len: usize,
    /// Rows of the embedding table.
    rows: usize,
    blank: i64,
    batch: usize,
    seed: u64,
    /// Stands in for the dataset folder in messages.
    name: &'a Path,
}

impl Space<'_> {
    fn dataset(
        &self,
        split: Split,
        data: MemorySplit,
        epochs_per_iter: usize,
    ) -> Result<PuzzleDataset> {
        let meta = split_metadata(self.seq_len, self.rows, self.blank, &data);
        let cfg = PuzzleDatasetConfig {
            seed: self.seed,
            dataset_paths: Vec::new(),
            global_batch_size: self.batch,
            test_set_mode: split == Split::Test,
            epochs_per_iter,
            rank: 0,
            num_replicas: 1,
        };
        Ok(PuzzleDataset::from_memory(
            cfg, split, meta, self.name, data,
        )?)
    }
}

/// Runs inference. Messages go to stderr when `opts.verbose`.
pub fn infer(opts: &InferOptions) -> Result<InferOutput> {
    let say = |m: &str| {
        if opts.verbose {
            eprintln!("{m}");
        }
    };
    let started = Instant::now();
    let mut warnings = Vec::new();
    let mut warn = |m: String| {
        say(&m);
        warnings.push(m);
    };
    if opts.batch_size == Some(0) {
        return Err(InferError::Options(
            "--batch-size must be at least 1".into(),
        ));
    }
    if opts
        .pass_ks
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.contains(&0))
    {
        return Err(InferError::Options(
            "--pass-ks needs one or more K of at least 1".into(),
        ));
    }
    if opts.time_limit.is_some_and(|t| t.is_zero()) {
        return Err(InferError::Options(
            "--time-limit must be more than 0".into(),
        ));
    }
    // A device asked for is checked before any input is read.
    let offer = CudaOffer::here();
    let asked = opts
        .device
        .map(|d| devices::resolve_devices(Some(d), None, opts.devices.as_ref(), &offer))
        .transpose()?;
    let pkg = ModelPackage::open(&opts.model_dir)?;
    // Else the `device` of the model's run config (a `cpu-tiny` model stays
    // on the CPU), else automatic. A run config that does not parse only
    // matters to --fit-steps, which reports it.
    let devices = match asked {
        Some(d) => d,
        None => devices::resolve_devices(
            None,
            pkg.training_config().ok().and_then(|c| c.device),
            opts.devices.as_ref(),
            &offer,
        )?,
    };
    let device = devices[0].clone();
    let ds = pkg.config.dataset.clone();
    let seed = opts.seed.unwrap_or(ds.seed);
    let num_aug = opts.num_aug.unwrap_or(ds.num_aug);
    let batch = opts.batch_size.unwrap_or(pkg.config.global_batch_size);
    let ks = opts
        .pass_ks
        .clone()
        .unwrap_or_else(|| pkg.config.pass_ks.clone());
    let side = ds.canvas_side;
    let seq_len = side * side;

    let puzzles = read_puzzles(&opts.challenges, opts.solutions.as_deref())?;
    check_fits(&opts.challenges, &puzzles, side)?;
    crate::limits::check(
        "this inference",
        infer_memory(&puzzles, num_aug, seq_len, &pkg.arch, batch, devices.len()),
        "lower --num-aug or --batch-size, or use fewer --devices",
    )?;

    // Build-order positions of the originals the model knows.
    let start = ds.puzzle_identifiers_start as usize;
    let mut rank: HashMap<&str, usize> = HashMap::new();
    let mut row_of: HashMap<&str, i32> = HashMap::with_capacity(pkg.identifiers.len());
    for (i, name) in pkg.identifiers.iter().enumerate().skip(start) {
        row_of.entry(name.as_str()).or_insert(i as i32);
        if Augmentation::parse_name(name).is_ok_and(|(_, aug)| aug.is_none()) {
            let next = rank.len();
            rank.entry(name.as_str()).or_insert(next);
        }
    }
    // Known originals in build order, then the others in file order.
    let originals = rank.len();
    let mut order: Vec<(usize, Puzzle)> = puzzles
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let index = rank.get(p.id.as_str()).copied().unwrap_or(originals + i);
            (index, p)
        })
        .collect();
    order.sort_by_key(|(index, _)| *index);
    let groups: Vec<Vec<Augmentation>> = order
        .par_iter()
        .map(|(index, p)| puzzle_group(p, *index, seed, num_aug))
        .collect();

    // Rows: trained ones by name, new ones appended.
    let known_rows = pkg.identifiers.len();
    let mut new_names: Vec<String> = Vec::new();
    let mut plan = Vec::with_capacity(order.len());
    for ((index, puzzle), group) in order.into_iter().zip(groups) {
        let mut ids = Vec::with_capacity(group.len());
        let mut known = Vec::with_capacity(group.len());
        for (k, aug) in group.iter().enumerate() {
            let name = if k == 0 {
                puzzle.id.clone()
            } else {
                aug.name(&puzzle.id)
            };
            match row_of.get(name.as_str()) {
                Some(&row) => {
                    ids.push(row);
                    known.push(true);
                }
                None => {
                    ids.push((known_rows + new_names.len()) as i32);
                    known.push(false);
                    new_names.push(name);
                }
            }
        }
        plan.push(Planned {
            puzzle,
            index,
            group,
            ids,
            known,
        });
    }
    let rows = known_rows + new_names.len();
    if rows > i32::MAX as usize {
        return Err(InferError::Options(
            "more than 2^31 puzzle embeddings".into(),
        ));
    }
    let unknown_puzzles: Vec<String> = plan
        .iter()
        .filter(|p| p.known.iter().any(|k| !k))
        .map(|p| p.puzzle.id.clone())
        .collect();

    let mut arch = pkg.arch.clone();
    arch.num_puzzle_identifiers = rows;
    let nd = arch.puzzle_emb_ndim;
    let blank = ds.blank_identifier_id;
    let mut tensors = pkg.weights.tensors.clone();
    if !new_names.is_empty() {
        let table = &pkg.weights.get(PUZZLE_EMB).data;
        let fill = if opts.fit_steps > 0 {
            mean_row(table, nd)
        } else {
            let b = usize::try_from(blank)
                .unwrap_or(0)
                .min(known_rows.saturating_sub(1));
            table[b * nd..(b + 1) * nd].to_vec()
        };
        let mut data = Vec::with_capacity(rows * nd);
        data.extend_from_slice(table);
        for _ in 0..new_names.len() {
            data.extend_from_slice(&fill);
        }
        tensors.insert(PUZZLE_EMB.to_string(), Tensor::new(&[rows, nd], data));
        if opts.fit_steps == 0 {
            let shown: Vec<&str> = unknown_puzzles.iter().take(8).map(String::as_str).collect();
            warn(format!(
                "warning: the model has no trained puzzle embedding for {} of {} puzzles ({}{}; {} augmented copies): \
                 their embeddings are blank (the blank id's row, as the reference) and accuracy will suffer; \
                 fit them on their demonstration pairs with --fit-steps N",
                unknown_puzzles.len(),
                plan.len(),
                shown.join(", "),
                if unknown_puzzles.len() > shown.len() { ", ..." } else { "" },
                new_names.len()
            ));
            if num_aug != ds.num_aug || seed != ds.seed {
                // The draw of augmentations depends on both: the model's own
                // puzzles then come out as new, untrained names.
                warn(format!(
                    "note: --num-aug {num_aug} / --seed {seed} differ from the model's dataset \
                     ({} augmentations, seed {}), so the augmentations drawn differ from those \
                     it trained on; drop --num-aug/--seed to use the dataset's values",
                    ds.num_aug, ds.seed
                ));
            }
        }
    }
    let weights = Weights::from_tensors(&arch, tensors).map_err(|e| InferError::Input {
        path: opts.model_dir.clone(),
        what: e.to_string(),
    })?;

    let mut fit = None;
    let params = if opts.fit_steps > 0 && !new_names.is_empty() {
        let (params, report) =
            fit_unknown(&pkg, &arch, weights, &plan, opts, seed, batch, &device)?;
        say(&format!(
            "fitted {} puzzle embeddings in {} steps: demonstration lm_loss {:.4} -> {:.4}",
            report.rows, report.steps, report.loss_before, report.loss_after
        ));
        fit = Some(report);
        params
    } else {
        Params::<f32>::from_weights(&arch, &weights).map_err(TrainError::from)?
    };

    // The test split: every member's test inputs at offset (0, 0), rendered
    // as the batches need them, on a table of the rows they read.
    let cap = opts.max_aug.map_or(usize::MAX, |a| a.saturating_add(1));
    let blank_row = |what: String| InferError::Input {
        path: opts.model_dir.clone(),
        what,
    };
    let blank_id = i32::try_from(blank)
        .map_err(|_| blank_row(format!("blank puzzle id {blank} does not fit in 32 bits")))?;
    let table = rows::CompactRows::new(
        arch.num_puzzle_identifiers,
        plan.iter()
            .flat_map(|p| p.ids[..p.ids.len().min(cap)].iter().copied()),
        blank_id,
    );
    let run_blank = table.map(blank_id).ok_or_else(|| {
        blank_row(format!(
            "blank puzzle id {blank} is outside the model's {} embedding rows",
            arch.num_puzzle_identifiers
        ))
    })?;
    // Every id of the plan is a row of the table, so each maps.
    let run_ids: Vec<Vec<i32>> = plan
        .iter()
        .map(|p| {
            p.ids[..p.ids.len().min(cap)]
                .iter()
                .map(|&id| table.map(id).unwrap_or(run_blank))
                .collect()
        })
        .collect();
    let members_up_to = |most: usize| -> Vec<SplitMember> {
        plan.iter()
            .zip(&run_ids)
            .map(|(p, ids)| {
                let n = ids.len().min(most);
                SplitMember {
                    index: p.index,
                    examples: p.puzzle.test.iter().collect(),
                    group: &p.group[..n],
                    ids: &ids[..n],
                }
            })
            .collect()
    };
    let mut members = members_up_to(cap);
    // The first batch times each device (twice: warm-up, then the figure)
    // when a time limit needs an estimate.
    let probe = match opts.time_limit {
        Some(_) => stream::TestStream::new(&members, side, seed, batch, run_blank).next(),
        None => None,
    };
    let (run_arch, run_params) = table.apply(&arch, &params);
    let mut pool = devices::DevicePool::start(
        &devices,
        &run_arch,
        run_params,
        batch,
        run_blank as i64,
        inference_engine_config(),
        probe,
    )?;
    for d in &pool.devices {
        say(&d.choice.describe(&d.name));
    }
    if let Some(limit) = opts.time_limit {
        let per_s: f64 = pool
            .devices
            .iter()
            .filter_map(|d| d.probe)
            .map(|t| 1.0 / t.as_secs_f64().max(1e-9))
            .sum();
        let sizes: Vec<budget::PuzzleSize> = members
            .iter()
            .map(|m| budget::PuzzleSize {
                members: m.group.len(),
                tests: m.examples.len(),
            })
            .collect();
        let most = members.iter().map(|m| m.group.len()).max().unwrap_or(1);
        let left = limit
            .mul_f64(budget::PLANNED_SHARE)
            .saturating_sub(started.elapsed());
        let b = budget::plan(&sizes, most, batch, per_s, left);
        let shown = |d: Duration| crate::telemetry::progress::format_duration(d);
        if b.members < most {
            warn(format!(
                "note: --time-limit {}: {} augmented copies per puzzle would take about {} at \
                 {:.2} batches/s; lowering to {} (the first of the model's draw; same as --max-aug {}), \
                 about {}{}",
                shown(limit),
                most - 1,
                shown(budget::plan(&sizes, most, batch, per_s, Duration::MAX).estimate),
                per_s,
                b.members - 1,
                b.members - 1,
                shown(b.estimate),
                if b.over {
                    ", still over the time left: the run stops taking batches near the limit"
                } else {
                    ""
                }
            ));
            members = members_up_to(b.members);
        } else {
            say(&format!(
                "time limit {}: the run is estimated at {} ({:.2} batches/s)",
                shown(limit),
                shown(b.estimate),
                per_s
            ));
        }
    }
    let members_run = members.iter().map(|m| m.group.len()).max().unwrap_or(1);
    let test = stream::TestStream::new(&members, side, seed, batch, run_blank);
    let examples = test.examples();
    say(&format!(
        "running {} puzzles ({} test examples with augmentations) for {} ACT steps each, \
         {} batches of {batch} on {} device{}",
        plan.len(),
        examples,
        arch.halt_max_steps,
        test.batches(),
        pool.devices.len(),
        if pool.devices.len() == 1 { "" } else { "s" }
    ));

    let mut names = pkg.identifiers.clone();
    names.extend(new_names);
    let originals: Vec<Puzzle> = plan.iter().map(|p| p.puzzle.clone()).collect();
    let run_names: Vec<String> = table
        .old
        .iter()
        .map(|&o| names[o as usize].clone())
        .collect();
    let mut ev = ArcEvaluator::from_memory(&run_names, &originals, run_blank as i64, &ks)?;
    let mut progress = Progress::new(
        examples as u64,
        0,
        if opts.progress {
            ProgressMode::Auto
        } else {
            ProgressMode::Hidden
        },
    )
    .with_unit("examples");
    let stop_at = opts.time_limit.map(|t| t.mul_f64(budget::STOP_SHARE));
    let mut done = 0usize;
    let mut stopped_early = false;
    pool.run(test, &mut |outs| {
        done += outs.q_halt.len();
        ev.add(&outs)?;
        progress.update(done as u64, None);
        if stop_at.is_some_and(|t| started.elapsed() >= t) && done < examples {
            stopped_early = true;
            return Ok(false);
        }
        Ok(true)
    })?;
    progress.finish();
    let device_names: Vec<String> = pool
        .devices
        .iter()
        .map(|d| devices::label(&d.choice))
        .collect();
    pool.finish()?;
    if stopped_early {
        warn(format!(
            "warning: --time-limit reached after {done} of {examples} examples: the submission \
             votes over those; test inputs with no prediction get [[0]]"
        ));
    }
    let result = ev.result();
    Ok(InferOutput {
        result,
        warnings,
        scored: opts.solutions.is_some(),
        puzzle_ids: originals.into_iter().map(|p| p.id).collect(),
        examples: done,
        augmentations: members_run.saturating_sub(1),
        devices: device_names,
        unknown_puzzles,
        names,
        known_rows,
        arch,
        params,
        fit,
    })
}

/// An engine that only evaluates: no EMA, the optimisers never step.
fn inference_engine_config() -> EngineConfig {
    EngineConfig {
        adam: Default::default(),
        ema_rate: None,
        puzzle_emb_weight_decay: 0.0,
    }
}

/// Fits the rows of the unknown members on their puzzles' demonstration
/// pairs with the trainer (`freeze_weights`: the dense weights stay as they
/// are, only the batch's puzzle rows move by sign-SGD) on `device`.
#[allow(clippy::too_many_arguments)]
fn fit_unknown(
    pkg: &ModelPackage,
    arch: &ArchConfig,
    weights: Weights,
    plan: &[Planned],
    opts: &InferOptions,
    seed: u64,
    batch: usize,
    device: &DeviceChoice,
) -> Result<(Params<f32>, FitReport)> {
    let side = pkg.config.dataset.canvas_side;
    let seq_len = side * side;
    let blank = pkg.config.dataset.blank_identifier_id;
    // Per puzzle with unknown members: those members and their rows.
    let unknown: Vec<(&Planned, Vec<Augmentation>, Vec<i32>)> = plan
        .iter()
        .filter(|p| p.known.iter().any(|k| !k))
        .map(|p| {
            let (augs, ids) = p
                .group
                .iter()
                .zip(&p.ids)
                .zip(&p.known)
                .filter(|(_, &k)| !k)
                .map(|((a, i), _)| (*a, *i))
                .unzip();
            (p, augs, ids)
        })
        .collect();
    let fitted_rows: usize = unknown.iter().map(|(_, _, ids)| ids.len()).sum();
    // The train split the builder would write for these members.
    let members: Vec<SplitMember> = unknown
        .iter()
        .map(|(p, augs, ids)| SplitMember {
            index: p.index,
            examples: p.puzzle.train.iter().collect(),
            group: augs,
            ids,
        })
        .collect();
    // An epoch takes one member per puzzle; enough epochs per pass over the
    // data that it fills at least one batch.
    let per_epoch: usize = unknown.iter().map(|(p, _, _)| p.puzzle.train.len()).sum();
    let epochs_per_iter = batch.div_ceil(per_epoch.max(1)).max(1);
    let space = Space {
        seq_len,
        rows: arch.num_puzzle_identifiers,
        blank,
        batch,
        seed,
        name: &opts.challenges,
    };
    let train = space.dataset(
        Split::Train,
        render_split(&members, false, side, seed),
        epochs_per_iter,
    )?;
    // Loss probe: the first unknown member of each puzzle, demonstration
    // pairs at the training layout, full ACT depth.
    let probe_members: Vec<SplitMember> = unknown
        .iter()
        .map(|(p, augs, ids)| SplitMember {
            index: p.index,
            examples: p.puzzle.train.iter().collect(),
            group: &augs[..1],
            ids: &ids[..1],
        })
        .collect();
    let probe = space.dataset(
        Split::Test,
        render_split(&probe_members, false, side, seed),
        1,
    )?;

    let mut cfg = pkg.training_config()?;
    cfg.freeze_weights = true;
    cfg.ema = false;
    cfg.global_batch_size = batch;
    let meta = train.metadata().clone();
    let mut schedule = Schedule::new(&cfg, meta.total_groups, meta.mean_puzzle_examples);
    // A constant puzzle-embedding lr over exactly the asked steps (the run's
    // warm-up is sized for its own length, which these steps are not).
    schedule.total_steps = opts.fit_steps;
    schedule.lr = CosineWarmup {
        warmup_steps: 0,
        total_steps: opts.fit_steps,
        min_ratio: 1.0,
    };
    let mut st = TrainerState::new(&cfg, arch.clone(), weights, batch, 0, device)?;
    // EMA is off, so the engine evaluates with the live weights.
    let probe_loss = |st: &mut TrainerState| -> Result<f64> {
        let (per_set, _) = st.evaluate(&probe, &SingleProcess)?;
        let (sum, count) = per_set
            .values()
            .fold((0.0, 0.0), |(s, c), m| (s + m.lm_loss, c + m.count));
        Ok(sum / f64::max(count, 1.0))
    };
    let loss_before = probe_loss(&mut st)?;
    let mut progress = Progress::new(
        opts.fit_steps,
        0,
        if opts.progress {
            ProgressMode::Auto
        } else {
            ProgressMode::Hidden
        },
    );
    let mut train = train;
    while st.step < opts.fit_steps {
        let before = st.step;
        for b in train.train_batches() {
            let Some(m) = st.train_step(&cfg, &schedule, &b, &SingleProcess)? else {
                break;
            };
            progress.update(st.step, Some(m.lm_loss / batch as f64));
            if st.step >= opts.fit_steps {
                break;
            }
        }
        if st.step == before {
            // Cannot happen with epochs_per_iter sized above; never spin.
            return Err(InferError::Options(
                "fitting: the demonstration pairs fill no batch".into(),
            ));
        }
    }
    progress.finish();
    let loss_after = probe_loss(&mut st)?;
    Ok((
        st.params()?,
        FitReport {
            steps: opts.fit_steps,
            rows: fitted_rows,
            loss_before,
            loss_after,
        },
    ))
}

/// Writes `submission.json` (Kaggle format) through a temporary file and a
/// rename.
pub fn write_submission(path: &Path, result: &ArcResult) -> Result<()> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| InferError::Write { path: p, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
    }
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "submission.json".into());
    let tmp = path.with_file_name(format!(".{file}.tmp-{}", std::process::id()));
    let bytes = serde_json::to_vec(&result.submission).expect("JSON values serialise");
    std::fs::write(&tmp, bytes).map_err(err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(err(path))
}
