//! The ACT rules every engine shares (spec section 5), written once on the
//! host: the carry's bookkeeping per batch slot, halting with seeded
//! exploration, the Q-continue bootstrap target, and the evaluation loop
//! with its metrics. An engine only runs the network (forward, backward,
//! optimiser); the trainer, `trm step-dump` and `trm infer` all take these
//! rules from here, so they cannot drift apart.

use std::collections::BTreeMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::Real;
use crate::data::loader::Batch as LoaderBatch;
use crate::dist::{Collective, CollectiveError};
use crate::loss::StepMetrics;
use crate::model::config::ArchConfig;
#[cfg(doc)]
use crate::model::engine::Engine;
use crate::model::engine::{ActNet, EvalNet};
use crate::model::trm::{
    act_loss, broadcast_init, inner_forward, Batch, Ctx, Dims, LossOut, Params, TrmError,
};
use crate::tensor::Tensor;

/// What the shared ACT rules can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error(transparent)]
    Model(#[from] TrmError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

// ---------------------------------------------------------------------------
// the carry

/// The host's part of the carry, per batch slot: step count, halted flag
/// and the sample it is working on (spec section 5). The hidden states
/// live in the engine ([`Engine::reset_halted`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Carry {
    pub steps: Vec<i32>,
    pub halted: Vec<bool>,
    pub inputs: Vec<i32>,
    pub labels: Vec<i32>,
    pub puzzle_ids: Vec<i32>,
}

impl Carry {
    /// Every slot halted (so the first step loads a sample into each).
    pub fn new(b: usize, seq: usize) -> Carry {
        Carry {
            steps: vec![0; b],
            halted: vec![true; b],
            inputs: vec![0; b * seq],
            labels: vec![0; b * seq],
            puzzle_ids: vec![0; b],
        }
    }

    /// Halted slots take the batch's sample and restart their step count
    /// (the engine restarts their hidden state).
    pub fn load_halted(&mut self, batch: &LoaderBatch) {
        let seq = batch.seq_len;
        for b in 0..self.halted.len() {
            if !self.halted[b] {
                continue;
            }
            let (lo, hi) = (b * seq, (b + 1) * seq);
            self.inputs[lo..hi].copy_from_slice(&batch.inputs[lo..hi]);
            self.labels[lo..hi].copy_from_slice(&batch.labels[lo..hi]);
            self.puzzle_ids[b] = batch.puzzle_identifiers[b];
            self.steps[b] = 0;
        }
    }

