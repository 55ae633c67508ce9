"""The Triton add_noise, DDIM and DDPM kernels against the reference backend.

Every case calls the public op twice on the same random inputs (fresh each run, see ``conftest``), once with
``backend="triton"`` and once with ``backend="reference"``, asserts which backend ran, and compares both
outputs with the one tolerance table of ``diffkern.testing``. Without a GPU the kernels run in the Triton
interpreter on CPU tensors. (The interpreter rounds fp32 to bf16 by truncation where GPUs round to nearest
even, so there bf16 results may sit one bf16 ulp from the reference: inside bf16's tolerance, as any one-ulp
difference is.)
"""

from __future__ import annotations

import pytest
import torch

import diffkern
from _helpers import ddpm_model_output
from _helpers import run_both as run_both_backends
from conftest import ON_GPU
from diffkern import backends
from diffkern.schedules import NoiseSchedule
from diffkern.testing import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_TRAIN = 1000

# Sample shapes [B, ...]: B = 1 and 3, n = 1, n below one block, n past one block with a tail.
SHAPES = [(1, 1), (3, 1), (1, 4, 5, 7), (3, 3, 11, 13), (2, 3, 41, 37)]
if ON_GPU:
    SHAPES += [(4, 4, 64, 64), (3, 4, 129, 131), (2, 16, 96, 96)]


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("scaled_linear", NUM_TRAIN, 0.00085, 0.012)


@pytest.fixture
def table(schedule, device) -> torch.Tensor:
    return schedule.table(device)


def run_both(op, *args, **kwargs):
    """``op`` on the Triton backend and on the reference, compared (``_helpers.run_both``); returns Triton's result."""
    return run_both_backends(op, "triton", *args, **kwargs)


def random_timesteps(gen, batch, device, low=0, high=NUM_TRAIN):
    return torch.randint(low, high, (batch,), generator=gen).to(device)


# ----------------------------------------------------------------------------------------------------------
# add_noise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_noise_matches_reference(shape, dtype, table, randn, gen, device):
    x0, noise = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    run_both(diffkern.add_noise, x0, noise, random_timesteps(gen, shape[0], device), table)
    run_both(diffkern.add_noise, x0, noise, int(torch.randint(NUM_TRAIN, (1,), generator=gen)), table)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_noise_channels_last(dtype, table, randn, gen, device):
    x0 = randn(3, 5, 6, 7, dtype=dtype).to(memory_format=torch.channels_last)
    noise = randn(3, 5, 6, 7, dtype=dtype).to(memory_format=torch.channels_last)
    out = run_both(diffkern.add_noise, x0, noise, random_timesteps(gen, 3, device), table)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_add_noise_table_ends_clamping_and_strided_indices(table, randn, gen, device):
    """t = 0 and t = T-1 read the table's ends; indices past either end (possible in device tensors, which
    are not range-checked) are clamped into the table; strided timestep and table views are read in place."""
    from diffkern.triton.add_noise import add_noise as triton_add_noise  # the backend: no public range check

    x0, noise = randn(4, 2, 3, 5), randn(4, 2, 3, 5)
    ends = torch.tensor([0, NUM_TRAIN - 1, 5, NUM_TRAIN - 1], device=device)
    out = run_both(diffkern.add_noise, x0, noise, ends, table)
    outside = torch.tensor([-7, NUM_TRAIN + 50, 5, NUM_TRAIN - 1], device=device)
    assert_close(triton_add_noise(x0, noise, table, outside), out)

    every_other = random_timesteps(gen, 8, device, high=NUM_TRAIN // 2)[::2]
    run_both(diffkern.add_noise, x0, noise, every_other, table[::2])


# ----------------------------------------------------------------------------------------------------------
# DDIM

# Each option at least once; every case runs in every dtype.
DDIM_CASES = {
    "epsilon": dict(),
    "v_prediction-clip": dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.5),
    "sample-clip-use_clipped": dict(prediction_type="sample", clip_sample=True, use_clipped_model_output=True),
    "epsilon-clip-use_clipped": dict(clip_sample=True, clip_sample_range=0.8, use_clipped_model_output=True),
    "eta1-noise": dict(eta=1.0, noise=True),
    "eta0-noise-ignored": dict(eta=0.0, noise=True),
    "eta-half-guidance": dict(eta=0.5, noise=True, guidance_scale=7.5),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
    "thresholding-v-guidance-use_clipped": dict(prediction_type="v_prediction", thresholding=True,
                                                clip_sample=True, sample_max_value=1.5, guidance_scale=3.0,
                                                use_clipped_model_output=True),
    "final_alpha_cumprod": dict(final_alpha_cumprod=0.9991, eta=1.0, noise=True),
}


