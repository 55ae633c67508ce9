"""flow_add_noise: the reference against float64 math and diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise``,
and every fast backend against the reference (shapes, dtypes, layouts, sigma forms); bad input, compile, opcheck,
gradcheck.

Backends: ``any_backend``/``fast_backend`` (see ``conftest``); Triton runs in its interpreter without a GPU, CUDA in
host emulation (tests/test_cuda_emulated.py). Inputs are random and fresh each run (the seed is in the header).
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import diffkern
from _helpers import LAYOUTS, lay_out, run_both
from conftest import ON_GPU
from diffkern import backends
from diffkern.ops.flow_add_noise import _flow_add_noise_op
from diffkern.testing import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(1, 1), (3, 1), (1, 4, 5, 7), (3, 3, 11, 13), (2, 3, 41, 37), (2, 300, 64), (1, 2, 3, 5, 7)]
if ON_GPU:
    SHAPES += [(1, 16, 128, 128), (1, 4096, 64), (1, 16, 21, 60, 104)]
SIGMA_KINDS = ("float", "0-d", "per-sample", "cpu", "ends")


def sigma_for(kind: str, gen, batch: int, device):
    """sigma in each form the op takes; "ends" holds the exact ends of the schedule, 0 and 1."""
    sigma = torch.rand(batch, generator=gen)
    if kind == "float":
        return float(sigma[0])
    if kind == "0-d":
        return sigma[0].to(device)
    if kind == "cpu":
        return sigma
    if kind == "ends":
        sigma[0] = 1.0
        sigma[-1] = 0.0
    return sigma.to(device)


# ------------------------------------------------------------------------------------------------- reference

@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_reference_matches_float64_formula(randn, gen, dtype):
    x0, noise = randn(3, 4, 5, 7, dtype=dtype), randn(3, 4, 5, 7, dtype=dtype)
    sigma = torch.rand(3, generator=gen)
    out = diffkern.flow_add_noise(x0, noise, sigma, backend="reference")
    s = sigma.double().view(3, 1, 1, 1)
    assert out.dtype == dtype and backends.last_backend("flow_add_noise") == "reference"
    assert_close(out, (1 - s) * x0.double() + s * noise.double())


def test_reference_equals_diffusers_scale_noise_fp32(randn, gen):
    """scale_noise at the scheduled timesteps (diffusers looks each one up in ``timesteps``): bit for bit in
    float32."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    x0, noise = randn(4, 4, 8, 8).cpu(), randn(4, 4, 8, 8).cpu()
    index = torch.randint(1, 28, (4,), generator=gen)
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[index], noise)
    ours = diffkern.flow_add_noise(x0, noise, scheduler.sigmas[index], backend="reference")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_keeps_float32_coefficients(randn, dtype):
    """diffusers casts sigma to the sample dtype first: in bfloat16 sigma = 0.999 becomes 1.0 and x_0 is dropped.
    diffkern's coefficients stay float32: the result is the float32 math rounded once."""
    x0, noise = randn(2, 3, 16, dtype=dtype), randn(2, 3, 16, dtype=dtype)
    sigma = torch.tensor([0.999, 0.0017])
    out = diffkern.flow_add_noise(x0, noise, sigma, backend="reference")
    s = sigma.view(2, 1, 1)
    assert torch.equal(out, (s * noise.float() + (1 - s) * x0.float()).to(dtype))


