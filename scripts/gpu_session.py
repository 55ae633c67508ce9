#!/usr/bin/env python3
"""One prepared GPU session: everything a short, bare GPU lease can tell about diffkern, in priority order.

A leased GPU machine is lent for minutes, starts bare and reaches no package registry (the known image: CPython
3.12, torch 2.11.0+cu130, triton 3.6, pytest, pytest-benchmark, hypothesis, ninja, nvcc 13.0, compute-sanitizer;
no diffusers). So the work is split in two halves:

    python scripts/gpu_session.py prepare                    # here: a CPU machine with nvcc and network
    python scripts/gpu_session.py run --out DIR              # there: the GPU machine, gpu_kit/ carried along
    python scripts/gpu_session.py run --dry-run --out DIR    # anywhere: the same plumbing on CPU tensors (CI)

``prepare`` writes ``gpu_kit/`` (git-ignored, under 60 MB): the CUDA extension built for sm_90 and, where the
toolkit can, sm_100 (``_C.abi3.so`` and its ``_build_info.json``; torch's stable ABI, so a library built against
this machine's torch loads into the image's), the wheels of what the image lacks (``wheels/``: diffusers, pure
Python; everything it needs on Python 3.12 is in the image), and ``manifest.json`` (versions, sizes, sha256,
what the image is assumed to hold). It fails if the kit exceeds 60 MB, or the kit and the working tree together
exceed the 64 MiB the GPU tool carries.

``run`` installs the wheels into a temporary ``--target`` directory (on ``PYTHONPATH`` for every stage), puts
the prebuilt extension next to the package once a throw-away process has loaded it (``diffkern/_C.abi3.so``,
where the loader looks first; otherwise the loader JIT-builds for the visible GPU), then runs the stages in priority
order. Every stage is a subprocess with its own time cap: at the cap minus a grace period it gets SIGINT
(pytest still writes its report), at the cap SIGKILL, so a hang or crash in one stage never stops the next.
Each stage writes its files into DIR as soon as it has them, so a run killed from outside keeps every finished
stage's files, and ``summary.md`` is rewritten after every stage.

Budget (``--budget-s``, nominal 480 s; every cap is scaled by budget / 480, and no stage runs past the end):

=========== ====== ==========================================================================================
stage        cap    sizing
=========== ====== ==========================================================================================
setup        60 s   pip install of one wheel (~5 s), one torch import and CUDA init, loading the prebuilt
                    extension (~15 s); the rest is for a JIT build of sm_90 alone if the prebuilt one does
                    not load (4 min for two archs on 2 busy cores here; ~40 s expected on 16 cores)
env          20 s   torch import + CUDA init (~10 s), nvidia-smi, the 256 MiB copy-bandwidth probe (< 1 s)
correctness 140 s   ~2 minutes of pytest: every op x backend at the headline shapes and dtypes, the captured
                    ``sample`` loop against the eager one, the no-host-sync loop, the > 2^31-element tensors
                    (~40 GB of allocations at ~4 TB/s: seconds), Triton's first compiles (~1 s per variant)
memcheck     40 s   ``sanitizer_cases.py --quick`` (93 small cases) under memcheck: ~15 s of torch start-up
                    under the sanitizer, then ms per instrumented launch
racecheck    40 s   the same cases under racecheck (shared-memory GroupNorm reductions are the slow part)
bench       130 s   ~90 (case, impl) measurements at ~0.2 s each (do_bench: 100 ms timed, 25 ms warm-up, its
                    estimate), Triton compiles, and at most 30% of the cap for torch.compile baselines (~5-15 s
                    per case; over that budget the rest are skipped with a note)
suite       rest    the remaining test suite (everything stage ``correctness`` did not run, read from its JUnit
                    report), GPU test files first
=========== ====== ==========================================================================================

The capped stages add up to 430 s; the suite gets at least 50 s on paper and, in practice, all the time the
earlier stages leave unused. The device tool's command then takes ~8.5 minutes (timeout_s 570 leaves a margin).

Files written into DIR (flat, at most 8: all that the GPU tool brings back):

``summary.md`` (the stage table, also printed last), ``logs.txt`` (every stage's output, appended as it runs),
``env.json``, ``correctness.xml`` and ``suite.xml`` (pytest JUnit reports), ``sanitizer.txt`` (per tool: exit
status and the sanitizer's error lines), ``bench.json`` (schema ``diffkern-bench/2``, as ``python -m diffkern
bench --json`` writes it) and ``bench.md`` (the rows BENCHMARKS.md takes).

``run --dry-run`` runs the same stages with CPU tensors and tiny selections: a few tests, the sanitizer case list
without the sanitizer, the CPU-sized benchmark cases. CI runs it (``tests/test_gpu_session.py``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "gpu_kit"
KIT_BUILD_DIR = REPO / "build" / "gpu-kit"   # the extension's objects (ignored; kept between prepares)
EXTENSION_FILE = "_C.abi3.so"
BUILD_INFO_FILE = "_build_info.json"
MANIFEST_FILE = "manifest.json"

NOMINAL_BUDGET_S = 480.0
GRACE_S = 10.0          # SIGINT this long before a stage's cap, SIGKILL at the cap
MIN_STAGE_S = 3.0       # a stage with less time than this left is skipped
KIT_LIMIT_BYTES = 60 * 10**6
TRANSFER_LIMIT_BYTES = 64 * 2**20
MAX_OUT_FILES = 8
LOG_TAIL_CHARS = 4000   # of a failed stage's output, kept in summary.md

# What the GPU image lacks, carried as wheels, at the versions installed here (the ones CI tests with).
CARRIED = ("diffusers",)
# Requirements of the carried wheels deliberately left behind, and why. (Carrying importlib_metadata would
# also put it in front of every package that tries it before importlib.metadata, and its own requirement,
# lazy-importer, is missing from the image.)
WAIVED = {"importlib-metadata": "diffusers imports importlib.metadata instead on Python >= 3.8"}
# What the carried wheels need that the image already holds (KINDS.md's package list; versions where it
# gives them). prepare checks every requirement of the carried wheels against this and CARRIED.
IMAGE_PACKAGES: Dict[str, Optional[str]] = {
    "filelock": None, "huggingface-hub": "1.33.0", "numpy": "2.5.2", "pillow": None, "regex": None,
    "requests": None, "safetensors": "0.8.0", "zipp": None, "torch": "2.11.0", "triton": "3.6.0",
    "pytest": None, "pytest-benchmark": None, "hypothesis": None, "ninja": None, "packaging": None,
}
IMAGE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


# --------------------------------------------------------------------------------------------------------------
# What each stage runs

# Stage correctness: one pytest -k expression over the test files below (in this order). It picks every op x
# backend at the headline shapes and dtypes (SD latents, UNet GroupNorm shapes; fp32, fp16, bf16), every step
# option of the op files' case matrices on both fast backends (the GPU-only full option product, whose ids
# carry "guided", is left to the suite), gradcheck on every backend, the sampler loop captured in a CUDA graph
# against the eager one, no host sync in a device-timestep loop, the tensors past 2^31 elements, and Triton's
# direct launches (their runner's launch, which no CPU can run).
# GroupNorm: the case matrix's SD UNet shapes ("sd-" ids, GPU-only cases) and the main regime case in fp16, on
# both fast backends.
CORRECTNESS_FILES = ("tests/test_sampling.py", "tests/test_api.py", "tests/test_cuda_large.py",
                     "tests/test_add_noise.py", "tests/test_ddim_step.py", "tests/test_ddpm_step.py",
                     "tests/test_hard_edges.py", "tests/test_cuda_backend.py", "tests/test_group_norm_silu.py",
                     "tests/test_triton_direct_launch.py")
CORRECTNESS_K = " or ".join([
    "test_sampling",
    "test_device_timesteps_cause_no_host_sync",
    "test_a_cpu_table_is_copied_at_the_first_step_only",
    "test_per_sample_cpu_values_reach_the_device_without_a_sync",
    "test_auto_fallback_is_logged_once",
    "test_direct_launches_on_the_gpu",
    "past_int32 or beyond_32_bit or past_2_to_the_31",
    "((test_add_noise or test_ddim_step or test_ddpm_step) and (triton or cuda) and not guided)",
    "(test_hard_edges and gradcheck)",
    "(test_cuda_backend and (test_cuda_graph_capture or test_torch_compile_fullgraph or test_fake_kernels"
    " or test_runs_on_the_current))",
    "(test_group_norm_silu and ((test_matches_reference and sd-) or (test_regimes_match_reference and c12-s20-g4"
    " and float16) or test_module_matches or test_float64 or test_triton_plan_for_stable_diffusion_shapes))",
])
# The suite: every test file but this script's own dry-run test (CI's), the GPU-heavy ones first (the suite is
# what the budget has left; the CPU-only build and emulation tests come last).
SUITE_EXCLUDE = ("tests/test_gpu_session.py",)
SUITE_FIRST = ("tests/test_cuda_backend.py", "tests/test_cuda_large.py", "tests/test_add_noise.py",
               "tests/test_ddim_step.py", "tests/test_ddpm_step.py", "tests/test_group_norm_silu.py",
               "tests/test_sampling.py", "tests/test_api.py", "tests/test_integrations.py")
# The dry run: a few tests of one small, fast file, and the rest of that file as the suite.
DRY_FILES = ("tests/test_testing.py",)
DRY_K = "fails"
PYTEST_TIMEOUT_S = 180  # per test, where pytest-timeout is installed (the image has it): a hang fails one test

# Stage bench: the headline cases, fp16 first (what SD runs), then fp32 and bf16 at the bandwidth probes.
BENCH_STEP_SETS = ("sd15-b1", "sdxl-b1", "probe-32M")
BENCH_GN_SETS = ("unet-c320-64-n1", "unet-c1280-8-n1", "unet-c640-32-n8", "vae-c128-512-n1")
BENCH_EXTRA_DTYPE_SETS = ("probe-32M", "vae-c128-512-n1")
HOST_LATENCY_S = 15   # the eager-latency table at the end of the bench stage (6 groups of 3-4 timings)
BENCH_COMPILE_SHARE = 0.3   # of the bench cap, at most, for torch.compile baselines (compilation included)
BENCH_MARGIN_S = 8.0        # no new case starts closer than this to the cap


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: Optional[float]      # nominal cap at a 480 s budget; None: whatever is left
    files: Tuple[str, ...]      # what it writes into DIR (logs.txt aside)
    what: str


STAGES = (
    Stage("setup", 60, (), "install the carried wheels, put the prebuilt extension in place, load it"),
    Stage("env", 20, ("env.json",), "versions, device, driver, extension, backends, copy bandwidth"),
    Stage("correctness", 140, ("correctness.xml",), "headline op x backend x dtype, graphs, no sync, > 2^31"),
    Stage("memcheck", 40, ("sanitizer.txt",), "compute-sanitizer memcheck over sanitizer_cases.py --quick"),
    Stage("racecheck", 40, ("sanitizer.txt",), "compute-sanitizer racecheck over sanitizer_cases.py --quick"),
    Stage("bench", 130, ("bench.json", "bench.md"), "headline benchmark cases, every backend and baseline"),
    Stage("suite", None, ("suite.xml",), "the remaining test suite"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
OUT_FILES = ("summary.md", "logs.txt") + tuple(dict.fromkeys(f for s in STAGES for f in s.files))
assert len(OUT_FILES) <= MAX_OUT_FILES


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _output(cmd: Sequence[str], timeout: float = 30) -> Optional[str]:
    """stdout+stderr of ``cmd``, or None when it cannot run."""
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip()


def _git_commit() -> Optional[str]:
    out = _output(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    if not out or "fatal" in out:
        return None
    return out + ("+dirty" if dirty else "")


def _dist_version(name: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tree_bytes() -> int:
    """Bytes of what the GPU tool copies besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                         stdout=subprocess.PIPE, check=True).stdout.decode()
    return sum((REPO / name).stat().st_size for name in out.split("\0") if name and (REPO / name).is_file())


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer: $COMPUTE_SANITIZER, on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "compute-sanitizer"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# --------------------------------------------------------------------------------------------------------------
# prepare


