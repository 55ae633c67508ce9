"""Benchmark cases: what is timed, on which inputs, against which baselines, and how many bytes each op must move.

:mod:`diffkern.bench` measures these cases (``python -m diffkern bench``); the pytest-benchmark suite in the
repository's ``benchmarks/`` directory makes one test per (case, impl) from the same list and reports the same
measurements. The cases live in the package because an installed package cannot import the repository's files.
Importing this module touches no device and imports neither triton nor diffusers; inputs are built and
implementations resolved only when a case runs.

A *case* is one op on one shape, dtype and memory layout. Each case runs under several *impls*:

- the diffkern backends ``reference``, ``triton`` and ``cuda``, each through the public op with ``backend=...``
  (validation and dispatch included: that is what a caller pays);
- the baselines a user would otherwise run: ``eager`` (plain PyTorch written the usual way: diffusers' step
  arithmetic on device tensors, after the pipelines' guidance for the guided cases, ``F.silu(F.group_norm(x))``),
  ``compile`` (``torch.compile`` of that same eager function, default mode) and ``diffusers`` (``DDIMScheduler.step``,
  ``DDPMScheduler.step``, ``DDPMScheduler.add_noise``, the pipelines' guidance + ``rescale_noise_cfg`` and
  ``FlowMatchEulerDiscreteScheduler.step``). GroupNorm+SiLU has no diffusers baseline: diffusers runs
  ``nn.GroupNorm`` and then ``nn.SiLU``, which is exactly ``eager``.

Byte model: each op's :class:`ByteModel` in :data:`OPS`, the one definition of the bytes behind every GB/s figure
(BENCHMARKS.md points here; the command line prints each case's formula, the JSON carries it as ``byte_model``).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

BACKEND_IMPLS = ("reference", "triton", "cuda")
BASELINES = ("eager", "compile", "diffusers")
# Baselines first: a backend's speedups need its case's baselines measured, and in this order they already are.
IMPLS = BASELINES + BACKEND_IMPLS

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Stable Diffusion 1.5's scheduler configuration (the pipelines' ``scheduler_config.json``).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, prediction_type="epsilon")
SD_DDIM_EXTRA = dict(set_alpha_to_one=False, steps_offset=1)
INFERENCE_STEPS = 50
# A step in the middle of SD's 50-step DDIM schedule (981, 961, ..., 1): 501 -> 481. DDPM steps 501 -> 500.
STEP_T = 501
DDIM_PREV_T = STEP_T - SD_SCHEDULER["num_train_timesteps"] // INFERENCE_STEPS
DDPM_PREV_T = STEP_T - 1
GUIDANCE_SCALE = 7.5
# guidance_rescale of the SDXL-style guided DDIM case (the value Lin et al. and diffusers' docs suggest).
GUIDANCE_RESCALE = 0.7
# The DDIM cases whose model output holds 2N samples (guidance).
GUIDED_STEP_OPS = ("ddim_step_cfg", "ddim_step_cfg_rescale")
# A flow-matching step in the middle of a 28-step SD3 schedule (shift 3): sigma 0.7 -> 0.68 (their float32 values).
FLOW_SIGMA, FLOW_SIGMA_NEXT = 0.7, 0.68
FLOW_GUIDANCE_SCALE = 7.0
FLOW_GUIDANCE_RESCALE = 0.7
GN_GROUPS = 32
GN_EPS = 1e-5


@dataclass(frozen=True)
class ByteModel:
    """The bytes an ideal single-pass kernel must read and write in one call, each tensor counted once: what every
    GB/s figure divides by the time.

    ``formula`` is written in E (elements of the sample; of x for GroupNorm), s (the dtype's size in bytes), N (the
    batch), C (the channels) and G (the groups, :data:`GN_GROUPS`); ``count(E, s, N, C)`` computes it and
    ``tensors`` says what is read and written. The per-sample timestep and the gathered abar values (a few bytes
    per sample) are left out. The model is a lower bound on traffic: a kernel that makes more than one pass (a
    two-pass GroupNorm reads x twice; eager PyTorch writes and re-reads every intermediate) moves more, and its
    GB/s, computed against the model, shows that cost."""
    formula: str
    tensors: str
    count: Callable[[int, int, int, int], int]


@dataclass(frozen=True)
class OpSpec:
    name: str
    family: str                 # "step" or "group_norm"
    description: str
    bytes: ByteModel
    baselines: Tuple[str, ...]
    note: str = ""              # caveat attached to the diffusers baseline's results


OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("add_noise", "step", "x_t = sqrt(abar) x0 + sqrt(1 - abar) noise, one timestep per sample",
           ByteModel("3 E s", "read x0 and noise; write x_t", lambda E, s, N, C: 3 * E * s), BASELINES),
    OpSpec("ddim_step", "step", "DDIM step, eta = 0, epsilon prediction, SD 1.5 scheduler, t 501 -> 481",
           ByteModel("4 E s", "read model_output and sample; write prev_sample and pred_original_sample",
                     lambda E, s, N, C: 4 * E * s), BASELINES),
    OpSpec("ddim_step_cfg", "step",
           f"DDIM step with classifier-free guidance (scale {GUIDANCE_SCALE}) and eta = 1 with given noise",
           ByteModel("6 E s", "read model_output (2N samples: 2 E), sample and noise; write prev_sample and "
                              "pred_original_sample", lambda E, s, N, C: 6 * E * s), BASELINES),
    OpSpec("ddim_step_cfg_rescale", "step",
           f"DDIM step with guidance (scale {GUIDANCE_SCALE}) and guidance_rescale {GUIDANCE_RESCALE} (SDXL's "
           "pipelines' rescale_noise_cfg), eta = 1 with given noise",
           ByteModel("8 E s", "read model_output twice (the statistics pass and the step: 4 E), sample and noise; "
                              "write prev_sample and pred_original_sample", lambda E, s, N, C: 8 * E * s), BASELINES,
           note="the diffusers baseline is the pipelines' guidance and rescale_noise_cfg, then DDIMScheduler.step"),
    OpSpec("ddpm_step", "step", "DDPM ancestral step, fixed_small variance, given noise, t 501 -> 500",
           ByteModel("5 E s", "read model_output, sample and noise; write prev_sample and pred_original_sample",
                     lambda E, s, N, C: 5 * E * s), BASELINES,
           note="DDPMScheduler.step has no argument for the noise, so the diffusers time includes drawing it "
                "(one extra randn kernel); its output is not compared"),
    OpSpec("flow_match_step", "flow", f"flow-matching Euler step, sigma {FLOW_SIGMA} -> {FLOW_SIGMA_NEXT} (SD3, FLUX, "
                                      "Wan), 0-d device sigmas",
           ByteModel("4 E s", "read model_output and sample; write prev_sample and pred_original_sample",
                     lambda E, s, N, C: 4 * E * s), BASELINES,
           note="FlowMatchEulerDiscreteScheduler.step returns prev_sample only (no x0): one write less"),
    OpSpec("flow_match_step_cfg", "flow", f"flow-matching Euler step with classifier-free guidance (scale "
                                          f"{FLOW_GUIDANCE_SCALE})",
           ByteModel("5 E s", "read model_output (2N samples: 2 E) and sample; write prev_sample and "
                              "pred_original_sample", lambda E, s, N, C: 5 * E * s), BASELINES,
           note="the diffusers baseline is the pipelines' guidance then FlowMatchEulerDiscreteScheduler.step, which "
                "returns prev_sample only"),
    OpSpec("flow_match_step_cfg_rescale", "flow",
           f"flow-matching Euler step with guidance (scale {FLOW_GUIDANCE_SCALE}) and guidance_rescale "
           f"{FLOW_GUIDANCE_RESCALE} (per-sample std of cond and of the guided velocity)",
           ByteModel("7 E s", "read model_output twice (the statistics pass and the step: 4 E) and sample; write "
                              "prev_sample and pred_original_sample (the two-pass minimum when a sample does not fit "
                              "on chip)", lambda E, s, N, C: 7 * E * s), BASELINES,
           note="the diffusers baseline is the pipelines' guidance and rescale_noise_cfg, then "
                "FlowMatchEulerDiscreteScheduler.step, which returns prev_sample only"),
    OpSpec("group_norm_silu", "group_norm", f"silu(group_norm(x)), {GN_GROUPS} groups, affine, inference (no grad)",
           ByteModel("2 E s + 2 C s", "read x, weight and bias; write y", lambda E, s, N, C: 2 * E * s + 2 * C * s),
           ("eager", "compile")),
    OpSpec("group_norm_silu_fwd_bwd", "group_norm",
           f"silu(group_norm(x)) forward + backward for x, weight and bias, {GN_GROUPS} groups",
           ByteModel("5 E s + 6 C s + 16 N G", "forward: read x, weight and bias, write y; backward: read x, dy, "
                                               "weight and bias, write dx, dweight and dbias; mean and rstd (fp32) "
                                               "written once and read once",
                     lambda E, s, N, C: 5 * E * s + 6 * C * s + 16 * N * GN_GROUPS),
           ("eager", "compile")),
)}


@dataclass(frozen=True)
class ShapeSet:
    label: str
    shape: Tuple[int, ...]
    where: str                  # "gpu": the real sizes; "cpu": small enough for CI on a few cores
    quick: bool = False         # part of ``--quick``


# Latents [B, 4, H, W]: SD 1.5 at 512 px (64^2) and SDXL at 1024 px (128^2), batch 1, 2 and 8, and a bandwidth
# probe of 32M elements (128 MiB per fp32 tensor, 64 MiB per fp16 one) where launch costs no longer matter.
STEP_SHAPES: Tuple[ShapeSet, ...] = tuple(
    ShapeSet(f"{model}-b{batch}", (batch, 4, size, size), "gpu", quick=(model, batch) == ("sd15", 2))
    for model, size in (("sd15", 64), ("sdxl", 128)) for batch in (1, 2, 8)
) + (
    ShapeSet("probe-32M", (8, 4, 1024, 1024), "gpu", quick=True),
    ShapeSet("cpu-small", (2, 4, 32, 32), "cpu", quick=True),
)

# GroupNorm inputs of the SD UNet (C 320/640/1280 at 64^2/32^2/16^2/8^2; N = 1, or 8 for batch 4 with guidance)
# and the SD VAE decoder's last block at 512 px (128 channels at 512^2, 32M elements) as the bandwidth probe.
GN_SHAPES: Tuple[ShapeSet, ...] = tuple(
    ShapeSet(f"unet-c{channels}-{size}-n{batch}", (batch, channels, size, size), "gpu",
             quick=(channels, batch) == (320, 1))
    for channels, size in ((320, 64), (640, 32), (1280, 16), (1280, 8)) for batch in (1, 8)
) + (
    ShapeSet("vae-c128-512-n1", (1, 128, 512, 512), "gpu", quick=True),
    ShapeSet("cpu-small", (2, 64, 16, 16), "cpu", quick=True),
)
GN_LAYOUTS = ("nchw", "channels_last")

# Flow-matching latents: SD3/FLUX at 1024 px as a [1, 16, 128, 128] latent and as FLUX's packed [1, 4096, 64]
# tokens, and Wan 2.1's 480p, 81-frame video latent [1, 16, 21, 60, 104] (2.1M elements).
FLOW_SHAPES: Tuple[ShapeSet, ...] = (
    ShapeSet("sd3-1024", (1, 16, 128, 128), "gpu", quick=True),
    ShapeSet("flux-packed-1024", (1, 4096, 64), "gpu"),
    ShapeSet("wan-480p-81f", (1, 16, 21, 60, 104), "gpu", quick=True),
    ShapeSet("cpu-small", (1, 16, 32, 32), "cpu", quick=True),
)
SHAPES_BY_FAMILY = {"step": STEP_SHAPES, "flow": FLOW_SHAPES, "group_norm": GN_SHAPES}


@dataclass(frozen=True)
class Case:
    op: str
    shape_set: str
    shape: Tuple[int, ...]
    dtype: str
    layout: str = "nchw"
    where: str = "gpu"

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def id(self) -> str:
        layout = f"-{self.layout}" if self.spec.family == "group_norm" else ""
        return f"{self.op}-{self.shape_set}{layout}-{self.dtype}"

    @property
    def title(self) -> str:
        """One line naming the case (the pytest-benchmark group: its impls are compared side by side)."""
        layout = f" {self.layout}" if self.spec.family == "group_norm" else ""
        return f"{self.op} {'x'.join(map(str, self.shape))}{layout} {self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_moved(self) -> int:
        """The op's :class:`ByteModel` at this case's shape and dtype."""
        batch, channels = self.shape[:2]
        return self.spec.bytes.count(self.numel, self.torch_dtype.itemsize, batch, channels)


def make_cases(*, ops: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None,
               where: Optional[str] = None, quick: bool = False) -> List[Case]:
    """Every case, in a stable order (op, shape set, layout, dtype); optionally only those for ``where``
    ("gpu"/"cpu") and only the ``--quick`` shape sets."""
    ops = tuple(OPS) if ops is None else tuple(ops)
    dtypes = tuple(DTYPES) if dtypes is None else tuple(dtypes)
    unknown = sorted(set(ops) - set(OPS)) + sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise ValueError(f"unknown op(s) or dtype(s) {unknown}; ops: {tuple(OPS)}, dtypes: {tuple(DTYPES)}")
    cases = []
    for op in ops:
        family = OPS[op].family
        shape_sets = SHAPES_BY_FAMILY[family]
        layouts = GN_LAYOUTS if family == "group_norm" else ("nchw",)
        for shape_set in shape_sets:
            if (where is not None and shape_set.where != where) or (quick and not shape_set.quick):
                continue
            for layout in layouts:
                if quick and layout != "nchw":
                    continue
                for dtype in dtypes:
                    cases.append(Case(op, shape_set.label, shape_set.shape, dtype, layout, shape_set.where))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Availability


@dataclass(frozen=True)
class Options:
    """Opt-ins for impls that run on the CPU but say nothing about performance there."""
    cpu_triton: bool = False    # Triton kernels in the interpreter (needs TRITON_INTERPRET=1 before triton loads)
    cpu_compile: bool = False   # torch.compile on the CPU (minutes of compilation on a few cores)


def unavailable_reason(case: Case, impl: str, device: torch.device, options: Options = Options()) -> Optional[str]:
    """Why ``impl`` cannot (or should not) be timed for ``case`` on ``device``; None when it can."""
    from diffkern import backends

    if impl in BACKEND_IMPLS:
        if impl == "triton" and device.type == "cpu" and not options.cpu_triton:
            return ("Triton on CPU runs in the interpreter, which is not a performance path "
                    "(opt in with --cpu-triton / --bench-cpu-triton)")
        status = backends.backend_status(impl, device.type)
        return None if status.available else status.reason
    if impl not in case.spec.baselines:
        if impl == "diffusers":
            return "no diffusers baseline: diffusers runs nn.GroupNorm then nn.SiLU, which is the eager baseline"
        raise ValueError(f"unknown impl {impl!r}")
    if impl == "compile":
        if device.type == "cpu" and not options.cpu_compile:
            return ("torch.compile on CPU spends minutes compiling on a few cores "
                    "(opt in with --cpu-compile / --bench-cpu-compile)")
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile needs triton for CUDA tensors"
    if impl == "diffusers" and importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (pip install diffusers)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Workload:
    """The inputs of one case: ``inputs`` holds the per-call tensors (samples, model outputs, noise, x, dy) and
    ``shared`` the small ones every impl reuses (the abar table, timesteps, GroupNorm weights). One input set is
    enough: on a GPU, ``triton.testing.do_bench`` flushes the L2 cache before every timed call."""
    case: Case
    device: torch.device
    inputs: Dict[str, torch.Tensor]
    shared: Dict[str, Any]
    _expected: Optional[Tuple[torch.Tensor, ...]] = field(default=None, repr=False)

    def expected(self) -> Tuple[torch.Tensor, ...]:
        """The reference backend's outputs: what every other impl is compared with."""
        if self._expected is None:
            fn = make_impl(self, "reference")
            self._expected = tuple(t.detach().clone() for t in fn(self.inputs))
        return self._expected


