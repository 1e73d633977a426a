//! The three GEMMs of a linear layer `y = x W^T`, all row-major with x
//! [M, K], W [N, K] (the PyTorch Linear weight) and y [M, N]; bf16 inputs,
//! f32 accumulation, bf16 or f32 output, optional accumulation into the
//! output (beta = 1, for gradients summed over the recursion):
//!
//! - [`linear_forward`]:         y  = x W^T   [M, N]
//! - [`linear_backward_input`]:  dx = dy W    [M, K]
//! - [`linear_backward_weight`]: dW = dy^T x  [N, K]
//!
//! On a GPU they run cuBLASLt; on the emulator target the CPU GEMM of
//! `backend::cpu::linear` on the same bf16 values in f32, rounded to bf16
//! where the output is bf16, so layout tests run without a GPU.
//!
//! cuBLASLt is column-major: a row-major [R, C] matrix is a column-major
//! [C, R] one with leading dimension C, so each row-major product is issued
//! as its transpose (e.g. y^T = W x^T), with no copies.

use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::device::Device;
use super::memory::Buffer;
use super::runtime::Gpu;
use super::CudaError;

/// A GEMM output buffer.
#[derive(Debug, Clone, Copy)]
pub enum GemmOut<'a> {
    Bf16(&'a Buffer<bf16>),
    F32(&'a Buffer<f32>),
}

impl GemmOut<'_> {
    fn len(&self) -> usize {
        match self {
            GemmOut::Bf16(b) => b.len(),
            GemmOut::F32(b) => b.len(),
        }
    }
    fn ptr(&self) -> u64 {
        match self {
            GemmOut::Bf16(b) => b.ptr() as usize as u64,
            GemmOut::F32(b) => b.ptr() as usize as u64,
        }
    }
}

/// Checks `(what, buffer length, rows * cols)` of every operand.
fn check(op: &str, operands: &[(&str, usize, usize, usize)]) -> Result<(), CudaError> {
    for &(what, len, rows, cols) in operands {
        let need = rows.checked_mul(cols).ok_or_else(|| {
            CudaError::Shape(format!("{op}: {what} [{rows}, {cols}] overflows usize"))
        })?;
        if len < need {
            return Err(CudaError::Shape(format!(
                "{op}: {what} [{rows}, {cols}] needs {need} elements, its buffer has {len}"
            )));
        }
    }
    Ok(())
}

/// `y[M, N] (+)= x[M, K] W[N, K]^T`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    dev: &Device,
    y: GemmOut<'_>,
    x: &Buffer<bf16>,
    w: &Buffer<bf16>,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) -> Result<(), CudaError> {
    let op = "linear_forward";
    check(
        op,
        &[
            ("y", y.len(), m, n),
            ("x", x.len(), m, k),
            ("w", w.len(), n, k),
        ],
    )?;
    match dev {
        // Column-major: y^T [N, M] = op(W) x^T with W stored [K, N] (ld K), transposed.
        Device::Gpu(g) => col_major(
            g,
            Operand::new(w, true, k),
            Operand::new(x, false, k),
            y,
            (n, m, k),
            accumulate,
        ),
        #[cfg(feature = "emu")]
        Device::Emu => emu::gemm(
            y,
            n,
            emu::Side {
                buf: x,
                rows: m,
                cols: k,
                transposed: false,
            },
            emu::Side {
                buf: w,
                rows: n,
                cols: k,
                transposed: true,
            },
            accumulate,
        ),
    }
}

