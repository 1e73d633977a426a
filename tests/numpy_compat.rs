//! Interchange with numpy and the reference's definitions: numpy loads every
//! file the builder writes, with the dtypes and shapes the reference uses,
//! and our dihedral transforms equal numpy's rot90/flips/transposes.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use trm::data::builder::{build_dataset, BuildOptions, BuildUi};
use trm::data::grid::Grid;

fn run_python(script: &str, args: &[&Path]) -> String {
    let py = common::python_with_numpy();
    let out = Command::new(&py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn numpy_loads_every_file_the_builder_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("arc").join("synthetic");
    trm::data::synthetic::write_arc_files(&prefix, 6, 3, 6, 1).unwrap();
    let mut o = BuildOptions::new(
        &prefix.display().to_string(),
        &tmp.path().join("ds"),
        &["training", "evaluation"],
        "evaluation",
    );
    o.num_aug = 4;
    let report = build_dataset(&o, BuildUi::default()).unwrap();
    let script = r#"
import json, sys, os
import numpy as np
root = sys.argv[1]
out = {}
for split in ["train", "test"]:
    meta = json.load(open(os.path.join(root, split, "dataset.json")))
    d = {}
    for k in ["inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices"]:
        a = np.load(os.path.join(root, split, "all__" + k + ".npy"), mmap_mode="r")
        d[k] = [str(a.dtype), list(a.shape)]
    inp = np.load(os.path.join(root, split, "all__inputs.npy"))
    d["max_token"] = int(inp.max())
    d["puzzle_indices_last"] = int(np.load(os.path.join(root, split, "all__puzzle_indices.npy"))[-1])
    d["meta"] = meta
    out[split] = d
ids = json.load(open(os.path.join(root, "identifiers.json")))
out["ids"] = [len(ids), ids[0]]
out["test_puzzles"] = len(json.load(open(os.path.join(root, "test_puzzles.json"))))
print(json.dumps(out))
"#;
    let out: Value = serde_json::from_str(&run_python(script, &[&tmp.path().join("ds")])).unwrap();
    for (split, stats) in [
        ("train", &report.train),
        ("test", report.test.as_ref().unwrap()),
    ] {
        let s = &out[split];
        assert_eq!(
            s["inputs"],
            json!(["uint8", [stats.examples, 900]]),
            "{split}"
        );
        assert_eq!(
            s["labels"],
            json!(["uint8", [stats.examples, 900]]),
            "{split}"
        );
        assert_eq!(
            s["puzzle_identifiers"],
            json!(["int32", [stats.puzzles]]),
            "{split}"
        );
        assert_eq!(
            s["puzzle_indices"],
            json!(["int32", [stats.puzzles + 1]]),
            "{split}"
        );
        assert_eq!(
            s["group_indices"],
            json!(["int32", [stats.groups + 1]]),
            "{split}"
        );
        assert_eq!(s["puzzle_indices_last"], json!(stats.examples));
        assert!(s["max_token"].as_u64().unwrap() <= 11);
        assert_eq!(s["meta"]["total_puzzles"], json!(stats.puzzles));
        assert_eq!(s["meta"]["ignore_label_id"], json!(0));
    }
    assert_eq!(out["ids"], json!([report.num_identifiers, "<blank>"]));
    assert_eq!(out["test_puzzles"], json!(3));
}

#[test]
fn dihedral_transforms_equal_numpy() {
    let tmp = tempfile::tempdir().unwrap();
    let shapes = [(1, 1), (2, 3), (4, 1), (5, 7), (30, 30), (3, 30)];
    let grids: Vec<Grid> = shapes
        .iter()
        .enumerate()
        .map(|(k, &(r, c))| {
            let cells: Vec<u8> = (0..r * c).map(|i| ((i * 7 + k * 3) % 10) as u8).collect();
            Grid::from_cells(r, c, &cells)
        })
        .collect();
    let path = tmp.path().join("grids.json");
    std::fs::write(
        &path,
        serde_json::to_string(&grids.iter().map(|g| g.to_rows()).collect::<Vec<_>>()).unwrap(),
    )
    .unwrap();
    // The transforms as numpy defines them (spec section 2).
    let script = r#"
import json, sys
import numpy as np
fs = [lambda a: a, lambda a: np.rot90(a, 1), lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 3),
      np.fliplr, np.flipud, lambda a: a.T, lambda a: np.fliplr(np.rot90(a, 1))]
grids = [np.array(g, dtype=np.uint8) for g in json.load(open(sys.argv[1]))]
print(json.dumps([[f(g).tolist() for f in fs] for g in grids]))
"#;
    let expected: Vec<Vec<Vec<Vec<u8>>>> =
        serde_json::from_str(&run_python(script, &[&path])).unwrap();
    for (g, per_t) in grids.iter().zip(&expected) {
        for (t, want) in per_t.iter().enumerate() {
            assert_eq!(
                &g.dihedral(t as u8).to_rows(),
                want,
                "t{t} on {}x{}",
                g.rows(),
                g.cols()
            );
        }
    }
}
