//! GEMMs on row-major matrix views ([`MatRef`]: a buffer, an offset, a shape
//! and a leading dimension), bf16 operands, f32 accumulation, bf16 or f32
//! output, optional accumulation into the output (beta = 1, for gradients
//! summed over the recursion). Views let the engine multiply weights that
//! live at offsets of one flat buffer, rows read with a stride (position 0
//! of each sample) and gradients summed into a flat f32 buffer.
//!
//! [`matmul`] is the general product `c (+)= op(a) op(b)`; the three GEMMs
//! of a linear layer `y = x W^T`, with x [M, K], W [N, K] (the PyTorch
//! Linear weight) and y [M, N], are thin wrappers:
//!
//! - [`linear_forward`]:         y  = x W^T   [M, N]
//! - [`linear_backward_input`]:  dx = dy W    [M, K]
//! - [`linear_backward_weight`]: dW = dy^T x  [N, K]
//!
//! On a GPU they run cuBLASLt; on the emulator target the CPU GEMM of
//! `backend::cpu::linear` on the same bf16 values in f32, rounded to bf16
//! where the output is bf16, so layout tests run without a GPU.
//!
//! cuBLASLt is column-major: a row-major [R, C] view with leading dimension
//! ld is a column-major [C, R] one with the same ld, so `C = op(A) op(B)` is
//! issued as its transpose `C^T = op(B)^T op(A)^T`, with no copies.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys as ltsys};
use half::bf16;

use super::device::Device;
use super::memory::{Buffer, Elem};
use super::runtime::Gpu;
use super::CudaError;

/// A row-major view of `rows x cols` elements of `buf`: element (r, c) at
/// `offset + r * ld + c` (ld >= cols when rows > 1).
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T: Elem> {
    pub buf: &'a Buffer<T>,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl<'a, T: Elem> MatRef<'a, T> {
    /// The whole contiguous `rows x cols` matrix at the start of `buf`.
    pub fn new(buf: &'a Buffer<T>, rows: usize, cols: usize) -> Self {
        Self::strided(buf, 0, rows, cols, cols)
    }

    /// A contiguous `rows x cols` matrix at `offset`.
    pub fn at(buf: &'a Buffer<T>, offset: usize, rows: usize, cols: usize) -> Self {
        Self::strided(buf, offset, rows, cols, cols)
    }

    /// Same as `at` with an explicit leading dimension.
    pub fn strided(buf: &'a Buffer<T>, offset: usize, rows: usize, cols: usize, ld: usize) -> Self {
        MatRef {
            buf,
            offset,
            rows,
            cols,
            ld,
        }
    }

    /// The leading dimension the data is read with: a single row has none,
    /// so any `ld` the caller gave is replaced by `cols` (cuBLASLt needs
    /// ld >= cols, and equal keys share a plan).
    fn stride(&self) -> usize {
        if self.rows <= 1 {
            self.cols
        } else {
            self.ld
        }
    }

    /// Checks the view lies inside its buffer; `op` and `what` name it.
    fn check(&self, op: &str, what: &str) -> Result<(), CudaError> {
        let (rows, cols, ld, offset, len) =
            (self.rows, self.cols, self.ld, self.offset, self.buf.len());
        let desc = || format!("{op}: {what} [{rows}, {cols}] at offset {offset} with ld {ld}");
        if rows > 1 && ld < cols {
            return Err(CudaError::Shape(format!(
                "{}: ld is less than its {cols} columns",
                desc()
            )));
        }
        let end = if rows == 0 || cols == 0 {
            Some(offset)
        } else {
            (rows - 1)
                .checked_mul(ld)
                .and_then(|v| v.checked_add(cols))
                .and_then(|v| v.checked_add(offset))
        };
        let end = end.ok_or_else(|| CudaError::Shape(format!("{} overflows usize", desc())))?;
        if end > len {
            return Err(CudaError::Shape(format!(
                "{} ends at element {end}, past the end of its {len}-element {} buffer",
                desc(),
                T::NAME
            )));
        }
        Ok(())
    }

    /// The device address of element (0, 0) (checked view).
    fn addr(&self) -> Result<u64, CudaError> {
        Ok(self.buf.ptr_at(self.offset)? as usize as u64)
    }
}

/// A GEMM output view.
#[derive(Debug, Clone, Copy)]
pub enum GemmOut<'a> {
    Bf16(MatRef<'a, bf16>),
    F32(MatRef<'a, f32>),
}

impl GemmOut<'_> {
    fn shape(&self) -> (usize, usize) {
        match self {
            GemmOut::Bf16(v) => (v.rows, v.cols),
            GemmOut::F32(v) => (v.rows, v.cols),
        }
    }
    fn stride(&self) -> usize {
        match self {
            GemmOut::Bf16(v) => v.stride(),
            GemmOut::F32(v) => v.stride(),
        }
    }
    fn check(&self, op: &str, what: &str) -> Result<(), CudaError> {
        match self {
            GemmOut::Bf16(v) => v.check(op, what),
            GemmOut::F32(v) => v.check(op, what),
        }
    }
    fn addr(&self) -> Result<u64, CudaError> {
        match self {
            GemmOut::Bf16(v) => v.addr(),
            GemmOut::F32(v) => v.addr(),
        }
    }
}

