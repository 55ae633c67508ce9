"""The reference add_noise / DDIM / DDPM steps against formulas written out in float64 and against
diffusers' schedulers (the drop-in promise), on random inputs drawn fresh each run."""

import math

import pytest
import torch

import diffkern
from diffkern import backends
from diffkern.testing import assert_close

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]


# ----------------------------------------------------------------------------------------------- float64 truth
def abar64(table, t, final=1.0):
    return float(table[t]) if t >= 0 else final


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


def ddpm64(model_output, sample, noise, a, a_prev, t, *, variance_type="fixed_small", prediction_type="epsilon",
           clip=None, predicted_variance=None):
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


# -------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_make_betas_matches_diffusers(name):
    kwargs = dict(beta_start=0.00085, beta_end=0.012) if name == "scaled_linear" else {}
    ours = diffkern.make_betas(name, 1000, **kwargs)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs).betas
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert_close(theirs, ours)
    assert_close(DDPMScheduler(beta_schedule=name, **kwargs).alphas_cumprod, diffkern.alphas_cumprod(ours))


def test_quadratic_and_cosine_aliases():
    q = diffkern.make_betas("quadratic", 10, 1e-4, 0.02)
    assert_close(q, torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 10, dtype=torch.float64) ** 2)
    assert torch.equal(diffkern.make_betas("cosine", 50), diffkern.make_betas("squaredcos_cap_v2", 50))


def test_rescale_zero_snr_matches_diffusers():
    ours = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012, rescale_zero_snr=True))
    theirs = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           rescale_betas_zero_snr=True).alphas_cumprod
    assert ours[-1] == 0
    assert_close(theirs[:-1], ours[:-1])


def test_noise_schedule_caches_float32_table():
    sched = diffkern.NoiseSchedule.from_name("linear", 100)
    table = sched.table("cpu")
    assert table.dtype == torch.float32 and sched.table("cpu") is table
    assert_close(table, sched.alphas_cumprod)


def test_make_betas_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        diffkern.make_betas("exponential")