def requirement_problems(requirements: Sequence[str], available: Dict[str, Optional[str]],
                         waived: Sequence[str] = ()) -> List[str]:
    """The ``Requires-Dist`` entries (for CPython 3.12 on Linux, extras and ``waived`` names left out) that
    ``available`` ({name: version, or None when unknown}) does not satisfy: missing, or at a known version
    outside the specifier."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    environment = dict(default_environment(), python_version=IMAGE_PYTHON, python_full_version=IMAGE_PYTHON + ".0",
                       sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                       implementation_name="cpython", extra="")
    have = {canonicalize_name(name): version for name, version in available.items()}
    problems = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and ("extra" in str(req.marker) or not req.marker.evaluate(environment)):
            continue
        name = canonicalize_name(req.name)
        if name in {canonicalize_name(w) for w in waived}:
            continue
        if name not in have:
            problems.append(f"{line}: neither carried nor in the image")
        elif have[name] is not None and req.specifier and Version(have[name]) not in req.specifier:
            problems.append(f"{line}: the image has {have[name]}")
    return problems


def wheel_requirements(wheel: Path) -> List[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def check_sizes(kit_bytes: int, tree_bytes: int) -> List[str]:
    """What is over the limits: the kit alone (60 MB), and the kit with the working tree (the GPU tool's 64 MiB)."""
    problems = []
    if kit_bytes > KIT_LIMIT_BYTES:
        problems.append(f"gpu_kit/ holds {kit_bytes / 1e6:.1f} MB, over {KIT_LIMIT_BYTES / 1e6:.0f} MB")
    if kit_bytes + tree_bytes > TRANSFER_LIMIT_BYTES:
        problems.append(f"gpu_kit/ and the working tree hold {(kit_bytes + tree_bytes) / 2**20:.1f} MiB, over "
                        f"{TRANSFER_LIMIT_BYTES / 2**20:.0f} MiB")
    return problems


def _build_extension(kit: Path) -> dict:
    """The wheel's build (setup.py: cpp_extension's CUDAExtension) for sm_90 (+sm_100 where nvcc has it)."""
    sys.path.insert(0, str(REPO))
    from diffkern import _build

    cuda_home = _build.find_cuda_home()
    codes = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-code"], check=True,
                           stdout=subprocess.PIPE, text=True).stdout.split()
    archs = "9.0;10.0+PTX" if "sm_100" in codes else "9.0+PTX"
    print(f"prepare: building the CUDA extension for {archs} with {cuda_home} in {KIT_BUILD_DIR}", flush=True)
    start = time.perf_counter()
    lib_dir = KIT_BUILD_DIR / "lib"
    subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(KIT_BUILD_DIR), "--build-lib",
                    str(lib_dir)], cwd=REPO, check=True,
                   env=dict(os.environ, DIFFKERN_BUILD_CUDA="1", CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=archs))
    shutil.copyfile(lib_dir / "diffkern" / EXTENSION_FILE, kit / EXTENSION_FILE)
    info = json.loads((lib_dir / "diffkern" / BUILD_INFO_FILE).read_text())
    (kit / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return dict(info, file=EXTENSION_FILE, bytes=(kit / EXTENSION_FILE).stat().st_size,
                sha256=_sha256(kit / EXTENSION_FILE), build_seconds=round(time.perf_counter() - start, 1))


def _download_wheels(kit: Path) -> List[dict]:
    wheels_dir = kit / "wheels"
    shutil.rmtree(wheels_dir, ignore_errors=True)   # one version of each: two would stop the install there
    wheels_dir.mkdir(parents=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    entries = []
    for name in CARRIED:
        version = _dist_version(name)
        if version is None:
            raise SystemExit(f"prepare: {name} is not installed here; install the version CI tests with first")
        before = set(wheels_dir.iterdir())
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "--python-version", IMAGE_PYTHON, "--implementation",
                        "cp", *platforms, "-d", str(wheels_dir), f"{name}=={version}"], check=True)
        (wheel,) = set(wheels_dir.iterdir()) - before
        entries.append({"name": name, "version": version, "file": f"wheels/{wheel.name}",
                        "bytes": wheel.stat().st_size, "sha256": _sha256(wheel),
                        "requires": wheel_requirements(wheel)})
    return entries


