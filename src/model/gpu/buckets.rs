//! Which parts of the flat gradient buffer are all-reduced when, for data
//! parallel runs with collectives on the device.
//!
//! When is a gradient final? TRM applies its one L module `L_cycles + 1`
//! times in the gradient cycle, with the same weights: the backward runs
//! those calls in reverse (the H call first, the first L call last), each
//! accumulating into the same layer gradients. So no layer gradient is final
//! before the backward of the first L call, and within it the layers finish
//! from the last to the first. The LM and Q heads are final early, but they
//! share the buffer's prefix with the token embedding (final after the
//! embedding backward, at the very end) and the Q bias (set by the host
//! after the backward); the prefix is small, so it goes last, whole.
//!
//! What overlaps, then: each layer's all-reduce with the backward of the
//! layers before it in the first L call and with the embedding backward,
//! about 1 / (L_cycles + 1) of the backward. For the ARC config the whole
//! reduction is tens of MB, a fraction of a millisecond on NVLink (see the
//! README's "On many GPUs"), so this is enough.
//!
//! Small buckets merge into the next one launched (a launch costs NCCL's
//! latency whatever its size); the last bucket goes whatever its size.

use std::ops::Range;

/// When a bucket's gradients are final during the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// After layer `i`'s backward in the first L call (the last to run).
    Layer(usize),
    /// After the whole backward, the host-set Q bias included.
    End,
}

/// One contiguous range of the flat buffer, reduced in one NCCL call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub range: Range<usize>,
    pub ready: Ready,
}

/// The buckets in launch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Bucket>,
}

/// Below this a bucket merges into the next (about NCCL's latency-bound size).
pub const MIN_BUCKET_BYTES: usize = 4 << 20;

impl BucketPlan {
    /// The plan for a flat buffer of `len` values whose layer `i` occupies
    /// `layers[i]`, the layers contiguous and in order at the end of the
    /// buffer and everything before them final only at the end (the
    /// layout's order). Any other layout gets one bucket, reduced at the end.
    pub fn new(len: usize, layers: &[Range<usize>], min_values: usize) -> BucketPlan {
        let whole = BucketPlan {
            buckets: vec![Bucket {
                range: 0..len,
                ready: Ready::End,
            }],
        };
        let laid_out = !layers.is_empty()
            && layers.windows(2).all(|w| w[0].end == w[1].start)
            && layers.iter().all(|r| r.start < r.end)
            && layers[layers.len() - 1].end == len;
        if !laid_out {
            return whole;
        }
        let prefix = 0..layers[0].start;
        // Launch order: the last layer first, the prefix last.
        let mut segments: Vec<Bucket> = layers
            .iter()
            .enumerate()
            .rev()
            .map(|(i, r)| Bucket {
                range: r.clone(),
                ready: Ready::Layer(i),
            })
            .collect();
        segments.push(Bucket {
            range: prefix,
            ready: Ready::End,
        });
        let last = segments.len() - 1;
        let mut buckets = Vec::new();
        let mut pending: Option<Bucket> = None;
        for (k, s) in segments.into_iter().enumerate() {
            // Launch order runs down the buffer: the next segment ends where
            // the pending one starts.
            let merged = match pending.take() {
                Some(p) => Bucket {
                    range: s.range.start..p.range.end,
                    ready: s.ready,
                },
                None => s,
            };
            if k == last || merged.range.len() >= min_values {
                buckets.push(merged);
            } else {
                pending = Some(merged);
            }
        }
        buckets.retain(|b| !b.range.is_empty());
        BucketPlan { buckets }
    }

    /// The buckets final at `ready`.
    pub fn ready_at(&self, ready: Ready) -> impl Iterator<Item = &Bucket> {
        self.buckets.iter().filter(move |b| b.ready == ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ARC config's shapes: two layers of 3.4 M values after a prefix
    /// of 13.4 k (token table, LM head, Q head, each padded to 64).
    fn arc() -> (usize, Vec<Range<usize>>) {
        let prefix = 13_376;
        let layer = 3_407_872;
        let l0 = prefix..prefix + layer;
        let l1 = l0.end..l0.end + layer;
        (l1.end, vec![l0, l1])
    }

    /// Every value in exactly one bucket; a bucket holding a layer waits
    /// for that layer (or later); the prefix is always reduced at the end.
    fn check_partition(p: &BucketPlan, len: usize, layers: &[Range<usize>]) {
        let mut covered = vec![0u8; len];
        for b in &p.buckets {
            for c in &mut covered[b.range.clone()] {
                *c += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "not a partition: {p:?}");
        let launch = |r: Ready| match r {
            Ready::Layer(i) => layers.len() - 1 - i,
            Ready::End => layers.len(),
        };
        for b in &p.buckets {
            for (i, l) in layers.iter().enumerate() {
                if l.start < b.range.end && b.range.start < l.end {
                    assert!(
                        launch(b.ready) >= launch(Ready::Layer(i)),
                        "{b:?} before layer {i}"
                    );
                }
            }
            if b.range.start < layers[0].start {
                assert_eq!(b.ready, Ready::End, "{b:?} holds the prefix");
            }
        }
        let order: Vec<usize> = p.buckets.iter().map(|b| launch(b.ready)).collect();
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "launch order {order:?}"
        );
    }

    #[test]
    fn arc_config_buckets_by_layer() {
        let (len, layers) = arc();
        let p = BucketPlan::new(len, &layers, MIN_BUCKET_BYTES / 4);
        check_partition(&p, len, &layers);
        assert_eq!(
            p.buckets,
            vec![
                Bucket {
                    range: layers[1].clone(),
                    ready: Ready::Layer(1)
                },
                Bucket {
                    range: layers[0].clone(),
                    ready: Ready::Layer(0)
                },
                Bucket {
                    range: 0..layers[0].start,
                    ready: Ready::End
                },
            ]
        );
        assert_eq!(p.ready_at(Ready::Layer(0)).count(), 1);
    }

    #[test]
    fn small_layers_merge_forward() {
        // Four layers of 100 values, buckets of at least 250.
        let layers: Vec<_> = (0..4).map(|i| 50 + 100 * i..150 + 100 * i).collect();
        let p = BucketPlan::new(450, &layers, 250);
        check_partition(&p, 450, &layers);
        assert_eq!(
            p.buckets,
            vec![
                Bucket {
                    range: 150..450,
                    ready: Ready::Layer(1)
                },
                Bucket {
                    range: 0..150,
                    ready: Ready::End
                },
            ]
        );
        // Everything small: one bucket at the end.
        let p = BucketPlan::new(450, &layers, 10_000);
        assert_eq!(
            p.buckets,
            vec![Bucket {
                range: 0..450,
                ready: Ready::End
            }]
        );
        // No minimum: one bucket per layer, then the prefix.
        let p = BucketPlan::new(450, &layers, 0);
        check_partition(&p, 450, &layers);
        assert_eq!(p.buckets.len(), 5);
    }

    #[test]
    fn another_layout_gets_one_bucket_at_the_end() {
        let whole = vec![Bucket {
            range: 0..300,
            ready: Ready::End,
        }];
        // A gap between layers, layers not at the end, no layers.
        let one_short: Vec<Range<usize>> = std::iter::once(100..200).collect();
        for layers in [vec![0..100, 150..300], one_short, vec![]] {
            assert_eq!(
                BucketPlan::new(300, &layers, 0).buckets,
                whole,
                "{layers:?}"
            );
        }
    }
}
