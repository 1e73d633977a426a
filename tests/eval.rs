//! The ARC evaluator on hand-built predictions with known answers, and on a
//! real (tiny) dataset from the builder.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use trm::data::arc::grid_to_json;
use trm::data::augment::Augmentation;
use trm::data::builder::{build_dataset, BuildOptions, BuildUi};
use trm::data::grid::Grid;
use trm::data::npy::NpyArray;
use trm::data::synthetic::write_arc_files;
use trm::eval::{write_results, ArcEvaluator, ArcResult, EvalError, DEFAULT_PASS_KS};
use trm::model::act::EvalOutputs;

const SIDE: usize = 8;

fn grid(rows: &[&[u8]]) -> Grid {
    Grid::from_rows(&rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>()).unwrap()
}

/// A 2x3 grid whose cells are `seed..seed+6` (mod 10): every pair of seeds
/// gives different grids.
fn g23(seed: u8) -> Grid {
    let cells: Vec<u8> = (0..6).map(|i| (seed + i) % 10).collect();
    Grid::from_cells(2, 3, &cells)
}

/// A dataset folder with hand-written `identifiers.json` (blank at 0, then
/// `names`) and `test_puzzles.json` (`puzzles`: id -> test pairs).
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn fixture(names: &[String], puzzles: &[(&str, Vec<(Grid, Grid)>)]) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let mut ids = vec![Value::from("<blank>")];
    ids.extend(names.iter().map(|n| Value::from(n.as_str())));
    std::fs::write(dir.join("identifiers.json"), Value::Array(ids).to_string()).unwrap();
    let mut tp = serde_json::Map::new();
    for (id, tests) in puzzles {
        let tests: Vec<Value> = tests
            .iter()
            .map(|(i, o)| json!({"input": grid_to_json(i), "output": grid_to_json(o)}))
            .collect();
        tp.insert(id.to_string(), json!({"train": [], "test": tests}));
    }
    std::fs::write(dir.join("test_puzzles.json"), Value::Object(tp).to_string()).unwrap();
    Fixture { _tmp: tmp, dir }
}

fn names(ns: &[&str]) -> Vec<String> {
    ns.iter().map(|s| s.to_string()).collect()
}

fn canvas(g: &Grid) -> Vec<i32> {
    let mut c = vec![0u8; SIDE * SIDE];
    g.render(0, 0, &mut c);
    c.into_iter().map(i32::from).collect()
}

fn outputs() -> EvalOutputs {
    EvalOutputs {
        seq_len: SIDE * SIDE,
        ..EvalOutputs::default()
    }
}

fn push(out: &mut EvalOutputs, id: i32, input: &Grid, pred: &Grid, q: f32) {
    out.puzzle_ids.push(id);
    out.inputs.extend(canvas(input));
    out.preds.extend(canvas(pred));
    out.q_halt.push(q);
}

fn metric(r: &ArcResult, k: usize) -> f64 {
    let key = format!("ARC/pass@{k}");
    r.metrics.iter().find(|(n, _)| *n == key).unwrap().1
}

fn attempts(r: &ArcResult, puzzle: &str, test: usize) -> (Value, Value) {
    let e = &r.submission[puzzle][test];
    (e["attempt_1"].clone(), e["attempt_2"].clone())
}

