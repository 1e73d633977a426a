//! Minimal NumPy `.npy` reading and writing (format versions 1.0-3.0,
//! C order, little-endian `u1`, `i4`, `i8`).
//!
//! Writing emits version 1.0 headers padded to 64 bytes, exactly what
//! `numpy.save` writes, so numpy loads our files and we load theirs. Large
//! arrays are written through a memory map so the dataset builder can fill
//! rows in parallel without holding the data in memory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element types the dataset files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U8,
    I32,
    I64,
}

impl Dtype {
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::U8 => "|u1",
            Dtype::I32 => "<i4",
            Dtype::I64 => "<i8",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }

    fn from_descr(descr: &str) -> Option<Dtype> {
        match descr {
            "|u1" | "<u1" | "u1" | "|b1" => Some(Dtype::U8),
            "<i4" | "i4" => Some(Dtype::I32),
            "<i8" | "i8" => Some(Dtype::I64),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid .npy file: {why}")]
    Format { path: PathBuf, why: String },
    #[error("{path}: expected {expected}, found {found}")]
    Unexpected {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NpyError + '_ {
    move |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The header bytes (magic, version, length, dict, padding) for an array.
pub fn header_bytes(dtype: Dtype, shape: &[usize]) -> Vec<u8> {
    let shape_str = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        shape_str
    );
    // Pad with spaces so that magic + version + len + dict + '\n' is a multiple of 64.
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    dict.extend(std::iter::repeat_n(' ', pad));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Write a whole array held in memory (`data` is the raw little-endian bytes).
pub fn write_array(
    path: &Path,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> Result<(), NpyError> {
    let n: usize = shape.iter().product();
    if n * dtype.size() != data.len() {
        return Err(NpyError::Unexpected {
            path: path.to_path_buf(),
            expected: format!("{} bytes for shape {:?}", n * dtype.size(), shape),
            found: format!("{} bytes", data.len()),
        });
    }
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(&header_bytes(dtype, shape))
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Write a 1-D int32 array.
pub fn write_i32(path: &Path, values: &[i32]) -> Result<(), NpyError> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_array(path, Dtype::I32, &[values.len()], &bytes)
}

/// A `.npy` file created at its final size and filled through a writable map.
pub struct NpyWriter {
    path: PathBuf,
    mmap: Option<MmapMut>,
    file: File,
    offset: usize,
}

impl NpyWriter {
    pub fn create(path: &Path, dtype: Dtype, shape: &[usize]) -> Result<NpyWriter, NpyError> {
        let header = header_bytes(dtype, shape);
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        file.write_all(&header).map_err(io_err(path))?;
        file.set_len((header.len() + n) as u64)
            .map_err(io_err(path))?;
        // A zero-length map is an error on some platforms; keep None for empty arrays.
        let mmap = if n > 0 {
            // SAFETY: the file was just created by us and is not shared.
            Some(unsafe { MmapMut::map_mut(&file) }.map_err(io_err(path))?)
        } else {
            None
        };
        Ok(NpyWriter {
            path: path.to_path_buf(),
            mmap,
            file,
            offset: header.len(),
        })
    }

    /// The element bytes (after the header).
    pub fn data_mut(&mut self) -> &mut [u8] {
        let off = self.offset;
        match self.mmap.as_mut() {
            Some(m) => &mut m[off..],
            None => &mut [],
        }
    }

    /// Flush the map and the file to disk.
    pub fn finish(self) -> Result<(), NpyError> {
        if let Some(m) = &self.mmap {
            m.flush().map_err(io_err(&self.path))?;
        }
        self.file.sync_all().map_err(io_err(&self.path))?;
        Ok(())
    }
}

/// Where an array's bytes live.
enum Backing {
    /// A mapped file; `None` for an empty array (nothing to map).
    Map(Option<Mmap>),
    /// Bytes in memory (a split built on the fly, e.g. by `trm infer`).
    Owned(Vec<u8>),
}

/// A read-only `.npy` array: memory-mapped from a file, or held in memory.
pub struct NpyArray {
    path: PathBuf,
    backing: Backing,
    offset: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl std::fmt::Debug for NpyArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpyArray")
            .field("path", &self.path)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl NpyArray {
    pub fn open(path: &Path) -> Result<NpyArray, NpyError> {
        let file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len() as usize;
        let fmt_err = |why: String| NpyError::Format {
            path: path.to_path_buf(),
            why,
        };
        if len < 10 {
            return Err(fmt_err(format!("file is only {len} bytes")));
        }
        // SAFETY: read-only map; dataset files are not modified while training.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        if &mmap[..6] != MAGIC {
            return Err(fmt_err("missing the \\x93NUMPY magic".into()));
        }
        let major = mmap[6];
        let (hlen, hstart) = match major {
            1 => (u16::from_le_bytes([mmap[8], mmap[9]]) as usize, 10),
            2 | 3 => {
                if len < 12 {
                    return Err(fmt_err("truncated header".into()));
                }
                (
                    u32::from_le_bytes([mmap[8], mmap[9], mmap[10], mmap[11]]) as usize,
                    12,
                )
            }
            v => return Err(fmt_err(format!("unsupported format version {v}"))),
        };
        if hstart + hlen > len {
            return Err(fmt_err("truncated header".into()));
        }
        let header = std::str::from_utf8(&mmap[hstart..hstart + hlen])
            .map_err(|_| fmt_err("header is not text".into()))?;
        let (descr, fortran, shape) = parse_header(header).map_err(fmt_err)?;
        let dtype = Dtype::from_descr(&descr)
            .ok_or_else(|| fmt_err(format!("unsupported dtype '{descr}' (need u1, i4 or i8)")))?;
        if fortran {
            return Err(fmt_err("Fortran-order arrays are not supported".into()));
        }
        let offset = hstart + hlen;
        // A shape from the file may be huge: an overflow is a mismatch too.
        let n = data_bytes(&shape, dtype).ok_or_else(|| {
            fmt_err(format!(
                "shape {shape:?} of {} overflows the addressable size (corrupt)",
                dtype.descr()
            ))
        })?;
        if offset.checked_add(n) != Some(len) {
            return Err(fmt_err(format!(
                "shape {:?} of {} needs {} data bytes, file has {} (truncated or corrupt)",
                shape,
                dtype.descr(),
                n,
                len - offset
            )));
        }
        Ok(NpyArray {
            path: path.to_path_buf(),
            backing: Backing::Map(if n > 0 { Some(mmap) } else { None }),
            offset,
            dtype,
            shape,
        })
    }

    /// An array held in memory: `data` are the little-endian element
    /// bytes of `shape`; `name` stands in for the path in messages.
    pub fn from_bytes(
        name: PathBuf,
        dtype: Dtype,
        shape: &[usize],
        data: Vec<u8>,
    ) -> Result<NpyArray, NpyError> {
        let n = data_bytes(shape, dtype).unwrap_or(usize::MAX);
        if data.len() != n {
            return Err(NpyError::Format {
                path: name,
                why: format!(
                    "shape {shape:?} of {} needs {n} data bytes, got {}",
                    dtype.descr(),
                    data.len()
                ),
            });
        }
        Ok(NpyArray {
            path: name,
            backing: Backing::Owned(data),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw element bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Map(Some(m)) => &m[self.offset..],
            Backing::Map(None) => &[],
            Backing::Owned(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Check rank and dtype; `expected` names what the caller wanted.
    pub fn expect(&self, dtypes: &[Dtype], ndim: usize) -> Result<(), NpyError> {
        if !dtypes.contains(&self.dtype) || self.shape.len() != ndim {
            return Err(NpyError::Unexpected {
                path: self.path.clone(),
                expected: format!(
                    "a {ndim}-D array of {}",
                    dtypes
                        .iter()
                        .map(|d| d.descr())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                found: format!(
                    "{}-D {} with shape {:?}",
                    self.shape.len(),
                    self.dtype.descr(),
                    self.shape
                ),
            });
        }
        Ok(())
    }

    /// Element `i` of an integer array, widened to i64.
    pub fn get_i64(&self, i: usize) -> i64 {
        let b = self.bytes();
        match self.dtype {
            Dtype::U8 => b[i] as i64,
            Dtype::I32 => i32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()) as i64,
            Dtype::I64 => i64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap()),
        }
    }

    /// The whole array as i64 values (for the small index arrays).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        (0..self.len()).map(|i| self.get_i64(i)).collect()
    }
}

/// Parse `{'descr': '<i4', 'fortran_order': False, 'shape': (3, 4), }`.
/// Data bytes of `shape`, `None` on overflow.
fn data_bytes(shape: &[usize], dtype: Dtype) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

fn parse_header(h: &str) -> Result<(String, bool, Vec<usize>), String> {
    let find_value = |key: &str| -> Result<&str, String> {
        let pat = format!("'{key}'");
        let at = h
            .find(&pat)
            .ok_or_else(|| format!("header has no '{key}' entry: {}", h.trim()))?;
        let rest = &h[at + pat.len()..];
        let colon = rest
            .find(':')
            .ok_or_else(|| format!("malformed '{key}' entry"))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr_v = find_value("descr")?;
    let descr = descr_v
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| "malformed 'descr'".to_string())?
        .to_string();
    let fortran_v = find_value("fortran_order")?;
    let fortran = if fortran_v.starts_with("True") {
        true
    } else if fortran_v.starts_with("False") {
        false
    } else {
        return Err("malformed 'fortran_order'".into());
    };
    let shape_v = find_value("shape")?;
    let inner = shape_v
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| "malformed 'shape'".to_string())?;
    let mut shape = Vec::new();
    for part in inner.split(',') {
        let p = part.trim().trim_end_matches('L');
        if p.is_empty() {
            continue;
        }
        shape.push(
            p.parse::<usize>()
                .map_err(|_| format!("bad dimension '{p}' in shape"))?,
        );
    }
    Ok((descr, fortran, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_64_aligned_and_round_trips() {
        for shape in [vec![0usize], vec![7], vec![3, 900], vec![1234567, 900]] {
            let h = header_bytes(Dtype::U8, &shape);
            assert_eq!(h.len() % 64, 0);
            let text = std::str::from_utf8(&h[10..]).unwrap();
            let (descr, fortran, parsed) = parse_header(text).unwrap();
            assert_eq!(descr, "|u1");
            assert!(!fortran);
            assert_eq!(parsed, shape);
        }
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_i32(&p, &[5, -3, 1 << 30]).unwrap();
        let a = NpyArray::open(&p).unwrap();
        assert_eq!(a.dtype, Dtype::I32);
        assert_eq!(a.shape, vec![3]);
        assert_eq!(a.to_i64_vec(), vec![5, -3, 1 << 30]);

        let p2 = dir.path().join("b.npy");
        let mut w = NpyWriter::create(&p2, Dtype::U8, &[2, 3]).unwrap();
        w.data_mut().copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        w.finish().unwrap();
        let b = NpyArray::open(&p2).unwrap();
        assert_eq!(b.shape, vec![2, 3]);
        assert_eq!(b.bytes(), &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_i32(&p, &[1, 2, 3]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let err = NpyArray::open(&p).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
