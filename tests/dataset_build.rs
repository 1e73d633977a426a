//! The dataset builder on small hand-made subsets and on the real ARC data:
//! split assignment, identifier numbering, augmentation groups, placement,
//! determinism, idempotence and the bad inputs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use trm::data::arc::Example;
use trm::data::augment::{puzzle_key, Augmentation};
use trm::data::builder::{build_dataset, BuildError, BuildOptions, BuildReport, BuildUi};
use trm::data::grid::{canvas_side, Grid, EOS_TOKEN, MAX_SIDE, PAD_TOKEN, SEQ_LEN};
use trm::data::metadata::DatasetMetadata;
use trm::data::npy::NpyArray;

const QUIET: BuildUi = BuildUi {
    verbose: false,
    force: false,
};

fn grid_json(r: usize, c: usize, seed: usize) -> Value {
    let rows: Vec<Vec<usize>> = (0..r)
        .map(|i| (0..c).map(|j| (i * 7 + j * 3 + seed) % 10).collect())
        .collect();
    json!(rows)
}

/// A subset of `n` puzzles named `{tag}{i}`, each with 2-3 train examples and
/// 1-2 test inputs of assorted shapes (up to 30x30).
fn write_subset(dir: &Path, subset: &str, tag: &str, n: usize, with_solutions: bool) {
    let mut chal = serde_json::Map::new();
    let mut sols = serde_json::Map::new();
    for i in 0..n {
        let shapes = [(3, 4), (1, 1), (5, 2), (30, 30), (2, 29), (7, 7)];
        let n_train = 2 + i % 2;
        let n_test = 1 + i % 2;
        let train: Vec<Value> = (0..n_train)
            .map(|k| {
                let (r, c) = shapes[(i + k) % shapes.len()];
                json!({"input": grid_json(r, c, i * 10 + k), "output": grid_json(c, r, i * 10 + k + 1)})
            })
            .collect();
        let mut test = Vec::new();
        let mut sol = Vec::new();
        for k in 0..n_test {
            let (r, c) = shapes[(i + k + 3) % shapes.len()];
            test.push(json!({"input": grid_json(r, c, 50 + i + k)}));
            sol.push(grid_json(r.min(4), c, 70 + i + k));
        }
        chal.insert(
            format!("{tag}{i:03}"),
            json!({"train": train, "test": test}),
        );
        sols.insert(format!("{tag}{i:03}"), json!(sol));
    }
    std::fs::write(
        dir.join(format!("arc_{subset}_challenges.json")),
        Value::Object(chal).to_string(),
    )
    .unwrap();
    if with_solutions {
        std::fs::write(
            dir.join(format!("arc_{subset}_solutions.json")),
            Value::Object(sols).to_string(),
        )
        .unwrap();
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    prefix: String,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    write_subset(&root, "alpha", "a", 6, true);
    write_subset(&root, "beta", "b", 4, true);
    write_subset(&root, "gamma", "g", 3, true);
    Fixture {
        prefix: root.join("arc").display().to_string(),
        root,
        _tmp: tmp,
    }
}

fn opts(f: &Fixture, out: &str, num_aug: usize) -> BuildOptions {
    let mut o = BuildOptions::new(
        &f.prefix,
        &f.root.join(out),
        &["alpha", "beta", "gamma"],
        "beta",
    );
    o.num_aug = num_aug;
    o
}

struct Split {
    inputs: NpyArray,
    labels: NpyArray,
    ids: Vec<i64>,
    puzzle_indices: Vec<i64>,
    group_indices: Vec<i64>,
    meta: DatasetMetadata,
}

fn load_split(dir: &Path, split: &str) -> Split {
    let f = |name: &str| NpyArray::open(&dir.join(split).join(format!("all__{name}.npy"))).unwrap();
    Split {
        inputs: f("inputs"),
        labels: f("labels"),
        ids: f("puzzle_identifiers").to_i64_vec(),
        puzzle_indices: f("puzzle_indices").to_i64_vec(),
        group_indices: f("group_indices").to_i64_vec(),
        meta: DatasetMetadata::load(&dir.join(split).join("dataset.json")).unwrap(),
    }
}

fn identifiers(dir: &Path) -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("identifiers.json")).unwrap()).unwrap()
}

/// Locate the grid in a canvas of side `side`: its top-left is the first
/// colour token.
fn locate(canvas: &[u8], side: usize) -> Option<(usize, usize)> {
    let first = canvas.iter().position(|&t| t >= 2)?;
    Some((first / side, first % side))
}

/// The original examples of every puzzle, by id, from the challenge files.
fn originals(prefix: &str, subsets: &[&str]) -> HashMap<String, (Vec<Example>, Vec<Example>)> {
    let mut m = HashMap::new();
    for s in subsets {
        let sub = trm::data::arc::load_subset(prefix, s).unwrap();
        for p in sub.puzzles {
            m.insert(p.id, (p.train, p.test));
        }
    }
    m
}

