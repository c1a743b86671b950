"""Host launchers of the CUDA C++ phase- and sequence-statistics kernels (``csrc/cuda/phase_stats.cu``): the ``backend="cuda"``
implementation of the phase_stats family (same launcher signatures as the other backends)."""

from __future__ import annotations

import torch

from lenkernels.cuda import _as_u8, _dtype_code, _ptr, _target, load

FAMILY = "phase_stats"


def phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, think_mean, think_sum, answer_mean, answer_sum,
                    think_count, answer_count, k, found) -> None:  # fmt: skip
    """Host launcher of the phase split: values ``[C, N]`` float32/bfloat16/float16 (unit stride
    along N, any channel stride), ids ``[N]`` int32/int64, valid ``[N]`` bool/uint8, cu_seqlens
    int64 ``[S + 1]``, delimiter int64 ``[L]``; writes the means and sums (fp32 ``[C, S]``,
    contiguous), counts and k (int64 ``[S]``) and found (bool/uint8 ``[S]``)."""
    device, _, stream = _target(values, "values")
    if values.shape[-1] > 1 and values.stride(-1) != 1:
        values = values.contiguous()
    ids = ids if ids.dtype in (torch.int32, torch.int64) else ids.to(torch.int64)
    ids, valid = ids.contiguous(), _as_u8(valid.contiguous())
    cu, delim = cu_seqlens.to(torch.int64).contiguous(), delimiter.to(torch.int64).contiguous()
    load("phase_stats").phase_stats_fwd(
        values=values.data_ptr(), dtype=_dtype_code(values, "values"), n_channels=values.shape[0],
        channel_stride=values.stride(0), ids=ids.data_ptr(), id_bytes=ids.element_size(), valid=valid.data_ptr(),
        n_tokens=valid.numel(), cu_seqlens=cu.data_ptr(), n_seq=cu.numel() - 1, delim=delim.data_ptr(),
        delim_len=delim.numel(), think_mean=think_mean.data_ptr(), think_sum=think_sum.data_ptr(),
        answer_mean=answer_mean.data_ptr(), answer_sum=answer_sum.data_ptr(), think_count=think_count.data_ptr(),
        answer_count=answer_count.data_ptr(), k=k.data_ptr(), found=_as_u8(found).data_ptr(), device=device,
        stream=stream,
    )  # fmt: skip


def phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len: int, g_think_mean, g_think_sum,
                    g_answer_mean, g_answer_sum, dvalues) -> None:  # fmt: skip
    """Host launcher of the phase-split backward: writes dvalues ``[C, N]`` (values dtype, unit stride
    along N) for every token of every sequence from the fp32 ``[C, S]`` cotangents of the means and
    sums; tokens outside every sequence are left as they are."""
    device, _, stream = _target(dvalues, "dvalues")
    if dvalues.shape[-1] > 1 and dvalues.stride(-1) != 1:
        raise ValueError("dvalues must have unit stride along the tokens")
    valid, cu = _as_u8(valid.contiguous()), cu_seqlens.to(torch.int64).contiguous()
    g = [x.to(torch.float32).contiguous() for x in (g_think_mean, g_think_sum, g_answer_mean, g_answer_sum)]
    load("phase_stats").phase_stats_bwd(
        valid=valid.data_ptr(), n_tokens=valid.numel(), cu_seqlens=cu.data_ptr(), n_seq=cu.numel() - 1,
        k=k.contiguous().data_ptr(), think_count=think_count.contiguous().data_ptr(),
        answer_count=answer_count.contiguous().data_ptr(), delim_len=int(delim_len), g_think_mean=g[0].data_ptr(),
        g_think_sum=g[1].data_ptr(), g_answer_mean=g[2].data_ptr(), g_answer_sum=g[3].data_ptr(),
        dvalues=dvalues.data_ptr(), dtype=_dtype_code(dvalues, "dvalues"), n_channels=dvalues.shape[0],
        channel_stride=dvalues.stride(0), device=device, stream=stream,
    )  # fmt: skip


def sequence_stats_fwd(values, valid, cu_seqlens, threshold: float, quantile, length, mean, vmin, vmax, frac,
                       high) -> None:  # fmt: skip
    """Host launcher of the per-sequence statistics: values ``[N]`` float32/bfloat16/float16, valid
    ``[N]``, quantile fp32 ``[1]`` or None; writes length (int64 ``[S]``), mean/min/max/frac (fp32
    ``[S]``) and, with a quantile, high (bool/uint8 ``[N]``; tokens outside every sequence left as
    they are)."""
    device, _, stream = _target(values, "entropy")
    values, valid = values.contiguous(), _as_u8(valid.contiguous())
    cu = cu_seqlens.to(torch.int64).contiguous()
    load("phase_stats").sequence_stats_fwd(
        values=values.data_ptr(), dtype=_dtype_code(values, "entropy"), valid=valid.data_ptr(),
        n_tokens=values.numel(), cu_seqlens=cu.data_ptr(), n_seq=cu.numel() - 1, threshold=float(threshold),
        quantile=_ptr(quantile), length=length.data_ptr(), mean=mean.data_ptr(), min=vmin.data_ptr(),
        max=vmax.data_ptr(), frac_above=frac.data_ptr(), high=0 if quantile is None else _as_u8(high).data_ptr(),
        device=device, stream=stream,
    )  # fmt: skip
