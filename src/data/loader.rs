//! `PuzzleDataset`: reads a built dataset (ours or the reference builder's)
//! and yields batches with the reference loader's semantics
//! (`puzzle_dataset.py`).
//!
//! Inputs and labels stay memory-mapped (read-only); the small index arrays
//! live in memory. Random streams are our own: one seeded ChaCha stream per
//! (seed, iteration), so the position in the training walk is a small
//! serialisable [`LoaderState`] and a resumed run draws exactly the batches
//! it would have drawn without the interruption.

use std::path::{Path, PathBuf};

use rand::seq::{index, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::metadata::{DatasetMetadata, MetadataError};
use super::npy::{Dtype, NpyArray, NpyError};

/// Label value ignored by the loss (the reference's `IGNORE_LABEL_ID`).
pub const IGNORE_LABEL_ID: i32 = -100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// The split's folder inside a dataset.
    pub fn dir_name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// The reference's `PuzzleDatasetConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct PuzzleDatasetConfig {
    pub seed: u64,
    pub dataset_paths: Vec<PathBuf>,
    pub global_batch_size: usize,
    /// Chooses what [`PuzzleDataset::batches`] yields: test batches (every
    /// example in order) or one training iteration.
    pub test_set_mode: bool,
    /// Epochs (random permutations of the groups) walked per training iteration.
    pub epochs_per_iter: usize,
    pub rank: usize,
    pub num_replicas: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("{path}: no such dataset folder")]
    NoDataset { path: PathBuf },
    #[error(
        "{path} is missing: the dataset folder is incomplete (rebuild it with `trm build-dataset`)"
    )]
    MissingFile { path: PathBuf },
    #[error("{path}: {what}")]
    Inconsistent { path: PathBuf, what: String },
    #[error("datasets disagree on {field}: {first} has {a}, {other} has {b}")]
    Mismatch {
        field: &'static str,
        first: PathBuf,
        a: String,
        other: PathBuf,
        b: String,
    },
    #[error("invalid loader config: {0}")]
    Config(String),
    #[error("cannot restore the loader position: {0}")]
    State(String),
}

/// One set: one dataset path's `{set}__*.npy` files.
struct SetData {
    /// `{set}` for the first dataset path, `{set}{i}` for path `i` (as the reference).
    name: String,
    /// For error messages of [`PuzzleDataset::validate`].
    ids_path: PathBuf,
    inputs: NpyArray,
    labels: NpyArray,
    puzzle_identifiers: Vec<i32>,
    /// Example range of puzzle `p`: `puzzle_indices[p]..puzzle_indices[p + 1]`.
    puzzle_indices: Vec<usize>,
    /// Puzzle range of group `g`: `group_indices[g]..group_indices[g + 1]`.
    group_indices: Vec<usize>,
}

impl SetData {
    fn examples(&self) -> usize {
        self.inputs.shape[0]
    }

    fn groups(&self) -> usize {
        self.group_indices.len() - 1
    }

    /// The puzzle holding example `i` (numpy `searchsorted(side="right") - 1`,
    /// so empty puzzles are skipped as in the reference).
    fn puzzle_of(&self, i: usize) -> usize {
        self.puzzle_indices.partition_point(|&x| x <= i) - 1
    }
}

/// A batch for one rank: row-major `[batch_size, seq_len]` inputs and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub set_name: String,
    pub inputs: Vec<i32>,
    pub labels: Vec<i32>,
    pub puzzle_identifiers: Vec<i32>,
    /// Rows in this batch (the local batch size, padding included).
    pub batch_size: usize,
    pub seq_len: usize,
    /// Examples in the whole global batch, padding excluded.
    pub effective_global_size: usize,
}

