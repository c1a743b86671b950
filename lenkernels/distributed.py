"""torch.distributed support: vocabulary-parallel (tensor-parallel) statistics and data-parallel
reductions.

Vocabulary parallelism. Each rank of a process group holds one shard of the vocabulary (the last
dimension of the logits, or the rows of the LM head), shards in rank order, sizes free. Every rank
reduces its shard to its per-row online-softmax state (DESIGN.md "Kernel design notes") in the form
``(m_r, log S_r, H_r)`` (max of the shard's z, log of its sum of exp(z - m_r), entropy) and, on the
rank whose shard holds the target id, ``logprob_r = (z_y - m_r) - log S_r``. Two all-reduces merge
them::

    M = max_r m_r                                                    (all-reduce MAX)
    c_r = (m_r - M) + log S_r,  w_r = exp(c_r)
    S = sum_r w_r,  U = sum_r w_r (c_r - H_r),  a = (logprob_y + log S_y) + (m_y - M)   (all-reduce SUM)
    lse = M + log S,  H = log S - U / S,  mean_z = M + U / S,  logprob = a - log S

Every term is small: ``a = z_y - M`` and ``c_r`` are differences formed before anything of the
size of the logits is added, so the logprob keeps fp32's relative precision at any |z| (summaries
by ``lse_r`` would not: fp32 rounds ``lse_r = m_r + log S_r`` by half an ulp of |z|, ~4e-4 at
|z| = 1e4, and every ``lse_r - M`` and the logprob inherit it). ``H`` stays a sum of two
non-negative terms (no cancellation). The same merge combines vocabulary chunks inside one process
(``merge_stats`` with ``dim=0``). Backward needs nothing beyond the merged ``lse`` and ``mean_z``:
SPEC 1's gradient of a shard's logits only reads them.

Data parallelism. ``global_token_count`` (loss normalisation over every rank's tokens),
``all_gather_variable`` (rows of unequal count per rank, e.g. for global entropy quantiles) and
``group_advantages_across_ranks`` (any single-process advantage function applied to groups whose
members sit on different ranks).

Shard-local ids. The kernels see ids relative to their shard or chunk: ``-1`` for an ignored row
(no logprob, no logprob gradient), ``-2`` for a row whose target lies in another shard (it still
receives the ``-p_j`` part of the logprob gradient), ``[0, V_local)`` for a target held here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

IGNORED = -1  # shard-local id of an ignored row
ELSEWHERE = -2  # shard-local id of a row whose target is in another shard or chunk


# --- process groups ------------------------------------------------------------------------------


def group_name(process_group) -> str:
    """The registered name of a process group (what the custom ops carry); ``""`` for None."""
    if process_group is None:
        return ""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
        )
    return process_group.group_name


def resolve_group(name: str):
    """The process group registered under ``name`` (inverse of ``group_name``)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def shard_sizes(vocab_local: int, group, device: torch.device) -> torch.Tensor:
    """``[world]`` int64: every rank's vocabulary shard size, in rank order (one all-gather)."""
    world = dist.get_world_size(group)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_flat(sizes, torch.full((1,), vocab_local, dtype=torch.int64, device=device), group)
    return sizes


def vocab_offset(sizes: torch.Tensor, group) -> torch.Tensor:
    """``[1]`` int64 tensor: the global id of this rank's first vocabulary entry (no host sync)."""
    rank = dist.get_rank(group)
    return sizes[:rank].sum().reshape(1)


def shard_local_ids(ids: torch.Tensor, offset: torch.Tensor, vocab_local: int, ignore_index: int) -> torch.Tensor:
    """Global ids -> int64 shard-local ids (``IGNORED``, ``ELSEWHERE`` or ``[0, vocab_local)``).

    Out-of-range global ids (not ignore_index) are ``ELSEWHERE`` on every rank, so no rank claims
    them and the merged logprob is NaN (SPEC 1: reported, never a plausible number).
    """
    ids = ids.to(torch.int64)
    local = ids - offset
    held = (local >= 0) & (local < vocab_local)
    out = torch.where(held, local, torch.full_like(local, ELSEWHERE))
    return torch.where(ids == ignore_index, torch.full_like(local, IGNORED), out)


