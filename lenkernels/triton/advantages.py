"""Triton kernels for group advantages (SPEC 4) and the per-group statistics behind
``lenkernels.shaping``; the maths mirrors ``csrc/include/lenkernels/advantages.h``.

Segmented layout, prepared on the device by ``lenkernels/ops/advantages.py`` (sorts and scans, no
host sync):
  perm[B]          sorted position -> response index (responses stably sorted by group id)
  offsets          group g owns sorted positions offsets[g] .. offsets[g + 1] - 1 (offsets[n_groups] = B;
                   B + 1 entries on a GPU, so no size depends on the data)
  n_groups[1]      number of groups, a device scalar: grids are bounded on the host, programs loop
                   ``for g in range(pid, n_groups, num_programs)``
Contiguous groups (an int group size) need neither perm nor offsets (``CONTIGUOUS``).

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
  group_stats_kernel             count / sum / mean / std / min / max of the selected members of each
                                 group (several columns at once), broadcast back to the members
Every reduction runs in a fixed order inside one program: no atomics, bitwise reproducible. Means
and variances are formed of the values times 2^-e, 2^e the power of two of the set's largest
magnitude, then multiplied back (exact): no sum or square overflows or underflows where the mean and
the std are representable (advantages.h, "power-of-two scaling").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels.triton.utils import program_target

# method codes: csrc/include/lenkernels/advantages.h
GRPO, DR_GRPO, RLOO, REINFORCE_PP, BATCH, GAUSSIAN, PASSK, OPO = range(8)
WHITEN_EPS = 1e-8
_BLOCK = 128  # members per step of a group loop
_BLOCK_R, _BLOCK_T = 4, 512  # row-sum tile: responses x tokens
_MOMENT_CHUNK = 4096  # elements per program of the batch moments (fixed: results do not depend on the GPU)
_BROADCAST_BLOCK = 1024


# --- shared device helpers --------------------------------------------------------------------


@triton.jit
def _group_bounds(g, offsets_ptr, group_size, CONTIGUOUS: tl.constexpr):
    if CONTIGUOUS:
        gs = g * group_size
        ge = gs + group_size
    else:
        gs = tl.load(offsets_ptr + g)
        ge = tl.load(offsets_ptr + g + 1)
    return gs, ge


@triton.jit
def _rows(pos, valid, perm_ptr, CONTIGUOUS: tl.constexpr):
    if CONTIGUOUS:
        rows = pos
    else:
        rows = tl.load(perm_ptr + pos, mask=valid, other=0)
    return rows


@triton.jit
def _scores(pos, valid, rows, rewards_ptr, score_buf_ptr, TOKEN_REWARDS: tl.constexpr):
    if TOKEN_REWARDS:
        s = tl.load(score_buf_ptr + pos, mask=valid, other=0.0)
    else:
        s = tl.load(rewards_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    return s


@triton.jit
def _weights(pos, valid, rows, lengths_ptr, len_buf_ptr, LEN_SOURCE: tl.constexpr):
    """Response lengths: row sums of the mask (1), a lengths tensor (2), or 1 each (0)."""
    if LEN_SOURCE == 1:
        w = tl.load(len_buf_ptr + pos, mask=valid, other=0.0)
    elif LEN_SOURCE == 2:
        w = tl.load(lengths_ptr + rows, mask=valid, other=0).to(tl.float32)
    else:
        w = tl.where(valid, 1.0, 0.0)
    return w


@triton.jit
def _row_sums(
    gs, ge, perm_ptr, rewards_ptr, mask_ptr, score_buf_ptr, len_buf_ptr, T, stride_r, stride_m,
    TOKEN_REWARDS: tl.constexpr, MASK_LEN: tl.constexpr, CONTIGUOUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Scores (sum of every position's token reward, verl) and lengths (sum of the mask) of the
    group's members -> scratch in sorted order. Lanes accumulate along T, then one tree sum."""
    for start in range(gs, ge, BLOCK_R):
        pos = start + tl.arange(0, BLOCK_R)
        valid = pos < ge
        rows = _rows(pos, valid, perm_ptr, CONTIGUOUS)
        acc_s = tl.zeros([BLOCK_R, BLOCK_T], tl.float32)
        acc_l = tl.zeros([BLOCK_R, BLOCK_T], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tile = valid[:, None] & (t[None, :] < T)
            if TOKEN_REWARDS:
                acc_s += tl.load(rewards_ptr + rows[:, None] * stride_r + t[None, :], mask=tile, other=0.0).to(tl.float32)
            if MASK_LEN:
                acc_l += tl.load(mask_ptr + rows[:, None] * stride_m + t[None, :], mask=tile, other=0).to(tl.float32)
        if TOKEN_REWARDS:
            tl.store(score_buf_ptr + pos, tl.sum(acc_s, 1), mask=valid)
        if MASK_LEN:
            tl.store(len_buf_ptr + pos, tl.sum(acc_l, 1), mask=valid)


@triton.jit
def _pow2(e):
    """2^e for int32 -126 <= e <= 127, exactly (built from its bits; advantages.h pow2f)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_exponent(max_abs):
    """e with 2^e <= max_abs < 2^(e + 1), clamped to [-126, 126] (advantages.h scale_exponent): the sums
    and squares of a set are formed of x * 2^-e (|x * 2^-e| < 2, no overflow or underflow) and the mean
    and std multiplied back by 2^e, exactly (powers of two scale every rounding with them)."""
    e = ((max_abs.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.minimum(tl.maximum(e, -126), 126)


@triton.jit
def _abs_or_zero(x, keep):
    """|x| where keep and x is not NaN, else 0: the terms of a NaN-skipping maximum of |x|."""
    a = tl.abs(x)
    return tl.where(keep & (a == a), a, 0.0)


@triton.jit
def _scale_down(x, k):
    """x * 2^k for -504 <= k <= 0 in steps of normal powers of two (advantages.h scale_down)."""
    for _ in tl.static_range(4):
        step = tl.maximum(k, -126)
        x = x * _pow2(step)
        k = k - step
    return x


@triton.jit
def _scaled(d, std, eps):
    """d / (std + eps), exactly 0 for d == 0 (all-equal groups stay 0 even with eps = 0)."""
    return tl.where(d == 0.0, 0.0, d / (std + eps))


@triton.jit
def _member_advantage(s, baseline, std, n, eps, norm, METHOD: tl.constexpr):
    d = s - baseline
    if METHOD == 0:  # grpo
        a = tl.where(norm != 0, _scaled(d, std, eps), d)
    elif METHOD == 2:  # rloo: s - mean of the others = n / (n - 1) (s - mean); a group of one keeps s
        a = tl.where(n <= 1.0, s, d * n / (n - 1.0))
    else:  # dr_grpo, reinforce_pp_baseline, batch, opo (batch-level scaling comes later)
        a = d
    return a


@triton.jit
def norm_ppf_lower(p):
    """Inverse standard normal CDF for 0 < p <= 0.5 in float64 (Acklam's rational approximation,
    relative error < 1.2e-9); float32 loses ~1e-4 near p = 0.025 to cancellation."""
    q = tl.sqrt(-2.0 * tl.log(p))
    tail_num = ((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e00) * q
                 - 2.549732539343734e00) * q + 4.374664141464968e00) * q + 2.938163982698783e00
    tail_den = (((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e00) * q
                + 3.754408661907416e00) * q + 1.0
    c = p - 0.5
    r = c * c
    mid_num = (((((-3.969683028665376e01 * r + 2.209460984245205e02) * r - 2.759285104469687e02) * r
                 + 1.383577518672690e02) * r - 3.066479806614716e01) * r + 2.506628277459239e00) * c
    mid_den = ((((-5.447609879822406e01 * r + 1.615858368580409e02) * r - 1.556989798598866e02) * r
                + 6.680131188771972e01) * r - 1.328068155288572e01) * r + 1.0
    return tl.where(p < 0.02425, tail_num / tail_den, mid_num / mid_den)  # fmt: skip


@triton.jit
def rank_normal_score(k, n):
    """Phi^-1((k - 0.5) / n) for 1-based ranks k (int64): ranks k and n + 1 - k share p, so the map
    is exactly antisymmetric and the middle rank is exactly 0."""
    mirror = n + 1 - k
    j = tl.minimum(k, mirror)
    v = norm_ppf_lower((j.to(tl.float64) - 0.5) / n.to(tl.float64))
    return tl.where(k > mirror, -v, v)


# --- group advantages ----------------------------------------------------------------------------


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
    LEN_SOURCE: tl.constexpr,  # 0: none, 1: row sums of the mask, 2: the lengths tensor
    CONTIGUOUS: tl.constexpr,
    WRITE_RAW: tl.constexpr,
    WRITE_W: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    n_groups = tl.load(n_groups_ptr)
    for g in range(pid, n_groups, nprog):
        gs, ge = _group_bounds(g, offsets_ptr, group_size, CONTIGUOUS)
        if TOKEN_REWARDS | (LEN_SOURCE == 1):
            _row_sums(gs, ge, perm_ptr, rewards_ptr, mask_ptr, score_buf_ptr, len_buf_ptr, T, stride_r, stride_m,
                      TOKEN_REWARDS, LEN_SOURCE == 1, CONTIGUOUS, BLOCK_R, BLOCK_T)  # fmt: skip
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
            pos = start + tl.arange(0, BLOCK)
            valid = pos < ge
            rows = _rows(pos, valid, perm_ptr, CONTIGUOUS)
            s = _scores(pos, valid, rows, rewards_ptr, score_buf_ptr, TOKEN_REWARDS)
            acc_abs = tl.maximum(acc_abs, _abs_or_zero(s, valid))
        e = _scale_exponent(tl.max(acc_abs, 0))
        down = _pow2(-e)
        up = _pow2(e)
        shift = shift * down

        # pass 1: sum of (s - shift); opo: length-weighted sums; pass@k: max and NaN count
        acc_d = tl.zeros([BLOCK], tl.float32)
        acc_wd = tl.zeros([BLOCK], tl.float32)
        acc_w = tl.zeros([BLOCK], tl.float32)
        acc_max = tl.full([BLOCK], float("-inf"), tl.float32)
        acc_nan = tl.zeros([BLOCK], tl.int32)
        for start in range(gs, ge, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < ge
            rows = _rows(pos, valid, perm_ptr, CONTIGUOUS)
            s = _scores(pos, valid, rows, rewards_ptr, score_buf_ptr, TOKEN_REWARDS)
            d = tl.where(valid, s * down - shift, 0.0)
            acc_d += d
            if METHOD == 7:  # opo
                w = _weights(pos, valid, rows, lengths_ptr, len_buf_ptr, LEN_SOURCE)
                acc_wd += w * d
                acc_w += w
            if METHOD == 6:  # grpo_passk
                acc_max = tl.maximum(acc_max, tl.where(valid, s, float("-inf")))
                acc_nan += tl.where(valid & (s != s), 1, 0)
        mean_s = shift + tl.sum(acc_d, 0) / n  # of s * 2^-e
        mean = mean_s * up
        if METHOD == 7:
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
        if (METHOD == 0) | (METHOD == 6):
            for start in range(gs, ge, BLOCK):
                pos = start + tl.arange(0, BLOCK)
                valid = pos < ge
                rows = _rows(pos, valid, perm_ptr, CONTIGUOUS)
                s = _scores(pos, valid, rows, rewards_ptr, score_buf_ptr, TOKEN_REWARDS)
                c = tl.where(valid, s * down - mean_s, 0.0)
                acc_m2 += c * c
                if METHOD == 6:
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
            pos = start + tl.arange(0, BLOCK)
            valid = pos < ge
            rows = _rows(pos, valid, perm_ptr, CONTIGUOUS)
            s = _scores(pos, valid, rows, rewards_ptr, score_buf_ptr, TOKEN_REWARDS)
            if METHOD == 6:
                gap = r_max - r_second
                a = tl.where(pos == best, tl.where(norm != 0, _scaled(gap, std, eps), gap), 0.0)
                a = tl.where(has_nan, float("nan"), a)
            else:
                a = _member_advantage(s, baseline, std, n, eps, norm, METHOD)
            tl.store(adv_ptr + rows, a, mask=valid)
            if WRITE_RAW:
                tl.store(raw_ptr + rows, s, mask=valid)
            if WRITE_W:
                tl.store(w_out_ptr + rows, _weights(pos, valid, rows, lengths_ptr, len_buf_ptr, LEN_SOURCE), mask=valid)


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
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    n_runs = tl.load(n_runs_ptr)
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
        offs = i + tl.arange(0, BLOCK)
        valid = offs < end
        x = tl.load(x_ptr + offs, mask=valid, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=valid, other=0).to(tl.float32)
        else:
            w = tl.where(valid, 1.0, 0.0)
        acc_w += w
        acc_abs = tl.maximum(acc_abs, _abs_or_zero(x, w != 0.0))
    wsum = tl.sum(acc_w, 0)
    e = _scale_exponent(tl.max(acc_abs, 0))  # the chunk's moments are those of x * 2^-e
    down = _pow2(-e)
    acc_wx = tl.zeros([BLOCK], tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        valid = offs < end
        x = tl.load(x_ptr + offs, mask=valid, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=valid, other=0).to(tl.float32)
        else:
            w = tl.where(valid, 1.0, 0.0)
        acc_wx += tl.where(w != 0.0, w * (x * down), 0.0)
    mean = tl.where(wsum > 0.0, tl.sum(acc_wx, 0) / wsum, 0.0)
    acc_m2 = tl.zeros([BLOCK], tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        valid = offs < end
        x = tl.load(x_ptr + offs, mask=valid, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=valid, other=0).to(tl.float32)
        else:
            w = tl.where(valid, 1.0, 0.0)
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
        ma = _scale_down(mean, e - e_new)
        m2a = _scale_down(m2, 2 * (e - e_new))
        mb_new = _scale_down(mb, eb - e_new)
        m2b_new = _scale_down(m2b, 2 * (eb - e_new))
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
    up = _pow2(e)
    if METHOD == 3:  # reinforce_pp_baseline: verl's masked_whiten
        shift = mean * up
        var_x = var * up * up
        # a var past fp32's range swamps the 1e-8: 1 / std from the scaled var
        past = (var_x > 3.4028234663852886e38) & (var <= 3.4028234663852886e38)
        scale = tl.where(past, 1.0 / tl.sqrt(var) * _pow2(-e), 1.0 / tl.sqrt(var_x + 1e-8))
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


# --- per-group statistics for lenkernels.shaping ---------------------------------------------------


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
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    n_groups = tl.load(n_groups_ptr)
    col = tl.arange(0, C_PAD)
    for g in range(pid, n_groups, nprog):
        gs, ge = _group_bounds(g, offsets_ptr, group_size, CONTIGUOUS)
        if MASK_LEN:
            _row_sums(gs, ge, perm_ptr, values_ptr, mask_ptr, len_buf_ptr, len_buf_ptr, T, 0, stride_m,
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
        e = _scale_exponent(tl.where(big == big, big, 0.0))
        down = _pow2(-e)
        shift = tl.where(k > 0.0, hi * down, 0.0)
        acc_d = tl.zeros([BLOCK, C_PAD], tl.float32)
        for start in range(gs, ge, BLOCK):
            x, sel, rows, pos, valid = _stat_tile(start, ge, col, values_ptr, where_ptr, perm_ptr, len_buf_ptr,
                                                  C_IN, C_OUT, HAS_WHERE, MASK_LEN, CONTIGUOUS, BLOCK)  # fmt: skip
            acc_d += tl.where(sel != 0.0, x * down[None, :] - shift[None, :], 0.0)
        mean_s = tl.where(k > 0.0, shift + tl.sum(acc_d, 0) / tl.maximum(k, 1.0), 0.0)
        mean = mean_s * _pow2(e)
        # pass 3: unbiased std (0 with fewer than two selected)
        acc_m2 = tl.zeros([BLOCK, C_PAD], tl.float32)
        for start in range(gs, ge, BLOCK):
            x, sel, rows, pos, valid = _stat_tile(start, ge, col, values_ptr, where_ptr, perm_ptr, len_buf_ptr,
                                                  C_IN, C_OUT, HAS_WHERE, MASK_LEN, CONTIGUOUS, BLOCK)  # fmt: skip
            c = x * down[None, :] - mean_s[None, :]
            acc_m2 += tl.where(sel != 0.0, c * c, 0.0)
        std = tl.where(k >= 2.0, tl.sqrt(tl.sum(acc_m2, 0) / tl.maximum(k - 1.0, 1.0)) * _pow2(e), 0.0)
        std = tl.where(has_nan, float("nan"), std)
        # pass 4: broadcast to the members
        for start in range(gs, ge, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < ge
            rows = _rows(pos, valid, perm_ptr, CONTIGUOUS)
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
    rows = _rows(pos, valid, perm_ptr, CONTIGUOUS)
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


# --- host launchers ------------------------------------------------------------------------------


def _dummy(device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


def _persistent_grid(bound: int, device: torch.device) -> int:
    """Programs for a loop over groups/runs whose count is only known on the device (<= bound)."""
    return max(1, min(bound, 4 * program_target(device)))


def group_advantages(rewards, mask, lengths, seg, method, eps, norm, ddof, adv, raw=None, w_out=None):
    """Launches group_advantages_kernel. ``seg``: the segmentation of ops/advantages.py; writes adv
    [B] (and raw scores / lengths in response order when given)."""
    n = rewards.shape[0]
    device = rewards.device
    token = rewards.dim() == 2
    T = rewards.shape[1] if token else (mask.shape[1] if mask is not None else 0)
    if method not in (OPO, REINFORCE_PP):  # only these weight by length
        len_source = 0
    else:
        len_source = 2 if lengths is not None else (1 if mask is not None else 0)
    need_len_buf = len_source == 1
    score_buf = torch.empty(n if token else 1, dtype=torch.float32, device=device)
    len_buf = torch.empty(n if need_len_buf else 1, dtype=torch.float32, device=device)
    contiguous = seg.perm is None
    dummy = _dummy(device)
    group_advantages_kernel[(_persistent_grid(seg.bound, device),)](
        rewards_ptr=rewards,
        mask_ptr=mask if need_len_buf else dummy,
        lengths_ptr=lengths if lengths is not None else dummy,
        perm_ptr=dummy if contiguous else seg.perm,
        offsets_ptr=dummy if contiguous else seg.offsets,
        n_groups_ptr=seg.n_groups,
        score_buf_ptr=score_buf,
        len_buf_ptr=len_buf,
        adv_ptr=adv,
        raw_ptr=raw if raw is not None else dummy,
        w_out_ptr=w_out if w_out is not None else dummy,
        T=T,
        stride_r=rewards.stride(0) if token else 0,
        stride_m=mask.stride(0) if need_len_buf else 0,
        group_size=seg.group_size,
        eps=eps,
        norm=int(norm),
        ddof=ddof,
        METHOD=method,
        TOKEN_REWARDS=token,
        LEN_SOURCE=len_source,
        CONTIGUOUS=contiguous,
        WRITE_RAW=raw is not None,
        WRITE_W=w_out is not None,
        BLOCK=_BLOCK,
        BLOCK_R=_BLOCK_R,
        BLOCK_T=_BLOCK_T,
        num_warps=4,
    )


def gaussian_rank(scores, runs, adv):
    """Launches gaussian_rank_kernel: ``runs`` from ops/advantages.py's (group, score) segmentation."""
    gaussian_rank_kernel[(_persistent_grid(scores.shape[0], scores.device),)](
        scores_ptr=scores,
        perm_ptr=runs.perm,
        group_of_ptr=runs.group_of,
        group_offsets_ptr=runs.group_offsets,
        run_offsets_ptr=runs.run_offsets,
        n_runs_ptr=runs.n_runs,
        adv_ptr=adv,
        BLOCK=_BLOCK,
        num_warps=4,
    )


def batch_shift_scale(x, w, method, eps) -> torch.Tensor:
    """(shift, scale) [2] fp32 of the batch-level step, from x [B] and optional weights w [B]."""
    n = x.shape[0]
    n_chunks = triton.cdiv(n, _MOMENT_CHUNK)
    partial = torch.empty((n_chunks, 4), dtype=torch.float32, device=x.device)
    stats = torch.empty(2, dtype=torch.float32, device=x.device)
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
        partial_ptr=partial, stats_ptr=stats, n_chunks=n_chunks, eps=eps, METHOD=method, num_warps=1
    )
    return stats


