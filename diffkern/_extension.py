"""Finding, building and loading the CUDA extension library (``diffkern/_C``).

The CUDA kernels in ``csrc/`` are compiled into one shared library that registers its ops with torch's
dispatcher (``torch.ops.diffkern.*_cuda``) from static initializers. It talks to torch only through the
stable C ABI (``torch/csrc/stable``, targeting torch 2.10), never through the Python C API, so one binary
works with every torch >= 2.10 whose CUDA major matches the toolkit it was built with.

Where the library comes from, in the order :func:`load` tries:

1. **prebuilt**: ``diffkern/_C*.so`` next to this file, put there by ``DIFFKERN_BUILD_CUDA=1 pip install``
   (a wheel or an in-place build). ``diffkern/_build_info.json``, written with it, says which CUDA it was
   built for, so the loader can refuse a CUDA-major mismatch without touching a GPU.
2. **jit**: a source checkout with ``csrc/`` and an ``nvcc`` is compiled with ninja into a cache directory
   (``$DIFFKERN_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffkern``, else ``~/.cache/diffkern``) keyed by the
   torch version, the CUDA version, the GPU archs and the source location. ``DIFFKERN_NO_JIT=1`` turns
   this off.

Nothing happens at import time: no torch import, no device query, no compile, no ``dlopen``. Everything
is done by :func:`load` (idempotent; failures are cached and re-raised) and reported by :func:`status`.

Why the library is opened with ``dlopen`` through ctypes rather than ``torch.ops.load_library``:

- The kernels get torch's current CUDA stream from ``aoti_torch_get_current_cuda_stream``, which lives in
  ``libtorch_cuda.so``. A CPU-only torch (CI) has no such library, so there the extension is opened with
  ``RTLD_LAZY``: its ops register (schemas can be checked) and the symbol is never needed because no CUDA
  tensor can reach the kernels. ``torch.ops.load_library`` opens with ``RTLD_NOW`` and fails there.
- A CUDA torch loads ``libtorch_cuda.so`` privately (``RTLD_LOCAL``, as a dependency of ``torch._C``),
  so a library that does not link it cannot see its symbols. Before opening the extension with
  ``RTLD_NOW`` the loader promotes the already-loaded ``libtorch_cuda.so`` to global scope; an unresolved
  symbol is then a clear load error instead of a crash at the first kernel launch.
- Loading a second library that defines the ``diffkern`` op namespace crashes the process inside torch's
  registration, so the loader never opens a library when the ops are already registered, and a freshly
  JIT-built library is first opened in a throw-away subprocess.

Command line: ``python -m diffkern._extension status|build|probe LIBRARY``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

__all__ = ["CUDA_OPS", "ExtensionUnavailable", "load", "status", "build", "find_toolkit"]

logger = logging.getLogger("diffkern")

NAMESPACE = "diffkern"


def __getattr__(name: str):
    """``CUDA_OPS``: the ops whose kernels the library must register under ``torch.ops.diffkern``, from the ops'
    declarations (``diffkern/ops/_declaration.py``, which also holds their schemas)."""
    if name == "CUDA_OPS":
        from diffkern.ops import _declaration

        return tuple(op.name for op in _declaration.cuda_ops())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: The oldest torch whose stable ABI the library targets (``-DTORCH_TARGET_VERSION``).
TORCH_TARGET = (2, 10)

#: Archs every default build carries (A100, A10/A40/RTX 30xx, L4/L40/RTX 40xx, H100/H200) ...
BASE_ARCHS = ("80", "86", "89", "90")
#: ... plus those of these the compiler can target (B200/GB200, RTX 50xx/RTX PRO); the newest also gets
#: PTX so that GPUs newer than the build can JIT it. sm_103/sm_121 run the sm_100/sm_120 cubins.
NEWER_ARCHS = ("100", "120")

#: Flags shared by every build. Warnings are errors on the host and the device side: the torch and CUDA
#: headers are included with -isystem so only our own code is held to that.
NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-Xcompiler=-fPIC,-fvisibility=hidden,-Wall,-Wextra,-Werror",
    "--Werror", "all-warnings",  # front end (cudafe/cicc) warnings
    "-Xptxas=-Werror",  # ptxas warnings
)
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror")
#: Force-included into every host compile (csrc/, next to the sources): keeps the library's glibc symbol
#: versions within manylinux_2_28 (see the header). setup.py relies on this build adding it.
GLIBC_COMPAT_HEADER = "glibc_compat.h"

LIBRARY_NAME = "_C"  # the extension module name inside the package: diffkern/_C.abi3.so
BUILD_INFO_NAME = "_build_info.json"
JIT_LIBRARY_FILE = "diffkern_C.so"
SOURCE_SUFFIXES = (".cu", ".cpp")

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_DIR = _PACKAGE_DIR.parent / "csrc"

# Where wheels of the CUDA runtime put libcudart relative to site-packages: CUDA 13 wheels
# (nvidia-cuda-runtime 13.x) and CUDA 12 wheels (nvidia-cuda-runtime-cu12). Used for the wheel's RUNPATH
# (relative to diffkern/) and when looking for libcudart on a CPU-only torch.
_PIP_CUDART_DIRS = {13: ("nvidia/cu13/lib",), 12: ("nvidia/cuda_runtime/lib",)}


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension cannot be used here; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# The CUDA toolkit
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Toolkit:
    """A CUDA toolkit to build with.

    ``runtime_version`` (from ``CUDART_VERSION`` in the runtime headers) is what the library is built
    for: it picks ``libcudart.so.<major>`` and the wheel's ``+cuXY`` tag. ``nvcc_version`` may be newer
    in an assembled toolkit (``scripts/setup_cuda12_toolkit.sh``: nvcc 13's front end with CUDA 12's
    runtime, headers and ptxas).
    """

    home: Path
    nvcc: Path
    nvcc_version: Tuple[int, int]
    runtime_version: Tuple[int, int]
    lib_dir: Path
    gpu_codes: FrozenSet[str]  # nvcc --list-gpu-code: {"sm_80", "sm_90", ...}

    @property
    def cuda_major(self) -> int:
        return self.runtime_version[0]

    @property
    def version_string(self) -> str:
        return "%d.%d" % self.runtime_version

    @property
    def local_tag(self) -> str:
        """The wheel's local version label, e.g. ``cu130``."""
        return "cu%d%d" % self.runtime_version

    @property
    def cudart_soname(self) -> str:
        return f"libcudart.so.{self.cuda_major}"

    @property
    def include_dir(self) -> Path:
        return self.home / "include"

    @property
    def cross_major(self) -> bool:
        """nvcc is of a newer major than the runtime it builds for (an assembled toolkit)."""
        return self.nvcc_version[0] != self.runtime_version[0]


