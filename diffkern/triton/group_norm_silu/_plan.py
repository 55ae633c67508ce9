"""The GroupNorm + SiLU planner: how one forward or backward call runs (regime, tile shape, chunking, 64-bit
offsets, warps), decided from the problem's shape and layout and the device's SM count alone, so there is no
host sync. ``make_plan`` is a plain function of those values; the entry points take its ``Plan`` as an argument
(``plan_for`` when none is given), so a test or a tuning run passes the plan it wants.

Regimes
    single  The group, padded to a power-of-two tile, fits in registers (forward: at most 16K elements;
            backward: 8K, since x and dy are both held). One program per (n, g) reads its group once.
            Forward: 2 passes over memory (read x, write y). Backward: 3 (read x and dy, write dx).
    split   The group is too big for one tile and N*G programs make fewer than two waves (Stable Diffusion's
            UNet up to batch 16, the VAE decoder: 32-512 groups against 132 SMs of 4-8 programs each), which
            would leave SMs short of loads in flight. Each group is cut into K rectangular chunks of
            whole tiles. Kernel A writes per-chunk partials to a small fp32 buffer; kernel B merges its
            group's K partials in a fixed order and finishes its own chunk, reading it again (from L2 when
            the tensor fits there, as at those batch sizes). Forward: x read twice, y written once.
            Backward: x and dy read twice, dx written once. In channels-last with C/G not a multiple of 8,
            a tile spans several whole groups (``_pack``). Chunks that loop over several tiles give each
            lane two 16-byte vectors per tensor (``LOOPING_CHUNK_TILES``), so that SMs whose registers hold
            few programs still have loads in flight.
    looped  Big groups, and enough of them to fill the GPU: one program per (n, g) loops over its group
            twice (statistics, then output). Same passes as split, but the second read of a group follows
            its first closely, so it mostly hits L2 even when the whole tensor does not fit there.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch


class Tuning(NamedTuple):
    """Size thresholds of one direction (not tuned on hardware yet)."""

    single_read_elems: int  # largest padded group tile kept in registers by one program
    loop_tile_elems: int  # tile size when looping over a group
    min_chunk_elems: int  # never split a group into chunks smaller than this
    waves: int  # how many full waves of programs (every SM at its thread limit) the split regime aims for


FORWARD = Tuning(single_read_elems=16384, loop_tile_elems=4096, min_chunk_elems=4096, waves=2)
# The backward holds two tensors (x and dy) per tile, so its tiles are half the size.
BACKWARD = Tuning(single_read_elems=8192, loop_tile_elems=2048, min_chunk_elems=2048, waves=2)

# Threads an SM holds at once (sm_80 to sm_120 alike): with the program size, what one wave is.
THREADS_PER_SM = 2048

# The interpreter has no SMs; this stand-in only decides which regime CPU runs take.
INTERPRETER_SM_COUNT = 4

REGIMES = ("single", "looped", "split")


class Plan(NamedTuple):
    """How one call on an ``(N, C, S)`` input of ``num_groups`` groups runs. Tiles are ``[block_s, block_c]``; a
    group has ``c_tiles x s_tiles`` of them, cut into ``c_chunks x s_chunks`` chunks of
    ``c_tiles_per_chunk x s_tiles_per_chunk`` tiles (1 x 1 chunk unless split). ``group_pack`` > 1 (split,
    channels-last): a tile's channel axis holds that many whole, adjacent groups (``block_c`` >= group_pack * C/G,
    ``c_tiles`` 1) and one program serves them all (see ``_pack``)."""

    shape: Tuple[int, int, int]
    num_groups: int
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
    group_pack: int = 1

    @property
    def chunks(self) -> int:
        return self.c_chunks * self.s_chunks


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of positive ints (not ``triton.cdiv``: a constexpr function, microseconds per host call)."""
    return -(-a // b)


def next_pow2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _num_warps(tile_elems: int, values_per_thread: int = 8) -> int:
    # About 8-32 fp32 values per thread: 16-byte vector accesses for half types, bounded register use.
    return max(4, min(16, tile_elems // (32 * values_per_thread)))


# Packed tiles and chunks are sized in bytes of x (the tuning's elements are halves': 8 KB forward, 4 KB backward),
# and each lane holds two 16-byte vectors per tensor (16 halves or 8 floats): a packed lane also holds its
# channel's statistics and parameters (scalars in a one-group tile), which the second vector shares.
PACKED_LANE_BYTES = 32


def _loop_tile(channels_per_group: int, spatial: int, channels_last: bool, tile_elems: int) -> Tuple[int, int]:
    """(block_s, block_c) of a loop tile: the contiguous axis gets the room first."""
    if channels_last:
        block_c = min(next_pow2(channels_per_group), tile_elems)
        block_s = min(next_pow2(spatial), max(1, tile_elems // block_c))
    else:
        block_s = min(next_pow2(spatial), tile_elems)
        block_c = min(next_pow2(channels_per_group), max(1, tile_elems // block_s))
    return block_s, block_c


# From how many tiles per chunk a split plan's chunks count as looping (see make_plan).
LOOPING_CHUNK_TILES = 4

# The widest packed tile's channel axis (a pack of groups must leave room for a few pixel rows per tile).
MAX_PACK_CHANNELS = 512


def _pack(channels_per_group: int, num_groups: int) -> int:
    """How many adjacent groups a channels-last split tile holds: the fewest whose channels are a multiple of 8
    (16 bytes of halves, 32 of floats), so that every pixel's run of them is 16-byte aligned and each lane can read
    16 contiguous bytes (one group of C/G = 10 halves is a 20-byte run: 4-byte accesses). A power of two
    (8 / gcd(C/G, 8)); 1 when C/G is a multiple of 8 already, when it does not divide G (then C is not a multiple
    of 8 either and no pixel row is 16-byte aligned), or when the pack would be wider than MAX_PACK_CHANNELS."""
    pack = 8 // math.gcd(channels_per_group, 8)
    if num_groups % pack or next_pow2(pack * channels_per_group) > MAX_PACK_CHANNELS:
        return 1
    return pack


def _split_counts(want: int, c_tiles: int, s_tiles: int, channels_last: bool) -> Tuple[int, int, int, int]:
    """(c_chunks, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk) for about ``want`` chunks, none empty.

    The outer axis in memory is cut first (channels in NCHW, pixels in channels-last), so a chunk stays
    one contiguous range of memory where it can."""
    if channels_last:
        s_chunks = min(want, s_tiles)
        c_chunks = min(cdiv(want, s_chunks), c_tiles)
    else:
        c_chunks = min(want, c_tiles)
        s_chunks = min(cdiv(want, c_chunks), s_tiles)
    # Tiles per chunk rounded down, so that there are at least as many chunks as asked for where the tiles allow
    # (rounding up turned 9 chunks of 10 tiles into 5 of 2).
    c_per, s_per = max(1, c_tiles // c_chunks), max(1, s_tiles // s_chunks)
    return cdiv(c_tiles, c_per), cdiv(s_tiles, s_per), c_per, s_per


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments, on every call's path
def make_plan(shape: Tuple[int, int, int], num_groups: int, channels_last: bool, sm_count: int, tuning: Tuning, *,
              regime: Optional[str] = None, chunks: Optional[int] = None, loop_tile_elems: Optional[int] = None,
              offsets_64: Optional[bool] = None, itemsize: int = 2, tile_halvings: int = 0) -> Plan:
    """The plan for an ``(N, C, S)`` input. The keywords, where given, replace the heuristic's decisions (so
    that small test shapes reach every code path):

    - single if the whole group, padded to powers of two per axis, fits ``single_read_elems``;
    - else split, when the N*G groups are fewer programs than ``waves`` full waves (every SM holding
      ``THREADS_PER_SM`` threads of programs), into enough chunks per group for those waves (each at least
      ``min_chunk_elems``), so that every SM has its fill of loads in flight;
    - else looped.

    ``itemsize`` (x's element size) sizes packed tiles (see ``PACKED_LANE_BYTES``). ``tile_halvings`` is the
    heuristic's own: split chunks of one tile each that still make fewer than ``waves`` waves, in lanes of more than
    16 bytes, are planned again with tiles (and the smallest chunk) halved and the same warps, so one-vector lanes.
    """
    if regime is not None and regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    batch, channels, spatial = shape
    cpg = channels // num_groups
    groups = batch * num_groups
    whole_s, whole_c = next_pow2(spatial), next_pow2(cpg)
    if regime is None:
        regime = "single" if whole_s * whole_c <= tuning.single_read_elems else "auto"
    tile_elems = (loop_tile_elems or tuning.loop_tile_elems) >> tile_halvings
    pack = 1
    if regime == "single":
        block_s, block_c = whole_s, whole_c
    else:
        if channels_last and regime in ("auto", "split"):
            pack = _pack(cpg, num_groups)
        if pack > 1:
            # A packed tile: its channel axis spans ``pack`` whole groups.
            tile_elems = max(1, tile_elems * 2 // itemsize)
            block_c = next_pow2(pack * cpg)
            block_s = min(next_pow2(spatial), max(1, tile_elems // block_c))
        else:
            block_s, block_c = _loop_tile(cpg, spatial, channels_last, tile_elems)
    c_tiles, s_tiles = cdiv(cpg, block_c), cdiv(spatial, block_s)
    num_warps = _num_warps((block_s * block_c) << tile_halvings, PACKED_LANE_BYTES // itemsize if pack > 1 else 8)
    c_chunks = s_chunks = 1
    c_per, s_per = c_tiles, s_tiles
    if regime in ("auto", "split"):
        programs = groups // pack

        def wave_target(warps):
            return tuning.waves * sm_count * max(1, THREADS_PER_SM // (32 * warps))

        def split_counts(warps):
            if chunks is not None:
                return _split_counts(chunks, c_tiles, s_tiles, channels_last)
            target = wave_target(warps)
            want = cdiv(target, programs) if programs < target else 1
            min_chunk = tuning.min_chunk_elems * 2 // itemsize if pack > 1 else tuning.min_chunk_elems
            min_chunk = max(1, min_chunk >> tile_halvings)
            want = min(want, max(1, pack * cpg * spatial // min_chunk))
            return _split_counts(want, c_tiles, s_tiles, channels_last)

        c_chunks, s_chunks, c_per, s_per = split_counts(num_warps)
        if chunks is None and pack == 1 and c_chunks * s_chunks > 1 and c_per * s_per >= LOOPING_CHUNK_TILES:
            # Chunks that loop over several tiles: lanes of PACKED_LANE_BYTES (two 16-byte vectors of halves; floats
            # have them already) in programs of half the warps, and twice the chunks for the same waves. One vector
            # per lane left SMs whose registers hold two such programs short of loads in flight.
            wide = _num_warps(block_s * block_c, PACKED_LANE_BYTES // itemsize)
            if wide < num_warps:
                num_warps = wide
                c_chunks, s_chunks, c_per, s_per = split_counts(num_warps)
        lane_bytes = block_s * block_c * itemsize // (32 * num_warps)
        if (chunks is None and tile_halvings == 0 and c_per * s_per == 1 and lane_bytes > 16
                and programs * c_chunks * s_chunks < wave_target(num_warps)):
            halved = make_plan(shape, num_groups, channels_last, sm_count, tuning,
                               regime=None if regime == "auto" else regime, loop_tile_elems=loop_tile_elems,
                               offsets_64=offsets_64, itemsize=itemsize, tile_halvings=1)
            if halved.regime == "split" and halved.chunks > c_chunks * s_chunks:
                return halved
        # A forced split stays split even with one chunk (a one-tile group): the caller means it.
        if regime == "auto":
            regime = "split" if c_chunks * s_chunks > 1 else "looped"
            if regime == "looped" and pack > 1:  # the looped kernels take one group per program
                return make_plan(shape, num_groups, channels_last, sm_count, tuning, regime="looped",
                                 loop_tile_elems=loop_tile_elems, offsets_64=offsets_64, itemsize=itemsize)
    if offsets_64 is None:
        offsets_64 = channels * spatial >= 2**31
    return Plan(shape=(batch, channels, spatial), num_groups=num_groups, regime=regime, channels_last=channels_last,
                block_s=block_s, block_c=block_c, c_tiles=c_tiles, s_tiles=s_tiles, c_chunks=c_chunks,
                s_chunks=s_chunks, c_tiles_per_chunk=c_per, s_tiles_per_chunk=s_per, offsets_64=offsets_64,
                num_warps=num_warps, group_pack=pack)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """The SM count the heuristic plans for: the GPU's, or the interpreter's stand-in for a CPU tensor."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SM_COUNT


def has_layout(t: torch.Tensor, channels_last: bool) -> bool:
    """Whether element (n, c, s) of the 3-D ``t`` lives at ``n*C*S + c*stride_c + s*stride_s`` for the layout
    (strides of size-1 dimensions do not matter)."""
    if not channels_last and t.is_contiguous():  # the common case, without the stride loop
        return True
    n, c, s = t.shape
    expected = (c * s, 1, c) if channels_last else (c * s, s, 1)
    return all(size == 1 or stride == want for size, stride, want in zip(t.shape, t.stride(), expected))


def layout_of(x: torch.Tensor) -> Optional[bool]:
    """True for channels-last, False for NCHW, None for neither. With C == 1 or S == 1 both layouts are the
    same memory; NCHW addressing is used."""
    if has_layout(x, channels_last=False):
        return False
    if has_layout(x, channels_last=True):
        return True
    return None


def plan_for(x: torch.Tensor, num_groups: int, tuning: Tuning, *, sm_count: Optional[int] = None,
             **forced) -> Plan:
    """``make_plan`` for the 3-D ``x`` (NCHW or channels-last; any other layout runs as an NCHW copy, and is
    planned as one) on its device's SM count, or ``sm_count``. ``forced``: ``make_plan``'s keywords."""
    if sm_count is None:
        sm_count = device_sm_count(x.device)
    n, c, s = x.shape
    return make_plan((n, c, s), num_groups, bool(layout_of(x)), sm_count, tuning, itemsize=x.element_size(),
                     **forced)
