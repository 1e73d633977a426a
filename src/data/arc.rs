//! ARC-AGI JSON in the Kaggle "combined" layout:
//! `{prefix}_{subset}_challenges.json` maps puzzle id -> `{"train": [{"input",
//! "output"}], "test": [{"input"}]}`, and `{prefix}_{subset}_solutions.json`
//! maps puzzle id -> one output grid per test input.
//!
//! Every grid is validated here, so the builder and the inference binary
//! only ever see well-formed puzzles; errors name the file, puzzle and place.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::grid::{Grid, MAX_SIDE, NUM_COLOURS};
use super::grid_scan;

/// One input/output pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub input: Grid,
    pub output: Grid,
}

/// A puzzle as read from the challenges file (test outputs filled in from the
/// solutions file, or `[[0]]` when there is none).
#[derive(Clone, Debug)]
pub struct Puzzle {
    pub id: String,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    /// The puzzle's JSON with the test outputs filled in (for `test_puzzles.json`).
    pub json: Value,
}

/// Where a grid sits in its puzzle: `"train"`/`"test"`, the example's index,
/// `"input"`/`"output"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridPlace {
    pub split: &'static str,
    pub example: usize,
    pub field: &'static str,
}

impl std::fmt::Display for GridPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} example {} '{}'",
            self.split, self.example, self.field
        )
    }
}

