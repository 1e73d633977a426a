//! Data-parallel collectives over NCCL, one process per GPU: the GPU path
//! (the CPU and test path is [`super::tcp`]).
//!
//! - Loading: trm finds and loads `libnccl.so.2` itself ([`library`]); a
//!   missing library is an error naming every place searched, never a panic.
//! - Rendezvous: rank 0 makes the NCCL unique id and hands it to the other
//!   ranks over TCP ([`super::rendezvous::lead`] / `join`, with the job
//!   identity checked, so a stale id cannot be picked up); then every rank
//!   joins the communicator on its GPU. No shared filesystem is needed.
//! - No hangs: the communicator is non-blocking and every operation has the
//!   deadline of `TRM_RENDEZVOUS_TIMEOUT_S` ([`watch`]); a failure or a
//!   timeout aborts the communicator and returns a [`CollectiveError`].
//! - Device buffers: [`DeviceCollective`] gives the CUDA engine collectives
//!   on its own buffers, on this collective's stream, ordered with events;
//!   the host methods of [`Collective`] (metrics, checkpoint and evaluation
//!   gathers) stage through device memory on the same stream.

pub mod comm;
pub mod library;
pub mod watch;

use std::ffi::c_int;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use self::comm::Communicator;
use self::library::{LoadError, UniqueId, FLOAT32, FLOAT64, INT32, SUCCESS, SUM, UINT8};
use super::rendezvous::{self, RendezvousError};
use super::{Collective, CollectiveError, DeviceCollective, SingleProcess, World};
use crate::backend::cuda::{Buffer, CudaError, Device, Elem, Gpu};

/// Errors of NCCL set-up.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error(transparent)]
    Library(#[from] LoadError),
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error("NCCL rendezvous: rank 0 at {addr} handed out {len} bytes that are not an NCCL id (is it a run of the CPU transport?)")]
    NotAnId { addr: String, len: usize },
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("NCCL: rank {rank} of {world} on GPU {ordinal}: {message}")]
    Init {
        rank: usize,
        world: usize,
        ordinal: usize,
        message: String,
    },
}

/// What rank 0 hands out at the rendezvous: this tag, then the id.
const ID_TAG: &[u8] = b"trm nccl id v1\n";

fn id_payload(id: &UniqueId) -> Vec<u8> {
    let mut p = ID_TAG.to_vec();
    p.extend(id.internal.iter().map(|&c| c as u8));
    p
}

fn id_from_payload(p: &[u8]) -> Option<UniqueId> {
    let raw = p.strip_prefix(ID_TAG)?;
    let bytes: [u8; library::UNIQUE_ID_BYTES] = raw.try_into().ok()?;
    Some(UniqueId {
        internal: bytes.map(|b| b as std::ffi::c_char),
    })
}

/// The collective of a `--device cuda` run: NCCL on GPU `ordinal` for a
/// world of several ranks, [`SingleProcess`] (no NCCL, no cost) for one.
/// `timeout` bounds the rendezvous and every later operation. The run's
/// collective selector calls it as
/// `nccl::for_cuda(&world, gpu_ordinal(&world, cuda_visible_devices), rendezvous::timeout_from_env()?)`
/// (the TCP transport stays the CPU and emulator path).
pub fn for_cuda(
    world: &World,
    ordinal: usize,
    timeout: Duration,
) -> Result<Box<dyn Collective>, NcclError> {
    if world.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    Ok(Box::new(NcclCollective::join(world, ordinal, timeout)?))
}

/// Where and which NCCL loads (for start-up lines and the device check).
pub fn library_summary() -> Result<String, LoadError> {
    let n = library::nccl()?;
    Ok(format!("NCCL {} ({})", n.version_text(), n.path))
}

/// The communicator and the stream its operations run on. Field order is
/// drop order: the communicator is aborted before the stream is waited for.
struct Inner {
    comm: Communicator,
    /// A handle of its own on the rank's GPU: its stream is the
    /// communication stream.
    gpu: Gpu,
    /// Device operations started since the last finish.
    started: usize,
}