def ddim_inputs(shape, dtype, options, randn, gen, device, *, per_sample=True):
    """(model_output, timestep, sample, kwargs) for ``ddim_step``; per-sample prev has some negatives."""
    options = dict(options)
    batch = shape[0]
    guided = options.get("guidance_scale") is not None
    model_output = randn(2 * batch if guided else batch, *shape[1:], dtype=dtype)
    sample = randn(*shape, dtype=dtype)
    if options.pop("noise", False):
        options["noise"] = randn(*shape, dtype=dtype)
    if per_sample:
        timestep = random_timesteps(gen, batch, device, low=1)
        prev = timestep - torch.randint(1, 300, (batch,), generator=gen).to(device)
        prev[0] = -1  # the final step: abar_prev = final_alpha_cumprod
    else:
        timestep = int(torch.randint(1, NUM_TRAIN, (1,), generator=gen))
        prev = timestep - 20
    return model_output, timestep, sample, dict(options, prev_timestep=prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_options_match_reference(case, dtype, table, randn, gen, device):
    model_output, timestep, sample, kwargs = ddim_inputs((3, 4, 7, 9), dtype, DDIM_CASES[case], randn, gen, device)
    run_both(diffkern.ddim_step, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ddim_shapes_match_reference(shape, dtype, table, randn, gen, device):
    options = dict(eta=1.0, noise=True, guidance_scale=5.0)
    for per_sample in (True, False):
        model_output, timestep, sample, kwargs = ddim_inputs(shape, dtype, options, randn, gen, device,
                                                             per_sample=per_sample)
        run_both(diffkern.ddim_step, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddim_channels_last(dtype, table, randn, gen, device):
    options = dict(eta=1.0, noise=True, guidance_scale=4.0, thresholding=True)
    model_output, timestep, sample, kwargs = ddim_inputs((3, 5, 6, 7), dtype, options, randn, gen, device)
    as_cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    kwargs["noise"] = as_cl(kwargs["noise"])
    prev, x0 = run_both(diffkern.ddim_step, as_cl(model_output), timestep, as_cl(sample), table, **kwargs)
    assert prev.is_contiguous(memory_format=torch.channels_last)
    assert x0.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------
# DDPM

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")

DDPM_CASES = {
    "epsilon-clip": dict(),
    "v_prediction-noclip": dict(prediction_type="v_prediction", clip_sample=False),
    "sample-clip-range": dict(prediction_type="sample", clip_sample_range=0.5),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=3.0),
    "guidance-thresholding-v": dict(guidance_scale=6.0, thresholding=True, prediction_type="v_prediction"),
    # The public op draws noise whenever some t > 0, so "no noise" (noise=None to the kernel) means t = 0.
    "no-noise-t0": dict(noise=False),
}


def ddpm_inputs(shape, dtype, variance_type, options, randn, gen, device):
    """(model_output, timestep, sample, kwargs) for ``ddpm_step``: per-sample t with t = 0 for sample 0 and
    given noise; or, with ``noise=False`` in ``options``, t = 0 for all (the public op then passes no noise)."""
    options = dict(options)
    batch = shape[0]
    guided = options.get("guidance_scale") is not None
    model_output = ddpm_model_output(randn, shape, variance_type, dtype, guided)
    sample = randn(*shape, dtype=dtype)
    if options.pop("noise", True):
        options["noise"] = randn(*shape, dtype=dtype)
        timestep = random_timesteps(gen, batch, device)
        timestep[0] = 0
    else:
        timestep = 0
    return model_output, timestep, sample, dict(options, variance_type=variance_type)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_ddpm_variance_types_match_reference(variance_type, dtype, table, randn, gen, device):
    for guidance_scale in (None, 4.0):
        model_output, timestep, sample, kwargs = ddpm_inputs((3, 4, 5, 7), dtype, variance_type,
                                                             dict(guidance_scale=guidance_scale), randn, gen, device)
        run_both(diffkern.ddpm_step, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_ddpm_options_match_reference(case, dtype, table, randn, gen, device):
    model_output, timestep, sample, kwargs = ddpm_inputs((3, 4, 5, 7), dtype, "fixed_small", DDPM_CASES[case],
                                                         randn, gen, device)
    run_both(diffkern.ddpm_step, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ddpm_shapes_match_reference(shape, dtype, table, randn, gen, device):
    for variance_type in ("fixed_small", "learned_range"):
        model_output, timestep, sample, kwargs = ddpm_inputs(shape, dtype, variance_type, {}, randn, gen, device)
        kwargs["prev_timestep"] = timestep - torch.randint(1, 100, timestep.shape, generator=gen).to(device)
        run_both(diffkern.ddpm_step, model_output, timestep, sample, table, **kwargs)


def test_ddpm_no_noise_at_t0(table, randn, device):
    """In a per-sample batch, the t = 0 sample does not depend on the noise and the others do."""
    model_output, sample, noise = randn(3, 4, 5, 6), randn(3, 4, 5, 6), randn(3, 4, 5, 6)
    timestep = torch.tensor([0, 400, 999], device=device)
    once = diffkern.ddpm_step(model_output, timestep, sample, table, noise=noise, backend="triton")
    twice = diffkern.ddpm_step(model_output, timestep, sample, table, noise=2 * noise, backend="triton")
    assert backends.last_backend("ddpm_step") == "triton"
    assert torch.equal(once.prev_sample[0], twice.prev_sample[0])
    assert not torch.isclose(once.prev_sample[1:], twice.prev_sample[1:]).any()
    assert torch.equal(once.pred_original_sample, twice.pred_original_sample)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddpm_channels_last(dtype, table, randn, gen, device):
    model_output, timestep, sample, kwargs = ddpm_inputs((3, 5, 6, 7), dtype, "fixed_small_log",
                                                         dict(guidance_scale=2.0), randn, gen, device)
    as_cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    kwargs["noise"] = as_cl(kwargs["noise"])
    prev, x0 = run_both(diffkern.ddpm_step, as_cl(model_output), timestep, as_cl(sample), table, **kwargs)
    assert prev.is_contiguous(memory_format=torch.channels_last)
    assert x0.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------
# Random sweep: shapes and options drawn from the test's generator (fresh every run).


def test_random_sweep_matches_reference(table, randn, gen, device):
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    for _ in range(15):
        dtype = pick(DTYPES)
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        ndim = int(torch.randint(1, 4, (1,), generator=gen))
        shape = (batch,) + tuple(int(s) for s in torch.randint(1, 12 if ndim > 1 else 300, (ndim,), generator=gen))
        op = pick(("add_noise", "ddim_step", "ddpm_step"))
        if op == "add_noise":
            timestep = pick((random_timesteps(gen, batch, device), int(random_timesteps(gen, 1, "cpu"))))
            run_both(diffkern.add_noise, randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), timestep, table)
            continue
        options = dict(prediction_type=pick(("epsilon", "v_prediction", "sample")), clip_sample=pick((True, False)),
                       thresholding=pick((True, False)), guidance_scale=pick((None, 3.5)),
                       dynamic_thresholding_ratio=pick((0.5, 0.995, 1.0)))
        if op == "ddim_step":
            options.update(eta=pick((0.0, 0.3, 1.0)), use_clipped_model_output=pick((True, False)), noise=True)
            model_output, timestep, sample, kwargs = ddim_inputs(shape, dtype, options, randn, gen, device,
                                                                 per_sample=pick((True, False)))
            run_both(diffkern.ddim_step, model_output, timestep, sample, table, **kwargs)
        else:
            options.update(noise=pick((True, False)))
            model_output, timestep, sample, kwargs = ddpm_inputs(shape if ndim > 1 else shape + (1,), dtype,
                                                                 pick(VARIANCE_TYPES), options, randn, gen, device)
            run_both(diffkern.ddpm_step, model_output, timestep, sample, table, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Contract, availability and torch.compile


def test_float64_runs_reference_math(table, randn, gen, device):
    """fp64 is served by the reference math (documented in diffkern.triton._common)."""
    x, model_output = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, 4, dtype=torch.float64)
    timestep = random_timesteps(gen, 2, device, low=1)
    for op, args, kwargs in [
        (diffkern.add_noise, (x, model_output, timestep, table), {}),
        (diffkern.ddim_step, (model_output, timestep, x, table), dict(prev_timestep=timestep - 1)),
        (diffkern.ddpm_step, (model_output, timestep, x, table), dict(noise=randn(2, 3, 4, dtype=torch.float64))),
    ]:
        run_both(op, *args, **kwargs)


def test_backend_rejects_mismatched_layouts(table, randn, device):
    """Called directly (past the public op's layout normalisation), the kernels refuse what they cannot index."""
    from diffkern.triton.ddim import ddim_step as triton_ddim_step

    sample = randn(2, 3, 4, 5)
    model_output = randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    timestep = torch.tensor([10], device=device)
    with pytest.raises(ValueError, match="laid out alike"):
        triton_ddim_step(model_output, sample, None, table, timestep, timestep - 1, final_alpha_cumprod=1.0,
                         eta=0.0, prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0,
                         thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                         use_clipped_model_output=False, guidance_scale=None)


def test_triton_unavailable_on_cpu_without_interpreter(monkeypatch, schedule):
    """CPU tensors without TRITON_INTERPRET=1: an explicit backend="triton" fails loudly, naming the reason."""
    x = torch.randn(2, 3, 4)
    table = schedule.table("cpu")
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


def test_ddim_loop_compiles_fullgraph(table, randn, device):
    """A sampling loop over the Triton op compiles as one graph (the op is opaque to the compiler) and
    computes what the eager reference loop computes."""
    steps = [(999, 666), (666, 333), (333, -1)]
    sample = randn(2, 3, 6, 5)
    model_outputs = [randn(4, 3, 6, 5) for _ in steps]

    def loop(x, outputs, backend):
        for (t, t_prev), model_output in zip(steps, outputs):
            x = diffkern.ddim_step(model_output, t, x, table, prev_timestep=t_prev, guidance_scale=2.0,
                                   backend=backend).prev_sample
        return x

    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True)
    result = compiled(sample, model_outputs, "triton")
    assert backends.last_backend("ddim_step") == "triton"
    assert_close(result, loop(sample, model_outputs, "reference"))


# ----------------------------------------------------------------------------------------------------------
# 64-bit indexing (GPU only: the tensors are several GiB)

BIG = 2**31


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: tensors past 2^31 elements take several GiB")
@pytest.mark.parametrize("shape", [(2, BIG // 2 + 17), (1, BIG + 5)], ids=["batch-past-2^31", "sample-past-2^31"])
def test_add_noise_past_int32_offsets(shape, table, gen, device):
    total = torch.cuda.get_device_properties(device).total_memory
    if total < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of GPU memory, the device has {total / 2**30:.0f}")
    device_gen = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    x0 = torch.randn(shape, generator=device_gen, device=device, dtype=torch.float16)
    noise = torch.randn(shape, generator=device_gen, device=device, dtype=torch.float16)
    timestep = random_timesteps(gen, shape[0], device)
    out = diffkern.add_noise(x0, noise, timestep, table, backend="triton")
    assert backends.last_backend("add_noise") == "triton"
    # Compare the elements at the end of storage (past 2^31) and at the start, with the reference on slices.
    for part in (slice(-(1 << 20), None), slice(0, 1 << 20)):
        expected = diffkern.add_noise(x0[:, part], noise[:, part], timestep, table, backend="reference")
        assert_close(out[:, part], expected)
