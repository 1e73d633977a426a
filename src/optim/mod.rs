//! Optimisers of the training loop (see `docs/optimizer.md`).
//!
//! The dense weights live in one flat buffer (with one flat gradient buffer of
//! the same layout), so each optimiser here works on plain slices: a step is one
//! pass over the buffer, an all-reduce of the gradients slots in before it, and
//! checkpointing the state is a copy of a few flat vectors. [`AdamAtan2`]
//! updates the dense weights, [`SparseSignSgd`] the rows of the puzzle-embedding
//! table that a batch touched, [`CosineWarmup`] gives the learning rate of a
//! step for both, and [`Ema`] keeps the averaged copy used for evaluation. All
//! math is in the weights' own precision (f32 in training, f64 for tests and
//! checks), with step scalars computed in f64 first, as the reference does.

pub mod adam_atan2;
pub mod ema;
pub mod schedule;
pub mod sign_sgd;

pub use adam_atan2::{AdamAtan2, AdamAtan2Config};
pub use ema::Ema;
pub use schedule::{cosine_schedule_with_warmup, CosineWarmup};
pub use sign_sgd::SparseSignSgd;

/// The float types the optimisers run on: f32 (training) and f64.
pub trait Real: num_traits::Float + Send + Sync + std::fmt::Debug + 'static {
    /// Rounds an f64 step scalar to this precision.
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// A call with buffers that do not fit together, or ids outside the table.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimError {
    #[error("{what}: expected {expected} values, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("puzzle-embedding id {id} is outside the table of {rows} rows")]
    IdOutOfRange { id: i64, rows: usize },
    #[error("embedding row width must be at least 1")]
    ZeroWidth,
}

/// `Err` unless `got == expected`.
fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), OptimError> {
    if expected == got {
        Ok(())
    } else {
        Err(OptimError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}
