#!/usr/bin/env bash
# The device check: the one command for a lent H200, which also runs (with
# the kernels on the CPU emulator) on any machine. It
#   1. builds the kernels with the pinned nvcc into sm_90a cubins (build.rs
#      fails on any warning or register spill) and the kernel test binaries;
#   2. prints and saves ptxas' resources of every kernel (registers, spills,
#      static shared memory, stack);
#   3. runs the kernel test suites: each suite's tests run twice, the `_gpu`
#      variants (GPU_SUITES: on GPU 0, with TRM_REQUIRE_GPU=1 when nvidia-smi
#      lists a GPU, so a missing device fails rather than skips) and the rest
#      (EMU_SUITES: the CPU emulator, the probe, error paths);
#   4. runs the kernel microbenchmarks (benches/kernels.rs; without a GPU
#      they print so and make one tiny emulator pass);
#   5. writes bench/results/gpu-check-<date>.md (and, when $OUT names a
#      folder, a copy and the logs there).
# It stops itself before 8 minutes.
#
#   tools/gpu-check.sh                  # build and run here (needs cargo)
#   tools/gpu-check.sh --prepare DIR    # build here; put the test and bench binaries and
#                                       # the ptxas report into DIR (git-ignored
#                                       # as .gpu-check)
#   tools/gpu-check.sh --prebuilt DIR   # run what --prepare put into DIR
#
# The lent H200 machines have nvcc but no cargo and no network: run
# `--prepare .gpu-check` here, take .gpu-check along with the source tree, and
# run `tools/gpu-check.sh --prebuilt .gpu-check` there (x86-64 Linux binaries).
#
# nvcc: $NVCC if set, else an `nvcc` of release 13.0 on PATH, else the pinned
# one from tools/install-nvcc.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Test targets (tests/<name>.rs) this check runs.
# A suite in EMU_SUITES runs its tests except the `_gpu` ones; in GPU_SUITES,
# only the `_gpu` ones (the same bodies on GPU 0).
EMU_SUITES=(emu_harness kernel_ops cuda_runtime) # kernels on the CPU emulator
BUILD_SUITES=(kernels_build)                     # cubins and ptxas report (reads kernels/, so not in --prebuilt)
GPU_SUITES=(kernel_ops cuda_runtime)             # kernels, launchers and GEMMs on the GPU
BENCHES=(kernels)                                # benches/<name>.rs, harness = false

LIMIT_S=470 # 8 minutes, less a margin for the report
START=$(date +%s)
DATE=$(date -u +%Y-%m-%d)
RESULTS="bench/results/gpu-check-$DATE.md"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

log() { printf 'gpu-check: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
left() { echo $((LIMIT_S - ($(date +%s) - START))); }

mode=local
dir=
case "${1:-}" in
  --prepare | --prebuilt)
    [[ $# -eq 2 ]] || die "usage: $0 [--prepare DIR | --prebuilt DIR]"
    mode=${1#--}
    dir=$2
    ;;
  "") ;;
  *) die "usage: $0 [--prepare DIR | --prebuilt DIR]" ;;
esac

# --- build -------------------------------------------------------------------

pick_nvcc() {
  if [[ -n "${NVCC:-}" ]]; then
    return
  fi
  if command -v nvcc >/dev/null 2>&1 && nvcc --version | grep -q 'release 13\.0'; then
    NVCC=$(command -v nvcc)
  else
    NVCC="$(tools/install-nvcc.sh)/nvcc"
  fi
}

declare -A EXE=()
REPORT=
NVCC_VERSION=

build() {
  pick_nvcc
  export NVCC TRM_REQUIRE_KERNELS=1
  NVCC_VERSION=$("$NVCC" --version | grep release || true)
  log "nvcc: $NVCC ($NVCC_VERSION)"
  local targets=()
  for s in $(printf '%s\n' "${EMU_SUITES[@]}" "${BUILD_SUITES[@]}" "${GPU_SUITES[@]}" | sort -u); do targets+=(--test "$s"); done
  for b in "${BENCHES[@]}"; do targets+=(--bench "$b"); done
  log "building: cargo test --no-run ${targets[*]}"
  local status=0
  timeout "$(left)" cargo test --no-run --message-format=json "${targets[@]}" \
    >"$LOGS/build.json" 2>"$LOGS/build.log" || status=$?
  if ((status == 124)); then
    die "the build did not finish within the time limit (a cold cargo cache?); build once with \`cargo test --no-run\` and run again"
  elif ((status != 0)); then
    tail -n 40 "$LOGS/build.log" >&2
    die "build failed (log above)"
  fi
  # Test executables by target name, and the build-script folder holding the report.
  while read -r kind name path; do
    case $kind in
      exe) EXE[$name]=$path ;;
      out) [[ -f "$path/ptxas_report.tsv" ]] && REPORT="$path/ptxas_report.tsv" ;;
    esac
  done < <(python3 - "$LOGS/build.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    kinds = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and ("test" in kinds or "bench" in kinds):
        print("exe", m["target"]["name"], m["executable"])
    elif m.get("reason") == "build-script-executed" and "#trm@" in m.get("package_id", ""):
        print("out", "trm", m["out_dir"])
PY
  )
  [[ -n "$REPORT" ]] || die "the build wrote no ptxas report (were the kernels compiled?)"
}

