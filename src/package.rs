//! `trm package`: a training checkpoint -> a self-contained model folder for
//! `trm infer`.
//!
//! | file | what |
//! | --- | --- |
//! | `model.safetensors` | the weights evaluation uses (the EMA shadow when the run had EMA, with the live puzzle-embedding table), reference state-dict names, f32 |
//! | `config.json` | [`PackageConfig`]: the network, how the dataset was built (seed, augmentations, canvas), the identifier count, `pass_Ks`, the batch size and the training config |
//! | `identifiers.json` | the dataset's: puzzle id -> (augmented) puzzle name, the rows of the embedding table |
//! | `manifest.json` | byte size and SHA-256 of the three files above |
//!
//! The folder is written to a temporary sibling and renamed into place; an
//! existing folder is replaced only when it is empty or a model folder.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint::{self, CheckpointError, FileEntry};
use crate::config::{ConfigSource, RunConfig};
use crate::data::builder::{BuildReport, BUILD_INFO_FILE};
use crate::data::metadata::DatasetMetadata;
use crate::model::config::ArchConfig;
use crate::model::safetensors_io::{load_tensors, save_tensors, FloatDtype, SafetensorsError};
use crate::model::weights::Weights;

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const IDENTIFIERS_FILE: &str = "identifiers.json";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Files a model folder must have besides its manifest.
const PACKAGE_FILES: [&str; 3] = [MODEL_FILE, CONFIG_FILE, IDENTIFIERS_FILE];
/// Version of the folder layout and `config.json` written here.
pub const PACKAGE_FORMAT: u32 = 1;
/// `kind` of the manifest: tells a model folder from other folders.
const PACKAGE_KIND: &str = "trm-model";

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(transparent)]
    Dataset(#[from] crate::dataset_ref::DatasetRefError),
    #[error("checkpoint {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error("model folder {dir} failed its integrity check: {source}")]
    Integrity {
        dir: PathBuf,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: unsupported model config: {source}")]
    Arch {
        path: PathBuf,
        #[source]
        source: crate::model::config::ConfigError,
    },
    #[error("training config of {path}: {source}")]
    RunConfig {
        path: PathBuf,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        #[source]
        source: crate::model::weights::WeightsError,
    },
    #[error("{path}: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: SafetensorsError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is neither empty nor {what}; refusing to replace it (choose another folder or remove it)")]
    NotReplaceable { path: PathBuf, what: &'static str },
}

type Result<T> = std::result::Result<T, PackageError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, what: impl Into<String>) -> PackageError {
    PackageError::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// How the dataset the model was trained on was built: what `trm infer`
/// needs to rebuild the same augmented puzzles from a challenges file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    /// The builder's seed (augmentation streams per puzzle).
    pub seed: u64,
    /// Augmentations per puzzle the model was trained with.
    pub num_aug: usize,
    /// Side of the square token canvas (seq_len = side^2).
    pub canvas_side: usize,
    /// Identifiers below this are blanks (`<blank>` in identifiers.json).
    pub puzzle_identifiers_start: u32,
    /// The id of padding rows and of puzzles without an embedding.
    pub blank_identifier_id: i64,
    /// Rows of the puzzle-embedding table (= names in identifiers.json).
    pub num_puzzle_identifiers: usize,
}

/// Where the weights came from (informational).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub checkpoint: String,
    pub step: u64,
    /// Whether `model.safetensors` holds the EMA shadow.
    pub ema: bool,
}

/// `config.json` of a model folder. Unknown keys are refused, naming them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageConfig {
    pub format_version: u32,
    /// The network (the reference's `arch` keys plus the dataset fields).
    /// Kept as JSON here and parsed by [`ArchConfig::from_json_str`], so
    /// its errors name the key.
    pub arch: Value,
    pub dataset: DatasetInfo,
    #[serde(rename = "pass_Ks")]
    pub pass_ks: Vec<usize>,
    /// The training run's global batch size: the default inference batch
    /// (the same batches as the training-time evaluation).
    pub global_batch_size: usize,
    /// The run config (YAML) the checkpoint was trained with; `--fit-steps`
    /// takes its optimiser settings from it.
    pub training_config: String,
    pub source: SourceInfo,
}