/// `c (+)= op(a) op(b)`, op = transpose when the flag is set; bf16
/// operands, f32 accumulation. op(a) is [M, K], op(b) [K, N] and c [M, N];
/// only c's elements are written (the gaps between its rows and the rest of
/// its buffer are left as they are). An empty sum (K = 0) sets c to zero,
/// or leaves it when accumulating.
pub fn matmul(
    dev: &Device,
    c: GemmOut<'_>,
    a: MatRef<'_, bf16>,
    trans_a: bool,
    b: MatRef<'_, bf16>,
    trans_b: bool,
    accumulate: bool,
) -> Result<(), CudaError> {
    product(
        dev,
        "matmul",
        ["c", "a", "b"],
        c,
        (a, trans_a),
        (b, trans_b),
        accumulate,
    )
}

/// `y[M, N] (+)= x[M, K] w[N, K]^T`.
pub fn linear_forward(
    dev: &Device,
    y: GemmOut<'_>,
    x: MatRef<'_, bf16>,
    w: MatRef<'_, bf16>,
    accumulate: bool,
) -> Result<(), CudaError> {
    product(
        dev,
        "linear_forward",
        ["y", "x", "w"],
        y,
        (x, false),
        (w, true),
        accumulate,
    )
}

/// `dx[M, K] (+)= dy[M, N] w[N, K]`.
pub fn linear_backward_input(
    dev: &Device,
    dx: GemmOut<'_>,
    dy: MatRef<'_, bf16>,
    w: MatRef<'_, bf16>,
    accumulate: bool,
) -> Result<(), CudaError> {
    product(
        dev,
        "linear_backward_input",
        ["dx", "dy", "w"],
        dx,
        (dy, false),
        (w, false),
        accumulate,
    )
}

/// `dw[N, K] (+)= dy[M, N]^T x[M, K]`.
pub fn linear_backward_weight(
    dev: &Device,
    dw: GemmOut<'_>,
    dy: MatRef<'_, bf16>,
    x: MatRef<'_, bf16>,
    accumulate: bool,
) -> Result<(), CudaError> {
    product(
        dev,
        "linear_backward_weight",
        ["dw", "dy", "x"],
        dw,
        (dy, true),
        (x, false),
        accumulate,
    )
}

/// The shape `[rows, cols]` of `op(v)`.
fn op_shape(v: &MatRef<'_, bf16>, trans: bool) -> (usize, usize) {
    if trans {
        (v.cols, v.rows)
    } else {
        (v.rows, v.cols)
    }
}

