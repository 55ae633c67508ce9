#!/usr/bin/env bash
# Build diffkern wheels with the CUDA extension: one wheel per CUDA toolkit, i.e. per CUDA major.
#
# Usage:
#   scripts/build_wheels.sh [--out DIR] [--archs LIST] [--cu12] [TOOLKIT_DIR ...]
#
#   TOOLKIT_DIR   a CUDA toolkit root (what CUDA_HOME would be); one wheel is built with each. Default:
#                 $CUDA_HOME, else the toolkit of the nvcc on PATH, else /usr/local/cuda.
#   --cu12        also build with a CUDA 12 toolkit assembled by scripts/setup_cuda12_toolkit.sh (nvcc 13's
#                 front end, CUDA 12's runtime and ptxas; see that script for why this is sound).
#   --archs LIST  GPU archs in TORCH_CUDA_ARCH_LIST syntax, e.g. "8.0;9.0+PTX" (default: $TORCH_CUDA_ARCH_LIST,
#                 else sm_80 sm_86 sm_89 sm_90 + sm_100 sm_120 where the compiler has them, PTX of the newest).
#   --out DIR     where the wheels go (default: dist/).
#
# Examples:
#   scripts/build_wheels.sh                                   # one wheel for the default toolkit
#   scripts/build_wheels.sh --cu12 /usr/local/cuda-13.0       # +cu130 and +cu126 wheels
#   MAX_JOBS=8 scripts/build_wheels.sh --archs "8.0;9.0+PTX"  # quicker, fewer archs
#
# Each wheel is named diffkern-0.1.0+cuXY-cp39-abi3-manylinux_2_28_x86_64.whl (XY: the toolkit's CUDA
# runtime version) and is inspected by scripts/check_wheel.py before it is moved to --out: among the rest,
# the tag must be manylinux_2_28 (PyTorch's own) and no shipped library may need a GLIBC_/GLIBCXX_/CXXABI_/
# GCC_ version newer than that policy allows, whatever the glibc of the build machine (setup.py force-includes
# csrc/glibc_compat.h for that; no container or sysroot needed). With auditwheel installed, `auditwheel show`
# must agree ($DIFFKERN_CHECK_AUDITWHEEL=require makes it mandatory). The build uses the installed torch
# (>= 2.10, CPU-only is fine) through pip's --no-build-isolation; nothing is downloaded. Users pick the wheel
# whose CUDA major matches torch.version.cuda.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/dist"
archs="${TORCH_CUDA_ARCH_LIST:-}"
cu12=0
toolkits=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --cu12) cu12=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build_wheels.sh: unknown option $1" >&2; exit 2 ;;
    *) toolkits+=("$1"); shift ;;
  esac
done
PYTHON="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# diffkern/_build.py (the build's settings, loaded by path): the default toolkit; for a toolkit, the expected
# archs and PTX (for check_wheel.py), its CUDA major and the arch list to build.
build_py() {
  "$PYTHON" - "$repo/diffkern/_build.py" "$@" <<'EOF'
import importlib.util, re, sys
spec = importlib.util.spec_from_file_location("_diffkern_build", sys.argv[1])
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
if len(sys.argv) == 2:
    print(b.find_cuda_home())
else:
    arch_list = sys.argv[3] or b.default_arch_list(sys.argv[2])
    archs = re.findall(r"(\d+)\.(\d+a?)(\+PTX)?", arch_list)
    # "-" for no PTX: an empty field would shift the fields `read` splits this line into.
    print(",".join(m + n for m, n, _ in archs), ",".join(m + n for m, n, p in archs if p) or "-",
          b.cuda_runtime_version(sys.argv[2])[0], arch_list)
EOF
}
if [[ ${#toolkits[@]} -eq 0 ]]; then
  toolkits+=("$(build_py)")
fi
if [[ $cu12 -eq 1 ]]; then
  toolkits+=("$(CUDA13_HOME="${toolkits[0]}" "$repo/scripts/setup_cuda12_toolkit.sh")")
fi

for toolkit in "${toolkits[@]}"; do
  read -r want_archs want_ptx cuda_major arch_list < <(build_py "$toolkit" "$archs")
  [[ $want_ptx == - ]] && want_ptx=""
  staging="$(mktemp -d)"
  echo "== building with CUDA_HOME=$toolkit (CUDA $cuda_major; sm: $want_archs; PTX: $want_ptx)"
  start=$SECONDS
  CUDA_HOME="$toolkit" DIFFKERN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch_list" \
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check -w "$staging" "$repo"
  echo "== built in $((SECONDS - start)) s"
  wheel="$(ls "$staging"/diffkern-*.whl)"
  "$PYTHON" "$repo/scripts/check_wheel.py" "$wheel" --cuda-major "$cuda_major" --archs "$want_archs" --ptx "$want_ptx" \
    --expect-plat manylinux_2_28_x86_64
  mv -f "$wheel" "$out/"
  rmdir "$staging"
  echo "== $out/$(basename "$wheel")"
done
