//! CUDA graphs for the fixed-shape parts of a step, and the per-phase
//! timing the benchmark reads.
//!
//! Each part of a step that launches only kernels, GEMMs and device copies
//! on fixed buffers (no host transfer, no wait) is a [`Region`]: its first
//! run launches plainly (a warm-up: cuBLASLt picks its plans and allocates
//! its workspace), its second is captured into a graph and replayed from
//! then on, so a step costs a handful of graph launches instead of hundreds
//! of kernel launches. A capture that fails falls back to plain launches
//! for that region, once, with a message. The emulator always launches
//! plainly.

use std::time::Instant;

use crate::backend::cuda::{CudaError, Device, Event, Graph};

/// The captured parts of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Input embeddings and the H_cycles - 1 cycles without gradient.
    Nograd,
    /// The gradient cycle (taped) and the heads.
    GradForward,
    /// The Q-continue bootstrap's cycles and Q head.
    Bootstrap,
    /// The CE backward and the backward of the heads and the gradient cycle.
    Backward,
    /// One evaluation step (H_cycles cycles without gradient).
    EvalStep,
    /// [`Region::Backward`] in parts, for runs that reduce gradients on the
    /// device while the backward runs: the NCCL calls go between the parts,
    /// outside every graph (a captured NCCL call would need the
    /// communicator's own graph rules, and a graph cannot be polled for a
    /// deadline). Up to the first L call's backward:
    BackwardUntilLastCall,
    /// One layer of the first L call's backward.
    BackwardLayer(usize),
    /// The embedding backward after it.
    BackwardTail,
}

impl Region {
    pub fn name(self) -> &'static str {
        match self {
            Region::Nograd => "no-grad cycles",
            Region::GradForward => "gradient cycle forward",
            Region::Bootstrap => "Q-continue bootstrap",
            Region::Backward => "backward",
            Region::EvalStep => "evaluation step",
            Region::BackwardUntilLastCall => "backward (until the last L call)",
            Region::BackwardLayer(_) => "backward (a layer of the last L call)",
            Region::BackwardTail => "backward (embeddings)",
        }
    }
}

enum Slot {
    /// Launched plainly this many times so far.
    Plain(u32),
    Captured(Graph),
    /// Capture failed or graphs are off: plain launches for good.
    Off,
}

/// The graph (or plain-launch state) of every region run so far.
pub struct Graphs {
    on: bool,
    slots: Vec<(Region, Slot)>,
}

impl Graphs {
    /// `enabled`: capture on GPUs (`TRM_CUDA_GRAPHS=0` turns it off).
    pub fn new(enabled: bool) -> Graphs {
        let on = enabled && std::env::var("TRM_CUDA_GRAPHS").map_or(true, |v| v != "0");
        Graphs {
            on,
            slots: Vec::new(),
        }
    }

    /// Plain launches for every region (also a placeholder while a run
    /// borrows the engine's graphs).
    pub fn off() -> Graphs {
        Graphs::new(false)
    }

    /// Runs `body` for `region` on `dev`: plainly, or captured and replayed
    /// (see the module comment).
    pub fn run(
        &mut self,
        dev: &Device,
        region: Region,
        body: impl Fn() -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let i = match self.slots.iter().position(|(r, _)| *r == region) {
            Some(i) => i,
            None => {
                let first = if self.on { Slot::Plain(0) } else { Slot::Off };
                self.slots.push((region, first));
                self.slots.len() - 1
            }
        };
        let slot = std::mem::replace(&mut self.slots[i].1, Slot::Off);
        let (result, slot) = match (slot, dev.as_gpu()) {
            (Slot::Captured(g), _) => (g.launch(), Slot::Captured(g)),
            (Slot::Plain(n), Some(gpu)) if n >= 1 => match gpu.capture(&body) {
                Ok(g) => (g.launch(), Slot::Captured(g)),
                Err(e) => {
                    eprintln!(
                        "trm: CUDA graph capture of the {} failed ({e}); plain launches from now on",
                        region.name()
                    );
                    (body(), Slot::Off)
                }
            },
            (Slot::Plain(n), Some(_)) => (body(), Slot::Plain(n + 1)),
            (slot, _) => (body(), slot),
        };
        self.slots[i].1 = slot;
        result
    }

    /// Regions running from a graph, for messages and tests.
    pub fn captured(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for (r, s) in &self.slots {
            if matches!(s, Slot::Captured(_)) && !names.contains(&r.name()) {
                names.push(r.name());
            }
        }
        names
    }
}

/// A point in a step's timeline: a GPU event, or host time on the emulator.
enum Stamp {
    Gpu(Event),
    Host(Instant),
}

/// Per-phase time of the steps run since profiling started.
#[derive(Debug, Clone, Default)]
pub struct PhaseTimes {
    /// `(phase name, milliseconds summed over the steps)`, in step order.
    pub phases: Vec<(&'static str, f64)>,
}

/// Records phase boundaries while on; resolves them when asked (so GPU
/// events are read once the work is done, not in the middle of a step).
#[derive(Default)]
pub struct Profiler {
    on: bool,
    spans: Vec<(&'static str, Stamp, Stamp)>,
}

impl Profiler {
    pub fn set(&mut self, on: bool) {
        self.on = on;
        self.spans.clear();
    }

    /// A stamp now, when profiling.
    pub fn mark(&self, dev: &Device) -> Result<Option<StampHandle>, CudaError> {
        if !self.on {
            return Ok(None);
        }
        Ok(Some(StampHandle(match dev.as_gpu() {
            Some(g) => Stamp::Gpu(g.record_event(None)?),
            None => Stamp::Host(Instant::now()),
        })))
    }

    /// Closes the span of `phase` opened by `start` (a no-op when off).
    pub fn span(
        &mut self,
        dev: &Device,
        phase: &'static str,
        start: Option<StampHandle>,
    ) -> Result<(), CudaError> {
        if let (Some(start), Some(end)) = (start, self.mark(dev)?) {
            self.spans.push((phase, start.0, end.0));
        }
        Ok(())
    }

    /// The summed time per phase since the last call (or `set`).
    pub fn take(&mut self) -> Result<PhaseTimes, CudaError> {
        let mut out = PhaseTimes::default();
        for (phase, a, b) in self.spans.drain(..) {
            let ms = match (a, b) {
                (Stamp::Gpu(a), Stamp::Gpu(b)) => b.elapsed_ms_since(&a)? as f64,
                (Stamp::Host(a), Stamp::Host(b)) => (b - a).as_secs_f64() * 1e3,
                _ => 0.0,
            };
            match out.phases.iter_mut().find(|(p, _)| *p == phase) {
                Some(entry) => entry.1 += ms,
                None => out.phases.push((phase, ms)),
            }
        }
        Ok(out)
    }
}

/// An opened span's start.
pub struct StampHandle(Stamp);
