//! An ARC file with one huge grid is refused while parsing, with memory
//! bounded by the file itself (not the ~32 bytes per cell of a JSON tree).

use std::io::Write;

use super::alloc::peak_during;

fn write_challenges(path: &std::path::Path, rows: usize, cols: usize) -> usize {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    write!(f, "{{\"big\": {{\"train\": [{{\"input\": [").unwrap();
    for r in 0..rows {
        let row = vec!["1"; cols].join(",");
        write!(f, "{}[{row}]", if r > 0 { "," } else { "" }).unwrap();
    }
    write!(
        f,
        "], \"output\": [[1]]}}], \"test\": [{{\"input\": [[1]]}}]}}}}"
    )
    .unwrap();
    f.flush().unwrap();
    std::fs::metadata(path).unwrap().len() as usize
}

#[test]
fn a_5000x5000_grid_is_refused_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("arc");
    let path = dir.path().join("arc_big_challenges.json");
    let size = write_challenges(&path, 5000, 5000);
    assert!(size > 49_000_000, "{size}");
    let (r, peak) =
        peak_during(|| trm::data::arc::load_subset(&prefix.display().to_string(), "big"));
    let e = refused(r);
    assert_eq!(
        e,
        format!(
            "{}: puzzle 'big': train example 0 'input': line 1 column 92: a grid row has more than 30 columns (ARC grids are at most 30x30)",
            path.display()
        )
    );
    // The file's bytes plus a little: no JSON tree was built.
    assert!(
        peak < size + (4 << 20),
        "peak {peak} for a {size}-byte file"
    );
}

#[test]
fn thirty_one_rows_are_refused_and_thirty_by_thirty_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("arc").display().to_string();
    write_challenges(&dir.path().join("arc_tall_challenges.json"), 31, 1);
    let e = trm::data::arc::load_subset(&prefix, "tall")
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.ends_with("a grid has more than 30 rows (ARC grids are at most 30x30)"),
        "{e}"
    );
    write_challenges(&dir.path().join("arc_ok_challenges.json"), 30, 30);
    let s = trm::data::arc::load_subset(&prefix, "ok").expect("a 30x30 grid is valid");
    assert_eq!(s.puzzles[0].train[0].input.rows(), 30);
}

/// The error of a call that must be refused.
fn refused<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("not refused"),
        Err(e) => e.to_string(),
    }
}
