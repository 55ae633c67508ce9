"""What the flow-matching ops share: sigma arguments (validation and preparation) and the autograd formula of an
op defined by its reference.

Sigmas. A flow-matching op takes the noise level sigma in [0, 1] (x_sigma = (1 - sigma) x_0 + sigma noise) as a
python float, a 0-d tensor, or one value per sample (``[1]`` or ``[B]``), of any floating dtype, on the CPU or on the
samples' device. Values on the host (python numbers, CPU tensors outside tracing) are checked: finite and in [0, 1].
A device tensor is never read on the host (that would sync): a bad value there gives a bad sample, as in diffusers.

The backends take each sigma in one of two forms (the backend contract): a python float already rounded to the
compute dtype (float32, float64 for float64 samples), shared by the batch, which the kernels take as a scalar
argument; or a contiguous ``[1 or B]`` tensor of the compute dtype on the samples' device. An eager call passes a
host value (a python float, or a one-element CPU tensor, read on the host for nothing: ``host_sigma``) as the
float (``kernel_sigma``), so that a step launches no fill kernel and copies nothing to the device. The torch custom
op, which ``torch.compile`` and autograd see, takes tensors (``prepare_sigma``: a python float becomes a
one-element tensor with ``torch.full``, a fill kernel and no host-to-device copy; a float32 tensor already on the
device, what a diffusers scheduler's ``sigmas`` there yields indexed, passes through without a copy).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Callable, Sequence, Union

import torch

from diffkern.ops import _common as C

SigmaLike = Union[float, torch.Tensor]


def compute_dtype(sample: torch.Tensor) -> torch.dtype:
    """The dtype of a flow op's coefficients and arithmetic: float32, float64 for float64 samples."""
    return torch.float64 if sample.dtype == torch.float64 else torch.float32


def check_sigma(name: str, sigma, batch: int, device: torch.device) -> SigmaLike:
    """Validates a sigma argument (module docstring); returns python numbers as floats and tensors as they are."""
    if isinstance(sigma, bool):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got bool")
    if isinstance(sigma, numbers.Real) and not isinstance(sigma, torch.Tensor):
        value = float(sigma)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be finite and in [0, 1], got {value}")
        return value
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got {type(sigma).__name__}")
    if not sigma.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {sigma.dtype}")
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.numel() not in (1, batch)):
        raise ValueError(f"{name} must be 0-d or have shape [1] or [{batch}] (one per sample), "
                         f"got shape {tuple(sigma.shape)}")
    if sigma.device.type != "cpu" and sigma.device != device:
        raise ValueError(f"{name} must be on the CPU or on the samples' device {device}, got {sigma.device}")
    if sigma.device.type == "cpu" and not torch.compiler.is_compiling():
        values = sigma.detach().reshape(-1).double()
        bad = ~(torch.isfinite(values) & (values >= 0) & (values <= 1))
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite and in [0, 1], got {values.tolist()}")
    return sigma


def host_sigma(sigma):
    """A one-element floating CPU tensor (a plain one: not fake, functional or functorch-wrapped) as a python float,
    for eager calls; anything else unchanged."""
    if type(sigma) is torch.Tensor and sigma.is_cpu and sigma.numel() == 1 and sigma.ndim <= 1 \
            and sigma.is_floating_point() and not torch._C._functorch.is_functorch_wrapped_tensor(sigma):
        return float(sigma)
    return sigma


def sigma_key(sigma):
    """A sigma's part of a plan key (``_common``'s "eager hot path"). A python float is checked here (its value is
    not in the key, so that a sampling loop shares one plan) and keyed by its type; a device tensor by its metadata;
    a CPU tensor of several values is not cacheable (its values are checked on every call). A value that fails
    raises, and the caller runs the full checks, which give the usual error."""
    if type(sigma) is float:
        if not 0.0 <= sigma <= 1.0:  # (NaN fails both comparisons)
            raise C.Uncacheable
        return float
    if sigma.is_cpu:
        raise C.Uncacheable
    return (sigma.shape, sigma.stride(), sigma.dtype, sigma.device)


