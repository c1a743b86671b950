"""Triton kernels for phase-split statistics (SPEC 6) and per-sequence token statistics.

  phase_stats_fwd_kernel     grid (S, C): one program per (sequence, value channel) walks its
                             sequence once in BLOCK-token tiles, finding the first delimiter
                             occurrence and summing the think and answer phases in the same pass
  phase_stats_bwd_kernel     grid (S, C): writes d(value) = g_mean / count + g_sum of each token's
                             phase (0 for delimiter, padding and prompt tokens)
  sequence_stats_fwd_kernel  grid (S,): length, mean/min/max, fraction above a threshold and,
                             optionally (WRITE_MASK), the high-value token mask of one sequence

Sequences are ``cu_seqlens[s] <= t < cu_seqlens[s + 1]`` of a flat [N] layout (a padded [B, T]
batch uses ``arange(B + 1) * T``). Reductions are per-sequence, in a fixed tile order: no atomics,
bitwise reproducible. Sizes, strides, the delimiter length and the threshold are runtime values
(do_not_specialize): new lengths never recompile. The launchers at the end are the ``backend="triton"``
implementation of the phase_stats family (same signatures as ``lenkernels/{cpu,cuda,reference}/phase_stats.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels.triton.utils import sequence_bounds, sequence_tile

_BLOCK = 1024


@triton.jit
def _channel_sequence(cu_ptr, values_ptr, n_tokens, n_seq, channel_stride):
    """The (sequence, channel) of this program (grid (S, C)): (seq, start, end, index of the [C, S]
    outputs, the channel's values pointer)."""
    seq = tl.program_id(0).to(tl.int64)
    channel = tl.program_id(1).to(tl.int64)
    start, end = sequence_bounds(cu_ptr, seq, n_tokens)
    return seq, start, end, channel * n_seq + seq, values_ptr + channel * channel_stride


@triton.jit
def _phase_grad(g_mean_ptr, g_sum_ptr, g, count):
    """d(phase mean, phase sum)/d(token) against their cotangents at [C, S] index g; 0 for an empty phase."""
    return tl.where(count > 0, tl.load(g_mean_ptr + g) / tl.maximum(count, 1).to(tl.float32) + tl.load(g_sum_ptr + g),
                    0.0)  # fmt: skip


@triton.jit(do_not_specialize=["n_tokens", "n_seq", "channel_stride", "delim_len"])
def phase_stats_fwd_kernel(
    values_ptr,  # [C, N] any float dtype, channel_stride apart
    ids_ptr,  # [N] int32/int64
    valid_ptr,  # [N] uint8 (1 = response token)
    cu_ptr,  # [S + 1] int64
    delim_ptr,  # [L] int64
    think_mean_ptr,  # [C, S] fp32 out
    think_sum_ptr,
    answer_mean_ptr,
    answer_sum_ptr,
    think_count_ptr,  # [S] int64 out (written by channel 0)
    answer_count_ptr,
    k_ptr,
    found_ptr,  # [S] uint8 out
    n_tokens,
    n_seq,
    channel_stride,
    delim_len,
    BLOCK: tl.constexpr,
):
    seq, start, end, out, values_ptr = _channel_sequence(cu_ptr, values_ptr, n_tokens, n_seq, channel_stride)
    length = end - start
    # k = sequence length until an occurrence is found. Tiles run in order, so once k is set every
    # later token is already classified correctly: think if offset < k, answer if >= k + L.
    k = length
    think_sum = tl.zeros([], tl.float32)
    answer_sum = tl.zeros([], tl.float32)
    think_n = tl.zeros([], tl.int64)
    answer_n = tl.zeros([], tl.int64)
    for first in range(start, end, BLOCK):
        pos, in_seq, valid = sequence_tile(valid_ptr, first, end, BLOCK)
        hit = in_seq & (pos + delim_len <= end)
        for j in range(delim_len):
            tok = tl.load(ids_ptr + pos + j, mask=hit, other=-1).to(tl.int64)
            ok = tl.load(valid_ptr + pos + j, mask=hit, other=0) != 0
            hit = hit & ok & (tok == tl.load(delim_ptr + j))
        offset = pos - start
        k = tl.minimum(k, tl.min(tl.where(hit, offset, length), 0))
        x = tl.load(values_ptr + pos, mask=valid, other=0.0).to(tl.float32)
        think = valid & (offset < k)
        answer = valid & (offset >= k + delim_len)
        think_sum += tl.sum(tl.where(think, x, 0.0), 0)
        answer_sum += tl.sum(tl.where(answer, x, 0.0), 0)
        think_n += tl.sum(think.to(tl.int32), 0).to(tl.int64)
        answer_n += tl.sum(answer.to(tl.int32), 0).to(tl.int64)
    tl.store(think_sum_ptr + out, think_sum)
    tl.store(answer_sum_ptr + out, answer_sum)
    tl.store(think_mean_ptr + out, tl.where(think_n > 0, think_sum / tl.maximum(think_n, 1).to(tl.float32), 0.0))
    tl.store(answer_mean_ptr + out, tl.where(answer_n > 0, answer_sum / tl.maximum(answer_n, 1).to(tl.float32), 0.0))
    first_channel = tl.program_id(1).to(tl.int64) == 0
    tl.store(think_count_ptr + seq, think_n, mask=first_channel)
    tl.store(answer_count_ptr + seq, answer_n, mask=first_channel)
    tl.store(k_ptr + seq, k, mask=first_channel)
    tl.store(found_ptr + seq, (k < length).to(tl.uint8), mask=first_channel)


@triton.jit(do_not_specialize=["n_tokens", "n_seq", "channel_stride", "delim_len"])
def phase_stats_bwd_kernel(
    dvalues_ptr,  # [C, N] out, values dtype
    valid_ptr,  # [N] uint8
    cu_ptr,  # [S + 1] int64
    k_ptr,  # [S] int64
    think_count_ptr,
    answer_count_ptr,
    g_think_mean_ptr,  # [C, S] fp32, contiguous
    g_think_sum_ptr,
    g_answer_mean_ptr,
    g_answer_sum_ptr,
    n_tokens,
    n_seq,
    channel_stride,
    delim_len,
    BLOCK: tl.constexpr,
):
    seq, start, end, g, dvalues_ptr = _channel_sequence(cu_ptr, dvalues_ptr, n_tokens, n_seq, channel_stride)
    k = tl.load(k_ptr + seq)
    g_think = _phase_grad(g_think_mean_ptr, g_think_sum_ptr, g, tl.load(think_count_ptr + seq))
    g_answer = _phase_grad(g_answer_mean_ptr, g_answer_sum_ptr, g, tl.load(answer_count_ptr + seq))
    for first in range(start, end, BLOCK):
        pos, in_seq, valid = sequence_tile(valid_ptr, first, end, BLOCK)
        offset = pos - start
        grad = tl.where(valid & (offset < k), g_think, tl.where(valid & (offset >= k + delim_len), g_answer, 0.0))
        tl.store(dvalues_ptr + pos, grad.to(dvalues_ptr.dtype.element_ty), mask=in_seq)


@triton.jit(do_not_specialize=["n_tokens", "threshold"])
def sequence_stats_fwd_kernel(
    values_ptr,  # [N] any float dtype
    valid_ptr,  # [N] uint8
    cu_ptr,  # [S + 1] int64
    quantile_ptr,  # [1] fp32 (read only with WRITE_MASK)
    length_ptr,  # [S] int64 out
    mean_ptr,  # [S] fp32 out
    min_ptr,
    max_ptr,
    frac_ptr,
    high_ptr,  # [N] uint8 out (WRITE_MASK)
    n_tokens,
    threshold,
    WRITE_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start, end = sequence_bounds(cu_ptr, seq, n_tokens)
    quantile = tl.load(quantile_ptr) if WRITE_MASK else 0.0
    count = tl.zeros([], tl.int64)
    above = tl.zeros([], tl.int64)
    n_nan = tl.zeros([], tl.int64)
    total = tl.zeros([], tl.float32)
    vmin = tl.zeros([], tl.float32) + float("inf")
    vmax = tl.zeros([], tl.float32) - float("inf")
    for first in range(start, end, BLOCK):
        pos, in_seq, valid = sequence_tile(valid_ptr, first, end, BLOCK)
        x = tl.load(values_ptr + pos, mask=valid, other=0.0).to(tl.float32)
        count += tl.sum(valid.to(tl.int32), 0).to(tl.int64)
        above += tl.sum((valid & (x > threshold)).to(tl.int32), 0).to(tl.int64)
        # tl.min/tl.max do not promise NaN propagation: count NaNs and apply them at the end
        is_num = x <= float("inf")  # false only for NaN
        n_nan += tl.sum((valid & ~is_num).to(tl.int32), 0).to(tl.int64)
        total += tl.sum(tl.where(valid, x, 0.0), 0)
        vmin = tl.minimum(vmin, tl.min(tl.where(valid & is_num, x, float("inf")), 0))
        vmax = tl.maximum(vmax, tl.max(tl.where(valid & is_num, x, float("-inf")), 0))
        if WRITE_MASK:
            tl.store(high_ptr + pos, (valid & (x >= quantile)).to(tl.uint8), mask=in_seq)
    nonempty = count > 0
    n = tl.maximum(count, 1).to(tl.float32)
    vmin = tl.where(n_nan > 0, float("nan"), vmin)
    vmax = tl.where(n_nan > 0, float("nan"), vmax)
    tl.store(length_ptr + seq, count)
    tl.store(mean_ptr + seq, tl.where(nonempty, total / n, 0.0))
    tl.store(min_ptr + seq, tl.where(nonempty, vmin, 0.0))
    tl.store(max_ptr + seq, tl.where(nonempty, vmax, 0.0))
    tl.store(frac_ptr + seq, tl.where(nonempty, above.to(tl.float32) / n, 0.0))


def _launch(values, valid, cu_seqlens, split, delim_len: int) -> tuple[tuple[int, int], dict]:
    """The grid (S, C) of the phase kernels over values / dvalues [C, N], and the arguments both take:
    the layout, and the split of each sequence ``split`` = (k, think_count, answer_count) [S] int64
    (written by the forward, read by the backward)."""
    n_channels, n_tokens = values.shape
    n_seq = cu_seqlens.numel() - 1
    common = {"valid_ptr": valid.view(torch.uint8), "cu_ptr": cu_seqlens, "n_tokens": n_tokens, "n_seq": n_seq,
              "channel_stride": values.stride(0), "delim_len": delim_len, "BLOCK": _BLOCK, "num_warps": 4}  # fmt: skip
    common.update(zip(("k_ptr", "think_count_ptr", "answer_count_ptr"), split))
    return (n_seq, n_channels), common


def phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, think_mean, think_sum, answer_mean, answer_sum,
                    think_count, answer_count, k, found):  # fmt: skip
    """Host launcher. values [C, N] (unit stride along N), ids [N] int32/int64, valid [N] bool,
    cu_seqlens [S + 1] int64, delimiter [L] int64 (all contiguous); writes the [C, S] fp32, [S]
    int64 and found [S] bool outputs."""
    grid, common = _launch(values, valid, cu_seqlens, (k, think_count, answer_count), delimiter.numel())
    phase_stats_fwd_kernel[grid](
        values_ptr=values,
        ids_ptr=ids,
        delim_ptr=delimiter,
        think_mean_ptr=think_mean,
        think_sum_ptr=think_sum,
        answer_mean_ptr=answer_mean,
        answer_sum_ptr=answer_sum,
        found_ptr=found.view(torch.uint8),
        **common,
    )


def phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len, g_think_mean, g_think_sum,
                    g_answer_mean, g_answer_sum, dvalues):  # fmt: skip
    """Host launcher: writes dvalues [C, N] (values dtype) for every token of every sequence from
    the fp32 [C, S] contiguous cotangents; valid [N] bool."""
    grid, common = _launch(dvalues, valid, cu_seqlens, (k, think_count, answer_count), delim_len)
    phase_stats_bwd_kernel[grid](
        g_think_mean_ptr=g_think_mean,
        g_think_sum_ptr=g_think_sum,
        g_answer_mean_ptr=g_answer_mean,
        g_answer_sum_ptr=g_answer_sum,
        dvalues_ptr=dvalues,
        **common,
    )