def chunk_ids(local_ids: torch.Tensor, start: int, stop: int, *, for_backward: bool) -> torch.Tensor:
    """Shard-local ids -> ids relative to vocabulary columns ``[start, stop)`` of the shard.

    Forward (``for_backward=False``): rows without a target in the chunk become ``IGNORED`` (the
    chunk contributes only its softmax state). Backward: they stay ``ELSEWHERE`` unless ignored,
    so they keep the ``-p_j`` term of the logprob gradient.
    """
    inside = (local_ids >= start) & (local_ids < stop)
    ignored = torch.full_like(local_ids, IGNORED)
    other = torch.where(local_ids == IGNORED, ignored, torch.full_like(local_ids, ELSEWHERE)) if for_backward else ignored
    return torch.where(inside, local_ids - start, other)


# --- merging per-shard statistics ----------------------------------------------------------------


def _weighted_terms(max_z, log_s, entropy, logprob, held, m):
    """Per-part summands (w, w * (c - H), a, hits) against the merged max ``m``, where
    ``c = (max_z - m) + log_s`` is the log of the part's mass relative to ``exp(m)``."""
    rel = max_z - m
    c = rel + log_s
    # a fully masked part (max_z = -inf) weighs 0 even when every part is masked (rel NaN)
    w = torch.where(torch.isneginf(max_z), torch.zeros_like(c), torch.exp(c))
    u = torch.where(w > 0, w * (c - entropy), torch.zeros_like(w))
    # z_y - m, from two small terms: (logprob + log_s) = z_y - max_z of the part
    a = torch.where(held, (logprob + log_s) + rel, torch.zeros_like(logprob))
    return torch.stack([w, u, a, held.to(w.dtype)])


def _finish(m, sums, state: bool):
    s, u, a, hits = sums.unbind(0)
    log_s = torch.log(s)
    ratio = u / s
    lse = m + log_s
    logprob = torch.where(hits > 0, a - log_s, torch.full_like(a, float("nan")))
    out = (logprob, log_s - ratio, lse, m + ratio)
    return (*out, m, log_s) if state else out


def merge_stats(max_z, log_s, entropy, logprob, held, *, dim: int | None = None, group=None, state: bool = False):
    """Merges per-part row statistics into those of the union of the parts.

    Args:
        max_z, log_s: fp32 online-softmax state of each part: the max of its z and
            ``log sum exp(z - max_z)`` (``lse = max_z + log_s``, kept apart: fp32 cannot hold their
            sum exactly at |z| = 1e4). ``token_stats_fwd(..., state=True)`` returns them. A fully
            masked part has ``max_z = -inf``.
        entropy, logprob: fp32 statistics of each part (``logprob = (z_y - max_z) - log_s`` of the
            part; read only where ``held``).
        held: bool, whether the part holds the row's target id.
        dim: merge the parts stacked along this dimension (vocabulary chunks in one process), or
        group: ``None`` with ``dim`` given, else the process group whose ranks hold one part each
            (two all-reduces on ``max_z.device``; no host sync).
        state: also return the merged ``(max_z, log_s)`` (to merge the result again).

    Returns:
        ``(logprob, entropy, lse, mean_z)`` of the merged vocabulary, then ``(max_z, log_s)`` with
        ``state``. ``logprob`` is NaN where no part held the target: the caller zeroes the ignored
        rows.
    """
    if group is None:
        if dim is None:
            raise ValueError("merge_stats needs dim (local parts) or group (one part per rank)")
        m = max_z.amax(dim)
        # NaN never vanishes: a NaN part makes its weight and so S NaN below
        terms = _weighted_terms(max_z, log_s, entropy, logprob, held, m.unsqueeze(dim))
        return _finish(m, terms.sum(dim + 1 if dim >= 0 else dim), state)
    m = max_z.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sums = _weighted_terms(max_z, log_s, entropy, logprob, held, m)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return _finish(m, sums, state)


def all_gather_stack(x: torch.Tensor, group) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x`` (same shape and dtype on every rank), in rank order."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.numel(),))
    _all_gather_flat(out, x.contiguous().reshape(-1), group)
    return out.reshape(world, *x.shape)


def merge_argmax(max_z, m, local_argmax, offset, vocab: int, group) -> torch.Tensor:
    """Global argmax (int64): the lowest global id among the maxima of the full row. ``max_z`` is
    this rank's row max, ``m`` the merged one (``max_z`` all-reduced with MAX, so the comparison is
    exact), ``local_argmax`` the lowest shard-local id at ``max_z``; one all-reduce (MIN). A row of
    all ``-inf`` gives 0 (as one process does); a row of NaN, 0."""
    none = torch.full_like(local_argmax, vocab, dtype=torch.int64)  # past every id: loses the MIN
    ids = torch.where(max_z == m, local_argmax.to(torch.int64) + offset, none)
    dist.all_reduce(ids, op=dist.ReduceOp.MIN, group=group)
    return torch.where(ids >= vocab, torch.zeros_like(ids), ids)


