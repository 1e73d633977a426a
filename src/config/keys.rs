//! The shape of a valid config tree: which keys exist at which level. Used to
//! reject unknown keys, naming the full dotted path and the nearest valid key,
//! before serde sees the tree (serde would name neither).

use serde_norway::Value;

use crate::model::config::ArchConfig;

/// Top-level keys, in the order `to_yaml` writes them (a test checks that
/// this list and [`super::RunConfig`]'s fields agree).
pub(crate) const TOP_KEYS: &[&str] = &[
    "arch",
    "data_paths",
    "data_paths_test",
    "evaluators",
    "global_batch_size",
    "epochs",
    "eval_interval",
    "checkpoint_every_eval",
    "lr",
    "lr_min_ratio",
    "lr_warmup_steps",
    "beta1",
    "beta2",
    "weight_decay",
    "puzzle_emb_lr",
    "puzzle_emb_weight_decay",
    "seed",
    "min_eval_interval",
    "ema",
    "ema_rate",
    "freeze_weights",
    "project_name",
    "run_name",
    "checkpoint_path",
    "load_checkpoint",
    "eval_save_outputs",
    "checkpoint_keep_last",
    "threads",
    "backend",
    "device",
    "checkpoint_on_signal",
];

/// `arch.loss` keys.
pub(crate) const LOSS_KEYS: &[&str] = &["name", "loss_type"];

/// `arch` keys beyond the network's own: the model and loss classes, and two
/// keys the reference writes that the network ignores.
const ARCH_EXTRA_KEYS: &[&str] = &["name", "loss", "H_layers", "batch_size"];

/// One level of the tree.
#[derive(Debug)]
enum Node {
    /// A value, checked by serde.
    Leaf,
    /// A mapping with exactly these keys.
    Map(Vec<(String, Node)>),
    /// A value whose inside is free-form (evaluator entries carry their own
    /// options), set whole.
    Free,
}

/// The valid keys of a run config.
#[derive(Debug)]
pub(crate) struct Schema {
    root: Node,
}

/// An unknown key: the full dotted path, and a hint for the fix.
#[derive(Debug, PartialEq)]
pub(crate) struct UnknownKey {
    pub key: String,
    pub hint: String,
}

/// A path that goes inside a plain value (`lr.x`): `key` is the value's path.
#[derive(Debug, PartialEq)]
pub(crate) struct NotASection {
    pub key: String,
}

#[derive(Debug, PartialEq)]
pub(crate) enum PathError {
    Unknown(UnknownKey),
    NotASection(NotASection),
}

impl Schema {
    pub(crate) fn new() -> Self {
        // The network's keys come from ArchConfig itself, so a field added
        // there is accepted here without a second list to keep in step.
        let mut arch: Vec<(String, Node)> =
            match serde_norway::to_value(ArchConfig::trm_default(1, 1, 1)) {
                Ok(Value::Mapping(m)) => m
                    .keys()
                    .filter_map(|k| k.as_str().map(|k| (k.to_string(), Node::Leaf)))
                    .collect(),
                _ => Vec::new(),
            };
        for &key in ARCH_EXTRA_KEYS {
            let node = if key == "loss" {
                leaves(LOSS_KEYS)
            } else {
                Node::Leaf
            };
            arch.push((key.to_string(), node));
        }
        let root = TOP_KEYS
            .iter()
            .map(|&key| {
                let node = match key {
                    "arch" => Node::Map(std::mem::take(&mut arch)),
                    "evaluators" => Node::Free,
                    _ => Node::Leaf,
                };
                (key.to_string(), node)
            })
            .collect();
        Schema {
            root: Node::Map(root),
        }
    }

    /// Checks the path of an override (`["arch", "L_cycles"]`).
    pub(crate) fn check_path(&self, path: &[String]) -> Result<(), PathError> {
        let mut node = &self.root;
        for (depth, segment) in path.iter().enumerate() {
            match node {
                Node::Map(children) => match find(children, segment) {
                    Some(child) => node = child,
                    None => {
                        return Err(PathError::Unknown(unknown(
                            &path[..depth],
                            segment,
                            children,
                        )))
                    }
                },
                Node::Leaf | Node::Free => {
                    return Err(PathError::NotASection(NotASection {
                        key: path[..depth].join("."),
                    }))
                }
            }
        }
        Ok(())
    }

    /// Checks every key of a whole tree (a config file).
    pub(crate) fn check_tree(&self, tree: &Value) -> Result<(), UnknownKey> {
        check_node(&self.root, tree, &mut Vec::new())
    }
}

fn leaves(keys: &[&str]) -> Node {
    Node::Map(keys.iter().map(|&k| (k.to_string(), Node::Leaf)).collect())
}

fn find<'a>(children: &'a [(String, Node)], key: &str) -> Option<&'a Node> {
    children.iter().find(|(k, _)| k == key).map(|(_, n)| n)
}

