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
from lenkernels.triton.utils import column_stats, column_value, constexprs, program_target

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


@triton.jit
def _token_tile(t0, b, start, length, lp_ptr, old_ptr, adv_ptr, mask_ptr, lp_rs, old_rs, adv_rs, mask_rs,
                HAS_MASK: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Tokens t0.. of sequence b (first token ``start``): (offs, in_seq, valid, lp, old, advantage),
    each value 0 at invalid tokens."""
    offs = t0 + tl.arange(0, BLOCK)
    in_seq = offs < length
    valid = valid_tokens(mask_ptr, b * mask_rs + start, offs, in_seq, HAS_MASK)
    lp = tl.where(valid, load_tokens(lp_ptr, b * lp_rs + start, offs, in_seq), 0.0)
    old = tl.where(valid, load_tokens(old_ptr, b * old_rs + start, offs, in_seq), 0.0)
    return offs, in_seq, valid, lp, old, advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN)


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
        offs, in_seq, valid, lp, old, a = _token_tile(
            t0, b, start, length, lp_ptr, old_ptr, adv_ptr, mask_ptr, lp_rs, old_rs, adv_rs, mask_rs, HAS_MASK,
            ADV_PER_TOKEN, BLOCK,
        )  # fmt: skip
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


@triton.jit(do_not_specialize=["n_rows"])
def policy_loss_finalize_kernel(
    part_ptr,  # [n_rows, NUM_PARTIALS] (Partial layout)
    norm_ptr,  # [1] fp32 given normaliser (NORM_SOURCE == NORMS.NORM_TENSOR)
    stats_ptr,  # [NUM_STATS] fp32 out (Stat layout)
    params_ptr,  # [NUM_POLICY_PARAMS] fp32 (PolicyParam layout; SCALE: dp_size (/ C for seq-mean-token-sum-norm))
    n_rows,
    AGG: tl.constexpr, NORM_SOURCE: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    cols, total, low, high = column_stats(part_ptr, n_rows, PARTS.NUM_PARTIALS, BLOCK_R)
    tokens = column_value(total, cols, PARTS.PART_TOKENS)
    seqs = column_value(total, cols, PARTS.PART_SEQS)
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
    s_p = column_value(total, cols, PARTS.PART_POLICY)
    s_k = column_value(total, cols, PARTS.PART_KL)
    s_h = column_value(total, cols, PARTS.PART_ENTROPY)
    kl_coef = tl.load(params_ptr + PARAMS.KL_COEF)
    ent_coef = tl.load(params_ptr + PARAMS.ENTROPY_COEF)
    tl.store(stats_ptr + STATS.STAT_LOSS, (s_p + kl_coef * s_k - ent_coef * s_h) * inv_norm)
    tl.store(stats_ptr + STATS.STAT_POLICY, s_p * inv_norm)
    tl.store(stats_ptr + STATS.STAT_KL, s_k * inv_norm)
    tl.store(stats_ptr + STATS.STAT_ENTROPY, s_h * inv_norm)
    tl.store(stats_ptr + STATS.STAT_CLIP_LOW, column_value(total, cols, PARTS.PART_CLIP_LOW) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_CLIP_HIGH, column_value(total, cols, PARTS.PART_CLIP_HIGH) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_CLIP_DUAL, column_value(total, cols, PARTS.PART_CLIP_DUAL) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_APPROX_KL, column_value(total, cols, PARTS.PART_NEG_LOG_RATIO) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_RATIO_MIN, column_value(low, cols, PARTS.PART_RATIO_MIN))
    tl.store(stats_ptr + STATS.STAT_RATIO_MEAN, column_value(total, cols, PARTS.PART_RATIO_SUM) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_RATIO_MAX, column_value(high, cols, PARTS.PART_RATIO_MAX))
    tl.store(stats_ptr + STATS.STAT_ENTROPY_MEAN, column_value(total, cols, PARTS.PART_ENTROPY_SUM) * inv_tokens)
    tl.store(stats_ptr + STATS.STAT_TOKENS, tokens)
    tl.store(stats_ptr + STATS.STAT_SEQS, seqs)
    tl.store(stats_ptr + STATS.STAT_INV_NORM, inv_norm)
    tl.store(stats_ptr + STATS.STAT_KEPT, column_value(total, cols, PARTS.PART_KEPT) * inv_tokens)


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
        offs, in_seq, valid, lp, old, a = _token_tile(
            t0, b, start, length, lp_ptr, old_ptr, adv_ptr, mask_ptr, lp_rs, old_rs, adv_rs, mask_rs, HAS_MASK,
            ADV_PER_TOKEN, BLOCK,
        )  # fmt: skip
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
    Mode(int(cfg.mode))  # a code outside the enum raises here: the kernels' last branch is PPO's
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
    # maxnreg: left to itself ptxas caps some sequence-aggregated modes at 80 registers and spills
    # (dro, packed, sm_90); 128 keeps two 8-warp blocks an SM, as the heaviest mode (ppo) needs anyway
    policy_loss_fwd_kernel[grid](**args, **_ref_args(t), **terms, seq_part_ptr=seq_part, seq_ptr=seq, part_ptr=part,
                                 maxnreg=128)  # fmt: skip
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



# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(mode, agg, norm, packed, kl_est=KLEstimator.K3, dtype=torch.float32):
    """Forward and backward with every optional input (mask, reference, entropy, importance weights,
    entropy threshold, entropy gradient) on 2 sequences of 1024 tokens (BLOCK 1024, 8 warps), padded
    or packed; the dual clip where the mode has one; the normaliser source ``norm`` of the finalize."""

    def run():
        from lenkernels.ops.policy_loss_args import DUAL_MODES, PolicyConfig, PolicyTokens

        b, t = 2, 1024
        shape = (b * t,) if packed else (b, t)
        lp = torch.zeros(shape, dtype=dtype)
        f32 = torch.zeros(shape)
        tokens = PolicyTokens(
            logprobs=lp, old_logprobs=lp, advantages=f32, mask=torch.ones(shape, dtype=torch.bool), ref_logprobs=lp,
            entropy=f32, importance_weights=f32, threshold=torch.zeros(1, dtype=torch.float64),
            normaliser=torch.ones(1) if norm == NormSource.NORM_TENSOR else None,
            cu_seqlens=torch.tensor([0, t, b * t]) if packed else None, adv_per_token=True, n_seqs=b,
            seq_len=0 if packed else t,
        )  # fmt: skip
        dual = 3.0 if mode in DUAL_MODES else 0.0  # dppo: the ratio truncation C
        cfg = PolicyConfig(mode=mode, agg=agg, kl_est=kl_est, clip_dual=dual, norm_source=norm, norm_const=1.0,
                           norm_length=1.0, dro_beta=0.5 if mode == Mode.DRO else 0.0)  # fmt: skip
        stats, seq = torch.empty(Stat.NUM_STATS), torch.empty((b, SeqValue.NUM_SEQ_VALUES))
        policy_loss_fwd(tokens, cfg, stats, seq)
        policy_loss_bwd(tokens, cfg, stats, seq, torch.ones(Stat.NUM_STATS), torch.empty(shape, dtype=dtype),
                        torch.empty(shape))  # fmt: skip

    return run


def _aot_kl_case():
    from lenkernels.ops.policy_loss_args import KLConfig

    x = torch.zeros(1024)
    kl_penalty_fwd(x, x, KLConfig(), torch.empty(1024))
    kl_penalty_bwd(x, x, x, KLConfig(), torch.empty(1024), torch.empty(1024))


# the heaviest configurations of each kernel (every optional input present) on both layouts: each
# sequence mode (and its per-sequence kernel) padded and packed, each finalize normaliser source
AOT_CASES = [
    _aot_case(Mode.PPO, Agg.TOKEN_MEAN, NormSource.NORM_COUNTED, packed=False),
    _aot_case(Mode.GSPO, Agg.SEQ_MEAN_TOKEN_MEAN, NormSource.NORM_TENSOR, packed=True),
    _aot_case(Mode.GSPO, Agg.SEQ_MEAN_TOKEN_MEAN, NormSource.NORM_TENSOR, packed=False),
    _aot_case(Mode.GMPO, Agg.SEQ_MEAN_TOKEN_MEAN, NormSource.NORM_TENSOR, packed=False),
    _aot_case(Mode.GMPO, Agg.SEQ_MEAN_TOKEN_MEAN, NormSource.NORM_TENSOR, packed=True),
    _aot_case(Mode.SAPO, Agg.TOKEN_SUM, NormSource.NORM_CONSTANT, packed=True),
    _aot_case(Mode.CISPO, Agg.SEQ_MEAN_TOKEN_SUM_NORM, NormSource.NORM_COUNTED, packed=False),
    _aot_case(Mode.DPPO_TV, Agg.TOKEN_MEAN, NormSource.NORM_COUNTED, packed=True),
    _aot_case(Mode.DPPO_KL, Agg.SEQ_MEAN_TOKEN_MEAN, NormSource.NORM_COUNTED, packed=False),
    _aot_case(Mode.DRO, Agg.TOKEN_MEAN, NormSource.NORM_CONSTANT, packed=True),
    _aot_case(Mode.DRO, Agg.SEQ_MEAN_TOKEN_SUM, NormSource.NORM_COUNTED, packed=True),
    _aot_case(Mode.PPO, Agg.TOKEN_MEAN, NormSource.NORM_COUNTED, False, KLEstimator.K1, torch.bfloat16),
    _aot_kl_case,
]
