//! Build script, three jobs:
//! 1. The kernel ABI (always): parses `kernels/abi.h` and the kernel
//!    declarations of `kernels/*.cu` and writes `OUT_DIR/abi.rs`, the Rust
//!    mirror of the argument structs and a typed handle per kernel
//!    (`src/backend/cuda/abigen.rs`, included by `src/backend/cuda/abi.rs`).
//! 2. The CPU emulator (feature `emu`, on for tests): compiles the same
//!    `kernels/*.cu`, the emulator runtime and self-tests under
//!    `kernels/emu/` with the host C++ compiler into the static library
//!    `trm_emu`, plus generated entry points (`src/backend/cuda/emu.rs`).
//! 3. The GPU kernels: compiles every `kernels/*.cu` for each target of
//!    `src/backend/cuda/images.rs` (sm_90a SASS with nvcc; compute_80 PTX
//!    with nvcc, and sm_80, sm_86 and sm_89 SASS from that PTX with ptxas;
//!    `TRM_CUDA_ARCHS` builds fewer), checks ptxas' resource report for every
//!    architecture (zero spills is a project rule), and writes
//!    `OUT_DIR/kernels.rs`, which embeds the images and
//!    `OUT_DIR/ptxas_report.tsv` (read by `src/backend/cuda/kernels.rs`). The
//!    emulator's self-test kernels (`kernels/emu/tests/*.cu`) are compiled
//!    and checked the same way, and embedded only with feature `emu` (test
//!    builds), so the GPU runs the same self-tests as the emulator: some
//!    arch.cuh wrappers have no other user yet.
//!
//! It also records the git commit (`TRM_GIT_COMMIT`, for `trm doctor`).
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`. Without
//! one the build still succeeds, with one warning, and embeds no kernels;
//! `tools/install-nvcc.sh` installs the pinned CUDA 13.0 nvcc.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[allow(dead_code)]
#[path = "src/backend/cuda/ptxas.rs"]
mod ptxas;

#[allow(dead_code)]
#[path = "src/backend/cuda/abigen.rs"]
mod abigen;

#[allow(dead_code)]
#[path = "src/backend/cuda/images.rs"]
mod images;

/// nvcc flags for every kernel file and target (each target adds its own:
/// `-cubin -arch=sm_90a -Xptxas -v`, `-ptx -arch=compute_80`):
/// - `-O3 -std=c++17`: the optimisation level and language, pinned.
/// - `-lineinfo`: source lines for profilers; no effect on the code.
/// - `-Werror all-warnings`: nvcc makes every warning an error, and passes it on
///   to cicc (`--promote_warnings`) and ptxas (`--warning-as-error`).
///
/// ptxas' `-v` prints registers, spills, shared memory and stack per
/// function; build.rs parses it into the report and the spill check.
const NVCC_FLAGS: &[&str] = &["-O3", "-std=c++17", "-lineinfo", "-Werror", "all-warnings"];

/// Environment that changes what nvcc is found or what it does.
const ENV_INPUTS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "PATH",
    "NVCC_CCBIN",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
    images::ARCHS_ENV,
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("no CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
    let kernels_dir = manifest_dir.join("kernels");

    for var in ENV_INPUTS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    record_git_commit(&manifest_dir);

    let mut sources = Vec::new();
    if kernels_dir.is_dir() {
        let entries = fs::read_dir(&kernels_dir)
            .map_err(|e| format!("reading {}: {e}", kernels_dir.display()))?;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("reading {}: {e}", kernels_dir.display()))?
                .path();
            if !path.is_file() {
                continue;
            }
            // Every file: .cu sources and the .cuh/.h headers they include.
            println!("cargo:rerun-if-changed={}", path.display());
            if path.extension().is_some_and(|e| e == "cu") {
                sources.push(path);
            }
        }
    }
    sources.sort();

    let (structs, modules) = generate_abi(&kernels_dir, &sources, &out_dir)?;
    if env::var_os("CARGO_FEATURE_EMU").is_some() {
        build_emulator(&kernels_dir, &sources, &out_dir, &structs, &modules)?;
    }

    let generated = out_dir.join("kernels.rs");
    let report_path = out_dir.join("ptxas_report.tsv");

    let Some(nvcc) = find_nvcc()? else {
        println!(
            "cargo:warning=no nvcc found (NVCC, $CUDA_HOME/bin/nvcc, PATH): the CUDA kernels were \
             not compiled and this build has none; install the pinned nvcc with \
             tools/install-nvcc.sh and rebuild with NVCC=\"$(tools/install-nvcc.sh)/nvcc\""
        );
        let _ = fs::remove_file(&report_path);
        return write(&generated, &missing_source());
    };

    let version = nvcc_version(&nvcc)?;
    let targets = chosen_targets()?;
    let image_dir = out_dir.join("kernels");
    let test_image_dir = image_dir.join("emu-tests");
    fs::create_dir_all(&test_image_dir)
        .map_err(|e| format!("creating {}: {e}", test_image_dir.display()))?;
    let test_sources = cu_files(&kernels_dir.join("emu").join("tests"))?;
    let mut files = Vec::new();
    for (list, dir, out, self_test) in [
        (&sources, "kernels", &image_dir, false),
        (&test_sources, "kernels/emu/tests", &test_image_dir, true),
    ] {
        for source in list {
            files.push(Source {
                relative: Path::new(dir).join(format!("{}.cu", stem(source)?)),
                out_dir: out.clone(),
                size: fs::metadata(source).map_or(0, |m| m.len()),
                self_test,
            });
        }
    }
    let tools = Tools::beside(nvcc)?;
    let (tests, compiled): (Vec<Compiled>, Vec<Compiled>) =
        compile_images(&tools, &manifest_dir, &files, &targets)?
            .into_iter()
            .partition(|c| c.self_test);

    let mut rows = Vec::new();
    let mut spills = Vec::new();
    for unit in compiled.iter().chain(&tests) {
        for f in &unit.functions {
            if f.spill_stores > 0 || f.spill_loads > 0 {
                let readable = ptxas::readable_name(&f.symbol);
                let symbol = if readable == f.symbol {
                    String::new()
                } else {
                    format!(" ({})", f.symbol)
                };
                spills.push(format!(
                    "  {} for {}: {} {readable}{symbol}: {} bytes spill stores, {} bytes spill loads",
                    unit.relative.display(),
                    unit.target.name,
                    if f.entry { "kernel" } else { "device function" },
                    f.spill_stores,
                    f.spill_loads
                ));
            }
        }
    }
    for unit in compiled
        .iter()
        .filter(|u| u.target.kind == images::ImageKind::Sass)
    {
        let file = format!("{}.cu", unit.name);
        let mut kernels = ptxas::kernel_rows(&file, unit.target.name, &unit.functions);
        kernels.sort_by(|a, b| a.kernel.cmp(&b.kernel));
        rows.extend(kernels);
    }
    write(&report_path, &ptxas::to_tsv(&rows))?;
    if !spills.is_empty() {
        return Err(format!(
            "register spills in CUDA kernels (the project rule is zero spills, for every \
             architecture; full ptxas output in {}):\n{}\n\
             Reduce live values or tile sizes, or give the kernel more registers with __launch_bounds__.",
            image_dir.display(),
            spills.join("\n")
        ));
    }

    let embed_tests = env::var_os("CARGO_FEATURE_EMU").is_some();
    let tests = if embed_tests { &tests[..] } else { &[] };
    let mut src =
        String::from("// @generated by build.rs: the kernels compiled from kernels/*.cu.\n");
    src += "pub const KERNELS_COMPILED: bool = true;\n";
    src += &format!(
        "pub const NVCC_FLAGS: &str = {:?};\n",
        flags_summary(&targets)
    );
    src += &format!("pub const NVCC_VERSION: &str = {version:?};\n");
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    src += &format!("pub const TARGETS_BUILT: &[&str] = &{names:?};\n");
    src += &format!(
        "pub const TARGETS_FROM_ENV: bool = {};\n",
        env::var_os(images::ARCHS_ENV).is_some()
    );
    src += &format!(
        "pub const PTXAS_REPORT: &str = include_str!({:?});\n",
        path_str(&report_path)?
    );
    src += &embed_modules("MODULES", &compiled)?;
    // The self-test images, for test builds only: searched after MODULES.
    src += &embed_modules("TEST_MODULES", tests)?;
    write(&generated, &src)
}

/// The targets to build: all of them, or those `TRM_CUDA_ARCHS` names.
fn chosen_targets() -> Result<Vec<&'static images::Target>, String> {
    match env::var(images::ARCHS_ENV) {
        Ok(value) => {
            let targets = images::parse_targets(&value)?;
            if targets.len() < images::TARGETS.len() {
                println!(
                    "cargo:warning={}={value}: kernels built for {} only (a developer build; \
                     unset it to build every architecture)",
                    images::ARCHS_ENV,
                    targets
                        .iter()
                        .map(|t| t.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(targets)
        }
        Err(env::VarError::NotPresent) => Ok(images::TARGETS.iter().collect()),
        Err(e) => Err(format!("{}: {e}", images::ARCHS_ENV)),
    }
}

/// `pub static NAME: &[EmbeddedModule]` with every image of `units`
/// (grouped by kernel file, in target order): cubins 16-byte aligned, PTX
/// NUL-terminated (cuModuleLoadData reads PTX as a C string).
fn embed_modules(name: &str, units: &[Compiled]) -> Result<String, String> {
    let mut src = String::new();
    let mut modules: Vec<(&str, Vec<String>)> = Vec::new();
    for (i, unit) in units.iter().enumerate() {
        let path = path_str(&unit.image)?;
        let data = match unit.target.kind {
            images::ImageKind::Sass => {
                src += &format!(
                    "const {name}_{i}: &Aligned<[u8]> = &Aligned(*include_bytes!({path:?}));\n"
                );
                format!("&{name}_{i}.0")
            }
            images::ImageKind::Ptx => {
                format!("concat!(include_str!({path:?}), \"\\0\").as_bytes()")
            }
        };
        let image = format!(
            "EmbeddedImage {{ target: {:?}, data: {data} }}",
            unit.target.name
        );
        match modules.iter_mut().find(|(m, _)| *m == unit.name) {
            Some((_, list)) => list.push(image),
            None => modules.push((&unit.name, vec![image])),
        }
    }
    src += &format!("pub static {name}: &[EmbeddedModule] = &[\n");
    for (module, list) in &modules {
        src += &format!(
            "    EmbeddedModule {{ name: {module:?}, images: &[\n        {},\n    ] }},\n",
            list.join(",\n        ")
        );
    }
    src += "];\n";
    Ok(src)
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn stem(path: &Path) -> Result<String, String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .ok_or_else(|| format!("file name is not UTF-8: {}", path.display()))
}

/// The kernels of each source, as modules named by file stem.
fn parse_modules(sources: &[PathBuf], shown_dir: &str) -> Result<Vec<abigen::Module>, String> {
    sources
        .iter()
        .map(|path| {
            let name = stem(path)?;
            let shown = format!("{shown_dir}/{name}.cu");
            Ok(abigen::Module {
                kernels: abigen::parse_kernels(&read(path)?, &shown)?,
                name,
            })
        })
        .collect()
}

/// Job 1: `OUT_DIR/abi.rs` from `kernels/abi.h` and the kernels of `sources`.
fn generate_abi(
    kernels_dir: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
) -> Result<(Vec<abigen::Struct>, Vec<abigen::Module>), String> {
    let header = kernels_dir.join("abi.h");
    let structs = if header.is_file() {
        abigen::parse_header(&read(&header)?, "kernels/abi.h")?
    } else {
        Vec::new()
    };
    let modules = parse_modules(sources, "kernels")?;
    abigen::check_kernels(&modules, &structs)?;
    let mut src = String::from(
        "// @generated by build.rs (src/backend/cuda/abigen.rs) from kernels/abi.h and kernels/*.cu.\n",
    );
    src += &abigen::rust_structs(&structs, "KernelArgs");
    src += &abigen::rust_kernels(&modules, "Kernel");
    write(&out_dir.join("abi.rs"), &src)?;
    Ok((structs, modules))
}

/// The `.cu` files directly in `dir`, sorted.
fn cu_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    if dir.is_dir() {
        for entry in fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))? {
            let path = entry
                .map_err(|e| format!("reading {}: {e}", dir.display()))?
                .path();
            if path.is_file() && path.extension().is_some_and(|e| e == "cu") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Job 2: the emulator library `trm_emu` and its Rust bindings
/// (`emu_abi.rs`, `emu_entries.rs`, `emu_selftest_abi.rs`).
fn build_emulator(
    kernels_dir: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
    structs: &[abigen::Struct],
    modules: &[abigen::Module],
) -> Result<(), String> {
    let emu_dir = kernels_dir.join("emu");
    let tests_dir = emu_dir.join("tests");
    let launch_structs =
        abigen::parse_header(&read(&emu_dir.join("emu_abi.h"))?, "kernels/emu/emu_abi.h")?;
    let selftest_structs = abigen::parse_header(
        &read(&tests_dir.join("selftest_abi.h"))?,
        "kernels/emu/tests/selftest_abi.h",
    )?;
    let selftest_sources = cu_files(&tests_dir)?;
    let selftest_modules = parse_modules(&selftest_sources, "kernels/emu/tests")?;
    abigen::check_kernels(&selftest_modules, &selftest_structs)?;

    let generated = "// @generated by build.rs (src/backend/cuda/abigen.rs).\n";
    write(
        &out_dir.join("emu_abi.rs"),
        &(generated.to_string() + &abigen::rust_structs(&launch_structs, "KernelArgs")),
    )?;
    write(
        &out_dir.join("emu_selftest_abi.rs"),
        &(generated.to_string()
            + &abigen::rust_structs(&selftest_structs, "KernelArgs")
            + &abigen::rust_kernels(&selftest_modules, "Kernel")),
    )?;
    let all_modules: Vec<abigen::Module> =
        modules.iter().chain(&selftest_modules).cloned().collect();
    write(
        &out_dir.join("emu_entries.rs"),
        &(generated.to_string() + &abigen::rust_entries(&all_modules)),
    )?;
    let all_structs: Vec<abigen::Struct> = structs
        .iter()
        .chain(&launch_structs)
        .chain(&selftest_structs)
        .cloned()
        .collect();
    let entries = out_dir.join("emu_entries.cpp");
    write(
        &entries,
        &abigen::cpp_entries(
            &["abi.h", "emu/emu_abi.h", "emu/tests/selftest_abi.h"],
            &all_structs,
            &all_modules,
        ),
    )?;

    // g++ compiles .cu files as C++ (-x c++) with the CUDA emulation header
    // forced in (-include); kernels/emu is searched first so that
    // <cuda_bf16.h> is the emulator's. Warnings are errors, as for nvcc.
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .define("TRM_EMU", None)
        .include(&emu_dir)
        .include(kernels_dir)
        .flag("-x")
        .flag("c++")
        .flag("-include")
        .flag(
            emu_dir
                .join("cuda_emu.h")
                .to_str()
                .ok_or("kernels path is not UTF-8")?,
        )
        .flag("-fno-strict-aliasing")
        .flag("-Wno-unknown-pragmas")
        .file(emu_dir.join("runtime.cpp"))
        .file(&entries)
        .files(sources)
        .files(&selftest_sources);
    build
        .try_compile("trm_emu")
        .map_err(|e| format!("compiling the CUDA emulator (kernels/*.cu, kernels/emu/) with the host C++ compiler: {e}"))
}

/// Sets `TRM_GIT_COMMIT` for the crate: `$TRM_GIT_COMMIT` when set (a
/// source tree without .git, e.g. a Docker build), else `git rev-parse
/// HEAD`, else "unknown"; never fails the build. No rerun-if-changed on
/// .git: rerunning this script recompiles every kernel, so the commit is
/// the one of the last time it ran (kernels or nvcc environment changed).
fn record_git_commit(manifest_dir: &Path) {
    println!("cargo:rerun-if-env-changed=TRM_GIT_COMMIT");
    let from_env = env::var("TRM_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = from_env.or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(manifest_dir)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
    });
    let commit = commit.unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TRM_GIT_COMMIT={}", commit.trim());
}

