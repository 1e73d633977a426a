//! The step counts a run derives from its config and dataset, and the
//! learning-rate schedule over them.

use std::fmt;

use super::RunConfig;
use crate::optim::CosineWarmup;

/// How long a run is and how its learning rate moves.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub epochs: usize,
    pub epochs_per_iter: usize,
    pub total_iters: usize,
    /// First iteration followed by an evaluation.
    pub min_eval_interval: usize,
    pub total_groups: usize,
    pub mean_puzzle_examples: f64,
    pub global_batch_size: usize,
    /// Training steps in all: `epochs * total_groups * mean_puzzle_examples
    /// / global_batch_size`, truncated, as the reference estimates it; the
    /// loop stops there.
    pub total_steps: u64,
    /// The same estimate for one iteration (the loader's real count varies
    /// with the puzzles it samples).
    pub steps_per_iter: u64,
    pub lr: CosineWarmup,
    pub base_lr: f64,
    pub puzzle_emb_lr: f64,
}

impl Schedule {
    /// The schedule of `cfg` on a training set of `total_groups` groups with
    /// `mean_puzzle_examples` examples per puzzle (both from its metadata).
    pub fn new(cfg: &RunConfig, total_groups: usize, mean_puzzle_examples: f64) -> Self {
        let epochs_per_iter = cfg.epochs_per_iter();
        let total_steps = estimate_steps(
            cfg.epochs,
            total_groups,
            mean_puzzle_examples,
            cfg.global_batch_size,
        );
        Schedule {
            epochs: cfg.epochs,
            epochs_per_iter,
            total_iters: cfg.total_iters(),
            min_eval_interval: cfg.min_eval_interval,
            total_groups,
            mean_puzzle_examples,
            global_batch_size: cfg.global_batch_size,
            total_steps,
            steps_per_iter: estimate_steps(
                epochs_per_iter,
                total_groups,
                mean_puzzle_examples,
                cfg.global_batch_size,
            ),
            lr: CosineWarmup {
                warmup_steps: cfg.lr_warmup_steps,
                total_steps,
                min_ratio: cfg.lr_min_ratio,
            },
            base_lr: cfg.lr,
            puzzle_emb_lr: cfg.puzzle_emb_lr,
        }
    }

    /// Learning rate of the dense weights at `step` (1-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr.lr(self.base_lr, step)
    }

    /// Learning rate of the puzzle embeddings at `step` (1-based).
    pub fn puzzle_emb_lr_at(&self, step: u64) -> f64 {
        self.lr.lr(self.puzzle_emb_lr, step)
    }

    /// Whether iteration `iter` (0-based) ends with an evaluation.
    pub fn evaluates_after(&self, iter: usize) -> bool {
        iter >= self.min_eval_interval
    }
}

/// `int(epochs * groups * mean / batch)` with Python's evaluation order: the
/// integer product first, then float multiply and divide, then truncation.
fn estimate_steps(epochs: usize, groups: usize, mean: f64, batch: usize) -> u64 {
    let examples = (epochs as u128 * groups as u128) as f64 * mean;
    // `as` truncates toward zero and maps NaN and negatives to 0.
    (examples / batch.max(1) as f64) as u64
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "schedule: {} epochs = {} iteration(s) of {} epochs, evaluating from iteration {}",
            self.epochs, self.total_iters, self.epochs_per_iter, self.min_eval_interval
        )?;
        writeln!(
            f,
            "          {} groups x {:.2} examples / batch {} -> ~{} steps per iteration, {} steps in all",
            self.total_groups,
            self.mean_puzzle_examples,
            self.global_batch_size,
            self.steps_per_iter,
            self.total_steps
        )?;
        write!(
            f,
            "          lr {:e} (puzzle embeddings {:e}): warm-up {} steps, then cosine to {} x lr",
            self.base_lr, self.puzzle_emb_lr, self.lr.warmup_steps, self.lr.min_ratio
        )
    }
}
