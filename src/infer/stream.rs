//! The augmented test set as a stream of batches, rendered a few puzzles
//! ahead of the batch being cut, never whole: ARC-AGI-2 at 1000
//! augmentations is about 172 k examples (300 MB of canvases), and each
//! original puzzle's group is at most a few MB.
//!
//! The batches are exactly the test batches a dataset built from the whole
//! split in memory gives (`PuzzleDataset::test_batches` on `render_split`
//! of every member, one rank): the examples in member order, cut every
//! `batch` examples, the last batch padded with the pad token, ignored
//! labels and the blank puzzle id. Rendering a member depends only on the
//! member (its stream is keyed by its build-order index), so rendering a
//! few at a time gives the same bytes.

use std::collections::VecDeque;

use crate::data::builder::{render_split, SplitMember};
use crate::data::loader::{Batch, IGNORE_LABEL_ID};

/// Name of the one set of an inference test split.
pub const SET_NAME: &str = "all";

/// One rendered example, as the loader collates it.
struct Example {
    inputs: Vec<u8>,
    labels: Vec<u8>,
    puzzle_id: i32,
}

/// The test batches of `members`, rendered on demand.
pub struct TestStream<'a> {
    members: &'a [SplitMember<'a>],
    next_member: usize,
    side: usize,
    seed: u64,
    batch: usize,
    blank_id: i32,
    pending: VecDeque<Example>,
    examples: usize,
}

impl<'a> TestStream<'a> {
    /// The batches of `batch` examples of `members` (test split, canvas
    /// `side`, build `seed`), padded with puzzle id `blank_id`.
    pub fn new(
        members: &'a [SplitMember<'a>],
        side: usize,
        seed: u64,
        batch: usize,
        blank_id: i32,
    ) -> TestStream<'a> {
        let examples = members
            .iter()
            .map(|m| m.group.len() * m.examples.len())
            .sum();
        TestStream {
            members,
            next_member: 0,
            side,
            seed,
            batch: batch.max(1),
            blank_id,
            pending: VecDeque::new(),
            examples,
        }
    }

    /// Examples in the whole stream (padding excluded).
    pub fn examples(&self) -> usize {
        self.examples
    }

    /// Batches in the whole stream.
    pub fn batches(&self) -> usize {
        self.examples.div_ceil(self.batch)
    }

    /// Renders members until `batch` examples are pending or none is left;
    /// at least as many as the machine has threads at a time, since
    /// `render_split` renders its members in parallel.
    fn fill(&mut self) {
        let seq_len = self.side * self.side;
        let threads = rayon::current_num_threads().max(1);
        while self.pending.len() < self.batch && self.next_member < self.members.len() {
            let mut end = self.next_member;
            let mut want = self.batch - self.pending.len();
            while end < self.members.len() && (want > 0 || end - self.next_member < threads) {
                let m = &self.members[end];
                want = want.saturating_sub(m.group.len() * m.examples.len());
                end += 1;
            }
            let split = render_split(
                &self.members[self.next_member..end],
                true,
                self.side,
                self.seed,
            );
            self.next_member = end;
            for (p, &id) in split.puzzle_identifiers.iter().enumerate() {
                let (from, to) = (
                    split.puzzle_indices[p] as usize,
                    split.puzzle_indices[p + 1] as usize,
                );
                for e in from..to {
                    let row = e * seq_len..(e + 1) * seq_len;
                    self.pending.push_back(Example {
                        inputs: split.inputs[row.clone()].to_vec(),
                        labels: split.labels[row].to_vec(),
                        puzzle_id: id,
                    });
                }
            }
        }
    }
}

