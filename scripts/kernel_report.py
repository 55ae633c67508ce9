"""The kernel report: every Triton variant and every CUDA kernel diffkern launches at the benchmark shapes, compiled
for sm_90 (an H100/H200) without a GPU, with what its compiled code says about how it would run.

Per kernel and case (op, shape, dtype, layout) it prints registers, local-memory accesses (spills), shared memory,
the widths of the global loads and stores in the SASS, the CTAs launched against 132 SMs (waves), occupancy and
an estimate of the bytes in flight per SM; ``--json`` writes all of it for tests/test_kernel_report.py, which holds
the contract (``contract_violations``):

- ``spills``: no local-memory access (``LDL``/``STL`` in the SASS, or a LOCAL/STACK frame) in any kernel;
- ``load16`` / ``store16``: a kernel that streams the op's big tensors has 16-byte global loads in its hot loop
  (``load16``) and, if it writes them, 16-byte global stores (``store16``), on every path whose layout and
  alignment allow them (all the cases here: fresh, 16-byte aligned tensors whose contiguous extent -- S in NCHW, C in
  channels-last, the sample for the steps -- is a multiple of 16 bytes);
- ``waves``: for cases whose main tensor (x, or the sample) is 8 MiB or more, each streaming kernel launches at
  least 2 waves of CTAs;
- ``inflight``: for those cases, at least 20 KB estimated in flight per SM (Little's law on an H200: ~4.3 TB/s
  x ~0.7 us / 132 SMs ~ 23 KB).

Where the figures come from
    Triton: scripts/compile_triton_kernels.py's machinery (its compile-only driver for sm_90 and launches turned
    into warmup compiles) runs the public ops with ``backend="triton"`` on CPU tensors of the full benchmark
    shapes made with ``torch.empty`` (never touched, so they cost address space, not memory). Each launch gives the
    compiled variant (its cubin, ``num_warps``, shared memory) and the grid the launcher computed at that shape.

    CUDA: the device code is csrc/ compiled for sm_90 (``nvcc -cubin``; or the objects of a build directory, e.g.
    scripts/ci_wheel_check.sh's build/cuda-ci, when they are newer than every source). The grids are the C++ code's
    own: the host emulation of tests/cuda_emulation is built and the public ops run with ``backend="cuda"`` on the
    same empty full-size CPU tensors with ``DIFFKERN_EMU_LAUNCH_LOG`` set, so every launch is recorded (kernel,
    grid, block, dynamic shared memory) instead of run, on an emulated device of 132 SMs and 227 KB of opt-in shared
    memory. The planner (csrc/gn_plan.cuh), the elementwise engine's grid and every launch site run as compiled
    C++: nothing is mirrored in Python. The recorded kernel (a host function address) is named through the emulated
    library's symbol table and matched, demangled, with the sm_90 cubin's function.

    Both: ``cuobjdump -res-usage`` (registers, static shared memory, local frame) and ``cuobjdump -sass`` (the
    instructions) of each cubin, from the toolkit or the triton wheel.

The model (estimates from compiled code, not measurements)
    occupancy   CTAs resident per SM = min(32, 2048 // threads, register limit, shared-memory limit), sm_90:
                65536 registers per SM allocated per warp in units of 256, 233472 bytes of shared memory per
                SM and 1 KB reserved per CTA.
    waves       CTAs launched / (132 x CTAs resident per SM).
    in flight   per SM = min(CTAs resident per SM, ceil(CTAs / 132)) x threads per CTA x bytes one thread has
                outstanding in the hot loop. The hot loop: of the SASS loops (a backward branch and its target)
                that hold global loads and no inner loop that does, the one with the most load bytes; a kernel
                without such a loop counts all its loads. Its load bytes are the sum of the widths of the global
                loads in its body, assumed independent and issued before the first use (an upper bound: loads a
                loop issues after a dependent one are counted too). Latency hiding by instruction-level
                parallelism across iterations, L2 hits and the tail of the last wave are not modelled.

Table columns: reg (registers per thread), spl (local-memory instructions), smem (shared memory per CTA, static +
dynamic), ld(hot) (the hot loop's global load widths in bytes, xN = N of them), st (every global store width of the
kernel), thr (threads per CTA), CTAs, occ (CTAs resident per SM), waves, B/thr (hot-loop load bytes per thread),
KB/SM (estimated in flight), violations (rule=value).

    python scripts/kernel_report.py                    # the table
    python scripts/kernel_report.py --json out.json    # and the data (rows and the contract's violations)
    python scripts/kernel_report.py --only group_norm  # cases whose id contains the text

Needs nvcc (CUDA 12.8+; for the CUDA device code, unless a build directory has it), a C++20 compiler and the CUDA
headers (the host emulation), triton, and a cuobjdump. Never needs a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from diffkern._bench_cases import Case

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SM_COUNT = 132                 # H100 SXM / H200
SMEM_PER_SM = 233472           # 228 KB
SMEM_OPTIN = 232448            # 227 KB per CTA
SMEM_RESERVED_PER_CTA = 1024
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
ARCH = 90

BIG_CASE_BYTES = 8 * 1024 * 1024   # 8 MiB: the waves and in-flight rules apply from this size of the main tensor up
MIN_WAVES = 2.0
MIN_INFLIGHT_BYTES = 20 * 1024

# Kernels by what they move: "rw" streams the op's big tensors and writes them, "r" streams them and writes only
# small partials, "aux" touches only per-channel / per-sample statistics (exempt from all rules but spills).
KERNEL_ROLES = {
    # CUDA (function names without template arguments)
    "sample_map_kernel": "rw", "cfg_moments_kernel": "r", "rescale_factor_kernel": "aux",
    "gn_fwd_fused_nchw": "rw", "gn_fwd_stats_nchw": "r", "gn_fwd_apply_nchw": "rw",
    "gn_fwd_stats_nhwc": "r", "gn_fwd_apply_nhwc": "rw",
    "gn_bwd_fused_nchw": "rw", "gn_bwd_sums_nchw": "r", "gn_bwd_dx_nchw": "rw",
    "gn_bwd_sums_nhwc": "r", "gn_bwd_dx_nhwc": "rw", "gn_bwd_params": "aux",
    "gn_fwd_merge_nhwc": "aux", "gn_bwd_merge_nhwc": "aux",
    # Triton
    "_add_noise_kernel": "rw", "_ddim_step_kernel": "rw", "_ddpm_step_kernel": "rw", "_flow_match_step_kernel": "rw",
    "_flow_add_noise_kernel": "rw", "_abs_x0_kernel": "rw", "_cfg_moments_kernel": "r",
    "_rescale_factor_kernel": "aux",
    "fwd_group_kernel": "rw", "fwd_chunk_moments_kernel": "r", "fwd_chunk_apply_kernel": "rw",
    "bwd_group_kernel": "rw", "bwd_chunk_sums_kernel": "r", "bwd_chunk_dx_kernel": "rw",
    "sum_partial_rows_kernel": "aux",
}

RULES = ("spills", "load16", "store16", "waves", "inflight")


# ----------------------------------------------------------------------------------------------------------------
# Cases


# A case is the benchmarks' own (``diffkern._bench_cases.Case``: op, shape set, shape, dtype, layout; its ``id`` names
# the report's rows), always GPU-sized here.
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def tensor_bytes(case) -> int:
    """Bytes of the op's main tensor: x for GroupNorm, the sample for the steps."""
    return math.prod(case.shape) * ITEMSIZE[case.dtype]


