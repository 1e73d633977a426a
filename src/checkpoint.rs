//! Full-state training checkpoints: one folder per step, written atomically,
//! verified on load, pruned by step number.
//!
//! Layout of `ROOT/step_N/`:
//!
//! | file | what |
//! | --- | --- |
//! | `model.safetensors` | weights, reference names, f32 |
//! | `ema.safetensors` | EMA shadow of the weights (only when EMA is on) |
//! | `optim.safetensors` | optimiser state, by convention `m.<name>` / `v.<name>` (see [`pack_adam`]) |
//! | `puzzle_emb.safetensors` | the puzzle embedding table (and its optimiser state if the caller adds it) |
//! | `carry.safetensors` | the ACT carry of the global batch's slots in global slot order, whatever the world size (optional; needed for a bit-exact resume) |
//! | `state.json` | [`TrainState`] plus `format_version` |
//! | `manifest.json` | byte size and SHA-256 of every file above |
//!
//! Unlike the reference (one `torch.save` of the weights only), a checkpoint
//! holds everything needed to resume bit-exactly, and a damaged or partial
//! one is refused with the name of the bad file instead of being half loaded.
//!
//! Atomicity: everything is written into `step_N.tmp-<pid>/` (each file
//! fsynced, then the folder), which is renamed to `step_N/`, then the parent
//! is fsynced. A crash at any point leaves either the old set of checkpoints
//! or the new one; leftovers are ignored by [`latest`] and cleaned up by the
//! next save. One writer per checkpoint root is assumed (rank 0 saves).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::safetensors_io::{load_tensors, save_tensors, FloatDtype, SafetensorsError};
use crate::tensor::Tensor;

/// Version of the folder layout and `state.json` schema written here.
pub const FORMAT_VERSION: u32 = 1;

pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const CARRY_FILE: &str = "carry.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const PUZZLE_EMB_FILE: &str = "puzzle_emb.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const MANIFEST_FILE: &str = "manifest.json";

/// Files every checkpoint must have (besides the manifest itself).
const REQUIRED_FILES: [&str; 4] = [MODEL_FILE, OPTIM_FILE, PUZZLE_EMB_FILE, STATE_FILE];

const STEP_PREFIX: &str = "step_";
const TMP_MARK: &str = ".tmp-";
const OLD_MARK: &str = ".old-";

/// A checkpoint that cannot be written, found or trusted.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint folder {path} does not exist")]
    MissingFolder { path: PathBuf },
    #[error("no checkpoint (step_N folder) found in {root}")]
    NoCheckpoint { root: PathBuf },
    #[error("file {path} is missing")]
    MissingFile { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint file {path} is corrupt or truncated: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: SafetensorsError,
    },
    #[error("file {path} has {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("file {path} has SHA-256 {actual}, the manifest says {expected} (altered or damaged)")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("{path} is not valid JSON for a checkpoint: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("tensor `{name}` is in both {first} and {second}")]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path} is neither a checkpoint folder nor a .safetensors file")]
    NotWeights { path: PathBuf },
}

type Result<T> = std::result::Result<T, CheckpointError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The non-tensor part of the training state, stored as `state.json`.
///
/// RNG and loader states are opaque JSON so that this module does not depend
/// on how they are represented (e.g. [`crate::data::loader::LoaderState`]
/// serialised with serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Training step the checkpoint was taken after; names the folder.
    pub step: u64,
    /// Optimiser update count (Adam bias correction depends on it).
    pub optimizer_steps: u64,
    /// RNG states (seeds, stream positions), opaque to this module.
    #[serde(default)]
    pub rng: serde_json::Value,
    /// Data-loader position, opaque to this module.
    #[serde(default)]
    pub loader: serde_json::Value,
    /// The resolved run config as text (YAML or JSON).
    #[serde(default)]
    pub config: String,
    /// Anything else the trainer wants back (best metric, world size, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// `state.json` on disk: the state plus the format version, checked first.
