"""Per-sequence token statistics trainers log every step: response length, mean/min/max entropy,
the fraction of tokens above a threshold, and TRL's ``top_entropy_quantile`` token mask.

Chain of names: ``sequence_stats`` (public) -> ``ops.quantile.quantile_threshold`` (a sort, or a bisection
over ranks with collectives) -> ``lenkernels::sequence_stats`` (custom op) -> ``sequence_stats_fwd``
(host launcher: one call into ``lenkernels.<backend>.phase_stats``) -> kernels
(``triton/phase_stats.py``, ``csrc/cpu/phase_stats.cpp``, ``csrc/cuda/phase_stats.cu``). The
kernels belong to the phase_stats family; layouts are those of ``ops/phase_stats.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lenkernels import _backend, _checks
from lenkernels.ops.phase_stats import FAMILY, _layout
from lenkernels.ops.quantile import quantile_threshold


class SequenceStats(NamedTuple):
    """Per-sequence token-entropy statistics; see :func:`sequence_stats`."""

    length: torch.Tensor
    entropy_mean: torch.Tensor
    entropy_min: torch.Tensor
    entropy_max: torch.Tensor
    frac_above_threshold: torch.Tensor
    high_entropy_mask: torch.Tensor | None
    high_entropy_threshold: torch.Tensor | None


# --- host launcher ------------------------------------------------------------------------------


def sequence_stats_fwd(values, valid, cu_seqlens, threshold: float, quantile, backend: str, outs) -> None:
    """Host launcher. values ``[N]``, valid bool ``[N]``, quantile fp32 ``[1]`` or None; writes
    ``outs`` = (length int64, mean, min, max, frac_above fp32) ``[S]`` and high bool ``[N]`` (only
    with a quantile; tokens outside all sequences are left as they are)."""
    if cu_seqlens.numel() <= 1:  # no sequence
        return
    length, mean, vmin, vmax, frac, high = outs
    _backend.kernels(backend, FAMILY).sequence_stats_fwd(
        values.contiguous(), valid.contiguous(), cu_seqlens.contiguous(), float(threshold), quantile, length, mean,
        vmin, vmax, frac, None if quantile is None else high,
    )  # fmt: skip


# --- torch.library registration -------------------------------------------------------------


def _sequence_outputs(values, cu_seqlens, with_mask: bool):
    n_seq, dev = cu_seqlens.shape[0] - 1, values.device
    length = torch.empty(n_seq, dtype=torch.int64, device=dev)
    stats = [torch.empty(n_seq, dtype=torch.float32, device=dev) for _ in range(4)]
    high = torch.zeros(values.shape[0] if with_mask else 0, dtype=torch.bool, device=dev)
    return (length, *stats, high)


@torch.library.custom_op("lenkernels::sequence_stats", mutates_args=())
def _sequence_stats(
    values: torch.Tensor,
    valid: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: float,
    quantile: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = _sequence_outputs(values, cu_seqlens, quantile is not None)
    sequence_stats_fwd(values, valid, cu_seqlens, threshold, quantile, backend, outs)
    return outs


@_sequence_stats.register_fake
def _(values, valid, cu_seqlens, threshold, quantile, backend):
    return _sequence_outputs(values, cu_seqlens, quantile is not None)


# --- public API --------------------------------------------------------------------------------


def sequence_stats(
    entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    threshold: float = 1.0,
    top_entropy_quantile: float | None = None,
    process_group=None,
    backend: str | None = None,
) -> SequenceStats:
    """Per-sequence token-entropy statistics from one kernel: response length, mean/min/max entropy,
    fraction of tokens above ``threshold``, and TRL's ``top_entropy_quantile`` token mask.

    Args:
        entropy: float32/bfloat16/float16 per-token entropy (or any per-token value), padded
            ``[B, T]`` or packed ``[N]`` with ``cu_seqlens``. Not differentiable (statistics to log).
        mask: response tokens, shape of ``entropy`` (bool, or nonzero = response). Default: all.
        cu_seqlens: packed layout only, int ``[B + 1]`` (see :func:`phase_stats`).
        threshold: ``frac_above_threshold`` counts response tokens with entropy ``> threshold``
            (default 1.0 nat).
        top_entropy_quantile: TRL's ``top_entropy_quantile`` rho in [0, 1]: keep the tokens whose
            entropy is ``>=`` the ``(1 - rho)`` quantile (``torch.quantile``, linear interpolation)
            of all response tokens of the batch. None (default): no mask.
        process_group: with ``top_entropy_quantile``, the quantile is taken over the response tokens
            of every rank of this group (exact, like TRL's gather; 33 small all_reduces, no host
            sync); ranks may hold different shapes.
        backend: ``None``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        :class:`SequenceStats`: ``length`` (int64 ``[B]``, response tokens), ``entropy_mean``,
        ``entropy_min``, ``entropy_max``, ``frac_above_threshold`` (float32 ``[B]``; 0 for an empty
        response; NaN entropies propagate into mean/min/max), ``high_entropy_mask`` (bool, shape of
        ``entropy``, False outside responses; None without ``top_entropy_quantile``) and
        ``high_entropy_threshold`` (float32 0-d tensor, NaN when the batch has no response token or
        a NaN entropy; None without ``top_entropy_quantile``).

    Example (packed, mask for a TRL-style loss)::

        st = sequence_stats(entropy, cu_seqlens=cu, top_entropy_quantile=0.2)
        per_token_loss = per_token_loss * st.high_entropy_mask
        log({"entropy/max": st.entropy_max.mean(), "entropy/len": st.length.float().mean()})
    """
    _checks.tensor(entropy, "entropy")
    name = _backend.resolve(backend, FAMILY, entropy.device)
    _checks.float_input(entropy, "entropy", name)
    # inf is a legal threshold (no token above it); NaN is not (every comparison with it is False)
    threshold = _checks.number(threshold, "threshold", finite=False)
    level = None
    if top_entropy_quantile is not None:
        level = 1.0 - _checks.number(top_entropy_quantile, "top_entropy_quantile", minimum=0.0, maximum=1.0)
    elif process_group is not None:
        raise ValueError("process_group is only used with top_entropy_quantile; pass both or neither")
    valid, cu = _layout(entropy.shape, entropy, "entropy", mask, cu_seqlens)
    if cu_seqlens is not None:  # packed tokens outside every sequence are nobody's response tokens
        t = torch.arange(valid.shape[0], device=valid.device)
        valid = valid & (t >= cu[0]) & (t < cu[-1])
    x = entropy.detach().reshape(-1)
    quantile = None if level is None else quantile_threshold(x, valid, level, process_group)
    length, mean, vmin, vmax, frac, high = torch.ops.lenkernels.sequence_stats(
        x, valid, cu, float(threshold), quantile, name
    )
    if quantile is None:
        return SequenceStats(length, mean, vmin, vmax, frac, None, None)
    return SequenceStats(length, mean, vmin, vmax, frac, high.reshape(entropy.shape), quantile.reshape(()))
