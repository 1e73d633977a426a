//! The CUDA kernel build (build.rs): every `kernels/*.cu` compiled to an
//! embedded image per target (sm_80, sm_86, sm_89 and sm_90a cubins, the
//! compute_80 PTX), every `extern "C"` kernel in the ptxas report once per
//! SASS architecture, zero spills for each; and the ptxas `-v` parser on real
//! ptxas output.
//!
//! `TRM_REQUIRE_KERNELS=1` (set by tools/test.sh) makes a build without
//! kernels a failure, so CI proves that the kernels compile.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use trm::backend::cuda::images::{self, ImageKind};
use trm::backend::cuda::ptxas::{self, FunctionResources};
use trm::backend::cuda::{
    embedded_modules, kernels_compiled, module, ptxas_report, targets_built, CudaError,
};

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

fn kernels_required() -> bool {
    std::env::var("TRM_REQUIRE_KERNELS").is_ok_and(|v| v == "1")
}

/// The `kernels/*.cu` files: (stem, source text), sorted.
fn kernel_sources() -> Vec<(String, String)> {
    let mut sources: Vec<(String, String)> = fs::read_dir(kernels_dir())
        .expect("kernels/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            (stem, fs::read_to_string(&p).unwrap())
        })
        .collect();
    sources.sort();
    sources
}

