"""Host launcher of the C++ rollout-correction kernel (``csrc/cpu/rollout_correction.cpp``): the
``backend="cpu"`` implementation of the rollout_correction family (same launcher signature as
``lenkernels/{triton,cuda,reference}/rollout_correction.py``)."""

from __future__ import annotations

import torch

from lenkernels.cpu import dtype_code, load, threads_for

FAMILY = "rollout_correction"

_TOKENS_PER_THREAD = 1 << 16  # cpu.threads_for: streaming work worth one more thread


def _threads(n_tokens: int) -> int:
    return threads_for(n_tokens, _TOKENS_PER_THREAD)


def rollout_correction_fwd(old_logprobs, rollout_logprobs, valid, cu_seqlens, cfg, weights, keep, stats) -> None:
    """old_logprobs, rollout_logprobs ``[N]`` float32/bfloat16/float16 (each its own), valid bool
    ``[N]``, cu_seqlens int64 ``[S + 1]`` (all contiguous), ``cfg``: the op's ``CorrectionConfig``;
    writes weights (fp32 ``[N]``) and keep (bool ``[N]``) for every token of every sequence (others
    left as they are) and stats (fp32 ``[NUM_CORRECTION_STATS]``, ``CorrectionStat`` layout)."""
    n_tokens = valid.numel()
    load(FAMILY).rollout_correction_fwd(
        old=old_logprobs.data_ptr(), old_dtype=dtype_code(old_logprobs, "old_logprobs"),
        rollout=rollout_logprobs.data_ptr(), rollout_dtype=dtype_code(rollout_logprobs, "rollout_logprobs"),
        valid=valid.view(torch.uint8).data_ptr(), n_tokens=n_tokens, cu_seqlens=cu_seqlens.data_ptr(),
        n_seq=cu_seqlens.numel() - 1, level=int(cfg.level), mode=int(cfg.mode), lo=cfg.lo, hi=cfg.hi,
        log_clamp=cfg.log_clamp, has_veto=cfg.has_veto, veto_lo=cfg.veto_lo, veto_hi=cfg.veto_hi,
        weights=weights.data_ptr(), keep=keep.view(torch.uint8).data_ptr(), stats=stats.data_ptr(),
        threads=_threads(n_tokens),
    )  # fmt: skip
