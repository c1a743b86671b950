"""TRL drop-ins: ``selective_log_softmax``, ``entropy_from_logits`` and
``selective_log_softmax_and_entropy`` of ``trl.trainer.utils``, the GRPO loss of every
``GRPOTrainer`` loss type (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``,
``luspo``; token and sequence importance sampling) and its advantage scaling (``group``,
``batch``, ``none``), computed by the lenkernels ops (tested with TRL 1.16).

Use one function directly, or swap them into an installed TRL::

    from lenkernels.integrations import trl as lk_trl

    with lk_trl.patched():
        trainer.train()

``patch()`` replaces the three ``trl.trainer.utils`` functions (on every loaded TRL module that
imported them too) and ``GRPOTrainer._compute_loss`` with :func:`grpo_compute_loss`, which runs
the trainer's own forward pass and then computes the loss with :func:`grpo_loss` (one fused
kernel forward, one backward) and logs the metrics TRL logs. Configurations it does not cover
(``loss_type="vespo"``, ``sapo`` with sequence-level importance sampling, the adaptive entropy
controller, ``delta < 1 + epsilon_high``) run TRL's original method. TRL computes the advantages
inline in ``_generate_and_score_completions`` (which also generates and scores), so ``patch()``
leaves them to TRL; :func:`grpo_advantages` gives the same numbers for a subclass or a custom
loop (``multi_objective_aggregation="sum_then_normalize"``, TRL's default). TRL 1.16's
``GRPOTrainer`` (and RLOO, KTO, ...) computes its log-probabilities and entropies inside the
model's fused LM head (``add_fused_lm_head``): ``patch()`` swaps the function that head calls,
``trl.kernels.ChunkedLogProbFunction``, for :class:`ChunkedLogProbFunction`
(``lenkernels.linear_token_stats``: every output TRL asks for, its soft cap and logit scale); the
patched ``trl.trainer.utils`` functions serve TRL's other trainers and user code. TRL's vLLM
importance-sampling correction is inline in ``_generate_and_score_completions`` too: a fork
replaces that block with :func:`vllm_importance_sampling` (every mode, TRL's NaN rule, the five
metrics, one ``lenkernels.rollout_correction`` pass).

Dtypes are TRL's: the token statistics accept float32, bfloat16, float16 and float64 logits and
return float32 where TRL runs its fused Triton kernel (CUDA/XPU tensors of float32/bfloat16/float16
with at most 3 dimensions, unit stride along V, one id per row and a bool/int row mask), the
logits' dtype where it runs its eager path (CPU, float64, top-K ids, ...). They are computed in
float32 and cast (a bfloat16 result is float32 maths rounded once, where TRL's eager path rounds
its log-softmax); float64 logits are computed in float64, through lenkernels' float64 reference
definition, to TRL's digits. The GRPO loss is float32, or float64 when an input is (TRL's
advantages are float32, so its loss is at least float32), computed in float64 then.

Differences, all deliberate:

- With float64 inputs, SAPO's loss uses float64 temperatures; TRL's ``torch.where`` over the two
  Python floats makes them float32 numbers (a relative 4e-8 apart): the exact value wins.
- Inputs TRL's eager path refuses are accepted: an empty batch, int32 ids, a per-token
  temperature tensor, out-of-range ids in masked rows (never read).
- float16/bfloat16 ``selective_log_softmax`` / ``entropy_from_logits`` (and
  ``selective_log_softmax_and_entropy``) compute in float32 and round once, to the correctly
  rounded value, where TRL's eager path rounds every intermediate (log-softmax, exp, sum) to the
  half dtype, an ulp or more away. TRL's own half-precision tests compare against that eager path
  (bit for bit, or to 1e-5), so tests/upstream marks them ``xfail(strict=True)``.
- The fused LM head under autocast with an LM-head bias: the logits are ``F.linear``'s in the
  autocast dtype, the product and the bias summed then rounded once (as the model's own forward
  computes them); TRL's head rounds the product, then the sum (a bfloat16 ulp of a logit apart).
  The head's log-probabilities differ from TRL's by float32 rounding (another summation order).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from lenkernels.integrations import ModulePatch, Replacement, _check_exclude, _export

# The maths lives in private modules: _trl_token_stats (trl.trainer.utils) and _trl_grpo (the
# advantages and the loss). This module re-exports them (as their home: ``__module__``, see the
# end), runs GRPOTrainer._compute_loss on them, and patches TRL.
from lenkernels.integrations._trl_fused_head import ChunkedLogProbFunction
from lenkernels.integrations._trl_grpo import LOSS_TYPES, GRPOLoss, _log_ratio_weights, grpo_advantages, grpo_loss
from lenkernels.integrations._trl_token_stats import (
    entropy_from_logits,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
)
from lenkernels.integrations._trl_vllm_correction import VLLMImportanceSampling, vllm_importance_sampling

__all__ = [
    "selective_log_softmax",
    "entropy_from_logits",
    "selective_log_softmax_and_entropy",
    "ChunkedLogProbFunction",
    "grpo_advantages",
    "GRPOLoss",
    "grpo_loss",
    "grpo_compute_loss",
    "LOSS_TYPES",
    "VLLMImportanceSampling",
    "vllm_importance_sampling",
    "PATCHED_NAMES",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
]


# --- GRPOTrainer._compute_loss ------------------------------------------------------------------

# the keyword inputs TRL 1.16's _compute_loss forwards to _get_per_token_logps_and_entropies
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip
_TRAINER_ATTRS = ("loss_type", "importance_sampling_level", "epsilon_low", "epsilon_high", "beta", "top_entropy_quantile",
                  "off_policy_mask_threshold", "use_vllm", "vllm_importance_sampling_correction", "entropy_coef",
                  "use_adaptive_entropy", "_entropy_bonus_enabled", "aux_loss_enabled", "max_completion_length",
                  "current_gradient_accumulation_steps", "accelerator", "args", "_metrics", "model")  # fmt: skip
_ORIGINAL: dict = {}


def _why_not_fused(trainer) -> Optional[str]:
    """None when :func:`grpo_compute_loss` covers the trainer's configuration, else the reason."""
    missing = [a for a in _TRAINER_ATTRS if not hasattr(trainer, a)]
    if missing:
        return f"trainer lacks {missing}"
    if trainer.loss_type not in LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r}"
    if trainer.importance_sampling_level not in ("token", "sequence"):
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    if trainer.loss_type == "sapo" and trainer.importance_sampling_level == "sequence":
        return "sapo with sequence-level importance sampling"
    if trainer.use_adaptive_entropy:
        return "the adaptive entropy controller"
    delta = getattr(trainer.args, "delta", None)
    if trainer.loss_type != "cispo" and delta is not None and not delta >= 1.0 + trainer.epsilon_high:
        return "delta below 1 + epsilon_high"
    return None


