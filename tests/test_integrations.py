"""diffusers integration: the fused schedulers against diffusers' own, and GroupNorm -> SiLU patching.

Every comparison runs the stock and the fused path on the same random inputs (fresh each run, see ``conftest``)
and the same generator seeds, and compares with the one tolerance table of ``diffkern.testing``. The model in
the scheduler loops is a cheap random function of (x, t): the loops test the schedulers, not a network. The
patching tests use tiny random-init diffusers models, with the GroupNorm affine parameters randomised too.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ON_GPU
from diffkern.ops.group_norm_silu import GroupNormSiLU
from diffkern.patching import patch_groupnorm_silu, unpatch_groupnorm_silu
from diffkern.testing import assert_close

try:
    import diffusers
    from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,
                           UNet2DModel)
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

    from diffkern.integrations.diffusers import FusedDDIMScheduler, FusedDDPMScheduler
except ImportError:  # diffusers is optional
    diffusers = None

needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed "
                                                               "(pip install diffkern[diffusers])")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU: host syncs and device timesteps exist only there")

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# How the predicted x0 is post-processed: options chosen so that clipping and thresholding really act.
X0_MODES = {
    "none": dict(clip_sample=False, thresholding=False),
    "clip": dict(clip_sample=True, clip_sample_range=0.8, thresholding=False),
    "threshold": dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
}
SHAPE = (2, 3, 8, 8)


def seed_from(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def make_model(randn, channels: int, out_channels: int):
    """A random smooth function of (x, t) shaped like a denoiser: [B, C, ...] -> [B, out_channels, ...]."""
    weight = randn(out_channels, channels) / math.sqrt(channels)
    bias, freq = randn(out_channels), randn(out_channels) * 0.01

    def model(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1, 1)
        z = torch.einsum("oc,bc...->bo...", weight.to(x.dtype), x)
        shift = (bias * torch.cos(freq * t)).reshape(*t.shape[:1], -1, *([1] * (x.ndim - 2)))
        return torch.tanh(z + shift)

    return model


def run_loop(scheduler, model, x, seed, *, num_inference_steps=None, custom_timesteps=None, device="cpu",
             output_map=lambda out: out, **step_kwargs):
    """A diffusers pipeline's loop: set_timesteps, then scale_model_input -> model -> step per timestep."""
    if custom_timesteps is not None:
        scheduler.set_timesteps(timesteps=custom_timesteps, device=device)
    elif num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    x0 = None
    for t in scheduler.timesteps:
        out = output_map(model(scheduler.scale_model_input(x, t), t))
        x, x0 = scheduler.step(out, t, x, generator=generator, return_dict=False, **step_kwargs)
    return x, x0


def public_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


# --- import isolation --------------------------------------------------------------------------------------------

