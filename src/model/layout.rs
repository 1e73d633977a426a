//! The flat parameter layout: every dense trainable tensor in the
//! reference's parameter order, packed into one f32 buffer. The master
//! weights, the gradients, the Adam moments and the EMA shadow are all flat
//! buffers of this one layout, so an engine (CPU or GPU) and the optimiser
//! kernels address them by offset instead of by tensor.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::model::config::ArchConfig;
use crate::model::trm::Params;
use crate::model::weights::{expected_shapes, trainable_names};
use crate::tensor::Tensor;

/// The dense trainable tensors in the reference's parameter order, and
/// where each sits in the flat buffer.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub offsets: Vec<usize>,
    pub len: usize,
    /// Per transformer layer `i` of the L level: the span of its tensors
    /// (they are adjacent in the reference order).
    pub layers: Vec<Range<usize>>,
}

impl FlatLayout {
    pub fn new(arch: &ArchConfig) -> FlatLayout {
        let shapes: BTreeMap<String, Vec<usize>> = expected_shapes(arch)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        let names = trainable_names(arch);
        let mut offsets = Vec::with_capacity(names.len());
        let mut len = 0;
        let mut shp = Vec::with_capacity(names.len());
        for n in &names {
            offsets.push(len);
            let s = shapes[n].clone();
            len += s.iter().product::<usize>();
            shp.push(s);
        }
        let mut layout = FlatLayout {
            names,
            shapes: shp,
            offsets,
            len,
            layers: Vec::new(),
        };
        layout.layers = (0..arch.l_layers)
            .map(|i| layout.span_of_prefix(&format!("inner.L_level.layers.{i}.")))
            .collect();
        layout
    }

    /// Where tensor `i` (in `names` order) sits in the flat buffer.
    pub fn range(&self, i: usize) -> Range<usize> {
        let len: usize = self.shapes[i].iter().product();
        self.offsets[i]..self.offsets[i] + len
    }

    /// Where the tensor called `name` sits, if it is in the layout.
    pub fn range_of(&self, name: &str) -> Option<Range<usize>> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| self.range(i))
    }

    /// The smallest span covering every tensor whose name starts with `prefix`.
    fn span_of_prefix(&self, prefix: &str) -> Range<usize> {
        let mut span: Option<Range<usize>> = None;
        for (i, n) in self.names.iter().enumerate() {
            if n.starts_with(prefix) {
                let r = self.range(i);
                span = Some(match span {
                    Some(s) => s.start.min(r.start)..s.end.max(r.end),
                    None => r,
                });
            }
        }
        span.unwrap_or(0..0)
    }

    /// Copies the dense weights of `p` into one flat buffer.
    pub fn flatten(&self, p: &Params<f32>) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len);
        for n in &self.names {
            out.extend_from_slice(p.dense(n).expect("layout names come from the config"));
        }
        out
    }

    /// Writes a flat buffer back into the typed weights.
    pub fn unflatten(&self, flat: &[f32], p: &mut Params<f32>) {
        for (n, &off) in self.names.iter().zip(&self.offsets) {
            let dst = p.dense_mut(n).expect("layout names come from the config");
            let len = dst.len();
            dst.copy_from_slice(&flat[off..off + len]);
        }
    }

    /// A flat buffer as reference-named tensors.
    pub fn to_map(&self, flat: &[f32], prefix: &str) -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        for ((n, s), &off) in self.names.iter().zip(&self.shapes).zip(&self.offsets) {
            let len: usize = s.iter().product();
            m.insert(
                format!("{prefix}{n}"),
                Tensor::new(s, flat[off..off + len].to_vec()),
            );
        }
        m
    }

    /// The inverse of [`FlatLayout::to_map`]; every tensor must be present
    /// with its shape.
    pub fn from_map(&self, m: &BTreeMap<String, Tensor>, prefix: &str) -> Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(self.len);
        for (n, s) in self.names.iter().zip(&self.shapes) {
            let key = format!("{prefix}{n}");
            let t = m
                .get(&key)
                .ok_or_else(|| format!("missing tensor `{key}`"))?;
            if &t.shape != s {
                return Err(format!("`{key}` has shape {:?}, expected {s:?}", t.shape));
            }
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_are_adjacent_and_cover_each_layers_tensors() {
        let arch = ArchConfig::trm_default(36, 12, 10);
        let l = FlatLayout::new(&arch);
        assert_eq!(l.layers.len(), arch.l_layers);
        let mut covered = 0;
        for (i, r) in l.layers.iter().enumerate() {
            let inside: usize = (0..l.names.len())
                .filter(|&k| l.names[k].starts_with(&format!("inner.L_level.layers.{i}.")))
                .map(|k| l.range(k).len())
                .sum();
            // Adjacent: the span holds exactly the layer's tensors.
            assert_eq!(r.len(), inside);
            covered += inside;
        }
        assert!(covered > 0 && covered < l.len);
        assert_eq!(l.range(l.names.len() - 1).end, l.len);
        assert_eq!(l.range_of(&l.names[0]), Some(0..l.range(0).len()));
    }
}
