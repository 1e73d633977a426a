//! Architecture config of the TRM network (`arch:` in the reference's Hydra
//! config, plus the three dataset-derived fields `seq_len`, `vocab_size` and
//! `num_puzzle_identifiers`).
//!
//! Field names on disk are exactly the reference's (`L_layers`, `H_cycles`,
//! `no_ACT_continue`, ...) so a config written by either side loads in the
//! other. Defaults are those of the reference's `config/arch/trm.yaml` and its
//! pydantic model; the dataset fields have no default because they must match
//! the data the weights are used with.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Position encoding of the attention layers (`pos_encodings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosEncodings {
    /// Rotary embeddings on q and k (the default).
    Rope,
    /// A learned [S, D] table added to the input embedding.
    Learned,
    /// No position information at all.
    None,
}

/// The architecture of one TRM network. See `docs/trm-spec.md` section 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawArchConfig")]
pub struct ArchConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub expansion: f64,
    #[serde(rename = "L_layers")]
    pub l_layers: usize,
    #[serde(rename = "H_cycles")]
    pub h_cycles: usize,
    #[serde(rename = "L_cycles")]
    pub l_cycles: usize,
    pub puzzle_emb_ndim: usize,
    pub puzzle_emb_len: usize,
    pub pos_encodings: PosEncodings,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub halt_max_steps: usize,
    pub halt_exploration_prob: f64,
    #[serde(rename = "no_ACT_continue")]
    pub no_act_continue: bool,
    pub forward_dtype: String,
    pub mlp_t: bool,
    pub seq_len: usize,
    pub vocab_size: usize,
    pub num_puzzle_identifiers: usize,
}

/// Everything that can be wrong with an architecture config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read arch config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad JSON, an unknown key (serde names it), a missing required key or a
    /// value of the wrong type.
    #[error("invalid arch config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("arch config: `{field}` must be at least 1, got 0")]
    Zero { field: &'static str },
    #[error("arch config: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")]
    HeadsDoNotDivide {
        hidden_size: usize,
        num_heads: usize,
    },
    #[error("arch config: RoPE needs an even head dim, got hidden_size {hidden_size} / num_heads {num_heads} = {head_dim}")]
    OddHeadDim {
        hidden_size: usize,
        num_heads: usize,
        head_dim: usize,
    },
    #[error("arch config: `{field}` = {value} is out of range ({expected})")]
    OutOfRange {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("arch config: puzzle_emb_ndim {ndim} does not fit in puzzle_emb_len {len} positions of hidden_size {hidden_size}")]
    PuzzleEmbTooWide {
        ndim: usize,
        len: usize,
        hidden_size: usize,
    },
    #[error("arch config: puzzle_emb_len {len} must be 0 when puzzle_emb_ndim is 0 (there is no puzzle embedding to fill those positions)")]
    PuzzleLenWithoutEmb { len: usize },
    #[error("arch config: forward_dtype `{0}` is not one of float32, bfloat16, float16")]
    UnknownDtype(String),
    #[error("arch config: {0} is not supported yet (the reference has it; this engine does not implement it)")]
    Unsupported(String),
}

impl ArchConfig {
    /// The reference defaults (`arch/trm.yaml`) for a dataset with the given
    /// sequence length, vocabulary and number of puzzle identifiers.
    pub fn trm_default(seq_len: usize, vocab_size: usize, num_puzzle_identifiers: usize) -> Self {
        RawArchConfig {
            seq_len: Some(seq_len),
            vocab_size: Some(vocab_size),
            num_puzzle_identifiers: Some(num_puzzle_identifiers),
            ..RawArchConfig::default()
        }
        .into()
    }

