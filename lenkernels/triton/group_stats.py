"""Triton kernel of the per-group statistics behind ``lenkernels.group_stats`` and
``lenkernels.shaping``: count / sum / mean / std / min / max of the selected members of each group,
several columns at once, broadcast back to the members (the ``group_stats_step`` stage of the
advantages family, ``lenkernels/_grouping.py``; launched through ``triton/advantages.py``).

  group_stats_kernel   one group per iteration of a persistent program: row sums of the mask (the
                       length column) -> count, sum, min, max -> mean about the max -> unbiased std,
                       of x * 2^-e (triton/group_math.py) -> written to every member
Every reduction runs in a fixed order inside one program: no atomics, bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels import _grouping
from lenkernels.triton.group_math import (
    GROUP_BLOCK,
    ROW_BLOCK_R,
    ROW_BLOCK_T,
    dummy,
    group_bounds,
    member_rows,
    persistent_grid,
    pow2,
    row_sums,
    scale_exponent,
)
from lenkernels.triton.utils import persistent_range

_STATS_BLOCK = GROUP_BLOCK // 2  # members per step: [BLOCK, C_PAD] tiles of several columns


@triton.jit(do_not_specialize=["T", "stride_m", "group_size"])
def group_stats_kernel(
    values_ptr,  # [B, C_IN] fp32, response order
    where_ptr,  # [B, C_OUT] fp32 0/1 selection, when HAS_WHERE
    mask_ptr,  # [B, T] any dtype: its row sums become the last column, when MASK_LEN
    perm_ptr,
    offsets_ptr,
    n_groups_ptr,
    len_buf_ptr,  # [B] fp32 scratch, sorted order
    lengths_ptr,  # [B] fp32 out, response order, when MASK_LEN
    stats_ptr,  # [B, C_OUT, 6] fp32 out, response order: count, sum, mean, std, min, max
    T,
    stride_m,
    group_size,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    C_PAD: tl.constexpr,
    HAS_WHERE: tl.constexpr,
    MASK_LEN: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid, n_groups, nprog = persistent_range(n_groups_ptr)
    col = tl.arange(0, C_PAD)
    for g in range(pid, n_groups, nprog):
        gs, ge = group_bounds(g, offsets_ptr, group_size, CONTIGUOUS)
        if MASK_LEN:
            row_sums(gs, ge, perm_ptr, values_ptr, mask_ptr, len_buf_ptr, len_buf_ptr, T, 0, stride_m,
                     False, True, CONTIGUOUS, BLOCK_R, BLOCK_T)  # fmt: skip
            tl.debug_barrier()
        # pass 1: count, sum, min, max and NaN count of the selected members, per column
        acc_k = tl.zeros([BLOCK, C_PAD], tl.float32)
        acc_s = tl.zeros([BLOCK, C_PAD], tl.float32)
        acc_lo = tl.full([BLOCK, C_PAD], float("inf"), tl.float32)
        acc_hi = tl.full([BLOCK, C_PAD], float("-inf"), tl.float32)
        acc_nan = tl.zeros([BLOCK, C_PAD], tl.float32)
        for start in range(gs, ge, BLOCK):
            x, sel, rows, pos, valid = _stat_tile(start, ge, col, values_ptr, where_ptr, perm_ptr, len_buf_ptr,
                                                  C_IN, C_OUT, HAS_WHERE, MASK_LEN, CONTIGUOUS, BLOCK)  # fmt: skip
            acc_k += sel
            acc_s += tl.where(sel != 0.0, x, 0.0)
            acc_lo = tl.minimum(acc_lo, tl.where(sel != 0.0, x, float("inf")))
            acc_hi = tl.maximum(acc_hi, tl.where(sel != 0.0, x, float("-inf")))
            acc_nan += tl.where((sel != 0.0) & (x != x), 1.0, 0.0)
        k = tl.sum(acc_k, 0)
        total = tl.sum(acc_s, 0)
        has_nan = tl.sum(acc_nan, 0) > 0.0
        lo = tl.where(has_nan, float("nan"), tl.min(acc_lo, 0))
        hi = tl.where(has_nan, float("nan"), tl.max(acc_hi, 0))
        # pass 2: mean about the max (exact when the selected members are all equal), of x * 2^-e with
        # e from the largest selected |x| (no overflow in the sums and squares), then times 2^e
        big = tl.maximum(tl.abs(lo), tl.abs(hi))  # NaN where a NaN was selected: then the scale is moot
        e = scale_exponent(tl.where(big == big, big, 0.0))
        down = pow2(-e)
        shift = tl.where(k > 0.0, hi * down, 0.0)
        acc_d = tl.zeros([BLOCK, C_PAD], tl.float32)
        for start in range(gs, ge, BLOCK):
            x, sel, rows, pos, valid = _stat_tile(start, ge, col, values_ptr, where_ptr, perm_ptr, len_buf_ptr,
                                                  C_IN, C_OUT, HAS_WHERE, MASK_LEN, CONTIGUOUS, BLOCK)  # fmt: skip
            acc_d += tl.where(sel != 0.0, x * down[None, :] - shift[None, :], 0.0)
        mean_s = tl.where(k > 0.0, shift + tl.sum(acc_d, 0) / tl.maximum(k, 1.0), 0.0)
        mean = mean_s * pow2(e)
        # pass 3: unbiased std (0 with fewer than two selected)
        acc_m2 = tl.zeros([BLOCK, C_PAD], tl.float32)
        for start in range(gs, ge, BLOCK):
            x, sel, rows, pos, valid = _stat_tile(start, ge, col, values_ptr, where_ptr, perm_ptr, len_buf_ptr,
                                                  C_IN, C_OUT, HAS_WHERE, MASK_LEN, CONTIGUOUS, BLOCK)  # fmt: skip
            c = x * down[None, :] - mean_s[None, :]
            acc_m2 += tl.where(sel != 0.0, c * c, 0.0)
        std = tl.where(k >= 2.0, tl.sqrt(tl.sum(acc_m2, 0) / tl.maximum(k - 1.0, 1.0)) * pow2(e), 0.0)
        std = tl.where(has_nan, float("nan"), std)
        # pass 4: broadcast to the members
        for start in range(gs, ge, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < ge
            rows = member_rows(pos, valid, perm_ptr, CONTIGUOUS)
            tile = valid[:, None] & (col[None, :] < C_OUT)
            out = stats_ptr + rows[:, None] * (C_OUT * 6) + col[None, :] * 6
            zero = tl.zeros([BLOCK, C_PAD], tl.float32)
            tl.store(out, zero + k[None, :], mask=tile)
            tl.store(out + 1, zero + total[None, :], mask=tile)
            tl.store(out + 2, zero + mean[None, :], mask=tile)
            tl.store(out + 3, zero + std[None, :], mask=tile)
            tl.store(out + 4, zero + lo[None, :], mask=tile)
            tl.store(out + 5, zero + hi[None, :], mask=tile)
            if MASK_LEN:
                tl.store(lengths_ptr + rows, tl.load(len_buf_ptr + pos, mask=valid, other=0.0), mask=valid)


@triton.jit
def _stat_tile(
    start, ge, col, values_ptr, where_ptr, perm_ptr, len_buf_ptr,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, HAS_WHERE: tl.constexpr, MASK_LEN: tl.constexpr,
    CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """[BLOCK, C_PAD] values and 0/1 selection of the members at sorted positions start.. (padding
    lanes and columns are unselected); the length column (index C_IN) comes from the scratch."""
    pos = start + tl.arange(0, BLOCK)
    valid = pos < ge
    rows = member_rows(pos, valid, perm_ptr, CONTIGUOUS)
    in_cols = valid[:, None] & (col[None, :] < C_IN)
    x = tl.load(values_ptr + rows[:, None] * C_IN + col[None, :], mask=in_cols, other=0.0)
    if MASK_LEN:
        length = tl.load(len_buf_ptr + pos, mask=valid, other=0.0)
        x = tl.where(col[None, :] == C_IN, length[:, None], x)
    tile = valid[:, None] & (col[None, :] < C_OUT)
    if HAS_WHERE:
        sel = tl.load(where_ptr + rows[:, None] * C_OUT + col[None, :], mask=tile, other=0.0)
    else:
        sel = tl.where(tile, 1.0, 0.0)
    return x, sel, rows, pos, valid


# --- host launcher -------------------------------------------------------------------------------


def group_stats_step(values, where, mask, seg, stats, lengths) -> None:
    """Launches group_stats_kernel: values [B, C_IN] fp32, where [B, C_OUT] fp32 or None, mask
    [B, T] (any weight dtype) or None; writes stats [B, C_OUT, 6] and lengths [B] (when mask is given)."""
    n, c_in = values.shape
    c_out = stats.shape[1]
    device = values.device
    contiguous = seg.perm is None
    if mask is not None:
        _grouping.weight_code(mask, "mask")
    none = dummy(device)
    len_buf = torch.empty(n if mask is not None else 1, dtype=torch.float32, device=device)
    group_stats_kernel[(persistent_grid(seg.bound, device),)](
        values_ptr=values,
        where_ptr=where if where is not None else none,
        mask_ptr=mask if mask is not None else none,
        perm_ptr=none if contiguous else seg.perm,
        offsets_ptr=none if contiguous else seg.offsets,
        n_groups_ptr=seg.n_groups,
        len_buf_ptr=len_buf,
        lengths_ptr=lengths if lengths is not None else none,
        stats_ptr=stats,
        T=mask.shape[1] if mask is not None else 0,
        stride_m=mask.stride(0) if mask is not None else 0,
        group_size=seg.group_size,
        C_IN=c_in,
        C_OUT=c_out,
        C_PAD=max(2, triton.next_power_of_2(c_out)),
        HAS_WHERE=where is not None,
        MASK_LEN=mask is not None,
        CONTIGUOUS=contiguous,
        BLOCK=_STATS_BLOCK,
        BLOCK_R=ROW_BLOCK_R,
        BLOCK_T=ROW_BLOCK_T,
        num_warps=4,
    )


# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(grouped: bool):
    """The heaviest step: two columns plus the mask's length column (C_OUT = 3), a selection, 8
    responses in groups of 4 (by ids, or contiguous)."""

    def run():
        n = 8
        seg = _grouping.segments(torch.arange(n) % 2 if grouped else None, 4, n, torch.device("cpu"))
        group_stats_step(torch.zeros((n, 2)), torch.ones((n, 3)), torch.ones((n, 16), dtype=torch.bool), seg,
                         torch.empty((n, 3, 6)), torch.empty(n))  # fmt: skip

    return run


AOT_CASES = [_aot_case(grouped=True), _aot_case(grouped=False)]
