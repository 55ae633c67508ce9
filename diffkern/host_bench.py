"""``python -m diffkern bench --host``: what a call costs on the host, before and around its kernel.

At latent sizes a step's kernel runs in a few microseconds, so the eager call path in front of it (checks,
dispatch, launch setup) is the latency a user sees. This measures it on any machine, GPU or not:

- **host cost per call** of each public op on each backend, on tiny CPU tensors. For the ``triton`` and
  ``cuda`` backends the device work is replaced by a no-op through :func:`device_work_skipped` (below), so the
  figure is everything the call does except the kernel itself; the ``reference`` backend runs for real (it is
  what CPU users run). Beside them, in the same run: a bare aten op (``torch.add`` of the same tensors),
  diffusers' own ``step``/``add_noise`` and the plain PyTorch formula of each op, with the ratios the targets
  are stated in (README: "What a call costs").
- **the reference at working sizes** (SD 1.5 latents (2, 4, 64, 64), a UNet GroupNorm (2, 320, 32, 32)) against
  diffusers and the plain formula.
- on a GPU, also the **real end-to-end latency per call** at SD 1.5 and SDXL latent sizes (fp32/fp16/bf16):
  back-to-back eager calls, synchronised once, against diffusers' guidance + ``step`` and the eager PyTorch
  formula.

Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` (median over blocks of back-to-back calls; on a GPU
the statement synchronises at the end of each block of calls it times, see :func:`_timer`). On the CPU the
entries are measured in interleaved rounds (every entry once per round, ``ROUNDS`` rounds) and each figure is the
median of its rounds: a machine that slows down for a second (another process, a frequency change) then shifts
one round of every entry instead of every round of a few. A ratio is the median of the per-round ratios, so such
a slow round cancels in it.

The seam. :func:`device_work_skipped` is a context manager for this benchmark only: no public function enters
it, and outside it nothing is patched. Inside it the CUDA extension's ops are replaced by their fake kernels
(which allocate the outputs and return them: the launch itself is the only thing missing), every Triton kernel's
``kernel[grid](...)`` launch does nothing, and both backends report themselves available on CPU tensors. What
is then measured is exactly the host path a real call takes up to the launch, including output allocation.
What it leaves out is the launch call itself (a C++ op call through torch's dispatcher for ``cuda``, Triton's
launcher for ``triton``), which only a GPU measures: the GPU part of this benchmark does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
import statistics
import sys
import types
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import diffkern
from diffkern import backends

# The targets of the hot-path work, checked and printed by the CPU part (ratios within one run).
TARGET_VS_ADD = 6.0           # fast-backend host cost <= 6x a bare torch.add
TARGET_VS_DIFFUSERS = 1 / 8   # ... and <= 1/8 of diffusers' DDIM step
TARGET_REFERENCE_STEP = 1.0   # reference step <= diffusers' step on the same tensors
TARGET_REFERENCE_FORMULA = 1.3  # reference add_noise / group_norm_silu <= 1.3x the plain PyTorch formula
# ... and by the GPU part: the guided DDIM step at SD 1.5 latents >= 10x faster per call than diffusers' guidance +
# step in eager mode, i.e. diffkern / diffusers <= 1/10.
TARGET_GPU_VS_DIFFUSERS = 1 / 10


# ----------------------------------------------------------------------------------------------------------
# The seam.


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return _no_launch


def _no_launch(*args, **kwargs) -> None:
    return None


class _FakeOp:
    """Stands in for a CUDA extension op (``torch.ops.diffkern.<name>`` and its ``.default`` overload): calls
    the op's fake kernel, which allocates the outputs."""

    def __init__(self, fake):
        self.default = fake

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)


def _triton_modules() -> Iterator[types.ModuleType]:
    package = importlib.import_module("diffkern.triton")
    yield package
    for info in pkgutil.walk_packages(package.__path__, "diffkern.triton."):
        yield importlib.import_module(info.name)