struct Shared {
    rank: usize,
    world: usize,
    ordinal: usize,
    inner: Mutex<Inner>,
}

/// One rank of an NCCL run (module docs).
pub struct NcclCollective {
    shared: Arc<Shared>,
}

impl NcclCollective {
    /// Joins the run `world` describes on GPU `ordinal` (see
    /// [`super::gpu_ordinal`]): rank 0 creates the id and serves it, the
    /// others fetch it; every step waits at most `timeout`. A world of one
    /// rank makes a real communicator of one (no rendezvous): the device
    /// check runs NCCL end to end that way.
    pub fn join(
        world: &World,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<NcclCollective, NcclError> {
        let nccl = library::nccl()?;
        let gpu = Gpu::new(ordinal)?;
        let init_err = |message: String| NcclError::Init {
            rank: world.rank,
            world: world.world_size,
            ordinal,
            message,
        };
        let id = if world.rank == 0 {
            let mut id = UniqueId {
                internal: [0; library::UNIQUE_ID_BYTES],
            };
            // SAFETY: writes the 128-byte id.
            let r = unsafe { (nccl.get_unique_id)(&mut id) };
            if r != SUCCESS {
                return Err(init_err(format!("ncclGetUniqueId: {}", nccl.describe(r))));
            }
            // The connections are not needed once every rank has the id.
            drop(rendezvous::lead(world, &id_payload(&id), timeout)?);
            id
        } else {
            let (payload, _conn) = rendezvous::join(world, timeout)?;
            id_from_payload(&payload).ok_or_else(|| NcclError::NotAnId {
                addr: format!(
                    "{}:{}",
                    world.master_addr.as_deref().unwrap_or("?"),
                    world.master_port.unwrap_or(0)
                ),
                len: payload.len(),
            })?
        };
        let comm = Communicator::init(nccl, id, world.rank, world.world_size, &gpu, timeout)
            .map_err(init_err)?;
        Ok(NcclCollective {
            shared: Arc::new(Shared {
                rank: world.rank,
                world: world.world_size,
                ordinal,
                inner: Mutex::new(Inner {
                    comm,
                    gpu,
                    started: 0,
                }),
            }),
        })
    }
}

impl Shared {
    fn fail(&self, op: &'static str, message: String) -> CollectiveError {
        CollectiveError {
            op,
            rank: self.rank,
            world: self.world,
            message,
        }
    }

    fn lock(&self, op: &'static str) -> Result<MutexGuard<'_, Inner>, CollectiveError> {
        self.inner
            .lock()
            .map_err(|_| self.fail(op, "another thread panicked mid-operation".into()))
    }

    /// The engine's GPU, which must be this communicator's.
    fn engine_gpu<'d>(
        &self,
        inner: &Inner,
        dev: &'d Device,
        op: &'static str,
    ) -> Result<&'d Gpu, CollectiveError> {
        match dev.as_gpu() {
            Some(g) if g.shares_context_with(&inner.gpu) => Ok(g),
            Some(g) => Err(self.fail(
                op,
                format!(
                    "the engine runs on GPU {}, the communicator on GPU {}",
                    g.info().ordinal,
                    self.ordinal
                ),
            )),
            None => Err(self.fail(op, format!("NCCL needs a GPU, not {}", dev.name()))),
        }
    }

    /// Orders the communication stream after the work queued on `g` so far.
    fn after_compute(inner: &Inner, g: &Gpu) -> Result<(), String> {
        let ready = g.record_event(None).map_err(|e| e.to_string())?;
        inner.gpu.stream().wait(&ready).map_err(|e| e.to_string())
    }

