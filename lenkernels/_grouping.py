"""Grouping on the device without host syncs, and the host side of the compiled group-advantage
backends (cpu, cuda, triton) staged over their kernels.

Responses are stably sorted by group id on the device, group starts come from a scan of the sorted
ids (``segments``), and the kernels visit one group at a time with programs bounded by B, reading
the group count from device memory. The gaussian method sorts by (group, score) and reduces over
runs of tied scores (``runs``).

A compiled backend's ``lenkernels/<backend>/advantages.py`` defines the stage launchers of
:class:`Stages` (same signatures on every compiled backend) and runs the family's two launchers,
``group_advantages_fwd`` and ``group_stats_fwd``, through :func:`group_advantages` and
:func:`group_stats` here. The reference backend implements those two launchers directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from lenkernels._codes import WEIGHT_OF, Method, Weight

# methods whose group step is followed by a batch-level (shift, scale)
GLOBAL_METHODS = (Method.REINFORCE_PP_BASELINE, Method.BATCH)
# methods whose group step weights by response length
LENGTH_WEIGHTED = (Method.OPO, Method.REINFORCE_PP_BASELINE)


class Segments(NamedTuple):
    perm: torch.Tensor | None  # [B] int64 sorted position -> response; None for contiguous groups
    offsets: torch.Tensor | None  # int64 group starts, then B (padded with B to B + 1 entries on a GPU)
    n_groups: torch.Tensor  # [1] int64
    group_size: int  # > 0 for contiguous groups, else 0
    bound: int  # host-side upper bound of the group count


class Runs(NamedTuple):
    perm: torch.Tensor  # [B] int64: responses sorted by (group, score)
    group_of: torch.Tensor  # [B] int64 group index of each sorted position
    group_offsets: torch.Tensor  # int64, as Segments.offsets
    run_offsets: torch.Tensor  # int64 starts of the runs of equal (group, score), as Segments.offsets
    n_runs: torch.Tensor  # [1] int64


def _starts_to_offsets(new: torch.Tensor):
    """Segment starts (bool [B], first True) -> (segment index per position, offsets, count [1]).

    offsets[g] is the first position of segment g and offsets[count] = B. On a GPU offsets has B + 1
    entries (B past the last segment) so its size does not depend on the data (no host sync); on the
    CPU, where a data-dependent size costs nothing, it is read from the starts directly."""
    seg = torch.cumsum(new, 0) - 1
    n = new.shape[0]
    if new.device.type == "cpu":
        ends = torch.full((1,), n, dtype=torch.int64)
        return seg, torch.cat([new.nonzero().reshape(-1), ends]), seg[-1:] + 1
    offsets = torch.searchsorted(seg, torch.arange(n + 1, device=new.device))
    return seg, offsets, seg[-1:] + 1


def segments(groups: torch.Tensor | None, group_size: int, n: int, device) -> Segments:
    """Group layout of ``n`` responses: contiguous groups of ``group_size``, or a stable sort of the
    ids in ``groups`` (deterministic: equal ids keep response order)."""
    if groups is None:
        count = torch.full((1,), n // group_size, dtype=torch.int64, device=device)
        return Segments(None, None, count, group_size, n // group_size)
    sorted_ids, perm = torch.sort(groups, stable=True)
    new = torch.ones(n, dtype=torch.bool, device=device)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    _, offsets, count = _starts_to_offsets(new)
    return Segments(perm, offsets, count, 0, n)


def runs(keys: torch.Tensor, groups: torch.Tensor) -> Runs:
    """Runs of equal (group, key) after sorting by group, then key (NaN last), then response."""
    by_key = torch.argsort(keys, stable=True)
    perm = by_key[torch.argsort(groups[by_key], stable=True)]
    g, k = groups[perm], keys[perm]
    n = keys.shape[0]
    new_group = torch.ones(n, dtype=torch.bool, device=keys.device)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.clone()
    new_run[1:] |= k[1:] != k[:-1]  # NaN != NaN: each NaN is a run of its own
    group_of, group_offsets, _ = _starts_to_offsets(new_group)
    _, run_offsets, n_runs = _starts_to_offsets(new_run)
    return Runs(perm, group_of, group_offsets, run_offsets, n_runs)


def weight_code(x: torch.Tensor, name: str) -> Weight:
    """The ``Weight`` code of a mask / lengths / weights tensor; ValueError naming it otherwise."""
    if x.dtype not in WEIGHT_OF:
        raise ValueError(f"{name} must be float32/bfloat16/float16/bool/uint8/int32/int64, got {x.dtype}")
    return WEIGHT_OF[x.dtype]


def _weights_for_kernel(x: torch.Tensor | None) -> torch.Tensor | None:
    """Masks / lengths as the kernels read them: float64 (reference-only precision) becomes float32."""
    if x is None or x.dtype in WEIGHT_OF:
        return x
    return x.to(torch.float32)


def _rows_unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    if x.dim() == 1:
        return x.contiguous()
    return x if x.stride(-1) == 1 else x.contiguous()


class Stages(NamedTuple):
    """The stage launchers of a compiled backend (``lenkernels/<backend>/advantages.py``), each
    writing into the outputs it is given; ``cfg`` is the op's frozen config (``method``, ``eps``,
    ``norm_by_std``, ``unbiased``, ``ddof``).

    - ``group_step(rewards, mask, lengths, seg, cfg, adv, raw, w_out)``: rewards ``[B]`` or
      ``[B, T]`` (rows of unit stride), mask ``[B, T]`` only when its row sums are the lengths
      (opo, reinforce_pp_baseline without ``lengths``), lengths ``[B]`` or None, seg
      :class:`Segments`; writes adv ``[B]`` fp32 (the centred score for batch / rpp) and, when
      given, the raw scores / lengths into raw / w_out, response order.
    - ``gaussian_rank(keys, runs, adv)``: keys ``[B]`` fp32, runs :class:`Runs`; writes adv ``[B]``.
    - ``batch_shift_scale(x, w, cfg, stats)``: x ``[B]`` fp32, w ``[B]`` weights or None; writes
      stats ``[2]`` fp32 = (shift, scale) of batch / reinforce_pp_baseline.
    - ``broadcast(adv, stats, mask, out)``: out = (adv - shift) * scale (with stats), times the
      mask row when given (masked tokens exactly 0).
    - ``group_stats_step(values, where, mask, seg, stats, lengths)``: values ``[B, C]`` fp32, where
      ``[B, C']`` fp32 0/1 or None, mask ``[B, T]`` or None; writes stats ``[B, C', 6]`` and, with
      a mask, lengths ``[B]``.
    """

    group_step: Callable
    gaussian_rank: Callable
    batch_shift_scale: Callable
    broadcast: Callable
    group_stats_step: Callable


def group_advantages(stages: Stages, rewards, groups, group_size, mask, lengths, task_ids, cfg, out) -> None:
    """``group_advantages_fwd`` of a compiled backend: writes ``out`` (fp32, ``[B]`` or
    ``mask.shape``; B > 0) through the backend's ``stages``. No host sync."""
    n = rewards.shape[0]
    device = rewards.device
    method = cfg.method
    rewards = _rows_unit_stride(rewards)
    mask = _rows_unit_stride(_weights_for_kernel(mask))
    lengths = _rows_unit_stride(_weights_for_kernel(lengths))
    f32 = {"dtype": torch.float32, "device": device}
    direct = mask is None and method not in GLOBAL_METHODS  # the group step writes the final answer
    adv = out if direct else torch.empty(n, **f32)

    if method == Method.GAUSSIAN:
        keys = rewards.to(torch.float32) if rewards.dim() == 1 else rewards.sum(-1, dtype=torch.float32)
        ids = groups if groups is not None else torch.arange(n, device=device) // group_size
        stages.gaussian_rank(keys, runs(keys, ids), adv)
        if task_ids is not None:
            first = adv.clone()
            stages.gaussian_rank(first, runs(first, task_ids), adv)
    else:
        seg = segments(groups, group_size, n, device)
        len_mask = mask if lengths is None and method in LENGTH_WEIGHTED else None  # lengths = its row sums
        raw = torch.empty(n, **f32) if method == Method.BATCH else None
        w_out = torch.empty(n, **f32) if method == Method.REINFORCE_PP_BASELINE and len_mask is not None else None
        stages.group_step(rewards, len_mask, lengths, seg, cfg, adv, raw, w_out)

    stats = None
    if method in GLOBAL_METHODS:
        x, w = (raw, None) if method == Method.BATCH else (adv, w_out if w_out is not None else lengths)
        stats = torch.empty(2, **f32)
        stages.batch_shift_scale(x, w, cfg, stats)
    if not direct:
        stages.broadcast(adv, stats, mask, out)