@contextlib.contextmanager
def device_work_skipped() -> Iterator[None]:
    """Benchmark-only (see the module docstring): the ``triton`` and ``cuda`` backends run their whole host path
    on CPU tensors with every kernel launch replaced by nothing. Restores everything on exit."""
    import triton

    from diffkern import _cuda_ops
    from diffkern.ops import _declaration

    patched: List[Tuple[object, str, object]] = []

    def patch(owner, name, value):
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    fakes = types.SimpleNamespace(**{op.name: _FakeOp(op.fake) for op in _declaration.cuda_ops()})
    patch(_cuda_ops, "_ops", lambda: fakes)
    for module in _triton_modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.JITFunction):
                patch(module, name, _NoLaunch(value))
    backends.clear_cache()
    for backend in ("triton", "cuda"):
        backends._status_cache[(backend, "cpu")] = backends.BackendStatus(True, "device work skipped (host bench)")
    try:
        yield
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)
        backends.clear_cache()


# ----------------------------------------------------------------------------------------------------------
# Measuring.


@dataclass
class HostResult:
    group: str     # what is compared with what (one line of the table per group)
    name: str      # the callable
    median_us: float
    rounds_us: Tuple[float, ...] = ()  # the CPU measurement's figure of each interleaved round, in order


def _timer(fn: Callable[[], object]) -> float:
    """Median µs per call of ``fn`` on a GPU (``torch.utils.benchmark``), synchronising after each block."""
    # One call per statement would time the sync; ten back-to-back calls per statement amortise it.
    def run_ten():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    measurement = benchmark.Timer(stmt="run()", globals={"run": run_ten}).blocked_autorange(min_run_time=0.3)
    return measurement.median * 1e6 / 10


def _diffusers():
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _step_inputs(shape, dtype, device, generator):
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    eps = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return x, eps


def _host_cases(shape=(2, 4, 8, 8), gn_shape=(2, 64, 4, 4), groups=32) -> Dict[str, Dict[str, Callable]]:
    """group -> {name: callable} on tiny CPU tensors."""
    g = torch.Generator().manual_seed(0)
    x, eps = _step_inputs(shape, torch.float32, "cpu", g)
    eps2 = torch.cat([eps, eps.flip(0)])
    noise = torch.randn(shape, generator=g)
    abar = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012)).float()
    t, t_prev = 500, 480
    gx = torch.randn(gn_shape, generator=g)
    weight, bias = torch.randn(gn_shape[1], generator=g), torch.randn(gn_shape[1], generator=g)
    cases: Dict[str, Dict[str, Callable]] = {"bare aten op": {"torch.add": lambda: torch.add(x, eps)}}

    def per_backend(op, call):
        return {f"diffkern {op} [{b}]": (lambda b=b: call(b)) for b in backends.BACKENDS}

    cases["ddim_step"] = per_backend("ddim_step", lambda b: diffkern.ddim_step(
        eps, t, x, abar, prev_timestep=t_prev, backend=b))
    cases["ddim_step + guidance"] = per_backend("ddim_step", lambda b: diffkern.ddim_step(
        eps2, t, x, abar, prev_timestep=t_prev, guidance_scale=7.5, backend=b))
    cases["ddpm_step"] = per_backend("ddpm_step", lambda b: diffkern.ddpm_step(
        eps, t, x, abar, prev_timestep=t_prev, noise=noise, backend=b))
    cases["add_noise"] = per_backend("add_noise", lambda b: diffkern.add_noise(x, noise, t, abar, backend=b))
    cases["group_norm_silu"] = per_backend("group_norm_silu", lambda b: diffkern.group_norm_silu(
        gx, groups, weight, bias, backend=b))
    # Flow matching: host sigmas as a scheduler's CPU ``sigmas`` yields them (0-d float32 CPU tensors).
    sigmas = torch.linspace(1.0, 0.0, 51)[10:12]
    sigma, sigma_next = sigmas[0], sigmas[1]
    cases["flow_match_step"] = per_backend("flow_match_step", lambda b: diffkern.flow_match_step(
        eps, x, sigma, sigma_next, backend=b))
    cases["flow_add_noise"] = per_backend("flow_add_noise", lambda b: diffkern.flow_add_noise(
        x, noise, sigma, backend=b))

    cases["add_noise"]["PyTorch formula"] = lambda: abar[t] ** 0.5 * x + (1 - abar[t]) ** 0.5 * noise
    cases["group_norm_silu"]["PyTorch formula"] = lambda: F.silu(F.group_norm(gx, groups, weight, bias))
    cases["flow_add_noise"]["PyTorch formula"] = lambda: sigma * noise + (1 - sigma) * x
    diffusers = _diffusers()
    if diffusers is not None:
        ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
        ddim.set_timesteps(50)
        ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
        ddpm.set_timesteps(50)
        timesteps = torch.tensor([t])
        cases["ddim_step"]["diffusers DDIMScheduler.step"] = lambda: ddim.step(eps, t, x)
        cases["ddim_step + guidance"]["diffusers guidance + step"] = lambda: ddim.step(
            eps2[:2] + 7.5 * (eps2[2:] - eps2[:2]), t, x)
        cases["ddpm_step"]["diffusers DDPMScheduler.step"] = lambda: ddpm.step(eps, t, x, generator=g)
        cases["add_noise"]["diffusers add_noise"] = lambda: ddim.add_noise(x, noise, timesteps)
        flow = diffusers.FlowMatchEulerDiscreteScheduler()
        flow.set_timesteps(50)

        def flow_step():
            flow._step_index = 10  # (an attribute store: what the scheduler's own step does between calls)
            return flow.step(eps, flow.timesteps[10], x)
        cases["flow_match_step"]["diffusers FlowMatchEulerDiscreteScheduler.step"] = flow_step
    return cases


