"""Rollout correction (SPEC 8): importance weights between the rollout engine's log-probabilities
and the trainer's old ones, truncated (TIS) or rejected (MIS, IcePop-style veto), and their metrics,
in one op with no host synchronisation.

Chain of names: ``rollout_correction`` (public) -> ``lenkernels::rollout_correction`` (custom op; the
weights carry no gradient) -> ``rollout_correction_fwd`` (host launcher: one call into
``lenkernels.<backend>.rollout_correction``) -> ``triton/rollout_correction.py``,
``csrc/cpu/rollout_correction.cpp``, ``csrc/cuda/rollout_correction.cu`` (maths in
``csrc/include/lenkernels/rollout_correction.h``); the definition is
``reference/rollout_correction.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from lenkernels import _backend, _checks, _codes
from lenkernels._codes import CorrectionLevel, CorrectionMode, CorrectionStat
from lenkernels.ops.policy_loss_args import check_token_mask
from lenkernels.reference import rollout_correction as ref

FAMILY = "rollout_correction"
_backend.register_family(FAMILY, ("triton", "cuda", "cpu", "reference"))

# verl's SAFETY_BOUND (trainer/ppo/rollout_corr_helper.py): log weights clamped to +-20 before exp
LOG_CLAMP = 20.0


class RolloutCorrection(NamedTuple):
    """Weights, mask and metrics of :func:`rollout_correction`.

    ``weights`` float32 and ``mask`` bool have the shape of the inputs; every other field is a
    float32 0-dim tensor (``CorrectionStat`` order).
    """

    weights: torch.Tensor
    mask: torch.Tensor
    weight_mean: torch.Tensor
    weight_min: torch.Tensor
    weight_max: torch.Tensor
    truncated_fraction: torch.Tensor
    masked_fraction: torch.Tensor
    masked_seq_fraction: torch.Tensor
    masked_tokens: torch.Tensor
    kl_k1: torch.Tensor
    kl_k3: torch.Tensor


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """The scalars every backend's launcher receives. ``lo <= hi``; absent bounds are 0 and inf."""

    level: CorrectionLevel
    mode: CorrectionMode
    lo: float = 0.0
    hi: float = math.inf
    log_clamp: float = LOG_CLAMP
    has_veto: bool = False
    veto_lo: float = 0.0
    veto_hi: float = math.inf


# --- host launcher --------------------------------------------------------------------------------


def rollout_correction_fwd(old, rollout, valid, cu_seqlens, cfg: CorrectionConfig, backend: str, outs) -> None:
    """Host launcher. old, rollout ``[N]`` (float dtypes), valid bool ``[N]``, cu_seqlens int64
    ``[S + 1]``; writes ``outs`` = (weights fp32 ``[N]``, keep bool ``[N]``: every token of every
    sequence, others left as they are; stats fp32 ``[NUM_CORRECTION_STATS]``)."""
    weights, keep, stats = outs
    _backend.kernels(backend, FAMILY).rollout_correction_fwd(
        old.contiguous(), rollout.contiguous(), valid.contiguous(), cu_seqlens.contiguous(), cfg, weights, keep, stats
    )


# --- torch.library registration -------------------------------------------------------------


def _outputs(old: torch.Tensor, packed: bool):
    n, dev = old.shape[0], old.device
    # packed tokens outside every sequence are nobody's response tokens: weight 1, mask 0, written here
    weights = (torch.ones if packed else torch.empty)(n, dtype=torch.float32, device=dev)
    keep = (torch.zeros if packed else torch.empty)(n, dtype=torch.bool, device=dev)
    stats = torch.empty(CorrectionStat.NUM_CORRECTION_STATS, dtype=torch.float32, device=dev)
    return weights, keep, stats


