"""Build script for diffkern (metadata lives in pyproject.toml).

Default: a pure-Python package (the ops run on the reference and Triton backends; from a source checkout the
CUDA backend is JIT-built at first use, see diffkern/_extension.py). ``DIFFKERN_BUILD_CUDA=1`` also builds the
CUDA extension ``diffkern/_C.abi3.so`` from every ``csrc/*.cu``/``*.cpp`` with ``torch.utils.cpp_extension``::

    DIFFKERN_BUILD_CUDA=1 pip install --no-build-isolation .          # or -e . for an in-place build
    DIFFKERN_BUILD_CUDA=1 pip wheel --no-build-isolation --no-deps -w dist .

``--no-build-isolation``: the extension compiles against the installed torch (>= 2.10, CPU-only included). The
toolkit is cpp_extension's ``CUDA_HOME``; its runtime version sets the local version (``0.1.0+cu130``).
``TORCH_CUDA_ARCH_LIST`` overrides the archs (default: diffkern/_build.py), ``MAX_JOBS`` the compile jobs; the
flags are diffkern/_build.py's, shared with the JIT build. The wheel is ``cp39-abi3`` (the library uses torch's
stable C ABI, never the Python C API) and ``manylinux_<glibc>``: the newest ``GLIBC_`` version the library needs,
at least 2.28 (csrc/glibc_compat.h keeps it there; scripts/check_wheel.py and auditwheel verify it).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel

ROOT = Path(__file__).parent.resolve()
BASE_VERSION = "0.1.0"
BUILD_CUDA = os.environ.get("DIFFKERN_BUILD_CUDA", "0").strip().lower() in ("1", "true", "yes", "on")
MANYLINUX_FLOOR = (2, 28)  # PyTorch's own tag: a system below it cannot run torch


class BdistWheel(bdist_wheel):
    """Tags the wheel ``manylinux_X_Y``: the newest ``GLIBC_X.Y`` the built library needs, never below 2.28."""

    def get_tag(self):
        impl, abi, plat = super().get_tag()
        if BUILD_CUDA and plat.startswith("linux_"):
            library = self.get_finalized_command("build_ext").get_ext_fullpath("diffkern._C")
            out = subprocess.run(["readelf", "-V", "-W", library], check=True, stdout=subprocess.PIPE, text=True).stdout
            needed = max([tuple(map(int, v.split(".")))[:2] for v in re.findall(r"Name: GLIBC_([\d.]+)", out)]
                         + [MANYLINUX_FLOOR])
            plat = f"manylinux_{needed[0]}_{needed[1]}_{plat[len('linux_'):]}"
        return impl, abi, plat


def cuda_setup():
    if importlib.util.find_spec("torch") is None:
        sys.exit("error: DIFFKERN_BUILD_CUDA=1 needs torch>=2.10 installed; run pip with --no-build-isolation")
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    spec = importlib.util.spec_from_file_location("_diffkern_build", ROOT / "diffkern" / "_build.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    try:  # cpp_extension leaves CUDA_HOME None on a CPU-only torch, which builds these wheels just as well
        CUDA_HOME = cpp_extension.CUDA_HOME = flags.find_cuda_home()
    except FileNotFoundError as exc:
        sys.exit(f"error: DIFFKERN_BUILD_CUDA=1 but {exc}")
    cuda = flags.cuda_runtime_version(CUDA_HOME)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", flags.default_arch_list(CUDA_HOME))
    in_place = any(a in ("develop", "editable_wheel") or a.startswith("--inplace") for a in sys.argv)
    # A wheel's RUNPATH is relative (torch's and the CUDA runtime wheel's lib dirs); an in-place build's absolute.
    runpath = [] if in_place else flags.wheel_runpath(CUDA_HOME)
    extension = CUDAExtension("diffkern._C", [str(p.relative_to(ROOT)) for p in flags.source_files()],
                              extra_compile_args=flags.compile_args(CUDA_HOME),
                              extra_link_args=flags.link_args(CUDA_HOME, runpath), py_limited_api=True)
    extension.libraries = []  # not CUDAExtension's libtorch/libtorch_cuda/libc10_cuda: link_args has ours

    class Build(BuildExtension):
        """Writes diffkern/_build_info.json next to the library: the loader's CUDA-major check reads it."""

        def build_extension(self, ext):
            super().build_extension(ext)
            major_minor = re.findall(r"(\d+)\.(\d+)(\+PTX)?", archs)
            info = {"cuda_version": "%d.%d" % cuda, "cudart_soname": f"libcudart.so.{cuda[0]}",
                    "archs": [f"sm_{a}{b}" for a, b, _ in major_minor],
                    "ptx": [f"compute_{a}{b}" for a, b, ptx in major_minor if ptx],
                    "torch_target_version": "%d.%d" % flags.TORCH_TARGET}
            target = Path(self.get_ext_fullpath(ext.name)).with_name("_build_info.json")
            for directory in {target.parent, *([ROOT / "diffkern"] if in_place else [])}:
                (directory / target.name).write_text(json.dumps(info, indent=2) + "\n")

    return dict(version=f"{BASE_VERSION}+cu{cuda[0]}{cuda[1]}", ext_modules=[extension],
                cmdclass={"build_ext": Build.with_options(use_ninja=True), "bdist_wheel": BdistWheel},
                # DIFFKERN_BUILD_DIR: the ninja directory, kept between builds (CI's wheel and build test share it).
                options={"bdist_wheel": {"py_limited_api": "cp39"},
                         **({"build_ext": {"build_temp": os.environ["DIFFKERN_BUILD_DIR"]}}
                            if os.environ.get("DIFFKERN_BUILD_DIR") else {})})


setup(**(cuda_setup() if BUILD_CUDA else {"version": BASE_VERSION}))
