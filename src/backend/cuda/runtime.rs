//! The GPU runtime: probe, context, stream, modules, memory, events, launches.
//!
//! Design rules:
//! - Nothing here panics for a missing library or device: [`probe`] checks
//!   that libcuda loads before any other driver call (cudarc panics at the
//!   first call into a library it cannot load), and every failure is a
//!   [`CudaError`].
//! - One process-wide state per device ordinal, made at the first
//!   [`Gpu::new`] and never dropped: the primary context (retained once, so
//!   it is not torn down and rebuilt between handles while cuBLASLt or
//!   loaded modules refer to it), the loaded modules, the cuBLASLt handle and
//!   its descriptor cache. Handles on any thread share it; every call that
//!   reaches the driver makes the context current on the calling thread
//!   first.
//! - A [`Gpu`] is a handle on that state with ONE stream of its own; its
//!   buffers, launches, copies and GEMMs are ordered by that stream, so
//!   cudarc's per-buffer event tracking is switched off, and a buffer is
//!   refused by every other handle. Work on another [`Stream`] is ordered
//!   against it with [`Event`]s by the caller.
//! - Modules are loaded from the images embedded at build time, lazily, once
//!   per module, image and process; functions are looked up once and cached.
//!   A handle uses the image `images::choose_image` picks for its device
//!   (the device's SASS, else the compute_80 PTX, which the driver compiles),
//!   or the PTX when asked (`TRM_KERNEL_IMAGE=ptx`, [`Gpu::with_image`]).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUevent_flags, CUfunction, CUfunction_attribute, CUmodule};
use cudarc::driver::{result, CudaContext, CudaEvent, CudaStream};

use super::abi::{Kernel, KernelArgs, LaunchConfig};
use super::images::{ImageKind, ImageRequest, NoImage, Target};
use super::memory::{Buffer, Elem, Mem, Owner};
use super::{kernels, CudaError};

/// Shared memory (static plus dynamic) a block may use without the
/// function's opt-in attribute.
const DEFAULT_MAX_SHARED: u32 = 48 * 1024;

/// Checks a launch's shared memory against the device's rule: static plus
/// dynamic bytes at most its opt-in maximum `max` (a
/// [`CudaError::SharedMemory`] otherwise, rather than a failed launch).
/// Returns the value to give `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`
/// when static plus dynamic exceeds 48 KiB: the dynamic bytes.
pub fn check_shared_memory(
    kernel: &str,
    static_bytes: u32,
    dynamic_bytes: u32,
    max: u32,
) -> Result<Option<u32>, CudaError> {
    let total = u64::from(static_bytes) + u64::from(dynamic_bytes);
    if total > u64::from(max) {
        return Err(CudaError::SharedMemory {
            kernel: kernel.to_string(),
            static_bytes,
            dynamic_bytes,
            max,
        });
    }
    Ok((total > u64::from(DEFAULT_MAX_SHARED)).then_some(dynamic_bytes))
}

/// What the probe found about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: i32,
}

/// Whether the CUDA driver library loads (no driver call is made).
pub fn driver_library_present() -> bool {
    // SAFETY: only tries to open the library; makes no call into it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The oldest driver trm runs on, as cuDriverGetVersion codes it: CUDA 13.0
/// (NVIDIA R580). The kernels are built by nvcc 13.0 (PTX ISA 9.0, which an
/// older driver cannot JIT, and cubins a driver of an older major release
/// need not load), and cudarc is pinned to the 13.0 driver API.
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// cuDriverGetVersion's code (13000 for CUDA 13.0), or why it is unknown.
pub fn driver_version() -> Result<i32, CudaError> {
    if !driver_library_present() {
        return Err(CudaError::NoDevice(
            "the CUDA driver library (libcuda.so) is not installed or not on the loader path"
                .into(),
        ));
    }
    let mut code: std::ffi::c_int = 0;
    // SAFETY: the library loads (checked above), so cudarc's lazy loader
    // does not panic; the call writes one int and needs no cuInit.
    let result = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut code) };
    if result != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::NoDevice(format!(
            "the CUDA driver did not say its version: {result:?}"
        )));
    }
    Ok(code)
}