@torch.library.custom_op("lenkernels::rollout_correction", mutates_args=())
def _rollout_correction(
    old: torch.Tensor,
    rollout: torch.Tensor,
    valid: torch.Tensor,
    cu_seqlens: torch.Tensor,
    level: int,
    mode: int,
    lo: float,
    hi: float,
    log_clamp: float,
    has_veto: bool,
    veto_lo: float,
    veto_hi: float,
    packed: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = CorrectionConfig(CorrectionLevel(level), CorrectionMode(mode), lo, hi, log_clamp, has_veto, veto_lo, veto_hi)
    outs = _outputs(old, packed)
    rollout_correction_fwd(old, rollout, valid, cu_seqlens, cfg, backend, outs)
    return outs


@_rollout_correction.register_fake
def _(old, rollout, valid, cu_seqlens, level, mode, lo, hi, log_clamp, has_veto, veto_lo, veto_hi, packed, backend):
    return _outputs(old, packed)


# --- argument handling --------------------------------------------------------------------------


def _optional_number(value, name: str, **limits) -> float | None:
    return None if value is None else _checks.number(value, name, **limits)


def _veto(veto) -> tuple[float, float] | None:
    """``(lo, hi)`` of the token veto, either bound None (absent); None: no veto."""
    if veto is None:
        return None
    if isinstance(veto, (str, bytes, torch.Tensor)) or not isinstance(veto, (tuple, list)) or len(veto) != 2:
        raise TypeError(f"veto must be a pair (lo, hi) of numbers or None, got {veto!r}")
    lo = _optional_number(veto[0], "veto", minimum=0.0)
    hi = _optional_number(veto[1], "veto", minimum=0.0, exclusive=True, finite=False)
    lo, hi = 0.0 if lo is None else lo, math.inf if hi is None else hi
    if lo > hi:
        raise ValueError(f"veto must have lo <= hi, got {veto!r}")
    return lo, hi


def _valid(mask, old: torch.Tensor) -> torch.Tensor:
    """Response tokens as a flat bool ``[N]`` (default: every token)."""
    if mask is None:
        return torch.ones(old.numel(), dtype=torch.bool, device=old.device)
    check_token_mask(mask, old, "old_logprobs", "bool or real", "(or be bool)")
    return mask.reshape(-1) if mask.dtype == torch.bool else (mask != 0).reshape(-1)


def _offsets(old: torch.Tensor, cu_seqlens) -> torch.Tensor:
    if cu_seqlens is None:
        if old.dim() != 2:
            raise ValueError(
                f"old_logprobs must be [B, T] (padded) or [N] with cu_seqlens (packed), got shape {tuple(old.shape)}"
            )
        return ref.padded_offsets(old.shape[0], old.shape[1], old.device)
    if old.dim() != 1:
        raise ValueError(f"with cu_seqlens, old_logprobs must be packed [N], got shape {tuple(old.shape)}")
    return _checks.cu_seqlens(cu_seqlens, old.shape[0], old, "old_logprobs", min_seqs=0)


# --- public API --------------------------------------------------------------------------------


def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    level: str = "token",
    mode: str = "truncate",
    threshold: float | None = 2.0,
    threshold_low: float | None = None,
    veto: tuple[float | None, float | None] | None = None,
    log_clamp: float = LOG_CLAMP,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> RolloutCorrection:
    """Importance weights correcting for the mismatch between the rollout engine (vLLM, SGLang) and
    the trainer, their truncation or rejection, and their metrics (SPEC 8); one fused pass, no host
    synchronisation. The weights carry no gradient.

    With ``δ_t = old_logprobs_t − rollout_logprobs_t`` over response tokens and ``L = log_clamp``:

    - ``level="token"``: ``w_t = exp(clamp(δ_t, ±L))``; ``"sequence"``: one weight per sequence,
      ``w_b = exp(clamp(Σ_t δ_t, ±L))``; ``"geometric"``: ``w_b = exp(clamp(Σ_t δ_t / |y_b|, ±L))``.
    - ``mode="truncate"`` (TIS): ``w ← min(w, threshold)`` (and ``max(w, threshold_low)`` when
      given); ``mode="mask"`` (MIS / rejection sampling): a token (token level) or a whole sequence
      (sequence levels) whose weight is outside ``[threshold_low, threshold]`` is rejected.
    - ``veto=(lo, hi)`` (IcePop-style, any level and mode): a response token whose own weight
      ``exp(clamp(δ_t, ±L))`` is outside ``[lo, hi]`` rejects its whole sequence.
    - A rejected token gets mask 0 and weight 1, as does every token that is not a response token.

    Trainer mappings (each pinned by tests/test_rollout_correction.py against the trainer's code):

    - verl 0.9.1 ``trainer/ppo/rollout_corr_helper.py``, ``compute_rollout_correction_weights``:
      ``rollout_is="token"|"sequence"`` with a float ``rollout_is_threshold=C`` (default 2.0) is
      ``level="token"|"sequence", mode="truncate", threshold=C`` (same ±20 clamp): verl's weights are
      ``weights * mask``. The IcePop string ``"lo_hi"`` is ``mode="mask", threshold_low=lo,
      threshold=hi``: verl zeroes the weight and keeps the token, i.e. ``where(mask, weights, 0)``.
      ``compute_rollout_rejection_mask`` with ``rollout_rs="token_k1"|"seq_sum_k1"|"seq_mean_k1"``
      and ``"lo_hi"`` (which bounds ``π_rollout/π_old``) is ``level="token"|"sequence"|
      "geometric", mode="mask", threshold_low=1/hi, threshold=1/lo``: verl's modified mask is ``mask``
      (verl clamps each token's log ratio before the sum or mean, this op the sum or mean: they
      differ only for a token more than 20 nats off).
      ``compute_offpolicy_metrics``'s ``kl`` and ``k3_kl`` are ``kl_k1`` and ``kl_k3``.
    - TRL 1.16 ``trainer/grpo_trainer.py`` (``vllm_importance_sampling_correction``):
      ``vllm_importance_sampling_mode="token_truncate"|"sequence_truncate"|"token_mask"|
      "sequence_mask"`` (default ``"sequence_mask"``) with ``clip_max`` (default 3.0) and ``clip_min``
      (default None) is ``level="token"|"sequence", mode="truncate"|"mask", threshold=clip_max,
      threshold_low=clip_min, log_clamp=inf`` (TRL does not clamp). TRL's ratio is ``weights`` for
      truncate and ``where(mask, weights, 0)`` for mask modes, on response tokens; its
      ``sampling/importance_sampling_ratio`` min/mean/max are ``weight_*`` in ``token_truncate``
      (in the mask modes TRL counts the zeroed ratios in, ``weight_*`` only the kept tokens).
      TRL turns a NaN sampling logprob into ratio 1; here NaN propagates (see below).

    Args:
        old_logprobs: the trainer's log-probabilities of the sampled tokens (verl's
            ``old_log_probs``), float32/bfloat16/float16 (float64 with ``backend="reference"``):
            padded ``[B, T]``, or packed ``[N]`` with ``cu_seqlens``.
        rollout_logprobs: the rollout engine's log-probabilities of the same tokens (verl's
            ``rollout_log_probs``, TRL's ``sampling_per_token_logps``); shape of ``old_logprobs``,
            any of the same dtypes.
        mask: response tokens (bool, or 0/1 of any real dtype), shape of ``old_logprobs``; default
            every token. Values outside the mask are never read into a result (NaN there is harmless).
        level: ``"token"`` (default), ``"sequence"`` or ``"geometric"``.
        mode: ``"truncate"`` (default) or ``"mask"``.
        threshold: the upper bound C (default 2.0, verl's ``rollout_is_threshold``; TRL uses 3.0);
            None: no upper bound.
        threshold_low: the lower bound (default None: none); ``<= threshold``.
        veto: ``(lo, hi)`` bounds on every response token's own weight (either may be None); a token
            outside rejects its sequence. Default None: no veto.
        log_clamp: log weights (the token's, the sequence sum or mean) are clamped to ``±log_clamp``
            before exp (default 20: verl's ``SAFETY_BOUND``; ``math.inf``: no clamp, as TRL).
        cu_seqlens: packed layout only, int32/int64 ``[B + 1]`` non-decreasing offsets into ``[N]``
            (tokens outside ``[cu_seqlens[0], cu_seqlens[-1])`` belong to no sequence: weight 1, mask 0).
        backend: ``None`` (triton on CUDA, cpu on CPU), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        :class:`RolloutCorrection`: ``weights`` (float32, shape of the inputs), ``mask`` (bool: the
        response tokens kept), and float32 0-dim metrics: ``weight_mean``, ``weight_min``,
        ``weight_max`` (final weights over kept tokens; 0 when none is kept), ``truncated_fraction``
        and ``masked_fraction`` (of the response tokens; 0 without any), ``masked_seq_fraction`` (of
        the sequences with a response token, those that lost one), ``masked_tokens`` (rejected
        response tokens), ``kl_k1 = mean(−δ)`` and ``kl_k3 = mean(exp(δ) − δ − 1)`` over every
        response token, rejected or not (verl's ``kl`` and ``k3_kl``: KL(π_rollout ‖ π_old), δ unclamped).
        A NaN log-prob of a response token is never rejected: its weight (token level) or its
        sequence's weights (sequence levels) are NaN, and so are ``weight_mean/min/max``, ``kl_k1``
        and ``kl_k3``.

    Raises:
        ValueError: an empty batch (no token: a correction of nothing, as verl refuses it), or bad
            arguments (named).

    Example (packed, TRL's default ``sequence_mask`` with verl's clamp)::

        rc = rollout_correction(old_lp, vllm_lp, response_mask, cu_seqlens=cu, level="sequence",
                                mode="mask", threshold=3.0)                   # [N] weights and mask
        loss = policy_loss(lp, old_lp, adv, rc.mask, importance_weights=rc.weights, cu_seqlens=cu).loss
        log({"is/mean": rc.weight_mean, "is/masked": rc.masked_fraction, "kl/k3": rc.kl_k3})
    """
    _checks.tensor(old_logprobs, "old_logprobs")
    name = _backend.resolve(backend, FAMILY, old_logprobs.device)
    _checks.float_input(old_logprobs, "old_logprobs", name)
    _checks.float_input(rollout_logprobs, "rollout_logprobs", name, like=old_logprobs, like_name="old_logprobs")
    level_code = _codes.parse(CorrectionLevel, level, "level")
    mode_code = _codes.parse(CorrectionMode, mode, "mode")
    hi = _optional_number(threshold, "threshold", minimum=0.0, exclusive=True, finite=False)
    lo = _optional_number(threshold_low, "threshold_low", minimum=0.0)
    hi, lo = math.inf if hi is None else hi, 0.0 if lo is None else lo
    if lo > hi:
        raise ValueError(f"threshold_low must be <= threshold, got {threshold_low} > {threshold}")
    veto_bounds = _veto(veto)
    clamp = _checks.number(log_clamp, "log_clamp", minimum=0.0, exclusive=True, finite=False)
    cu = _offsets(old_logprobs, cu_seqlens)
    valid = _valid(mask, old_logprobs)
    if old_logprobs.numel() == 0:
        raise ValueError(
            f"old_logprobs is empty (shape {tuple(old_logprobs.shape)}): a rollout correction needs tokens"
        )
    veto_lo, veto_hi = veto_bounds if veto_bounds is not None else (0.0, math.inf)
    weights, keep, stats = torch.ops.lenkernels.rollout_correction(
        old_logprobs.detach().reshape(-1), rollout_logprobs.detach().reshape(-1), valid, cu, int(level_code),
        int(mode_code), lo, hi, clamp, veto_bounds is not None, veto_lo, veto_hi, cu_seqlens is not None, name,
    )  # fmt: skip
    shape = old_logprobs.shape
    return RolloutCorrection(weights.reshape(shape), keep.reshape(shape), *stats.unbind(0))
