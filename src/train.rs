//! The training driver (spec sections 5-8): the ACT carry across steps,
//! halting with seeded exploration, the loss head, AdamATan2 on the dense
//! weights, sparse sign-SGD on the puzzle-embedding rows, the LR schedule,
//! EMA, evaluation every `eval_interval` epochs, full-state checkpoints with
//! an exact resume, and telemetry.
//!
//! Design rule: one step is `carry update -> forward -> loss -> backward ->
//! collectives -> optimisers`, and everything a rank exchanges goes through
//! [`Collective`]: the dense gradients as ONE flat buffer (the layout of
//! [`FlatLayout`], the reference's parameter order), the puzzle-embedding
//! rows as (ids, rows), metrics as sums. The master weights live in that
//! flat f32 buffer; the model's typed [`Params`] are refreshed from it after
//! each update. Everything random (exploration, data order) is seeded and
//! its position saved, so a resumed run continues bit-identically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointContents, CheckpointDir, CheckpointError, TrainState};
use crate::config::{RunConfig, Schedule};
use crate::data::loader::{
    Batch as LoaderBatch, LoaderError, LoaderState, PuzzleDataset, PuzzleDatasetConfig, Split,
};
use crate::dist::{Collective, SingleProcess};
use crate::loss::StepMetrics;
use crate::model::config::ArchConfig;
use crate::model::trm::{
    act_loss, broadcast_init, halts, inner_backward, inner_forward, q_continue_target, Ctx, Params,
    TrmError,
};
use crate::model::weights::{expected_shapes, trainable_names, Weights, PUZZLE_EMB};
use crate::optim::{AdamAtan2, AdamAtan2Config, Ema, OptimError, SparseSignSgd};
use crate::telemetry::metrics::MetricsWriter;
use crate::telemetry::progress::{Progress, ProgressMode};
use crate::telemetry::tensorboard::EventWriter;
use crate::telemetry::TelemetryError;
use crate::tensor::Tensor;

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("dataset: {0}")]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Model(#[from] TrmError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error("telemetry: {0}")]
    Telemetry(#[from] TelemetryError),
    #[error("ARC evaluator: {0}")]
    Eval(#[from] crate::eval::EvalError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the loss is not finite at step {step} (lm_loss {lm_loss}, q_halt_loss {q_halt_loss}, lr {lr:e}); \
         stopped before updating the weights. The last good checkpoint is kept; \
         try a lower lr or a longer warm-up"
    )]
    NonFinite {
        step: u64,
        lm_loss: f64,
        q_halt_loss: f64,
        lr: f64,
    },
    #[error("cannot resume from {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error(transparent)]
    Collective(#[from] crate::dist::CollectiveError),
    #[error(transparent)]
    Folder(#[from] crate::run_folder::FolderError),
    #[error(
        "this run would train 0 steps: the dataset gives {batches} full batches of \
         global_batch_size {global} per epoch; lower global_batch_size or use a larger dataset"
    )]
    NoSteps { batches: u64, global: usize },
    #[error("global_batch_size {global} is not divisible by the {world} ranks")]
    BatchSplit { global: usize, world: usize },
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
}

type Result<T> = std::result::Result<T, TrainError>;

/// How to run (what is not in the config).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// `None` = start fresh; `"latest"` = the newest checkpoint of this run's
    /// folder; else a checkpoint folder.
    pub resume: Option<String>,
    /// A progress bar (plain lines when stderr is not a terminal).
    pub progress: bool,
    /// Print the schedule and per-evaluation summaries.
    pub verbose: bool,
    /// A fresh run into a folder holding a run moves that run aside
    /// (else it is refused).
    pub start_over: bool,
    /// Catch SIGTERM/SIGINT (with `checkpoint_on_signal`): checkpoint and stop.
    pub handle_signals: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            resume: None,
            progress: true,
            verbose: true,
            start_over: false,
            handle_signals: false,
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub total_steps: u64,
    /// Steps run by this process (after a resume: only the new ones).
    pub steps_run: u64,
    /// Per step run: (step, the logged train metrics).
    pub train_log: Vec<(u64, Vec<(String, f64)>)>,
    /// Per evaluation: (step, metrics).
    pub eval_log: Vec<(u64, Vec<(String, f64)>)>,
    pub checkpoints: Vec<PathBuf>,
    pub seconds: f64,
    /// The signal that stopped the run early (its checkpoint is the last one).
    pub stopped_by: Option<i32>,
}

impl TrainReport {
    /// The value of `key` in the last evaluation that logged it.
    pub fn last_eval(&self, key: &str) -> Option<f64> {
        self.eval_log
            .iter()
            .rev()
            .find_map(|(_, m)| m.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
    }
}

// ---------------------------------------------------------------------------
// flat layout of the dense weights

/// The dense trainable tensors in the reference's parameter order, and
/// where each sits in the flat buffer.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub offsets: Vec<usize>,
    pub len: usize,
}

impl FlatLayout {
    pub fn new(arch: &ArchConfig) -> FlatLayout {
        let shapes: BTreeMap<String, Vec<usize>> = expected_shapes(arch)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        let names = trainable_names(arch);
        let mut offsets = Vec::with_capacity(names.len());
        let mut len = 0;
        let mut shp = Vec::with_capacity(names.len());
        for n in &names {
            offsets.push(len);
            let s = shapes[n].clone();
            len += s.iter().product::<usize>();
            shp.push(s);
        }
        FlatLayout {
            names,
            shapes: shp,
            offsets,
            len,
        }
    }