def _run(cmd: Sequence[str], timeout: float = 60) -> str:
    proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise ExtensionUnavailable(f"`{shlex.join(cmd)}` failed ({proc.returncode}): {proc.stdout.strip()[-2000:]}")
    return proc.stdout


def _home_from_nvcc_on_path(nvcc: str) -> Optional[Path]:
    # nvcc may be a wrapper script or a symlink farm; nvcc itself reports where its toolkit is (TOP).
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def _pip_toolkit_homes() -> List[Path]:
    # The nvidia-cuda-nvcc 13.x wheel holds a complete nvcc under site-packages/nvidia/cu13.
    homes = []
    for entry in sys.path:
        candidate = Path(entry or ".") / "nvidia" / "cu13"
        if (candidate / "bin" / "nvcc").is_file():
            homes.append(candidate)
    return homes


def _toolkit_home_candidates() -> List[Tuple[Path, str]]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            # An explicit choice is final: never silently fall back to another toolkit.
            return [(Path(value), f"${var}")]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _home_from_nvcc_on_path(nvcc)
        if home is not None:
            candidates.append((home, f"nvcc on PATH ({nvcc})"))
    candidates.append((Path("/usr/local/cuda"), "/usr/local/cuda"))
    candidates.extend((home, "the nvidia-cuda-nvcc wheel") for home in _pip_toolkit_homes())
    return candidates


def _cudart_version(include_dir: Path) -> Tuple[int, int]:
    header = include_dir / "cuda_runtime_api.h"
    match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", header.read_text(errors="replace"))
    if not match:
        raise ExtensionUnavailable(f"no CUDART_VERSION in {header}")
    value = int(match.group(1))
    return value // 1000, (value % 1000) // 10


def _toolkit_at(home: Path) -> Toolkit:
    home = home.resolve()
    nvcc = home / "bin" / "nvcc"
    if not nvcc.is_file():
        raise ExtensionUnavailable(f"{home} has no bin/nvcc")
    if not (home / "include" / "cuda_runtime_api.h").is_file():
        raise ExtensionUnavailable(f"{home} has no include/cuda_runtime_api.h (CUDA runtime headers)")
    match = re.search(r"release (\d+)\.(\d+)", _run([str(nvcc), "--version"]))
    if not match:
        raise ExtensionUnavailable(f"cannot read the version of {nvcc}")
    nvcc_version = (int(match.group(1)), int(match.group(2)))
    runtime_version = _cudart_version(home / "include")
    soname = f"libcudart.so.{runtime_version[0]}"
    lib_dir = next((home / d for d in ("lib64", "lib") if (home / d / soname).exists()), None)
    if lib_dir is None:
        raise ExtensionUnavailable(f"{home} has no lib64/{soname} or lib/{soname}")
    gpu_codes = frozenset(_run([str(nvcc), "--list-gpu-code"]).split())
    return Toolkit(home, nvcc, nvcc_version, runtime_version, lib_dir, gpu_codes)


