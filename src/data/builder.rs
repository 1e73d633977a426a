//! `trm build-dataset`: ARC JSON subsets -> the augmented dataset on disk,
//! file for file as the reference builder writes it (spec sections 1-2).
//!
//! Pipeline: load and validate every subset; shuffle each subset and assign
//! its puzzles to splits; draw each puzzle's augmentation group (parallel,
//! one seeded stream per puzzle, so the result does not depend on the thread
//! count); number the identifiers; then per split stream the examples to
//! disk in windows that are rendered in parallel. Everything is written into
//! `<out>.partial` and renamed at the end, so an interrupted build never
//! leaves a dataset that looks complete.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::arc::{self, ArcError, Example, Puzzle, Solutions};
use super::augment::{draw_group, Augmentation};
use super::build_folder::{self, looks_like_dataset, Leftover};
use super::grid::{MAX_SIDE, VOCAB_SIZE};
use super::loader::MemorySplit;
use super::metadata::{DatasetMetadata, MetadataError};
use super::npy::{self, Dtype, NpyArray, NpyError};

/// Bumped whenever the on-disk result of the same inputs would change.
const BUILD_FORMAT: u32 = 1;
/// The marker written last: its presence with a matching hash means complete.
pub const BUILD_INFO_FILE: &str = "build_info.json";
const SET_NAME: &str = "all";
const FIELDS: [&str; 5] = [
    "inputs",
    "labels",
    "puzzle_identifiers",
    "puzzle_indices",
    "group_indices",
];
/// Bytes rendered in memory before they are written out (inputs + labels).
const WINDOW_BYTES: usize = 256 << 20;

// Independent random streams of one seed.
const STREAM_SHUFFLE: u64 = 0;
const STREAM_AUGMENT: u64 = 1 << 40;
const STREAM_TRAIN_LAYOUT: u64 = 2 << 40;
const STREAM_TEST_LAYOUT: u64 = 3 << 40;

fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Options of `trm build-dataset` (the reference builder's flags).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuildOptions {
    pub input_file_prefix: String,
    pub output_dir: PathBuf,
    pub subsets: Vec<String>,
    pub test_set_name: String,
    pub test_set_name2: String,
    pub seed: u64,
    pub num_aug: usize,
    pub puzzle_identifiers_start: u32,
    /// Side of the square token canvas every grid is rendered into; seq_len
    /// is its square. 30 (`MAX_SIDE`) as in the reference; smaller canvases
    /// suit puzzles whose grids are all small. Defaulted when reading a
    /// `build_info.json` written before the option existed.
    #[serde(default = "default_canvas_side")]
    pub canvas_side: usize,
}

fn default_canvas_side() -> usize {
    MAX_SIDE
}

impl BuildOptions {
    pub fn new(
        input_file_prefix: &str,
        output_dir: &Path,
        subsets: &[&str],
        test_set_name: &str,
    ) -> BuildOptions {
        BuildOptions {
            input_file_prefix: input_file_prefix.to_string(),
            output_dir: output_dir.to_path_buf(),
            subsets: subsets.iter().map(|s| s.to_string()).collect(),
            test_set_name: test_set_name.to_string(),
            test_set_name2: "your_test_set".to_string(),
            seed: 42,
            num_aug: 1000,
            puzzle_identifiers_start: 1,
            canvas_side: MAX_SIDE,
        }
    }
}

