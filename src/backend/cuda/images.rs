//! The kernel images: what build.rs compiles every `kernels/*.cu` to (SASS
//! for sm_80, sm_86, sm_89 and sm_90a, and compute_80 PTX that the driver
//! compiles for newer GPUs at load time), and the rule that picks the image a
//! device loads.
//!
//! build.rs includes this file with `#[path]`, so it uses `std` only and no
//! other module of the crate.

/// What an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Machine code (a cubin) for one architecture: loads as it is.
    Sass,
    /// PTX text, compiled by the driver (JIT) for the device at load time.
    Ptx,
}

/// One image build.rs can compile each kernel file to.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// nvcc's name: `sm_89`, `sm_90a`, `compute_80`.
    pub name: &'static str,
    pub kind: ImageKind,
    /// The compute capability the image is built for.
    pub capability: (i32, i32),
    /// Which GPUs run it, for the docs and `trm doctor`.
    pub gpus: &'static str,
}

/// Every target, in build order; a default build compiles all of them.
pub static TARGETS: [Target; 5] = [
    Target {
        name: "sm_80",
        kind: ImageKind::Sass,
        capability: (8, 0),
        gpus: "A100, A30",
    },
    Target {
        name: "sm_86",
        kind: ImageKind::Sass,
        capability: (8, 6),
        gpus: "A10, A40, RTX 30xx",
    },
    Target {
        name: "sm_89",
        kind: ImageKind::Sass,
        capability: (8, 9),
        gpus: "L4, L40S, RTX 40xx",
    },
    Target {
        name: "sm_90a",
        kind: ImageKind::Sass,
        capability: (9, 0),
        gpus: "H100, H200",
    },
    Target {
        name: "compute_80",
        kind: ImageKind::Ptx,
        capability: (8, 0),
        gpus: "any newer GPU (Blackwell: 10.x, 12.x) through the driver's JIT",
    },
];

/// The lowest compute capability any image runs on (bf16 `mma.sync`,
/// `cp.async` and `ldmatrix` all need sm_80).
pub const MIN_CAPABILITY: (i32, i32) = (8, 0);

/// The PTX target: the portable image, and the source of the sm_8x SASS.
pub const PTX_TARGET: &str = "compute_80";

/// The environment variable that forces the PTX image (`TRM_KERNEL_IMAGE=ptx`).
pub const IMAGE_ENV: &str = "TRM_KERNEL_IMAGE";

/// The environment variable that limits a build to some targets
/// (`TRM_CUDA_ARCHS=sm_90a`, for faster developer builds).
pub const ARCHS_ENV: &str = "TRM_CUDA_ARCHS";

impl Target {
    /// For messages: `sm_89 SASS` or `compute_80 PTX (JIT)`.
    pub fn describe(&self) -> String {
        match self.kind {
            ImageKind::Sass => format!("{} SASS", self.name),
            ImageKind::Ptx => format!("{} PTX (JIT)", self.name),
        }
    }

    /// The image's file for the kernel file `stem`: `attention.sm_89.cubin`,
    /// `attention.compute_80.ptx`.
    pub fn file_name(&self, stem: &str) -> String {
        match self.kind {
            ImageKind::Sass => format!("{stem}.{}.cubin", self.name),
            ImageKind::Ptx => format!("{stem}.{}.ptx", self.name),
        }
    }
}

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The targets of a `TRM_CUDA_ARCHS` value (names separated by commas or
/// spaces, in any order), in build order; `all` or nothing means every one.
pub fn parse_targets(value: &str) -> Result<Vec<&'static Target>, String> {
    let names: Vec<&str> = value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() || names == ["all"] {
        return Ok(TARGETS.iter().collect());
    }
    for name in &names {
        if target(name).is_none() {
            return Err(format!(
                "{ARCHS_ENV}={value:?}: unknown target {name:?}; expected some of {} (or all)",
                TARGETS
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(TARGETS.iter().filter(|t| names.contains(&t.name)).collect())
}

/// Which image a device should load (`TRM_KERNEL_IMAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageRequest {
    /// The device's own SASS when built, else the PTX (the default).
    Best,
    /// The PTX, even where SASS exists (to check the portable path).
    Ptx,
}

impl ImageRequest {
    /// Reads a `TRM_KERNEL_IMAGE` value: unset, empty or `auto` is
    /// [`ImageRequest::Best`], `ptx` is [`ImageRequest::Ptx`].
    pub fn parse(value: Option<&str>) -> Result<ImageRequest, String> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "auto") => Ok(ImageRequest::Best),
            Some("ptx") => Ok(ImageRequest::Ptx),
            Some(_) => Err(format!(
                "{IMAGE_ENV}={:?}: expected `auto` (the device's SASS when built, else PTX) or \
                 `ptx` (the compute_80 PTX, compiled by the driver)",
                value.unwrap_or_default()
            )),
        }
    }
}