/// Every example of a split, mapped back through its puzzle's inverse
/// augmentation, equals the original example at the same position, and the
/// canvas is exactly the rendering of the augmented grids at one offset.
/// The canvas side comes from the split's `seq_len`. Returns (examples
/// checked, examples not at (0,0)).
fn check_split_maps_back(
    dir: &Path,
    split: &str,
    orig: &HashMap<String, (Vec<Example>, Vec<Example>)>,
    test_set: &HashSet<String>,
) -> (usize, usize) {
    let s = load_split(dir, split);
    let names = identifiers(dir);
    let (mut checked, mut shifted) = (0, 0);
    let seq_len = s.meta.seq_len;
    let side = canvas_side(seq_len).expect("seq_len is a square canvas");
    let total = *s.puzzle_indices.last().unwrap() as usize;
    assert_eq!(s.inputs.shape, vec![total, seq_len]);
    assert_eq!(s.labels.shape, vec![total, seq_len]);
    let mut canvas = vec![0u8; seq_len];
    for (p, &pid) in s.ids.iter().enumerate() {
        let name = &names[pid as usize];
        let (base, aug) = Augmentation::parse_name(name).unwrap();
        let aug = aug.unwrap_or(Augmentation::IDENTITY);
        let (train, test) = &orig[base];
        let expected: Vec<&Example> = match (split, test_set.contains(base)) {
            ("test", _) => test.iter().collect(),
            (_, true) => train.iter().collect(),
            _ => train.iter().chain(test).collect(),
        };
        let (a, b) = (
            s.puzzle_indices[p] as usize,
            s.puzzle_indices[p + 1] as usize,
        );
        assert_eq!(b - a, expected.len(), "{name}: example count");
        let mut zero_offset = 0;
        for (k, i) in (a..b).enumerate() {
            let inp = &s.inputs.bytes()[i * seq_len..(i + 1) * seq_len];
            let lab = &s.labels.bytes()[i * seq_len..(i + 1) * seq_len];
            let (r0, c0) = locate(inp, side).expect("input has colours");
            assert_eq!(
                locate(lab, side),
                Some((r0, c0)),
                "{name}: input and output share the offset"
            );
            let (ai, ao) = (
                aug.apply(&expected[k].input),
                aug.apply(&expected[k].output),
            );
            ai.render(r0, c0, &mut canvas);
            assert_eq!(inp, &canvas[..], "{name} example {k}: input canvas");
            ao.render(r0, c0, &mut canvas);
            assert_eq!(lab, &canvas[..], "{name} example {k}: label canvas");
            // And the inverse mapping from the canvas itself.
            let mut shifted_canvas = vec![PAD_TOKEN; seq_len];
            for r in r0..side {
                for c in c0..side {
                    shifted_canvas[(r - r0) * side + (c - c0)] = inp[r * side + c];
                }
            }
            let back = aug.invert(&Grid::crop(&shifted_canvas).unwrap());
            assert_eq!(
                back, expected[k].input,
                "{name} example {k}: inverse augmentation"
            );
            if (r0, c0) == (0, 0) {
                zero_offset += 1;
            } else {
                shifted += 1;
            }
            checked += 1;
        }
        assert!(
            zero_offset >= 1,
            "{name}: one example per puzzle keeps offset (0, 0)"
        );
    }
    (checked, shifted)
}