    /// Runs `body`; a CUDA failure in between (not NCCL's own, which aborts
    /// by itself) also aborts, since the ranks are now out of step.
    fn guarded(
        &self,
        inner: &mut Inner,
        op: &'static str,
        body: impl FnOnce(&mut Inner) -> Result<(), Step>,
    ) -> Result<(), CollectiveError> {
        inner.comm.check().map_err(|m| self.fail(op, m))?;
        match body(inner) {
            Ok(()) => Ok(()),
            Err(Step::Nccl(m)) => Err(self.fail(op, m)),
            Err(Step::Cuda(m)) => {
                let m = inner.comm.abort(m);
                Err(self.fail(op, m))
            }
        }
    }

    /// Stages `bytes` on the device, runs `what` from the staging buffer
    /// into a result buffer and waits within the deadline; returns the
    /// result.
    fn host_op(
        &self,
        op: &'static str,
        bytes: &[u8],
        what: HostOp,
    ) -> Result<Vec<u8>, CollectiveError> {
        let out_len = match what {
            HostOp::AllReduce { .. } => bytes.len(),
            HostOp::AllGather => bytes.len() * self.world,
        };
        let mut inner = self.lock(op)?;
        let mut result = Vec::new();
        self.guarded(&mut inner, op, |inner| {
            let cuda = |e: CudaError| Step::Cuda(e.to_string());
            let send = inner.gpu.upload(bytes).map_err(cuda)?;
            let recv = inner.gpu.zeros::<u8>(out_len).map_err(cuda)?;
            let (s, r) = (send.ptr() as usize as u64, recv.ptr() as usize as u64);
            let stream = inner.gpu.stream();
            // SAFETY: both staging buffers are on this communicator's GPU,
            // sized for the operation (out_len above), and outlive the wait
            // for its completion below.
            let enqueued = unsafe {
                match what {
                    HostOp::AllReduce { count, dtype } => {
                        inner.comm.all_reduce(s, r, count, dtype, SUM, stream)
                    }
                    HostOp::AllGather => inner.comm.all_gather(s, r, bytes.len(), UINT8, stream),
                }
            };
            enqueued.map_err(Step::Nccl)?;
            let done = inner.gpu.record_event(None).map_err(cuda)?;
            inner.comm.wait_event(op, &done).map_err(Step::Nccl)?;
            result = inner.gpu.download(&recv).map_err(cuda)?;
            Ok(())
        })?;
        Ok(result)
    }

    fn all_reduce_host(
        &self,
        op: &'static str,
        bytes: &mut [u8],
        count: usize,
        dtype: c_int,
    ) -> Result<(), CollectiveError> {
        if count == 0 {
            return Ok(());
        }
        let out = self.host_op(op, bytes, HostOp::AllReduce { count, dtype })?;
        bytes.copy_from_slice(&out);
        Ok(())
    }

    /// Every rank's `part` (the same length on every rank), in rank order.
    fn all_gather_host(&self, op: &'static str, part: &[u8]) -> Result<Vec<u8>, CollectiveError> {
        if part.is_empty() {
            return Ok(Vec::new());
        }
        self.host_op(op, part, HostOp::AllGather)
    }

