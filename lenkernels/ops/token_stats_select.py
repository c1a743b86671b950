"""Vocabulary selections of ``lenkernels.token_stats`` (SPEC 7), no gradient: the exact top-k ids of a
row and the kept set of a vLLM sampler's truncation (top-k, top-p, min-p) replayed; the sparse
statistics over them are ``ops/token_stats_sparse.py``'s.

The top-k ids and the kept set of a sampler with top-k come from one read of the logits, exact
ties to the lower id (:func:`top_candidates`): on CPU rows the C++ kernel
(``csrc/cpu/token_stats.cpp``), elsewhere ``torch.topk`` of 2k + 8. Top-p / min-p without top-k: on
CPU rows at most three reads (the max, the mass and the ids near the top, the ids above the cut where
it lies far down), sorting only the candidates; elsewhere the row's float64 mass, then ``torch.topk``
of 256, 1024, ... until the set ends: up to a sort of the row, ``O(V log V)``, for a set that holds
most of a flat distribution (:func:`sampler_kept_rows`, chunked over rows). Both are custom ops
(``lenkernels::topk_ids``, ``lenkernels::sampler_kept_ids``): opaque to ``torch.compile``, the kept
set's width an unbacked size.
"""

from __future__ import annotations

import torch

from lenkernels import cpu
from lenkernels.cpu import token_stats as cpu_ts
from lenkernels.ops import token_stats as ts

CHUNK_ELEMS = 1 << 22  # most logits a row chunk of the selection holds in its float64/int64 temporaries
_CPU_SELECT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the C++ selection's inputs
CPU_KEPT_SLOTS = 256  # id slots a row of the CPU sampler replay gets first, past top_k (more: a second run)
CPU_KEPT_ELEMS = CHUNK_ELEMS  # most id slots of a second run's row chunk (V a row)


