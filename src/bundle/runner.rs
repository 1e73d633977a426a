//! The bundle's runner, `DIR/run`: one POSIX sh script (dash, busybox sh)
//! that a notebook cell calls to write the submission.
//!
//! It uses no program but the shell and the bundle's `trm` on its normal
//! path (no dirname, no /dev/null), so it runs in a bare image: the test
//! runs it in a chroot holding only the shell, the bundle and the C library.

/// Where the ARC Prize 2025 notebook finds the hidden test set.
pub const DEFAULT_CHALLENGES: &str = "/kaggle/input/arc-prize-2025/arc-agi_test_challenges.json";
/// Where Kaggle collects the submission from.
pub const DEFAULT_OUT: &str = "/kaggle/working/submission.json";

/// Folders under a Python prefix where the NVIDIA wheels (PyTorch's
/// dependencies on notebook images) keep cuBLASLt: `nvidia-cublas-cu12`
/// and the CUDA 13 wheels' shared `cu13` folder.
const WHEEL_LIB_DIRS: [&str; 2] = ["nvidia/cublas/lib", "nvidia/cu13/lib"];
/// Python prefixes of common images (Debian/Ubuntu system and pip, conda,
/// per-user installs).
const PYTHON_PREFIXES: [&str; 4] = [
    "/usr/local/lib",
    "/usr/lib",
    "/opt/conda/lib",
    "${HOME:-/nonexistent}/.local/lib",
];

/// The script's text. `glibc` is what the bundled binary needs (for the
/// message when it does not start).
pub fn script(glibc: Option<&str>) -> String {
    let glibc = match glibc {
        Some(v) => format!("glibc {v} or newer"),
        None => "no glibc (a static binary)".to_string(),
    };
    let globs: Vec<String> = PYTHON_PREFIXES
        .iter()
        .flat_map(|p| {
            WHEEL_LIB_DIRS
                .iter()
                .map(move |d| format!("  \"{p}\"/python3*/*-packages/{d} \\"))
        })
        .collect();
    TEMPLATE
        .replace("@DEFAULT_CHALLENGES@", DEFAULT_CHALLENGES)
        .replace("@DEFAULT_OUT@", DEFAULT_OUT)
        .replace("@GLIBC@", &glibc)
        .replace("@WHEEL_LIB_GLOBS@", &globs.join("\n"))
}

const TEMPLATE: &str = r#"#!/bin/sh
# The runner of a trm offline bundle (see BUNDLE.md beside it):
#
#   run [CHALLENGES_JSON [OUT_JSON]] [trm infer options...]
#   run doctor        what trm finds on this machine (GPUs, cuBLASLt, CPU)
#
# Solves CHALLENGES_JSON with the bundle's model and writes the Kaggle
# submission to OUT_JSON (replacing it). Defaults: the competition's paths.
# Options after the paths go to `trm infer` (e.g. --device cpu).
# Exits with trm's status. POSIX sh, and no other program.
set -u

default_challenges='@DEFAULT_CHALLENGES@'
default_out='@DEFAULT_OUT@'

usage() {
  echo "usage: $0 [CHALLENGES_JSON [OUT_JSON]] [trm infer options...]" >&2
  echo "       (defaults: $default_challenges $default_out)" >&2
  echo "       $0 doctor" >&2
}

# The bundle's folder: this script's own, as an absolute path.
case $0 in
*/*) here=${0%/*} ;;
*) here=. ;;
esac
[ -n "$here" ] || here=/
if ! bundle=$(cd "$here" && pwd -P); then
  echo "run: cannot enter the bundle folder $here" >&2
  exit 1
fi

# cuBLASLt for the CUDA engine: notebook images carry it in the NVIDIA
# Python wheels, outside the loader's path. Only folders that exist are
# added, after the caller's own LD_LIBRARY_PATH.
libs=
for dir in \
@WHEEL_LIB_GLOBS@
  /usr/local/cuda/lib64; do
  if [ -d "$dir" ]; then
    libs=${libs:+$libs:}$dir
  fi
done
if [ -n "$libs" ]; then
  LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$libs
  export LD_LIBRARY_PATH
fi
# Libraries the bundle carries (`trm package --bundle --lib`, e.g. cuBLASLt
# 13 for an image whose wheels have another release) come first.
if [ -d "$bundle/lib" ]; then
  LD_LIBRARY_PATH=$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
fi

# An uploaded dataset can lose the executable bit, and its folder may not
# allow running programs: then a copy in a writable folder is run.
trm=$bundle/trm
if ! version=$("$trm" --version 2>&1); then
  copy=${TMPDIR:-/tmp}/trm-bundle-$$
  if mkdir -p "$copy" && cp "$trm" "$copy/trm" && chmod 755 "$copy/trm" &&
    version=$("$copy/trm" --version 2>&1); then
    trm=$copy/trm
  else
    echo "run: cannot start $bundle/trm: $version" >&2
    echo "run: it needs Linux x86_64 with @GLIBC@ (bundle.json); on an older system, bundle a build of tools/build-portable.sh" >&2
    exit 126
  fi
fi

case ${1:-} in
doctor)
  shift
  exec "$trm" doctor "$@"
  ;;
-h | --help)
  usage
  exit 0
  ;;
esac

# Up to two leading paths; the rest are trm infer options.
challenges=$default_challenges
out=$default_out
if [ $# -gt 0 ]; then
  case $1 in
  -*) ;;
  *)
    [ -z "$1" ] || challenges=$1
    shift
    if [ $# -gt 0 ]; then
      case $1 in
      -*) ;;
      *)
        [ -z "$1" ] || out=$1
        shift
        ;;
      esac
    fi
    ;;
  esac
fi
if [ ! -f "$challenges" ]; then
  echo "run: no challenges file at $challenges" >&2
  usage
  exit 2
fi

echo "run: ${version}; model $bundle/model; $challenges -> $out" >&2
exec "$trm" infer --model "$bundle/model" --challenges "$challenges" --out "$out" --force "$@"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_the_defaults_and_every_wheel_folder() {
        let s = script(Some("2.17"));
        assert!(s.starts_with("#!/bin/sh\n"));
        // `@NAME@` placeholders, not the shell's "$@"
        let left = s
            .split('@')
            .skip(1)
            .any(|w| w.starts_with(|c: char| c.is_ascii_uppercase()));
        assert!(!left, "a placeholder is left:\n{s}");
        assert!(s.contains(&format!("default_challenges='{DEFAULT_CHALLENGES}'")));
        assert!(s.contains(&format!("default_out='{DEFAULT_OUT}'")));
        assert!(s.contains("glibc 2.17 or newer"));
        for p in PYTHON_PREFIXES {
            for d in WHEEL_LIB_DIRS {
                assert!(s.contains(&format!("\"{p}\"/python3*/*-packages/{d} \\\n")));
            }
        }
        // No program besides the shell and trm on the normal path.
        assert!(!s.contains("/dev/null") && !s.contains("dirname"));
    }
}
