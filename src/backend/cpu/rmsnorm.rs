//! rmsnorm: post-norm residual `y = rmsnorm(x + r)` over rows of length D,
//! no learnable scale: `y = h / sqrt(mean(h^2) + eps)`, `h = x + r`.
//!
//! Design rule: the residual add is fused into the norm (one pass over the
//! row); forward keeps the per-row reciprocal RMS `rstd` [M] so the backward
//! needs only `y` and `rstd` (h = y / rstd is never needed explicitly).
//! Computed in the tensor's type (fp32 on the real path, like the reference).

use super::Real;
use rayon::prelude::*;

/// Rows per rayon task (keeps tasks big enough to amortise scheduling).
const ROWS_PER_TASK: usize = 64;

/// Forward: `y[M, D] = rmsnorm(x + r)`, `rstd[M] = 1 / sqrt(mean(h^2) + eps)`.
/// `r = None` normalises `x` alone. `y` may not alias `x`; use
/// [`rmsnorm_forward_inplace`] to normalise a buffer in place.
pub fn rmsnorm_forward<T: Real>(
    y: &mut [T],
    rstd: &mut [T],
    x: &[T],
    r: Option<&[T]>,
    d: usize,
    eps: f64,
) {
    let m = rstd.len();
    assert_eq!(x.len(), m * d, "rmsnorm_forward: x");
    assert_eq!(y.len(), m * d, "rmsnorm_forward: y");
    y.copy_from_slice(x);
    rmsnorm_forward_inplace(y, rstd, r, d, eps);
}

/// In-place forward: `h <- rmsnorm(h + r)`.
pub fn rmsnorm_forward_inplace<T: Real>(
    h: &mut [T],
    rstd: &mut [T],
    r: Option<&[T]>,
    d: usize,
    eps: f64,
) {
    let m = rstd.len();
    assert_eq!(h.len(), m * d, "rmsnorm_forward: h");
    let eps = T::of(eps);
    let inv_d = T::one() / T::of(d as f64);
    let row = |(hr, rs): (&mut [T], &mut T), rr: Option<&[T]>| {
        if let Some(rr) = rr {
            for (a, &b) in hr.iter_mut().zip(rr) {
                *a += b;
            }
        }
        let ss = sum_sq(hr);
        let inv = T::one() / (ss * inv_d + eps).sqrt();
        *rs = inv;
        for a in hr.iter_mut() {
            *a *= inv;
        }
    };
    match r {
        Some(r) => {
            assert_eq!(r.len(), m * d, "rmsnorm_forward: r");
            h.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
                .zip(r.par_chunks(d * ROWS_PER_TASK))
                .for_each(|((hc, sc), rc)| {
                    for ((hr, rs), rr) in hc.chunks_mut(d).zip(sc.iter_mut()).zip(rc.chunks(d)) {
                        row((hr, rs), Some(rr));
                    }
                });
        }
        None => {
            h.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
                .for_each(|(hc, sc)| {
                    for (hr, rs) in hc.chunks_mut(d).zip(sc.iter_mut()) {
                        row((hr, rs), None);
                    }
                });
        }
    }
}

/// Sum of squares with 8 independent accumulators (vectorises).
#[inline]
fn sum_sq<T: Real>(v: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = v.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s = T::zero();
    for &a in rem {
        s += a * a;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// Backward of [`rmsnorm_forward`], in place on the gradient: `g <- dL/dh`
/// given `g = dL/dy` on entry. The same gradient flows to both `x` and `r`.
///
/// Derivation: `y_i = h_i * s`, `s = (m + eps)^(-1/2)`, `m = (1/D) sum_j h_j^2`,
/// `ds/dh_j = -s^3 h_j / D`, so
/// `dh_j = s dy_j - (s^3 h_j / D) sum_i dy_i h_i = s (dy_j - y_j * (1/D) sum_i dy_i y_i)`.
pub fn rmsnorm_backward<T: Real>(g: &mut [T], y: &[T], rstd: &[T], d: usize) {
    let m = rstd.len();
    assert_eq!(g.len(), m * d, "rmsnorm_backward: g");
    assert_eq!(y.len(), m * d, "rmsnorm_backward: y");
    let inv_d = T::one() / T::of(d as f64);
    g.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(y.par_chunks(d * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .for_each(|((gc, yc), sc)| {
            for ((gr, yr), &s) in gc.chunks_mut(d).zip(yc.chunks(d)).zip(sc) {
                let mut dot = T::zero();
                for (&a, &b) in gr.iter().zip(yr) {
                    dot += a * b;
                }
                let c = dot * inv_d;
                for (a, &b) in gr.iter_mut().zip(yr) {
                    *a = s * (*a - b * c);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// f64 central differences, h = 1e-6; tolerance 1e-7 relative.
    #[test]
    fn rmsnorm_gradcheck() {
        let (m, d) = (5, 7);
        let x = rand_vec(1, m * d, 1.0);
        let r = rand_vec(2, m * d, 1.0);
        let proj = rand_vec(3, m * d, 1.0);
        let f = |x: &[f64]| {
            let mut y = vec![0.0; m * d];
            let mut s = vec![0.0; m];
            rmsnorm_forward(&mut y, &mut s, x, Some(&r), d, 1e-5);
            dot(&proj, &y)
        };
        let mut y = vec![0.0; m * d];
        let mut s = vec![0.0; m];
        rmsnorm_forward(&mut y, &mut s, &x, Some(&r), d, 1e-5);
        let mut g = proj.clone();
        rmsnorm_backward(&mut g, &y, &s, d);
        assert_close("dx", &g, &numeric_grad(&x, 1e-6, f), 1e-7);
        // y rows have mean square ~1
        for row in y.chunks(d) {
            let ms: f64 = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            assert!((ms - 1.0).abs() < 1e-3);
        }
    }
}
