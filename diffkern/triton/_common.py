"""Launch helpers and device functions shared by the Triton step kernels (add_noise, DDIM, DDPM).

Layout. The backend contract (``diffkern.ops._common``) hands these kernels batch-outer dense tensors with
identical strides, so sample ``b`` of every tensor is the contiguous storage run ``[b*n, (b+1)*n)`` with
``n = numel // B``, whatever the memory format (NCHW, channels_last, ...). The kernels treat them as flat
buffers and write into ``torch.empty_like(sample)``, which keeps the layout.

Grid. One 1-D grid of ``B * cdiv(n, BLOCK)`` programs; program ``p`` handles block ``p % blocks_per_sample`` of
sample ``p // blocks_per_sample``, so it has a single sample and gathers that sample's coefficients once, as
scalars. (A 2-D ``(blocks, B)`` grid would cap the batch at CUDA's 65535 limit on grid dimension y.) All
element offsets are int64, so tensors past 2^31 elements index correctly.

Timesteps. Each timestep argument is a python int (shared by the batch, range-checked by the public op; a
negative previous timestep means "before the first step") or an int64 ``[1 or B]`` tensor on the samples'
device. The kernels take it as ``(ptr, stride, host)`` and a constexpr ``*_ON_HOST`` (``timestep_args``): a
host int is a kernel argument (no fill kernel, no load; the ptr is the table, unused), a tensor is gathered per
sample. Host values are not specialised on (``do_not_specialize``): a sampling loop compiles once.

Numerics. Per-sample coefficients are computed in the kernel in fp32, once per program, in diffusers' operation
order; every sqrt and division is correctly rounded (``sqrt_rn``/``div_rn``: a few extra instructions in
memory-bound kernels) and kernels are launched with FMA contraction off, so that every operation rounds as in
the PyTorch reference. This matters more than it looks: epsilon prediction at large t computes
x0 = (x - sqrt(1-a) eps) / sqrt(a) with sqrt(a) ~ 1e-2, which turns a one-ulp difference in the subtraction
into an absolute error of ~1e-5.

float64. fp64 inputs run the reference math (same results, unfused passes). fp64 is a checking dtype here (its
tolerance is 1e-10): matching it in a kernel needs fp64 coefficients and fp64 exp/log, whose GPU lowering
(libdevice) differs from the fp32 path and is never exercised by the interpreter runs that test these kernels.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from diffkern.ops import _common as C
from diffkern.ops._declaration import PREDICTION_CODES
from diffkern.triton import _compile_only

# Prediction-type codes (constexpr parameters of the kernels), the ones the CUDA kernels take too.
EPSILON = tl.constexpr(PREDICTION_CODES["epsilon"])
SAMPLE = tl.constexpr(PREDICTION_CODES["sample"])
V_PREDICTION = tl.constexpr(PREDICTION_CODES["v_prediction"])

# Blocks are powers of two in [MIN_BLOCK, MAX_BLOCK] with 16 elements per thread once large enough (four
# 16-byte vectors of fp32 per tensor); every size is a multiple of 4 * num_warps * 32.
MIN_BLOCK = 128
MAX_BLOCK = 4096
ELEMENTS_PER_THREAD = 16

# Keyword arguments of every Triton launch (the GroupNorm kernels' too): see "Numerics" above and README's
# "Numerics: one policy for every backend" (nvcc's --fmad=false is the same rule for csrc/).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


class LaunchConfig(NamedTuple):
    block: int
    num_warps: int
    blocks_per_sample: int
    grid: Tuple[int]


@functools.lru_cache(maxsize=1024)
def launch_config(batch: int, n: int) -> LaunchConfig:
    """Block size, warps and grid for ``batch`` samples of ``n`` elements (``batch * n > 0``), in plain integers
    and cached per shape: a sampling loop computes it once.

    Small samples get small blocks (down to 128 elements) rather than a mostly masked 4096-element block."""
    block = min(MAX_BLOCK, max(MIN_BLOCK, 1 << (n - 1).bit_length()))
    num_warps = max(1, min(8, block // (32 * ELEMENTS_PER_THREAD)))
    blocks_per_sample = -(-n // block)
    return LaunchConfig(block, num_warps, blocks_per_sample, (batch * blocks_per_sample,))


def device_guard(t: torch.Tensor):
    """Make ``t``'s device current for the launch (Triton launches on the current device's current stream). No
    context switch when it already is (the common case: entering ``torch.cuda.device`` costs microseconds)."""
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_DEVICE_SWITCH
    return torch.cuda.device(t.device)


_NO_DEVICE_SWITCH = contextlib.nullcontext()  # reusable: it holds no state


def check_flat_layout(*tensors: Optional[torch.Tensor]) -> None:
    """Host-side check (metadata only, no sync) that the tensors follow the flat-buffer contract above."""
    if not C.laid_out_alike(tensors):
        present = [t for t in tensors if t is not None]
        raise ValueError("Triton step kernels need batch-outer dense tensors laid out alike (equal strides on "
                         f"every dimension longer than 1), got strides {[t.stride() for t in present]} for shapes "
                         f"{[tuple(t.shape) for t in present]}")


def index_stride(t: torch.Tensor) -> int:
    """Element stride between samples' entries of a ``[1]`` (shared: 0) or ``[B]`` per-sample tensor."""
    return 0 if t.numel() == 1 else t.stride(0)