def test_importing_diffkern_does_not_import_diffusers():
    # One interpreter for both checks (starting one costs seconds). Then sys.modules["diffusers"] = None makes
    # "import diffusers" fail as if it were not installed: the integration must say how to install it.
    code = """if True:
        import sys
        import diffkern, diffkern.integrations, diffkern.patching, diffkern.sampling
        loaded = sorted(m for m in sys.modules if m == "diffusers" or m.startswith("diffusers."))
        assert not loaded, loaded
        sys.modules["diffusers"] = None
        try:
            import diffkern.integrations.diffusers
        except ImportError as exc:
            assert "pip install diffkern[diffusers]" in str(exc), str(exc)
        else:
            raise SystemExit("diffkern.integrations.diffusers imported without diffusers")
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- FusedDDIMScheduler ------------------------------------------------------------------------------------------

@needs_diffusers
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("x0_mode", list(X0_MODES))
@pytest.mark.parametrize("eta,use_clipped_model_output", [(0.0, False), (0.8, False), (0.8, True)])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_loop_matches_diffusers(randn, gen, prediction_type, eta, use_clipped_model_output, x0_mode,
                                     set_alpha_to_one):
    config = dict(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, **X0_MODES[x0_mode])
    stock, fused = DDIMScheduler(**config), FusedDDIMScheduler(**config)
    model, x_T, seed = make_model(randn, 3, 3), randn(*SHAPE), seed_from(gen)
    kwargs = dict(num_inference_steps=10, eta=eta, use_clipped_model_output=use_clipped_model_output)
    expected, expected_x0 = run_loop(stock, model, x_T, seed, **kwargs)
    actual, actual_x0 = run_loop(fused, model, x_T, seed, **kwargs)
    assert_close(actual, expected)
    assert_close(actual_x0, expected_x0)


@needs_diffusers
@pytest.mark.parametrize("config", [
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace"),
    dict(steps_offset=1),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
], ids=["trailing", "linspace", "offset", "scaled_linear", "cosine", "zero_snr"])
def test_ddim_schedule_options_match_diffusers(randn, gen, config):
    stock, fused = DDIMScheduler(**config), FusedDDIMScheduler(**config)
    model, x_T, seed = make_model(randn, 3, 3), randn(*SHAPE), seed_from(gen)
    # 7 steps: 1000 // 7 does not divide evenly, so "t - N // n" and the spacings disagree somewhere.
    expected, _ = run_loop(stock, model, x_T, seed, num_inference_steps=7, eta=0.5)
    actual, _ = run_loop(fused, model, x_T, seed, num_inference_steps=7, eta=0.5)
    assert_close(actual, expected)


@needs_diffusers
def test_ddim_step_outputs_and_timestep_forms(randn):
    stock, fused = DDIMScheduler(), FusedDDIMScheduler()
    for scheduler in (stock, fused):
        scheduler.set_timesteps(20)
    x, m, z = randn(*SHAPE), randn(*SHAPE), randn(*SHAPE)
    t = int(stock.timesteps[5])
    expected = stock.step(m, t, x, eta=0.6, variance_noise=z)
    out = fused.step(m, t, x, eta=0.6, variance_noise=z)
    assert isinstance(out, DDIMSchedulerOutput)
    assert_close(out.prev_sample, expected.prev_sample)
    assert_close(out.pred_original_sample, expected.pred_original_sample)
    for form in (torch.tensor(t), np.int64(t), torch.tensor([t, t])):
        prev, x0 = fused.step(m, form, x, eta=0.6, variance_noise=z, return_dict=False)
        assert_close(prev, expected.prev_sample)
        assert_close(x0, expected.pred_original_sample)


@needs_diffusers
def test_ddim_per_sample_timesteps_match_separate_steps(randn):
    stock, fused = DDIMScheduler(), FusedDDIMScheduler()
    for scheduler in (stock, fused):
        scheduler.set_timesteps(25)
    x, m = randn(*SHAPE), randn(*SHAPE)
    ts = [int(stock.timesteps[3]), int(stock.timesteps[-1])]  # the second one steps past t = 0
    prev, x0 = fused.step(m, torch.tensor(ts), x, return_dict=False)
    for i, t in enumerate(ts):
        expected = stock.step(m[i:i + 1], t, x[i:i + 1])
        assert_close(prev[i:i + 1], expected.prev_sample)
        assert_close(x0[i:i + 1], expected.pred_original_sample)


@needs_diffusers
def test_ddim_step_errors(randn):
    fused = FusedDDIMScheduler()
    x = randn(*SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        fused.step(x, 10, x)
    fused.set_timesteps(10)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        fused.step(x, 900, x, eta=1.0, variance_noise=x, generator=torch.Generator())
    with pytest.raises(TypeError, match="timestep"):
        fused.step(x, 900.0, x)
    with pytest.raises(TypeError, match="model_output"):
        fused.step(x.numpy(), 900, x)
    with pytest.raises(ValueError, match="timestep"):
        fused.step(x, 1000, x)


# --- FusedDDPMScheduler ------------------------------------------------------------------------------------------

def _variance_output_map(variance_type: str):
    """Model outputs with 2C channels are split as (prediction, variance); make the variance half valid:
    ``learned`` takes a variance (positive), ``learned_range`` a mixing weight in [-1, 1] (tanh already is)."""
    if variance_type == "learned":
        return lambda out: torch.cat([out[:, :3], 0.01 * torch.sigmoid(out[:, 3:])], dim=1)
    return lambda out: out


@needs_diffusers
@pytest.mark.parametrize("x0_mode", list(X0_MODES))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned",
                                           "learned_range"])
def test_ddpm_loop_matches_diffusers(randn, gen, variance_type, prediction_type, x0_mode):
    config = dict(variance_type=variance_type, prediction_type=prediction_type, **X0_MODES[x0_mode])
    stock, fused = DDPMScheduler(**config), FusedDDPMScheduler(**config)
    out_channels = 6 if variance_type in ("learned", "learned_range") else 3
    model, x_T, seed = make_model(randn, 3, out_channels), randn(*SHAPE), seed_from(gen)
    kwargs = dict(num_inference_steps=8, output_map=_variance_output_map(variance_type))
    expected, expected_x0 = run_loop(stock, model, x_T, seed, **kwargs)
    actual, actual_x0 = run_loop(fused, model, x_T, seed, **kwargs)
    assert_close(actual, expected)
    assert_close(actual_x0, expected_x0)


@needs_diffusers
@pytest.mark.parametrize("timesteps_mode", ["set_timesteps", "custom", "train", "trailing"])
def test_ddpm_previous_timestep_modes_match_diffusers(randn, gen, timesteps_mode):
    config = dict(num_train_timesteps=40, beta_end=0.2)
    kwargs = {}
    if timesteps_mode == "set_timesteps":
        kwargs = dict(num_inference_steps=6)
    elif timesteps_mode == "custom":
        kwargs = dict(custom_timesteps=[37, 30, 21, 20, 9, 4, 1])
    elif timesteps_mode == "trailing":
        config["timestep_spacing"] = "trailing"
        kwargs = dict(num_inference_steps=7)
    # "train": no set_timesteps; the loop walks all 40 timesteps with prev = t - 1.
    stock, fused = DDPMScheduler(**config), FusedDDPMScheduler(**config)
    model, x_T, seed = make_model(randn, 3, 3), randn(*SHAPE), seed_from(gen)
    expected, _ = run_loop(stock, model, x_T, seed, **kwargs)
    actual, _ = run_loop(fused, model, x_T, seed, **kwargs)
    assert_close(actual, expected)


@needs_diffusers
def test_ddpm_fixed_large_log_uses_the_intended_std(randn, gen):
    """diffusers' fixed_large_log takes sqrt(log(beta_t)) (NaN); the intended std is sqrt(beta_t), which is
    also what fixed_large uses."""
    fused = FusedDDPMScheduler(variance_type="fixed_large_log", clip_sample=False)
    model, x_T, seed = make_model(randn, 3, 3), randn(*SHAPE), seed_from(gen)
    expected, _ = run_loop(DDPMScheduler(variance_type="fixed_large", clip_sample=False), model, x_T, seed,
                           num_inference_steps=5)
    actual, _ = run_loop(fused, model, x_T, seed, num_inference_steps=5)
    assert_close(actual, expected)
    # One step against the formula in float64: mean + sqrt(beta_t) z, beta_t = 1 - abar_t / abar_prev.
    t, prev_t = int(fused.timesteps[1]), int(fused.timesteps[2])
    x, eps = randn(*SHAPE), randn(*SHAPE)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    prev, _ = fused.step(eps, t, x, generator=torch.Generator().manual_seed(seed), return_dict=False)
    abar = fused.alphas_cumprod.double()
    a, a_prev = abar[t], abar[prev_t]
    beta = 1 - a / a_prev
    x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * x.double()
    assert_close(prev, mean + beta.sqrt() * z.double())


@needs_diffusers
def test_ddpm_step_timestep_forms(randn, gen):
    stock, fused = DDPMScheduler(), FusedDDPMScheduler()
    for scheduler in (stock, fused):
        scheduler.set_timesteps(10)
    x, m, seed = randn(*SHAPE), randn(*SHAPE), seed_from(gen)
    t = int(stock.timesteps[4])
    expected = stock.step(m, t, x, generator=torch.Generator().manual_seed(seed))
    for form in (t, torch.tensor(t), np.int64(t), torch.tensor([t, t])):
        out = fused.step(m, form, x, generator=torch.Generator().manual_seed(seed))
        assert isinstance(out, DDPMSchedulerOutput)
        assert_close(out.prev_sample, expected.prev_sample)
        assert_close(out.pred_original_sample, expected.pred_original_sample)


@needs_diffusers
def test_ddpm_learned_variance_needs_2c_channels(randn):
    fused = FusedDDPMScheduler(variance_type="learned_range")
    x = randn(*SHAPE)
    with pytest.raises(ValueError, match="model_output must have 2 \\* 3 channels"):
        fused.step(x, 10, x)


# --- add_noise ---------------------------------------------------------------------------------------------------

@needs_diffusers
@pytest.mark.parametrize("cls,fused_cls", [("DDIMScheduler", "FusedDDIMScheduler"),
                                           ("DDPMScheduler", "FusedDDPMScheduler")])
def test_add_noise_matches_diffusers_in_fp32(randn, gen, cls, fused_cls):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    stock, fused = getattr(diffusers, cls)(**config), globals()[fused_cls](**config)
    x0, noise = randn(4, 3, 8, 8), randn(4, 3, 8, 8)
    timesteps = torch.randint(0, 1000, (4,), generator=gen)
    assert_close(fused.add_noise(x0, noise, timesteps), stock.add_noise(x0, noise, timesteps))
    t = timesteps[:1].reshape(())
    assert_close(fused.add_noise(x0, noise, t), stock.add_noise(x0, noise, t))
    assert_close(fused.add_noise(x0, noise, int(t)), stock.add_noise(x0, noise, t))


@needs_diffusers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_half_precision_uses_fp32_coefficients(randn, gen, dtype):
    fused = FusedDDIMScheduler()
    x0, noise = randn(4, 3, 8, 8), randn(4, 3, 8, 8)
    timesteps = torch.randint(0, 1000, (4,), generator=gen)
    timesteps[0] = int(torch.randint(0, 10, (1,), generator=gen))  # small t: where diffusers adds no bf16 noise
    abar = fused.alphas_cumprod.double()[timesteps].reshape(-1, 1, 1, 1)
    x0, noise = x0.to(dtype), noise.to(dtype)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    assert_close(fused.add_noise(x0, noise, timesteps), expected)


# --- config round trips and the backend option -------------------------------------------------------------------

@needs_diffusers
@pytest.mark.parametrize("parent,fused_cls,config", [
    ("DDIMScheduler", "FusedDDIMScheduler",
     dict(prediction_type="v_prediction", set_alpha_to_one=False, thresholding=True, timestep_spacing="trailing",
          rescale_betas_zero_snr=True, beta_schedule="scaled_linear")),
    ("DDPMScheduler", "FusedDDPMScheduler",
     dict(variance_type="learned_range", clip_sample_range=2.0, beta_schedule="sigmoid", steps_offset=1)),
])
def test_from_config_round_trips(tmp_path, parent, fused_cls, config):
    parent, fused_cls = getattr(diffusers, parent), globals()[fused_cls]
    stock = parent(**config)
    fused = fused_cls.from_config(stock.config)
    assert isinstance(fused, parent) and type(fused) is fused_cls
    assert public_config(fused) == public_config(stock)
    assert fused.backend == "auto" and "backend" not in fused.config
    assert torch.equal(fused.alphas_cumprod, stock.alphas_cumprod)
    back = parent.from_config(fused.config)
    assert type(back) is parent and public_config(back) == public_config(stock)
    # Through a saved config, both ways.
    fused.save_config(tmp_path)
    assert public_config(parent.from_pretrained(tmp_path)) == public_config(stock)
    reloaded = fused_cls.from_pretrained(tmp_path, backend="reference")
    assert public_config(reloaded) == public_config(stock) and reloaded.backend == "reference"


@needs_diffusers
def test_backend_option_is_validated_and_stays_out_of_the_config():
    fused = FusedDDIMScheduler.from_config(DDIMScheduler().config, backend="reference")
    assert fused.backend == "reference" and "backend" not in fused.config
    assert FusedDDPMScheduler(num_train_timesteps=50, backend="reference").backend == "reference"
    with pytest.raises(ValueError, match="backend"):
        FusedDDIMScheduler(backend="fastest")
    with pytest.raises(ValueError, match="backend"):
        fused.backend = "fastest"


@needs_diffusers
@pytest.mark.parametrize("pipeline,parent,fused_cls", [(lambda *a: DDIMPipeline(*a), "DDIMScheduler",
                                                        "FusedDDIMScheduler"),
                                                       (lambda *a: DDPMPipeline(*a), "DDPMScheduler",
                                                        "FusedDDPMScheduler")], ids=["ddim", "ddpm"])
def test_swapping_a_pipelines_scheduler_is_the_whole_change(gen, pipeline, parent, fused_cls):
    unet = tiny_unet(gen)
    pipe = pipeline(unet, getattr(diffusers, parent)(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    seed = seed_from(gen)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="np", return_dict=False)
    if parent == "DDIMScheduler":
        kwargs["eta"] = 0.5
    expected = pipe(generator=torch.Generator().manual_seed(seed), **kwargs)[0]
    pipe.scheduler = globals()[fused_cls].from_config(pipe.scheduler.config)
    actual = pipe(generator=torch.Generator().manual_seed(seed), **kwargs)[0]
    assert_close(torch.from_numpy(actual), torch.from_numpy(expected))


# --- GroupNorm -> SiLU patching ----------------------------------------------------------------------------------

def randomize_norms(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """GroupNorm starts as weight 1, bias 0; random affine parameters make the tests see them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm) and module.affine:
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
    return model