def kernel_sigma(sigma: SigmaLike, sample: torch.Tensor) -> SigmaLike:
    """What an eager call hands a backend: a python float rounded to ``compute_dtype(sample)`` (a kernel argument), a
    tensor as ``prepare_sigma`` makes it."""
    if type(sigma) is float:
        return sigma if sample.dtype == torch.float64 else C.round_float32(sigma)
    return prepare_sigma(sigma, sample)


def coefficient(sigma: SigmaLike, compute: torch.dtype, ndim: int):
    """A sigma of the backend contract as a reference's coefficient: a ``HostFloat`` of ``compute`` (its arithmetic
    rounds as 0-d tensors of that dtype would) for a python float, ``[1 or B, 1, ...]`` for a tensor."""
    if isinstance(sigma, float):
        return (C.HostFloat64 if compute == torch.float64 else C.HostFloat32).of(sigma)
    return per_sample(sigma.to(compute), ndim)


def operand(coef):
    """A coefficient as the tensor ops take it fastest: a ``HostFloat`` as a 0-d CPU tensor of its dtype, made once
    per value (a tensor times a 0-d tensor costs about a microsecond less than a tensor times a python number, which
    torch wraps into a tensor on every call; the product is the same: the value is exact in the dtype), a tensor
    unchanged."""
    return _scalar_tensor(float(coef), coef.dtype) if isinstance(coef, C.HostFloat) else coef


@functools.lru_cache(maxsize=4096)
def _scalar_tensor(value: float, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # (a normal tensor, whatever mode the first call ran in)
        return torch.tensor(value, dtype=dtype)


def prepare_sigma(sigma: SigmaLike, sample: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[1 or B]`` tensor of ``compute_dtype(sample)`` on ``sample``'s device, without a host sync
    (module docstring)."""
    dtype, device = compute_dtype(sample), sample.device
    if isinstance(sigma, float):
        return torch.full((1,), sigma, dtype=dtype, device=device)
    if sigma.device.type == "cpu" and device.type != "cpu" and not torch.compiler.is_compiling():
        return C.host_values_to_device("the sigma", sigma, dtype, device)
    return sigma.detach().reshape(-1).to(device=device, dtype=dtype).contiguous()


def per_sample(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[1 or B]`` -> ``[1 or B, 1, ...]``, to broadcast against ``ndim``-dimensional samples."""
    return coef.reshape(coef.shape[0], *([1] * (ndim - 1)))


def register_vjp_autograd(op, reference: Callable, tensor_inputs: int, differentiable: Sequence[int]) -> None:
    """Autograd for a custom op whose inputs are ``(*tensors, *options, backend)``, with the first ``tensor_inputs``
    inputs passed to ``reference`` positionally and the options in the order of its keyword-only parameters.

    The backward is the vector-Jacobian product of ``reference`` (``torch.func.vjp``) in the inputs listed in
    ``differentiable`` (indices among the tensors; a None input gets no gradient), whichever backend ran the
    forward: the formula that defines the forward is the one differentiated. It recomputes the op once in the
    backward pass, which for these elementwise ops costs what the forward costs."""
    option_names = [name for name, p in inspect.signature(reference).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensor_inputs])
        ctx.options = dict(zip(option_names, inputs[tensor_inputs:tensor_inputs + len(option_names)]))
        ctx.input_count = len(inputs)

    def backward(ctx, *grads):
        tensors = list(ctx.saved_tensors)
        wrt = [i for i in differentiable if tensors[i] is not None]

        def run(*values):
            args = list(tensors)
            for i, value in zip(wrt, values):
                args[i] = value
            return reference(*args, **ctx.options)

        _, vjp = torch.func.vjp(run, *(tensors[i] for i in wrt))
        cotangent = grads[0] if len(grads) == 1 else tuple(grads)
        computed = dict(zip(wrt, vjp(cotangent)))
        return tuple(computed.get(i) for i in range(tensor_inputs)) + (None,) * (ctx.input_count - tensor_inputs)

    op.register_autograd(backward, setup_context=setup_context)
