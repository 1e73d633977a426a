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

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys as ltsys};
use half::bf16;

use super::device::Device;
use super::memory::{Buffer, OnDevice};
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
    fn buffer(&self) -> &dyn OnDevice {
        match self {
            GemmOut::Bf16(b) => *b,
            GemmOut::F32(b) => *b,
        }
    }
}

/// Checks the buffers belong to `dev` and `(what, buffer length, rows *
/// cols)` of every operand; then, for an empty sum (`inner == 0`), sets the
/// output's `out_len` elements to zero (or leaves them, when accumulating)
/// and returns `true`: nothing is left to compute.
#[allow(clippy::too_many_arguments)]
fn check(
    dev: &Device,
    op: &str,
    out: GemmOut<'_>,
    a: &Buffer<bf16>,
    b: &Buffer<bf16>,
    operands: &[(&str, usize, usize, usize)],
    (out_len, inner, accumulate): (usize, usize, bool),
) -> Result<bool, CudaError> {
    dev.check_buffers(op, &[out.buffer(), a, b])?;
    check_shapes(op, operands)?;
    if inner > 0 || out_len == 0 {
        return Ok(false);
    }
    if !accumulate {
        // Only the output's view: the buffer may be longer.
        match (dev, out) {
            (Device::Gpu(g), GemmOut::Bf16(buf)) => g.zero_prefix(buf, out_len)?,
            (Device::Gpu(g), GemmOut::F32(buf)) => g.zero_prefix(buf, out_len)?,
            #[cfg(feature = "emu")]
            (Device::Emu, out) => emu::zero_prefix(out, out_len)?,
        }
    }
    Ok(true)
}

/// Checks `(what, buffer length, rows * cols)` of every operand.
fn check_shapes(op: &str, operands: &[(&str, usize, usize, usize)]) -> Result<(), CudaError> {
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
    let operands = [
        ("y", y.len(), m, n),
        ("x", x.len(), m, k),
        ("w", w.len(), n, k),
    ];
    if check(
        dev,
        op,
        y,
        x,
        w,
        &operands,
        (m.saturating_mul(n), k, accumulate),
    )? {
        return Ok(());
    }
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
    let operands = [
        ("dx", dx.len(), m, k),
        ("dy", dy.len(), m, n),
        ("w", w.len(), n, k),
    ];
    if check(
        dev,
        op,
        dx,
        dy,
        w,
        &operands,
        (m.saturating_mul(k), n, accumulate),
    )? {
        return Ok(());
    }
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
    let operands = [
        ("dw", dw.len(), n, k),
        ("dy", dy.len(), m, n),
        ("x", x.len(), m, k),
    ];
    if check(
        dev,
        op,
        dw,
        dy,
        x,
        &operands,
        (n.saturating_mul(k), m, accumulate),
    )? {
        return Ok(());
    }
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

/// 32 MiB: NVIDIA's recommended cuBLASLt workspace on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Plans kept per device before the cache is cleared (a run uses a few
/// dozen shapes; this only bounds a caller that sweeps shapes).
const MAX_PLANS: usize = 4096;

/// What cuBLASLt's descriptors and algorithm choice depend on. Operand
/// addresses enter only through their alignment: the heuristic may pick a
/// kernel that needs 16-byte (or wider) aligned operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PlanKey {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    /// The output is f32 (else bf16).
    pub f32_out: bool,
    pub align_a: u32,
    pub align_b: u32,
    pub align_c: u32,
}

