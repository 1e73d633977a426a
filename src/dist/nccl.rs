//! Data-parallel collectives over NCCL, one process per GPU.
//!
//! Rendezvous, kept simple: torchrun-style environment variables `RANK`,
//! `WORLD_SIZE` and `LOCAL_RANK` (the GPU ordinal; default 0), and the NCCL
//! unique id passed through a file on a filesystem every rank sees, named by
//! `TRM_NCCL_ID_FILE`: rank 0 creates the id and writes it (to a temporary
//! name, then renamed, so readers never see half a file); the other ranks wait
//! for the file, up to `TRM_NCCL_ID_TIMEOUT_S` seconds (default 300). Use a
//! fresh file per run. A run of one rank needs none of this: use
//! [`super::SingleProcess`].
//!
//! libnccl is loaded at run time; [`NcclCollective::from_env`] checks that it
//! loads before any call into it, so a missing library is an error, not a
//! panic; a collective that fails returns a [`super::CollectiveError`] with
//! NCCL's message, which stops training.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::backend::cuda::{CudaError, Gpu};

/// Errors of NCCL set-up.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("NCCL: the library (libnccl.so.2) is not installed or not on the loader path")]
    LibraryMissing,
    #[error("NCCL rendezvous: {0}")]
    Env(String),
    #[error("NCCL rendezvous: id file {path}: {message}")]
    IdFile { path: PathBuf, message: String },
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// cudarc's NCCL error has no `std::error::Error` impl; its Debug text.
    #[error("NCCL: {0}")]
    Call(String),
}

/// This process's place in the run, from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub id_file: PathBuf,
    pub timeout: Duration,
}

impl Rendezvous {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `TRM_NCCL_ID_FILE` and
    /// `TRM_NCCL_ID_TIMEOUT_S` through `get` (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Rendezvous, NcclError> {
        let num = |name: &str, default: Option<usize>| -> Result<usize, NcclError> {
            match get(name) {
                Some(v) => v.trim().parse().map_err(|_| {
                    NcclError::Env(format!("{name}={v:?} is not a non-negative integer"))
                }),
                None => default.ok_or_else(|| NcclError::Env(format!("{name} is not set"))),
            }
        };
        let rank = num("RANK", None)?;
        let world_size = num("WORLD_SIZE", None)?;
        let local_rank = num("LOCAL_RANK", Some(0))?;
        if world_size == 0 || rank >= world_size {
            return Err(NcclError::Env(format!(
                "RANK={rank} must be below WORLD_SIZE={world_size}"
            )));
        }
        let id_file = get("TRM_NCCL_ID_FILE").map(PathBuf::from).ok_or_else(|| {
            NcclError::Env(
                "TRM_NCCL_ID_FILE is not set (a path every rank can read, fresh per run)".into(),
            )
        })?;
        let timeout = Duration::from_secs(num("TRM_NCCL_ID_TIMEOUT_S", Some(300))? as u64);
        Ok(Rendezvous {
            rank,
            world_size,
            local_rank,
            id_file,
            timeout,
        })
    }

    /// [`Rendezvous::from_vars`] over the process environment.
    pub fn from_env() -> Result<Rendezvous, NcclError> {
        Rendezvous::from_vars(|k| std::env::var(k).ok())
    }
}

/// Whether libnccl loads (no call into it is made).
pub fn nccl_library_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn call_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> NcclError + '_ {
    move |e| NcclError::Call(format!("{what}: {e:?}"))
}

const ID_BYTES: usize = 128;

