//! The ARC evaluator (spec section 9), after the reference's
//! `evaluators/arc.py`.
//!
//! Every evaluated example is cropped out of its token canvas, mapped back
//! through the inverse of its augmentation (read from its identifier), and
//! filed as one vote under its original puzzle and the hash of its
//! inverse-mapped input grid. Per test input the distinct predicted grids are
//! ranked by (votes, mean sigmoid(q_halt)) descending; pass@K counts a test
//! input solved when its true output is among the top K, a puzzle scores the
//! fraction of its test inputs solved, and pass@K is the mean over every
//! puzzle of `test_puzzles.json`.
//!
//! Where this differs from the reference (each also noted at the place):
//! - a test input with no prediction gets `[[0]]` for both attempts in the
//!   submission; the reference leaves it out, which shifts later entries;
//! - a puzzle with no test inputs scores 0 (the reference divides by zero),
//!   and an empty `test_puzzles.json` gives pass@K = 0;
//! - an empty predicted grid gets no vote (the reference ranks it like any
//!   other and can submit `[]`); this can only raise pass@K;
//! - canvases may be any square of side 1..=30, not just 30x30;
//! - votes for puzzles or inputs that are not test inputs are counted (in
//!   the report) and dropped at once instead of being kept until the end;
//!   they never reach a score either way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::data::arc::{grid_to_json, parse_grid, Puzzle};
use crate::data::augment::Augmentation;
use crate::data::grid::{canvas_side, Grid};
use crate::data::metadata::DatasetMetadata;
use crate::model::act::EvalOutputs;

/// The reference's `pass_Ks`.
pub const DEFAULT_PASS_KS: [usize; 6] = [1, 2, 5, 10, 100, 1000];
/// Attempts per test input in the Kaggle submission (the reference's
/// `submission_K`).
const ATTEMPTS: usize = 2;
/// Candidates per test input kept in `report.json`.
const REPORT_CANDIDATES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: cannot read: {source}")]
    Read {
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
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("evaluation outputs: {0}")]
    Outputs(String),
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One test input of an original puzzle.
#[derive(Debug)]
struct TestCase {
    input_hash: [u8; 32],
    output_hash: [u8; 32],
}

#[derive(Debug)]
struct TestPuzzle {
    id: String,
    tests: Vec<TestCase>,
}

/// Votes for one (puzzle, input hash): distinct predictions in first-seen
/// order with their count and sum of sigmoid(q_halt).
#[derive(Debug, Default)]
struct Tally {
    order: Vec<[u8; 32]>,
    stats: HashMap<[u8; 32], (usize, f64)>,
}

/// A ranked candidate.
struct Ranked {
    hash: [u8; 32],
    votes: usize,
    mean_q: f64,
}

impl Tally {
    fn vote(&mut self, hash: [u8; 32], q: f64) {
        let s = self.stats.entry(hash).or_insert_with(|| {
            self.order.push(hash);
            (0, 0.0)
        });
        s.0 += 1;
        s.1 += q;
    }

    /// Candidates by (votes, mean q) descending. The sort is stable, so exact
    /// ties keep first-seen order, as Python's stable `sorted(reverse=True)`
    /// over the reference's insertion-ordered dict does.
    fn ranked(&self) -> Vec<Ranked> {
        let mut out: Vec<Ranked> = self
            .order
            .iter()
            .map(|h| {
                let (votes, sum) = self.stats[h];
                Ranked {
                    hash: *h,
                    votes,
                    mean_q: sum / votes as f64,
                }
            })
            .collect();
        // total_cmp: a NaN q still gives a deterministic order.
        out.sort_by(|a, b| {
            b.votes
                .cmp(&a.votes)
                .then_with(|| b.mean_q.total_cmp(&a.mean_q))
        });
        out
    }
}

/// Accumulates model outputs over any number of batches and scores them.
#[derive(Debug)]
pub struct ArcEvaluator {
    ks: Vec<usize>,
    blank_id: i64,
    /// Per puzzle id: the index into `puzzles` of its original puzzle (None
    /// for blanks and puzzles outside the test set) and its augmentation.
    identifiers: Vec<(Option<usize>, Augmentation)>,
    puzzles: Vec<TestPuzzle>,
    /// Per puzzle: input hash -> votes.
    votes: Vec<HashMap<[u8; 32], Tally>>,
    /// Every predicted grid by hash (the reference's `hmap`).
    grids: HashMap<[u8; 32], Grid>,
    examples: usize,
    unmatched: usize,
}

