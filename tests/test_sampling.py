"""``diffkern.sample``: the device-side loop against a hand-written loop over ``ddim_step``/``ddpm_step``.

The hand-written loop is the plainest possible: Python-int timesteps, guidance applied by hand to the model
output, one step call per timestep, noise from a generator seeded like ``sample``'s. Inputs are random and
fresh each run (see ``conftest``); comparisons use the one tolerance table. On a GPU, the captured (CUDA graph)
loop must equal the eager one, and the eager loop must never wait for the device.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ON_GPU
from diffkern.ops.ddim import ddim_step
from diffkern.ops.ddpm import ddpm_step
from diffkern.sampling import sample
from diffkern.schedules import alphas_cumprod, make_betas
from diffkern.testing import assert_close

NUM_TRAIN = 1000
TABLE = alphas_cumprod(make_betas("scaled_linear", NUM_TRAIN, 0.00085, 0.012))  # float64, CPU
SHAPE = (2, 3, 8, 8)

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and host syncs need a GPU")


def seed_from(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def make_model(randn, channels: int, out_channels: int, batch: int):
    """A random smooth function of (x, t); each of the ``batch`` samples gets its own offset, so the two halves
    of a doubled (guidance) batch give different predictions."""
    weight = randn(out_channels, channels) / math.sqrt(channels)
    offsets, freq = randn(batch, out_channels), randn(out_channels) * 0.01

    def model(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).to(x.dtype)
        z = torch.einsum("oc,bc...->bo...", weight.to(x.dtype), x)
        shift = (offsets[: x.shape[0]] * torch.cos(freq * t.float())).to(x.dtype)
        return torch.tanh(z + shift.reshape(*shift.shape, *([1] * (x.ndim - 2))))

    return model


def guided(out: torch.Tensor, scale: float, channels: int, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance by hand: uncond + s (cond - uncond) on the first ``channels`` channels, then with
    ``rescale`` r the pipelines' std matching r (g std(cond) / std(g)) + (1 - r) g over those channels; extra
    (variance) channels come from the conditional half."""
    uncond, cond = out.chunk(2)
    mixed = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    if rescale:
        dims = list(range(1, mixed.ndim))
        ratio = cond[:, :channels].std(dim=dims, keepdim=True) / mixed.std(dim=dims, keepdim=True)
        mixed = rescale * (mixed * ratio) + (1 - rescale) * mixed
    return torch.cat([mixed, cond[:, channels:]], dim=1)


def hand_loop(method, model, x, timesteps, *, seed, device, eta=0.0, guidance_scale=None, prev_timesteps=None,
              guidance_rescale=0.0, **options):
    """``sample``'s loop by hand, with diffusers' previous-timestep rules written out: DDIM t - T // n, DDPM the
    next entry (or ``prev_timesteps``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    ts = timesteps.tolist()
    for i, t in enumerate(ts):
        if prev_timesteps is not None:
            prev = int(prev_timesteps[i])
        elif method == "ddim":
            prev = t - NUM_TRAIN // len(ts)
        else:
            prev = ts[i + 1] if i + 1 < len(ts) else -1
        out = model(torch.cat([x, x]) if guidance_scale is not None else x, t)
        if guidance_scale is not None:
            out = guided(out, guidance_scale, x.shape[1], guidance_rescale)
        if method == "ddim":
            x = ddim_step(out, t, x, TABLE, prev_timestep=prev, eta=eta, generator=generator, **options).prev_sample
        else:
            x = ddpm_step(out, t, x, TABLE, prev_timestep=prev, generator=generator, **options).prev_sample
    return x


def random_timesteps(gen, n: int) -> torch.Tensor:
    """n distinct timesteps, strictly descending, irregularly spaced."""
    return torch.randperm(NUM_TRAIN, generator=gen)[:n].sort(descending=True).values


@pytest.mark.parametrize("guidance_scale", [None, 3.5])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_hand_loop(randn, gen, device, eta, guidance_scale):
    batch = SHAPE[0] * (2 if guidance_scale is not None else 1)
    model, x_T, seed = make_model(randn, 3, 3, batch), randn(*SHAPE), seed_from(gen)
    timesteps = random_timesteps(gen, 8)
    expected = hand_loop("ddim", model, x_T, timesteps, seed=seed, device=device, eta=eta,
                         guidance_scale=guidance_scale)
    actual = sample(model, x_T, TABLE, timesteps.to(device), method="ddim", eta=eta, guidance_scale=guidance_scale,
                    generator=torch.Generator(device=device).manual_seed(seed))
    assert_close(actual, expected)


def test_explicit_previous_timesteps(randn, gen, device):
    model, x_T, seed = make_model(randn, 3, 3, SHAPE[0]), randn(*SHAPE), seed_from(gen)
    timesteps = random_timesteps(gen, 7)
    to_next = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
    expected = hand_loop("ddim", model, x_T, timesteps, seed=seed, device=device, prev_timesteps=to_next)
    actual = sample(model, x_T, TABLE, timesteps.to(device), prev_timesteps=to_next.to(device))
    assert_close(actual, expected)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [6, 7])
def test_ddim_steps_where_diffusers_ddim_scheduler_steps(randn, gen, spacing, steps):
    """The loop a user replaces: ``DDIMScheduler`` goes from t to t - N // n for every spacing."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    model, x = make_model(randn, 3, 3, SHAPE[0]), randn(*SHAPE)
    expected = x
    for t in scheduler.timesteps:
        expected = scheduler.step(model(expected, t), t, expected).prev_sample
    actual = sample(model, x, scheduler.alphas_cumprod, scheduler.timesteps,
                    final_alpha_cumprod=float(scheduler.final_alpha_cumprod), backend="reference")
    assert_close(actual, expected)