/// One split's arrays in memory, as a built dataset stores them in
/// `{split}/all__*.npy` (tokens as u8).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemorySplit {
    /// `[N, seq_len]`
    pub inputs: Vec<u8>,
    /// `[N, seq_len]`
    pub labels: Vec<u8>,
    /// Per puzzle.
    pub puzzle_identifiers: Vec<i32>,
    /// Example offsets of the puzzles (`puzzles + 1` entries from 0).
    pub puzzle_indices: Vec<i32>,
    /// Puzzle offsets of the groups (`groups + 1` entries from 0).
    pub group_indices: Vec<i32>,
}

/// Where the training walk stands; save it with a checkpoint to resume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    /// The seed the position belongs to (checked on restore).
    pub seed: u64,
    /// Set walks started so far: the reference counts one per set per iteration.
    pub iters: u64,
    /// Set being walked; `None` between iterations.
    pub set_index: Option<usize>,
    /// Position in the current set's group order.
    pub start_index: usize,
    /// 32-bit words consumed from the current set's stream.
    pub rng_word_pos: u64,
}

/// An opened split of one or more datasets.
pub struct PuzzleDataset {
    config: PuzzleDatasetConfig,
    split: Split,
    metadata: DatasetMetadata,
    sets: Vec<SetData>,
    local_batch_size: usize,
    state: LoaderState,
}

fn require(path: PathBuf) -> Result<PathBuf, LoaderError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(LoaderError::MissingFile { path })
    }
}

fn inconsistent(path: &Path, what: String) -> LoaderError {
    LoaderError::Inconsistent {
        path: path.to_path_buf(),
        what,
    }
}

/// Check an index array of non-decreasing offsets that starts at 0 and ends
/// at `last`.
fn check_offsets(
    path: &Path,
    v: Vec<i64>,
    last: usize,
    what: &str,
) -> Result<Vec<usize>, LoaderError> {
    if v.first() != Some(&0) {
        return Err(inconsistent(path, format!("{what} must start at 0")));
    }
    if let Some(i) = v.windows(2).position(|w| w[1] < w[0]) {
        return Err(inconsistent(
            path,
            format!(
                "{what} must be non-decreasing, but entry {} is {} and entry {} is {}",
                i,
                v[i],
                i + 1,
                v[i + 1]
            ),
        ));
    }
    let end = v[v.len() - 1];
    if end != last as i64 {
        return Err(inconsistent(
            path,
            format!("{what} ends at {end}, expected {last}"),
        ));
    }
    Ok(v.into_iter().map(|x| x as usize).collect())
}

fn load_set(dir: &Path, set: &str, name: String, seq_len: usize) -> Result<SetData, LoaderError> {
    let file = |f: &str| require(dir.join(format!("{set}__{f}.npy")));
    // Check every file is there before reading any, so an incomplete folder
    // is reported as such rather than as a shape error.
    let paths = [
        file("inputs")?,
        file("labels")?,
        file("puzzle_identifiers")?,
        file("puzzle_indices")?,
        file("group_indices")?,
    ];
    let [inputs_path, labels_path, ids_path, pidx_path, gidx_path] = paths;
    let inputs = NpyArray::open(&inputs_path)?;
    let labels = NpyArray::open(&labels_path)?;
    let ids = NpyArray::open(&ids_path)?;
    ids.expect(&[Dtype::I32, Dtype::I64], 1)?;
    let index = |path: &Path| -> Result<(PathBuf, Vec<i64>), LoaderError> {
        let a = NpyArray::open(path)?;
        a.expect(&[Dtype::I32, Dtype::I64], 1)?;
        Ok((path.to_path_buf(), a.to_i64_vec()))
    };
    assemble_set(
        name,
        inputs,
        labels,
        (ids_path, ids.to_i64_vec()),
        index(&pidx_path)?,
        index(&gidx_path)?,
        seq_len,
    )
}

