//! Evaluation during a run: the test split through the shared evaluation
//! loop, the ARC evaluators, and the log line.

use std::collections::BTreeMap;
use std::path::Path;

use super::run::arc_pass_ks;
use super::state::TrainerState;
use super::Result;
use crate::config::RunConfig;
use crate::data::loader::PuzzleDataset;
use crate::dist::Collective;
use crate::eval::gather::gather_outputs;
use crate::eval::ArcEvaluator;
use crate::loss::StepMetrics;
use crate::model::act::{evaluate_with, EvalOutputs};

impl TrainerState {
    /// Runs this rank's rows of every test batch for `halt_max_steps` steps
    /// (spec section 5, evaluation) on the engine's own evaluation network
    /// (its device, its evaluation weights: the EMA shadow when EMA is on)
    /// and returns the per-set metric sums over every rank and the outputs
    /// of every rank, in the order one rank would produce them (so voting
    /// sees the same outputs whatever the world size). A collective: every
    /// rank calls it. The training carry is kept.
    pub fn evaluate(
        &mut self,
        test: &PuzzleDataset,
        coll: &dyn Collective,
    ) -> Result<(BTreeMap<String, StepMetrics>, EvalOutputs)> {
        let mut batch_rows = Vec::new();
        let (metrics, outs) = evaluate_with(
            &mut *self.engine,
            &self.dm,
            &self.arch,
            test.test_batches(),
            test.metadata().blank_identifier_id,
            coll,
            &mut |rows| batch_rows.push(rows),
        )?;
        let outs = gather_outputs(outs, &batch_rows, coll)?;
        Ok((metrics, outs))
    }
}

/// The run's ARC evaluators (`arc@ARC` in `evaluators`) on rank 0, on the
/// first test dataset as the reference does; `pass_Ks` in an evaluator's
/// options overrides its K list. None without a test split.
pub(super) fn arc_evaluators(
    cfg: &RunConfig,
    has_test: bool,
    rank: usize,
) -> Result<Vec<ArcEvaluator>> {
    let arc_ks = if has_test {
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
    if rank != 0 {
        return Ok(Vec::new());
    }
    Ok(arc_ks
        .iter()
        .map(|ks| ArcEvaluator::new(&eval_data_dir, ks))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// One evaluation of the run at the state's step: metrics per test set,
/// then (rank 0) each ARC evaluator, whose results are written under
/// `dir/evaluator_ARC_step_<step>`. Returns the log of the evaluation.
pub(super) fn evaluate_run(
    st: &mut TrainerState,
    test: &PuzzleDataset,
    arc_evals: &mut [ArcEvaluator],
    dir: &Path,
    coll: &dyn Collective,
) -> Result<Vec<(String, f64)>> {
    let (per_set, outs) = st.evaluate(test, coll)?;
    let mut log = Vec::new();
    for (set, m) in &per_set {
        log.extend(m.eval_view(set));
    }
    if coll.rank() == 0 {
        for ev in arc_evals.iter_mut() {
            ev.clear();
            ev.add(&outs)?;
            let res = ev.result();
            let out_dir = dir.join(format!("evaluator_ARC_step_{}", st.step));
            crate::eval::write_results(&out_dir, &res)?;
            log.extend(res.metrics.iter().cloned());
        }
    }
    Ok(log)
}

/// The line printed after an evaluation: its headline numbers.
pub(super) fn summary_line(step: u64, log: &[(String, f64)]) -> String {
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
    format!("eval at step {}: {}", step, summary.join(", "))
}
