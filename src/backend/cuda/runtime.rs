//! The GPU runtime: probe, context, stream, modules, memory, events, launches.
//!
//! Design rules:
//! - Nothing here panics for a missing library or device: [`probe`] checks
//!   that libcuda loads before any other driver call (cudarc panics at the
//!   first call into a library it cannot load), and every failure is a
//!   [`CudaError`].
//! - A [`Gpu`] is one device's primary context and ONE stream; its buffers,
//!   launches, copies and GEMMs are ordered by that stream, so cudarc's
//!   per-buffer event tracking is switched off. Work on another [`Stream`]
//!   is ordered against it with [`Event`]s by the caller.
//! - Modules are loaded from the cubins embedded at build time, lazily, once
//!   per module; functions are looked up once and cached.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUevent_flags, CUfunction, CUfunction_attribute, CUmodule};
use cudarc::driver::{result, CudaContext, CudaEvent, CudaStream};

use super::abi::{Kernel, KernelArgs, LaunchConfig};
use super::memory::{Buffer, Elem, Mem};
use super::{kernels, CudaError};

/// Default dynamic shared memory a kernel may use without opting in.
const DEFAULT_MAX_DYNAMIC_SHARED: u32 = 48 * 1024;

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

/// The number of CUDA devices, or [`CudaError::NoDevice`] when the driver
/// library is missing, does not initialise, or sees none.
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_library_present() {
        return Err(CudaError::NoDevice(
            "the CUDA driver library (libcuda.so) is not installed or not on the loader path"
                .into(),
        ));
    }
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
    (0..count)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| CudaError::driver(format!("opening device {ordinal}"), e))?;
            info(&ctx)
        })
        .collect()
}

fn info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, CudaError> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    let ordinal = ctx.ordinal();
    let op = |what: &str| format!("{what} of device {ordinal}");
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(|e| CudaError::driver(op("name"), e))?,
        capability: ctx
            .compute_capability()
            .map_err(|e| CudaError::driver(op("compute capability"), e))?,
        total_memory: ctx
            .total_mem()
            .map_err(|e| CudaError::driver(op("memory size"), e))?,
        multiprocessors: ctx
            .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| CudaError::driver(op("multiprocessor count"), e))?,
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
}

/// A loaded module and the functions looked up in it.
struct Module {
    raw: CUmodule,
    functions: HashMap<&'static str, CUfunction>,
}

