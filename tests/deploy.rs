//! The deployment files under deploy/: every launch they describe is parsed
//! (the sbatch script's `TRAIN_ARGS`, each Kubernetes Job's container
//! command) and run through `trm train --dry-run` with the variables its
//! launcher would give each rank (SLURM's for srun tasks, torchrun's for its
//! workers), on a tiny dataset. Paths inside the container are remapped to
//! the test's folders (`/data/` and `/checkpoints/`) and `--device cuda` to
//! `--device cpu` (CI has no GPU; the device rule has its own tests).
//! Also: launches the dry run must refuse, and `--resume latest-if-any`
//! starting and then continuing a real run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_norway::Value;

mod common;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
const SBATCH: &str = "slurm/train.sbatch";
const K8S_JOBS: [&str; 2] = ["k8s/train-one-node.yaml", "k8s/train-multi-node.yaml"];

/// Who starts the ranks, and with what.
#[derive(Debug, Clone)]
enum Launcher {
    Srun {
        nodes: usize,
        tasks_per_node: usize,
    },
    Torchrun {
        nodes: usize,
        procs_per_node: usize,
        /// Whether torchrun's own store holds MASTER_PORT
        /// (TORCHELASTIC_USE_AGENT_STORE in the workers).
        agent_store: bool,
        run_id: String,
    },
}

/// One launch: where it came from, its launcher, the `trm train` arguments.
#[derive(Debug, Clone)]
struct Launch {
    origin: String,
    launcher: Launcher,
    args: Vec<String>,
}

impl Launcher {
    fn world_size(&self) -> usize {
        match self {
            Launcher::Srun {
                nodes,
                tasks_per_node,
            } => nodes * tasks_per_node,
            Launcher::Torchrun {
                nodes,
                procs_per_node,
                ..
            } => nodes * procs_per_node,
        }
    }

    /// The variables the launcher gives the process of global rank `rank`.
    fn env_for(&self, rank: usize) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_string(), v);
        };
        match self {
            Launcher::Srun {
                nodes,
                tasks_per_node,
            } => {
                set("SLURM_JOB_ID", "271828".into());
                set("SLURM_STEP_ID", "1".into());
                set("SLURM_PROCID", rank.to_string());
                set("SLURM_NTASKS", self.world_size().to_string());
                set("SLURM_LOCALID", (rank % tasks_per_node).to_string());
                set("SLURM_NODEID", (rank / tasks_per_node).to_string());
                set("SLURM_NNODES", nodes.to_string());
                set("SLURM_NTASKS_PER_NODE", tasks_per_node.to_string());
                set(
                    "SLURM_TASKS_PER_NODE",
                    format!("{tasks_per_node}(x{nodes})"),
                );
                set("SLURM_JOB_NODELIST", format!("gpu[001-{nodes:03}]"));
                // --gpus-per-node without per-task binding: every GPU visible.
                let gpus: Vec<String> = (0..*tasks_per_node).map(|g| g.to_string()).collect();
                set("CUDA_VISIBLE_DEVICES", gpus.join(","));
            }
            Launcher::Torchrun {
                procs_per_node,
                agent_store,
                run_id,
                ..
            } => {
                set("RANK", rank.to_string());
                set("WORLD_SIZE", self.world_size().to_string());
                set("LOCAL_RANK", (rank % procs_per_node).to_string());
                set("LOCAL_WORLD_SIZE", procs_per_node.to_string());
                set("GROUP_RANK", (rank / procs_per_node).to_string());
                set("MASTER_ADDR", "trm-train-0.trm-train".into());
                set("MASTER_PORT", "41977".into());
                set("TORCHELASTIC_RUN_ID", run_id.clone());
                let store = if *agent_store { "True" } else { "False" };
                set("TORCHELASTIC_USE_AGENT_STORE", store.into());
            }
        }
        env
    }
}

/// Shell words of `text`: blanks split, quotes group and are removed,
/// `\` + newline joins lines, `#` at a word's start comments out the rest
/// of the line. No expansion (the deploy files keep `trm`'s arguments
/// literal on purpose).
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            '\\' => cur.get_or_insert_with(String::new).extend(chars.next()),
            '\'' | '"' => {
                let w = cur.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    w.push(q);
                }
            }
            '#' if cur.is_none() => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
            }
            c if c.is_whitespace() => words.extend(cur.take()),
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(cur);
    words
}

