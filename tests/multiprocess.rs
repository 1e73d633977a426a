//! `trm train` as N real processes on localhost, each started with the
//! variables `torchrun --no-python --nproc-per-node N trm train ...` sets
//! (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
//! TORCHELASTIC_RUN_ID), training the CPU engine over the TCP collective:
//! the same weights as one rank, resume, the rendezvous, and ranks that die.
//!
//! Every child is killed when its test ends, passing or failing
//! ([`Ranks`]'s drop), and every wait has a deadline, so nothing hangs CI.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use trm::checkpoint;

mod common;

/// How long a rank waits for the others (TRM_RENDEZVOUS_TIMEOUT_S) where
/// nothing is meant to fail: generous, so a loaded CI machine never trips it.
const RELAXED_S: f64 = 30.0;

/// Variables a launcher may have left in the test's own environment
/// (a CI job under SLURM): children see only what each test sets.
const LAUNCHER_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TRM_JOB_ID",
    "TRM_RENDEZVOUS_TIMEOUT_S",
    "TRM_STEP_PAUSE_MS",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "CUDA_VISIBLE_DEVICES",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A dataset small enough that a run takes a second or two.
fn dataset(root: &Path) -> PathBuf {
    common::synthetic_dataset(root, "data", 6, 2, 3, (3, 5))
}

/// Three ACT steps per sample: a checkpoint holds samples in flight, whose
/// carry rows every rank must get back on resume.
const RESUME_HALT_MAX_STEPS: &str = "arch.halt_max_steps=3";

