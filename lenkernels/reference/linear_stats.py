"""Reference token log-probabilities and entropy from the last hidden state and the LM head.

The definition: ``logits = hidden @ weight.T + bias`` accumulated exactly and rounded once to
the hidden dtype (what an eager ``F.linear`` in that dtype produces, up to its summation order),
then SPEC 1 on those logits. Every backend is tested against it.
"""

from __future__ import annotations

import torch

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
