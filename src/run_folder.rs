//! One owner per folder: an exclusive advisory lock (`flock`) on a lock file
//! inside a run or dataset folder, held for the whole command. The OS drops
//! it when the process dies, so even a kill -9 never leaves a stale lock.
//! Also: telling whether a folder already holds a run, and moving an old run
//! aside when the user asks to start over.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name (it holds the owner's pid, for the refusal message).
pub const LOCK_FILE: &str = ".trm.lock";

/// Why a folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} is in use by another trm process (pid {pid}); wait for it to finish, \
         stop it, or use another folder"
    )]
    Locked { dir: PathBuf, pid: String },
    #[error(
        "{dir} already holds a run ({what}); continue it with `--resume latest`, \
         choose a new folder (checkpoint_path=... or +run_name=...), \
         or pass --start-over to move the old run aside"
    )]
    HoldsRun { dir: PathBuf, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FolderError + '_ {
    move |source| FolderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An exclusive lock on a folder; released on drop or process death.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    dir: PathBuf,
}

impl FolderLock {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Creates `dir` if needed and locks it, or says which process holds it.
pub fn lock(dir: &Path) -> Result<FolderLock, FolderError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut attempts = 0;
    let mut file = loop {
        let mut file = open_lock_file(&path)?;
        if !try_lock(&file).map_err(io(&path))? {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(FolderError::Locked {
                dir: dir.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.into()
                },
            });
        }
        // The dataset builder moves its locked lock file along when it swaps
        // a new build into place: a lock won on a file that was just moved
        // away is on the wrong file, so take it again on the one at `path`.
        attempts += 1;
        if still_at(&file, &path) || attempts >= 8 {
            break file;
        }
    };
    // The pid is informative only: the lock itself is the flock.
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(FolderLock {
        _file: file,
        dir: dir.to_path_buf(),
    })
}

fn open_lock_file(path: &Path) -> Result<File, FolderError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io(path))
}

/// Whether `path` still names the open `file` (same inode).
#[cfg(unix)]
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_at(_file: &File, _path: &Path) -> bool {
    true
}

#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor this process owns; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    // No advisory locks here: one owner is then the user's responsibility.
    Ok(true)
}

/// What in `dir` shows that a run lives there (`None`: nothing).
pub fn run_evidence(dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut found = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "all_config.yaml"
            || name == "metrics.jsonl"
            || name.starts_with("step_")
            || name.starts_with("events.out.tfevents.")
        {
            found.push(name);
        }
    }
    if found.is_empty() {
        return None;
    }
    found.sort();
    let n = found.len();
    found.truncate(3);
    let more = if n > 3 {
        format!(" and {} more", n - 3)
    } else {
        String::new()
    };
    Some(format!("{}{more}", found.join(", ")))
}

/// For a fresh run: refuses a folder holding a run, or with `start_over`
/// moves every entry but the lock into a new sibling `<dir>.previous-N`
/// and returns where it went.
pub fn claim_fresh(lock: &FolderLock, start_over: bool) -> Result<Option<PathBuf>, FolderError> {
    let dir = lock.dir();
    let Some(what) = run_evidence(dir) else {
        return Ok(None);
    };
    if !start_over {
        return Err(FolderError::HoldsRun {
            dir: dir.to_path_buf(),
            what,
        });
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let parent = dir.parent().unwrap_or(Path::new("."));
    let aside = (1..)
        .map(|i| parent.join(format!("{name}.previous-{i}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| parent.join(format!("{name}.previous")));
    std::fs::create_dir(&aside).map_err(io(&aside))?;
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        if e.file_name() == LOCK_FILE {
            continue;
        }
        let to = aside.join(e.file_name());
        std::fs::rename(e.path(), &to).map_err(io(&to))?;
    }
    Ok(Some(aside))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_first_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let a = lock(tmp.path()).unwrap();
        let e = lock(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(a);
        lock(tmp.path()).unwrap();
    }

    #[test]
    fn start_over_moves_the_run_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v");
        let l = lock(&dir).unwrap();
        assert!(claim_fresh(&l, false).unwrap().is_none());
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        let e = claim_fresh(&l, false).unwrap_err().to_string();
        assert!(
            e.contains("--resume latest") && e.contains("metrics.jsonl"),
            "{e}"
        );
        let aside = claim_fresh(&l, true).unwrap().unwrap();
        assert!(aside.join("metrics.jsonl").is_file());
        assert!(run_evidence(&dir).is_none());
    }
}