def prepare(args: argparse.Namespace) -> int:
    kit = args.kit
    kit.mkdir(parents=True, exist_ok=True)
    extension = None if args.no_extension else _build_extension(kit)
    wheels = _download_wheels(kit)
    available = dict(IMAGE_PACKAGES, **{w["name"]: w["version"] for w in wheels})
    unmet = [p for w in wheels for p in requirement_problems(w["requires"], available, tuple(WAIVED))]
    manifest = {
        "created": _now(), "commit": _git_commit(), "built_on": {"python": sys.version.split()[0],
                                                                  "torch": _dist_version("torch")},
        "target": {"python": IMAGE_PYTHON, "platform": "manylinux x86_64", "assumed_in_image": IMAGE_PACKAGES},
        "extension": extension, "wheels": wheels, "waived_requirements": WAIVED, "unmet_requirements": unmet,
    }
    (kit / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    kit_bytes, tree_bytes = _dir_bytes(kit), _tree_bytes()
    print(f"prepare: {kit} holds {kit_bytes / 1e6:.1f} MB ({len(wheels)} wheel(s)"
          + (f", extension {extension['bytes'] / 1e6:.1f} MB for {' '.join(extension['archs'])}" if extension else "")
          + f"); the working tree {tree_bytes / 1e6:.1f} MB; together {(kit_bytes + tree_bytes) / 2**20:.1f} MiB")
    for problem in unmet:
        print(f"prepare: warning: requirement {problem}", file=sys.stderr)
    problems = check_sizes(kit_bytes, tree_bytes)
    for problem in problems:
        print(f"prepare: {problem}", file=sys.stderr)
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------------------------
# run: the stages' commands


@dataclass
class Context:
    out: Path
    dry_run: bool
    kit: Path
    site: Path                      # the carried wheels' --target directory

    def python(self, *args: str) -> List[str]:
        return [sys.executable, *args]

    def child(self, stage: str, cap_s: float) -> List[str]:
        cmd = self.python(str(Path(__file__).resolve()), "_stage", stage, "--out", str(self.out), "--kit",
                          str(self.kit), "--site", str(self.site), "--cap-s", f"{cap_s:.1f}")
        return cmd + (["--dry-run"] if self.dry_run else [])


def _pytest(ctx: Context, files: Sequence[str], report: str, extra: Sequence[str]) -> List[str]:
    import importlib.util

    cmd = ctx.python("-m", "pytest", *files, *extra, "-p", "no:cacheprovider", "-v", "--tb=short", "-rfE",
                     f"--junitxml={ctx.out / report}")
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={PYTEST_TIMEOUT_S}")
    return cmd


def ran_node_ids(report: Path) -> List[str]:
    """The node ids of the tests a JUnit report of this repository's suite records (run, failed or skipped)."""
    ids = []
    for case in ET.parse(report).getroot().iter("testcase"):
        module, name = case.get("classname", ""), case.get("name", "")
        if module and name:
            ids.append(module.replace(".", "/") + ".py::" + name)
    return ids


def suite_files() -> List[str]:
    every = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if str(p.relative_to(REPO)) not in SUITE_EXCLUDE)
    return [f for f in SUITE_FIRST if f in every] + [f for f in every if f not in SUITE_FIRST]


