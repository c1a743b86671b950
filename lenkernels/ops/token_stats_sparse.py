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

Selection (no gradient): the top-k ids and the kept set of a sampler with top-k come from one more
read of the logits, exact ties to the lower id (:func:`top_candidates`): on CPU rows the C++ kernel
(``csrc/cpu/token_stats.cpp``), elsewhere ``torch.topk`` of 2k + 8. Top-p / min-p without top-k: on
CPU rows at most three more reads (the max, the mass and the ids near the top, the ids above the cut
where it lies far down), sorting only the candidates; elsewhere the row's float64 mass, then
``torch.topk`` of 256, 1024, ... until the set ends: up to a sort of the row, ``O(V log V)``, for a
set that holds most of a flat distribution (:func:`sampler_kept_rows`, chunked over rows).

Vocabulary parallelism (``token_stats(process_group=...)``): ``ops/token_stats_vocab_parallel.py``, the
same statistics from every rank's shard, merged across the group.
"""

from __future__ import annotations

import torch

from lenkernels import _checks, cpu
from lenkernels.cpu import token_stats as cpu_ts
from lenkernels.ops import token_stats as ts
from lenkernels.ops import token_stats_extra as tse
from lenkernels.ops import token_stats_vocab_parallel as vp

SPARSE_OUTPUTS = ("topk", "gathered", "kept")
SAMPLING_KEYS = ("top_k", "top_p", "min_p")
NO_IGNORE = -1  # the kernels' ignore_index under this op: anchors are always in [0, V)
CHUNK_ELEMS = 1 << 22  # most logits a row chunk of the selection holds in its float64/int64 temporaries
_CPU_SELECT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the C++ selection's inputs
CPU_KEPT_SLOTS = 256  # id slots a row of the CPU sampler replay gets first, past top_k (more: a second run)
CPU_KEPT_ELEMS = CHUNK_ELEMS  # most id slots of a second run's row chunk (V a row)


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


# --- selection (no gradient): exact top-k, and the kept set of a sampler ------------------------


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
    the ids near the top, the ids above the cut where it lies far down); only candidates are sorted. Elsewhere, and for the CPU kernel's rare leftovers (a NaN or a max
    that is not finite in the row, a cut within rounding of a histogram bucket edge): with top-k, one
    ``torch.topk`` of 2k + 8; without it, one float64 pass for the row's mass, then ``torch.topk`` of
    256, 1024, ... candidates until each row's set ends inside them (a row keeping most of a flat
    distribution ends with a sort of the whole row, ``O(V log V)``). W is data-dependent: host syncs
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
    if backend == "cpu" and ids.numel():
        dense, z = _cpu_fwd_gather(logits, ids, temperature, sparse_ids)
        return (*dense, *empty, z)
    return (*ts.token_stats_fwd(logits, ids, temperature, NO_IGNORE, backend), *empty,
            _gather_z(logits, sparse_ids, temperature))  # fmt: skip


def _cpu_fwd_gather(logits, ids, temperature, sparse_ids):
    """The CPU kernel's ``(logprob, entropy, lse, mean_z)`` at ``ids`` and fp32 ``z`` at ``sparse_ids``
    (the bits of :func:`_gather_z`), picked while each row is in cache: no second visit of the rows."""
    x = ts._rows(logits)
    n = x.shape[0]
    outs = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4)]
    s = sparse_ids.reshape(n, sparse_ids.shape[-1]).to(torch.int64).contiguous()
    z = torch.empty(s.shape, dtype=torch.float32, device=logits.device)
    cpu_ts.token_stats_fwd(x, ids.reshape(-1), temperature, NO_IGNORE, *outs, sparse_ids=s, z_sparse=z)
    return tuple(o.reshape(ids.shape) for o in outs), z.reshape(sparse_ids.shape)


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
    ``(g_lse at ids, g_z at sparse_ids) / T`` added in place (by the CPU kernel itself, chunk by chunk,
    on the two-output CPU path; the same bits as :func:`_add_sparse`)."""
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
    if extra:
        _add_sparse(rows, idx, g)
    elif backend == "cpu":  # the sparse terms added while each chunk of the gradient is in cache
        cpu_ts.token_stats_bwd(
            ts._rows(logits), ids.reshape(-1), temperature, lse.reshape(-1), mean_z.reshape(-1),
            g_logprobs.reshape(-1).float(), g_entropy.reshape(-1).float(), NO_IGNORE, rows, sparse_ids=idx, g_sparse=g,
        )  # fmt: skip
    else:
        ts.token_stats_bwd(logits, ids, temperature, lse, mean_z, g_logprobs, g_entropy, NO_IGNORE, backend, dlogits)
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
