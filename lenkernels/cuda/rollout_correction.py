"""Host launcher of the CUDA C++ rollout-correction kernels (``csrc/cuda/rollout_correction.cu``):
the ``backend="cuda"`` implementation of the rollout_correction family (same launcher signature as
the other backends). Under :func:`lenkernels.cuda.host_emulation` it accepts CPU tensors and runs
the kernels' bodies on the host."""

from __future__ import annotations

import torch

from lenkernels._codes import CorrectionCount, CorrectionPartial
from lenkernels.cuda import _as_u8, _dtype_code, _target, load

FAMILY = "rollout_correction"


def rollout_correction_fwd(old_logprobs, rollout_logprobs, valid, cu_seqlens, cfg, weights, keep, stats) -> None:
    """old_logprobs, rollout_logprobs ``[N]`` float32/bfloat16/float16 (each its own, unit stride),
    valid ``[N]`` bool/uint8, cu_seqlens int64 ``[S + 1]``, ``cfg``: the op's ``CorrectionConfig``;
    writes weights (fp32 ``[N]``) and keep (bool ``[N]``) for every token of every sequence (others
    left as they are) and stats (fp32 ``[NUM_CORRECTION_STATS]``, ``CorrectionStat`` layout). Queued
    on the current stream; no host synchronisation."""
    device, _, stream = _target(old_logprobs, "old_logprobs")
    old, rollout = old_logprobs.contiguous(), rollout_logprobs.contiguous()
    valid, cu = _as_u8(valid.contiguous()), cu_seqlens.to(torch.int64).contiguous()
    n_seq = cu.numel() - 1
    # per-sequence sums; freed after the call, their reuse ordered by the stream (caching allocator)
    part = torch.empty((n_seq, CorrectionPartial.NUM_CORRECTION_PARTIALS), dtype=torch.float32, device=valid.device)
    count = torch.empty((n_seq, CorrectionCount.NUM_CORRECTION_COUNTS), dtype=torch.int64, device=valid.device)
    load(FAMILY).rollout_correction_fwd(
        old=old.data_ptr(), old_dtype=_dtype_code(old, "old_logprobs"), rollout=rollout.data_ptr(),
        rollout_dtype=_dtype_code(rollout, "rollout_logprobs"), valid=valid.data_ptr(), n_tokens=valid.numel(),
        cu_seqlens=cu.data_ptr(), n_seq=n_seq, level=int(cfg.level), mode=int(cfg.mode), lo=cfg.lo, hi=cfg.hi,
        log_clamp=cfg.log_clamp, has_veto=cfg.has_veto, veto_lo=cfg.veto_lo, veto_hi=cfg.veto_hi,
        weights=weights.data_ptr(), keep=_as_u8(keep).data_ptr(), part=part.data_ptr(), count=count.data_ptr(),
        stats=stats.data_ptr(), device=device, stream=stream,
    )  # fmt: skip