#[test]
fn votes_rank_before_mean_q_and_mean_q_breaks_ties() {
    let input = g23(0);
    let (a, t, c) = (g23(1), g23(2), g23(3));
    // "p": the truth T ties A on votes but has the higher mean q.
    // "q": the truth C has the best q but one vote only: third.
    let f = fixture(
        &names(&["p", "q"]),
        &[("p", vec![(input, t)]), ("q", vec![(input, c)])],
    );
    let mut ev = ArcEvaluator::new(&f.dir, &DEFAULT_PASS_KS).unwrap();
    let mut out = outputs();
    for id in [1, 2] {
        push(&mut out, id, &input, &a, -1.0);
        push(&mut out, id, &input, &t, 2.0);
        push(&mut out, id, &input, &c, 9.0);
        push(&mut out, id, &input, &a, -1.0);
        push(&mut out, id, &input, &t, 2.0);
    }
    ev.add(&out).unwrap();
    let r = ev.result();
    assert_eq!(metric(&r, 1), 0.5);
    assert_eq!(metric(&r, 2), 0.5);
    assert_eq!(metric(&r, 5), 1.0);
    assert_eq!(attempts(&r, "p", 0), (grid_to_json(&t), grid_to_json(&a)));
    let rep = &r.report.puzzles;
    assert_eq!(rep[0].tests[0].solution_rank, Some(1));
    assert_eq!(rep[1].tests[0].solution_rank, Some(3));
    let top = &rep[0].tests[0].top;
    assert_eq!(
        top.iter().map(|c| c.votes).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!((top[0].mean_q - sig(2.0)).abs() < 1e-12);
    assert!((top[1].mean_q - sig(-1.0)).abs() < 1e-12);
    assert!(top[0].correct && !top[1].correct);
    assert_eq!(rep[0].tests[0].votes, 5);
    assert_eq!(rep[0].tests[0].candidates, 3);
}

#[test]
fn exact_ties_keep_first_seen_order() {
    let input = g23(0);
    let (a, b) = (g23(1), g23(2));
    let f = fixture(&names(&["p"]), &[("p", vec![(input, b)])]);
    let mut ev = ArcEvaluator::new(&f.dir, &[1, 2]).unwrap();
    let mut out = outputs();
    push(&mut out, 1, &input, &a, 0.5);
    push(&mut out, 1, &input, &b, 0.5);
    ev.add(&out).unwrap();
    let r = ev.result();
    assert_eq!(
        r.metrics,
        vec![
            (String::from("ARC/pass@1"), 0.0),
            (String::from("ARC/pass@2"), 1.0)
        ]
    );
    assert_eq!(attempts(&r, "p", 0), (grid_to_json(&a), grid_to_json(&b)));
}

#[test]
fn several_test_inputs_score_partially() {
    let (i0, i1) = (g23(0), g23(5));
    let (o0, o1) = (g23(1), g23(6));
    let f = fixture(&names(&["p"]), &[("p", vec![(i0, o0), (i1, o1)])]);
    let mut ev = ArcEvaluator::new(&f.dir, &[1, 2]).unwrap();
    let mut out = outputs();
    push(&mut out, 1, &i0, &o0, 0.0);
    push(&mut out, 1, &i1, &o0, 0.0); // wrong for the second input
    ev.add(&out).unwrap();
    let r = ev.result();
    assert_eq!(metric(&r, 1), 0.5);
    assert_eq!(metric(&r, 2), 0.5);
    assert_eq!(r.submission["p"].as_array().unwrap().len(), 2);
    assert_eq!(attempts(&r, "p", 1).0, grid_to_json(&o0));
    assert_eq!(r.report.puzzles[0].solved_pass1, 1);
    assert_eq!(r.report.puzzles[0].solved_pass2, 1);
}

#[test]
fn a_single_candidate_is_repeated_as_attempt_2() {
    let (input, output) = (g23(0), grid(&[&[7, 7], &[0, 7]]));
    let f = fixture(&names(&["p"]), &[("p", vec![(input, output)])]);
    let mut ev = ArcEvaluator::new(&f.dir, &[1]).unwrap();
    let mut out = outputs();
    for _ in 0..3 {
        push(&mut out, 1, &input, &output, 1.0);
    }
    ev.add(&out).unwrap();
    let r = ev.result();
    assert_eq!(metric(&r, 1), 1.0);
    let (a1, a2) = attempts(&r, "p", 0);
    assert_eq!(a1, json!([[7, 7], [0, 7]]));
    assert_eq!(a1, a2);
}

#[test]
fn puzzles_without_predictions_score_zero_and_submit_zero_grids() {
    let (input, output) = (g23(0), g23(1));
    let f = fixture(
        &names(&["p", "empty"]),
        &[
            ("p", vec![(input, output)]),
            ("empty", vec![(g23(2), g23(3)), (g23(4), g23(5))]),
            ("partial", vec![(g23(6), g23(7)), (input, output)]),
        ],
    );
    let mut ev = ArcEvaluator::new(&f.dir, &[1, 1000]).unwrap();
    let mut out = outputs();
    push(&mut out, 1, &input, &output, 0.0);
    ev.add(&out).unwrap();
    let r = ev.result();
    // Only "p" is solved, out of three puzzles.
    assert!((metric(&r, 1) - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(metric(&r, 1), metric(&r, 1000));
    let zero = json!([[0]]);
    let sub = r.submission.as_object().unwrap();
    assert_eq!(
        sub.keys().collect::<Vec<_>>(),
        vec!["p", "empty", "partial"]
    );
    for (p, n) in [("empty", 2), ("partial", 2)] {
        assert_eq!(sub[p].as_array().unwrap().len(), n);
        for t in 0..n {
            assert_eq!(attempts(&r, p, t), (zero.clone(), zero.clone()));
        }
    }
    assert_eq!(r.report.puzzles[1].tests[0].votes, 0);
    assert_eq!(r.report.puzzles[1].tests[0].solution_rank, None);
}

#[test]
fn augmentations_are_undone_before_voting() {
    // Non-square, asymmetric, several colours: every transform and colour
    // map changes it.
    let input = grid(&[&[1, 2, 0], &[3, 0, 4]]);
    let output = grid(&[&[5, 1, 0], &[0, 9, 2], &[8, 0, 0]]);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut augs = vec![Augmentation::IDENTITY];
    for tid in 0..8u8 {
        for _ in 0..3 {
            let mut a = Augmentation::random(&mut rng);
            a.tid = tid;
            augs.push(a);
        }
    }
    let mut ns: Vec<String> = augs.iter().map(|a| a.name("p")).collect();
    ns.dedup();
    let f = fixture(&ns, &[("p", vec![(input, output)])]);
    let mut ev = ArcEvaluator::new(&f.dir, &DEFAULT_PASS_KS).unwrap();
    let mut out = outputs();
    for a in &augs {
        let id = 1 + ns.iter().position(|n| *n == a.name("p")).unwrap() as i32;
        push(&mut out, id, &a.apply(&input), &a.apply(&output), 0.0);
    }
    ev.add(&out).unwrap();
    let r = ev.result();
    for k in DEFAULT_PASS_KS {
        assert_eq!(metric(&r, k), 1.0, "pass@{k}");
    }
    assert_eq!(attempts(&r, "p", 0).0, grid_to_json(&output));
    let t = &r.report.puzzles[0].tests[0];
    assert_eq!((t.votes, t.candidates), (augs.len(), 1));
    assert_eq!(r.report.unmatched_examples, 0);

    // Filed under the plain name, an augmented input matches no test input.
    let mut ev = ArcEvaluator::new(&f.dir, &[1]).unwrap();
    let mut out = outputs();
    let a = augs[5];
    push(&mut out, 1, &a.apply(&input), &a.apply(&output), 0.0);
    ev.add(&out).unwrap();
    let r = ev.result();
    assert_eq!(metric(&r, 1), 0.0);
    assert_eq!((r.report.examples, r.report.unmatched_examples), (1, 1));
}

#[test]
fn pass_at_k_is_monotone_in_k() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n_puzzles = 12;
    let ids: Vec<String> = (0..n_puzzles).map(|i| format!("p{i}")).collect();
    let puzzles: Vec<(&str, Vec<(Grid, Grid)>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let tests = (0..1 + i % 3)
                .map(|t| (g23((10 * i + t) as u8), g23((i + t + 1) as u8)))
                .collect();
            (id.as_str(), tests)
        })
        .collect();
    let f = fixture(&ids, &puzzles);
    let ks = [1, 2, 3, 5, 10, 100];
    let mut ev = ArcEvaluator::new(&f.dir, &ks).unwrap();
    let mut out = outputs();
    for (p, (_, tests)) in puzzles.iter().enumerate() {
        for (input, _) in tests {
            for _ in 0..rng.gen_range(0..30) {
                // Ten possible grids; the truth is one of them.
                let pred = g23(rng.gen_range(0..10));
                push(
                    &mut out,
                    p as i32 + 1,
                    input,
                    &pred,
                    rng.gen_range(-3.0..3.0),
                );
            }
        }
    }
    ev.add(&out).unwrap();
    let r = ev.result();
    let values: Vec<f64> = r.metrics.iter().map(|m| m.1).collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert!(values[0] < values[5], "{values:?}");
    // pass@100 > number of candidates: solved iff predicted at all.
    let predicted: f64 = r
        .report
        .puzzles
        .iter()
        .map(|p| {
            let hit = p.tests.iter().filter(|t| t.solution_rank.is_some()).count();
            hit as f64 / p.tests.len() as f64
        })
        .sum::<f64>()
        / n_puzzles as f64;
    assert!((values[5] - predicted).abs() < 1e-12);
}

#[test]
fn batches_accumulate_and_blank_rows_are_skipped() {
    let input = g23(0);
    let (a, t) = (g23(1), g23(2));
    let f = fixture(&names(&["p"]), &[("p", vec![(input, t)])]);
    let mut whole = outputs();
    push(&mut whole, 1, &input, &a, 0.0);
    push(&mut whole, 1, &input, &t, 0.0);
    push(&mut whole, 1, &input, &t, 0.0);
    let mut ev = ArcEvaluator::new(&f.dir, &[1]).unwrap();
    ev.add(&whole).unwrap();
    let once = ev.result();

    // The same rows in two batches, each padded with blank rows that would
    // outvote the truth if they counted.
    let mut ev = ArcEvaluator::new(&f.dir, &[1]).unwrap();
    let mut first = outputs();
    push(&mut first, 1, &input, &a, 0.0);
    for _ in 0..3 {
        push(&mut first, 0, &input, &a, 5.0);
    }
    let mut second = outputs();
    push(&mut second, 1, &input, &t, 0.0);
    push(&mut second, 1, &input, &t, 0.0);
    push(&mut second, 0, &Grid::from_cells(0, 0, &[]), &a, 0.0);
    ev.add(&first).unwrap();
    ev.add(&second).unwrap();
    let twice = ev.result();
    assert_eq!(metric(&twice, 1), 1.0);
    assert_eq!(once.metrics, twice.metrics);
    assert_eq!(once.submission, twice.submission);
    assert_eq!(twice.report.examples, 3);

    ev.clear();
    let r = ev.result();
    assert_eq!(metric(&r, 1), 0.0);
    assert_eq!(r.report.examples, 0);
}

#[test]
fn bad_outputs_are_rejected_without_recording() {
    let (input, output) = (g23(0), g23(1));
    let f = fixture(&names(&["p"]), &[("p", vec![(input, output)])]);
    let mut ev = ArcEvaluator::new(&f.dir, &[1]).unwrap();

    let mut out = outputs();
    push(&mut out, 1, &input, &output, 0.0);
    push(&mut out, 7, &input, &output, 0.0); // no such identifier
    assert!(matches!(ev.add(&out), Err(EvalError::Outputs(m)) if m.contains("puzzle id 7")));
    out.puzzle_ids[1] = -3;
    assert!(matches!(ev.add(&out), Err(EvalError::Outputs(_))));

    let mut out = outputs();
    push(&mut out, 1, &input, &output, 0.0);
    out.q_halt.push(0.0);
    assert!(matches!(ev.add(&out), Err(EvalError::Outputs(_))));

    let mut out = outputs();
    push(&mut out, 1, &input, &output, 0.0);
    out.seq_len = 63;
    assert!(matches!(ev.add(&out), Err(EvalError::Outputs(_))));

    // Out-of-range tokens end the grid instead of panicking.
    let mut out = outputs();
    push(&mut out, 1, &input, &output, 0.0);
    out.preds[0] = 1 << 20;
    out.preds[1] = -5;
    ev.add(&out).unwrap();

    let r = ev.result();
    assert_eq!(r.report.examples, 1);
    assert_eq!(metric(&r, 1), 0.0);
    // The only prediction crops to an empty grid, which takes no vote: the
    // attempt is the [[0]] placeholder of a test input without candidates.
    assert_eq!(attempts(&r, "p", 0).0, json!([[0]]));
}

#[test]
fn bad_files_give_typed_errors_naming_the_file() {
    let (input, output) = (g23(0), g23(1));
    let f = fixture(&names(&["p"]), &[("p", vec![(input, output)])]);
    let ids = f.dir.join("identifiers.json");
    let tp = f.dir.join("test_puzzles.json");
    let names_file = |e: &EvalError, p: &Path| e.to_string().contains(&p.display().to_string());

    std::fs::write(&ids, "[\"p\", \"p|||t9|||0123456789\"]").unwrap();
    let e = ArcEvaluator::new(&f.dir, &[1]).unwrap_err();
    assert!(
        matches!(e, EvalError::File { .. }) && names_file(&e, &ids),
        "{e}"
    );
    std::fs::write(&ids, "{\"p\": 1}").unwrap();
    let e = ArcEvaluator::new(&f.dir, &[1]).unwrap_err();
    assert!(
        matches!(e, EvalError::File { .. }) && names_file(&e, &ids),
        "{e}"
    );
    std::fs::write(&ids, "[\"p\", 3]").unwrap();
    assert!(matches!(
        ArcEvaluator::new(&f.dir, &[1]),
        Err(EvalError::File { .. })
    ));
    std::fs::write(&ids, "[\"p\"").unwrap();
    let e = ArcEvaluator::new(&f.dir, &[1]).unwrap_err();
    assert!(
        matches!(e, EvalError::Json { .. }) && names_file(&e, &ids),
        "{e}"
    );
    std::fs::remove_file(&ids).unwrap();
    let e = ArcEvaluator::new(&f.dir, &[1]).unwrap_err();
    assert!(
        matches!(e, EvalError::Read { .. }) && names_file(&e, &ids),
        "{e}"
    );
    std::fs::write(&ids, "[\"<blank>\", \"p\"]").unwrap();

    for bad in [
        "[]",
        "{\"p\": {\"train\": []}}",
        "{\"p\": {\"test\": [{\"input\": [[1]]}]}}",
        "{\"p\": {\"test\": [{\"input\": [[1, 2], [3]], \"output\": [[1]]}]}}",
        "{\"p\": {\"test\": [{\"input\": [[1]], \"output\": [[10]]}]}}",
    ] {
        std::fs::write(&tp, bad).unwrap();
        let e = ArcEvaluator::new(&f.dir, &[1]).unwrap_err();
        assert!(
            matches!(e, EvalError::File { .. }) && names_file(&e, &tp),
            "{bad}: {e}"
        );
    }
    std::fs::remove_file(&tp).unwrap();
    let e = ArcEvaluator::new(&f.dir, &[1]).unwrap_err();
    assert!(
        matches!(e, EvalError::Read { .. }) && names_file(&e, &tp),
        "{e}"
    );

    // An empty test set scores 0 rather than dividing by zero.
    std::fs::write(&tp, "{}").unwrap();
    let r = ArcEvaluator::new(&f.dir, &[1, 2]).unwrap().result();
    assert_eq!(
        r.metrics.iter().map(|m| m.1).collect::<Vec<_>>(),
        vec![0.0, 0.0]
    );
}

#[test]
fn write_results_writes_submission_and_report() {
    let (input, output) = (g23(0), g23(1));
    let f = fixture(
        &names(&["p"]),
        &[("p", vec![(input, output)]), ("q", vec![(input, output)])],
    );
    let mut ev = ArcEvaluator::new(&f.dir, &[1, 2]).unwrap();
    let mut out = outputs();
    push(&mut out, 1, &input, &output, 1.0);
    push(&mut out, 1, &input, &g23(4), 0.0);
    ev.add(&out).unwrap();
    let r = ev.result();
    let dir = f.dir.join("results").join("step_10");
    write_results(&dir, &r).unwrap();
    write_results(&dir, &r).unwrap(); // overwrites in place
    let read = |n: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(n)).unwrap()).unwrap()
    };
    let sub = read("submission.json");
    assert_eq!(sub, r.submission);
    assert_eq!(sub["p"][0]["attempt_1"], grid_to_json(&output));
    assert_eq!(sub["p"][0]["attempt_2"], grid_to_json(&g23(4)));
    assert_eq!(sub["q"][0]["attempt_1"], json!([[0]]));
    let rep = read("report.json");
    assert_eq!(rep["metrics"]["ARC/pass@1"], json!(0.5));
    assert_eq!(rep["puzzles"][0]["id"], "p");
    assert_eq!(rep["puzzles"][0]["solved_pass1"], 1);
    assert_eq!(rep["puzzles"][0]["tests"][0]["top"][0]["votes"], 1);
    assert_eq!(rep["puzzles"][0]["tests"][0]["top"][0]["correct"], true);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

