//! The named weights and buffers of one TRM network, under the PyTorch
//! reference's state-dict names, with their shapes and their initialisation.
//!
//! Keeping the reference's names (and f32 values) is what lets a checkpoint
//! move between this engine and PyTorch unchanged.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use super::config::{ArchConfig, PosEncodings};
use crate::tensor::Tensor;

/// How a named tensor is updated during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trainable {
    /// A dense parameter, updated by AdamATan2 (and tracked by the EMA).
    Dense,
    /// The puzzle-embedding table: a buffer in the reference, updated row-wise
    /// by sign-SGD on the rows used in the batch.
    SparseEmbedding,
    /// A frozen buffer (`H_init`, `L_init`).
    Frozen,
}

/// A weight-set that does not match its config.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights: missing tensor `{name}` (expected shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("weights: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("weights: unexpected tensor `{name}` (shape {shape:?}) for this config")]
    Unexpected { name: String, shape: Vec<usize> },
    #[error("weights: tensor `{name}` holds {len} values but its shape {shape:?} needs {needed}")]
    BadData {
        name: String,
        shape: Vec<usize>,
        len: usize,
        needed: usize,
    },
    #[error("weights: tensor `{name}` contains a non-finite value at flat index {index}")]
    NonFinite { name: String, index: usize },
}

/// All weights and buffers of a network, keyed by reference state-dict name.
#[derive(Debug, Clone)]
pub struct Weights {
    pub config: ArchConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Name of the puzzle-embedding table.
pub const PUZZLE_EMB: &str = "inner.puzzle_emb.weights";
/// Name under which the gradient of the batch's puzzle-embedding rows is dumped
/// (the reference's non-persistent `local_weights` buffer).
pub const PUZZLE_EMB_LOCAL: &str = "inner.puzzle_emb.local_weights";

/// Every weight and buffer of the network for `config`, in the reference's
/// state-dict order (a module's own tensors, then its children's), with shape
/// and training role.
pub fn expected_shapes(config: &ArchConfig) -> Vec<(String, Vec<usize>, Trainable)> {
    let d = config.hidden_size;
    let v = config.vocab_size;
    let s = config.total_seq_len();
    let f = config.intermediate_size();
    let mut out: Vec<(String, Vec<usize>, Trainable)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, t: Trainable| out.push((name, shape, t));

    push("inner.H_init".into(), vec![d], Trainable::Frozen);
    push("inner.L_init".into(), vec![d], Trainable::Frozen);
    push(
        "inner.embed_tokens.embedding_weight".into(),
        vec![v, d],
        Trainable::Dense,
    );
    push("inner.lm_head.weight".into(), vec![v, d], Trainable::Dense);
    push("inner.q_head.weight".into(), vec![2, d], Trainable::Dense);
    push("inner.q_head.bias".into(), vec![2], Trainable::Dense);
    if config.has_puzzle_emb() {
        push(
            PUZZLE_EMB.into(),
            vec![config.num_puzzle_identifiers, config.puzzle_emb_ndim],
            Trainable::SparseEmbedding,
        );
    }
    if config.pos_encodings == PosEncodings::Learned {
        push(
            "inner.embed_pos.embedding_weight".into(),
            vec![s, d],
            Trainable::Dense,
        );
    }
    for i in 0..config.l_layers {
        let p = format!("inner.L_level.layers.{i}");
        if config.mlp_t {
            let ft = config.mlp_t_intermediate_size();
            push(
                format!("{p}.mlp_t.gate_up_proj.weight"),
                vec![2 * ft, s],
                Trainable::Dense,
            );
            push(
                format!("{p}.mlp_t.down_proj.weight"),
                vec![s, ft],
                Trainable::Dense,
            );
        } else {
            push(
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![3 * d, d],
                Trainable::Dense,
            );
            push(
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, d],
                Trainable::Dense,
            );
        }
        push(
            format!("{p}.mlp.gate_up_proj.weight"),
            vec![2 * f, d],
            Trainable::Dense,
        );
        push(
            format!("{p}.mlp.down_proj.weight"),
            vec![d, f],
            Trainable::Dense,
        );
    }
    out
}

