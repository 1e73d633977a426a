//! CPU reference backend: one file per op family, each with paired
//! `*_forward` / `*_backward` functions and the backward's derivation in a
//! comment next to it. Same family names as `kernels/*.cu`.
//!
//! Design rule: ops are plain functions over row-major slices with explicit
//! dimension names (B batch, S tokens, D hidden, H heads, d head dim,
//! F SwiGLU width, V vocab); outputs go into caller-owned buffers. They are
//! generic over [`Real`] (f32 for real runs, f64 for finite-difference checks).

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod rmsnorm;
pub mod rope;
#[cfg(target_arch = "x86_64")]
pub mod sgemm;
pub mod stablemax_ce;
pub mod swiglu;
pub mod vmath;

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// The scalar types the reference ops run in: `f32` (real runs) and `f64`
/// (finite-difference checks and the float64 parts of the reference).
pub trait Real:
    num_traits::Float
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Default
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Converts from f64 (rounding for f32).
    fn of(x: f64) -> Self;
    /// Widens to f64.
    fn f64(self) -> f64;

    /// In place `x_i <- exp(x_i - shift)`; returns the sum of the new values.
    /// f32 overrides this with the vectorised [`vmath`] kernel.
    fn exp_shifted_sum(x: &mut [Self], shift: Self) -> Self {
        let mut sum = Self::zero();
        for v in x.iter_mut() {
            *v = (*v - shift).exp();
            sum += *v;
        }
        sum
    }

    /// Maximum of a slice (`-inf` when empty).
    fn max_of(x: &[Self]) -> Self {
        x.iter().copied().fold(Self::neg_infinity(), Self::max)
    }
}

impl Real for f32 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    fn exp_shifted_sum(x: &mut [Self], shift: Self) -> Self {
        vmath::exp_shifted_sum(x, shift)
    }
    fn max_of(x: &[Self]) -> Self {
        vmath::max(x)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}

/// Converts a slice between scalar types.
pub fn cast_slice<A: Real, B: Real>(x: &[A]) -> Vec<B> {
    x.iter().map(|&v| B::of(v.f64())).collect()
}

/// Shared helpers for the finite-difference gradient checks of every op.
#[cfg(test)]
pub(crate) mod testutil {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Uniform values in [-scale, scale), deterministic per seed.
    pub fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    /// Central-difference gradient of `f` at `x`, step `h`.
    pub fn numeric_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
        let mut xp = x.to_vec();
        let mut g = vec![0.0; x.len()];
        for i in 0..x.len() {
            let x0 = xp[i];
            xp[i] = x0 + h;
            let fp = f(&xp);
            xp[i] = x0 - h;
            let fm = f(&xp);
            xp[i] = x0;
            g[i] = (fp - fm) / (2.0 * h);
        }
        g
    }

    /// Asserts `||a - b|| / max(||b||, tiny) < tol`.
    pub fn assert_close(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
        assert_eq!(analytic.len(), numeric.len(), "{what}: length");
        let mut num = 0.0;
        let mut den = 0.0;
        for (a, b) in analytic.iter().zip(numeric) {
            num += (a - b) * (a - b);
            den += b * b;
        }
        let rel = num.sqrt() / den.sqrt().max(1e-12);
        assert!(
            rel < tol,
            "{what}: gradient check failed, rel err {rel:e} >= {tol:e}"
        );
    }

    /// A fixed random projection `sum_i w_i y_i` that turns an op output into
    /// a scalar loss, so dL/dy = w.
    pub fn dot(w: &[f64], y: &[f64]) -> f64 {
        w.iter().zip(y).map(|(a, b)| a * b).sum()
    }
}
