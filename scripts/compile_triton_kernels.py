"""Compile every Triton kernel of diffkern for real GPU archs, on a machine without a GPU.

The Triton interpreter (what CI runs the kernels in) executes the kernels' Python with numpy: it never lowers
them to PTX and SASS, so it cannot see what only the GPU compiler rejects (an op or type combination the
lowering does not support, a block that does not fit the arch's limits). This script drives the public API with
``backend="triton"`` (GroupNorm: the backend's entry points, on plans with the regime forced) on small CPU
tensors over a covering set of options — every dtype, prediction type, variance type, clip/threshold/guidance/noise
flag, GroupNorm regime, layout and affine combination — with two substitutions:

- Triton's active driver is replaced by one that reports a CUDA target of the arch asked for (no device needed:
  Triton's bundled ``ptxas`` produces the cubin), and
- each kernel launch becomes a "warmup": Triton specialises and compiles the kernel exactly as that launch would
  (argument types, 16-byte alignment, constexprs, num_warps), then returns without running it.

So each kernel variant the library would launch for these inputs is compiled to a cubin. Outputs are never
computed, so the ops' results here are meaningless; correctness is the interpreter tests' job. Fails (exit 1)
when a compile fails or when a ``*_kernel`` of ``diffkern.triton`` was never reached by the sweep. Prints each
kernel's variant count and shared memory.

    python scripts/compile_triton_kernels.py                 # sm_80 and sm_90
    python scripts/compile_triton_kernels.py --arch 90 --arch 100
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
from collections import defaultdict
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_triton_kernels: unset TRITON_INTERPRET; the interpreter never compiles kernels")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import diffkern  # noqa: E402
import diffkern.triton  # noqa: E402
from diffkern import backends  # noqa: E402
from diffkern.triton import group_norm_silu as triton_gn  # noqa: E402
from diffkern.triton._compile_only import CompileOnlyDriver  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class CompileLog:
    """Turns launches into compiles and records what each produced."""

    def __init__(self):
        self.variants = defaultdict(set)  # kernel name -> hashes of its compiled variants
        self.shared_bytes = defaultdict(int)  # kernel name -> the most shared memory of any variant
        self._original_run = JITFunction.run

    def install(self) -> None:
        log, original_run = self, self._original_run

        def compile_only_run(kernel, *args, grid, warmup, **kwargs):
            compiled = original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
            name = kernel.fn.__name__
            log.variants[name].add(compiled.hash)
            log.shared_bytes[name] = max(log.shared_bytes[name], int(compiled.metadata.shared))
            return compiled

        JITFunction.run = compile_only_run

    def uninstall(self) -> None:
        JITFunction.run = self._original_run


def launched_kernels() -> set:
    """Every ``*_kernel`` JIT function of the diffkern.triton modules: the kernels the launchers launch."""
    names = set()
    for info in pkgutil.walk_packages(diffkern.triton.__path__, "diffkern.triton."):  # packages' modules too
        module = importlib.import_module(info.name)
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel") and value.fn.__module__ == module.__name__:
                names.add(value.fn.__name__)
    return names


def step_cases(dtype: torch.dtype):
    """Calls covering every option value of the step ops at least once for ``dtype`` (not their product)."""
    g = torch.Generator().manual_seed(0)
    table = diffkern.alphas_cumprod(diffkern.make_betas("scaled_linear", 1000, 0.00085, 0.012)).float()

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    batch, shape = 2, (4, 6, 5)
    x = randn(batch, *shape)
    per_sample = torch.tensor([501, 21])
    yield "add_noise", lambda: diffkern.add_noise(x, randn(batch, *shape), 501, table, backend="triton")
    yield "add_noise per-sample", lambda: diffkern.add_noise(x, randn(batch, *shape), per_sample, table,
                                                             backend="triton")
    for i, prediction in enumerate(PREDICTION_TYPES):
        for guided in (False, True):
            out = randn(2 * batch if guided else batch, *shape)
            options = dict(prediction_type=prediction, guidance_scale=7.5 if guided else None,
                           clip_sample=i == 1, thresholding=i == 2, use_clipped_model_output=guided,
                           eta=1.0 if guided else 0.0, noise=randn(batch, *shape) if guided else None)
            yield (f"ddim {prediction} guided={guided}",
                   lambda out=out, options=options: diffkern.ddim_step(out, 501, x, table, prev_timestep=481,
                                                                       backend="triton", **options))
    yield "ddim per-sample, final step", lambda: diffkern.ddim_step(randn(batch, *shape), per_sample, x, table,
                                                                     prev_timestep=torch.tensor([481, -1]),
                                                                     backend="triton")
    # Python-int timesteps, the backend contract's host scalars (the kernels' *_ON_HOST variants), through the
    # implementations themselves: a negative prev_timestep and the thresholding pass included.
    implementation = backends.implementation
    host_options = dict(prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0, thresholding=True,
                        dynamic_thresholding_ratio=0.9, sample_max_value=2.0, guidance_scale=None)
    yield "add_noise host timestep", lambda: implementation("triton", "add_noise")(x, randn(batch, *shape), table, 501)
    yield "ddim host timesteps, final step", lambda: implementation("triton", "ddim_step")(
        randn(batch, *shape), x, None, table, 501, -1, final_alpha_cumprod=1.0, eta=0.0,
        use_clipped_model_output=False, **host_options)
    yield "ddpm host timesteps", lambda: implementation("triton", "ddpm_step")(
        randn(batch, *shape), x, randn(batch, *shape), table, 501, 481, variance_type="fixed_small", **host_options)
    # The guidance rescale (the shared stats pass, and the RESCALE variants of the steps and of the thresholding
    # pass), with a learned variance's 2C-channel model output too.
    guided_out = randn(2 * batch, *shape)
    for thresholding in (False, True):
        yield (f"ddim guidance_rescale thresholding={thresholding}",
               lambda thresholding=thresholding: diffkern.ddim_step(
                   guided_out, per_sample, x, table, prev_timestep=per_sample - 20, guidance_scale=7.5,
                   guidance_rescale=0.7, thresholding=thresholding, eta=1.0, noise=randn(batch, *shape),
                   backend="triton"))
    yield "ddpm learned_range guidance_rescale thresholding", lambda: diffkern.ddpm_step(
        randn(2 * batch, 2 * shape[0], *shape[1:]), per_sample, x, table, noise=randn(batch, *shape),
        variance_type="learned_range", guidance_scale=3.0, guidance_rescale=0.7, thresholding=True, backend="triton")
    yield "ddpm fixed_small guidance_rescale", lambda: diffkern.ddpm_step(
        guided_out, per_sample, x, table, noise=randn(batch, *shape), guidance_scale=3.0, guidance_rescale=0.7,
        backend="triton")
    for i, variance in enumerate(VARIANCE_TYPES):
        learned = variance.startswith("learned")
        guided = i % 2 == 1
        channels = 2 * shape[0] if learned else shape[0]
        out = randn(2 * batch if guided else batch, channels, *shape[1:])
        options = dict(variance_type=variance, prediction_type=PREDICTION_TYPES[i % 3],
                       clip_sample=i % 3 != 2, thresholding=i % 3 == 2,
                       guidance_scale=3.0 if guided else None)
        yield (f"ddpm {variance}",
               lambda out=out, options=options: diffkern.ddpm_step(out, per_sample, x, table,
                                                                   noise=randn(batch, *shape), backend="triton",
                                                                   **options))

    # The flow-matching family: deterministic and stochastic steps, guidance with and without its rescale
    # (the moments and rescale-factor passes), per-sample sigmas, and the training-side noising.
    sigmas = torch.tensor([0.7, 0.3])
    for stochastic in (False, True):
        for guided, rescale in ((False, 0.0), (True, 0.0), (True, 0.7)):
            out = randn(2 * batch if guided else batch, *shape)
            yield (f"flow step stochastic={stochastic} guided={guided} rescale={rescale}",
                   lambda out=out, stochastic=stochastic, guided=guided, rescale=rescale: diffkern.flow_match_step(
                       out, x, 0.7, 0.6, guidance_scale=4.0 if guided else None, guidance_rescale=rescale,
                       stochastic=stochastic, noise=randn(batch, *shape) if stochastic else None,
                       backend="triton"))
    yield "flow step per-sample sigmas", lambda: diffkern.flow_match_step(randn(batch, *shape), x, sigmas,
                                                                          sigmas - 0.1, backend="triton")
    yield "flow_add_noise", lambda: diffkern.flow_add_noise(x, randn(batch, *shape), 0.4, backend="triton")
    yield "flow_add_noise per-sample", lambda: diffkern.flow_add_noise(x, randn(batch, *shape), sigmas,
                                                                       backend="triton")


def group_norm_cases(dtype: torch.dtype):
    """Forward and backward in every regime, both layouts, with and without affine, one 64-bit-offset plan."""
    g = torch.Generator().manual_seed(1)
    affines = ("both", "none", "weight", "bias")
    for i, (regime, channels_last) in enumerate((r, cl) for r in triton_gn.REGIMES for cl in (False, True)):
        affine = affines[i % len(affines)]
        x = torch.randn(2, 12, 6, 5, generator=g).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(12, generator=g).to(dtype) if affine in ("both", "weight") else None
        bias = torch.randn(12, generator=g).to(dtype) if affine in ("both", "bias") else None
        offsets_64 = i == 0

        def forward_backward(x=x, weight=weight, bias=bias, regime=regime, offsets_64=offsets_64):
            # The backend's entry points on the (N, C, S) view the op hands them, with the regime forced.
            x3 = x.view(2, 12, -1)
            forward, backward = (triton_gn.plan_for(x3, 3, tuning, sm_count=132, regime=regime, offsets_64=offsets_64)
                                 for tuning in (triton_gn.FORWARD, triton_gn.BACKWARD))
            y, mean, rstd = triton_gn.group_norm_silu_forward(x3, weight, bias, 3, 1e-5, plan=forward)
            triton_gn.group_norm_silu_backward(torch.ones_like(y), x3, weight, bias, mean, rstd, 3, plan=backward)

        layout = "channels_last" if channels_last else "nchw"
        yield f"group_norm_silu {regime} {layout} affine={affine} offsets_64={offsets_64}", forward_backward
    # The split regime's packed tiles (channels-last, C/G not a multiple of 8: here 4 groups of 10 channels, 4
    # per tile).
    x = torch.randn(2, 40, 6, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(40, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)

    def packed(x=x, weight=weight, bias=bias):
        x3 = x.view(2, 40, -1)
        forward, backward = (triton_gn.plan_for(x3, 4, tuning, sm_count=132, regime="split") for tuning in
                             (triton_gn.FORWARD, triton_gn.BACKWARD))
        assert forward.group_pack == backward.group_pack == 4, (forward, backward)
        y, mean, rstd = triton_gn.group_norm_silu_forward(x3, weight, bias, 4, 1e-5, plan=forward)
        triton_gn.group_norm_silu_backward(torch.ones_like(y), x3, weight, bias, mean, rstd, 4, plan=backward)

    yield "group_norm_silu split channels_last packed tiles", packed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability as an int, e.g. 90 (repeatable; default: 80 and 90)")
    args = parser.parse_args(argv)
    archs = args.arch or [80, 90]

    # The Triton backend refuses CPU tensors outside the interpreter; here they only carry shapes, dtypes,
    # strides and alignment into the compile.
    backends._triton_status = lambda device_type: backends.BackendStatus(True, "compile-only (no launch)")
    backends.clear_cache()
    expected = launched_kernels()
    failures = []
    for arch in archs:
        triton_driver.set_active(CompileOnlyDriver(arch))
        log = CompileLog()
        log.install()
        start = time.perf_counter()
        for dtype in DTYPES:
            for label, call in [*step_cases(dtype), *group_norm_cases(dtype)]:
                try:
                    call()
                except Exception as exc:  # report every failing case, not just the first
                    failures.append(f"sm_{arch} {str(dtype)[6:]} {label}: {type(exc).__name__}: {exc}")
        log.uninstall()
        seconds = time.perf_counter() - start
        print(f"sm_{arch}: {sum(map(len, log.variants.values()))} kernel variants compiled in {seconds:.0f} s "
              f"(triton {triton.__version__})")
        for name in sorted(log.variants):
            print(f"  {name:28s} {len(log.variants[name]):3d} variants, up to {log.shared_bytes[name]} B shared memory")
        missing = expected - set(log.variants)
        if missing:
            failures.append(f"sm_{arch}: never compiled (add a case that launches them): {sorted(missing)}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