/// [`matmul`], with the operation and its operands (c, a, b) named for errors.
fn product(
    dev: &Device,
    op: &str,
    [c_name, a_name, b_name]: [&str; 3],
    c: GemmOut<'_>,
    (a, trans_a): (MatRef<'_, bf16>, bool),
    (b, trans_b): (MatRef<'_, bf16>, bool),
    accumulate: bool,
) -> Result<(), CudaError> {
    let out_buf: &dyn super::memory::OnDevice = match &c {
        GemmOut::Bf16(v) => v.buf,
        GemmOut::F32(v) => v.buf,
    };
    dev.check_buffers(op, &[out_buf, a.buf, b.buf])?;
    let t = |trans: bool| if trans { "ᵀ" } else { "" };
    let (m, k) = op_shape(&a, trans_a);
    let (k2, n) = op_shape(&b, trans_b);
    if k != k2 {
        return Err(CudaError::Shape(format!(
            "{op}: inner dimensions differ: {a_name}{} is [{m}, {k}], {b_name}{} is [{k2}, {n}]",
            t(trans_a),
            t(trans_b)
        )));
    }
    if c.shape() != (m, n) {
        let (r, cc) = c.shape();
        return Err(CudaError::Shape(format!(
            "{op}: {c_name} is [{r}, {cc}], the product {a_name}{} {b_name}{} is [{m}, {n}]",
            t(trans_a),
            t(trans_b)
        )));
    }
    c.check(op, c_name)?;
    a.check(op, a_name)?;
    b.check(op, b_name)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            match (dev, c) {
                (Device::Gpu(g), GemmOut::Bf16(v)) => {
                    g.zero_rows(v.buf, v.offset, v.rows, v.cols, v.stride())?
                }
                (Device::Gpu(g), GemmOut::F32(v)) => {
                    g.zero_rows(v.buf, v.offset, v.rows, v.cols, v.stride())?
                }
                #[cfg(feature = "emu")]
                (Device::Emu, c) => emu::zero(c)?,
            }
        }
        return Ok(());
    }
    match dev {
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: a
        // stored row-major view is its own transpose in column-major terms,
        // so each operand keeps its flag and ld, and the two swap places.
        Device::Gpu(g) => col_major(
            g,
            Operand {
                ptr: b.addr()?,
                trans: trans_b,
                ld: b.stride(),
            },
            Operand {
                ptr: a.addr()?,
                trans: trans_a,
                ld: a.stride(),
            },
            c,
            (n, m, k),
            accumulate,
        ),
        #[cfg(feature = "emu")]
        Device::Emu => emu::gemm(c, (a, trans_a), (b, trans_b), accumulate),
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
/// f32 compute and scale, C bf16 or f32 at its view's address with its
/// view's ld ([`product`] passes the transposed row-major product).
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
    let c_ptr = c.addr()?;
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
        ldc: dims(c.stride())?,
        f32_out: matches!(c, GemmOut::F32(_)),
        align_a: alignment(a.ptr),
        align_b: alignment(b.ptr),
        align_c: alignment(c_ptr),
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
    // SAFETY: the caller checked every view (offset, shape and ld) against
    // its buffer's length and the buffers against this handle; ld >= the
    // stored rows of each operand (its stride); the workspace holds
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
            c_ptr as usize as *const c_void,
            plan.c,
            c_ptr as usize as *mut c_void,
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

    fn not_host(what: String) -> CudaError {
        CudaError::WrongDevice(format!("{what} used with the emulator"))
    }

    /// The host memory of an emulator buffer.
    #[allow(clippy::mut_from_ref)] // the buffer's cell, as for kernels
    fn host<T: Elem>(buf: &Buffer<T>) -> Result<&mut Vec<T>, CudaError> {
        // SAFETY: emulator buffers are only written inside synchronous
        // launches, and none is running; each caller drops the view before
        // taking another of the same buffer.
        unsafe { buf.host() }.ok_or_else(|| not_host(format!("{buf:?}")))
    }

    /// The flat index of each element of a (checked) view, row by row.
    fn indices<T: Elem>(v: &MatRef<'_, T>) -> impl Iterator<Item = usize> {
        let (offset, cols, ld) = (v.offset, v.cols, v.stride());
        (0..v.rows).flat_map(move |r| (0..cols).map(move |c| offset + r * ld + c))
    }

    /// The view's elements, row-major and contiguous, widened to f32: only
    /// the view, as the buffer may hold all the weights or activations.
    fn gather<T: Elem>(v: &MatRef<'_, T>, wide: impl Fn(T) -> f32) -> Result<Vec<f32>, CudaError> {
        let data = host(v.buf)?;
        Ok(indices(v).map(|i| wide(data[i])).collect())
    }

    /// Writes `vals` (row-major, contiguous) over the view's elements only.
    fn scatter<T: Elem>(
        v: &MatRef<'_, T>,
        vals: &[f32],
        narrow: impl Fn(f32) -> T,
    ) -> Result<(), CudaError> {
        let data = host(v.buf)?;
        for (i, &x) in indices(v).zip(vals) {
            data[i] = narrow(x);
        }
        Ok(())
    }

    /// The (checked) output view set to zero.
    pub(super) fn zero(out: GemmOut<'_>) -> Result<(), CudaError> {
        match out {
            GemmOut::F32(v) => scatter(&v, &vec![0.0; v.rows * v.cols], |x| x),
            GemmOut::Bf16(v) => scatter(&v, &vec![0.0; v.rows * v.cols], bf16::from_f32),
        }
    }

    /// `out (+)= op(a) op(b)` in f32 with one rounding to bf16 at the end for
    /// a bf16 output, as cuBLASLt. Views were checked by the caller.
    pub(super) fn gemm(
        out: GemmOut<'_>,
        (a, trans_a): (MatRef<'_, bf16>, bool),
        (b, trans_b): (MatRef<'_, bf16>, bool),
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let (da, db) = (gather(&a, bf16::to_f32)?, gather(&b, bf16::to_f32)?);
        let mat = |data, v: &MatRef<'_, bf16>, trans| {
            if trans {
                Mat::rm_t(data, v.rows, v.cols)
            } else {
                Mat::rm(data, v.rows, v.cols)
            }
        };
        let (ma, mb) = (mat(&da, &a, trans_a), mat(&db, &b, trans_b));
        let (rows, cols) = out.shape();
        // Only read when accumulating: the view may hold anything (NaN) else.
        let mut acc = match (out, accumulate) {
            (GemmOut::F32(v), true) => gather(&v, |x| x)?,
            (GemmOut::Bf16(v), true) => gather(&v, bf16::to_f32)?,
            (_, false) => vec![0.0; rows * cols],
        };
        matmul(&mut acc, cols, ma, mb, 1.0, accumulate);
        match out {
            GemmOut::F32(v) => scatter(&v, &acc, |x| x),
            GemmOut::Bf16(v) => scatter(&v, &acc, bf16::from_f32),
        }
    }
}
