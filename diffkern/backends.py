"""The backend registry: which implementations exist, which are usable here, and which one an op runs.

Three backends implement every op with the same semantics:

- ``reference``: pure PyTorch (``diffkern/ops/<family>.py``), the definition of right; any device.
- ``triton``: fused Triton kernels (``diffkern/triton/<family>.py``); CUDA tensors, or CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported).
- ``cuda``: the CUDA C++ extension built from ``csrc/`` (``diffkern/_cuda_ops.py``); CUDA tensors.

``backend="auto"`` takes ``DIFFKERN_BACKEND`` from the environment when set (and then fails loudly like an
explicit request), else the reference on non-CUDA tensors, else the first usable entry of
``AUTO_PREFERENCE[op]``; falling past the first choice is logged once per (op, backend).

Nothing here touches a device, imports triton or loads the extension at import time: availability is
checked on first use and cached.

Threads: the ops may be called from several threads; ``last_backend`` answers per thread. The Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) is a test mode and is not thread-safe: call it from one thread at a time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from diffkern.ops import _declaration

logger = logging.getLogger("diffkern")

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "DIFFKERN_BACKEND"


def __getattr__(name: str):
    """``OPS`` (the op names) and ``AUTO_PREFERENCE`` (op -> ``auto``'s order on CUDA tensors, fastest first),
    derived from the ops' declarations (``diffkern/ops/_declaration.py``) on first access. The order is the one
    measured in BENCHMARKS.md: re-decide it there, and write it in the op's declaration."""
    if name == "OPS":
        return tuple(d.name for d in _declaration.declarations())
    if name == "AUTO_PREFERENCE":
        return {d.name: d.auto_preference for d in _declaration.declarations()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


_status_cache: Dict[Tuple[str, str], BackendStatus] = {}
_impl_cache: Dict[Tuple[str, str], Callable] = {}
_fallbacks_logged: set = set()
# Per thread: two threads calling ops at once each see the backend of their own last call.
_last_used = threading.local()


def _triton_status(device_type: str) -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device is visible to torch")
        return BackendStatus(True, "triton kernels on CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendStatus(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
    return BackendStatus(False, f"triton needs CUDA tensors, or TRITON_INTERPRET=1 for {device_type} tensors")


def _cuda_status(device_type: str) -> BackendStatus:
    if device_type != "cuda":
        return BackendStatus(False, f"the CUDA extension runs on CUDA tensors only, not {device_type}")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device is visible to torch")
    from diffkern import _extension

    try:
        _extension.load()
    except _extension.ExtensionUnavailable as exc:
        return BackendStatus(False, str(exc))
    return BackendStatus(True, f"CUDA extension ({_extension.status().get('source')})")


def backend_status(backend: str, device_type: str) -> BackendStatus:
    """Whether ``backend`` can run on tensors of ``device_type`` here, and why (cached)."""
    key = (backend, device_type)
    if key not in _status_cache:
        if backend == "reference":
            status = BackendStatus(True, "pure PyTorch, any device")
        elif backend == "triton":
            status = _triton_status(device_type)
        elif backend == "cuda":
            status = _cuda_status(device_type)
        else:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _status_cache[key] = status
    return _status_cache[key]


def available_backends(device=None) -> Dict[str, BackendStatus]:
    """Every backend with whether it can run on ``device`` (default: CUDA if visible, else CPU) and why.

    >>> diffkern.available_backends("cpu")["triton"]
    BackendStatus(available=False, reason='triton needs CUDA tensors, or TRITON_INTERPRET=1 for cpu tensors')
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: backend_status(name, device_type) for name in BACKENDS}


def clear_cache() -> None:
    """Forget cached availability (e.g. after changing TRITON_INTERPRET in a test), and with it the ops' cached
    call plans, which hold the backend they resolved to."""
    from diffkern.ops import _common

    _status_cache.clear()
    _fallbacks_logged.clear()
    _common.clear_plans()


def environment_choice(backend: str) -> str:
    """What the environment adds to a request of ``backend``: ``DIFFKERN_BACKEND`` (empty when unset) for
    ``auto``, whose choice it decides, else nothing. Part of the ops' cached call signatures."""
    return environment_backend() if backend == "auto" else ""


def environment_backend() -> str:
    """``DIFFKERN_BACKEND``, or "" when unset, read on every call (tests and users may set it at any time).

    ``os.environ.get`` of an unset variable raises and catches a ``KeyError`` inside the mapping (a microsecond,
    on every ``auto`` call); CPython's ``os.environ`` keeps its encoded variables in a dict, read here directly,
    with the public lookup wherever that dict is missing."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    encode = getattr(environ, "encodekey", None)
    if type(data) is not dict or encode is None:
        return environ.get(ENV_VAR, "")
    raw = data.get(encode(ENV_VAR))
    return "" if raw is None else environ.decodevalue(raw)


def record_choice(op: str, backend: str) -> None:
    """Notes ``backend`` as the one ``op`` ran on in this thread (``last_backend``): a call served from a cached
    plan does not resolve again."""
    by_op = getattr(_last_used, "by_op", None)
    if by_op is None:
        by_op = _last_used.by_op = {}
    by_op[op] = backend


def _resolve(op: str, requested: str, device_type: str) -> str:
    if requested == "auto":
        env = environment_backend()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            requested = env
    if requested != "auto":
        status = backend_status(requested, device_type)
        if not status.available:
            raise BackendUnavailableError(
                f"backend={requested!r} cannot run {op} on {device_type} tensors: {status.reason}")
        chosen = requested
    elif device_type != "cuda":
        chosen = "reference"
    else:
        preference = _declaration.by_name(op).auto_preference
        chosen = next(name for name in preference if backend_status(name, device_type).available)
        if chosen != preference[0] and (op, chosen) not in _fallbacks_logged:
            _fallbacks_logged.add((op, chosen))
            skipped = ", ".join(f"{name}: {backend_status(name, device_type).reason}"
                                for name in preference[: preference.index(chosen)])
            logger.warning("diffkern: %s runs on the %s backend (%s)", op, chosen, skipped)
    _last_used_by_op()[op] = chosen
    return chosen


# Under torch.compile the choice runs once at trace time and is baked into the graph as a constant. This is
# what ``torch.compiler.assume_constant_result`` does (it sets this marker), without importing torch._dynamo
# (seconds, and it imports triton) when diffkern is imported. Without it dynamo would trace into the
# availability checks (file system, dlopen of the extension) on a first call under compile.
# tests/test_api.py checks that the marker is still the one torch's decorator sets.
_resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


def check_backend_name(backend) -> str:
    """``backend`` if it is a name a caller may ask for (``auto`` or one of ``BACKENDS``), else a ValueError."""
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` for a request of ``backend`` on tensors of ``device``."""
    return _resolve(op, check_backend_name(backend), device.type)


def last_backend(op: str) -> Optional[str]:
    """The backend the last call of ``op`` in this thread resolved to (tests use it to assert what ran)."""
    return _last_used_by_op().get(op)


def _last_used_by_op() -> Dict[str, str]:
    by_op = getattr(_last_used, "by_op", None)
    if by_op is None:
        by_op = _last_used.by_op = {}
    return by_op


def eager_launch(backend: str, name: str, example_args: tuple, options: Dict[str, object]) -> Optional[Callable]:
    """What an eager call of a cached plan runs: ``implementation(backend, name)`` bound to the plan's
    signature and ``options`` (``_common.bound_launch``); None while tracing (a traced call goes through the
    custom op, which looks the implementation up when it runs)."""
    if torch.compiler.is_compiling():
        return None
    from diffkern.ops import _common

    return _common.bound_launch(implementation(backend, name), example_args, options)


def implementation(backend: str, name: str) -> Callable:
    """The function implementing ``name`` (an op, or ``group_norm_silu_forward``/``_backward``) on ``backend``."""
    key = (backend, name)
    if key not in _impl_cache:
        module_name, attr = _declaration.per_backend(backend)[name].split(":")
        _impl_cache[key] = getattr(importlib.import_module(module_name), attr)
    return _impl_cache[key]
