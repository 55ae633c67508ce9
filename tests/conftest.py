"""Test setup: the Triton interpreter on machines without a GPU, fresh random seeds every run, and the fast
backends as a test parameter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here, at the top of the
first file pytest loads. Each run draws a new base seed (printed in the header; set ``DIFFKERN_TEST_SEED``
to replay a run); every test gets its own generator derived from it and its node id.

``fast_backend`` parametrizes a test over ``triton`` and ``cuda`` (ids ``[triton]``, ``[cuda]``, so ``-k "ddim and
cuda"`` selects), skipping with the reason where one cannot run. With ``DIFFKERN_TEST_EMULATED_CUDA=<library>``
(tests/test_cuda_emulated.py sets it for a pytest run of its own) the host-emulated CUDA library of
tests/cuda_emulation is loaded, and the ``cuda`` backend runs the real csrc/ kernels on CPU tensors.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

EMULATED_CUDA = os.environ.get("DIFFKERN_TEST_EMULATED_CUDA", "")
FAST_BACKENDS = ("triton", "cuda")

BASE_SEED = int(os.environ.get("DIFFKERN_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def pytest_report_header(config):
    return [f"diffkern: base seed {BASE_SEED} (replay with DIFFKERN_TEST_SEED={BASE_SEED}); device {DEVICE}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"
            + (f"; host-emulated CUDA {EMULATED_CUDA}" if EMULATED_CUDA else "")]


def pytest_configure(config):
    if EMULATED_CUDA:
        # The emulated library registers the CUDA ops' kernels for CPU tensors; the loader then takes it as an
        # externally loaded library, and the cuda backend's wrappers call it.
        from diffkern.ops import _declaration

        _declaration.define_cuda_ops()
        torch.ops.load_library(EMULATED_CUDA)


def pytest_collection_modifyitems(config, items):
    """With the emulated CUDA library, run exactly the tests' cuda-backend cases (the rest ran in the main run)."""
    if not EMULATED_CUDA:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        on_cuda = bool(params) and "cuda" in (params.get("fast_backend"), params.get("any_backend"))
        (keep if on_cuda else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


def usable_backend(name: str, device: torch.device) -> str:
    """``name`` if that backend can run on ``device``'s tensors here, else a skip that says why. On a GPU machine
    ``DIFFKERN_REQUIRE_CUDA_EXTENSION=1`` turns an unavailable CUDA extension into a failure."""
    from diffkern import backends

    if name == "cuda" and EMULATED_CUDA and device.type == "cpu":
        backends._status_cache[("cuda", "cpu")] = backends.BackendStatus(
            True, f"host-emulated CUDA library {EMULATED_CUDA} (tests only)")
    status = backends.backend_status(name, device.type)
    if not status.available:
        message = f"the {name} backend cannot run on {device.type} tensors here: {status.reason}"
        if name == "cuda" and device.type == "cuda" and os.environ.get("DIFFKERN_REQUIRE_CUDA_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return name


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request, device) -> str:
    """``triton`` or ``cuda`` (see ``usable_backend``): the fast backends, compared with the reference."""
    return usable_backend(request.param, device)


@pytest.fixture(params=("reference",) + FAST_BACKENDS)
def any_backend(request, device) -> str:
    """Every backend (see ``usable_backend``), for properties each one must have on its own."""
    return usable_backend(request.param, device)
@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the run's base seed and the test id: fresh each run, reproducible."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**63)
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def randn(gen, device):
    """randn(*shape, dtype=float32) on the test device, drawn from the test's generator (never zeros)."""
    def draw(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)
    return draw


@pytest.fixture(scope="session")
def schedule():
    """Stable Diffusion's schedule (scaled_linear, 1000 steps), as the step and add_noise tests use it."""
    from diffkern.schedules import NoiseSchedule

    return NoiseSchedule.from_name("scaled_linear", 1000, 0.00085, 0.012)


@pytest.fixture
def table(schedule, device) -> torch.Tensor:
    """``schedule``'s float32 abar table on the test device."""
    return schedule.table(device)
