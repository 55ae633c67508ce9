"""The eager hot path (``diffkern/ops/_common.py``, "The eager hot path"): cached checks per call signature that
skip nothing a call's values could break, the direct backend call in eager mode, and the host benchmark's seam.

The ops' numerics are tested per op (tests/test_<op>.py); here only what the caching and the direct call change.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

import diffkern
from diffkern import backends, host_bench
from diffkern.ops import _common as C
from diffkern.ops import add_noise as add_noise_module
from diffkern.ops import ddim as ddim_module
from diffkern.ops import ddpm as ddpm_module
from diffkern.ops import flow_add_noise as flow_add_noise_module
from diffkern.ops import flow_match as flow_match_module
from diffkern.ops import group_norm_silu as gn_module

ABAR = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012)).float()


def _inputs(seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _ddim(eps, x, **kw):
    kw.setdefault("prev_timestep", 480)
    return diffkern.ddim_step(eps, kw.pop("timestep", 500), x, kw.pop("table", ABAR), backend="reference", **kw)


def test_a_repeated_call_is_served_from_its_plan():
    x, eps = _inputs()
    ddim_module._PLANS.clear()
    first = _ddim(eps, x)
    assert len(ddim_module._PLANS) == 1
    plan = next(iter(ddim_module._PLANS.values()))
    second = _ddim(eps, x)
    assert len(ddim_module._PLANS) == 1 and next(iter(ddim_module._PLANS.values())) is plan
    assert torch.equal(first.prev_sample, second.prev_sample)
    _ddim(eps, x, timestep=520, prev_timestep=500)   # another host timestep: another signature
    assert len(ddim_module._PLANS) == 2


@pytest.mark.parametrize("option, good, bad, error", [
    ("clip_sample", False, 0, TypeError),            # 0 == False, but not a bool
    ("eta", 0.0, False, TypeError),                  # False == 0.0, but not a float
    ("use_clipped_model_output", True, 1, TypeError),
    ("guidance_scale", None, float("nan"), ValueError),
    ("prediction_type", "epsilon", ["epsilon"], ValueError),   # unhashable: the full checks
])
def test_a_cached_signature_does_not_admit_an_equal_but_invalid_value(option, good, bad, error):
    x, eps = _inputs()
    model_output = torch.cat([eps, eps]) if option == "guidance_scale" else eps
    _ddim(model_output if good is not None else eps, x, **{option: good})
    _ddim(model_output if good is not None else eps, x, **{option: good})
    with pytest.raises(error, match=option):
        _ddim(model_output, x, **{option: bad})


def test_flow_steps_are_served_from_one_plan_per_signature():
    """A host sigma's value is not part of a flow op's key (a sampling loop shares one plan), but it is checked
    on every call; a CPU [B] sigma is never served from a plan."""
    x, v = _inputs()
    flow_match_module._PLANS.clear()
    flow_add_noise_module._PLANS.clear()
    for sigma, sigma_next in ((0.9, 0.8), (0.8, 0.7), (torch.tensor(0.7), torch.tensor(0.6, dtype=torch.float64))):
        diffkern.flow_match_step(v, x, sigma, sigma_next, backend="reference")
        diffkern.flow_add_noise(x, v, sigma, backend="reference")
    assert len(flow_match_module._PLANS) == 1 and len(flow_add_noise_module._PLANS) == 1
    for bad in (1.5, -0.0625, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_next"):
            diffkern.flow_match_step(v, x, 0.5, bad, backend="reference")
        with pytest.raises(ValueError, match="sigma"):
            diffkern.flow_add_noise(x, v, torch.tensor(bad), backend="reference")
    per_sample = torch.tensor([0.5, 0.25])
    diffkern.flow_add_noise(x, v, per_sample, backend="reference")
    per_sample[1] = 2.0
    with pytest.raises(ValueError, match="sigma"):
        diffkern.flow_add_noise(x, v, per_sample, backend="reference")


def test_a_host_sigma_reaches_the_reference_as_a_python_float(monkeypatch):
    """No fill kernel and no copy for a host sigma: the backends take it as a number rounded to the compute dtype
    (``_flow.kernel_sigma``; tests/test_flow_add_noise.py compares it with a tensor sigma on every backend)."""
    x, v = _inputs()
    seen = []
    reference = flow_add_noise_module.flow_add_noise_reference

    def spy(original_samples, noise, sigma):
        seen.append(sigma)
        return reference(original_samples, noise, sigma)

    flow_add_noise_module._PLANS.clear()
    monkeypatch.setattr(backends, "implementation", lambda backend, name: spy)
    diffkern.flow_add_noise(x, v, 0.3, backend="reference")
    diffkern.flow_add_noise(x, v, torch.tensor(0.3), backend="reference")
    assert seen == [C.round_float32(0.3), float(torch.tensor(0.3))] and all(type(s) is float for s in seen)
    flow_add_noise_module._PLANS.clear()


@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step", "flow_match_step"])
def test_a_cached_signature_does_not_admit_a_bad_generator(op):
    """The generator's type is part of the key: a call with an int for generator after one with a generator gets
    check_generator's TypeError, not a failure inside the noise draw."""
    x, eps = _inputs()

    def call(generator):
        if op == "flow_match_step":
            return diffkern.flow_match_step(eps, x, 0.5, 0.25, stochastic=True, generator=generator,
                                            backend="reference")
        step = getattr(diffkern, op)
        return step(eps, 500, x, ABAR, prev_timestep=480, generator=generator, backend="reference",
                    **({"eta": 1.0} if op == "ddim_step" else {}))

    call(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        call(3)


def test_host_timestep_values_are_checked_on_every_call():
    x, eps = _inputs()
    _ddim(eps, x, timestep=999)
    with pytest.raises(ValueError, match="timestep"):
        _ddim(eps, x, timestep=1000)
    # CPU [B] timesteps: values that change with the same signature are never served from a plan.
    per_sample = torch.tensor([500, 520])
    _ddim(eps, x, timestep=per_sample)
    per_sample[1] = 1000
    with pytest.raises(ValueError, match="timestep"):
        _ddim(eps, x, timestep=per_sample)


def test_a_modified_cpu_table_is_checked_again():
    x, eps = _inputs()
    table = ABAR.clone()
    _ddim(eps, x, table=table)
    _ddim(eps, x, table=table)
    table[500] = 1.0   # in place: a new version of the same tensor
    with pytest.raises(ValueError, match="alphas_cumprod is 1 at timestep 500"):
        _ddim(eps, x, table=table)
    table[500] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        _ddim(eps, x, table=table)


def test_a_cpu_scalar_timestep_is_a_host_value():
    x, eps = _inputs()
    assert torch.equal(_ddim(eps, x, timestep=torch.tensor(500)).prev_sample, _ddim(eps, x).prev_sample)
    with pytest.raises(TypeError, match="timestep"):
        _ddim(eps, x, timestep=torch.tensor(500.0))
    with pytest.raises(ValueError, match="timestep"):
        _ddim(eps, x, timestep=torch.tensor([[500]]))


def test_the_environment_still_decides_auto(monkeypatch):
    x, eps = _inputs()
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    diffkern.add_noise(x, eps, 500, ABAR)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        diffkern.add_noise(x, eps, 500, ABAR)


def _forbid(monkeypatch, module, name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} ran: an eager call without autograd must call the backend directly")
    monkeypatch.setattr(module, name, forbidden)


def test_eager_calls_skip_the_custom_op(monkeypatch):
    x, eps = _inputs()
    _forbid(monkeypatch, ddim_module, "_ddim_step_op")
    _forbid(monkeypatch, ddpm_module, "_ddpm_step_op")
    _forbid(monkeypatch, add_noise_module, "_add_noise_op")
    _forbid(monkeypatch, gn_module, "_group_norm_silu_fwd_op")
    _ddim(eps, x)
    diffkern.ddpm_step(eps, 500, x, ABAR, noise=eps, backend="reference")
    diffkern.add_noise(x, eps, 500, ABAR, backend="reference")
    weight = torch.randn(4, requires_grad=True)
    with torch.no_grad():   # parameters that require grad, but no autograd recording
        diffkern.group_norm_silu(x, 2, weight, backend="reference")


def test_inputs_that_require_grad_go_through_the_custom_op():
    x, eps = _inputs()
    eps.requires_grad_(True)
    out = _ddim(eps, x)
    out.prev_sample.sum().backward()
    assert eps.grad is not None and torch.isfinite(eps.grad).all()
    weight = torch.randn(4, requires_grad=True)
    diffkern.group_norm_silu(x, 2, weight, backend="reference").sum().backward()
    assert weight.grad is not None


def test_clear_cache_drops_the_plans():
    x, eps = _inputs()
    diffkern.add_noise(x, eps, 500, ABAR, backend="reference")
    assert add_noise_module._PLANS
    backends.clear_cache()
    assert not add_noise_module._PLANS


def test_plan_caches_are_bounded(monkeypatch):
    x, eps = _inputs()
    monkeypatch.setattr(C, "PLAN_CACHE_LIMIT", 3)
    add_noise_module._PLANS.clear()
    for t in range(10):
        diffkern.add_noise(x, eps, t, ABAR, backend="reference")
    assert len(add_noise_module._PLANS) <= 3


def test_the_host_seam_runs_the_fast_paths_and_restores_everything():
    x, eps = _inputs()
    with host_bench.device_work_skipped():
        for backend in ("triton", "cuda"):
            prev, x0 = _ddim_with(backend, eps, x)
            assert prev.shape == x.shape and diffkern.backends.last_backend("ddim_step") == backend
            y = diffkern.group_norm_silu(x, 2, backend=backend)
            assert y.shape == x.shape
    assert not backends.backend_status("cuda", "cpu").available
    from diffkern import _cuda_ops
    from diffkern.triton import ddim as triton_ddim
    assert not isinstance(triton_ddim._ddim_step_kernel, host_bench._NoLaunch)
    assert _cuda_ops._ops.__module__ == "diffkern._cuda_ops"


def _ddim_with(backend, eps, x):
    return diffkern.ddim_step(eps, 500, x, ABAR, prev_timestep=480, backend=backend)


def test_host_bench_reports_every_op_and_the_targets(capsys):
    results = host_bench.measure_host(working_sizes=False)
    names = {(r.group, r.name) for r in results}
    for op in ("ddim_step", "ddpm_step", "add_noise", "group_norm_silu"):
        for backend in backends.BACKENDS:
            assert (op, f"diffkern {op} [{backend}]") in names
    assert ("bare aten op", "torch.add") in names
    assert all(r.median_us > 0 for r in results)
    checks = host_bench.target_checks(results)
    assert any("host / torch.add" in what for what, *_ in checks)
    print(host_bench.format_checks(checks))
    assert "targets" in capsys.readouterr().out


def test_the_gpu_latency_cases_build_and_run_on_cpu_tensors():
    """The GPU part of ``bench --host`` only runs on a GPU; its cases (diffusers' guidance + step, the eager
    formula) are checked here on CPU tensors, where no diffkern GPU backend is available."""
    cases = host_bench._gpu_cases(torch.device("cpu"))
    assert len(cases) == 7
    loop = cases.pop(next(group for group in cases if group.startswith("sampling loop")))
    assert list(loop) == ["diffusers guidance + step loop"]
    loop["diffusers guidance + step loop"]()
    for entries in cases.values():
        assert "eager PyTorch" in entries and not any(name.startswith("diffkern") for name in entries)
        for fn in entries.values():
            fn()


def test_the_gpu_part_checks_its_targets():
    """The GPU part's checks (``gpu_target_checks``) on made-up latencies: a guided step 12x faster than diffusers'
    guidance + step meets the 10x target, one 8x faster misses it; a loop's per step is its time / 50 steps."""
    group = "ddim_step + guidance SD 1.5 (2, 4, 64, 64) float16"
    loop = "sampling loop, 50 guided DDIM steps, SD 1.5 (2, 4, 64, 64) float16"
    results = [host_bench.HostResult(group, "diffkern [cuda]", 10.0),
               host_bench.HostResult(group, "diffkern [triton]", 15.0),
               host_bench.HostResult(group, "diffusers guidance + step", 120.0),
               host_bench.HostResult("ddim_step + guidance SDXL (2, 4, 128, 128) float16", "diffkern [cuda]", 99.0),
               host_bench.HostResult(loop, "diffkern.sample [cuda] capture=True", 500.0),
               host_bench.HostResult(loop, "diffusers guidance + step loop", 6000.0)]
    checks = {what: (ratio, met) for what, ratio, _, met in host_bench.gpu_target_checks(results)}
    assert checks[f"{group}: diffkern [cuda] / diffusers guidance + step"] == (10.0 / 120.0, True)
    assert checks[f"{group}: diffkern [triton] / diffusers guidance + step"] == (15.0 / 120.0, False)
    assert checks["diffkern.sample [cuda] capture=True per step (10.0 µs) / diffusers loop's (120.0 µs)"] == \
        (500.0 / 6000.0, True)
    assert len(checks) == 3   # (SDXL has no target)


def test_a_host_timestep_reaches_the_reference_as_a_python_int(monkeypatch):
    """No fill kernel for a host timestep: the backends take it as a number (``_common.kernel_timesteps``;
    the op test files compare int and tensor timesteps bit for bit on every backend)."""
    x, eps = _inputs()
    seen = []
    reference = ddim_module.ddim_step_reference

    def spy(model_output, sample, noise, table, timestep, prev_timestep, **options):
        seen.append((timestep, prev_timestep))
        return reference(model_output, sample, noise, table, timestep, prev_timestep, **options)

    ddim_module._PLANS.clear()
    monkeypatch.setattr(backends, "implementation", lambda backend, name: spy)
    expected = _ddim(eps, x, timestep=torch.tensor([500, 500]), prev_timestep=torch.tensor([-1, -1]))
    got = _ddim(eps, x, timestep=torch.tensor(500), prev_timestep=-1)
    assert [type(t) for pair in seen for t in pair] == [torch.Tensor, torch.Tensor, int, int]
    assert torch.equal(expected.prev_sample, got.prev_sample)
    ddim_module._PLANS.clear()


# Each case: (op, the public call's keyword options, dtype). The bound launch of every binder against the backend's
# implementation with the plan's options, bit for bit (``_common.binds``' contract).
BOUND_CASES = [
    ("add_noise", {}, torch.float32),
    ("add_noise", {}, torch.float16),
    ("ddim_step", {}, torch.float32),
    ("ddim_step", {"eta": 0.7}, torch.float16),
    ("ddim_step", {"guidance_scale": 7.5, "prediction_type": "v_prediction"}, torch.float32),
    ("ddim_step", {"clip_sample": True, "clip_sample_range": 0.5, "use_clipped_model_output": True,
                   "prediction_type": "sample"}, torch.float32),
    ("ddpm_step", {}, torch.float32),
    ("ddpm_step", {"timestep": 0}, torch.float32),             # no noise at t = 0
    ("ddpm_step", {"variance_type": "learned_range", "guidance_scale": 3.0}, torch.float16),
    ("group_norm_silu", {}, torch.float32),
    ("group_norm_silu", {"channels_last": True, "affine": False}, torch.float16),
    ("flow_match_step", {}, torch.float32),
    ("flow_match_step", {"guidance_scale": 4.5}, torch.float16),
    ("flow_match_step", {"stochastic": True, "guidance_scale": 3.0, "guidance_rescale": 0.7}, torch.float32),
    ("flow_match_step", {"sigma_next": "tensor"}, torch.float32),   # one host sigma, one device tensor
    ("flow_add_noise", {}, torch.float32),
    ("flow_add_noise", {"sigma": "tensor"}, torch.bfloat16),
]


def _bound_case(op, options, dtype, device, gen):
    """(the backend's positional arguments, the public op's keyword arguments) of one case."""
    options = dict(options)
    shape = (3, 4, 6, 5)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    eps = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    table = ABAR.to(device)
    if op == "group_norm_silu":
        x = torch.randn((2, 8, 6, 5), generator=gen).to(device=device, dtype=dtype)
        if options.pop("channels_last", False):
            x = x.to(memory_format=torch.channels_last)
        weight = bias = None
        if options.pop("affine", True):
            weight, bias = (torch.randn(8, generator=gen).to(device) for _ in range(2))
        return (x, weight, bias, 4), dict(x=x, num_groups=4, weight=weight, bias=bias)
    if op.startswith("flow"):
        def sigma_of(name, value):  # a host sigma (float32-exact, as ``kernel_sigma`` makes it) or a [B] tensor
            return torch.full((shape[0],), value, device=device) if options.pop(name, None) == "tensor" else value
        sigma, sigma_next = sigma_of("sigma", 0.75), sigma_of("sigma_next", 0.5)
        if op == "flow_add_noise":
            return (x, eps, sigma), dict(original_samples=x, noise=eps, sigma=sigma)
        model_output = torch.randn((6 if "guidance_scale" in options else 3,) + shape[1:],
                                   generator=gen).to(device=device, dtype=dtype)
        noise = eps if options.get("stochastic") else None
        return (model_output, x, noise, sigma, sigma_next), dict(model_output=model_output, sample=x, sigma=sigma,
                                                                 sigma_next=sigma_next, noise=noise, **options)
    timestep = options.pop("timestep", 500)
    if op == "add_noise":
        return (x, eps, table, timestep), dict(original_samples=x, noise=eps, timesteps=timestep,
                                               alphas_cumprod=table)
    guided = "guidance_scale" in options
    channels = 8 if options.get("variance_type", "").startswith("learned") else 4
    model_output = torch.randn((6 if guided else 3, channels) + shape[2:], generator=gen).to(device=device,
                                                                                               dtype=dtype)
    noise = eps if op == "ddpm_step" and timestep > 0 or options.get("eta", 0) > 0 else None
    return (model_output, x, noise, table, timestep, 480), dict(model_output=model_output, timestep=timestep,
                                                                   sample=x, alphas_cumprod=table, noise=noise,
                                                                   prev_timestep=480, **options)


@pytest.mark.parametrize("op, options, dtype", BOUND_CASES,
                         ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(BOUND_CASES)])