    /// The carry with the engine's hidden states `[B, S, D]` as checkpoint
    /// tensors (integers stored as f32).
    pub fn to_map(&self, z_h: &[f32], z_l: &[f32], s: usize, d: usize) -> BTreeMap<String, Tensor> {
        let b = self.steps.len();
        let seq = self.inputs.len() / b.max(1);
        let f = |v: &[i32]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let mut m = BTreeMap::new();
        m.insert("z_H".into(), Tensor::new(&[b, s, d], z_h.to_vec()));
        m.insert("z_L".into(), Tensor::new(&[b, s, d], z_l.to_vec()));
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

    /// The inverse of [`Carry::to_map`], checking every tensor's size:
    /// the slots and the hidden states `(z_H, z_L)`.
    #[allow(clippy::type_complexity)]
    pub fn from_map(
        m: &BTreeMap<String, Tensor>,
        b: usize,
        s: usize,
        seq: usize,
        d: usize,
    ) -> Result<(Carry, Vec<f32>, Vec<f32>), String> {
        let get = |k: &str, n: usize| -> Result<&[f32], String> {
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
        let z_h = get("z_H", b * s * d)?.to_vec();
        let z_l = get("z_L", b * s * d)?.to_vec();
        let carry = Carry {
            steps: i(get("steps", b)?),
            halted: get("halted", b)?.iter().map(|&x| x != 0.0).collect(),
            inputs: i(get("inputs", b * seq)?),
            labels: i(get("labels", b * seq)?),
            puzzle_ids: i(get("puzzle_identifiers", b)?),
        };
        Ok((carry, z_h, z_l))
    }
}

// ---------------------------------------------------------------------------
// halting and the Q-continue target

/// Where the halting-exploration draws of one training step come from:
/// counter-based, keyed by (seed, step, global sample slot), so a slot's
/// draws do not depend on how many ranks share the batch, and nothing but
/// the seed and the step needs saving for a resume.
///
/// Each global slot owns four 32-bit words of the ChaCha8 stream `step`
/// under a key derived from the seed: slot `g` reads words `4g..4g + 4` (two
/// u64, one per draw). Rank `r` with local batch `B` starts at slot `r * B`,
/// so its draws are exactly its rows' share of the one-rank draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exploration {
    pub seed: u64,
    /// The training step being taken (1-based).
    pub step: u64,
    /// The global slot of this rank's first batch row (`rank * local_batch`).
    pub first_slot: usize,
}

/// Key domain of the exploration draws, apart from the data order's stream
/// (which is keyed by the bare seed).
const EXPLORATION_DOMAIN: u64 = 0x5452_4d5f_4558_504c;
/// 32-bit words each slot reads: two u64 draws.
const WORDS_PER_SLOT: u128 = 4;

impl Exploration {
    /// The two raw draws of each of `n` consecutive slots from `first_slot`:
    /// (the explore coin, the minimum-steps draw).
    fn draws(&self, n: usize) -> Vec<(u64, u64)> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ EXPLORATION_DOMAIN);
        rng.set_stream(self.step);
        rng.set_word_pos(self.first_slot as u128 * WORDS_PER_SLOT);
        (0..n).map(|_| (rng.next_u64(), rng.next_u64())).collect()
    }
}

