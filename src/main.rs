//! The `trm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use trm::data::builder::{build_dataset, BuildOptions, BuildReport, BuildUi};
use trm::model::device_choice::DeviceKind;

#[derive(Parser)]
#[command(
    name = "trm",
    version,
    // `--version` names the commit too: `trm package --bundle` records it.
    long_version = trm::bundle::LONG_VERSION,
    about = "Train and run the Tiny Recursive Model (TRM) on ARC-AGI",
    long_about = "Train and run the Tiny Recursive Model (TRM) on ARC-AGI.\n\n\
        A Rust engine with a CPU reference backend and hand-written CUDA kernels for NVIDIA GPUs \
        of compute capability 8.0 or newer (A100, L4, H100/H200; later GPUs through PTX). \
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
    /// The main job on a built-in default: synthetic ARC-style puzzles -> dataset -> training -> evaluation.
    #[command(
        long_about = "The main job on a built-in default, with no data and no GPU.\n\n\
            Generates a small synthetic ARC-style task family (flips, rotations, colour maps, gravity \
            on grids of 3x3 to 4x4), builds the augmented dataset with the real builder on a 5x5 canvas, \
            trains the built-in cpu-tiny config for a few minutes on the CPU, evaluates, checkpoints, \
            plots the metrics, and prints where everything is. Use --arc-prefix to run it on real ARC \
            files; trailing key=value arguments override the cpu-tiny config."
    )]
    Demo(DemoArgs),
    /// Train TRM: the reference's pretrain loop with full-state checkpoints and exact resume.
    #[command(
        long_about = "Train TRM on a built dataset: the reference's pretrain loop (ACT carry, \
            AdamATan2, sparse sign-SGD puzzle embeddings, warm-up + cosine LR, EMA), evaluating every \
            `eval_interval` epochs and checkpointing full state (weights, EMA, Adam moments, carry, RNG \
            and data position) into the run folder.\n\n\
            Config: a YAML file or a built-in name (cfg_pretrain = the reference's ARC defaults, \
            cpu-tiny = a small model for CPUs), then Hydra-style overrides as the reference takes them:\n  \
            trm train data_paths='[data/arc2concept-aug-1000]' arch.L_cycles=4 global_batch_size=768 +run_name=x ema=True\n\n\
            The run folder (checkpoint_path, else checkpoints/<project>/<run_name>) gets all_config.yaml, \
            metrics.jsonl, TensorBoard event files and step_N/ checkpoints. `--resume latest` continues \
            the newest checkpoint exactly (same step numbering, LR and data order); \
            `--resume latest-if-any` does the same, or starts fresh when there is no checkpoint yet \
            (for jobs a scheduler restarts). `--dry-run` checks everything without training.\n\n\
            Many processes (data parallel, one per GPU): started by \
            `torchrun --no-python --nproc-per-node N trm train ...` (RANK, WORLD_SIZE, LOCAL_RANK, \
            LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; a Kubeflow PyTorchJob sets the same) or by \
            `srun trm train ...` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of \
            SLURM_JOB_NODELIST), every process trains its share of global_batch_size and rank 0 \
            writes the run folder. TRM_RENDEZVOUS_TIMEOUT_S (seconds, default 300) bounds how long \
            a rank waits for the others, at the start and in every exchange: a rank that dies makes \
            the others stop with an error within it. TRM_JOB_ID sets the job identity every rank \
            must share."
    )]
    Train(TrainArgs),
    /// Draw PNG charts (losses, accuracies, lr) of a run folder's metrics.jsonl.
    Plot(PlotArgs),
    /// Make a model folder for `trm infer` from a training checkpoint, or an offline bundle (--bundle).
    #[command(
        long_about = "Make a self-contained model folder for `trm infer` from a training checkpoint \
            (RUN/step_N): model.safetensors (the EMA weights when the run had EMA, reference names, \
            with the puzzle-embedding table), config.json (the network, how the dataset was built, \
            pass_Ks), the dataset's identifiers.json and a manifest of SHA-256s.\n\n\
            The checkpoint is verified first. The folder is written atomically; an existing --out \
            is replaced only when it is empty or a model folder.\n\n\
            --bundle DIR writes an offline bundle for a notebook without network (Kaggle): the trm \
            binary (this one, or --binary, e.g. the glibc 2.17 build of tools/build-portable.sh), \
            the model folder (from --checkpoint, or an existing one with --model), the runner \
            `run [CHALLENGES_JSON [OUT_JSON]] [trm infer options]` whose defaults are the \
            competition's paths, BUNDLE.md (how to use it, what it needs) and bundle.json (the \
            glibc the binary needs, SHA-256 of every file). An existing DIR is replaced only \
            when it is empty or a bundle.\n\n\
            Examples:\n  trm package --checkpoint checkpoints/data-ACT-trm/run/step_2723 --out model\n  \
            trm package --model model --bundle trm-bundle --binary target/portable/trm\n  \
            trm package --checkpoint checkpoints/data-ACT-trm/run/step_2723 --bundle trm-bundle"
    )]
    Package(PackageArgs),
    /// Solve an ARC challenges file with a packaged model: writes the Kaggle submission.json.
    #[command(
        long_about = "Solve an ARC challenges file with a model folder made by `trm package`, offline.\n\n\
            Builds the augmented test set in memory with the dataset builder's rules and the model's \
            build seed (puzzles the model was trained on get their trained embeddings), runs every \
            example for halt_max_steps ACT steps, votes over the augmentations as the ARC evaluator does, \
            and writes submission.json (Kaggle format). With --solutions it also prints pass@K.\n\n\
            Puzzles the model has not seen have blank embeddings unless --fit-steps N first fits them on \
            their demonstration pairs with the weights frozen.\n\n\
            Example:\n  trm infer --model model --challenges arc-agi_test_challenges.json --out submission.json --fit-steps 200"
    )]
    Infer(InferArgs),
    /// What trm will use on this machine: build, CUDA driver and GPUs, libraries, CPU, engine.
    #[command(
        long_about = "What trm will use on this machine, for bug reports and before a run: the build \
            (version, commit, the CUDA kernels and their architectures, the emulator), the CUDA \
            driver and every GPU with its compute capability and whether the kernels run on it, \
            where cuBLASLt and NCCL were found (or every place searched), the CPU (model, threads, \
            AVX2, AVX-512F, AMX), the engine `trm train` and `trm infer` pick with no --device \
            (and no `device` in the run config), and the launcher's world from the environment.\n\n\
            Anything missing is reported, never an error: the exit status is 0 unless the arguments \
            are wrong. --json prints one JSON object for scripts (each probe as {\"ok\": ...} or \
            {\"error\": \"...\"})."
    )]
    Doctor(DoctorArgs),
    /// One ACT training step from a fresh carry; writes outputs and gradients (parity checks against PyTorch).
    StepDump(trm::stepdump::StepDumpCli),
}