@pytest.mark.parametrize("options", [
    dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.5),
    dict(prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
    dict(prediction_type="epsilon", clip_sample=True, use_clipped_model_output=True, final_alpha_cumprod=0.99),
], ids=["v_clip", "sample_threshold", "eps_clipped_output"])
def test_ddim_step_options_pass_through(randn, gen, device, options):
    model, x_T, seed = make_model(randn, 3, 3, SHAPE[0]), randn(*SHAPE), seed_from(gen)
    timesteps = random_timesteps(gen, 6)
    expected = hand_loop("ddim", model, x_T, timesteps, seed=seed, device=device, eta=0.5, **options)
    actual = sample(model, x_T, TABLE, timesteps, eta=0.5, generator=torch.Generator(device=device).manual_seed(seed),
                    **options)
    assert_close(actual, expected)


@pytest.mark.parametrize("guidance_scale", [None, 2.0])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_matches_hand_loop(randn, gen, device, variance_type, guidance_scale):
    batch = SHAPE[0] * (2 if guidance_scale is not None else 1)
    out_channels = 6 if variance_type == "learned_range" else 3
    model, x_T, seed = make_model(randn, 3, out_channels, batch), randn(*SHAPE), seed_from(gen)
    # Ends at t = 0, the step without noise.
    timesteps = torch.cat([random_timesteps(gen, 7)[:-1].clamp(min=1), torch.zeros(1, dtype=torch.int64)])
    timesteps = timesteps.unique().flip(0)
    options = dict(variance_type=variance_type, prediction_type="epsilon", clip_sample=True)
    expected = hand_loop("ddpm", model, x_T, timesteps, seed=seed, device=device, guidance_scale=guidance_scale,
                         **options)
    actual = sample(model, x_T, TABLE, timesteps, method="ddpm", guidance_scale=guidance_scale,
                    generator=torch.Generator(device=device).manual_seed(seed), **options)
    assert_close(actual, expected)


@pytest.mark.parametrize("method, variance_type", [("ddim", None), ("ddpm", "fixed_small"),
                                                   ("ddpm", "learned_range")])
