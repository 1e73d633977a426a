//! The kernels embedded by build.rs: one cubin per `kernels/<name>.cu`
//! (sm_90a) and the ptxas report of their resources (`ptxas_report.tsv`).

use super::{ptxas, CudaError, KernelResources};

/// One compiled `kernels/<name>.cu`: its cubin, to be loaded as a module.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedModule {
    /// The file stem, e.g. `cast` for `kernels/cast.cu`.
    pub name: &'static str,
    /// The sm_90a cubin (an ELF image), 16-byte aligned.
    pub cubin: &'static [u8],
}

/// Keeps an embedded cubin 16-byte aligned for the driver's loader.
#[allow(dead_code)] // not constructed in a build without nvcc
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);

mod generated {
    #[allow(unused_imports)] // `Aligned` is unused in a build without nvcc
    use super::{Aligned, EmbeddedModule};
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The flags build.rs passed to nvcc (empty when kernels were not compiled).
pub const NVCC_FLAGS: &str = generated::NVCC_FLAGS;
/// `nvcc --version`'s release line (empty when kernels were not compiled).
pub const NVCC_VERSION: &str = generated::NVCC_VERSION;

/// True when this binary was built with nvcc and embeds the kernels.
pub fn kernels_compiled() -> bool {
    generated::KERNELS_COMPILED
}

/// Every compiled `kernels/*.cu`, sorted by name.
pub fn embedded_modules() -> Result<&'static [EmbeddedModule], CudaError> {
    if !generated::KERNELS_COMPILED {
        return Err(CudaError::KernelsMissing);
    }
    Ok(generated::MODULES)
}

/// The module compiled from `kernels/<name>.cu`; in test builds (feature
/// `emu`) also the emulator's self-tests, `kernels/emu/tests/<name>.cu`, so
/// a GPU runs the same self-test kernels as the emulator.
pub fn module(name: &str) -> Result<&'static EmbeddedModule, CudaError> {
    let modules = embedded_modules()?;
    let all = || modules.iter().chain(generated::TEST_MODULES);
    all()
        .find(|m| m.name == name)
        .ok_or_else(|| CudaError::UnknownModule {
            name: name.to_string(),
            available: all().map(|m| m.name).collect::<Vec<_>>().join(", "),
        })
}

/// Registers, spills, shared memory and stack frame of every kernel, as
/// ptxas reported them when the kernels were compiled.
pub fn ptxas_report() -> Result<Vec<KernelResources>, CudaError> {
    if !generated::KERNELS_COMPILED {
        return Err(CudaError::KernelsMissing);
    }
    ptxas::parse_tsv(generated::PTXAS_REPORT).map_err(CudaError::BadReport)
}
