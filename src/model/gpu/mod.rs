//! The CUDA engine: the network of `trm.rs` on a [`Device`] (a GPU, or
//! the CPU emulator of the same kernels), op for op with the CPU engine's
//! function names ([`net`]), bf16 activations and GEMM operands, f32 master
//! weights, gradients and optimiser states, all resident on the device
//! ([`weights`]), every activation buffer allocated once ([`plan`]).
//!
//! Per step the host sends the batch and receives only what the shared ACT
//! rules need: the Q logits `[B, 2]` after the inner step and the bootstrap,
//! the CE kernel's per-sample sums `[B]` for the loss. The Q head's BCE is
//! computed on the host (B values) with the CPU engine's own function, and
//! its gradient goes back as a `[B, 2]` GEMM operand.

pub mod buckets;
pub mod graphs;
pub mod net;
pub mod plan;
pub mod weights;

use std::sync::Arc;

use half::bf16;

use crate::backend::cpu::rope::rope_tables;
use crate::backend::cpu::stablemax_ce::IGNORE_LABEL;
use crate::backend::cuda::ops::{
    adam_atan2, carry_reset, cast_f32_to_bf16, ema, puzzle_sign_sgd, scale_f32,
    stablemax_ce_backward, stablemax_ce_forward, AdamAtan2Step, CeOutputs,
};
use crate::backend::cuda::{Buffer, CudaError, Device};
use crate::dist::{Collective, CollectiveError, DeviceCollective};
use crate::model::config::{ArchConfig, PosEncodings};
use crate::model::engine::{
    ActNet, Engine, EngineConfig, EngineError, EngineState, EvalNet, OptimStep, StepTrace,
};
use crate::model::layout::FlatLayout;
use crate::model::trm::{
    check_supported, q_head_loss, Batch, Dims, Grads, LossOut, Params, TrmError,
};

use buckets::{BucketPlan, Ready, MIN_BUCKET_BYTES};
use graphs::{Graphs, PhaseTimes, Profiler, Region};
use net::{GradSink, Net};
use plan::{Activations, PlanShape};
use weights::{DeviceLayout, DeviceWeights, Offsets};

/// Head dims the attention kernels are built for.
const HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// The CE kernels keep a row of logits in registers.
const MAX_VOCAB: usize = 32;
/// Device memory kept free beside the plan: the cuBLASLt workspace, the
/// CUDA context's own allocations, fragmentation.
const HEADROOM_BYTES: usize = 1 << 30;

/// Where the engine is between the calls of one ACT step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No step under way (or the optimiser consumed the gradients).
    Idle,
    /// The inner step ran: the tape, logits and Q logits are live.
    Forward,
    /// The backward ran: the gradients are live until the optimiser.
    Backward,
}

/// The CUDA engine.
pub struct GpuEngine {
    dev: Device,
    arch: ArchConfig,
    dm: Dims,
    cfg: EngineConfig,
    layout: DeviceLayout,
    off: Offsets,
    w: DeviceWeights,
    acts: Activations,
    /// The host weights without the puzzle table: shapes, `H_init`,
    /// `L_init`; exports fill in the rest from the device.
    template: Params<f32>,
    adam_steps: u64,
    /// The live Q bias (read back after each update, when first needed).
    q_bias: Option<[f32; 2]>,
    /// Slots to restart from `H_init` / `L_init` before the next inner step.
    pending_reset: Option<Vec<bool>>,
    /// The inner step's Q logits (with the bias), for the loss.
    last_q: Vec<f32>,
    phase: Phase,
    graphs: Graphs,
    profiler: Profiler,
    /// Data parallel on the device (see [`DataParallel`]); `None` for one
    /// rank or a collective without device buffers.
    dp: Option<DataParallel>,
    /// How the flat gradient buffer is split for the device all-reduce.
    buckets: BucketPlan,
}

/// The ranks' collectives on device buffers, learned from the trainer's
/// collective at the first optimizer step (the engine sees it there only).
/// From the next step on, the backward runs in parts and each bucket's
/// all-reduce starts on the collective's stream as soon as its gradients
/// are final ([`buckets`]); the optimizer waits for them (with the
/// collective's deadline) and gathers the puzzle rows of every rank on the
/// device.
struct DataParallel {
    dc: Arc<dyn DeviceCollective>,
    /// The buckets were started during the last backward.
    started: bool,
    /// The first failure while starting them, reported by the optimizer step
    /// (the backward's trait has only model errors).
    failed: Option<CollectiveError>,
    /// Every rank's puzzle ids and gradient rows, `world * B` of each.
    ids: Buffer<i32>,
    rows: Buffer<f32>,
}

/// `n` bytes in GiB, for messages.
fn gib(n: usize) -> f64 {
    n as f64 / (1u64 << 30) as f64
}