    /// Parses a JSON config (the golden `config.json` format). Unknown keys are
    /// rejected, naming the key; the result is not yet validated.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        // Parse into the raw form first so that missing fields get a clear
        // "missing field" error instead of a silent default.
        let raw: RawArchConfig =
            serde_json::from_str(text).map_err(|source| ConfigError::Parse {
                path: origin.to_path_buf(),
                source,
            })?;
        // Every field that shapes the network is required: a default here
        // would silently describe another model. Only the fields the
        // reference itself gives a default (norm eps, RoPE theta, dtype,
        // puzzle_emb_len, mlp_t, no_ACT_continue, halt_exploration_prob)
        // may be left out.
        for (field, present) in [
            ("hidden_size", raw.hidden_size.is_some()),
            ("num_heads", raw.num_heads.is_some()),
            ("expansion", raw.expansion.is_some()),
            ("L_layers", raw.l_layers.is_some()),
            ("H_cycles", raw.h_cycles.is_some()),
            ("L_cycles", raw.l_cycles.is_some()),
            ("puzzle_emb_ndim", raw.puzzle_emb_ndim.is_some()),
            ("pos_encodings", raw.pos_encodings.is_some()),
            ("halt_max_steps", raw.halt_max_steps.is_some()),
            ("seq_len", raw.seq_len.is_some()),
            ("vocab_size", raw.vocab_size.is_some()),
            (
                "num_puzzle_identifiers",
                raw.num_puzzle_identifiers.is_some(),
            ),
        ] {
            if !present {
                return Err(ConfigError::Parse {
                    path: origin.to_path_buf(),
                    source: serde::de::Error::missing_field(field),
                });
            }
        }
        Ok(raw.into())
    }

    /// Reads, parses and validates a JSON config file.
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::from_json_str(&text, path)?;
        config.validate()?;
        Ok(config)
    }

    /// The JSON form, with the reference's key names.
    pub fn to_json_string(&self) -> String {
        // Serialising plain numbers, bools and strings cannot fail.
        serde_json::to_string_pretty(self).expect("ArchConfig serialises")
    }

    /// Head dimension `d = D / H`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// SwiGLU inner width of the token MLP: `F = ceil(round(expansion * D * 2 / 3) / 256) * 256`.
    pub fn intermediate_size(&self) -> usize {
        swiglu_intermediate(self.expansion, self.hidden_size)
    }

    /// SwiGLU inner width of the sequence MLP used when `mlp_t` is set (its
    /// "hidden size" is the total sequence length).
    pub fn mlp_t_intermediate_size(&self) -> usize {
        swiglu_intermediate(self.expansion, self.total_seq_len())
    }

    /// Number of puzzle positions `P` prepended to the tokens: `puzzle_emb_len`
    /// if non-zero, else `ceil(puzzle_emb_ndim / hidden_size)`, as the reference.
    pub fn puzzle_len(&self) -> usize {
        if self.puzzle_emb_len != 0 {
            self.puzzle_emb_len
        } else {
            self.puzzle_emb_ndim.div_ceil(self.hidden_size.max(1))
        }
    }

    /// Tokens per sample the network sees: `S = seq_len + P`.
    pub fn total_seq_len(&self) -> usize {
        self.seq_len + self.puzzle_len()
    }

    /// Whether the network has a puzzle-embedding table.
    pub fn has_puzzle_emb(&self) -> bool {
        self.puzzle_emb_ndim > 0
    }

    /// Checks that the config describes a well-formed network (what the
    /// reference would build without error).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("L_layers", self.l_layers),
            ("H_cycles", self.h_cycles),
            ("L_cycles", self.l_cycles),
            ("halt_max_steps", self.halt_max_steps),
            ("seq_len", self.seq_len),
            ("vocab_size", self.vocab_size),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.has_puzzle_emb() && self.num_puzzle_identifiers == 0 {
            return Err(ConfigError::Zero {
                field: "num_puzzle_identifiers",
            });
        }
        if self.hidden_size % self.num_heads != 0 {
            return Err(ConfigError::HeadsDoNotDivide {
                hidden_size: self.hidden_size,
                num_heads: self.num_heads,
            });
        }
        if self.pos_encodings == PosEncodings::Rope && self.head_dim() % 2 != 0 {
            return Err(ConfigError::OddHeadDim {
                hidden_size: self.hidden_size,
                num_heads: self.num_heads,
                head_dim: self.head_dim(),
            });
        }
        let positive = |field, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    field,
                    value,
                    expected: "a finite number > 0",
                })
            }
        };
        positive("expansion", self.expansion)?;
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta)?;
        if !(0.0..=1.0).contains(&self.halt_exploration_prob) {
            return Err(ConfigError::OutOfRange {
                field: "halt_exploration_prob",
                value: self.halt_exploration_prob,
                expected: "0 ..= 1",
            });
        }
        if self.intermediate_size() == 0 {
            return Err(ConfigError::OutOfRange {
                field: "expansion",
                value: self.expansion,
                expected: "large enough for a non-empty MLP",
            });
        }
        if !self.has_puzzle_emb() && self.puzzle_emb_len != 0 {
            return Err(ConfigError::PuzzleLenWithoutEmb {
                len: self.puzzle_emb_len,
            });
        }
        // Checked: widths come from files and overrides.
        if self
            .puzzle_len()
            .checked_mul(self.hidden_size)
            .is_some_and(|w| self.puzzle_emb_ndim > w)
        {
            return Err(ConfigError::PuzzleEmbTooWide {
                ndim: self.puzzle_emb_ndim,
                len: self.puzzle_len(),
                hidden_size: self.hidden_size,
            });
        }
        if !matches!(
            self.forward_dtype.as_str(),
            "float32" | "bfloat16" | "float16"
        ) {
            return Err(ConfigError::UnknownDtype(self.forward_dtype.clone()));
        }
        Ok(())
    }

    /// [`validate`](Self::validate), then rejects the variants the reference
    /// has but this engine does not implement yet.
    pub fn validate_supported(&self) -> Result<(), ConfigError> {
        self.validate()?;
        if self.mlp_t {
            return Err(ConfigError::Unsupported(
                "mlp_t: true (MLP over the sequence instead of attention)".into(),
            ));
        }
        if self.pos_encodings == PosEncodings::Learned {
            return Err(ConfigError::Unsupported("pos_encodings: learned".into()));
        }
        if !self.no_act_continue {
            return Err(ConfigError::Unsupported(
                "no_ACT_continue: false (the Q-continue bootstrap target)".into(),
            ));
        }
        if self.puzzle_emb_ndim != self.hidden_size {
            return Err(ConfigError::Unsupported(format!(
                "puzzle_emb_ndim {} != hidden_size {} (the engine puts one embedding row at position 0)",
                self.puzzle_emb_ndim, self.hidden_size
            )));
        }
        Ok(())
    }
}

