"""Sparse vocabulary statistics of ``lenkernels.token_stats`` (SPEC 7): the top-k, log-probabilities at
given ids ("gathered") and the statistics of a kept set (given ids, or a vLLM sampler's truncation
replayed).

Design: no new kernels, every backend. Every float statistic here is a function of a few logits
gathered per row, ``z_S = logits[S] / T`` for a set S of at most a few hundred ids, and of the row's
``lse``. One custom op, ``lenkernels::token_stats_sparse``, runs the backend's dense kernel (the
``token_stats`` one, or the extended one when ``sum_p2``/``argmax``/``mean_logit`` are asked for too:
one read of the logits either way) and gathers ``z_S`` (``|S|`` reads per row; the CPU ``token_stats``
kernel picks them while each row is still in cache). Its backward runs the dense backward kernel once
(one read of the logits, one write of the gradient) and adds the sparse terms into that gradient in
place (``|S|`` read-modify-writes per row, summed in float64 so repeated ids round once).

The row's ``lse`` is differentiable through the kernels' logprob gradient: the kernel runs on an
anchor id ``a`` per row (the target, or a selected id on ignored rows); a cotangent ``g`` of ``lse``
enters the kernel's backward as ``-g`` on the logprob, which writes ``-g (1[j=a] - p_j) / T``, and the
sparse add writes ``+g / T`` at ``a``: together ``g p_j / T``, exactly d lse/d logits. (With 16-bit
logits the gradient at ``a`` is then rounded twice: half an ulp of ``|g| / T`` more there.)

Selection (no gradient: the top-k ids, a sampler's kept set): ``ops/token_stats_select.py``, one
more read of the logits with top-k, at most three on CPU rows without it.

Vocabulary parallelism (``token_stats(process_group=...)``): ``ops/token_stats_vocab_parallel.py``, the
same statistics from every rank's shard, merged across the group.
"""

from __future__ import annotations

import torch

from lenkernels import _backend, _checks
from lenkernels.ops import token_stats as ts
from lenkernels.ops import token_stats_extra as tse
from lenkernels.ops import token_stats_select as _select  # noqa: F401 (registers the selection ops)
from lenkernels.ops import token_stats_vocab_parallel as vp

SPARSE_OUTPUTS = ("topk", "gathered", "kept")
SAMPLING_KEYS = ("top_k", "top_p", "min_p")
NO_IGNORE = -1  # the kernels' ignore_index under this op: anchors are always in [0, V)


# --- argument checks ------------------------------------------------------------------------------


def _ids_arg(x, name: str, ids: torch.Tensor, vocab: int, *, min_width: int) -> torch.Tensor:
    """``[..., K]`` int ids of ``ids``'s leading shape, -1 padding; in ``[-1, vocab)`` where value
    checks run. Returned as int64."""
    _checks.tensor(x, name, dtypes=_checks.INT_DTYPES)
    _checks.same_device(ids, "ids", x, name)
    if x.dim() != ids.dim() + 1 or tuple(x.shape[:-1]) != tuple(ids.shape) or x.shape[-1] < min_width:
        raise ValueError(
            f"{name} must have shape [*ids.shape, K] = [{', '.join(map(str, ids.shape))}, K] with K >= {min_width}, "
            f"got {tuple(x.shape)}"
        )
    if _checks.value_checks(x.device) and x.numel():
        lo, hi = torch.aminmax(x)  # one reduction; the index of the first bad id only on the error path
        if int(lo) < -1 or int(hi) >= vocab:
            first = int(((x < -1) | (x >= vocab)).reshape(-1).nonzero()[0])
            raise ValueError(
                f"{name} holds {int(x.reshape(-1)[first])} at flat index {first}, outside the vocabulary "
                f"[0, {vocab}) and not the padding -1"
            )
    return x.long()


def sampling_args(sampling) -> tuple[int, float, float]:
    """``(top_k, top_p, min_p)`` of a ``sampling`` dict (vLLM's meanings; missing keys disabled)."""
    if not isinstance(sampling, dict):
        raise TypeError(f"sampling must be a dict with keys among {SAMPLING_KEYS}, got {type(sampling).__name__}")
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(
            f"sampling has unknown key(s) {sorted(map(str, unknown))}: expected keys among {SAMPLING_KEYS}"
        )
    top_k = sampling.get("top_k", 0)
    if top_k is None:
        top_k = 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise ValueError(f"sampling['top_k'] must be an int >= 1, or 0 / -1 (disabled), got {top_k!r}")
    top_p = sampling.get("top_p", 1.0)
    top_p = (
        1.0 if top_p is None else _checks.number(top_p, "sampling['top_p']", minimum=0.0, maximum=1.0, exclusive=True)
    )
    min_p = sampling.get("min_p", 0.0)
    min_p = 0.0 if min_p is None else _checks.number(min_p, "sampling['min_p']", minimum=0.0, maximum=1.0)
    return max(int(top_k), 0), top_p, min_p


