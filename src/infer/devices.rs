//! `trm infer` on several devices: one engine per GPU (or per emulated
//! device), each on its own thread, fed whole test batches from one queue;
//! the outputs come back to the caller in batch order.
//!
//! A batch is computed the same whichever device of a kind runs it (every
//! row on its own, the same kernels), and the caller sees the batches in
//! the one-device order, so the votes, their sums and the submission are
//! those of one device. Batches go to whichever device is free, so a
//! slower GPU takes fewer.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{InferError, Result};
use crate::data::loader::Batch;
use crate::model::act::{evaluate_batch, EvalOutputs};
use crate::model::config::ArchConfig;
use crate::model::device_choice::{
    build_engine, resolve_with, usable_gpu, CudaOffer, DeviceChoice, DeviceKind,
};
use crate::model::engine::{Engine, EngineConfig};
use crate::model::trm::{Dims, Params};

/// `--devices`: every usable GPU, or these ordinals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    All,
    Ordinals(Vec<usize>),
}

impl FromStr for DeviceList {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(DeviceList::All);
        }
        let mut ordinals = Vec::new();
        for part in s.split(',') {
            let n: usize = part.trim().parse().map_err(|_| {
                format!("`{part}` is not a device number: expected `all` or a list like 0,1,2")
            })?;
            if ordinals.contains(&n) {
                return Err(format!("device {n} is listed twice"));
            }
            ordinals.push(n);
        }
        Ok(DeviceList::Ordinals(ordinals))
    }
}

/// The devices to run on: `requested` (`--device`) with `list`
/// (`--devices`), or with neither the model's `fallback` kind, else every
/// usable GPU, else the CPU. The CPU engine is one device (it uses every
/// core already); the emulator runs one engine per listed number.
pub fn resolve_devices(
    requested: Option<DeviceKind>,
    fallback: Option<DeviceKind>,
    list: Option<&DeviceList>,
    offer: &CudaOffer<'_>,
) -> Result<Vec<DeviceChoice>> {
    let first = match list {
        Some(DeviceList::Ordinals(o)) => o.first().copied().unwrap_or(0),
        _ => 0,
    };
    let lead = resolve_with(requested.or(fallback), first, offer)?;
    let named = |ordinals: &[usize]| -> Vec<DeviceChoice> {
        ordinals
            .iter()
            .map(|&ordinal| DeviceChoice {
                ordinal,
                ..lead.clone()
            })
            .collect()
    };
    match (lead.kind, list) {
        (DeviceKind::Cpu, None) => Ok(vec![lead]),
        (DeviceKind::Cpu, Some(_)) if requested.is_some() || fallback.is_some() => {
            Err(InferError::Options(
                "--devices applies to --device cuda or emu; the CPU engine is one device that \
                 already uses every core (see --threads)"
                    .into(),
            ))
        }
        // Automatic choice fell back to the CPU: say why rather than
        // ignore the list.
        (DeviceKind::Cpu, Some(_)) => Err(InferError::Options(format!(
            "--devices names GPUs, but no GPU can be used ({}); drop --devices to run on the CPU",
            lead.why
        ))),
        (DeviceKind::Emu, None) => Ok(vec![lead]),
        (DeviceKind::Emu, Some(DeviceList::Ordinals(o))) => Ok(named(o)),
        (DeviceKind::Emu, Some(DeviceList::All)) => Err(InferError::Options(
            "--devices all needs GPUs; with --device emu list the emulated devices, e.g. --devices 0,1"
                .into(),
        )),
        (DeviceKind::Cuda, Some(DeviceList::Ordinals(o))) => {
            for &ordinal in o {
                usable_gpu(ordinal, offer)?;
            }
            Ok(named(o))
        }
        (DeviceKind::Cuda, None | Some(DeviceList::All)) => {
            let gpus = (offer.probe)().unwrap_or_default();
            let usable: Vec<usize> = gpus
                .iter()
                .map(|g| g.ordinal)
                .filter(|&o| usable_gpu(o, offer).is_ok())
                .collect();
            if usable.is_empty() {
                // The lead was usable a moment ago; keep it.
                return Ok(vec![lead]);
            }
            Ok(named(&usable))
        }
    }
}

