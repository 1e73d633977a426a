#!/usr/bin/env bash
# The test command: installs (first run only) the pinned CUDA 13.0 nvcc and a
# numpy venv into ${TRM_CACHE_DIR:-~/.cache/trm}, then runs every test with the
# kernels compiled. Extra arguments go to `cargo test`:
#
#   tools/test.sh                     # everything
#   tools/test.sh --test kernels_build
#
# A preset NVCC or TRM_PYTHON is used as is. TRM_REQUIRE_KERNELS=1 makes the
# kernel tests fail, rather than skip, if the build has no kernels.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${NVCC:-}" ]]; then
  nvcc_bin="$(tools/install-nvcc.sh)"
  NVCC="$nvcc_bin/nvcc"
fi
if [[ -z "${TRM_PYTHON:-}" ]]; then
  TRM_PYTHON="$(tools/install-test-python.sh)"
fi
export NVCC TRM_PYTHON
export TRM_REQUIRE_KERNELS=1

echo "test.sh: NVCC=$NVCC" >&2
echo "test.sh: TRM_PYTHON=$TRM_PYTHON" >&2
echo "test.sh: cargo test --all-targets $*" >&2
exec cargo test --all-targets "$@"
