//! Where the network runs: the `--device` choice (`cpu`, `cuda`, `emu`, or
//! none for automatic), its resolution against what this build and machine
//! offer, and the factory that opens the chosen engine. The trainer,
//! `trm infer` and `trm step-dump` all open their engine here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
    /// The CUDA engine on a GPU (sm_90a: H100/H200).
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
        "device cuda: GPU {ordinal} ({name}) has compute capability {major}.{minor}, but the \
         CUDA kernels are built for sm_90a (H100/H200) only; run on the CPU with --device cpu"
    )]
    Unsupported {
        ordinal: usize,
        name: String,
        major: i32,
        minor: i32,
    },
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
            Ok(()) => choice(DeviceKind::Cuda, "auto: a usable GPU".into()),
            Err(DeviceError::NoKernels) => choice(
                DeviceKind::Cpu,
                "auto: this build has no CUDA kernels".into(),
            ),
            Err(DeviceError::NoGpu { reason }) => {
                choice(DeviceKind::Cpu, format!("auto: no GPU: {reason}"))
            }
            Err(DeviceError::Unsupported {
                name, major, minor, ..
            }) => choice(
                DeviceKind::Cpu,
                format!("auto: {name} is compute capability {major}.{minor}, the kernels need 9.0"),
            ),
            Err(e) => return Err(e),
        }),
    }
}

/// Ok when the kernels are built in and GPU `ordinal` is there with
/// compute capability 9.0 (what the sm_90a cubins load on). `trm doctor`
/// asks it of every GPU.
pub fn usable_gpu(ordinal: usize, offer: &CudaOffer<'_>) -> Result<(), DeviceError> {
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
    let (major, minor) = gpu.capability;
    if (major, minor) != (9, 0) {
        return Err(DeviceError::Unsupported {
            ordinal,
            name: gpu.name.clone(),
            major,
            minor,
        });
    }
    Ok(())
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

    fn offer<'a>(
        kernels: bool,
        emulator: bool,
        probe: &'a dyn Fn() -> Result<Vec<DeviceInfo>, CudaError>,
    ) -> CudaOffer<'a> {
        CudaOffer {
            kernels,
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
        assert_eq!(c.kind, DeviceKind::Cpu);
        assert!(c.why.contains("8.0"), "{}", c.why);
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
        let e = resolve_with(Some(DeviceKind::Cuda), 0, &offer(true, false, &a100))
            .unwrap_err()
            .to_string();
        assert!(e.contains("8.0") && e.contains("sm_90a"), "{e}");

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
}
