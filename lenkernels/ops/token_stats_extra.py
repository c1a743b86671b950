"""The extra vocabulary statistics of ``lenkernels.token_stats`` (SPEC 7: sum_p2 / log_sum_p2,
argmax / max_logprob, mean_logit, with logprob and entropy): their custom op
``lenkernels::token_stats_extra``, its backward and host launchers. A second op, so the two-output
path of ``ops/token_stats.py`` (its kernels, bits and instruction counts) is untouched."""

from __future__ import annotations

import torch

from lenkernels import _backend, _checks
from lenkernels.ops import token_stats as ts

# --- extra vocabulary statistics (SPEC 7): lenkernels.token_stats --------------------------------
# A second custom op, so the two-output path above (its kernels, bits and instruction count) is
# untouched: the extra statistics are separate kernels, launched only when asked for.

EXTRA_OUTPUTS = 9  # logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit
_ARGMAX = 6


def _extra_kernels(backend: str):
    kernels = _backend.kernels(backend, ts.FAMILY)
    if getattr(kernels, "token_stats_extra_fwd", None) is None:
        raise _backend.BackendUnavailableError(
            f"backend {backend!r} computes only logprob and entropy; token_stats outputs "
            "'sum_p2', 'argmax' and 'mean_logit' need backend='triton', 'cpu' or 'reference'"
        )
    return kernels


def token_stats_extra_fwd(logits, ids, temperature, ignore_index: int, backend: str):
    """Host launcher: the ``EXTRA_OUTPUTS`` statistics of shape ``ids.shape`` (fp32, argmax int64)."""
    shape = ids.shape
    x = ts._rows(logits)
    y = ids.reshape(-1)
    n_rows, vocab = x.shape
    outs = [
        torch.empty(n_rows, dtype=torch.int64 if i == _ARGMAX else torch.float32, device=logits.device)
        for i in range(EXTRA_OUTPUTS)
    ]
    if n_rows == 0:
        return tuple(o.reshape(shape) for o in outs)
    kernels = _extra_kernels(backend)
    if _checks.value_checks(y.device) and not getattr(kernels, "IDS_CHECKED_IN_KERNEL", False):
        _checks.ids_in_range(y, vocab, ignore_index)
    kernels.token_stats_extra_fwd(x, y.contiguous(), temperature, ignore_index, *outs)
    return tuple(o.reshape(shape) for o in outs)


@torch.library.custom_op("lenkernels::token_stats_extra", mutates_args=())
def _token_stats_extra(
    logits: torch.Tensor, ids: torch.Tensor, temperature: torch.Tensor, ignore_index: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:  # fmt: skip
    return token_stats_extra_fwd(logits, ids, temperature, ignore_index, backend)


@_token_stats_extra.register_fake
def _(logits, ids, temperature, ignore_index, backend):
    return tuple(
        torch.empty(ids.shape, dtype=torch.int64 if i == _ARGMAX else torch.float32, device=logits.device)
        for i in range(EXTRA_OUTPUTS)
    )


@torch.library.custom_op("lenkernels::token_stats_extra_backward", mutates_args=())
def _token_stats_extra_backward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor,
    log_sum_p2: torch.Tensor,
    argmax: torch.Tensor,
    g_logprobs: torch.Tensor,
    g_entropy: torch.Tensor,
    g_sum_p2: torch.Tensor,
    g_log_sum_p2: torch.Tensor,
    g_max_logprob: torch.Tensor,
    g_mean_logit: torch.Tensor,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    x = ts._rows(logits)
    if x.shape[0] == 0:
        return dlogits
    # six fp32 [N] rows of one [6, N] tensor: one stack instead of eighteen conversions per call
    grads = torch.stack((g_logprobs, g_entropy, g_sum_p2, g_log_sum_p2, g_max_logprob, g_mean_logit))
    grads = grads.reshape(6, -1).to(torch.float32).unbind(0)
    _extra_kernels(backend).token_stats_extra_bwd(
        x, ids.reshape(-1).contiguous(), temperature, lse.reshape(-1).contiguous(), mean_z.reshape(-1).contiguous(),
        log_sum_p2.reshape(-1).contiguous(), argmax.reshape(-1).contiguous(), grads, ignore_index,
        dlogits.view(-1, dlogits.shape[-1]),
    )  # fmt: skip
    return dlogits


@_token_stats_extra_backward.register_fake
def _(logits, ids, temperature, lse, mean_z, log_sum_p2, argmax, *rest):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _extra_setup_context(ctx, inputs, output):
    logits, ids, temperature, ignore_index, backend = inputs
    _, _, lse, mean_z, _, log_sum_p2, argmax, _, _ = output
    # per-row scalars only (besides the logits the backward reads once)
    ctx.save_for_backward(logits, ids, temperature, lse, mean_z, log_sum_p2, argmax)
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _extra_backward(ctx, g_lp, g_h, g_lse, g_mean_z, g_sp2, g_lsp2, g_argmax, g_mlp, g_mean):
    logits, ids, temperature, lse, mean_z, log_sum_p2, argmax = ctx.saved_tensors
    zeros = torch.zeros_like(lse)
    grads = [zeros if g is None else g for g in (g_lp, g_h, g_sp2, g_lsp2, g_mlp, g_mean)]
    dlogits = torch.ops.lenkernels.token_stats_extra_backward(
        logits, ids, temperature, lse, mean_z, log_sum_p2, argmax, *grads, ctx.ignore_index, ctx.backend
    )
    return dlogits, None, None, None, None


_token_stats_extra.register_autograd(_extra_backward, setup_context=_extra_setup_context)
