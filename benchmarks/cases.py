"""The benchmark cases as pytest parameters for this machine, and the end-to-end sampling configurations.

The op cases themselves (shape sets, byte models, inputs, baselines) are defined in the package, in
``diffkern/_bench_cases.py``, and measured by ``diffkern.bench``, the harness of ``python -m diffkern bench``: an
installed package cannot import this directory. This module turns them into pytest parameters and adds what only
the pytest suite has (the end-to-end loops).

On a GPU the GPU shape sets run. On a CPU the small CPU shape sets run (so that CI can execute the suite in well
under a minute) and the GPU shape sets are collected and skipped with the reason, so that the report lists every
case a GPU run would measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import pytest
import torch

from diffkern._bench_cases import (  # noqa: F401  (SD_*: re-exported for test_bench_e2e)
    BASELINES, IMPLS, SD_DDIM_EXTRA, SD_SCHEDULER, make_cases)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WHERE = "gpu" if DEVICE.type == "cuda" else "cpu"


def op_params() -> List[Any]:
    """``pytest.param(case, impl)`` for every case and every impl that applies to its op, baselines first."""
    params = []
    for case in make_cases():
        if case.where != WHERE:
            if WHERE == "gpu":
                continue   # the CPU smoke sizes say nothing on a GPU, where the real shapes run
            marks = [pytest.mark.skip(reason=f"GPU-sized case ({case.shape_set}: {case.spec.description}); "
                                             "runs on a CUDA device")]
        else:
            marks = []
        for impl in IMPLS:
            if impl in BASELINES and impl not in case.spec.baselines:
                continue
            params.append(pytest.param(case, impl, id=f"{case.id}-{impl}", marks=marks))
    return params


# ----------------------------------------------------------------------------------------------------------------
# End to end: a 50-step DDIM loop over a randomly initialised diffusers UNet2DModel


@dataclass(frozen=True)
class LoopConfig:
    label: str
    unet: Dict[str, Any]            # UNet2DModel keyword arguments
    batch: int
    dtype: torch.dtype
    steps: int = 50

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        size = self.unet["sample_size"]
        return (self.batch, self.unet["in_channels"], size, size)


# SD 1.5's UNet widths and depth at 512 px (64^2 latents), batch 2 (one image with classifier-free guidance), fp16.
# UNet2DModel has no cross-attention, so this is "SD-like", not SD: same GroupNorm+SiLU shapes, no text encoder.
SD_LIKE = LoopConfig(
    "sd-like-unet2d-64", dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                              block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, attention_head_dim=64,
                              down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                                "DownBlock2D"),
                              up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D")),
    batch=2, dtype=torch.float16)

# Small enough for a CI CPU: the same structure (resnets with GroupNorm+SiLU, one attention level), 8^2 latents.
TINY = LoopConfig(
    "tiny-unet2d-8", dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    batch=1, dtype=torch.float32)

LOOP = SD_LIKE if WHERE == "gpu" else TINY
