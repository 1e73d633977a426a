//! Every reader of outside bytes, fed mutations of valid files: each must
//! return an error or a valid result, never panic (proptest catches the
//! panic and shrinks it to the edits that cause it), and never hold more
//! heap than `bound(input)` = 8 MiB + 64 bytes per input byte (a JSON tree
//! costs up to ~32 bytes per input byte; binary data is converted once).
//!
//! Case counts per reader are the `CASES_*` constants (README, reliability).

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::Config;

use super::alloc::peak_during;
use super::fixture::{copy_dir, fixture, write_rehashed};
use super::mutate::{apply, ops};

pub const CASES_ARC: u32 = 2048;
pub const CASES_NPY: u32 = 2048;
pub const CASES_DATASET_JSON: u32 = 2048;
pub const CASES_SAFETENSORS: u32 = 1024;
pub const CASES_CHECKPOINT: u32 = 1024;
pub const CASES_LOADER_STATE: u32 = 1024;
pub const CASES_YAML: u32 = 1024;
pub const CASES_OVERRIDES: u32 = 2048;
pub const CASES_MODEL_FOLDER: u32 = 512;

fn cfg(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn bound(input_bytes: usize) -> usize {
    (8 << 20) + 64 * input_bytes
}

/// Runs a reader, asserting the heap bound; the reader's own result (Ok or
/// Err) is only required not to panic.
fn bounded<R>(input_bytes: usize, what: &str, f: impl FnOnce() -> R) -> R {
    let (r, peak) = peak_during(f);
    assert!(
        peak <= bound(input_bytes),
        "{what}: {peak} heap bytes for {input_bytes} input bytes (bound {})",
        bound(input_bytes)
    );
    r
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn folder_bytes(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len() as usize)
        .sum()
}

fn scratch_file(name: &str) -> std::path::PathBuf {
    let dir = fixture().root.join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

proptest! {
    #![proptest_config(cfg(CASES_ARC))]
    #[test]
    fn arc_json(edits in ops(), which in 0..2usize) {
        use trm::data::arc::{parse_challenges, parse_json_bytes};
        let f = fixture();
        let (chal, sols) = (read(&f.challenges), read(&f.solutions));
        let (chal, sols) = if which == 0 { (apply(&chal, &edits), sols) } else { (chal, apply(&sols, &edits)) };
        let n = chal.len() + sols.len();
        bounded(n, "ARC JSON", || {
            let c = parse_json_bytes(&f.challenges, &chal)?;
            let s = parse_json_bytes(&f.solutions, &sols)?;
            parse_challenges(&f.challenges, c, Some((&f.solutions, &s)))
        }).ok();
    }
}

proptest! {
    #![proptest_config(cfg(CASES_NPY))]
    #[test]
    fn npy(edits in ops(), which in 0..5usize) {
        use trm::data::npy::NpyArray;
        let name = ["inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices"][which];
        let base = read(&fixture().dataset.join("train").join(format!("all__{name}.npy")));
        let bytes = apply(&base, &edits);
        let p = scratch_file(&format!("fuzz-{:?}.npy", std::thread::current().id()));
        std::fs::write(&p, &bytes).unwrap();
        bounded(bytes.len(), ".npy", || {
            let a = NpyArray::open(&p)?;
            // Reading every element must stay inside the mapping.
            let v = a.to_i64_vec();
            prop_assert_eq!(v.len(), a.len());
            Ok::<_, TestCaseError>(())
        }).ok();
    }
}

proptest! {
    #![proptest_config(cfg(CASES_DATASET_JSON))]
    #[test]
    fn dataset_json(edits in ops()) {
        use trm::data::metadata::DatasetMetadata;
        let bytes = apply(&read(&fixture().dataset.join("train").join("dataset.json")), &edits);
        let p = scratch_file(&format!("fuzz-{:?}-dataset.json", std::thread::current().id()));
        std::fs::write(&p, &bytes).unwrap();
        bounded(bytes.len(), "dataset.json", || DatasetMetadata::load(&p)).ok();
    }
}

proptest! {
    #![proptest_config(cfg(CASES_SAFETENSORS))]
    #[test]
    fn safetensors(edits in ops(), which in 0..3usize) {
        use trm::model::safetensors_io::{list_tensors, load_metadata, load_tensors, load_i32};
        let ck = &fixture().checkpoint;
        let name = ["puzzle_emb.safetensors", "carry.safetensors", "model.safetensors"][which];
        let bytes = apply(&read(&ck.join(name)), &edits);
        let p = scratch_file(&format!("fuzz-{:?}.safetensors", std::thread::current().id()));
        std::fs::write(&p, &bytes).unwrap();
        bounded(bytes.len() * 2, "safetensors", || {
            let _ = list_tensors(&p);
            let _ = load_metadata(&p);
            let _ = load_i32(&p, "puzzle_identifiers");
            load_tensors(&p).map(|m| m.len())
        }).ok();
    }
}

/// A checkpoint with one file damaged (and, behind the hash check, rehashed).
fn damaged_checkpoint(
    edits: &[super::mutate::Op],
    which: usize,
    rehash: bool,
) -> (std::path::PathBuf, usize) {
    let dir = copy_dir(
        &fixture().checkpoint,
        &format!("ck-{:?}", std::thread::current().id()),
    );
    let name = [
        "state.json",
        "manifest.json",
        "puzzle_emb.safetensors",
        "model.safetensors",
    ][which];
    let bytes = apply(&read(&dir.join(name)), edits);
    if rehash && name != "manifest.json" {
        write_rehashed(&dir, name, &bytes);
    } else {
        std::fs::write(dir.join(name), &bytes).unwrap();
    }
    let n = folder_bytes(&dir);
    (dir, n)
}

proptest! {
    #![proptest_config(cfg(CASES_CHECKPOINT))]
    #[test]
    fn checkpoint(edits in ops(), which in 0..4usize, rehash in any::<bool>()) {
        let (dir, n) = damaged_checkpoint(&edits, which, rehash);
        bounded(2 * n, "checkpoint", || {
            let c = trm::checkpoint::load(&dir)?;
            // The loader position inside is outside bytes too.
            let _ = serde_json::from_value::<trm::data::loader::LoaderState>(c.state.loader);
            Ok::<_, trm::checkpoint::CheckpointError>(())
        }).ok();
    }
}

proptest! {
    #![proptest_config(cfg(CASES_LOADER_STATE))]
    #[test]
    fn loader_state(
        seed in prop_oneof![Just(5u64), any::<u64>()],
        iters in prop_oneof![0u64..4, any::<u64>()],
        set_index in proptest::option::of(prop_oneof![0usize..2, any::<usize>()]),
        start_index in prop_oneof![0usize..64, any::<usize>()],
        rng_word_pos in prop_oneof![0u64..64, any::<u64>()],
    ) {
        use trm::data::loader::{LoaderState, PuzzleDataset, PuzzleDatasetConfig, Split};
        let f = fixture();
        let config = PuzzleDatasetConfig {
            seed: 5,
            dataset_paths: vec![f.dataset.clone()],
            global_batch_size: 8,
            test_set_mode: false,
            epochs_per_iter: 1,
            rank: 0,
            num_replicas: 1,
        };
        let mut ds = PuzzleDataset::open(config, Split::Train).unwrap();
        let state = LoaderState { seed, iters, set_index, start_index, rng_word_pos };
        bounded(0, "loader state", || {
            if ds.restore(state).is_ok() {
                // A restored position must yield batches, not panic.
                for _ in ds.train_batches().take(3) {}
            }
        });
    }
}

const CPU_TINY: &str = include_str!("../../configs/cpu-tiny.yaml");

proptest! {
    #![proptest_config(cfg(CASES_YAML))]
    #[test]
    fn yaml_config(edits in ops()) {
        use trm::config::{ConfigSource, RunConfig};
        let text = apply(CPU_TINY.as_bytes(), &edits);
        let Ok(text) = String::from_utf8(text) else { return Ok(()) };
        let n = text.len();
        bounded(n, "YAML config", || {
            let c = RunConfig::load(ConfigSource::Text { origin: "fuzz".into(), text }, &[])?;
            c.validate()?;
            let _ = c.total_iters();
            Ok::<_, trm::config::ConfigError>(())
        }).ok();
    }
}

const KEYS: &[&str] = &[
    "epochs",
    "eval_interval",
    "global_batch_size",
    "lr",
    "lr_warmup_steps",
    "arch.hidden_size",
    "arch.expansion",
    "arch.num_heads",
    "arch.L_cycles",
    "arch.H_cycles",
    "arch.halt_max_steps",
    "data_paths",
    "evaluators",
    "checkpoint_keep_last",
    "+run_name",
    "+x.y",
    "arch",
    "ema_rate",
    "min_eval_interval",
    "puzzle_emb_lr",
    "seed",
    "",
    "=",
    "arch.",
];
const VALUES: &[&str] = &[
    "1",
    "0",
    "-1",
    "1e9",
    "18446744073709551615",
    "99999999999999999999",
    "nan",
    ".inf",
    "True",
    "False",
    "null",
    "~",
    "[",
    "[a, b]",
    "{a: 1}",
    "'x'",
    "\"",
    "${epochs}",
    "${a.b}",
    "${",
    "",
    "é",
    "[[[[[[[[",
    "!!binary AAAA",
    "&a [*a]",
    "0x10",
    "1_000",
];

proptest! {
    #![proptest_config(cfg(CASES_OVERRIDES))]
    #[test]
    fn overrides(parts in prop::collection::vec((0..KEYS.len(), 0..VALUES.len(), any::<bool>()), 0..6)) {
        use trm::config::{ConfigSource, RunConfig};
        let overrides: Vec<String> = parts
            .iter()
            .map(|&(k, v, eq)| if eq { format!("{}={}", KEYS[k], VALUES[v]) } else { format!("{}{}", KEYS[k], VALUES[v]) })
            .collect();
        let n: usize = overrides.iter().map(String::len).sum::<usize>() + CPU_TINY.len();
        bounded(n, "overrides", || {
            let c = RunConfig::load(ConfigSource::builtin("cpu-tiny").unwrap(), &overrides)?;
            c.validate()?;
            let _ = c.total_iters();
            Ok::<_, trm::config::ConfigError>(())
        }).ok();
    }
}

proptest! {
    #![proptest_config(cfg(CASES_MODEL_FOLDER))]
    #[test]
    fn model_folder(edits in ops(), which in 0..4usize, rehash in any::<bool>()) {
        use trm::package::ModelPackage;
        let dir = copy_dir(&fixture().model, &format!("model-{:?}", std::thread::current().id()));
        let name = ["config.json", "identifiers.json", "model.safetensors", "manifest.json"][which];
        let bytes = apply(&read(&dir.join(name)), &edits);
        if rehash && name != "manifest.json" {
            write_rehashed(&dir, name, &bytes);
        } else {
            std::fs::write(dir.join(name), &bytes).unwrap();
        }
        let n = folder_bytes(&dir);
        bounded(2 * n, "model folder", || {
            let m = ModelPackage::open(&dir)?;
            let _ = m.training_config();
            Ok::<_, trm::package::PackageError>(())
        }).ok();
    }
}
