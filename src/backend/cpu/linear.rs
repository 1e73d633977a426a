//! linear: `y = x W^T (+ b)` with `x` [M, K], `W` [N, K] (PyTorch layout),
//! `y` [M, N]; M is the flattened B*S.
//!
//! Design rule: every matmul of the CPU backend goes through [`matmul`], a thin
//! safe wrapper with explicit strides, so the transposes of the backward pass
//! are free (strides, never copies). f32 products on CPUs with AVX2+FMA and
//! without AVX-512 run on the project's own [`super::sgemm`] (faster there
//! at the TRM shapes); everything else goes to the `gemm` crate, built with
//! its `x86-v4` feature (AVX-512 micro-kernels) and picking kernels at run
//! time, so the same binary runs on any x86-64 CPU. [`gemm_isa`] reports what
//! this CPU gets; `TRM_CPU_GEMM=crate` forces the `gemm` crate (for A/B
//! benchmarks).

use super::Real;
use gemm::Parallelism;

/// Which SIMD level `gemm` will use on this CPU (for logs and benches).
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return "avx512 (x86-v4)";
        }
        if use_own_sgemm() {
            return "avx2+fma (own sgemm for f32)";
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return "avx2+fma (x86-v3)";
        }
    }
    "portable"
}

/// Whether f32 products go to [`super::sgemm`]: AVX2+FMA without AVX-512
/// (where the `gemm` crate's AVX-512 kernels are faster still), unless
/// `TRM_CPU_GEMM=crate`.
#[cfg(target_arch = "x86_64")]
fn use_own_sgemm() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| {
        let forced_crate = std::env::var("TRM_CPU_GEMM").is_ok_and(|v| v == "crate");
        !forced_crate && super::sgemm::available() && !is_x86_feature_detected!("avx512f")
    })
}

/// A strided matrix view: element (i, j) is at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major `rows x cols`.
    pub fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `rows x cols` matrix (so it is `cols x rows`).
    pub fn rm_t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }
    /// Row-major with an explicit row stride (a column block of a wider matrix).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    /// Transpose of this view.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matmul: {what} view out of bounds");
        }
    }
}

/// `dst[M, N] (row stride dst_rs) = (accumulate ? dst : 0) + alpha * a[M, K] b[K, N]`.
///
/// Uses all rayon threads when the product is big enough to amortise the
/// fork-join, a single thread otherwise.
pub fn matmul<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    alpha: T,
    accumulate: bool,
) {
    matmul_with(dst, dst_rs, a, b, alpha, accumulate, true)
}

/// [`matmul`] with `parallel = false` forcing one thread: for callers that
/// already run many products in parallel (attention heads), where nested
/// fork-joins only add overhead.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    alpha: T,
    accumulate: bool,
    parallel: bool,
) {
    matmul_impl(dst, dst_rs, a, b, None, alpha, accumulate, parallel)
}

/// A right-hand side used by several products: packed once when the
/// products run on [`super::sgemm`] (an attention head's K and V against
/// each of its query blocks), otherwise just the view.
pub struct Rhs<'a, T> {
    mat: Mat<'a, T>,
    #[cfg(target_arch = "x86_64")]
    packed: Option<super::sgemm::PackedB>,
}

impl<'a, T: Real> Rhs<'a, T> {
    /// Prepares `b`; `parallel` as in [`matmul_with`].
    pub fn new(b: Mat<'a, T>, parallel: bool) -> Self {
        b.check("rhs");
        #[cfg(target_arch = "x86_64")]
        {
            let packed =
                (is_f32::<T>() && use_own_sgemm() && b.rows > 0 && b.cols > 0).then(|| {
                    let threads = thread_count(parallel);
                    // SAFETY: T is f32 (checked), b was bounds-checked, and
                    // use_own_sgemm checked AVX2+FMA.
                    unsafe { super::sgemm::PackedB::new(sgemm_view(b), b.rows, b.cols, threads) }
                });
            Rhs { mat: b, packed }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = parallel;
            Rhs { mat: b }
        }
    }
}

/// [`matmul_with`] against a prepared right-hand side.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rhs<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<'_, T>,
    b: &Rhs<'_, T>,
    alpha: T,
    accumulate: bool,
    parallel: bool,
) {
    #[cfg(target_arch = "x86_64")]
    let packed = b.packed.as_ref();
    #[cfg(not(target_arch = "x86_64"))]
    let packed = None;
    matmul_impl(dst, dst_rs, a, b.mat, packed, alpha, accumulate, parallel)
}

/// All rayon threads for a threaded product, else the caller's alone.
#[cfg(target_arch = "x86_64")]
fn thread_count(threaded: bool) -> usize {
    if threaded {
        rayon::current_num_threads()
    } else {
        1
    }
}

#[cfg(target_arch = "x86_64")]
fn is_f32<T: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
}

/// The sgemm view of a matrix whose element type is f32.
#[cfg(target_arch = "x86_64")]
fn sgemm_view<T>(v: Mat<'_, T>) -> super::sgemm::View {
    super::sgemm::View {
        ptr: v.data.as_ptr().cast::<f32>(),
        rs: v.rs as isize,
        cs: v.cs as isize,
    }
}

#[cfg(target_arch = "x86_64")]
type Packed = super::sgemm::PackedB;
#[cfg(not(target_arch = "x86_64"))]
type Packed = ();