# --- modes -------------------------------------------------------------------

# What runs: "kind:target" with kind emu, build or gpu.
SUITES_RUN=()
for s in "${EMU_SUITES[@]}"; do SUITES_RUN+=("emu:$s"); done
if [[ $mode == local ]]; then
  for s in "${BUILD_SUITES[@]}"; do SUITES_RUN+=("build:$s"); done
fi
for s in "${GPU_SUITES[@]}"; do SUITES_RUN+=("gpu:$s"); done
case $mode in
  local)
    build
    ;;
  prepare)
    build
    mkdir -p "$dir/bin"
    for s in $(printf '%s\n' "${EMU_SUITES[@]}" "${GPU_SUITES[@]}" "${BENCHES[@]}" | sort -u); do
      cp "${EXE[$s]}" "$dir/bin/$s"
      strip --strip-debug "$dir/bin/$s" 2>/dev/null || true
    done
    cp "$REPORT" "$dir/ptxas_report.tsv"
    printf '%s\n%s\n' "$NVCC_VERSION" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$dir/manifest"
    log "prepared $dir ($(du -sh "$dir" | cut -f1)); on the device: tools/gpu-check.sh --prebuilt $dir"
    exit 0
    ;;
  prebuilt)
    [[ -f "$dir/ptxas_report.tsv" && -f "$dir/manifest" ]] || die "$dir was not made by --prepare"
    REPORT="$dir/ptxas_report.tsv"
    NVCC_VERSION="$(sed -n 1p "$dir/manifest") (built where --prepare ran)"
    for s in "${EMU_SUITES[@]}" "${GPU_SUITES[@]}" "${BENCHES[@]}"; do
      EXE[$s]="$dir/bin/$s"
    done
    ;;
esac

# --- ptxas report --------------------------------------------------------------

ptxas_table() {
  echo "| kernel | file | registers | spill stores (B) | spill loads (B) | static smem (B) | stack (B) |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
  tail -n +2 "$REPORT" | sort -t$'\t' -k3,3 -k1,1 |
    awk -F'\t' '{ printf "| `%s` | %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, $7, $8 }'
}
PTXAS=$(ptxas_table)
SPILLS=$(tail -n +2 "$REPORT" | awk -F'\t' '$5 > 0 || $6 > 0' | wc -l)
echo "ptxas resources (sm_90a), $(($(wc -l <"$REPORT") - 1)) kernels, $SPILLS with spills:"
echo "$PTXAS"

# --- tests ---------------------------------------------------------------------

# A GPU present: the GPU variants must run (a missing device fails them).
HAVE_GPU=0
if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then HAVE_GPU=1; fi

