"""Length rewards against a target or a budget: LASER and LASER-D (Liu et al., 2025,
arXiv:2505.15612), the DLER truncation penalty (Liu et al., 2025) and DAPO's soft overlong
punishment (Yu et al., 2025, arXiv:2503.14476). Arguments as in ``lenkernels.shaping``."""

from __future__ import annotations

import torch

from lenkernels import _checks
from lenkernels.ops.advantages import group_advantages, group_stats
from lenkernels.shaping._args import (
    COUNT,
    MEAN,
    SUM,
    _correct,
    _group_columns,
    _lengths,
    _nan_guard,
    _no_nan,
    _score,
    _vector,
)

LASER_MODES = ("step", "penalty", "hybrid")


# --- LASER / LASER-D ---------------------------------------------------------------------------


@_nan_guard("correct", "lengths", "mask", "target_length")
def laser(
    correct: torch.Tensor,
    *,
    target_length: float | torch.Tensor,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    alpha: float = 0.5,
    mode: str = "step",
    score: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """LASER step reward (Liu et al., 2025): a bonus for correct responses within a target length.

    ``mode="step"`` (default): ``score + alpha`` when correct and ``L <= target_length``;
    ``"penalty"``: ``score - alpha`` when correct and ``L > target_length``;
    ``"hybrid"``: both (``+alpha`` within the target, ``-alpha`` beyond it, correct responses only).
    Wrong responses keep ``score``. ``alpha`` = 0.5 (the paper's step size).

    Args:
        target_length: a number, or a ``[B]`` tensor of per-response targets (LASER-D's buckets).
    Returns: float32 ``[B]``.
    Example: ``laser(correct, mask=response_mask, target_length=4096)``.
    """
    ok = _correct(correct)
    n, device = ok.shape[0], ok.device
    length = _lengths(lengths, mask, n, device)
    _checks.choice(mode, "mode", LASER_MODES)
    alpha = _checks.number(alpha, "alpha")
    if isinstance(target_length, torch.Tensor):
        target = _no_nan(_vector(target_length, "target_length", n, device), "target_length").to(torch.float32)
    else:
        target = torch.full((n,), _checks.number(target_length, "target_length"), dtype=torch.float32, device=device)
    out = _score(score, ok)
    within = ok & (length <= target)
    beyond = ok & (length > target)
    if mode in ("step", "hybrid"):
        out = out + alpha * within
    if mode in ("penalty", "hybrid"):
        out = out - alpha * beyond
    return out


def difficulty_buckets(correct: torch.Tensor, groups, *, backend: str | None = None) -> torch.Tensor:
    """LASER-D difficulty bucket of each response from its group's accuracy ``acc = #correct / n``:
    0 = high accuracy (``acc >= 2/3``, easy), 1 = medium (``acc >= 1/3``), 2 = low (hard).
    Compared in integers (``3 #correct >= 2 n``), so a group of 3 with 2 correct is high. int64 ``[B]``."""
    ok = _correct(correct)
    stats, _ = group_stats(ok.to(torch.float32), groups, backend=backend)
    k, n = stats[:, 0, SUM], stats[:, 0, COUNT]
    return torch.where(3 * k >= 2 * n, 0, torch.where(3 * k >= n, 1, 2)).to(torch.int64)


def _bucket_targets(target_lengths, device) -> torch.Tensor:
    if isinstance(target_lengths, torch.Tensor):
        t = target_lengths.detach()
        if t.shape != (3,):
            raise ValueError(f"target_lengths must hold 3 targets (high, medium, low accuracy), got {tuple(t.shape)}")
        if t.device != torch.device(device):
            raise ValueError(f"target_lengths is on {t.device} but correct is on {device}")
        return t.to(torch.float32)
    if len(target_lengths) != 3:
        raise ValueError(f"target_lengths must hold 3 targets (high, medium, low accuracy), got {len(target_lengths)}")
    return torch.tensor([_checks.number(v, "target_lengths") for v in target_lengths], dtype=torch.float32, device=device)


@_nan_guard("correct", "lengths", "mask", "target_lengths")
def laser_d(
    correct: torch.Tensor,
    groups,
    *,
    target_lengths,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    alpha: float = 0.5,
    mode: str = "step",
    score: torch.Tensor | float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LASER-D (Liu et al., 2025): LASER with a target length per difficulty bucket.

    Each group's accuracy puts its responses in a bucket (``difficulty_buckets``: high >= 2/3,
    medium >= 1/3, low); ``target_lengths`` = ``(L_high, L_medium, L_low)`` (a tuple, or a ``[3]``
    device tensor such as ``laser_d_targets``' result) gives each bucket's ``L_T``; then ``laser``.
    One group_stats kernel computes the accuracies (and the lengths, from ``mask``). float32 ``[B]``.
    """
    ok = _correct(correct)
    stats, length = _group_columns([ok.to(torch.float32)], groups, lengths=lengths, mask=mask, backend=backend)
    k, n = stats[:, 0, SUM], stats[:, 0, COUNT]
    bucket = torch.where(3 * k >= 2 * n, 0, torch.where(3 * k >= n, 1, 2))
    target = _bucket_targets(target_lengths, ok.device)[bucket]
    return laser(ok, target_length=target, lengths=length, alpha=alpha, mode=mode, score=score)


@_nan_guard("correct", "lengths", "mask", "grid")
def laser_d_targets(
    correct: torch.Tensor,
    groups,
    *,
    grid,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    rollouts: int | None = None,
    among: str = "all",
    backend: str | None = None,
) -> torch.Tensor:
    """LASER-D target selection from monitor rollouts (SPEC 5): float32 ``[3]`` targets
    ``(L_high, L_medium, L_low)``, on the device.

    For bucket d (``difficulty_buckets`` of the monitor groups) the target is the smallest threshold
    ``l`` of ``grid`` with ``floor(P_{l,d} * C_d) >= 1``, where ``P_{l,d}`` is the share of the
    bucket's responses with length ``<= l`` (``among="correct"``: of its correct responses) and
    ``C_d = floor(2n/3), floor(n/3), 1`` for n rollouts per prompt. A bucket with no responses, or
    with no threshold meeting the condition, gets ``max(grid)``. Decided in integers
    (``count * C_d >= total``), so no rounding can move a threshold.

    Args:
        grid: candidate thresholds (a sequence of numbers or a 1-D tensor).
        rollouts: n, responses per prompt; defaults to ``groups`` when it is an int group size.
    """
    ok = _correct(correct)
    device = ok.device
    if among not in ("all", "correct"):
        raise ValueError(f"among must be 'all' or 'correct', got {among!r}")
    if rollouts is None:
        if not isinstance(groups, int) or isinstance(groups, bool):
            raise ValueError("rollouts (responses per prompt, n in C_d) is needed when groups is a tensor of ids")
        rollouts = groups
    if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts <= 0:
        raise ValueError(f"rollouts must be a positive int, got {rollouts!r}")
    limits = grid.detach().to(device=device, dtype=torch.float32) if isinstance(grid, torch.Tensor) else torch.tensor(
        [_checks.number(v, "grid") for v in grid], dtype=torch.float32, device=device)  # fmt: skip
    if limits.dim() != 1 or limits.numel() == 0:
        raise ValueError(f"grid must be a non-empty 1-D sequence of thresholds, got shape {tuple(limits.shape)}")
    limits = torch.sort(limits).values
    stats, length = _group_columns([ok.to(torch.float32)], groups, lengths=lengths, mask=mask, backend=backend)
    k, n = stats[:, 0, SUM], stats[:, 0, COUNT]
    bucket = torch.where(3 * k >= 2 * n, 0, torch.where(3 * k >= n, 1, 2))
    pool = torch.nn.functional.one_hot(bucket, 3).to(torch.float64)  # [B, 3]
    if among == "correct":
        pool = pool * ok[:, None]
    within = (length[:, None] <= limits[None, :]).to(torch.float64)  # [B, G]
    count = pool.T @ within  # [3, G]: exact integers in float64
    total = pool.sum(0)[:, None]
    caps = torch.tensor([(2 * rollouts) // 3, rollouts // 3, 1], dtype=torch.float64, device=device)[:, None]
    good = (count * caps >= total) & (total > 0) & (caps > 0)
    first = torch.argmax(good.to(torch.int8), dim=1)
    return torch.where(good.any(1), limits[first], limits[-1])


# --- DLER --------------------------------------------------------------------------------------


@_nan_guard("correct", "lengths", "mask", "finished")
def dler_rewards(
    correct: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    finished: torch.Tensor | None = None,
    target_length: float = 4000,
    groups=None,
    difficulty_aware: bool = False,
    easy_target_length: float = 2000,
    score: torch.Tensor | float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """DLER truncation penalty: reward 0 for responses longer than ``target_length`` (4000) or not
    properly finished (``finished`` False, e.g. cut at the generation limit); ``score`` otherwise.

    ``difficulty_aware=True`` (needs ``groups``): groups with accuracy >= 0.5 use the tighter
    ``easy_target_length`` (2000). Follow with ``dler_advantages`` (batch-whitened
    ``reinforce_pp_baseline``). float32 ``[B]``.
    """
    _checks.flags(difficulty_aware=difficulty_aware)
    ok = _correct(correct)
    n, device = ok.shape[0], ok.device
    target = torch.full((n,), _checks.number(target_length, "target_length"), dtype=torch.float32, device=device)
    if difficulty_aware:
        if groups is None:
            raise ValueError("difficulty_aware=True needs groups (accuracy is per group)")
        stats, length = _group_columns([ok.to(torch.float32)], groups, lengths=lengths, mask=mask, backend=backend)
        easy = stats[:, 0, MEAN] >= 0.5
        target = torch.where(easy, _checks.number(easy_target_length, "easy_target_length"), target)
    else:
        length = _lengths(lengths, mask, n, device)
    keep = length <= target
    if finished is not None:
        keep = keep & (_no_nan(_vector(finished, "finished", n, device), "finished") != 0)
    s = _score(score, ok)
    return torch.where(keep, s, torch.zeros_like(s))


@_nan_guard("correct", "mask", "finished")
def dler_advantages(
    correct: torch.Tensor,
    groups,
    *,
    mask: torch.Tensor,
    finished: torch.Tensor | None = None,
    target_length: float = 4000,
    difficulty_aware: bool = False,
    easy_target_length: float = 2000,
    score: torch.Tensor | float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """DLER end to end: ``dler_rewards`` then ``group_advantages(method="reinforce_pp_baseline")``
    (group baseline, whitened over the batch's valid tokens). float32 ``[B, T]``."""
    _checks.flags(difficulty_aware=difficulty_aware)
    rewards = dler_rewards(
        correct, mask=mask, finished=finished, target_length=target_length, groups=groups,
        difficulty_aware=difficulty_aware, easy_target_length=easy_target_length, score=score, backend=backend,
    )  # fmt: skip
    return group_advantages(rewards, groups, method="reinforce_pp_baseline", mask=mask, backend=backend)


# --- DAPO ----------------------------------------------------------------------------------------


@_nan_guard("lengths", "mask")
def dapo_overlong(
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    max_length: float = 20480,
    cache_length: float = 4096,
    score: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al., 2025; L_max = 20480, L_cache = 4096): 0 for
    ``L <= L_max - L_cache``, ``((L_max - L_cache) - L) / L_cache`` inside the buffer, -1 beyond
    ``L_max``. Returns ``score + penalty`` (score defaults to 0). float32 ``[B]``."""
    ref = lengths if lengths is not None else mask
    if ref is None:
        raise ValueError("pass exactly one of lengths ([B]) or mask ([B, T]) to give the response lengths")
    _checks.tensor(ref, "lengths" if lengths is not None else "mask")
    n = ref.shape[0] if ref.dim() else 0
    length = _lengths(lengths, mask, n, ref.device)
    max_length = _checks.number(max_length, "max_length", minimum=0.0, exclusive=True)
    cache_length = _checks.number(cache_length, "cache_length", minimum=0.0, exclusive=True)
    if cache_length > max_length:
        raise ValueError(f"cache_length ({cache_length}) must not exceed max_length ({max_length})")
    soft = max_length - cache_length
    penalty = torch.where(length <= soft, 0.0, torch.where(length <= max_length, (soft - length) / cache_length, -1.0))
    base = torch.zeros_like(length) if score is None else _score(score, torch.ones_like(length, dtype=torch.bool))
    return base + penalty