/// `manifest.json` of a model folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageManifest {
    pub format_version: u32,
    pub kind: String,
    pub files: BTreeMap<String, FileEntry>,
}

/// A verified, parsed model folder.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    pub dir: PathBuf,
    pub config: PackageConfig,
    pub arch: ArchConfig,
    pub weights: Weights,
    /// Puzzle id -> name, as the dataset's identifiers.json.
    pub identifiers: Vec<String>,
}

impl ModelPackage {
    /// Verifies every file against the manifest (a missing or altered file
    /// is named), then parses the config, identifiers and weights.
    pub fn open(dir: &Path) -> Result<ModelPackage> {
        verify_folder(dir)?;

        let config_path = dir.join(CONFIG_FILE);
        let config: PackageConfig = read_json(&config_path)?;
        if config.format_version != PACKAGE_FORMAT {
            return Err(invalid(
                &config_path,
                format!(
                    "format version {}; this build reads version {PACKAGE_FORMAT}",
                    config.format_version
                ),
            ));
        }
        let arch = parse_arch(&config, &config_path)?;
        let d = &config.dataset;
        if !(1..=crate::data::grid::MAX_SIDE).contains(&d.canvas_side)
            || d.canvas_side * d.canvas_side != arch.seq_len
        {
            return Err(invalid(
                &config_path,
                format!(
                    "dataset.canvas_side {} does not give arch.seq_len {} (side^2, side 1..=30)",
                    d.canvas_side, arch.seq_len
                ),
            ));
        }
        if d.num_puzzle_identifiers != arch.num_puzzle_identifiers {
            return Err(invalid(
                &config_path,
                format!(
                    "dataset.num_puzzle_identifiers {} differs from arch.num_puzzle_identifiers {}",
                    d.num_puzzle_identifiers, arch.num_puzzle_identifiers
                ),
            ));
        }
        if config.global_batch_size == 0 || config.pass_ks.contains(&0) {
            return Err(invalid(
                &config_path,
                "global_batch_size and every pass_Ks entry must be at least 1",
            ));
        }

        let ids_path = dir.join(IDENTIFIERS_FILE);
        let identifiers: Vec<String> = read_json(&ids_path)?;
        if identifiers.len() != arch.num_puzzle_identifiers {
            return Err(invalid(
                &ids_path,
                format!(
                    "{} names for a table of {} rows",
                    identifiers.len(),
                    arch.num_puzzle_identifiers
                ),
            ));
        }

        let model_path = dir.join(MODEL_FILE);
        let map = load_tensors(&model_path).map_err(|source| PackageError::Safetensors {
            path: model_path.clone(),
            source,
        })?;
        let weights =
            Weights::from_state_dict(&arch, map).map_err(|source| PackageError::Weights {
                path: model_path.clone(),
                source,
            })?;
        Ok(ModelPackage {
            dir: dir.to_path_buf(),
            config,
            arch,
            weights,
            identifiers,
        })
    }

    /// The training run's config, for `--fit-steps`.
    pub fn training_config(&self) -> Result<RunConfig> {
        let path = self.dir.join(CONFIG_FILE);
        RunConfig::load(
            ConfigSource::Text {
                origin: format!("{} (training_config)", path.display()),
                text: self.config.training_config.clone(),
            },
            &[],
        )
        .map_err(|source| PackageError::RunConfig { path, source })
    }
}