/// Checks a set's arrays against each other and `seq_len`. The index arrays
/// come with the path their messages name.
fn assemble_set(
    name: String,
    inputs: NpyArray,
    labels: NpyArray,
    (ids_path, ids): (PathBuf, Vec<i64>),
    (pidx_path, pidx): (PathBuf, Vec<i64>),
    (gidx_path, gidx): (PathBuf, Vec<i64>),
    seq_len: usize,
) -> Result<SetData, LoaderError> {
    let labels_path = labels.path().to_path_buf();
    for a in [&inputs, &labels] {
        a.expect(&[Dtype::U8, Dtype::I32, Dtype::I64], 2)?;
        if a.shape[1] != seq_len {
            return Err(inconsistent(
                a.path(),
                format!(
                    "rows have {} tokens, dataset.json says seq_len {seq_len}",
                    a.shape[1]
                ),
            ));
        }
    }
    if inputs.shape != labels.shape {
        return Err(inconsistent(
            &labels_path,
            format!(
                "shape {:?} differs from the inputs' {:?}",
                labels.shape, inputs.shape
            ),
        ));
    }

    let mut puzzle_identifiers = Vec::with_capacity(ids.len());
    for (i, v) in ids.into_iter().enumerate() {
        let v = i32::try_from(v)
            .map_err(|_| inconsistent(&ids_path, format!("identifier {i} ({v}) exceeds int32")))?;
        puzzle_identifiers.push(v);
    }

    let puzzle_indices = check_offsets(&pidx_path, pidx, inputs.shape[0], "puzzle_indices")?;
    if puzzle_indices.len() != puzzle_identifiers.len() + 1 {
        return Err(inconsistent(
            &ids_path,
            format!(
                "{} puzzle identifiers, but {} has {} puzzles",
                puzzle_identifiers.len(),
                pidx_path.display(),
                puzzle_indices.len() - 1
            ),
        ));
    }
    let group_indices = check_offsets(&gidx_path, gidx, puzzle_identifiers.len(), "group_indices")?;
    // Training draws one puzzle per visited group, so a group without
    // puzzles cannot be sampled (the reference fails on it mid-run).
    if let Some(g) = group_indices.windows(2).position(|w| w[1] == w[0]) {
        return Err(inconsistent(
            &gidx_path,
            format!("group {g} has no puzzles"),
        ));
    }
    Ok(SetData {
        name,
        ids_path,
        inputs,
        labels,
        puzzle_identifiers,
        puzzle_indices,
        group_indices,
    })
}

