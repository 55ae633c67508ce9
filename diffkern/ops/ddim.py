"""The DDIM step (Song et al. 2021), diffusers' ``DDIMScheduler.step`` math.

With a = abar_t, a' = abar_prev (``final_alpha_cumprod`` when prev_timestep < 0), per sample:

    x0, eps  from the prediction type (epsilon / v_prediction / sample)
    x0       <- dynamic threshold (per-sample quantile of |x0|) or clip, optionally
    sigma    = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
    eps      <- (x - sqrt(a) x0) / sqrt(1 - a)            if use_clipped_model_output
    x_prev   = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps  (+ sigma z when eta > 0)

With ``guidance_scale`` set the model output holds 2B samples (unconditional first) and
eps_model = uncond + s (cond - uncond) is part of the step; with ``guidance_rescale`` r > 0 too, the pipelines'
std rescale of the guided output (diffusers' ``rescale_noise_cfg``, as the SDXL pipelines apply it):
model_out <- r (model_out std(cond) / std(model_out)) + (1 - r) model_out, per-sample unbiased stds over every
non-batch dimension. The fast backends compute std(cond) / std(model_out) in one stats pass over the model output
first (``diffkern.triton._guidance``, ``csrc/guidance_rescale.cuh``), then run the step reading it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops._declaration import CudaOp, OpDeclaration


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def step_cuda_outputs(sample: torch.Tensor, x0_only: bool, rescaled: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the CUDA step ops return, for their fake kernels: (prev_sample, pred_original_sample) like
    ``sample``; with ``x0_only`` (the first pass of dynamic thresholding) x0 as float32 ``[B, n]`` and an empty
    tensor, or with the guidance rescale (``rescaled``) its per-sample factor, float32 ``[B]``."""
    if x0_only:
        x0 = sample.new_empty((sample.shape[0], sample[0].numel()), dtype=torch.float32)
        return x0, sample.new_empty((sample.shape[0] if rescaled else 0,), dtype=torch.float32)
    return torch.empty_like(sample), torch.empty_like(sample)


DECLARATION = OpDeclaration.single_entry(
    "ddim_step", reference="diffkern.ops.ddim:ddim_step_reference", triton="diffkern.triton.ddim:ddim_step",
    cuda="diffkern._cuda_ops:ddim_step",
    # Codes: prediction_type as ``_declaration.PREDICTION_CODES``. threshold_scale: the per-sample dynamic
    # thresholding scale s (float32 [B]); when given, x0 is clamped to [-s, s] and divided by s (clip_sample is
    # then ignored, as in diffusers). x0_only: the first pass of dynamic thresholding: returns (x0 as float32
    # [B, n] before any clipping, an empty tensor), ignoring noise, clipping and threshold_scale. Timesteps: an
    # int64 [1 or B] tensor, or None and the host_ value for the whole batch (a negative host_prev_timestep:
    # final_alpha_cumprod), so that a python-int timestep is a kernel argument and not a fill kernel.
    # guidance_rescale: applied when guidance_scale is given and guidance_rescale != 0; keep = 1 - guidance_rescale,
    # computed once on the host in float64 as the pipelines compute it (flow_match_step_cuda's convention). The
    # per-sample factor std(cond) / std(guided) is rescale_factor when given (float32 [B]), else computed by the op
    # (a stats pass first); an x0_only pass with the rescale returns it as its second output, for the full step.
    cuda_ops=(CudaOp("ddim_step_cuda",
                     "(Tensor model_output, Tensor sample, Tensor? noise, Tensor alphas_cumprod, Tensor? timestep, "
                     "int host_timestep, Tensor? prev_timestep, int host_prev_timestep, float final_alpha_cumprod, "
                     "float eta, int prediction_type, bool clip_sample, float clip_sample_range, "
                     "Tensor? threshold_scale, bool use_clipped_model_output, float? guidance_scale, "
                     "bool x0_only=False, float guidance_rescale=0.0, float keep=1.0, Tensor? rescale_factor=None"
                     ") -> (Tensor, Tensor)",
                     lambda model_output, sample, noise, alphas_cumprod, timestep, host_timestep, prev_timestep,
                     host_prev_timestep, final_alpha_cumprod, eta, prediction_type, clip_sample, clip_sample_range,
                     threshold_scale, use_clipped_model_output, guidance_scale, x0_only=False, guidance_rescale=0.0,
                     keep=1.0, rescale_factor=None:
                     step_cuda_outputs(sample, x0_only, guidance_scale is not None and guidance_rescale != 0)),),
)