/// The generated file of a build without nvcc: embeds nothing.
fn missing_source() -> String {
    "// @generated by build.rs: built without nvcc, no kernels.\n\
     pub const KERNELS_COMPILED: bool = false;\n\
     pub const NVCC_FLAGS: &str = \"\";\n\
     pub const NVCC_VERSION: &str = \"\";\n\
     pub const TARGETS_BUILT: &[&str] = &[];\n\
     pub const TARGETS_FROM_ENV: bool = false;\n\
     pub const PTXAS_REPORT: &str = \"\";\n\
     pub static MODULES: &[EmbeddedModule] = &[];\n\
     pub static TEST_MODULES: &[EmbeddedModule] = &[];\n"
        .to_string()
}

/// `$NVCC` (an error if set but not found), else `$CUDA_HOME/bin/nvcc`, else
/// `nvcc` on `PATH`; `None` when there is none.
fn find_nvcc() -> Result<Option<PathBuf>, String> {
    let exe = format!("nvcc{}", env::consts::EXE_SUFFIX);
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&nvcc);
        if path.components().count() == 1 {
            if let Some(found) = search_path(&path.to_string_lossy()) {
                return Ok(Some(found));
            }
        } else if path.is_file() {
            return Ok(Some(path));
        }
        return Err(format!(
            "NVCC={} is not an nvcc executable; fix it, unset it, or get one with tools/install-nvcc.sh",
            path.display()
        ));
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|v| !v.is_empty()) {
        let path = Path::new(&home).join("bin").join(&exe);
        if path.is_file() {
            return Ok(Some(path));
        }
    }
    Ok(search_path(&exe))
}

