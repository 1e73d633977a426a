#!/usr/bin/env bash
# Times one TRM ACT step in plain PyTorch on the CPU (2 threads, float32), as
# the baseline the trm CPU backend is measured against.
#
#   tools/bench-torch-cpu.sh            # install (once) and run all configs
#   tools/bench-torch-cpu.sh --iters 5  # extra arguments go to the python script
#
# The venv lives in $TRM_CACHE_DIR/torch-cpu (default ~/.cache/trm). Only plain
# PyPI is assumed reachable, so `pip install torch` brings the default Linux
# wheel (CUDA-enabled, several GB with its nvidia-* dependencies); the CUDA
# part is simply unused here. A stamp file makes later runs skip the network.
set -euo pipefail

log() { printf 'bench-torch-cpu: %s\n' "$*" >&2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${TRM_CACHE_DIR:-$HOME/.cache/trm}"
PREFIX="$CACHE_DIR/torch-cpu"
STAMP="$PREFIX/installed.stamp"
PYTHON="${PYTHON:-python3}"
PACKAGES=("torch" "numpy")
SPEC="packages: ${PACKAGES[*]}"
VPY="$PREFIX/bin/python"

if ! { [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$SPEC" ]] && [[ -x "$VPY" ]]; }; then
  avail_kb="$(df -Pk "$CACHE_DIR" 2>/dev/null | awk 'NR==2 {print $4}' || echo 0)"
  if [[ -n "$avail_kb" ]] && (( avail_kb < 8 * 1024 * 1024 )); then
    log "warning: under 8 GiB free at $CACHE_DIR; the torch wheel and its deps need about 5-7 GiB"
  fi
  mkdir -p "$CACHE_DIR"
  log "creating venv at $PREFIX"
  "$PYTHON" -m venv "$PREFIX"
  log "installing ${PACKAGES[*]} from PyPI (this can take several minutes)"
  "$VPY" -m pip install --quiet "${PACKAGES[@]}" >&2
  printf '%s\n' "$SPEC" >"$STAMP"
fi

if [[ "${1:-}" == "--install-only" ]]; then
  printf '%s\n' "$VPY"
  exit 0
fi

# Pin the thread pools to the 2 cores these machines have, whatever torch guesses.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
exec "$VPY" "$HERE/bench_torch_cpu.py" "$@"
