"""The ``cuda`` backend: the CUDA extension's ops (``csrc/``) behind the reference backends' signatures.

The extension's ops (``diffkern::add_noise_cuda``, ``ddim_step_cuda``, ...) are declared with their schemas,
codes and fake kernels in the op modules' ``DECLARATION`` (``diffkern/ops/_declaration.py``); the library registers
their kernels. Importing this module loads nothing: the first call loads the library through
``diffkern._extension.load()``, which defines the schemas first.

Passes over memory per call (n = elements of the samples):

- ``add_noise``: one kernel, reads x_0 and noise, writes x_t.
- ``ddim_step`` / ``ddpm_step``: one kernel reading the model output (both halves with guidance) and the
  sample (+ noise) once and writing prev_sample and pred_original_sample. With ``thresholding`` the
  per-sample quantile needs x0 first: a first launch writes the unclipped x0 (float32), torch's
  ``kthvalue`` reduces it to the scale s (``_common.dynamic_threshold_scale``, identical to the reference),
  and the step runs with s: 2 launches + the quantile. With ``guidance_rescale`` the op first runs the stats
  pass of ``csrc/guidance_rescale.cuh`` (std(cond) / std(guided) per sample: 2 small launches); with thresholding
  too, the x0 launch computes that factor and returns it, and the step takes it (computed once).
- ``group_norm_silu``: see ``csrc/group_norm_silu.cu`` (1-2 kernels forward, 2-3 backward).

float64 inputs run on the reference (the kernels compute in fp32 by design; float64 is for gradcheck).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

import torch

from diffkern.ops import _common as C
from diffkern.ops._declaration import PREDICTION_CODES, VARIANCE_CODES
from diffkern.ops.add_noise import add_noise_reference
from diffkern.ops.ddim import ddim_step_reference
from diffkern.ops.ddpm import ddpm_step_reference
from diffkern.ops.group_norm_silu import group_norm_silu_backward_reference, group_norm_silu_forward_reference

_lock = threading.Lock()
_ready = False


def _ops():
    """``torch.ops.diffkern`` once the ops' schemas and fakes are defined (``_declaration.define_cuda_ops``) and
    the extension that registers their kernels is loaded (idempotent)."""
    global _ready
    if not _ready:
        with _lock:
            if not _ready:
                from diffkern import _extension

                _extension.load()
                _ready = True
    return torch.ops.diffkern


def _timestep_pair(timesteps: C.TimestepLike) -> Tuple[Optional[torch.Tensor], int]:
    """The ops' ``Tensor? timestep, int host_timestep``: a python int (shared by the batch; the kernels take it as
    an argument, no fill kernel) as ``(None, value)``, an int64 ``[1 or B]`` tensor as ``(tensor, 0)``."""
    if type(timesteps) is int:
        return None, timesteps
    return timesteps, 0


@C.float64_runs_reference(add_noise_reference, dtype_from=0)
def add_noise(original_samples: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
              timesteps: C.TimestepLike) -> torch.Tensor:
    """``add_noise_reference``'s contract; ``timesteps`` a python int or int64 ``[1 or B]`` on the device."""
    return _ops().add_noise_cuda(original_samples, noise, alphas_cumprod, *_timestep_pair(timesteps))


@C.binds(add_noise)
def _bind_add_noise(original_samples, noise, alphas_cumprod, timesteps):
    if original_samples.dtype == torch.float64 or type(timesteps) is not int:
        return None
    op = _ops().add_noise_cuda.default

    def launch(original_samples, noise, alphas_cumprod, timesteps):
        return op(original_samples, noise, alphas_cumprod, None, timesteps)
    return launch


@C.float64_runs_reference(ddim_step_reference, dtype_from=1)
def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
              alphas_cumprod: torch.Tensor, timestep: C.TimestepLike, prev_timestep: C.TimestepLike, *,
              final_alpha_cumprod: float, eta: float, use_clipped_model_output: bool,
              **step_options) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ddim_step_reference``'s contract (timesteps python ints or int64 ``[1 or B]`` tensors; ``step_options``:
    the options every step shares, ``_run_step``'s keywords)."""
    ddim_step_cuda = _ops().ddim_step_cuda
    timesteps = _timestep_pair(timestep) + _timestep_pair(prev_timestep)

    def launch(noise, prediction, clip_sample, clip_sample_range, threshold_scale, guidance_scale, x0_only,
               *rescale):
        return ddim_step_cuda(model_output, sample, noise, alphas_cumprod, *timesteps, final_alpha_cumprod, eta,
                              prediction, clip_sample, clip_sample_range, threshold_scale, use_clipped_model_output,
                              guidance_scale, x0_only, *rescale)

    return _run_step(launch, noise if eta > 0 else None, **step_options)