def test_a_bound_launch_gives_what_the_implementation_gives(op, options, dtype, fast_backend, device, gen):
    module = {"add_noise": add_noise_module, "ddim_step": ddim_module, "ddpm_step": ddpm_module,
              "group_norm_silu": gn_module, "flow_match_step": flow_match_module,
              "flow_add_noise": flow_add_noise_module}[op]
    args, public = _bound_case(op, options, dtype, device, gen)
    module._PLANS.clear()
    getattr(diffkern, op)(backend=fast_backend, **public)
    assert backends.last_backend(op) == fast_backend
    entry = "group_norm_silu_forward" if op == "group_norm_silu" else op
    implementation = backends.implementation(fast_backend, entry)
    sigmas = args[3:] if op == "flow_match_step" else args[2:] if op == "flow_add_noise" else ()
    if any(isinstance(sigma, torch.Tensor) and sigma.is_cpu for sigma in sigmas):
        # A CPU [B] sigma is checked on every call, never cached (a device one is): its call bound the launch the
        # same way, from the same arguments (``backends.eager_launch``).
        assert not module._PLANS
        options = dict(guidance_scale=None, guidance_rescale=0.0, stochastic=False) if op == "flow_match_step" \
            else {}
        plan = types.SimpleNamespace(launch=C.bound_launch(implementation, args, options), options=options)
    else:
        (plan,) = module._PLANS.values()
    assert not isinstance(plan.launch, functools.partial), "the backend's binder did not specialise this call"
    if op == "group_norm_silu":
        bound, direct = plan.launch(*args, plan.eps), implementation(*args, plan.eps)
    elif op in ("add_noise", "flow_add_noise"):
        bound, direct = plan.launch(*args), implementation(*args)
    else:
        bound, direct = plan.launch(*args), implementation(*args, **plan.options)
    bound, direct = (bound,) if isinstance(bound, torch.Tensor) else bound, \
        (direct,) if isinstance(direct, torch.Tensor) else direct
    assert len(bound) == len(direct)
    for got, expected in zip(bound, direct):
        assert got.stride() == expected.stride() and torch.equal(got, expected)


