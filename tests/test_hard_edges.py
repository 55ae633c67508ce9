"""What a careless caller or an unusual input meets: autograd through every op on every backend, layouts that
differ only where nothing is addressed, narrow integer timesteps, bad tables, empty batches, unclear errors, and
threads. Every op call here names its backend and asserts that it ran."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import diffkern
from diffkern import backends
from diffkern.ops.group_norm_silu import GroupNormSiLU
from diffkern.schedules import NoiseSchedule

from _helpers import run_both

from conftest import usable_backend

TABLE = diffkern.alphas_cumprod(diffkern.make_betas("linear", 100))


# ------------------------------------------------------------------------------------------------- autograd
# float64, where every backend computes the reference math (the kernels are fp32 by design): gradcheck checks the
# ops' registered backward formulas and that every backend's custom op carries them.

DDIM_GRAD_CASES = {
    "epsilon": dict(),
    "v_prediction-eta": dict(prediction_type="v_prediction", eta=0.7),
    "sample-clipped-model-output": dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.6,
                                        use_clipped_model_output=True),
    "guidance": dict(guidance_scale=4.0),
    # A quantile inside [1, sample_max_value], so the gradient flows through the per-sample scale too.
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1e3),
}


@pytest.mark.parametrize("case", list(DDIM_GRAD_CASES))
def test_ddim_step_gradcheck(randn, device, any_backend, case):
    backend = any_backend
    options = dict(DDIM_GRAD_CASES[case])
    batch = 2
    out_batch = 2 * batch if "guidance_scale" in options else batch
    model_output = randn(out_batch, 3, 4, 4, dtype=torch.float64).requires_grad_()
    sample = randn(batch, 3, 4, 4, dtype=torch.float64, scale=2.0).requires_grad_()
    noise = randn(batch, 3, 4, 4, dtype=torch.float64).requires_grad_()
    t = torch.tensor([60, 85], device=device)
    prev = torch.tensor([40, -1], device=device)
    table = TABLE.to(device)

    def step(model_output, sample, noise):
        out = diffkern.ddim_step(model_output, t, sample, table, prev_timestep=prev, backend=backend,
                                 noise=noise if options.get("eta") else None, **options)
        assert backends.last_backend("ddim_step") == backend
        return out.prev_sample, out.pred_original_sample

    inputs = (model_output, sample, noise) if options.get("eta") else (model_output, sample, noise.detach())
    assert torch.autograd.gradcheck(step, inputs)


DDPM_GRAD_CASES = {
    "fixed_small-clip": dict(variance_type="fixed_small", clip_sample=True, clip_sample_range=0.7),
    "learned_range-v": dict(variance_type="learned_range", prediction_type="v_prediction", clip_sample=False),
    "learned-guidance": dict(variance_type="learned", guidance_scale=3.0, clip_sample=False),
    "thresholding": dict(variance_type="fixed_large", thresholding=True, dynamic_thresholding_ratio=0.8,
                         sample_max_value=1e3),
}


@pytest.mark.parametrize("case", list(DDPM_GRAD_CASES))
def test_ddpm_step_gradcheck(randn, device, any_backend, case):
    backend = any_backend
    options = dict(DDPM_GRAD_CASES[case])
    batch, channels = 2, 3
    learned = options["variance_type"] in ("learned", "learned_range")
    out_batch = 2 * batch if "guidance_scale" in options else batch
    model_output = randn(out_batch, 2 * channels if learned else channels, 4, 4, dtype=torch.float64)
    if learned:  # a variance in (0, 1) (learned) / a fraction in (-1, 1) (learned_range)
        model_output[:, channels:] = model_output[:, channels:].sigmoid()
    model_output.requires_grad_()
    sample = randn(batch, channels, 4, 4, dtype=torch.float64, scale=2.0).requires_grad_()
    noise = randn(batch, channels, 4, 4, dtype=torch.float64).requires_grad_()
    t = torch.tensor([60, 1], device=device)
    table = TABLE.to(device)

    def step(model_output, sample, noise):
        out = diffkern.ddpm_step(model_output, t, sample, table, noise=noise, backend=backend, **options)
        assert backends.last_backend("ddpm_step") == backend
        return out.prev_sample, out.pred_original_sample

    assert torch.autograd.gradcheck(step, (model_output, sample, noise))


def test_add_noise_gradcheck(randn, device, any_backend):
    backend = any_backend
    x0 = randn(3, 2, 5, 3, dtype=torch.float64).requires_grad_()
    noise = randn(3, 2, 5, 3, dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, 50, 99], device=device)

    def noised(x0, noise):
        out = diffkern.add_noise(x0, noise, t, TABLE.to(device), backend=backend)
        assert backends.last_backend("add_noise") == backend
        return out

    assert torch.autograd.gradcheck(noised, (x0, noise))


def test_fast_backend_gradients_equal_the_references_in_float32(randn, device, fast_backend):
    """The fast backends' custom ops carry the same backward in the dtypes their kernels compute."""
    backend = fast_backend
    model_output, sample = randn(4, 3, 4, 4), randn(2, 3, 4, 4)
    grad_prev, grad_x0 = randn(2, 3, 4, 4), randn(2, 3, 4, 4)

    def grads(backend):
        m, s = model_output.clone().requires_grad_(), sample.clone().requires_grad_()
        out = diffkern.ddim_step(m, 70, s, TABLE, prev_timestep=50, guidance_scale=5.0, thresholding=True,
                                 sample_max_value=1e3, dynamic_thresholding_ratio=0.9, backend=backend)
        assert backends.last_backend("ddim_step") == backend
        torch.autograd.backward(list(out), [grad_prev, grad_x0])
        return m.grad, s.grad

    for got, want in zip(grads(backend), grads("reference")):
        diffkern.testing.assert_close(got, want)


