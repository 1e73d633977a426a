#!/usr/bin/env bash
# Creates the python venv the tests use to cross-check files with numpy, and
# prints the path of its python on stdout. Everything else goes to stderr.
#
#   TRM_PYTHON="$(tools/install-test-python.sh)" cargo test
#
# Idempotent: once installed, a stamp file records the package set, and later
# runs print the path without touching the network. Set TRM_CACHE_DIR to move
# the cache (default: ~/.cache/trm). Needs python3 with the venv module and pip.
set -euo pipefail

log() { printf 'install-test-python: %s\n' "$*" >&2; }

# shellcheck source=lib/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"

CACHE_DIR="${TRM_CACHE_DIR:-$HOME/.cache/trm}"
PREFIX="$CACHE_DIR/pyenv"
STAMP="$PREFIX/installed.stamp"
PYTHON="${PYTHON:-python3}"
PACKAGES=("numpy")
SPEC="packages: ${PACKAGES[*]}"
VPY="$PREFIX/bin/python"

stamped() {
  [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$SPEC" ]] && [[ -x "$VPY" ]]
}

if stamped; then
  printf '%s\n' "$VPY"
  exit 0
fi

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.pyenv.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
  if stamped; then
    printf '%s\n' "$VPY"
    exit 0
  fi
fi

log "creating $PREFIX with ${PACKAGES[*]} (first run only)"
rm -rf "$PREFIX"
make_venv "$PREFIX"
"${VENV_PIP[@]}" install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
"$VPY" -c 'import numpy; print("install-test-python: numpy", numpy.__version__)' >&2
printf '%s\n' "$SPEC" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
printf '%s\n' "$VPY"
