"""Length-aware reward shaping for efficient reasoning (SPEC 5), GPU resident.

Every function takes per-response tensors (correctness, scores, lengths or a ``[B, T]`` response
mask, group ids) and returns tensors on the same device: no ``.item()``, no host sync, no Python
loop over responses or groups. Per-group quantities (accuracy, length min/max/mean/std) come from
one call of the segmented ``lenkernels.group_stats`` kernel, which also computes the response
lengths from the mask (the mask is read once); the per-response formula after it is a handful of
elementwise tensor ops. Shaped rewards are float32 ``[B]`` and are data, not differentiable.

Common arguments:
    correct: ``[B]`` bool, or 0/1 of any dtype (non-zero = correct).
    lengths / mask: the response length ``|y|``, either ``[B]`` lengths (int or float) or a
        ``[B, T]`` response mask (bool/int/float; lengths are its row sums). Exactly one is needed.
    groups: ``[B]`` int group ids in any order (responses to one prompt), or an int group size.
    score: the base reward added to the shaping term; defaults to ``correct`` as 0/1.
    backend: for the per-group kernels, as in ``lenkernels.group_advantages``.
    NaN: a NaN length, target, correctness, ``finished`` flag, mask entry or split metric only reaches
        the result through comparisons, so it is a ValueError on CPU tensors (and on CUDA with
        ``LENKERNELS_DEBUG=1``), as for ``group_advantages``' rewards; on CUDA without debug mode it
        makes every float output of the call NaN (no host sync). NaN scores and entropies propagate
        into the result. ``difficulty_buckets`` returns integers: NaN correctness raises only where
        value checks run.

Functions and the paper each default comes from:
    laser, laser_d, laser_d_targets, difficulty_buckets   LASER / LASER-D (Liu et al., 2025, arXiv:2505.15612)
    dler_rewards, dler_advantages                         DLER truncation penalty (Liu et al., 2025)
    kimi_length_reward                                    Kimi k1.5 (Kimi Team, 2025, arXiv:2501.12599)
    dapo_overlong                                         DAPO soft overlong punishment (Yu et al., 2025, arXiv:2503.14476)
    HAPOHistory, hapo_reward                              HAPO history-aware length reward (Huang et al., 2025)
    grpo_lambda                                           GRPO-lambda (Dai et al., 2025, arXiv:2505.18086)
    concise_r                                             ConciseR L-GRPO (Song and Zheng, 2025)
    dot_truncation                                        DOT dynamic outlier truncation (SPEC 5)
    canon_advantages                                      CANON split-group advantages (SPEC 5)
    pear_reward                                           PEAR phase-entropy reward (SPEC 5, 6)
    ceeh_advantages                                       CEEH difficulty-aware entropy bonus (SPEC 5)
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from lenkernels import _checks
from lenkernels.ops.advantages import group_advantages, group_stats

__all__ = [
    "laser",
    "laser_d",
    "laser_d_targets",
    "difficulty_buckets",
    "dler_rewards",
    "dler_advantages",
    "kimi_length_reward",
    "dapo_overlong",
    "HAPOHistory",
    "hapo_reward",
    "grpo_lambda",
    "concise_r",
    "dot_truncation",
    "canon_advantages",
    "pear_reward",
    "ceeh_advantages",
]

LASER_MODES = ("step", "penalty", "hybrid")
# group_stats columns: (count, sum, mean, std, min, max)
COUNT, SUM, MEAN, STD, MIN, MAX = range(6)


# --- argument handling -----------------------------------------------------------------------


def _vector(x, name: str, n: int | None = None, device=None) -> torch.Tensor:
    _real(x, name)
    if x.dim() != 1 or (n is not None and x.shape[0] != n):
        want = f"({n},)" if n is not None else "[B]"
        raise ValueError(f"{name} must have shape {want}, one value per response, got {tuple(x.shape)}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device} but correct is on {device}; they must share a device")
    return x.detach()


def _real(x, name: str, **kwargs) -> torch.Tensor:
    _checks.tensor(x, name, **kwargs)
    if x.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
    return x


def _no_nan(x: torch.Tensor, name: str) -> torch.Tensor:
    """Inputs that only reach the result through comparisons (lengths, targets, correctness, a split
    metric) would turn a NaN into a plausible reward: where value checks run (CPU tensors,
    LENKERNELS_DEBUG=1) a NaN there is an error, as for ``group_advantages``' rewards."""
    if x.is_floating_point() and x.numel() and _checks.value_checks(x.device):
        bad = torch.isnan(x)
        if bool(bad.any()):
            raise ValueError(f"{name} holds NaN (at flat index {int(bad.reshape(-1).nonzero()[0])})")
    return x


