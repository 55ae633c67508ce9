"""``diffkern.testing.assert_close_sum``: correct fp32 sums in any blocked order pass, wrong sums fail.

The terms are fresh random draws every run (``conftest``): products of two normal draws, like dweight's,
shifted to a positive mean where a relative error of the sum is to be a large absolute one. Each row of
``terms`` is one sum (like one channel of dweight).
"""

from __future__ import annotations

import pytest
import torch

from diffkern.testing import TOLERANCES, assert_close_sum, sum_rounding_bound

SIZES = [64, 4096, 1 << 18]  # terms per sum; multiples of RUN
RUN = 32


def draw_terms(gen, rows, n, mean=0.0):
    """float64 values exactly representable in fp32: products of two normal draws, plus ``mean``."""
    a = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    b = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    return (a * b + mean).float().double()


def sum_in_runs(terms32):
    """Another fp32 order: sequential runs of RUN terms per lane, then the run totals in reverse order."""
    rows, n = terms32.shape
    lanes = terms32.reshape(rows, n // RUN, RUN)
    acc = torch.zeros(rows, n // RUN, dtype=torch.float32)
    for k in range(RUN):
        acc = acc + lanes[:, :, k]
    return acc.flip(1).sum(dim=1)


def scale_of(terms):
    return terms.abs().amax(dim=1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mean", [0.0, 0.5])
def test_fp32_sums_in_other_orders_pass(gen, n, mean):
    terms = draw_terms(gen, 3, n, mean)
    exact = terms.sum(dim=1)
    terms32 = terms.float()
    torch_order, run_order = terms32.sum(dim=1), sum_in_runs(terms32)
    for actual in (torch_order, run_order):
        assert_close_sum(actual, exact, terms=n, term_scale=scale_of(terms))
    # two fp32 implementations against each other
    assert_close_sum(run_order, torch_order, terms=n, term_scale=scale_of(terms))
    # the output rounded to half precision: that dtype's table entry on top
    for dtype in (torch.float16, torch.bfloat16):
        assert_close_sum(run_order.to(dtype), exact, terms=n, term_scale=scale_of(terms))


@pytest.mark.parametrize("n", SIZES)
def test_a_dropped_term_fails(gen, n):
    """Zero-mean terms, so that the sum (and the table's rtol * |sum|) is only ~ sqrt(n) terms' size."""
    terms = draw_terms(gen, 3, n)
    exact = terms.sum(dim=1)
    # drop, in every row, the term whose size is nearest the terms' root mean square: a typical term
    rms = terms.pow(2).mean(dim=1, keepdim=True).sqrt()
    typical = (terms.abs() - rms).abs().argmin(dim=1)
    kept = terms.clone()
    kept[torch.arange(3), typical] = 0.0
    with pytest.raises(AssertionError, match="accumulation bound"):
        assert_close_sum(kept.float().sum(dim=1), exact, terms=n, term_scale=scale_of(terms))
    # and only the dropped row fails when a term is missing from one sum
    kept = terms.clone()
    kept[1, typical[1]] = 0.0
    with pytest.raises(AssertionError, match=r"1 of 3 sums .* first at \(1,\)"):
        assert_close_sum(kept.float().sum(dim=1), exact, terms=n, term_scale=scale_of(terms))


@pytest.mark.parametrize("n", SIZES)
def test_a_relative_error_of_1e_3_fails(gen, n):
    terms = draw_terms(gen, 3, n, mean=0.5)
    exact = terms.sum(dim=1)
    wrong = (terms.float().sum(dim=1).double() * (1 + 1e-3)).float()
    with pytest.raises(AssertionError, match="3 of 3 sums"):
        assert_close_sum(wrong, exact, terms=n, term_scale=scale_of(terms))


def test_bound_is_the_table_plus_the_accumulation_term():
    """At exactly the allowance the check passes; just past it, it fails (fp32: rtol, atol and c * u * sqrt(n))."""
    rtol, atol = TOLERANCES[torch.float64]
    expected = torch.tensor([3.0], dtype=torch.float64)
    allowed = rtol * 3.0 + atol + sum_rounding_bound(10_000, 2.0, torch.float64)
    assert_close_sum(expected + allowed * 0.999, expected, terms=10_000, term_scale=2.0)
    with pytest.raises(AssertionError):
        assert_close_sum(expected + allowed * 1.001, expected, terms=10_000, term_scale=2.0)
    rtol, atol = TOLERANCES[torch.float32]
    allowed32 = rtol * 3.0 + atol + sum_rounding_bound(10_000, 2.0)
    assert allowed32 == pytest.approx(1e-5 * 3 + 1e-5 + 8 * 2.0 ** -24 * 100 * 2.0)


def test_nans_must_match():
    expected = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    assert_close_sum(torch.tensor([1.0, float("nan")]), expected, terms=10, term_scale=1.0)
    with pytest.raises(AssertionError):
        assert_close_sum(torch.tensor([float("nan"), float("nan")]), expected, terms=10, term_scale=1.0)
    with pytest.raises(AssertionError):
        assert_close_sum(torch.tensor([1.0, 1.0]), expected, terms=10, term_scale=1.0)