/// Refuses a driver older than [`MIN_DRIVER_VERSION`] (code as
/// cuDriverGetVersion gives it), saying what is needed.
pub fn check_driver_version(code: i32) -> Result<(), CudaError> {
    if code >= MIN_DRIVER_VERSION {
        return Ok(());
    }
    Err(CudaError::NoDevice(format!(
        "the CUDA driver is for CUDA {}.{}, and trm's kernels (built by nvcc 13.0) need a \
         driver for CUDA {}.{} or newer (NVIDIA R580 or later)",
        code / 1000,
        code % 1000 / 10,
        MIN_DRIVER_VERSION / 1000,
        MIN_DRIVER_VERSION % 1000 / 10
    )))
}

/// The number of CUDA devices, or [`CudaError::NoDevice`] when the driver
/// library is missing, too old, does not initialise, or sees none.
pub fn device_count() -> Result<usize, CudaError> {
    check_driver_version(driver_version()?)?;
    let count = CudaContext::device_count()
        .map_err(|e| CudaError::NoDevice(format!("the CUDA driver did not initialise: {e}")))?;
    if count <= 0 {
        return Err(CudaError::NoDevice(
            "the CUDA driver reports no devices".into(),
        ));
    }
    Ok(count as usize)
}

/// Every CUDA device, or [`CudaError::NoDevice`]. Never panics: the driver
/// library is checked before the first call into it.
pub fn probe() -> Result<Vec<DeviceInfo>, CudaError> {
    let count = device_count()?;
    (0..count).map(info).collect()
}

/// What the driver says about device `ordinal`, from device queries alone:
/// no context is made, so probing every GPU of a node does not leave a
/// context (hundreds of MiB) on each.
fn info(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let op = |what: &str| format!("{what} of device {ordinal}");
    let dev =
        result::device::get(ordinal as i32).map_err(|e| CudaError::driver(op("handle"), e))?;
    let attribute = |a: A, what: &str| {
        // SAFETY: `dev` is a device handle from the driver.
        unsafe { result::device::get_attribute(dev, a) }.map_err(|e| CudaError::driver(op(what), e))
    };
    Ok(DeviceInfo {
        ordinal,
        name: result::device::get_name(dev).map_err(|e| CudaError::driver(op("name"), e))?,
        capability: (
            attribute(
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                "compute capability",
            )?,
            attribute(
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                "compute capability",
            )?,
        ),
        // SAFETY: as above.
        total_memory: unsafe { result::device::total_mem(dev) }
            .map_err(|e| CudaError::driver(op("memory size"), e))?,
        multiprocessors: attribute(
            A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "multiprocessor count",
        )?,
    })
}

/// A stream of one [`Gpu`].
#[derive(Debug, Clone)]
pub struct Stream(pub(crate) Arc<CudaStream>);

impl Stream {
    /// Blocks until the stream's work is done; reports its asynchronous errors.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.0
            .synchronize()
            .map_err(|e| CudaError::driver("stream synchronize", e))
    }
    /// Makes later work on this stream wait for `event`.
    pub fn wait(&self, event: &Event) -> Result<(), CudaError> {
        self.0
            .wait(&event.0)
            .map_err(|e| CudaError::driver("stream wait for event", e))
    }
    /// The cudarc stream, for libraries that take one (NCCL).
    pub fn raw(&self) -> &Arc<CudaStream> {
        &self.0
    }
}

/// A timing event recorded on a stream.
#[derive(Debug)]
pub struct Event(CudaEvent);

impl Event {
    /// Milliseconds from `start` to this event (waits for both).
    pub fn elapsed_ms_since(&self, start: &Event) -> Result<f32, CudaError> {
        start
            .0
            .elapsed_ms(&self.0)
            .map_err(|e| CudaError::driver("event elapsed time", e))
    }
    /// Blocks until the work before the event is done.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.0
            .synchronize()
            .map_err(|e| CudaError::driver("event synchronize", e))
    }
    /// Whether the work before the event is done, without waiting (an
    /// error of that work is returned).
    pub fn query(&self) -> Result<bool, CudaError> {
        self.0
            .context()
            .bind_to_thread()
            .and_then(|()| self.0.try_is_complete())
            .map_err(|e| CudaError::driver("event query", e))
    }
}