/// The run's config as overrides: a tiny model, 12 examples per step (so 1,
/// 2 and 3 ranks split it evenly), an evaluation and a checkpoint every 2
/// epochs, one worker thread per process (three processes share the CI's
/// cores).
fn run_args(data: &Path, run: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--config",
        "cpu-tiny",
        "--device",
        "cpu",
        "arch.hidden_size=16",
        "arch.num_heads=2",
        "arch.L_layers=1",
        "arch.H_cycles=2",
        "arch.L_cycles=1",
        "arch.halt_max_steps=3",
        // Exploration on: its draws are keyed by the global sample slot, so
        // N ranks explore like 1 rank (tests/world_size.rs makes samples
        // halt early, where the draws matter).
        "arch.halt_exploration_prob=0.5",
        "global_batch_size=12",
        "epochs=4",
        "eval_interval=2",
        "lr_warmup_steps=2",
        "checkpoint_keep_last=0",
        "threads=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("data_paths=[{}]", data.display()));
    a.push(format!("checkpoint_path={}", run.display()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// How one process ended.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status.success()
    }
}

/// The processes of one test: killed (SIGKILL) and reaped on drop, so a
/// failing assertion never leaves a rank running.
struct Ranks {
    logs: PathBuf,
    children: Vec<(String, Option<Child>)>,
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// One `trm` process as a launcher would start it.
struct Rank<'a> {
    rank: usize,
    world: usize,
    port: u16,
    job: &'a str,
    timeout_s: f64,
    args: Vec<String>,
    env: Vec<(&'a str, String)>,
}

impl<'a> Rank<'a> {
    fn new(rank: usize, world: usize, port: u16, job: &'a str, args: Vec<String>) -> Rank<'a> {
        Rank {
            rank,
            world,
            port,
            job,
            timeout_s: RELAXED_S,
            args,
            env: Vec::new(),
        }
    }
}

impl Ranks {
    fn new(logs: &Path) -> Ranks {
        std::fs::create_dir_all(logs).unwrap();
        Ranks {
            logs: logs.to_path_buf(),
            children: Vec::new(),
        }
    }

    /// Starts `r`, with stdout and stderr going to files named `name`
    /// (pipes could fill up and block a rank nobody reads yet). Returns its
    /// index for [`Ranks::wait`].
    fn start(&mut self, name: &str, r: Rank) -> usize {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trm"));
        for v in LAUNCHER_VARS {
            cmd.env_remove(v);
        }
        // What torchrun exports for a world on one node.
        cmd.env("RANK", r.rank.to_string())
            .env("WORLD_SIZE", r.world.to_string())
            .env("LOCAL_RANK", r.rank.to_string())
            .env("LOCAL_WORLD_SIZE", r.world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", r.port.to_string())
            .env("TORCHELASTIC_RUN_ID", r.job)
            .env("TRM_RENDEZVOUS_TIMEOUT_S", r.timeout_s.to_string());
        for (k, v) in &r.env {
            cmd.env(k, v);
        }
        let out = File::create(self.logs.join(format!("{name}.out"))).unwrap();
        let err = File::create(self.logs.join(format!("{name}.err"))).unwrap();
        let child = cmd
            .args(&r.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        self.children.push((name.to_string(), Some(child)));
        self.children.len() - 1
    }

    /// Starts every rank of a world with the same arguments and returns
    /// their indices in rank order.
    fn start_world(&mut self, label: &str, world: usize, job: &str, args: &[String]) -> Vec<usize> {
        let port = free_port();
        (0..world)
            .map(|r| {
                let name = format!("{label}-rank{r}");
                self.start(&name, Rank::new(r, world, port, job, args.to_vec()))
            })
            .collect()
    }

    /// Waits for process `i` until `deadline`; the test fails (and every
    /// process is killed) if it has not exited by then.
    fn wait(&mut self, i: usize, deadline: Instant) -> Outcome {
        let (name, slot) = &mut self.children[i];
        let child = slot.as_mut().expect("waited for twice");
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let err = std::fs::read_to_string(self.logs.join(format!("{name}.err")));
                panic!("{name} still runs at its deadline; stderr so far:\n{err:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        *slot = None;
        let read = |ext: &str| {
            std::fs::read_to_string(self.logs.join(format!("{name}.{ext}"))).unwrap_or_default()
        };
        Outcome {
            status,
            stdout: read("out"),
            stderr: read("err"),
        }
    }

    fn wait_all(&mut self, ids: &[usize], deadline: Instant) -> Vec<Outcome> {
        ids.iter().map(|&i| self.wait(i, deadline)).collect()
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].1.as_ref().unwrap().id()
    }

    /// SIGKILL, as the OOM killer or a lost node would.
    fn kill(&mut self, i: usize) {
        let (_, slot) = &mut self.children[i];
        let mut c = slot.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

fn within(secs: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(secs)
}

fn assert_all_ok(outs: &[Outcome]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(o.ok(), "rank {r} failed ({}):\n{}", o.status, o.stderr);
        assert!(!o.stderr.contains("panicked"), "rank {r}: {}", o.stderr);
    }
}

/// The newest checkpoint of a run folder.
fn last_checkpoint(run: &Path) -> PathBuf {
    checkpoint::latest(run)
        .unwrap()
        .unwrap_or_else(|| panic!("no checkpoint in {}", run.display()))
}

/// Every weight (dense and puzzle embedding) of a checkpoint by name.
fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let c = checkpoint::load(dir).unwrap();
    c.model
        .into_iter()
        .chain(c.puzzle_emb)
        .map(|(k, t)| (k, t.data))
        .collect()
}

/// The largest difference between two runs' weights, relative to the
/// largest weight of the same tensor.
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(
        wa.iter().map(|w| &w.0).collect::<Vec<_>>(),
        wb.iter().map(|w| &w.0).collect::<Vec<_>>()
    );
    let mut worst = 0.0f64;
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        assert_eq!(x.len(), y.len(), "{name}");
        let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12) as f64;
        for (p, q) in x.iter().zip(y) {
            assert!(p.is_finite() && q.is_finite(), "{name}");
            worst = worst.max((p - q).abs() as f64 / scale);
        }
    }
    worst
}

/// 2 and 3 ranks train the same weights as 1 rank at the same global
/// batch, up to the order of float sums; rank 0 alone writes and prints.
#[test]
fn ranks_train_like_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut ranks = Ranks::new(&tmp.path().join("logs"));

    // One rank (`torchrun --nproc-per-node 1`): the reference.
    let one = tmp.path().join("one");
    let i = ranks.start(
        "one",
        Rank::new(0, 1, free_port(), "one", run_args(&data, &one, &[])),
    );
    assert_all_ok(&[ranks.wait(i, within(120.0))]);
    let reference = last_checkpoint(&one);

    for world in [2, 3] {
        let run = tmp.path().join(format!("world{world}"));
        let port = free_port();
        let job = format!("job-{world}");
        let ids: Vec<usize> = (0..world)
            .map(|r| {
                // Ranks above 0 get a folder of their own: if they wrote
                // anything in their run folder, it would exist afterwards.
                let folder = match r {
                    0 => run.clone(),
                    _ => tmp.path().join(format!("world{world}-rank{r}-folder")),
                };
                let args = run_args(&data, &folder, &[]);
                ranks.start(
                    &format!("w{world}-rank{r}"),
                    Rank::new(r, world, port, &job, args),
                )
            })
            .collect();
        let outs = ranks.wait_all(&ids, within(120.0));
        assert_all_ok(&outs);

        let lead = &outs[0];
        let line = format!(
            "world: rank 0 of {world} (local 0 of {world}) via torchrun, rendezvous at \
             127.0.0.1:{port}, job {job}"
        );
        assert!(lead.stderr.contains(&line), "{}", lead.stderr);
        assert_eq!(lead.stderr.matches("world:").count(), 1);
        assert!(lead.stdout.contains("trained"), "{}", lead.stdout);
        for (r, o) in outs.iter().enumerate().skip(1) {
            assert!(
                o.stdout.is_empty() && o.stderr.is_empty(),
                "rank {r} printed:\n{}\n{}",
                o.stdout,
                o.stderr
            );
            let folder = tmp.path().join(format!("world{world}-rank{r}-folder"));
            assert!(!folder.exists(), "rank {r} wrote {}", folder.display());
        }
        // Rank 0 wrote the whole run folder.
        for f in ["all_config.yaml", "metrics.jsonl"] {
            assert!(run.join(f).is_file(), "{f}");
        }
        let evaluations = std::fs::read_dir(&run)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("evaluator_ARC_step_")
            })
            .count();
        assert_eq!(evaluations, 2, "an ARC evaluation every 2 of 4 epochs");

        let got = last_checkpoint(&run);
        assert_eq!(got.file_name(), reference.file_name(), "same step count");
        // Float sums in another order (per rank, then over ranks) round
        // differently: ~1e-7 relative per sum, carried through 8 steps
        // (measured: 2e-7 for 2 ranks, 3e-7 for 3). One optimiser step moves
        // a weight by up to ~2 lr = 2e-3 of its scale (AdamATan2's bound),
        // so 1e-5 is far above the rounding and far below any real
        // difference: a rank on the wrong shard, a lost gradient.
        let diff = max_relative_difference(&reference, &got);
        assert!(
            diff < 1e-5,
            "{world} ranks vs 1: relative difference {diff:e}"
        );
    }
}