@C.binds(ddim_step)
def _bind_ddim_step(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, *, final_alpha_cumprod,
                    eta, use_clipped_model_output, **step_options):
    tail = _plain_step_tail(sample, timestep, prev_timestep, **step_options)
    if tail is None:
        return None
    op = _ops().ddim_step_cuda.default
    prediction, clip_sample, clip_sample_range, guidance_scale = tail
    options = (final_alpha_cumprod, eta, prediction, clip_sample, clip_sample_range, None, use_clipped_model_output,
               guidance_scale)
    with_noise = eta > 0

    def launch(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep):
        return op(model_output, sample, noise if with_noise else None, alphas_cumprod, None, timestep, None,
                  prev_timestep, *options)
    return launch


@C.float64_runs_reference(ddpm_step_reference, dtype_from=1)
def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
              alphas_cumprod: torch.Tensor, timestep: C.TimestepLike, prev_timestep: C.TimestepLike, *,
              variance_type: str, **step_options) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ddpm_step_reference``'s contract (timesteps python ints or int64 ``[1 or B]`` tensors; ``step_options``:
    the options every step shares, ``_run_step``'s keywords)."""
    ddpm_step_cuda = _ops().ddpm_step_cuda
    variance = VARIANCE_CODES[variance_type]
    timesteps = _timestep_pair(timestep) + _timestep_pair(prev_timestep)

    def launch(noise, prediction, clip_sample, clip_sample_range, threshold_scale, guidance_scale, x0_only,
               *rescale):
        return ddpm_step_cuda(model_output, sample, noise, alphas_cumprod, *timesteps, variance,
                              prediction, clip_sample, clip_sample_range, threshold_scale, guidance_scale, x0_only,
                              *rescale)

    return _run_step(launch, noise, **step_options)


@C.binds(ddpm_step)
def _bind_ddpm_step(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, *, variance_type,
                    **step_options):
    tail = _plain_step_tail(sample, timestep, prev_timestep, **step_options)
    if tail is None:
        return None
    op = _ops().ddpm_step_cuda.default
    prediction, clip_sample, clip_sample_range, guidance_scale = tail
    options = (VARIANCE_CODES[variance_type], prediction, clip_sample, clip_sample_range, None, guidance_scale)

    def launch(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep):
        return op(model_output, sample, noise, alphas_cumprod, None, timestep, None, prev_timestep, *options)
    return launch


def _plain_step_tail(sample: torch.Tensor, timestep, prev_timestep, *, prediction_type: str, clip_sample: bool,
                     clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
                     sample_max_value: float, guidance_scale: Optional[float], guidance_rescale: float = 0.0):
    """The step binders' shared part: for a one-launch step (``_common.one_launch_step``), ``(prediction code,
    clip_sample, clip_sample_range, guidance_scale)`` as the ops take them; None for any other call (then
    ``_run_step`` runs it)."""
    if not C.one_launch_step(sample, timestep, prev_timestep, thresholding=thresholding,
                             guidance_scale=guidance_scale, guidance_rescale=guidance_rescale):
        return None
    return PREDICTION_CODES[prediction_type], clip_sample, clip_sample_range, guidance_scale


