//! attention: non-causal multi-head softmax attention over a fused qkv buffer.
//! `qkv` [B, S, 3*H*d] (per token: q heads, then k heads, then v heads, each
//! H x d, RoPE already applied), output `o` [B, S, H*d] (heads concatenated,
//! the input of `o_proj`). Scores `x = (1/sqrt(d)) q k^T`, `P = softmax_rows(x)`,
//! `o = P v`.
//!
//! Design rule (memory vs. compute): the forward stores only the row
//! log-sum-exp `lse` [B, H, S]; the backward RECOMPUTES `P = exp(x - lse)`
//! with one extra `q k^T` GEMM per head instead of storing P. Storing P would
//! cost B*H*S*S floats per attention call, and the gradient cycle has
//! (L_cycles + 1) * L_layers calls: ~270 MB at B 1, S 916, H 8, over 1 GB at
//! B 4, for a ~5% saving of step time. This is also the flash-attention
//! contract the CUDA kernel will follow (same `lse` tensor). Each (b, h) pair is
//! one rayon task (its GEMMs single-threaded when the tasks fill the threads);
//! the forward walks query blocks of [`Q_BLOCK`] rows so its scores stay in
//! cache; every matmul is a strided product (no transposes copied), and the
//! right-hand sides shared by all query blocks (K^T, V, ...) are prepared
//! ([`Rhs`], packed for the f32 GEMM) once per head.

use super::linear::{matmul_rhs, matmul_with, Mat, Rhs};
use super::Real;
use rayon::prelude::*;

/// True when the (b, h) tasks alone keep every thread busy, so each task's
/// GEMMs run single-threaded (nested fork-joins cost more than they give).
fn heads_fill_threads(tasks: usize) -> bool {
    tasks >= rayon::current_num_threads()
}

/// Query rows per block: a block of scores (Q_BLOCK x S floats) stays in
/// cache through the QK^T product, the softmax and the PV product, and the
/// scratch is Q_BLOCK x S instead of S x S. (256 measured fastest at S 916
/// against 64 and 128, and against one block of S.)
const Q_BLOCK: usize = 256;

/// Grows a per-task scratch buffer to `n` values. Its contents are stale:
/// every caller overwrites the whole buffer (GEMM with accumulate = false).
fn scratch<T: Real>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::zero());
    }
    &mut buf[..n]
}

/// Forward: writes `o` [B, S, H*d] and `lse` [B, H, S].
///
/// Per row the softmax is left unnormalised (`exp(x - max)`, one pass) and
/// `P v` is divided by the row sum afterwards: S*d divisions instead of S*S.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Real>(
    o: &mut [T],
    lse: &mut [T],
    qkv: &[T],
    b: usize,
    s: usize,
    h: usize,
    d: usize,
) {
    let dm = h * d;
    assert_eq!(qkv.len(), b * s * 3 * dm, "attention_forward: qkv");
    assert_eq!(o.len(), b * s * dm, "attention_forward: o");
    assert_eq!(lse.len(), b * h * s, "attention_forward: lse");
    let scale = T::one() / T::of(d as f64).sqrt();
    let inner_par = !heads_fill_threads(b * h);
    let results: Vec<(Vec<T>, Vec<T>)> = (0..b * h)
        .into_par_iter()
        .map_init(Vec::new, |pbuf, bh| {
            let (bi, hi) = (bh / h, bh % h);
            let base = bi * s * 3 * dm + hi * d;
            let kv = Mat::strided(&qkv[base + dm..], s, d, 3 * dm);
            let vv = Mat::strided(&qkv[base + 2 * dm..], s, d, 3 * dm);
            // K^T and V serve every query block: prepared (packed) once.
            let (kt, vr) = (Rhs::new(kv.t(), inner_par), Rhs::new(vv, inner_par));
            let mut l = vec![T::zero(); s];
            let mut ol = vec![T::zero(); s * d];
            // query blocks keep the scores block in L2 between its three passes
            let qb = Q_BLOCK.min(s);
            let p = scratch(pbuf, qb * s);
            for q0 in (0..s).step_by(qb) {
                let rows = qb.min(s - q0);
                let p = &mut p[..rows * s];
                let qblk = Mat::strided(&qkv[base + q0 * 3 * dm..], rows, d, 3 * dm);
                matmul_rhs(p, s, qblk, &kt, scale, false, inner_par);
                let mut inv = vec![T::zero(); rows];
                for ((row, lr), ir) in p
                    .chunks_exact_mut(s)
                    .zip(l[q0..q0 + rows].iter_mut())
                    .zip(inv.iter_mut())
                {
                    let m = T::max_of(row);
                    let sum = T::exp_shifted_sum(row, m);
                    *lr = m + sum.ln();
                    *ir = T::one() / sum;
                }
                let oblk = &mut ol[q0 * d..(q0 + rows) * d];
                matmul_rhs(
                    oblk,
                    d,
                    Mat::rm(p, rows, s),
                    &vr,
                    T::one(),
                    false,
                    inner_par,
                );
                for (orow, &ir) in oblk.chunks_exact_mut(d).zip(&inv) {
                    for x in orow.iter_mut() {
                        *x *= ir;
                    }
                }
            }
            (ol, l)
        })
        .collect();
    for (bh, (ol, l)) in results.into_iter().enumerate() {
        let (bi, hi) = (bh / h, bh % h);
        lse[bh * s..(bh + 1) * s].copy_from_slice(&l);
        for si in 0..s {
            let dst = (bi * s + si) * dm + hi * d;
            o[dst..dst + d].copy_from_slice(&ol[si * d..(si + 1) * d]);
        }
    }
}