/// Names of the dense trainable parameters, in a stable order (the
/// reference's `named_parameters()` order): the layout of a flat parameter
/// buffer.
pub fn trainable_names(config: &ArchConfig) -> Vec<String> {
    expected_shapes(config)
        .into_iter()
        .filter(|(_, _, t)| *t == Trainable::Dense)
        .map(|(n, _, _)| n)
        .collect()
}

/// How a tensor is initialised (docs/trm-spec.md section 3).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    TruncNormal { std: f64 },
    Zeros,
    Fill(f32),
}

fn init_of(config: &ArchConfig, name: &str, shape: &[usize]) -> Init {
    let embed_std = 1.0 / (config.hidden_size as f64).sqrt();
    match name {
        "inner.H_init" | "inner.L_init" => Init::TruncNormal { std: 1.0 },
        "inner.embed_tokens.embedding_weight" | "inner.embed_pos.embedding_weight" => {
            Init::TruncNormal { std: embed_std }
        }
        // Q head starts (almost) off: zero weights, bias -5.
        "inner.q_head.weight" => Init::Zeros,
        "inner.q_head.bias" => Init::Fill(-5.0),
        PUZZLE_EMB => Init::Zeros,
        // Every other tensor is a bias-free linear [out, in]: LeCun normal.
        _ => Init::TruncNormal {
            std: 1.0 / (shape[1] as f64).sqrt(),
        },
    }
}

impl Weights {
    /// Checks a map of named tensors against the config: every expected name
    /// present with its exact shape, no extra names, data length consistent.
    pub fn from_tensors(
        config: &ArchConfig,
        mut map: BTreeMap<String, Tensor>,
    ) -> Result<Weights, WeightsError> {
        let expected = expected_shapes(config);
        let mut tensors = BTreeMap::new();
        for (name, shape, _) in &expected {
            let Some(t) = map.remove(name) else {
                return Err(WeightsError::Missing {
                    name: name.clone(),
                    expected: shape.clone(),
                });
            };
            if &t.shape != shape {
                return Err(WeightsError::Shape {
                    name: name.clone(),
                    got: t.shape.clone(),
                    expected: shape.clone(),
                });
            }
            let needed: usize = shape.iter().product();
            if t.data.len() != needed {
                return Err(WeightsError::BadData {
                    name: name.clone(),
                    shape: shape.clone(),
                    len: t.data.len(),
                    needed,
                });
            }
            tensors.insert(name.clone(), t);
        }
        if let Some((name, t)) = map.into_iter().next() {
            return Err(WeightsError::Unexpected {
                name,
                shape: t.shape,
            });
        }
        Ok(Weights {
            config: config.clone(),
            tensors,
        })
    }

    /// Like [`from_tensors`](Self::from_tensors), but accepts the names of a
    /// reference training checkpoint: the wrappers' prefixes
    /// (`_orig_mod.` from torch.compile, `model.` from the ACT loss head) are
    /// stripped first.
    pub fn from_state_dict(
        config: &ArchConfig,
        map: BTreeMap<String, Tensor>,
    ) -> Result<Weights, WeightsError> {
        let map = map
            .into_iter()
            .map(|(k, v)| (strip_wrapper_prefixes(&k).to_string(), v))
            .collect();
        Self::from_tensors(config, map)
    }

    /// The tensors under the names a reference training checkpoint uses
    /// (`prefix` is typically `"_orig_mod.model."`, or `""` for the bare net).
    pub fn to_state_dict(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
            .collect()
    }

    /// Fresh weights for `config`, initialised as the reference does. Each
    /// tensor draws from its own ChaCha20 stream seeded by (`seed`, name), so
    /// the result is deterministic and does not depend on tensor order.
    pub fn init(config: &ArchConfig, seed: u64) -> Weights {
        let mut tensors = BTreeMap::new();
        for (name, shape, _) in expected_shapes(config) {
            let n: usize = shape.iter().product();
            let data = match init_of(config, &name, &shape) {
                Init::Zeros => vec![0.0; n],
                Init::Fill(x) => vec![x; n],
                Init::TruncNormal { std } => {
                    let mut rng = tensor_rng(seed, &name);
                    trunc_normal(&mut rng, n, std)
                }
            };
            tensors.insert(name, Tensor { shape, data });
        }
        Weights {
            config: config.clone(),
            tensors,
        }
    }

