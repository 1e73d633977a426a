//! Typed buffers of a [`Device`](super::Device): device memory on a GPU, host
//! memory on the emulator target. Kernel argument structs take raw addresses
//! ([`Buffer::ptr`]); the buffer must outlive every launch that uses them,
//! which the launch's `unsafe` contract states.

use std::fmt;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use super::CudaError;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i32 {}
    impl Sealed for u8 {}
    impl Sealed for half::bf16 {}
}

/// Element types of buffers: the scalar types of the kernel ABI.
pub trait Elem:
    sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
    /// For messages, e.g. `bf16`.
    const NAME: &'static str;
}
impl Elem for f32 {
    const NAME: &'static str = "f32";
}
impl Elem for i32 {
    const NAME: &'static str = "i32";
}
impl Elem for u8 {
    const NAME: &'static str = "u8";
}
impl Elem for half::bf16 {
    const NAME: &'static str = "bf16";
}

/// `len` elements of `T` on one device.
pub struct Buffer<T: Elem> {
    pub(crate) len: usize,
    pub(crate) mem: Mem<T>,
    /// The device handle that made it: launches, copies and GEMMs refuse a
    /// buffer of another one (its address means nothing there).
    pub(crate) owner: Owner,
}

/// Which device handle a buffer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A [`Gpu`](super::Gpu) handle: GPU `ordinal`, and the handle's id
    /// (unique in the process), because a buffer is freed on its handle's
    /// stream and so may only be used in that stream's order.
    Gpu { ordinal: usize, handle: u64 },
    /// The CPU emulator (host memory).
    #[cfg(feature = "emu")]
    Emu,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Gpu { ordinal, handle } => write!(f, "GPU {ordinal} (handle {handle})"),
            #[cfg(feature = "emu")]
            Owner::Emu => write!(f, "the emulator"),
        }
    }
}

/// Anything a launcher hands to a kernel as an address: a buffer, or an
/// optional one (`None` passes null and belongs to every device).
pub trait OnDevice {
    /// The owner, `None` for an absent optional buffer.
    fn owner(&self) -> Option<Owner>;
    /// For messages.
    fn describe(&self) -> String;
}

impl<T: Elem> OnDevice for Buffer<T> {
    fn owner(&self) -> Option<Owner> {
        Some(self.owner)
    }
    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

impl<T: Elem> OnDevice for Option<&Buffer<T>> {
    fn owner(&self) -> Option<Owner> {
        self.map(|b| b.owner)
    }
    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

pub(crate) enum Mem<T: Elem> {
    /// Device memory of one [`Gpu`](super::Gpu); `ptr` is its address,
    /// cached because launches only need the number. Holds at least one
    /// element so that an empty buffer still has a valid address.
    Gpu {
        // Freed (stream-ordered) on drop.
        slice: CudaSlice<T>,
        ptr: u64,
    },
    /// Host memory standing for device memory on the emulator target. The
    /// cell lets kernels write through `&Buffer`, as on a GPU; the vector is
    /// never resized, so its address is stable.
    #[cfg(feature = "emu")]
    Host(std::cell::UnsafeCell<Vec<T>>),
}

impl<T: Elem> fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buffer<{}>[{}] of {}", T::NAME, self.len, self.owner)
    }
}

impl<T: Elem> Drop for Buffer<T> {
    // Without the emulator, every buffer is device memory.
    #[allow(irrefutable_let_patterns)]
    fn drop(&mut self) {
        // cudarc frees device memory (cuMemFreeAsync on the allocating
        // stream) without making its context current; a buffer dropped on a
        // thread that never used this device would fail that call.
        if let Mem::Gpu { slice, .. } = &self.mem {
            // Directly: cudarc's bind would first hand back (and so skip
            // binding on) an error recorded by an earlier drop.
            // SAFETY: the context outlives its buffers (it is never released).
            let _ = unsafe { cudarc::driver::result::ctx::set_current(slice.context().cu_ctx()) };
        }
    }
}

impl<T: Elem> Buffer<T> {
    /// The device handle it belongs to.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The device address of element 0, for a kernel argument struct.
    pub fn ptr(&self) -> *mut T {
        match &self.mem {
            Mem::Gpu { ptr, .. } => *ptr as usize as *mut T,
            #[cfg(feature = "emu")]
            // SAFETY: only the address is taken; the vector is never resized.
            Mem::Host(cell) => unsafe { (*cell.get()).as_mut_ptr() },
        }
    }
    /// [`Buffer::ptr`] for a read-only argument.
    pub fn cptr(&self) -> *const T {
        self.ptr().cast_const()
    }
    /// The device address of element `offset` (`offset == len` is the end).
    pub fn ptr_at(&self, offset: usize) -> Result<*mut T, CudaError> {
        if offset > self.len {
            return Err(CudaError::Shape(format!(
                "offset {offset} is past the end of a {}-element {} buffer",
                self.len,
                T::NAME
            )));
        }
        Ok(self.ptr().wrapping_add(offset))
    }
    /// [`Buffer::ptr_at`] for a read-only argument.
    pub fn cptr_at(&self, offset: usize) -> Result<*const T, CudaError> {
        self.ptr_at(offset).map(<*mut T>::cast_const)
    }

    /// Checks the buffer holds at least `need` elements (`what` names it in the error).
    pub fn check_len(&self, what: &str, need: usize) -> Result<(), CudaError> {
        if self.len < need {
            return Err(CudaError::Shape(format!(
                "{what}: needs {need} {} elements, the buffer has {}",
                T::NAME,
                self.len
            )));
        }
        Ok(())
    }

    /// Host view of an emulator buffer (`None` for device memory).
    ///
    /// # Safety
    /// No launch may be writing the buffer (emulated launches are synchronous,
    /// so outside a launch this holds).
    #[cfg(feature = "emu")]
    #[allow(clippy::mut_from_ref)] // the UnsafeCell's job; the contract is the caller's
    pub(crate) unsafe fn host(&self) -> Option<&mut Vec<T>> {
        match &self.mem {
            // SAFETY: forwarded from the caller.
            Mem::Host(cell) => Some(unsafe { &mut *cell.get() }),
            Mem::Gpu { .. } => None,
        }
    }
}