#[derive(Args)]
struct DoctorArgs {
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// Base config: a YAML file, or a built-in name (cfg_pretrain, cpu-tiny).
    #[arg(long, default_value = "cfg_pretrain")]
    config: String,
    /// Resume from a checkpoint folder, `latest` (the newest in the run
    /// folder), or `latest-if-any` (the newest, else a fresh start: for
    /// schedulers that restart a job with the same command).
    #[arg(long)]
    resume: Option<String>,
    /// Check everything the run needs (config, datasets, device, the world
    /// from the launcher's variables, batch split, run folder, resume point),
    /// print what it would do, and exit without training or writing.
    #[arg(long)]
    dry_run: bool,
    /// Only errors and the final summary (no progress bar).
    #[arg(long)]
    quiet: bool,
    /// Start a fresh run even if the run folder holds one: the old run is
    /// moved aside to `<folder>.previous-N` (never deleted).
    #[arg(long, conflicts_with = "resume")]
    start_over: bool,
    /// Where the network runs (wins over the config's `device`); default:
    /// cuda when this build has the kernels and a usable GPU, else cpu.
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// Hydra-style overrides: key=value, +key=value, arch.key=value.
    overrides: Vec<String>,
}

#[derive(Args)]
struct PackageArgs {
    /// A checkpoint folder (RUN/step_N).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    checkpoint: Option<PathBuf>,
    /// The model folder to write (optional with --bundle).
    #[arg(long, required_unless_present_any = ["bundle", "model"])]
    out: Option<PathBuf>,
    /// The dataset the run trained on (default: where the checkpoint recorded
    /// it; a moved copy is accepted when its build hash matches).
    #[arg(long, requires = "checkpoint")]
    dataset: Option<PathBuf>,
    /// Write an offline bundle here: trm, the model, the runner `run`,
    /// BUNDLE.md and bundle.json.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Bundle this existing model folder (made by `trm package`) instead of
    /// a checkpoint.
    #[arg(long, requires = "bundle", conflicts_with = "out")]
    model: Option<PathBuf>,
    /// The trm binary to bundle (default: this one), e.g. the portable
    /// build of tools/build-portable.sh.
    #[arg(long, requires = "bundle")]
    binary: Option<PathBuf>,
    /// A shared library to carry in the bundle's lib/, which the runner
    /// puts first on LD_LIBRARY_PATH (repeatable): e.g. libcublasLt.so.13
    /// and libcublas.so.13 of the nvidia-cublas wheel, for a notebook image
    /// whose Python wheels have another CUDA release.
    #[arg(long, requires = "bundle", value_name = "FILE")]
    lib: Vec<PathBuf>,
}

