"""The public API's contract: validation before any work, backend selection, custom-op registration,
torch.compile without graph breaks, and no host syncs for device timesteps."""

import logging

import pytest
import torch
from torch.library import opcheck

import diffkern
from diffkern import backends
from diffkern.ops.add_noise import _add_noise_op
from diffkern.ops.ddim import _ddim_step_op
from diffkern.ops.ddpm import _ddpm_step_op
from diffkern.ops.group_norm_silu import _group_norm_silu_bwd_op, _group_norm_silu_fwd_op

from conftest import ON_GPU

TABLE = diffkern.alphas_cumprod(diffkern.make_betas("linear", 100))


@pytest.fixture
def tensors(randn):
    return dict(x=randn(2, 4, 3, 3), m=randn(2, 4, 3, 3), z=randn(2, 4, 3, 3))


# ------------------------------------------------------------------------------------------------- validation
def ddim(t, **overrides):
    args = dict(model_output=t["m"], timestep=50, sample=t["x"], alphas_cumprod=TABLE, prev_timestep=40)
    args.update(overrides)
    return diffkern.ddim_step(**args)


def ddpm(t, **overrides):
    args = dict(model_output=t["m"], timestep=50, sample=t["x"], alphas_cumprod=TABLE)
    args.update(overrides)
    return diffkern.ddpm_step(**args)


BAD_STEP_CALLS = [
    ("model_output", ValueError, lambda t: ddim(t, model_output=t["m"][:1])),
    ("model_output", TypeError, lambda t: ddim(t, model_output=t["m"].double())),
    ("model_output", ValueError, lambda t: ddim(t, guidance_scale=3.0)),           # needs 2B samples
    ("sample", TypeError, lambda t: ddim(t, sample=t["x"].to(torch.int32))),
    ("sample", TypeError, lambda t: ddim(t, sample=[1.0])),
    ("timestep", ValueError, lambda t: ddim(t, timestep=100)),
    ("timestep", ValueError, lambda t: ddim(t, timestep=-1)),
    ("timestep", ValueError, lambda t: ddim(t, timestep=torch.tensor([5, 100]))),
    ("timestep", ValueError, lambda t: ddim(t, timestep=torch.tensor([5, 6, 7]))),
    ("timestep", TypeError, lambda t: ddim(t, timestep=torch.tensor(5.0))),
    ("timestep", TypeError, lambda t: ddim(t, timestep=5.0)),
    ("timestep", ValueError, lambda t: ddim(t, timestep=torch.tensor([5, 6], dtype=torch.int8) * 20)),
    ("prev_timestep", ValueError, lambda t: ddim(t, prev_timestep=100)),
    ("prediction_type", ValueError, lambda t: ddim(t, prediction_type="eps")),
    ("eta", ValueError, lambda t: ddim(t, eta=-0.5)),
    ("noise", ValueError, lambda t: ddim(t, eta=1.0, noise=t["z"][:, :2])),
    ("noise", ValueError, lambda t: ddim(t, eta=1.0, noise=t["z"], generator=torch.Generator())),
    ("generator", TypeError, lambda t: ddim(t, eta=1.0, generator=3)),
    ("clip_sample_range", ValueError, lambda t: ddim(t, clip_sample=True, clip_sample_range=-0.5)),
    ("dynamic_thresholding_ratio", ValueError, lambda t: ddim(t, thresholding=True, dynamic_thresholding_ratio=1.5)),
    ("final_alpha_cumprod", ValueError, lambda t: ddim(t, final_alpha_cumprod=0.0)),
    ("alphas_cumprod", ValueError, lambda t: ddim(t, alphas_cumprod=TABLE[None])),
    ("alphas_cumprod", TypeError, lambda t: ddim(t, alphas_cumprod=torch.arange(10))),
    ("backend", ValueError, lambda t: ddim(t, backend="fastest")),
    ("variance_type", ValueError, lambda t: ddpm(t, variance_type="fixed")),
    ("model_output", ValueError, lambda t: ddpm(t, variance_type="learned")),       # needs 2C channels
    ("prev_timestep", ValueError, lambda t: ddpm(t, prev_timestep=torch.tensor([1, 2, 3]))),
    ("noise", TypeError, lambda t: ddpm(t, noise=t["z"].half())),
    ("timestep", ValueError, lambda t: diffkern.add_noise(t["x"], t["z"], 100, TABLE)),
    ("noise", ValueError, lambda t: diffkern.add_noise(t["x"], t["z"][:1], 1, TABLE)),
    ("original_samples", TypeError, lambda t: diffkern.add_noise(t["x"].long(), t["z"], 1, TABLE)),
    ("num_groups", ValueError, lambda t: diffkern.group_norm_silu(t["x"], 3)),
    ("num_groups", TypeError, lambda t: diffkern.group_norm_silu(t["x"], 0)),
    ("weight", ValueError, lambda t: diffkern.group_norm_silu(t["x"], 2, torch.ones(3))),
    ("bias", TypeError, lambda t: diffkern.group_norm_silu(t["x"], 2, None, torch.ones(4, dtype=torch.int64))),
    ("x", ValueError, lambda t: diffkern.group_norm_silu(t["x"][0, 0, 0], 1)),
    ("eps", ValueError, lambda t: diffkern.group_norm_silu(t["x"], 2, eps=-1.0)),
]


