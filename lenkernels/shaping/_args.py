"""Argument handling shared by the shaping functions: per-response vectors, the lengths from
``lengths`` or a mask, the NaN policy (raise where value checks run, poison the outputs elsewhere)
and the one ``group_stats`` call most functions make."""

from __future__ import annotations

import functools
import inspect
import math

import torch

from lenkernels import _checks
from lenkernels.ops.advantages import group_stats

# group_stats columns: (count, sum, mean, std, min, max)
COUNT, SUM, MEAN, STD, MIN, MAX = range(6)


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