/// The device as messages and the summary name it: `cpu`, `cuda:1`, `emu:0`.
pub fn label(d: &DeviceChoice) -> String {
    match d.kind {
        DeviceKind::Cpu => "cpu".to_string(),
        kind => format!("{kind}:{}", d.ordinal),
    }
}

/// One test batch to run, by its index in the stream.
struct Job {
    index: usize,
    batch: Batch,
}

/// What a worker tells the pool.
enum Report {
    /// Its engine is up: the device's name and, when asked for, the seconds
    /// one probe batch took once warm.
    Ready {
        worker: usize,
        name: String,
        probe: Option<Duration>,
    },
    Done {
        index: usize,
        outputs: EvalOutputs,
    },
    Failed {
        worker: usize,
        error: InferError,
    },
}

/// A device ready to run, as the start-up lines show it.
#[derive(Debug, Clone)]
pub struct ReadyDevice {
    pub choice: DeviceChoice,
    pub name: String,
    /// One warm probe batch (`--time-limit` asks for it).
    pub probe: Option<Duration>,
}

/// Engines on every device, waiting for batches.
pub struct DevicePool {
    jobs: Option<SyncSender<Job>>,
    reports: Receiver<Report>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    /// Batches queued ahead of the oldest unfinished one.
    window: usize,
    /// Per worker, the device as messages name it (`cuda:1`).
    labels: Vec<String>,
    pub devices: Vec<ReadyDevice>,
}

/// What every worker shares.
struct WorkerSetup {
    arch: ArchConfig,
    batch: usize,
    blank_id: i64,
    cfg: EngineConfig,
    probe: Option<Arc<Batch>>,
    jobs: Arc<Mutex<Receiver<Job>>>,
    reports: Sender<Report>,
    stop: Arc<AtomicBool>,
}

impl DevicePool {
    /// Opens one engine per device with a copy of `params` (the last gets
    /// `params` itself), each in its own thread, and waits until all are
    /// up. With `probe`, each runs it twice and reports the second (warm)
    /// time.
    pub fn start(
        devices: &[DeviceChoice],
        arch: &ArchConfig,
        params: Params<f32>,
        batch: usize,
        blank_id: i64,
        cfg: EngineConfig,
        probe: Option<Batch>,
    ) -> Result<DevicePool> {
        let window = 2 * devices.len().max(1);
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(window);
        let (report_tx, report_rx) = mpsc::channel::<Report>();
        let stop = Arc::new(AtomicBool::new(false));
        let jobs = Arc::new(Mutex::new(job_rx));
        let probe = probe.map(Arc::new);
        let mut workers = Vec::with_capacity(devices.len());
        let mut params = Some(params);
        for (worker, device) in devices.iter().enumerate() {
            let own = if worker + 1 == devices.len() {
                params.take()
            } else {
                params.clone()
            };
            let Some(own) = own else { break };
            let setup = WorkerSetup {
                arch: arch.clone(),
                batch,
                blank_id,
                cfg,
                probe: probe.clone(),
                jobs: Arc::clone(&jobs),
                reports: report_tx.clone(),
                stop: Arc::clone(&stop),
            };
            let device = device.clone();
            let handle = std::thread::Builder::new()
                .name(format!("infer-{}-{}", device.kind, device.ordinal))
                .spawn(move || work(worker, &device, own, setup))
                .map_err(|e| InferError::Options(format!("cannot start a device thread: {e}")))?;
            workers.push(handle);
        }
        drop(report_tx);
        let mut pool = DevicePool {
            jobs: Some(job_tx),
            reports: report_rx,
            stop,
            workers,
            window,
            labels: devices.iter().map(label).collect(),
            devices: Vec::new(),
        };
        let mut ready: Vec<Option<ReadyDevice>> = vec![None; devices.len()];
        while ready.iter().any(Option::is_none) {
            match pool.reports.recv() {
                Ok(Report::Ready {
                    worker,
                    name,
                    probe,
                }) => {
                    ready[worker] = Some(ReadyDevice {
                        choice: devices[worker].clone(),
                        name,
                        probe,
                    })
                }
                Ok(Report::Failed { worker, error }) => {
                    return Err(pool.fail(worker, error));
                }
                Ok(Report::Done { .. }) | Err(_) => {
                    return Err(InferError::Options(
                        "a device thread ended before its engine was up".into(),
                    ))
                }
            }
        }
        pool.devices = ready.into_iter().flatten().collect();
        Ok(pool)
    }

