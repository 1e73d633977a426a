#!/usr/bin/env bash
# Benchmark: the full ARC-AGI-2 dataset build (training2 + evaluation2 +
# concept, test set evaluation2) at 1000 augmentations, as in the reference
# recipe. Prints wall time and peak memory (max RSS).
#
#   tools/bench-build-dataset.sh [ARC_PREFIX] [NUM_AUG]
#
# ARC_PREFIX defaults to ../shared/data/arc-agi/arc-agi. The output (about
# 11 GB at 1000 augmentations) goes to a temporary folder that is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-../shared/data/arc-agi/arc-agi}"
num_aug="${2:-1000}"
cargo build --release --quiet
out="$(mktemp -d "${TMPDIR:-/tmp}/trm-bench-XXXXXX")"
trap 'rm -rf "$out"' EXIT
echo "== trm build-dataset, ARC-AGI-2, num_aug=$num_aug, $(nproc) cores"
start=$(date +%s.%N)
# GNU time reports max RSS; fall back to plain timing without it.
if [ -x /usr/bin/time ]; then
  /usr/bin/time -f "wall %e s, user %U s, sys %S s, max RSS %M KiB" \
    ./target/release/trm build-dataset --input-file-prefix "$prefix" --output-dir "$out/arc2" \
    --subsets training2 evaluation2 concept --test-set-name evaluation2 --num-aug "$num_aug" --quiet
else
  ./target/release/trm build-dataset --input-file-prefix "$prefix" --output-dir "$out/arc2" \
    --subsets training2 evaluation2 concept --test-set-name evaluation2 --num-aug "$num_aug" --quiet
  echo "wall $(echo "$(date +%s.%N) - $start" | bc) s (install GNU time for max RSS)"
fi
du -sh "$out/arc2"