def sequence_stats_fwd(values, valid, cu_seqlens, threshold, quantile, length, mean, vmin, vmax, frac, high):
    """Host launcher. values [N], valid [N] bool, quantile [1] fp32 or None; high [N] bool is
    written only with a quantile."""
    n_seq = cu_seqlens.numel() - 1
    write_mask = quantile is not None
    valid = valid.view(torch.uint8)
    sequence_stats_fwd_kernel[(n_seq,)](
        values_ptr=values,
        valid_ptr=valid,
        cu_ptr=cu_seqlens,
        quantile_ptr=quantile if write_mask else mean,
        length_ptr=length,
        mean_ptr=mean,
        min_ptr=vmin,
        max_ptr=vmax,
        frac_ptr=frac,
        high_ptr=high.view(torch.uint8) if write_mask else valid,
        n_tokens=values.numel(),
        threshold=float(threshold),
        WRITE_MASK=write_mask,
        BLOCK=_BLOCK,
        num_warps=4,
    )


# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(dtype: torch.dtype, ids_dtype: torch.dtype = torch.int64, sequence_stats: bool = True):
    """Forward and backward of the phase split, then the sequence statistics with and without a
    quantile (``sequence_stats``), on 2 channels x 2 sequences of 8 tokens in ``dtype``."""

    def run():
        n, s = 16, 2
        valid, cu = torch.ones(n, dtype=torch.bool), torch.tensor([0, 8, n])
        i64 = {"dtype": torch.int64}
        f32, counts = [torch.empty((2, s)) for _ in range(4)], [torch.empty(s, **i64) for _ in range(3)]
        phase_stats_fwd(torch.zeros((2, n), dtype=dtype), torch.zeros(n, dtype=ids_dtype), valid, cu,
                        torch.tensor([1, 2]), *f32, *counts, torch.empty(s, dtype=torch.bool))  # fmt: skip
        phase_stats_bwd(valid, cu, counts[2], counts[0], counts[1], 2, *f32, torch.empty((2, n), dtype=dtype))
        if sequence_stats:
            for quantile in (torch.zeros(1), None):
                sequence_stats_fwd(torch.zeros(n, dtype=dtype), valid, cu, 0.5, quantile, torch.empty(s, **i64),
                                   *[torch.empty(s) for _ in range(4)], torch.empty(n, dtype=torch.bool))  # fmt: skip

    return run


AOT_CASES = [
    _aot_case(torch.float32),
    _aot_case(torch.bfloat16, ids_dtype=torch.int32),
    _aot_case(torch.float16, sequence_stats=False),
]