/// pass@K metrics, the Kaggle submission and the per-puzzle report.
#[derive(Debug, Clone)]
pub struct ArcResult {
    /// `("ARC/pass@K", value)` in the order of the evaluator's Ks.
    pub metrics: Vec<(String, f64)>,
    /// Puzzle id -> one `{"attempt_1", "attempt_2"}` per test input.
    pub submission: Value,
    pub report: ArcReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArcReport {
    /// Non-blank examples seen.
    pub examples: usize,
    /// Of those, examples whose puzzle or input grid is no test input.
    pub unmatched_examples: usize,
    /// In the order of `test_puzzles.json`.
    pub puzzles: Vec<PuzzleReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PuzzleReport {
    pub id: String,
    /// Test inputs whose true output ranks first.
    pub solved_pass1: usize,
    /// Test inputs whose true output is one of the two submitted attempts.
    pub solved_pass2: usize,
    pub tests: Vec<TestReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    /// Predictions (votes) received.
    pub votes: usize,
    /// Distinct predicted grids.
    pub candidates: usize,
    /// 1-based rank of the true output among the candidates, if predicted.
    pub solution_rank: Option<usize>,
    /// The best few candidates.
    pub top: Vec<CandidateReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateReport {
    pub votes: usize,
    pub mean_q: f64,
    pub correct: bool,
    /// First 8 bytes of the grid's hash, hex: tells candidates apart.
    pub hash: String,
    pub shape: [usize; 2],
}

fn read_json(path: &Path) -> Result<Value, EvalError> {
    let bytes = std::fs::read(path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| EvalError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn load_test_puzzles(path: &Path) -> Result<Vec<TestPuzzle>, EvalError> {
    let file_err = |what: String| EvalError::File {
        path: path.to_path_buf(),
        what,
    };
    let v = read_json(path)?;
    let map = v
        .as_object()
        .ok_or_else(|| file_err("expected an object of puzzles".into()))?;
    let mut puzzles = Vec::with_capacity(map.len());
    for (id, p) in map {
        let tests = p
            .get("test")
            .and_then(Value::as_array)
            .ok_or_else(|| file_err(format!("puzzle '{id}': no \"test\" list")))?;
        let mut cases = Vec::with_capacity(tests.len());
        for (i, t) in tests.iter().enumerate() {
            let grid = |key: &str| -> Result<Grid, EvalError> {
                let g = t
                    .get(key)
                    .ok_or_else(|| file_err(format!("puzzle '{id}': test {i} has no \"{key}\"")))?;
                parse_grid(g)
                    .map_err(|why| file_err(format!("puzzle '{id}': test {i} {key}: {why}")))
            };
            cases.push(TestCase {
                input_hash: grid("input")?.hash(),
                output_hash: grid("output")?.hash(),
            });
        }
        puzzles.push(TestPuzzle {
            id: id.clone(),
            tests: cases,
        });
    }
    Ok(puzzles)
}

fn load_identifiers(
    path: &Path,
    puzzles: &[TestPuzzle],
) -> Result<Vec<(Option<usize>, Augmentation)>, EvalError> {
    let file_err = |what: String| EvalError::File {
        path: path.to_path_buf(),
        what,
    };
    let v = read_json(path)?;
    let names = v
        .as_array()
        .ok_or_else(|| file_err("expected a list of puzzle names".into()))?;
    let names = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            n.as_str()
                .ok_or_else(|| file_err(format!("entry {i} is not a string")))
        })
        .collect::<Result<Vec<&str>, EvalError>>()?;
    index_identifiers(&names, puzzles).map_err(file_err)
}

/// Per identifier: its original puzzle's index in `puzzles` (None for
/// blanks and puzzles outside the test set) and its augmentation.
fn index_identifiers<S: AsRef<str>>(
    names: &[S],
    puzzles: &[TestPuzzle],
) -> Result<Vec<(Option<usize>, Augmentation)>, String> {
    let index: HashMap<&str, usize> = puzzles
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.as_str(), i))
        .collect();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (base, aug) =
                Augmentation::parse_name(name.as_ref()).map_err(|e| format!("entry {i}: {e}"))?;
            Ok((
                index.get(base).copied(),
                aug.unwrap_or(Augmentation::IDENTITY),
            ))
        })
        .collect()
}

