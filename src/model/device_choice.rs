//! Where the network runs: the `--device` choice (`cpu`, `cuda`, `emu`, or
//! none for automatic), its resolution against what this build and machine
//! offer, and the factory that opens the chosen engine. The trainer,
//! `trm infer` and `trm step-dump` all open their engine here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::cuda::images::{choose_image, ImageRequest, Target};
use crate::backend::cuda::{self, CudaError, Device, DeviceInfo};
use crate::model::config::ArchConfig;
use crate::model::cpu::CpuEngine;
use crate::model::engine::{Engine, EngineConfig, EngineError};
use crate::model::gpu::GpuEngine;
use crate::model::trm::Params;

/// An engine and what it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU engine (the reference the others are checked against).
    Cpu,
    /// The CUDA engine on a GPU (compute capability 8.0 or newer: A100, L4,
    /// H100/H200, and later GPUs through the PTX).
    Cuda,
    /// The CUDA engine on the CPU emulator of its kernels (for tests; builds
    /// with `--features emu`).
    Emu,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 3] = [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Emu];

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Emu => "emu",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceKind {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        DeviceKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| DeviceError::Unknown(s.to_string()))
    }
}

/// Why a device cannot be used, each with what to do instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected cpu, cuda or emu")]
    Unknown(String),
    #[error(
        "device cuda: this trm binary was built without nvcc, so it has no CUDA kernels; \
         install the pinned nvcc with `tools/install-nvcc.sh` (it prints its bin folder) and \
         rebuild with `NVCC=\"$(tools/install-nvcc.sh)/nvcc\" cargo build --release`, \
         or run on the CPU with --device cpu"
    )]
    NoKernels,
    #[error("device cuda: no usable CUDA GPU: {reason}; run on the CPU with --device cpu")]
    NoGpu { reason: String },
    #[error(
        "device cuda: GPU {ordinal} ({name}), compute capability {major}.{minor}: {reason}; \
         run on the CPU with --device cpu"
    )]
    Unsupported {
        ordinal: usize,
        name: String,
        major: i32,
        minor: i32,
        /// Why no embedded kernel image runs on it.
        reason: String,
    },
    /// `TRM_KERNEL_IMAGE` has a value the runtime does not know.
    #[error("device cuda: {0}")]
    BadImageRequest(String),
    #[error(
        "device emu: this trm binary has no emulator of the CUDA kernels; rebuild with \
         `cargo build --release --features emu`"
    )]
    EmuNotBuilt,
}

/// A resolved device: the engine kind, the GPU ordinal (for `cuda`) and why
/// it was picked, for the start-up line.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceChoice {
    pub kind: DeviceKind,
    pub ordinal: usize,
    /// `requested`, or `auto: ...` with the reason.
    pub why: String,
}

impl DeviceChoice {
    /// The start-up line, e.g. `device: cpu (auto: no GPU: ...)`, naming
    /// the engine's own device (`engine.device_name()`).
    pub fn describe(&self, device_name: &str) -> String {
        format!("device: {device_name} ({})", self.why)
    }
}

/// What this build and machine offer the CUDA engine.
pub struct CudaOffer<'a> {
    /// Whether the binary embeds the compiled kernels.
    pub kernels: bool,
    /// The kernel images built (`images::TARGETS` names).
    pub targets: &'a [&'a str],
    /// `TRM_KERNEL_IMAGE`, read (an unknown value as the message).
    pub request: Result<ImageRequest, String>,
    /// Whether the binary has the kernel emulator (feature `emu`).
    pub emulator: bool,
    /// Lists the GPUs; only called when the answer matters.
    pub probe: &'a dyn Fn() -> Result<Vec<DeviceInfo>, CudaError>,
}

impl CudaOffer<'static> {
    /// This binary on this machine.
    pub fn here() -> CudaOffer<'static> {
        CudaOffer {
            kernels: cuda::kernels_compiled(),
            targets: cuda::targets_built(),
            request: image_request(),
            emulator: cfg!(feature = "emu"),
            probe: &cuda::probe,
        }
    }
}

