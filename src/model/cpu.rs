//! The CPU engine: the network of `trm.rs` in f32 plus the optimisers on
//! the flat buffers of [`FlatLayout`], behind the [`Engine`] seam. It is
//! the reference the CUDA engine is checked against, so it does exactly
//! what the trainer did before the seam existed, in the same order.

use crate::dist::Collective;
use crate::model::act::CpuEval;
use crate::model::config::ArchConfig;
use crate::model::engine::{
    ActNet, Engine, EngineConfig, EngineError, EngineState, EvalNet, OptimStep, StepTrace,
};
use crate::model::layout::FlatLayout;
use crate::model::trm::{Batch, Ctx, LossOut, Params, StepState, TrmError};
use crate::optim::{AdamAtan2, Ema, SparseSignSgd};

/// Weights, optimiser states and the carry's hidden states, all f32 on the
/// host. The dense master weights live in one flat buffer (`master`); the
/// typed [`Params`] the network reads are refreshed from it after each
/// update.
pub struct CpuEngine {
    arch: ArchConfig,
    layout: FlatLayout,
    params: Params<f32>,
    master: Vec<f32>,
    adam: AdamAtan2<f32>,
    ema: Option<Ema<f32>>,
    sign_sgd: SparseSignSgd,
    ctx: Ctx<f32>,
    state: StepState<f32>,
    /// With EMA: the dense weights evaluation uses, unflattened from the
    /// shadow once per update rather than per batch. Its puzzle table is
    /// empty: the live one is lent to it for each batch (it can be GBs).
    eval_dense: Option<Params<f32>>,
}

impl CpuEngine {
    /// An engine for local batches of `local_batch`, every slot's carry zero
    /// (the first step resets every slot anyway).
    pub fn new(
        arch: ArchConfig,
        params: Params<f32>,
        local_batch: usize,
        cfg: EngineConfig,
    ) -> CpuEngine {
        let layout = FlatLayout::new(&arch);
        let master = layout.flatten(&params);
        let adam = AdamAtan2::new(layout.len, cfg.adam);
        let ema = cfg.ema_rate.map(|rate| Ema::new(&master, rate));
        let ctx = Ctx::new(&arch, local_batch);
        let n = ctx.dm.m() * ctx.dm.d;
        CpuEngine {
            layout,
            params,
            master,
            adam,
            ema,
            sign_sgd: SparseSignSgd::new(cfg.puzzle_emb_weight_decay),
            state: StepState::new(vec![0.0; n], vec![0.0; n]),
            ctx,
            arch,
            eval_dense: None,
        }
    }

    /// The context (sizes and buffer pool) of this engine's batch size.
    pub fn ctx(&self) -> &Ctx<f32> {
        &self.ctx
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }
}

