"""flow_match_step: the reference against float64 math, diffusers' FlowMatchEulerDiscreteScheduler (whole loops, both
modes, shift, dynamic shifting, custom and inverted sigmas) and the pipelines' guidance + ``rescale_noise_cfg``;
every backend against diffusers and the reference, over one case matrix (``FLOW_CASES``), shapes and layouts; bad
input, torch.compile, opcheck and gradcheck.

Backends: ``any_backend``/``fast_backend`` (see ``conftest``); Triton runs in its interpreter without a GPU, CUDA in
host emulation (tests/test_cuda_emulated.py). Inputs are random and fresh each run (the seed is in the header).

Half precision: diffusers upcasts the sample to float32 but multiplies sigma_next - sigma by the model output in the
model output's dtype, then rounds the float32 result to it; diffkern computes everything in float32 and rounds once.
So half-precision steps are compared with diffusers' step on the same values upcast to float32, rounded once: the
math diffkern claims.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.library import opcheck

import diffkern
from _helpers import LAYOUTS, run_both, step_tensors
from conftest import ON_GPU
from diffkern import backends
from diffkern.ops.flow_match import _flow_match_step_op
from diffkern.testing import assert_close

# A sample of one element has no unbiased std (NaN, as in torch and diffusers): the shape matrix covers it.
pytestmark = [pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom:UserWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# [B, ...]: n = 1, n below one block, n past one block with a tail (two partial-moment blocks), packed tokens
# (FLUX's [B, 4096, 64], scaled down), a 5-D video latent.
SHAPES = [(1, 1), (3, 1), (1, 4, 5, 7), (3, 3, 11, 13), (2, 3, 41, 37), (2, 300, 64), (1, 2, 3, 5, 7)]
if ON_GPU:
    SHAPES += [(1, 16, 128, 128), (1, 4096, 64), (1, 16, 21, 60, 104), (3, 4, 129, 131)]

# The case matrix: every option at least once; each case runs in every dtype on every fast backend.
FLOW_CASES = {
    "euler": dict(),
    "guided": dict(guidance_scale=4.5),
    "guided-rescale": dict(guidance_scale=7.5, guidance_rescale=0.7),
    "guided-rescale-1": dict(guidance_scale=3.0, guidance_rescale=1.0),
    "stochastic": dict(stochastic=True, noise=True),
    "stochastic-guided-rescale": dict(stochastic=True, noise=True, guidance_scale=5.0, guidance_rescale=0.5),
    "sigma-python-floats": dict(sigmas="float"),
    "sigma-0d-device": dict(sigmas="0-d", guidance_scale=2.0),
    "sigma-cpu-per-sample": dict(sigmas="cpu", stochastic=True, noise=True),
    "last-step": dict(sigmas="last", guidance_scale=6.0, guidance_rescale=0.3),
}


def sigmas_for(kind: str, gen, batch: int, device):
    """(sigma, sigma_next) in each form the op takes; per-sample device tensors by default."""
    sigma = torch.rand(batch, generator=gen) * 0.98 + 0.01
    sigma_next = sigma * torch.rand(batch, generator=gen)
    if kind == "float":
        return float(sigma[0]), float(sigma_next[0])
    if kind == "0-d":
        return sigma[0].to(device), sigma_next[0].to(device)
    if kind == "cpu":
        return sigma, sigma_next
    if kind == "last":
        return sigma.to(device), 0.0
    return sigma.to(device), sigma_next.to(device)


def flow_inputs(shape, dtype, options, randn, gen, device, *, layout="contiguous"):
    """(model_output, sample, sigma, sigma_next, kwargs) for ``flow_match_step``."""
    model_output, sample, options = step_tensors(shape, dtype, options, randn, layout)
    sigma, sigma_next = sigmas_for(options.pop("sigmas", "per-sample"), gen, shape[0], device)
    return model_output, sample, sigma, sigma_next, options


def rescale_noise_cfg():
    """diffusers' ``rescale_noise_cfg`` (the pipelines' guidance rescale)."""
    pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    try:
        from diffusers.guiders.guider_utils import rescale_noise_cfg as rescale
    except ImportError:
        try:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as rescale
        except ImportError as exc:
            pytest.skip(f"diffusers' rescale_noise_cfg cannot be imported here: {exc}")
    return rescale


def flux_mu(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """The FLUX pipeline's ``calculate_shift``: mu for dynamic shifting at a sequence length."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


