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
        let params = self.eval_params();
        let mut net = CpuEval {
            ctx: &self.ctx,
            arch: &self.arch,
            params: &params,
        };
        net.eval_steps(batch, n)
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

    fn reset_halted(&mut self, halted: &[bool]) {
        let (s, d) = (self.ctx.dm.s, self.ctx.dm.d);
        for (b, _) in halted.iter().enumerate().filter(|(_, &h)| h) {
            for t in 0..s {
                let r = (b * s + t) * d;
                self.state.z_h[r..r + d].copy_from_slice(&self.params.h_init);
                self.state.z_l[r..r + d].copy_from_slice(&self.params.l_init);
            }
        }
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

    fn params(&self) -> Params<f32> {
        self.params.clone()
    }

    fn eval_params(&self) -> Params<f32> {
        match &self.ema {
            Some(ema) => {
                let mut p = self.params.clone();
                self.layout.unflatten(ema.shadow(), &mut p);
                p
            }
            None => self.params.clone(),
        }
    }

    fn export_state(&self) -> EngineState {
        EngineState {
            params: self.params.clone(),
            adam_m: self.adam.exp_avg().to_vec(),
            adam_v: self.adam.exp_avg_sq().to_vec(),
            optimizer_steps: self.adam.step_count(),
            ema: self.ema.as_ref().map(|e| e.shadow().to_vec()),
            z_h: self.state.z_h.clone(),
            z_l: self.state.z_l.clone(),
        }
    }

    fn import_state(&mut self, st: EngineState) -> Result<(), EngineError> {
        let n = self.ctx.dm.m() * self.ctx.dm.d;
        if st.z_h.len() != n || st.z_l.len() != n {
            return Err(EngineError::State(format!(
                "the carry has {} values, expected {n}",
                st.z_h.len()
            )));
        }
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
