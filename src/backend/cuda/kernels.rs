//! The kernels embedded by build.rs: for every `kernels/<name>.cu` one image
//! per target of [`super::images`] (SASS cubins and the compute_80 PTX), the
//! ptxas report of their resources (`ptxas_report.tsv`), and the image a
//! device of a given compute capability loads.

use super::images::{self, ImageRequest, Target};
use super::{ptxas, CudaError, KernelResources};

/// One compiled `kernels/<name>.cu`: its images, one per built target.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedModule {
    /// The file stem, e.g. `cast` for `kernels/cast.cu`.
    pub name: &'static str,
    /// In target order (`images::TARGETS`).
    pub images: &'static [EmbeddedImage],
}

/// One image of a module, ready for `cuModuleLoadData`.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedImage {
    /// The target's name, e.g. `sm_89` or `compute_80`.
    pub target: &'static str,
    /// A cubin (an ELF image, 16-byte aligned) or PTX text ending in one NUL.
    pub data: &'static [u8],
}

impl EmbeddedModule {
    /// The image built for `target`, e.g. `sm_90a`.
    pub fn image(&self, target: &str) -> Option<&'static EmbeddedImage> {
        self.images.iter().find(|i| i.target == target)
    }
}

/// Keeps an embedded cubin 16-byte aligned for the driver's loader.
#[allow(dead_code)] // not constructed in a build without nvcc
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);

mod generated {
    #[allow(unused_imports)] // unused in a build without nvcc
    use super::{Aligned, EmbeddedImage, EmbeddedModule};
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The flags build.rs passed to nvcc and ptxas (empty when kernels were not compiled).
pub const NVCC_FLAGS: &str = generated::NVCC_FLAGS;
/// `nvcc --version`'s release line (empty when kernels were not compiled).
pub const NVCC_VERSION: &str = generated::NVCC_VERSION;

/// True when this binary was built with nvcc and embeds the kernels.
pub fn kernels_compiled() -> bool {
    generated::KERNELS_COMPILED
}

/// The targets every module has an image for, in target order (empty
/// without nvcc).
pub fn targets_built() -> &'static [&'static str] {
    generated::TARGETS_BUILT
}

/// Whether the build was limited with `TRM_CUDA_ARCHS` (a developer build).
pub fn targets_limited_at_build() -> bool {
    generated::TARGETS_FROM_ENV
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

/// Registers, spills, shared memory and stack frame of every kernel for
/// every SASS architecture, as ptxas reported them when the kernels were
/// compiled.
pub fn ptxas_report() -> Result<Vec<KernelResources>, CudaError> {
    if !generated::KERNELS_COMPILED {
        return Err(CudaError::KernelsMissing);
    }
    ptxas::parse_tsv(generated::PTXAS_REPORT).map_err(CudaError::BadReport)
}

/// `TRM_KERNEL_IMAGE` read: which image devices load (a typed error for a
/// value it does not know).
pub fn image_request() -> Result<ImageRequest, CudaError> {
    let value = std::env::var(images::IMAGE_ENV).ok();
    ImageRequest::parse(value.as_deref()).map_err(CudaError::BadImageRequest)
}

/// The image this binary loads on a GPU of `capability` for `request`, or
/// why none does: [`images::choose_image`] over the built targets.
pub fn image_for(
    capability: (i32, i32),
    request: ImageRequest,
) -> Result<&'static Target, images::NoImage> {
    images::choose_image(capability, targets_built(), request)
}
