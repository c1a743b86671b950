"""Host launchers of the CUDA C++ group-advantage and group-statistics kernels (``csrc/cuda/advantages.cu``):
the ``backend="cuda"`` implementation of the advantages family (same launcher signatures as
``lenkernels/{triton,cpu,reference}/advantages.py``; the stages are those of ``lenkernels/_grouping.py``).

The binding checks the method and dtype codes (``lenkernels._codes``) before any launch and raises
on an unknown one. Under :func:`lenkernels.cuda.host_emulation` the launchers accept CPU tensors.
"""

from __future__ import annotations

import torch

from lenkernels import _grouping
from lenkernels.cuda import _dtype_code, _ptr, _target, load

FAMILY = "advantages"


def _code(x: torch.Tensor | None, name: str) -> int:
    return 0 if x is None else int(_grouping.weight_code(x, name))


def _segment_ptrs(seg: _grouping.Segments) -> dict:
    return {
        "perm": _ptr(seg.perm), "offsets": _ptr(seg.offsets), "n_groups": seg.n_groups.data_ptr(),
        "group_size": seg.group_size, "bound": max(seg.bound, 1),
    }  # fmt: skip


# --- stage launchers (lenkernels/_grouping.py Stages) ----------------------------------------------


def group_step(rewards, mask, lengths, seg, cfg, adv, raw, w_out) -> None:
    """Row sums of ``[B, T]`` token rewards and of ``mask`` (one block per response), then one warp
    per group: group mean / std / top-2 and one advantage per response (response order)."""
    device, sm_count, stream = _target(rewards, "rewards")
    n = rewards.shape[0]
    token = rewards.dim() == 2
    f32 = {"dtype": torch.float32, "device": rewards.device}
    score_buf = torch.empty(n, **f32) if token else None
    len_buf = torch.empty(n, **f32) if mask is not None else None
    load(FAMILY).group_advantages(
        rewards=rewards.data_ptr(), r_dtype=_dtype_code(rewards, "rewards"), n=n,
        T=rewards.shape[1] if token else 0, stride_r=rewards.stride(0) if token else 1,
        mask=_ptr(mask), m_dtype=_code(mask, "mask"), Tm=0 if mask is None else mask.shape[1],
        stride_m=0 if mask is None else mask.stride(0), lengths=_ptr(lengths), l_dtype=_code(lengths, "lengths"),
        **_segment_ptrs(seg), method=int(cfg.method), eps=float(cfg.eps), norm=bool(cfg.norm_by_std),
        ddof=float(cfg.ddof), adv=adv.data_ptr(), raw=_ptr(raw), w_out=_ptr(w_out), score_buf=_ptr(score_buf),
        len_buf=_ptr(len_buf), sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def gaussian_rank(keys, runs, adv) -> None:
    """One warp per run of tied scores: the mean normal score of the run's ranks."""
    device, sm_count, stream = _target(keys, "rewards")
    keys = keys.to(torch.float32).contiguous()
    load(FAMILY).gaussian_rank(
        keys=keys.data_ptr(), n=keys.shape[0], perm=runs.perm.data_ptr(), group_of=runs.group_of.data_ptr(),
        group_offsets=runs.group_offsets.data_ptr(), run_offsets=runs.run_offsets.data_ptr(),
        n_runs=runs.n_runs.data_ptr(), adv=adv.data_ptr(), sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def batch_shift_scale(x, w, cfg, stats) -> None:
    """One block: weighted moments of fixed 4096-element chunks merged in order, as the CPU backend
    forms them -> stats = (shift, scale)."""
    device, _, stream = _target(x, "rewards")
    x = x.to(torch.float32).contiguous()
    w = None if w is None else w.contiguous()
    load(FAMILY).batch_shift_scale(
        x=x.data_ptr(), n=x.shape[0], w=_ptr(w), w_dtype=_code(w, "weights"), method=int(cfg.method),
        eps=float(cfg.eps), stats=stats.data_ptr(), device=device, stream=stream,
    )  # fmt: skip


def broadcast(adv, stats, mask, out) -> None:
    """out = (adv - shift) * scale (with stats), times the mask row when given (masked tokens exactly
    0); out ``[B]`` or ``[B, T]`` fp32 with unit stride along T."""
    device, sm_count, stream = _target(adv, "rewards")
    load(FAMILY).broadcast(
        adv=adv.data_ptr(), n=adv.shape[0], stats=_ptr(stats), mask=_ptr(mask), m_dtype=_code(mask, "mask"),
        T=0 if mask is None else mask.shape[1], stride_m=0 if mask is None else mask.stride(0), out=out.data_ptr(),
        stride_o=out.stride(0) if mask is not None else 1, sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def group_stats_step(values, where, mask, seg, stats, lengths) -> None:
    """Row sums of the mask (one block per response), then one warp per group: count / sum / mean /
    std / min / max of the selected members, every column."""
    device, sm_count, stream = _target(values, "values")
    n, c_in = values.shape
    load(FAMILY).group_stats(
        values=values.data_ptr(), n=n, c_in=c_in, c_out=stats.shape[1], where=_ptr(where), mask=_ptr(mask),
        m_dtype=_code(mask, "mask"), T=0 if mask is None else mask.shape[1],
        stride_m=0 if mask is None else mask.stride(0), **_segment_ptrs(seg), stats=stats.data_ptr(),
        lengths=_ptr(lengths), sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


_STAGES = _grouping.Stages(group_step, gaussian_rank, batch_shift_scale, broadcast, group_stats_step)
group_advantages_fwd, group_stats_fwd = _grouping.launchers(_STAGES)
