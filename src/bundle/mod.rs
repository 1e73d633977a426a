//! `trm package --bundle DIR`: everything an offline notebook needs to
//! write a submission, in one folder.
//!
//! | file | what |
//! | --- | --- |
//! | `trm` | the binary: this executable, or another build (`--binary`, e.g. `tools/build-portable.sh`'s) |
//! | `model/` | the model folder, verified against its manifest after copying |
//! | `run` | the runner (POSIX sh, [`runner`]): `run [CHALLENGES_JSON [OUT_JSON]] [infer options]` |
//! | `BUNDLE.md` | how to use it in a notebook, and what it needs ([`guide`]) |
//! | `bundle.json` | [`BundleManifest`]: the binary's version and needs (glibc from its ELF file, [`elf`]), the runner's defaults, size and SHA-256 of every file |
//!
//! The folder is written to a temporary sibling and renamed into place; an
//! existing folder is replaced only when it is empty or a bundle.

pub mod elf;
pub mod guide;
pub mod runner;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointError, FileEntry};
use crate::package::{self, FolderKind, ModelPackage, PackageError, SourceInfo};
use elf::{ElfError, ElfNeeds, GlibcVersion};

pub const BUNDLE_MANIFEST: &str = "bundle.json";
pub const BINARY_FILE: &str = "trm";
pub const RUNNER_FILE: &str = "run";
pub const GUIDE_FILE: &str = "BUNDLE.md";
pub const MODEL_DIR: &str = "model";
/// Shared libraries the bundle carries; the runner puts it first on
/// `LD_LIBRARY_PATH`.
pub const LIB_DIR: &str = "lib";
/// Version of the layout and of `bundle.json`.
pub const BUNDLE_FORMAT: u32 = 1;
const BUNDLE_KIND: &str = "trm-bundle";
/// Ubuntu 20.04's glibc: notebook images are at least this new, so a
/// binary needing more gets a warning.
pub const NOTEBOOK_GLIBC: GlibcVersion = GlibcVersion::new(2, 31);

const BUNDLE_FOLDER: FolderKind = FolderKind {
    manifest: BUNDLE_MANIFEST,
    kind: BUNDLE_KIND,
    what: "a trm bundle",
};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("--binary {path}: {what}")]
    Binary { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

type Result<T> = std::result::Result<T, BundleError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the bundle's model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A training checkpoint, packaged as `trm package` does.
    Checkpoint {
        path: PathBuf,
        dataset: Option<PathBuf>,
    },
    /// A model folder made by `trm package`, copied.
    Folder(PathBuf),
}

#[derive(Debug, Clone)]
pub struct BundleOptions {
    pub out: PathBuf,
    pub model: ModelSource,
    /// The binary to bundle; None: the running executable.
    pub binary: Option<PathBuf>,
    /// Shared libraries to carry in `lib/` (e.g. `libcublasLt.so.13`), each
    /// under the name given (a symbolic link is copied as its target's
    /// bytes under the link's name, the name the loader asks for).
    pub libs: Vec<PathBuf>,
}

/// `bundle.json`: the bundled binary as read from its ELF file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryInfo {
    /// Its `--version`: version and commit.
    pub version: String,
    pub machine: String,
    /// The oldest glibc that runs it; None for a static binary.
    pub glibc: Option<String>,
    pub interpreter: Option<String>,
    pub libraries: Vec<String>,
}

/// `bundle.json`: what the runner does with no arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerDefaults {
    pub challenges: String,
    pub out: String,
}

/// `bundle.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub format_version: u32,
    pub kind: String,
    pub binary: BinaryInfo,
    /// `--version` of the trm that wrote the bundle.
    pub packaged_by: String,
    /// Where the model's weights came from.
    pub model: SourceInfo,
    pub runner: RunnerDefaults,
    /// Every other file, by its path in the bundle (`model/config.json`).
    pub files: BTreeMap<String, FileEntry>,
}

/// What `bundle` wrote.
#[derive(Debug, Clone)]
pub struct BundleReport {
    pub out: PathBuf,
    pub manifest: BundleManifest,
    /// Bytes of every file.
    pub total_bytes: u64,
    /// For the user: a binary that needs a newer glibc than notebooks have,
    /// or one that cannot load the CUDA driver.
    pub warnings: Vec<String>,
}

/// What `trm --version` prints after "trm ": the version and the commit.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TRM_GIT_COMMIT"),
    ")"
);

/// `trm --version` of this build.
pub fn version_line() -> String {
    format!("trm {LONG_VERSION}")
}