#[derive(Args)]
struct InferArgs {
    /// A model folder made by `trm package`.
    #[arg(long)]
    model: PathBuf,
    /// ARC challenges JSON (puzzle id -> {"train": [...], "test": [...]}).
    #[arg(long)]
    challenges: PathBuf,
    /// Solutions JSON for the challenges: pass@K is printed.
    #[arg(long)]
    solutions: Option<PathBuf>,
    /// Where to write the Kaggle submission. An existing file is replaced
    /// only if it is a previous submission (or with --force).
    #[arg(long, default_value = "submission.json")]
    out: PathBuf,
    /// Replace --out even if it is not a previous submission.
    #[arg(long)]
    force: bool,
    /// Augmented copies per puzzle that vote (default: the number the model's dataset was built with).
    #[arg(long)]
    num_aug: Option<usize>,
    /// Augmentation seed (default: the seed the model's dataset was built with).
    #[arg(long)]
    seed: Option<u64>,
    /// Examples per batch (default: the training run's global batch size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Fit the embeddings of puzzles the model does not know for N steps first.
    #[arg(long, default_value_t = 0)]
    fit_steps: u64,
    /// K values of pass@K (default: the model's pass_Ks).
    #[arg(long, num_args = 1..)]
    pass_ks: Option<Vec<usize>>,
    /// Only errors and the final summary (no progress bar).
    #[arg(long)]
    quiet: bool,
    /// Where the network runs; default: the `device` of the model's run
    /// config, else cuda when this build has the kernels and a usable GPU,
    /// else cpu.
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// GPUs to split the batches over: `all` (the default with cuda: every
    /// usable GPU that CUDA_VISIBLE_DEVICES leaves visible) or numbers like
    /// 0,1. Votes are gathered here, so the submission is the one a single
    /// GPU writes. With --device emu, one emulated device per number.
    #[arg(long, value_name = "all|N,N,...")]
    devices: Option<trm::infer::DeviceList>,
    /// Vote with at most N augmented copies per puzzle (the first N of the
    /// model's draw, which keep their trained embeddings): faster, usually
    /// a little less accurate.
    #[arg(long, value_name = "N")]
    max_aug: Option<usize>,
    /// Wall-clock budget of the whole command, e.g. 9h, 45m, 1h30m or
    /// seconds. One warm batch per device estimates the run up front; if it
    /// would not fit, fewer augmented copies vote (as --max-aug, said on
    /// stderr). Near the limit the run stops taking batches and writes the
    /// submission from what it has. Loading and --fit-steps count against
    /// the limit but are not shortened by it.
    #[arg(long, value_name = "DURATION", value_parser = trm::infer::parse_duration)]
    time_limit: Option<std::time::Duration>,
}

