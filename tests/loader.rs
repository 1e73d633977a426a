//! The dataset loader against small datasets of known content: every example
//! row encodes its own example and puzzle index, so each test can tell which
//! rows a batch gathered.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use trm::data::loader::{
    Batch, LoaderError, LoaderState, PuzzleDataset, PuzzleDatasetConfig, Split, IGNORE_LABEL_ID,
};
use trm::data::metadata::DatasetMetadata;
use trm::data::npy::{write_i32, Dtype, NpyWriter};

const SEQ: usize = 900;
/// Identifiers are offset so that an identifier is never its puzzle index.
const ID_BASE: i32 = 100;

/// Colour token (2..=11) of a decimal digit.
fn digit(v: usize, place: u32) -> u8 {
    2 + ((v / 10usize.pow(place)) % 10) as u8
}

fn undigits(row: &[i32]) -> usize {
    row.iter()
        .rev()
        .fold(0, |acc, &t| acc * 10 + (t as usize - 2))
}

/// Input row of example `e` of puzzle `p`: cells 0..4 the example index,
/// 4..8 the puzzle index, then a pattern, then padding.
fn input_row(e: usize, p: usize) -> Vec<u8> {
    let mut row = vec![0u8; SEQ];
    for k in 0..4 {
        row[k] = digit(e, k as u32);
        row[4 + k] = digit(p, k as u32);
    }
    for (j, c) in row.iter_mut().enumerate().take(30).skip(8) {
        *c = 2 + ((e + j) % 10) as u8;
    }
    row[30] = 1; // EOS
    row
}

/// Label row: the example index again, an EOS, then 0 (PAD, the ignore label).
fn label_row(e: usize) -> Vec<u8> {
    let mut row = vec![0u8; SEQ];
    for (k, cell) in row.iter_mut().enumerate().take(4) {
        *cell = digit(e, k as u32);
    }
    row[4] = 1;
    row
}

/// What a test dataset holds: examples per puzzle, puzzles per group.
#[derive(Clone, Debug)]
struct Layout {
    /// `groups[g]` = examples of each puzzle of group g.
    groups: Vec<Vec<usize>>,
}

impl Layout {
    fn new(groups: &[&[usize]]) -> Layout {
        Layout {
            groups: groups.iter().map(|g| g.to_vec()).collect(),
        }
    }

    /// Group `g` has `(g % 3) + 1` puzzles of `(g + p) % 4 + 1` examples.
    fn varied(num_groups: usize) -> Layout {
        Layout {
            groups: (0..num_groups)
                .map(|g| (0..g % 3 + 1).map(|p| (g + p) % 4 + 1).collect())
                .collect(),
        }
    }

    fn puzzle_sizes(&self) -> Vec<usize> {
        self.groups.iter().flatten().copied().collect()
    }

    fn examples(&self) -> usize {
        self.puzzle_sizes().iter().sum()
    }

    fn puzzles(&self) -> usize {
        self.puzzle_sizes().len()
    }

    /// Group of each puzzle.
    fn group_of_puzzle(&self) -> Vec<usize> {
        self.groups
            .iter()
            .enumerate()
            .flat_map(|(g, ps)| std::iter::repeat_n(g, ps.len()))
            .collect()
    }

    fn puzzle_indices(&self) -> Vec<usize> {
        let mut v = vec![0];
        for s in self.puzzle_sizes() {
            v.push(v[v.len() - 1] + s);
        }
        v
    }

    fn metadata(&self) -> DatasetMetadata {
        DatasetMetadata {
            pad_id: 0,
            ignore_label_id: Some(0),
            blank_identifier_id: 0,
            vocab_size: 12,
            seq_len: SEQ,
            num_puzzle_identifiers: ID_BASE as usize + self.puzzles(),
            total_groups: self.groups.len(),
            mean_puzzle_examples: self.examples() as f64 / self.puzzles().max(1) as f64,
            total_puzzles: self.puzzles(),
            sets: vec!["all".into()],
        }
    }

    /// Write `{root}/{split}/` with set "all".
    fn write(&self, root: &Path, split: &str) {
        self.write_with(root, split, &self.metadata());
    }

    fn write_with(&self, root: &Path, split: &str, meta: &DatasetMetadata) {
        let dir = root.join(split);
        std::fs::create_dir_all(&dir).unwrap();
        meta.save(&dir.join("dataset.json")).unwrap();
        for set in &meta.sets {
            self.write_set(&dir, set);
        }
    }