/// Append `rows` (example indices) of a `[N, seq_len]` array to `out` as
/// i32, with values equal to `ignore` replaced by [`IGNORE_LABEL_ID`]. Each
/// row is a contiguous slice of the map, widened and mapped in one
/// branch-free (vectorisable) pass.
fn gather_rows(
    a: &NpyArray,
    rows: &[usize],
    seq_len: usize,
    ignore: Option<i32>,
    out: &mut Vec<i32>,
) {
    let bytes = a.bytes();
    let row_bytes = seq_len * a.dtype.size();
    // A value no element can take stands for "no mapping".
    let ign = ignore.unwrap_or(IGNORE_LABEL_ID);
    let map = move |v: i32| if v == ign { IGNORE_LABEL_ID } else { v };
    for &r in rows {
        let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
        match a.dtype {
            Dtype::U8 => out.extend(row.iter().map(|&t| map(t as i32))),
            Dtype::I32 => out.extend(
                row.chunks_exact(4)
                    .map(|c| map(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            ),
            // numpy's astype(int32) wraps int64 (and the reference compares
            // after converting); so do we.
            Dtype::I64 => out.extend(row.chunks_exact(8).map(|c| {
                map(i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as i32)
            })),
        }
    }
}

/// The merged metadata of several datasets, as the reference merges them.
fn merge_metadata(metas: &[(PathBuf, DatasetMetadata)]) -> Result<DatasetMetadata, LoaderError> {
    let (first_path, first) = &metas[0];
    for (p, m) in &metas[1..] {
        let checks: [(&'static str, String, String); 6] = [
            ("seq_len", first.seq_len.to_string(), m.seq_len.to_string()),
            (
                "vocab_size",
                first.vocab_size.to_string(),
                m.vocab_size.to_string(),
            ),
            ("pad_id", first.pad_id.to_string(), m.pad_id.to_string()),
            (
                "ignore_label_id",
                format!("{:?}", first.ignore_label_id),
                format!("{:?}", m.ignore_label_id),
            ),
            (
                "blank_identifier_id",
                first.blank_identifier_id.to_string(),
                m.blank_identifier_id.to_string(),
            ),
            ("sets", format!("{:?}", first.sets), format!("{:?}", m.sets)),
        ];
        for (field, a, b) in checks {
            if a != b {
                return Err(LoaderError::Mismatch {
                    field,
                    first: first_path.clone(),
                    a,
                    other: p.clone(),
                    b,
                });
            }
        }
    }
    let total_puzzles: usize = metas.iter().map(|(_, m)| m.total_puzzles).sum();
    let weighted: f64 = metas
        .iter()
        .map(|(_, m)| m.mean_puzzle_examples * m.total_puzzles as f64)
        .sum();
    Ok(DatasetMetadata {
        num_puzzle_identifiers: metas.iter().map(|(_, m)| m.num_puzzle_identifiers).sum(),
        total_groups: metas.iter().map(|(_, m)| m.total_groups).sum(),
        // The reference divides by zero here; an empty dataset gets 0 instead.
        mean_puzzle_examples: if total_puzzles > 0 {
            weighted / total_puzzles as f64
        } else {
            0.0
        },
        total_puzzles,
        ..first.clone()
    })
}

fn check_config(config: &PuzzleDatasetConfig) -> Result<(), LoaderError> {
    let err = |s: String| Err(LoaderError::Config(s));
    if config.dataset_paths.is_empty() {
        return err("no dataset paths given".into());
    }
    if config.num_replicas == 0 {
        return err("the number of replicas must be at least 1".into());
    }
    if config.global_batch_size == 0 {
        return err("the global batch size must be at least 1".into());
    }
    if config.global_batch_size % config.num_replicas != 0 {
        return err(format!(
            "global batch size {} must be a multiple of the number of replicas {}",
            config.global_batch_size, config.num_replicas
        ));
    }
    if config.rank >= config.num_replicas {
        return err(format!(
            "rank {} out of range for {} replicas",
            config.rank, config.num_replicas
        ));
    }
    if !config.test_set_mode && config.epochs_per_iter == 0 {
        return err("epochs per iteration must be at least 1".into());
    }
    Ok(())
}

impl PuzzleDataset {
    /// Open the `split` of every dataset path, check the files, and check
    /// that the datasets agree.
    pub fn open(config: PuzzleDatasetConfig, split: Split) -> Result<PuzzleDataset, LoaderError> {
        check_config(&config)?;
        let mut metas = Vec::with_capacity(config.dataset_paths.len());
        for p in &config.dataset_paths {
            if !p.is_dir() {
                return Err(LoaderError::NoDataset { path: p.clone() });
            }
            let path = require(p.join(split.dir_name()).join("dataset.json"))?;
            metas.push((p.clone(), DatasetMetadata::load(&path)?));
        }
        let metadata = merge_metadata(&metas)?;

        // Sets in the reference's order: per set name, then per path.
        let mut sets = Vec::with_capacity(metadata.sets.len() * config.dataset_paths.len());
        for set in &metadata.sets {
            for (i, p) in config.dataset_paths.iter().enumerate() {
                let name = if i > 0 {
                    format!("{set}{i}")
                } else {
                    set.clone()
                };
                sets.push(load_set(
                    &p.join(split.dir_name()),
                    set,
                    name,
                    metadata.seq_len,
                )?);
            }
        }
        Ok(Self::from_parts(config, split, metadata, sets))
    }

    /// A dataset at the start of its first epoch, from checked parts.
    fn from_parts(
        config: PuzzleDatasetConfig,
        split: Split,
        metadata: DatasetMetadata,
        sets: Vec<SetData>,
    ) -> PuzzleDataset {
        let local_batch_size = config.global_batch_size / config.num_replicas;
        let state = LoaderState {
            seed: config.seed,
            ..LoaderState::default()
        };
        PuzzleDataset {
            config,
            split,
            metadata,
            sets,
            local_batch_size,
            state,
        }
    }

    /// A split held in memory (one set, `all`), checked as [`open`] checks
    /// files; `name` stands in for the dataset folder in messages. The
    /// config's dataset paths are replaced by `name`.
    ///
    /// [`open`]: PuzzleDataset::open
    pub fn from_memory(
        mut config: PuzzleDatasetConfig,
        split: Split,
        metadata: DatasetMetadata,
        name: &Path,
        data: MemorySplit,
    ) -> Result<PuzzleDataset, LoaderError> {
        config.dataset_paths = vec![name.to_path_buf()];
        check_config(&config)?;
        let seq_len = metadata.seq_len;
        let dir = name.join(split.dir_name());
        let file = |f: &str| dir.join(format!("all__{f}.npy"));
        let rows = data.inputs.len().checked_div(seq_len).unwrap_or(0);
        let array = |f: &str, bytes: Vec<u8>| {
            NpyArray::from_bytes(file(f), Dtype::U8, &[rows, seq_len], bytes)
        };
        let widen = |v: Vec<i32>| v.into_iter().map(i64::from).collect::<Vec<i64>>();
        let set = assemble_set(
            "all".to_string(),
            array("inputs", data.inputs)?,
            array("labels", data.labels)?,
            (file("puzzle_identifiers"), widen(data.puzzle_identifiers)),
            (file("puzzle_indices"), widen(data.puzzle_indices)),
            (file("group_indices"), widen(data.group_indices)),
            seq_len,
        )?;
        Ok(Self::from_parts(config, split, metadata, vec![set]))
    }

    /// The merged metadata.
    pub fn metadata(&self) -> &DatasetMetadata {
        &self.metadata
    }

    pub fn config(&self) -> &PuzzleDatasetConfig {
        &self.config
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Rows per batch on this rank.
    pub fn local_batch_size(&self) -> usize {
        self.local_batch_size
    }

    /// Set names in iteration order (`all`, `all1`, ... for several paths).
    pub fn set_names(&self) -> Vec<&str> {
        self.sets.iter().map(|s| s.name.as_str()).collect()
    }

    /// Examples over all sets.
    pub fn total_examples(&self) -> usize {
        self.sets.iter().map(SetData::examples).sum()
    }

    /// Check every token and identifier against the metadata: inputs in
    /// `0..vocab_size`, labels too or equal to `ignore_label_id`, puzzle
    /// identifiers in `0..num_puzzle_identifiers`. Reads all the data once;
    /// the batch path does no such checks.
    pub fn validate(&self) -> Result<(), LoaderError> {
        let vocab = self.metadata.vocab_size as i64;
        let ignore = self.metadata.ignore_label_id;
        for set in &self.sets {
            for (a, is_label) in [(&set.inputs, false), (&set.labels, true)] {
                let ok = |v: i64| (0..vocab).contains(&v) || (is_label && Some(v) == ignore);
                let bad = match a.dtype {
                    Dtype::U8 => a.bytes().iter().position(|&t| !ok(t as i64)),
                    _ => (0..a.len()).find(|&i| !ok(a.get_i64(i))),
                };
                if let Some(i) = bad {
                    let seq_len = self.metadata.seq_len;
                    return Err(inconsistent(
                        a.path(),
                        format!(
                            "token {} at example {}, position {} is outside the vocabulary 0..{vocab}",
                            a.get_i64(i),
                            i / seq_len,
                            i % seq_len
                        ),
                    ));
                }
            }
            let n = self.metadata.num_puzzle_identifiers as i64;
            if let Some((p, &id)) = set
                .puzzle_identifiers
                .iter()
                .enumerate()
                .find(|(_, &id)| !(0..n).contains(&(id as i64)))
            {
                return Err(inconsistent(
                    &set.ids_path,
                    format!("puzzle {p} has identifier {id}, outside 0..{n}"),
                ));
            }
        }
        Ok(())
    }

    /// The training position: where the next [`PuzzleDataset::train_batches`]
    /// continues. Save it with a checkpoint.
    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    /// Continue training from a saved position.
    pub fn restore(&mut self, state: LoaderState) -> Result<(), LoaderError> {
        if state.seed != self.config.seed {
            return Err(LoaderError::State(format!(
                "it was saved with seed {}, the loader has seed {}",
                state.seed, self.config.seed
            )));
        }
        if let Some(s) = state.set_index {
            let set = self.sets.get(s).ok_or_else(|| {
                LoaderError::State(format!(
                    "it names set {s}, the dataset has {} sets",
                    self.sets.len()
                ))
            })?;
            let order_len = set.groups() * self.config.epochs_per_iter;
            if state.start_index > order_len {
                return Err(LoaderError::State(format!(
                    "it is at group {} of set {}, whose order has {order_len} entries",
                    state.start_index, set.name
                )));
            }
        }
        self.state = state;
        Ok(())
    }

    /// What the reference's `__iter__` yields: the test batches in test-set
    /// mode, else one training iteration.
    pub fn batches(&mut self) -> Batches<'_> {
        if self.config.test_set_mode {
            Batches::Test(self.test_batches())
        } else {
            Batches::Train(self.train_batches())
        }
    }

    /// Training batches of one iteration (`epochs_per_iter` epochs over every
    /// set), continuing from the current state: after a restore mid-iteration,
    /// the rest of that iteration.
    pub fn train_batches(&mut self) -> TrainBatches<'_> {
        TrainBatches {
            ds: self,
            cursor: None,
            began: false,
        }
    }

    /// Test batches: every example in order, the last batch of each set padded.
    pub fn test_batches(&self) -> TestBatches<'_> {
        TestBatches {
            ds: self,
            set: 0,
            start: 0,
        }
    }

    /// Build this rank's batch from example `rows` of `set` (whose puzzles
    /// are `puzzles`), padded to the local batch size.
    fn collate(&self, set: &SetData, rows: &[usize], puzzles: &[usize], effective: usize) -> Batch {
        let seq_len = self.metadata.seq_len;
        let n = self.local_batch_size;
        let mut inputs = Vec::with_capacity(n * seq_len);
        let mut labels = Vec::with_capacity(n * seq_len);
        gather_rows(&set.inputs, rows, seq_len, None, &mut inputs);
        // Labels are mapped before padding, as the reference (padding is
        // IGNORE_LABEL_ID already). An ignore id beyond int32 matches nothing.
        let ignore = match self.metadata.ignore_label_id {
            Some(v) => i32::try_from(v).ok(),
            None => None,
        };
        gather_rows(&set.labels, rows, seq_len, ignore, &mut labels);
        let mut puzzle_identifiers: Vec<i32> =
            puzzles.iter().map(|&p| set.puzzle_identifiers[p]).collect();
        inputs.resize(n * seq_len, self.metadata.pad_id as i32);
        labels.resize(n * seq_len, IGNORE_LABEL_ID);
        puzzle_identifiers.resize(n, self.metadata.blank_identifier_id as i32);
        Batch {
            set_name: set.name.clone(),
            inputs,
            labels,
            puzzle_identifiers,
            batch_size: n,
            seq_len,
            effective_global_size: effective,
        }
    }

    /// The group order of set `set_index` in walk `iters`, and the stream
    /// positioned just after drawing it.
    fn set_walk(&self, set_index: usize, iters: u64) -> Box<Cursor> {
        let set = &self.sets[set_index];
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(iters);
        let mut order = Vec::with_capacity(set.groups() * self.config.epochs_per_iter);
        for _ in 0..self.config.epochs_per_iter {
            let mut perm: Vec<usize> = (0..set.groups()).collect();
            perm.shuffle(&mut rng);
            order.extend(perm);
        }
        // Boxed: the stream state is a few hundred bytes, moved per batch.
        Box::new(Cursor {
            set_index,
            order,
            rng,
        })
    }

    /// Start walking set `set_index` (a new walk: `iters` counts it).
    fn begin_set(&mut self, set_index: usize) -> Box<Cursor> {
        self.state.iters += 1;
        self.state.set_index = Some(set_index);
        self.state.start_index = 0;
        let cursor = self.set_walk(set_index, self.state.iters);
        self.state.rng_word_pos = word_pos(&cursor.rng);
        cursor
    }

    /// Draw the next global batch of the current walk: example rows and their
    /// puzzles, fewer than the global batch size when the order runs out.
    fn draw_global(&mut self, cursor: &mut Cursor) -> (Vec<usize>, Vec<usize>) {
        let gbs = self.config.global_batch_size;
        let set = &self.sets[cursor.set_index];
        let mut rows = Vec::with_capacity(gbs);
        let mut puzzles = Vec::with_capacity(gbs);
        let mut start = self.state.start_index;
        while start < cursor.order.len() && rows.len() < gbs {
            let g = cursor.order[start];
            start += 1;
            // One puzzle of the group, uniformly; groups are non-empty (checked on open).
            let p = cursor
                .rng
                .gen_range(set.group_indices[g]..set.group_indices[g + 1]);
            let first = set.puzzle_indices[p];
            let size = set.puzzle_indices[p + 1] - first;
            let take = size.min(gbs - rows.len());
            if take > 0 {
                for i in index::sample(&mut cursor.rng, size, take) {
                    rows.push(first + i);
                    puzzles.push(p);
                }
            }
        }
        self.state.start_index = start;
        self.state.rng_word_pos = word_pos(&cursor.rng);
        (rows, puzzles)
    }
}

fn word_pos(rng: &ChaCha8Rng) -> u64 {
    // 2^64 words is far beyond any walk; saturate rather than wrap.
    u64::try_from(rng.get_word_pos()).unwrap_or(u64::MAX)
}

/// The walk over one set: its group order and random stream.
struct Cursor {
    set_index: usize,
    order: Vec<usize>,
    rng: ChaCha8Rng,
}

/// Iterator over one training iteration; see [`PuzzleDataset::train_batches`].
/// The dataset's [`PuzzleDataset::state`] follows every batch yielded.
pub struct TrainBatches<'a> {
    ds: &'a mut PuzzleDataset,
    cursor: Option<Box<Cursor>>,
    /// Whether this iterator started an iteration (it then stops at its end).
    began: bool,
}