def test_guidance_rescale_matches_hand_loop(any_backend, randn, gen, device, method, variance_type):
    """guidance_rescale through the loop: the pipelines' guidance and rescale_noise_cfg by hand, then the step."""
    out_channels = 6 if variance_type == "learned_range" else 3
    model, x_T, seed = make_model(randn, 3, out_channels, 2 * SHAPE[0]), randn(*SHAPE), seed_from(gen)
    timesteps = random_timesteps(gen, 6)
    options = dict(prediction_type="v_prediction")
    if variance_type is not None:
        options["variance_type"] = variance_type
    extra = dict(eta=0.5) if method == "ddim" else {}
    expected = hand_loop(method, model, x_T, timesteps, seed=seed, device=device, guidance_scale=5.0,
                         guidance_rescale=0.7, backend="reference", **extra, **options)
    actual = sample(model, x_T, TABLE, timesteps, method=method, guidance_scale=5.0, guidance_rescale=0.7,
                    generator=torch.Generator(device=device).manual_seed(seed), backend=any_backend, **extra,
                    **options)
    assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_sample_keeps_dtype_with_channels_last_input(randn, gen, device, dtype):
    model, seed = make_model(randn, 3, 3, SHAPE[0]), seed_from(gen)
    x_T = randn(*SHAPE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    timesteps = random_timesteps(gen, 4).to(torch.int32)
    expected = hand_loop("ddim", model, x_T, timesteps, seed=seed, device=device)
    actual = sample(model, x_T, TABLE, timesteps, generator=torch.Generator(device=device).manual_seed(seed))
    assert actual.dtype == dtype
    assert_close(actual, expected)


def test_single_timestep(randn, gen, device):
    model, x_T = make_model(randn, 3, 3, SHAPE[0]), randn(*SHAPE)
    t = int(torch.randint(1, NUM_TRAIN, (1,), generator=gen))
    expected = ddim_step(model(x_T, t), t, x_T, TABLE, prev_timestep=-1).prev_sample
    assert_close(sample(model, x_T, TABLE, torch.tensor([t])), expected)


def test_sample_rejects_bad_arguments(randn):
    x_T, model = randn(*SHAPE), (lambda x, t: x)
    ts = torch.tensor([900, 500, 100])
    cases = [
        (TypeError, "model_fn", dict(model_fn=None)),
        (ValueError, "method", dict(method="euler")),
        (TypeError, "timesteps", dict(timesteps=[900, 500])),
        (TypeError, "timesteps", dict(timesteps=ts.float())),
        (ValueError, "timesteps", dict(timesteps=ts.reshape(1, 3))),
        (ValueError, "descending", dict(timesteps=torch.tensor([100, 500, 900]))),
        (ValueError, "descending", dict(timesteps=torch.tensor([900, 900, 100]))),
        (ValueError, "timesteps", dict(timesteps=torch.tensor([NUM_TRAIN, 10]))),
        (ValueError, "eta", dict(eta=-0.5)),
        (ValueError, "eta", dict(method="ddpm", eta=0.5)),
        (TypeError, "generator", dict(generator=0)),
        (TypeError, "capture", dict(capture="yes")),
        (TypeError, "variance_type", dict(variance_type="fixed_small")),  # a DDPM option given to DDIM
        (ValueError, "backend", dict(backend="fastest")),
        (ValueError, "guidance_rescale", dict(guidance_rescale=0.7)),  # without guidance_scale
        (ValueError, "guidance_rescale", dict(guidance_scale=3.0, guidance_rescale=-0.1)),
        (TypeError, "guidance_rescale", dict(method="ddpm", guidance_scale=3.0, guidance_rescale="0.7")),
        (ValueError, "stochastic", dict(stochastic=True)),  # a flow_euler option
    ]
    for error, match, override in cases:
        kwargs = dict(model_fn=model, x_T=x_T, alphas_cumprod=TABLE, timesteps=ts)
        kwargs.update(override)
        with pytest.raises(error, match=match):
            sample(**kwargs)
    with pytest.raises(TypeError, match="model_fn must return a torch.Tensor"):
        sample(lambda x, t: {"sample": x}, x_T, TABLE, ts)


@pytest.mark.skipif(ON_GPU, reason="checks the error on CPU tensors")
def test_capture_needs_cuda_tensors(randn):
    with pytest.raises(ValueError, match="capture=True .* CUDA"):
        sample(lambda x, t: x, randn(*SHAPE), TABLE, torch.tensor([900, 100]), capture=True)


# --- on a GPU ----------------------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("method,eta,guidance_scale,variance_type", [
    ("ddim", 0.0, None, None),
    ("ddim", 0.8, 4.0, None),
    ("ddpm", 0.0, None, "fixed_small"),
    ("ddpm", 0.0, 2.0, "learned_range"),
])
def test_captured_loop_equals_eager(randn, gen, device, backend, method, eta, guidance_scale, variance_type):
    batch = SHAPE[0] * (2 if guidance_scale is not None else 1)
    out_channels = 6 if variance_type == "learned_range" else 3
    model, x_T, seed = make_model(randn, 3, out_channels, batch), randn(*SHAPE), seed_from(gen)
    timesteps = random_timesteps(gen, 12).to(device)
    options = dict(variance_type=variance_type) if method == "ddpm" else {}
    common = dict(method=method, eta=eta, guidance_scale=guidance_scale, backend=backend, **options)
    eager_gen = torch.Generator(device=device).manual_seed(seed)
    eager = sample(model, x_T, TABLE, timesteps, generator=eager_gen, **common)
    graph_gen = torch.Generator(device=device).manual_seed(seed)
    captured = sample(model, x_T, TABLE, timesteps, generator=graph_gen, capture=True, **common)
    assert_close(captured, eager)
    # The replays advanced the generator exactly as the eager steps did.
    assert torch.equal(graph_gen.get_state(), eager_gen.get_state())
    # The default CUDA generator (generator=None) is captured too.
    torch.cuda.manual_seed(seed)
    eager = sample(model, x_T, TABLE, timesteps, **common)
    torch.cuda.manual_seed(seed)
    assert_close(sample(model, x_T, TABLE, timesteps, capture=True, **common), eager)


@needs_gpu
@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_eager_loop_never_waits_for_the_device(randn, gen, device, method):
    model, x_T, seed = make_model(randn, 3, 3, SHAPE[0]), randn(*SHAPE), seed_from(gen)
    timesteps = random_timesteps(gen, 6).to(device)
    table = TABLE.to(device=device, dtype=torch.float32)
    eta = 0.5 if method == "ddim" else 0.0
    generator = torch.Generator(device=device).manual_seed(seed)
    expected = sample(model, x_T, table, timesteps, method=method, eta=eta, generator=generator)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        actual = sample(model, x_T, table, timesteps, method=method, eta=eta,
                        generator=generator.manual_seed(seed))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(actual, expected)