    fn write_set(&self, dir: &Path, set: &str) {
        let n = self.examples();
        let f = |k: &str| dir.join(format!("{set}__{k}.npy"));
        let mut inputs = NpyWriter::create(&f("inputs"), Dtype::U8, &[n, SEQ]).unwrap();
        let mut labels = NpyWriter::create(&f("labels"), Dtype::U8, &[n, SEQ]).unwrap();
        let pidx = self.puzzle_indices();
        for p in 0..self.puzzles() {
            for e in pidx[p]..pidx[p + 1] {
                inputs.data_mut()[e * SEQ..(e + 1) * SEQ].copy_from_slice(&input_row(e, p));
                labels.data_mut()[e * SEQ..(e + 1) * SEQ].copy_from_slice(&label_row(e));
            }
        }
        inputs.finish().unwrap();
        labels.finish().unwrap();
        let ids: Vec<i32> = (0..self.puzzles() as i32).map(|p| ID_BASE + p).collect();
        write_i32(&f("puzzle_identifiers"), &ids).unwrap();
        let pidx: Vec<i32> = pidx.iter().map(|&x| x as i32).collect();
        write_i32(&f("puzzle_indices"), &pidx).unwrap();
        let mut gidx = vec![0i32];
        for g in &self.groups {
            gidx.push(gidx[gidx.len() - 1] + g.len() as i32);
        }
        write_i32(&f("group_indices"), &gidx).unwrap();
    }
}

fn config(paths: &[&Path], gbs: usize) -> PuzzleDatasetConfig {
    PuzzleDatasetConfig {
        seed: 42,
        dataset_paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        global_batch_size: gbs,
        test_set_mode: false,
        epochs_per_iter: 1,
        rank: 0,
        num_replicas: 1,
    }
}

fn open(cfg: &PuzzleDatasetConfig, split: Split) -> PuzzleDataset {
    PuzzleDataset::open(cfg.clone(), split).unwrap()
}

fn open_err(cfg: &PuzzleDatasetConfig, split: Split) -> String {
    match PuzzleDataset::open(cfg.clone(), split) {
        Ok(_) => panic!("opening should fail"),
        Err(e) => e.to_string(),
    }
}

/// A decoded row: (example index, puzzle index from the row, identifier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    example: usize,
    puzzle: usize,
    identifier: i32,
}

/// Decode the rows of a batch, checking each against what its cells say.
fn rows(b: &Batch) -> Vec<Row> {
    assert_eq!(b.seq_len, SEQ);
    assert_eq!(b.inputs.len(), b.batch_size * SEQ);
    assert_eq!(b.labels.len(), b.batch_size * SEQ);
    assert_eq!(b.puzzle_identifiers.len(), b.batch_size);
    (0..b.batch_size)
        .map(|i| {
            let inp = &b.inputs[i * SEQ..(i + 1) * SEQ];
            let lab = &b.labels[i * SEQ..(i + 1) * SEQ];
            let example = undigits(&inp[0..4]);
            let puzzle = undigits(&inp[4..8]);
            let want: Vec<i32> = input_row(example, puzzle)
                .iter()
                .map(|&t| t as i32)
                .collect();
            assert_eq!(inp, &want[..], "row {i} is not example {example} intact");
            // Labels: PAD (the ignore label id 0) became IGNORE_LABEL_ID.
            let want: Vec<i32> = label_row(example)
                .iter()
                .map(|&t| if t == 0 { IGNORE_LABEL_ID } else { t as i32 })
                .collect();
            assert_eq!(lab, &want[..], "labels of row {i}");
            Row {
                example,
                puzzle,
                identifier: b.puzzle_identifiers[i],
            }
        })
        .collect()
}

/// Every batch of `iterations` training iterations.
fn train(ds: &mut PuzzleDataset, iterations: usize) -> Vec<Batch> {
    (0..iterations)
        .flat_map(|_| ds.train_batches().collect::<Vec<_>>())
        .collect()
}

