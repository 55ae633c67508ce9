"""add_noise: the forward process q(x_t | x_0).

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * noise

with abar_t gathered per sample from the ``alphas_cumprod`` table. Coefficients and arithmetic are fp32 (fp64
for fp64 input) whatever the sample dtype: diffusers rounds abar to the sample dtype first, so in bf16 it adds
no noise at all at small t.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops._declaration import CudaOp, OpDeclaration

DECLARATION = OpDeclaration.single_entry(
    "add_noise", reference="diffkern.ops.add_noise:add_noise_reference", triton="diffkern.triton.add_noise:add_noise",
    cuda="diffkern._cuda_ops:add_noise",
    # timesteps: an int64 [1 or B] tensor, or None and host_timesteps for the whole batch (as DDIM's timesteps).
    cuda_ops=(CudaOp("add_noise_cuda",
                     "(Tensor original_samples, Tensor noise, Tensor alphas_cumprod, Tensor? timesteps, "
                     "int host_timesteps) -> Tensor",
                     lambda original_samples, noise, alphas_cumprod, timesteps, host_timesteps:
                     torch.empty_like(original_samples)),),
)


def add_noise_reference(original_samples: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
    """Backend contract (see ``_common``): samples ``[B, ...]`` laid out alike, table float32 ``[T]``,
    timesteps int64 ``[1 or B]``, all on one device. Returns x_t in the samples' dtype and layout."""
    compute = torch.promote_types(original_samples.dtype, torch.float32)
    sqrt_abar, sqrt_beta = C.host_coefficients(_coefficients, alphas_cumprod, (timesteps,), compute,
                                               original_samples.ndim)
    x0 = original_samples if original_samples.dtype == compute else original_samples.to(compute)
    eps = noise if noise.dtype == compute else noise.to(compute)
    noisy = sqrt_abar * x0 + sqrt_beta * eps
    return noisy if noisy.dtype == original_samples.dtype else noisy.to(original_samples.dtype)


def _coefficients(alphas_cumprod: torch.Tensor, timesteps, compute: torch.dtype, ndim: int):
    """(sqrt(abar_t), sqrt(1 - abar_t)): python floats for a host timestep and a CPU table, else tensors (see
    ``C.step_abar``)."""
    abar = C.step_abar(alphas_cumprod, timesteps, compute, ndim)
    sqrt_abar, sqrt_beta = C.sqrts(abar, 1 - abar)
    if isinstance(sqrt_abar, C.HostFloat):  # plain floats: torch parses a float subclass on a slower path
        return float(sqrt_abar), float(sqrt_beta)
    return sqrt_abar, sqrt_beta


@torch.library.custom_op("diffkern::add_noise", mutates_args=())
def _add_noise_op(original_samples: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                  timesteps: torch.Tensor, backend: str) -> torch.Tensor:
    return backends.implementation(backend, "add_noise")(original_samples, noise, alphas_cumprod, timesteps)


@_add_noise_op.register_fake
def _(original_samples, noise, alphas_cumprod, timesteps, backend):
    return torch.empty_like(original_samples)


def _add_noise_setup_context(ctx, inputs, output):
    _, _, alphas_cumprod, timesteps, _ = inputs
    ctx.save_for_backward(alphas_cumprod, timesteps)


def _add_noise_backward(ctx, grad):
    """d x_t / d x_0 = sqrt(abar_t), d x_t / d noise = sqrt(1 - abar_t), per sample, in the forward's precision."""
    alphas_cumprod, timesteps = ctx.saved_tensors
    compute = torch.promote_types(grad.dtype, torch.float32)
    abar = C.per_sample(C.gather_abar(alphas_cumprod, timesteps), grad.ndim).to(compute)
    grad_compute = grad.to(compute)
    grad_x0 = (abar ** 0.5 * grad_compute).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_noise = ((1 - abar) ** 0.5 * grad_compute).to(grad.dtype) if ctx.needs_input_grad[1] else None
    return grad_x0, grad_noise, None, None, None


_add_noise_op.register_autograd(_add_noise_backward, setup_context=_add_noise_setup_context)


def add_noise(original_samples: torch.Tensor, noise: torch.Tensor, timesteps: C.TimestepLike,
              alphas_cumprod: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Noise clean samples to timestep ``timesteps``: sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * noise.

    Args:
        original_samples: x_0, ``[B, ...]``, float16/bfloat16/float32/float64, any device.
        noise: same shape, dtype and device.
        timesteps: an int, a 0-d integer tensor, or ``[B]`` (one per sample), in ``[0, T)``.
        alphas_cumprod: the abar table ``[T]`` (any float dtype; on the CPU or the samples' device — any other
            than a float32 one on the samples' device is copied at its first call, once per table version).
        backend: ``auto``, ``reference``, ``triton`` or ``cuda``.

    Returns:
        x_t with ``original_samples``' shape, dtype and memory format.
    """
    key = plan = None
    eager = not torch.compiler.is_compiling()
    if eager:
        timesteps = C.host_scalar(timesteps)
        key, plan = C.cached_plan(_PLANS, lambda: (
            C.tensor_key(original_samples), C.tensor_key(noise), C.table_key(alphas_cumprod),
            C.timestep_key(timesteps), C.options_key((backend,)), backends.environment_choice(backend)))
    if plan is None:
        plan, timesteps = _add_noise_plan(original_samples, noise, timesteps, alphas_cumprod, backend)
        C.store_plan(_PLANS, key, plan)
    backends.record_choice("add_noise", plan.backend)

    x0, eps = C.same_layout([original_samples, noise]) if plan.relayout else (original_samples, noise)
    table = alphas_cumprod if plan.table_ready else C.prepare_table(alphas_cumprod, x0)
    if eager and not C.records_autograd(x0, eps):
        return plan.launch(x0, eps, table, C.kernel_timesteps(timesteps, x0))
    return _add_noise_op(x0, eps, table, C.prepare_timesteps(timesteps, x0.device), plan.backend)


class _AddNoisePlan(NamedTuple):
    """A validated ``add_noise`` call signature (see ``_common``'s "eager hot path")."""
    backend: str
    launch: Optional[Callable]  # the eager call (``_common.bound_launch``); None while tracing
    relayout: bool  # the samples are not laid out alike: contiguous copies first
    table_ready: bool  # the table is what the backends take already (see ``_common.prepare_table``)


_PLANS = C.plan_cache()


def _add_noise_plan(original_samples, noise, timesteps, alphas_cumprod, backend):
    """Every check of ``add_noise``; returns (plan, timesteps normalised)."""
    C.check_tensor("original_samples", original_samples)
    C.check_like("noise", noise, "original_samples", original_samples)
    device = original_samples.device
    num_train = C.check_table(alphas_cumprod, device)
    timesteps = C.check_timesteps("timesteps", timesteps, original_samples.shape[0], num_train, device)
    chosen = backends.resolve("add_noise", backend, device)
    launch = backends.eager_launch(chosen, "add_noise", (original_samples, noise, alphas_cumprod, timesteps), {})
    plan = _AddNoisePlan(chosen, launch, not C.laid_out_alike((original_samples, noise)),
                         C.table_ready(alphas_cumprod, original_samples))
    return plan, timesteps
