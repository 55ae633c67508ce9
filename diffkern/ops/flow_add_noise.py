"""flow_add_noise: the flow-matching forward process (diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise``).

    x_sigma = sigma * noise + (1 - sigma) * x_0

with sigma per sample (or shared), the training-side op of rectified-flow models. Coefficients and arithmetic are
fp32 (fp64 for fp64 input) whatever the sample dtype: diffusers casts sigma to the sample dtype first (in bf16,
sigma = 0.999 becomes 1.0 and the sample is dropped entirely). Sigma arguments: ``diffkern.ops._flow``.
"""

from __future__ import annotations

import torch

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops import _flow as F
from diffkern.ops._declaration import CudaOp, OpDeclaration

DECLARATION = OpDeclaration.single_entry(
    "flow_add_noise", reference="diffkern.ops.flow_add_noise:flow_add_noise_reference",
    triton="diffkern.triton.flow_match:flow_add_noise", cuda="diffkern._cuda_ops:flow_add_noise",
    # sigma: contiguous float32 [1 or B] on the samples' device.
    cuda_ops=(CudaOp("flow_add_noise_cuda", "(Tensor original_samples, Tensor noise, Tensor sigma) -> Tensor",
                     lambda original_samples, *_: torch.empty_like(original_samples)),),
)


def flow_add_noise_reference(original_samples: torch.Tensor, noise: torch.Tensor,
                             sigma: torch.Tensor) -> torch.Tensor:
    """Backend contract: samples ``[B, ...]`` laid out alike, ``sigma`` ``[1 or B]`` in the compute dtype
    (``_flow.prepare_sigma``). Returns x_sigma in the samples' dtype and layout (diffusers' operation order)."""
    compute = F.compute_dtype(original_samples)
    s = F.per_sample(sigma.to(compute), original_samples.ndim)
    noisy = s * noise.to(compute) + (1.0 - s) * original_samples.to(compute)
    return noisy.to(original_samples.dtype)


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
    C.check_tensor("original_samples", original_samples)
    C.check_like("noise", noise, "original_samples", original_samples)
    device = original_samples.device
    sigma = F.check_sigma("sigma", sigma, original_samples.shape[0], device)
    chosen = backends.resolve("flow_add_noise", backend, device)
    x0, eps = C.same_layout([original_samples, noise])
    return _flow_add_noise_op(x0, eps, F.prepare_sigma(sigma, x0), chosen)