// ---------------------------------------------------------------------------
// a real dataset from the builder

struct Built {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// Per test-split example: puzzle id, input and label canvases.
    rows: Vec<(i32, Vec<i32>, Vec<i32>)>,
    identifiers: Vec<String>,
}

fn built() -> Built {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("arc");
    write_arc_files(&prefix, 3, 5, 6, 3).unwrap();
    let dir = tmp.path().join("data");
    let mut o = BuildOptions::new(
        &prefix.display().to_string(),
        &dir,
        &["training", "evaluation"],
        "evaluation",
    );
    o.canvas_side = SIDE;
    o.num_aug = 3;
    build_dataset(&o, BuildUi::default()).unwrap();
    let npy = |n: &str| NpyArray::open(&dir.join("test").join(format!("all__{n}.npy"))).unwrap();
    let (inputs, labels) = (npy("inputs"), npy("labels"));
    let ids = npy("puzzle_identifiers").to_i64_vec();
    let index = npy("puzzle_indices").to_i64_vec();
    let s = SIDE * SIDE;
    let tok = |a: &NpyArray, e: usize| -> Vec<i32> {
        a.bytes()[e * s..(e + 1) * s]
            .iter()
            .map(|&t| i32::from(t))
            .collect()
    };
    let mut rows = Vec::new();
    for (p, &id) in ids.iter().enumerate() {
        for e in index[p] as usize..index[p + 1] as usize {
            rows.push((id as i32, tok(&inputs, e), tok(&labels, e)));
        }
    }
    let identifiers: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("identifiers.json")).unwrap())
            .unwrap();
    Built {
        _tmp: tmp,
        dir,
        rows,
        identifiers,
    }
}

