#!/usr/bin/env python3
"""Inspect a diffkern wheel that carries the CUDA extension, and fail loudly if anything is off.

Usage:
    python scripts/check_wheel.py dist/diffkern-0.1.0+cu130-cp39-abi3-manylinux_2_36_x86_64.whl
    python scripts/check_wheel.py WHEEL --cuda-major 13 --archs 80,90 --ptx 90

Checks:
- tags: ``cp39-abi3-(manylinux_X_Y|linux)_x86_64`` in the file name and in WHEEL; not purelib;
- version: local label ``+cuXY``, agreeing with ``--cuda-major`` and with ``diffkern/_build_info.json``;
- the library ``diffkern/_C.abi3.so``: NEEDED has ``libcudart.so.<major>`` and torch's CPU libraries, and
  nothing that ties it to one torch build or to Python (``libtorch_cuda``, ``libc10_cuda``,
  ``libtorch_python``, ``libpython``); RUNPATH holds no build-machine path; no Python C API symbol;
  every symbol versioned against libcudart names the same major; the glibc it needs is within the tag;
- device code (``cuobjdump``): the cubins are exactly the expected ``sm_XY`` (``--archs``, else the build
  info), the PTX exactly the expected ``compute_XY``, every cubin was made by a ptxas of the wheel's CUDA
  major, and the PTX ISA version is one that drivers of that major accept (ISA major = CUDA major - 4).

Needs binutils' ``readelf`` and a ``cuobjdump`` (the CUDA toolkit's, or the one in the triton wheel).
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_NEEDED = ("libtorch_cuda", "libc10_cuda", "libtorch_python", "libpython", "libtorch.so")
WHEEL_NAME_RE = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def _extension_tools():
    # The repository's diffkern/_extension.py, for finding cuobjdump and listing device code.
    name = "_diffkern_build_tools"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "diffkern" / "_extension.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Report:
    def __init__(self, quiet: bool):
        self.failures: list[str] = []
        self.quiet = quiet

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        line = f"{'ok  ' if ok else 'FAIL'}  {what}" + (f": {detail}" if detail else "")
        if not ok:
            self.failures.append(line)
        if not ok or not self.quiet:
            print(line)
        return ok

    def info(self, what: str) -> None:
        if not self.quiet:
            print(f"      {what}")


def _readelf(*args: str) -> str:
    tool = shutil.which("readelf")
    if tool is None:
        raise SystemExit("check_wheel.py needs readelf (binutils)")
    return subprocess.run([tool, *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def _version_tuple(text: str) -> tuple:
    return tuple(int(x) for x in text.split("."))


def _arch_key(code: str):
    return int(re.match(r"\d+", code).group(0)), code


def _sorted_archs(codes) -> list[str]:
    return sorted(set(codes), key=_arch_key)


def _parse_arch_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return _sorted_archs(re.sub(r"^(sm_|compute_)", "", t) for t in re.split(r"[;,\s]+", text) if t)


def _defined_symbols(lib: Path) -> set[str]:
    table = _readelf("--dyn-syms", "-W", str(lib))
    return {m.split("@")[0] for m in re.findall(r"\s(?:FUNC|OBJECT)\s+(?:GLOBAL|WEAK)\s+\w+\s+\d+\s+(\S+)", table)}


def check_library(so: Path, report: Report, cuda_major: int, plat: str, min_cudart: list[Path]) -> None:
    dynamic = _readelf("-d", str(so))
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    report.info("NEEDED: " + " ".join(needed))
    cudarts = [n for n in needed if n.startswith("libcudart")]
    report.check(cudarts == [f"libcudart.so.{cuda_major}"], f"links libcudart.so.{cuda_major}",
                 f"NEEDED libcudart entries: {cudarts}")
    for lib in ("libtorch_cpu.so", "libc10.so"):
        report.check(lib in needed, f"links {lib}")
    bad = [n for n in needed if n.startswith(FORBIDDEN_NEEDED)]
    report.check(not bad, "links no CUDA-torch, Python or libtorch.so library", ", ".join(bad))

    runpaths = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", dynamic)
    entries = [e for r in runpaths for e in r.split(":") if e]
    absolute = [e for e in entries if not e.startswith("$ORIGIN")]
    report.check(not absolute, "RUNPATH is relative to the package", ":".join(entries) or "(none)")

    symbols = _readelf("--dyn-syms", "-W", str(so))
    undefined = re.findall(r"\sUND\s+(\S+)", symbols)
    python_api = [s for s in undefined if re.match(r"_?Py[A-Z_]", s)]
    report.check(not python_api, "uses no Python C API symbol", ", ".join(python_api[:5]))
    cudart_versions = sorted({m for s in undefined for m in re.findall(r"@libcudart\.so\.(\d+)", s)})
    report.check(cudart_versions == [str(cuda_major)], "every libcudart symbol is versioned for "
                 f"libcudart.so.{cuda_major}", f"found {cudart_versions}")
    from_cudart = sorted({s.split("@")[0] for s in undefined if "@libcudart.so." in s})
    report.info("from libcudart: " + " ".join(from_cudart))
    for lib in min_cudart:
        missing = sorted(set(from_cudart) - _defined_symbols(lib))
        report.check(not missing, f"every libcudart symbol it uses is exported by {lib}", " ".join(missing))
    exported_init = re.findall(r"\sDEFAULT\s+\d+\s+(PyInit_\S+)", symbols)
    report.check(not exported_init, "exports no PyInit_ (it is not a Python module)", ", ".join(exported_init))

    versions = _readelf("-V", "-W", str(so))
    glibc = sorted({_version_tuple(v) for v in re.findall(r"Name: GLIBC_([\d.]+)", versions)})
    glibcxx = sorted({_version_tuple(v) for v in re.findall(r"Name: GLIBCXX_([\d.]+)", versions)})
    needed_glibc = glibc[-1] if glibc else (2, 0)
    report.info("needs glibc " + ".".join(map(str, needed_glibc))
                + (", libstdc++ GLIBCXX_" + ".".join(map(str, glibcxx[-1])) if glibcxx else ""))
    match = re.match(r"manylinux_(\d+)_(\d+)_", plat)
    if match:
        tag_glibc = (int(match.group(1)), int(match.group(2)))
        report.check(needed_glibc <= tag_glibc, f"glibc {'.'.join(map(str, needed_glibc))} needed is within "
                     f"the {plat} tag")


def check_device_code(so: Path, report: Report, cuda_major: int, archs: list[str], ptx: list[str]) -> None:
    tools = _extension_tools()
    cuobjdump = tools.find_cuobjdump()
    if not report.check(cuobjdump is not None, "cuobjdump found", str(cuobjdump)):
        return
    images = tools.cuda_images(so, cuobjdump)
    report.check(images["elf"] == [f"sm_{a}" for a in _sorted_archs(archs)], f"cubins are exactly {archs}",
                 " ".join(images["elf"]))
    report.check(images["ptx"] == [f"compute_{a}" for a in _sorted_archs(ptx)], f"PTX is exactly {ptx}",
                 " ".join(images["ptx"]))

    elf_dump = subprocess.run([cuobjdump, "-elf", str(so)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True).stdout
    toolkits = set()
    for major, minor in re.findall(r"sm=\w+, toolkit=(\d+)(?:\.(\d+))?", elf_dump):
        toolkits.add((int(major), int(minor)) if minor else (int(major) // 10, int(major) % 10))
    report.check(bool(toolkits) and all(t[0] == cuda_major for t in toolkits),
                 f"every cubin was assembled by a CUDA {cuda_major} ptxas",
                 " ".join(sorted({"%d.%d" % t for t in toolkits})))

    ptx_dump = subprocess.run([cuobjdump, "-ptx", str(so)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True).stdout
    isa = sorted({_version_tuple(v) for v in re.findall(r"^\.version\s+([\d.]+)", ptx_dump, re.MULTILINE)})
    if ptx:
        report.check(bool(isa) and all(v[0] <= cuda_major - 4 for v in isa),
                     f"PTX ISA is one CUDA {cuda_major} drivers accept (<= {cuda_major - 4}.x)",
                     " ".join(".".join(map(str, v)) for v in isa))


def check_wheel(wheel: Path, cuda_major: int | None, archs: list[str] | None, ptx: list[str] | None,
                quiet: bool = False, min_cudart: list[Path] = ()) -> bool:
    report = Report(quiet)
    print(f"checking {wheel.name}")
    match = WHEEL_NAME_RE.match(wheel.name)
    if not report.check(match is not None, "file name is a wheel name"):
        return False
    plat = match.group("plat")
    report.check(match.group("py") == "cp39" and match.group("abi") == "abi3", "tagged cp39-abi3",
                 f"{match.group('py')}-{match.group('abi')}")
    report.check(re.fullmatch(r"(manylinux_\d+_\d+|manylinux\d+|linux)_x86_64", plat) is not None,
                 "platform tag is manylinux/linux x86_64", plat)
    local = re.search(r"\+cu(\d+)$", match.group("version"))
    if not report.check(local is not None, "version has a +cuXY local label", match.group("version")):
        return False
    label = local.group(1)
    # cu130 -> 13, cu129 -> 12, cu126 -> 12: the minor is the last digit.
    label_major = int(label[:-1])
    cuda_major = cuda_major or label_major
    report.check(label_major == cuda_major, f"local label is for CUDA {cuda_major}", f"+cu{label}")

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp)
        root = Path(tmp)
        wheel_meta = next((n for n in names if n.endswith(".dist-info/WHEEL")), None)
        if report.check(wheel_meta is not None, "has a WHEEL file"):
            text = (root / wheel_meta).read_text()
            report.check("Root-Is-Purelib: false" in text, "is not purelib")
            tags = re.findall(r"^Tag: (\S+)$", text, re.MULTILINE)
            report.check(tags == [f"cp39-abi3-{plat}"], "WHEEL tag matches the file name", " ".join(tags))
        libs = [n for n in names if re.fullmatch(r"diffkern/_C[^/]*\.so", n)]
        if not report.check(libs == ["diffkern/_C.abi3.so"], "carries diffkern/_C.abi3.so", " ".join(libs)):
            return False
        so = root / libs[0]
        info_path = root / "diffkern" / "_build_info.json"
        if report.check(info_path.is_file(), "carries diffkern/_build_info.json"):
            info = json.loads(info_path.read_text())
            report.info("build info: " + json.dumps(info))
            report.check(str(info.get("cuda_version", "")).split(".")[0] == str(cuda_major),
                         f"build info says CUDA {cuda_major}.x", str(info.get("cuda_version")))
            report.check(info.get("cuda_version", "").replace(".", "") == label,
                         "build info agrees with the local label", f"{info.get('cuda_version')} vs cu{label}")
            archs = archs or _sorted_archs(a[len("sm_"):] for a in info.get("archs", []))
            ptx = ptx if ptx is not None else _sorted_archs(a[len("compute_"):] for a in info.get("ptx", []))
        if archs is None:
            report.check(False, "expected archs known (give --archs or ship _build_info.json)")
            return False
        check_library(so, report, cuda_major, plat, list(min_cudart))
        check_device_code(so, report, cuda_major, archs, ptx or [])
    if report.failures:
        print(f"{len(report.failures)} check(s) failed for {wheel.name}")
        return False
    print(f"all checks passed for {wheel.name}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+", type=Path)
    parser.add_argument("--cuda-major", type=int, help="expected CUDA major (default: from the +cuXY label)")
    parser.add_argument("--archs", help="expected cubin archs, e.g. '80,90' (default: from the build info)")
    parser.add_argument("--ptx", help="expected PTX archs, e.g. '90' (default: from the build info); '' for none")
    parser.add_argument("--min-cudart", type=Path, action="append", default=[], metavar="LIBCUDART",
                        help="a libcudart.so.N (e.g. of the oldest CUDA minor to support) that must export every "
                             "runtime symbol the library uses; repeatable")
    parser.add_argument("--quiet", action="store_true", help="print failures only")
    args = parser.parse_args(argv)
    ok = True
    for wheel in args.wheels:
        ok &= check_wheel(wheel, args.cuda_major, _parse_arch_list(args.archs), _parse_arch_list(args.ptx),
                          args.quiet, args.min_cudart)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
