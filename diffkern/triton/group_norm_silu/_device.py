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


# ----------------------------------------------------------------------------------------------------------------
# Packed tiles (split regime, channels-last, C/G not a multiple of 8): a tile's channel axis holds GPT whole groups
# (GPT * CPG channels, a multiple of 8, padded to BLOCK_C), so that each lane reads 16 contiguous bytes. Every lane
# keeps one channel for the whole loop; the per-group reductions are one-hot contractions of per-channel column
# sums, done once after the loop.


@triton.jit
def pack_onehot(c_idx, CPG: tl.constexpr, GPT: tl.constexpr):
    """[BLOCK_C, GPT]: whether channel ``c_idx`` of a packed tile belongs to the tile's group j. GPT is a power of
    two (the planner's), so channels past the tile's GPT groups (c // CPG >= GPT) belong to none."""
    return (c_idx // CPG)[:, None] == tl.arange(0, GPT)[None, :]


@triton.jit
def per_group(column, onehot):
    """Sums [GPT] over each group's channels of a per-channel [BLOCK_C] vector."""
    return tl.sum(tl.where(onehot, column[:, None], 0.0), axis=0)


@triton.jit
def per_channel(first, second, c_idx, CPG: tl.constexpr, GPT: tl.constexpr):
    """Two per-group [GPT] vectors spread over the packed tile's channels, as [1, BLOCK_C] rows (exact: one term
    each; 0 on the padding channels)."""
    onehot = pack_onehot(c_idx, CPG, GPT)
    first_c = tl.sum(tl.where(onehot, first[None, :], 0.0), axis=1)
    second_c = tl.sum(tl.where(onehot, second[None, :], 0.0), axis=1)
    return first_c[None, :], second_c[None, :]


@triton.jit
def chunk_rows(s_begin, s_end, S, BLOCK_S: tl.constexpr):
    """The in-bounds pixels of pixel tiles [s_begin, s_end), as fp32 (computed in 64 bits)."""
    rows = tl.minimum(S, s_end.to(tl.int64) * BLOCK_S) - s_begin.to(tl.int64) * BLOCK_S
    return rows.to(tl.float32)


@triton.jit
def packed_chunk_moments(x_pack, s_begin, s_end, C, S, CPG: tl.constexpr, GPT: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_C: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(count, mean [GPT], M2 [GPT]) in fp32 of the GPT groups of a packed tile over pixel tiles [s_begin, s_end).

    Per-channel shifted sums: each lane accumulates d = x - K_c and d^2 (K_c: channel c's mean over the first
    tile), the columns are summed once after the loop into each channel's mean and M2, and the channels of a group
    are merged with Chan's formula (equal counts). Masked lanes count d = 0."""
    offsets, mask, c_idx = tile(0, s_begin, C, S, CPG * GPT, BLOCK_S, BLOCK_C, True, OFFSETS_64)
    first = tl.load(x_pack + offsets, mask=mask, other=0.0).to(tl.float32)
    shift = tl.sum(first, axis=0) / chunk_rows(s_begin, s_begin + 1, S, BLOCK_S)
    sum_d = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    sum_d2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s_tile in range(s_begin, s_end):
        offsets, mask, _ = tile(0, s_tile, C, S, CPG * GPT, BLOCK_S, BLOCK_C, True, OFFSETS_64)
        x = tl.load(x_pack + offsets, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
    rows = chunk_rows(s_begin, s_end, S, BLOCK_S)
    col_d = tl.sum(sum_d, axis=0)
    col_mean = shift + col_d / rows
    col_m2 = tl.maximum(tl.sum(sum_d2, axis=0) - col_d * (col_d / rows), 0.0)
    onehot = pack_onehot(c_idx, CPG, GPT)
    mean = per_group(col_mean, onehot) / CPG
    spread = col_mean[:, None] - mean[None, :]
    m2 = tl.sum(tl.where(onehot, col_m2[:, None] + rows * (spread * spread), 0.0), axis=0)
    return rows * CPG, mean, m2


@triton.jit
def packed_normalize_silu(x_pack, y_pack, w_ptr, b_ptr, channel0, mean, rstd, s_begin, s_end, C, S,
                          CPG: tl.constexpr, GPT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                          OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y = silu((x - mean) * rstd * w + b) over pixel tiles [s_begin, s_end) of a packed tile; mean, rstd [GPT]."""
    c_idx = tl.arange(0, BLOCK_C)
    mean_c, rstd_c = per_channel(mean, rstd, c_idx, CPG, GPT)
    w, b = load_affine(w_ptr, b_ptr, channel0, c_idx, CPG * GPT, HAS_WEIGHT, HAS_BIAS)
    for s_tile in range(s_begin, s_end):
        offsets, mask, _ = tile(0, s_tile, C, S, CPG * GPT, BLOCK_S, BLOCK_C, True, OFFSETS_64)
        x = tl.load(x_pack + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x, mean_c)  # masked lanes: xhat = 0 (see chunk_normalize_silu)
        z = affine((x - mean_c) * rstd_c, w, b, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_pack + offsets, (z * tl.sigmoid(z)).to(y_pack.dtype.element_ty), mask=mask)


@triton.jit
def packed_stats(mean_ptr, rstd_ptr, group0, c_idx, CPG: tl.constexpr, GPT: tl.constexpr):
    """mean and rstd of each channel's group, [1, BLOCK_C] (0 on the padding channels)."""
    in_pack = c_idx < CPG * GPT
    mean = tl.load(mean_ptr + group0 + c_idx // CPG, mask=in_pack, other=0.0)
    rstd = tl.load(rstd_ptr + group0 + c_idx // CPG, mask=in_pack, other=0.0)
    return mean[None, :], rstd[None, :]


@triton.jit
def packed_grad_sums(x_pack, dy_pack, w_ptr, b_ptr, mean_ptr, rstd_ptr, dw_row, db_row, group0, channel0, s_begin,
                     s_end, C, S, CPG: tl.constexpr, GPT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                     OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """sum(dxhat) and sum(dxhat * xhat) [GPT] of the groups of a packed tile over pixel tiles [s_begin, s_end)
    (groups group0 .. group0 + GPT - 1); stores the per-channel sums of dz * xhat and dz at ``dw_row`` /
    ``db_row``, as ``chunk_grad_sums``. Two per-lane accumulators over the whole loop, sum(dz) and sum(dz * xhat),
    reduced once after it: a channel's sums of dxhat = dz * w and dxhat * xhat are w times its sums of dz and
    dz * xhat (w is constant along a column), so they come from the same columns."""
    c_idx = tl.arange(0, BLOCK_C)
    mean, rstd = packed_stats(mean_ptr, rstd_ptr, group0, c_idx, CPG, GPT)
    w, b = load_affine(w_ptr, b_ptr, channel0, c_idx, CPG * GPT, HAS_WEIGHT, HAS_BIAS)
    acc_dz = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    acc_dz_xhat = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s_tile in range(s_begin, s_end):
        offsets, mask, _ = tile(0, s_tile, C, S, CPG * GPT, BLOCK_S, BLOCK_C, True, OFFSETS_64)
        x = tl.where(mask, tl.load(x_pack + offsets, mask=mask, other=0.0).to(tl.float32), mean)
        dy = tl.load(dy_pack + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat, dz, _ = tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
        acc_dz += dz
        acc_dz_xhat += dz * xhat
    col_dz = tl.sum(acc_dz, axis=0)
    col_dz_xhat = tl.sum(acc_dz_xhat, axis=0)
    in_pack = c_idx < CPG * GPT
    if HAS_WEIGHT:
        tl.store(dw_row + channel0 + c_idx, col_dz_xhat, mask=in_pack)
        col_dxhat = col_dz * w
        col_dxhat_xhat = col_dz_xhat * w
    else:
        col_dxhat = col_dz
        col_dxhat_xhat = col_dz_xhat
    if HAS_BIAS:
        tl.store(db_row + channel0 + c_idx, col_dz, mask=in_pack)
    onehot = pack_onehot(c_idx, CPG, GPT)
    return per_group(col_dxhat, onehot), per_group(col_dxhat_xhat, onehot)


@triton.jit
def packed_dx(x_pack, dy_pack, dx_pack, w_ptr, b_ptr, mean_ptr, rstd_ptr, group0, channel0, mean_dxhat,
              mean_dxhat_xhat, s_begin, s_end, C, S, CPG: tl.constexpr, GPT: tl.constexpr, BLOCK_S: tl.constexpr,
              BLOCK_C: tl.constexpr, OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dx over pixel tiles [s_begin, s_end) of a packed tile, as ``chunk_dx``; mean_dxhat, mean_dxhat_xhat [GPT]."""
    c_idx = tl.arange(0, BLOCK_C)
    mean, rstd = packed_stats(mean_ptr, rstd_ptr, group0, c_idx, CPG, GPT)
    m_dxhat, m_dxhat_xhat = per_channel(mean_dxhat, mean_dxhat_xhat, c_idx, CPG, GPT)
    w, b = load_affine(w_ptr, b_ptr, channel0, c_idx, CPG * GPT, HAS_WEIGHT, HAS_BIAS)
    for s_tile in range(s_begin, s_end):
        offsets, mask, _ = tile(0, s_tile, C, S, CPG * GPT, BLOCK_S, BLOCK_C, True, OFFSETS_64)
        x = tl.where(mask, tl.load(x_pack + offsets, mask=mask, other=0.0).to(tl.float32), mean)
        dy = tl.load(dy_pack + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat, dz, dxhat = tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
        dx = rstd * (dxhat - m_dxhat - xhat * m_dxhat_xhat)
        tl.store(dx_pack + offsets, dx.to(dx_pack.dtype.element_ty), mask=mask)
