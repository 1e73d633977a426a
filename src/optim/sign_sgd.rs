//! Sparse sign-SGD for the puzzle-embedding table: only the rows of the batch
//! change (`docs/optimizer.md`, "Sparse sign-SGD").

use super::{check_len, OptimError, Real};

/// Sign-SGD with decoupled weight decay over the rows a batch touched.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseSignSgd {
    pub weight_decay: f64,
}

impl Default for SparseSignSgd {
    /// The reference's puzzle-embedding weight decay, 0.1.
    fn default() -> Self {
        SparseSignSgd { weight_decay: 0.1 }
    }
}

impl SparseSignSgd {
    pub fn new(weight_decay: f64) -> Self {
        SparseSignSgd { weight_decay }
    }

    /// Updates `table` (rows of `ndim`) from the batch rows `grads` ([N, ndim],
    /// already gathered across ranks) of puzzles `ids` ([N]). Rows of the same id
    /// are summed first; every distinct id then gets
    /// `w <- w * (1 - lr * wd) - lr * sign(g)` with `sign(0) = 0`. Returns the
    /// number of distinct rows updated.
    pub fn step<T: Real>(
        &self,
        table: &mut [T],
        ndim: usize,
        ids: &[i32],
        grads: &[T],
        lr: f64,
    ) -> Result<usize, OptimError> {
        if ndim == 0 {
            return Err(OptimError::ZeroWidth);
        }
        check_len("sign-SGD gradient rows", ids.len() * ndim, grads.len())?;
        let rows = table.len() / ndim;
        check_len("sign-SGD table", rows * ndim, table.len())?;
        for &id in ids {
            if id < 0 || id as usize >= rows {
                return Err(OptimError::IdOutOfRange {
                    id: id.into(),
                    rows,
                });
            }
        }

        // Batch positions grouped by id; the stable sort keeps the summation in
        // batch order, so the result does not depend on anything but the input.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i]);

        let decay = T::from_f64(1.0 - lr * self.weight_decay);
        let lr = T::from_f64(lr);
        let mut sum = vec![T::zero(); ndim];
        let mut distinct = 0;
        for group in order.chunk_by(|&a, &b| ids[a] == ids[b]) {
            sum.fill(T::zero());
            for &i in group {
                for (s, &g) in sum.iter_mut().zip(&grads[i * ndim..(i + 1) * ndim]) {
                    *s = *s + g;
                }
            }
            let row = ids[group[0]] as usize;
            for (w, &g) in table[row * ndim..(row + 1) * ndim].iter_mut().zip(&sum) {
                *w = *w * decay - lr * sign(g);
            }
            distinct += 1;
        }
        Ok(distinct)
    }
}

/// `sign` with `sign(±0) = 0` (unlike `Float::signum`); NaN stays NaN so a
/// broken gradient shows in the weights instead of being silently dropped.
fn sign<T: Real>(g: T) -> T {
    if g > T::zero() {
        T::one()
    } else if g < T::zero() {
        -T::one()
    } else if g == T::zero() {
        T::zero()
    } else {
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_ids_are_summed_before_the_sign() {
        // id 1 appears twice: +0.5 and -2.0 sum to -1.5 (sign -1), although the
        // first row alone would push the other way.
        let ndim = 2;
        let mut table = vec![1.0f32, 1.0, 2.0, -2.0, 3.0, 3.0];
        let ids = [1, 2, 1];
        let grads = [0.5f32, 0.0, 7.0, -7.0, -2.0, 0.25];
        let opt = SparseSignSgd::new(0.1);
        let n = opt.step(&mut table, ndim, &ids, &grads, 0.01).unwrap();
        assert_eq!(n, 2);
        let decay = (1.0f64 - 0.01 * 0.1) as f32; // 0.999
        assert_eq!(table[0..2], [1.0, 1.0], "row 0 untouched");
        // row 1: sums (-1.5, 0.25)
        assert_eq!(table[2], 2.0 * decay + 0.01);
        assert_eq!(table[3], -2.0 * decay - 0.01);
        assert!((table[2] - 2.008).abs() < 1e-6 && (table[3] + 2.008).abs() < 1e-6);
        // row 2: grads (7, -7)
        assert_eq!(table[4], 3.0 * decay - 0.01);
        assert_eq!(table[5], 3.0 * decay + 0.01);
    }

    #[test]
    fn zero_gradient_only_decays_and_other_rows_are_bit_identical() {
        let ndim = 3;
        let mut table: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 1.1).collect();
        let before = table.clone();
        // Gradients that cancel exactly (row 3) and plain zeros (row 0).
        let ids = [3, 0, 3];
        let grads = [0.25f32, -1.0, 0.0, 0.0, 0.0, 0.0, -0.25, 1.0, 0.0];
        SparseSignSgd::new(0.5)
            .step(&mut table, ndim, &ids, &grads, 0.2)
            .unwrap();
        let decay = (1.0f64 - 0.2 * 0.5) as f32; // 0.9
        for row in [0, 3] {
            for k in 0..ndim {
                let i = row * ndim + k;
                assert_eq!(table[i], before[i] * decay, "row {row} col {k}");
            }
        }
        for row in [1, 2] {
            for k in 0..ndim {
                let i = row * ndim + k;
                assert_eq!(table[i].to_bits(), before[i].to_bits(), "row {row} changed");
            }
        }
    }

    #[test]
    fn sign_of_zero_is_zero() {
        assert_eq!(sign(0.0f32), 0.0);
        assert_eq!(sign(-0.0f64), 0.0);
        assert_eq!(sign(-3.0f32), -1.0);
        assert_eq!(sign(1e-30f64), 1.0);
        assert!(sign(f32::NAN).is_nan());
    }

    #[test]
    fn bad_ids_and_shapes_are_errors() {
        let mut table = vec![0.0f32; 6];
        let opt = SparseSignSgd::default();
        assert_eq!(
            opt.step(&mut table, 2, &[3], &[1.0, 1.0], 0.1),
            Err(OptimError::IdOutOfRange { id: 3, rows: 3 })
        );
        assert_eq!(
            opt.step(&mut table, 2, &[-1], &[1.0, 1.0], 0.1),
            Err(OptimError::IdOutOfRange { id: -1, rows: 3 })
        );
        assert!(matches!(
            opt.step(&mut table, 2, &[0, 1], &[1.0, 1.0], 0.1),
            Err(OptimError::LengthMismatch { .. })
        ));
        assert_eq!(
            opt.step(&mut table, 0, &[], &[], 0.1),
            Err(OptimError::ZeroWidth)
        );
        assert_eq!(table, vec![0.0; 6], "a rejected call changes nothing");
    }
}
