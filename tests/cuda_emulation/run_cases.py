"""Runs the host-emulated GroupNorm+SiLU kernels against the reference backend: the real kernels of csrc/ (built
by ``build.py`` into a library whose ops take CPU tensors) through diffkern's CUDA-backend wrappers
(``diffkern/_cuda_ops.py``; the regimes through the raw ops, which take the ``split`` argument), compared with
``diffkern.testing.assert_close`` and, for dweight/dbias, ``assert_close_sum``; and calls from several host
threads.

Covers every dtype (float32, float16, bfloat16) and layout (contiguous, channels-last, misaligned storage) and
every GroupNorm regime (fused, split over channels or pixels, vector and scalar paths, automatic choice on
emulated devices of several sizes). ``--quick`` keeps one case per combination that matters. The steps and
add_noise are not here: their op test files run on the emulated library as the cuda backend
(tests/test_cuda_emulated.py).

Must run in its own process: the emulated library defines the diffkern ops, which the real extension defines
too (a process can hold only one of them). Inputs are random and fresh each run: the seed is printed, and
``DIFFKERN_TEST_SEED`` (or ``--seed``) replays a run; ``--only TEXT`` runs the cases whose name contains TEXT.

    python tests/cuda_emulation/run_cases.py --library BUILD_DIR/diffkern_emulated.so [--quick]

Exits 1 if any case fails (each failure is printed with its case name), 0 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the repository (diffkern) and tests/ (_helpers)

import torch  # noqa: E402

from _helpers import (check_large_mean_forward, check_param_grads,  # noqa: E402
                      group_norm_silu_param_grad_sums, same_layout)
from diffkern.ops.group_norm_silu import (  # noqa: E402
    group_norm_silu_backward_reference,
    group_norm_silu_forward_reference,
)
from diffkern.testing import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
TABLE = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()
EPS = 1e-5

Case = Tuple[str, Callable[[torch.Generator], None]]


class Draw:
    """Normal draws from one case's generator."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def __call__(self, *shape, dtype=torch.float32, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale + shift).to(dtype)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """contiguous; channels_last (4-D) / channels_last_3d (5-D); or misaligned: a contiguous view one element into
    its storage, so no sample starts on a 16-byte boundary (the scalar head/tail and scalar-only paths)."""
    if layout == "channels_last":
        return t.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()])
    if layout == "misaligned":
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view
    return t.contiguous()


def nhwc_3d(t: torch.Tensor) -> torch.Tensor:
    """(N, C, S) with channels-last strides (C*S, 1, C)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def compare(got, want, like: torch.Tensor, what: str) -> None:
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    want = (want,) if isinstance(want, torch.Tensor) else tuple(want)
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} output {i}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        assert same_layout(a, like), f"{what} output {i}: strides {a.stride()}, sample's {like.stride()}"
        assert_close(a, b, msg=f"{what} output {i}")


# ------------------------------------------------------------------------------------------------------------
# add_noise


# ------------------------------------------------------------------------------------------------------------
# GroupNorm + SiLU


def _gn_check(x, dy, weight, bias, groups, split, what):
    ops = torch.ops.diffkern
    y, mean, rstd = ops.group_norm_silu_fwd_cuda(x, weight, bias, groups, EPS, split)
    y_ref, mean_ref, rstd_ref = group_norm_silu_forward_reference(x, weight, bias, groups, EPS)
    assert same_layout(y, x), f"{what}: y strides {y.stride()}, x's {x.stride()}"
    assert_close(mean, mean_ref, msg=f"{what} mean")
    assert_close(rstd, rstd_ref, msg=f"{what} rstd")
    assert_close(y, y_ref, msg=f"{what} y")
    dx, dweight, dbias = ops.group_norm_silu_bwd_cuda(dy, x, weight, bias, mean_ref, rstd_ref, groups, split)
    dx_ref, dw_ref, db_ref = group_norm_silu_backward_reference(dy, x, weight, bias, mean_ref, rstd_ref, groups)
    assert same_layout(dx, x), f"{what}: dx strides {dx.stride()}, x's {x.stride()}"
    assert_close(dx, dx_ref, msg=f"{what} dx")
    for name, param, got in (("dweight", weight, dweight), ("dbias", bias, dbias)):
        assert param is not None or got.numel() == 0, f"{what}: {name} of an absent parameter is not empty"
    grads = dict(dweight=dweight if weight is not None else None, dbias=dbias if bias is not None else None)
    check_param_grads(grads, dict(dweight=dw_ref, dbias=db_ref),
                      group_norm_silu_param_grad_sums(dy, x, weight, bias, groups, EPS), msg=f"{what} ")
    # No atomics, a fixed reduction order: a second run is bitwise identical.
    again = ops.group_norm_silu_bwd_cuda(dy, x, weight, bias, mean_ref, rstd_ref, groups, split)
    assert all(torch.equal(a, b) for a, b in zip((dx, dweight, dbias), again)), f"{what}: backward not reproducible"


