"""Validation and argument preparation shared by the op families.

The public functions validate everything here *before* any work, so bad input raises a ``TypeError`` or
``ValueError`` naming the argument and leaves the caller's tensors untouched. They then hand every backend
the same normalised arguments (the backend contract):

- samples: dense tensors with identical strides and the batch dimension outermost, so each sample is one
  contiguous run of ``numel // B`` elements in storage order (NCHW and channels_last both qualify);
- ``alphas_cumprod``: float32, contiguous 1-D ``[T]``, on the samples' device (float64 for float64 samples, which the
  fast backends hand to the reference);
- timesteps: a python int (shared by the batch: eager calls pass it as it is, and the kernels take it as a
  scalar argument) or int64 ``[1]``/``[B]`` (per sample) on the samples' device. Through the torch custom op
  (``torch.compile``, autograd) a python int becomes a one-element tensor made with ``torch.full`` (a fill
  kernel: no host-to-device copy, so no sync). Device tensors are not range-checked (that would sync); kernels
  clamp indices into the table.

What is checked where: everything about shapes, dtypes, devices and options always; values wherever they are on
the host (python numbers, CPU timesteps, a CPU ``alphas_cumprod`` table and abar at host timesteps); nothing on a
device tensor, ever.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import numbers
import struct
import weakref
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

TimestepLike = Union[int, torch.Tensor]


def check_tensor(name: str, value, *, ndim_min: int = 1) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {value.dtype}")
    if value.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_like(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor,
               shape: Optional[Sequence[int]] = None) -> None:
    """``value`` must have ``ref``'s dtype and device, and ``shape`` (default: ``ref``'s shape)."""
    check_tensor(name, value)
    expected = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(value.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} to match {ref_name}, got {tuple(value.shape)}")
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {value.device}")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_float(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_table(alphas_cumprod, device: torch.device) -> int:
    """Validates the abar table; returns its length T.

    A table on the CPU also has its values checked (every entry finite and in [0, 1]), once per table and
    version: later calls with the same unmodified tensor are a dictionary lookup. A table on the device is not
    read (that would sync); its values are the caller's responsibility."""
    if not isinstance(alphas_cumprod, torch.Tensor) or not alphas_cumprod.is_floating_point():
        raise TypeError("alphas_cumprod must be a floating-point tensor")
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod must be 1-D and non-empty, got shape {tuple(alphas_cumprod.shape)}")
    if alphas_cumprod.device.type != "cpu" and alphas_cumprod.device != device:
        raise ValueError(f"alphas_cumprod must be on the CPU or on the samples' device {device}, "
                         f"got {alphas_cumprod.device}")
    if alphas_cumprod.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_table_values(alphas_cumprod)
    return alphas_cumprod.numel()


# id(table) -> (weak reference, version, token) of the CPU tables whose values passed the check. The token is
# unique per (table, version): the eager hot path keys its cached checks on it (``table_key``).
_checked_tables: Dict[int, Tuple[weakref.ref, int, int]] = {}
_table_tokens = itertools.count()


def _check_table_values(table: torch.Tensor) -> Optional[int]:
    """Checks a CPU table's values once per table and version; returns the token of that (table, version). An
    inference tensor (made under ``torch.inference_mode``) has no version counter, so nothing tells when it
    changes: its values are checked on every call, and it has no token (None)."""
    token = table_token(table)
    if token is not None:
        return token
    bad = ~(torch.isfinite(table) & (table >= 0) & (table <= 1))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"alphas_cumprod must hold finite values in [0, 1] (cumulative products of 1 - beta), "
                         f"got alphas_cumprod[{index}] = {float(table[index])}")
    if table.is_inference():
        return None
    token = next(_table_tokens)
    key = id(table)
    _checked_tables[key] = (weakref.ref(table, lambda _: _checked_tables.pop(key, None)), table._version, token)
    return token


def table_token(table: torch.Tensor) -> Optional[int]:
    """The token of a CPU table whose current values passed the check (``_check_table_values``), else None."""
    seen = _checked_tables.get(id(table))
    if seen is not None and seen[0]() is table and seen[1] == table._version:
        return seen[2]
    return None


# (function, table token, host timesteps, arguments) -> coefficients, for ``host_coefficients`` (bounded like
# the plan caches, ``store_plan``).
_host_coefficients: Dict[tuple, object] = {}


def host_coefficients(compute: Callable, table: torch.Tensor, timesteps: tuple, *args):
    """``compute(table, *timesteps, *args)``, memoised where it only reads host values: python-int timesteps and a
    checked, unchanged CPU table (``table_token``; ``args`` are python numbers and dtypes). A sampling loop then
    computes a step's coefficients once per timestep and table instead of once per call; any other call computes
    them."""
    if all(type(t) is int for t in timesteps):
        token = table_token(table)
        if token is not None:
            key = (compute, token, timesteps, args)
            found = _host_coefficients.get(key)
            if found is None:
                found = store_plan(_host_coefficients, key, compute(table, *timesteps, *args))
            return found
    return compute(table, *timesteps, *args)