/// Writes the bundle `opts` describes (module docs).
pub fn bundle(opts: &BundleOptions) -> Result<BundleReport> {
    let binary = match &opts.binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| BundleError::Binary {
            path: PathBuf::from("(this executable)"),
            what: format!("cannot locate the running trm: {e}; give --binary"),
        })?,
    };
    // The binary and the libraries are checked before any work: a wrong
    // one fails fast.
    let needs = elf::read_needs(&binary)?;
    let libs = check_libs(&opts.libs)?;
    let version = binary_version(&binary)?;
    let glibc = needs.glibc().map(|g| g.to_string());
    let warnings = binary_warnings(&needs, &binary);
    let binary_info = BinaryInfo {
        version,
        machine: needs.machine.clone(),
        glibc: glibc.clone(),
        interpreter: needs.interpreter.clone(),
        libraries: needs.libraries.clone(),
    };

    let mut manifest = None;
    package::write_folder(&opts.out, &BUNDLE_FOLDER, |tmp: &Path| -> Result<()> {
        let model_dir = tmp.join(MODEL_DIR);
        match &opts.model {
            ModelSource::Checkpoint { path, dataset } => {
                package::package(path, &model_dir, dataset.as_deref())?;
            }
            ModelSource::Folder(dir) => copy_model(dir, &model_dir)?,
        }
        // Checked against its manifest and parsed whole, as `trm infer`
        // will: a copy that differs, or a model it would refuse, fails now.
        let model = ModelPackage::open(&model_dir)?;
        copy_synced(&binary, &tmp.join(BINARY_FILE))?;
        set_mode(&tmp.join(BINARY_FILE), 0o755)?;
        if !libs.is_empty() {
            let dir = tmp.join(LIB_DIR);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            for (src, name) in &libs {
                copy_synced(src, &dir.join(name))?;
                set_mode(&dir.join(name), 0o755)?;
            }
        }
        let run = tmp.join(RUNNER_FILE);
        package::write_synced(&run, runner::script(glibc.as_deref()).as_bytes())?;
        set_mode(&run, 0o755)?;
        let source = &model.config.source;
        let facts = guide::GuideFacts {
            version: &binary_info.version,
            machine: &binary_info.machine,
            glibc: glibc.as_deref(),
            model: &format!(
                "checkpoint {}, step {}, {} weights",
                source.checkpoint,
                source.step,
                if source.ema { "EMA" } else { "live" }
            ),
        };
        package::write_synced(&tmp.join(GUIDE_FILE), guide::text(&facts).as_bytes())?;

        let m = BundleManifest {
            format_version: BUNDLE_FORMAT,
            kind: BUNDLE_KIND.to_string(),
            binary: binary_info.clone(),
            packaged_by: version_line(),
            model: source.clone(),
            runner: RunnerDefaults {
                challenges: runner::DEFAULT_CHALLENGES.to_string(),
                out: runner::DEFAULT_OUT.to_string(),
            },
            files: hash_tree(tmp)?,
        };
        let mut text = serde_json::to_vec_pretty(&m).expect("the manifest serialises");
        text.push(b'\n');
        package::write_synced(&tmp.join(BUNDLE_MANIFEST), &text)?;
        manifest = Some(m);
        Ok(())
    })?;
    let manifest = manifest.expect("written by the fill above");
    let total_bytes = manifest.files.values().map(|e| e.bytes).sum();
    Ok(BundleReport {
        out: opts.out.clone(),
        manifest,
        total_bytes,
        warnings,
    })
}

