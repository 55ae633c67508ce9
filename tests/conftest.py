"""Test setup: the Triton interpreter on machines without a GPU, and fresh random seeds every run.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here, at the top of the
first file pytest loads. Each run draws a new base seed (printed in the header; set ``DIFFKERN_TEST_SEED``
to replay a run); every test gets its own generator derived from it and its node id.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

BASE_SEED = int(os.environ.get("DIFFKERN_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def pytest_report_header(config):
    return [f"diffkern: base seed {BASE_SEED} (replay with DIFFKERN_TEST_SEED={BASE_SEED}); device {DEVICE}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]


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