fn is_identity_member(b: &Built, id: i32) -> bool {
    !b.identifiers[id as usize].contains("|||")
}

fn base_name(b: &Built, id: i32) -> String {
    Augmentation::parse_name(&b.identifiers[id as usize])
        .unwrap()
        .0
        .to_string()
}

/// The test split as evaluation outputs, predictions from `pred` and q from
/// `q`, padded with blank rows as the loader pads the last batch.
fn as_outputs(
    b: &Built,
    pred: impl Fn(i32, &[i32]) -> Vec<i32>,
    q: impl Fn(i32) -> f32,
) -> EvalOutputs {
    let mut out = outputs();
    for (id, input, label) in &b.rows {
        out.puzzle_ids.push(*id);
        out.inputs.extend(input);
        out.preds.extend(pred(*id, label));
        out.q_halt.push(q(*id));
    }
    for _ in 0..3 {
        out.puzzle_ids.push(0);
        out.inputs.extend(vec![0; SIDE * SIDE]);
        out.preds.extend(vec![0; SIDE * SIDE]);
        out.q_halt.push(0.0);
    }
    out
}

/// A wrong prediction: the top-left cell's colour changed.
fn corrupt(label: &[i32]) -> Vec<i32> {
    let mut v = label.to_vec();
    v[0] = 2 + (v[0] - 2 + 1) % 10;
    v
}