fn check_node(node: &Node, value: &Value, path: &mut Vec<String>) -> Result<(), UnknownKey> {
    // Only mappings have keys to check; a mapping where a plain value belongs
    // is a type error, which serde reports with its path.
    let (Node::Map(children), Value::Mapping(map)) = (node, value) else {
        return Ok(());
    };
    for (key, child_value) in map {
        let key = match key {
            Value::String(s) => s.clone(),
            other => serde_norway::to_string(other)
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|_| "?".to_string()),
        };
        let Some(child) = find(children, &key) else {
            return Err(unknown(path, &key, children));
        };
        path.push(key);
        check_node(child, child_value, path)?;
        path.pop();
    }
    Ok(())
}

fn unknown<S: AsRef<str>>(parent: &[S], key: &str, siblings: &[(String, Node)]) -> UnknownKey {
    let prefix: String = parent.iter().map(|s| format!("{}.", s.as_ref())).collect();
    let candidates: Vec<&str> = siblings.iter().map(|(k, _)| k.as_str()).collect();
    let hint = match closest(key, &candidates) {
        Some(best) => format!("did you mean `{prefix}{best}`?"),
        None => format!("valid keys here: {}", candidates.join(", ")),
    };
    UnknownKey {
        key: format!("{prefix}{key}"),
        hint,
    }
}

/// The candidate nearest to `key` by edit distance (case-insensitive, case
/// breaking ties), if it is near enough to be a plausible typo.
pub(crate) fn closest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let folded = key.to_lowercase();
    let (best, distance) = candidates
        .iter()
        .map(|&c| {
            let d = strsim::levenshtein(&folded, &c.to_lowercase());
            (c, (d, strsim::levenshtein(key, c)))
        })
        .min_by_key(|&(_, d)| d)?;
    let near = distance.0 <= (key.chars().count() / 3).max(2);
    let prefix = key.len() >= 3 && best.to_lowercase().starts_with(&folded);
    (near || prefix).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn known_paths_pass() {
        let schema = Schema::new();
        for p in [
            "lr",
            "arch.L_cycles",
            "arch.loss.loss_type",
            "arch.H_layers",
            "evaluators",
            "backend",
        ] {
            assert_eq!(schema.check_path(&path(p)), Ok(()), "{p}");
        }
    }

    #[test]
    fn typos_get_the_nearest_key() {
        let schema = Schema::new();
        let err = schema.check_path(&path("arch.L_cycle")).unwrap_err();
        assert_eq!(
            err,
            PathError::Unknown(UnknownKey {
                key: "arch.L_cycle".into(),
                hint: "did you mean `arch.L_cycles`?".into()
            })
        );
        let PathError::Unknown(err) = schema.check_path(&path("arch.loss.losstype")).unwrap_err()
        else {
            panic!("expected an unknown key");
        };
        assert_eq!(err.hint, "did you mean `arch.loss.loss_type`?");
        let PathError::Unknown(err) = schema.check_path(&path("lr_warmup")).unwrap_err() else {
            panic!("expected an unknown key");
        };
        assert_eq!(err.hint, "did you mean `lr_warmup_steps`?");
        // Case slips resolve to the right key.
        assert_eq!(
            closest("l_cycles", &["H_cycles", "L_cycles"]),
            Some("L_cycles")
        );
        // Nothing close: list what exists instead.
        let PathError::Unknown(err) = schema.check_path(&path("arch.loss.zzzzzzzz")).unwrap_err()
        else {
            panic!("expected an unknown key");
        };
        assert_eq!(err.hint, "valid keys here: name, loss_type");
    }

    #[test]
    fn paths_into_plain_values_are_rejected() {
        let schema = Schema::new();
        assert_eq!(
            schema.check_path(&path("lr.x")),
            Err(PathError::NotASection(NotASection { key: "lr".into() }))
        );
        assert_eq!(
            schema.check_path(&path("evaluators.0.name")),
            Err(PathError::NotASection(NotASection {
                key: "evaluators".into()
            }))
        );
    }

    #[test]
    fn whole_trees_are_checked_at_every_level() {
        let schema = Schema::new();
        let tree: Value = serde_norway::from_str(
            "arch: {hidden_size: 8, loss: {name: x, los_type: y}}\nevaluators: [{name: arc@ARC, anything: 1}]",
        )
        .unwrap();
        let err = schema.check_tree(&tree).unwrap_err();
        assert_eq!(err.key, "arch.loss.los_type");
        assert_eq!(err.hint, "did you mean `arch.loss.loss_type`?");
        let tree: Value = serde_norway::from_str("lr: 1\nevaluators: [{name: a, b: 2}]").unwrap();
        assert_eq!(schema.check_tree(&tree), Ok(()));
    }
}