def _nan_guard(*names: str):
    """Where value checks do not run (CUDA tensors outside debug mode) a NaN in one of the arguments
    ``names`` cannot raise (see ``_no_nan``): it makes every floating output NaN instead, through a
    device-side ``any`` (no host sync). Integer and bool outputs (buckets, masks) cannot carry it."""

    def wrap(fn):
        positional = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]

        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            out = fn(*args, **kwargs)
            given = {**dict(zip(positional, args)), **kwargs}
            xs = [given.get(name) for name in names]
            xs = [x for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()
                  and not _checks.value_checks(x.device)]  # fmt: skip
            if not xs:
                return out
            bad = torch.stack([torch.isnan(x).any() for x in xs]).any()

            def poison(y):
                if isinstance(y, torch.Tensor) and y.is_floating_point():
                    return torch.where(bad.to(y.device), torch.full_like(y, math.nan), y)
                return y

            return tuple(poison(y) for y in out) if isinstance(out, tuple) else poison(out)

        return guarded

    return wrap


def _correct(correct) -> torch.Tensor:
    return _no_nan(_vector(correct, "correct"), "correct") != 0


def _score(score, correct: torch.Tensor, name: str = "score") -> torch.Tensor:
    if score is None:
        return correct.to(torch.float32)
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        return torch.full(correct.shape, float(score), dtype=torch.float32, device=correct.device)
    return _vector(score, name, correct.shape[0], correct.device).to(torch.float32)


def _mask(mask, n: int, device) -> torch.Tensor:
    _real(mask, "mask")
    if mask.dim() != 2 or mask.shape[0] != n:
        raise ValueError(f"mask must have shape [B, T] with B = {n}, got {tuple(mask.shape)}")
    if mask.device != torch.device(device):
        raise ValueError(f"mask is on {mask.device} but correct is on {device}; they must share a device")
    return _no_nan(mask.detach(), "mask")


def _lengths(lengths, mask, n: int, device) -> torch.Tensor:
    """float32 [B] response lengths from exactly one of ``lengths`` / ``mask``."""
    if (lengths is None) == (mask is None):
        raise ValueError("pass exactly one of lengths ([B]) or mask ([B, T]) to give the response lengths")
    if lengths is not None:
        return _no_nan(_vector(lengths, "lengths", n, device), "lengths").to(torch.float32)
    return _mask(mask, n, device).sum(-1, dtype=torch.float32)


def _group_columns(columns, groups, where=None, lengths=None, mask=None, backend=None):
    """One group_stats call over ``columns`` plus the length column (from ``lengths`` or, computed in
    the kernel, from ``mask``): returns (stats [B, C, 6], lengths float32 [B])."""
    n = columns[0].shape[0]
    device = columns[0].device
    if (lengths is None) == (mask is None):
        raise ValueError("pass exactly one of lengths ([B]) or mask ([B, T]) to give the response lengths")
    if lengths is not None:
        length = _no_nan(_vector(lengths, "lengths", n, device), "lengths").to(torch.float32)
        values = torch.stack([*columns, length], 1)
        stats, _ = group_stats(values, groups, where=where, backend=backend)
        return stats, length
    values = torch.stack(columns, 1)
    stats, length = group_stats(values, groups, where=where, mask=_mask(mask, n, device), backend=backend)
    return stats, length


def _number(x, name: str, *, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x) or (positive and x <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {x}")
    return float(x)


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
    alpha = _number(alpha, "alpha")
    if isinstance(target_length, torch.Tensor):
        target = _no_nan(_vector(target_length, "target_length", n, device), "target_length").to(torch.float32)
    else:
        target = torch.full((n,), _number(target_length, "target_length"), dtype=torch.float32, device=device)
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
    return torch.tensor([_number(v, "target_lengths") for v in target_lengths], dtype=torch.float32, device=device)


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
        [_number(v, "grid") for v in grid], dtype=torch.float32, device=device)  # fmt: skip
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
    target = torch.full((n,), _number(target_length, "target_length"), dtype=torch.float32, device=device)
    if difficulty_aware:
        if groups is None:
            raise ValueError("difficulty_aware=True needs groups (accuracy is per group)")
        stats, length = _group_columns([ok.to(torch.float32)], groups, lengths=lengths, mask=mask, backend=backend)
        easy = stats[:, 0, MEAN] >= 0.5
        target = torch.where(easy, _number(easy_target_length, "easy_target_length"), target)
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


