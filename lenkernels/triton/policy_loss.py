"""Triton kernels for the fused policy losses and KL estimators (SPEC 2-3).

The per-token maths is the Triton twin of ``csrc/include/lenkernels/policy_loss.h`` (same names,
same layouts of the partial sums and statistics). Work is split per sequence: program (b, s) of
grid (B, n_splits) walks the tiles s, s + n_splits, ... of sequence b (padded row b, or the packed
range cu_seqlens[b]:cu_seqlens[b+1]), so sequence sums never need atomics.

Forward, up to three launches:
  policy_loss_seq_kernel       only for GSPO/LUSPO/GMPO or a seq-mean aggregation: per-sequence
                               partial sums (tokens, log-ratio, ...) -> seq_part[B, n_splits, 8]
  policy_loss_fwd_kernel       merges a sequence's partials left to right, computes every token's
                               loss terms and flags, writes one row of partial sums per program
                               -> part[B * n_splits, 16] (and the per-sequence values seq[B, 4])
  policy_loss_finalize_kernel  one program: reduces the partial rows in a fixed order into the
                               loss, the metrics and 1 / normaliser -> stats[16]
Backward, one launch:
  policy_loss_bwd_kernel       d loss / d logprobs and d loss / d entropy per token
Deterministic: fixed tiles, fixed reduction trees, no atomics. Sizes, strides and
hyper-parameters are runtime values (do_not_specialize); the mode, estimator, aggregation and the
presence of optional inputs are compile-time flags.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels.triton.utils import program_target

# csrc/include/lenkernels/policy_loss.h: Mode, KLEstimator, Agg, NormSource
PPO, GSPO, LUSPO, CISPO, SAPO, GMPO, REINFORCE = range(7)
K1, ABS, K2, K3 = range(4)
TOKEN_MEAN, TOKEN_SUM, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_SUM_NORM = range(5)
NORM_COUNTED, NORM_TENSOR, NORM_CONSTANT = range(3)
NUM_PARTIALS, NUM_SEQ_PARTIALS, NUM_SEQ_VALUES = 16, 8, 4

_FINALIZE_ROWS = 128


@triton.jit
def _clamp(x, lo, hi):
    """torch.clamp semantics (NaN passes through)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (series to x^9 for |x| < 0.5)."""
    small = tl.abs(x) < 0.5
    s = tl.where(small, x, 0.0)
    p = 1.0 + s * (1.0 / 9.0)
    p = 1.0 + s * (1.0 / 8.0) * p
    p = 1.0 + s * (1.0 / 7.0) * p
    p = 1.0 + s * (1.0 / 6.0) * p
    p = 1.0 + s * (1.0 / 5.0) * p
    p = 1.0 + s * (1.0 / 4.0) * p
    p = 1.0 + s * (1.0 / 3.0) * p
    p = 1.0 + s * 0.5 * p
    return tl.where(small, s * p, tl.exp(x) - 1.0)


@triton.jit
def _expm1mx(x):
    """exp(x) - 1 - x (k3) with full relative precision for small |x|."""
    small = tl.abs(x) < 0.5
    s = tl.where(small, x, 0.0)
    p = 1.0 + s * (1.0 / 9.0)
    p = 1.0 + s * (1.0 / 8.0) * p
    p = 1.0 + s * (1.0 / 7.0) * p
    p = 1.0 + s * (1.0 / 6.0) * p
    p = 1.0 + s * (1.0 / 5.0) * p
    p = 1.0 + s * (1.0 / 4.0) * p
    p = 1.0 + s * (1.0 / 3.0) * p
    return tl.where(small, 0.5 * s * s * p, (tl.exp(x) - 1.0) - x)


@triton.jit
def kl_estimator(lp, ref, EST: tl.constexpr, STRAIGHT: tl.constexpr, CLAMP: tl.constexpr):
    """(K, dK/dlogprob) of SPEC 2; delta = ref - logprob."""
    delta = ref - lp
    if EST == 0:
        value = -delta
        d_delta = delta * 0.0 - 1.0
    elif EST == 1:
        value = tl.abs(delta)
        d_delta = tl.where(delta > 0.0, 1.0, tl.where(delta < 0.0, -1.0, 0.0))
    elif EST == 2:
        value = 0.5 * delta * delta
        d_delta = delta
    else:
        if CLAMP:
            dc = _clamp(delta, -20.0, 20.0)
            v = _expm1mx(dc)
            value = tl.where(v > 10.0, 10.0, v)
            d_delta = tl.where((tl.abs(delta) <= 20.0) & (v <= 10.0), _expm1(dc), 0.0)
        else:
            value = _expm1mx(delta)
            d_delta = _expm1(delta)
    if STRAIGHT:
        d_delta = delta
    return value, -d_delta


@triton.jit
def _token_ratio(l):
    """r = exp(clamp(l, +-20)), dr/dl."""
    r = tl.exp(_clamp(l, -20.0, 20.0))
    return r, tl.where((l >= -20.0) & (l <= 20.0), r, 0.0)


@triton.jit
def _ppo_clip(x, a, lo, hi, dual_c, DUAL: tl.constexpr):
    """max(-A x, -A clip(x, lo, hi)) (+ dual clip): value, d/dx and the low/high/dual flags."""
    xc = _clamp(x, lo, hi)
    l_unclipped = -a * x
    l_clipped = -a * xc
    clipped = l_clipped > l_unclipped
    value = tl.where(clipped, l_clipped, l_unclipped)
    grad = tl.where(clipped, 0.0, -a)
    low = tl.where(clipped & (a < 0.0), 1.0, 0.0)
    high = tl.where(clipped & (a > 0.0), 1.0, 0.0)
    dual = low * 0.0
    if DUAL:
        l_dual = -a * dual_c
        active = (a < 0.0) & (value > l_dual)
        value = tl.where(active, l_dual, value)
        grad = tl.where(active, 0.0, grad)
        dual = tl.where(active, 1.0, 0.0)
    return value, grad, low, high, dual


@triton.jit
def _gmpo_token(l, a, lo, hi):
    """verl geo_mean: sgn(A) * min(sgn(A) l, sgn(A) clamp(l, lo, hi)); pass = d/dl is 1."""
    sgn = tl.where(a > 0.0, 1.0, tl.where(a < 0.0, -1.0, 0.0))
    lc = _clamp(l, lo, hi)
    clipped = sgn * lc < sgn * l
    lmin = tl.where(sgn == 0.0, 0.0, tl.where(clipped, lc, l))
    passes = tl.where(clipped | (sgn == 0.0), 0.0, 1.0)
    low = tl.where(clipped & (a < 0.0), 1.0, 0.0)
    high = tl.where(clipped & (a > 0.0), 1.0, 0.0)
    return lmin, passes, low, high


@triton.jit
def _policy_term(lp, old, a, seq_n, seq_x, seq_y, seq_ratio, lo, hi, dual_c, tau_pos, tau_neg,
                 MODE: tl.constexpr, DUAL: tl.constexpr):
    """(P, dP/dlogprob, ratio, low, high, dual) of one tile (policy_term in policy_loss.h)."""
    l = lp - old
    if MODE == 1 or MODE == 2:  # GSPO / LUSPO: s_{b,t} has value s_b and d/dlogprob = s_b
        value, d, low, high, dual = _ppo_clip(seq_ratio + l * 0.0, a, lo, hi, dual_c, DUAL)
        grad = d * seq_ratio * seq_y
        if MODE == 2:
            value = value * seq_n
            grad = grad * seq_n
        ratio = seq_ratio + l * 0.0
    elif MODE == 5:  # GMPO: the sequence's value; the gradient factor only where the clip passes
        _, passes, low, high = _gmpo_token(l, a, lo, hi)
        value = seq_y + l * 0.0
        grad = passes * seq_x
        ratio = seq_ratio + l * 0.0
        dual = low * 0.0
    else:
        ratio, dr = _token_ratio(l)
        if MODE == 3:  # CISPO
            rc = _clamp(ratio, lo, hi)
            value = -rc * a * lp
            grad = -rc * a
            low = tl.where(ratio < lo, 1.0, 0.0)
            high = tl.where(ratio > hi, 1.0, 0.0)
            dual = low * 0.0
        elif MODE == 4:  # SAPO
            tau = tl.where(a > 0.0, tau_pos, tau_neg)
            z = tau * (ratio - 1.0)
            e = tl.exp(-tl.abs(z))  # <= 1: sigma(z) sigma(-z) = e / (1 + e)^2, no 1 - sigma cancellation
            inv = 1.0 / (1.0 + e)
            sig = tl.where(z >= 0.0, inv, e * inv)
            value = -sig * (4.0 / tau) * a
            grad = -4.0 * (e * inv) * inv * a * dr
            low = l * 0.0
            high = low
            dual = low
        elif MODE == 6:  # REINFORCE / GPG
            value = -a * lp
            grad = -a
            low = l * 0.0
            high = low
            dual = low
        else:  # PPO
            value, d, low, high, dual = _ppo_clip(ratio, a, lo, hi, dual_c, DUAL)
            grad = d * dr
    return value, grad, ratio, low, high, dual


@triton.jit
def _span(cu_ptr, b, seq_len, PACKED: tl.constexpr):
    """(first token, length) of sequence b: packed from cu_seqlens, padded row b of seq_len."""
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        length = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    else:
        start = b * 0
        length = b * 0 + seq_len
    return start, length


@triton.jit
def _load(ptr, base, offs, in_seq):
    return tl.load(ptr + base + offs, mask=in_seq, other=0.0).to(tl.float32)


@triton.jit
def _valid(mask_ptr, base, offs, in_seq, HAS_MASK: tl.constexpr):
    valid = in_seq
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + base + offs, mask=in_seq, other=0) != 0)
    return valid


@triton.jit
def _advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN: tl.constexpr):
    if ADV_PER_TOKEN:
        a = _load(adv_ptr, b * adv_rs + start, offs, in_seq)
    else:
        a = tl.load(adv_ptr + b * adv_rs).to(tl.float32) + tl.zeros(offs.shape, tl.float32)
    return tl.where(valid, a, 0.0)


@triton.jit
def _sequence_values(seq_part_ptr, b, n_splits, MODE: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_THR: tl.constexpr):
    """Merges sequence b's partial sums left to right -> (n, x, y, ratio) (SeqValue layout)."""
    n = tl.zeros([], tl.float32)
    s_l = tl.zeros([], tl.float32)
    s_a = tl.zeros([], tl.float32)
    s_w = tl.zeros([], tl.float32)
    s_e = tl.zeros([], tl.float32)
    for i in range(0, n_splits):
        row = seq_part_ptr + (b * n_splits + i) * 8
        n += tl.load(row)
        s_l += tl.load(row + 1)
        s_a += tl.load(row + 2)
        s_w += tl.load(row + 3)
        s_e += tl.load(row + 4)
    x = tl.zeros([], tl.float32)
    y = x + 1.0
    ratio = x + 1.0
    if MODE == 1 or MODE == 2:
        mean = s_l / tl.maximum(n, 1.0)
        log_s = tl.where(mean > 10.0, 10.0, mean)
        x = log_s
        y = tl.where(mean <= 10.0, 1.0, 0.0)
        ratio = tl.exp(log_s)
    elif MODE == 5:
        inv_n = 1.0 / tl.maximum(n, 1.0)
        ratio = tl.exp(s_l * inv_n)
        weight = x + 1.0
        if HAS_W:
            weight = tl.exp(s_w * inv_n)
        kept = n
        if HAS_THR:
            kept = s_e
        y = -(s_a * inv_n) * ratio * weight
        x = y * kept * inv_n
    return n, x, y, ratio