def test_a_call_no_binder_specialises_runs_the_implementation(fast_backend, device, gen):
    """Dynamic thresholding (two launches and a selection) is not bound: the plan runs the implementation."""
    x, eps = (t.to(device) for t in _inputs())
    ddim_module._PLANS.clear()
    diffkern.ddim_step(eps, 500, x, ABAR.to(device), prev_timestep=480, thresholding=True, backend=fast_backend)
    (plan,) = ddim_module._PLANS.values()
    assert isinstance(plan.launch, functools.partial)
    assert plan.launch.func is backends.implementation(fast_backend, "ddim_step")


def test_a_table_made_under_inference_mode_is_checked_on_every_call():
    """An inference tensor has no version counter: nothing would tell a cached check that it changed."""
    x, eps = _inputs()
    with torch.inference_mode():
        table = ABAR.clone()
        expected = diffkern.add_noise(x, eps, 500, ABAR, backend="reference")
        assert torch.equal(diffkern.add_noise(x, eps, 500, table, backend="reference"), expected)
        _ddim(eps, x, table=table)
        table[500] = 2.0
        with pytest.raises(ValueError, match=r"alphas_cumprod\[500\] = 2.0"):
            diffkern.add_noise(x, eps, 500, table, backend="reference")
        with pytest.raises(ValueError, match=r"alphas_cumprod\[500\] = 2.0"):
            _ddim(eps, x, table=table)


def test_host_coefficients_follow_the_table():
    """A step's host coefficients are memoised per checked table and version: a modified table gives new ones."""
    x, eps = _inputs()
    table = ABAR.clone()
    before = diffkern.add_noise(x, eps, 500, table, backend="reference")
    table[500] = 0.25
    after = diffkern.add_noise(x, eps, 500, table, backend="reference")
    assert torch.equal(after, (0.5 * x + 0.75 ** 0.5 * eps))
    assert not torch.equal(before, after)