    /// The tensor `name`. Panics if absent: a `Weights` always holds every
    /// expected name (checked at construction), so a miss is a programming
    /// error in the caller, not bad input.
    pub fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("weights: no tensor named `{name}`"))
    }

    /// Mutable access to the tensor `name`; panics if absent, like [`get`](Self::get).
    pub fn get_mut(&mut self, name: &str) -> &mut Tensor {
        self.tensors
            .get_mut(name)
            .unwrap_or_else(|| panic!("weights: no tensor named `{name}`"))
    }

    /// The tensor `name`, if present.
    pub fn try_get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Names of the dense trainable parameters in flat-buffer order.
    pub fn trainable_names(&self) -> Vec<String> {
        trainable_names(&self.config)
    }

    /// Total number of values over all dense trainable parameters.
    pub fn num_trainable(&self) -> usize {
        self.trainable_names()
            .iter()
            .map(|n| self.get(n).data.len())
            .sum()
    }

    /// Fails on the first NaN or infinity (e.g. a diverged checkpoint).
    pub fn check_finite(&self) -> Result<(), WeightsError> {
        for (name, t) in &self.tensors {
            if let Some(index) = t.data.iter().position(|x| !x.is_finite()) {
                return Err(WeightsError::NonFinite {
                    name: name.clone(),
                    index,
                });
            }
        }
        Ok(())
    }
}

/// A state-dict name without the training wrappers' prefixes.
pub fn strip_wrapper_prefixes(name: &str) -> &str {
    let mut n = name;
    loop {
        if let Some(rest) = n.strip_prefix("_orig_mod.") {
            n = rest;
        } else if let Some(rest) = n.strip_prefix("model.") {
            n = rest;
        } else {
            return n;
        }
    }
}

fn tensor_rng(seed: u64, name: &str) -> ChaCha20Rng {
    let mut h = Sha256::new();
    h.update(b"trm-init-v1\0");
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    ChaCha20Rng::from_seed(h.finalize().into())
}

/// `n` samples of the JAX-style truncated normal: a standard normal truncated
/// to [-2, 2] and scaled so the *truncated* distribution has standard
/// deviation `std` (PyTorch's `trunc_normal_` gets this wrong). Drawn by
/// inverse CDF, as the reference: `u ~ U(erf(-2/sqrt2), erf(2/sqrt2))`,
/// `x = sqrt2 * comp_std * erfinv(u)`, clipped to `+-2 comp_std`.
pub fn trunc_normal<R: Rng>(rng: &mut R, n: usize, std: f64) -> Vec<f32> {
    if std == 0.0 {
        return vec![0.0; n];
    }
    let (lower, upper) = (-2.0f64, 2.0f64);
    let sqrt2 = std::f64::consts::SQRT_2;
    let a = erf(lower / sqrt2);
    let b = erf(upper / sqrt2);
    let comp_std = trunc_normal_comp_std(std, lower, upper);
    (0..n)
        .map(|_| {
            let u = rng.gen_range(a..b);
            let x = sqrt2 * comp_std * erfinv(u);
            x.clamp(lower * comp_std, upper * comp_std) as f32
        })
        .collect()
}

/// The scale that makes a standard normal truncated to [lower, upper] have
/// standard deviation `std`: `std / sqrt(Var)` with the truncated variance
/// `Var = 1 - (u phi(u) - l phi(l)) / Z - ((phi(l) - phi(u)) / Z)^2`,
/// `Z = Phi(u) - Phi(l)`.
pub fn trunc_normal_comp_std(std: f64, lower: f64, upper: f64) -> f64 {
    let sqrt2 = std::f64::consts::SQRT_2;
    let z = (erf(upper / sqrt2) - erf(lower / sqrt2)) / 2.0;
    let c = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    let phi_l = c * (-0.5 * lower * lower).exp();
    let phi_u = c * (-0.5 * upper * upper).exp();
    let var = 1.0 - (upper * phi_u - lower * phi_l) / z - ((phi_l - phi_u) / z).powi(2);
    std / var.sqrt()
}

