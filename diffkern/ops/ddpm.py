"""The DDPM ancestral step (Ho et al. 2020), diffusers' ``DDPMScheduler.step`` math.

With a = abar_t, a' = abar_prev (1.0 when prev_timestep < 0), alpha = a / a', beta = 1 - alpha, per sample:

    x0      from the prediction type, then dynamic threshold or clip
    mean    = (sqrt(a') beta / (1 - a)) x0 + (sqrt(alpha) (1 - a') / (1 - a)) x
    v       = max((1 - a') / (1 - a) * beta, 1e-20)           (the posterior variance)
    std     = fixed_small: sqrt(v)      fixed_small_log: exp(log(v) / 2)
              fixed_large: sqrt(beta)   fixed_large_log: sqrt(beta)  (diffusers computes sqrt(log beta) = NaN)
              learned: sqrt(p)          learned_range: exp((f log beta + (1 - f) log v) / 2), f = (p + 1) / 2
    x_prev  = mean + std z              (no noise for samples at t = 0)

``learned``/``learned_range`` take a model output with 2C channels: the prediction, then p.

Guidance (``guidance_scale``, a 2B-sample model output, unconditional first) guides the prediction; p comes from the
conditional half. ``guidance_rescale`` r > 0 then applies the pipelines' std rescale to the guided prediction
(diffusers' ``rescale_noise_cfg``: pred <- r (pred std(cond) / std(pred)) + (1 - r) pred, per-sample unbiased stds
over the prediction's elements), as ``diffkern.ops.ddim`` describes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops._declaration import CudaOp, OpDeclaration
from diffkern.ops.ddim import StepOutput, step_cuda_outputs

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

DECLARATION = OpDeclaration.single_entry(
    "ddpm_step", reference="diffkern.ops.ddpm:ddpm_step_reference", triton="diffkern.triton.ddpm:ddpm_step",
    cuda="diffkern._cuda_ops:ddpm_step",
    # Codes: variance_type and prediction_type as ``_declaration``'s; the timesteps (tensor or None and host
    # value; a negative host_prev_timestep: abar_prev = 1), threshold_scale, x0_only and the guidance rescale
    # (guidance_rescale, keep, rescale_factor) as DDIM's.
    cuda_ops=(CudaOp("ddpm_step_cuda",
                     "(Tensor model_output, Tensor sample, Tensor? noise, Tensor alphas_cumprod, Tensor? timestep, "
                     "int host_timestep, Tensor? prev_timestep, int host_prev_timestep, int variance_type, "
                     "int prediction_type, bool clip_sample, float clip_sample_range, Tensor? threshold_scale, "
                     "float? guidance_scale, bool x0_only=False, float guidance_rescale=0.0, float keep=1.0, "
                     "Tensor? rescale_factor=None) -> (Tensor, Tensor)",
                     lambda model_output, sample, noise, alphas_cumprod, timestep, host_timestep, prev_timestep,
                     host_prev_timestep, variance_type, prediction_type, clip_sample, clip_sample_range,
                     threshold_scale, guidance_scale, x0_only=False, guidance_rescale=0.0, keep=1.0,
                     rescale_factor=None:
                     step_cuda_outputs(sample, x0_only, guidance_scale is not None and guidance_rescale != 0)),),
)


def ddpm_std(variance_type: str, posterior_variance: torch.Tensor, beta: torch.Tensor,
             predicted_variance: Optional[torch.Tensor]) -> torch.Tensor:
    """The noise scale of each variance type (see the module docstring); the coefficients are step coefficients
    (host numbers or tensors, see ``_common.step_abar``), ``predicted_variance`` a tensor."""
    v = posterior_variance.clamp(min=1e-20)
    if variance_type == "fixed_small":
        return v ** 0.5
    if variance_type == "fixed_small_log":
        return (0.5 * v.log()).exp()
    if variance_type in ("fixed_large", "fixed_large_log"):
        return beta ** 0.5
    if variance_type == "learned":
        return predicted_variance ** 0.5
    frac = (predicted_variance + 1) / 2
    return (0.5 * (frac * beta.log() + (1 - frac) * v.log())).exp()


def ddpm_step_reference(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                        alphas_cumprod: torch.Tensor, timestep: torch.Tensor, prev_timestep: torch.Tensor, *,
                        variance_type: str, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                        thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float,
                        guidance_scale: Optional[float],
                        guidance_rescale: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backend contract (see ``_common``): ``model_output`` ``[B or 2B, C or 2C, ...]`` (2C for learned
    variance types, and then every tensor is C-contiguous), ``sample`` ``[B, C, ...]``, ``noise`` like
    ``sample`` or None (no noise), timesteps int64 ``[1 or B]``. Samples whose timestep is 0 get no noise.
    Returns (prev_sample, pred_original_sample) in the sample's dtype and layout."""
    compute = torch.promote_types(sample.dtype, torch.float32)
    batch, channels, ndim = sample.shape[0], sample.shape[1], sample.ndim
    x = sample.to(compute)
    model_out = C.apply_guidance(model_output.to(compute), batch, guidance_scale, channels, guidance_rescale)
    fresh = model_out is not model_output  # not the caller's tensor
    predicted_variance = None
    if variance_type in LEARNED_VARIANCE_TYPES:
        model_out, predicted_variance = model_out[:, :channels], model_out[:, channels:]
    # The coefficients: host numbers for a host timestep and a CPU table, else tensors (``C.step_abar``).
    a = C.step_abar(alphas_cumprod, timestep, compute, ndim)
    a_prev = C.step_abar(alphas_cumprod, prev_timestep, compute, ndim, 1.0)
    alpha = a / a_prev
    beta = 1 - alpha
    sqrt_a, sqrt_beta_prod, sqrt_a_prev, sqrt_alpha = C.sqrts(a, 1 - a, a_prev, alpha)
    x0, _ = C.predict_x0_eps(prediction_type, x, model_out, a, roots=(sqrt_a, sqrt_beta_prod), need_eps=False,
                             copy_sample=False)
    x0 = C.clip_or_threshold(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                             thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                             sample_max_value=sample_max_value)
    if x0 is model_out and (not fresh or predicted_variance is not None):
        # Sample prediction passed through: the op's outputs may not alias its inputs (nor be a channel slice).
        x0 = x0.clone()
    x0_coef = (sqrt_a_prev * beta) / (1 - a)
    x_coef = sqrt_alpha * (1 - a_prev) / (1 - a)
    prev = x0_coef * x0 + x_coef * x
    t = C.host_timestep(timestep)
    if noise is not None and t != 0:  # a host t = 0 adds no noise; else samples at t = 0 get std 0
        std = ddpm_std(variance_type, (1 - a_prev) / (1 - a) * beta, beta, predicted_variance)
        if t is None:
            std = torch.where(C.per_sample(timestep, ndim) > 0, std, torch.zeros_like(std))
        prev = prev + std * noise.to(compute)
    return prev.to(sample.dtype), x0.to(sample.dtype)


