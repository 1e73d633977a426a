//! What a Linux executable needs from the system it runs on, read from its
//! ELF file the way the dynamic loader reads it: the interpreter
//! (`PT_INTERP`), the libraries (`DT_NEEDED`) and the symbol versions it
//! requires of them (`DT_VERNEED`, the `.gnu.version_r` records), from which
//! the oldest glibc that runs it follows.
//!
//! Only the program headers and the dynamic segment are read (a stripped
//! binary has them too); only 64-bit little-endian files (x86_64, aarch64)
//! are understood. Every offset and count comes from the file, so each is
//! bounds-checked and every loop is capped.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: i64 = 0;
const DT_NEEDED: i64 = 1;
const DT_STRTAB: i64 = 5;
const DT_STRSZ: i64 = 10;
const DT_VERNEED: i64 = 0x6fff_fffe;
const DT_VERNEEDNUM: i64 = 0x6fff_ffff;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
/// Caps on what the file claims, far above any real binary's.
const MAX_PROGRAM_HEADERS: u16 = 512;
const MAX_DYNAMIC_ENTRIES: u64 = 1 << 16;
const MAX_STRTAB_BYTES: u64 = 64 << 20;
const MAX_VERSION_RECORDS: u64 = 1 << 12;
/// The loader feature `-z pack-relative-relocs` asks for, named like a
/// version; glibc has it since 2.36.
const DT_RELR_FEATURE: (&str, GlibcVersion) = (
    "GLIBC_ABI_DT_RELR",
    GlibcVersion {
        major: 2,
        minor: 36,
        patch: 0,
    },
);

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a Linux executable this reader understands: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: damaged ELF file: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// A glibc release, as in the `GLIBC_2.17` version names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GlibcVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl GlibcVersion {
    pub const fn new(major: u32, minor: u32) -> GlibcVersion {
        GlibcVersion {
            major,
            minor,
            patch: 0,
        }
    }

    /// `GLIBC_2.3.4` -> 2.3.4; None for other names (`GLIBC_PRIVATE`).
    fn from_version_name(name: &str) -> Option<GlibcVersion> {
        if name == DT_RELR_FEATURE.0 {
            return Some(DT_RELR_FEATURE.1);
        }
        let mut parts = name.strip_prefix("GLIBC_")?.split('.');
        let mut next = |required: bool| match parts.next() {
            Some(p) => p.parse::<u32>().ok(),
            None if !required => Some(0),
            None => None,
        };
        let v = GlibcVersion {
            major: next(true)?,
            minor: next(true)?,
            patch: next(false)?,
        };
        parts.next().is_none().then_some(v)
    }
}

impl fmt::Display for GlibcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.patch != 0 {
            write!(f, ".{}", self.patch)?;
        }
        Ok(())
    }
}

/// What an executable needs from the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfNeeds {
    /// `x86_64`, `aarch64`, or `machine N`.
    pub machine: String,
    /// The dynamic loader it names; None for a static executable.
    pub interpreter: Option<String>,
    /// The shared libraries it links (`DT_NEEDED`), in file order.
    pub libraries: Vec<String>,
    /// Every glibc version it requires, ascending, without repeats.
    pub glibc_versions: Vec<GlibcVersion>,
}

impl ElfNeeds {
    /// The oldest glibc that runs it (the highest version it requires).
    pub fn glibc(&self) -> Option<GlibcVersion> {
        self.glibc_versions.last().copied()
    }

    /// Linked statically: no loader, no libraries, so it cannot load any
    /// (the CUDA driver included).
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.libraries.is_empty()
    }
}

