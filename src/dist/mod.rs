//! Collectives between data-parallel ranks.
//!
//! Design rule: the trainer talks to one [`Collective`]; it never knows how
//! many processes there are. Dense gradients arrive as ONE flat buffer (one
//! all-reduce per step), puzzle-embedding rows as (ids, rows) pairs to
//! all-gather, metrics as a few f64 sums. [`SingleProcess`] is the world of
//! one rank (CPU runs, tests); NCCL ranks implement the same trait
//! ([`nccl::NcclCollective`]). Where a rank sits in the run comes from the
//! launcher's environment ([`world::World`]).

pub mod nccl;
pub mod rendezvous;
mod slurm;
pub mod tcp;
pub mod world;

pub use world::{gpu_ordinal, Launcher, World, WorldError};

/// A collective that did not complete (a rank died, the network failed):
/// training stops with this error instead of continuing on partial sums.
#[derive(Debug, thiserror::Error)]
#[error("{op} on rank {rank} of {world} failed: {message}")]
pub struct CollectiveError {
    pub op: &'static str,
    pub rank: usize,
    pub world: usize,
    pub message: String,
}

/// What data-parallel training needs from the other ranks.
pub trait Collective {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// In place: every rank ends with the element-wise sum over ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// In place, f64 (metric sums).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError>;
    /// Every rank's `(ids, rows)` concatenated in rank order; `rows` holds
    /// `ids.len()` rows of equal width.
    fn all_gather_rows(
        &self,
        ids: &[i32],
        rows: &[f32],
    ) -> Result<(Vec<i32>, Vec<f32>), CollectiveError>;
    /// Every rank's `mine`, in rank order; lengths may differ between ranks
    /// (carry rows for a checkpoint, evaluation predictions for voting).
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;
}

/// The world of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather_rows(
        &self,
        ids: &[i32],
        rows: &[f32],
    ) -> Result<(Vec<i32>, Vec<f32>), CollectiveError> {
        Ok((ids.to_vec(), rows.to_vec()))
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        Ok(vec![mine.to_vec()])
    }
}