ROWS=()
FAILED=0
for entry in "${SUITES_RUN[@]}"; do
  kind=${entry%%:*}
  s=${entry#*:}
  exe=${EXE[$s]:-}
  [[ -n "$exe" && -x "$exe" ]] || die "no test binary for suite $s"
  filter=(--skip _gpu)
  env_vars=()
  case $kind in
    emu) where="CPU emulator" ;;
    build) where="build check" filter=() ;;
    gpu)
      where="GPU"
      filter=(_gpu)
      if ((HAVE_GPU)); then env_vars=(TRM_REQUIRE_GPU=1); else where="GPU (none here: not run)"; fi
      ;;
  esac
  budget=$(left)
  ((budget > 10)) || die "out of time before suite $s"
  log "running $s ($where)"
  t0=$(date +%s%N)
  status=0
  timeout "$budget" env "${env_vars[@]}" "$exe" --test-threads=2 "${filter[@]}" >"$LOGS/$kind-$s.log" 2>&1 || status=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  summary=$(grep -E '^test result:' "$LOGS/$kind-$s.log" | tail -n 1 | sed -E 's/^test result: //; s/; finished in .*//')
  if ((status != 0)); then
    FAILED=1
    ((status == 124)) && summary="timed out; $summary"
    grep -E '^(test .* FAILED|---- |thread .* panicked)' "$LOGS/$kind-$s.log" | head -n 20 >&2 || true
    log "$s ($where) FAILED"
  fi
  ROWS+=("| $s | $where | ${summary:-no result line} | $((ms / 1000)).$((ms % 1000 / 100)) s |")
done

# --- benchmarks ------------------------------------------------------------------

BENCH_OUT=()
for b in "${BENCHES[@]}"; do
  exe=${EXE[$b]:-}
  [[ -n "$exe" && -x "$exe" ]] || die "no bench binary for $b"
  budget=$(left)
  ((budget > 10)) || die "out of time before bench $b"
  log "running bench $b"
  status=0
  timeout "$budget" "$exe" >"$LOGS/bench-$b.log" 2>&1 || status=$?
  cat "$LOGS/bench-$b.log"
  if ((status != 0)); then
    FAILED=1
    log "bench $b FAILED (status $status)"
  fi
  BENCH_OUT+=("### $b" "" '```' "$(cat "$LOGS/bench-$b.log")" '```' "")
done

# --- results file -------------------------------------------------------------

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //' || true)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain 2>/dev/null | head -n 1)" ]]; then commit="$commit (with uncommitted changes)"; fi
total=$(($(date +%s) - START))
outcome="all suites passed"
((FAILED == 0)) || outcome="FAILED"

mkdir -p bench/results
{
  echo "# GPU check ($DATE)"
  echo
  echo "Command: \`tools/gpu-check.sh${1:+ $*}\` ($mode mode), $total s in all: $outcome."
  echo
  echo "- machine: $(uname -srm), ${cpu:-unknown CPU}, $(nproc) cores"
  echo "- GPU: ${gpu:-none (the kernel suites ran on the CPU emulator)}"
  echo "- nvcc: ${NVCC_VERSION:-unknown}"
  echo "- commit: $commit"
  echo
  echo "## Test suites"
  echo
  echo "| suite | runs on | result | time |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  if ((HAVE_GPU == 0)); then
    echo
    echo "No GPU on this machine: the \`_gpu\` variants printed \"no CUDA device\" and"
    echo "asserted nothing; only the emulator suites checked the kernels."
  fi
  echo
  echo "## Kernel benchmarks"
  echo
  printf '%s\n' "${BENCH_OUT[@]}"
  echo
  echo "## ptxas resources (sm_90a)"
  echo
  echo "$SPILLS kernels with spills (the build fails on any)."
  echo
  echo "$PTXAS"
} >"$RESULTS"
log "wrote $RESULTS"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$RESULTS" "$OUT/"
  tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$LOGS" . 2>/dev/null || true
  log "copied the results and logs into \$OUT"
fi
log "done in $total s: $outcome"
exit "$FAILED"