def _sort_desc_ids(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``idx`` reordered by (value descending, id ascending)."""
    order = idx.argsort(dim=1)
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    return idx.gather(1, torch.sort(vals, dim=1, descending=True, stable=True).indices)


def _selects_on_cpu(x: torch.Tensor) -> bool:
    """Whether the CPU selection kernel serves rows ``x``: float32/bfloat16/float16 CPU tensors with
    the compiled ``token_stats`` module at hand (else ``torch.topk`` / ``torch.sort``, as on other
    devices, and for float64 rows)."""
    if x.device.type != "cpu" or x.dtype not in _CPU_SELECT_DTYPES or x.shape[0] == 0 or x.shape[1] >= 1 << 32:
        return False
    return cpu.available(cpu_ts.FAMILY)[0]


def _cpu_top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, count, ties)`` of the CPU kernel (one read of each row): ids ``[n, k]`` in order (value
    descending, id ascending, NaN first), count ``[n]`` = #entries ``>=`` the k-th value, ties ``[n]``
    the entries of that value left out (both 0 where the k-th value is NaN); ``1 <= k <= V``."""
    n = x.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64)
    count, ties = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    cpu_ts.topk_select(x, k, ids, count, ties)
    return ids, count, ties


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def top_candidates(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, count)``: per row of ``x`` ``[n, V]``, ids ``[n, W]`` int64 sorted by (value descending,
    id ascending) whose first ``count`` (int64 ``[n]``) are every id with ``x >=`` the k-th largest
    value (all ties at the k-th place included); ``W >= k``. Entries compare as the logits do; z = x / T
    with T > 0 orders the same (float64 z is strictly monotone in fp32/bf16/fp16 x). NaN ranks first
    (``torch.sort``'s order) and is never ``>=`` anything: count is 0 where the k-th value is NaN.

    CPU rows (float32/bf16/fp16): the C++ kernel, one read of each row (exact ties by construction,
    ``lenkernels/selection.h``), and a second read of the rows whose ties of the k-th value run past
    the k (W = k + the most such ties). Other devices: one ``torch.topk`` of ``2k + 8``: where the last
    of those is below the k-th value, every tie of the k-th value is among them and sorting them by
    (value, id) is exact. Rows whose ties run past them (e.g. a row of equal logits) are sorted whole
    (a host sync to find them).
    """
    n, vocab = x.shape
    if n == 0 or k == 0:
        return torch.zeros(n, k, dtype=torch.int64, device=x.device), torch.zeros(n, dtype=torch.int64, device=x.device)
    if _selects_on_cpu(x):
        x = _unit_stride(x)
        ids, count, ties = _cpu_top(x, k)
        more = int(ties.max())
        if more:
            ids = torch.nn.functional.pad(ids, (0, more))
            cpu_ts.topk_ties(x, k, ids, ties)
        return ids, count
    kk = min(vocab, 2 * k + 8)
    vals, idx = torch.topk(x, kk, dim=1, sorted=True)
    thr = vals[:, k - 1 : k]
    count = (vals >= thr).sum(1)
    ids = _sort_desc_ids(vals, idx)
    if kk == vocab:
        return ids, count
    cut = vals[:, kk - 1] == thr.squeeze(1)  # the ties may run past the list: sort those rows whole
    if not bool(cut.any()):
        return ids, count
    rows = cut.nonzero().reshape(-1)
    step = max(1, CHUNK_ELEMS // vocab)
    fixes = []
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        xr = x[r]
        c = (xr >= thr[r]).sum(1)
        fixes.append((r, torch.sort(xr, dim=1, descending=True, stable=True).indices[:, : int(c.max())], c))
    width = max(kk, max(f.shape[1] for _, f, _ in fixes))
    ids = torch.nn.functional.pad(ids, (0, width - kk))
    count = count.clone()
    for r, f, c in fixes:
        ids[r] = torch.nn.functional.pad(f, (0, width - f.shape[1]))
        count[r] = c
    return ids, count


def topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ids ``[n, min(k, V)]`` int64 of the ``k`` largest entries of each row of ``x`` ``[n, V]``, in
    descending order, ties to the lower id, NaN first, exactly (``torch.topk`` alone picks an arbitrary
    subset of values tied at the k-th place; see :func:`top_candidates`)."""
    if _selects_on_cpu(x) and k > 0:
        return _cpu_top(_unit_stride(x), min(k, x.shape[1]))[0]
    if k >= x.shape[1] and x.shape[0]:
        return torch.sort(x, dim=1, descending=True, stable=True).indices
    return top_candidates(x, k)[0][:, :k].contiguous()


def _truncate(x, cand, count, temp64, top_p: float, min_p: float, total=None):
    """Kept ids ``[n, W]`` (-1 past each row's set) among sorted candidates ``cand`` (a prefix of the
    order value desc, id asc, starting at the row max; the first ``count`` of each row survive
    top-k), and the set sizes. ``total``: the survivors' mass ``sum exp(z - max z)`` ``[n, 1]``
    where they are not all among the candidates."""
    return _truncate_z(x.gather(1, cand).double() / temp64, cand, count, top_p, min_p, total)


def _truncate_z(z, cand, count, top_p: float, min_p: float, total=None):
    """:func:`_truncate` from the float64 ``z`` of the candidates (ids ``cand``)."""
    pos = torch.arange(cand.shape[1], device=z.device)
    keep = (pos < count.unsqueeze(1)) & (z > float("-inf"))  # zero-mass ids are never kept
    zmax = z[:, :1]
    ratio = torch.where(keep, torch.exp(z - torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))), 0.0)
    if top_p < 1.0:
        # vLLM masks where the ascending cumulative renormalised probability <= 1 - p: keep where the
        # mass at or after the candidate (descending order) exceeds (1 - p) of the survivors'
        total = ratio.sum(1, keepdim=True) if total is None else total
        keep &= total - (ratio.cumsum(1) - ratio) > (1.0 - top_p) * total
    if min_p > 0.0:
        keep &= ratio >= min_p  # p_j / max p = exp(z_j - max z)
    size = keep.sum(1)
    return torch.where(keep, cand, -1), size