fn search_path(exe: &str) -> Option<PathBuf> {
    let paths = env::var_os("PATH")?;
    env::split_paths(&paths)
        .map(|dir| dir.join(exe))
        .find(|p| p.is_file())
}

fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}):\n{}",
            nvcc.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or_else(|| text.lines().last().unwrap_or(""))
        .trim()
        .to_string())
}

/// The compilers: nvcc, and the ptxas beside it (the sm_8x SASS is ptxas
/// run on the compute_80 PTX, so the front end runs once for all of them and
/// the SASS is exactly what the driver's JIT would make of the embedded PTX).
struct Tools {
    nvcc: PathBuf,
    ptxas: PathBuf,
}

impl Tools {
    fn beside(nvcc: PathBuf) -> Result<Tools, String> {
        let ptxas = nvcc.with_file_name(format!("ptxas{}", env::consts::EXE_SUFFIX));
        if !ptxas.is_file() {
            return Err(format!(
                "no ptxas beside {} (expected {}); install the pinned toolkit with tools/install-nvcc.sh",
                nvcc.display(),
                ptxas.display()
            ));
        }
        Ok(Tools { nvcc, ptxas })
    }
}

/// nvcc's arguments for a target it compiles itself.
fn nvcc_target_args(target: &images::Target) -> Vec<String> {
    match target.kind {
        images::ImageKind::Ptx => vec!["-ptx".into(), format!("-arch={}", target.name)],
        images::ImageKind::Sass => vec![
            "-cubin".into(),
            format!("-arch={}", target.name),
            "-Xptxas".into(),
            "-v".into(),
        ],
    }
}