def ddim_step_reference(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                        alphas_cumprod: torch.Tensor, timestep: torch.Tensor, prev_timestep: torch.Tensor, *,
                        final_alpha_cumprod: float, eta: float, prediction_type: str, clip_sample: bool,
                        clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
                        sample_max_value: float, use_clipped_model_output: bool,
                        guidance_scale: Optional[float],
                        guidance_rescale: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backend contract (see ``_common``): ``model_output`` ``[B or 2B, ...]``, ``sample`` ``[B, ...]``,
    ``noise`` like ``sample`` when eta > 0 (else None or ignored), timesteps python ints or int64 ``[1 or B]``.
    Arithmetic in fp32 (fp64 for fp64 input); returns (prev_sample, pred_original_sample) in the sample's
    dtype and layout."""
    compute = torch.promote_types(sample.dtype, torch.float32)
    batch, ndim = sample.shape[0], sample.ndim
    x = sample.to(compute)
    model_out = C.apply_guidance(model_output.to(compute), batch, guidance_scale, guidance_rescale=guidance_rescale)
    sqrt_a, sqrt_beta, sqrt_a_prev, std, eps_coef = C.host_coefficients(
        _coefficients, alphas_cumprod, (timestep, prev_timestep), compute, ndim, final_alpha_cumprod, eta)
    x0, eps = C.predict_x0_eps(prediction_type, x, model_out, None, roots=(sqrt_a, sqrt_beta),
                               need_eps=not use_clipped_model_output, copy_sample=False)
    x0 = C.clip_or_threshold(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                             thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                             sample_max_value=sample_max_value)
    if x0 is model_output:  # sample prediction passed through: the op's outputs may not alias its inputs
        x0 = x0.clone()
    if use_clipped_model_output:
        eps = (x - sqrt_a * x0) / sqrt_beta
    prev = sqrt_a_prev * x0 + eps_coef * eps
    if eta > 0:
        prev = prev + std * noise.to(compute)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def _coefficients(alphas_cumprod: torch.Tensor, timestep, prev_timestep, compute: torch.dtype, ndim: int,
                  final_alpha_cumprod: float, eta: float):
    """(sqrt(a), sqrt(1 - a), sqrt(a'), sigma, sqrt(1 - a' - sigma^2)) in diffusers' operation order: python
    floats for host timesteps and a CPU table, else tensors (``C.step_abar``)."""
    a = C.step_abar(alphas_cumprod, timestep, compute, ndim)
    a_prev = C.step_abar(alphas_cumprod, prev_timestep, compute, ndim, final_alpha_cumprod)
    beta = 1 - a
    variance = ((1 - a_prev) / beta) * (1 - a / a_prev)
    sqrt_a, sqrt_beta, sqrt_a_prev, sqrt_variance = C.sqrts(a, beta, a_prev, variance)
    std = eta * sqrt_variance
    coefficients = (sqrt_a, sqrt_beta, sqrt_a_prev, std, (1 - a_prev - std ** 2) ** 0.5)
    if all(isinstance(c, C.HostFloat) for c in coefficients):  # plain floats: torch parses a float subclass slower
        return tuple(map(float, coefficients))
    return coefficients


@torch.library.custom_op("diffkern::ddim_step", mutates_args=())
def _ddim_step_op(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                  alphas_cumprod: torch.Tensor, timestep: torch.Tensor, prev_timestep: torch.Tensor,
                  final_alpha_cumprod: float, eta: float, prediction_type: str, clip_sample: bool,
                  clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
                  sample_max_value: float, use_clipped_model_output: bool, guidance_scale: Optional[float],
                  guidance_rescale: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return backends.implementation(backend, "ddim_step")(
        model_output, sample, noise, alphas_cumprod, timestep, prev_timestep,
        final_alpha_cumprod=final_alpha_cumprod, eta=eta, prediction_type=prediction_type,
        clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
        use_clipped_model_output=use_clipped_model_output, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale)


@_ddim_step_op.register_fake
def _(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, *args):
    return torch.empty_like(sample), torch.empty_like(sample)


C.register_step_autograd(_ddim_step_op, ddim_step_reference)


def ddim_step(model_output: torch.Tensor, timestep: C.TimestepLike, sample: torch.Tensor,
              alphas_cumprod: torch.Tensor, *, prev_timestep: C.TimestepLike, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              prediction_type: str = "epsilon", clip_sample: bool = False, clip_sample_range: float = 1.0,
              thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
              sample_max_value: float = 1.0, use_clipped_model_output: bool = False,
              final_alpha_cumprod: float = 1.0, guidance_scale: Optional[float] = None,
              guidance_rescale: float = 0.0, backend: str = "auto") -> StepOutput:
    """One DDIM step from ``timestep`` to ``prev_timestep`` (the math is in this module's docstring).

    Args:
        model_output: ``[B, ...]`` (``[2B, ...]`` with ``guidance_scale``), the sample's dtype and device.
        timestep, prev_timestep: int, 0-d or ``[B]`` integer tensors; ``prev_timestep < 0`` means
            "use ``final_alpha_cumprod``" (diffusers: 1.0 with ``set_alpha_to_one``, else abar[0]).
        sample: x_t, ``[B, ...]``, float16/bfloat16/float32/float64.
        alphas_cumprod: abar ``[T]`` (CPU or the sample's device).
        eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral sampling.
        noise: z for eta > 0, like ``sample``; else drawn with ``generator`` as diffusers does.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        clip_sample / clip_sample_range, thresholding / dynamic_thresholding_ratio / sample_max_value,
        use_clipped_model_output: as in diffusers' ``DDIMScheduler``.
        guidance_scale: fuse classifier-free guidance over a 2B-batch model output.
        guidance_rescale: r, diffusers' ``rescale_noise_cfg`` of the guided model output (needs
            ``guidance_scale``; 0 turns it off, as in the pipelines; SDXL's pipelines use 0.7 with zero-SNR models).
        backend: ``auto``, ``reference``, ``triton`` or ``cuda``.

    Returns:
        ``StepOutput(prev_sample, pred_original_sample)`` in the sample's dtype and memory format.
    """
    options = (eta, prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
               sample_max_value, use_clipped_model_output, final_alpha_cumprod, guidance_scale, guidance_rescale,
               backend)
    key = plan = None
    eager = not torch.compiler.is_compiling()
    if eager:
        timestep, prev_timestep = C.host_scalar(timestep), C.host_scalar(prev_timestep)
        key, plan = C.cached_plan(_PLANS, lambda: (
            C.tensor_key(model_output), C.tensor_key(sample), C.table_key(alphas_cumprod), C.timestep_key(timestep),
            C.timestep_key(prev_timestep), C.optional_tensor_key(noise), type(generator), C.options_key(options),
            backends.environment_choice(backend)))
    if plan is None:
        plan, timestep, prev_timestep = _ddim_plan(model_output, timestep, sample, alphas_cumprod, prev_timestep,
                                                   noise, generator, *options)
        C.store_plan(_PLANS, key, plan)
    backends.record_choice("ddim_step", plan.backend)

    model_output, sample, noise = C.step_tensors(plan, model_output, sample, noise, generator, model_output.dtype)
    table = alphas_cumprod if plan.table_ready else C.prepare_table(alphas_cumprod, sample)
    if eager and not C.records_autograd(model_output, sample, noise):
        prev, x0 = plan.launch(model_output, sample, noise, table, C.kernel_timesteps(timestep, sample),
                               C.kernel_timesteps(prev_timestep, sample))
    else:
        device = sample.device
        prev, x0 = _ddim_step_op(model_output, sample, noise, table, C.prepare_timesteps(timestep, device),
                                 C.prepare_timesteps(prev_timestep, device), *plan.options.values(), plan.backend)
    return StepOutput(prev, x0)


_PLANS = C.plan_cache()


def _ddim_plan(model_output, timestep, sample, alphas_cumprod, prev_timestep, noise, generator, eta,
               prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
               sample_max_value, use_clipped_model_output, final_alpha_cumprod, guidance_scale, guidance_rescale,
               backend):
    """Every check of ``ddim_step``; returns (plan, timestep, prev_timestep) with the timesteps normalised."""
    C.check_tensor("sample", sample)
    C.check_tensor("model_output", model_output)
    batch = sample.shape[0]
    out_batch = 2 * batch if guidance_scale is not None else batch
    C.check_like("model_output", model_output, "sample", sample, (out_batch,) + tuple(sample.shape[1:]))
    device = sample.device
    num_train = C.check_table(alphas_cumprod, device)
    timestep = C.check_timesteps("timestep", timestep, batch, num_train, device)
    prev_timestep = C.check_timesteps("prev_timestep", prev_timestep, batch, num_train, device, allow_negative=True)
    eta = C.check_float("eta", eta, low=0.0)
    final_alpha_cumprod = C.check_float("final_alpha_cumprod", final_alpha_cumprod, low=0.0, high=1.0,
                                        low_inclusive=False)
    C.check_bool("use_clipped_model_output", use_clipped_model_output)
    x0_options = C.check_step_options(prediction_type=prediction_type, clip_sample=clip_sample,
                                      clip_sample_range=clip_sample_range, thresholding=thresholding,
                                      dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                      sample_max_value=sample_max_value, guidance_scale=guidance_scale)
    guidance_rescale = C.check_guidance_rescale(guidance_rescale, guidance_scale)
    C.check_abar_at_timesteps(alphas_cumprod, timestep, prev_timestep, prediction_type)
    C.check_generator(generator, noise)
    if noise is not None:
        C.check_like("noise", noise, "sample", sample)
    chosen = backends.resolve("ddim_step", backend, device)
    options = dict(final_alpha_cumprod=final_alpha_cumprod, eta=eta, prediction_type=prediction_type,
                   **x0_options._asdict(), use_clipped_model_output=use_clipped_model_output,
                   guidance_scale=None if guidance_scale is None else float(guidance_scale),
                   guidance_rescale=guidance_rescale)
    launch = backends.eager_launch(chosen, "ddim_step", (model_output, sample, noise, alphas_cumprod, timestep,
                                                   prev_timestep), options)
    plan = C.StepPlan(chosen, launch, options, not C.laid_out_alike((model_output, sample, noise if eta > 0 else None)),
                      C.table_ready(alphas_cumprod, sample), uses_noise=eta > 0)
    return plan, timestep, prev_timestep
