//! `trm step-dump`: run one training-mode ACT step from a fresh carry on a
//! given batch, backward of the (un-normalised) loss, and dump every output
//! and gradient to a safetensors file, named as the PyTorch reference's golden
//! files (`../shared/golden/*/expected.safetensors`) so the two can be diffed.
//!
//! The step runs on an engine from [`crate::model::device_choice`], through
//! the shared ACT rules ([`act::act_step`]) and the engine's trace of it.
//! The in-process entry point [`step_dump`] (the CPU engine) is what the
//! golden parity test calls; [`run`] adds the file handling of the CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::model::act;
use crate::model::config::{ArchConfig, ConfigError};
use crate::model::device_choice::{build_engine, DeviceChoice, DeviceError, DeviceKind};
use crate::model::engine::{EngineConfig, EngineError};
use crate::model::safetensors_io::{self, FloatDtype, SafetensorsError};
use crate::model::trm::{self, Dims, Params};
use crate::model::weights::{self, Weights, WeightsError};
use crate::tensor::Tensor;

/// `trm step-dump`'s command line: the dump's arguments and the device.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Run one training ACT step on a batch and dump outputs and gradients (for parity checks)"
)]
#[command(
    long_about = "Runs one ACT step in training mode from a fresh carry (every sample \
starts from H_init/L_init, halting exploration off), backpropagates the summed loss \
(lm_loss + 0.5 * q_halt_loss, not divided by the batch size) and writes, as float32: \
logits, q_halt_logits, q_continue_logits, loss, lm_loss, q_halt_loss, halted, steps, \
z_H, z_L, grad.<name> for every trainable weight and grad.inner.puzzle_emb.local_weights \
(the gradient of the batch's puzzle-embedding rows). The names match the PyTorch \
reference's golden files."
)]
pub struct StepDumpCli {
    #[command(flatten)]
    pub args: StepDumpArgs,
    /// Where the step runs; default: cuda when this build has the kernels
    /// and a usable GPU, else cpu.
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
}

/// Arguments of `trm step-dump`.
#[derive(Debug, Clone, clap::Args)]
pub struct StepDumpArgs {
    /// Architecture config: JSON with the reference's arch fields plus
    /// seq_len, vocab_size and num_puzzle_identifiers.
    #[arg(long, value_name = "CONFIG.json")]
    pub arch: PathBuf,

    /// Weights to load (reference state-dict names; F32, BF16, F16 or F64).
    #[arg(
        long,
        value_name = "W.safetensors",
        required_unless_present = "init_seed",
        conflicts_with = "init_seed"
    )]
    pub weights: Option<PathBuf>,

    /// Instead of --weights: initialise fresh weights with this seed.
    #[arg(long, value_name = "N")]
    pub init_seed: Option<u64>,

    /// Batch: int32 `inputs` [B, seq_len], `labels` [B, seq_len] (-100 =
    /// ignored) and `puzzle_identifiers` [B].
    #[arg(long, value_name = "B.safetensors")]
    pub batch: PathBuf,

    /// Output safetensors file (written atomically). An existing file is
    /// replaced only if it is a previous step dump (or with --force).
    #[arg(long, value_name = "O.safetensors")]
    pub out: PathBuf,

    /// Replace --out even if it is not a previous step dump.
    #[arg(long)]
    pub force: bool,
}

/// One batch of training samples, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    /// [batch_size, seq_len] token ids.
    pub inputs: Vec<i32>,
    /// [batch_size, seq_len] target ids, -100 where ignored.
    pub labels: Vec<i32>,
    /// [batch_size] puzzle identifiers.
    pub puzzle_identifiers: Vec<i32>,
}

/// Label value of positions left out of the loss.
pub const IGNORE_LABEL_ID: i32 = -100;