def find_toolkit() -> Toolkit:
    """The CUDA toolkit to build with: ``$CUDA_HOME`` (or ``$CUDA_PATH``) if set, else the one of the
    ``nvcc`` on ``PATH``, else ``/usr/local/cuda``, else the ``nvidia-cuda-nvcc`` wheel's.

    Raises :class:`ExtensionUnavailable` naming what was tried when none is usable.
    """
    problems = []
    for home, origin in _toolkit_home_candidates():
        if not (home / "bin" / "nvcc").is_file():
            problems.append(f"{origin}: no {home / 'bin' / 'nvcc'}")
            continue
        try:
            return _toolkit_at(home)
        except ExtensionUnavailable as exc:
            problems.append(f"{origin}: {exc}")
    raise ExtensionUnavailable("no usable CUDA toolkit (nvcc) found; set CUDA_HOME. Tried: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# GPU archs
# --------------------------------------------------------------------------------------------------

_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(\+ptx)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Arch:
    """One GPU target: a cubin for ``sm_<code>``, plus PTX for ``compute_<code>`` when ``ptx``."""

    code: str  # "80", "90a", "120"
    ptx: bool = False

    @property
    def number(self) -> int:
        return int(re.match(r"\d+", self.code).group(0))

    def gencode(self) -> str:
        codes = f"[sm_{self.code},compute_{self.code}]" if self.ptx else f"sm_{self.code}"
        return f"-gencode=arch=compute_{self.code},code={codes}"

    def __str__(self) -> str:
        return f"sm_{self.code}" + ("+PTX" if self.ptx else "")


def parse_archs(spec: str) -> List[Arch]:
    """Parse an arch list such as ``"80;86;90"``, ``"8.0 9.0+PTX"`` or ``"sm_80,sm_120"``.

    Entries are separated by ``;``, ``,`` or spaces. ``+PTX`` adds PTX for that arch; when no entry
    asks for PTX, the newest arch gets it (so GPUs newer than the build still run, via the driver's JIT).
    """
    archs: Dict[str, Arch] = {}
    for token in (t for t in re.split(r"[;,\s]+", spec.strip()) if t):
        match = _ARCH_RE.match(token)
        if not match:
            raise ValueError(f"cannot parse CUDA arch {token!r} (expected e.g. 80, 8.0, sm_80, 9.0+PTX)")
        major_minor = match.group(1) + (match.group(2) or "")
        if match.group(2) is None and len(major_minor) == 1:
            raise ValueError(f"cannot parse CUDA arch {token!r}: give major and minor (e.g. 80 or 8.0)")
        code = major_minor + match.group(3).lower()
        ptx = bool(match.group(4)) or (code in archs and archs[code].ptx)
        archs[code] = Arch(code, ptx)
    if not archs:
        raise ValueError(f"empty CUDA arch list {spec!r}")
    ordered = sorted(archs.values(), key=lambda a: (a.number, a.code))
    if not any(a.ptx for a in ordered):
        generic = [a for a in ordered if a.code.isdigit()] or ordered
        newest = generic[-1]
        ordered[ordered.index(newest)] = Arch(newest.code, True)
    return ordered


def default_arch_spec(toolkit: Toolkit) -> str:
    """sm_80, sm_86, sm_89, sm_90, plus sm_100/sm_120 where the compiler has them; PTX of the newest."""
    codes = list(BASE_ARCHS) + [c for c in NEWER_ARCHS if f"sm_{c}" in toolkit.gpu_codes]
    return ";".join(codes)


def _visible_gpu_arch_spec() -> Optional[str]:
    # For a JIT build on a GPU machine: only the visible GPUs' archs (a fraction of the compile time).
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except RuntimeError:  # a broken CUDA setup: build the default list instead
        return None
    return ";".join(f"{major}{minor}" for major, minor in sorted(caps))


def _check_archs(archs: Sequence[Arch], toolkit: Toolkit) -> None:
    missing = [str(a) for a in archs if f"sm_{a.code}" not in toolkit.gpu_codes]
    if missing:
        raise ExtensionUnavailable(
            f"nvcc {'%d.%d' % toolkit.nvcc_version} in {toolkit.home} cannot build {', '.join(missing)}; it "
            f"supports {' '.join(sorted(toolkit.gpu_codes))}. Set DIFFKERN_CUDA_ARCHS to a supported list.")


# --------------------------------------------------------------------------------------------------
# Building (shared by setup.py and the JIT path)
# --------------------------------------------------------------------------------------------------


def torch_target_version_macro() -> str:
    """The value of ``-DTORCH_TARGET_VERSION`` (torch's encoding: major << 56 | minor << 48)."""
    major, minor = TORCH_TARGET
    return "0x%016x" % ((major << 56) | (minor << 48))


def _torch_dirs() -> Tuple[Path, Path, str]:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a hard dependency
        raise ExtensionUnavailable(f"building the CUDA extension needs torch: {exc}") from exc
    root = Path(torch.__file__).resolve().parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "csrc" / "stable" / "library.h").is_file():
        raise ExtensionUnavailable(
            f"torch {torch.__version__} at {root} has no stable-ABI headers (torch/csrc/stable); "
            f"torch>={TORCH_TARGET[0]}.{TORCH_TARGET[1]} is needed to build the CUDA extension")
    return include, lib, torch.__version__


def _cuda_only_shim_functions(torch_include: Path) -> List[str]:
    """Names of the torch C-shim functions declared only under ``USE_CUDA`` (defined in libtorch_cuda).

    The library may reference these although it is linked against the CPU libraries only; every other
    symbol must resolve at link time (checked by the ``audit`` link in the ninja file).
    """
    names = set()
    for header in ("torch/csrc/inductor/aoti_torch/c/shim.h", "torch/csrc/stable/c/shim.h"):
        path = torch_include / header
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for block in re.findall(r"#ifdef USE_CUDA\b(.*?)#endif\s*//\s*USE_CUDA", text, re.DOTALL):
            names.update(re.findall(r"\b((?:aoti_)?torch_\w+)\s*\(", block))
    return sorted(names)


def _ninja_path(path) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_command(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args).replace("$", "$$")