# Issue 12's GroupNorm shapes: UNet N in {1, 2, 8, 16} x (C, S) in {(320, 64^2), (640, 32^2), (1280, 16^2),
# (1280, 8^2)}; the VAE decoder at N = 1, (C, S) in {(512, 128^2), (512, 256^2), (256, 512^2), (128, 1024^2)}.
GN_SHAPES = tuple((f"unet-c{c}-{s}-n{n}", (n, c, s, s)) for c, s in ((320, 64), (640, 32), (1280, 16), (1280, 8))
                  for n in (1, 2, 8, 16)) + tuple(
    (f"vae-c{c}-{s}-n1", (1, c, s, s)) for c, s in ((512, 128), (512, 256), (256, 512), (128, 1024)))


def report_cases() -> list:
    """GroupNorm+SiLU forward and backward (one fwd_bwd call each) at issue 12's shapes, both layouts; the step ops at
    the benchmarks' GPU shapes (SD 1.5 and SDXL latents at batch 1, 2, 8 and the 32M-element probe; SD3/FLUX and Wan
    latents for the flow steps); every dtype."""
    from diffkern import _bench_cases as B

    dtypes = tuple(B.DTYPES)
    cases = [B.Case("group_norm_silu_fwd_bwd", label, shape, dtype, layout)
             for label, shape in GN_SHAPES for layout in B.GN_LAYOUTS for dtype in dtypes]
    # Every benchmark case of the step families (a new op of theirs joins the report by itself).
    for family in ("step", "flow"):
        ops = [name for name, spec in B.OPS.items() if spec.family == family]
        cases += [B.Case(op, s.label, s.shape, dtype, "nchw") for op in ops for s in B.SHAPES_BY_FAMILY[family]
                  if s.where == "gpu" for dtype in dtypes]
    return cases


