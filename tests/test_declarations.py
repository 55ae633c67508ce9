"""The ops' declarations (``diffkern/ops/_declaration.py``) and what derives from them: the backend registry, the
CUDA extension's op list and schemas, and the enum codes that the Triton and the CUDA kernels share, read from
csrc/ itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from diffkern import _extension, backends
from diffkern.ops import _declaration
from diffkern.ops._common import PREDICTION_TYPES
from diffkern.ops.ddpm import VARIANCE_TYPES

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def csrc_enum(name: str) -> dict:
    """``enum <name> : int { kFooBar = 0, ... }`` from csrc/, as {"foo_bar": 0, ...}."""
    for path in sorted(CSRC.glob("*.cu*")):
        match = re.search(rf"enum\s+{name}\s*:\s*int\s*\{{([^}}]*)\}}", path.read_text())
        if match:
            entries = re.findall(r"k(\w+)\s*=\s*(\d+)", match.group(1))
            return {re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower(): int(value) for camel, value in entries}
    raise AssertionError(f"no enum {name} in {CSRC}")


def test_prediction_codes_are_the_csrc_enum():
    assert sorted(_declaration.PREDICTION_CODES) == sorted(PREDICTION_TYPES)
    assert csrc_enum("PredictionType") == dict(_declaration.PREDICTION_CODES)


def test_variance_codes_are_the_csrc_enum():
    assert sorted(_declaration.VARIANCE_CODES) == sorted(VARIANCE_TYPES)
    assert csrc_enum("VarianceType") == dict(_declaration.VARIANCE_CODES)


def test_triton_kernels_take_the_shared_codes():
    pytest.importorskip("triton", reason="triton is not installed")
    from diffkern.triton import _common as K
    from diffkern.triton import ddpm

    assert (K.EPSILON.value, K.V_PREDICTION.value, K.SAMPLE.value) == tuple(
        _declaration.PREDICTION_CODES[p] for p in ("epsilon", "v_prediction", "sample"))
    assert ddpm._variance_code("fixed_large_log") == _declaration.VARIANCE_CODES["fixed_large"]
    for variance in set(VARIANCE_TYPES) - {"fixed_large_log"}:
        assert ddpm._variance_code(variance) == _declaration.VARIANCE_CODES[variance]


def test_registry_derives_from_the_declarations():
    names = [d.name for d in _declaration.declarations()]
    assert names == sorted(names) and len(names) == len(set(names)) > 0
    assert backends.OPS == tuple(names)
    assert set(backends.AUTO_PREFERENCE) == set(names)
    for declaration in _declaration.declarations():
        assert set(declaration.implementations) == set(backends.BACKENDS), declaration.name
        entries = {frozenset(impl) for impl in declaration.implementations.values()}
        assert len(entries) == 1, f"{declaration.name}: every backend provides every entry"
        assert set(declaration.auto_preference) == set(backends.BACKENDS)
        for backend in backends.BACKENDS:
            for entry in declaration.implementations[backend]:
                assert callable(backends.implementation(backend, entry))  # importing loads no extension
    assert _extension.CUDA_OPS == tuple(op.name for op in _declaration.cuda_ops())


def test_cuda_schemas_are_defined_from_the_declarations():
    _declaration.define_cuda_ops()
    for op in _declaration.cuda_ops():
        schema = str(getattr(torch.ops.diffkern, op.name).default._schema)
        assert schema.startswith(f"diffkern::{op.name}("), schema


def test_csrc_defines_no_schema():
    """csrc/ registers kernels only (STABLE_TORCH_LIBRARY_IMPL): the schemas are the declarations'."""
    for path in CSRC.iterdir():
        if path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            assert not re.search(r"STABLE_TORCH_LIBRARY\s*\(", path.read_text()), path.name
