"""Phase-split statistics (SPEC 6) and the per-sequence token statistics trainers log every step.

Chains of names:
  ``phase_stats`` / ``phase_entropy`` (public) -> ``lenkernels::phase_stats`` (custom op with
  autograd) -> ``phase_stats_fwd`` / ``phase_stats_bwd`` (host launchers, one branch per backend)
  -> ``triton/phase_stats.py``, ``csrc/cpu/phase_stats.cpp`` (maths in
  ``csrc/include/lenkernels/phase_stats.h``).
  ``sequence_stats`` -> quantile threshold (sort, or a bisection over ranks with collectives) ->
  ``lenkernels::sequence_stats`` -> ``sequence_stats_fwd`` -> kernels.
  ``token_stats_with_phases`` -> ``token_logprobs_entropy`` (one read of the logits) and one
  ``lenkernels::phase_stats`` call on the stacked ``[2, N]`` (entropy, logprob) outputs.

Layouts: padded ``[B, T]`` with ``mask`` marking response tokens (left or right padding, or
any other pattern), or packed ``[N]`` with ``cu_seqlens`` ``[B + 1]`` (and optionally ``mask``
marking the response tokens inside each packed sequence).
"""

from __future__ import annotations

import functools
import math
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


class SequenceStats(NamedTuple):
    """Per-sequence token-entropy statistics; see :func:`sequence_stats`."""

    length: torch.Tensor
    entropy_mean: torch.Tensor
    entropy_min: torch.Tensor
    entropy_max: torch.Tensor
    frac_above_threshold: torch.Tensor
    high_entropy_mask: torch.Tensor | None
    high_entropy_threshold: torch.Tensor | None


