"""Vocabulary parallelism of ``lenkernels.token_stats`` (``process_group=...``) for the outputs beyond
log-probability and entropy: the dense statistics, the top-k, the gathered and kept values and the
sampler replay of a vocabulary split across ranks, from each rank's shard through the same kernels
(``ops/token_stats_sparse.py``), merged across the group. (Log-probability and entropy alone run
``token_logprobs_entropy``'s vocabulary-parallel op.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from lenkernels.ops import token_stats as ts
from lenkernels.ops import token_stats_extra as tse
from lenkernels.ops import token_stats_select as sel
from lenkernels.ops import token_stats_sparse as sp

# --- vocabulary parallelism: token_stats(process_group=...) ---------------------------------------
# Each rank holds a shard of the vocabulary (rank order, sizes free). Dense statistics: each rank's
# online-softmax state (max_r, log S_r) and its lse2 = logsumexp(2z) and sum of finite z against its
# own max, merged like the lse (lenkernels.distributed.merge_stats); argmax by an all-reduce MIN of
# the global ids of the ranks holding the merged max. Sparse ids: each rank's z at the ids it owns,
# an all-reduce SUM (one non-zero term). Selection: each rank's top-k (or sampler candidates) with
# global ids, all-gathered and merged by (value desc, id asc). Backward: no communication, one
# gradient tensor per shard written from the merged row scalars.


class VocabShard(NamedTuple):
    """This rank's place in the vocabulary: the group, ``[world]`` shard sizes, ``[1]`` int64
    offset of its first id, and the global vocabulary size."""

    group: object
    sizes: torch.Tensor
    offset: torch.Tensor
    vocab: int


def vocab_shard(logits: torch.Tensor, group) -> VocabShard:
    """The shard sizes (one all-gather of one int per rank; one host sync for the global size)."""
    from lenkernels import distributed as lkdist

    sizes = lkdist.shard_sizes(logits.shape[-1], group, logits.device)
    return VocabShard(group, sizes, lkdist.vocab_offset(sizes, group), int(sizes.sum()))


def _merge_sorted(vals: torch.Tensor, gids: torch.Tensor, shard: VocabShard):
    """All-gathers ``[n, W]`` candidates (float64 logits, global ids; padding -inf with ids >= V)
    from every rank: ``(vals, ids)`` ``[n, world * W]`` sorted by (value desc, id asc)."""
    from lenkernels import distributed as lkdist

    n = vals.shape[0]
    width = vals.shape[1] * dist.get_world_size(shard.group)
    all_vals = lkdist.all_gather_stack(vals, shard.group).permute(1, 0, 2).reshape(n, width)
    all_ids = lkdist.all_gather_stack(gids, shard.group).permute(1, 0, 2).reshape(n, width)
    order = all_ids.argsort(dim=1)
    all_ids, all_vals = all_ids.gather(1, order), all_vals.gather(1, order)
    order = torch.sort(all_vals, dim=1, descending=True, stable=True).indices
    return all_vals.gather(1, order), all_ids.gather(1, order)


def _padded_candidates(x: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, width: int, shard: VocabShard):
    """Candidates ``ids`` ``[n, w]`` (shard-local, ``real`` marks the valid ones) as float64 values
    and global ids, padded to ``width`` with ``(-inf, V + column)``."""
    n, w = ids.shape
    pad_ids = shard.vocab + torch.arange(width, device=x.device).expand(n, width)
    vals = torch.full((n, width), float("-inf"), dtype=torch.float64, device=x.device)
    gids = pad_ids.clone()
    if w:
        vals[:, :w] = torch.where(real, x.gather(1, ids).double(), float("-inf"))
        gids[:, :w] = torch.where(real, ids + shard.offset, pad_ids[:, :w])
    return vals, gids


def vp_topk_rows(x: torch.Tensor, k: int, shard: VocabShard) -> torch.Tensor:
    """:func:`sel.topk_rows` of the full vocabulary (global ids ``[n, k]``) from this rank's shard
    ``x`` ``[n, V_r]``: each rank's local top-min(k, V_r), all-gathered and merged (ties to the lower
    global id, also across shard boundaries)."""
    n, vocab_local = x.shape
    k_local = min(k, vocab_local)
    ids = sel.topk_rows(x, k_local) if n else torch.zeros(0, k_local, dtype=torch.int64, device=x.device)
    real = torch.ones_like(ids, dtype=torch.bool)
    vals, gids = _padded_candidates(x, ids, real, k, shard)
    return _merge_sorted(vals, gids, shard)[1][:, :k].contiguous()


def vp_sampler_kept_rows(x, temperature, top_k: int, top_p: float, min_p: float, shard: VocabShard):
    """:func:`sel.sampler_kept_rows` of the full vocabulary (global ids) from this rank's shard, for a
    sampler with top-k: every id with z >= the global k-th largest is among some rank's local
    candidates (z >= that rank's k-th largest, which is at most the global one), so the merged
    candidates hold the whole top-k set, ties included; top-p / min-p then run on them. The
    candidate width is all-reduced (a host sync)."""
    n, vocab_local = x.shape
    if not 0 < top_k < shard.vocab:
        raise NotImplementedError(
            "token_stats(process_group=...) replays a sampler only with 0 < top_k < V (top_p and min_p then "
            "apply to the merged top-k survivors); top_p or min_p without top_k over a vocabulary split "
            "across process_group is not implemented: pass kept_ids, or gather the logits"
        )
    cand, count = sel.top_candidates(x, min(top_k, vocab_local))
    width = torch.tensor([cand.shape[1]], dtype=torch.int64, device=x.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=shard.group)
    real = torch.arange(cand.shape[1], device=x.device) < count.unsqueeze(1)
    vals, gids = _padded_candidates(x, cand, real, int(width), shard)
    vals, gids = _merge_sorted(vals, gids, shard)
    if n == 0:
        return torch.full((0, 1), -1, dtype=torch.int64, device=x.device)
    theta = vals[:, top_k - 1 : top_k]
    count = ((vals >= theta) & (gids < shard.vocab)).sum(1)
    temp64 = temperature.double().reshape(-1, 1).expand(n, 1)
    kept, size = sel._truncate_z(vals / temp64, gids, count, top_p, min_p)
    return kept[:, : max(1, int(size.max()))].contiguous()


def _vp_forward(x, ids, temp, sparse_ids, extra: bool, backend: str, shard: VocabShard):
    """The outputs of ``lenkernels::token_stats_sparse`` over the full vocabulary, from rows ``x``
    ``[n, V_r]`` of this rank's shard (``ids`` ``[n]`` and ``sparse_ids`` ``[n, M]`` global, ids in
    ``[0, V)``), and what the backward needs."""
    from lenkernels import distributed as lkdist

    vocab_local = x.shape[1]
    group, offset = shard.group, shard.offset
    local = lkdist.shard_local_ids(ids, offset, vocab_local, sp.NO_IGNORE)
    fwd_ids = lkdist.chunk_ids(local, 0, vocab_local, for_backward=False)
    lp, ent, _, _, max_z, log_s = ts.token_stats_fwd(x, fwd_ids, temp, lkdist.IGNORED, backend, state=True)
    lp, ent, lse, mean_z, m, log_s_all = lkdist.merge_stats(max_z, log_s, ent, lp, local >= 0, group=group, state=True)
    empty = [torch.empty(0, dtype=torch.int64 if i == 2 else torch.float32, device=x.device) for i in range(sp._N_EXTRA)]
    sp2, lsp2, amax, mlp, mean = empty
    log_w2, amax_local = empty[0], empty[2]
    if extra:
        dense = tse.token_stats_extra_fwd(x, fwd_ids, temp, lkdist.IGNORED, backend)
        masked = torch.isneginf(max_z)  # a fully masked shard adds nothing (its own stats are NaN)
        zero = torch.zeros_like(max_z)
        # log sum exp(2 (z - max_r)) of the shard, then against the merged max: small terms only
        w2 = torch.where(masked, zero, torch.exp(2 * (max_z - m) + (dense[5] + 2 * log_s)))
        sums = torch.stack([w2, torch.where(masked, zero, dense[8] * vocab_local)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        nan = torch.full_like(lse, float("nan"))
        finite = torch.isfinite(lse)
        log_w2 = torch.log(sums[0])
        lsp2 = torch.where(finite, log_w2 - 2 * log_s_all, nan)
        sp2 = torch.exp(lsp2)
        amax = lkdist.merge_argmax(max_z, m, dense[6], offset, shard.vocab, group)
        mlp = torch.where(finite, -log_s_all, nan)
        mean = torch.where(finite, sums[1] / shard.vocab, nan)
        amax_local = amax - offset
    s_local = sparse_ids - offset
    owned = (s_local >= 0) & (s_local < vocab_local)
    z_local = x.gather(1, s_local.clamp(0, vocab_local - 1)).float() / temp.reshape(-1, 1)
    z = lkdist.owned_values(z_local, owned, group)
    saved = (local, lse, mean_z, m, log_w2, lsp2, amax_local, torch.where(owned, s_local, -1))
    return (lp, ent, lse, mean_z, sp2, lsp2, amax, mlp, mean, z), saved


def _vp_dlogits(x, temp, saved, grads, extra: bool, vocab: int, float64: bool) -> torch.Tensor:
    """SPEC 1 and 7's gradient of this rank's shard ``x`` ``[n, V_r]`` from the merged row scalars
    and the cotangents ``(g_lp, g_h, g_lse, g_mean_z, g_sp2, g_lsp2, g_mlp, g_mean, g_z)`` (None
    for none): one gradient tensor, no communication."""
    local, lse, mean_z, m, log_w2, lsp2, amax_local, s_local = saved
    n, vocab_local = x.shape
    g_lp, g_h, g_lse, g_mz, g_sp2, g_lsp2, g_mlp, g_mean, g_z = grads
    dt = torch.float64 if float64 else torch.float32
    zero = torch.zeros(n, dtype=dt, device=x.device)

    def col(g):
        return zero if g is None or g.numel() == 0 else g.reshape(-1).to(dt)

    g_lp, g_h, g_lse, g_mz = col(g_lp), col(g_h), col(g_lse), col(g_mz)
    g_lse, g_h = g_lse + g_mz, g_h - g_mz  # mean_z = lse - H
    t = temp.to(dt).reshape(-1, 1)
    z = x.to(dt) / t
    p = torch.exp(z - lse.to(dt).unsqueeze(1))
    z_fin = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    coef = g_lse - g_lp
    g_mlp = col(g_mlp) if extra else zero
    if extra:  # sum_p2 = exp(log_sum_p2): its cotangent joins log_sum_p2's, times sum_p2
        g_l2 = col(g_lsp2) + col(g_sp2) * torch.exp(lsp2.to(dt))
        coef = coef - g_mlp - 2 * g_l2
    d = p * (coef.unsqueeze(1) - g_h.unsqueeze(1) * (z_fin - mean_z.to(dt).unsqueeze(1)))
    if extra:
        q = torch.exp(2 * (z - m.to(dt).unsqueeze(1)) - log_w2.to(dt).unsqueeze(1))  # softmax(2z)
        d += 2 * g_l2.unsqueeze(1) * q + (col(g_mean) / vocab).unsqueeze(1) * torch.isfinite(z)
    # one-hot terms at the ids this shard owns: target, argmax, sparse ids
    cols = [local.reshape(n, 1)]
    vals = [g_lp.reshape(n, 1)]
    if extra:
        cols.append(amax_local.reshape(n, 1))
        vals.append(g_mlp.reshape(n, 1))
    if s_local.shape[-1]:
        cols.append(s_local)
        vals.append(torch.zeros(n, s_local.shape[-1], dtype=dt, device=x.device) if g_z is None else g_z.to(dt))
    idx, val = torch.cat(cols, 1), torch.cat(vals, 1)
    held = (idx >= 0) & (idx < vocab_local)
    rows = torch.arange(n, device=x.device).unsqueeze(1)
    d.index_put_((rows.expand_as(idx)[held], idx[held]), val[held], accumulate=True)
    return (d / t).to(x.dtype)


class _VocabParallelStats(torch.autograd.Function):
    """``lenkernels::token_stats_sparse``'s outputs over a vocabulary split across ranks."""

    @staticmethod
    def forward(ctx, logits, ids, temp, sparse_ids, extra, backend, shard):
        x = ts._rows(logits)
        n = x.shape[0]
        outs, saved = _vp_forward(x, ids.reshape(n), temp, sparse_ids.reshape(n, sparse_ids.shape[-1]), extra, backend, shard)
        ctx.save_for_backward(logits, temp, *saved)
        ctx.extra, ctx.backend, ctx.vocab = extra, backend, shard.vocab
        ctx.mark_non_differentiable(outs[6])
        dense = [o.reshape(ids.shape) for o in outs[:4]]
        more = [o.reshape(ids.shape) for o in outs[4:9]] if extra else list(outs[4:9])
        return (*dense, *more, outs[9].reshape(sparse_ids.shape))

    @staticmethod
    def backward(ctx, g_lp, g_h, g_lse, g_mz, g_sp2, g_lsp2, g_amax, g_mlp, g_mean, g_z):
        logits, temp, *saved = ctx.saved_tensors
        x = ts._rows(logits)
        n = x.shape[0]
        g_z = None if g_z is None else g_z.reshape(n, g_z.shape[-1])
        grads = (g_lp, g_h, g_lse, g_mz, g_sp2, g_lsp2, g_mlp, g_mean, g_z)
        float64 = ctx.backend == "reference" or x.dtype == torch.float64
        d = _vp_dlogits(x, temp, saved, grads, ctx.extra, ctx.vocab, float64)
        return d.reshape(logits.shape), None, None, None, None, None, None