def _working_size_cases() -> Dict[str, Dict[str, Callable]]:
    """The reference against diffusers and the formula at working sizes, on the CPU."""
    cases = _host_cases(shape=(2, 4, 64, 64), gn_shape=(2, 320, 32, 32))
    keep = {}
    for group, entries in cases.items():
        if group == "bare aten op":
            continue
        keep[group] = {name: fn for name, fn in entries.items() if not name.endswith(("[triton]", "[cuda]"))}
    return keep


def _gpu_cases(device: torch.device) -> Dict[str, Dict[str, Callable]]:
    """Real eager latency per call at SD 1.5 / SDXL latents: diffkern's DDIM step with guidance on each GPU
    backend against diffusers' guidance + step and the eager PyTorch formula."""
    cases: Dict[str, Dict[str, Callable]] = {}
    abar = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012)).float().to(device)
    diffusers = _diffusers()
    t, t_prev = 500, 480
    for label, shape in (("SD 1.5", (2, 4, 64, 64)), ("SDXL", (2, 4, 128, 128))):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x, eps = _step_inputs(shape, dtype, device, g)
            eps2 = torch.cat([eps, eps.flip(0)])
            group = f"ddim_step + guidance {label} {tuple(shape)} {str(dtype).replace('torch.', '')}"
            entries = {f"diffkern [{b}]": (lambda b=b, x=x, eps2=eps2: diffkern.ddim_step(
                eps2, t, x, abar, prev_timestep=t_prev, guidance_scale=7.5, backend=b))
                for b in ("triton", "cuda") if backends.backend_status(b, "cuda").available}
            a, a_prev = abar[t], abar[t_prev]

            def eager(x=x, eps2=eps2, a=a, a_prev=a_prev):
                e = eps2[:2] + 7.5 * (eps2[2:] - eps2[:2])
                x0 = (x - (1 - a) ** 0.5 * e) / a ** 0.5
                return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e
            entries["eager PyTorch"] = eager
            if diffusers is not None:
                ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                               clip_sample=False)
                ddim.set_timesteps(50)
                ddim.alphas_cumprod = ddim.alphas_cumprod.to(device)
                entries["diffusers guidance + step"] = (lambda ddim=ddim, x=x, eps2=eps2: ddim.step(
                    eps2[:2] + 7.5 * (eps2[2:] - eps2[:2]), t, x))
            cases[group] = entries
    cases.update(_sampling_loop_cases(device, abar))
    return cases


LOOP_STEPS = 50