impl GpuEngine {
    /// An engine on `dev` for local batches of `local_batch`: checks the
    /// config against the kernels, plans the memory (refusing a batch that
    /// does not fit, with the largest that would), uploads the weights.
    pub fn new(
        dev: Device,
        arch: ArchConfig,
        params: Params<f32>,
        local_batch: usize,
        cfg: EngineConfig,
    ) -> Result<GpuEngine, EngineError> {
        check_supported(&arch)?;
        if local_batch == 0 {
            return Err(TrmError::EmptyBatch.into());
        }
        let dm = Dims::new(&arch, local_batch);
        if !HEAD_DIMS.contains(&dm.hd) {
            return Err(TrmError::Unsupported(format!(
                "head dim {} (hidden_size {} / num_heads {}) on the CUDA engine, whose \
                 attention kernels take head dims {HEAD_DIMS:?}",
                dm.hd, dm.d, dm.h
            ))
            .into());
        }
        if dm.v > MAX_VOCAB {
            return Err(TrmError::Unsupported(format!(
                "vocab_size {} on the CUDA engine (at most {MAX_VOCAB})",
                dm.v
            ))
            .into());
        }
        let layout = DeviceLayout::new(FlatLayout::new(&arch));
        let off = Offsets::new(&layout, arch.l_layers)?;
        let buckets = bucket_plan(&layout, &off, MIN_BUCKET_BYTES);
        let shape = PlanShape {
            dm,
            tape_calls: arch.l_cycles + 1,
            layers: arch.l_layers,
        };
        let weight_bytes = weights_bytes(&layout, &params, cfg.ema_rate.is_some());
        check_fits(&dev, &shape, weight_bytes)?;
        let (cos, sin) = match arch.pos_encodings {
            PosEncodings::Rope => {
                let t = rope_tables::<f32>(dm.s, dm.hd, arch.rope_theta);
                (t.cos, t.sin)
            }
            // The attention kernels always rotate: the identity rotation.
            _ => (vec![1.0; dm.s * dm.hd], vec![0.0; dm.s * dm.hd]),
        };
        let w = DeviceWeights::upload(&dev, &layout, &params, cfg.ema_rate.is_some())?;
        let acts = Activations::allocate(&dev, &shape, &cos, &sin)?;
        let template = Params {
            puzzle_emb: Vec::new(),
            ..params
        };
        Ok(GpuEngine {
            dev,
            dm,
            cfg,
            layout,
            off,
            w,
            acts,
            template,
            adam_steps: 0,
            q_bias: None,
            pending_reset: None,
            last_q: Vec::new(),
            phase: Phase::Idle,
            graphs: Graphs::new(true),
            profiler: Profiler::default(),
            dp: None,
            buckets,
            arch,
        })
    }

    /// `activations X GiB, parameters Y GiB` as allocated.
    pub fn memory_summary(&self) -> String {
        format!(
            "activations {:.2} GiB, parameters {:.2} GiB",
            gib(self.acts.bytes()),
            gib(self.w.bytes())
        )
    }

    /// Waits for the device's queued work (and reports its errors).
    pub fn synchronize(&self) -> Result<(), EngineError> {
        Ok(self.dev.synchronize()?)
    }

