//! The small tensor layer: an owned, contiguous, row-major f32 array with a
//! shape. No autograd, no strides, no views: ops take slices plus explicit
//! dimension names (B, S, D, H, d, F, V) and write into caller-owned buffers.
//!
//! Design rule: a `Tensor` is just `shape` + `data`; `data.len()` always equals
//! the product of `shape` (checked by the constructors that can fail).

use std::fmt;

/// Errors from building a tensor out of user-supplied parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("tensor shape {shape:?} needs {expected} elements, got {got}")]
    SizeMismatch {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("cannot reshape tensor of shape {from:?} ({numel} elements) to {to:?}")]
    BadReshape {
        from: Vec<usize>,
        to: Vec<usize>,
        numel: usize,
    },
}

/// An owned, contiguous, row-major f32 tensor.
#[derive(Clone, PartialEq, Default)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor(shape={:?}, numel={})",
            self.shape,
            self.data.len()
        )
    }
}

/// Number of elements of a shape (1 for a scalar `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// All zeros of the given shape.
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; numel(shape)],
        }
    }

    /// Filled with one value.
    pub fn full(shape: &[usize], value: f32) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            data: vec![value; numel(shape)],
        }
    }

    /// Builds a tensor from a shape and its row-major data.
    ///
    /// Panics if `data.len()` is not the product of `shape` (a programming
    /// error); use [`Tensor::try_new`] for user-supplied data.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Tensor {
        match Tensor::try_new(shape, data) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// Fallible [`Tensor::new`].
    pub fn try_new(shape: &[usize], data: Vec<f32>) -> Result<Tensor, TensorError> {
        let expected = numel(shape);
        if expected != data.len() {
            return Err(TensorError::SizeMismatch {
                shape: shape.to_vec(),
                expected,
                got: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A rank-0 tensor holding one value.
    pub fn scalar(value: f32) -> Tensor {
        Tensor {
            shape: Vec::new(),
            data: vec![value],
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Rank (number of dimensions).
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor, TensorError> {
        if numel(shape) != self.data.len() {
            return Err(TensorError::BadReshape {
                from: self.shape,
                to: shape.to_vec(),
                numel: self.data.len(),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The data widened to f64 (for reference math and checks).
    pub fn to_f64(&self) -> Vec<f64> {
        self.data.iter().map(|&x| x as f64).collect()
    }

    /// Builds an f32 tensor from f64 values (rounding to nearest).
    pub fn from_f64(shape: &[usize], data: &[f64]) -> Tensor {
        Tensor::new(shape, data.iter().map(|&x| x as f32).collect())
    }

    /// Euclidean norm, accumulated in f64.
    pub fn norm(&self) -> f64 {
        self.data
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    }

    /// Relative error `||self - reference|| / ||reference||` (f64 accumulation).
    /// If the reference is all zeros, returns the absolute norm of the difference.
    pub fn rel_err(&self, reference: &Tensor) -> f64 {
        rel_err(&self.data, &reference.data)
    }
}

/// Relative error `||a - b|| / ||b||` over two equally long slices; the plain
/// norm of the difference when `b` is zero.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_and_reshape() {
        let t = Tensor::zeros(&[2, 3]);
        assert_eq!(t.numel(), 6);
        assert!(Tensor::try_new(&[2, 2], vec![0.0; 3]).is_err());
        let r = Tensor::new(&[2, 3], (0..6).map(|x| x as f32).collect())
            .reshape(&[3, 2])
            .unwrap();
        assert_eq!(r.shape, vec![3, 2]);
        assert!(r.clone().reshape(&[4]).is_err());
        assert_eq!(Tensor::scalar(1.5).numel(), 1);
        assert!(r.rel_err(&r) == 0.0);
    }
}
