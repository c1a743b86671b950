"""Reference token log-probabilities and entropy from the last hidden state and the LM head.

The definition: ``logits = hidden @ weight.T + bias`` accumulated exactly and rounded once to
the hidden dtype (what an eager ``F.linear`` in that dtype produces, up to its summation order),
then SPEC 1 on those logits. Every backend is tested against it.

Below the definition: the tiling every backend shares (``tile_plan``: the memory bound, and the
order in which vocabulary chunks merge), the eager GEMM of one logits tile, and the launchers of
the ``reference`` backend (``linear_stats_fwd``, ``linear_stats_bwd_tile``; the signatures of
``lenkernels/{cpu,triton}/linear_stats.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lenkernels import distributed as lkdist
from lenkernels.reference import token_stats as ref_token_stats


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` computed in float64 and rounded once to ``hidden.dtype``.

    Differentiable; float64 inputs give float64 logits (no rounding at all).
    """
    acc = hidden.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        acc = acc + bias.to(torch.float64)
    return acc.to(hidden.dtype)


def linear_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature=1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy)`` of shape ``ids.shape`` in ``dtype``, differentiable in ``hidden``,
    ``weight`` and ``bias``.

    ``hidden`` is ``[..., D]``, ``weight`` ``[V, D]``, ``bias`` ``[V]``; the logits are
    ``linear_logits(hidden, weight, bias)`` (rounded to the hidden dtype), then SPEC 1 with
    temperature (float or tensor broadcastable to ``ids``) and ``ignore_index``. It materialises
    the ``[..., V]`` logits: a definition for tests, not for training.
    """
    logits = linear_logits(hidden, weight, bias)
    return ref_token_stats.token_logprobs_entropy(logits, ids, temperature, ignore_index, dtype)


def shard_dlogits(logits2d, local_ids, temperature1d, lse, mean_z, g_logprobs, g_entropy) -> torch.Tensor:
    """SPEC 1's gradient of one vocabulary shard or chunk of the logits, in float64, returned in
    the logits dtype.

    ``lse`` and ``mean_z`` are those of the whole vocabulary (merged over shards); ``local_ids``
    are shard-local (``lenkernels.distributed``): ``-1`` ignored row (entropy gradient only),
    ``-2`` target in another shard (``-p_j`` logprob term, no one-hot), else the column of the
    target in this shard.
    """
    temp = temperature1d.to(torch.float64).expand(local_ids.shape).unsqueeze(-1)
    z = logits2d.to(torch.float64) / temp
    p = torch.exp(z - lse.to(torch.float64).unsqueeze(-1))
    z_finite = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    ent = torch.where(p > 0, p * (z_finite - mean_z.to(torch.float64).unsqueeze(-1)), torch.zeros_like(p))
    ignored = (local_ids == -1).unsqueeze(-1)
    g_lp = torch.where(ignored, torch.zeros_like(p[:, :1]), g_logprobs.to(torch.float64).unsqueeze(-1))
    cols = torch.arange(logits2d.shape[-1], device=logits2d.device)
    onehot = (cols == local_ids.unsqueeze(-1)).to(torch.float64)
    g_h = g_entropy.to(torch.float64).unsqueeze(-1)
    return ((g_lp * (onehot - p) - g_h * ent) / temp).to(logits2d.dtype)


# --- tiles: rows x vocabulary columns of the logits, at most chunk_size of them --------------------


def tile_plan(n_rows: int, vocab: int, chunk_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of a logits tile with ``rows * cols <= chunk_size`` (at least 1 x 1).

    Whole rows when they fit; otherwise vocabulary chunks of at least ``sqrt(chunk_size)`` columns
    (so the GEMMs stay large) covering as many rows as fit. Forward and backward use the same plan.
    """
    if n_rows * vocab <= chunk_size:
        return max(n_rows, 1), max(vocab, 1)
    cols = min(vocab, max(chunk_size // max(n_rows, 1), math.isqrt(chunk_size)))
    rows = min(n_rows, max(1, chunk_size // cols))
    return rows, cols


def spans(total: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``step`` covering ``[0, total)``, in order."""
    return [(start, min(total, start + step)) for start in range(0, total, step)]


def row_slice(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows of a per-row [N] tensor, or the tensor itself when it is a broadcast scalar [1]."""
    return t if t.numel() == 1 else t[r0:r1]


def tile_logits(hidden, weight, bias, r0: int, r1: int, v0: int, v1: int, out=None) -> torch.Tensor:
    """Logits rows ``[r0, r1)`` x columns ``[v0, v1)`` with an eager GEMM in the hidden dtype (into
    ``out`` when given). The forward and the backward recompute call it on the same slices:
    ``addmm``/``mm`` into ``out`` is the kernel ``F.linear`` runs, so the recomputed tile is the
    forward's tile bit for bit."""
    if out is None:
        return F.linear(hidden[r0:r1], weight[v0:v1], None if bias is None else bias[v0:v1])
    if bias is None:
        return torch.mm(hidden[r0:r1], weight[v0:v1].T, out=out)
    return torch.addmm(bias[v0:v1], hidden[r0:r1], weight[v0:v1].T, out=out)


def whole_rows_fwd(token_stats, hidden, weight, bias, local_ids, temperature, rows: int, outs) -> None:
    """The forward when a tile holds whole rows: the ``token_stats`` launchers of a backend
    (``lenkernels.<backend>.token_stats``) finish each row themselves, writing ``outs`` = (logprobs,
    entropy, lse, mean_z, max_z, log_s) fp32 ``[N]``."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    for r0, r1 in spans(n_rows, rows):
        logits = tile_logits(hidden, weight, bias, r0, r1, 0, vocab)
        ids = lkdist.chunk_ids(local_ids[r0:r1], 0, vocab, for_backward=False)
        temp = row_slice(temperature, r0, r1)
        token_stats.token_stats_fwd(logits, ids, temp, lkdist.IGNORED, *(out[r0:r1] for out in outs))
    outs[0].masked_fill_(local_ids == lkdist.ELSEWHERE, float("nan"))


# --- launchers of the reference backend --------------------------------------------------------------


def linear_stats_fwd(hidden, weight, bias, local_ids, temperature, chunk_size: int, logprobs, entropy, lse, mean_z,
                     max_z, log_s) -> None:  # fmt: skip
    """Writes the statistics of this shard's vocabulary, fp32 ``[N]`` each: logprob (``z_y - lse``
    where the target is a column of the shard, 0 for ignored rows, NaN for the others), entropy,
    lse, mean_z and the rows' online-softmax state (max_z, log_s). hidden ``[N, D]``, weight
    ``[V, D]``, bias ``[V]`` or None, local_ids int64 ``[N]`` shard-local, temperature fp32 ``[N]``
    or ``[1]``. Tiles of at most ``chunk_size`` logits: each chunk's statistics in float64, then the
    merge the vocabulary-parallel path uses."""
    outs = (logprobs, entropy, lse, mean_z, max_z, log_s)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    rows, cols = tile_plan(n_rows, vocab, chunk_size)
    if cols >= vocab:
        whole_rows_fwd(ref_token_stats, hidden, weight, bias, local_ids, temperature, rows, outs)
        return
    col_spans = spans(vocab, cols)
    parts = torch.empty((5, len(col_spans), n_rows), dtype=torch.float32, device=hidden.device)
    for c, (v0, v1) in enumerate(col_spans):
        for r0, r1 in spans(n_rows, rows):
            logits = tile_logits(hidden, weight, bias, r0, r1, v0, v1)
            ids = lkdist.chunk_ids(local_ids[r0:r1], v0, v1, for_backward=False)
            stats = [torch.empty(r1 - r0, dtype=torch.float32, device=hidden.device) for _ in range(6)]
            ref_token_stats.token_stats_fwd(logits, ids, row_slice(temperature, r0, r1), lkdist.IGNORED, *stats)
            lp, ent, _, _, part_max_z, part_log_s = stats
            for k, part in enumerate((part_max_z, part_log_s, ent, lp)):
                parts[k, c, r0:r1] = part
            parts[4, c, r0:r1] = (ids >= 0).to(torch.float32)
    merged = lkdist.merge_stats(*parts[:4], parts[4] > 0, dim=0, state=True)
    lp = torch.where(local_ids == lkdist.IGNORED, torch.zeros_like(merged[0]), merged[0])
    for out, value in zip(outs, (lp, *merged[1:])):
        out.copy_(value)


def linear_stats_bwd_tile(hidden, weight, bias, local_ids, temperature, lse, mean_z, g_logprobs, g_entropy, rows,
                          cols, dlogits) -> None:  # fmt: skip
    """Writes dlogits of one tile, rows ``[r0, r1)`` x columns ``[v0, v1)`` of the shard (``rows``,
    ``cols`` the pairs), in the hidden dtype, from SPEC 1's gradient in float64. Every other tensor
    is whole ([N, D], [V, D], [N]); ``lse``/``mean_z`` are those of the whole vocabulary."""
    (r0, r1), (v0, v1) = rows, cols
    tile_logits(hidden, weight, bias, r0, r1, v0, v1, dlogits)
    ids = lkdist.chunk_ids(local_ids[r0:r1], v0, v1, for_backward=True)
    dlogits.copy_(
        shard_dlogits(
            dlogits, ids, row_slice(temperature, r0, r1), lse[r0:r1], mean_z[r0:r1], g_logprobs[r0:r1],
            g_entropy[r0:r1],
        )
    )  # fmt: skip