/// Checkpoint files that must come back bit for bit after a resume.
const STATE_FILES: [&str; 3] = [
    "model.safetensors",
    "optim.safetensors",
    "puzzle_emb.safetensors",
];

/// A 2-rank run's checkpoint resumed by 2 ranks continues exactly like the
/// uninterrupted 2-rank run (same ranks, same sums: the same bits).
#[test]
fn two_ranks_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut ranks = Ranks::new(&tmp.path().join("logs"));
    let extra = ["eval_interval=1", RESUME_HALT_MAX_STEPS];
    let whole = tmp.path().join("whole");
    let ids = ranks.start_world("whole", 2, "whole", &run_args(&data, &whole, &extra));
    assert_all_ok(&ranks.wait_all(&ids, within(120.0)));
    let mid = whole.join("step_4");
    assert!(mid.is_dir(), "a checkpoint per epoch");

    let resumed = tmp.path().join("resumed");
    let mut args = run_args(&data, &resumed, &extra);
    args.extend(["--resume".into(), mid.display().to_string()]);
    let ids = ranks.start_world("resumed", 2, "resumed", &args);
    let outs = ranks.wait_all(&ids, within(120.0));
    assert_all_ok(&outs);
    assert!(
        outs[0].stderr.contains("resumed from") && outs[0].stderr.contains("at step 4"),
        "{}",
        outs[0].stderr
    );

    let (a, b) = (last_checkpoint(&whole), last_checkpoint(&resumed));
    assert_eq!(a.file_name(), b.file_name());
    for f in STATE_FILES {
        let same = std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap();
        assert!(same, "{f} differs after the resume");
    }

    // Ranks that load different checkpoints (a copy of the folder out of
    // date on one node) stop, all of them, before training.
    let port = free_port();
    let ids: Vec<usize> = [whole.join("step_4"), whole.join("step_2")]
        .iter()
        .enumerate()
        .map(|(r, ckpt)| {
            let mut args = run_args(&data, &tmp.path().join("mixed"), &extra);
            args.extend(["--resume".into(), ckpt.display().to_string()]);
            ranks.start(
                &format!("mixed-rank{r}"),
                Rank::new(r, 2, port, "mixed", args),
            )
        })
        .collect();
    for (r, o) in ranks.wait_all(&ids, within(60.0)).iter().enumerate() {
        assert!(
            !o.ok(),
            "rank {r} resumed from a checkpoint the other rank lacks"
        );
        let want = "rank 1 loaded";
        assert!(
            o.stderr.contains(want) && o.stderr.contains("step_2") && o.stderr.contains("same one"),
            "rank {r}: {}",
            o.stderr
        );
        assert!(
            o.stderr.contains(&format!("error: rank {r} of 2: ")),
            "{}",
            o.stderr
        );
    }
}

