"""Host launchers of the C++ phase- and sequence-statistics kernels (``csrc/cpu/phase_stats.cpp``):
the ``backend="cpu"`` implementation of the phase_stats family (same launcher signatures as
``lenkernels/{triton,cuda,reference}/phase_stats.py``)."""

from __future__ import annotations

import torch

from lenkernels.cpu import dtype_code, load, threads_for

FAMILY = "phase_stats"

_TOKENS_PER_THREAD = 1 << 18  # cpu.threads_for: streaming work worth one more thread


def _threads(n_tokens: int) -> int:
    return threads_for(n_tokens, _TOKENS_PER_THREAD)


def _u8(flags: torch.Tensor) -> torch.Tensor:
    """A 0/1 byte view of a contiguous bool (or uint8) tensor."""
    return flags.view(torch.uint8)


def phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, think_mean, think_sum, answer_mean, answer_sum,
                    think_count, answer_count, k, found) -> None:  # fmt: skip
    """values ``[C, N]`` float32/bfloat16/float16 (unit stride along N), ids ``[N]`` int32/int64,
    valid bool ``[N]``, cu_seqlens int64 ``[S + 1]``, delimiter int64 ``[L]`` (all contiguous);
    writes the means and sums (fp32 ``[C, S]``), counts and k (int64 ``[S]``) and found (bool ``[S]``)."""
    n_channels, n_tokens = values.shape
    y = ids.to(torch.int64).contiguous()
    load(FAMILY).phase_stats_fwd(
        values.data_ptr(), dtype_code(values, "values"), n_channels, values.stride(0), y.data_ptr(),
        _u8(valid).data_ptr(), n_tokens, cu_seqlens.data_ptr(), cu_seqlens.numel() - 1, delimiter.data_ptr(),
        delimiter.numel(), think_mean.data_ptr(), think_sum.data_ptr(), answer_mean.data_ptr(),
        answer_sum.data_ptr(), think_count.data_ptr(), answer_count.data_ptr(), k.data_ptr(), found.data_ptr(),
        _threads(values.numel()),
    )  # fmt: skip


def phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len: int, g_think_mean, g_think_sum,
                    g_answer_mean, g_answer_sum, dvalues) -> None:  # fmt: skip
    """Writes dvalues ``[C, N]`` (values dtype, unit stride along N) for every token of every
    sequence from the fp32 ``[C, S]`` contiguous cotangents; other tokens are left as they are."""
    load(FAMILY).phase_stats_bwd(
        _u8(valid).data_ptr(), valid.numel(), cu_seqlens.data_ptr(), cu_seqlens.numel() - 1, k.data_ptr(),
        think_count.data_ptr(), answer_count.data_ptr(), delim_len, g_think_mean.data_ptr(), g_think_sum.data_ptr(),
        g_answer_mean.data_ptr(), g_answer_sum.data_ptr(), dvalues.data_ptr(), dtype_code(dvalues, "dvalues"),
        dvalues.shape[0], dvalues.stride(0), _threads(dvalues.numel()),
    )  # fmt: skip


def sequence_stats_fwd(values, valid, cu_seqlens, threshold: float, quantile, length, mean, vmin, vmax, frac,
                       high) -> None:  # fmt: skip
    """values ``[N]`` contiguous, quantile fp32 ``[1]`` or None; writes length (int64 ``[S]``),
    mean/min/max/frac (fp32 ``[S]``) and, with a quantile, high (bool ``[N]``; tokens outside every
    sequence left as they are)."""
    load(FAMILY).sequence_stats_fwd(
        values.data_ptr(), dtype_code(values, "entropy"), _u8(valid).data_ptr(), values.numel(),
        cu_seqlens.data_ptr(), cu_seqlens.numel() - 1, float(threshold), 0 if quantile is None else quantile.data_ptr(),
        length.data_ptr(), mean.data_ptr(), vmin.data_ptr(), vmax.data_ptr(), frac.data_ptr(),
        0 if quantile is None else high.data_ptr(), _threads(values.numel()),
    )  # fmt: skip
