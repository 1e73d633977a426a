//! CUDA backend: the kernels build.rs compiled from `kernels/` and embedded
//! in the binary (SASS for sm_80, sm_86, sm_89 and sm_90a, compute_80 PTX for
//! newer GPUs: [`images`]), their ptxas resource report, the kernel ABI
//! (argument structs and typed kernel handles generated from `kernels/abi.h`),
//! and the runtime that runs them:
//!
//! - [`runtime`]: the probe ([`probe`]), a GPU context with its stream, module
//!   loading from the image that suits the device, events and typed launches
//!   ([`Gpu`]);
//! - [`memory`]: typed buffers ([`Buffer`] of f32, bf16, i32, u8);
//! - [`device`]: a launch target, [`Device::Gpu`] or (feature `emu`)
//!   [`Device::Emu`], the CPU emulator, so one test or caller body runs on both;
//! - [`gemm`]: GEMMs on strided matrix views ([`MatRef`]): [`matmul`] and the
//!   three linear-layer products (cuBLASLt on the GPU, the CPU GEMM on the
//!   emulator target);
//! - [`ops`]: one typed launcher per kernel, grid and block from the shapes.
//!
//! The CUDA libraries (driver, cuBLASLt, NCCL) are loaded at run time, so
//! this compiles and runs without CUDA; [`probe`] reports a missing library or
//! device as [`CudaError::NoDevice`], and the caller can fall back to the CPU.

pub mod abi;
#[cfg(test)]
mod abigen;
pub mod device;
#[cfg(feature = "emu")]
pub mod emu;
pub mod gemm;
pub mod images;
pub mod kernels;
pub mod memory;
pub mod ops;
pub mod ptxas;
pub mod runtime;

pub use device::Device;
pub use gemm::{matmul, GemmOut, MatRef};
pub use images::ImageRequest;
pub use kernels::{
    embedded_modules, kernels_compiled, module, ptxas_report, targets_built, EmbeddedImage,
    EmbeddedModule, NVCC_FLAGS, NVCC_VERSION,
};
pub use memory::{Buffer, Elem, OnDevice, Owner};
pub use ptxas::KernelResources;
pub use runtime::{probe, DeviceInfo, Event, Gpu, Graph, Stream};

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// build.rs found no nvcc, so no kernel was compiled into this binary.
    #[error(
        "this trm binary was built without nvcc, so it has no CUDA kernels; \
         install the pinned nvcc with `tools/install-nvcc.sh` (it prints its bin folder) \
         and rebuild with NVCC=<that folder>/nvcc, e.g. \
         `NVCC=\"$(tools/install-nvcc.sh)/nvcc\" cargo build --release`"
    )]
    KernelsMissing,
    /// No `kernels/<name>.cu` was compiled into this binary.
    #[error("no CUDA kernel module named {name:?} in this binary (modules: {available})")]
    UnknownModule { name: String, available: String },
    /// The embedded ptxas report does not parse (a build.rs bug).
    #[error("embedded ptxas report is malformed: {0}")]
    BadReport(String),
    /// CUDA was asked for but cannot be used here: no driver library, the
    /// driver does not start, or it sees no device (or not this ordinal).
    #[error("no CUDA device: {0}; use the CPU backend instead")]
    NoDevice(String),
    /// No embedded kernel image runs on the device (below sm_80, or an
    /// architecture this build left out).
    #[error(
        "CUDA device {ordinal} ({name}), compute capability {major}.{minor}: {reason}; \
         run on the CPU with --device cpu"
    )]
    UnsupportedDevice {
        ordinal: usize,
        name: String,
        major: i32,
        minor: i32,
        reason: String,
    },
    /// `TRM_KERNEL_IMAGE` has a value the runtime does not know.
    #[error("{0}")]
    BadImageRequest(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {op}: {source}")]
    Driver {
        op: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLASLt call failed, or the library is missing.
    #[error("cuBLASLt: {0}")]
    Blas(String),
    /// The emulator rejected or failed a launch.
    #[cfg(feature = "emu")]
    #[error(transparent)]
    Emu(#[from] emu::EmuError),
    /// Buffer sizes, offsets or shapes that do not fit the operation.
    #[error("{0}")]
    Shape(String),
    /// A buffer (or stream) used with a device it does not belong to.
    #[error("{0}")]
    WrongDevice(String),
    /// A launch asking for more shared memory per block than the device has.
    #[error(
        "{kernel}: {static_bytes} bytes of static plus {dynamic_bytes} of dynamic shared memory \
         per block exceed the device's maximum of {max} (sm_86 and sm_89 GPUs allow 99 KiB, \
         sm_80 163 KiB, sm_90 227 KiB)"
    )]
    SharedMemory {
        kernel: String,
        static_bytes: u32,
        dynamic_bytes: u32,
        max: u32,
    },
}

impl CudaError {
    /// A driver error with the call that failed.
    pub(crate) fn driver(op: impl Into<String>, source: cudarc::driver::DriverError) -> Self {
        CudaError::Driver {
            op: op.into(),
            source,
        }
    }
}