/// ptxas' arguments for SASS made from the PTX: nvcc's choices (`-O3`,
/// `-lineinfo`, warnings as errors) and the `-v` report.
fn ptxas_args(target: &images::Target) -> Vec<String> {
    [
        &format!("-arch={}", target.name),
        "-O3",
        "-lineinfo",
        "--warning-as-error",
        "-v",
    ]
    .map(str::to_string)
    .to_vec()
}

/// Whether `target`'s SASS is made by ptxas from the PTX (same major
/// architecture as the PTX target), rather than by nvcc from the source.
fn from_ptx(target: &images::Target) -> bool {
    let ptx = images::target(images::PTX_TARGET).map(|t| t.capability.0);
    target.kind == images::ImageKind::Sass && Some(target.capability.0) == ptx
}

/// What `NVCC_FLAGS` says: the common flags and each target's command.
fn flags_summary(targets: &[&'static images::Target]) -> String {
    let mut parts = vec![NVCC_FLAGS.join(" ")];
    let ptx_needed = targets.iter().any(|t| from_ptx(t));
    for t in targets
        .iter()
        // The PTX is named with the ptxas step when SASS is made from it.
        .filter(|t| !from_ptx(t) && (!ptx_needed || t.kind != images::ImageKind::Ptx))
    {
        parts.push(nvcc_target_args(t).join(" "));
    }
    let via_ptx: Vec<&str> = targets
        .iter()
        .filter(|t| from_ptx(t))
        .map(|t| t.name)
        .collect();
    if !via_ptx.is_empty() {
        parts.push(format!(
            "ptxas -arch={} -O3 -lineinfo --warning-as-error -v on the -ptx -arch={} output",
            via_ptx.join("|"),
            images::PTX_TARGET
        ));
    }
    parts.join("; ")
}

/// A kernel source to compile.
struct Source {
    /// The path from the crate root, so messages read `kernels/x.cu(12): ...`.
    relative: PathBuf,
    /// Where its images go.
    out_dir: PathBuf,
    /// Bytes, to start the longest compiles first.
    size: u64,
    /// One of the emulator's self-tests (`kernels/emu/tests/`).
    self_test: bool,
}

/// One image of one kernel file.
struct Compiled {
    /// File stem (`cast` for `kernels/cast.cu`).
    name: String,
    /// The source, relative to the crate root.
    relative: PathBuf,
    self_test: bool,
    target: &'static images::Target,
    image: PathBuf,
    /// What ptxas reported (nothing for PTX).
    functions: Vec<ptxas::FunctionResources>,
}

/// Compiles every source for every target, in two parallel rounds: nvcc
/// (the PTX and the targets nvcc builds itself, longest sources first), then
/// ptxas on the PTX. Returns the images of the chosen targets, per source in
/// source order, each in target order.
fn compile_images(
    tools: &Tools,
    manifest_dir: &Path,
    sources: &[Source],
    targets: &[&'static images::Target],
) -> Result<Vec<Compiled>, String> {
    let ptx = images::target(images::PTX_TARGET).ok_or("no PTX target")?;
    let need_ptx = targets
        .iter()
        .any(|t| t.kind == images::ImageKind::Ptx || from_ptx(t));
    let mut first: Vec<(&Source, &'static images::Target)> = Vec::new();
    for source in sources {
        if need_ptx {
            first.push((source, ptx));
        }
        for &t in targets
            .iter()
            .filter(|t| t.kind == images::ImageKind::Sass && !from_ptx(t))
        {
            first.push((source, t));
        }
    }
    first.sort_by_key(|(source, _)| std::cmp::Reverse(source.size));
    let nvcc_out = run_parallel(&first, |&(source, target)| {
        compile_nvcc(tools, manifest_dir, source, target)
    })?;
    let mut second: Vec<(&Compiled, &'static images::Target)> = Vec::new();
    for unit in nvcc_out
        .iter()
        .filter(|u| u.target.kind == images::ImageKind::Ptx)
    {
        for &t in targets.iter().filter(|t| from_ptx(t)) {
            second.push((unit, t));
        }
    }
    let ptxas_out = run_parallel(&second, |&(unit, target)| {
        compile_ptxas(tools, unit, target)
    })?;

    let mut all: Vec<Option<Compiled>> = nvcc_out.into_iter().chain(ptxas_out).map(Some).collect();
    let mut ordered = Vec::new();
    for source in sources {
        for &t in targets {
            let at = all.iter().position(|c| {
                c.as_ref()
                    .is_some_and(|c| c.relative == source.relative && c.target.name == t.name)
            });
            let unit = at.and_then(|i| all[i].take()).ok_or_else(|| {
                format!(
                    "{} for {}: no image was made",
                    source.relative.display(),
                    t.name
                )
            })?;
            ordered.push(unit);
        }
    }
    Ok(ordered)
}

/// Runs `job` on every item with one worker per CPU; the results in item
/// order, or the first failure in item order.
fn run_parallel<J: Sync, R: Send>(
    items: &[J],
    job: impl Fn(&J) -> Result<R, String> + Sync,
) -> Result<Vec<R>, String> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<R, String>>>> =
        items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else {
                    break;
                };
                let result = job(item);
                *results[i].lock().unwrap() = Some(result);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every item was run"))
        .collect()
}

/// Runs a compiler, keeps its output in `log`, and returns the output (an
/// error with the command and the message, without -v's resource lines,
/// when it fails).
fn run_compiler(
    program: &Path,
    args: &[String],
    dir: &Path,
    log: &Path,
    what: &str,
) -> Result<String, String> {
    let out = Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    write(log, &text)?;
    if !out.status.success() {
        let message: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.starts_with("ptxas info") && !l.trim_end().ends_with("bytes spill loads")
            })
            .collect();
        return Err(format!(
            "{} failed to compile {what} ({}):\n{}\n(command: {} {})",
            program
                .file_name()
                .map_or("compiler".into(), |n| n.to_string_lossy()),
            out.status,
            message.join("\n"),
            program.display(),
            args.join(" ")
        ));
    }
    Ok(text)
}

/// nvcc: `source` to `target`'s image (a cubin, or the PTX).
fn compile_nvcc(
    tools: &Tools,
    manifest_dir: &Path,
    source: &Source,
    target: &'static images::Target,
) -> Result<Compiled, String> {
    let name = stem(&source.relative)?;
    let image = source.out_dir.join(target.file_name(&name));
    let mut args: Vec<String> = NVCC_FLAGS.iter().map(|f| f.to_string()).collect();
    args.extend(nvcc_target_args(target));
    args.extend([
        "-I".into(),
        "kernels".into(),
        "-o".into(),
        path_str(&image)?.into(),
    ]);
    args.push(path_str(&source.relative)?.into());
    let log = source.out_dir.join(format!("{name}.{}.log", target.name));
    let what = format!("{} for {}", source.relative.display(), target.name);
    let output = run_compiler(&tools.nvcc, &args, manifest_dir, &log, &what)?;
    Ok(Compiled {
        name,
        relative: source.relative.clone(),
        self_test: source.self_test,
        target,
        image,
        functions: match target.kind {
            images::ImageKind::Sass => ptxas::parse_verbose(&output),
            images::ImageKind::Ptx => Vec::new(),
        },
    })
}

/// ptxas: the PTX of `ptx` to `target`'s cubin.
fn compile_ptxas(
    tools: &Tools,
    ptx: &Compiled,
    target: &'static images::Target,
) -> Result<Compiled, String> {
    let dir = ptx.image.parent().ok_or("PTX file has no folder")?;
    let image = dir.join(target.file_name(&ptx.name));
    let mut args = ptxas_args(target);
    args.extend([
        "-o".into(),
        path_str(&image)?.into(),
        path_str(&ptx.image)?.into(),
    ]);
    let log = dir.join(format!("{}.{}.log", ptx.name, target.name));
    let what = format!(
        "{} for {} (from its PTX)",
        ptx.relative.display(),
        target.name
    );
    let output = run_compiler(&tools.ptxas, &args, dir, &log, &what)?;
    Ok(Compiled {
        name: ptx.name.clone(),
        relative: ptx.relative.clone(),
        self_test: ptx.self_test,
        target,
        image,
        functions: ptxas::parse_verbose(&output),
    })
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("path is not UTF-8: {}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}
