#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, the CUDA headers
# and CCCL) from PyPI into a private venv under the trm cache, and prints the
# folder holding `nvcc` on stdout. Everything else goes to stderr.
#
#   NVCC="$(tools/install-nvcc.sh)/nvcc" cargo build
#
# Idempotent: once installed, a stamp file records the package set and the bin
# folder, and later runs print it without touching the network. Set
# TRM_CACHE_DIR to move the cache (default: ~/.cache/trm). Needs python3 with
# the venv module and pip, and network access to PyPI on the first run.
set -euo pipefail

log() { printf 'install-nvcc: %s\n' "$*" >&2; }

# shellcheck source=lib/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"

CACHE_DIR="${TRM_CACHE_DIR:-$HOME/.cache/trm}"
PREFIX="$CACHE_DIR/nvcc-13.0"
STAMP="$PREFIX/installed.stamp"
PYTHON="${PYTHON:-python3}"
PACKAGES=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
)
SPEC="packages: ${PACKAGES[*]}"

# Fast path: the stamp names the package set and the bin folder.
stamped_bin() {
  [[ -f "$STAMP" ]] || return 1
  [[ "$(sed -n 1p "$STAMP")" == "$SPEC" ]] || return 1
  local bin
  bin="$(sed -n 2p "$STAMP")"
  [[ -x "$bin/nvcc" ]] || return 1
  printf '%s\n' "$bin"
}

if stamped_bin; then
  exit 0
fi

mkdir -p "$CACHE_DIR"
# One installer at a time (tests and CI may start together).
exec 9>"$CACHE_DIR/.nvcc-13.0.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
  if stamped_bin; then
    exit 0
  fi
fi

log "installing CUDA 13.0 nvcc from PyPI into $PREFIX (about 300 MB, first run only)"
rm -rf "$PREFIX"
make_venv "$PREFIX/venv"
VPY="$PREFIX/venv/bin/python"
"${VENV_PIP[@]}" install --quiet --disable-pip-version-check --no-cache-dir \
  "${PACKAGES[@]}" >&2

SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
BIN="$SITE/nvidia/cu13/bin"
if [[ ! -x "$BIN/nvcc" ]]; then
  log "error: nvcc not found at $BIN/nvcc after installing ${PACKAGES[*]}"
  exit 1
fi

# Prove the toolchain works end to end: a bf16 kernel to an sm_90a cubin.
CHECK="$(mktemp -d)"
trap 'rm -rf "$CHECK"' EXIT
cat >"$CHECK/check.cu" <<'CU'
#include <cuda_bf16.h>
extern "C" __global__ void trm_install_check(const float* x, __nv_bfloat16* y, long n) {
  long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}
CU
if ! "$BIN/nvcc" -cubin -arch=sm_90a -O3 -o "$CHECK/check.cubin" "$CHECK/check.cu" >&2; then
  log "error: the installed nvcc could not compile a bf16 test kernel"
  exit 1
fi
log "$("$BIN/nvcc" --version | tail -n 2 | head -n 1)"

printf '%s\n%s\n' "$SPEC" "$BIN" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "done"
printf '%s\n' "$BIN"