/// How the build talks to the user.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildUi {
    /// Progress bars and messages on stderr.
    pub verbose: bool,
    /// Rebuild even when a complete build of the same inputs exists.
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Arc(#[from] ArcError),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid options: {0}")]
    Options(String),
    #[error(transparent)]
    Path(#[from] crate::paths::NonUtf8Path),
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
    #[error("{path}: puzzle '{puzzle}': {place} is {rows}x{cols}, larger than the {side}x{side} canvas ({puzzles} puzzle(s) in all do not fit); rebuild with a canvas side of at least {needed}")]
    GridTooLarge {
        path: PathBuf,
        puzzle: String,
        /// Which grid, e.g. "train example 0 'input'".
        place: String,
        rows: usize,
        cols: usize,
        side: usize,
        /// Puzzles of all subsets with a grid that does not fit.
        puzzles: usize,
        /// The largest grid side of all subsets.
        needed: usize,
    },
    #[error(transparent)]
    Folder(#[from] crate::run_folder::FolderError),
    #[error("{0}")]
    Leftover(String),
    #[error("{path} exists and does not look like a dataset (no train/dataset.json nor {BUILD_INFO_FILE}); refusing to replace it, choose another --output-dir or remove it")]
    NotADataset { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Figures of one split.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitStats {
    pub puzzles: usize,
    pub examples: usize,
    pub groups: usize,
}

/// What a build produced (also stored in `build_info.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuildReport {
    pub format: u32,
    pub input_hash: String,
    pub options: BuildOptions,
    pub original_puzzles: usize,
    pub train: SplitStats,
    pub test: Option<SplitStats>,
    /// Including the blank identifier(s) below the start.
    pub num_identifiers: usize,
    /// Puzzles whose group got fewer than `num_aug` augmentations.
    pub short_groups: Vec<(String, usize)>,
    pub seconds: f64,
    /// Size and SHA-256 of every file of the build (relative paths), so a
    /// folder holding files of two builds is not taken as this one. Absent
    /// in builds made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<std::collections::BTreeMap<String, crate::checkpoint::FileEntry>>,
    /// True when an existing complete build was kept.
    #[serde(skip)]
    pub skipped: bool,
}

/// One original puzzle in processing order.
struct Entry<'a> {
    puzzle: &'a Puzzle,
    is_test: bool,
}

/// A puzzle's examples in one split: train split takes train examples, plus
/// the test examples of puzzles not in the test set.
fn split_examples<'a>(e: &Entry<'a>, test_split: bool) -> Vec<&'a Example> {
    if test_split {
        e.puzzle.test.iter().collect()
    } else if e.is_test {
        e.puzzle.train.iter().collect()
    } else {
        e.puzzle.train.iter().chain(&e.puzzle.test).collect()
    }
}

