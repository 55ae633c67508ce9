"""diffkern.sample(method="flow_euler"): the loop over a sigma schedule against diffusers' scheduler loop (both modes,
guidance with its rescale), on every backend; its validation; capture as a CUDA graph on a GPU."""

from __future__ import annotations

import pytest
import torch

import diffkern
from conftest import ON_GPU
from diffkern import backends
from diffkern.testing import assert_close
from test_flow_match_step import linear_velocity, make_scheduler, rescale_noise_cfg


@pytest.mark.parametrize("name", ["sd3-shift3", "flux-dynamic", "stochastic-shift3"])
def test_flow_euler_matches_the_diffusers_loop(any_backend, name, randn, device):
    """The model gets the scheduler's timesteps; the reference is diffusers' loop bit for bit in float32 (the
    stochastic mode draws from a generator seeded alike, step after step)."""
    scheduler = make_scheduler(name, device)
    stochastic = scheduler.config.stochastic_sampling
    model = linear_velocity(randn, 4)
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return model(x)

    x_T = randn(2, 4, 6, 6)
    x = x_T
    gen = torch.Generator().manual_seed(8)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x), t, x, generator=gen).prev_sample
    out = diffkern.sample(model_fn, x_T, timesteps=scheduler.timesteps, sigmas=scheduler.sigmas, method="flow_euler",
                          stochastic=stochastic, generator=torch.Generator().manual_seed(8), backend=any_backend)
    assert backends.last_backend("flow_match_step") == any_backend
    assert [float(t) for t in seen] == [float(t) for t in scheduler.timesteps]
    assert all(t.ndim == 0 and t.device == device for t in seen)
    if any_backend == "reference":
        assert torch.equal(out, x)
    else:
        assert_close(out, x)


def test_flow_euler_with_guidance_matches_the_pipeline_loop(any_backend, randn, device):
    """guidance_scale and guidance_rescale: model_fn gets cat([x, x]) and returns (uncond, cond); the pipelines
    guide, rescale (rescale_noise_cfg) and step; model times default to the sigmas."""
    rescale = rescale_noise_cfg()
    scheduler = make_scheduler("sd3-shift3", device)
    weights = randn(2, 3, 3) * 0.3

    def model_fn(x, t):
        half = x.shape[0] // 2
        return torch.cat([torch.einsum("oc,bchw->bohw", weights[0], x[:half]) * t,
                          torch.einsum("oc,bchw->bohw", weights[1], x[half:])])

    x_T = randn(2, 3, 5, 5)
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        uncond, cond = model_fn(torch.cat([x, x]), scheduler.sigmas[i]).chunk(2)
        guided = rescale(uncond + 4.0 * (cond - uncond), cond, guidance_rescale=0.7)
        x = scheduler.step(guided, t, x).prev_sample
    out = diffkern.sample(model_fn, x_T, sigmas=scheduler.sigmas, method="flow_euler", guidance_scale=4.0,
                          guidance_rescale=0.7, backend=any_backend)
    if any_backend == "reference":
        assert torch.equal(out, x)
    else:
        assert_close(out, x)


@pytest.mark.parametrize("case,error,argument", [
    (dict(), TypeError, "sigmas"),
    (dict(sigmas=torch.tensor([1.0])), ValueError, "sigmas"),
    (dict(sigmas=torch.tensor([1.0, 1.5, 0.0])), ValueError, "sigmas"),
    (dict(sigmas=torch.tensor([1, 0])), TypeError, "sigmas"),
    (dict(sigmas=torch.tensor([1.0, 0.0]), alphas_cumprod=torch.ones(10)), ValueError, "alphas_cumprod"),
    (dict(sigmas=torch.tensor([1.0, 0.5, 0.0]), timesteps=torch.tensor([1.0])), ValueError, "timesteps"),
    (dict(sigmas=torch.tensor([1.0, 0.0]), eta=0.5), ValueError, "eta"),
    (dict(sigmas=torch.tensor([1.0, 0.0]), guidance_rescale=0.5), ValueError, "guidance_rescale"),
    (dict(sigmas=torch.tensor([1.0, 0.0]), stochastic=1), TypeError, "stochastic"),
    (dict(sigmas=torch.tensor([1.0, 0.0]), clip_sample=True), TypeError, "clip_sample"),
    (dict(sigmas=torch.tensor([1.0, 0.0]), capture=True), ValueError, "capture"),
], ids=lambda v: str(v)[:40])
def test_flow_euler_validation(case, error, argument, device):
    if argument == "capture" and ON_GPU:
        pytest.skip("capture=True is refused for CPU tensors only")
    x = torch.randn(1, 2, 3, device=device)
    with pytest.raises(error, match=argument):
        diffkern.sample(lambda x, t: x, x, method="flow_euler", **case)


def test_flow_options_are_refused_by_the_other_methods(device):
    x = torch.randn(1, 2, 3, device=device)
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear", 10))
    with pytest.raises(ValueError, match="flow_euler"):
        diffkern.sample(lambda x, t: x, x, table, torch.tensor([5, 0]), sigmas=torch.tensor([1.0, 0.0]))


@pytest.mark.skipif(not ON_GPU, reason="capture=True records a CUDA graph: it needs a GPU")
def test_flow_euler_capture_equals_eager(any_backend, randn, device):
    scheduler = make_scheduler("stochastic-shift3", device)
    model = linear_velocity(randn, 4)
    x_T = randn(2, 4, 16, 16)
    kwargs = dict(timesteps=scheduler.timesteps, sigmas=scheduler.sigmas, method="flow_euler", stochastic=True,
                  backend=any_backend)
    eager = diffkern.sample(lambda x, t: model(x), x_T, generator=torch.Generator(device).manual_seed(2), **kwargs)
    captured = diffkern.sample(lambda x, t: model(x), x_T, generator=torch.Generator(device).manual_seed(2),
                               capture=True, **kwargs)
    assert_close(captured, eager)
