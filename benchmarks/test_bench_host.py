"""The host cost per call (``python -m diffkern bench --host``'s first table) as pytest-benchmark cases.

One test per entry of ``diffkern.host_bench``'s tiny-tensor cases: each public op on each backend and, beside
them, a bare ``torch.add``, diffusers' own step / ``add_noise`` and the plain PyTorch formula. The ``triton``
and ``cuda`` entries run inside ``host_bench.device_work_skipped()`` (the benchmark-only seam: the kernels'
launches do nothing, so the figure is the host path up to the launch); the reference and the baselines run for
real. pytest-benchmark's host clock is the right clock here: no device work is timed. The ratios the targets are
stated in (README, "What a call costs") are ``bench --host``'s to print, from one run; here every entry is a
row of pytest-benchmark's table, grouped as ``bench --host`` groups them.
"""

from __future__ import annotations

import contextlib

import pytest

from diffkern import host_bench

# Tiny CPU tensors only, built when collected (no device is touched); diffusers entries appear where it imports.
CASES = host_bench._host_cases()
PARAMS = [pytest.param(group, name, id=f"{group}-{name}") for group, entries in CASES.items() for name in entries]


@pytest.mark.parametrize(("group", "name"), PARAMS)
def test_host_cost(group, name, benchmark):
    fn = CASES[group][name]
    skipped = name.endswith(("[triton]", "[cuda]"))
    benchmark.group = f"host cost per call: {group}"
    benchmark.extra_info.update(group=group, device_work="skipped (host_bench seam)" if skipped else "run")
    with host_bench.device_work_skipped() if skipped else contextlib.nullcontext():
        fn()   # the first call with this signature runs every check and plans; the rest are what is timed
        benchmark.pedantic(fn, rounds=100, iterations=10, warmup_rounds=2)