def tiny_unet(gen: torch.Generator, **overrides) -> "UNet2DModel":
    config = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=4, attention_head_dim=4)
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from(gen))
        model = UNet2DModel(**config)
    return randomize_norms(model, gen).eval()


def count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


def state_dicts_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@needs_diffusers
@pytest.mark.parametrize("time_shift", ["default", "scale_shift"])
def test_patched_unet_matches_unpatched(gen, randn, time_shift):
    model = tiny_unet(gen, resnet_time_scale_shift=time_shift)
    x, t = randn(2, 3, 8, 8), torch.randint(0, 1000, (2,), generator=gen)
    with torch.no_grad():
        expected = model(x, t).sample
    state = copy.deepcopy(model.state_dict())
    patched = patch_groupnorm_silu(model)
    # Every ResnetBlock2D fuses norm1 -> SiLU, and norm2 -> SiLU unless an affine sits between (scale_shift);
    # plus conv_norm_out -> conv_act.
    resnets = count(model, ResnetBlock2D)
    assert resnets > 0
    assert patched == resnets * (2 if time_shift == "default" else 1) + 1
    assert state_dicts_equal(model.state_dict(), state)
    assert isinstance(model.conv_norm_out, GroupNormSiLU) and isinstance(model.conv_act, nn.Identity)
    with torch.no_grad():
        assert_close(model(x, t).sample, expected)
    assert patch_groupnorm_silu(model) == 0  # nothing left to patch