/// A uniform in [0, 1) from 53 random bits.
fn unit_f64(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform integer in `lo..=hi` by multiply-shift: no rejection, so a
/// slot reads a fixed number of words (the bias, under `span / 2^64`, is
/// far below anything a run could see).
fn int_in(x: u64, lo: i32, hi: i32) -> i32 {
    let span = (hi - lo + 1) as u128;
    lo + ((x as u128 * span) >> 64) as i32
}

/// Halting before exploration (spec section 5): a sample halts at its step
/// limit or, when it may take more than one step, when its Q head says so
/// (`q_halt > 0` with `no_ACT_continue`, else `q_halt > q_continue`).
pub fn halts<T: Real>(cfg: &ArchConfig, at_limit: bool, q_halt: T, q_continue: T) -> bool {
    let by_q = if cfg.no_act_continue {
        q_halt > T::zero()
    } else {
        q_halt > q_continue
    };
    at_limit || (cfg.halt_max_steps > 1 && by_q)
}

/// Training-mode halting of every slot from its step count (after this
/// step's increment) and its Q logits `q` [B, 2]. With `explore`, a slot may
/// be held back to a random minimum number of steps (probability
/// `halt_exploration_prob`, the minimum uniform in `2..=halt_max_steps`);
/// without, exploration is off.
pub fn halt_decisions<T: Real>(
    cfg: &ArchConfig,
    steps: &[i32],
    q: &[T],
    explore: Option<&Exploration>,
) -> Vec<bool> {
    let max = cfg.halt_max_steps as i32;
    let mut halted: Vec<bool> = (0..steps.len())
        .map(|b| halts(cfg, steps[b] >= max, q[b * 2], q[b * 2 + 1]))
        .collect();
    if let (true, Some(ex)) = (cfg.halt_max_steps > 1, explore) {
        // Both draws exist for every slot whatever the outcomes.
        for ((h, &s), (coin, span)) in halted.iter_mut().zip(steps).zip(ex.draws(steps.len())) {
            let explore = unit_f64(coin) < cfg.halt_exploration_prob;
            let min_steps = if explore {
                int_in(span, 2, max.max(2))
            } else {
                0
            };
            *h &= s >= min_steps;
        }
    }
    halted
}

/// Whether a step trains the Q-continue head (and so needs the bootstrap
/// forward): only without `no_ACT_continue` and with more than one step.
pub fn has_q_continue_target(cfg: &ArchConfig) -> bool {
    !cfg.no_act_continue && cfg.halt_max_steps > 1
}

/// The Q-continue bootstrap target from the next step's Q logits:
/// `sigmoid(q_halt)` at the step limit, else `sigmoid(max(q_halt, q_continue))`.
pub fn q_continue_target<T: Real>(next_halt: T, next_continue: T, at_limit: bool) -> f64 {
    let (nh, nc) = (next_halt.f64(), next_continue.f64());
    let t = if at_limit { nh } else { nh.max(nc) };
    1.0 / (1.0 + (-t).exp())
}

/// [`q_continue_target`] of every slot, from the bootstrap forward's Q
/// logits `next_q` [B, 2] and each slot's step count.
pub fn q_continue_targets<T: Real>(cfg: &ArchConfig, steps: &[i32], next_q: &[T]) -> Vec<f64> {
    let max = cfg.halt_max_steps as i32;
    (0..steps.len())
        .map(|b| q_continue_target(next_q[b * 2], next_q[b * 2 + 1], steps[b] >= max))
        .collect()
}

/// What one training ACT step tells the host.
#[derive(Debug, Clone)]
pub struct ActStepOut<T> {
    pub loss: LossOut,
    /// The inner step's Q logits `[B, 2]`.
    pub q: Vec<T>,
    pub halted: Vec<bool>,
    /// Whether the Q-continue head had a target (and so a loss).
    pub has_q_continue: bool,
}

/// One training ACT step on `net`, whose carry holds slots that have taken
/// `steps` steps counting this one: the inner step, halting (with
/// exploration when `explore` is given), the Q-continue bootstrap target,
/// then the loss and backward. The one place these rules meet an engine.
pub fn act_step<T: Real>(
    net: &mut (impl ActNet<T> + ?Sized),
    cfg: &ArchConfig,
    batch: &Batch<'_>,
    steps: &[i32],
    explore: Option<&Exploration>,
) -> Result<ActStepOut<T>, TrmError> {
    let q = net.inner_step(batch)?;
    let halted = halt_decisions(cfg, steps, &q, explore);
    let target = if has_q_continue_target(cfg) {
        let next_q = net.bootstrap_q(batch)?;
        Some(q_continue_targets(cfg, steps, &next_q))
    } else {
        None
    };
    let loss = net.loss_and_backward(batch, target.as_deref())?;
    Ok(ActStepOut {
        loss,
        q,
        halted,
        has_q_continue: target.is_some(),
    })
}

// ---------------------------------------------------------------------------
// evaluation

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

impl EvalOutputs {
    /// Appends `other`'s examples after these (same `seq_len`).
    pub fn append(&mut self, other: EvalOutputs) {
        debug_assert!(other.puzzle_ids.is_empty() || other.seq_len == self.seq_len);
        self.puzzle_ids.extend(other.puzzle_ids);
        self.inputs.extend(other.inputs);
        self.preds.extend(other.preds);
        self.q_halt.extend(other.q_halt);
    }
}

/// Runs every batch of `batches` (test batches: every example once, the last
/// padded with `blank_id` rows) for `halt_max_steps` steps (spec section 5,
/// evaluation) and returns per-set metric sums and the outputs of the
/// non-padding rows. `ctx` fixes the batch size; `after_batch` is told the
/// real rows of each batch done (for progress). The CPU engine's network
/// over `params`; [`evaluate_with`] takes any engine's.
pub fn evaluate_batches(
    ctx: &Ctx<f32>,
    arch: &ArchConfig,
    params: &Params<f32>,
    batches: impl IntoIterator<Item = LoaderBatch>,
    blank_id: i64,
    coll: &dyn Collective,
    after_batch: &mut dyn FnMut(usize),
) -> Result<(BTreeMap<String, StepMetrics>, EvalOutputs), ActError> {
    let mut net = CpuEval { ctx, arch, params };
    evaluate_with(
        &mut net,
        &ctx.dm,
        arch,
        batches,
        blank_id,
        coll,
        after_batch,
    )
}

/// [`evaluate_batches`] on the network `net`, whose batch size is `dm.b`.
pub fn evaluate_with(
    net: &mut (impl EvalNet + ?Sized),
    dm: &Dims,
    arch: &ArchConfig,
    batches: impl IntoIterator<Item = LoaderBatch>,
    blank_id: i64,
    coll: &dyn Collective,
    after_batch: &mut dyn FnMut(usize),
) -> Result<(BTreeMap<String, StepMetrics>, EvalOutputs), ActError> {
    let dm = *dm;
    let mut per_set: BTreeMap<String, StepMetrics> = BTreeMap::new();
    let mut outs = EvalOutputs {
        seq_len: dm.seq,
        ..EvalOutputs::default()
    };
    for batch in batches {
        let (m, out) = evaluate_batch(net, &dm, arch, &batch, blank_id)?;
        per_set.entry(batch.set_name.clone()).or_default().add(&m);
        after_batch(out.q_halt.len());
        outs.append(out);
    }
    for m in per_set.values_mut() {
        reduce_metrics(m, coll)?;
    }
    Ok((per_set, outs))
}

/// One test batch on `net` (batch size `dm.b`) for `halt_max_steps` steps:
/// its metric sums and the outputs of its real (non-padding) rows. Every
/// row is computed on its own, so a batch gives the same outputs whichever
/// engine of a kind (or which of several GPUs) runs it.
pub fn evaluate_batch(
    net: &mut (impl EvalNet + ?Sized),
    dm: &Dims,
    arch: &ArchConfig,
    batch: &LoaderBatch,
    blank_id: i64,
) -> Result<(StepMetrics, EvalOutputs), ActError> {
    check_batch_shape(dm, batch, "test inputs")?;
    let slots = Batch {
        inputs: &batch.inputs,
        labels: &batch.labels,
        puzzle_ids: &batch.puzzle_identifiers,
        b: dm.b,
    };
    slots.validate(arch)?;
    // Every sample runs the full `halt_max_steps`, as the reference
    // evaluates; only the last step's outputs count.
    let max = arch.halt_max_steps.max(1);
    let (logits, q) = net.eval_steps(&slots, max)?;
    let (loss, _, _) = act_loss(dm, &logits, &q, &batch.labels, None);
    let q_halt: Vec<f32> = (0..dm.b).map(|b| q[b * 2]).collect();
    let steps = vec![max as i32; dm.b];
    let m = StepMetrics::from_step(&loss, &q_halt, &vec![true; dm.b], &steps, false);
    let mut outs = EvalOutputs {
        seq_len: dm.seq,
        ..EvalOutputs::default()
    };
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
            let row = &logits[(b * dm.seq + t) * dm.v..(b * dm.seq + t + 1) * dm.v];
            outs.preds.push(argmax(row) as i32);
        }
        outs.q_halt.push(qh);
    }
    Ok((m, outs))
}

