"""The kernel report's contract (issue 12): scripts/kernel_report.py compiles every Triton variant and every CUDA
kernel the library launches at the benchmark shapes for sm_90 (no GPU), and every launch must hold the rules of
its docstring: no spills; 16-byte global accesses where layout and alignment allow them; >= 2 waves of CTAs and
>= 20 KB estimated in flight per SM for every case of 8 MB or more.

The kernels do not all hold them yet. ``tests/kernel_report_known_violations.txt`` lists, line by line, every
violation the report finds today (backend, kernel, case, rule, measured value), and the test checks that list is
EXACT: a new violation fails, and so does a listed one that no longer occurs (fixed kernels must leave the list,
so it only shrinks: a ratchet). A changed value is both. After a change to a kernel, regenerate the list with

    python scripts/kernel_report.py --violations > tests/kernel_report_known_violations.txt

and review the diff: lines may only go away unless the change says why a new one is acceptable.

The report runs in a subprocess without TRITON_INTERPRET (it compiles for real). It reuses build/kernel-report
(its sm_90 cubins and the host emulation) and, in CI, scripts/ci_wheel_check.sh's objects
($DIFFKERN_TEST_BUILD_DIR). Skipped only without an nvcc, a cuobjdump, a C++ compiler or binutils.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _helpers import load_module

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "kernel_report.py"
KNOWN = Path(__file__).resolve().parent / "kernel_report_known_violations.txt"


kr = load_module(SCRIPT, "_kernel_report")


def known_violations():
    lines = [line.strip() for line in KNOWN.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from diffkern import _build

    try:
        _build.find_cuda_home()
    except FileNotFoundError as exc:
        pytest.skip(f"no nvcc to compile csrc/ for sm_90: {exc}")
    if kr.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel's)")
    for tool in ("nm", "c++filt", os.environ.get("CXX") or "c++"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} (the host emulation records the CUDA launches)")
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-20000:]
    print(f"\nkernel report in {time.perf_counter() - start:.0f} s:\n{proc.stderr}{proc.stdout.splitlines()[-1]}")
    return json.loads(out.read_text())


def test_contract_holds_except_the_known_violations(report):
    measured = set(report["violations"])
    known = known_violations()
    assert len(set(known)) == len(known), "tests/kernel_report_known_violations.txt lists a line twice"
    new = sorted(measured - set(known))
    fixed = sorted(set(known) - measured)
    message = []
    if new:
        message.append(f"{len(new)} new contract violations (fix the kernel; see this file's docstring):\n  "
                       + "\n  ".join(new))
    if fixed:
        message.append(f"{len(fixed)} listed violations no longer occur (remove them from {KNOWN.name}):\n  "
                       + "\n  ".join(fixed))
    assert not message, "\n".join(message)


def test_report_covers_every_case_on_both_backends(report):
    cases = {c.id for c in kr.report_cases()}
    for backend in ("triton", "cuda"):
        seen = {r["case"] for r in report["rows"] if r["backend"] == backend}
        assert seen == cases, f"{backend}: cases without a launch: {sorted(cases - seen)[:10]}"
    for r in report["rows"]:
        assert r["regs"] > 0 and r["threads"] > 0 and r["ctas"] > 0, r
        assert r["base"] in kr.KERNEL_ROLES, f"{r['backend']} kernel {r['base']}: give it a role in KERNEL_ROLES"
        if r["role"] != "aux":
            assert r["loads"], f"{r['kernel']} ({r['case']}): no global load found in its SASS"


def _rows(report, backend, case, base):
    rows = [r for r in report["rows"] if r["backend"] == backend and r["case"] == case and r["base"] == base]
    assert rows, (backend, case, base)
    return rows


def test_grids_are_the_launchers(report):
    """Spot checks of the recorded grids against what the launch code says: Triton's step grid
    (``launch_config``), the CUDA elementwise engine's (ceil(n / 16 bytes / 256) x batch) and csrc/gn_plan.cuh's
    NCHW split (``choose_nchw_slices``: N*G x K blocks, K = ceil(16 * 132 / (N*G)) wanted; past C/G channels, each
    channel's row of 16-byte units cut into at most units / 256 chunks)."""
    from diffkern.triton import _common

    case = "add_noise-probe-32M-fp16"   # 8 samples of 4 x 1024^2 halves
    n = 4 * 1024 * 1024
    assert _rows(report, "triton", case, "_add_noise_kernel")[0]["grid"] == [*_common.launch_config(8, n).grid, 1, 1]
    assert _rows(report, "cuda", case, "sample_map_kernel")[0]["grid"] == [n // 8 // 256, 8, 1]
    case = "group_norm_silu_fwd_bwd-unet-c320-64-n1-nchw-fp16"   # 32 groups of 10 channels of 64^2 halves
    wanted, channels, units = -(-16 * 132 // 32), 10, 64 * 64 // 8
    slices = channels * min(-(-wanted // channels), units // 256)   # 10 channels x 2 chunks
    for base in ("gn_fwd_stats_nchw", "gn_fwd_apply_nchw", "gn_bwd_sums_nchw", "gn_bwd_dx_nchw"):
        assert _rows(report, "cuda", case, base)[0]["grid"] == [32, slices, 1], base


def test_every_elementwise_cuda_kernel_stores_16_bytes_at_once(report):
    """The fix of issue 12's elementwise finding: one STG.E.128 per 16-byte output vector, not four STG.E."""
    rows = [r for r in report["rows"] if r["backend"] == "cuda" and r["base"] == "sample_map_kernel"]
    assert rows
    for r in rows:
        assert "16" in r["hot_stores"], (r["kernel"], r["hot_stores"])


# ----------------------------------------------------------------------------------------------------------------
# The model's pieces, on made-up SASS (no tools needed)


def _sass(lines):
    insns = []
    for line in lines:
        m = kr._INSN.search(line)
        assert m, line
        insns.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return insns


def test_access_widths():
    assert [kr.access_width(op) for op in ("LDG.E.128", "STG.E.128.STRONG.SM", "LDG.E.64", "LDG.E", "STG.E.U16",
                                           "LDG.E.U8", "LDG.E.EL.128.CONSTANT")] == [16, 16, 8, 4, 2, 1, 16]


def test_hot_loop_is_the_innermost_loop_with_the_widest_loads():
    facts = kr.analyze_sass(_sass([
        "/*0000*/ LDG.E R2, desc[UR4][R2.64] ;",             # a table gather before the loops
        "/*0010*/ LDG.E.64 R4, desc[UR4][R6.64] ;",          # loop 1: partials, 8 bytes x 2
        "/*0020*/ LDG.E.64 R8, desc[UR4][R6.64+0x8] ;",
        "/*0030*/ @!P0 BRA 0x10 ;",
        "/*0040*/ LDG.E.128 R4, desc[UR4][R6.64] ;",         # loop 2: the data, one 16-byte load, one store
        "/*0050*/ STG.E.128 desc[UR4][R8.64], R4 ;",
        "/*0060*/ @P1 BRA 0x40 ;",
        "/*0070*/ STL [R1], R4 ;",
        "/*0080*/ BRA 0x0 ;",                                # an outer loop around both
    ]))
    assert facts.hot_loop == "0x40-0x60"
    assert facts.hot_loads == {16: 1} and facts.hot_stores == {16: 1} and facts.hot_load_bytes == 16
    assert facts.loads == {4: 1, 8: 2, 16: 1} and facts.local_accesses == 1


def test_straight_line_kernel_counts_all_its_loads():
    facts = kr.analyze_sass(_sass(["/*0000*/ LDG.E.128 R4, desc[UR4][R6.64] ;",
                                   "/*0010*/ @P0 LDG.E.128 R8, desc[UR4][R6.64+0x10] ;",
                                   "/*0020*/ STG.E.128 desc[UR4][R2.64], R4 ;",
                                   "/*0030*/ BRA 0x30 ;"]))  # the end-of-kernel self-loop holds no load
    assert facts.hot_loop == "no loop" and facts.hot_load_bytes == 32


def test_occupancy_model():
    assert kr.occupancy_ctas(256, 32, 0) == 8            # threads
    assert kr.occupancy_ctas(256, 64, 0) == 4            # registers: 64 x 32 x 8 warps x 4 = 65536
    assert kr.occupancy_ctas(256, 65, 0) == 3            # 72 registers allocated per thread
    assert kr.occupancy_ctas(128, 16, 80 * 1024) == 2    # shared memory, 1 KB reserved per CTA
    assert kr.occupancy_ctas(32, 16, 0) == 32            # the CTA limit


def test_rules():
    def row(**kw):
        base = dict(backend="cuda", case="c", op="add_noise", shape=[1], dtype="fp16", layout="nchw",
                    tensor_bytes=16 << 20, kernel="k", base="k", role="rw", variant="v", regs=32, local_bytes=0,
                    local_accesses=0, smem=0, threads=256, ctas=132 * 16, grid=[132 * 16, 1, 1], occupancy_ctas=8,
                    occupancy=1.0, waves=2.0, loads={"16": 2}, stores={"16": 1}, hot_loads={"16": 2},
                    hot_stores={"16": 1}, hot_loop="0x0-0x10", hot_load_bytes=32, resident_ctas=8,
                    inflight_bytes=64 * 1024)
        base.update(kw)
        return kr.contract_violations(kr.Row(**base))

    assert row() == {}
    assert row(stores={"4": 4}) == {"store16": 4.0}
    assert row(hot_stores={"4": 1}, stores={"4": 1, "16": 1}) == {}   # the output written after the hot loop
    assert row(hot_loads={"8": 2, "16": 1}) == {}        # the hot loop has 16-byte loads
    assert row(hot_loads={"8": 2}, waves=1.5, inflight_bytes=10 * 1024) == {"load16": 8.0, "waves": 1.5,
                                                                            "inflight": 10.0}
    assert row(waves=1.5, inflight_bytes=10 * 1024, tensor_bytes=(8 << 20) - 1) == {}   # a small case
    assert row(role="aux", hot_loads={"8": 1}, local_accesses=2) == {"spills": 2.0}
    assert row(role="r", hot_stores={}, stores={"8": 1}) == {}