# --- Kimi k1.5, DAPO ----------------------------------------------------------------------------


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
    return _score(score, ok) + _number(weight, "weight") * reward


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
    max_length = _number(max_length, "max_length", positive=True)
    cache_length = _number(cache_length, "cache_length", positive=True)
    if cache_length > max_length:
        raise ValueError(f"cache_length ({cache_length}) must not exceed max_length ({max_length})")
    soft = max_length - cache_length
    penalty = torch.where(length <= soft, 0.0, torch.where(length <= max_length, (soft - length) / cache_length, -1.0))
    base = torch.zeros_like(length) if score is None else _score(score, torch.ones_like(length, dtype=torch.bool))
    return base + penalty


# --- HAPO ----------------------------------------------------------------------------------------


class HAPOHistory:
    """Per-prompt history of HAPO (Huang et al., 2025): ``min_length[p]`` is the shortest correct
    response seen so far for prompt ``p`` (+inf: none yet). A float32 device tensor the caller keeps
    across steps: compute ``hapo_reward`` with it, then ``update`` it with the step's responses.

    Args:
        num_prompts: prompt ids must lie in ``[0, num_prompts)`` (e.g. dataset indices).
        device: where the history lives (the device of the rollouts).
    """

    def __init__(self, num_prompts: int, device=None):
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
            raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
        self.min_length = torch.full((num_prompts,), float("inf"), dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self.min_length.device

    def to(self, device) -> "HAPOHistory":
        self.min_length = self.min_length.to(device)
        return self

    def state_dict(self) -> dict:
        return {"min_length": self.min_length}

    def load_state_dict(self, state: dict) -> None:
        self.min_length = state["min_length"].to(device=self.device, dtype=torch.float32)

    def _ids(self, prompt_ids, n):
        ids = _vector(prompt_ids, "prompt_ids", n, self.device)
        if ids.dtype not in _checks.INT_DTYPES:
            raise TypeError(f"prompt_ids must be int32/int64, got {ids.dtype}")
        size = self.min_length.shape[0]
        valid = (ids >= 0) & (ids < size)
        if _checks.value_checks(ids.device) and not bool(valid.all()):
            raise ValueError(f"prompt_ids must lie in [0, {size}) (the history's num_prompts)")
        return torch.where(valid, ids, 0).to(torch.int64), valid

    def update(self, correct, prompt_ids, *, lengths=None, mask=None) -> None:
        """``min_length[p] = min(min_length[p], shortest correct response of p in this step)``: a
        scatter-min, exact and order-independent (deterministic)."""
        ok = _correct(correct)
        n = ok.shape[0]
        if ok.device != self.device:
            raise ValueError(f"correct is on {ok.device} but the history is on {self.device}")
        length = _lengths(lengths, mask, n, ok.device)
        ids, valid = self._ids(prompt_ids, n)
        value = torch.where(ok & valid, length, float("inf"))
        self.min_length.scatter_reduce_(0, ids, value, reduce="amin")


@_nan_guard("correct", "lengths", "mask")
def hapo_reward(
    correct: torch.Tensor,
    prompt_ids: torch.Tensor,
    history: HAPOHistory,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    clip: float = 0.7,
    weight: float = 1.0,
    score: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """HAPO length reward against the history ``h`` of each prompt (Huang et al., 2025):
    ``f = cos(pi/2 * L / h)`` if ``L < 2h`` else -1; correct -> ``max(-clip, f)`` (clip 0.7), wrong
    -> ``min(0, f)``; no history yet -> 0. Returns ``score + weight * reward``; a prompt id outside
    the history is an error on CPU (LENKERNELS_DEBUG on CUDA) and NaN otherwise. Update the history
    afterwards with ``history.update(...)``. float32 ``[B]``."""
    ok = _correct(correct)
    n = ok.shape[0]
    if not isinstance(history, HAPOHistory):
        raise TypeError(f"history must be a HAPOHistory, got {type(history).__name__}")
    if ok.device != history.device:
        raise ValueError(f"correct is on {ok.device} but the history is on {history.device}")
    length = _lengths(lengths, mask, n, ok.device)
    ids, valid = history._ids(prompt_ids, n)
    h = history.min_length[ids]
    ratio = length / torch.where(h > 0, h, 1.0)
    f = torch.where((h > 0) & (length < 2 * h), torch.cos((math.pi / 2) * ratio), -1.0)
    reward = torch.where(ok, torch.clamp(f, min=-_number(clip, "clip")), torch.clamp(f, max=0.0))
    reward = torch.where(torch.isinf(h), 0.0, reward)
    out = _score(score, ok) + _number(weight, "weight") * reward
    return torch.where(valid, out, float("nan"))


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
    fraction = _number(fraction, "fraction")
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
    shaped = torch.where(ok, 1.0 - _number(alpha, "alpha") * torch.sigmoid(z), 0.0)
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
    max_length = _number(max_length, "max_length", positive=True)
    shaped = 1.0 + _number(alpha, "alpha") * (1.0 - length / max_length)
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
    cutoff = torch.trunc(stats[:, 1, MEAN] + _number(k, "k") * stats[:, 1, STD])
    cut = all_correct & (length - cutoff >= _number(margin, "margin"))
    new_length = torch.where(cut, cutoff, length)
    if mask is None:
        return new_length, None
    position = torch.cumsum(mask != 0, dim=-1)  # 1-based index of each valid token
    keep = (mask != 0) & (position <= new_length[:, None])
    return new_length, torch.where(keep, mask, torch.zeros_like(mask))


# --- CANON, PEAR, CEEH -----------------------------------------------------------------------------


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
    mu = _number(mu, "mu")
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


@_nan_guard("correct")
def pear_reward(
    correct: torch.Tensor,
    think_entropy: torch.Tensor,
    answer_entropy: torch.Tensor,
    *,
    alpha: float = 1.0,
    score: torch.Tensor | float = 1.0,
    format_reward: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """PEAR (SPEC 5): phase-entropy penalty ``P = max(0, H_think - alpha * H_answer)`` (alpha 1) on the
    mean token entropies of the two phases (``lenkernels.phase_entropy``); correct -> ``min(1, s - P)``
    (s = 1), wrong -> ``format_reward`` (0). float32 ``[B]``."""
    ok = _correct(correct)
    n, device = ok.shape[0], ok.device
    think = _vector(think_entropy, "think_entropy", n, device).to(torch.float32)
    answer = _vector(answer_entropy, "answer_entropy", n, device).to(torch.float32)
    penalty = torch.clamp(think - _number(alpha, "alpha") * answer, min=0.0)
    s = _score(score, ok)
    fmt = _score(format_reward, ok, "format_reward")
    return torch.where(ok, torch.clamp(s - penalty, max=1.0), fmt)


def ceeh_advantages(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    difficulty: torch.Tensor,
    *,
    alpha: float = 0.4,
    kappa: float = 2.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """CEEH difficulty-aware entropy bonus (SPEC 5): ``A + min(alpha * sg(H), |A| / kappa) * scale * d_q``
    (alpha 0.4, kappa 2). ``entropy`` broadcasts to ``advantages`` (per token ``[B, T]`` or per
    response ``[B]``), ``difficulty`` d_q is per response ``[B]``. The entropy is detached (sg): the
    bonus is not differentiated. float32, the shape of ``advantages``."""
    a = _real(advantages, "advantages", min_dim=1).detach().to(torch.float32)
    h = _real(entropy, "entropy").detach().to(torch.float32)
    d = _vector(difficulty, "difficulty", a.shape[0], a.device).to(torch.float32)
    _checks.same_device(a, "advantages", h, "entropy")
    if h.dim() == 1 and a.dim() == 2 and h.shape[0] == a.shape[0]:
        h = h[:, None]  # per-response entropy, broadcast over the tokens
    try:
        torch.broadcast_shapes(h.shape, a.shape)
    except RuntimeError:
        raise ValueError(f"entropy of shape {tuple(entropy.shape)} does not broadcast to advantages {tuple(a.shape)}") from None
    d = d.reshape(-1, *([1] * (a.dim() - 1)))
    alpha, kappa = _number(alpha, "alpha"), _number(kappa, "kappa", positive=True)
    bonus = torch.minimum(alpha * h, a.abs() / kappa)
    return a + bonus * _number(scale, "scale") * d