def check_args(wanted, ids: torch.Tensor, vocab: int, top_k, gather_ids, kept_ids, sampling):
    """The checks of the sparse parameters against the outputs asked for; ``(top_k, gather_ids,
    kept_ids, sampling)`` normalised (ids int64, sampling a ``(top_k, top_p, min_p)`` tuple or None)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 0 or top_k > vocab:
        raise ValueError(f"top_k must be in [0, V={vocab}], got {top_k}")
    if ("topk" in wanted) != (top_k > 0):
        raise ValueError(
            "outputs names 'topk' but top_k is 0: pass top_k >= 1" if top_k == 0 else
            f"top_k={top_k} is given but outputs does not name 'topk'"
        )  # fmt: skip
    if ("gathered" in wanted) != (gather_ids is not None):
        raise ValueError(
            "outputs names 'gathered' but gather_ids is None" if gather_ids is None else
            "gather_ids is given but outputs does not name 'gathered'"
        )  # fmt: skip
    if gather_ids is not None:
        gather_ids = _ids_arg(gather_ids, "gather_ids", ids, vocab, min_width=0)
    if kept_ids is not None and sampling is not None:
        raise ValueError("pass kept_ids or sampling, not both: each defines the kept set")
    if ("kept" in wanted) != (kept_ids is not None or sampling is not None):
        raise ValueError(
            "outputs names 'kept' but neither kept_ids nor sampling is given" if "kept" in wanted else
            f"{'kept_ids' if kept_ids is not None else 'sampling'} is given but outputs does not name 'kept'"
        )  # fmt: skip
    if kept_ids is not None:
        kept_ids = _ids_arg(kept_ids, "kept_ids", ids, vocab, min_width=1)
    if sampling is not None:
        sampling = sampling_args(sampling)
    return top_k, gather_ids, kept_ids, sampling


# --- the differentiable op: dense statistics + gathered logits ------------------------------------

_N_EXTRA = 5  # sum_p2, log_sum_p2, argmax, max_logprob, mean_logit


def _gather_z(logits: torch.Tensor, sparse_ids: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """fp32 ``z = logits[id] / T`` at ``sparse_ids`` ``[..., M]`` (ids clamped into the vocabulary)."""
    x = ts._rows(logits)
    s = sparse_ids.reshape(x.shape[0], sparse_ids.shape[-1]).clamp(0, x.shape[1] - 1)
    z = torch.div(x.gather(1, s), temperature.reshape(-1, 1))  # fp32 temperature [n|1, 1]: fp32(x) / T
    return z.reshape(sparse_ids.shape)


def _token_stats_sparse(
    logits: torch.Tensor, ids: torch.Tensor, temperature: torch.Tensor, sparse_ids: torch.Tensor, extra: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(logprob, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit, z_S)``:
    the backend's dense statistics at ``ids`` (every id in ``[0, V)``; the five extended ones empty
    unless ``extra``) and fp32 ``z`` at ``sparse_ids`` ``[..., M]``. Differentiable in ``logits``
    through every float output, ``lse`` included."""
    if extra:
        dense = tse.token_stats_extra_fwd(logits, ids, temperature, NO_IGNORE, backend)
        return (*dense, _gather_z(logits, sparse_ids, temperature))
    empty = [torch.empty(0, dtype=torch.int64 if i == 2 else torch.float32, device=logits.device)
             for i in range(_N_EXTRA)]  # fmt: skip
    if not _sparse_in_kernel(backend):
        dense = ts.token_stats_fwd(logits, ids, temperature, NO_IGNORE, backend)
        return (*dense, *empty, _gather_z(logits, sparse_ids, temperature))
    # z at the sparse ids read by the kernel while each row is in cache (the bits of _gather_z)
    s = sparse_ids.reshape(-1, sparse_ids.shape[-1]).to(torch.int64).contiguous()
    z = torch.empty(s.shape, dtype=torch.float32, device=logits.device)
    dense = ts.token_stats_fwd(logits, ids, temperature, NO_IGNORE, backend, sparse={"sparse_ids": s, "z_sparse": z})
    return (*dense, *empty, z.reshape(sparse_ids.shape))