#[derive(Args)]
struct PlotArgs {
    /// A run folder (holding metrics.jsonl).
    run_dir: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    /// Folder for everything the demo writes.
    #[arg(long, default_value = "trm-demo")]
    out: PathBuf,
    /// Synthetic puzzles in the training subset.
    #[arg(long, default_value_t = 40)]
    train_puzzles: usize,
    /// Synthetic puzzles in the evaluation (test) subset.
    #[arg(long, default_value_t = 8)]
    eval_puzzles: usize,
    /// Largest side of the synthetic grids (3x3 up to this square).
    #[arg(long, default_value_t = trm::demo::DEMO_GRID_SIDE)]
    grid_side: usize,
    /// Augmented copies per puzzle.
    #[arg(long, default_value_t = 3)]
    num_aug: usize,
    /// Canvas side of the dataset (30 = the reference's 30x30; real ARC needs 30).
    #[arg(long, default_value_t = trm::demo::DEMO_CANVAS)]
    canvas_side: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use real ARC JSON files with this prefix instead of synthetic puzzles.
    #[arg(long, requires = "arc_subsets", requires = "arc_test_set")]
    arc_prefix: Option<String>,
    /// Subsets of the real ARC files (with --arc-prefix).
    #[arg(long, num_args = 1.., requires = "arc_prefix")]
    arc_subsets: Vec<String>,
    /// Test subset of the real ARC files (with --arc-prefix).
    #[arg(long, requires = "arc_prefix")]
    arc_test_set: Option<String>,
    /// Overrides of the cpu-tiny training config, e.g. `epochs=20 arch.hidden_size=128`.
    overrides: Vec<String>,
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
    /// Canvas side (grids are rendered into side x side tokens; 30 = the reference).
    #[arg(long, default_value_t = 30)]
    canvas_side: usize,
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
        canvas_side: a.canvas_side,
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
        pool = pool.num_threads(capped_threads(n));
    }
    let pool = pool.build()?;
    let report = pool.install(|| build_dataset(&opts, ui))?;
    print_report(&report);
    Ok(())
}

fn run_demo(mut a: DemoArgs) -> anyhow::Result<()> {
    // `--arc-subsets a b epochs=1`: a list option would swallow the trailing
    // overrides; no subset name holds `=`, so those are overrides.
    let (over, subsets): (Vec<String>, Vec<String>) =
        a.arc_subsets.drain(..).partition(|s| s.contains('='));
    a.arc_subsets = subsets;
    a.overrides.splice(0..0, over);
    if a.arc_prefix.is_some() && a.arc_subsets.is_empty() {
        anyhow::bail!(
            "--arc-subsets needs at least one subset name (e.g. --arc-subsets training evaluation)"
        );
    }
    let arc = a
        .arc_prefix
        .map(|p| (p, a.arc_subsets, a.arc_test_set.unwrap_or_default()));
    // Real ARC grids are up to 30x30.
    let canvas_side = if arc.is_some() && a.canvas_side == trm::demo::DEMO_CANVAS {
        30
    } else if arc.is_none() && a.canvas_side == trm::demo::DEMO_CANVAS {
        // grids plus their EOS row and column
        a.grid_side + 1
    } else {
        a.canvas_side
    };
    if a.grid_side < 3 || a.grid_side > 30 {
        anyhow::bail!("--grid-side must be in 3..=30");
    }
    let opts = trm::demo::DemoOptions {
        out_dir: a.out,
        arc,
        train_puzzles: a.train_puzzles,
        eval_puzzles: a.eval_puzzles,
        grid_side: a.grid_side,
        num_aug: a.num_aug,
        canvas_side,
        seed: a.seed,
        verbose: true,
        overrides: a.overrides,
    };
    if opts.train_puzzles == 0 {
        anyhow::bail!("--train-puzzles must be at least 1");
    }
    let s = trm::demo::run(&opts)?;
    print_report(&s.build);
    let r = &s.train;
    let (early, late) = trm::demo::early_late(r, "train/lm_loss");
    let (early_x, late_x) = trm::demo::early_late(r, "train/exact_accuracy");
    println!(
        "training: {} steps in {:.0} s; train lm_loss {:.4} -> {:.4}, train exact accuracy {:.3} -> {:.3} \
         (means over the first and last tenth of the steps)",
        r.steps_run, r.seconds, early, late, early_x, late_x,
    );
    for (step, m) in &r.eval_log {
        let v = |k: &str| {
            m.iter()
                .find(|(n, _)| n.ends_with(k))
                .map(|(_, v)| *v)
                .unwrap_or(f64::NAN)
        };
        println!(
            "  eval at step {step:>5}: accuracy {:.3}, exact accuracy {:.3}, lm_loss {:.4}, ARC pass@1 {:.3}, pass@2 {:.3}",
            v("/accuracy"),
            v("/exact_accuracy"),
            v("/lm_loss"),
            v("ARC/pass@1"),
            v("ARC/pass@2"),
        );
    }
    println!(
        "run folder: {} (all_config.yaml, metrics.jsonl, TensorBoard events)",
        r.run_dir.display()
    );
    if let Some(p) = r.checkpoints.last() {
        println!("last checkpoint: {}", p.display());
    }
    for p in &s.plots {
        println!("chart: {}", p.display());
    }
    println!("everything is under {}", opts.out_dir.display());
    Ok(())
}

