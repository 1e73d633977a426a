//! `BUNDLE.md`: how to use a bundle in an offline notebook, and what it
//! needs from the machine.

use super::runner::{DEFAULT_CHALLENGES, DEFAULT_OUT};

/// Facts of one bundle that its guide states.
pub struct GuideFacts<'a> {
    /// `trm --version` of the bundled binary.
    pub version: &'a str,
    pub machine: &'a str,
    /// The glibc the binary needs; None for a static binary.
    pub glibc: Option<&'a str>,
    /// Where the weights came from, e.g. "checkpoint run/step_9 (step 9, EMA weights)".
    pub model: &'a str,
}

pub fn text(f: &GuideFacts) -> String {
    let needs = match f.glibc {
        Some(v) => format!(
            "Linux {} with glibc {v} or newer (the highest `GLIBC_` symbol version the \
             binary requires; Ubuntu 20.04 has 2.31, Debian 11 2.31, Ubuntu 22.04 2.35)",
            f.machine
        ),
        None => format!(
            "Linux {} (the binary is static: it cannot load the CUDA driver, so it runs on \
             the CPU only)",
            f.machine
        ),
    };
    format!(
        r#"# trm offline bundle

`{version}` with its model ({model}), ready for an offline notebook: no
Python, no wheels, no network.

## In a Kaggle notebook

1. Upload this folder as a Kaggle dataset (keep its files together) and add
   it to the notebook; the notebook may have its internet turned off.
2. In a cell, with `<dataset>` the dataset's folder name:

       !/kaggle/input/<dataset>/run

   reads `{challenges}` and writes `{out}`.
   Other paths, then any `trm infer` option:

       !/kaggle/input/<dataset>/run CHALLENGES.json OUT.json --device cuda

   If the upload lost the executable bits, run it as `!sh /kaggle/input/<dataset>/run`
   (the runner then copies `trm` to `$TMPDIR` or `/tmp` and runs the copy).
3. `!/kaggle/input/<dataset>/run doctor` prints what `trm` finds: the GPUs and
   whether its kernels run on them, cuBLASLt, the CPU, the engine it picks.

The runner exits with `trm`'s status. A `!` line does not stop the notebook
when that is not 0; to stop it, run
`subprocess.run(["/kaggle/input/<dataset>/run"], check=True)` instead.

## What it needs

- {needs}.
- A GPU is optional. With an NVIDIA driver for CUDA 13.0 or newer (R580+)
  and cuBLASLt (`libcublasLt.so.13`), `trm` runs on every GPU (sm_80 and
  newer: A100, A10, L4, H100...); the runner puts the bundle's own `lib/`
  (libraries bundled with `--lib`) first on `LD_LIBRARY_PATH`, then adds the
  `nvidia/cublas/lib` and `nvidia/cu13/lib` folders of any Python wheels it
  finds (PyTorch's, on notebook images) and `/usr/local/cuda/lib64`. With an
  older driver, or without them, it runs on the CPU (slow at the ARC model's
  size); `run doctor` says which and why.
- `--time-limit 9h` (or any `trm infer` option) after the paths keeps the run
  inside the notebook's limit: fewer augmentations up front if the estimate
  says so, and a whole submission written either way.
- glibc rather than a static musl binary: the CUDA driver (`libcuda.so`) is
  loaded at run time, which a static musl binary cannot do.

## Files

| file | what |
| --- | --- |
| `run` | the runner (POSIX sh) |
| `trm` | the `trm` binary |
| `model/` | the model folder (`trm package`), checked against its `manifest.json` |
| `lib/` | shared libraries carried with `--lib` (if any) |
| `bundle.json` | the binary's version and needs (glibc, libraries), the runner's defaults, the size and SHA-256 of every file |
| `BUNDLE.md` | this file |
"#,
        version = f.version,
        model = f.model,
        challenges = DEFAULT_CHALLENGES,
        out = DEFAULT_OUT,
    )
}
