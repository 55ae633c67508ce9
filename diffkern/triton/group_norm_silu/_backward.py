"""The backward kernels of GroupNorm + SiLU: one program per group (regimes single and looped), or two kernels
over the chunks of each group (regime split; in channels-last with C/G not a multiple of 8, over the chunks of
packs of GPT groups: ``_device``, "Packed tiles"); then the dweight/dbias row sum."""

from __future__ import annotations

import triton
import triton.language as tl

from diffkern.triton.group_norm_silu import _device as dev


@triton.jit
def bwd_group_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, C, S, CPG: tl.constexpr, G,
                     c_tiles, s_tiles, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SINGLE_TILE: tl.constexpr):
    """Regimes single and looped. Grid (N*G,): one program per group.

    dy, x, dx: (N, C, S) in x's layout; mean, rstd: fp32 [N*G]; part: fp32 [P, N, C] per-sample partial
    sums over pixels of dz * xhat (plane 0, with weight) and dz (next plane, with bias)."""
    group = tl.program_id(0)
    n = group // G
    channel0 = (group % G) * CPG
    base = dev.group_offset(group, G, C, S, CPG, CHANNELS_LAST)
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
    inv_count = 1.0 / dev.group_count(CPG, S)
    if SINGLE_TILE:
        # x and dy stay in registers between the group sums and dx: each is read once.
        offsets, mask, c_idx = dev.tile(0, 0, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
        w, b = dev.load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT, HAS_BIAS)
        x = tl.load(x_grp + offsets, mask=mask, other=mean).to(tl.float32)
        dy = tl.load(dy_grp + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat, dz, dxhat = dev.tile_grads(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS)
        if HAS_WEIGHT:
            tl.store(dw_row + channel0 + c_idx, tl.sum(dz * xhat, axis=0), mask=c_idx < CPG)
        if HAS_BIAS:
            tl.store(db_row + channel0 + c_idx, tl.sum(dz, axis=0), mask=c_idx < CPG)
        mean_dxhat = tl.sum(dxhat) * inv_count
        mean_dxhat_xhat = tl.sum(dxhat * xhat) * inv_count
        dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(dx_grp + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        sum_dxhat, sum_dxhat_xhat = dev.chunk_grad_sums(x_grp, dy_grp, w_ptr, b_ptr, dw_row, db_row, channel0, mean,
                                                        rstd, 0, c_tiles, 0, s_tiles, C, S, CPG, BLOCK_S, BLOCK_C,
                                                        CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT, HAS_BIAS)
        dev.chunk_dx(x_grp, dy_grp, dx_grp, w_ptr, b_ptr, channel0, mean, rstd, sum_dxhat * inv_count,
                     sum_dxhat_xhat * inv_count, 0, c_tiles, 0, s_tiles, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST,
                     OFFSETS_64, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def bwd_chunk_sums_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sums_ptr, part_ptr, C, S,
                          CPG: tl.constexpr, G, c_tiles, s_tiles, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                          OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          GPT: tl.constexpr):
    """Split regime, kernel A. Grid (N*G / GPT, K). Writes sum(dxhat), sum(dxhat * xhat) of chunk k of group ng to
    sums[0|1, ng, k] (fp32 [2, N*G, K]) and its per-channel dweight/dbias partials to row
    n * s_chunks + s_chunk of part (fp32 [P, N * s_chunks, C]). GPT > 1 (packed tiles, channels-last): program p
    covers groups p * GPT .. p * GPT + GPT - 1."""
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    packs = G // GPT
    pack = tl.program_id(0)
    n = pack // packs
    c_begin, c_end, s_begin, s_end = dev.chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                      s_tiles_per_chunk)
    rows = (tl.num_programs(0) // packs) * s_chunks
    dw_row = part_ptr + (n * s_chunks + chunk % s_chunks).to(tl.int64) * C
    if HAS_WEIGHT:
        db_row = dw_row + rows.to(tl.int64) * C
    else:
        db_row = dw_row
    plane = tl.num_programs(0) * GPT * chunks
    if GPT == 1:
        group = pack
        channel0 = (group % G) * CPG
        base = dev.group_offset(group, G, C, S, CPG, CHANNELS_LAST)
        mean = tl.load(mean_ptr + group)
        rstd = tl.load(rstd_ptr + group)
        sum_dxhat, sum_dxhat_xhat = dev.chunk_grad_sums(x_ptr + base, dy_ptr + base, w_ptr, b_ptr, dw_row, db_row,
                                                        channel0, mean, rstd, c_begin, c_end, s_begin, s_end, C, S,
                                                        CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT,
                                                        HAS_BIAS)
        slot = group * chunks + chunk
        tl.store(sums_ptr + slot, sum_dxhat)
        tl.store(sums_ptr + plane + slot, sum_dxhat_xhat)
    else:
        channel0 = (pack % packs) * (CPG * GPT)
        base = dev.group_offset(pack, packs, C, S, CPG * GPT, CHANNELS_LAST)
        sum_dxhat, sum_dxhat_xhat = dev.packed_grad_sums(x_ptr + base, dy_ptr + base, w_ptr, b_ptr, mean_ptr,
                                                         rstd_ptr, dw_row, db_row, pack * GPT, channel0, s_begin,
                                                         s_end, C, S, CPG, GPT, BLOCK_S, BLOCK_C, OFFSETS_64,
                                                         HAS_WEIGHT, HAS_BIAS)
        slots = (pack * GPT + tl.arange(0, GPT)) * chunks + chunk
        tl.store(sums_ptr + slots, sum_dxhat)
        tl.store(sums_ptr + plane + slots, sum_dxhat_xhat)


@triton.jit
def bwd_chunk_dx_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sums_ptr, dx_ptr, C, S, CPG: tl.constexpr, G,
                        c_tiles, s_tiles, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk, BLOCK_K: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                        OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GPT: tl.constexpr):
    """Split regime, kernel B. Grid (N*G / GPT, K). Adds up the group's K chunk sums in a fixed order and writes dx
    over its own chunk (GPT > 1: for the GPT groups of a packed tile at once)."""
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    plane = tl.num_programs(0) * GPT * chunks
    k = tl.arange(0, BLOCK_K)
    inv_count = 1.0 / dev.group_count(CPG, S)
    c_begin, c_end, s_begin, s_end = dev.chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                      s_tiles_per_chunk)
    if GPT == 1:
        group = tl.program_id(0)
        slots = group * chunks + k
        mean_dxhat = tl.sum(tl.load(sums_ptr + slots, mask=k < chunks, other=0.0)) * inv_count
        mean_dxhat_xhat = tl.sum(tl.load(sums_ptr + plane + slots, mask=k < chunks, other=0.0)) * inv_count
        mean = tl.load(mean_ptr + group)
        rstd = tl.load(rstd_ptr + group)
        base = dev.group_offset(group, G, C, S, CPG, CHANNELS_LAST)
        dev.chunk_dx(x_ptr + base, dy_ptr + base, dx_ptr + base, w_ptr, b_ptr, (group % G) * CPG, mean, rstd,
                     mean_dxhat, mean_dxhat_xhat, c_begin, c_end, s_begin, s_end, C, S, CPG, BLOCK_S, BLOCK_C,
                     CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT, HAS_BIAS)
    else:
        pack = tl.program_id(0)
        packs = G // GPT
        slots = (pack * GPT + tl.arange(0, GPT))[:, None] * chunks + k[None, :]
        valid = tl.broadcast_to((k < chunks)[None, :], [GPT, BLOCK_K])
        mean_dxhat = tl.sum(tl.load(sums_ptr + slots, mask=valid, other=0.0), axis=1) * inv_count
        mean_dxhat_xhat = tl.sum(tl.load(sums_ptr + plane + slots, mask=valid, other=0.0), axis=1) * inv_count
        base = dev.group_offset(pack, packs, C, S, CPG * GPT, CHANNELS_LAST)
        dev.packed_dx(x_ptr + base, dy_ptr + base, dx_ptr + base, w_ptr, b_ptr, mean_ptr, rstd_ptr, pack * GPT,
                      (pack % packs) * (CPG * GPT), mean_dxhat, mean_dxhat_xhat, s_begin, s_end, C, S, CPG, GPT,
                      BLOCK_S, BLOCK_C, OFFSETS_64, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def sum_partial_rows_kernel(part_ptr, dw_ptr, db_ptr, R, C, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
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