/// A thread count capped at the CPUs, with a warning when it was higher.
fn capped_threads(n: usize) -> usize {
    let (n, warning) = trm::limits::cap_threads(n, trm::limits::cpu_count());
    if let Some(w) = warning {
        eprintln!("{w}");
    }
    n
}

/// Sizes rayon's global pool (`threads = 0`: every core).
fn init_threads(n: usize) -> anyhow::Result<()> {
    let n = capped_threads(n);
    if n > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {n} worker threads: {e}"))?;
    }
    Ok(())
}

/// Set when a run stopped on a signal after checkpointing: `main` then exits
/// with [`trm::signals::EXIT_PREEMPTED`].
static PREEMPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let source = trm::config::ConfigSource::from_arg(&a.config);
    let origin = source.as_ref().map(|s| s.origin()).unwrap_or_default();
    let cfg = source.and_then(|s| trm::config::RunConfig::load(s, &a.overrides));
    if a.dry_run {
        // Config errors too are reported as the dry run's verdict.
        return dry_run_train(a, &origin, cfg)
            .map_err(|e| e.context("dry run: this launch would fail"));
    }
    // The launcher's variables next: a broken launch fails before any work.
    let world = trm::dist::World::from_env()
        .map_err(|e| anyhow::anyhow!("this process's place in the run: {e}"))?;
    let timeout = trm::dist::rendezvous::timeout_from_env()?;
    let (rank, size) = (world.rank, world.world_size);
    // Every rank's error names the rank: torchrun and srun mix the ranks'
    // stderr into one stream.
    let cfg = cfg.map_err(anyhow::Error::from);
    cfg.and_then(|cfg| train_as_rank(a, cfg, &world, timeout))
        .map_err(|e| match size {
            1 => e,
            _ => e.context(format!("rank {rank} of {size}")),
        })
}

fn train_as_rank(
    a: TrainArgs,
    cfg: trm::config::RunConfig,
    world: &trm::dist::World,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    init_threads(cfg.threads)?;
    // One line for the whole run, from rank 0 (the others only speak when
    // they fail): with 8 GPUs x N nodes a line per rank would drown it.
    let lead = world.rank == 0;
    if lead && !a.quiet {
        let wait = match world.world_size {
            1 => String::new(),
            _ => format!(
                "; waiting up to {:.0} s for every rank (TRM_RENDEZVOUS_TIMEOUT_S)",
                timeout.as_secs_f64()
            ),
        };
        eprintln!("world: {}{wait}", world.describe());
    }
    let opts = trm::train::TrainOptions {
        resume: a.resume,
        progress: !a.quiet,
        verbose: !a.quiet,
        start_over: a.start_over,
        handle_signals: true,
        device: a.device,
    };
    let r = trm::train::train_in_world(&cfg, &opts, world, timeout)?;
    if let Some(sig) = r.stopped_by {
        let ckpt = r.checkpoints.last().map(|p| p.display().to_string());
        // Every rank stopped after the same step; rank 0 wrote the checkpoint.
        PREEMPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        if !lead {
            return Ok(());
        }
        eprintln!(
            "stopped by {} after step {}: checkpoint {}; continue with the same command and `--resume latest`",
            trm::signals::name(sig),
            r.total_steps.min(r.train_log.last().map(|(s, _)| *s).unwrap_or(0)),
            ckpt.unwrap_or_default()
        );
        return Ok(());
    }
    if !lead {
        return Ok(());
    }
    println!(
        "trained {} steps (of {}) in {:.1} s; run folder {}",
        r.steps_run,
        r.total_steps,
        r.seconds,
        r.run_dir.display()
    );
    if let Some(p) = r.checkpoints.last() {
        println!("last checkpoint: {}", p.display());
    }
    Ok(())
}

/// `trm train --dry-run`: the run's checks and a description of the run.
fn dry_run_train(
    a: TrainArgs,
    origin: &str,
    cfg: Result<trm::config::RunConfig, trm::config::ConfigError>,
) -> anyhow::Result<()> {
    let cfg = cfg?;
    println!("config: {origin} + {} override(s)", a.overrides.len());
    let opts = trm::train::TrainOptions {
        resume: a.resume,
        start_over: a.start_over,
        device: a.device,
        ..Default::default()
    };
    let report = trm::train::dry_run(&cfg, &opts, &|k| std::env::var(k).ok())?;
    println!("{report}");
    Ok(())
}

