"""Build script for diffkern (metadata lives in pyproject.toml).

Default: a pure-Python package. The ops then run on the PyTorch reference and Triton backends, and the
CUDA backend can still be JIT-compiled from a source checkout at first use (diffkern/_extension.py).

``DIFFKERN_BUILD_CUDA=1`` also builds the CUDA extension ``diffkern/_C.abi3.so`` from every
``csrc/*.cu`` and ``csrc/*.cpp``::

    DIFFKERN_BUILD_CUDA=1 pip install --no-build-isolation .          # or -e . for an in-place build
    DIFFKERN_BUILD_CUDA=1 pip wheel --no-build-isolation --no-deps -w dist .

- ``--no-build-isolation`` is required: the extension is compiled against the installed torch (>= 2.10,
  any CUDA flavour, CPU-only included), and an isolated build environment would download another one.
- The toolkit is ``$CUDA_HOME`` (else the ``nvcc`` on PATH, else /usr/local/cuda). Its runtime version sets
  the local version label (``0.1.0+cu130``) and the ``libcudart.so.<major>`` the library needs.
- ``DIFFKERN_CUDA_ARCHS`` picks the GPU archs (e.g. ``"80;90"``); the default is sm_80, sm_86, sm_89,
  sm_90, plus sm_100 and sm_120 when the compiler has them, with PTX of the newest.
- ``MAX_JOBS`` caps the parallel compile jobs; ``DIFFKERN_BUILD_DIR`` picks the ninja build directory
  (default: under setuptools' build_temp), which makes rebuilds incremental.

The compile itself (flags, ninja file, the undefined-symbol audit) is shared with the JIT path: both call
``build()`` in diffkern/_extension.py, loaded here by file path so the package itself is not imported.
The wheel is tagged ``cp39-abi3`` (the library never touches the Python C API, so one wheel serves every
CPython >= 3.9) and ``manylinux_2_28_x86_64``, PyTorch's own tag, whatever the glibc of the build machine:
every host compile force-includes ``csrc/glibc_compat.h``, which binds the few functions newer glibcs moved
(``dlopen``... got ``GLIBC_2.34``) to their original versions and keeps libstdc++ off glibc 2.32's
``__libc_single_threaded``. The tag is then taken from what the linked library actually needs (never below
2.28); scripts/check_wheel.py holds every ``GLIBC_``/``GLIBCXX_``/``CXXABI_``/``GCC_`` version against it.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
BASE_VERSION = "0.1.0"
BUILD_CUDA = os.environ.get("DIFFKERN_BUILD_CUDA", "0").strip().lower() in ("1", "true", "yes", "on")

#: The oldest glibc the wheel's platform tag ever claims: PyTorch's wheels are manylinux_2_28, so an older
#: system cannot run torch anyway, and libstdc++'s GLIBCXX_3.4.21 ABI (GCC >= 5) rules out manylinux2014.
MANYLINUX_FLOOR = (2, 28)
#: Force-included into every host compile (see the header): keeps the library within glibc 2.28.
GLIBC_COMPAT_HEADER = ROOT / "csrc" / "glibc_compat.h"


def _build_tools():
    """diffkern/_extension.py as a standalone module (importing the package would import its deps)."""
    name = "_diffkern_build_tools"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "diffkern" / "_extension.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def _use_glibc_compat_header(tools) -> None:
    """Add ``csrc/glibc_compat.h`` as a forced include to the shared compile flags of diffkern/_extension.py.

    nvcc's ``--pre-include`` reaches both its preprocessing passes (host and device) but not the final compile
    of the already-preprocessed host code, so the header's ``.symver`` directives are emitted once. A no-op
    when _extension.py adds the header itself (it then defines ``GLIBC_COMPAT_HEADER``, and the JIT build and
    the wheel compile alike, so CI's build test reuses the wheel check's objects).
    """
    header = str(GLIBC_COMPAT_HEADER)
    if (not GLIBC_COMPAT_HEADER.is_file() or hasattr(tools, "GLIBC_COMPAT_HEADER")
            or any("glibc_compat.h" in flag for flag in tools.NVCC_FLAGS + tools.CXX_FLAGS)):
        return
    tools.NVCC_FLAGS = tuple(tools.NVCC_FLAGS) + ("--pre-include", header)
    tools.CXX_FLAGS = tuple(tools.CXX_FLAGS) + ("-include", header)


def _needed_glibc(library: Path):
    """The newest ``GLIBC_x.y`` version ``library`` needs (its version-needs section), or None if unknown."""
    readelf = shutil.which("readelf")
    if readelf is None or not library.is_file():
        return None
    try:
        out = subprocess.run([readelf, "-V", "-W", str(library)], check=True, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    versions = [tuple(int(x) for x in v.split(".")) for v in re.findall(r"Name: GLIBC_(\d+(?:\.\d+)+)", out)]
    return max(versions, default=(2, 0))[:2]


def _cuda_toolkit():
    tools = _build_tools()
    if importlib.util.find_spec("torch") is None:  # the extension compiles against this torch's headers
        sys.exit("error: DIFFKERN_BUILD_CUDA=1 needs torch>=2.10 installed in the build environment; run pip "
                 "with --no-build-isolation (an isolated build would not see the installed torch)")
    try:
        return tools.find_toolkit()
    except tools.ExtensionUnavailable as exc:
        sys.exit(f"error: DIFFKERN_BUILD_CUDA=1 but {exc}")


class BuildCudaExtension(build_ext):
    """Builds the CUDA extension with the ninja pipeline of diffkern/_extension.py instead of distutils'
    compiler classes (which do not know nvcc), then writes diffkern/_build_info.json next to it.

    setuptools always builds into build_lib and, for in-place/editable builds, copies the extension into
    the source tree afterwards; the build info has to travel with it.
    """

    def run(self):
        self._in_place = bool(self.inplace)  # setuptools clears `inplace` while it builds
        super().run()

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        source = Path(self.build_lib) / "diffkern" / _build_tools().BUILD_INFO_NAME
        target = Path(self.get_finalized_command("build_py").get_package_dir("diffkern")) / source.name
        self.copy_file(str(source), str(target), level=self.verbose)

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            name = _build_tools().BUILD_INFO_NAME
            package_dir = self.get_finalized_command("build_py").get_package_dir("diffkern")
            mapping[str(Path(self.build_lib) / "diffkern" / name)] = str(Path(package_dir) / name)
        return mapping

    def build_extension(self, ext):
        tools = _build_tools()
        toolkit = TOOLKIT
        jobs = self.parallel if isinstance(self.parallel, int) and self.parallel > 1 else None
        # DIFFKERN_BUILD_DIR lets CI share one ninja directory between the wheel build and the build test
        # (same compile commands, so the second only relinks).
        build_dir = os.environ.get("DIFFKERN_BUILD_DIR") or Path(self.build_temp) / f"diffkern_cuda_{toolkit.local_tag}"
        _use_glibc_compat_header(tools)
        try:
            result = tools.build(
                ROOT / "csrc",
                Path(build_dir).resolve(),
                os.environ.get("DIFFKERN_CUDA_ARCHS"),
                toolkit=toolkit,
                # An in-place build may keep absolute RUNPATHs (this machine's torch and CUDA); a wheel may not.
                for_wheel=not getattr(self, "_in_place", False),
                jobs=jobs,
                verbose=True,
            )
        except tools.ExtensionUnavailable as exc:
            sys.exit(f"error: {exc}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename: a process that has the old library mapped keeps its copy.
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(result.library, tmp)
        os.replace(tmp, target)
        info = dict(result.info, library=target.name)
        (target.parent / tools.BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")


class BdistWheel(bdist_wheel):
    """Tags a wheel with the extension ``manylinux_<X>_<Y>_<arch>``: X.Y is the newest glibc symbol version the
    linked library needs, but at least MANYLINUX_FLOOR (2.28), so normally ``manylinux_2_28``.

    Honest on any build machine: a library that needs a newer glibc (a symbol csrc/glibc_compat.h does not
    cover) gets a newer tag, and scripts/check_wheel.py then fails it against the 2.28 expectation of
    scripts/build_wheels.sh. Without readelf the build machine's glibc is used, as conservative as before.
    """

    def get_tag(self):
        impl, abi, plat = super().get_tag()
        if not (BUILD_CUDA and plat.startswith("linux_")):
            return impl, abi, plat
        build_ext_cmd = self.get_finalized_command("build_ext")
        needed = _needed_glibc(Path(build_ext_cmd.get_ext_fullpath("diffkern._C")))
        if needed is None:
            try:
                libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # e.g. "glibc 2.36"; the system's, not Python's
            except (AttributeError, ValueError, OSError):
                libc = ""
            match = re.fullmatch(r"glibc (\d+)\.(\d+)(?:\.\d+)?", libc)
            if not match:
                return impl, abi, plat
            needed = (int(match.group(1)), int(match.group(2)))
        glibc = max(needed, MANYLINUX_FLOOR)
        return impl, abi, f"manylinux_{glibc[0]}_{glibc[1]}_{plat[len('linux_'):]}"


if BUILD_CUDA:
    TOOLKIT = _cuda_toolkit()
    sources = _build_tools().source_files(ROOT / "csrc") if (ROOT / "csrc").is_dir() else []
    if not sources:
        sys.exit(f"error: DIFFKERN_BUILD_CUDA=1 but there are no *.cu or *.cpp files in {ROOT / 'csrc'}")
    setup(
        version=f"{BASE_VERSION}+{TOOLKIT.local_tag}",
        ext_modules=[
            Extension(
                "diffkern._C",
                sources=[str(p.relative_to(ROOT)) for p in sources],
                py_limited_api=True,
            )
        ],
        cmdclass={"build_ext": BuildCudaExtension, "bdist_wheel": BdistWheel},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
else:
    setup(version=BASE_VERSION)