def _random(shape, dtype, device, generator, layout="nchw", scale=1.0) -> torch.Tensor:
    # Never zeros: a kernel can be faster on zeros (and a broken one can look right on them).
    t = (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def build_workload(case: Case, device, seed: int = 0) -> Workload:
    """Random inputs for ``case`` on ``device``."""
    from diffkern.schedules import NoiseSchedule

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype, shape, layout = case.torch_dtype, case.shape, case.layout
    shared: Dict[str, Any] = {}
    if case.spec.family == "step":
        schedule = NoiseSchedule.from_name(SD_SCHEDULER["beta_schedule"], SD_SCHEDULER["num_train_timesteps"],
                                           SD_SCHEDULER["beta_start"], SD_SCHEDULER["beta_end"])
        shared["table"] = schedule.table(device)
        if case.op == "add_noise":
            shared["t"] = torch.randint(0, SD_SCHEDULER["num_train_timesteps"], (shape[0],), generator=gen,
                                        device=device)
        else:
            # 0-d device tensors, as iterating a scheduler's ``timesteps`` yields them in a pipeline.
            prev = DDPM_PREV_T if case.op == "ddpm_step" else DDIM_PREV_T
            shared["t"] = torch.tensor(STEP_T, device=device)
            shared["t_prev"] = torch.tensor(prev, device=device)
        if case.op == "add_noise":
            inputs = {"x0": _random(shape, dtype, device, gen), "noise": _random(shape, dtype, device, gen)}
        else:
            batch = 2 * shape[0] if case.op in GUIDED_STEP_OPS else shape[0]
            inputs = {"model_output": _random((batch,) + shape[1:], dtype, device, gen),
                      "sample": _random(shape, dtype, device, gen)}
            if case.op in GUIDED_STEP_OPS + ("ddpm_step",):
                inputs["noise"] = _random(shape, dtype, device, gen)
    elif case.spec.family == "flow":
        # 0-d device tensors, as indexing a scheduler's ``sigmas`` on the device yields them.
        shared["sigma"] = torch.tensor(FLOW_SIGMA, device=device)
        shared["sigma_next"] = torch.tensor(FLOW_SIGMA_NEXT, device=device)
        batch = shape[0] if case.op == "flow_match_step" else 2 * shape[0]
        inputs = {"model_output": _random((batch,) + shape[1:], dtype, device, gen),
                  "sample": _random(shape, dtype, device, gen)}
    else:
        channels = shape[1]
        grad = case.op == "group_norm_silu_fwd_bwd"
        # Around a trained network's values (weight ~ 1, bias ~ 0), not exactly them.
        shared["weight"] = (1 + _random((channels,), dtype, device, gen, scale=0.1)).requires_grad_(grad)
        shared["bias"] = _random((channels,), dtype, device, gen, scale=0.1).requires_grad_(grad)
        inputs = {"x": _random(shape, dtype, device, gen, layout).requires_grad_(grad)}
        if grad:
            inputs["dy"] = _random(shape, dtype, device, gen, layout)
    return Workload(case, device, inputs, shared)


# ----------------------------------------------------------------------------------------------------------------
# Baselines written the usual way (diffusers' step arithmetic on device tensors; coefficients are 0-d fp32 tensors,
# so the arithmetic runs in the sample's dtype, as in diffusers)


def _per_sample(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    return coef.reshape(-1, *([1] * (ndim - 1)))


def _gather(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``table[t]`` as a gather kernel with ``t``'s shape. Indexing with a 0-d tensor directly would read the index
    on the host (a sync in eager mode, and a graph break that inductor cannot compile under torch.compile)."""
    return table[t.reshape(-1)].reshape(t.shape)


def eager_add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    abar = _gather(table, t).to(x0.dtype)
    return _per_sample(abar ** 0.5, x0.ndim) * x0 + _per_sample((1 - abar) ** 0.5, x0.ndim) * noise


def eager_ddim_step(model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, sample: torch.Tensor,
                    table: torch.Tensor, eta: float = 0.0, noise: Optional[torch.Tensor] = None,
                    guidance_scale: Optional[float] = None,
                    guidance_rescale: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    if guidance_scale is not None:
        model_output = guided_rescaled(model_output, guidance_scale, guidance_rescale)
    a, a_prev = _gather(table, t), _gather(table, t_prev)
    beta = 1 - a
    x0 = (sample - beta ** 0.5 * model_output) / a ** 0.5
    std = eta * ((1 - a_prev) / beta * (1 - a / a_prev)) ** 0.5
    prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * model_output
    if eta > 0:
        prev = prev + std * noise
    return prev, x0


def eager_ddpm_step(model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, sample: torch.Tensor,
                    table: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    a, a_prev = _gather(table, t), _gather(table, t_prev)
    alpha = a / a_prev
    beta = 1 - alpha
    x0 = (sample - (1 - a) ** 0.5 * model_output) / a ** 0.5
    prev = (a_prev ** 0.5 * beta / (1 - a)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a)) * sample
    variance = ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20)
    return prev + variance ** 0.5 * noise, x0


def guided_rescaled(model_output: torch.Tensor, guidance_scale: float, guidance_rescale: float) -> torch.Tensor:
    """The pipelines' guidance and, when ``guidance_rescale`` > 0, their ``rescale_noise_cfg``, in the model output's
    dtype."""
    uncond, cond = model_output.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, guided.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def eager_flow_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                    guidance_scale: Optional[float] = None,
                    guidance_rescale: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """diffusers' step arithmetic (the sample upcast to float32, the result in the model output's dtype) after the
    pipelines' guidance, plus x0 = x - sigma v."""
    if guidance_scale is not None:
        model_output = guided_rescaled(model_output, guidance_scale, guidance_rescale)
    x = sample.float()
    prev = (x + (sigma_next - sigma) * model_output).to(model_output.dtype)
    return prev, (x - sigma * model_output).to(model_output.dtype)


def eager_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, GN_GROUPS, weight, bias, GN_EPS))


