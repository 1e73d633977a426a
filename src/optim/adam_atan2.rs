//! AdamATan2 over one flat weight buffer: Adam with `atan2` in place of the
//! epsilon-guarded division (the `adam-atan2` 0.0.3 rule, `docs/optimizer.md`).

use rayon::prelude::*;

use super::{check_len, OptimError, Real};

/// Buffers shorter than this are updated on the calling thread: below it the
/// rayon hand-off costs more than the arithmetic.
const PARALLEL_MIN: usize = 1 << 16;
/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// Hyper-parameters that stay fixed over a run (the learning rate comes from the
/// schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamAtan2Config {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
}

impl Default for AdamAtan2Config {
    /// The reference's defaults: betas (0.9, 0.95), weight decay 0.1.
    fn default() -> Self {
        AdamAtan2Config {
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
        }
    }
}

/// Optimiser state: both moments (same layout as the weights) and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamAtan2<T: Real = f32> {
    config: AdamAtan2Config,
    m: Vec<T>,
    v: Vec<T>,
    step: u64,
}

/// The per-step scalars, rounded once to the weights' precision.
#[derive(Clone, Copy)]
struct StepScalars<T> {
    decay: T,
    mix1: T,
    mix2: T,
    step_size: T,
    sqrt_bc2: T,
}

impl<T: Real> AdamAtan2<T> {
    /// Fresh state (zero moments, step 0) for `len` weights.
    pub fn new(len: usize, config: AdamAtan2Config) -> Self {
        AdamAtan2 {
            config,
            m: vec![T::zero(); len],
            v: vec![T::zero(); len],
            step: 0,
        }
    }

    /// Restores a saved state (checkpoint resume).
    pub fn from_state(
        config: AdamAtan2Config,
        m: Vec<T>,
        v: Vec<T>,
        step: u64,
    ) -> Result<Self, OptimError> {
        check_len("AdamATan2 second moment", m.len(), v.len())?;
        Ok(AdamAtan2 { config, m, v, step })
    }

    pub fn config(&self) -> &AdamAtan2Config {
        &self.config
    }

    /// Steps taken so far (`t` of the last update).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// First moment `m`.
    pub fn exp_avg(&self) -> &[T] {
        &self.m
    }

    /// Second moment `v`.
    pub fn exp_avg_sq(&self) -> &[T] {
        &self.v
    }

