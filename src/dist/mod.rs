//! Collectives between data-parallel ranks.
//!
//! Design rule: the trainer talks to one [`Collective`]; it never knows how
//! many processes there are. Dense gradients arrive as ONE flat buffer (one
//! all-reduce per step), puzzle-embedding rows as (ids, rows) pairs to
//! all-gather, metrics as a few f64 sums. [`SingleProcess`] is the world of
//! one rank (CPU runs, tests); NCCL ranks implement the same trait
//! ([`nccl::NcclCollective`]) and also hand the CUDA engine their
//! collectives on device buffers ([`DeviceCollective`]). Where a rank sits
//! in the run comes from the launcher's environment ([`world::World`]);
//! [`launch::join`] turns it into this rank's collective.

pub mod launch;
pub mod nccl;
pub mod rendezvous;
mod slurm;
pub mod tcp;
pub mod world;

pub use launch::{join, JoinError};
pub use world::{gpu_ordinal, Launcher, World, WorldError};

use std::ops::Range;
use std::sync::Arc;

use crate::backend::cuda::{Buffer, Device};

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
    /// The same ranks' collectives on device buffers, when this collective
    /// has them (NCCL): the CUDA engine then reduces its gradients on the
    /// device, overlapped with the backward. `None` (the default): the
    /// engine goes through the host methods above.
    fn device(&self) -> Option<Arc<dyn DeviceCollective>> {
        None
    }
}

/// Collectives on a device's buffers, ordered with the device's stream:
/// `start_*` enqueue after the work queued so far on `dev` and return at
/// once; [`DeviceCollective::finish`] waits (within the collective's
/// deadline) until every started operation is done, and orders `dev`'s
/// later work after them. Every rank starts the same operations, with the
/// same sizes, in the same order.
pub trait DeviceCollective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In place: `buf[range]` becomes its sum over ranks.
    fn start_all_reduce(
        &self,
        dev: &Device,
        buf: &Buffer<f32>,
        range: Range<usize>,
    ) -> Result<(), CollectiveError>;
    /// `out[r * count..(r + 1) * count]` becomes rank r's `part[..count]`.
    fn start_all_gather_i32(
        &self,
        dev: &Device,
        part: &Buffer<i32>,
        count: usize,
        out: &Buffer<i32>,
    ) -> Result<(), CollectiveError>;
    /// [`DeviceCollective::start_all_gather_i32`] for f32 values.
    fn start_all_gather_f32(
        &self,
        dev: &Device,
        part: &Buffer<f32>,
        count: usize,
        out: &Buffer<f32>,
    ) -> Result<(), CollectiveError>;
    /// Waits for every started operation (see the trait docs).
    fn finish(&self, dev: &Device) -> Result<(), CollectiveError>;
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