def _original_compute_loss():
    if "compute_loss" in _ORIGINAL:
        return _ORIGINAL["compute_loss"]
    from trl.trainer.grpo_trainer import GRPOTrainer

    method = GRPOTrainer.__dict__["_compute_loss"]
    if method is grpo_compute_loss:
        raise RuntimeError("TRL's original GRPOTrainer._compute_loss is unknown (patched without patch())")
    return method


def grpo_compute_loss(self, model, inputs):
    """``GRPOTrainer._compute_loss`` with the loss from :func:`grpo_loss`: the trainer's own forward
    (``_get_per_token_logps_and_entropies``), top-entropy mask (``get_high_entropy_mask``) and
    off-policy mask (``get_off_policy_mask``), then the fused loss, then the metrics TRL logs
    (``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``, ``policy_loss``, ``aux_loss``,
    ``entropy_coef``). Configurations :func:`grpo_loss` does not cover run TRL's original method.
    ``patch()`` installs it; call it as ``grpo_compute_loss(trainer, model, inputs)`` otherwise."""
    if _why_not_fused(self) is not None:
        return _original_compute_loss()(self, model, inputs)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _FORWARD_KEYS},
    )  # fmt: skip
    entropy_mask = None
    if self.top_entropy_quantile < 1.0:
        entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = inputs.get("old_per_token_logps")
    old = per_token_logps.detach() if old is None else old
    off_policy = None
    if self.off_policy_mask_threshold is not None:
        off_policy = self.get_off_policy_mask(
            advantages=advantages, per_token_logps=per_token_logps,
            sampling_per_token_logps=inputs.get("sampling_per_token_logps", old), mask=mask,
            off_policy_threshold=self.off_policy_mask_threshold,
        )  # fmt: skip
    ratio = inputs["importance_sampling_ratio"] if self.use_vllm and self.vllm_importance_sampling_correction else None
    training = self.model.training
    mode = "train" if training else "eval"
    args = self.args
    out = grpo_loss(
        per_token_logps, old, advantages, mask, loss_type=self.loss_type,
        importance_sampling_level=self.importance_sampling_level, epsilon=self.epsilon_low,
        epsilon_high=self.epsilon_high, delta=getattr(args, "delta", None), beta=self.beta,
        ref_per_token_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        use_bias_correction_kl=getattr(args, "use_bias_correction_kl", True),
        sapo_temperature_pos=getattr(args, "sapo_temperature_pos", 1.0),
        sapo_temperature_neg=getattr(args, "sapo_temperature_neg", 1.05), entropies=entropies,
        entropy_mask=entropy_mask, entropy_coef=self.entropy_coef if self._entropy_bonus_enabled else 0.0,
        importance_sampling_ratio=ratio, off_policy_mask=off_policy,
        num_items_in_batch=inputs.get("num_items_in_batch"), max_completion_length=self.max_completion_length,
        num_processes=self.accelerator.num_processes,
        gradient_accumulation_steps=self.current_gradient_accumulation_steps,
        steps_per_generation=getattr(args, "steps_per_generation", None), training=training,
    )  # fmt: skip
    loss = out.loss
    metrics = self._metrics[mode]
    if self._entropy_bonus_enabled:
        metrics["policy_loss"].append(self.accelerator.gather(out.policy_loss).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * aux_loss / (
            self.current_gradient_accumulation_steps if training else 1.0
        )
        metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    with torch.no_grad():
        _log_metrics(self, metrics, out, per_token_logps.detach(), old, advantages, mask, entropies)
    return loss


def _log_metrics(trainer, metrics, out: GRPOLoss, logps, old, advantages, mask, entropies) -> None:
    """The metrics TRL's ``_compute_loss`` logs, reduced over processes the way it reduces them."""
    from trl.trainer.utils import nanmax, nanmin

    acc = trainer.accelerator
    mask_f = mask.to(torch.float32)

    def global_masked_mean(x):
        if x.shape[1] == 1:  # one value per sequence
            local = torch.stack([x.sum().to(torch.float32), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask_f).sum(), mask_f.sum()])
        totals = acc.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def per_sequence_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask_f).sum(-1) / mask_f.sum(-1)

    if out.per_token_kl is not None:
        metrics["kl"].append(global_masked_mean(out.per_token_kl))
    metrics["entropy"].append(global_masked_mean(entropies))
    if trainer.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo"):
        return
    ratio = _log_ratio_weights(logps, old, mask, trainer.importance_sampling_level == "sequence")
    if trainer.loss_type == "cispo":
        clipped = ((ratio > trainer.epsilon_high) & (advantages > 0)).to(torch.float32)
        metrics["cispo_clip_ratio"].append(global_masked_mean(clipped))
        return
    delta = getattr(trainer.args, "delta", None)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    low = ((ratio < 1 - trainer.epsilon_low) & (advantages < 0)).to(torch.float32)
    high = ((ratio > 1 + trainer.epsilon_high) & (advantages > 0)).to(torch.float32)
    metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
    metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
    metrics["clip_ratio/low_min"].append(nanmin(acc.gather(per_sequence_mean(low))).item())
    metrics["clip_ratio/high_max"].append(nanmax(acc.gather(per_sequence_mean(high))).item())