/// One CUDA device: its primary context, a stream, and the loaded modules.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Stream,
    info: DeviceInfo,
    modules: Mutex<HashMap<&'static str, Module>>,
    /// The cuBLASLt handle, created at the first GEMM.
    pub(crate) blas: Mutex<Option<super::gemm::Blas>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`, or [`CudaError::NoDevice`] when there is none.
    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, the driver sees {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::driver(format!("opening device {ordinal}"), e))?;
        // SAFETY: no buffer or stream of this handle exists yet; every buffer
        // of a Gpu is used on its one stream (module docs), so the per-buffer
        // events cudarc would record are not needed. The primary context is
        // shared by every Gpu of this ordinal, and all of them switch it off.
        unsafe { ctx.disable_event_tracking() };
        let info = info(&ctx)?;
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::driver("creating a stream", e))?;
        Ok(Gpu {
            ctx,
            stream: Stream(stream),
            info,
            modules: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    /// The stream every operation of this handle runs on.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }
    /// A further stream of the same context (ordered with [`Event`]s).
    pub fn new_stream(&self) -> Result<Stream, CudaError> {
        self.ctx
            .new_stream()
            .map(Stream)
            .map_err(|e| CudaError::driver("creating a stream", e))
    }
    /// Waits for this handle's stream and reports asynchronous errors.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()
    }

    /// A timing event recorded now on `stream` (this handle's when `None`).
    pub fn record_event(&self, stream: Option<&Stream>) -> Result<Event, CudaError> {
        let stream = stream.unwrap_or(&self.stream);
        let event = self
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
            mem: Mem::Gpu {
                slice,
                ptr,
                ordinal: self.info.ordinal,
            },
        }
    }

    /// A zeroed buffer of `len` elements.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buffer<T>, CudaError> {
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
        match &buf.mem {
            Mem::Gpu { slice, ordinal, .. } if *ordinal == self.info.ordinal => Ok(slice),
            _ => Err(CudaError::WrongDevice(format!(
                "{buf:?} used with GPU {}",
                self.info.ordinal
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
            let (ptr, _sync) = slice.device_ptr(&self.stream.0);
            // SAFETY: `host` and the allocation both hold buf.len elements.
            unsafe { result::memcpy_dtoh_async(&mut host[..], ptr, self.stream.0.cu_stream()) }
                .map_err(|e| CudaError::driver("device to host copy", e))?;
            self.synchronize()?;
        }
        Ok(host)
    }

    /// Sets every byte of `buf` to zero (stream-ordered).
    pub fn zero<T: Elem>(&self, buf: &Buffer<T>) -> Result<(), CudaError> {
        self.slice_of(buf)?;
        // SAFETY: the allocation holds at least buf.bytes() bytes.
        unsafe {
            result::memset_d8_async(
                buf.ptr() as usize as u64,
                0,
                buf.bytes(),
                self.stream.0.cu_stream(),
            )
        }
        .map_err(|e| CudaError::driver("memset", e))
    }

    // --- launches -------------------------------------------------------------

    fn function(&self, module: &'static str, name: &'static str) -> Result<CUfunction, CudaError> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| CudaError::Shape("module cache poisoned by an earlier panic".into()))?;
        if !modules.contains_key(module) {
            let embedded = kernels::module(module)?;
            let (major, minor) = self.info.capability;
            if (major, minor) != (9, 0) {
                return Err(CudaError::UnsupportedDevice {
                    ordinal: self.info.ordinal,
                    name: self.info.name.clone(),
                    major,
                    minor,
                });
            }
            self.ctx
                .bind_to_thread()
                .map_err(|e| CudaError::driver("binding the context", e))?;
            // SAFETY: the cubin is a complete ELF image embedded by build.rs,
            // 16-byte aligned, and lives for the whole program.
            let raw =
                unsafe { result::module::load_data(embedded.cubin.as_ptr().cast::<c_void>()) }
                    .map_err(|e| CudaError::driver(format!("loading module {module}.cubin"), e))?;
            modules.insert(
                module,
                Module {
                    raw,
                    functions: HashMap::new(),
                },
            );
        }
        let Some(m) = modules.get_mut(module) else {
            return Err(CudaError::Shape(format!("module {module} vanished")));
        };
        if let Some(&f) = m.functions.get(name) {
            return Ok(f);
        }
        let cname = CString::new(name)
            .map_err(|_| CudaError::Shape(format!("kernel name {name:?} has a NUL byte")))?;
        // SAFETY: `m.raw` is a live module of this context.
        let f = unsafe { result::module::get_function(m.raw, cname) }.map_err(|e| {
            CudaError::driver(format!("finding kernel {name} in {module}.cubin"), e)
        })?;
        m.functions.insert(name, f);
        Ok(f)
    }

    /// Loads every embedded module now (otherwise the first launch does).
    pub fn load_all_modules(&self) -> Result<usize, CudaError> {
        let all = kernels::embedded_modules()?;
        for &(module, name, _) in super::abi::ALL_KERNELS {
            self.function(module, name)?;
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
        let f = self.function(kernel.module(), kernel.name())?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("binding the context", e))?;
        if cfg.shared_bytes > DEFAULT_MAX_DYNAMIC_SHARED {
            // SAFETY: `f` is a live function of this context.
            unsafe {
                result::function::set_function_attribute(
                    f,
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_bytes as i32,
                )
            }
            .map_err(|e| {
                CudaError::driver(
                    format!(
                        "{kernel:?}: allowing {} bytes of shared memory",
                        cfg.shared_bytes
                    ),
                    e,
                )
            })?;
        }
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

    pub(crate) fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Pending work may still use the modules; errors here have nowhere to go.
        let _ = self.stream.0.synchronize();
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        if let Ok(modules) = self.modules.get_mut() {
            for (_, m) in modules.drain() {
                // SAFETY: no work of this handle is pending (synchronised
                // above) and the functions die with the map.
                let _ = unsafe { result::module::unload(m.raw) };
            }
        }
    }
}