# Scheduler configurations (config, set_timesteps keywords) of the pipelines that use the scheduler.
SCHEDULERS = {
    "default-20": (dict(), dict(num_inference_steps=20)),
    "sd3-shift3": (dict(shift=3.0), dict(num_inference_steps=28)),
    "flux-dynamic": (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                          max_image_seq_len=4096), dict(num_inference_steps=12, mu=flux_mu(1024))),
    "flux-custom-sigmas": (dict(use_dynamic_shifting=True), dict(sigmas=list(np.linspace(1.0, 1 / 9, 9)),
                                                                   mu=flux_mu(4096))),
    "linear-time-shift-terminal": (dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1),
                                   dict(num_inference_steps=10, mu=0.9)),
    "stochastic-shift3": (dict(shift=3.0, stochastic_sampling=True), dict(num_inference_steps=15)),
    "inverted-sigmas": (dict(invert_sigmas=True), dict(num_inference_steps=8)),
}


def make_scheduler(name: str, device=None):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    config, timesteps = SCHEDULERS[name]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(device=device, **timesteps)
    return scheduler


def linear_velocity(randn, channels: int):
    """A fixed linear "velocity predictor" over the channels (dimension 1)."""
    weights = randn(channels, channels) * 0.3

    def model(x):
        return torch.einsum("oc,bc...->bo...", weights.to(x.dtype), x)
    return model


# ------------------------------------------------------------------------------------------------- reference

def flow64(model_output, sample, noise, sigma, sigma_next, *, guidance_scale=None, guidance_rescale=0.0,
           stochastic=False):
    """The step written out once more in float64 for one sample (python-float sigmas; model_output holds the
    unconditional and the conditional prediction of the sample with guidance)."""
    x = sample.double()
    if guidance_scale is None:
        v = model_output.double()
    else:
        uncond, cond = model_output[0].double(), model_output[1].double()
        v = uncond + guidance_scale * (cond - uncond)
        if guidance_rescale:
            def std(t):
                return math.sqrt(float(((t - t.mean()) ** 2).sum()) / (t.numel() - 1))
            v = guidance_rescale * v * (std(cond) / std(v)) + (1 - guidance_rescale) * v
    x0 = x - sigma * v
    prev = (1 - sigma_next) * x0 + sigma_next * noise.double() if stochastic else x + (sigma_next - sigma) * v
    return prev, x0


@pytest.mark.parametrize("options", [dict(), dict(stochastic=True), dict(guidance_scale=4.0),
                                     dict(guidance_scale=7.5, guidance_rescale=0.7, stochastic=True)], ids=str)
def test_reference_matches_float64_formula(randn, gen, options):
    batch = 3
    guided = "guidance_scale" in options
    m = randn(2 * batch if guided else batch, 4, 5, 3, dtype=torch.float64)
    x, z = randn(batch, 4, 5, 3, dtype=torch.float64, scale=1.5), randn(batch, 4, 5, 3, dtype=torch.float64)
    sigma, sigma_next = sigmas_for("cpu", gen, batch, "cpu")
    out = diffkern.flow_match_step(m, x, sigma, sigma_next, noise=z if options.get("stochastic") else None,
                                   backend="reference", **options)
    for i in range(batch):
        mi = torch.stack([m[i], m[batch + i]]) if guided else m[i]
        prev64, x064 = flow64(mi, x[i], z[i], float(sigma[i]), float(sigma_next[i]), **options)
        assert_close(out.prev_sample[i], prev64, msg=str(options))
        assert_close(out.pred_original_sample[i], x064, msg=str(options))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_loop_matches_diffusers_fp32(any_backend, name, randn, device):
    """Whole loops, step by step, against FlowMatchEulerDiscreteScheduler.step in float32: the reference is bit for
    bit diffusers (same operations on the same float32 values), the fast backends within the table. The stochastic
    mode draws its noise from a generator seeded like diffusers'."""
    scheduler = make_scheduler(name, device)
    stochastic = scheduler.config.stochastic_sampling
    model = linear_velocity(randn, 4)
    x = randn(2, 4, 6, 5)
    ours_gen, theirs_gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for i, t in enumerate(scheduler.timesteps):
        v = model(x)
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        theirs = scheduler.step(v, t, x, generator=theirs_gen).prev_sample
        ours = diffkern.flow_match_step(v, x, sigma, sigma_next, stochastic=stochastic, generator=ours_gen,
                                        backend=any_backend)
        assert backends.last_backend("flow_match_step") == any_backend
        x0 = x - sigma * v  # diffusers' own x0 (its stochastic branch's), in float32
        if any_backend == "reference":
            assert torch.equal(ours.prev_sample, theirs), f"step {i}"
            assert torch.equal(ours.pred_original_sample, x0), f"step {i}"
        else:
            assert_close(ours.prev_sample, theirs, msg=f"step {i}")
            assert_close(ours.pred_original_sample, x0, msg=f"step {i}")
        x = theirs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["sd3-shift3", "flux-dynamic", "stochastic-shift3"])
