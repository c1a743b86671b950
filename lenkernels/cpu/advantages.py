"""Host launchers of the C++ group-advantage and group-statistics kernels (``csrc/cpu/advantages.cpp``):
the ``backend="cpu"`` implementation of the advantages family (same launcher signatures as
``lenkernels/{triton,cuda,reference}/advantages.py``; the stages are those of ``lenkernels/_grouping.py``).

The kernels take raw pointers, sizes, strides and dtype codes (``lenkernels._codes``); they check
the method and dtype codes before any work and raise on an unknown one.
"""

from __future__ import annotations

import torch

from lenkernels import _checks, _grouping
from lenkernels.cpu import load

FAMILY = "advantages"


def _threads(work: int) -> int:
    """CPU threads for ``work`` elements: one for small problems (waking a team costs more than them)."""
    return torch.get_num_threads() if work >= 1 << 16 else 1


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _code(x: torch.Tensor | None, name: str) -> int:
    return 0 if x is None else int(_grouping.weight_code(x, name))


# --- stage launchers (lenkernels/_grouping.py Stages) ----------------------------------------------


def group_step(rewards, mask, lengths, seg, cfg, adv, raw, w_out) -> None:
    """One group per work item: scores (row sums of ``[B, T]`` token rewards), lengths (``lengths``
    or the row sums of ``mask``), group mean / std / top-2, one advantage per response."""
    n = rewards.shape[0]
    token = rewards.dim() == 2
    load(FAMILY).group_advantages(
        rewards.data_ptr(), _checks.DTYPE_CODES[rewards.dtype], n, rewards.shape[1] if token else 0,
        rewards.stride(0) if token else 1,
        _ptr(mask), _code(mask, "mask"), mask.shape[1] if mask is not None else 0,
        mask.stride(0) if mask is not None else 0,
        _ptr(lengths), _code(lengths, "lengths"),
        _ptr(seg.perm), _ptr(seg.offsets), seg.n_groups.data_ptr(), seg.group_size, int(cfg.method), float(cfg.eps),
        bool(cfg.norm_by_std), float(cfg.ddof), adv.data_ptr(), _ptr(raw), _ptr(w_out),
        _threads(rewards.numel() + (mask.numel() if mask is not None else 0)),
    )  # fmt: skip


def gaussian_rank(keys, runs, adv) -> None:
    """One run of tied scores per work item: the mean normal score of the run's ranks."""
    load(FAMILY).gaussian_rank(
        keys.data_ptr(), keys.shape[0], runs.perm.data_ptr(), runs.group_of.data_ptr(),
        runs.group_offsets.data_ptr(), runs.run_offsets.data_ptr(), runs.n_runs.data_ptr(), adv.data_ptr(),
        _threads(16 * keys.shape[0]),
    )  # fmt: skip


def batch_shift_scale(x, w, cfg, stats) -> None:
    """Weighted moments of fixed 4096-element chunks merged in order -> stats = (shift, scale)."""
    load(FAMILY).batch_shift_scale(
        x.data_ptr(), x.shape[0], _ptr(w), _code(w, "weights"), int(cfg.method), float(cfg.eps), stats.data_ptr(),
        _threads(x.shape[0]),
    )  # fmt: skip


def broadcast(adv, stats, mask, out) -> None:
    """out = (adv - shift) * scale (with stats), times the mask row when given."""
    load(FAMILY).broadcast(
        adv.data_ptr(), adv.shape[0], _ptr(stats), _ptr(mask), _code(mask, "mask"),
        mask.shape[1] if mask is not None else 0, mask.stride(0) if mask is not None else 0,
        out.data_ptr(), out.stride(0) if mask is not None else 1, _threads(out.numel()),
    )  # fmt: skip


def group_stats_step(values, where, mask, seg, stats, lengths) -> None:
    """count / sum / mean / std / min / max of the selected members of each group, every column."""
    n = values.shape[0]
    load(FAMILY).group_stats(
        values.data_ptr(), n, values.shape[1], stats.shape[1], _ptr(where),
        _ptr(mask), _code(mask, "mask"), mask.shape[1] if mask is not None else 0,
        mask.stride(0) if mask is not None else 0,
        _ptr(seg.perm), _ptr(seg.offsets), seg.n_groups.data_ptr(), seg.group_size, stats.data_ptr(), _ptr(lengths),
        _threads(stats.numel() + (mask.numel() if mask is not None else 0)),
    )  # fmt: skip


_STAGES = _grouping.Stages(group_step, gaussian_rank, batch_shift_scale, broadcast, group_stats_step)
group_advantages_fwd, group_stats_fwd = _grouping.launchers(_STAGES)