fn progress(verbose: bool, len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(len as u64),
        if verbose {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>16} [{bar:40}] {pos}/{len} puzzles ({elapsed}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Hash of everything that determines the output: options and file bytes.
fn input_hash(opts: &BuildOptions, subsets: &[arc::Subset]) -> String {
    let mut h = Sha256::new();
    h.update(format!("trm-dataset-v{BUILD_FORMAT}\n").as_bytes());
    let mut canonical = serde_json::json!({
        "subsets": opts.subsets,
        "test_set_name": opts.test_set_name,
        "test_set_name2": opts.test_set_name2,
        "seed": opts.seed,
        "num_aug": opts.num_aug,
        "puzzle_identifiers_start": opts.puzzle_identifiers_start,
    });
    // Only a non-default canvas is hashed, so builds made before the option
    // existed keep their hash and are still recognised as complete.
    if opts.canvas_side != MAX_SIDE {
        canonical["canvas_side"] = opts.canvas_side.into();
    }
    h.update(canonical.to_string().as_bytes());
    for s in subsets {
        for (path, bytes) in &s.file_bytes {
            let kind = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            h.update(format!("\n{}:{}:{}\n", s.name, kind, bytes.len()).as_bytes());
            h.update(bytes);
        }
    }
    hex::encode(h.finalize())
}

fn split_files(dir: &Path, split: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = FIELDS
        .iter()
        .map(|f| dir.join(split).join(format!("{SET_NAME}__{f}.npy")))
        .collect();
    v.push(dir.join(split).join("dataset.json"));
    v
}

/// An existing, complete build of the same inputs, if `dir` holds one.
fn existing_build(dir: &Path, hash: &str, verbose: bool) -> Option<BuildReport> {
    let text = std::fs::read_to_string(dir.join(BUILD_INFO_FILE)).ok()?;
    let report: BuildReport = serde_json::from_str(&text).ok()?;
    if report.input_hash != hash || report.format != BUILD_FORMAT {
        return None;
    }
    let mut files = split_files(dir, "train");
    if report.test.is_some() {
        files.extend(split_files(dir, "test"));
    }
    files.push(dir.join("identifiers.json"));
    files.push(dir.join("test_puzzles.json"));
    for f in files {
        if f.extension().is_some_and(|e| e == "npy") {
            NpyArray::open(&f).ok()?; // checks header and length
        } else if !f.is_file() {
            return None;
        }
    }
    if let Some(expected) = &report.files {
        if let Some(why) = build_folder::mismatch(dir, expected) {
            if verbose {
                eprintln!(
                    "{} does not match its {BUILD_INFO_FILE} ({why}): rebuilding",
                    dir.display()
                );
            }
            return None;
        }
    }
    Some(report)
}

/// Every grid of every puzzle must fit the canvas (in both orientations,
/// since dihedral augmentations swap rows and columns). The error names the
/// first offending grid and the side that would fit all subsets.
fn check_grids_fit(prefix: &str, subsets: &[arc::Subset], side: usize) -> Result<(), BuildError> {
    // (path, puzzle, place, rows, cols) of the first grid that does not fit.
    let mut first: Option<(PathBuf, String, String, usize, usize)> = None;
    let (mut puzzles, mut needed) = (0usize, 0usize);
    for s in subsets {
        let (chal_path, sol_path) = arc::subset_paths(prefix, &s.name);
        for p in &s.puzzles {
            let mut fits = true;
            for (place, g) in p.grids() {
                let big = g.rows().max(g.cols());
                needed = needed.max(big);
                if big <= side {
                    continue;
                }
                fits = false;
                if first.is_none() {
                    // Test outputs come from the solutions file, if any.
                    let from_solutions = place.split == "test"
                        && place.field == "output"
                        && s.solutions == Solutions::FromFile;
                    let path = if from_solutions {
                        &sol_path
                    } else {
                        &chal_path
                    };
                    first = Some((
                        path.clone(),
                        p.id.clone(),
                        place.to_string(),
                        g.rows(),
                        g.cols(),
                    ));
                }
            }
            puzzles += usize::from(!fits);
        }
    }
    match first {
        Some((path, puzzle, place, rows, cols)) => Err(BuildError::GridTooLarge {
            path,
            puzzle,
            place,
            rows,
            cols,
            side,
            puzzles,
            needed,
        }),
        None => Ok(()),
    }
}

/// The augmentation group of the puzzle at position `index` of the build
/// order (every subset's puzzles, each subset shuffled, in subset order):
/// the identity, then up to `num_aug` distinct augmentations drawn from the
/// puzzle's own seeded stream. `trm infer` calls this with the same index to
/// get the same group.
pub fn puzzle_group(puzzle: &Puzzle, index: usize, seed: u64, num_aug: usize) -> Vec<Augmentation> {
    let examples: Vec<Example> = puzzle.train.iter().chain(&puzzle.test).cloned().collect();
    let mut rng = rng_for(seed, STREAM_AUGMENT + index as u64);
    draw_group(&examples, num_aug, &mut rng)
}

/// Per original puzzle of a split, in order: its build-order index, its
/// examples in this split, and the augmentations and identifiers of its group.
pub struct SplitMember<'a> {
    pub index: usize,
    pub examples: Vec<&'a Example>,
    pub group: &'a [Augmentation],
    pub ids: &'a [i32],
}

impl SplitMember<'_> {
    /// Canvas bytes of the member's rendered examples (inputs or labels).
    fn bytes(&self, seq_len: usize) -> usize {
        self.group.len() * self.examples.len() * seq_len
    }
}

/// A split's index arrays: identifiers, puzzle offsets and group offsets.
fn split_layout(members: &[SplitMember]) -> (Vec<i32>, Vec<i32>, Vec<i32>, usize) {
    let mut puzzle_indices = vec![0i32];
    let mut group_indices = vec![0i32];
    let mut puzzle_identifiers = Vec::new();
    let mut examples_total = 0usize;
    for m in members {
        for &id in m.ids {
            examples_total += m.examples.len();
            puzzle_indices.push(examples_total as i32);
            puzzle_identifiers.push(id);
        }
        group_indices.push(puzzle_identifiers.len() as i32);
    }
    (
        puzzle_identifiers,
        puzzle_indices,
        group_indices,
        examples_total,
    )
}

