"""Test helpers shared by the suite and the benchmarks: the one tolerance table and comparisons.

Every fast path computes in fp32 and rounds once to the output dtype, like the reference, so two correct
implementations differ by at most about one unit in the last place of the output dtype (fp32: a few ulp after
the kernel's own operation order; fp16: 2^-10; bf16: 2^-7 relative). The table is that, per dtype.

Long reductions (a per-channel sum over N * S elements, such as GroupNorm's dweight/dbias) carry one more
error that no per-dtype constant can bound, the rounding of the fp32 accumulation itself, which grows with
the number of terms: they are compared with ``assert_close_sum``, the table plus a bound for that rounding.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple, Union

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


# Unit roundoff of the accumulation: the backends sum in fp32 whatever the input and output dtypes (fp16, bf16
# and fp32), and in float64 only for float64, which runs the reference math.
FP32_UNIT_ROUNDOFF = 2.0 ** -24
FP64_UNIT_ROUNDOFF = 2.0 ** -53

# c in assert_close_sum's bound. Each fp32 addition rounds its result s by at most u * |s|; the backends sum
# in blocks (a short sequential run per lane or tile, then a tree), whose partial sums of random-signed terms
# stay near sqrt(k) * |term|, so the roundings add up like a random walk: |error| ~ u * sqrt(n) * |term| times
# a factor of order one (the tree's depth and the sequential runs enter only through that factor). Measured
# (float32 sums of n = 64 .. 524288 products of two normal draws against the exact sum; pairwise, torch.sum,
# and runs of 32 or 256 sequential additions then pairwise; 40 draws per n, 8 for the largest): the worst
# error was 2.5 * u * sqrt(n) * max|term| (64 terms summed sequentially; runs of 256 reached 2.0, pairwise
# and torch.sum 1.1). Two such implementations, plus each term's own few-ulp fp32 rounding, differ by up to
# about sqrt(2) times that, ~4: c = 8 leaves a factor 2. A purely sequential fp32 sum of many terms is outside
# the rule (its error grows like n, not sqrt(n); past a few thousand terms it can fail this check): no
# backend sums that way.
SUM_ROUNDING_FACTOR = 8.0


def sum_rounding_bound(terms: int, term_scale, dtype: torch.dtype = torch.float32):
    """The accumulation part of ``assert_close_sum``'s allowance, c * u * sqrt(terms) * term_scale, for a
    result of ``dtype`` (u: fp64's unit roundoff for float64, fp32's for every other dtype)."""
    u = FP64_UNIT_ROUNDOFF if dtype == torch.float64 else FP32_UNIT_ROUNDOFF
    return SUM_ROUNDING_FACTOR * u * math.sqrt(terms) * term_scale


def assert_close_sum(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                     term_scale: Union[float, torch.Tensor], msg: str = "") -> None:
    """``actual`` equals ``expected``, each element a sum of ``terms`` terms accumulated in fp32.

    Allowed, elementwise: ``rtol * |expected| + atol`` (the table's entry for ``actual.dtype``, as in
    ``assert_close``: it covers the final rounding to the output dtype and any error proportional to the sum)
    plus ``c * u * sqrt(terms) * term_scale``, the rounding of an accumulation of ``terms`` terms in an order
    the test does not know (u = 2^-24, or 2^-53 when ``actual`` is float64; c = ``SUM_ROUNDING_FACTOR``, see
    there for the derivation).

    ``term_scale`` is the largest ``|term|`` of each sum (a tensor broadcastable to ``expected``, or one
    number), computed by the caller from float64 terms; ``expected`` is best a float64 sum. The bound is far
    below the size of any one typical term once the sum has more than a few terms, so a dropped or doubled
    term, or a relative error well above the table's rtol, still fails. NaNs must match."""
    if terms < 1:
        raise ValueError(f"terms must be positive, got {terms}")
    rtol, atol = TOLERANCES[actual.dtype]
    got = actual.double()
    wanted = expected.to(actual.dtype).double()
    assert got.shape == wanted.shape, f"{msg}\nshape {tuple(got.shape)} != {tuple(wanted.shape)}"
    scale = torch.as_tensor(term_scale, dtype=torch.float64, device=got.device)
    allowed = (rtol * wanted.abs() + atol + sum_rounding_bound(terms, scale, actual.dtype)).expand_as(got)
    error = (got - wanted).abs()
    both_nan = got.isnan() & wanted.isnan()
    bad = ~both_nan & ~(got == wanted) & ~(error <= allowed)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        worst = torch.where(bad, error / allowed, torch.zeros_like(error)).nan_to_num(nan=float("inf")).max()
        raise AssertionError(
            (f"{msg}\n" if msg else "")
            + f"{int(bad.sum())} of {bad.numel()} sums differ by more than the table tolerance of {actual.dtype} "
            f"(rtol {rtol}, atol {atol}) plus the accumulation bound of {terms} terms; first at {index}: "
            f"actual {got[index].item()!r}, expected {wanted[index].item()!r}, difference {error[index].item():.3g}"
            f" > allowed {allowed[index].item():.3g}; worst difference / allowed {worst.item():.3g}")
