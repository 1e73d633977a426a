//! TensorBoard event files with scalar summaries, written by hand.
//!
//! A file is a sequence of TFRecords: `u64 length`, `u32 masked_crc32c(length
//! bytes)`, `data`, `u32 masked_crc32c(data)`, all little-endian. Each record
//! is a serialised `tensorflow.Event`; only the fields needed here are
//! encoded:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
//!           Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! The first record carries `file_version = "brain.Event:2"`, as TensorBoard
//! expects. Every record is flushed as written, so a live run is viewable.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::metrics::unix_time;
use super::{io_err, TelemetryError};

type Result<T> = std::result::Result<T, TelemetryError>;

/// CRC-32C (Castagnoli) lookup table, reflected polynomial 0x82F63B78.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C of `data` (bytewise table; records are small).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC (so a CRC stored in data has a different CRC).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Frames one record: length, its masked CRC, data, the data's masked CRC.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u8, wire: u8) {
    out.push((field << 3) | wire);
}

fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries besides time and step.
enum Payload<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(&'a str, f32)]),
    /// `SessionLog { status = START }` (field 6): TensorBoard then drops the
    /// events of earlier files past this step, i.e. those a resume replays.
    SessionStart,
}

fn encode_event(wall_time: f64, step: i64, payload: Payload<'_>) -> Vec<u8> {
    let mut ev = Vec::new();
    put_key(&mut ev, 1, FIXED64);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut ev, 2, VARINT);
    // int64 on the wire is the two's-complement bit pattern as a varint.
    put_varint(&mut ev, step as u64);
    match payload {
        Payload::FileVersion(v) => put_bytes(&mut ev, 3, v.as_bytes()),
        Payload::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                put_bytes(&mut v, 1, tag.as_bytes());
                put_key(&mut v, 2, FIXED32);
                v.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &v);
            }
            put_bytes(&mut ev, 5, &summary);
        }
        Payload::SessionStart => put_bytes(&mut ev, 6, &[0x08, 0x01]),
    }
    ev
}

/// The machine's host name for the file name (sanitised; "localhost" if
/// unknown).
fn host_name() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

