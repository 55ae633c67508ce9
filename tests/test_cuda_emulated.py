"""The CUDA kernels' logic, tested without a GPU: csrc/ compiled for the host CUDA emulation
(tests/cuda_emulation: every CUDA thread a CPU thread, see host_cuda.h for what is and is not emulated) and run
through the cuda backend's wrappers on CPU tensors against the reference backend, with the tolerance table of
``diffkern.testing``.

The build goes to a temporary directory (or ``$DIFFKERN_TEST_EMU_BUILD_DIR``, reused: only what changed is
recompiled); the op tests run in a pytest of their own, because the emulated library defines the diffkern ops that
the real extension defines too. What runs is every op test file's ``cuda`` cases: each op's case matrix in every
dtype and layout, GroupNorm in each of its CUDA regimes (the raw ops' ``split``) on emulated devices of several
sizes, calls from several host threads. Skipped only when there is no C++ compiler or no CUDA runtime headers.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _helpers import load_module
from conftest import BASE_SEED

EMULATION_DIR = Path(__file__).resolve().parent / "cuda_emulation"


def _load_builder():
    return load_module(EMULATION_DIR / "build.py", "diffkern_cuda_emulation_build")


@pytest.fixture(scope="module")
def emulated_library(tmp_path_factory):
    builder = _load_builder()
    try:
        builder.find_cxx()
        builder.find_cuda_include()
    except builder.EmulationUnavailable as exc:
        pytest.skip(f"the CUDA host emulation cannot be built here: {exc}")
    build_dir = os.environ.get("DIFFKERN_TEST_EMU_BUILD_DIR") or tmp_path_factory.mktemp("diffkern_cuda_emulation")
    start = time.perf_counter()
    library = builder.build(build_dir)
    print(f"\nbuilt the host-emulated CUDA extension in {time.perf_counter() - start:.1f} s: {library}")
    return library


def test_op_tests_pass_on_the_emulated_cuda_backend(emulated_library):
    """The op test files' cuda-backend cases (``fast_backend``/``any_backend`` = cuda), run in a pytest of their
    own (a process holds one library defining the diffkern kernels) with the emulated library as the cuda
    backend; ``conftest`` selects exactly those cases. Select further with ``-k`` in that run, e.g.
    ``DIFFKERN_TEST_EMULATED_CUDA=<library> pytest tests/ -k ddim``."""
    env = dict(os.environ, DIFFKERN_TEST_SEED=str(BASE_SEED), DIFFKERN_TEST_EMULATED_CUDA=str(emulated_library))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).parent), "-q", "-p", "no:cacheprovider",
                           "--ignore", __file__], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, timeout=900, cwd=Path(__file__).parent.parent)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"\nran the op tests on the emulated cuda backend in {time.perf_counter() - start:.1f} s: {last}")
    assert proc.returncode == 0, proc.stdout[-30000:]   # pytest exits 5 when it selected nothing
    passed = re.search(r"(\d+) passed", last)
    assert passed and int(passed.group(1)) > 0, last