# ----------------------------------------------------------------------------------------------------------------
# Implementations: impl name -> a callable taking the case's inputs and returning the outputs compared with the
# reference (every call does the op's full work; nothing is cached across calls)

ImplFn = Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, ...]]


def make_impl(workload: Workload, impl: str) -> ImplFn:
    """The callable timed for ``impl`` on ``workload``'s case (check :func:`unavailable_reason` first)."""
    case, shared = workload.case, workload.shared
    if impl in BACKEND_IMPLS:
        return _diffkern_impl(case, shared, impl)
    if impl == "eager":
        return _baseline_impl(case, shared, compiled=False)
    if impl == "compile":
        return _baseline_impl(case, shared, compiled=True)
    if impl == "diffusers":
        return _diffusers_impl(case, shared, workload.device)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def _diffkern_impl(case: Case, shared: Dict[str, Any], backend: str) -> ImplFn:
    import diffkern

    op, table = case.op, shared.get("table")
    if op == "add_noise":
        return lambda s: (diffkern.add_noise(s["x0"], s["noise"], shared["t"], table, backend=backend),)
    if op == "ddim_step":
        return lambda s: tuple(diffkern.ddim_step(s["model_output"], shared["t"], s["sample"], table,
                                                  prev_timestep=shared["t_prev"], backend=backend))
    if op in GUIDED_STEP_OPS:
        rescale = _step_rescale(op)
        return lambda s: tuple(diffkern.ddim_step(s["model_output"], shared["t"], s["sample"], table,
                                                  prev_timestep=shared["t_prev"], eta=1.0, noise=s["noise"],
                                                  guidance_scale=GUIDANCE_SCALE, guidance_rescale=rescale,
                                                  backend=backend))
    if op == "ddpm_step":
        return lambda s: tuple(diffkern.ddpm_step(s["model_output"], shared["t"], s["sample"], table,
                                                  prev_timestep=shared["t_prev"], noise=s["noise"],
                                                  clip_sample=False, backend=backend))

    if case.spec.family == "flow":
        sigma, sigma_next = shared["sigma"], shared["sigma_next"]
        options = _flow_options(op)
        return lambda s: tuple(diffkern.flow_match_step(s["model_output"], s["sample"], sigma, sigma_next,
                                                        backend=backend, **options))

    def fn(x, weight, bias):
        return diffkern.group_norm_silu(x, GN_GROUPS, weight, bias, GN_EPS, backend=backend)

    return _group_norm_impl(case, shared, fn)