/// `_find_multiple(round(expansion * hidden * 2 / 3), 256)` with Python's
/// semantics: `round` is round-half-to-even on the f64 product, evaluated left
/// to right as Python does.
fn swiglu_intermediate(expansion: f64, hidden: usize) -> usize {
    let x = expansion * hidden as f64 * 2.0 / 3.0;
    if !x.is_finite() || x <= 0.0 {
        return 0;
    }
    let rounded = x.round_ties_even() as usize;
    // Saturates: an absurd expansion is then refused by the memory check.
    rounded.div_ceil(256).saturating_mul(256)
}

/// On-disk form: every field optional so defaults can depend on other fields
/// (`puzzle_emb_ndim` defaults to `hidden_size`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArchConfig {
    hidden_size: Option<usize>,
    num_heads: Option<usize>,
    expansion: Option<f64>,
    #[serde(rename = "L_layers")]
    l_layers: Option<usize>,
    #[serde(rename = "H_cycles")]
    h_cycles: Option<usize>,
    #[serde(rename = "L_cycles")]
    l_cycles: Option<usize>,
    /// The reference's config has it but ignores it; accepted for compatibility.
    #[serde(rename = "H_layers")]
    #[allow(dead_code)]
    h_layers: Option<usize>,
    /// Part of the reference's pydantic model (it sizes the sparse embedding's
    /// local buffer); the batch file decides the batch here, so it is ignored.
    #[allow(dead_code)]
    batch_size: Option<usize>,
    puzzle_emb_ndim: Option<usize>,
    puzzle_emb_len: Option<usize>,
    pos_encodings: Option<PosEncodings>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    halt_max_steps: Option<usize>,
    halt_exploration_prob: Option<f64>,
    #[serde(rename = "no_ACT_continue")]
    no_act_continue: Option<bool>,
    forward_dtype: Option<String>,
    mlp_t: Option<bool>,
    seq_len: Option<usize>,
    vocab_size: Option<usize>,
    num_puzzle_identifiers: Option<usize>,
}