# --- patching -----------------------------------------------------------------------------------

_UTILS = "trl.trainer.utils"
_TRAINER = "trl.trainer.grpo_trainer.GRPOTrainer"
_KERNELS = "trl.kernels"
PATCHED_NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy", "_compute_loss",
                 "ChunkedLogProbFunction")  # fmt: skip
"""What ``patch()`` replaces: the three ``trl.trainer.utils`` functions, ``GRPOTrainer._compute_loss``
and the fused LM head's ``trl.kernels.ChunkedLogProbFunction`` (every reference to it in TRL)."""


def _check_trainer() -> None:
    """The fused ``_compute_loss`` calls the trainer's own helpers: refuse a TRL whose helpers differ."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    problems = []
    for name in ("_get_per_token_logps_and_entropies", "get_high_entropy_mask", "get_off_policy_mask", "_compute_loss"):
        if not hasattr(GRPOTrainer, name):
            problems.append(f"GRPOTrainer.{name} is missing")
    if not problems:
        params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
        lacking = [k for k in _FORWARD_KEYS + ("compute_entropy", "compute_aux_loss") if k not in params]
        if lacking:
            problems.append(f"GRPOTrainer._get_per_token_logps_and_entropies does not take {lacking}")
    if problems:
        raise RuntimeError(
            "this TRL's GRPOTrainer differs from the one lenkernels' fused loss was written for (TRL 1.16): "
            + "; ".join(problems)
            + ". Pass exclude=('_compute_loss',) to patch only the token statistics."
        )


def _replacements() -> list[Replacement]:
    reps = [Replacement(_UTILS, name, globals()[name]) for name in PATCHED_NAMES[:3]]
    return reps + [Replacement(_TRAINER, "_compute_loss", grpo_compute_loss),
                   Replacement(_KERNELS, "ChunkedLogProbFunction", ChunkedLogProbFunction)]  # fmt: skip


_PATCH = ModulePatch("trl", _replacements)


def patch(exclude=()) -> list[str]:
    """Swaps the lenkernels drop-ins into the installed TRL (this process only).

    Args:
        exclude: names from ``PATCHED_NAMES`` to leave as TRL's.

    Returns:
        The replaced attributes.

    Raises ImportError without TRL, RuntimeError when ``GRPOTrainer`` lacks what
    :func:`grpo_compute_loss` calls (exclude ``"_compute_loss"`` then). Calls nest.
    """
    _check_exclude(exclude, PATCHED_NAMES)
    if "_compute_loss" not in exclude and not _PATCH.active:
        _check_trainer()
        from trl.trainer.grpo_trainer import GRPOTrainer

        _ORIGINAL["compute_loss"] = GRPOTrainer.__dict__["_compute_loss"]
    return _PATCH.apply(exclude)


def unpatch() -> None:
    """Restores TRL's functions and ``GRPOTrainer._compute_loss``."""
    _PATCH.restore()
    if not _PATCH.active:
        _ORIGINAL.clear()


class patched:
    """Context manager: ``with patched(): trainer.train()``."""

    def __init__(self, exclude=()):
        _check_exclude(exclude, PATCHED_NAMES)
        self.exclude = tuple(exclude)

    def __enter__(self) -> list[str]:
        return patch(self.exclude)

    def __exit__(self, *exc) -> None:
        unpatch()


def is_patched() -> bool:
    """Whether ``patch()`` is in effect in this process."""
    return _PATCH.active


_export(globals())
