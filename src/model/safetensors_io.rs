//! Reading and writing safetensors files of named tensors: weights and
//! checkpoints (F32 or BF16 on disk, F16/F64 readable), batches (int32) and
//! step dumps.
//!
//! Everything in memory is f32 ([`Tensor`]) or i32 ([`I32Tensor`]); dtypes are
//! converted at the file boundary. Writes go to a temporary file in the same
//! folder and are renamed into place, so a reader never sees half a file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensorError, TensorView, View};
use safetensors::SafeTensors;

use crate::tensor::Tensor;

/// An int32 tensor (token ids, labels, puzzle identifiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<i32>,
}

/// On-disk dtype of float tensors when saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    /// bfloat16, rounded to nearest even (halves checkpoint size; the
    /// reference trains in bf16 so nothing it needs is lost).
    BF16,
}

impl std::str::FromStr for FloatDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(FloatDtype::F32),
            "bf16" | "bfloat16" => Ok(FloatDtype::BF16),
            other => Err(format!(
                "unknown float dtype `{other}` (expected f32 or bf16)"
            )),
        }
    }
}

/// One tensor to save, float or int.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    F32(Tensor),
    I32(I32Tensor),
}

/// A safetensors file that cannot be read or written as asked.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    #[error("{path} has no tensor `{name}` (it has: {available})")]
    Missing {
        path: PathBuf,
        name: String,
        available: String,
    },
    #[error("{path}: tensor `{name}` has dtype {got}, expected {expected}")]
    Dtype {
        path: PathBuf,
        name: String,
        got: String,
        expected: &'static str,
    },
    #[error("{path}: tensor `{name}` value {value} at flat index {index} does not fit in i32")]
    IntRange {
        path: PathBuf,
        name: String,
        index: usize,
        value: i64,
    },
    #[error("cannot save {path}: tensor `{name}` holds {len} values but its shape {shape:?} needs {needed}")]
    BadData {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
        len: usize,
        needed: usize,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialise {path}: {source}")]
    Serialize {
        path: PathBuf,
        #[source]
        source: SafeTensorError,
    },
}

/// A safetensors file mapped into memory and parsed.
struct Mapped {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl Mapped {
    fn open(path: &Path) -> Result<Mapped, SafetensorsError> {
        let io = |source| SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and lives only for this load; files
        // are replaced by rename, never rewritten in place, so the mapped
        // bytes do not change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(Mapped {
            path: path.to_path_buf(),
            map,
        })
    }

    fn parse(&self) -> Result<SafeTensors<'_>, SafetensorsError> {
        SafeTensors::deserialize(&self.map).map_err(|source| SafetensorsError::Header {
            path: self.path.clone(),
            source,
        })
    }

    fn view<'a>(
        &self,
        st: &'a SafeTensors<'a>,
        name: &str,
    ) -> Result<TensorView<'a>, SafetensorsError> {
        st.tensor(name).map_err(|_| {
            let mut names = st.names();
            names.sort();
            SafetensorsError::Missing {
                path: self.path.clone(),
                name: name.to_string(),
                available: names.into_iter().cloned().collect::<Vec<_>>().join(", "),
            }
        })
    }
}

fn dtype_error(path: &Path, name: &str, got: Dtype, expected: &'static str) -> SafetensorsError {
    SafetensorsError::Dtype {
        path: path.to_path_buf(),
        name: name.to_string(),
        got: format!("{got:?}"),
        expected,
    }
}

/// Little-endian chunks of `N` bytes (safetensors data is little-endian and
/// not necessarily aligned in the file, so values are decoded bytewise).
fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes
        .chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact yields N bytes"))
}