    /// Every rank's `part`, whose lengths may differ: lengths first, then
    /// every part padded to the longest.
    fn all_gather_varying(
        &self,
        op: &'static str,
        part: &[u8],
    ) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let lens = self.all_gather_host(op, &(part.len() as u64).to_le_bytes())?;
        let lens: Vec<usize> = lens
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()) as usize)
            .collect();
        let most = lens.iter().copied().max().unwrap_or(0);
        let mut padded = part.to_vec();
        padded.resize(most, 0);
        let all = self.all_gather_host(op, &padded)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * most..r * most + n].to_vec())
            .collect())
    }

    fn start_gather<T: Elem>(
        &self,
        op: &'static str,
        dev: &Device,
        part: &Buffer<T>,
        count: usize,
        out: &Buffer<T>,
        dtype: c_int,
    ) -> Result<(), CollectiveError> {
        let mut inner = self.lock(op)?;
        let g = self.engine_gpu(&inner, dev, op)?;
        dev.check_buffers(op, &[part, out])
            .and_then(|()| part.check_len(op, count))
            .and_then(|()| out.check_len(op, count * self.world))
            .map_err(|e| self.fail(op, e.to_string()))?;
        if count == 0 {
            return Ok(());
        }
        self.guarded(&mut inner, op, |inner| {
            Self::after_compute(inner, g).map_err(Step::Cuda)?;
            let (send, recv) = (part.ptr() as usize as u64, out.ptr() as usize as u64);
            // SAFETY: both buffers are the engine's, on this communicator's
            // GPU (checked), sized above; the engine keeps them for its
            // lifetime and waits (finish) before reusing them.
            unsafe {
                inner
                    .comm
                    .all_gather(send, recv, count, dtype, inner.gpu.stream())
            }
            .map_err(Step::Nccl)?;
            inner.started += 1;
            Ok(())
        })
    }
}

/// A collective of host data staged through the device.
#[derive(Clone, Copy)]
enum HostOp {
    AllReduce {
        count: usize,
        dtype: c_int,
    },
    /// Every rank's bytes, the same number on every rank.
    AllGather,
}

/// Where a guarded body failed.
enum Step {
    /// NCCL's own failure (the communicator already aborted).
    Nccl(String),
    /// A CUDA call around it.
    Cuda(String),
}

/// Numbers whose every bit pattern is a value, so their memory may be
/// rewritten as bytes.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f64 {}

