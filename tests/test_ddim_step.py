"""ddim_step: the reference against float64 math and diffusers' DDIMScheduler, and every fast backend against the
reference over one case matrix (``DDIM_CASES``), shapes and layouts.

The fast-backend tests take ``fast_backend`` (``triton``, ``cuda``; see ``conftest``) and compare with the
reference through the one tolerance table on the same random inputs (fresh each run). (The Triton interpreter
rounds fp32 to bf16 by truncation where GPUs round to nearest even, so bf16 results may sit one bf16 ulp from
the reference: inside bf16's tolerance.)
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import diffkern
from _helpers import LAYOUTS, abar64, check_host_timesteps_match_tensors, run_both, step_tensors
from conftest import ON_GPU
from diffkern import backends
from diffkern.testing import assert_close
from test_flow_match_step import rescale_noise_cfg

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_TRAIN = 1000
SHAPES = [(1, 1), (3, 1), (1, 4, 5, 7), (3, 3, 11, 13), (2, 3, 41, 37)]
if ON_GPU:
    SHAPES += [(4, 4, 64, 64), (3, 4, 129, 131), (2, 16, 96, 96)]
SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]

# The case matrix: each option at least once; every case runs in every dtype on every fast backend.
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
    # guidance_rescale (the stats pass, then the step reading the per-sample factor)
    "guidance-rescale": dict(guidance_scale=7.5, guidance_rescale=0.7),
    "v-eta-guidance-rescale-1": dict(prediction_type="v_prediction", eta=1.0, noise=True, guidance_scale=5.0,
                                     guidance_rescale=1.0),
    "thresholding-sample-guidance-rescale-use_clipped": dict(prediction_type="sample", thresholding=True,
                                                             sample_max_value=1.5, guidance_scale=3.0,
                                                             guidance_rescale=0.5, use_clipped_model_output=True),
}
if ON_GPU:  # the full product of the options, where kernels run at full speed
    for prediction, guided, eta, post, use_clipped in itertools.product(
            ("epsilon", "v_prediction", "sample"), (False, True), (0.0, 1.0), ("none", "clip", "threshold"),
            (False, True)):
        DDIM_CASES[f"{prediction}-guided{guided}-eta{eta}-{post}-use_clipped{use_clipped}"] = dict(
            prediction_type=prediction, guidance_scale=7.5 if guided else None, eta=eta, noise=eta > 0,
            clip_sample=post == "clip", thresholding=post == "threshold", sample_max_value=1.5,
            dynamic_thresholding_ratio=0.9, use_clipped_model_output=use_clipped, final_alpha_cumprod=0.9991,
            guidance_rescale=0.7 if guided and prediction != "epsilon" else 0.0)


def ddim_inputs(shape, dtype, options, randn, gen, device, *, per_sample=True, layout="contiguous"):
    """(model_output, timestep, sample, kwargs) for ``ddim_step``; per-sample prev has a negative entry."""
    model_output, sample, options = step_tensors(shape, dtype, options, randn, layout)
    batch = shape[0]
    if per_sample:
        timestep = torch.randint(1, NUM_TRAIN, (batch,), generator=gen).to(device)
        prev = timestep - torch.randint(1, 300, (batch,), generator=gen).to(device)
        prev[0] = -1  # the final step: abar_prev = final_alpha_cumprod
    else:
        timestep = int(torch.randint(21, NUM_TRAIN, (1,), generator=gen))
        prev = timestep - 20
    return model_output, timestep, sample, dict(options, prev_timestep=prev)


# ------------------------------------------------------------------------------------------------- reference

def ddim64(model_output, sample, noise, a, a_prev, *, eta=0.0, prediction_type="epsilon", clip=None,
           threshold=None, use_clipped_model_output=False):
    """DDIM written out once more, in float64, for one sample with scalar coefficients."""
    x, m = sample.double(), model_output.double()
    if prediction_type == "epsilon":
        x0, eps = (x - math.sqrt(1 - a) * m) / math.sqrt(a), m
    elif prediction_type == "sample":
        x0, eps = m, (x - math.sqrt(a) * m) / math.sqrt(1 - a)
    else:
        x0, eps = math.sqrt(a) * x - math.sqrt(1 - a) * m, math.sqrt(a) * m + math.sqrt(1 - a) * x
    if threshold is not None:
        ratio, max_value = threshold
        s = min(max(torch.quantile(x0.abs().flatten(), ratio).item(), 1.0), max_value)
        x0 = x0.clamp(-s, s) / s
    elif clip is not None:
        x0 = x0.clamp(-clip, clip)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    if use_clipped_model_output:
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
    if eta > 0:
        prev = prev + sigma * noise.double()
    return prev, x0


# The math is checked in float64 (float64 samples get float64 coefficients). fp32 follows diffusers' fp32
# coefficient chain (checked against diffusers below); half precision is "fp32 inside, rounded once", checked
# bitwise in test_half_precision_is_fp32_rounded_once.
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_reference_matches_float64_formula(randn, gen, prediction_type):
    dtype = torch.float64
    table = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012))
    x, m, z = randn(3, 4, 5, 3, dtype=dtype), randn(3, 4, 5, 3, dtype=dtype), randn(3, 4, 5, 3, dtype=dtype)
    t = torch.randint(1, 1000, (3,), generator=gen)
    prev = t - torch.randint(1, 200, (3,), generator=gen)   # some negative: "use final_alpha_cumprod"
    for kwargs in (dict(eta=0.0), dict(eta=0.7, clip=1.0, use_clipped_model_output=True),
                   dict(eta=1.0, threshold=(0.9, 3.0))):
        out = diffkern.ddim_step(
            m, t, x, table, prev_timestep=prev, eta=kwargs["eta"], noise=z, prediction_type=prediction_type,
            clip_sample="clip" in kwargs, thresholding="threshold" in kwargs, dynamic_thresholding_ratio=0.9,
            sample_max_value=3.0, use_clipped_model_output=kwargs.get("use_clipped_model_output", False),
            final_alpha_cumprod=0.9991, backend="reference")
        for i in range(3):
            a, a_prev = abar64(table, int(t[i])), abar64(table, int(prev[i]), 0.9991)
            prev64, x064 = ddim64(m[i], x[i], z[i], a, a_prev, prediction_type=prediction_type, **kwargs)
            assert_close(out.prev_sample[i], prev64, msg=str(kwargs))
            assert_close(out.pred_original_sample[i], x064, msg=str(kwargs))


@pytest.mark.parametrize("schedule_config", SCHEDULES, ids=lambda s: s["beta_schedule"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("postprocess", ["none", "clip", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_reference_matches_diffusers(randn, gen, schedule_config, prediction_type, postprocess, eta):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    config = dict(prediction_type=prediction_type, clip_sample=postprocess == "clip", clip_sample_range=1.5,
                  thresholding=postprocess == "threshold", sample_max_value=2.0, set_alpha_to_one=False)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, **schedule_config, **config)
    sched.set_timesteps(20)
    x, model_output, noise = randn(2, 4, 6, 6, scale=1.5), randn(2, 4, 6, 6), randn(2, 4, 6, 6)
    for t in (int(sched.timesteps[0]), int(sched.timesteps[10]), int(sched.timesteps[-1])):
        prev_t = t - 1000 // 20
        use_clipped = postprocess != "none"
        theirs = sched.step(model_output, t, x, eta=eta, variance_noise=noise if eta else None,
                            use_clipped_model_output=use_clipped)
        ours = diffkern.ddim_step(
            model_output, t, x, sched.alphas_cumprod, prev_timestep=prev_t, eta=eta, noise=noise if eta else None,
            prediction_type=prediction_type, clip_sample=config["clip_sample"], clip_sample_range=1.5,
            thresholding=config["thresholding"], sample_max_value=2.0, use_clipped_model_output=use_clipped,
            final_alpha_cumprod=float(sched.final_alpha_cumprod), backend="reference")
        assert_close(ours.prev_sample, theirs.prev_sample, msg=f"t={t}")
        assert_close(ours.pred_original_sample, theirs.pred_original_sample, msg=f"t={t}")


def test_reference_full_loop_equals_diffusers(randn):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, **SCHEDULES[1], set_alpha_to_one=False,
                                    clip_sample=False)
    sched.set_timesteps(50)
    weights = randn(4, 4) * 0.3
    x_ours = x_theirs = randn(2, 4, 8, 8)

    def model(x):  # a fixed linear "noise predictor" over channels
        return torch.einsum("oc,bchw->bohw", weights, x)

    for t in sched.timesteps:
        x_theirs = sched.step(model(x_theirs), t, x_theirs).prev_sample
        prev_t = int(t) - 1000 // 50
        x_ours = diffkern.ddim_step(model(x_ours), t, x_ours, sched.alphas_cumprod, prev_timestep=prev_t,
                                    final_alpha_cumprod=float(sched.final_alpha_cumprod)).prev_sample
    assert_close(x_ours, x_theirs)


def test_eta_draws_noise_like_diffusers(randn):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, **SCHEDULES[0], clip_sample=False)
    sched.set_timesteps(10)
    x, m = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    theirs = sched.step(m, 500, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    ours = diffkern.ddim_step(m, 500, x, sched.alphas_cumprod, prev_timestep=400, eta=1.0,
                              generator=torch.Generator().manual_seed(7),
                              final_alpha_cumprod=float(sched.final_alpha_cumprod)).prev_sample
    assert_close(ours, theirs)


def test_per_sample_timesteps_equal_stepping_each_sample_alone(randn, gen):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m, z = randn(4, 3, 5, 5), randn(4, 3, 5, 5), randn(4, 3, 5, 5)
    t = torch.randint(0, 1000, (4,), generator=gen)
    prev = t - 37
    batched = diffkern.ddim_step(m, t, x, table, prev_timestep=prev, eta=0.5, noise=z, thresholding=True)
    for i in range(4):
        alone = diffkern.ddim_step(m[i:i + 1], int(t[i]), x[i:i + 1], table, prev_timestep=int(prev[i]), eta=0.5,
                                   noise=z[i:i + 1], thresholding=True)
        assert torch.equal(batched.prev_sample[i:i + 1], alone.prev_sample)
        assert torch.equal(batched.pred_original_sample[i:i + 1], alone.pred_original_sample)


def test_guidance_equals_guiding_first(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m2 = randn(2, 4, 4, 4), randn(4, 4, 4, 4)
    scale = 7.5
    guided = m2[:2] + scale * (m2[2:] - m2[:2])
    fused = diffkern.ddim_step(m2, 700, x, table, prev_timestep=650, guidance_scale=scale)
    plain = diffkern.ddim_step(guided, 700, x, table, prev_timestep=650)
    assert_close(fused.prev_sample, plain.prev_sample)
    assert_close(fused.pred_original_sample, plain.pred_original_sample)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guidance_rescale_matches_the_pipelines(any_backend, prediction_type, randn, device):
    """guidance_scale and guidance_rescale fused into the step equal the SDXL pipelines' formula (uncond + s (cond -
    uncond), then diffusers' rescale_noise_cfg) followed by DDIMScheduler.step, in float32: on the reference, bit
    for bit what the step computes from the pipelines' guided output, and diffusers' step within the fp32
    tolerance; on every backend within it. The zero-terminal-SNR schedule the rescale was made for included."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    rescale = rescale_noise_cfg()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, **SCHEDULES[1], set_alpha_to_one=False,
                                    clip_sample=False, prediction_type=prediction_type, timestep_spacing="trailing",
                                    rescale_betas_zero_snr=prediction_type == "v_prediction")
    sched.set_timesteps(25)
    scale, phi = 7.5, 0.7
    m, x = randn(4, 4, 9, 6), randn(2, 4, 9, 6, scale=1.5)
    uncond, cond = m.cpu().chunk(2)
    guided = rescale(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
    table = sched.alphas_cumprod.to(device)
    for i in (0, 12, 24):
        t = int(sched.timesteps[i])
        prev_t = t - 1000 // 25
        theirs = sched.step(guided, t, x.cpu())
        common = dict(prev_timestep=prev_t, prediction_type=prediction_type,
                      final_alpha_cumprod=float(sched.final_alpha_cumprod))
        ours = diffkern.ddim_step(m, t, x, table, guidance_scale=scale, guidance_rescale=phi, backend=any_backend,
                                  **common)
        assert_close(ours.prev_sample.cpu(), theirs.prev_sample, msg=f"t={t}")
        assert_close(ours.pred_original_sample.cpu(), theirs.pred_original_sample, msg=f"t={t}")
        if any_backend == "reference":
            plain = diffkern.ddim_step(guided.to(device), t, x, table, backend="reference", **common)
            assert torch.equal(ours.prev_sample, plain.prev_sample)
            assert torch.equal(ours.pred_original_sample, plain.pred_original_sample)


def test_guidance_rescale_zero_is_plain_guidance(any_backend, table, randn, device):
    """guidance_rescale=0 (the default) is guidance alone, bit for bit (no stats pass); r = 1 replaces the guided
    output by its std-matched version; per-sample timesteps equal each sample stepped alone."""
    x, m = randn(3, 4, 5, 6), randn(6, 4, 5, 6)
    t = torch.tensor([900, 500, 20], device=device)
    plain = diffkern.ddim_step(m, t, x, table, prev_timestep=t - 20, guidance_scale=5.0, backend=any_backend)
    zero = diffkern.ddim_step(m, t, x, table, prev_timestep=t - 20, guidance_scale=5.0, guidance_rescale=0.0,
                              backend=any_backend)
    assert torch.equal(plain.prev_sample, zero.prev_sample)
    rescaled = diffkern.ddim_step(m, t, x, table, prev_timestep=t - 20, guidance_scale=5.0, guidance_rescale=0.6,
                                  backend=any_backend)
    assert not torch.allclose(plain.prev_sample, rescaled.prev_sample)
    for i in range(3):
        alone = diffkern.ddim_step(torch.stack([m[i], m[3 + i]]), int(t[i]), x[i:i + 1], table,
                                   prev_timestep=int(t[i]) - 20, guidance_scale=5.0, guidance_rescale=0.6,
                                   backend=any_backend)
        assert torch.equal(rescaled.prev_sample[i:i + 1], alone.prev_sample)
        assert torch.equal(rescaled.pred_original_sample[i:i + 1], alone.pred_original_sample)


def test_guidance_rescale_of_samples_with_a_large_mean(any_backend, table, randn, device):
    """std over 70000 elements per sample whose mean is 200 times their std (several blocks of partial moments):
    no cancellation, against the reference (whose torch.std accumulates in float64 on the CPU)."""
    m, x = randn(4, 70000, shift=200.0), randn(2, 70000)
    kwargs = dict(prev_timestep=300, guidance_scale=3.0, guidance_rescale=0.8, prediction_type="v_prediction")
    ours = diffkern.ddim_step(m, 320, x, table, backend=any_backend, **kwargs)
    m64 = m.double()
    guided = m64[:2] + 3.0 * (m64[2:] - m64[:2])
    guided = 0.8 * guided * (m64[2:].std(dim=1, keepdim=True) / guided.std(dim=1, keepdim=True)) + 0.2 * guided
    expected = diffkern.ddim_step(guided, 320, x.double(), table.double(), prev_timestep=300,
                                  prediction_type="v_prediction", backend="reference")
    assert_close(ours.prev_sample, expected.prev_sample)
    assert_close(ours.pred_original_sample, expected.pred_original_sample)


def _bad_rescale_calls(device):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear")).to(device)
    x = torch.randn(2, 3, 4, device=device)
    m2 = torch.randn(4, 3, 4, device=device)

    def call(**kwargs):
        kwargs = dict(dict(model_output=m2, guidance_scale=3.0), **kwargs)
        return lambda: diffkern.ddim_step(kwargs.pop("model_output"), 500, x, table, prev_timestep=480, **kwargs)
    return {
        "negative": (call(guidance_rescale=-0.5), ValueError),
        "nan": (call(guidance_rescale=float("nan")), ValueError),
        "string": (call(guidance_rescale="0.7"), TypeError),
        "bool": (call(guidance_rescale=True), TypeError),
        "none": (call(guidance_rescale=None), TypeError),
        "without-guidance": (call(model_output=x, guidance_scale=None, guidance_rescale=0.7), ValueError),
    }


@pytest.mark.parametrize("case", list(_bad_rescale_calls("cpu")))
def test_bad_guidance_rescale_names_the_argument(case, device):
    bad, error = _bad_rescale_calls(device)[case]
    with pytest.raises(error, match="guidance_rescale"):
        bad()


def test_thresholding_quantile_matches_torch_quantile(randn):
    from diffkern.ops._common import dynamic_threshold_scale
    x0 = randn(3, 4, 9, 7, scale=2.0)
    expected = torch.quantile(x0.reshape(3, -1).abs(), 0.995, dim=1).clamp(1.0, 2.5)
    assert_close(dynamic_threshold_scale(x0, 0.995, 2.5), expected)


# ------------------------------------------------------------------------------------------------- fast backends

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_options_match_reference(fast_backend, case, dtype, table, randn, gen, device):
    model_output, timestep, sample, kwargs = ddim_inputs((3, 4, 7, 9), dtype, DDIM_CASES[case], randn, gen, device)
    run_both(diffkern.ddim_step, fast_backend, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_match_reference(fast_backend, shape, dtype, table, randn, gen, device):
    options = dict(eta=1.0, noise=True, guidance_scale=5.0)
    for per_sample in (True, False):
        model_output, timestep, sample, kwargs = ddim_inputs(shape, dtype, options, randn, gen, device,
                                                             per_sample=per_sample)
        run_both(diffkern.ddim_step, fast_backend, model_output, timestep, sample, table, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_reference(fast_backend, dtype, layout, table, randn, gen, device):
    options = dict(eta=1.0, noise=True, guidance_scale=4.0, thresholding=True)
    model_output, timestep, sample, kwargs = ddim_inputs((3, 5, 6, 7), dtype, options, randn, gen, device,
                                                         layout=layout)
    prev, x0 = run_both(diffkern.ddim_step, fast_backend, model_output, timestep, sample, table, **kwargs)
    if layout == "channels_last":
        assert prev.is_contiguous(memory_format=torch.channels_last)
        assert x0.is_contiguous(memory_format=torch.channels_last)


# Host-timestep cases: (prev_timestep: "final" is -1, else an offset below t; the implementation's options).
HOST_TIMESTEP_CASES = {
    "final-step-thresholding": ("final", dict(thresholding=True, dynamic_thresholding_ratio=0.9,
                                              sample_max_value=2.0, final_alpha_cumprod=0.9991)),
    "guided-eta-noise": (40, dict(eta=1.0, guidance_scale=4.0)),
    "v-clip-use_clipped": (120, dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.5,
                                     use_clipped_model_output=True)),
    "final-step-thresholding-guided-sample": ("final", dict(prediction_type="sample", thresholding=True,
                                                            guidance_scale=3.0, eta=0.5)),
    "guided-rescale-thresholding": (40, dict(thresholding=True, guidance_scale=4.0, guidance_rescale=0.7)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(HOST_TIMESTEP_CASES))
def test_implementation_takes_python_int_timesteps(fast_backend, case, dtype, table, randn, gen, device):
    """The backend contract: python-int timesteps (kernel arguments, no device tensors; a negative
    prev_timestep means final_alpha_cumprod, in the step and in the thresholding pass) compute bit for bit what
    the equivalent int64 [1] tensors compute."""
    prev_spec, overrides = HOST_TIMESTEP_CASES[case]
    options = dict(final_alpha_cumprod=1.0, eta=0.0, prediction_type="epsilon", clip_sample=False,
                   clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                   use_clipped_model_output=False, guidance_scale=None)
    options.update(overrides)
    batch, shape = 3, (4, 6, 5)
    guided = options["guidance_scale"] is not None
    model_output = randn(2 * batch if guided else batch, *shape, dtype=dtype)
    sample, noise = randn(batch, *shape, dtype=dtype), randn(batch, *shape, dtype=dtype)
    t = int(torch.randint(200, NUM_TRAIN, (), generator=gen))
    prev = -1 if prev_spec == "final" else t - prev_spec
    implementation = backends.implementation(fast_backend, "ddim_step")
    by_tensor = check_host_timesteps_match_tensors(implementation, model_output, sample, noise, table, t, prev,
                                                   device, **options)
    # One host and one tensor timestep mix too.
    mixed = implementation(model_output, sample, noise, table, torch.tensor([t], device=device), prev, **options)
    for ours, expected in zip(mixed, by_tensor):
        assert torch.equal(ours, expected)


def test_float64_runs_the_reference_math(fast_backend, table, randn, gen, device):
    x, model_output = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, 4, dtype=torch.float64)
    timestep = torch.randint(1, NUM_TRAIN, (2,), generator=gen).to(device)
    fast = diffkern.ddim_step(model_output, timestep, x, table, prev_timestep=timestep - 1, backend=fast_backend)
    expected = diffkern.ddim_step(model_output, timestep, x, table, prev_timestep=timestep - 1, backend="reference")
    assert torch.equal(fast.prev_sample, expected.prev_sample)


def test_a_sampling_loop_compiles_as_one_graph(fast_backend, table, randn, device):
    """A loop over the op compiles with fullgraph=True (the op is opaque to the compiler) and computes what the
    eager reference loop computes."""
    steps = [(999, 666), (666, 333), (333, -1)]
    sample = randn(2, 3, 6, 5)
    model_outputs = [randn(4, 3, 6, 5) for _ in steps]

    def loop(x, outputs, backend):
        for (t, t_prev), model_output in zip(steps, outputs):
            x = diffkern.ddim_step(model_output, t, x, table, prev_timestep=t_prev, guidance_scale=2.0,
                                   backend=backend).prev_sample
        return x

    torch._dynamo.reset()
    result = torch.compile(loop, fullgraph=True)(sample, model_outputs, fast_backend)
    assert backends.last_backend("ddim_step") == fast_backend
    assert_close(result, loop(sample, model_outputs, "reference"))
