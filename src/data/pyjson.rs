//! JSON written the way Python's `json.dump` writes it by default
//! (`", "` and `": "` separators), so files we write are byte-compatible
//! with the reference's.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::Formatter;

struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Serialise `value` to `writer` in Python's default JSON style.
pub fn to_writer<W: Write, T: Serialize + ?Sized>(writer: W, value: &T) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(writer, PythonFormatter);
    value.serialize(&mut ser)
}

/// Serialise `value` to a string in Python's default JSON style.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    to_writer(&mut out, value).expect("serialising to memory cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_python_separators() {
        let v = serde_json::json!({"a": [[0, 1], [2]], "b": 1.5, "c": null, "d": "x"});
        assert_eq!(
            super::to_string(&v),
            r#"{"a": [[0, 1], [2]], "b": 1.5, "c": null, "d": "x"}"#
        );
    }
}
