"""A sampling loop that stays on the device: DDIM or DDPM over a table of timesteps, or flow-matching Euler steps over
a sigma schedule, optionally as a CUDA graph.

:func:`sample` runs, for ``i = 0 .. n-1`` over a strictly descending timestep tensor ``ts`` of length n::

    t, t_prev = ts[i], prev_ts[i]
    out       = model_fn(x, t)                       # model_fn(cat([x, x]), t) with guidance_scale
    x         = ddim_step / ddpm_step(out, t, x, prev_timestep=t_prev, ...).prev_sample

The previous timesteps ``prev_ts`` are those of the diffusers scheduler whose loop this replaces, unless given:

- DDIM (``DDIMScheduler.step``): ``t - T // n`` for every entry, with T the table's length (the training
  timesteps) and n = len(ts). For "leading" spacing that is the next entry; for "trailing" and "linspace" it is
  not, and diffusers steps there all the same, so this does too. A negative value means "past the last step"
  (abar_prev = ``final_alpha_cumprod``).
- DDPM (``DDPMScheduler.previous_timestep``): the next entry, -1 after the last.

Pass ``prev_timesteps`` to step elsewhere, e.g. ``torch.cat([ts[1:], ts.new_tensor([-1])])`` for DDIM to the next
scheduled timestep.

``method="flow_euler"`` runs ``x = flow_match_step(model_fn(x, t_i), x, sigmas[i], sigmas[i + 1]).prev_sample`` over
a schedule of n + 1 sigmas (a diffusers ``FlowMatchEulerDiscreteScheduler``'s ``sigmas``, the terminal one included),
with t_i = ``timesteps[i]`` (the scheduler's ``timesteps``, what the transformer takes) or, without ``timesteps``,
sigmas[i]: n steps, no ``alphas_cumprod``.

Everything the loop indexes (the timesteps, their successors, the abar table, the sigmas) is moved to the samples'
device once, before the first step; each step then picks its timestep with a device-side index, so the host never
waits for the device: no ``.item()``, no Python comparison of device values. That is also what makes the loop
capturable as a CUDA graph (``capture=True``).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from diffkern import backends
from diffkern.ops import _common as C
from diffkern.ops.ddim import ddim_step
from diffkern.ops.ddpm import ddpm_step
from diffkern.ops.flow_match import flow_match_step

METHODS = ("ddim", "ddpm", "flow_euler")

# The step options each method takes through ``**step_options``; the loop itself owns timestep, prev_timestep,
# noise, generator, eta, guidance_scale, guidance_rescale and backend.
STEP_OPTIONS = {
    "ddim": ("prediction_type", "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
             "sample_max_value", "use_clipped_model_output", "final_alpha_cumprod"),
    "ddpm": ("variance_type", "prediction_type", "clip_sample", "clip_sample_range", "thresholding",
             "dynamic_thresholding_ratio", "sample_max_value"),
    "flow_euler": (),
}

# Eager runs before capture, so that lazily created state (cuBLAS/cuDNN handles, Triton compilation and
# autotuning, allocator pools) exists before the graph records the kernels.
_CAPTURE_WARMUP_RUNS = 3

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample(model_fn: ModelFn, x_T: torch.Tensor, alphas_cumprod: Optional[torch.Tensor] = None,
           timesteps: Optional[torch.Tensor] = None, *, method: str = "ddim", eta: float = 0.0,
           guidance_scale: Optional[float] = None, generator: Optional[torch.Generator] = None, capture: bool = False,
           backend: str = "auto", prev_timesteps: Optional[torch.Tensor] = None,
           sigmas: Optional[torch.Tensor] = None, stochastic: bool = False, guidance_rescale: float = 0.0,
           **step_options) -> torch.Tensor:
    """Denoise ``x_T`` along ``timesteps`` with DDIM or DDPM steps, or along ``sigmas`` with flow-matching Euler
    steps; returns the final sample x_0.

    Args:
        model_fn: ``model_fn(x, t) -> output``. ``x`` is ``[B, ...]`` in ``x_T``'s dtype (``[2B, ...]``, the
            batch twice, with ``guidance_scale``); ``t`` is a 0-d int64 tensor on ``x_T``'s device, shared by
            the batch. The output is ``x``'s shape (``[B or 2B, 2C, ...]`` for DDPM's learned variance types),
            dtype and device. Wrap a diffusers model as ``lambda x, t: unet(x, t).sample``.
        x_T: the initial noise ``[B, C, ...]``, float16/bfloat16/float32/float64.
        alphas_cumprod: the abar table ``[T]`` (any float dtype, CPU or ``x_T``'s device); copied to the device
            once, in float32 (float64 for float64 samples).
        timesteps: strictly descending 1-D integer tensor of values in ``[0, T)``, e.g. a diffusers scheduler's
            ``timesteps``. Order and range are checked when it is on the CPU; a device tensor is trusted (reading
            it would stall the host).
        method: ``"ddim"`` (:func:`diffkern.ddim_step`), ``"ddpm"`` (:func:`diffkern.ddpm_step`) or
            ``"flow_euler"`` (:func:`diffkern.flow_match_step`; ``alphas_cumprod`` must be None, ``sigmas`` given,
            ``timesteps`` optional: any 1-D float or integer tensor of n model times, default ``sigmas[:-1]``).
        eta: DDIM's noise weight (0: deterministic). Must be 0 for DDPM.
        guidance_scale: classifier-free guidance, fused into the step. Convention: ``model_fn`` receives
            ``cat([x, x])`` and returns the unconditional prediction for the first B samples and the conditional
            one for the last B (it supplies the two conditionings itself, e.g. ``cat([uncond_emb, cond_emb])``);
            the step uses ``uncond + guidance_scale * (cond - uncond)``.
        generator: draws the step noise (DDIM with eta > 0, DDPM) like diffusers does. A generator on
            ``x_T``'s device keeps the loop free of host round trips; a CPU generator reproduces diffusers' CPU
            draws but copies each step's noise to the device. ``capture=True`` needs a CUDA generator (or None:
            the default CUDA generator).
        capture: run the loop as a CUDA graph (CUDA tensors only). One step is captured, with the step index
            in a device counter that the graph advances, and replayed n times; ``model_fn`` must be capturable
            (no host syncs, no CPU tensors, no data-dependent Python control flow). See the notes below.
        backend: ``auto``, ``reference``, ``triton`` or ``cuda`` for the step ops.
        prev_timesteps: the timestep each step goes to, a 1-D integer tensor like ``timesteps`` (negative: past
            the last step). Default: the rule of the diffusers scheduler of ``method`` (module docstring).
        sigmas: flow_euler's schedule, a 1-D float tensor of n + 1 noise levels in [0, 1] (checked when on the
            CPU), e.g. a ``FlowMatchEulerDiscreteScheduler``'s ``sigmas`` after ``set_timesteps``.
        stochastic: flow_euler's stochastic sampling (re-noising x0 with fresh noise each step, diffusers'
            ``stochastic_sampling``), drawn with ``generator``.
        guidance_rescale: the std rescale of the guided model output (diffusers' ``rescale_noise_cfg``, as the
            SDXL and SD3 pipelines apply it; needs ``guidance_scale``), for every method: the guided noise, v or
            sample prediction (ddim, ddpm), the guided velocity (flow_euler).
        **step_options: passed to the step (none for flow_euler): DDIM ``prediction_type``, ``clip_sample``, ``clip_sample_range``,
            ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``, ``use_clipped_model_output``,
            ``final_alpha_cumprod``; DDPM ``variance_type`` and the same x0 options. Defaults are the ops'.

    Returns:
        The final sample, ``x_T``'s shape and dtype (its memory format is the step ops' choice: channels_last
        survives when the model output is channels_last too).

    Noise and determinism: the eager loop draws each step's noise with ``generator`` in step order. With a
    device timestep the DDPM step cannot tell on the host whether t = 0, so it also draws (and zero-weights)
    noise on the last step: the samples equal diffusers', the generator simply ends one draw further. Under
    ``capture=True`` the noise is generated *inside* the graph from ``generator``'s Philox state: CUDA graphs
    register the generator and each replay advances its offset by one step's draws, so replay i draws exactly
    what eager step i draws from the same starting state, and the captured result equals the eager one. The
    warm-up runs draw from a clone of the generator, so they do not advance it. Pre-drawn noise would also work
    but costs n noise tensors of memory; drawing in the graph costs nothing.

    The eager loop runs in the caller's autograd mode (sampling can be differentiated through); the captured
    loop runs under ``torch.no_grad()``. Setting up a capture synchronises the device once (CUDA graphs require
    it); the replays do not.
    """
    if method == "flow_euler":
        return _sample_flow(model_fn, x_T, alphas_cumprod, timesteps, sigmas, eta=eta, guidance_scale=guidance_scale,
                            guidance_rescale=guidance_rescale, stochastic=stochastic, generator=generator,
                            capture=capture, backend=backend, prev_timesteps=prev_timesteps,
                            step_options=step_options)
    if sigmas is not None or stochastic:
        raise ValueError(f"sigmas and stochastic are options of method='flow_euler', not of method={method!r}")
    _validate(model_fn, x_T, alphas_cumprod, timesteps, method, eta, guidance_scale, generator, capture, backend,
              prev_timesteps, step_options)
    guidance_rescale = C.check_guidance_rescale(guidance_rescale, guidance_scale)
    device = x_T.device
    table = C.prepare_table(alphas_cumprod, x_T)
    ts = timesteps.to(device=device, dtype=torch.int64)
    if prev_timesteps is not None:
        prevs = prev_timesteps.to(device=device, dtype=torch.int64)
    elif method == "ddim":
        prevs = ts - alphas_cumprod.numel() // ts.numel()
    else:  # the successor of each entry, -1 after the last
        prevs = torch.cat([ts[1:], ts.new_full((1,), -1)])
    guided = guidance_scale is not None
    guidance = float(guidance_scale) if guided else None
    eta = float(eta)

    def step(x: torch.Tensor, t: torch.Tensor, prev: torch.Tensor, gen: Optional[torch.Generator]) -> torch.Tensor:
        out = _model_output(model_fn, x, t, guided)
        if method == "ddim":
            return ddim_step(out, t, x, table, prev_timestep=prev, eta=eta, generator=gen, guidance_scale=guidance,
                             guidance_rescale=guidance_rescale, backend=backend, **step_options).prev_sample
        return ddpm_step(out, t, x, table, prev_timestep=prev, generator=gen, guidance_scale=guidance,
                         guidance_rescale=guidance_rescale, backend=backend, **step_options).prev_sample

    return _run_loop(step, x_T, (ts, prevs), generator, capture)


def _model_output(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
    """``model_fn`` on ``x`` (twice over, ``cat([x, x])``, with guidance), its output checked to be a tensor."""
    out = model_fn(torch.cat([x, x]) if guided else x, t)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model_fn must return a torch.Tensor, got {type(out).__name__}"
                        " (for a diffusers model use lambda x, t: unet(x, t).sample)")
    return out


def _run_loop(step, x_T: torch.Tensor, schedule: Tuple[torch.Tensor, ...], generator: Optional[torch.Generator],
              capture: bool) -> torch.Tensor:
    """``x = step(x, *(s[i] for s in schedule), generator)`` for every i, eagerly or as a CUDA graph; the schedule's
    tensors are on ``x_T``'s device and of one length."""
    if capture:
        return _sample_captured(step, x_T, schedule, generator)
    x = x_T
    for i in range(schedule[0].numel()):
        # Indexing with a Python int is a view of the device tensor: no transfer, no sync.
        x = step(x, *(s[i] for s in schedule), generator)
    return x