def check_abar_at_timesteps(alphas_cumprod: torch.Tensor, timestep: "TimestepLike",
                            prev_timestep: Optional["TimestepLike"], prediction_type: str) -> None:
    """The values a step divides by, where both the table and the timesteps are on the host (else nothing is
    read): 1 - abar_t (both steps), abar_prev for prev_timestep >= 0 (DDIM's a / a', DDPM's alpha_t) and, for
    epsilon prediction, sqrt(abar_t). A zero there gives inf/NaN in every backend and in diffusers alike.
    ``prev_timestep=None`` means ``timestep - 1`` (DDPM's default)."""
    if alphas_cumprod.device.type != "cpu" or torch.compiler.is_compiling():
        return
    t = _host_index(timestep)
    if t is None:
        return
    a = alphas_cumprod[t.clamp(0, alphas_cumprod.numel() - 1)]
    if bool((a >= 1).any()):
        raise ValueError(f"alphas_cumprod is 1 at timestep {_first(t, a >= 1)}: the step divides by 1 - abar_t")
    if prediction_type == "epsilon" and bool((a <= 0).any()):
        raise ValueError(f"alphas_cumprod is 0 at timestep {_first(t, a <= 0)}: epsilon prediction divides by "
                         "sqrt(abar_t) (a zero-terminal-SNR schedule needs prediction_type='v_prediction')")
    prev = t - 1 if prev_timestep is None else _host_index(prev_timestep)
    if prev is not None:
        a_prev = alphas_cumprod[prev.clamp(0, alphas_cumprod.numel() - 1)]
        zero = (prev >= 0) & (a_prev <= 0)
        if bool(zero.any()):
            raise ValueError(f"alphas_cumprod is 0 at prev_timestep {_first(prev, zero)}: the step divides by "
                             "abar_prev")


def _host_index(timesteps) -> Optional[torch.Tensor]:
    """int64 CPU indices of host timesteps (validated ints or CPU tensors), None for a device tensor."""
    if isinstance(timesteps, int):
        return torch.tensor([timesteps])
    if timesteps.device.type != "cpu":
        return None
    return timesteps.reshape(-1).to(torch.int64)


def _first(values: torch.Tensor, where: torch.Tensor) -> int:
    return int(values[where.nonzero()[0, 0]]) if values.numel() > 1 else int(values[0])


def prepare_table(alphas_cumprod: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The table on ``sample``'s device in float32 (float64 for float64 samples, so that their
    coefficients are float64 too), contiguous; a no-op for a contiguous float32 table already there (the fast
    path). Any other table's copy is made once per table, version, device and dtype (``_table_copies``), so that a
    loop passing a CPU table (a diffusers scheduler's ``alphas_cumprod``) copies it at its first step only: each
    blocking host-to-device copy synchronises the stream, and the host would wait for the model at every step."""
    if table_ready(alphas_cumprod, sample):
        return alphas_cumprod
    dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    if alphas_cumprod.is_inference() or torch.compiler.is_compiling():   # (no version counter; traced: as it is)
        return alphas_cumprod.to(device=sample.device, dtype=dtype).contiguous()
    if sample.is_cuda and torch.cuda.is_current_stream_capturing():
        # (A graph captured with a cached copy would read memory the cache frees with its table.)
        if alphas_cumprod.is_cpu:
            raise ValueError("alphas_cumprod is on the CPU, and a CUDA-graph capture cannot copy it to the "
                             f"device: pass the table on the samples' device {sample.device} (for example "
                             "alphas_cumprod.to(device))")
        return alphas_cumprod.to(dtype=dtype).contiguous()
    table_id = id(alphas_cumprod)
    entry = _table_copies.get(table_id)
    if entry is None or entry[0]() is not alphas_cumprod:
        def forget(ref, table_id=table_id):
            if _table_copies.get(table_id, (None,))[0] is ref:
                del _table_copies[table_id]
        entry = _table_copies[table_id] = (weakref.ref(alphas_cumprod, forget), {})
    which = (alphas_cumprod._version, sample.device, dtype)
    table = entry[1].get(which)
    if table is None:
        table = entry[1][which] = alphas_cumprod.to(device=sample.device, dtype=dtype).contiguous()
        if table.is_cpu:   # (its values are checked as a table's, so that host coefficients memoise on it too)
            _check_table_values(table)
    return table


# id(table) -> (weak reference to the table, {(version, device, dtype): its copy}): ``prepare_table``'s copies of
# tables the backends do not take as they are. Every version's copies live as long as their table (a schedule is
# edited rarely, and a copy is T numbers), so that a copy an earlier call launched with is never freed under it.
_table_copies: Dict[int, Tuple[weakref.ref, Dict[tuple, torch.Tensor]]] = {}


def check_timesteps(name: str, timesteps, batch: int, num_train_timesteps: int, device: torch.device, *,
                    allow_negative: bool = False) -> TimestepLike:
    """An int (numpy integers included), a 0-d tensor or a ``[batch]`` integer tensor on the CPU or on
    ``device``, inside ``[0, T)`` (negative allowed for previous timesteps, meaning "before the first step").
    Returns it with integers as Python ints. Only host values are range-checked (compared in int64, so int8 and
    unsigned dtypes neither wrap nor fail): reading a device tensor would force a host sync."""
    low = "any negative value or 0" if allow_negative else "0"
    if isinstance(timesteps, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(timesteps, numbers.Integral):
        timesteps = int(timesteps)
        if timesteps >= num_train_timesteps or (timesteps < 0 and not allow_negative):
            raise ValueError(f"{name} must lie in [{low}, {num_train_timesteps - 1}] "
                             f"(alphas_cumprod has {num_train_timesteps} entries), got {timesteps}")
        return timesteps
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(timesteps).__name__}")
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {timesteps.dtype}")
    if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.numel() not in (1, batch)):
        raise ValueError(f"{name} must be 0-d or have shape [1] or [{batch}] (one per sample), "
                         f"got shape {tuple(timesteps.shape)}")
    if timesteps.device.type != "cpu" and timesteps.device != device:
        raise ValueError(f"{name} must be on the CPU or on the samples' device {device}, got {timesteps.device}")
    if timesteps.device.type == "cpu" and not torch.compiler.is_compiling():
        values = timesteps.to(torch.int64)
        high_bad = bool((values >= num_train_timesteps).any())
        low_bad = (not allow_negative) and bool((values < 0).any())
        if high_bad or low_bad:
            raise ValueError(f"{name} must lie in [{low}, {num_train_timesteps - 1}] "
                             f"(alphas_cumprod has {num_train_timesteps} entries), got {values.tolist()}")
    return timesteps


def prepare_timesteps(timesteps: TimestepLike, device: torch.device) -> torch.Tensor:
    """Contiguous int64 ``[1]`` or ``[B]`` on ``device`` without a host sync."""
    if isinstance(timesteps, int):
        return torch.full((1,), timesteps, dtype=torch.int64, device=device)
    if timesteps.device.type == "cpu" and device.type != "cpu" and not torch.compiler.is_compiling():
        return host_values_to_device("timesteps", timesteps, torch.int64, device)
    return timesteps.reshape(-1).to(device=device, dtype=torch.int64).contiguous()


def host_values_to_device(name: str, values: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The CPU tensor ``values`` (0-d, ``[1]`` or ``[B]``: timesteps, sigmas) as a contiguous ``[1 or B]`` tensor of
    ``dtype`` on the non-CPU ``device``, without a host sync (a blocking copy from pageable memory waits for the
    stream, that is for the model's kernels). One value is read on the host and filled in: reading a CPU scalar costs
    nothing. Several are staged through pinned memory, whose block torch's caching host allocator keeps until the
    copy has run; not while the stream is captured into a CUDA graph, whose replays would copy from that block again,
    long reused (a ValueError naming ``name``)."""
    values = values.detach().reshape(-1)
    if values.numel() == 1:
        return torch.full((1,), values.item(), dtype=dtype, device=device)
    if device.type != "cuda":
        return values.to(device=device, dtype=dtype).contiguous()
    if torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{name} holds per-sample values on the CPU, and a CUDA-graph capture cannot copy them to "
                         f"the device: pass them on the samples' device {device}")
    # (A fresh staging block even for a pinned ``values``: the caller may change it once the call returns.)
    staged = torch.empty(values.shape, dtype=dtype, pin_memory=True).copy_(values)
    return staged.to(device, non_blocking=True)