@needs_diffusers
def test_patched_unet_gradients_match(gen, randn):
    # float64: in float32 the parameter gradients are long sums whose order differs between the fused and the
    # unfused backward, which moves small entries by more than float32's tolerance. float64 checks the math.
    model = tiny_unet(gen).double()
    patched_model = copy.deepcopy(model)
    assert patch_groupnorm_silu(patched_model) > 0
    x, weight = randn(2, 3, 8, 8, dtype=torch.float64), randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 1000, (2,), generator=gen)
    (model(x, t).sample * weight).sum().backward()
    (patched_model(x, t).sample * weight).sum().backward()
    for (name, p), q in zip(model.named_parameters(), patched_model.parameters()):
        assert_close(q.grad, p.grad, msg=name)


@needs_diffusers
def test_unpatch_restores_the_original_modules(gen, randn):
    model = tiny_unet(gen)
    x, t = randn(2, 3, 8, 8), torch.randint(0, 1000, (2,), generator=gen)
    with torch.no_grad():
        expected = model(x, t).sample
    before = dict(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    patched = patch_groupnorm_silu(model)
    assert unpatch_groupnorm_silu(model) == patched
    after = dict(model.named_modules())
    assert list(after) == list(before) and all(after[name] is before[name] for name in before)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert state_dicts_equal(model.state_dict(), state)
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, expected)
    assert unpatch_groupnorm_silu(model) == 0


