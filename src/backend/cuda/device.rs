//! A launch target: the GPU, or (feature `emu`) the CPU emulator of the same
//! kernels. Code written against [`Device`] (the kernel tests, the launchers
//! of [`super::ops`], the GEMMs of [`super::gemm`]) runs unchanged on both;
//! on the emulator, buffers are host memory and device addresses host
//! pointers, and every launch is synchronous.

use super::abi::{Kernel, KernelArgs, LaunchConfig};
#[cfg(feature = "emu")]
use super::memory::Mem;
use super::memory::{Buffer, Elem};
use super::runtime::Gpu;
use super::CudaError;

/// Where kernels run.
// A Device lives for a whole run (one per process or test), so the size of
// the Gpu variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Device {
    /// A CUDA device.
    Gpu(Gpu),
    /// The CPU emulator of the kernels (`kernels/emu/`).
    #[cfg(feature = "emu")]
    Emu,
}

impl Device {
    /// GPU `ordinal`, or [`CudaError::NoDevice`] (never a panic) when CUDA
    /// or the device is missing.
    pub fn gpu(ordinal: usize) -> Result<Device, CudaError> {
        Gpu::new(ordinal).map(Device::Gpu)
    }

    /// For messages: `emulator` or `GPU 0 (NVIDIA H200)`.
    pub fn name(&self) -> String {
        match self {
            Device::Gpu(g) => format!("GPU {} ({})", g.info().ordinal, g.info().name),
            #[cfg(feature = "emu")]
            Device::Emu => "emulator".to_string(),
        }
    }

    /// The GPU handle, when this is one.
    pub fn as_gpu(&self) -> Option<&Gpu> {
        match self {
            Device::Gpu(g) => Some(g),
            #[cfg(feature = "emu")]
            Device::Emu => None,
        }
    }

    // The cell of an emulator buffer hands out the host memory kernels write.
    #[cfg(feature = "emu")]
    #[allow(clippy::mut_from_ref)]
    fn host_of<T: Elem>(buf: &Buffer<T>) -> Result<&mut Vec<T>, CudaError> {
        // SAFETY: emulated launches are synchronous, so no kernel runs while
        // the caller holds this view; the view ends with the calling method.
        unsafe { buf.host() }
            .ok_or_else(|| CudaError::WrongDevice(format!("{buf:?} used with the emulator")))
    }

    /// A zeroed buffer of `len` elements.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buffer<T>, CudaError> {
        match self {
            Device::Gpu(g) => g.zeros(len),
            #[cfg(feature = "emu")]
            Device::Emu => Ok(Buffer {
                len,
                mem: Mem::Host(std::cell::UnsafeCell::new(vec![T::default(); len])),
            }),
        }
    }

    /// A buffer holding a copy of `host`.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<Buffer<T>, CudaError> {
        match self {
            Device::Gpu(g) => g.upload(host),
            #[cfg(feature = "emu")]
            Device::Emu => Ok(Buffer {
                len: host.len(),
                mem: Mem::Host(std::cell::UnsafeCell::new(host.to_vec())),
            }),
        }
    }

    /// Copies `src` into the start of `buf`.
    pub fn write<T: Elem>(&self, buf: &Buffer<T>, src: &[T]) -> Result<(), CudaError> {
        match self {
            Device::Gpu(g) => g.write(buf, src),
            #[cfg(feature = "emu")]
            Device::Emu => {
                buf.check_len("write", src.len())?;
                Self::host_of(buf)?[..src.len()].copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// The buffer's contents, once the work before it is done.
    pub fn download<T: Elem>(&self, buf: &Buffer<T>) -> Result<Vec<T>, CudaError> {
        match self {
            Device::Gpu(g) => g.download(buf),
            #[cfg(feature = "emu")]
            Device::Emu => Ok(Self::host_of(buf)?.clone()),
        }
    }

    /// Sets every element of `buf` to zero.
    pub fn zero<T: Elem>(&self, buf: &Buffer<T>) -> Result<(), CudaError> {
        match self {
            Device::Gpu(g) => g.zero(buf),
            #[cfg(feature = "emu")]
            Device::Emu => {
                Self::host_of(buf)?.fill(T::default());
                Ok(())
            }
        }
    }

    /// Waits for every launch so far; on a GPU this is where asynchronous
    /// kernel errors surface.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        match self {
            Device::Gpu(g) => g.synchronize(),
            #[cfg(feature = "emu")]
            Device::Emu => Ok(()),
        }
    }

    /// Launches `kernel`: on the GPU's stream, or synchronously on the emulator.
    ///
    /// # Safety
    /// Every pointer in `args` must come from a live buffer of this device
    /// (or be null where the kernel allows it), sized for what the kernel
    /// touches with this configuration, and stay alive until the kernel has
    /// run (until the next [`Device::synchronize`] or download on a GPU).
    pub unsafe fn launch<A: KernelArgs>(
        &self,
        kernel: Kernel<A>,
        cfg: &LaunchConfig,
        args: &A,
    ) -> Result<(), CudaError> {
        match self {
            // SAFETY: forwarded from the caller.
            Device::Gpu(g) => unsafe { g.launch(kernel, cfg, args) },
            #[cfg(feature = "emu")]
            // SAFETY: forwarded from the caller (host pointers on the emulator).
            Device::Emu => unsafe { super::emu::launch(kernel, cfg, args) }.map_err(Into::into),
        }
    }

    /// Streaming multiprocessors to size grid-stride launches by (a fixed
    /// H200-like count on the emulator, so both targets get the same grids).
    pub fn multiprocessors(&self) -> u32 {
        match self {
            Device::Gpu(g) => g.info().multiprocessors.max(1) as u32,
            #[cfg(feature = "emu")]
            Device::Emu => 132,
        }
    }
}
