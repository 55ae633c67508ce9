"""The Triton GroupNorm+SiLU kernels (``diffkern/triton/group_norm_silu/``), forward and backward.

Each case runs the Triton kernels, on the heuristic's plan through the public op with ``backend="triton"``
(asserting that the Triton backend ran), or on an explicit plan through the backend's entry points (their
``plan`` argument), then compares the output and the gradients of x, weight and bias with
``backend="reference"`` and with float64 autograd of ``F.silu(F.group_norm(...))``, through the one tolerance
table of ``diffkern.testing`` (dweight/dbias, sums of N * S terms, through ``assert_close_sum``: the table plus
the fp32 accumulation bound, at every size). Inputs are fresh random draws every run (``conftest``). Small test
shapes reach the looped and split regimes through plans made with some of the planner's decisions forced
(smaller loop tiles, a regime and chunk count: ``plan_for``'s keywords); the default heuristic is tested on its
own, shapes only.

Without a GPU the kernels run in the Triton interpreter on CPU tensors, which rounds fp32 to bf16 by
truncation (GPUs round to nearest even): one bf16 ulp at most, inside bf16's tolerance.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffkern
from _helpers import check_param_grads, group_norm_silu_param_grad_sums, in_layout, same_layout
from conftest import DEVICE, ON_GPU
from diffkern import backends
from diffkern.ops.group_norm_silu import group_norm_silu_backward_reference, group_norm_silu_forward_reference
from diffkern.testing import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OP = "group_norm_silu"


@pytest.fixture(scope="module")
def tgn():
    """The Triton module, imported at test time (never at collection), or a skip saying why it cannot run."""
    status = diffkern.available_backends(DEVICE)["triton"]
    if not status.available:
        pytest.skip(f"the triton backend cannot run on {DEVICE}: {status.reason}")
    return importlib.import_module("diffkern.triton.group_norm_silu")


# ----------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------


def make_inputs(randn, shape, dtype, *, channels_last=False, param_dtype=None, affine=(True, True), shift=0.0,
                scale=1.0):
    """x and dy of ``shape`` in the layout, weight ~ 1 + N(0, 0.5^2) and bias ~ N(0, 0.5^2) (or None)."""
    channels = shape[1]
    param_dtype = param_dtype or dtype
    x = in_layout(randn(*shape, dtype=dtype, scale=scale, shift=shift), channels_last)
    dy = in_layout(randn(*shape, dtype=dtype), channels_last)
    weight = randn(channels, dtype=param_dtype, scale=0.5, shift=1.0) if affine[0] else None
    bias = randn(channels, dtype=param_dtype, scale=0.5) if affine[1] else None
    return x, dy, weight, bias


def run_op(x, dy, num_groups, weight, bias, eps, backend):
    """y and the gradients (x, weight, bias) of the public op on ``backend``."""
    x = x.detach().clone().requires_grad_()
    weight = None if weight is None else weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = diffkern.group_norm_silu(x, num_groups, weight, bias, eps, backend=backend)
    assert backends.last_backend(OP) == backend
    y.backward(dy)
    return y.detach(), x.grad, None if weight is None else weight.grad, None if bias is None else bias.grad


def float64_truth(x, dy, num_groups, weight, bias, eps):
    """y and the gradients from float64 autograd of silu(group_norm(x))."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    # The affine part is applied by hand: F.group_norm's float64 backward fails with bias but no weight.
    per_channel = (-1,) + (1,) * (x.ndim - 2)
    z64 = F.group_norm(x64, num_groups, None, None, eps)
    if w64 is not None:
        z64 = z64 * w64.reshape(per_channel)
    if b64 is not None:
        z64 = z64 + b64.reshape(per_channel)
    y64 = F.silu(z64)
    y64.backward(dy.double())
    return y64.detach(), x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad


def as_3d(t):
    """The ``(N, C, S)`` view the op hands the backend (NCHW and channels-last inputs are views)."""
    return t.view(t.shape[0], t.shape[1], -1)


