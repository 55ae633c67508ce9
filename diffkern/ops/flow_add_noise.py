"""flow_add_noise: the flow-matching forward process (diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise``).

    x_sigma = sigma * noise + (1 - sigma) * x_0

with sigma per sample (or shared), the training-side op of rectified-flow models. Coefficients and arithmetic are
fp32 (fp64 for fp64 input) whatever the sample dtype: diffusers casts sigma to the sample dtype first (in bf16,
sigma = 0.999 becomes 1.0 and the sample is dropped entirely). Sigma arguments: ``diffkern.ops._flow``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops import _flow as F
from diffkern.ops._declaration import CudaOp, OpDeclaration

DECLARATION = OpDeclaration.single_entry(
    "flow_add_noise", reference="diffkern.ops.flow_add_noise:flow_add_noise_reference",
    triton="diffkern.triton.flow_match:flow_add_noise", cuda="diffkern._cuda_ops:flow_add_noise",
    # sigma: a contiguous float32 [1 or B] tensor on the samples' device, or None and host_sigma (float32-exact) for
    # the whole batch (flow_match_step_cuda's convention).
    cuda_ops=(CudaOp("flow_add_noise_cuda",
                     "(Tensor original_samples, Tensor noise, Tensor? sigma, float host_sigma) -> Tensor",
                     lambda original_samples, *_: torch.empty_like(original_samples)),),
)


def flow_add_noise_reference(original_samples: torch.Tensor, noise: torch.Tensor,
                             sigma: F.SigmaLike) -> torch.Tensor:
    """Backend contract: samples ``[B, ...]`` laid out alike, ``sigma`` a python float of the compute dtype or a
    ``[1 or B]`` tensor in it (``diffkern.ops._flow``). Returns x_sigma in the samples' dtype and layout (diffusers'
    operation order)."""
    compute = F.compute_dtype(original_samples)
    s = F.coefficient(sigma, compute, original_samples.ndim)
    noisy = F.operand(s) * C.as_dtype(noise, compute) + F.operand(1.0 - s) * C.as_dtype(original_samples, compute)
    return C.as_dtype(noisy, original_samples.dtype)


@torch.library.custom_op("diffkern::flow_add_noise", mutates_args=())
def _flow_add_noise_op(original_samples: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       backend: str) -> torch.Tensor:
    return backends.implementation(backend, "flow_add_noise")(original_samples, noise, sigma)


@_flow_add_noise_op.register_fake
def _(original_samples, noise, sigma, backend):
    return torch.empty_like(original_samples)


F.register_vjp_autograd(_flow_add_noise_op, flow_add_noise_reference, tensor_inputs=3, differentiable=(0, 1))


def flow_add_noise(original_samples: torch.Tensor, noise: torch.Tensor, sigma: F.SigmaLike, *,
                   backend: str = "auto") -> torch.Tensor:
    """Noise clean samples to level ``sigma``: sigma * noise + (1 - sigma) * x_0.

    Args:
        original_samples: x_0, ``[B, ...]``, float16/bfloat16/float32/float64, any device and memory format.
        noise: same shape, dtype and device.
        sigma: a python float, a 0-d tensor or one per sample (``[1]``/``[B]``), any float dtype, on the CPU or the
            samples' device; host values must be finite and in [0, 1], device ones are not read.
        backend: ``auto``, ``reference``, ``triton`` or ``cuda``.

    Returns:
        x_sigma with ``original_samples``' shape, dtype and memory format.
    """
    key = plan = None
    eager = not torch.compiler.is_compiling()
    if eager:
        sigma = F.host_sigma(sigma)
        key, plan = C.cached_plan(_PLANS, lambda: (
            C.tensor_key(original_samples), C.tensor_key(noise), F.sigma_key(sigma), C.options_key((backend,)),
            backends.environment_choice(backend)))
    if plan is None:
        plan, sigma = _flow_add_noise_plan(original_samples, noise, sigma, backend)
        C.store_plan(_PLANS, key, plan)
    backends.record_choice("flow_add_noise", plan.backend)

    x0, eps = C.same_layout([original_samples, noise]) if plan.relayout else (original_samples, noise)
    if eager and not C.records_autograd(x0, eps):
        return plan.launch(x0, eps, F.kernel_sigma(sigma, x0))
    return _flow_add_noise_op(x0, eps, F.prepare_sigma(sigma, x0), plan.backend)


class _FlowAddNoisePlan(NamedTuple):
    """A validated ``flow_add_noise`` call signature (see ``_common``'s "eager hot path")."""
    backend: str
    launch: Optional[Callable]  # the eager call (``_common.bound_launch``); None while tracing
    relayout: bool  # the samples are not laid out alike: contiguous copies first


_PLANS = C.plan_cache()


def _flow_add_noise_plan(original_samples, noise, sigma, backend):
    """Every check of ``flow_add_noise``; returns (plan, sigma normalised)."""
    C.check_tensor("original_samples", original_samples)
    C.check_like("noise", noise, "original_samples", original_samples)
    device = original_samples.device
    sigma = F.check_sigma("sigma", sigma, original_samples.shape[0], device)
    chosen = backends.resolve("flow_add_noise", backend, device)
    # (A binder reads of sigma only its kind, host number or tensor, which kernel_sigma keeps.)
    launch = backends.eager_launch(chosen, "flow_add_noise", (original_samples, noise, sigma), {})
    return _FlowAddNoisePlan(chosen, launch, not C.laid_out_alike((original_samples, noise))), sigma