def table_args(alphas_cumprod: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(table, stride, length) for the in-kernel gather; the table must be float32 on the samples' device."""
    if alphas_cumprod.dtype != torch.float32 or alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must be float32 [T], got {alphas_cumprod.dtype} "
                         f"{tuple(alphas_cumprod.shape)}")
    return alphas_cumprod, alphas_cumprod.stride(0), alphas_cumprod.numel()


def as_index_vector(timesteps: torch.Tensor) -> torch.Tensor:
    """int64 ``[1 or B]`` (the tensor itself when already so, as the public ops pass it: no dispatcher call)."""
    if timesteps.dtype == torch.int64 and timesteps.ndim == 1:
        return timesteps
    return timesteps.reshape(-1).to(torch.int64)


class TimestepArgs(NamedTuple):
    """A timestep argument as the kernels take it: ``(ptr, stride, host)`` positionally and ``on_host`` as the
    kernel's ``*_ON_HOST`` constexpr. A python int (shared by the batch; negative allowed for previous
    timesteps) travels as ``host`` with ``on_host`` set: the kernel uses the scalar and never loads, and ``ptr``
    is any valid tensor (the table) with stride 0. An int64 ``[1 or B]`` tensor travels as (tensor, its stride
    between samples, 0) with ``on_host`` clear."""
    ptr: torch.Tensor
    stride: int
    host: int
    on_host: bool


def timestep_args(timesteps, table: torch.Tensor) -> TimestepArgs:
    """``TimestepArgs`` of a python int or an int64 ``[1 or B]`` tensor on the samples' device (the backend
    contract; ints were range-checked by the public op)."""
    if type(timesteps) is int:
        return TimestepArgs(table, 0, timesteps, True)
    timesteps = as_index_vector(timesteps)
    return TimestepArgs(timesteps, index_stride(timesteps), 0, False)


# ----------------------------------------------------------------------------------------------------------
# Device functions.


