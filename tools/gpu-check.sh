#!/usr/bin/env bash
# The device check: the one command for a lent H200, which also runs (with
# the kernels on the CPU emulator) on any machine. It
#   0. runs `trm doctor` first (at most 30 s, never failing the check), so the
#      results start with what trm sees on the machine;
#   1. builds the kernels with the pinned nvcc for every architecture (with
#      --prepare: sm_90a and the compute_80 PTX, GPU_CHECK_ARCHS; build.rs
#      fails on any warning or register spill) and the kernel test binaries;
#   2. finds libcuda and libcublasLt and puts them where cudarc's run-time
#      loading looks, and reports where libnccl.so.2 is (trm loads NCCL
#      itself: src/dist/nccl/library.rs) (see setup_libraries);
#   3. prints and saves ptxas' resources of every kernel;
#   4. runs the `_gpu` tests of GPU_SUITES on GPU 0, one test thread each (a
#      GPU fault is sticky for the context and would fail every later test),
#      with TRM_REQUIRE_GPU=1 in --prebuilt mode, so a missing device fails
#      rather than skips (in local mode only when nvidia-smi lists a GPU);
#   5. runs MEMCHECK_SUITES' `_gpu` tests under compute-sanitizer memcheck
#      (when found; at most MEMCHECK_LIMIT_S);
#   6. runs the kernel microbenchmarks (benches/kernels.rs), the NCCL
#      all-reduce of the ARC config's gradient buffer with one rank
#      (benches/nccl.rs, at most NCCL_BENCH_LIMIT_S), the training-step
#      benchmark of the CUDA engine (benches/train_step.rs: ARC config, L_cycles
#      4 and 6, local batches 96/192/384, per-phase times) and, when a python3
#      with torch is found, the PyTorch attention baseline
#      (tools/bench_attention_torch.py) and the PyTorch ACT step
#      (tools/bench_torch_gpu.py, eager and compiled), with our samples/s over
#      theirs;
#   7. runs the other tests of EMU_SUITES on the CPU emulator (and, locally,
#      BUILD_SUITES);
#   8. writes bench/results/gpu-check-<date>.md (-no-gpu.md, git-ignored, where
#      nvidia-smi lists no GPU) and, when $OUT names a folder,
#      copies it, the logs (gpu-check-logs.tar.gz) and the baseline's JSON
#      there, even when the check stops early (the results then say partial),
#      and prints a summary table last.
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

# --- what runs: the one place to add a suite ---------------------------------
# Test targets (tests/<name>.rs). EMU_SUITES run their tests except the `_gpu`
# ones; GPU_SUITES only the `_gpu` ones (the same bodies on GPU 0), in this
# order; MEMCHECK_SUITES' `_gpu` tests also run under compute-sanitizer.
EMU_SUITES=(emu_harness kernel_ops cuda_runtime attention nccl_device) # kernels on the CPU emulator (not in --prebuilt: CI runs them)
BUILD_SUITES=(kernels_build)                     # cubins and ptxas report (reads kernels/, so not in --prebuilt)
GPU_SUITES=(emu_harness kernel_ops attention cuda_runtime kernel_images gpu_engine nccl_device infer) # arch.cuh self-tests first, then kernels, launchers, GEMMs, the compute_80 PTX against the native image, the engine, NCCL (world of one), trm infer on every GPU
MEMCHECK_SUITES=(kernel_ops attention)           # compute-sanitizer memcheck
BENCHES=(kernels nccl train_step)                # benches/<name>.rs, harness = false
declare -A BENCH_LIMIT_S=([nccl]=60)             # a bench's own limit (else the time left)

LIMIT_S=${GPU_CHECK_LIMIT_S:-470} # 8 minutes, less a margin for the report (the variable: to test skipping)
SUITE_LIMIT_S=180    # one GPU suite: a hung kernel must not take the whole run
MEMCHECK_LIMIT_S=90  # memcheck slows kernels 10-100x: a sample, not the budget
TORCH_LIMIT_S=90     # the PyTorch baseline (about 30 s on an H200)
TORCH_STEP_LIMIT_S=150 # the PyTorch ACT step, eager and compiled, L_cycles 4 (about 2 min)
START=$(date +%s)
DATE=$(date -u +%Y-%m-%d)
RESULTS="bench/results/gpu-check-$DATE.md"
LOGS="$(mktemp -d)"
SHIM="$(mktemp -d)" # links under the names cudarc tries (setup_libraries)
TEST_TMP="$(mktemp -d)" # scratch of the suites that start trm (not in the logs)
ORIG_LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
ARGS="$*"

log() { printf 'gpu-check: %s\n' "$*" >&2; }
STOP_REASON=
die() {
  log "error: $*"
  STOP_REASON=$*
  exit 1
}
left() { echo $((LIMIT_S - ($(date +%s) - START))); }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }

mode=local
dir=

# --- the report, written on every exit ----------------------------------------

# Summary rows: step, where, result, seconds, state: ok, FAIL (a failure: exit
# status 1), skip (out of time), warn (worth a look, not a failure) or info.
ROWS=()
DETAILS=()  # failure excerpts, printed under the summary
FAILED=0
SKIPPED=0
COMPLETE=0 # set when every step ran
RUNNING=0  # set once a run mode (not --prepare) starts running steps
LIB_LINES=()
SMI=
PTXAS=
SPILLS=
BENCH_OUT=()
TORCH_TABLE=
COMPARE_TABLE=
TORCH_STEP_TABLE=
STEP_COMPARE_TABLE=
SASS_TABLE=
NVCC_VERSION=
TRM_BIN=   # the trm binary (built alongside the tests, or DIR/bin/trm)
DOCTOR=    # `trm doctor`'s report

