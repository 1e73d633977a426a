//! `trm doctor`: what `trm` will use on this machine (the build, the CUDA
//! driver and GPUs, cuBLASLt and NCCL, the CPU, the engine picked with no
//! `--device`, the launcher's world), for a person (`to_text`) or a script
//! (JSON through serde). Every probe that fails is reported as such: a
//! report is always made, so the command never fails for what is missing.

use std::ffi::c_int;

use serde::Serialize;

use crate::backend::cuda::images::{ImageRequest, IMAGE_ENV, PTX_TARGET};
use crate::backend::cuda::{self, CudaError, DeviceInfo};
use crate::dist::nccl::{self, library::LoadError};
use crate::dist::World;
use crate::model::device_choice::{self, CudaOffer};

/// The outcome of one probe: what was found, or why not. JSON: `{"ok": ...}`
/// or `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe<T> {
    Ok(T),
    Error(String),
}

impl<T> Probe<T> {
    fn from_result<E: ToString>(r: Result<T, E>) -> Probe<T> {
        match r {
            Ok(v) => Probe::Ok(v),
            Err(e) => Probe::Error(e.to_string()),
        }
    }
}

/// Everything `trm doctor` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub build: Build,
    pub cuda: Cuda,
    pub libraries: Libraries,
    pub cpu: Cpu,
    /// The engine `trm train` and `trm infer` pick with no `--device` and no
    /// `device` in the run config.
    pub engine: Probe<EnginePick>,
    /// The launcher's world (`World::from_env`), described.
    pub world: Probe<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Build {
    pub version: String,
    /// The git commit when build.rs last ran, or "unknown".
    pub commit: String,
    pub cuda_kernels: bool,
    pub kernel_modules: usize,
    /// The kernel images every module has: `sm_*` SASS and `compute_*` PTX.
    pub architectures: Vec<String>,
    /// Whether `TRM_CUDA_ARCHS` limited them at build time.
    pub architectures_limited: bool,
    pub nvcc: String,
    /// Whether the CPU emulator of the kernels is built in (`--device emu`).
    pub emulator: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cuda {
    pub driver: Probe<Driver>,
    /// Which kernel image GPUs load (`TRM_KERNEL_IMAGE`), in words.
    pub kernel_image: Probe<String>,
    pub gpus: Probe<Vec<Gpu>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Driver {
    /// The file libcuda was loaded from.
    pub library: String,
    /// The CUDA version the driver supports, e.g. "13.0".
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: String,
    pub memory_bytes: u64,
    pub multiprocessors: i32,
    /// Whether the embedded kernels run on it (device_choice's rule).
    pub kernels_run: bool,
    /// The image they load: `sm_89 SASS`, `compute_80 PTX (JIT)`.
    pub kernel_image: Option<String>,
    /// Why they do not, when they do not.
    pub why_not: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Libraries {
    /// Where cuBLASLt was loaded from, with its version.
    pub cublaslt: Probe<String>,
    /// Where NCCL was loaded from, with its version.
    pub nccl: Probe<String>,
    /// Every place searched for NCCL when none loaded.
    pub nccl_searched: Vec<String>,
    /// `path: loader message` for each NCCL file found that did not load.
    pub nccl_unloadable: Vec<String>,
}

/// Whether the CPU has a feature; `n/a` off x86-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Feature {
    Yes,
    No,
    #[serde(rename = "n/a")]
    NotApplicable,
    Unknown,
}

impl Feature {
    fn from_bool(b: bool) -> Feature {
        if b {
            Feature::Yes
        } else {
            Feature::No
        }
    }

    fn word(self) -> &'static str {
        match self {
            Feature::Yes => "yes",
            Feature::No => "no",
            Feature::NotApplicable => "n/a",
            Feature::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cpu {
    pub model: String,
    /// The CPUs this process may use.
    pub logical_threads: usize,
    /// The CPU engine's worker threads by default (rayon's pool: every CPU,
    /// or RAYON_NUM_THREADS; a run's `threads` setting lowers it).
    pub worker_threads: usize,
    pub avx2: Feature,
    pub avx512f: Feature,
    pub amx: Feature,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnginePick {
    /// `cpu` or `cuda` (`emu` is only ever asked for).
    pub device: String,
    pub why: String,
}

/// Probes this binary and machine.
pub fn probe() -> Report {
    // One probe answers every question, each with device_choice's rule;
    // the error kept is the reason that rule would give.
    let found = cuda::probe().map_err(|e| match e {
        CudaError::NoDevice(reason) => reason,
        e => e.to_string(),
    });
    let replay = || found.clone().map_err(CudaError::NoDevice);
    let offer = CudaOffer::here();
    let offer = CudaOffer {
        probe: &replay,
        ..offer
    };
    let gpus = match &found {
        Ok(list) => Probe::Ok(list.iter().map(|g| gpu_row(g, &offer)).collect()),
        Err(reason) => Probe::Error(reason.clone()),
    };
    let engine = device_choice::resolve_with(None, 0, &offer).map(|c| EnginePick {
        device: c.kind.to_string(),
        why: c.why,
    });
    let (nccl, nccl_searched, nccl_unloadable) = match nccl::library_summary() {
        Ok(s) => (Probe::Ok(s), Vec::new(), Vec::new()),
        Err(e) => {
            let (searched, unloadable) = match &e {
                LoadError::Missing(m) => (m.searched.clone(), m.failures.clone()),
                LoadError::Unusable { .. } => (Vec::new(), Vec::new()),
            };
            (Probe::Error(e.to_string()), searched, unloadable)
        }
    };
    Report {
        build: build(),
        cuda: Cuda {
            driver: driver(),
            kernel_image: kernel_image_request(&offer),
            gpus,
        },
        libraries: Libraries {
            cublaslt: cublaslt(),
            nccl,
            nccl_searched,
            nccl_unloadable,
        },
        cpu: cpu(),
        engine: Probe::from_result(engine),
        world: Probe::from_result(World::from_env().map(|w| w.describe())),
    }
}

/// `TRM_KERNEL_IMAGE` in words.
fn kernel_image_request(offer: &CudaOffer<'_>) -> Probe<String> {
    Probe::from_result(offer.request.clone().map(|r| match r {
        ImageRequest::Best => format!(
            "auto: each GPU's SASS, else the {PTX_TARGET} PTX ({IMAGE_ENV}=ptx forces the PTX)"
        ),
        ImageRequest::Ptx => format!("{PTX_TARGET} PTX on every GPU ({IMAGE_ENV}=ptx)"),
    }))
}

fn gpu_row(g: &DeviceInfo, offer: &CudaOffer<'_>) -> Gpu {
    let verdict = device_choice::usable_gpu(g.ordinal, offer);
    Gpu {
        ordinal: g.ordinal,
        name: g.name.clone(),
        compute_capability: format!("{}.{}", g.capability.0, g.capability.1),
        memory_bytes: g.total_memory as u64,
        multiprocessors: g.multiprocessors,
        kernels_run: verdict.is_ok(),
        kernel_image: verdict.as_ref().ok().map(|t| t.describe()),
        why_not: verdict.err().map(|e| e.to_string()),
    }
}

fn build() -> Build {
    let modules = cuda::embedded_modules().map_or(0, |m| m.len());
    Build {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commit: env!("TRM_GIT_COMMIT").to_string(),
        cuda_kernels: cuda::kernels_compiled(),
        kernel_modules: modules,
        architectures: cuda::targets_built()
            .iter()
            .map(|t| t.to_string())
            .collect(),
        architectures_limited: cuda::kernels::targets_limited_at_build(),
        nvcc: cuda::NVCC_VERSION.to_string(),
        emulator: cfg!(feature = "emu"),
    }
}

/// The kernel images in words: `sm_80, sm_89 SASS and compute_80 PTX`.
pub fn targets_text(names: &[String]) -> String {
    let (ptx, sass): (Vec<&str>, Vec<&str>) = names
        .iter()
        .map(String::as_str)
        .partition(|n| n.starts_with("compute_"));
    let mut parts = Vec::new();
    if !sass.is_empty() {
        parts.push(format!("{} SASS", sass.join(", ")));
    }
    if !ptx.is_empty() {
        parts.push(format!("{} PTX", ptx.join(", ")));
    }
    parts.join(" and ")
}

/// "major.minor" of cuDriverGetVersion's code (13000 -> 13.0).
pub fn driver_version_text(code: c_int) -> String {
    format!("{}.{}", code / 1000, (code % 1000) / 10)
}

/// "major.minor.patch" of cublasLtGetVersion's code (130001 -> 13.0.1).
pub fn cublaslt_version_text(code: usize) -> String {
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
}

fn driver() -> Probe<Driver> {
    let code = match cuda::runtime::driver_version() {
        Ok(code) => code,
        Err(CudaError::NoDevice(why)) => return Probe::Error(why),
        Err(e) => return Probe::Error(e.to_string()),
    };
    // A driver too old for the kernels is reported here; the GPU rows then
    // say the same (the probe refuses it).
    if let Err(CudaError::NoDevice(why)) = cuda::runtime::check_driver_version(code) {
        return Probe::Error(why);
    }
    Probe::Ok(Driver {
        library: loaded_path("libcuda.so"),
        version: driver_version_text(code),
    })
}

fn cublaslt() -> Probe<String> {
    use cudarc::cublaslt::sys;
    // SAFETY: only tries to open the library.
    if !unsafe { sys::is_culib_present() } {
        let mut tried = cudarc::get_lib_name_candidates("cublasLt");
        let mut seen = std::collections::HashSet::new();
        tried.retain(|name| seen.insert(name.clone()));
        return Probe::Error(format!(
            "no loadable cuBLASLt (the CUDA engine's GEMMs); tried {} (the loader's search path and cache)",
            tried.join(", ")
        ));
    }
    // SAFETY: the library loads (checked above), so the lazy loader does
    // not panic; the call takes no argument.
    let code = unsafe { sys::cublasLtGetVersion() };
    Probe::Ok(format!(
        "{} (version {})",
        loaded_path("libcublasLt"),
        cublaslt_version_text(code)
    ))
}

/// The file of a loaded library whose name starts with `prefix`, from the
/// process's memory map (the loader does not say which candidate it took).
fn loaded_path(prefix: &str) -> String {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| library_in_maps(&maps, prefix))
        .unwrap_or_else(|| "loaded (file not known)".into())
}

/// The first mapped file in `maps` (/proc/PID/maps text) whose file name
/// starts with `prefix`.
pub fn library_in_maps(maps: &str, prefix: &str) -> Option<String> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|name| name.starts_with(prefix))
        })
        .map(str::to_string)
}

