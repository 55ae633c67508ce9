"""The flow-matching Euler step (rectified flow: SD3, FLUX, Wan, ...), diffusers'
``FlowMatchEulerDiscreteScheduler.step`` math.

The model predicts the velocity v = noise - x_0 of x_sigma = (1 - sigma) x_0 + sigma noise. Per sample, with
sigma and sigma_next (the next noise level of the schedule):

    v      = uncond + s (cond - uncond)                          with guidance_scale s (a 2B-sample model output)
    v      <- r (v std(cond) / std(v)) + (1 - r) v               with guidance_rescale r > 0 (per-sample std)
    x0     = x - sigma v                                          (pred_original_sample, both modes)
    x_prev = x + (sigma_next - sigma) v                           deterministic (the Euler step)
    x_prev = (1 - sigma_next) x0 + sigma_next z                   stochastic (re-noise the x0 estimate)

Coefficients and arithmetic are fp32 (fp64 for fp64 samples) whatever the sample dtype, in diffusers' operation
order, rounded once to the sample's dtype. The guidance rescale is diffusers' ``rescale_noise_cfg`` (the std-matching
correction of Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4, which the
SDXL and LTX pipelines apply before the scheduler step): unbiased standard deviations over every non-batch
dimension of each sample.

Passes over memory (fast backends): one kernel reading the model output (both halves with guidance), the sample
and, stochastic, the noise once each and writing prev_sample and pred_original_sample once each. With
guidance_rescale the per-sample standard deviations must be known before any element can be written: a first pass
reads the two halves of the model output once and writes per-block partial moments (count, mean, sum of squared
deviations, merged with Chan et al.'s formula), a tiny kernel merges them per sample into std(cond) / std(v), and
the step reads that factor: 2 passes over the model output, 3 launches in all (the fewest for a statistic of the
whole sample when a sample does not fit on chip).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops import _flow as F
from diffkern.ops._declaration import CudaOp, OpDeclaration
from diffkern.ops.ddim import StepOutput

DECLARATION = OpDeclaration.single_entry(
    "flow_match_step", reference="diffkern.ops.flow_match:flow_match_step_reference",
    triton="diffkern.triton.flow_match:flow_match_step", cuda="diffkern._cuda_ops:flow_match_step",
    # sigma, sigma_next: a contiguous float32 [1 or B] tensor on the samples' device, or None and the host_ value
    # (float32-exact) for the whole batch, so that a host sigma is a kernel argument and not a fill kernel.
    # guidance_rescale: applied when guidance_scale is given and guidance_rescale != 0 (a stats pass, a merge, then
    # the step); keep = 1 - guidance_rescale, computed once on the host in float64 as diffusers' pipelines compute it.
    cuda_ops=(CudaOp("flow_match_step_cuda",
                     "(Tensor model_output, Tensor sample, Tensor? noise, Tensor? sigma, float host_sigma, "
                     "Tensor? sigma_next, float host_sigma_next, float? guidance_scale, float guidance_rescale, "
                     "float keep, bool stochastic) -> (Tensor, Tensor)",
                     lambda model_output, sample, noise, sigma, host_sigma, sigma_next, host_sigma_next,
                     guidance_scale, guidance_rescale, keep,
                     stochastic: (torch.empty_like(sample), torch.empty_like(sample))),),
)


def flow_match_step_reference(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                              sigma: F.SigmaLike, sigma_next: F.SigmaLike, *, guidance_scale: Optional[float],
                              guidance_rescale: float, stochastic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backend contract: ``model_output`` ``[B or 2B, ...]`` (2B with ``guidance_scale``), ``sample`` ``[B, ...]``
    and ``noise`` (used when ``stochastic``) laid out alike; ``sigma``, ``sigma_next`` python floats of the compute
    dtype or ``[1 or B]`` tensors in it (``diffkern.ops._flow``). Returns (prev_sample, pred_original_sample) in the
    sample's dtype and layout."""
    compute = F.compute_dtype(sample)
    batch, ndim = sample.shape[0], sample.ndim
    x = C.as_dtype(sample, compute)
    v = C.apply_guidance(C.as_dtype(model_output, compute), batch, guidance_scale, guidance_rescale=guidance_rescale)
    s = F.coefficient(sigma, compute, ndim)
    s_next = F.coefficient(sigma_next, compute, ndim)
    x0 = x - F.operand(s) * v
    if stochastic:
        prev = F.operand(1.0 - s_next) * x0 + F.operand(s_next) * C.as_dtype(noise, compute)
    else:
        prev = x + F.operand(s_next - s) * v
    return C.as_dtype(prev, sample.dtype), C.as_dtype(x0, sample.dtype)


