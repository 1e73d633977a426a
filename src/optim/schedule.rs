//! Learning rate per step: linear warm-up, then a cosine decay to
//! `lr_min_ratio * lr` (spec section 7), as the reference's
//! `cosine_schedule_with_warmup_lr_lambda` computes it.

/// The schedule of one run; the same for every parameter group, each with its
/// own base learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineWarmup {
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_ratio: f64,
}

impl CosineWarmup {
    /// The learning rate at `step` (1-based: the count after the increment
    /// that starts a training step).
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        cosine_schedule_with_warmup(
            step,
            base_lr,
            self.warmup_steps,
            self.total_steps,
            self.min_ratio,
        )
    }
}

/// The reference's rule with its edge cases: a warm-up of 0 starts the cosine
/// at step 0; `total <= warmup` counts progress per step instead of dividing
/// by zero; the cosine part never goes below 0. Operations run in the
/// reference's order so the f64 results agree bit for bit.
pub fn cosine_schedule_with_warmup(
    step: u64,
    base_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
    min_ratio: f64,
) -> f64 {
    if step < warmup_steps {
        return base_lr * step as f64 / warmup_steps.max(1) as f64;
    }
    let span = (total_steps as i128 - warmup_steps as i128).max(1);
    let progress = (step - warmup_steps) as f64 / span as f64;
    let cosine = (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    base_lr * (min_ratio + cosine.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 * b.abs().max(1e-300)
    }

    #[test]
    fn warm_up_is_linear_and_reaches_lr_at_its_end() {
        let s = CosineWarmup {
            warmup_steps: 2000,
            total_steps: 12000,
            min_ratio: 0.1,
        };
        assert_eq!(s.lr(1e-4, 0), 0.0);
        assert!(close(s.lr(1e-4, 1), 5e-8));
        assert!(close(s.lr(1e-4, 1000), 5e-5));
        assert!(close(s.lr(1e-4, 1999), 9.995e-5));
        // step == warmup: progress 0, the full learning rate.
        assert!(close(s.lr(1e-4, 2000), 1e-4));
    }

    #[test]
    fn cosine_mid_and_end_with_min_ratio() {
        let s = CosineWarmup {
            warmup_steps: 2000,
            total_steps: 12000,
            min_ratio: 0.1,
        };
        // progress 0.5: cos = 0 -> 0.1 + 0.9 * 0.5 = 0.55
        assert!(close(s.lr(1e-4, 7000), 5.5e-5));
        // progress 0.25: 0.1 + 0.45 * (1 + cos(pi / 4)) = 0.86819805153394...
        assert!(close(s.lr(1.0, 4500), 0.868_198_051_533_946_4));
        // step == total: cos(pi) = -1 -> exactly the minimum.
        assert!(close(s.lr(1e-4, 12000), 1e-5));
        // The puzzle-embedding group: same shape, its own base.
        assert!(close(s.lr(1e-2, 7000), 5.5e-3));
    }

    #[test]
    fn min_ratio_one_is_constant_after_warm_up() {
        // The reference ARC config: lr_min_ratio 1.0.
        let s = CosineWarmup {
            warmup_steps: 4,
            total_steps: 100,
            min_ratio: 1.0,
        };
        assert_eq!(s.lr(1e-4, 2), 1e-4 * 2.0 / 4.0);
        for step in [4, 5, 50, 99, 100] {
            assert_eq!(s.lr(1e-4, step), 1e-4);
        }
    }

    #[test]
    fn zero_warm_up_and_degenerate_totals() {
        let s = CosineWarmup {
            warmup_steps: 0,
            total_steps: 10,
            min_ratio: 0.0,
        };
        assert_eq!(s.lr(2.0, 0), 2.0);
        assert!(close(s.lr(2.0, 5), 1.0));
        assert!(s.lr(2.0, 10).abs() < 1e-15);
        // total <= warmup: progress is counted per step (max(1, total - warmup)).
        let s = CosineWarmup {
            warmup_steps: 10,
            total_steps: 5,
            min_ratio: 0.0,
        };
        assert_eq!(s.lr(1.0, 10), 1.0);
        // progress 1 -> cos(pi) = -1 -> 0
        assert!(s.lr(1.0, 11).abs() < 1e-15);
    }
}
