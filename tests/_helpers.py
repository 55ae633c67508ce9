"""Helpers shared by the backend test files (imported as ``_helpers``: pytest puts ``tests/`` on ``sys.path``,
as it does for ``conftest``).

``run_both`` compares a fast backend with the reference on the same inputs; ``same_layout``, ``in_layout`` and
``lay_out`` handle memory layouts; ``ddpm_model_output`` builds DDPM model outputs with a predicted variance;
``group_norm_silu_param_grad_sums`` gives float64 dweight/dbias of GroupNorm+SiLU with the size of their
terms, for ``diffkern.testing.assert_close_sum``; ``check_large_mean_forward`` checks statistics that must not
cancel; ``check_first_and_last_groups`` checks a GroupNorm too large to run the reference on whole.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

from diffkern import backends
from diffkern.ops.group_norm_silu import group_norm_silu_backward_reference, group_norm_silu_forward_reference
from diffkern.testing import assert_close, assert_close_sum


def load_module(path: Path, name: str) -> ModuleType:
    """The Python file ``path`` (a script of scripts/, the emulation's build.py) imported as module ``name``,
    registered in ``sys.modules`` (its dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and strides, ignoring the strides of size-1 dimensions (they address nothing)."""
    return a.shape == b.shape and all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


def in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` contiguous, or channels-last (4-D) / channels-last-3d (5-D)."""
    if not channels_last:
        return t.contiguous()
    return t.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[t.ndim])


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous view whose storage starts one element past an allocation (so no sample
    starts on a 16-byte boundary): the kernels' scalar head/tail paths."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


LAYOUTS = ("contiguous", "channels_last", "misaligned")


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in one of ``LAYOUTS`` (channels_last: 4-D and 5-D tensors; others stay contiguous)."""
    if layout == "channels_last" and t.ndim in (4, 5):
        return in_layout(t, channels_last=True)
    if layout == "misaligned":
        return misaligned(t)
    return t.contiguous()


def check_host_timesteps_match_tensors(implementation, model_output, sample, noise, table, t: int, prev: int,
                                      device, **options):
    """A step backend entry given python-int timesteps (kernel arguments) and the same values as int64 ``[1]``
    tensors on ``device``: bitwise the same outputs. Returns the tensor form's outputs."""
    by_int = implementation(model_output, sample, noise, table, t, prev, **options)
    by_tensor = implementation(model_output, sample, noise, table, torch.tensor([t], device=device),
                               torch.tensor([prev], device=device), **options)
    for ours, expected in zip(by_int, by_tensor):
        assert torch.equal(ours, expected)
    return by_tensor


def step_tensors(shape, dtype, options, randn, layout: str = "contiguous"):
    """(model_output, sample, options) for a step op: the model output ``[B or 2B, ...]`` (2B when
    ``options["guidance_scale"]`` is set), the sample (scale 1.5), both in ``layout``; ``options`` copied, with
    ``noise=True`` replaced by a noise tensor like the sample. ``randn(*shape, dtype=..., scale=...)`` draws."""
    options = dict(options)
    batch = shape[0]
    guided = options.get("guidance_scale") is not None
    model_output = lay_out(randn(2 * batch if guided else batch, *shape[1:], dtype=dtype), layout)
    sample = lay_out(randn(*shape, dtype=dtype, scale=1.5), layout)
    if options.pop("noise", False):
        options["noise"] = lay_out(randn(*shape, dtype=dtype), layout)
    return model_output, sample, options


def abar64(table: torch.Tensor, t: int, final: float = 1.0) -> float:
    """abar at ``t`` as a Python float; ``final`` for t < 0 ("past the last step")."""
    return float(table[t]) if t >= 0 else final


def run_both(op, backend: str, *args, **kwargs):
    """``op(*args, **kwargs)`` on ``backend`` and on the reference: asserts which backend ran each time, that the
    outputs agree in number, dtype, shape and layout, and compares them through the tolerance table. Returns
    ``backend``'s result."""
    name = op.__name__
    fast = op(*args, backend=backend, **kwargs)
    assert backends.last_backend(name) == backend
    expected = op(*args, backend="reference", **kwargs)
    assert backends.last_backend(name) == "reference"
    fast_outputs = (fast,) if isinstance(fast, torch.Tensor) else tuple(fast)
    expected_outputs = (expected,) if isinstance(expected, torch.Tensor) else tuple(expected)
    assert len(fast_outputs) == len(expected_outputs)
    for index, (actual, wanted) in enumerate(zip(fast_outputs, expected_outputs)):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, (index, actual.shape, wanted.shape)
        assert same_layout(actual, wanted), f"{name} output {index}: layout {actual.stride()} != {wanted.stride()}"
        assert_close(actual, wanted, msg=f"{name} output {index}")
    return fast


def ddpm_model_output(sample, shape, variance_type, dtype, guided):
    """``[B or 2B, C or 2C, ...]`` model output for ``ddpm_step``: the prediction, then for ``learned`` positive
    variances and for ``learned_range`` interpolation fractions in (-1, 1). ``sample(*shape, dtype=...)`` draws
    normal values."""
    batch = shape[0] * (2 if guided else 1)
    prediction = sample(batch, *shape[1:], dtype=dtype)
    if variance_type not in ("learned", "learned_range"):
        return prediction
    raw = sample(batch, *shape[1:])
    variance = raw.abs() * 0.01 + 1e-4 if variance_type == "learned" else torch.tanh(raw)
    return torch.cat([prediction, variance.to(dtype)], dim=1)


def group_norm_silu_param_grad_sums(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                    bias: Optional[torch.Tensor], num_groups: int, eps: float
                                    ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]:
    """name -> (float64 sum, largest |term| per channel, number of terms) for "dweight" and "dbias" of
    ``silu(group_norm(x))`` (those whose parameter is given), from float64 math on the inputs' values.

    dweight[c] = sum over n, s of dz * xhat and dbias[c] = sum of dz, with dz = dy * silu'(z) and
    z = xhat * weight + bias: N * S terms per channel."""
    n, c = x.shape[:2]
    x64 = x.detach().double().reshape(n, num_groups, -1)
    mean = x64.mean(dim=2, keepdim=True)
    rstd = torch.rsqrt(x64.var(dim=2, unbiased=False, keepdim=True) + eps)
    xhat = ((x64 - mean) * rstd).reshape(n, c, -1)
    z = xhat
    if weight is not None:
        z = z * weight.detach().double()[None, :, None]
    if bias is not None:
        z = z + bias.detach().double()[None, :, None]
    sig = torch.sigmoid(z)
    dz = grad_out.detach().double().reshape(n, c, -1) * sig * (1 + z * (1 - sig))
    count = dz.shape[0] * dz.shape[2]
    result = {}
    for name, param, terms in (("dweight", weight, dz * xhat), ("dbias", bias, dz)):
        if param is not None:
            result[name] = (terms.sum(dim=(0, 2)), terms.abs().amax(dim=(0, 2)), count)
    return result


def check_param_grads(grads: Dict[str, Optional[torch.Tensor]], references: Dict[str, Optional[torch.Tensor]],
                      truth: Dict[str, Tuple[torch.Tensor, torch.Tensor, int]], msg: str = "") -> None:
    """dweight/dbias (``grads``, None where the parameter is absent) against another backend's (``references``)
    and the float64 truth of ``group_norm_silu_param_grad_sums``, with ``assert_close_sum``."""
    for name in ("dweight", "dbias"):
        actual, wanted = grads[name], references[name]
        assert (actual is None) == (wanted is None) == (name not in truth), name
        if actual is None:
            continue
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, name
        true, scale, count = truth[name]
        assert_close_sum(actual, wanted, terms=count, term_scale=scale, msg=f"{msg}{name} against the reference")
        assert_close_sum(actual, true, terms=count, term_scale=scale, msg=f"{msg}{name} against float64 math")


def check_large_mean_forward(x3: torch.Tensor, num_groups: int, eps: float, y: torch.Tensor, mean: torch.Tensor,
                             rstd: torch.Tensor, weight: Optional[torch.Tensor] = None,
                             bias: Optional[torch.Tensor] = None) -> None:
    """GroupNorm+SiLU forward on input whose |mean| is ~1000 std (``x3`` ``[N, C, S]``).

    sum(x^2)/M - mean^2 would lose the variance to cancellation in fp32 (about 6% error in rstd), so the
    statistics are compared with the float64 statistics of the same input, and y with the float64 math at the
    kernel's own statistics (against float64 statistics y would differ by the unavoidable rounding of a mean of
    ~1000, about 3e-5 of the std), all within the table's tolerance for their dtype."""
    n, c, s = x3.shape
    grouped = x3.double().reshape(n, num_groups, -1)
    assert_close(mean, grouped.mean(dim=2), msg="mean")
    assert_close(rstd, torch.rsqrt(grouped.var(dim=2, unbiased=False) + eps), msg="rstd")
    xhat = ((grouped - mean.double()[..., None]) * rstd.double()[..., None]).reshape(n, c, s)
    if weight is not None:
        xhat = xhat * weight.double()[None, :, None]
    if bias is not None:
        xhat = xhat + bias.double()[None, :, None]
    assert_close(y, torch.nn.functional.silu(xhat), msg="y")


def check_first_and_last_groups(x3: torch.Tensor, dy3: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor, dx: torch.Tensor, num_groups: int, eps: float) -> None:
    """GroupNorm+SiLU without affine parameters on ``(N, C, S)`` views with one channel per group (C = G), too
    large for the reference on the whole tensor: the first group of the first sample and the last group of the
    last sample (statistics, y, and dx at the kernel's statistics) against the reference run on each alone."""
    assert x3.shape[1] == num_groups, "one channel per group"
    last = x3.shape[0] - 1
    for n, g in ((0, 0), (last, num_groups - 1)):
        rows, cols = slice(n, n + 1), slice(g, g + 1)
        xs, dys = x3[rows, cols].contiguous(), dy3[rows, cols].contiguous()
        ys, means, rstds = group_norm_silu_forward_reference(xs, None, None, 1, eps)
        assert_close(mean[n, g], means[0, 0], msg=f"mean of sample {n}, group {g}")
        assert_close(rstd[n, g], rstds[0, 0], msg=f"rstd of sample {n}, group {g}")
        assert_close(y[rows, cols], ys, msg=f"y of sample {n}, group {g}")
        dxs, _, _ = group_norm_silu_backward_reference(dys, xs, None, None, mean[rows, cols], rstd[rows, cols], 1)
        assert_close(dx[rows, cols], dxs, msg=f"dx of sample {n}, group {g}")
