//! Build script, three jobs:
//! 1. The kernel ABI (always): parses `kernels/abi.h` and the kernel
//!    declarations of `kernels/*.cu` and writes `OUT_DIR/abi.rs`, the Rust
//!    mirror of the argument structs and a typed handle per kernel
//!    (`src/backend/cuda/abigen.rs`, included by `src/backend/cuda/abi.rs`).
//! 2. The CPU emulator (feature `emu`, on for tests): compiles the same
//!    `kernels/*.cu`, the emulator runtime and self-tests under
//!    `kernels/emu/` with the host C++ compiler into the static library
//!    `trm_emu`, plus generated entry points (`src/backend/cuda/emu.rs`).
//! 3. The GPU kernels: compiles every `kernels/*.cu` to an sm_90a cubin with
//!    nvcc, checks ptxas' resource report (zero spills is a project rule), and
//!    writes `OUT_DIR/kernels.rs`, which embeds the cubins and
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

/// nvcc flags for every kernel file:
/// - `-cubin -arch=sm_90a`: SASS for H200 only, with the sm_90a features
///   (wgmma, setmaxnreg); no PTX, so no JIT at load time.
/// - `-O3 -std=c++17`: the optimisation level and language, pinned.
/// - `-lineinfo`: source lines for profilers; no effect on the code.
/// - `-Werror all-warnings`: nvcc makes every warning an error, and passes it on
///   to cicc (`--promote_warnings`) and ptxas (`--warning-as-error`).
/// - `-Xptxas -v`: ptxas prints registers, spills, shared memory and stack per
///   function; build.rs parses it into the report and the spill check.
const NVCC_FLAGS: &[&str] = &[
    "-cubin",
    "-arch=sm_90a",
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "-Werror",
    "all-warnings",
    "-Xptxas",
    "-v",
];

/// Environment that changes what nvcc is found or what it does.
const ENV_INPUTS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "PATH",
    "NVCC_CCBIN",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
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
    let cubin_dir = out_dir.join("kernels");
    fs::create_dir_all(&cubin_dir).map_err(|e| format!("creating {}: {e}", cubin_dir.display()))?;

    let test_cubin_dir = cubin_dir.join("emu-tests");
    fs::create_dir_all(&test_cubin_dir)
        .map_err(|e| format!("creating {}: {e}", test_cubin_dir.display()))?;
    let test_sources = cu_files(&kernels_dir.join("emu").join("tests"))?;
    let mut jobs: Vec<(PathBuf, &Path)> = Vec::new();
    for (list, dir, out) in [
        (&sources, "kernels", cubin_dir.as_path()),
        (&test_sources, "kernels/emu/tests", test_cubin_dir.as_path()),
    ] {
        for source in list {
            jobs.push((Path::new(dir).join(format!("{}.cu", stem(source)?)), out));
        }
    }
    let mut compiled = compile_all(&nvcc, &manifest_dir, &jobs)?;
    let tests = compiled.split_off(sources.len());

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
                    "  {}: {} {readable}{symbol}: {} bytes spill stores, {} bytes spill loads",
                    unit.relative.display(),
                    if f.entry { "kernel" } else { "device function" },
                    f.spill_stores,
                    f.spill_loads
                ));
            }
        }
    }
    for unit in &compiled {
        let file = format!("{}.cu", unit.name);
        let mut kernels = ptxas::kernel_rows(&file, &unit.functions);
        kernels.sort_by(|a, b| a.kernel.cmp(&b.kernel));
        rows.extend(kernels);
    }
    write(&report_path, &ptxas::to_tsv(&rows))?;
    if !spills.is_empty() {
        return Err(format!(
            "register spills in CUDA kernels (the project rule is zero spills; full ptxas output in {}):\n{}\n\
             Reduce live values or tile sizes, or give the kernel more registers with __launch_bounds__.",
            cubin_dir.display(),
            spills.join("\n")
        ));
    }

    let flags = NVCC_FLAGS.join(" ");
    let mut src =
        String::from("// @generated by build.rs: the kernels compiled from kernels/*.cu.\n");
    src += "pub const KERNELS_COMPILED: bool = true;\n";
    src += &format!("pub const NVCC_FLAGS: &str = {flags:?};\n");
    src += &format!("pub const NVCC_VERSION: &str = {version:?};\n");
    src += &format!(
        "pub const PTXAS_REPORT: &str = include_str!({:?});\n",
        path_str(&report_path)?
    );
    for (i, unit) in compiled.iter().enumerate() {
        src += &format!(
            "const CUBIN_{i}: &Aligned<[u8]> = &Aligned(*include_bytes!({:?}));\n",
            path_str(&unit.cubin)?
        );
    }
    src += "pub static MODULES: &[EmbeddedModule] = &[\n";
    for (i, unit) in compiled.iter().enumerate() {
        src += &format!(
            "    EmbeddedModule {{ name: {:?}, cubin: &CUBIN_{i}.0 }},\n",
            unit.name
        );
    }
    src += "];\n";
    // The self-test cubins, for test builds only: searched after MODULES.
    let embed_tests = env::var_os("CARGO_FEATURE_EMU").is_some();
    let tests = if embed_tests { &tests[..] } else { &[] };
    for (i, unit) in tests.iter().enumerate() {
        src += &format!(
            "const TEST_CUBIN_{i}: &Aligned<[u8]> = &Aligned(*include_bytes!({:?}));\n",
            path_str(&unit.cubin)?
        );
    }
    src += "pub static TEST_MODULES: &[EmbeddedModule] = &[\n";
    for (i, unit) in tests.iter().enumerate() {
        src += &format!(
            "    EmbeddedModule {{ name: {:?}, cubin: &TEST_CUBIN_{i}.0 }},\n",
            unit.name
        );
    }
    src += "];\n";
    write(&generated, &src)
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