def test_half_precision_loop_matches_diffusers_math(any_backend, name, dtype, randn, device):
    """Half-precision loops, step by step: diffkern's step equals diffusers' step on the same values upcast to
    float32, rounded once to the sample dtype (module docstring)."""
    scheduler = make_scheduler(name, device)
    stochastic = scheduler.config.stochastic_sampling
    model = linear_velocity(randn, 4)
    x = randn(2, 4, 7, 5, dtype=dtype)
    for i, t in enumerate(scheduler.timesteps):
        v = model(x)
        noise = randn(*x.shape, dtype=dtype) if stochastic else None
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        if stochastic:  # diffusers' stochastic branch, in float32 on the same values
            expected = (1 - sigma_next) * (x.float() - sigma * v.float()) + sigma_next * noise.float()
        else:
            expected = scheduler.step(v.float(), t, x.float()).prev_sample
        ours = diffkern.flow_match_step(v, x, sigma, sigma_next, stochastic=stochastic, noise=noise,
                                        backend=any_backend)
        assert ours.prev_sample.dtype == dtype
        assert_close(ours.prev_sample, expected, msg=f"step {i}")
        assert_close(ours.pred_original_sample, x.float() - sigma * v.float(), msg=f"step {i}")
        x = ours.prev_sample


@pytest.mark.parametrize("stochastic", [False, True])
def test_guidance_and_rescale_match_the_pipelines(any_backend, stochastic, randn, gen, device):
    """guidance_scale and guidance_rescale fused into the step equal the pipelines' formula (uncond + s (cond -
    uncond), then diffusers' rescale_noise_cfg) followed by the scheduler's step: bit for bit on the reference."""
    rescale = rescale_noise_cfg()
    scheduler = make_scheduler("stochastic-shift3" if stochastic else "sd3-shift3", device)
    scale, phi = 7.0, 0.7
    m = randn(4, 4, 9, 6)
    x = randn(2, 4, 9, 6, scale=1.5)
    uncond, cond = m.chunk(2)
    guided = rescale(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
    i = 5
    scheduler.set_begin_index(i)
    theirs = scheduler.step(guided, scheduler.timesteps[i], x, generator=torch.Generator().manual_seed(3)).prev_sample
    sigma = scheduler.sigmas[i]
    ours = diffkern.flow_match_step(m, x, sigma, scheduler.sigmas[i + 1], guidance_scale=scale,
                                    guidance_rescale=phi, stochastic=stochastic,
                                    generator=torch.Generator().manual_seed(3), backend=any_backend)
    if any_backend == "reference":
        assert torch.equal(ours.prev_sample, theirs)
        assert torch.equal(ours.pred_original_sample, x - sigma * guided)
    else:
        assert_close(ours.prev_sample, theirs)
        assert_close(ours.pred_original_sample, x - sigma * guided)


def test_rescale_of_samples_with_a_large_mean(any_backend, randn, gen, device):
    """std over 70000 elements whose mean is 200 times their std (several blocks of partial moments): no
    cancellation, against float64 math."""
    batch = 2
    m = randn(2 * batch, 70000, shift=200.0)
    x = randn(batch, 70000)
    sigma, sigma_next = sigmas_for("per-sample", gen, batch, device)
    out = diffkern.flow_match_step(m, x, sigma, sigma_next, guidance_scale=3.0, guidance_rescale=0.8,
                                   backend=any_backend)
    for i in range(batch):
        prev64, x064 = flow64(torch.stack([m[i], m[batch + i]]), x[i], None, float(sigma[i]), float(sigma_next[i]),
                              guidance_scale=3.0, guidance_rescale=0.8)
        assert_close(out.prev_sample[i], prev64)
        assert_close(out.pred_original_sample[i], x064)


@pytest.mark.parametrize("options", [dict(), dict(guidance_scale=3.0, guidance_rescale=0.6),
                                     dict(stochastic=True, guidance_scale=2.0)], ids=str)
def test_per_sample_sigmas_equal_stepping_each_sample_alone(any_backend, options, randn, gen, device):
    batch = 4
    guided = "guidance_scale" in options
    m = randn(2 * batch if guided else batch, 3, 5, 5)
    x, z = randn(batch, 3, 5, 5), randn(batch, 3, 5, 5)
    sigma, sigma_next = sigmas_for("per-sample", gen, batch, device)
    noise = z if options.get("stochastic") else None
    batched = diffkern.flow_match_step(m, x, sigma, sigma_next, noise=noise, backend=any_backend, **options)
    for i in range(batch):
        mi = torch.cat([m[i:i + 1], m[batch + i:batch + i + 1]]) if guided else m[i:i + 1]
        alone = diffkern.flow_match_step(mi, x[i:i + 1], float(sigma[i]), float(sigma_next[i]),
                                         noise=None if noise is None else z[i:i + 1], backend=any_backend,
                                         **options)
        assert torch.equal(batched.prev_sample[i:i + 1], alone.prev_sample)
        assert torch.equal(batched.pred_original_sample[i:i + 1], alone.pred_original_sample)


def test_noise_is_drawn_like_diffusers_in_every_dtype(randn, device):
    """Without ``noise`` the stochastic step draws a float32 normal of the sample's shape with the generator, as
    diffusers does (its sample is upcast to float32), rounded to the sample's dtype."""
    for dtype in DTYPES:
        x, v = randn(2, 3, 4, dtype=dtype), randn(2, 3, 4, dtype=dtype)
        drawn = diffkern.flow_match_step(v, x, 0.6, 0.4, stochastic=True,
                                         generator=torch.Generator().manual_seed(5))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
        given = diffkern.flow_match_step(v, x, 0.6, 0.4, stochastic=True, noise=z)
        assert torch.equal(drawn.prev_sample, given.prev_sample), dtype


def test_auto_runs_the_reference_on_cpu_tensors(randn):
    x, v = randn(2, 3, 4).cpu(), randn(2, 3, 4).cpu()
    diffkern.flow_match_step(v, x, 0.5, 0.25)
    assert backends.last_backend("flow_match_step") == "reference"


def test_inputs_are_not_modified(any_backend, randn, gen, device):
    m, x, sigma, sigma_next, kwargs = flow_inputs((2, 3, 6, 5), torch.float32, FLOW_CASES["stochastic-guided-rescale"],
                                                  randn, gen, device)
    copies = [t.clone() for t in (m, x, kwargs["noise"], sigma, sigma_next)]
    diffkern.flow_match_step(m, x, sigma, sigma_next, backend=any_backend, **kwargs)
    for before, after in zip(copies, (m, x, kwargs["noise"], sigma, sigma_next)):
        assert torch.equal(before, after)


# ------------------------------------------------------------------------------------------------- bad input

def _bad_calls(device):
    x = torch.randn(2, 3, 4, device=device)
    m = torch.randn(2, 3, 4, device=device)
    m2 = torch.randn(4, 3, 4, device=device)

    def call(**changes):
        return lambda: diffkern.flow_match_step(**{**dict(model_output=m, sample=x, sigma=0.5, sigma_next=0.25),
                                                   **changes})

    return {
        "sample-not-a-tensor": (call(sample=[1.0]), TypeError, "sample"),
        "sample-int": (call(sample=torch.ones(2, 3, 4, dtype=torch.int64, device=device)), TypeError, "sample"),
        "model_output-shape": (call(model_output=m2), ValueError, "model_output"),
        "model_output-unguided-half": (call(model_output=m, guidance_scale=2.0), ValueError, "model_output"),
        "model_output-dtype": (call(model_output=m.double()), TypeError, "model_output"),
        "sigma-above-one": (call(sigma=1.5), ValueError, "sigma"),
        "sigma-negative": (call(sigma=-0.1), ValueError, "sigma"),
        "sigma-nan": (call(sigma=float("nan")), ValueError, "sigma"),
        "sigma-bool": (call(sigma=True), TypeError, "sigma"),
        "sigma-string": (call(sigma="0.5"), TypeError, "sigma"),
        "sigma-int-tensor": (call(sigma=torch.tensor([1, 0])), TypeError, "sigma"),
        "sigma-shape": (call(sigma=torch.rand(3)), ValueError, "sigma"),
        "sigma-2d": (call(sigma=torch.rand(2, 1)), ValueError, "sigma"),
        "sigma-cpu-value": (call(sigma=torch.tensor([0.5, 1.01])), ValueError, "sigma"),
        "sigma_next-above-one": (call(sigma_next=2.0), ValueError, "sigma_next"),
        "sigma_next-cpu-inf": (call(sigma_next=torch.tensor(float("inf"))), ValueError, "sigma_next"),
        "guidance_scale-string": (call(model_output=m2, guidance_scale="7"), TypeError, "guidance_scale"),
        "guidance_scale-inf": (call(model_output=m2, guidance_scale=float("inf")), ValueError, "guidance_scale"),
        "guidance_rescale-negative": (call(model_output=m2, guidance_scale=2.0, guidance_rescale=-0.5), ValueError,
                                      "guidance_rescale"),
        "guidance_rescale-without-guidance": (call(guidance_rescale=0.7), ValueError, "guidance_rescale"),
        "stochastic-not-bool": (call(stochastic=1), TypeError, "stochastic"),
        "noise-shape": (call(stochastic=True, noise=torch.randn(2, 3, 5, device=device)), ValueError, "noise"),
        "noise-and-generator": (call(stochastic=True, noise=x, generator=torch.Generator()), ValueError,
                                "generator"),
        "generator-type": (call(stochastic=True, generator=3), TypeError, "generator"),
        "backend": (call(backend="fast"), ValueError, "backend"),
    }


@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
def test_bad_input_names_the_argument(case, device):
    call, error, argument = _bad_calls(device)[case]
    with pytest.raises(error, match=argument):
        call()


@pytest.mark.skipif(not ON_GPU, reason="a sigma on another device needs a CUDA device")
def test_sigma_on_another_device_is_refused():
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="sigma"):
        diffkern.flow_match_step(x, x, torch.rand(2, device="meta"), 0.1)