#[test]
fn training_batches_are_full_and_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::varied(40);
    layout.write(tmp.path(), "train");
    let pidx = layout.puzzle_indices();
    for epochs in [1, 3] {
        let mut cfg = config(&[tmp.path()], 8);
        cfg.epochs_per_iter = epochs;
        let mut ds = open(&cfg, Split::Train);
        assert_eq!(ds.local_batch_size(), 8);
        assert_eq!(ds.set_names(), vec!["all"]);
        let batches = train(&mut ds, 2);
        assert!(batches.len() >= 2 * epochs * layout.examples() / 8 / 4);
        let mut seen = BTreeSet::new();
        for b in &batches {
            assert_eq!(b.set_name, "all");
            assert_eq!(b.batch_size, 8);
            assert_eq!(b.effective_global_size, 8);
            let rs = rows(b);
            for r in &rs {
                // The row belongs to the puzzle whose identifier it carries.
                assert!(pidx[r.puzzle] <= r.example && r.example < pidx[r.puzzle + 1]);
                assert_eq!(r.identifier, ID_BASE + r.puzzle as i32);
                seen.insert(r.example);
            }
            // Within one visit a puzzle's examples are drawn without
            // replacement; with one epoch per iteration a batch visits each
            // group at most once, so all its rows are distinct.
            if epochs == 1 {
                let distinct: BTreeSet<_> = rs.iter().map(|r| r.example).collect();
                assert_eq!(distinct.len(), rs.len(), "{rs:?}");
            }
        }
        assert!(seen.len() > layout.examples() / 2, "rows cover the data");
    }
}

#[test]
fn each_group_is_visited_epochs_per_iter_times() {
    // One example per puzzle: each visit is one row, so the rows spell out
    // the group order (up to the dropped tail).
    let tmp = tempfile::tempdir().unwrap();
    let groups: Vec<Vec<usize>> = (0..13).map(|g| vec![1; g % 3 + 1]).collect();
    let layout = Layout { groups };
    layout.write(tmp.path(), "train");
    let group_of = layout.group_of_puzzle();
    let g = layout.groups.len();
    for (epochs, gbs) in [(1, 4), (3, 5), (4, 13), (2, 26)] {
        let mut cfg = config(&[tmp.path()], gbs);
        cfg.epochs_per_iter = epochs;
        let mut ds = open(&cfg, Split::Train);
        for _ in 0..3 {
            let batches: Vec<Batch> = ds.train_batches().collect();
            assert_eq!(
                batches.len(),
                g * epochs / gbs,
                "epochs {epochs}, gbs {gbs}"
            );
            let visits: Vec<usize> = batches
                .iter()
                .flat_map(rows)
                .map(|r| group_of[r.puzzle])
                .collect();
            // Each full epoch of the order is a permutation of the groups.
            for chunk in visits.chunks(g).filter(|c| c.len() == g) {
                let set: BTreeSet<_> = chunk.iter().collect();
                assert_eq!(set.len(), g, "{chunk:?}");
            }
            let mut counts = BTreeMap::new();
            for v in &visits {
                *counts.entry(*v).or_insert(0usize) += 1;
            }
            let dropped: usize = (0..g)
                .map(|x| epochs - counts.get(&x).copied().unwrap_or(0))
                .sum();
            assert_eq!(dropped, g * epochs - visits.len());
            assert!(dropped < gbs);
        }
    }
}

#[test]
fn puzzles_are_drawn_uniformly_within_a_group() {
    // One group of three single-example puzzles, batch of one: the drawn
    // puzzle is uniform over the three.
    let tmp = tempfile::tempdir().unwrap();
    Layout::new(&[&[1, 1, 1]]).write(tmp.path(), "train");
    let mut cfg = config(&[tmp.path()], 1);
    cfg.epochs_per_iter = 3000;
    let mut ds = open(&cfg, Split::Train);
    let mut counts = [0usize; 3];
    for b in ds.train_batches() {
        counts[rows(&b)[0].puzzle] += 1;
    }
    assert_eq!(counts.iter().sum::<usize>(), 3000);
    for c in counts {
        assert!((850..1150).contains(&c), "{counts:?}");
    }
}

