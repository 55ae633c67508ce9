"""``diffkern.triton._common.DirectLauncher``: a bound launch skips Triton's per-call binding only where Triton
would pick the same compiled kernel, checked against Triton itself without a GPU; and ``bench --host``'s measurement
of that launch path.

This test process runs Triton in interpreter mode (fixed at import), which has no compiled kernels, so the check
runs in a subprocess (this file as a script) with Triton's real compiler behind the compile-only driver for sm_90.
There every launch compiles and returns instead of running (``JITFunction.run`` with ``warmup=True``), and a
compiled kernel's runner only records what it was given. Each call of a bound launch (ddim, ddpm, add_noise,
flow_match_step, flow_add_noise, the GroupNorm forward) is made with fresh inputs that vary what Triton specialises
on: 16-byte alignment (a view one element into its storage), a None noise or bias, host timestep and sigma values,
the dtype. After each call the test asks
Triton for the compiled kernel of exactly the arguments the launch passed (``warmup=True`` again), and requires:
a call the launcher ran directly ran that kernel's runner, with those arguments, and repeated specialisations did
run directly. What no CPU can check is the runner's launch itself (Triton's compiled launcher and the driver).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


NO_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run_worker(mode: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, __file__, mode], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


@NO_TRITON
def test_a_direct_launch_runs_the_kernel_triton_would_pick():
    report = _run_worker("direct")
    print(report)
    for op, counts in report.items():
        assert counts["direct"] >= 5 and counts["through_triton"] >= 3, (op, counts)


@NO_TRITON
def test_bench_host_measures_the_triton_launch_path():
    """``host_bench.measure_triton_launch_path`` (which the interpreter runs of ``bench --host`` leave out): Triton's
    ``JITFunction.run`` per op, and each public call once its launch goes direct."""
    figures = _run_worker("bench")
    print(figures)
    for op in ("ddim_step", "ddpm_step", "add_noise", "flow_match_step", "flow_add_noise", "group_norm_silu"):
        assert figures[f"Triton JITFunction.run [{op}]"] > 0
        assert figures[f"diffkern {op} [triton], direct launch"] > 0


# ------------------------------------------------------------------------------------------------------------
# The worker (run as a script, without the interpreter).


def _worker() -> dict:
    import torch

    import diffkern
    from diffkern import backends
    from triton.runtime.jit import JITFunction

    from diffkern.triton import _compile_only, add_noise, ddim, ddpm, flow_match
    from diffkern.triton.group_norm_silu import _forward

    kernels = {value.fn.__name__: value for module in (add_noise, ddim, ddpm, flow_match, _forward)
               for value in vars(module).values() if isinstance(value, JITFunction)}
    ops = ("ddim_step", "ddpm_step", "add_noise", "flow_match_step", "flow_add_noise", "group_norm_silu")
    backends._triton_status = lambda device_type: backends.BackendStatus(True, "compile-only (test)")
    backends.clear_cache()
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}", file=sys.stderr)
    gen = torch.Generator().manual_seed(seed)
    table = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012)).float()
    shape = (2, 4, 6, 5)

    def tensor(aligned: bool, batch=2, dtype=torch.float32):
        n = batch * 120
        storage = torch.randn(n + 1, generator=gen).to(dtype)
        flat = storage[:n] if aligned else storage[1:]   # one element in: 4-byte aligned, not 16
        return flat.view((batch,) + shape[1:])

    def calls(op):
        """Calls of one signature (same shapes, strides, dtypes) varying what a call may vary."""
        # The last two calls are float16: another plan with the same grid, which must not reuse a float32 runner.
        for step, aligned in enumerate((True, True, False, False, True, False, True, True, True, True)):
            dtype = torch.float16 if step >= 8 else torch.float32
            x, eps, noise = tensor(aligned, dtype=dtype), tensor(True, dtype=dtype), tensor(not aligned, dtype=dtype)
            if op == "ddim_step":
                yield lambda: diffkern.ddim_step(eps, 500 - step, x, table, prev_timestep=480 - step, eta=0.5,
                                                 noise=noise, backend="triton")
            elif op == "ddpm_step":
                t = 0 if step in (6, 7) else 500 - step   # no noise at t = 0: another specialisation
                yield lambda: diffkern.ddpm_step(eps, t, x, table, prev_timestep=-1 if t == 0 else t - 20,
                                                 noise=noise if t else None, backend="triton")
            elif op == "add_noise":
                yield lambda: diffkern.add_noise(x, noise, 500 - step, table, backend="triton")
            elif op == "group_norm_silu":
                weight, bias = tensor(True)[0, :, 0, 0], (None if step >= 6 else tensor(not aligned)[0, :, 0, 0])
                yield lambda: diffkern.group_norm_silu(x, 2, weight, bias, backend="triton")
            elif op == "flow_match_step":
                guided = tensor(aligned, batch=4, dtype=dtype)
                yield lambda: diffkern.flow_match_step(guided, x, 0.95 - step / 12, 0.9 - step / 12,
                                                       guidance_scale=4.0, backend="triton")
            else:
                yield lambda: diffkern.flow_add_noise(x, noise, 0.1 * step, backend="triton")

    report = {}
    log = []
    used_options = {}  # compiled kernel -> the options its launch through Triton passed (a runner gets none)
    with _compile_only.compile_only(90), _compile_only.launches_recorded(log):
        for op in ops:
            counts = {"direct": 0, "through_triton": 0}
            for call in calls(op):
                del log[:]
                call()
                assert log, f"{op}: no launch"
                for path, _, used, args, options in list(log):
                    options = options or used_options[used.hash]
                    used_options[used.hash] = options
                    expected = kernels[used.name].run(*args, grid=(1,), warmup=True, **options)
                    assert used.hash == expected.hash, f"{op}: the launch ran {used.hash}, Triton picks {expected.hash}"
                    counts["direct" if path == "direct" else "through_triton"] += 1
            report[op] = counts
    return report


def _bench_worker() -> dict:
    from diffkern import host_bench

    return {r.name: r.median_us for r in host_bench.measure_triton_launch_path()}


if __name__ == "__main__":
    print(json.dumps(_worker() if sys.argv[1] == "direct" else _bench_worker()))