def plans_for(tgn, x, num_groups, **forced):
    """The (forward, backward) plans for ``x`` (any rank), the planner's decisions in ``forced`` replaced."""
    return tuple(tgn.plan_for(as_3d(x), num_groups, tuning, **forced) for tuning in (tgn.FORWARD, tgn.BACKWARD))


def run_planned(tgn, x, dy, num_groups, weight, bias, eps, plans):
    """y and the gradients (x, weight, bias) from the backend's entry points on ``plans``, as the op returns them."""
    x3, dy3 = as_3d(x), as_3d(dy)
    y, mean, rstd = tgn.group_norm_silu_forward(x3, weight, bias, num_groups, eps, plan=plans[0])
    dx, dweight, dbias = tgn.group_norm_silu_backward(dy3, x3, weight, bias, mean, rstd, num_groups, plan=plans[1])
    return (y.view(x.shape), dx.view(x.shape), None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))


def check_op(tgn, x, dy, num_groups, weight=None, bias=None, eps=1e-5, *, plans=None):
    """Triton against the reference and float64 autograd: the public op (the heuristic's plans), or the backend's
    entry points on ``plans`` (forward, backward)."""
    if plans is None:
        fast = run_op(x, dy, num_groups, weight, bias, eps, "triton")
    else:
        fast = run_planned(tgn, x, dy, num_groups, weight, bias, eps, plans)
    assert same_layout(fast[0], x), "y must keep x's layout"
    expected = run_op(x, dy, num_groups, weight, bias, eps, "reference")
    truth = float64_truth(x, dy, num_groups, weight, bias, eps)
    for name, actual, wanted, true in zip(("y", "dx"), fast, expected, truth):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape
        assert_close(actual, wanted, msg=f"{name} against the reference")
        assert_close(actual, true, msg=f"{name} against float64 autograd")
    # dweight/dbias are sums of N * S terms per channel: the table plus the fp32 accumulation bound, whatever N * S.
    sums = group_norm_silu_param_grad_sums(dy, x, weight, bias, num_groups, eps)
    for name, true in zip(("dweight", "dbias"), truth[2:]):
        assert (true is None) == (name not in sums)
        if true is not None:
            assert_close(sums[name][0], true, msg=f"{name}: float64 sum against float64 autograd")
    check_param_grads(dict(dweight=fast[2], dbias=fast[3]), dict(dweight=expected[2], dbias=expected[3]), sums)
    return fast


# ----------------------------------------------------------------------------------------------------------
# Against the reference and float64 autograd.
# ----------------------------------------------------------------------------------------------------------

