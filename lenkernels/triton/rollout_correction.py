"""Triton kernels of the rollout correction (SPEC 8).

  rollout_correction_fwd_kernel       grid (S,): one program per sequence walks its tokens in
                                      BLOCK-token tiles: first (sequence levels, veto) the scan of
                                      Σ δ, the response-token count and the veto, then every token's
                                      weight and kept flag, and the sequence's sums of the metrics
                                      (one fp32 and one int64 row per sequence)
  rollout_correction_finalize_kernel  grid (1,): the rows merged in a fixed tile order into the
                                      metrics vector (``CorrectionStat`` layout)

Sequences are ``cu_seqlens[s] <= t < cu_seqlens[s + 1]`` of a flat [N] layout (a padded [B, T]
batch uses ``arange(B + 1) * T``). No atomics: bitwise reproducible. Sizes and every threshold are
runtime values (do_not_specialize): new lengths or bounds never recompile; the level, the mode and
whether a veto runs are compile-time codes (``lenkernels._codes``, read as constexprs). The
definition is ``lenkernels/reference/rollout_correction.py``; the C++ twin of the maths is
``csrc/include/lenkernels/rollout_correction.h``. The launcher at the end is the ``backend="triton"``
implementation of the rollout_correction family.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels._codes import CorrectionCount, CorrectionLevel, CorrectionMode, CorrectionPartial, CorrectionStat
from lenkernels.triton.policy_loss_math import expm1mx  # k3 without cancellation, shared with the KL terms
from lenkernels.triton.utils import column_stats, column_sums, column_value, constexprs, sequence_bounds, sequence_tile

LEVELS = constexprs(CorrectionLevel)
MODES = constexprs(CorrectionMode)
PARTS = constexprs(CorrectionPartial)
COUNTS = constexprs(CorrectionCount)
STATS = constexprs(CorrectionStat)

_BLOCK = 1024
_FINALIZE_ROWS = 128


@triton.jit
def _clamp(x, bound):
    """torch.clamp to [-bound, bound]: NaN passes through."""
    return tl.where(x < -bound, -bound, tl.where(x > bound, bound, x))


@triton.jit
def _outside(w, lo, hi):
    """Outside [lo, hi]; False for NaN (a NaN weight is kept and propagates)."""
    return (w < lo) | (w > hi)


@triton.jit
def _token_deltas(valid_ptr, old_ptr, rollout_ptr, first, end, BLOCK: tl.constexpr):
    """Tokens first.. of a sequence ending at ``end``: (pos, in_seq, valid, δ), δ = old - rollout
    in fp32 at response tokens, 0 elsewhere (never read there)."""
    pos, in_seq, valid = sequence_tile(valid_ptr, first, end, BLOCK)
    old = tl.load(old_ptr + pos, mask=valid, other=0.0).to(tl.float32)
    return pos, in_seq, valid, old - tl.load(rollout_ptr + pos, mask=valid, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["n_tokens", "lo", "hi", "log_clamp", "veto_lo", "veto_hi"])
def rollout_correction_fwd_kernel(
    old_ptr,  # [N] any float dtype
    rollout_ptr,  # [N] any float dtype
    valid_ptr,  # [N] uint8 (1 = response token)
    cu_ptr,  # [S + 1] int64
    weights_ptr,  # [N] fp32 out
    keep_ptr,  # [N] uint8 out
    part_ptr,  # [S, NUM_CORRECTION_PARTIALS] fp32 out
    count_ptr,  # [S, NUM_CORRECTION_COUNTS] int64 out
    n_tokens,
    lo,
    hi,
    log_clamp,
    veto_lo,
    veto_hi,
    LEVEL: tl.constexpr,
    MODE: tl.constexpr,
    HAS_VETO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start, end = sequence_bounds(cu_ptr, seq, n_tokens)
    seq_w = tl.full([], 1.0, tl.float32)
    seq_reject = tl.zeros([], tl.int32) != 0
    if LEVEL != LEVELS.TOKEN or HAS_VETO:
        sum_delta = tl.zeros([], tl.float32)
        n = tl.zeros([], tl.int64)
        vetoed = tl.zeros([], tl.int64)
        for first in range(start, end, BLOCK):
            _, _, valid, d = _token_deltas(valid_ptr, old_ptr, rollout_ptr, first, end, BLOCK)
            sum_delta += tl.sum(tl.where(valid, d, 0.0), 0)
            n += tl.sum(valid.to(tl.int32), 0).to(tl.int64)
            if HAS_VETO:
                w_tok = tl.exp(_clamp(d, log_clamp))
                vetoed += tl.sum((valid & _outside(w_tok, veto_lo, veto_hi)).to(tl.int32), 0).to(tl.int64)
        if LEVEL == LEVELS.SEQUENCE:
            seq_w = tl.exp(_clamp(sum_delta, log_clamp))
        elif LEVEL == LEVELS.GEOMETRIC:
            seq_w = tl.exp(_clamp(tl.where(n > 0, sum_delta / tl.maximum(n, 1).to(tl.float32), 0.0), log_clamp))
        seq_reject = vetoed > 0
        if LEVEL != LEVELS.TOKEN and MODE == MODES.MASK:
            seq_reject = seq_reject | _outside(seq_w, lo, hi)

    w_sum = tl.zeros([], tl.float32)
    w_min = tl.full([], float("inf"), tl.float32)
    w_max = tl.full([], float("-inf"), tl.float32)
    k1_sum = tl.zeros([], tl.float32)
    k3_sum = tl.zeros([], tl.float32)
    tokens = tl.zeros([], tl.int64)
    kept_n = tl.zeros([], tl.int64)
    truncated_n = tl.zeros([], tl.int64)
    nan_n = tl.zeros([], tl.int64)
    for first in range(start, end, BLOCK):
        pos, in_seq, valid, d = _token_deltas(valid_ptr, old_ptr, rollout_ptr, first, end, BLOCK)
        if LEVEL == LEVELS.TOKEN:
            raw = tl.exp(_clamp(d, log_clamp))
        else:
            raw = tl.zeros([BLOCK], tl.float32) + seq_w
        out = _outside(raw, lo, hi)
        if MODE == MODES.MASK:
            kept = valid & ~(seq_reject | out)
            w = raw
            truncated = tl.zeros([BLOCK], tl.int32) != 0
        else:
            kept = valid & ~seq_reject
            w = tl.where(raw > hi, hi, tl.where(raw < lo, lo, raw))
            truncated = kept & out
        tl.store(weights_ptr + pos, tl.where(kept, w, 1.0), mask=in_seq)
        tl.store(keep_ptr + pos, kept.to(tl.uint8), mask=in_seq)
        is_num = w == w
        tokens += tl.sum(valid.to(tl.int32), 0).to(tl.int64)
        kept_n += tl.sum(kept.to(tl.int32), 0).to(tl.int64)
        truncated_n += tl.sum(truncated.to(tl.int32), 0).to(tl.int64)
        # tl.min/tl.max do not promise NaN propagation: NaNs are counted and applied at the end
        nan_n += tl.sum((kept & ~is_num).to(tl.int32), 0).to(tl.int64)
        w_sum += tl.sum(tl.where(kept, w, 0.0), 0)
        w_min = tl.minimum(w_min, tl.min(tl.where(kept & is_num, w, float("inf")), 0))
        w_max = tl.maximum(w_max, tl.max(tl.where(kept & is_num, w, float("-inf")), 0))
        k1_sum += tl.sum(tl.where(valid, -d, 0.0), 0)
        k3_sum += tl.sum(tl.where(valid, expm1mx(d), 0.0), 0)

    row = part_ptr + seq * PARTS.NUM_CORRECTION_PARTIALS
    tl.store(row + PARTS.PART_WEIGHT_SUM, w_sum)
    tl.store(row + PARTS.PART_WEIGHT_MIN, w_min)
    tl.store(row + PARTS.PART_WEIGHT_MAX, w_max)
    tl.store(row + PARTS.PART_NEG_LOG_RATIO_SUM, k1_sum)
    tl.store(row + PARTS.PART_K3_SUM, k3_sum)
    for j in tl.static_range(PARTS.PART_K3_SUM + 1, PARTS.NUM_CORRECTION_PARTIALS):  # padding of the row
        tl.store(row + j, w_sum * 0.0)
    counts = count_ptr + seq * COUNTS.NUM_CORRECTION_COUNTS
    tl.store(counts + COUNTS.COUNT_TOKENS, tokens)
    tl.store(counts + COUNTS.COUNT_KEPT, kept_n)
    tl.store(counts + COUNTS.COUNT_TRUNCATED, truncated_n)
    tl.store(counts + COUNTS.COUNT_NAN, nan_n)
    tl.store(counts + COUNTS.COUNT_SEQS, (tokens > 0).to(tl.int64))
    tl.store(counts + COUNTS.COUNT_MASKED_SEQS, (kept_n < tokens).to(tl.int64))
    for j in tl.static_range(COUNTS.COUNT_MASKED_SEQS + 1, COUNTS.NUM_CORRECTION_COUNTS):
        tl.store(counts + j, tokens * 0)


@triton.jit
def _ratio_or_zero(num, den):
    return tl.where(den > 0, num / tl.maximum(den, 1).to(tl.float32), 0.0)


@triton.jit(do_not_specialize=["n_seq"])
def rollout_correction_finalize_kernel(
    part_ptr,  # [S, NUM_CORRECTION_PARTIALS] fp32
    count_ptr,  # [S, NUM_CORRECTION_COUNTS] int64
    stats_ptr,  # [NUM_CORRECTION_STATS] fp32 out
    n_seq,
    BLOCK_R: tl.constexpr,
):
    cols, total, low, high = column_stats(part_ptr, n_seq, PARTS.NUM_CORRECTION_PARTIALS, BLOCK_R)
    ccols, count = column_sums(count_ptr, n_seq, COUNTS.NUM_CORRECTION_COUNTS, BLOCK_R)
    tokens = column_value(count, ccols, COUNTS.COUNT_TOKENS)
    kept = column_value(count, ccols, COUNTS.COUNT_KEPT)
    nan = column_value(count, ccols, COUNTS.COUNT_NAN)
    masked = tokens - kept
    w_min = tl.where(nan > 0, float("nan"), tl.where(kept > 0, column_value(low, cols, PARTS.PART_WEIGHT_MIN), 0.0))
    w_max = tl.where(nan > 0, float("nan"), tl.where(kept > 0, column_value(high, cols, PARTS.PART_WEIGHT_MAX), 0.0))
    tl.store(stats_ptr + STATS.STAT_WEIGHT_MEAN, _ratio_or_zero(column_value(total, cols, PARTS.PART_WEIGHT_SUM), kept))
    tl.store(stats_ptr + STATS.STAT_WEIGHT_MIN, w_min)
    tl.store(stats_ptr + STATS.STAT_WEIGHT_MAX, w_max)
    truncated = column_value(count, ccols, COUNTS.COUNT_TRUNCATED).to(tl.float32)
    tl.store(stats_ptr + STATS.STAT_TRUNCATED_FRACTION, _ratio_or_zero(truncated, tokens))
    tl.store(stats_ptr + STATS.STAT_MASKED_FRACTION, _ratio_or_zero(masked.to(tl.float32), tokens))
    masked_seqs = column_value(count, ccols, COUNTS.COUNT_MASKED_SEQS).to(tl.float32)
    tl.store(stats_ptr + STATS.STAT_MASKED_SEQ_FRACTION,
             _ratio_or_zero(masked_seqs, column_value(count, ccols, COUNTS.COUNT_SEQS)))  # fmt: skip
    tl.store(stats_ptr + STATS.STAT_MASKED_TOKENS, masked.to(tl.float32))
    k1 = column_value(total, cols, PARTS.PART_NEG_LOG_RATIO_SUM)
    tl.store(stats_ptr + STATS.STAT_KL_K1, _ratio_or_zero(k1, tokens))
    tl.store(stats_ptr + STATS.STAT_KL_K3, _ratio_or_zero(column_value(total, cols, PARTS.PART_K3_SUM), tokens))


def rollout_correction_fwd(old_logprobs, rollout_logprobs, valid, cu_seqlens, cfg, weights, keep, stats) -> None:
    """Host launcher. old_logprobs, rollout_logprobs [N] (any float dtype each), valid [N] bool,
    cu_seqlens [S + 1] int64 (all contiguous), ``cfg``: the op's ``CorrectionConfig``; writes
    weights [N] fp32 and keep [N] bool for every token of every sequence (others left as they are)
    and stats [NUM_CORRECTION_STATS] fp32."""
    level, mode = CorrectionLevel(int(cfg.level)), CorrectionMode(int(cfg.mode))  # unknown codes raise
    n_seq = cu_seqlens.numel() - 1
    device = valid.device
    part = torch.empty((n_seq, CorrectionPartial.NUM_CORRECTION_PARTIALS), dtype=torch.float32, device=device)
    count = torch.empty((n_seq, CorrectionCount.NUM_CORRECTION_COUNTS), dtype=torch.int64, device=device)
    if n_seq > 0:
        rollout_correction_fwd_kernel[(n_seq,)](
            old_ptr=old_logprobs, rollout_ptr=rollout_logprobs, valid_ptr=valid.view(torch.uint8), cu_ptr=cu_seqlens,
            weights_ptr=weights, keep_ptr=keep.view(torch.uint8), part_ptr=part, count_ptr=count,
            n_tokens=valid.numel(), lo=cfg.lo, hi=cfg.hi, log_clamp=cfg.log_clamp, veto_lo=cfg.veto_lo,
            veto_hi=cfg.veto_hi, LEVEL=int(level), MODE=int(mode), HAS_VETO=bool(cfg.has_veto), BLOCK=_BLOCK,
            num_warps=4,
        )  # fmt: skip
    rollout_correction_finalize_kernel[(1,)](
        part_ptr=part, count_ptr=count, stats_ptr=stats, n_seq=n_seq, BLOCK_R=_FINALIZE_ROWS, num_warps=4
    )


# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(level: CorrectionLevel, mode: CorrectionMode, old_dtype: torch.dtype, has_veto: bool):
    """One launch (forward + finalize) on 2 sequences of 8 tokens: old log-probs in ``old_dtype``,
    rollout log-probs fp32."""

    def run():
        from lenkernels.ops.rollout_correction import CorrectionConfig

        n = 16
        cfg = CorrectionConfig(level, mode, lo=0.5, hi=2.0, has_veto=has_veto, veto_lo=1e-4, veto_hi=1e4)
        rollout_correction_fwd(torch.zeros(n, dtype=old_dtype), torch.zeros(n), torch.ones(n, dtype=torch.bool),
                               torch.tensor([0, 8, n]), cfg, torch.empty(n), torch.empty(n, dtype=torch.bool),
                               torch.empty(CorrectionStat.NUM_CORRECTION_STATS))  # fmt: skip

    return run


# every level and mode, fp32 without the veto and bf16 old log-probs with it
AOT_CASES = [
    _aot_case(level, mode, old_dtype, has_veto)
    for level in CorrectionLevel
    for mode in CorrectionMode
    for old_dtype, has_veto in ((torch.float32, False), (torch.bfloat16, True))
]