#[derive(Debug, thiserror::Error)]
pub enum StepDumpError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    File(#[from] SafetensorsError),
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        #[source]
        source: WeightsError,
    },
    #[error("batch {path}: `{name}` has shape {got:?}, expected {expected}")]
    BatchShape {
        path: PathBuf,
        name: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    #[error("batch {path}: `{name}` has value {value} at flat index {index}, expected {range}")]
    BatchValue {
        path: PathBuf,
        name: &'static str,
        index: usize,
        value: i32,
        range: String,
    },
    #[error("model step failed: {0}")]
    Model(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot open the {device} engine: {source}")]
    Engine {
        device: DeviceKind,
        #[source]
        source: EngineError,
    },
    #[error("model step did not produce `{0}`")]
    MissingOutput(String),
}

/// The scalar and activation outputs of a step dump, in the golden files' names.
pub const OUTPUT_NAMES: [&str; 10] = [
    "logits",
    "q_halt_logits",
    "q_continue_logits",
    "loss",
    "lm_loss",
    "q_halt_loss",
    "halted",
    "steps",
    "z_H",
    "z_L",
];

/// Every name a step dump for `config` holds.
pub fn expected_output_names(config: &ArchConfig) -> Vec<String> {
    let mut names: Vec<String> = OUTPUT_NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(
        weights::trainable_names(config)
            .into_iter()
            .map(|n| format!("grad.{n}")),
    );
    if config.has_puzzle_emb() {
        names.push(format!("grad.{}", weights::PUZZLE_EMB_LOCAL));
    }
    names
}

/// Loads and checks a batch file against the config: shapes, token ids in
/// the vocabulary, labels in the vocabulary or -100, puzzle ids in range.
pub fn load_batch(path: &Path, config: &ArchConfig) -> Result<Batch, StepDumpError> {
    let inputs = safetensors_io::load_i32(path, "inputs")?;
    let labels = safetensors_io::load_i32(path, "labels")?;
    let ids = safetensors_io::load_i32(path, "puzzle_identifiers")?;
    let shape_err = |name, got: &[usize], expected: String| StepDumpError::BatchShape {
        path: path.to_path_buf(),
        name,
        got: got.to_vec(),
        expected,
    };
    if inputs.shape.len() != 2 || inputs.shape[1] != config.seq_len || inputs.shape[0] == 0 {
        return Err(shape_err(
            "inputs",
            &inputs.shape,
            format!("[B >= 1, seq_len = {}]", config.seq_len),
        ));
    }
    let b = inputs.shape[0];
    if labels.shape != inputs.shape {
        return Err(shape_err(
            "labels",
            &labels.shape,
            format!("{:?} like inputs", inputs.shape),
        ));
    }
    if ids.shape != [b] {
        return Err(shape_err(
            "puzzle_identifiers",
            &ids.shape,
            format!("[{b}]"),
        ));
    }
    let v = config.vocab_size as i64;
    let check = |name, data: &[i32], ok: &dyn Fn(i64) -> bool, range: String| match data
        .iter()
        .position(|&x| !ok(x as i64))
    {
        Some(index) => Err(StepDumpError::BatchValue {
            path: path.to_path_buf(),
            name,
            index,
            value: data[index],
            range,
        }),
        None => Ok(()),
    };
    check(
        "inputs",
        &inputs.data,
        &|x| (0..v).contains(&x),
        format!("0 ..< vocab_size {v}"),
    )?;
    check(
        "labels",
        &labels.data,
        &|x| x == IGNORE_LABEL_ID as i64 || (0..v).contains(&x),
        format!("-100 or 0 ..< vocab_size {v}"),
    )?;
    // Without a puzzle embedding the ids are unused (any value is fine).
    if config.has_puzzle_emb() {
        let n = config.num_puzzle_identifiers as i64;
        check(
            "puzzle_identifiers",
            &ids.data,
            &|x| (0..n).contains(&x),
            format!("0 ..< num_puzzle_identifiers {n}"),
        )?;
    }
    Ok(Batch {
        batch_size: b,
        inputs: inputs.data,
        labels: labels.data,
        puzzle_identifiers: ids.data,
    })
}

/// Loads weights for `config` from a safetensors file, checking every name
/// and shape (reference checkpoint prefixes such as `_orig_mod.model.` are
/// accepted).
pub fn load_weights(config: &ArchConfig, path: &Path) -> Result<Weights, StepDumpError> {
    let map = safetensors_io::load_tensors(path)?;
    Weights::from_state_dict(config, map).map_err(|source| StepDumpError::Weights {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs the step on the CPU engine (the reference the golden files check)
/// and returns every dumped tensor by name (f32; `halted` as 0/1, `steps`
/// as float). Halting exploration is forced off, as in the golden files, so
/// the result is deterministic.
pub fn step_dump(
    config: &ArchConfig,
    weights: &Weights,
    batch: &Batch,
) -> Result<BTreeMap<String, Tensor>, StepDumpError> {
    let cpu = DeviceChoice {
        kind: DeviceKind::Cpu,
        ordinal: 0,
        why: "requested".into(),
    };
    step_dump_on(&cpu, config, weights, batch)
}

/// [`step_dump`] on the engine of `device`.
pub fn step_dump_on(
    device: &DeviceChoice,
    config: &ArchConfig,
    weights: &Weights,
    batch: &Batch,
) -> Result<BTreeMap<String, Tensor>, StepDumpError> {
    config.validate_supported()?;
    let mut config = config.clone();
    config.halt_exploration_prob = 0.0;
    let out = model_step(device, &config, weights, batch)?;
    for name in expected_output_names(&config) {
        if !out.contains_key(&name) {
            return Err(StepDumpError::MissingOutput(name));
        }
    }
    Ok(out)
}

/// The one call into the model: one ACT step in training mode from a fresh
/// carry on the engine of `device` (every slot halted, so every slot
/// restarts from H_init / L_init at its first step; exploration off),
/// backward of the summed loss, then the engine's trace of the step.
fn model_step(
    device: &DeviceChoice,
    config: &ArchConfig,
    weights: &Weights,
    batch: &Batch,
) -> Result<BTreeMap<String, Tensor>, StepDumpError> {
    let model = |e: &dyn std::fmt::Display| StepDumpError::Model(e.to_string());
    let b = batch.batch_size;
    if b == 0 {
        return Err(model(&trm::TrmError::EmptyBatch));
    }
    let params = Params::<f32>::from_weights(config, weights).map_err(|e| model(&e))?;
    // No optimiser step is taken: the optimiser settings do not matter.
    let engine_cfg = EngineConfig {
        adam: Default::default(),
        ema_rate: None,
        puzzle_emb_weight_decay: 0.0,
    };
    let mut engine = build_engine(
        device.kind,
        device.ordinal,
        config.clone(),
        params,
        b,
        engine_cfg,
    )
    .map_err(|source| StepDumpError::Engine {
        device: device.kind,
        source,
    })?;
    engine
        .reset_halted(&vec![true; b])
        .map_err(|source| StepDumpError::Engine {
            device: device.kind,
            source,
        })?;
    let steps = vec![1i32; b];
    let slots = trm::Batch {
        inputs: &batch.inputs,
        labels: &batch.labels,
        puzzle_ids: &batch.puzzle_identifiers,
        b,
    };
    let r = act::act_step(&mut *engine, config, &slots, &steps, None).map_err(|e| model(&e))?;
    let trace = engine.step_trace().map_err(|e| model(&e))?;
    let dm = Dims::new(config, b);
    let mut out = trace.grads.to_map(config, b);
    // Losses are f64 in the model (the reference's stablemax runs in f64);
    // the dump is f32 like the golden files.
    out.insert("loss".into(), Tensor::scalar(r.loss.loss as f32));
    out.insert("lm_loss".into(), Tensor::scalar(r.loss.lm_loss as f32));
    out.insert(
        "q_halt_loss".into(),
        Tensor::scalar(r.loss.q_halt_loss as f32),
    );
    out.insert(
        "logits".into(),
        Tensor::new(&[b, dm.seq, dm.v], trace.logits),
    );
    let q = |i: usize| (0..b).map(|s| r.q[s * 2 + i]).collect::<Vec<f32>>();
    out.insert("q_halt_logits".into(), Tensor::new(&[b], q(0)));
    out.insert("q_continue_logits".into(), Tensor::new(&[b], q(1)));
    out.insert("z_H".into(), Tensor::new(&[b, dm.s, dm.d], trace.z_h));
    out.insert("z_L".into(), Tensor::new(&[b, dm.s, dm.d], trace.z_l));
    let halted = r
        .halted
        .iter()
        .map(|&h| if h { 1.0 } else { 0.0 })
        .collect();
    out.insert("halted".into(), Tensor::new(&[b], halted));
    let steps = steps.iter().map(|&s| s as f32).collect();
    out.insert("steps".into(), Tensor::new(&[b], steps));
    Ok(out)
}

/// `trm step-dump` on the CPU engine (the golden files' reference): load
/// config, weights (or init) and batch, run [`step_dump`], write the dump as
/// f32.
pub fn run(args: &StepDumpArgs) -> anyhow::Result<()> {
    run_on(args, Some(DeviceKind::Cpu))
}

/// [`run`] on the engine of `device` (`None`: a usable GPU, else the CPU).
pub fn run_on(args: &StepDumpArgs, device: Option<DeviceKind>) -> anyhow::Result<()> {
    crate::out_guard::check_replaceable(
        &args.out,
        crate::out_guard::OutputKind::StepDump,
        args.force,
    )?;
    // Ordinal 0: `trm step-dump` is one process.
    let device = crate::model::device_choice::resolve(device, 0)?;
    let config = ArchConfig::from_json_file(&args.arch)?;
    config.validate_supported()?;
    let weights = match (&args.weights, args.init_seed) {
        (Some(path), _) => load_weights(&config, path)?,
        (None, Some(seed)) => Weights::init(&config, seed),
        (None, None) => anyhow::bail!("step-dump needs --weights or --init-seed"),
    };
    let batch = load_batch(&args.batch, &config)?;
    let out = step_dump_on(&device, &config, &weights, &batch)?;
    safetensors_io::save_tensors(&args.out, &out, FloatDtype::F32)
        .with_context(|| format!("writing step dump {}", args.out.display()))?;
    let scalar = |n: &str| {
        out.get(n)
            .and_then(|t| t.data.first().copied())
            .unwrap_or(f32::NAN)
    };
    eprintln!(
        "step-dump on {}: batch {} -> {} tensors in {} (loss {:.6}, lm_loss {:.6}, q_halt_loss {:.6})",
        device.kind,
        batch.batch_size,
        out.len(),
        args.out.display(),
        scalar("loss"),
        scalar("lm_loss"),
        scalar("q_halt_loss"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::safetensors_io::{I32Tensor, Stored};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: StepDumpArgs,
    }

    #[test]
    fn cli_requires_exactly_one_weight_source() {
        let base = [
            "trm", "--arch", "a.json", "--batch", "b.st", "--out", "o.st",
        ];
        assert!(Cli::try_parse_from(base).is_err());
        let mut both = base.to_vec();
        both.extend(["--weights", "w.st", "--init-seed", "3"]);
        assert!(Cli::try_parse_from(both).is_err());
        let mut seed = base.to_vec();
        seed.extend(["--init-seed", "3"]);
        assert_eq!(Cli::try_parse_from(seed).unwrap().args.init_seed, Some(3));
    }

    fn tiny() -> ArchConfig {
        let mut c = ArchConfig::trm_default(4, 12, 3);
        c.hidden_size = 8;
        c.num_heads = 2;
        c.puzzle_emb_ndim = 8;
        c.puzzle_emb_len = 1;
        c
    }

    fn write_batch(path: &Path, inputs: I32Tensor, labels: I32Tensor, ids: I32Tensor) {
        let mut m = BTreeMap::new();
        m.insert("inputs".to_string(), Stored::I32(inputs));
        m.insert("labels".to_string(), Stored::I32(labels));
        m.insert("puzzle_identifiers".to_string(), Stored::I32(ids));
        safetensors_io::save_mixed(path, &m, FloatDtype::F32, &BTreeMap::new()).unwrap();
    }

    fn i(shape: &[usize], data: Vec<i32>) -> I32Tensor {
        I32Tensor {
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn batch_is_checked() {
        let c = tiny();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.safetensors");
        write_batch(
            &p,
            i(&[2, 4], vec![0, 1, 2, 11, 3, 3, 3, 3]),
            i(&[2, 4], vec![-100, 1, 2, 11, 3, 3, 3, -100]),
            i(&[2], vec![0, 2]),
        );
        let b = load_batch(&p, &c).unwrap();
        assert_eq!(b.batch_size, 2);
        assert_eq!(b.puzzle_identifiers, vec![0, 2]);

        write_batch(
            &p,
            i(&[2, 5], vec![0; 10]),
            i(&[2, 5], vec![0; 10]),
            i(&[2], vec![0, 0]),
        );
        let e = load_batch(&p, &c).unwrap_err().to_string();
        assert!(e.contains("inputs") && e.contains("seq_len = 4"), "{e}");

        write_batch(
            &p,
            i(&[1, 4], vec![0, 12, 0, 0]),
            i(&[1, 4], vec![0; 4]),
            i(&[1], vec![0]),
        );
        let e = load_batch(&p, &c).unwrap_err().to_string();
        assert!(e.contains("inputs") && e.contains("12"), "{e}");

        write_batch(
            &p,
            i(&[1, 4], vec![0; 4]),
            i(&[1, 4], vec![0; 4]),
            i(&[1], vec![3]),
        );
        let e = load_batch(&p, &c).unwrap_err().to_string();
        assert!(e.contains("puzzle_identifiers"), "{e}");

        let e = load_batch(&dir.path().join("none.safetensors"), &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
    }

    #[test]
    fn output_names_cover_grads() {
        let c = tiny();
        let names = expected_output_names(&c);
        assert!(names.contains(&"grad.inner.puzzle_emb.local_weights".to_string()));
        assert!(names.contains(&"grad.inner.q_head.bias".to_string()));
        assert!(!names.iter().any(|n| n.contains("H_init")));
        assert_eq!(names.len(), 10 + 4 + 4 * 2 + 1);
    }
}
