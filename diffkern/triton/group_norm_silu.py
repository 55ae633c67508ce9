"""GroupNorm + SiLU in Triton, forward and backward.

The math and the backend contract are in ``diffkern/ops/group_norm_silu.py``; this module implements
``group_norm_silu_forward`` and ``group_norm_silu_backward`` with the reference functions' signatures.

Layouts
    ``x`` is the 3-D view ``(N, C, S)``, either NCHW (strides ``(C*S, S, 1)``) or channels-last (strides
    ``(C*S, 1, C)``). Every kernel works on 2-D tiles ``[BLOCK_S pixels, BLOCK_C channels]`` of one
    (n, g) group, addressed as ``group_base + s * stride_s + c * stride_c``. In NCHW a group is one contiguous
    run and the tile's pixel axis is the contiguous one; in channels-last a group is C/G contiguous channels
    strided by C and the tile's channel axis is. Loads coalesce along whichever axis is contiguous; nothing
    is ever copied to the other layout. Outputs take ``x``'s strides (``torch.empty_like``).

    C/G is a compile-time constant of every kernel (a model uses a handful of values, so few compiles): the
    compiler then knows how a channels-last group is aligned, issues 16-byte accesses when C/G is a
    multiple of 8 halves or 4 floats (SD's C/G of 10 allows 4 bytes: its groups are 20-byte runs), and
    folds the channel masks.

Regimes (picked by ``_make_plan`` from shapes alone, so there is no host sync)
    single  The group, padded to a power-of-two tile, fits in registers (forward: at most 16K elements;
            backward: 8K, since x and dy are both held). One program per (n, g) reads its group once.
            Forward: 2 passes over memory (read x, write y). Backward: 3 (read x and dy, write dx).
    split   The group is too big for one tile and N*G programs would leave SMs idle (Stable Diffusion at
            batch 1-2: 32-64 groups against 132 SMs). Each group is cut into K rectangular chunks of
            whole tiles. Kernel A writes per-chunk partials to a small fp32 buffer; kernel B merges its
            group's K partials in a fixed order and finishes its own chunk, reading it again (from L2 when
            the tensor fits there, as at those batch sizes). Forward: x read twice, y written once.
            Backward: x and dy read twice, dx written once.
    looped  Big groups, and enough of them to fill the GPU: one program per (n, g) loops over its group
            twice (statistics, then output). Same passes as split, but the second read of a group follows
            its first closely, so it mostly hits L2 even when the whole tensor does not fit there.

Statistics
    Each tile computes its exact mean and M2 = sum((x - tile_mean)^2) in registers, and tiles and chunks
    are combined with Chan's parallel formula: a one-pass, fp32 variance that does not cancel for
    |mean| >> std the way sum(x^2)/M - mean^2 does. Normalization is ``(x - mean) * rstd`` (not a folded
    ``x * a + b``, which cancels the same way for large means).

Backward
    The SiLU derivative is recomputed from x, mean and rstd (nothing else is saved). Per (n, g) the kernels
    reduce sum(dxhat) and sum(dxhat * xhat), then dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat)).
    dweight/dbias: every program writes per-channel partial sums into one row of a ``[P, R, C]`` fp32
    buffer (P planes: dweight and/or dbias; R = N * spatial chunks; each entry is written exactly once, so
    no memset), and a small kernel sums the rows in a fixed order. No float atomics anywhere: results are
    bitwise reproducible from run to run.

Indexing
    Per-group and per-row base offsets are 64-bit scalars; offsets inside a sample are 32-bit unless one
    sample has 2^31 elements or more (then ``OFFSETS_64`` widens them too).

float64 input runs the reference functions: the contract asks for float64 statistics there (so that
``gradcheck`` sees float64 math), and float64 GroupNorm is a correctness tool, not a hot path.

Triton 3.6's interpreter
    The looped and split kernels (and the dweight/dbias row sum) loop over runtime bounds,
    ``for c_tile in range(c_begin, c_end)``: the ordinary Triton idiom, which every supported Triton compiles
    (``scripts/compile_triton_kernels.py``). The interpreter runs such a loop with Python's ``range``, which
    calls ``__index__`` on the bound, a scalar held as a 1-element NumPy array. Triton 3.6 (pinned by torch
    2.10 and 2.11) implements that as ``int(array)``, which NumPy 2.4 turned from a deprecation warning into
    ``TypeError: only 0-dimensional arrays can be converted to Python scalars`` (triton-lang/triton#9171;
    Triton 3.7 reads ``int(array.squeeze())``). On Triton 3.6 only, importing this module installs 3.7's
    definition into the interpreter (``_fix_triton36_interpreter``); compiled kernels are not affected.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from diffkern.ops._common import float64_runs_reference
from diffkern.ops.group_norm_silu import group_norm_silu_backward_reference, group_norm_silu_forward_reference


def _triton_version() -> Tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _fix_triton36_interpreter() -> bool:
    """On Triton 3.6, make the interpreter's ``tensor.__index__`` read a 1-element array as 3.7 does (see the
    module docstring). Returns whether the interpreter now carries the fix; a no-op on other versions."""
    if _triton_version() != (3, 6):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "diffkern_index_fix", False):
        return True

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor.diffkern_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


_fix_triton36_interpreter()

# ----------------------------------------------------------------------------------------------------------
# Planning: tile shapes, regime and chunking, from shapes only.
# ----------------------------------------------------------------------------------------------------------


class _Tuning(NamedTuple):
    """Size thresholds of one direction (not tuned on hardware yet; see the module docstring)."""

    single_read_elems: int  # largest padded group tile kept in registers by one program
    loop_tile_elems: int  # tile size when looping over a group
    min_chunk_elems: int  # never split a group into chunks smaller than this
    programs_per_sm: int  # how many programs the split regime aims for per SM


_FORWARD_TUNING = _Tuning(single_read_elems=16384, loop_tile_elems=4096, min_chunk_elems=4096, programs_per_sm=2)
# The backward holds two tensors (x and dy) per tile, so its tiles are half the size.
_BACKWARD_TUNING = _Tuning(single_read_elems=8192, loop_tile_elems=2048, min_chunk_elems=4096, programs_per_sm=2)

# FMA contraction on, explicitly (Triton 3.9 warns that its default will flip): one rounding instead of two
# in the affine and the dx update.
_LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# The interpreter has no SMs; this stand-in only decides which regime CPU runs take.
_INTERPRETER_SM_COUNT = 4

REGIMES = ("single", "looped", "split")


class _Plan(NamedTuple):
    """How one call runs. Tiles are ``[block_s, block_c]``; a group has ``c_tiles x s_tiles`` of them, cut
    into ``c_chunks x s_chunks`` chunks of ``c_tiles_per_chunk x s_tiles_per_chunk`` tiles (1 x 1 chunk
    unless split)."""

    regime: str
    channels_last: bool
    block_s: int
    block_c: int
    c_tiles: int
    s_tiles: int
    c_chunks: int
    s_chunks: int
    c_tiles_per_chunk: int
    s_tiles_per_chunk: int
    offsets_64: bool
    num_warps: int

    @property
    def chunks(self) -> int:
        return self.c_chunks * self.s_chunks


# Test hook: ``_override_plan`` replaces decisions of ``_make_plan`` (regime, chunks, loop tile size,
# offsets_64, sm_count) so that small test shapes reach every code path.
_overrides: Dict[str, object] = {}
# The plans of the latest forward and backward calls, for tests to check which regime ran.
_last_plan: Dict[str, _Plan] = {}


@contextlib.contextmanager
def _override_plan(**changes) -> Iterator[None]:
    unknown = set(changes) - {"regime", "chunks", "loop_tile_elems", "offsets_64", "sm_count"}
    if unknown:
        raise ValueError(f"unknown plan overrides {sorted(unknown)}")
    if "regime" in changes and changes["regime"] not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {changes['regime']!r}")
    saved = dict(_overrides)
    _overrides.update(changes)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _next_pow2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _num_warps(tile_elems: int) -> int:
    # About 8-32 fp32 values per thread: 16-byte vector accesses for half types, bounded register use.
    return max(4, min(16, tile_elems // 256))


def _loop_tile(channels_per_group: int, spatial: int, channels_last: bool, tile_elems: int) -> Tuple[int, int]:
    """(block_s, block_c) of a loop tile: the contiguous axis gets the room first."""
    if channels_last:
        block_c = min(_next_pow2(channels_per_group), tile_elems)
        block_s = min(_next_pow2(spatial), max(1, tile_elems // block_c))
    else:
        block_s = min(_next_pow2(spatial), tile_elems)
        block_c = min(_next_pow2(channels_per_group), max(1, tile_elems // block_s))
    return block_s, block_c


def _split_counts(want: int, c_tiles: int, s_tiles: int, channels_last: bool) -> Tuple[int, int, int, int]:
    """(c_chunks, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk) for about ``want`` chunks, none empty.

    The outer axis in memory is cut first (channels in NCHW, pixels in channels-last), so a chunk stays
    one contiguous range of memory where it can."""
    if channels_last:
        s_chunks = min(want, s_tiles)
        c_chunks = min(triton.cdiv(want, s_chunks), c_tiles)
    else:
        c_chunks = min(want, c_tiles)
        s_chunks = min(triton.cdiv(want, c_chunks), s_tiles)
    c_per, s_per = triton.cdiv(c_tiles, c_chunks), triton.cdiv(s_tiles, s_chunks)
    return triton.cdiv(c_tiles, c_per), triton.cdiv(s_tiles, s_per), c_per, s_per


def _make_plan(batch: int, channels: int, spatial: int, num_groups: int, channels_last: bool, sm_count: int,
               tuning: _Tuning, *, regime: Optional[str] = None, chunks: Optional[int] = None,
               loop_tile_elems: Optional[int] = None, offsets_64: Optional[bool] = None) -> _Plan:
    """The plan for an ``(N, C, S)`` input. Keywords other than the shapes override the heuristic:

    - single if the whole group, padded to powers of two per axis, fits ``single_read_elems``;
    - else split into about ``programs_per_sm * sm_count / (N*G)`` chunks (each at least
      ``min_chunk_elems``) when the N*G groups are fewer than the SMs;
    - else looped.
    """
    cpg = channels // num_groups
    groups = batch * num_groups
    whole_s, whole_c = _next_pow2(spatial), _next_pow2(cpg)
    if regime is None:
        regime = "single" if whole_s * whole_c <= tuning.single_read_elems else "auto"
    if regime == "single":
        block_s, block_c = whole_s, whole_c
    else:
        block_s, block_c = _loop_tile(cpg, spatial, channels_last, loop_tile_elems or tuning.loop_tile_elems)
    c_tiles, s_tiles = triton.cdiv(cpg, block_c), triton.cdiv(spatial, block_s)
    c_chunks = s_chunks = 1
    c_per, s_per = c_tiles, s_tiles
    if regime in ("auto", "split"):
        if chunks is None:
            want = triton.cdiv(tuning.programs_per_sm * sm_count, groups) if groups < sm_count else 1
            want = min(want, max(1, cpg * spatial // tuning.min_chunk_elems))
        else:
            want = chunks
        c_chunks, s_chunks, c_per, s_per = _split_counts(want, c_tiles, s_tiles, channels_last)
        # A forced split stays split even with one chunk (a one-tile group): the test hook means it.
        if regime == "auto":
            regime = "split" if c_chunks * s_chunks > 1 else "looped"
    if offsets_64 is None:
        offsets_64 = channels * spatial >= 2**31
    return _Plan(regime=regime, channels_last=channels_last, block_s=block_s, block_c=block_c,
                 c_tiles=c_tiles, s_tiles=s_tiles, c_chunks=c_chunks, s_chunks=s_chunks,
                 c_tiles_per_chunk=c_per, s_tiles_per_chunk=s_per, offsets_64=offsets_64,
                 num_warps=_num_warps(block_s * block_c))


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if "sm_count" in _overrides:
        return int(_overrides["sm_count"])
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_SM_COUNT


def _plan_for(x: torch.Tensor, num_groups: int, channels_last: bool, tuning: _Tuning) -> _Plan:
    n, c, s = x.shape
    keywords = {key: value for key, value in _overrides.items() if key != "sm_count"}
    return _make_plan(n, c, s, num_groups, channels_last, _sm_count(x.device), tuning, **keywords)


# ----------------------------------------------------------------------------------------------------------
# Layout checks and launch helpers.
# ----------------------------------------------------------------------------------------------------------


def _has_layout(t: torch.Tensor, channels_last: bool) -> bool:
    """Whether element (n, c, s) of the 3-D ``t`` lives at ``n*C*S + c*stride_c + s*stride_s`` for the layout
    (strides of size-1 dimensions do not matter)."""
    n, c, s = t.shape
    expected = (c * s, 1, c) if channels_last else (c * s, s, 1)
    return all(size == 1 or stride == want for size, stride, want in zip(t.shape, t.stride(), expected))


def _layout_of(x: torch.Tensor) -> Optional[bool]:
    """True for channels-last, False for NCHW, None for neither. With C == 1 or S == 1 both layouts are the
    same memory; NCHW addressing is used."""
    if _has_layout(x, channels_last=False):
        return False
    if _has_layout(x, channels_last=True):
        return True
    return None


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _param(param: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    # A [C] view with a stride is made dense (C elements, not a hot-path cost). Absent parameters pass a
    # placeholder pointer that the kernels never read (HAS_WEIGHT / HAS_BIAS are False).
    return placeholder if param is None else param.contiguous()


# ----------------------------------------------------------------------------------------------------------
# Shared device functions.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _group_offset(group, G, C, S, CPG, CHANNELS_LAST: tl.constexpr):
    """64-bit offset of the first element of group ``group`` = n * G + g."""
    n = group // G
    g = group % G
    if CHANNELS_LAST:
        channel_stride = 1
    else:
        channel_stride = S
    return n.to(tl.int64) * C * S + (g * CPG).to(tl.int64) * channel_stride


@triton.jit
def _tile(c_tile, s_tile, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
          OFFSETS_64: tl.constexpr):
    """Offsets from the group's first element and the mask, both [BLOCK_S, BLOCK_C], and the channel-in-group
    index [BLOCK_C] of tile (c_tile, s_tile)."""
    s_idx = s_tile * BLOCK_S + tl.arange(0, BLOCK_S)
    c_idx = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s_idx < S)[:, None] & (c_idx < CPG)[None, :]
    if OFFSETS_64:
        s_off = s_idx.to(tl.int64)
        c_off = c_idx.to(tl.int64)
    else:
        s_off = s_idx
        c_off = c_idx
    if CHANNELS_LAST:
        offsets = s_off[:, None] * C + c_off[None, :]
    else:
        offsets = s_off[:, None] + c_off[None, :] * S
    return offsets, mask, c_idx


@triton.jit
def _load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
    """(channel-in-group index [BLOCK_C], weight, bias) of channel tile ``c_tile``, as ``_load_affine``."""
    c_idx = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    w, b = _load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT, HAS_BIAS)
    return c_idx, w, b


@triton.jit
def _load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(offsets, mask, x) of tile (c_tile, s_tile) of one group: x fp32 [BLOCK_S, BLOCK_C], its masked lanes
    ``mean`` (see ``_chunk_normalize_silu``)."""
    offsets, mask, _ = _tile(c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
    x = tl.load(x_grp + offsets, mask=mask, other=mean).to(tl.float32)
    return offsets, mask, x


@triton.jit
def _group_count(CPG, S):
    """CPG * S as fp32 (computed in fp32: a group may pass 2^31 elements)."""
    return tl.cast(CPG, tl.float32) * tl.cast(S, tl.float32)


@triton.jit
def _load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """weight and bias of the tile's channels, fp32 [BLOCK_C] (placeholders when absent)."""
    in_group = c_idx < CPG
    if HAS_WEIGHT:
        w = tl.load(w_ptr + channel0 + c_idx, mask=in_group, other=1.0).to(tl.float32)
    else:
        w = tl.full(c_idx.shape, 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + channel0 + c_idx, mask=in_group, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(c_idx.shape, tl.float32)
    return w, b


@triton.jit
def _affine(xhat, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    z = xhat
    if HAS_WEIGHT:
        z = z * w[None, :]
    if HAS_BIAS:
        z = z + b[None, :]
    return z


@triton.jit
def _tile_moments(x, mask, count):
    """(mean, M2) of the ``count`` in-bounds values of a tile; x must hold 0 where masked."""
    mean = tl.sum(x) / count
    deviation = tl.where(mask, x - mean, 0.0)
    return mean, tl.sum(deviation * deviation)


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s combination of two (count, mean, M2) summaries; exact for count_a == 0."""
    count = count_a + count_b
    delta = mean_b - mean_a
    share_b = count_b / count
    return count, mean_a + delta * share_b, m2_a + m2_b + delta * delta * count_a * share_b


@triton.jit
def _chunk_moments(x_grp, c_begin, c_end, s_begin, s_end, C, S, CPG, BLOCK_S: tl.constexpr,
                   BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(count, mean, M2) in fp32 over tiles [c_begin, c_end) x [s_begin, s_end) of one group."""
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c_tile in range(c_begin, c_end):
        tile_cols = tl.minimum(CPG - c_tile * BLOCK_C, BLOCK_C)
        for s_tile in range(s_begin, s_end):
            offsets, mask, _ = _tile(c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
            x = tl.load(x_grp + offsets, mask=mask, other=0.0).to(tl.float32)
            tile_count = (tl.minimum(S - s_tile * BLOCK_S, BLOCK_S) * tile_cols).to(tl.float32)
            tile_mean, tile_m2 = _tile_moments(x, mask, tile_count)
            count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    return count, mean, m2


@triton.jit
def _chunk_normalize_silu(x_grp, y_grp, w_ptr, b_ptr, channel0, mean, rstd, c_begin, c_end, s_begin, s_end,
                          C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                          OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y = silu((x - mean) * rstd * w + b) over tiles [c_begin, c_end) x [s_begin, s_end) of one group.

    (Here and in the backward passes, masked lanes load ``mean``: their xhat is 0, not -mean * rstd, which
    for a large mean would overflow exp() in the sigmoid of lanes that are never stored.)"""
    for c_tile in range(c_begin, c_end):
        _, w, b = _load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        for s_tile in range(s_begin, s_end):
            offsets, mask, x = _load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                                            OFFSETS_64)
            z = _affine((x - mean) * rstd, w, b, HAS_WEIGHT, HAS_BIAS)
            tl.store(y_grp + offsets, (z * tl.sigmoid(z)).to(y_grp.dtype.element_ty), mask=mask)


@triton.jit
def _tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(xhat, dz, dxhat) of a tile, fp32; dz and dxhat are 0 where masked."""
    xhat = (x - mean) * rstd
    z = _affine(xhat, w, b, HAS_WEIGHT, HAS_BIAS)
    sig = tl.sigmoid(z)
    dz = tl.where(mask, dy * sig * (1.0 + z * (1.0 - sig)), 0.0)
    if HAS_WEIGHT:
        dxhat = dz * w[None, :]
    else:
        dxhat = dz
    return xhat, dz, dxhat


@triton.jit
def _chunk_grad_sums(x_grp, dy_grp, w_ptr, b_ptr, dw_row, db_row, channel0, mean, rstd, c_begin, c_end, s_begin,
                     s_end, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """sum(dxhat) and sum(dxhat * xhat) over tiles [c_begin, c_end) x [s_begin, s_end) of one group; stores
    the per-channel sums of dz * xhat (dweight) and dz (dbias) over those tiles at ``dw_row`` / ``db_row``
    (rows of the partial buffer, indexed by channel)."""
    sum_dxhat = 0.0
    sum_dxhat_xhat = 0.0
    for c_tile in range(c_begin, c_end):
        c_idx, w, b = _load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        dw_acc = tl.zeros([BLOCK_C], tl.float32)
        db_acc = tl.zeros([BLOCK_C], tl.float32)
        for s_tile in range(s_begin, s_end):
            offsets, mask, x = _load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                                            OFFSETS_64)
            dy = tl.load(dy_grp + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat, dz, dxhat = _tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
            sum_dxhat += tl.sum(dxhat)
            sum_dxhat_xhat += tl.sum(dxhat * xhat)
            if HAS_WEIGHT:
                dw_acc += tl.sum(dz * xhat, axis=0)
            if HAS_BIAS:
                db_acc += tl.sum(dz, axis=0)
        if HAS_WEIGHT:
            tl.store(dw_row + channel0 + c_idx, dw_acc, mask=c_idx < CPG)
        if HAS_BIAS:
            tl.store(db_row + channel0 + c_idx, db_acc, mask=c_idx < CPG)
    return sum_dxhat, sum_dxhat_xhat


@triton.jit
def _chunk_dx(x_grp, dy_grp, dx_grp, w_ptr, b_ptr, channel0, mean, rstd, mean_dxhat, mean_dxhat_xhat, c_begin,
              c_end, s_begin, s_end, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
              CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over tiles of one group."""
    for c_tile in range(c_begin, c_end):
        _, w, b = _load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        for s_tile in range(s_begin, s_end):
            offsets, mask, x = _load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                                            OFFSETS_64)
            dy = tl.load(dy_grp + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat, dz, dxhat = _tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
            dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(dx_grp + offsets, dx.to(dx_grp.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk, s_tiles_per_chunk):
    """Tile ranges (c_begin, c_end, s_begin, s_end) of chunk ``chunk`` = c_chunk * s_chunks + s_chunk."""
    c_begin = (chunk // s_chunks) * c_tiles_per_chunk
    s_begin = (chunk % s_chunks) * s_tiles_per_chunk
    c_end = tl.minimum(c_begin + c_tiles_per_chunk, c_tiles)
    s_end = tl.minimum(s_begin + s_tiles_per_chunk, s_tiles)
    return c_begin, c_end, s_begin, s_end


# ----------------------------------------------------------------------------------------------------------
# Forward kernels.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_group_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, S, CPG: tl.constexpr, G, c_tiles, s_tiles,
                      eps, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SINGLE_TILE: tl.constexpr):
    """Regimes single and looped. Grid (N*G,): one program per group.

    x, y: (N, C, S) in x's layout; w, b: [C]; mean, rstd: fp32 [N*G]."""
    group = tl.program_id(0)
    base = _group_offset(group, G, C, S, CPG, CHANNELS_LAST)
    x_grp = x_ptr + base
    y_grp = y_ptr + base
    channel0 = (group % G) * CPG
    if SINGLE_TILE:
        # The group stays in registers between the statistics and the output: x is read once.
        offsets, mask, c_idx = _tile(0, 0, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
        x = tl.load(x_grp + offsets, mask=mask, other=0.0).to(tl.float32)
        count = _group_count(CPG, S)
        mean, m2 = _tile_moments(x, mask, count)
        rstd = tl.rsqrt(m2 / count + eps)
        w, b = _load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT, HAS_BIAS)
        x = tl.where(mask, x, mean)  # padded lanes: xhat = 0 rather than a huge -mean * rstd
        z = _affine((x - mean) * rstd, w, b, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_grp + offsets, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        count, mean, m2 = _chunk_moments(x_grp, 0, c_tiles, 0, s_tiles, C, S, CPG, BLOCK_S, BLOCK_C,
                                         CHANNELS_LAST, OFFSETS_64)
        rstd = tl.rsqrt(m2 / count + eps)
        _chunk_normalize_silu(x_grp, y_grp, w_ptr, b_ptr, channel0, mean, rstd, 0, c_tiles, 0, s_tiles, C, S,
                              CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT, HAS_BIAS)
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, rstd)


@triton.jit
def _fwd_chunk_moments_kernel(x_ptr, part_ptr, C, S, CPG: tl.constexpr, G, c_tiles, s_tiles, s_chunks,
                              c_tiles_per_chunk, s_tiles_per_chunk, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                              CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr):
    """Split regime, kernel A. Grid (N*G, K). Writes (count, mean, M2) of chunk k of group ng to
    part[0|1|2, ng, k] (fp32 [3, N*G, K])."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    x_grp = x_ptr + _group_offset(group, G, C, S, CPG, CHANNELS_LAST)
    c_begin, c_end, s_begin, s_end = _chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                   s_tiles_per_chunk)
    count, mean, m2 = _chunk_moments(x_grp, c_begin, c_end, s_begin, s_end, C, S, CPG, BLOCK_S, BLOCK_C,
                                     CHANNELS_LAST, OFFSETS_64)
    plane = tl.num_programs(0) * chunks
    slot = group * chunks + chunk
    tl.store(part_ptr + slot, count)
    tl.store(part_ptr + plane + slot, mean)
    tl.store(part_ptr + 2 * plane + slot, m2)


@triton.jit
def _fwd_chunk_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, mean_ptr, rstd_ptr, C, S, CPG: tl.constexpr, G,
                            c_tiles, s_tiles, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk, eps,
                            BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                            CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            HAS_BIAS: tl.constexpr):
    """Split regime, kernel B. Grid (N*G, K). Merges the group's K chunk summaries (every program of the group
    merges the same values in the same order, so all agree bitwise), chunk 0 stores mean/rstd, and each
    program writes y over its own chunk."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    plane = tl.num_programs(0) * chunks
    k = tl.arange(0, BLOCK_K)
    valid = k < chunks
    slots = group * chunks + k
    counts = tl.load(part_ptr + slots, mask=valid, other=0.0)
    means = tl.load(part_ptr + plane + slots, mask=valid, other=0.0)
    m2s = tl.load(part_ptr + 2 * plane + slots, mask=valid, other=0.0)
    # Chan's formula for K summaries at once: M2 = sum M2_k + sum n_k (mean_k - mean)^2.
    count = tl.sum(counts)
    mean = tl.sum(counts * means) / count
    spread = tl.where(valid, means - mean, 0.0)
    m2 = tl.sum(m2s) + tl.sum(counts * spread * spread)
    rstd = tl.rsqrt(m2 / count + eps)
    tl.store(mean_ptr + group, mean, mask=chunk == 0)
    tl.store(rstd_ptr + group, rstd, mask=chunk == 0)

    base = _group_offset(group, G, C, S, CPG, CHANNELS_LAST)
    c_begin, c_end, s_begin, s_end = _chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                   s_tiles_per_chunk)
    _chunk_normalize_silu(x_ptr + base, y_ptr + base, w_ptr, b_ptr, (group % G) * CPG, mean, rstd, c_begin, c_end,
                          s_begin, s_end, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT,
                          HAS_BIAS)


# ----------------------------------------------------------------------------------------------------------
# Backward kernels.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_group_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, C, S, CPG: tl.constexpr, G,
                      c_tiles, s_tiles, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SINGLE_TILE: tl.constexpr):
    """Regimes single and looped. Grid (N*G,): one program per group.

    dy, x, dx: (N, C, S) in x's layout; mean, rstd: fp32 [N*G]; part: fp32 [P, N, C] per-sample partial
    sums over pixels of dz * xhat (plane 0, with weight) and dz (next plane, with bias)."""
    group = tl.program_id(0)
    n = group // G
    channel0 = (group % G) * CPG
    base = _group_offset(group, G, C, S, CPG, CHANNELS_LAST)
    x_grp = x_ptr + base
    dy_grp = dy_ptr + base
    dx_grp = dx_ptr + base
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    rows = tl.num_programs(0) // G
    dw_row = part_ptr + n.to(tl.int64) * C
    if HAS_WEIGHT:
        db_row = dw_row + rows.to(tl.int64) * C
    else:
        db_row = dw_row
    inv_count = 1.0 / _group_count(CPG, S)
    if SINGLE_TILE:
        # x and dy stay in registers between the group sums and dx: each is read once.
        offsets, mask, c_idx = _tile(0, 0, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
        w, b = _load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT, HAS_BIAS)
        x = tl.load(x_grp + offsets, mask=mask, other=mean).to(tl.float32)
        dy = tl.load(dy_grp + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat, dz, dxhat = _tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
        if HAS_WEIGHT:
            tl.store(dw_row + channel0 + c_idx, tl.sum(dz * xhat, axis=0), mask=c_idx < CPG)
        if HAS_BIAS:
            tl.store(db_row + channel0 + c_idx, tl.sum(dz, axis=0), mask=c_idx < CPG)
        mean_dxhat = tl.sum(dxhat) * inv_count
        mean_dxhat_xhat = tl.sum(dxhat * xhat) * inv_count
        dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(dx_grp + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        sum_dxhat, sum_dxhat_xhat = _chunk_grad_sums(x_grp, dy_grp, w_ptr, b_ptr, dw_row, db_row, channel0, mean,
                                                     rstd, 0, c_tiles, 0, s_tiles, C, S, CPG, BLOCK_S, BLOCK_C,
                                                     CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT, HAS_BIAS)
        _chunk_dx(x_grp, dy_grp, dx_grp, w_ptr, b_ptr, channel0, mean, rstd, sum_dxhat * inv_count,
                  sum_dxhat_xhat * inv_count, 0, c_tiles, 0, s_tiles, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                  OFFSETS_64, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _bwd_chunk_sums_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sums_ptr, part_ptr, C, S,
                           CPG: tl.constexpr, G, c_tiles, s_tiles, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Split regime, kernel A. Grid (N*G, K). Writes sum(dxhat), sum(dxhat * xhat) of chunk k of group ng to
    sums[0|1, ng, k] (fp32 [2, N*G, K]) and its per-channel dweight/dbias partials to row
    n * s_chunks + s_chunk of part (fp32 [P, N * s_chunks, C])."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    n = group // G
    channel0 = (group % G) * CPG
    base = _group_offset(group, G, C, S, CPG, CHANNELS_LAST)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    c_begin, c_end, s_begin, s_end = _chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                   s_tiles_per_chunk)
    rows = (tl.num_programs(0) // G) * s_chunks
    dw_row = part_ptr + (n * s_chunks + chunk % s_chunks).to(tl.int64) * C
    if HAS_WEIGHT:
        db_row = dw_row + rows.to(tl.int64) * C
    else:
        db_row = dw_row
    sum_dxhat, sum_dxhat_xhat = _chunk_grad_sums(x_ptr + base, dy_ptr + base, w_ptr, b_ptr, dw_row, db_row,
                                                 channel0, mean, rstd, c_begin, c_end, s_begin, s_end, C, S, CPG,
                                                 BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT, HAS_BIAS)
    plane = tl.num_programs(0) * chunks
    slot = group * chunks + chunk
    tl.store(sums_ptr + slot, sum_dxhat)
    tl.store(sums_ptr + plane + slot, sum_dxhat_xhat)


@triton.jit
def _bwd_chunk_dx_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sums_ptr, dx_ptr, C, S, CPG: tl.constexpr, G,
                         c_tiles, s_tiles, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk, BLOCK_K: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                         OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Split regime, kernel B. Grid (N*G, K). Adds up the group's K chunk sums in a fixed order and writes dx
    over its own chunk."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    plane = tl.num_programs(0) * chunks
    k = tl.arange(0, BLOCK_K)
    slots = group * chunks + k
    inv_count = 1.0 / _group_count(CPG, S)
    mean_dxhat = tl.sum(tl.load(sums_ptr + slots, mask=k < chunks, other=0.0)) * inv_count
    mean_dxhat_xhat = tl.sum(tl.load(sums_ptr + plane + slots, mask=k < chunks, other=0.0)) * inv_count
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    base = _group_offset(group, G, C, S, CPG, CHANNELS_LAST)
    c_begin, c_end, s_begin, s_end = _chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                   s_tiles_per_chunk)
    _chunk_dx(x_ptr + base, dy_ptr + base, dx_ptr + base, w_ptr, b_ptr, (group % G) * CPG, mean, rstd, mean_dxhat,
              mean_dxhat_xhat, c_begin, c_end, s_begin, s_end, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
              OFFSETS_64, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _sum_partial_rows_kernel(part_ptr, dw_ptr, db_ptr, R, C, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dweight / dbias [C] = column sums of the partial planes (fp32 [P, R, C]). Grid (cdiv(C, BLOCK_C), P).
    Rows are added in a fixed order, so the result does not depend on scheduling."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    plane = tl.program_id(1)
    plane_ptr = part_ptr + plane.to(tl.int64) * R * C
    acc = tl.zeros([BLOCK_C], tl.float32)
    for row0 in range(0, R, BLOCK_R):
        rows = row0 + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        acc += tl.sum(tl.load(plane_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0),
                      axis=0)
    if HAS_WEIGHT and HAS_BIAS:
        if plane == 0:
            tl.store(dw_ptr + cols, acc, mask=cols < C)
        else:
            tl.store(db_ptr + cols, acc, mask=cols < C)
    elif HAS_WEIGHT:
        tl.store(dw_ptr + cols, acc, mask=cols < C)
    else:
        tl.store(db_ptr + cols, acc, mask=cols < C)


# ----------------------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------------------


def _in_kernel_layout(t: torch.Tensor, like: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, bool]:
    """``t`` and whether it is channels-last. The op always passes NCHW or channels-last views (then this
    returns ``t`` itself); anything else, or a tensor whose layout differs from ``like``'s, is copied into
    ``like``'s layout (or NCHW) so that the semantics match the reference for any strides."""
    channels_last = _layout_of(t)
    if like is not None:
        target = _layout_of(like)
        if channels_last != target or (t.shape != like.shape):
            return torch.empty_like(like).copy_(t), bool(target)
        return t, bool(channels_last)
    if channels_last is None:
        return t.contiguous(), False
    return t, channels_last


@float64_runs_reference(group_norm_silu_forward_reference, dtype_from=0)
def group_norm_silu_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            num_groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, mean, rstd)``: y = silu(group_norm(x)) with x's shape, dtype and strides; mean and rstd
    are fp32 ``[N, G]`` (float64 for float64 x).

    x: (N, C, S) fp16/bf16/fp32, NCHW or channels-last; weight, bias: [C] any float dtype, or None.
    """
    x, channels_last = _in_kernel_layout(x)
    n, c, s = x.shape
    plan = _plan_for(x, num_groups, channels_last, _FORWARD_TUNING)
    _last_plan["forward"] = plan
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    groups = n * num_groups
    cpg = c // num_groups
    w, b = _param(weight, x), _param(bias, x)
    layout = dict(BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, CHANNELS_LAST=plan.channels_last,
                  OFFSETS_64=plan.offsets_64, num_warps=plan.num_warps, **_LAUNCH_OPTIONS)
    affine = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    with _device_guard(x):
        if plan.regime == "split":
            chunk_args = (plan.c_tiles, plan.s_tiles, plan.s_chunks, plan.c_tiles_per_chunk, plan.s_tiles_per_chunk)
            partials = torch.empty((3, groups, plan.chunks), device=x.device, dtype=torch.float32)
            grid = (groups, plan.chunks)
            _fwd_chunk_moments_kernel[grid](x, partials, c, s, cpg, num_groups, *chunk_args, **layout)
            _fwd_chunk_apply_kernel[grid](x, y, w, b, partials, mean, rstd, c, s, cpg, num_groups, *chunk_args, eps,
                                          BLOCK_K=_next_pow2(plan.chunks), **layout, **affine)
        else:
            _fwd_group_kernel[(groups,)](x, y, w, b, mean, rstd, c, s, cpg, num_groups, plan.c_tiles, plan.s_tiles,
                                         eps, SINGLE_TILE=plan.regime == "single", **layout, **affine)
    return y, mean, rstd


@float64_runs_reference(group_norm_silu_backward_reference, dtype_from=1)
def group_norm_silu_backward(
        grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
        mean: torch.Tensor, rstd: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns ``(dx, dweight, dbias)``: dx with x's shape, dtype and strides; dweight / dbias fp32 ``[C]``
    when weight / bias are given, else None.

    grad_out, x: (N, C, S) in the same layout (grad_out in any float dtype); mean, rstd: fp32 ``[N, G]`` from
    the forward.
    """
    x, channels_last = _in_kernel_layout(x)
    grad_out, _ = _in_kernel_layout(grad_out, like=x)
    n, c, s = x.shape
    plan = _plan_for(x, num_groups, channels_last, _BACKWARD_TUNING)
    _last_plan["backward"] = plan
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    dx = torch.empty_like(x)
    groups = n * num_groups
    cpg = c // num_groups
    has_weight, has_bias = weight is not None, bias is not None
    planes = int(has_weight) + int(has_bias)
    rows = n * plan.s_chunks
    # Per-(sample, spatial chunk) partial sums of dweight / dbias; every entry is written by exactly one
    # program, so the buffer needs no zero fill. Without affine parameters nothing is written there.
    partials = torch.empty((planes, rows, c), device=x.device, dtype=torch.float32) if planes else x
    w, b = _param(weight, x), _param(bias, x)
    layout = dict(BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, CHANNELS_LAST=plan.channels_last,
                  OFFSETS_64=plan.offsets_64, num_warps=plan.num_warps, **_LAUNCH_OPTIONS)
    affine = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias)
    with _device_guard(x):
        if plan.regime == "split":
            chunk_args = (plan.c_tiles, plan.s_tiles, plan.s_chunks, plan.c_tiles_per_chunk, plan.s_tiles_per_chunk)
            sums = torch.empty((2, groups, plan.chunks), device=x.device, dtype=torch.float32)
            grid = (groups, plan.chunks)
            _bwd_chunk_sums_kernel[grid](grad_out, x, w, b, mean, rstd, sums, partials, c, s, cpg, num_groups,
                                         *chunk_args, **layout, **affine)
            _bwd_chunk_dx_kernel[grid](grad_out, x, w, b, mean, rstd, sums, dx, c, s, cpg, num_groups, *chunk_args,
                                       BLOCK_K=_next_pow2(plan.chunks), **layout, **affine)
        else:
            _bwd_group_kernel[(groups,)](grad_out, x, w, b, mean, rstd, dx, partials, c, s, cpg, num_groups,
                                         plan.c_tiles, plan.s_tiles, SINGLE_TILE=plan.regime == "single", **layout,
                                         **affine)
        dweight = torch.empty(c, device=x.device, dtype=torch.float32) if has_weight else None
        dbias = torch.empty(c, device=x.device, dtype=torch.float32) if has_bias else None
        if planes:
            block_c = min(_next_pow2(c), 256)
            _sum_partial_rows_kernel[(triton.cdiv(c, block_c), planes)](
                partials, dweight if has_weight else dbias, dbias if has_bias else dweight, rows, c,
                HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_R=min(_next_pow2(rows), 16), BLOCK_C=block_c,
                **_LAUNCH_OPTIONS)
    return dx, dweight, dbias