@pytest.mark.parametrize("argument,error,call", BAD_STEP_CALLS, ids=[f"{a}-{i}" for i, (a, _, _) in
                                                                    enumerate(BAD_STEP_CALLS)])
def test_bad_input_names_the_argument_and_touches_nothing(tensors, argument, error, call):
    before = {name: t.clone() for name, t in tensors.items()}
    table_before = TABLE.clone()
    with pytest.raises(error, match=argument):
        call(tensors)
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), f"{name} was modified"
    assert torch.equal(TABLE, table_before)


def test_table_on_another_device_is_rejected(tensors):
    meta_table = TABLE.to("meta")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        ddim(tensors, alphas_cumprod=meta_table)


# --------------------------------------------------------------------------------------------------- backends
def test_auto_is_reference_on_cpu(tensors, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    ddim(tensors)
    assert backends.last_backend("ddim_step") == "reference"


def test_env_var_overrides_auto(tensors, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(diffkern.BackendUnavailableError, match="cuda"):
        ddim(tensors)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        ddim(tensors)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    ddim(tensors, backend="auto")
    assert backends.last_backend("ddim_step") == "reference"


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-only answer")
def test_cuda_backend_on_cpu_tensors_fails_loudly(tensors):
    with pytest.raises(diffkern.BackendUnavailableError, match="CUDA tensors"):
        ddim(tensors, backend="cuda")
    assert diffkern.available_backends("cpu")["cuda"].available is False


def test_available_backends_explains_itself():
    status = diffkern.available_backends("cpu")
    assert set(status) == {"reference", "triton", "cuda"}
    assert status["reference"].available
    for entry in status.values():
        assert isinstance(entry.reason, str) and entry.reason


@pytest.mark.skipif(not ON_GPU, reason="auto's fallback order applies to CUDA tensors; no GPU here")
def test_auto_fallback_is_logged_once(tensors, caplog, device):
    backends.clear_cache()
    x = tensors["x"].to(device)
    with caplog.at_level(logging.WARNING, logger="diffkern"):
        for _ in range(3):
            diffkern.group_norm_silu(x, 2)
    chosen = backends.last_backend("group_norm_silu")
    expected_logs = 0 if chosen == backends.AUTO_PREFERENCE["group_norm_silu"][0] else 1
    assert len([r for r in caplog.records if "group_norm_silu" in r.getMessage()]) == expected_logs


# ------------------------------------------------------------------------------------------------- custom ops
def test_opcheck_every_op(randn):
    x, m, z = randn(2, 4, 3, 3), randn(2, 4, 3, 3), randn(2, 4, 3, 3)
    table = TABLE.float()
    t, prev = torch.tensor([50, 7]), torch.tensor([40, -1])
    opcheck(_add_noise_op, (x, z, table, t, "reference"))
    opcheck(_ddim_step_op, (m, x, z, table, t, prev, 1.0, 0.5, "v_prediction", True, 1.0, False, 0.995, 1.0,
                            True, None, 0.0, "reference"))
    opcheck(_ddim_step_op, (torch.cat([m, z]), x, z, table, t, prev, 1.0, 0.5, "epsilon", False, 1.0, False, 0.995,
                            1.0, False, 4.0, 0.7, "reference"))
    opcheck(_ddpm_step_op, (torch.cat([m, m]), x, z, table, t, prev, "fixed_small", "epsilon", False, 1.0, True,
                            0.9, 2.0, 3.0, 0.5, "reference"))
    xg = randn(2, 4, 3, 3).requires_grad_()
    w, b = randn(4).requires_grad_(), randn(4).requires_grad_()
    opcheck(_group_norm_silu_fwd_op, (xg, w, b, 2, 1e-5, "reference"))
    y, mean, rstd = _group_norm_silu_fwd_op(xg.detach(), w.detach(), b.detach(), 2, 1e-5, "reference")
    opcheck(_group_norm_silu_bwd_op, (randn(2, 4, 3, 3), xg.detach(), w.detach(), b.detach(), mean, rstd, 2,
                                      "reference"))


def test_backend_choice_is_a_compile_time_constant():
    from torch._dynamo.decorators import assume_constant_result

    def probe():
        return "x"

    marked = assume_constant_result(probe)
    markers = [name for name in vars(marked) if name.startswith("_dynamo")]
    assert markers and all(getattr(backends._resolve, name) == getattr(marked, name) for name in markers)


def test_import_is_light():
    import subprocess
    import sys
    code = "import sys, diffkern; print(sorted(m for m in ('triton', 'torch._dynamo', 'diffusers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_compiled_sampling_loop_has_no_graph_break(randn, device):
    """A DDIM loop with tensor timesteps, a DDPM step, add_noise and GroupNorm+SiLU under
    torch.compile(fullgraph=True): any graph break raises."""
    torch._dynamo.reset()
    table = TABLE.float().to(device)
    timesteps = torch.arange(99, -1, -20, device=device)
    weight, bias = randn(4), randn(4)
    x = randn(2, 4, 4, 4)

    def loop(x):
        for i in range(len(timesteps)):
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else torch.full_like(timesteps[i], -1)
            model_output = diffkern.group_norm_silu(x, 2, weight, bias)
            x = diffkern.ddim_step(model_output, timesteps[i], x, table, prev_timestep=prev).prev_sample
        x = diffkern.ddpm_step(x * 0.5, 3, x, table, noise=x * 0.1).prev_sample
        return diffkern.add_noise(x, x * 0.3, torch.tensor([5, 60], device=device), table)

    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    assert_close_exact = torch.testing.assert_close
    assert_close_exact(compiled(x), loop(x), rtol=0, atol=0)


@pytest.mark.skipif(not ON_GPU, reason="host syncs only exist with a GPU")
def test_device_timesteps_cause_no_host_sync(randn, device):
    table = TABLE.float().to(device)
    x, m, z = randn(2, 4, 8, 8), randn(2, 4, 8, 8), randn(2, 4, 8, 8)
    t = torch.tensor([60, 30], device=device)
    prev = t - 10
    diffkern.ddim_step(m, t, x, table, prev_timestep=prev)   # warm-up: availability checks, kernel compiles
    diffkern.ddpm_step(m, t, x, table, noise=z)
    diffkern.add_noise(x, z, t, table)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        diffkern.ddim_step(m, t, x, table, prev_timestep=prev, eta=1.0, noise=z, clip_sample=True)
        diffkern.ddpm_step(m, t, x, table, noise=z)
        diffkern.ddpm_step(m, t, x, table, prev_timestep=prev, noise=z)
        diffkern.add_noise(x, z, t, table)
        diffkern.ddim_step(m, 50, x, table, prev_timestep=40)   # python ints: torch.full, not a copy
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_table_the_backends_do_not_take_is_copied_once_per_version():
    """``prepare_table``: a CPU table for device samples (here the meta device stands in), or a float64 one, is
    copied at its first use per version, device and dtype, then served from the cache, which lets it go with its
    table; a table the backends take as it is is returned itself and not cached."""
    import gc

    from diffkern.ops import _common as C

    table = TABLE.clone()   # float64, CPU
    sample = torch.zeros(2, 3)
    first = C.prepare_table(table, sample)
    assert first.dtype == torch.float32 and torch.equal(first, table.float())
    assert C.prepare_table(table, sample) is first
    on_meta = C.prepare_table(table, sample.to("meta"))
    assert on_meta.device.type == "meta" and C.prepare_table(table, sample.to("meta")) is on_meta
    assert C.prepare_table(table, sample.double()) is table   # float64 samples take the float64 table as it is
    table[0] = 0.5   # a new version: a new copy, with the new value
    edited = C.prepare_table(table, sample)
    assert edited is not first and float(edited[0]) == 0.5 and C.prepare_table(table, sample) is edited
    table_id = id(table)
    assert table_id in C._table_copies
    del table
    gc.collect()
    assert table_id not in C._table_copies
    ready = TABLE.float()
    assert C.prepare_table(ready, sample) is ready and id(ready) not in C._table_copies
    with torch.inference_mode():
        frozen = TABLE.float().double()   # no version counter: copied on every call, nothing cached
    assert C.prepare_table(frozen, sample) is not C.prepare_table(frozen, sample)
    assert id(frozen) not in C._table_copies


@pytest.mark.skipif(not ON_GPU, reason="host syncs and CUDA graphs only exist with a GPU")
def test_a_cpu_table_is_copied_at_the_first_step_only(randn, device):
    """A CPU table (a diffusers scheduler's ``alphas_cumprod``) is copied to the device at the first call, which
    syncs once; later steps with it sync never, and compute what the device table does. A CUDA-graph capture cannot
    copy it, and says so before any work."""
    table = TABLE.float().clone()
    x, m, z = randn(2, 4, 8, 8), randn(2, 4, 8, 8), randn(2, 4, 8, 8)
    diffkern.ddim_step(m, 50, x, table, prev_timestep=40)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [diffkern.ddim_step(m, 50, x, table, prev_timestep=40).prev_sample,
               diffkern.ddpm_step(m, 50, x, table, noise=z).prev_sample,
               diffkern.add_noise(x, z, 50, table)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_device = table.to(device)
    expected = [diffkern.ddim_step(m, 50, x, on_device, prev_timestep=40).prev_sample,
                diffkern.ddpm_step(m, 50, x, on_device, noise=z).prev_sample,
                diffkern.add_noise(x, z, 50, on_device)]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    _capture_raises("alphas_cumprod is on the CPU, and a CUDA-graph capture",
                    lambda: diffkern.ddim_step(m, 50, x, table, prev_timestep=40))


def _capture_raises(message: str, call) -> None:
    """``call()`` inside a CUDA-graph capture raises a ValueError matching ``message``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=message):
        with torch.cuda.graph(graph, stream=side):
            call()


@pytest.mark.skipif(not ON_GPU, reason="host syncs and CUDA graphs only exist with a GPU")
def test_per_sample_cpu_values_reach_the_device_without_a_sync(any_backend, randn, device):
    """Per-sample timesteps and sigmas on the CPU for device samples: every backend gets them on the device
    (staged through pinned memory: no sync once warm), with the results of the same values passed on the device;
    a CUDA-graph capture cannot copy them and says so before any work."""
    table = TABLE.float().to(device)
    x, m, z = randn(2, 4, 8, 8), randn(2, 4, 8, 8), randn(2, 4, 8, 8)
    t, prev, sigmas = torch.tensor([60, 30]), torch.tensor([50, 20]), torch.tensor([0.8, 0.4])
    next_sigmas = torch.tensor([0.7, 0.3])

    def calls(t, prev, sigmas, next_sigmas):
        return [diffkern.ddim_step(m, t, x, table, prev_timestep=prev, backend=any_backend).prev_sample,
                diffkern.ddpm_step(m, t, x, table, prev_timestep=prev, noise=z, backend=any_backend).prev_sample,
                diffkern.add_noise(x, z, t, table, backend=any_backend),
                diffkern.flow_match_step(m, x, sigmas, next_sigmas, backend=any_backend).prev_sample,
                diffkern.flow_add_noise(x, z, sigmas, backend=any_backend)]

    calls(t, prev, sigmas, next_sigmas)   # warm-up: compiles, the pinned staging blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = calls(t, prev, sigmas, next_sigmas)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = calls(t.to(device), prev.to(device), sigmas.to(device), next_sigmas.to(device))
    for ours, theirs in zip(got, expected):
        assert torch.equal(ours, theirs)
    _capture_raises("timesteps holds per-sample values on the CPU",
                    lambda: diffkern.add_noise(x, z, t, table, backend=any_backend))


# ------------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_fp32_rounded_once(randn, gen, dtype):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear")).float()
    x, m, z = randn(2, 4, 3, 5, dtype=dtype), randn(2, 4, 3, 5, dtype=dtype), randn(2, 4, 3, 5, dtype=dtype)
    t = torch.randint(1, 1000, (2,), generator=gen)

    def each(fn, *tensors):
        low, high = fn(*tensors), fn(*(u.float() for u in tensors))
        for a, b in zip(low if isinstance(low, tuple) else (low,), high if isinstance(high, tuple) else (high,)):
            assert a.dtype == dtype and torch.equal(a, b.to(dtype))

    each(lambda x, z: diffkern.add_noise(x, z, t, table), x, z)
    each(lambda m, x, z: tuple(diffkern.ddim_step(m, t, x, table, prev_timestep=t - 10, eta=0.5, noise=z,
                                                  thresholding=True)), m, x, z)
    each(lambda m, x, z: tuple(diffkern.ddpm_step(m, t, x, table, noise=z, prediction_type="v_prediction")),
         m, x, z)


def test_triton_unavailable_on_cpu_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET=1: an explicit backend="triton" fails loudly, naming the reason."""
    x = torch.randn(2, 3, 4)
    table = TABLE.float()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends.clear_cache()
    try:
        for call in (lambda: diffkern.add_noise(x, x, 3, table, backend="triton"),
                     lambda: diffkern.ddim_step(x, 3, x, table, prev_timestep=2, backend="triton"),
                     lambda: diffkern.ddpm_step(x, 3, x, table, noise=x, backend="triton")):
            with pytest.raises(diffkern.BackendUnavailableError, match="TRITON_INTERPRET"):
                call()
    finally:
        monkeypatch.undo()
        backends.clear_cache()