/// Backward: given `dout` [B, S, H*d], overwrites `dqkv` [B, S, 3*H*d].
///
/// With `P` recomputed from `lse`, per head:
/// `dV = P^T dO`; `dP = dO V^T`; softmax backward
/// `dX_st = P_st (dP_st - sum_u P_su dP_su)` (the row sum equals `dO_s . o_s`);
/// `x = c q k^T` (c = 1/sqrt(d)) gives `dQ = c dX K`, `dK = c dX^T Q`.
/// Walked in query blocks: a block's rows of P, dP and dQ are complete in
/// themselves, and dV, dK are sums over the blocks.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    lse: &[T],
    b: usize,
    s: usize,
    h: usize,
    d: usize,
) {
    let dm = h * d;
    assert_eq!(qkv.len(), b * s * 3 * dm, "attention_backward: qkv");
    assert_eq!(dqkv.len(), b * s * 3 * dm, "attention_backward: dqkv");
    assert_eq!(dout.len(), b * s * dm, "attention_backward: dout");
    assert_eq!(lse.len(), b * h * s, "attention_backward: lse");
    let scale = T::one() / T::of(d as f64).sqrt();
    let inner_par = !heads_fill_threads(b * h);
    let results: Vec<[Vec<T>; 3]> = (0..b * h)
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(pbuf, dpbuf), bh| {
                let (bi, hi) = (bh / h, bh % h);
                let base = bi * s * 3 * dm + hi * d;
                let kv = Mat::strided(&qkv[base + dm..], s, d, 3 * dm);
                let vv = Mat::strided(&qkv[base + 2 * dm..], s, d, 3 * dm);
                let lse_h = &lse[bh * s..(bh + 1) * s];
                // The right-hand sides that serve every query block, packed once.
                let kt = Rhs::new(kv.t(), inner_par);
                let vt = Rhs::new(vv.t(), inner_par);
                let kr = Rhs::new(kv, inner_par);
                // dV and dK are formed transposed (dV^T = dO^T P, dK^T = Q^T dS):
                // the GEMM then reads the score-shaped operand row-major, ~30 %
                // faster than reading it transposed; the transpose is undone on
                // copy-out. Both sum over query blocks.
                let mut dvt = vec![T::zero(); d * s];
                let mut dkt = vec![T::zero(); d * s];
                let mut dq = vec![T::zero(); s * d];
                // query blocks, as in the forward, keep P and dP in cache
                let qb = Q_BLOCK.min(s);
                let p = scratch(pbuf, qb * s);
                let dp = scratch(dpbuf, qb * s);
                for q0 in (0..s).step_by(qb) {
                    let rows = qb.min(s - q0);
                    let first = q0 == 0;
                    let (p, dp) = (&mut p[..rows * s], &mut dp[..rows * s]);
                    let qblk = Mat::strided(&qkv[base + q0 * 3 * dm..], rows, d, 3 * dm);
                    let doblk = Mat::strided(&dout[(bi * s + q0) * dm + hi * d..], rows, d, dm);
                    // recompute P = exp(x - lse)
                    matmul_rhs(p, s, qblk, &kt, scale, false, inner_par);
                    for (row, &l) in p.chunks_exact_mut(s).zip(&lse_h[q0..q0 + rows]) {
                        T::exp_shifted_sum(row, l);
                    }
                    let pm = Mat::rm(&p[..], rows, s);
                    matmul_with(&mut dvt, s, doblk.t(), pm, T::one(), !first, inner_par);
                    matmul_rhs(dp, s, doblk, &vt, T::one(), false, inner_par);
                    for (dr, pr) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                        let delta = row_dot(dr, pr);
                        for (a, &b) in dr.iter_mut().zip(pr) {
                            *a = b * (*a - delta);
                        }
                    }
                    let dpm = Mat::rm(&dp[..], rows, s);
                    let dqblk = &mut dq[q0 * d..(q0 + rows) * d];
                    matmul_rhs(dqblk, d, dpm, &kr, scale, false, inner_par);
                    matmul_with(&mut dkt, s, qblk.t(), dpm, scale, !first, inner_par);
                }
                [dq, dkt, dvt]
            },
        )
        .collect();
    for (bh, parts) in results.into_iter().enumerate() {
        let (bi, hi) = (bh / h, bh % h);
        let [dq, dkt, dvt] = &parts;
        for si in 0..s {
            let row = (bi * s + si) * 3 * dm + hi * d;
            dqkv[row..row + d].copy_from_slice(&dq[si * d..(si + 1) * d]);
            for j in 0..d {
                dqkv[row + dm + j] = dkt[j * s + si];
                dqkv[row + 2 * dm + j] = dvt[j * s + si];
            }
        }
    }
}