#[test]
fn built_dataset_labels_score_one() {
    let b = built();
    let mut ev = ArcEvaluator::new(&b.dir, &DEFAULT_PASS_KS).unwrap();
    ev.add(&as_outputs(&b, |_, l| l.to_vec(), |_| 0.0)).unwrap();
    let r = ev.result();
    for k in DEFAULT_PASS_KS {
        assert_eq!(metric(&r, k), 1.0, "pass@{k}");
    }
    assert_eq!(r.report.examples, b.rows.len());
    assert_eq!(r.report.unmatched_examples, 0);
    // Every augmented copy voted for the one true output.
    let members = b.rows.len() / r.report.puzzles.len();
    assert!(members > 1, "the test split holds augmented copies");
    for p in &r.report.puzzles {
        assert_eq!(p.tests[0].candidates, 1, "{}", p.id);
    }

    // The submission is the solution of every test input.
    let tp: Value =
        serde_json::from_str(&std::fs::read_to_string(b.dir.join("test_puzzles.json")).unwrap())
            .unwrap();
    let tp = tp.as_object().unwrap();
    assert_eq!(tp.len(), 5);
    let sub = r.submission.as_object().unwrap();
    assert_eq!(
        sub.keys().collect::<Vec<_>>(),
        tp.keys().collect::<Vec<_>>()
    );
    for (id, p) in tp {
        let tests = p["test"].as_array().unwrap();
        assert_eq!(sub[id].as_array().unwrap().len(), tests.len());
        for (t, pair) in tests.iter().enumerate() {
            assert_eq!(sub[id][t]["attempt_1"], pair["output"], "{id}");
            assert_eq!(sub[id][t]["attempt_2"], pair["output"], "{id}");
        }
    }
}

