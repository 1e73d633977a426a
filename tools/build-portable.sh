#!/usr/bin/env bash
# Builds a `trm` that runs on old Linux images (Kaggle notebooks, Ubuntu
# 20.04 and older): linked against glibc 2.17 symbols with cargo-zigbuild,
# with the CUDA kernels embedded. Prints the binary's path on stdout;
# everything else goes to stderr.
#
#   tools/build-portable.sh            # -> target/portable/trm
#   trm package --bundle DIR --checkpoint RUN/step_N --binary target/portable/trm
#
# glibc, not musl: a static musl binary cannot dlopen the CUDA driver
# (libcuda.so is a glibc library), so it would run on the CPU only.
#
# Needs: cargo, python3 (venv + pip) and PyPI on the first run (zig and
# cargo-zigbuild are installed into $TRM_CACHE_DIR/zig-0.13, default
# ~/.cache/trm), and nvcc (NVCC, else tools/install-nvcc.sh installs it).
# TRM_PORTABLE_GLIBC picks another glibc (default 2.17).
set -euo pipefail

log() { printf 'build-portable: %s\n' "$*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/venv.sh
source "$ROOT/tools/lib/venv.sh"

GLIBC="${TRM_PORTABLE_GLIBC:-2.17}"
CACHE_DIR="${TRM_CACHE_DIR:-$HOME/.cache/trm}"
PREFIX="$CACHE_DIR/zig-0.13"
PYTHON="${PYTHON:-python3}"
# A pair known to work together: cargo-zigbuild drives `python -m ziglang`.
PACKAGES=("ziglang==0.13.0" "cargo-zigbuild==0.19.8")
TARGET="x86_64-unknown-linux-gnu"

if [[ ! -x "$PREFIX/venv/bin/cargo-zigbuild" ]]; then
  log "installing ${PACKAGES[*]} from PyPI into $PREFIX (first run only)"
  rm -rf "$PREFIX"
  mkdir -p "$CACHE_DIR"
  make_venv "$PREFIX/venv"
  "${VENV_PIP[@]}" install --quiet --disable-pip-version-check --no-cache-dir \
    "${PACKAGES[@]}" >&2
fi
# cargo-zigbuild finds zig as `python3 -m ziglang`: the venv's python first.
export PATH="$PREFIX/venv/bin:$PATH"

if [[ -z "${NVCC:-}" ]]; then
  NVCC="$("$ROOT/tools/install-nvcc.sh")/nvcc"
  export NVCC
fi

# No debug info (the release profile keeps it for profiling): the bundle is
# shipped as a dataset, so its size counts. Symbols stay for backtraces.
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=debuginfo

log "building trm for $TARGET with glibc $GLIBC (kernels from $NVCC)"
start=$SECONDS
(cd "$ROOT" && cargo zigbuild --release --locked --bin trm --target "$TARGET.$GLIBC" >&2)
elapsed=$((SECONDS - start))

OUT_DIR="$ROOT/target/portable"
mkdir -p "$OUT_DIR"
cp "$ROOT/target/$TARGET/release/trm" "$OUT_DIR/trm.tmp"
mv "$OUT_DIR/trm.tmp" "$OUT_DIR/trm"
size=$(wc -c <"$OUT_DIR/trm")
log "built in ${elapsed} s: $OUT_DIR/trm ($((size / 1048576)) MiB); $("$OUT_DIR/trm" --version)"
log "\`trm package --bundle DIR ... --binary $OUT_DIR/trm\` reports the glibc it needs"
printf '%s\n' "$OUT_DIR/trm"