def stage_command(ctx: Context, stage: Stage, cap_s: float) -> Tuple[Optional[List[str]], str]:
    """(the command, or None to skip it, and a note)."""
    if stage.name in ("setup", "env", "bench"):
        return ctx.child(stage.name, cap_s), ""
    if stage.name == "correctness":
        files, expr = (DRY_FILES, DRY_K) if ctx.dry_run else (CORRECTNESS_FILES, CORRECTNESS_K)
        return _pytest(ctx, [f for f in files if (REPO / f).is_file()], "correctness.xml", ["-k", expr]), ""
    if stage.name == "suite":
        files = list(DRY_FILES) if ctx.dry_run else suite_files()
        report, note = ctx.out / "correctness.xml", ""
        try:
            done = ran_node_ids(report)
        except (OSError, ET.ParseError) as exc:
            done, note = [], f"no usable correctness.xml ({type(exc).__name__}): nothing deselected"
        return _pytest(ctx, files, "suite.xml", [f"--deselect={node}" for node in done]), note
    # memcheck, racecheck
    cases = ctx.python(str(REPO / "scripts" / "sanitizer_cases.py"), "--quick")
    if ctx.dry_run:
        return cases + ["--list"], "dry run: the case list, without the sanitizer"
    sanitizer = find_sanitizer()
    if sanitizer is None:
        return None, "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)"
    extra = (["--leak-check", "no", "--report-api-errors", "explicit"] if stage.name == "memcheck"
             else ["--racecheck-report", "hazard"])
    return [sanitizer, "--tool", stage.name, "--error-exitcode", "99", *extra, *cases], ""