    /// Runs every batch of `batches` and hands the outputs of each to
    /// `on_output` in stream order, until it returns `false` (no further
    /// batch is handed out) or an error (which is returned).
    pub fn run(
        &mut self,
        batches: impl Iterator<Item = Batch>,
        on_output: &mut dyn FnMut(EvalOutputs) -> Result<bool>,
    ) -> Result<()> {
        let Some(jobs) = self.jobs.take() else {
            return Err(InferError::Options("the device pool ran twice".into()));
        };
        let mut batches = batches.enumerate();
        let mut sent = 0usize;
        let mut emitted = 0usize;
        let mut exhausted = false;
        let mut done: BTreeMap<usize, EvalOutputs> = BTreeMap::new();
        let mut jobs = Some(jobs);
        loop {
            while !exhausted && sent < emitted + self.window {
                match batches.next() {
                    Some((index, batch)) => {
                        let queue = jobs.as_ref().expect("open while batches remain");
                        // Fails only when every worker has ended; its report
                        // says why.
                        if queue.send(Job { index, batch }).is_err() {
                            exhausted = true;
                            break;
                        }
                        sent += 1;
                    }
                    None => exhausted = true,
                }
            }
            if exhausted {
                // No more batches: workers end once the queue is empty.
                jobs = None;
            }
            if exhausted && emitted == sent {
                return Ok(());
            }
            match self.reports.recv() {
                Ok(Report::Done { index, outputs }) => {
                    done.insert(index, outputs);
                    while let Some(outputs) = done.remove(&emitted) {
                        emitted += 1;
                        match on_output(outputs) {
                            Ok(true) => {}
                            Ok(false) => {
                                self.stop.store(true, Ordering::Relaxed);
                                return Ok(());
                            }
                            Err(e) => {
                                self.stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                }
                Ok(Report::Failed { worker, error }) => return Err(self.fail(worker, error)),
                Ok(Report::Ready { .. }) => {}
                Err(_) => {
                    return Err(InferError::Options(format!(
                        "every device thread ended with {} of {sent} batches done",
                        emitted
                    )))
                }
            }
        }
    }

    /// Ends every worker; the first failure a worker reported, if any.
    pub fn finish(mut self) -> Result<()> {
        self.jobs = None;
        let workers = std::mem::take(&mut self.workers);
        for (i, handle) in workers.into_iter().enumerate() {
            handle.join().map_err(|_| {
                InferError::Options(format!("the thread of device {} panicked", self.labels[i]))
            })?;
        }
        while let Ok(report) = self.reports.try_recv() {
            if let Report::Failed { worker, error } = report {
                return Err(self.describe(worker, error));
            }
        }
        Ok(())
    }

    /// Stops the other workers and names the device that failed.
    fn fail(&mut self, worker: usize, error: InferError) -> InferError {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        self.describe(worker, error)
    }

    fn describe(&self, worker: usize, error: InferError) -> InferError {
        if self.workers.len() <= 1 {
            return error;
        }
        InferError::OnDevice {
            device: self.labels.get(worker).cloned().unwrap_or_default(),
            source: Box::new(error),
        }
    }
}

impl Drop for DevicePool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A worker: opens its engine, optionally times the probe, then runs jobs
/// until the queue closes or the pool stops.
fn work(worker: usize, device: &DeviceChoice, params: Params<f32>, setup: WorkerSetup) {
    let fail = |error: InferError| {
        let _ = setup.reports.send(Report::Failed { worker, error });
    };
    let mut engine = match build_engine(
        device.kind,
        device.ordinal,
        setup.arch.clone(),
        params,
        setup.batch,
        setup.cfg,
    ) {
        Ok(e) => e,
        Err(e) => return fail(e.into()),
    };
    let dims = Dims::new(&setup.arch, setup.batch);
    let probe = match &setup.probe {
        Some(batch) => match time_probe(&mut *engine, &dims, &setup, batch) {
            Ok(t) => Some(t),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let name = engine.device_name();
    if setup
        .reports
        .send(Report::Ready {
            worker,
            name,
            probe,
        })
        .is_err()
    {
        return;
    }
    while !setup.stop.load(Ordering::Relaxed) {
        // The lock is held only while taking one job.
        let job = match setup.jobs.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(Job { index, batch }) = job else {
            break;
        };
        match evaluate_batch(&mut *engine, &dims, &setup.arch, &batch, setup.blank_id) {
            Ok((_, outputs)) => {
                if setup.reports.send(Report::Done { index, outputs }).is_err() {
                    return;
                }
            }
            Err(e) => return fail(e.into()),
        }
    }
}

/// The probe batch twice: the first run pays for warm-up (module loads,
/// graph capture, JIT), the second is the time a batch takes.
fn time_probe(
    engine: &mut dyn Engine,
    dims: &Dims,
    setup: &WorkerSetup,
    batch: &Batch,
) -> Result<Duration> {
    evaluate_batch(engine, dims, &setup.arch, batch, setup.blank_id)?;
    let start = Instant::now();
    evaluate_batch(engine, dims, &setup.arch, batch, setup.blank_id)?;
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::{CudaError, DeviceInfo};

    fn gpu(ordinal: usize, capability: (i32, i32)) -> DeviceInfo {
        DeviceInfo {
            ordinal,
            name: format!("Test GPU {ordinal}"),
            capability,
            total_memory: 1 << 30,
            multiprocessors: 1,
        }
    }

    fn resolve(
        requested: Option<DeviceKind>,
        list: Option<&str>,
        gpus: &[DeviceInfo],
    ) -> Result<Vec<(DeviceKind, usize)>> {
        let gpus = gpus.to_vec();
        let probe = move || -> std::result::Result<Vec<DeviceInfo>, CudaError> { Ok(gpus.clone()) };
        let targets: Vec<&str> = crate::backend::cuda::images::TARGETS
            .iter()
            .map(|t| t.name)
            .collect();
        let offer = CudaOffer {
            kernels: true,
            targets: &targets,
            request: Ok(crate::backend::cuda::images::ImageRequest::Best),
            emulator: true,
            probe: &probe,
        };
        let list = list.map(|l| l.parse::<DeviceList>().unwrap());
        Ok(resolve_devices(requested, None, list.as_ref(), &offer)?
            .into_iter()
            .map(|d| (d.kind, d.ordinal))
            .collect())
    }

    #[test]
    fn device_lists_parse() {
        assert_eq!("all".parse::<DeviceList>(), Ok(DeviceList::All));
        assert_eq!(
            " 0, 2,1".parse::<DeviceList>(),
            Ok(DeviceList::Ordinals(vec![0, 2, 1]))
        );
        for bad in ["", "0,,1", "x", "-1", "0,0"] {
            assert!(bad.parse::<DeviceList>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_usable_gpu_by_default() {
        use DeviceKind::*;
        // GPU 1 is below what the kernels run on: left out of the default.
        let gpus = [gpu(0, (9, 0)), gpu(1, (7, 5)), gpu(2, (9, 0))];
        assert_eq!(resolve(None, None, &gpus).unwrap(), [(Cuda, 0), (Cuda, 2)]);
        assert_eq!(
            resolve(Some(Cuda), Some("all"), &gpus).unwrap(),
            [(Cuda, 0), (Cuda, 2)]
        );
        assert_eq!(resolve(Some(Cuda), Some("2"), &gpus).unwrap(), [(Cuda, 2)]);
        // Named but unusable, or absent: an error naming it.
        let e = resolve(Some(Cuda), Some("0,1"), &gpus)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU 1") && e.contains("7.5"), "{e}");
        let e = resolve(Some(Cuda), Some("5"), &gpus)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU 5"), "{e}");
        // No GPU: the CPU, one device; a list is then an error saying why.
        assert_eq!(resolve(None, None, &[]).unwrap(), [(Cpu, 0)]);
        let e = resolve(None, Some("0,1"), &[]).unwrap_err().to_string();
        assert!(e.contains("--devices") && e.contains("no GPU"), "{e}");
        let e = resolve(Some(Cpu), Some("0"), &gpus)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--device cuda or emu"), "{e}");
        // The emulator: one engine per listed number.
        assert_eq!(resolve(Some(Emu), None, &[]).unwrap(), [(Emu, 0)]);
        assert_eq!(
            resolve(Some(Emu), Some("0,1"), &[]).unwrap(),
            [(Emu, 0), (Emu, 1)]
        );
        assert!(resolve(Some(Emu), Some("all"), &[]).is_err());
    }
}
