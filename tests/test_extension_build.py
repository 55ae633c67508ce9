"""The CUDA extension builds from csrc/ (setup.py: ``CUDAExtension`` + ``BuildExtension``), loads into this torch
and registers every op; no GPU needed.

Builds once per session (module-scoped fixture) exactly as the wheel does, for sm_80 and sm_90 (+PTX of sm_90),
with ``setup.py build_ext`` into a temporary directory, or into ``$DIFFKERN_TEST_BUILD_DIR`` (CI points it at the
build directory of scripts/ci_wheel_check.sh, whose objects are then up to date: only the link runs again). Then
loads the library with ``torch.ops.load_library`` in a subprocess (a library that fails inside torch's
registration would take the test process with it) and checks the kernels, the cubins and what it links. Skipped
only without an nvcc (the cubin listing also without a cuobjdump, the link check without readelf).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _helpers import load_module
from diffkern import _build, _extension

REPO = Path(__file__).resolve().parent.parent
CI_ARCHS = "8.0;9.0+PTX"  # sm_80 and sm_90 cubins, PTX of sm_90
EXPECTED_ELF = ["sm_80", "sm_90"]
EXPECTED_PTX = ["compute_90"]


def _check_wheel():
    return load_module(REPO / "scripts" / "check_wheel.py", "_diffkern_check_wheel")


def _build_ext(build_temp, build_lib, cuda_home) -> float:
    env = dict(os.environ, DIFFKERN_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=CI_ARCHS, CUDA_HOME=cuda_home)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(build_temp),
                           "--build-lib", str(build_lib)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-20000:]
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    try:
        cuda_home = _build.find_cuda_home()
    except FileNotFoundError as exc:
        pytest.skip(f"the CUDA extension cannot be compiled here: {exc}")
    build_temp = os.environ.get("DIFFKERN_TEST_BUILD_DIR") or tmp_path_factory.mktemp("diffkern_cuda_build")
    build_lib = tmp_path_factory.mktemp("diffkern_cuda_lib")
    seconds = _build_ext(build_temp, build_lib, cuda_home)
    print(f"\nbuilt the CUDA extension for {CI_ARCHS} in {seconds:.1f} s (a relink when {build_temp} was up to date)")
    library = build_lib / "diffkern" / "_C.abi3.so"
    return library, cuda_home, Path(build_temp)


@pytest.fixture(scope="module")
def probe(built):
    library, _, _ = built
    code = textwrap.dedent(f"""
        import json, torch
        from diffkern.ops import _declaration
        _declaration.define_cuda_ops()
        torch.ops.load_library({str(library)!r})
        print("PROBE " + json.dumps({{op.name: [str(getattr(torch.ops.diffkern, op.name).default._schema),
            torch._C._dispatch_has_kernel_for_dispatch_key(f"diffkern::{{op.name}}", "CUDA")]
            for op in _declaration.cuda_ops()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-5000:]
    return json.loads(lines[0][len("PROBE "):])


@pytest.mark.parametrize("op", _extension.CUDA_OPS)
def test_op_is_registered_with_a_cuda_kernel(probe, op):
    schema, has_kernel = probe[op]
    assert schema.startswith(f"diffkern::{op}("), schema
    assert has_kernel, f"diffkern::{op} has no kernel for the CUDA dispatch key"


def test_build_info(built):
    library, cuda_home, _ = built
    info = json.loads((library.parent / "_build_info.json").read_text())
    assert info["archs"] == EXPECTED_ELF and info["ptx"] == EXPECTED_PTX
    assert info["cuda_version"] == "%d.%d" % _build.cuda_runtime_version(cuda_home)


def test_cubins_for_requested_archs(built):
    library, _, _ = built
    cw = _check_wheel()
    cuobjdump = cw.find_cuobjdump()
    if cuobjdump is None:
        # The test extra installs triton, whose Linux wheel carries a cuobjdump; .ci/run checks that one is found.
        pytest.skip("no cuobjdump to list the cubins with (CUDA toolkit, PATH, or the triton wheel)")
    assert cw.cuda_images(library, cuobjdump) == {"elf": EXPECTED_ELF, "ptx": EXPECTED_PTX}


def test_links_cudart_and_torch_cpu_only(built):
    library, cuda_home, _ = built
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run(["readelf", "-d", str(library)], stdout=subprocess.PIPE, text=True, check=True).stdout
    needed = set(__import__("re").findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    assert {f"libcudart.so.{_build.cuda_runtime_version(cuda_home)[0]}", "libtorch_cpu.so", "libc10.so"} <= needed
    assert not [n for n in needed if n.startswith(("libtorch_cuda", "libc10_cuda", "libtorch_python", "libpython",
                                                   "libtorch.so"))]


def test_build_is_incremental(built, tmp_path):
    library, cuda_home, build_temp = built
    objects = sorted(build_temp.rglob("*.o"))
    assert objects
    before = {p: p.stat().st_mtime_ns for p in objects}
    _build_ext(build_temp, tmp_path, cuda_home)
    rebuilt = [p.name for p in objects if p.stat().st_mtime_ns != before[p]]
    assert not rebuilt, f"an up-to-date build recompiled {rebuilt}"


# ------------------------------------------------------------------------------------------------
# Pure-Python behaviour of the loader (fast; nothing is compiled or loaded)
# ------------------------------------------------------------------------------------------------


def test_import_loads_nothing():
    code = textwrap.dedent("""
        import diffkern, diffkern._extension as ext, torch
        from diffkern.ops import _declaration
        assert not _declaration._defined, "CUDA op schemas defined at import"
        st = ext.status()
        assert st["loaded"] is False and st["source"] is None, st
        assert not ext._kernels_registered(torch), "CUDA kernels registered at import"
        maps = open("/proc/self/maps").read()
        assert "_C.abi3.so" not in maps and "diffkern_C" not in maps, "extension mapped at import"
        print("clean")
    """)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout


def test_torch_target_is_2_10():
    assert _build.torch_target_version_macro() == "0x020a000000000000"


def test_default_arch_list():
    try:
        cuda_home = _build.find_cuda_home()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    archs = _build.default_arch_list(cuda_home).split(";")
    assert archs[:4] == ["8.0", "8.6", "8.9", "9.0"] and archs[-1].endswith("+PTX"), archs


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
    with pytest.raises(_extension.ExtensionUnavailable):  # remembered
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
