"""Device functions shared by the group kernels (``triton/advantages.py``, ``triton/group_stats.py``):
access to the segmented layout of ``lenkernels/_grouping.py`` and the maths of
``csrc/include/lenkernels/advantages.h``, its Triton twin.

Segmented layout (sorts and scans on the device, no host sync):
  perm[B]          sorted position -> response index (responses stably sorted by group id)
  offsets          group g owns sorted positions offsets[g] .. offsets[g + 1] - 1 (offsets[n_groups] = B;
                   B + 1 entries on a GPU, so no size depends on the data)
  n_groups[1]      number of groups, a device scalar: grids are bounded on the host, programs loop
                   ``for g in range(pid, n_groups, num_programs)``
Contiguous groups (an int group size) need neither perm nor offsets (``CONTIGUOUS``).

Means and variances are formed of the values times 2^-e, 2^e the power of two of the set's largest
magnitude, then multiplied back (exact): no sum or square overflows or underflows where the mean and
the std are representable (advantages.h, "power-of-two scaling").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels._codes import LenSource, Method
from lenkernels.triton.utils import constexprs, program_target

METHODS = constexprs(Method)
LEN_SOURCES = constexprs(LenSource)

GROUP_BLOCK = 128  # members per step of a group loop
ROW_BLOCK_R, ROW_BLOCK_T = 4, 512  # row-sum tile: responses x tokens


# --- launch planning ----------------------------------------------------------------------------


def dummy(device) -> torch.Tensor:
    """A stand-in for an absent optional pointer (never read: its constexpr flag is off)."""
    return torch.empty(1, dtype=torch.float32, device=device)


def persistent_grid(bound: int, device: torch.device) -> int:
    """Programs for a loop over groups/runs whose count is only known on the device (<= bound)."""
    return max(1, min(bound, 4 * program_target(device)))


# --- the segmented layout -------------------------------------------------------------------------


@triton.jit
def group_bounds(g, offsets_ptr, group_size, CONTIGUOUS: tl.constexpr):
    if CONTIGUOUS:
        gs = g * group_size
        ge = gs + group_size
    else:
        gs = tl.load(offsets_ptr + g)
        ge = tl.load(offsets_ptr + g + 1)
    return gs, ge


@triton.jit
def member_rows(pos, valid, perm_ptr, CONTIGUOUS: tl.constexpr):
    if CONTIGUOUS:
        rows = pos
    else:
        rows = tl.load(perm_ptr + pos, mask=valid, other=0)
    return rows


@triton.jit
def member_scores(pos, valid, rows, rewards_ptr, score_buf_ptr, TOKEN_REWARDS: tl.constexpr):
    if TOKEN_REWARDS:
        s = tl.load(score_buf_ptr + pos, mask=valid, other=0.0)
    else:
        s = tl.load(rewards_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    return s


@triton.jit
def member_weights(pos, valid, rows, lengths_ptr, len_buf_ptr, LEN_SOURCE: tl.constexpr):
    """Response lengths: row sums of the mask (LEN_MASK), a lengths tensor (LEN_TENSOR), or 1 each."""
    if LEN_SOURCE == LEN_SOURCES.LEN_MASK:
        w = tl.load(len_buf_ptr + pos, mask=valid, other=0.0)
    elif LEN_SOURCE == LEN_SOURCES.LEN_TENSOR:
        w = tl.load(lengths_ptr + rows, mask=valid, other=0).to(tl.float32)
    else:
        w = tl.where(valid, 1.0, 0.0)
    return w


@triton.jit
def row_sums(
    gs, ge, perm_ptr, rewards_ptr, mask_ptr, score_buf_ptr, len_buf_ptr, T, stride_r, stride_m,
    TOKEN_REWARDS: tl.constexpr, MASK_LEN: tl.constexpr, CONTIGUOUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Scores (sum of every position's token reward, verl) and lengths (sum of the mask) of the
    group's members -> scratch in sorted order. Lanes accumulate along T, then one tree sum."""
    for start in range(gs, ge, BLOCK_R):
        pos = start + tl.arange(0, BLOCK_R)
        valid = pos < ge
        rows = member_rows(pos, valid, perm_ptr, CONTIGUOUS)
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


# --- power-of-two scaling and member advantages (advantages.h) ---------------------------------------


@triton.jit
def pow2(e):
    """2^e for int32 -126 <= e <= 127, exactly (built from its bits; advantages.h pow2f)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def scale_exponent(max_abs):
    """e with 2^e <= max_abs < 2^(e + 1), clamped to [-126, 126] (advantages.h scale_exponent): the sums
    and squares of a set are formed of x * 2^-e (|x * 2^-e| < 2, no overflow or underflow) and the mean
    and std multiplied back by 2^e, exactly (powers of two scale every rounding with them)."""
    e = ((max_abs.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.minimum(tl.maximum(e, -126), 126)


@triton.jit
def abs_or_zero(x, keep):
    """|x| where keep and x is not NaN, else 0: the terms of a NaN-skipping maximum of |x|."""
    a = tl.abs(x)
    return tl.where(keep & (a == a), a, 0.0)


@triton.jit
def scale_down(x, k):
    """x * 2^k for -504 <= k <= 0 in steps of normal powers of two (advantages.h scale_down)."""
    for _ in tl.static_range(4):
        step = tl.maximum(k, -126)
        x = x * pow2(step)
        k = k - step
    return x


@triton.jit
def scaled(d, std, eps):
    """d / (std + eps), exactly 0 for d == 0 (all-equal groups stay 0 even with eps = 0)."""
    return tl.where(d == 0.0, 0.0, d / (std + eps))


@triton.jit
def member_advantage(s, baseline, std, n, eps, norm, METHOD: tl.constexpr):
    d = s - baseline
    if METHOD == METHODS.GRPO:
        a = tl.where(norm != 0, scaled(d, std, eps), d)
    elif METHOD == METHODS.RLOO:  # s - mean of the others = n / (n - 1) (s - mean); a group of one keeps s
        a = tl.where(n <= 1.0, s, d * n / (n - 1.0))
    else:  # dr_grpo, reinforce_pp_baseline, batch, opo (batch-level scaling comes later)
        a = d
    return a


# --- the rank -> normal map of G^2RPO (gaussian) -------------------------------------------------------


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
