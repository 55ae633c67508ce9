"""add_noise: the reference against float64 math and diffusers, and every fast backend against the reference.

The fast-backend tests take ``fast_backend`` (``triton``, ``cuda``; see ``conftest``): each case calls the public
op on that backend and on the reference with the same random inputs (fresh each run), asserts which backend
ran and compares through the one tolerance table. Without a GPU, Triton runs in its interpreter and CUDA in host
emulation (a pytest run of its own, started by tests/test_cuda_emulated.py).
"""

from __future__ import annotations

import pytest
import torch

import diffkern
from _helpers import LAYOUTS, lay_out, run_both
from conftest import ON_GPU
from diffkern import backends
from diffkern.testing import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_TRAIN = 1000
# Sample shapes [B, ...]: B = 1 and 3, n = 1, n below one block, n past one block with a tail, 5-D.
SHAPES = [(1, 1), (3, 1), (1, 4, 5, 7), (3, 3, 11, 13), (2, 3, 41, 37), (2, 3, 4, 5, 6)]
if ON_GPU:
    SHAPES += [(2, 4, 64, 64), (5, 3, 129, 131)]
TIMESTEP_KINDS = ("int", "0-d", "per-sample", "cpu")


def timesteps_for(kind: str, gen, batch: int, device, low: int = 0, high: int = NUM_TRAIN):
    """Timesteps in each form the ops take: a python int, a 0-d or per-sample device tensor, a CPU tensor."""
    if kind == "int":
        return int(torch.randint(low, high, (), generator=gen))
    if kind == "0-d":
        return torch.randint(low, high, (), generator=gen).to(device)
    if kind == "cpu":
        return torch.randint(low, high, (batch,), generator=gen)
    return torch.randint(low, high, (batch,), generator=gen).to(device)


# ------------------------------------------------------------------------------------------------- reference

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reference_matches_float64_formula(randn, gen, dtype):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x0, noise = randn(3, 4, 5, 7, dtype=dtype), randn(3, 4, 5, 7, dtype=dtype)
    t = torch.randint(0, 1000, (3,), generator=gen)
    out = diffkern.add_noise(x0, noise, t, table, backend="reference")
    a = table[t].view(3, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert out.dtype == dtype and backends.last_backend("add_noise") == "reference"
    assert_close(out, expected)


def test_reference_matches_diffusers_fp32(randn, gen):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = randn(4, 4, 8, 8), randn(4, 4, 8, 8)
    t = torch.randint(0, 1000, (4,), generator=gen)
    assert_close(diffkern.add_noise(x0, noise, t, sched.alphas_cumprod, backend="reference"),
                 sched.add_noise(x0, noise, t))


def test_reference_adds_noise_in_bf16_at_small_t(randn):
    # diffusers rounds abar to bf16 first: abar_1 rounds to 1.0 and no noise is added at all.
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear"))
    x0, noise = randn(2, 64, dtype=torch.bfloat16), randn(2, 64, dtype=torch.bfloat16, scale=10.0)
    out = diffkern.add_noise(x0, noise, 1, table, backend="reference")
    assert not torch.equal(out, x0)
    # The truth from the float32 abar that the op computes with (the backend contract's table): 1 - abar_1 is
    # ~1e-4, so the float64 table's abar would differ from it by ~1e-4 relative in sqrt(1 - abar), times noise ~10.
    abar = table.float()[1].double()
    assert_close(out, abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double())


def test_timestep_forms_agree(randn):
    table = diffkern.alphas_cumprod(diffkern.make_betas("linear")).float()
    x0, noise = randn(2, 3, 4), randn(2, 3, 4)
    by_int = diffkern.add_noise(x0, noise, 17, table)
    assert torch.equal(by_int, diffkern.add_noise(x0, noise, torch.tensor(17), table))
    assert torch.equal(by_int, diffkern.add_noise(x0, noise, torch.tensor([17, 17]), table))


# ------------------------------------------------------------------------------------------------- fast backends

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fast_backend, shape, dtype, table, randn, gen, device):
    x0, noise = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    for kind in ("per-sample", "int"):
        run_both(diffkern.add_noise, fast_backend, x0, noise, timesteps_for(kind, gen, shape[0], device), table)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("timesteps_kind", TIMESTEP_KINDS)
