//! embedding: row gather `out[i] = table[ids[i]] * scale` and its scatter-add
//! backward `dtable[ids[i]] += dout[i] * scale`.
//!
//! Design rule: ids are validated at the model boundary (typed error there);
//! here an out-of-range id is a programming error and panics.

use super::Real;

/// Forward: `out[N, D] = scale * table[ids, :]`, `table` [rows, D].
pub fn embedding_forward<T: Real>(out: &mut [T], table: &[T], ids: &[i32], d: usize, scale: T) {
    assert_eq!(out.len(), ids.len() * d, "embedding_forward: out");
    let rows = table.len() / d;
    for (o, &id) in out.chunks_exact_mut(d).zip(ids) {
        let id = id as usize;
        assert!(id < rows, "embedding_forward: id {id} out of range {rows}");
        for (a, &b) in o.iter_mut().zip(&table[id * d..(id + 1) * d]) {
            *a = b * scale;
        }
    }
}

/// Backward: `out_i = scale * table[ids_i]` is a selection, so its transpose
/// is a scatter-add: `dtable[ids_i] += scale * dout_i` (repeated ids sum).
pub fn embedding_backward<T: Real>(dtable: &mut [T], dout: &[T], ids: &[i32], d: usize, scale: T) {
    assert_eq!(dout.len(), ids.len() * d, "embedding_backward: dout");
    let rows = dtable.len() / d;
    for (g, &id) in dout.chunks_exact(d).zip(ids) {
        let id = id as usize;
        assert!(id < rows, "embedding_backward: id {id} out of range {rows}");
        for (a, &b) in dtable[id * d..(id + 1) * d].iter_mut().zip(g) {
            *a += b * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// Linear op: f64 central differences, tolerance 1e-9.
    #[test]
    fn embedding_gradcheck() {
        let (rows, d) = (4, 3);
        let ids = [2, 0, 2, 3, 1];
        let table = rand_vec(1, rows * d, 1.0);
        let proj = rand_vec(2, ids.len() * d, 1.0);
        let f = |t: &[f64]| {
            let mut o = vec![0.0; ids.len() * d];
            embedding_forward(&mut o, t, &ids, d, 1.5);
            dot(&proj, &o)
        };
        let mut g = vec![0.0; rows * d];
        embedding_backward(&mut g, &proj, &ids, d, 1.5);
        assert_close("dtable", &g, &numeric_grad(&table, 1e-5, f), 1e-9);
    }
}
