"""The CUDA extension builds from csrc/, loads into this torch and registers every op; no GPU needed.

Compiles every ``csrc/*.cu`` and ``csrc/*.cpp`` once per session (module-scoped fixture) with the same
pipeline as the JIT path and setup.py, for sm_80 and sm_90 (+PTX of sm_90) into a temporary directory
(or ``$DIFFKERN_TEST_BUILD_DIR``),
then loads the library in a subprocess (a library that fails inside torch's registration would take the
test process with it) and checks the schemas, the embedded cubins and what the library links. Skipped
only when there is no nvcc at all (the cubin listing also without a cuobjdump, the link check without
readelf); on a CPU-only torch the ops register although no kernel can run.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diffkern import _extension

CI_ARCHS = "80;90"  # sm_80 and sm_90 cubins, PTX of sm_90
EXPECTED_ELF = ["sm_80", "sm_90"]
EXPECTED_PTX = ["compute_90"]


def _nvcc_present() -> bool:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and Path(h, "bin", "nvcc").is_file() for h in homes)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not _nvcc_present():
        pytest.skip("no nvcc: the CUDA extension cannot be compiled here (set CUDA_HOME to a CUDA toolkit)")
    toolkit = _extension.find_toolkit()  # nvcc exists: a broken toolkit is a failure, not a skip
    # DIFFKERN_TEST_BUILD_DIR may name a build directory to reuse (CI points it at the one the wheel check
    # compiled the same sources in, so this only relinks); ninja rebuilds whatever is out of date.
    build_dir = os.environ.get("DIFFKERN_TEST_BUILD_DIR") or tmp_path_factory.mktemp("diffkern_cuda_build")
    start = time.perf_counter()
    result = _extension.build(build_dir=build_dir, archs=CI_ARCHS, toolkit=toolkit)
    print(f"\nbuilt the CUDA extension ({', '.join(result.info['sources'])}) for {CI_ARCHS} with nvcc "
          f"{toolkit.nvcc_version[0]}.{toolkit.nvcc_version[1]} in {time.perf_counter() - start:.1f} s "
          f"(ninja: {result.seconds:.1f} s; near 0 when {build_dir} was up to date)")
    return result, toolkit


@pytest.fixture(scope="module")
def probe(built):
    result, _ = built
    return _extension.probe_in_subprocess(result.library)


def test_library_loads_into_this_torch(probe):
    assert probe["ok"], probe.get("error")


@pytest.mark.parametrize("op", _extension.CUDA_OPS)
def test_op_is_registered_with_a_cuda_kernel(probe, op):
    assert op in probe["schemas"], f"torch.ops.diffkern.{op} is not registered; registered: {sorted(probe['schemas'])}"
    assert probe["schemas"][op].startswith(f"diffkern::{op}("), probe["schemas"][op]
    assert probe["cuda_kernel"][op], f"diffkern::{op} has no kernel for the CUDA dispatch key"


def test_cubins_for_requested_archs(built):
    result, _ = built
    cuobjdump = _extension.find_cuobjdump()
    if cuobjdump is None:
        # The test extra installs triton, whose Linux wheel carries a cuobjdump; a CUDA toolkit may not (the
        # nvcc-only toolkits of CI images, for one). .ci/run checks that one is found, so CI cannot skip this.
        pytest.skip("no cuobjdump to list the cubins with: none in $CUDA_HOME/bin, on PATH, in /usr/local/cuda/bin "
                    "or in the triton wheel (pip install triton, or a full CUDA toolkit)")
    images = _extension.cuda_images(result.library, cuobjdump)
    assert images == {"elf": EXPECTED_ELF, "ptx": EXPECTED_PTX}
    assert result.info["archs"] == EXPECTED_ELF and result.info["ptx"] == EXPECTED_PTX


def test_links_cudart_and_torch_cpu_only(built):
    result, toolkit = built
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run(["readelf", "-d", str(result.library)], stdout=subprocess.PIPE, text=True,
                             check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert f"libcudart.so.{toolkit.cuda_major}" in needed
    assert {"libtorch_cpu.so", "libc10.so"} <= set(needed)
    assert not [n for n in needed if n.startswith(("libtorch_cuda", "libc10_cuda", "libtorch_python", "libpython"))]


def test_build_is_incremental(built):
    result, toolkit = built
    outputs = sorted(result.library.parent.glob("obj/*.o")) + [result.library]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    again = _extension.build(build_dir=result.library.parent, archs=CI_ARCHS, toolkit=toolkit)
    assert again.library == result.library
    rebuilt = [p.name for p in outputs if p.stat().st_mtime_ns != before[p]]
    assert not rebuilt, f"an up-to-date build redid {rebuilt}"


# ------------------------------------------------------------------------------------------------
# Pure-Python behaviour of the loader (fast; nothing is compiled or loaded)
# ------------------------------------------------------------------------------------------------


def test_import_loads_nothing():
    code = textwrap.dedent("""
        import diffkern, diffkern._extension as ext, torch
        from diffkern.ops import _declaration
        assert not _declaration._defined, "CUDA op schemas defined at import"
        assert not ext._kernels_registered(torch), "CUDA kernels registered at import"
        st = ext.status()
        assert st["loaded"] is False and st["source"] is None, st
        maps = open("/proc/self/maps").read()
        assert "_C.abi3.so" not in maps and "diffkern_C.so" not in maps, "extension mapped at import"
        print("clean")
    """)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=Path(_extension.__file__).parent.parent)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout


@pytest.mark.parametrize("spec, expected", [
    ("80;90", ["sm_80", "sm_90+PTX"]),
    ("8.0 9.0", ["sm_80", "sm_90+PTX"]),
    ("sm_80,sm_120", ["sm_80", "sm_120+PTX"]),
    ("80;86+PTX;90", ["sm_80", "sm_86+PTX", "sm_90"]),
    ("120;80;90a", ["sm_80", "sm_90a", "sm_120+PTX"]),
])
def test_parse_archs(spec, expected):
    assert [str(a) for a in _extension.parse_archs(spec)] == expected


@pytest.mark.parametrize("spec", ["", "8", "sm80x", "ampere"])
def test_parse_archs_rejects(spec):
    with pytest.raises(ValueError):
        _extension.parse_archs(spec)


def test_torch_target_is_2_10():
    assert _extension.torch_target_version_macro() == "0x020a000000000000"


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader with no prebuilt library, no sources and a clean state (restored afterwards)."""
    monkeypatch.setattr(_extension, "_state", _extension._State())
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", tmp_path / "pkg")
    monkeypatch.setattr(_extension, "_SOURCE_DIR", tmp_path / "csrc")
    (tmp_path / "pkg").mkdir()
    return tmp_path / "pkg"