    /// Starts (or stops) timing the phases of each step; see
    /// [`GpuEngine::take_phase_times`].
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler.set(on);
    }

    /// Time per phase of the steps since profiling started or this was last
    /// called (waits for the device).
    pub fn take_phase_times(&mut self) -> Result<PhaseTimes, EngineError> {
        Ok(self.profiler.take()?)
    }

    /// Turns CUDA graphs on (the default on a GPU) or off; regions start
    /// over from plain launches.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = Graphs::new(on);
    }

    /// Sets the smallest gradient bucket of the device all-reduce (default
    /// [`MIN_BUCKET_BYTES`]; tests use 0 for one bucket per layer).
    pub fn set_min_bucket_bytes(&mut self, bytes: usize) {
        self.buckets = bucket_plan(&self.layout, &self.off, bytes);
    }

    /// The gradient buckets of the device all-reduce, in launch order.
    pub fn bucket_plan(&self) -> &BucketPlan {
        &self.buckets
    }

    /// The regions now replayed from CUDA graphs.
    pub fn captured_regions(&self) -> Vec<&'static str> {
        self.graphs.captured()
    }

    /// Runs `body` as `region` (plain launches or its CUDA graph), timed
    /// as one phase when profiling.
    fn region(
        &mut self,
        region: Region,
        body: impl Fn(&GpuEngine) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let start = self.profiler.mark(&self.dev)?;
        let mut graphs = std::mem::replace(&mut self.graphs, Graphs::off());
        let this: &GpuEngine = self;
        let ran = graphs.run(&this.dev, region, || body(this));
        self.graphs = graphs;
        ran?;
        self.profiler.span(&self.dev, region.name(), start)
    }

    /// The network over the live weights (`eval`: the evaluation weights).
    fn net(&self, eval: bool) -> Net<'_> {
        Net {
            dev: &self.dev,
            dm: self.dm,
            eps: self.arch.rms_norm_eps as f32,
            w: if eval {
                self.w.eval_bf16()
            } else {
                &self.w.bf16
            },
            off: &self.off,
            num_puzzle_ids: self.arch.num_puzzle_identifiers,
            cos: &self.acts.cos,
            sin: &self.acts.sin,
        }
    }

    /// Sends the batch's tokens and puzzle ids.
    fn upload_batch(&self, batch: &Batch<'_>) -> Result<(), EngineError> {
        batch.validate(&self.arch)?;
        if batch.b != self.dm.b {
            return Err(TrmError::BatchShape {
                what: "engine batch",
                got: batch.b,
                expected: self.dm.b,
                batch: self.dm.b,
            }
            .into());
        }
        self.dev.write(&self.acts.tokens, batch.inputs)?;
        self.dev.write(&self.acts.puzzle_ids, batch.puzzle_ids)?;
        Ok(())
    }

    /// The input embeddings of the uploaded batch into `acts.x`, with the
    /// token table of the live or the evaluation weights.
    fn embed_inputs(&self, eval: bool) -> Result<(), CudaError> {
        let table = if eval {
            self.w.eval_bf16()
        } else {
            &self.w.bf16
        };
        let n = self.dm.v * self.dm.d;
        self.dev
            .copy((&self.w.embed, 0), (table, self.off.embed), n)?;
        net::input_embedding_forward(&self.net(eval), &self.acts, &self.w.embed, &self.w.puzzle)
    }

    /// Restarts the slots flagged by the last `reset_halted`.
    fn apply_pending_reset(&mut self) -> Result<(), CudaError> {
        if let Some(halted) = self.pending_reset.take() {
            let flags: Vec<i32> = halted.iter().map(|&h| h as i32).collect();
            self.reset_slots(&flags, false)?;
        }
        Ok(())
    }

    /// `z = init` in the slots whose flag is set, of the training carry or
    /// (`side`) the bootstrap / evaluation carry.
    fn reset_slots(&self, flags: &[i32], side: bool) -> Result<(), CudaError> {
        let dims = (self.dm.b, self.dm.s, self.dm.d);
        self.dev.write(&self.acts.halted, flags)?;
        let (z_h, z_l) = if side {
            (&self.acts.side_h, &self.acts.side_l)
        } else {
            (&self.acts.z_h, &self.acts.z_l)
        };
        carry_reset(&self.dev, z_h, &self.w.h_init, &self.acts.halted, dims)?;
        carry_reset(&self.dev, z_l, &self.w.l_init, &self.acts.halted, dims)
    }

    /// The Q bias of the live (or the evaluation) weights.
    fn q_bias(&mut self, eval: bool) -> Result<[f32; 2], CudaError> {
        if !eval || self.w.ema.is_none() {
            if let Some(b) = self.q_bias {
                return Ok(b);
            }
        }
        let src = if eval {
            self.w.eval_master()
        } else {
            &self.w.master
        };
        let v = self.dev.download_range(src, self.off.q_b, 2)?;
        let b = [v[0], v[1]];
        if !eval || self.w.ema.is_none() {
            self.q_bias = Some(b);
        }
        Ok(b)
    }

    /// `acts.q` read back, with the bias.
    fn read_q(&mut self, eval: bool) -> Result<Vec<f32>, CudaError> {
        let bias = self.q_bias(eval)?;
        let mut q = self.dev.download(&self.acts.q)?;
        for pair in q.chunks_mut(2) {
            pair[0] += bias[0];
            pair[1] += bias[1];
        }
        Ok(q)
    }

    /// The logits `[B, S, V]` on the device as the host's `[B, seq, V]` f32.
    fn read_logits(&self) -> Result<Vec<f32>, CudaError> {
        let dm = &self.dm;
        let all = self.dev.download(&self.acts.logits)?;
        let mut out = Vec::with_capacity(dm.b * dm.seq * dm.v);
        for b in 0..dm.b {
            let from = (b * dm.s + dm.p) * dm.v;
            out.extend(all[from..from + dm.seq * dm.v].iter().map(|x| x.to_f32()));
        }
        Ok(out)
    }

    /// The labels over all `S` positions: ignored at the puzzle positions.
    fn full_labels(&self, labels: &[i32]) -> Vec<i32> {
        let dm = &self.dm;
        let mut out = Vec::with_capacity(dm.m());
        for b in 0..dm.b {
            out.extend(std::iter::repeat_n(IGNORE_LABEL, dm.p));
            out.extend_from_slice(&labels[b * dm.seq..(b + 1) * dm.seq]);
        }
        out
    }

    fn inner_step_impl(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>, EngineError> {
        self.upload_batch(batch)?;
        self.apply_pending_reset()?;
        let (h, l) = (self.arch.h_cycles, self.arch.l_cycles);
        self.region(Region::Nograd, |e| {
            e.embed_inputs(false)?;
            let acts = &e.acts;
            net::nograd_cycles(
                &e.net(false),
                &acts.z_h,
                &acts.z_l,
                h.saturating_sub(1),
                l,
                acts,
            )
        })?;
        self.region(Region::GradForward, |e| {
            let (net, acts) = (e.net(false), &e.acts);
            net::grad_cycle(&net, l, acts)?;
            net::heads_forward(&net, net::grad_cycle_z_h(acts, l), acts)
        })?;
        let q = self.read_q(false)?;
        self.last_q = q.clone();
        self.phase = Phase::Forward;
        Ok(q)
    }

    fn bootstrap_q_impl(&mut self) -> Result<Vec<f32>, EngineError> {
        if self.phase != Phase::Forward {
            return Err(TrmError::StepOrder.into());
        }
        let md = self.dm.m() * self.dm.d;
        let (h, l) = (self.arch.h_cycles, self.arch.l_cycles);
        self.region(Region::Bootstrap, |e| {
            let (net, acts) = (e.net(false), &e.acts);
            e.dev.copy((&acts.side_h, 0), (&acts.z_h, 0), md)?;
            e.dev.copy((&acts.side_l, 0), (&acts.z_l, 0), md)?;
            net::nograd_cycles(&net, &acts.side_h, &acts.side_l, h, l, acts)?;
            net::q_head_forward(&net, &acts.side_h, &acts.q)
        })?;
        Ok(self.read_q(false)?)
    }

    fn loss_and_backward_impl(
        &mut self,
        batch: &Batch<'_>,
        target: Option<&[f64]>,
    ) -> Result<LossOut, EngineError> {
        if self.phase != Phase::Forward {
            return Err(TrmError::StepOrder.into());
        }
        let dm = self.dm;
        let start = self.profiler.mark(&self.dev)?;
        let acts = &self.acts;
        self.dev
            .write(&acts.labels, &self.full_labels(batch.labels))?;
        let outs = CeOutputs {
            sample_loss: Some(&acts.sample_loss),
            count: Some(&acts.count),
            correct: Some(&acts.correct),
            seq_correct: Some(&acts.seq_correct),
            ..CeOutputs::default()
        };
        let (b, s, v) = (dm.b, dm.s, dm.v);
        stablemax_ce_forward(&self.dev, &acts.logits, Some(&acts.labels), outs, b, s, v)?;
        let sample_loss = self.dev.download(&acts.sample_loss)?;
        let counts = self.dev.download(&acts.count)?;
        let correct = self.dev.download(&acts.correct)?;
        let seq_correct: Vec<bool> = self
            .dev
            .download(&acts.seq_correct)?
            .iter()
            .map(|&c| c != 0)
            .collect();
        let lm_loss: f64 = sample_loss.iter().map(|&x| x as f64).sum();
        let (q_halt_loss, q_continue_loss, dq) = q_head_loss(&self.last_q, &seq_correct, target);
        let dq16: Vec<bf16> = dq.iter().map(|&x| bf16::from_f32(x)).collect();
        self.dev.write(&acts.dq, &dq16)?;
        self.profiler.span(&self.dev, "loss", start)?;
        let l = self.arch.l_cycles;
        if self.dp.is_some() {
            self.split_backward(l, b, s, v)?;
        } else {
            self.region(Region::Backward, |e| {
                e.ce_backward_and_zero_grad(b, s, v)?;
                let gs = GradSink {
                    grad: &e.w.grad,
                    off: &e.off,
                };
                net::inner_backward(&e.net(false), l, &e.acts, &gs)
            })?;
        }
        let acts = &self.acts;
        // The two gradients that are not GEMM outputs: the Q bias (summed
        // here) and the token table (from the embedding kernel).
        let db = [
            dq.iter().step_by(2).sum::<f32>(),
            dq.iter().skip(1).step_by(2).sum::<f32>(),
        ];
        self.dev.write_at(&self.w.grad, self.off.q_b, &db)?;
        self.dev.copy(
            (&self.w.grad, self.off.embed),
            (&acts.dembed, 0),
            dm.v * dm.d,
        )?;
        self.start_buckets(Ready::End);
        self.phase = Phase::Backward;
        Ok(LossOut {
            loss: lm_loss + 0.5 * (q_halt_loss + q_continue_loss),
            lm_loss,
            q_halt_loss,
            q_continue_loss,
            counts: counts.iter().map(|&c| c.max(0) as usize).collect(),
            seq_correct,
            correct: correct.iter().map(|&c| c.max(0) as usize).collect(),
        })
    }

    /// The CE backward into `acts.dlogits` (dq is already a GEMM operand),
    /// and the gradient buffer zeroed for the backward's accumulation.
    fn ce_backward_and_zero_grad(&self, b: usize, s: usize, v: usize) -> Result<(), CudaError> {
        let acts = &self.acts;
        // dlogits of the summed per-sample means
        stablemax_ce_backward(
            &self.dev,
            &acts.dlogits,
            &acts.logits,
            &acts.labels,
            &acts.count,
            1.0,
            b,
            s,
            v,
        )?;
        self.dev.zero(&self.w.grad)
    }

    /// The backward in parts, each layer's gradient buckets started as soon
    /// as the first L call's backward has finished that layer.
    fn split_backward(
        &mut self,
        l: usize,
        b: usize,
        s: usize,
        v: usize,
    ) -> Result<(), EngineError> {
        // A backward whose reduction no optimizer step waited for (a step
        // trace, a test): its operations finish before the buffer is reused.
        self.settle_reduction()?;
        self.region(Region::BackwardUntilLastCall, |e| {
            e.ce_backward_and_zero_grad(b, s, v)?;
            let gs = GradSink {
                grad: &e.w.grad,
                off: &e.off,
            };
            net::inner_backward_until_last_call(&e.net(false), l, &e.acts, &gs)
        })?;
        for layer in (0..self.arch.l_layers).rev() {
            self.region(Region::BackwardLayer(layer), |e| {
                let gs = GradSink {
                    grad: &e.w.grad,
                    off: &e.off,
                };
                net::last_call_layer_backward(&e.net(false), &e.acts, &gs, layer)
            })?;
            self.start_buckets(Ready::Layer(layer));
        }
        Ok(self.region(Region::BackwardTail, |e| {
            net::inner_backward_tail(&e.net(false), l, &e.acts)
        })?)
    }

    /// Starts the all-reduce of the buckets final at `ready` (data parallel
    /// only); a failure is kept for the optimizer step to report.
    fn start_buckets(&mut self, ready: Ready) {
        let Some(dp) = &mut self.dp else { return };
        if dp.failed.is_some() {
            return;
        }
        for bucket in self.buckets.ready_at(ready) {
            if let Err(e) = dp
                .dc
                .start_all_reduce(&self.dev, &self.w.grad, bucket.range.clone())
            {
                dp.failed = Some(e);
                return;
            }
        }
        dp.started = true;
    }

    /// Waits for reductions no optimizer step waited for.
    fn settle_reduction(&mut self) -> Result<(), EngineError> {
        if let Some(dp) = &mut self.dp {
            if let Some(e) = dp.failed.take() {
                return Err(e.into());
            }
            if dp.started {
                dp.started = false;
                dp.dc.finish(&self.dev)?;
            }
        }
        Ok(())
    }

    /// Takes up the collective's device side (once): every rank must run
    /// the same local batch, since the device gathers have fixed sizes.
    fn adopt(
        &mut self,
        dc: Arc<dyn DeviceCollective>,
        coll: &dyn Collective,
    ) -> Result<(), EngineError> {
        let world = dc.world_size();
        if world != coll.world_size() {
            return Err(EngineError::State(format!(
                "the collective counts {} ranks, its device side {world}",
                coll.world_size()
            )));
        }
        let b = self.dm.b;
        let batches: Vec<u64> = coll
            .all_gather_bytes(&(b as u64).to_le_bytes())?
            .iter()
            .map(|p| {
                p.get(..8)
                    .and_then(|s| s.try_into().ok())
                    .map_or(0, u64::from_le_bytes)
            })
            .collect();
        if batches.iter().any(|&x| x != b as u64) {
            return Err(EngineError::State(format!(
                "the ranks run local batches of {batches:?}; data parallel training on the \
                 device needs the same on every rank"
            )));
        }
        let ndim = self.dm.ndim;
        self.dp = Some(DataParallel {
            ids: self.dev.zeros(world * b)?,
            rows: self.dev.zeros(world * b * ndim.max(1))?,
            dc,
            started: false,
            failed: None,
        });
        Ok(())
    }

    fn eval_steps_impl(
        &mut self,
        batch: &Batch<'_>,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        self.upload_batch(batch)?;
        self.w.refresh_eval(&self.dev)?;
        self.embed_inputs(true)?;
        self.reset_slots(&vec![1; self.dm.b], true)?;
        let (h, l) = (self.arch.h_cycles, self.arch.l_cycles);
        // Every step is a full inner forward without gradient: H cycles.
        for _ in 0..n.max(1) {
            self.region(Region::EvalStep, |e| {
                let acts = &e.acts;
                net::nograd_cycles(&e.net(true), &acts.side_h, &acts.side_l, h, l, acts)
            })?;
        }
        let acts = &self.acts;
        net::heads_forward(&self.net(true), &acts.side_h, acts)?;
        let q = self.read_q(true)?;
        Ok((self.read_logits()?, q))
    }

    fn optimizer_step_impl(
        &mut self,
        up: &OptimStep,
        puzzle_ids: &[i32],
        coll: &dyn Collective,
    ) -> Result<(), EngineError> {
        if self.phase != Phase::Backward {
            return Err(TrmError::StepOrder.into());
        }
        self.phase = Phase::Idle;
        let start = self.profiler.mark(&self.dev)?;
        self.optimizer_updates(up, puzzle_ids, coll)?;
        Ok(self.profiler.span(&self.dev, "optimizer", start)?)
    }

    /// AdamATan2 and EMA on the dense weights, sign-SGD on the puzzle rows,
    /// after the gradients are summed over ranks (on the device when the
    /// collective offers it, else through the host).
    fn optimizer_updates(
        &mut self,
        up: &OptimStep,
        puzzle_ids: &[i32],
        coll: &dyn Collective,
    ) -> Result<(), EngineError> {
        if self.dp.is_none() {
            if let Some(dc) = coll.device() {
                self.adopt(dc, coll)?;
            }
        }
        let n = self.layout.len;
        let ndim = self.dm.ndim;
        let rows = self.dm.b * ndim;
        if ndim > 0 {
            scale_f32(&self.dev, &self.acts.dpuzzle, up.grad_scale, rows)?;
        }
        // The puzzle rows to apply: (ids, rows, count).
        let mut host_rows: Option<(Buffer<i32>, Buffer<f32>, usize)> = None;
        if self.dp.is_some() {
            self.reduce_on_device(puzzle_ids)?;
            if up.update_dense {
                // Summed first, then scaled: the same values as scaling
                // first up to rounding.
                scale_f32(&self.dev, &self.w.grad, up.grad_scale, n)?;
            }
        } else {
            if up.update_dense {
                scale_f32(&self.dev, &self.w.grad, up.grad_scale, n)?;
                if coll.world_size() > 1 {
                    // A collective without device buffers: through the host.
                    let mut flat = self.dev.download(&self.w.grad)?;
                    coll.all_reduce_sum(&mut flat)?;
                    self.dev.write(&self.w.grad, &flat)?;
                }
            }
            if ndim > 0 {
                if coll.world_size() > 1 {
                    let local = self.dev.download_range(&self.acts.dpuzzle, 0, rows)?;
                    let (ids, all) = coll.all_gather_rows(puzzle_ids, &local)?;
                    host_rows = Some((self.dev.upload(&ids)?, self.dev.upload(&all)?, ids.len()));
                } else {
                    self.dev.write(&self.acts.puzzle_ids, puzzle_ids)?;
                }
            }
        }
        let dev = &self.dev;
        if up.update_dense {
            self.adam_steps += 1;
            let step = u32::try_from(self.adam_steps)
                .map_err(|_| EngineError::State("more than 2^32 optimiser steps".into()))?;
            let a = &self.cfg.adam;
            let h = AdamAtan2Step {
                lr: up.lr,
                beta1: a.beta1,
                beta2: a.beta2,
                weight_decay: a.weight_decay,
                step,
            };
            let w = &self.w;
            adam_atan2(
                dev,
                &w.master,
                &w.adam_m,
                &w.adam_v,
                &w.grad,
                Some(&w.bf16),
                h,
            )?;
            if let (Some(shadow), Some(rate)) = (&w.ema, self.cfg.ema_rate) {
                ema(dev, shadow, &w.master, rate)?;
            }
            self.w.ema_bf16_fresh = false;
            self.q_bias = None;
        }
        if ndim > 0 {
            let (ids, grads, count) = match (&host_rows, &self.dp) {
                (Some((i, r, c)), _) => (i, r, *c),
                (None, Some(dp)) => (&dp.ids, &dp.rows, dp.dc.world_size() * self.dm.b),
                (None, None) => (&self.acts.puzzle_ids, &self.acts.dpuzzle, self.dm.b),
            };
            puzzle_sign_sgd(
                &self.dev,
                &self.w.puzzle,
                grads,
                ids,
                count,
                ndim,
                self.arch.num_puzzle_identifiers,
                up.puzzle_emb_lr,
                self.cfg.puzzle_emb_weight_decay,
            )?;
        }
        Ok(())
    }

    /// The device side of data parallel: the gradient buffer summed over
    /// ranks (the buckets the backward started, or the whole buffer when
    /// it started none, as in the first step) and every rank's puzzle ids
    /// and (scaled) rows gathered; waits for all of it within the
    /// collective's deadline.
    fn reduce_on_device(&mut self, puzzle_ids: &[i32]) -> Result<(), EngineError> {
        let Some(dp) = &mut self.dp else {
            return Ok(());
        };
        if let Some(e) = dp.failed.take() {
            return Err(e.into());
        }
        let dev = &self.dev;
        if !dp.started {
            dp.dc
                .start_all_reduce(dev, &self.w.grad, 0..self.layout.len)?;
        }
        dp.started = false;
        let b = self.dm.b;
        let ndim = self.dm.ndim;
        if ndim > 0 {
            dev.write(&self.acts.puzzle_ids, puzzle_ids)?;
            dp.dc
                .start_all_gather_i32(dev, &self.acts.puzzle_ids, b, &dp.ids)?;
            dp.dc
                .start_all_gather_f32(dev, &self.acts.dpuzzle, b * ndim, &dp.rows)?;
        }
        dp.dc.finish(dev)?;
        Ok(())
    }

    /// The carry on the host, with a pending reset applied.
    fn carry_host(&self) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let widen = |v: Vec<bf16>| v.into_iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let mut z_h = widen(self.dev.download(&self.acts.z_h)?);
        let mut z_l = widen(self.dev.download(&self.acts.z_l)?);
        if let Some(halted) = &self.pending_reset {
            let (s, d) = (self.dm.s, self.dm.d);
            let round = |v: &[f32]| {
                v.iter()
                    .map(|&x| bf16::from_f32(x).to_f32())
                    .collect::<Vec<_>>()
            };
            let (hi, li) = (round(&self.template.h_init), round(&self.template.l_init));
            for (b, _) in halted.iter().enumerate().filter(|(_, &h)| h) {
                for t in 0..s {
                    let r = (b * s + t) * d;
                    z_h[r..r + d].copy_from_slice(&hi);
                    z_l[r..r + d].copy_from_slice(&li);
                }
            }
        }
        Ok((z_h, z_l))
    }

    /// Host weights from a flat f32 buffer on the device, with the live
    /// puzzle table.
    fn params_from(&self, flat: &Buffer<f32>) -> Result<Params<f32>, CudaError> {
        let mut p = self.template.clone();
        let compact = self.layout.unpad(&self.dev.download(flat)?);
        self.layout.compact.unflatten(&compact, &mut p);
        if self.dm.ndim > 0 {
            p.puzzle_emb = self.dev.download(&self.w.puzzle)?;
        }
        Ok(p)
    }

    fn export_state_impl(&self) -> Result<EngineState, EngineError> {
        let (z_h, z_l) = self.carry_host()?;
        Ok(EngineState {
            params: self.params_from(&self.w.master)?,
            adam_m: self.layout.unpad(&self.dev.download(&self.w.adam_m)?),
            adam_v: self.layout.unpad(&self.dev.download(&self.w.adam_v)?),
            optimizer_steps: self.adam_steps,
            ema: match &self.w.ema {
                Some(e) => Some(self.layout.unpad(&self.dev.download(e)?)),
                None => None,
            },
            z_h,
            z_l,
        })
    }

    fn import_state_impl(&mut self, st: EngineState) -> Result<(), EngineError> {
        let n = self.dm.m() * self.dm.d;
        if st.z_h.len() != n || st.z_l.len() != n {
            return Err(EngineError::State(format!(
                "the carry has {} values, expected {n}",
                st.z_h.len()
            )));
        }
        let len = self.layout.compact.len;
        for (what, v) in [("Adam m", &st.adam_m), ("Adam v", &st.adam_v)] {
            if v.len() != len {
                return Err(EngineError::State(format!(
                    "{what} has {} values, expected {len}",
                    v.len()
                )));
            }
        }
        let p = &st.params;
        let table = self.arch.num_puzzle_identifiers * self.dm.ndim;
        if p.puzzle_emb.len() != table || p.h_init.len() != self.dm.d || p.l_init.len() != self.dm.d
        {
            return Err(EngineError::State(
                "the checkpoint's weights do not fit this model's config".into(),
            ));
        }
        let dev = &self.dev;
        let w = &self.w;
        let layout = &self.layout;
        dev.write(&w.master, &layout.pad(&layout.compact.flatten(p)))?;
        cast_f32_to_bf16(dev, &w.bf16, &w.master)?;
        dev.write(&w.adam_m, &layout.pad(&st.adam_m))?;
        dev.write(&w.adam_v, &layout.pad(&st.adam_v))?;
        match (&w.ema, &st.ema) {
            (Some(e), Some(shadow)) if shadow.len() == len => dev.write(e, &layout.pad(shadow))?,
            (Some(_), Some(_)) => {
                return Err(EngineError::State("the EMA shadow does not fit".into()))
            }
            (Some(_), None) => {
                return Err(EngineError::State(
                    "the run uses EMA but the checkpoint has no EMA shadow".into(),
                ))
            }
            _ => {}
        }
        if table > 0 {
            dev.write(&w.puzzle, &p.puzzle_emb)?;
        }
        let to16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        dev.write(&w.h_init, &to16(&p.h_init))?;
        dev.write(&w.l_init, &to16(&p.l_init))?;
        dev.write(&self.acts.z_h, &to16(&st.z_h))?;
        dev.write(&self.acts.z_l, &to16(&st.z_l))?;
        self.template = Params {
            puzzle_emb: Vec::new(),
            ..st.params
        };
        self.adam_steps = st.optimizer_steps;
        self.w.ema_bf16_fresh = false;
        self.q_bias = None;
        self.pending_reset = None;
        self.phase = Phase::Idle;
        Ok(())
    }

    fn step_trace_impl(&self) -> Result<StepTrace, EngineError> {
        if self.phase != Phase::Backward {
            return Err(TrmError::StepOrder.into());
        }
        // Data parallel: the gradients summed over ranks (not yet scaled);
        // a later finish of the same operations is free.
        if let Some(dp) = self.dp.as_ref().filter(|dp| dp.started) {
            dp.dc.finish(&self.dev)?;
        }
        let flat = self.dev.download(&self.w.grad)?;
        let mut grads = Grads::zeros_like(&self.template, &self.dm);
        for (name, &off) in self.layout.compact.names.iter().zip(&self.layout.offsets) {
            if let Some(g) = grads.dense_mut(name) {
                let len = g.len();
                g.copy_from_slice(&flat[off..off + len]);
            }
        }
        if self.dm.ndim > 0 {
            grads.puzzle_local =
                self.dev
                    .download_range(&self.acts.dpuzzle, 0, self.dm.b * self.dm.ndim)?;
        }
        let (z_h, z_l) = self.carry_host()?;
        Ok(StepTrace {
            logits: self.read_logits()?,
            z_h,
            z_l,
            grads,
        })
    }
}