#[test]
fn builds_the_reference_layout_and_every_example_maps_back() {
    let f = fixture();
    let o = opts(&f, "out", 12);
    let report = build_dataset(&o, QUIET).unwrap();
    let dir = f.root.join("out");
    for split in ["train", "test"] {
        for name in [
            "inputs",
            "labels",
            "puzzle_identifiers",
            "puzzle_indices",
            "group_indices",
        ] {
            assert!(dir.join(split).join(format!("all__{name}.npy")).is_file());
        }
    }
    assert!(dir.join("identifiers.json").is_file());
    assert!(!f.root.join("out.partial").exists());

    let orig = originals(&f.prefix, &["alpha", "beta", "gamma"]);
    let test_set: HashSet<String> = orig
        .keys()
        .filter(|k| k.starts_with('b'))
        .cloned()
        .collect();
    let (n_train, shifted) = check_split_maps_back(&dir, "train", &orig, &test_set);
    let (n_test, shifted_test) = check_split_maps_back(&dir, "test", &orig, &test_set);
    assert_eq!(n_train, report.train.examples);
    assert_eq!(n_test, report.test.as_ref().unwrap().examples);
    assert!(
        shifted > n_train / 2,
        "train examples are translated ({shifted}/{n_train})"
    );
    assert_eq!(shifted_test, 0, "test examples stay at (0, 0)");

    // Metadata as the reference writes it.
    let train = load_split(&dir, "train");
    assert_eq!(train.inputs.shape, vec![report.train.examples, 900]);
    assert_eq!(train.meta.seq_len, 900);
    assert_eq!(train.meta.vocab_size, 12);
    assert_eq!(train.meta.pad_id, 0);
    assert_eq!(train.meta.ignore_label_id, Some(0));
    assert_eq!(train.meta.blank_identifier_id, 0);
    assert_eq!(train.meta.sets, vec!["all".to_string()]);
    assert_eq!(train.meta.total_groups, 13);
    assert_eq!(train.meta.total_puzzles, 13 * 13);
    assert_eq!(
        *train.puzzle_indices.last().unwrap() as usize,
        report.train.examples
    );
    assert_eq!(
        *train.group_indices.last().unwrap() as usize,
        train.meta.total_puzzles
    );
    assert!(
        (train.meta.mean_puzzle_examples - report.train.examples as f64 / (13.0 * 13.0)).abs()
            < 1e-12
    );
    let test = load_split(&dir, "test");
    assert_eq!(test.meta.total_groups, 4);
    assert_eq!(
        test.meta.num_puzzle_identifiers,
        train.meta.num_puzzle_identifiers
    );
    // Alternating 1 and 2 test inputs over the 4 test-set puzzles, 13 members each.
    assert_eq!(report.test.as_ref().unwrap().examples, 13 * 6);

    // test_puzzles.json: the test-set puzzles with their solutions filled in.
    let tp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("test_puzzles.json")).unwrap())
            .unwrap();
    let tp = tp.as_object().unwrap();
    assert_eq!(tp.len(), 4);
    assert!(tp.keys().all(|k| k.starts_with('b')));
    assert!(tp.values().all(|p| p["test"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e.get("output").is_some())));
}