def _find_ninja() -> str:
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_pkg  # the PyPI "ninja" package

            candidate = Path(ninja_pkg.BIN_DIR) / "ninja"
            ninja = str(candidate) if candidate.is_file() else None
        except ImportError:
            ninja = None
    if ninja is None:
        raise ExtensionUnavailable("ninja is needed to build the CUDA extension (pip install ninja)")
    return ninja


def _find_cxx() -> str:
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    if path is None:
        raise ExtensionUnavailable(f"no C++ compiler {cxx!r} found (set CXX)")
    return path


def source_files(source_dir: Path) -> List[Path]:
    """Every ``*.cu`` and ``*.cpp`` directly in ``source_dir`` (a glob, so new kernels need no edit here)."""
    return sorted(p for p in Path(source_dir).iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())


@dataclass
class BuildResult:
    library: Path  # the linked shared library
    info: dict  # what goes into _build_info.json
    seconds: float  # wall time of the ninja run (0 when up to date)


def _runpath(toolkit: Toolkit, torch_lib: Path, for_wheel: bool) -> List[str]:
    if for_wheel:
        # Relative to site-packages/diffkern/: torch's libraries and the CUDA runtime wheel's libcudart.
        # No build-machine paths go into a wheel.
        pip_dirs = _PIP_CUDART_DIRS.get(toolkit.cuda_major, ())
        return ["$ORIGIN/../torch/lib"] + [f"$ORIGIN/../{d}" for d in pip_dirs]
    return [str(torch_lib), str(toolkit.lib_dir)]


def _write_ninja_file(build_dir: Path, sources: Sequence[Path], toolkit: Toolkit, archs: Sequence[Arch],
                      for_wheel: bool) -> None:
    torch_include, torch_lib, _ = _torch_dirs()
    cxx = _find_cxx()
    defines = ["-DUSE_CUDA", f"-DTORCH_TARGET_VERSION={torch_target_version_macro()}"]
    includes = ["-isystem", str(torch_include), "-isystem", str(toolkit.include_dir)]
    compat = Path(sources[0]).resolve().parent / GLIBC_COMPAT_HEADER
    forced_nvcc = ["--pre-include", str(compat)] if compat.is_file() else []
    forced_cxx = ["-include", str(compat)] if compat.is_file() else []
    nvcc_flags = list(NVCC_FLAGS) + forced_nvcc + defines + includes + [a.gencode() for a in archs]
    if toolkit.cross_major:
        # Fatbinary compression formats are newer than some drivers of the older major; store plainly.
        nvcc_flags.append("--no-compress")
    if os.environ.get("CXX"):
        nvcc_flags += ["-ccbin", cxx]
    cxx_flags = list(CXX_FLAGS) + forced_cxx + defines + includes
    # -l:<soname> links the runtime by file name: wheels of the CUDA runtime ship no libcudart.so symlink.
    # -ldl: kernels may resolve CUDA-only torch functions with dlsym (in libdl before glibc 2.34).
    ldflags = ["-shared", f"-L{torch_lib}", f"-L{toolkit.lib_dir}", "-ltorch_cpu", "-lc10",
               f"-l:{toolkit.cudart_soname}", "-ldl"]
    ldflags += [f"-Wl,-rpath,{p}" for p in _runpath(toolkit, torch_lib, for_wheel)]

    stub = build_dir / "cuda_shim_stub.c"
    stub_lines = ["/* Generated. Link-time stand-ins for the CUDA-only torch shim functions (libtorch_cuda),",
                  "   used only by the audit link: every other symbol must resolve against the real libraries. */"]
    stub_lines += [f"void {name}(void) {{}}" for name in _cuda_only_shim_functions(torch_include)]
    _write_if_changed(stub, "\n".join(stub_lines) + "\n")

    lines = [
        "# Generated by diffkern/_extension.py; edits are overwritten.",
        "ninja_required_version = 1.3",
        f"nvcc = {_ninja_command([toolkit.nvcc])}",
        f"cxx = {_ninja_command([cxx])}",
        f"nvcc_flags = {_ninja_command(nvcc_flags)}",
        f"cxx_flags = {_ninja_command(cxx_flags)}",
        f"ldflags = {_ninja_command(ldflags)}",
        "",
        "rule nvcc",
        "  command = $nvcc $nvcc_flags --generate-dependencies-with-compile --dependency-output $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "rule cxx",
        "  command = $cxx $cxx_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "rule cc_stub",
        "  command = $cxx -x c -fPIC -c $in -o $out",
        "  description = CC $in",
        # Every symbol but the CUDA-only shim functions must resolve: catches a function declared but defined
        # nowhere, which a lazily bound library would only hit on a GPU.
        "rule audit_link",
        "  command = $cxx $in -o $out $ldflags -Wl,--no-undefined",
        "  description = AUDIT undefined symbols",
        # Link to a temporary name and rename: a process that has the old library mapped keeps its copy.
        "rule link",
        "  command = $cxx $in -o $out.tmp $ldflags && mv -f $out.tmp $out",
        "  description = LINK $out",
        "",
    ]
    objects = []
    for src in sources:
        obj = f"obj/{src.name}.o"
        rule = "nvcc" if src.suffix == ".cu" else "cxx"
        lines.append(f"build {_ninja_path(obj)}: {rule} {_ninja_path(src.resolve())}")
        objects.append(_ninja_path(obj))
    lines += [
        f"build obj/cuda_shim_stub.o: cc_stub {_ninja_path(stub)}",
        f"build link_audit.so: audit_link {' '.join(objects)} obj/cuda_shim_stub.o",
        f"build {JIT_LIBRARY_FILE}: link {' '.join(objects)} || link_audit.so",
        f"default {JIT_LIBRARY_FILE}",
        "",
    ]
    _write_if_changed(build_dir / "build.ninja", "\n".join(lines))


