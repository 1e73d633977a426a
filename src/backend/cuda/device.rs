//! A launch target: the GPU, or (feature `emu`) the CPU emulator of the same
//! kernels. Code written against [`Device`] (the kernel tests, the launchers
//! of [`super::ops`], the GEMMs of [`super::gemm`]) runs unchanged on both;
//! on the emulator, buffers are host memory and device addresses host
//! pointers, and every launch is synchronous.

use super::abi::{Kernel, KernelArgs, LaunchConfig};
use super::images::ImageRequest;
#[cfg(feature = "emu")]
use super::memory::Mem;
use super::memory::{Buffer, Elem, OnDevice, Owner};
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

    /// [`Device::gpu`] loading the kernel image `request` picks (see
    /// [`Gpu::with_image`]).
    pub fn gpu_with_image(ordinal: usize, request: ImageRequest) -> Result<Device, CudaError> {
        Gpu::with_image(ordinal, request).map(Device::Gpu)
    }

    /// For messages: `emulator` or `GPU 0 (NVIDIA L4, sm_89 SASS)`, with the
    /// kernel image its launches load.
    pub fn name(&self) -> String {
        match self {
            Device::Gpu(g) => {
                let image = g
                    .kernel_image()
                    .map_or_else(|_| "no kernel image".to_string(), |t| t.describe());
                format!("GPU {} ({}, {image})", g.info().ordinal, g.info().name)
            }
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

    /// The owner tag of this device's buffers.
    pub fn owner(&self) -> Owner {
        match self {
            Device::Gpu(g) => g.owner(),
            #[cfg(feature = "emu")]
            Device::Emu => Owner::Emu,
        }
    }

    /// Refuses any of `bufs` that belongs to another device (another GPU
    /// handle, or GPU memory on the emulator and the reverse), before its
    /// address reaches a kernel; `what` names the operation.
    pub fn check_buffers(&self, what: &str, bufs: &[&dyn OnDevice]) -> Result<(), CudaError> {
        let own = self.owner();
        for b in bufs {
            if let Some(o) = b.owner() {
                if o != own {
                    return Err(CudaError::WrongDevice(format!(
                        "{what}: {} used with {own}; a buffer may only be used \
                         with the device handle that made it",
                        b.describe()
                    )));
                }
            }
        }
        Ok(())
    }

    /// [`Device::check_buffers`] for one buffer, then [`Buffer::check_len`].
    pub fn check<T: Elem>(
        &self,
        buf: &Buffer<T>,
        what: &str,
        need: usize,
    ) -> Result<(), CudaError> {
        self.check_buffers(what, &[buf])?;
        buf.check_len(what, need)
    }

    // The cell of an emulator buffer hands out the host memory kernels write.
    #[cfg(feature = "emu")]
    #[allow(clippy::mut_from_ref)]
    fn host_of<'b, T: Elem>(&self, buf: &'b Buffer<T>) -> Result<&'b mut Vec<T>, CudaError> {
        self.check_buffers("emulator copy", &[buf])?;
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
                owner: Owner::Emu,
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
                owner: Owner::Emu,
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
                self.host_of(buf)?[..src.len()].copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// The buffer's contents, once the work before it is done.
    pub fn download<T: Elem>(&self, buf: &Buffer<T>) -> Result<Vec<T>, CudaError> {
        match self {
            Device::Gpu(g) => g.download(buf),
            #[cfg(feature = "emu")]
            Device::Emu => Ok(self.host_of(buf)?.clone()),
        }
    }

    /// Copies `src` into `buf` from element `offset` on.
    pub fn write_at<T: Elem>(
        &self,
        buf: &Buffer<T>,
        offset: usize,
        src: &[T],
    ) -> Result<(), CudaError> {
        match self {
            Device::Gpu(g) => g.write_at(buf, offset, src),
            #[cfg(feature = "emu")]
            Device::Emu => {
                let r = host_range("write_at", buf, offset, src.len())?;
                self.host_of(buf)?[r].copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Elements `offset..offset + len` of `buf`, once the work before is done.
    pub fn download_range<T: Elem>(
        &self,
        buf: &Buffer<T>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<T>, CudaError> {
        match self {
            Device::Gpu(g) => g.download_range(buf, offset, len),
            #[cfg(feature = "emu")]
            Device::Emu => {
                let r = host_range("download_range", buf, offset, len)?;
                Ok(self.host_of(buf)?[r].to_vec())
            }
        }
    }

    /// Copies `len` elements of `src` from `src_offset` into `dst` at
    /// `dst_offset` (in launch order; the ranges must not overlap).
    pub fn copy<T: Elem>(
        &self,
        dst: (&Buffer<T>, usize),
        src: (&Buffer<T>, usize),
        len: usize,
    ) -> Result<(), CudaError> {
        match self {
            Device::Gpu(g) => g.copy(dst, src, len),
            #[cfg(feature = "emu")]
            Device::Emu => {
                let rs = host_range("copy: source", src.0, src.1, len)?;
                let rd = host_range("copy: destination", dst.0, dst.1, len)?;
                let part = self.host_of(src.0)?[rs].to_vec();
                self.host_of(dst.0)?[rd].copy_from_slice(&part);
                Ok(())
            }
        }
    }

    /// Free and total bytes of device memory (the host's view of the
    /// emulator: no limit is known, so both are `usize::MAX`).
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        match self {
            Device::Gpu(g) => g.memory_info(),
            #[cfg(feature = "emu")]
            Device::Emu => Ok((usize::MAX, usize::MAX)),
        }
    }

    /// Sets every element of `buf` to zero.
    pub fn zero<T: Elem>(&self, buf: &Buffer<T>) -> Result<(), CudaError> {
        match self {
            Device::Gpu(g) => g.zero(buf),
            #[cfg(feature = "emu")]
            Device::Emu => {
                self.host_of(buf)?.fill(T::default());
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
    /// Static plus dynamic shared memory over the device's per-block maximum
    /// is a [`CudaError::SharedMemory`] on both targets.
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
            Device::Emu => {
                // The GPU's rule, with the static size ptxas reported.
                super::runtime::check_shared_memory(
                    kernel.name(),
                    super::emu::static_shared_bytes(kernel.name()),
                    cfg.shared_bytes,
                    super::emu::max_shared_per_block(),
                )?;
                // SAFETY: forwarded from the caller (host pointers on the emulator).
                unsafe { super::emu::launch(kernel, cfg, args) }.map_err(Into::into)
            }
        }
    }

    /// Shared memory (static plus dynamic) one block may use, with the
    /// opt-in that [`Device::launch`] makes when a launch needs it.
    pub fn max_shared_per_block(&self) -> u32 {
        match self {
            Device::Gpu(g) => g.max_shared_per_block(),
            #[cfg(feature = "emu")]
            Device::Emu => super::emu::max_shared_per_block(),
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

/// `offset..offset + len`, checked against the buffer's length.
#[cfg(feature = "emu")]
fn host_range<T: Elem>(
    what: &str,
    buf: &Buffer<T>,
    offset: usize,
    len: usize,
) -> Result<std::ops::Range<usize>, CudaError> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| CudaError::Shape(format!("{what}: range overflows")))?;
    buf.check_len(what, end)?;
    Ok(offset..end)
}

#[cfg(all(test, feature = "emu"))]
mod tests {
    use half::bf16;

    use super::*;
    use crate::backend::cuda::runtime::check_shared_memory;
    use crate::backend::cuda::{gemm, ops, GemmOut, MatRef};

    /// An emulator buffer that claims to belong to a GPU handle: what a GPU
    /// buffer looks like to the emulator, without a GPU.
    fn foreign<T: Elem>(dev: &Device, len: usize) -> Buffer<T> {
        let mut b = dev.zeros::<T>(len).unwrap();
        b.owner = Owner::Gpu {
            ordinal: 0,
            handle: u64::MAX,
        };
        b
    }

    fn assert_wrong<T: std::fmt::Debug>(r: Result<T, CudaError>) {
        match r {
            Err(CudaError::WrongDevice(m)) => {
                assert!(m.contains("GPU 0 (handle"), "{m}");
                assert!(m.contains("the emulator"), "{m}");
            }
            other => panic!("expected WrongDevice, got {other:?}"),
        }
    }

    #[test]
    fn emulator_refuses_buffers_of_other_devices() {
        let dev = Device::Emu;
        let x = dev.upload(&[bf16::ONE; 16]).unwrap();
        let y = dev.zeros::<f32>(16).unwrap();
        let fx = foreign::<bf16>(&dev, 16);
        let fy = foreign::<f32>(&dev, 16);
        // Launchers, in every position (output, input, optional input).
        assert_wrong(ops::cast_bf16_to_f32(&dev, &fy, &x));
        assert_wrong(ops::cast_bf16_to_f32(&dev, &y, &fx));
        assert_wrong(ops::fill_f32(&dev, &fy, 1.0));
        let rstd = dev.zeros::<f32>(1).unwrap();
        assert_wrong(ops::rmsnorm_forward(
            &dev,
            &x,
            &rstd,
            &x,
            Some(&fx),
            1,
            16,
            1e-5,
        ));
        // GEMMs: output and both operands, including the empty-sum path.
        let v = |b| MatRef::new(b, 4, 4);
        assert_wrong(gemm::linear_forward(
            &dev,
            GemmOut::F32(MatRef::new(&fy, 4, 4)),
            v(&x),
            v(&x),
            false,
        ));
        assert_wrong(gemm::linear_forward(
            &dev,
            GemmOut::F32(MatRef::new(&y, 4, 4)),
            v(&fx),
            v(&x),
            false,
        ));
        assert_wrong(gemm::linear_backward_weight(
            &dev,
            GemmOut::Bf16(v(&x)),
            v(&x),
            v(&fx),
            false,
        ));
        assert_wrong(gemm::matmul(
            &dev,
            GemmOut::F32(MatRef::new(&fy, 4, 4)),
            MatRef::new(&x, 4, 0),
            false,
            MatRef::new(&x, 0, 4),
            false,
            false,
        ));
        // Copies.
        assert_wrong(dev.download(&fy));
        assert_wrong(dev.write(&fy, &[1.0]));
        assert_wrong(dev.zero(&fy));
        // The device's own buffers still work.
        ops::cast_bf16_to_f32(&dev, &y, &x).unwrap();
        assert!(dev.download(&y).unwrap().iter().all(|&v| v == 1.0));
    }

    #[test]
    fn shared_memory_rule() {
        let max = 227 * 1024;
        // Up to 48 KiB in all: no opt-in.
        assert_eq!(check_shared_memory("k", 0, 48 * 1024, max).unwrap(), None);
        assert_eq!(
            check_shared_memory("k", 1024, 47 * 1024, max).unwrap(),
            None
        );
        // Static plus dynamic over 48 KiB: opt in to the dynamic bytes,
        // even when the dynamic part alone is under 48 KiB.
        assert_eq!(
            check_shared_memory("k", 4096, 46 * 1024, max).unwrap(),
            Some(46 * 1024)
        );
        assert_eq!(
            check_shared_memory("k", 0, 100 * 1024, max).unwrap(),
            Some(100 * 1024)
        );
        assert_eq!(check_shared_memory("k", 0, max, max).unwrap(), Some(max));
        // Over the maximum, counting static memory: a typed error.
        for (stat, dynamic) in [(0, max + 1), (16, max), (u32::MAX, u32::MAX)] {
            match check_shared_memory("k", stat, dynamic, max) {
                Err(CudaError::SharedMemory {
                    static_bytes,
                    dynamic_bytes,
                    ..
                }) => assert_eq!((static_bytes, dynamic_bytes), (stat, dynamic)),
                other => panic!("{stat} + {dynamic}: {other:?}"),
            }
        }
    }

    #[test]
    fn gemm_alignment_classes() {
        assert_eq!(gemm::alignment(0), 256);
        assert_eq!(gemm::alignment(0x7f00_0000_0000), 256);
        assert_eq!(gemm::alignment(0x7f00_0000_0080), 128);
        assert_eq!(gemm::alignment(0x7f00_0000_0010), 16);
        assert_eq!(gemm::alignment(0x7f00_0000_0002), 2);
    }
}
