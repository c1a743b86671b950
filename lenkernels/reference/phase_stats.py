"""Reference phase-split statistics (SPEC 6) and per-sequence token statistics.

Everything works on the flat layout: values ``[C, N]`` (C statistics of the same tokens), ids and
``valid`` ``[N]``, and offsets ``cu_seqlens`` ``[S + 1]``; sequence ``s`` is the tokens
``cu_seqlens[s] <= t < cu_seqlens[s + 1]``. A padded ``[B, T]`` batch is the flat layout with
``cu_seqlens = arange(B + 1) * T`` (see :func:`padded_offsets`).

Definition (SPEC 6): k = offset of the first position where the L delimiter tokens occur
consecutively, all of them response tokens inside the sequence. Think = response tokens at
offsets < k, answer = response tokens at offsets >= k + L. No occurrence: k = the sequence length
(every response token is think, none is answer), ``found = False``. Empty phase: mean 0, count 0.
"""

from __future__ import annotations

import torch


def padded_offsets(batch: int, length: int, device=None) -> torch.Tensor:
    """``cu_seqlens`` of a padded ``[batch, length]`` layout: ``arange(batch + 1) * length``."""
    return torch.arange(batch + 1, dtype=torch.int64, device=device) * length


def _segments(cu_seqlens: torch.Tensor, n_tokens: int):
    """(sequence index, offset inside it, sequence length) of every token; index -1 outside all."""
    cu = cu_seqlens.to(torch.int64).clamp(0, n_tokens)
    t = torch.arange(n_tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    inside = (t >= cu[0]) & (seq < cu.numel() - 1)
    seq = torch.where(inside, seq, torch.full_like(seq, -1))
    safe = seq.clamp(min=0)
    start = cu[safe]
    length = cu[safe + 1] - start
    return seq, t - start, length


def find_delimiter(ids, valid, cu_seqlens, delimiter):
    """``(k, found)`` per sequence, int64 and bool ``[S]``."""
    n = ids.numel()
    delimiter = torch.as_tensor(delimiter, dtype=torch.int64, device=ids.device).reshape(-1)
    width = delimiter.numel()
    seq, offset, length = _segments(cu_seqlens, n)
    ids = ids.to(torch.int64)
    # match[t]: the delimiter starts at t; every one of its tokens is a response token
    match = (seq >= 0) & (offset + width <= length)
    for j in range(width):
        shifted_ids = torch.full_like(ids, -1)
        shifted_valid = torch.zeros_like(valid)
        if j < n:  # (a negative end would wrap around)
            shifted_ids[: n - j] = ids[j:]
            shifted_valid[: n - j] = valid[j:]
        match &= (shifted_ids == delimiter[j]) & shifted_valid
    cu = cu_seqlens.to(torch.int64).clamp(0, n)
    seq_len = cu[1:] - cu[:-1]
    k = seq_len.clone()
    hit = match.nonzero().reshape(-1)
    k.scatter_reduce_(0, seq[hit], offset[hit], reduce="amin", include_self=True)
    return k, k < seq_len


def phase_masks(ids, valid, cu_seqlens, delimiter):
    """Boolean ``[N]`` think and answer masks, plus ``(k, found)`` per sequence."""
    width = torch.as_tensor(delimiter).numel()
    k, found = find_delimiter(ids, valid, cu_seqlens, delimiter)
    seq, offset, _ = _segments(cu_seqlens, ids.numel())
    inside = seq >= 0
    k_tok = k[seq.clamp(min=0)] if k.numel() else offset  # no sequences: no token is inside
    think = valid & inside & (offset < k_tok)
    answer = valid & inside & (offset >= k_tok + width)
    return think, answer, k, found


def phase_stats(values, ids, valid, cu_seqlens, delimiter, dtype=torch.float64):
    """The statistics of SPEC 6 for values ``[C, N]`` (or ``[N]``), differentiable in ``values``.

    Returns ``(think_mean, think_sum, answer_mean, answer_sum, think_count, answer_count, k, found)``:
    means and sums ``[C, S]`` (``[S]`` for 1-D values) in ``dtype``, counts and k int64 ``[S]``,
    found bool ``[S]``.
    """
    squeeze = values.dim() == 1
    v = values.reshape(-1 if squeeze else values.shape[0], ids.numel()).to(dtype)
    if squeeze:
        v = v.reshape(1, -1)
    valid = valid.to(torch.bool)
    think, answer, k, found = phase_masks(ids, valid, cu_seqlens, delimiter)
    seq, _, _ = _segments(cu_seqlens, ids.numel())
    n_seq = cu_seqlens.numel() - 1
    idx = seq.clamp(min=0)

    def segment_sum(x, member):
        out = torch.zeros(x.shape[0], n_seq, dtype=x.dtype, device=x.device)
        return out.index_add(1, idx, torch.where(member, x, torch.zeros_like(x)))

    think_sum = segment_sum(v, think)
    answer_sum = segment_sum(v, answer)
    counts = torch.zeros(2, n_seq, dtype=torch.int64, device=ids.device)
    counts = counts.index_add(1, idx, torch.stack([think, answer]).to(torch.int64))
    think_count, answer_count = counts[0], counts[1]
    think_mean = think_sum / think_count.clamp(min=1).to(dtype)
    answer_mean = answer_sum / answer_count.clamp(min=1).to(dtype)
    out = [think_mean, think_sum, answer_mean, answer_sum]
    if squeeze:
        out = [o[0] for o in out]
    return (*out, think_count, answer_count, k, found)


def phase_stats_forward(values2d, ids, valid, cu_seqlens, delimiter):
    """The ``reference`` backend's forward: float64 maths, float32 statistics."""
    tm, ts, am, as_, tc, ac, k, found = phase_stats(values2d, ids, valid, cu_seqlens, delimiter)
    f32 = torch.float32
    return tm.to(f32), ts.to(f32), am.to(f32), as_.to(f32), tc, ac, k, found


def phase_stats_backward(values2d, valid, cu_seqlens, k, think_count, answer_count, delim_len, g_tm, g_ts, g_am, g_as):
    """The ``reference`` backend's backward: d(value) = g_mean / count + g_sum of the token's phase."""
    n = values2d.shape[1]
    seq, offset, _ = _segments(cu_seqlens, n)
    inside = seq >= 0
    idx = seq.clamp(min=0)
    valid = valid.to(torch.bool) & inside
    if k.numel() == 0:
        return torch.zeros_like(values2d)
    k_tok = k[idx]
    think = valid & (offset < k_tok)
    answer = valid & (offset >= k_tok + delim_len)
    f64 = torch.float64
    g_think = g_tm.to(f64) / think_count.clamp(min=1).to(f64) + g_ts.to(f64)
    g_answer = g_am.to(f64) / answer_count.clamp(min=1).to(f64) + g_as.to(f64)
    zero = torch.zeros((), dtype=f64, device=values2d.device)
    grad = torch.where(think, g_think[:, idx], torch.where(answer, g_answer[:, idx], zero))
    return grad.to(values2d.dtype)


def sequence_stats(values, valid, cu_seqlens, threshold: float, quantile_threshold=None, dtype=torch.float64):
    """Per sequence: ``(length, mean, min, max, frac_above, high_mask)`` over response tokens.

    ``frac_above`` counts values strictly above ``threshold``; ``high_mask`` ([N] bool, or None
    without ``quantile_threshold``) marks response tokens with value >= ``quantile_threshold``.
    Empty sequences give 0 for every statistic. NaN values propagate into mean, min and max.
    """
    n = values.numel()
    v = values.reshape(-1).to(dtype)
    valid = valid.reshape(-1).to(torch.bool)
    seq, _, _ = _segments(cu_seqlens, n)
    n_seq = cu_seqlens.numel() - 1
    member = valid & (seq >= 0)
    idx = seq.clamp(min=0)
    zero = torch.zeros((), dtype=dtype, device=v.device)
    length = torch.zeros(n_seq, dtype=torch.int64, device=v.device).index_add(0, idx, member.to(torch.int64))
    total = torch.zeros(n_seq, dtype=dtype, device=v.device).index_add(0, idx, torch.where(member, v, zero))
    above = torch.zeros(n_seq, dtype=dtype, device=v.device).index_add(0, idx, (member & (v > threshold)).to(dtype))
    inf = torch.tensor(float("inf"), dtype=dtype, device=v.device)
    vmin = torch.full((n_seq,), float("inf"), dtype=dtype, device=v.device)
    vmax = torch.full((n_seq,), float("-inf"), dtype=dtype, device=v.device)
    vmin = vmin.scatter_reduce(0, idx, torch.where(member, v, inf), reduce="amin")
    vmax = vmax.scatter_reduce(0, idx, torch.where(member, v, -inf), reduce="amax")
    nonempty = length > 0
    denom = length.clamp(min=1).to(dtype)
    mean = torch.where(nonempty, total / denom, zero)
    vmin = torch.where(nonempty, vmin, zero)
    vmax = torch.where(nonempty, vmax, zero)
    frac = torch.where(nonempty, above / denom, zero)
    high = None
    if quantile_threshold is not None:
        thr = torch.as_tensor(quantile_threshold, device=v.device).reshape(()).to(dtype)
        high = member & (v >= thr)
    return length, mean, vmin, vmax, frac, high


def top_entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """TRL's ``top_entropy_quantile`` threshold: the ``1 - top_quantile`` quantile (linear
    interpolation, ``torch.quantile``) of the float32 entropies of all response tokens; NaN when
    there are none (TRL then selects no token)."""
    local = entropy[mask.bool()].float()
    if local.numel() == 0:
        return torch.tensor(float("nan"), device=entropy.device)
    return torch.quantile(local, 1.0 - top_quantile)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """TRL ``get_high_entropy_mask``: response tokens whose entropy is >= the threshold above."""
    threshold = top_entropy_threshold(entropy, mask, top_quantile)
    return (entropy.float() >= threshold) & mask.bool()


# --- launchers of the reference backend (the signatures of lenkernels/{cpu,cuda,triton}/phase_stats.py)


def phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, think_mean, think_sum, answer_mean, answer_sum,
                    think_count, answer_count, k, found) -> None:  # fmt: skip
    """Writes the split of values ``[C, N]`` into the outputs given: means and sums fp32 ``[C, S]``,
    counts and k int64 ``[S]``, found bool ``[S]`` (float64 maths)."""
    outs = (think_mean, think_sum, answer_mean, answer_sum, think_count, answer_count, k, found)
    for out, value in zip(outs, phase_stats_forward(values, ids, valid, cu_seqlens, delimiter)):
        out.copy_(value)


def phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len: int, g_think_mean, g_think_sum,
                    g_answer_mean, g_answer_sum, dvalues) -> None:  # fmt: skip
    """Writes dvalues ``[C, N]`` for every token of every sequence; tokens outside all sequences
    are left as they are."""
    grad = phase_stats_backward(dvalues, valid, cu_seqlens, k, think_count, answer_count, delim_len, g_think_mean,
                                g_think_sum, g_answer_mean, g_answer_sum)  # fmt: skip
    seq, _, _ = _segments(cu_seqlens, valid.numel())
    dvalues.copy_(torch.where(seq >= 0, grad, dvalues))


def sequence_stats_fwd(values, valid, cu_seqlens, threshold: float, quantile, length, mean, vmin, vmax, frac,
                       high) -> None:  # fmt: skip
    """Writes length int64 ``[S]``, mean/min/max/frac fp32 ``[S]`` and, with a quantile (fp32
    ``[1]``), high bool ``[N]`` (tokens outside all sequences left as they are)."""
    res = sequence_stats(values, valid, cu_seqlens, threshold, quantile)
    for out, value in zip((length, mean, vmin, vmax, frac), res[:5]):
        out.copy_(value)
    if quantile is not None:
        seq, _, _ = _segments(cu_seqlens, values.numel())
        high.copy_(torch.where(seq >= 0, res[5], high))
