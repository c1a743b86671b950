"""Rewards and advantages relative to the response's group, from one or two ``group_stats`` kernels:
Kimi k1.5's length reward (Kimi Team, 2025, arXiv:2501.12599), GRPO-lambda (Dai et al., 2025,
arXiv:2505.18086), ConciseR (Song and Zheng, 2025), DOT truncation and CANON split-group advantages
(SPEC 5). Arguments as in ``lenkernels.shaping``."""

from __future__ import annotations

import torch

from lenkernels import _checks
from lenkernels.ops.advantages import group_stats
from lenkernels.shaping._args import (
    COUNT,
    MAX,
    MEAN,
    MIN,
    STD,
    _correct,
    _group_columns,
    _nan_guard,
    _no_nan,
    _score,
    _vector,
)

# --- Kimi k1.5 ------------------------------------------------------------------------------------


@_nan_guard("correct", "lengths", "mask")
def kimi_length_reward(
    correct: torch.Tensor,
    groups,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weight: float = 1.0,
    score: torch.Tensor | float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Kimi k1.5 length reward (Kimi Team, 2025): ``lambda = 0.5 - (L - L_min) / (L_max - L_min)``
    within the group; correct responses get ``lambda``, wrong ones ``min(0, lambda)``; all 0 when
    ``L_max == L_min``. Returns ``score + weight * reward`` (weight 1). float32 ``[B]``."""
    ok = _correct(correct)
    stats, length = _group_columns([ok.to(torch.float32)], groups, lengths=lengths, mask=mask, backend=backend)
    lo, hi = stats[:, 1, MIN], stats[:, 1, MAX]
    span = hi - lo
    lam = torch.where(span > 0, 0.5 - (length - lo) / torch.where(span > 0, span, 1.0), 0.0)
    reward = torch.where(ok, lam, torch.clamp(lam, max=0.0))
    return _score(score, ok) + _checks.number(weight, "weight") * reward


# --- GRPO-lambda, ConciseR, DOT -------------------------------------------------------------------


@_nan_guard("correct", "lengths", "mask")
def grpo_lambda(
    correct: torch.Tensor,
    groups,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    fraction: float = 0.2,
    alpha: float = 0.5,
    backend: str | None = None,
) -> torch.Tensor:
    """GRPO-lambda (Dai et al., 2025): length-penalised rewards only for the best-performing groups.

    Groups ranked by accuracy: a group is in the top ``fraction`` (lambda = 0.2) when fewer than
    ``fraction * G`` groups have a strictly higher accuracy (ties at the boundary all get in). Its
    correct responses get ``1 - alpha * sigmoid((L - mean L_correct) / std L_correct)`` (std
    unbiased; z = 0 when the std is 0) and its wrong ones 0; other groups keep plain 0/1 rewards.
    SPEC gives no alpha: 0.5 keeps a correct response above 0.5. float32 ``[B]``.
    """
    ok = _correct(correct)
    n, device = ok.shape[0], ok.device
    fraction = _checks.number(fraction, "fraction")
    index = torch.arange(n, device=device, dtype=torch.float32)
    ones = torch.ones(n, device=device)
    where = torch.stack([ones, ones, ok.to(torch.float32)], 1)  # accuracy, first index: all; length: correct
    stats, length = _group_columns([ok.to(torch.float32), index], groups, where=where, lengths=lengths, mask=mask,
                                   backend=backend)  # fmt: skip
    acc = stats[:, 0, MEAN].contiguous()
    # one leader per group (its first response) carries the group's accuracy into a sorted list
    leader = index == stats[:, 1, MIN]
    n_groups = leader.sum()
    ranked = torch.sort(torch.where(leader, acc, -1.0)).values
    higher = n - torch.searchsorted(ranked, acc, right=True)
    top = higher.to(torch.float64) < fraction * n_groups.to(torch.float64)
    mean_c, std_c = stats[:, 2, MEAN], stats[:, 2, STD]
    z = torch.where(std_c > 0, (length - mean_c) / torch.where(std_c > 0, std_c, 1.0), 0.0)
    shaped = torch.where(ok, 1.0 - _checks.number(alpha, "alpha") * torch.sigmoid(z), 0.0)
    return torch.where(top, shaped, ok.to(torch.float32))


@_nan_guard("correct", "lengths", "mask")
def concise_r(
    correct: torch.Tensor,
    groups,
    *,
    max_length: float,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    alpha: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """ConciseR L-GRPO (Song and Zheng, 2025): only groups whose responses are all correct get the
    length reward ``1 + alpha * (1 - L / max_length)``; the others keep 0/1. ``max_length`` is the
    generation budget; SPEC gives no alpha, 1.0 here. float32 ``[B]``."""
    ok = _correct(correct)
    stats, length = _group_columns([ok.to(torch.float32)], groups, lengths=lengths, mask=mask, backend=backend)
    all_correct = stats[:, 0, MIN] > 0
    max_length = _checks.number(max_length, "max_length", minimum=0.0, exclusive=True)
    shaped = 1.0 + _checks.number(alpha, "alpha") * (1.0 - length / max_length)
    return torch.where(all_correct, shaped, ok.to(torch.float32))


@_nan_guard("correct", "lengths", "mask")
def dot_truncation(
    correct: torch.Tensor,
    groups,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    k: float = 3.0,
    margin: int = 32,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DOT dynamic outlier truncation (SPEC 5): in groups whose responses are all correct, the cutoff
    is ``int(mean L + k * std L)`` (k = 3, unbiased std); a response longer than the cutoff by at
    least ``margin`` (32) tokens is truncated to the cutoff.

    Returns ``(lengths, mask)``: the new float32 ``[B]`` lengths, and with a ``mask`` the new mask of
    the same dtype keeping each response's first ``length`` valid tokens (None without a mask).
    """
    ok = _correct(correct)
    stats, length = _group_columns([ok.to(torch.float32)], groups, lengths=lengths, mask=mask, backend=backend)
    all_correct = stats[:, 0, MIN] > 0
    cutoff = torch.trunc(stats[:, 1, MEAN] + _checks.number(k, "k") * stats[:, 1, STD])
    cut = all_correct & (length - cutoff >= _checks.number(margin, "margin"))
    new_length = torch.where(cut, cutoff, length)
    if mask is None:
        return new_length, None
    position = torch.cumsum(mask != 0, dim=-1)  # 1-based index of each valid token
    keep = (mask != 0) & (position <= new_length[:, None])
    return new_length, torch.where(keep, mask, torch.zeros_like(mask))


# --- CANON ---------------------------------------------------------------------------------------


@_nan_guard("metric")
def canon_advantages(
    rewards: torch.Tensor,
    groups,
    metric: torch.Tensor,
    *,
    mu: float = 0.5,
    backend: str | None = None,
) -> torch.Tensor:
    """CANON (SPEC 5): split each group by ``metric`` (e.g. mean token entropy or length) into the
    members above the group's mean metric (G+) and the rest (G-); ``inter = R - mean(R of the other
    half)``, ``intra = R - mean(R of its own half)``, ``A = mu * inter + (1 - mu) * intra`` (mu 0.5;
    SPEC gives no default). When one half is empty (all metrics equal) inter falls back to intra.
    Two group_stats kernels (the split needs the group mean first). float32 ``[B]``."""
    r = _vector(rewards, "rewards").to(torch.float32)
    n, device = r.shape[0], r.device
    m = _no_nan(_vector(metric, "metric", n, device), "metric").to(torch.float32)
    mu = _checks.number(mu, "mu")
    stats, _ = group_stats(m, groups, backend=backend)
    upper = m > stats[:, 0, MEAN]
    halves = torch.stack([upper, ~upper], 1).to(torch.float32)
    stats, _ = group_stats(torch.stack([r, r], 1), groups, where=halves, backend=backend)
    mean_upper, mean_lower = stats[:, 0, MEAN], stats[:, 1, MEAN]
    has_upper, has_lower = stats[:, 0, COUNT] > 0, stats[:, 1, COUNT] > 0
    own = torch.where(upper, mean_upper, mean_lower)
    other = torch.where(upper, mean_lower, mean_upper)
    other_exists = torch.where(upper, has_lower, has_upper)
    intra = r - own
    inter = torch.where(other_exists, r - other, intra)
    return mu * inter + (1.0 - mu) * intra
