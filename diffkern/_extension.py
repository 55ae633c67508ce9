"""Loading the CUDA extension (``diffkern/_C``): the kernels of ``csrc/`` registered under ``torch.ops.diffkern``.

The library talks to torch only through the stable C ABI (targeting torch 2.10), so one binary serves every
torch >= 2.10 whose CUDA major is the one it was built for. It registers kernels only; the schemas are defined
from Python first (``diffkern/ops/_declaration.py``). :func:`load` tries, in order:

1. **prebuilt**: ``diffkern/_C*.so`` next to this file (a wheel, or ``DIFFKERN_BUILD_CUDA=1 pip install``), with
   ``_build_info.json`` saying which CUDA it was built for. A library for another CUDA major than torch's is
   not loaded: a ``RuntimeWarning`` names both and the ops use Triton.
2. **jit**: from a source checkout, ``torch.utils.cpp_extension.load`` compiles ``csrc/`` (flags:
   ``diffkern/_build.py``) into ``$TORCH_EXTENSIONS_DIR`` for ``$TORCH_CUDA_ARCH_LIST`` (default: the visible
   GPUs), on a CUDA torch only. ``DIFFKERN_NO_JIT=1`` turns this off.

Either is opened with ``torch.ops.load_library`` (``RTLD_NOW``), into any torch, a CPU-only one included: the
library links only ``libtorch_cpu``, ``libc10`` and ``libcudart`` and finds ``libtorch_cuda``'s current-stream
function with ``dlsym`` at first use (``csrc/platform.cuh``), so nothing is left unresolved. On a CPU torch its
kernels register but can never run; CI loads the wheel's library there all the same, as the check that the
shipped binary resolves and registers every op (host emulation, tests/cuda_emulation, builds its own library).
``libcudart.so.<major>`` must be findable: torch brings it on a CUDA torch; on a CPU torch the wheel's RUNPATH,
``LD_LIBRARY_PATH`` or ``ld.so.cache`` must have it. A library is never opened when the ops' kernels are
registered already (by another copy, or tests' host emulation): that is reported as ``"external"``.

Nothing happens at import: no torch import, no device query, no compile, no load. ``python -m diffkern._extension``
loads and prints :func:`status`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["CUDA_OPS", "ExtensionUnavailable", "load", "status"]

NAMESPACE = "diffkern"
BUILD_INFO_NAME = "_build_info.json"
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_DIR = _PACKAGE_DIR.parent / "csrc"


def __getattr__(name: str):
    """``CUDA_OPS``: the ops whose kernels the library must register, from the ops' declarations."""
    if name == "CUDA_OPS":
        from diffkern.ops import _declaration

        return tuple(op.name for op in _declaration.cuda_ops())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension cannot be used here; the message says why and what to do."""


@dataclass
class _State:
    loaded: bool = False
    source: Optional[str] = None  # "prebuilt", "jit", "external" (registered by someone else)
    path: Optional[str] = None
    reason: str = "not loaded yet (diffkern._extension.load() has not been called)"
    info: Optional[dict] = None
    error: Optional[str] = None  # a failed load() is not retried in this process


_state = _State()
_lock = threading.RLock()


def _registered(torch, dispatch_key: str = "CUDA") -> dict:
    """For each CUDA op: whether a kernel for ``dispatch_key`` is registered (defines the schemas first)."""
    from diffkern.ops import _declaration

    _declaration.define_cuda_ops()
    return {op.name: torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op.name}", dispatch_key)
            for op in _declaration.cuda_ops()}


def _kernels_registered(torch) -> bool:
    """Whether a library registered the kernels already: the real one (CUDA) or the host emulation (CPU)."""
    return any(_registered(torch, "CUDA").values()) or any(_registered(torch, "CPU").values())


def _check_registered(torch, path) -> None:
    missing = [op for op, ok in _registered(torch).items() if not ok]
    if missing:
        raise ExtensionUnavailable(f"{path} loaded but registered no CUDA kernel for "
                                   + ", ".join(f"{NAMESPACE}::{op}" for op in missing))


def _prebuilt_library() -> Optional[Path]:
    found = sorted(p for p in _PACKAGE_DIR.glob("_C*.so") if p.is_file())
    return found[0] if found else None


def _read_info(library: Path) -> Optional[dict]:
    try:
        return json.loads((library.parent / BUILD_INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def _load_prebuilt(path: Path, torch) -> Optional[str]:
    """Loads the prebuilt library; returns None on success, else why it was not loaded."""
    info = _read_info(path)
    if not info or not info.get("cuda_version"):
        return f"prebuilt {path}: no readable {BUILD_INFO_NAME} saying its CUDA version; rebuild it"
    built, cuda = str(info["cuda_version"]), torch.version.cuda
    if cuda and built.split(".")[0] != cuda.split(".")[0]:
        message = (f"diffkern: not loading the prebuilt CUDA extension {path}: it was built for CUDA {built} but "
                   f"torch {torch.__version__} uses CUDA {cuda}; install the diffkern wheel for CUDA "
                   f"{cuda.split('.')[0]} (local version +cu{cuda.split('.')[0]}x)")
        warnings.warn(message + ". The Triton backend is used instead.", RuntimeWarning, stacklevel=4)
        return message
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:  # dlopen failed: nothing registered, the JIT path may try
        return f"prebuilt {path} does not load: {exc}"
    _check_registered(torch, path)
    _state.info, _state.path = info, str(path)
    return None


def _load_jit(torch) -> None:
    if torch.version.cuda is None:
        raise ExtensionUnavailable(f"torch {torch.__version__} is CPU-only: nothing to JIT-build for")
    from torch.utils import cpp_extension

    from diffkern import _build

    try:
        home = cpp_extension.CUDA_HOME = _build.find_cuda_home()
    except FileNotFoundError as exc:
        raise ExtensionUnavailable(str(exc)) from exc
    cuda = "%d.%d" % _build.cuda_runtime_version(home)
    if cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise ExtensionUnavailable(f"the CUDA toolkit in {home} is CUDA {cuda} but torch uses CUDA "
                                   f"{torch.version.cuda}; point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]} toolkit")
    flags, torch_lib = _build.compile_args(home), str(Path(torch.__file__).resolve().parent / "lib")
    try:
        path = cpp_extension.load(
            "diffkern_C", [str(p) for p in _build.source_files(_SOURCE_DIR)], extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"], is_python_module=False,
            extra_ldflags=_build.link_args(home, [torch_lib, str(Path(home) / "lib64"), str(Path(home) / "lib")]))
    except (RuntimeError, OSError, ValueError) as exc:  # a failed compile: cpp_extension's message has its output
        raise ExtensionUnavailable(f"building csrc/ failed: {exc}") from exc
    _check_registered(torch, path)
    _state.info = {"cuda_version": cuda, "archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPUs'")}
    _state.path = str(path)


def load() -> None:
    """Loads the CUDA extension into this process (idempotent, thread-safe): the prebuilt library, else a JIT
    build. Raises :class:`ExtensionUnavailable` with every reason; a failure is remembered and re-raised."""
    with _lock:
        if _state.loaded:
            return
        if _state.error is not None:
            raise ExtensionUnavailable(_state.error)
        try:
            _state.loaded, _state.source, _state.reason = True, *_load_locked()
        except ExtensionUnavailable as exc:
            _state.loaded, _state.error = False, str(exc)
            _state.reason = _state.error
            raise


def _load_locked():
    if not sys.platform.startswith("linux"):
        raise ExtensionUnavailable(f"the CUDA extension is built and loaded on Linux only, not {sys.platform}")
    import torch

    if getattr(torch.version, "hip", None):
        raise ExtensionUnavailable(f"torch {torch.__version__} is a ROCm build; the extension is CUDA-only")
    if _kernels_registered(torch):  # a second library for the same kernels is never opened
        return "external", "the diffkern CUDA ops were already registered when load() was first called"
    reasons = []
    prebuilt = _prebuilt_library()
    if prebuilt is None:
        reasons.append(f"no prebuilt library in {_PACKAGE_DIR} (build one with DIFFKERN_BUILD_CUDA=1 pip install)")
    else:
        problem = _load_prebuilt(prebuilt, torch)
        if problem is None:
            return "prebuilt", f"prebuilt library for CUDA {_state.info['cuda_version']}"
        reasons.append(problem)
    if os.environ.get("DIFFKERN_NO_JIT") == "1":
        reasons.append("JIT build disabled (DIFFKERN_NO_JIT=1)")
    elif not _SOURCE_DIR.is_dir():
        reasons.append(f"no CUDA sources to JIT-build at {_SOURCE_DIR}")
    else:
        try:
            _load_jit(torch)
            return "jit", f"JIT-built for CUDA {_state.info['cuda_version']}"
        except ExtensionUnavailable as exc:
            reasons.append(f"JIT build: {exc}")
    raise ExtensionUnavailable("the diffkern CUDA extension is unavailable: " + "; ".join(reasons))


def status() -> dict:
    """Where the extension stands, without loading anything: ``loaded``, ``source`` ("prebuilt", "jit",
    "external" or None), ``path`` (loaded, or the prebuilt one :func:`load` would try), ``reason``,
    ``cuda_version`` (the library's), ``torch_cuda_version``, ``archs``, ``ptx``."""
    with _lock:
        info, path = _state.info, _state.path
        if not _state.loaded and path is None and _prebuilt_library() is not None:
            path = str(_prebuilt_library())
            info = _read_info(Path(path))
        torch = sys.modules.get("torch")
        return {"loaded": _state.loaded, "source": _state.source, "path": path, "reason": _state.reason,
                "cuda_version": (info or {}).get("cuda_version"),
                "torch_cuda_version": torch.version.cuda if torch is not None else None,
                "archs": (info or {}).get("archs"), "ptx": (info or {}).get("ptx")}


if __name__ == "__main__":
    try:
        load()
    except ExtensionUnavailable:
        pass
    print(json.dumps(status(), indent=2))
    sys.exit(0 if _state.loaded else 1)
