"""The GRPO maths of TRL's ``GRPOTrainer``: its advantages (:func:`grpo_advantages`) and its loss
after the forward pass (:func:`grpo_loss`, every loss type). Import them from
:mod:`lenkernels.integrations.trl`, which documents the conventions and the differences."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from lenkernels.integrations import F64, _aggregate, _cast, _exact, _policy_loss
from lenkernels.ops.advantages import group_stats
from lenkernels.ops.policy_loss import kl_penalty
from lenkernels.ops.sequence_stats import sequence_stats

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
# group_stats columns
_COUNT, _MEAN, _STD = 0, 2, 3


# --- advantages ---------------------------------------------------------------------------------


def grpo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str | bool = "group",
    *,
    epsilon: float = 1e-4,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The advantages of TRL's ``GRPOTrainer`` (``multi_objective_aggregation="sum_then_normalize"``).

    ``rewards - mean_g`` (mean of the group of ``num_generations`` consecutive completions),
    divided by ``std + epsilon`` where std is the group's (``scale_rewards="group"``/True) or the
    whole batch's (``"batch"``), or not divided (``"none"``/False). Stds are unbiased. NaN rewards
    (completions no reward function scored) are left out of every mean and std and get advantage
    0, as are groups with fewer than two scored completions when scaling.

    Args:
        rewards: ``[B]`` weighted reward sum per completion (all processes' completions: TRL
            normalises the gathered batch), any float dtype.
        num_generations: the group size G (divides B).
        scale_rewards: ``"group"``, ``"batch"``, ``"none"`` (True/False as TRL's config).
        epsilon: added to the std (TRL: 1e-4).
        backend: for the group statistics kernel.

    Returns:
        float32 ``[B]``.

    Example::

        advantages = grpo_advantages(rewards, num_generations=8, scale_rewards="batch")
    """
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be one of 'batch', 'group' or 'none', got {scale_rewards!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a [B] tensor, got {getattr(rewards, 'shape', type(rewards).__name__)}")
    r = rewards.detach().to(torch.float32)
    scored = ~torch.isnan(r)
    stats, _ = group_stats(r, num_generations, where=scored, backend=backend)
    adv = r - stats[:, 0, _MEAN]
    if scale_rewards != "none":
        if scale_rewards == "batch":
            stats, _ = group_stats(r, max(r.shape[0], 1), where=scored, backend=backend)
        count, std = stats[:, 0, _COUNT], stats[:, 0, _STD]
        # an unbiased std of fewer than two values is undefined: those advantages become 0 below
        std = torch.where(count >= 2, std, torch.full_like(std, float("nan")))
        if scale_rewards == "group" and num_generations == 1:
            std = torch.zeros_like(std)  # TRL's evaluation with one generation per prompt
        adv = adv / (std + epsilon)
    return torch.nan_to_num(adv, nan=0.0)


# --- the GRPO loss ------------------------------------------------------------------------------


class GRPOLoss(NamedTuple):
    """Result of :func:`grpo_loss`."""

    loss: torch.Tensor
    """What TRL backpropagates: scaled for gradient accumulation, minus the entropy bonus."""
    policy_loss: torch.Tensor
    """TRL's ``policy_loss`` (detached): the policy + KL term before the accumulation scaling."""
    entropy_loss: Optional[torch.Tensor]
    """The entropy bonus term (mean entropy over the kept tokens / accumulation steps); None
    without ``entropy_coef``."""
    per_token_kl: Optional[torch.Tensor]
    """The per-token KL TRL logs (times the importance ratio with ``use_bias_correction_kl``),
    detached float32 ``[B, T]`` (float64 for float64 inputs); None when ``beta == 0``."""
    entropy_mask: Optional[torch.Tensor]
    """The top-entropy token mask that was applied (bool ``[B, T]``); None without one."""


def _log_ratio_weights(per_token_logps, old, mask, sequence: bool) -> torch.Tensor:
    """TRL's ``coef_1`` (``exp`` of the token log-ratio, or of its masked mean per sequence),
    differentiable in ``per_token_logps``."""
    log_ratio = per_token_logps - old
    if sequence:
        m = mask.to(log_ratio.dtype)
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    beta: float = 0.0,
    ref_per_token_logps: Optional[torch.Tensor] = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropies: Optional[torch.Tensor] = None,
    entropy_mask: Optional[torch.Tensor] = None,
    top_entropy_quantile: float = 1.0,
    entropy_process_group=None,
    entropy_coef: float = 0.0,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    off_policy_mask: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    max_completion_length: Optional[int] = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: Optional[int] = None,
    training: bool = True,
    backend: Optional[str] = None,
) -> GRPOLoss:
    """The loss of TRL's ``GRPOTrainer`` after its forward pass, with the policy term, clipping,
    KL, weights and aggregation in the fused ``lenkernels.policy_loss`` (one pass each way).

    Per token (``r`` = ``exp(logp - old)``, or the sequence ratio ``exp(mean_t(logp - old))`` with
    ``importance_sampling_level="sequence"``): grpo/bnpo/dr_grpo/dapo/luspo ``-min(r A, clip(r, 1 -
    epsilon, 1 + epsilon_high) A)`` (``delta``: r capped at delta, INTELLECT-2); cispo ``-sg(min(r,
    epsilon_high)) A logp``; sapo ``-sigmoid(tau (r - 1)) 4 / tau A``. Times the off-policy mask, the
    top-entropy mask and the vLLM importance ratio; plus ``beta`` times TRL's k3 KL (times ``r``
    with ``use_bias_correction_kl``). Aggregation by ``loss_type``: grpo/sapo mean over sequences
    of the token mean; bnpo token mean; dr_grpo sum / (B * max_completion_length); dapo/cispo sum /
    (num_items_in_batch / num_processes, rescaled to one accumulation window); luspo mean over
    sequences of the token sum. All but dapo/cispo are divided by the accumulation steps in
    training. Minus ``entropy_coef`` times the mean entropy of the kept tokens.

    Args:
        per_token_logps: ``[B, T]`` float32 log-probabilities of the completion tokens
            (differentiable; e.g. :func:`selective_log_softmax`); bfloat16/float16 are read as
            they are, float64 is computed in float64 (as every float64 input).
        old_per_token_logps: ``[B, T]`` the sampling policy's, or None (on-policy: ``logps.detach()``).
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``.
        mask: ``[B, T]`` completion mask (times the tool mask), 0/1.
        loss_type, importance_sampling_level, epsilon, epsilon_high, delta, beta,
        use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg: GRPOConfig's fields
            (``epsilon_high`` None: ``epsilon``).
        ref_per_token_logps: ``[B, T]``, required when ``beta != 0``.
        entropies: ``[B, T]`` token entropies (for the entropy bonus and the top-entropy mask;
            differentiable).
        entropy_mask: a given top-entropy mask (TRL's ``get_high_entropy_mask``), or
        top_entropy_quantile: rho < 1 computes it here (the ``1 - rho`` quantile of the masked
            entropies, over ``entropy_process_group`` when given, as TRL's gather).
        entropy_coef: weight of the entropy bonus.
        importance_sampling_ratio: vLLM correction ``[B, T]`` or ``[B, 1]``; off_policy_mask:
            ``[B, 1]`` (TRL's ``get_off_policy_mask``).
        num_items_in_batch: dapo/cispo normaliser (tokens of the generation batch, all
            processes); max_completion_length: dr_grpo's constant; num_processes,
            gradient_accumulation_steps, steps_per_generation (None: the accumulation steps),
            training: the trainer's state.
        backend: for the lenkernels ops.

    Returns:
        :class:`GRPOLoss`: float32 tensors (float64 when an input is float64).

    Raises:
        NotImplementedError: ``sapo`` with sequence-level ratios, or ``delta < 1 + epsilon_high``
        (TRL's original handles those).

    Example (padded completions)::

        logps, ent = selective_log_softmax_and_entropy(logits, completion_ids)
        out = grpo_loss(logps, old_logps, advantages, completion_mask, loss_type="dapo",
                        num_items_in_batch=completion_mask.sum(), entropies=ent)
        out.loss.backward()
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (vespo stays TRL's), got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"Unknown importance sampling level: {importance_sampling_level}. Possible values are 'token' and 'sequence'."
        )
    if per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps must be [B, T], got shape {tuple(per_token_logps.shape)}")
    sequence = importance_sampling_level == "sequence"
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    lp = per_token_logps
    old = lp.detach() if old_per_token_logps is None else old_per_token_logps
    n_seqs = lp.shape[0]
    gas = gradient_accumulation_steps if training else 1
    # float64 inputs: TRL computes in float64, and so do we (the float64 reference definitions)
    exact = _exact(lp, old, advantages, mask, importance_sampling_ratio, ref_per_token_logps if beta != 0.0 else None,
                   entropies if entropy_coef != 0.0 else None)  # fmt: skip
    work = F64 if exact else torch.float32

    if entropy_mask is None and top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("entropies are required for top_entropy_quantile < 1")
        stats_backend = "reference" if entropies.dtype == F64 else backend  # the kernels take no float64
        entropy_mask = sequence_stats(entropies.detach(), mask, top_entropy_quantile=top_entropy_quantile,
                                      process_group=entropy_process_group,
                                      backend=stats_backend).high_entropy_mask  # fmt: skip

    weights = []  # everything TRL multiplies the policy term by
    for w in (off_policy_mask, entropy_mask, importance_sampling_ratio):
        if w is not None:
            weights.append(w.detach().to(work))

    kw: dict = {}
    if loss_type == "sapo":
        if sequence:
            raise NotImplementedError("sapo with importance_sampling_level='sequence' has no fused form yet")
        mode = "sapo"
        kw.update(tau_pos=float(sapo_temperature_pos), tau_neg=float(sapo_temperature_neg))
    elif loss_type == "cispo":
        if not sequence and eps_high >= 1.0:
            # TRL's bound r <= epsilon_high is the fused clip [1 - 1, 1 + (epsilon_high - 1)]
            mode = "cispo"
            kw.update(clip_low=1.0, clip_high=eps_high - 1.0)
        else:  # a ratio bound below 1, or the sequence ratio: the clipped ratio is a detached weight
            mode = "reinforce"
            with torch.no_grad():
                weights.append(_log_ratio_weights(lp.detach(), old, mask, sequence).clamp(max=eps_high))
    else:
        if delta is not None and not float(delta) >= 1.0 + eps_high:
            raise NotImplementedError(
                f"delta={delta} below 1 + epsilon_high has no fused form (it is a dual clip above)"
            )
        mode = "gspo" if sequence else "ppo"
        kw.update(clip_low=eps_low, clip_high=eps_high, clip_dual=None if delta is None else float(delta))

    divisor = gas  # TRL divides every loss type but dapo/cispo by the accumulation steps
    if loss_type in ("grpo", "sapo"):
        agg = {"agg": "seq-mean-token-mean", "num_seqs": n_seqs}
    elif loss_type == "bnpo":
        agg = {"agg": "token-mean"}
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        agg = {"agg": "seq-mean-token-sum-norm", "num_seqs": n_seqs, "norm_length": float(max_completion_length)}
    elif loss_type == "luspo":
        agg = {"agg": "seq-mean-token-sum", "num_seqs": n_seqs}
    else:  # dapo, cispo: a global token count, rescaled to one accumulation window
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={loss_type!r} needs num_items_in_batch")
        if isinstance(num_items_in_batch, torch.Tensor):
            normaliser = num_items_in_batch.detach().to(lp.device, work).clamp(min=1.0).reshape(1)
        else:
            normaliser = max(float(num_items_in_batch), 1.0)
        normaliser = normaliser / num_processes
        if training:
            normaliser = (
                normaliser * gradient_accumulation_steps / (steps_per_generation or gradient_accumulation_steps)
            )
        agg = {"agg": "token-mean", "num_tokens": normaliser}
        divisor = 1

    weight = None
    for w in weights:
        weight = w if weight is None else weight * w
    if weight is not None:
        weight = weight.expand_as(lp)
        if mode == "gspo":
            # TRL weights the sequence term L_b(s_b) token by token, so d/d logp_t gets the
            # sequence's mean weight; the fused token form gives token t its own weight. Their
            # masked mean per sequence gives both the same value and the same gradient.
            valid = mask != 0
            kept = torch.where(valid, weight, torch.zeros_like(weight))
            weight = (kept.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)).expand_as(lp)

    per_token_kl = None
    kl_term = None
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("ref_per_token_logps is required when beta != 0")
        if use_bias_correction_kl:
            # DeepSeek-V3.2's unbiased KL: the estimate times the (differentiable) ratio
            kl = _k3(lp, ref_per_token_logps, exact, backend)
            kl = kl * _log_ratio_weights(lp, old, mask, sequence)
            kl_term = _aggregate(kl, mask, exact=exact, **agg)
            per_token_kl = kl.detach()
        else:
            kw.update(ref_logprobs=ref_per_token_logps, kl_coef=float(beta), kl_estimator="k3", kl_clamp=False)
            with torch.no_grad():
                per_token_kl = _k3(lp.detach(), ref_per_token_logps, exact, backend)

    out = _policy_loss(lp, old, advantages, mask, mode=mode, importance_weights=weight, backend=backend, exact=exact,
                       **agg, **kw)  # fmt: skip
    loss = _cast(out.loss.clone(), work)  # a fresh tensor: in-place updates must not reach a saved output
    if kl_term is not None:
        loss = loss + float(beta) * kl_term
    policy = loss.detach()
    if divisor != 1:
        loss = loss / divisor

    entropy_loss = None
    if entropy_coef != 0.0:
        if entropies is None:
            raise ValueError("entropies are required for entropy_coef != 0")
        kept = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = _aggregate(entropies, kept, agg="token-mean", exact=exact) / gas
        loss = loss - float(entropy_coef) * entropy_loss
    return GRPOLoss(loss, policy, entropy_loss, per_token_kl, entropy_mask)


def _k3(lp: torch.Tensor, ref: torch.Tensor, exact: bool, backend) -> torch.Tensor:
    """TRL's unclamped k3 per token: float32 from the kernel, float64 for float64 inputs."""
    if exact:
        from lenkernels.reference.policy_loss import kl_penalty as reference_kl

        return reference_kl(lp.to(F64), ref.detach().to(F64), "k3", clamp=False)
    return kl_penalty(lp, ref, "k3", clamp=False, backend=backend)
