//! The `trm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use trm::data::builder::{build_dataset, BuildOptions, BuildReport, BuildUi};

#[derive(Parser)]
#[command(
    name = "trm",
    version,
    about = "Train and run the Tiny Recursive Model (TRM) on ARC-AGI",
    long_about = "Train and run the Tiny Recursive Model (TRM) on ARC-AGI.\n\n\
        A Rust engine with a CPU reference backend and hand-written CUDA kernels for H200 GPUs. \
        Datasets, weights and checkpoints are interchangeable with the PyTorch reference."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the augmented ARC dataset from ARC-AGI JSON files (same flags and files as the reference builder).
    #[command(
        long_about = "Build the augmented ARC dataset from ARC-AGI JSON files in the Kaggle \"combined\" \
            layout ({prefix}_{subset}_challenges.json and {prefix}_{subset}_solutions.json).\n\n\
            Writes {train,test}/all__{inputs,labels,puzzle_identifiers,puzzle_indices,group_indices}.npy, \
            {train,test}/dataset.json, identifiers.json and test_puzzles.json, as the reference builder does.\n\n\
            Example (ARC-AGI-2):\n  trm build-dataset --input-file-prefix data/arc-agi/arc-agi \\\n    \
            --output-dir data/arc2concept-aug-1000 --subsets training2 evaluation2 concept \\\n    \
            --test-set-name evaluation2"
    )]
    BuildDataset(BuildDatasetArgs),
}

#[derive(Args)]
struct BuildDatasetArgs {
    /// Path prefix of the JSON files, e.g. `data/arc-agi/arc-agi` for `data/arc-agi/arc-agi_training2_challenges.json`.
    #[arg(long)]
    input_file_prefix: String,
    /// Folder to write the dataset into (created; replaced only when it already holds a dataset).
    #[arg(long)]
    output_dir: PathBuf,
    /// Subsets to include, e.g. `training2 evaluation2 concept`.
    #[arg(long, num_args = 1.., required = true)]
    subsets: Vec<String>,
    /// The subset whose test examples form the test split (its train examples go to train).
    #[arg(long)]
    test_set_name: String,
    /// A second subset treated as a test set.
    #[arg(long, default_value = "your_test_set")]
    test_set_name2: String,
    /// Seed of every random choice (shuffles, augmentations, placements).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Augmented copies per puzzle (colour permutation + dihedral transform).
    #[arg(long, default_value_t = 1000)]
    num_aug: usize,
    /// First puzzle identifier (0 is the blank id); raise it to combine datasets.
    #[arg(long, default_value_t = 1)]
    puzzle_identifiers_start: u32,
    /// Rebuild even if the output folder holds a complete build of the same inputs.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bars or messages, only errors and the summary.
    #[arg(long)]
    quiet: bool,
}

fn print_report(r: &BuildReport) {
    let line = |split: &str, s: &trm::data::builder::SplitStats| {
        println!(
            "  {split:<5}  puzzles {:>9}  examples {:>10}  groups {:>6}  mean examples/puzzle {:.3}",
            s.puzzles,
            s.examples,
            s.groups,
            if s.puzzles > 0 { s.examples as f64 / s.puzzles as f64 } else { 0.0 }
        )
    };
    println!("dataset: {}", r.options.output_dir.display());
    println!("  original puzzles {}", r.original_puzzles);
    line("train", &r.train);
    if let Some(t) = &r.test {
        line("test", t);
    }
    println!("  identifiers {} (including <blank>)", r.num_identifiers);
    if !r.short_groups.is_empty() {
        println!(
            "  puzzles with fewer than {} augmentations: {}",
            r.options.num_aug,
            r.short_groups.len()
        );
    }
    if r.skipped {
        println!("  (existing build kept; built in {:.1} s)", r.seconds);
    } else {
        println!("  built in {:.1} s", r.seconds);
    }
}

fn run_build_dataset(a: BuildDatasetArgs) -> anyhow::Result<()> {
    let opts = BuildOptions {
        input_file_prefix: a.input_file_prefix,
        output_dir: a.output_dir,
        subsets: a.subsets,
        test_set_name: a.test_set_name,
        test_set_name2: a.test_set_name2,
        seed: a.seed,
        num_aug: a.num_aug,
        puzzle_identifiers_start: a.puzzle_identifiers_start,
    };
    let ui = BuildUi {
        verbose: !a.quiet,
        force: a.force,
    };
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = a.threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        pool = pool.num_threads(n);
    }
    let pool = pool.build()?;
    let report = pool.install(|| build_dataset(&opts, ui))?;
    print_report(&report);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildDataset(a) => run_build_dataset(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
