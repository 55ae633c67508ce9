"""Test helpers shared by the suite and the benchmarks: the one tolerance table and comparisons.

Every fast path computes in fp32 and rounds once to the output dtype, like the reference, so two correct
implementations differ by at most about one unit in the last place of the output dtype (fp32: a few ulp after
the kernel's own operation order; fp16: 2^-10; bf16: 2^-7 relative). The table is that, per dtype.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

# dtype -> (rtol, atol)
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, msg: str = "") -> None:
    """``actual`` equals ``expected`` rounded to ``actual.dtype``, within that dtype's tolerance.

    ``expected`` may be of higher precision (a float64 truth); NaNs must match."""
    rtol, atol = TOLERANCES[actual.dtype]
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=(lambda m: f"{msg}\n{m}" if msg else m))