def _group_norm_impl(case: Case, shared: Dict[str, Any], fn: Callable) -> ImplFn:
    weight, bias = shared["weight"], shared["bias"]
    if case.op == "group_norm_silu":
        def forward(s):
            with torch.no_grad():
                return (fn(s["x"], weight, bias),)
        return forward

    def forward_backward(s):
        y = fn(s["x"], weight, bias)
        # autograd.grad rather than backward(): nothing accumulates into .grad across calls.
        return torch.autograd.grad(y, (s["x"], weight, bias), s["dy"])[:1]
    return forward_backward


def _step_rescale(op: str) -> float:
    """The guidance_rescale of a guided DDIM case."""
    return GUIDANCE_RESCALE if op == "ddim_step_cfg_rescale" else 0.0


def _flow_options(op: str) -> Dict[str, Any]:
    """The guidance options of a flow case."""
    if op == "flow_match_step":
        return {}
    rescale = FLOW_GUIDANCE_RESCALE if op == "flow_match_step_cfg_rescale" else 0.0
    return dict(guidance_scale=FLOW_GUIDANCE_SCALE, guidance_rescale=rescale)


def _baseline_impl(case: Case, shared: Dict[str, Any], compiled: bool) -> ImplFn:
    op, table = case.op, shared.get("table")
    if case.spec.family == "flow":
        if compiled:
            torch._dynamo.reset()  # see below
        fn = torch.compile(eager_flow_step, dynamic=False) if compiled else eager_flow_step
        options = _flow_options(op)
        return lambda s: fn(s["model_output"], s["sample"], shared["sigma"], shared["sigma_next"], **options)
    eager = {"add_noise": eager_add_noise, "ddim_step": eager_ddim_step, "ddim_step_cfg": eager_ddim_step,
             "ddim_step_cfg_rescale": eager_ddim_step,
             "ddpm_step": eager_ddpm_step, "group_norm_silu": eager_group_norm_silu,
             "group_norm_silu_fwd_bwd": eager_group_norm_silu}[op]
    if compiled:
        # Dynamo caches compiled code per Python function and falls back to eager once a function has been
        # recompiled cache_size_limit times; every case compiles these few functions anew for its shapes, so start
        # each case from an empty cache. Compilation happens on the first (warm-up) call, never inside a timing.
        torch._dynamo.reset()
        fn = torch.compile(eager, dynamic=False)
    else:
        fn = eager
    if op == "add_noise":
        return lambda s: (fn(s["x0"], s["noise"], shared["t"], table),)
    if op == "ddim_step":
        return lambda s: fn(s["model_output"], shared["t"], shared["t_prev"], s["sample"], table)
    if op in GUIDED_STEP_OPS:
        return lambda s: fn(s["model_output"], shared["t"], shared["t_prev"], s["sample"], table, 1.0, s["noise"],
                            GUIDANCE_SCALE, _step_rescale(op))
    if op == "ddpm_step":
        return lambda s: fn(s["model_output"], shared["t"], shared["t_prev"], s["sample"], table, s["noise"])
    return _group_norm_impl(case, shared, fn)