# (shape, num_groups): C/G * S is never a power of two, so every tile has masked lanes.
SHAPES = [((2, 12, 5, 7), 4)]
if ON_GPU:
    SHAPES += [((3, 6, 3, 11), 3), ((2, 320, 64, 64), 32), ((1, 640, 32, 32), 32), ((2, 1280, 16, 16), 32),
               ((3, 96, 33, 35), 8)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("shape,num_groups", SHAPES, ids=str)
def test_matches_reference(tgn, randn, shape, num_groups, dtype, param_dtype, channels_last):
    x, dy, weight, bias = make_inputs(randn, shape, dtype, channels_last=channels_last, param_dtype=param_dtype)
    check_op(tgn, x, dy, num_groups, weight, bias)


# (regime, channels_last, dtype, shape, num_groups, loop tile elements, chunks): several tiles per group with
# tails, several channel tiles where the channels are the contiguous axis (channels-last) and several pixel
# tiles where they are not, and chunks of uneven size. Every regime meets every layout and dtype; the random
# sweep below mixes them further.
REGIME_CASES = [
    ("looped", False, torch.float32, (1, 6, 5, 7), 2, 32, None),
    ("looped", True, torch.bfloat16, (1, 10, 2, 2), 1, 8, None),
    ("looped", False, torch.float16, (1, 4, 3, 3), 2, 4, None),
    ("looped", True, torch.float16, (1, 6, 5, 7), 2, 32, None),
    ("split", False, torch.bfloat16, (1, 6, 5, 7), 2, 32, 3),
    ("split", True, torch.float32, (1, 10, 2, 2), 1, 8, 3),
    ("split", False, torch.float16, (1, 10, 2, 2), 1, 8, 3),
    ("split", True, torch.bfloat16, (1, 4, 3, 3), 2, 4, 2),
]


@pytest.mark.parametrize("regime,channels_last,dtype,shape,num_groups,tile,chunks", REGIME_CASES, ids=str)
def test_regimes(tgn, randn, regime, channels_last, dtype, shape, num_groups, tile, chunks):
    x, dy, weight, bias = make_inputs(randn, shape, dtype, channels_last=channels_last, param_dtype=torch.float32)
    plans = plans_for(tgn, x, num_groups, regime=regime, loop_tile_elems=tile, chunks=chunks)
    check_op(tgn, x, dy, num_groups, weight, bias, plans=plans)
    plan = plans[0]
    assert plan.c_tiles * plan.s_tiles > 1
    if regime == "split":
        assert 1 < plan.chunks < plan.c_tiles * plan.s_tiles


def test_default_plan_splits_few_large_groups(tgn, randn):
    """Nothing forced: one group of 18K elements, on the interpreter's stand-in SM count, is split (the plans the
    op runs on)."""
    x, dy, weight, bias = make_inputs(randn, (1, 2, 96, 96), torch.float16, channels_last=True)
    for plan in plans_for(tgn, x, 1):
        assert plan.regime == "split" and plan.chunks > 1
    check_op(tgn, x, dy, 1, weight, bias)


# name -> (shape, num_groups, channels_last, (has weight, has bias), forced plan decisions)
EDGE_CASES = {
    "spatial_1x1": ((3, 8, 1, 1), 4, False, (True, True), {}),
    "rank3": ((2, 8, 13), 4, False, (True, True), {}),
    "rank5": ((2, 4, 3, 2, 5), 2, False, (True, True), {}),
    "rank5_channels_last": ((2, 4, 3, 2, 5), 2, True, (True, True), {}),
    "one_group": ((2, 8, 3, 5), 1, True, (True, True), {}),
    "one_channel_per_group": ((2, 8, 3, 5), 8, False, (True, True), {}),
    "no_affine": ((2, 8, 3, 5), 4, True, (False, False), {}),
    "weight_only": ((2, 8, 3, 5), 4, False, (True, False), {}),
    "bias_only": ((2, 8, 3, 5), 4, True, (False, True), {}),
    # More channels than one block of the dweight/dbias reduction, more rows than one row block.
    "320_channels": ((1, 320, 1, 1), 1, False, (True, True), {}),
    "17_samples": ((17, 1, 2), 1, False, (True, True), {}),
    # The 64-bit in-sample offsets (automatic from 2^31 elements per sample).
    "offsets_64": ((2, 8, 3, 5), 4, True, (True, True), {"offsets_64": True}),
}
# The same problems split into chunks (small tiles, so that there are several), where that adds a path.
SPLIT_EDGE_CASES = {
    "spatial_1x1": ((1, 8, 1, 1), 1, False, (True, True), {}),
    "rank5_channels_last": ((1, 4, 3, 2, 2), 2, True, (True, True), {}),
    "one_channel_per_group": ((1, 4, 3, 5), 4, False, (True, True), {}),
    "no_affine": ((1, 4, 3, 5), 2, True, (False, False), {}),
    "weight_only": ((1, 4, 3, 5), 2, False, (True, False), {}),
    "bias_only": ((1, 4, 3, 5), 2, True, (False, True), {}),
    "offsets_64": ((1, 4, 3, 5), 2, False, (True, True), {"offsets_64": True}),
}
EDGE_PARAMS = [pytest.param("single", *case, id=f"single-{name}") for name, case in EDGE_CASES.items()] + \
    [pytest.param("split", *case, id=f"split-{name}") for name, case in SPLIT_EDGE_CASES.items()]


@pytest.mark.parametrize("regime,shape,num_groups,channels_last,affine,forced", EDGE_PARAMS)
def test_edge_cases(tgn, randn, regime, shape, num_groups, channels_last, affine, forced):
    dtype = torch.float16 if regime == "single" else torch.bfloat16
    if regime == "split":
        forced = dict(forced, loop_tile_elems=8, chunks=2)
    x, dy, weight, bias = make_inputs(randn, shape, dtype, channels_last=channels_last, affine=affine)
    plans = plans_for(tgn, x, num_groups, regime=regime, **forced)
    for plan in plans:
        assert plan.offsets_64 == forced.get("offsets_64", False)
    check_op(tgn, x, dy, num_groups, weight, bias, plans=plans)


# ----------------------------------------------------------------------------------------------------------
# Numerics and determinism, at the backend's own entry points (they also return mean and rstd).
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("regime,dtype,channels_last", [("single", torch.float32, False),
                                                        ("single", torch.bfloat16, True),
                                                        ("looped", torch.float16, True),
                                                        ("split", torch.float32, False),
                                                        ("split", torch.float16, True)], ids=str)
def test_large_mean(tgn, randn, regime, dtype, channels_last):
    """|mean| = 1000 std: sum(x^2)/M - mean^2 would lose the variance to cancellation in fp32 (about 6% error
    in rstd). The statistics must match float64 truth; y and the gradients must match the float64 math, and
    the reference backward, at those statistics. (Against the reference's own fp32 mean, y would differ by
    the unavoidable rounding of a mean of ~1000, about 3e-5 of the std.)"""
    shape, num_groups, eps = (1, 4, 6, 7), 2, 1e-5
    x, dy, weight, bias = make_inputs(randn, shape, dtype, channels_last=channels_last, shift=1000.0)
    x3, dy3 = x.flatten(2), dy.flatten(2)
    forward, backward = plans_for(tgn, x3, num_groups, regime=regime, loop_tile_elems=32, chunks=2)
    y, mean, rstd = tgn.group_norm_silu_forward(x3, weight, bias, num_groups, eps, plan=forward)
    dx, dweight, dbias = tgn.group_norm_silu_backward(dy3, x3, weight, bias, mean, rstd, num_groups, plan=backward)

    grouped = x3.double().reshape(shape[0], num_groups, -1)
    assert_close(mean, grouped.mean(dim=2))
    assert_close(rstd, torch.rsqrt(grouped.var(dim=2, unbiased=False) + eps))

    n, c, s = x3.shape
    xhat = ((grouped - mean.double()[..., None]) * rstd.double()[..., None]).reshape(n, c, s)
    z = xhat * weight.double()[None, :, None] + bias.double()[None, :, None]
    assert_close(y, F.silu(z))
    expected = group_norm_silu_backward_reference(dy3, x3, weight, bias, mean, rstd, num_groups)
    for name, actual, wanted in zip(("dx", "dweight", "dbias"), (dx, dweight, dbias), expected):
        assert_close(actual, wanted, msg=name)


@pytest.mark.parametrize("regime", ["single", "split"])
def test_bitwise_deterministic(tgn, randn, regime):
    """Run-to-run identical outputs and gradients: no float atomics, fixed reduction orders. (The interpreter
    runs programs one by one; on a GPU they race.)"""
    x, dy, weight, bias = make_inputs(randn, (2, 2, 3, 8), torch.bfloat16, channels_last=True,
                                      param_dtype=torch.float32)
    x3, dy3 = x.flatten(2), dy.flatten(2)
    forward, backward = plans_for(tgn, x3, 1, regime=regime, loop_tile_elems=16, chunks=3)
    if regime == "split":
        assert backward.s_chunks == 3
    results = []
    for _ in range(2):
        y, mean, rstd = tgn.group_norm_silu_forward(x3, weight, bias, 1, 1e-5, plan=forward)
        results.append((y, mean, rstd) + tgn.group_norm_silu_backward(dy3, x3, weight, bias, mean, rstd, 1,
                                                                      plan=backward))
    for first, second in zip(*results):
        assert torch.equal(first, second)
    expected = group_norm_silu_backward_reference(dy3, x3, weight, bias, results[0][1], results[0][2], 1)
    for actual, wanted in zip(results[0][3:], expected):
        assert_close(actual, wanted)


def test_backward_takes_grad_in_another_layout(tgn, randn):
    """The op hands grad_out in x's layout; any other is still handled (copied) and dx keeps x's layout."""
    x, _, weight, bias = make_inputs(randn, (2, 6, 4, 5), torch.float32, channels_last=True)
    dy = randn(2, 6, 4, 5)
    x3 = x.flatten(2)
    y, mean, rstd = tgn.group_norm_silu_forward(x3, weight, bias, 3, 1e-5)
    dx, dweight, dbias = tgn.group_norm_silu_backward(dy.flatten(2), x3, weight, bias, mean, rstd, 3)
    assert same_layout(y, x3) and same_layout(dx, x3)
    expected = group_norm_silu_backward_reference(dy.flatten(2), x3, weight, bias, mean, rstd, 3)
    for actual, wanted in zip((dx, dweight, dbias), expected):
        assert_close(actual, wanted)


def test_float64_uses_float64_math(tgn, randn):
    """float64 runs the reference functions (float64 statistics): gradcheck passes through the Triton backend."""
    x, _, weight, bias = make_inputs(randn, (2, 4, 3), torch.float64)
    y, mean, rstd = tgn.group_norm_silu_forward(x, weight, bias, 2, 1e-5)
    assert mean.dtype == torch.float64 and rstd.dtype == torch.float64
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: diffkern.group_norm_silu(x_, 2, w_, b_, backend="triton"), inputs)
    assert backends.last_backend(OP) == "triton"


