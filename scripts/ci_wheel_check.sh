#!/usr/bin/env bash
# CI check of the wheel pipeline, no GPU needed:
#   1. build the CUDA 13 wheel for sm_80 and sm_90 (+PTX of sm_90) only, to keep CI fast
#      (scripts/build_wheels.sh, which also runs scripts/check_wheel.py on it: tags, +cu13x label,
#      cubin archs via cuobjdump, NEEDED libcudart.so.13, the manylinux_2_28 tag and every shipped library's
#      GLIBC_/GLIBCXX_/CXXABI_/GCC_ versions against it, and `auditwheel show` agreeing: required here, so
#      auditwheel is pip-installed first if missing);
#   2. install it with --no-deps into a fresh virtualenv that sees this environment's (CPU) torch;
#   3. from outside the repository, import diffkern, load the prebuilt extension (torch.ops.load_library,
#      RTLD_NOW: every symbol of the shipped binary must resolve in this CPU-only torch) and check that every
#      op of diffkern._extension.CUDA_OPS is registered under torch.ops.diffkern with a CUDA kernel. The
#      toolkit's lib directory stands in for the nvidia-cuda-runtime wheel a CUDA torch brings libcudart with.
#
# Usage: scripts/ci_wheel_check.sh            (CUDA_HOME, or the nvcc on PATH, names the CUDA 13 toolkit)
#        CI_ARCHS="8.0;9.0;12.0+PTX" scripts/ci_wheel_check.sh     (TORCH_CUDA_ARCH_LIST syntax)
#
# The objects are compiled in $DIFFKERN_BUILD_DIR (setup.py's build_temp; default: build/cuda-ci, kept between
# runs: cpp_extension's ninja build recompiles only what changed). Running tests/test_extension_build.py afterwards with
# DIFFKERN_TEST_BUILD_DIR set to the same directory reuses them instead of compiling everything again.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DIFFKERN_BUILD_DIR="${DIFFKERN_BUILD_DIR:-$repo/build/cuda-ci}"
PYTHON="${PYTHON:-python3}"
archs="${CI_ARCHS:-8.0;9.0+PTX}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# auditwheel only reads the wheel (no patchelf, no repair): its verdict must agree with the tag.
if ! "$PYTHON" -c "import auditwheel" 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check auditwheel
fi
DIFFKERN_CHECK_AUDITWHEEL=require "$repo/scripts/build_wheels.sh" --archs "$archs" --out "$work/dist"
wheel="$(ls "$work"/dist/diffkern-*.whl)"
case "$(basename "$wheel")" in
  *+cu13*-manylinux_2_28_x86_64.whl) ;;
  *) echo "ci_wheel_check: expected a CUDA 13 (+cu13x) manylinux_2_28 wheel, got $(basename "$wheel")" >&2; exit 1 ;;
esac
built=$SECONDS

# A venv without its own pip (faster); the outer pip installs into it.
"$PYTHON" -m venv --system-site-packages --without-pip "$work/venv"
"$PYTHON" -m pip --python "$work/venv/bin/python" install --no-deps --no-index --quiet \
  --disable-pip-version-check "$wheel"

cudart_dir="$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from diffkern import _build
from pathlib import Path; h = Path(_build.find_cuda_home()); print(next(d for d in (h / "lib64", h / "lib") if d.is_dir()))' "$repo")"
cd "$work"  # not the repository: the installed wheel must be what is imported
LD_LIBRARY_PATH="$cudart_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" DIFFKERN_NO_JIT=1 "$work/venv/bin/python" - "$work/venv" <<'EOF'
import sys
from pathlib import Path

import torch

import diffkern
from diffkern import _extension

venv = Path(sys.argv[1]).resolve()
assert Path(diffkern.__file__).resolve().is_relative_to(venv), f"imported {diffkern.__file__}, not the wheel"
_extension.load()
st = _extension.status()
assert st["loaded"] and st["source"] == "prebuilt", st
assert st["cuda_version"].startswith("13."), st
for op in _extension.CUDA_OPS:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"diffkern::{op}", "CUDA"), f"{op}: no CUDA kernel"
    print(f"  {getattr(torch.ops.diffkern, op).default._schema}")
print(f"ci_wheel_check: {len(_extension.CUDA_OPS)} ops registered from {st['path']} "
      f"(CUDA {st['cuda_version']}, {' '.join(st['archs'])}, PTX {' '.join(st['ptx'])}) into torch {torch.__version__}")
EOF
echo "ci_wheel_check: passed (build + check_wheel $((built - start)) s, install + load $((SECONDS - built)) s)"
