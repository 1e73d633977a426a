//! `trm demo`: the end-to-end job on a built-in default, with no data and no
//! GPU. It generates a synthetic ARC-style task family, builds the augmented
//! dataset with the real builder (on a small canvas so a CPU trains in
//! minutes), trains the built-in `cpu-tiny` config with the real trainer,
//! evaluates, checkpoints and plots, and says where everything is.

use std::path::{Path, PathBuf};

use crate::config::{ConfigSource, RunConfig};
use crate::data::builder::{build_dataset, BuildOptions, BuildReport, BuildUi};
use crate::data::synthetic;
use crate::train::{train, TrainOptions, TrainReport};

/// Largest side of the synthetic grids (3x3 up to this square).
pub const DEMO_GRID_SIDE: usize = 4;
/// Canvas side of the synthetic dataset: grids plus their EOS row and column
/// fit, so a sequence is 25 tokens instead of the reference's 900.
pub const DEMO_CANVAS: usize = DEMO_GRID_SIDE + 1;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Folder for everything the demo writes.
    pub out_dir: PathBuf,
    /// Use these ARC JSON files (prefix, subsets, test set) instead of synthetic puzzles.
    pub arc: Option<(String, Vec<String>, String)>,
    pub train_puzzles: usize,
    pub eval_puzzles: usize,
    /// Largest side of the synthetic grids.
    pub grid_side: usize,
    pub num_aug: usize,
    /// Canvas side of the built dataset (30 = the reference's 30x30).
    pub canvas_side: usize,
    pub seed: u64,
    pub verbose: bool,
    /// Overrides applied to the `cpu-tiny` config (Hydra style).
    pub overrides: Vec<String>,
}

impl Default for DemoOptions {
    fn default() -> DemoOptions {
        DemoOptions {
            out_dir: PathBuf::from("trm-demo"),
            arc: None,
            train_puzzles: 40,
            eval_puzzles: 8,
            grid_side: DEMO_GRID_SIDE,
            num_aug: 3,
            canvas_side: DEMO_CANVAS,
            seed: 0,
            verbose: true,
            overrides: Vec::new(),
        }
    }
}

/// What the demo did.
#[derive(Debug)]
pub struct DemoSummary {
    pub dataset_dir: PathBuf,
    pub build: BuildReport,
    pub train: TrainReport,
    pub plots: Vec<PathBuf>,
}

/// The demo's training config: `cpu-tiny` on the demo dataset, run folder
/// `OUT/run`, then the caller's overrides.
pub fn demo_config(opts: &DemoOptions, dataset_dir: &Path) -> anyhow::Result<RunConfig> {
    // The run folder is passed on as override text: a lossy name would be another folder.
    crate::paths::require_utf8("--out", &opts.out_dir)?;
    let mut overrides = vec![
        format!("data_paths=[{}]", dataset_dir.display()),
        format!("checkpoint_path={}", opts.out_dir.join("run").display()),
        format!("seed={}", opts.seed),
    ];
    overrides.extend(opts.overrides.iter().cloned());
    Ok(RunConfig::load(
        ConfigSource::builtin("cpu-tiny")?,
        &overrides,
    )?)
}

/// Heap bytes of one synthetic puzzle while it is generated, written and
/// read back (JSON text and tree, grids): a few KiB each.
const BYTES_PER_PUZZLE: u64 = 16 << 10;

/// Memory of the synthetic puzzles and their augmented, rendered copies
/// (the dataset the demo trains on is held in memory).
fn demo_memory(opts: &DemoOptions) -> Option<u64> {
    use crate::limits::{product, sum};
    let puzzles = (opts.train_puzzles as u64).checked_add(opts.eval_puzzles as u64)?;
    let side = opts.canvas_side as u64;
    let copies = (opts.num_aug as u64).checked_add(1)?;
    // About 4 examples a puzzle, inputs and labels, plus bookkeeping.
    let per_copy = product(&[4, side, side, 2])?.checked_add(160)?;
    sum(&[
        product(&[puzzles, BYTES_PER_PUZZLE]),
        product(&[puzzles, copies, per_copy]),
    ])
}

pub fn run(opts: &DemoOptions) -> anyhow::Result<DemoSummary> {
    let say = |m: &str| {
        if opts.verbose {
            eprintln!("{m}");
        }
    };
    crate::paths::require_utf8("--out", &opts.out_dir)?;
    crate::limits::check(
        "the demo's puzzles",
        demo_memory(opts),
        "lower --train-puzzles, --eval-puzzles or --num-aug",
    )?;
    let dataset_dir = opts.out_dir.join("data");
    // The config is checked before any work, so a bad override fails now,
    // not after the dataset build.
    let cfg = demo_config(opts, &dataset_dir)?;
    let build_opts = match &opts.arc {
        Some((prefix, subsets, test)) => {
            let subsets: Vec<&str> = subsets.iter().map(String::as_str).collect();
            BuildOptions::new(prefix, &dataset_dir, &subsets, test)
        }
        None => {
            let prefix = opts.out_dir.join("arc").join("synthetic");
            say(&format!(
                "[1/4] generating {} + {} synthetic puzzles (flips, rotations, colour maps, gravity) in {}",
                opts.train_puzzles,
                opts.eval_puzzles,
                prefix.parent().unwrap_or(Path::new(".")).display()
            ));
            synthetic::write_arc_files(
                &prefix,
                opts.train_puzzles,
                opts.eval_puzzles,
                opts.grid_side,
                opts.seed,
            )?;
            BuildOptions::new(
                &prefix.display().to_string(),
                &dataset_dir,
                &["training", "evaluation"],
                "evaluation",
            )
        }
    };
    let build_opts = BuildOptions {
        num_aug: opts.num_aug,
        seed: opts.seed,
        canvas_side: opts.canvas_side,
        ..build_opts
    };
    say(&format!(
        "[2/4] building the dataset ({} augmentations per puzzle, {}x{} canvas)",
        opts.num_aug, opts.canvas_side, opts.canvas_side
    ));
    let build = build_dataset(
        &build_opts,
        BuildUi {
            verbose: opts.verbose,
            force: false,
        },
    )?;

    say(&format!(
        "[3/4] training the cpu-tiny model (hidden {}, {} layers, H {} x L {} cycles, up to {} ACT steps) for {} epochs",
        cfg.arch.hidden_size,
        cfg.arch.l_layers,
        cfg.arch.h_cycles,
        cfg.arch.l_cycles,
        cfg.arch.halt_max_steps,
        cfg.epochs
    ));
    let train_opts = TrainOptions {
        resume: None,
        progress: opts.verbose,
        verbose: opts.verbose,
        ..TrainOptions::default()
    };
    let report = train(&cfg, &train_opts)?;
    say("[4/4] plotting the metrics");
    let plots = crate::telemetry::plot::plot_run(&report.run_dir)?;
    Ok(DemoSummary {
        dataset_dir,
        build,
        train: report,
        plots,
    })
}

/// Mean of train metric `key` over the first and the last tenth of the
/// logged steps that counted at least one halted sample (a single step's
/// value is noisy: only the samples halting at that step are counted).
pub fn early_late(r: &TrainReport, key: &str) -> (f64, f64) {
    let vals: Vec<f64> = r
        .train_log
        .iter()
        .filter(|(_, m)| m.iter().any(|(k, v)| k == "train/steps" && *v > 0.0))
        .filter_map(|(_, m)| m.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
        .collect();
    if vals.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = (vals.len() / 10).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&vals[..n]), mean(&vals[vals.len() - n..]))
}
