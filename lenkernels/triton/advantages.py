"""Triton kernels of the group advantages (SPEC 4): the ``backend="triton"`` implementation of the
advantages family (same launcher signatures as ``lenkernels/{cpu,cuda,reference}/advantages.py``;
the stages are those of ``lenkernels/_grouping.py``). The per-group statistics kernel is in
``triton/group_stats.py``, the device functions both share (segmented layout, the maths of
``csrc/include/lenkernels/advantages.h``) in ``triton/group_math.py``.

Kernels:
  group_advantages_kernel        one group per iteration: row sums of [B, T] token rewards and of
                                 the mask (scores, lengths) -> group mean / std / top-2 in passes
                                 over the members (L1/L2 resident) -> one advantage per response
  gaussian_rank_kernel           one run of tied scores per iteration (runs from a (group, score)
                                 sort): the mean normal score of the run's ranks
  batch_moments_kernel           weighted (w, mean, m2) of fixed-size chunks of a [B] vector (of
                                 x * 2^-e, 2^e the power of two of the chunk's largest |x|)
  batch_moments_finalize_kernel  merges the chunks in order -> (shift, scale) of batch / rpp
  advantages_broadcast_kernel    out = (adv - shift) * scale, broadcast over the mask; masked tokens
                                 are exactly 0
Every reduction runs in a fixed order inside one program: no atomics, bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels import _grouping
from lenkernels._codes import LenSource, Method
from lenkernels.triton import group_stats as _group_stats
from lenkernels.triton.group_math import (
    GROUP_BLOCK,
    LEN_SOURCES,
    METHODS,
    ROW_BLOCK_R,
    ROW_BLOCK_T,
    abs_or_zero,
    dummy,
    group_bounds,
    member_advantage,
    member_rows,
    member_scores,
    member_weights,
    persistent_grid,
    pow2,
    rank_normal_score,
    row_sums,
    scale_down,
    scale_exponent,
    scaled,
)
from lenkernels.triton.utils import persistent_range

FAMILY = "advantages"
_MOMENT_CHUNK = 4096  # elements per program of the batch moments (fixed: results do not depend on the GPU)
_BROADCAST_BLOCK = 1024


# --- group advantages ----------------------------------------------------------------------------


@triton.jit
def _member_tile(start, ge, perm_ptr, rewards_ptr, score_buf_ptr, TOKEN_REWARDS: tl.constexpr,
                 CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Sorted positions start.. of a group ending at ``ge``: (pos, valid, response rows, scores)."""
    pos = start + tl.arange(0, BLOCK)
    valid = pos < ge
    rows = member_rows(pos, valid, perm_ptr, CONTIGUOUS)
    return pos, valid, rows, member_scores(pos, valid, rows, rewards_ptr, score_buf_ptr, TOKEN_REWARDS)