#[test]
fn sharded_batches_concatenate_to_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    Layout::varied(30).write(tmp.path(), "train");
    let mut cfg = config(&[tmp.path()], 8);
    cfg.epochs_per_iter = 2;
    let global = train(&mut open(&cfg, Split::Train), 2);
    assert!(global.len() > 4);
    for replicas in [2, 4] {
        let local: Vec<Vec<Batch>> = (0..replicas)
            .map(|rank| {
                let mut c = cfg.clone();
                c.rank = rank;
                c.num_replicas = replicas;
                let mut ds = open(&c, Split::Train);
                assert_eq!(ds.local_batch_size(), 8 / replicas);
                train(&mut ds, 2)
            })
            .collect();
        for (k, g) in global.iter().enumerate() {
            let mut inputs = Vec::new();
            let mut labels = Vec::new();
            let mut ids = Vec::new();
            for rank_batches in &local {
                let b = &rank_batches[k];
                assert_eq!(b.batch_size, 8 / replicas);
                assert_eq!(b.effective_global_size, 8);
                assert_eq!(b.set_name, g.set_name);
                inputs.extend_from_slice(&b.inputs);
                labels.extend_from_slice(&b.labels);
                ids.extend_from_slice(&b.puzzle_identifiers);
            }
            assert_eq!(inputs, g.inputs, "replicas {replicas}, batch {k}");
            assert_eq!(labels, g.labels);
            assert_eq!(ids, g.puzzle_identifiers);
        }
        assert!(local.iter().all(|l| l.len() == global.len()));
    }
}

#[test]
fn batches_are_deterministic_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    Layout::varied(30).write(tmp.path(), "train");
    let cfg = config(&[tmp.path()], 6);
    let a = train(&mut open(&cfg, Split::Train), 3);
    let b = train(&mut open(&cfg, Split::Train), 3);
    assert_eq!(a, b);
    let mut other = cfg.clone();
    other.seed = 43;
    let c = train(&mut open(&other, Split::Train), 3);
    assert_ne!(
        a.iter().map(rows).collect::<Vec<_>>(),
        c.iter().map(rows).collect::<Vec<_>>()
    );
    // Successive iterations draw different orders.
    let per_iter = a.len() / 3;
    assert_ne!(rows(&a[0]), rows(&a[per_iter]));
}

#[test]
fn resume_from_saved_state_is_bit_identical() {
    // Two dataset paths, so the walk crosses a set boundary inside each
    // iteration as well as iteration boundaries.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    Layout::varied(17).write(&a, "train");
    Layout::varied(11).write(&b, "train");
    let mut cfg = config(&[&a, &b], 4);
    cfg.epochs_per_iter = 2;
    cfg.num_replicas = 2;
    cfg.rank = 1;
    let iterations = 3;

    // Straight: batches, and the saved position after each batch and after
    // each iteration's end (the same place, seen from both sides).
    let mut ds = open(&cfg, Split::Train);
    let mut straight = Vec::new();
    let mut states = vec![(0, ds.state().clone())];
    for _ in 0..iterations {
        let mut it = ds.train_batches();
        while let Some(batch) = it.next() {
            straight.push(batch);
            states.push((straight.len(), it.state().clone()));
        }
        states.push((straight.len(), ds.state().clone()));
    }
    assert!(straight.iter().any(|b| b.set_name == "all1"));
    assert!(straight.iter().any(|b| b.set_name == "all"));

    for (k, state) in states {
        let json = serde_json::to_string(&state).unwrap();
        let back: LoaderState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let mut resumed = open(&cfg, Split::Train);
        resumed.restore(back).unwrap();
        // The rest of the interrupted iteration, then whole ones.
        let mut rest: Vec<Batch> = Vec::new();
        while k + rest.len() < straight.len() {
            rest.extend(resumed.train_batches());
        }
        assert_eq!(
            &rest[..],
            &straight[k..],
            "resumed after {k} batches: {json}"
        );
    }
}