/// Reads what the executable at `path` needs (see the module docs).
pub fn read_needs(path: &Path) -> Result<ElfNeeds, ElfError> {
    let file = File::open(path).map_err(|source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ElfError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    Reader { file, len, path }.needs()
}

struct ProgramHeader {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

struct Reader<'a> {
    file: File,
    len: u64,
    path: &'a Path,
}

impl Reader<'_> {
    fn malformed(&self, what: impl Into<String>) -> ElfError {
        ElfError::Malformed {
            path: self.path.to_path_buf(),
            what: what.into(),
        }
    }

    fn bytes(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, ElfError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(self.malformed(format!(
                "{what} ({len} bytes at offset {offset}) lies past the end of the file ({} bytes)",
                self.len
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| ElfError::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        Ok(buf)
    }

    fn needs(&self) -> Result<ElfNeeds, ElfError> {
        let unsupported = |what: &str| ElfError::Unsupported {
            path: self.path.to_path_buf(),
            what: what.to_string(),
        };
        let magic = self.bytes(0, self.len.min(4), "the magic number")?;
        if magic != b"\x7fELF" {
            return Err(unsupported(
                "no ELF magic number (a script, or not a program)",
            ));
        }
        if self.len < 64 {
            return Err(unsupported("too short for an ELF header"));
        }
        let header = self.bytes(0, 64, "the ELF header")?;
        if header[4] != 2 || header[5] != 1 {
            return Err(unsupported(
                "not a 64-bit little-endian ELF file (x86_64 or aarch64)",
            ));
        }
        let machine = match u16_at(&header, 18) {
            EM_X86_64 => "x86_64".to_string(),
            EM_AARCH64 => "aarch64".to_string(),
            m => format!("machine {m}"),
        };
        let headers = self.program_headers(&header)?;
        let interpreter = match headers.iter().find(|h| h.kind == PT_INTERP) {
            Some(h) => {
                let raw = self.bytes(h.offset, h.filesz, "the interpreter name")?;
                Some(
                    c_string(&raw, 0)
                        .ok_or_else(|| self.malformed("unterminated interpreter name"))?,
                )
            }
            None => None,
        };
        let (libraries, glibc_versions) = match headers.iter().find(|h| h.kind == PT_DYNAMIC) {
            Some(d) => self.dynamic(d, &headers)?,
            None => (Vec::new(), Vec::new()),
        };
        Ok(ElfNeeds {
            machine,
            interpreter,
            libraries,
            glibc_versions,
        })
    }

    fn program_headers(&self, header: &[u8]) -> Result<Vec<ProgramHeader>, ElfError> {
        let phoff = u64_at(header, 32);
        let entsize = u16_at(header, 54);
        let count = u16_at(header, 56);
        if count == 0 {
            return Ok(Vec::new());
        }
        if entsize < 56 || count > MAX_PROGRAM_HEADERS {
            return Err(self.malformed(format!("{count} program headers of {entsize} bytes")));
        }
        let table = self.bytes(
            phoff,
            u64::from(entsize) * u64::from(count),
            "the program headers",
        )?;
        Ok(table
            .chunks_exact(usize::from(entsize))
            .map(|h| ProgramHeader {
                kind: u32_at(h, 0),
                offset: u64_at(h, 8),
                vaddr: u64_at(h, 16),
                filesz: u64_at(h, 32),
            })
            .collect())
    }

    /// The file offset of loaded address `addr` (through the PT_LOAD
    /// segment that maps it).
    fn offset_of(&self, addr: u64, headers: &[ProgramHeader], what: &str) -> Result<u64, ElfError> {
        headers
            .iter()
            .filter(|h| h.kind == PT_LOAD)
            .find(|h| addr >= h.vaddr && addr - h.vaddr < h.filesz)
            .map(|h| h.offset + (addr - h.vaddr))
            .ok_or_else(|| {
                self.malformed(format!(
                    "{what} (address {addr:#x}) is in no loaded segment"
                ))
            })
    }

    /// The libraries and glibc versions of the dynamic segment `d`.
    fn dynamic(
        &self,
        d: &ProgramHeader,
        headers: &[ProgramHeader],
    ) -> Result<(Vec<String>, Vec<GlibcVersion>), ElfError> {
        let n = (d.filesz / 16).min(MAX_DYNAMIC_ENTRIES);
        let table = self.bytes(d.offset, n * 16, "the dynamic section")?;
        let mut needed = Vec::new();
        let (mut strtab, mut strsz, mut verneed, mut verneednum) = (None, None, None, 0u64);
        for e in table.chunks_exact(16) {
            let (tag, val) = (u64_at(e, 0) as i64, u64_at(e, 8));
            match tag {
                DT_NULL => break,
                DT_NEEDED => needed.push(val),
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = Some(val),
                DT_VERNEED => verneed = Some(val),
                DT_VERNEEDNUM => verneednum = val,
                _ => {}
            }
        }
        if needed.is_empty() && verneed.is_none() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (Some(strtab), Some(strsz)) = (strtab, strsz) else {
            return Err(self.malformed("a dynamic section without a string table"));
        };
        if strsz > MAX_STRTAB_BYTES {
            return Err(self.malformed(format!("a string table of {strsz} bytes")));
        }
        let strings = self.bytes(
            self.offset_of(strtab, headers, "the string table")?,
            strsz,
            "the string table",
        )?;
        let name = |off: u64, what: &str| {
            usize::try_from(off)
                .ok()
                .and_then(|o| c_string(&strings, o))
                .ok_or_else(|| {
                    self.malformed(format!(
                        "{what} at string offset {off} is not in the string table"
                    ))
                })
        };
        let libraries = needed
            .iter()
            .map(|&off| name(off, "a library name"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut glibc = Vec::new();
        if let Some(addr) = verneed {
            let mut at = self.offset_of(addr, headers, "the version needs")?;
            if verneednum > MAX_VERSION_RECORDS {
                return Err(self.malformed(format!("{verneednum} version-need records")));
            }
            for _ in 0..verneednum {
                let rec = self.bytes(at, 16, "a version-need record")?;
                let (count, aux, next) = (u16_at(&rec, 2), u32_at(&rec, 8), u32_at(&rec, 12));
                let mut aux_at = at + u64::from(aux);
                for _ in 0..count {
                    let a = self.bytes(aux_at, 16, "a version-need entry")?;
                    let version = name(u64::from(u32_at(&a, 8)), "a version name")?;
                    glibc.extend(GlibcVersion::from_version_name(&version));
                    match u32_at(&a, 12) {
                        0 => break,
                        step => aux_at += u64::from(step),
                    }
                }
                match next {
                    0 => break,
                    step => at += u64::from(step),
                }
            }
        }
        glibc.sort();
        glibc.dedup();
        Ok((libraries, glibc))
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The NUL-terminated string at `at`; None when it runs off the end.
fn c_string(b: &[u8], at: usize) -> Option<String> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal dynamically linked ELF64 file: one PT_LOAD over the whole
    /// file at `BASE`, PT_INTERP, PT_DYNAMIC, a string table and version
    /// needs on `libc.so.6` (`versions`) and `libm.so.6` (GLIBC_2.2.5).
    const BASE: u64 = 0x40_0000;

    fn tiny_elf(versions: &[&str]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut add = |s: &str| {
            let at = strtab.len() as u32;
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
            at
        };
        let libc = add("libc.so.6");
        let libm = add("libm.so.6");
        let names: Vec<u32> = versions.iter().map(|v| add(v)).collect();
        let m225 = add("GLIBC_2.2.5");

        let phoff = 64u64;
        let interp_off = phoff + 3 * 56;
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let str_off = interp_off + interp.len() as u64;
        let need_off = str_off + strtab.len() as u64;
        // two Verneed records, each followed by its Vernaux entries
        let mut need = Vec::new();
        let rec1_len = 16 + 16 * names.len() as u32;
        let vn = |need: &mut Vec<u8>, cnt: u16, file: u32, next: u32| {
            need.extend_from_slice(&1u16.to_le_bytes());
            need.extend_from_slice(&cnt.to_le_bytes());
            need.extend_from_slice(&file.to_le_bytes());
            need.extend_from_slice(&16u32.to_le_bytes());
            need.extend_from_slice(&next.to_le_bytes());
        };
        let vna = |need: &mut Vec<u8>, name: u32, last: bool| {
            need.extend_from_slice(&0u32.to_le_bytes()); // hash: unused here
            need.extend_from_slice(&0u16.to_le_bytes());
            need.extend_from_slice(&2u16.to_le_bytes());
            need.extend_from_slice(&name.to_le_bytes());
            need.extend_from_slice(&(if last { 0u32 } else { 16 }).to_le_bytes());
        };
        vn(&mut need, names.len() as u16, libc, rec1_len);
        for (i, &n) in names.iter().enumerate() {
            vna(&mut need, n, i + 1 == names.len());
        }
        vn(&mut need, 1, libm, 0);
        vna(&mut need, m225, true);
        let dyn_off = need_off + need.len() as u64;
        let dyn_entries: [(i64, u64); 7] = [
            (DT_NEEDED, libc.into()),
            (DT_NEEDED, libm.into()),
            (DT_STRTAB, BASE + str_off),
            (DT_STRSZ, strtab.len() as u64),
            (DT_VERNEED, BASE + need_off),
            (DT_VERNEEDNUM, 2),
            (DT_NULL, 0),
        ];
        let total = dyn_off + 16 * dyn_entries.len() as u64;

        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&3u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, kind: u32, off: u64, size: u64| {
            let mut h = vec![0u8; 56];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&off.to_le_bytes());
            h[16..24].copy_from_slice(&(BASE + off).to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[40..48].copy_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&h);
        };
        ph(&mut f, PT_LOAD, 0, total);
        ph(&mut f, PT_INTERP, interp_off, interp.len() as u64);
        ph(&mut f, PT_DYNAMIC, dyn_off, 16 * dyn_entries.len() as u64);
        f.extend_from_slice(interp);
        f.extend_from_slice(&strtab);
        f.extend_from_slice(&need);
        for (tag, val) in dyn_entries {
            f.extend_from_slice(&tag.to_le_bytes());
            f.extend_from_slice(&val.to_le_bytes());
        }
        assert_eq!(f.len() as u64, total);
        f
    }

    fn needs_of(bytes: &[u8]) -> Result<ElfNeeds, ElfError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exe");
        std::fs::write(&p, bytes).unwrap();
        read_needs(&p)
    }

    #[test]
    fn reads_the_highest_glibc_version_of_every_library() {
        let n = needs_of(&tiny_elf(&[
            "GLIBC_2.14",
            "GLIBC_PRIVATE",
            "GLIBC_2.3.4",
            "GLIBC_2.34",
        ]))
        .unwrap();
        assert_eq!(n.machine, "x86_64");
        assert_eq!(
            n.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(n.libraries, ["libc.so.6", "libm.so.6"]);
        let v = |s: &str| GlibcVersion::from_version_name(s).unwrap();
        assert_eq!(
            n.glibc_versions,
            [
                v("GLIBC_2.2.5"),
                v("GLIBC_2.3.4"),
                v("GLIBC_2.14"),
                v("GLIBC_2.34")
            ]
        );
        // 2.34 > 2.14 > 2.3.4: numeric, not text order
        assert_eq!(n.glibc().map(|g| g.to_string()).as_deref(), Some("2.34"));
        assert!(!n.is_static());
        // The relative-relocations feature means glibc 2.36.
        let n = needs_of(&tiny_elf(&["GLIBC_2.17", "GLIBC_ABI_DT_RELR"])).unwrap();
        assert_eq!(n.glibc(), Some(GlibcVersion::new(2, 36)));
    }

    #[test]
    fn version_names() {
        let v = GlibcVersion::from_version_name;
        assert_eq!(v("GLIBC_2.17"), Some(GlibcVersion::new(2, 17)));
        assert_eq!(
            v("GLIBC_2.3.4").map(|g| g.to_string()).as_deref(),
            Some("2.3.4")
        );
        for other in [
            "GLIBC_PRIVATE",
            "GCC_3.0",
            "GLIBC_2",
            "GLIBC_2.x",
            "GLIBC_2.1.2.3",
        ] {
            assert_eq!(v(other), None, "{other}");
        }
    }

    #[test]
    fn damaged_and_foreign_files_are_errors_not_panics() {
        let good = tiny_elf(&["GLIBC_2.17"]);
        // Every truncation (the dynamic section is last): an error, never a
        // panic or a partial answer.
        for cut in 0..good.len() {
            if let Ok(n) = needs_of(&good[..cut]) {
                panic!("read {n:?} from the first {cut} bytes");
            }
        }
        let e = needs_of(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(e.to_string().contains("no ELF magic"), "{e}");
        let mut be = good.clone();
        be[5] = 2;
        let e = needs_of(&be).unwrap_err();
        assert!(e.to_string().contains("64-bit little-endian"), "{e}");
        // A string offset past the table.
        let mut bad = good.clone();
        let dyn_at = bad.len() - 7 * 16;
        bad[dyn_at + 8..dyn_at + 16].copy_from_slice(&9999u64.to_le_bytes());
        let e = needs_of(&bad).unwrap_err();
        assert!(e.to_string().contains("string offset 9999"), "{e}");
    }

    #[test]
    fn a_file_without_a_dynamic_segment_is_static() {
        let mut f = tiny_elf(&["GLIBC_2.17"]);
        // PT_INTERP and PT_DYNAMIC become PT_NULL
        for h in [1usize, 2] {
            let at = 64 + h * 56;
            f[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        }
        let n = needs_of(&f).unwrap();
        assert!(n.is_static());
        assert_eq!(n.glibc(), None);
    }
}