def owned_values(values: torch.Tensor, owned: torch.Tensor, group) -> torch.Tensor:
    """Each entry from the one rank that owns it (``owned``), 0 where no rank does: one all-reduce
    (SUM) of the values masked to the owner (exact: one term is non-zero)."""
    out = torch.where(owned, values, torch.zeros_like(values))
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def global_vocab_check(ids: torch.Tensor, sizes: torch.Tensor, ignore_index: int, name: str = "ids") -> None:
    """Raises ValueError on ids outside the global vocabulary (data-dependent: call only where
    ``_checks.value_checks`` allows)."""
    from lenkernels import _checks

    _checks.ids_in_range(ids, int(sizes.sum()), ignore_index, name)


# --- data parallelism ----------------------------------------------------------------------------

_DTYPE_CODES = {
    dt: i
    for i, dt in enumerate(
        (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
         torch.int16, torch.int8, torch.uint8, torch.bool)
    )
}  # fmt: skip
_CODE_DTYPES = {i: dt for dt, i in _DTYPE_CODES.items()}


def _world(process_group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised (call init_process_group first)")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def global_token_count(mask: torch.Tensor, *, process_group=None) -> torch.Tensor:
    """Total count of valid tokens over every rank of ``process_group``: the denominator of a
    token-mean loss under data parallelism (SPEC 3 "global normalisers").

    Args:
        mask: ``[...]`` bool/integer (counted) or floating (summed as weights) on any device.
        process_group: the data-parallel group (default: the world).

    Returns:
        A 0-dim tensor on ``mask.device``, identical on every rank: int64 for bool/integer masks,
        float64 for floating ones. One all-reduce, no host sync.

    Example (packed layout, each rank holds its own micro-batch)::

        n = global_token_count(mask)                     # all ranks' tokens
        loss = (per_token_loss * mask).sum() / n * world  # DDP averages gradients over ranks
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    _world(process_group)
    dtype = torch.float64 if mask.is_floating_point() else torch.int64
    total = mask.sum(dtype=dtype).reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    return total.reshape(())


def all_gather_variable(
    x: torch.Tensor, *, sizes: Sequence[int] | None = None, process_group=None
) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order; ranks may hold different counts.

    Args:
        x: ``[n_r, ...]`` on this rank; trailing dimensions and dtype equal on every rank.
        sizes: every rank's ``n_r`` when the caller knows them (e.g. equal micro-batches): skips
            the size exchange and its host synchronisation. Without it the sizes are all-gathered
            and read on the host (one sync).
        process_group: default the world.

    Returns:
        ``[sum_r n_r, ...]`` with ``x``'s dtype and device, identical on every rank. Not
        differentiable (the result is detached): use it for statistics such as global quantiles.

    Example (global 0.8-quantile of the entropy of valid tokens, packed layout)::

        h = all_gather_variable(entropy[mask.bool()])
        threshold = torch.quantile(h, 0.8)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (rows are gathered along dim 0)")
    rank, world = _world(process_group)
    x = x.detach()
    trailing = tuple(x.shape[1:])
    if sizes is None:
        # (rows, dtype, ndim, *trailing), padded to the widest rank: checks the layouts agree
        meta = torch.tensor([x.shape[0], _DTYPE_CODES.get(x.dtype, -1), x.dim(), *trailing], dtype=torch.int64)
        widths = torch.empty(world, dtype=torch.int64, device=x.device)
        _all_gather_flat(widths, torch.full((1,), meta.numel(), dtype=torch.int64, device=x.device), process_group)
        widest = int(widths.max())
        padded = torch.full((widest,), -1, dtype=torch.int64)
        padded[: meta.numel()] = meta
        metas = torch.empty(world * widest, dtype=torch.int64, device=x.device)
        _all_gather_flat(metas, padded.to(x.device), process_group)
        metas = metas.reshape(world, widest).cpu()
        if not bool((metas[:, 1:] == metas[0, 1:]).all()):
            layouts = [(str(_CODE_DTYPES.get(int(r[1]), "?")), [int(r[0]), *r[3 : 2 + int(r[2])].tolist()]) for r in metas]
            raise ValueError(f"x must have the same dtype and trailing shape on every rank; got (dtype, shape) {layouts}")
        sizes = metas[:, 0].tolist()
    else:
        sizes = [int(s) for s in sizes]
        if len(sizes) != world or sizes[rank] != x.shape[0]:
            raise ValueError(
                f"sizes must list every rank's row count ({world} entries, this rank's = {x.shape[0]}), got {sizes}"
            )
    widest = max(sizes)
    is_bool = x.dtype == torch.bool
    payload = x.to(torch.uint8) if is_bool else x
    buf = payload.new_zeros((widest, *trailing))
    buf[: x.shape[0]] = payload
    out = payload.new_empty((world * widest, *trailing))
    _all_gather_flat(out, buf.contiguous(), process_group)
    out = out.reshape(world, widest, *trailing)
    result = torch.cat([out[r, : sizes[r]] for r in range(world)]) if widest else out.reshape(0, *trailing)
    return result.bool() if is_bool else result


@dataclass
class GatheredRows:
    """Rows of every rank in rank order, and where this rank's rows sit in them."""

    values: dict[str, torch.Tensor]
    start: int
    stop: int


def gather_rows(tensors: dict[str, torch.Tensor], *, sizes: Sequence[int] | None = None, process_group=None):
    """``all_gather_variable`` of several per-sample tensors with the same row count, plus the
    slice of this rank's rows in the gathered order."""
    rank, world = _world(process_group)
    counts = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"per-sample tensors must share their row count on a rank, got {counts}")
    n = next(iter(counts.values()))
    if sizes is None:
        all_n = torch.empty(world, dtype=torch.int64, device=next(iter(tensors.values())).device)
        _all_gather_flat(all_n, torch.full((1,), n, dtype=torch.int64, device=all_n.device), process_group)
        sizes = all_n.tolist()
    values = {name: all_gather_variable(t, sizes=sizes, process_group=process_group) for name, t in tensors.items()}
    start = int(sum(sizes[:rank]))
    return GatheredRows(values, start, start + n)