/// Converts one tensor to f32. Float dtypes always; with `lossy_ints`, also
/// integers and bools (for comparing dumps, where `steps`/`halted` are ints).
fn to_f32(
    path: &Path,
    name: &str,
    v: &TensorView<'_>,
    lossy_ints: bool,
) -> Result<Tensor, SafetensorsError> {
    let b = v.data();
    let data: Vec<f32> = match v.dtype() {
        Dtype::F32 => chunks::<4>(b).map(f32::from_le_bytes).collect(),
        Dtype::BF16 => chunks::<2>(b)
            .map(|c| bf16::from_le_bytes(c).to_f32())
            .collect(),
        Dtype::F16 => chunks::<2>(b)
            .map(|c| f16::from_le_bytes(c).to_f32())
            .collect(),
        Dtype::F64 => chunks::<8>(b)
            .map(|c| f64::from_le_bytes(c) as f32)
            .collect(),
        Dtype::I32 if lossy_ints => chunks::<4>(b)
            .map(|c| i32::from_le_bytes(c) as f32)
            .collect(),
        Dtype::I64 if lossy_ints => chunks::<8>(b)
            .map(|c| i64::from_le_bytes(c) as f32)
            .collect(),
        Dtype::U8 | Dtype::BOOL if lossy_ints => b.iter().map(|&x| x as f32).collect(),
        Dtype::I8 if lossy_ints => b.iter().map(|&x| x as i8 as f32).collect(),
        got => {
            let expected = if lossy_ints {
                "a float, integer or bool dtype"
            } else {
                "F32, BF16, F16 or F64"
            };
            return Err(dtype_error(path, name, got, expected));
        }
    };
    Ok(Tensor {
        shape: v.shape().to_vec(),
        data,
    })
}

fn load_all(path: &Path, lossy_ints: bool) -> Result<BTreeMap<String, Tensor>, SafetensorsError> {
    let m = Mapped::open(path)?;
    let st = m.parse()?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = to_f32(path, &name, &view, lossy_ints)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Every tensor of a file of float tensors (F32, BF16, F16, F64), as f32.
/// An integer or bool tensor is an error naming it.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, SafetensorsError> {
    load_all(path, false)
}

/// Every tensor of the file as f32, integers and bools included (bools as
/// 0/1). Meant for comparing dumps, not for loading weights.
pub fn load_tensors_as_f32(path: &Path) -> Result<BTreeMap<String, Tensor>, SafetensorsError> {
    load_all(path, true)
}

/// One float tensor of a file, as f32.
pub fn load_tensor(path: &Path, name: &str) -> Result<Tensor, SafetensorsError> {
    let m = Mapped::open(path)?;
    let st = m.parse()?;
    let v = m.view(&st, name)?;
    to_f32(path, name, &v, false)
}

/// One integer tensor of a file as i32: I32 as is; I64, I16, I8, U8 and U16
/// converted (values must fit in i32). Floats are rejected.
pub fn load_i32(path: &Path, name: &str) -> Result<I32Tensor, SafetensorsError> {
    let m = Mapped::open(path)?;
    let st = m.parse()?;
    let v = m.view(&st, name)?;
    let b = v.data();
    let data: Vec<i32> = match v.dtype() {
        Dtype::I32 => chunks::<4>(b).map(i32::from_le_bytes).collect(),
        Dtype::I16 => chunks::<2>(b)
            .map(|c| i16::from_le_bytes(c) as i32)
            .collect(),
        Dtype::U16 => chunks::<2>(b)
            .map(|c| u16::from_le_bytes(c) as i32)
            .collect(),
        Dtype::I8 => b.iter().map(|&x| x as i8 as i32).collect(),
        Dtype::U8 => b.iter().map(|&x| x as i32).collect(),
        Dtype::I64 => {
            let mut out = Vec::with_capacity(b.len() / 8);
            for (index, c) in chunks::<8>(b).enumerate() {
                let value = i64::from_le_bytes(c);
                let x = i32::try_from(value).map_err(|_| SafetensorsError::IntRange {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    index,
                    value,
                })?;
                out.push(x);
            }
            out
        }
        got => {
            return Err(dtype_error(
                path,
                name,
                got,
                "an integer dtype (I32, I64, ...)",
            ))
        }
    };
    Ok(I32Tensor {
        shape: v.shape().to_vec(),
        data,
    })
}

/// Names and shapes of the tensors in a file, without converting data.
pub fn list_tensors(
    path: &Path,
) -> Result<BTreeMap<String, (String, Vec<usize>)>, SafetensorsError> {
    let m = Mapped::open(path)?;
    let st = m.parse()?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect())
}

