"""The device functions of the GroupNorm + SiLU kernels (``_forward``, ``_backward``): tile addressing and
masks, the affine parameters, tile moments, and the loops over a chunk's tiles that compute
statistics, the output, the gradient sums and dx."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def group_offset(group, G, C, S, CPG, CHANNELS_LAST: tl.constexpr):
    """64-bit offset of the first element of group ``group`` = n * G + g."""
    n = group // G
    g = group % G
    if CHANNELS_LAST:
        channel_stride = 1
    else:
        channel_stride = S
    return n.to(tl.int64) * C * S + (g * CPG).to(tl.int64) * channel_stride


@triton.jit
def tile(c_tile, s_tile, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
         OFFSETS_64: tl.constexpr):
    """Offsets from the group's first element and the mask, both [BLOCK_S, BLOCK_C], and the channel-in-group
    index [BLOCK_C] of tile (c_tile, s_tile)."""
    c_idx = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    if OFFSETS_64:
        # Widened before the multiply: the last tile's s_tile * BLOCK_S + BLOCK_S may pass 2^31 when S nears it.
        s_idx = tl.cast(s_tile, tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_off = s_idx
        c_off = c_idx.to(tl.int64)
    else:
        s_idx = s_tile * BLOCK_S + tl.arange(0, BLOCK_S)
        s_off = s_idx
        c_off = c_idx
    mask = (s_idx < S)[:, None] & (c_idx < CPG)[None, :]
    if CHANNELS_LAST:
        offsets = s_off[:, None] * C + c_off[None, :]
    else:
        offsets = s_off[:, None] + c_off[None, :] * S
    return offsets, mask, c_idx


@triton.jit
def load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    """(channel-in-group index [BLOCK_C], weight, bias) of channel tile ``c_tile``, as ``load_affine``."""
    c_idx = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    w, b = load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT, HAS_BIAS)
    return c_idx, w, b


@triton.jit
def load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(offsets, mask, x) of tile (c_tile, s_tile) of one group: x fp32 [BLOCK_S, BLOCK_C], its masked lanes
    ``mean`` (see ``chunk_normalize_silu``)."""
    offsets, mask, _ = tile(c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
    x = tl.load(x_grp + offsets, mask=mask, other=mean).to(tl.float32)
    return offsets, mask, x


@triton.jit
def group_count(CPG, S):
    """CPG * S as fp32 (computed in fp32: a group may pass 2^31 elements)."""
    return tl.cast(CPG, tl.float32) * tl.cast(S, tl.float32)


@triton.jit
def load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
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
def affine(xhat, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    z = xhat
    if HAS_WEIGHT:
        z = z * w[None, :]
    if HAS_BIAS:
        z = z + b[None, :]
    return z


@triton.jit
def tile_moments(x, mask, count):
    """(mean, M2) of the ``count`` in-bounds values of a tile; x must hold 0 where masked."""
    mean = tl.sum(x) / count
    deviation = tl.where(mask, x - mean, 0.0)
    return mean, tl.sum(deviation * deviation)


@triton.jit
def chunk_count(c_begin, c_end, s_begin, s_end, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The number of in-bounds elements of tiles [c_begin, c_end) x [s_begin, s_end), as fp32 (a chunk may pass
    2^31 elements)."""
    cols = tl.minimum(CPG, c_end * BLOCK_C) - c_begin * BLOCK_C
    rows = tl.minimum(S, s_end * BLOCK_S) - s_begin * BLOCK_S
    return tl.cast(cols, tl.float32) * tl.cast(rows, tl.float32)


@triton.jit
def chunk_moments(x_grp, c_begin, c_end, s_begin, s_end, C, S, CPG, BLOCK_S: tl.constexpr,
                  BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(count, mean, M2) in fp32 over tiles [c_begin, c_end) x [s_begin, s_end) of one group.

    Shifted sums: every lane accumulates d = x - K and d^2 in registers over the tiles, and the lanes are reduced
    once at the end (no cross-thread reduction, no barrier, inside the loop). K is the mean of the chunk's first
    tile, so |mean - K| is a fraction of the spread and M2 = sum d^2 - (sum d)^2 / count does not cancel even when
    |mean| >> std. Masked lanes count d = 0."""
    offsets, mask, _ = tile(c_begin, s_begin, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
    first = tl.load(x_grp + offsets, mask=mask, other=0.0).to(tl.float32)
    shift = tl.sum(first) / chunk_count(c_begin, c_begin + 1, s_begin, s_begin + 1, S, CPG, BLOCK_S, BLOCK_C)
    sum_d = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    sum_d2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for c_tile in range(c_begin, c_end):
        for s_tile in range(s_begin, s_end):
            offsets, mask, _ = tile(c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
            x = tl.load(x_grp + offsets, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - shift, 0.0)
            sum_d += d
            sum_d2 += d * d
    count = chunk_count(c_begin, c_end, s_begin, s_end, S, CPG, BLOCK_S, BLOCK_C)
    total_d = tl.sum(sum_d)
    m2 = tl.maximum(tl.sum(sum_d2) - total_d * (total_d / count), 0.0)
    return count, shift + total_d / count, m2


@triton.jit
def chunk_normalize_silu(x_grp, y_grp, w_ptr, b_ptr, channel0, mean, rstd, c_begin, c_end, s_begin, s_end,
                         C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                         OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y = silu((x - mean) * rstd * w + b) over tiles [c_begin, c_end) x [s_begin, s_end) of one group.

    (Here and in the backward passes, masked lanes load ``mean``: their xhat is 0, not -mean * rstd, which
    for a large mean would overflow exp() in the sigmoid of lanes that are never stored.)"""
    for c_tile in range(c_begin, c_end):
        _, w, b = load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        for s_tile in range(s_begin, s_end):
            offsets, mask, x = load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                                           OFFSETS_64)
            z = affine((x - mean) * rstd, w, b, HAS_WEIGHT, HAS_BIAS)
            tl.store(y_grp + offsets, (z * tl.sigmoid(z)).to(y_grp.dtype.element_ty), mask=mask)


@triton.jit
def tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(xhat, dz, dxhat) of a tile, fp32; dz and dxhat are 0 where masked."""
    xhat = (x - mean) * rstd
    z = affine(xhat, w, b, HAS_WEIGHT, HAS_BIAS)
    sig = tl.sigmoid(z)
    dz = tl.where(mask, dy * sig * (1.0 + z * (1.0 - sig)), 0.0)
    if HAS_WEIGHT:
        dxhat = dz * w[None, :]
    else:
        dxhat = dz
    return xhat, dz, dxhat


@triton.jit
def chunk_grad_sums(x_grp, dy_grp, w_ptr, b_ptr, dw_row, db_row, channel0, mean, rstd, c_begin, c_end, s_begin,
                    s_end, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """sum(dxhat) and sum(dxhat * xhat) over tiles [c_begin, c_end) x [s_begin, s_end) of one group; stores
    the per-channel sums of dz * xhat (dweight) and dz (dbias) over those tiles at ``dw_row`` / ``db_row``
    (rows of the partial buffer, indexed by channel)."""
    # Per-lane accumulators, reduced across the block once per channel tile (dweight/dbias) and once at the end.
    acc_dxhat = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    acc_dxhat_xhat = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for c_tile in range(c_begin, c_end):
        c_idx, w, b = load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        dw_acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        db_acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for s_tile in range(s_begin, s_end):
            offsets, mask, x = load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                                           OFFSETS_64)
            dy = tl.load(dy_grp + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat, dz, dxhat = tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
            acc_dxhat += dxhat
            acc_dxhat_xhat += dxhat * xhat
            if HAS_WEIGHT:
                dw_acc += dz * xhat
            if HAS_BIAS:
                db_acc += dz
        if HAS_WEIGHT:
            tl.store(dw_row + channel0 + c_idx, tl.sum(dw_acc, axis=0), mask=c_idx < CPG)
        if HAS_BIAS:
            tl.store(db_row + channel0 + c_idx, tl.sum(db_acc, axis=0), mask=c_idx < CPG)
    sum_dxhat = tl.sum(acc_dxhat)
    sum_dxhat_xhat = tl.sum(acc_dxhat_xhat)
    return sum_dxhat, sum_dxhat_xhat


@triton.jit
def chunk_dx(x_grp, dy_grp, dx_grp, w_ptr, b_ptr, channel0, mean, rstd, mean_dxhat, mean_dxhat_xhat, c_begin,
             c_end, s_begin, s_end, C, S, CPG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
             CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr,
             HAS_BIAS: tl.constexpr):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over tiles of one group."""
    for c_tile in range(c_begin, c_end):
        _, w, b = load_tile_affine(w_ptr, b_ptr, channel0, c_tile, CPG, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        for s_tile in range(s_begin, s_end):
            offsets, mask, x = load_x_tile(x_grp, mean, c_tile, s_tile, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                                           OFFSETS_64)
            dy = tl.load(dy_grp + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat, dz, dxhat = tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
            dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(dx_grp + offsets, dx.to(dx_grp.dtype.element_ty), mask=mask)


@triton.jit
def chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk, s_tiles_per_chunk):
    """Tile ranges (c_begin, c_end, s_begin, s_end) of chunk ``chunk`` = c_chunk * s_chunks + s_chunk."""
    c_begin = (chunk // s_chunks) * c_tiles_per_chunk
    s_begin = (chunk % s_chunks) * s_tiles_per_chunk
    c_end = tl.minimum(c_begin + c_tiles_per_chunk, c_tiles)
    s_end = tl.minimum(s_begin + s_tiles_per_chunk, s_tiles)
    return c_begin, c_end, s_begin, s_end
