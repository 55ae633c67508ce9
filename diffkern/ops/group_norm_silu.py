"""GroupNorm followed by SiLU, forward and backward.

For x of shape ``(N, C, *)`` split into G groups of C/G channels, per (n, g) over the group's C/G * S values:

    mean = E[x],  rstd = 1 / sqrt(Var[x] + eps)      (biased variance, fp32)
    z    = (x - mean) * rstd * weight[c] + bias[c]
    y    = silu(z) = z * sigmoid(z)

Backward, with s = sigmoid(z), xhat = (x - mean) * rstd and M the group size:

    dz       = dy * s * (1 + z (1 - s))
    dbias    = sum_{n, spatial} dz            dweight = sum_{n, spatial} dz * xhat
    dxhat    = dz * weight
    dx       = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))

Backend contract: ``x`` is ``(N, C, *)`` (S = the product of the spatial sizes), either C-contiguous (NCHW)
or channels-last (``channels_last``/``channels_last_3d``, or a 3-D view with strides ``(C*S, 1, C)``); outputs
have ``x``'s shape and strides (``as_3d`` gives the ``(N, C, S)`` view the kernels address; the public op passes
its input as it is, so that an eager call makes no view). Statistics ``mean``/``rstd`` are ``[N, G]`` in the compute
dtype: float32, or float64 for float64 input (so that ``gradcheck`` sees float64 math); ``weight``/``bias`` are
``[C]`` (any float dtype) or None.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops._declaration import CudaOp, OpDeclaration


def _forward_cuda_fake(x, weight, bias, num_groups, eps, split=0):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _backward_cuda_fake(grad_out, x, weight, bias, mean, rstd, num_groups, split=0):
    channels = x.shape[1]
    dweight = x.new_empty((channels if weight is not None else 0,), dtype=torch.float32)
    dbias = x.new_empty((channels if bias is not None else 0,), dtype=torch.float32)
    return torch.empty_like(x), dweight, dbias


DECLARATION = OpDeclaration(
    name="group_norm_silu",
    implementations={
        "reference": {
            "group_norm_silu_forward": "diffkern.ops.group_norm_silu:group_norm_silu_forward_reference",
            "group_norm_silu_backward": "diffkern.ops.group_norm_silu:group_norm_silu_backward_reference",
        },
        "triton": {
            "group_norm_silu_forward": "diffkern.triton.group_norm_silu:group_norm_silu_forward",
            "group_norm_silu_backward": "diffkern.triton.group_norm_silu:group_norm_silu_backward",
        },
        "cuda": {
            "group_norm_silu_forward": "diffkern._cuda_ops:group_norm_silu_forward",
            "group_norm_silu_backward": "diffkern._cuda_ops:group_norm_silu_backward",
        },
    },
    # split: the GroupNorm regime: 0 automatic, -1 fused (one block per group, NCHW, when the group fits in shared
    # memory), k >= 1 each group (NCHW) or sample (channels-last) split into k slices. For tests and tuning; the
    # cuda backend passes 0. The backward returns empty dweight/dbias when weight/bias are None.
    cuda_ops=(
        CudaOp("group_norm_silu_fwd_cuda",
               "(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, int split=0) "
               "-> (Tensor, Tensor, Tensor)", _forward_cuda_fake),
        CudaOp("group_norm_silu_bwd_cuda",
               "(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int num_groups, "
               "int split=0) -> (Tensor, Tensor, Tensor)", _backward_cuda_fake),
    ),
)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 input, float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _normalized(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int) -> torch.Tensor:
    xf = x.to(mean.dtype).reshape(x.shape[0], num_groups, -1)
    return ((xf - mean[..., None]) * rstd[..., None]).reshape(x.shape)


def _per_channel(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[C]`` parameter in ``like``'s dtype, shaped to broadcast over ``(N, C, *)``."""
    return p.to(like.dtype).view((1, -1) + (1,) * (like.dim() - 2))