/// The bucket plan of `layout`: each layer's range runs from its first
/// tensor to the next layer's (padding included).
fn bucket_plan(layout: &DeviceLayout, off: &Offsets, min_bytes: usize) -> BucketPlan {
    let starts: Vec<usize> = off
        .layers
        .iter()
        .map(|l| l.qkv.min(l.o).min(l.gate_up).min(l.down))
        .collect();
    let layers: Vec<std::ops::Range<usize>> = starts
        .iter()
        .enumerate()
        .map(|(i, &a)| a..starts.get(i + 1).copied().unwrap_or(layout.len))
        .collect();
    // The prefix must hold only what is final at the end.
    let first_layer = starts.first().copied().unwrap_or(layout.len);
    let prefix_ok = [off.embed, off.lm_head, off.q_w, off.q_b]
        .iter()
        .all(|&o| o < first_layer);
    if !prefix_ok {
        return BucketPlan::new(layout.len, &[], 0);
    }
    BucketPlan::new(layout.len, &layers, min_bytes / std::mem::size_of::<f32>())
}

/// Bytes [`DeviceWeights::upload`] will allocate.
fn weights_bytes(layout: &DeviceLayout, params: &Params<f32>, ema: bool) -> usize {
    let n = layout.len;
    // master, grad, m, v in f32; the bf16 copy; with EMA the shadow and its bf16 copy
    let flat = n * (4 * 4 + 2) + if ema { n * 6 } else { 0 };
    flat + params.puzzle_emb.len().max(1) * 4
        + (params.h_init.len() + params.l_init.len() + params.embed.len()) * 2
}