def _diffusers_impl(case: Case, shared: Dict[str, Any], device: torch.device) -> ImplFn:
    if case.spec.family == "flow":
        return _diffusers_flow_impl(case, shared, device)
    from diffusers import DDIMScheduler, DDPMScheduler

    op, t = case.op, shared["t"]
    if op == "add_noise":
        scheduler = DDPMScheduler(**SD_SCHEDULER)
        return lambda s: (scheduler.add_noise(s["x0"], s["noise"], t),)
    if op in ("ddim_step",) + GUIDED_STEP_OPS:
        scheduler = DDIMScheduler(**SD_SCHEDULER, **SD_DDIM_EXTRA)
        scheduler.set_timesteps(INFERENCE_STEPS, device=device)
        if op == "ddim_step":
            return lambda s: scheduler.step(s["model_output"], t, s["sample"], return_dict=False)

        def guided_step(s):
            # Guidance as the diffusers pipelines apply it, before the scheduler step.
            guided = guided_rescaled(s["model_output"], GUIDANCE_SCALE, _step_rescale(op))
            return scheduler.step(guided, t, s["sample"], eta=1.0, variance_noise=s["noise"], return_dict=False)
        return guided_step
    if op == "ddpm_step":
        # No set_timesteps: the full 1000-step schedule, so the previous timestep is t - 1.
        scheduler = DDPMScheduler(**SD_SCHEDULER, variance_type="fixed_small")
        return lambda s: scheduler.step(s["model_output"], t, s["sample"], return_dict=False)
    raise ValueError(f"no diffusers baseline for {op}")


def _diffusers_flow_impl(case: Case, shared: Dict[str, Any], device: torch.device) -> ImplFn:
    """The pipelines' guidance (and rescale) and ``FlowMatchEulerDiscreteScheduler.step`` at the case's sigmas, the
    step index set as a pipeline with ``set_begin_index`` has it (no index search)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()  # shift 1: the given sigmas as they are
    scheduler.set_timesteps(sigmas=[FLOW_SIGMA, FLOW_SIGMA_NEXT], device=device)
    t = scheduler.timesteps[0]
    options = _flow_options(case.op)

    def step(s):
        model_output = s["model_output"]
        if options:
            model_output = guided_rescaled(model_output, options["guidance_scale"], options["guidance_rescale"])
        scheduler._step_index = 0
        return scheduler.step(model_output, t, s["sample"], return_dict=False)
    return step


def compares_with_reference(case: Case, impl: str) -> bool:
    """Whether ``impl``'s outputs are meant to match the reference's on the same inputs."""
    return not (impl == "diffusers" and case.op == "ddpm_step")   # diffusers draws its own noise