/// `dx[M, K] (+)= dy[M, N] W[N, K]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input(
    dev: &Device,
    dx: GemmOut<'_>,
    dy: &Buffer<bf16>,
    w: &Buffer<bf16>,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) -> Result<(), CudaError> {
    let op = "linear_backward_input";
    check(
        op,
        &[
            ("dx", dx.len(), m, k),
            ("dy", dy.len(), m, n),
            ("w", w.len(), n, k),
        ],
    )?;
    match dev {
        // dx^T [K, M] = W^T dy^T: W stored [K, N] (ld K), dy stored [N, M] (ld N).
        Device::Gpu(g) => col_major(
            g,
            Operand::new(w, false, k),
            Operand::new(dy, false, n),
            dx,
            (k, m, n),
            accumulate,
        ),
        #[cfg(feature = "emu")]
        Device::Emu => emu::gemm(
            dx,
            k,
            emu::Side {
                buf: dy,
                rows: m,
                cols: n,
                transposed: false,
            },
            emu::Side {
                buf: w,
                rows: n,
                cols: k,
                transposed: false,
            },
            accumulate,
        ),
    }
}

/// `dW[N, K] (+)= dy[M, N]^T x[M, K]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_weight(
    dev: &Device,
    dw: GemmOut<'_>,
    dy: &Buffer<bf16>,
    x: &Buffer<bf16>,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) -> Result<(), CudaError> {
    let op = "linear_backward_weight";
    check(
        op,
        &[
            ("dw", dw.len(), n, k),
            ("dy", dy.len(), m, n),
            ("x", x.len(), m, k),
        ],
    )?;
    match dev {
        // dW^T [K, N] = x^T dy: x stored [K, M] (ld K), dy stored [N, M] (ld N), transposed.
        Device::Gpu(g) => col_major(
            g,
            Operand::new(x, false, k),
            Operand::new(dy, true, n),
            dw,
            (k, n, m),
            accumulate,
        ),
        #[cfg(feature = "emu")]
        Device::Emu => emu::gemm(
            dw,
            k,
            emu::Side {
                buf: dy,
                rows: m,
                cols: n,
                transposed: true,
            },
            emu::Side {
                buf: x,
                rows: m,
                cols: k,
                transposed: false,
            },
            accumulate,
        ),
    }
}

// ---------------------------------------------------------------------------
// cuBLASLt

/// A bf16 operand in column-major terms: its address, whether the product
/// uses its transpose, and its leading dimension.
struct Operand {
    ptr: u64,
    trans: bool,
    ld: usize,
}

impl Operand {
    fn new(buf: &Buffer<bf16>, trans: bool, ld: usize) -> Operand {
        Operand {
            ptr: buf.ptr() as usize as u64,
            trans,
            ld,
        }
    }
}

/// A cuBLASLt handle and its workspace, one per [`Gpu`].
pub(crate) struct Blas {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_ptr: u64,
}

/// 32 MiB: NVIDIA's recommended cuBLASLt workspace on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

impl Blas {
    pub(crate) fn new(gpu: &Gpu) -> Result<Blas, CudaError> {
        // SAFETY: only tries to open the library.
        if !unsafe { ltsys::is_culib_present() } {
            return Err(CudaError::Blas(
                "the cuBLASLt library (libcublasLt.so) is not installed or not on the loader path"
                    .into(),
            ));
        }
        gpu.ctx()
            .bind_to_thread()
            .map_err(|e| CudaError::driver("binding the context", e))?;
        let workspace = gpu
            .stream()
            .0
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| CudaError::driver("allocating the cuBLASLt workspace", e))?;
        let workspace_ptr = {
            use cudarc::driver::DevicePtr;
            workspace.device_ptr(&gpu.stream().0).0
        };
        let handle =
            lt::create_handle().map_err(|e| CudaError::Blas(format!("creating a handle: {e}")))?;
        Ok(Blas {
            handle,
            workspace,
            workspace_ptr,
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is live and used by nothing else; errors on
        // teardown have nowhere to go.
        let _ = unsafe { lt::destroy_handle(self.handle) };
        let _ = &self.workspace;
    }
}

/// Frees cuBLASLt descriptors however the call ends.
struct Descriptors {
    layouts: Vec<ltsys::cublasLtMatrixLayout_t>,
    desc: Option<ltsys::cublasLtMatmulDesc_t>,
    pref: Option<ltsys::cublasLtMatmulPreference_t>,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created by cuBLASLt and is destroyed once.
        unsafe {
            for &l in &self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            if let Some(d) = self.desc {
                let _ = lt::destroy_matmul_desc(d);
            }
            if let Some(p) = self.pref {
                let _ = lt::destroy_matmul_pref(p);
            }
        }
    }
}

