"""FusedFlowMatchEulerDiscreteScheduler against diffusers' FlowMatchEulerDiscreteScheduler: whole loops in both modes
over the schedules of the pipelines (shift, dynamic shifting, custom and inverted sigmas), with and without
``set_begin_index``, half precision, ``scale_noise``, ``per_token_timesteps`` (and the sign question of diffusers'
per-token branch), config round trips, compile, no host syncs on a GPU, and diffusers' StableDiffusion3Pipeline
run with it (a tiny random transformer and VAE, prompt embeddings given: no text encoder or download).

``any_backend`` runs each loop on every backend (see ``conftest``); the reference is diffusers bit for bit in float32.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ON_GPU
from diffkern import backends
from diffkern.testing import assert_close
from test_flow_match_step import SCHEDULERS, linear_velocity, make_scheduler

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
from diffkern.integrations.diffusers import FusedFlowMatchEulerDiscreteScheduler  # noqa: E402


def fused_twin(stock, name: str, backend: str, device=None):
    """A fused scheduler from ``stock``'s config, with the set_timesteps arguments of ``SCHEDULERS[name]``."""
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config, backend=backend)
    fused.set_timesteps(device=device, **SCHEDULERS[name][1])
    return fused


def check(actual, expected, exact: bool, msg: str = ""):
    if exact:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), msg
    else:
        assert_close(actual, expected, msg=msg)


@pytest.mark.parametrize("begin_index", [None, 0], ids=["searched", "begin_index"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_loop_matches_diffusers(any_backend, name, begin_index, randn, device):
    stock = make_scheduler(name, device)
    fused = fused_twin(stock, name, any_backend, device)
    if begin_index is not None:
        stock.set_begin_index(begin_index)
        fused.set_begin_index(begin_index)
    model = linear_velocity(randn, 4)
    x_stock = x_fused = randn(2, 4, 6, 5)
    g_stock, g_fused = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for i, t in enumerate(stock.timesteps):
        x_stock = stock.step(model(x_stock), t, x_stock, generator=g_stock).prev_sample
        x_fused = fused.step(model(x_fused), fused.timesteps[i], x_fused, generator=g_fused).prev_sample
        assert backends.last_backend("flow_match_step") == any_backend
        check(x_fused, x_stock, any_backend == "reference", f"step {i}")
    assert int(fused.step_index) == stock.step_index == len(stock.timesteps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["sd3-shift3", "flux-dynamic"])
def test_half_precision_steps_are_diffusers_math_in_float32(any_backend, name, dtype, randn, device):
    """Each step equals diffusers' step on the same values upcast to float32, rounded once (diffusers itself
    multiplies by the half-precision model output in half precision)."""
    stock = make_scheduler(name, device)
    fused = fused_twin(stock, name, any_backend, device)
    model = linear_velocity(randn, 4)
    x = randn(2, 4, 5, 5, dtype=dtype)
    for t in stock.timesteps:
        v = model(x)
        expected = stock.step(v.float(), t, x.float()).prev_sample
        x = fused.step(v, t, x).prev_sample
        assert x.dtype == dtype
        assert_close(x, expected)


def test_mixed_dtypes_return_the_model_outputs_dtype(randn, device):
    stock = make_scheduler("sd3-shift3", device)
    fused = fused_twin(stock, "sd3-shift3", "reference", device)
    x, v = randn(2, 4, 5, 5), randn(2, 4, 5, 5, dtype=torch.bfloat16)
    t = stock.timesteps[0]
    expected = stock.step(v.float(), t, x).prev_sample.to(torch.bfloat16)
    actual = fused.step(v, t, x).prev_sample
    assert actual.dtype == torch.bfloat16
    assert_close(actual, expected)


def test_step_outputs_and_errors(randn, device):
    fused = fused_twin(make_scheduler("default-20", device), "default-20", "reference", device)
    x = randn(1, 2, 3)
    out = fused.step(x, fused.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape
    assert isinstance(fused.step(x, fused.timesteps[1], x), diffusers.schedulers.scheduling_flow_match_euler_discrete
                      .FlowMatchEulerDiscreteSchedulerOutput)
    for bad in (3, torch.tensor(3)):
        with pytest.raises(ValueError, match="integer"):
            fused.step(x, bad, x)
    with pytest.raises(TypeError, match="noise"):
        fused.scale_noise(x, fused.timesteps[:1])
    with pytest.raises(ValueError, match="backend"):
        FusedFlowMatchEulerDiscreteScheduler(backend="gpu")


@pytest.mark.parametrize("mode", ["searched", "begin_index", "after_steps"])
def test_scale_noise_matches_diffusers_fp32(any_backend, mode, randn, gen, device):
    stock = make_scheduler("sd3-shift3", device)
    fused = fused_twin(stock, "sd3-shift3", any_backend, device)
    x, noise = randn(3, 4, 6, 6), randn(3, 4, 6, 6)
    index = torch.randint(1, len(stock.timesteps), (3,), generator=gen)
    timesteps = stock.timesteps[index.to(stock.timesteps.device)]
    if mode == "begin_index":
        stock.set_begin_index(7)
        fused.set_begin_index(7)
    if mode == "after_steps":
        for scheduler in (stock, fused):
            for t in scheduler.timesteps[:4]:
                scheduler.step(x, t, x)
    check(fused.scale_noise(x, timesteps, noise), stock.scale_noise(x, timesteps, noise), any_backend == "reference")


def test_config_round_trips_and_backend_stays_out(tmp_path):
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="linear",
                                                      stochastic_sampling=True)
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config, backend="reference")
    assert fused.backend == "reference" and "backend" not in fused.config

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(fused.config) == public(stock.config)
    fused.save_pretrained(tmp_path)
    loaded = FusedFlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, backend="reference")
    assert type(loaded) is FusedFlowMatchEulerDiscreteScheduler and public(loaded.config) == public(stock.config)
    back = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert public(back.config) == public(stock.config)


