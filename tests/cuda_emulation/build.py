"""Builds the host emulation of the CUDA extension: every ``csrc/*.cu`` and ``csrc/*.cpp`` compiled by the host
C++ compiler with ``-DDIFFKERN_HOST_EMULATION -include host_cuda.h`` and linked into one shared library whose
ops (the real ones' schemas) run the real kernels on CPU tensors, registered under the CPU dispatch key.

No nvcc and no GPU are needed: only a C++20 compiler with ``<barrier>`` (g++ 11 or newer), torch, and the CUDA
runtime headers (``cuda_runtime.h``, ``cuda_fp16.h``, ``cuda_bf16.h``) for the vector and 16-bit float types.

Usage: ``python tests/cuda_emulation/build.py BUILD_DIR`` (prints the library's path), or :func:`build`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SOURCE_DIR = REPO / "csrc"
HOST_CUDA_H = HERE / "host_cuda.h"
LIBRARY_FILE = "diffkern_emulated.so"

# Warnings are errors, as in the real build (#pragma unroll is nvcc's: the host compiler ignores it).
CXX_FLAGS = ("-std=c++20", "-O1", "-fPIC", "-pthread", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
             "-Wno-unknown-pragmas", "-DDIFFKERN_HOST_EMULATION")


class EmulationUnavailable(RuntimeError):
    """A prerequisite of the build (compiler, CUDA headers) is missing; the message says which."""


def find_cxx() -> str:
    """The host compiler the real build links with ($CXX, else c++); C++20 is needed (g++ 11+, clang++ 14+)."""
    cxx = shutil.which(os.environ.get("CXX") or "c++")
    if cxx is None:
        raise EmulationUnavailable(f"no C++ compiler {os.environ.get('CXX') or 'c++'!r} found (set CXX)")
    return cxx


def find_cuda_include() -> Path:
    """A directory with the CUDA runtime headers: the toolkit diffkern would build with
    (``diffkern._build.find_cuda_home``), else ``$CUDA_HOME``/``$CUDA_PATH``/``/usr/local/cuda`` or the CUDA
    runtime wheels' headers (only headers are needed, no nvcc)."""
    from diffkern import _build

    try:
        return Path(_build.find_cuda_home()) / "include"
    except FileNotFoundError:
        pass
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    dirs = [Path(c) / "include" for c in candidates if c]
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            dirs.append(Path(entry or ".") / sub)
    for d in dirs:
        if all((d / h).is_file() for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return d
    raise EmulationUnavailable("no CUDA runtime headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) found; "
                               "set CUDA_HOME to a CUDA toolkit")


def _torch_dirs():
    import torch

    root = Path(torch.__file__).resolve().parent
    return root / "include", root / "lib"


def _compile(cxx: str, flags: Sequence[str], src: Path, obj: Path, headers: Sequence[Path]) -> Optional[str]:
    """Compiles src into obj unless obj is newer than src and every header; returns the error output or None."""
    if obj.is_file() and obj.stat().st_mtime_ns > max(d.stat().st_mtime_ns for d in (src, *headers)):
        return None
    tmp = obj.with_name(obj.name + ".tmp")
    lang = ["-include", str(HOST_CUDA_H), "-x", "c++"] if src.suffix == ".cu" else []
    proc = subprocess.run([cxx, *flags, *lang, "-c", str(src), "-o", str(tmp)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        return f"{src.name}:\n{proc.stdout}"
    tmp.replace(obj)
    return None


def build(build_dir, *, source_dir=None, extra_flags: Sequence[str] = (), jobs: Optional[int] = None) -> Path:
    """Compiles the emulated extension of ``source_dir`` (default: the repository's ``csrc/``) into
    ``build_dir`` and returns the linked library. Objects newer than their source and every header in
    ``source_dir`` and ``host_cuda.h`` are kept; a change of flags rebuilds everything. ``extra_flags`` go to
    every compile (e.g. ``-D...``). Raises :class:`EmulationUnavailable` when the compiler or the CUDA headers
    are missing, RuntimeError with the compiler's output when a compile or the link fails."""
    from diffkern import _build

    cxx = find_cxx()
    cuda_include = find_cuda_include()
    torch_include, torch_lib = _torch_dirs()
    source_dir = Path(source_dir or SOURCE_DIR).resolve()
    build_dir = Path(build_dir)
    obj_dir = build_dir / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    flags: List[str] = [*CXX_FLAGS, f"-DTORCH_TARGET_VERSION={_build.torch_target_version_macro()}",
                        "-isystem", str(torch_include), "-isystem", str(cuda_include), *extra_flags]
    sources = _build.source_files(source_dir)
    # The flags and the source list: a removed source must leave the library too (a relink with what is left).
    stamp = build_dir / "command.txt"
    command = "\n".join([cxx, *flags, str(source_dir), str(HOST_CUDA_H), *(s.name for s in sources)])
    if not stamp.is_file() or stamp.read_text() != command:
        for old in obj_dir.glob("*.o"):
            old.unlink()
        stamp.write_text(command)
    headers = [HOST_CUDA_H, *(p for p in source_dir.iterdir() if p.suffix in (".cuh", ".h", ".hpp"))]
    objects = [obj_dir / f"{s.name}.o" for s in sources]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        errors = [e for e in pool.map(lambda so: _compile(cxx, flags, so[0], so[1], headers), zip(sources, objects))
                  if e]
    if errors:
        raise RuntimeError("compiling the host-emulated CUDA extension failed:\n" + "\n".join(errors)[-20000:])
    library = build_dir / LIBRARY_FILE
    if library.is_file() and library.stat().st_mtime_ns > max(o.stat().st_mtime_ns for o in objects):
        return library
    tmp = build_dir / (LIBRARY_FILE + ".tmp")
    proc = subprocess.run([cxx, "-shared", "-pthread", *map(str, objects), "-o", str(tmp), f"-L{torch_lib}",
                           "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}", "-Wl,--no-undefined"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the host-emulated CUDA extension failed:\n{proc.stdout[-20000:]}")
    tmp.replace(library)  # a process that has the old library mapped keeps its copy
    return library


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/cuda_emulation/build.py BUILD_DIR")
    sys.path.insert(0, str(REPO))
    print(build(sys.argv[1]))