@triton.jit(do_not_specialize=["seq_len", "n_splits", "lp_rs", "old_rs", "adv_rs", "mask_rs", "ent_rs", "w_rs",
                               "clip_lo", "clip_hi"])
def policy_loss_seq_kernel(
    lp_ptr,  # [B, T] (row stride lp_rs, unit column stride) or packed [N]
    old_ptr,
    adv_ptr,  # per token like lp, or per sequence [B] (stride adv_rs)
    mask_ptr,
    ent_ptr,
    w_ptr,
    thr_ptr,  # [1] fp64 entropy threshold
    cu_ptr,  # [B + 1] cu_seqlens (packed)
    seq_part_ptr,  # [B, n_splits, 8] fp32 out
    seq_len,
    n_splits,
    lp_rs,
    old_rs,
    adv_rs,
    mask_rs,
    ent_rs,
    w_rs,
    clip_lo,  # GMPO: -eps_low (log space)
    clip_hi,
    MODE: tl.constexpr,
    PACKED: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_THR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start, length = _span(cu_ptr, b, seq_len, PACKED)
    n = tl.zeros([], tl.float32)
    s_l = tl.zeros([], tl.float32)
    s_a = tl.zeros([], tl.float32)
    s_w = tl.zeros([], tl.float32)
    s_e = tl.zeros([], tl.float32)
    for t0 in range(split * BLOCK, length, n_splits * BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        in_seq = offs < length
        valid = _valid(mask_ptr, b * mask_rs + start, offs, in_seq, HAS_MASK)
        n += tl.sum(tl.where(valid, 1.0, 0.0), 0)
        if MODE == 1 or MODE == 2:
            lp = _load(lp_ptr, b * lp_rs + start, offs, in_seq)
            old = _load(old_ptr, b * old_rs + start, offs, in_seq)
            s_l += tl.sum(tl.where(valid, lp - old, 0.0), 0)
        elif MODE == 5:
            lp = _load(lp_ptr, b * lp_rs + start, offs, in_seq)
            old = _load(old_ptr, b * old_rs + start, offs, in_seq)
            a = _advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN)
            lmin, _, _, _ = _gmpo_token(tl.where(valid, lp - old, 0.0), a, clip_lo, clip_hi)
            s_l += tl.sum(tl.where(valid, lmin, 0.0), 0)
            s_a += tl.sum(a, 0)
            if HAS_W:
                w = _load(w_ptr, b * w_rs + start, offs, in_seq)
                s_w += tl.sum(tl.where(valid, tl.log(w + 1e-10), 0.0), 0)
            if HAS_THR:
                h = _load(ent_ptr, b * ent_rs + start, offs, in_seq)
                kept = valid & (h.to(tl.float64) >= tl.load(thr_ptr))
                s_e += tl.sum(tl.where(kept, 1.0, 0.0), 0)
    row = seq_part_ptr + (b * n_splits + split) * 8
    tl.store(row, n)
    tl.store(row + 1, s_l)
    tl.store(row + 2, s_a)
    tl.store(row + 3, s_w)
    tl.store(row + 4, s_e)
    tl.store(row + 5, n * 0.0)
    tl.store(row + 6, n * 0.0)
    tl.store(row + 7, n * 0.0)


@triton.jit(do_not_specialize=["seq_len", "n_splits", "lp_rs", "old_rs", "adv_rs", "mask_rs", "ref_rs", "ent_rs",
                               "w_rs", "clip_lo", "clip_hi", "dual_c", "tau_pos", "tau_neg"])
def policy_loss_fwd_kernel(
    lp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    ent_ptr,
    w_ptr,
    thr_ptr,
    cu_ptr,
    seq_part_ptr,  # [B, n_splits, 8] (HAS_SEQ)
    seq_ptr,  # [B, 4] fp32 out: per-sequence values for the backward
    part_ptr,  # [B * n_splits, 16] fp32 out (Partial layout)
    seq_len,
    n_splits,
    lp_rs,
    old_rs,
    adv_rs,
    mask_rs,
    ref_rs,
    ent_rs,
    w_rs,
    clip_lo,
    clip_hi,
    dual_c,
    tau_pos,
    tau_neg,
    MODE: tl.constexpr,
    AGG: tl.constexpr,
    KL_EST: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    PACKED: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_THR: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    DUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start, length = _span(cu_ptr, b, seq_len, PACKED)
    n = tl.zeros([], tl.float32)
    seq_x = n
    seq_y = n + 1.0
    seq_ratio = n + 1.0
    non_empty = n
    if HAS_SEQ:
        n, seq_x, seq_y, seq_ratio = _sequence_values(seq_part_ptr, b, n_splits, MODE, HAS_W, HAS_THR)
        if split == 0:
            tl.store(seq_ptr + b * 4, n)
            tl.store(seq_ptr + b * 4 + 1, seq_x)
            tl.store(seq_ptr + b * 4 + 2, seq_y)
            tl.store(seq_ptr + b * 4 + 3, seq_ratio)
            non_empty = tl.where(n > 0.0, 1.0, 0.0)
    u = n * 0.0 + 1.0
    if AGG == 2:  # seq-mean-token-mean
        u = 1.0 / tl.maximum(n, 1.0)
    s_p = tl.zeros([], tl.float32)
    s_k = tl.zeros([], tl.float32)
    s_h = tl.zeros([], tl.float32)
    s_n = tl.zeros([], tl.float32)
    s_low = tl.zeros([], tl.float32)
    s_high = tl.zeros([], tl.float32)
    s_dual = tl.zeros([], tl.float32)
    s_nlr = tl.zeros([], tl.float32)
    s_r = tl.zeros([], tl.float32)
    s_kept = tl.zeros([], tl.float32)
    r_min = tl.zeros([], tl.float32) + float("inf")
    r_max = tl.zeros([], tl.float32) - float("inf")
    for t0 in range(split * BLOCK, length, n_splits * BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        in_seq = offs < length
        valid = _valid(mask_ptr, b * mask_rs + start, offs, in_seq, HAS_MASK)
        lp = tl.where(valid, _load(lp_ptr, b * lp_rs + start, offs, in_seq), 0.0)
        old = tl.where(valid, _load(old_ptr, b * old_rs + start, offs, in_seq), 0.0)
        a = _advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN)
        p, _, ratio, low, high, dual = _policy_term(lp, old, a, n, seq_x, seq_y, seq_ratio, clip_lo, clip_hi,
                                                    dual_c, tau_pos, tau_neg, MODE, DUAL)
        if HAS_W and MODE != 5:
            p = p * tl.where(valid, _load(w_ptr, b * w_rs + start, offs, in_seq), 0.0)
        kept = valid
        if HAS_ENT:
            h = tl.where(valid, _load(ent_ptr, b * ent_rs + start, offs, in_seq), 0.0)
            s_h += tl.sum(h, 0)
            if HAS_THR:
                kept = valid & (h.to(tl.float64) >= tl.load(thr_ptr))
        s_p += tl.sum(tl.where(kept, p, 0.0), 0)
        if HAS_REF:
            ref = tl.where(valid, _load(ref_ptr, b * ref_rs + start, offs, in_seq), 0.0)
            k, _ = kl_estimator(lp, ref, KL_EST, False, KL_CLAMP)
            s_k += tl.sum(tl.where(valid, k, 0.0), 0)
        s_n += tl.sum(tl.where(valid, 1.0, 0.0), 0)
        s_low += tl.sum(tl.where(valid, low, 0.0), 0)
        s_high += tl.sum(tl.where(valid, high, 0.0), 0)
        s_dual += tl.sum(tl.where(valid, dual, 0.0), 0)
        s_nlr += tl.sum(old - lp, 0)
        s_r += tl.sum(tl.where(valid, ratio, 0.0), 0)
        s_kept += tl.sum(tl.where(kept, 1.0, 0.0), 0)
        r_min = tl.minimum(r_min, tl.min(tl.where(valid, ratio, float("inf")), 0))
        r_max = tl.maximum(r_max, tl.max(tl.where(valid, ratio, -float("inf")), 0))
    row = part_ptr + (b * n_splits + split) * 16
    tl.store(row + 0, s_p * u)
    tl.store(row + 1, s_k * u)
    tl.store(row + 2, s_h * u)
    tl.store(row + 3, s_n)
    tl.store(row + 4, s_low)
    tl.store(row + 5, s_high)
    tl.store(row + 6, s_dual)
    tl.store(row + 7, s_nlr)
    tl.store(row + 8, r_min)
    tl.store(row + 9, s_r)
    tl.store(row + 10, r_max)
    tl.store(row + 11, s_h)
    tl.store(row + 12, non_empty)
    tl.store(row + 13, s_kept)
    tl.store(row + 14, s_n * 0.0)
    tl.store(row + 15, s_n * 0.0)


@triton.jit
def _column(v, cols, k: tl.constexpr):
    return tl.sum(tl.where(cols == k, v, 0.0), 0)


@triton.jit(do_not_specialize=["n_rows", "norm_const", "scale", "kl_coef", "ent_coef"])
def policy_loss_finalize_kernel(
    part_ptr,  # [n_rows, 16] (Partial layout)
    norm_ptr,  # [1] fp32 given normaliser (NORM_SOURCE == 1)
    stats_ptr,  # [16] fp32 out (Stat layout)
    n_rows,
    norm_const,
    scale,  # dp_size (/ C for seq-mean-token-sum-norm)
    kl_coef,
    ent_coef,
    AGG: tl.constexpr,
    NORM_SOURCE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    cols = tl.arange(0, 16)
    rows = tl.arange(0, BLOCK_R)
    total = tl.zeros([16], tl.float32)
    low = tl.zeros([16], tl.float32) + float("inf")
    high = tl.zeros([16], tl.float32) - float("inf")
    for r0 in range(0, n_rows, BLOCK_R):
        r = (r0 + rows).to(tl.int64)
        ok = r < n_rows
        tile = tl.load(part_ptr + r[:, None] * 16 + cols[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(tile, 0)
        low = tl.minimum(low, tl.min(tl.where(ok[:, None], tile, float("inf")), 0))
        high = tl.maximum(high, tl.max(tl.where(ok[:, None], tile, -float("inf")), 0))
    tokens = _column(total, cols, 3)
    seqs = _column(total, cols, 12)
    if NORM_SOURCE == 1:
        d = tl.load(norm_ptr).to(tl.float32)
    elif NORM_SOURCE == 2:
        d = tokens * 0.0 + norm_const
    elif AGG == 0:
        d = tl.maximum(tokens, 1.0)
    elif AGG == 1:
        d = tokens * 0.0 + 1.0
    else:
        d = tl.maximum(seqs, 1.0)
    inv_norm = scale / d
    inv_tokens = 1.0 / tl.maximum(tokens, 1.0)
    s_p = _column(total, cols, 0)
    s_k = _column(total, cols, 1)
    s_h = _column(total, cols, 2)
    tl.store(stats_ptr + 0, (s_p + kl_coef * s_k - ent_coef * s_h) * inv_norm)
    tl.store(stats_ptr + 1, s_p * inv_norm)
    tl.store(stats_ptr + 2, s_k * inv_norm)
    tl.store(stats_ptr + 3, s_h * inv_norm)
    tl.store(stats_ptr + 4, _column(total, cols, 4) * inv_tokens)
    tl.store(stats_ptr + 5, _column(total, cols, 5) * inv_tokens)
    tl.store(stats_ptr + 6, _column(total, cols, 6) * inv_tokens)
    tl.store(stats_ptr + 7, _column(total, cols, 7) * inv_tokens)
    tl.store(stats_ptr + 8, _column(low, cols, 8))
    tl.store(stats_ptr + 9, _column(total, cols, 9) * inv_tokens)
    tl.store(stats_ptr + 10, _column(high, cols, 10))
    tl.store(stats_ptr + 11, _column(total, cols, 11) * inv_tokens)
    tl.store(stats_ptr + 12, tokens)
    tl.store(stats_ptr + 13, seqs)
    tl.store(stats_ptr + 14, inv_norm)
    tl.store(stats_ptr + 15, _column(total, cols, 13) * inv_tokens)


@triton.jit(do_not_specialize=["seq_len", "n_splits", "lp_rs", "old_rs", "adv_rs", "mask_rs", "ref_rs", "ent_rs",
                               "w_rs", "dlp_rs", "dent_rs", "clip_lo", "clip_hi", "dual_c", "tau_pos", "tau_neg",
                               "kl_coef", "ent_coef"])
def policy_loss_bwd_kernel(
    lp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    ent_ptr,
    w_ptr,
    thr_ptr,
    cu_ptr,
    seq_ptr,  # [B, 4] per-sequence values from the forward
    stats_ptr,  # [16] forward statistics (1 / normaliser at 14)
    g_ptr,  # [16] cotangent of the statistics; only the loss (0) is differentiable
    dlp_ptr,  # like lp (row stride dlp_rs), logprobs dtype out
    dent_ptr,  # like entropy, entropy dtype out (HAS_DENT)
    seq_len,
    n_splits,
    lp_rs,
    old_rs,
    adv_rs,
    mask_rs,
    ref_rs,
    ent_rs,
    w_rs,
    dlp_rs,
    dent_rs,
    clip_lo,
    clip_hi,
    dual_c,
    tau_pos,
    tau_neg,
    kl_coef,
    ent_coef,
    MODE: tl.constexpr,
    AGG: tl.constexpr,
    KL_EST: tl.constexpr,
    KL_STRAIGHT: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    PACKED: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_THR: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_DENT: tl.constexpr,
    DUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start, length = _span(cu_ptr, b, seq_len, PACKED)
    g = tl.load(g_ptr) * tl.load(stats_ptr + 14)
    n = tl.zeros([], tl.float32)
    seq_x = n
    seq_y = n + 1.0
    seq_ratio = n + 1.0
    if HAS_SEQ:
        n = tl.load(seq_ptr + b * 4)
        seq_x = tl.load(seq_ptr + b * 4 + 1)
        seq_y = tl.load(seq_ptr + b * 4 + 2)
        seq_ratio = tl.load(seq_ptr + b * 4 + 3)
    if AGG == 2:
        g = g / tl.maximum(n, 1.0)
    for t0 in range(split * BLOCK, length, n_splits * BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        in_seq = offs < length
        valid = _valid(mask_ptr, b * mask_rs + start, offs, in_seq, HAS_MASK)
        lp = tl.where(valid, _load(lp_ptr, b * lp_rs + start, offs, in_seq), 0.0)
        old = tl.where(valid, _load(old_ptr, b * old_rs + start, offs, in_seq), 0.0)
        a = _advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN)
        _, d, _, _, _, _ = _policy_term(lp, old, a, n, seq_x, seq_y, seq_ratio, clip_lo, clip_hi, dual_c,
                                        tau_pos, tau_neg, MODE, DUAL)
        if MODE != 5:  # GMPO's factor already holds its weights and kept-token count
            if HAS_W:
                d = d * tl.where(valid, _load(w_ptr, b * w_rs + start, offs, in_seq), 0.0)
            if HAS_THR:
                h = _load(ent_ptr, b * ent_rs + start, offs, in_seq)
                d = tl.where(h.to(tl.float64) >= tl.load(thr_ptr), d, 0.0)
        if HAS_REF:
            ref = tl.where(valid, _load(ref_ptr, b * ref_rs + start, offs, in_seq), 0.0)
            _, dk = kl_estimator(lp, ref, KL_EST, KL_STRAIGHT, KL_CLAMP)
            d = d + kl_coef * dk
        d_lp = tl.where(valid, g * d, 0.0)
        tl.store(dlp_ptr + b * dlp_rs + start + offs, d_lp.to(dlp_ptr.dtype.element_ty), mask=in_seq)
        if HAS_DENT:
            d_h = tl.where(valid, -g * ent_coef, 0.0)
            tl.store(dent_ptr + b * dent_rs + start + offs, d_h.to(dent_ptr.dtype.element_ty), mask=in_seq)


@triton.jit(do_not_specialize=["n"])
def kl_penalty_fwd_kernel(lp_ptr, ref_ptr, out_ptr, n, KL_EST: tl.constexpr, KL_CLAMP: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    value, _ = kl_estimator(lp, ref, KL_EST, False, KL_CLAMP)
    tl.store(out_ptr + offs, value, mask=ok)


@triton.jit(do_not_specialize=["n"])
def kl_penalty_bwd_kernel(lp_ptr, ref_ptr, g_ptr, dlp_ptr, dref_ptr, n, KL_EST: tl.constexpr,
                          KL_STRAIGHT: tl.constexpr, KL_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    _, d = kl_estimator(lp, ref, KL_EST, KL_STRAIGHT, KL_CLAMP)
    tl.store(dlp_ptr + offs, (g * d).to(dlp_ptr.dtype.element_ty), mask=ok)
    tl.store(dref_ptr + offs, (-g * d).to(dref_ptr.dtype.element_ty), mask=ok)


# --- host launchers ----------------------------------------------------------------------------


def _plan(n_seqs: int, avg_len: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, num_warps, n_splits): bucketed tile size, and enough programs per sequence to fill
    the device when sequences are few."""
    block = min(1024, max(128, triton.next_power_of_2(max(avg_len, 1))))
    tiles = -(-max(avg_len, 1) // block)
    want = -(-program_target(device) // max(n_seqs, 1))
    return block, (8 if block >= 1024 else 4), max(1, min(tiles, want))


def _row_stride(x, packed: bool) -> int:
    return 0 if (x is None or packed) else x.stride(0)


def policy_loss_fwd(t, cfg, stats, seq):
    """Host launcher. ``t``: the op's token tensors in kernel layout (see ops/policy_loss.py),
    ``cfg``: its resolved configuration; writes ``stats`` [16] and ``seq`` [B, 4]."""
    device = t.logprobs.device
    packed = t.cu_seqlens is not None
    avg_len = t.seq_len if not packed else -(-t.logprobs.shape[0] // max(t.n_seqs, 1))
    block, warps, n_splits = _plan(t.n_seqs, avg_len, device)
    dummy = t.logprobs
    ptrs = {
        "lp_ptr": t.logprobs,
        "old_ptr": t.old_logprobs,
        "adv_ptr": t.advantages,
        "mask_ptr": t.mask if t.mask is not None else dummy,
        "ent_ptr": t.entropy if t.entropy is not None else dummy,
        "w_ptr": t.importance_weights if t.importance_weights is not None else dummy,
        "thr_ptr": t.threshold if t.threshold is not None else torch.zeros(1, dtype=torch.float64, device=device),
        "cu_ptr": t.cu_seqlens if packed else dummy,
    }
    strides = {
        "lp_rs": _row_stride(t.logprobs, packed),
        "old_rs": _row_stride(t.old_logprobs, packed),
        "adv_rs": t.advantages.stride(0) if not t.adv_per_token else _row_stride(t.advantages, packed),
        "mask_rs": _row_stride(t.mask, packed),
        "ent_rs": _row_stride(t.entropy, packed),
        "w_rs": _row_stride(t.importance_weights, packed),
    }
    flags = {
        "PACKED": packed,
        "ADV_PER_TOKEN": t.adv_per_token,
        "HAS_MASK": t.mask is not None,
        "HAS_W": t.importance_weights is not None,
        "HAS_THR": t.threshold is not None,
        "BLOCK": block,
    }
    grid = (t.n_seqs, n_splits)
    seq_part = torch.empty((t.n_seqs, n_splits, NUM_SEQ_PARTIALS), dtype=torch.float32, device=device)
    if cfg.has_seq:
        policy_loss_seq_kernel[grid](
            **ptrs, seq_part_ptr=seq_part, seq_len=t.seq_len, n_splits=n_splits, **strides,
            clip_lo=cfg.lo, clip_hi=cfg.hi, MODE=cfg.mode, **flags, num_warps=warps,
        )  # fmt: skip
    part = torch.empty((t.n_seqs * n_splits, NUM_PARTIALS), dtype=torch.float32, device=device)
    policy_loss_fwd_kernel[grid](
        **ptrs, ref_ptr=t.ref_logprobs if t.ref_logprobs is not None else dummy, seq_part_ptr=seq_part,
        seq_ptr=seq, part_ptr=part, seq_len=t.seq_len, n_splits=n_splits, **strides,
        ref_rs=_row_stride(t.ref_logprobs, packed), clip_lo=cfg.lo, clip_hi=cfg.hi, dual_c=cfg.dual_c,
        tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, MODE=cfg.mode, AGG=cfg.agg, KL_EST=cfg.kl_est,
        KL_CLAMP=cfg.kl_clamp, HAS_REF=t.ref_logprobs is not None, HAS_ENT=t.entropy is not None,
        HAS_SEQ=cfg.has_seq, DUAL=cfg.dual, **flags, num_warps=warps,
    )  # fmt: skip
    policy_loss_finalize_kernel[(1,)](
        part_ptr=part, norm_ptr=t.normaliser if t.normaliser is not None else part, stats_ptr=stats,
        n_rows=part.shape[0], norm_const=cfg.norm_const, scale=cfg.scale, kl_coef=cfg.kl_coef,
        ent_coef=cfg.entropy_coef, AGG=cfg.agg, NORM_SOURCE=cfg.norm_source, BLOCK_R=_FINALIZE_ROWS, num_warps=4,
    )  # fmt: skip


def policy_loss_bwd(t, cfg, stats, seq, g_stats, dlogprobs, dentropy):
    """Host launcher: writes ``dlogprobs`` (and ``dentropy`` when not None), both in the layout of
    their inputs (contiguous)."""
    device = t.logprobs.device
    packed = t.cu_seqlens is not None
    avg_len = t.seq_len if not packed else -(-t.logprobs.shape[0] // max(t.n_seqs, 1))
    block, warps, n_splits = _plan(t.n_seqs, avg_len, device)
    dummy = t.logprobs
    policy_loss_bwd_kernel[(t.n_seqs, n_splits)](
        lp_ptr=t.logprobs, old_ptr=t.old_logprobs, adv_ptr=t.advantages,
        mask_ptr=t.mask if t.mask is not None else dummy,
        ref_ptr=t.ref_logprobs if t.ref_logprobs is not None else dummy,
        ent_ptr=t.entropy if t.entropy is not None else dummy,
        w_ptr=t.importance_weights if t.importance_weights is not None else dummy,
        thr_ptr=t.threshold if t.threshold is not None else torch.zeros(1, dtype=torch.float64, device=device),
        cu_ptr=t.cu_seqlens if packed else dummy, seq_ptr=seq, stats_ptr=stats, g_ptr=g_stats,
        dlp_ptr=dlogprobs, dent_ptr=dentropy if dentropy is not None else dlogprobs,
        seq_len=t.seq_len, n_splits=n_splits,
        lp_rs=_row_stride(t.logprobs, packed), old_rs=_row_stride(t.old_logprobs, packed),
        adv_rs=t.advantages.stride(0) if not t.adv_per_token else _row_stride(t.advantages, packed),
        mask_rs=_row_stride(t.mask, packed), ref_rs=_row_stride(t.ref_logprobs, packed),
        ent_rs=_row_stride(t.entropy, packed), w_rs=_row_stride(t.importance_weights, packed),
        dlp_rs=_row_stride(dlogprobs, packed), dent_rs=_row_stride(dentropy, packed),
        clip_lo=cfg.lo, clip_hi=cfg.hi, dual_c=cfg.dual_c, tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg,
        kl_coef=cfg.kl_coef, ent_coef=cfg.entropy_coef, MODE=cfg.mode, AGG=cfg.agg, KL_EST=cfg.kl_est,
        KL_STRAIGHT=cfg.kl_straight, KL_CLAMP=cfg.kl_clamp, PACKED=packed, ADV_PER_TOKEN=t.adv_per_token,
        HAS_MASK=t.mask is not None, HAS_REF=t.ref_logprobs is not None, HAS_ENT=t.entropy is not None,
        HAS_W=t.importance_weights is not None, HAS_THR=t.threshold is not None, HAS_SEQ=cfg.has_seq,
        HAS_DENT=dentropy is not None, DUAL=cfg.dual, BLOCK=block, num_warps=warps,
    )  # fmt: skip


def _flat_block(n: int) -> int:
    return min(1024, max(128, triton.next_power_of_2(max(n, 1))))


def kl_penalty_fwd(logprobs, ref_logprobs, est: int, clamp: bool, out):
    """Host launcher: ``out`` [n] fp32 from contiguous [n] inputs."""
    n = logprobs.numel()
    block = _flat_block(n)
    kl_penalty_fwd_kernel[(triton.cdiv(n, block),)](
        lp_ptr=logprobs, ref_ptr=ref_logprobs, out_ptr=out, n=n, KL_EST=est, KL_CLAMP=clamp, BLOCK=block, num_warps=4
    )


def kl_penalty_bwd(logprobs, ref_logprobs, grad, est: int, straight: bool, clamp: bool, dlogprobs, dref):
    n = logprobs.numel()
    block = _flat_block(n)
    kl_penalty_bwd_kernel[(triton.cdiv(n, block),)](
        lp_ptr=logprobs, ref_ptr=ref_logprobs, g_ptr=grad, dlp_ptr=dlogprobs, dref_ptr=dref, n=n, KL_EST=est,
        KL_STRAIGHT=straight, KL_CLAMP=clamp, BLOCK=block, num_warps=4,
    )  # fmt: skip


_TOK = {"seq_len": "i32", "n_splits": "i32", "lp_rs": "i64", "old_rs": "i64", "adv_rs": "i64", "mask_rs": "i64",
        "ent_rs": "i64", "w_rs": "i64"}
_PTRS = {"lp_ptr": "*fp32", "old_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*i1"}


def _fwd_spec(mode, agg, kl_est, packed, dtype="fp32"):
    return {
        "kernel": policy_loss_fwd_kernel,
        "signature": {"lp_ptr": f"*{dtype}", "old_ptr": f"*{dtype}", "adv_ptr": "*fp32", "mask_ptr": "*i1",
                      "ref_ptr": f"*{dtype}", "ent_ptr": "*fp32", "w_ptr": "*fp32", "thr_ptr": "*fp64",
                      "cu_ptr": "*i64", "seq_part_ptr": "*fp32", "seq_ptr": "*fp32", "part_ptr": "*fp32", **_TOK,
                      "ref_rs": "i64", "clip_lo": "fp32", "clip_hi": "fp32", "dual_c": "fp32", "tau_pos": "fp32",
                      "tau_neg": "fp32", **{k: "constexpr" for k in (
                          "MODE", "AGG", "KL_EST", "KL_CLAMP", "PACKED", "ADV_PER_TOKEN", "HAS_MASK", "HAS_REF",
                          "HAS_ENT", "HAS_W", "HAS_THR", "HAS_SEQ", "DUAL", "BLOCK")}},
        "constexprs": {"MODE": mode, "AGG": agg, "KL_EST": kl_est, "KL_CLAMP": True, "PACKED": packed,
                       "ADV_PER_TOKEN": True, "HAS_MASK": True, "HAS_REF": True, "HAS_ENT": True, "HAS_W": True,
                       "HAS_THR": True, "HAS_SEQ": mode in (GSPO, LUSPO, GMPO) or agg >= SEQ_MEAN_TOKEN_MEAN,
                       "DUAL": mode in (PPO, GSPO, LUSPO), "BLOCK": 1024},
        "num_warps": 8,
    }


def _bwd_spec(mode, agg, kl_est, packed, dtype="fp32"):
    return {
        "kernel": policy_loss_bwd_kernel,
        "signature": {"lp_ptr": f"*{dtype}", "old_ptr": f"*{dtype}", "adv_ptr": "*fp32", "mask_ptr": "*i1",
                      "ref_ptr": f"*{dtype}", "ent_ptr": "*fp32", "w_ptr": "*fp32", "thr_ptr": "*fp64",
                      "cu_ptr": "*i64", "seq_ptr": "*fp32", "stats_ptr": "*fp32", "g_ptr": "*fp32",
                      "dlp_ptr": f"*{dtype}", "dent_ptr": "*fp32", **_TOK, "ref_rs": "i64", "dlp_rs": "i64",
                      "dent_rs": "i64", "clip_lo": "fp32", "clip_hi": "fp32", "dual_c": "fp32", "tau_pos": "fp32",
                      "tau_neg": "fp32", "kl_coef": "fp32", "ent_coef": "fp32", **{k: "constexpr" for k in (
                          "MODE", "AGG", "KL_EST", "KL_STRAIGHT", "KL_CLAMP", "PACKED", "ADV_PER_TOKEN", "HAS_MASK",
                          "HAS_REF", "HAS_ENT", "HAS_W", "HAS_THR", "HAS_SEQ", "HAS_DENT", "DUAL", "BLOCK")}},
        "constexprs": {"MODE": mode, "AGG": agg, "KL_EST": kl_est, "KL_STRAIGHT": False, "KL_CLAMP": True,
                       "PACKED": packed, "ADV_PER_TOKEN": True, "HAS_MASK": True, "HAS_REF": True, "HAS_ENT": True,
                       "HAS_W": True, "HAS_THR": True, "HAS_SEQ": mode in (GSPO, LUSPO, GMPO) or agg >= 2,
                       "HAS_DENT": True, "DUAL": mode in (PPO, GSPO, LUSPO), "BLOCK": 1024},
        "num_warps": 8,
    }


# The heaviest configurations of each kernel (every optional input present), on both layouts.
AOT_SPECS = (
    [
        {
            "kernel": policy_loss_seq_kernel,
            "signature": {**_PTRS, "ent_ptr": "*fp32", "w_ptr": "*fp32", "thr_ptr": "*fp64", "cu_ptr": "*i64",
                          "seq_part_ptr": "*fp32", **_TOK, "clip_lo": "fp32", "clip_hi": "fp32",
                          **{k: "constexpr" for k in ("MODE", "PACKED", "ADV_PER_TOKEN", "HAS_MASK", "HAS_W",
                                                       "HAS_THR", "BLOCK")}},
            "constexprs": {"MODE": mode, "PACKED": packed, "ADV_PER_TOKEN": True, "HAS_MASK": True, "HAS_W": True,
                           "HAS_THR": True, "BLOCK": 1024},
            "num_warps": 8,
        }
        for mode in (GSPO, GMPO)
        for packed in (False, True)
    ]
    + [_fwd_spec(m, a, K3, p) for m, a, p in ((PPO, TOKEN_MEAN, False), (GSPO, SEQ_MEAN_TOKEN_MEAN, True),
                                              (GMPO, SEQ_MEAN_TOKEN_MEAN, False), (SAPO, TOKEN_SUM, True),
                                              (CISPO, SEQ_MEAN_TOKEN_SUM_NORM, False))]
    + [_fwd_spec(PPO, TOKEN_MEAN, K1, False, "bf16")]
    + [_bwd_spec(m, a, K3, p) for m, a, p in ((PPO, TOKEN_MEAN, False), (GSPO, SEQ_MEAN_TOKEN_MEAN, True),
                                              (GMPO, SEQ_MEAN_TOKEN_MEAN, False), (SAPO, TOKEN_SUM, True),
                                              (CISPO, SEQ_MEAN_TOKEN_SUM_NORM, False))]
    + [_bwd_spec(PPO, TOKEN_MEAN, K1, False, "bf16")]
    + [
        {
            "kernel": policy_loss_finalize_kernel,
            "signature": {"part_ptr": "*fp32", "norm_ptr": "*fp32", "stats_ptr": "*fp32", "n_rows": "i32",
                          "norm_const": "fp32", "scale": "fp32", "kl_coef": "fp32", "ent_coef": "fp32",
                          "AGG": "constexpr", "NORM_SOURCE": "constexpr", "BLOCK_R": "constexpr"},
            "constexprs": {"AGG": agg, "NORM_SOURCE": src, "BLOCK_R": _FINALIZE_ROWS},
            "num_warps": 4,
        }
        for agg, src in ((TOKEN_MEAN, NORM_COUNTED), (SEQ_MEAN_TOKEN_MEAN, NORM_TENSOR), (TOKEN_SUM, NORM_CONSTANT))
    ]
    + [
        {
            "kernel": kl_penalty_fwd_kernel,
            "signature": {"lp_ptr": "*fp32", "ref_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                          "KL_EST": "constexpr", "KL_CLAMP": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"KL_EST": K3, "KL_CLAMP": True, "BLOCK": 1024},
            "num_warps": 4,
        },
        {
            "kernel": kl_penalty_bwd_kernel,
            "signature": {"lp_ptr": "*fp32", "ref_ptr": "*fp32", "g_ptr": "*fp32", "dlp_ptr": "*fp32",
                          "dref_ptr": "*fp32", "n": "i32", "KL_EST": "constexpr", "KL_STRAIGHT": "constexpr",
                          "KL_CLAMP": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"KL_EST": K3, "KL_STRAIGHT": False, "KL_CLAMP": True, "BLOCK": 1024},
            "num_warps": 4,
        },
    ]
)  # fmt: skip
