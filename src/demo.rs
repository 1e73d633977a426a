//! `trm demo`: the end-to-end job on a built-in default, with no data and no
//! GPU. It generates a synthetic ARC-style task family, builds the augmented
//! dataset with the real builder, and reads training and test batches back
//! through the loader. Training and evaluation join here as they land.

use std::path::{Path, PathBuf};

use crate::data::builder::{build_dataset, BuildOptions, BuildReport, BuildUi};
use crate::data::loader::{PuzzleDataset, PuzzleDatasetConfig, Split};
use crate::data::synthetic;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Folder for everything the demo writes.
    pub out_dir: PathBuf,
    /// Use these ARC JSON files (prefix, subsets, test set) instead of synthetic puzzles.
    pub arc: Option<(String, Vec<String>, String)>,
    pub train_puzzles: usize,
    pub eval_puzzles: usize,
    pub num_aug: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub verbose: bool,
}

impl Default for DemoOptions {
    fn default() -> DemoOptions {
        DemoOptions {
            out_dir: PathBuf::from("trm-demo"),
            arc: None,
            train_puzzles: 40,
            eval_puzzles: 8,
            num_aug: 100,
            batch_size: 64,
            seed: 0,
            verbose: true,
        }
    }
}

/// What the demo did.
#[derive(Debug)]
pub struct DemoSummary {
    pub dataset_dir: PathBuf,
    pub build: BuildReport,
    pub train_batches: usize,
    pub train_examples: usize,
    pub test_batches: usize,
    pub test_examples: usize,
}

pub fn run(opts: &DemoOptions) -> anyhow::Result<DemoSummary> {
    let say = |m: &str| {
        if opts.verbose {
            eprintln!("{m}");
        }
    };
    let dataset_dir = opts.out_dir.join("data");
    let build_opts = match &opts.arc {
        Some((prefix, subsets, test)) => {
            let subsets: Vec<&str> = subsets.iter().map(String::as_str).collect();
            BuildOptions::new(prefix, &dataset_dir, &subsets, test)
        }
        None => {
            let prefix = opts.out_dir.join("arc").join("synthetic");
            say(&format!(
                "[1/3] generating {} + {} synthetic puzzles (flips, rotations, colour maps, gravity) in {}",
                opts.train_puzzles,
                opts.eval_puzzles,
                prefix.parent().unwrap_or(Path::new(".")).display()
            ));
            synthetic::write_arc_files(
                &prefix,
                opts.train_puzzles,
                opts.eval_puzzles,
                6,
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
        ..build_opts
    };
    say(&format!(
        "[2/3] building the dataset ({} augmentations per puzzle)",
        opts.num_aug
    ));
    let build = build_dataset(
        &build_opts,
        BuildUi {
            verbose: opts.verbose,
            force: false,
        },
    )?;

    say("[3/3] reading batches back through the loader");
    let config = |test: bool| PuzzleDatasetConfig {
        seed: opts.seed,
        dataset_paths: vec![dataset_dir.clone()],
        global_batch_size: opts.batch_size,
        test_set_mode: test,
        epochs_per_iter: 1,
        rank: 0,
        num_replicas: 1,
    };
    let mut train = PuzzleDataset::open(config(false), Split::Train)?;
    let (mut train_batches, mut train_examples) = (0, 0);
    for batch in train.train_batches() {
        train_batches += 1;
        train_examples += batch.effective_global_size;
    }
    let test = PuzzleDataset::open(config(true), Split::Test)?;
    let (mut test_batches, mut test_examples) = (0, 0);
    for batch in test.test_batches() {
        test_batches += 1;
        test_examples += batch.effective_global_size;
    }
    Ok(DemoSummary {
        dataset_dir,
        build,
        train_batches,
        train_examples,
        test_batches,
        test_examples,
    })
}