/// The free-form `__metadata__` map of a file (empty if it has none).
pub fn load_metadata(path: &Path) -> Result<BTreeMap<String, String>, SafetensorsError> {
    let m = Mapped::open(path)?;
    let (_, meta) =
        SafeTensors::read_metadata(&m.map).map_err(|source| SafetensorsError::Header {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(meta
        .metadata()
        .clone()
        .map(|h| h.into_iter().collect())
        .unwrap_or_default())
}

/// A tensor to write, converted to bytes only when the writer asks for it
/// (so a large table is never held twice in memory for long).
struct OutView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    src: OutSrc<'a>,
}

enum OutSrc<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

impl View for &OutView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let bytes: Vec<u8> = match (&self.src, self.dtype) {
            (OutSrc::F32(x), Dtype::BF16) => x
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            (OutSrc::F32(x), _) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            (OutSrc::I32(x), _) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        let n = match &self.src {
            OutSrc::F32(x) => x.len(),
            OutSrc::I32(x) => x.len(),
        };
        n * self.dtype.size()
    }
}

/// Saves float tensors in `dtype`, atomically (temp file + rename).
pub fn save_tensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dtype: FloatDtype,
) -> Result<(), SafetensorsError> {
    save_tensors_with_metadata(path, tensors, dtype, &BTreeMap::new())
}

/// [`save_tensors`] with a `__metadata__` map (e.g. step, config hash).
pub fn save_tensors_with_metadata(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dtype: FloatDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<(), SafetensorsError> {
    let float = float_dtype(dtype);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        check_len(path, name, &t.shape, t.data.len())?;
        views.push((
            name.as_str(),
            OutView {
                dtype: float,
                shape: &t.shape,
                src: OutSrc::F32(&t.data),
            },
        ));
    }
    write_views(path, &views, metadata)
}

/// Saves a mix of float (in `dtype`) and int32 tensors, atomically.
pub fn save_mixed(
    path: &Path,
    tensors: &BTreeMap<String, Stored>,
    dtype: FloatDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<(), SafetensorsError> {
    let float = float_dtype(dtype);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let view = match t {
            Stored::F32(t) => {
                check_len(path, name, &t.shape, t.data.len())?;
                OutView {
                    dtype: float,
                    shape: &t.shape,
                    src: OutSrc::F32(&t.data),
                }
            }
            Stored::I32(t) => {
                check_len(path, name, &t.shape, t.data.len())?;
                OutView {
                    dtype: Dtype::I32,
                    shape: &t.shape,
                    src: OutSrc::I32(&t.data),
                }
            }
        };
        views.push((name.as_str(), view));
    }
    write_views(path, &views, metadata)
}

fn float_dtype(d: FloatDtype) -> Dtype {
    match d {
        FloatDtype::F32 => Dtype::F32,
        FloatDtype::BF16 => Dtype::BF16,
    }
}

fn check_len(path: &Path, name: &str, shape: &[usize], len: usize) -> Result<(), SafetensorsError> {
    let needed: usize = shape.iter().product();
    if needed != len {
        return Err(SafetensorsError::BadData {
            path: path.to_path_buf(),
            name: name.to_string(),
            shape: shape.to_vec(),
            len,
            needed,
        });
    }
    Ok(())
}