/// `#SBATCH --name=value` of the script.
fn sbatch_option(script: &str, name: &str) -> Option<String> {
    let prefix = format!("#SBATCH --{name}=");
    script
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// The sbatch script's launch: `#SBATCH` sizes and the `TRAIN_ARGS` array
/// that every `srun ... trm train` line passes.
fn sbatch_launch() -> Launch {
    let script = std::fs::read_to_string(Path::new(DEPLOY).join(SBATCH)).unwrap();
    let number = |name: &str| -> usize {
        sbatch_option(&script, name)
            .unwrap_or_else(|| panic!("{SBATCH}: no #SBATCH --{name}="))
            .parse()
            .unwrap()
    };
    let launcher = Launcher::Srun {
        nodes: number("nodes"),
        tasks_per_node: number("ntasks-per-node"),
    };
    let start = script
        .find("TRAIN_ARGS=(")
        .expect("a TRAIN_ARGS=( ... ) array");
    let body = &script[start + "TRAIN_ARGS=(".len()..];
    let end = body
        .find("\n)")
        .expect("TRAIN_ARGS closes with `)` on its own line");
    let args = shell_words(&body[..end]);
    // Both srun lines run trm from the image with exactly these arguments.
    let runs: Vec<&str> = script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("/usr/local/bin/trm train"))
        .collect();
    assert_eq!(runs.len(), 2, "dry run + training: {runs:?}");
    for l in &runs {
        assert!(
            l.contains("\"${SRUN[@]}\"") && l.contains("\"${TRAIN_ARGS[@]}\""),
            "{l}"
        );
    }
    assert!(runs[0].contains("--dry-run") && !runs[1].contains("--dry-run"));
    assert!(
        script.contains("#SBATCH --requeue"),
        "requeue after preemption"
    );
    assert!(
        script.contains("srun\n  --kill-on-bad-exit=1"),
        "one dead task ends the step"
    );
    Launch {
        origin: SBATCH.into(),
        launcher,
        args,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A torchrun option, as `--name=value` or `--name value`.
fn torchrun_option(args: &[String], name: &str) -> Option<String> {
    let flag = format!("--{name}");
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&eq)
            .map(str::to_string)
            .or_else(|| (a == &flag).then(|| args.get(i + 1).cloned()).flatten())
    })
}

/// Every document of a YAML file.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// The Job of a manifest: its launch, after checking what every training
/// pod needs (8 GPUs, the two volumes, a memory-backed /dev/shm).
fn k8s_launch(file: &str) -> Launch {
    let docs = yaml_documents(&Path::new(DEPLOY).join(file));
    let job = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Job"))
        .unwrap_or_else(|| panic!("{file}: no Job"));
    let pod = &job["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1, "{file}: one container per pod");
    let c = &containers[0];
    assert_eq!(
        c["resources"]["limits"]["nvidia.com/gpu"].as_u64(),
        Some(8),
        "{file}"
    );
    let claims: Vec<&str> = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .collect();
    assert_eq!(claims, ["trm-data", "trm-checkpoints"], "{file}");
    let shm = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["emptyDir"]["medium"].as_str() == Some("Memory"))
        .and_then(|v| v["name"].as_str())
        .unwrap_or_else(|| panic!("{file}: no memory-backed volume"));
    let mounted_at = |name: &str| {
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str() == Some(name))
            .and_then(|m| m["mountPath"].as_str())
            .map(str::to_string)
    };
    assert_eq!(mounted_at(shm).as_deref(), Some("/dev/shm"), "{file}");

    let mut command = strings(&c["command"]);
    command.extend(strings(&c["args"]));
    assert_eq!(
        command.first().map(String::as_str),
        Some("torchrun"),
        "{file}"
    );
    let trm = command
        .iter()
        .position(|w| w == "trm" || w.ends_with("/trm"))
        .unwrap_or_else(|| panic!("{file}: no trm in {command:?}"));
    let (torchrun, rest) = command.split_at(trm);
    assert!(torchrun.contains(&"--no-python".to_string()), "{file}");
    assert_eq!(rest.get(1).map(String::as_str), Some("train"), "{file}");
    let nodes: usize = torchrun_option(torchrun, "nnodes")
        .unwrap_or_else(|| "1".into())
        .parse()
        .unwrap();
    if job["spec"]["completionMode"].as_str() == Some("Indexed") {
        // One pod per node.
        assert_eq!(
            job["spec"]["completions"].as_u64(),
            Some(nodes as u64),
            "{file}"
        );
        assert_eq!(
            job["spec"]["parallelism"].as_u64(),
            Some(nodes as u64),
            "{file}"
        );
    } else {
        assert_eq!(nodes, 1, "{file}: several nodes need an Indexed Job");
    }
    let procs_per_node = torchrun_option(torchrun, "nproc-per-node")
        .expect("--nproc-per-node")
        .parse()
        .unwrap();
    // torchrun's rule: the workers share the agent's store (which listens
    // on MASTER_PORT) unless the rendezvous is c10d with sharing turned off.
    let c10d = torchrun.contains(&"--standalone".to_string())
        || torchrun_option(torchrun, "rdzv-backend").as_deref() == Some("c10d");
    let sharing_off = c["env"].as_sequence().is_some_and(|env| {
        env.iter().any(|e| {
            e["name"].as_str() == Some("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
                && e["value"].as_str() == Some("1")
        })
    });
    Launch {
        origin: file.into(),
        launcher: Launcher::Torchrun {
            nodes,
            procs_per_node,
            agent_store: !(c10d && sharing_off),
            run_id: torchrun_option(torchrun, "rdzv-id").unwrap_or_else(|| "standalone".into()),
        },
        args: rest[2..].to_vec(),
    }
}

