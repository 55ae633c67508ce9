"""``python -m diffkern bench``: time every op on every usable backend against the baselines a user would otherwise
run, report achieved bandwidth and speedups, and optionally write JSON and a plot.

This module is the benchmarks' one measuring front end: the cases (ops, shapes, dtypes, layouts, byte models,
inputs, baselines) are in :mod:`diffkern._bench_cases`; :class:`BenchSession` measures them; the command line
prints and writes the results. The pytest-benchmark suite in the repository's ``benchmarks/`` makes one test per
(case, impl) from the same case list, runs :meth:`BenchSession.run` and hands its samples to pytest-benchmark,
so both show the same figures (BENCHMARKS.md describes the method and the commands).

Timing (:func:`measure`) is the libraries' own:

- on a GPU, ``triton.testing.do_bench``: CUDA events around every call, the L2 cache flushed before each, its
  warm-up and repetition counts sized from its own first estimate; one sample per call;
- on a CPU, ``torch.utils.benchmark.Timer.blocked_autorange``: blocks of back-to-back calls on the host clock,
  with torch's current thread count; one sample per block (its time / calls per block).

Before timing, a first call per (case, impl) compiles and initialises what is lazy (Triton, ``torch.compile``)
and gives the outputs compared with the reference backend's. The reported time is the median sample; GB/s is
the case's byte model (:class:`diffkern._bench_cases.ByteModel`) divided by it, also given as a percentage of
the copy bandwidth measured in the same run (``dst.copy_(src)`` of a large tensor, timed the same way, 2x its
bytes); a speedup against a baseline is the baseline's median / this impl's, both from the same run.

JSON (``--json FILE``): an object with ``schema`` (:data:`SCHEMA`), ``created`` (UTC, ISO 8601), ``command``,
``device`` (type, name, L2 bytes, memory, ...), ``versions`` (python, torch, CUDA, triton, diffusers, diffkern),
``timing`` (the timer and its budget), ``copy_bandwidth`` (``bytes_per_tensor``, ``bytes_moved``, ``median_ms``,
``samples``, ``gbps``) and ``results``: one object per (case, impl) with ``case``, ``op``, ``shape_set``,
``shape``, ``layout``, ``dtype``, ``impl``, ``kind`` ("diffkern" or "baseline"), ``status`` ("ok", "skipped",
"mismatch" or "error"), ``reason``, ``bytes_moved``, ``byte_model`` (the formula), ``note``, and when measured
``median_ms``, ``min_ms``, ``q25_ms``, ``q75_ms``, ``samples``, ``calls_per_sample``, ``timer``, ``gbps``,
``copy_gbps``, ``pct_of_copy``, ``speedups`` ({baseline: ratio}) and ``max_abs_diff_vs_reference`` (null where
outputs are not comparable).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from diffkern import _bench_cases as cases
from diffkern._bench_cases import BACKEND_IMPLS, BASELINES, IMPLS, Case, Options

SCHEMA = "diffkern-bench/2"
# Diffkern backends must match the reference within this multiple of diffkern.testing's per-dtype tolerance
# before they are timed: a benchmark only guards against timing a broken kernel (tests/ checks correctness).
MISMATCH_FACTOR = 16


# --------------------------------------------------------------------------------------------------------------
# Timing

# Milliseconds of timed calls per measurement, by device type, full and --quick. On a GPU this is do_bench's
# ``rep``, with a quarter of it as ``warmup`` (Triton's defaults are 100 and 25); on a CPU blocked_autorange's
# ``min_run_time``, whose block-size estimate (blocks long enough that the timer's overhead is < 1e-4 of them) is
# the warm-up and, for small ops, most of the time spent. CPU timings only check the harness, so their budget is
# short: it keeps CI's run of the suite as fast as the hand-written timing it replaced.
REP_MS = {"cuda": 100.0, "cpu": 10.0}
QUICK_REP_MS = {"cuda": 40.0, "cpu": 5.0}
GPU_TIMER = "triton.testing.do_bench"
CPU_TIMER = "torch.utils.benchmark.Timer.blocked_autorange"


@dataclass
class Measurement:
    """Per-call times from one :func:`measure`: one sample per call (GPU) or per block of calls (CPU)."""
    samples_s: List[float]
    calls_per_sample: int
    timer: str

    def quantile_s(self, q: float) -> float:
        return torch.quantile(torch.tensor(self.samples_s, dtype=torch.float64), q).item()

    @property
    def median_s(self) -> float:
        return self.quantile_s(0.5)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)


def measure(fn: Callable[[], Any], device, rep_ms: float) -> Measurement:
    """Time ``fn()`` for about ``rep_ms`` on ``device``'s clock: ``triton.testing.do_bench`` on a GPU (device time
    per call, cold L2), ``torch.utils.benchmark`` on a CPU (host time per call, back to back).

    A host-overhead measurement (the time a caller's thread spends per call, GPU or not) would be a third timer
    chosen here, ``torch.utils.benchmark`` being the natural one."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        times_ms = do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, return_mode="all")
        return Measurement([t / 1e3 for t in times_ms], 1, GPU_TIMER)
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=rep_ms / 1e3)
    return Measurement(list(m.times), m.number_per_run, CPU_TIMER)


