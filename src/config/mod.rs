//! The run config: the reference's `cfg_pretrain.yaml` keys (with `arch:`
//! nested), this engine's own few keys, YAML files built into the binary,
//! Hydra-style command-line overrides, and validation.
//!
//! Loading goes: YAML text -> tree -> key check -> overrides -> `${...}`
//! references -> typed [`RunConfig`] -> validation. Keys are checked on the
//! tree so an unknown key is reported with its full dotted path and the
//! nearest valid key; serde then reports type errors with the path too.

mod interpolate;
mod keys;
mod overrides;
mod schedule;
mod source;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_norway::{Mapping, Value};

use crate::model::config::{ArchConfig, ConfigError as ArchError};
use crate::model::device_choice::DeviceKind;

pub use schedule::Schedule;
pub use source::{ConfigSource, BUILTIN_CONFIGS};

/// `arch.name` of the TRM network, the one model this engine runs.
pub const TRM_ARCH_NAME: &str = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1";
/// `arch.loss.name` of the ACT loss head.
pub const ACT_LOSS_NAME: &str = "losses@ACTLossHead";
/// `evaluators[].name` of the ARC evaluator.
pub const ARC_EVALUATOR_NAME: &str = "arc@ARC";

/// Token loss of the ACT loss head (`arch.loss.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    #[default]
    StablemaxCrossEntropy,
    SoftmaxCrossEntropy,
}

/// `arch.loss`: the loss head and its token loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    pub name: String,
    pub loss_type: LossType,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            name: ACT_LOSS_NAME.to_string(),
            loss_type: LossType::default(),
        }
    }
}

/// One entry of `evaluators`: a name and that evaluator's own options
/// (`submission_K`, `pass_Ks`, `aggregated_voting` for `arc@ARC`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluatorConfig {
    pub name: String,
    #[serde(flatten)]
    pub options: Mapping,
}

/// The old name of the device choice; only `cpu` is accepted, so an old
/// `backend: cpu` config still loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Cpu,
    Cuda,
}

/// A complete, validated training config. Field names are the YAML keys;
/// `arch_name` and `loss` are `arch.name` and `arch.loss` on disk. Read it
/// with [`RunConfig::load`] and write it with [`RunConfig::to_yaml`]: the
/// serde impls cover the top-level keys only, `arch` is handled by those two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The network (`arch:` less `name` and `loss`). `seq_len`, `vocab_size`
    /// and `num_puzzle_identifiers` are 0 until the dataset fills them, see
    /// [`RunConfig::arch_for_dataset`].
    #[serde(skip, default = "default_arch")]
    pub arch: ArchConfig,
    /// `arch.name`: the model class (only TRM here).
    #[serde(skip, default = "default_arch_name")]
    pub arch_name: String,
    /// `arch.loss`.
    #[serde(skip)]
    pub loss: LossConfig,

    pub data_paths: Vec<PathBuf>,
    #[serde(default)]
    pub data_paths_test: Vec<PathBuf>,
    #[serde(default)]
    pub evaluators: Vec<EvaluatorConfig>,

    pub global_batch_size: usize,
    pub epochs: usize,
    /// Epochs per train/evaluate iteration; `None` trains all epochs, then
    /// evaluates once.
    #[serde(default)]
    pub eval_interval: Option<usize>,
    #[serde(default)]
    pub checkpoint_every_eval: bool,

    pub lr: f64,
    pub lr_min_ratio: f64,
    pub lr_warmup_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub puzzle_emb_lr: f64,
    pub puzzle_emb_weight_decay: f64,

    #[serde(default)]
    pub seed: u64,
    /// First iteration index that is followed by an evaluation.
    #[serde(default)]
    pub min_eval_interval: usize,
    #[serde(default)]
    pub ema: bool,
    #[serde(default = "default_ema_rate")]
    pub ema_rate: f64,
    #[serde(default)]
    pub freeze_weights: bool,

    #[serde(default, deserialize_with = "name_like")]
    pub project_name: Option<String>,
    #[serde(default, deserialize_with = "name_like")]
    pub run_name: Option<String>,
    #[serde(default)]
    pub checkpoint_path: Option<PathBuf>,
    #[serde(default)]
    pub load_checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub eval_save_outputs: Vec<String>,

    /// Checkpoints kept in `checkpoint_path`, newest first; 0 keeps all.
    #[serde(default = "default_keep_last")]
    pub checkpoint_keep_last: usize,
    /// CPU worker threads; 0 uses every core.
    #[serde(default)]
    pub threads: usize,
    /// Refused unless `cpu`: [`RunConfig::device`] chooses the engine.
    #[serde(default)]
    pub backend: Backend,
    /// Where the network runs (`cpu`, `cuda`, `emu`); `None` (null) picks
    /// `cuda` when this build has the kernels and a GPU is usable, else the
    /// CPU. `trm train --device` wins over it.
    #[serde(default)]
    pub device: Option<DeviceKind>,
    /// On SIGTERM/SIGINT: finish the step, checkpoint, exit 75 (`false`:
    /// the signal ends the process at once).
    #[serde(default = "default_true")]
    pub checkpoint_on_signal: bool,
}