/// Refuses a plan that does not fit the device's free memory, naming the
/// largest local batch that would.
fn check_fits(dev: &Device, shape: &PlanShape, weight_bytes: usize) -> Result<(), EngineError> {
    let (free, total) = dev.memory_info()?;
    let need = shape.bytes() + weight_bytes + HEADROOM_BYTES;
    if need <= free {
        return Ok(());
    }
    let budget = free.saturating_sub(weight_bytes + HEADROOM_BYTES);
    let fits = shape.largest_batch(budget);
    Err(EngineError::State(format!(
        "local batch {} needs {:.1} GiB on {} ({:.1} GiB of activations, {:.1} GiB of \
         parameters and optimiser state, {:.1} GiB kept free) but {:.1} of {:.1} GiB are free; \
         the largest local batch that fits is {fits}",
        shape.dm.b,
        gib(need),
        dev.name(),
        gib(shape.bytes()),
        gib(weight_bytes),
        gib(HEADROOM_BYTES),
        gib(free),
        gib(total),
    )))
}

/// A device failure in a call whose trait signature has only model errors.
fn model_error(e: EngineError) -> TrmError {
    match e {
        EngineError::Model(e) => e,
        other => TrmError::Device(other.to_string()),
    }
}

impl ActNet<f32> for GpuEngine {
    fn inner_step(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>, TrmError> {
        self.inner_step_impl(batch).map_err(model_error)
    }

    fn bootstrap_q(&mut self, _batch: &Batch<'_>) -> Result<Vec<f32>, TrmError> {
        self.bootstrap_q_impl().map_err(model_error)
    }

    fn loss_and_backward(
        &mut self,
        batch: &Batch<'_>,
        target: Option<&[f64]>,
    ) -> Result<LossOut, TrmError> {
        self.loss_and_backward_impl(batch, target)
            .map_err(model_error)
    }
}

impl EvalNet for GpuEngine {
    fn eval_steps(
        &mut self,
        batch: &Batch<'_>,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), TrmError> {
        self.eval_steps_impl(batch, n).map_err(model_error)
    }
}

impl Engine for GpuEngine {
    fn device_name(&self) -> String {
        format!("{} ({})", self.dev.name(), self.memory_summary())
    }