/// Writes scalar summaries to `RUN_DIR/events.out.tfevents.<secs>.<host>`.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates a new event file in `run_dir` (never reusing an existing one:
    /// a resumed run adds a file, and TensorBoard merges them by step).
    pub fn create(run_dir: &Path) -> Result<EventWriter> {
        fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
        let now = unix_time();
        let base = format!("events.out.tfevents.{}.{}", now as u64, host_name());
        let mut path = run_dir.join(&base);
        let mut n = 0u32;
        let file = loop {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {
                    n += 1;
                    path = run_dir.join(format!("{base}.{}.{n}", std::process::id()));
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        };
        let mut w = EventWriter { path, file };
        w.write_event(&encode_event(now, 0, Payload::FileVersion("brain.Event:2")))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks a restart at `step` (after a resume), superseding what earlier
    /// event files logged past it.
    pub fn mark_restart(&mut self, step: u64) -> Result<()> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let ev = encode_event(unix_time(), step, Payload::SessionStart);
        self.write_event(&ev)
    }

    /// Logs one scalar at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: u64) -> Result<()> {
        self.add_scalars(step, &[(tag, value)])
    }

    /// Logs several scalars at `step` in one event.
    pub fn add_scalars(&mut self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let ev = encode_event(unix_time(), step, Payload::Scalars(values));
        self.write_event(&ev)
    }

    fn write_event(&mut self, ev: &[u8]) -> Result<()> {
        // One write per record: a crash tears at most the last record.
        self.file
            .write_all(&tfrecord(ev))
            .map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        let masked = masked_crc32c(b"123456789");
        assert_eq!(
            masked,
            0xE3069283u32.rotate_right(15).wrapping_add(0xa282ead8)
        );
    }

    /// A decoded event: (wall_time, step, file_version, [(tag, value)]).
    type Decoded = (f64, i64, Option<String>, Vec<(String, f32)>);

    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    /// Walks (field, wire, payload) of one protobuf message.
    fn fields(b: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = varint(b, &mut i);
            let (field, wire) = (key >> 3, (key & 7) as u8);
            let payload = match wire {
                VARINT => varint(b, &mut i).to_le_bytes().to_vec(),
                FIXED64 => {
                    i += 8;
                    b[i - 8..i].to_vec()
                }
                FIXED32 => {
                    i += 4;
                    b[i - 4..i].to_vec()
                }
                LEN => {
                    let n = varint(b, &mut i) as usize;
                    i += n;
                    b[i - n..i].to_vec()
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    fn decode_event(b: &[u8]) -> Decoded {
        let mut ev = (0.0, 0, None, Vec::new());
        for (field, _, p) in fields(b) {
            match field {
                1 => ev.0 = f64::from_le_bytes(p.try_into().unwrap()),
                2 => ev.1 = u64::from_le_bytes(p.try_into().unwrap()) as i64,
                3 => ev.2 = Some(String::from_utf8(p).unwrap()),
                5 => {
                    for (f, _, value) in fields(&p) {
                        assert_eq!(f, 1);
                        let mut tag = String::new();
                        let mut x = f32::NAN;
                        for (vf, _, vp) in fields(&value) {
                            match vf {
                                1 => tag = String::from_utf8(vp).unwrap(),
                                2 => x = f32::from_le_bytes(vp.try_into().unwrap()),
                                other => panic!("unexpected Value field {other}"),
                            }
                        }
                        ev.3.push((tag, x));
                    }
                }
                other => panic!("unexpected Event field {other}"),
            }
        }
        ev
    }

    /// Reads back every record, checking both CRCs of each.
    fn read_events(path: &Path) -> Vec<Decoded> {
        let b = fs::read(path).unwrap();
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let len_bytes = &b[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(len_bytes), "length CRC");
            let data = &b[i + 12..i + 12 + len];
            let data_crc = u32::from_le_bytes(b[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked_crc32c(data), "data CRC");
            out.push(decode_event(data));
            i += 16 + len;
        }
        assert_eq!(i, b.len());
        out
    }

    #[test]
    fn events_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let secs: u64 = name.split('.').nth(3).unwrap().parse().unwrap();
        assert!(secs > 1_600_000_000);

        w.add_scalar("train/loss", 2.75, 1).unwrap();
        w.add_scalars(300, &[("train/loss", 0.5), ("train/lr", 1e-4)])
            .unwrap();
        w.add_scalar("big", -1.5, 1 << 40).unwrap();

        let evs = read_events(w.path());
        assert_eq!(evs.len(), 4);
        assert_eq!(evs[0].2.as_deref(), Some("brain.Event:2"));
        assert!(evs[0].3.is_empty());
        assert!((evs[0].0 - secs as f64).abs() < 1.0);
        assert_eq!(evs[1].1, 1);
        assert_eq!(evs[1].3, [("train/loss".to_string(), 2.75)]);
        assert_eq!(evs[2].1, 300);
        assert_eq!(
            evs[2].3,
            [
                ("train/loss".to_string(), 0.5),
                ("train/lr".to_string(), 1e-4)
            ]
        );
        assert_eq!(evs[3].1, 1 << 40);
        assert!(evs[3].0 >= evs[0].0);

        // A second writer in the same second gets its own file.
        let w2 = EventWriter::create(dir.path()).unwrap();
        assert_ne!(w2.path(), w.path());
    }

    #[test]
    fn record_framing_matches_a_known_record() {
        // Protobuf bytes of Event{wall_time: 1.0, step: 2}, by hand.
        let ev = encode_event(1.0, 2, Payload::Scalars(&[]));
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1.0f64.to_le_bytes());
        expected.extend_from_slice(&[0x10, 0x02, 0x2a, 0x00]);
        assert_eq!(ev, expected);
        let rec = tfrecord(&ev);
        assert_eq!(rec.len(), ev.len() + 16);
        assert_eq!(&rec[..8], &(ev.len() as u64).to_le_bytes());
    }
}
