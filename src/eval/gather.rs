//! Evaluation split over ranks: each rank evaluates its rows of every test
//! batch (rows `r * local..(r + 1) * local` of each global batch, as the
//! loader hands them out), then the outputs are gathered and merged into
//! the order one rank would have produced, so the ARC evaluator votes over
//! the same outputs in the same order whatever the world size.

use crate::dist::{Collective, CollectiveError};
use crate::model::act::EvalOutputs;

/// Every rank's `outs` merged in one-rank order. `batch_rows` is the number
/// of real (non-padding) rows this rank kept from each test batch, in order;
/// every rank walks the same global batches. A collective: every rank calls
/// it, and every rank gets the merged outputs.
pub fn gather_outputs(
    outs: EvalOutputs,
    batch_rows: &[usize],
    coll: &dyn Collective,
) -> Result<EvalOutputs, CollectiveError> {
    if coll.world_size() == 1 {
        return Ok(outs);
    }
    let fail = |message: String| CollectiveError {
        op: "evaluation gather",
        rank: coll.rank(),
        world: coll.world_size(),
        message,
    };
    let parts = coll.all_gather_bytes(&encode(&outs, batch_rows))?;
    let decoded = parts
        .iter()
        .enumerate()
        .map(|(r, p)| decode(p).map_err(|e| fail(format!("rank {r}'s outputs: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    merge(&decoded).map_err(fail)
}

/// One rank's outputs and its real rows per batch.
type Part = (EvalOutputs, Vec<usize>);

/// Batch by batch, each rank's rows of that batch in rank order.
fn merge(parts: &[Part]) -> Result<EvalOutputs, String> {
    let Some((first, first_rows)) = parts.first() else {
        return Ok(EvalOutputs::default());
    };
    let seq = first.seq_len;
    let batches = first_rows.len();
    for (r, (o, rows)) in parts.iter().enumerate() {
        if o.seq_len != seq || rows.len() != batches {
            return Err(format!(
                "rank {r} has {} batches of sequence length {}, rank 0 has {batches} of {seq}",
                rows.len(),
                o.seq_len
            ));
        }
    }
    let mut out = EvalOutputs {
        seq_len: seq,
        ..EvalOutputs::default()
    };
    // The next row to take from each rank.
    let mut next = vec![0usize; parts.len()];
    for b in 0..batches {
        for (r, (o, rows)) in parts.iter().enumerate() {
            let (lo, hi) = (next[r], next[r] + rows[b]);
            out.puzzle_ids.extend_from_slice(&o.puzzle_ids[lo..hi]);
            out.inputs.extend_from_slice(&o.inputs[lo * seq..hi * seq]);
            out.preds.extend_from_slice(&o.preds[lo * seq..hi * seq]);
            out.q_halt.extend_from_slice(&o.q_halt[lo..hi]);
            next[r] = hi;
        }
    }
    Ok(out)
}

/// `seq_len, batches, rows per batch..., puzzle ids, inputs, preds, q_halt`,
/// little-endian (u64 counts, i32 tokens, f32 bits).
fn encode(o: &EvalOutputs, batch_rows: &[usize]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend((o.seq_len as u64).to_le_bytes());
    b.extend((batch_rows.len() as u64).to_le_bytes());
    for &n in batch_rows {
        b.extend((n as u64).to_le_bytes());
    }
    for v in [&o.puzzle_ids, &o.inputs, &o.preds] {
        b.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    b.extend(o.q_halt.iter().flat_map(|x| x.to_le_bytes()));
    b
}

/// The inverse of [`encode`], checking every length against the bytes.
fn decode(bytes: &[u8]) -> Result<Part, String> {
    let mut r = Reader { bytes, at: 0 };
    let seq = r.count()?;
    let batches = r.count()?;
    let batch_rows = (0..batches)
        .map(|_| r.count())
        .collect::<Result<Vec<_>, _>>()?;
    let n: usize = batch_rows.iter().sum();
    let tokens = n
        .checked_mul(seq)
        .ok_or_else(|| format!("{n} rows of {seq} tokens overflow"))?;
    let puzzle_ids = r.words(n)?.map(i32::from_le_bytes).collect();
    let inputs = r.words(tokens)?.map(i32::from_le_bytes).collect();
    let preds = r.words(tokens)?.map(i32::from_le_bytes).collect();
    let q_halt = r.words(n)?.map(f32::from_le_bytes).collect();
    if r.at != bytes.len() {
        return Err(format!("{} bytes left over", bytes.len() - r.at));
    }
    let outs = EvalOutputs {
        seq_len: seq,
        puzzle_ids,
        inputs,
        preds,
        q_halt,
    };
    Ok((outs, batch_rows))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            format!(
                "cut short: {n} bytes wanted at byte {}, {} there",
                self.at,
                self.bytes.len()
            )
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn count(&mut self) -> Result<usize, String> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes(b.try_into().map_err(|_| "bad count".to_string())?);
        usize::try_from(v).map_err(|_| format!("count {v} does not fit this machine"))
    }

    /// `n` 4-byte words.
    fn words(&mut self, n: usize) -> Result<impl Iterator<Item = [u8; 4]> + 'a, String> {
        let len = n
            .checked_mul(4)
            .ok_or_else(|| format!("{n} words overflow"))?;
        let s = self.take(len)?;
        Ok(s.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows `ids` of a 2-token sequence: the id is in every field.
    fn outs(ids: &[i32]) -> EvalOutputs {
        EvalOutputs {
            seq_len: 2,
            puzzle_ids: ids.to_vec(),
            inputs: ids.iter().flat_map(|&i| [i, -i]).collect(),
            preds: ids.iter().flat_map(|&i| [i + 100, i + 200]).collect(),
            q_halt: ids.iter().map(|&i| i as f32 * 0.5).collect(),
        }
    }

    #[test]
    fn ranks_merge_batch_by_batch() {
        // Two batches of 6 global rows over 3 ranks; the second batch has 4
        // real rows (ranks 0 and 1 full, rank 2 only padding).
        let parts = [
            (outs(&[0, 1, 6, 7]), vec![2, 2]),
            (outs(&[2, 3, 8, 9]), vec![2, 2]),
            (outs(&[4, 5]), vec![2, 0]),
        ];
        let encoded: Vec<Part> = parts
            .iter()
            .map(|(o, rows)| decode(&encode(o, rows)).unwrap())
            .collect();
        let got = merge(&encoded).unwrap();
        let want = outs(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(got.puzzle_ids, want.puzzle_ids);
        assert_eq!(got.inputs, want.inputs);
        assert_eq!(got.preds, want.preds);
        assert_eq!(got.q_halt, want.q_halt);
    }

    #[test]
    fn bad_parts_are_errors() {
        let good = encode(&outs(&[1, 2]), &[2]);
        assert!(decode(&good[..good.len() - 1])
            .unwrap_err()
            .contains("cut short"));
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long).unwrap_err().contains("left over"));
        // Ranks that walked a different number of batches.
        let parts = vec![(outs(&[1]), vec![1]), (outs(&[2]), vec![0, 1])];
        assert!(merge(&parts).unwrap_err().contains("rank 1 has 2 batches"));
    }
}
