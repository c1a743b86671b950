"""Reference group advantages (SPEC 4) and per-group statistics: a plain loop over groups, written
for clarity and evaluated in float64 by default. Every backend is tested against these.

Conventions shared with the kernels (and documented on ``lenkernels.group_advantages``):
- a group of one has baseline 0 and std 1 (verl);
- a group holding a NaN score gives NaN for all its members; for ``batch`` and
  ``reinforce_pp_baseline`` a NaN anywhere makes the whole batch NaN (masked tokens stay 0);
- masked tokens (mask == 0) are exactly 0 in a ``[B, T]`` output; zero-weight responses take no part
  in the token-weighted whitening;
- means and variances are those of the values divided by the power of two of their largest magnitude,
  multiplied back (``_pow2_scale``): exact, and no square or sum leaves the dtype's range (1e200 in
  float64), as in the kernels.
"""

from __future__ import annotations

import torch

from lenkernels import _codes
from lenkernels._codes import Method

METHODS = _codes.names(Method)  # the public method strings, in code order
WHITEN_EPS = 1e-8


def scores(rewards: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """[B] score per response: the reward itself, or the sum over every position of [B, T] token
    rewards (verl sums all positions, not only the masked ones)."""
    r = rewards.to(dtype)
    return r if r.dim() == 1 else r.sum(-1)


def group_ids(groups, n: int, device=None) -> torch.Tensor:
    """[B] int64 group id per response: the tensor itself, or ``arange(B) // groups`` for an int size."""
    if isinstance(groups, torch.Tensor):
        return groups.to(torch.int64)
    return torch.arange(n, device=device) // groups


def _members(ids: torch.Tensor):
    """Index tensors of each group's members, in response order (one stable sort, then a split)."""
    if ids.numel() == 0:
        return
    sorted_ids, order = torch.sort(ids, stable=True)
    counts = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    yield from torch.split(order, counts.tolist())


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """The power of two 2^k <= max |x| < 2^(k+1) over the finite values of x (1 when there are none,
    or all are 0). Means and variances are taken of x / 2^k and multiplied back: exact in binary
    floating point, and the squares and sums of x / 2^k (magnitudes below 2) cannot overflow or
    underflow, so 1e200 in float64 (1e20 in float32) keeps its statistics (the kernels do the same)."""
    a = x.detach().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    one = torch.ones((), dtype=x.dtype, device=x.device)
    m = a.max() if a.numel() else one
    return torch.where(m > 0, torch.ldexp(one, torch.frexp(m).exponent - 1), one)


def _mean(x: torch.Tensor) -> torch.Tensor:
    c = _pow2_scale(x)
    return (x / c).mean() * c


def _std_of(x: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """torch's std (NaN for one element when unbiased), without overflow or underflow."""
    c = _pow2_scale(x)
    return (x / c).std(unbiased=unbiased) * c


def _std(x: torch.Tensor, unbiased: bool) -> torch.Tensor:
    return _std_of(x, unbiased) if x.numel() > 1 else torch.ones((), dtype=x.dtype, device=x.device)


def gaussian_scores(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """G^2RPO's rank map: within each group rank k = 1..n gets Phi^-1((k - 0.5) / n); tied scores
    share the mean of their ranks' values; groups of one, and NaN groups, give 0 and NaN."""
    out = torch.zeros_like(s)
    for idx in _members(ids):
        x = s[idx]
        n = x.numel()
        if torch.isnan(x).any():
            out[idx] = float("nan")
            continue
        if n <= 1:
            continue
        order = torch.argsort(x, stable=True)
        ranks = torch.empty(n, dtype=torch.float64, device=s.device)
        ranks[order] = torch.arange(1, n + 1, dtype=torch.float64, device=s.device)
        values = torch.special.ndtri((ranks - 0.5) / n)
        for v in torch.unique(x):
            tie = x == v
            values[tie] = values[tie].mean()
        out[idx] = values.to(s.dtype)
    return out


def group_advantages(
    rewards: torch.Tensor,
    groups,
    method: str = "grpo",
    *,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    norm_by_std: bool = True,
    unbiased: bool = True,
    task_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Advantages of SPEC 4 in ``dtype``: ``[B]``, or ``[B, T]`` (``adv[b] * mask[b, t]``) with a mask."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    s = scores(rewards, dtype)
    n = s.shape[0]
    ids = group_ids(groups, n, s.device)
    if lengths is not None:
        w = lengths.to(dtype)
    elif mask is not None:
        w = mask.to(dtype).sum(-1)
    else:
        w = torch.ones_like(s)
    adv = torch.empty_like(s)

    if method == "gaussian":
        adv = gaussian_scores(s, ids)
        if task_ids is not None:
            adv = gaussian_scores(adv, task_ids.to(torch.int64))
    else:
        for idx in _members(ids):
            x = s[idx]
            size = x.numel()
            mean = _mean(x) if size > 1 else torch.zeros((), dtype=dtype)
            std = _std(x, unbiased)
            if method == "grpo":
                a = (x - mean) / (std + eps) if norm_by_std else x - mean
                a = torch.where(x == mean, torch.zeros_like(a), a)  # all-equal groups: exactly 0 for any eps
            elif method == "rloo":
                c = _pow2_scale(x)  # minus the mean of the others:
                a = x - ((x / c).sum() - x / c) / (size - 1) * c if size > 1 else x.clone()
            elif method == "opo":
                wl = w[idx]
                if size > 1 and wl.sum() != 0:
                    c = _pow2_scale(x)
                    a = x - (wl * (x / c)).sum() / wl.sum() * c
                else:
                    a = x.clone()
            elif method == "grpo_passk":
                a = torch.zeros_like(x)
                top = torch.sort(x, descending=True, stable=True).values
                r_second = top[1] if size > 1 else torch.zeros((), dtype=dtype)
                best = int(torch.argmax(x))  # first of equal maxima
                gap = top[0] - r_second
                a[best] = (gap / (std + eps) if gap != 0 else gap) if norm_by_std else gap
                if torch.isnan(x).any():
                    a[:] = float("nan")
            else:  # dr_grpo, reinforce_pp_baseline, batch
                a = x - mean
            adv[idx] = a

    if method == "batch":
        adv = adv / (_std_of(s) + eps)
    elif method == "reinforce_pp_baseline":
        valid = w != 0
        wv, xv = w[valid], adv[valid]
        c = _pow2_scale(xv)  # moments of xv / c, then back (var * c^2 may leave the range: see below)
        mean_c = (wv * (xv / c)).sum() / wv.sum()
        var_c = (wv * (xv / c - mean_c) ** 2).sum() / (wv.sum() - 1)
        var = var_c * c * c
        # rsqrt(var + 1e-8); past the range var + 1e-8 == var, so rsqrt(var) = rsqrt(var_c) / c
        past = torch.isinf(var) & torch.isfinite(var_c)
        inv = torch.where(past, torch.rsqrt(var_c) / c, torch.rsqrt(var + WHITEN_EPS))
        adv = (adv - mean_c * c) * inv

    if mask is None:
        return adv
    m = mask.to(dtype)
    return torch.where(m != 0, adv.unsqueeze(-1) * m, torch.zeros_like(m))


STAT_NAMES = ("count", "sum", "mean", "std", "min", "max")


def group_stats(values: torch.Tensor, groups, where: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    """``[B, C, 6]``: for each response and column, (count, sum, mean, std, min, max) over the
    members of its group selected by ``where`` (all when None). Empty selection: count 0, sum 0,
    mean 0, std 0, min +inf, max -inf; std is unbiased and 0 with fewer than two selected; a NaN
    among the selected makes min, max, mean and std NaN."""
    x = values.to(dtype)
    n, c = x.shape
    sel = torch.ones_like(x, dtype=torch.bool) if where is None else where.to(torch.bool)
    ids = group_ids(groups, n, x.device)
    out = torch.empty(n, c, 6, dtype=dtype, device=x.device)
    for idx in _members(ids):
        for j in range(c):
            v = x[idx, j][sel[idx, j]]
            k = v.numel()
            nan = bool(torch.isnan(v).any())
            mean = _mean(v) if k else torch.zeros((), dtype=dtype)
            std = _std_of(v) if k > 1 else torch.zeros((), dtype=dtype)
            lo = v.min() if k else torch.tensor(float("inf"), dtype=dtype)
            hi = v.max() if k else torch.tensor(float("-inf"), dtype=dtype)
            if nan:
                lo = hi = std = torch.tensor(float("nan"), dtype=dtype)
            out[idx, j] = torch.stack([torch.tensor(float(k), dtype=dtype), v.sum(), mean, std, lo, hi])
    return out


# --- launchers of the reference backend (the signatures of lenkernels/{cpu,cuda,triton}/advantages.py)


def group_advantages_fwd(rewards, groups, group_size, mask, lengths, task_ids, cfg, out) -> None:
    """Writes ``out`` (fp32, ``[B]`` or ``mask.shape``): SPEC 4 evaluated whole in float64 (the
    compiled backends' stages, lenkernels/_grouping.py, have no counterpart here)."""
    res = group_advantages(
        rewards, groups if groups is not None else group_size, _codes.name_of(Method(cfg.method)), eps=cfg.eps,
        mask=mask, lengths=lengths, norm_by_std=cfg.norm_by_std, unbiased=cfg.unbiased, task_ids=task_ids,
    )  # fmt: skip
    out.copy_(res)


def group_stats_fwd(values, where, groups, group_size, mask, stats, lengths) -> None:
    """Writes stats ``[B, C', 6]`` and, with a mask, its row sums into lengths ``[B]`` (the last
    statistic column)."""
    cols = values.to(torch.float64)
    if mask is not None:
        length = mask.to(torch.float64).sum(-1)
        lengths.copy_(length)
        cols = torch.cat([cols, length[:, None]], 1)
    stats.copy_(group_stats(cols, groups if groups is not None else group_size, where))
