"""The Triton kernels compile for the GPUs they target (sm_80, sm_90), checked without a GPU.

The interpreter tests check what the kernels compute; this checks that Triton's GPU compiler accepts every
variant the launchers produce, which the interpreter never exercises. ``scripts/compile_triton_kernels.py``
does the work in a subprocess: this process runs Triton in interpreter mode, which is fixed at import.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_triton_kernels.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm80_and_sm90(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80", "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for arch in (80, 90):
        assert f"sm_{arch}: " in result.stdout