def test_compiled_step_backward_equals_eager(randn, device):
    model_output = randn(4, 3, 8, 8).requires_grad_()
    sample = randn(2, 3, 8, 8).requires_grad_()
    table = TABLE.float().to(device)
    t, prev = torch.tensor([50, 60], device=device), torch.tensor([30, 40], device=device)

    def loss(model_output, sample):
        out = diffkern.ddim_step(model_output, t, sample, table, prev_timestep=prev, guidance_scale=3.0,
                                 thresholding=True, sample_max_value=100.0)
        return (out.prev_sample ** 2).sum() + out.pred_original_sample.sum()

    expected = torch.autograd.grad(loss(model_output, sample), (model_output, sample))
    compiled = torch.compile(loss, fullgraph=True)
    for got, want in zip(torch.autograd.grad(compiled(model_output, sample), (model_output, sample)), expected):
        diffkern.testing.assert_close(got, want)


def test_sampling_loop_is_differentiable(randn, device):
    x_T = randn(2, 3, 4, 4, dtype=torch.float64).requires_grad_()
    weight = randn(3, 3, dtype=torch.float64).requires_grad_()

    def run(x_T, weight_):
        return diffkern.sample(lambda x, t: torch.einsum("oc,bchw->bohw", weight_, x).tanh(), x_T,
                               TABLE.to(device), torch.tensor([90, 60, 30, 0], device=device))

    assert torch.autograd.gradcheck(run, (x_T, weight))


# ------------------------------------------------------------------------------------------------- layouts

def test_size_one_dimension_strides_do_not_matter(randn, device, any_backend):
    """A channels_last conv with one output channel gives strides (HW, 1, W, 1); contiguous latents have
    (HW, HW, W, 1). Both address every element at the same offset."""
    backend = any_backend
    sample = randn(2, 1, 8, 8)
    model_output = torch.empty_strided((2, 1, 8, 8), (64, 1, 8, 1), device=device).copy_(randn(2, 1, 8, 8))
    assert model_output.stride() != sample.stride()
    run_both(diffkern.ddim_step, backend, model_output, 50, sample, TABLE, prev_timestep=30)
    run_both(diffkern.ddpm_step, backend, model_output, 50, sample, TABLE, noise=randn(2, 1, 8, 8))
    run_both(diffkern.add_noise, backend, sample, model_output, 50, TABLE)


