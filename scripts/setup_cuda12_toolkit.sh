#!/usr/bin/env bash
# Assemble a CUDA 12 build toolkit from PyPI packages plus a CUDA 13 nvcc, for building the +cu12x wheel
# on a machine that has only CUDA 13 (no full CUDA 12 nvcc is published on PyPI or in Debian).
#
# Usage:
#   CUDA_HOME="$(scripts/setup_cuda12_toolkit.sh [DEST])" scripts/build_wheels.sh
#
#   DEST                    where to assemble it (default: ${DIFFKERN_CACHE_DIR:-~/.cache/diffkern}/toolkits/cuda12)
#   CUDA13_HOME             the CUDA 13 toolkit whose compiler driver is reused (default: $CUDA_HOME, else the
#                           toolkit of the nvcc on PATH, else /usr/local/cuda)
#   CUDA12_RUNTIME_VERSION  nvidia-cuda-runtime-cu12 and nvidia-cuda-cccl-cu12 version (default 12.6.77: the
#                           oldest CUDA 12 runtime the wheel promises to work with; sets its +cu126 label)
#   CUDA12_PTXAS_VERSION    nvidia-cuda-nvcc-cu12 version supplying ptxas (default 12.9.86: the newest, the
#                           first to know sm_120 and PTX ISA 8.8)
# Prints DEST as the last line of stdout; progress goes to stderr. Re-running with the same settings is a no-op.
#
# What comes from where, and why it is sound:
#   host side    The runtime API headers (cuda_runtime_api.h, driver_types.h, ...) and libcudart.so.12 are
#                CUDA 12's: every runtime call the kernels make binds to the CUDA 12 ABI and its
#                versioned symbols (cudaXxx@libcudart.so.12).
#   driver       nvcc 13's driver, cudafe++, cicc, fatbinary, nvlink, and its compiler-internal headers
#                (include/crt/*, fatbinary_section.h): the stub code cudafe++ generates expects exactly
#                these headers. The stubs call only __cudaRegisterFatBinary(End), __cudaRegisterFunction,
#                __cudaLaunchKernel, __cudaPopCallConfiguration, __cudaGetKernel, __cudaInitModule and
#                __cudaUnregisterFatBinary, all exported by every libcudart.so.12 since 12.0.
#   device side  cicc 13 emits PTX stamped ".version 9.0" (CUDA 13's ISA). The ptxas below is CUDA 12's
#                (12.9), behind a wrapper that restamps the PTX with the newest ISA that ptxas accepts
#                (8.8) before assembling. ptxas fully validates the PTX against that ISA, so code using
#                anything newer fails the build instead of being miscompiled; the cubins are then made by
#                CUDA 12's assembler (cuobjdump shows toolkit=12.9) and the embedded PTX carries an ISA
#                CUDA 12 drivers accept. Fatbinaries are written uncompressed (--no-compress, added by the
#                build when nvcc's major exceeds the runtime's) so no CUDA 13 compression format reaches a
#                CUDA 12 driver.
#   limits       This is not a configuration NVIDIA ships. Run the GPU tests on a CUDA 12 driver before
#                publishing a wheel built this way. JIT of the embedded PTX needs a driver >= 12.9 (ISA 8.8);
#                that PTX is only used by GPUs newer than every embedded cubin, which need such a driver.
set -euo pipefail

log() { echo "setup_cuda12_toolkit: $*" >&2; }

DEST="${1:-${DIFFKERN_CACHE_DIR:-$HOME/.cache/diffkern}/toolkits/cuda12}"
RUNTIME_VERSION="${CUDA12_RUNTIME_VERSION:-12.6.77}"
PTXAS_VERSION="${CUDA12_PTXAS_VERSION:-12.9.86}"
PYTHON="${PYTHON:-python3}"

if [[ -z "${CUDA13_HOME:-}" ]]; then
  if [[ -n "${CUDA_HOME:-}" ]]; then
    CUDA13_HOME="$CUDA_HOME"
  elif command -v nvcc >/dev/null; then
    # nvcc reports its own toolkit root (it may be a wrapper script, so do not trust its path).
    CUDA13_HOME="$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  else
    CUDA13_HOME=/usr/local/cuda
  fi
fi
CUDA13_HOME="$(cd "$CUDA13_HOME" && pwd -P)"
[[ -x "$CUDA13_HOME/bin/nvcc" && -x "$CUDA13_HOME/nvvm/bin/cicc" ]] \
  || { log "no nvcc/cicc under CUDA13_HOME=$CUDA13_HOME"; exit 1; }
nvcc_release="$("$CUDA13_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')"
[[ "${nvcc_release%%.*}" == 13 ]] || { log "CUDA13_HOME=$CUDA13_HOME has nvcc $nvcc_release, need 13.x"; exit 1; }

