//! The output folder of `trm build-dataset`: one builder at a time (the run
//! folders' advisory lock), what an interrupted `--force` left beside it
//! (`<out>.old`), and the manifest of files that lets a kept build be told
//! apart from a folder holding files of two builds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{hash_file, FileEntry};
use crate::run_folder::LOCK_FILE;

/// Files of a build folder that the manifest does not cover.
const UNLISTED: [&str; 2] = [super::builder::BUILD_INFO_FILE, LOCK_FILE];

/// Entries of `dir` other than the lock file.
pub fn entries_besides_lock(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name() != LOCK_FILE {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// What was done about a leftover `<out>.old`.
#[derive(Debug, PartialEq, Eq)]
pub enum Leftover {
    None,
    /// `out` holds a build: `old` was the previous one, removed.
    Removed,
    /// `out` was empty: a `--force` rebuild was killed between moving the
    /// previous build aside and putting the new one in place; it is back.
    Restored,
}

/// Deals with `old` (under the output's lock). A folder by that name that
/// is not a dataset is the user's: the error asks them to move it.
pub fn tidy_old(out: &Path, old: &Path) -> Result<Leftover, String> {
    if !old.is_dir() {
        return Ok(Leftover::None);
    }
    if !looks_like_dataset(old) {
        return Err(format!(
            "{} exists and is not a dataset left by an interrupted build; the build \
             uses that name to swap datasets safely: move it away or rename it",
            old.display()
        ));
    }
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if looks_like_dataset(out) {
        std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
        return Ok(Leftover::Removed);
    }
    if !entries_besides_lock(out)
        .map_err(|e| io(out, e))?
        .is_empty()
    {
        // Something else is in `out`; leave both alone (the build then
        // refuses `out` as not a dataset).
        return Ok(Leftover::None);
    }
    for p in entries_besides_lock(old).map_err(|e| io(old, e))? {
        let to = out.join(p.file_name().unwrap_or_default());
        std::fs::rename(&p, &to).map_err(|e| io(&to, e))?;
    }
    std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
    Ok(Leftover::Restored)
}

pub fn looks_like_dataset(dir: &Path) -> bool {
    dir.join(super::builder::BUILD_INFO_FILE).is_file()
        || dir.join("train").join("dataset.json").is_file()
}

/// Size and SHA-256 of every file under `dir` but the build info and lock,
/// keyed by its path relative to `dir` with `/` separators.
pub fn manifest(dir: &Path) -> std::io::Result<BTreeMap<String, FileEntry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if prefix.is_empty() && UNLISTED.contains(&name.as_str()) {
                continue;
            }
            let rel = format!("{prefix}{name}");
            if e.file_type()?.is_dir() {
                stack.push((e.path(), format!("{rel}/")));
            } else {
                let entry = hash_file(&e.path()).map_err(std::io::Error::other)?;
                out.insert(rel, entry);
            }
        }
    }
    Ok(out)
}

/// `None` when `dir` holds exactly the files of `expected`, else what differs.
pub fn mismatch(dir: &Path, expected: &BTreeMap<String, FileEntry>) -> Option<String> {
    let found = match manifest(dir) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    for (name, want) in expected {
        match found.get(name) {
            None => return Some(format!("{name} is missing")),
            Some(got) if got != want => {
                return Some(format!(
                    "{name} is not the file this build wrote ({} bytes, expected {})",
                    got.bytes, want.bytes
                ))
            }
            Some(_) => {}
        }
    }
    found
        .keys()
        .find(|k| !expected.contains_key(*k))
        .map(|extra| format!("{extra} is not part of this build"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_catches_changed_and_extra_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("train")).unwrap();
        std::fs::write(d.join("train/a.npy"), b"abc").unwrap();
        std::fs::write(d.join("identifiers.json"), b"[]").unwrap();
        std::fs::write(d.join(LOCK_FILE), b"1").unwrap();
        let m = manifest(d).unwrap();
        assert_eq!(
            m.keys().collect::<Vec<_>>(),
            ["identifiers.json", "train/a.npy"]
        );
        assert_eq!(mismatch(d, &m), None);
        std::fs::write(d.join("train/a.npy"), b"abd").unwrap();
        assert!(mismatch(d, &m).unwrap().contains("train/a.npy"));
        std::fs::write(d.join("train/a.npy"), b"abc").unwrap();
        std::fs::write(d.join("train/b.npy"), b"x").unwrap();
        assert!(mismatch(d, &m).unwrap().contains("train/b.npy"));
    }

    #[test]
    fn old_is_restored_into_an_empty_output_or_removed_beside_a_build() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, old) = (tmp.path().join("d"), tmp.path().join("d.old"));
        std::fs::create_dir_all(old.join("train")).unwrap();
        std::fs::write(old.join("train/dataset.json"), b"{}").unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join(LOCK_FILE), b"1").unwrap();
        assert_eq!(tidy_old(&out, &old), Ok(Leftover::Restored));
        assert!(out.join("train/dataset.json").is_file() && !old.exists());
        std::fs::create_dir_all(old.join("train")).unwrap();
        std::fs::write(old.join("train/dataset.json"), b"{}").unwrap();
        assert_eq!(tidy_old(&out, &old), Ok(Leftover::Removed));
        assert!(!old.exists());
        // A user's folder of that name is never touched.
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("notes.txt"), b"mine").unwrap();
        assert!(tidy_old(&out, &old).unwrap_err().contains("move it away"));
        assert!(old.join("notes.txt").is_file());
    }
}