/// Checks that `dir` is a model folder whose files match its manifest (a
/// missing or altered file is named); returns the manifest.
pub fn verify_folder(dir: &Path) -> Result<PackageManifest> {
    if !dir.is_dir() {
        return Err(invalid(dir, "no such model folder"));
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.is_file() {
        return Err(invalid(
            &manifest_path,
            "is missing: not a model folder (make one with `trm package`)",
        ));
    }
    let manifest: PackageManifest = read_json(&manifest_path)?;
    if manifest.kind != PACKAGE_KIND || manifest.format_version != PACKAGE_FORMAT {
        return Err(invalid(
            &manifest_path,
            format!(
                "kind `{}` version {}; this build reads `{PACKAGE_KIND}` version {PACKAGE_FORMAT}",
                manifest.kind, manifest.format_version
            ),
        ));
    }
    for name in PACKAGE_FILES {
        if !manifest.files.contains_key(name) {
            return Err(invalid(
                &manifest_path,
                format!("no entry for required file `{name}`"),
            ));
        }
    }
    if let Some(name) = manifest
        .files
        .keys()
        .find(|n| !PACKAGE_FILES.contains(&n.as_str()))
    {
        return Err(invalid(
            &manifest_path,
            format!("unexpected entry `{name}`"),
        ));
    }
    checkpoint::verify_files(dir, &manifest.files).map_err(|source| PackageError::Integrity {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok(manifest)
}

/// The network of a package config, checked to be one this engine runs.
fn parse_arch(config: &PackageConfig, path: &Path) -> Result<ArchConfig> {
    let arch_err = |source| PackageError::Arch {
        path: path.to_path_buf(),
        source,
    };
    let arch = ArchConfig::from_json_str(&config.arch.to_string(), path).map_err(arch_err)?;
    arch.validate_supported().map_err(arch_err)?;
    if !arch.has_puzzle_emb() {
        return Err(invalid(
            path,
            "the network has no puzzle embedding (puzzle_emb_ndim 0); `trm infer` needs one",
        ));
    }
    Ok(arch)
}

/// Reads a JSON file of the model folder: text that is no JSON is
/// "malformed", JSON of the wrong shape (an unknown key, a missing one, a
/// wrong type) is named as such.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            invalid(path, "is missing")
        } else {
            io_err(path)(e)
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|source| {
        if source.classify() == serde_json::error::Category::Data {
            invalid(path, format!("unsupported or invalid content: {source}"))
        } else {
            PackageError::Json {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// What `trm package` wrote.
#[derive(Debug, Clone)]
pub struct PackageReport {
    pub out: PathBuf,
    pub step: u64,
    pub ema: bool,
    pub num_puzzle_identifiers: usize,
    pub dataset: PathBuf,
}

/// Packages checkpoint folder `checkpoint` into `out`. The dataset it was
/// trained on (for identifiers.json and the build options) is the run
/// config's, unless `dataset` names it.
pub fn package(checkpoint: &Path, out: &Path, dataset: Option<&Path>) -> Result<PackageReport> {
    let ck_err = |source| PackageError::Checkpoint {
        path: checkpoint.to_path_buf(),
        source: Box::new(source),
    };
    // Verifies every file against the checkpoint's manifest first.
    let c = checkpoint::load(checkpoint).map_err(ck_err)?;
    let state_path = checkpoint.join(checkpoint::STATE_FILE);
    let cfg = RunConfig::load(
        ConfigSource::Text {
            origin: format!("{} (config)", state_path.display()),
            text: c.state.config.clone(),
        },
        &[],
    )
    .map_err(|source| PackageError::RunConfig {
        path: state_path.clone(),
        source,
    })?;

    // The puzzle table's rows are the training dataset's identifiers.
    if dataset.is_none() && cfg.data_paths.len() != 1 {
        return Err(invalid(
            &state_path,
            "the run trained on several datasets; name the one to package with --dataset",
        ));
    }
    let recorded = crate::dataset_ref::recorded(&c.state.extra);
    let typed = cfg.data_paths.first().cloned().unwrap_or_default();
    let data_dir = crate::dataset_ref::resolve(
        &typed,
        recorded.first().filter(|_| cfg.data_paths.len() == 1),
        dataset,
    )?;
    let build_path = data_dir.join(BUILD_INFO_FILE);
    if !build_path.is_file() {
        return Err(invalid(
            &build_path,
            "is missing: the dataset must be one built by `trm build-dataset` (its build options are what \
             `trm infer` rebuilds the augmentations from); give its folder with --dataset",
        ));
    }
    let build: BuildReport = read_json(&build_path)?;
    let meta_path = data_dir.join("train").join("dataset.json");
    let meta = DatasetMetadata::load(&meta_path).map_err(|e| invalid(&meta_path, e.to_string()))?;
    let arch = cfg
        .arch_for_dataset(meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers)
        .map_err(|source| PackageError::RunConfig {
            path: state_path.clone(),
            source,
        })?;

    // The weights evaluation uses: EMA shadow over the live weights, with
    // the live puzzle table (the shadow does not cover it).
    let ema = c.ema.is_some();
    let mut map = c.model;
    map.extend(c.puzzle_emb);
    if let Some(shadow) = c.ema {
        map.extend(shadow);
    }
    let weights = Weights::from_tensors(&arch, map).map_err(|source| PackageError::Weights {
        path: checkpoint.to_path_buf(),
        source,
    })?;

    let ids_src = data_dir.join(IDENTIFIERS_FILE);
    let ids_bytes = fs::read(&ids_src).map_err(io_err(&ids_src))?;
    let names: Vec<String> =
        serde_json::from_slice(&ids_bytes).map_err(|source| PackageError::Json {
            path: ids_src.clone(),
            source,
        })?;
    if names.len() != arch.num_puzzle_identifiers {
        return Err(invalid(
            &ids_src,
            format!(
                "{} names, but the model's puzzle table has {} rows (a different dataset?)",
                names.len(),
                arch.num_puzzle_identifiers
            ),
        ));
    }

    let config = PackageConfig {
        format_version: PACKAGE_FORMAT,
        arch: serde_json::to_value(&arch).expect("ArchConfig serialises"),
        dataset: DatasetInfo {
            seed: build.options.seed,
            num_aug: build.options.num_aug,
            canvas_side: build.options.canvas_side,
            puzzle_identifiers_start: build.options.puzzle_identifiers_start,
            blank_identifier_id: meta.blank_identifier_id,
            num_puzzle_identifiers: arch.num_puzzle_identifiers,
        },
        pass_ks: crate::train::arc_pass_ks(&cfg)
            .into_iter()
            .next()
            .unwrap_or_else(|| crate::eval::DEFAULT_PASS_KS.to_vec()),
        global_batch_size: cfg.global_batch_size,
        training_config: c.state.config.clone(),
        source: SourceInfo {
            checkpoint: checkpoint.display().to_string(),
            step: c.state.step,
            ema,
        },
    };

    write_folder(out, &MODEL_FOLDER, |tmp| {
        let model_path = tmp.join(MODEL_FILE);
        save_tensors(&model_path, &weights.to_state_dict(""), FloatDtype::F32).map_err(
            |source| PackageError::Safetensors {
                path: model_path.clone(),
                source,
            },
        )?;
        let mut text = serde_json::to_vec_pretty(&config).expect("config serialises");
        text.push(b'\n');
        write_synced(&tmp.join(CONFIG_FILE), &text)?;
        write_synced(&tmp.join(IDENTIFIERS_FILE), &ids_bytes)?;
        let mut files = BTreeMap::new();
        for name in PACKAGE_FILES {
            let p = tmp.join(name);
            let entry = checkpoint::hash_file(&p).map_err(|source| PackageError::Checkpoint {
                path: p.clone(),
                source: Box::new(source),
            })?;
            files.insert(name.to_string(), entry);
        }
        let manifest = PackageManifest {
            format_version: PACKAGE_FORMAT,
            kind: PACKAGE_KIND.to_string(),
            files,
        };
        let mut text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        text.push(b'\n');
        write_synced(&tmp.join(MANIFEST_FILE), &text)
    })?;
    Ok(PackageReport {
        out: out.to_path_buf(),
        step: c.state.step,
        ema,
        num_puzzle_identifiers: arch.num_puzzle_identifiers,
        dataset: data_dir,
    })
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) {
    // Durability of the renames; a failure here loses nothing already written.
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// A kind of folder this crate writes whole: recognised by the `kind` of
/// the JSON manifest it holds, so that only such a folder is replaced.
pub(crate) struct FolderKind {
    pub manifest: &'static str,
    pub kind: &'static str,
    /// For the refusal: "a model folder".
    pub what: &'static str,
}

pub(crate) const MODEL_FOLDER: FolderKind = FolderKind {
    manifest: MANIFEST_FILE,
    kind: PACKAGE_KIND,
    what: "a model folder",
};

/// Whether `dir` may be replaced: it is empty, or a folder of `kind`.
fn replaceable(dir: &Path, kind: &FolderKind) -> Result<bool> {
    let mut entries = fs::read_dir(dir).map_err(io_err(dir))?;
    if entries.next().is_none() {
        return Ok(true);
    }
    let manifest = dir.join(kind.manifest);
    Ok(fs::read(&manifest)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|m| m["kind"] == kind.kind))
}

/// Fills a temporary sibling of `out` with `fill`, then renames it to `out`
/// (an old folder of the same kind there is moved aside first and removed
/// after; any other non-empty folder is refused).
pub(crate) fn write_folder<E: From<PackageError>>(
    out: &Path,
    kind: &FolderKind,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let name = out
        .file_name()
        .ok_or_else(|| invalid(out, "has no folder name"))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if out.exists() && (!out.is_dir() || !replaceable(out, kind)?) {
        return Err(PackageError::NotReplaceable {
            path: out.to_path_buf(),
            what: kind.what,
        }
        .into());
    }
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp);
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{pid}"));
        fs::rename(out, &old).map_err(io_err(out))?;
        fs::rename(&tmp, out).map_err(io_err(out))?;
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        fs::rename(&tmp, out).map_err(io_err(out))?;
    }
    sync_dir(&parent);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_empty_or_model_folders_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        // absent: created
        write_folder(&out, &MODEL_FOLDER, |d| write_synced(&d.join("a"), b"1")).unwrap();
        assert_eq!(fs::read(out.join("a")).unwrap(), b"1");
        // a folder with other files: refused, left alone
        let e =
            write_folder(&out, &MODEL_FOLDER, |d| write_synced(&d.join("b"), b"2")).unwrap_err();
        assert!(matches!(e, PackageError::NotReplaceable { .. }), "{e}");
        assert_eq!(fs::read(out.join("a")).unwrap(), b"1");
        // a model folder: replaced whole
        let manifest = PackageManifest {
            format_version: PACKAGE_FORMAT,
            kind: PACKAGE_KIND.into(),
            files: BTreeMap::new(),
        };
        fs::write(
            out.join(MANIFEST_FILE),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        // (the replacement below is itself a model folder)
        let write_model = |d: &Path| {
            write_synced(&d.join("b"), b"2")?;
            write_synced(
                &d.join(MANIFEST_FILE),
                &serde_json::to_vec(&manifest).unwrap(),
            )
        };
        write_folder(&out, &MODEL_FOLDER, write_model).unwrap();
        assert!(!out.join("a").exists());
        assert_eq!(fs::read(out.join("b")).unwrap(), b"2");
        // a failed fill leaves the old folder and no temporary behind
        let e = write_folder(&out, &MODEL_FOLDER, |_| {
            Err(invalid(Path::new("x"), "boom"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("boom"));
        assert_eq!(fs::read(out.join("b")).unwrap(), b"2");
        let names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["m".to_string()]);
        // an empty folder is fine
        let empty = tmp.path().join("e");
        fs::create_dir(&empty).unwrap();
        write_folder(&empty, &MODEL_FOLDER, |d| write_synced(&d.join("c"), b"3")).unwrap();
        assert_eq!(fs::read(empty.join("c")).unwrap(), b"3");
    }
}
