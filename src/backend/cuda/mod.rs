//! CUDA backend. For now: the SM90 kernels build.rs compiled from `kernels/`
//! and embedded in the binary, their ptxas resource report, the kernel ABI
//! (argument structs and typed kernel handles generated from `kernels/abi.h`),
//! and, with the `emu` feature (tests), the CPU emulator that runs the same
//! kernel sources. The runtime (context, streams, launches) comes later and
//! loads modules from [`embedded_modules`].

pub mod abi;
#[cfg(test)]
mod abigen;
#[cfg(feature = "emu")]
pub mod emu;
pub mod kernels;
pub mod ptxas;

pub use kernels::{
    embedded_modules, kernels_compiled, module, ptxas_report, EmbeddedModule, NVCC_FLAGS,
    NVCC_VERSION,
};
pub use ptxas::KernelResources;

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
}
