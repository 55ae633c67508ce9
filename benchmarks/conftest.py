"""pytest-benchmark setup: opt-in flags, one measuring session per run, and the hand-over of diffkern's
measurements to pytest-benchmark.

Run with ``pytest benchmarks/ --benchmark-only`` (see BENCHMARKS.md). Flags:

- ``--bench-cpu-triton``: on a machine without a GPU, also time the Triton kernels in the interpreter (sets
  ``TRITON_INTERPRET=1``). The interpreter is not a performance path; this only exercises the harness.
- ``--bench-cpu-compile``: on a machine without a GPU, also time ``torch.compile`` (slow to compile on few cores).
- ``--bench-cpu-threads N``: without a GPU, torch's intra-op threads for the run (default 1: threads that share
  busy cores with other processes wait on each other at every op, which made small ops tens of times slower on a
  shared two-core machine; 0 keeps torch's default).

The timing is :func:`diffkern.bench.measure` (``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark`` on
a CPU), the same as ``python -m diffkern bench``'s; the ``record`` fixture gives its per-call samples to
pytest-benchmark, so pytest-benchmark's table, ``--benchmark-json``, ``--benchmark-compare`` and histograms show
exactly those figures. Each test's ``benchmark.extra_info`` adds the rest of diffkern's result (GB/s from the byte model, % of
copy bandwidth, speedups against the baselines).
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
def record(benchmark):
    """``record(measurement)`` makes a :class:`diffkern.bench.Measurement`'s samples the test's pytest-benchmark
    timings (nothing with ``--benchmark-disable``).

    pytest-benchmark has no public call for timings measured elsewhere (its timer is a host clock around the
    target; diffkern's are CUDA events with an L2 flush, or torch.utils.benchmark's blocks). This opens the
    fixture's record the way ``benchmark.pedantic`` does (``_make_stats``, one iteration per call of a sample) and
    marks the fixture used (``_mode``, else pytest-benchmark warns that it was not). tests/test_bench_cli.py checks
    that pytest-benchmark's JSON then holds these samples, so a release that changes either shows there."""
    def record_measurement(measurement: bench.Measurement) -> None:
        if benchmark.disabled:
            return
        benchmark._mode = "diffkern.bench.measure"
        stats = benchmark._make_stats(measurement.calls_per_sample)
        for sample in measurement.samples_s:
            stats.update(sample * measurement.calls_per_sample)   # a sample's duration; pytest-benchmark divides
    return record_measurement


@pytest.hookimpl(optionalhook=True)   # a pytest-benchmark hook: no error where the plugin is missing
def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds the accelerator, the library versions and the copy bandwidth to the JSON's machine_info."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine_info["diffkern"] = {"device": bench.device_info(device), "versions": bench.versions()}
    if _SESSION is not None:
        machine_info["diffkern"]["copy_bandwidth"] = _SESSION.copy_bandwidth()
        machine_info["diffkern"]["timing"] = _SESSION.timing_info()
