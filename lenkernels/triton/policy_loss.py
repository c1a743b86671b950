"""Triton kernels for the fused policy losses and KL estimators (SPEC 2-3).

The per-token maths (``triton/policy_loss_math.py``) is the Triton twin of
``csrc/include/lenkernels/policy_loss.h`` (same names; the layouts of the partial sums and statistics
are ``lenkernels._codes`` Partial, SeqPartial, SeqValue, Stat). Work is split per sequence: program (b, s) of
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
Deterministic: fixed tiles, fixed reduction trees, no atomics. Sizes and strides are runtime values
(do_not_specialize); the float hyper-parameters are one fp32 vector (``params_ptr``, ``_codes.PolicyParam``
layout, read as ``tl.load(params_ptr + PARAMS.TAU_POS)``), runtime values too; the mode, estimator,
aggregation and the presence of optional inputs are compile-time flags.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels._codes import Agg, KLEstimator, Mode, NormSource, Partial, PolicyParam, SeqPartial, SeqValue, Stat
from lenkernels.triton.policy_loss_math import (
    advantage,
    gmpo_token,
    kl_estimator,
    load_tokens,
    policy_term,
    sequence_values,
    span,
    valid_tokens,
)
from lenkernels.triton.utils import constexprs, program_target

MODES = constexprs(Mode)
AGGS = constexprs(Agg)
NORMS = constexprs(NormSource)
PARTS = constexprs(Partial)
SEQP = constexprs(SeqPartial)
SEQV = constexprs(SeqValue)
STATS = constexprs(Stat)
PARAMS = constexprs(PolicyParam)

_FINALIZE_ROWS = 128


@triton.jit(do_not_specialize=["seq_len", "n_splits", "lp_rs", "old_rs", "adv_rs", "mask_rs", "ent_rs", "w_rs"])
def policy_loss_seq_kernel(
    lp_ptr, old_ptr,  # [B, T] (row stride *_rs, unit column stride) or packed [N]
    adv_ptr,  # per token like lp, or per sequence [B] (stride adv_rs)
    mask_ptr, ent_ptr, w_ptr,
    thr_ptr,  # [1] fp64 entropy threshold
    cu_ptr,  # [B + 1] cu_seqlens (packed)
    seq_part_ptr,  # [B, n_splits, NUM_SEQ_PARTIALS] fp32 out (SeqPartial layout)
    params_ptr,  # [NUM_POLICY_PARAMS] fp32 hyper-parameters (PolicyParam layout; GMPO: LO = -eps_low, log space)
    seq_len, n_splits, lp_rs, old_rs, adv_rs, mask_rs, ent_rs, w_rs,
    MODE: tl.constexpr, PACKED: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr, HAS_THR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start, length = span(cu_ptr, b, seq_len, PACKED)
    n = tl.zeros([], tl.float32)
    s_l = tl.zeros([], tl.float32)
    s_a = tl.zeros([], tl.float32)
    s_w = tl.zeros([], tl.float32)
    s_e = tl.zeros([], tl.float32)
    for t0 in range(split * BLOCK, length, n_splits * BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        in_seq = offs < length
        valid = valid_tokens(mask_ptr, b * mask_rs + start, offs, in_seq, HAS_MASK)
        n += tl.sum(tl.where(valid, 1.0, 0.0), 0)
        if MODE == MODES.GSPO or MODE == MODES.LUSPO:
            lp = load_tokens(lp_ptr, b * lp_rs + start, offs, in_seq)
            old = load_tokens(old_ptr, b * old_rs + start, offs, in_seq)
            s_l += tl.sum(tl.where(valid, lp - old, 0.0), 0)
        elif MODE == MODES.GMPO:
            lp = load_tokens(lp_ptr, b * lp_rs + start, offs, in_seq)
            old = load_tokens(old_ptr, b * old_rs + start, offs, in_seq)
            a = advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN)
            lo = tl.load(params_ptr + PARAMS.LO)
            hi = tl.load(params_ptr + PARAMS.HI)
            lmin, _, _, _ = gmpo_token(tl.where(valid, lp - old, 0.0), a, lo, hi)
            s_l += tl.sum(tl.where(valid, lmin, 0.0), 0)
            s_a += tl.sum(a, 0)
            if HAS_W:
                w = load_tokens(w_ptr, b * w_rs + start, offs, in_seq)
                s_w += tl.sum(tl.where(valid, tl.log(w + 1e-10), 0.0), 0)
            if HAS_THR:
                h = load_tokens(ent_ptr, b * ent_rs + start, offs, in_seq)
                kept = valid & (h.to(tl.float64) >= tl.load(thr_ptr))
                s_e += tl.sum(tl.where(kept, 1.0, 0.0), 0)
    row = seq_part_ptr + (b * n_splits + split) * SEQP.NUM_SEQ_PARTIALS
    tl.store(row + SEQP.SEQ_TOKENS, n)
    tl.store(row + SEQP.SEQ_LOG_RATIO, s_l)
    tl.store(row + SEQP.SEQ_ADVANTAGE, s_a)
    tl.store(row + SEQP.SEQ_LOG_WEIGHT, s_w)
    tl.store(row + SEQP.SEQ_KEPT, s_e)
    for j in tl.static_range(SEQP.SEQ_KEPT + 1, SEQP.NUM_SEQ_PARTIALS):  # padding of the row
        tl.store(row + j, n * 0.0)


@triton.jit(do_not_specialize=["seq_len", "n_splits", "lp_rs", "old_rs", "adv_rs", "mask_rs", "ref_rs", "ent_rs",
                               "w_rs"])
def policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, w_ptr, thr_ptr, cu_ptr,
    seq_part_ptr,  # [B, n_splits, NUM_SEQ_PARTIALS] (HAS_SEQ)
    seq_ptr,  # [B, NUM_SEQ_VALUES] fp32 out: per-sequence values for the backward
    part_ptr,  # [B * n_splits, NUM_PARTIALS] fp32 out (Partial layout)
    params_ptr,  # [NUM_POLICY_PARAMS] fp32 hyper-parameters (PolicyParam layout)
    seq_len, n_splits, lp_rs, old_rs, adv_rs, mask_rs, ref_rs, ent_rs, w_rs,
    MODE: tl.constexpr, AGG: tl.constexpr, KL_EST: tl.constexpr, KL_CLAMP: tl.constexpr, PACKED: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_THR: tl.constexpr, HAS_SEQ: tl.constexpr, DUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start, length = span(cu_ptr, b, seq_len, PACKED)
    n = tl.zeros([], tl.float32)
    seq_x = n
    seq_y = n + 1.0
    seq_ratio = n + 1.0
    non_empty = n
    if HAS_SEQ:
        n, seq_x, seq_y, seq_ratio = sequence_values(seq_part_ptr, b, n_splits, MODE, HAS_W, HAS_THR)
        if split == 0:
            values = seq_ptr + b * SEQV.NUM_SEQ_VALUES
            tl.store(values + SEQV.SEQ_N, n)
            tl.store(values + SEQV.SEQ_X, seq_x)
            tl.store(values + SEQV.SEQ_Y, seq_y)
            tl.store(values + SEQV.SEQ_RATIO, seq_ratio)
            non_empty = tl.where(n > 0.0, 1.0, 0.0)
    u = n * 0.0 + 1.0
    if AGG == AGGS.SEQ_MEAN_TOKEN_MEAN:
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
        valid = valid_tokens(mask_ptr, b * mask_rs + start, offs, in_seq, HAS_MASK)
        lp = tl.where(valid, load_tokens(lp_ptr, b * lp_rs + start, offs, in_seq), 0.0)
        old = tl.where(valid, load_tokens(old_ptr, b * old_rs + start, offs, in_seq), 0.0)
        a = advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN)
        p, _, ratio, low, high, dual = policy_term(lp, old, a, n, seq_x, seq_y, seq_ratio, params_ptr, MODE, DUAL)
        if HAS_W and MODE != MODES.GMPO:
            p = p * tl.where(valid, load_tokens(w_ptr, b * w_rs + start, offs, in_seq), 0.0)
        kept = valid
        if HAS_ENT:
            h = tl.where(valid, load_tokens(ent_ptr, b * ent_rs + start, offs, in_seq), 0.0)
            s_h += tl.sum(h, 0)
            if HAS_THR:
                kept = valid & (h.to(tl.float64) >= tl.load(thr_ptr))
        s_p += tl.sum(tl.where(kept, p, 0.0), 0)
        if HAS_REF:
            ref = tl.where(valid, load_tokens(ref_ptr, b * ref_rs + start, offs, in_seq), 0.0)
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
    row = part_ptr + (b * n_splits + split) * PARTS.NUM_PARTIALS
    tl.store(row + PARTS.PART_POLICY, s_p * u)
    tl.store(row + PARTS.PART_KL, s_k * u)
    tl.store(row + PARTS.PART_ENTROPY, s_h * u)
    tl.store(row + PARTS.PART_TOKENS, s_n)
    tl.store(row + PARTS.PART_CLIP_LOW, s_low)
    tl.store(row + PARTS.PART_CLIP_HIGH, s_high)
    tl.store(row + PARTS.PART_CLIP_DUAL, s_dual)
    tl.store(row + PARTS.PART_NEG_LOG_RATIO, s_nlr)
    tl.store(row + PARTS.PART_RATIO_MIN, r_min)
    tl.store(row + PARTS.PART_RATIO_SUM, s_r)
    tl.store(row + PARTS.PART_RATIO_MAX, r_max)
    tl.store(row + PARTS.PART_ENTROPY_SUM, s_h)
    tl.store(row + PARTS.PART_SEQS, non_empty)
    tl.store(row + PARTS.PART_KEPT, s_kept)
    for j in tl.static_range(PARTS.PART_KEPT + 1, PARTS.NUM_PARTIALS):  # padding of the row
        tl.store(row + j, s_n * 0.0)


@triton.jit
def _column(v, cols, k: tl.constexpr):
    return tl.sum(tl.where(cols == k, v, 0.0), 0)


@triton.jit(do_not_specialize=["n_rows"])
def policy_loss_finalize_kernel(
    part_ptr,  # [n_rows, NUM_PARTIALS] (Partial layout)
    norm_ptr,  # [1] fp32 given normaliser (NORM_SOURCE == NORMS.NORM_TENSOR)
    stats_ptr,  # [NUM_STATS] fp32 out (Stat layout)
    params_ptr,  # [NUM_POLICY_PARAMS] fp32 (PolicyParam layout; SCALE: dp_size (/ C for seq-mean-token-sum-norm))
    n_rows,
    AGG: tl.constexpr, NORM_SOURCE: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, PARTS.NUM_PARTIALS)
    rows = tl.arange(0, BLOCK_R)
    total = tl.zeros([PARTS.NUM_PARTIALS], tl.float32)
    low = tl.zeros([PARTS.NUM_PARTIALS], tl.float32) + float("inf")
    high = tl.zeros([PARTS.NUM_PARTIALS], tl.float32) - float("inf")
    for r0 in range(0, n_rows, BLOCK_R):
        r = (r0 + rows).to(tl.int64)
        ok = r < n_rows
        tile = tl.load(part_ptr + r[:, None] * PARTS.NUM_PARTIALS + cols[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(tile, 0)
        low = tl.minimum(low, tl.min(tl.where(ok[:, None], tile, float("inf")), 0))
        high = tl.maximum(high, tl.max(tl.where(ok[:, None], tile, -float("inf")), 0))
    tokens = _column(total, cols, PARTS.PART_TOKENS)
    seqs = _column(total, cols, PARTS.PART_SEQS)
    if NORM_SOURCE == NORMS.NORM_TENSOR:
        d = tl.load(norm_ptr).to(tl.float32)
    elif NORM_SOURCE == NORMS.NORM_CONSTANT:
        d = tokens * 0.0 + tl.load(params_ptr + PARAMS.NORM_CONST)
    elif AGG == AGGS.TOKEN_MEAN:
        d = tl.maximum(tokens, 1.0)
    elif AGG == AGGS.TOKEN_SUM:
        d = tokens * 0.0 + 1.0
    else:
        d = tl.maximum(seqs, 1.0)
    inv_norm = tl.load(params_ptr + PARAMS.SCALE) / d
    inv_tokens = 1.0 / tl.maximum(tokens, 1.0)
    s_p = _column(total, cols, PARTS.PART_POLICY)
    s_k = _column(total, cols, PARTS.PART_KL)
    s_h = _column(total, cols, PARTS.PART_ENTROPY)
    kl_coef = tl.load(params_ptr + PARAMS.KL_COEF)
    ent_coef = tl.load(params_ptr + PARAMS.ENTROPY_COEF)
    tl.store(stats_ptr + STATS.STAT_LOSS, (s_p + kl_coef * s_k - ent_coef * s_h) * inv_norm)
    tl.store(stats_ptr + STATS.STAT_POLICY, s_p * inv_norm)
    tl.store(stats_ptr + STATS.STAT_KL, s_k * inv_norm)
    tl.store(stats_ptr + STATS.STAT_ENTROPY, s_h * inv_norm)
    tl.store(stats_ptr + STATS.STAT_CLIP_LOW, _column(total, cols, PARTS.PART_CLIP_LOW) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_CLIP_HIGH, _column(total, cols, PARTS.PART_CLIP_HIGH) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_CLIP_DUAL, _column(total, cols, PARTS.PART_CLIP_DUAL) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_APPROX_KL, _column(total, cols, PARTS.PART_NEG_LOG_RATIO) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_RATIO_MIN, _column(low, cols, PARTS.PART_RATIO_MIN))
    tl.store(stats_ptr + STATS.STAT_RATIO_MEAN, _column(total, cols, PARTS.PART_RATIO_SUM) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_RATIO_MAX, _column(high, cols, PARTS.PART_RATIO_MAX))
    tl.store(stats_ptr + STATS.STAT_ENTROPY_MEAN, _column(total, cols, PARTS.PART_ENTROPY_SUM) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_TOKENS, tokens)
    tl.store(stats_ptr + STATS.STAT_SEQS, seqs)
    tl.store(stats_ptr + STATS.STAT_INV_NORM, inv_norm)
    tl.store(stats_ptr + STATS.STAT_KEPT, _column(total, cols, PARTS.PART_KEPT) * inv_tokens)


@triton.jit(do_not_specialize=["seq_len", "n_splits", "lp_rs", "old_rs", "adv_rs", "mask_rs", "ref_rs", "ent_rs",
                               "w_rs", "dlp_rs", "dent_rs"])
def policy_loss_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, w_ptr, thr_ptr, cu_ptr,
    seq_ptr,  # [B, NUM_SEQ_VALUES] per-sequence values from the forward
    stats_ptr,  # [NUM_STATS] forward statistics (1 / normaliser at STAT_INV_NORM)
    g_ptr,  # [NUM_STATS] cotangent of the statistics; only the loss is differentiable
    dlp_ptr,  # like lp (row stride dlp_rs), logprobs dtype out
    dent_ptr,  # like entropy, entropy dtype out (HAS_DENT)
    params_ptr,  # [NUM_POLICY_PARAMS] fp32 hyper-parameters (PolicyParam layout)
    seq_len, n_splits, lp_rs, old_rs, adv_rs, mask_rs, ref_rs, ent_rs, w_rs, dlp_rs, dent_rs,
    MODE: tl.constexpr, AGG: tl.constexpr, KL_EST: tl.constexpr, KL_STRAIGHT: tl.constexpr, KL_CLAMP: tl.constexpr,
    PACKED: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr, HAS_W: tl.constexpr, HAS_THR: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_DENT: tl.constexpr, DUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start, length = span(cu_ptr, b, seq_len, PACKED)
    g = tl.load(g_ptr + STATS.STAT_LOSS) * tl.load(stats_ptr + STATS.STAT_INV_NORM)
    kl_coef = tl.load(params_ptr + PARAMS.KL_COEF)
    ent_coef = tl.load(params_ptr + PARAMS.ENTROPY_COEF)
    n = tl.zeros([], tl.float32)
    seq_x = n
    seq_y = n + 1.0
    seq_ratio = n + 1.0
    if HAS_SEQ:
        values = seq_ptr + b * SEQV.NUM_SEQ_VALUES
        n = tl.load(values + SEQV.SEQ_N)
        seq_x = tl.load(values + SEQV.SEQ_X)
        seq_y = tl.load(values + SEQV.SEQ_Y)
        seq_ratio = tl.load(values + SEQV.SEQ_RATIO)
    if AGG == AGGS.SEQ_MEAN_TOKEN_MEAN:
        g = g / tl.maximum(n, 1.0)
    for t0 in range(split * BLOCK, length, n_splits * BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        in_seq = offs < length
        valid = valid_tokens(mask_ptr, b * mask_rs + start, offs, in_seq, HAS_MASK)
        lp = tl.where(valid, load_tokens(lp_ptr, b * lp_rs + start, offs, in_seq), 0.0)
        old = tl.where(valid, load_tokens(old_ptr, b * old_rs + start, offs, in_seq), 0.0)
        a = advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN)
        _, d, _, _, _, _ = policy_term(lp, old, a, n, seq_x, seq_y, seq_ratio, params_ptr, MODE, DUAL)
        if MODE != MODES.GMPO:  # GMPO's factor already holds its weights and kept-token count
            if HAS_W:
                d = d * tl.where(valid, load_tokens(w_ptr, b * w_rs + start, offs, in_seq), 0.0)
            if HAS_THR:
                h = load_tokens(ent_ptr, b * ent_rs + start, offs, in_seq)
                d = tl.where(h.to(tl.float64) >= tl.load(thr_ptr), d, 0.0)
        if HAS_REF:
            ref = tl.where(valid, load_tokens(ref_ptr, b * ref_rs + start, offs, in_seq), 0.0)
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


# --- host launchers (the signatures of lenkernels/{cpu,cuda,reference}/policy_loss.py) -----------


def _plan(n_seqs: int, avg_len: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, num_warps, n_splits): bucketed tile size, and enough programs per sequence to fill
    the device when sequences are few."""
    block = min(1024, max(128, triton.next_power_of_2(max(avg_len, 1))))
    tiles = -(-max(avg_len, 1) // block)
    want = -(-program_target(device) // max(n_seqs, 1))
    return block, (8 if block >= 1024 else 4), max(1, min(tiles, want))


def _row_stride(x, packed: bool) -> int:
    return 0 if (x is None or packed) else x.stride(0)


def _token_args(t) -> tuple[dict, tuple[int, int]]:
    """The pointers, row strides, presence flags and plan every token kernel takes, and its grid."""
    device = t.logprobs.device
    packed = t.cu_seqlens is not None
    avg_len = t.seq_len if not packed else -(-t.logprobs.shape[0] // max(t.n_seqs, 1))
    block, warps, n_splits = _plan(t.n_seqs, avg_len, device)
    dummy = t.logprobs
    args = {
        "lp_ptr": t.logprobs, "old_ptr": t.old_logprobs, "adv_ptr": t.advantages,
        "mask_ptr": t.mask if t.mask is not None else dummy,
        "ent_ptr": t.entropy if t.entropy is not None else dummy,
        "w_ptr": t.importance_weights if t.importance_weights is not None else dummy,
        "thr_ptr": t.threshold if t.threshold is not None else torch.zeros(1, dtype=torch.float64, device=device),
        "cu_ptr": t.cu_seqlens if packed else dummy,
        "seq_len": t.seq_len, "n_splits": n_splits,
        "lp_rs": _row_stride(t.logprobs, packed), "old_rs": _row_stride(t.old_logprobs, packed),
        "adv_rs": t.advantages.stride(0) if not t.adv_per_token else _row_stride(t.advantages, packed),
        "mask_rs": _row_stride(t.mask, packed), "ent_rs": _row_stride(t.entropy, packed),
        "w_rs": _row_stride(t.importance_weights, packed),
        "PACKED": packed, "ADV_PER_TOKEN": t.adv_per_token, "HAS_MASK": t.mask is not None,
        "HAS_W": t.importance_weights is not None, "HAS_THR": t.threshold is not None, "BLOCK": block,
        "num_warps": warps,
    }  # fmt: skip
    return args, (t.n_seqs, n_splits)


def _ref_args(t) -> dict:
    packed = t.cu_seqlens is not None
    return {"ref_ptr": t.ref_logprobs if t.ref_logprobs is not None else t.logprobs,
            "ref_rs": _row_stride(t.ref_logprobs, packed), "HAS_REF": t.ref_logprobs is not None,
            "HAS_ENT": t.entropy is not None}  # fmt: skip


def _params(cfg, device: torch.device) -> torch.Tensor:
    """The hyper-parameters as the kernels read them: fp32 ``[NUM_POLICY_PARAMS]`` on ``device``,
    member ``p`` of ``PolicyParam`` holding ``cfg.kernel_scalars()[p.name.lower()]`` (generic: a new
    scalar is a new member). Runtime values, never compile-time keys. On a GPU the vector goes up
    with an asynchronous copy from pinned memory on the current stream (ordered before the kernels
    that read it, no host sync, whatever value a KL controller sets each step); inside a CUDA graph
    capture it is filled by kernels of the graph instead (a captured host copy would read a buffer
    that may be reused by replay time)."""
    scalars = cfg.kernel_scalars()
    values = [float(scalars[p.name.lower()]) for p in PolicyParam if p != PolicyParam.NUM_POLICY_PARAMS]
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.float32, device=device)
    if torch.cuda.is_current_stream_capturing():
        out = torch.empty(len(values), dtype=torch.float32, device=device)
        for i, v in enumerate(values):
            out[i].fill_(v)
        return out
    return torch.tensor(values, dtype=torch.float32).pin_memory().to(device, non_blocking=True)


def _terms(cfg, device: torch.device) -> dict:
    """The config's hyper-parameters (``params_ptr``) and codes (plain ints) every token pass of the loss takes."""
    return {"params_ptr": _params(cfg, device), "MODE": int(cfg.mode), "AGG": int(cfg.agg),
            "KL_EST": int(cfg.kl_est), "KL_CLAMP": cfg.kl_clamp, "HAS_SEQ": cfg.has_seq, "DUAL": cfg.dual}  # fmt: skip


def policy_loss_fwd(t, cfg, stats, seq):
    """Host launcher. ``t``: the op's token tensors in kernel layout (``PolicyTokens``), ``cfg``:
    its ``PolicyConfig``; writes ``stats`` [NUM_STATS] and ``seq`` [B, NUM_SEQ_VALUES]."""
    device = t.logprobs.device
    args, grid = _token_args(t)
    n_splits = args["n_splits"]
    f32 = {"dtype": torch.float32, "device": device}
    seq_part = torch.empty((t.n_seqs, n_splits, SeqPartial.NUM_SEQ_PARTIALS), **f32)
    terms = _terms(cfg, device)
    if cfg.has_seq:
        policy_loss_seq_kernel[grid](**args, seq_part_ptr=seq_part, params_ptr=terms["params_ptr"], MODE=int(cfg.mode))
    part = torch.empty((t.n_seqs * n_splits, Partial.NUM_PARTIALS), **f32)
    policy_loss_fwd_kernel[grid](**args, **_ref_args(t), **terms, seq_part_ptr=seq_part, seq_ptr=seq, part_ptr=part)
    policy_loss_finalize_kernel[(1,)](
        part_ptr=part, norm_ptr=t.normaliser if t.normaliser is not None else part, stats_ptr=stats,
        params_ptr=terms["params_ptr"], n_rows=part.shape[0], AGG=int(cfg.agg), NORM_SOURCE=int(cfg.norm_source),
        BLOCK_R=_FINALIZE_ROWS, num_warps=4,
    )  # fmt: skip


def policy_loss_bwd(t, cfg, stats, seq, g_stats, dlogprobs, dentropy):
    """Host launcher: writes ``dlogprobs`` (and ``dentropy`` when not None), both in the layout of
    their inputs (unit stride along the tokens)."""
    args, grid = _token_args(t)
    packed = t.cu_seqlens is not None
    policy_loss_bwd_kernel[grid](
        **args, **_ref_args(t), **_terms(cfg, t.logprobs.device), seq_ptr=seq, stats_ptr=stats, g_ptr=g_stats,
        dlp_ptr=dlogprobs, dent_ptr=dentropy if dentropy is not None else dlogprobs,
        dlp_rs=_row_stride(dlogprobs, packed), dent_rs=_row_stride(dentropy, packed), KL_STRAIGHT=cfg.kl_straight,
        HAS_DENT=dentropy is not None,
    )  # fmt: skip


def _flat_block(n: int) -> int:
    return min(1024, max(128, triton.next_power_of_2(max(n, 1))))


def kl_penalty_fwd(logprobs, ref_logprobs, cfg, out):
    """Host launcher: ``out`` [n] fp32 from contiguous [n] inputs (``cfg``: ``KLConfig``)."""
    n = logprobs.numel()
    block = _flat_block(n)
    kl_penalty_fwd_kernel[(triton.cdiv(n, block),)](
        lp_ptr=logprobs, ref_ptr=ref_logprobs, out_ptr=out, n=n, KL_EST=int(cfg.est), KL_CLAMP=cfg.clamp, BLOCK=block,
        num_warps=4,
    )  # fmt: skip


def kl_penalty_bwd(logprobs, ref_logprobs, grad, cfg, dlogprobs, dref):
    """Host launcher: ``dlogprobs``, ``dref`` (contiguous, their own dtypes) from the cotangent ``grad``."""
    n = logprobs.numel()
    block = _flat_block(n)
    kl_penalty_bwd_kernel[(triton.cdiv(n, block),)](
        lp_ptr=logprobs, ref_ptr=ref_logprobs, g_ptr=grad, dlp_ptr=dlogprobs, dref_ptr=dref, n=n, KL_EST=int(cfg.est),
        KL_STRAIGHT=cfg.straight, KL_CLAMP=cfg.clamp, BLOCK=block, num_warps=4,
    )  # fmt: skip


# --- ahead-of-time compilation specs (lenkernels/triton/aot.py) ------------------------------------

_TOK = {"seq_len": "i32", "n_splits": "i32", "lp_rs": "i64", "old_rs": "i64", "adv_rs": "i64", "mask_rs": "i64",
        "ent_rs": "i64", "w_rs": "i64"}
_PTRS = {"lp_ptr": "*fp32", "old_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*i1"}
_SEQ_AGGS = (Agg.SEQ_MEAN_TOKEN_MEAN, Agg.SEQ_MEAN_TOKEN_SUM, Agg.SEQ_MEAN_TOKEN_SUM_NORM)


def _flags(mode, agg) -> dict:
    has_seq = mode in (Mode.GSPO, Mode.LUSPO, Mode.GMPO) or agg in _SEQ_AGGS
    return {"MODE": int(mode), "AGG": int(agg), "HAS_SEQ": has_seq, "DUAL": mode in (Mode.PPO, Mode.GSPO, Mode.LUSPO)}


def _fwd_spec(mode, agg, kl_est, packed, dtype="fp32"):
    return {
        "kernel": policy_loss_fwd_kernel,
        "signature": {"lp_ptr": f"*{dtype}", "old_ptr": f"*{dtype}", "adv_ptr": "*fp32", "mask_ptr": "*i1",
                      "ref_ptr": f"*{dtype}", "ent_ptr": "*fp32", "w_ptr": "*fp32", "thr_ptr": "*fp64",
                      "cu_ptr": "*i64", "seq_part_ptr": "*fp32", "seq_ptr": "*fp32", "part_ptr": "*fp32",
                      "params_ptr": "*fp32", **_TOK, "ref_rs": "i64", **{k: "constexpr" for k in (
                          "MODE", "AGG", "KL_EST", "KL_CLAMP", "PACKED", "ADV_PER_TOKEN", "HAS_MASK", "HAS_REF",
                          "HAS_ENT", "HAS_W", "HAS_THR", "HAS_SEQ", "DUAL", "BLOCK")}},
        "constexprs": {**_flags(mode, agg), "KL_EST": int(kl_est), "KL_CLAMP": True, "PACKED": packed,
                       "ADV_PER_TOKEN": True, "HAS_MASK": True, "HAS_REF": True, "HAS_ENT": True, "HAS_W": True,
                       "HAS_THR": True, "BLOCK": 1024},
        "num_warps": 8,
    }  # fmt: skip


def _bwd_spec(mode, agg, kl_est, packed, dtype="fp32"):
    return {
        "kernel": policy_loss_bwd_kernel,
        "signature": {"lp_ptr": f"*{dtype}", "old_ptr": f"*{dtype}", "adv_ptr": "*fp32", "mask_ptr": "*i1",
                      "ref_ptr": f"*{dtype}", "ent_ptr": "*fp32", "w_ptr": "*fp32", "thr_ptr": "*fp64",
                      "cu_ptr": "*i64", "seq_ptr": "*fp32", "stats_ptr": "*fp32", "g_ptr": "*fp32",
                      "dlp_ptr": f"*{dtype}", "dent_ptr": "*fp32", "params_ptr": "*fp32", **_TOK, "ref_rs": "i64",
                      "dlp_rs": "i64", "dent_rs": "i64", **{k: "constexpr" for k in (
                          "MODE", "AGG", "KL_EST", "KL_STRAIGHT", "KL_CLAMP", "PACKED", "ADV_PER_TOKEN", "HAS_MASK",
                          "HAS_REF", "HAS_ENT", "HAS_W", "HAS_THR", "HAS_SEQ", "HAS_DENT", "DUAL", "BLOCK")}},
        "constexprs": {**_flags(mode, agg), "KL_EST": int(kl_est), "KL_STRAIGHT": False, "KL_CLAMP": True,
                       "PACKED": packed, "ADV_PER_TOKEN": True, "HAS_MASK": True, "HAS_REF": True, "HAS_ENT": True,
                       "HAS_W": True, "HAS_THR": True, "HAS_DENT": True, "BLOCK": 1024},
        "num_warps": 8,
    }  # fmt: skip


_LOSS_CASES = ((Mode.PPO, Agg.TOKEN_MEAN, False), (Mode.GSPO, Agg.SEQ_MEAN_TOKEN_MEAN, True),
               (Mode.GMPO, Agg.SEQ_MEAN_TOKEN_MEAN, False), (Mode.SAPO, Agg.TOKEN_SUM, True),
               (Mode.CISPO, Agg.SEQ_MEAN_TOKEN_SUM_NORM, False))  # fmt: skip
K1, K3 = KLEstimator.K1, KLEstimator.K3

# The heaviest configurations of each kernel (every optional input present), on both layouts.
AOT_SPECS = (
    [
        {
            "kernel": policy_loss_seq_kernel,
            "signature": {**_PTRS, "ent_ptr": "*fp32", "w_ptr": "*fp32", "thr_ptr": "*fp64", "cu_ptr": "*i64",
                          "seq_part_ptr": "*fp32", "params_ptr": "*fp32", **_TOK,
                          **{k: "constexpr" for k in ("MODE", "PACKED", "ADV_PER_TOKEN", "HAS_MASK", "HAS_W",
                                                       "HAS_THR", "BLOCK")}},
            "constexprs": {"MODE": int(mode), "PACKED": packed, "ADV_PER_TOKEN": True, "HAS_MASK": True,
                           "HAS_W": True, "HAS_THR": True, "BLOCK": 1024},
            "num_warps": 8,
        }
        for mode in (Mode.GSPO, Mode.GMPO)
        for packed in (False, True)
    ]
    + [_fwd_spec(m, a, K3, p) for m, a, p in _LOSS_CASES]
    + [_fwd_spec(Mode.PPO, Agg.TOKEN_MEAN, K1, False, "bf16")]
    + [_bwd_spec(m, a, K3, p) for m, a, p in _LOSS_CASES]
    + [_bwd_spec(Mode.PPO, Agg.TOKEN_MEAN, K1, False, "bf16")]
    + [
        {
            "kernel": policy_loss_finalize_kernel,
            "signature": {"part_ptr": "*fp32", "norm_ptr": "*fp32", "stats_ptr": "*fp32", "params_ptr": "*fp32",
                          "n_rows": "i32", "AGG": "constexpr", "NORM_SOURCE": "constexpr", "BLOCK_R": "constexpr"},
            "constexprs": {"AGG": int(agg), "NORM_SOURCE": int(src), "BLOCK_R": _FINALIZE_ROWS},
            "num_warps": 4,
        }
        for agg, src in ((Agg.TOKEN_MEAN, NormSource.NORM_COUNTED), (Agg.SEQ_MEAN_TOKEN_MEAN, NormSource.NORM_TENSOR),
                         (Agg.TOKEN_SUM, NormSource.NORM_CONSTANT))
    ]
    + [
        {
            "kernel": kl_penalty_fwd_kernel,
            "signature": {"lp_ptr": "*fp32", "ref_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                          "KL_EST": "constexpr", "KL_CLAMP": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"KL_EST": int(K3), "KL_CLAMP": True, "BLOCK": 1024},
            "num_warps": 4,
        },
        {
            "kernel": kl_penalty_bwd_kernel,
            "signature": {"lp_ptr": "*fp32", "ref_ptr": "*fp32", "g_ptr": "*fp32", "dlp_ptr": "*fp32",
                          "dref_ptr": "*fp32", "n": "i32", "KL_EST": "constexpr", "KL_STRAIGHT": "constexpr",
                          "KL_CLAMP": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"KL_EST": int(K3), "KL_STRAIGHT": False, "KL_CLAMP": True, "BLOCK": 1024},
            "num_warps": 4,
        },
    ]
)  # fmt: skip