def _row_mass(x, zmax64, temp64):
    """``sum_j exp(z_j - max z)`` ``[n, 1]`` in float64, in row chunks (the survivors' mass without top-k)."""
    step = max(1, CHUNK_ELEMS // x.shape[1])
    out = []
    for s in range(0, x.shape[0], step):
        z = x[s : s + step].double() / temp64[s : s + step]
        out.append(torch.exp(z - zmax64[s : s + step]).sum(1, keepdim=True))
    return torch.cat(out)


def _kept_by_rounds(x, temp64, top_p: float, min_p: float) -> list:
    """``[(rows, kept, size)]``: the kept sets of rows ``x`` without top-k, from ``torch.topk`` of 256,
    1024, ... candidates until each row's set ends inside them (after one float64 pass for the mass)."""
    n, vocab = x.shape
    zmax64 = x.amax(1, keepdim=True).double() / temp64
    total = _row_mass(x, torch.where(torch.isfinite(zmax64), zmax64, 0.0), temp64) if top_p < 1.0 else None
    pending = torch.arange(n, device=x.device)
    k = min(vocab, 256)
    parts = []
    while pending.numel():
        xr = x[pending]
        vals, idx = torch.topk(xr, k, dim=1, sorted=True)
        cand = _sort_desc_ids(vals, idx)
        count = torch.full((pending.numel(),), k, dtype=torch.int64, device=x.device)
        mass = None if total is None else total[pending]
        kept, size = _truncate(xr, cand, count, temp64[pending], top_p, min_p, mass)
        # the set ended inside the candidates, and no tie of its last value was left out
        last = xr.gather(1, cand.gather(1, (size - 1).clamp_min(0).unsqueeze(1)))
        done = (
            (size < k) & ((size == 0) | (last.squeeze(1) > vals[:, -1]))
            if k < vocab
            else torch.ones_like(size, dtype=torch.bool)
        )
        parts.append((pending[done], kept[done], size[done]))
        pending, k = pending[~done], min(vocab, 4 * k)
    return parts


def _torch_kept(x, temp64, top_k: int, top_p: float, min_p: float) -> list:
    """``[(rows, kept, size)]``: the kept sets of rows ``x`` by the torch path (``top_k``: 0 or in (0, V))."""
    if top_k:
        cand, count = top_candidates(x, top_k)
        return [(torch.arange(x.shape[0], device=x.device), *_truncate(x, cand, count, temp64, top_p, min_p))]
    return _kept_by_rounds(x, temp64, top_p, min_p)


def _cpu_kept_rows(x, temp64, top_k: int, top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, left)``: the kept sets of CPU rows ``x`` from the C++ kernel (``[n, W]`` int64, -1
    padded, W >= 1) and the rows it leaves to :func:`_torch_kept` (their rows of ``kept``: -1 only).
    Each row first gets ``top_k + CPU_KEPT_SLOTS`` slots for its candidates; the rows that need more
    run again with V slots (in row chunks of ``CPU_KEPT_ELEMS`` logits)."""
    n, vocab = x.shape
    temps = temp64[:, 0].contiguous()
    runs = [(None, min(vocab, top_k + CPU_KEPT_SLOTS))]
    results = []
    while runs:
        rows, slots = runs.pop()
        xs, ts_ = (x, temps) if rows is None else (x[rows], temps[rows])
        out = torch.empty(xs.shape[0], slots, dtype=torch.int64)
        size = torch.empty(xs.shape[0], dtype=torch.int64)
        cpu_ts.sampler_kept(xs, ts_, top_k, top_p, min_p, out, size)
        results.append((rows, out, size))
        wide = (size == -2).nonzero().reshape(-1)
        if slots < vocab and wide.numel():  # sets of more than `slots` candidates (a flat distribution)
            wide = wide if rows is None else rows[wide]
            step = max(1, CPU_KEPT_ELEMS // vocab)
            runs += [(wide[s : s + step], vocab) for s in range(0, wide.numel(), step)]
    width = max(1, max(int(size.max()) for _, _, size in results))
    kept = torch.full((n, width), -1, dtype=torch.int64)
    final = torch.empty(n, dtype=torch.int64)
    for rows, out, size in results:  # in run order: a wide row's second run comes after its first
        w = min(width, out.shape[1])
        ids = out[:, :w].masked_fill(torch.arange(w) >= size.unsqueeze(1), -1)
        if rows is None:
            kept[:, :w], final[:] = ids, size
        else:
            kept[rows, :w], final[rows] = ids, size
    return kept, (final < 0).nonzero().reshape(-1)


def sampler_kept_rows(x: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float, min_p: float):
    """Kept ids ``[n, W]`` int64 of the sampler's truncation, -1 padded, W the largest set (SPEC 7).

    vLLM's order: top-k keeps every z >= the k-th largest (ties all kept); top-p then keeps the
    smallest prefix of the survivors (sorted by z descending, ties by id ascending) whose
    renormalised mass reaches p, the crossing token included; min-p keeps p_j >= min_p * max p.
    Ids of zero probability (z = -inf) are never kept. Masses in float64. W >= 1 (a row with no
    kept id, all -inf, has -1 only).

    Cost on CPU rows (float32/bf16/fp16), the C++ kernel: with top-k, one read of each row (the
    top-k survivors, then top-p / min-p among them); without it, at most three (the max, the mass and
    the ids near the top, the ids above the cut where it lies far down); only candidates are sorted.
    Elsewhere, and for the CPU kernel's rare leftovers (a NaN or a max that is not finite in the row,
    a cut within rounding of a histogram bucket edge): with top-k, one ``torch.topk`` of 2k + 8;
    without it, one float64 pass for the row's mass, then ``torch.topk`` of 256, 1024, ... candidates
    until each row's set ends inside them (a row keeping most of a flat distribution ends with a sort
    of the whole row, ``O(V log V)``). W is data-dependent: host syncs
    (free on CPU tensors).
    """
    n, vocab = x.shape
    temp64 = temperature.double().reshape(-1, 1).expand(n, 1)
    if n == 0:
        return torch.full((0, 1), -1, dtype=torch.int64, device=x.device)
    top_k = top_k if 0 < top_k < vocab else 0
    if _selects_on_cpu(x):
        kept, rows = _cpu_kept_rows(_unit_stride(x), temp64, top_k, top_p, min_p)
        if not rows.numel():
            return kept
        parts = [(rows[r], k, size) for r, k, size in _torch_kept(x[rows], temp64[rows], top_k, top_p, min_p)]
    else:
        kept, parts = None, _torch_kept(x, temp64, top_k, top_p, min_p)
    width = max(1, max(int(size.max()) if size.numel() else 0 for _, _, size in parts))  # >= 1: static for compile
    if kept is None:
        out = torch.full((n, width), -1, dtype=torch.int64, device=x.device)
    else:  # the kernel's rows, and -1 on the rows left to the torch path
        width = max(width, kept.shape[1])
        out = torch.nn.functional.pad(kept, (0, width - kept.shape[1]), value=-1)
    for rows, kept, _ in parts:
        w = min(width, kept.shape[1])
        out[rows, :w] = kept[:, :w]
    return out


@torch.library.custom_op("lenkernels::topk_ids", mutates_args=())
def _topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., k]`` int64: the ids of the k largest logits per row, descending, ties to the lower id."""
    return topk_rows(ts._rows(logits), k).reshape(*logits.shape[:-1], k)


@_topk_ids.register_fake
def _(logits, k):
    return logits.new_empty(*logits.shape[:-1], k, dtype=torch.int64)


@torch.library.custom_op("lenkernels::sampler_kept_ids", mutates_args=())
def _sampler_kept_ids(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """``[..., W]`` int64: each row's kept set under the sampler (``sampler_kept_rows``), -1 padded."""
    kept = sampler_kept_rows(ts._rows(logits), temperature, top_k, top_p, min_p)
    return kept.reshape(*logits.shape[:-1], kept.shape[-1])


@_sampler_kept_ids.register_fake
def _(logits, temperature, top_k, top_p, min_p):
    width = torch.library.get_ctx().new_dynamic_size(min=1)
    return logits.new_empty(*logits.shape[:-1], width, dtype=torch.int64)
