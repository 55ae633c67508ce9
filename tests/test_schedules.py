"""The noise schedules (``diffkern.schedules``) against diffusers' tables."""

import pytest
import torch

import diffkern
from diffkern.testing import assert_close

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_make_betas_matches_diffusers(name):
    kwargs = dict(beta_start=0.00085, beta_end=0.012) if name == "scaled_linear" else {}
    ours = diffkern.make_betas(name, 1000, **kwargs)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs).betas
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert_close(theirs, ours)
    assert_close(diffusers.DDPMScheduler(beta_schedule=name, **kwargs).alphas_cumprod, diffkern.alphas_cumprod(ours))


def test_quadratic_and_cosine_aliases():
    q = diffkern.make_betas("quadratic", 10, 1e-4, 0.02)
    assert_close(q, torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 10, dtype=torch.float64) ** 2)
    assert torch.equal(diffkern.make_betas("cosine", 50), diffkern.make_betas("squaredcos_cap_v2", 50))


def test_rescale_zero_snr_matches_diffusers():
    ours = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012, rescale_zero_snr=True))
    theirs = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
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
