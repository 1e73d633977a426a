//! The puzzle-embedding rows a run reads, and nothing else, on each device.
//!
//! A model trained on ARC-AGI-2 has a row per augmented training puzzle,
//! about a million (2 GB in f32), while a test set reads a few hundred
//! thousand at most (one per augmented copy it runs). Each device gets a
//! table of just those rows, renumbered in their old order, so GPUs with
//! little memory (24 GB L4s) and the host copies per device stay small. An
//! embedding lookup reads one row by its number, so the outputs are those
//! of the whole table.

use crate::model::config::ArchConfig;
use crate::model::trm::Params;

/// Old row numbers of the compact table, in order, and the way back.
pub struct CompactRows {
    /// New row -> old row.
    pub old: Vec<i32>,
    /// Old row -> new row (`-1`: not kept); as long as the old table.
    new: Vec<i32>,
}

impl CompactRows {
    /// The rows `used` reads plus the padding rows' `blank`, out of a
    /// table of `rows`; every id must be below `rows`.
    pub fn new(rows: usize, used: impl IntoIterator<Item = i32>, blank: i32) -> CompactRows {
        let mut keep = vec![false; rows];
        for id in used.into_iter().chain([blank]) {
            if let Some(k) = usize::try_from(id).ok().and_then(|i| keep.get_mut(i)) {
                *k = true;
            }
        }
        let mut new = vec![-1i32; rows];
        let mut old = Vec::new();
        for (i, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
            new[i] = old.len() as i32;
            old.push(i as i32);
        }
        CompactRows { old, new }
    }

    /// The new number of old row `id` (`None`: not kept, or out of range).
    pub fn map(&self, id: i32) -> Option<i32> {
        let i = usize::try_from(id).ok()?;
        self.new.get(i).copied().filter(|&n| n >= 0)
    }

    /// `arch` and a copy of `params` with the kept rows only.
    pub fn apply(&self, arch: &ArchConfig, params: &Params<f32>) -> (ArchConfig, Params<f32>) {
        let nd = arch.puzzle_emb_ndim;
        let mut arch = arch.clone();
        arch.num_puzzle_identifiers = self.old.len();
        let mut table = Vec::with_capacity(self.old.len() * nd);
        for &o in &self.old {
            let o = o as usize;
            table.extend_from_slice(&params.puzzle_emb[o * nd..(o + 1) * nd]);
        }
        let compact = Params {
            embed: params.embed.clone(),
            puzzle_emb: table,
            layers: params.layers.clone(),
            lm_head: params.lm_head.clone(),
            q_w: params.q_w.clone(),
            q_b: params.q_b.clone(),
            h_init: params.h_init.clone(),
            l_init: params.l_init.clone(),
        };
        (arch, compact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_their_order_and_the_blank() {
        let c = CompactRows::new(10, [7, 3, 7, 9], 0);
        assert_eq!(c.old, [0, 3, 7, 9]);
        assert_eq!(c.map(0), Some(0));
        assert_eq!(c.map(3), Some(1));
        assert_eq!(c.map(7), Some(2));
        assert_eq!(c.map(9), Some(3));
        assert_eq!(c.map(4), None);
        assert_eq!(c.map(10), None);
        assert_eq!(c.map(-1), None);
    }
}