def empty_inputs():
    """Makes diffkern._bench_cases build its workloads from ``torch.empty`` (untouched memory) instead of random
    values: the kernels never run here, and full-size random tensors would cost gigabytes and minutes."""
    import torch
    from diffkern import _bench_cases as B

    def empty(shape, dtype, device, generator, layout="nchw", scale=1.0):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    B._random = empty


def run_case(case: "Case", backend: str) -> None:
    import torch
    from diffkern import _bench_cases as B

    workload = B.build_workload(case, torch.device("cpu"))
    fn = B.make_impl(workload, backend)
    fn(workload.inputs)


# ----------------------------------------------------------------------------------------------------------------
# Tools


def find_cuobjdump() -> Optional[str]:
    spec = importlib.util.spec_from_file_location("_kernel_report_check_wheel", REPO / "scripts" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuobjdump()


def _run(cmd: Sequence[str], **kwargs) -> str:
    proc = subprocess.run(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:400]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def demangle(names: Sequence[str]) -> List[str]:
    if not names:
        return []
    out = _run(["c++filt"], input="\n".join(names) + "\n").splitlines()
    assert len(out) == len(names)
    return out


_ANON = re.compile(r"\(anonymous namespace\)|_GLOBAL__N__\w+")


def normalize(demangled: str) -> str:
    """A demangled name with every anonymous namespace written alike (nvcc names them per file)."""
    return _ANON.sub("(anon)", demangled)


def short_name(demangled: str) -> str:
    """``gn_fwd_stats_nchw<__half, true>`` from ``void diffkern::(anon)::gn_fwd_stats_nchw<__half, true>(...)``."""
    name = normalize(demangled)
    name = re.sub(r"^void\s+", "", name)
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anon)", i):
            end = i
            break
    name = name[:end]
    name = re.sub(r"diffkern::|\(anon\)::", "", name)
    return name


def base_name(short: str) -> str:
    return short.split("<", 1)[0]


# ----------------------------------------------------------------------------------------------------------------
# SASS


@dataclass
class SassFacts:
    regs: int = 0
    static_smem: int = 0
    local_bytes: int = 0          # LOCAL + STACK of -res-usage
    local_accesses: int = 0       # LDL/STL instructions
    loads: Dict[int, int] = field(default_factory=dict)    # global load width (bytes) -> count, whole kernel
    stores: Dict[int, int] = field(default_factory=dict)
    hot_loads: Dict[int, int] = field(default_factory=dict)   # in the hot loop (or the whole kernel)
    hot_stores: Dict[int, int] = field(default_factory=dict)
    hot_load_bytes: int = 0
    hot_loop: str = ""            # "0x1a0-0x3f0" or "no loop"


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def access_width(opcode: str) -> int:
    mods = opcode.split(".")[1:]
    if "128" in mods:
        return 16
    if "64" in mods:
        return 8
    if any(m in ("U16", "S16") for m in mods):
        return 2
    if any(m in ("U8", "S8") for m in mods):
        return 1
    return 4


def _is_global_load(op: str) -> bool:
    return op.startswith("LDG.") or op == "LDG" or op.startswith("LDGSTS")


def _is_global_store(op: str) -> bool:
    return op.startswith("STG.") or op == "STG"