@triton.jit(do_not_specialize=["T", "stride_r", "stride_m", "group_size", "eps", "norm", "ddof"])
def group_advantages_kernel(
    rewards_ptr,  # [B] or [B, T] (row stride stride_r, unit stride along T), fp32/bf16/fp16
    mask_ptr,  # [B, T] response mask (any dtype, used as weights), or a dummy
    lengths_ptr,  # [B] response lengths (any dtype), or a dummy
    perm_ptr,  # [B] int64 sorted position -> response (unused when CONTIGUOUS)
    offsets_ptr,  # int64 group starts, offsets[n_groups] = B (unused when CONTIGUOUS)
    n_groups_ptr,  # [1] int64
    score_buf_ptr,  # [B] fp32 scratch (sorted order): scores of [B, T] token rewards
    len_buf_ptr,  # [B] fp32 scratch (sorted order): lengths from the mask
    adv_ptr,  # [B] fp32 out (response order): advantage (centred score for batch / rpp)
    raw_ptr,  # [B] fp32 out (response order): raw score, when WRITE_RAW
    w_out_ptr,  # [B] fp32 out (response order): length, when WRITE_W
    T,
    stride_r,
    stride_m,
    group_size,
    eps,
    norm,
    ddof,
    METHOD: tl.constexpr,
    TOKEN_REWARDS: tl.constexpr,
    LEN_SOURCE: tl.constexpr,  # LenSource: none, row sums of the mask, the lengths tensor
    CONTIGUOUS: tl.constexpr,
    WRITE_RAW: tl.constexpr,
    WRITE_W: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid, n_groups, nprog = persistent_range(n_groups_ptr)
    for g in range(pid, n_groups, nprog):
        gs, ge = group_bounds(g, offsets_ptr, group_size, CONTIGUOUS)
        if (LEN_SOURCE == LEN_SOURCES.LEN_MASK) | TOKEN_REWARDS:
            row_sums(gs, ge, perm_ptr, rewards_ptr, mask_ptr, score_buf_ptr, len_buf_ptr, T, stride_r, stride_m,
                     TOKEN_REWARDS, LEN_SOURCE == LEN_SOURCES.LEN_MASK, CONTIGUOUS, BLOCK_R, BLOCK_T)  # fmt: skip
            tl.debug_barrier()  # the scratch rows were written by other threads of this program
        n = (ge - gs).to(tl.float32)
        # shift = the first member's score: an all-equal group then has mean == shift exactly
        if CONTIGUOUS:
            row0 = gs
        else:
            row0 = tl.load(perm_ptr + gs)
        if TOKEN_REWARDS:
            shift = tl.load(score_buf_ptr + gs)
        else:
            shift = tl.load(rewards_ptr + row0).to(tl.float32)

        # pass 0: the largest |s| -> the sums and squares below are of s * 2^-e (no overflow)
        acc_abs = tl.zeros([BLOCK], tl.float32)
        for start in range(gs, ge, BLOCK):
            pos, valid, rows, s = _member_tile(
                start, ge, perm_ptr, rewards_ptr, score_buf_ptr, TOKEN_REWARDS, CONTIGUOUS, BLOCK
            )
            acc_abs = tl.maximum(acc_abs, abs_or_zero(s, valid))
        e = scale_exponent(tl.max(acc_abs, 0))
        down = pow2(-e)
        up = pow2(e)
        shift = shift * down

        # pass 1: sum of (s - shift); opo: length-weighted sums; pass@k: max and NaN count
        acc_d = tl.zeros([BLOCK], tl.float32)
        acc_wd = tl.zeros([BLOCK], tl.float32)
        acc_w = tl.zeros([BLOCK], tl.float32)
        acc_max = tl.full([BLOCK], float("-inf"), tl.float32)
        acc_nan = tl.zeros([BLOCK], tl.int32)
        for start in range(gs, ge, BLOCK):
            pos, valid, rows, s = _member_tile(
                start, ge, perm_ptr, rewards_ptr, score_buf_ptr, TOKEN_REWARDS, CONTIGUOUS, BLOCK
            )
            d = tl.where(valid, s * down - shift, 0.0)
            acc_d += d
            if METHOD == METHODS.OPO:
                w = member_weights(pos, valid, rows, lengths_ptr, len_buf_ptr, LEN_SOURCE)
                acc_wd += w * d
                acc_w += w
            if METHOD == METHODS.GRPO_PASSK:
                acc_max = tl.maximum(acc_max, tl.where(valid, s, float("-inf")))
                acc_nan += tl.where(valid & (s != s), 1, 0)
        mean_s = shift + tl.sum(acc_d, 0) / n  # of s * 2^-e
        mean = mean_s * up
        if METHOD == METHODS.OPO:
            wsum = tl.sum(acc_w, 0)
            baseline = tl.where((n <= 1.0) | (wsum == 0.0), 0.0, (shift + tl.sum(acc_wd, 0) / wsum) * up)
        else:
            baseline = tl.where(n <= 1.0, 0.0, mean)

        # pass 2: sum of squares about the mean; pass@k: first best member and the runner-up
        r_max = tl.max(acc_max, 0)
        has_nan = tl.sum(acc_nan, 0) > 0
        acc_m2 = tl.zeros([BLOCK], tl.float32)
        acc_cnt = tl.zeros([BLOCK], tl.int32)
        acc_below = tl.full([BLOCK], float("-inf"), tl.float32)
        acc_first = tl.zeros([BLOCK], tl.int64) + ge  # past the group: no best member yet
        if (METHOD == METHODS.GRPO) | (METHOD == METHODS.GRPO_PASSK):
            for start in range(gs, ge, BLOCK):
                pos, valid, rows, s = _member_tile(
                    start, ge, perm_ptr, rewards_ptr, score_buf_ptr, TOKEN_REWARDS, CONTIGUOUS, BLOCK
                )
                c = tl.where(valid, s * down - mean_s, 0.0)
                acc_m2 += c * c
                if METHOD == METHODS.GRPO_PASSK:
                    top = valid & (s == r_max)
                    acc_cnt += tl.where(top, 1, 0)
                    acc_below = tl.maximum(acc_below, tl.where(valid & (s < r_max), s, float("-inf")))
                    acc_first = tl.minimum(acc_first, tl.where(top, pos, ge))
        std = tl.where(n <= 1.0, 1.0, tl.sqrt(tl.sum(acc_m2, 0) / (n - ddof)) * up)
        best = tl.min(acc_first, 0)
        # runner-up: a tied maximum counts twice; a group of one compares with its baseline 0
        r_second = tl.where(n <= 1.0, 0.0, tl.where(tl.sum(acc_cnt, 0) >= 2, r_max, tl.max(acc_below, 0)))

        # pass 3: one advantage per member, written in response order
        for start in range(gs, ge, BLOCK):
            pos, valid, rows, s = _member_tile(
                start, ge, perm_ptr, rewards_ptr, score_buf_ptr, TOKEN_REWARDS, CONTIGUOUS, BLOCK
            )
            if METHOD == METHODS.GRPO_PASSK:
                gap = r_max - r_second
                a = tl.where(pos == best, tl.where(norm != 0, scaled(gap, std, eps), gap), 0.0)
                a = tl.where(has_nan, float("nan"), a)
            else:
                a = member_advantage(s, baseline, std, n, eps, norm, METHOD)
            tl.store(adv_ptr + rows, a, mask=valid)
            if WRITE_RAW:
                tl.store(raw_ptr + rows, s, mask=valid)
            if WRITE_W:
                length = member_weights(pos, valid, rows, lengths_ptr, len_buf_ptr, LEN_SOURCE)
                tl.store(w_out_ptr + rows, length, mask=valid)


@triton.jit
def gaussian_rank_kernel(
    scores_ptr,  # [B] fp32, response order
    perm_ptr,  # [B] int64: responses sorted by (group, score)
    group_of_ptr,  # [B] int64: group index of each sorted position
    group_offsets_ptr,  # int64 group starts, as offsets_ptr above
    run_offsets_ptr,  # int64 starts of the runs of equal (group, score)
    n_runs_ptr,  # [1] int64
    adv_ptr,  # [B] fp32 out, response order
    BLOCK: tl.constexpr,
):
    pid, n_runs, nprog = persistent_range(n_runs_ptr)
    for r in range(pid, n_runs, nprog):
        rs = tl.load(run_offsets_ptr + r)
        re = tl.load(run_offsets_ptr + r + 1)
        g = tl.load(group_of_ptr + rs)
        gs = tl.load(group_offsets_ptr + g)
        ge = tl.load(group_offsets_ptr + g + 1)
        n = ge - gs
        run_len = re - rs
        # NaN sorts last: a group holding one is NaN throughout
        last = tl.load(scores_ptr + tl.load(perm_ptr + ge - 1))
        zero = (n <= 1) | (run_len == n)
        acc = tl.zeros([BLOCK], tl.float64)
        for start in range(rs, tl.where(zero, rs, re), BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < re
            acc += tl.where(valid, rank_normal_score(pos - gs + 1, n), 0.0)
        value = tl.where(zero, 0.0, (tl.sum(acc, 0) / run_len.to(tl.float64)).to(tl.float32))
        value = tl.where(last != last, float("nan"), value)
        for start in range(rs, re, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < re
            rows = tl.load(perm_ptr + pos, mask=valid, other=0)
            tl.store(adv_ptr + rows, tl.zeros([BLOCK], tl.float32) + value, mask=valid)


# --- batch-level step (batch, reinforce_pp_baseline) -------------------------------------------


@triton.jit
def _weighted_tile(x_ptr, w_ptr, i, end, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """x [BLOCK] fp32 and its weights (1 without HAS_W) at i.., padding lanes 0 past ``end``."""
    offs = i + tl.arange(0, BLOCK)
    valid = offs < end
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=valid, other=0).to(tl.float32)
    else:
        w = tl.where(valid, 1.0, 0.0)
    return x, w


@triton.jit(do_not_specialize=["n", "chunk"])
def batch_moments_kernel(
    x_ptr,  # [n] fp32
    w_ptr,  # [n] weights (any dtype), when HAS_W
    partial_ptr,  # [n_chunks, 4] fp32 out: (w, mean, m2) of x * 2^-e, and e
    n,
    chunk,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * chunk
    end = tl.minimum(start + chunk, n)
    acc_w = tl.zeros([BLOCK], tl.float32)
    acc_abs = tl.zeros([BLOCK], tl.float32)
    for i in range(start, end, BLOCK):
        x, w = _weighted_tile(x_ptr, w_ptr, i, end, HAS_W, BLOCK)
        acc_w += w
        acc_abs = tl.maximum(acc_abs, abs_or_zero(x, w != 0.0))
    wsum = tl.sum(acc_w, 0)
    e = scale_exponent(tl.max(acc_abs, 0))  # the chunk's moments are those of x * 2^-e
    down = pow2(-e)
    acc_wx = tl.zeros([BLOCK], tl.float32)
    for i in range(start, end, BLOCK):
        x, w = _weighted_tile(x_ptr, w_ptr, i, end, HAS_W, BLOCK)
        acc_wx += tl.where(w != 0.0, w * (x * down), 0.0)
    mean = tl.where(wsum > 0.0, tl.sum(acc_wx, 0) / wsum, 0.0)
    acc_m2 = tl.zeros([BLOCK], tl.float32)
    for i in range(start, end, BLOCK):
        x, w = _weighted_tile(x_ptr, w_ptr, i, end, HAS_W, BLOCK)
        c = x * down - mean
        acc_m2 += tl.where(w != 0.0, w * c * c, 0.0)
    out = partial_ptr + pid * 4
    tl.store(out, wsum)
    tl.store(out + 1, mean)
    tl.store(out + 2, tl.sum(acc_m2, 0))
    tl.store(out + 3, e.to(tl.float32))


@triton.jit(do_not_specialize=["n_chunks", "eps"])
def batch_moments_finalize_kernel(
    partial_ptr,  # [n_chunks, 4] fp32: (w, mean, m2) of x * 2^-e, and e
    stats_ptr,  # [2] fp32 out: (shift, scale)
    n_chunks,
    eps,
    METHOD: tl.constexpr,
):
    w = tl.load(partial_ptr)
    mean = tl.load(partial_ptr + 1)
    m2 = tl.load(partial_ptr + 2)
    e = tl.load(partial_ptr + 3).to(tl.int32)
    for i in range(1, n_chunks):  # Chan's merge, left to right, at the larger exponent (advantages.h merge)
        wb = tl.load(partial_ptr + 4 * i)
        mb = tl.load(partial_ptr + 4 * i + 1)
        m2b = tl.load(partial_ptr + 4 * i + 2)
        eb = tl.load(partial_ptr + 4 * i + 3).to(tl.int32)
        e_new = tl.maximum(e, eb)
        ma = scale_down(mean, e - e_new)
        m2a = scale_down(m2, 2 * (e - e_new))
        mb_new = scale_down(mb, eb - e_new)
        m2b_new = scale_down(m2b, 2 * (eb - e_new))
        total = w + wb
        frac = tl.where(wb == 0.0, 0.0, wb / tl.where(total == 0.0, 1.0, total))
        delta = tl.where(wb == 0.0, 0.0, mb_new - ma)
        new_mean = tl.where(w == 0.0, mb, ma + delta * frac)
        new_m2 = tl.where(w == 0.0, m2b, m2a + m2b_new + delta * delta * w * frac)
        new_e = tl.where(w == 0.0, eb, e_new)
        mean = tl.where(wb == 0.0, mean, new_mean)
        m2 = tl.where(wb == 0.0, m2, new_m2)
        e = tl.where(wb == 0.0, e, new_e)
        w = total
    var = m2 / (w - 1.0)  # of x * 2^-e
    up = pow2(e)
    if METHOD == METHODS.REINFORCE_PP_BASELINE:  # verl's masked_whiten
        shift = mean * up
        var_x = var * up * up
        # a var past fp32's range swamps the 1e-8: 1 / std from the scaled var
        past = (var_x > 3.4028234663852886e38) & (var <= 3.4028234663852886e38)
        scale = tl.where(past, 1.0 / tl.sqrt(var) * pow2(-e), 1.0 / tl.sqrt(var_x + 1e-8))
    else:  # batch: divide by the batch std of the raw scores
        shift = tl.zeros([], tl.float32)
        scale = 1.0 / (tl.sqrt(var) * up + eps)
    tl.store(stats_ptr, shift)
    tl.store(stats_ptr + 1, scale)


@triton.jit(do_not_specialize=["n_rows", "T", "stride_m", "stride_o"])
def advantages_broadcast_kernel(
    adv_ptr,  # [B] fp32
    stats_ptr,  # [2] fp32 (shift, scale), when GLOBAL
    mask_ptr,  # [B, T] any dtype, when HAS_MASK
    out_ptr,  # [B, T] (HAS_MASK) or [B] fp32
    n_rows,
    T,
    stride_m,
    stride_o,
    GLOBAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_MASK:
        row = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = t < T
        a = tl.load(adv_ptr + row)
        if GLOBAL:
            a = (a - tl.load(stats_ptr)) * tl.load(stats_ptr + 1)
        m = tl.load(mask_ptr + row * stride_m + t, mask=valid, other=0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + t, tl.where(m != 0.0, a * m, 0.0), mask=valid)
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_rows
        a = tl.load(adv_ptr + offs, mask=valid, other=0.0)
        if GLOBAL:
            a = (a - tl.load(stats_ptr)) * tl.load(stats_ptr + 1)
        tl.store(out_ptr + offs, a, mask=valid)


# --- stage launchers (lenkernels/_grouping.py Stages) ----------------------------------------------


def group_step(rewards, mask, lengths, seg, cfg, adv, raw, w_out) -> None:
    """Launches group_advantages_kernel. ``seg``: the segmentation of lenkernels/_grouping.py;
    ``mask`` only when its row sums are the lengths; writes adv [B] (and raw scores / lengths in
    response order when given)."""
    method = Method(cfg.method)  # an unknown code raises
    n = rewards.shape[0]
    device = rewards.device
    token = rewards.dim() == 2
    T = rewards.shape[1] if token else (mask.shape[1] if mask is not None else 0)
    if method not in _grouping.LENGTH_WEIGHTED:
        len_source = LenSource.LEN_NONE
    elif lengths is not None:
        len_source = LenSource.LEN_TENSOR
    else:
        len_source = LenSource.LEN_MASK if mask is not None else LenSource.LEN_NONE
    need_len_buf = len_source == LenSource.LEN_MASK
    for x, name in ((mask, "mask"), (lengths, "lengths")):
        if x is not None:
            _grouping.weight_code(x, name)
    score_buf = torch.empty(n if token else 1, dtype=torch.float32, device=device)
    len_buf = torch.empty(n if need_len_buf else 1, dtype=torch.float32, device=device)
    contiguous = seg.perm is None
    none = dummy(device)
    group_advantages_kernel[(persistent_grid(seg.bound, device),)](
        rewards_ptr=rewards,
        mask_ptr=mask if need_len_buf else none,
        lengths_ptr=lengths if lengths is not None else none,
        perm_ptr=none if contiguous else seg.perm,
        offsets_ptr=none if contiguous else seg.offsets,
        n_groups_ptr=seg.n_groups,
        score_buf_ptr=score_buf,
        len_buf_ptr=len_buf,
        adv_ptr=adv,
        raw_ptr=raw if raw is not None else none,
        w_out_ptr=w_out if w_out is not None else none,
        T=T,
        stride_r=rewards.stride(0) if token else 0,
        stride_m=mask.stride(0) if need_len_buf else 0,
        group_size=seg.group_size,
        eps=cfg.eps,
        norm=int(cfg.norm_by_std),
        ddof=int(cfg.ddof),
        METHOD=int(method),
        TOKEN_REWARDS=token,
        LEN_SOURCE=int(len_source),
        CONTIGUOUS=contiguous,
        WRITE_RAW=raw is not None,
        WRITE_W=w_out is not None,
        BLOCK=GROUP_BLOCK,
        BLOCK_R=ROW_BLOCK_R,
        BLOCK_T=ROW_BLOCK_T,
        num_warps=4,
    )


def gaussian_rank(keys, runs, adv) -> None:
    """Launches gaussian_rank_kernel: ``runs`` from lenkernels/_grouping.py's (group, score) segmentation."""
    gaussian_rank_kernel[(persistent_grid(keys.shape[0], keys.device),)](
        scores_ptr=keys,
        perm_ptr=runs.perm,
        group_of_ptr=runs.group_of,
        group_offsets_ptr=runs.group_offsets,
        run_offsets_ptr=runs.run_offsets,
        n_runs_ptr=runs.n_runs,
        adv_ptr=adv,
        BLOCK=GROUP_BLOCK,
        num_warps=4,
    )


def batch_shift_scale(x, w, cfg, stats) -> None:
    """stats = (shift, scale) [2] fp32 of the batch-level step, from x [B] and optional weights w [B]."""
    method = Method(cfg.method)
    if method not in _grouping.GLOBAL_METHODS:
        raise ValueError(f"the batch-level step is that of batch or reinforce_pp_baseline, got method {method.name}")
    if w is not None:
        _grouping.weight_code(w, "weights")
    n = x.shape[0]
    n_chunks = triton.cdiv(n, _MOMENT_CHUNK)
    partial = torch.empty((n_chunks, 4), dtype=torch.float32, device=x.device)
    batch_moments_kernel[(n_chunks,)](
        x_ptr=x,
        w_ptr=w if w is not None else x,
        partial_ptr=partial,
        n=n,
        chunk=_MOMENT_CHUNK,
        HAS_W=w is not None,
        BLOCK=_BROADCAST_BLOCK,
        num_warps=4,
    )
    batch_moments_finalize_kernel[(1,)](
        partial_ptr=partial, stats_ptr=stats, n_chunks=n_chunks, eps=cfg.eps, METHOD=int(method), num_warps=1
    )


def broadcast(adv, stats, mask, out) -> None:
    """out = (adv - shift) * scale (when stats is given), times the mask when given (masked = 0)."""
    n = adv.shape[0]
    none = dummy(adv.device)
    if mask is not None:
        _grouping.weight_code(mask, "mask")
        T = mask.shape[1]
        grid = (n, triton.cdiv(T, _BROADCAST_BLOCK))
    else:
        T = 1
        grid = (triton.cdiv(n, _BROADCAST_BLOCK),)
    advantages_broadcast_kernel[grid](
        adv_ptr=adv,
        stats_ptr=stats if stats is not None else none,
        mask_ptr=mask if mask is not None else none,
        out_ptr=out,
        n_rows=n,
        T=T,
        stride_m=mask.stride(0) if mask is not None else 0,
        stride_o=out.stride(0) if mask is not None else 0,
        GLOBAL=stats is not None,
        HAS_MASK=mask is not None,
        BLOCK=_BROADCAST_BLOCK,
        num_warps=4,
    )


group_stats_step = _group_stats.group_stats_step

_STAGES = _grouping.Stages(group_step, gaussian_rank, batch_shift_scale, broadcast, group_stats_step)
# the family's launchers (group_advantages_fwd, group_stats_fwd) over the stages above
group_advantages_fwd, group_stats_fwd = _grouping.launchers(_STAGES)


# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(method, *, token=False, grouped=True, mask=None, lengths=False, rewards=torch.float32):
    """group_advantages_fwd on a small CPU batch: 8 responses (T = 16 tokens) in groups of 4, by
    ids (``grouped``) or contiguous; ``mask``: its dtype, or None; ``lengths``: a [B] fp32 tensor."""

    def run():
        from lenkernels.ops.advantages import AdvantageConfig

        n, t = 8, 16
        m = torch.ones((n, t), dtype=mask) if mask is not None else None
        out = torch.empty((n, t) if mask is not None else (n,), dtype=torch.float32)
        group_advantages_fwd(
            torch.zeros((n, t) if token else (n,), dtype=rewards), torch.arange(n) % 2 if grouped else None, 4, m,
            torch.full((n,), float(t)) if lengths else None, None, AdvantageConfig(method, 1e-6, True, True), out,
        )  # fmt: skip

    return run


# the group kernel of every method family (token / scalar rewards, both layouts, each length source),
# and through the global methods the batch moments, their finalize and the broadcast variants
AOT_CASES = [
    _aot_case(Method.GRPO, token=True, rewards=torch.bfloat16),
    _aot_case(Method.GRPO, grouped=False, mask=torch.bool),  # + broadcast of a bool mask
    _aot_case(Method.RLOO),
    _aot_case(Method.GRPO_PASSK),
    _aot_case(Method.OPO, token=True, mask=torch.int64),  # length from the mask's row sums
    _aot_case(Method.OPO, grouped=False, lengths=True),
    _aot_case(Method.REINFORCE_PP_BASELINE, mask=torch.int64),  # weighted moments, global broadcast
    _aot_case(Method.BATCH, token=True, grouped=False),  # raw scores, unweighted moments, [B] broadcast
    _aot_case(Method.GAUSSIAN),
]
