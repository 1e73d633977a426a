//! The ACT carry of the whole global batch, as checkpoints hold it: every
//! rank's rows gathered in rank order, which is global slot order (rank `r`
//! holds slots `r * local..(r + 1) * local`, spec section 8). A checkpoint
//! written by any number of ranks then resumes on any number that divides
//! the same global batch: each rank takes its own rows back.

use std::collections::BTreeMap;

use crate::dist::{Collective, CollectiveError};
use crate::tensor::Tensor;

/// Every rank's carry tensors (each `[local, ...]`, batch first), joined
/// into `[local * world, ...]` in global slot order. A collective: every
/// rank calls it, and every rank gets the result.
pub fn gather(
    local: &BTreeMap<String, Tensor>,
    coll: &dyn Collective,
) -> Result<BTreeMap<String, Tensor>, CollectiveError> {
    if coll.world_size() == 1 {
        return Ok(local.clone());
    }
    let mut mine = Vec::new();
    for t in local.values() {
        mine.extend(t.data.iter().flat_map(|x| x.to_le_bytes()));
    }
    let parts = coll.all_gather_bytes(&mine)?;
    let mismatch = |r: usize, len: usize| {
        CollectiveError {
        op: "carry gather",
        rank: coll.rank(),
        world: coll.world_size(),
        message: format!(
            "rank {r} sent {len} bytes of carry, this rank has {}: the ranks disagree on the local batch or the model",
            mine.len()
        ),
    }
    };
    if let Some((r, p)) = parts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() != mine.len())
    {
        return Err(mismatch(r, p.len()));
    }
    let world = parts.len();
    let mut out = BTreeMap::new();
    // Byte offset of the current tensor inside every part (same layout).
    let mut offset = 0;
    for (name, t) in local {
        let n_bytes = t.data.len() * 4;
        let mut data = Vec::with_capacity(t.data.len() * world);
        for p in &parts {
            data.extend(
                p[offset..offset + n_bytes]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        offset += n_bytes;
        let mut shape = t.shape.clone();
        match shape.first_mut() {
            Some(rows) => *rows *= world,
            None => shape.push(world),
        }
        out.insert(name.clone(), Tensor::new(&shape, data));
    }
    Ok(out)
}

/// Rows `rank * local..(rank + 1) * local` of every tensor of a global
/// carry whose batch (first) dimension must be `global` slots.
pub fn rows_of_rank(
    global_carry: &BTreeMap<String, Tensor>,
    rank: usize,
    local: usize,
    global: usize,
) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out = BTreeMap::new();
    for (name, t) in global_carry {
        let rows = t.shape.first().copied().unwrap_or(0);
        if rows != global {
            return Err(format!(
                "the checkpoint's carry tensor `{name}` holds {rows} batch slots, but this run's \
                 global_batch_size is {global}: resume with the global batch size it was written with"
            ));
        }
        let per_row = t.data.len() / rows.max(1);
        let (lo, hi) = (rank * local * per_row, (rank + 1) * local * per_row);
        let data = t.data.get(lo..hi).ok_or_else(|| {
            format!("the checkpoint's carry tensor `{name}` is shorter than its shape says")
        })?;
        let mut shape = t.shape.clone();
        shape[0] = local;
        out.insert(name.clone(), Tensor::new(&shape, data.to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;

    fn carry(rows: usize, first: f32) -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        let z: Vec<f32> = (0..rows * 3).map(|i| first + i as f32).collect();
        m.insert("z_H".to_string(), Tensor::new(&[rows, 3], z));
        let s: Vec<f32> = (0..rows).map(|i| 100.0 + first + i as f32).collect();
        m.insert("steps".to_string(), Tensor::new(&[rows], s));
        m
    }

    #[test]
    fn one_rank_keeps_its_carry() {
        let c = carry(4, 0.0);
        assert_eq!(gather(&c, &SingleProcess).unwrap(), c);
    }

    #[test]
    fn a_ranks_rows_are_its_slots() {
        // 6 slots, 3 ranks of 2: rank 1 holds slots 2 and 3.
        let global = carry(6, 0.0);
        let mine = rows_of_rank(&global, 1, 2, 6).unwrap();
        assert_eq!(mine["z_H"].shape, vec![2, 3]);
        assert_eq!(mine["z_H"].data, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        assert_eq!(mine["steps"].data, vec![102.0, 103.0]);
        // Another global batch size is refused with both numbers.
        let err = rows_of_rank(&global, 0, 4, 8).unwrap_err();
        assert!(
            err.contains("6 batch slots") && err.contains("is 8"),
            "{err}"
        );
    }
}