/// [`resolve_with`] on this binary and machine.
pub fn resolve(requested: Option<DeviceKind>, ordinal: usize) -> Result<DeviceChoice, DeviceError> {
    resolve_with(requested, ordinal, &CudaOffer::here())
}

/// The device to run on: `requested`, checked against `offer`, or with
/// `None` the GPU `ordinal` when the kernels are built in and it probes as
/// a usable GPU, else the CPU. A device asked for by name that cannot be
/// used is an error naming what is missing, never a silent fallback.
pub fn resolve_with(
    requested: Option<DeviceKind>,
    ordinal: usize,
    offer: &CudaOffer<'_>,
) -> Result<DeviceChoice, DeviceError> {
    let choice = |kind, why: String| DeviceChoice { kind, ordinal, why };
    match requested {
        Some(DeviceKind::Cpu) => Ok(choice(DeviceKind::Cpu, "requested".into())),
        Some(DeviceKind::Emu) if offer.emulator => Ok(choice(DeviceKind::Emu, "requested".into())),
        Some(DeviceKind::Emu) => Err(DeviceError::EmuNotBuilt),
        Some(DeviceKind::Cuda) => {
            usable_gpu(ordinal, offer)?;
            Ok(choice(DeviceKind::Cuda, "requested".into()))
        }
        None => Ok(match usable_gpu(ordinal, offer) {
            Ok(_) => choice(DeviceKind::Cuda, "auto: a usable GPU".into()),
            Err(DeviceError::NoKernels) => choice(
                DeviceKind::Cpu,
                "auto: this build has no CUDA kernels".into(),
            ),
            Err(DeviceError::NoGpu { reason }) => {
                choice(DeviceKind::Cpu, format!("auto: no GPU: {reason}"))
            }
            Err(DeviceError::Unsupported {
                name,
                major,
                minor,
                reason,
                ..
            }) => choice(
                DeviceKind::Cpu,
                format!("auto: {name} (compute capability {major}.{minor}): {reason}"),
            ),
            Err(e) => return Err(e),
        }),
    }
}

