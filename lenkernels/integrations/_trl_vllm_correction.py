"""TRL's vLLM importance-sampling correction (``GRPOTrainer(vllm_importance_sampling_correction=True)``)
as one function for a TRL fork: :func:`vllm_importance_sampling`. Import it from
:mod:`lenkernels.integrations.trl`.

TRL 1.16 computes the correction inline in ``GRPOTrainer._generate_and_score_completions`` (the
ratio between the trainer's and vLLM's log-probabilities of the sampled tokens, truncated or
masked, per token or per sequence, and five logged metrics), so ``patch()`` cannot reach it; a fork
replaces that block with one call::

    is_ = vllm_importance_sampling(old_per_token_logps, sampling_per_token_logps, completion_mask,
                                   mode=self.vllm_importance_sampling_mode,
                                   clip_min=self.vllm_importance_sampling_clip_min,
                                   clip_max=self.vllm_importance_sampling_clip_max, tool_mask=tool_mask)
    vllm_importance_sampling_ratio = is_.ratio                # [B, T] token modes, [B, 1] sequence modes
    metrics["sampling/importance_sampling_ratio/mean"] = is_.ratio_mean   # gather / .item() as TRL does

The ratio comes from one ``lenkernels.rollout_correction`` pass (no clamp of the log ratio, as
TRL), the metrics are 0-dim tensors (no host synchronisation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lenkernels.integrations import _rollout_correction

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class VLLMImportanceSampling(NamedTuple):
    """:func:`vllm_importance_sampling`'s result: TRL's ratio and the five metrics TRL logs (0-dim
    tensors, the ratio's dtype for the ratio metrics, float32 or wider for the log-prob difference)."""

    ratio: torch.Tensor
    """TRL's ``vllm_importance_sampling_ratio``: ``[B, T]`` (token modes) or ``[B, 1]`` (sequence)."""
    logp_difference_mean: torch.Tensor
    """``sampling/sampling_logp_difference/mean``: mean of ``|old − sampling|`` over the response
    tokens that are not NaN (0 without any)."""
    logp_difference_max: torch.Tensor
    """``sampling/sampling_logp_difference/max``."""
    ratio_min: torch.Tensor
    """``sampling/importance_sampling_ratio/min``: over the response tokens (token modes) or every
    sequence (sequence modes), rejected ones counted as 0 (0 without any)."""
    ratio_mean: torch.Tensor
    """``sampling/importance_sampling_ratio/mean``."""
    ratio_max: torch.Tensor
    """``sampling/importance_sampling_ratio/max``."""


def _outside_value(mode: str, lo: float, hi: float) -> float:
    """TRL's ratio where the log ratio is 0 (tokens outside the mask, sequences without any)."""
    if mode.endswith("truncate"):
        return min(max(1.0, lo), hi)
    return 1.0 if lo <= 1.0 <= hi else 0.0


def _masked_min_mean_max(values: torch.Tensor, where: torch.Tensor):
    count = where.sum()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return zero, zero, zero
    lo = torch.where(where, values, math.inf).amin()
    hi = torch.where(where, values, -math.inf).amax()
    wide = torch.promote_types(values.dtype, torch.float32)  # a half-precision mean accumulates in float32
    mean = torch.where(where, values, 0).to(wide).sum() / count.clamp(min=1)
    return tuple(torch.where(count > 0, v.to(values.dtype), zero) for v in (lo, mean, hi))


def vllm_importance_sampling(
    old_per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
    tool_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> VLLMImportanceSampling:
    """TRL 1.16's vLLM importance-sampling correction and its metrics (TRL's arguments and defaults:
    ``vllm_importance_sampling_mode``, ``_clip_min``, ``_clip_max``).

    With ``δ = old − sampling`` on the response tokens (``completion_mask`` times ``tool_mask``; a
    NaN ``δ`` counts as 0, so its ratio is 1, as TRL): ``token_*`` modes ``r_t = exp(δ_t)``,
    ``sequence_*`` modes ``r_b = exp(Σ_t δ_t)``; ``*_truncate`` clamps ``r`` to ``[clip_min,
    clip_max]``, ``*_mask`` sets it to 0 outside. Tokens outside the mask (and sequences without a
    response token) get TRL's value for ``δ = 0``.

    Args:
        old_per_token_logps, sampling_per_token_logps: ``[B, T]`` float (the trainer's and vLLM's
            log-probabilities of the completion tokens).
        completion_mask: ``[B, T]`` 0/1 (any real or bool dtype).
        mode: one of ``MODES``.
        clip_min, clip_max: the bounds (None: none).
        tool_mask: optional ``[B, T]`` 0/1 mask multiplied into ``completion_mask``.
        backend: the ``rollout_correction`` backend (default: triton on CUDA, cpu on CPU).

    Returns:
        :class:`VLLMImportanceSampling` (ratio in the log-probabilities' dtype).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown vLLM importance sampling level: {mode!r}. Possible values are {MODES}.")
    if old_per_token_logps.dim() != 2 or sampling_per_token_logps.shape != old_per_token_logps.shape:
        raise ValueError(
            "old_per_token_logps and sampling_per_token_logps must both be [B, T], got "
            f"{tuple(old_per_token_logps.shape)} and {tuple(sampling_per_token_logps.shape)}"
        )
    mask = completion_mask if tool_mask is None else completion_mask * tool_mask
    if mask.shape != old_per_token_logps.shape:
        raise ValueError(f"completion_mask (times tool_mask) must be [B, T], got {tuple(mask.shape)}")
    lo = -math.inf if clip_min is None else float(clip_min)
    hi = math.inf if clip_max is None else float(clip_max)
    dtype = torch.promote_types(old_per_token_logps.dtype, sampling_per_token_logps.dtype)
    old, sampling = old_per_token_logps.detach().to(dtype), sampling_per_token_logps.detach().to(dtype)
    valid = mask != 0
    diff = old - sampling
    unknown = torch.isnan(diff)  # TRL: nan_to_num of the difference -> ratio 1
    old, sampling = old.masked_fill(unknown, 0.0), sampling.masked_fill(unknown, 0.0)
    level = "token" if mode.startswith("token") else "sequence"
    rc = _rollout_correction(
        old, sampling, valid, level=level, mode=mode.split("_")[1], threshold=None if hi == math.inf else hi,
        threshold_low=None if lo <= 0.0 else lo, log_clamp=math.inf, backend=backend,
    )  # fmt: skip
    outside = _outside_value(mode, lo, hi)
    kept = torch.where(rc.mask, rc.weights, 0.0).to(dtype)
    if level == "token":
        ratio = torch.where(valid, kept, outside)
        over = valid
    else:
        first = rc.mask.to(torch.int8).argmax(dim=-1, keepdim=True)
        per_seq = torch.where(rc.mask.any(dim=-1, keepdim=True), kept.gather(-1, first), 0.0)
        ratio = torch.where(valid.any(dim=-1, keepdim=True), per_seq, outside)
        over = torch.ones_like(ratio, dtype=torch.bool)
    delta = diff.abs()  # the metric of the log-probs' own difference, in their promoted dtype
    counted = valid & ~unknown
    _, diff_mean, diff_max = _masked_min_mean_max(delta, counted)
    return VLLMImportanceSampling(ratio, diff_mean, diff_max, *_masked_min_mean_max(ratio, over))
