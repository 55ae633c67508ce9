#!/usr/bin/env python3
"""Every CUDA kernel of the extension once (or a few times) on small, odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python scripts/sanitizer_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitizer_cases.py
    python scripts/sanitizer_cases.py --quick --list     # name the cases without a GPU

Covers each dtype, NCHW and channels-last, misaligned storage (scalar head/tail paths), per-sample timesteps,
guidance, every prediction and variance type, clipping and thresholding, eta > 0, and every GroupNorm regime
(fused, split into several slices, channels-last, vectorised and scalar). Synchronises after each case so a
fault is attributed to it. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every allocation is exact and
an out-of-bounds access cannot land in the caching allocator's slack. Prints "ok" at the end.

``--quick`` (scripts/gpu_session.py, where the sanitizer gets well under a minute per tool) keeps every kernel
instantiation and memory-access pattern of the full set and drops the variants that only change a runtime
branch inside the same kernel: one prediction type instead of three (the guided/noise/x0-pass templates all
stay), ``fixed_small`` for the fixed DDPM variances (one ``switch`` in one kernel), and for GroupNorm the shapes
that reach the vectorised (C = 12, 1040) and scalar (C = 301) paths, each fused (split -1) and split into
slices (split 3), in both layouts. ``--list`` prints the case names without running them (on the CPU, no
extension loaded): the dry run of the GPU session uses it.
"""

from __future__ import annotations

import argparse
import sys

import torch

import diffkern
from diffkern import _cuda_ops
from diffkern.schedules import NoiseSchedule

DEVICE = torch.device("cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


PREDICTIONS = ("epsilon", "v_prediction", "sample")
FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
GN_SHAPES = ((2, 12, 20, 4), (3, 6, 7, 3), (1, 40, 64, 2), (2, 1040, 5, 8), (1, 301, 6, 7))  # (N, C, S, groups)
GN_SPLITS = (0, -1, 1, 3)
# --quick: the same kernels and access patterns, fewer runtime-branch variants (see the module docstring).
QUICK_PREDICTIONS = ("epsilon",)
QUICK_FIXED_VARIANCES = ("fixed_small",)
QUICK_GN_SHAPES = ((2, 12, 20, 4), (2, 1040, 5, 8), (1, 301, 6, 7))
QUICK_GN_SPLITS = (-1, 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every kernel, fewer runtime-branch variants")
    parser.add_argument("--list", action="store_true", help="print the case names without running them")
    args = parser.parse_args(argv)
    predictions = QUICK_PREDICTIONS if args.quick else PREDICTIONS
    fixed_variances = QUICK_FIXED_VARIANCES if args.quick else FIXED_VARIANCES
    gn_shapes = QUICK_GN_SHAPES if args.quick else GN_SHAPES
    gn_splits = QUICK_GN_SPLITS if args.quick else GN_SPLITS
    device = torch.device("cpu") if args.list else DEVICE
    if not args.list and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cpu").manual_seed(0)
    count = 0

    def draw(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def misaligned(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view

    def case(name, fn):
        nonlocal count
        if not args.list:
            fn()
            torch.cuda.synchronize()
        count += 1
        print(f"  {name}", flush=True)

    table = NoiseSchedule.from_name("scaled_linear", 1000, 0.00085, 0.012).table(device)
    ops = None if args.list else _cuda_ops._ops()  # loads the extension (outside the timed cases)

    for dtype in DTYPES:
        print(dtype, flush=True)
        shape = (3, 3, 5, 7)
        t = torch.tensor([999, 0, 41], device=device)
        for layout in ("contiguous", "channels_last", "misaligned"):
            def lay(x, layout=layout):
                if layout == "channels_last":
                    return x.contiguous(memory_format=torch.channels_last)
                return misaligned(x) if layout == "misaligned" else x

            x, z, mo = lay(draw(*shape, dtype=dtype)), lay(draw(*shape, dtype=dtype)), lay(draw(6, 3, 5, 7, dtype=dtype))
            case(f"add_noise {layout}", lambda: diffkern.add_noise(x, z, t, table, backend="cuda"))
            for pred in predictions:
                case(f"ddim {layout} {pred}", lambda: diffkern.ddim_step(
                    mo, t, x, table, prev_timestep=t - 20, eta=1.0, noise=z, prediction_type=pred, clip_sample=True,
                    use_clipped_model_output=True, guidance_scale=2.0, backend="cuda"))
            case(f"ddim {layout} threshold", lambda: diffkern.ddim_step(
                mo[:3], t, x, table, prev_timestep=t - 20, thresholding=True, backend="cuda"))
            for var in fixed_variances:
                case(f"ddpm {layout} {var}", lambda: diffkern.ddpm_step(
                    mo, t, x, table, noise=z, variance_type=var, guidance_scale=3.0, backend="cuda"))
            case(f"ddpm {layout} threshold, no noise", lambda: diffkern.ddpm_step(
                mo[:3], 0, x, table, thresholding=True, backend="cuda"))
        learned_out = draw(6, 6, 5, 7, dtype=dtype).abs()
        for var in ("learned", "learned_range"):
            case(f"ddpm {var}", lambda: diffkern.ddpm_step(
                learned_out, t, draw(*shape, dtype=dtype), table, noise=draw(*shape, dtype=dtype), variance_type=var,
                guidance_scale=3.0, backend="cuda"))
            case(f"ddpm {var} misaligned", lambda: diffkern.ddpm_step(
                misaligned(learned_out[:3]), t, misaligned(draw(*shape, dtype=dtype)), table,
                noise=misaligned(draw(*shape, dtype=dtype)), variance_type=var, backend="cuda"))

        for n, c, s, groups in gn_shapes:
            for layout in ("nchw", "nhwc"):
                x3, dy = draw(n, c, s, dtype=dtype), draw(n, c, s, dtype=dtype)
                if layout == "nhwc":
                    x3, dy = x3.transpose(1, 2).contiguous().transpose(1, 2), dy.transpose(1, 2).contiguous().transpose(1, 2)
                w, b = draw(c), draw(c).half()
                for split in gn_splits:
                    def gn(x3=x3, dy=dy, w=w, b=b, split=split):
                        y, mean, rstd = ops.group_norm_silu_fwd_cuda(x3, w, b, groups, 1e-5, split)
                        ops.group_norm_silu_bwd_cuda(dy, x3, w, b, mean, rstd, groups, split)
                        ops.group_norm_silu_bwd_cuda(dy, x3, None, None, mean, rstd, groups, split)
                    case(f"group_norm_silu ({n}, {c}, {s}) G={groups} {layout} split={split}", gn)
    print(f"ok: {count} cases" + (" listed, none run" if args.list else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