def timing_info(device, rep_ms: float) -> Dict[str, Any]:
    """What :func:`measure` does on ``device`` with ``rep_ms``: the JSON's ``timing`` object."""
    if torch.device(device).type == "cuda":
        return {"timer": GPU_TIMER, "rep_ms": rep_ms, "warmup_ms": rep_ms / 4,
                "method": "CUDA events around each call, L2 flushed before each call; median over calls"}
    return {"timer": CPU_TIMER, "min_run_time_ms": rep_ms, "threads": torch.get_num_threads(),
            "method": "host clock around blocks of back-to-back calls; median over blocks of time / calls"}


# --------------------------------------------------------------------------------------------------------------
# Device and versions


def device_info(device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
                "l2_bytes": getattr(props, "L2_cache_size", None)}
    return {"type": device.type, "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> Dict[str, Optional[str]]:
    import diffkern

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _dist_version("triton"), "diffusers": _dist_version("diffusers"),
            "diffkern": diffkern.__version__}


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    case: Case
    impl: str
    status: str                             # "ok", "skipped", "mismatch" or "error"
    reason: str = ""
    measurement: Optional[Measurement] = None
    max_abs_diff: Optional[float] = None
    speedups: Dict[str, float] = field(default_factory=dict)

    @property
    def gbps(self) -> Optional[float]:
        return self.case.bytes_moved / self.measurement.median_s / 1e9 if self.measurement else None

    def to_dict(self, copy_gbps: Optional[float]) -> Dict[str, Any]:
        case = self.case
        out: Dict[str, Any] = {
            "case": case.id, "op": case.op, "shape_set": case.shape_set, "shape": list(case.shape),
            "layout": case.layout, "dtype": case.dtype, "impl": self.impl,
            "kind": "baseline" if self.impl in BASELINES else "diffkern", "status": self.status, "reason": self.reason,
            "bytes_moved": case.bytes_moved, "byte_model": case.spec.bytes.formula,
            "note": case.spec.note if self.impl == "diffusers" else "",
        }
        m = self.measurement
        if m is not None:
            out.update(median_ms=m.median_s * 1e3, min_ms=m.min_s * 1e3, q25_ms=m.quantile_s(0.25) * 1e3,
                       q75_ms=m.quantile_s(0.75) * 1e3, samples=len(m.samples_s), calls_per_sample=m.calls_per_sample,
                       timer=m.timer, gbps=self.gbps, copy_gbps=copy_gbps,
                       pct_of_copy=(100 * self.gbps / copy_gbps) if copy_gbps else None,
                       speedups=dict(self.speedups))
        # JSON has no infinity: a non-finite difference (NaN or inf where the reference is finite) becomes null,
        # and the status and reason say what happened.
        diff = self.max_abs_diff
        out["max_abs_diff_vs_reference"] = diff if diff is not None and math.isfinite(diff) else None
        return out