/// A CUDA graph: the launches one capture recorded, replayed as one.
pub struct Graph(cudarc::driver::CudaGraph);

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl Graph {
    /// Replays the recorded work on the stream it was captured from.
    pub fn launch(&self) -> Result<(), CudaError> {
        self.0
            .launch()
            .map_err(|e| CudaError::driver("launching a CUDA graph", e))
    }
}

/// A kernel function and what launches need to know about it.
struct Function {
    raw: CUfunction,
    /// `CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES`.
    static_shared: u32,
    /// The dynamic shared memory the function currently allows; only ever
    /// raised, so a launch on another thread that relies on an earlier
    /// value stays valid.
    dynamic_allowed: u32,
}

/// A loaded module (one image of one kernel file) and the functions looked
/// up in it.
struct Module {
    raw: CUmodule,
    functions: HashMap<&'static str, Function>,
}

// SAFETY: module and function handles are plain driver handles, valid on any
// thread with their context current; every use holds the modules lock.
unsafe impl Send for Module {}

/// The process-wide state of one device ordinal (module docs).
pub(crate) struct DeviceState {
    pub(crate) ctx: Arc<CudaContext>,
    info: DeviceInfo,
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN` (227 KiB on
    /// sm_90, 163 KiB on sm_80, 99 KiB on sm_86 and sm_89).
    max_shared_optin: u32,
    /// By (module, target): handles asking for different images share a device.
    modules: Mutex<HashMap<(&'static str, &'static str), Module>>,
    /// cuBLASLt: the handle and cached descriptors, made at the first GEMM.
    pub(crate) blas: Mutex<Option<super::gemm::Blas>>,
}

impl DeviceState {
    /// The state of `ordinal`, made on first use; `ordinal` must exist.
    fn get(ordinal: usize) -> Result<&'static DeviceState, CudaError> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, &'static DeviceState>>> = OnceLock::new();
        // Held while a state is made, so two threads never make one each.
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| poisoned("device table"))?;
        if let Some(&state) = devices.get(&ordinal) {
            return Ok(state);
        }
        // Retains the primary context (and makes it current here); the
        // retain is never released, so the context lives as long as the process.
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::driver(format!("opening device {ordinal}"), e))?;
        // SAFETY: no buffer of this context exists yet; every buffer of a Gpu
        // is used on its one stream (module docs), so the per-buffer events
        // cudarc would record are not needed.
        unsafe { ctx.disable_event_tracking() };
        let info = info(ordinal)?;
        let optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| CudaError::driver(format!("shared memory limit of device {ordinal}"), e))?;
        keep_pool_memory(&ctx);
        let state: &'static DeviceState = Box::leak(Box::new(DeviceState {
            ctx,
            info,
            max_shared_optin: optin.max(0) as u32,
            modules: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
        }));
        devices.insert(ordinal, state);
        Ok(state)
    }

    pub(crate) fn bind(&self) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("making the context current", e))
    }
}

/// Stream-ordered frees return memory to the device's default pool, which by
/// default hands it back to the driver at every synchronisation, so the next
/// allocation maps it again; keeping it makes steady-state allocation cheap.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    if !ctx.has_async_alloc() {
        return;
    }
    // SAFETY: the device comes from the context; the attribute is a u64.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
            let mut keep = u64::MAX;
            // Only a speed-up: the pool works without it.
            let _ = result::mem_pool::set_attribute(
                pool,
                CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast::<c_void>(),
            );
        }
    }
}

fn poisoned(what: &str) -> CudaError {
    CudaError::Shape(format!("{what} lock poisoned by an earlier panic"))
}

/// A handle on one CUDA device: the process-wide [`DeviceState`] of its
/// ordinal and a stream of its own.
pub struct Gpu {
    state: &'static DeviceState,
    stream: Stream,
    /// Unique in the process: the owner tag of this handle's buffers.
    handle: u64,
    /// This handle's cuBLASLt workspace (GEMMs on different streams must not
    /// share one), made at its first GEMM.
    pub(crate) workspace: Mutex<Option<Buffer<u8>>>,
    /// The kernel image its launches use, or why none fits the device.
    image: Result<&'static Target, NoImage>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.state.info)
            .field("handle", &self.handle)
            .field("image", &self.image.as_ref().map(|t| t.name))
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`, or [`CudaError::NoDevice`] when there is
    /// none, with the kernel image `TRM_KERNEL_IMAGE` asks for (the best
    /// one for the device when unset).
    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        Gpu::with_image(ordinal, kernels::image_request()?)
    }

    /// [`Gpu::new`] with the kernel image chosen by `request`, whatever the
    /// environment says (a test compares the PTX with the SASS this way).
    pub fn with_image(ordinal: usize, request: ImageRequest) -> Result<Gpu, CudaError> {
        static HANDLES: AtomicU64 = AtomicU64::new(1);
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, the driver sees {count}"
            )));
        }
        let state = DeviceState::get(ordinal)?;
        state.bind()?;
        let stream = state
            .ctx
            .new_stream()
            .map_err(|e| CudaError::driver("creating a stream", e))?;
        Ok(Gpu {
            state,
            stream: Stream(stream),
            handle: HANDLES.fetch_add(1, Ordering::Relaxed),
            workspace: Mutex::new(None),
            image: kernels::image_for(state.info.capability, request),
        })
    }

    /// The kernel image this handle's launches load, or
    /// [`CudaError::UnsupportedDevice`] saying why none runs on the device.
    pub fn kernel_image(&self) -> Result<&'static Target, CudaError> {
        self.image.clone().map_err(|why| {
            let info = &self.state.info;
            CudaError::UnsupportedDevice {
                ordinal: info.ordinal,
                name: info.name.clone(),
                major: info.capability.0,
                minor: info.capability.1,
                reason: why.reason(info.capability),
            }
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.state.info
    }
    /// The owner tag of this handle's buffers.
    pub fn owner(&self) -> Owner {
        Owner::Gpu {
            ordinal: self.state.info.ordinal,
            handle: self.handle,
        }
    }
    /// Whether both handles use the same CUDA context (every handle of one
    /// ordinal does).
    pub fn shares_context_with(&self, other: &Gpu) -> bool {
        Arc::ptr_eq(&self.state.ctx, &other.state.ctx)
    }
    /// Shared memory a block may use with the opt-in (static plus dynamic).
    pub fn max_shared_per_block(&self) -> u32 {
        self.state.max_shared_optin
    }
    /// The stream every operation of this handle runs on.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }
    /// A further stream of the same context (ordered with [`Event`]s).
    pub fn new_stream(&self) -> Result<Stream, CudaError> {
        self.state
            .ctx
            .new_stream()
            .map(Stream)
            .map_err(|e| CudaError::driver("creating a stream", e))
    }
    /// Makes this device's context current on the calling thread, for
    /// libraries that take the device from it (NCCL).
    pub fn bind(&self) -> Result<(), CudaError> {
        self.state.bind()
    }
    /// Waits for this handle's stream and reports asynchronous errors.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()
    }

    /// Refuses a stream of another context.
    fn check_stream(&self, stream: &Stream) -> Result<(), CudaError> {
        if Arc::ptr_eq(stream.0.context(), &self.state.ctx) {
            Ok(())
        } else {
            Err(CudaError::WrongDevice(format!(
                "a stream of GPU {} used with GPU {}",
                stream.0.context().ordinal(),
                self.state.info.ordinal
            )))
        }
    }

    /// Records what `body` launches on this handle's stream into a graph
    /// instead of running it. Fails (and leaves the stream as it was) when
    /// `body` fails or does something a capture cannot hold, such as waiting
    /// for the device; nothing `body` launched has then run.
    pub fn capture(
        &self,
        body: impl FnOnce() -> Result<(), CudaError>,
    ) -> Result<Graph, CudaError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.state.bind()?;
        self.stream
            .0
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| CudaError::driver("beginning a stream capture", e))?;
        let ran = body();
        // End the capture whatever happened, so the stream runs work again.
        let ended = self
            .stream
            .0
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| CudaError::driver("ending a stream capture", e));
        ran?;
        ended?.map(Graph).ok_or_else(|| {
            CudaError::driver(
                "ending a stream capture",
                cudarc::driver::DriverError(
                    cudarc::driver::sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                ),
            )
        })
    }

    /// A timing event recorded now on `stream` (this handle's when `None`).
    pub fn record_event(&self, stream: Option<&Stream>) -> Result<Event, CudaError> {
        let stream = stream.unwrap_or(&self.stream);
        self.check_stream(stream)?;
        let event = self
            .state
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| CudaError::driver("creating an event", e))?;
        event
            .record(&stream.0)
            .map_err(|e| CudaError::driver("recording an event", e))?;
        Ok(Event(event))
    }

    // --- memory ---------------------------------------------------------------

    fn wrap<T: Elem>(&self, slice: cudarc::driver::CudaSlice<T>, len: usize) -> Buffer<T> {
        use cudarc::driver::DevicePtr;
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream.0);
            ptr
        };
        Buffer {
            len,
            mem: Mem::Gpu { slice, ptr },
            owner: self.owner(),
        }
    }

    /// A zeroed buffer of `len` elements.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buffer<T>, CudaError> {
        // cudarc multiplies without a check (a panic in debug builds).
        if len.checked_mul(std::mem::size_of::<T>()).is_none() {
            return Err(CudaError::Shape(format!(
                "{len} {} elements overflow the address space",
                T::NAME
            )));
        }
        // At least one element: every buffer then has a real address.
        let slice = self
            .stream
            .0
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| CudaError::driver(format!("allocating {len} {}", T::NAME), e))?;
        Ok(self.wrap(slice, len))
    }

    /// A buffer holding a copy of `host`.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<Buffer<T>, CudaError> {
        if host.is_empty() {
            return self.zeros(0);
        }
        let slice =
            self.stream.0.clone_htod(host).map_err(|e| {
                CudaError::driver(format!("uploading {} {}", host.len(), T::NAME), e)
            })?;
        Ok(self.wrap(slice, host.len()))
    }

    fn slice_of<'b, T: Elem>(
        &self,
        buf: &'b Buffer<T>,
    ) -> Result<&'b cudarc::driver::CudaSlice<T>, CudaError> {
        // The owner names the handle, hence the stream the buffer is
        // allocated and freed on, not just the ordinal.
        match &buf.mem {
            Mem::Gpu { slice, .. } if buf.owner == self.owner() => Ok(slice),
            _ => Err(CudaError::WrongDevice(format!(
                "{buf:?} used with {}; a buffer may only be used with the device handle that made it",
                self.owner()
            ))),
        }
    }

    /// Copies `src` into the start of `buf`.
    pub fn write<T: Elem>(&self, buf: &Buffer<T>, src: &[T]) -> Result<(), CudaError> {
        buf.check_len("write", src.len())?;
        self.slice_of(buf)?;
        if src.is_empty() {
            return Ok(());
        }
        self.state.bind()?;
        // SAFETY: the destination holds src.len() elements (checked above);
        // the copy is ordered on this handle's stream and the driver stages
        // pageable host memory before returning, so `src` may go away after.
        unsafe {
            result::memcpy_htod_async(buf.ptr() as usize as u64, src, self.stream.0.cu_stream())
        }
        .map_err(|e| CudaError::driver("host to device copy", e))
    }

    /// The buffer's contents (waits for the stream first).
    pub fn download<T: Elem>(&self, buf: &Buffer<T>) -> Result<Vec<T>, CudaError> {
        let slice = self.slice_of(buf)?;
        self.synchronize()?;
        let mut host = vec![T::default(); buf.len];
        if buf.len > 0 {
            use cudarc::driver::DevicePtr;
            self.state.bind()?;
            let (ptr, _sync) = slice.device_ptr(&self.stream.0);
            // SAFETY: `host` and the allocation both hold buf.len elements.
            unsafe { result::memcpy_dtoh_async(&mut host[..], ptr, self.stream.0.cu_stream()) }
                .map_err(|e| CudaError::driver("device to host copy", e))?;
            self.synchronize()?;
        }
        Ok(host)
    }

    /// Copies `src` into `buf` from element `offset` on.
    pub fn write_at<T: Elem>(
        &self,
        buf: &Buffer<T>,
        offset: usize,
        src: &[T],
    ) -> Result<(), CudaError> {
        self.slice_of(buf)?;
        let dst = range_start("write_at", buf, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.state.bind()?;
        // SAFETY: the range lies inside the allocation (checked); ordered on
        // this handle's stream; pageable `src` is staged before returning.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.0.cu_stream()) }
            .map_err(|e| CudaError::driver("host to device copy", e))
    }

    /// Elements `offset..offset + len` of `buf` (waits for the stream first).
    pub fn download_range<T: Elem>(
        &self,
        buf: &Buffer<T>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<T>, CudaError> {
        self.slice_of(buf)?;
        let src = range_start("download_range", buf, offset, len)?;
        self.synchronize()?;
        let mut host = vec![T::default(); len];
        if len > 0 {
            self.state.bind()?;
            // SAFETY: `host` and the checked range both hold `len` elements.
            unsafe { result::memcpy_dtoh_async(&mut host[..], src, self.stream.0.cu_stream()) }
                .map_err(|e| CudaError::driver("device to host copy", e))?;
            self.synchronize()?;
        }
        Ok(host)
    }

    /// Copies `len` elements of `src` from `src_offset` into `dst` at
    /// `dst_offset` (stream-ordered; the ranges must not overlap).
    pub fn copy<T: Elem>(
        &self,
        (dst, dst_offset): (&Buffer<T>, usize),
        (src, src_offset): (&Buffer<T>, usize),
        len: usize,
    ) -> Result<(), CudaError> {
        self.slice_of(dst)?;
        self.slice_of(src)?;
        let d = range_start("copy: destination", dst, dst_offset, len)?;
        let s = range_start("copy: source", src, src_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.state.bind()?;
        // SAFETY: both ranges lie inside their allocations (checked), both
        // buffers belong to this handle's stream.
        unsafe {
            result::memcpy_dtod_async(
                d,
                s,
                len * std::mem::size_of::<T>(),
                self.stream.0.cu_stream(),
            )
        }
        .map_err(|e| CudaError::driver("device to device copy", e))
    }

    /// Free and total bytes of this device's memory.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.state.bind()?;
        result::mem_get_info().map_err(|e| CudaError::driver("cuMemGetInfo", e))
    }

    /// Sets every byte of `buf` to zero (stream-ordered).
    pub fn zero<T: Elem>(&self, buf: &Buffer<T>) -> Result<(), CudaError> {
        self.zero_prefix(buf, buf.len)
    }

    /// Sets the first `len` elements of `buf` to zero (stream-ordered).
    pub fn zero_prefix<T: Elem>(&self, buf: &Buffer<T>, len: usize) -> Result<(), CudaError> {
        self.slice_of(buf)?;
        buf.check_len("zero", len)?;
        if len == 0 {
            return Ok(());
        }
        self.state.bind()?;
        // SAFETY: the allocation holds at least `len` elements (checked).
        unsafe {
            result::memset_d8_async(
                buf.ptr() as usize as u64,
                0,
                len * std::mem::size_of::<T>(),
                self.stream.0.cu_stream(),
            )
        }
        .map_err(|e| CudaError::driver("memset", e))
    }

    /// Sets `rows` runs of `cols` elements to zero, run `r` starting at
    /// element `offset + r * ld` of `buf` (a row-major view; the gaps between
    /// runs keep their values). Stream-ordered.
    pub fn zero_rows<T: Elem>(
        &self,
        buf: &Buffer<T>,
        offset: usize,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<(), CudaError> {
        self.slice_of(buf)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        // One run, or runs that touch: a plain memset.
        let ld = if rows == 1 { cols } else { ld };
        let shape_err = || {
            CudaError::Shape(format!(
                "zero_rows: {rows} rows of {cols} at {offset} with stride {ld} do not fit {buf:?}"
            ))
        };
        if ld < cols {
            return Err(shape_err());
        }
        let end = (rows - 1)
            .checked_mul(ld)
            .and_then(|v| v.checked_add(cols))
            .and_then(|v| v.checked_add(offset))
            .ok_or_else(shape_err)?;
        buf.check_len("zero_rows", end)?;
        let size = std::mem::size_of::<T>();
        let start = buf.ptr_at(offset)? as usize as u64;
        let stream = self.stream.0.cu_stream();
        self.state.bind()?;
        if ld == cols {
            // SAFETY: the range lies inside the allocation (checked above).
            return unsafe { result::memset_d8_async(start, 0, rows * cols * size, stream) }
                .map_err(|e| CudaError::driver("memset", e));
        }
        // SAFETY: as above; the pitch (ld) is at least the width (cols).
        let two_d = unsafe {
            cudarc::driver::sys::cuMemsetD2D8Async(start, ld * size, 0, cols * size, rows, stream)
        }
        .result();
        if two_d.is_ok() {
            return Ok(());
        }
        // The 2D memset may refuse a pitch it does not support (the driver
        // bounds it); one memset per row always works.
        for r in 0..rows {
            let row = start + (r * ld * size) as u64;
            // SAFETY: row r lies inside the allocation (checked above).
            unsafe { result::memset_d8_async(row, 0, cols * size, stream) }
                .map_err(|e| CudaError::driver("memset", e))?;
        }
        Ok(())
    }

    // --- launches -------------------------------------------------------------

    /// The function `name` of `module`, loaded on first use, allowed
    /// `dynamic_shared` bytes of dynamic shared memory (a typed error when
    /// static plus dynamic exceeds the device's maximum).
    fn function(
        &self,
        module: &'static str,
        name: &'static str,
        dynamic_shared: u32,
    ) -> Result<CUfunction, CudaError> {
        let state = self.state;
        let target = self.kernel_image()?;
        let key = (module, target.name);
        let mut modules = state.modules.lock().map_err(|_| poisoned("module cache"))?;
        state.bind()?;
        let m = match modules.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Module {
                raw: load_module(module, target)?,
                functions: HashMap::new(),
            }),
        };
        if !m.functions.contains_key(name) {
            let cname = CString::new(name)
                .map_err(|_| CudaError::Shape(format!("kernel name {name:?} has a NUL byte")))?;
            // SAFETY: `m.raw` is a live module of this context.
            let raw = unsafe { result::module::get_function(m.raw, cname) }.map_err(|e| {
                CudaError::driver(
                    format!("finding kernel {name} in {module} ({})", target.describe()),
                    e,
                )
            })?;
            let attribute = |a: CUfunction_attribute, what: &str| {
                // SAFETY: `raw` is a live function of this context.
                unsafe { result::function::get_function_attribute(raw, a) }
                    .map(|v| v.max(0) as u32)
                    .map_err(|e| CudaError::driver(format!("{what} of kernel {name}"), e))
            };
            let static_shared = attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                "static shared memory",
            )?;
            let dynamic_allowed = attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                "dynamic shared memory limit",
            )?;
            m.functions.insert(
                name,
                Function {
                    raw,
                    static_shared,
                    dynamic_allowed,
                },
            );
        }
        let Some(f) = m.functions.get_mut(name) else {
            return Err(CudaError::Shape(format!("kernel {name} vanished")));
        };
        let opt_in = check_shared_memory(
            name,
            f.static_shared,
            dynamic_shared,
            state.max_shared_optin,
        )?;
        if let Some(bytes) = opt_in.filter(|&b| b > f.dynamic_allowed) {
            // SAFETY: `f.raw` is a live function of this context.
            unsafe {
                result::function::set_function_attribute(
                    f.raw,
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .map_err(|e| {
                CudaError::driver(
                    format!("{name}: allowing {bytes} bytes of dynamic shared memory"),
                    e,
                )
            })?;
            f.dynamic_allowed = bytes;
        }
        Ok(f.raw)
    }

    /// Loads every embedded module now (otherwise the first launch does).
    pub fn load_all_modules(&self) -> Result<usize, CudaError> {
        let all = kernels::embedded_modules()?;
        for &(module, name, _) in super::abi::ALL_KERNELS {
            self.function(module, name, 0)?;
        }
        Ok(all.len())
    }

    /// Launches `kernel` on this handle's stream (asynchronous: its errors
    /// surface at the next synchronisation).
    ///
    /// # Safety
    /// Every pointer in `args` must be a device address valid for what the
    /// kernel reads and writes with this configuration, and stay valid until
    /// the kernel has run.
    pub unsafe fn launch<A: KernelArgs>(
        &self,
        kernel: Kernel<A>,
        cfg: &LaunchConfig,
        args: &A,
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_on(&self.stream, kernel, cfg, args) }
    }

    /// [`Gpu::launch`] on another stream of this device.
    ///
    /// # Safety
    /// As for [`Gpu::launch`].
    pub unsafe fn launch_on<A: KernelArgs>(
        &self,
        stream: &Stream,
        kernel: Kernel<A>,
        cfg: &LaunchConfig,
        args: &A,
    ) -> Result<(), CudaError> {
        self.check_stream(stream)?;
        // Also makes the context current on this thread.
        let f = self.function(kernel.module(), kernel.name(), cfg.shared_bytes)?;
        // The kernel's one parameter is the argument struct, by value: the
        // driver copies it from this address during the call.
        let mut params = [(args as *const A).cast_mut().cast::<c_void>()];
        let (g, b) = (cfg.grid, cfg.block);
        // SAFETY: `f` takes exactly one `A` (the generated ABI); the caller
        // vouches for the pointers inside it.
        unsafe {
            result::launch_kernel(
                f,
                (g.x, g.y, g.z),
                (b.x, b.y, b.z),
                cfg.shared_bytes,
                stream.0.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| CudaError::driver(format!("launching {kernel:?} with {cfg:?}"), e))
    }

    pub(crate) fn state(&self) -> &'static DeviceState {
        self.state
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Lets this handle's work finish before its stream goes; the modules
        // and the context stay for other handles. Errors have nowhere to go.
        let _ = self.stream.0.synchronize();
    }
}

