//! stablemax_ce: stablemax cross-entropy over the vocabulary (the LM loss) and
//! BCE-with-logits (the Q-halt loss).
//!
//! stablemax: `s(x) = 1 / (1 - x + 1e-30)` for `x < 0`, else `x + 1`;
//! `log p_i = log(s(x_i) / sum_j s(x_j))`; per-token loss `-log p_label`,
//! 0 where `label == IGNORE_LABEL` (-100).
//!
//! Design rule: like the reference, the math runs in float64 whatever the
//! logits' type (logits are widened, the gradient is rounded back); losses are
//! returned per token so the caller applies its own weighting (1/n per sample).

use super::Real;
use rayon::prelude::*;

/// Label value excluded from the loss.
pub const IGNORE_LABEL: i32 = -100;

/// The reference's epsilon inside `s(x)` for negative x.
const S_EPS: f64 = 1e-30;

#[inline(always)]
fn s_and_ds(x: f64) -> (f64, f64) {
    if x < 0.0 {
        let s = 1.0 / (1.0 - x + S_EPS);
        (s, s * s)
    } else {
        (x + 1.0, 1.0)
    }
}

/// Forward: `loss[n] = -log p(labels[n])` (f64) for each of the N rows of
/// `logits` [N, V]; 0 for ignored rows. Labels must be -100 or in `0..V`.
pub fn stablemax_ce_forward<T: Real>(loss: &mut [f64], logits: &[T], labels: &[i32], v: usize) {
    let n = labels.len();
    assert_eq!(loss.len(), n, "stablemax_ce_forward: loss");
    assert_eq!(logits.len(), n * v, "stablemax_ce_forward: logits");
    loss.par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(labels.par_iter())
        .for_each(|((l, row), &lab)| {
            if lab == IGNORE_LABEL {
                *l = 0.0;
                return;
            }
            assert!(
                lab >= 0 && (lab as usize) < v,
                "stablemax_ce: label {lab} out of range"
            );
            let sum: f64 = row.iter().map(|&x| s_and_ds(x.f64()).0).sum();
            let sy = s_and_ds(row[lab as usize].f64()).0;
            *l = -(sy / sum).ln();
        });
}

/// Backward: `dlogits[n, :] = dloss[n] * d(-log p_label)/dx` (0 for ignored rows).
///
/// `-log p_y = -log s(x_y) + log sum_j s(x_j)`, so
/// `d/dx_j = s'(x_j) / sum_k s(x_k) - [j == y] s'(x_y) / s(x_y)`,
/// with `s'(x) = s(x)^2` for `x < 0` and `1` otherwise.
pub fn stablemax_ce_backward<T: Real>(
    dlogits: &mut [T],
    dloss: &[f64],
    logits: &[T],
    labels: &[i32],
    v: usize,
) {
    let n = labels.len();
    assert_eq!(dloss.len(), n, "stablemax_ce_backward: dloss");
    assert_eq!(logits.len(), n * v, "stablemax_ce_backward: logits");
    assert_eq!(dlogits.len(), n * v, "stablemax_ce_backward: dlogits");
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(labels.par_iter().zip(dloss.par_iter()))
        .for_each(|((drow, row), (&lab, &g))| {
            if lab == IGNORE_LABEL {
                drow.fill(T::zero());
                return;
            }
            let y = lab as usize;
            let sum: f64 = row.iter().map(|&x| s_and_ds(x.f64()).0).sum();
            for (j, (dx, &x)) in drow.iter_mut().zip(row).enumerate() {
                let (s, ds) = s_and_ds(x.f64());
                let mut val = ds / sum;
                if j == y {
                    val -= ds / s;
                }
                *dx = T::of(g * val);
            }
        });
}

/// BCE with logits, one element, in the precision `T` of the logits (the
/// reference runs it in f32): `(1 - y) x - log_sigmoid(x)` with
/// `log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|))`, the same formula as
/// PyTorch, so f32 results agree bit for bit in the usual cases.
pub fn bce_with_logits_forward<T: Real>(x: T, y: T) -> T {
    let log_sig = x.min(T::zero()) - (-x.abs()).exp().ln_1p();
    (T::one() - y) * x - log_sig
}

/// Backward of [`bce_with_logits_forward`] w.r.t. x:
/// `d/dx [(1 - y) x - log sigmoid(x)] = 1 - y - (1 - sigmoid(x)) = sigmoid(x) - y`.
pub fn bce_with_logits_backward<T: Real>(x: T, y: T) -> T {
    T::one() / (T::one() + (-x).exp()) - y
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// f64 central differences, h = 1e-6; tolerance 1e-6 (the kink of s at 0
    /// is kept away from by the random logits).
    #[test]
    fn stablemax_ce_gradcheck() {
        let (n, v) = (6, 5);
        let logits = rand_vec(1, n * v, 3.0);
        let labels = [0, 4, IGNORE_LABEL, 2, 1, 3];
        let w = rand_vec(2, n, 1.0);
        let f = |x: &[f64]| {
            let mut l = vec![0.0; n];
            stablemax_ce_forward(&mut l, x, &labels, v);
            dot(&w, &l)
        };
        let mut d = vec![0.0; n * v];
        stablemax_ce_backward(&mut d, &w, &logits, &labels, v);
        assert_close("dlogits", &d, &numeric_grad(&logits, 1e-6, f), 1e-6);
        assert!(d[2 * v..3 * v].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn stablemax_probabilities_sum_to_one() {
        let v = 4;
        let logits = [-2.0f32, 0.5, 3.0, -0.1];
        let mut total = 0.0;
        for lab in 0..v as i32 {
            let mut l = [0.0];
            stablemax_ce_forward(&mut l, &logits, &[lab], v);
            total += (-l[0]).exp();
        }
        assert!((total - 1.0).abs() < 1e-12);
    }

    /// f64 central differences, tolerance 1e-7.
    #[test]
    fn bce_gradcheck() {
        for &(x, y) in &[(-3.0f64, 0.0f64), (0.7, 1.0), (25.0, 0.0), (-0.2, 1.0)] {
            let num = (bce_with_logits_forward(x + 1e-6, y) - bce_with_logits_forward(x - 1e-6, y))
                / 2e-6;
            let ana = bce_with_logits_backward(x, y);
            assert!((num - ana).abs() < 1e-7 * (1.0 + ana.abs()), "{x} {y}");
        }
        // matches the naive formula where that is stable
        let (x, y) = (0.3f64, 1.0f64);
        let sig = 1.0 / (1.0 + (-x).exp());
        let naive = -(y * sig.ln() + (1.0 - y) * (1.0 - sig).ln());
        assert!((bce_with_logits_forward(x, y) - naive).abs() < 1e-12);
    }
}