/// Render one member into its slices of the inputs and labels: the test
/// split at offset (0, 0), the train split at the positions drawn from the
/// member's layout stream.
fn render_member(
    m: &SplitMember,
    test_split: bool,
    side: usize,
    seed: u64,
    inputs: &mut [u8],
    labels: &mut [u8],
) {
    let base = if test_split {
        STREAM_TEST_LAYOUT
    } else {
        STREAM_TRAIN_LAYOUT
    };
    let mut rng = rng_for(seed, base + m.index as u64);
    render_group(
        &m.examples,
        m.group,
        !test_split,
        side,
        &mut rng,
        inputs,
        labels,
    );
}

/// A whole split in memory, exactly as the builder writes it to
/// `{split}/all__*.npy` (for `trm infer`, which builds its test set from a
/// challenges file). Every grid must fit the `side` x `side` canvas.
pub fn render_split(
    members: &[SplitMember],
    test_split: bool,
    side: usize,
    seed: u64,
) -> MemorySplit {
    let (puzzle_identifiers, puzzle_indices, group_indices, examples) = split_layout(members);
    let seq_len = side * side;
    let mut inputs = vec![0u8; examples * seq_len];
    let mut labels = vec![0u8; examples * seq_len];
    let mut jobs = Vec::with_capacity(members.len());
    let (mut rest_in, mut rest_lab) = (&mut inputs[..], &mut labels[..]);
    for m in members {
        let (a, b) = std::mem::take(&mut rest_in).split_at_mut(m.bytes(seq_len));
        let (c, d) = std::mem::take(&mut rest_lab).split_at_mut(m.bytes(seq_len));
        jobs.push((m, a, c));
        rest_in = b;
        rest_lab = d;
    }
    jobs.into_par_iter()
        .for_each(|(m, ib, lb)| render_member(m, test_split, side, seed, ib, lb));
    MemorySplit {
        inputs,
        labels,
        puzzle_identifiers,
        puzzle_indices,
        group_indices,
    }
}

/// Heap bytes per augmented puzzle besides its canvases: the augmentation,
/// its identifier name (twice: list and index) and index entry.
const BYTES_PER_AUGMENTATION: u64 = 160;

/// Memory the build needs: every augmented puzzle's bookkeeping, plus the
/// largest group's rendered inputs and labels (groups are written in windows).
fn build_memory(subsets: &[arc::Subset], num_aug: usize, side: usize) -> Option<u64> {
    let members = (num_aug as u64).checked_add(1)?;
    let seq_len = (side * side) as u64;
    let mut total = 0u64;
    let mut largest_group = 0u64;
    for p in subsets.iter().flat_map(|s| &s.puzzles) {
        let per = BYTES_PER_AUGMENTATION.checked_add(2 * p.id.len() as u64)?;
        total = total.checked_add(crate::limits::product(&[members, per])?)?;
        let examples = (p.train.len() + p.test.len()) as u64;
        largest_group =
            largest_group.max(crate::limits::product(&[members, examples, seq_len, 2])?);
    }
    total.checked_add(largest_group)
}