/// Dot product with 8 independent accumulators (vectorises).
#[inline]
fn row_dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut t = T::zero();
    for (&x, &y) in ra.iter().zip(rb) {
        t += x * y;
    }
    acc.iter().copied().sum::<T>() + t
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// Naive f64 reference attention for one configuration.
    fn naive(qkv: &[f64], b: usize, s: usize, h: usize, d: usize) -> Vec<f64> {
        let dm = h * d;
        let mut o = vec![0.0; b * s * dm];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..s {
                    let q = |j: usize| qkv[(bi * s + i) * 3 * dm + hi * d + j];
                    let mut w: Vec<f64> = (0..s)
                        .map(|t| {
                            (0..d)
                                .map(|j| q(j) * qkv[(bi * s + t) * 3 * dm + dm + hi * d + j])
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = w.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = w.iter().map(|x| (x - m).exp()).sum();
                    for x in w.iter_mut() {
                        *x = (*x - m).exp() / z;
                    }
                    for j in 0..d {
                        o[(bi * s + i) * dm + hi * d + j] = (0..s)
                            .map(|t| w[t] * qkv[(bi * s + t) * 3 * dm + 2 * dm + hi * d + j])
                            .sum();
                    }
                }
            }
        }
        o
    }

    /// S longer than one query block (and not a multiple of it), in f64
    /// and f32, against the naive reference.
    #[test]
    fn attention_forward_multi_block() {
        let (b, s, h, d) = (2, Q_BLOCK + 29, 2, 8);
        let qkv = rand_vec(5, b * s * 3 * h * d, 2.0);
        let r = naive(&qkv, b, s, h, d);
        let mut o = vec![0.0; b * s * h * d];
        let mut lse = vec![0.0; b * h * s];
        attention_forward(&mut o, &mut lse, &qkv, b, s, h, d);
        assert_close("f64 forward", &o, &r, 1e-12);
        let q32: Vec<f32> = qkv.iter().map(|&x| x as f32).collect();
        let mut o32 = vec![0f32; o.len()];
        let mut l32 = vec![0f32; lse.len()];
        attention_forward(&mut o32, &mut l32, &q32, b, s, h, d);
        let o32: Vec<f64> = o32.iter().map(|&x| x as f64).collect();
        assert_close("f32 forward", &o32, &r, 1e-5);
        let l32: Vec<f64> = l32.iter().map(|&x| x as f64).collect();
        assert_close("f32 lse", &l32, &lse, 1e-6);
    }

    /// The blocked backward over several query blocks (S not a multiple of
    /// the block) against a single-block evaluation of the same formulas:
    /// f64 unblocked reference built from the naive softmax, tolerance 1e-11
    /// (f64) and 1e-5 (f32).
    #[test]
    fn attention_backward_multi_block() {
        let (b, s, h, d) = (1, 2 * Q_BLOCK + 7, 2, 4);
        let qkv = rand_vec(7, b * s * 3 * h * d, 1.5);
        let dout = rand_vec(8, b * s * h * d, 1.0);
        let mut o = vec![0.0; b * s * h * d];
        let mut lse = vec![0.0; b * h * s];
        attention_forward(&mut o, &mut lse, &qkv, b, s, h, d);
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&mut dqkv, &dout, &qkv, &lse, b, s, h, d);
        let r = naive_backward(&qkv, &dout, b, s, h, d);
        assert_close("blocked dqkv", &dqkv, &r, 1e-11);
        // The f32 path (its own GEMM, packed K and V reused across blocks):
        // tolerance 1e-5 relative to the f64 reference.
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (q32, do32) = (f32s(&qkv), f32s(&dout));
        let mut o32 = vec![0f32; o.len()];
        let mut l32 = vec![0f32; lse.len()];
        attention_forward(&mut o32, &mut l32, &q32, b, s, h, d);
        let mut g32 = vec![0f32; qkv.len()];
        attention_backward(&mut g32, &do32, &q32, &l32, b, s, h, d);
        let g32: Vec<f64> = g32.iter().map(|&x| x as f64).collect();
        assert_close("f32 blocked dqkv", &g32, &r, 1e-5);
    }

    /// Unblocked f64 backward from the definitions: P = softmax(c q k^T),
    /// dV = P^T dO, dS = P (dO V^T - rowsum), dQ = c dS K, dK = c dS^T Q.
    fn naive_backward(
        qkv: &[f64],
        dout: &[f64],
        b: usize,
        s: usize,
        h: usize,
        d: usize,
    ) -> Vec<f64> {
        let dm = h * d;
        let c = 1.0 / (d as f64).sqrt();
        let at = |t: usize, part: usize, hi: usize, j: usize, bi: usize| {
            qkv[(bi * s + t) * 3 * dm + part * dm + hi * d + j]
        };
        let mut g = vec![0.0; qkv.len()];
        for bi in 0..b {
            for hi in 0..h {
                let mut p = vec![0.0; s * s];
                for i in 0..s {
                    let row: Vec<f64> = (0..s)
                        .map(|t| {
                            c * (0..d)
                                .map(|j| at(i, 0, hi, j, bi) * at(t, 1, hi, j, bi))
                                .sum::<f64>()
                        })
                        .collect();
                    let m = row.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
                    for t in 0..s {
                        p[i * s + t] = (row[t] - m).exp() / z;
                    }
                }
                let dov = |i: usize, j: usize| dout[(bi * s + i) * dm + hi * d + j];
                for i in 0..s {
                    let dpr: Vec<f64> = (0..s)
                        .map(|t| (0..d).map(|j| dov(i, j) * at(t, 2, hi, j, bi)).sum::<f64>())
                        .collect();
                    let delta: f64 = (0..s).map(|t| p[i * s + t] * dpr[t]).sum();
                    for t in 0..s {
                        let ds = p[i * s + t] * (dpr[t] - delta);
                        for j in 0..d {
                            g[(bi * s + i) * 3 * dm + hi * d + j] += c * ds * at(t, 1, hi, j, bi);
                            g[(bi * s + t) * 3 * dm + dm + hi * d + j] +=
                                c * ds * at(i, 0, hi, j, bi);
                            g[(bi * s + t) * 3 * dm + 2 * dm + hi * d + j] +=
                                p[i * s + t] * dov(i, j);
                        }
                    }
                }
            }
        }
        g
    }

    /// f64 central differences, h = 1e-6; tolerance 1e-7. Odd S, 3 heads.
    #[test]
    fn attention_gradcheck() {
        let (b, s, h, d) = (2, 5, 3, 4);
        let qkv = rand_vec(1, b * s * 3 * h * d, 1.5);
        let proj = rand_vec(2, b * s * h * d, 1.0);
        let mut o = vec![0.0; b * s * h * d];
        let mut lse = vec![0.0; b * h * s];
        attention_forward(&mut o, &mut lse, &qkv, b, s, h, d);
        let r = naive(&qkv, b, s, h, d);
        assert_close("forward", &o, &r, 1e-12);
        let f = |x: &[f64]| {
            let mut o = vec![0.0; b * s * h * d];
            let mut l = vec![0.0; b * h * s];
            attention_forward(&mut o, &mut l, x, b, s, h, d);
            dot(&proj, &o)
        };
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&mut dqkv, &proj, &qkv, &lse, b, s, h, d);
        assert_close("dqkv", &dqkv, &numeric_grad(&qkv, 1e-6, f), 1e-7);
    }
}
