//! A streaming pre-scan of ARC JSON bytes that refuses oversized grids before
//! the JSON tree is built: a `serde_json::Value` costs about 32 bytes per
//! cell, so one 5000x5000 grid in a 75 MB file would take gigabytes before
//! `parse_grid` could reject it. The scan keeps one small frame per nesting
//! level and allocates nothing else.
//!
//! It does not validate JSON (serde does that next); on bytes it does not
//! understand it stops and lets the parser report them.

/// Deeper than serde_json's own recursion limit (128): serde reports it.
const MAX_DEPTH: usize = 130;

/// An oversized grid, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place}line {line} column {column}: {what} (ARC grids are at most {max}x{max})")]
pub struct GridTooLarge {
    /// Where in the puzzle, e.g. "puzzle 'p1': train example 0 'input': ".
    pub place: String,
    pub line: usize,
    pub column: usize,
    pub what: String,
    pub max: usize,
}

#[derive(Clone, Copy, Default)]
struct Frame {
    is_array: bool,
    /// Values started in this array so far.
    len: usize,
    /// Holds a number: a grid row.
    has_number: bool,
    /// Holds a row: a grid.
    has_row: bool,
    /// Objects: the next string is a key; the byte range of the last key.
    expect_key: bool,
    key: (usize, usize),
}

/// "puzzle 'ID': SPLIT example I 'FIELD': " from the keys and indices of the
/// enclosing frames, as far as they go (the challenges layout).
fn place(bytes: &[u8], stack: &[Frame]) -> String {
    let key = |f: &Frame| String::from_utf8_lossy(&bytes[f.key.0..f.key.1]).into_owned();
    let mut out = String::new();
    if let [puzzles, ..] = stack {
        if !puzzles.is_array && stack.len() > 1 {
            out.push_str(&format!("puzzle '{}': ", key(puzzles)));
        }
    }
    if let [_, p, examples, ex, ..] = stack {
        if !p.is_array && examples.is_array && !ex.is_array {
            out.push_str(&format!(
                "{} example {} '{}': ",
                key(p),
                examples.len.saturating_sub(1),
                key(ex)
            ));
        }
    }
    out
}

/// Refuses any array of numbers (a grid row) longer than `max` and any array
/// of such rows (a grid) longer than `max`, as soon as the excess is seen.
pub fn check_grid_sizes(bytes: &[u8], max: usize) -> Result<(), GridTooLarge> {
    let fail = |at: usize, what: String, stack: &[Frame]| {
        let before = &bytes[..at.min(bytes.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        GridTooLarge {
            place: place(bytes, stack),
            line,
            column,
            what,
            max,
        }
    };
    let mut stack: Vec<Frame> = Vec::with_capacity(16);
    let mut i = 0;
    // Counts a value started at `at` in the enclosing array.
    let start_value =
        |stack: &mut Vec<Frame>, at: usize, number: bool| -> Result<(), GridTooLarge> {
            if let Some(top) = stack.last_mut().filter(|f| f.is_array) {
                top.len += 1;
                top.has_number |= number;
                if top.has_number && top.len > max {
                    let what = format!("a grid row has more than {max} columns");
                    return Err(fail(at, what, stack));
                }
            }
            Ok(())
        };
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b':' => i += 1,
            b',' => {
                if let Some(top) = stack.last_mut().filter(|f| !f.is_array) {
                    top.expect_key = true;
                }
                i += 1;
            }
            b'"' => {
                let start = i + 1;
                let is_key = stack.last().is_some_and(|f| !f.is_array && f.expect_key);
                if !is_key {
                    start_value(&mut stack, i, false)?;
                }
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if is_key {
                    if let Some(top) = stack.last_mut() {
                        top.expect_key = false;
                        top.key = (start, i.min(bytes.len()));
                    }
                }
                i += 1;
            }
            b'[' | b'{' => {
                start_value(&mut stack, i, false)?;
                if stack.len() >= MAX_DEPTH {
                    return Ok(());
                }
                stack.push(Frame {
                    is_array: b == b'[',
                    expect_key: b == b'{',
                    ..Frame::default()
                });
                i += 1;
            }
            b']' | b'}' => {
                let Some(closed) = stack.pop() else {
                    return Ok(());
                };
                let row = closed.is_array && closed.has_number;
                if let Some(parent) = stack.last_mut().filter(|f| f.is_array) {
                    parent.has_row |= row;
                    if parent.has_row && parent.len > max {
                        let what = format!("a grid has more than {max} rows");
                        return Err(fail(i, what, &stack));
                    }
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                start_value(&mut stack, i, true)?;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
            }
            b't' | b'f' | b'n' => {
                start_value(&mut stack, i, false)?;
                while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                    i += 1;
                }
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(rows: usize, cols: usize) -> String {
        let row = format!("[{}]", vec!["1"; cols].join(","));
        format!("[{}]", vec![row; rows].join(","))
    }

    #[test]
    fn arc_sized_grids_pass() {
        let text = format!(
            r#"{{"a": {{"train": [{{"input": {}, "output": {}}}], "test": [{{"input": [[0]]}}]}}}}"#,
            grid(30, 30),
            grid(1, 30)
        );
        assert_eq!(check_grid_sizes(text.as_bytes(), 30), Ok(()));
        // Long lists of non-grids (many examples, many puzzles) are fine.
        let many = format!("[{}]", vec![r#"{"input": [[1]]}"#; 100].join(","));
        assert_eq!(check_grid_sizes(many.as_bytes(), 30), Ok(()));
    }

    #[test]
    fn a_long_row_is_refused_at_its_31st_cell() {
        let text = format!("{{\"x\": {}}}", grid(1, 5000));
        let e = check_grid_sizes(text.as_bytes(), 30).unwrap_err();
        assert_eq!(e.line, 1);
        assert_eq!(e.column, 8 + 30 * 2 + 1);
        assert_eq!(
            e.to_string(),
            "puzzle 'x': line 1 column 69: a grid row has more than 30 columns (ARC grids are at most 30x30)"
        );
    }

    #[test]
    fn too_many_rows_are_refused() {
        let text = format!("[\n{}]", grid(31, 2));
        let e = check_grid_sizes(text.as_bytes(), 30).unwrap_err();
        assert_eq!(e.what, "a grid has more than 30 rows");
        assert_eq!(e.line, 2);
    }

    #[test]
    fn strings_with_brackets_and_escapes_do_not_count() {
        let text = r#"{"k\"[[": "]]]", "g": [[1, 2]]}"#;
        assert_eq!(check_grid_sizes(text.as_bytes(), 2), Ok(()));
        assert!(check_grid_sizes(text.as_bytes(), 1).is_err());
    }
}
