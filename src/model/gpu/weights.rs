//! The CUDA engine's parameters on the device, all flat in the order of
//! [`FlatLayout`] as llm.c keeps them: the f32 master weights, their bf16
//! copy (the GEMMs' operands, rewritten by every AdamATan2 step), the f32
//! gradients, the Adam moments and the EMA shadow; beside them the f32
//! puzzle-embedding table and the bf16 `H_init` / `L_init`.

use half::bf16;

use crate::backend::cuda::ops::cast_f32_to_bf16;
use crate::backend::cuda::{Buffer, CudaError, Device};
use crate::model::layout::FlatLayout;
use crate::model::trm::{layer_name, Params};

/// Elements between tensor starts in the device's flat buffers: 128 bytes
/// of bf16, 256 of f32, so every weight view a GEMM reads is as aligned as
/// cuBLASLt's fastest kernels want (the compact layout puts the 2-element Q
/// bias before the layers, which would leave them 4-byte aligned).
const DEVICE_ALIGN: usize = 64;

/// [`FlatLayout`] as the device holds it: the same tensors in the same
/// order, each starting at a multiple of [`DEVICE_ALIGN`] elements, zeros
/// between (they get zero gradients, so the optimisers keep them zero).
/// Checkpoints and the CPU engine see the compact layout.
#[derive(Debug, Clone)]
pub struct DeviceLayout {
    pub compact: FlatLayout,
    /// Start of each tensor (in `compact.names` order).
    pub offsets: Vec<usize>,
    pub len: usize,
}

impl DeviceLayout {
    pub fn new(compact: FlatLayout) -> DeviceLayout {
        let mut offsets = Vec::with_capacity(compact.names.len());
        let mut at = 0;
        for i in 0..compact.names.len() {
            offsets.push(at);
            at = (at + compact.range(i).len()).div_ceil(DEVICE_ALIGN) * DEVICE_ALIGN;
        }
        DeviceLayout {
            compact,
            offsets,
            len: at,
        }
    }

    /// Where the tensor called `name` sits in the device's buffers.
    pub fn range_of(&self, name: &str) -> Option<std::ops::Range<usize>> {
        let i = self.compact.names.iter().position(|n| n == name)?;
        Some(self.offsets[i]..self.offsets[i] + self.compact.range(i).len())
    }

    /// A compact flat vector spread out to the device layout.
    pub fn pad(&self, compact: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        for (i, &at) in self.offsets.iter().enumerate() {
            let r = self.compact.range(i);
            out[at..at + r.len()].copy_from_slice(&compact[r]);
        }
        out
    }

    /// The inverse of [`DeviceLayout::pad`].
    pub fn unpad(&self, padded: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.compact.len);
        for (i, &at) in self.offsets.iter().enumerate() {
            out.extend_from_slice(&padded[at..at + self.compact.range(i).len()]);
        }
        out
    }
}

/// Where each tensor the network reads sits in the flat buffers.
#[derive(Debug, Clone)]
pub struct Offsets {
    pub embed: usize,
    pub lm_head: usize,
    pub q_w: usize,
    pub q_b: usize,
    pub layers: Vec<LayerOffsets>,
}

/// One block's weights (`[out, in]`, as the reference stores them).
#[derive(Debug, Clone, Copy)]
pub struct LayerOffsets {
    pub qkv: usize,
    pub o: usize,
    pub gate_up: usize,
    pub down: usize,
}

impl Offsets {
    pub fn new(layout: &DeviceLayout, n_layers: usize) -> Result<Offsets, CudaError> {
        let at = |name: &str| {
            layout
                .range_of(name)
                .map(|r| r.start)
                .ok_or_else(|| CudaError::Shape(format!("the flat layout has no tensor `{name}`")))
        };
        let layers = (0..n_layers)
            .map(|i| {
                Ok(LayerOffsets {
                    qkv: at(&layer_name(i, "self_attn.qkv_proj"))?,
                    o: at(&layer_name(i, "self_attn.o_proj"))?,
                    gate_up: at(&layer_name(i, "mlp.gate_up_proj"))?,
                    down: at(&layer_name(i, "mlp.down_proj"))?,
                })
            })
            .collect::<Result<Vec<_>, CudaError>>()?;
        Ok(Offsets {
            embed: at("inner.embed_tokens.embedding_weight")?,
            lm_head: at("inner.lm_head.weight")?,
            q_w: at("inner.q_head.weight")?,
            q_b: at("inner.q_head.bias")?,
            layers,
        })
    }
}