# --------------------------------------------------------------------------------------------------------------
# run: executing and recording the stages


@dataclass
class StageResult:
    stage: Stage
    status: str = "skipped"         # ok, failed, timeout, skipped
    seconds: float = 0.0
    cap_s: float = 0.0
    returncode: Optional[int] = None
    note: str = ""
    output_tail: str = ""


def _execute(cmd: List[str], env: Dict[str, str], cap_s: float, log) -> Tuple[Optional[int], bool]:
    """Run ``cmd`` in its own process group with output appended to ``log``; SIGINT at the cap minus the grace,
    SIGKILL at the cap. Returns (exit status or None when it could not start, whether the cap stopped it)."""
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.write(f"could not start: {exc}\n".encode())
        return None, False
    interrupt_at = max(cap_s - GRACE_S, 0.75 * cap_s)
    try:
        return proc.wait(timeout=interrupt_at), False
    except subprocess.TimeoutExpired:
        pass
    for sig, wait in ((signal.SIGINT, cap_s - interrupt_at), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode, True


def _junit_note(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no report"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "empty report"
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def _sanitizer_report(ctx: Context, result: StageResult, output: str) -> str:
    """Appends this tool's findings to sanitizer.txt; returns the summary note."""
    findings = [line for line in output.splitlines() if line.startswith("=========")]
    summary = next((line for line in reversed(findings) if "ERROR SUMMARY" in line), None)
    with open(ctx.out / "sanitizer.txt", "a") as f:
        f.write(f"## {result.stage.name}: {result.status}, exit status {result.returncode}, {result.seconds:.0f} s\n")
        f.write((result.note + "\n") if result.note else "")
        f.write("\n".join(findings[:300]) + ("\n" if findings else ""))
        if not findings:
            f.write("\n".join(output.splitlines()[-5:]) + "\n")
        f.write("\n")
    return summary.strip("= ") if summary else ""


def _stage_note(ctx: Context, result: StageResult, output: str) -> str:
    name = result.stage.name
    if name in ("correctness", "suite"):
        return _junit_note(ctx.out / f"{name}.xml")
    if name in ("memcheck", "racecheck"):
        return _sanitizer_report(ctx, result, output)
    if name == "env":
        try:
            env = json.loads((ctx.out / "env.json").read_text())
            copy = env.get("copy_bandwidth") or {}
            name = env["device"].get("name")
            return f"{name}; copy {copy['gbps']:.0f} GB/s" if copy else name
        except (OSError, ValueError, KeyError):
            return "no env.json"
    if name == "bench":
        try:
            results = json.loads((ctx.out / "bench.json").read_text())["results"]
        except (OSError, ValueError, KeyError):
            return "no bench.json"
        counts: Dict[str, int] = {}
        for r in results:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    match = re.findall(r"^setup: (.*)$", output, re.MULTILINE)
    return "; ".join(match[-3:])


def write_summary(out: Path, results: Sequence[StageResult], budget_s: float, dry_run: bool, started: str) -> str:
    lines = [f"# diffkern GPU session{' (dry run)' if dry_run else ''}", "",
             f"started {started}, budget {budget_s:.0f} s, commit {_git_commit()}", "",
             "| stage | status | seconds | cap | file | note |", "|---|---|---|---|---|---|"]
    for r in results:
        files = ", ".join(r.stage.files) or "logs.txt"
        note = r.note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.stage.name} | {r.status} | {r.seconds:.1f} | {r.cap_s:.0f} | {files} | {note} |")
    lines.append(f"\ntotal {sum(r.seconds for r in results):.1f} s")
    for r in results:
        if r.status in ("failed", "timeout") and r.output_tail:
            lines += ["", f"## {r.stage.name}: end of its output", "", "```", r.output_tail, "```"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _stage_env(ctx: Context) -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ctx.site), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                       else []))
    if not ctx.dry_run:
        # A missing extension fails the cuda tests instead of skipping them; the > 2^31-element CUDA test runs.
        env.update(DIFFKERN_REQUIRE_CUDA_EXTENSION="1", DIFFKERN_TEST_LARGE="1")
    return env