# ------------------------------------------------------------------------------------------------- fast backends

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_options_match_reference(fast_backend, case, dtype, randn, gen, device):
    m, x, sigma, sigma_next, kwargs = flow_inputs((3, 4, 7, 9), dtype, FLOW_CASES[case], randn, gen, device)
    run_both(diffkern.flow_match_step, fast_backend, m, x, sigma, sigma_next, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_match_reference(fast_backend, shape, dtype, randn, gen, device):
    for case in ("guided-rescale", "stochastic-guided-rescale"):
        m, x, sigma, sigma_next, kwargs = flow_inputs(shape, dtype, FLOW_CASES[case], randn, gen, device)
        run_both(diffkern.flow_match_step, fast_backend, m, x, sigma, sigma_next, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_reference(fast_backend, dtype, layout, randn, gen, device):
    m, x, sigma, sigma_next, kwargs = flow_inputs((3, 5, 6, 7), dtype, FLOW_CASES["stochastic-guided-rescale"],
                                                  randn, gen, device, layout=layout)
    prev, x0 = run_both(diffkern.flow_match_step, fast_backend, m, x, sigma, sigma_next, **kwargs)
    if layout == "channels_last":
        assert prev.is_contiguous(memory_format=torch.channels_last)
        assert x0.is_contiguous(memory_format=torch.channels_last)


def test_float64_runs_the_reference_math(fast_backend, randn, gen, device):
    m, x, sigma, sigma_next, kwargs = flow_inputs((2, 3, 4), torch.float64, FLOW_CASES["stochastic-guided-rescale"],
                                                  randn, gen, device)
    fast = diffkern.flow_match_step(m, x, sigma, sigma_next, backend=fast_backend, **kwargs)
    expected = diffkern.flow_match_step(m, x, sigma, sigma_next, backend="reference", **kwargs)
    assert torch.equal(fast.prev_sample, expected.prev_sample)
    assert torch.equal(fast.pred_original_sample, expected.pred_original_sample)


def test_a_sampling_loop_compiles_as_one_graph(fast_backend, randn, device):
    """A loop over the op with device sigmas compiles with fullgraph=True (no graph break: the op is opaque to the
    compiler, and no sigma is read on the host) and computes what the eager reference loop computes."""
    sigmas = torch.tensor([1.0, 0.75, 0.4, 0.0], device=device)
    sample = randn(2, 3, 6, 5)
    outputs = [randn(4, 3, 6, 5) for _ in range(3)]

    def loop(x, outputs, backend):
        for i, model_output in enumerate(outputs):
            x = diffkern.flow_match_step(model_output, x, sigmas[i], sigmas[i + 1], guidance_scale=3.5,
                                         guidance_rescale=0.7, backend=backend).prev_sample
        return x

    torch._dynamo.reset()
    result = torch.compile(loop, fullgraph=True)(sample, outputs, fast_backend)
    assert backends.last_backend("flow_match_step") == fast_backend
    assert_close(result, loop(sample, outputs, "reference"))


def test_opcheck(fast_backend, randn, device):
    """``torch.library.opcheck`` of the custom op on the backend (schema, fake kernel, autograd registration), and of
    the CUDA extension's raw op (schema and fake kernel) on the cuda backend."""
    m, x, z = randn(4, 3, 5, 4), randn(2, 3, 5, 4), randn(2, 3, 5, 4)
    sigma = torch.tensor([0.8, 0.3], device=device)
    sigma_next = torch.tensor([0.6], device=device)
    opcheck(_flow_match_step_op, (m, x, z, sigma, sigma_next, 4.0, 0.7, True, fast_backend))
    opcheck(_flow_match_step_op, (m[:2], x, None, sigma, sigma_next, None, 0.0, False, fast_backend))
    if fast_backend == "cuda":
        from diffkern import _cuda_ops

        raw = _cuda_ops._ops().flow_match_step_cuda
        # Tensor sigmas, then host ones (``Tensor? sigma, float host_sigma``).
        for args in ((m, x, z, sigma, 0.0, sigma_next, 0.0, 4.0, 0.7, 0.3, True),
                     (m[:2], x, None, None, 0.75, None, 0.5, None, 0.0, 1.0, False)):
            opcheck(raw, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("options", [dict(), dict(stochastic=True), dict(guidance_scale=3.0, guidance_rescale=0.6)],
                         ids=str)
def test_gradcheck(any_backend, options, randn, device):
    """float64, where every backend computes the reference math: the registered backward (the vector-Jacobian
    product of the reference) in model_output, sample and noise, std rescale included."""
    guided = "guidance_scale" in options
    m = randn(4 if guided else 2, 3, 3, dtype=torch.float64).requires_grad_()
    x = randn(2, 3, 3, dtype=torch.float64).requires_grad_()
    z = randn(2, 3, 3, dtype=torch.float64).requires_grad_()
    sigma = torch.tensor([0.9, 0.4], dtype=torch.float64, device=device)

    def step(m, x, z):
        out = diffkern.flow_match_step(m, x, sigma, 0.2, noise=z if options.get("stochastic") else None,
                                       backend=any_backend, **options)
        return out.prev_sample, out.pred_original_sample

    assert torch.autograd.gradcheck(step, (m, x, z if options.get("stochastic") else z.detach()))