impl ActNet<f32> for CpuEngine {
    fn inner_step(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>, TrmError> {
        let n_nograd = self.arch.h_cycles.saturating_sub(1);
        self.state
            .inner_step(&self.ctx, &self.arch, &self.params, batch, n_nograd)
    }

    fn bootstrap_q(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>, TrmError> {
        self.state
            .bootstrap_q(&self.ctx, &self.arch, &self.params, batch)
    }

    fn loss_and_backward(
        &mut self,
        batch: &Batch<'_>,
        target: Option<&[f64]>,
    ) -> Result<LossOut, TrmError> {
        self.state
            .loss_and_backward(&self.ctx, &self.params, batch, target)
    }
}

impl EvalNet for CpuEngine {
    fn eval_steps(
        &mut self,
        batch: &Batch<'_>,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), TrmError> {
        let Some(ema) = &self.ema else {
            let mut net = CpuEval {
                ctx: &self.ctx,
                arch: &self.arch,
                params: &self.params,
            };
            return net.eval_steps(batch, n);
        };
        let mut p = match self.eval_dense.take() {
            Some(p) => p,
            None => {
                let table = std::mem::take(&mut self.params.puzzle_emb);
                let mut p = self.params.clone();
                self.params.puzzle_emb = table;
                self.layout.unflatten(ema.shadow(), &mut p);
                p
            }
        };
        p.puzzle_emb = std::mem::take(&mut self.params.puzzle_emb);
        let mut net = CpuEval {
            ctx: &self.ctx,
            arch: &self.arch,
            params: &p,
        };
        let out = net.eval_steps(batch, n);
        self.params.puzzle_emb = std::mem::take(&mut p.puzzle_emb);
        self.eval_dense = Some(p);
        out
    }
}

impl Engine for CpuEngine {
    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn step_trace(&self) -> Result<StepTrace, EngineError> {
        let grads = self.state.grads.clone().ok_or(TrmError::StepOrder)?;
        Ok(StepTrace {
            logits: self.state.logits.clone(),
            z_h: self.state.z_h.clone(),
            z_l: self.state.z_l.clone(),
            grads,
        })
    }

    fn reset_halted(&mut self, halted: &[bool]) -> Result<(), EngineError> {
        let (s, d) = (self.ctx.dm.s, self.ctx.dm.d);
        if halted.len() != self.ctx.dm.b {
            return Err(EngineError::State(format!(
                "{} halted flags for a batch of {}",
                halted.len(),
                self.ctx.dm.b
            )));
        }
        for (b, _) in halted.iter().enumerate().filter(|(_, &h)| h) {
            for t in 0..s {
                let r = (b * s + t) * d;
                self.state.z_h[r..r + d].copy_from_slice(&self.params.h_init);
                self.state.z_l[r..r + d].copy_from_slice(&self.params.l_init);
            }
        }
        Ok(())
    }

    fn optimizer_step(
        &mut self,
        up: &OptimStep,
        puzzle_ids: &[i32],
        coll: &dyn Collective,
    ) -> Result<(), EngineError> {
        let grads = self.state.grads.take().ok_or(TrmError::StepOrder)?;
        let scale = up.grad_scale;
        if up.update_dense {
            // One flat buffer in layout order: one all-reduce, one update.
            let mut flat = Vec::with_capacity(self.layout.len);
            for n in &self.layout.names {
                let g = grads.dense(n).expect("layout names come from the config");
                flat.extend(g.iter().map(|&x| x * scale));
            }
            coll.all_reduce_sum(&mut flat)?;
            self.adam.step(&mut self.master, &flat, up.lr)?;
            self.layout.unflatten(&self.master, &mut self.params);
            if let Some(ema) = &mut self.ema {
                ema.update(&self.master)?;
                self.eval_dense = None;
            }
        }
        let ndim = self.ctx.dm.ndim;
        if ndim > 0 {
            let rows: Vec<f32> = grads.puzzle_local.iter().map(|&x| x * scale).collect();
            let (ids, rows) = coll.all_gather_rows(puzzle_ids, &rows)?;
            self.sign_sgd.step(
                &mut self.params.puzzle_emb,
                ndim,
                &ids,
                &rows,
                up.puzzle_emb_lr,
            )?;
        }
        Ok(())
    }

    fn params(&self) -> Result<Params<f32>, EngineError> {
        Ok(self.params.clone())
    }

    fn eval_params(&self) -> Result<Params<f32>, EngineError> {
        Ok(match &self.ema {
            Some(ema) => {
                let mut p = self.params.clone();
                self.layout.unflatten(ema.shadow(), &mut p);
                p
            }
            None => self.params.clone(),
        })
    }

    fn export_state(&self) -> Result<EngineState, EngineError> {
        Ok(EngineState {
            params: self.params.clone(),
            adam_m: self.adam.exp_avg().to_vec(),
            adam_v: self.adam.exp_avg_sq().to_vec(),
            optimizer_steps: self.adam.step_count(),
            ema: self.ema.as_ref().map(|e| e.shadow().to_vec()),
            z_h: self.state.z_h.clone(),
            z_l: self.state.z_l.clone(),
        })
    }

    fn export_carry(&self) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        Ok((self.state.z_h.clone(), self.state.z_l.clone()))
    }

    fn import_state(&mut self, st: EngineState) -> Result<(), EngineError> {
        let n = self.ctx.dm.m() * self.ctx.dm.d;
        if st.z_h.len() != n || st.z_l.len() != n {
            return Err(EngineError::State(format!(
                "the carry has {} values, expected {n}",
                st.z_h.len()
            )));
        }
        self.eval_dense = None;
        self.params = st.params;
        self.master = self.layout.flatten(&self.params);
        self.adam = AdamAtan2::from_state(
            *self.adam.config(),
            st.adam_m,
            st.adam_v,
            st.optimizer_steps,
        )?;
        match (&mut self.ema, st.ema) {
            (Some(e), Some(shadow)) => *e = Ema::from_shadow(shadow, e.rate()),
            (Some(_), None) => {
                return Err(EngineError::State(
                    "the run uses EMA but the checkpoint has no EMA shadow".into(),
                ))
            }
            _ => {}
        }
        self.state = StepState::new(st.z_h, st.z_l);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;
    use crate::model::act;
    use crate::model::weights::Weights;
    use crate::optim::AdamAtan2Config;

    fn tiny() -> ArchConfig {
        let mut c = ArchConfig::trm_default(4, 12, 3);
        c.hidden_size = 8;
        c.num_heads = 2;
        c.puzzle_emb_ndim = 8;
        c.puzzle_emb_len = 1;
        c.h_cycles = 2;
        c.l_cycles = 1;
        c
    }

    /// With EMA the cached evaluation weights are exactly those of
    /// `eval_params()` (the shadow plus the live puzzle table), after every
    /// update and from the cache alike; the lent puzzle table comes back and
    /// the training carry is left as it was.
    #[test]
    fn ema_evaluation_follows_every_update() {
        let arch = tiny();
        let b = 2;
        let params = Params::from_weights(&arch, &Weights::init(&arch, 7)).unwrap();
        let cfg = EngineConfig {
            adam: AdamAtan2Config::default(),
            ema_rate: Some(0.5),
            puzzle_emb_weight_decay: 0.1,
        };
        let mut e = CpuEngine::new(arch.clone(), params, b, cfg);
        let inputs = [1, 2, 3, 4, 5, 6, 7, 8];
        let labels = [2, 3, 4, 5, -100, 7, 8, 9];
        let batch = Batch {
            inputs: &inputs,
            labels: &labels,
            puzzle_ids: &[1, 2],
            b,
        };
        let check = |e: &mut CpuEngine| {
            let want_params = e.eval_params().unwrap();
            let ctx = Ctx::new(&arch, b);
            let mut reference = CpuEval {
                ctx: &ctx,
                arch: &arch,
                params: &want_params,
            };
            let want = reference.eval_steps(&batch, 2).unwrap();
            let carry = (e.state.z_h.clone(), e.state.z_l.clone());
            assert_eq!(e.eval_steps(&batch, 2).unwrap(), want);
            assert_eq!(e.params.puzzle_emb, want_params.puzzle_emb);
            assert_eq!((e.state.z_h.clone(), e.state.z_l.clone()), carry);
        };
        let update = OptimStep {
            grad_scale: 0.5,
            lr: 1e-2,
            puzzle_emb_lr: 1e-2,
            update_dense: true,
        };
        for _ in 0..2 {
            e.reset_halted(&[true, true]).unwrap();
            act::act_step(&mut e, &arch, &batch, &[1, 1], None).unwrap();
            e.optimizer_step(&update, &[1, 2], &SingleProcess).unwrap();
            check(&mut e);
            assert!(e.eval_dense.is_some(), "the second call reads the cache");
            check(&mut e);
        }
        // The shadow lags the live weights, so the checks above compared
        // against something other than the live weights.
        assert_ne!(e.eval_params().unwrap().lm_head, e.params.lm_head);
        // A resume replaces the weights: the cache goes with them.
        e.import_state(e.export_state().unwrap()).unwrap();
        assert!(e.eval_dense.is_none());
        check(&mut e);
    }

    /// Without EMA evaluation borrows the live weights: no copy is kept.
    #[test]
    fn evaluation_without_ema_uses_the_live_weights() {
        let arch = tiny();
        let params = Params::from_weights(&arch, &Weights::init(&arch, 3)).unwrap();
        let cfg = EngineConfig {
            adam: AdamAtan2Config::default(),
            ema_rate: None,
            puzzle_emb_weight_decay: 0.1,
        };
        let mut e = CpuEngine::new(arch.clone(), params.clone(), 1, cfg);
        let batch = Batch {
            inputs: &[1, 2, 3, 4],
            labels: &[1, 2, 3, 4],
            puzzle_ids: &[2],
            b: 1,
        };
        let ctx = Ctx::new(&arch, 1);
        let mut reference = CpuEval {
            ctx: &ctx,
            arch: &arch,
            params: &params,
        };
        let want = reference.eval_steps(&batch, 3).unwrap();
        assert_eq!(e.eval_steps(&batch, 3).unwrap(), want);
        assert!(e.eval_dense.is_none());
    }
}
