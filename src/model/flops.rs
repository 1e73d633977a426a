//! The floating-point work of one training ACT step, counted from the
//! shapes (a multiply-add counts 2): what the start-up estimate of a run's
//! duration divides by a measured rate.
//!
//! Counted: the block GEMMs, attention's two batched products, the LM head,
//! and the backward as twice the forward of what it differentiates (the
//! gradient cycle and the heads). Left out as small next to those: norms,
//! RoPE, SwiGLU, softmax, embeddings, the Q head and the optimisers, all
//! O(tokens x hidden) or O(parameters).

use crate::model::act::has_q_continue_target;
use crate::model::config::ArchConfig;

/// Forward FLOPs of one block over `b` samples of `S` tokens (M = B S):
/// the GEMMs `2 M D (3D + D + 2F + F)` (qkv, o, gate_up, down) plus
/// attention `4 B H S^2 d` (scores and the weighted sum, `d` = head width).
pub fn block_forward_flops(arch: &ArchConfig, b: usize) -> f64 {
    let (d, f) = (arch.hidden_size as f64, arch.intermediate_size() as f64);
    let s = arch.total_seq_len() as f64;
    let m = b as f64 * s;
    let gemms = 2.0 * m * d * (3.0 * d + d + 2.0 * f + f);
    let attention = 4.0 * b as f64 * arch.num_heads as f64 * s * s * arch.head_dim() as f64;
    gemms + attention
}

/// Blocks one inner step runs: `H_cycles` cycles of `L_cycles` updates of
/// z_L and one of z_H, each a call of the `L_layers` blocks.
pub fn blocks_per_inner_step(arch: &ArchConfig) -> usize {
    arch.h_cycles * (arch.l_cycles + 1) * arch.l_layers
}

/// Forward FLOPs of the LM head over `b` samples (`2 B seq_len D V`).
pub fn lm_head_flops(arch: &ArchConfig, b: usize) -> f64 {
    2.0 * b as f64 * arch.seq_len as f64 * arch.hidden_size as f64 * arch.vocab_size as f64
}

/// The work of one training ACT step, split as the engine runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepFlops {
    /// The inner step (every cycle) and its heads, plus the Q-continue
    /// bootstrap's second inner step when that head trains.
    pub forward: f64,
    /// The gradient cycle's blocks and the heads, backward.
    pub backward: f64,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.forward + self.backward
    }
}

/// FLOPs of one training ACT step on `b` samples (see the module note for
/// what is counted). For the reference ARC model (D 512, 8 heads, 2 layers,
/// H_cycles 3, L_cycles 4, 900 + 16 positions) that is about 398 GFLOP per
/// sample: 30 blocks forward, then the gradient cycle's 10 backward.
pub fn act_step_flops(arch: &ArchConfig, b: usize) -> StepFlops {
    let block = block_forward_flops(arch, b);
    let head = lm_head_flops(arch, b);
    let inner = blocks_per_inner_step(arch) as f64 * block + head;
    let passes = if has_q_continue_target(arch) {
        2.0
    } else {
        1.0
    };
    let grad_cycle = ((arch.l_cycles + 1) * arch.l_layers) as f64 * block + head;
    StepFlops {
        forward: passes * inner,
        backward: 2.0 * grad_cycle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's ARC model, with the L_cycles of the count.
    fn arc() -> ArchConfig {
        let mut c = ArchConfig::trm_default(900, 12, 1000);
        c.hidden_size = 512;
        c.num_heads = 8;
        c.expansion = 4.0;
        c.l_layers = 2;
        c.h_cycles = 3;
        c.l_cycles = 4;
        c.puzzle_emb_ndim = 512;
        c.puzzle_emb_len = 16;
        c.no_act_continue = true;
        c
    }

    #[test]
    fn arc_step_is_about_398_gflop_per_sample() {
        let c = arc();
        assert_eq!((c.total_seq_len(), c.intermediate_size()), (916, 1536));
        assert_eq!(blocks_per_inner_step(&c), 30);
        // one block, one sample: GEMMs 2*916*512*6656, attention 4*8*916^2*64
        let block = block_forward_flops(&c, 1);
        assert_eq!(block, 6_243_221_504.0 + 1_718_386_688.0);
        let f = act_step_flops(&c, 1);
        let gflop = f.total() / 1e9;
        assert!((gflop - 398.0).abs() / 398.0 < 0.02, "{gflop} GFLOP");
        // forward: 30 blocks + head; backward: 2 x (10 blocks + head)
        let head = lm_head_flops(&c, 1);
        assert_eq!(f.forward, 30.0 * block + head);
        assert_eq!(f.backward, 2.0 * (10.0 * block + head));
        // linear in the batch
        let f768 = act_step_flops(&c, 768);
        assert!((f768.total() / f.total() - 768.0).abs() < 1e-9);
    }

    #[test]
    fn the_q_continue_bootstrap_adds_an_inner_step() {
        let mut c = arc();
        let without = act_step_flops(&c, 2);
        c.no_act_continue = false;
        let with = act_step_flops(&c, 2);
        assert_eq!(with.forward, 2.0 * without.forward);
        assert_eq!(with.backward, without.backward);
    }
}