fn run_package(a: PackageArgs) -> anyhow::Result<()> {
    use trm::bundle::ModelSource;
    let mut source = a.model.map(ModelSource::Folder);
    if let (Some(checkpoint), Some(out)) = (&a.checkpoint, &a.out) {
        let r = trm::package::package(checkpoint, out, a.dataset.as_deref())?;
        println!(
            "model folder: {} (step {}, {} weights, {} puzzle embeddings, dataset {})",
            r.out.display(),
            r.step,
            if r.ema { "EMA" } else { "live" },
            r.num_puzzle_identifiers,
            r.dataset.display()
        );
        source = Some(ModelSource::Folder(out.clone()));
    }
    let Some(bundle) = a.bundle else {
        return Ok(());
    };
    let model = match (source, a.checkpoint) {
        (Some(s), _) => s,
        (None, Some(path)) => ModelSource::Checkpoint {
            path,
            dataset: a.dataset,
        },
        // clap requires --checkpoint or --model
        (None, None) => anyhow::bail!("--bundle needs --checkpoint or --model"),
    };
    let r = trm::bundle::bundle(&trm::bundle::BundleOptions {
        out: bundle,
        model,
        binary: a.binary,
        libs: a.lib,
    })?;
    let b = &r.manifest.binary;
    println!(
        "bundle: {} ({:.1} MiB; {}; needs {} on {}; run it as {}/run)",
        r.out.display(),
        r.total_bytes as f64 / (1 << 20) as f64,
        b.version,
        b.glibc
            .as_ref()
            .map_or("no glibc (static)".to_string(), |g| format!("glibc {g}")),
        b.machine,
        r.out.display()
    );
    for w in &r.warnings {
        eprintln!("{w}");
    }
    Ok(())
}

fn run_infer(a: InferArgs) -> anyhow::Result<()> {
    if a.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    init_threads(a.threads.unwrap_or(0))?;
    // Refused before the work, not after it.
    trm::out_guard::check_replaceable(&a.out, trm::out_guard::OutputKind::Submission, a.force)?;
    let opts = trm::infer::InferOptions {
        solutions: a.solutions,
        num_aug: a.num_aug,
        seed: a.seed,
        batch_size: a.batch_size,
        fit_steps: a.fit_steps,
        pass_ks: a.pass_ks,
        progress: !a.quiet,
        verbose: !a.quiet,
        device: a.device,
        devices: a.devices,
        max_aug: a.max_aug,
        time_limit: a.time_limit,
        ..trm::infer::InferOptions::new(&a.model, &a.challenges)
    };
    let out = trm::infer::infer(&opts)?;
    if a.quiet {
        // Printed as they came when not quiet.
        for w in &out.warnings {
            eprintln!("{w}");
        }
    }
    trm::infer::write_submission(&a.out, &out.result)?;
    println!(
        "submission: {} ({} puzzles, {} test examples, {} augmented copies per puzzle, on {})",
        a.out.display(),
        out.puzzle_ids.len(),
        out.examples,
        out.augmentations,
        out.devices.join(", ")
    );
    if !out.unknown_puzzles.is_empty() {
        println!(
            "{} puzzles had no trained embedding{}",
            out.unknown_puzzles.len(),
            match &out.fit {
                Some(f) => format!(
                    "; fitted {} rows in {} steps (demonstration lm_loss {:.4} -> {:.4})",
                    f.rows, f.steps, f.loss_before, f.loss_after
                ),
                None => " (blank embeddings)".to_string(),
            }
        );
    }
    if out.scored {
        for (k, v) in &out.result.metrics {
            println!("{k} {v:.4}");
        }
    }
    Ok(())
}

fn run_doctor(a: DoctorArgs) -> anyhow::Result<()> {
    let report = trm::doctor::probe();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn run_plot(a: PlotArgs) -> anyhow::Result<()> {
    let files = trm::telemetry::plot::plot_run(&a.run_dir)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildDataset(a) => run_build_dataset(a),
        Command::Demo(a) => run_demo(a),
        Command::Train(a) => run_train(a),
        Command::Plot(a) => run_plot(a),
        Command::Package(a) => run_package(a),
        Command::Infer(a) => run_infer(a),
        Command::Doctor(a) => run_doctor(a),
        Command::StepDump(a) => trm::stepdump::run_on(&a.args, a.device),
    };
    match result {
        Ok(()) if PREEMPTED.load(std::sync::atomic::Ordering::SeqCst) => {
            ExitCode::from(trm::signals::EXIT_PREEMPTED)
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", trm::errors::chain_once(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
