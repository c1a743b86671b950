"""Host launchers of the CUDA C++ kernels of the extra vocabulary statistics (SPEC 7: sum_p2 /
log_sum_p2, argmax / max_logprob, mean_logit, beside logprob, entropy, lse and mean_z), in
``csrc/cuda/token_stats.cu`` (per-thread code in ``csrc/cuda/token_stats_extra.h``): the
``backend="cuda"`` implementation of the ``token_stats_extra`` family, with the signatures of
``lenkernels.triton.token_stats_extra`` (re-exported by ``lenkernels.cuda.token_stats``).

Same plan as the two-output kernels: fixed chunks of 4 tiles (32 768 bf16 / 16 384 fp32 logits), one
block a row (a chunk's state merged left to right) or, for few rows, one block a chunk and a finalize
kernel that merges a row's chunk states in index order, so a row's bits do not depend on N or on its
position (batch invariance). 16-byte loads and stores where rows start on 16-byte boundaries.

Example (packed layout: the N response tokens of all sequences as rows)::

    stats = lenkernels.token_stats(logits[0, :-1], input_ids[0, 1:], outputs=("sum_p2", "argmax"), backend="cuda")
"""

from __future__ import annotations

import torch

from lenkernels.cuda import _check_grad_rows, _check_rows, _token_stats_launch, load

FAMILY = "token_stats"
EXTRA_STATE = 7  # floats per (row, chunk) partial state: m, S, U, S2, best, sum_x, best id (int32 bits)


def _check_out(name: str, out: torch.Tensor, n_rows: int, dtype: torch.dtype) -> None:
    if not (out.is_contiguous() and out.dtype == dtype and out.numel() == n_rows):
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of {n_rows} elements")


def token_stats_extra_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2,
                          argmax, max_logprob, mean_logit):  # fmt: skip
    """Host launcher of every SPEC 7 statistic.

    x: [N, V] float32/bfloat16/float16, unit stride along V, any row stride; ids: [N] int32/int64;
    temperature: fp32 [1] or [N]; writes logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2,
    max_logprob, mean_logit (fp32 [N], contiguous) and argmax (int64 [N]: the lowest id among the
    row's maxima, 0 for an all -inf row).
    """
    _check_rows(x, "logits")
    n_rows, vocab = x.shape
    if n_rows == 0:
        return
    outs = (("logprobs", logprobs), ("entropy", entropy), ("lse", lse), ("mean_z", mean_z), ("sum_p2", sum_p2),
            ("log_sum_p2", log_sum_p2), ("max_logprob", max_logprob), ("mean_logit", mean_logit))  # fmt: skip
    for name, out in outs:
        _check_out(name, out, n_rows, torch.float32)
    _check_out("argmax", argmax, n_rows, torch.int64)
    module = load(FAMILY)
    device, sm_count, stream, dtype, ids = _token_stats_launch(x, ids)
    temperature = temperature.to(device=x.device, dtype=torch.float32).contiguous()
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    partial = (
        torch.empty(n_rows * n_splits * EXTRA_STATE, dtype=torch.float32, device=x.device) if n_splits > 1 else None
    )
    module.token_stats_extra_fwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        *(out.data_ptr() for _, out in outs[:6]), argmax.data_ptr(), max_logprob.data_ptr(), mean_logit.data_ptr(),
        0 if partial is None else partial.data_ptr(), n_splits, device, stream,
    )  # fmt: skip


def token_stats_extra_bwd(x, ids, temperature, lse, mean_z, log_sum_p2, argmax, grads, ignore_index, dlogits):
    """Host launcher of the backward: one read of the logits and one write of dlogits whatever
    outputs carry a gradient.

    x: [N, V] as in the forward; lse, mean_z, log_sum_p2 (fp32 [N]) and argmax (int64 [N]) from it;
    grads: the six cotangents (g_logprobs, g_entropy, g_sum_p2, g_log_sum_p2, g_max_logprob,
    g_mean_logit), [N] each; writes dlogits ([N, V], x's dtype, unit stride along V; may be x).
    """
    n_rows, vocab = _check_grad_rows(x, dlogits)
    if n_rows == 0:
        return
    if len(grads) != 6:
        raise ValueError(f"grads must hold the six cotangents, got {len(grads)}")
    module = load(FAMILY)
    device, sm_count, stream, dtype, ids = _token_stats_launch(x, ids)
    temperature = temperature.to(device=x.device, dtype=torch.float32).contiguous()
    rows = [t.reshape(-1).to(torch.float32).contiguous() for t in (lse, mean_z, log_sum_p2)]
    top = argmax.reshape(-1).to(torch.int64).contiguous()
    g = torch.stack([t.reshape(-1).to(torch.float32) for t in grads]).contiguous()  # [6, N]
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    module.token_stats_extra_bwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        *(t.data_ptr() for t in rows), top.data_ptr(), g.data_ptr(), dlogits.data_ptr(), dlogits.stride(0),
        n_splits, device, stream,
    )  # fmt: skip