# ------------------------------------------------------------------------------------------------- timesteps

@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32])
def test_narrow_and_unsigned_timestep_dtypes_are_checked_without_wrapping(randn, dtype):
    sample, model_output = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear", 256))
    t = torch.tensor([5, 6], dtype=dtype)
    expected = diffkern.ddim_step(model_output, torch.tensor([5, 6]), sample, table, prev_timestep=3,
                                  backend="reference").prev_sample
    got = diffkern.ddim_step(model_output, t, sample, table, prev_timestep=3, backend="reference").prev_sample
    assert torch.equal(got, expected)
    # T = 256 with 8-bit timesteps: 255 is valid; for int8 255 cannot be held, 127 can.
    top = 127 if dtype == torch.int8 else 255
    diffkern.add_noise(sample, model_output, torch.tensor([top, 0], dtype=dtype), table, backend="reference")
    if dtype.is_signed:
        diffkern.ddim_step(model_output, t, sample, table, prev_timestep=torch.tensor([-1, -1], dtype=dtype),
                           backend="reference")
    small_table = TABLE  # T = 100: 120 is out of range in every dtype
    with pytest.raises(ValueError, match="timestep"):
        diffkern.ddim_step(model_output, torch.tensor([5, 120], dtype=dtype), sample, small_table, prev_timestep=3)


def test_numpy_integer_timesteps_are_accepted(randn):
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    assert torch.equal(diffkern.add_noise(x, z, np.int64(40), TABLE), diffkern.add_noise(x, z, 40, TABLE))
    assert torch.equal(diffkern.ddpm_step(z, np.uint16(40), x, TABLE, noise=x).prev_sample,
                       diffkern.ddpm_step(z, 40, x, TABLE, noise=x).prev_sample)


def test_timesteps_on_another_device_are_rejected(randn):
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    meta = torch.tensor([3, 4], device="meta")
    with pytest.raises(ValueError, match="timesteps must be on the CPU or on the samples' device"):
        diffkern.add_noise(x, z, meta, TABLE)
    with pytest.raises(ValueError, match="prev_timestep must be on the CPU"):
        diffkern.ddim_step(z, 5, x, TABLE, prev_timestep=meta)


# ------------------------------------------------------------------------------------------------- tables

@pytest.mark.parametrize("bad_value,index", [(float("nan"), 7), (1.5, 0), (-0.1, 99)])
def test_cpu_tables_with_impossible_values_are_rejected(randn, bad_value, index):
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    table = TABLE.clone()
    table[index] = bad_value
    for call in (lambda: diffkern.add_noise(x, z, 3, table),
                 lambda: diffkern.ddim_step(z, 5, x, table, prev_timestep=2),
                 lambda: diffkern.ddpm_step(z, 5, x, table)):
        with pytest.raises(ValueError, match=rf"alphas_cumprod\[{index}\]"):
            call()


def test_table_values_are_checked_again_after_an_in_place_change(randn):
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    table = TABLE.clone()
    diffkern.add_noise(x, z, 3, table)            # checked and remembered
    table[3] = float("nan")                       # bumps the tensor's version
    with pytest.raises(ValueError, match=r"alphas_cumprod\[3\]"):
        diffkern.add_noise(x, z, 3, table)