impl TrainBatches<'_> {
    /// The position after the last batch yielded.
    pub fn state(&self) -> &LoaderState {
        &self.ds.state
    }
}

impl Iterator for TrainBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let gbs = self.ds.config.global_batch_size;
        let local = self.ds.local_batch_size;
        loop {
            let mut cursor = match self.cursor.take() {
                Some(c) => c,
                None => match self.ds.state.set_index {
                    Some(s) => {
                        // Resuming mid-set: rebuild the order, wind the stream on.
                        let mut c = self.ds.set_walk(s, self.ds.state.iters);
                        c.rng.set_word_pos(self.ds.state.rng_word_pos as u128);
                        c
                    }
                    None => {
                        if self.began || self.ds.sets.is_empty() {
                            return None;
                        }
                        self.began = true;
                        self.ds.begin_set(0)
                    }
                },
            };
            let (rows, puzzles) = self.ds.draw_global(&mut cursor);
            if rows.len() == gbs {
                let (a, b) = (
                    self.ds.config.rank * local,
                    (self.ds.config.rank + 1) * local,
                );
                let set = &self.ds.sets[cursor.set_index];
                let batch = self.ds.collate(set, &rows[a..b], &puzzles[a..b], gbs);
                self.cursor = Some(cursor);
                return Some(batch);
            }
            // A short batch ends the set's walk and is dropped (as the reference).
            let next = cursor.set_index + 1;
            if next < self.ds.sets.len() {
                self.cursor = Some(self.ds.begin_set(next));
            } else {
                self.ds.state.set_index = None;
                self.ds.state.start_index = 0;
                self.ds.state.rng_word_pos = 0;
                // Mark the iteration as ended even if this iterator resumed it.
                self.began = true;
                return None;
            }
        }
    }
}