/// Removes `//` and `/* */` comments (kernel sources have no `//` in strings).
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    loop {
        let line = rest.find("//");
        let block = rest.find("/*");
        let line_first = match (line, block) {
            (Some(l), Some(b)) => l < b,
            (l, _) => l.is_some(),
        };
        match (line, block) {
            (Some(l), _) if line_first => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |e| &rest[l + e..]);
            }
            (_, Some(b)) => {
                out.push_str(&rest[..b]);
                rest = rest[b..].find("*/").map_or("", |e| &rest[b + e + 2..]);
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// Names of the `extern "C"` kernels declared in a .cu source.
fn extern_c_kernels(src: &str) -> Vec<String> {
    let code = strip_comments(src);
    let mut names = Vec::new();
    for (at, _) in code.match_indices("extern \"C\"") {
        let decl = &code[at..];
        let decl = &decl[..decl.find(['{', ';']).unwrap_or(decl.len())];
        if !decl.contains("__global__") {
            continue;
        }
        // Drop `__launch_bounds__(...)`, then the name is the identifier
        // before the parameter list.
        let mut decl = decl.to_string();
        while let Some(lb) = decl.find("__launch_bounds__") {
            let close = decl[lb..].find(')').map_or(decl.len(), |c| lb + c + 1);
            decl.replace_range(lb..close, " ");
        }
        let head = decl[..decl.find('(').expect("kernel has parameters")].trim_end();
        let name = head
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap();
        names.push(name.to_string());
    }
    names
}

#[test]
fn extern_c_kernels_are_found_in_sources() {
    let src = r#"
        // extern "C" __global__ void in_a_comment(float* y);
        /* extern "C" __global__ void in_a_block(float* y); */
        extern "C" __global__ void plain(const float* x, float* y, long n) { }
        extern "C" __global__ void __launch_bounds__(256, 2) bounded(float* y) { }
        extern "C" __device__ float not_a_kernel(float x) { return x; }
        extern "C"
        __global__ void
        split_lines(float* y, long n);
    "#;
    assert_eq!(extern_c_kernels(src), ["plain", "bounded", "split_lines"]);
}

#[test]
fn kernels_compiled_or_clearly_missing() {
    if kernels_compiled() {
        assert!(embedded_modules().is_ok());
        assert!(ptxas_report().is_ok());
        // Every architecture, unless a developer limited the build.
        let all: Vec<&str> = images::TARGETS.iter().map(|t| t.name).collect();
        assert_eq!(all, ["sm_80", "sm_86", "sm_89", "sm_90a", "compute_80"]);
        if trm::backend::cuda::kernels::targets_limited_at_build() {
            assert!(
                !kernels_required(),
                "TRM_REQUIRE_KERNELS=1 but the kernels were built for {:?} only (TRM_CUDA_ARCHS)",
                targets_built()
            );
            assert!(targets_built().iter().all(|t| all.contains(t)));
        } else {
            assert_eq!(targets_built(), all);
        }
        return;
    }
    assert!(
        !kernels_required(),
        "TRM_REQUIRE_KERNELS=1 but this build has no CUDA kernels: build.rs found no nvcc. \
         Run tools/test.sh, or set NVCC=\"$(tools/install-nvcc.sh)/nvcc\"."
    );
    let err = embedded_modules().unwrap_err();
    assert!(matches!(err, CudaError::KernelsMissing));
    let text = err.to_string();
    for needle in [
        "without nvcc",
        "no CUDA kernels",
        "tools/install-nvcc.sh",
        "NVCC=",
    ] {
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
    }
    assert!(matches!(ptxas_report(), Err(CudaError::KernelsMissing)));
    assert!(matches!(module("cast"), Err(CudaError::KernelsMissing)));
    assert!(targets_built().is_empty());
}

#[test]
fn every_kernel_file_is_embedded_for_every_target() {
    let Ok(modules) = embedded_modules() else {
        assert!(
            !kernels_required(),
            "TRM_REQUIRE_KERNELS=1 but the kernels are missing"
        );
        return;
    };
    let embedded: Vec<&str> = modules.iter().map(|m| m.name).collect();
    let sources: Vec<String> = kernel_sources().into_iter().map(|(s, _)| s).collect();
    assert_eq!(embedded, sources, "embedded modules vs kernels/*.cu");
    for m in modules {
        let targets: Vec<&str> = m.images.iter().map(|i| i.target).collect();
        assert_eq!(targets, targets_built(), "{}: images", m.name);
        for image in m.images {
            let at = format!("{} {}", m.name, image.target);
            let kind = images::target(image.target).unwrap().kind;
            match kind {
                ImageKind::Sass => {
                    assert!(image.data.starts_with(b"\x7fELF"), "{at}: not an ELF image");
                    assert_eq!(
                        image.data.as_ptr() as usize % 16,
                        0,
                        "{at}: not 16-byte aligned"
                    );
                }
                ImageKind::Ptx => {
                    // cuModuleLoadData reads PTX up to its first NUL.
                    let nul = image.data.iter().position(|&b| b == 0);
                    assert_eq!(nul, Some(image.data.len() - 1), "{at}: not one final NUL");
                    let text = std::str::from_utf8(image.data).unwrap();
                    assert!(text.contains(".target sm_80"), "{at}: not compute_80 PTX");
                    assert!(text.contains(".visible .entry"), "{at}: no kernel");
                }
            }
            assert!(m.image(image.target).is_some());
        }
        assert_eq!(module(m.name).unwrap().name, m.name);
        assert!(m.image("sm_75").is_none());
    }
    let err = module("no_such_family").unwrap_err();
    assert!(err.to_string().contains("cast"), "{err}");
}

#[test]
fn every_extern_c_kernel_is_in_the_report_without_spills() {
    let Ok(report) = ptxas_report() else {
        assert!(
            !kernels_required(),
            "TRM_REQUIRE_KERNELS=1 but the kernels are missing"
        );
        return;
    };
    // One row per kernel and SASS architecture (the PTX has no ptxas run).
    let sass: Vec<&str> = targets_built()
        .iter()
        .copied()
        .filter(|t| images::target(t).unwrap().kind == ImageKind::Sass)
        .collect();
    assert!(!sass.is_empty());
    for (stem, src) in kernel_sources() {
        let file = format!("{stem}.cu");
        let declared = extern_c_kernels(&src);
        assert!(
            !declared.is_empty(),
            "kernels/{file} declares no extern \"C\" kernel"
        );
        for name in declared {
            for arch in &sass {
                let row = report
                    .iter()
                    .find(|r| r.kernel == name && r.arch == *arch)
                    .unwrap_or_else(|| {
                        panic!(
                            "kernel {name} of kernels/{file} has no {arch} row in the ptxas report"
                        )
                    });
                assert_eq!(row.file, file, "{name}");
                assert_eq!(row.name, name, "extern \"C\" names read as themselves");
            }
        }
    }
    for row in &report {
        assert_eq!(
            (row.spill_stores, row.spill_loads),
            (0, 0),
            "kernel {} in kernels/{} spills on {}",
            row.name,
            row.file,
            row.arch
        );
        assert!(row.registers > 0 && row.registers <= 255, "{row:?}");
        assert!(sass.contains(&row.arch.as_str()), "{row:?}");
    }
    let kernels: BTreeSet<(&str, &str)> = report
        .iter()
        .map(|r| (r.arch.as_str(), r.kernel.as_str()))
        .collect();
    assert_eq!(
        kernels.len(),
        report.len(),
        "kernel names are unique across files, per architecture"
    );
    assert_eq!(
        report.len() % sass.len(),
        0,
        "as many rows per architecture"
    );
}

/// `tests/data/ptxas_v_sm90a.txt` is real output of CUDA 13.0's ptxas for
/// `tests/data/ptxas_probe.cu` (command in that file).
fn sample() -> Vec<FunctionResources> {
    ptxas::parse_verbose(include_str!("data/ptxas_v_sm90a.txt"))
}

fn find<'a>(functions: &'a [FunctionResources], symbol: &str) -> &'a FunctionResources {
    functions
        .iter()
        .find(|f| f.symbol == symbol)
        .unwrap_or_else(|| panic!("{symbol} not parsed"))
}