# ----------------------------------------------------------------------------------------------------------
# A random sweep, the module, the planner.
# ----------------------------------------------------------------------------------------------------------


def draw_case(gen):
    """A random problem and forced plan decisions: rank 3-5, odd sizes, any layout, dtype, affine and regime."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    def between(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    rank = pick([3, 4, 5])
    num_groups, cpg = between(1, 3), between(1, 5)
    spatial = [between(1, 7 if rank < 5 else 4) for _ in range(rank - 2)]
    shape = (between(1, 2), num_groups * cpg, *spatial)
    options = dict(channels_last=rank > 3 and pick([False, True]), dtype=pick(DTYPES),
                   affine=(pick([False, True]), pick([False, True])), eps=pick([1e-6, 1e-5, 1e-3, 0.1]))
    options["param_dtype"] = pick([options["dtype"], torch.float32])
    regime = pick(["auto", "looped", "split"])
    forced = {}
    if regime != "auto":
        # Tiles of 1/6 to 1/3 of a group: a few tiles per group, which keeps the interpreter quick.
        group_elems = cpg * math.prod(spatial)
        forced = dict(regime=regime, loop_tile_elems=max(2, 1 << max(0, (group_elems // 3).bit_length() - 1)),
                      chunks=between(2, 5), offsets_64=pick([False, True]))
    return shape, num_groups, options, forced


@pytest.mark.parametrize("draw", range(6))
def test_random_sweep(tgn, randn, gen, draw):
    shape, num_groups, options, forced = draw_case(gen)
    eps = options.pop("eps")
    x, dy, weight, bias = make_inputs(randn, shape, options.pop("dtype"), **options)
    plans = plans_for(tgn, x, num_groups, **forced) if forced else None  # nothing forced: the op's own plans
    check_op(tgn, x, dy, num_groups, weight, bias, eps, plans=plans)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_module_matches_groupnorm_then_silu(tgn, randn, channels_last):
    norm = nn.GroupNorm(4, 12, device=DEVICE)
    with torch.no_grad():
        norm.weight.copy_(randn(12, scale=0.5, shift=1.0))
        norm.bias.copy_(randn(12, scale=0.5))
    expected_module = nn.Sequential(norm, nn.SiLU())
    fused = diffkern.GroupNormSiLU(4, 12, device=DEVICE, backend="triton")
    fused.load_state_dict(norm.state_dict())
    x = in_layout(randn(2, 12, 5, 6), channels_last)
    dy = in_layout(randn(2, 12, 5, 6), channels_last)

    outputs = []
    for module, params in ((fused, (fused.weight, fused.bias)), (expected_module, (norm.weight, norm.bias))):
        xi = x.clone().requires_grad_()
        y = module(xi)
        if module is fused:
            assert backends.last_backend(OP) == "triton"
        y.backward(dy)
        outputs.append((y.detach(), xi.grad) + tuple(param.grad for param in params))
    assert same_layout(outputs[0][0], x)
    for actual, wanted in zip(*outputs):
        assert_close(actual, wanted)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_plan_for_stable_diffusion_shapes(tgn, backward):
    """The heuristic on an H100 (132 SMs): few large groups split, small groups read once, many large groups
    loop."""
    tuning = tgn.BACKWARD if backward else tgn.FORWARD

    def regime(n, c, s, channels_last=False):
        return tgn.make_plan((n, c, s), 32, channels_last, 132, tuning).regime

    assert regime(1, 320, 64 * 64) == "split"
    assert regime(2, 320, 64 * 64, channels_last=True) == "split"
    assert regime(2, 640, 32 * 32) == "split"
    assert regime(16, 320, 64 * 64) == "looped"
    assert regime(2, 320, 8 * 8) == "single"
    assert regime(2, 1280, 16 * 16) == ("split" if backward else "single")


@pytest.mark.parametrize("draw", range(4))
def test_plan_tiles_and_chunks_cover_each_group_once(tgn, gen, draw):
    """Random shapes, SM counts and chunk requests: tiles cover the group with tails only in the last tile,
    and chunks partition the tiles with none empty."""
    for _ in range(50):
        values = torch.randint(1, 4097, (6,), generator=gen).tolist()
        channels_last = bool(values[5] % 2)
        cpg, spatial, num_groups = values[0] % 64 + 1, values[1], values[2] % 8 + 1
        batch, sm_count = values[3] % 4 + 1, values[4] % 200 + 1
        chunks = None if values[5] % 3 == 0 else values[5] % 40 + 1
        regime = [None, "looped", "split", "single"][values[0] % 4]
        for tuning in (tgn.FORWARD, tgn.BACKWARD):
            plan = tgn.make_plan((batch, cpg * num_groups, spatial), num_groups, channels_last, sm_count, tuning,
                                 regime=regime, chunks=chunks)
            if regime is None and plan.regime == "single":
                assert plan.block_s * plan.block_c <= tuning.single_read_elems
            assert (plan.c_tiles - 1) * plan.block_c < cpg <= plan.c_tiles * plan.block_c
            assert (plan.s_tiles - 1) * plan.block_s < spatial <= plan.s_tiles * plan.block_s
            assert (plan.c_chunks - 1) * plan.c_tiles_per_chunk < plan.c_tiles <= plan.c_chunks * plan.c_tiles_per_chunk
            assert (plan.s_chunks - 1) * plan.s_tiles_per_chunk < plan.s_tiles <= plan.s_chunks * plan.s_tiles_per_chunk
            assert plan.regime == "split" or plan.chunks == 1


def test_plan_must_be_for_the_call(tgn, randn):
    """A plan made for another shape, group count or layout is refused, not run."""
    x = randn(2, 8, 15)
    plan = tgn.plan_for(x, 4, tgn.FORWARD)
    channels_last = x.transpose(1, 2).contiguous().transpose(1, 2)
    for args in ((randn(2, 8, 16), 4), (x, 2), (channels_last, 4)):
        with pytest.raises(ValueError, match="the plan is for"):
            tgn.group_norm_silu_forward(args[0], None, None, args[1], 1e-5, plan=plan)
    with pytest.raises(ValueError, match="regime must be one of"):
        tgn.plan_for(x, 4, tgn.FORWARD, regime="fused")


# ----------------------------------------------------------------------------------------------------------
# Triton versions.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,block_r", [(37, 8), (5, 16), (16, 16)], ids=str)
def test_row_sum_loops_over_a_runtime_bound(tgn, gen, rows, block_r):
    """The dweight/dbias row sum, alone: ``for row0 in range(0, R, BLOCK_R)`` with R a kernel argument, the
    loop form of every looped and split kernel. Under Triton 3.6's interpreter with NumPy >= 2.4 that loop
    raised ``TypeError('only 0-dimensional arrays can be converted to Python scalars')`` (see
    ``diffkern/triton/group_norm_silu/_interpreter.py``). Small integers sum exactly in fp32 in any order, so the
    result must be exact."""
    planes, channels, block_c = 2, 19, 16
    part = torch.randint(-1000, 1001, (planes, rows, channels), generator=gen).to(device=DEVICE,
                                                                                  dtype=torch.float32)
    dw = torch.full((channels,), float("nan"), device=DEVICE)
    db = torch.full((channels,), float("nan"), device=DEVICE)
    kernels = importlib.import_module("diffkern.triton.group_norm_silu._backward")
    kernels.sum_partial_rows_kernel[(triton_cdiv(channels, block_c), planes)](
        part, dw, db, rows, channels, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_R=block_r, BLOCK_C=block_c)
    expected = part.double().sum(dim=1).float()
    assert torch.equal(dw, expected[0]) and torch.equal(db, expected[1])


def test_interpreter_fix_only_on_triton_3_6(tgn):
    """The interpreter fix is installed on Triton 3.6 and nowhere else: later Tritons are left untouched."""
    import triton
    from triton.runtime import interpreter

    installed = getattr(interpreter._patch_lang_tensor, "diffkern_index_fix", False)
    assert installed == (tuple(int(v) for v in triton.__version__.split(".")[:2]) == (3, 6))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------
# GPU only.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with ~40 GB free: 2^32 elements per tensor")
def test_tensors_past_2_to_the_31_elements(tgn, gen):
    """Two samples of 2^31 + 96 elements each: batch and in-sample offsets both pass 2^31. Checks the first and
    last group against the reference run on those groups alone."""
    free, _ = torch.cuda.mem_get_info(DEVICE)
    if free < 40 * 2**30:
        pytest.skip(f"needs ~40 GB of free GPU memory, {free / 2**30:.0f} GB free")
    num_groups, channels, spatial = 32, 32, 2**26 + 3
    x = torch.empty((2, channels, spatial), device=DEVICE, dtype=torch.float16)
    device_gen = torch.Generator(DEVICE).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    x.normal_(generator=device_gen)
    dy = torch.empty_like(x).normal_(generator=device_gen)
    assert all(plan.offsets_64 for plan in plans_for(tgn, x, num_groups))
    y, mean, rstd = tgn.group_norm_silu_forward(x, None, None, num_groups, 1e-5)
    dx, _, _ = tgn.group_norm_silu_backward(dy, x, None, None, mean, rstd, num_groups)
    for n, g in ((0, 0), (1, num_groups - 1)):
        cols = slice(g, g + 1)
        xs, dys = x[n:n + 1, cols], dy[n:n + 1, cols]
        ys, means, rstds = group_norm_silu_forward_reference(xs, None, None, 1, 1e-5)
        assert_close(mean[n, g], means[0, 0])
        assert_close(rstd[n, g], rstds[0, 0])
        assert_close(y[n:n + 1, cols], ys)
        dxs, _, _ = group_norm_silu_backward_reference(dys, xs, None, None, mean[n:n + 1, g:g + 1],
                                                            rstd[n:n + 1, g:g + 1], 1)
        assert_close(dx[n:n + 1, cols], dxs)