/// Loads `target`'s image of the embedded module `module` into the current
/// context: a cubin as it is, PTX through the driver's JIT compiler.
fn load_module(module: &str, target: &'static Target) -> Result<CUmodule, CudaError> {
    let embedded = kernels::module(module)?;
    let image = embedded.image(target.name).ok_or_else(|| {
        CudaError::Shape(format!(
            "module {module} has no {} image (a build.rs bug: every module has every built target)",
            target.name
        ))
    })?;
    // cuModuleLoadData reads PTX as a C string: it must end in a NUL.
    if target.kind == ImageKind::Ptx && image.data.last() != Some(&0) {
        return Err(CudaError::Shape(format!(
            "module {module}: the embedded PTX is not NUL-terminated (a build.rs bug)"
        )));
    }
    // SAFETY: the image is a complete cubin (16-byte aligned ELF) or
    // NUL-terminated PTX embedded by build.rs, and lives for the whole program.
    unsafe { result::module::load_data(image.data.as_ptr().cast::<c_void>()) }.map_err(|e| {
        let hint = match target.kind {
            ImageKind::Ptx => {
                "; the driver JIT-compiles this PTX (ISA of the nvcc that built it), which needs \
                 a driver at least as new as that CUDA release"
            }
            ImageKind::Sass => "",
        };
        CudaError::driver(
            format!("loading module {module} ({}){hint}", target.describe()),
            e,
        )
    })
}

/// The device address of element `offset` of `buf`, after checking that
/// `offset..offset + len` lies inside it.
fn range_start<T: Elem>(
    what: &str,
    buf: &Buffer<T>,
    offset: usize,
    len: usize,
) -> Result<u64, CudaError> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| CudaError::Shape(format!("{what}: range overflows")))?;
    buf.check_len(what, end)?;
    Ok(buf.ptr() as usize as u64 + (offset * std::mem::size_of::<T>()) as u64)
}

#[cfg(test)]
mod driver_tests {
    use super::*;

    #[test]
    fn drivers_older_than_cuda_13_are_refused() {
        assert!(check_driver_version(13000).is_ok());
        assert!(check_driver_version(13010).is_ok());
        let e = check_driver_version(12080).unwrap_err().to_string();
        assert!(
            e.contains("CUDA 12.8") && e.contains("CUDA 13.0 or newer"),
            "{e}"
        );
    }
}
