"""Every op x impl x dtype x shape: diffkern's backends against eager PyTorch, torch.compile and diffusers.

One test per (case, impl). The cases, byte models and baselines are in ``diffkern/_bench_cases.py`` (via
``cases``); each test runs the session's :meth:`diffkern.bench.BenchSession.run`, the measurement of ``python -m
diffkern bench``, and records its samples with pytest-benchmark. A backend's test first makes sure its case's
baselines have been measured in this run (normally their own tests, which come first), so every speedup is a
ratio of two medians from the same run. Unusable impls skip with the reason.
"""

from __future__ import annotations

import pytest

from cases import op_params


@pytest.mark.parametrize(("case", "impl"), op_params())
def test_op(case, impl, bench_session, benchmark, record):
    copy_gbps = bench_session.copy_bandwidth()["gbps"]   # measured once, before the first case
    result = bench_session.run(case, impl, raise_errors=True)
    if result.status == "skipped":
        pytest.skip(result.reason)
    benchmark.group = case.title   # read when the record opens: set it first
    benchmark.extra_info.update(result.to_dict(copy_gbps))
    benchmark.extra_info["device"] = str(bench_session.device)
    if result.status == "mismatch":
        pytest.fail(result.reason)
    record(result.measurement)