def analyze_sass(instructions: List[Tuple[int, str, str]]) -> SassFacts:
    """Facts of one function's SASS: (address, opcode, operands) in address order."""
    facts = SassFacts()
    loads, stores = Counter(), Counter()
    for _, op, _ in instructions:
        if _is_global_load(op):
            loads[access_width(op)] += 1
        elif _is_global_store(op):
            stores[access_width(op)] += 1
        elif op.startswith(("LDL", "STL")):
            facts.local_accesses += 1
    facts.loads, facts.stores = dict(loads), dict(stores)

    loops = []
    for addr, op, operands in instructions:
        if op.startswith(("BRA", "JMP")):
            m = re.search(r"0x([0-9a-f]+)\s*$", operands.strip())
            if m and int(m.group(1), 16) <= addr:
                loops.append((int(m.group(1), 16), addr))

    def body(lo, hi):
        return [(a, op) for a, op, _ in instructions if lo <= a <= hi]

    def has_loads(lo, hi):
        return any(_is_global_load(op) for _, op in body(lo, hi))

    with_loads = [lp for lp in loops if has_loads(*lp)]
    innermost = [lp for lp in with_loads
                 if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in with_loads)]
    best = None
    for lo, hi in innermost:
        ops = [op for _, op in body(lo, hi)]
        widths = [access_width(op) for op in ops if _is_global_load(op)]
        key = (max(widths), sum(widths))
        if best is None or key > best[0]:
            best = (key, lo, hi, ops)
    if best is None:
        ops = [op for _, op, _ in instructions]
        facts.hot_loop = "no loop"
        facts.hot_load_bytes = sum(access_width(op) for op in ops if _is_global_load(op))
    else:
        (_, facts.hot_load_bytes), lo, hi, ops = best
        facts.hot_loop = f"{lo:#x}-{hi:#x}"
    facts.hot_loads = dict(Counter(access_width(op) for op in ops if _is_global_load(op)))
    facts.hot_stores = dict(Counter(access_width(op) for op in ops if _is_global_store(op)))
    return facts


def cubin_facts(path: Path, cuobjdump: str) -> Dict[str, SassFacts]:
    """Mangled function name -> facts, for every function of the sm_90 code in ``path`` (a cubin or an object)."""
    arch = ["-arch", f"sm_{ARCH}"] if path.suffix != ".cubin" else []
    res = _run([cuobjdump, *arch, "-res-usage", path])
    sass = _run([cuobjdump, *arch, "-sass", path])
    facts: Dict[str, SassFacts] = {}
    current = None
    for line in res.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            current = facts.setdefault(m.group(1), SassFacts())
            continue
        if current is not None and "REG:" in line:
            values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            current.regs = int(values.get("REG", 0))
            current.static_smem = int(values.get("SHARED", 0))
            current.local_bytes = int(values.get("LOCAL", 0)) + int(values.get("STACK", 0))
            current = None
    name, insns = None, []
    per_function: Dict[str, List] = {}
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)\s*$", line)
        if m:
            name = m.group(1)
            insns = per_function.setdefault(name, [])
            continue
        if name is None:
            continue
        m = _INSN.search(line)
        if m:
            insns.append((int(m.group(1), 16), m.group(2), m.group(3)))
    for fn, fn_insns in per_function.items():
        f = analyze_sass(sorted(fn_insns))
        old = facts.get(fn, SassFacts())
        f.regs, f.static_smem, f.local_bytes = old.regs, old.static_smem, old.local_bytes
        facts[fn] = f
    return facts


# ----------------------------------------------------------------------------------------------------------------
# Occupancy and the estimates