/// Every parameter and optimiser state of the engine, on the device.
pub struct DeviceWeights {
    /// f32 master weights, flat.
    pub master: Buffer<f32>,
    /// bf16 copy of `master`: what the forward and backward read.
    pub bf16: Buffer<bf16>,
    /// Gradients of the last backward, flat f32.
    pub grad: Buffer<f32>,
    pub adam_m: Buffer<f32>,
    pub adam_v: Buffer<f32>,
    /// The EMA shadow of `master`, when the run keeps one.
    pub ema: Option<Buffer<f32>>,
    /// bf16 copy of the EMA shadow for evaluation, rebuilt when stale.
    pub ema_bf16: Option<Buffer<bf16>>,
    pub ema_bf16_fresh: bool,
    /// `[num_puzzle_identifiers, ndim]` f32 (one element when ndim = 0).
    pub puzzle: Buffer<f32>,
    /// `[D]` each.
    pub h_init: Buffer<bf16>,
    pub l_init: Buffer<bf16>,
    /// The bf16 token-embedding table `[V, D]`, a copy of its flat range
    /// (the embedding kernel reads a whole buffer).
    pub embed: Buffer<bf16>,
}

impl DeviceWeights {
    /// Uploads `params` (its dense part flattened by `layout`).
    pub fn upload(
        dev: &Device,
        layout: &DeviceLayout,
        params: &Params<f32>,
        ema: bool,
    ) -> Result<DeviceWeights, CudaError> {
        let flat = layout.pad(&layout.compact.flatten(params));
        let master = dev.upload(&flat)?;
        let bf16_w = dev.zeros::<bf16>(flat.len())?;
        cast_f32_to_bf16(dev, &bf16_w, &master)?;
        let n = flat.len();
        let (ema, ema_bf16) = if ema {
            (Some(dev.upload(&flat)?), Some(dev.zeros::<bf16>(n)?))
        } else {
            (None, None)
        };
        let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        Ok(DeviceWeights {
            master,
            bf16: bf16_w,
            grad: dev.zeros(n)?,
            adam_m: dev.zeros(n)?,
            adam_v: dev.zeros(n)?,
            ema,
            ema_bf16,
            ema_bf16_fresh: false,
            puzzle: if params.puzzle_emb.is_empty() {
                dev.zeros(1)?
            } else {
                dev.upload(&params.puzzle_emb)?
            },
            h_init: dev.upload(&to_bf16(&params.h_init))?,
            l_init: dev.upload(&to_bf16(&params.l_init))?,
            embed: dev.zeros(params.embed.len())?,
        })
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        let opt = |b: &Option<Buffer<f32>>| b.as_ref().map_or(0, Buffer::bytes);
        self.master.bytes()
            + self.bf16.bytes()
            + self.grad.bytes()
            + self.adam_m.bytes()
            + self.adam_v.bytes()
            + opt(&self.ema)
            + self.ema_bf16.as_ref().map_or(0, Buffer::bytes)
            + self.puzzle.bytes()
            + self.h_init.bytes()
            + self.l_init.bytes()
            + self.embed.bytes()
    }

    /// Brings the bf16 copy of the EMA shadow up to date (when there is one).
    pub fn refresh_eval(&mut self, dev: &Device) -> Result<(), CudaError> {
        if let (Some(shadow), Some(cast)) = (&self.ema, &self.ema_bf16) {
            if !self.ema_bf16_fresh {
                cast_f32_to_bf16(dev, cast, shadow)?;
                self.ema_bf16_fresh = true;
            }
        }
        Ok(())
    }

    /// The bf16 weights evaluation reads (after [`DeviceWeights::refresh_eval`]):
    /// the EMA shadow's when there is one, else the live ones.
    pub fn eval_bf16(&self) -> &Buffer<bf16> {
        self.ema_bf16.as_ref().unwrap_or(&self.bf16)
    }

    /// The f32 buffer evaluation's weights come from (for the Q bias).
    pub fn eval_master(&self) -> &Buffer<f32> {
        self.ema.as_ref().unwrap_or(&self.master)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ArchConfig;

    #[test]
    fn device_layout_aligns_every_tensor_and_round_trips() {
        let mut arch = ArchConfig::trm_default(36, 12, 10);
        arch.hidden_size = 64;
        let l = DeviceLayout::new(FlatLayout::new(&arch));
        assert!(l.len >= l.compact.len);
        for (i, &at) in l.offsets.iter().enumerate() {
            assert_eq!(at % DEVICE_ALIGN, 0, "{}", l.compact.names[i]);
        }
        // The Q bias (2 values) sits before the layers in the compact order,
        // so without padding the layers would start unaligned.
        let qkv = l.range_of(&layer_name(0, "self_attn.qkv_proj")).unwrap();
        assert_eq!(qkv.start % DEVICE_ALIGN, 0);
        assert_ne!(
            l.compact
                .range_of(&layer_name(0, "self_attn.qkv_proj"))
                .unwrap()
                .start
                % 8,
            0
        );
        let compact: Vec<f32> = (0..l.compact.len).map(|i| i as f32 + 0.5).collect();
        let padded = l.pad(&compact);
        assert_eq!(padded.len(), l.len);
        assert_eq!(l.unpad(&padded), compact);
        // Only the gaps are zero.
        let zeros = padded.iter().filter(|&&x| x == 0.0).count();
        assert_eq!(zeros, l.len - l.compact.len);
    }
}
