//! Valid files of every kind the engine reads, made once per test binary by
//! a tiny demo run: ARC JSON, a dataset, a checkpoint and a model folder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use trm::demo::DemoOptions;

pub struct Fixture {
    pub root: PathBuf,
    pub challenges: PathBuf,
    pub solutions: PathBuf,
    pub dataset: PathBuf,
    pub checkpoint: PathBuf,
    pub model: PathBuf,
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reliability-fixture");
        let _ = std::fs::remove_dir_all(&root);
        let opts = DemoOptions {
            out_dir: root.clone(),
            train_puzzles: 6,
            eval_puzzles: 2,
            num_aug: 1,
            seed: 5,
            verbose: false,
            overrides: [
                "epochs=2",
                "eval_interval=2",
                "global_batch_size=8",
                "ema=True",
            ]
            .map(String::from)
            .to_vec(),
            ..DemoOptions::default()
        };
        let s = trm::demo::run(&opts).expect("demo training");
        let checkpoint = s.train.checkpoints.last().expect("a checkpoint").clone();
        let model = root.join("model");
        trm::package::package(&checkpoint, &model, None).expect("package");
        let arc = root.join("arc");
        Fixture {
            challenges: arc.join("synthetic_evaluation_challenges.json"),
            solutions: arc.join("synthetic_evaluation_solutions.json"),
            dataset: s.dataset_dir,
            checkpoint,
            model,
            root,
        }
    })
}

/// A private copy of a fixture folder, to damage.
pub fn copy_dir(src: &Path, name: &str) -> PathBuf {
    let dst = fixture().root.join("scratch").join(name);
    let _ = std::fs::remove_dir_all(&dst);
    copy_tree(src, &dst);
    dst
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// Writes `bytes` as `name` in `dir` and records its size and hash in the
/// folder's manifest, so the damage reaches the parser behind the hash check.
pub fn write_rehashed(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
    let entry = trm::checkpoint::hash_file(&dir.join(name)).unwrap();
    let mpath = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["files"][name] = serde_json::to_value(entry).unwrap();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
}