/// The largest power of two up to 256 that divides `ptr`: cuBLASLt's
/// alignment preferences, whose default (and maximum) is 256.
pub(crate) fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// Descriptors and the chosen algorithm of one [`PlanKey`].
struct Plan {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    c: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each was created by cuBLASLt (null when creation failed
        // part way) and is destroyed once; no matmul is being enqueued with
        // them (the cache's lock is held).
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// The cuBLASLt handle of one device (process-wide, with its
/// [`DeviceState`](super::runtime::DeviceState)) and its plans.
pub(crate) struct Blas {
    handle: ltsys::cublasLtHandle_t,
    plans: HashMap<PlanKey, Plan>,
}

// SAFETY: the handle and descriptors are host objects of cuBLASLt, usable
// from any thread; every use holds the device's `blas` lock.
unsafe impl Send for Blas {}

impl Blas {
    fn new(gpu: &Gpu) -> Result<Blas, CudaError> {
        // SAFETY: only tries to open the library.
        if !unsafe { ltsys::is_culib_present() } {
            return Err(CudaError::Blas(
                "the cuBLASLt library (libcublasLt.so.13) is not installed or not on the loader path"
                    .into(),
            ));
        }
        gpu.state().bind()?;
        let handle =
            lt::create_handle().map_err(|e| CudaError::Blas(format!("creating a handle: {e}")))?;
        Ok(Blas {
            handle,
            plans: HashMap::new(),
        })
    }

    /// Number of cached plans of one product shape.
    fn plans_for(&self, m: u64, n: u64, k: u64) -> usize {
        self.plans
            .keys()
            .filter(|p| (p.m, p.n, p.k) == (m, n, k))
            .count()
    }

    fn plan(&mut self, key: PlanKey) -> Result<&Plan, CudaError> {
        if !self.plans.contains_key(&key) {
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            let plan = make_plan(self.handle, &key)?;
            self.plans.insert(key, plan);
        }
        self.plans
            .get(&key)
            .ok_or_else(|| CudaError::Blas("plan cache lost an entry".into()))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle is live and used by nothing else; errors on
        // teardown have nowhere to go.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Frees a preference however the call ends.
struct Pref(ltsys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cuBLASLt, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn blas_err(what: &str) -> impl Fn(lt::CublasError) -> CudaError + '_ {
    move |e| CudaError::Blas(format!("{what}: {e}"))
}

/// Sets a descriptor or preference attribute from a typed value.
///
/// # Safety
/// `T` must be the attribute's documented type.
unsafe fn set<T>(
    what: &str,
    value: T,
    f: impl FnOnce(*const c_void, usize) -> Result<(), lt::CublasError>,
) -> Result<(), CudaError> {
    f(
        (&value as *const T).cast::<c_void>(),
        std::mem::size_of::<T>(),
    )
    .map_err(blas_err(what))
}

/// Creates the descriptors of `key` and asks the heuristic for an algorithm.
fn make_plan(handle: ltsys::cublasLtHandle_t, key: &PlanKey) -> Result<Plan, CudaError> {
    use ltsys::cublasLtMatmulDescAttributes_t::{
        CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB,
    };
    use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
    use ltsys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
    let PlanKey { m, n, k, .. } = *key;
    let c_type = if key.f32_out { CUDA_R_32F } else { CUDA_R_16BF };
    let mut plan = Plan {
        desc: std::ptr::null_mut(),
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        // SAFETY: a plain C struct of integers; the heuristic fills it.
        algo: unsafe { std::mem::zeroed() },
    };
    // Stored shapes: op(A) is [m, k], so A is [k, m] when transposed.
    let (ar, ac) = if key.trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if key.trans_b { (n, k) } else { (k, n) };
    plan.a =
        lt::create_matrix_layout(CUDA_R_16BF, ar, ac, key.lda).map_err(blas_err("layout A"))?;
    plan.b =
        lt::create_matrix_layout(CUDA_R_16BF, br, bc, key.ldb).map_err(blas_err("layout B"))?;
    plan.c = lt::create_matrix_layout(c_type, m, n, key.ldc).map_err(blas_err("layout C"))?;
    plan.desc = lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
        .map_err(blas_err("matmul descriptor"))?;
    for (attr, trans) in [
        (CUBLASLT_MATMUL_DESC_TRANSA, key.trans_a),
        (CUBLASLT_MATMUL_DESC_TRANSB, key.trans_b),
    ] {
        // cublasOperation_t, a C enum (int32): CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let op: i32 = trans as i32;
        // SAFETY: the attribute is an int32; the descriptor is live.
        unsafe {
            set("transpose attribute", op, |p, len| {
                lt::set_matmul_desc_attribute(plan.desc, attr, p, len)
            })
        }?;
    }
    let pref = Pref(lt::create_matmul_pref().map_err(blas_err("preference"))?);
    let workspace = WORKSPACE_BYTES as u64;
    // SAFETY: the attribute is a uint64; the preference is live.
    unsafe {
        set("workspace preference", workspace, |p, len| {
            lt::set_matmul_pref_attribute(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                p,
                len,
            )
        })
    }?;
    for (attr, what, value) in [
        (
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            "alignment of A",
            key.align_a,
        ),
        (
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            "alignment of B",
            key.align_b,
        ),
        (
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            "alignment of C",
            key.align_c,
        ),
        (
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            "alignment of D",
            key.align_c,
        ),
    ] {
        // SAFETY: the alignment attributes are uint32; the preference is live.
        unsafe {
            set(what, value, |p, len| {
                lt::set_matmul_pref_attribute(pref.0, attr, p, len)
            })
        }?;
    }
    // SAFETY: every descriptor is live (owned by `plan` and `pref`).
    let heuristic = unsafe {
        lt::get_matmul_algo_heuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref.0)
    }
    .map_err(|e| {
        CudaError::Blas(format!(
            "no algorithm for bf16 [{m}x{k}]{}·[{k}x{n}]{} -> {:?}: {e}",
            if key.trans_a { "ᵀ" } else { "" },
            if key.trans_b { "ᵀ" } else { "" },
            c_type
        ))
    })?;
    plan.algo = heuristic.algo;
    Ok(plan)
}

/// Column-major `C[m, n] = op(A)[m, k] op(B)[k, n] (+ C)`, bf16 A and B,
/// f32 compute and scale, C bf16 or f32 (row-major callers pass transposes).
/// `k > 0`: the empty sum was handled by the caller.
fn col_major(
    gpu: &Gpu,
    a: Operand,
    b: Operand,
    c: GemmOut<'_>,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<(), CudaError> {
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let dims = |v: usize| {
        i64::try_from(v).map_err(|_| CudaError::Shape(format!("GEMM dimension {v} overflows")))
    };
    let key = PlanKey {
        m: m as u64,
        n: n as u64,
        k: k as u64,
        trans_a: a.trans,
        trans_b: b.trans,
        lda: dims(a.ld)?,
        ldb: dims(b.ld)?,
        ldc: dims(m)?,
        f32_out: matches!(c, GemmOut::F32(_)),
        align_a: alignment(a.ptr),
        align_b: alignment(b.ptr),
        align_c: alignment(c.ptr()),
    };
    // This handle's workspace: GEMMs of other handles run on other streams.
    let mut workspace = gpu
        .workspace
        .lock()
        .map_err(|_| CudaError::Blas("workspace lock poisoned by an earlier panic".into()))?;
    if workspace.is_none() {
        *workspace = Some(gpu.zeros::<u8>(WORKSPACE_BYTES)?);
    }
    let Some(workspace) = workspace.as_ref() else {
        return Err(CudaError::Blas("no workspace".into()));
    };
    let state = gpu.state();
    let mut guard = state
        .blas
        .lock()
        .map_err(|_| CudaError::Blas("handle lock poisoned by an earlier panic".into()))?;
    if guard.is_none() {
        *guard = Some(Blas::new(gpu)?);
    }
    let Some(blas) = guard.as_mut() else {
        return Err(CudaError::Blas("no handle".into()));
    };
    state.bind()?;
    let handle = blas.handle;
    let plan = blas.plan(key)?;
    let alpha = 1.0f32;
    let beta = if accumulate { 1.0f32 } else { 0.0 };
    // SAFETY: the shapes were checked against the buffer lengths and the
    // buffers against this handle by the callers; the workspace holds
    // WORKSPACE_BYTES, the most the preference allowed the algorithm; alpha
    // and beta are read during the call (host pointer mode); the plan stays
    // cached (the lock is held while the call enqueues).
    unsafe {
        lt::matmul(
            handle,
            plan.desc,
            (&alpha as *const f32).cast::<c_void>(),
            (&beta as *const f32).cast::<c_void>(),
            a.ptr as usize as *const c_void,
            plan.a,
            b.ptr as usize as *const c_void,
            plan.b,
            c.ptr() as usize as *const c_void,
            plan.c,
            c.ptr() as usize as *mut c_void,
            plan.c,
            &plan.algo,
            workspace.ptr().cast::<c_void>(),
            WORKSPACE_BYTES,
            gpu.stream().0.cu_stream() as ltsys::cudaStream_t,
        )
    }
    .map_err(blas_err("matmul"))
}

/// Number of cuBLASLt plans cached for `dev` whose column-major product is
/// `[m, k] x [k, n]` (0 on the emulator), for tests of the cache.
pub fn cached_plans(dev: &Device, (m, n, k): (usize, usize, usize)) -> usize {
    match dev {
        Device::Gpu(g) => g
            .state()
            .blas
            .lock()
            .ok()
            .and_then(|b| {
                b.as_ref()
                    .map(|b| b.plans_for(m as u64, n as u64, k as u64))
            })
            .unwrap_or(0),
        #[cfg(feature = "emu")]
        Device::Emu => 0,
    }
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

    /// The first `len` elements of `out` set to zero (checked by the caller).
    pub(super) fn zero_prefix(out: GemmOut<'_>, len: usize) -> Result<(), CudaError> {
        // SAFETY: as in `widen`.
        match out {
            GemmOut::F32(buf) => {
                unsafe { buf.host() }.ok_or_else(|| not_host(format!("{buf:?}")))?[..len].fill(0.0)
            }
            GemmOut::Bf16(buf) => unsafe { buf.host() }
                .ok_or_else(|| not_host(format!("{buf:?}")))?[..len]
                .fill(bf16::ZERO),
        }
        Ok(())
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