# --- per_token_timesteps -----------------------------------------------------------------------------------------

def ltx_tokens(randn, gen, device):
    """LTX-condition-style inputs: a [B, T, C] sample, per-token timesteps min(t, (1 - mask) * 1000) where the first
    tokens are conditioning (timestep 0), and the scheduler at step 3 of 12."""
    stock = make_scheduler("sd3-shift3", device)
    stock.set_timesteps(12, device=device)
    x, v = randn(2, 10, 8), randn(2, 10, 8)
    t = stock.timesteps[3]
    mask = torch.zeros(2, 10, device=device)
    mask[:, :3] = 1.0
    per_token = torch.minimum(t.expand(2, 10).float(), (1 - mask) * 1000.0)
    return stock, x, v, t, per_token


def test_per_token_step_matches_diffusers(any_backend, randn, gen, device):
    """The deterministic per-token branch, bit for bit on the reference: x + (sigma - sigma_next) model_output
    (LTXConditionPipeline passes -noise_pred)."""
    stock, x, v, t, per_token = ltx_tokens(randn, gen, device)
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config, backend=any_backend)
    fused.set_timesteps(12, device=device)
    expected = stock.step(-v, t, x, per_token_timesteps=per_token).prev_sample
    actual = fused.step(-v, t, x, per_token_timesteps=per_token).prev_sample
    assert actual.dtype == torch.float32
    check(actual, expected, any_backend == "reference")


def test_per_token_sign_convention(randn, gen, device):
    """diffusers' per-token branch takes the negated velocity: stepping every token at the scheduled sigma with -v is
    the default branch's step with v, in diffusers and here. Its stochastic branch does not: with -v it estimates
    x0 = x + sigma v. The fused scheduler's does (x0 = x - sigma v), so its stochastic per-token step with -v is the
    default stochastic step with v."""
    stock, x, v, t, _ = ltx_tokens(randn, gen, device)
    scheduled = t.expand(2, 10).float()
    default = stock.step(v, t, x).prev_sample
    stock._step_index -= 1
    assert torch.equal(stock.step(-v, t, x, per_token_timesteps=scheduled).prev_sample, default)

    noisy_stock = diffusers.FlowMatchEulerDiscreteScheduler.from_config(stock.config, stochastic_sampling=True)
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config, stochastic_sampling=True,
                                                             backend="reference")
    assert noisy_stock.config.stochastic_sampling and fused.config.stochastic_sampling
    for scheduler in (noisy_stock, fused):
        scheduler.set_timesteps(12, device=device)
        scheduler.set_begin_index(3)

    def run(scheduler, velocity, **kwargs):
        out = scheduler.step(velocity, t, x, generator=torch.Generator().manual_seed(9), **kwargs).prev_sample
        scheduler._step_index -= 1
        return out

    default = run(noisy_stock, v)
    assert torch.equal(run(fused, v), default)
    assert torch.equal(run(fused, -v, per_token_timesteps=scheduled), default)
    assert not torch.allclose(run(noisy_stock, -v, per_token_timesteps=scheduled), default)  # x0 = x + sigma v there
    wrong_x0 = x + stock.sigmas[3] * v
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(device)
    assert_close(run(noisy_stock, -v, per_token_timesteps=scheduled),
                 (1 - stock.sigmas[4]) * wrong_x0 + stock.sigmas[4] * z)