/// erf by its Maclaurin series (|x| <= 3) or the continued-fraction tail;
/// accurate to ~1e-15, more than enough for initialisation.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let ax = x.abs();
    if ax > 5.9 {
        return x.signum();
    }
    let r = if ax <= 3.0 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = ax * ax;
        let mut term = ax; // (-1)^n x^(2n+1) / n!
        let mut sum = ax;
        // At |x| = 3 the terms fall below 1e-17 of the sum after ~60 steps.
        for k in 1..100 {
            let n = k as f64;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

/// Inverse of [`erf`] on (-1, 1): Giles' single-precision approximation
/// refined by Newton steps on `erf(x) - y`.
pub fn erfinv(y: f64) -> f64 {
    if y <= -1.0 {
        return f64::NEG_INFINITY;
    }
    if y >= 1.0 {
        return f64::INFINITY;
    }
    let w = -((1.0 - y) * (1.0 + y)).ln();
    let mut x = if w < 5.0 {
        let w = w - 2.5;
        let mut p = 2.810_226_36e-08;
        p = 3.432_739_39e-07 + p * w;
        p = -3.523_387_7e-06 + p * w;
        p = -4.391_506_54e-06 + p * w;
        p = 0.000_218_580_87 + p * w;
        p = -0.001_253_725_03 + p * w;
        p = -0.004_177_681_64 + p * w;
        p = 0.246_640_727 + p * w;
        p = 1.501_409_41 + p * w;
        p * y
    } else {
        let w = w.sqrt() - 3.0;
        let mut p = -0.000_200_214_257;
        p = 0.000_100_950_558 + p * w;
        p = 0.001_349_343_22 + p * w;
        p = -0.003_673_428_44 + p * w;
        p = 0.005_739_507_73 + p * w;
        p = -0.007_622_461_3 + p * w;
        p = 0.009_438_870_47 + p * w;
        p = 1.001_674_06 + p * w;
        p = 2.832_976_82 + p * w;
        p * y
    };
    let two_over_sqrt_pi = 2.0 / std::f64::consts::PI.sqrt();
    for _ in 0..3 {
        let err = erf(x) - y;
        let deriv = two_over_sqrt_pi * (-x * x).exp();
        if deriv == 0.0 {
            break;
        }
        x -= err / deriv;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ArchConfig {
        let mut c = ArchConfig::trm_default(36, 12, 10);
        c.hidden_size = 64;
        c.num_heads = 2;
        c.puzzle_emb_ndim = 64;
        c.puzzle_emb_len = 2;
        c
    }

    #[test]
    fn erf_matches_known_values() {
        // Reference values from high-precision tables.
        let cases = [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (std::f64::consts::SQRT_2, 0.954_499_736_103_641_6),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
        ];
        for (x, want) in cases {
            assert!((erf(x) - want).abs() < 1e-14, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-14);
        }
    }

    #[test]
    fn erfinv_inverts_erf() {
        for i in -99..=99 {
            let y = i as f64 / 100.0;
            assert!((erf(erfinv(y)) - y).abs() < 1e-13, "y {y}");
        }
    }

    #[test]
    fn comp_std_matches_reference_constant() {
        // Truncation at +-2 sigma leaves a variance of 0.774...; the reference
        // scales by 1 / sqrt of it.
        let c = trunc_normal_comp_std(1.0, -2.0, 2.0);
        assert!((c - 1.136_847_5).abs() < 1e-6, "{c}");
    }

    #[test]
    fn trunc_normal_has_requested_std_and_bounds() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let std = 0.125;
        let xs = trunc_normal(&mut rng, 200_000, std);
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 2e-3 * std * 10.0, "mean {mean}");
        assert!((var.sqrt() / std - 1.0).abs() < 0.01, "std {}", var.sqrt());
        let bound = 2.0 * trunc_normal_comp_std(std, -2.0, 2.0) as f32;
        assert!(xs.iter().all(|x| x.abs() <= bound));
    }

    #[test]
    fn shapes_match_spec_table() {
        let c = ArchConfig::trm_default(900, 12, 1000);
        let shapes: BTreeMap<_, _> = expected_shapes(&c)
            .into_iter()
            .map(|(n, s, t)| (n, (s, t)))
            .collect();
        let get = |n: &str| shapes[n].clone();
        assert_eq!(get("inner.embed_tokens.embedding_weight").0, vec![12, 512]);
        assert_eq!(
            get(PUZZLE_EMB),
            (vec![1000, 512], Trainable::SparseEmbedding)
        );
        assert_eq!(
            get("inner.L_level.layers.1.self_attn.qkv_proj.weight").0,
            vec![1536, 512]
        );
        assert_eq!(
            get("inner.L_level.layers.0.self_attn.o_proj.weight").0,
            vec![512, 512]
        );
        assert_eq!(
            get("inner.L_level.layers.0.mlp.gate_up_proj.weight").0,
            vec![3072, 512]
        );
        assert_eq!(
            get("inner.L_level.layers.0.mlp.down_proj.weight").0,
            vec![512, 1536]
        );
        assert_eq!(get("inner.q_head.weight").0, vec![2, 512]);
        assert_eq!(get("inner.q_head.bias").0, vec![2]);
        assert_eq!(get("inner.H_init"), (vec![512], Trainable::Frozen));
        assert_eq!(shapes.len(), 4 + 2 * 4 + 3);
        let names = trainable_names(&c);
        assert_eq!(names[0], "inner.embed_tokens.embedding_weight");
        assert_eq!(names.len(), 4 + 2 * 4);
    }

    #[test]
    fn init_is_deterministic_and_as_specified() {
        let c = tiny();
        let w1 = Weights::init(&c, 42);
        let w2 = Weights::init(&c, 42);
        let w3 = Weights::init(&c, 43);
        for (name, t) in &w1.tensors {
            assert_eq!(t.data, w2.get(name).data, "{name}");
        }
        let e = "inner.embed_tokens.embedding_weight";
        assert_ne!(w1.get(e).data, w3.get(e).data);
        assert!(w1.get("inner.q_head.weight").data.iter().all(|&x| x == 0.0));
        assert!(w1.get("inner.q_head.bias").data.iter().all(|&x| x == -5.0));
        assert!(w1.get(PUZZLE_EMB).data.iter().all(|&x| x == 0.0));
        // LeCun std for down_proj is 1/sqrt(F); check the scale loosely.
        let dp = &w1.get("inner.L_level.layers.0.mlp.down_proj.weight").data;
        let rms = (dp.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / dp.len() as f64).sqrt();
        assert!((rms * 16.0 - 1.0).abs() < 0.05, "rms {rms}");
        Weights::from_tensors(&c, w1.tensors.clone()).unwrap();
    }

    #[test]
    fn reference_checkpoint_names() {
        let c = tiny();
        let w = Weights::init(&c, 5);
        let sd = w.to_state_dict("_orig_mod.model.");
        assert!(sd.contains_key("_orig_mod.model.inner.H_init"));
        let back = Weights::from_state_dict(&c, sd).unwrap();
        assert_eq!(back.tensors, w.tensors);
        assert_eq!(
            strip_wrapper_prefixes("inner.lm_head.weight"),
            "inner.lm_head.weight"
        );
    }

    #[test]
    fn from_tensors_errors_name_the_tensor() {
        let c = tiny();
        let w = Weights::init(&c, 0);
        let mut m = w.tensors.clone();
        m.remove("inner.lm_head.weight");
        let e = Weights::from_tensors(&c, m).unwrap_err().to_string();
        assert!(
            e.contains("inner.lm_head.weight") && e.contains("missing"),
            "{e}"
        );

        let mut m = w.tensors.clone();
        m.insert(
            "inner.q_head.bias".into(),
            Tensor {
                shape: vec![3],
                data: vec![0.0; 3],
            },
        );
        let e = Weights::from_tensors(&c, m).unwrap_err().to_string();
        assert!(
            e.contains("inner.q_head.bias") && e.contains("[3]") && e.contains("[2]"),
            "{e}"
        );

        let mut m = w.tensors.clone();
        m.insert(
            "inner.extra".into(),
            Tensor {
                shape: vec![1],
                data: vec![0.0],
            },
        );
        let e = Weights::from_tensors(&c, m).unwrap_err().to_string();
        assert!(e.contains("inner.extra"), "{e}");
    }
}
