//! Where the base config comes from: a config built into the binary (the
//! files of `configs/`, so `--config cpu-tiny` works without the repository),
//! a YAML file, or text in memory.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use super::ConfigError;

/// The built-in configs: name and YAML text.
pub const BUILTIN_CONFIGS: &[(&str, &str)] = &[
    (
        "cfg_pretrain",
        include_str!("../../configs/cfg_pretrain.yaml"),
    ),
    ("cpu-tiny", include_str!("../../configs/cpu-tiny.yaml")),
];

/// The base config that overrides apply to.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// One of [`BUILTIN_CONFIGS`], by name.
    Builtin(&'static str),
    File(PathBuf),
    /// YAML text, with a name for error messages.
    Text {
        origin: String,
        text: String,
    },
}

impl ConfigSource {
    /// A built-in config by name.
    pub fn builtin(name: &str) -> Result<Self, ConfigError> {
        builtin_text(name)
            .map(|(n, _)| ConfigSource::Builtin(n))
            .ok_or_else(|| unknown_builtin(name))
    }

    /// The `--config` argument: a path when it looks like one (it has a
    /// directory part or a `.yaml`/`.yml` extension), else a built-in name.
    pub fn from_arg(arg: &str) -> Result<Self, ConfigError> {
        let path = Path::new(arg);
        let has_dir = path.parent().is_some_and(|p| !p.as_os_str().is_empty());
        let yaml_ext = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if has_dir || yaml_ext {
            Ok(ConfigSource::File(path.to_path_buf()))
        } else {
            Self::builtin(arg)
        }
    }

    /// How error messages name this source.
    pub fn origin(&self) -> String {
        match self {
            ConfigSource::Builtin(name) => format!("built-in config `{name}`"),
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Text { origin, .. } => origin.clone(),
        }
    }

    /// The YAML text.
    pub(crate) fn read(&self) -> Result<Cow<'_, str>, ConfigError> {
        match self {
            ConfigSource::Builtin(name) => builtin_text(name)
                .map(|(_, text)| Cow::Borrowed(text))
                .ok_or_else(|| unknown_builtin(name)),
            ConfigSource::File(path) => {
                std::fs::read_to_string(path)
                    .map(Cow::Owned)
                    .map_err(|source| ConfigError::Io {
                        path: path.clone(),
                        source,
                    })
            }
            ConfigSource::Text { text, .. } => Ok(Cow::Borrowed(text)),
        }
    }
}

fn builtin_text(name: &str) -> Option<(&'static str, &'static str)> {
    BUILTIN_CONFIGS.iter().copied().find(|(n, _)| *n == name)
}

fn unknown_builtin(name: &str) -> ConfigError {
    let names: Vec<&str> = BUILTIN_CONFIGS.iter().map(|(n, _)| *n).collect();
    let hint = match super::keys::closest(name, &names) {
        Some(best) => format!("did you mean `{best}`?"),
        None => "give a path to a .yaml file for anything else".into(),
    };
    ConfigError::UnknownBuiltin {
        name: name.to_string(),
        builtins: names.join(", "),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_pick_builtin_or_file() {
        assert_eq!(
            ConfigSource::from_arg("cpu-tiny").unwrap(),
            ConfigSource::Builtin("cpu-tiny")
        );
        assert_eq!(
            ConfigSource::from_arg("configs/cpu-tiny.yaml").unwrap(),
            ConfigSource::File("configs/cpu-tiny.yaml".into())
        );
        assert_eq!(
            ConfigSource::from_arg("mine.yml").unwrap(),
            ConfigSource::File("mine.yml".into())
        );
        let err = ConfigSource::from_arg("cpu_tiny").unwrap_err().to_string();
        assert!(err.contains("did you mean `cpu-tiny`?"), "{err}");
        assert!(err.contains("cfg_pretrain, cpu-tiny"), "{err}");
    }

    #[test]
    fn builtins_are_the_repository_files() {
        for (name, text) in BUILTIN_CONFIGS {
            let on_disk = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{name}.yaml")),
            )
            .unwrap();
            assert_eq!(&on_disk, text);
        }
    }
}