/// The kernel image GPU `ordinal` loads (the best embedded image for its
/// compute capability: `images::choose_image`), when the kernels are built
/// in and it is there. `trm doctor` asks it of every GPU.
pub fn usable_gpu(ordinal: usize, offer: &CudaOffer<'_>) -> Result<&'static Target, DeviceError> {
    if !offer.kernels {
        return Err(DeviceError::NoKernels);
    }
    let gpus = (offer.probe)().map_err(|e| DeviceError::NoGpu {
        reason: match e {
            CudaError::NoDevice(reason) => reason,
            e => e.to_string(),
        },
    })?;
    let Some(gpu) = gpus.iter().find(|g| g.ordinal == ordinal) else {
        return Err(DeviceError::NoGpu {
            reason: if gpus.is_empty() {
                "the CUDA driver sees no device".into()
            } else {
                format!(
                    "GPU {ordinal} asked for, the CUDA driver sees {}",
                    gpus.len()
                )
            },
        });
    };
    // Checked once a GPU would be used: without one the CPU runs anyway.
    let request = offer
        .request
        .clone()
        .map_err(DeviceError::BadImageRequest)?;
    let (major, minor) = gpu.capability;
    choose_image(gpu.capability, offer.targets, request).map_err(|why| DeviceError::Unsupported {
        ordinal,
        name: gpu.name.clone(),
        major,
        minor,
        reason: why.reason(gpu.capability),
    })
}

/// `TRM_KERNEL_IMAGE`, read as the runtime reads it.
fn image_request() -> Result<ImageRequest, String> {
    cuda::kernels::image_request().map_err(|e| e.to_string())
}

/// Opens the engine of `kind` for local batches of `local_batch`: the CPU
/// engine, or the CUDA engine on GPU `ordinal` (`cuda`) or on the kernel
/// emulator (`emu`).
pub fn build_engine(
    kind: DeviceKind,
    ordinal: usize,
    arch: ArchConfig,
    params: Params<f32>,
    local_batch: usize,
    cfg: EngineConfig,
) -> Result<Box<dyn Engine>, EngineError> {
    let dev = match kind {
        DeviceKind::Cpu => {
            return Ok(Box::new(CpuEngine::new(arch, params, local_batch, cfg)));
        }
        DeviceKind::Cuda => Device::gpu(ordinal)?,
        DeviceKind::Emu => emulator()?,
    };
    Ok(Box::new(GpuEngine::new(
        dev,
        arch,
        params,
        local_batch,
        cfg,
    )?))
}

#[cfg(feature = "emu")]
fn emulator() -> Result<Device, EngineError> {
    Ok(Device::Emu)
}

#[cfg(not(feature = "emu"))]
fn emulator() -> Result<Device, EngineError> {
    Err(DeviceError::EmuNotBuilt.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(ordinal: usize, capability: (i32, i32)) -> DeviceInfo {
        DeviceInfo {
            ordinal,
            name: "Test GPU".into(),
            capability,
            total_memory: 1 << 30,
            multiprocessors: 1,
        }
    }

    const ALL_TARGETS: [&str; 5] = ["sm_80", "sm_86", "sm_89", "sm_90a", "compute_80"];

    fn offer<'a>(
        kernels: bool,
        emulator: bool,
        probe: &'a dyn Fn() -> Result<Vec<DeviceInfo>, CudaError>,
    ) -> CudaOffer<'a> {
        CudaOffer {
            kernels,
            targets: &ALL_TARGETS,
            request: Ok(ImageRequest::Best),
            emulator,
            probe,
        }
    }

    fn no_driver() -> Result<Vec<DeviceInfo>, CudaError> {
        Err(CudaError::NoDevice("libcuda.so is not installed".into()))
    }

    fn h200() -> Result<Vec<DeviceInfo>, CudaError> {
        Ok(vec![gpu(0, (9, 0))])
    }

    fn a100() -> Result<Vec<DeviceInfo>, CudaError> {
        Ok(vec![gpu(0, (8, 0))])
    }

    fn l4() -> Result<Vec<DeviceInfo>, CudaError> {
        Ok(vec![gpu(0, (8, 9))])
    }

    fn t4() -> Result<Vec<DeviceInfo>, CudaError> {
        Ok(vec![gpu(0, (7, 5))])
    }

    fn never() -> Result<Vec<DeviceInfo>, CudaError> {
        panic!("the probe must not run when the answer does not depend on it")
    }

    #[test]
    fn parses_names() {
        assert_eq!("cpu".parse::<DeviceKind>(), Ok(DeviceKind::Cpu));
        assert_eq!("CUDA".parse::<DeviceKind>(), Ok(DeviceKind::Cuda));
        assert_eq!(" emu ".parse::<DeviceKind>(), Ok(DeviceKind::Emu));
        let e = "gpu".parse::<DeviceKind>().unwrap_err().to_string();
        assert_eq!(e, "unknown device `gpu`: expected cpu, cuda or emu");
        for k in DeviceKind::ALL {
            assert_eq!(k.to_string().parse::<DeviceKind>(), Ok(k));
            // the run config spells it as the flag does
            let yaml = serde_norway::to_string(&k).unwrap();
            assert_eq!(yaml.trim(), k.name());
            assert_eq!(serde_norway::from_str::<DeviceKind>(k.name()).unwrap(), k);
        }
        assert!(serde_norway::from_str::<DeviceKind>("tpu").is_err());
    }

    #[test]
    fn auto_picks_a_usable_gpu_else_the_cpu() {
        let c = resolve_with(None, 0, &offer(true, false, &h200)).unwrap();
        assert_eq!((c.kind, c.ordinal), (DeviceKind::Cuda, 0));
        assert!(c.why.starts_with("auto"), "{}", c.why);

        let c = resolve_with(None, 0, &offer(false, true, &never)).unwrap();
        assert_eq!(c.kind, DeviceKind::Cpu);
        assert_eq!(c.why, "auto: this build has no CUDA kernels");

        let c = resolve_with(None, 0, &offer(true, false, &no_driver)).unwrap();
        assert_eq!(c.kind, DeviceKind::Cpu);
        assert_eq!(c.why, "auto: no GPU: libcuda.so is not installed");
        assert_eq!(
            c.describe("cpu"),
            "device: cpu (auto: no GPU: libcuda.so is not installed)"
        );

        let c = resolve_with(None, 0, &offer(true, false, &a100)).unwrap();
        assert_eq!(c.kind, DeviceKind::Cuda);
        let c = resolve_with(None, 0, &offer(true, false, &t4)).unwrap();
        assert_eq!(c.kind, DeviceKind::Cpu);
        assert!(
            c.why.contains("7.5") && c.why.contains("8.0 or newer"),
            "{}",
            c.why
        );
        // a rank's GPU that is not there
        let c = resolve_with(None, 1, &offer(true, false, &h200)).unwrap();
        assert_eq!(c.kind, DeviceKind::Cpu);
        assert!(c.why.contains("GPU 1"), "{}", c.why);
    }

    #[test]
    fn asked_for_devices_are_checked_never_replaced() {
        let c = resolve_with(Some(DeviceKind::Cpu), 0, &offer(true, true, &never)).unwrap();
        assert_eq!((c.kind, c.why.as_str()), (DeviceKind::Cpu, "requested"));
        let c = resolve_with(Some(DeviceKind::Cuda), 0, &offer(true, false, &h200)).unwrap();
        assert_eq!(c.kind, DeviceKind::Cuda);

        let e = resolve_with(Some(DeviceKind::Cuda), 0, &offer(false, true, &never)).unwrap_err();
        assert_eq!(e, DeviceError::NoKernels);
        let msg = e.to_string();
        assert!(
            msg.contains("without nvcc") && msg.contains("tools/install-nvcc.sh"),
            "{msg}"
        );

        let e = resolve_with(Some(DeviceKind::Cuda), 0, &offer(true, false, &no_driver))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "device cuda: no usable CUDA GPU: libcuda.so is not installed; \
             run on the CPU with --device cpu"
        );
        let none = || Ok(Vec::new());
        let e = resolve_with(Some(DeviceKind::Cuda), 0, &offer(true, false, &none))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sees no device"), "{e}");
        let e = resolve_with(Some(DeviceKind::Cuda), 0, &offer(true, false, &t4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Test GPU") && e.contains("7.5") && e.contains("--device cpu"),
            "{e}"
        );

        let e = resolve_with(Some(DeviceKind::Emu), 0, &offer(true, false, &never)).unwrap_err();
        assert_eq!(e, DeviceError::EmuNotBuilt);
        assert!(
            e.to_string()
                .contains("cargo build --release --features emu"),
            "{e}"
        );
        let c = resolve_with(Some(DeviceKind::Emu), 0, &offer(false, true, &never)).unwrap();
        assert_eq!(c.kind, DeviceKind::Emu);
    }

    #[test]
    fn each_gpu_gets_its_image_or_a_reason() {
        let image = |probe: &dyn Fn() -> Result<Vec<DeviceInfo>, CudaError>| {
            usable_gpu(0, &offer(true, false, probe)).map(|t| t.name)
        };
        assert_eq!(image(&h200), Ok("sm_90a"));
        assert_eq!(image(&a100), Ok("sm_80"));
        assert_eq!(image(&l4), Ok("sm_89"));
        assert!(matches!(image(&t4), Err(DeviceError::Unsupported { .. })));

        // TRM_KERNEL_IMAGE=ptx, and a value it does not know.
        let mut forced = offer(true, false, &l4);
        forced.request = Ok(ImageRequest::Ptx);
        assert_eq!(usable_gpu(0, &forced).map(|t| t.name), Ok("compute_80"));
        forced.request = Err("TRM_KERNEL_IMAGE=\"x\": expected auto or ptx".into());
        let e = resolve_with(Some(DeviceKind::Cuda), 0, &forced).unwrap_err();
        assert!(matches!(e, DeviceError::BadImageRequest(_)), "{e:?}");
        assert!(e.to_string().contains("TRM_KERNEL_IMAGE"), "{e}");

        // A build of sm_90a only on an L4: the reason says how to rebuild.
        let mut hopper_only = offer(true, false, &l4);
        hopper_only.targets = &["sm_90a"];
        let c = resolve_with(None, 0, &hopper_only).unwrap();
        assert_eq!(c.kind, DeviceKind::Cpu);
        assert!(c.why.contains("TRM_CUDA_ARCHS"), "{}", c.why);
    }
}
