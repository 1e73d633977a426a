//! Evaluation of model outputs against the held-out test puzzles (spec
//! section 9).

pub mod arc;
pub mod gather;

pub use arc::{
    write_results, ArcEvaluator, ArcReport, ArcResult, CandidateReport, EvalError, PuzzleReport,
    TestReport, DEFAULT_PASS_KS,
};