def _run_step(launch: Callable[..., Tuple[torch.Tensor, torch.Tensor]], noise: Optional[torch.Tensor], *,
              prediction_type: str, clip_sample: bool, clip_sample_range: float, thresholding: bool,
              dynamic_thresholding_ratio: float, sample_max_value: float, guidance_scale: Optional[float],
              guidance_rescale: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs a step op through ``launch(noise, prediction_code, clip_sample, clip_sample_range, threshold_scale,
    guidance_scale, x0_only, *rescale)``, which calls it with the family's own arguments in place; ``rescale`` is
    empty without the guidance rescale, else ``(guidance_rescale, keep, rescale_factor)``.

    With ``thresholding`` the per-sample scale needs the unclipped x0 first: an ``x0_only`` launch (no noise, no
    clipping) writes it as float32 ``[B, n]``, ``_common.dynamic_threshold_scale`` reduces it to s (float32
    ``[B]``) and the step runs with s. With the guidance rescale that launch also returns the rescale's factor,
    which the step then takes instead of computing it again."""
    prediction = PREDICTION_CODES[prediction_type]
    rescaled = guidance_scale is not None and guidance_rescale != 0
    keep = 1 - guidance_rescale
    scale = factor = None
    if thresholding:
        x0, factor = launch(None, prediction, False, clip_sample_range, None, guidance_scale, True,
                            *((guidance_rescale, keep, None) if rescaled else ()))
        scale = C.dynamic_threshold_scale(x0, dynamic_thresholding_ratio, sample_max_value)
    return launch(noise, prediction, clip_sample, clip_sample_range, scale, guidance_scale, False,
                  *((guidance_rescale, keep, factor) if rescaled else ()))


def _param(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if p is None else p.contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


@C.float64_runs_reference(group_norm_silu_forward_reference, dtype_from=0)
def group_norm_silu_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            num_groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's contract (the op takes ``(N, C, *)`` NCHW or channels-last tensors as they are)."""
    return _ops().group_norm_silu_fwd_cuda(x, _param(weight), _param(bias), num_groups, eps)


@C.binds(group_norm_silu_forward)
def _bind_group_norm_silu_forward(x, weight, bias, num_groups, eps):
    if x.dtype == torch.float64 or not all(p is None or p.is_contiguous() for p in (weight, bias)):
        return None
    return _ops().group_norm_silu_fwd_cuda.default


@C.float64_runs_reference(group_norm_silu_backward_reference, dtype_from=1)
def group_norm_silu_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, num_groups: int
                             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    if not _same_strides(grad_out, x):
        # The contract hands grad_out in x's strides; keep the kernels' invariant if a caller does not.
        grad_out = torch.empty_like(x).copy_(grad_out)
    dx, dweight, dbias = _ops().group_norm_silu_bwd_cuda(
        grad_out, x, _param(weight), _param(bias), mean.float().contiguous(), rstd.float().contiguous(), num_groups)
    return dx, (dweight if weight is not None else None), (dbias if bias is not None else None)


# ----------------------------------------------------------------------------------------------------------
# Flow matching (csrc/flow_match.cu): the Euler step, one kernel, or three launches with the guidance rescale
# (a moments pass over the model output, their merge into std(cond) / std(v) per sample, the step); the forward
# process, one kernel.

from diffkern.ops.flow_add_noise import flow_add_noise_reference  # noqa: E402
from diffkern.ops.flow_match import flow_match_step_reference  # noqa: E402


def _sigma_pair(sigma) -> Tuple[Optional[torch.Tensor], float]:
    """The ops' ``Tensor? sigma, float host_sigma``: a python float (float32-exact, shared by the batch: a kernel
    argument) as ``(None, value)``, a float32 ``[1 or B]`` tensor as ``(tensor, 0.0)``."""
    if type(sigma) is float:
        return None, sigma
    return sigma, 0.0


def _flow_step_launch(*, guidance_scale: Optional[float], guidance_rescale: float, stochastic: bool) -> Callable:
    """``launch(model_output, sample, noise, sigma, sigma_next)``: the op's overload with the options prebuilt."""
    op = _ops().flow_match_step_cuda.default
    options = (guidance_scale, guidance_rescale, 1 - guidance_rescale, stochastic)

    def launch(model_output, sample, noise, sigma, sigma_next):
        return op(model_output, sample, noise if stochastic else None, *_sigma_pair(sigma), *_sigma_pair(sigma_next),
                  *options)
    return launch


@C.float64_runs_reference(flow_match_step_reference, dtype_from=1)
def flow_match_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                    sigma, sigma_next, **options) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flow_match_step_reference``'s contract (sigmas python floats or float32 ``[1 or B]`` tensors; ``options``:
    its keyword options)."""
    return _flow_step_launch(**options)(model_output, sample, noise, sigma, sigma_next)


@C.binds(flow_match_step)
def _bind_flow_match_step(model_output, sample, noise, sigma, sigma_next, **options):
    return None if sample.dtype == torch.float64 else _flow_step_launch(**options)


def _flow_add_noise_launch() -> Callable:
    """``launch(original_samples, noise, sigma)``: the op's overload, looked up once."""
    op = _ops().flow_add_noise_cuda.default

    def launch(original_samples, noise, sigma):
        return op(original_samples, noise, *_sigma_pair(sigma))
    return launch


@C.float64_runs_reference(flow_add_noise_reference, dtype_from=0)
def flow_add_noise(original_samples: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``flow_add_noise_reference``'s contract (sigma a python float or a float32 ``[1 or B]`` tensor)."""
    return _flow_add_noise_launch()(original_samples, noise, sigma)


@C.binds(flow_add_noise)
def _bind_flow_add_noise(original_samples, noise, sigma):
    return None if original_samples.dtype == torch.float64 else _flow_add_noise_launch()