/// A short run for the tests where the rendezvous, not training, matters.
fn short_args(data: &Path, run: &Path) -> Vec<String> {
    run_args(data, run, &["epochs=2"])
}

/// The rendezvous between real processes: a late rank still joins; a
/// missing rank makes the others fail within the timeout, naming the
/// address or the absent rank; a rank of another job is refused; a broken
/// environment is an error naming the variable.
#[test]
fn rendezvous_between_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut ranks = Ranks::new(&tmp.path().join("logs"));

    // Rank 1 starts 1.5 s after rank 0: rank 0 waits for it.
    let port = free_port();
    let args = short_args(&data, &tmp.path().join("late"));
    let lead = ranks.start("late-rank0", Rank::new(0, 2, port, "late", args.clone()));
    std::thread::sleep(Duration::from_millis(1500));
    let late = ranks.start("late-rank1", Rank::new(1, 2, port, "late", args));
    assert_all_ok(&ranks.wait_all(&[lead, late], within(120.0)));

    const SHORT_S: f64 = 2.0;
    // Rank 0 never comes: rank 1 gives up after the timeout, naming where
    // it looked.
    let port = free_port();
    let mut alone = Rank::new(
        1,
        2,
        port,
        "no-lead",
        short_args(&data, &tmp.path().join("x")),
    );
    alone.timeout_s = SHORT_S;
    let t = Instant::now();
    let i = ranks.start("no-lead-rank1", alone);
    let o = ranks.wait(i, within(SHORT_S + 20.0));
    let secs = t.elapsed().as_secs_f64();
    assert!(!o.ok());
    assert!(
        secs >= SHORT_S,
        "gave up after {secs:.1} s, before the timeout"
    );
    let want = format!("rank 1 could not reach rank 0 at 127.0.0.1:{port} within 2.0 s");
    assert!(o.stderr.contains(&want), "{}", o.stderr);
    assert!(
        o.stderr.contains("TRM_RENDEZVOUS_TIMEOUT_S"),
        "{}",
        o.stderr
    );

    // Rank 1 never comes: rank 0 names it.
    let port = free_port();
    let mut alone = Rank::new(
        0,
        2,
        port,
        "no-member",
        short_args(&data, &tmp.path().join("y")),
    );
    alone.timeout_s = SHORT_S;
    let i = ranks.start("no-member-rank0", alone);
    let o = ranks.wait(i, within(SHORT_S + 20.0));
    assert!(!o.ok());
    let want = format!("rank(s) [1] of 2 never reached rank 0 on port {port} within 2.0 s");
    assert!(o.stderr.contains(&want), "{}", o.stderr);

    // A rank of another job on the same port is refused and told why; rank
    // 0 keeps waiting for its own and reports the stranger.
    let port = free_port();
    let run = tmp.path().join("z");
    let mut lead = Rank::new(0, 2, port, "job-a", short_args(&data, &run));
    lead.timeout_s = SHORT_S;
    let mut stranger = Rank::new(1, 2, port, "job-b", short_args(&data, &run));
    stranger.timeout_s = SHORT_S;
    let lead = ranks.start("job-a-rank0", lead);
    let stranger = ranks.start("job-b-rank1", stranger);
    let outs = ranks.wait_all(&[lead, stranger], within(SHORT_S + 20.0));
    assert!(!outs[1].ok());
    let want = format!("rank 0 at 127.0.0.1:{port} refused rank 1");
    assert!(outs[1].stderr.contains(&want), "{}", outs[1].stderr);
    assert!(outs[1].stderr.contains("\"job-b\""), "{}", outs[1].stderr);
    assert!(!outs[0].ok());
    assert!(
        outs[0].stderr.contains("never reached rank 0"),
        "{}",
        outs[0].stderr
    );
    assert!(
        outs[0].stderr.contains("turned away meanwhile"),
        "{}",
        outs[0].stderr
    );

    // What the launcher exported is checked before any work.
    let bad = Rank::new(2, 2, free_port(), "bad", short_args(&data, &run));
    let i = ranks.start("bad-rank", bad);
    let o = ranks.wait(i, within(20.0));
    assert!(!o.ok());
    assert!(
        o.stderr.contains("RANK=2 must be below WORLD_SIZE=2"),
        "{}",
        o.stderr
    );
    let mut bad = Rank::new(0, 2, free_port(), "bad", short_args(&data, &run));
    bad.env.push(("TRM_RENDEZVOUS_TIMEOUT_S", "soon".into()));
    let i = ranks.start("bad-timeout", bad);
    let o = ranks.wait(i, within(20.0));
    assert!(!o.ok());
    assert!(
        o.stderr.contains("TRM_RENDEZVOUS_TIMEOUT_S=\"soon\""),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

/// Waits until the run folder holds a complete checkpoint.
fn wait_for_checkpoint(run: &Path, deadline: Instant) -> PathBuf {
    loop {
        if let Ok(Some(p)) = checkpoint::latest(run) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint in {}",
            run.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Training slowed to ~0.1 s a step, so a rank can be stopped mid-run.
fn slow_world<'a>(
    world: usize,
    port: u16,
    job: &'a str,
    timeout_s: f64,
    args: &[String],
) -> Vec<Rank<'a>> {
    (0..world)
        .map(|r| {
            let mut rank = Rank::new(r, world, port, job, args.to_vec());
            rank.timeout_s = timeout_s;
            rank.env.push(("TRM_STEP_PAUSE_MS", "100".into()));
            rank
        })
        .collect()
}

/// A rank killed mid-run (SIGKILL: the OOM killer, a lost node): the others
/// exit non-zero with the collective error, well within the timeout, and
/// the last checkpoint verifies and loads.
#[test]
fn a_killed_rank_stops_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut ranks = Ranks::new(&tmp.path().join("logs"));
    const TIMEOUT_S: f64 = 10.0;
    // (world, the rank killed): a member, then rank 0 itself (perhaps
    // while it writes a checkpoint).
    for (world, victim) in [(3, 1), (2, 0)] {
        let run = tmp.path().join(format!("kill-{world}-{victim}"));
        let args = run_args(&data, &run, &["epochs=8", "eval_interval=1"]);
        let job = format!("kill-{world}-{victim}");
        let port = free_port();
        let ids: Vec<usize> = slow_world(world, port, &job, TIMEOUT_S, &args)
            .into_iter()
            .enumerate()
            .map(|(r, rank)| ranks.start(&format!("{job}-rank{r}"), rank))
            .collect();
        wait_for_checkpoint(&run, within(120.0));
        std::thread::sleep(Duration::from_millis(250));
        let killed_at = Instant::now();
        ranks.kill(ids[victim]);
        for (r, &i) in ids.iter().enumerate().filter(|(r, _)| *r != victim) {
            let o = ranks.wait(i, within(TIMEOUT_S + 20.0));
            let secs = killed_at.elapsed().as_secs_f64();
            assert!(
                !o.ok(),
                "rank {r} of {world} ended well after rank {victim} died"
            );
            assert!(secs < TIMEOUT_S, "rank {r} took {secs:.1} s to notice");
            let err = &o.stderr;
            assert!(
                err.contains(&format!("on rank {r} of {world} failed")),
                "{err}"
            );
            assert!(err.contains(&format!("rank {victim}")), "{err}");
            assert!(err.contains("closed the connection"), "{err}");
            assert!(!err.contains("panicked"), "{err}");
        }
        let last = last_checkpoint(&run);
        checkpoint::verify(&last).unwrap();
        checkpoint::load(&last).unwrap();
    }
}

