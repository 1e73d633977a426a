//! Exponential moving average of the dense weights, used for evaluation and
//! checkpoints when `ema` is on (`docs/optimizer.md`, "EMA").

use rayon::prelude::*;

use super::{check_len, OptimError, Real};

const PARALLEL_MIN: usize = 1 << 16;
const CHUNK: usize = 1 << 14;

/// The shadow copy of the flat weight buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Ema<T: Real = f32> {
    rate: f64,
    shadow: Vec<T>,
}

impl<T: Real> Ema<T> {
    /// Starts the shadow as a copy of `weights`.
    pub fn new(weights: &[T], rate: f64) -> Self {
        Ema {
            rate,
            shadow: weights.to_vec(),
        }
    }

    /// Restores a saved shadow.
    pub fn from_shadow(shadow: Vec<T>, rate: f64) -> Self {
        Ema { rate, shadow }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn shadow(&self) -> &[T] {
        &self.shadow
    }

    /// `shadow <- (1 - rate) * w + rate * shadow`, after an optimiser step.
    pub fn update(&mut self, weights: &[T]) -> Result<(), OptimError> {
        check_len("EMA weights", self.shadow.len(), weights.len())?;
        // Both factors rounded from f64 once, as the reference multiplies its
        // fp32 tensors by Python floats.
        let keep = T::from_f64(self.rate);
        let take = T::from_f64(1.0 - self.rate);
        let blend = |s: &mut [T], w: &[T]| {
            for (s, &w) in s.iter_mut().zip(w) {
                *s = take * w + keep * *s;
            }
        };
        if weights.len() < PARALLEL_MIN {
            blend(&mut self.shadow, weights);
        } else {
            self.shadow
                .par_chunks_mut(CHUNK)
                .zip(weights.par_chunks(CHUNK))
                .for_each(|(s, w)| blend(s, w));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_steps_by_hand() {
        let mut w = vec![1.0f64, -2.0];
        let mut ema = Ema::new(&w, 0.9);
        assert_eq!(ema.shadow(), &[1.0, -2.0]);
        w = vec![2.0, 0.0];
        ema.update(&w).unwrap();
        // 0.1 * 2 + 0.9 * 1 = 1.1 ; 0.1 * 0 + 0.9 * -2 = -1.8
        assert!((ema.shadow()[0] - 1.1).abs() < 1e-15);
        assert!((ema.shadow()[1] + 1.8).abs() < 1e-15);
        w = vec![0.0, 10.0];
        ema.update(&w).unwrap();
        // 0.9 * 1.1 = 0.99 ; 1 + 0.9 * -1.8 = -0.62
        assert!((ema.shadow()[0] - 0.99).abs() < 1e-15);
        assert!((ema.shadow()[1] + 0.62).abs() < 1e-15);
    }

    #[test]
    fn f32_rate_0_999_and_parallel_path() {
        let n = PARALLEL_MIN + CHUNK + 5;
        let w0: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let mut ema = Ema::new(&w0, 0.999);
        let w1 = vec![1000.0f32; n];
        ema.update(&w1).unwrap();
        for i in [0, 1, 6, n - 1] {
            let want = 0.001 * 1000.0 + 0.999 * (i % 7) as f64;
            assert!((ema.shadow()[i] as f64 - want).abs() < 1e-5, "{i}");
        }
        assert!(ema.update(&w1[1..]).is_err());
    }
}