#[test]
fn restore_rejects_foreign_states() {
    let tmp = tempfile::tempdir().unwrap();
    Layout::varied(5).write(tmp.path(), "train");
    let cfg = config(&[tmp.path()], 2);
    let mut ds = open(&cfg, Split::Train);
    let good = ds.state().clone();
    let e = ds
        .restore(LoaderState {
            seed: 7,
            ..good.clone()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("seed 7") && e.contains("seed 42"), "{e}");
    let e = ds
        .restore(LoaderState {
            set_index: Some(3),
            ..good.clone()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("set 3"), "{e}");
    let e = ds
        .restore(LoaderState {
            set_index: Some(0),
            start_index: 99,
            ..good.clone()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("99"), "{e}");
    ds.restore(good).unwrap();
}

#[test]
fn test_batches_cover_every_example_in_order_with_padding() {
    let tmp = tempfile::tempdir().unwrap();
    // 21 examples; empty puzzles in between check the puzzle lookup.
    let layout = Layout::new(&[&[3, 0, 4], &[5], &[0, 2, 7]]);
    assert_eq!(layout.examples(), 21);
    layout.write(tmp.path(), "test");
    let pidx = layout.puzzle_indices();
    for replicas in [1usize, 2, 4] {
        let local = 8 / replicas;
        let mut all = Vec::new();
        for rank in 0..replicas {
            let mut cfg = config(&[tmp.path()], 8);
            cfg.test_set_mode = true;
            cfg.epochs_per_iter = 0; // unused in test mode
            cfg.rank = rank;
            cfg.num_replicas = replicas;
            let mut ds = open(&cfg, Split::Test);
            let batches: Vec<Batch> = ds.batches().collect();
            assert_eq!(batches, ds.test_batches().collect::<Vec<_>>());
            assert_eq!(
                batches
                    .iter()
                    .map(|b| b.effective_global_size)
                    .collect::<Vec<_>>(),
                vec![8, 8, 5]
            );
            for (k, b) in batches.iter().enumerate() {
                assert_eq!(b.batch_size, local);
                assert_eq!(b.set_name, "all");
                for i in 0..local {
                    let e = k * 8 + rank * local + i;
                    let (inp, lab) = (
                        &b.inputs[i * SEQ..(i + 1) * SEQ],
                        &b.labels[i * SEQ..(i + 1) * SEQ],
                    );
                    if e < 21 {
                        let r = rows(&Batch {
                            inputs: inp.to_vec(),
                            labels: lab.to_vec(),
                            puzzle_identifiers: vec![b.puzzle_identifiers[i]],
                            batch_size: 1,
                            ..b.clone()
                        })[0];
                        assert_eq!(r.example, e);
                        // searchsorted: the non-empty puzzle holding e.
                        let p = (0..layout.puzzles())
                            .find(|&p| pidx[p] <= e && e < pidx[p + 1])
                            .unwrap();
                        assert_eq!(r.puzzle, p);
                        assert_eq!(r.identifier, ID_BASE + p as i32);
                        all.push(e);
                    } else {
                        // Padding: pad inputs, ignored labels, the blank identifier.
                        assert!(inp.iter().all(|&t| t == 0), "rank {rank} row {i}");
                        assert!(lab.iter().all(|&t| t == IGNORE_LABEL_ID));
                        assert_eq!(b.puzzle_identifiers[i], 0);
                    }
                }
            }
        }
        all.sort();
        assert_eq!(all, (0..21).collect::<Vec<_>>(), "replicas {replicas}");
    }
}

#[test]
fn labels_equal_to_the_ignore_id_become_ignore() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(&[&[2]]);
    for (ignore, want_pad, want_eos) in [
        (Some(0), IGNORE_LABEL_ID, 1),
        (None, 0, 1),
        (Some(1), 0, IGNORE_LABEL_ID),
    ] {
        let mut meta = layout.metadata();
        meta.ignore_label_id = ignore;
        layout.write_with(tmp.path(), "test", &meta);
        let mut cfg = config(&[tmp.path()], 2);
        cfg.test_set_mode = true;
        let ds = open(&cfg, Split::Test);
        let b = ds.test_batches().next().unwrap();
        for i in 0..2 {
            let lab = &b.labels[i * SEQ..(i + 1) * SEQ];
            assert_eq!(undigits(&lab[0..4]), i, "{ignore:?}");
            assert_eq!(lab[4], want_eos, "{ignore:?}");
            assert!(lab[5..].iter().all(|&t| t == want_pad), "{ignore:?}");
            // Inputs are never mapped.
            assert_eq!(b.inputs[i * SEQ + 899], 0);
        }
    }
}

#[test]
fn several_dataset_paths_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (la, lb) = (Layout::varied(10), Layout::new(&[&[2, 2], &[4]]));
    for split in ["train", "test"] {
        la.write(&a, split);
        lb.write(&b, split);
    }
    let (ma, mb) = (la.metadata(), lb.metadata());
    let cfg = config(&[&a, &b], 2);
    let mut ds = open(&cfg, Split::Train);
    assert_eq!(ds.set_names(), vec!["all", "all1"]);
    let m = ds.metadata().clone();
    assert_eq!(m.total_puzzles, ma.total_puzzles + mb.total_puzzles);
    assert_eq!(m.total_groups, ma.total_groups + mb.total_groups);
    assert_eq!(
        m.num_puzzle_identifiers,
        ma.num_puzzle_identifiers + mb.num_puzzle_identifiers
    );
    let want = (ma.mean_puzzle_examples * ma.total_puzzles as f64
        + mb.mean_puzzle_examples * mb.total_puzzles as f64)
        / m.total_puzzles as f64;
    assert!((m.mean_puzzle_examples - want).abs() < 1e-12);
    assert_eq!((m.seq_len, m.sets.clone()), (SEQ, vec!["all".to_string()]));
    assert_eq!(ds.total_examples(), la.examples() + lb.examples());

    // Training walks "all" then "all1"; each batch's rows come from its set.
    let names: Vec<String> = ds.train_batches().map(|b| b.set_name).collect();
    let first_b = names.iter().position(|n| n == "all1").unwrap();
    assert!(first_b > 0 && names[first_b..].iter().all(|n| n == "all1"));
    for batch in ds.train_batches() {
        let l = if batch.set_name == "all" { &la } else { &lb };
        for r in rows(&batch) {
            assert!(r.example < l.examples() && r.puzzle < l.puzzles());
        }
    }

    // Test iteration: all of "all", then all of "all1".
    let mut cfg = cfg;
    cfg.test_set_mode = true;
    let ds = open(&cfg, Split::Test);
    let got: Vec<(String, usize)> = ds
        .test_batches()
        .flat_map(|b| {
            let name = b.set_name.clone();
            rows(&b).into_iter().map(move |r| (name.clone(), r.example))
        })
        .collect();
    let want: Vec<(String, usize)> = (0..la.examples())
        .map(|e| ("all".to_string(), e))
        .chain((0..lb.examples()).map(|e| ("all1".to_string(), e)))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn mismatched_metadata_is_an_error_naming_paths_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let layout = Layout::varied(4);
    layout.write(&a, "train");
    let mut meta = layout.metadata();
    meta.pad_id = 3;
    layout.write_with(&b, "train", &meta);
    let e = open_err(&config(&[&a, &b], 2), Split::Train);
    assert!(e.contains("pad_id"), "{e}");
    assert!(e.contains(&a.display().to_string()), "{e}");
    assert!(e.contains(&b.display().to_string()), "{e}");

    let mut meta = layout.metadata();
    meta.sets = vec!["all".into(), "more".into()];
    layout.write_with(&b, "train", &meta);
    let e = open_err(&config(&[&a, &b], 2), Split::Train);
    assert!(e.contains("sets"), "{e}");
}

#[test]
fn missing_files_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    Layout::varied(4).write(tmp.path(), "train");
    let cfg = config(&[tmp.path()], 2);
    open(&cfg, Split::Train);

    // A split never built.
    let e = open_err(&cfg, Split::Test);
    assert!(
        e.contains("dataset.json") && e.contains("incomplete"),
        "{e}"
    );

    for f in ["all__labels.npy", "all__group_indices.npy"] {
        let p = tmp.path().join("train").join(f);
        let saved = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        let e = open_err(&cfg, Split::Train);
        assert!(e.contains(f) && e.contains("incomplete"), "{e}");
        std::fs::write(&p, saved).unwrap();
    }

    let e = open_err(&config(&[&tmp.path().join("nope")], 2), Split::Train);
    assert!(
        e.contains("nope") && e.contains("no such dataset folder"),
        "{e}"
    );
}

