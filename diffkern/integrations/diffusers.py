"""diffusers schedulers whose ``step`` and ``add_noise`` run on diffkern's fused ops.

Swapping the scheduler of a pipeline is the whole change::

    from diffkern.integrations.diffusers import FusedDDIMScheduler
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)

``FusedFlowMatchEulerDiscreteScheduler`` (flow matching: SD3, FLUX, Wan, LTX) is at the end of this module; its
docstring says what it keeps of ``FlowMatchEulerDiscreteScheduler`` and where it deliberately differs (among them
diffusers' ``per_token_timesteps`` branch, whose stochastic step takes the wrong sign of x0). What follows is about
the DDIM and DDPM ones.

``FusedDDIMScheduler`` and ``FusedDDPMScheduler`` subclass ``DDIMScheduler`` and ``DDPMScheduler``: the same
config (it round-trips both ways through ``from_config``, ``save_config`` and ``from_pretrained``), the same
``set_timesteps``, ``scale_model_input`` and ``timesteps``, and ``step``/``add_noise`` with the parents'
signatures and return types. The config maps onto the ops' options one to one: ``prediction_type``,
``clip_sample``/``clip_sample_range``, ``thresholding``/``dynamic_thresholding_ratio``/``sample_max_value``,
DDIM's final abar (1.0 with ``set_alpha_to_one``, else abar[0]) and DDPM's ``variance_type``; betas, the beta
schedule and ``rescale_betas_zero_snr`` are already folded into the parent's ``alphas_cumprod``, which the ops
index (one float32 copy per device, cached; float64 for float64 samples). The previous timestep is the
parent's: DDIM ``t - N // n`` for every spacing, DDPM the next entry of ``timesteps`` after ``set_timesteps``
and ``t - 1`` before.

``backend`` (``auto``, ``reference``, ``triton``, ``cuda``) picks the implementation; it is a constructor and
``from_config`` keyword and an attribute, never part of the config.

Where the fused schedulers deliberately differ from diffusers 0.42:

- No host syncs. A timestep that is a device tensor (what iterating ``scheduler.timesteps`` yields after
  ``set_timesteps(n, device="cuda")``) is never read on the host: abar is gathered on the device, and DDPM's
  previous timestep comes from a lookup table built on the device at the first step after ``set_timesteps``
  (diffusers searches ``timesteps`` with ``.nonzero()`` and compares on the host, about 13 syncs per DDPM step
  and 6 per DDIM step). This also makes the step capturable in a CUDA graph and compilable.
- Per-sample timesteps: ``step`` accepts ``[B]`` timesteps (diffusers raises).
- DDPM with a device timestep cannot know on the host whether t = 0, so it also draws noise on the last step
  and gives it zero weight: the samples are diffusers', but the generator ends one draw further along.
- A DDPM timestep that is not in ``timesteps`` (diffusers raises an IndexError) steps to the largest scheduled
  timestep below it, or to -1.
- ``variance_type="fixed_large_log"`` uses the intended std sqrt(beta_t); diffusers takes the square root of
  log(beta_t) < 0 and returns NaN.
- float16/bfloat16: coefficients and arithmetic are float32 with one rounding of the result; diffusers rounds
  abar to the sample dtype first (in bfloat16 its ``add_noise`` adds no noise at all for small t). In float32
  the results agree to rounding.
- Dynamic thresholding selects the quantile with ``kthvalue``: same values as ``torch.quantile``, which
  diffusers uses, without its 16M-element limit.
- ``add_noise`` leaves ``self.alphas_cumprod`` where it is (the parent moves it to the samples' device).
- ``model_output`` must have the sample's dtype (diffusers silently promotes); a learned variance type needs a
  model output with 2C channels (diffusers fails later with a less helpful error).
- A step from a negative timestep returns the sample unchanged (as ``prev_sample`` and
  ``pred_original_sample``). diffusers' "trailing" spacing schedules a final timestep -1 for some step counts
  (61 is the smallest at N = 1000); the stock schedulers then index ``alphas_cumprod[-1]`` and re-"denoise" the
  finished sample at abar ~ 0. Every loop the stock schedulers run, the fused ones run; see ``_step_or_keep``.
- Options of a disabled mode are ignored, as diffusers ignores them (``sample_max_value`` with thresholding
  off, ``clip_sample_range`` with clipping off or with thresholding on); a value diffusers accepts for an
  enabled mode is accepted too (``sample_max_value`` below 1, ``clip_sample_range`` 0).
- Values are checked where they are on the host: a CPU ``alphas_cumprod`` (finite, in [0, 1]) and abar at host
  timesteps where the step divides by it (a zero-terminal-SNR table with epsilon prediction at its last
  timestep raises instead of returning NaN). Device values are never read.

``step`` and ``add_noise`` are differentiable in ``model_output``, ``sample`` (and the noise), like diffusers'.
A pipeline saved with a fused scheduler records it as ``["diffkern.integrations.diffusers", "Fused..."]`` in
``model_index.json`` and loads back with ``DiffusionPipeline.from_pretrained`` wherever diffkern is installed
(a pipeline class that converts its scheduler in ``__init__``, as ``DDIMPipeline`` does, converts it again).
Swap back (``DDIMScheduler.from_config(pipe.scheduler.config)``) before ``save_pretrained`` if the result must load
without diffkern.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Callable, Dict, Optional, Tuple, Union

import torch

try:
    # SchedulerMixin is imported for diffusers' loader, not for this module: a saved pipeline records this module
    # as the fused scheduler's library, and ``DiffusionPipeline.from_pretrained`` looks the loadable base classes
    # (SchedulerMixin among them) up in that module to find the class's loading method.
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin  # noqa: F401
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("diffkern.integrations.diffusers needs the diffusers package: "
                      "pip install diffkern[diffusers]") from exc

from diffkern import backends
from diffkern.ops.add_noise import add_noise as _add_noise
from diffkern.ops.ddim import ddim_step
from diffkern.ops.ddpm import LEARNED_VARIANCE_TYPES, ddpm_step, may_have_positive_timestep
from diffkern.ops.flow_add_noise import flow_add_noise
from diffkern.ops.flow_match import flow_match_step

__all__ = ["FusedDDIMScheduler", "FusedDDPMScheduler", "FusedFlowMatchEulerDiscreteScheduler"]

Timestep = Union[int, torch.Tensor]
GeneratorArg = Optional[Union[torch.Generator, list]]


def _timestep(name: str, value) -> Timestep:
    """A Python int for host values (ints, numpy integers, one-element CPU integer tensors: reading those costs
    no device sync), the tensor itself otherwise. The ops validate what is left and name ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor):
        is_int = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        if is_int and value.device.type == "cpu" and value.numel() == 1 and not torch.compiler.is_compiling():
            return int(value.reshape(()))
        return value.reshape(-1) if value.ndim > 1 else value
    raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}")


