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
``GRPOTrainer`` computes its log-probabilities and entropies inside the model's fused LM head
(``add_fused_lm_head``), which ``patch()`` keeps; the patched ``trl.trainer.utils`` functions
serve TRL's other trainers and user code.

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
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import NamedTuple, Optional

import torch

from lenkernels.integrations import F64, ModulePatch, Replacement, _aggregate, _cast, _exact, _policy_loss, _token_stats
from lenkernels.ops.advantages import group_stats
from lenkernels.ops.phase_stats import sequence_stats
from lenkernels.ops.policy_loss import kl_penalty

__all__ = [
    "selective_log_softmax",
    "entropy_from_logits",
    "selective_log_softmax_and_entropy",
    "grpo_advantages",
    "GRPOLoss",
    "grpo_loss",
    "grpo_compute_loss",
    "LOSS_TYPES",
    "PATCHED_NAMES",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
_IGNORE = -100
# group_stats columns
_COUNT, _MEAN, _STD = 0, 2, 3


# --- token statistics (trl.trainer.utils) ----------------------------------------------------


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
PATCHED_NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy", "_compute_loss")
"""What ``patch()`` replaces: the three ``trl.trainer.utils`` functions and ``GRPOTrainer._compute_loss``."""


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
    return reps + [Replacement(_TRAINER, "_compute_loss", grpo_compute_loss)]


_PATCH = ModulePatch("trl", _replacements)


def _check_exclude(exclude) -> None:
    unknown = set(exclude) - set(PATCHED_NAMES)
    if unknown:
        raise ValueError(f"exclude holds names that patch() does not replace: {sorted(unknown)}")


def patch(exclude=()) -> list[str]:
    """Swaps the lenkernels drop-ins into the installed TRL (this process only).

    Args:
        exclude: names from ``PATCHED_NAMES`` to leave as TRL's.

    Returns:
        The replaced attributes.

    Raises ImportError without TRL, RuntimeError when ``GRPOTrainer`` lacks what
    :func:`grpo_compute_loss` calls (exclude ``"_compute_loss"`` then). Calls nest.
    """
    _check_exclude(exclude)
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
        _check_exclude(exclude)
        self.exclude = tuple(exclude)

    def __enter__(self) -> list[str]:
        return patch(self.exclude)

    def __exit__(self, *exc) -> None:
        unpatch()


def is_patched() -> bool:
    """Whether ``patch()`` is in effect in this process."""
    return _PATCH.active