fn default_true() -> bool {
    true
}

fn default_arch() -> ArchConfig {
    ArchConfig::trm_default(0, 0, 0)
}

fn default_arch_name() -> String {
    TRM_ARCH_NAME.to_string()
}

fn default_ema_rate() -> f64 {
    0.999
}

fn default_keep_last() -> usize {
    10
}

/// Run and project names as strings even when YAML reads them as numbers or
/// booleans (`run_name=2024` on a command line).
fn name_like<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if b { "True" } else { "False" }.to_string()),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a name, got {}",
                describe(&other)
            )))
        }
    })
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The dataset-derived `arch` fields, written only once known.
const DATASET_FIELDS: [&str; 3] = ["seq_len", "vocab_size", "num_puzzle_identifiers"];

/// Everything that can go wrong loading or checking a run config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown built-in config `{name}` (built-in: {builtins}); {hint}")]
    UnknownBuiltin {
        name: String,
        builtins: String,
        hint: String,
    },
    #[error("{origin}: not valid YAML: {source}")]
    Yaml {
        origin: String,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{origin}: a config must be a mapping of keys to values")]
    NotAMapping { origin: String },
    #[error("unknown config key `{key}` in {origin}; {hint}")]
    UnknownKey {
        key: String,
        origin: String,
        hint: String,
    },
    #[error("override `{arg}`: {reason}")]
    BadOverride { arg: String, reason: String },
    #[error("config key `{key}`: cannot resolve `${{{reference}}}`: {reason}")]
    BadReference {
        key: String,
        reference: String,
        reason: &'static str,
    },
    /// A value of the wrong type, or a missing required key.
    #[error("config key `{key}`: {message}")]
    Value { key: String, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("eval_interval {eval_interval} must divide epochs {epochs} (each train/evaluate iteration runs eval_interval epochs)")]
    EvalIntervalNotDivisor { eval_interval: usize, epochs: usize },
    #[error("config key `{key}`: `{value}` is not supported (supported: {supported})")]
    Unsupported {
        key: String,
        value: String,
        supported: String,
    },
    #[error("arch.{field} is {config} in the config but the dataset has {dataset}")]
    DatasetMismatch {
        field: &'static str,
        config: usize,
        dataset: usize,
    },
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("cannot write the config as YAML: {0}")]
    Serialize(#[source] serde_norway::Error),
}

impl RunConfig {
    /// Loads `base`, applies `overrides` (`key=value`, `+key=value`, dotted
    /// keys, YAML values) in order, and validates the result.
    pub fn load(base: ConfigSource, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        let origin = base.origin();
        let text = base.read()?;
        let mut tree: Value =
            serde_norway::from_str(&text).map_err(|source| ConfigError::Yaml {
                origin: origin.clone(),
                source,
            })?;
        if !tree.is_mapping() {
            return Err(ConfigError::NotAMapping { origin });
        }
        let schema = keys::Schema::new();
        schema
            .check_tree(&tree)
            .map_err(|e| ConfigError::UnknownKey {
                key: e.key,
                origin: origin.clone(),
                hint: e.hint,
            })?;
        for arg in overrides {
            let ov = overrides::parse(arg).map_err(|e| ConfigError::BadOverride {
                arg: e.arg,
                reason: e.reason,
            })?;
            schema.check_path(&ov.path).map_err(|e| match e {
                keys::PathError::Unknown(e) => ConfigError::UnknownKey {
                    key: e.key,
                    origin: format!("override `{arg}`"),
                    hint: e.hint,
                },
                keys::PathError::NotASection(e) => ConfigError::BadOverride {
                    arg: arg.clone(),
                    reason: format!(
                        "`{}` has no keys inside; set it whole (`{}=...`)",
                        e.key, e.key
                    ),
                },
            })?;
            // A value that is itself a mapping must use known keys too.
            let mut probe = Value::Mapping(Mapping::new());
            overrides::apply(&mut probe, &ov);
            schema
                .check_tree(&probe)
                .map_err(|e| ConfigError::UnknownKey {
                    key: e.key,
                    origin: format!("override `{arg}`"),
                    hint: e.hint,
                })?;
            overrides::apply(&mut tree, &ov);
        }
        interpolate::resolve(&mut tree).map_err(|e| ConfigError::BadReference {
            key: e.key,
            reference: e.reference,
            reason: e.reason,
        })?;
        let config = Self::from_tree(tree)?;
        config.validate()?;
        Ok(config)
    }

