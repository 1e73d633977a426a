//! swiglu: the gated activation between `gate_up_proj` and `down_proj`.
//! `gu` [M, 2F] holds `[g | u]` (gate = first F columns), `a = silu(g) * u` [M, F].
//!
//! Design rule: only the elementwise middle lives here; the two projections
//! are `linear` calls. Backward needs `gu` (kept by the caller), nothing else.

use super::Real;
use rayon::prelude::*;

/// Forward: `a[m, j] = silu(g[m, j]) * u[m, j]`, `silu(g) = g * sigmoid(g)`.
/// `exp(-g)` is computed a row at a time by the (vectorised) `Real` kernel.
pub fn swiglu_forward<T: Real>(a: &mut [T], gu: &[T], f: usize) {
    let m = a.len() / f;
    assert_eq!(a.len(), m * f, "swiglu_forward: a");
    assert_eq!(gu.len(), m * 2 * f, "swiglu_forward: gu");
    a.par_chunks_mut(f)
        .zip(gu.par_chunks(2 * f))
        .for_each(|(ar, gur)| {
            let (g, u) = gur.split_at(f);
            for (e, &gj) in ar.iter_mut().zip(g) {
                *e = -gj;
            }
            T::exp_shifted_sum(ar, T::zero());
            for j in 0..f {
                ar[j] = g[j] * u[j] / (T::one() + ar[j]);
            }
        });
}

/// Backward: given `da` [M, F], writes `dgu` [M, 2F].
/// `da/du = silu(g)`, `d silu(g)/dg = s + g s (1 - s) = s (1 + g (1 - s))`,
/// `s = sigmoid(g)`; so `dg = da * u * s (1 + g (1 - s))`, `du = da * g s`.
pub fn swiglu_backward<T: Real>(dgu: &mut [T], da: &[T], gu: &[T], f: usize) {
    let m = da.len() / f;
    assert_eq!(da.len(), m * f, "swiglu_backward: da");
    assert_eq!(gu.len(), m * 2 * f, "swiglu_backward: gu");
    assert_eq!(dgu.len(), m * 2 * f, "swiglu_backward: dgu");
    dgu.par_chunks_mut(2 * f)
        .zip(da.par_chunks(f))
        .zip(gu.par_chunks(2 * f))
        .for_each(|((dr, dar), gur)| {
            let (g, u) = gur.split_at(f);
            let (dg, du) = dr.split_at_mut(f);
            // dg holds exp(-g), then sigmoid(g), then the gradient
            for (e, &gj) in dg.iter_mut().zip(g) {
                *e = -gj;
            }
            T::exp_shifted_sum(dg, T::zero());
            for j in 0..f {
                let s = T::one() / (T::one() + dg[j]);
                dg[j] = dar[j] * u[j] * s * (T::one() + g[j] * (T::one() - s));
                du[j] = dar[j] * g[j] * s;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// f64 central differences, h = 1e-6; tolerance 1e-7.
    #[test]
    fn swiglu_gradcheck() {
        let (m, f) = (3, 5);
        let gu = rand_vec(1, m * 2 * f, 3.0);
        let proj = rand_vec(2, m * f, 1.0);
        let fwd = |gu: &[f64]| {
            let mut a = vec![0.0; m * f];
            swiglu_forward(&mut a, gu, f);
            dot(&proj, &a)
        };
        let mut dgu = vec![0.0; m * 2 * f];
        swiglu_backward(&mut dgu, &proj, &gu, f);
        assert_close("dgu", &dgu, &numeric_grad(&gu, 1e-6, fwd), 1e-7);
    }
}
