//! rope: rotary position embedding on the q and k heads of a fused qkv buffer.
//!
//! Design rule: tables `cos`, `sin` [S, d] are built once per config exactly
//! as the reference does (in float32: `inv_freq_j = 1 / theta^(2j/d)`,
//! `angle = pos * inv_freq`, duplicated to length d), then the op rotates in
//! place. `rot(x) = x * cos + rotate_half(x) * sin`, `rotate_half([a, b]) = [-b, a]`.
//! qkv layout per token: [q heads (H x d) | k heads (H x d) | v heads (H x d)].

use super::Real;
use rayon::prelude::*;

/// The `cos` and `sin` tables, each [S, d], row `s` for position `s`.
#[derive(Debug, Clone)]
pub struct RopeTables<T> {
    pub cos: Vec<T>,
    pub sin: Vec<T>,
    pub s: usize,
    pub d: usize,
}

/// Builds the tables for positions `0..s` and head dim `d` (even).
/// The angle is computed in f32 like the reference; cos/sin of that f32 angle
/// are evaluated in f64 and rounded.
pub fn rope_tables<T: Real>(s: usize, d: usize, theta: f64) -> RopeTables<T> {
    assert!(d % 2 == 0, "rope: head dim must be even");
    let half = d / 2;
    let theta32 = theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| 1.0f32 / theta32.powf((2 * j) as f32 / d as f32))
        .collect();
    let mut cos = vec![T::zero(); s * d];
    let mut sin = vec![T::zero(); s * d];
    for p in 0..s {
        for j in 0..half {
            let ang = (p as f32 * inv_freq[j]) as f64;
            let (c, sn) = (T::of(ang.cos()), T::of(ang.sin()));
            cos[p * d + j] = c;
            cos[p * d + j + half] = c;
            sin[p * d + j] = sn;
            sin[p * d + j + half] = sn;
        }
    }
    RopeTables { cos, sin, s, d }
}

/// Forward, in place on the q and k heads of `qkv` [B, S, 3*H*d]:
/// `out_i = x_i c_i - x_{i+h} s_i`, `out_{i+h} = x_{i+h} c_{i+h} + x_i s_{i+h}` (h = d/2).
pub fn rope_forward<T: Real>(qkv: &mut [T], t: &RopeTables<T>, n_heads: usize) {
    apply(qkv, t, n_heads, false);
}

/// Backward, in place on the q and k parts of `dqkv` (v untouched).
/// The forward is a rotation per pair (i, i+h) with matrix `[[c, -s], [s, c]]`;
/// its transpose gives `dx_i = dy_i c_i + dy_{i+h} s_{i+h}`,
/// `dx_{i+h} = -dy_i s_i + dy_{i+h} c_{i+h}`.
pub fn rope_backward<T: Real>(dqkv: &mut [T], t: &RopeTables<T>, n_heads: usize) {
    apply(dqkv, t, n_heads, true);
}

fn apply<T: Real>(qkv: &mut [T], t: &RopeTables<T>, n_heads: usize, transpose: bool) {
    let d = t.d;
    let half = d / 2;
    let width = 3 * n_heads * d;
    assert_eq!(qkv.len() % width, 0, "rope: qkv not a multiple of 3*H*d");
    let tokens = qkv.len() / width;
    assert_eq!(tokens % t.s, 0, "rope: tokens not a multiple of S");
    qkv.par_chunks_mut(width * 16)
        .enumerate()
        .for_each(|(ci, chunk)| {
            for (ti, tok) in chunk.chunks_mut(width).enumerate() {
                let pos = (ci * 16 + ti) % t.s;
                let c = &t.cos[pos * d..(pos + 1) * d];
                let s = &t.sin[pos * d..(pos + 1) * d];
                // q and k heads: the first 2*H heads of the token
                for head in tok[..2 * n_heads * d].chunks_mut(d) {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        if transpose {
                            a[i] = x1 * c[i] + x2 * s[i + half];
                            b[i] = x2 * c[i + half] - x1 * s[i];
                        } else {
                            a[i] = x1 * c[i] - x2 * s[i];
                            b[i] = x2 * c[i + half] + x1 * s[i + half];
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// f64 central differences; linear op so tolerance 1e-8.
    #[test]
    fn rope_gradcheck() {
        let (b, s, h, d) = (2, 5, 2, 6);
        let t = rope_tables::<f64>(s, d, 10000.0);
        let n = b * s * 3 * h * d;
        let x = rand_vec(1, n, 1.0);
        let proj = rand_vec(2, n, 1.0);
        let f = |x: &[f64]| {
            let mut y = x.to_vec();
            rope_forward(&mut y, &t, h);
            dot(&proj, &y)
        };
        let mut g = proj.clone();
        rope_backward(&mut g, &t, h);
        assert_close("dx", &g, &numeric_grad(&x, 1e-5, f), 1e-8);
    }

    #[test]
    fn position_zero_is_identity() {
        let t = rope_tables::<f32>(3, 4, 10000.0);
        let mut x: Vec<f32> = (0..3 * 3 * 4).map(|v| v as f32).collect();
        let orig = x.clone();
        rope_forward(&mut x, &t, 1);
        assert_eq!(&x[..12], &orig[..12]);
        assert_ne!(&x[12..20], &orig[12..20]);
        assert_eq!(&x[20..24], &orig[20..24]); // v untouched
    }
}