/// The CPU engine's evaluation network over borrowed f32 weights.
pub struct CpuEval<'a> {
    pub ctx: &'a Ctx<f32>,
    pub arch: &'a ArchConfig,
    pub params: &'a Params<f32>,
}

impl EvalNet for CpuEval<'_> {
    fn eval_steps(
        &mut self,
        batch: &Batch<'_>,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), TrmError> {
        let (ctx, arch, params) = (self.ctx, self.arch, self.params);
        let mut z_h = broadcast_init(&ctx.dm, &params.h_init);
        let mut z_l = broadcast_init(&ctx.dm, &params.l_init);
        let mut last = None;
        for step in 1..=n.max(1) {
            let (out, _) = inner_forward(
                ctx,
                arch,
                params,
                batch.inputs,
                batch.puzzle_ids,
                z_h,
                z_l,
                arch.h_cycles.saturating_sub(1),
                false,
            );
            if step == n.max(1) {
                last = Some(out);
                break;
            }
            z_h = out.z_h;
            z_l = out.z_l;
        }
        let out = last.expect("at least one step");
        Ok((out.logits, out.q))
    }
}

/// A loader batch must match the local batch size and sequence length the
/// engine's buffers were sized for.
pub fn check_batch_shape(
    dm: &Dims,
    batch: &LoaderBatch,
    what: &'static str,
) -> Result<(), TrmError> {
    if batch.batch_size != dm.b || batch.seq_len != dm.seq {
        return Err(TrmError::BatchShape {
            what,
            got: batch.inputs.len(),
            expected: dm.b * dm.seq,
            batch: dm.b,
        });
    }
    Ok(())
}