def _max_abs_diff(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    return max(float((a.detach().double() - e.double()).abs().nan_to_num(nan=math.inf).max()) if a.numel() else 0.0
               for a, e in zip(actual, expected))


def _matches(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> bool:
    from diffkern.testing import tolerance

    for a, e in zip(actual, expected):
        rtol, atol = tolerance(a.dtype)
        if not torch.allclose(a.detach().double(), e.double(), rtol=MISMATCH_FACTOR * rtol,
                              atol=MISMATCH_FACTOR * atol, equal_nan=True):
            return False
    return True


class BenchSession:
    """Measures (case, impl) pairs on one device and keeps the results, so that speedups come from one run.

    Inputs are built once per case and shared by its impls; only the latest case's inputs are kept alive, which
    bounds memory when running through all cases in order. ``quick`` shortens every measurement (``--quick``)."""

    def __init__(self, device, *, options: Options = Options(), quick: bool = False, seed: int = 0,
                 baselines: Sequence[str] = BASELINES):
        self.device = torch.device(device)
        self.options = options
        self.baselines = tuple(baselines)   # the baselines measured for speedups (the command line's --impls)
        self.quick = quick
        self.rep_ms = (QUICK_REP_MS if quick else REP_MS)[self.device.type]
        self.seed = seed
        self.results: Dict[Tuple[str, str], Result] = {}
        self._workload: Optional[cases.Workload] = None
        self._copy: Optional[Dict[str, Any]] = None

    # The copy probe --------------------------------------------------------------------------------------------

    def copy_bandwidth(self) -> Dict[str, Any]:
        """Device-to-device copy bandwidth, timed like the ops (measured once per session): a 256 MiB tensor on a
        GPU (many times any L2), 64 MiB on a CPU (16 MiB with ``quick``)."""
        if self._copy is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                size = min(256 * 2**20, free // 8)
            else:
                size = (16 if self.quick else 64) * 2**20
            src = torch.randn(size // 4, device=self.device)
            dst = torch.empty_like(src)
            m = measure(lambda: dst.copy_(src), self.device, self.rep_ms)
            moved = 2 * src.nbytes
            self._copy = {"bytes_per_tensor": src.nbytes, "bytes_moved": moved, "median_ms": m.median_s * 1e3,
                          "samples": len(m.samples_s), "gbps": moved / m.median_s / 1e9}
            del src, dst
        return self._copy

    # Measuring -------------------------------------------------------------------------------------------------

    def workload(self, case: Case) -> cases.Workload:
        if self._workload is None or self._workload.case != case:
            self._workload = None   # release the previous case's inputs before allocating this one's
            self._workload = cases.build_workload(case, self.device, seed=self.seed)
        return self._workload

    def run(self, case: Case, impl: str, *, raise_errors: bool = False) -> Result:
        """Measure ``impl`` on ``case`` (once per session: a repeated request returns the stored result). A
        diffkern backend first makes sure its case's baselines (those of ``self.baselines``) are measured; a
        baseline, the baselines before it in ``BASELINES``. An impl's exception becomes an "error" result unless
        ``raise_errors``."""
        key = (case.id, impl)
        if key in self.results:
            return self.results[key]
        reason = cases.unavailable_reason(case, impl, self.device, self.options)
        if reason is not None:
            result = Result(case, impl, "skipped", reason)
        else:
            earlier = BASELINES[:BASELINES.index(impl)] if impl in BASELINES else BASELINES
            for baseline in earlier:
                if baseline in case.spec.baselines and baseline in self.baselines \
                        and (case.id, baseline) not in self.results:
                    self.run(case, baseline, raise_errors=raise_errors)
            try:
                result = self._measure(case, impl)
            except Exception as exc:  # a failing impl is a result of the run, not the end of it
                if raise_errors:
                    raise
                result = Result(case, impl, "error", f"{type(exc).__name__}: {exc}")
        self.results[key] = result
        if result.measurement is not None:
            result.speedups = self.speedups(case, impl)
        return result

    def _measure(self, case: Case, impl: str) -> Result:
        workload = self.workload(case)
        fn = functools.partial(cases.make_impl(workload, impl), workload.inputs)
        # The first call: compilation and lazy initialisation, and the outputs to compare.
        outputs = fn()
        diff = None
        if cases.compares_with_reference(case, impl):
            expected = workload.expected()
            diff = _max_abs_diff(outputs, expected)
            if impl in BACKEND_IMPLS and not _matches(outputs, expected):
                return Result(case, impl, "mismatch",
                              f"outputs differ from the reference backend by up to {diff:.3g} (more than "
                              f"{MISMATCH_FACTOR}x diffkern.testing's {case.dtype} tolerance); not timed",
                              max_abs_diff=diff)
        del outputs
        return Result(case, impl, "ok", measurement=measure(fn, self.device, self.rep_ms), max_abs_diff=diff)

    def speedups(self, case: Case, impl: str) -> Dict[str, float]:
        """{baseline: baseline time / impl time} over the baselines measured so far for ``case``."""
        mine = self.results.get((case.id, impl))
        if mine is None or mine.measurement is None:
            return {}
        out = {}
        for baseline in BASELINES:
            other = self.results.get((case.id, baseline))
            if baseline != impl and other is not None and other.measurement is not None:
                out[baseline] = other.measurement.median_s / mine.measurement.median_s
        return out

    def timing_info(self) -> Dict[str, Any]:
        return timing_info(self.device, self.rep_ms)


# --------------------------------------------------------------------------------------------------------------
# Reporting


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:8.3f} ms"
    return f"{seconds:8.3f} s "


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_case(case: Case, results: Sequence[Result], copy_gbps: Optional[float]) -> str:
    lines = [f"{case.title}   [{case.shape_set}; {case.spec.bytes.formula} = {_fmt_bytes(case.bytes_moved)}]"]
    for r in results:
        if r.measurement is None:
            if r.status != "skipped":
                lines.append(f"  {r.impl:<10} {r.status.upper()}: {r.reason}")
            continue
        pct = f"{100 * r.gbps / copy_gbps:6.1f}%" if copy_gbps else "      -"
        ratios = "  ".join(f"vs {b} {x:.2f}x" for b, x in r.speedups.items())
        lines.append(f"  {r.impl:<10} {_fmt_time(r.measurement.median_s)} {r.gbps:9.2f} GB/s {pct}   {ratios}")
    return "\n".join(lines)


def format_skipped(results: Sequence[Result]) -> str:
    grouped: Dict[Tuple[str, str], int] = defaultdict(int)
    for r in results:
        if r.status == "skipped":
            grouped[(r.impl, r.reason)] += 1
    return "\n".join(f"  skipped {impl} ({count} case(s)): {reason}" for (impl, reason), count in grouped.items())


def write_plot(path: str, results: Sequence[Result], copy_gbps: Optional[float], title: str) -> None:
    """GB/s against bytes moved: one panel per op, one colour per impl, one marker per dtype."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [r for r in results if r.measurement is not None]
    ops = [op for op in cases.OPS if any(r.case.op == op for r in measured)] or ["(no results)"]
    ncols = min(3, len(ops))
    nrows = math.ceil(len(ops) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colours = {impl: f"C{i}" for i, impl in enumerate(IMPLS)}
    markers = {"fp32": "o", "fp16": "s", "bf16": "^"}
    for index, op in enumerate(ops):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        series: Dict[Tuple[str, str], List[Tuple[int, float]]] = defaultdict(list)
        for r in measured:
            if r.case.op == op:
                series[(r.impl, r.case.dtype)].append((r.case.bytes_moved, r.gbps))
        for (impl, dtype), points in sorted(series.items(), key=lambda kv: IMPLS.index(kv[0][0])):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colours[impl], marker=markers[dtype],
                    linewidth=1, markersize=4, label=f"{impl} {dtype}")
        if copy_gbps:
            ax.axhline(copy_gbps, color="grey", linestyle="--", linewidth=1, label="copy")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes moved per call (byte model)")
        ax.set_ylabel("GB/s")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffkern bench",
        description="Time diffkern's ops on every usable backend against eager PyTorch, torch.compile and "
                    "diffusers; report GB/s, % of copy bandwidth and speedups (method: BENCHMARKS.md).")
    parser.add_argument("--quick", action="store_true",
                        help="a few small shapes, one dtype (fp16 on a GPU, fp32 on CPU) and short timings")
    parser.add_argument("--json", metavar="FILE", help="write every result as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG of GB/s against bytes moved")
    parser.add_argument("--ops", nargs="+", choices=tuple(cases.OPS), metavar="OP",
                        help=f"ops to run (default: all): {', '.join(cases.OPS)}")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(cases.DTYPES), metavar="DTYPE",
                        help="dtypes to run: fp32 fp16 bf16 (default: all; --quick: one)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, metavar="IMPL",
                        help=f"backends and baselines to run (default: all): {', '.join(IMPLS)}")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when visible)")
    parser.add_argument("--cpu-triton", action="store_true",
                        help="on CPU, also time the Triton kernels in the interpreter (not a performance path)")
    parser.add_argument("--cpu-compile", action="store_true", help="on CPU, also time torch.compile (slow to compile)")
    parser.add_argument("--cpu-threads", type=int, default=1, metavar="N",
                        help="on CPU, torch threads while timing (default: 1, which keeps timings steady on a "
                             "shared machine; 0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--host", action="store_true",
                        help="instead: the host cost per call of every op and backend (device work skipped) beside "
                             "a bare aten op and diffusers, and on a GPU the eager latency per call at SD 1.5 / SDXL "
                             "latents (diffkern/host_bench.py); --quick: tiny tensors only")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m diffkern bench``; returns the exit status (1 if an impl failed or mismatched)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be a cuda or cpu device, got {device}")
    if args.cpu_threads < 0:
        raise SystemExit(f"--cpu-threads must be >= 0, got {args.cpu_threads}")
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.cpu_threads:
        # Intra-op threads that share their cores with other processes wait on each other at every op: on a busy
        # two-core machine that made small ops tens of times slower. One thread keeps the harness fast and steady.
        torch.set_num_threads(args.cpu_threads)
    try:
        if args.host:
            from diffkern import host_bench
            return host_bench.main(device, working_sizes=not args.quick)
        return _run(args, argv, device)
    finally:
        torch.set_num_threads(threads)   # main() may run inside another program (the tests)


def _run(args: argparse.Namespace, argv: List[str], device: torch.device) -> int:
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if device.type == "cpu" and args.cpu_triton and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter is chosen when triton is first imported, which has not happened yet (diffkern imports
        # triton only when a Triton kernel first runs).
        if "triton" in sys.modules:
            raise SystemExit("--cpu-triton needs TRITON_INTERPRET=1 before triton is imported; set it in the "
                             "environment")
        os.environ["TRITON_INTERPRET"] = "1"
        from diffkern import backends
        backends.clear_cache()

    dtypes = args.dtypes or ((("fp16",) if device.type == "cuda" else ("fp32",)) if args.quick else None)
    where = "gpu" if device.type == "cuda" else "cpu"
    selected = cases.make_cases(ops=args.ops, dtypes=dtypes, where=where, quick=args.quick)
    impls = [impl for impl in IMPLS if args.impls is None or impl in args.impls]
    session = BenchSession(device, options=Options(cpu_triton=args.cpu_triton, cpu_compile=args.cpu_compile),
                           quick=args.quick, seed=args.seed, baselines=[b for b in BASELINES if b in impls])

    info, vers = device_info(device), versions()
    print(f"diffkern bench on {info['name']} ({device}); torch {vers['torch']}, CUDA {vers['cuda']}, "
          f"triton {vers['triton']}, diffusers {vers['diffusers']}")
    if device.type != "cuda":
        print("No GPU: CPU timings at CPU-sized shapes, for checking the harness; they are not performance "
              "claims. The GPU shape sets run on a CUDA device.")
    copy = session.copy_bandwidth()
    copy_gbps = copy["gbps"]
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s ({_fmt_bytes(copy['bytes_per_tensor'])} tensor)")
    print(f"time = median per call ({session.timing_info()['timer']}); GB/s from the byte model "
          "(diffkern/_bench_cases.py: OPS); speedup = baseline time / this time\n")

    ordered: List[Result] = []
    for case in selected:
        block = [session.run(case, impl) for impl in impls]
        for result in block:
            # Refresh: a baseline's ratios against the baselines measured after it.
            result.speedups = session.speedups(case, result.impl)
        ordered.extend(block)
        print(format_case(case, block, copy_gbps), flush=True)
    skipped = format_skipped(ordered)
    if skipped:
        print("\n" + skipped)

    if args.json:
        document = {
            "schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m diffkern bench"] + argv), "device": info, "versions": vers,
            "timing": session.timing_info(), "copy_bandwidth": copy,
            "results": [r.to_dict(copy_gbps) for r in ordered],
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1, allow_nan=False)
        print(f"\nwrote {args.json}")
    if args.plot:
        title = f"diffkern on {info['name']} (torch {vers['torch']})"
        if device.type != "cuda":
            title += ": CPU timings, not performance claims"
        write_plot(args.plot, ordered, copy_gbps, title)
        print(f"wrote {args.plot}")
    return 1 if any(r.status in ("error", "mismatch") for r in ordered) else 0


if __name__ == "__main__":
    sys.exit(main())