/// A rank that hangs (stopped, as a stuck driver call would leave it): the
/// others give up when the timeout passes, naming it.
#[test]
fn a_hung_rank_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut ranks = Ranks::new(&tmp.path().join("logs"));
    // Short, but far above a tiny step: nothing else comes near it.
    const TIMEOUT_S: f64 = 4.0;
    let run = tmp.path().join("hang");
    let args = run_args(&data, &run, &["epochs=8", "eval_interval=1"]);
    let ids: Vec<usize> = slow_world(2, free_port(), "hang", TIMEOUT_S, &args)
        .into_iter()
        .enumerate()
        .map(|(r, rank)| ranks.start(&format!("hang-rank{r}"), rank))
        .collect();
    wait_for_checkpoint(&run, within(120.0));
    let stopped_at = Instant::now();
    // SAFETY: a plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(ranks.pid(ids[1]) as libc::pid_t, libc::SIGSTOP) };
    assert_eq!(rc, 0);
    let o = ranks.wait(ids[0], within(TIMEOUT_S + 20.0));
    let secs = stopped_at.elapsed().as_secs_f64();
    assert!(!o.ok());
    assert!(secs < TIMEOUT_S + 5.0, "rank 0 took {secs:.1} s");
    let err = &o.stderr;
    assert!(err.contains("on rank 0 of 2 failed"), "{err}");
    assert!(
        err.contains("rank 1 sent nothing more before the deadline"),
        "{err}"
    );
    checkpoint::verify(&last_checkpoint(&run)).unwrap();
    // The stopped rank is killed by `ranks` on drop.
}