    fn step_trace(&self) -> Result<StepTrace, EngineError> {
        self.step_trace_impl()
    }

    fn device_memory_used(&self) -> Option<usize> {
        // On a GPU: the whole device's use (ours and any other process's).
        let (free, total) = self.dev.memory_info().ok()?;
        (total != usize::MAX).then(|| total.saturating_sub(free))
    }

    fn reset_halted(&mut self, halted: &[bool]) -> Result<(), EngineError> {
        if halted.len() != self.dm.b {
            return Err(EngineError::State(format!(
                "{} halted flags for a batch of {}",
                halted.len(),
                self.dm.b
            )));
        }
        // Applied on the device at the next inner step (the only reader).
        self.pending_reset = Some(halted.to_vec());
        Ok(())
    }

    fn optimizer_step(
        &mut self,
        update: &OptimStep,
        puzzle_ids: &[i32],
        coll: &dyn Collective,
    ) -> Result<(), EngineError> {
        self.optimizer_step_impl(update, puzzle_ids, coll)
    }

    fn params(&self) -> Result<Params<f32>, EngineError> {
        Ok(self.params_from(&self.w.master)?)
    }

    fn eval_params(&self) -> Result<Params<f32>, EngineError> {
        Ok(self.params_from(self.w.eval_master())?)
    }

    fn export_state(&self) -> Result<EngineState, EngineError> {
        self.export_state_impl()
    }

    /// Only the carry: ranks other than 0 need no copy of the weights or of
    /// the puzzle table (2.4 GB at the ARC config) at a checkpoint.
    fn export_carry(&self) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        Ok(self.carry_host()?)
    }

    fn import_state(&mut self, state: EngineState) -> Result<(), EngineError> {
        self.import_state_impl(state)
    }
}