/// Build the dataset. Progress and messages go to stderr when `ui.verbose`.
pub fn build_dataset(opts: &BuildOptions, ui: BuildUi) -> Result<BuildReport, BuildError> {
    let start = Instant::now();
    if opts.subsets.is_empty() {
        return Err(BuildError::Options(
            "--subsets needs at least one subset".into(),
        ));
    }
    for (i, s) in opts.subsets.iter().enumerate() {
        if opts.subsets[..i].contains(s) {
            return Err(BuildError::Options(format!("subset '{s}' is listed twice")));
        }
    }
    if !(1..=MAX_SIDE).contains(&opts.canvas_side) {
        return Err(BuildError::Options(format!(
            "canvas side {} is out of range: it must be 1..={MAX_SIDE} (grids are at most {MAX_SIDE}x{MAX_SIDE})",
            opts.canvas_side
        )));
    }
    let out = opts.output_dir.clone();
    // build_info.json records the folder as text, and the loader and
    // `trm package` find the dataset again by it.
    crate::paths::require_utf8("--output-dir", &out)?;
    let out_name = out
        .file_name()
        .ok_or_else(|| {
            BuildError::Options(format!(
                "--output-dir '{}' has no folder name",
                out.display()
            ))
        })?
        .to_os_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if out.exists() && !out.is_dir() {
        return Err(BuildError::Options(format!(
            "--output-dir '{}' exists and is not a folder",
            out.display()
        )));
    }
    // One builder per output folder for the whole build: two at once would
    // publish a folder mixing both builds' files.
    let created = !out.exists();
    let lock = crate::run_folder::lock(&out)?;
    let result = build_locked(opts, ui, &out, &out_name, &parent, start);
    if result.is_err() && created {
        // Leave no empty folder behind for a build that never started.
        if build_folder::entries_besides_lock(&out).is_ok_and(|e| e.is_empty()) {
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    drop(lock);
    result
}

/// The build proper, under the output folder's lock.
fn build_locked(
    opts: &BuildOptions,
    ui: BuildUi,
    out: &Path,
    out_name: &std::ffi::OsStr,
    parent: &Path,
    start: Instant,
) -> Result<BuildReport, BuildError> {
    let say = |msg: &str| {
        if ui.verbose {
            eprintln!("{msg}");
        }
    };
    let out = out.to_path_buf();
    let old = parent.join(with_suffix(out_name, ".old"));
    match build_folder::tidy_old(&out, &old).map_err(BuildError::Leftover)? {
        Leftover::None => {}
        Leftover::Removed => say(&format!(
            "removed {}, left by an interrupted rebuild",
            old.display()
        )),
        Leftover::Restored => say(&format!(
            "restored the previous build from {}, left by an interrupted rebuild",
            old.display()
        )),
    }
    let partial = parent.join(with_suffix(out_name, ".partial"));
    if partial.exists() {
        say(&format!(
            "removing an interrupted build at {}",
            partial.display()
        ));
        std::fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }

    // 1. Load and validate every subset.
    let mut subsets = Vec::with_capacity(opts.subsets.len());
    for name in &opts.subsets {
        let s = arc::load_subset(&opts.input_file_prefix, name)?;
        if s.solutions == Solutions::Dummy {
            say(&format!(
                "{name}: solutions file not found, test outputs filled with [[0]]"
            ));
        }
        subsets.push(s);
    }
    check_grids_fit(&opts.input_file_prefix, &subsets, opts.canvas_side)?;
    crate::limits::check(
        "the build",
        build_memory(&subsets, opts.num_aug, opts.canvas_side),
        "lower --num-aug or build fewer subsets",
    )?;
    let hash = input_hash(opts, &subsets);
    if !ui.force {
        if let Some(mut report) = existing_build(&out, &hash, ui.verbose) {
            say(&format!(
                "{} already holds a complete build of these inputs and options; skipping (use --force to rebuild)",
                out.display()
            ));
            report.skipped = true;
            return Ok(report);
        }
    }
    if out.is_dir()
        && !looks_like_dataset(&out)
        && !build_folder::entries_besides_lock(&out)
            .map_err(io_err(&out))?
            .is_empty()
    {
        return Err(BuildError::NotADataset { path: out });
    }

    // 2. Shuffle each subset, assign splits.
    let mut shuffle_rng = rng_for(opts.seed, STREAM_SHUFFLE);
    let mut entries: Vec<Entry> = Vec::new();
    for s in &subsets {
        let is_test = s.name == opts.test_set_name || s.name == opts.test_set_name2;
        let mut order: Vec<usize> = (0..s.puzzles.len()).collect();
        order.shuffle(&mut shuffle_rng);
        entries.extend(order.into_iter().map(|i| Entry {
            puzzle: &s.puzzles[i],
            is_test,
        }));
    }
    let has_test = entries.iter().any(|e| e.is_test);
    if !has_test {
        say(&format!(
            "warning: no subset is named '{}': no test split will be written",
            opts.test_set_name
        ));
    }
    say(&format!("Total puzzles: {}", entries.len()));

    // 3. Augmentation groups, one seeded stream per puzzle.
    let pb = progress(ui.verbose, entries.len(), "augmenting");
    let groups: Vec<Vec<Augmentation>> = entries
        .par_iter()
        .enumerate()
        .map(|(i, e)| {
            let g = puzzle_group(e.puzzle, i, opts.seed, opts.num_aug);
            pb.inc(1);
            g
        })
        .collect();
    pb.finish_and_clear();
    let short_groups: Vec<(String, usize)> = entries
        .iter()
        .zip(&groups)
        .filter(|(_, g)| opts.num_aug > 0 && g.len() < opts.num_aug + 1)
        .map(|(e, g)| (e.puzzle.id.clone(), g.len()))
        .collect();
    if !short_groups.is_empty() {
        let shown: Vec<String> = short_groups
            .iter()
            .take(8)
            .map(|(id, n)| format!("{id} ({n})"))
            .collect();
        say(&format!(
            "{} puzzles have fewer than {} distinct augmentations (group sizes incl. original): {}{}",
            short_groups.len(),
            opts.num_aug,
            shown.join(", "),
            if short_groups.len() > 8 { ", ..." } else { "" }
        ));
    }

    // 4. Identifiers: global by name, in train order (every puzzle has train
    //    examples, so the test split adds no new names).
    let start_id = opts.puzzle_identifiers_start as usize;
    let mut names: Vec<String> = Vec::new();
    let mut ids_of: Vec<Vec<i32>> = Vec::with_capacity(entries.len());
    let mut index: HashMap<String, i32> = HashMap::new();
    for (e, g) in entries.iter().zip(&groups) {
        let mut ids = Vec::with_capacity(g.len());
        for (k, aug) in g.iter().enumerate() {
            let name = if k == 0 {
                e.puzzle.id.clone()
            } else {
                aug.name(&e.puzzle.id)
            };
            let next = (start_id + names.len()) as i32;
            let id = *index.entry(name.clone()).or_insert_with(|| {
                names.push(name);
                next
            });
            ids.push(id);
        }
        ids_of.push(ids);
    }
    drop(index);
    let num_identifiers = start_id + names.len();
    if num_identifiers > i32::MAX as usize {
        return Err(BuildError::Options(
            "more than 2^31 puzzle identifiers".into(),
        ));
    }
    say(&format!(
        "Total puzzle IDs (including <blank>): {num_identifiers}"
    ));

    // 5. Write everything into <out>.partial.
    std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
    let result = (|| -> Result<BuildReport, BuildError> {
        let ctx = WriteCtx {
            entries: &entries,
            groups: &groups,
            ids_of: &ids_of,
            seed: opts.seed,
            verbose: ui.verbose,
            num_identifiers,
            canvas_side: opts.canvas_side,
        };
        let train = write_split(&ctx, &partial, false)?;
        let test = if has_test {
            Some(write_split(&ctx, &partial, true)?)
        } else {
            None
        };

        let mut id_list: Vec<Value> = vec![Value::from("<blank>"); start_id];
        id_list.extend(names.iter().map(|n| Value::from(n.as_str())));
        write_json(&partial.join("identifiers.json"), &Value::Array(id_list))?;
        let mut tests = serde_json::Map::new();
        for e in entries.iter().filter(|e| e.is_test) {
            tests.insert(e.puzzle.id.clone(), e.puzzle.json.clone());
        }
        write_json(&partial.join("test_puzzles.json"), &Value::Object(tests))?;
        let files = build_folder::manifest(&partial).map_err(io_err(&partial))?;

        let report = BuildReport {
            format: BUILD_FORMAT,
            input_hash: hash.clone(),
            options: opts.clone(),
            original_puzzles: entries.len(),
            train,
            test,
            num_identifiers,
            short_groups: short_groups.clone(),
            seconds: start.elapsed().as_secs_f64(),
            files: Some(files),
            skipped: false,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| BuildError::Io {
            path: partial.join(BUILD_INFO_FILE),
            source: e.into(),
        })?;
        write_file_synced(&partial.join(BUILD_INFO_FILE), text.as_bytes())?;
        Ok(report)
    })();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };

    // 6. Swap into place: the old build (if any) is moved aside first and
    //    removed only once the new one is in place. The locked lock file
    //    moves with the new build (a rename keeps the lock), so `out` stays
    //    locked throughout.
    let lock_path = out.join(crate::run_folder::LOCK_FILE);
    std::fs::rename(&lock_path, partial.join(crate::run_folder::LOCK_FILE))
        .map_err(io_err(&lock_path))?;
    if out.exists() {
        std::fs::rename(&out, &old).map_err(io_err(&out))?;
    }
    std::fs::rename(&partial, &out).map_err(io_err(&out))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(report)
}

/// `name` + `suffix` without a lossy detour through UTF-8, so the sibling
/// folder is exactly the one the next build looks for.
fn with_suffix(name: &std::ffi::OsStr, suffix: &str) -> std::ffi::OsString {
    let mut s = name.to_os_string();
    s.push(suffix);
    s
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn write_json(path: &Path, v: &Value) -> Result<(), BuildError> {
    let f = File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::new(f);
    super::pyjson::to_writer(&mut w, v).map_err(|e| BuildError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let f = w.into_inner().map_err(|e| BuildError::Io {
        path: path.to_path_buf(),
        source: e.into_error(),
    })?;
    f.sync_all().map_err(io_err(path))
}

struct WriteCtx<'a> {
    entries: &'a [Entry<'a>],
    groups: &'a [Vec<Augmentation>],
    ids_of: &'a [Vec<i32>],
    seed: u64,
    verbose: bool,
    num_identifiers: usize,
    canvas_side: usize,
}

/// Render one group (all augmented puzzles of one original) into `inputs`
/// and `labels` (each `members * examples * side * side` bytes); every grid
/// fits the `side` x `side` canvas (checked when loading).
fn render_group(
    examples: &[&Example],
    group: &[Augmentation],
    translate: bool,
    side: usize,
    rng: &mut ChaCha8Rng,
    inputs: &mut [u8],
    labels: &mut [u8],
) {
    let n = examples.len();
    let seq_len = side * side;
    let mut rows = inputs
        .chunks_exact_mut(seq_len)
        .zip(labels.chunks_exact_mut(seq_len));
    for aug in group {
        // One example per puzzle keeps the top-left placement.
        let no_shift = rng.gen_range(0..n);
        for (k, ex) in examples.iter().enumerate() {
            let (inp, out) = (aug.apply(&ex.input), aug.apply(&ex.output));
            let (r0, c0) = if translate && k != no_shift {
                (
                    rng.gen_range(0..=side - inp.rows().max(out.rows())),
                    rng.gen_range(0..=side - inp.cols().max(out.cols())),
                )
            } else {
                (0, 0)
            };
            let (ri, rl) = rows.next().expect("buffer sized for the group");
            inp.render(r0, c0, ri);
            out.render(r0, c0, rl);
        }
    }
}

fn write_split(ctx: &WriteCtx, dir: &Path, test_split: bool) -> Result<SplitStats, BuildError> {
    let split = if test_split { "test" } else { "train" };
    let split_dir = dir.join(split);
    std::fs::create_dir_all(&split_dir).map_err(io_err(&split_dir))?;

    // Layout: which entries are in this split and how many examples each has.
    let members: Vec<SplitMember> = ctx
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !test_split || e.is_test)
        .map(|(i, e)| SplitMember {
            index: i,
            examples: split_examples(e, test_split),
            group: &ctx.groups[i],
            ids: &ctx.ids_of[i],
        })
        .collect();
    let (puzzle_identifiers, puzzle_indices, group_indices, examples_total) =
        split_layout(&members);
    if examples_total > i32::MAX as usize {
        return Err(BuildError::Options(format!(
            "{split} split has more than 2^31 examples"
        )));
    }
    let stats = SplitStats {
        puzzles: puzzle_identifiers.len(),
        examples: examples_total,
        groups: members.len(),
    };

    // Inputs and labels: headers, then windows of groups rendered in parallel.
    let in_path = split_dir.join(format!("{SET_NAME}__inputs.npy"));
    let lab_path = split_dir.join(format!("{SET_NAME}__labels.npy"));
    let seq_len = ctx.canvas_side * ctx.canvas_side;
    let shape = [examples_total, seq_len];
    let mut in_w = BufWriter::new(File::create(&in_path).map_err(io_err(&in_path))?);
    let mut lab_w = BufWriter::new(File::create(&lab_path).map_err(io_err(&lab_path))?);
    in_w.write_all(&npy::header_bytes(Dtype::U8, &shape))
        .map_err(io_err(&in_path))?;
    lab_w
        .write_all(&npy::header_bytes(Dtype::U8, &shape))
        .map_err(io_err(&lab_path))?;

    let pb = progress(ctx.verbose, members.len(), &format!("writing {split}"));
    let mut in_buf: Vec<u8> = Vec::new();
    let mut lab_buf: Vec<u8> = Vec::new();
    let mut start = 0;
    while start < members.len() {
        // At least one group per window, however large.
        let mut end = start + 1;
        let mut bytes = members[start].bytes(seq_len);
        while end < members.len() && bytes + members[end].bytes(seq_len) <= WINDOW_BYTES / 2 {
            bytes += members[end].bytes(seq_len);
            end += 1;
        }
        in_buf.resize(bytes, 0);
        lab_buf.resize(bytes, 0);
        // Disjoint slices per group, filled in parallel.
        let mut jobs = Vec::with_capacity(end - start);
        let (mut rest_in, mut rest_lab) = (&mut in_buf[..], &mut lab_buf[..]);
        for m in &members[start..end] {
            let (a, b) = std::mem::take(&mut rest_in).split_at_mut(m.bytes(seq_len));
            let (c, d) = std::mem::take(&mut rest_lab).split_at_mut(m.bytes(seq_len));
            jobs.push((m, a, c));
            rest_in = b;
            rest_lab = d;
        }
        jobs.into_par_iter().for_each(|(m, ib, lb)| {
            render_member(m, test_split, ctx.canvas_side, ctx.seed, ib, lb);
            pb.inc(1);
        });
        in_w.write_all(&in_buf).map_err(io_err(&in_path))?;
        lab_w.write_all(&lab_buf).map_err(io_err(&lab_path))?;
        start = end;
    }
    pb.finish_and_clear();
    for (w, p) in [(in_w, &in_path), (lab_w, &lab_path)] {
        let f = w.into_inner().map_err(|e| BuildError::Io {
            path: p.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io_err(p))?;
    }

    let field = |f: &str| split_dir.join(format!("{SET_NAME}__{f}.npy"));
    npy::write_i32(&field("puzzle_identifiers"), &puzzle_identifiers)?;
    npy::write_i32(&field("puzzle_indices"), &puzzle_indices)?;
    npy::write_i32(&field("group_indices"), &group_indices)?;

    let meta = DatasetMetadata {
        pad_id: 0,
        ignore_label_id: Some(0),
        blank_identifier_id: 0,
        vocab_size: VOCAB_SIZE,
        seq_len,
        num_puzzle_identifiers: ctx.num_identifiers,
        total_groups: stats.groups,
        mean_puzzle_examples: if stats.puzzles > 0 {
            stats.examples as f64 / stats.puzzles as f64
        } else {
            0.0
        },
        total_puzzles: stats.puzzles,
        sets: vec![SET_NAME.to_string()],
    };
    meta.save(&split_dir.join("dataset.json"))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subset(name: &str, bytes: &[u8]) -> arc::Subset {
        arc::Subset {
            name: name.to_string(),
            puzzles: Vec::new(),
            solutions: Solutions::FromFile,
            file_bytes: vec![(
                PathBuf::from(format!("/x/arc_{name}_challenges.json")),
                bytes.to_vec(),
            )],
        }
    }

    #[test]
    fn default_canvas_keeps_the_input_hash_and_others_change_it() {
        let subsets = [subset("alpha", br#"{"x":1}"#), subset("beta", b"{}")];
        let mut o = BuildOptions::new("/x/arc", Path::new("/out"), &["alpha", "beta"], "beta");
        // The hash of these inputs before `canvas_side` existed (computed
        // with Python's hashlib over the same canonical bytes).
        assert_eq!(
            input_hash(&o, &subsets),
            "43a0197ac1204c721a91265f3eabd66806766af40fab75af6a05cd661e9fda1d"
        );
        o.canvas_side = 8;
        let h8 = input_hash(&o, &subsets);
        assert_ne!(
            h8,
            "43a0197ac1204c721a91265f3eabd66806766af40fab75af6a05cd661e9fda1d"
        );
        o.canvas_side = 9;
        assert_ne!(input_hash(&o, &subsets), h8);
    }

    #[test]
    fn options_without_canvas_side_read_as_the_default() {
        let o = BuildOptions::new("p", Path::new("/out"), &["a"], "a");
        let mut v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["canvas_side"], 30);
        v.as_object_mut().unwrap().remove("canvas_side");
        let back: BuildOptions = serde_json::from_value(v).unwrap();
        assert_eq!(back, o);
    }
}