#[test]
fn built_dataset_corrupted_labels_score_lower() {
    let b = built();
    let puzzles: Vec<String> = {
        let ev = ArcEvaluator::new(&b.dir, &[1]).unwrap();
        ev.result()
            .report
            .puzzles
            .iter()
            .map(|p| p.id.clone())
            .collect()
    };
    let ks = [1, 2, 1000];

    // Two puzzles wholly wrong: 3 of 5 solved at every K.
    let wrong = &puzzles[..2];
    let mut ev = ArcEvaluator::new(&b.dir, &ks).unwrap();
    ev.add(&as_outputs(
        &b,
        |id, l| {
            if wrong.contains(&base_name(&b, id)) {
                corrupt(l)
            } else {
                l.to_vec()
            }
        },
        |_| 0.0,
    ))
    .unwrap();
    let r = ev.result();
    for k in ks {
        assert!((metric(&r, k) - 0.6).abs() < 1e-12, "pass@{k}");
    }
    for p in &r.report.puzzles {
        let expect = usize::from(!wrong.contains(&p.id));
        assert_eq!(p.solved_pass1, expect, "{}", p.id);
    }

    // Only the un-augmented copy wrong, and confident: the augmented copies
    // outvote it (or, in a two-member group, their higher q wins the tie).
    let mut ev = ArcEvaluator::new(&b.dir, &ks).unwrap();
    ev.add(&as_outputs(
        &b,
        |id, l| {
            if is_identity_member(&b, id) {
                corrupt(l)
            } else {
                l.to_vec()
            }
        },
        |id| {
            if is_identity_member(&b, id) {
                -2.0
            } else {
                2.0
            }
        },
    ))
    .unwrap();
    let r = ev.result();
    assert_eq!(metric(&r, 1), 1.0);
    for p in &r.report.puzzles {
        let t = &p.tests[0];
        assert_eq!(t.candidates, 2, "{}", p.id);
        assert_eq!(t.top[1].votes, 1, "{}", p.id);
    }

    // Every copy wrong but the identity, which has the lowest q: the truth
    // has one vote and never ranks first, yet is still among all candidates.
    let mut ev = ArcEvaluator::new(&b.dir, &ks).unwrap();
    ev.add(&as_outputs(
        &b,
        |id, l| {
            if is_identity_member(&b, id) {
                l.to_vec()
            } else {
                corrupt(l)
            }
        },
        |id| {
            if is_identity_member(&b, id) {
                -2.0
            } else {
                2.0
            }
        },
    ))
    .unwrap();
    let r = ev.result();
    assert!(metric(&r, 1) < 1.0);
    assert_eq!(metric(&r, 1000), 1.0);
}