def test_values_a_step_divides_by_are_checked_at_host_timesteps(randn):
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    table = TABLE.clone()
    table[:3] = 1.0   # abar = 1 at t = 0..2
    diffkern.add_noise(x, z, 1, table)           # fine: add_noise divides by nothing
    with pytest.raises(ValueError, match="divides by 1 - abar_t"):
        diffkern.ddpm_step(z, 2, x, table)
    with pytest.raises(ValueError, match="divides by 1 - abar_t"):
        diffkern.ddim_step(z, torch.tensor([50, 1]), x, table, prev_timestep=-1)
    zero_snr = TABLE.clone()
    zero_snr[-1] = 0.0
    with pytest.raises(ValueError, match="v_prediction"):
        diffkern.ddim_step(z, 99, x, zero_snr, prev_timestep=50)
    diffkern.ddim_step(z, 99, x, zero_snr, prev_timestep=50, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="abar_prev"):
        diffkern.ddim_step(z, 50, x, zero_snr, prev_timestep=99, prediction_type="v_prediction")


# ------------------------------------------------------------------------------------------------- options

def test_options_of_a_disabled_mode_are_not_validated(randn):
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    plain = diffkern.ddim_step(z, 50, x, TABLE, prev_timestep=30).prev_sample
    for options in (dict(sample_max_value=0.5), dict(sample_max_value=-3.0, dynamic_thresholding_ratio=7.0),
                    dict(clip_sample_range=0.0), dict(clip_sample_range=-1.0)):
        assert torch.equal(diffkern.ddim_step(z, 50, x, TABLE, prev_timestep=30, **options).prev_sample, plain)
    with pytest.raises(ValueError, match="clip_sample_range"):
        diffkern.ddim_step(z, 50, x, TABLE, prev_timestep=30, clip_sample=True, clip_sample_range=-1.0)
    with pytest.raises(ValueError, match="sample_max_value"):
        diffkern.ddim_step(z, 50, x, TABLE, prev_timestep=30, thresholding=True, sample_max_value=0.0)


# ------------------------------------------------------------------------------------------------- empty input

def test_thresholding_with_an_empty_batch_returns_empty_outputs(device, any_backend):
    backend = any_backend
    empty = torch.empty(0, 3, 4, 4, device=device)
    for step in (diffkern.ddim_step, diffkern.ddpm_step):
        kwargs = dict(prev_timestep=torch.empty(0, dtype=torch.int64, device=device))
        out = step(empty, torch.empty(0, dtype=torch.int64, device=device), empty, TABLE.to(device),
                   thresholding=True, backend=backend, **kwargs)
        assert out.prev_sample.shape == empty.shape and out.pred_original_sample.shape == empty.shape


# ------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argument,error,call", [
    ("beta_start", TypeError, lambda: diffkern.make_betas("linear", 10, "a")),
    ("beta_end", ValueError, lambda: diffkern.make_betas("linear", 10, 1e-4, 2.0)),
    ("betas", TypeError, lambda: NoiseSchedule([0.1, 0.2])),
    ("betas", ValueError, lambda: NoiseSchedule(torch.tensor([0.1, float("nan")]))),
    ("num_groups", ValueError, lambda: GroupNormSiLU(0, 8)),
    ("num_groups", TypeError, lambda: GroupNormSiLU(2.0, 8)),
    ("num_groups", ValueError, lambda: GroupNormSiLU(3, 8)),
    ("backend", ValueError, lambda: GroupNormSiLU(4, 8, backend="bogus")),
], ids=lambda v: v if isinstance(v, str) else None)
def test_constructors_name_the_bad_argument(argument, error, call):
    with pytest.raises(error, match=argument):
        call()


# ------------------------------------------------------------------------------------------------- threads

def test_last_backend_is_per_thread(randn, device):
    """Thread A runs add_noise on Triton, then thread B on the reference, then A asks what it ran: its own
    backend, whatever B did in between (the order is forced with events, so the test is deterministic)."""
    usable_backend("triton", device)
    x, z = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    a_ran, b_ran = threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        diffkern.add_noise(x, z, 3, TABLE, backend="triton")
        a_ran.set()
        b_ran.wait(timeout=60)
        seen["a"] = backends.last_backend("add_noise")

    def thread_b():
        a_ran.wait(timeout=60)
        diffkern.add_noise(x, z, 3, TABLE, backend="reference")
        seen["b"] = backends.last_backend("add_noise")
        b_ran.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": "triton", "b": "reference"}