# --- what a pipeline does with it --------------------------------------------------------------------------------

def test_compiled_loop_has_no_graph_break(randn, device):
    """The step compiles with fullgraph=True, and a loop over it reuses the graph (the step index is a tensor)."""
    stock = make_scheduler("sd3-shift3", device)
    fused = fused_twin(stock, "sd3-shift3", "reference", device)
    model = linear_velocity(randn, 3)
    x_T = randn(1, 3, 4, 4)

    def step(v, t, x):
        return fused.step(v, t, x).prev_sample

    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    x, expected = x_T, x_T
    for t in stock.timesteps:
        x = compiled(model(x), t, x)
        expected = stock.step(model(expected), t, expected).prev_sample
    assert_close(x, expected)
    assert counter.frame_count <= 2, counter.frame_count  # the first step (no index yet), then every other one


@pytest.mark.skipif(not ON_GPU, reason="host syncs are a property of CUDA tensors")
def test_device_loop_has_no_host_sync(any_backend, randn, device):
    stock = make_scheduler("stochastic-shift3", device)
    fused = fused_twin(stock, "stochastic-shift3", any_backend, device)
    model = linear_velocity(randn, 4)
    x = randn(2, 4, 16, 16)
    generator = torch.Generator(device=device).manual_seed(1)
    fused.step(model(x), fused.timesteps[0], x, generator=generator)  # warm: kernels compiled, library loaded
    fused.set_timesteps(15, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in fused.timesteps:
            x = fused.step(model(x), t, x, generator=generator).prev_sample
        x = fused.scale_noise(x, fused.timesteps[:2], x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


def tiny_sd3_pipeline(scheduler):
    """diffusers' StableDiffusion3Pipeline around a one-layer random SD3 transformer and a one-block VAE (seeded),
    with no text encoders: the prompt embeddings are passed in."""
    pytest.importorskip("transformers", reason="diffusers' SD3 pipeline imports transformers (a test dependency)")
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, shift_factor=0.0,
        scaling_factor=1.0).eval()
    return diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                              tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                              text_encoder_3=None, tokenizer_3=None)


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(shift=1.0, use_dynamic_shifting=True)],
                         ids=["shift3", "dynamic_shifting"])
def test_sd3_pipeline_runs_it_as_diffusers_runs_its_own(gen, config):
    """The whole pipeline (guidance 5, 4 steps, latents out; with dynamic shifting the pipeline computes mu from
    the sequence length) with the fused scheduler swapped in gives diffusers' latents bit for bit in float32, and
    the fused step is what ran."""
    embeds = [torch.randn(shape, generator=gen) for shape in ((1, 5, 16), (1, 8), (1, 5, 16), (1, 8))]
    seed = int(torch.randint(2**31, (1,), generator=gen))
    latents = {}
    for name, scheduler in (("stock", diffusers.FlowMatchEulerDiscreteScheduler(**config)),
                            ("fused", FusedFlowMatchEulerDiscreteScheduler(**config))):
        pipeline = tiny_sd3_pipeline(scheduler)
        pipeline.set_progress_bar_config(disable=True)
        latents[name] = pipeline(
            prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], negative_prompt_embeds=embeds[2],
            negative_pooled_prompt_embeds=embeds[3], height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
            output_type="latent", generator=torch.Generator().manual_seed(seed)).images
        if name == "fused":
            assert backends.last_backend("flow_match_step") == "reference"
    assert latents["fused"].shape == (1, 4, 16, 16)
    assert torch.equal(latents["fused"], latents["stock"])