/// One evaluator reused across evaluations (as the trainer keeps it): after
/// `clear`, a second evaluation's result equals a fresh evaluator's, with
/// nothing left over from the first.
#[test]
fn a_cleared_evaluator_equals_a_fresh_one() {
    let input = g23(0);
    let (a, t) = (g23(1), g23(2));
    let f = fixture(&names(&["p"]), &[("p", vec![(input, t)])]);
    let mut first = outputs();
    for _ in 0..3 {
        push(&mut first, 1, &input, &a, 1.0);
    }
    let mut second = outputs();
    push(&mut second, 1, &input, &t, 0.5);
    let mut reused = ArcEvaluator::new(&f.dir, &DEFAULT_PASS_KS).unwrap();
    reused.add(&first).unwrap();
    assert_eq!(metric(&reused.result(), 1), 0.0);
    reused.clear();
    reused.add(&second).unwrap();
    let mut fresh = ArcEvaluator::new(&f.dir, &DEFAULT_PASS_KS).unwrap();
    fresh.add(&second).unwrap();
    let (r, w) = (reused.result(), fresh.result());
    assert_eq!(metric(&r, 1), 1.0);
    assert_eq!(r.metrics, w.metrics);
    assert_eq!(r.submission, w.submission);
    assert_eq!(r.report.puzzles[0].tests[0].votes, 1);
}