#[test]
fn identifiers_are_global_consecutive_in_train_order() {
    let f = fixture();
    let mut o = opts(&f, "ids", 5);
    o.puzzle_identifiers_start = 3;
    let report = build_dataset(&o, QUIET).unwrap();
    let dir = f.root.join("ids");
    let names = identifiers(&dir);
    assert_eq!(&names[..3], &["<blank>", "<blank>", "<blank>"]);
    assert_eq!(names.len(), report.num_identifiers);
    let train = load_split(&dir, "train");
    let expected: Vec<i64> = (3..3 + train.ids.len() as i64).collect();
    assert_eq!(
        train.ids, expected,
        "ids in train order, one per augmented puzzle"
    );
    // Test split reuses the train ids of the same names.
    let test = load_split(&dir, "test");
    let train_set: HashSet<i64> = train.ids.iter().copied().collect();
    assert!(test.ids.iter().all(|i| train_set.contains(i)));
    // Each group: the original name first, then its augmentations, all distinct.
    for g in 0..train.group_indices.len() - 1 {
        let (a, b) = (
            train.group_indices[g] as usize,
            train.group_indices[g + 1] as usize,
        );
        let first = &names[train.ids[a] as usize];
        assert!(
            !first.contains("|||"),
            "group starts with the original: {first}"
        );
        for p in a + 1..b {
            let (base, aug) = Augmentation::parse_name(&names[train.ids[p] as usize]).unwrap();
            assert_eq!(base, first);
            assert!(aug.is_some());
        }
    }
    // Subset order is kept: all alpha groups, then beta, then gamma.
    let tags: Vec<char> = (0..train.group_indices.len() - 1)
        .map(|g| {
            names[train.ids[train.group_indices[g] as usize] as usize]
                .chars()
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(tags.iter().collect::<String>(), "aaaaaabbbbggg");
}

#[test]
fn augmentations_in_a_group_are_distinct_puzzles() {
    let f = fixture();
    build_dataset(&opts(&f, "dd", 30), QUIET).unwrap();
    let dir = f.root.join("dd");
    let names = identifiers(&dir);
    let orig = originals(&f.prefix, &["alpha", "beta", "gamma"]);
    let train = load_split(&dir, "train");
    for g in 0..train.group_indices.len() - 1 {
        let (a, b) = (
            train.group_indices[g] as usize,
            train.group_indices[g + 1] as usize,
        );
        assert_eq!(b - a, 31);
        let mut keys = HashSet::new();
        for p in a..b {
            let (base, aug) = Augmentation::parse_name(&names[train.ids[p] as usize]).unwrap();
            let (tr, te) = &orig[base];
            assert!(keys.insert(puzzle_key(
                tr.iter().chain(te),
                &aug.unwrap_or(Augmentation::IDENTITY)
            )));
        }
    }
}

fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for split in ["train", "test"] {
        for entry in std::fs::read_dir(dir.join(split)).unwrap() {
            let p = entry.unwrap().path();
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out.push((
        "ids".into(),
        std::fs::read(dir.join("identifiers.json")).unwrap(),
    ));
    out.sort();
    out.into_iter()
        .map(|(p, b)| {
            (
                Path::new(&p)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                b,
            )
        })
        .collect()
}

#[test]
fn deterministic_per_seed_and_independent_of_threads() {
    let f = fixture();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    one.install(|| build_dataset(&opts(&f, "s1", 8), QUIET))
        .unwrap();
    two.install(|| build_dataset(&opts(&f, "s2", 8), QUIET))
        .unwrap();
    let mut other = opts(&f, "s3", 8);
    other.seed = 7;
    build_dataset(&other, QUIET).unwrap();
    let (a, b, c) = (
        read_all(&f.root.join("s1")),
        read_all(&f.root.join("s2")),
        read_all(&f.root.join("s3")),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "{} differs between thread counts", x.0);
    }
    let inputs = |v: &[(String, Vec<u8>)]| {
        v.iter()
            .find(|(n, _)| n == "all__inputs.npy")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(inputs(&a), inputs(&c), "another seed gives another dataset");
}

#[test]
fn skips_a_complete_build_and_rebuilds_when_asked_or_changed() {
    let f = fixture();
    let o = opts(&f, "idem", 4);
    let first = build_dataset(&o, QUIET).unwrap();
    assert!(!first.skipped);
    let info = f.root.join("idem").join("build_info.json");
    let before = std::fs::read_to_string(&info).unwrap();
    let again = build_dataset(&o, QUIET).unwrap();
    assert!(again.skipped);
    assert_eq!(
        std::fs::read_to_string(&info).unwrap(),
        before,
        "skip leaves the build untouched"
    );

    let forced = build_dataset(
        &o,
        BuildUi {
            verbose: false,
            force: true,
        },
    )
    .unwrap();
    assert!(!forced.skipped);

    // Other options: rebuilt in place.
    let mut o2 = o.clone();
    o2.num_aug = 2;
    let changed = build_dataset(&o2, QUIET).unwrap();
    assert!(!changed.skipped);
    assert_eq!(
        load_split(&f.root.join("idem"), "train").meta.total_puzzles,
        13 * 3
    );

    // Changed input file: rebuilt.
    write_subset(&f.root, "gamma", "g", 2, true);
    assert!(!build_dataset(&o2, QUIET).unwrap().skipped);
    assert_eq!(
        load_split(&f.root.join("idem"), "train").meta.total_groups,
        12
    );

    // A damaged build (truncated file) is not taken as complete.
    let inputs = f.root.join("idem/train/all__inputs.npy");
    let bytes = std::fs::read(&inputs).unwrap();
    std::fs::write(&inputs, &bytes[..bytes.len() / 2]).unwrap();
    assert!(!build_dataset(&o2, QUIET).unwrap().skipped);
    assert_eq!(std::fs::read(&inputs).unwrap().len(), bytes.len());

    // A leftover interrupted build is cleaned up and never mistaken for a dataset.
    std::fs::create_dir_all(f.root.join("idem2.partial/train")).unwrap();
    let mut o3 = o2.clone();
    o3.output_dir = f.root.join("idem2");
    assert!(!build_dataset(&o3, QUIET).unwrap().skipped);
    assert!(!f.root.join("idem2.partial").exists());
}

#[test]
fn refuses_to_replace_a_folder_that_is_not_a_dataset() {
    let f = fixture();
    let out = f.root.join("mine");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "precious").unwrap();
    let err = build_dataset(&opts(&f, "mine", 2), QUIET).unwrap_err();
    assert!(matches!(err, BuildError::NotADataset { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "precious"
    );
}

#[test]
fn missing_solutions_fill_test_outputs_with_a_black_cell() {
    let f = fixture();
    write_subset(&f.root, "delta", "d", 2, false);
    let mut o = BuildOptions::new(
        &f.prefix,
        &f.root.join("nosol"),
        &["alpha", "delta"],
        "delta",
    );
    o.num_aug = 0;
    let r: BuildReport = build_dataset(&o, QUIET).unwrap();
    let test = load_split(&f.root.join("nosol"), "test");
    assert_eq!(r.test.as_ref().unwrap().examples, 3);
    for i in 0..3 {
        let lab = &test.labels.bytes()[i * SEQ_LEN..(i + 1) * SEQ_LEN];
        // [[0]] at (0,0): colour 0 is token 2, then EOS right and below.
        assert_eq!(lab[0], 2);
        assert_eq!(lab[1], EOS_TOKEN);
        assert_eq!(lab[MAX_SIDE], EOS_TOKEN);
        assert_eq!(lab.iter().filter(|&&t| t != PAD_TOKEN).count(), 3);
    }
}

fn expect_error(f: &Fixture, subset: &str, needles: &[&str]) {
    let mut o = BuildOptions::new(&f.prefix, &f.root.join("bad"), &["alpha", subset], "alpha");
    o.num_aug = 1;
    let err = build_dataset(&o, QUIET).unwrap_err().to_string();
    for n in needles {
        assert!(err.contains(n), "error '{err}' should mention '{n}'");
    }
    assert!(!f.root.join("bad").exists(), "no output on error");
    assert!(
        !f.root.join("bad.partial").exists(),
        "no partial output on error"
    );
}

fn write_raw(f: &Fixture, subset: &str, chal: &str, sol: Option<&str>) {
    std::fs::write(f.root.join(format!("arc_{subset}_challenges.json")), chal).unwrap();
    if let Some(s) = sol {
        std::fs::write(f.root.join(format!("arc_{subset}_solutions.json")), s).unwrap();
    }
}

#[test]
fn bad_inputs_give_clear_errors_naming_file_and_puzzle() {
    let f = fixture();
    let ok_test = r#"[{"input": [[1]]}]"#;
    let ok_train = r#"[{"input": [[1, 2]], "output": [[3]]}]"#;
    let sol = r#"{"p1": [[[4]]]}"#;

    write_raw(&f, "malformed", r#"{"p1": {"train": [ "#, Some(sol));
    expect_error(
        &f,
        "malformed",
        &["arc_malformed_challenges.json", "malformed JSON", "line"],
    );

    let big = serde_json::to_string(&vec![vec![1; 31]; 2]).unwrap();
    write_raw(
        &f,
        "big",
        &format!(
            r#"{{"p1": {{"train": [{{"input": {big}, "output": [[1]]}}], "test": {ok_test}}}}}"#
        ),
        Some(sol),
    );
    expect_error(
        &f,
        "big",
        &[
            "arc_big_challenges.json",
            "'p1'",
            "more than 30 columns",
            "train example 0",
        ],
    );

    let tall = serde_json::to_string(&vec![vec![1; 2]; 31]).unwrap();
    write_raw(
        &f,
        "tall",
        &format!(
            r#"{{"p1": {{"train": [{{"input": [[1]], "output": {tall}}}], "test": {ok_test}}}}}"#
        ),
        Some(sol),
    );
    expect_error(&f, "tall", &["'p1'", "more than 30 rows", "'output'"]);

    write_raw(
        &f,
        "ragged",
        &format!(
            r#"{{"p1": {{"train": [{{"input": [[1, 2], [3]], "output": [[1]]}}], "test": {ok_test}}}}}"#
        ),
        Some(sol),
    );
    expect_error(
        &f,
        "ragged",
        &["arc_ragged_challenges.json", "'p1'", "ragged", "row 1"],
    );

    write_raw(
        &f,
        "colour",
        &format!(
            r#"{{"p1": {{"train": [{{"input": [[1, 10]], "output": [[1]]}}], "test": {ok_test}}}}}"#
        ),
        Some(sol),
    );
    expect_error(&f, "colour", &["'p1'", "cell (0, 1) is 10", "0..9"]);

    write_raw(
        &f,
        "negcolour",
        &format!(
            r#"{{"p1": {{"train": [{{"input": [[-1]], "output": [[1]]}}], "test": {ok_test}}}}}"#
        ),
        Some(sol),
    );
    expect_error(&f, "negcolour", &["'p1'", "is -1"]);

    write_raw(
        &f,
        "count",
        &format!(r#"{{"p1": {{"train": {ok_train}, "test": {ok_test}}}}}"#),
        Some(r#"{"p1": [[[4]], [[5]]]}"#),
    );
    expect_error(
        &f,
        "count",
        &[
            "arc_count_solutions.json",
            "'p1'",
            "2 solution grids for 1 test inputs",
        ],
    );

    write_raw(
        &f,
        "nosol",
        &format!(r#"{{"p1": {{"train": {ok_train}, "test": {ok_test}}}}}"#),
        Some(r#"{"p2": [[[4]]]}"#),
    );
    expect_error(
        &f,
        "nosol",
        &["arc_nosol_solutions.json", "'p1'", "no solutions"],
    );

    write_raw(
        &f,
        "badsol",
        &format!(r#"{{"p1": {{"train": {ok_train}, "test": {ok_test}}}}}"#),
        Some(r#"{"p1": [[[4, 12]]]}"#),
    );
    expect_error(
        &f,
        "badsol",
        &[
            "arc_badsol_solutions.json",
            "'p1'",
            "test example 0 'output'",
        ],
    );

    write_raw(
        &f,
        "notrain",
        &format!(r#"{{"p1": {{"train": [], "test": {ok_test}}}}}"#),
        Some(sol),
    );
    expect_error(&f, "notrain", &["'p1'", "'train' has no examples"]);

    expect_error(
        &f,
        "absent",
        &["arc_absent_challenges.json", "not found", "absent"],
    );

    let mut o = opts(&f, "dup", 1);
    o.subsets = vec!["alpha".into(), "alpha".into()];
    assert!(build_dataset(&o, QUIET)
        .unwrap_err()
        .to_string()
        .contains("listed twice"));
}

/// Synthetic puzzles with grids of at most `max_side` (train subset
/// "training", test subset "evaluation"), in a fresh folder.
fn synthetic(max_side: usize, seed: u64) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("arc").join("synthetic");
    trm::data::synthetic::write_arc_files(&prefix, 6, 3, max_side, seed).unwrap();
    (tmp, prefix.display().to_string())
}

fn synthetic_opts(prefix: &str, out: &Path, num_aug: usize, side: usize) -> BuildOptions {
    let mut o = BuildOptions::new(prefix, out, &["training", "evaluation"], "evaluation");
    o.num_aug = num_aug;
    o.canvas_side = side;
    o
}

#[test]
fn an_8x8_canvas_build_renders_every_example_at_seq_len_64() {
    let (tmp, prefix) = synthetic(8, 3);
    let (small, big) = (tmp.path().join("c8"), tmp.path().join("c30"));
    let r8 = build_dataset(&synthetic_opts(&prefix, &small, 6, 8), QUIET).unwrap();
    let r30 = build_dataset(&synthetic_opts(&prefix, &big, 6, MAX_SIDE), QUIET).unwrap();
    assert_eq!(r8.options.canvas_side, 8);
    assert_eq!(r8.original_puzzles, 9);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(small.join("build_info.json")).unwrap())
            .unwrap();
    assert_eq!(info["options"]["canvas_side"], 8);

    for split in ["train", "test"] {
        let s = load_split(&small, split);
        let n = if split == "train" {
            r8.train.examples
        } else {
            r8.test.as_ref().unwrap().examples
        };
        assert!(n > 0);
        assert_eq!(s.meta.seq_len, 64, "{split}");
        assert_eq!(s.inputs.shape, vec![n, 64], "{split}");
        assert_eq!(s.labels.shape, vec![n, 64], "{split}");
        assert_eq!(s.meta.vocab_size, 12);
        assert_eq!(load_split(&big, split).meta.seq_len, 900);
    }

    let orig = originals(&prefix, &["training", "evaluation"]);
    // Synthetic ids are "synt0000" (training) and "syne0000" (evaluation).
    let test_set: HashSet<String> = orig
        .keys()
        .filter(|k| k.starts_with("syne"))
        .cloned()
        .collect();
    assert_eq!(test_set.len(), 3);
    let (n_train, shifted) = check_split_maps_back(&small, "train", &orig, &test_set);
    let (n_test, shifted_test) = check_split_maps_back(&small, "test", &orig, &test_set);
    assert_eq!(n_train, r8.train.examples);
    assert_eq!(n_test, r8.test.as_ref().unwrap().examples);
    assert!(
        shifted > n_train / 4,
        "train examples are translated within 8x8 ({shifted}/{n_train})"
    );
    assert_eq!(shifted_test, 0, "test examples stay at (0, 0)");

    // Only the rendering depends on the canvas: groups, identifiers and
    // indices are those of the 30x30 build.
    assert_eq!(r8.train, r30.train);
    assert_eq!(r8.test, r30.test);
    assert_eq!(identifiers(&small), identifiers(&big));
    for split in ["train", "test"] {
        let (a, b) = (load_split(&small, split), load_split(&big, split));
        assert_eq!(a.ids, b.ids);
        assert_eq!(a.puzzle_indices, b.puzzle_indices);
        assert_eq!(a.group_indices, b.group_indices);
    }
    // Test examples sit at (0, 0), so each 8x8 canvas is the top-left window
    // of the 30x30 one (the frame is cut at the edge the same way).
    let (a, b) = (load_split(&small, "test"), load_split(&big, "test"));
    for i in 0..r8.test.as_ref().unwrap().examples {
        for r in 0..8 {
            let row8 = i * 64 + r * 8;
            let row30 = i * SEQ_LEN + r * MAX_SIDE;
            assert_eq!(
                &a.inputs.bytes()[row8..row8 + 8],
                &b.inputs.bytes()[row30..row30 + 8]
            );
            assert_eq!(
                &a.labels.bytes()[row8..row8 + 8],
                &b.labels.bytes()[row30..row30 + 8]
            );
        }
    }
}

#[test]
fn another_canvas_side_is_rebuilt_and_the_same_one_skipped() {
    let (tmp, prefix) = synthetic(6, 4);
    let out = tmp.path().join("ds");
    let default = synthetic_opts(&prefix, &out, 2, MAX_SIDE);
    assert!(!build_dataset(&default, QUIET).unwrap().skipped);
    let small = synthetic_opts(&prefix, &out, 2, 6);
    let r = build_dataset(&small, QUIET).unwrap();
    assert!(!r.skipped, "a new canvas side is a new build");
    assert_eq!(load_split(&out, "train").meta.seq_len, 36);
    assert!(build_dataset(&small, QUIET).unwrap().skipped);
    assert!(!build_dataset(&default, QUIET).unwrap().skipped);
    assert_eq!(load_split(&out, "train").meta.seq_len, 900);
    assert!(build_dataset(&default, QUIET).unwrap().skipped);
}

/// Build `subset` alone (it is also the test set) at canvas side `side`.
fn expect_canvas_error(f: &Fixture, subset: &str, side: usize, needles: &[&str]) -> BuildError {
    let mut o = BuildOptions::new(&f.prefix, &f.root.join("bad"), &[subset], subset);
    o.num_aug = 1;
    o.canvas_side = side;
    let err = build_dataset(&o, QUIET).unwrap_err();
    let text = err.to_string();
    for n in needles {
        assert!(text.contains(n), "error '{text}' should mention '{n}'");
    }
    assert!(!f.root.join("bad").exists(), "no output on error");
    assert!(!f.root.join("bad.partial").exists());
    err
}

#[test]
fn grids_larger_than_the_canvas_and_bad_sides_are_clear_errors() {
    let f = fixture();
    let g = |r: usize, c: usize| serde_json::to_string(&vec![vec![1; c]; r]).unwrap();
    let ok_test = r#"[{"input": [[1]]}]"#;
    let sol = r#"{"p1": [[[4]]]}"#;

    // A train input too wide: the challenges file, puzzle, place and sizes.
    write_raw(
        &f,
        "wide",
        &format!(
            r#"{{"p1": {{"train": [{{"input": [[1]], "output": [[2]]}}, {{"input": {}, "output": [[1]]}}], "test": {ok_test}}}}}"#,
            g(2, 9)
        ),
        Some(sol),
    );
    let err = expect_canvas_error(
        &f,
        "wide",
        8,
        &[
            "arc_wide_challenges.json",
            "'p1'",
            "train example 1 'input' is 2x9",
            "8x8 canvas",
            "at least 9",
        ],
    );
    assert!(
        matches!(
            err,
            BuildError::GridTooLarge {
                rows: 2,
                cols: 9,
                side: 8,
                puzzles: 1,
                needed: 9,
                ..
            }
        ),
        "{err:?}"
    );

    // A test output too tall comes from the solutions file; two puzzles of
    // three do not fit and the suggestion covers the largest grid (12).
    write_raw(
        &f,
        "tall",
        &format!(
            r#"{{"p1": {{"train": [{{"input": [[1]], "output": [[2]]}}], "test": {ok_test}}},
                "p2": {{"train": [{{"input": [[1]], "output": [[2]]}}], "test": {ok_test}}},
                "p3": {{"train": [{{"input": {}, "output": [[2]]}}], "test": {ok_test}}}}}"#,
            g(3, 12)
        ),
        Some(&format!(
            r#"{{"p1": [{}], "p2": [[[4]]], "p3": [[[4]]]}}"#,
            g(7, 3)
        )),
    );
    let err = expect_canvas_error(
        &f,
        "tall",
        6,
        &[
            "arc_tall_solutions.json",
            "'p1'",
            "test example 0 'output' is 7x3",
            "6x6 canvas",
            "2 puzzle(s)",
            "at least 12",
        ],
    );
    assert!(matches!(
        err,
        BuildError::GridTooLarge {
            puzzles: 2,
            needed: 12,
            ..
        }
    ));

    // Exactly the canvas side fits.
    let mut exact = synthetic_opts(&f.prefix, &f.root.join("exact"), 1, 12);
    exact.subsets = vec!["tall".into()];
    exact.test_set_name = "tall".into();
    let r = build_dataset(&exact, QUIET).unwrap();
    assert_eq!(load_split(&f.root.join("exact"), "train").meta.seq_len, 144);
    assert_eq!(r.original_puzzles, 3);

    // Synthetic grids up to 8x8 on a 6x6 canvas.
    let (tmp, prefix) = synthetic(8, 3);
    let mut o = synthetic_opts(&prefix, &tmp.path().join("ds"), 1, 6);
    let err = build_dataset(&o, QUIET).unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::GridTooLarge {
                side: 6,
                needed: 8,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!tmp.path().join("ds").exists());

    // Canvas sides outside 1..=30.
    for side in [0, 31] {
        o.canvas_side = side;
        let err = build_dataset(&o, QUIET).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, BuildError::Options(_)), "{err:?}");
        assert!(text.contains(&format!("canvas side {side}")), "{text}");
        assert!(text.contains("1..=30"), "{text}");
    }
    assert!(!tmp.path().join("ds").exists());
}

/// The real ARC-AGI-2 build (training2, evaluation2, concept; test set
/// evaluation2) with a few augmentations: 1280 puzzles, 120 test groups.
#[test]
fn real_arc_agi_2_subsets() {
    let prefix = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/arc-agi/arc-agi"
    );
    assert!(
        Path::new(&format!("{prefix}_training2_challenges.json")).is_file(),
        "the ARC data is expected at {prefix}_*.json"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut o = BuildOptions::new(
        prefix,
        &tmp.path().join("arc2"),
        &["training2", "evaluation2", "concept"],
        "evaluation2",
    );
    o.num_aug = 3;
    let r = build_dataset(&o, QUIET).unwrap();
    assert_eq!(r.original_puzzles, 1280);
    assert_eq!(r.train.groups, 1280);
    let test = r.test.as_ref().unwrap();
    assert_eq!(test.groups, 120);
    // 172 test inputs in evaluation2, each in every member of its group.
    let members: usize = r.train.puzzles;
    assert_eq!(r.num_identifiers, 1 + members);
    assert!(members <= 1280 * 4 && members > 1280 * 4 - 20, "{members}");
    let test_split = load_split(&tmp.path().join("arc2"), "test");
    let mut per_group_inputs = 0;
    for g in 0..test_split.group_indices.len() - 1 {
        let first = test_split.group_indices[g] as usize;
        per_group_inputs +=
            (test_split.puzzle_indices[first + 1] - test_split.puzzle_indices[first]) as usize;
    }
    assert_eq!(per_group_inputs, 172);
}

/// Runs `trm build-dataset` on the fixture's subsets into `out`.
fn cli_build(f: &Fixture, out: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_trm"))
        .args(["build-dataset", "--input-file-prefix", &f.prefix])
        .arg("--output-dir")
        .arg(out)
        .args([
            "--subsets",
            "alpha",
            "beta",
            "gamma",
            "--test-set-name",
            "beta",
        ])
        .args(["--num-aug", "2", "--threads", "1"])
        .args(extra)
        .output()
        .unwrap()
}

/// A second builder into a folder being built is refused at once, with the
/// first one's pid, and touches nothing.
#[test]
fn a_second_builder_into_one_folder_is_refused_with_the_others_pid() {
    let f = fixture();
    let out = f.root.join("shared");
    let held = trm::run_folder::lock(&out).unwrap();
    let run = cli_build(&f, &out, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", std::process::id())) && stderr.contains("wait for it"),
        "{stderr}"
    );
    assert!(!f.root.join("shared.partial").exists());
    assert!(!out.join("build_info.json").exists());
    drop(held);
    let run = cli_build(&f, &out, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // A fresh build keeps the folder locked throughout, even across the
    // swap into place: the lock file moved with the new build.
    assert!(out.join(trm::run_folder::LOCK_FILE).is_file());
    load_split(&out, "train");
}

/// A folder whose files do not all come from the build its build_info.json
/// describes (as two builders at once used to leave) is rebuilt, not kept.
#[test]
fn a_mixed_folder_is_not_kept() {
    let f = fixture();
    let o = opts(&f, "mixed", 2);
    build_dataset(&o, QUIET).unwrap();
    let mut other = opts(&f, "other", 2);
    other.seed = 7;
    build_dataset(&other, QUIET).unwrap();
    let name = "train/all__inputs.npy";
    let good = std::fs::read(f.root.join("mixed").join(name)).unwrap();
    let foreign = std::fs::read(f.root.join("other").join(name)).unwrap();
    assert_ne!(good, foreign, "the two builds differ in {name}");
    std::fs::write(f.root.join("mixed").join(name), &foreign).unwrap();

    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(f.root.join("mixed/build_info.json")).unwrap(),
    )
    .unwrap();
    assert!(info["files"][name]["sha256"].is_string(), "{info}");
    let again = build_dataset(&o, QUIET).unwrap();
    assert!(!again.skipped, "a mixed folder must not be kept");
    assert_eq!(
        std::fs::read(f.root.join("mixed").join(name)).unwrap(),
        good
    );
    assert!(build_dataset(&o, QUIET).unwrap().skipped);
}

/// A kill during `--force` between moving the old build aside and putting
/// the new one in place leaves `OUT.old` (and `OUT.partial`): the next build
/// puts the previous build back and cleans both; an `OUT.old` beside a
/// complete build is removed.
#[test]
fn the_next_build_cleans_what_a_killed_force_left() {
    let f = fixture();
    let o = opts(&f, "killed", 2);
    build_dataset(&o, QUIET).unwrap();
    let (out, old, partial) = (
        f.root.join("killed"),
        f.root.join("killed.old"),
        f.root.join("killed.partial"),
    );
    std::fs::rename(&out, &old).unwrap();
    std::fs::create_dir_all(partial.join("train")).unwrap();
    let run = cli_build(&f, &out, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("restored the previous build"), "{stderr}");
    assert!(!old.exists() && !partial.exists());
    assert!(build_dataset(&o, QUIET).unwrap().skipped, "the same build");

    std::fs::create_dir_all(old.join("train")).unwrap();
    std::fs::write(old.join("train/dataset.json"), "{}").unwrap();
    let run = cli_build(&f, &out, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("removed"), "{stderr}");
    assert!(!old.exists());

    // A folder of that name that is not a dataset is the user's: refused.
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("notes.txt"), "mine").unwrap();
    let run = cli_build(&f, &out, &["--force"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("move it away"), "{stderr}");
    assert!(old.join("notes.txt").is_file());
}