def gn_cases(quick: bool) -> List[Case]:
    def case(dtype, n, c, s, groups, layout, split, affine="both", param_dtype=torch.float32, sm_count=4,
             smem_optin=None):
        def run(gen):
            draw = Draw(gen)
            x = draw(n, c, s, dtype=dtype, scale=1.5, shift=-0.3)
            dy = draw(n, c, s, dtype=dtype)
            if layout == "nhwc":
                x, dy = nhwc_3d(x), nhwc_3d(dy)
            weight = draw(c, dtype=param_dtype, scale=0.5, shift=1.0) if affine in ("both", "weight") else None
            bias = draw(c, dtype=param_dtype) if affine in ("both", "bias") else None
            with emulated_device(sm_count, smem_optin):
                _gn_check(x, dy, weight, bias, groups, split, f"group_norm_silu {name}")
        name = (f"{dtype} N={n} C={c} S={s} G={groups} {layout} split={split} affine={affine} params={param_dtype} "
                f"SMs={sm_count}" + (f" smem={smem_optin}" if smem_optin else ""))
        return (f"gn {name}", run)

    cases = []
    for dtype, layout in itertools.product(DTYPES, ["nchw", "nhwc"]):
        # Every regime: 0 automatic (4 SMs: N*G = 8 >= 4 is fused), -1 fused, k >= 1 slices (3 > rows for NCHW).
        for split in [0, -1, 1, 2, 3]:
            cases.append(case(dtype, 2, 12, 20, 4, layout, split))
        cases.append(case(dtype, 3, 6, 7, 3, layout, 0))             # odd S: scalar rows (NCHW)
        cases.append(case(dtype, 2, 16, 64, 2, layout, 2))           # Cg = 8, vector rows
        cases.append(case(dtype, 2, 8, 1, 8, layout, 0, affine="none"))  # S = 1, Cg = 1
        cases.append(case(dtype, 1, 4, 40, 2, layout, 3, affine="bias"))
        if not quick:
            cases.append(case(dtype, 1, 4, 40, 1, layout, -1, affine="weight"))
            cases.append(case(dtype, 2, 4, 33, 2, layout, 0, affine="none"))
            cases.append(case(dtype, 2, 12, 20, 4, layout, 7))      # more slices than rows or pixels
            cases.append(case(dtype, 2, 12, 20, 4, layout, 0, sm_count=64))  # automatic: split (few groups)
    f32 = torch.float32
    cases += [
        case(f32, 2, 8, 48, 2, "nchw", 0, param_dtype=torch.float16),
        case(f32, 2, 8, 48, 2, "nhwc", 2, param_dtype=torch.bfloat16),
        case(torch.float16, 2, 8, 48, 2, "nhwc", 0, param_dtype=torch.float64),
        case(f32, 1, 1040, 2, 4, "nhwc", 1),       # 260 vectors of channels > 256 threads: two column chunks
        case(torch.float16, 1, 2056, 2, 8, "nhwc", 1),  # 257 fp16 vectors
        case(f32, 1, 301, 5, 7, "nhwc", 0),        # odd C: scalar, 301 > 256 channels
        case(f32, 1, 40, 300, 2, "nchw", 0),       # rows of 75 vectors: teams of 32 lanes
        case(f32, 2, 128, 1, 16, "nchw", 0),     # S = 1, many groups of 8 channels
        case(f32, 2, 16, 64, 2, "nchw", 0, smem_optin=1024),  # the group does not fit: automatic split
        case(f32, 2, 16, 64, 2, "nchw", -1, smem_optin=1024),  # -1 without room: split as well
    ]
    if not quick:
        cases += [
            case(f32, 2, 520, 3, 2, "nhwc", 0),
            case(f32, 1, 300, 5, 3, "nhwc", 2),
            case(torch.bfloat16, 2, 320, 16, 32, "nchw", 0, sm_count=132),
            case(torch.bfloat16, 2, 320, 16, 32, "nhwc", 0, sm_count=132),
        ]

    def large_mean(layout, split):
        def run(gen):
            x = Draw(gen)(2, 32, 64, shift=1000.0)
            if layout == "nhwc":
                x = nhwc_3d(x)
            with emulated_device(4, None):
                y, mean, rstd = torch.ops.diffkern.group_norm_silu_fwd_cuda(x, None, None, 8, EPS, split)
            check_large_mean_forward(x, 8, EPS, y, mean, rstd)
        return (f"gn large mean {layout} split={split}", run)

    cases += [large_mean(layout, split) for layout in ("nchw", "nhwc") for split in ((0, 2) if quick else (0, -1, 2))]

    def through_wrappers(layout):
        def run(gen):
            from diffkern import _cuda_ops as K

            draw = Draw(gen)
            x, dy = draw(2, 8, 30), draw(2, 8, 30)
            if layout == "nhwc":
                x, dy = nhwc_3d(x), nhwc_3d(dy)
            weight = draw(8)
            y, mean, rstd = K.group_norm_silu_forward(x, weight, None, 4, EPS)
            want = group_norm_silu_forward_reference(x, weight, None, 4, EPS)
            for got, ref, nm in zip((y, mean, rstd), want, ("y", "mean", "rstd")):
                assert_close(got, ref, msg=f"wrapper {nm}")
            dx, dweight, dbias = K.group_norm_silu_backward(dy, x, weight, None, mean, rstd, 4)
            dx_ref, dw_ref, _ = group_norm_silu_backward_reference(dy, x, weight, None, want[1], want[2], 4)
            assert dbias is None and same_layout(dx, x)
            assert_close(dx, dx_ref, msg="wrapper dx")
            check_param_grads(dict(dweight=dweight, dbias=None), dict(dweight=dw_ref, dbias=None),
                              group_norm_silu_param_grad_sums(dy, x, weight, None, 4, EPS), msg="wrapper ")
        return (f"gn through the wrappers {layout}", run)

    cases += [through_wrappers("nchw"), through_wrappers("nhwc")]
    return cases