/// A rank that fails on its own (here: its data is missing) makes the
/// others fail at their next exchange, not wait for it forever.
#[test]
fn a_failing_rank_stops_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut ranks = Ranks::new(&tmp.path().join("logs"));
    let run = tmp.path().join("run");
    let port = free_port();
    let lead = ranks.start(
        "rank0",
        Rank::new(0, 2, port, "fail", short_args(&data, &run)),
    );
    let missing = tmp.path().join("no-such-data");
    let member = ranks.start(
        "rank1",
        Rank::new(1, 2, port, "fail", short_args(&missing, &run)),
    );
    let outs = ranks.wait_all(&[lead, member], within(RELAXED_S));
    assert!(!outs[1].ok());
    assert!(
        outs[1].stderr.contains("no-such-data"),
        "{}",
        outs[1].stderr
    );
    assert!(!outs[0].ok());
    let err = &outs[0].stderr;
    assert!(
        err.contains("on rank 0 of 2 failed: rank 1 closed the connection"),
        "{err}"
    );
}

/// SIGTERM to one rank (a scheduler preempting a node): every rank stops
/// after the same step, rank 0 checkpoints it, all exit with
/// EXIT_PREEMPTED, and `--resume latest` ends where the uninterrupted run
/// ends, bit for bit.
#[test]
fn a_signal_to_one_rank_checkpoints_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut ranks = Ranks::new(&tmp.path().join("logs"));
    let extra = ["epochs=8", "eval_interval=1"];
    let whole = tmp.path().join("whole");
    let ids = ranks.start_world("whole", 2, "sig-whole", &run_args(&data, &whole, &extra));
    assert_all_ok(&ranks.wait_all(&ids, within(120.0)));

    let run = tmp.path().join("signalled");
    let args = run_args(&data, &run, &extra);
    let ids: Vec<usize> = slow_world(2, free_port(), "sig", 30.0, &args)
        .into_iter()
        .enumerate()
        .map(|(r, rank)| ranks.start(&format!("sig-rank{r}"), rank))
        .collect();
    let first = wait_for_checkpoint(&run, within(120.0));
    std::thread::sleep(Duration::from_millis(150));
    // SAFETY: a plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(ranks.pid(ids[1]) as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let outs = ranks.wait_all(&ids, within(60.0));
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(
            o.status.code(),
            Some(trm::signals::EXIT_PREEMPTED as i32),
            "rank {r}: {}",
            o.stderr
        );
    }
    assert!(
        outs[0].stderr.contains("stopped by SIGTERM"),
        "{}",
        outs[0].stderr
    );
    let stopped = last_checkpoint(&run);
    assert_ne!(stopped, first, "no checkpoint at the signal");
    checkpoint::verify(&stopped).unwrap();

    let mut args = run_args(&data, &run, &extra);
    args.extend(["--resume".into(), "latest".into()]);
    let ids = ranks.start_world("sig-resumed", 2, "sig-resumed", &args);
    assert_all_ok(&ranks.wait_all(&ids, within(120.0)));
    let (a, b) = (last_checkpoint(&whole), last_checkpoint(&run));
    assert_eq!(a.file_name(), b.file_name());
    for f in STATE_FILES {
        let same = std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap();
        assert!(same, "{f} differs after the signal and the resume");
    }
}
