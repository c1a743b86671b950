"""TRL's token statistics (``trl.trainer.utils``): ``selective_log_softmax``,
``entropy_from_logits`` and ``selective_log_softmax_and_entropy`` with TRL's signatures and result
dtypes. Import them from :mod:`lenkernels.integrations.trl`, which documents the conventions and
the differences."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from lenkernels.integrations import _cast, _token_stats

_IGNORE = -100


def _check_temperature(temperature) -> None:
    if not isinstance(temperature, torch.Tensor) and temperature <= 0:
        raise ValueError("temperature must be positive")


def _masked_ids(index: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return index if row_mask is None else index.masked_fill(row_mask == 0, _IGNORE)


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fused_in_trl(logits: torch.Tensor, index: Optional[torch.Tensor] = None,
                  row_mask: Optional[torch.Tensor] = None) -> bool:  # fmt: skip
    """Whether TRL 1.16 runs its fused Triton kernel on these inputs (``_supports_trl_loss_kernel``):
    it returns float32 statistics there, and the logits' dtype on its eager path."""
    fused = (
        logits.device.type in ("cuda", "xpu")
        and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 1 <= logits.dim() <= 3
        and logits.stride(-1) == 1
        and logits.shape[-1] > 0
    )
    if index is not None:
        fused = (
            fused
            and tuple(index.shape) == tuple(logits.shape[:-1])
            and index.dtype in (torch.int32, torch.int64)
            and index.device == logits.device
        )
    if row_mask is not None:
        fused = (
            fused
            and index is not None
            and tuple(row_mask.shape) == tuple(index.shape)
            and row_mask.dtype in (torch.bool, torch.int32, torch.int64)
            and row_mask.device == logits.device
        )
    return fused and _triton_available()


def _trl_dtype(logits: torch.Tensor, index=None, row_mask=None) -> torch.dtype:
    return torch.float32 if _fused_in_trl(logits, index, row_mask) else logits.dtype


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at ``index``,
    without the ``[..., V]`` log-softmax.

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16/float64 (``[B, T, V]`` padded or ``[N, V]``
            packed).
        index: ``[...]`` int ids (one per row), or ``[..., K]`` (K ids per row, e.g. top-K).
        temperature: positive; applied in float32 inside the kernel (float64 for float64 logits).
        row_mask: optional, the shape of ``index``: rows (entries) where it is 0 get 0 and no
            gradient, and their ids are never read (they may be out of range, like TRL's padding).

    Returns:
        the shape of ``index``, in TRL's dtype (float32 where TRL's fused kernel runs, else the
        logits'); differentiable in ``logits``.

    Example (packed)::

        logps = selective_log_softmax(logits, completion_ids, temperature=0.9)    # [N]
    """
    _check_temperature(temperature)
    dtype = _trl_dtype(logits, index, row_mask)
    if index.dim() == logits.dim() - 1:
        lp, _ = _token_stats(logits, _masked_ids(index, row_mask), temperature=temperature, ignore_index=_IGNORE,
                             want="logprobs")  # fmt: skip
        return _cast(lp, dtype)
    if index.dim() != logits.dim():
        raise ValueError(
            f"index must have the shape of logits without V {tuple(logits.shape[:-1])} or with K ids per row "
            f"{tuple(logits.shape[:-1])} + (K,), got {tuple(index.shape)}"
        )
    # K ids per row: one kernel pass gives log p of the first id; the others differ from it by
    # their logit gap, (z_k - z_0) / T, whose gradient adds e_k - e_0 to e_0 - p: exactly e_k - p.
    safe = (index if row_mask is None else torch.where(row_mask != 0, index, torch.zeros_like(index))).long()
    first, _ = _token_stats(logits, safe[..., 0], temperature=temperature, want="logprobs")
    picked = torch.gather(logits, -1, safe).to(first.dtype)
    gap = picked - picked[..., :1]
    if isinstance(temperature, torch.Tensor):
        gap = gap / temperature.to(first.dtype).unsqueeze(-1)
    elif temperature != 1.0:
        gap = gap / float(temperature)
    out = first.unsqueeze(-1) + gap
    out = out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)
    return _cast(out, dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: entropy (nats) of each row of ``[..., V]`` logits, ``[...]``
    in TRL's dtype (float32 where its fused kernel runs, else the logits'), differentiable.
    ``chunk_size`` is accepted for the signature: the kernel needs no chunking (it holds no
    ``[N, V]`` temporary). Example: ``entropy_from_logits(logits)``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _, h = _token_stats(logits, None, want="entropy")
    return _cast(h, _trl_dtype(logits))


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``selective_log_softmax_and_entropy``: both statistics from one read of the logits.

    Args:
        logits: ``[..., V]``; index: ``[...]`` int ids; temperature: positive.
        entropy_requires_grad: False returns the entropy detached.
        row_mask: the shape of ``index``; masked rows get 0 for both outputs (and no gradient).

    Returns:
        ``(logprobs, entropy)``: ``[...]`` in TRL's dtype (float32 where its fused kernel runs,
        else the logits').

    Example: ``logps, ent = selective_log_softmax_and_entropy(logits, completion_ids, row_mask=mask)``.
    """
    _check_temperature(temperature)
    logps, entropy = _token_stats(logits, _masked_ids(index, row_mask), temperature=temperature,
                                  ignore_index=_IGNORE)  # fmt: skip
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    dtype = _trl_dtype(logits, index, row_mask)
    logps, entropy = _cast(logps, dtype), _cast(entropy, dtype)
    return logps, (entropy if entropy_requires_grad else entropy.detach())