def _sparse_in_kernel(backend: str) -> bool:
    """Whether the backend's two-output kernels also gather ``z`` at the sparse ids (forward) and add
    their gradient terms (backward) while each row is in cache (``SPARSE_IN_KERNEL``)."""
    return getattr(_backend.kernels(backend, ts.FAMILY), "SPARSE_IN_KERNEL", False)


_token_stats_sparse = torch.library.custom_op("lenkernels::token_stats_sparse", _token_stats_sparse, mutates_args=())


@_token_stats_sparse.register_fake
def _(logits, ids, temperature, sparse_ids, extra, backend):
    dense = [torch.empty(ids.shape, dtype=torch.float32, device=logits.device) for _ in range(4)]
    shape = ids.shape if extra else (0,)
    more = [torch.empty(shape, dtype=torch.int64 if i == 2 else torch.float32, device=logits.device)
            for i in range(_N_EXTRA)]  # fmt: skip
    return (*dense, *more, torch.empty(sparse_ids.shape, dtype=torch.float32, device=logits.device))


def _add_sparse(dlogits: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> None:
    """``dlogits[r, idx[r, m]] += g[r, m]`` in place (``[n, V]``, ``[n, M]`` int64, ``[n, M]`` float64):
    repeated ids summed in float64 first, then one rounding to the gradient's dtype per element."""
    sidx, perm = idx.sort(dim=1, stable=True)  # the terms of a repeated id summed in their order
    gs = g.gather(1, perm)
    start = torch.ones_like(sidx, dtype=torch.bool)
    start[:, 1:] = sidx[:, 1:] != sidx[:, :-1]
    run = start.cumsum(1)  # int64, 1-based: column 0 of the sums stays unused
    total = gs.new_zeros(gs.shape[0], gs.shape[1] + 1).scatter_add_(1, run, gs).gather(1, run)
    new = torch.add(dlogits.gather(1, sidx), total).to(dlogits.dtype)  # float64 sum, one rounding
    rows = torch.arange(sidx.shape[0], device=sidx.device).unsqueeze(1)
    # index_put_, not scatter_ (which costs a pass over dlogits on CPU); repeated ids write the same value
    dlogits.index_put_((rows, sidx), new)


@torch.library.custom_op("lenkernels::token_stats_sparse_backward", mutates_args=())
def _token_stats_sparse_backward(
    logits: torch.Tensor, ids: torch.Tensor, temperature: torch.Tensor, sparse_ids: torch.Tensor,
    lse: torch.Tensor, mean_z: torch.Tensor, log_sum_p2: torch.Tensor, argmax: torch.Tensor,
    g_logprobs: torch.Tensor, g_entropy: torch.Tensor, g_sum_p2: torch.Tensor, g_log_sum_p2: torch.Tensor,
    g_max_logprob: torch.Tensor, g_mean_logit: torch.Tensor, g_lse: torch.Tensor, g_z: torch.Tensor,
    extra: bool, backend: str,
) -> torch.Tensor:  # fmt: skip
    """d(loss)/d(logits): the dense backward kernel (``g_logprobs`` already holds ``-g_lse``), then
    ``(g_lse at ids, g_z at sparse_ids) / T`` added in place (by the two-output kernel itself, chunk by
    chunk, where the backend has ``SPARSE_IN_KERNEL``; the same bits as :func:`_add_sparse`)."""
    if extra:
        dlogits = tse._token_stats_extra_backward(
            logits, ids, temperature, lse, mean_z, log_sum_p2, argmax, g_logprobs, g_entropy, g_sum_p2, g_log_sum_p2,
            g_max_logprob, g_mean_logit, NO_IGNORE, backend,
        )  # fmt: skip
    else:
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    n = ids.numel()
    if n == 0:
        return dlogits
    rows = dlogits.view(n, logits.shape[-1])
    idx = torch.cat([ids.reshape(n, 1).long(), sparse_ids.reshape(n, -1).clamp(0, logits.shape[-1] - 1)], 1)
    g = torch.div(torch.cat([g_lse.reshape(n, 1), g_z.reshape(n, -1)], 1), temperature.double().reshape(-1, 1))
    in_kernel = not extra and _sparse_in_kernel(backend)  # the sparse terms added while each chunk is in cache
    if not extra:
        ts.token_stats_bwd(logits, ids, temperature, lse, mean_z, g_logprobs, g_entropy, NO_IGNORE, backend, dlogits,
                           sparse={"sparse_ids": idx, "g_sparse": g} if in_kernel else None)  # fmt: skip
    if not in_kernel:
        _add_sparse(rows, idx, g)
    return dlogits


@_token_stats_sparse_backward.register_fake
def _(logits, *rest):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, ids, temperature, sparse_ids, extra, backend = inputs
    lse, mean_z, log_sum_p2, argmax = output[2], output[3], output[5], output[6]
    ctx.save_for_backward(logits, ids, temperature, sparse_ids, lse, mean_z, log_sum_p2, argmax)
    ctx.extra, ctx.backend = extra, backend


def _backward(ctx, g_lp, g_h, g_lse, g_mean_z, g_sp2, g_lsp2, g_argmax, g_mlp, g_mean, g_z):
    logits, ids, temperature, sparse_ids, lse, mean_z, log_sum_p2, argmax = ctx.saved_tensors
    zero = torch.zeros_like(lse)
    g_lp = zero if g_lp is None else g_lp
    g_lse = zero if g_lse is None else g_lse
    extra = [zero if g is None or not ctx.extra else g for g in (g_sp2, g_lsp2, g_mlp, g_mean)]
    dlogits = torch.ops.lenkernels.token_stats_sparse_backward(
        logits, ids, temperature, sparse_ids, lse, mean_z, log_sum_p2, argmax, g_lp - g_lse,
        zero if g_h is None else g_h, *extra, g_lse,
        torch.zeros_like(sparse_ids, dtype=torch.float32) if g_z is None else g_z,
        ctx.extra, ctx.backend,
    )  # fmt: skip
    return dlogits, None, None, None, None, None


_token_stats_sparse.register_autograd(_backward, setup_context=_setup_context)


# --- the statistics (float64 on [..., M], differentiable through z_S and lse) -----------------------


def _dedupe(kept: torch.Tensor) -> torch.Tensor:
    """A kept set's ids, sorted, each once: repeats become -1 padding."""
    s = kept.sort(-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    return torch.where(dup, torch.full_like(s, -1), s)


def _first_id(sets) -> torch.Tensor | None:
    """The first id of the first set given (-1 padding read as 0): the anchor of ignored rows."""
    for s in sets:
        if s is not None and s.shape[-1] > 0:
            return s[..., 0].clamp_min(0)
    return None


def sparse_token_stats(logits, ids, temp, ignore_index: int, wanted, top_k: int, gather_ids, kept_ids, sampling,
                       extra: bool, backend: str, shard: vp.VocabShard | None = None) -> dict:  # fmt: skip
    """Every statistic asked for, as a dict of ``TokenStats`` fields (the dense ones too: they come
    from the same kernel). Arguments checked by ``token_stats`` and :func:`check_args`. ``shard``:
    ``logits`` is this rank's shard of a vocabulary split across ``shard.group`` (ids global)."""
    vocab = logits.shape[-1] if shard is None else shard.vocab
    nan = float("nan")
    # with value checks token_stats has run ids_in_range: every id is in [0, V) or ignore_index, and
    # every gathered / kept id in [-1, V) (check_args)
    checked = _checks.value_checks(ids.device)
    valid = ids != ignore_index
    if not checked:
        in_range = (ids >= 0) & (ids < vocab)
    else:
        in_range = None if 0 <= ignore_index < vocab else valid  # None: every id
    with torch.no_grad():
        topk_ids = None
        if top_k > 0:
            topk_ids = (
                torch.ops.lenkernels.topk_ids(logits.detach(), top_k) if shard is None else
                vp.vp_topk_rows(ts._rows(logits.detach()), top_k, shard).reshape(*ids.shape, top_k)
            )  # fmt: skip
        full_kept = False
        if sampling is not None:
            k, p, m = sampling
            if (0 < k < vocab or p < 1.0 or m > 0.0) and shard is not None:
                kept = vp.vp_sampler_kept_rows(ts._rows(logits.detach()), temp, k, p, m, shard)
                kept_ids = kept.reshape(*ids.shape, kept.shape[-1])
            elif 0 < k < vocab or p < 1.0 or m > 0.0:
                kept_ids = torch.ops.lenkernels.sampler_kept_ids(logits.detach(), temp, k, p, m)
            else:  # no truncation: the kept set is every id of non-zero probability
                full_kept = True
        elif kept_ids is not None:
            kept_ids = _dedupe(kept_ids)
    if in_range is None:
        anchor = ids.long()
    else:
        first = _first_id((topk_ids, gather_ids, kept_ids))
        fallback = torch.zeros_like(ids) if first is None else first.to(ids.dtype)
        anchor = torch.where(in_range, ids, fallback).long()
    sets = [s for s in (topk_ids, gather_ids, kept_ids) if s is not None]
    # z at the anchor (column 0) is read by the kept statistics only; the backward adds lse's term at
    # the anchor whatever the columns. Kept, or no column at all: the anchor column leads.
    lead = "kept" in wanted or shard is not None or not sum(s.shape[-1] for s in sets)
    if lead:
        sets.insert(0, anchor.unsqueeze(-1))
    sparse = sets[0] if len(sets) == 1 else torch.cat(sets, -1)
    if shard is None:
        lp, ent, lse, _, sp2, lsp2, amax, mlp, mean, z = torch.ops.lenkernels.token_stats_sparse(
            logits, anchor, temp, sparse, extra, backend
        )
    else:
        lp, ent, lse, _, sp2, lsp2, amax, mlp, mean, z = vp._VocabParallelStats.apply(
            logits, anchor, temp, sparse, extra, backend, shard
        )
    lse64 = lse.double().unsqueeze(-1)  # z (fp32) - lse64: the subtraction and lse's gradient in float64
    bad = None if checked else valid & ~in_range  # unchecked ids only: NaN, never a plausible number
    out = {}
    if "logprob" in wanted:
        out["logprob"] = torch.where(valid, lp if bad is None else torch.where(bad, nan, lp), 0.0)
    if "entropy" in wanted:
        out["entropy"] = ent
    if extra:
        has = wanted.__contains__
        out.update(sum_p2=sp2 if has("sum_p2") else None, log_sum_p2=lsp2 if has("sum_p2") else None,
                   argmax=amax if has("argmax") else None, max_logprob=mlp if has("argmax") else None,
                   mean_logit=mean if has("mean_logit") else None)  # fmt: skip
    z_y = z[..., 0] if lead else None
    col = int(lead)
    if topk_ids is not None:
        out["topk_ids"] = topk_ids
        out["topk_logprobs"] = (z[..., col : col + top_k] - lse64).float()
        col += top_k
    if gather_ids is not None:
        width = gather_ids.shape[-1]
        zg = z[..., col : col + width]
        value = torch.where(gather_ids == -1, 0.0, zg - lse64)
        if not checked:  # out-of-range ids (unchecked)
            value = torch.where((gather_ids < -1) | (gather_ids >= vocab), nan, value)
        out["gathered_logprobs"] = value.float()
        col += width
    if "kept" in wanted:
        if full_kept:  # K = every id of non-zero mass: the dense statistics (the kernel's logprob bits)
            lse_k, ent_k, member = lse.double(), ent.double(), z_y > float("-inf")
        else:
            zk = z[..., col:].double()
            present = (kept_ids >= 0) & (kept_ids < vocab)
            zk = torch.where(present, zk, float("-inf"))
            lse_k = torch.logsumexp(zk, -1)
            q = torch.exp(zk - lse_k.unsqueeze(-1))
            ent_k = lse_k - (q * torch.where(zk > float("-inf"), zk, 0.0)).sum(-1)
            member = (kept_ids == anchor.unsqueeze(-1)).any(-1)
            broken = ((kept_ids < -1) | (kept_ids >= vocab)).any(-1)  # out-of-range ids (unchecked)
            lse_k = torch.where(broken, nan, lse_k)
        outside = valid & ~member
        if checked and bool(outside.any()):
            first_bad = int(outside.reshape(-1).nonzero()[0])
            source = "kept_ids" if sampling is None else "the sampling parameters"
            raise ValueError(
                f"ids holds {int(ids.reshape(-1)[first_bad])} at flat index {first_bad}, outside its kept set "
                f"(given by {source}): a sampled id must be kept"
            )
        dead = outside if bad is None else outside | bad
        lse_k = torch.where(dead, nan, lse_k)
        kept_lp = lp.double() if full_kept else z_y - lse_k
        out["kept_logprob"] = torch.where(valid & ~dead, kept_lp, torch.where(valid, nan, 0.0)).float()
        out["kept_entropy"] = torch.where(dead, nan, ent_k).float()
        out["kept_log_mass"] = (lse_k - lse64.squeeze(-1)).float()
    return out
