"""How the CUDA extension is compiled: the flags shared by the wheel build (setup.py, ``CUDAExtension`` +
``BuildExtension``) and the JIT build (``torch.utils.cpp_extension.load`` in ``diffkern/_extension.py``).

Only the standard library here (setup.py loads this file by path, before the package is importable); the
compiling, the ninja files, the locking and the caching are ``torch.utils.cpp_extension``'s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

#: The oldest torch whose stable ABI the library targets (``-DTORCH_TARGET_VERSION``).
TORCH_TARGET = (2, 10)
#: A100, A10/RTX 30xx, L4/L40/RTX 40xx, H100/H200, and where nvcc has them B200 and RTX 50xx; PTX of the newest.
ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
#: Force-included into every host compile: keeps the glibc symbol versions within manylinux_2_28 (see it).
GLIBC_COMPAT_HEADER = SOURCE_DIR / "glibc_compat.h"
#: Where the CUDA runtime wheels put libcudart, relative to site-packages (the wheel's RUNPATH).
PIP_CUDART_DIRS = {13: "nvidia/cu13/lib", 12: "nvidia/cuda_runtime/lib"}
#: cpp_extension's nvcc defaults that hide the __half/__nv_bfloat16 operators the kernels use.
_UNDEFINE = ("__CUDA_NO_HALF_OPERATORS__", "__CUDA_NO_HALF_CONVERSIONS__", "__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "__CUDA_NO_HALF2_OPERATORS__")


def torch_target_version_macro() -> str:
    """The value of ``-DTORCH_TARGET_VERSION`` (torch's encoding: major << 56 | minor << 48)."""
    return "0x%016x" % ((TORCH_TARGET[0] << 56) | (TORCH_TARGET[1] << 48))


def source_files(source_dir: Path = SOURCE_DIR) -> List[Path]:
    """Every ``*.cu`` and ``*.cpp`` directly in ``source_dir`` (a glob: a new kernel file needs no edit here)."""
    return sorted(p for p in Path(source_dir).iterdir() if p.suffix in (".cu", ".cpp") and p.is_file())


def find_cuda_home() -> str:
    """``$CUDA_HOME`` (or ``$CUDA_PATH``), else the toolkit of the ``nvcc`` on PATH as that nvcc reports it (it may
    be a wrapper script: cpp_extension's guess, two directories up, is then wrong), else ``/usr/local/cuda``.
    cpp_extension's own ``CUDA_HOME`` is None on a CPU-only torch, so setup.py and the loader set it from this."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and shutil.which("nvcc"):
        out = subprocess.run(["nvcc", "--dryrun", "-E", "-x", "cu", os.devnull], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True).stdout
        home = next(iter(re.findall(r"^#\$ TOP=(.+)$", out, re.MULTILINE)), "").strip()
    home = str(Path(home or "/usr/local/cuda").resolve())
    if not (Path(home) / "bin" / "nvcc").is_file() or not (Path(home) / "include" / "cuda_runtime_api.h").is_file():
        raise FileNotFoundError(f"no CUDA toolkit (bin/nvcc, include/cuda_runtime_api.h) at {home}; set CUDA_HOME")
    return home


def cuda_runtime_version(cuda_home) -> tuple:
    """``CUDART_VERSION`` of the toolkit's runtime headers as (major, minor): what the library is built for
    (``libcudart.so.<major>``, the wheel's ``+cuXY``); nvcc may be newer (scripts/setup_cuda12_toolkit.sh)."""
    text = (Path(cuda_home) / "include" / "cuda_runtime_api.h").read_text(errors="replace")
    value = int(re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text).group(1))
    return value // 1000, (value % 1000) // 10


def _nvcc(cuda_home, *args: str) -> str:
    return subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), *args], check=True, stdout=subprocess.PIPE,
                          text=True).stdout


def default_arch_list(cuda_home) -> str:
    """``TORCH_CUDA_ARCH_LIST`` of a full build: :data:`ARCHS` that this nvcc can target, ``+PTX`` on the newest."""
    codes = set(_nvcc(cuda_home, "--list-gpu-code").split())
    archs = [a for a in ARCHS if "sm_" + a.replace(".", "") in codes]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def compile_args(cuda_home) -> Dict[str, List[str]]:
    """``extra_compile_args`` for ``CUDAExtension``/``load``: warnings are errors on the host and the device side
    (torch's and CUDA's headers come in as -isystem, so only our code is held to that), the stable-ABI target,
    the glibc header force-included (``--pre-include`` reaches both of nvcc's preprocessing passes)."""
    torch_include = Path(__import__("torch").__file__).resolve().parent / "include"
    header = str(GLIBC_COMPAT_HEADER)
    # cpp_extension adds no -gencode flags of its own when any nvcc flag contains "arch".
    assert "arch" not in header, f"rename the checkout: cpp_extension would drop the arch flags ({header})"
    common = ["-O3", "-std=c++17", "-DUSE_CUDA", f"-DTORCH_TARGET_VERSION={torch_target_version_macro()}",
              "-isystem", str(torch_include), "-isystem", str(Path(cuda_home) / "include")]
    # --fmad=false: no FMA contraction, each operation rounded as the reference rounds it (README, "Numerics").
    nvcc = common + ["--fmad=false", "-Xcompiler=-fvisibility=hidden,-Wall,-Wextra,-Werror", "--Werror",
                     "all-warnings", "-Xptxas=-Werror", "--pre-include", header] + [f"-U{m}" for m in _UNDEFINE]
    if int(re.search(r"release (\d+)", _nvcc(cuda_home, "--version")).group(1)) != cuda_runtime_version(cuda_home)[0]:
        nvcc.append("--no-compress")  # an assembled toolkit: no newer-major fatbinary compression
    return {"cxx": common + ["-fvisibility=hidden", "-Wall", "-Wextra", "-Werror", "-include", header], "nvcc": nvcc}


def link_args(cuda_home, runpath: List[str]) -> List[str]:
    """Links torch's CPU libraries and ``libcudart.so.<major>`` only (a CPU-only torch has no libtorch_cuda;
    csrc/platform.cuh finds the CUDA stream with dlsym), every symbol resolved at link time."""
    major = cuda_runtime_version(cuda_home)[0]
    lib = next(d for d in ("lib64", "lib") if (Path(cuda_home) / d / f"libcudart.so.{major}").exists())
    torch_lib = Path(__import__("torch").__file__).resolve().parent / "lib"
    return ([f"-L{torch_lib}", f"-L{Path(cuda_home) / lib}", "-lc10", "-ltorch_cpu", f"-l:libcudart.so.{major}",
             "-ldl", "-Wl,--no-undefined"] + [f"-Wl,-rpath,{p}" for p in runpath])


def wheel_runpath(cuda_home) -> List[str]:
    """RUNPATH relative to site-packages/diffkern/: torch's libraries and the CUDA runtime wheel's libcudart."""
    return ["$ORIGIN/../torch/lib", f"$ORIGIN/../{PIP_CUDART_DIRS[cuda_runtime_version(cuda_home)[0]]}"]

