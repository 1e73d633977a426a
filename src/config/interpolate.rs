//! `${...}` references between config values, the subset of OmegaConf's
//! interpolation the reference's files use: a whole value that names another
//! key, absolute (`${arch.hidden_size}`) or relative to its own section
//! (`${.hidden_size}`; each further dot goes one section up). Resolved after
//! the overrides, so `arch.hidden_size=256` moves `puzzle_emb_ndim` with it.

use serde_norway::Value;

/// A reference that cannot be resolved.
#[derive(Debug, PartialEq)]
pub(crate) struct BadReference {
    pub key: String,
    pub reference: String,
    pub reason: &'static str,
}

/// Longest chain of references followed (`a: ${b}`, `b: ${c}`, ...).
const MAX_DEPTH: usize = 16;

/// Replaces every reference in `tree` with the value it names.
pub(crate) fn resolve(tree: &mut Value) -> Result<(), BadReference> {
    let mut sites = Vec::new();
    collect(tree, &mut Vec::new(), &mut sites);
    // Look every target up in the unresolved tree, following chains, then write.
    let mut resolved = Vec::with_capacity(sites.len());
    for (path, reference) in &sites {
        let bad = |reason| BadReference {
            key: path.join("."),
            reference: reference.clone(),
            reason,
        };
        let (mut at, mut target) = (path.clone(), reference.clone());
        let mut depth = 0;
        let value = loop {
            let target_path =
                absolute(&at, &target).ok_or_else(|| bad("it goes above the top level"))?;
            let value = lookup(tree, &target_path).ok_or_else(|| bad("no such key"))?;
            match reference_in(value) {
                Some(next) if depth < MAX_DEPTH => {
                    (at, target) = (target_path, next.to_string());
                    depth += 1;
                }
                Some(_) => return Err(bad("the references go round in a loop")),
                None => break value.clone(),
            }
        };
        resolved.push((path.clone(), value));
    }
    for (path, value) in resolved {
        if let Some(slot) = lookup_mut(tree, &path) {
            *slot = value;
        }
    }
    Ok(())
}

/// The inside of `${...}` if the value is one whole reference.
fn reference_in(value: &Value) -> Option<&str> {
    value.as_str()?.strip_prefix("${")?.strip_suffix('}')
}

fn collect(value: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                if let Some(k) = k.as_str() {
                    path.push(k.to_string());
                    collect(v, path, out);
                    path.pop();
                }
            }
        }
        other => {
            if let Some(reference) = reference_in(other) {
                out.push((path.clone(), reference.to_string()));
            }
        }
    }
}

/// The absolute path named by `reference`, written at the key `at`.
fn absolute(at: &[String], reference: &str) -> Option<Vec<String>> {
    let rest = reference.trim_start_matches('.');
    let dots = reference.len() - rest.len();
    let mut base: Vec<String> = if dots == 0 {
        Vec::new()
    } else {
        // One dot: the section holding `at`; each more: one section up.
        let section = at.len().checked_sub(1)?;
        at[..section.checked_sub(dots - 1)?].to_vec()
    };
    base.extend(rest.split('.').map(String::from));
    Some(base)
}

fn lookup<'a>(tree: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(tree, |node, key| node.as_mapping()?.get(key.as_str()))
}

fn lookup_mut<'a>(tree: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(tree, |node, key| {
        node.as_mapping_mut()?.get_mut(key.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(text: &str) -> Value {
        serde_norway::from_str(text).unwrap()
    }

    #[test]
    fn relative_absolute_and_chained() {
        let mut t = tree(
            "arch: {hidden_size: 64, puzzle_emb_ndim: '${.hidden_size}', loss: {n: '${..hidden_size}'}}\n\
             lr: '${arch.puzzle_emb_ndim}'\nrun_name: plain",
        );
        resolve(&mut t).unwrap();
        assert_eq!(
            t,
            tree("arch: {hidden_size: 64, puzzle_emb_ndim: 64, loss: {n: 64}}\nlr: 64\nrun_name: plain")
        );
    }

    #[test]
    fn missing_targets_loops_and_escapes_are_errors() {
        let mut t = tree("arch: {puzzle_emb_ndim: '${.hiden_size}'}");
        let err = resolve(&mut t).unwrap_err();
        assert_eq!(err.key, "arch.puzzle_emb_ndim");
        assert_eq!(err.reference, ".hiden_size");
        assert_eq!(err.reason, "no such key");
        let mut t = tree("a: '${b}'\nb: '${a}'");
        assert_eq!(
            resolve(&mut t).unwrap_err().reason,
            "the references go round in a loop"
        );
        let mut t = tree("a: '${..b}'\nb: 1");
        assert_eq!(
            resolve(&mut t).unwrap_err().reason,
            "it goes above the top level"
        );
    }
}