def _write_if_changed(path: Path, text: str) -> None:
    # Keeps mtimes stable so ninja does not rebuild for an identical generated file.
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


class _FileLock:
    """An exclusive advisory lock on a file: concurrent builds of one directory wait for each other."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _run_ninja(build_dir: Path, jobs: Optional[int], verbose: bool) -> float:
    cmd = [_find_ninja(), "-C", str(build_dir)]
    jobs = jobs or int(os.environ.get("MAX_JOBS", "0") or 0)
    if jobs:
        cmd += ["-j", str(jobs)]
    if verbose:
        cmd.append("-v")
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        output = proc.stdout or "(output above)"
        (build_dir / "build.log").write_text(output if proc.stdout else "")
        hint = ""
        if "AUDIT" in output and "undefined reference" in output:
            hint = ("\nThe library references symbols defined nowhere in csrc/ or in torch's CPU libraries. "
                    "Only the CUDA-only torch shim functions (e.g. aoti_torch_get_current_cuda_stream) "
                    "may stay unresolved; see docs/building.md.")
        tail = "\n".join(output.splitlines()[-80:])
        raise ExtensionUnavailable(f"building the CUDA extension in {build_dir} failed:\n{tail}{hint}")
    return elapsed


def build(source_dir: Optional[Path] = None, build_dir: Optional[Path] = None, archs: Optional[str] = None, *,
          toolkit: Optional[Toolkit] = None, for_wheel: bool = False, jobs: Optional[int] = None,
          verbose: bool = False) -> BuildResult:
    """Compile every ``*.cu``/``*.cpp`` of ``source_dir`` (default ``csrc/``) into one library with ninja.

    ``archs`` is an arch list (see :func:`parse_archs`), default ``$DIFFKERN_CUDA_ARCHS`` or
    :func:`default_arch_spec`. ``for_wheel`` keeps build-machine paths out of the library's RUNPATH.
    Incremental: ninja tracks sources, included headers and command lines. Raises
    :class:`ExtensionUnavailable` with the compiler output on failure.
    """
    toolkit = toolkit or find_toolkit()
    source_dir = Path(source_dir or _SOURCE_DIR).resolve()
    if not source_dir.is_dir():
        raise ExtensionUnavailable(f"no CUDA sources: {source_dir} is not a directory")
    sources = source_files(source_dir)
    if not sources:
        raise ExtensionUnavailable(f"no *.cu or *.cpp files in {source_dir}")
    spec = archs or os.environ.get("DIFFKERN_CUDA_ARCHS") or default_arch_spec(toolkit)
    try:
        arch_list = parse_archs(spec)
    except ValueError as exc:
        raise ExtensionUnavailable(str(exc)) from exc
    _check_archs(arch_list, toolkit)
    _, _, torch_version = _torch_dirs()
    build_dir = Path(build_dir) if build_dir else _jit_build_dir(toolkit, arch_list, source_dir)
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    with _FileLock(build_dir / ".lock"):
        _write_ninja_file(build_dir, sources, toolkit, arch_list, for_wheel)
        seconds = _run_ninja(build_dir, jobs, verbose)
        library = build_dir / JIT_LIBRARY_FILE
        info = {
            "cuda_version": toolkit.version_string,
            "cudart_soname": toolkit.cudart_soname,
            "nvcc_version": "%d.%d" % toolkit.nvcc_version,
            "archs": [f"sm_{a.code}" for a in arch_list],
            "ptx": [f"compute_{a.code}" for a in arch_list if a.ptx],
            "torch_target_version": "%d.%d" % TORCH_TARGET,
            "built_with_torch": torch_version,
            "sources": [p.name for p in sources],
        }
        _write_if_changed(build_dir / BUILD_INFO_NAME, json.dumps(info, indent=2) + "\n")
    return BuildResult(library, info, seconds)


def _cache_root() -> Path:
    if os.environ.get("DIFFKERN_CACHE_DIR"):
        return Path(os.environ["DIFFKERN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffkern"


def _jit_build_dir(toolkit: Toolkit, archs: Sequence[Arch], source_dir: Path) -> Path:
    import torch

    arch_key = "-".join(a.code + ("p" if a.ptx else "") for a in archs)
    # Two checkouts must not share (and keep rebuilding) one directory.
    where = hashlib.sha256(str(source_dir).encode()).hexdigest()[:10]
    name = f"torch{torch.__version__}_cuda{toolkit.version_string}_sm{arch_key}_{where}"
    return _cache_root() / re.sub(r"[^A-Za-z0-9._-]", "_", name)


# --------------------------------------------------------------------------------------------------
# Inspecting a built library
# --------------------------------------------------------------------------------------------------


def find_cuobjdump() -> Optional[str]:
    """A ``cuobjdump``: the toolkit's, one on PATH, or the one bundled with the triton wheel."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "cuobjdump")
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/cuobjdump"))
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except (ImportError, ValueError):
        pass
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def cuda_images(library: Path, cuobjdump: Optional[str] = None) -> Dict[str, List[str]]:
    """The device code embedded in ``library``: ``{"elf": ["sm_80", ...], "ptx": ["compute_90", ...]}``."""
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("no cuobjdump found (CUDA toolkit, PATH, or the triton wheel)")
    proc = subprocess.run([tool, "--list-elf", "--list-ptx", str(library)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    def by_number(name: str):
        digits = re.search(r"\d+", name).group(0)
        return int(digits), name

    elf = sorted({m for m in re.findall(r"^ELF file\s+\d+:.*\.(sm_\w+)\.cubin\s*$", proc.stdout, re.MULTILINE)},
                 key=by_number)
    ptx = sorted({"compute_" + m for m in re.findall(r"^PTX file\s+\d+:.*\.sm_(\w+)\.ptx\s*$", proc.stdout,
                                                     re.MULTILINE)}, key=by_number)
    if proc.returncode != 0 and not elf and not ptx:
        raise RuntimeError(f"cuobjdump failed on {library}: {proc.stdout.strip()}")
    return {"elf": elf, "ptx": ptx}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    loaded: bool = False
    source: Optional[str] = None  # "prebuilt", "jit", "external" (registered by someone else)
    path: Optional[str] = None
    reason: str = "not loaded yet (diffkern._extension.load() has not been called)"
    info: Optional[dict] = None
    error: Optional[str] = None  # a failed load() is not retried in this process
    handle: Optional[int] = None


_state = _State()
_lock = threading.RLock()


def _reset_for_tests() -> None:
    """Forget a cached failure (a library that was opened stays loaded: dlclose is never safe here)."""
    global _state
    with _lock:
        if not _state.loaded:
            _state = _State()


def _libc_dl():
    # dlopen/dlerror through ctypes: ctypes.CDLL's handling of the binding flags has varied between Python
    # versions, and we need exactly RTLD_LAZY or RTLD_NOW.
    libc = ctypes.CDLL(None)
    try:
        dlopen, dlerror = libc.dlopen, libc.dlerror
    except AttributeError:  # glibc < 2.34 keeps them in libdl
        libdl = ctypes.CDLL("libdl.so.2")
        dlopen, dlerror = libdl.dlopen, libdl.dlerror
    dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    dlerror.restype, dlerror.argtypes = ctypes.c_char_p, []
    return dlopen, dlerror


def _dlopen(path: str, flags: int) -> int:
    dlopen, dlerror = _libc_dl()
    handle = dlopen(path.encode(), flags)
    if not handle:
        message = dlerror()
        raise OSError(message.decode(errors="replace") if message else f"dlopen({path}) failed")
    return handle


def _registered_ops(torch, dispatch_key: str = "CUDA") -> Dict[str, bool]:
    """For each of CUDA_OPS: whether a kernel for ``dispatch_key`` is registered (defines the schemas first)."""
    from diffkern.ops import _declaration

    _declaration.define_cuda_ops()
    return {op.name: bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op.name}", dispatch_key))
            for op in _declaration.cuda_ops()}


def _kernels_registered(torch) -> bool:
    """Whether a library has registered the ops' kernels already: the real one (CUDA) or the host emulation of
    tests/cuda_emulation (CPU)."""
    return any(_registered_ops(torch, "CUDA").values()) or any(_registered_ops(torch, "CPU").values())


def _cudart_search_dirs(info: dict) -> List[Path]:
    major = int(str(info.get("cuda_version", "0")).split(".")[0])
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs += [Path(os.environ[var]) / "lib64", Path(os.environ[var]) / "lib"]
    if info.get("cudart_dir"):
        dirs.append(Path(info["cudart_dir"]))
    dirs += [Path(entry or ".") / d for entry in sys.path for d in _PIP_CUDART_DIRS.get(major, ())]
    dirs += [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/lib")]
    return dirs


def _ensure_cudart(info: dict) -> None:
    """Make ``libcudart.so.<major>`` loadable by soname: a CUDA torch has loaded it already; a CPU torch
    has not, and the wheel's RUNPATH only covers the pip layout, so look in the usual places."""
    soname = info.get("cudart_soname")
    if not soname:
        return
    try:
        ctypes.CDLL(soname, mode=os.RTLD_NOW | os.RTLD_NOLOAD)  # already loaded
        return
    except OSError:
        pass
    try:
        ctypes.CDLL(soname, mode=os.RTLD_NOW | os.RTLD_LOCAL)  # LD_LIBRARY_PATH, ld.so.cache
        return
    except OSError:
        pass
    for directory in _cudart_search_dirs(info):
        candidate = directory / soname
        if candidate.is_file():
            try:
                ctypes.CDLL(str(candidate), mode=os.RTLD_NOW | os.RTLD_LOCAL)
                return
            except OSError:
                continue
    # Not fatal here: if the library's RUNPATH finds it, fine; otherwise dlopen names it.


def _promote_libtorch_cuda() -> bool:
    """Give the ``libtorch_cuda.so`` a CUDA torch loaded privately global scope, so the extension's
    references to the CUDA shim functions resolve. Returns whether it is loaded."""
    try:
        ctypes.CDLL("libtorch_cuda.so", mode=os.RTLD_NOW | os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _open_library(path: Path, info: dict) -> int:
    """dlopen ``path`` into this process (see the module docstring for the flags) and check that every
    op of CUDA_OPS registered with a CUDA kernel. The caller has checked that none is registered yet."""
    import torch

    _ensure_cudart(info)
    if torch.version.cuda:
        if not _promote_libtorch_cuda():
            raise ExtensionUnavailable(f"torch {torch.__version__} reports CUDA {torch.version.cuda} but "
                                       "libtorch_cuda.so is not loaded")
        flags = os.RTLD_NOW | os.RTLD_LOCAL
    else:
        flags = os.RTLD_LAZY | os.RTLD_LOCAL  # CPU torch: the CUDA shim functions stay unresolved
    try:
        handle = _dlopen(str(path), flags)
    except OSError as exc:
        raise ExtensionUnavailable(f"cannot load {path}: {exc}") from exc
    registered = _registered_ops(torch)
    problems = [op for op, has_kernel in registered.items() if not has_kernel]
    if problems:
        raise ExtensionUnavailable(
            f"{path} loaded but did not register a CUDA kernel for "
            + ", ".join(f"{NAMESPACE}::{op}" for op in problems))
    return handle


def _probe(path: str) -> dict:
    """Load ``path`` in this (throw-away) process and report what registered. Used by the JIT path and
    the tests, always in a subprocess: a library that fails inside torch's registration kills it."""
    import torch

    info_path = Path(path).parent / BUILD_INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    result = {"path": path, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "ok": True}
    try:
        _open_library(Path(path), info)
    except ExtensionUnavailable as exc:
        result.update(ok=False, error=str(exc))
    result["cuda_kernel"] = _registered_ops(torch)
    result["schemas"] = {op: str(getattr(getattr(torch.ops, NAMESPACE), op).default._schema)
                         for op in result["cuda_kernel"]}
    return result


def probe_in_subprocess(path: Path, timeout: float = 300) -> dict:
    """Run :func:`_probe` on ``path`` in a fresh Python process; returns its report (``ok``, ``error``,
    ``schemas``, ``cuda_kernel``) or raises :class:`ExtensionUnavailable` if the process died."""
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('_diffkern_extension_probe', {str(Path(__file__))!r})\n"
            "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod\n"
            "spec.loader.exec_module(mod)\n"
            f"print('DIFFKERN_PROBE ' + json.dumps(mod._probe({str(path)!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("DIFFKERN_PROBE "):
            return json.loads(line[len("DIFFKERN_PROBE "):])
    raise ExtensionUnavailable(f"loading {path} in a subprocess failed (exit code {proc.returncode}):\n"
                               + "\n".join(proc.stdout.splitlines()[-40:]))


def _prebuilt_library() -> Optional[Path]:
    found = sorted(p for p in _PACKAGE_DIR.glob(f"{LIBRARY_NAME}*.so") if p.is_file())
    return found[0] if found else None


def _compat_problem(info: dict, torch) -> Optional[str]:
    """Why a library built for ``info`` must not be loaded into this torch, or None."""
    built = str(info.get("cuda_version", ""))
    if not built:
        return "its build info does not say which CUDA it was built for"
    if torch.version.cuda is None:
        return None  # CPU torch: the ops can register (schema checks); no kernel can run anyway
    if built.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"it was built for CUDA {built} but torch {torch.__version__} uses CUDA {torch.version.cuda}; "
                f"install the diffkern wheel for CUDA {torch.version.cuda.split('.')[0]} "
                f"(local version +cu{torch.version.cuda.split('.')[0]}x)")
    return None


def _load_prebuilt(path: Path, torch) -> Optional[str]:
    """Load the prebuilt library; returns None on success, else why it was not loaded."""
    info_path = path.parent / BUILD_INFO_NAME
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        return f"prebuilt {path}: cannot read {info_path.name} ({exc}); rebuild it"
    problem = _compat_problem(info, torch)
    if problem:
        message = f"diffkern: not loading the prebuilt CUDA extension {path}: {problem}"
        warnings.warn(message + ". The Triton backend is used instead.", RuntimeWarning, stacklevel=3)
        return message
    try:
        _state.handle = _open_library(path, info)
    except ExtensionUnavailable as exc:
        if _kernels_registered(torch):
            raise  # it is (partly) loaded: nothing else may be opened for the namespace now
        return f"prebuilt {exc}"  # dlopen failed before any registration ran: the JIT path may try
    _state.info = info
    return None


def _load_jit(torch) -> None:
    toolkit = find_toolkit()
    if torch.version.cuda and str(toolkit.cuda_major) != torch.version.cuda.split(".")[0]:
        raise ExtensionUnavailable(
            f"the CUDA toolkit in {toolkit.home} is CUDA {toolkit.version_string} but torch uses CUDA "
            f"{torch.version.cuda}; point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]} toolkit")
    archs = os.environ.get("DIFFKERN_CUDA_ARCHS") or _visible_gpu_arch_spec() or default_arch_spec(toolkit)
    try:
        build_dir = _jit_build_dir(toolkit, parse_archs(archs), _SOURCE_DIR.resolve())
    except ValueError as exc:
        raise ExtensionUnavailable(f"DIFFKERN_CUDA_ARCHS: {exc}") from exc
    if not (build_dir / JIT_LIBRARY_FILE).exists():
        logger.warning("diffkern: compiling the CUDA extension for %s into %s (once; takes a while)",
                       archs, build_dir)
    result = build(_SOURCE_DIR, build_dir, archs, toolkit=toolkit)
    info = dict(result.info, cudart_dir=str(toolkit.lib_dir))
    stamp = build_dir / "verified.json"
    stat = result.library.stat()
    fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "torch": torch.__version__}
    if not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint:
        report = probe_in_subprocess(result.library)
        if not report.get("ok"):
            raise ExtensionUnavailable(report.get("error", "probe failed"))
        stamp.write_text(json.dumps(fingerprint))
    _state.handle = _open_library(result.library, info)
    _state.info = info
    _state.path = str(result.library)


def load() -> None:
    """Load the CUDA extension into this process (idempotent; thread-safe).

    Tries the prebuilt library, then a JIT build of ``csrc/``. Raises :class:`ExtensionUnavailable` with
    every reason when neither works; the failure is remembered and re-raised by later calls.
    """
    with _lock:
        if _state.loaded:
            return
        if _state.error is not None:
            raise ExtensionUnavailable(_state.error)
        try:
            _load_locked()
        except ExtensionUnavailable as exc:
            _state.error = _state.reason = str(exc)
            raise


def _load_locked() -> None:
    if not sys.platform.startswith("linux"):
        raise ExtensionUnavailable(f"the CUDA extension is built and loaded on Linux only, not {sys.platform}")
    import torch

    if getattr(torch.version, "hip", None):
        raise ExtensionUnavailable(f"torch {torch.__version__} is a ROCm build; the extension is CUDA-only")
    if _kernels_registered(torch):
        # Someone else (torch.ops.load_library, another copy of diffkern) registered the ops: opening a
        # second library for the namespace would crash, and these ops are usable as they are.
        _state.loaded, _state.source = True, "external"
        _state.reason = "the diffkern CUDA ops were already registered when load() was first called"
        return
    reasons = []
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        problem = _load_prebuilt(prebuilt, torch)
        if problem is None:
            _state.loaded, _state.source, _state.path = True, "prebuilt", str(prebuilt)
            _state.reason = f"prebuilt library for CUDA {_state.info.get('cuda_version')}"
            return
        reasons.append(problem)
    else:
        reasons.append(f"no prebuilt library in {_PACKAGE_DIR} (build one with DIFFKERN_BUILD_CUDA=1 pip install)")
    if os.environ.get("DIFFKERN_NO_JIT") == "1":
        reasons.append("JIT build disabled (DIFFKERN_NO_JIT=1)")
    elif not _SOURCE_DIR.is_dir() or not source_files(_SOURCE_DIR):
        reasons.append(f"no CUDA sources to JIT-build at {_SOURCE_DIR}")
    else:
        try:
            _load_jit(torch)
            _state.loaded, _state.source = True, "jit"
            _state.reason = f"JIT-built for CUDA {_state.info.get('cuda_version')}"
            return
        except ExtensionUnavailable as exc:
            reasons.append(f"JIT build: {exc}")
    raise ExtensionUnavailable("the diffkern CUDA extension is unavailable: " + "; ".join(reasons))


def status() -> dict:
    """Where the extension stands, without loading anything.

    Keys: ``loaded``; ``source`` ("prebuilt", "jit", "external" or None); ``path`` (the loaded library,
    or the prebuilt one :func:`load` would try); ``reason``; ``cuda_version`` (the library's, from its build
    info); ``torch_cuda_version`` (``torch.version.cuda``, None on a CPU build); ``archs``; ``ptx``.
    """
    with _lock:
        info = _state.info
        path = _state.path
        if not _state.loaded and path is None:
            prebuilt = _prebuilt_library()
            if prebuilt is not None:
                path = str(prebuilt)
                try:
                    info = json.loads((prebuilt.parent / BUILD_INFO_NAME).read_text())
                except (OSError, ValueError):
                    info = None
        torch = sys.modules.get("torch")
        return {
            "loaded": _state.loaded,
            "source": _state.source,
            "path": path,
            "reason": _state.reason,
            "cuda_version": (info or {}).get("cuda_version"),
            "torch_cuda_version": getattr(getattr(torch, "version", None), "cuda", None) if torch else None,
            "archs": (info or {}).get("archs"),
            "ptx": (info or {}).get("ptx"),
        }


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diffkern._extension", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="load() and print status() as JSON")
    b = sub.add_parser("build", help="build csrc/ into a directory (default: the JIT cache)")
    b.add_argument("--build-dir", type=Path)
    b.add_argument("--archs", help="e.g. '80;90' (default: $DIFFKERN_CUDA_ARCHS or the full list)")
    p = sub.add_parser("probe", help="load a library in this process and print what it registered")
    p.add_argument("library")
    args = parser.parse_args(argv)
    if args.command == "status":
        try:
            load()
        except ExtensionUnavailable:
            pass
        print(json.dumps(status(), indent=2))
        return 0 if _state.loaded else 1
    if args.command == "build":
        result = build(build_dir=args.build_dir, archs=args.archs, verbose=True)
        print(json.dumps({"library": str(result.library), "seconds": round(result.seconds, 1), **result.info},
                         indent=2))
        return 0
    report = _probe(args.library)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
