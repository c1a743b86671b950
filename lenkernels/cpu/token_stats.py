"""Host launchers of the C++ token-statistics kernels (``csrc/cpu/token_stats.cpp``): the
``backend="cpu"`` implementation of the token_stats family (same launcher signatures as
``lenkernels/{triton,cuda,reference}/token_stats.py``), and the vocabulary selections that
``ops/token_stats_sparse.py`` runs on CPU rows whatever the backend (top-k ids, a sampler's kept set)."""

from __future__ import annotations

import torch

from lenkernels import _checks
from lenkernels.cpu import load

FAMILY = "token_stats"
# the kernel reports the first id outside the vocabulary: no separate pass over the ids
IDS_CHECKED_IN_KERNEL = True
# token_stats_fwd/bwd take sparse_ids with z_sparse/g_sparse: the sparse statistics' gather and
# gradient add done while each row is in cache (ops/token_stats_sparse.py)
SPARSE_IN_KERNEL = True


def _temperature(temperature: torch.Tensor) -> tuple[int, int]:
    return temperature.data_ptr(), 0 if temperature.numel() == 1 else 1


def token_stats_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, max_z=None, log_s=None, *,
                    sparse_ids=None, z_sparse=None):  # fmt: skip
    """Writes the fp32 ``[N]`` statistics of rows ``x`` ``[N, V]`` (unit stride along V); ``max_z``
    and ``log_s`` (the online-softmax state) only when given; ``z_sparse`` (fp32 ``[N, M]``
    contiguous) only when given: ``x / T`` at ``sparse_ids`` (int64 ``[N, M]`` contiguous, clamped
    into ``[0, V)``), read while each row is in cache (``ops/token_stats_sparse.py``)."""
    n_rows, vocab = x.shape
    y = ids.to(torch.int64).contiguous()
    outs = [logprobs, entropy, lse, mean_z, max_z, log_s]
    sparse = (0, 0, 0) if z_sparse is None else (sparse_ids.data_ptr(), sparse_ids.shape[1], z_sparse.data_ptr())
    bad = load(FAMILY).token_stats_fwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), y.data_ptr(),
        *_temperature(temperature), ignore_index,
        *(0 if o is None else o.data_ptr() for o in outs), torch.get_num_threads(), *sparse,
    )  # fmt: skip
    if bad >= 0:
        _checks.ids_in_range(ids, vocab, ignore_index)


def token_stats_bwd(x, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits, *,
                    sparse_ids=None, g_sparse=None):  # fmt: skip
    """Writes ``dlogits`` ``[N, V]`` (the logits dtype; may be ``x`` itself); with ``g_sparse``
    (float64 ``[N, M]`` contiguous) adds ``g_sparse[r, m]`` at ``sparse_ids[r, m]`` (int64 ``[N, M]``
    contiguous, in ``[0, V)``) while each chunk of the row is in cache: the terms of a repeated id
    summed in float64 first, one rounding per element (``ops/token_stats_sparse.py``)."""
    n_rows, vocab = x.shape
    y = ids.to(torch.int64).contiguous()
    sparse = (0, 0, 0) if g_sparse is None else (sparse_ids.data_ptr(), sparse_ids.shape[1], g_sparse.data_ptr())
    load(FAMILY).token_stats_bwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), y.data_ptr(),
        *_temperature(temperature), ignore_index,
        lse.data_ptr(), mean_z.data_ptr(), g_logprobs.data_ptr(), g_logprobs.stride(0),
        g_entropy.data_ptr(), g_entropy.stride(0), dlogits.data_ptr(), dlogits.stride(0), torch.get_num_threads(),
        *sparse,
    )  # fmt: skip


def token_stats_extra_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2,
                          argmax, max_logprob, mean_logit):  # fmt: skip
    """Writes every SPEC 7 statistic of rows ``x`` ``[N, V]`` (fp32 ``[N]``, argmax int64 ``[N]``)."""
    n_rows, vocab = x.shape
    y = ids.to(torch.int64).contiguous()
    outs = (logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit)
    bad = load(FAMILY).token_stats_extra_fwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), y.data_ptr(),
        *_temperature(temperature), ignore_index, *(o.data_ptr() for o in outs), torch.get_num_threads(),
    )  # fmt: skip
    if bad >= 0:
        _checks.ids_in_range(ids, vocab, ignore_index)


def token_stats_extra_bwd(x, ids, temperature, lse, mean_z, log_sum_p2, argmax, grads, ignore_index, dlogits):
    """Writes ``dlogits`` ``[N, V]`` from the six cotangents ``grads`` (fp32 ``[N]`` each)."""
    n_rows, vocab = x.shape
    y = ids.to(torch.int64).contiguous()
    g = torch.stack(tuple(grads)).reshape(6, -1).to(torch.float32).contiguous()  # [6, N]
    lse, mean_z, log_sum_p2, argmax = (t.contiguous() for t in (lse, mean_z, log_sum_p2, argmax))
    load(FAMILY).token_stats_extra_bwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), y.data_ptr(),
        *_temperature(temperature), ignore_index, lse.data_ptr(), mean_z.data_ptr(),
        log_sum_p2.data_ptr(), argmax.data_ptr(), g.data_ptr(), dlogits.data_ptr(),
        dlogits.stride(0), torch.get_num_threads(),
    )  # fmt: skip


def topk_select(x, k, ids, count, ties):
    """Writes ``ids[:, :k]`` (int64 ``[N, >= k]``, unit stride along the row): the ``k`` first ids of
    each row of ``x`` ``[N, V]`` by (value descending, id ascending, NaN first); ``count`` (int64
    ``[N]``): the entries ``>=`` the k-th value; ``ties`` (int64 ``[N]``): those of the k-th value left
    out of the ``k`` (both 0 where the k-th value is NaN). One read of each row."""
    n_rows, vocab = x.shape
    load(FAMILY).topk_select(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), k, ids.data_ptr(), ids.stride(0),
        count.data_ptr(), ties.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


def topk_ties(x, k, ids, ties):
    """Writes ``ids[r, k : k + ties[r]]``: the ids after ``ids[r, k - 1]`` of its value, ascending
    (the ties :func:`topk_select` counted; ``ids`` ``[N, >= k + max(ties)]``)."""
    n_rows, vocab = x.shape
    load(FAMILY).topk_ties(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), k, ids.data_ptr(), ids.stride(0),
        ties.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


def sampler_kept(x, temperature, top_k, top_p, min_p, out, sizes):
    """Writes ``out[r, :sizes[r]]`` (int64 ``[N, >= V]``): the kept ids of row ``r`` of ``x`` ``[N, V]``
    under top-k (``0 < top_k < V``; 0: none), top-p and min-p, by (z descending, id ascending): with
    top-k one read of the row, without it at most three; ``sizes`` (int64 ``[N]``) is -1 for a row left
    to the caller (a NaN, a max that is not finite, a cut within rounding of a bucket edge).
    ``temperature``: float64, 1 or N values."""
    n_rows, vocab = x.shape
    load(FAMILY).sampler_kept(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), top_k, temperature.data_ptr(),
        0 if temperature.numel() == 1 else 1, top_p, min_p, out.data_ptr(), out.stride(0), sizes.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