def test_unavailable_without_library_or_sources(fresh_loader, monkeypatch):
    monkeypatch.delenv("DIFFKERN_NO_JIT", raising=False)
    with pytest.raises(_extension.ExtensionUnavailable, match="no prebuilt library.*no CUDA sources"):
        _extension.load()
    # The failure is remembered, and reported by status().
    with pytest.raises(_extension.ExtensionUnavailable):
        _extension.load()
    st = _extension.status()
    assert st["loaded"] is False and st["source"] is None and "no prebuilt library" in st["reason"]


def test_no_jit_env(fresh_loader, monkeypatch):
    monkeypatch.setenv("DIFFKERN_NO_JIT", "1")
    with pytest.raises(_extension.ExtensionUnavailable, match="DIFFKERN_NO_JIT=1"):
        _extension.load()


def test_prebuilt_for_another_cuda_major_is_refused(fresh_loader, monkeypatch):
    import torch

    (fresh_loader / "_C.abi3.so").write_bytes(b"not really a library")
    (fresh_loader / "_build_info.json").write_text('{"cuda_version": "12.6", "cudart_soname": "libcudart.so.12"}')
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("DIFFKERN_NO_JIT", "1")
    with pytest.warns(RuntimeWarning, match=r"built for CUDA 12\.6 but torch .* uses CUDA 13\.0"):
        with pytest.raises(_extension.ExtensionUnavailable, match="built for CUDA 12.6"):
            _extension.load()
    assert "CUDA 13" in _extension.status()["reason"]