/// Iterator over the test batches; see [`PuzzleDataset::test_batches`].
pub struct TestBatches<'a> {
    ds: &'a PuzzleDataset,
    set: usize,
    start: usize,
}

impl Iterator for TestBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let ds = self.ds;
        let gbs = ds.config.global_batch_size;
        let local = ds.local_batch_size;
        while self.set < ds.sets.len() && self.start >= ds.sets[self.set].examples() {
            self.set += 1;
            self.start = 0;
        }
        let set = ds.sets.get(self.set)?;
        let end = (self.start + gbs).min(set.examples());
        // This rank's slice; empty (and then all padding) when the global
        // batch is too short to reach it, as the reference.
        let local_start = self.start + ds.config.rank * local;
        let local_end = (self.start + (ds.config.rank + 1) * local).min(end);
        let rows: Vec<usize> = (local_start..local_end).collect();
        let puzzles: Vec<usize> = rows.iter().map(|&i| set.puzzle_of(i)).collect();
        let batch = ds.collate(set, &rows, &puzzles, end - self.start);
        self.start += gbs;
        Some(batch)
    }
}

/// [`PuzzleDataset::batches`]: test or training batches per the config.
pub enum Batches<'a> {
    Train(TrainBatches<'a>),
    Test(TestBatches<'a>),
}

impl Iterator for Batches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        match self {
            Batches::Train(t) => t.next(),
            Batches::Test(t) => t.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::npy::write_i32;

    fn offsets(path: &Path, last: usize, what: &str) -> Result<Vec<usize>, LoaderError> {
        let a = NpyArray::open(path)?;
        a.expect(&[Dtype::I32, Dtype::I64], 1)?;
        check_offsets(path, a.to_i64_vec(), last, what)
    }

    #[test]
    fn offsets_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_i32(&p, &[0, 2, 5]).unwrap();
        assert_eq!(offsets(&p, 5, "x").unwrap(), vec![0, 2, 5]);
        let e = offsets(&p, 6, "x").unwrap_err().to_string();
        assert!(e.contains("ends at 5, expected 6"), "{e}");
        write_i32(&p, &[1, 2, 5]).unwrap();
        let e = offsets(&p, 5, "x").unwrap_err().to_string();
        assert!(e.contains("must start at 0"), "{e}");
        write_i32(&p, &[0, 3, 2, 5]).unwrap();
        let e = offsets(&p, 5, "x").unwrap_err().to_string();
        assert!(e.contains("non-decreasing"), "{e}");
        write_i32(&p, &[]).unwrap();
        let e = offsets(&p, 0, "x").unwrap_err().to_string();
        assert!(e.contains("must start at 0"), "{e}");
    }

    #[test]
    fn word_position_restores_the_stream() {
        // The resume design rests on this: a stream rewound to a saved word
        // position continues identically, whatever mix of draws came before.
        let mut a = ChaCha8Rng::seed_from_u64(7);
        a.set_stream(3);
        for n in 1..40 {
            let _ = index::sample(&mut a, 50, n % 17 + 1);
            let _ = a.gen_range(0..n);
            let pos = a.get_word_pos();
            let mut b = ChaCha8Rng::seed_from_u64(7);
            b.set_stream(3);
            b.set_word_pos(pos);
            let x: Vec<u64> = (0..5).map(|_| a.gen()).collect();
            let y: Vec<u64> = (0..5).map(|_| b.gen()).collect();
            assert_eq!(x, y, "after {n} rounds");
        }
    }
}