#[test]
fn config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    Layout::varied(4).write(tmp.path(), "train");
    let mut cfg = config(&[tmp.path()], 6);
    cfg.num_replicas = 4;
    let e = open_err(&cfg, Split::Train);
    assert!(
        e.contains("6") && e.contains("multiple") && e.contains("4"),
        "{e}"
    );
    cfg.num_replicas = 3;
    cfg.rank = 3;
    assert!(open_err(&cfg, Split::Train).contains("rank 3"));
    let mut cfg = config(&[], 6);
    assert!(open_err(&cfg, Split::Train).contains("no dataset paths"));
    cfg = config(&[tmp.path()], 0);
    assert!(open_err(&cfg, Split::Train).contains("batch size"));
    cfg = config(&[tmp.path()], 2);
    cfg.epochs_per_iter = 0;
    assert!(open_err(&cfg, Split::Train).contains("epochs"));
    assert!(matches!(
        PuzzleDataset::open(cfg, Split::Train),
        Err(LoaderError::Config(_))
    ));
}

#[test]
fn inconsistent_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(&[&[2, 1], &[3]]);
    let dir = tmp.path().join("train");
    let cfg = config(&[tmp.path()], 2);
    let f = |k: &str| dir.join(format!("all__{k}.npy"));
    let check = |what: &str, file: &str, expect: &[&str], damage: &dyn Fn()| {
        layout.write(tmp.path(), "train");
        damage();
        let e = open_err(&cfg, Split::Train);
        assert!(e.contains(file), "{what}: {e}");
        for x in expect {
            assert!(e.contains(x), "{what}: {e}");
        }
    };
    check(
        "labels shape",
        "all__labels.npy",
        &["[5, 900]", "[6, 900]"],
        &|| {
            NpyWriter::create(&f("labels"), Dtype::U8, &[5, SEQ])
                .unwrap()
                .finish()
                .unwrap();
        },
    );
    check("seq_len", "all__inputs.npy", &["30", "900"], &|| {
        NpyWriter::create(&f("inputs"), Dtype::U8, &[6, 30])
            .unwrap()
            .finish()
            .unwrap();
    });
    check("inputs dtype", "all__inputs.npy", &["2-D"], &|| {
        write_i32(&f("inputs"), &[0; 6]).unwrap();
    });
    check(
        "puzzle_indices end",
        "all__puzzle_indices.npy",
        &["ends at 5", "expected 6"],
        &|| {
            write_i32(&f("puzzle_indices"), &[0, 2, 3, 5]).unwrap();
        },
    );
    check(
        "puzzle_indices order",
        "all__puzzle_indices.npy",
        &["non-decreasing"],
        &|| {
            write_i32(&f("puzzle_indices"), &[0, 4, 3, 6]).unwrap();
        },
    );
    check(
        "identifier count",
        "all__puzzle_identifiers.npy",
        &["2 puzzle identifiers"],
        &|| {
            write_i32(&f("puzzle_identifiers"), &[1, 2]).unwrap();
        },
    );
    check(
        "group_indices end",
        "all__group_indices.npy",
        &["ends at 2", "expected 3"],
        &|| {
            write_i32(&f("group_indices"), &[0, 2]).unwrap();
        },
    );
    check(
        "empty group",
        "all__group_indices.npy",
        &["group 1 has no puzzles"],
        &|| {
            write_i32(&f("group_indices"), &[0, 2, 2, 3]).unwrap();
        },
    );
    check(
        "not npy",
        "all__group_indices.npy",
        &["not a valid .npy"],
        &|| {
            std::fs::write(f("group_indices"), b"hello world, not numpy").unwrap();
        },
    );
}

