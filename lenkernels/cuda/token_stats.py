"""Host launchers of the CUDA C++ token-statistics kernels (``csrc/cuda/token_stats.cu``): the ``backend="cuda"``
implementation of the token_stats family (same launcher signatures as the other backends).

The SPEC 7 outputs of ``lenkernels.token_stats`` (sum_p2, argmax, mean_logit) have their launchers,
``token_stats_extra_fwd`` / ``token_stats_extra_bwd``, in ``lenkernels.cuda.token_stats_extra``,
re-exported at the end of this module (the token_stats_extra family shares this module).
"""

from __future__ import annotations

import torch

from lenkernels.cuda import _check_grad_rows, _check_rows, _token_stats_launch, load

FAMILY = "token_stats"


def token_stats_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, max_z=None, log_s=None):
    """Host launcher of the forward.

    x: [N, V] float32/bfloat16/float16, unit stride along V, any row stride; ids: [N] int32/int64;
    temperature: fp32 [1] or [N]; writes logprobs, entropy, lse, mean_z (fp32 [N], contiguous), and
    when given max_z, log_s: each row's online-softmax state (``lse = max_z + log_s``, kept apart for
    ``lenkernels.distributed.merge_stats``). Out-of-range ids give NaN logprobs (checked on the host
    only with LENKERNELS_DEBUG=1).
    """
    _check_rows(x, "logits")
    n_rows, vocab = x.shape
    if n_rows == 0:
        return
    module = load("token_stats")
    device, sm_count, stream, dtype, ids = _token_stats_launch(x, ids)
    temperature = temperature.to(torch.float32).contiguous()
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    # partial (m, S, U) states of each (row, split) when a row spans several blocks
    partial = torch.empty(n_rows * n_splits * 3, dtype=torch.float32, device=x.device) if n_splits > 1 else None
    outs = (("logprobs", logprobs), ("entropy", entropy), ("lse", lse), ("mean_z", mean_z), ("max_z", max_z),
            ("log_s", log_s))  # fmt: skip
    for name, out in outs:
        if out is not None and not (out.is_contiguous() and out.dtype == torch.float32 and out.numel() == n_rows):
            raise ValueError(f"{name} must be a contiguous float32 tensor of {n_rows} elements")
    module.token_stats_fwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        logprobs.data_ptr(), entropy.data_ptr(), lse.data_ptr(), mean_z.data_ptr(),
        0 if max_z is None else max_z.data_ptr(), 0 if log_s is None else log_s.data_ptr(),
        0 if partial is None else partial.data_ptr(), n_splits, device, stream,
    )  # fmt: skip


def token_stats_bwd(x, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits):
    """Host launcher of the backward.

    x: [N, V] as in the forward; lse, mean_z: fp32 [N] from it; g_logprobs, g_entropy: fp32 [N] with
    any stride (0 = broadcast); writes dlogits ([N, V], x's dtype, unit stride along V, any row
    stride; may be x itself for the in-place backward).
    """
    n_rows, vocab = _check_grad_rows(x, dlogits)
    if n_rows == 0:
        return
    module = load("token_stats")
    device, sm_count, stream, dtype, ids = _token_stats_launch(x, ids)
    temperature = temperature.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    mean_z = mean_z.to(torch.float32).contiguous()
    g_lp = g_logprobs.to(torch.float32)
    g_h = g_entropy.to(torch.float32)
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    module.token_stats_bwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        lse.data_ptr(), mean_z.data_ptr(), g_lp.data_ptr(), g_lp.stride(0), g_h.data_ptr(), g_h.stride(0),
        dlogits.data_ptr(), dlogits.stride(0), n_splits, device, stream,
    )  # fmt: skip


# the extra vocabulary statistics (lenkernels.token_stats(outputs=...)) live beside, same family
from lenkernels.cuda.token_stats_extra import token_stats_extra_bwd, token_stats_extra_fwd  # noqa: F401