/// Why no embedded image fits a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoImage {
    /// Below [`MIN_CAPABILITY`]: the kernels' instructions are not there.
    TooOld,
    /// The image the device needs was not compiled into this binary (a build
    /// with `TRM_CUDA_ARCHS`); `wanted` names what would do.
    NotBuilt { wanted: String },
}

impl NoImage {
    /// Why, for a GPU of `capability`, in words.
    pub fn reason(&self, capability: (i32, i32)) -> String {
        let (major, minor) = capability;
        match self {
            NoImage::TooOld => format!(
                "the kernels need compute capability {}.{} or newer (sm_80: A100, L4, H100 and \
                 later), this GPU has {major}.{minor}",
                MIN_CAPABILITY.0, MIN_CAPABILITY.1
            ),
            NoImage::NotBuilt { wanted } => format!(
                "this binary has no kernel image for compute capability {major}.{minor} (it \
                 needs {wanted}); rebuild without {ARCHS_ENV} to embed every architecture"
            ),
        }
    }
}

/// The image for a device of compute capability `capability` among the
/// `built` targets: with [`ImageRequest::Best`] the exact SASS (sm_90a only
/// on 9.0, SASS of one major runs on no other), else on major 8 the highest
/// sm_8y SASS with y <= minor, else the compute_80 PTX (JIT, e.g. for
/// Blackwell); with [`ImageRequest::Ptx`] the PTX. Below 8.0 nothing runs.
pub fn choose_image(
    capability: (i32, i32),
    built: &[&str],
    request: ImageRequest,
) -> Result<&'static Target, NoImage> {
    if capability < MIN_CAPABILITY {
        return Err(NoImage::TooOld);
    }
    let is_built = |t: &&'static Target| built.contains(&t.name);
    let ptx = || {
        target(PTX_TARGET)
            .filter(is_built)
            .ok_or_else(|| NoImage::NotBuilt {
                wanted: format!("{PTX_TARGET} PTX"),
            })
    };
    if request == ImageRequest::Ptx {
        return ptx();
    }
    let (major, minor) = capability;
    let sass = TARGETS
        .iter()
        .filter(|t| t.kind == ImageKind::Sass && is_built(t))
        .filter(|t| match t.capability {
            // sm_90a's features (wgmma, setmaxnreg) exist on 9.0 only.
            (9, 0) => capability == (9, 0),
            (m, n) => m == major && n <= minor,
        })
        .max_by_key(|t| t.capability);
    match (sass, ptx()) {
        (Some(t), _) => Ok(t),
        (None, Ok(t)) => Ok(t),
        (None, Err(_)) => Err(NoImage::NotBuilt {
            wanted: match TARGETS
                .iter()
                .filter(|t| t.kind == ImageKind::Sass && t.capability.0 == major)
                .filter(|t| t.capability.1 <= minor)
                .max_by_key(|t| t.capability)
            {
                Some(t) => format!("{} SASS or {PTX_TARGET} PTX", t.name),
                None => format!("{PTX_TARGET} PTX"),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&str; 5] = ["sm_80", "sm_86", "sm_89", "sm_90a", "compute_80"];

    fn best(capability: (i32, i32)) -> Result<&'static str, NoImage> {
        choose_image(capability, &ALL, ImageRequest::Best).map(|t| t.name)
    }

    #[test]
    fn picks_the_best_image_per_capability() {
        assert_eq!(best((7, 5)), Err(NoImage::TooOld));
        assert_eq!(best((6, 1)), Err(NoImage::TooOld));
        assert_eq!(best((8, 0)), Ok("sm_80"));
        assert_eq!(best((8, 6)), Ok("sm_86"));
        // Jetson Orin: no sm_87 build, sm_86 SASS runs on it.
        assert_eq!(best((8, 7)), Ok("sm_86"));
        assert_eq!(best((8, 9)), Ok("sm_89"));
        assert_eq!(best((9, 0)), Ok("sm_90a"));
        // Blackwell: SASS of another major never loads, the PTX is JIT-compiled.
        assert_eq!(best((10, 0)), Ok("compute_80"));
        assert_eq!(best((12, 0)), Ok("compute_80"));
        // A hypothetical 9.1 may not have sm_90a's features.
        assert_eq!(best((9, 1)), Ok("compute_80"));
    }

    #[test]
    fn forced_ptx_and_partial_builds() {
        for cc in [(8, 0), (8, 9), (9, 0), (12, 0)] {
            let t = choose_image(cc, &ALL, ImageRequest::Ptx).unwrap();
            assert_eq!((t.name, t.kind), ("compute_80", ImageKind::Ptx), "{cc:?}");
        }
        assert_eq!(
            choose_image((7, 5), &ALL, ImageRequest::Ptx),
            Err(NoImage::TooOld)
        );
        // A build of sm_90a only: an L4 has nothing, an H200 its SASS.
        let hopper = ["sm_90a"];
        let e = choose_image((8, 9), &hopper, ImageRequest::Best).unwrap_err();
        assert_eq!(
            e,
            NoImage::NotBuilt {
                wanted: "sm_89 SASS or compute_80 PTX".into()
            }
        );
        assert!(e.reason((8, 9)).contains("TRM_CUDA_ARCHS"), "{e:?}");
        assert_eq!(
            choose_image((9, 0), &hopper, ImageRequest::Best).map(|t| t.name),
            Ok("sm_90a")
        );
        assert!(choose_image((9, 0), &hopper, ImageRequest::Ptx).is_err());
        // sm_80 SASS serves an sm_86 device when that is what was built.
        assert_eq!(
            choose_image((8, 6), &["sm_80"], ImageRequest::Best).map(|t| t.name),
            Ok("sm_80")
        );
        let e = choose_image((8, 9), &[], ImageRequest::Best).unwrap_err();
        assert!(matches!(e, NoImage::NotBuilt { .. }), "{e:?}");
        assert!(NoImage::TooOld.reason((7, 5)).contains("7.5"));
    }

    #[test]
    fn reads_the_image_request() {
        assert_eq!(ImageRequest::parse(None), Ok(ImageRequest::Best));
        assert_eq!(ImageRequest::parse(Some("")), Ok(ImageRequest::Best));
        assert_eq!(ImageRequest::parse(Some("auto")), Ok(ImageRequest::Best));
        assert_eq!(ImageRequest::parse(Some(" PTX ")), Ok(ImageRequest::Ptx));
        let e = ImageRequest::parse(Some("sass")).unwrap_err();
        assert!(
            e.contains("TRM_KERNEL_IMAGE") && e.contains("\"sass\""),
            "{e}"
        );
    }

    #[test]
    fn reads_the_target_list() {
        let names =
            |v: &str| parse_targets(v).map(|ts| ts.iter().map(|t| t.name).collect::<Vec<_>>());
        assert_eq!(names("").unwrap(), ALL);
        assert_eq!(names("all").unwrap(), ALL);
        assert_eq!(names("compute_80, sm_89").unwrap(), ["sm_89", "compute_80"]);
        assert_eq!(names("sm_90a sm_90a").unwrap(), ["sm_90a"]);
        let e = parse_targets("sm_90").unwrap_err();
        assert!(e.contains("\"sm_90\"") && e.contains("sm_90a"), "{e}");
    }

    #[test]
    fn names_and_files() {
        let sm89 = target("sm_89").unwrap();
        assert_eq!(sm89.describe(), "sm_89 SASS");
        assert_eq!(sm89.file_name("cast"), "cast.sm_89.cubin");
        let ptx = target(PTX_TARGET).unwrap();
        assert_eq!(ptx.describe(), "compute_80 PTX (JIT)");
        assert_eq!(ptx.file_name("cast"), "cast.compute_80.ptx");
        assert!(target("sm_75").is_none());
    }
}