/// Sums metric sums over ranks (in place).
pub fn reduce_metrics(m: &mut StepMetrics, coll: &dyn Collective) -> Result<(), CollectiveError> {
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

/// First index of the maximum (torch.argmax semantics for finite values).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explore_at(step: u64, first_slot: usize) -> Exploration {
        Exploration {
            seed: 42,
            step,
            first_slot,
        }
    }

    /// A rank's draws are its slots' share of the one-rank draws, and
    /// another step or seed draws afresh.
    #[test]
    fn draws_are_keyed_by_global_slot() {
        let all = explore_at(7, 0).draws(6);
        assert_eq!(explore_at(7, 4).draws(2), all[4..6]);
        assert_eq!(explore_at(7, 3).draws(1), all[3..4]);
        assert_ne!(explore_at(8, 0).draws(6), all);
        let other_seed = Exploration {
            seed: 43,
            ..explore_at(7, 0)
        };
        assert_ne!(other_seed.draws(6), all);
    }

    /// With a Q head that always halts, a slot stays exactly when its coin
    /// says explore (probability `halt_exploration_prob`) and it has taken
    /// fewer steps than its minimum, uniform in `2..=halt_max_steps`.
    #[test]
    fn exploration_keeps_the_distribution() {
        let mut cfg = ArchConfig::trm_default(4, 12, 3);
        cfg.halt_max_steps = 4;
        cfg.halt_exploration_prob = 0.3;
        let n = 30_000;
        let q: Vec<f32> = (0..n).flat_map(|_| [5.0f32, -5.0]).collect();
        let ex = explore_at(3, 0);
        // Held back at step s exactly when min_steps > s: P(explore) * P(min > s).
        let held = |s: i32| {
            let halted = halt_decisions(&cfg, &vec![s; n], &q, Some(&ex));
            halted.iter().filter(|&&h| !h).count() as f64 / n as f64
        };
        let tol = 0.015;
        // min in {2, 3, 4}: P(min > 1) = 1, P(min > 2) = 2/3, P(min > 3) = 1/3.
        for (s, want) in [(1, 0.3), (2, 0.2), (3, 0.1), (4, 0.0)] {
            let got = held(s);
            assert!(
                (got - want).abs() < tol,
                "step {s}: held {got}, expected {want}"
            );
        }
        // Without exploration nothing is held back.
        let none = halt_decisions(&cfg, &vec![1; n], &q, None);
        assert!(none.iter().all(|&h| h));
        // int_in covers its whole range and nothing else.
        assert_eq!(int_in(0, 2, 4), 2);
        assert_eq!(int_in(u64::MAX, 2, 4), 4);
        assert!(unit_f64(u64::MAX) < 1.0);
    }
}
