//! Hydra-style command-line overrides: `key=value`, `+key=value`,
//! `++key=value`, dotted keys into sections (`arch.L_cycles=4`), values read
//! as YAML (`data_paths=[a,b]`, `lr=3e-4`), plus Python's `True`, `False` and
//! `None`, which the reference's command lines use.

use serde_norway::{Mapping, Value};

/// One parsed override.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Override {
    /// The argument as given, for error messages.
    pub arg: String,
    pub path: Vec<String>,
    pub value: Value,
}

/// Why an argument is not an override.
#[derive(Debug, PartialEq)]
pub(crate) struct BadOverride {
    pub arg: String,
    pub reason: String,
}

pub(crate) fn parse(arg: &str) -> Result<Override, BadOverride> {
    let bad = |reason: String| BadOverride {
        arg: arg.to_string(),
        reason,
    };
    // `+` adds a key and `++` adds or replaces in Hydra; every key here
    // already has a default, so all three forms set the value.
    let body = arg
        .strip_prefix("++")
        .or_else(|| arg.strip_prefix('+'))
        .unwrap_or(arg);
    let Some((key, raw)) = body.split_once('=') else {
        return Err(bad("expected key=value".into()));
    };
    let path: Vec<String> = key.trim().split('.').map(String::from).collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(bad(format!("`{key}` is not a key (empty part)")));
    }
    Ok(Override {
        arg: arg.to_string(),
        path,
        value: parse_value(raw).map_err(bad)?,
    })
}

/// A value as YAML, with Python's spellings of null on top (YAML already reads
/// `True`/`False` as booleans). An empty value is an empty string, as in Hydra.
fn parse_value(raw: &str) -> Result<Value, String> {
    match raw.trim() {
        "" => Ok(Value::String(String::new())),
        "None" => Ok(Value::Null),
        text => {
            serde_norway::from_str(text).map_err(|e| format!("the value is not valid YAML: {e}"))
        }
    }
}

/// Sets the value at the override's path, creating sections on the way.
/// Paths are checked against the schema before this, so every step into a
/// section lands on a mapping or on nothing yet.
pub(crate) fn apply(tree: &mut Value, ov: &Override) {
    let mut node = tree;
    for segment in &ov.path {
        if !node.is_mapping() {
            // A file that set a section to a plain value (`arch: 3`): the
            // override replaces it, and serde judges the result.
            *node = Value::Mapping(Mapping::new());
        }
        node = match node {
            Value::Mapping(map) => map
                .entry(Value::String(segment.clone()))
                .or_insert(Value::Null),
            _ => return,
        };
    }
    *node = ov.value.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Value {
        serde_norway::from_str(text).unwrap()
    }

    #[test]
    fn forms_and_values() {
        let o = parse("+run_name=x").unwrap();
        assert_eq!(o.path, ["run_name"]);
        assert_eq!(o.value, Value::String("x".into()));
        let o = parse("++arch.L_cycles=4").unwrap();
        assert_eq!(o.path, ["arch", "L_cycles"]);
        assert_eq!(o.value, value("4"));
        assert_eq!(parse("ema=True").unwrap().value, Value::Bool(true));
        assert_eq!(parse("ema=False").unwrap().value, Value::Bool(false));
        assert_eq!(parse("load_checkpoint=None").unwrap().value, Value::Null);
        assert_eq!(parse("load_checkpoint=null").unwrap().value, Value::Null);
        assert_eq!(parse("lr=3e-4").unwrap().value, value("0.0003"));
        // The shell has already removed the quotes of data_paths='[...]'.
        assert_eq!(
            parse("data_paths=[data/arc2concept-aug-1000]")
                .unwrap()
                .value,
            value("['data/arc2concept-aug-1000']")
        );
        assert_eq!(parse("data_paths=[a,b]").unwrap().value, value("[a, b]"));
        // Only the first `=` splits.
        assert_eq!(
            parse("run_name=a=b").unwrap().value,
            Value::String("a=b".into())
        );
        assert_eq!(
            parse("run_name=").unwrap().value,
            Value::String(String::new())
        );
    }

    #[test]
    fn malformed_arguments() {
        assert_eq!(parse("lr").unwrap_err().reason, "expected key=value");
        assert!(parse("arch..L_cycles=1")
            .unwrap_err()
            .reason
            .contains("empty part"));
        assert!(parse("=1").is_err());
        assert!(parse("data_paths=[a")
            .unwrap_err()
            .reason
            .contains("not valid YAML"));
    }

    #[test]
    fn apply_sets_nested_values_and_creates_sections() {
        let mut tree = value("lr: 1\narch: {L_cycles: 6, H_cycles: 3}");
        apply(&mut tree, &parse("arch.L_cycles=4").unwrap());
        apply(
            &mut tree,
            &parse("arch.loss.loss_type=softmax_cross_entropy").unwrap(),
        );
        apply(&mut tree, &parse("+run_name=x").unwrap());
        assert_eq!(
            tree,
            value(
                "lr: 1\narch: {L_cycles: 4, H_cycles: 3, loss: {loss_type: softmax_cross_entropy}}\nrun_name: x"
            )
        );
    }
}