def occupancy_ctas(threads: int, regs: int, smem: int) -> int:
    warps = -(-threads // 32)
    by_threads = MAX_THREADS_PER_SM // (warps * 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA) if smem > 0 else MAX_CTAS_PER_SM
    return max(0, min(MAX_CTAS_PER_SM, by_threads, by_regs, by_smem))


@dataclass
class Row:
    backend: str
    case: str
    op: str
    shape: List[int]
    dtype: str
    layout: str
    tensor_bytes: int
    kernel: str           # short name (template arguments kept for CUDA)
    base: str
    role: str
    variant: str          # the cubin function (CUDA) or the Triton variant hash
    regs: int
    local_bytes: int
    local_accesses: int
    smem: int             # static + dynamic shared memory per CTA
    threads: int
    ctas: int
    grid: List[int]
    occupancy_ctas: int
    occupancy: float      # resident warps / 64
    waves: float
    loads: Dict[str, int]
    stores: Dict[str, int]
    hot_loads: Dict[str, int]
    hot_stores: Dict[str, int]
    hot_loop: str
    hot_load_bytes: int
    resident_ctas: int
    inflight_bytes: int
    violations: Dict[str, float] = field(default_factory=dict)


def make_row(backend: str, case: "Case", kernel: str, variant: str, facts: SassFacts, threads: int,
             grid: Sequence[int], dynamic_smem: int) -> Row:
    ctas = math.prod(grid)
    smem = facts.static_smem + dynamic_smem
    occ = occupancy_ctas(threads, facts.regs, smem)
    resident = min(occ, -(-ctas // SM_COUNT))
    base = base_name(kernel)
    row = Row(backend=backend, case=case.id, op=case.op, shape=list(case.shape), dtype=case.dtype, layout=case.layout,
              tensor_bytes=tensor_bytes(case), kernel=kernel, base=base, role=KERNEL_ROLES.get(base, "rw"),
              variant=variant, regs=facts.regs, local_bytes=facts.local_bytes, local_accesses=facts.local_accesses,
              smem=smem, threads=threads, ctas=ctas, grid=list(grid), occupancy_ctas=occ,
              occupancy=round(occ * threads / 32 / 64, 3), waves=round(ctas / (SM_COUNT * max(occ, 1)), 2),
              loads={str(k): v for k, v in sorted(facts.loads.items())},
              stores={str(k): v for k, v in sorted(facts.stores.items())},
              hot_loads={str(k): v for k, v in sorted(facts.hot_loads.items())},
              hot_stores={str(k): v for k, v in sorted(facts.hot_stores.items())},
              hot_loop=facts.hot_loop, hot_load_bytes=facts.hot_load_bytes, resident_ctas=resident,
              inflight_bytes=resident * threads * facts.hot_load_bytes)
    row.violations = contract_violations(row)
    return row


def contract_violations(row: Row) -> Dict[str, float]:
    """The rules ``row`` breaks, each with the measured value it breaks them with (see the module docstring)."""
    out: Dict[str, float] = {}
    if row.local_accesses or row.local_bytes:
        out["spills"] = float(row.local_accesses or row.local_bytes)
    if row.role == "aux":
        return out
    # Loads: the widest of the hot loop's (where the bulk of the tensors is read). Stores: the widest of the
    # kernel's (an output may be written after the loop that reads, as GroupNorm's single-tile kernels do).
    hot_loads = [int(w) for w in row.hot_loads]
    if hot_loads and max(hot_loads) < 16:
        out["load16"] = float(max(hot_loads))
    if row.role == "rw":
        stores = [int(w) for w in row.stores]
        if not stores or max(stores) < 16:
            out["store16"] = float(max(stores) if stores else 0)
    if row.tensor_bytes >= BIG_CASE_BYTES:
        if row.waves < MIN_WAVES:
            out["waves"] = row.waves
        if row.inflight_bytes < MIN_INFLIGHT_BYTES:
            out["inflight"] = round(row.inflight_bytes / 1024, 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton


def collect_triton(cases: Sequence["Case"], cuobjdump: str, work: Path, log=print) -> List[Row]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_report: unset TRITON_INTERPRET; the interpreter never compiles kernels")
    import triton
    from triton.runtime import driver as triton_driver
    from triton.runtime.jit import JITFunction

    import compile_triton_kernels as ctk  # scripts/ (on sys.path: this script's directory)
    from diffkern import backends
    from diffkern.triton.group_norm_silu import _plan

    backends._triton_status = lambda device_type: backends.BackendStatus(True, "compile-only (no launch)")
    backends.clear_cache()
    _plan.device_sm_count = lambda device: SM_COUNT  # plan for an H100/H200, not the interpreter's stand-in
    triton_driver.set_active(ctk.CompileOnlyDriver(ARCH))
    empty_inputs()

    launches: List[Tuple["Case", str, str, int, Tuple[int, ...], int]] = []
    cubins: Dict[str, Path] = {}
    current: List["Case"] = []
    original_run = JITFunction.run

    def record_run(kernel, *args, grid, warmup, **kwargs):
        compiled = original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
        if callable(grid):
            raise RuntimeError(f"{kernel.fn.__name__}: a callable grid (the report needs the launcher's numbers)")
        grid3 = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        if compiled.hash not in cubins:
            path = work / f"triton_{compiled.hash}.cubin"
            path.write_bytes(compiled.asm["cubin"])
            cubins[compiled.hash] = path
        launches.append((current[0], kernel.fn.__name__, compiled.hash, int(compiled.metadata.num_warps) * 32, grid3,
                         int(compiled.metadata.shared)))
        return compiled

    JITFunction.run = record_run
    start = time.perf_counter()
    try:
        for case in cases:
            current[:] = [case]
            run_case(case, "triton")
    finally:
        JITFunction.run = original_run
    log(f"triton {triton.__version__}: {len(launches)} launches, {len(cubins)} variants compiled for sm_{ARCH} "
        f"in {time.perf_counter() - start:.0f} s")
    facts = {}
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        for h, per_fn in zip(cubins, pool.map(lambda path: cubin_facts(path, cuobjdump), cubins.values())):
            assert len(per_fn) == 1, (h, list(per_fn))
            facts[h] = next(iter(per_fn.values()))
    rows = []
    for case, name, h, threads, grid, shared in launches:
        f = facts[h]
        # Triton's shared memory is dynamic: metadata.shared is what the launch asks for.
        rows.append(make_row("triton", case, name, h[:12], f, threads, grid, shared))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# CUDA


def _sources():
    from diffkern import _build

    return [p for p in _build.source_files() if p.suffix == ".cu"]


def _newest_input_mtime(src: Path) -> float:
    """The newest of ``src`` and every header of csrc/ (what its device code may depend on)."""
    headers = [p for p in src.parent.iterdir() if p.suffix in (".cuh", ".h")]
    return max(p.stat().st_mtime for p in [src, *headers])


def device_code(build_dir: Path, object_dirs: Sequence[Path], log=print) -> List[Path]:
    """One file per csrc/*.cu holding its sm_90 code: an object of a build directory in ``object_dirs`` newer than
    the source and every header, else a cubin compiled into ``build_dir`` (kept while it stays newer than them)."""
    from diffkern import _build

    out, todo = [], []
    for src in _sources():
        newest = _newest_input_mtime(src)
        found = None
        for d in object_dirs:
            for obj in sorted(Path(d).rglob(f"{src.stem}.o")):
                if obj.stat().st_mtime > newest:
                    found = obj
        cubin = build_dir / f"{src.stem}.sm_{ARCH}.cubin"
        if found is None and cubin.is_file() and cubin.stat().st_mtime > newest:
            found = cubin
        if found is None:
            todo.append((src, cubin))
        out.append(found or cubin)
    if todo:
        cuda_home = _build.find_cuda_home()
        flags = _build.compile_args(cuda_home)["nvcc"]
        nvcc = Path(cuda_home) / "bin" / "nvcc"
        start = time.perf_counter()

        def compile_one(item):
            src, cubin = item
            tmp = cubin.with_suffix(f".{os.getpid()}.tmp.cubin")  # concurrent reports may share the directory
            _run([nvcc, *flags, "-cubin", f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}", src, "-o", tmp])
            tmp.replace(cubin)

        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            list(pool.map(compile_one, todo))
        log(f"nvcc: compiled {len(todo)} of {len(out)} sources for sm_{ARCH} in {time.perf_counter() - start:.0f} s")
    reused = [p for p in out if p.suffix == ".o"]
    if reused:
        log(f"nvcc: reused {len(reused)} objects of {reused[0].parent}")
    return out


def build_emulation(build_dir: Path) -> Path:
    spec = importlib.util.spec_from_file_location("_kernel_report_emu_build", REPO / "tests" / "cuda_emulation" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(build_dir)


def launch_worker(library: str, cases_json: str, out_path: str) -> None:
    """In its own process (the emulated library defines the diffkern CUDA ops): runs each case on the cuda backend
    with the launches recorded, one ``#case`` line before each case's records."""
    import torch
    from diffkern import _bench_cases as B
    from diffkern import backends
    from diffkern.ops import _declaration

    os.environ["DIFFKERN_EMU_SM_COUNT"] = str(SM_COUNT)
    os.environ["DIFFKERN_EMU_SMEM_OPTIN"] = str(SMEM_OPTIN)
    os.environ["DIFFKERN_EMU_LAUNCH_LOG"] = out_path
    _declaration.define_cuda_ops()
    torch.ops.load_library(library)
    backends._status_cache[("cuda", "cpu")] = backends.BackendStatus(True, "host-emulated, launches recorded")
    empty_inputs()
    Path(out_path).write_text("")
    for item in json.loads(Path(cases_json).read_text()):
        case = B.Case(item["op"], item["label"], tuple(item["shape"]), item["dtype"], item["layout"])
        with open(out_path, "a") as f:
            f.write(f"#case\t{case.id}\n")
        run_case(case, "cuda")


def collect_cuda(cases: Sequence["Case"], cuobjdump: str, work: Path, build_dir: Path,
                 object_dirs: Sequence[Path], log=print) -> List[Row]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        device_future = pool.submit(device_code, build_dir, object_dirs, log)
        library = build_emulation(build_dir / "emulation")
        cases_json = work / "cases.json"
        cases_json.write_text(json.dumps([dict(op=c.op, label=c.shape_set, shape=c.shape, dtype=c.dtype, layout=c.layout)
                                          for c in cases]))
        records = work / "launches.tsv"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, __file__, "--launch-worker", str(library), str(cases_json),
                               str(records)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"recording the CUDA launches failed:\n{proc.stdout[-8000:]}")
        objects = device_future.result()
    log(f"cuda: launches recorded and device code ready in {time.perf_counter() - start:.0f} s")

    # Host function offsets of the emulated library -> demangled, normalized names.
    symbols = {}
    for line in _run(["nm", "--defined-only", library]).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            symbols[int(parts[0], 16)] = parts[2]
    # Device functions, by normalized demangled name.
    device: Dict[str, Tuple[str, SassFacts]] = {}
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        per_object = list(pool.map(lambda obj: cubin_facts(obj, cuobjdump), objects))
    for obj, per_fn in zip(objects, per_object):
        for mangled, dem in zip(per_fn, demangle(list(per_fn))):
            key = normalize(dem)
            if key in device:
                # A template outside any anonymous namespace instantiated by several files (step.cuh's X0PassOp in
                # ddim.cu and ddpm.cu) is one function (the host library keeps one copy): either cubin's will do.
                if "(anon)" in key:
                    raise RuntimeError(f"two device functions named {key} (in {obj} and before): cannot tell them "
                                       "apart")
                continue
            device[key] = (mangled, per_fn[mangled])

    by_id = {c.id: c for c in cases}
    rows, case = [], None
    raw = []
    for line in records.read_text().splitlines():
        parts = line.split("\t")
        if parts[0] == "#case":
            case = by_id[parts[1]]
            continue
        name, offset, grid, block, smem = parts
        raw.append((case, name, int(offset, 16), tuple(map(int, grid.split(","))), tuple(map(int, block.split(","))),
                    int(smem)))
    names = sorted({symbols[off] for _, _, off, *_ in raw if off in symbols})
    missing = sorted({f"{n} at {off:#x}" for _, n, off, *_ in raw if off not in symbols})
    if missing:
        raise RuntimeError(f"launched kernels missing from the emulated library's symbol table: {missing}")
    host_names = dict(zip(names, demangle(names)))
    for case, _, off, grid, block, smem in raw:
        key = normalize(host_names[symbols[off]])
        if key not in device:
            raise RuntimeError(f"no sm_{ARCH} device function matches the launched {key}")
        mangled, facts = device[key]
        rows.append(make_row("cuda", case, short_name(key), mangled, facts, math.prod(block), grid, smem))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Output


def _widths(counts: Dict[str, int]) -> str:
    return ",".join(f"{w}" + (f"x{n}" if n > 1 else "") for w, n in sorted(counts.items(), key=lambda kv: -int(kv[0])))


def print_table(rows: Sequence[Row], out=sys.stdout) -> None:
    header = (f"{'backend':7s} {'case':58s} {'kernel':40s} {'reg':>3s} {'spl':>3s} {'smem':>6s} {'ld(hot)':>10s} "
              f"{'st':>8s} {'thr':>4s} {'CTAs':>7s} {'occ':>4s} {'waves':>6s} {'B/thr':>5s} {'KB/SM':>6s}  "
              f"violations")
    print(header, file=out)
    for r in rows:
        kernel = r.kernel if len(r.kernel) <= 40 else r.kernel[:37] + "..."
        viol = " ".join(f"{k}={v:g}" for k, v in r.violations.items())
        print(f"{r.backend:7s} {r.case:58s} {kernel:40s} {r.regs:3d} {r.local_accesses:3d} {r.smem:6d} "
              f"{_widths(r.hot_loads):>10s} {_widths(r.stores):>8s} {r.threads:4d} {r.ctas:7d} "
              f"{r.occupancy_ctas:4d} {r.waves:6.2f} {r.hot_load_bytes:5d} {r.inflight_bytes / 1024:6.1f}  {viol}",
              file=out)


def violation_lines(rows: Sequence[Row]) -> List[str]:
    """One line per broken rule: ``backend kernel case rule value`` (sorted): what the CI test compares with its
    list of known violations."""
    return sorted(f"{r.backend} {r.kernel.replace(' ', '')} {r.case} {rule} {value:g}"
                  for r in rows for rule, value in r.violations.items())


def violations_file(lines: Sequence[str], tools: Dict[str, str]) -> str:
    """tests/kernel_report_known_violations.txt: a header, then ``lines``."""
    counts = Counter(line.split()[3] for line in lines)
    header = [
        "# The kernel report's known contract violations: tests/test_kernel_report.py fails on any violation not",
        "# listed here and on any listed one that no longer occurs (a ratchet: fixed kernels leave the list).",
        "# One line per violation: backend kernel case rule value (spills: local accesses; load16/store16: the",
        "# widest access of the hot loop in bytes; waves: CTAs / (132 x resident CTAs per SM); inflight: KB per SM).",
        "# Regenerate after a kernel change and review the diff:",
        "#   python scripts/kernel_report.py --violations > tests/kernel_report_known_violations.txt",
        "# Recorded with " + ", ".join(f"{k} {v}" for k, v in sorted(tools.items())) + f": {len(lines)} violations ("
        + ", ".join(f"{rule} {counts[rule]}" for rule in RULES if counts[rule]) + ").",
    ]
    return "\n".join(header + list(lines)) + "\n"


def toolchain() -> Dict[str, str]:
    import torch
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__}
    try:
        from diffkern import _build

        out = _run([Path(_build.find_cuda_home()) / "bin" / "nvcc", "--version"])
        info["nvcc"] = re.search(r"release ([\d.]+)", out).group(1)
    except (FileNotFoundError, RuntimeError, AttributeError):
        pass
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows, the violations and the toolchain to this file")
    parser.add_argument("--violations", action="store_true",
                        help="print only the contract's violations, one per line (tests/kernel_report_known_violations.txt)")
    parser.add_argument("--only", action="append", help="only the cases whose id contains this text (repeatable)")
    parser.add_argument("--backend", choices=("triton", "cuda"), action="append", help="default: both")
    parser.add_argument("--build-dir", default=str(REPO / "build" / "kernel-report"),
                        help="cubins and the host emulation, kept between runs (default: build/kernel-report)")
    parser.add_argument("--objects", action="append",
                        help="a build directory whose up-to-date sm_90 objects to reuse (default: "
                             "$DIFFKERN_TEST_BUILD_DIR, $DIFFKERN_BUILD_DIR and build/cuda-ci)")
    parser.add_argument("--launch-worker", nargs=3, metavar=("LIBRARY", "CASES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.launch_worker:
        launch_worker(*args.launch_worker)
        return 0

    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("kernel_report: no cuobjdump (CUDA toolkit or the triton wheel's)", file=sys.stderr)
        return 2
    cases = report_cases()
    if args.only:
        cases = [c for c in cases if any(text in c.id for text in args.only)]
    backends_wanted = args.backend or ["triton", "cuda"]
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    object_dirs = [Path(p) for p in (args.objects or [os.environ.get("DIFFKERN_TEST_BUILD_DIR"),
                                                      os.environ.get("DIFFKERN_BUILD_DIR"),
                                                      str(REPO / "build" / "cuda-ci")]) if p and Path(p).is_dir()]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows: List[Row] = []
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        work = Path(tmp)
        with ThreadPoolExecutor(max_workers=1) as pool:
            cuda_future = (pool.submit(collect_cuda, cases, cuobjdump, work, build_dir, object_dirs, log)
                           if "cuda" in backends_wanted else None)
            if "triton" in backends_wanted:
                rows += collect_triton(cases, cuobjdump, work, log)
            if cuda_future is not None:
                rows += cuda_future.result()
    order = {c.id: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: (order[r.case], r.backend))
    lines = violation_lines(rows)
    counts = Counter(line.split()[3] for line in lines)
    if args.violations:
        print(violations_file(lines, toolchain()), end="")
        return 0
    print_table(rows)
    print(f"\n{len(rows)} kernel launches in {len(cases)} cases; {len(lines)} contract violations"
          + (": " + ", ".join(f"{rule} {counts[rule]}" for rule in RULES if counts[rule]) if lines else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(toolchain=toolchain(), sm_count=SM_COUNT, arch=ARCH,
                                                   rows=[asdict(r) for r in rows], violations=lines), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