    /// Copies the dense weights of `p` into one flat buffer.
    pub fn flatten(&self, p: &Params<f32>) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len);
        for n in &self.names {
            out.extend_from_slice(p.dense(n).expect("layout names come from the config"));
        }
        out
    }

    /// Writes a flat buffer back into the typed weights.
    pub fn unflatten(&self, flat: &[f32], p: &mut Params<f32>) {
        for (n, &off) in self.names.iter().zip(&self.offsets) {
            let dst = p.dense_mut(n).expect("layout names come from the config");
            let len = dst.len();
            dst.copy_from_slice(&flat[off..off + len]);
        }
    }

    /// A flat buffer as reference-named tensors.
    pub fn to_map(&self, flat: &[f32], prefix: &str) -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        for ((n, s), &off) in self.names.iter().zip(&self.shapes).zip(&self.offsets) {
            let len: usize = s.iter().product();
            m.insert(
                format!("{prefix}{n}"),
                Tensor::new(s, flat[off..off + len].to_vec()),
            );
        }
        m
    }

    /// The inverse of [`FlatLayout::to_map`]; every tensor must be present
    /// with its shape.
    pub fn from_map(
        &self,
        m: &BTreeMap<String, Tensor>,
        prefix: &str,
    ) -> std::result::Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(self.len);
        for (n, s) in self.names.iter().zip(&self.shapes) {
            let key = format!("{prefix}{n}");
            let t = m
                .get(&key)
                .ok_or_else(|| format!("missing tensor `{key}`"))?;
            if &t.shape != s {
                return Err(format!("`{key}` has shape {:?}, expected {s:?}", t.shape));
            }
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// the ACT carry

/// Per batch slot: hidden states, step count, halted flag and the sample it
/// is working on (spec section 5).
#[derive(Debug, Clone, PartialEq)]
pub struct Carry {
    pub z_h: Vec<f32>,
    pub z_l: Vec<f32>,
    pub steps: Vec<i32>,
    pub halted: Vec<bool>,
    pub inputs: Vec<i32>,
    pub labels: Vec<i32>,
    pub puzzle_ids: Vec<i32>,
}

impl Carry {
    /// Every slot halted (so the first step loads a sample into each).
    pub fn new(b: usize, s: usize, seq: usize, d: usize) -> Carry {
        Carry {
            z_h: vec![0.0; b * s * d],
            z_l: vec![0.0; b * s * d],
            steps: vec![0; b],
            halted: vec![true; b],
            inputs: vec![0; b * seq],
            labels: vec![0; b * seq],
            puzzle_ids: vec![0; b],
        }
    }

    /// Halted slots take the batch's sample and restart from `H_init`/`L_init`.
    fn load_halted(&mut self, batch: &LoaderBatch, p: &Params<f32>, s: usize, d: usize) {
        let seq = batch.seq_len;
        for b in 0..self.halted.len() {
            if !self.halted[b] {
                continue;
            }
            let (lo, hi) = (b * seq, (b + 1) * seq);
            self.inputs[lo..hi].copy_from_slice(&batch.inputs[lo..hi]);
            self.labels[lo..hi].copy_from_slice(&batch.labels[lo..hi]);
            self.puzzle_ids[b] = batch.puzzle_identifiers[b];
            for t in 0..s {
                let r = (b * s + t) * d;
                self.z_h[r..r + d].copy_from_slice(&p.h_init);
                self.z_l[r..r + d].copy_from_slice(&p.l_init);
            }
            self.steps[b] = 0;
        }
    }

    fn to_map(&self, b: usize, s: usize, seq: usize, d: usize) -> BTreeMap<String, Tensor> {
        let f = |v: &[i32]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let mut m = BTreeMap::new();
        m.insert("z_H".into(), Tensor::new(&[b, s, d], self.z_h.clone()));
        m.insert("z_L".into(), Tensor::new(&[b, s, d], self.z_l.clone()));
        m.insert("steps".into(), Tensor::new(&[b], f(&self.steps)));
        let halted: Vec<f32> = self.halted.iter().map(|&h| h as u8 as f32).collect();
        m.insert("halted".into(), Tensor::new(&[b], halted));
        m.insert("inputs".into(), Tensor::new(&[b, seq], f(&self.inputs)));
        m.insert("labels".into(), Tensor::new(&[b, seq], f(&self.labels)));
        m.insert(
            "puzzle_identifiers".into(),
            Tensor::new(&[b], f(&self.puzzle_ids)),
        );
        m
    }

    fn from_map(
        m: &BTreeMap<String, Tensor>,
        b: usize,
        s: usize,
        seq: usize,
        d: usize,
    ) -> std::result::Result<Carry, String> {
        let get = |k: &str, n: usize| -> std::result::Result<&[f32], String> {
            let t = m
                .get(k)
                .ok_or_else(|| format!("carry tensor `{k}` missing"))?;
            if t.data.len() != n {
                return Err(format!(
                    "carry tensor `{k}` has {} values, expected {n} (batch size or model changed?)",
                    t.data.len()
                ));
            }
            Ok(&t.data)
        };
        let i = |v: &[f32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        Ok(Carry {
            z_h: get("z_H", b * s * d)?.to_vec(),
            z_l: get("z_L", b * s * d)?.to_vec(),
            steps: i(get("steps", b)?),
            halted: get("halted", b)?.iter().map(|&x| x != 0.0).collect(),
            inputs: i(get("inputs", b * seq)?),
            labels: i(get("labels", b * seq)?),
            puzzle_ids: i(get("puzzle_identifiers", b)?),
        })
    }
}

// ---------------------------------------------------------------------------
// RNG state (serialisable)

/// The halting-exploration stream: a seed and a position, saved with
/// checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RngState {
    seed: u64,
    /// ChaCha word position, as a decimal string (u128 does not fit JSON numbers).
    word_pos: String,
}

fn exploration_rng(seed: u64, rank: usize) -> ChaCha8Rng {
    // A stream of its own, apart from the data order's.
    ChaCha8Rng::seed_from_u64(
        seed ^ 0x5452_4d5f_4558_504c ^ (rank as u64).wrapping_mul(0x9e37_79b9),
    )
}

// ---------------------------------------------------------------------------
// evaluation outputs (for the ARC evaluator)

/// Per evaluated example: what the ARC evaluator needs.
#[derive(Debug, Clone, Default)]
pub struct EvalOutputs {
    pub seq_len: usize,
    /// [N]
    pub puzzle_ids: Vec<i32>,
    /// [N, seq_len]
    pub inputs: Vec<i32>,
    /// [N, seq_len] argmax predictions.
    pub preds: Vec<i32>,
    /// [N] q_halt logits.
    pub q_halt: Vec<f32>,
}

// ---------------------------------------------------------------------------
// the training state

/// Model, optimisers, carry and counters: everything a checkpoint holds.
pub struct TrainerState {
    pub arch: ArchConfig,
    pub layout: FlatLayout,
    pub params: Params<f32>,
    /// fp32 master copy of the dense weights, in `layout` order.
    pub master: Vec<f32>,
    pub adam: AdamAtan2<f32>,
    pub ema: Option<Ema<f32>>,
    pub sign_sgd: SparseSignSgd,
    pub carry: Carry,
    rng: ChaCha8Rng,
    rng_seed: u64,
    pub step: u64,
    /// Train/eval iterations completed.
    pub iters_done: usize,
    ctx: Ctx<f32>,
    local_batch: usize,
}

impl TrainerState {
    /// A fresh state: weights from `init` (seeded), or `weights` when given.
    pub fn new(
        cfg: &RunConfig,
        arch: ArchConfig,
        weights: Weights,
        local_batch: usize,
        rank: usize,
    ) -> Result<TrainerState> {
        let params = Params::<f32>::from_weights(&arch, &weights)?;
        let layout = FlatLayout::new(&arch);
        let master = layout.flatten(&params);
        let adam = AdamAtan2::new(
            layout.len,
            AdamAtan2Config {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                weight_decay: cfg.weight_decay,
            },
        );
        let ema = cfg.ema.then(|| Ema::new(&master, cfg.ema_rate));
        let ctx = Ctx::new(&arch, local_batch);
        let carry = Carry::new(local_batch, ctx.dm.s, ctx.dm.seq, ctx.dm.d);
        Ok(TrainerState {
            layout,
            params,
            master,
            adam,
            ema,
            sign_sgd: SparseSignSgd::new(cfg.puzzle_emb_weight_decay),
            carry,
            rng: exploration_rng(cfg.seed, rank),
            rng_seed: cfg.seed,
            step: 0,
            iters_done: 0,
            ctx,
            local_batch,
            arch,
        })
    }

    /// One training step on `batch` (spec sections 5-7). Returns the step's
    /// metric sums (already reduced over ranks), or `None` past `total_steps`.
    pub fn train_step(
        &mut self,
        cfg: &RunConfig,
        schedule: &Schedule,
        batch: &LoaderBatch,
        coll: &dyn Collective,
    ) -> Result<Option<StepMetrics>> {
        self.step += 1;
        if self.step > schedule.total_steps {
            return Ok(None);
        }
        let arch = &self.arch;
        let dm = self.ctx.dm;
        check_batch_shape(&dm, batch, "inputs")?;
        self.carry.load_halted(batch, &self.params, dm.s, dm.d);
        for s in self.carry.steps.iter_mut() {
            *s += 1;
        }
        let c = &self.carry;
        crate::model::trm::Batch {
            inputs: &c.inputs,
            labels: &c.labels,
            puzzle_ids: &c.puzzle_ids,
            b: dm.b,
        }
        .validate(arch)?;
        let z_h = std::mem::take(&mut self.carry.z_h);
        let z_l = std::mem::take(&mut self.carry.z_l);
        let (out, tape) = inner_forward(
            &self.ctx,
            arch,
            &self.params,
            &self.carry.inputs,
            &self.carry.puzzle_ids,
            z_h,
            z_l,
            arch.h_cycles.saturating_sub(1),
            true,
        );
        let tape = tape.expect("tape requested");
        // halting (spec section 5, training)
        let max = arch.halt_max_steps as i32;
        let mut halted = vec![false; dm.b];
        for (b, h) in halted.iter_mut().enumerate() {
            let steps = self.carry.steps[b];
            let (qh, qc) = (out.q[b * 2], out.q[b * 2 + 1]);
            *h = halts(arch, steps >= max, qh, qc);
            if arch.halt_max_steps > 1 {
                // Both draws happen for every slot, so the stream position
                // does not depend on the outcomes.
                let explore = self.rng.gen::<f64>() < arch.halt_exploration_prob;
                let span = self.rng.gen_range(2..=max.max(2));
                let min_steps = if explore { span } else { 0 };
                *h &= steps >= min_steps;
            }
        }
        // Q-continue bootstrap target (only without no_ACT_continue).
        let target = if !arch.no_act_continue && arch.halt_max_steps > 1 {
            let (next, _) = inner_forward(
                &self.ctx,
                arch,
                &self.params,
                &self.carry.inputs,
                &self.carry.puzzle_ids,
                out.z_h.clone(),
                out.z_l.clone(),
                arch.h_cycles.saturating_sub(1),
                false,
            );
            Some(
                (0..dm.b)
                    .map(|b| {
                        let last = self.carry.steps[b] >= max;
                        q_continue_target(next.q[b * 2], next.q[b * 2 + 1], last)
                    })
                    .collect::<Vec<f64>>(),
            )
        } else {
            None
        };
        let (loss, dlogits, dq) = act_loss(
            &dm,
            &out.logits,
            &out.q,
            &self.carry.labels,
            target.as_deref(),
        );
        let lr = schedule.lr_at(self.step);
        if !loss.loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step,
                lm_loss: loss.lm_loss,
                q_halt_loss: loss.q_halt_loss,
                lr,
            });
        }
        let q_halt: Vec<f32> = (0..dm.b).map(|b| out.q[b * 2]).collect();
        let mut metrics =
            StepMetrics::from_step(&loss, &q_halt, &halted, &self.carry.steps, target.is_some());
        let grads = inner_backward(
            &self.ctx,
            &self.params,
            tape,
            &out.z_h,
            &self.carry.inputs,
            &dlogits,
            &dq,
        );
        self.carry.z_h = out.z_h;
        self.carry.z_l = out.z_l;
        self.carry.halted = halted;

        // gradients of loss / global_batch_size, reduced over ranks
        let scale = 1.0 / cfg.global_batch_size as f32;
        if !cfg.freeze_weights {
            let mut flat = Vec::with_capacity(self.layout.len);
            for n in &self.layout.names {
                let g = grads.dense(n).expect("layout names come from the config");
                flat.extend(g.iter().map(|&x| x * scale));
            }
            coll.all_reduce_sum(&mut flat)?;
            self.adam.step(&mut self.master, &flat, lr)?;
            self.layout.unflatten(&self.master, &mut self.params);
            if let Some(ema) = &mut self.ema {
                ema.update(&self.master)?;
            }
        }
        if dm.ndim > 0 {
            let rows: Vec<f32> = grads.puzzle_local.iter().map(|&x| x * scale).collect();
            let (ids, rows) = coll.all_gather_rows(&self.carry.puzzle_ids, &rows)?;
            let plr = schedule.puzzle_emb_lr_at(self.step);
            self.sign_sgd
                .step(&mut self.params.puzzle_emb, dm.ndim, &ids, &rows, plr)?;
        }
        reduce_metrics(&mut metrics, coll)?;
        Ok(Some(metrics))
    }

    /// The weights evaluation uses: the EMA shadow when EMA is on (with the
    /// live puzzle-embedding table), else the live weights.
    pub fn eval_params(&self) -> Params<f32> {
        match &self.ema {
            Some(ema) => {
                let mut p = self.params.clone();
                self.layout.unflatten(ema.shadow(), &mut p);
                p
            }
            None => self.params.clone(),
        }
    }

    /// Runs every test batch for `halt_max_steps` steps (spec section 5,
    /// evaluation) and returns per-set metric sums and the outputs.
    pub fn evaluate(
        &self,
        params: &Params<f32>,
        test: &PuzzleDataset,
        coll: &dyn Collective,
    ) -> Result<(BTreeMap<String, StepMetrics>, EvalOutputs)> {
        evaluate_batches(
            &self.ctx,
            &self.arch,
            params,
            test.test_batches(),
            test.metadata().blank_identifier_id,
            coll,
            &mut |_| {},
        )
    }

    /// The checkpoint contents of this state.
    pub fn checkpoint_contents(
        &self,
        cfg: &RunConfig,
        loader: &LoaderState,
    ) -> Result<CheckpointContents> {
        let dm = self.ctx.dm;
        let mut model = self.params.to_map(&self.arch);
        let mut puzzle_emb = BTreeMap::new();
        if let Some(t) = model.remove(PUZZLE_EMB) {
            puzzle_emb.insert(PUZZLE_EMB.to_string(), t);
        }
        let m = self.layout.to_map(self.adam.exp_avg(), "");
        let v = self.layout.to_map(self.adam.exp_avg_sq(), "");
        let rng = RngState {
            seed: self.rng_seed,
            word_pos: self.rng.get_word_pos().to_string(),
        };
        Ok(CheckpointContents {
            model,
            ema: self
                .ema
                .as_ref()
                .map(|e| self.layout.to_map(e.shadow(), "")),
            optim: checkpoint::pack_adam(&m, &v),
            puzzle_emb,
            carry: Some(self.carry.to_map(dm.b, dm.s, dm.seq, dm.d)),
            state: TrainState {
                step: self.step,
                optimizer_steps: self.adam.step_count(),
                rng: serde_json::to_value(rng).unwrap_or_default(),
                loader: serde_json::to_value(loader).unwrap_or_default(),
                config: cfg.to_yaml()?,
                // Absolute paths and build hashes, so `trm package` finds
                // the datasets again from anywhere (the config has them as typed).
                extra: serde_json::json!({
                    "iters_done": self.iters_done,
                    crate::dataset_ref::EXTRA_KEY: crate::dataset_ref::record(&cfg.data_paths),
                }),
            },
        })
    }

    /// Restores a state saved by [`TrainerState::checkpoint_contents`];
    /// returns the loader position to restore.
    pub fn restore(&mut self, path: &Path, c: CheckpointContents) -> Result<LoaderState> {
        let bad = |reason: String| TrainError::Resume {
            path: path.to_path_buf(),
            reason,
        };
        let dm = self.ctx.dm;
        let mut weights = c.model.clone();
        weights.extend(c.puzzle_emb.clone());
        let w = Weights::from_tensors(&self.arch, weights).map_err(|e| bad(e.to_string()))?;
        self.params = Params::from_weights(&self.arch, &w)?;
        self.master = self.layout.flatten(&self.params);
        let (m, v) = checkpoint::unpack_adam(c.optim);
        let m = self.layout.from_map(&m, "").map_err(&bad)?;
        let v = self.layout.from_map(&v, "").map_err(&bad)?;
        self.adam = AdamAtan2::from_state(*self.adam.config(), m, v, c.state.optimizer_steps)?;
        match (&mut self.ema, c.ema) {
            (Some(e), Some(shadow)) => {
                let shadow = self.layout.from_map(&shadow, "").map_err(&bad)?;
                *e = Ema::from_shadow(shadow, e.rate());
            }
            (Some(_), None) => {
                return Err(bad(
                    "the run uses EMA but the checkpoint has no EMA shadow".into()
                ))
            }
            _ => {}
        }
        let carry = c
            .carry
            .ok_or_else(|| bad("the checkpoint has no ACT carry".into()))?;
        self.carry = Carry::from_map(&carry, dm.b, dm.s, dm.seq, dm.d).map_err(&bad)?;
        let rng: RngState = serde_json::from_value(c.state.rng.clone())
            .map_err(|e| bad(format!("RNG state: {e}")))?;
        let pos: u128 = rng
            .word_pos
            .parse()
            .map_err(|e| bad(format!("RNG position: {e}")))?;
        self.rng = exploration_rng(rng.seed, 0);
        self.rng.set_word_pos(pos);
        self.rng_seed = rng.seed;
        self.step = c.state.step;
        self.iters_done = c
            .state
            .extra
            .get("iters_done")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("state.json lacks extra.iters_done".into()))?
            as usize;
        let loader: LoaderState = serde_json::from_value(c.state.loader)
            .map_err(|e| bad(format!("loader state: {e}")))?;
        Ok(loader)
    }

    pub fn local_batch(&self) -> usize {
        self.local_batch
    }
}

