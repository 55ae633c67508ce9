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
  every symbol versioned against libcudart names the same major;
- symbol versions, of every ``.so`` in the wheel: the newest ``GLIBC_``, ``GLIBCXX_``, ``CXXABI_`` and ``GCC_``
  version any of them needs is within what the wheel's manylinux tag allows (MANYLINUX_POLICIES: auditwheel's
  policy; manylinux_2_28 = glibc 2.28, GLIBCXX_3.4.24, CXXABI_1.3.11, GCC_7.0.0), naming the symbols that are
  too new; and, if ``--expect-plat`` is given, the tag is exactly that one;
- ``auditwheel show`` (when installed, or always with ``--auditwheel require``): the tag its symbol-version
  analysis allows (``sym_tag``) is at least as old as the wheel's, and the only libraries it finds outside the
  policy are torch's and the CUDA runtime, which torch provides (they are why its overall verdict is
  ``linux_x86_64``; a wheel must not vendor them, so ``auditwheel repair`` is never run);
- device code (``cuobjdump``): the cubins are exactly the expected ``sm_XY`` (``--archs``, else the build
  info), the PTX exactly the expected ``compute_XY``, every cubin was made by a ptxas of the wheel's CUDA
  major, and the PTX ISA version is one that drivers of that major accept (ISA major = CUDA major - 4).

Needs binutils' ``readelf`` and a ``cuobjdump`` (the CUDA toolkit's, or the one in the triton wheel).
Exit status 0 when every check passes. ``--symbols-only LIB...`` runs only the symbol-version check on shared
libraries (``--plat`` gives the tag to hold them to), for debugging and for tests/test_wheel_symbols.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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