@torch.library.custom_op("diffkern::ddpm_step", mutates_args=())
def _ddpm_step_op(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                  alphas_cumprod: torch.Tensor, timestep: torch.Tensor, prev_timestep: torch.Tensor,
                  variance_type: str, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                  thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float,
                  guidance_scale: Optional[float], guidance_rescale: float,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return backends.implementation(backend, "ddpm_step")(
        model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, variance_type=variance_type,
        prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
        thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)


@_ddpm_step_op.register_fake
def _(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, *args):
    return torch.empty_like(sample), torch.empty_like(sample)


C.register_step_autograd(_ddpm_step_op, ddpm_step_reference)


def ddpm_step(model_output: torch.Tensor, timestep: C.TimestepLike, sample: torch.Tensor,
              alphas_cumprod: torch.Tensor, *, prev_timestep: Optional[C.TimestepLike] = None,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              variance_type: str = "fixed_small", prediction_type: str = "epsilon", clip_sample: bool = True,
              clip_sample_range: float = 1.0, thresholding: bool = False,
              dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
              guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0,
              backend: str = "auto") -> StepOutput:
    """One DDPM ancestral step from ``timestep`` to ``prev_timestep`` (math in the module docstring).

    Args:
        model_output: ``[B, C, ...]``; ``[B, 2C, ...]`` for ``learned``/``learned_range``; 2B samples with
            ``guidance_scale`` (unconditional first; a learned variance is taken from the conditional half).
        timestep: int, 0-d or ``[B]`` integer tensor in ``[0, T)``.
        sample: x_t ``[B, C, ...]``, float16/bfloat16/float32/float64.
        alphas_cumprod: abar ``[T]`` (CPU or the sample's device).
        prev_timestep: defaults to ``timestep - 1``; negative means abar_prev = 1.
        noise: z like ``sample``; else drawn with ``generator`` as diffusers does (only when some t > 0:
            always for a device-tensor timestep, whose value is not read on the host).
        variance_type: ``fixed_small``, ``fixed_small_log``, ``fixed_large``, ``fixed_large_log``,
            ``learned`` or ``learned_range``.
        prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
        sample_max_value: as in diffusers' ``DDPMScheduler``.
        guidance_scale: fuse classifier-free guidance over a 2B-batch model output.
        guidance_rescale: r, diffusers' ``rescale_noise_cfg`` of the guided prediction (needs ``guidance_scale``;
            0 turns it off, as in the pipelines).
        backend: ``auto``, ``reference``, ``triton`` or ``cuda``.

    Returns:
        ``StepOutput(prev_sample, pred_original_sample)`` in the sample's dtype.
    """
    options = (variance_type, prediction_type, clip_sample, clip_sample_range, thresholding,
               dynamic_thresholding_ratio, sample_max_value, guidance_scale, guidance_rescale, backend)
    key = plan = None
    eager = not torch.compiler.is_compiling()
    if eager:
        timestep, prev_timestep = C.host_scalar(timestep), C.host_scalar(prev_timestep)
        key, plan = C.cached_plan(_PLANS, lambda: (
            C.tensor_key(model_output), C.tensor_key(sample), C.table_key(alphas_cumprod), C.timestep_key(timestep),
            None if prev_timestep is None else C.timestep_key(prev_timestep), C.optional_tensor_key(noise),
            type(generator), C.options_key(options), backends.environment_choice(backend)))
    if plan is None:
        plan, timestep, prev_timestep = _ddpm_plan(model_output, timestep, sample, alphas_cumprod, prev_timestep,
                                                   noise, generator, *options)
        C.store_plan(_PLANS, key, plan)
    backends.record_choice("ddpm_step", plan.backend)

    relayout = plan.relayout
    if noise is None and may_have_positive_timestep(timestep):
        noise = C.draw_noise(sample.shape, model_output.dtype, sample.device, generator)
        relayout = relayout or not C.laid_out_alike((model_output, sample, noise))
    if relayout:
        # With a learned variance the 2C-channel output is split per sample in C order: lay everything out so.
        tensors = [model_output, sample, noise]
        learned = plan.options["variance_type"] in LEARNED_VARIANCE_TYPES
        model_output, sample, noise = [None if x is None else x.contiguous() for x in tensors] if learned \
            else C.same_layout(tensors)
    table = alphas_cumprod if plan.table_ready else C.prepare_table(alphas_cumprod, sample)
    if eager and not C.records_autograd(model_output, sample, noise):
        t = C.kernel_timesteps(timestep, sample)
        prev_t = t - 1 if prev_timestep is None else C.kernel_timesteps(prev_timestep, sample)
        prev, x0 = plan.launch(model_output, sample, noise, table, t, prev_t)
    else:
        t = C.prepare_timesteps(timestep, sample.device)
        prev_t = t - 1 if prev_timestep is None else C.prepare_timesteps(prev_timestep, sample.device)
        prev, x0 = _ddpm_step_op(model_output, sample, noise, table, t, prev_t, *plan.options.values(), plan.backend)
    return StepOutput(prev, x0)


_PLANS = C.plan_cache()


def _ddpm_plan(model_output, timestep, sample, alphas_cumprod, prev_timestep, noise, generator, variance_type,
               prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
               sample_max_value, guidance_scale, guidance_rescale, backend):
    """Every check of ``ddpm_step``; returns (plan, timestep, prev_timestep) with the timesteps normalised."""
    C.check_tensor("sample", sample, ndim_min=2)
    C.check_tensor("model_output", model_output, ndim_min=2)
    C.check_choice("variance_type", variance_type, VARIANCE_TYPES)
    batch, channels = sample.shape[0], sample.shape[1]
    learned = variance_type in LEARNED_VARIANCE_TYPES
    out_shape = ((2 * batch if guidance_scale is not None else batch), (2 * channels if learned else channels)) \
        + tuple(sample.shape[2:])
    C.check_like("model_output", model_output, "sample", sample, out_shape)
    device = sample.device
    num_train = C.check_table(alphas_cumprod, device)
    timestep = C.check_timesteps("timestep", timestep, batch, num_train, device)
    if prev_timestep is not None:
        prev_timestep = C.check_timesteps("prev_timestep", prev_timestep, batch, num_train, device,
                                          allow_negative=True)
    x0_options = C.check_step_options(prediction_type=prediction_type, clip_sample=clip_sample,
                                      clip_sample_range=clip_sample_range, thresholding=thresholding,
                                      dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                      sample_max_value=sample_max_value, guidance_scale=guidance_scale)
    guidance_rescale = C.check_guidance_rescale(guidance_rescale, guidance_scale)
    C.check_abar_at_timesteps(alphas_cumprod, timestep, prev_timestep, prediction_type)
    C.check_generator(generator, noise)
    if noise is not None:
        C.check_like("noise", noise, "sample", sample)
    chosen = backends.resolve("ddpm_step", backend, device)
    options = dict(variance_type=variance_type, prediction_type=prediction_type, **x0_options._asdict(),
                   guidance_scale=None if guidance_scale is None else float(guidance_scale),
                   guidance_rescale=guidance_rescale)
    tensors = (model_output, sample, noise)
    relayout = not all(x is None or x.is_contiguous() for x in tensors) if learned else not C.laid_out_alike(tensors)
    example_prev = timestep - 1 if prev_timestep is None else prev_timestep
    launch = backends.eager_launch(chosen, "ddpm_step", (model_output, sample, noise, alphas_cumprod, timestep,
                                                   example_prev), options)
    plan = C.StepPlan(chosen, launch, options, relayout, C.table_ready(alphas_cumprod, sample), uses_noise=True)
    return plan, timestep, prev_timestep


def may_have_positive_timestep(timestep: C.TimestepLike) -> bool:
    """Whether noise must be drawn. Host values are read; a device tensor's are not (that would sync)."""
    if isinstance(timestep, int):
        return timestep > 0
    if timestep.device.type == "cpu" and not torch.compiler.is_compiling():
        return bool((timestep > 0).any())
    return True