/// Runs every batch of `batches` (test batches: every example once, the last
/// padded with `blank_id` rows) for `halt_max_steps` steps (spec section 5,
/// evaluation) and returns per-set metric sums and the outputs of the
/// non-padding rows. `ctx` fixes the batch size; `after_batch` is told the
/// real rows of each batch done (for progress).
pub fn evaluate_batches(
    ctx: &Ctx<f32>,
    arch: &ArchConfig,
    params: &Params<f32>,
    batches: impl IntoIterator<Item = LoaderBatch>,
    blank_id: i64,
    coll: &dyn Collective,
    after_batch: &mut dyn FnMut(usize),
) -> Result<(BTreeMap<String, StepMetrics>, EvalOutputs)> {
    let dm = ctx.dm;
    let mut per_set: BTreeMap<String, StepMetrics> = BTreeMap::new();
    let mut outs = EvalOutputs {
        seq_len: dm.seq,
        ..EvalOutputs::default()
    };
    let max = arch.halt_max_steps.max(1);
    for batch in batches {
        check_batch_shape(&dm, &batch, "test inputs")?;
        crate::model::trm::Batch {
            inputs: &batch.inputs,
            labels: &batch.labels,
            puzzle_ids: &batch.puzzle_identifiers,
            b: dm.b,
        }
        .validate(arch)?;
        let mut z_h = broadcast_init(&dm, &params.h_init);
        let mut z_l = broadcast_init(&dm, &params.l_init);
        let mut last = None;
        for step in 1..=max {
            let (out, _) = inner_forward(
                ctx,
                arch,
                params,
                &batch.inputs,
                &batch.puzzle_identifiers,
                z_h,
                z_l,
                arch.h_cycles.saturating_sub(1),
                false,
            );
            if step == max {
                last = Some(out);
                break;
            }
            z_h = out.z_h;
            z_l = out.z_l;
        }
        let out = last.expect("halt_max_steps >= 1");
        let (loss, _, _) = act_loss(&dm, &out.logits, &out.q, &batch.labels, None);
        let q_halt: Vec<f32> = (0..dm.b).map(|b| out.q[b * 2]).collect();
        let steps = vec![max as i32; dm.b];
        let m = StepMetrics::from_step(&loss, &q_halt, &vec![true; dm.b], &steps, false);
        per_set.entry(batch.set_name.clone()).or_default().add(&m);
        // outputs of real (non-padding) rows
        let before = outs.q_halt.len();
        for (b, &qh) in q_halt.iter().enumerate() {
            let lab = &batch.labels[b * dm.seq..(b + 1) * dm.seq];
            let pad = lab
                .iter()
                .all(|&l| l == crate::data::loader::IGNORE_LABEL_ID)
                && batch.puzzle_identifiers[b] as i64 == blank_id;
            if pad {
                continue;
            }
            outs.puzzle_ids.push(batch.puzzle_identifiers[b]);
            outs.inputs
                .extend_from_slice(&batch.inputs[b * dm.seq..(b + 1) * dm.seq]);
            for t in 0..dm.seq {
                let row = &out.logits[(b * dm.seq + t) * dm.v..(b * dm.seq + t + 1) * dm.v];
                outs.preds.push(argmax(row) as i32);
            }
            outs.q_halt.push(qh);
        }
        after_batch(outs.q_halt.len() - before);
    }
    for m in per_set.values_mut() {
        reduce_metrics(m, coll)?;
    }
    Ok((per_set, outs))
}