fn write_id(path: &Path, id: &Id) -> Result<(), NcclError> {
    let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
    let tmp = path.with_extension("partial");
    let io = |message: std::io::Error| NcclError::IdFile {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    std::fs::write(&tmp, hex::encode(bytes)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn read_id(path: &Path, timeout: Duration) -> Result<Id, NcclError> {
    let start = Instant::now();
    let text = loop {
        match std::fs::read_to_string(path) {
            Ok(t) => break t,
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                return Err(NcclError::IdFile {
                    path: path.to_path_buf(),
                    message: format!("rank 0 did not write it within {timeout:?}: {e}"),
                })
            }
        }
    };
    let bytes = hex::decode(text.trim()).map_err(|e| NcclError::IdFile {
        path: path.to_path_buf(),
        message: format!("not a hex NCCL id: {e}"),
    })?;
    let raw: [u8; ID_BYTES] = bytes.try_into().map_err(|b: Vec<u8>| NcclError::IdFile {
        path: path.to_path_buf(),
        message: format!("{} bytes, an NCCL id has {ID_BYTES}", b.len()),
    })?;
    Ok(Id::uninit(raw.map(|b| b as std::ffi::c_char)))
}

/// One rank of an NCCL run, on GPU `LOCAL_RANK`. Collectives copy the host
/// buffer to the GPU, reduce there, and copy back (the trainer's gradients
/// live on the host today).
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    // Keeps the context and stream alive for the communicator.
    _gpu: Gpu,
}

impl NcclCollective {
    /// Joins the run described by the environment (module docs).
    pub fn from_env() -> Result<NcclCollective, NcclError> {
        NcclCollective::join(&Rendezvous::from_env()?)
    }

    /// Joins the run `r` describes.
    pub fn join(r: &Rendezvous) -> Result<NcclCollective, NcclError> {
        if !nccl_library_present() {
            return Err(NcclError::LibraryMissing);
        }
        let gpu = Gpu::new(r.local_rank)?;
        let id = if r.rank == 0 {
            let id = Id::new().map_err(call_err("creating the unique id"))?;
            write_id(&r.id_file, &id)?;
            id
        } else {
            read_id(&r.id_file, r.timeout)?
        };
        let stream = gpu.stream().raw().clone();
        let comm = Comm::from_rank(stream.clone(), r.rank, r.world_size, id)
            .map_err(call_err("joining the communicator"))?;
        Ok(NcclCollective {
            comm,
            stream,
            _gpu: gpu,
        })
    }

    fn fail(&self, op: &'static str, message: String) -> super::CollectiveError {
        super::CollectiveError {
            op,
            rank: self.comm.rank(),
            world: self.comm.world_size(),
            message,
        }
    }

    fn all_reduce<T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr>(
        &self,
        buf: &mut [T],
    ) -> Result<(), super::CollectiveError> {
        if buf.is_empty() || self.comm.world_size() == 1 {
            return Ok(());
        }
        let result = (|| -> Result<(), String> {
            let mut dev = self.stream.clone_htod(&*buf).map_err(|e| e.to_string())?;
            self.comm
                .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
                .map_err(|e| format!("{e:?}"))?;
            self.stream
                .memcpy_dtoh(&dev, buf)
                .map_err(|e| e.to_string())?;
            self.stream.synchronize().map_err(|e| e.to_string())
        })();
        result.map_err(|e| self.fail("NCCL all-reduce", format!("{} values: {e}", buf.len())))
    }

    fn all_gather<
        T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    >(
        &self,
        part: &[T],
    ) -> Result<Vec<T>, String> {
        let world = self.comm.world_size();
        let src = self.stream.clone_htod(part).map_err(|e| e.to_string())?;
        let mut dst = self
            .stream
            .alloc_zeros::<T>(part.len() * world)
            .map_err(|e| e.to_string())?;
        self.comm
            .all_gather(&src, &mut dst)
            .map_err(|e| format!("{e:?}"))?;
        let out = self.stream.clone_dtoh(&dst).map_err(|e| e.to_string())?;
        self.stream.synchronize().map_err(|e| e.to_string())?;
        Ok(out)
    }
}

impl super::Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), super::CollectiveError> {
        self.all_reduce(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), super::CollectiveError> {
        self.all_reduce(buf)
    }
    fn all_gather_rows(
        &self,
        ids: &[i32],
        rows: &[f32],
    ) -> Result<(Vec<i32>, Vec<f32>), super::CollectiveError> {
        let world = self.comm.world_size();
        let width = if ids.is_empty() {
            0
        } else {
            rows.len() / ids.len()
        };
        let result = (|| -> Result<(Vec<i32>, Vec<f32>), String> {
            // Ranks may hold different counts: gather (count, width), pad every
            // rank's part to the largest, gather, and drop the padding.
            let meta = self.all_gather(&[ids.len() as i32, width as i32])?;
            let counts: Vec<usize> = meta.chunks(2).map(|c| c[0].max(0) as usize).collect();
            let width = meta
                .chunks(2)
                .map(|c| c[1].max(0) as usize)
                .max()
                .unwrap_or(0);
            let most = counts.iter().copied().max().unwrap_or(0);
            let mut pid = vec![0i32; most];
            pid[..ids.len()].copy_from_slice(ids);
            let mut prow = vec![0.0f32; most * width];
            prow[..rows.len()].copy_from_slice(rows);
            let gid = self.all_gather(&pid)?;
            let grow = self.all_gather(&prow)?;
            let (mut out_ids, mut out_rows) = (Vec::new(), Vec::new());
            for (r, &c) in counts.iter().enumerate().take(world) {
                out_ids.extend_from_slice(&gid[r * most..r * most + c]);
                out_rows.extend_from_slice(&grow[r * most * width..(r * most + c) * width]);
            }
            Ok((out_ids, out_rows))
        })();
        result.map_err(|e| self.fail("NCCL all-gather", format!("{} rows: {e}", ids.len())))
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, super::CollectiveError> {
        let result = (|| -> Result<Vec<Vec<u8>>, String> {
            // Lengths first, then every part padded to the longest.
            let lens = self.all_gather(&[mine.len() as u64])?;
            let most = lens.iter().copied().max().unwrap_or(0) as usize;
            let mut part = vec![0u8; most];
            part[..mine.len()].copy_from_slice(mine);
            let all = self.all_gather(&part)?;
            Ok(lens
                .iter()
                .enumerate()
                .map(|(r, &n)| all[r * most..r * most + n as usize].to_vec())
                .collect())
        })();
        result.map_err(|e| self.fail("NCCL all-gather", format!("{} bytes: {e}", mine.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn rendezvous_reads_torchrun_vars() {
        let r = Rendezvous::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("TRM_NCCL_ID_FILE", "/tmp/id"),
        ]))
        .unwrap();
        assert_eq!((r.rank, r.world_size, r.local_rank), (1, 4, 1));
        assert_eq!(r.timeout, Duration::from_secs(300));
        let e = Rendezvous::from_vars(vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).unwrap_err();
        assert!(e.to_string().contains("below WORLD_SIZE"), "{e}");
        let e = Rendezvous::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "4")])).unwrap_err();
        assert!(e.to_string().contains("RANK=\"x\""), "{e}");
        let e = Rendezvous::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("TRM_NCCL_ID_FILE"), "{e}");
    }

    /// Without libnccl (this build machine), joining is a typed error.
    #[test]
    fn missing_library_is_an_error_not_a_panic() {
        let r = Rendezvous {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            id_file: std::env::temp_dir().join("trm-nccl-test-id"),
            timeout: Duration::from_secs(1),
        };
        if nccl_library_present() {
            eprintln!("libnccl present: the missing-library path is not exercised here");
            return;
        }
        let e = NcclCollective::join(&r)
            .err()
            .expect("no libnccl: must fail");
        assert!(matches!(e, NcclError::LibraryMissing), "{e}");
        assert!(e.to_string().contains("libnccl"), "{e}");
    }

    #[test]
    fn id_file_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        let raw: [std::ffi::c_char; ID_BYTES] =
            std::array::from_fn(|i| (i as u8) as std::ffi::c_char);
        write_id(&path, &Id::uninit(raw)).unwrap();
        let back = read_id(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(back.internal(), &raw);
        std::fs::write(&path, "abcd").unwrap();
        let e = read_id(&path, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("2 bytes"), "{e}");
        let e = read_id(&dir.path().join("none"), Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("did not write it"), "{e}");
    }
}
