//! Finding and loading libnccl at run time.
//!
//! Every NCCL install names its library `libnccl.so.2`: pip's
//! `nvidia-nccl-cu12`/`-cu13` wheels (`<prefix>/lib/python3.*/site-packages/
//! nvidia/nccl/lib/`), the Debian and CUDA packages (`/usr/lib/x86_64-linux-
//! gnu`, `/usr/local/cuda*/lib64`). cudarc's loader never tries that name
//! (its list has `libnccl.so` and `.so.<CUDA major>` forms), and its lazy
//! loader panics when nothing loads, so trm loads NCCL itself: the folders
//! below in order, then the dynamic loader's own search by soname, and names
//! every place searched when none loads.
//!
//! Order: `TRM_NCCL_LIBRARY` (a file or a folder; when set, the only
//! candidate), the `LD_LIBRARY_PATH` folders, the python environments in use
//! (`VIRTUAL_ENV`, `CONDA_PREFIX`, the prefix of each `python3` on `PATH`),
//! the CUDA toolkit folders, the system library folders and system pythons,
//! then `libnccl.so.2` and `libnccl.so` through the loader (its cache).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The soname of every NCCL 2 install.
pub const SONAME: &str = "libnccl.so.2";
/// The variable that names the library (or its folder) explicitly.
pub const LIBRARY_VAR: &str = "TRM_NCCL_LIBRARY";

/// One place to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// A file path (which may not exist).
    Path(PathBuf),
    /// A bare name for the dynamic loader's own search.
    Soname(&'static str),
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Candidate::Path(p) => write!(f, "{}", p.display()),
            Candidate::Soname(n) => write!(f, "{n} (the loader's search path and cache)"),
        }
    }
}

/// What the search reads: environment variables, and the root under which
/// the fixed system folders lie (`/`; a temporary tree in tests).
pub struct SearchEnv<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
    pub root: &'a Path,
}

/// The sub-folders of `dir` whose names start with `prefix`, newest-looking
/// first (reverse name order: `cuda-13.0` before `cuda-12.8`).
fn subdirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out.reverse();
    out
}

/// `<prefix>/lib*/python3*/{site,dist}-packages/nvidia/nccl/lib`: pip's wheels.
fn python_wheel_dirs(prefix: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for lib in ["lib", "lib64"] {
        for py in subdirs(&prefix.join(lib), "python3") {
            // `/lib/python3.x` is `/usr/lib/python3.x` on merged systems.
            let py = std::fs::canonicalize(&py).unwrap_or(py);
            for packages in ["site-packages", "dist-packages"] {
                out.push(py.join(packages).join("nvidia/nccl/lib"));
            }
        }
    }
    out
}

/// Every candidate, in the order they are tried (module docs).
pub fn candidates(env: &SearchEnv<'_>) -> Vec<Candidate> {
    let var = |k: &str| (env.var)(k).filter(|v| !v.trim().is_empty());
    if let Some(explicit) = var(LIBRARY_VAR) {
        let p = PathBuf::from(explicit.trim());
        let file = if p.is_dir() { p.join(SONAME) } else { p };
        return vec![Candidate::Path(file)];
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(path) = var("LD_LIBRARY_PATH") {
        dirs.extend(path.split(':').filter(|d| !d.is_empty()).map(PathBuf::from));
    }
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|k| var(k).map(PathBuf::from))
        .collect();
    if let Some(path) = var("PATH") {
        for bin in path.split(':').filter(|d| !d.is_empty()) {
            let bin = Path::new(bin);
            if bin.join("python3").exists() {
                if let Some(prefix) = bin.parent() {
                    prefixes.push(prefix.to_path_buf());
                }
            }
        }
    }
    for p in &prefixes {
        dirs.extend(python_wheel_dirs(p));
    }
    let root = env.root;
    let cuda = root.join("usr/local");
    dirs.push(cuda.join("cuda/lib64"));
    dirs.push(cuda.join("cuda/targets/x86_64-linux/lib"));
    for c in subdirs(&cuda, "cuda-") {
        dirs.push(c.join("lib64"));
        dirs.push(c.join("targets/x86_64-linux/lib"));
    }
    for d in [
        "usr/lib/x86_64-linux-gnu",
        "lib/x86_64-linux-gnu",
        "usr/lib64",
        "usr/local/lib",
        "usr/lib",
        "usr/local/nvidia/lib64",
    ] {
        dirs.push(root.join(d));
    }
    dirs.extend(python_wheel_dirs(&root.join("usr/local")));
    dirs.extend(python_wheel_dirs(&root.join("usr")));
    dirs.push(root.join("usr/lib/python3/dist-packages/nvidia/nccl/lib"));
    let mut out: Vec<Candidate> = Vec::new();
    // One entry per folder, however named (`/lib` is `/usr/lib` on most
    // systems, `/bin/python3` and `/usr/bin/python3` one prefix).
    let mut seen = std::collections::HashSet::new();
    for d in dirs {
        if seen.insert(std::fs::canonicalize(&d).unwrap_or_else(|_| d.clone())) {
            out.push(Candidate::Path(d.join(SONAME)));
        }
    }
    out.push(Candidate::Soname(SONAME));
    out.push(Candidate::Soname("libnccl.so"));
    out
}

