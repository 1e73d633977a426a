//! `trm package --bundle`: the bundle runs as an offline notebook runs it.
//!
//! A tiny model is trained on three real ARC-AGI-2 evaluation puzzles (30x30
//! canvas, one epoch) and bundled with this build's `trm`. The bundle is
//! then run in a minimal root holding only the bundle, a challenges file,
//! `/bin/sh` (dash) and the shared libraries `ldd` lists for `trm` and
//! dash, under `unshare -rn chroot` (no network, no host files, no
//! ../shared) with an empty environment, on the CPU. The submission is
//! checked against the Kaggle rules.
//!
//! `TRM_BUNDLE_BINARY=PATH` bundles another build instead (`--binary`),
//! e.g. the glibc 2.17 one of tools/build-portable.sh, to run the same
//! checks on it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;
use trm::bundle::runner::{DEFAULT_CHALLENGES, DEFAULT_OUT};

mod kaggle;
use kaggle::check_kaggle_format;

const ARC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/arc-agi");
/// How many of the smallest ARC-AGI-2 evaluation puzzles the model sees.
const PUZZLES: usize = 3;
/// Where the challenges file and the bundle lie inside the root.
const CHALLENGES_IN_ROOT: &str = "/data/challenges.json";
const BUNDLE_IN_ROOT: &str = "/bundle";

struct Fixture {
    dir: PathBuf,
    checkpoint: PathBuf,
    /// The minimal root; the bundle is at `root/bundle`.
    root: PathBuf,
    challenges: Value,
    /// stdout and stderr of `trm package --bundle`.
    package_stdout: String,
    package_stderr: String,
}

fn trm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trm"))
}