@torch.library.custom_op("diffkern::flow_match_step", mutates_args=())
def _flow_match_step_op(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                        sigma: torch.Tensor, sigma_next: torch.Tensor, guidance_scale: Optional[float],
                        guidance_rescale: float, stochastic: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return backends.implementation(backend, "flow_match_step")(
        model_output, sample, noise, sigma, sigma_next, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, stochastic=stochastic)


@_flow_match_step_op.register_fake
def _(model_output, sample, noise, sigma, sigma_next, *args):
    return torch.empty_like(sample), torch.empty_like(sample)


F.register_vjp_autograd(_flow_match_step_op, flow_match_step_reference, tensor_inputs=5, differentiable=(0, 1, 2))


def flow_match_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: F.SigmaLike, sigma_next: F.SigmaLike,
                    *, guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0,
                    stochastic: bool = False, noise: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, backend: str = "auto") -> StepOutput:
    """One flow-matching Euler step from noise level ``sigma`` to ``sigma_next`` (the math is in this module's
    docstring).

    Args:
        model_output: the predicted velocity ``[B, ...]`` (``[2B, ...]``, unconditional first, with
            ``guidance_scale``), the sample's dtype and device.
        sample: x at ``sigma``, ``[B, ...]``, float16/bfloat16/float32/float64, any memory format.
        sigma, sigma_next: python floats, 0-d tensors or one per sample (``[1]``/``[B]``), of any float dtype, on
            the CPU or the sample's device; host values must be finite and in [0, 1], device ones are not read.
        guidance_scale: fuse classifier-free guidance uncond + s (cond - uncond) into the step.
        guidance_rescale: r, diffusers' ``rescale_noise_cfg`` of the guided velocity (needs ``guidance_scale``;
            0 turns it off, as in the pipelines).
        stochastic: re-noise the x0 estimate to ``sigma_next`` with ``noise`` (diffusers' ``stochastic_sampling``)
            instead of the deterministic Euler step.
        noise: z for the stochastic step, like ``sample``; else drawn with ``generator`` as diffusers draws it (a
            float32 normal of the sample's shape, rounded to the sample's dtype).
        backend: ``auto``, ``reference``, ``triton`` or ``cuda``.

    Returns:
        ``StepOutput(prev_sample, pred_original_sample)`` in the sample's dtype and memory format.
    """
    options = (guidance_scale, guidance_rescale, stochastic, backend)
    key = plan = None
    eager = not torch.compiler.is_compiling()
    if eager:
        sigma, sigma_next = F.host_sigma(sigma), F.host_sigma(sigma_next)
        key, plan = C.cached_plan(_PLANS, lambda: (
            C.tensor_key(model_output), C.tensor_key(sample), F.sigma_key(sigma), F.sigma_key(sigma_next),
            C.optional_tensor_key(noise), type(generator), C.options_key(options),
            backends.environment_choice(backend)))
    if plan is None:
        plan, sigma, sigma_next = _flow_match_plan(model_output, sample, sigma, sigma_next, noise, generator, *options)
        C.store_plan(_PLANS, key, plan)
    backends.record_choice("flow_match_step", plan.backend)

    # (diffusers draws the noise in float32, the sample upcast, whatever the sample's dtype.)
    model_output, sample, noise = C.step_tensors(plan, model_output, sample, noise, generator, torch.float32)
    if eager and not C.records_autograd(model_output, sample, noise):
        prev, x0 = plan.launch(model_output, sample, noise, F.kernel_sigma(sigma, sample),
                               F.kernel_sigma(sigma_next, sample))
    else:
        prev, x0 = _flow_match_step_op(model_output, sample, noise, F.prepare_sigma(sigma, sample),
                                       F.prepare_sigma(sigma_next, sample), *plan.options.values(), plan.backend)
    return StepOutput(prev, x0)


_PLANS = C.plan_cache()


def _flow_match_plan(model_output, sample, sigma, sigma_next, noise, generator, guidance_scale, guidance_rescale,
                     stochastic, backend):
    """Every check of ``flow_match_step``; returns (plan, sigma, sigma_next) with the sigmas normalised."""
    C.check_tensor("sample", sample)
    C.check_tensor("model_output", model_output)
    batch = sample.shape[0]
    guided = guidance_scale is not None
    C.check_like("model_output", model_output, "sample", sample,
                 ((2 * batch) if guided else batch,) + tuple(sample.shape[1:]))
    device = sample.device
    sigma = F.check_sigma("sigma", sigma, batch, device)
    sigma_next = F.check_sigma("sigma_next", sigma_next, batch, device)
    if guided:
        guidance_scale = C.check_float("guidance_scale", guidance_scale)
    guidance_rescale = C.check_guidance_rescale(guidance_rescale, guidance_scale)
    C.check_bool("stochastic", stochastic)
    C.check_generator(generator, noise)
    if noise is not None:
        C.check_like("noise", noise, "sample", sample)
    chosen = backends.resolve("flow_match_step", backend, device)
    options = dict(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, stochastic=stochastic)
    # (A binder reads of the sigmas only their kind, host number or tensor, which kernel_sigma keeps.)
    launch = backends.eager_launch(chosen, "flow_match_step", (model_output, sample, noise if stochastic else None,
                                                              sigma, sigma_next), options)
    relayout = not C.laid_out_alike((model_output, sample, noise if stochastic else None))
    plan = C.StepPlan(chosen, launch, options, relayout, table_ready=False, uses_noise=stochastic)
    return plan, sigma, sigma_next