# Fields split by the unit separator: `read` would merge runs of tabs (empty fields).
row() {
  ROWS+=("$1"$'\x1f'"$2"$'\x1f'"$3"$'\x1f'"$4"$'\x1f'"$5")
  case $5 in
    FAIL) FAILED=1 ;;
    skip) SKIPPED=1 ;;
  esac
}

# The failures of a test log, short: the failed tests on one line, then the
# first few distinct panic messages with where they were raised.
excerpt() {
  local failed
  failed=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$1" | tr '\n' ' ')
  [[ -z $failed ]] || echo "failed: $failed" | cut -c1-600
  awk '/^thread .* panicked at/ {
         loc = $0; msg = ""; getline msg
         if (msg in seen) { dup++; next }
         seen[msg] = 1
         if (++n <= 4) { print substr(loc, 1, 200); print "  " substr(msg, 1, 300) } else dup++
       }
       END { if (dup) print "  (" dup " more panics, same or further messages: see the log)" }' "$1"
}

write_results() {
  local total=$(($(date +%s) - START)) outcome gpu cpu commit
  outcome="all steps passed"
  ((SKIPPED == 0)) || outcome="passed, some steps skipped"
  ((FAILED == 0)) || outcome="FAILED"
  ((COMPLETE)) || outcome="PARTIAL (stopped early: ${STOP_REASON:-unexpected exit}); $outcome so far"
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)
  cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //' || true)
  if [[ $mode == prebuilt && -f "$dir/manifest" ]]; then
    # The device's copy of the tree may carry a stale .git: the commit the
    # binaries were built at is the one that counts.
    commit="$(sed -n 2p "$dir/manifest") (binaries built there by --prepare)"
  else
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n "$(git status --porcelain 2>/dev/null | head -n 1)" ]]; then commit="$commit (with uncommitted changes)"; fi
  fi
  mkdir -p "$(dirname "$RESULTS")"
  {
    echo "# GPU check ($DATE)"
    echo
    echo "Command: \`tools/gpu-check.sh${ARGS:+ $ARGS}\` ($mode mode), $total s in all: $outcome."
    echo
    echo "- machine: $(uname -srm), ${cpu:-unknown CPU}, $(nproc) cores"
    echo "- GPU: ${gpu:-none listed by nvidia-smi}"
    echo "- nvcc: ${NVCC_VERSION:-unknown}"
    echo "- commit: $commit"
    echo
    echo "## trm doctor"
    echo
    echo '```'
    echo "${DOCTOR:-(not run)}"
    echo '```'
    echo
    echo "## Steps"
    echo
    echo "| step | runs on | result | time |"
    echo "| --- | --- | --- | --- |"
    local r step where result secs state
    for r in "${ROWS[@]}"; do
      IFS=$'\x1f' read -r step where result secs state <<<"$r"
      [[ $state != FAIL ]] || result="**FAILED**: $result"
      echo "| $step | $where | $result | ${secs:+$secs s} |"
    done
    if ((${#DETAILS[@]})); then
      echo
      echo "Failures:"
      echo
      echo '```'
      printf '%s\n' "${DETAILS[@]}"
      echo '```'
    fi
    echo
    echo "## Libraries"
    echo
    if ((${#LIB_LINES[@]})); then printf -- '- %s\n' "${LIB_LINES[@]}"; else echo "(not searched)"; fi
    echo
    echo "## nvidia-smi"
    echo
    echo '```'
    echo "${SMI:-(not run)}"
    echo '```'
    echo
    echo "## Kernel benchmarks"
    echo
    if ((${#BENCH_OUT[@]})); then printf '%s\n' "${BENCH_OUT[@]}"; else echo "(not run)"; fi
    echo
    echo "## PyTorch attention baseline"
    echo
    echo '```'
    echo "${TORCH_TABLE:-(not run)}"
    echo '```'
    echo
    echo "## Fused attention against the best SDPA backend (speed-up > 1: ours faster)"
    echo
    echo "${COMPARE_TABLE:-(not run)}"
    echo
    echo "## PyTorch ACT step baseline (tools/bench_torch_gpu.py)"
    echo
    echo '```'
    echo "${TORCH_STEP_TABLE:-(not run)}"
    echo '```'
    echo
    echo "## Training step: the CUDA engine against PyTorch (ratio > 1: ours faster)"
    echo
    echo "${STEP_COMPARE_TABLE:-(not run)}"
    echo
    echo "## SASS of the attention kernels"
    echo
    echo "${SASS_TABLE:-(not run)}"
    echo
    echo "## ptxas resources (every architecture built)"
    echo
    if [[ -n "$PTXAS" ]]; then
      echo "$SPILLS kernels with spills (the build fails on any)."
      echo
      echo "$PTXAS"
    else
      echo "(not read)"
    fi
  } >"$RESULTS"
  log "wrote $RESULTS"
}

# Logs and results into $OUT, within its limits (8 files of 16 MiB).
copy_out() {
  [[ -n "${OUT:-}" && -d "${OUT:-}" ]] || return 0
  cp "$RESULTS" "$OUT/"
  [[ ! -f "$LOGS/torch-attention.json" ]] || cp "$LOGS/torch-attention.json" "$OUT/"
  [[ ! -f "$LOGS/attention.json" ]] || cp "$LOGS/attention.json" "$OUT/"
  tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$LOGS" . 2>/dev/null || true
  if (($(stat -c %s "$OUT/gpu-check-logs.tar.gz" 2>/dev/null || echo 0) > 15 * 1024 * 1024)); then
    # Too big to come back: the last 2 MB of each log instead.
    local cut f
    cut=$(mktemp -d)
    for f in "$LOGS"/*; do tail -c 2000000 "$f" >"$cut/$(basename "$f")"; done
    tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$cut" . 2>/dev/null || true
    rm -rf "$cut"
  fi
  log "copied the results and logs into \$OUT ($OUT)"
}

# The last lines of output: the device tool returns only the tail.
print_summary() {
  local r step where result secs state mark
  echo
  echo "=== gpu-check summary ($mode mode, $(($(date +%s) - START)) s) ==="
  for r in "${ROWS[@]}"; do
    IFS=$'\x1f' read -r step where result secs state <<<"$r"
    case $state in
      FAIL) mark="FAIL" ;;
      skip) mark="SKIP" ;;
      warn) mark="WARN" ;;
      info) mark="    " ;;
      *) mark="ok  " ;;
    esac
    printf '%s %-26s %-17s %s%s\n' "$mark" "$step" "$where" "${result:0:150}" "${secs:+ ($secs s)}"
  done
  if ((${#DETAILS[@]})); then
    echo "--- failures ---"
    printf '%s\n' "${DETAILS[@]}" | head -n 60
  fi
  local outcome="all steps passed"
  ((SKIPPED == 0)) || outcome="passed, some steps skipped (SKIP above)"
  ((FAILED == 0)) || outcome="FAILED (FAIL above)"
  ((COMPLETE)) || outcome="STOPPED EARLY: ${STOP_REASON:-unexpected exit}; partial results; $outcome so far"
  local out=
  [[ -z "${OUT:-}" || ! -d "${OUT:-}" ]] || out=" and \$OUT ($OUT)"
  echo "gpu-check: $outcome; results in $RESULTS$out"
}

finish() {
  local status=$?
  trap - EXIT
  set +e
  if ((RUNNING)); then
    write_results
    copy_out
    print_summary
    ((COMPLETE)) && status=$FAILED
  fi
  rm -rf "$LOGS" "$SHIM"
  exit "$status"
}
trap finish EXIT

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

# Every test and bench target of the lists above, once.
all_targets() {
  printf '%s\n' "$@" | sort -u
}

build() {
  pick_nvcc
  export NVCC TRM_REQUIRE_KERNELS=1
  if [[ $mode == prepare ]]; then
    # Only the images an H200 loads (its SASS, and the PTX kernel_images
    # compares with it): every binary embeds the images, and all five
    # architectures would take the binaries over the carry cap.
    export TRM_CUDA_ARCHS=${GPU_CHECK_ARCHS:-sm_90a,compute_80}
    log "kernel images for the device: TRM_CUDA_ARCHS=$TRM_CUDA_ARCHS"
  fi
  NVCC_VERSION=$("$NVCC" --version | grep release || true)
  log "nvcc: $NVCC ($NVCC_VERSION)"
  local targets=() s b
  for s in $(all_targets "${EMU_SUITES[@]}" "${BUILD_SUITES[@]}" "${GPU_SUITES[@]}" "${MEMCHECK_SUITES[@]}"); do targets+=(--test "$s"); done
  for b in "${BENCHES[@]}"; do targets+=(--bench "$b"); done
  log "building: cargo test --no-run ${targets[*]}"
  local status=0 t0=$SECONDS
  timeout "$(left)" cargo test --no-run --message-format=json "${targets[@]}" \
    >"$LOGS/build.json" 2>"$LOGS/build.log" || status=$?
  if ((status == 124)); then
    row build "here" "timed out" $((SECONDS - t0)) FAIL
    die "the build did not finish within the time limit (a cold cargo cache?); build once with \`cargo test --no-run\` and run again"
  elif ((status != 0)); then
    tail -n 40 "$LOGS/build.log" >&2
    row build "here" "cargo failed (build.log)" $((SECONDS - t0)) FAIL
    die "build failed (log above)"
  fi
  # Test executables by target name, and the build-script folder holding the report.
  local kind name path
  while read -r kind name path; do
    case $kind in
      exe) EXE[$name]=$path ;;
      bin) TRM_BIN=$path ;;
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
    elif m.get("reason") == "compiler-artifact" and m.get("executable") and "bin" in kinds and m["target"]["name"] == "trm":
        print("bin", "trm", m["executable"])
    elif m.get("reason") == "build-script-executed" and "#trm@" in m.get("package_id", ""):
        print("out", "trm", m["out_dir"])
PY
  )
  [[ -n "$REPORT" ]] || die "the build wrote no ptxas report (were the kernels compiled?)"
  [[ $mode == prepare ]] || row build "here" "cargo test --no-run: $((${#targets[@]} / 2)) targets" $((SECONDS - t0)) ok
}

# --- libraries ---------------------------------------------------------------
# cudarc (dynamic-loading, cuda-13000) dlopens, per library, the names of
# cudarc::get_lib_name_candidates: lib<name>.so first, then ...64 forms, then
# lib<name>.so.13, .12, .11, .10, .9 and .1. So libcuda.so.1 and
# libcublasLt.so.13 are tried by their real sonames, but the bare names come
# first: a CUDA stub libcuda.so or another release's libcublasLt.so earlier on
# the path would win. Hence links under the bare names in a private folder
# ($SHIM), first on LD_LIBRARY_PATH, to the exact files found, plus those
# files' folders (for their own dependencies). NCCL needs no link: trm loads
# libnccl.so.2 itself (LD_LIBRARY_PATH, python wheels, CUDA and system
# folders, the loader's cache); its folder only joins LD_LIBRARY_PATH when
# found somewhere trm does not look (e.g. /opt/torch/.venv).

LIBS=(libcuda.so.1 libcublasLt.so.13)

# Folders that may hold the libraries, most trusted first.
library_dirs() {
  local d py
  local IFS=:
  for d in $ORIG_LD_LIBRARY_PATH; do echo "$d"; done
  unset IFS
  ldconfig -p 2>/dev/null | sed -n 's/.* => \(.*\)\/[^/]*$/\1/p' | sort -u || true
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 \
    /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib; do
    echo "$d"
  done
  # The site-packages of whatever python3 is on PATH (pip's nvidia-* wheels).
  for py in /opt/torch/.venv/bin/python3 python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    timeout 20 "$py" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null |
      while read -r d; do
        for sub in "$d"/nvidia/*/lib; do echo "$sub"; done
      done || true
  done
}

setup_libraries() {
  local dirs=() d lib found how shim_name extra=() missing=() cached
  mapfile -t dirs < <(library_dirs | awk 'length && !seen[$0]++')
  # Folders the loader already searches (its cache) need no path entry.
  cached=:$(ldconfig -p 2>/dev/null | sed -n 's/.* => \(.*\)\/[^/]*$/\1/p' | sort -u | tr '\n' :)
  for lib in "${LIBS[@]}"; do
    found=
    for d in "${dirs[@]}"; do
      # A stub (link-time only) or forward-compat libcuda is not the driver's.
      [[ $d != */stubs* && $d != */compat* ]] || continue
      if [[ -e "$d/$lib" ]]; then
        found=$(readlink -f "$d/$lib")
        how=$d
        break
      fi
    done
    if [[ -z "$found" ]]; then
      missing+=("$lib")
      LIB_LINES+=("$lib: MISSING (searched LD_LIBRARY_PATH, ldconfig -p, /usr/local/cuda*, /usr/local/nvidia, python site-packages/nvidia/*/lib)")
      log "library $lib: MISSING"
      continue
    fi
    shim_name=${lib%.so*}.so
    ln -sf "$found" "$SHIM/$shim_name"
    [[ $cached == *":$how:"* ]] || extra+=("$how")
    LIB_LINES+=("$lib: $how ($found), also as $shim_name in the private link folder")
    log "library $lib: $found (in $how)"
  done
  # libnccl.so.2: reported; its folder on the path only when trm would not
  # look there itself.
  found=
  for d in "${dirs[@]}"; do
    if [[ -e "$d/libnccl.so.2" ]]; then
      found=$(readlink -f "$d/libnccl.so.2")
      how=$d
      break
    fi
  done
  if [[ -z "$found" ]]; then
    LIB_LINES+=("libnccl.so.2: not found by the script (trm searches itself; the nccl_device suite and the nccl bench report what it found)")
    log "library libnccl.so.2: not found by the script"
  else
    case $how in
      /usr/lib/x86_64-linux-gnu | /lib/x86_64-linux-gnu | /usr/lib64 | /usr/lib | /usr/local/lib | /usr/local/cuda*/lib64 | /usr/local/nvidia/lib64) ;;
      *) [[ $cached == *":$how:"* ]] || extra+=("$how") ;;
    esac
    LIB_LINES+=("libnccl.so.2: $how ($found); loaded by trm itself")
    log "library libnccl.so.2: $found (in $how)"
  fi
  local path=$SHIM
  for d in "${extra[@]}"; do
    [[ ":$path:" == *":$d:"* ]] || path="$path:$d"
  done
  # The caller's entries stay after ours, stub folders dropped.
  local IFS=:
  for d in $ORIG_LD_LIBRARY_PATH; do
    [[ -n $d && $d != */stubs* && ":$path:" != *":$d:"* ]] && path="$path:$d"
  done
  unset IFS
  export LD_LIBRARY_PATH=$path
  LIB_LINES+=("LD_LIBRARY_PATH=$LD_LIBRARY_PATH")
  log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  # What cudarc will open: the bare names, through the loader (python's ctypes
  # is dlopen), when a python3 is at hand.
  local check=
  if command -v python3 >/dev/null 2>&1; then
    check=$(timeout 20 python3 - libcuda.so libcublasLt.so <<'PY' 2>&1 || true
import ctypes, sys
for name in sys.argv[1:]:
    try:
        ctypes.CDLL(name)
        print(f"{name} loads")
    except OSError as e:
        print(f"{name} does not load: {e}")
PY
    )
    while read -r line; do
      [[ -n $line ]] && LIB_LINES+=("dlopen check: $line") && log "dlopen check: $line"
    done <<<"$check"
  fi
  local summary="found $((${#LIBS[@]} - ${#missing[@]}))/${#LIBS[@]}"
  ((${#missing[@]} == 0)) || summary="$summary; MISSING ${missing[*]}"
  [[ $check != *"does not load"* ]] || summary="$summary; a dlopen check failed (results)"
  local state=ok
  [[ $summary != *MISSING* && $summary != *failed* ]] || state=warn
  row libraries "loader" "$summary" "" "$state"
}

# --- modes -------------------------------------------------------------------

case $mode in
  local)
    RUNNING=1
    build
    ;;
  prepare)
    build
    # A folder of an earlier --prepare: its binaries would be gzipped again
    # and carried stale.
    rm -rf "$dir/bin"
    mkdir -p "$dir/bin"
    for s in $(all_targets "${EMU_SUITES[@]}" "${GPU_SUITES[@]}" "${MEMCHECK_SUITES[@]}" "${BENCHES[@]}"); do
      cp "${EXE[$s]}" "$dir/bin/$s"
    done
    [[ -n "$TRM_BIN" ]] || die "the build made no trm binary (for trm doctor)"
    cp "$TRM_BIN" "$dir/bin/trm"
    # Stripped and gzipped: what the device call carries is capped (64 MiB
    # with everything else); --prebuilt unpacks them (60 MB -> ~19 MB).
    for f in "$dir"/bin/*; do
      strip --strip-debug "$f" 2>/dev/null || true
      gzip -9 -f "$f"
    done
    size=$(du -sb "$dir" | cut -f1)
    ((size < 48 * 1024 * 1024)) || die "$dir is $((size / 1024 / 1024)) MiB: too big to carry to the device (limit 64 MiB with the tree)"
    cp "$REPORT" "$dir/ptxas_report.tsv"
    # The cubins, for the SASS check on the device (cuobjdump is there, not here).
    mkdir -p "$dir/cubin"
    cp "$(dirname "$REPORT")"/kernels/*.sm_90a.cubin "$dir/cubin/" 2>/dev/null || true
    printf '%s\n%s\n' "$NVCC_VERSION" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$dir/manifest"
    log "prepared $dir ($(du -sh "$dir" | cut -f1)); on the device: tools/gpu-check.sh --prebuilt $dir"
    exit 0
    ;;
  prebuilt)
    RUNNING=1
    [[ -f "$dir/ptxas_report.tsv" && -f "$dir/manifest" ]] || die "$dir was not made by --prepare"
    REPORT="$dir/ptxas_report.tsv"
    NVCC_VERSION="$(sed -n 1p "$dir/manifest") (built where --prepare ran)"
    # The binaries come gzipped (see prepare); unpacked outside $dir, which
    # may be read-only, and outside $LOGS, which goes to the results.
    BIN_DIR=$(mktemp -d)
    for f in "$dir"/bin/*.gz; do
      [[ -e $f ]] || die "$dir/bin holds no binaries (run --prepare again)"
      name=$(basename "$f" .gz)
      gzip -dc "$f" >"$BIN_DIR/$name" || die "cannot unpack $f"
      chmod +x "$BIN_DIR/$name"
    done
    for s in $(all_targets "${EMU_SUITES[@]}" "${GPU_SUITES[@]}" "${MEMCHECK_SUITES[@]}" "${BENCHES[@]}"); do
      EXE[$s]="$BIN_DIR/$s"
    done
    TRM_BIN="$BIN_DIR/trm"
    ;;
esac

setup_libraries

# --- trm doctor: what trm sees here, before anything else runs ------------------
# With the library links of setup_libraries, as the tests get them. Its
# outcome is information only: the check goes on whatever it says.
if [[ -x "$TRM_BIN" ]]; then
  t0=$SECONDS
  doctor_status=0
  DOCTOR=$(timeout 30 "$TRM_BIN" doctor 2>&1) || doctor_status=$?
  echo "$DOCTOR"
  result="report in the results"
  ((doctor_status == 0)) || result="exit status $doctor_status (output in the results)"
  row "trm doctor" "" "$result" $((SECONDS - t0)) info
else
  DOCTOR="(no trm binary${TRM_BIN:+ at $TRM_BIN}; run --prepare again?)"
  row "trm doctor" "" "no trm binary" "" warn
fi
# NCCL here runs a world of one rank: loopback is all the network it needs
# (no hunt for interfaces or InfiniBand), and its warnings go to the logs.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# The GPU variants must run: on the device always (a vacuous pass without a
# GPU is the worst outcome there); locally when nvidia-smi lists a GPU.
REQUIRE_GPU=0
if [[ $mode == prebuilt ]] || nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then REQUIRE_GPU=1; fi
# A run where nvidia-smi lists no GPU never replaces the day's GPU results.
nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || RESULTS="bench/results/gpu-check-$DATE-no-gpu.md"
# Plain nvidia-smi only reads state.
if command -v nvidia-smi >/dev/null 2>&1; then
  SMI=$(timeout 30 nvidia-smi 2>&1 || true)
  echo "$SMI"
  row nvidia-smi "" "$(nvidia-smi -L 2>/dev/null | head -n 2 | tr '\n' ' ' || true)" "" info
else
  SMI="nvidia-smi not found"
  row nvidia-smi "" "not found" "" info
fi
log "TRM_REQUIRE_GPU=$REQUIRE_GPU for the GPU suites"

# --- ptxas report --------------------------------------------------------------

ptxas_table() {
  echo "| kernel | file | arch | registers | spill stores (B) | spill loads (B) | static smem (B) | stack (B) |"
  echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
  tail -n +2 "$REPORT" | sort -t$'\t' -k3,3 -k1,1 -k4,4 |
    awk -F'\t' '{ printf "| `%s` | %s | %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, $7, $8, $9 }'
}
PTXAS=$(ptxas_table)
SPILLS=$(tail -n +2 "$REPORT" | awk -F'\t' '$6 > 0 || $7 > 0' | wc -l)
echo "ptxas resources (every architecture), $(($(wc -l <"$REPORT") - 1)) kernel rows, $SPILLS with spills:"
echo "$PTXAS"

# --- tests ---------------------------------------------------------------------

# Whether there is time for a step; records it as skipped when not.
have_time() {
  if (($(left) > 15)); then return 0; fi
  row "$1" "$2" "SKIPPED: out of time" "" skip
  log "$1: skipped, out of time"
  return 1
}

# Whether the test or bench binary is there; a failure row when not (the
# other steps still run).
has_binary() {
  [[ -n "$3" && -x "$3" ]] && return 0
  row "$1" "$2" "no binary ${3:-for it} (run --prepare again?)" "" FAIL
  log "$1: no binary ${3:-for it}"
  return 1
}

# run_suite KIND SUITE: KIND emu (tests but `_gpu`), build (all) or gpu (`_gpu`).
run_suite() {
  local kind=$1 s=$2 exe=${EXE[$2]:-} where filter=() env_vars=() threads=() limit
  limit=$(left)
  case $kind in
    emu) where="emulator" filter=(--skip _gpu) ;;
    build) where="build check" ;;
    gpu)
      where="GPU"
      filter=(_gpu)
      threads=(--test-threads=1) # a fault is sticky for the shared context
      limit=$(min "$limit" "$SUITE_LIMIT_S")
      if ((REQUIRE_GPU)); then env_vars=(TRM_REQUIRE_GPU=1); else where="GPU (none)"; fi
      # Suites that start trm (infer) find it and their scratch space here,
      # not at the build's paths.
      env_vars+=(TRM_TEST_BIN="$TRM_BIN" TRM_TEST_TMPDIR="$TEST_TMP")
      ;;
  esac
  have_time "$kind $s" "$where" || return 0
  if ! has_binary "$kind $s" "$where" "$exe"; then return 0; fi
  log "running $s ($where)"
  local t0=$SECONDS status=0 logf="$LOGS/$kind-$s.log" summary
  timeout -k 5 "$limit" env "${env_vars[@]}" "$exe" "${threads[@]}" "${filter[@]}" >"$logf" 2>&1 || status=$?
  summary=$(grep -E '^test result:' "$logf" | tail -n 1 | sed -E 's/^test result: //; s/; 0 ignored; 0 measured//; s/; finished in .*//')
  if ((status != 0)); then
    ((status == 124 || status == 137)) && summary="timed out after $limit s; ${summary:-no result line}"
    DETAILS+=("[$kind $s] (log $kind-$s.log, exit $status)")
    mapfile -t -O "${#DETAILS[@]}" DETAILS < <(excerpt "$logf")
    [[ -n "$summary" ]] || mapfile -t -O "${#DETAILS[@]}" DETAILS < <(tail -n 5 "$logf" | cut -c1-220)
    excerpt "$logf" >&2
    log "$s ($where) FAILED"
    row "$kind $s" "$where" "${summary:-no result line}" $((SECONDS - t0)) FAIL
  else
    row "$kind $s" "$where" "$summary" $((SECONDS - t0)) ok
  fi
}

for s in "${GPU_SUITES[@]}"; do run_suite gpu "$s"; done

# --- compute-sanitizer ------------------------------------------------------------

find_sanitizer() {
  local c
  if command -v compute-sanitizer >/dev/null 2>&1; then
    command -v compute-sanitizer
    return
  fi
  for c in /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer \
    /opt/nvidia/*/compute-sanitizer /opt/nvidia/*/bin/compute-sanitizer /opt/nvidia/*/*/compute-sanitizer \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/bin/compute-sanitizer \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/compute-sanitizer/compute-sanitizer; do
    [[ -x "$c" ]] && echo "$c" && return
  done
  return 0
}

# Memory errors only: --report-api-errors no, as the error-path tests make
# driver calls fail on purpose.
run_memcheck() {
  local s=$1 exe=${EXE[$1]:-} sanitizer limit
  if ((REQUIRE_GPU == 0)); then
    row "memcheck $s" "GPU (none)" "not run: no GPU" "" info
    return
  fi
  sanitizer=$(find_sanitizer)
  if [[ -z "$sanitizer" ]]; then
    row "memcheck $s" "GPU" "not run: compute-sanitizer not found (PATH, /usr/local/cuda*, /opt/nvidia)" "" info
    log "compute-sanitizer not found"
    return
  fi
  have_time "memcheck $s" "GPU" || return 0
  if ! has_binary "memcheck $s" "GPU" "$exe"; then return 0; fi
  limit=$(min "$(left)" "$MEMCHECK_LIMIT_S")
  log "running $s under $sanitizer --tool memcheck (at most $limit s)"
  local t0=$SECONDS status=0 logf="$LOGS/memcheck-$s.log" errors result state=ok
  timeout -k 5 "$limit" env TRM_REQUIRE_GPU=1 "$sanitizer" --tool memcheck --report-api-errors no \
    --error-exitcode 86 --print-limit 30 \
    "$exe" --test-threads=1 _gpu >"$logf" 2>&1 || status=$?
  errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) error.*/\1/p' "$logf" | tail -n 1)
  # Reports seen before a timeout count too.
  local reported
  reported=$(grep -c -E '^========= (Invalid|Program hit|Uninitialized|Malloc|Leaked|Race|Error)' "$logf" || true)
  if [[ -n "$errors" && "$errors" != 0 ]] || ((status == 86 || reported > 0)); then
    result="errors found (${errors:-$reported})"
    state=FAIL
  elif ((status == 124 || status == 137)); then
    result="timed out after $limit s, no error reported before ($(grep -c -E '^test .* ok$' "$logf" || true) tests done)"
    state=warn
  elif ((status != 0)); then
    result="tests failed under memcheck (exit $status)"
    state=FAIL
  else
    result="clean (${errors:-0} errors; $(grep -E '^test result:' "$logf" | tail -n 1 | sed -E 's/^test result: //; s/; finished in .*//'))"
  fi
  if [[ $state == FAIL ]]; then
    DETAILS+=("[memcheck $s] (log memcheck-$s.log, exit $status)")
    mapfile -t -O "${#DETAILS[@]}" DETAILS < <(grep -E -A3 '^========= (Invalid|Program hit|Uninitialized|Error)' "$logf" | cut -c1-220 | head -n 16 || true)
    mapfile -t -O "${#DETAILS[@]}" DETAILS < <(excerpt "$logf")
  fi
  row "memcheck $s" "GPU" "$result" $((SECONDS - t0)) "$state"
}


# --- benchmarks ------------------------------------------------------------------

for b in "${BENCHES[@]}"; do
  exe=${EXE[$b]:-}
  where=GPU
  ((REQUIRE_GPU)) || where="emulator (no GPU)"
  have_time "bench $b" "$where" || continue
  has_binary "bench $b" "$where" "$exe" || continue
  log "running bench $b"
  t0=$SECONDS
  status=0
  limit=$(min "$(left)" "${BENCH_LIMIT_S[$b]:-$(left)}")
  TRM_BENCH_ATTENTION_JSON="$LOGS/attention.json" TRM_BENCH_TRAIN_JSON="$LOGS/train-step.json" \
    timeout -k 5 "$limit" "$exe" >"$LOGS/bench-$b.log" 2>&1 || status=$?
  cat "$LOGS/bench-$b.log"
  BENCH_OUT+=("### $b" "" '```' "$(cat "$LOGS/bench-$b.log")" '```' "")
  if ((status != 0)); then
    ((status == 124 || status == 137)) && log "bench $b: timed out after $limit s"
    DETAILS+=("[bench $b] (log bench-$b.log, exit $status)")
    mapfile -t -O "${#DETAILS[@]}" DETAILS < <(tail -n 6 "$LOGS/bench-$b.log" | cut -c1-220)
    row "bench $b" "$where" "exit $status" $((SECONDS - t0)) FAIL
  elif ((REQUIRE_GPU)) && grep -q -E 'GPU (kernel|train-step|NCCL) benchmarks? not run' "$LOGS/bench-$b.log"; then
    DETAILS+=("[bench $b] $(head -n 1 "$LOGS/bench-$b.log" | cut -c1-220)")
    row "bench $b" "$where" "did not run: $(grep -m1 -E 'benchmarks? not run' "$LOGS/bench-$b.log" | cut -c1-120)" $((SECONDS - t0)) FAIL
  else
    row "bench $b" "$where" "$(wc -l <"$LOGS/bench-$b.log") lines (results)" $((SECONDS - t0)) ok
  fi
done

# --- PyTorch attention baseline ------------------------------------------------------

torch_python() {
  local py
  for py in /opt/torch/.venv/bin/python3 python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    # find_spec: no torch import (seconds) just to learn it is there.
    if timeout 20 "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null; then
      command -v "$py"
      return
    fi
  done
  return 0
}

# One PyTorch baseline script: LABEL (its row), NAME (its log, NAME.log), its
# own limit in seconds, the variable that receives its table, the pattern of
# a timing line in its output (empty: a clean exit is enough), then the script
# and its arguments. A baseline, not our code: a failure is shown, but it is
# not a failure of the check.
run_torch_script() {
  local label=$1 name=$2 max_s=$3 table_var=$4 timing=$5
  shift 5
  local py
  if ((REQUIRE_GPU == 0)); then
    row "$label" "GPU (none)" "not run: no GPU" "" info
    return
  fi
  py=$(torch_python)
  if [[ -z "$py" ]]; then
    row "$label" "GPU" "not run: no python3 with torch" "" info
    return
  fi
  have_time "$label" "GPU" || return 0
  local limit t0=$SECONDS status=0 table n
  limit=$(min "$(left)" "$max_s")
  log "running the $label baseline ($py, at most $limit s)"
  # Torch loads its own CUDA libraries: the caller's loader path, not ours.
  LD_LIBRARY_PATH=$ORIG_LD_LIBRARY_PATH timeout -k 5 "$limit" "$py" "$@" \
    >"$LOGS/$name.log" 2>&1 || status=$?
  table=$(grep -v -E '^(Traceback|  File|    )' "$LOGS/$name.log" | tail -n 30)
  echo "$table"
  if ((status != 0)); then
    ((status == 124 || status == 137)) && table="timed out after $limit s"$'\n'"$table"
    DETAILS+=("[$label] (log $name.log, exit $status)")
    mapfile -t -O "${#DETAILS[@]}" DETAILS < <(tail -n 6 "$LOGS/$name.log" | cut -c1-220)
    row "$label" "GPU" "FAILED: exit $status (log $name.log)" $((SECONDS - t0)) warn
  elif [[ -z $timing ]]; then
    row "$label" "GPU" "done (results)" $((SECONDS - t0)) ok
  else
    n=$(grep -c -E "$timing" "$LOGS/$name.log" || true)
    if ((n > 0)); then
      row "$label" "GPU" "$n timings (results)" $((SECONDS - t0)) ok
    else
      row "$label" "GPU" "no timings: $(tail -n 1 "$LOGS/$name.log" | cut -c1-120)" $((SECONDS - t0)) warn
    fi
  fi
  printf -v "$table_var" '%s' "$table"
}

run_torch_baseline() {
  run_torch_script "torch attention" torch-attention "$TORCH_LIMIT_S" TORCH_TABLE ' (fwd|fwd\+bwd) ' \
    tools/bench_attention_torch.py --json "$LOGS/torch-attention.json"
}

run_torch_baseline

# --- the PyTorch ACT step ------------------------------------------------------------

run_torch_step() {
  run_torch_script "torch ACT step" torch-step "$TORCH_STEP_LIMIT_S" TORCH_STEP_TABLE '' \
    tools/bench_torch_gpu.py --l-cycles 4 --batches 96,192,384 --json "$LOGS/torch-step.json"
}

# Our train-step rows against PyTorch's eager and compiled rows of the same
# (L_cycles, batch); > 1 means ours is faster.
compare_step() {
  [[ -f "$LOGS/train-step.json" && -f "$LOGS/torch-step.json" ]] || return 0
  STEP_COMPARE_TABLE=$(python3 - "$LOGS/train-step.json" "$LOGS/torch-step.json" <<'PY' 2>&1 || true
import json, sys
ours = json.load(open(sys.argv[1]))
theirs = json.load(open(sys.argv[2]))
rows = theirs.get("results", []) if isinstance(theirs, dict) else theirs
by = {}
for r in rows:
    if isinstance(r, dict) and r.get("status") == "ok":
        by[(r["l_cycles"], r["batch"], r["mode"])] = r["sample_steps_per_s"]
print("| L_cycles | batch | ours (sample-steps/s) | MFU | torch eager | torch compiled | ours / eager | ours / compiled |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for o in ours:
    if "error" in o:
        print(f"| {o['l_cycles']} | {o['batch']} | {o['error'][:60]} | | | | | |")
        continue
    e = by.get((o["l_cycles"], o["batch"], "eager"))
    c = by.get((o["l_cycles"], o["batch"], "compile"))
    f = lambda v: f"{v:.1f}" if v else "-"
    r = lambda v: f"{o['samples_per_s'] / v:.2f}x" if v else "-"
    print(f"| {o['l_cycles']} | {o['batch']} | {o['samples_per_s']:.1f} | {100 * o['mfu']:.1f} % | {f(e)} | {f(c)} | {r(e)} | {r(c)} |")
PY
  )
  echo "$STEP_COMPARE_TABLE"
  row "train step vs torch" "GPU" "$(echo "$STEP_COMPARE_TABLE" | grep -c 'x |$' || true) comparisons (results)" "" info
}

# --- our attention over PyTorch's --------------------------------------------------

# Our fused kernels (bench rows) against the best SDPA backend at each shape and
# pass; > 1 means ours is faster.
compare_attention() {
  [[ -f "$LOGS/attention.json" && -f "$LOGS/torch-attention.json" ]] || return 0
  COMPARE_TABLE=$(python3 - "$LOGS/attention.json" "$LOGS/torch-attention.json" <<'PY' 2>&1 || true
import json, sys
ours = json.load(open(sys.argv[1]))
theirs = json.load(open(sys.argv[2]))
rows = theirs.get("results", theirs) if isinstance(theirs, dict) else theirs
def key_of(r):
    shape = f"B{r.get('B')} H{r.get('H')} S{r.get('S')} d{r.get('d')}"
    return shape, {"fwd": "forward", "fwd+bwd": "forward+backward"}.get(r.get("pass"), r.get("pass"))
best = {}
for r in rows:
    if not isinstance(r, dict) or r.get("ms") is None:
        continue
    k = key_of(r)
    if k not in best or r["ms"] < best[k]["ms"]:
        best[k] = r
print("| shape | pass | ours (ms) | ours TFLOP/s | best SDPA | SDPA (ms) | speed-up |")
print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
for o in ours:
    t = best.get((o["shape"], o["pass"]))
    if t is None:
        print(f"| {o['shape']} | {o['pass']} | {o['ms']:.3f} | {o['tflops']:.0f} | - | - | - |")
    else:
        print(f"| {o['shape']} | {o['pass']} | {o['ms']:.3f} | {o['tflops']:.0f} | {t.get('backend', '?')} | {t['ms']:.3f} | {t['ms'] / o['ms']:.2f}x |")
PY
  )
  echo "$COMPARE_TABLE"
  row "attention vs SDPA" "GPU" "$(echo "$COMPARE_TABLE" | grep -c 'x |$' || true) comparisons (results)" "" info
}
compare_attention
run_torch_step
compare_step

for s in "${MEMCHECK_SUITES[@]}"; do run_memcheck "$s"; done

# --- SASS of the attention kernels (matrix instructions, shared loads) --------------

sass_check() {
  local cubin=${dir:+$dir/cubin/attention.sm_90a.cubin} tool
  [[ -n "$cubin" && -f "$cubin" ]] || return 0
  tool=$(command -v cuobjdump || true)
  if [[ -z "$tool" ]]; then
    for tool in /usr/local/cuda*/bin/cuobjdump ""; do [[ -x "$tool" ]] && break; done
  fi
  [[ -n "$tool" ]] || return 0
  "$tool" --dump-sass "$cubin" >"$LOGS/attention.sass" 2>&1 || return 0
  SASS_TABLE=$(awk '/Function :/ { f = $3 } /HMMA/ { h[f]++ } /LDSM/ { l[f]++ } /LDGSTS/ { g[f]++ } /LDL|STL/ { s[f]++ }
    END { print "| kernel | HMMA | LDSM | LDGSTS | local ld/st |"; print "| --- | ---: | ---: | ---: | ---: |"
          for (k in h) printf "| %s | %d | %d | %d | %d |\n", k, h[k], l[k], g[k], s[k] }' "$LOGS/attention.sass")
  echo "$SASS_TABLE"
  row "attention SASS" "cuobjdump" "$(echo "$SASS_TABLE" | tail -n +3 | wc -l) kernels (results)" "" info
}
sass_check

# --- emulator suites (here only: the device is for the GPU, CI runs them) ---------

if [[ $mode == prebuilt ]]; then
  row "emulator suites" "" "not run on the device (CI runs them)" "" info
else
  for s in "${EMU_SUITES[@]}"; do run_suite emu "$s"; done
fi
if [[ $mode == local ]]; then
  for s in "${BUILD_SUITES[@]}"; do run_suite build "$s"; done
fi

COMPLETE=1
# finish (the EXIT trap) writes the results, copies them and prints the summary.
