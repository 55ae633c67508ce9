"""What an op is, declared once; everything that lists ops derives from the declarations.

Each op module ``diffkern/ops/<name>.py`` (every module of this package whose name has no leading underscore)
holds one ``DECLARATION = OpDeclaration(...)``: the op's name, which function implements each of its entries on
each backend, ``auto``'s preference, and the CUDA extension's ops with their schemas and fake kernels. From the
declarations come:

- the backend registry (``diffkern.backends``: ``OPS``, ``AUTO_PREFERENCE``, the implementation lookup);
- the CUDA extension's op list (what the loader checks it registered) and their schemas: they are defined here,
  from Python, and ``csrc/`` registers only kernels for them (``STABLE_TORCH_LIBRARY_IMPL``), so a schema is
  written once;
- the fake kernels of those ops (for ``torch.compile`` and ``opcheck``).

The enum codes that the kernels take (``PREDICTION_CODES``, ``VARIANCE_CODES``) are here too, shared by the
Triton kernels and the CUDA ones; ``tests/test_declarations.py`` reads the enums in ``csrc/`` and checks that
they agree.

Adding an op: write ``diffkern/ops/<name>.py`` (public function, validation, reference, the torch custom op and
its ``DECLARATION``), its Triton and CUDA implementations, and ``tests/test_<name>.py``. Nothing else lists it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Tuple

#: Prediction-type codes: csrc/step_coefficients.cuh ``enum PredictionType``, the Triton kernels' ``PREDICTION``.
PREDICTION_CODES: Mapping[str, int] = {"epsilon": 0, "v_prediction": 1, "sample": 2}
#: DDPM variance-type codes: csrc/ddpm.cu ``enum VarianceType``, the Triton DDPM kernel's ``VARIANCE``.
VARIANCE_CODES: Mapping[str, int] = {"fixed_small": 0, "fixed_small_log": 1, "fixed_large": 2,
                                     "fixed_large_log": 3, "learned": 4, "learned_range": 5}

NAMESPACE = "diffkern"


@dataclass(frozen=True)
class CudaOp:
    """One op of the CUDA extension: ``torch.ops.diffkern.<name>`` with ``schema`` (the part after the name)
    and ``fake``, its fake (meta) kernel."""

    name: str
    schema: str
    fake: Callable


@dataclass(frozen=True)
class OpDeclaration:
    """An op family.

    Attributes:
        name: the op's public name, the key of the backend registry (``ddim_step``).
        implementations: backend -> {entry -> ``"module:function"``}. An entry is what the custom op calls: the
            op's name, or several names for a family with several (GroupNorm+SiLU's ``_forward``/``_backward``).
            Every backend provides every entry.
        auto_preference: ``backend="auto"``'s order on CUDA tensors, fastest first.
        cuda_ops: the CUDA extension's ops that the ``cuda`` implementations call.
    """

    name: str
    implementations: Mapping[str, Mapping[str, str]]
    auto_preference: Tuple[str, ...] = ("cuda", "triton", "reference")
    cuda_ops: Tuple[CudaOp, ...] = field(default=())

    @classmethod
    def single_entry(cls, name: str, *, reference: str, triton: str, cuda: str, **fields) -> "OpDeclaration":
        """An op whose custom op calls one function per backend, named like the op (most ops)."""
        return cls(name, {"reference": {name: reference}, "triton": {name: triton}, "cuda": {name: cuda}}, **fields)


@functools.lru_cache(maxsize=None)
def declarations() -> Tuple[OpDeclaration, ...]:
    """Every op's declaration, in module-name order (imports the op modules: no device, no extension)."""
    package = importlib.import_module("diffkern.ops")
    found = []
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")):
        found.append(importlib.import_module(f"diffkern.ops.{module}").DECLARATION)
    return tuple(found)


def by_name(name: str) -> OpDeclaration:
    """The declaration of the op called ``name``."""
    for declaration in declarations():
        if declaration.name == name:
            return declaration
    raise KeyError(f"no op is declared as {name!r}")


def cuda_ops() -> Tuple[CudaOp, ...]:
    """Every CUDA extension op of every declaration."""
    return tuple(op for declaration in declarations() for op in declaration.cuda_ops)


_defined = False
_define_lock = threading.Lock()
_libraries = []  # the torch.library.Library objects must outlive the definitions


def define_cuda_ops() -> None:
    """Defines the CUDA extension's op schemas and registers their fake kernels (idempotent, thread-safe).

    Called by the loader before it opens the library, whose static initializers then register the kernels."""
    global _defined
    if _defined:
        return
    import torch

    with _define_lock:
        if _defined:
            return
        library = torch.library.Library(NAMESPACE, "FRAGMENT")
        for op in cuda_ops():
            library.define(f"{op.name}{op.schema}")
            torch.library.register_fake(f"{NAMESPACE}::{op.name}", op.fake, lib=library)
        _libraries.append(library)
        _defined = True


@functools.lru_cache(maxsize=None)
def per_backend(backend: str) -> Dict[str, str]:
    """entry -> ``"module:function"`` of every op on ``backend``."""
    return {entry: target for declaration in declarations()
            for entry, target in declaration.implementations[backend].items()}