#[test]
fn parser_reads_every_function_of_real_ptxas_output() {
    let functions = sample();
    let symbols: Vec<&str> = functions.iter().map(|f| f.symbol.as_str()).collect();
    assert_eq!(
        symbols,
        [
            "_ZN3trm16row_gather_probeILi256EEEvPKfPfi",
            "_Z10bf16_probePK13__nv_bfloat16PS_l",
            "calls_gather_probe",
            "_Z12gather_probePKfi",
            "spill_probe",
            "_Z18dynamic_smem_probePfl",
        ]
    );
    let entries = functions.iter().filter(|f| f.entry).count();
    assert_eq!(entries, 5);
}

#[test]
fn parser_reads_registers_smem_stack_and_spills() {
    let functions = sample();
    let row_gather = find(&functions, "_ZN3trm16row_gather_probeILi256EEEvPKfPfi");
    assert_eq!(
        row_gather,
        &FunctionResources {
            symbol: "_ZN3trm16row_gather_probeILi256EEEvPKfPfi".to_string(),
            entry: true,
            registers: Some(32),
            barriers: 1,
            stack_frame: 256,
            spill_stores: 0,
            spill_loads: 0,
            shared_bytes: 1024,
            cumulative_stack: 256,
        }
    );
    let spill = find(&functions, "spill_probe");
    assert!(spill.entry);
    assert_eq!((spill.spill_stores, spill.spill_loads), (324, 324));
    assert_eq!((spill.stack_frame, spill.registers), (168, Some(32)));

    let bf16 = find(&functions, "_Z10bf16_probePK13__nv_bfloat16PS_l");
    assert_eq!(
        (bf16.registers, bf16.shared_bytes, bf16.stack_frame),
        (Some(8), 0, 0)
    );

    // Dynamic shared memory is not in ptxas' report.
    let dynamic = find(&functions, "_Z18dynamic_smem_probePfl");
    assert_eq!(
        (dynamic.registers, dynamic.barriers, dynamic.shared_bytes),
        (Some(10), 1, 0)
    );

    // A separate device function: properties but no register line.
    let helper = find(&functions, "_Z12gather_probePKfi");
    assert!(!helper.entry);
    assert_eq!(helper.registers, None);
    let caller = find(&functions, "calls_gather_probe");
    assert_eq!((caller.stack_frame, caller.cumulative_stack), (128, 128));
}

#[test]
fn report_rows_from_real_ptxas_output() {
    let rows = ptxas::kernel_rows("probe.cu", "sm_90a", &sample());
    assert_eq!(rows.len(), 5, "entries only");
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "trm::row_gather_probe<256>",
            "bf16_probe",
            "calls_gather_probe",
            "spill_probe",
            "dynamic_smem_probe",
        ]
    );
    assert!(rows
        .iter()
        .all(|r| r.file == "probe.cu" && r.arch == "sm_90a"));
    let tsv = ptxas::to_tsv(&rows);
    assert!(tsv.starts_with(
        "kernel\tname\tfile\tarch\tregisters\tspill_stores\tspill_loads\tshared_bytes\tstack_frame\n"
    ));
    assert_eq!(ptxas::parse_tsv(&tsv).unwrap(), rows);
}

#[test]
fn parser_ignores_diagnostics_and_noise() {
    let text = "\
kernels/x.cu(3): warning #177-D: variable \"k\" was declared but never referenced
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 1.000 ms
ptxas error   : Entry function 'k2' uses too much shared data
";
    let functions = ptxas::parse_verbose(text);
    assert_eq!(functions.len(), 1);
    let k1 = &functions[0];
    assert_eq!(
        (
            k1.registers,
            k1.shared_bytes,
            k1.stack_frame,
            k1.spill_stores,
            k1.spill_loads
        ),
        (Some(64), 2048, 8, 4, 12)
    );
    assert!(ptxas::parse_verbose("").is_empty());
}