impl Iterator for TestStream<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.fill();
        if self.pending.is_empty() {
            return None;
        }
        let seq_len = self.side * self.side;
        let n = self.batch;
        let real = self.pending.len().min(n);
        let mut inputs = Vec::with_capacity(n * seq_len);
        let mut labels = Vec::with_capacity(n * seq_len);
        let mut puzzle_identifiers = Vec::with_capacity(n);
        for ex in self.pending.drain(..real) {
            inputs.extend(ex.inputs.iter().map(|&t| t as i32));
            // The split's ignore label is the pad token 0, as the builder
            // writes it (`ignore_label_id: 0`).
            labels.extend(ex.labels.iter().map(|&t| match t {
                0 => IGNORE_LABEL_ID,
                t => t as i32,
            }));
            puzzle_identifiers.push(ex.puzzle_id);
        }
        inputs.resize(n * seq_len, 0);
        labels.resize(n * seq_len, IGNORE_LABEL_ID);
        puzzle_identifiers.resize(n, self.blank_id);
        Some(Batch {
            set_name: SET_NAME.to_string(),
            inputs,
            labels,
            puzzle_identifiers,
            batch_size: n,
            seq_len,
            effective_global_size: real,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::data::arc::{parse_challenges, Puzzle};
    use crate::data::augment::Augmentation;
    use crate::data::builder::puzzle_group;
    use crate::data::loader::Split;

    /// Five puzzles with 1..3 test inputs of assorted sizes.
    fn puzzles() -> Vec<Puzzle> {
        let grid = |r: usize, c: usize, k: usize| -> serde_json::Value {
            (0..r)
                .map(|i| (0..c).map(|j| (i * 3 + j * 7 + k) % 10).collect::<Vec<_>>())
                .collect::<Vec<_>>()
                .into()
        };
        let mut map = serde_json::Map::new();
        for p in 0..5usize {
            let pair = |k: usize| serde_json::json!({"input": grid(2 + k % 3, 3 + p % 2, k), "output": grid(3, 2 + k % 2, k + 1)});
            let tests: Vec<_> = (0..1 + p % 3).map(|k| pair(10 + k)).collect();
            map.insert(
                format!("p{p}"),
                serde_json::json!({"train": [pair(p), pair(p + 1)], "test": tests}),
            );
        }
        parse_challenges(Path::new("test.json"), map.into(), None).unwrap()
    }

    /// The stream cuts the same batches, byte for byte, as a dataset of the
    /// whole split rendered at once (the path it replaces), at batch sizes
    /// that split groups, match them and exceed the whole set; with a
    /// prefix of each group too.
    #[test]
    fn stream_equals_the_whole_split_dataset() {
        let puzzles = puzzles();
        let (side, seed, blank) = (6usize, 11u64, 0i32);
        let groups: Vec<Vec<Augmentation>> = puzzles
            .iter()
            .enumerate()
            .map(|(i, p)| puzzle_group(p, i, seed, 4))
            .collect();
        let mut next = 1i32;
        let ids: Vec<Vec<i32>> = groups
            .iter()
            .map(|g| {
                let ids = (next..next + g.len() as i32).collect();
                next += g.len() as i32;
                ids
            })
            .collect();
        for most in [usize::MAX, 2] {
            let members: Vec<SplitMember> = puzzles
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let n = groups[i].len().min(most);
                    SplitMember {
                        index: i,
                        examples: p.test.iter().collect(),
                        group: &groups[i][..n],
                        ids: &ids[i][..n],
                    }
                })
                .collect();
            for batch in [1usize, 3, 7, 16, 1000] {
                let space = super::super::Space {
                    seq_len: side * side,
                    rows: next as usize,
                    blank: blank as i64,
                    batch,
                    seed,
                    name: Path::new("test.json"),
                };
                let whole = space
                    .dataset(Split::Test, render_split(&members, true, side, seed), 1)
                    .unwrap();
                let want: Vec<Batch> = whole.test_batches().collect();
                let stream = TestStream::new(&members, side, seed, batch, blank);
                assert_eq!(stream.batches(), want.len());
                let examples = stream.examples();
                let got: Vec<Batch> = stream.collect();
                assert_eq!(got.len(), want.len(), "batch {batch}");
                let real: usize = got.iter().map(|b| b.effective_global_size).sum();
                assert_eq!(real, examples);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let at = format!("batch size {batch}, prefix {most}, batch {i}");
                    assert_eq!(g.set_name, w.set_name, "{at}");
                    assert_eq!(g.inputs, w.inputs, "{at}");
                    assert_eq!(g.labels, w.labels, "{at}");
                    assert_eq!(g.puzzle_identifiers, w.puzzle_identifiers, "{at}");
                    assert_eq!(g.batch_size, w.batch_size, "{at}");
                    assert_eq!(g.seq_len, w.seq_len, "{at}");
                    assert_eq!(g.effective_global_size, w.effective_global_size, "{at}");
                }
            }
        }
    }
}