#[derive(Serialize)]
struct StateFileOut<'a> {
    format_version: u32,
    #[serde(flatten)]
    state: &'a TrainState,
}

/// Everything a checkpoint holds. Tensor maps are keyed by name; float data
/// is stored as f32, so a save/load round trip is bit-exact.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointContents {
    pub model: BTreeMap<String, Tensor>,
    pub ema: Option<BTreeMap<String, Tensor>>,
    pub optim: BTreeMap<String, Tensor>,
    pub puzzle_emb: BTreeMap<String, Tensor>,
    /// The trainer's ACT carry (hidden states, step counts, current samples).
    pub carry: Option<BTreeMap<String, Tensor>>,
    pub state: TrainState,
}

/// Adam moments as one map: `m.<name>` and `v.<name>`.
pub fn pack_adam(
    m: &BTreeMap<String, Tensor>,
    v: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (name, t) in m {
        out.insert(format!("m.{name}"), t.clone());
    }
    for (name, t) in v {
        out.insert(format!("v.{name}"), t.clone());
    }
    out
}

/// Adam's first and second moments, each keyed by parameter name.
pub type AdamMoments = (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>);

/// Inverse of [`pack_adam`]: `(m, v)`. Names with neither prefix are dropped.
pub fn unpack_adam(optim: BTreeMap<String, Tensor>) -> AdamMoments {
    let mut m = BTreeMap::new();
    let mut v = BTreeMap::new();
    for (name, t) in optim {
        if let Some(n) = name.strip_prefix("m.") {
            m.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("v.") {
            v.insert(n.to_string(), t);
        }
    }
    (m, v)
}

/// Size and hash of one file, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`: what every other file of the checkpoint must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
}

/// A run's checkpoint root (`ROOT/step_N/...`) and its retention policy.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
    keep_last: usize,
}

impl CheckpointDir {
    /// Keeps every checkpoint until [`CheckpointDir::with_keep_last`] says otherwise.
    pub fn new(root: impl Into<PathBuf>) -> CheckpointDir {
        CheckpointDir {
            root: root.into(),
            keep_last: 0,
        }
    }

    /// After each save, keep only the newest `n` checkpoints (0 = keep all).
    pub fn with_keep_last(mut self, n: usize) -> CheckpointDir {
        self.keep_last = n;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of the checkpoint for `step` (whether or not it exists).
    pub fn step_path(&self, step: u64) -> PathBuf {
        self.root.join(format!("{STEP_PREFIX}{step}"))
    }

    /// Writes `contents` as `ROOT/step_<contents.state.step>/`, atomically,
    /// replacing a checkpoint of the same step if there is one, then applies
    /// retention. Returns the checkpoint folder.
    pub fn save(&self, contents: &CheckpointContents) -> Result<PathBuf> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        clean_leftovers(&self.root)?;

        let step = contents.state.step;
        let final_path = self.step_path(step);
        let tmp = self.root.join(format!(
            "{STEP_PREFIX}{step}{TMP_MARK}{}",
            std::process::id()
        ));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let written = write_contents(&tmp, contents).and_then(|()| sync_dir(&tmp));
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }

        if final_path.exists() {
            // A folder cannot be renamed over a non-empty one: move the old
            // one aside first. A crash between the two renames leaves the old
            // one as `.old-`, which the next save puts back or removes.
            let old = self.root.join(format!(
                "{STEP_PREFIX}{step}{OLD_MARK}{}",
                std::process::id()
            ));
            fs::rename(&final_path, &old).map_err(io_err(&final_path))?;
            fs::rename(&tmp, &final_path).map_err(io_err(&final_path))?;
            sync_dir(&self.root)?;
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        } else {
            fs::rename(&tmp, &final_path).map_err(io_err(&final_path))?;
            sync_dir(&self.root)?;
        }

        if self.keep_last > 0 {
            prune(&self.root, self.keep_last, &final_path)?;
        }
        Ok(final_path)
    }

    /// The newest complete checkpoint in this root, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        latest(&self.root)
    }

    /// `"latest"` or a path (absolute, relative to the working folder, or a
    /// folder name inside the root) to a checkpoint folder.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf> {
        resolve(&self.root, spec)
    }
}