/// A loader batch must match the local batch size and sequence length the
/// trainer's buffers were sized for.
fn check_batch_shape(
    dm: &crate::model::trm::Dims,
    batch: &LoaderBatch,
    what: &'static str,
) -> Result<()> {
    if batch.batch_size != dm.b || batch.seq_len != dm.seq {
        return Err(TrmError::BatchShape {
            what,
            got: batch.inputs.len(),
            expected: dm.b * dm.seq,
            batch: dm.b,
        }
        .into());
    }
    Ok(())
}

/// Sums metric sums over ranks (in place).
fn reduce_metrics(m: &mut StepMetrics, coll: &dyn Collective) -> Result<()> {
    let mut fields = [
        &mut m.count,
        &mut m.accuracy,
        &mut m.exact_accuracy,
        &mut m.q_halt_accuracy,
        &mut m.steps,
        &mut m.lm_loss,
        &mut m.q_halt_loss,
        &mut m.q_continue_loss,
    ];
    let mut sums = fields.each_ref().map(|f| **f);
    coll.all_reduce_sum_f64(&mut sums)?;
    for (f, s) in fields.iter_mut().zip(sums) {
        **f = s;
    }
    Ok(())
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

// ---------------------------------------------------------------------------
// the run

/// The run folder: `checkpoint_path`, else `checkpoints/<project>/<run>`.
pub fn run_dir(cfg: &RunConfig) -> PathBuf {
    if let Some(p) = &cfg.checkpoint_path {
        return p.clone();
    }
    let project = cfg.project_name.clone().unwrap_or_else(|| {
        let data = cfg
            .data_paths
            .first()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "data".into());
        format!("{data}-ACT-trm")
    });
    let run = cfg.run_name.clone().unwrap_or_else(|| "run".into());
    PathBuf::from("checkpoints").join(project).join(run)
}