impl From<RawArchConfig> for ArchConfig {
    fn from(raw: RawArchConfig) -> Self {
        let hidden_size = raw.hidden_size.unwrap_or(512);
        ArchConfig {
            hidden_size,
            num_heads: raw.num_heads.unwrap_or(8),
            expansion: raw.expansion.unwrap_or(4.0),
            l_layers: raw.l_layers.unwrap_or(2),
            h_cycles: raw.h_cycles.unwrap_or(3),
            l_cycles: raw.l_cycles.unwrap_or(6),
            // trm.yaml: `puzzle_emb_ndim: ${.hidden_size}`
            puzzle_emb_ndim: raw.puzzle_emb_ndim.unwrap_or(hidden_size),
            puzzle_emb_len: raw.puzzle_emb_len.unwrap_or(16),
            pos_encodings: raw.pos_encodings.unwrap_or(PosEncodings::Rope),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            halt_max_steps: raw.halt_max_steps.unwrap_or(16),
            halt_exploration_prob: raw.halt_exploration_prob.unwrap_or(0.1),
            no_act_continue: raw.no_act_continue.unwrap_or(true),
            forward_dtype: raw.forward_dtype.unwrap_or_else(|| "bfloat16".to_string()),
            mlp_t: raw.mlp_t.unwrap_or(false),
            // Only reachable through serde's `from` path or trm_default; the
            // JSON loader rejects missing dataset fields before this.
            seq_len: raw.seq_len.unwrap_or(0),
            vocab_size: raw.vocab_size.unwrap_or(0),
            num_puzzle_identifiers: raw.num_puzzle_identifiers.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ArchConfig, ConfigError> {
        ArchConfig::from_json_str(text, Path::new("test.json"))
    }

    const TINY: &str = r#"{"hidden_size": 64, "num_heads": 2, "L_layers": 2, "H_cycles": 3, "L_cycles": 4, "expansion": 4, "seq_len": 36, "vocab_size": 12, "puzzle_emb_ndim": 64, "puzzle_emb_len": 2, "num_puzzle_identifiers": 10, "halt_max_steps": 16, "pos_encodings": "rope", "forward_dtype": "float32"}"#;

    #[test]
    fn loads_golden_format() {
        let c = parse(TINY).unwrap();
        c.validate_supported().unwrap();
        assert_eq!(c.hidden_size, 64);
        assert_eq!(c.l_cycles, 4);
        assert_eq!(c.puzzle_len(), 2);
        assert_eq!(c.total_seq_len(), 38);
        assert_eq!(c.intermediate_size(), 256);
        assert_eq!(c.head_dim(), 32);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(c.no_act_continue);
        assert_eq!(c.halt_exploration_prob, 0.1);
    }

    #[test]
    fn defaults_are_trm_yaml() {
        let c = ArchConfig::trm_default(900, 12, 1000);
        assert_eq!(c.hidden_size, 512);
        assert_eq!(c.num_heads, 8);
        assert_eq!(c.l_layers, 2);
        assert_eq!((c.h_cycles, c.l_cycles), (3, 6));
        assert_eq!(c.puzzle_emb_ndim, 512);
        assert_eq!(c.puzzle_len(), 16);
        assert_eq!(c.total_seq_len(), 916);
        assert_eq!(c.intermediate_size(), 1536);
        assert_eq!(c.forward_dtype, "bfloat16");
        assert_eq!(c.halt_max_steps, 16);
        c.validate().unwrap();
    }

    #[test]
    fn intermediate_size_rounding() {
        // D 128: 4 * 128 * 2 / 3 = 341.33 -> 341 -> 512
        assert_eq!(swiglu_intermediate(4.0, 128), 512);
        assert_eq!(swiglu_intermediate(4.0, 512), 1536);
        assert_eq!(swiglu_intermediate(4.0, 64), 256);
        // 2.5 * 3 * 2 / 3 = 5.0; 1.25 * 3 * 2 / 3 = 2.5 rounds to even 2
        assert_eq!(swiglu_intermediate(1.25, 3), 256);
        assert_eq!(swiglu_intermediate(4.0, 916), 2560); // 2442.67 -> 2443 -> 2560
    }

    #[test]
    fn puzzle_len_from_ndim() {
        let mut c = ArchConfig::trm_default(900, 12, 10);
        c.puzzle_emb_len = 0;
        c.puzzle_emb_ndim = 1024;
        assert_eq!(c.puzzle_len(), 2);
        c.puzzle_emb_ndim = 513;
        assert_eq!(c.puzzle_len(), 2);
        c.puzzle_emb_ndim = 0;
        assert_eq!(c.puzzle_len(), 0);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let text = TINY.replace("\"expansion\"", "\"expansoin\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("expansoin"), "{err}");
    }

    #[test]
    fn missing_dataset_field_is_named() {
        let text = TINY.replace("\"seq_len\": 36, ", "");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("seq_len"), "{err}");
    }

    #[test]
    fn every_network_field_is_required_and_named() {
        for (key, text) in [
            ("num_heads", "\"num_heads\": 2, "),
            ("L_cycles", "\"L_cycles\": 4, "),
            ("H_cycles", "\"H_cycles\": 3, "),
            ("L_layers", "\"L_layers\": 2, "),
            ("expansion", "\"expansion\": 4, "),
            ("puzzle_emb_ndim", "\"puzzle_emb_ndim\": 64, "),
            ("halt_max_steps", "\"halt_max_steps\": 16, "),
            ("pos_encodings", "\"pos_encodings\": \"rope\", "),
        ] {
            assert!(TINY.contains(text), "{text}");
            let err = parse(&TINY.replace(text, "")).unwrap_err().to_string();
            assert!(err.contains(&format!("missing field `{key}`")), "{err}");
        }
        // Not "not supported yet": the field is simply missing.
        let err = parse(&TINY.replace("\"hidden_size\": 64, ", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `hidden_size`"), "{err}");
    }

    #[test]
    fn h_layers_accepted_and_ignored() {
        let text = TINY.replace("{", "{\"H_layers\": 0, ");
        assert_eq!(parse(&text).unwrap(), parse(TINY).unwrap());
    }

    #[test]
    fn validation_errors() {
        let base = parse(TINY).unwrap();
        let mut c = base.clone();
        c.num_heads = 3;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HeadsDoNotDivide { .. })
        ));
        let mut c = base.clone();
        c.hidden_size = 6;
        c.num_heads = 2;
        c.puzzle_emb_ndim = 6;
        assert!(matches!(c.validate(), Err(ConfigError::OddHeadDim { .. })));
        c.pos_encodings = PosEncodings::None;
        c.validate().unwrap();
        let mut c = base.clone();
        c.l_cycles = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Zero { field: "L_cycles" })
        ));
        let mut c = base.clone();
        c.forward_dtype = "float8".into();
        assert!(matches!(c.validate(), Err(ConfigError::UnknownDtype(_))));
        let mut c = base.clone();
        c.puzzle_emb_ndim = 129;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::PuzzleEmbTooWide { .. })
        ));
    }

    #[test]
    fn unsupported_variants_load_but_are_reported() {
        let text = TINY.replace("\"rope\"", "\"learned\"");
        let c = parse(&text).unwrap();
        c.validate().unwrap();
        let err = c.validate_supported().unwrap_err().to_string();
        assert!(err.contains("not supported yet"), "{err}");
        let text = TINY.replace("{", "{\"mlp_t\": true, ");
        let c = parse(&text).unwrap();
        c.validate().unwrap();
        assert!(matches!(
            c.validate_supported(),
            Err(ConfigError::Unsupported(_))
        ));
    }

    #[test]
    fn json_round_trip() {
        let c = parse(TINY).unwrap();
        let back = parse(&c.to_json_string()).unwrap();
        assert_eq!(c, back);
        assert!(c.to_json_string().contains("\"no_ACT_continue\""));
    }
}
