"""Reference length-aware reward shaping (SPEC 5): plain per-response / per-group loops in float64,
the definitions ``lenkernels.shaping`` is tested against. Arguments mirror the public functions
(lengths already resolved to a ``[B]`` tensor); see ``lenkernels/shaping/`` for the documentation.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _groups(groups, n):
    ids = groups.tolist() if isinstance(groups, torch.Tensor) else [i // groups for i in range(n)]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    return list(members.values())


def _score(score, correct):
    if score is None:
        return [1.0 if c else 0.0 for c in correct]
    if isinstance(score, torch.Tensor):
        return [float(v) for v in score.tolist()]
    return [float(score)] * len(correct)


def laser(correct, lengths, target, alpha=0.5, mode="step", score=None):
    c = [bool(v) for v in correct.tolist()]
    L = lengths.tolist()
    tgt = target.tolist() if isinstance(target, torch.Tensor) else [float(target)] * len(c)
    s = _score(score, c)
    out = []
    for i in range(len(c)):
        bonus = alpha if c[i] and L[i] <= tgt[i] else 0.0
        malus = alpha if c[i] and L[i] > tgt[i] else 0.0
        out.append(s[i] + (bonus if mode in ("step", "hybrid") else 0.0) - (malus if mode in ("penalty", "hybrid") else 0.0))
    return torch.tensor(out, dtype=F64)


def buckets(correct, groups):
    """0 high accuracy (>= 2/3), 1 medium (>= 1/3), 2 low."""
    c = [bool(v) for v in correct.tolist()]
    out = [0] * len(c)
    for idx in _groups(groups, len(c)):
        k, n = sum(c[i] for i in idx), len(idx)
        b = 0 if 3 * k >= 2 * n else (1 if 3 * k >= n else 2)
        for i in idx:
            out[i] = b
    return torch.tensor(out)


def laser_d(correct, groups, lengths, targets, alpha=0.5, mode="step", score=None):
    b = buckets(correct, groups)
    tgt = torch.tensor([float(targets[int(v)]) for v in b], dtype=F64)
    return laser(correct, lengths, tgt, alpha, mode, score)


def laser_d_targets(correct, groups, lengths, grid, rollouts, among="all"):
    b = buckets(correct, groups).tolist()
    c = [bool(v) for v in correct.tolist()]
    L = lengths.tolist()
    caps = [(2 * rollouts) // 3, rollouts // 3, 1]
    out = []
    for d in range(3):
        pool = [L[i] for i in range(len(L)) if b[i] == d and (among == "all" or c[i])]
        chosen = max(grid)
        for limit in sorted(grid):
            # floor(P * C) >= 1 with P = share of the pool within the limit  <=>  count * C >= len(pool)
            if pool and sum(x <= limit for x in pool) * caps[d] >= len(pool):
                chosen = limit
                break
        out.append(float(chosen))
    return torch.tensor(out, dtype=F64)


def dler(correct, lengths, finished=None, target=4000, groups=None, difficulty_aware=False, easy_target=2000, score=None):
    c = [bool(v) for v in correct.tolist()]
    L = lengths.tolist()
    s = _score(score, c)
    fin = [True] * len(c) if finished is None else [bool(v) for v in finished.tolist()]
    tgt = [float(target)] * len(c)
    if difficulty_aware:
        for idx in _groups(groups, len(c)):
            if sum(c[i] for i in idx) / len(idx) >= 0.5:
                for i in idx:
                    tgt[i] = float(easy_target)
    return torch.tensor([0.0 if (L[i] > tgt[i] or not fin[i]) else s[i] for i in range(len(c))], dtype=F64)


def kimi(correct, groups, lengths, weight=1.0, score=None):
    c = [bool(v) for v in correct.tolist()]
    L = lengths.tolist()
    s = _score(score, c)
    out = [0.0] * len(c)
    for idx in _groups(groups, len(c)):
        lo, hi = min(L[i] for i in idx), max(L[i] for i in idx)
        for i in idx:
            lam = 0.0 if hi == lo else 0.5 - (L[i] - lo) / (hi - lo)
            out[i] = s[i] + weight * (lam if c[i] else min(0.0, lam))
    return torch.tensor(out, dtype=F64)


def dapo_overlong(lengths, max_length=20480, cache_length=4096, score=None):
    out = []
    s = _score(score, [True] * lengths.numel()) if score is not None else [0.0] * lengths.numel()
    for i, L in enumerate(lengths.tolist()):
        soft = max_length - cache_length
        if L <= soft:
            p = 0.0
        elif L <= max_length:
            p = (soft - L) / cache_length
        else:
            p = -1.0
        out.append(s[i] + p)
    return torch.tensor(out, dtype=F64)


def hapo(correct, prompt_ids, history, lengths, clip=0.7, weight=1.0, score=None):
    c = [bool(v) for v in correct.tolist()]
    s = _score(score, c)
    h = history.tolist()
    out = []
    for i, (L, p) in enumerate(zip(lengths.tolist(), prompt_ids.tolist())):
        if not 0 <= p < len(h):
            out.append(float("nan"))
            continue
        hist = h[p]
        if math.isinf(hist):
            r = 0.0
        else:
            f = math.cos(math.pi / 2 * L / hist) if L < 2 * hist else -1.0
            r = max(-clip, f) if c[i] else min(0.0, f)
        out.append(s[i] + weight * r)
    return torch.tensor(out, dtype=F64)


def hapo_update(history, correct, prompt_ids, lengths):
    h = history.clone()
    for ok, p, L in zip(correct.tolist(), prompt_ids.tolist(), lengths.tolist()):
        if ok and 0 <= p < h.numel():
            h[p] = min(float(h[p]), float(L))
    return h


def grpo_lambda(correct, groups, lengths, fraction=0.2, alpha=0.5):
    c = [bool(v) for v in correct.tolist()]
    L = lengths.tolist()
    members = _groups(groups, len(c))
    accs = [sum(c[i] for i in idx) / len(idx) for idx in members]
    out = [1.0 if v else 0.0 for v in c]
    for idx, acc in zip(members, accs):
        higher = sum(a > acc for a in accs)
        if higher >= fraction * len(accs):
            continue
        lc = [L[i] for i in idx if c[i]]
        mean = sum(lc) / len(lc) if lc else 0.0
        std = torch.tensor(lc, dtype=F64).std().item() if len(lc) > 1 else 0.0
        for i in idx:
            if c[i]:
                z = (L[i] - mean) / std if std > 0 else 0.0
                out[i] = 1.0 - alpha / (1.0 + math.exp(-z))
            else:
                out[i] = 0.0
    return torch.tensor(out, dtype=F64)


def concise_r(correct, groups, lengths, max_length, alpha=1.0):
    c = [bool(v) for v in correct.tolist()]
    L = lengths.tolist()
    out = [1.0 if v else 0.0 for v in c]
    for idx in _groups(groups, len(c)):
        if all(c[i] for i in idx):
            for i in idx:
                out[i] = 1.0 + alpha * (1.0 - L[i] / max_length)
    return torch.tensor(out, dtype=F64)


def dot(correct, groups, lengths, k=3.0, margin=32):
    c = [bool(v) for v in correct.tolist()]
    L = lengths.tolist()
    out = list(L)
    for idx in _groups(groups, len(c)):
        if not all(c[i] for i in idx):
            continue
        x = torch.tensor([L[i] for i in idx], dtype=F64)
        std = x.std().item() if len(idx) > 1 else 0.0
        cutoff = int(x.mean().item() + k * std)
        for i in idx:
            if L[i] - cutoff >= margin:
                out[i] = cutoff
    return torch.tensor(out, dtype=F64)


def canon(rewards, groups, metric, mu=0.5):
    R = rewards.tolist()
    m = metric.tolist()
    out = [0.0] * len(R)
    for idx in _groups(groups, len(R)):
        mean_m = sum(m[i] for i in idx) / len(idx)
        hi = [i for i in idx if m[i] > mean_m]
        lo = [i for i in idx if not m[i] > mean_m]
        mean_hi = sum(R[i] for i in hi) / len(hi) if hi else None
        mean_lo = sum(R[i] for i in lo) / len(lo) if lo else None
        for i in idx:
            own, other = (mean_hi, mean_lo) if i in hi else (mean_lo, mean_hi)
            intra = R[i] - own
            inter = R[i] - other if other is not None else intra
            out[i] = mu * inter + (1 - mu) * intra
    return torch.tensor(out, dtype=F64)


def pear(correct, think, answer, alpha=1.0, score=1.0, format_reward=0.0):
    out = []
    s = score.tolist() if isinstance(score, torch.Tensor) else [float(score)] * correct.numel()
    fr = format_reward.tolist() if isinstance(format_reward, torch.Tensor) else [float(format_reward)] * correct.numel()
    for i, (ok, ht, ha) in enumerate(zip(correct.tolist(), think.tolist(), answer.tolist())):
        p = max(0.0, ht - alpha * ha)
        out.append(min(1.0, s[i] - p) if ok else fr[i])
    return torch.tensor(out, dtype=F64)


def ceeh(advantages, entropy, difficulty, alpha=0.4, kappa=2.0, scale=1.0):
    a = advantages.to(F64)
    h = entropy.to(F64)
    d = difficulty.to(F64)
    while d.dim() < a.dim():
        d = d.unsqueeze(-1)
    bonus = torch.minimum(alpha * h, a.abs() / kappa)
    return a + bonus * scale * d