def _sample_flow(model_fn, x_T, alphas_cumprod, timesteps, sigmas, *, eta, guidance_scale, guidance_rescale,
                 stochastic, generator, capture, backend, prev_timesteps, step_options) -> torch.Tensor:
    """``sample(method="flow_euler")``: validation, then the loop over (t_i, sigmas[i], sigmas[i + 1])."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    C.check_tensor("x_T", x_T)
    device = x_T.device
    if alphas_cumprod is not None or prev_timesteps is not None:
        raise ValueError("method='flow_euler' steps along sigmas: alphas_cumprod and prev_timesteps must be None")
    if step_options:
        raise TypeError(f"unexpected step option(s) {sorted(step_options)} for method='flow_euler'")
    C.check_float("eta", eta, low=0.0)
    if eta != 0:
        raise ValueError(f"eta applies to method='ddim' only; method='flow_euler' got eta={eta} "
                         "(its stochastic sampling is stochastic=True)")
    if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point():
        raise TypeError("method='flow_euler' needs sigmas, a 1-D floating-point torch.Tensor of n + 1 noise levels")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries (n steps need n + 1), got shape "
                         f"{tuple(sigmas.shape)}")
    if sigmas.device.type != "cpu" and sigmas.device != device:
        raise ValueError(f"sigmas must be on the CPU or on x_T's device {device}, got {sigmas.device}")
    if sigmas.device.type == "cpu":
        bad = ~(torch.isfinite(sigmas) & (sigmas >= 0) & (sigmas <= 1))
        if bool(bad.any()):
            raise ValueError(f"sigmas must be finite and in [0, 1], got {sigmas.tolist()}")
    steps = sigmas.numel() - 1
    if timesteps is not None:
        if not isinstance(timesteps, torch.Tensor) or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise TypeError("timesteps must be a 1-D real torch.Tensor (the model's time input per step) or None")
        if tuple(timesteps.shape) != (steps,):
            raise ValueError(f"timesteps must have shape ({steps},), one per step of sigmas, got "
                             f"{tuple(timesteps.shape)}")
    guided = guidance_scale is not None
    if guided:
        guidance_scale = C.check_float("guidance_scale", guidance_scale)
    guidance_rescale = C.check_guidance_rescale(guidance_rescale, guidance_scale)
    C.check_bool("stochastic", stochastic)
    C.check_generator(generator, noise=None)
    C.check_bool("capture", capture)
    backends.resolve("flow_match_step", backend, device)
    if capture:
        _check_capturable(x_T, generator)
    dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    levels = sigmas.to(device=device, dtype=dtype)
    model_times = levels[:-1] if timesteps is None else timesteps.to(device)

    def step(x, t, sigma, sigma_next, gen):
        out = _model_output(model_fn, x, t, guided)
        return flow_match_step(out, x, sigma, sigma_next, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, stochastic=stochastic, generator=gen,
                               backend=backend).prev_sample

    return _run_loop(step, x_T, (model_times, levels[:-1], levels[1:]), generator, capture)


def _sample_captured(step, x_T: torch.Tensor, schedule: Tuple[torch.Tensor, ...],
                     generator: Optional[torch.Generator]) -> torch.Tensor:
    """Captures one step that reads its schedule entries (each ``schedule`` tensor at the step index) through a
    device counter and advances it, then replays it once per entry. ``static_x`` (allocated outside the graph's
    pool, so safe to return) is the graph's input and output."""
    device = x_T.device
    default_gen = torch.cuda.default_generators[device.index]
    gen = default_gen if generator is None else generator
    static_x = x_T.clone()
    counter = torch.zeros(1, dtype=torch.int64, device=device)

    steps = schedule[0].numel()

    def body(step_gen: torch.Generator) -> None:
        # index_select with a device index: a gather kernel, capturable (unlike reading the index on the host).
        entries = [s.index_select(0, counter).reshape(()) for s in schedule]
        static_x.copy_(step(static_x, *entries, step_gen))
        counter.add_(1)

    # (x_T's device made current, and the capture on a stream of it: torch.cuda.graph's default capture stream
    # belongs to whichever device was current when it was first made, and the ops launch on their tensors'.)
    with torch.no_grad(), torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # A clone draws the same numbers without advancing the caller's generator.
            warm_gen = gen.clone_state()
            for _ in range(min(_CAPTURE_WARMUP_RUNS, steps)):
                body(warm_gen)
        torch.cuda.current_stream(device).wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        if gen is not default_gen:
            # The default CUDA generator is registered by the capture itself; any other must be registered so
            # that each replay advances its Philox offset.
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph, stream=side):
            body(gen)
        # Capturing records the kernels without running them; undo the warm-up runs' effect on the buffers.
        static_x.copy_(x_T)
        counter.zero_()
        for _ in range(steps):
            graph.replay()
    return static_x