#[test]
fn validate_checks_token_ranges() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(&[&[2, 1], &[3]]);
    layout.write(tmp.path(), "train");
    let cfg = config(&[tmp.path()], 2);
    open(&cfg, Split::Train).validate().unwrap();

    let mut meta = layout.metadata();
    meta.vocab_size = 11; // token 11 (colour 9) is then out of range
    layout.write_with(tmp.path(), "train", &meta);
    let e = open(&cfg, Split::Train).validate().unwrap_err().to_string();
    assert!(
        e.contains("all__inputs.npy") && e.contains("token 11"),
        "{e}"
    );

    let mut meta = layout.metadata();
    meta.num_puzzle_identifiers = 101;
    layout.write_with(tmp.path(), "train", &meta);
    let e = open(&cfg, Split::Train).validate().unwrap_err().to_string();
    assert!(
        e.contains("all__puzzle_identifiers.npy") && e.contains("101"),
        "{e}"
    );
}

/// A dataset written by numpy and `json.dump`, as the reference builder
/// writes it (uint8 rows, int32 indices, `ignore_label_id` 0).
#[test]
fn loads_a_dataset_written_by_numpy() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
import json, os, sys
import numpy as np
root = sys.argv[1]
for split in ["train", "test"]:
    os.makedirs(os.path.join(root, split))
    sizes = [3, 1, 4, 2, 5, 2]            # examples per puzzle
    groups = [0, 2, 3, 6]                 # puzzle ranges of the groups
    n = sum(sizes)
    i = np.arange(n, dtype=np.int64)[:, None]
    j = np.arange(900, dtype=np.int64)[None, :]
    inputs = ((i * 7 + j) % 12).astype(np.uint8)
    labels = ((i * 5 + j * 3) % 12).astype(np.uint8)
    arrays = {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.array([9, 3, 7, 1, 4, 8], dtype=np.int32),
        "puzzle_indices": np.array(np.concatenate([[0], np.cumsum(sizes)]), dtype=np.int32),
        "group_indices": np.array(groups, dtype=np.int32),
    }
    for k, v in arrays.items():
        np.save(os.path.join(root, split, "all__" + k + ".npy"), v)
    meta = dict(seq_len=900, vocab_size=12, pad_id=0, ignore_label_id=0, blank_identifier_id=0,
                num_puzzle_identifiers=10, total_groups=3, mean_puzzle_examples=n / 6,
                total_puzzles=6, sets=["all"])
    with open(os.path.join(root, split, "dataset.json"), "w") as f:
        json.dump(meta, f)
