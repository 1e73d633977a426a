//! ACT loss-head metrics (spec section 6): per-step sums over the halted
//! samples that have at least one label, and how train and eval normalise them.
//!
//! Design rule: [`StepMetrics`] holds sums only (like the reference's metric
//! tensors), so summing over batches or ranks is a plain add; the division
//! happens once, at logging time: train losses by the global batch size,
//! everything else by `count`; eval everything by `count`.

use crate::model::trm::LossOut;

/// Summed metrics of one step (or of many, after [`StepMetrics::add`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepMetrics {
    /// Halted samples with at least one label.
    pub count: f64,
    /// Sum over counted samples of (correct tokens / labelled tokens).
    pub accuracy: f64,
    /// Counted samples with every labelled token right.
    pub exact_accuracy: f64,
    /// Counted samples where `(q_halt >= 0) == seq_correct`.
    pub q_halt_accuracy: f64,
    /// Sum of the ACT step counts of the counted samples.
    pub steps: f64,
    /// Losses of the whole batch (every sample, halted or not).
    pub lm_loss: f64,
    pub q_halt_loss: f64,
    pub q_continue_loss: f64,
    /// Whether a Q-continue loss exists (no_ACT_continue = false).
    pub has_q_continue: bool,
}

impl StepMetrics {
    /// Metrics of one ACT step from its loss head output, the q_halt logits
    /// `q_halt[b]`, the halted flags and step counts after the step.
    pub fn from_step(
        loss: &LossOut,
        q_halt: &[f32],
        halted: &[bool],
        steps: &[i32],
        has_q_continue: bool,
    ) -> StepMetrics {
        let mut m = StepMetrics {
            lm_loss: loss.lm_loss,
            q_halt_loss: loss.q_halt_loss,
            q_continue_loss: loss.q_continue_loss,
            has_q_continue,
            ..StepMetrics::default()
        };
        for b in 0..halted.len() {
            let n = loss.counts[b];
            if !halted[b] || n == 0 {
                continue;
            }
            m.count += 1.0;
            m.accuracy += loss.correct[b] as f64 / n as f64;
            m.exact_accuracy += loss.seq_correct[b] as u8 as f64;
            m.q_halt_accuracy += ((q_halt[b] >= 0.0) == loss.seq_correct[b]) as u8 as f64;
            m.steps += steps[b] as f64;
        }
        m
    }

    /// Sums two sets of metrics (batches, ranks).
    pub fn add(&mut self, o: &StepMetrics) {
        self.count += o.count;
        self.accuracy += o.accuracy;
        self.exact_accuracy += o.exact_accuracy;
        self.q_halt_accuracy += o.q_halt_accuracy;
        self.steps += o.steps;
        self.lm_loss += o.lm_loss;
        self.q_halt_loss += o.q_halt_loss;
        self.q_continue_loss += o.q_continue_loss;
        self.has_q_continue |= o.has_q_continue;
    }

    fn named(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("accuracy", self.accuracy),
            ("exact_accuracy", self.exact_accuracy),
            ("q_halt_accuracy", self.q_halt_accuracy),
            ("steps", self.steps),
            ("lm_loss", self.lm_loss),
            ("q_halt_loss", self.q_halt_loss),
        ];
        if self.has_q_continue {
            v.push(("q_continue_loss", self.q_continue_loss));
        }
        v
    }

    /// Training view, as the reference logs it: `train/<k>`, losses divided
    /// by the global batch size, the rest by `count`. A step where no sample
    /// halted logs only the losses: the reference logs 0 accuracies there,
    /// which reads as a collapse in every chart.
    pub fn train_view(&self, global_batch_size: usize) -> Vec<(String, f64)> {
        let count = self.count;
        self.named()
            .into_iter()
            .filter(|(k, _)| count > 0.0 || k.ends_with("loss"))
            .map(|(k, v)| {
                let div = if k.ends_with("loss") {
                    global_batch_size as f64
                } else {
                    count
                };
                (format!("train/{k}"), v / div)
            })
            .collect()
    }

    /// Evaluation view: `<set>/<k>`, everything divided by `count` (NaN when
    /// nothing was counted, as the reference would produce).
    pub fn eval_view(&self, set_name: &str) -> Vec<(String, f64)> {
        self.named()
            .into_iter()
            .map(|(k, v)| (format!("{set_name}/{k}"), v / self.count))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(counts: Vec<usize>, correct: Vec<usize>) -> LossOut {
        let seq_correct = counts.iter().zip(&correct).map(|(n, c)| n == c).collect();
        LossOut {
            loss: 3.0,
            lm_loss: 2.0,
            q_halt_loss: 2.0,
            q_continue_loss: 0.0,
            counts,
            seq_correct,
            correct,
        }
    }

    #[test]
    fn counts_only_halted_samples_with_labels() {
        // sample 0: halted, 4/4 right; 1: halted, 1/4; 2: not halted; 3: halted, no labels
        let l = loss(vec![4, 4, 4, 0], vec![4, 1, 4, 0]);
        let m = StepMetrics::from_step(
            &l,
            &[1.0, 0.5, 1.0, 1.0],
            &[true, true, false, true],
            &[3, 2, 1, 5],
            false,
        );
        assert_eq!(m.count, 2.0);
        assert_eq!(m.accuracy, 1.25);
        assert_eq!(m.exact_accuracy, 1.0);
        // sample 0: q >= 0 and correct -> right; sample 1: q >= 0 but wrong -> wrong
        assert_eq!(m.q_halt_accuracy, 1.0);
        assert_eq!(m.steps, 5.0);
        let t: std::collections::BTreeMap<_, _> = m.train_view(4).into_iter().collect();
        assert_eq!(t["train/accuracy"], 0.625);
        assert_eq!(t["train/lm_loss"], 0.5);
        assert_eq!(t["train/steps"], 2.5);
        assert!(!t.contains_key("train/q_continue_loss"));
        let e: std::collections::BTreeMap<_, _> = m.eval_view("all").into_iter().collect();
        assert_eq!(e["all/lm_loss"], 1.0);
        let none = StepMetrics::from_step(&l, &[1.0; 4], &[false; 4], &[1; 4], false);
        let t: Vec<String> = none.train_view(4).into_iter().map(|(k, _)| k).collect();
        assert_eq!(t, ["train/lm_loss", "train/q_halt_loss"]);
        let mut sum = m;
        sum.add(&m);
        assert_eq!(sum.count, 4.0);
        assert_eq!(sum.eval_view("all"), m.eval_view("all"));
    }
}