# -------------------------------------------------------------------------------------------------- add_noise
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_add_noise_matches_float64_formula(randn, gen, dtype):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x0, noise = randn(3, 4, 5, 7, dtype=dtype), randn(3, 4, 5, 7, dtype=dtype)
    t = torch.randint(0, 1000, (3,), generator=gen)
    out = diffkern.add_noise(x0, noise, t, table, backend="reference")
    a = table[t].view(3, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert out.dtype == dtype and backends.last_backend("add_noise") == "reference"
    assert_close(out, expected)


def test_add_noise_matches_diffusers_fp32(randn, gen):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = randn(4, 4, 8, 8), randn(4, 4, 8, 8)
    t = torch.randint(0, 1000, (4,), generator=gen)
    assert_close(diffkern.add_noise(x0, noise, t, sched.alphas_cumprod), sched.add_noise(x0, noise, t))


def test_add_noise_adds_noise_in_bf16_at_small_t(randn):
    # diffusers rounds abar to bf16 first: abar_1 rounds to 1.0 and no noise is added at all.
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x0, noise = randn(2, 64, dtype=torch.bfloat16), randn(2, 64, dtype=torch.bfloat16, scale=10.0)
    out = diffkern.add_noise(x0, noise, 1, table)
    assert not torch.equal(out, x0)
    assert_close(out, table[1].sqrt() * x0.double() + (1 - table[1]).sqrt() * noise.double())


def test_add_noise_timestep_forms_agree(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear")).float()
    x0, noise = randn(2, 3, 4), randn(2, 3, 4)
    by_int = diffkern.add_noise(x0, noise, 17, table)
    assert torch.equal(by_int, diffkern.add_noise(x0, noise, torch.tensor(17), table))
    assert torch.equal(by_int, diffkern.add_noise(x0, noise, torch.tensor([17, 17]), table))


def test_add_noise_keeps_channels_last(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x0 = randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    noise = randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    out = diffkern.add_noise(x0, noise, torch.tensor([3, 900]), table)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, diffkern.add_noise(x0.contiguous(), noise.contiguous(), torch.tensor([3, 900]), table))


# ------------------------------------------------------------------------------------------------------- DDIM
def ddim_scheduler(schedule, **config):
    return DDIMScheduler(num_train_timesteps=1000, **schedule, **config)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("postprocess", ["none", "clip", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(randn, gen, schedule, prediction_type, postprocess, eta):
    config = dict(prediction_type=prediction_type, clip_sample=postprocess == "clip", clip_sample_range=1.5,
                  thresholding=postprocess == "threshold", sample_max_value=2.0, set_alpha_to_one=False)
    sched = ddim_scheduler(schedule, **config)
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


# The math is checked in float64 (float64 samples get float64 coefficients). fp32 follows diffusers' fp32
# coefficient chain (checked against diffusers above); half precision is "fp32 inside, rounded once", checked
# bitwise in test_half_precision_is_fp32_rounded_once.
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_matches_float64_formula(randn, gen, prediction_type):
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


def test_ddim_full_loop_equals_diffusers(randn):
    sched = ddim_scheduler(SCHEDULES[1], set_alpha_to_one=False, clip_sample=False)
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


def test_ddim_eta_draws_noise_like_diffusers(randn):
    sched = ddim_scheduler(SCHEDULES[0], clip_sample=False)
    sched.set_timesteps(10)
    x, m = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    theirs = sched.step(m, 500, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    ours = diffkern.ddim_step(m, 500, x, sched.alphas_cumprod, prev_timestep=400, eta=1.0,
                              generator=torch.Generator().manual_seed(7),
                              final_alpha_cumprod=float(sched.final_alpha_cumprod)).prev_sample
    assert_close(ours, theirs)


def test_ddim_per_sample_timesteps_equal_stepping_each_sample_alone(randn, gen):
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


def test_ddim_guidance_equals_guiding_first(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m2 = randn(2, 4, 4, 4), randn(4, 4, 4, 4)
    scale = 7.5
    guided = m2[:2] + scale * (m2[2:] - m2[:2])
    fused = diffkern.ddim_step(m2, 700, x, table, prev_timestep=650, guidance_scale=scale)
    plain = diffkern.ddim_step(guided, 700, x, table, prev_timestep=650)
    assert_close(fused.prev_sample, plain.prev_sample)
    assert_close(fused.pred_original_sample, plain.pred_original_sample)


def test_thresholding_quantile_matches_torch_quantile(randn):
    from diffkern.ops._common import dynamic_threshold_scale
    x0 = randn(3, 4, 9, 7, scale=2.0)
    expected = torch.quantile(x0.reshape(3, -1).abs(), 0.995, dim=1).clamp(1.0, 2.5)
    assert_close(dynamic_threshold_scale(x0, 0.995, 2.5), expected)


# ------------------------------------------------------------------------------------------------------- DDPM
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("postprocess", ["none", "clip", "threshold"])
def test_ddpm_matches_diffusers(randn, variance_type, prediction_type, postprocess):
    sched = DDPMScheduler(beta_schedule="linear", variance_type=variance_type, prediction_type=prediction_type,
                          clip_sample=postprocess == "clip", clip_sample_range=1.5,
                          thresholding=postprocess == "threshold", sample_max_value=2.0)
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


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES + ["fixed_large_log"])
def test_ddpm_matches_float64_formula(randn, gen, variance_type):
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


def test_ddpm_fixed_large_log_is_finite_unlike_diffusers(randn):
    sched = DDPMScheduler(variance_type="fixed_large_log")
    x, m = randn(1, 2, 3, 3), randn(1, 2, 3, 3)
    assert torch.isnan(sched.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    ours = diffkern.ddpm_step(m, 500, x, sched.alphas_cumprod, variance_type="fixed_large_log",
                              generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ours.prev_sample).all()


def test_ddpm_prev_timestep_default_and_spacing(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m, z = randn(2, 3, 4), randn(2, 3, 4), randn(2, 3, 4)
    default = diffkern.ddpm_step(m, 321, x, table, noise=z)
    explicit = diffkern.ddpm_step(m, 321, x, table, noise=z, prev_timestep=320)
    spaced = diffkern.ddpm_step(m, 321, x, table, noise=z, prev_timestep=301)
    assert torch.equal(default.prev_sample, explicit.prev_sample)
    assert not torch.allclose(default.prev_sample, spaced.prev_sample)


def test_ddpm_per_sample_timesteps_equal_stepping_each_sample_alone(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m, z = randn(3, 3, 4, 4), randn(3, 3, 4, 4), randn(3, 3, 4, 4)
    t = torch.tensor([0, 250, 999])
    batched = diffkern.ddpm_step(m, t, x, table, noise=z, variance_type="fixed_large")
    for i in range(3):
        alone = diffkern.ddpm_step(m[i:i + 1], int(t[i]), x[i:i + 1], table, noise=z[i:i + 1],
                                   variance_type="fixed_large")
        assert torch.equal(batched.prev_sample[i:i + 1], alone.prev_sample)


def test_ddpm_no_noise_at_t0(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, m = randn(2, 3, 4), randn(2, 3, 4)
    with_noise = diffkern.ddpm_step(m, 0, x, table, noise=randn(2, 3, 4, scale=5.0))
    without = diffkern.ddpm_step(m, 0, x, table, generator=torch.Generator().manual_seed(1))
    assert torch.equal(with_noise.prev_sample, without.prev_sample)


def test_ddpm_learned_guidance_takes_variance_from_conditional_half(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    m2 = randn(4, 6, 4, 4)
    guided = torch.cat([m2[:2, :3] + 4.0 * (m2[2:, :3] - m2[:2, :3]), m2[2:, 3:]], dim=1)
    fused = diffkern.ddpm_step(m2, 600, x, table, noise=z, variance_type="learned_range", guidance_scale=4.0)
    plain = diffkern.ddpm_step(guided, 600, x, table, noise=z, variance_type="learned_range")
    assert_close(fused.prev_sample, plain.prev_sample)


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