fn write_contents(dir: &Path, c: &CheckpointContents) -> Result<()> {
    let mut files = BTreeMap::new();
    let mut tensors = vec![
        (MODEL_FILE, &c.model),
        (OPTIM_FILE, &c.optim),
        (PUZZLE_EMB_FILE, &c.puzzle_emb),
    ];
    if let Some(ema) = &c.ema {
        tensors.push((EMA_FILE, ema));
    }
    if let Some(carry) = &c.carry {
        tensors.push((CARRY_FILE, carry));
    }
    for (name, map) in tensors {
        let path = dir.join(name);
        // save_tensors fsyncs the file before renaming it into place.
        save_tensors(&path, map, FloatDtype::F32).map_err(|source| {
            CheckpointError::Safetensors {
                path: path.clone(),
                source,
            }
        })?;
        files.insert(name.to_string(), hash_file(&path)?);
    }

    let state = StateFileOut {
        format_version: FORMAT_VERSION,
        state: &c.state,
    };
    let path = dir.join(STATE_FILE);
    write_json(&path, &state)?;
    files.insert(STATE_FILE.to_string(), hash_file(&path)?);

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: c.state.step,
        files,
    };
    write_json(&dir.join(MANIFEST_FILE), &manifest)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(&bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Makes renames and new entries in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io_err(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Streams a file through SHA-256 (the puzzle table can be gigabytes).
pub fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut f = File::open(path).map_err(|e| missing_or_io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

fn missing_or_io(path: &Path, e: std::io::Error) -> CheckpointError {
    if e.kind() == std::io::ErrorKind::NotFound {
        CheckpointError::MissingFile {
            path: path.to_path_buf(),
        }
    } else {
        CheckpointError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// Step number of a finished checkpoint folder name (`step_123`), `None` for
/// anything else (temporaries, set-aside old folders, other files).
fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Finished checkpoints under `root`, oldest step first.
fn list_steps(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(root))?;
        let path = entry.path();
        let Some(step) = entry.file_name().to_str().and_then(parse_step) else {
            continue;
        };
        if path.join(MANIFEST_FILE).is_file() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes temporaries of interrupted saves; puts back a checkpoint that an
/// interrupted replacement had moved aside, or removes it if it was replaced.
fn clean_leftovers(root: &Path) -> Result<()> {
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(STEP_PREFIX) {
            continue;
        }
        let path = entry.path();
        if name.contains(TMP_MARK) {
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else if let Some(idx) = name.find(OLD_MARK) {
            let final_path = root.join(&name[..idx]);
            if final_path.exists() {
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            } else {
                fs::rename(&path, &final_path).map_err(io_err(&path))?;
                sync_dir(root)?;
            }
        }
    }
    Ok(())
}

/// The newest finished checkpoint under `root` by step number, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list_steps(root)?.pop().map(|(_, p)| p))
}

/// `"latest"` (the newest checkpoint under `root`) or a path to a checkpoint
/// folder: as given, else relative to `root`.
pub fn resolve(root: &Path, spec: &str) -> Result<PathBuf> {
    if spec == "latest" {
        return latest(root)?.ok_or_else(|| CheckpointError::NoCheckpoint {
            root: root.to_path_buf(),
        });
    }
    let direct = PathBuf::from(spec);
    if direct.is_dir() {
        return Ok(direct);
    }
    let inside = root.join(spec);
    if inside.is_dir() {
        return Ok(inside);
    }
    Err(CheckpointError::MissingFolder { path: direct })
}

/// Keeps the newest `keep_last` checkpoints under `root` (by step number)
/// and removes the older ones, never `protect` nor the newest. `keep_last` 0
/// keeps everything. Returns the removed folders.
pub fn prune(root: &Path, keep_last: usize, protect: &Path) -> Result<Vec<PathBuf>> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let steps = list_steps(root)?;
    let cut = steps.len().saturating_sub(keep_last);
    let mut removed = Vec::new();
    for (_, path) in &steps[..cut] {
        if same_path(path, protect) {
            continue;
        }
        fs::remove_dir_all(path).map_err(io_err(path))?;
        removed.push(path.clone());
    }
    if !removed.is_empty() {
        sync_dir(root)?;
    }
    Ok(removed)
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn read_json_value(path: &Path) -> Result<serde_json::Value> {
    let bytes = fs::read(path).map_err(|e| missing_or_io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn check_version(path: &Path, value: &serde_json::Value) -> Result<()> {
    let found = value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| CheckpointError::BadManifest {
            path: path.to_path_buf(),
            reason: "no integer `format_version`".to_string(),
        })?;
    if found != u64::from(FORMAT_VERSION) {
        return Err(CheckpointError::UnsupportedVersion {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}

/// Reads and checks `manifest.json` of a checkpoint folder.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(CheckpointError::MissingFolder {
            path: dir.to_path_buf(),
        });
    }
    let path = dir.join(MANIFEST_FILE);
    let value = read_json_value(&path)?;
    check_version(&path, &value)?;
    let manifest: Manifest =
        serde_json::from_value(value).map_err(|source| CheckpointError::Json {
            path: path.clone(),
            source,
        })?;
    for name in manifest.files.keys() {
        // Entries are plain file names; anything else could point outside.
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(CheckpointError::BadManifest {
                path,
                reason: format!("entry `{name}` is not a plain file name"),
            });
        }
    }
    for name in REQUIRED_FILES {
        if !manifest.files.contains_key(name) {
            return Err(CheckpointError::BadManifest {
                path,
                reason: format!("no entry for required file `{name}`"),
            });
        }
    }
    Ok(manifest)
}

/// Checks one file against its manifest entry: size first (cheap, catches
/// truncation), then hash.
fn verify_file(dir: &Path, name: &str, entry: &FileEntry) -> Result<()> {
    let path = dir.join(name);
    let meta = fs::metadata(&path).map_err(|e| missing_or_io(&path, e))?;
    if meta.len() != entry.bytes {
        return Err(CheckpointError::SizeMismatch {
            path,
            expected: entry.bytes,
            actual: meta.len(),
        });
    }
    let actual = hash_file(&path)?;
    if !actual.sha256.eq_ignore_ascii_case(&entry.sha256) {
        return Err(CheckpointError::HashMismatch {
            path,
            expected: entry.sha256.clone(),
            actual: actual.sha256,
        });
    }
    Ok(())
}

/// Verifies every file of a checkpoint folder against its manifest.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    verify_files(dir, &manifest.files)?;
    Ok(manifest)
}

/// Checks every listed file of `dir` (size, then SHA-256); the first
/// missing, truncated or altered file is named in the error. Shared with
/// the model folders of `trm package`.
pub fn verify_files(dir: &Path, files: &BTreeMap<String, FileEntry>) -> Result<()> {
    for (name, entry) in files {
        verify_file(dir, name, entry)?;
    }
    Ok(())
}

fn load_map(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    load_tensors(path).map_err(|source| CheckpointError::Safetensors {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a checkpoint folder after verifying every file's size and hash.
pub fn load(dir: &Path) -> Result<CheckpointContents> {
    let manifest = verify(dir)?;

    let state_path = dir.join(STATE_FILE);
    let value = read_json_value(&state_path)?;
    check_version(&state_path, &value)?;
    let state: TrainState =
        serde_json::from_value(value).map_err(|source| CheckpointError::Json {
            path: state_path.clone(),
            source,
        })?;

    let ema = if manifest.files.contains_key(EMA_FILE) {
        Some(load_map(&dir.join(EMA_FILE))?)
    } else {
        None
    };
    let carry = if manifest.files.contains_key(CARRY_FILE) {
        Some(load_map(&dir.join(CARRY_FILE))?)
    } else {
        None
    };
    Ok(CheckpointContents {
        model: load_map(&dir.join(MODEL_FILE))?,
        ema,
        carry,
        optim: load_map(&dir.join(OPTIM_FILE))?,
        puzzle_emb: load_map(&dir.join(PUZZLE_EMB_FILE))?,
        state,
    })
}

/// The weights for `+load_checkpoint=`: from a checkpoint folder (its model
/// and puzzle-embedding files, verified, merged into one reference-named map,
/// as the reference's state dict holds both) or from a bare `.safetensors`
/// file of reference-named weights.
pub fn load_weights_only(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if path.is_dir() {
        let manifest = read_manifest(path)?;
        let mut out = BTreeMap::new();
        for name in [MODEL_FILE, PUZZLE_EMB_FILE] {
            if let Some(entry) = manifest.files.get(name) {
                verify_file(path, name, entry)?;
            }
            let file = path.join(name);
            for (tensor, t) in load_map(&file)? {
                if out.contains_key(&tensor) {
                    return Err(CheckpointError::DuplicateTensor {
                        name: tensor,
                        first: path.join(MODEL_FILE),
                        second: file,
                    });
                }
                out.insert(tensor, t);
            }
        }
        return Ok(out);
    }
    if path.is_file() {
        return load_map(path);
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Err(CheckpointError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    if !path.exists() {
        return Err(CheckpointError::MissingFolder {
            path: path.to_path_buf(),
        });
    }
    Err(CheckpointError::NotWeights {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], seed: u32) -> Tensor {
        // Deterministic, non-trivial bit patterns, including a negative zero,
        // a subnormal and a NaN payload, so "bit-identical" means something.
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut data: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect();
        if n >= 3 {
            data[0] = -0.0;
            data[1] = f32::from_bits(1);
            data[2] = f32::from_bits(0x7fc0_1234);
        }
        Tensor::new(shape, data)
    }

    fn contents(step: u64) -> CheckpointContents {
        let mut model = BTreeMap::new();
        model.insert("inner.lm_head.weight".to_string(), t(&[12, 8], 1));
        model.insert("inner.H_init".to_string(), t(&[8], 2));
        let ema = model
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.data[3] += 0.5;
                (k.clone(), v)
            })
            .collect();
        let v: BTreeMap<_, _> = model
            .keys()
            .map(|k| (k.clone(), t(&model[k].shape, 3)))
            .collect();
        let mut puzzle_emb = BTreeMap::new();
        puzzle_emb.insert("inner.puzzle_emb.weights".to_string(), t(&[5, 8], 4));
        let mut carry = BTreeMap::new();
        carry.insert("z_H".to_string(), t(&[2, 3, 8], 6));
        CheckpointContents {
            optim: pack_adam(&model, &v),
            model,
            ema: Some(ema),
            puzzle_emb,
            carry: Some(carry),
            state: TrainState {
                step,
                optimizer_steps: step + 1,
                rng: serde_json::json!({"seed": 7, "word_pos": 12345678901u64}),
                loader: serde_json::json!({"seed": 7, "iters": 3, "set_index": 0,
                                           "start_index": 16, "rng_word_pos": 99}),
                config: "arch:\n  hidden_size: 8\nlr: 1.0e-4\n".to_string(),
                extra: serde_json::Value::Null,
            },
        }
    }

    fn bits(m: &BTreeMap<String, Tensor>) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    (
                        v.shape.clone(),
                        v.data.iter().map(|x| x.to_bits()).collect(),
                    ),
                )
            })
            .collect()
    }

    fn assert_bit_identical(a: &CheckpointContents, b: &CheckpointContents) {
        assert_eq!(bits(&a.model), bits(&b.model));
        assert_eq!(bits(&a.optim), bits(&b.optim));
        assert_eq!(bits(&a.puzzle_emb), bits(&b.puzzle_emb));
        assert_eq!(
            a.ema.as_ref().map(bits),
            b.ema.as_ref().map(bits),
            "ema differs"
        );
        assert_eq!(
            a.carry.as_ref().map(bits),
            b.carry.as_ref().map(bits),
            "carry differs"
        );
        assert_eq!(a.state, b.state);
    }

    fn names(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::new(dir.path().join("ckpt"));
        let c = contents(42);
        let path = ck.save(&c).unwrap();
        assert_eq!(path, dir.path().join("ckpt/step_42"));
        let back = load(&path).unwrap();
        assert_bit_identical(&c, &back);
        assert!(back.model["inner.lm_head.weight"].data[2].is_nan());

        let files = names(&path);
        assert_eq!(
            files,
            [
                CARRY_FILE,
                EMA_FILE,
                MANIFEST_FILE,
                MODEL_FILE,
                OPTIM_FILE,
                PUZZLE_EMB_FILE,
                STATE_FILE
            ]
        );
        let manifest = read_manifest(&path).unwrap();
        assert_eq!(manifest.step, 42);
        assert_eq!(manifest.files.len(), 6);
        let on_disk = fs::metadata(path.join(MODEL_FILE)).unwrap().len();
        assert_eq!(manifest.files[MODEL_FILE].bytes, on_disk);
        assert_eq!(manifest.files[MODEL_FILE].sha256.len(), 64);
        // No temporaries left in the root.
        assert_eq!(names(ck.root()), ["step_42"]);

        let (m, v) = unpack_adam(back.optim);
        assert_eq!(bits(&m), bits(&c.model));
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn without_ema_loads_none() {
        let dir = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::new(dir.path());
        let mut c = contents(1);
        c.ema = None;
        let path = ck.save(&c).unwrap();
        assert!(!path.join(EMA_FILE).exists());
        assert_eq!(load(&path).unwrap().ema, None);
    }

    #[test]
    fn flipped_byte_is_a_hash_mismatch_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = CheckpointDir::new(dir.path()).save(&contents(3)).unwrap();
        let file = path.join(OPTIM_FILE);
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&file, &bytes).unwrap();
        let expected = read_manifest(&path).unwrap().files[OPTIM_FILE]
            .sha256
            .clone();
        let e = load(&path).unwrap_err();
        match &e {
            CheckpointError::HashMismatch {
                path: p,
                expected: x,
                actual,
            } => {
                assert_eq!(p, &file);
                assert_eq!(x, &expected);
                assert_ne!(actual, &expected);
            }
            other => panic!("expected a hash mismatch, got {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("optim.safetensors") && msg.contains(&expected),
            "{msg}"
        );
    }

    #[test]
    fn truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = CheckpointDir::new(dir.path()).save(&contents(3)).unwrap();
        let file = path.join(MODEL_FILE);
        let bytes = fs::read(&file).unwrap();
        let full = bytes.len() as u64;
        fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        match load(&path).unwrap_err() {
            CheckpointError::SizeMismatch {
                path: p,
                expected,
                actual,
            } => {
                assert_eq!(p, file);
                assert_eq!(expected, full);
                assert_eq!(actual, full / 2);
            }
            other => panic!("expected a size mismatch, got {other}"),
        }

        // A bare truncated weights file (no manifest to catch it): the
        // safetensors parser refuses it, naming the file.
        let bare = dir.path().join("weights.safetensors");
        fs::write(&bare, &bytes[..bytes.len() - 7]).unwrap();
        let e = load_weights_only(&bare).unwrap_err();
        assert!(matches!(e, CheckpointError::Safetensors { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("weights.safetensors") && msg.contains("corrupt"),
            "{msg}"
        );
    }

    #[test]
    fn missing_things_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(&dir.path().join("step_9")).unwrap_err();
        assert!(matches!(e, CheckpointError::MissingFolder { .. }), "{e}");

        let path = CheckpointDir::new(dir.path()).save(&contents(9)).unwrap();
        fs::remove_file(path.join(PUZZLE_EMB_FILE)).unwrap();
        match load(&path).unwrap_err() {
            CheckpointError::MissingFile { path: p } => {
                assert_eq!(p, path.join(PUZZLE_EMB_FILE))
            }
            other => panic!("expected a missing file, got {other}"),
        }
        fs::remove_file(path.join(MANIFEST_FILE)).unwrap();
        match load(&path).unwrap_err() {
            CheckpointError::MissingFile { path: p } => assert_eq!(p, path.join(MANIFEST_FILE)),
            other => panic!("expected a missing manifest, got {other}"),
        }
        assert_eq!(latest(&dir.path().join("no-such-root")).unwrap(), None);
        let e = resolve(dir.path(), "latest").unwrap_err();
        assert!(matches!(e, CheckpointError::NoCheckpoint { .. }), "{e}");
    }

    #[test]
    fn bad_json_and_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = CheckpointDir::new(dir.path()).save(&contents(5)).unwrap();
        let manifest_path = path.join(MANIFEST_FILE);
        let good = fs::read_to_string(&manifest_path).unwrap();

        fs::write(&manifest_path, "{ not json").unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, CheckpointError::Json { .. }), "{e}");
        assert!(e.to_string().contains("manifest.json"));

        fs::write(
            &manifest_path,
            good.replace("\"format_version\": 1", "\"format_version\": 99"),
        )
        .unwrap();
        match load(&path).unwrap_err() {
            CheckpointError::UnsupportedVersion {
                found, supported, ..
            } => {
                assert_eq!(found, 99);
                assert_eq!(supported, FORMAT_VERSION);
            }
            other => panic!("expected an unsupported version, got {other}"),
        }

        let escaping = good.replace("\"state.json\"", "\"../state.json\"");
        fs::write(&manifest_path, escaping).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, CheckpointError::BadManifest { .. }), "{e}");

        // Valid manifest, state.json rewritten with its hash updated: the
        // state's own version check still applies.
        fs::write(&manifest_path, &good).unwrap();
        let state_path = path.join(STATE_FILE);
        let state = fs::read_to_string(&state_path)
            .unwrap()
            .replace("\"format_version\": 1", "\"format_version\": 2");
        fs::write(&state_path, &state).unwrap();
        let mut m: Manifest = serde_json::from_str(&good).unwrap();
        m.files
            .insert(STATE_FILE.to_string(), hash_file(&state_path).unwrap());
        write_json(&manifest_path, &m).unwrap();
        match load(&path).unwrap_err() {
            CheckpointError::UnsupportedVersion { path: p, found, .. } => {
                assert_eq!(p, state_path);
                assert_eq!(found, 2);
            }
            other => panic!("expected an unsupported version, got {other}"),
        }
    }

    #[test]
    fn crash_leftovers_do_not_change_latest() {
        let dir = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::new(dir.path());
        let good = ck.save(&contents(10)).unwrap();

        // A crash mid-save of step 20: an empty temporary and a partial one
        // (model written, nothing else), from some earlier process.
        fs::create_dir(dir.path().join("step_20.tmp-1")).unwrap();
        let partial = dir.path().join("step_30.tmp-2");
        fs::create_dir(&partial).unwrap();
        fs::copy(good.join(MODEL_FILE), partial.join(MODEL_FILE)).unwrap();
        // A stray folder that never got a manifest.
        fs::create_dir(dir.path().join("step_40")).unwrap();

        assert_eq!(ck.latest().unwrap(), Some(good.clone()));
        assert_eq!(ck.resolve("latest").unwrap(), good);
        assert_bit_identical(&load(&good).unwrap(), &contents(10));

        // The next save cleans the temporaries up.
        let next = ck.save(&contents(11)).unwrap();
        assert_eq!(ck.latest().unwrap(), Some(next));
        assert_eq!(names(dir.path()), ["step_10", "step_11", "step_40"]);
    }

    #[test]
    fn interrupted_replacement_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::new(dir.path());
        ck.save(&contents(5)).unwrap();
        let c7 = contents(7);
        let p7 = ck.save(&c7).unwrap();
        // Crash between "move old aside" and "move new in".
        fs::rename(&p7, dir.path().join("step_7.old-123")).unwrap();
        assert_eq!(ck.latest().unwrap(), Some(ck.step_path(5)));
        ck.save(&contents(6)).unwrap();
        // The set-aside checkpoint is back, intact.
        assert_eq!(ck.latest().unwrap(), Some(p7.clone()));
        assert_bit_identical(&load(&p7).unwrap(), &c7);
        assert_eq!(names(dir.path()), ["step_5", "step_6", "step_7"]);
    }

    #[test]
    fn replacing_a_step_is_safe() {
        let dir = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::new(dir.path());
        let first = contents(8);
        ck.save(&first).unwrap();
        let mut second = contents(8);
        second.state.optimizer_steps = 1000;
        second.model.insert("extra".to_string(), t(&[3], 9));
        let path = ck.save(&second).unwrap();
        let back = load(&path).unwrap();
        assert_bit_identical(&back, &second);
        assert_eq!(back.state.optimizer_steps, 1000);
        assert_eq!(names(dir.path()), ["step_8"]);
    }

    #[test]
    fn retention_orders_steps_numerically() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ck = CheckpointDir::new(root);
        for step in [9, 100, 10] {
            ck.save(&contents(step)).unwrap();
        }
        assert_eq!(ck.latest().unwrap(), Some(root.join("step_100")));

        // keep 0: everything stays.
        assert!(prune(root, 0, &root.join("step_100")).unwrap().is_empty());
        assert_eq!(names(root), ["step_10", "step_100", "step_9"]);

        // keep 2: step_9 goes (lexicographically it would be the newest).
        let removed = prune(root, 2, &root.join("step_100")).unwrap();
        assert_eq!(removed, [root.join("step_9")]);
        assert_eq!(names(root), ["step_10", "step_100"]);

        // keep 1, but the protected one is older than the newest: both stay.
        let removed = prune(root, 1, &root.join("step_10")).unwrap();
        assert!(removed.is_empty());

        // Retention through save: re-saving an old step keeps it and the newest.
        let ck1 = CheckpointDir::new(root).with_keep_last(1);
        let p = ck1.save(&contents(50)).unwrap();
        assert_eq!(p, root.join("step_50"));
        assert_eq!(names(root), ["step_100", "step_50"]);
        ck1.save(&contents(101)).unwrap();
        assert_eq!(names(root), ["step_101"]);
    }

    #[test]
    fn resolve_accepts_paths_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::new(dir.path());
        let p = ck.save(&contents(3)).unwrap();
        assert_eq!(ck.resolve(p.to_str().unwrap()).unwrap(), p);
        assert_eq!(ck.resolve("step_3").unwrap(), p);
        let e = ck.resolve("step_4").unwrap_err();
        assert!(matches!(e, CheckpointError::MissingFolder { .. }), "{e}");
    }

    #[test]
    fn weights_only_from_folder_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = contents(2);
        let p = CheckpointDir::new(dir.path()).save(&c).unwrap();
        let w = load_weights_only(&p).unwrap();
        let mut expected = c.model.clone();
        expected.extend(c.puzzle_emb.clone());
        assert_eq!(bits(&w), bits(&expected));

        let bare = dir.path().join("ref.safetensors");
        save_tensors(&bare, &c.model, FloatDtype::F32).unwrap();
        assert_eq!(bits(&load_weights_only(&bare).unwrap()), bits(&c.model));

        let e = load_weights_only(&dir.path().join("nope.safetensors")).unwrap_err();
        assert!(matches!(e, CheckpointError::MissingFile { .. }), "{e}");
        let e = load_weights_only(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, CheckpointError::MissingFolder { .. }), "{e}");

        // Weights-only loading still checks the model file's hash.
        let file = p.join(MODEL_FILE);
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        fs::write(&file, &bytes).unwrap();
        let e = load_weights_only(&p).unwrap_err();
        assert!(matches!(e, CheckpointError::HashMismatch { .. }), "{e}");
    }
}