def group_stats(stages: Stages, values, where, groups, group_size, mask, stats, lengths) -> None:
    """``group_stats_fwd`` of a compiled backend: writes stats ``[B, C', 6]`` and, with a mask,
    lengths ``[B]`` (B > 0) through the backend's ``stages``."""
    n = values.shape[0]
    values = values.to(torch.float32).contiguous()
    where = where.to(torch.float32).contiguous() if where is not None else None
    mask = _rows_unit_stride(_weights_for_kernel(mask))
    seg = segments(groups, group_size, n, values.device)
    stages.group_stats_step(values, where, mask, seg, stats, lengths if mask is not None else None)


def launchers(stages: Stages) -> tuple[Callable, Callable]:
    """The family launchers of a compiled backend over its ``stages``: ``group_advantages_fwd``
    (:func:`group_advantages`) and ``group_stats_fwd`` (:func:`group_stats`), same signatures as
    ``lenkernels/reference/advantages.py``'s."""

    def group_advantages_fwd(rewards, groups, group_size, mask, lengths, task_ids, cfg, out) -> None:
        """Writes ``out`` (fp32, ``[B]`` or ``mask.shape``; B > 0): segmentation (on the tensors'
        device), then the backend's stages (no host sync but the CPU backend's)."""
        group_advantages(stages, rewards, groups, group_size, mask, lengths, task_ids, cfg, out)

    def group_stats_fwd(values, where, groups, group_size, mask, stats, lengths) -> None:
        """Writes stats ``[B, C', 6]`` and, with a mask, lengths ``[B]`` (B > 0)."""
        group_stats(stages, values, where, groups, group_size, mask, stats, lengths)

    return group_advantages_fwd, group_stats_fwd