    /// The typed config from a resolved tree (no validation).
    fn from_tree(tree: Value) -> Result<RunConfig, ConfigError> {
        let Value::Mapping(mut top) = tree else {
            return Err(ConfigError::Value {
                key: "(top level)".into(),
                message: "expected a mapping".into(),
            });
        };
        let missing = |key: &str| ConfigError::Value {
            key: key.into(),
            message: "missing (required)".into(),
        };
        let Value::Mapping(mut arch) = top.remove("arch").ok_or_else(|| missing("arch"))? else {
            return Err(ConfigError::Value {
                key: "arch".into(),
                message: "expected a mapping of the network's settings".into(),
            });
        };
        let arch_name: String = typed(
            arch.remove("name").ok_or_else(|| missing("arch.name"))?,
            "arch.name",
        )?;
        let loss: LossConfig = typed(
            arch.remove("loss").ok_or_else(|| missing("arch.loss"))?,
            "arch.loss",
        )?;
        let net: ArchConfig = typed(Value::Mapping(arch), "arch")?;
        let mut config: RunConfig = typed(Value::Mapping(top), "")?;
        config.arch = net;
        config.arch_name = arch_name;
        config.loss = loss;
        Ok(config)
    }

    /// Checks everything that does not need the dataset.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        };
        if self.data_paths.is_empty() {
            return Err(invalid("data_paths", "name at least one dataset folder"));
        }
        if let Some(p) = &self.checkpoint_path {
            if p.as_os_str().is_empty() {
                return Err(invalid(
                    "checkpoint_path",
                    "is empty (that would write the run into the current folder); \
                     name a run folder, or drop the key to use checkpoints/<project>/<run_name>",
                ));
            }
        }
        // Keys the engine reads but cannot honour yet are refused, so a run
        // never silently does something other than what was asked.
        if self.backend != Backend::Cpu {
            return Err(invalid(
                "backend",
                "is not used to choose the engine: set `device` (device=cpu|cuda|emu, \
                 or `trm train --device cuda`) and leave backend=cpu or drop the key",
            ));
        }
        if !self.eval_save_outputs.is_empty() {
            return Err(invalid(
                "eval_save_outputs",
                "saving evaluation outputs is not implemented yet; set eval_save_outputs=[] \
                 (the ARC evaluator's submission.json is written under the run folder)",
            ));
        }
        if self.global_batch_size == 0 {
            return Err(invalid("global_batch_size", "must be at least 1"));
        }
        if self.epochs == 0 {
            return Err(invalid("epochs", "must be at least 1"));
        }
        match self.eval_interval {
            Some(0) => return Err(invalid("eval_interval", "must be at least 1 (or null)")),
            Some(k) if self.epochs % k != 0 => {
                return Err(ConfigError::EvalIntervalNotDivisor {
                    eval_interval: k,
                    epochs: self.epochs,
                })
            }
            _ => {}
        }
        for (key, value) in [
            ("lr", self.lr),
            ("puzzle_emb_lr", self.puzzle_emb_lr),
            ("weight_decay", self.weight_decay),
            ("puzzle_emb_weight_decay", self.puzzle_emb_weight_decay),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(
                    key,
                    &format!("{value} must be a finite number >= 0"),
                ));
            }
        }
        for (key, value) in [
            ("lr_min_ratio", self.lr_min_ratio),
            ("ema_rate", self.ema_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(invalid(key, &format!("{value} must be within 0 ..= 1")));
            }
        }
        for (key, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(invalid(key, &format!("{value} must be within 0 .. 1")));
            }
        }
        let unsupported = |key: &str, value: &str, supported: &str| ConfigError::Unsupported {
            key: key.into(),
            value: value.into(),
            supported: supported.into(),
        };
        if self.arch_name != TRM_ARCH_NAME {
            return Err(unsupported("arch.name", &self.arch_name, TRM_ARCH_NAME));
        }
        if self.loss.name != ACT_LOSS_NAME {
            return Err(unsupported(
                "arch.loss.name",
                &self.loss.name,
                ACT_LOSS_NAME,
            ));
        }
        for (i, evaluator) in self.evaluators.iter().enumerate() {
            if evaluator.name != ARC_EVALUATOR_NAME {
                return Err(unsupported(
                    &format!("evaluators[{i}].name"),
                    &evaluator.name,
                    ARC_EVALUATOR_NAME,
                ));
            }
        }
        // The dataset fields are not known yet: stand-ins let the rest of the
        // network be checked now, before any data is read.
        let mut arch = self.arch.clone();
        arch.seq_len = arch.seq_len.max(1);
        arch.vocab_size = arch.vocab_size.max(1);
        arch.num_puzzle_identifiers = arch.num_puzzle_identifiers.max(1);
        arch.validate_supported()?;
        Ok(())
    }

    /// The network for a dataset: fills the dataset-derived fields and
    /// validates. A config that already names them must agree.
    pub fn arch_for_dataset(
        &self,
        seq_len: usize,
        vocab_size: usize,
        num_puzzle_identifiers: usize,
    ) -> Result<ArchConfig, ConfigError> {
        let mut arch = self.arch.clone();
        for (field, slot, dataset) in [
            (DATASET_FIELDS[0], &mut arch.seq_len, seq_len),
            (DATASET_FIELDS[1], &mut arch.vocab_size, vocab_size),
            (
                DATASET_FIELDS[2],
                &mut arch.num_puzzle_identifiers,
                num_puzzle_identifiers,
            ),
        ] {
            if *slot != 0 && *slot != dataset {
                return Err(ConfigError::DatasetMismatch {
                    field,
                    config: *slot,
                    dataset,
                });
            }
            *slot = dataset;
        }
        arch.validate_supported()?;
        Ok(arch)
    }

    /// Epochs per train/evaluate iteration (`eval_interval`, else all).
    pub fn epochs_per_iter(&self) -> usize {
        self.eval_interval.unwrap_or(self.epochs)
    }

    /// Train/evaluate iterations of the run.
    pub fn total_iters(&self) -> usize {
        self.epochs / self.epochs_per_iter().max(1)
    }

    /// The config as YAML, in the layout of the files it loads from (for the
    /// run's `all_config.yaml`); [`RunConfig::load`] reads it back unchanged.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        let mut arch = Mapping::new();
        arch.insert("name".into(), self.arch_name.clone().into());
        arch.insert("loss".into(), to_value(&self.loss)?);
        if let Value::Mapping(net) = to_value(&self.arch)? {
            for (key, value) in net {
                let unset_dataset_field = key.as_str().is_some_and(|k| DATASET_FIELDS.contains(&k))
                    && value.as_u64() == Some(0);
                if !unset_dataset_field {
                    arch.insert(key, value);
                }
            }
        }
        let mut top = Mapping::new();
        top.insert("arch".into(), Value::Mapping(arch));
        if let Value::Mapping(rest) = to_value(self)? {
            top.extend(rest);
        }
        serde_norway::to_string(&Value::Mapping(top)).map_err(ConfigError::Serialize)
    }
}

fn to_value<T: Serialize>(value: &T) -> Result<Value, ConfigError> {
    serde_norway::to_value(value).map_err(ConfigError::Serialize)
}

/// Deserializes `value`, reporting a failure at its full dotted key
/// (`prefix` is where `value` sits in the whole config).
fn typed<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let mut key = prefix.to_string();
        for segment in err.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => key.push_str(&format!("[{index}]")),
                serde_path_to_error::Segment::Map { key: k }
                | serde_path_to_error::Segment::Enum { variant: k } => {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(k);
                }
                serde_path_to_error::Segment::Unknown => key.push_str(".?"),
            }
        }
        let message = err.inner().to_string();
        // serde reports a missing field at the enclosing mapping; name the
        // field's own key instead.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            let full = if key.is_empty() {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
            return ConfigError::Value {
                key: full,
                message: "missing (required)".into(),
            };
        }
        if key.is_empty() {
            key = "(top level)".into();
        }
        ConfigError::Value { key, message }
    })
}
