"""verl's token statistics (``verl.utils.torch_functional``): ``logprobs_from_logits``,
``entropy_from_logits`` and ``entropy_from_logits_with_chunking`` with verl's signatures and result
dtypes. Import them from :mod:`lenkernels.integrations.verl`, which documents the conventions."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from lenkernels import _checks
from lenkernels.integrations import _cast, _token_stats


@torch.compiler.assume_constant_result
def _flash_attn_ce() -> bool:
    """Whether verl's ``logprobs_from_logits`` takes its flash-attn cross-entropy path (float32
    results) rather than its eager one (the logits' dtype): verl's own import-time flag when verl is
    loaded, and its ``VERL_DISABLE_FLASH_ATTN_CE`` switch."""
    if os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") == "1":
        return False
    tf = sys.modules.get("verl.utils.torch_functional")
    if tf is not None and hasattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE"):
        return bool(tf.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE)
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def _logprobs_dtype(logits: torch.Tensor) -> torch.dtype:
    """verl's result dtype: float32 from flash-attn's kernel (CUDA tensors), the logits' otherwise."""
    return torch.float32 if logits.device.type == "cuda" and _flash_attn_ce() else logits.dtype


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """verl's ``logprobs_from_logits``: log-probability of each label, one read of the logits.

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16/float64 (``[total_nnz, V]`` packed in verl's
            remove-padding path, ``[B, T, V]`` padded).
        labels: ``[...]`` int token ids, the leading shape of ``logits``.
        inplace_backward: as with verl's flash-attn kernel (the default on GPU): the backward
            writes d loss / d logits into ``logits`` itself, saving an ``[N, V]`` buffer. verl
            turns it off when the same logits also feed the entropy. Where overwriting would
            destroy data (a leaf tensor, a view of one, logits their producing op saved) the
            gradient goes to a new buffer instead, as verl's non-flash-attn path does; autograd
            refuses (rather than computes garbage) if a later op saved ``logits``.

    Returns:
        ``[...]`` (the shape of ``labels``), differentiable in ``logits``, in verl's dtype: float32
        on CUDA where verl uses flash-attn's cross-entropy, the logits' dtype otherwise (verl's
        eager path). Computed in float32 (float64 logits: in float64), then cast.

    Example (packed)::

        log_probs = logprobs_from_logits(logits_rmpad, input_ids_rmpad_rolled)     # [total_nnz]
    """
    inplace = bool(inplace_backward) and isinstance(logits, torch.Tensor) and _checks.inplace_hazard(logits) is None
    lp, _ = _token_stats(logits, labels, inplace_backward=inplace, want="logprobs")
    return _cast(lp, _logprobs_dtype(logits))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: entropy of ``softmax(logits)`` per row, ``[...]`` for
    ``[..., V]`` logits (packed ``[N, V]`` or padded ``[B, T, V]``) in the logits' dtype, as verl's;
    differentiable. Computed in float32 (float64 logits: in float64) in one read of the logits, no
    ``[N, V]`` temporary. Example: ``entropy_from_logits(logits_rmpad)``."""
    _, h = _token_stats(logits, None, want="entropy")
    return _cast(h, logits.dtype)


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's chunked entropy: ``[N]`` for ``[N, V]`` logits (any ``[..., V]`` works), in torch's
    default dtype (float32) whatever the logits' dtype, as verl's (which computes in float32 and
    writes into ``torch.zeros``).

    ``chunk_size`` is accepted for the signature and not needed: the kernel holds no ``[N, V]``
    temporary, so there is nothing to chunk. Example: ``entropy_from_logits_with_chunking(x, 2048)``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _, h = _token_stats(logits, None, want="entropy")
    return _cast(h, torch.get_default_dtype())