/// Reads a bundle's `bundle.json` and checks every file against it.
pub fn verify(dir: &Path) -> Result<BundleManifest> {
    let path = dir.join(BUNDLE_MANIFEST);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let m: BundleManifest = serde_json::from_slice(&bytes).map_err(|e| BundleError::Invalid {
        path: path.clone(),
        what: format!("not a bundle manifest: {e}"),
    })?;
    if m.kind != BUNDLE_KIND || m.format_version != BUNDLE_FORMAT {
        return Err(BundleError::Invalid {
            path,
            what: format!(
                "kind `{}` version {}; this build reads `{BUNDLE_KIND}` version {BUNDLE_FORMAT}",
                m.kind, m.format_version
            ),
        });
    }
    checkpoint::verify_files(dir, &m.files).map_err(|source| BundleError::Checkpoint {
        path: dir.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok(m)
}

/// Each `--lib`: an ELF file, with the name it is carried under; names
/// must differ.
fn check_libs(libs: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    let mut out: Vec<(PathBuf, String)> = Vec::with_capacity(libs.len());
    for lib in libs {
        let invalid = |what: String| BundleError::Invalid {
            path: lib.clone(),
            what,
        };
        let name = lib
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("--lib needs a file with a UTF-8 name".into()))?
            .to_string();
        let meta = fs::metadata(lib).map_err(io_err(lib))?;
        if !meta.is_file() {
            return Err(invalid("--lib is not a file".into()));
        }
        elf::read_needs(lib).map_err(|e| invalid(format!("not a shared library: {e}")))?;
        if out.iter().any(|(_, n)| *n == name) {
            return Err(invalid(format!("a library named {name} is already given")));
        }
        out.push((lib.clone(), name));
    }
    Ok(out)
}

/// The binary's `--version`, which also shows it is a trm that starts here.
fn binary_version(binary: &Path) -> Result<String> {
    let fail = |what: String| BundleError::Binary {
        path: binary.to_path_buf(),
        what,
    };
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !text.starts_with("trm ") {
        return Err(fail(format!(
            "`--version` answered {:?} ({}): not a trm binary that runs on this machine{}",
            text,
            out.status,
            match String::from_utf8_lossy(&out.stderr).trim() {
                "" => String::new(),
                err => format!("; it said: {err}"),
            }
        )));
    }
    Ok(text)
}

fn binary_warnings(needs: &ElfNeeds, binary: &Path) -> Vec<String> {
    let mut w = Vec::new();
    match needs.glibc() {
        Some(g) if g > NOTEBOOK_GLIBC => w.push(format!(
            "warning: {} needs glibc {g}, newer than Ubuntu 20.04's {NOTEBOOK_GLIBC}: older \
             notebook images cannot start it. Build one for glibc 2.17 with \
             tools/build-portable.sh and bundle it with --binary target/portable/trm",
            binary.display()
        )),
        _ => {}
    }
    if needs.is_static() {
        w.push(format!(
            "warning: {} is statically linked: it cannot load the CUDA driver, so the bundle \
             runs on the CPU only",
            binary.display()
        ));
    }
    if needs.machine != "x86_64" {
        w.push(format!(
            "warning: {} is an {} binary; Kaggle notebooks are x86_64",
            binary.display(),
            needs.machine
        ));
    }
    w
}

/// Copies model folder `src`, checked against its manifest first (errors
/// name the user's folder, not the copy), to `dst`: the manifest's files
/// and the manifest.
fn copy_model(src: &Path, dst: &Path) -> Result<()> {
    let manifest = package::verify_folder(src)?;
    fs::create_dir(dst).map_err(io_err(dst))?;
    for name in manifest
        .files
        .keys()
        .map(String::as_str)
        .chain([package::MANIFEST_FILE])
    {
        copy_synced(&src.join(name), &dst.join(name))?;
    }
    Ok(())
}

fn copy_synced(src: &Path, dst: &Path) -> Result<()> {
    fs::copy(src, dst).map_err(io_err(src))?;
    fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dst))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Size and SHA-256 of every file under `root`, by relative path.
fn hash_tree(root: &Path) -> Result<BTreeMap<String, FileEntry>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let dir = root.join(&rel);
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let rel = rel.join(entry.file_name());
            let kind = entry.file_type().map_err(io_err(&entry.path()))?;
            if kind.is_dir() {
                pending.push(rel);
                continue;
            }
            let path = root.join(&rel);
            let hashed =
                checkpoint::hash_file(&path).map_err(|source| BundleError::Checkpoint {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            let name = rel.to_str().ok_or_else(|| BundleError::Invalid {
                path: path.clone(),
                what: "a file name that is not UTF-8".into(),
            })?;
            files.insert(name.to_string(), hashed);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(glibc: &[(u32, u32)], interpreter: bool) -> ElfNeeds {
        ElfNeeds {
            machine: "x86_64".into(),
            interpreter: interpreter.then(|| "/lib64/ld-linux-x86-64.so.2".into()),
            libraries: if interpreter {
                vec!["libc.so.6".into()]
            } else {
                vec![]
            },
            glibc_versions: glibc
                .iter()
                .map(|&(a, b)| GlibcVersion::new(a, b))
                .collect(),
        }
    }

    #[test]
    fn warns_about_a_new_glibc_and_a_static_binary_only() {
        let p = Path::new("trm");
        assert!(binary_warnings(&needs(&[(2, 17), (2, 31)], true), p).is_empty());
        let w = binary_warnings(&needs(&[(2, 17), (2, 34)], true), p);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("glibc 2.34") && w[0].contains("tools/build-portable.sh"));
        let w = binary_warnings(&needs(&[], false), p);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("CPU only"));
    }

    #[test]
    fn the_version_line_is_what_the_cli_prints() {
        let v = version_line();
        assert!(v.starts_with(concat!("trm ", env!("CARGO_PKG_VERSION"), " (commit ")));
    }

    #[test]
    fn hash_tree_names_files_by_relative_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("model")).unwrap();
        fs::write(dir.path().join("model/a.json"), b"{}").unwrap();
        fs::write(dir.path().join("run"), b"#!/bin/sh\n").unwrap();
        let files = hash_tree(dir.path()).unwrap();
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(names, ["model/a.json", "run"]);
        assert_eq!(files["run"].bytes, 10);
        // verify() reads them back through the same names
        checkpoint::verify_files(dir.path(), &files).unwrap();
    }
}