@needs_diffusers
def test_patched_vae_matches_unpatched(gen, randn):
    # Encoder/Decoder ResnetBlock2Ds have no time embedding (temb is None) and each ends in conv_norm_out.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from(gen))
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            latent_channels=2, norm_num_groups=4, sample_size=8)
    vae = randomize_norms(vae, gen).eval()
    x = randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = vae(x, sample_posterior=False).sample
    assert patch_groupnorm_silu(vae) == 2 * count(vae, ResnetBlock2D) + 2
    with torch.no_grad():
        assert_close(vae(x, sample_posterior=False).sample, expected)


def test_patched_sequential_keeps_indices_and_outputs(gen, randn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from(gen))
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(inplace=True),
                              nn.Conv2d(8, 3, 1))
        wrapper = nn.Module()
        wrapper.body = model  # nested: found through the module tree
    randomize_norms(model, gen)
    norms = [model[1], model[4]]
    x = randn(2, 3, 6, 6)
    expected = model(x)
    state = copy.deepcopy(model.state_dict())
    assert patch_groupnorm_silu(wrapper) == 2
    assert len(model) == 7
    assert [type(m) for m in model] == [nn.Conv2d, GroupNormSiLU, nn.Identity, nn.Conv2d, GroupNormSiLU,
                                        nn.Identity, nn.Conv2d]
    assert model[1].weight is norms[0].weight  # parameters shared, not copied
    assert state_dicts_equal(model.state_dict(), state)
    assert_close(model(x), expected)
    assert unpatch_groupnorm_silu(wrapper) == 2
    assert model[1] is norms[0] and model[4] is norms[1] and type(model[5]) is nn.SiLU
    assert torch.equal(model(x), expected)