/// A token canvas (i32 tokens) cropped to its grid. Tokens outside u8 are no
/// colour, so they end the grid like PAD or EOS.
fn crop_tokens(tokens: &[i32], buf: &mut Vec<u8>) -> Grid {
    buf.clear();
    buf.extend(tokens.iter().map(|&t| u8::try_from(t).unwrap_or(u8::MAX)));
    Grid::crop(buf).expect("canvas length checked in add")
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl ArcEvaluator {
    /// Load `identifiers.json` and `test_puzzles.json` from a built dataset
    /// folder; padding rows carry `blank_identifier_id` from
    /// `test/dataset.json` (0 when that file is absent, as the builder writes).
    pub fn new(dataset_dir: &Path, ks: &[usize]) -> Result<ArcEvaluator, EvalError> {
        let puzzles = load_test_puzzles(&dataset_dir.join("test_puzzles.json"))?;
        let identifiers = load_identifiers(&dataset_dir.join("identifiers.json"), &puzzles)?;
        let meta_path = dataset_dir.join("test").join("dataset.json");
        let blank_id = if meta_path.exists() {
            DatasetMetadata::load(&meta_path)
                .map_err(|e| EvalError::File {
                    path: meta_path.clone(),
                    what: e.to_string(),
                })?
                .blank_identifier_id
        } else {
            0
        };
        Ok(Self::with_parts(ks, blank_id, identifiers, puzzles))
    }

    /// The evaluator of a test set held in memory (what `trm infer` builds
    /// from a challenges file): `identifiers` as in `identifiers.json`
    /// (index = puzzle id), `puzzles` in the order of `test_puzzles.json`,
    /// each test example with its true output (any grid when unknown; the
    /// submission does not depend on it).
    pub fn from_memory<S: AsRef<str>>(
        identifiers: &[S],
        puzzles: &[Puzzle],
        blank_id: i64,
        ks: &[usize],
    ) -> Result<ArcEvaluator, EvalError> {
        let puzzles: Vec<TestPuzzle> = puzzles
            .iter()
            .map(|p| TestPuzzle {
                id: p.id.clone(),
                tests: p
                    .test
                    .iter()
                    .map(|e| TestCase {
                        input_hash: e.input.hash(),
                        output_hash: e.output.hash(),
                    })
                    .collect(),
            })
            .collect();
        let identifiers = index_identifiers(identifiers, &puzzles)
            .map_err(|what| EvalError::Outputs(format!("puzzle identifiers: {what}")))?;
        Ok(Self::with_parts(ks, blank_id, identifiers, puzzles))
    }

    fn with_parts(
        ks: &[usize],
        blank_id: i64,
        identifiers: Vec<(Option<usize>, Augmentation)>,
        puzzles: Vec<TestPuzzle>,
    ) -> ArcEvaluator {
        ArcEvaluator {
            ks: ks.to_vec(),
            blank_id,
            identifiers,
            votes: puzzles.iter().map(|_| HashMap::new()).collect(),
            puzzles,
            grids: HashMap::new(),
            examples: 0,
            unmatched: 0,
        }
    }

    /// Forget every vote (the reference with `aggregated_voting=False`).
    pub fn clear(&mut self) {
        self.votes.iter_mut().for_each(HashMap::clear);
        self.grids.clear();
        self.examples = 0;
        self.unmatched = 0;
    }

    /// Add one batch (or several accumulated) of evaluation outputs. Checks
    /// every shape and id before recording anything, so a bad batch leaves
    /// the evaluator unchanged.
    pub fn add(&mut self, out: &EvalOutputs) -> Result<(), EvalError> {
        let n = out.puzzle_ids.len();
        let s = out.seq_len;
        let bad = |what: String| Err(EvalError::Outputs(what));
        if canvas_side(s).is_none() {
            return bad(format!("seq_len {s} is not a square canvas of side 1..=30"));
        }
        if out.inputs.len() != n * s || out.preds.len() != n * s || out.q_halt.len() != n {
            return bad(format!(
                "{n} examples of {s} tokens need {} input and prediction tokens and {n} q_halt values; got {}, {} and {}",
                n * s,
                out.inputs.len(),
                out.preds.len(),
                out.q_halt.len()
            ));
        }
        if let Some(&id) = out.puzzle_ids.iter().find(|&&id| {
            id as i64 != self.blank_id
                && usize::try_from(id).map_or(true, |i| i >= self.identifiers.len())
        }) {
            return bad(format!(
                "puzzle id {id} is outside identifiers.json ({} names)",
                self.identifiers.len()
            ));
        }

        let mut buf = Vec::with_capacity(s);
        for (i, &id) in out.puzzle_ids.iter().enumerate() {
            // Padding rows of the last batch (the reference masks them out).
            if id as i64 == self.blank_id {
                continue;
            }
            self.examples += 1;
            let (puzzle, aug) = self.identifiers[id as usize];
            let Some(p) = puzzle else {
                self.unmatched += 1;
                continue;
            };
            let input = aug.invert(&crop_tokens(&out.inputs[i * s..(i + 1) * s], &mut buf));
            let input_hash = input.hash();
            if !self.puzzles[p]
                .tests
                .iter()
                .any(|t| t.input_hash == input_hash)
            {
                self.unmatched += 1;
                continue;
            }
            let pred = aug.invert(&crop_tokens(&out.preds[i * s..(i + 1) * s], &mut buf));
            if pred.rows() == 0 || pred.cols() == 0 {
                // An empty crop (first token not a colour) can never be a
                // correct answer: it gets no vote, so it never takes an attempt.
                continue;
            }
            let pred_hash = pred.hash();
            self.grids.entry(pred_hash).or_insert(pred);
            // The reference takes sigmoid in float64 of the logit.
            let q = sigmoid(out.q_halt[i] as f64);
            self.votes[p]
                .entry(input_hash)
                .or_default()
                .vote(pred_hash, q);
        }
        Ok(())
    }

    /// Score everything added so far.
    pub fn result(&self) -> ArcResult {
        let mut correct = vec![0.0f64; self.ks.len()];
        let mut submission = Map::new();
        let mut reports = Vec::with_capacity(self.puzzles.len());
        let zero = Value::Array(vec![Value::Array(vec![Value::from(0)])]);
        for (p, puzzle) in self.puzzles.iter().enumerate() {
            let mut solved = vec![0usize; self.ks.len()];
            let mut attempts = Vec::with_capacity(puzzle.tests.len());
            let mut tests = Vec::with_capacity(puzzle.tests.len());
            for t in &puzzle.tests {
                let ranked = self.votes[p]
                    .get(&t.input_hash)
                    .map(Tally::ranked)
                    .unwrap_or_default();
                let rank = ranked.iter().position(|c| c.hash == t.output_hash);
                for (s, &k) in solved.iter_mut().zip(&self.ks) {
                    *s += usize::from(rank.is_some_and(|r| r < k));
                }

                // Top two, the first repeated when alone. Deviation: no
                // prediction gives [[0]] (the reference skips the entry).
                let mut entry = Map::new();
                for a in 0..ATTEMPTS {
                    let grid = match ranked.get(a).or(ranked.first()) {
                        Some(c) => grid_to_json(&self.grids[&c.hash]),
                        None => zero.clone(),
                    };
                    entry.insert(format!("attempt_{}", a + 1), grid);
                }
                attempts.push(Value::Object(entry));

                tests.push(TestReport {
                    votes: ranked.iter().map(|c| c.votes).sum(),
                    candidates: ranked.len(),
                    solution_rank: rank.map(|r| r + 1),
                    top: ranked
                        .iter()
                        .take(REPORT_CANDIDATES)
                        .map(|c| {
                            let g = &self.grids[&c.hash];
                            CandidateReport {
                                votes: c.votes,
                                mean_q: c.mean_q,
                                correct: c.hash == t.output_hash,
                                hash: hex::encode(&c.hash[..8]),
                                shape: [g.rows(), g.cols()],
                            }
                        })
                        .collect(),
                });
            }
            // Deviation: no test inputs scores 0 (the reference divides by 0).
            if !puzzle.tests.is_empty() {
                for (c, s) in correct.iter_mut().zip(&solved) {
                    *c += *s as f64 / puzzle.tests.len() as f64;
                }
            }
            submission.insert(puzzle.id.clone(), Value::Array(attempts));
            let solved_within = |k: usize| {
                tests
                    .iter()
                    .filter(|t| t.solution_rank.is_some_and(|r| r <= k))
                    .count()
            };
            reports.push(PuzzleReport {
                id: puzzle.id.clone(),
                solved_pass1: solved_within(1),
                solved_pass2: solved_within(ATTEMPTS),
                tests,
            });
        }
        let n = self.puzzles.len().max(1) as f64;
        ArcResult {
            metrics: self
                .ks
                .iter()
                .zip(&correct)
                .map(|(k, c)| (format!("ARC/pass@{k}"), c / n))
                .collect(),
            submission: Value::Object(submission),
            report: ArcReport {
                examples: self.examples,
                unmatched_examples: self.unmatched,
                puzzles: reports,
            },
        }
    }
}

/// Write `bytes` to `dir/name` through a temporary file and a rename, so a
/// reader never sees half a file.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), EvalError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| EvalError::Write { path: p, source }
    };
    std::fs::write(&tmp, bytes).map_err(err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(err(&path))
}

/// Write `submission.json` (Kaggle format) and `report.json` (the metrics
/// and the per-puzzle report) into `dir`, creating it.
pub fn write_results(dir: &Path, result: &ArcResult) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|source| EvalError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let metrics: Map<String, Value> = result
        .metrics
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(*v)))
        .collect();
    let mut report = serde_json::to_value(&result.report).expect("report serialises");
    if let Value::Object(m) = &mut report {
        m.insert("metrics".into(), Value::Object(metrics));
    }
    let enc = |v: &Value| serde_json::to_vec(v).expect("JSON values serialise");
    write_atomic(dir, "submission.json", &enc(&result.submission))?;
    write_atomic(dir, "report.json", &enc(&report))
}