def broadcast(adv, stats, mask, out):
    """out = (adv - shift) * scale (when stats is given), times the mask when given (masked = 0)."""
    n = adv.shape[0]
    dummy = _dummy(adv.device)
    if mask is not None:
        T = mask.shape[1]
        grid = (n, triton.cdiv(T, _BROADCAST_BLOCK))
    else:
        T = 1
        grid = (triton.cdiv(n, _BROADCAST_BLOCK),)
    advantages_broadcast_kernel[grid](
        adv_ptr=adv,
        stats_ptr=stats if stats is not None else dummy,
        mask_ptr=mask if mask is not None else dummy,
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


def group_stats(values, where, mask, seg, stats, lengths):
    """Launches group_stats_kernel: values [B, C_IN] fp32, where [B, C_OUT] fp32 or None, mask
    [B, T] or None; writes stats [B, C_OUT, 6] and lengths [B] (when mask is given)."""
    n, c_in = values.shape
    c_out = stats.shape[1]
    device = values.device
    contiguous = seg.perm is None
    dummy = _dummy(device)
    len_buf = torch.empty(n if mask is not None else 1, dtype=torch.float32, device=device)
    group_stats_kernel[(_persistent_grid(seg.bound, device),)](
        values_ptr=values,
        where_ptr=where if where is not None else dummy,
        mask_ptr=mask if mask is not None else dummy,
        perm_ptr=dummy if contiguous else seg.perm,
        offsets_ptr=dummy if contiguous else seg.offsets,
        n_groups_ptr=seg.n_groups,
        len_buf_ptr=len_buf,
        lengths_ptr=lengths if lengths is not None else dummy,
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
        BLOCK=_BLOCK // 2,
        BLOCK_R=_BLOCK_R,
        BLOCK_T=_BLOCK_T,
        num_warps=4,
    )


_GROUP_SIG = {
    "rewards_ptr": "*fp32", "mask_ptr": "*i64", "lengths_ptr": "*fp32", "perm_ptr": "*i64", "offsets_ptr": "*i64",
    "n_groups_ptr": "*i64", "score_buf_ptr": "*fp32", "len_buf_ptr": "*fp32", "adv_ptr": "*fp32", "raw_ptr": "*fp32",
    "w_out_ptr": "*fp32", "T": "i32", "stride_r": "i64", "stride_m": "i64", "group_size": "i32", "eps": "fp32",
    "norm": "i32", "ddof": "i32", "METHOD": "constexpr", "TOKEN_REWARDS": "constexpr", "LEN_SOURCE": "constexpr",
    "CONTIGUOUS": "constexpr", "WRITE_RAW": "constexpr", "WRITE_W": "constexpr", "BLOCK": "constexpr",
    "BLOCK_R": "constexpr", "BLOCK_T": "constexpr",
}
_BLOCKS = {"BLOCK": _BLOCK, "BLOCK_R": _BLOCK_R, "BLOCK_T": _BLOCK_T}


def _group_spec(method, token, len_source, contiguous, raw=False, w=False, rewards="fp32"):
    return {
        "kernel": group_advantages_kernel,
        "signature": {**_GROUP_SIG, "rewards_ptr": f"*{rewards}"},
        "constexprs": {"METHOD": method, "TOKEN_REWARDS": token, "LEN_SOURCE": len_source, "CONTIGUOUS": contiguous,
                       "WRITE_RAW": raw, "WRITE_W": w, **_BLOCKS},
        "num_warps": 4,
    }  # fmt: skip


AOT_SPECS = [
    _group_spec(GRPO, True, 0, False, rewards="bf16"),
    _group_spec(GRPO, False, 0, True),
    _group_spec(RLOO, False, 0, False),
    _group_spec(PASSK, False, 0, False),
    _group_spec(OPO, True, 1, False),
    _group_spec(OPO, False, 2, True),
    _group_spec(REINFORCE_PP, False, 1, False, w=True),
    _group_spec(BATCH, True, 0, True, raw=True),
    {
        "kernel": gaussian_rank_kernel,
        "signature": {"scores_ptr": "*fp32", "perm_ptr": "*i64", "group_of_ptr": "*i64", "group_offsets_ptr": "*i64",
                      "run_offsets_ptr": "*i64", "n_runs_ptr": "*i64", "adv_ptr": "*fp32", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": _BLOCK},
        "num_warps": 4,
    },
] + [
    {
        "kernel": batch_moments_kernel,
        "signature": {"x_ptr": "*fp32", "w_ptr": w, "partial_ptr": "*fp32", "n": "i32", "chunk": "i32",
                      "HAS_W": "constexpr", "BLOCK": "constexpr"},
        "constexprs": {"HAS_W": has_w, "BLOCK": _BROADCAST_BLOCK},
        "num_warps": 4,
    }
    for w, has_w in (("*fp32", False), ("*fp32", True))
] + [
    {
        "kernel": batch_moments_finalize_kernel,
        "signature": {"partial_ptr": "*fp32", "stats_ptr": "*fp32", "n_chunks": "i32", "eps": "fp32",
                      "METHOD": "constexpr"},
        "constexprs": {"METHOD": method},
        "num_warps": 1,
    }
    for method in (REINFORCE_PP, BATCH)
] + [
    {
        "kernel": advantages_broadcast_kernel,
        "signature": {"adv_ptr": "*fp32", "stats_ptr": "*fp32", "mask_ptr": mask, "out_ptr": "*fp32", "n_rows": "i32",
                      "T": "i32", "stride_m": "i64", "stride_o": "i64", "GLOBAL": "constexpr", "HAS_MASK": "constexpr",
                      "BLOCK": "constexpr"},
        "constexprs": {"GLOBAL": glob, "HAS_MASK": has_mask, "BLOCK": _BROADCAST_BLOCK},
        "num_warps": 4,
    }
    for mask, glob, has_mask in (("*i1", False, True), ("*i64", True, True), ("*fp32", True, False))
] + [
    {
        "kernel": group_stats_kernel,
        "signature": {"values_ptr": "*fp32", "where_ptr": "*fp32", "mask_ptr": "*i1", "perm_ptr": "*i64",
                      "offsets_ptr": "*i64", "n_groups_ptr": "*i64", "len_buf_ptr": "*fp32", "lengths_ptr": "*fp32",
                      "stats_ptr": "*fp32", "T": "i32", "stride_m": "i64", "group_size": "i32", "C_IN": "constexpr",
                      "C_OUT": "constexpr", "C_PAD": "constexpr", "HAS_WHERE": "constexpr", "MASK_LEN": "constexpr",
                      "CONTIGUOUS": "constexpr", "BLOCK": "constexpr", "BLOCK_R": "constexpr", "BLOCK_T": "constexpr"},
        "constexprs": {"C_IN": 2, "C_OUT": 3, "C_PAD": 4, "HAS_WHERE": True, "MASK_LEN": True, "CONTIGUOUS": contiguous,
                       "BLOCK": _BLOCK // 2, "BLOCK_R": _BLOCK_R, "BLOCK_T": _BLOCK_T},
        "num_warps": 4,
    }
    for contiguous in (False, True)
]  # fmt: skip