def _validate(model_fn, x_T, alphas_cumprod, timesteps, method, eta, guidance_scale, generator, capture, backend,
              prev_timesteps, step_options) -> None:
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    C.check_choice("method", method, METHODS)
    C.check_tensor("x_T", x_T, ndim_min=2 if method == "ddpm" else 1)
    num_train = C.check_table(alphas_cumprod, x_T.device)
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timesteps must be a 1-D integer torch.Tensor, got {type(timesteps).__name__}")
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must have an integer dtype, got {timesteps.dtype}")
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be 1-D and non-empty, got shape {tuple(timesteps.shape)}")
    if timesteps.device.type == "cpu":
        values = timesteps.to(torch.int64)
        if bool((values < 0).any()) or bool((values >= num_train).any()):
            raise ValueError(f"timesteps must lie in [0, {num_train - 1}] (alphas_cumprod has {num_train} entries), "
                             f"got {values.tolist()} (a diffusers schedule ending in -1, from 'trailing' spacing, "
                             "has one step too many: pass timesteps[timesteps >= 0])")
        if values.numel() > 1 and not bool((values[1:] < values[:-1]).all()):
            raise ValueError(f"timesteps must be strictly descending, got {values.tolist()}")
    if prev_timesteps is not None:
        if not isinstance(prev_timesteps, torch.Tensor) or prev_timesteps.is_floating_point() \
                or prev_timesteps.is_complex() or prev_timesteps.dtype == torch.bool:
            raise TypeError("prev_timesteps must be a 1-D integer torch.Tensor or None")
        if tuple(prev_timesteps.shape) != tuple(timesteps.shape):
            raise ValueError(f"prev_timesteps must have timesteps' shape {tuple(timesteps.shape)}, "
                             f"got {tuple(prev_timesteps.shape)}")
        if prev_timesteps.device.type == "cpu" and bool((prev_timesteps.to(torch.int64) >= num_train).any()):
            raise ValueError(f"prev_timesteps must lie below {num_train} (alphas_cumprod has {num_train} entries), "
                             f"got {prev_timesteps.tolist()}")
    C.check_float("eta", eta, low=0.0)
    if method == "ddpm" and eta != 0:
        raise ValueError(f"eta applies to method='ddim' only; method='ddpm' got eta={eta}")
    if guidance_scale is not None:
        C.check_float("guidance_scale", guidance_scale)
    C.check_generator(generator, noise=None)
    C.check_bool("capture", capture)
    unknown = sorted(set(step_options) - set(STEP_OPTIONS[method]))
    if unknown:
        raise TypeError(f"unexpected step option(s) {unknown} for method={method!r}; "
                        f"accepted: {STEP_OPTIONS[method]}")
    backends.resolve(f"{method}_step", backend, x_T.device)
    if capture:
        _check_capturable(x_T, generator)


def _check_capturable(x_T: torch.Tensor, generator: Optional[torch.Generator]) -> None:
    if x_T.device.type != "cuda":
        raise ValueError(f"capture=True records a CUDA graph and needs CUDA tensors; x_T is on {x_T.device}")
    if generator is not None and not _same_cuda_device(generator.device, x_T.device):
        raise ValueError(f"capture=True draws noise inside the graph and needs a generator on x_T's device "
                         f"{x_T.device}, got one on {generator.device}")


def _same_cuda_device(a: torch.device, b: torch.device) -> bool:
    """Both CUDA and the same GPU (an index-less ``cuda`` means the current one)."""
    if a.type != "cuda" or b.type != "cuda":
        return False
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