def test_models_without_groupnorm_silu_are_left_alone(gen):
    models = [
        nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4)),              # SiLU without GroupNorm
        nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.ReLU()),        # GroupNorm, another activation
        nn.Sequential(nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 1), nn.SiLU()),        # not adjacent
        nn.ModuleList([nn.GroupNorm(4, 8), nn.SiLU()]),                          # no defined order
    ]
    for model in models:
        before = list(model.modules())
        state = copy.deepcopy(model.state_dict())
        assert patch_groupnorm_silu(model) == 0
        assert list(model.modules()) == before
        assert state_dicts_equal(model.state_dict(), state)
        assert unpatch_groupnorm_silu(model) == 0


def test_patching_rejects_bad_arguments_and_tampered_sites():
    with pytest.raises(TypeError, match="model"):
        patch_groupnorm_silu("unet")
    with pytest.raises(ValueError, match="backend"):
        patch_groupnorm_silu(nn.Sequential(), backend="fastest")
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    assert patch_groupnorm_silu(model) == 1
    model[0] = nn.GroupNorm(2, 4)  # someone replaced the fused module
    with pytest.raises(RuntimeError, match="cannot unpatch"):
        unpatch_groupnorm_silu(model)


# --- on a GPU ----------------------------------------------------------------------------------------------------

@needs_diffusers
@needs_gpu
@pytest.mark.parametrize("scheduler_cls", ["DDIM", "DDPM"])
def test_device_timestep_loop_matches_diffusers_without_host_syncs(randn, gen, device, scheduler_cls):
    stock_cls, fused_cls = ((DDIMScheduler, FusedDDIMScheduler) if scheduler_cls == "DDIM"
                            else (DDPMScheduler, FusedDDPMScheduler))
    extra = dict(eta=0.7) if scheduler_cls == "DDIM" else {}
    model, x_T, seed = make_model(randn, 3, 3), randn(*SHAPE), seed_from(gen)
    stock, fused = stock_cls(), fused_cls()
    expected, _ = run_loop(stock, model, x_T, seed, num_inference_steps=10, device=device, **extra)
    actual, _ = run_loop(fused, model, x_T, seed, num_inference_steps=10, device=device, **extra)
    assert_close(actual, expected)
    # Again with the tables cached and kernels warm: the fused loop must not wait for the device.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        x = x_T
        for t in fused.timesteps:
            x = fused.step(model(x, t), t, x, generator=generator, **extra).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(x, expected)


# --- What a pipeline does with a scheduler: compile, save/load, autograd, odd configs and schedules ---------------