def _sampling_loop_cases(device: torch.device, abar: torch.Tensor) -> Dict[str, Dict[str, Callable]]:
    """The per-step overhead of a whole sampling loop: 50 guided DDIM steps at SD 1.5 latents in fp16 with an
    identity model (so a loop is its steps and their host path), ``diffkern.sample`` eager and, on CUDA,
    ``capture=True`` (graph capture included: one call is one loop as a user runs it), against diffusers' guidance +
    ``step`` loop. Per step = the entry / ``LOOP_STEPS``. (On the CPU only diffusers' loop, as the other GPU cases.)"""
    diffusers = _diffusers()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((2, 4, 64, 64), generator=g).to(device=device, dtype=torch.float16)
    timesteps = torch.arange(999, 0, -1000 // LOOP_STEPS)[:LOOP_STEPS].to(device)

    def model_fn(x, t):
        return x

    entries: Dict[str, Callable] = {}
    for b in ("triton", "cuda"):
        if device.type == "cuda" and backends.backend_status(b, "cuda").available:
            for capture in (False, True):
                entries[f"diffkern.sample [{b}] {'capture=True' if capture else 'eager'}"] = (
                    lambda b=b, capture=capture: diffkern.sample(model_fn, x_T, abar, timesteps, guidance_scale=7.5,
                                                                 capture=capture, backend=b))
    if diffusers is not None:
        ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
        ddim.set_timesteps(LOOP_STEPS, device=device)
        ddim.alphas_cumprod = ddim.alphas_cumprod.to(device)

        def diffusers_loop():
            x = x_T
            for t in ddim.timesteps:
                out = model_fn(torch.cat([x, x]), t)
                x = ddim.step(out[:2] + 7.5 * (out[2:] - out[:2]), t, x).prev_sample
            return x
        entries["diffusers guidance + step loop"] = diffusers_loop
    return {f"sampling loop, {LOOP_STEPS} guided DDIM steps, SD 1.5 (2, 4, 64, 64) float16": entries}


# Interleaved rounds of the CPU measurement (see the module docstring) and each round's time per entry.
ROUNDS = 7
ROUND_TIME_S = 0.05


def _measure_groups(cases: Dict[str, Dict[str, Callable]], synchronize: bool) -> List[HostResult]:
    entries = [(group, name, fn) for group, by_name in cases.items() for name, fn in by_name.items()]
    with torch.no_grad():
        for _, _, fn in entries:
            fn()  # first call: imports, checks, plan
        if synchronize:
            return [HostResult(group, name, _timer(fn)) for group, name, fn in entries]
        rounds: List[List[float]] = [[] for _ in entries]
        for _ in range(ROUNDS):
            for times, (_, _, fn) in zip(rounds, entries):
                measurement = benchmark.Timer(stmt="run()", globals={"run": fn}).blocked_autorange(
                    min_run_time=ROUND_TIME_S)
                times.append(measurement.median * 1e6)
    return [HostResult(group, name, statistics.median(times), tuple(times))
            for (group, name, _), times in zip(entries, rounds)]


# ----------------------------------------------------------------------------------------------------------
# Triton's own launch path, which the seam leaves out.

LAUNCH_PATH_GROUP = "triton launch path (compile-only driver, no driver launch)"
LAUNCH_PATH_OPS = ("ddim_step", "ddpm_step", "add_noise", "group_norm_silu", "flow_match_step", "flow_add_noise")
LAUNCH_PATH_ARCH = 90


def measure_triton_launch_path() -> List[HostResult]:
    """What the seam leaves out on the triton backend, as far as a CPU can run it: the host work of the launch
    itself. With Triton's driver replaced by a compile-only one for sm_90 and every launch turned into a compile
    that returns (``diffkern.triton._compile_only.launches_recorded``), each op's tiny-tensor call (``_host_cases``)
    runs twice: the first call launches through ``JITFunction.run`` (which compiles) and the second through the
    compiled kernel's runner (``DirectLauncher``), a no-op here. Measured per op:

    - ``Triton JITFunction.run [op]``: Triton's own per-call launch path on a warm cache (argument binding,
      specialisation, the compiled-kernel lookup), what ``kernel[grid](...)`` costs before the driver is called;
    - ``diffkern op [triton], direct launch``: the whole public call as it runs once its specialisation has
      launched: checks from the plan, outputs, the launcher's specialisation key, the runner call (``through
      Triton`` instead for a launch that has no ``DirectLauncher``: ``JITFunction.run`` every call).

    Neither includes the body of Triton's runner (the stream lookup, the compiled launcher, ``cuLaunchKernel``),
    which only a GPU runs. Empty under the interpreter (``TRITON_INTERPRET=1``), which has no compiled path."""
    import collections
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return []
    from triton.runtime.jit import JITFunction

    from diffkern.triton import _compile_only

    cases = _host_cases()
    calls = {op: cases[op][f"diffkern {op} [triton]"] for op in LAUNCH_PATH_OPS}
    jit_launches: Dict[str, list] = {}
    paths: Dict[str, str] = {}  # how each op's second call launched (a launch without a DirectLauncher: Triton)
    log: list = []
    with _compile_only.compile_only(LAUNCH_PATH_ARCH):
        backends.clear_cache()  # (drops the plans bound under the seam, and their launchers)
        backends._status_cache[("triton", "cpu")] = backends.BackendStatus(True, "compile-only (host bench)")
        try:
            with _compile_only.launches_recorded(log):
                for op, call in calls.items():
                    del log[:]
                    call()  # through Triton (it compiles)
                    jit_launches[op] = list(log)
                    call()  # direct where the launch has a DirectLauncher
                    paths[op] = "direct launch" if log[-1][0] == "direct" else "through Triton"

            def jit_runs(launches, run=JITFunction.run):
                def runs():
                    for _, kernel, _, args, kwargs in launches:
                        run(kernel, *args, grid=(1,), warmup=True, **kwargs)
                return runs
            entries = {f"Triton JITFunction.run [{op}]": jit_runs(jit_launches[op]) for op in LAUNCH_PATH_OPS}
            results = _measure_groups({LAUNCH_PATH_GROUP: entries}, synchronize=False)
            # (The recording runner keeps only the last launch: the timed calls' outputs are freed.)
            with _compile_only.launches_recorded(collections.deque(maxlen=1)):
                direct = {f"diffkern {op} [triton], {paths[op]}": call for op, call in calls.items()}
                # torch.add again, in these rounds: the ratios are then per round, as the seam's.
                direct["torch.add"] = cases["bare aten op"]["torch.add"]
                results += _measure_groups({LAUNCH_PATH_GROUP: direct}, synchronize=False)
            return results
        finally:
            backends.clear_cache()


def measure_host(*, working_sizes: bool = True) -> List[HostResult]:
    """The CPU part: host cost per call (fast backends through :func:`device_work_skipped`), Triton's own launch
    path (:func:`measure_triton_launch_path`) and the reference."""
    results = []
    with device_work_skipped():
        results += _measure_groups(_host_cases(), synchronize=False)
    results += measure_triton_launch_path()
    if working_sizes:
        for r in _measure_groups(_working_size_cases(), synchronize=False):
            results.append(dataclasses.replace(r, group=r.group + " (working size)"))
    return results


# ----------------------------------------------------------------------------------------------------------
# Reporting.


def _by_group(results: List[HostResult]) -> Dict[str, Dict[str, HostResult]]:
    table: Dict[str, Dict[str, HostResult]] = {}
    for r in results:
        table.setdefault(r.group, {})[r.name] = r
    return table


def _ratio(ours: HostResult, base: HostResult) -> float:
    """ours / base: the median of the per-round ratios when both were measured in the same interleaved rounds
    (a slow second of the machine then cancels in its round), else the ratio of the medians."""
    if ours.rounds_us and len(ours.rounds_us) == len(base.rounds_us):
        return statistics.median(a / b for a, b in zip(ours.rounds_us, base.rounds_us))
    return ours.median_us / base.median_us


def target_checks(results: List[HostResult]) -> List[Tuple[str, float, float, bool]]:
    """(what, measured ratio, target, met) for every stated target the results cover."""
    table = _by_group(results)
    add = table.get("bare aten op", {}).get("torch.add")
    diffusers_ddim = table.get("ddim_step", {}).get("diffusers DDIMScheduler.step")
    checks = []
    for group in ("ddim_step", "ddpm_step", "add_noise", "group_norm_silu", "flow_match_step", "flow_add_noise"):
        for backend in ("triton", "cuda"):
            name = f"diffkern {group} [{backend}]"
            ours = table.get(group, {}).get(name)
            if ours is None:
                continue
            for what, base, target in (("torch.add", add, TARGET_VS_ADD),
                                       ("diffusers DDIM step", diffusers_ddim, TARGET_VS_DIFFUSERS)):
                if base is not None:
                    ratio = _ratio(ours, base)
                    checks.append((f"{name} host / {what}", ratio, target, ratio <= target))
    launch_path = table.get(LAUNCH_PATH_GROUP, {})
    for group in LAUNCH_PATH_OPS:
        name = next((n for n in launch_path if n.startswith(f"diffkern {group} [triton], ")), None)
        ours, launch_add = launch_path.get(name), launch_path.get("torch.add")
        if ours is not None and launch_add is not None:
            ratio = _ratio(ours, launch_add)
            checks.append((f"{name} (no runner body) / torch.add", ratio, TARGET_VS_ADD, ratio <= TARGET_VS_ADD))
    for suffix in ("", " (working size)"):
        for group, baseline, target in (("ddim_step", "diffusers DDIMScheduler.step", TARGET_REFERENCE_STEP),
                                        ("ddpm_step", "diffusers DDPMScheduler.step", TARGET_REFERENCE_STEP),
                                        ("flow_match_step", "diffusers FlowMatchEulerDiscreteScheduler.step",
                                         TARGET_REFERENCE_STEP),
                                        ("flow_add_noise", "PyTorch formula", TARGET_REFERENCE_FORMULA),
                                        ("add_noise", "PyTorch formula", TARGET_REFERENCE_FORMULA),
                                        ("group_norm_silu", "PyTorch formula", TARGET_REFERENCE_FORMULA)):
            entries = table.get(group + suffix, {})
            ours, theirs = entries.get(f"diffkern {group} [reference]"), entries.get(baseline)
            if ours is not None and theirs is not None:
                ratio = _ratio(ours, theirs)
                checks.append((f"reference {group}{suffix} / {baseline}", ratio, target, ratio <= target))
    return checks


def gpu_target_checks(results: List[HostResult]) -> List[Tuple[str, float, float, bool]]:
    """``target_checks`` of the GPU part: per SD 1.5 dtype and backend, diffkern's guided DDIM step / diffusers'
    guidance + step (eager latency per call), and per backend the 50-step loop's time per step / diffusers' loop's
    (reported beside, with no target of its own: the issue asks for the overhead per step, measured)."""
    checks = []
    for group, entries in _by_group(results).items():
        if group.startswith("ddim_step + guidance SD 1.5"):
            theirs = entries.get("diffusers guidance + step")
            for name, ours in entries.items():
                if name.startswith("diffkern") and theirs is not None:
                    ratio = _ratio(ours, theirs)
                    checks.append((f"{group}: {name} / diffusers guidance + step", ratio, TARGET_GPU_VS_DIFFUSERS,
                                   ratio <= TARGET_GPU_VS_DIFFUSERS))
        elif group.startswith("sampling loop"):
            theirs = entries.get("diffusers guidance + step loop")
            for name, ours in entries.items():
                if name.startswith("diffkern.sample") and theirs is not None:
                    ratio = _ratio(ours, theirs)
                    checks.append((f"{name} per step ({ours.median_us / LOOP_STEPS:.1f} µs) / diffusers loop's "
                                   f"({theirs.median_us / LOOP_STEPS:.1f} µs)", ratio, 1.0, ratio <= 1.0))
    return checks


def format_results(results: List[HostResult], title: str) -> str:
    lines = [title]
    for group, entries in _by_group(results).items():
        lines.append(f"  {group}")
        per_step = group.startswith("sampling loop")  # (_sampling_loop_cases: one entry is a whole loop)
        for name, r in entries.items():
            lines.append(f"    {name:<44} {r.median_us:9.2f} µs"
                         + (f"  ({r.median_us / LOOP_STEPS:.2f} µs per step)" if per_step else ""))
    return "\n".join(lines)


def format_checks(checks) -> str:
    lines = ["targets (ratios measured in this run):"]
    for what, ratio, target, met in checks:
        lines.append(f"  {'met ' if met else 'MISS'}  {what:<66} {ratio:6.3f}  (target <= {target:.3g})")
    return "\n".join(lines)


def main(device: Optional[torch.device] = None, *, working_sizes: bool = True) -> int:
    """Prints the host tables (and on a CUDA device the real latency table); returns 0."""
    print(f"diffkern bench --host; torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"{torch.get_num_threads()} torch threads")
    results = measure_host(working_sizes=working_sizes)
    print(format_results(results, "host cost per call (µs, median; triton/cuda: device work skipped)"))
    print(format_checks(target_checks(results)))
    if device is not None and device.type == "cuda":
        gpu = _measure_groups(_gpu_cases(device), synchronize=True)
        print(format_results(gpu, f"eager latency per call on {torch.cuda.get_device_name(device)} (µs, median)"))
        print(format_checks(gpu_target_checks(gpu)))
    return 0