/// Opens the datasets, builds or restores the state, and trains.
pub fn train(cfg: &RunConfig, opts: &TrainOptions) -> Result<TrainReport> {
    train_with(cfg, opts, &SingleProcess)
}

/// [`train`] over an explicit collective (data-parallel ranks).
pub fn train_with(
    cfg: &RunConfig,
    opts: &TrainOptions,
    coll: &dyn Collective,
) -> Result<TrainReport> {
    let t0 = Instant::now();
    cfg.validate()?;
    let world = coll.world_size();
    if cfg.global_batch_size % world != 0 {
        return Err(TrainError::BatchSplit {
            global: cfg.global_batch_size,
            world,
        });
    }
    let ds_cfg = |test: bool| PuzzleDatasetConfig {
        seed: cfg.seed,
        dataset_paths: if test && !cfg.data_paths_test.is_empty() {
            cfg.data_paths_test.clone()
        } else {
            cfg.data_paths.clone()
        },
        global_batch_size: cfg.global_batch_size,
        test_set_mode: test,
        epochs_per_iter: if test { 1 } else { cfg.epochs_per_iter() },
        rank: coll.rank(),
        num_replicas: world,
    };
    let mut train_ds = PuzzleDataset::open(ds_cfg(false), Split::Train)?;
    train_ds.validate()?;
    // A dataset without a test split trains without evaluation, as the reference.
    let test_cfg = ds_cfg(true);
    let has_test = test_cfg
        .dataset_paths
        .iter()
        .any(|p| p.join(Split::Test.dir_name()).join("dataset.json").exists());
    let test_ds = if has_test {
        let ds = PuzzleDataset::open(test_cfg, Split::Test)?;
        ds.validate()?;
        Some(ds)
    } else {
        None
    };
    // ARC evaluators (`arc@ARC` in `evaluators`), on the first test dataset
    // as the reference does; `pass_Ks` in its options overrides the K list.
    let arc_ks = if test_ds.is_some() {
        arc_pass_ks(cfg)
    } else {
        Vec::new()
    };
    let eval_data_dir = cfg
        .data_paths_test
        .first()
        .or(cfg.data_paths.first())
        .cloned()
        .unwrap_or_default();
    // Loaded once (identifiers and test puzzles), so a broken evaluator file
    // fails the run at start, not at the first evaluation.
    let mut arc_evals = if coll.rank() == 0 {
        arc_ks
            .iter()
            .map(|ks| crate::eval::ArcEvaluator::new(&eval_data_dir, ks))
            .collect::<std::result::Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let meta = train_ds.metadata().clone();
    let arch = cfg.arch_for_dataset(meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers)?;
    crate::limits::check(
        "training this model",
        crate::limits::model_bytes(&arch, cfg.global_batch_size, true),
        "lower global_batch_size or the model's size (arch.hidden_size, arch.expansion)",
    )?;
    // The loader holds one iteration's group order: groups x epochs per iteration.
    crate::limits::check(
        "the data order of one iteration",
        crate::limits::product(&[meta.total_groups as u64, cfg.epochs_per_iter() as u64, 8]),
        "lower eval_interval (epochs per evaluation)",
    )?;
    let schedule = Schedule::new(cfg, meta.total_groups, meta.mean_puzzle_examples);
    let local_batch = train_ds.local_batch_size();

    for w in crate::run_guard::schedule_warnings(cfg, &schedule)? {
        if coll.rank() == 0 {
            eprintln!("warning: {w}");
        }
    }
    let dir = run_dir(cfg);
    // One writer per run folder, for the whole run (rank 0 writes it).
    let _lock = if coll.rank() == 0 {
        Some(crate::run_folder::lock(&dir)?)
    } else {
        None
    };
    let moved_aside = match (&_lock, &opts.resume) {
        (Some(l), None) => crate::run_folder::claim_fresh(l, opts.start_over)?,
        _ => None,
    };
    let ckpt = CheckpointDir::new(dir.clone()).with_keep_last(cfg.checkpoint_keep_last);

    // weights: +load_checkpoint, else seeded init
    let weights = match &cfg.load_checkpoint {
        Some(p) => load_initial_weights(&arch, p)?,
        None => Weights::init(&arch, cfg.seed),
    };
    let mut st = TrainerState::new(cfg, arch, weights, local_batch, coll.rank())?;
    let mut resumed_from = None;
    if let Some(spec) = &opts.resume {
        let path = ckpt.resolve(spec)?;
        let c = checkpoint::load(&path)?;
        let loader = st.restore(&path, c)?;
        train_ds.restore(loader)?;
        resumed_from = Some(path);
    }

    let rank0 = coll.rank() == 0;
    let mut metrics_out = None;
    let mut events = None;
    if rank0 {
        let yaml = cfg.to_yaml()?;
        let p = dir.join("all_config.yaml");
        std::fs::write(&p, yaml).map_err(|source| TrainError::Io { path: p, source })?;
        if resumed_from.is_some() {
            // The steps after the checkpoint are replayed: their old records go.
            MetricsWriter::cut_after(&dir, st.step)?;
        }
        metrics_out = Some(MetricsWriter::create(&dir)?);
        let mut ev = EventWriter::create(&dir)?;
        if resumed_from.is_some() {
            ev.mark_restart(st.step)?;
        }
        events = Some(ev);
    }
    let say = |msg: &str| {
        if opts.verbose && rank0 {
            eprintln!("{msg}");
        }
    };
    say(&format!("run folder: {}", dir.display()));
    if let Some(p) = &moved_aside {
        say(&format!(
            "--start-over: the previous run was moved to {}",
            p.display()
        ));
    }
    say(&format!("{schedule}"));
    say(&format!(
        "model: {} dense parameters, puzzle embedding {} x {}; {} ranks, local batch {}",
        st.layout.len, st.arch.num_puzzle_identifiers, st.arch.puzzle_emb_ndim, world, local_batch
    ));
    if let Some(p) = &resumed_from {
        say(&format!(
            "resumed from {} at step {} (iteration {} of {})",
            p.display(),
            st.step,
            st.iters_done,
            schedule.total_iters
        ));
    }
    if test_ds.is_none() {
        say("no test split found: evaluation is skipped");
    }

    let mut report = TrainReport {
        run_dir: dir.clone(),
        total_steps: schedule.total_steps,
        steps_run: 0,
        train_log: Vec::new(),
        eval_log: Vec::new(),
        checkpoints: Vec::new(),
        seconds: 0.0,
        stopped_by: None,
    };
    if opts.handle_signals && cfg.checkpoint_on_signal && world == 1 {
        crate::signals::install();
    }
    let pause = crate::run_guard::step_pause();
    let mut progress = rank0.then(|| {
        Progress::new(
            schedule.total_steps,
            st.step,
            if opts.progress {
                ProgressMode::Auto
            } else {
                ProgressMode::Hidden
            },
        )
    });
    for it in st.iters_done..schedule.total_iters {
        let mut batches = train_ds.train_batches();
        loop {
            let t = Instant::now();
            let Some(batch) = batches.next() else { break };
            let Some(m) = st.train_step(cfg, &schedule, &batch, coll)? else {
                continue;
            };
            let secs = t.elapsed().as_secs_f64();
            report.steps_run += 1;
            let mut log = m.train_view(cfg.global_batch_size);
            log.push(("train/lr".into(), schedule.lr_at(st.step)));
            log.push((
                "train/samples_per_s".into(),
                cfg.global_batch_size as f64 / secs.max(1e-9),
            ));
            if let Some(w) = &mut metrics_out {
                w.log(st.step, &log)?;
            }
            if let Some(e) = &mut events {
                let l: Vec<(&str, f32)> =
                    log.iter().map(|(k, v)| (k.as_str(), *v as f32)).collect();
                e.add_scalars(st.step, &l)?;
            }
            if let Some(p) = &mut progress {
                let loss = (m.lm_loss + 0.5 * (m.q_halt_loss + m.q_continue_loss))
                    / cfg.global_batch_size as f64;
                p.update(st.step, Some(loss));
            }
            report.train_log.push((st.step, log));
            if let Some(d) = pause {
                std::thread::sleep(d);
            }
            if let (true, Some(sig)) = (opts.handle_signals, crate::signals::requested()) {
                // Mid-iteration checkpoint: the loader saves its position in
                // the walk, so a resume continues with the next batch.
                let c = st.checkpoint_contents(cfg, batches.state())?;
                let path = ckpt.save(&c)?;
                if let Some(p) = &mut progress {
                    p.finish();
                }
                report.checkpoints.push(path);
                report.stopped_by = Some(sig);
                report.seconds = t0.elapsed().as_secs_f64();
                return Ok(report);
            }
        }
        st.iters_done = it + 1;
        if !schedule.evaluates_after(it) {
            continue;
        }
        let loader_state = train_ds.state().clone();
        if let Some(test) = &test_ds {
            let params = st.eval_params();
            let (per_set, outs) = st.evaluate(&params, test, coll)?;
            let mut log = Vec::new();
            for (set, m) in &per_set {
                log.extend(m.eval_view(set));
            }
            if rank0 {
                for ev in &mut arc_evals {
                    ev.clear();
                    ev.add(&outs)?;
                    let res = ev.result();
                    let out_dir = dir.join(format!("evaluator_ARC_step_{}", st.step));
                    crate::eval::write_results(&out_dir, &res)?;
                    log.extend(res.metrics.iter().cloned());
                }
            }
            if let Some(w) = &mut metrics_out {
                w.log(st.step, &log)?;
            }
            if let Some(e) = &mut events {
                let l: Vec<(&str, f32)> =
                    log.iter().map(|(k, v)| (k.as_str(), *v as f32)).collect();
                e.add_scalars(st.step, &l)?;
            }
            let summary: Vec<String> = log
                .iter()
                .filter(|(k, _)| {
                    k.ends_with("/accuracy")
                        || k.ends_with("exact_accuracy")
                        || k.ends_with("lm_loss")
                        || k == "ARC/pass@1"
                        || k == "ARC/pass@2"
                })
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            let line = format!("eval at step {}: {}", st.step, summary.join(", "));
            match &mut progress {
                Some(p) if opts.verbose => p.println(&line),
                _ => say(&line),
            }
            report.eval_log.push((st.step, log));
        }
        if rank0 && (cfg.checkpoint_every_eval || it + 1 == schedule.total_iters) {
            let c = st.checkpoint_contents(cfg, &loader_state)?;
            let path = ckpt.save(&c)?;
            let line = format!("checkpoint: {}", path.display());
            match &mut progress {
                Some(p) if opts.verbose => p.println(&line),
                _ => say(&line),
            }
            report.checkpoints.push(path);
        }
    }
    if let Some(p) = &mut progress {
        p.finish();
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The K lists of the config's ARC evaluators (`arc@ARC` entries of
/// `evaluators`): each one's `pass_Ks` option, else the reference's default.
pub fn arc_pass_ks(cfg: &RunConfig) -> Vec<Vec<usize>> {
    cfg.evaluators
        .iter()
        .map(|ev| {
            ev.options
                .get("pass_Ks")
                .and_then(|v| v.as_sequence())
                .map(|seq| {
                    seq.iter()
                        .filter_map(|k| k.as_u64())
                        .map(|k| k as usize)
                        .collect()
                })
                .unwrap_or_else(|| crate::eval::DEFAULT_PASS_KS.to_vec())
        })
        .collect()
}

/// `+load_checkpoint=PATH`: a checkpoint folder (its EMA weights when it has
/// them, as the reference saves the EMA model) or a reference-named
/// safetensors file. A puzzle-embedding table of another size is replaced by
/// its mean row repeated, as the reference does.
fn load_initial_weights(arch: &ArchConfig, path: &Path) -> Result<Weights> {
    let mut map = checkpoint::load_weights_only(path)?;
    if path.is_dir() {
        let c = checkpoint::load(path)?;
        if let Some(ema) = c.ema {
            map.extend(ema);
        }
    }
    let mut map: BTreeMap<String, Tensor> = map
        .into_iter()
        .map(|(k, v)| {
            (
                crate::model::weights::strip_wrapper_prefixes(&k).to_string(),
                v,
            )
        })
        .collect();
    if arch.puzzle_emb_ndim > 0 {
        let want = [arch.num_puzzle_identifiers, arch.puzzle_emb_ndim];
        if let Some(t) = map.get(PUZZLE_EMB) {
            if t.shape != want && t.shape.len() == 2 && t.shape[1] == want[1] && t.shape[0] > 0 {
                let nd = t.shape[1];
                let mean = mean_row(&t.data, nd);
                let mut data = Vec::with_capacity(want[0] * nd);
                for _ in 0..want[0] {
                    data.extend_from_slice(&mean);
                }
                eprintln!(
                    "load_checkpoint: puzzle embedding {:?} resized to {:?} with its mean row",
                    t.shape, want
                );
                map.insert(PUZZLE_EMB.into(), Tensor::new(&want, data));
            }
        }
    }
    Weights::from_tensors(arch, map).map_err(|e| TrainError::Resume {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The mean row of a `[rows, nd]` table (accumulated in f64): what the
/// reference fills a resized puzzle-embedding table with.
pub fn mean_row(table: &[f32], nd: usize) -> Vec<f32> {
    let rows = table.len() / nd.max(1);
    let mut mean = vec![0.0f64; nd];
    for row in table.chunks_exact(nd.max(1)) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x as f64;
        }
    }
    mean.iter()
        .map(|&x| (x / rows.max(1) as f64) as f32)
        .collect()
}
