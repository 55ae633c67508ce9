"""``python -m diffkern bench --quick``: runs on the CPU in seconds and writes the JSON that BENCHMARKS.md documents.

The benchmark's numbers are not checked (CPU timings say nothing about the kernels); its plumbing is: every op
appears, the reference backend is measured for each, unusable impls are skipped with a reason, the figures are
consistent with each other and with the byte model, and the pytest suite hands pytest-benchmark the same samples.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from diffkern import _bench_cases as cases
from diffkern.bench import CPU_TIMER, SCHEMA, main

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"schema", "created", "command", "device", "versions", "timing", "copy_bandwidth", "results"}
RESULT_FIELDS = {"case", "op", "shape_set", "shape", "layout", "dtype", "impl", "kind", "status", "reason",
                 "bytes_moved", "byte_model", "note", "max_abs_diff_vs_reference"}
MEASURED_FIELDS = {"median_ms", "min_ms", "q25_ms", "q75_ms", "samples", "calls_per_sample", "timer", "gbps",
                   "copy_gbps", "pct_of_copy", "speedups"}


def test_quick_json_and_plot(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--json", str(path), "--device", "cpu"]
    plot = None
    try:
        import matplotlib  # noqa: F401
        plot = tmp_path / "bench.png"
        argv += ["--plot", str(plot)]
    except ImportError:
        pass
    assert main(argv) == 0
    assert "copy bandwidth" in capsys.readouterr().out

    doc = json.loads(path.read_text())
    assert TOP_LEVEL <= set(doc)
    assert doc["schema"] == SCHEMA
    assert doc["device"]["type"] == "cpu"
    assert doc["versions"]["torch"]
    assert doc["copy_bandwidth"]["gbps"] > 0
    assert doc["timing"]["timer"] == CPU_TIMER
    results = doc["results"]
    assert {r["op"] for r in results} == set(cases.OPS)
    for r in results:
        assert RESULT_FIELDS <= set(r), r
        assert r["status"] in ("ok", "skipped"), r
        assert r["kind"] == ("baseline" if r["impl"] in cases.BASELINES else "diffkern")
        if r["status"] == "skipped":
            assert r["reason"], r
            assert "median_ms" not in r
            continue
        assert MEASURED_FIELDS <= set(r), r
        assert 0 < r["min_ms"] <= r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["samples"] >= 1 and r["calls_per_sample"] >= 1 and r["timer"] == CPU_TIMER
        assert r["byte_model"] == cases.OPS[r["op"]].bytes.formula
        assert math.isclose(r["gbps"], r["bytes_moved"] / (r["median_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(r["pct_of_copy"], 100 * r["gbps"] / doc["copy_bandwidth"]["gbps"], rel_tol=1e-9)
        assert set(r["speedups"]) <= set(cases.BASELINES) - {r["impl"]}
    for op in cases.OPS:
        reference = [r for r in results if r["op"] == op and r["impl"] == "reference"]
        assert reference and all(r["status"] == "ok" for r in reference), op
        assert all(r["max_abs_diff_vs_reference"] == 0 for r in reference)
        # A backend's speedups are against every baseline of its op that ran.
        ran = {r["impl"] for r in results if r["op"] == op and r["kind"] == "baseline" and r["status"] == "ok"}
        assert all(set(r["speedups"]) == ran for r in reference), op
    # Without opt-ins, the CPU run skips the interpreter and torch.compile, and says why.
    triton = [r for r in results if r["impl"] == "triton"]
    assert triton and all(r["status"] == "skipped" and "interpreter" in r["reason"] for r in triton)
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("op, per_element", [("add_noise", 3), ("ddim_step", 4), ("ddim_step_cfg", 6),
                                             ("ddim_step_cfg_rescale", 8), ("ddpm_step", 5)])
def test_step_byte_models(op, per_element):
    for dtype, size in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        case = cases.Case(op, "t", (2, 4, 8, 8), dtype)
        assert case.bytes_moved == per_element * 2 * 4 * 8 * 8 * size


def test_group_norm_byte_models():
    n, c, s = 2, 64, 16 * 16
    fwd = cases.Case("group_norm_silu", "t", (n, c, 16, 16), "fp16")
    both = cases.Case("group_norm_silu_fwd_bwd", "t", (n, c, 16, 16), "fp16", "channels_last")
    assert fwd.bytes_moved == 2 * n * c * s * 2 + 2 * c * 2
    assert both.bytes_moved == 5 * n * c * s * 2 + 6 * c * 2 + 16 * n * cases.GN_GROUPS


def test_pytest_benchmark_shows_the_same_samples(tmp_path):
    """The pytest suite's tables are diffkern's measurements: pytest-benchmark's statistics of a test are those of
    the samples in its extra_info (the ``record`` fixture of benchmarks/conftest.py)."""
    path = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_ops.py", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider", "-k", "ddim_step-cpu-small-fp32", f"--benchmark-json={path}"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "Benchmark fixture was not used" not in proc.stdout
    records = json.loads(path.read_text())["benchmarks"]
    assert {r["extra_info"]["impl"] for r in records} == {"eager", "diffusers", "reference"}
    for r in records:
        stats, info = r["stats"], r["extra_info"]
        assert stats["rounds"] == info["samples"] and stats["iterations"] == info["calls_per_sample"]
        assert math.isclose(stats["median"] * 1e3, info["median_ms"], rel_tol=1e-9)
        assert math.isclose(stats["min"] * 1e3, info["min_ms"], rel_tol=1e-9)


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit):
        main(["--quick", "--ops", "no_such_op", "--device", "cpu"])