def is_batch_outer_dense(t: torch.Tensor) -> bool:
    """Each sample is one contiguous run in storage: dense, non-overlapping, batch stride = numel / B."""
    if t.numel() == 0:
        return True
    if t.is_contiguous():
        return True
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def laid_out_alike(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """Every tensor batch-outer dense, and the strides equal on every non-batch dimension longer than 1 in both
    tensors compared: then element i of sample b sits at the same flat offset in each. A size-1 dimension's stride
    never moves an element (a channels_last tensor with one channel has strides (HW, 1, W, 1), its contiguous twin
    (HW, HW, W, 1)), nor does the batch stride of a tensor with another batch size (the 2B-sample model output
    with guidance)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    # The common case, decided without a stride loop: all contiguous with the same sample shape.
    if all(t.is_contiguous() and t.shape[1:] == first.shape[1:] for t in present):
        return True
    if not all(is_batch_outer_dense(t) for t in present):
        return False
    return all(first.shape[d] == 1 or t.shape[d] == 1 or first.stride(d) == t.stride(d)
               for t in present[1:] for d in range(1, t.ndim))


def same_layout(tensors: Sequence[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
    """Returns the tensors laid out alike and batch-outer dense (see ``laid_out_alike``).

    The common case (all contiguous, or all channels_last) passes through without a copy."""
    if laid_out_alike(tensors):
        return tuple(tensors)
    return tuple(None if t is None else t.contiguous() for t in tensors)


def gather_abar(table: torch.Tensor, timesteps: "TimestepLike") -> torch.Tensor:
    """abar at ``timesteps`` (indices clamped into the table), ``[1 or B]`` in the table's dtype; a python int
    gives the one-element view ``table[t:t + 1]`` (no sync, no kernel)."""
    if isinstance(timesteps, int):
        t = min(max(timesteps, 0), table.numel() - 1)
        return table[t:t + 1]
    return table[timesteps.clamp(0, table.numel() - 1)]


def gather_abar_prev(table: torch.Tensor, prev_timesteps: "TimestepLike", final_alpha_cumprod: float) -> torch.Tensor:
    """abar at the previous timesteps; a negative index means "past the first step": ``final_alpha_cumprod``."""
    if isinstance(prev_timesteps, int):
        if prev_timesteps < 0:
            return torch.full((1,), final_alpha_cumprod, dtype=table.dtype, device=table.device)
        return gather_abar(table, prev_timesteps)
    inside = table[prev_timesteps.clamp(0, table.numel() - 1)]
    return torch.where(prev_timesteps >= 0, inside, torch.full_like(inside, final_alpha_cumprod))


def per_sample(coef, ndim: int):
    """``[1 or B]`` -> ``[1 or B, 1, ...]`` to broadcast against ``ndim``-dimensional samples; a 0-d tensor or a
    number broadcasts as it is."""
    if not isinstance(coef, torch.Tensor) or coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (ndim - 1)))


# ------------------------------------------------------------------------------------------------------------
# Step coefficients (the references). A timestep shared by the batch whose value is on the host (a python int,
# or a one-element CPU tensor outside tracing) with a CPU table gives host coefficients: python numbers computed
# once per call, each operation giving exactly what the same operation on 0-d tensors of the compute dtype
# gives (``HostFloat``), so that the tensor ops then see the fp32 values diffusers' 0-d tensor arithmetic
# produces, bit for bit. Otherwise the coefficients are tensors: the 0-d view ``table[t]`` of a device table at
# a python int (no sync, no kernel), or the per-sample gather ``[1 or B, 1, ...]``. The formulas are written
# once: ``HostFloat`` has the operators (and ``clamp``/``log``/``exp``) they use, as tensors do, and a mix of
# the two computes with tensors.
#
# +, -, * and / are IEEE operations in torch's CPU kernels, so python's float64 result rounded to float32 is
# torch's float32 result. sqrt, log and exp are not: torch's CPU sqrt (MKL's, in the x86 builds) is not the
# correctly rounded one (about 20% of fp32 square roots, and 1.5% in fp64, round the other way), so host
# numbers take their square roots, logarithms and exponentials from torch itself, on a small CPU tensor
# (``sqrts`` batches the square roots a step needs into one call).

_FLOAT32 = struct.Struct("f")


def round_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even; +-inf past the largest float32), as a cast to
    float32 rounds it. The float32 result of +, -, *, / or sqrt of float32 operands is the float64 result so
    rounded: float64 carries more than twice float32's precision plus two bits, so rounding twice never
    differs from rounding once."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _divide(a: float, b: float) -> float:
    """a / b with IEEE results where python raises: +-inf for x / 0, NaN for 0 / 0."""
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


class HostFloat(float):
    """A coefficient computed on the host: a number of the compute dtype (``HostFloat32``, ``HostFloat64``) whose
    arithmetic gives exactly what the same arithmetic on 0-d tensors of that dtype gives: each result rounded to
    the dtype, a python number operand first converted to it (as torch converts a scalar), IEEE results where
    python would raise (x / 0, sqrt of a negative). With a tensor operand it returns ``NotImplemented``: the
    tensor computes, with this number as a python scalar (exact in the tensor's dtype), and the result is a
    tensor. ``log``/``exp`` run torch's own fp32 (fp64) functions on a 0-d CPU tensor."""

    __slots__ = ()
    dtype: torch.dtype = torch.float64

    @staticmethod
    def _round(value: float) -> float:
        return value

    @classmethod
    def of(cls, value) -> "HostFloat":
        return cls(cls._round(float(value)))

    def _operand(self, other) -> Optional[float]:
        if isinstance(other, (float, int)) and not isinstance(other, bool):
            return self._round(float(other))
        return None

    def _new(self, value: float) -> "HostFloat":
        return type(self)(self._round(value))

    def __add__(self, other):
        o = self._operand(other)
        return NotImplemented if o is None else self._new(float.__add__(self, o))

    __radd__ = __add__

    def __sub__(self, other):
        o = self._operand(other)
        return NotImplemented if o is None else self._new(float.__sub__(self, o))

    def __rsub__(self, other):
        o = self._operand(other)
        return NotImplemented if o is None else self._new(o - float(self))

    def __mul__(self, other):
        o = self._operand(other)
        return NotImplemented if o is None else self._new(float.__mul__(self, o))

    __rmul__ = __mul__

    def __truediv__(self, other):
        o = self._operand(other)
        return NotImplemented if o is None else self._new(_divide(float(self), o))

    def __rtruediv__(self, other):
        o = self._operand(other)
        return NotImplemented if o is None else self._new(_divide(o, float(self)))

    def __neg__(self):
        return type(self)(-float(self))

    def __pow__(self, exponent):
        if exponent == 2:  # torch's pow computes x * x (and x ** 0.5 as sqrt)
            return self * self
        return self._torch(lambda t: t.pow_(exponent))

    def sqrt(self) -> "HostFloat":
        return self._torch(torch.Tensor.sqrt_)

    def clamp(self, min=None, max=None) -> "HostFloat":
        """As ``torch.clamp``: NaN stays NaN, and the upper bound wins where the bounds cross."""
        v = float(self)
        if v != v:
            return self
        if min is not None and v < self._round(float(min)):
            v = self._round(float(min))
        if max is not None and v > self._round(float(max)):
            v = self._round(float(max))
        return type(self)(v)

    def log(self) -> "HostFloat":
        return self._torch(torch.Tensor.log_)

    def exp(self) -> "HostFloat":
        return self._torch(torch.Tensor.exp_)

    def _torch(self, fn) -> "HostFloat":
        return type(self)(_host_torch(fn, (self,), self.dtype)[0])


def _host_torch(fn, values, dtype: torch.dtype) -> list:
    """``fn`` (an in-place torch function) of the host numbers ``values`` as python floats, computed by torch on
    a CPU tensor of ``dtype`` (made through numpy: the cheapest way there)."""
    return fn(torch.from_numpy(numpy.array(values, dtype=_NUMPY_DTYPES[dtype]))).tolist()


def sqrts(*values) -> tuple:
    """The square roots of step coefficients, as ``v ** 0.5``: host numbers of one dtype in a single torch call
    (see above), tensors (or a mix) one by one."""
    first = values[0]
    if isinstance(first, HostFloat) and all(type(v) is type(first) for v in values):
        return tuple(map(type(first), _host_torch(torch.Tensor.sqrt_, values, first.dtype)))
    return tuple(v ** 0.5 for v in values)



_NUMPY_DTYPES = {torch.float32: numpy.float32, torch.float64: numpy.float64}


class HostFloat32(HostFloat):
    __slots__ = ()
    dtype = torch.float32
    _round = staticmethod(round_float32)


class HostFloat64(HostFloat):
    __slots__ = ()


def host_timestep(timesteps) -> Optional[int]:
    """The timestep shared by the whole batch as a python int, when its value is on the host: a python int, or
    a one-element CPU tensor read outside tracing (a plain tensor: no fake, functional or functorch-wrapped
    one); else None (a device tensor is never read: that would sync)."""
    if isinstance(timesteps, int):
        return timesteps
    if type(timesteps) is torch.Tensor and timesteps.is_cpu and timesteps.numel() == 1 \
            and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(timesteps):
        return int(timesteps)
    return None


def _host_readable(table: torch.Tensor) -> bool:
    return type(table) is torch.Tensor and table.is_cpu \
        and not torch._C._functorch.is_functorch_wrapped_tensor(table)


def step_abar(table: torch.Tensor, timesteps: "TimestepLike", dtype: torch.dtype, ndim: int,
              final_alpha_cumprod: Optional[float] = None):
    """abar at ``timesteps`` as a step coefficient of the compute ``dtype`` (float32 or float64; see above): a
    ``HostFloat`` for a host timestep and a CPU table; the 0-d view ``table[t]`` for a host timestep and a device
    table; else the gather, ``[1 or B, 1, ...]`` against ``ndim``-dimensional samples. Indices are clamped into
    the table. With ``final_alpha_cumprod`` (a previous timestep) a negative index means that value instead (a
    ``HostFloat``, rounded to the table's dtype first as a fill of the table's dtype would be)."""
    t = host_timestep(timesteps)
    if t is not None:
        host = HostFloat64 if dtype == torch.float64 else HostFloat32
        if final_alpha_cumprod is not None and t < 0:
            final = round_float32(final_alpha_cumprod) if table.dtype == torch.float32 else final_alpha_cumprod
            return host.of(final)
        t = min(max(t, 0), table.numel() - 1)
        if _host_readable(table):
            return host.of(table[t].item())
        return table[t].to(dtype)
    if final_alpha_cumprod is None:
        coef = gather_abar(table, timesteps)
    else:
        coef = gather_abar_prev(table, timesteps, final_alpha_cumprod)
    return per_sample(coef, ndim).to(dtype)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is already so (a no-op ``.to`` still costs a microsecond at latent
    sizes)."""
    return t if t.dtype == dtype else t.to(dtype)


def apply_guidance(model_output: torch.Tensor, batch: int, guidance_scale: Optional[float],
                   channels: Optional[int] = None, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance over a ``[2B, ...]`` model output (first half unconditional, second half
    conditional): uncond + s * (cond - uncond), then, when ``guidance_rescale`` is not 0, the pipelines' std
    rescale of the guided output (``rescale_guided``). When ``channels`` is given and the output carries more
    channels (a learned variance), only the first ``channels`` are guided (and rescaled, against the first
    ``channels`` of the conditional half) and the rest come from the conditional half, as in diffusers'
    pipelines. Works in the dtype of ``model_output``."""
    if guidance_scale is None:
        return model_output
    uncond, cond = model_output[:batch], model_output[batch:]
    if channels is None or model_output.shape[1] == channels:
        return rescale_guided(uncond + guidance_scale * (cond - uncond), cond, guidance_rescale)
    guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    guided = rescale_guided(guided, cond[:, :channels], guidance_rescale)
    return torch.cat([guided, cond[:, channels:]], dim=1)


def per_sample_std(t: torch.Tensor) -> torch.Tensor:
    """The unbiased standard deviation of each sample over all its non-batch dimensions, ``[B, 1, ...]``: what
    diffusers' ``rescale_noise_cfg`` computes (``t.std(dim=list(range(1, t.ndim)), keepdim=True)``); a sample of
    one element has NaN."""
    if t.ndim == 1:
        return t.unsqueeze(1).std(dim=1)
    return t.std(dim=list(range(1, t.ndim)), keepdim=True)


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", section 3.4), in its operation order: ``r * (guided * std(cond) / std(guided)) + (1 - r) * guided``
    with per-sample unbiased stds (``per_sample_std``); ``guided`` itself when r is 0. The fast backends compute
    the factor std(cond) / std(guided) in a stats pass and ``1 - r`` once on the host (in float64, as python
    computes it here)."""
    if guidance_rescale == 0:
        return guided
    rescaled = guided * (per_sample_std(cond) / per_sample_std(guided))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def check_guidance_rescale(guidance_rescale, guidance_scale) -> float:
    """Validates ``guidance_rescale`` (a float >= 0; not 0 only with guidance)."""
    guidance_rescale = check_float("guidance_rescale", guidance_rescale, low=0.0)
    if guidance_rescale != 0 and guidance_scale is None:
        raise ValueError("guidance_rescale rescales the guided model output and needs guidance_scale")
    return guidance_rescale


def predict_x0_eps(prediction_type: str, sample: torch.Tensor, model_output: torch.Tensor, abar, *,
                   roots: Optional[tuple] = None, need_eps: bool = True,
                   copy_sample: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x0, eps) from the model output, in diffusers' operation order; ``abar`` a step coefficient (a number, a
    0-d or a per-sample tensor, see ``step_abar``), ``roots`` its ``(abar ** 0.5, (1 - abar) ** 0.5)`` when the
    caller has them (``sqrts``). eps is None unless ``need_eps`` (or it is the model output). Sample prediction
    returns a copy of the model output as x0 (a custom op's outputs may not alias its inputs), or, with
    ``copy_sample=False``, the model output itself (the caller copies it where it must)."""
    sqrt_abar, sqrt_beta = roots if roots is not None else sqrts(abar, 1 - abar)
    if prediction_type == "epsilon":
        return (sample - sqrt_beta * model_output) / sqrt_abar, model_output
    if prediction_type == "sample":
        x0 = model_output.clone() if copy_sample else model_output
        return x0, ((sample - sqrt_abar * x0) / sqrt_beta if need_eps else None)
    x0 = sqrt_abar * sample - sqrt_beta * model_output  # v_prediction
    return x0, (sqrt_abar * model_output + sqrt_beta * sample if need_eps else None)


def threshold_scale_from_abs(abs_x0: torch.Tensor, ratio: float, sample_max_value: float) -> torch.Tensor:
    """Per-sample s = clamp(quantile(|x0|, ratio), 1, sample_max_value), ``[B]`` in ``abs_x0``'s dtype, from
    |x0| ``[B, n]`` (float32, or float64 for float64 samples).

    The quantile interpolates linearly between order statistics like ``torch.quantile`` (rank computed in
    ``abs_x0``'s dtype as there), but selects with ``kthvalue`` so that it has no size limit. The Triton backend
    calls this on the |x0| its first pass wrote, the reference and the CUDA backend through
    ``dynamic_threshold_scale``: every backend selects s the same way."""
    n = abs_x0.shape[1]
    rank = float(torch.tensor(ratio, dtype=abs_x0.dtype) * (n - 1))  # a CPU tensor: no sync
    below = int(math.floor(rank))
    above = min(below + 1, n - 1)
    weight = rank - below   # a python float: no host-to-device copy, so CUDA graphs can capture this
    v_below = abs_x0.kthvalue(below + 1, dim=1).values
    v_above = abs_x0.kthvalue(above + 1, dim=1).values if above != below else v_below
    return torch.lerp(v_below, v_above, weight).clamp(1.0, sample_max_value)


def dynamic_threshold_scale(x0: torch.Tensor, ratio: float, sample_max_value: float) -> torch.Tensor:
    """Per-sample s = clamp(quantile(|x0|, ratio), 1, sample_max_value), ``[B]`` in float32 (float64 for
    float64 x0), from x0 ``[B, ...]`` (see ``threshold_scale_from_abs``)."""
    compute = torch.promote_types(x0.dtype, torch.float32)
    if x0.numel() == 0:
        # No sample, or samples of no element: nothing to select from, and nothing the scale could change.
        return torch.ones(x0.shape[0], dtype=compute, device=x0.device)
    flat = x0.reshape(x0.shape[0], -1).to(compute).abs()
    return threshold_scale_from_abs(flat, ratio, sample_max_value)


def clip_or_threshold(x0: torch.Tensor, *, clip_sample: bool, clip_sample_range: float, thresholding: bool,
                      dynamic_thresholding_ratio: float, sample_max_value: float) -> torch.Tensor:
    """Dynamic thresholding (wins over clipping, as in diffusers), clipping, or nothing."""
    if thresholding:
        s = per_sample(dynamic_threshold_scale(x0, dynamic_thresholding_ratio, sample_max_value), x0.ndim)
        return torch.clamp(x0, -s, s) / s
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def draw_noise(shape, dtype: torch.dtype, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise drawn like diffusers' ``randn_tensor`` for a single generator: on the
    generator's device, then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class X0Options(NamedTuple):
    """How x0 is post-processed, as the custom ops take it: the values of options that do not apply are
    neutral placeholders, so that an unused option is neither validated nor seen by a kernel."""
    clip_sample: bool
    clip_sample_range: float
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float


def check_step_options(*, prediction_type, clip_sample, clip_sample_range, thresholding,
                       dynamic_thresholding_ratio, sample_max_value, guidance_scale) -> X0Options:
    """Validates the options a step uses, as diffusers reads its config: thresholding wins over clipping, and an
    option of a disabled mode is ignored whatever its value (diffusers' own configs carry such values).

    ``sample_max_value`` may be below 1: the scale is then ``clamp(s, 1, sample_max_value) = sample_max_value``
    (the upper bound wins when the bounds cross, in torch as in diffusers' tests)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_bool("clip_sample", clip_sample)
    check_bool("thresholding", thresholding)
    if guidance_scale is not None:
        check_float("guidance_scale", guidance_scale)
    if thresholding:
        ratio = check_float("dynamic_thresholding_ratio", dynamic_thresholding_ratio, low=0.0, high=1.0)
        max_value = check_float("sample_max_value", sample_max_value, low=0.0, low_inclusive=False)
        return X0Options(False, 1.0, True, ratio, max_value)
    if clip_sample:
        clip_range = check_float("clip_sample_range", clip_sample_range, low=0.0)
        return X0Options(True, clip_range, False, 0.995, 1.0)
    return X0Options(False, 1.0, False, 0.995, 1.0)


def check_generator(generator, noise) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and noise is not None:
        raise ValueError("pass either noise or generator, not both")


def float64_runs_reference(reference: Callable, *, dtype_from: int) -> Callable[[Callable], Callable]:
    """Decorator for a fast backend's op, called like ``reference`` with its tensors positional: when positional
    argument ``dtype_from`` (the tensor whose dtype the op computes in: the sample of a step, x of GroupNorm) is
    float64, ``reference`` runs with the same arguments instead.

    The kernels compute in fp32 by design; float64 is a checking dtype (gradcheck, 1e-10 tolerances) that the
    reference already computes in fp64."""
    def decorate(fast_op: Callable) -> Callable:
        @functools.wraps(fast_op)
        def op(*args, **options):
            run = reference if args[dtype_from].dtype == torch.float64 else fast_op
            return run(*args, **options)
        return op
    return decorate


def register_step_autograd(op, reference: Callable) -> None:
    """Autograd for a step's custom op (``ddim_step``, ``ddpm_step``): gradients of ``(prev_sample,
    pred_original_sample)`` with respect to ``model_output``, ``sample`` and ``noise``, whichever backend ran the
    forward.

    The op's inputs are ``(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, *options,
    backend)`` with the options in the order of ``reference``'s keyword-only parameters. The backward is the
    vector-Jacobian product of ``reference`` (``torch.func.vjp``): every path of the step (guidance, each
    prediction type, clipping, dynamic thresholding through its per-sample quantile, the variance types) is
    differentiated by the same formula that defines its forward, and no second formula can drift from it. It
    recomputes the step once in the backward pass; the steps are a few elementwise passes, so that costs what the
    forward costs."""
    option_names = [name for name, p in inspect.signature(reference).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def setup_context(ctx, inputs, output):
        model_output, sample, noise, alphas_cumprod, timestep, prev_timestep = inputs[:6]
        ctx.save_for_backward(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep)
        ctx.options = dict(zip(option_names, inputs[6:6 + len(option_names)]))

    def backward(ctx, grad_prev, grad_x0):
        model_output, sample, noise, alphas_cumprod, timestep, prev_timestep = ctx.saved_tensors
        with_noise = noise is not None

        def step(model_output, sample, *maybe_noise):
            return reference(model_output, sample, maybe_noise[0] if with_noise else None, alphas_cumprod,
                             timestep, prev_timestep, **ctx.options)

        _, vjp = torch.func.vjp(step, model_output, sample, *((noise,) if with_noise else ()))
        grads = vjp((grad_prev, grad_x0))
        grad_noise = grads[2] if with_noise else None
        return (grads[0], grads[1], grad_noise) + (None,) * (3 + len(option_names) + 1)

    op.register_autograd(backward, setup_context=setup_context)


# ----------------------------------------------------------------------------------------------------------
# The eager hot path.
#
# At latent sizes a kernel takes a few microseconds, so the host work in front of it is the cost a user sees.
# A public op therefore keys its validated, normalised arguments (a "plan") on the call's signature: the
# shapes, strides, dtypes and devices of its tensors, its option values with their types, host timestep values,
# and, for a CPU abar table, the token of its value check (``table_key``). The first call with a signature runs
# every check and stores the plan; a later call is a lookup. Nothing value-dependent is skipped: host
# timesteps are part of the key, a CPU ``[B]`` timestep tensor (values that change per call) is never cached,
# and a changed CPU table gets a new token. Any failure while building a key (a wrong type, an unhashable
# value) falls back to the full checks, which raise the usual error.
#
# A plan runs in one of two ways. In eager mode with no autograd to record, the public op calls the plan's
# ``launch`` directly, with python-int timesteps as scalars (no fill kernel); under ``torch.compile`` or with
# inputs that require grad it goes through the torch custom op, which tracing and autograd need.
#
# ``launch`` is the chosen backend's implementation bound to the plan (``bound_launch``): where the backend
# registers a binder for it (``binds``), one made for this signature, which did once what depends only on the
# signature (launch geometry, kernel arguments fixed by the options, the op handle), so that a call allocates its
# outputs and launches; elsewhere the implementation with the plan's options.


class Uncacheable(Exception):
    """A call whose checks depend on values that can change between calls with the same signature."""


# Every plan cache, so that ``backends.clear_cache`` (availability changed) can drop the plans too.
_plan_caches: list = []
# Plans per op beyond which a cache is cleared rather than grown (one per signature and host timestep).
PLAN_CACHE_LIMIT = 4096


def plan_cache() -> dict:
    """A new (registered) plan cache for one op."""
    cache: dict = {}
    _plan_caches.append(cache)
    return cache


class StepPlan(NamedTuple):
    """A validated call signature of a step op (``ddim_step``, ``ddpm_step``, ``flow_match_step``)."""
    backend: str
    launch: Optional[Callable]  # the eager call (``bound_launch``); None while tracing
    options: Dict[str, object]  # the reference's keyword options, in the custom op's order
    relayout: bool  # the tensors are not laid out alike (or a learned variance's are not contiguous)
    table_ready: bool  # the abar table is what the backends take already (``prepare_table``); False without one
    uses_noise: bool  # the step reads noise (DDIM: eta > 0; flow: stochastic; DDPM: decided per timestep)


def step_tensors(plan: StepPlan, model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                 generator: Optional[torch.Generator], draw_dtype: torch.dtype) -> tuple:
    """``(model_output, sample, noise)`` as a step's backends take them: no noise when the plan reads none; else the
    caller's, or a draw like diffusers' (a normal of ``draw_dtype`` with ``generator``, in the sample's dtype); all
    laid out alike (``same_layout``) where they are not."""
    relayout = plan.relayout
    if not plan.uses_noise:
        noise = None
    elif noise is None:
        noise = as_dtype(draw_noise(sample.shape, draw_dtype, sample.device, generator), sample.dtype)
        relayout = not laid_out_alike((model_output, sample, noise))
    if relayout:
        model_output, sample, noise = same_layout([model_output, sample, noise])
    return model_output, sample, noise


def cached_plan(cache: dict, make_key: Callable[[], tuple]) -> tuple:
    """``(key, plan)``: the key ``make_key()`` builds and the plan ``cache`` holds under it (None before the first call
    with it), or ``(None, None)`` when building the key raises: a bad argument (the full checks then raise the usual
    error) or values checked on every call (``Uncacheable``)."""
    try:
        key = make_key()
        return key, cache.get(key)  # (an unhashable option fails here)
    except Exception:
        return None, None


def store_plan(cache: dict, key, plan):
    """``plan`` stored under ``key`` (when there is one), bounding the cache."""
    if key is not None:
        if len(cache) >= PLAN_CACHE_LIMIT:
            cache.clear()
        cache[key] = plan
    return plan


def clear_plans() -> None:
    for cache in _plan_caches:
        cache.clear()


def tensor_key(t: torch.Tensor) -> tuple:
    """What the checks read of a tensor: shape, strides, dtype and device (never its values)."""
    return (t.shape, t.stride(), t.dtype, t.device)


def optional_tensor_key(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def table_key(table: torch.Tensor) -> tuple:
    """``tensor_key`` of the abar table; for a CPU table also the token of its value check (run here, once per
    table and version), since the checks at host timesteps read its values."""
    if table.is_cpu:  # (``device.type`` builds a device object: a third of a microsecond)
        token = _check_table_values(table)
        if token is None:  # an inference tensor: checked on every call
            raise Uncacheable
        return (table.shape, table.stride(), table.dtype, token)
    return (table.shape, table.stride(), table.dtype, table.device)


def host_scalar(timesteps):
    """A CPU one-element integer tensor as a python int (reading a CPU scalar costs nothing, and the kernels
    then take it as a scalar argument); anything else unchanged."""
    if type(timesteps) is torch.Tensor and timesteps.is_cpu and timesteps.numel() == 1 \
            and timesteps.ndim <= 1 and timesteps.dtype in _INDEX_DTYPES:
        return int(timesteps)
    return timesteps


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def timestep_key(timesteps):
    """A host int is part of the key (its range check is then cached); a device tensor by its metadata; a CPU
    tensor of several timesteps is not cacheable (its values are checked on every call)."""
    if type(timesteps) is int:
        return timesteps
    if timesteps.is_cpu:
        raise Uncacheable
    return (timesteps.shape, timesteps.stride(), timesteps.dtype, timesteps.device)


def options_key(options: tuple) -> tuple:
    """Option values and their types (``True == 1 == 1.0``, but only some of them are valid)."""
    return options, tuple(map(type, options))


def records_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record a call on these inputs (then it must go through the custom op)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def kernel_timesteps(timesteps: TimestepLike, sample: torch.Tensor) -> TimestepLike:
    """What the backends' implementations take: a python int as it is (every backend takes a host timestep as
    a number: the kernels get it as a scalar argument, so a step launches no fill kernel), a tensor as int64
    ``[1 or B]`` on ``sample``'s device (a view when already so; per-sample CPU values copied there,
    ``prepare_timesteps``)."""
    if type(timesteps) is int:
        return timesteps
    if timesteps.is_cpu and not sample.is_cpu:
        return prepare_timesteps(timesteps, sample.device)
    return timesteps.reshape(-1).to(torch.int64)


def table_ready(alphas_cumprod: torch.Tensor, sample: torch.Tensor) -> bool:
    """Whether ``prepare_table`` would return the table itself (then a call skips it)."""
    dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    return alphas_cumprod.device == sample.device and alphas_cumprod.dtype == dtype and alphas_cumprod.is_contiguous()


def one_launch_step(sample: torch.Tensor, timestep, prev_timestep, *, thresholding: bool,
                    guidance_scale: Optional[float], guidance_rescale: float) -> bool:
    """Whether a step call is what the fast backends' binders specialise: one kernel launch (no dynamic
    thresholding, no guidance rescale: each adds a pass first), not float64 (which runs the reference), and
    python-int timesteps (kernel arguments)."""
    return not (sample.dtype == torch.float64 or thresholding or (guidance_scale is not None and guidance_rescale != 0)
                or type(timestep) is not int or type(prev_timestep) is not int)


def binds(implementation: Callable) -> Callable[[Callable], Callable]:
    """Decorator registering a binder for ``implementation`` (a backend's function, called with the reference's
    positional tensors and keyword options): ``binder(*example_args, **options)`` returns ``launch(*args)``,
    which must return exactly what ``implementation(*args, **options)`` returns for every call whose arguments have
    the example's signature (``tensor_key`` of each tensor, python int or tensor timesteps), or None where it
    does not specialise that call (then the plan runs the implementation). tests/test_hot_path.py compares the
    two on every binder."""
    def register(binder: Callable) -> Callable:
        implementation.bind = binder
        return binder
    return register


def bound_launch(implementation: Callable, example_args: tuple, options: Dict[str, object]) -> Callable:
    """``launch(*args) == implementation(*args, **options)`` for calls with ``example_args``' signature: the
    implementation's binder's launch (``binds``) where it has one for them, else the implementation with
    ``options`` bound."""
    binder = getattr(implementation, "bind", None)
    launch = binder(*example_args, **options) if binder is not None else None
    return launch if launch is not None else functools.partial(implementation, **options)