@needs_diffusers
def test_compiled_fused_ddim_step_has_no_graph_break(randn):
    scheduler = FusedDDIMScheduler(num_train_timesteps=100, set_alpha_to_one=False)
    scheduler.set_timesteps(5)
    x, out = randn(*SHAPE), randn(*SHAPE)

    def step(out, t, x):
        return scheduler.step(out, t, x).prev_sample

    compiled = torch.compile(step, fullgraph=True)
    t = scheduler.timesteps[1]  # a 0-d tensor, as a pipeline's loop passes it
    assert_close(compiled(out, t, x), step(out, t, x))


@needs_diffusers
@pytest.mark.parametrize("parent,fused_cls", [("DDIMScheduler", "FusedDDIMScheduler"),
                                              ("DDPMScheduler", "FusedDDPMScheduler")], ids=["ddim", "ddpm"])
def test_saved_pipeline_with_a_fused_scheduler_loads_back(tmp_path, gen, parent, fused_cls):
    pipeline_cls = DDIMPipeline if parent == "DDIMScheduler" else DDPMPipeline
    fused = globals()[fused_cls]
    pipe = pipeline_cls(tiny_unet(gen), getattr(diffusers, parent)(num_train_timesteps=100))
    pipe.scheduler = fused.from_config(pipe.scheduler.config)   # the README's swap
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "model_index.json") as f:
        assert json.load(f)["scheduler"] == ["diffkern.integrations.diffusers", fused_cls]
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    # DDIMPipeline's own __init__ converts any scheduler it is given to a DDIMScheduler; DDPMPipeline keeps it.
    assert type(loaded.scheduler) is (DDIMScheduler if parent == "DDIMScheduler" else fused)
    assert public_config(loaded.scheduler) == public_config(pipe.scheduler)
    seed = seed_from(gen)
    kwargs = dict(batch_size=1, num_inference_steps=3, output_type="np", return_dict=False)
    expected = pipe(generator=torch.Generator().manual_seed(seed), **kwargs)[0]
    actual = loaded(generator=torch.Generator().manual_seed(seed), **kwargs)[0]
    assert_close(torch.from_numpy(actual), torch.from_numpy(expected))


@needs_diffusers
@pytest.mark.parametrize("parent,fused_cls", [("DDIMScheduler", "FusedDDIMScheduler"),
                                              ("DDPMScheduler", "FusedDDPMScheduler")], ids=["ddim", "ddpm"])
@pytest.mark.parametrize("x0_mode", list(X0_MODES))
def test_fused_step_and_add_noise_gradients_match_diffusers(randn, parent, fused_cls, x0_mode):
    config = dict(num_train_timesteps=100, prediction_type="v_prediction", **X0_MODES[x0_mode])
    if parent == "DDPMScheduler":
        config["variance_type"] = "fixed_small"
    stock, fused = getattr(diffusers, parent)(**config), globals()[fused_cls](**config)
    for scheduler in (stock, fused):
        scheduler.set_timesteps(10)
    x, out, noise = randn(*SHAPE, scale=2.0), randn(*SHAPE), randn(*SHAPE)
    grad_prev, grad_x0 = randn(*SHAPE), randn(*SHAPE)
    t = int(stock.timesteps[3])

    def gradients(scheduler):
        x_, out_ = x.clone().requires_grad_(), out.clone().requires_grad_()
        kwargs = dict(generator=torch.Generator().manual_seed(0), return_dict=False)
        prev, x0 = scheduler.step(out_, t, x_, **kwargs)
        torch.autograd.backward([prev, x0], [grad_prev, grad_x0])
        x0_, noise_ = x.clone().requires_grad_(), noise.clone().requires_grad_()
        noisy = scheduler.add_noise(x0_, noise_, torch.tensor([t, 7]))
        noisy.backward(grad_prev)
        return out_.grad, x_.grad, x0_.grad, noise_.grad

    for actual, expected in zip(gradients(fused), gradients(stock)):
        assert_close(actual, expected)


@needs_diffusers
@pytest.mark.parametrize("parent,fused_cls", [("DDIMScheduler", "FusedDDIMScheduler"),
                                              ("DDPMScheduler", "FusedDDPMScheduler")], ids=["ddim", "ddpm"])
