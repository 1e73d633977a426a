//! One-line error reports. Many errors here put their cause in their own
//! message *and* expose it as `source()`, so printing the whole chain would
//! repeat each cause two or three times; [`chain_once`] prints each once.

/// The error and its causes joined by `: `, leaving out every cause whose
/// text is already part of what was printed before it.
pub fn chain_once(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if !msg.is_empty() && !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain_once;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write {path}: {source}")]
    struct Write {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("checkpoint: {0}")]
    struct Outer(#[source] Write);

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::other("No space left on device");
        let e = Outer(Write {
            path: "x".into(),
            source: io,
        });
        let s = chain_once(&e);
        assert_eq!(s, "checkpoint: cannot write x: No space left on device");
        assert_eq!(s.matches("No space").count(), 1);
        // anyhow context adds a layer that does not repeat its cause
        let a = anyhow::Error::new(e).context("saving");
        let s = chain_once(a.as_ref());
        assert_eq!(s.matches("No space").count(), 1, "{s}");
        assert!(s.starts_with("saving: checkpoint"), "{s}");
    }
}