def run(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:
        (out / name).unlink(missing_ok=True)
    started, start = _now(), time.monotonic()
    end = start + args.budget_s
    scale = args.budget_s / NOMINAL_BUDGET_S
    selected = args.stages.split(",") if args.stages else list(STAGE_NAMES)
    unknown = sorted(set(selected) - set(STAGE_NAMES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
    site = Path(tempfile.mkdtemp(prefix="diffkern-gpu-site-"))
    ctx = Context(out=out, dry_run=args.dry_run, kit=args.kit.resolve(), site=site)
    env = _stage_env(ctx)
    results: List[StageResult] = []
    print(f"gpu_session: {'dry run, ' if args.dry_run else ''}budget {args.budget_s:.0f} s, results in {out}",
          flush=True)
    with open(out / "logs.txt", "ab") as log:
        for stage in STAGES:
            if stage.name not in selected:
                continue
            result = StageResult(stage)
            results.append(result)
            left = end - time.monotonic()
            cap = left if stage.cap_s is None else min(args.caps.get(stage.name, stage.cap_s * scale), left)
            result.cap_s = max(cap, 0.0)
            if left < MIN_STAGE_S:
                result.note = f"no budget left ({left:.0f} s)"
            else:
                cmd, result.note = stage_command(ctx, stage, cap)
                if cmd is not None:
                    log.write(f"\n===== {stage.name} (cap {cap:.0f} s): {' '.join(cmd)}\n".encode())
                    log.flush()
                    offset = log.tell()
                    t0 = time.monotonic()
                    result.returncode, capped = _execute(cmd, env, cap, log)
                    result.seconds = time.monotonic() - t0
                    log.flush()
                    output = (out / "logs.txt").read_bytes()[offset:].decode(errors="replace")
                    result.status = "timeout" if capped else ("ok" if result.returncode == 0 else "failed")
                    note = _stage_note(ctx, result, output)
                    result.note = "; ".join(n for n in (note, result.note) if n)
                    if result.status != "ok":
                        result.output_tail = output[-LOG_TAIL_CHARS:]
                    log.write(f"===== {stage.name}: {result.status} (exit {result.returncode}) "
                              f"in {result.seconds:.1f} s\n".encode())
            print(f"gpu_session: {stage.name:<12} {result.status:<8} {result.seconds:6.1f} s  {result.note}",
                  flush=True)
            write_summary(out, results, args.budget_s, args.dry_run, started)
    shutil.rmtree(site, ignore_errors=True)
    print()
    print(write_summary(out, results, args.budget_s, args.dry_run, started), end="", flush=True)
    return 0 if all(r.status == "ok" for r in results) else 1


# --------------------------------------------------------------------------------------------------------------
# The stages that are Python code (each run in its own process by ``_stage``)


def stage_setup(ctx: Context) -> int:
    """Install the carried wheels into the site directory, put the prebuilt extension in place, load it."""
    status = 0
    manifest_path = ctx.kit / MANIFEST_FILE
    if not manifest_path.is_file():
        print(f"setup: no {manifest_path} (run `scripts/gpu_session.py prepare` first): nothing installed")
        manifest = {"wheels": [], "extension": None}
        status = 0 if ctx.dry_run else 1
    else:
        manifest = json.loads(manifest_path.read_text())
    wheels = [ctx.kit / w["file"] for w in manifest["wheels"]]
    for wheel, entry in zip(wheels, manifest["wheels"]):
        if not wheel.is_file() or _sha256(wheel) != entry["sha256"]:
            print(f"setup: {wheel} is missing or differs from the manifest")
            return 1
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(ctx.site),
                        *map(str, wheels)], check=True)
        print(f"setup: installed {', '.join(w['name'] + ' ' + w['version'] for w in manifest['wheels'])}")

    import torch

    from diffkern import _extension

    library = ctx.kit / EXTENSION_FILE
    loads = False
    if library.is_file():
        # In a throw-away process first: a library that fails half-way through registering its ops would leave
        # this process unable to load any other, JIT-built one included.
        probe = subprocess.run([sys.executable, "-c", "import sys, torch; from diffkern.ops import _declaration; "
                                "_declaration.define_cuda_ops(); torch.ops.load_library(sys.argv[1])", str(library)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        loads = probe.returncode == 0
        print(f"setup: the kit's extension {'loads' if loads else 'does not load'} here: "
              f"{probe.stdout.strip()[-2000:] or 'ok'}")
    if ctx.dry_run:
        return status   # leave the checkout alone
    if loads and not any((REPO / "diffkern").glob("_C*.so")):
        shutil.copyfile(library, REPO / "diffkern" / EXTENSION_FILE)
        shutil.copyfile(ctx.kit / BUILD_INFO_FILE, REPO / "diffkern" / BUILD_INFO_FILE)
    print(f"setup: torch {torch.__version__}, CUDA {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    try:
        _extension.load()
    except _extension.ExtensionUnavailable as exc:
        print(f"setup: extension unavailable: {exc}")
        return 1
    st = _extension.status()
    print(f"setup: extension {st['source']} ({st['path']}; archs {st['archs']})")
    return status


def stage_env(ctx: Context) -> int:
    import torch

    import diffkern
    from diffkern import _extension, backends, bench

    device = torch.device("cpu" if ctx.dry_run else "cuda")
    info = {
        "created": _now(), "dry_run": ctx.dry_run, "commit": _git_commit(), "argv": sys.argv,
        "python": sys.version, "executable": sys.executable, "versions": bench.versions(),
        "packages": {name: _dist_version(name) for name in list(CARRIED) + sorted(IMAGE_PACKAGES)},
        "diffkern_path": diffkern.__file__,
        "cuda_available": torch.cuda.is_available(),
        "nvidia_smi": _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                               "clocks.max.sm,temperature.gpu,power.draw,power.limit", "--format=csv"]),
        "nvcc": _output(["nvcc", "--version"]), "compute_sanitizer": find_sanitizer(),
        "kit_manifest": json.loads((ctx.kit / MANIFEST_FILE).read_text()) if (ctx.kit / MANIFEST_FILE).is_file()
        else None,
    }
    path = ctx.out / "env.json"
    path.write_text(json.dumps(info, indent=1, default=str))   # written now: the device queries below can hang
    info["device"] = bench.device_info(device)
    if not ctx.dry_run:   # setup loaded it (or JIT-built it into the cache); on a CPU a load could start a JIT build
        try:
            _extension.load()
        except _extension.ExtensionUnavailable:
            pass
    info["extension"] = _extension.status()
    info["backends"] = {name: s._asdict() for name, s in backends.available_backends(device).items()}
    info["auto_preference"] = {op: list(order) for op, order in backends.AUTO_PREFERENCE.items()}
    path.write_text(json.dumps(info, indent=1, default=str))
    info["copy_bandwidth"] = bench.BenchSession(device, quick=ctx.dry_run).copy_bandwidth()
    path.write_text(json.dumps(info, indent=1, default=str))
    print(f"env: {info['device']['name']}, copy {info['copy_bandwidth']['gbps']:.1f} GB/s")
    return 0


def bench_cases(dry_run: bool) -> list:
    """The headline cases in the order they run: fp16 first, then fp32 and bf16 at the bandwidth probes."""
    from diffkern import _bench_cases as cases

    if dry_run:   # one step op and one GroupNorm op: every impl kind, a few seconds
        return cases.make_cases(where="cpu", dtypes=("fp32",), ops=("ddim_step_cfg", "group_norm_silu"))
    every = cases.make_cases(where="gpu")
    wanted = set(BENCH_STEP_SETS + BENCH_GN_SETS)
    first = [c for c in every if c.dtype == "fp16" and c.shape_set in wanted]
    return first + [c for c in every if c.dtype != "fp16" and c.shape_set in BENCH_EXTRA_DTYPE_SETS]


def _fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def bench_markdown(document: dict) -> str:
    """The BENCHMARKS.md section for one bench.json: the run's facts, then one op table per dtype."""
    device, versions = document["device"], document["versions"]
    copy = document["copy_bandwidth"]
    lines = [f"### {device.get('name')} ({document['created'][:10]})", "",
             f"- date: {document['created']}",
             f"- device: {json.dumps(device)}",
             "- torch / triton / CUDA / diffusers / diffkern: " + " / ".join(
                 str(versions.get(k)) for k in ("torch", "triton", "cuda", "diffusers", "diffkern")),
             f"- diffkern commit: {document.get('commit')}",
             f"- command: `{document['command']}`",
             f"- copy bandwidth (same run): {copy['gbps']:.1f} GB/s "
             f"({copy['bytes_per_tensor'] / 2**20:.0f} MiB tensor)"]
    for dtype in ("fp16", "fp32", "bf16"):
        rows = [r for r in document["results"] if r["dtype"] == dtype]
        if not rows:
            continue
        lines += ["", f"#### {dtype}", "",
                  "| op | shape set | layout | impl | time | GB/s | % of copy | vs eager | vs compile | vs diffusers |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            layout = r["layout"] if r["op"].startswith("group_norm") else ""
            if r["status"] != "ok":
                if r["status"] != "skipped" or r["impl"] == "compile":
                    lines.append(f"| {r['op']} | {r['shape_set']} | {layout} | {r['impl']} | {r['status']}: "
                                 f"{r['reason'][:80].replace('|', '/')} | | | | | |")
                continue
            ratios = [f"{r['speedups'][b]:.2f}x" if b in r["speedups"] else ""
                      for b in ("eager", "compile", "diffusers")]
            pct = f"{r['pct_of_copy']:.0f}%" if r.get("pct_of_copy") is not None else ""
            lines.append(f"| {r['op']} | {r['shape_set']} | {layout} | {r['impl']} | {_fmt_ms(r['median_ms'])} | "
                         f"{r['gbps']:.0f} | {pct} | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def stage_bench(ctx: Context, cap_s: float) -> int:
    """The headline cases through diffkern.bench's BenchSession (the harness of ``python -m diffkern bench``),
    torch.compile last per case and only while its share of the cap lasts; bench.json and bench.md are
    rewritten after every case."""
    import torch

    from diffkern import bench
    from diffkern._bench_cases import BACKEND_IMPLS

    start = time.monotonic()
    device = torch.device("cpu" if ctx.dry_run else "cuda")
    if ctx.dry_run:
        torch.set_num_threads(1)   # as the bench CLI does on a CPU: steady on a shared machine
    # compile is measured explicitly, last: as a session baseline every diffusers/backend run would compile first.
    session = bench.BenchSession(device, quick=ctx.dry_run, baselines=("eager", "diffusers"))
    compile_budget, compile_spent = BENCH_COMPILE_SHARE * cap_s, 0.0
    copy = session.copy_bandwidth()
    selected = bench_cases(ctx.dry_run)
    document = {"schema": bench.SCHEMA, "created": _now(),
                "command": f"scripts/gpu_session.py run{' --dry-run' if ctx.dry_run else ''} (stage bench, "
                           f"{len(selected)} cases, cap {cap_s:.0f} s)",
                "commit": _git_commit(), "device": bench.device_info(device), "versions": bench.versions(),
                "timing": session.timing_info(), "copy_bandwidth": copy, "results": []}
    ordered: List[bench.Result] = []
    status = 0
    for case in selected:
        if time.monotonic() - start > cap_s - BENCH_MARGIN_S:
            print(f"bench: stopped before {case.id}: the cap is near")
            status = 1
            break
        block = []
        for impl in ("eager", "diffusers") + BACKEND_IMPLS:
            if impl == "diffusers" and impl not in case.spec.baselines:
                continue
            block.append(session.run(case, impl))
        if compile_spent < compile_budget:
            t0 = time.monotonic()
            block.append(session.run(case, "compile"))
            compile_spent += time.monotonic() - t0
        else:
            block.append(bench.Result(case, "compile", "skipped",
                                      f"torch.compile skipped: its {compile_budget:.0f} s share of the bench stage "
                                      "was spent on earlier cases"))
        for result in block:
            result.speedups = session.speedups(case, result.impl)
        ordered.extend(block)
        print(bench.format_case(case, block, copy["gbps"]), flush=True)
        document["results"] = [r.to_dict(copy["gbps"]) for r in ordered]
        (ctx.out / "bench.json").write_text(json.dumps(document, indent=1, allow_nan=False))
        (ctx.out / "bench.md").write_text(bench_markdown(document))
    if any(r.status in ("error", "mismatch") for r in ordered):
        status = 1
    print(f"bench: {len(ordered)} results, torch.compile {compile_spent:.0f} s of {compile_budget:.0f} s")
    if not ctx.dry_run and time.monotonic() - start < cap_s - BENCH_MARGIN_S - HOST_LATENCY_S:
        # The eager latency per call at SD 1.5 / SDXL latents (``python -m diffkern bench --host``'s GPU part),
        # appended to bench.md: no extra output file.
        from diffkern import host_bench

        latency = host_bench._measure_groups(host_bench._gpu_cases(device), synchronize=True)
        table = host_bench.format_results(latency, f"eager latency per call on {document['device'].get('name')} "
                                                   "(µs, median; `python -m diffkern bench --host`)")
        table += "\n" + host_bench.format_checks(host_bench.gpu_target_checks(latency))
        print(table)
        with open(ctx.out / "bench.md", "a") as f:
            f.write("\n```\n" + table + "\n```\n")
    return status


def _stage_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_session.py _stage")
    parser.add_argument("stage", choices=("setup", "env", "bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("--site", type=Path, required=True)
    parser.add_argument("--cap-s", type=float, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    ctx = Context(out=args.out, dry_run=args.dry_run, kit=args.kit, site=args.site)
    if args.stage == "setup":
        return stage_setup(ctx)
    if args.stage == "env":
        return stage_env(ctx)
    return stage_bench(ctx, args.cap_s)


# --------------------------------------------------------------------------------------------------------------
# Command line


def _cap(text: str) -> Tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in STAGE_NAMES or not seconds:
        raise argparse.ArgumentTypeError(f"expected STAGE=SECONDS with STAGE one of {', '.join(STAGE_NAMES)}")
    return name, float(seconds)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_stage"]:
        return _stage_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the extension, download the wheels, write the manifest (CPU machine)")
    p.add_argument("--kit", type=Path, default=KIT, help="the folder to fill (default: gpu_kit/)")
    p.add_argument("--no-extension", action="store_true", help="only the wheels and the manifest")
    r = sub.add_parser("run", help="run the stages (GPU machine; --dry-run: CPU)")
    r.add_argument("--out", type=Path, required=True, help="where the result files go (flat, at most 8 files)")
    r.add_argument("--budget-s", type=float, default=NOMINAL_BUDGET_S, help="seconds for everything (default 480)")
    r.add_argument("--dry-run", action="store_true", help="CPU tensors and tiny selections: the plumbing only")
    r.add_argument("--kit", type=Path, default=KIT, help="the prepared folder (default: gpu_kit/)")
    r.add_argument("--stages", help=f"comma-separated subset, in the fixed order (default: {','.join(STAGE_NAMES)})")
    r.add_argument("--cap", type=_cap, action="append", default=[], metavar="STAGE=SECONDS",
                   help="override one stage's cap (unscaled)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args)
    args.caps = dict(args.cap)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
