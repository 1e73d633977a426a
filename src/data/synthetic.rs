//! A small synthetic ARC-style task family, generated in-process so the
//! demo runs on a fresh machine with no data: each puzzle applies one hidden
//! rule (a flip, a rotation, a transpose, a colour map, or gravity) to small
//! random grids. Written in the Kaggle "combined" JSON layout, so it goes
//! through exactly the same builder as the real ARC files.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::arc::grid_to_json;
use super::grid::{Grid, NUM_COLOURS};

/// The hidden rule of a synthetic puzzle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// One of the 8 dihedral transforms (1..=7; 0 would be trivial).
    Dihedral(u8),
    /// Recolour through a fixed permutation of 1..9.
    ColourMap([u8; NUM_COLOURS]),
    /// Every coloured cell falls to the bottom of its column.
    Gravity,
}

impl Rule {
    pub fn apply(&self, g: &Grid) -> Grid {
        match self {
            Rule::Dihedral(t) => g.dihedral(*t),
            Rule::ColourMap(m) => g.map_colours(m),
            Rule::Gravity => {
                let (r, c) = (g.rows(), g.cols());
                let mut cells = vec![0u8; r * c];
                for j in 0..c {
                    let mut dst = r;
                    for i in (0..r).rev() {
                        let v = g.get(i, j);
                        if v != 0 {
                            dst -= 1;
                            cells[dst * c + j] = v;
                        }
                    }
                }
                Grid::from_cells(r, c, &cells)
            }
        }
    }

    fn random<R: Rng>(rng: &mut R) -> Rule {
        match rng.gen_range(0..3) {
            0 => Rule::Dihedral(rng.gen_range(1..8)),
            1 => {
                let mut m = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
                m[1..].shuffle(rng);
                Rule::ColourMap(m)
            }
            _ => Rule::Gravity,
        }
    }
}

/// A random grid of `rows x cols` with about 40% coloured cells from a
/// palette of a few colours.
fn random_grid<R: Rng>(rng: &mut R, rows: usize, cols: usize, palette: &[u8]) -> Grid {
    let cells: Vec<u8> = (0..rows * cols)
        .map(|_| {
            if rng.gen_bool(0.4) {
                palette[rng.gen_range(0..palette.len())]
            } else {
                0
            }
        })
        .collect();
    Grid::from_cells(rows, cols, &cells)
}

/// One puzzle: `n_train` demonstration pairs and `n_test` test pairs of grids
/// up to `max_side` square, all following one rule.
pub fn puzzle<R: Rng>(
    rng: &mut R,
    max_side: usize,
    n_train: usize,
    n_test: usize,
) -> (Rule, Vec<(Grid, Grid)>) {
    let rule = Rule::random(rng);
    let mut palette: Vec<u8> = (1..NUM_COLOURS as u8).collect();
    palette.shuffle(rng);
    palette.truncate(rng.gen_range(2..=4));
    let pairs = (0..n_train + n_test)
        .map(|_| {
            let (r, c) = (rng.gen_range(3..=max_side), rng.gen_range(3..=max_side));
            let g = random_grid(rng, r, c, &palette);
            (g, rule.apply(&g))
        })
        .collect();
    (rule, pairs)
}

/// Write `{prefix}_{subset}_challenges.json` and `_solutions.json` for the
/// subsets `training` (`n_train_puzzles`) and `evaluation` (`n_eval_puzzles`).
pub fn write_arc_files(
    prefix: &Path,
    n_train_puzzles: usize,
    n_eval_puzzles: usize,
    max_side: usize,
    seed: u64,
) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if let Some(parent) = prefix.parent() {
        std::fs::create_dir_all(parent)?;
    }
    for (subset, n) in [
        ("training", n_train_puzzles),
        ("evaluation", n_eval_puzzles),
    ] {
        let mut chal = Map::new();
        let mut sols = Map::new();
        for i in 0..n {
            let (_, pairs) = puzzle(&mut rng, max_side, 3, 1);
            let id = format!("syn{subset:.1}{i:04}");
            let train: Vec<Value> = pairs[..3]
                .iter()
                .map(|(a, b)| json!({"input": grid_to_json(a), "output": grid_to_json(b)}))
                .collect();
            let test: Vec<Value> = pairs[3..]
                .iter()
                .map(|(a, _)| json!({"input": grid_to_json(a)}))
                .collect();
            let sol: Vec<Value> = pairs[3..].iter().map(|(_, b)| grid_to_json(b)).collect();
            chal.insert(id.clone(), json!({"train": train, "test": test}));
            sols.insert(id, Value::Array(sol));
        }
        let base = prefix.display().to_string();
        std::fs::write(
            format!("{base}_{subset}_challenges.json"),
            Value::Object(chal).to_string(),
        )?;
        std::fs::write(
            format!("{base}_{subset}_solutions.json"),
            Value::Object(sols).to_string(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gravity_drops_cells_to_the_bottom() {
        let g = Grid::from_cells(3, 2, &[1, 0, 0, 2, 3, 0]);
        let out = Rule::Gravity.apply(&g);
        assert_eq!(out.cells(), &[0, 0, 1, 0, 3, 2]);
    }

    #[test]
    fn puzzles_follow_their_rule_and_stay_small() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..50 {
            let (rule, pairs) = puzzle(&mut rng, 6, 3, 1);
            assert_eq!(pairs.len(), 4);
            for (a, b) in pairs {
                assert!(a.rows() <= 6 && a.cols() <= 6 && a.rows() >= 3);
                assert_eq!(rule.apply(&a), b);
            }
        }
    }
}
