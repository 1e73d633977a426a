//! Paths that must be text: folders a command records in a JSON or YAML file
//! (build info, run configs) are found again by that text, so a name that is
//! not valid UTF-8 is refused at start rather than recorded lossily.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} '{shown}' is not valid UTF-8; it is recorded as text, so choose a name in UTF-8")]
pub struct NonUtf8Path {
    pub flag: String,
    /// The path with its invalid bytes replaced, for the message.
    pub shown: String,
}

/// The path as text, or an error naming the option it came from.
pub fn require_utf8<'a>(flag: &str, path: &'a Path) -> Result<&'a str, NonUtf8Path> {
    path.to_str().ok_or_else(|| NonUtf8Path {
        flag: flag.to_string(),
        shown: path.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_bytes_are_refused_with_the_flag() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(b"out\xff"));
        let e = require_utf8("--out", p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--out 'out\u{fffd}' is not valid UTF-8; it is recorded as text, so choose a name in UTF-8"
        );
        assert_eq!(require_utf8("--out", Path::new("ok")), Ok("ok"));
    }
}