"#;
    let py = common::python_with_numpy();
    let out = Command::new(&py)
        .arg("-c")
        .arg(script)
        .arg(tmp.path())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = 17;
    let puzzle_of = |e: usize| [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4, 4, 5, 5][e];
    let ids = [9, 3, 7, 1, 4, 8];
    let input = |e: usize, j: usize| ((e * 7 + j) % 12) as i32;
    let label = |e: usize, j: usize| match ((e * 5 + j * 3) % 12) as i32 {
        0 => IGNORE_LABEL_ID,
        t => t,
    };

    let mut cfg = config(&[tmp.path()], 4);
    cfg.test_set_mode = true;
    let ds = open(&cfg, Split::Test);
    ds.validate().unwrap();
    assert_eq!(ds.metadata().ignore_label_id, Some(0));
    assert_eq!(ds.metadata().total_puzzles, 6);
    let batches: Vec<Batch> = ds.test_batches().collect();
    assert_eq!(batches.len(), 5);
    for (k, b) in batches.iter().enumerate() {
        for r in 0..4 {
            let e = k * 4 + r;
            let row = &b.inputs[r * SEQ..(r + 1) * SEQ];
            let lab = &b.labels[r * SEQ..(r + 1) * SEQ];
            if e < n {
                assert!(
                    row.iter().enumerate().all(|(j, &t)| t == input(e, j)),
                    "example {e}"
                );
                assert!(
                    lab.iter().enumerate().all(|(j, &t)| t == label(e, j)),
                    "example {e}"
                );
                assert_eq!(b.puzzle_identifiers[r], ids[puzzle_of(e)]);
            } else {
                assert_eq!(b.puzzle_identifiers[r], 0);
            }
        }
    }

    // Training: every row matches the puzzle whose identifier it carries.
    cfg.test_set_mode = false;
    cfg.epochs_per_iter = 4;
    let mut ds = open(&cfg, Split::Train);
    let batches = train(&mut ds, 2);
    assert!(!batches.is_empty());
    for b in &batches {
        for r in 0..4 {
            let row = &b.inputs[r * SEQ..(r + 1) * SEQ];
            // Rows of examples e and e + 12 coincide ((e * 7) % 12 repeats),
            // so accept any example the row could be.
            let fits = (0..n)
                .filter(|&e| row.iter().enumerate().all(|(j, &t)| t == input(e, j)))
                .any(|e| ids[puzzle_of(e)] == b.puzzle_identifiers[r]);
            assert!(fits, "row {r} of batch {:?}", b.puzzle_identifiers);
        }
    }
}

#[test]
fn gathers_a_full_size_batch() {
    // 768 x 900, the reference's batch: shapes and one row's content.
    let tmp = tempfile::tempdir().unwrap();
    let groups: Vec<Vec<usize>> = (0..300).map(|g| vec![g % 5 + 2]).collect();
    let layout = Layout { groups };
    layout.write(tmp.path(), "train");
    let mut cfg = config(&[tmp.path()], 768);
    cfg.epochs_per_iter = 2;
    let mut ds = open(&cfg, Split::Train);
    let t = std::time::Instant::now();
    let batches: Vec<Batch> = ds.train_batches().collect();
    let per_batch = t.elapsed() / batches.len().max(1) as u32;
    assert!(!batches.is_empty());
    for b in &batches {
        assert_eq!(b.inputs.len(), 768 * SEQ);
        assert_eq!(rows(b).len(), 768);
    }
    eprintln!("{} batches of 768 x 900, {per_batch:?} each", batches.len());
}
