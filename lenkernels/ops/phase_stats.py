"""Phase-split statistics (SPEC 6): any per-token value split at the delimiter into the thinking
and the answer phase of each sequence.

Chains of names:
  ``phase_stats`` / ``phase_entropy`` (public) -> ``lenkernels::phase_stats`` (custom op with
  autograd) -> ``phase_stats_fwd`` / ``phase_stats_bwd`` (host launchers: one call each into
  ``lenkernels.<backend>.phase_stats``) -> ``triton/phase_stats.py``, ``csrc/cpu/phase_stats.cpp``,
  ``csrc/cuda/phase_stats.cu`` (maths in ``csrc/include/lenkernels/phase_stats.h``).
  ``token_stats_with_phases`` -> ``token_logprobs_entropy`` (one read of the logits) and one
  ``lenkernels::phase_stats`` call on the stacked ``[2, N]`` (entropy, logprob) outputs.
  The per-sequence token statistics of the same family (``sequence_stats``) are in
  ``ops/sequence_stats.py``.

Layouts: padded ``[B, T]`` with ``mask`` marking response tokens (left or right padding, or
any other pattern), or packed ``[N]`` with ``cu_seqlens`` ``[B + 1]`` (and optionally ``mask``
marking the response tokens inside each packed sequence).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Iterable
from typing import NamedTuple

import torch

from lenkernels import _backend, _checks
from lenkernels.ops.token_stats import token_logprobs_entropy
from lenkernels.reference import phase_stats as ref

FAMILY = "phase_stats"
_backend.register_family(FAMILY, ("triton", "cuda", "cpu", "reference"))


class PhaseStats(NamedTuple):
    """Per-sequence statistics of one token value, split at the delimiter (SPEC 6).

    Means and sums are float32 ``[B]`` (``[C, B]`` when C statistics were split at once); counts
    int64 ``[B]``; ``delimiter_pos`` int64 ``[B]``; ``found`` bool ``[B]``.
    """

    think_mean: torch.Tensor
    think_sum: torch.Tensor
    think_count: torch.Tensor
    answer_mean: torch.Tensor
    answer_sum: torch.Tensor
    answer_count: torch.Tensor
    delimiter_pos: torch.Tensor
    found: torch.Tensor

    @property
    def k(self) -> torch.Tensor:
        """SPEC 6's name for ``delimiter_pos``."""
        return self.delimiter_pos


class PhaseEntropy(PhaseStats):
    """:class:`PhaseStats` of the token entropy (what PEAR and entropy shaping consume)."""

    __slots__ = ()