def _affine(xhat: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    z = xhat
    if weight is not None:
        z = z * _per_channel(weight, xhat)
    if bias is not None:
        z = z + _per_channel(bias, xhat)
    return z


# The fused form ATen applies, z = x * (rstd w) + (b - mean rstd w), cancels: its rounding error grows with
# |mean| * rstd (a group of one element: 1/sqrt(eps) = 316). Up to this ratio the error stays below 2e-6 |w| in
# fp32, under the table's fp32 tolerance; past it the reference takes the exact form (x - mean) * rstd.
_FUSED_FORM_MAX_MEAN_RSTD = 16.0


def group_norm_silu_forward_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                      num_groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, mean, rstd)``: y like ``x`` (``(N, C, *)``), statistics ``[N, G]`` in the compute dtype.

    On CPU tensors computed in fp32, ATen's GroupNorm (per-group moments merged in a cascade, robust when
    |mean| >> std; the affine normalisation in x's layout) and SiLU in place: the plain PyTorch formula's cost,
    half precision rounded once at the end. When a group's |mean| * rstd makes ATen's fused affine form inexact
    (``_FUSED_FORM_MAX_MEAN_RSTD``; the check reads the CPU statistics), and for float64 or device tensors (no
    host read), the exact two-pass form."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    dtype = compute_dtype(x)
    if x.is_cpu and dtype == torch.float32 and (x.is_contiguous() or _is_channels_last(x)):
        # (Each skipped no-op .to() or .view() is a microsecond at latent sizes.)
        xc = x if x.dtype == dtype else x.to(dtype)
        if not xc.is_contiguous():
            # Channels-last (the contract's other layout): ATen takes the memory of an (N, C, S, 1) channels_last
            # tensor with its canonical strides. (It rejects some channels-last tensors as they come: a batch of
            # one whose batch stride is not C*S, as a convolution may return, fails its memory-format check.)
            xc = xc.as_strided((n, c, s, 1), (c * s, 1, c, c))
        if weight is not None and weight.dtype != dtype:
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        z, mean, rstd = torch.native_group_norm(xc, weight, bias, n, c, s, num_groups, eps)
        ratio = mean * rstd
        if float(ratio.abs_().max()) <= _FUSED_FORM_MAX_MEAN_RSTD:
            y = F.silu(z, inplace=True)
            if y.shape != x.shape:  # the (N, C, S, 1) view of a channels-last x
                y = y.view_as(x)
            return (y if y.dtype == x.dtype else y.to(x.dtype)), mean, rstd
    grouped = x.to(dtype).reshape(n, num_groups, -1)
    # Exact two-pass statistics: robust when |mean| >> std, and (unlike torch.var_mean on CPU) fast for
    # the many small groups of an MLP.
    mean = grouped.mean(dim=2)
    centred = grouped - mean[..., None]
    rstd = torch.rsqrt((centred * centred).mean(dim=2) + eps)
    y = F.silu(_affine(_normalized(x, mean, rstd, num_groups), weight, bias))
    out = torch.empty_like(x)
    out.copy_(y)
    return out, mean, rstd


