"""The wheel's symbol-version check (scripts/check_wheel.py) and the glibc shim (csrc/glibc_compat.h).

A wheel tagged ``manylinux_2_28`` must not need any ``GLIBC_``/``GLIBCXX_``/``CXXABI_``/``GCC_`` version newer
than that policy allows. These tests show the check failing on libraries that do (fake version lists, and a
tiny library compiled here that calls ``dlopen`` and copies a ``shared_ptr``: glibc >= 2.34 binds
``dlopen@GLIBC_2.34`` and GCC 12's libstdc++ reads ``__libc_single_threaded@GLIBC_2.32``), and passing once
the same source is compiled with ``-include csrc/glibc_compat.h``, as the wheel build does. No GPU, no nvcc.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import load_module

REPO = Path(__file__).resolve().parent.parent
HEADER = REPO / "csrc" / "glibc_compat.h"
TAG = "manylinux_2_28_x86_64"


cw = load_module(REPO / "scripts" / "check_wheel.py", "_diffkern_check_wheel")


# --- the policy logic, on made-up version lists ------------------------------------------------------------


def test_a_library_within_2_28_passes():
    needed = {"GLIBC_2.2.5": {"memcpy"}, "GLIBC_2.28": {"fcntl64"}, "GLIBCXX_3.4.21": {"_ZdlPvm"},
              "GLIBCXX_3.4.24": set(), "CXXABI_1.3.11": set(), "CXXABI_TM_1": set(), "GCC_7.0.0": set(),
              "libcudart.so.13": {"cudaLaunchKernel"}}
    assert cw.symbol_version_violations(needed, TAG) == []
    assert cw.highest_versions(needed) == {"GLIBC": "GLIBC_2.28", "GLIBCXX": "GLIBCXX_3.4.24",
                                           "CXXABI": "CXXABI_1.3.11", "GCC": "GCC_7.0.0"}


@pytest.mark.parametrize("version, symbol", [
    ("GLIBC_2.34", "dlopen"),
    ("GLIBC_2.32", "__libc_single_threaded"),
    ("GLIBC_2.29", "exp"),
    ("GLIBCXX_3.4.25", "_ZSt28__throw_bad_array_new_lengthv"),  # the policy stops at 3.4.24
    ("GLIBCXX_3.4.30", "_ZSt21__glibcxx_assert_failPKciS0_S0_"),
    ("CXXABI_1.3.12", "__cxa_init_primary_exception"),
    ("GCC_12.0.0", "__udivti3"),
    ("GLIBC_ABI_DT_RELR", ""),  # a non-numbered version newer policies allow, 2_28 does not
])
def test_one_version_too_new_fails_and_is_named(version, symbol):
    needed = {"GLIBC_2.14": {"memcpy"}, version: {symbol} if symbol else set()}
    problems = cw.symbol_version_violations(needed, TAG)
    assert len(problems) == 1, problems
    assert version in problems[0] and symbol in problems[0] and TAG in problems[0]


def test_the_limit_follows_the_tag():
    needed = {"GLIBC_2.34": {"dlopen"}, "GLIBC_2.32": {"__libc_single_threaded"}, "GLIBCXX_3.4.29": set()}
    assert len(cw.symbol_version_violations(needed, TAG)) == 3
    assert cw.symbol_version_violations(needed, "manylinux_2_34_x86_64") == []
    assert cw.symbol_version_violations(needed, "manylinux_2_36_x86_64") == []
    assert cw.symbol_version_violations(needed, "linux_x86_64") == []  # promises nothing
    # A glibc without its own policy: its own GLIBC_ limit, the libstdc++ limits of the policy below it.
    assert cw.symbol_version_violations({"GLIBC_2.30": set()}, "manylinux_2_30_x86_64") == []
    assert len(cw.symbol_version_violations({"GLIBCXX_3.4.25": set()}, "manylinux_2_30_x86_64")) == 1
    assert cw.tag_glibc("manylinux2014_x86_64") == (2, 17)
    assert len(cw.symbol_version_violations({"GLIBC_2.18": set()}, "manylinux2014_x86_64")) == 1


# --- real libraries, compiled here ---------------------------------------------------------------------------

SOURCE = r"""
#include <dlfcn.h>
#include <memory>
extern "C" __attribute__((visibility("default"))) void* probe(const std::shared_ptr<int>& shared) {
    std::shared_ptr<int> copy = shared;  // reference counting: libstdc++'s __is_single_threaded()
    return *copy ? dlopen("libm.so.6", RTLD_LAZY | RTLD_NOLOAD) : nullptr;
}
"""


def _glibc() -> tuple:
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", libc or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


needs_toolchain = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and shutil.which("g++") and shutil.which("readelf")),
    reason="needs Linux, g++ and readelf")
newer_glibc = pytest.mark.skipif(_glibc() < (2, 34), reason="the build machine's glibc (< 2.34) binds no new "
                                 "dl*/pthread versions; nothing to pin")


def _compile(tmp_path: Path, source: str, name: str, *flags: str) -> Path:
    src = tmp_path / f"{name}.cpp"
    src.write_text(source)
    lib = tmp_path / f"{name}.so"
    subprocess.run(["g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", *flags,
                    str(src), "-o", str(lib), "-ldl", "-lpthread"], check=True)
    return lib


def _check_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "check_wheel.py"), "--symbols-only", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@needs_toolchain
@newer_glibc
def test_check_fails_on_a_library_built_without_the_shim(tmp_path):
    lib = _compile(tmp_path, SOURCE, "plain")
    needed = cw.needed_versions(lib)
    assert "dlopen" in needed["GLIBC_2.34"]
    problems = cw.symbol_version_violations(needed, TAG)
    assert any("GLIBC_2.34" in p and "dlopen" in p for p in problems), problems
    if _glibc() >= (2, 32) and "GLIBC_2.32" in needed:  # libstdc++ of GCC >= 11 on glibc >= 2.32
        assert any("__libc_single_threaded" in p for p in problems), problems
    proc = _check_cli(str(lib))
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "dlopen" in proc.stdout, proc.stdout


@needs_toolchain
def test_the_shim_keeps_the_same_library_within_2_28(tmp_path):
    lib = _compile(tmp_path, SOURCE, "shimmed", "-include", str(HEADER))
    needed = cw.needed_versions(lib)
    assert cw.symbol_version_violations(needed, TAG) == [], needed
    assert "__libc_single_threaded" not in {s for symbols in needed.values() for s in symbols}
    if _glibc() >= (2, 34):
        assert "dlopen" in needed["GLIBC_2.2.5"]
    proc = _check_cli(str(lib))
    assert proc.returncode == 0, proc.stdout


def _pins() -> list:
    return re.findall(r"^DIFFKERN_PIN_SYMBOL\((\w+), (GLIBC_[\d.]+)\);", HEADER.read_text(), re.MULTILINE)


@needs_toolchain
@newer_glibc
def test_every_pinned_function_binds_to_its_old_version(tmp_path):
    pins = _pins()
    assert {"dlopen", "dlsym", "dlclose"} <= {name for name, _ in pins}
    refs = ",\n    ".join(f"reinterpret_cast<void*>(&{name})" for name, _ in pins)
    source = ("#include <dlfcn.h>\n#include <pthread.h>\n"
              f'extern "C" __attribute__((visibility("default"))) void* const table[] = {{\n    {refs}\n}};\n')
    lib = _compile(tmp_path, source, "all_pins", "-include", str(HEADER))
    needed = cw.needed_versions(lib)
    assert cw.symbol_version_violations(needed, TAG) == [], needed
    for name, version in pins:
        assert name in needed.get(version, set()), f"{name} is not bound to {version}: {needed}"


@needs_toolchain
@newer_glibc
def test_every_pin_is_a_pure_move_in_this_glibc():
    """Each pinned old version is the very same function as the current default (same address in
    libc.so.6): the pin changes which version name is recorded, never which code runs."""
    libc = subprocess.run(["gcc", "-print-file-name=libc.so.6"], stdout=subprocess.PIPE, text=True).stdout.strip()
    if not os.path.isabs(libc):
        libc = "/lib/x86_64-linux-gnu/libc.so.6"
    table = cw._readelf("--dyn-syms", "-W", libc)
    addresses = {}
    for addr, name, at, version in re.findall(r":\s+([0-9a-f]+)\s+\d+\s+FUNC\s+\w+\s+\w+\s+\d+\s+(\w+)(@@?)(\S+)",
                                              table):
        addresses.setdefault(name, {})[(version, at == "@@")] = addr
    for name, version in _pins():
        versions = addresses.get(name, {})
        default = [addr for (v, is_default), addr in versions.items() if is_default]
        assert (version, False) in versions or (version, True) in versions, f"{libc} has no {name}@{version}"
        old = versions.get((version, False)) or versions.get((version, True))
        assert default and old == default[0], f"{name}@{version} is not an alias of the default {name}"
        assert cw.split_version(version)[1] <= (2, 28)