class emulated_device:
    """Sets the emulated device's SM count and opt-in shared memory (read by the library at each call)."""

    def __init__(self, sm_count, smem_optin):
        self.values = {"DIFFKERN_EMU_SM_COUNT": str(sm_count)}
        if smem_optin:
            self.values["DIFFKERN_EMU_SMEM_OPTIN"] = str(smem_optin)

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in ("DIFFKERN_EMU_SM_COUNT", "DIFFKERN_EMU_SMEM_OPTIN")}
        for k in self.saved:
            os.environ.pop(k, None)
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------------------


def thread_cases(quick: bool) -> List[Case]:
    """Several host threads calling the library at once (a GPU program's threads share one device too): each
    result must equal that of the same call made alone."""
    from diffkern import _cuda_ops as K

    def run(gen):
        draw = Draw(gen)
        calls = []
        for i in range(6):
            if i % 2:
                calls.append((K.add_noise, (draw(2, 4, 8, 8), draw(2, 4, 8, 8), TABLE, torch.tensor([3, 700]))))
            else:  # (N, C, S), as the backend contract hands GroupNorm its input
                calls.append((lambda *a: K.group_norm_silu_forward(*a)[0], (draw(2, 4, 64), draw(4), draw(4), 2, EPS)))
        alone = [fn(*args) for fn, args in calls]
        together = [None] * len(calls)

        def worker(i):
            fn, args = calls[i]
            together[i] = fn(*args)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (got, want) in enumerate(zip(together, alone)):
            if got is None or not torch.equal(got, want):
                raise AssertionError(f"call {i} made from a thread differs from the same call made alone")
    return [("threads: concurrent calls from 6 host threads", run)]


def all_cases(quick: bool) -> List[Case]:
    return gn_cases(quick) + thread_cases(quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", required=True, type=Path, help="the emulated library (build.py's output)")
    parser.add_argument("--quick", action="store_true", help="fewer cases, still every op/dtype/layout/regime")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: $DIFFKERN_TEST_SEED, else random)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else int(os.environ.get("DIFFKERN_TEST_SEED")
                                                        or int.from_bytes(os.urandom(4), "little"))
    print(f"emulated cuda backend: base seed {seed} (replay with DIFFKERN_TEST_SEED={seed})", flush=True)

    from diffkern.ops import _declaration

    _declaration.define_cuda_ops()  # the schemas first: the GroupNorm cases call the raw ops
    torch.ops.load_library(str(args.library))
    from diffkern import _extension

    cases = [c for c in all_cases(args.quick) if args.only in c[0]]
    failures = []
    start = time.perf_counter()
    for name, run in cases:
        gen = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % (2**63))
        try:
            run(gen)
        except Exception:  # noqa: BLE001 - every failure is reported, then the run goes on
            failures.append(name)
            print(f"FAILED: {name}\n{traceback.format_exc()}", flush=True)
    # The wrappers must have used the emulated library, not loaded another one.
    status = _extension.status()
    if status["source"] not in (None, "external"):
        failures.append(f"diffkern._extension loaded a library of its own: {status}")
    elapsed = time.perf_counter() - start
    print(f"{len(cases) - len(failures)} of {len(cases)} cases passed in {elapsed:.1f} s"
          + (f" (seed {seed}); failed:\n  " + "\n  ".join(failures) if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