    /// Number of weights the state covers.
    pub fn len(&self) -> usize {
        self.m.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// One update of `weights` with `grads` at learning rate `lr`; `t` is
    /// incremented first, so the first call is step 1.
    pub fn step(&mut self, weights: &mut [T], grads: &[T], lr: f64) -> Result<(), OptimError> {
        check_len("AdamATan2 weights", self.m.len(), weights.len())?;
        check_len("AdamATan2 gradients", self.m.len(), grads.len())?;
        self.step += 1;
        let t = self.step as f64;
        let c = &self.config;
        // Scalars in f64, as the reference prepares them on the host.
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2 = 1.0 - c.beta2.powf(t);
        let s = StepScalars {
            decay: T::from_f64(1.0 - lr * c.weight_decay),
            mix1: T::from_f64(1.0 - c.beta1),
            mix2: T::from_f64(1.0 - c.beta2),
            step_size: T::from_f64(lr / bc1),
            sqrt_bc2: T::from_f64(bc2.sqrt()),
        };
        if weights.len() < PARALLEL_MIN {
            update(weights, grads, &mut self.m, &mut self.v, s);
        } else {
            weights
                .par_chunks_mut(CHUNK)
                .zip(grads.par_chunks(CHUNK))
                .zip(self.m.par_chunks_mut(CHUNK))
                .zip(self.v.par_chunks_mut(CHUNK))
                .for_each(|(((w, g), m), v)| update(w, g, m, v, s));
        }
        Ok(())
    }
}

/// The element-wise rule over one chunk (all slices the same length).
fn update<T: Real>(w: &mut [T], g: &[T], m: &mut [T], v: &mut [T], s: StepScalars<T>) {
    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        // Decoupled weight decay first, with the raw learning rate.
        let decayed = *w * s.decay;
        *m = *m + s.mix1 * (g - *m);
        *v = *v + s.mix2 * (g * g - *v);
        // bc1 scales the step outside the atan2, bc2 sits inside it.
        let denom = v.sqrt() / s.sqrt_bc2;
        *w = decayed - s.step_size * m.atan2(denom);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Straightforward f64 AdamATan2, written from `docs/optimizer.md` only.
    struct Reference {
        m: Vec<f64>,
        v: Vec<f64>,
        t: i32,
    }

    impl Reference {
        fn step(&mut self, w: &mut [f64], g: &[f64], lr: f64, b1: f64, b2: f64, wd: f64) {
            self.t += 1;
            let bc1 = 1.0 - b1.powi(self.t);
            let bc2 = 1.0 - b2.powi(self.t);
            for i in 0..w.len() {
                w[i] *= 1.0 - lr * wd;
                self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
                self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
                w[i] -= lr / bc1 * f64::atan2(self.m[i], self.v[i].sqrt() / bc2.sqrt());
            }
        }
    }

    fn random(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    fn run_against_reference(n: usize, steps: usize) {
        let cfg = AdamAtan2Config::default();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let w0 = random(&mut rng, n, 1.0);
        let mut w_ref = w0.clone();
        let mut w32: Vec<f32> = w0.iter().map(|&x| x as f32).collect();
        let mut w64 = w0.clone();
        let mut reference = Reference {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        };
        let mut opt32 = AdamAtan2::<f32>::new(n, cfg);
        let mut opt64 = AdamAtan2::<f64>::new(n, cfg);
        for k in 0..steps {
            let lr = 1e-2 * (k + 1) as f64;
            // Gradient scales spread over decades: atan2 must not care.
            let g = random(&mut rng, n, 10f64.powi(k as i32 - 3));
            let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            reference.step(&mut w_ref, &g, lr, cfg.beta1, cfg.beta2, cfg.weight_decay);
            opt32.step(&mut w32, &g32, lr).unwrap();
            opt64.step(&mut w64, &g, lr).unwrap();
        }
        assert_eq!(opt32.step_count(), steps as u64);
        for i in 0..n {
            assert!(
                (w64[i] - w_ref[i]).abs() < 1e-12,
                "f64 weight {i}: {} vs {}",
                w64[i],
                w_ref[i]
            );
            assert!(
                (w32[i] as f64 - w_ref[i]).abs() < 2e-6,
                "f32 weight {i}: {} vs {}",
                w32[i],
                w_ref[i]
            );
            let m = reference.m[i];
            assert!((opt32.exp_avg()[i] as f64 - m).abs() <= 1e-6 * (1.0 + m.abs()));
        }
        // The weights really moved: the comparison is not between two copies of w0.
        let moved = (0..n).filter(|&i| (w_ref[i] - w0[i]).abs() > 1e-3).count();
        assert!(moved > n / 2, "only {moved} of {n} weights moved");
    }

    #[test]
    fn matches_f64_reference_over_several_steps() {
        run_against_reference(1000, 5);
    }

    #[test]
    fn matches_f64_reference_on_the_parallel_path() {
        run_against_reference(PARALLEL_MIN + 3 * CHUNK + 17, 3);
    }

    #[test]
    fn first_step_is_about_0_997_lr_sign_g() {
        // No weight decay so the step alone shows: at t = 1, m = 0.1 g and
        // sqrt(v / bc2) = |g|, so the step is (lr / 0.1) * atan(0.1) sign(g).
        let cfg = AdamAtan2Config {
            weight_decay: 0.0,
            ..AdamAtan2Config::default()
        };
        let lr = 1e-3;
        let grads = [3.0f32, -0.02, 1e-6, -500.0, 0.0];
        let mut w = [0.5f32; 5];
        let mut opt = AdamAtan2::new(5, cfg);
        opt.step(&mut w, &grads, lr).unwrap();
        let expected = 10.0 * 0.1f64.atan(); // 0.99669
        assert!((expected - 0.99669).abs() < 1e-5);
        for (i, &g) in grads.iter().enumerate() {
            let step = (0.5 - w[i] as f64) / lr;
            let want = if g == 0.0 {
                0.0
            } else {
                expected * g.signum() as f64
            };
            assert!(
                (step - want).abs() < 1e-3,
                "grad {g}: step {step} lr, want {want}"
            );
        }
    }

    #[test]
    fn weight_decay_is_applied_before_the_update_with_raw_lr() {
        // Zero gradient: m = v = 0, atan2(0, 0) = 0, so only the decay acts.
        let cfg = AdamAtan2Config::default();
        let mut w = [2.0f64, -4.0];
        let mut opt = AdamAtan2::new(2, cfg);
        opt.step(&mut w, &[0.0, 0.0], 0.5).unwrap();
        assert_eq!(w, [2.0 * 0.95, -4.0 * 0.95]);
        // With a gradient: w1 = w0 (1 - lr wd) - (lr / bc1) atan2(m, sqrt(v / bc2)),
        // the decay multiplying the old weight only (not the step).
        let mut w = [2.0f64];
        let mut opt = AdamAtan2::new(1, cfg);
        opt.step(&mut w, &[1.0], 0.5).unwrap();
        let want = 2.0 * (1.0 - 0.5 * 0.1) - 0.5 / 0.1 * 0.1f64.atan();
        assert!((w[0] - want).abs() < 1e-12, "{} vs {want}", w[0]);
    }

    #[test]
    fn rejects_mismatched_buffers_and_restores_state() {
        let mut opt = AdamAtan2::<f32>::new(3, AdamAtan2Config::default());
        let mut w = [1.0f32; 3];
        assert_eq!(
            opt.step(&mut w, &[0.0; 2], 1e-3),
            Err(OptimError::LengthMismatch {
                what: "AdamATan2 gradients",
                expected: 3,
                got: 2
            })
        );
        assert_eq!(opt.step_count(), 0);
        opt.step(&mut w, &[1.0, -1.0, 0.5], 1e-3).unwrap();
        let restored = AdamAtan2::from_state(
            *opt.config(),
            opt.exp_avg().to_vec(),
            opt.exp_avg_sq().to_vec(),
            opt.step_count(),
        )
        .unwrap();
        assert_eq!(restored, opt);
        assert!(
            AdamAtan2::<f32>::from_state(*opt.config(), vec![0.0; 2], vec![0.0; 3], 1).is_err()
        );
    }
}