fn blas_err(what: &str) -> impl Fn(lt::CublasError) -> CudaError + '_ {
    move |e| CudaError::Blas(format!("{what}: {e}"))
}

/// Column-major `C[m, n] = op(A)[m, k] op(B)[k, n] (+ C)`, bf16 A and B,
/// f32 compute and scale, C bf16 or f32 (row-major callers pass transposes).
fn col_major(
    gpu: &Gpu,
    a: Operand,
    b: Operand,
    c: GemmOut<'_>,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<(), CudaError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: C stays (accumulate) or becomes zero.
        return if accumulate {
            Ok(())
        } else {
            match c {
                GemmOut::Bf16(buf) => gpu.zero(buf),
                GemmOut::F32(buf) => gpu.zero(buf),
            }
        };
    }
    let mut guard = gpu
        .blas
        .lock()
        .map_err(|_| CudaError::Blas("handle lock poisoned by an earlier panic".into()))?;
    if guard.is_none() {
        *guard = Some(Blas::new(gpu)?);
    }
    let Some(blas) = guard.as_ref() else {
        return Err(CudaError::Blas("no handle".into()));
    };
    gpu.ctx()
        .bind_to_thread()
        .map_err(|e| CudaError::driver("binding the context", e))?;

    use ltsys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
    let c_type = match c {
        GemmOut::Bf16(_) => CUDA_R_16BF,
        GemmOut::F32(_) => CUDA_R_32F,
    };
    let mut d = Descriptors {
        layouts: Vec::new(),
        desc: None,
        pref: None,
    };
    let mut layout = |ty, rows: usize, cols: usize, ld: usize| {
        let l = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
            .map_err(blas_err("matrix layout"))?;
        d.layouts.push(l);
        Ok::<_, CudaError>(l)
    };
    // Stored shapes: op(A) is [m, k], so A is [k, m] when transposed.
    let (ar, ac) = if a.trans { (k, m) } else { (m, k) };
    let (br, bc) = if b.trans { (n, k) } else { (k, n) };
    let a_layout = layout(CUDA_R_16BF, ar, ac, a.ld)?;
    let b_layout = layout(CUDA_R_16BF, br, bc, b.ld)?;
    let c_layout = layout(c_type, m, n, m)?;

    let desc = lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
        .map_err(blas_err("matmul descriptor"))?;
    d.desc = Some(desc);
    use ltsys::cublasLtMatmulDescAttributes_t::{
        CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB,
    };
    for (attr, trans) in [
        (CUBLASLT_MATMUL_DESC_TRANSA, a.trans),
        (CUBLASLT_MATMUL_DESC_TRANSB, b.trans),
    ] {
        // cublasOperation_t, a C enum (int32): CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let op: i32 = trans as i32;
        // SAFETY: the attribute is an int32, passed with its size.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                attr,
                (&op as *const i32).cast::<c_void>(),
                std::mem::size_of::<i32>(),
            )
        }
        .map_err(blas_err("transpose attribute"))?;
    }
    let pref = lt::create_matmul_pref().map_err(blas_err("preference"))?;
    d.pref = Some(pref);
    let ws = WORKSPACE_BYTES;
    // SAFETY: the attribute is a size_t, passed with its size.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws as *const usize).cast::<c_void>(),
            std::mem::size_of::<usize>(),
        )
    }
    .map_err(blas_err("workspace preference"))?;
    // SAFETY: every descriptor is live (owned by `d`).
    let heuristic = unsafe {
        lt::get_matmul_algo_heuristic(
            blas.handle,
            desc,
            a_layout,
            b_layout,
            c_layout,
            c_layout,
            pref,
        )
    }
    .map_err(|e| {
        CudaError::Blas(format!(
            "no algorithm for bf16 [{m}x{k}]{}·[{k}x{n}]{} -> {:?}: {e}",
            if a.trans { "ᵀ" } else { "" },
            if b.trans { "ᵀ" } else { "" },
            c_type
        ))
    })?;
    let alpha = 1.0f32;
    let beta = if accumulate { 1.0f32 } else { 0.0 };
    // SAFETY: the shapes were checked against the buffer lengths by the
    // callers; A, B and C are device buffers of this GPU; the workspace holds
    // WORKSPACE_BYTES; the call is ordered on this handle's stream, so the
    // descriptors may be destroyed after it returns.
    unsafe {
        lt::matmul(
            blas.handle,
            desc,
            (&alpha as *const f32).cast::<c_void>(),
            (&beta as *const f32).cast::<c_void>(),
            a.ptr as usize as *const c_void,
            a_layout,
            b.ptr as usize as *const c_void,
            b_layout,
            c.ptr() as usize as *const c_void,
            c_layout,
            c.ptr() as usize as *mut c_void,
            c_layout,
            &heuristic.algo,
            blas.workspace_ptr as usize as *mut c_void,
            ws,
            gpu.stream().0.cu_stream() as ltsys::cudaStream_t,
        )
    }
    .map_err(blas_err("matmul"))
}