def group_advantages_across_ranks(
    scores: torch.Tensor,
    groups: torch.Tensor | int,
    advantage_fn: Callable[..., torch.Tensor],
    *,
    per_sample: dict[str, torch.Tensor] | None = None,
    sizes: Sequence[int] | None = None,
    process_group=None,
    **kwargs,
) -> torch.Tensor:
    """Applies a single-process group-advantage function to groups whose members sit on several
    ranks, and returns this rank's rows of the result.

    Every rank's scores, group ids and ``per_sample`` tensors are all-gathered in rank order (a few
    bytes per sample), ``advantage_fn(all_scores, all_groups, **all_per_sample, **kwargs)`` runs on
    the whole batch, identically on every rank, and this rank's rows are returned. So any method
    (grpo, rloo, gaussian ranks, batch whitening over all tokens, ...) gives exactly the result of
    one process holding the whole batch.

    Args:
        scores: ``[B_r]`` or ``[B_r, T]`` rewards of this rank's samples.
        groups: ``[B_r]`` int group ids (global ids: the same prompt has the same id on every rank),
            or an int group size when groups are contiguous in the rank-ordered global batch.
        advantage_fn: e.g. ``lenkernels.group_advantages`` or any ``fn(scores, groups, ...)``.
        per_sample: more per-sample tensors the function needs (``mask``, lengths), gathered too.
        sizes: every rank's ``B_r`` if known (skips one size exchange and its host sync).
        process_group: the data-parallel group (default: the world).
        **kwargs: passed to ``advantage_fn`` unchanged.

    Returns:
        ``advantage_fn``'s output rows for this rank's samples (``[B_r]`` or ``[B_r, T]``).

    Example (GRPO with 8 responses per prompt spread over the data-parallel ranks)::

        adv = group_advantages_across_ranks(rewards, prompt_ids, lk.group_advantages, method="grpo")
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    tensors = {"scores": scores}
    if isinstance(groups, torch.Tensor):
        if groups.shape[:1] != scores.shape[:1]:
            raise ValueError(f"groups must have one id per row of scores ({scores.shape[0]}), got {tuple(groups.shape)}")
        tensors["groups"] = groups
    elif isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise TypeError(f"groups must be an int tensor of group ids or a positive int group size, got {groups!r}")
    for name, t in (per_sample or {}).items():
        if not isinstance(t, torch.Tensor) or t.shape[:1] != scores.shape[:1]:
            raise ValueError(f"per_sample[{name!r}] must be a tensor with one row per score ({scores.shape[0]})")
        tensors[name] = t
    gathered = gather_rows(tensors, sizes=sizes, process_group=process_group)
    values = dict(gathered.values)
    all_scores = values.pop("scores")
    all_groups = values.pop("groups") if isinstance(groups, torch.Tensor) else groups
    out = advantage_fn(all_scores, all_groups, **values, **kwargs)
    return out[gathered.start : gathered.stop]