class TokenStatsWithPhases(NamedTuple):
    """Outputs of :func:`token_stats_with_phases`."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    entropy_phases: PhaseEntropy
    logprob_phases: PhaseStats


# --- host launchers -----------------------------------------------------------------------------


def _unit_stride(values2d: torch.Tensor) -> torch.Tensor:
    return values2d if values2d.stride(-1) == 1 or values2d.shape[-1] <= 1 else values2d.contiguous()


def phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, backend: str, outs) -> None:
    """Host launcher. values ``[C, N]``, ids ``[N]``, valid bool ``[N]``, cu_seqlens int64
    ``[S + 1]``, delimiter int64 ``[L]``; writes ``outs`` = (think_mean, think_sum, answer_mean,
    answer_sum) fp32 ``[C, S]``, (think_count, answer_count, k) int64 ``[S]``, found bool ``[S]``."""
    if cu_seqlens.numel() <= 1:  # no sequence
        return
    _backend.kernels(backend, FAMILY).phase_stats_fwd(
        _unit_stride(values), ids.contiguous(), valid.contiguous(), cu_seqlens.contiguous(), delimiter.contiguous(),
        *outs,
    )  # fmt: skip


def phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len: int, grads, backend: str, dvalues):
    """Host launcher: writes ``dvalues`` ``[C, N]`` (values dtype, unit stride along N) for every
    token of every sequence; tokens outside all sequences are left as they are. ``grads`` =
    cotangents of (think_mean, think_sum, answer_mean, answer_sum), fp32 ``[C, S]``."""
    if cu_seqlens.numel() <= 1:  # no sequence
        return
    _backend.kernels(backend, FAMILY).phase_stats_bwd(
        valid.contiguous(), cu_seqlens.contiguous(), k.contiguous(), think_count.contiguous(),
        answer_count.contiguous(), delim_len, *(g.to(torch.float32).contiguous() for g in grads), dvalues,
    )  # fmt: skip


# --- torch.library registration -------------------------------------------------------------


def _phase_outputs(values, cu_seqlens):
    n_channels, n_seq = values.shape[0], cu_seqlens.shape[0] - 1
    dev = values.device
    stats = [torch.empty((n_channels, n_seq), dtype=torch.float32, device=dev) for _ in range(4)]
    ints = [torch.empty(n_seq, dtype=torch.int64, device=dev) for _ in range(3)]
    return (*stats, *ints, torch.empty(n_seq, dtype=torch.bool, device=dev))


@torch.library.custom_op("lenkernels::phase_stats", mutates_args=())
def _phase_stats(
    values: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    cu_seqlens: torch.Tensor,
    delimiter: torch.Tensor,
    backend: str,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    outs = _phase_outputs(values, cu_seqlens)
    phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, backend, outs)
    return outs


@_phase_stats.register_fake
def _(values, ids, valid, cu_seqlens, delimiter, backend):
    return _phase_outputs(values, cu_seqlens)


@torch.library.custom_op("lenkernels::phase_stats_backward", mutates_args=())
def _phase_stats_backward(
    valid: torch.Tensor,
    cu_seqlens: torch.Tensor,
    k: torch.Tensor,
    think_count: torch.Tensor,
    answer_count: torch.Tensor,
    delim_len: int,
    g_think_mean: torch.Tensor,
    g_think_sum: torch.Tensor,
    g_answer_mean: torch.Tensor,
    g_answer_sum: torch.Tensor,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    # zeros: packed tokens outside every sequence get no gradient and no kernel visits them
    dvalues = torch.zeros((g_think_mean.shape[0], valid.shape[0]), dtype=dtype, device=valid.device)
    grads = (g_think_mean, g_think_sum, g_answer_mean, g_answer_sum)
    phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len, grads, backend, dvalues)
    return dvalues


@_phase_stats_backward.register_fake
def _(valid, cu_seqlens, k, think_count, answer_count, delim_len, g_tm, g_ts, g_am, g_as, dtype, backend):
    return torch.empty((g_tm.shape[0], valid.shape[0]), dtype=dtype, device=valid.device)


def _setup_context(ctx, inputs, output):
    values, _, valid, cu_seqlens, delimiter, backend = inputs
    _, _, _, _, think_count, answer_count, k, _ = output
    ctx.save_for_backward(valid, cu_seqlens, k, think_count, answer_count)
    ctx.delim_len = delimiter.shape[0]
    ctx.dtype = values.dtype
    ctx.backend = backend


def _backward(ctx, g_tm, g_ts, g_am, g_as, *_unused):
    valid, cu_seqlens, k, think_count, answer_count = ctx.saved_tensors
    dvalues = torch.ops.lenkernels.phase_stats_backward(
        valid, cu_seqlens, k, think_count, answer_count, ctx.delim_len, g_tm, g_ts, g_am, g_as, ctx.dtype, ctx.backend
    )
    return dvalues, None, None, None, None, None


_phase_stats.register_autograd(_backward, setup_context=_setup_context)


# --- argument handling --------------------------------------------------------------------------


def _layout(ids_shape, like: torch.Tensor, like_name: str, mask, cu_seqlens):
    """Flat ``valid`` bool ``[N]`` and ``cu_seqlens`` int64 ``[B + 1]`` of a padded or packed layout
    (also the layout of ``sequence_stats``)."""
    if cu_seqlens is None:
        if len(ids_shape) != 2:
            raise ValueError(
                f"{like_name} must be [B, T] (padded) or [N] with cu_seqlens (packed), got shape {tuple(ids_shape)}"
            )
        cu = ref.padded_offsets(ids_shape[0], ids_shape[1], like.device)
    else:
        if len(ids_shape) != 1:
            raise ValueError(f"with cu_seqlens, {like_name} must be packed [N], got shape {tuple(ids_shape)}")
        cu = _checks.cu_seqlens(cu_seqlens, ids_shape[0], like, like_name, min_seqs=0)
    n_tokens = 1
    for d in ids_shape:
        n_tokens *= d
    if mask is None:
        valid = torch.ones(n_tokens, dtype=torch.bool, device=like.device)
    else:
        _checks.tensor(mask, "mask")
        _checks.same_device(like, like_name, mask, "mask")
        if tuple(mask.shape) != tuple(ids_shape):
            raise ValueError(f"mask must have the shape of {like_name} {tuple(ids_shape)}, got {tuple(mask.shape)}")
        valid = (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)
    return valid, cu


def _delimiter(delimiter, device: torch.device) -> torch.Tensor:
    """The delimiter as an int64 ``[L]`` tensor on ``device``."""
    if isinstance(delimiter, torch.Tensor):
        if delimiter.is_floating_point() or delimiter.is_complex() or delimiter.dtype == torch.bool:
            raise TypeError(f"delimiter must hold integer token ids, got dtype {delimiter.dtype}")
        if delimiter.dim() > 1:
            raise ValueError(f"delimiter must be a 1-D sequence of token ids, got shape {tuple(delimiter.shape)}")
        d = delimiter.reshape(-1).to(device=device, dtype=torch.int64)
        if d.numel() == 0:
            raise ValueError("delimiter must hold at least one token id")
        if _checks.value_checks(d.device) and bool((d < 0).any()):
            raise ValueError(f"delimiter token ids must be non-negative, got {d.tolist()}")
        return d
    if isinstance(delimiter, (str, bytes)):
        raise TypeError(
            "delimiter must be token ids, not text: pass tokenizer.encode('</think>', add_special_tokens=False)"
        )
    if isinstance(delimiter, numbers.Integral) and not isinstance(delimiter, bool):
        delimiter = [delimiter]
    if not isinstance(delimiter, Iterable):
        raise TypeError(
            f"delimiter must be a sequence of token ids or a 1-D integer tensor, got {type(delimiter).__name__}"
        )
    ids = list(delimiter)
    if not ids:
        raise ValueError("delimiter must hold at least one token id")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"delimiter must hold int token ids, got {type(i).__name__} ({i!r})")
    ids = [_checks.index(int(i), "delimiter") for i in ids]
    if min(ids) < 0:
        raise ValueError(f"delimiter token ids must be non-negative, got {ids}")
    if torch.compiler.is_compiling():
        return torch.tensor(ids, dtype=torch.int64, device=device)
    return _delimiter_on_device(tuple(ids), device)


@functools.lru_cache(maxsize=64)
def _delimiter_on_device(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # a host-to-device copy of a Python list waits for the stream: pay it once per delimiter
    # (and make a normal tensor even when first called under inference_mode)
    with torch.inference_mode(False):
        return torch.tensor(ids, dtype=torch.int64, device=device)


def _split_phases(values, ids, mask, delimiter, cu_seqlens, backend, name):
    """Runs the custom op; means and sums come back ``[C, B]``."""
    _checks.tensor(ids, "ids", dtypes=_checks.INT_DTYPES)
    name_b = _backend.resolve(backend, FAMILY, ids.device)
    _checks.float_input(values, name, name_b)
    _checks.same_device(ids, "ids", values, name)
    if tuple(values.shape) == tuple(ids.shape):
        n_channels = 1
    elif values.dim() == ids.dim() + 1 and tuple(values.shape[1:]) == tuple(ids.shape) and values.shape[0] > 0:
        n_channels = values.shape[0]
    else:
        raise ValueError(
            f"{name} must have the shape of ids {tuple(ids.shape)} or [C, *ids.shape] with C >= 1, "
            f"got {tuple(values.shape)}"
        )
    valid, cu = _layout(ids.shape, ids, "ids", mask, cu_seqlens)
    delim = _delimiter(delimiter, ids.device)
    return torch.ops.lenkernels.phase_stats(
        values.reshape(n_channels, ids.numel()), ids.reshape(-1), valid, cu, delim, name_b
    )


# --- public API --------------------------------------------------------------------------------


def _phase_result(cls, values, ids, mask, delimiter, cu_seqlens, backend, name):
    """The split as ``cls`` (PhaseStats or PhaseEntropy); values shaped like ids give [B] fields."""
    squeeze = isinstance(values, torch.Tensor) and isinstance(ids, torch.Tensor) and values.dim() == ids.dim()
    tm, ts, am, as_, tc, ac, k, found = _split_phases(values, ids, mask, delimiter, cu_seqlens, backend, name)
    if squeeze:
        tm, ts, am, as_ = tm[0], ts[0], am[0], as_[0]
    return cls(tm, ts, tc, am, as_, ac, k, found)


def phase_stats(
    values: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    delimiter,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> PhaseStats:
    """Per-sequence statistics of any per-token value (entropy, logprob, KL, ...) split into the
    thinking phase (before the delimiter) and the answer phase (after it), SPEC 6.

    For each sequence, k = position of the first complete occurrence of ``delimiter`` among its
    response tokens: the L delimiter tokens consecutive, each one a response token (``mask``).
    Think = response tokens before k; answer = response tokens after the delimiter; the delimiter
    tokens belong to neither. A partial occurrence at the end of a response, or one that runs into
    padding or a masked gap, does not count. Without an occurrence every response token is think,
    ``answer_count`` is 0 and ``found`` is False. An empty phase has mean 0 and count 0, never NaN.

    Args:
        values: float32, bfloat16 or float16 (float64 with ``backend="reference"``) of the shape of
            ``ids``, or ``[C, *ids.shape]`` to split C statistics in one call (one delimiter search).
            Values of non-response tokens are never read into a statistic (NaN there is harmless).
        ids: int32/int64 token ids: padded ``[B, T]``, or packed ``[N]`` with ``cu_seqlens``.
        mask: response tokens, the shape of ``ids`` (bool, or any dtype: nonzero = response). Left
            or right padding, or prompt tokens inside packed sequences, are masked out. Default: all.
        delimiter: the token ids of the delimiter (``</think>``): a list/tuple of ints, an int, or a
            1-D integer tensor; one token or several.
        cu_seqlens: packed layout only: int32/int64 ``[B + 1]`` non-decreasing offsets into ``[N]``
            (tokens outside ``[cu_seqlens[0], cu_seqlens[-1])`` belong to no sequence).
        backend: ``None`` (triton on CUDA, cpu on CPU), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        :class:`PhaseStats`: ``think_mean``, ``think_sum``, ``answer_mean``, ``answer_sum``
        (float32 ``[B]``, or ``[C, B]``; differentiable in ``values``), ``think_count`` and
        ``answer_count`` (int64 ``[B]``), ``delimiter_pos`` (int64 ``[B]``: the column of the first
        delimiter token in the padded row, or its offset inside the packed sequence; the sequence
        length ``T`` / ``cu_seqlens[b+1] - cu_seqlens[b]`` when not found, so that
        ``think = mask & (t < k)`` and ``answer = mask & (t >= k + L)`` hold in every case) and
        ``found`` (bool ``[B]``).

    Example (packed layout, log think/answer logprob and KL)::

        kl = logprobs - ref_logprobs                          # [N], packed tokens of B sequences
        st = phase_stats(torch.stack([logprobs, kl]), ids, response_mask,
                         delimiter=tok.encode("</think>", add_special_tokens=False),
                         cu_seqlens=cu_seqlens)              # means/sums [2, B]
        think_lp, think_kl = st.think_mean
    """
    return _phase_result(PhaseStats, values, ids, mask, delimiter, cu_seqlens, backend, "values")


def phase_entropy(
    entropy: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    delimiter,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> PhaseEntropy:
    """Think/answer split of the token entropy (SPEC 6, PEAR): :func:`phase_stats` of ``entropy``.

    Args:
        entropy: per-token entropy, float ``[B, T]`` padded or ``[N]`` packed (e.g. the second
            output of :func:`lenkernels.token_logprobs_entropy`).
        ids, mask, delimiter, cu_seqlens, backend: as in :func:`phase_stats`.

    Returns:
        :class:`PhaseEntropy` (the fields of :class:`PhaseStats`); ``think_mean`` and
        ``answer_mean`` are differentiable in ``entropy`` (a loss may use them).

    Example (padded, left-padded responses, a three-token ``</think>``)::

        pe = phase_entropy(entropy, ids, attention_mask, delimiter=[522, 26865, 29])
        pear_penalty = (pe.think_mean - pe.answer_mean).clamp(min=0)     # [B]
    """
    return _phase_result(PhaseEntropy, entropy, ids, mask, delimiter, cu_seqlens, backend, "entropy")


def token_stats_with_phases(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    delimiter,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> TokenStatsWithPhases:
    """Token logprobs and entropy from one read of the logits, plus their think/answer split.

    The logits are read once (:func:`lenkernels.token_logprobs_entropy`); the phase split runs
    one segmented kernel over the ``[N]`` entropy and logprob outputs, never over the logits.

    Args:
        logits: ``[B, T, V]`` padded or ``[N, V]`` packed; see ``token_logprobs_entropy``.
        ids: the sampled tokens, ``[B, T]`` or ``[N]``: the logprob targets and the sequence the
            delimiter is searched in.
        mask: response tokens (shape of ``ids``); default ``ids != ignore_index``.
        delimiter, cu_seqlens: as in :func:`phase_stats`.
        temperature, ignore_index, inplace_backward: as in ``token_logprobs_entropy``.
        backend: used for both steps (the logits pass and the phase split).

    Returns:
        :class:`TokenStatsWithPhases`: ``logprobs`` and ``entropy`` (float32, shape of ``ids``),
        ``entropy_phases`` (:class:`PhaseEntropy`) and ``logprob_phases`` (:class:`PhaseStats`).
        Everything float is differentiable in ``logits`` (phase means and sums through the
        per-token outputs).

    Example (packed)::

        out = token_stats_with_phases(logits, ids, delimiter=think_end_ids, cu_seqlens=cu, temperature=0.7)
        loss = pg_loss(out.logprobs, ...) - 0.01 * out.entropy_phases.answer_mean.mean()
    """
    _checks.flags(inplace_backward=inplace_backward)
    logprobs, entropy = token_logprobs_entropy(
        logits,
        ids,
        temperature=temperature,
        ignore_index=ignore_index,
        inplace_backward=inplace_backward,
        backend=backend,
    )
    if mask is None:
        mask = ids != ignore_index
    tm, ts, am, as_, tc, ac, k, found = _split_phases(
        torch.stack([entropy, logprobs]), ids, mask, delimiter, cu_seqlens, backend, "values"
    )
    ent = PhaseEntropy(tm[0], ts[0], tc, am[0], as_[0], ac, k, found)
    lp = PhaseStats(tm[1], ts[1], tc, am[1], as_[1], ac, k, found)
    return TokenStatsWithPhases(logprobs, entropy, ent, lp)