#[allow(clippy::too_many_arguments)]
fn matmul_impl<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    packed: Option<&Packed>,
    alpha: T,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    a.check("lhs");
    b.check("rhs");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "matmul: dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    let flops = m * n * k;
    let threaded = parallel && flops >= 1 << 18 && rayon::current_num_threads() > 1;
    #[cfg(target_arch = "x86_64")]
    if is_f32::<T>() && use_own_sgemm() {
        use super::sgemm::{sgemm, sgemm_packed};
        let threads = thread_count(threaded);
        // SAFETY: T is f32 (checked above), so the casts are identities; the
        // views and dst were bounds-checked above, dst is exclusively
        // borrowed (no aliasing), use_own_sgemm checked AVX2+FMA, and a
        // packed B is b's own packing (same k x n).
        unsafe {
            let alpha = std::mem::transmute_copy::<T, f32>(&alpha);
            let c = dst.as_mut_ptr().cast::<f32>();
            match packed {
                Some(pb) => {
                    assert_eq!(pb.shape(), (k, n), "matmul: packed rhs shape");
                    sgemm_packed(m, c, dst_rs, sgemm_view(a), pb, alpha, accumulate, threads)
                }
                None => sgemm(
                    m,
                    n,
                    k,
                    c,
                    dst_rs,
                    sgemm_view(a),
                    sgemm_view(b),
                    alpha,
                    accumulate,
                    threads,
                ),
            }
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = packed;
    let par = if threaded {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: all three views were bounds-checked above for the given strides;
    // dst is exclusively borrowed and cannot alias a or b (shared borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Forward: `y[M, N] = x[M, K] W[N, K]^T + bias[N]`.
pub fn linear_forward<T: Real>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(x.len(), m * k, "linear_forward: x");
    assert_eq!(w.len(), n * k, "linear_forward: w");
    assert_eq!(y.len(), m * n, "linear_forward: y");
    matmul(y, n, Mat::rm(x, m, k), Mat::rm_t(w, n, k), T::one(), false);
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear_forward: bias");
        for row in y.chunks_exact_mut(n) {
            for (o, &bb) in row.iter_mut().zip(b) {
                *o += bb;
            }
        }
    }
}

/// Backward of [`linear_forward`].
///
/// `y_mn = sum_k x_mk W_nk + b_n`, so
/// `dx_mk = sum_n dy_mn W_nk` (dx = dy W),
/// `dW_nk += sum_m dy_mn x_mk` (dW += dy^T x),
/// `db_n += sum_m dy_mn`.
/// `dx` is overwritten (or accumulated when `accumulate_dx`), `dw`/`db` are
/// always accumulated (weights are shared across the recursion).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    dx: Option<&mut [T]>,
    accumulate_dx: bool,
    dw: Option<&mut [T]>,
    db: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dy.len(), m * n, "linear_backward: dy");
    if let Some(dx) = dx {
        assert_eq!(dx.len(), m * k, "linear_backward: dx");
        matmul(
            dx,
            k,
            Mat::rm(dy, m, n),
            Mat::rm(w, n, k),
            T::one(),
            accumulate_dx,
        );
    }
    if let Some(dw) = dw {
        assert_eq!(dw.len(), n * k, "linear_backward: dw");
        assert_eq!(x.len(), m * k, "linear_backward: x");
        matmul(dw, k, Mat::rm_t(dy, m, n), Mat::rm(x, m, k), T::one(), true);
    }
    if let Some(db) = db {
        assert_eq!(db.len(), n, "linear_backward: db");
        for row in dy.chunks_exact(n) {
            for (g, &v) in db.iter_mut().zip(row) {
                *g += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn matmul_matches_naive_with_strides() {
        let (m, k, n) = (5, 7, 3);
        let a = rand_vec(1, m * k, 1.0);
        let b = rand_vec(2, n * k, 1.0); // stored as [n, k], used transposed
        let mut c = vec![0.0; m * n];
        matmul(
            &mut c,
            n,
            Mat::rm(&a, m, k),
            Mat::rm_t(&b, n, k),
            1.0,
            false,
        );
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
                assert!((c[i * n + j] - r).abs() < 1e-12);
            }
        }
        // f32 path and a big (multithreaded) product
        let (m, k, n) = (130, 70, 90);
        let a = rand_vec(3, m * k, 1.0);
        let b = rand_vec(4, k * n, 1.0);
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
        let mut c32 = vec![0f32; m * n];
        matmul(
            &mut c32,
            n,
            Mat::rm(&a32, m, k),
            Mat::rm(&b32, k, n),
            1.0,
            false,
        );
        let mut c = vec![0f64; m * n];
        matmul(&mut c, n, Mat::rm(&a, m, k), Mat::rm(&b, k, n), 1.0, false);
        for (x, y) in c32.iter().zip(&c) {
            assert!((*x as f64 - y).abs() < 1e-4);
        }
    }

    /// Finite-difference check in f64; tolerance 1e-7 relative (central
    /// differences of a bilinear function are exact up to rounding).
    #[test]
    fn linear_gradcheck() {
        let (m, k, n) = (4, 6, 5);
        let x = rand_vec(10, m * k, 1.0);
        let w = rand_vec(11, n * k, 1.0);
        let b = rand_vec(12, n, 1.0);
        let proj = rand_vec(13, m * n, 1.0);
        let f = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; m * n];
            linear_forward(&mut y, x, w, Some(b), m, k, n);
            dot(&proj, &y)
        };
        let mut dx = vec![0.0; m * k];
        let mut dw = vec![0.0; n * k];
        let mut db = vec![0.0; n];
        linear_backward(
            Some(&mut dx),
            false,
            Some(&mut dw),
            Some(&mut db),
            &proj,
            &x,
            &w,
            m,
            k,
            n,
        );
        let h = 1e-5;
        assert_close("dx", &dx, &numeric_grad(&x, h, |v| f(v, &w, &b)), 1e-7);
        assert_close("dw", &dw, &numeric_grad(&w, h, |v| f(&x, v, &b)), 1e-7);
        assert_close("db", &db, &numeric_grad(&b, h, |v| f(&x, &w, v)), 1e-7);
    }
}
