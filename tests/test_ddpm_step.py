"""ddpm_step: the reference against float64 math and diffusers' DDPMScheduler, and every fast backend against the
reference over one case matrix (``DDPM_CASES`` x variance types), shapes and layouts (see test_ddim_step.py for
how the fast-backend tests run)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import diffkern
from _helpers import LAYOUTS, abar64, check_host_timesteps_match_tensors, ddpm_model_output, lay_out, run_both
from conftest import ON_GPU
from diffkern import backends
from diffkern.ops.ddpm import VARIANCE_TYPES
from diffkern.testing import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_TRAIN = 1000
SHAPES = [(1, 1), (3, 1), (1, 4, 5, 7), (3, 3, 11, 13), (2, 3, 41, 37)]
if ON_GPU:
    SHAPES += [(4, 4, 64, 64), (3, 4, 129, 131)]

# The case matrix (with fixed_small; the variance types have their own test).
DDPM_CASES = {
    "epsilon-clip": dict(),
    "v_prediction-noclip": dict(prediction_type="v_prediction", clip_sample=False),
    "sample-clip-range": dict(prediction_type="sample", clip_sample_range=0.5),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=3.0),
    "guidance-thresholding-v": dict(guidance_scale=6.0, thresholding=True, prediction_type="v_prediction"),
    # The public op draws noise whenever some t > 0, so "no noise" (noise=None to the kernel) means t = 0.
    "no-noise-t0": dict(noise=False),
    # guidance_rescale (the stats pass, then the step reading the per-sample factor)
    "guidance-rescale": dict(guidance_scale=6.0, guidance_rescale=0.7),
    "guidance-rescale-1-thresholding-sample": dict(guidance_scale=4.0, guidance_rescale=1.0, thresholding=True,
                                                   prediction_type="sample"),
}
if ON_GPU:  # the full product, where kernels run at full speed
    for variance, prediction, guided, post in itertools.product(
            VARIANCE_TYPES, ("epsilon", "v_prediction", "sample"), (False, True), ("none", "clip", "threshold")):
        DDPM_CASES[f"{variance}-{prediction}-guided{guided}-{post}"] = dict(
            variance_type=variance, prediction_type=prediction, guidance_scale=4.0 if guided else None,
            clip_sample=post == "clip", thresholding=post == "threshold", dynamic_thresholding_ratio=0.9,
            sample_max_value=2.0, guidance_rescale=0.7 if guided and post != "clip" else 0.0)


def ddpm_inputs(shape, dtype, variance_type, options, randn, gen, device, layout="contiguous"):
    """(model_output, timestep, sample, kwargs) for ``ddpm_step``: per-sample t with t = 0 for sample 0 and
    given noise; or, with ``noise=False`` in ``options``, t = 0 for all (the public op then passes no noise)."""
    options = dict(options)
    variance_type = options.pop("variance_type", variance_type)
    batch = shape[0]
    guided = options.get("guidance_scale") is not None
    model_output = lay_out(ddpm_model_output(randn, shape, variance_type, dtype, guided), layout)
    sample = lay_out(randn(*shape, dtype=dtype), layout)
    if options.pop("noise", True):
        options["noise"] = lay_out(randn(*shape, dtype=dtype), layout)
        timestep = torch.randint(0, NUM_TRAIN, (batch,), generator=gen).to(device)
        timestep[0] = 0
    else:
        timestep = 0
    return model_output, timestep, sample, dict(options, variance_type=variance_type)


# ------------------------------------------------------------------------------------------------- reference

def ddpm64(model_output, sample, noise, a, a_prev, t, *, variance_type="fixed_small", prediction_type="epsilon",
           clip=None, predicted_variance=None):
    """DDPM written out once more, in float64, for one sample with scalar coefficients."""
    x, m = sample.double(), model_output.double()
    alpha, beta = a / a_prev, 1 - a / a_prev
    if prediction_type == "epsilon":
        x0 = (x - math.sqrt(1 - a) * m) / math.sqrt(a)
    elif prediction_type == "sample":
        x0 = m
    else:
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    prev = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a) * x
    if t > 0:
        v = max((1 - a_prev) / (1 - a) * beta, 1e-20)
        if variance_type in ("fixed_small", "fixed_small_log"):
            std = math.sqrt(v)
        elif variance_type in ("fixed_large", "fixed_large_log"):
            std = math.sqrt(beta)
        elif variance_type == "learned":
            std = predicted_variance.double().sqrt()
        else:
            f = (predicted_variance.double() + 1) / 2
            std = torch.exp(0.5 * (f * math.log(beta) + (1 - f) * math.log(v)))
        prev = prev + std * noise.double()
    return prev, x0


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_reference_matches_float64_formula(randn, gen, variance_type):
    dtype = torch.float64
    table = diffkern.alphas_cumprod(diffkern.make_betas("squaredcos_cap_v2"))
    learned = variance_type.startswith("learned")
    x, z = randn(4, 2, 3, 3, dtype=dtype), randn(4, 2, 3, 3, dtype=dtype)
    m = randn(4, 4 if learned else 2, 3, 3, dtype=dtype)
    if variance_type == "learned":
        m[:, 2:] = m[:, 2:].abs() * 0.01
    t = torch.tensor([0, 1, int(torch.randint(2, 999, (1,), generator=gen)), 999])
    out = diffkern.ddpm_step(m, t, x, table, noise=z, variance_type=variance_type, clip_sample=False,
                             backend="reference")
    for i in range(4):
        a, a_prev = abar64(table, int(t[i])), abar64(table, int(t[i]) - 1)
        pv = m[i, 2:] if learned else None
        prev64, x064 = ddpm64(m[i, :2], x[i], z[i], a, a_prev, int(t[i]), variance_type=variance_type,
                              predicted_variance=pv)
        assert_close(out.prev_sample[i], prev64, msg=f"t={int(t[i])}")
        assert_close(out.pred_original_sample[i], x064)


@pytest.mark.parametrize("variance_type", [v for v in VARIANCE_TYPES if v != "fixed_large_log"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("postprocess", ["none", "clip", "threshold"])
def test_reference_matches_diffusers(randn, variance_type, prediction_type, postprocess):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule="linear", variance_type=variance_type,
                                    prediction_type=prediction_type, clip_sample=postprocess == "clip",
                                    clip_sample_range=1.5, thresholding=postprocess == "threshold",
                                    sample_max_value=2.0)
    channels = 3
    out_channels = 2 * channels if variance_type.startswith("learned") else channels
    x = randn(2, channels, 5, 5, scale=1.5)
    m = randn(2, out_channels, 5, 5)
    if variance_type == "learned":
        m[:, channels:] = m[:, channels:].abs() * 0.01  # a variance must be positive
    for t in (999, 500, 1, 0):
        theirs = sched.step(m, t, x, generator=torch.Generator().manual_seed(t))
        ours = diffkern.ddpm_step(m, t, x, sched.alphas_cumprod, generator=torch.Generator().manual_seed(t),
                                  variance_type=variance_type, prediction_type=prediction_type,
                                  clip_sample=postprocess == "clip", clip_sample_range=1.5,
                                  thresholding=postprocess == "threshold", sample_max_value=2.0,
                                  backend="reference")
        assert_close(ours.prev_sample, theirs.prev_sample, msg=f"t={t}")
        assert_close(ours.pred_original_sample, theirs.pred_original_sample, msg=f"t={t}")


def test_fixed_large_log_is_finite_unlike_diffusers(randn):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    sched = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    x, m = randn(1, 2, 3, 3), randn(1, 2, 3, 3)
    assert torch.isnan(sched.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    ours = diffkern.ddpm_step(m, 500, x, sched.alphas_cumprod, variance_type="fixed_large_log",
                              generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ours.prev_sample).all()


def test_prev_timestep_default_and_spacing(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m, z = randn(2, 3, 4), randn(2, 3, 4), randn(2, 3, 4)
    default = diffkern.ddpm_step(m, 321, x, table, noise=z)
    explicit = diffkern.ddpm_step(m, 321, x, table, noise=z, prev_timestep=320)
    spaced = diffkern.ddpm_step(m, 321, x, table, noise=z, prev_timestep=301)
    assert torch.equal(default.prev_sample, explicit.prev_sample)
    assert not torch.allclose(default.prev_sample, spaced.prev_sample)


def test_per_sample_timesteps_equal_stepping_each_sample_alone(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m, z = randn(3, 3, 4, 4), randn(3, 3, 4, 4), randn(3, 3, 4, 4)
    t = torch.tensor([0, 250, 999])
    batched = diffkern.ddpm_step(m, t, x, table, noise=z, variance_type="fixed_large")
    for i in range(3):
        alone = diffkern.ddpm_step(m[i:i + 1], int(t[i]), x[i:i + 1], table, noise=z[i:i + 1],
                                   variance_type="fixed_large")
        assert torch.equal(batched.prev_sample[i:i + 1], alone.prev_sample)


def test_learned_guidance_takes_variance_from_conditional_half(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    m2 = randn(4, 6, 4, 4)
    guided = torch.cat([m2[:2, :3] + 4.0 * (m2[2:, :3] - m2[:2, :3]), m2[2:, 3:]], dim=1)
    fused = diffkern.ddpm_step(m2, 600, x, table, noise=z, variance_type="learned_range", guidance_scale=4.0)
    plain = diffkern.ddpm_step(guided, 600, x, table, noise=z, variance_type="learned_range")
    assert_close(fused.prev_sample, plain.prev_sample)


def test_learned_guidance_rescale_rescales_the_prediction_channels(randn):
    """With a learned variance the rescale applies to the guided prediction (its std against the conditional
    prediction's, over the first C channels); the predicted variance comes from the conditional half untouched."""
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    m2 = randn(4, 6, 4, 4)
    cond = m2[2:, :3]
    guided = m2[:2, :3] + 4.0 * (cond - m2[:2, :3])
    std = lambda t: t.std(dim=[1, 2, 3], keepdim=True)  # noqa: E731
    guided = 0.7 * (guided * (std(cond) / std(guided))) + (1 - 0.7) * guided
    fused = diffkern.ddpm_step(m2, 600, x, table, noise=z, variance_type="learned_range", guidance_scale=4.0,
                               guidance_rescale=0.7)
    plain = diffkern.ddpm_step(torch.cat([guided, m2[2:, 3:]], dim=1), 600, x, table, noise=z,
                               variance_type="learned_range")
    assert torch.equal(fused.prev_sample, plain.prev_sample)
    assert torch.equal(fused.pred_original_sample, plain.pred_original_sample)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_guidance_rescale_matches_the_pipelines(any_backend, variance_type, randn, device):
    """guidance_scale and guidance_rescale fused into the step equal the pipelines' formula (uncond + s (cond -
    uncond), then diffusers' rescale_noise_cfg) followed by DDPMScheduler.step with the same noise draws, in
    float32 (within the fp32 tolerance; bit for bit against the step of the pipelines' guided output on the
    reference)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    from test_flow_match_step import rescale_noise_cfg

    rescale = rescale_noise_cfg()
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    variance_type=variance_type, clip_sample=False)
    scale, phi = 6.0, 0.7
    m, x = randn(4, 3, 5, 7), randn(2, 3, 5, 7, scale=1.5)
    uncond, cond = m.cpu().chunk(2)
    guided = rescale(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
    table = sched.alphas_cumprod.to(device)
    for t in (999, 500, 1, 0):
        theirs = sched.step(guided, t, x.cpu(), generator=torch.Generator().manual_seed(t))
        ours = diffkern.ddpm_step(m, t, x, table, guidance_scale=scale, guidance_rescale=phi, clip_sample=False,
                                  variance_type=variance_type, generator=torch.Generator().manual_seed(t),
                                  backend=any_backend)
        assert_close(ours.prev_sample.cpu(), theirs.prev_sample, msg=f"t={t}")
        assert_close(ours.pred_original_sample.cpu(), theirs.pred_original_sample, msg=f"t={t}")
        if any_backend == "reference":
            plain = diffkern.ddpm_step(guided.to(device), t, x, table, clip_sample=False, variance_type=variance_type,
                                       generator=torch.Generator().manual_seed(t), backend="reference")
            assert torch.equal(ours.prev_sample, plain.prev_sample)


@pytest.mark.parametrize("call, error", [
    (dict(guidance_rescale=-0.1), ValueError),
    (dict(guidance_rescale=float("inf")), ValueError),
    (dict(guidance_rescale="0.7"), TypeError),
    (dict(guidance_rescale=False), TypeError),
    (dict(guidance_rescale=0.7, guidance_scale=None), ValueError),
], ids=["negative", "inf", "string", "bool", "without-guidance"])
def test_bad_guidance_rescale_names_the_argument(call, error, device):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear")).to(device)
    x = torch.randn(2, 3, 4, device=device)
    kwargs = dict(dict(guidance_scale=3.0), **call)
    model_output = torch.randn(4 if kwargs["guidance_scale"] is not None else 2, 3, 4, device=device)
    with pytest.raises(error, match="guidance_rescale"):
        diffkern.ddpm_step(model_output, 500, x, table, **kwargs)


# ------------------------------------------------------------------------------------------------- every backend

def test_no_noise_at_t0(any_backend, table, randn, device):
    """In a per-sample batch the t = 0 sample does not depend on the noise and the others do; a step at t = 0
    everywhere draws none."""
    backend = any_backend
    model_output, sample, noise = randn(3, 4, 5, 6), randn(3, 4, 5, 6), randn(3, 4, 5, 6)
    timestep = torch.tensor([0, 400, 999], device=device)
    once = diffkern.ddpm_step(model_output, timestep, sample, table, noise=noise, backend=backend)
    twice = diffkern.ddpm_step(model_output, timestep, sample, table, noise=2 * noise, backend=backend)
    assert backends.last_backend("ddpm_step") == backend
    assert torch.equal(once.prev_sample[0], twice.prev_sample[0])
    # (Per sample, not per element: where a noise value is near 0 the two draws give nearly the same element.)
    assert all(not torch.equal(once.prev_sample[i], twice.prev_sample[i]) for i in (1, 2))
    assert torch.equal(once.pred_original_sample, twice.pred_original_sample)
    with_noise = diffkern.ddpm_step(model_output, 0, sample, table, noise=noise, backend=backend)
    without = diffkern.ddpm_step(model_output, 0, sample, table, generator=torch.Generator().manual_seed(1),
                                 backend=backend)
    assert torch.equal(with_noise.prev_sample, without.prev_sample)


# ------------------------------------------------------------------------------------------------- fast backends

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_variance_types_match_reference(fast_backend, variance_type, dtype, table, randn, gen, device):
    for guidance in (dict(), dict(guidance_scale=4.0), dict(guidance_scale=4.0, guidance_rescale=0.7)):
        model_output, timestep, sample, kwargs = ddpm_inputs((3, 4, 5, 7), dtype, variance_type, guidance, randn,
                                                             gen, device)
        run_both(diffkern.ddpm_step, fast_backend, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_options_match_reference(fast_backend, case, dtype, table, randn, gen, device):
    model_output, timestep, sample, kwargs = ddpm_inputs((3, 4, 5, 7), dtype, "fixed_small", DDPM_CASES[case],
                                                         randn, gen, device)
    run_both(diffkern.ddpm_step, fast_backend, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_match_reference(fast_backend, shape, dtype, table, randn, gen, device):
    for variance_type in ("fixed_small", "learned_range"):
        model_output, timestep, sample, kwargs = ddpm_inputs(shape, dtype, variance_type, {}, randn, gen, device)
        kwargs["prev_timestep"] = timestep - torch.randint(1, 100, timestep.shape, generator=gen).to(device)
        run_both(diffkern.ddpm_step, fast_backend, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned_range"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_reference(fast_backend, dtype, variance_type, layout, table, randn, gen, device):
    model_output, timestep, sample, kwargs = ddpm_inputs((3, 5, 6, 7), dtype, variance_type,
                                                         dict(guidance_scale=2.0), randn, gen, device, layout=layout)
    prev, x0 = run_both(diffkern.ddpm_step, fast_backend, model_output, timestep, sample, table, **kwargs)
    if layout == "channels_last" and variance_type != "learned_range":  # a learned variance is made C-contiguous
        assert prev.is_contiguous(memory_format=torch.channels_last)
        assert x0.is_contiguous(memory_format=torch.channels_last)


# Host-timestep cases: (t, prev_timestep or None for t - 1, variance type, the implementation's options).
HOST_TIMESTEP_CASES = {
    "t0-final-thresholding": (0, -1, "fixed_small", dict(thresholding=True, dynamic_thresholding_ratio=0.9,
                                                         sample_max_value=2.0)),
    "learned_range-guided": (None, None, "learned_range", dict(guidance_scale=3.0)),
    "fixed_small_log-spaced-v": (None, 20, "fixed_small_log", dict(prediction_type="v_prediction")),
    "t1-to-0-thresholding-guided": (1, 0, "fixed_large", dict(thresholding=True, guidance_scale=2.0)),
    "learned-guided-rescale-thresholding": (None, None, "learned", dict(thresholding=True, guidance_scale=3.0,
                                                                       guidance_rescale=0.7)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(HOST_TIMESTEP_CASES))
def test_implementation_takes_python_int_timesteps(fast_backend, case, dtype, table, randn, gen, device):
    """The backend contract: python-int timesteps (kernel arguments, no device tensors; a negative
    prev_timestep means abar_prev = 1; no noise at t = 0) compute bit for bit what the equivalent int64 [1]
    tensors compute."""
    t, prev_spec, variance_type, overrides = HOST_TIMESTEP_CASES[case]
    options = dict(variance_type=variance_type, prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0,
                   thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, guidance_scale=None)
    options.update(overrides)
    if t is None:
        t = int(torch.randint(100, NUM_TRAIN, (), generator=gen))
    prev = t - 1 if prev_spec is None else (prev_spec if prev_spec <= 0 else t - prev_spec)
    shape = (3, 4, 5, 6)
    model_output = ddpm_model_output(randn, shape, variance_type, dtype, options["guidance_scale"] is not None)
    sample, noise = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    implementation = backends.implementation(fast_backend, "ddpm_step")
    check_host_timesteps_match_tensors(implementation, model_output, sample, noise, table, t, prev, device, **options)


def test_float64_runs_the_reference_math(fast_backend, table, randn, gen, device):
    x, model_output = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, 4, dtype=torch.float64)
    noise = randn(2, 3, 4, dtype=torch.float64)
    timestep = torch.randint(1, NUM_TRAIN, (2,), generator=gen).to(device)
    fast = diffkern.ddpm_step(model_output, timestep, x, table, noise=noise, backend=fast_backend)
    expected = diffkern.ddpm_step(model_output, timestep, x, table, noise=noise, backend="reference")
    assert torch.equal(fast.prev_sample, expected.prev_sample)
