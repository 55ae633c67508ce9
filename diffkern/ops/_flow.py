"""What the flow-matching ops share: sigma arguments (validation and preparation) and the autograd formula of an
op defined by its reference.

Sigmas. A flow-matching op takes the noise level sigma in [0, 1] (x_sigma = (1 - sigma) x_0 + sigma noise) as a
python float, a 0-d tensor, or one value per sample (``[1]`` or ``[B]``), of any floating dtype, on the CPU or on the
samples' device. Values on the host (python numbers, CPU tensors outside tracing) are checked: finite and in [0, 1].
A device tensor is never read on the host (that would sync): a bad value there gives a bad sample, as in diffusers.

The backends take sigmas as contiguous ``[1 or B]`` tensors on the samples' device, float32 (float64 for float64
samples): a python float becomes a one-element tensor with ``torch.full`` (a fill kernel, no host-to-device copy),
and a float32 tensor already there (what a diffusers scheduler's ``sigmas`` on the device yields, indexed) passes
through without a copy.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Sequence, Union

import torch

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


def prepare_sigma(sigma: SigmaLike, sample: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[1 or B]`` tensor of ``compute_dtype(sample)`` on ``sample``'s device, without a host sync
    (module docstring)."""
    dtype, device = compute_dtype(sample), sample.device
    if isinstance(sigma, float):
        return torch.full((1,), sigma, dtype=dtype, device=device)
    if sigma.device.type == "cpu" and sigma.numel() == 1 and device.type != "cpu" \
            and not torch.compiler.is_compiling():
        # A CPU scalar read on the host costs nothing; a fill avoids a pageable host-to-device copy.
        return torch.full((1,), float(sigma.reshape(())), dtype=dtype, device=device)
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
