//! vmath: vectorised `exp` over f32 slices, for the softmax of attention
//! and the sigmoid of SwiGLU (libm's scalar `expf` took ~10 % of a step).
//!
//! Design rule: one portable, branch-free body (`exp_body`) that LLVM
//! auto-vectorises; on x86-64 it is compiled a second time inside an
//! `avx2,fma` target-feature function and picked at run time, so the binary
//! still runs on any x86-64 (the fallback's `mul_add` is then a libm call:
//! slow but exact). Accuracy: range reduction `x = n ln2 + r`,
//! |r| <= ln2/2, with ln2 split in two parts, and a degree-6 polynomial for
//! `e^r` (Cephes' `expf` coefficients): max relative error ~2 ulp
//! (tested below against f64 `exp`). Limits as libm: `exp(x) = 0` below
//! -87.34 (no subnormals), `+inf` above 88.72, NaN stays NaN.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds a float below 2^22 to an integer (ties to
/// even) held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
const X_MAX: f32 = 88.722_83;
const X_MIN: f32 = -87.336_54;

/// `e^x` for one lane; `#[inline(always)]` so each caller's loop vectorises.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    // Selects, not `clamp` (its assert blocks vectorisation) nor min/max
    // (they drop NaN); they vectorise as compares + blends.
    #[allow(clippy::manual_clamp)]
    let xc = if x > X_MAX {
        X_MAX
    } else if x < X_MIN {
        X_MIN
    } else {
        x
    };
    let t = xc.mul_add(LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p = 1.987_569_2e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let er = p.mul_add(r * r, r) + 1.0;
    // 2^n as an f32 built from its exponent bits; n in [-126, 128]. Split
    // into two factors so n = 128 (x near X_MAX) does not overflow the bits.
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) << 23) as u32);
    let s2 = f32::from_bits(((ni - half + 127) << 23) as u32);
    let y = er * s1 * s2;
    if x.is_nan() {
        x
    } else if x > X_MAX {
        f32::INFINITY
    } else if x < X_MIN {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn exp_shifted_sum_body(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            let e = exp_lane(c[i] - shift);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut tail = 0.0f32;
    for v in chunks.into_remainder() {
        *v = exp_lane(*v - shift);
        tail += *v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rem) {
        m = if v > m { v } else { m };
    }
    m
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        super::exp_shifted_sum_body(x, shift)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(x: &[f32]) -> f32 {
        super::max_body(x)
    }
    pub fn has_avx2_fma() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
}

/// In place `x_i <- exp(x_i - shift)`; returns the sum of the new values.
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_fma() {
        // SAFETY: the CPU supports the enabled features (checked above).
        return unsafe { x86::exp_shifted_sum(x, shift) };
    }
    exp_shifted_sum_body(x, shift)
}

/// In place `x_i <- exp(x_i)`.
pub fn exp_inplace(x: &mut [f32]) {
    exp_shifted_sum(x, 0.0);
}

/// Maximum of a slice (`-inf` when empty; NaNs are skipped).
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_fma() {
        // SAFETY: the CPU supports the enabled features (checked above).
        return unsafe { x86::max(x) };
    }
    max_body(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(got: f32, x: f32) -> f64 {
        let want = (x as f64).exp();
        ((got as f64 - want) / want).abs()
    }

    /// Every 1/64 step over the whole finite range, plus odd-length slices
    /// (vector body and scalar tail agree): within 3 ulp of f64 `exp`.
    #[test]
    fn exp_matches_f64_exp() {
        let xs: Vec<f32> = (-87 * 64..=88 * 64)
            .map(|i| i as f32 / 64.0 + 1e-3)
            .collect();
        let mut y = xs.clone();
        exp_inplace(&mut y);
        let mut worst = 0.0f64;
        for (&x, &e) in xs.iter().zip(&y) {
            worst = worst.max(rel_err(e, x));
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst rel err {worst:e}");
        for len in [1usize, 7, 9, 17] {
            let mut v: Vec<f32> = xs[..len].to_vec();
            let s = exp_shifted_sum(&mut v, 0.0);
            let want: f64 = xs[..len].iter().map(|&x| (x as f64).exp()).sum();
            assert!(((s as f64 - want) / want).abs() < 1e-6);
        }
    }

    #[test]
    fn exp_limits() {
        let mut v = vec![
            f32::NAN,
            -1000.0,
            f32::NEG_INFINITY,
            1000.0,
            f32::INFINITY,
            0.0,
            -87.0,
            88.5,
            1.0,
        ];
        exp_inplace(&mut v);
        assert!(v[0].is_nan());
        assert_eq!(&v[1..6], &[0.0, 0.0, f32::INFINITY, f32::INFINITY, 1.0]);
        assert!(rel_err(v[6], -87.0) < 1e-6);
        assert!(rel_err(v[7], 88.5) < 1e-6);
        assert!(rel_err(v[8], 1.0) < 1e-6);
    }

    #[test]
    fn shifted_sum_and_max() {
        let mut v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let m = max(&v);
        let want_m = v.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(m, want_m);
        let orig = v.clone();
        let s = exp_shifted_sum(&mut v, m);
        let want: f64 = orig.iter().map(|&x| ((x - m) as f64).exp()).sum();
        assert!(((s as f64 - want) / want).abs() < 1e-6);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
