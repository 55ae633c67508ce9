"""``scripts/gpu_session.py``: the dry run of the whole GPU session on the CPU, and prepare's pure parts.

One dry run goes through every stage with CPU tensors and tiny selections: the files each stage writes, the
summary, the flat layout of at most 8 files the GPU tool brings back, a stage stopped at its cap without
stopping the next. ``prepare`` needs the network and nvcc; here only its checks (requirements, sizes) and the
stage budget, which must fit the 8 minutes on paper.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import load_module

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_session.py"


gpu_session = load_module(SCRIPT, "gpu_session")


def _summary_rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in gpu_session.STAGE_NAMES:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every stage, with racecheck's cap cut to 1 s (starting Python and torch takes longer):
    the stage stopped at its cap, and the stages after it running anyway."""
    out = tmp_path_factory.mktemp("gpu_session") / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--dry-run", "--out", str(out), "--cap",
                           "racecheck=1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    return out, proc


def test_dry_run_writes_every_file_flat(dry_run):
    out, proc = dry_run
    files = sorted(p.name for p in out.iterdir())
    # What the GPU tool brings back: at most 8 plain files, flat, simple names.
    assert files == sorted(gpu_session.OUT_FILES), proc.stdout
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files)


def test_dry_run_summary(dry_run):
    out, proc = dry_run
    summary = (out / "summary.md").read_text()
    assert proc.stdout.endswith(summary)   # printed last, as written
    rows = _summary_rows(summary)
    assert list(rows) == list(gpu_session.STAGE_NAMES)
    assert proc.returncode == 1   # racecheck did not finish
    assert rows["racecheck"][1] == "timeout" and float(rows["racecheck"][2]) <= 1.5, summary
    assert all(row[1] == "ok" for name, row in rows.items() if name != "racecheck"), summary
    assert sum(float(row[2]) for row in rows.values()) <= gpu_session.NOMINAL_BUDGET_S
    logs = (out / "logs.txt").read_text()
    assert all(f"===== {name}: " in logs for name in gpu_session.STAGE_NAMES)


def test_dry_run_stage_files(dry_run):
    out, _ = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] and env["copy_bandwidth"]["gbps"] > 0 and env["backends"]["reference"]["available"]
    # The suite ran the rest of the dry-run file, and nothing the correctness stage had run.
    first, rest = (set(gpu_session.ran_node_ids(out / r)) for r in ("correctness.xml", "suite.xml"))
    assert first and rest and not first & rest
    sanitizer = (out / "sanitizer.txt").read_text()
    assert "## memcheck: ok" in sanitizer and "## racecheck: timeout" in sanitizer
    assert re.search(r"^ok: \d+ cases listed", sanitizer, re.MULTILINE)
    bench = json.loads((out / "bench.json").read_text())
    assert bench["schema"] == "diffkern-bench/2" and bench["copy_bandwidth"]["gbps"] > 0
    assert {r["impl"] for r in bench["results"] if r["status"] == "ok"} >= {"eager", "reference"}
    assert "| op | shape set | layout | impl | time |" in (out / "bench.md").read_text()


def test_the_stage_budget_fits_eight_minutes():
    caps = [s.cap_s for s in gpu_session.STAGES if s.cap_s is not None]
    assert sum(caps) <= gpu_session.NOMINAL_BUDGET_S <= 480
    assert gpu_session.STAGES[-1].cap_s is None   # the suite takes what is left
    # The docstring's sizing table names every stage with its cap.
    for stage in gpu_session.STAGES:
        cap = "rest" if stage.cap_s is None else f"{stage.cap_s:.0f} s"
        assert re.search(rf"^{stage.name}\s+{cap}\s", gpu_session.__doc__, re.MULTILINE), stage.name


def test_requirement_check():
    have = {"filelock": None, "huggingface-hub": "1.33.0", "numpy": "2.5.2"}
    problems = gpu_session.requirement_problems(
        ["filelock", "huggingface-hub<3.0,>=1.32.0", "numpy>=3", "zipp>=3.20", "pytest; extra == 'testing'",
         "typing-extensions; python_version < '3.8'", "importlib_metadata"], have, waived=["importlib-metadata"])
    assert problems == ["numpy>=3: the image has 2.5.2", "zipp>=3.20: neither carried nor in the image"]


def test_size_check():
    assert gpu_session.check_sizes(30 * 10**6, 10 * 10**6) == []
    assert len(gpu_session.check_sizes(61 * 10**6, 0)) == 1
    assert len(gpu_session.check_sizes(50 * 10**6, 20 * 10**6)) == 1


@pytest.mark.skipif(not (REPO / "gpu_kit" / "manifest.json").is_file(), reason="no gpu_kit/: run prepare first")
def test_prepared_kit_matches_its_manifest():
    kit = REPO / "gpu_kit"
    manifest = json.loads((kit / "manifest.json").read_text())
    assert [w["name"] for w in manifest["wheels"]] == list(gpu_session.CARRIED)
    assert not manifest["unmet_requirements"]
    assert gpu_session.check_sizes(gpu_session._dir_bytes(kit), 0) == []
    for entry in manifest["wheels"] + ([manifest["extension"]] if manifest["extension"] else []):
        assert gpu_session._sha256(kit / entry["file"]) == entry["sha256"], entry["file"]