class TokenStatsWithPhases(NamedTuple):
    """Outputs of :func:`token_stats_with_phases`."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    entropy_phases: PhaseEntropy
    logprob_phases: PhaseStats


# --- host launchers -----------------------------------------------------------------------------


def _as_uint8(valid: torch.Tensor) -> torch.Tensor:
    return valid.contiguous().view(torch.uint8)


# Tokens per CPU thread below which another thread costs more (fork/join, a descheduled
# straggler on a busy host) than the ~0.2 ms of streaming work it would take over.
_TOKENS_PER_THREAD = 1 << 18


def _cpu_threads(n_elements: int) -> int:
    return max(1, min(torch.get_num_threads(), n_elements // _TOKENS_PER_THREAD))


def _unit_stride(values2d: torch.Tensor) -> torch.Tensor:
    return values2d if values2d.stride(-1) == 1 or values2d.shape[-1] <= 1 else values2d.contiguous()


def phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, backend: str, outs) -> None:
    """Host launcher. values ``[C, N]``, ids ``[N]``, valid bool ``[N]``, cu_seqlens int64
    ``[S + 1]``, delimiter int64 ``[L]``; writes ``outs`` = (think_mean, think_sum, answer_mean,
    answer_sum) fp32 ``[C, S]``, (think_count, answer_count, k) int64 ``[S]``, found bool ``[S]``."""
    n_seq = cu_seqlens.numel() - 1
    if n_seq == 0:
        return
    tm, ts, am, as_, tc, ac, k, found = outs
    x = _unit_stride(values)
    cu = cu_seqlens.contiguous()
    delim = delimiter.contiguous()
    if backend == "cpu":
        from lenkernels import cpu

        y = ids.to(torch.int64).contiguous()
        cpu.load(FAMILY).phase_stats_fwd(
            x.data_ptr(), _checks.DTYPE_CODES[x.dtype], x.shape[0], x.stride(0), y.data_ptr(),
            _as_uint8(valid).data_ptr(), x.shape[1], cu.data_ptr(), n_seq, delim.data_ptr(), delim.numel(),
            tm.data_ptr(), ts.data_ptr(), am.data_ptr(), as_.data_ptr(), tc.data_ptr(), ac.data_ptr(),
            k.data_ptr(), found.data_ptr(), _cpu_threads(x.numel()),
        )  # fmt: skip
    elif backend == "triton":
        from lenkernels.triton.phase_stats import phase_stats_fwd as launch

        launch(x, ids.contiguous(), _as_uint8(valid), cu, delim, tm, ts, am, as_, tc, ac, k, found.view(torch.uint8))
    elif backend == "cuda":
        from lenkernels import cuda

        cuda.phase_stats_fwd(x, ids, valid, cu, delim, tm, ts, am, as_, tc, ac, k, found.view(torch.uint8))
    else:
        for out, val in zip(outs, ref.phase_stats_forward(x, ids, valid, cu, delim)):
            out.copy_(val)


def phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len: int, grads, backend: str, dvalues):
    """Host launcher: writes ``dvalues`` ``[C, N]`` (values dtype) for every token of every
    sequence; tokens outside all sequences are left as they are. ``grads`` = cotangents of
    (think_mean, think_sum, answer_mean, answer_sum), fp32 ``[C, S]``."""
    n_seq = cu_seqlens.numel() - 1
    if n_seq == 0:
        return
    g = [x.to(torch.float32).contiguous() for x in grads]
    cu = cu_seqlens.contiguous()
    if backend == "cpu":
        from lenkernels import cpu

        cpu.load(FAMILY).phase_stats_bwd(
            _as_uint8(valid).data_ptr(), valid.numel(), cu.data_ptr(), n_seq, k.data_ptr(), think_count.data_ptr(),
            answer_count.data_ptr(), delim_len, *(x.data_ptr() for x in g), dvalues.data_ptr(),
            _checks.DTYPE_CODES[dvalues.dtype], dvalues.shape[0], dvalues.stride(0), _cpu_threads(dvalues.numel()),
        )  # fmt: skip
    elif backend == "triton":
        from lenkernels.triton.phase_stats import phase_stats_bwd as launch

        launch(_as_uint8(valid), cu, k, think_count, answer_count, delim_len, *g, dvalues)
    elif backend == "cuda":
        from lenkernels import cuda

        cuda.phase_stats_bwd(valid, cu, k, think_count, answer_count, delim_len, *g, dvalues)
    else:
        grad = ref.phase_stats_backward(dvalues, valid, cu, k, think_count, answer_count, delim_len, *g)
        seq, _, _ = ref._segments(cu, valid.numel())
        dvalues.copy_(torch.where(seq >= 0, grad, dvalues))


def sequence_stats_fwd(values, valid, cu_seqlens, threshold: float, quantile, backend: str, outs) -> None:
    """Host launcher. values ``[N]``, valid bool ``[N]``, quantile fp32 ``[1]`` or None; writes
    ``outs`` = (length int64, mean, min, max, frac_above fp32) ``[S]`` and high bool ``[N]`` (only
    with a quantile; tokens outside all sequences are left as they are)."""
    n_seq = cu_seqlens.numel() - 1
    if n_seq == 0:
        return
    length, mean, vmin, vmax, frac, high = outs
    x = values.contiguous()
    cu = cu_seqlens.contiguous()
    if backend == "cpu":
        from lenkernels import cpu

        cpu.load(FAMILY).sequence_stats_fwd(
            x.data_ptr(), _checks.DTYPE_CODES[x.dtype], _as_uint8(valid).data_ptr(), x.numel(), cu.data_ptr(),
            n_seq, float(threshold), 0 if quantile is None else quantile.data_ptr(), length.data_ptr(),
            mean.data_ptr(), vmin.data_ptr(), vmax.data_ptr(), frac.data_ptr(),
            0 if quantile is None else high.data_ptr(), _cpu_threads(x.numel()),
        )  # fmt: skip
    elif backend == "triton":
        from lenkernels.triton.phase_stats import sequence_stats_fwd as launch

        launch(x, _as_uint8(valid), cu, threshold, quantile, length, mean, vmin, vmax, frac,
               None if quantile is None else high.view(torch.uint8))  # fmt: skip
    elif backend == "cuda":
        from lenkernels import cuda

        cuda.sequence_stats_fwd(x, valid, cu, threshold, quantile, length, mean, vmin, vmax, frac,
                                None if quantile is None else high.view(torch.uint8))  # fmt: skip
    else:
        res = ref.sequence_stats(x, valid, cu, threshold, quantile)
        for out, val in zip((length, mean, vmin, vmax, frac), res[:5]):
            out.copy_(val)
        if quantile is not None:
            seq, _, _ = ref._segments(cu, x.numel())
            high.copy_(torch.where(seq >= 0, res[5], high))


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


# --- argument handling --------------------------------------------------------------------------


def _check_values(values: torch.Tensor, name: str, backend: str) -> None:
    _checks.tensor(values, name)
    allowed = _checks.FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    if values.dtype not in allowed:
        extra = " (float64 only with backend='reference')" if values.dtype == torch.float64 else ""
        raise TypeError(f"{name} must be float32, bfloat16 or float16{extra}, got {values.dtype}")


def _check_cu_seqlens(cu_seqlens, n_tokens: int, like: torch.Tensor, like_name: str) -> torch.Tensor:
    _checks.tensor(cu_seqlens, "cu_seqlens", dtypes=_checks.INT_DTYPES)
    _checks.same_device(like, like_name, cu_seqlens, "cu_seqlens")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if _checks.value_checks(cu_seqlens.device) and cu_seqlens.numel() > 0:
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()[:16]}")
        lo, hi = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if lo < 0 or hi > n_tokens:
            raise ValueError(f"cu_seqlens must lie in [0, {n_tokens}] (the number of tokens), got [{lo}, {hi}]")
    return cu_seqlens.to(torch.int64)


def _layout(ids_shape, like: torch.Tensor, like_name: str, mask, cu_seqlens):
    """Flat ``valid`` bool ``[N]`` and ``cu_seqlens`` int64 ``[B + 1]`` of a padded or packed layout."""
    if cu_seqlens is None:
        if len(ids_shape) != 2:
            raise ValueError(
                f"{like_name} must be [B, T] (padded) or [N] with cu_seqlens (packed), got shape {tuple(ids_shape)}"
            )
        cu = ref.padded_offsets(ids_shape[0], ids_shape[1], like.device)
    else:
        if len(ids_shape) != 1:
            raise ValueError(f"with cu_seqlens, {like_name} must be packed [N], got shape {tuple(ids_shape)}")
        cu = _check_cu_seqlens(cu_seqlens, ids_shape[0], like, like_name)
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
    _check_values(values, name, name_b)
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


# --- quantile threshold (TRL top_entropy_quantile) -----------------------------------------------

_KEY_SPAN = 1 << 32


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2^32) with the order of the values (NaN above +inf)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, (~bits) & 0xFFFFFFFF, bits | (1 << 31))


def _from_keys(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= 1 << 31, keys - (1 << 31), (~keys) & 0xFFFFFFFF)
    return torch.where(bits >= 1 << 31, bits - _KEY_SPAN, bits).to(torch.int32).view(torch.float32)


def _kth_across_ranks(x: torch.Tensor, valid: torch.Tensor, ranks: torch.Tensor, group) -> torch.Tensor:
    """Exact order statistics (0-based ``ranks``) of the valid values of every rank: a bisection
    over the 2^32 float32 keys, one all_reduce of a count per step, no host synchronisation."""
    import torch.distributed as dist

    keys = torch.where(valid, _order_keys(x), torch.full_like(valid, _KEY_SPAN, dtype=torch.int64))
    lo = torch.zeros_like(ranks)
    hi = torch.full_like(ranks, _KEY_SPAN - 1)
    for _ in range(32):  # 2^32 candidate keys: 32 halvings leave one
        mid = (lo + hi) // 2
        count = (keys.unsqueeze(0) <= mid.unsqueeze(1)).sum(1)
        dist.all_reduce(count, group=group)
        enough = count > ranks
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return _from_keys(lo)


def _quantile_threshold(values, valid, level: float, process_group, host_select: bool | None = None) -> torch.Tensor:
    """``torch.quantile(values[valid], level)`` (linear interpolation, float32, over every rank of
    ``process_group``) as a ``[1]`` tensor; NaN when there is no valid value or a valid value is
    NaN (TRL's threshold then selects no token). No host sync on a device: a sort and a gather
    (or the bisection over ranks); host memory selects the two neighbours in one O(N) pass."""
    x = values.reshape(-1).to(torch.float32)
    valid = valid.reshape(-1)
    on_host = process_group is None and x.device.type == "cpu" and not torch.compiler.is_compiling()
    on_host = on_host if host_select is None else host_select and on_host
    if on_host:
        import numpy as np

        v = valid.numpy()
        keys = np.where(v, x.numpy(), np.float32(np.inf))  # invalid tokens order last
        counts = torch.tensor([np.count_nonzero(v), np.count_nonzero(np.isnan(keys))])
    else:
        keys = torch.where(valid, x, torch.full_like(x, float("inf")))
        counts = torch.stack([valid.sum(), torch.isnan(keys).sum()])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=process_group)
    n, n_nan = counts[0], counts[1]
    q = torch.full((), level, dtype=torch.float32, device=x.device)
    # the same float32 arithmetic as torch.quantile: rank = q * (n - 1), lerp between neighbours
    rank = q * (n - 1)
    below = rank.to(torch.int64)
    above = rank.ceil().to(torch.int64)
    weight = rank - below
    ranks = torch.stack([below, above]).clamp(min=0)
    if process_group is not None:
        neighbours = _kth_across_ranks(x, valid, ranks, process_group)
    elif x.numel() == 0:
        neighbours = torch.full((2,), float("nan"), device=x.device)
    elif on_host:
        picks = ranks.clamp(max=x.numel() - 1).tolist()
        neighbours = torch.from_numpy(np.partition(keys, picks)[picks])
    else:
        neighbours = torch.sort(keys).values.gather(0, ranks.clamp(max=x.numel() - 1))
    thr = neighbours[0].lerp(neighbours[1], weight)
    thr = torch.where((n == 0) | (n_nan > 0), torch.full_like(thr, float("nan")), thr)
    return thr.reshape(1)


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
    _check_values(entropy, "entropy", name)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got nan (every comparison with it is False)")
    level = None
    if top_entropy_quantile is not None:
        if isinstance(top_entropy_quantile, bool) or not isinstance(top_entropy_quantile, (int, float)):
            raise TypeError(
                f"top_entropy_quantile must be a float in [0, 1], got {type(top_entropy_quantile).__name__}"
            )
        if not 0.0 <= float(top_entropy_quantile) <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
        level = 1.0 - float(top_entropy_quantile)
    elif process_group is not None:
        raise ValueError("process_group is only used with top_entropy_quantile; pass both or neither")
    valid, cu = _layout(entropy.shape, entropy, "entropy", mask, cu_seqlens)
    if cu_seqlens is not None:  # packed tokens outside every sequence are nobody's response tokens
        t = torch.arange(valid.shape[0], device=valid.device)
        valid = valid & (t >= cu[0]) & (t < cu[-1])
    x = entropy.detach().reshape(-1)
    quantile = None if level is None else _quantile_threshold(x, valid, level, process_group)
    length, mean, vmin, vmax, frac, high = torch.ops.lenkernels.sequence_stats(
        x, valid, cu, float(threshold), quantile, name
    )
    if quantile is None:
        return SequenceStats(length, mean, vmin, vmax, frac, None, None)
    return SequenceStats(length, mean, vmin, vmax, frac, high.reshape(entropy.shape), quantile.reshape(()))