def group_norm_silu_backward_reference(
        grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
        mean: torch.Tensor, rstd: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns ``(dx, dweight, dbias)``: dx like ``x``; dweight/dbias ``[C]`` in the compute dtype when
    weight/bias are given, else None. ``grad_out`` has ``x``'s shape and strides."""
    xhat = _normalized(x, mean, rstd, num_groups)
    z = _affine(xhat, weight, bias)
    sig = torch.sigmoid(z)
    dz = grad_out.to(z.dtype) * sig * (1 + z * (1 - sig))
    reduced = [0] + list(range(2, x.dim()))   # every dimension but the channels'
    dweight = (dz * xhat).sum(dim=reduced) if weight is not None else None
    dbias = dz.sum(dim=reduced) if bias is not None else None
    dxhat = dz * _per_channel(weight, z) if weight is not None else dz
    grouped = (x.shape[0], num_groups, -1)
    dxhat_g, xhat_g = dxhat.reshape(grouped), xhat.reshape(grouped)
    dx_g = rstd[..., None] * (dxhat_g - dxhat_g.mean(dim=2, keepdim=True)
                              - xhat_g * (dxhat_g * xhat_g).mean(dim=2, keepdim=True))
    dx = torch.empty_like(x)
    dx.copy_(dx_g.reshape(x.shape))
    return dx, dweight, dbias


def _is_channels_last(x: torch.Tensor) -> bool:
    """channels_last (3d), or a 3-D ``(N, C, S)`` view with strides ``(C*S, 1, C)`` (size-1 dimensions' strides
    aside)."""
    if x.ndim == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.ndim == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    if x.ndim != 3:
        return False
    n, c, s = x.shape
    return (c == 1 or x.stride(1) == 1) and (s == 1 or x.stride(2) == c) and (n == 1 or x.stride(0) == c * s)


def in_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when NCHW or channels_last (3d), else a C-contiguous copy: the backend contract's layouts."""
    if x.is_contiguous() or (x.ndim > 3 and _is_channels_last(x)):
        return x
    return x.contiguous()


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """The ``(N, C, S)`` view of an ``(N, C, *)`` tensor in one of the contract's layouts (no copy)."""
    return x if x.ndim == 3 else x.view(x.shape[0], x.shape[1], -1)


def _empty(device) -> torch.Tensor:
    return torch.empty(0, device=device, dtype=torch.float32)


@torch.library.custom_op("diffkern::group_norm_silu_fwd", mutates_args=())
def _group_norm_silu_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            num_groups: int, eps: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.implementation(backend, "group_norm_silu_forward")(in_kernel_layout(x), weight, bias, num_groups,
                                                                       eps)


@_group_norm_silu_fwd_op.register_fake
def _(x, weight, bias, num_groups, eps, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("diffkern::group_norm_silu_bwd", mutates_args=())
def _group_norm_silu_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                            backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_in = in_kernel_layout(x)
    # Autograd may hand a gradient in another layout; backends take it in x's (a no-op when it matches).
    grad_in = grad_out.contiguous(memory_format=_memory_format(x_in))
    dx, dweight, dbias = backends.implementation(backend, "group_norm_silu_backward")(
        grad_in, x_in, weight, bias, mean, rstd, num_groups)
    dweight = _empty(x.device) if dweight is None else dweight.to(weight.dtype)
    dbias = _empty(x.device) if dbias is None else dbias.to(bias.dtype)
    return dx, dweight, dbias


@_group_norm_silu_bwd_op.register_fake
def _(grad_out, x, weight, bias, mean, rstd, num_groups, backend):
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty((0,), dtype=torch.float32)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(x), dweight, dbias


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.backend = num_groups, backend


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _group_norm_silu_bwd_op(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.backend)
    return dx, (dweight if weight is not None else None), (dbias if bias is not None else None), None, None, None


_group_norm_silu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, backend: str = "auto") -> torch.Tensor:
    """silu(group_norm(x, num_groups, weight, bias, eps)) in one fused op (math in the module docstring).

    Args:
        x: ``(N, C, *)``, float16/bfloat16/float32/float64, NCHW or channels_last (the output keeps it).
        num_groups: G, dividing C.
        weight, bias: ``[C]`` or None, any float dtype, on ``x``'s device.
        eps: added to the variance.
        backend: ``auto``, ``reference``, ``triton`` or ``cuda``.

    Statistics and arithmetic are fp32 for every input dtype. Differentiable in x, weight and bias.
    """
    key = plan = None
    eager = not torch.compiler.is_compiling()
    if eager:
        key, plan = C.cached_plan(_PLANS, lambda: (
            C.tensor_key(x), C.optional_tensor_key(weight), C.optional_tensor_key(bias),
            C.options_key((num_groups, eps, backend)), backends.environment_choice(backend)))
    if plan is None:
        plan = C.store_plan(_PLANS, key, _group_norm_silu_plan(x, num_groups, weight, bias, eps, backend))
    backends.record_choice("group_norm_silu", plan.backend)
    if eager and not C.records_autograd(x, weight, bias):
        y, _, _ = plan.launch(in_kernel_layout(x) if plan.relayout else x, weight, bias, num_groups, plan.eps)
        return y
    y, _, _ = _group_norm_silu_fwd_op(x, weight, bias, num_groups, plan.eps, plan.backend)
    return y


class _GroupNormSiLUPlan(NamedTuple):
    """A validated ``group_norm_silu`` call signature (see ``_common``'s "eager hot path")."""
    backend: str
    launch: Optional[Callable]  # the backend's forward for eager calls (``_common.bound_launch``); None while tracing
    eps: float
    relayout: bool  # x is in neither of the contract's layouts: a contiguous copy first


_PLANS = C.plan_cache()


def _group_norm_silu_plan(x, num_groups, weight, bias, eps, backend) -> _GroupNormSiLUPlan:
    """Every check of ``group_norm_silu``."""
    C.check_tensor("x", x, ndim_min=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise TypeError(f"num_groups must be a positive int, got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels C={channels} of x")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            C.check_tensor(name, param)
            if tuple(param.shape) != (channels,):
                raise ValueError(f"{name} must have shape ({channels},) to match x's channels, got {tuple(param.shape)}")
            if param.device != x.device:
                raise ValueError(f"{name} must be on x's device {x.device}, got {param.device}")
    C.check_float("eps", eps, low=0.0)
    chosen = backends.resolve("group_norm_silu", backend, x.device)
    eps = float(eps)
    x_in = in_kernel_layout(x)
    launch = backends.eager_launch(chosen, "group_norm_silu_forward", (x_in, weight, bias, num_groups, eps), {})
    return _GroupNormSiLUPlan(chosen, launch, eps, x_in is not x)


class GroupNormSiLU(nn.GroupNorm):
    """``nn.GroupNorm`` followed by ``nn.SiLU``, fused. Same parameters and state_dict as ``nn.GroupNorm``,
    so weights load either way: ``GroupNormSiLU(32, 320).load_state_dict(group_norm.state_dict())``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        _check_module_args(num_groups, num_channels, backend)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, *, backend: str = "auto") -> "GroupNormSiLU":
        """A fused module sharing ``norm``'s parameters (no copy)."""
        _check_module_args(norm.num_groups, norm.num_channels, backend)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_groups, fused.num_channels, fused.eps, fused.affine = \
            norm.num_groups, norm.num_channels, norm.eps, norm.affine
        fused.weight, fused.bias = norm.weight, norm.bias
        fused.backend = backend
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


def _check_module_args(num_groups, num_channels, backend) -> None:
    """The constructor's checks, so that a bad module fails where it is built, not at its first forward."""
    for name, value in (("num_groups", num_groups), ("num_channels", num_channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value}")
    if num_channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
    backends.check_backend_name(backend)
