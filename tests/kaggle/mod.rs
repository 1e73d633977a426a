//! The Kaggle submission rules, checked by the tests that write one
//! (`trm infer`, the offline bundle).

use std::collections::BTreeSet;

use serde_json::Value;

/// The Kaggle rules for `submission` answering `challenges`: every task id
/// and no other, one entry per test input, each with `attempt_1` and
/// `attempt_2`, each a rectangular grid of 1..30 x 1..30 colours 0..9.
pub fn check_kaggle_format(submission: &Value, challenges: &Value) {
    let sub = submission
        .as_object()
        .expect("the submission is a JSON object");
    let chal = challenges.as_object().unwrap();
    let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(sub), keys(chal), "task ids");
    for (id, puzzle) in chal {
        let tests = puzzle["test"].as_array().unwrap();
        let entries = sub[id]
            .as_array()
            .unwrap_or_else(|| panic!("{id}: not a list"));
        assert_eq!(entries.len(), tests.len(), "{id}: one entry per test input");
        for (i, e) in entries.iter().enumerate() {
            let e = e
                .as_object()
                .unwrap_or_else(|| panic!("{id}[{i}]: not an object"));
            let names: Vec<&str> = e.keys().map(String::as_str).collect();
            assert_eq!(names, ["attempt_1", "attempt_2"], "{id}[{i}]");
            for (name, grid) in e {
                let rows = grid
                    .as_array()
                    .unwrap_or_else(|| panic!("{id}[{i}].{name}"));
                assert!(
                    (1..=30).contains(&rows.len()),
                    "{id}[{i}].{name}: {} rows",
                    rows.len()
                );
                let width = rows[0].as_array().map_or(0, Vec::len);
                assert!(
                    (1..=30).contains(&width),
                    "{id}[{i}].{name}: {width} columns"
                );
                for row in rows {
                    let row = row
                        .as_array()
                        .unwrap_or_else(|| panic!("{id}[{i}].{name}: a row"));
                    assert_eq!(row.len(), width, "{id}[{i}].{name}: not rectangular");
                    assert!(
                        row.iter().all(|c| c.as_u64().is_some_and(|c| c <= 9)),
                        "{id}[{i}].{name}: a colour outside 0..9: {row:?}"
                    );
                }
            }
        }
    }
}