def test_layouts_and_timestep_forms(fast_backend, dtype, layout, timesteps_kind, table, randn, gen, device):
    x0 = lay_out(randn(3, 5, 6, 7, dtype=dtype), layout)
    noise = lay_out(randn(3, 5, 6, 7, dtype=dtype), layout)
    out = run_both(diffkern.add_noise, fast_backend, x0, noise, timesteps_for(timesteps_kind, gen, 3, device), table)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_table_ends_clamping_and_strided_indices(fast_backend, table, randn, gen, device):
    """t = 0 and t = T-1 read the table's ends; indices past either end (possible in device tensors, which are
    not range-checked) are clamped into the table as the reference clamps them; strided timestep and table views
    are read in place."""
    x0, noise = randn(4, 2, 3, 5), randn(4, 2, 3, 5)
    run_both(diffkern.add_noise, fast_backend, x0, noise, torch.tensor([0, NUM_TRAIN - 1, 5, NUM_TRAIN - 1],
                                                                       device=device), table)
    outside = torch.tensor([-7, NUM_TRAIN + 50, 5, NUM_TRAIN - 1], device=device)
    implementation = backends.implementation(fast_backend, "add_noise")   # past the public range check
    reference = backends.implementation("reference", "add_noise")
    assert_close(implementation(x0, noise, table, outside), reference(x0, noise, table, outside))
    every_other = torch.randint(0, NUM_TRAIN // 2, (8,), generator=gen).to(device)[::2]
    run_both(diffkern.add_noise, fast_backend, x0, noise, every_other, table[::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_implementation_takes_a_python_int_timestep(fast_backend, dtype, table, randn, gen, device):
    """The backend contract: a python-int timestep (a kernel argument, no device tensor) computes bit for bit
    what the equivalent int64 [1] tensor computes, table ends included."""
    implementation = backends.implementation(fast_backend, "add_noise")
    x0, noise = randn(3, 4, 5, 7, dtype=dtype), randn(3, 4, 5, 7, dtype=dtype)
    for t in (0, int(torch.randint(1, NUM_TRAIN - 1, (), generator=gen)), NUM_TRAIN - 1):
        by_int = implementation(x0, noise, table, t)
        assert torch.equal(by_int, implementation(x0, noise, table, torch.tensor([t], device=device))), t


def test_float64_runs_the_reference_math(fast_backend, table, randn, gen, device):
    x0, noise = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, 4, dtype=torch.float64)
    t = timesteps_for("per-sample", gen, 2, device)
    fast = diffkern.add_noise(x0, noise, t, table, backend=fast_backend)
    assert torch.equal(fast, diffkern.add_noise(x0, noise, t, table, backend="reference"))


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: 70000 samples exercise the CUDA grid's row limit (65535)")
def test_more_samples_than_grid_rows(fast_backend, table, randn, gen, device):
    run_both(diffkern.add_noise, fast_backend, randn(70000, 3), randn(70000, 3),
             timesteps_for("per-sample", gen, 70000, device), table)


BIG = 2**31


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: tensors past 2^31 elements take several GiB")
@pytest.mark.parametrize("shape", [(2, BIG // 2 + 17), (1, BIG + 5)], ids=["batch-past-2^31", "sample-past-2^31"])
def test_past_int32_offsets(fast_backend, shape, table, gen, device):
    total = torch.cuda.get_device_properties(device).total_memory
    if total < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of GPU memory, the device has {total / 2**30:.0f}")
    device_gen = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    x0 = torch.randn(shape, generator=device_gen, device=device, dtype=torch.float16)
    noise = torch.randn(shape, generator=device_gen, device=device, dtype=torch.float16)
    timestep = timesteps_for("per-sample", gen, shape[0], device)
    out = diffkern.add_noise(x0, noise, timestep, table, backend=fast_backend)
    assert backends.last_backend("add_noise") == fast_backend
    # The elements at the end of storage (past 2^31) and at the start, against the reference on slices.
    for part in (slice(-(1 << 20), None), slice(0, 1 << 20)):
        expected = diffkern.add_noise(x0[:, part], noise[:, part], timestep, table, backend="reference")
        assert_close(out[:, part], expected)