stamp="nvcc=$nvcc_release@$CUDA13_HOME runtime=$RUNTIME_VERSION ptxas=$PTXAS_VERSION"
if [[ -f "$DEST/PROVENANCE.txt" ]] && [[ "$(head -n1 "$DEST/PROVENANCE.txt")" == "# $stamp" ]]; then
  log "already assembled: $DEST"
  echo "$DEST"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "downloading CUDA 12 packages from PyPI (runtime $RUNTIME_VERSION, ptxas $PTXAS_VERSION)"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work/wheels" \
  "nvidia-cuda-runtime-cu12==$RUNTIME_VERSION" \
  "nvidia-cuda-cccl-cu12==$RUNTIME_VERSION" \
  "nvidia-cuda-nvcc-cu12==$PTXAS_VERSION" >&2
for whl in "$work"/wheels/*.whl; do
  "$PYTHON" -m zipfile -e "$whl" "$work/x" >&2
done
x="$work/x/nvidia"

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"/{bin,include,lib,targets/x86_64-linux}
t="$DEST.tmp"

# Compiler driver and front end: CUDA 13.
for tool in nvcc cudafe++ fatbinary nvlink bin2c nvcc.profile; do
  cp "$CUDA13_HOME/bin/$tool" "$t/bin/"
done
cp -r "$CUDA13_HOME/bin/crt" "$t/bin/crt"
cp -r "$CUDA13_HOME/nvvm" "$t/nvvm"

# Assembler: CUDA 12's ptxas behind the ISA-restamping wrapper.
cp "$x/cuda_nvcc/bin/ptxas" "$t/bin/ptxas-cuda12"
chmod +x "$t/bin/ptxas-cuda12"
probe_ptx="$work/probe.ptx"
max_isa=""
for isa in 8.8 8.7 8.6 8.5 8.4 8.3 8.2 8.1 8.0; do
  printf '.version %s\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n\tret;\n}\n' "$isa" > "$probe_ptx"
  if "$t/bin/ptxas-cuda12" -arch=sm_80 "$probe_ptx" -o "$work/probe.cubin" 2>/dev/null; then
    max_isa="$isa"
    break
  fi
done
[[ -n "$max_isa" ]] || { log "the CUDA 12 ptxas accepts no PTX ISA 8.x"; exit 1; }
cat > "$t/bin/ptxas" <<EOF
#!/bin/sh
# Generated by scripts/setup_cuda12_toolkit.sh. nvcc runs this as its assembler. cicc 13 stamps its PTX
# with ISA 9.x; restamp it as $max_isa, the newest ISA the CUDA 12 ptxas (ptxas-cuda12) accepts, then let
# that ptxas assemble and validate it. The file is edited in place, so the PTX nvcc embeds carries the
# same version.
for arg in "\$@"; do
  case "\$arg" in
    *.ptx) [ -f "\$arg" ] && sed -i 's/^\.version 9\.[0-9][0-9]*\$/.version $max_isa/' "\$arg" ;;
  esac
done
exec "\$(dirname "\$0")/ptxas-cuda12" "\$@"
EOF
chmod +x "$t/bin/ptxas"

# Headers: CUDA 12's runtime API and CCCL, CUDA 13's compiler-internal headers.
cp -r "$x/cuda_runtime/include/." "$t/include/"
mkdir -p "$t/include/cccl"
cp -r "$x/cuda_cccl/include/." "$t/include/cccl/"
rm -rf "$t/include/crt"
cp -r "$CUDA13_HOME/include/crt" "$t/include/crt"
cp "$CUDA13_HOME/include/fatbinary_section.h" "$t/include/"

# Libraries: CUDA 12's runtime.
cp "$x/cuda_runtime/lib/"* "$t/lib/"
ln -s libcudart.so.12 "$t/lib/libcudart.so"
ln -s lib "$t/lib64"
ln -s ../../include "$t/targets/x86_64-linux/include"
ln -s ../../lib "$t/targets/x86_64-linux/lib"

cat > "$t/PROVENANCE.txt" <<EOF
# $stamp
Assembled by scripts/setup_cuda12_toolkit.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ).
bin/nvcc cudafe++ fatbinary nvlink bin2c crt/ nvvm/   CUDA $nvcc_release ($CUDA13_HOME)
include/crt/ include/fatbinary_section.h              CUDA $nvcc_release ($CUDA13_HOME)
bin/ptxas-cuda12                                      nvidia-cuda-nvcc-cu12 $PTXAS_VERSION ($("$t/bin/ptxas-cuda12" --version | tail -n1))
bin/ptxas                                             wrapper: PTX ISA 9.x -> $max_isa, then ptxas-cuda12
include/ (runtime API) lib/libcudart.so.12            nvidia-cuda-runtime-cu12 $RUNTIME_VERSION
include/cccl/                                         nvidia-cuda-cccl-cu12 $RUNTIME_VERSION
EOF

rm -rf "$DEST"
mv "$t" "$DEST"
log "assembled $DEST (CUDA runtime $RUNTIME_VERSION, nvcc $nvcc_release, ptxas $PTXAS_VERSION, PTX ISA <= $max_isa)"
echo "$DEST"