fn all_launches() -> Vec<Launch> {
    let mut v = vec![sbatch_launch()];
    v.extend(K8S_JOBS.iter().map(|f| k8s_launch(f)));
    v
}

/// The test's folders for the container paths /data and /checkpoints.
struct Volumes {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    checkpoints: PathBuf,
}

fn volumes() -> Volumes {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let checkpoints = tmp.path().join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    // The name the deploy files use, built small.
    common::synthetic_dataset(&data, "arc2concept-aug-1000", 4, 1, 2, (1, 42));
    Volumes {
        _tmp: tmp,
        data,
        checkpoints,
    }
}

/// `args` with the container's paths moved into `v` and cuda swapped for cpu.
fn remap(args: &[String], v: &Volumes) -> Vec<String> {
    let data = format!("{}/", v.data.display());
    let ckpt = format!("{}/", v.checkpoints.display());
    let mut out: Vec<String> = args
        .iter()
        .map(|a| a.replace("/data/", &data).replace("/checkpoints/", &ckpt))
        .collect();
    if let Some(i) = out.iter().position(|a| a == "--device") {
        assert_eq!(out[i + 1], "cuda", "the deploy files run on GPUs");
        out[i + 1] = "cpu".into();
    }
    out
}

fn dry_run(launch: &Launch, rank: usize, v: &Volumes) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trm"));
    cmd.env_clear()
        .envs(launch.launcher.env_for(rank))
        .current_dir(&v.checkpoints)
        .arg("train")
        .arg("--dry-run")
        .args(remap(&launch.args, v));
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every launch of deploy/, as its first and last rank would start it.
#[test]
fn every_deploy_launch_passes_the_dry_run() {
    let v = volumes();
    let launches = all_launches();
    assert_eq!(launches.len(), 3);
    for launch in &launches {
        let world = launch.launcher.world_size();
        assert!(world >= 8, "{}: {world} ranks", launch.origin);
        assert!(
            launch
                .args
                .windows(2)
                .any(|w| w == ["--resume", "latest-if-any"]),
            "{}: restarts must resume: {:?}",
            launch.origin,
            launch.args
        );
        for rank in [0, world - 1] {
            let o = dry_run(launch, rank, &v);
            let t = text(&o);
            assert!(o.status.success(), "{} rank {rank}: {t}", launch.origin);
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                stdout.contains(&format!("rank {rank} of {world} (local {} of", rank % 8)),
                "{t}"
            );
            assert!(
                stdout.contains(&format!(
                    "batch: global 768 = {world} rank(s) x {} per rank",
                    768 / world
                )),
                "{t}"
            );
            assert!(stdout.contains("start: fresh\n"), "{t}");
            assert!(stdout.contains("dry run passed"), "{t}");
        }
    }
    // Nothing was created: the run folder appears with the real run only.
    let left: Vec<_> = std::fs::read_dir(&v.checkpoints).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bad_launches_are_refused() {
    let v = volumes();
    let one_node = k8s_launch(K8S_JOBS[0]);
    let refused = |launch: &Launch, rank: usize, needle: &str| {
        let o = dry_run(launch, rank, &v);
        let t = text(&o);
        assert!(!o.status.success(), "{}: accepted: {t}", launch.origin);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("dry run: this launch would fail"), "{t}");
        assert!(stderr.contains(needle), "wanted `{needle}`: {t}");
    };

    // A misspelt key.
    let mut typo = one_node.clone();
    typo.args.push("arch.hiden_size=256".into());
    refused(&typo, 0, "hiden_size");

    // 5 nodes x 8 = 40 ranks do not split a batch of 768.
    let mut five = sbatch_launch();
    five.launcher = Launcher::Srun {
        nodes: 5,
        tasks_per_node: 8,
    };
    refused(
        &five,
        39,
        "global_batch_size 768 is not divisible by the 40 ranks",
    );

    // torchrun's shared store on MASTER_PORT (no TORCH_DISABLE_SHARE_RDZV_TCP_STORE):
    // accepted, rank 0 serving trm's rendezvous on the next port.
    let mut shared = one_node.clone();
    if let Launcher::Torchrun { agent_store, .. } = &mut shared.launcher {
        *agent_store = true;
    }
    let o = dry_run(&shared, 3, &v);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(":41978"), "{}", text(&o));

    // A strict `--resume latest` with no checkpoint yet.
    let mut strict = one_node.clone();
    let i = strict
        .args
        .iter()
        .position(|a| a == "latest-if-any")
        .unwrap();
    strict.args[i] = "latest".into();
    refused(&strict, 0, "no checkpoint");

    // A dataset that is not there.
    let mut no_data = one_node;
    for a in &mut no_data.args {
        *a = a.replace("arc2concept-aug-1000", "arc2-missing");
    }
    refused(&no_data, 0, "arc2-missing");
}

