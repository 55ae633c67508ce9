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


def _run_worker(mode: str, **environment: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(environment)
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
def test_direct_launches_can_be_turned_off():
    """``DIFFKERN_TRITON_DIRECT_LAUNCH=0``: every launch goes through Triton."""
    report = _run_worker("direct", DIFFKERN_TRITON_DIRECT_LAUNCH="0")
    for op, counts in report.items():
        assert counts["direct"] == 0 and counts["through_triton"] >= 10, (op, counts)


@NO_TRITON
def test_bench_host_measures_the_triton_launch_path():
    """``host_bench.measure_triton_launch_path`` (which the interpreter runs of ``bench --host`` leave out): Triton's
    ``JITFunction.run`` per op, and each public call once its launch goes direct."""
    figures = _run_worker("bench")
    print(figures)
    for op in ("ddim_step", "ddpm_step", "add_noise", "flow_match_step", "flow_add_noise", "group_norm_silu"):
        assert figures[f"Triton JITFunction.run [{op}]"] > 0
        assert figures[f"diffkern {op} [triton], direct launch"] > 0


def test_a_launcher_serves_one_device():
    """A compiled kernel's runner holds the function loaded on one device: launchers are not shared across devices."""
    import torch

    from diffkern.triton import _common as K
    from diffkern.triton.add_noise import _add_noise_kernel

    options = dict(num_warps=4, **K.LAUNCH_OPTIONS)
    first = K.direct_launcher(_add_noise_kernel, (4, 1), options, (torch.float16,), torch.device("cuda", 0))
    assert K.direct_launcher(_add_noise_kernel, (4, 1), options, (torch.float16,), torch.device("cuda", 0)) is first
    assert K.direct_launcher(_add_noise_kernel, (4, 1), options, (torch.float16,), torch.device("cuda", 1)) \
        is not first


# ------------------------------------------------------------------------------------------------------------
# On a GPU: the runner's launch itself, in this process (no interpreter there).

ON_GPU_WITH_TRITON = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1"
    or not __import__("torch").cuda.is_available(),
    reason="a direct launch runs Triton's compiled launcher: needs a GPU and triton without the interpreter")

GPU_CASES = ("ddim_step", "ddpm_step", "add_noise", "flow_match_step", "flow_add_noise", "group_norm_silu-group",
             "group_norm_silu-split")


def _gpu_call(case: str, gen, dtype):
    """``(inputs -> output)`` and a draw of fresh inputs, for one case on the GPU."""
    import torch

    import diffkern

    table = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012)).float().cuda()
    shape = (2, 4, 64, 64)

    def draw(*size):
        return torch.randn(size, generator=gen, device="cuda").to(dtype)

    if case.startswith("group_norm_silu"):
        # (The planner's regimes at these shapes: one program per group at a small group, chunks of the group at
        # N = 1 with a large one; the test asserts which ran.)
        size = (2, 64, 8, 8) if case.endswith("group") else (1, 320, 64, 64)
        channels = size[1]
        weight, bias = draw(channels), draw(channels)
        return (lambda x: diffkern.group_norm_silu(x, 32, weight, bias, backend="triton")), (lambda: (draw(*size),))
    if case == "ddim_step":
        return (lambda eps, x: diffkern.ddim_step(eps, 501, x, table, prev_timestep=481, guidance_scale=7.5,
                                                  backend="triton")[0]), \
            (lambda: (draw(4, *shape[1:]), draw(*shape)))
    if case == "ddpm_step":
        return (lambda eps, x, noise: diffkern.ddpm_step(eps, 501, x, table, prev_timestep=481, noise=noise,
                                                         backend="triton")[0]), \
            (lambda: (draw(*shape), draw(*shape), draw(*shape)))
    if case == "add_noise":
        return (lambda x, noise: diffkern.add_noise(x, noise, 501, table, backend="triton")), \
            (lambda: (draw(*shape), draw(*shape)))
    if case == "flow_match_step":
        return (lambda v, x: diffkern.flow_match_step(v, x, 0.8, 0.78, guidance_scale=4.0, backend="triton")[0]), \
            (lambda: (draw(4, *shape[1:]), draw(*shape)))
    return (lambda x, noise: diffkern.flow_add_noise(x, noise, 0.8, backend="triton")), \
        (lambda: (draw(*shape), draw(*shape)))


def _count_runs(runs: list) -> None:
    """Every kept runner appends to ``runs`` when it launches."""
    from diffkern.triton import _common as K

    for launcher in K._direct_launchers.values():
        for key, runner in list(launcher._runners.items()):
            launcher._runners[key] = lambda *args, _runner=runner: (runs.append(1), _runner(*args))


@ON_GPU_WITH_TRITON
@pytest.mark.parametrize("dtype", ("float16", "float32"))
@pytest.mark.parametrize("case", GPU_CASES)
def test_direct_launches_on_the_gpu_compute_what_launches_through_triton_compute(case, dtype):
    """The second call of a signature runs the compiled kernel's runner (counted); its output is bit-equal to the
    same inputs' launch through ``JITFunction.run``; and captured in a CUDA graph (the runner takes the current
    stream: a launch on any other would not be captured) its replay computes the same again."""
    import torch

    from diffkern import backends
    from diffkern.ops import _common as C
    from diffkern.triton import _common as K

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    call, draw = _gpu_call(case, gen, getattr(torch, dtype))
    K._direct_launchers.clear()
    C.clear_plans()
    call(*draw())   # through Triton: compiles, and keeps the runner
    assert backends.last_backend(case.split("-")[0]) == "triton"
    direct_runs = []
    _count_runs(direct_runs)
    assert direct_runs == [] and K._direct_launchers, "no direct launcher was made"
    inputs = draw()
    direct = call(*inputs)
    assert direct_runs, f"{case}: the second call of a signature did not launch directly"
    if case.startswith("group_norm_silu"):
        regimes = {key[0].fn.__name__ for key in K._direct_launchers}   # (kernel, grid, options, dtypes, device)
        assert (("fwd_group_kernel" in regimes) == case.endswith("group")), regimes

    K._direct_launchers.clear()
    C.clear_plans()
    through_triton = call(*inputs)
    assert torch.equal(direct, through_triton), f"{case}: the direct launch differs from Triton's"

    static_inputs = tuple(t.clone() for t in inputs)
    call(*static_inputs)   # (the runner, kept again)
    _count_runs(direct_runs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(*static_inputs)   # warm-up on the capture's stream (allocator pools), direct
    torch.cuda.current_stream().wait_stream(side)
    del direct_runs[:]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(*static_inputs)
    assert direct_runs, f"{case}: no direct launch in the capture"
    for target, source in zip(static_inputs, draw()):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    K._direct_launchers.clear()
    C.clear_plans()
    assert torch.equal(captured, call(*static_inputs)), f"{case}: the captured direct launch's replay differs"


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