/// NCCL could not be loaded: every place searched, and why each file that
/// was there did not load.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "NCCL: no loadable {SONAME} (install the `nvidia-nccl-cu13` wheel or the libnccl2 \
     package, or set {LIBRARY_VAR} to the library's path); searched: {}{}",
    searched.join(", "),
    failures_note(failures)
)]
pub struct LibraryMissing {
    pub searched: Vec<String>,
    /// `path: loader message` for each file found that did not load.
    pub failures: Vec<String>,
}

fn failures_note(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!("; found but not loadable: {}", failures.join("; "))
    }
}

/// Tries the candidates in order with `open` (a path or a bare name),
/// skipping paths that do not exist; the first that opens wins.
pub fn first_loadable<L>(
    cands: &[Candidate],
    mut open: impl FnMut(&str) -> Result<L, String>,
) -> Result<(L, String), LibraryMissing> {
    let mut failures = Vec::new();
    for c in cands {
        let name = match c {
            Candidate::Path(p) if !p.exists() => continue,
            Candidate::Path(p) => p.display().to_string(),
            Candidate::Soname(n) => n.to_string(),
        };
        match open(&name) {
            Ok(lib) => return Ok((lib, name)),
            // A bare name the loader does not find is no news.
            Err(e) if matches!(c, Candidate::Soname(_)) && e.contains("No such file") => {}
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    Err(LibraryMissing {
        searched: cands.iter().map(ToString::to_string).collect(),
        failures,
    })
}

// --- the API: the few functions trm calls ------------------------------------

/// `ncclComm_t`.
pub type RawComm = *mut c_void;
/// `cudaStream_t` (the driver's `CUstream`).
pub type RawStream = cudarc::driver::sys::CUstream;

/// `ncclUniqueId`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; UNIQUE_ID_BYTES],
}
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclConfig_t` as NCCL 2.17 declared it: NCCL copies the `size` bytes
/// given and resets every field newer than `version` to its default, so an
/// older layout is valid for every later library.
#[repr(C)]
pub struct Config {
    pub size: usize,
    pub magic: u32,
    pub version: u32,
    pub blocking: c_int,
    pub cga_cluster_size: c_int,
    pub min_ctas: c_int,
    pub max_ctas: c_int,
    pub net_name: *const c_char,
}

/// `NCCL_CONFIG_UNDEF_INT`: "NCCL's default".
const UNDEF_INT: c_int = c_int::MIN;

impl Config {
    /// A non-blocking communicator (every call returns at once; progress
    /// is polled), everything else NCCL's default.
    pub fn nonblocking() -> Config {
        Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: version_code(2, 17, 0),
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
        }
    }
}

/// `NCCL_VERSION(major, minor, patch)` for releases from 2.9 on.
pub const fn version_code(major: u32, minor: u32, patch: u32) -> u32 {
    major * 10000 + minor * 100 + patch
}

/// The oldest NCCL with non-blocking communicators and the config layout above.
pub const MIN_VERSION: u32 = version_code(2, 17, 0);

/// `ncclResult_t` values trm tells apart.
pub const SUCCESS: c_int = 0;
pub const IN_PROGRESS: c_int = 7;
/// `ncclDataType_t`.
pub const UINT8: c_int = 1;
pub const FLOAT32: c_int = 7;
pub const FLOAT64: c_int = 8;
pub const INT32: c_int = 2;
/// `ncclRedOp_t`.
pub const SUM: c_int = 0;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRankConfigFn =
    unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int, *mut Config) -> c_int;
type CommGetAsyncErrorFn = unsafe extern "C" fn(RawComm, *mut c_int) -> c_int;
type CommAbortFn = unsafe extern "C" fn(RawComm) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    RawStream,
) -> c_int;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, RawStream) -> c_int;
type GetErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type GetLastErrorFn = unsafe extern "C" fn(RawComm) -> *const c_char;

/// The loaded library and the functions trm calls.
pub struct Nccl {
    /// Where it was loaded from, for messages.
    pub path: String,
    /// `ncclGetVersion`'s code (e.g. 22803 for 2.28.3).
    pub version: u32,
    pub get_unique_id: GetUniqueIdFn,
    pub comm_init_rank_config: CommInitRankConfigFn,
    pub comm_get_async_error: CommGetAsyncErrorFn,
    pub comm_abort: CommAbortFn,
    pub all_reduce: AllReduceFn,
    pub all_gather: AllGatherFn,
    get_error_string: GetErrorStringFn,
    get_last_error: Option<GetLastErrorFn>,
    // Keeps the functions' code mapped for the life of the process.
    _lib: libloading::Library,
}

/// Why the library found did not do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Missing(#[from] LibraryMissing),
    #[error("NCCL at {path}: {message}")]
    Unusable { path: String, message: String },
}

impl Nccl {
    /// `result` as NCCL words it, with NCCL's last error message when there
    /// is one (`ncclGetLastError` ignores its communicator argument).
    pub fn describe(&self, result: c_int) -> String {
        // SAFETY: both return static strings (or null) for any input.
        let text = |p: *const c_char| {
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        let base = text(unsafe { (self.get_error_string)(result) })
            .unwrap_or_else(|| format!("NCCL result {result}"));
        let last = self
            .get_last_error
            .and_then(|f| text(unsafe { f(std::ptr::null_mut()) }))
            .filter(|s| !s.trim().is_empty());
        match last {
            Some(l) => format!("{base} ({})", l.trim()),
            None => base,
        }
    }

    /// `major.minor.patch`.
    pub fn version_text(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    }
}

/// An error and its causes (libloading keeps dlerror's text in the source).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

fn symbol<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
    // SAFETY: `T` is the function type of the C declaration in nccl.h.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("no symbol {name}: {}", with_sources(&e)))
}

fn load_from(lib: libloading::Library, path: String) -> Result<Nccl, LoadError> {
    let unusable = |message: String| LoadError::Unusable {
        path: path.clone(),
        message,
    };
    let get_version: GetVersionFn = symbol(&lib, "ncclGetVersion").map_err(unusable)?;
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    let r = unsafe { get_version(&mut v) };
    if r != SUCCESS || v <= 0 {
        return Err(unusable(format!("ncclGetVersion failed ({r})")));
    }
    let version = v as u32;
    if version < MIN_VERSION {
        return Err(unusable(format!(
            "version code {version} is older than 2.17, the first with non-blocking \
             communicators (which trm needs to time out instead of hanging)"
        )));
    }
    Ok(Nccl {
        version,
        get_unique_id: symbol(&lib, "ncclGetUniqueId").map_err(unusable)?,
        comm_init_rank_config: symbol(&lib, "ncclCommInitRankConfig").map_err(unusable)?,
        comm_get_async_error: symbol(&lib, "ncclCommGetAsyncError").map_err(unusable)?,
        comm_abort: symbol(&lib, "ncclCommAbort").map_err(unusable)?,
        all_reduce: symbol(&lib, "ncclAllReduce").map_err(unusable)?,
        all_gather: symbol(&lib, "ncclAllGather").map_err(unusable)?,
        get_error_string: symbol(&lib, "ncclGetErrorString").map_err(unusable)?,
        get_last_error: symbol(&lib, "ncclGetLastError").ok(),
        path,
        _lib: lib,
    })
}

/// Searches with `env` and loads the first library that opens.
pub fn load(env: &SearchEnv<'_>) -> Result<Nccl, LoadError> {
    let cands = candidates(env);
    // SAFETY: loading NCCL runs its initialisers, which only set up state.
    let (lib, path) = first_loadable(&cands, |name| {
        unsafe { libloading::Library::new(name) }.map_err(|e| with_sources(&e))
    })?;
    load_from(lib, path)
}

/// The process's NCCL, loaded at the first call (the search and its
/// outcome are kept: a missing library stays missing for the process).
pub fn nccl() -> Result<&'static Nccl, LoadError> {
    static NCCL: OnceLock<Result<Nccl, LoadError>> = OnceLock::new();
    NCCL.get_or_init(|| {
        load(&SearchEnv {
            var: &|k| std::env::var(k).ok(),
            root: Path::new("/"),
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"not really a library").unwrap();
    }

    fn search(root: &Path, vars: &[(&str, String)]) -> Vec<Candidate> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        candidates(&SearchEnv {
            var: &move |k| m.get(k).cloned(),
            root,
        })
    }

    /// The first candidate that exists, as the loader would meet it
    /// (canonical, as the expectations below).
    fn first_existing(c: &[Candidate]) -> Option<PathBuf> {
        c.iter().find_map(|c| match c {
            Candidate::Path(p) if p.exists() => Some(canon(p)),
            _ => None,
        })
    }

    fn canon(p: &Path) -> PathBuf {
        std::fs::canonicalize(p).unwrap()
    }

    #[test]
    fn pip_wheel_in_a_virtual_env_is_found() {
        let t = tempfile::tempdir().unwrap();
        let venv = t.path().join("venv");
        let lib = venv.join("lib/python3.11/site-packages/nvidia/nccl/lib/libnccl.so.2");
        touch(&lib);
        // Also a system copy: the active environment comes first.
        touch(&t.path().join("usr/lib/x86_64-linux-gnu/libnccl.so.2"));
        let c = search(t.path(), &[("VIRTUAL_ENV", venv.display().to_string())]);
        assert_eq!(first_existing(&c), Some(canon(&lib)));
        // The same venv found through the python3 on PATH.
        touch(&venv.join("bin/python3"));
        let c = search(
            t.path(),
            &[(
                "PATH",
                format!("/nonexistent:{}", venv.join("bin").display()),
            )],
        );
        assert_eq!(first_existing(&c), Some(canon(&lib)));
    }

    #[test]
    fn system_and_cuda_folders_and_ld_library_path() {
        let t = tempfile::tempdir().unwrap();
        let debian = t.path().join("usr/lib/x86_64-linux-gnu/libnccl.so.2");
        touch(&debian);
        assert_eq!(first_existing(&search(t.path(), &[])), Some(canon(&debian)));
        // A CUDA toolkit folder comes before the system folders; the newest first.
        let old = t.path().join("usr/local/cuda-12.8/lib64/libnccl.so.2");
        let new = t.path().join("usr/local/cuda-13.0/lib64/libnccl.so.2");
        touch(&old);
        touch(&new);
        assert_eq!(first_existing(&search(t.path(), &[])), Some(canon(&new)));
        // LD_LIBRARY_PATH before everything else found.
        let mine = t.path().join("opt/mine/libnccl.so.2");
        touch(&mine);
        let c = search(
            t.path(),
            &[(
                "LD_LIBRARY_PATH",
                format!("::{}", mine.parent().unwrap().display()),
            )],
        );
        assert_eq!(first_existing(&c), Some(canon(&mine)));
        // The loader's own search closes the list.
        assert_eq!(c.last(), Some(&Candidate::Soname("libnccl.so")));
        assert!(c.contains(&Candidate::Soname(SONAME)));
    }

    #[test]
    fn explicit_library_is_the_only_candidate() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("usr/lib/x86_64-linux-gnu/libnccl.so.2"));
        let dir = t.path().join("custom");
        touch(&dir.join(SONAME));
        let c = search(t.path(), &[(LIBRARY_VAR, dir.display().to_string())]);
        assert_eq!(c, vec![Candidate::Path(dir.join(SONAME))]);
        let file = t.path().join("x/libnccl.so.2.28.3");
        let c = search(t.path(), &[(LIBRARY_VAR, file.display().to_string())]);
        assert_eq!(c, vec![Candidate::Path(file)]);
    }

    /// Nothing loadable: the error names every place searched and why a
    /// file that was there did not load.
    #[test]
    fn the_error_names_everything_searched() {
        let t = tempfile::tempdir().unwrap();
        let venv = t.path().join("env");
        let broken = venv.join("lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2");
        touch(&broken);
        let broken = canon(&broken);
        let c = search(t.path(), &[("CONDA_PREFIX", venv.display().to_string())]);
        let mut tried = Vec::new();
        let e = first_loadable(&c, |name| -> Result<(), String> {
            tried.push(name.to_string());
            if name.starts_with('/') {
                Err("invalid ELF header".into())
            } else {
                Err(format!(
                    "{name}: cannot open shared object file: No such file"
                ))
            }
        })
        .unwrap_err();
        // Only existing files and the bare names reach the loader.
        assert_eq!(
            tried,
            vec![
                broken.display().to_string(),
                SONAME.into(),
                "libnccl.so".into()
            ]
        );
        let msg = e.to_string();
        for needle in [
            broken.display().to_string(),
            t.path()
                .join("usr/local/cuda/lib64/libnccl.so.2")
                .display()
                .to_string(),
            t.path()
                .join("usr/lib/x86_64-linux-gnu/libnccl.so.2")
                .display()
                .to_string(),
            "libnccl.so.2 (the loader's search path and cache)".into(),
            format!("{}: invalid ELF header", broken.display()),
            LIBRARY_VAR.into(),
        ] {
            assert!(msg.contains(&needle), "{needle:?} missing from: {msg}");
        }
        // The real loader on a file that is not a library: also a listed failure.
        let e = load(&SearchEnv {
            var: &|k| (k == LIBRARY_VAR).then(|| broken.display().to_string()),
            root: t.path(),
        })
        .err()
        .expect("a text file is not a library");
        assert!(e.to_string().contains(&broken.display().to_string()), "{e}");
    }

    #[test]
    fn config_layout_matches_nccl_2_17() {
        // size_t, two uints, four ints, a pointer: 40 bytes on 64-bit Linux.
        assert_eq!(std::mem::size_of::<Config>(), 40);
        let c = Config::nonblocking();
        assert_eq!((c.size, c.version, c.blocking), (40, 21700, 0));
        assert_eq!(version_code(2, 28, 3), 22803);
    }
}