/// The binary the fixture bundles: `$TRM_BUNDLE_BINARY`, else this build.
fn bundled_binary() -> Option<PathBuf> {
    std::env::var_os("TRM_BUNDLE_BINARY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `PUZZLES` smallest evaluation2 puzzles (by JSON size) as an ARC
/// file pair `prefix_evaluation_{challenges,solutions}.json`.
fn write_arc_subset(prefix: &Path) -> Value {
    let chal = read_json(&Path::new(ARC_DIR).join("arc-agi_evaluation2_challenges.json"));
    let sol = read_json(&Path::new(ARC_DIR).join("arc-agi_evaluation2_solutions.json"));
    let mut ids: Vec<&String> = chal.as_object().unwrap().keys().collect();
    ids.sort_by_key(|id| (chal[id.as_str()].to_string().len(), id.to_string()));
    let pick = |all: &Value| {
        Value::Object(
            ids[..PUZZLES]
                .iter()
                .map(|id| ((*id).clone(), all[id.as_str()].clone()))
                .collect(),
        )
    };
    let (c, s) = (pick(&chal), pick(&sol));
    std::fs::create_dir_all(prefix.parent().unwrap()).unwrap();
    let file = |kind: &str| PathBuf::from(format!("{}_evaluation_{kind}.json", prefix.display()));
    std::fs::write(file("challenges"), c.to_string()).unwrap();
    std::fs::write(file("solutions"), s.to_string()).unwrap();
    c
}

/// The shared libraries `ldd` lists for `exe` (the loader included).
fn shared_libraries(exe: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .expect("ldd (from libc-bin) is needed to build the minimal root");
    assert!(
        out.status.success(),
        "ldd {}: {}",
        exe.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Copies `src` to the same absolute path under `root`.
fn copy_into_root(root: &Path, src: &Path, as_path: &Path) {
    let dst = root.join(as_path.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(src, &dst).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
}

/// A program's absolute path: the environment is cleared for the run, so
/// nothing may depend on PATH.
fn tool(name: &str, what: &str) -> PathBuf {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: this test needs it ({what}); install it (Debian: apt-get install {what})")
        })
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bundle-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        let prefix = dir.join("arc").join("eval2");
        let challenges = write_arc_subset(&prefix);
        let opts = trm::demo::DemoOptions {
            out_dir: dir.join("demo"),
            arc: Some((
                prefix.display().to_string(),
                vec!["evaluation".into()],
                "evaluation".into(),
            )),
            num_aug: 1,
            canvas_side: 30,
            seed: 5,
            verbose: false,
            overrides: [
                "epochs=1",
                "eval_interval=1",
                "global_batch_size=8",
                "arch.hidden_size=32",
                "arch.L_layers=1",
                "arch.H_cycles=1",
                "arch.L_cycles=1",
                "arch.halt_max_steps=2",
            ]
            .map(String::from)
            .to_vec(),
            ..trm::demo::DemoOptions::default()
        };
        let s = trm::demo::run(&opts).expect("training the tiny model");
        let checkpoint = s.train.checkpoints.last().expect("a checkpoint").clone();

        let root = dir.join("root");
        let bundle = root.join(BUNDLE_IN_ROOT.trim_start_matches('/'));
        let out = trm()
            .args(["package", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--bundle")
            .arg(&bundle)
            .args(
                bundled_binary()
                    .map(|b| [PathBuf::from("--binary"), b])
                    .into_iter()
                    .flatten(),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "package --bundle: {}",
            text(&out.stderr)
        );

        // The rest of the root: the challenges, the shell, the libraries.
        let chal_path = dir.join("arc").join("eval2_evaluation_challenges.json");
        copy_into_root(&root, &chal_path, Path::new(CHALLENGES_IN_ROOT));
        let dash = tool("dash", "dash");
        copy_into_root(&root, &dash, Path::new("/bin/sh"));
        for exe in [bundle.join("trm"), dash] {
            for lib in shared_libraries(&exe) {
                copy_into_root(&root, &lib, &lib);
            }
        }
        Fixture {
            dir,
            checkpoint,
            root,
            challenges,
            package_stdout: text(&out.stdout),
            package_stderr: text(&out.stderr),
        }
    })
}

/// Runs `/bundle/run ARGS` in the minimal root: its own user and network
/// namespaces, chrooted, with an empty environment.
fn run_in_root(args: &[&str]) -> Output {
    let f = fixture();
    let unshare = tool("unshare", "util-linux");
    let chroot = tool("chroot", "coreutils");
    let out = Command::new(&unshare)
        .env_clear()
        .arg("-rn")
        .arg(&chroot)
        .arg(&f.root)
        .arg(format!("{BUNDLE_IN_ROOT}/run"))
        .args(args)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        !err.contains("unshare failed") && !err.contains("cannot change root"),
        "unshare -rn chroot does not work on this machine (user namespaces needed): {err}"
    );
    out
}

#[test]
fn the_bundle_writes_a_valid_submission_offline() {
    let f = fixture();
    let out = run_in_root(&[
        CHALLENGES_IN_ROOT,
        "/out/submission.json",
        "--device",
        "cpu",
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "the bundle failed: {err}");
    // The runner says what it runs, with the bundled binary's version.
    assert!(err.contains("run: trm "), "{err}");
    let sub = read_json(&f.root.join("out/submission.json"));
    check_kaggle_format(&sub, &f.challenges);
    assert_eq!(sub.as_object().unwrap().len(), PUZZLES);
}

#[test]
fn the_runner_defaults_are_the_competitions_paths_and_documented() {
    let f = fixture();
    let bundle = f.root.join("bundle");
    let guide = std::fs::read_to_string(bundle.join("BUNDLE.md")).unwrap();
    for p in [DEFAULT_CHALLENGES, DEFAULT_OUT] {
        assert!(
            guide.contains(&format!("`{p}`")),
            "BUNDLE.md does not name {p}"
        );
    }
    let manifest = trm::bundle::verify(&bundle).unwrap();
    assert_eq!(manifest.runner.challenges, DEFAULT_CHALLENGES);
    assert_eq!(manifest.runner.out, DEFAULT_OUT);
    // The competition's file name follows the ARC data's own layout.
    assert!(DEFAULT_CHALLENGES.ends_with("/arc-agi_test_challenges.json"));
    assert!(Path::new(ARC_DIR)
        .join("arc-agi_evaluation2_challenges.json")
        .is_file());

    // No paths given: the runner reads and writes the defaults.
    let chal = f.dir.join("arc").join("eval2_evaluation_challenges.json");
    copy_into_root(&f.root, &chal, Path::new(DEFAULT_CHALLENGES));
    let out = run_in_root(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = f.root.join(DEFAULT_OUT.trim_start_matches('/'));
    check_kaggle_format(&read_json(&written), &f.challenges);
}

#[test]
fn bad_challenges_fail_with_a_clear_message_and_trms_status() {
    let f = fixture();
    // A missing file: the runner's own message and usage.
    let out = run_in_root(&["/data/missing.json", "/out/missing.json"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no challenges file at /data/missing.json"),
        "{err}"
    );
    assert!(err.contains("usage:"), "{err}");
    assert!(!f.root.join("out/missing.json").exists());
    // A file that is not ARC JSON: trm's message, trm's exit status.
    std::fs::write(f.root.join("data/broken.json"), b"not json").unwrap();
    let out = run_in_root(&["/data/broken.json", "/out/broken.json"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error:") && err.contains("/data/broken.json"),
        "{err}"
    );
    assert!(!f.root.join("out/broken.json").exists());
}

#[test]
fn the_manifest_describes_every_file_and_the_binarys_needs() {
    let f = fixture();
    let bundle = f.root.join("bundle");
    let m = trm::bundle::verify(&bundle).unwrap();
    let names: BTreeSet<&str> = m.files.keys().map(String::as_str).collect();
    for n in [
        "trm",
        "run",
        "BUNDLE.md",
        "model/model.safetensors",
        "model/config.json",
        "model/identifiers.json",
        "model/manifest.json",
    ] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    assert_eq!(names.len(), 7, "{names:?}");
    for exe in ["trm", "run"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bundle.join(exe))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "{exe} is not executable");
    }
    // The bundled binary is the chosen one, byte for byte, with its version.
    let chosen = bundled_binary().unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_trm")));
    assert_eq!(
        std::fs::read(bundle.join("trm")).unwrap(),
        std::fs::read(&chosen).unwrap()
    );
    assert!(m.binary.version.starts_with("trm ") && m.binary.version.contains("commit"));
    if bundled_binary().is_none() {
        assert_eq!(m.binary.version, trm::bundle::version_line());
    }
    assert_eq!(m.packaged_by, trm::bundle::version_line());

    // The glibc the binary needs: the highest GLIBC_x.y name in its file,
    // found here by a plain byte scan, independent of the ELF reader.
    let bytes = std::fs::read(bundle.join("trm")).unwrap();
    let scanned = highest_glibc_name(&bytes).expect("a GLIBC_ version name in the binary");
    assert_eq!(m.binary.glibc.as_deref(), Some(scanned.as_str()));
    // Every library it names is one ldd resolves.
    let ldd = text(
        &Command::new("ldd")
            .arg(bundle.join("trm"))
            .output()
            .unwrap()
            .stdout,
    );
    assert!(m.binary.libraries.iter().any(|l| l.starts_with("libc.so")));
    for lib in &m.binary.libraries {
        // a library by name, or the loader by its path
        let listed = ldd.contains(&format!("{lib} => /")) || ldd.contains(&format!("/{lib} ("));
        assert!(listed, "{lib} not in ldd's list:\n{ldd}");
    }
    assert!(
        f.package_stdout.contains(&format!("needs glibc {scanned}")),
        "{}",
        f.package_stdout
    );
    // Newer than Ubuntu 20.04's glibc: a warning pointing at the portable build.
    let version: Vec<u32> = scanned.split('.').map(|p| p.parse().unwrap()).collect();
    let warned = f.package_stderr.contains("tools/build-portable.sh");
    assert_eq!(warned, version > vec![2, 31], "{}", f.package_stderr);
}

#[test]
fn the_runner_passes_arguments_status_and_library_folders_through() {
    // The runner alone, with a stand-in trm that reports what it was given.
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("my bundle");
    std::fs::create_dir(&bundle).unwrap();
    let write_exe = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = bundle.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_exe("run", &trm::bundle::runner::script(Some("2.17")));
    write_exe(
        "trm",
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'trm stand-in'; exit 0; }\n\
         echo \"LD=${LD_LIBRARY_PATH:-}\"\nfor a in \"$@\"; do echo \"arg=$a\"; done\nexit 7\n",
    );
    std::fs::write(bundle.join("c.json"), b"{}").unwrap();
    // Libraries the bundle carries (--lib) come before everything else.
    std::fs::create_dir(bundle.join("lib")).unwrap();
    // A per-user wheel folder with cuBLASLt's lib folder, and one without.
    let home = dir.path().join("home");
    let wheel = home.join(".local/lib/python3.11/site-packages/nvidia/cublas/lib");
    std::fs::create_dir_all(&wheel).unwrap();
    let dash = tool("dash", "dash");
    let out = Command::new(&dash)
        .env_clear()
        .env("HOME", &home)
        .env("LD_LIBRARY_PATH", "/callers/libs")
        .arg(bundle.join("run"))
        .arg(bundle.join("c.json"))
        .arg("out dir/sub.json")
        .args(["--device", "cpu", "two words"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "trm's status: {}",
        text(&out.stderr)
    );
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    let ld = lines[0].strip_prefix("LD=").unwrap();
    let folders: Vec<&str> = ld.split(':').collect();
    assert_eq!(folders[0], bundle.join("lib").to_str().unwrap(), "{ld}");
    assert_eq!(folders[1], "/callers/libs", "{ld}");
    assert!(folders.contains(&wheel.to_str().unwrap()), "{ld}");
    assert!(
        folders
            .iter()
            .all(|d| Path::new(d).is_dir() || *d == "/callers/libs"),
        "{ld}"
    );
    let model = bundle.join("model");
    let chal = bundle.join("c.json");
    let expected = [
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--challenges",
        chal.to_str().unwrap(),
        "--out",
        "out dir/sub.json",
        "--force",
        "--device",
        "cpu",
        "two words",
    ];
    let args: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.strip_prefix("arg=").unwrap())
        .collect();
    assert_eq!(args, expected);
}

/// The highest `GLIBC_a.b[.c]` followed by a NUL anywhere in `bytes`.
fn highest_glibc_name(bytes: &[u8]) -> Option<String> {
    let mut best: Option<(Vec<u32>, String)> = None;
    let pat = b"GLIBC_";
    for at in 0..bytes.len().saturating_sub(pat.len()) {
        if &bytes[at..at + pat.len()] != pat {
            continue;
        }
        let rest = &bytes[at + pat.len()..];
        let end = rest.iter().position(|&c| c == 0)?;
        let Ok(name) = std::str::from_utf8(&rest[..end]) else {
            continue;
        };
        let parts: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
        if let Some(parts) = parts.filter(|p| (2..=3).contains(&p.len())) {
            if best.as_ref().is_none_or(|(b, _)| parts > *b) {
                best = Some((parts, name.to_string()));
            }
        }
    }
    best.map(|(_, n)| n)
}

#[test]
fn a_folder_that_is_not_a_bundle_is_never_replaced() {
    let f = fixture();
    // A model folder to bundle with --model.
    let model = f.dir.join("model");
    let _ = std::fs::remove_dir_all(&model);
    let out = trm()
        .args(["package", "--checkpoint"])
        .arg(&f.checkpoint)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let user = f.dir.join("user-folder");
    let _ = std::fs::remove_dir_all(&user);
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("notes.txt"), b"mine").unwrap();
    let bundle_to = |dest: &Path| {
        trm()
            .args(["package", "--model"])
            .arg(&model)
            .arg("--bundle")
            .arg(dest)
            .output()
            .unwrap()
    };
    let out = bundle_to(&user);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("neither empty nor a trm bundle") && err.contains("refusing to replace"),
        "{err}"
    );
    assert_eq!(std::fs::read(user.join("notes.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&user).unwrap().count(), 1);

    // A bundle is replaced by a new one, and --model copies the folder.
    let again = f.dir.join("bundle-again");
    let _ = std::fs::remove_dir_all(&again);
    for _ in 0..2 {
        let out = bundle_to(&again);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let m = trm::bundle::verify(&again).unwrap();
    assert_eq!(
        std::fs::read(again.join("model/model.safetensors")).unwrap(),
        std::fs::read(model.join("model.safetensors")).unwrap()
    );
    assert_eq!(m.model.checkpoint, f.checkpoint.display().to_string());
    // Leftovers of the swap are gone.
    let stray: Vec<_> = std::fs::read_dir(&f.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // Not a trm binary: refused before anything is written.
    let fake = f.dir.join("fake-trm");
    std::fs::write(&fake, b"#!/bin/sh\necho hello\n").unwrap();
    let dest = f.dir.join("never-written");
    let out = trm()
        .args(["package", "--model"])
        .arg(&model)
        .arg("--bundle")
        .arg(&dest)
        .arg("--binary")
        .arg(&fake)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no ELF magic number"), "{err}");
    assert!(!dest.exists());
}

/// `--lib` carries shared libraries in the bundle's lib/ under the names
/// given (the runner puts that folder first: see the runner test), listed
/// in bundle.json; what is not a shared library, or a name given twice, is
/// refused before anything is written.
#[test]
fn libraries_are_carried_under_their_names() {
    let f = fixture();
    let libm = shared_libraries(&PathBuf::from(env!("CARGO_BIN_EXE_trm")))
        .into_iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libm.so"))
        })
        .expect("trm links libm");
    let name = libm.file_name().unwrap().to_string_lossy().into_owned();
    let dest = f.dir.join("with-lib");
    let _ = std::fs::remove_dir_all(&dest);
    let package = |dest: &Path, libs: &[&Path]| {
        let mut cmd = trm();
        cmd.args(["package", "--checkpoint"])
            .arg(&f.checkpoint)
            .arg("--bundle")
            .arg(dest);
        for l in libs {
            cmd.arg("--lib").arg(l);
        }
        cmd.output().unwrap()
    };
    let out = package(&dest, &[&libm]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let carried = dest.join("lib").join(&name);
    assert_eq!(
        std::fs::read(&carried).unwrap(),
        std::fs::read(std::fs::canonicalize(&libm).unwrap()).unwrap()
    );
    let manifest = read_json(&dest.join("bundle.json"));
    assert!(
        manifest["files"].get(format!("lib/{name}")).is_some(),
        "{manifest}"
    );

    let refused = f.dir.join("never-with-lib");
    let script = f.dir.join("not-a-lib.so");
    std::fs::write(&script, b"#!/bin/sh\n").unwrap();
    for (libs, want) in [
        (vec![script.as_path()], "not a shared library"),
        (vec![libm.as_path(), libm.as_path()], "already given"),
    ] {
        let out = package(&refused, &libs);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{libs:?} accepted");
        assert!(err.contains(want), "{err}");
        assert!(!refused.exists());
    }
}