/// A host slice of plain numbers as its bytes.
fn bytes_of<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: u8 has alignment 1, the length covers exactly the slice's
    // memory, and any bytes written back form valid `T`s (Plain).
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.shared.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let n = buf.len();
        self.shared
            .all_reduce_host("NCCL all-reduce", bytes_of(buf), n, FLOAT32)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        let n = buf.len();
        self.shared
            .all_reduce_host("NCCL all-reduce", bytes_of(buf), n, FLOAT64)
    }
    fn all_gather_rows(
        &self,
        ids: &[i32],
        rows: &[f32],
    ) -> Result<(Vec<i32>, Vec<f32>), CollectiveError> {
        let op = "NCCL all-gather";
        let width = if ids.is_empty() {
            0
        } else {
            rows.len() / ids.len()
        };
        let mut part = Vec::with_capacity(8 + ids.len() * 4 + rows.len() * 4);
        part.extend_from_slice(&(width as u64).to_le_bytes());
        part.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
        part.extend(rows.iter().flat_map(|x| x.to_le_bytes()));
        let parts = self.shared.all_gather_varying(op, &part)?;
        let (mut out_ids, mut out_rows) = (Vec::new(), Vec::new());
        for (r, p) in parts.iter().enumerate() {
            let bad = || {
                self.shared
                    .fail(op, format!("rank {r} sent a malformed part"))
            };
            let w = u64::from_le_bytes(p.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?)
                as usize;
            let body = &p[8..];
            let count = body.len() / (4 + 4 * w);
            if count * (4 + 4 * w) != body.len() || (count > 0 && w != width && !ids.is_empty()) {
                return Err(self.shared.fail(
                    op,
                    format!("rank {r} sent rows of {w} values, this rank's have {width}"),
                ));
            }
            let (id_bytes, row_bytes) = body.split_at(count * 4);
            out_ids.extend(
                id_bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            out_rows.extend(
                row_bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Ok((out_ids, out_rows))
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.shared.all_gather_varying("NCCL all-gather", mine)
    }
    fn device(&self) -> Option<Arc<dyn DeviceCollective>> {
        Some(self.shared.clone())
    }
}

impl DeviceCollective for Shared {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn start_all_reduce(
        &self,
        dev: &Device,
        buf: &Buffer<f32>,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        let op = "NCCL all-reduce (device)";
        let mut inner = self.lock(op)?;
        let g = self.engine_gpu(&inner, dev, op)?;
        let start = dev
            .check_buffers(op, &[buf])
            .and_then(|()| buf.check_len(op, range.end))
            .and_then(|()| buf.ptr_at(range.start))
            .map_err(|e| self.fail(op, e.to_string()))?;
        if range.is_empty() {
            return Ok(());
        }
        self.guarded(&mut inner, op, |inner| {
            Self::after_compute(inner, g).map_err(Step::Cuda)?;
            let at = start as usize as u64;
            // SAFETY: the range lies in the engine's buffer on this
            // communicator's GPU (checked above); the engine keeps the buffer
            // and waits (finish) before touching the range again.
            unsafe {
                inner
                    .comm
                    .all_reduce(at, at, range.len(), FLOAT32, SUM, inner.gpu.stream())
            }
            .map_err(Step::Nccl)?;
            inner.started += 1;
            Ok(())
        })
    }

    fn start_all_gather_i32(
        &self,
        dev: &Device,
        part: &Buffer<i32>,
        count: usize,
        out: &Buffer<i32>,
    ) -> Result<(), CollectiveError> {
        self.start_gather("NCCL all-gather (device)", dev, part, count, out, INT32)
    }

    fn start_all_gather_f32(
        &self,
        dev: &Device,
        part: &Buffer<f32>,
        count: usize,
        out: &Buffer<f32>,
    ) -> Result<(), CollectiveError> {
        self.start_gather("NCCL all-gather (device)", dev, part, count, out, FLOAT32)
    }

    fn finish(&self, dev: &Device) -> Result<(), CollectiveError> {
        let op = "NCCL wait";
        let mut inner = self.lock(op)?;
        if inner.started == 0 {
            return Ok(());
        }
        let g = self.engine_gpu(&inner, dev, op)?;
        let n = inner.started;
        self.guarded(&mut inner, op, |inner| {
            let done = inner
                .gpu
                .record_event(None)
                .map_err(|e| Step::Cuda(e.to_string()))?;
            let what = format!("{n} device collective(s) of this step");
            inner.comm.wait_event(&what, &done).map_err(Step::Nccl)?;
            g.stream()
                .wait(&done)
                .map_err(|e| Step::Cuda(e.to_string()))?;
            inner.started = 0;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_travels_tagged() {
        let id = UniqueId {
            internal: std::array::from_fn(|i| (i as u8).wrapping_mul(7) as std::ffi::c_char),
        };
        let p = id_payload(&id);
        assert_eq!(p.len(), ID_TAG.len() + 128);
        assert_eq!(id_from_payload(&p).unwrap().internal, id.internal);
        // The TCP transport's payload, a short one, an untagged one: refused.
        assert!(id_from_payload(b"trm tcp collective v1").is_none());
        assert!(id_from_payload(&p[..p.len() - 1]).is_none());
        assert!(id_from_payload(&p[ID_TAG.len()..]).is_none());
    }

    /// A world of one needs no NCCL: the CUDA path's collective then costs
    /// nothing (this machine has no libnccl, so NCCL would fail).
    #[test]
    fn one_rank_gets_the_identity_collective() {
        let c = for_cuda(&World::single(), 0, Duration::from_secs(1)).unwrap();
        assert_eq!(c.world_size(), 1);
        assert!(c.device().is_none());
    }

    /// Without libnccl (CI), joining is a typed error naming the search.
    #[test]
    fn missing_library_is_an_error_not_a_panic() {
        if library::nccl().is_ok() {
            eprintln!("libnccl present: the missing-library path is not exercised here");
            return;
        }
        let e = NcclCollective::join(&World::single(), 0, Duration::from_secs(1))
            .err()
            .expect("no libnccl: must fail");
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(matches!(e, NcclError::Library(_)), "{msg}");
        assert!(msg.contains("libnccl.so.2"), "{msg}");
        assert!(msg.contains("searched:"), "{msg}");
    }
}