/// An empty crop (the canvas's first token is not a colour) gets no vote:
/// attempts are real grids, and `[[0]]` only when nothing else is left.
#[test]
fn empty_predictions_never_take_an_attempt() {
    let input = g23(0);
    let (a, t) = (g23(1), g23(2));
    let f = fixture(
        &names(&["p", "q"]),
        &[("p", vec![(input, t)]), ("q", vec![(input, a)])],
    );
    let mut ev = ArcEvaluator::new(&f.dir, &[1, 2]).unwrap();
    let mut out = outputs();
    let empty = |out: &mut EvalOutputs, id: i32| {
        out.puzzle_ids.push(id);
        out.inputs.extend(canvas(&input));
        out.preds.extend(vec![0i32; SIDE * SIDE]);
        out.q_halt.push(9.0);
    };
    for _ in 0..3 {
        empty(&mut out, 1);
        empty(&mut out, 2);
    }
    push(&mut out, 1, &input, &a, -1.0);
    push(&mut out, 1, &input, &t, -2.0);
    ev.add(&out).unwrap();
    let r = ev.result();
    assert_eq!(attempts(&r, "p", 0), (grid_to_json(&a), grid_to_json(&t)));
    assert_eq!(metric(&r, 2), 0.5);
    // "q" had only empty predictions: both attempts are [[0]]
    let zero = json!([[0]]);
    assert_eq!(attempts(&r, "q", 0), (zero.clone(), zero));
}