// ---------------------------------------------------------------------------
// emulator target

#[cfg(feature = "emu")]
mod emu {
    use super::*;
    use crate::backend::cpu::linear::{matmul, Mat};

    /// A row-major bf16 operand `[rows, cols]`, used as is or transposed.
    pub(super) struct Side<'b> {
        pub buf: &'b Buffer<bf16>,
        pub rows: usize,
        pub cols: usize,
        pub transposed: bool,
    }

    fn not_host(what: String) -> CudaError {
        CudaError::WrongDevice(format!("{what} used with the emulator"))
    }

    /// The operand widened to f32 (exact).
    fn widen(side: &Side<'_>) -> Result<Vec<f32>, CudaError> {
        // SAFETY: emulator buffers are only written inside synchronous
        // launches, and none is running.
        let host = unsafe { side.buf.host() }.ok_or_else(|| not_host(format!("{:?}", side.buf)))?;
        Ok(host.iter().map(|x| x.to_f32()).collect())
    }

    fn view<'v>(side: &Side<'_>, data: &'v [f32]) -> Mat<'v, f32> {
        if side.transposed {
            Mat::rm_t(data, side.rows, side.cols)
        } else {
            Mat::rm(data, side.rows, side.cols)
        }
    }

    /// `out[.., out_cols] (+)= a b` in f32 with one rounding to bf16 at the
    /// end for a bf16 output, as cuBLASLt. Shapes were checked by the caller.
    pub(super) fn gemm(
        out: GemmOut<'_>,
        out_cols: usize,
        a: Side<'_>,
        b: Side<'_>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let (da, db) = (widen(&a)?, widen(&b)?);
        let (a, b) = (view(&a, &da), view(&b, &db));
        let len = a.rows * b.cols;
        match out {
            GemmOut::F32(buf) => {
                // SAFETY: as in `widen`.
                let host = unsafe { buf.host() }.ok_or_else(|| not_host(format!("{buf:?}")))?;
                matmul(&mut host[..len], out_cols, a, b, 1.0, accumulate);
            }
            GemmOut::Bf16(buf) => {
                // SAFETY: as in `widen`.
                let host = unsafe { buf.host() }.ok_or_else(|| not_host(format!("{buf:?}")))?;
                let mut acc: Vec<f32> = host[..len].iter().map(|v| v.to_f32()).collect();
                matmul(&mut acc, out_cols, a, b, 1.0, accumulate);
                for (o, v) in host.iter_mut().zip(acc) {
                    *o = bf16::from_f32(v);
                }
            }
        }
        Ok(())
    }
}