impl Puzzle {
    /// Every grid of the puzzle with its place: train examples then test,
    /// input before output.
    pub fn grids(&self) -> impl Iterator<Item = (GridPlace, &Grid)> {
        [("train", &self.train), ("test", &self.test)]
            .into_iter()
            .flat_map(|(split, examples)| {
                examples.iter().enumerate().flat_map(move |(example, ex)| {
                    [("input", &ex.input), ("output", &ex.output)]
                        .into_iter()
                        .map(move |(field, g)| {
                            (
                                GridPlace {
                                    split,
                                    example,
                                    field,
                                },
                                g,
                            )
                        })
                })
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArcError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: puzzle '{puzzle}': {what}")]
    Puzzle {
        path: PathBuf,
        puzzle: String,
        what: String,
    },
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
}

/// The challenges and solutions paths of a subset.
pub fn subset_paths(prefix: &str, subset: &str) -> (PathBuf, PathBuf) {
    (
        PathBuf::from(format!("{prefix}_{subset}_challenges.json")),
        PathBuf::from(format!("{prefix}_{subset}_solutions.json")),
    )
}

fn read_json(path: &Path) -> Result<(Value, Vec<u8>), ArcError> {
    let bytes = std::fs::read(path).map_err(|source| ArcError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value = parse_json_bytes(path, &bytes)?;
    Ok((value, bytes))
}

/// Parses the bytes of a challenges or solutions file, refusing oversized
/// grids before the JSON tree (about 32 bytes per cell) is built.
pub fn parse_json_bytes(path: &Path, bytes: &[u8]) -> Result<Value, ArcError> {
    grid_scan::check_grid_sizes(bytes, MAX_SIDE).map_err(|e| ArcError::File {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    serde_json::from_slice(bytes).map_err(|source| ArcError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Parse a grid: a non-empty list of equally long, non-empty rows of
/// integers 0..9, at most 30x30. `Err` says what is wrong.
pub fn parse_grid(v: &Value) -> Result<Grid, String> {
    let rows = v.as_array().ok_or("grid is not a list of rows")?;
    if rows.is_empty() {
        return Err("grid has no rows".into());
    }
    if rows.len() > MAX_SIDE {
        return Err(format!(
            "grid has {} rows, more than {MAX_SIDE}",
            rows.len()
        ));
    }
    let mut cells = [0u8; MAX_SIDE * MAX_SIDE];
    let mut cols = 0;
    for (r, row) in rows.iter().enumerate() {
        let row = row
            .as_array()
            .ok_or_else(|| format!("row {r} is not a list"))?;
        if r == 0 {
            cols = row.len();
            if cols == 0 {
                return Err("grid has an empty row".into());
            }
            if cols > MAX_SIDE {
                return Err(format!("grid has {cols} columns, more than {MAX_SIDE}"));
            }
        } else if row.len() != cols {
            return Err(format!(
                "ragged grid: row {r} has {} cells, row 0 has {cols}",
                row.len()
            ));
        }
        for (c, cell) in row.iter().enumerate() {
            let colour = cell
                .as_u64()
                .filter(|&x| x < NUM_COLOURS as u64)
                .ok_or_else(|| format!("cell ({r}, {c}) is {cell}, not a colour 0..9"))?;
            cells[r * cols + c] = colour as u8;
        }
    }
    Ok(Grid::from_cells(
        rows.len(),
        cols,
        &cells[..rows.len() * cols],
    ))
}

/// Grid back to JSON rows.
pub fn grid_to_json(g: &Grid) -> Value {
    Value::Array(
        g.to_rows()
            .into_iter()
            .map(|row| Value::Array(row.into_iter().map(Value::from).collect()))
            .collect(),
    )
}

/// How the test outputs were obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solutions {
    /// Read from the solutions file.
    FromFile,
    /// No solutions file: test outputs are `[[0]]`.
    Dummy,
}

/// A loaded subset, puzzles in file order.
pub struct Subset {
    pub name: String,
    pub puzzles: Vec<Puzzle>,
    pub solutions: Solutions,
    /// Raw bytes of the challenges and (if any) solutions files, for hashing.
    pub file_bytes: Vec<(PathBuf, Vec<u8>)>,
}

/// Load and validate one subset.
pub fn load_subset(prefix: &str, subset: &str) -> Result<Subset, ArcError> {
    let (chal_path, sol_path) = subset_paths(prefix, subset);
    if !chal_path.is_file() {
        return Err(ArcError::File {
            path: chal_path.clone(),
            what: format!(
                "challenges file of subset '{subset}' not found (expected {{prefix}}_{{subset}}_challenges.json with prefix '{prefix}')"
            ),
        });
    }
    let (chal, chal_bytes) = read_json(&chal_path)?;
    let mut file_bytes = vec![(chal_path.clone(), chal_bytes)];
    let sols = if sol_path.is_file() {
        let (v, b) = read_json(&sol_path)?;
        file_bytes.push((sol_path.clone(), b));
        Some(v)
    } else {
        None
    };
    let puzzles = parse_challenges(
        &chal_path,
        chal,
        sols.as_ref().map(|v| (sol_path.as_path(), v)),
    )?;
    Ok(Subset {
        name: subset.to_string(),
        puzzles,
        solutions: if sols.is_some() {
            Solutions::FromFile
        } else {
            Solutions::Dummy
        },
        file_bytes,
    })
}

/// Parse a challenges object (and optional solutions object) into puzzles.
/// With no solutions, test outputs missing from the challenges become `[[0]]`.
pub fn parse_challenges(
    chal_path: &Path,
    chal: Value,
    sols: Option<(&Path, &Value)>,
) -> Result<Vec<Puzzle>, ArcError> {
    let Value::Object(map) = chal else {
        return Err(ArcError::File {
            path: chal_path.to_path_buf(),
            what: "expected a JSON object mapping puzzle ids to puzzles".into(),
        });
    };
    let sol_map: Option<(&Path, &Map<String, Value>)> = match sols {
        None => None,
        Some((p, Value::Object(m))) => Some((p, m)),
        Some((p, _)) => {
            return Err(ArcError::File {
                path: p.to_path_buf(),
                what: "expected a JSON object mapping puzzle ids to lists of output grids".into(),
            })
        }
    };
    let mut puzzles = Vec::with_capacity(map.len());
    for (id, mut pv) in map {
        let perr = |path: &Path, what: String| ArcError::Puzzle {
            path: path.to_path_buf(),
            puzzle: id.clone(),
            what,
        };
        let obj = pv.as_object_mut().ok_or_else(|| {
            perr(
                chal_path,
                "expected an object with 'train' and 'test'".into(),
            )
        })?;
        for key in ["train", "test"] {
            match obj.get(key) {
                Some(Value::Array(a)) if !a.is_empty() => {}
                Some(Value::Array(_)) => {
                    return Err(perr(chal_path, format!("'{key}' has no examples")))
                }
                _ => return Err(perr(chal_path, format!("missing '{key}' list"))),
            }
        }
        // Fill test outputs from the solutions file.
        let n_test = obj["test"].as_array().map_or(0, |a| a.len());
        match sol_map {
            Some((sp, sm)) => {
                let sol = sm
                    .get(&id)
                    .ok_or_else(|| perr(sp, "no solutions for this puzzle".into()))?;
                let sol = sol
                    .as_array()
                    .ok_or_else(|| perr(sp, "solutions are not a list of grids".into()))?;
                if sol.len() != n_test {
                    return Err(perr(
                        sp,
                        format!(
                            "{} solution grids for {} test inputs (they must match)",
                            sol.len(),
                            n_test
                        ),
                    ));
                }
                let tests = obj
                    .get_mut("test")
                    .and_then(|t| t.as_array_mut())
                    .expect("checked above");
                for (ex, s) in tests.iter_mut().zip(sol) {
                    if let Some(e) = ex.as_object_mut() {
                        e.insert("output".into(), s.clone());
                    }
                }
            }
            None => {
                let tests = obj
                    .get_mut("test")
                    .and_then(|t| t.as_array_mut())
                    .expect("checked above");
                for ex in tests.iter_mut() {
                    if let Some(e) = ex.as_object_mut() {
                        e.entry("output")
                            .or_insert_with(|| serde_json::json!([[0]]));
                    }
                }
            }
        }
        let parse_examples = |key: &str| -> Result<Vec<Example>, ArcError> {
            let list = obj[key].as_array().expect("checked above");
            list.iter()
                .enumerate()
                .map(|(i, ex)| {
                    let grid = |field: &str| -> Result<Grid, ArcError> {
                        let v = ex.get(field).ok_or_else(|| {
                            perr(
                                chal_path,
                                format!("{key} example {i} has no '{field}' grid"),
                            )
                        })?;
                        parse_grid(v).map_err(|w| {
                            // Test outputs come from the solutions file: blame it.
                            let p = match (key, field, sol_map) {
                                ("test", "output", Some((sp, _))) => sp,
                                _ => chal_path,
                            };
                            perr(p, format!("{key} example {i} '{field}': {w}"))
                        })
                    };
                    Ok(Example {
                        input: grid("input")?,
                        output: grid("output")?,
                    })
                })
                .collect()
        };
        let train = parse_examples("train")?;
        let test = parse_examples("test")?;
        puzzles.push(Puzzle {
            id: id.clone(),
            train,
            test,
            json: pv,
        });
    }
    Ok(puzzles)
}