const TINY: [&str; 7] = [
    "arch.hidden_size=16",
    "arch.L_layers=1",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "global_batch_size=8",
    "epochs=2",
    "eval_interval=2",
];

fn trm_train(dir: &Path, data: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trm"))
        .current_dir(dir)
        .args(["train", "--config", "cpu-tiny", "--resume", "latest-if-any"])
        .args(extra)
        .arg(format!("data_paths=[{}]", data.display()))
        .args(TINY)
        .arg("checkpoint_path=run")
        .output()
        .unwrap()
}

/// The deploy files' restart rule on a real run: the first start finds no
/// checkpoint and starts fresh, the dry run then sees the checkpoint, and a
/// restart continues it instead of refusing the folder.
#[test]
fn latest_if_any_starts_then_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_dataset(tmp.path(), "data", 4, 1, 2, (1, 42));
    let first = trm_train(tmp.path(), &data, &[]);
    assert!(first.status.success(), "{}", text(&first));
    let run = tmp.path().join("run");
    let latest = trm::checkpoint::latest(&run)
        .unwrap()
        .expect("a checkpoint");
    let step = trm::checkpoint::read_manifest(&latest).unwrap().step;
    assert!(step > 0);
    // As trm names it: under the run folder as configured (relative).
    let ckpt = Path::new("run").join(format!("step_{step}"));

    let dry = trm_train(tmp.path(), &data, &["--dry-run"]);
    let t = text(&dry);
    assert!(dry.status.success(), "{t}");
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains(&format!(
            "start: resume from {} at step {step} (files verified)",
            ckpt.display()
        )),
        "{t}"
    );

    let again = trm_train(tmp.path(), &data, &[]);
    let t = text(&again);
    assert!(again.status.success(), "{t}");
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains(&format!("resumed from {} at step {step}", ckpt.display())),
        "{t}"
    );
}

/// A first attempt that died before its first checkpoint leaves logs; the
/// restart moves them aside (never deletes) and starts fresh.
#[test]
fn latest_if_any_moves_a_run_without_checkpoints_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_dataset(tmp.path(), "data", 4, 1, 2, (1, 42));
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();

    let dry = trm_train(tmp.path(), &data, &["--dry-run"]);
    let t = text(&dry);
    assert!(dry.status.success(), "{t}");
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("would be moved aside"),
        "{t}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        "{\"step\": 1}\n",
        "the dry run changed the folder"
    );
    // A plain fresh start is still refused on that folder.
    let plain = Command::new(env!("CARGO_BIN_EXE_trm"))
        .current_dir(tmp.path())
        .args(["train", "--dry-run", "--config", "cpu-tiny"])
        .arg(format!("data_paths=[{}]", data.display()))
        .args(TINY)
        .arg("checkpoint_path=run")
        .output()
        .unwrap();
    assert!(!plain.status.success(), "{}", text(&plain));
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("already holds a run"),
        "{}",
        text(&plain)
    );

    let o = trm_train(tmp.path(), &data, &["--quiet"]);
    assert!(o.status.success(), "{}", text(&o));
    let aside = tmp.path().join("run.previous-1");
    assert_eq!(
        std::fs::read_to_string(aside.join("metrics.jsonl")).unwrap(),
        "{\"step\": 1}\n"
    );
    assert!(trm::checkpoint::latest(&run).unwrap().is_some());
}

#[test]
fn shell_words_follow_the_shell() {
    let w = shell_words(
        "  --config cfg_pretrain # a comment\n  'data_paths=[/data/x]' \\\n  \"a b\"c d\\ e\n",
    );
    assert_eq!(
        w,
        [
            "--config",
            "cfg_pretrain",
            "data_paths=[/data/x]",
            "a bc",
            "d e"
        ]
    );
}
