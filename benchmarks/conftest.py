"""pytest-benchmark setup: opt-in flags, one measuring session per run, and the bridge that lets pytest-benchmark
time the very rounds that :func:`diffkern.bench.measure` times.

Run with ``pytest benchmarks/ --benchmark-only`` (see BENCHMARKS.md). Flags:

- ``--bench-cpu-triton``: on a machine without a GPU, also time the Triton kernels in the interpreter (sets
  ``TRITON_INTERPRET=1``). The interpreter is not a performance path; this only exercises the harness.
- ``--bench-cpu-compile``: on a machine without a GPU, also time ``torch.compile`` (slow to compile on few cores).
- ``--bench-cpu-threads N``: without a GPU, torch's intra-op threads for the run (default 1: threads that share
  busy cores with other processes wait on each other at every op, which made small ops tens of times slower on a
  shared two-core machine; 0 keeps torch's default).

Each test's ``benchmark.extra_info`` carries diffkern's own figures (median per call from CUDA events on a GPU,
GB/s from the byte model, % of copy bandwidth, speedups against the baselines); pytest-benchmark's own columns are
wall-clock seconds per call over the same rounds, each round ending with a device synchronisation.
"""

from __future__ import annotations

import os

import pytest
import torch

from diffkern import bench
from diffkern._bench_cases import Options

_SESSION = None   # the run's BenchSession, also read by the machine-info hook below


def pytest_addoption(parser):
    group = parser.getgroup("diffkern benchmarks")
    group.addoption("--bench-cpu-triton", action="store_true", default=False,
                    help="without a GPU, also time Triton kernels in the interpreter (not a performance path)")
    group.addoption("--bench-cpu-compile", action="store_true", default=False,
                    help="without a GPU, also time torch.compile baselines (minutes of compilation)")
    group.addoption("--bench-cpu-threads", type=int, default=1, metavar="N",
                    help="without a GPU, torch threads for the run (default 1; 0 keeps torch's default)")


def _flag(config, name: str) -> bool:
    # The options exist only when this conftest is loaded at start-up (pytest benchmarks/ ...); a run that
    # discovers it later gets the defaults.
    return bool(config.getoption(name, default=False))


def pytest_configure(config):
    if torch.cuda.is_available():
        return
    if _flag(config, "--bench-cpu-triton"):
        # Must precede the first import of triton, which diffkern defers until a Triton kernel runs.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    threads = config.getoption("--bench-cpu-threads", default=1)
    if threads:
        torch.set_num_threads(threads)


def pytest_report_header(config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    line = f"diffkern benchmarks: device {device}"
    if device == "cpu":
        line += (f" with {torch.get_num_threads()} thread(s) (no GPU: CPU-sized cases only, GPU-sized cases "
                 "skipped; CPU timings are not performance claims)")
    return [line]


@pytest.fixture(scope="session")
def bench_session(pytestconfig) -> bench.BenchSession:
    """One session per run: the copy-bandwidth probe and every measurement, so that ratios come from one run."""
    global _SESSION
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = Options(cpu_triton=_flag(pytestconfig, "--bench-cpu-triton"),
                      cpu_compile=_flag(pytestconfig, "--bench-cpu-compile"))
    _SESSION = bench.BenchSession(device, options=options)
    return _SESSION


@pytest.fixture
def pedantic(benchmark):
    """A round runner for :func:`diffkern.bench.measure`: pytest-benchmark's pedantic mode runs the rounds, with
    one pytest-benchmark iteration per call, so its statistics are per call like diffkern's."""
    def run(call, rounds: int, calls_per_round: int) -> None:
        benchmark.pedantic(call, rounds=rounds, iterations=calls_per_round, warmup_rounds=0)
    return run


@pytest.hookimpl(optionalhook=True)   # a pytest-benchmark hook: no error where the plugin is missing
def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds the accelerator, the library versions and the copy bandwidth to the JSON's machine_info."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine_info["diffkern"] = {"device": bench.device_info(device), "versions": bench.versions()}
    if _SESSION is not None:
        machine_info["diffkern"]["copy_bandwidth"] = _SESSION.copy_bandwidth()
        machine_info["diffkern"]["timing"] = _SESSION.timing_info()
