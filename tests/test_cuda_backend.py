"""The CUDA C++ extension (the ``cuda`` backend, ``csrc/``): what only a GPU shows (streams, CUDA graphs, compile,
fake kernels against real outputs). The ops' cases are in their op test files (``tests/test_<op>.py``,
GroupNorm's regimes included), where ``cuda`` is one of the backends.

GPU tests compare the cuda backend with the reference on the same random inputs (fresh each run, see
``conftest``) through the tolerance table of ``diffkern.testing``. They skip, with the reason, when no CUDA
device is visible or the extension cannot be loaded (set ``DIFFKERN_REQUIRE_CUDA_EXTENSION=1`` to make an
unavailable extension a failure on a GPU machine, as ``scripts/gpu_check.sh`` does).

CPU tests check that the backend's module loads nothing when imported and that CPU tensors are refused with
a clear reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import diffkern
from _helpers import run_both as run_both_backends
from diffkern import _cuda_ops, backends
from diffkern.ops.group_norm_silu import group_norm_silu_forward_reference
from diffkern.schedules import NoiseSchedule
from diffkern.testing import assert_close

NUM_TRAIN = 1000
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def cuda_backend():
    """Skips unless the cuda backend can run here (a CUDA device and a loadable extension)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible to torch: the cuda backend's kernels need a GPU")
    status = backends.backend_status("cuda", "cuda")
    if not status.available:
        message = f"the CUDA extension is unavailable: {status.reason}"
        if os.environ.get("DIFFKERN_REQUIRE_CUDA_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    _cuda_ops._ops()  # the raw ops (torch.ops.diffkern.*_cuda) and their fake kernels, for direct calls
    return CUDA


@pytest.fixture(scope="module")
def table(cuda_backend) -> torch.Tensor:
    return NoiseSchedule.from_name("scaled_linear", NUM_TRAIN, 0.00085, 0.012).table(cuda_backend)


@pytest.fixture
def draw(gen):
    """draw(*shape, dtype=float32, scale=1, shift=0): normal values on the GPU from the test's generator."""
    def sample(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
        values = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
        return values.to(device=CUDA, dtype=dtype)
    return sample


def nhwc_3d(t: torch.Tensor) -> torch.Tensor:
    """(N, C, S) with channels-last strides (C*S, 1, C) and the same values."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def run_both(op, *args, **kwargs):
    """``op`` on the cuda backend and on the reference, compared (``_helpers.run_both``); returns cuda's result."""
    return run_both_backends(op, "cuda", *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Streams, graphs, compile, fake kernels

def test_runs_on_the_current_stream(cuda_backend, table, draw):
    x0, noise = draw(4, 4, 64, 64, dtype=torch.float16), draw(4, 4, 64, 64, dtype=torch.float16)
    expected = diffkern.add_noise(x0, noise, 500, table, backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = diffkern.add_noise(x0, noise, 500, table, backend="cuda")
        y, _, _ = torch.ops.diffkern.group_norm_silu_fwd_cuda(x0.view(4, 4, -1), None, None, 2, 1e-5)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(out, expected)
    assert_close(y, group_norm_silu_forward_reference(x0.view(4, 4, -1), None, None, 2, 1e-5)[0])


def test_cuda_graph_capture(cuda_backend, table, draw):
    """No host sync in the kernels' calls: capture a guided DDIM step, add_noise and GroupNorm."""
    model_output, sample = draw(4, 4, 32, 32), draw(2, 4, 32, 32)
    t, prev_t = torch.tensor([700, 300], device=CUDA), torch.tensor([680, 280], device=CUDA)
    noise = draw(2, 4, 32, 32)
    kwargs = dict(prev_timestep=prev_t, guidance_scale=5.0, clip_sample=True, eta=0.7, noise=noise)

    def step():
        prev, x0 = diffkern.ddim_step(model_output, t, sample, table, backend="cuda", **kwargs)
        return prev, x0, diffkern.group_norm_silu(prev, 2, backend="cuda"), \
            diffkern.add_noise(x0, noise, t, table, backend="cuda")

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up (loads the extension, caches) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    sample.copy_(draw(2, 4, 32, 32))
    graph.replay()
    torch.cuda.synchronize()
    expected_prev, expected_x0 = diffkern.ddim_step(model_output, t, sample, table, backend="reference", **kwargs)
    assert_close(captured[0], expected_prev)
    assert_close(captured[1], expected_x0)
    assert_close(captured[2], diffkern.group_norm_silu(expected_prev, 2, backend="reference"))
    assert_close(captured[3], diffkern.add_noise(expected_x0, noise, t, table, backend="reference"))


def test_torch_compile_fullgraph(cuda_backend, table, draw):
    sample, model_output = draw(2, 4, 16, 16), draw(4, 4, 16, 16)
    t, prev_t = torch.tensor([500, 400], device=CUDA), torch.tensor([480, 380], device=CUDA)

    def step(model_output, sample):
        prev, _ = diffkern.ddim_step(model_output, t, sample, table, prev_timestep=prev_t, guidance_scale=3.0,
                                     backend="cuda")
        return diffkern.group_norm_silu(prev, 2, backend="cuda")

    compiled = torch.compile(step, fullgraph=True)
    assert_close(compiled(model_output, sample), step(model_output, sample))


def _opcheck_cases(table):
    x = torch.randn(2, 3, 8, 8, device=CUDA)
    mo = torch.randn(4, 3, 8, 8, device=CUDA)
    t = torch.tensor([10, 20], device=CUDA)
    x3 = x.view(2, 3, -1)
    w = torch.randn(3, device=CUDA)
    stats = torch.ops.diffkern.group_norm_silu_fwd_cuda(x3, w, None, 3, 1e-5)
    return [
        (torch.ops.diffkern.add_noise_cuda, (x, x, table, t, 0)),
        (torch.ops.diffkern.add_noise_cuda, (x, x, table, None, 10)),   # a host timestep: no tensor
        (torch.ops.diffkern.ddim_step_cuda, (mo, x, x, table, t, 0, t - 5, 0, 1.0, 0.5, 0, True, 1.0, None, False,
                                             2.0, False)),
        (torch.ops.diffkern.ddim_step_cuda, (mo, x, None, table, None, 10, None, -1, 1.0, 0.0, 1, False, 1.0, None,
                                             False, 2.0, True)),
        (torch.ops.diffkern.ddpm_step_cuda, (x, x, x, table, t, 0, None, 9, 0, 0, True, 1.0, None, None, False)),
        (torch.ops.diffkern.group_norm_silu_fwd_cuda, (nhwc_3d(x3), w, None, 3, 1e-5)),
        (torch.ops.diffkern.group_norm_silu_bwd_cuda, (x3, x3, w, None, stats[1], stats[2], 3)),
    ]


def test_fake_kernels_match_real_outputs(cuda_backend, table):
    for op, args in _opcheck_cases(table):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------------------
# CPU: import, refusal, codes

def test_importing_the_backend_loads_nothing():
    code = textwrap.dedent("""
        import sys, torch
        import diffkern, diffkern._cuda_ops as cuda_ops
        from diffkern.ops import _declaration
        assert not cuda_ops._ready and not _declaration._defined
        ext = sys.modules.get("diffkern._extension")
        assert ext is None or not ext.status().get("loaded"), ext.status()
        for op in _declaration.cuda_ops():
            assert not hasattr(torch.ops.diffkern, op.name), op.name
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout


def _cpu_calls():
    table = torch.linspace(0.999, 0.01, 100)
    x = torch.randn(2, 4, 8, 8)
    return {
        "add_noise": lambda: diffkern.add_noise(x, x, 5, table, backend="cuda"),
        "ddim_step": lambda: diffkern.ddim_step(x, 5, x, table, prev_timestep=4, backend="cuda"),
        "ddpm_step": lambda: diffkern.ddpm_step(x, 5, x, table, noise=x, backend="cuda"),
        "group_norm_silu": lambda: diffkern.group_norm_silu(x, 2, backend="cuda"),
    }


@pytest.mark.parametrize("op", ["add_noise", "ddim_step", "ddpm_step", "group_norm_silu"])
def test_cpu_tensors_are_refused_with_the_reason(op):
    with pytest.raises(diffkern.BackendUnavailableError, match="CUDA tensors"):
        _cpu_calls()[op]()