@pytest.mark.parametrize("config", [
    dict(thresholding=False, sample_max_value=0.5),
    dict(clip_sample=False, clip_sample_range=0.0),
    dict(thresholding=True, sample_max_value=0.5, dynamic_thresholding_ratio=0.9),   # max wins over min = 1
    dict(thresholding=True, clip_sample=True, clip_sample_range=0.0, sample_max_value=3.0),  # thresholding wins
], ids=["max-value-unused", "clip-range-unused", "max-value-below-1", "threshold-wins"])
def test_configs_diffusers_accepts_run_as_in_diffusers(randn, gen, parent, fused_cls, config):
    config = dict(num_train_timesteps=100, **config)
    model = make_model(randn, 3, 3)
    x, seed = randn(*SHAPE), seed_from(gen)
    expected = run_loop(getattr(diffusers, parent)(**config), model, x, seed, num_inference_steps=5)
    actual = run_loop(globals()[fused_cls](**config), model, x, seed, num_inference_steps=5)
    for a, e in zip(actual, expected):
        assert_close(a, e)


@needs_diffusers
@pytest.mark.parametrize("parent,fused_cls", [("DDIMScheduler", "FusedDDIMScheduler"),
                                              ("DDPMScheduler", "FusedDDPMScheduler")], ids=["ddim", "ddpm"])
def test_trailing_schedule_ending_in_minus_one_runs_and_keeps_the_last_sample(randn, gen, parent, fused_cls):
    # diffusers' trailing spacing gives 62 timesteps ending in -1 for 61 steps at N = 1000 (see _step_or_keep).
    config = dict(timestep_spacing="trailing", clip_sample=False)
    stock, fused = getattr(diffusers, parent)(**config), globals()[fused_cls](**config)
    stock.set_timesteps(61)
    assert int(stock.timesteps[-1]) == -1 and len(stock.timesteps) == 62
    model = make_model(randn, 3, 3)
    x, seed = randn(*SHAPE), seed_from(gen)
    fused.set_timesteps(61)
    stock_until_last = stock.__class__(**config)
    stock_until_last.set_timesteps(61)
    stock_until_last.timesteps = stock_until_last.timesteps[:-1]  # the stock loop without its extra step
    expected, _ = run_loop(stock_until_last, model, x, seed)
    actual, x0 = run_loop(fused, model, x, seed)
    assert_close(actual, expected)
    assert torch.equal(x0, actual)  # the step from -1 keeps the sample, as prev and as predicted x0
    # Per-sample timesteps (a tensor, so the select path): the sample at -1 is kept, the other one steps.
    out = model(x, 15)
    prev, _ = fused.step(out, torch.tensor([-1, 15]), x, generator=torch.Generator().manual_seed(seed),
                         return_dict=False)
    alone, _ = fused.step(out[1:], 15, x[1:], generator=torch.Generator().manual_seed(seed), return_dict=False)
    assert torch.equal(prev[0], x[0])
    assert_close(prev[1:], alone)


@needs_diffusers
def test_ddim_eta_1_near_the_cosine_end_keeps_diffusers_operation_order(randn, gen):
    # Decision (issue 13, point 12): sqrt(1 - a' - sigma^2) cancels heavily here in fp32, in diffusers too; the
    # fused step keeps diffusers' order, so it stays bit-equal to it rather than more accurate than it.
    config = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    stock, fused = DDIMScheduler(**config), FusedDDIMScheduler(**config, backend="reference")
    for scheduler in (stock, fused):
        scheduler.set_timesteps(6)
    x, out, noise = randn(*SHAPE), randn(*SHAPE), randn(*SHAPE)
    t = int(stock.timesteps[0])
    assert t == 999  # to 999 - 1000 // 6 = 833
    expected = stock.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
    actual = fused.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
    assert torch.equal(actual, expected)


@needs_diffusers
def test_numpy_integer_timesteps_work_in_ops_and_schedulers(randn):
    import diffkern

    scheduler = FusedDDIMScheduler(num_train_timesteps=100, clip_sample=False)
    scheduler.set_timesteps(5)
    x, out = randn(*SHAPE), randn(*SHAPE)
    t = np.int64(40)
    expected = diffkern.ddim_step(out, 40, x, scheduler.alphas_cumprod, prev_timestep=20).prev_sample
    assert torch.equal(diffkern.ddim_step(out, t, x, scheduler.alphas_cumprod, prev_timestep=np.int32(20)).prev_sample,
                       expected)
    assert torch.equal(scheduler.step(out, t, x).prev_sample, expected)
