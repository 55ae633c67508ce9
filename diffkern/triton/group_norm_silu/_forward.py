"""The forward kernels of GroupNorm + SiLU: one program per group (regimes single and looped), or two kernels
over the chunks of each group (regime split; in channels-last with C/G not a multiple of 8, over the chunks of
packs of GPT groups: ``_device``, "Packed tiles")."""

from __future__ import annotations

import triton
import triton.language as tl

from diffkern.triton.group_norm_silu import _device as dev


@triton.jit
def fwd_group_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, S, CPG: tl.constexpr, G, c_tiles, s_tiles,
                     eps, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SINGLE_TILE: tl.constexpr):
    """Regimes single and looped. Grid (N*G,): one program per group.

    x, y: (N, C, S) in x's layout; w, b: [C]; mean, rstd: fp32 [N*G]."""
    group = tl.program_id(0)
    base = dev.group_offset(group, G, C, S, CPG, CHANNELS_LAST)
    x_grp = x_ptr + base
    y_grp = y_ptr + base
    channel0 = (group % G) * CPG
    if SINGLE_TILE:
        # The group stays in registers between the statistics and the output: x is read once.
        offsets, mask, c_idx = dev.tile(0, 0, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64)
        x = tl.load(x_grp + offsets, mask=mask, other=0.0).to(tl.float32)
        count = dev.group_count(CPG, S)
        mean, m2 = dev.tile_moments(x, mask, count)
        rstd = tl.rsqrt(m2 / count + eps)
        w, b = dev.load_affine(w_ptr, b_ptr, channel0, c_idx, CPG, HAS_WEIGHT, HAS_BIAS)
        x = tl.where(mask, x, mean)  # padded lanes: xhat = 0 rather than a huge -mean * rstd
        z = dev.affine((x - mean) * rstd, w, b, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_grp + offsets, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        count, mean, m2 = dev.chunk_moments(x_grp, 0, c_tiles, 0, s_tiles, C, S, CPG, BLOCK_S, BLOCK_C,
                                            CHANNELS_LAST, OFFSETS_64)
        rstd = tl.rsqrt(m2 / count + eps)
        dev.chunk_normalize_silu(x_grp, y_grp, w_ptr, b_ptr, channel0, mean, rstd, 0, c_tiles, 0, s_tiles, C, S,
                                 CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64, HAS_WEIGHT, HAS_BIAS)
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, rstd)


@triton.jit
def fwd_chunk_moments_kernel(x_ptr, part_ptr, C, S, CPG: tl.constexpr, G, c_tiles, s_tiles, s_chunks,
                             c_tiles_per_chunk, s_tiles_per_chunk, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                             CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr, GPT: tl.constexpr):
    """Split regime, kernel A. Grid (N*G / GPT, K). Writes (count, mean, M2) of chunk k of group ng to
    part[0|1|2, ng, k] (fp32 [3, N*G, K]). GPT > 1 (packed tiles, channels-last): program p covers groups
    p * GPT .. p * GPT + GPT - 1, whose channels are one contiguous run."""
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    c_begin, c_end, s_begin, s_end = dev.chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                      s_tiles_per_chunk)
    plane = tl.num_programs(0) * GPT * chunks
    if GPT == 1:
        group = tl.program_id(0)
        x_grp = x_ptr + dev.group_offset(group, G, C, S, CPG, CHANNELS_LAST)
        count, mean, m2 = dev.chunk_moments(x_grp, c_begin, c_end, s_begin, s_end, C, S, CPG, BLOCK_S, BLOCK_C,
                                            CHANNELS_LAST, OFFSETS_64)
        slot = group * chunks + chunk
        tl.store(part_ptr + slot, count)
        tl.store(part_ptr + plane + slot, mean)
        tl.store(part_ptr + 2 * plane + slot, m2)
    else:
        pack = tl.program_id(0)
        x_pack = x_ptr + dev.group_offset(pack, G // GPT, C, S, CPG * GPT, CHANNELS_LAST)
        count, mean, m2 = dev.packed_chunk_moments(x_pack, s_begin, s_end, C, S, CPG, GPT, BLOCK_S, BLOCK_C,
                                                   OFFSETS_64)
        slots = (pack * GPT + tl.arange(0, GPT)) * chunks + chunk
        tl.store(part_ptr + slots, count + tl.zeros([GPT], tl.float32))
        tl.store(part_ptr + plane + slots, mean)
        tl.store(part_ptr + 2 * plane + slots, m2)


@triton.jit
def fwd_chunk_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, mean_ptr, rstd_ptr, C, S, CPG: tl.constexpr, G,
                           c_tiles, s_tiles, s_chunks, c_tiles_per_chunk, s_tiles_per_chunk, eps,
                           BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                           CHANNELS_LAST: tl.constexpr, OFFSETS_64: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, GPT: tl.constexpr):
    """Split regime, kernel B. Grid (N*G / GPT, K). Merges the group's K chunk summaries (every program of the group
    merges the same values in the same order, so all agree bitwise), chunk 0 stores mean/rstd, and each
    program writes y over its own chunk. GPT > 1: the GPT groups of a packed tile at once, as kernel A."""
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    plane = tl.num_programs(0) * GPT * chunks
    k = tl.arange(0, BLOCK_K)
    c_begin, c_end, s_begin, s_end = dev.chunk_bounds(chunk, s_chunks, c_tiles, s_tiles, c_tiles_per_chunk,
                                                      s_tiles_per_chunk)
    if GPT == 1:
        group = tl.program_id(0)
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

        base = dev.group_offset(group, G, C, S, CPG, CHANNELS_LAST)
        dev.chunk_normalize_silu(x_ptr + base, y_ptr + base, w_ptr, b_ptr, (group % G) * CPG, mean, rstd, c_begin,
                                 c_end, s_begin, s_end, C, S, CPG, BLOCK_S, BLOCK_C, CHANNELS_LAST, OFFSETS_64,
                                 HAS_WEIGHT, HAS_BIAS)
    else:
        pack = tl.program_id(0)
        groups = pack * GPT + tl.arange(0, GPT)
        valid = tl.broadcast_to((k < chunks)[None, :], [GPT, BLOCK_K])
        slots = groups[:, None] * chunks + k[None, :]
        counts = tl.load(part_ptr + slots, mask=valid, other=0.0)
        means = tl.load(part_ptr + plane + slots, mask=valid, other=0.0)
        m2s = tl.load(part_ptr + 2 * plane + slots, mask=valid, other=0.0)
        count = tl.sum(counts, axis=1)
        mean = tl.sum(counts * means, axis=1) / count
        spread = tl.where(valid, means - mean[:, None], 0.0)
        m2 = tl.sum(m2s, axis=1) + tl.sum(counts * spread * spread, axis=1)
        rstd = tl.rsqrt(m2 / count + eps)
        first_chunk = groups * 0 + chunk == 0  # a [GPT] mask (a scalar one would not broadcast in the interpreter)
        tl.store(mean_ptr + groups, mean, mask=first_chunk)
        tl.store(rstd_ptr + groups, rstd, mask=first_chunk)

        packs = G // GPT
        base = dev.group_offset(pack, packs, C, S, CPG * GPT, CHANNELS_LAST)
        dev.packed_normalize_silu(x_ptr + base, y_ptr + base, w_ptr, b_ptr, (pack % packs) * (CPG * GPT), mean,
                                  rstd, s_begin, s_end, C, S, CPG, GPT, BLOCK_S, BLOCK_C, OFFSETS_64, HAS_WEIGHT,
                                  HAS_BIAS)