def _check_tensors(**tensors) -> None:
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _signature_with_backend(parent: type) -> inspect.Signature:
    """The parent's ``__init__`` signature plus a keyword-only ``backend``.

    diffusers reads the config keys a class accepts from ``inspect.signature(cls.__init__)``, so the subclass
    ``__init__`` (which takes ``*args, **kwargs``) must advertise the parent's parameters. ``backend`` is listed
    too, so ``from_config(config, backend=...)`` and ``from_pretrained(..., backend=...)`` pass it through; it
    never enters the config, which the parent's ``register_to_config`` builds from its own signature."""
    sig = inspect.signature(parent.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=str)
    return sig.replace(parameters=params + [backend] + var_kw)


class _BackendOption:
    """The ``backend`` attribute of the fused schedulers (a constructor and ``from_config`` keyword, never part of
    the config)."""

    @property
    def backend(self) -> str:
        """``auto``, ``reference``, ``triton`` or ``cuda``: the implementation the fused methods run on."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = backends.check_backend_name(value)


class _FusedSchedulerMixin(_BackendOption):
    """Per-device float32 abar tables, the ``backend`` attribute and the fused ``add_noise``."""

    def _init_fused(self, backend: str) -> None:
        self.backend = backend
        self._abar_source: Optional[torch.Tensor] = None
        self._abar_tables: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._lowest_scheduled = 0  # the parent's initial timesteps are arange(N) reversed

    def set_timesteps(self, *args, **kwargs) -> None:
        """The parent's ``set_timesteps``, which also notes on the host whether the schedule holds a negative
        timestep (see ``_step_or_keep``): the timesteps are built on the CPU, inspected there, then moved to
        ``device``, exactly as the parent moves them, so nothing is read back from a device."""
        bound = inspect.signature(super().set_timesteps).bind(*args, **kwargs)
        device = bound.arguments.pop("device", None)
        super().set_timesteps(*bound.args, **bound.kwargs)
        self._lowest_scheduled = int(self.timesteps.min()) if self.timesteps.numel() else 0
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    def _step_or_keep(self, step: Callable[[Timestep], Tuple[torch.Tensor, torch.Tensor]], t: Timestep,
                      sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``step(t)``, except that a sample whose timestep is negative is returned unchanged, as both
        ``prev_sample`` and ``pred_original_sample``.

        diffusers' "trailing" spacing schedules a final timestep -1 for some step counts (61 is the smallest with
        1000 training steps: the float ``arange`` yields one entry too many). The stock schedulers then index
        ``alphas_cumprod[-1]``, the noisiest entry, and "denoise" an already finished sample at abar ~ 0,
        amplifying the model's output by 1 / sqrt(abar_T). A timestep below 0 means "past the last step": the step
        before it has already reached the final abar, so the right step from there is none at all. The fused
        schedulers therefore run every loop the stock ones run, and leave that extra step's sample as it is.

        Host timesteps are read. A device timestep is not: when the schedule holds a negative entry (noted by
        ``set_timesteps``) the step runs at max(t, 0) and a select keeps the negative ones' samples (one more
        elementwise kernel, only for such schedules); otherwise nothing is added."""
        if isinstance(t, int):
            return (sample.clone(), sample.clone()) if t < 0 else step(t)
        if t.device.type == "cpu":
            maybe_negative = not torch.compiler.is_compiling() and bool((t < 0).any())
        else:
            maybe_negative = self._lowest_scheduled < 0
        if not maybe_negative:
            return step(t)
        prev_sample, x0 = step(t.clamp(min=0))
        past_the_end = (t < 0).to(sample.device).reshape(-1, *([1] * (sample.ndim - 1)))
        return torch.where(past_the_end, sample, prev_sample), torch.where(past_the_end, sample, x0)

    def _abar(self, like: torch.Tensor) -> torch.Tensor:
        """``alphas_cumprod`` on ``like``'s device, in float32 (float64 for float64 samples, as the ops want),
        copied there once. Rebuilt if the attribute is replaced (the parent's ``get_velocity`` moves it)."""
        if self._abar_source is not self.alphas_cumprod:
            self._abar_source, self._abar_tables = self.alphas_cumprod, {}
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (like.device, dtype)
        table = self._abar_tables.get(key)
        if table is None:
            table = self._abar_tables[key] = self.alphas_cumprod.to(device=like.device, dtype=dtype)
        return table

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        """The forward process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, fused (see
        :func:`diffkern.add_noise`): ``original_samples`` and ``noise`` ``[B, ...]`` of one dtype and device,
        ``timesteps`` an int, 0-d or ``[B]`` integer tensor. Coefficients are float32 for every sample dtype."""
        _check_tensors(original_samples=original_samples, noise=noise)
        t = _timestep("timesteps", timesteps)
        return _add_noise(original_samples, noise, t, self._abar(original_samples), backend=self.backend)


