"""TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) on lenkernels: the function its
forward calls, ``trl.kernels.ChunkedLogProbFunction``, computed by ``lenkernels.linear_token_stats``.

TRL 1.16's trainers (GRPO, RLOO, KTO, ...) patch the policy's forward so that ``model(...,
labels=..., fused_lm_head=True)`` returns per-token statistics instead of logits; the head calls
``_ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
final_logit_softcapping, logit_scale, outputs)`` at each forward, looked up by name, so swapping
that one class moves every trainer's hidden-state path onto lenkernels' kernels.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lenkernels.ops.linear_token_stats import linear_token_stats

# TRL's optional outputs -> the lenkernels output that holds them
_OUTPUTS = {"entropy": "entropy", "log_sum_sq_probs": "sum_p2", "mean_logits": "mean_logit", "is_top1": "argmax"}
OPTIONAL_OUTPUTS = tuple(_OUTPUTS)


class ChunkedLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` (same ``apply`` signature and outputs).

    ``apply`` returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, float32 of
    ``targets.shape`` (``is_top1`` bool), None for the optional ones not in ``outputs``; log-probs
    and entropy are differentiable in ``hidden``, ``weight`` and ``bias``, the other three are not
    (as TRL's). The logits are TRL's: the GEMM in the compute dtype (the autocast dtype when
    autocast is on, else the hidden dtype), then ``* logit_scale``, the soft cap and ``/ temperature``
    in fp32. ``chunk_size`` (TRL's vocabulary tile width) is not needed: lenkernels bounds its
    memory by ``linear_token_stats``' own chunking, and runs the fused GEMM-epilogue kernels when
    only log-probs and entropy of untransformed logits are asked for (GRPO's case).
    """

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ):
        wanted = ("logprob",) + tuple(_OUTPUTS[name] for name in OPTIONAL_OUTPUTS if name in outputs)
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        # TRL casts the weights to the hidden (compute) dtype; the gradients return in theirs
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
        with torch.autocast(device_type, enabled=False) if autocast else nullcontext():
            st = linear_token_stats(hidden, weight, targets, bias=bias, temperature=float(temperature),
                                    outputs=wanted, logit_scale=float(logit_scale),
                                    softcap=final_logit_softcapping, compute_dtype=dtype)  # fmt: skip
        log_sum_sq = None if st.log_sum_p2 is None else st.log_sum_p2.detach()
        mean_logits = None if st.mean_logit is None else st.mean_logit.detach()
        is_top1 = None if st.argmax is None else st.argmax == targets
        return st.logprob, st.entropy, log_sum_sq, mean_logits, is_top1
