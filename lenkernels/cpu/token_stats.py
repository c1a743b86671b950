"""Host launchers of the C++ token-statistics kernels (``csrc/cpu/token_stats.cpp``): the
``backend="cpu"`` implementation of the token_stats family (same launcher signatures as
``lenkernels/{triton,cuda,reference}/token_stats.py``)."""

from __future__ import annotations

import torch

from lenkernels import _checks
from lenkernels.cpu import load

FAMILY = "token_stats"
# the kernel reports the first id outside the vocabulary: no separate pass over the ids
IDS_CHECKED_IN_KERNEL = True


def _temperature(temperature: torch.Tensor) -> tuple[int, int]:
    return temperature.data_ptr(), 0 if temperature.numel() == 1 else 1


def token_stats_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, max_z=None, log_s=None):
    """Writes the fp32 ``[N]`` statistics of rows ``x`` ``[N, V]`` (unit stride along V); ``max_z``
    and ``log_s`` (the online-softmax state) only when given."""
    n_rows, vocab = x.shape
    y = ids.to(torch.int64).contiguous()
    outs = [logprobs, entropy, lse, mean_z, max_z, log_s]
    bad = load(FAMILY).token_stats_fwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), y.data_ptr(),
        *_temperature(temperature), ignore_index,
        *(0 if o is None else o.data_ptr() for o in outs), torch.get_num_threads(),
    )  # fmt: skip
    if bad >= 0:
        _checks.ids_in_range(ids, vocab, ignore_index)


def token_stats_bwd(x, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits):
    """Writes ``dlogits`` ``[N, V]`` (the logits dtype; may be ``x`` itself)."""
    n_rows, vocab = x.shape
    y = ids.to(torch.int64).contiguous()
    load(FAMILY).token_stats_bwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), y.data_ptr(),
        *_temperature(temperature), ignore_index,
        lse.data_ptr(), mean_z.data_ptr(), g_logprobs.data_ptr(), g_logprobs.stride(0),
        g_entropy.data_ptr(), g_entropy.stride(0), dlogits.data_ptr(), dlogits.stride(0), torch.get_num_threads(),
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
    g = torch.stack([t.reshape(-1).to(torch.float32) for t in grads]).contiguous()
    lse, mean_z, log_sum_p2, argmax = (t.contiguous() for t in (lse, mean_z, log_sum_p2, argmax))
    load(FAMILY).token_stats_extra_bwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), y.data_ptr(),
        *_temperature(temperature), ignore_index, lse.data_ptr(), mean_z.data_ptr(),
        log_sum_p2.data_ptr(), argmax.data_ptr(), g.data_ptr(), dlogits.data_ptr(),
        dlogits.stride(0), torch.get_num_threads(),
    )  # fmt: skip