@triton.jit
def program_span(n, blocks_per_sample, BLOCK: tl.constexpr):
    """(sample index, int64 element offsets of this program's block within the sample, tail mask)."""
    pid = tl.program_id(0).to(tl.int64)
    sample = pid // blocks_per_sample
    offsets = (pid - sample * blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    return sample, offsets, offsets < n


@triton.jit
def per_sample_value(values_ptr, values_stride, host_value, sample, ON_HOST: tl.constexpr):
    """One sample's value of a per-sample argument (a timestep, a flow sigma): the host scalar (``ON_HOST``, shared by
    the batch, nothing loaded) or the ``[1 or B]`` tensor's entry."""
    if ON_HOST:
        value = host_value
    else:
        value = tl.load(values_ptr + sample * values_stride)
    return value


@triton.jit
def timestep_of(timesteps_ptr, timesteps_stride, host_timestep, sample, ON_HOST: tl.constexpr):
    """The raw int64 timestep of one sample (``per_sample_value``; a host int is an int32 or int64 argument)."""
    return per_sample_value(timesteps_ptr, timesteps_stride, host_timestep, sample, ON_HOST).to(tl.int64)


@triton.jit
def gather_abar(table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep, sample,
                ON_HOST: tl.constexpr):
    """(raw timestep, abar at the timestep clamped into [0, T-1]) of one sample, as scalars."""
    t = timestep_of(timesteps_ptr, timesteps_stride, host_timestep, sample, ON_HOST)
    index = tl.minimum(tl.maximum(t, 0), num_train - 1)
    return t, tl.load(table_ptr + index * table_stride)


@triton.jit
def gather_abar_prev(table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep, sample,
                     final_alpha_cumprod, ON_HOST: tl.constexpr):
    """abar at the previous timestep of one sample; a negative timestep means ``final_alpha_cumprod``."""
    t_prev, inside = gather_abar(table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep,
                                 sample, ON_HOST)
    return tl.where(t_prev >= 0, inside, final_alpha_cumprod)


@triton.jit
def load_model_output(model_output_ptr, element, mask, cond_offset, guidance_scale, GUIDED: tl.constexpr):
    """The model output at ``element`` (int64 offsets of the unconditional/only half) in fp32; with
    ``GUIDED``, classifier-free guidance uncond + s (cond - uncond) with cond ``cond_offset`` further on."""
    model_out = tl.load(model_output_ptr + element, mask=mask).to(tl.float32)
    if GUIDED:
        cond = tl.load(model_output_ptr + cond_offset + element, mask=mask).to(tl.float32)
        model_out = model_out + guidance_scale * (cond - model_out)
    return model_out


@triton.jit
def rescale_guided(guided, factor_ptr, sample, rescale, keep, RESCALE: tl.constexpr):
    """With ``RESCALE``, the guidance rescale of the guided model output, r (guided q) + keep guided, with the
    sample's q = std(cond) / std(guided) (``_guidance.rescale_factor``) and keep = 1 - r rounded once on the host,
    in ``_common.rescale_guided``'s operation order; else ``guided`` as it is."""
    if RESCALE:
        q = tl.load(factor_ptr + sample)
        guided = rescale * (guided * q) + keep * guided
    return guided


@triton.jit
def predict_x0(x, model_out, sqrt_a, sqrt_beta, PREDICTION: tl.constexpr):
    """x0 from the model output (``x`` unused for ``sample`` prediction), as ``_common.predict_x0_eps``."""
    if PREDICTION == EPSILON:
        x0 = tl.div_rn(x - sqrt_beta * model_out, sqrt_a)
    elif PREDICTION == SAMPLE:
        x0 = model_out
    else:
        x0 = sqrt_a * x - sqrt_beta * model_out
    return x0


@triton.jit
def predict_eps(x, model_out, x0, sqrt_a, sqrt_beta, PREDICTION: tl.constexpr):
    """eps matching ``predict_x0`` (x0 before any clipping), as ``_common.predict_x0_eps``."""
    if PREDICTION == EPSILON:
        eps = model_out
    elif PREDICTION == SAMPLE:
        eps = tl.div_rn(x - sqrt_a * x0, sqrt_beta)
    else:
        eps = sqrt_a * model_out + sqrt_beta * x
    return eps


@triton.jit
def clip_or_threshold(x0, scale_ptr, sample, clip_range, CLIP: tl.constexpr, THRESHOLD: tl.constexpr):
    """Dynamic thresholding with the precomputed per-sample scale s (clamp to [-s, s], divide by s), or
    clipping to [-clip_range, clip_range], or nothing. NaNs propagate as in ``torch.clamp``."""
    if THRESHOLD:
        s = tl.load(scale_ptr + sample)
        x0 = tl.div_rn(tl.clamp(x0, -s, s, propagate_nan=tl.PropagateNan.ALL), s)
    elif CLIP:
        x0 = tl.clamp(x0, -clip_range, clip_range, propagate_nan=tl.PropagateNan.ALL)
    return x0


@triton.jit
def store_step_outputs(prev_out_ptr, x0_out_ptr, element, mask, prev, x0):
    """Writes x_prev and x0 (fp32) at ``element`` of the step's outputs, in the outputs' dtype."""
    tl.store(prev_out_ptr + element, prev.to(prev_out_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_out_ptr + element, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)


# Every kernel takes its host timesteps with do_not_specialize (see "Timesteps" above): a plain runtime argument,
# so a sampling loop compiles one variant, not one per value class (Triton specialises ints on divisibility by 16).
@triton.jit(do_not_specialize=["host_timestep"])
def _abs_x0_kernel(model_output_ptr, sample_ptr, abs_x0_ptr, factor_ptr, table_ptr, table_stride, num_train,
                   timesteps_ptr, timesteps_stride, host_timestep, n, blocks_per_sample, model_output_sample_stride,
                   cond_offset, guidance_scale, rescale, keep, PREDICTION: tl.constexpr, GUIDED: tl.constexpr,
                   RESCALE: tl.constexpr, TIMESTEP_ON_HOST: tl.constexpr, BLOCK: tl.constexpr):
    """|x0| in fp32, ``[B, n]`` dense: the first pass of dynamic thresholding (same x0 as the step kernels)."""
    sample, offsets, mask = program_span(n, blocks_per_sample, BLOCK)
    _, a = gather_abar(table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep, sample,
                       TIMESTEP_ON_HOST)
    sqrt_a = tl.sqrt_rn(a)
    sqrt_beta = tl.sqrt_rn(1.0 - a)
    model_out = load_model_output(model_output_ptr, sample * model_output_sample_stride + offsets, mask, cond_offset,
                                  guidance_scale, GUIDED)
    model_out = rescale_guided(model_out, factor_ptr, sample, rescale, keep, RESCALE)
    if PREDICTION == SAMPLE:
        x = model_out  # not read: x0 is the model output itself
    else:
        x = tl.load(sample_ptr + sample * n + offsets, mask=mask).to(tl.float32)
    x0 = predict_x0(x, model_out, sqrt_a, sqrt_beta, PREDICTION)
    tl.store(abs_x0_ptr + sample * n + offsets, tl.abs(x0), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Dynamic thresholding, host side.


def threshold_scale(model_output: torch.Tensor, sample: torch.Tensor, alphas_cumprod: torch.Tensor,
                    timestep: TimestepArgs, *, prediction_type: str, guidance_scale: Optional[float],
                    model_output_sample_stride: int, ratio: float, sample_max_value: float,
                    factor: Optional[torch.Tensor], guidance_rescale: float) -> torch.Tensor:
    """Per-sample dynamic-thresholding scale, float32 ``[B]``: one kernel pass writing |x0| (fp32, ``B*n``),
    then ``_common.threshold_scale_from_abs``'s selection (one ``kthvalue`` per order statistic needed), which
    needs no ``abs`` copy since the kernel wrote absolute values. ``timestep``: ``timestep_args``' form;
    ``factor``: the guidance rescale's per-sample factor, or None (no rescale)."""
    batch = sample.shape[0]
    n = sample.numel() // batch
    abs_x0 = torch.empty((batch, n), dtype=torch.float32, device=sample.device)
    table, table_stride, num_train = table_args(alphas_cumprod)
    cfg = launch_config(batch, n)
    with device_guard(sample):
        _abs_x0_kernel[cfg.grid](
            model_output, sample, abs_x0, factor, table, table_stride, num_train, timestep.ptr, timestep.stride,
            timestep.host, n, cfg.blocks_per_sample, model_output_sample_stride,
            batch * model_output_sample_stride, 0.0 if guidance_scale is None else guidance_scale,
            guidance_rescale, 1 - guidance_rescale, PREDICTION=PREDICTION_CODES[prediction_type],
            GUIDED=guidance_scale is not None, RESCALE=factor is not None, TIMESTEP_ON_HOST=timestep.on_host,
            BLOCK=cfg.block, num_warps=cfg.num_warps, **LAUNCH_OPTIONS)
    return C.threshold_scale_from_abs(abs_x0, ratio, sample_max_value)


# ----------------------------------------------------------------------------------------------------------
# Step launcher (DDIM, DDPM).


def launch_step(kernel, model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                alphas_cumprod: torch.Tensor, timestep: C.TimestepLike, prev_timestep: C.TimestepLike,
                family_args: Dict[str, Any], *, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float,
                guidance_scale: Optional[float], guidance_rescale: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs a step kernel over the flat buffers; returns (prev_sample, pred_original_sample) in the sample's
    dtype and layout.

    ``kernel`` takes the buffers, table, the timestep's and the previous timestep's ``(ptr, stride, host)``
    (``timestep_args``; python ints or int64 ``[1 or B]`` tensors), ``n`` and ``blocks_per_sample`` positionally,
    as the step kernels list them, then by name: the constexprs ``TIMESTEP_ON_HOST`` and
    ``PREV_TIMESTEP_ON_HOST``, ``model_output_sample_stride`` (elements per model-output sample:
    n, or 2n for a learned variance), ``cond_offset`` (where the conditional half starts; 0 unguided),
    ``clip_range``, ``guidance_scale``, ``rescale``, ``keep`` and the constexprs ``PREDICTION``, ``CLIP``,
    ``THRESHOLD``, ``HAS_NOISE`` (``noise`` given), ``GUIDED``, ``RESCALE`` and ``BLOCK``, plus the family's own
    ``family_args``; the per-sample buffers ``scale_ptr`` and ``factor_ptr`` follow the noise. With a guidance
    rescale (``guidance_scale`` given and ``guidance_rescale`` not 0) a stats pass first computes the per-sample
    factor (``_guidance.rescale_factor``); with ``thresholding`` a pass then computes the per-sample scale
    (``threshold_scale``, from the rescaled output); the step kernel reads both."""
    prev_out = torch.empty_like(sample)
    x0_out = torch.empty_like(sample)
    if sample.numel() == 0:
        return prev_out, x0_out
    batch = sample.shape[0]
    n = sample.numel() // batch
    model_output_sample_stride = model_output.numel() // model_output.shape[0]
    guided = guidance_scale is not None
    table, table_stride, num_train = table_args(alphas_cumprod)
    timestep = timestep_args(timestep, table)
    prev_timestep = timestep_args(prev_timestep, table)
    rescaled = guided and guidance_rescale != 0
    factor = scale = None
    if rescaled:
        from diffkern.triton import _guidance  # (it imports this module)

        factor = _guidance.rescale_factor(model_output, batch, n, guidance_scale, model_output_sample_stride)
    if thresholding:
        scale = threshold_scale(model_output, sample, table, timestep, prediction_type=prediction_type,
                                guidance_scale=guidance_scale, model_output_sample_stride=model_output_sample_stride,
                                ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value, factor=factor,
                                guidance_rescale=guidance_rescale)
    cfg = launch_config(batch, n)
    with device_guard(sample):
        kernel[cfg.grid](
            model_output, sample, noise, scale, factor, prev_out, x0_out,
            table, table_stride, num_train, timestep.ptr, timestep.stride, timestep.host,
            prev_timestep.ptr, prev_timestep.stride, prev_timestep.host, n, cfg.blocks_per_sample,
            model_output_sample_stride=model_output_sample_stride,
            cond_offset=batch * model_output_sample_stride if guided else 0, clip_range=clip_sample_range,
            guidance_scale=guidance_scale if guided else 0.0, rescale=guidance_rescale, keep=1 - guidance_rescale,
            PREDICTION=PREDICTION_CODES[prediction_type], CLIP=clip_sample and not thresholding,
            THRESHOLD=thresholding, HAS_NOISE=noise is not None, GUIDED=guided, RESCALE=rescaled, TIMESTEP_ON_HOST=timestep.on_host, PREV_TIMESTEP_ON_HOST=prev_timestep.on_host,
            BLOCK=cfg.block, num_warps=cfg.num_warps, **family_args, **LAUNCH_OPTIONS)
    return prev_out, x0_out


def bind_step(kernel, model_output: torch.Tensor, sample: torch.Tensor, alphas_cumprod: torch.Tensor, timestep,
              prev_timestep, family_args: Dict[str, Any], uses_noise: bool, *, prediction_type: str, clip_sample: bool,
              clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
              sample_max_value: float, guidance_scale: Optional[float], guidance_rescale: float = 0.0):
    """``launch_step`` bound to one call signature (``_common.binds``): for a one-launch step (no thresholding,
    no guidance rescale) of non-empty fp16/bf16/fp32 samples with python-int timesteps, a
    ``launch(model_output, sample, noise, table, timestep, prev_timestep)`` whose kernel arguments, except the
    tensors and the two timesteps, were computed here once; None for any other call. ``alphas_cumprod`` is read
    for its length only (the plan's table may be prepared per call); the launch ignores its ``noise`` unless
    ``uses_noise`` (DDIM at eta = 0, as ``ddim_step`` does)."""
    if sample.numel() == 0 or not C.one_launch_step(sample, timestep, prev_timestep, thresholding=thresholding,
                                                    guidance_scale=guidance_scale,
                                                    guidance_rescale=guidance_rescale):
        return None
    batch = sample.shape[0]
    n = sample.numel() // batch
    model_output_sample_stride = model_output.numel() // model_output.shape[0]
    guided = guidance_scale is not None
    cfg = launch_config(batch, n)
    # (The table is float32 whatever the plan's table was: the key of a shared launcher holds the samples' dtypes.)
    launcher = direct_launcher(kernel, cfg.grid, dict(num_warps=cfg.num_warps, **LAUNCH_OPTIONS),
                               (model_output.dtype, sample.dtype), sample.device)
    num_train = alphas_cumprod.numel()
    fixed = dict(model_output_sample_stride=model_output_sample_stride,
                 cond_offset=batch * model_output_sample_stride if guided else 0, clip_range=clip_sample_range,
                 guidance_scale=guidance_scale if guided else 0.0, rescale=0.0, keep=1.0,
                 PREDICTION=PREDICTION_CODES[prediction_type], CLIP=clip_sample, THRESHOLD=False, GUIDED=guided,
                 RESCALE=False, TIMESTEP_ON_HOST=True, PREV_TIMESTEP_ON_HOST=True, BLOCK=cfg.block, **family_args)
    # HAS_NOISE follows the call's noise (a DDPM step at t = 0 has none): one argument tail for each.
    tails = {flag: positional_tail(kernel, "model_output_sample_stride", dict(fixed, HAS_NOISE=flag))
             for flag in (True, False)}
    blocks_per_sample = cfg.blocks_per_sample

    def launch(model_output, sample, noise, table, timestep, prev_timestep):
        if not uses_noise:
            noise = None
        prev_out = torch.empty_like(sample)
        x0_out = torch.empty_like(sample)
        with device_guard(sample):
            launcher(model_output, sample, noise, None, None, prev_out, x0_out, table, 1, num_train, table, 0,
                     timestep, table, 0, prev_timestep, n, blocks_per_sample, *tails[noise is not None])
        return prev_out, x0_out
    return launch


# Set to 0 to launch every Triton kernel through ``JITFunction.run`` (``DirectLauncher``): an escape hatch, read once
# per launcher (set it before the first call, or call ``diffkern.ops._common.clear_plans()`` and
# ``_direct_launchers.clear()`` after).
DIRECT_LAUNCH_ENV = "DIFFKERN_TRITON_DIRECT_LAUNCH"


class DirectLauncher:
    """``kernel[grid](*args, **options)`` for launches that pass every parameter positionally, in the kernel's order
    (the bound launches of ``_common.binds``), without Triton's per-call argument binding and specialisation once a
    launch with the same specialisation has run.

    Triton's ``JITFunction.run`` binds the arguments, specialises each one (its type; 16-byte alignment of pointers;
    integer values, unless ``do_not_specialize``) and looks the compiled kernel up on every call: about a
    microsecond per argument on the host, 10-35 µs for these kernels (``bench --host``: "triton launch path"),
    more than the rest of a call. The first launch goes through it and returns the ``CompiledKernel``; its runner
    (``CompiledKernel[grid]``, Triton's own: the current device's current stream, the launch hooks, the compiled
    launcher) is kept under the launch's specialisation key (``_key``): which pointers are None and which are
    16-byte aligned, and the value of every argument Triton specialises on. A later launch with the same key calls
    that runner; any other goes through ``run`` again and adds its runner. tests/test_triton_direct_launch.py checks
    against Triton itself that a direct launch runs the kernel Triton would pick.

    What the key leaves out is fixed by whoever shares the launcher (``direct_launcher``): the dtypes of the
    tensors, and the python types of float arguments (floats are never specialised; their positions, found at the
    first call, must hold floats in every call). Under the interpreter and the host bench's seam the kernel is not
    a ``JITFunction``, and under a compile-only driver nothing can launch: there every launch is
    ``kernel[grid](...)``."""

    __slots__ = ("_jit_launch", "_grid", "_options", "_direct", "_specialised", "_pointers", "_fixed", "_runners")

    MAX_RUNNERS = 64  # specialisations kept per launcher (alignment of views can vary; each is one entry)

    def __init__(self, kernel, grid: Tuple[int, ...], options: Dict[str, Any]):
        self._jit_launch = kernel[grid]
        self._grid = grid
        self._options = options
        # (Not under the compile-only driver of the compile sweep, the kernel report and bench --host: it compiles
        # and never launches, so a compiled kernel's runner cannot be made there.)
        # (And not where the user turned it off: ``DIRECT_LAUNCH_ENV`` = 0, read when the launcher is made.)
        self._direct = isinstance(kernel, triton.runtime.JITFunction) and _compile_only.driver_launches() \
            and os.environ.get(DIRECT_LAUNCH_ENV, "1") != "0"
        self._specialised = [i for i, p in enumerate(kernel.params) if not p.do_not_specialize] if self._direct \
            else []
        self._pointers = self._fixed = None  # getters of the key's arguments (``_classify``)
        self._runners: Dict[tuple, Any] = {}

    def _classify(self, args: tuple) -> None:
        """From the first call: the positions of pointers (tensors or None) and of the other specialised arguments
        (floats aside), each read with one ``itemgetter`` (a C call) per launch."""
        pointers = [i for i, a in enumerate(args) if a is None or isinstance(a, torch.Tensor)]
        self._pointers = _getter(pointers)
        self._fixed = _getter([i for i in self._specialised if i not in pointers and type(args[i]) is not float])

    def _key(self, args: tuple) -> tuple:
        return tuple([None if a is None else a.data_ptr() & 15 == 0 for a in self._pointers(args)]), self._fixed(args)

    def __call__(self, *args):
        if not self._direct:
            self._jit_launch(*args, **self._options)
            return
        if self._pointers is None:
            self._classify(args)
        key = self._key(args)
        runner = self._runners.get(key)
        if runner is not None:
            runner(*args)
            return
        compiled = self._jit_launch(*args, **self._options)
        if len(self._runners) >= self.MAX_RUNNERS:
            self._runners.clear()
        self._runners[key] = compiled[self._grid + (1,) * (3 - len(self._grid))]  # (the runner takes 3-D grids)


def _getter(positions):
    """``args -> tuple of args[i] for i in positions`` (``operator.itemgetter``, always a tuple)."""
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return operator.itemgetter(*positions) if positions else (lambda args: ())


_direct_launchers: Dict[tuple, DirectLauncher] = {}


def direct_launcher(kernel, grid: Tuple[int, ...], options: Dict[str, Any], dtypes: tuple,
                    device: torch.device) -> DirectLauncher:
    """The ``DirectLauncher`` of ``kernel`` at ``grid`` with ``options`` for launches on ``device`` whose tensors have
    ``dtypes`` (in the order they are passed; the key leaves them out), one per process: the plans of one kernel,
    grid, dtypes and device (a sampling loop's steps: each host timestep is a plan) share its compiled kernels'
    runners. (Per device: a compiled kernel's runner holds the function loaded on the device it first ran on, and
    Triton compiles and loads per device.)"""
    key = (kernel, grid, tuple(options.items()), dtypes, device)
    launcher = _direct_launchers.get(key)
    if launcher is None:
        if len(_direct_launchers) >= 1024:
            _direct_launchers.clear()
        launcher = _direct_launchers[key] = DirectLauncher(kernel, grid, options)
    return launcher


def positional_tail(kernel, first: str, values: Dict[str, Any]) -> tuple:
    """The values of ``kernel``'s parameters from ``first`` on, in its order (each must be in ``values``). A bound
    launch passes them positionally, constexprs included, so that a call builds no keyword dictionary of them."""
    names = kernel.arg_names
    return tuple(values[name] for name in names[names.index(first):])