fn write_views(
    path: &Path,
    views: &[(&str, OutView<'_>)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), SafetensorsError> {
    let write_err = |source| SafetensorsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    let meta: Option<HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    let result = safetensors::serialize_to_file(views.iter().map(|(n, v)| (*n, v)), &meta, &tmp)
        .map_err(|source| match source {
            SafeTensorError::IoError(e) => write_err(e),
            source => SafetensorsError::Serialize {
                path: path.to_path_buf(),
                source,
            },
        })
        // Flush to disk before the rename so a crash cannot leave a renamed
        // but empty file.
        .and_then(|()| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(write_err)
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(write_err));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            data,
        }
    }

    fn sample() -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        m.insert(
            "a.weight".to_string(),
            t(&[2, 3], vec![1.0, -2.5, 3.25, 0.0, 0.5, -7.0]),
        );
        m.insert("b".to_string(), t(&[], vec![0.125]));
        m.insert(
            "c".to_string(),
            t(&[4], vec![1.0 / 3.0, 1e30, -1e-30, 65504.0]),
        );
        m
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let m = sample();
        save_tensors(&p, &m, FloatDtype::F32).unwrap();
        assert_eq!(load_tensors(&p).unwrap(), m);
        assert_eq!(load_tensor(&p, "b").unwrap(), m["b"]);
        let listed = list_tensors(&p).unwrap();
        assert_eq!(listed["a.weight"], ("F32".to_string(), vec![2, 3]));
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bf16_round_trip_rounds_to_nearest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let m = sample();
        save_tensors(&p, &m, FloatDtype::BF16).unwrap();
        assert_eq!(list_tensors(&p).unwrap()["c"].0, "BF16");
        let back = load_tensors(&p).unwrap();
        for (name, orig) in &m {
            let got = &back[name];
            assert_eq!(got.shape, orig.shape);
            for (x, y) in orig.data.iter().zip(&got.data) {
                assert_eq!(*y, bf16::from_f32(*x).to_f32(), "{name}");
                assert!((x - y).abs() <= x.abs() / 128.0, "{name}: {x} vs {y}");
            }
        }
        // Exactly representable values survive.
        assert_eq!(back["a.weight"].data, m["a.weight"].data);
    }

    #[test]
    fn mixed_i32_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("batch.safetensors");
        let mut m = BTreeMap::new();
        let ids = I32Tensor {
            shape: vec![2, 3],
            data: vec![0, 1, -100, 11, i32::MAX, i32::MIN],
        };
        m.insert("inputs".to_string(), Stored::I32(ids.clone()));
        m.insert("x".to_string(), Stored::F32(t(&[1], vec![2.0])));
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), "7".to_string());
        save_mixed(&p, &m, FloatDtype::F32, &meta).unwrap();
        assert_eq!(load_i32(&p, "inputs").unwrap(), ids);
        assert_eq!(load_metadata(&p).unwrap(), meta);
        // Ints are refused as weights, accepted as comparison data.
        let e = load_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("inputs") && e.contains("I32"), "{e}");
        assert_eq!(load_tensors_as_f32(&p).unwrap()["inputs"].data[3], 11.0);
        // Floats are refused as ints.
        let e = load_i32(&p, "x").unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("F32"), "{e}");
    }

    /// Builds a file with the crate directly, to read dtypes we never write.
    fn write_raw(p: &Path, name: &str, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) {
        let v = TensorView::new(dtype, shape, bytes).unwrap();
        safetensors::serialize_to_file([(name, v)], &None, p).unwrap();
    }

    #[test]
    fn reads_f16_f64_i64() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let bytes: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        write_raw(&p, "h", Dtype::F16, vec![2], &bytes);
        assert_eq!(load_tensor(&p, "h").unwrap().data, vec![1.5, -0.25]);

        let bytes: Vec<u8> = [0.1f64, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(&p, "d", Dtype::F64, vec![2], &bytes);
        assert_eq!(load_tensor(&p, "d").unwrap().data, vec![0.1f32, 2.0]);

        let bytes: Vec<u8> = [5i64, -100].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(&p, "l", Dtype::I64, vec![2], &bytes);
        assert_eq!(load_i32(&p, "l").unwrap().data, vec![5, -100]);

        let bytes: Vec<u8> = [1i64 << 40].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(&p, "big", Dtype::I64, vec![1], &bytes);
        let e = load_i32(&p, "big").unwrap_err();
        assert!(matches!(e, SafetensorsError::IntRange { .. }), "{e}");
    }

    #[test]
    fn errors_name_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.safetensors");
        let e = load_tensors(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.safetensors"), "{e}");

        let corrupt = dir.path().join("corrupt.safetensors");
        std::fs::write(&corrupt, b"\xff\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
        let e = load_tensors(&corrupt).unwrap_err();
        assert!(matches!(e, SafetensorsError::Header { .. }), "{e}");
        assert!(e.to_string().contains("corrupt.safetensors"));

        let p = dir.path().join("w.safetensors");
        save_tensors(&p, &sample(), FloatDtype::F32).unwrap();
        let e = load_tensor(&p, "zzz").unwrap_err().to_string();
        assert!(e.contains("zzz") && e.contains("a.weight"), "{e}");

        let mut bad = BTreeMap::new();
        bad.insert("bad".to_string(), t(&[3], vec![1.0]));
        let e = save_tensors(&p, &bad, FloatDtype::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad") && e.contains("[3]"), "{e}");
        // The failed save left the earlier file intact.
        assert_eq!(load_tensors(&p).unwrap(), sample());
    }
}
