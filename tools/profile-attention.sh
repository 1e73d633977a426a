#!/usr/bin/env bash
# Nsight Compute profile of the fused attention kernels at the ARC shape
# (B 96, H 8, S 916, d 64), for a lent H200: one launch each of the forward,
# the dK/dV and the dQ kernel, with the sections that say where time goes
# (speed of light, warp stall reasons, pipe utilisation, occupancy, shared
# memory). Uses the kernel bench binary that tools/gpu-check.sh --prepare put
# into DIR; the clocks are left as they are (--clock-control none).
#
#   tools/profile-attention.sh DIR      # writes $OUT/ncu-attention.txt (or ./)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:?usage: $0 DIR (made by tools/gpu-check.sh --prepare)}
bench=$dir/bin/kernels
[[ -x $bench ]] || { echo "no bench binary in $dir/bin" >&2; exit 1; }
ncu=$(command -v ncu || true)
if [[ -z $ncu ]]; then
  for c in /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do [[ -x $c ]] && ncu=$c && break; done
fi
[[ -n $ncu ]] || { echo "ncu not found" >&2; exit 1; }
out=${OUT:-.}/ncu-attention.txt
# cudarc opens the bare names (libcuda.so, libcublasLt.so): links to the real
# libraries in a private folder (tools/gpu-check.sh explains why).
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
for lib in libcuda.so.1 libcublasLt.so.13; do
  for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
    if [[ -e $d/$lib ]]; then ln -sf "$d/$lib" "$shim/${lib%.so*}.so"; break; fi
  done
done
export LD_LIBRARY_PATH=$shim${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
  --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats
  --section InstructionStats
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum")
: >"$out"
for k in attention_forward_d64 attention_backward_dkdv_d64 attention_backward_dq_d64; do
  echo "=== $k ===" | tee -a "$out"
  # Skip the first (warm-up) launch; profile one launch at the ARC shape.
  TRM_BENCH_ONLY=attention TRM_BENCH_REPS=1 timeout 120 "$ncu" --clock-control none -k "regex:^$k\$" \
    --launch-skip 1 --launch-count 1 "${sections[@]}" "$bench" >>"$out" 2>&1 || echo "ncu exit $?" | tee -a "$out"
done
# The lines that matter, for the tail of the device tool's output.
grep -E '^=== |stalled|hmma|bank_conflicts|wavefronts|inst_executed.sum|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Issued Ipc|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall|L1/TEX Hit|Shared|Executed Ipc|One or More Eligible|Active Warps Per' "$out" | cut -c1-160 | head -150