fn cpu() -> Cpu {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok();
    let field = |key: &str| {
        info.as_deref().and_then(|text| {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
        })
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let flags = field("flags");
    let (avx2, avx512f, amx) = x86_features(flags.as_deref());
    Cpu {
        model,
        logical_threads: crate::limits::cpu_count(),
        worker_threads: rayon::current_num_threads(),
        avx2,
        avx512f,
        amx,
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_features(flags: Option<&str>) -> (Feature, Feature, Feature) {
    // AMX from the kernel's flags: its run-time check is not in this MSRV's std.
    let amx = flags.map_or(Feature::Unknown, |f| {
        Feature::from_bool(f.split_whitespace().any(|w| w == "amx_tile"))
    });
    (
        Feature::from_bool(std::arch::is_x86_feature_detected!("avx2")),
        Feature::from_bool(std::arch::is_x86_feature_detected!("avx512f")),
        amx,
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_features(_flags: Option<&str>) -> (Feature, Feature, Feature) {
    (
        Feature::NotApplicable,
        Feature::NotApplicable,
        Feature::NotApplicable,
    )
}

/// Label column width of the text report.
const LABEL: usize = 18;

impl Report {
    /// The report as aligned text, one section per heading.
    pub fn to_text(&self) -> String {
        let mut out = String::from("trm doctor\n");
        let mut section = |title: &str, rows: Vec<(String, String)>| {
            out += &format!("\n{title}\n");
            for (label, value) in rows {
                out += &format!("  {label:<LABEL$} {value}\n");
            }
        };
        let b = &self.build;
        let kernels = if b.cuda_kernels {
            format!(
                "{} modules for {}{} ({})",
                b.kernel_modules,
                targets_text(&b.architectures),
                if b.architectures_limited {
                    ", limited by TRM_CUDA_ARCHS"
                } else {
                    ""
                },
                b.nvcc
            )
        } else {
            "none (built without nvcc)".to_string()
        };
        section(
            "build",
            vec![
                row("version", &b.version),
                row("commit", &b.commit),
                row("CUDA kernels", &kernels),
                row(
                    "emulator",
                    if b.emulator {
                        "built in (--device emu)"
                    } else {
                        "not built in"
                    },
                ),
            ],
        );

        let mut rows = vec![
            match &self.cuda.driver {
                Probe::Ok(d) => row("driver", &format!("CUDA {} ({})", d.version, d.library)),
                Probe::Error(e) => row("driver", &format!("not loaded: {e}")),
            },
            match &self.cuda.kernel_image {
                Probe::Ok(v) => row("kernel image", v),
                Probe::Error(e) => row("kernel image", &format!("invalid: {e}")),
            },
        ];
        match &self.cuda.gpus {
            Probe::Ok(gpus) => rows.extend(gpus.iter().map(|g| {
                let run = match (&g.kernel_image, &g.why_not) {
                    (Some(image), None) => format!("kernels: {image}"),
                    (_, Some(why)) => format!("kernels do not run: {why}"),
                    (None, None) => "kernels run".to_string(),
                };
                row(
                    &format!("GPU {}", g.ordinal),
                    &format!(
                        "{}, compute {}, {:.1} GiB, {} SMs; {run}",
                        g.name,
                        g.compute_capability,
                        g.memory_bytes as f64 / (1u64 << 30) as f64,
                        g.multiprocessors
                    ),
                )
            })),
            Probe::Error(e) => rows.push(row("GPUs", &format!("none: {e}"))),
        }
        section("CUDA", rows);

        let l = &self.libraries;
        let mut rows = vec![probe_row("cuBLASLt", &l.cublaslt)];
        match (&l.nccl, l.nccl_searched.is_empty()) {
            (Probe::Error(_), false) => {
                rows.push(row("NCCL", "not found; searched:"));
                rows.extend(l.nccl_searched.iter().map(|s| row("", s)));
                if !l.nccl_unloadable.is_empty() {
                    rows.push(row("", "found but not loadable:"));
                    rows.extend(l.nccl_unloadable.iter().map(|s| row("", s)));
                }
            }
            _ => rows.push(probe_row("NCCL", &l.nccl)),
        }
        section("libraries", rows);

        let c = &self.cpu;
        section(
            "CPU",
            vec![
                row("model", &c.model),
                row("logical threads", &c.logical_threads.to_string()),
                row("worker threads", &c.worker_threads.to_string()),
                row("AVX2", c.avx2.word()),
                row("AVX-512F", c.avx512f.word()),
                row("AMX", c.amx.word()),
            ],
        );

        section(
            "run",
            vec![
                match &self.engine {
                    Probe::Ok(p) => row("auto engine", &format!("{} ({})", p.device, p.why)),
                    Probe::Error(e) => row("auto engine", &format!("none: {e}")),
                },
                probe_row("world", &self.world),
            ],
        );
        out
    }
}

fn row(label: &str, value: &str) -> (String, String) {
    (label.to_string(), value.to_string())
}

fn probe_row(label: &str, p: &Probe<String>) -> (String, String) {
    match p {
        Probe::Ok(v) => row(label, v),
        Probe::Error(e) => row(label, &format!("not found: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            build: Build {
                version: "9.9.9".into(),
                commit: "abc123".into(),
                cuda_kernels: true,
                kernel_modules: 3,
                architectures: ["sm_80", "sm_89", "sm_90a", "compute_80"]
                    .map(String::from)
                    .to_vec(),
                architectures_limited: false,
                nvcc: "release 13.0".into(),
                emulator: false,
            },
            cuda: Cuda {
                driver: Probe::Ok(Driver {
                    library: "/usr/lib/libcuda.so.1".into(),
                    version: "13.0".into(),
                }),
                kernel_image: Probe::Ok("auto".into()),
                gpus: Probe::Ok(vec![
                    Gpu {
                        ordinal: 0,
                        name: "NVIDIA L4".into(),
                        compute_capability: "8.9".into(),
                        memory_bytes: 24 << 30,
                        multiprocessors: 58,
                        kernels_run: true,
                        kernel_image: Some("sm_89 SASS".into()),
                        why_not: None,
                    },
                    Gpu {
                        ordinal: 1,
                        name: "Tesla T4".into(),
                        compute_capability: "7.5".into(),
                        memory_bytes: 16 << 30,
                        multiprocessors: 40,
                        kernels_run: false,
                        kernel_image: None,
                        why_not: Some("needs 8.0".into()),
                    },
                ]),
            },
            libraries: Libraries {
                cublaslt: Probe::Ok("/lib/libcublasLt.so.13 (version 13.0.1)".into()),
                nccl: Probe::Error("NCCL: no loadable libnccl.so.2".into()),
                nccl_searched: vec!["/a/libnccl.so.2".into(), "/b/libnccl.so.2".into()],
                nccl_unloadable: vec!["/b/libnccl.so.2: wrong ELF class".into()],
            },
            cpu: Cpu {
                model: "Test CPU".into(),
                logical_threads: 8,
                worker_threads: 8,
                avx2: Feature::Yes,
                avx512f: Feature::No,
                amx: Feature::NotApplicable,
            },
            engine: Probe::Ok(EnginePick {
                device: "cpu".into(),
                why: "auto: no GPU".into(),
            }),
            world: Probe::Error("WORLD_SIZE=\"x\": not a number".into()),
        }
    }

    #[test]
    fn text_rows_are_aligned_and_say_what_failed() {
        let text = sample().to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"  version            9.9.9"), "{text}");
        assert!(
            lines.contains(
                &"  CUDA kernels       3 modules for sm_80, sm_89, sm_90a SASS and compute_80 PTX (release 13.0)"
            ),
            "{text}"
        );
        assert!(lines.contains(
            &"  GPU 0              NVIDIA L4, compute 8.9, 24.0 GiB, 58 SMs; kernels: sm_89 SASS"
        ));
        assert!(lines.contains(
            &"  GPU 1              Tesla T4, compute 7.5, 16.0 GiB, 40 SMs; kernels do not run: needs 8.0"
        ));
        assert!(lines.contains(&"  kernel image       auto"), "{text}");
        assert!(lines.contains(&"  NCCL               not found; searched:"));
        assert!(lines.contains(&"                     /b/libnccl.so.2"));
        assert!(lines.contains(&"                     /b/libnccl.so.2: wrong ELF class"));
        assert!(lines.contains(&"  AMX                n/a"));
        assert!(lines.contains(&"  auto engine        cpu (auto: no GPU)"));
        assert!(lines.contains(&"  world              not found: WORLD_SIZE=\"x\": not a number"));
        // every row's value starts in the same column
        for l in lines.iter().filter(|l| l.starts_with("  ")) {
            assert_eq!(l.as_bytes()[2 + LABEL], b' ', "{l}");
            assert_ne!(l.as_bytes()[3 + LABEL], b' ', "{l}");
        }
    }

    #[test]
    fn json_tags_each_probe_ok_or_error() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["cuda"]["driver"]["ok"]["version"], "13.0");
        assert_eq!(v["cuda"]["gpus"]["ok"][0]["kernel_image"], "sm_89 SASS");
        assert_eq!(v["cuda"]["gpus"]["ok"][1]["kernels_run"], false);
        assert!(v["cuda"]["gpus"]["ok"][1]["kernel_image"].is_null());
        assert_eq!(
            v["libraries"]["nccl"]["error"],
            "NCCL: no loadable libnccl.so.2"
        );
        assert_eq!(v["cpu"]["amx"], "n/a");
        assert_eq!(v["cpu"]["avx2"], "yes");
        assert_eq!(v["engine"]["ok"]["device"], "cpu");
    }

    #[test]
    fn kernel_targets_in_words() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            targets_text(&names(&["sm_80", "sm_86", "sm_90a", "compute_80"])),
            "sm_80, sm_86, sm_90a SASS and compute_80 PTX"
        );
        assert_eq!(targets_text(&names(&["sm_90a"])), "sm_90a SASS");
        assert_eq!(targets_text(&names(&["compute_80"])), "compute_80 PTX");
        assert_eq!(targets_text(&[]), "");
    }

    #[test]
    fn version_codes_read_as_cuda_writes_them() {
        assert_eq!(driver_version_text(13000), "13.0");
        assert_eq!(driver_version_text(12080), "12.8");
        assert_eq!(cublaslt_version_text(130001), "13.0.1");
        assert_eq!(cublaslt_version_text(120804), "12.8.4");
    }

    #[test]
    fn finds_a_library_in_the_memory_map() {
        let maps = "7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7f02-7f03 r-xp 00000000 08:01 2 /opt/cuda/lib64/libcublasLt.so.13.0.1\n\
                    7f04-7f05 rw-p 00000000 00:00 0\n";
        assert_eq!(
            library_in_maps(maps, "libcublasLt").as_deref(),
            Some("/opt/cuda/lib64/libcublasLt.so.13.0.1")
        );
        assert_eq!(library_in_maps(maps, "libcuda.so"), None);
    }
}