class FusedDDIMScheduler(_FusedSchedulerMixin, DDIMScheduler):
    """``DDIMScheduler`` with the step and ``add_noise`` fused (differences from diffusers: module docstring).

    >>> scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config, backend="triton")
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(backend)
        self._final_source: Optional[torch.Tensor] = None
        self._final_alpha_cumprod()  # read here, eagerly, so that a compiled step finds it cached

    __init__.__signature__ = _signature_with_backend(DDIMScheduler)

    def _final_alpha_cumprod(self) -> float:
        """``self.final_alpha_cumprod`` (a 0-d CPU tensor in diffusers) as a Python float, read once per tensor
        (at construction, and again only if the attribute is replaced), so that a step traced by
        ``torch.compile`` sees a constant instead of reading a tensor."""
        if self._final_source is not self.final_alpha_cumprod:
            self._final_source = self.final_alpha_cumprod
            self._final_value = float(self.final_alpha_cumprod)
        return self._final_value

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: Optional[bool] = False, generator: GeneratorArg = None,
             variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True) -> Union[DDIMSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One DDIM step from ``timestep`` to ``timestep - num_train_timesteps // num_inference_steps``.

        Args:
            model_output: ``[B, ...]``, the sample's dtype and device.
            timestep: int, 0-d or ``[B]`` integer tensor (host or device).
            sample: x_t ``[B, ...]``, float16/bfloat16/float32/float64.
            eta: noise weight (0: deterministic DDIM).
            use_clipped_model_output: re-derive epsilon from the clipped/thresholded x0.
            generator: a generator or a list of B generators (diffusers' ``randn_tensor``) for the eta > 0 noise.
            variance_noise: the eta > 0 noise itself, like ``sample`` (instead of ``generator``).
            return_dict: a ``DDIMSchedulerOutput`` if True, else ``(prev_sample, pred_original_sample)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        _check_tensors(model_output=model_output, sample=sample)
        t = _timestep("timestep", timestep)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            # diffusers' own draw (one randn of model_output's shape and dtype), so seeds reproduce its samples.
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        cfg = self.config

        def step_at(t: Timestep) -> Tuple[torch.Tensor, torch.Tensor]:
            return ddim_step(
                model_output, t, sample, self._abar(sample),
                prev_timestep=t - cfg.num_train_timesteps // self.num_inference_steps, eta=eta, noise=noise,
                prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample,
                clip_sample_range=cfg.clip_sample_range, thresholding=cfg.thresholding,
                dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio, sample_max_value=cfg.sample_max_value,
                # DDIMPipeline passes None for "not set"; diffusers only tests truthiness.
                use_clipped_model_output=bool(use_clipped_model_output),
                final_alpha_cumprod=self._final_alpha_cumprod(), backend=self.backend)

        prev_sample, x0 = self._step_or_keep(step_at, t, sample)
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class FusedDDPMScheduler(_FusedSchedulerMixin, DDPMScheduler):
    """``DDPMScheduler`` with the step and ``add_noise`` fused (differences from diffusers: module docstring)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(backend)
        self._prev_source: Optional[torch.Tensor] = None
        self._prev_tables: Dict[torch.device, torch.Tensor] = {}

    __init__.__signature__ = _signature_with_backend(DDPMScheduler)

    def _prev_table(self, device: torch.device) -> torch.Tensor:
        """int64 ``[T]``: entry t is the largest scheduled timestep below t, or -1. For a timestep in the
        strictly descending ``self.timesteps`` that is the next entry, i.e. diffusers' ``previous_timestep``.
        Built on the device of ``timesteps`` without a sync (a scatter and a cumulative max) the first time it is
        needed after ``timesteps`` changes, then copied once per device."""
        if self._prev_source is not self.timesteps:
            self._prev_source, self._prev_tables = self.timesteps, {}
        table = self._prev_tables.get(device)
        if table is None:
            num_train = self.config.num_train_timesteps
            scheduled = self.timesteps.to(torch.int64)
            marks = torch.full((num_train,), -1, dtype=torch.int64, device=scheduled.device)
            marks.scatter_(0, scheduled.clamp(0, num_train - 1), scheduled)
            at_or_below = torch.cummax(marks, dim=0).values
            strictly_below = torch.cat([marks.new_full((1,), -1), at_or_below[:-1]])
            table = self._prev_tables[device] = strictly_below.to(device)
        return table

    def _previous(self, t: Timestep, device: torch.device) -> Timestep:
        """diffusers' ``previous_timestep(t)``, on the device: ``t - 1`` until ``set_timesteps``, else a lookup."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1
        table = self._prev_table(device)
        last = table.numel() - 1
        if isinstance(t, int):
            return table[min(max(t, 0), last)]
        # index_select, not table[t]: Python indexing reads a 0-d index tensor on the host. Clamped like the ops
        # clamp their gathers; the step validates t itself.
        index = t.reshape(-1).to(device=device, dtype=torch.int64).clamp(0, last)
        return table.index_select(0, index).reshape(t.shape)

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator: GeneratorArg = None,
             return_dict: bool = True) -> Union[DDPMSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One DDPM ancestral step from ``timestep`` to the previous scheduled timestep.

        Args:
            model_output: ``[B, C, ...]``, or ``[B, 2C, ...]`` (prediction, then variance) for the ``learned`` and
                ``learned_range`` variance types; the sample's dtype and device.
            timestep: int, 0-d or ``[B]`` integer tensor (host or device).
            sample: x_t ``[B, C, ...]``, float16/bfloat16/float32/float64.
            generator: a generator or a list of B generators (diffusers' ``randn_tensor``).
            return_dict: a ``DDPMSchedulerOutput`` if True, else ``(prev_sample, pred_original_sample)``.
        """
        _check_tensors(model_output=model_output, sample=sample)
        t = _timestep("timestep", timestep)
        variance_type = self.variance_type
        if variance_type in LEARNED_VARIANCE_TYPES and sample.ndim >= 2 and model_output.ndim >= 2 \
                and model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"model_output must have 2 * {sample.shape[1]} channels (the prediction, then the "
                             f"variance) for variance_type={variance_type!r}, got shape {tuple(model_output.shape)}")
        device = sample.device
        noise = None
        if may_have_positive_timestep(t):
            # diffusers' own draw (one randn like the sample, in model_output's dtype), so seeds reproduce it.
            noise = randn_tensor(sample.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        cfg = self.config

        def step_at(t: Timestep) -> Tuple[torch.Tensor, torch.Tensor]:
            return ddpm_step(
                model_output, t, sample, self._abar(sample), prev_timestep=self._previous(t, device), noise=noise,
                variance_type=variance_type, prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample,
                clip_sample_range=cfg.clip_sample_range, thresholding=cfg.thresholding,
                dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio, sample_max_value=cfg.sample_max_value,
                backend=self.backend)

        prev_sample, x0 = self._step_or_keep(step_at, t, sample)
        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class FusedFlowMatchEulerDiscreteScheduler(_BackendOption, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` (SD3, FLUX, Wan, LTX, ...) whose ``step`` and ``scale_noise`` run on
    :func:`diffkern.flow_match_step` and :func:`diffkern.flow_add_noise`.

    The parent's config (it round-trips through ``from_config``, ``save_config`` and ``from_pretrained``),
    ``set_timesteps`` (shift, dynamic shifting with ``mu``, ``shift_terminal``, custom ``sigmas`` and ``timesteps``,
    the Karras/exponential/beta conversions, ``invert_sigmas``), ``timesteps``, ``sigmas``, ``set_begin_index`` and
    ``set_shift`` are the parent's; ``step`` and ``scale_noise`` keep its signatures and outputs.

    No host syncs: diffusers finds the first step's index with ``(timesteps == t).nonzero()`` and ``.item()`` (a
    sync whenever ``timesteps`` is on the device and the pipeline did not call ``set_begin_index``, as SD3's does
    not), and ``scale_noise`` does so for every timestep. Here the search runs on the device (the second match
    where there are several, as in diffusers), and ``step_index`` is a 0-d int64 tensor on the device of
    ``sigmas`` that each step advances there; sigma and sigma_next are gathered from ``sigmas`` with it, so the
    step never reads a device value and a whole loop runs without waiting for the device (and compiles with
    ``fullgraph=True`` without a recompilation per step). ``int(scheduler.step_index)`` reads it (one sync).

    Where it deliberately differs from diffusers 0.42:

    - Half precision: arithmetic in float32 with one rounding; diffusers multiplies (sigma_next - sigma) by the
      model output in the model output's dtype before adding it to the float32 sample. In float32 the results are
      diffusers' bit for bit. float64 samples are computed in float64 (diffusers computes them in float32).
    - The stochastic step's noise is drawn as diffusers draws it (a float32 normal of the sample's shape with
      ``generator``) and then rounded to the sample's dtype (diffusers adds it in float32).
    - ``model_output`` and ``sample`` of different dtypes are computed in the promoted dtype and returned in
      ``model_output``'s, as diffusers returns them (the fused kernel needs one dtype: two casts more).
    - A timestep that is not in ``timesteps`` raises diffusers' IndexError where both are on the host; with a device
      schedule it is not looked for on the host: the loop starts at index 0.
    - ``scale_noise`` computes sigma * noise + (1 - sigma) * x in float32 (diffusers first casts sigma to the
      sample's dtype: in bfloat16 a sigma of 0.999 becomes 1), and also takes a python float or 0-d timestep.
    - ``per_token_timesteps``: each token steps from its own sigma (timestep / N) to the largest scheduled sigma
      below it, as in diffusers, whose branch takes the model output as the *negated* velocity: it computes
      x + (sigma - sigma_next) * model_output, where the default branch computes x + (sigma_next - sigma) * v, and
      both of its callers (``LTXConditionPipeline``, ``SanaWMPipeline``) pass ``-noise_pred``. The deterministic
      per-token step is therefore right for its callers and is matched bit for bit. The stochastic one is not
      right: diffusers takes x0 = x - sigma * model_output, which with the callers' negated velocity is
      x + sigma * v (the default branch, given v, takes x - sigma * v). Here the per-token x0 is
      x + sigma * model_output = x - sigma * v, consistently with the deterministic per-token step, so a stochastic
      per-token step given -v equals the default stochastic step given v. As in diffusers, the per-token output is
      float32.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    __init__.__signature__ = _signature_with_backend(FlowMatchEulerDiscreteScheduler)

    def _schedule_indices(self, timestep) -> torch.Tensor:
        """The index of each timestep in ``self.timesteps`` (int64 ``[k]`` on its device): diffusers'
        ``index_for_timestep`` (the second match where there are several), found on the device without a sync; on
        the host (schedule and timesteps on the CPU, outside tracing) with diffusers' own lookup and its errors."""
        schedule = self.timesteps
        if isinstance(timestep, torch.Tensor):
            values = timestep.reshape(-1)
        else:
            values = torch.full((1,), float(timestep), dtype=schedule.dtype)
        if schedule.device.type == "cpu" and values.device.type == "cpu" and not torch.compiler.is_compiling():
            return torch.tensor([self.index_for_timestep(t, schedule) for t in values], dtype=torch.int64)
        if not isinstance(timestep, torch.Tensor):
            values = torch.full((1,), float(timestep), dtype=schedule.dtype, device=schedule.device)
        matches = schedule[None, :] == values.to(schedule.device)[:, None]
        rank = matches.cumsum(dim=1)
        wanted = torch.where(matches.sum(dim=1, keepdim=True) > 1, 2, 1)
        return (matches & (rank == wanted)).to(torch.int32).argmax(dim=1)

    def _init_step_index(self, timestep) -> None:
        """The parent's start: ``begin_index`` if set, else the index of ``timestep``; kept as a 0-d int64 tensor on
        the device of ``sigmas`` (a fill kernel or a device search: no sync)."""
        device = self.sigmas.device
        if self.begin_index is None:
            self._step_index = self._schedule_indices(timestep).reshape(()).to(device)
        else:
            self._step_index = torch.full((), int(self._begin_index), dtype=torch.int64, device=device)

    def _step_index_tensor(self) -> torch.Tensor:
        """``step_index`` as an int64 ``[1]`` tensor on the device of ``sigmas`` (a pipeline may have set an int)."""
        index = self._step_index
        if not isinstance(index, torch.Tensor):
            index = torch.full((), int(index), dtype=torch.int64, device=self.sigmas.device)
        return index.reshape(1).to(device=self.sigmas.device, dtype=torch.int64)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The forward process sigma * noise + (1 - sigma) * sample (:func:`diffkern.flow_add_noise`), with sigma the
        schedule's at ``timestep`` (one per sample, or one for all) as the parent finds it: at the timesteps' indices,
        or at ``step_index`` once stepping has begun (inpainting), or at ``begin_index`` (img2img)."""
        _check_tensors(sample=sample)
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        count = timestep.reshape(-1).shape[0] if isinstance(timestep, torch.Tensor) else 1
        if self.begin_index is None:
            index = self._schedule_indices(timestep)
        elif self.step_index is not None:
            index = self._step_index_tensor().expand(count)
        else:
            index = torch.full((count,), int(self.begin_index), dtype=torch.int64)
        sigma = self.sigmas.index_select(0, index.to(self.sigmas.device))
        return flow_add_noise(sample, noise, sigma if sigma.numel() > 1 else sigma.reshape(()),
                              backend=self.backend)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True) -> Union[FlowMatchEulerDiscreteSchedulerOutput, Tuple[torch.Tensor]]:
        """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]`` (or, with
        ``per_token_timesteps``, per token; see the class docstring), stochastic with the config's
        ``stochastic_sampling``. ``s_churn``, ``s_tmin``, ``s_tmax`` and ``s_noise`` are accepted and ignored, as
        diffusers ignores them.

        Args:
            model_output: the velocity, the sample's shape, on its device.
            timestep: one of ``timesteps`` (a float or a float tensor, host or device); integers raise, as in
                diffusers.
            sample: x ``[B, ...]``, float16/bfloat16/float32/float64.
            generator: draws the stochastic step's noise (diffusers' ``randn_tensor``: a generator or a list).
            per_token_timesteps: ``[B, T]`` timesteps of the tokens of a ``[B, T, C]`` sample (any shape that
                broadcasts against the sample without its last dimension).
            return_dict: a ``FlowMatchEulerDiscreteSchedulerOutput`` if True, else ``(prev_sample,)``.
        """
        if isinstance(timestep, (bool, numbers.Integral)) or (
                isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass one of "
                             "the `scheduler.timesteps` as a timestep.")
        _check_tensors(model_output=model_output, sample=sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        stochastic = bool(self.config.stochastic_sampling)
        noise = None
        if stochastic:
            # diffusers' own draw (the sample upcast to float32), so seeds reproduce its samples.
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        index = self._step_index_tensor()
        if per_token_timesteps is None:
            sigma = self.sigmas.index_select(0, index)
            sigma_next = self.sigmas.index_select(0, index + 1)
            prev_sample = self._euler(model_output, sample, sigma, sigma_next, noise, model_output.dtype)
        else:
            prev_sample = self._per_token_step(model_output, sample, per_token_timesteps, noise)
        self._step_index = (index + 1).reshape(())
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def _euler(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
               noise: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """The fused step in one dtype (the promoted one of the two inputs), returned in ``out_dtype``."""
        dtype = torch.promote_types(model_output.dtype, sample.dtype)
        model_output, sample = model_output.to(dtype), sample.to(dtype)
        noise = None if noise is None else noise.to(dtype)
        prev = flow_match_step(model_output, sample, sigma, sigma_next, stochastic=noise is not None, noise=noise,
                               backend=self.backend).prev_sample
        return prev.to(out_dtype)

    def _per_token_step(self, model_output: torch.Tensor, sample: torch.Tensor, per_token_timesteps: torch.Tensor,
                        noise: Optional[torch.Tensor]) -> torch.Tensor:
        """diffusers' per-token branch (class docstring), each token a sample of the op: float32 output."""
        _check_tensors(per_token_timesteps=per_token_timesteps)
        if sample.ndim < 2:
            raise ValueError(f"per_token_timesteps needs a sample of tokens [..., C], got shape {tuple(sample.shape)}")
        token_sigmas = per_token_timesteps / self.config.num_train_timesteps
        sigmas = self.sigmas.to(token_sigmas.device).reshape(-1, *([1] * token_sigmas.ndim))
        lower = ((sigmas < token_sigmas[None] - 1e-6) * sigmas).max(dim=0).values
        rows = sample.shape[:-1]
        try:
            current = token_sigmas.expand(rows).reshape(-1)
            below = lower.expand(rows).reshape(-1)
        except RuntimeError as exc:
            raise ValueError(f"per_token_timesteps of shape {tuple(per_token_timesteps.shape)} does not broadcast "
                             f"against the tokens {tuple(rows)} of the sample") from exc
        channels = sample.shape[-1]
        x = sample.float().reshape(-1, channels)
        v = model_output.float().reshape(-1, channels)
        if noise is None:
            # x + (sigma - sigma_next) model_output: the op's step from sigma_next to sigma.
            prev = flow_match_step(v, x, below, current, backend=self.backend).prev_sample
        else:
            z = noise.float().reshape(-1, channels)
            prev = flow_match_step(-v, x, current, below, stochastic=True, noise=z, backend=self.backend).prev_sample
        return prev.reshape(sample.shape)