def test_auto_runs_the_reference_on_cpu_tensors(randn):
    x = randn(2, 3).cpu()
    diffkern.flow_add_noise(x, x, 0.5)
    assert backends.last_backend("flow_add_noise") == "reference"


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_a_host_sigma_equals_the_same_sigma_as_a_tensor(any_backend, dtype, randn, device):
    """A python float (or a CPU scalar) reaches the backends as a kernel argument rounded to the compute dtype; a
    tensor is read in the kernel: the same sigma gives the same bits either way (0.3 is not a float32)."""
    x0, noise = randn(3, 4, 5, dtype=dtype), randn(3, 4, 5, dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    as_tensor = diffkern.flow_add_noise(x0, noise, torch.full((3,), 0.3, dtype=compute, device=device),
                                        backend=any_backend)
    for host in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        got = diffkern.flow_add_noise(x0, noise, host, backend=any_backend)
        assert backends.last_backend("flow_add_noise") == any_backend
        assert torch.equal(got, as_tensor), host


def _bad_calls(device):
    x = torch.randn(2, 3, 4, device=device)

    def call(**changes):
        return lambda: diffkern.flow_add_noise(**{**dict(original_samples=x, noise=x, sigma=0.5), **changes})

    return {
        "original_samples-type": (call(original_samples=3.0), TypeError, "original_samples"),
        "noise-shape": (call(noise=x[:1]), ValueError, "noise"),
        "noise-dtype": (call(noise=x.half()), TypeError, "noise"),
        "sigma-above-one": (call(sigma=1.01), ValueError, "sigma"),
        "sigma-cpu-negative": (call(sigma=torch.tensor([0.5, -0.5])), ValueError, "sigma"),
        "sigma-shape": (call(sigma=torch.rand(3)), ValueError, "sigma"),
        "sigma-int": (call(sigma=torch.tensor(1)), TypeError, "sigma"),
        "backend": (call(backend="gpu"), ValueError, "backend"),
    }


@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
def test_bad_input_names_the_argument(case, device):
    call, error, argument = _bad_calls(device)[case]
    with pytest.raises(error) as raised:
        call()
    assert argument in str(raised.value)


# ------------------------------------------------------------------------------------------------- fast backends

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", SIGMA_KINDS)
def test_matches_reference(fast_backend, kind, shape, dtype, randn, gen, device):
    x0, noise = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    run_both(diffkern.flow_add_noise, fast_backend, x0, noise, sigma_for(kind, gen, shape[0], device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_reference(fast_backend, dtype, layout, randn, gen, device):
    x0, noise = lay_out(randn(3, 5, 6, 7, dtype=dtype), layout), lay_out(randn(3, 5, 6, 7, dtype=dtype), layout)
    out = run_both(diffkern.flow_add_noise, fast_backend, x0, noise, sigma_for("per-sample", gen, 3, device))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_float64_runs_the_reference_math(fast_backend, randn, gen, device):
    x0, noise = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, 4, dtype=torch.float64)
    sigma = sigma_for("per-sample", gen, 2, device)
    assert torch.equal(diffkern.flow_add_noise(x0, noise, sigma, backend=fast_backend),
                       diffkern.flow_add_noise(x0, noise, sigma, backend="reference"))


def test_compiles_without_a_graph_break(fast_backend, randn, gen, device):
    x0, noise = randn(2, 3, 5), randn(2, 3, 5)
    sigma = sigma_for("per-sample", gen, 2, device)

    def noised(x0, noise, sigma):
        return diffkern.flow_add_noise(x0, noise, sigma, backend=fast_backend) * 2

    torch._dynamo.reset()
    assert_close(torch.compile(noised, fullgraph=True)(x0, noise, sigma),
                 diffkern.flow_add_noise(x0, noise, sigma, backend="reference") * 2)


def test_opcheck(fast_backend, randn, device):
    x, z = randn(2, 3, 5), randn(2, 3, 5)
    sigma = torch.tensor([0.8, 0.3], device=device)
    opcheck(_flow_add_noise_op, (x, z, sigma, fast_backend))
    if fast_backend == "cuda":
        from diffkern import _cuda_ops

        for args in ((x, z, sigma, 0.0), (x, z, None, 0.25)):  # a tensor sigma, then a host one
            opcheck(_cuda_ops._ops().flow_add_noise_cuda, args, test_utils=("test_schema", "test_faketensor"))


def test_gradcheck(any_backend, randn, device):
    x0 = randn(2, 3, 4, dtype=torch.float64).requires_grad_()
    noise = randn(2, 3, 4, dtype=torch.float64).requires_grad_()
    sigma = torch.tensor([0.7, 0.2], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda a, b: diffkern.flow_add_noise(a, b, sigma, backend=any_backend),
                                    (x0, noise))