#: What each manylinux tag allows of the versions a library may need from the system's libc (GLIBC_),
#: libstdc++ (GLIBCXX_, CXXABI_) and libgcc_s (GCC_) on x86_64: the newest numbered version of each family,
#: plus the few non-numbered versions allowed. From auditwheel 6.8.2's manylinux-policy.json (the policies
#: PEP 600 refers to). Note manylinux_2_28 allows GLIBCXX_3.4.24, not the 3.4.25 of GCC 8's libstdc++.
MANYLINUX_POLICIES = {
    (2, 5): ({"GLIBC": (2, 5), "GLIBCXX": (3, 4, 8), "CXXABI": (1, 3, 1), "GCC": (4, 2, 0)}, ()),
    (2, 12): ({"GLIBC": (2, 12), "GLIBCXX": (3, 4, 13), "CXXABI": (1, 3, 3), "GCC": (4, 3, 0)}, ()),
    (2, 17): ({"GLIBC": (2, 17), "GLIBCXX": (3, 4, 19), "CXXABI": (1, 3, 7), "GCC": (4, 8, 0)}, ("CXXABI_TM_1",)),
    (2, 24): ({"GLIBC": (2, 24), "GLIBCXX": (3, 4, 22), "CXXABI": (1, 3, 10), "GCC": (4, 8, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128")),
    (2, 26): ({"GLIBC": (2, 26), "GLIBCXX": (3, 4, 22), "CXXABI": (1, 3, 10), "GCC": (4, 8, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128")),
    (2, 27): ({"GLIBC": (2, 27), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128")),
    (2, 28): ({"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128")),
    (2, 31): ({"GLIBC": (2, 31), "GLIBCXX": (3, 4, 28), "CXXABI": (1, 3, 12), "GCC": (7, 0, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128")),
    (2, 34): ({"GLIBC": (2, 34), "GLIBCXX": (3, 4, 29), "CXXABI": (1, 3, 13), "GCC": (7, 0, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128")),
    (2, 35): ({"GLIBC": (2, 35), "GLIBCXX": (3, 4, 30), "CXXABI": (1, 3, 13), "GCC": (12, 0, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128")),
    (2, 36): ({"GLIBC": (2, 36), "GLIBCXX": (3, 4, 30), "CXXABI": (1, 3, 13), "GCC": (12, 0, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128", "GLIBC_ABI_DT_RELR")),
    (2, 39): ({"GLIBC": (2, 39), "GLIBCXX": (3, 4, 33), "CXXABI": (1, 3, 15), "GCC": (14, 0, 0)},
              ("CXXABI_TM_1", "CXXABI_FLOAT128", "GLIBC_ABI_DT_RELR")),
}
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
VERSION_FAMILIES = ("GLIBC", "GLIBCXX", "CXXABI", "GCC")
#: Libraries the wheel needs but must not ship: torch provides them. auditwheel counts them against the
#: policy (its overall verdict is linux_x86_64 because of them); that is expected and asserted.
PROVIDED_BY_TORCH = ("libtorch_cpu.so", "libc10.so", "libcudart.so.")


def find_cuobjdump() -> str | None:
    """A ``cuobjdump``: the toolkit's, one on PATH, or the one bundled with the triton wheel."""
    candidates = [Path(os.environ[v]) / "bin" / "cuobjdump" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [Path(p) for p in [shutil.which("cuobjdump")] if p] + [Path("/usr/local/cuda/bin/cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def cuda_images(library: Path, cuobjdump: str) -> dict:
    """The device code embedded in ``library``: ``{"elf": ["sm_80", ...], "ptx": ["compute_90", ...]}``."""
    out = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(library)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True).stdout
    elf = re.findall(r"^ELF file\s+\d+:.*\.(sm_\w+)\.cubin\s*$", out, re.MULTILINE)
    ptx = ["compute_" + m for m in re.findall(r"^PTX file\s+\d+:.*\.sm_(\w+)\.ptx\s*$", out, re.MULTILINE)]
    return {"elf": sorted(set(elf), key=lambda n: _arch_key(n[3:])),
            "ptx": sorted(set(ptx), key=lambda n: _arch_key(n[8:]))}


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


def tag_glibc(plat: str) -> tuple[int, int] | None:
    """The glibc a platform tag promises: ``manylinux_2_28_x86_64`` -> (2, 28); None for ``linux_*``."""
    match = re.match(r"manylinux_(\d+)_(\d+)_", plat)
    if match:
        return int(match.group(1)), int(match.group(2))
    legacy = re.match(r"(manylinux\d+)_", plat)
    return LEGACY_MANYLINUX.get(legacy.group(1)) if legacy else None


def policy_limits(glibc: tuple[int, int]) -> tuple[dict, frozenset, str]:
    """(newest version allowed per family, non-numbered versions allowed, policy used) for a tag's glibc.

    A glibc without a policy of its own (e.g. 2.30) takes the libstdc++/libgcc limits of the newest policy
    below it, and its own glibc as the GLIBC_ limit.
    """
    known = [g for g in MANYLINUX_POLICIES if g <= glibc]
    if not known:
        raise ValueError(f"no manylinux policy for glibc {glibc[0]}.{glibc[1]}")
    base = max(known)
    limits, extra = MANYLINUX_POLICIES[base]
    limits = dict(limits, GLIBC=max(limits["GLIBC"], glibc))
    return limits, frozenset(extra), f"manylinux_{base[0]}_{base[1]}"


def split_version(name: str) -> tuple[str, tuple[int, ...] | None] | None:
    """``GLIBC_2.34`` -> ("GLIBC", (2, 34)); ``CXXABI_TM_1`` -> ("CXXABI", None); other names -> None."""
    match = re.fullmatch(r"(GLIBCXX|GLIBC|CXXABI|GCC)_(.+)", name)
    if not match:
        return None
    number = match.group(2)
    return match.group(1), (_version_tuple(number) if re.fullmatch(r"\d+(\.\d+)*", number) else None)


def needed_versions(lib: Path) -> dict[str, set[str]]:
    """Every version ``lib`` needs from another library (``.gnu.version_r``), with the undefined symbols
    bound to each: ``{"GLIBC_2.34": {"dlopen", ...}, "GLIBCXX_3.4.21": {...}, ...}``. A version with no symbol
    listed still counts: the dynamic linker refuses the library if any needed version is missing."""
    needed: dict[str, set[str]] = {}
    text = _readelf("-V", "-W", str(lib))
    section = re.search(r"Version needs section.*?(?=\n\S|\Z)", text, re.DOTALL)
    for name in re.findall(r"Name: (\S+)\s+Flags", section.group(0) if section else ""):
        needed.setdefault(name, set())
    for name, version in re.findall(r"\sUND\s+([^@\s]+)@(\S+)", _readelf("--dyn-syms", "-W", str(lib))):
        needed.setdefault(version, set()).add(name)
    return needed


def highest_versions(needed) -> dict[str, str]:
    """The newest numbered version needed per family, e.g. ``{"GLIBC": "GLIBC_2.28", "GLIBCXX": ...}``."""
    best: dict[str, tuple] = {}
    for name in needed:
        parsed = split_version(name)
        if parsed and parsed[1] is not None and parsed[1] > best.get(parsed[0], (name, ()))[1]:
            best[parsed[0]] = (name, parsed[1])
    return {family: best[family][0] for family in VERSION_FAMILIES if family in best}


def symbol_version_violations(needed, plat: str) -> list[str]:
    """Why a library that needs ``needed`` (version -> symbols, as from needed_versions) does not fit the
    platform tag ``plat``; empty when it fits. A ``linux_*`` tag promises nothing, so nothing violates it."""
    glibc = tag_glibc(plat)
    if glibc is None:
        return []
    limits, extra, policy = policy_limits(glibc)
    problems = []
    # Names of no family (e.g. libcudart.so.13: not a system library's version) are not the policy's business.
    versions = sorted((split_version(name)[0], split_version(name)[1] or (), name) for name in needed
                      if split_version(name) is not None)
    for family, _, name in versions:
        number = split_version(name)[1]
        if (number is None and name not in extra) or (number is not None and number > limits[family]):
            symbols = sorted(needed[name])
            shown = ", ".join(symbols[:6]) + (f" and {len(symbols) - 6} more" if len(symbols) > 6 else "")
            allowed = f"{family}_{'.'.join(map(str, limits[family]))}"
            problems.append(f"{name} ({shown or 'version needed'}) is newer than the {allowed} that {plat} "
                            f"allows ({policy} policy)")
    return problems


def check_symbol_versions(libs, report: Report, plat: str, root: Path | None = None) -> None:
    """The symbol-version check, for every shared library in ``libs``."""
    for lib in libs:
        label = str(lib.relative_to(root)) if root else str(lib)
        needed = needed_versions(lib)
        top = highest_versions(needed)
        report.info(f"{label} needs " + (", ".join(top[f] for f in VERSION_FAMILIES if f in top) or "no "
                                         "versioned system symbol"))
        problems = symbol_version_violations(needed, plat)
        report.check(not problems, f"{label}: every GLIBC_/GLIBCXX_/CXXABI_/GCC_ version it needs is within "
                     f"{plat}", "; ".join(problems))


def check_auditwheel(wheel: Path, plat: str, report: Report, mode: str) -> None:
    """``auditwheel show`` agrees: its symbol-version verdict allows the wheel's tag, and every library it
    finds outside the policy is one torch provides."""
    if mode == "skip":
        return
    if importlib.util.find_spec("auditwheel") is None:
        if mode == "require":
            report.check(False, "auditwheel installed (pip install auditwheel)", f"not importable by {sys.executable}")
        else:
            report.info(f"auditwheel is not importable by {sys.executable}: `auditwheel show` cross-check skipped")
        return
    cmd = [sys.executable, "-m", "auditwheel", "show", "--json", str(wheel)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        report.check(False, "auditwheel show --json ran", proc.stdout.strip()[-500:])
        return
    sym_tag = result.get("sym_tag", "")
    external = sorted(result.get("external_libs") or {})
    report.info(f"auditwheel: symbol versions allow {sym_tag}; overall {result.get('overall_tag')} "
                f"(libraries outside the policy: {' '.join(external) or 'none'})")
    sym_glibc, want = tag_glibc(sym_tag), tag_glibc(plat)
    report.check(sym_glibc is not None and want is not None and sym_glibc <= want,
                 f"auditwheel's symbol-version verdict allows {plat}", f"sym_tag {sym_tag}")
    foreign = [lib for lib in external if not lib.startswith(PROVIDED_BY_TORCH)]
    report.check(not foreign, "auditwheel finds no outside library but torch's and the CUDA runtime",
                 " ".join(foreign))


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
    # libstdc++ versions all its symbols, so an unversioned C++ std reference was bound to a copy that torch's
    # libc10.so exports (from its toolchain's libstdc++_nonshared.a; torch's libraries rely on it the same way).
    unversioned_std = sorted(s for s in undefined if "@" not in s and re.match(r"_ZN?K?S[tiaobd]|_ZT[IVS]S", s))
    if unversioned_std:
        report.info("unversioned libstdc++ symbols (torch's libraries provide them): " + " ".join(unversioned_std))
    exported_init = re.findall(r"\sDEFAULT\s+\d+\s+(PyInit_\S+)", symbols)
    report.check(not exported_init, "exports no PyInit_ (it is not a Python module)", ", ".join(exported_init))


def check_device_code(so: Path, report: Report, cuda_major: int, archs: list[str], ptx: list[str]) -> None:
    cuobjdump = find_cuobjdump()
    if not report.check(cuobjdump is not None, "cuobjdump found", str(cuobjdump)):
        return
    images = cuda_images(so, cuobjdump)
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
                quiet: bool = False, min_cudart: list[Path] = (), expect_plat: str | None = None,
                auditwheel: str = "auto") -> bool:
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
    if expect_plat:
        report.check(plat == expect_plat, f"platform tag is {expect_plat}", plat)
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
        shipped = sorted(root / n for n in names if re.search(r"\.so(\.\d+)*$", n))
        check_symbol_versions(shipped, report, plat, root)
        check_device_code(so, report, cuda_major, archs, ptx or [])
    check_auditwheel(wheel, plat, report, auditwheel)
    if report.failures:
        print(f"{len(report.failures)} check(s) failed for {wheel.name}")
        return False
    print(f"all checks passed for {wheel.name}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+", type=Path, help="wheels (or, with --symbols-only, libraries)")
    parser.add_argument("--cuda-major", type=int, help="expected CUDA major (default: from the +cuXY label)")
    parser.add_argument("--archs", help="expected cubin archs, e.g. '80,90' (default: from the build info)")
    parser.add_argument("--ptx", help="expected PTX archs, e.g. '90' (default: from the build info); '' for none")
    parser.add_argument("--min-cudart", type=Path, action="append", default=[], metavar="LIBCUDART",
                        help="a libcudart.so.N (e.g. of the oldest CUDA minor to support) that must export every "
                             "runtime symbol the library uses; repeatable")
    parser.add_argument("--expect-plat", metavar="TAG",
                        help="the platform tag the wheel must carry, e.g. manylinux_2_28_x86_64")
    parser.add_argument("--auditwheel", choices=("auto", "require", "skip"),
                        default=os.environ.get("DIFFKERN_CHECK_AUDITWHEEL", "auto"),
                        help="cross-check with `auditwheel show`: when installed (auto, the default), always "
                             "(require) or never (skip); default from $DIFFKERN_CHECK_AUDITWHEEL")
    parser.add_argument("--symbols-only", action="store_true",
                        help="only check the symbol versions of the given shared libraries against --plat")
    parser.add_argument("--plat", default="manylinux_2_28_x86_64",
                        help="the tag --symbols-only holds the libraries to (default manylinux_2_28_x86_64)")
    parser.add_argument("--quiet", action="store_true", help="print failures only")
    args = parser.parse_args(argv)
    if args.symbols_only:
        report = Report(args.quiet)
        check_symbol_versions(args.wheels, report, args.plat)
        return 1 if report.failures else 0
    ok = True
    for wheel in args.wheels:
        ok &= check_wheel(wheel, args.cuda_major, _parse_arch_list(args.archs), _parse_arch_list(args.ptx),
                          args.quiet, args.min_cudart, args.expect_plat, args.auditwheel)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
