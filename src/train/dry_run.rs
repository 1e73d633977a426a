//! `trm train --dry-run`: every check a run makes before its first step,
//! then a description of what the run would do, without training.
//!
//! It runs the run's own start-up checks ([`super::run::prepare`]: config,
//! device, batch split, datasets, evaluators, memory limits, schedule) for
//! the world the launcher describes, then the run folder and the start point.
//! It reads only: the run folder is not created, no lock is taken, no rank is
//! contacted. Launched exactly as the real run (torchrun, srun), each rank
//! checks its own view (its rank, its GPU).

use std::fmt;
use std::path::PathBuf;

use super::run::{prepare, resolve_device, run_dir, Prepared};
use super::start_point::{start_point, StartPoint};
use super::{TrainError, TrainOptions};
use crate::checkpoint::{self, CheckpointError};
use crate::config::RunConfig;
use crate::dist::{gpu_ordinal, World, WorldError};
use crate::model::device_choice::DeviceKind;
use crate::run_folder::{self, FolderError};

/// Why a dry run refuses a launch.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    #[error("world from the launcher's environment: {0}")]
    World(#[from] WorldError),
    #[error(transparent)]
    Train(#[from] TrainError),
}

impl From<CheckpointError> for DryRunError {
    fn from(e: CheckpointError) -> Self {
        DryRunError::Train(e.into())
    }
}

impl From<FolderError> for DryRunError {
    fn from(e: FolderError) -> Self {
        DryRunError::Train(e.into())
    }
}

/// What the checked run would do.
#[derive(Debug)]
pub struct DryRunReport {
    pub world: World,
    pub device: String,
    pub data: Vec<String>,
    pub model: String,
    pub local_batch: usize,
    pub global_batch: usize,
    pub schedule: String,
    pub run_dir: PathBuf,
    pub folder: String,
    pub start: String,
    /// Step of the checkpoint the run would resume from.
    pub resume_step: Option<u64>,
    pub warnings: Vec<String>,
}

impl fmt::Display for DryRunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "world: {}", self.world.describe())?;
        writeln!(f, "device: {}", self.device)?;
        for line in &self.data {
            writeln!(f, "data: {line}")?;
        }
        writeln!(f, "model: {}", self.model)?;
        writeln!(
            f,
            "batch: global {} = {} rank(s) x {} per rank",
            self.global_batch, self.world.world_size, self.local_batch
        )?;
        writeln!(f, "{}", self.schedule)?;
        writeln!(
            f,
            "run folder: {} ({})",
            self.run_dir.display(),
            self.folder
        )?;
        writeln!(f, "start: {}", self.start)?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        write!(f, "dry run passed: nothing was trained, written or locked")
    }
}

/// Checks the run `cfg` with `opts` would make, for the process whose
/// launcher variables `env` reads (the process environment in `trm`).
pub fn dry_run(
    cfg: &RunConfig,
    opts: &TrainOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DryRunReport, DryRunError> {
    let world = World::from_vars(env)?;
    let ordinal = gpu_ordinal(&world, env("CUDA_VISIBLE_DEVICES").as_deref());
    let Prepared {
        device,
        train_ds,
        test_ds,
        arch,
        schedule,
        local_batch,
        warnings,
        ..
    } = prepare(
        cfg,
        resolve_device(cfg, opts.device, ordinal)?,
        world.rank,
        world.world_size,
    )?;

    let dir = run_dir(cfg);
    let start = start_point(opts.resume.as_deref(), &dir)?;
    let evidence = run_folder::run_evidence(&dir);
    let folder = match (&evidence, dir.is_dir()) {
        (Some(what), _) => format!("holds a run: {what}"),
        (None, true) => "exists, no run yet".to_string(),
        (None, false) => "not created yet".to_string(),
    };
    let (start, resume_step) = match start {
        StartPoint::Checkpoint(path) => {
            // The run verifies it too; a damaged checkpoint is named here.
            let manifest = checkpoint::verify(&path)?;
            (
                format!(
                    "resume from {} at step {} (files verified)",
                    path.display(),
                    manifest.step
                ),
                Some(manifest.step),
            )
        }
        fresh @ StartPoint::Fresh { .. } => match evidence {
            Some(what) if !fresh.moves_old_run_aside(opts.start_over) => {
                return Err(FolderError::HoldsRun { dir, what }.into());
            }
            Some(what) => (
                format!(
                    "fresh; the earlier run ({what}) would be moved aside to {}.previous-N",
                    dir.display()
                ),
                None,
            ),
            None => ("fresh".to_string(), None),
        },
    };
    if let Some(p) = &cfg.load_checkpoint {
        check_initial_weights(p)?;
    }

    let meta = train_ds.metadata();
    let mut data = vec![format!(
        "train {}: {} examples, {} groups, seq_len {}, vocab {}, {} puzzle identifiers",
        paths(&train_ds.config().dataset_paths),
        train_ds.total_examples(),
        meta.total_groups,
        meta.seq_len,
        meta.vocab_size,
        meta.num_puzzle_identifiers
    )];
    data.push(match &test_ds {
        Some(t) => format!(
            "test {}: {} examples",
            paths(&t.config().dataset_paths),
            t.total_examples()
        ),
        None => "no test split: evaluation would be skipped".to_string(),
    });
    let device = match device.kind {
        DeviceKind::Cuda => format!("cuda, GPU {} ({})", device.ordinal, device.why),
        k => format!("{k} ({})", device.why),
    };
    Ok(DryRunReport {
        device,
        data,
        model: format!(
            "hidden {}, {} layer(s), H_cycles {}, L_cycles {}, puzzle embedding {} x {}",
            arch.hidden_size,
            arch.l_layers,
            arch.h_cycles,
            arch.l_cycles,
            arch.num_puzzle_identifiers,
            arch.puzzle_emb_ndim
        ),
        local_batch,
        global_batch: cfg.global_batch_size,
        schedule: schedule.to_string(),
        run_dir: dir,
        folder,
        start,
        resume_step,
        warnings,
        world,
    })
}

/// `+load_checkpoint`: a checkpoint folder (verified) or a weights file.
fn check_initial_weights(p: &std::path::Path) -> Result<(), CheckpointError> {
    if p.is_dir() {
        checkpoint::verify(p).map(|_| ())
    } else if p.is_file() {
        Ok(())
    } else {
        Err(CheckpointError::MissingFile {
            path: p.to_path_buf(),
        })
    }
}

fn paths(ps: &[PathBuf]) -> String {
    let names: Vec<String> = ps.iter().map(|p| p.display().to_string()).collect();
    format!("[{}]", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_weights_must_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let e = check_initial_weights(&tmp.path().join("nope.safetensors")).unwrap_err();
        assert!(matches!(e, CheckpointError::MissingFile { .. }), "{e}");
        let file = tmp.path().join("w.safetensors");
        std::fs::write(&file, b"x").unwrap();
        check_initial_weights(&file).unwrap();
        // A folder must be a checkpoint (a manifest), not any folder.
        let e = check_initial_weights(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("manifest.json"), "{e}");
    }
}
