#!/usr/bin/env bash
# The GPU check of the CUDA extension: build it, run the whole test suite on CUDA, and run every kernel
# under compute-sanitizer (memcheck, racecheck, initcheck, synccheck), expecting zero findings.
# For a workstation with time to spare; on a GPU lent for minutes use scripts/gpu_session.py instead.
#
# Usage (on a machine with an NVIDIA GPU, a CUDA toolkit and torch >= 2.10 with CUDA):
#   scripts/gpu_check.sh             # JIT-build the extension for the visible GPU (cached), then check
#   scripts/gpu_check.sh --install   # DIFFKERN_BUILD_CUDA=1 pip install --no-build-isolation -e . first
#   scripts/gpu_check.sh --no-sanitizer
#
# Environment: TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch, e.g. "9.0"), PYTEST_ARGS (extra pytest arguments),
# COMPUTE_SANITIZER (path of compute-sanitizer; default: on PATH, else $CUDA_HOME/bin).
# Exit status 0 only when the build, the tests and every sanitizer tool pass.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
install=0
sanitizer=1
for arg in "$@"; do
  case "$arg" in
    --install) install=1 ;;
    --no-sanitizer) sanitizer=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

python - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s, CUDA %s)" % (torch.__version__, torch.version.cuda))
print("gpu_check: %s, torch %s, CUDA %s" % (torch.cuda.get_device_name(), torch.__version__, torch.version.cuda))
EOF

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
  export TORCH_CUDA_ARCH_LIST
fi

echo "== build (archs: $TORCH_CUDA_ARCH_LIST)"
if [[ $install == 1 ]]; then
  DIFFKERN_BUILD_CUDA=1 python -m pip install --no-build-isolation --no-deps -e .
fi
python - <<'EOF'
import torch
from diffkern import _extension
_extension.load()  # the prebuilt library if installed, else JIT-built into the cache
print("gpu_check: extension:", _extension.status())
missing = [op for op in _extension.CUDA_OPS if not hasattr(torch.ops.diffkern, op)]
assert not missing, f"ops not registered: {missing}"
EOF

echo "== tests on CUDA"
# An unavailable extension must fail the cuda backend's tests here instead of skipping them.
DIFFKERN_REQUIRE_CUDA_EXTENSION=1 python -m pytest tests/ -q ${PYTEST_ARGS:-}

if [[ $sanitizer == 0 ]]; then
  echo "gpu_check: passed (sanitizer skipped)"
  exit 0
fi

sanitizer_bin="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}"
if [[ -z "$sanitizer_bin" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then
  sanitizer_bin="$CUDA_HOME/bin/compute-sanitizer"
fi
if [[ -z "$sanitizer_bin" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  sanitizer_bin=/usr/local/cuda/bin/compute-sanitizer
fi
if [[ -z "$sanitizer_bin" ]]; then
  echo "gpu_check: compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 1
fi

# Exact-size allocations: an out-of-bounds access cannot hide in the caching allocator's slack, and
# initcheck sees which bytes were written.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in memcheck racecheck initcheck synccheck; do
  echo "== compute-sanitizer --tool $tool"
  extra=()
  if [[ $tool == memcheck ]]; then
    extra=(--leak-check no --report-api-errors explicit)
  elif [[ $tool == racecheck ]]; then
    extra=(--racecheck-report hazard)
  fi
  if ! "$sanitizer_bin" --tool "$tool" --error-exitcode 99 "${extra[@]}" python scripts/sanitizer_cases.py \
      > "sanitizer-$tool.log" 2>&1; then
    echo "gpu_check: compute-sanitizer $tool reported errors (see sanitizer-$tool.log):" >&2
    grep -E "=========" "sanitizer-$tool.log" | head -40 >&2 || true
    status=1
  else
    tail -n 3 "sanitizer-$tool.log"
  fi
done
if [[ $status != 0 ]]; then
  exit 1
fi
echo "gpu_check: passed"
