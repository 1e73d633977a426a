#!/usr/bin/env bash
# End-to-end check of the main job and offline inference, in release mode:
# runs the README's `trm demo` (synthetic puzzles -> dataset -> training with
# evaluation and checkpoints), packages every kept checkpoint, solves the
# demo's evaluation challenges with `trm infer`, and requires that each
#   - submission.json is byte-identical to the training-time evaluator's, and
#   - every ARC/pass@K printed by infer equals the one training logged,
# and that at least one checkpoint has a non-zero pass@K (so the comparison
# is not of empty results). About 3-4 minutes on 2 cores after the build.
#
#   tools/demo-infer-check.sh [WORK_DIR]   # WORK_DIR/demo from an earlier
#                                          # `trm demo --out WORK_DIR/demo` is reused
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${1:-}" ]]; then
  WORK="$1"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
fi
cargo build --release -q
TRM=target/release/trm

if [[ ! -d "$WORK/demo/run" ]]; then
  echo "demo-infer-check: running the demo into $WORK/demo" >&2
  "$TRM" demo --out "$WORK/demo" > "$WORK/demo.log" 2>&1 || {
    tail -30 "$WORK/demo.log" >&2
    exit 1
  }
fi
RUN="$WORK/demo/run"
ARC="$WORK/demo/arc"
NUM_AUG=3 # the demo's default augmentations per puzzle

nonzero=0
checked=0
for ckpt in "$RUN"/step_*; do
  step="${ckpt##*_}"
  model="$WORK/model_$step"
  "$TRM" package --checkpoint "$ckpt" --out "$model" > /dev/null
  "$TRM" infer --model "$model" --num-aug "$NUM_AUG" \
    --challenges "$ARC/synthetic_evaluation_challenges.json" \
    --solutions "$ARC/synthetic_evaluation_solutions.json" \
    --out "$WORK/submission_$step.json" > "$WORK/infer_$step.log" 2>&1
  if ! cmp -s "$WORK/submission_$step.json" "$RUN/evaluator_ARC_step_$step/submission.json"; then
    echo "demo-infer-check: step $step: infer's submission differs from training's" >&2
    exit 1
  fi
  # pass@K lines of infer against the training log's values at this step
  while read -r key value; do
    logged=$(grep "\"step\":$step[,}]" "$RUN/metrics.jsonl" | grep -o "\"$key\":[0-9.e+-]*" | cut -d: -f2 | head -1)
    if [[ -z "$logged" ]]; then
      echo "demo-infer-check: step $step: $key missing from metrics.jsonl" >&2
      exit 1
    fi
    # infer prints 4 decimals
    if ! awk -v a="$value" -v b="$logged" 'BEGIN { exit !((a - b) < 6e-5 && (b - a) < 6e-5) }'; then
      echo "demo-infer-check: step $step: $key is $value from infer, $logged in training" >&2
      exit 1
    fi
    if awk -v a="$value" 'BEGIN { exit !(a > 0) }'; then nonzero=1; fi
  done < <(grep -o '^ARC/pass@[0-9]* [0-9.]*' "$WORK/infer_$step.log")
  if ! grep -q '^ARC/pass@1 ' "$WORK/infer_$step.log"; then
    echo "demo-infer-check: step $step: infer printed no pass@K" >&2
    exit 1
  fi
  echo "demo-infer-check: step $step: same submission and pass@K ($(grep '^ARC/pass@[12] ' "$WORK/infer_$step.log" | tr '\n' ' '))" >&2
  checked=$((checked + 1))
done
if [[ $checked -eq 0 ]]; then
  echo "demo-infer-check: the demo kept no checkpoint" >&2
  exit 1
fi
if [[ $nonzero -eq 0 ]]; then
  echo "demo-infer-check: every pass@K was 0: the comparison would prove nothing" >&2
  exit 1
fi
echo "demo-infer-check: $checked checkpoints agree" >&2