/// One compiled kernel file.
struct Compiled {
    /// File stem (`cast` for `kernels/cast.cu`).
    name: String,
    /// The source, relative to the crate root.
    relative: PathBuf,
    cubin: PathBuf,
    functions: Vec<ptxas::FunctionResources>,
}

/// Compiles the sources (paths relative to the crate root, each with its
/// cubin folder) in parallel; the first failure (in job order) wins.
fn compile_all(
    nvcc: &Path,
    manifest_dir: &Path,
    sources: &[(PathBuf, &Path)],
) -> Result<Vec<Compiled>, String> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(sources.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Compiled, String>>>> =
        sources.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((source, cubin_dir)) = sources.get(i) else {
                    break;
                };
                let result = compile_one(nvcc, manifest_dir, source, cubin_dir);
                *results[i].lock().unwrap() = Some(result);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every source was compiled"))
        .collect()
}

/// Compiles `relative` (a path from the crate root, so that nvcc's messages
/// read `kernels/x.cu(12): error ...`) into `cubin_dir`.
fn compile_one(
    nvcc: &Path,
    manifest_dir: &Path,
    relative: &Path,
    cubin_dir: &Path,
) -> Result<Compiled, String> {
    let name = stem(relative)?;
    let cubin = cubin_dir.join(format!("{name}.cubin"));
    let out = Command::new(nvcc)
        .current_dir(manifest_dir)
        .args(NVCC_FLAGS)
        .arg("-I")
        .arg("kernels")
        .arg("-o")
        .arg(&cubin)
        .arg(relative)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    write(&cubin_dir.join(format!("{name}.ptxas.txt")), &log)?;
    if !out.status.success() {
        // nvcc's message without the -v resource lines around it.
        let message: Vec<&str> = log
            .lines()
            .filter(|l| {
                !l.starts_with("ptxas info") && !l.trim_end().ends_with("bytes spill loads")
            })
            .collect();
        return Err(format!(
            "nvcc failed to compile {} ({}):\n{}\n(command: {} {} -I kernels -o {} {})",
            relative.display(),
            out.status,
            message.join("\n"),
            nvcc.display(),
            NVCC_FLAGS.join(" "),
            cubin.display(),
            relative.display()
        ));
    }
    Ok(Compiled {
        name,
        relative: relative.to_path_buf(),
        cubin,
        functions: ptxas::parse_verbose(&log),
    })
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("path is not UTF-8: {}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}
