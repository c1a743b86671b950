"""verl drop-ins: the token statistics, KL, aggregation, policy losses and outcome advantages of
verl (``verl.utils.torch_functional`` and ``verl.trainer.ppo.core_algos``, tested with verl 0.9.1)
with verl's signatures and return conventions, computed by the lenkernels ops.

Use one function directly, or swap them all into an installed verl::

    from lenkernels.integrations import verl as lk_verl

    lk_verl.patch()          # every process that computes losses: verl's Ray workers included
    ...                      # verl now runs lenkernels' kernels
    lk_verl.unpatch()

For a verl training run the swap is one command-line override: Ray then calls ``patch()`` in
every worker process before any actor is built::

    python -m verl.trainer.main_ppo ... \
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=lenkernels.integrations.verl.patch

(``ray.init(runtime_env={"worker_process_setup_hook": "lenkernels.integrations.verl.patch"})`` in
a custom driver). ``patch()`` replaces the functions on their modules, on every loaded verl module
that imported them with ``from ... import``, and in ``POLICY_LOSS_REGISTRY`` /
``ADV_ESTIMATOR_REGISTRY``. verl captures ``entropy_from_logits`` when an actor engine is built
(``torch.compile`` of it), so the patch must come before that, as the setup hook does.

What is covered (``PATCHED_NAMES``): ``logprobs_from_logits``, ``entropy_from_logits``,
``entropy_from_logits_with_chunking``, ``kl_penalty``, ``agg_loss``; the policy losses
``vanilla``, ``gspo``, ``sapo``, ``gpg``, ``geo_mean``, ``cispo`` (plus
``compute_policy_loss_reinforce``, which ``bypass_mode`` calls); the outcome advantages ``grpo``,
``grpo_vectorized``, ``rloo``, ``rloo_vectorized``, ``reinforce_plus_plus_baseline``, ``opo``,
``grpo_passk`` and ``gpg``. verl's other registry entries (``dppo_tv``, ``dppo_kl``, ``clip_cov``,
``kl_cov``, ``dro``, ``bypass_mode``'s own wrapper, ``gae``, ``remax``, ``reinforce_plus_plus``,
``gdpo``, the optimal-token baselines) stay verl's.

Conventions kept: shapes, tuples, the metric dicts (Python floats, one host sync per loss call,
as verl's ``.item()`` calls), defaults, the errors verl raises for missing global normalisers, and
the dtypes: every drop-in accepts float32, bfloat16, float16 and float64 inputs and returns the
dtype verl's code returns for them (``logprobs_from_logits``: float32 on CUDA where verl uses
flash-attn's cross-entropy, else the logits' dtype; ``entropy_from_logits``: the logits' dtype;
``entropy_from_logits_with_chunking``: float32; losses, KL and advantages: verl's type promotion
of its arithmetic, e.g. a bfloat16 loss matrix aggregated under a float mask is float32). The
kernels compute in float32 and the result is cast (so a bfloat16 result is float32 maths rounded
once, where verl rounds every intermediate); float64 inputs are computed in float64, through
lenkernels' float64 reference definitions, to float64 precision.
Differences, all deliberate:

- ``agg_loss`` over an all-masked (or empty) batch gives 0 where verl divides 0 by 0 (NaN:
  ``token-mean``, and the seq-mean modes without ``global_batch_size``); the mask must hold 0/1
  (a weighting belongs in ``rollout_is_weights``). The policy losses aggregate the same way.
- The ``ppo_kl`` metric of ``vanilla``/``sapo``/``cispo`` is the unclamped mean of
  ``old - new`` (verl clamps the log-ratio to +-20 first; they differ only beyond that).
- A GRPO group whose scores are all equal gets exactly 0 (verl divides a rounding residue by eps).
- float64 inputs get the exact float64 value where verl mixes float32 numbers into its float64
  arithmetic (``grpo``'s std 1 of a group of one, plus eps; ``grpo_vectorized``'s group means
  and stds; the whitening's Bessel factor of an integer or float32 mask's count) or adds 1e-8 to
  counts (``seq-mean-token-mean``, ``geo_mean``, whitening means): a relative 1e-8 to 1e-7 apart.
- An empty vocabulary (``V = 0``) is a ValueError (verl's entropy of no logits is -inf).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Optional

import numpy as np
import torch

from lenkernels import _checks
from lenkernels.integrations import (
    F64,
    ModulePatch,
    Replacement,
    _aggregate,
    _cast,
    _divided,
    _exact,
    _policy_loss,
    _promote,
    _scalar_shape,
    _token_stats,
)
from lenkernels.ops.advantages import group_advantages
from lenkernels.ops.policy_loss import PolicyLoss
from lenkernels.ops.policy_loss import kl_penalty as _lk_kl_penalty

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "agg_loss",
    "compute_policy_loss_vanilla",
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
    "compute_policy_loss_gpg",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_cispo",
    "compute_policy_loss_reinforce",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "POLICY_LOSSES",
    "ADVANTAGE_ESTIMATORS",
    "PATCHED_NAMES",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
]

_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_NAMES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


# --- token statistics (verl.utils.torch_functional) ------------------------------------------


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


# --- KL and aggregation (verl.trainer.ppo.core_algos) ----------------------------------------


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty``: per-token KL estimate of ``logprob`` against ``ref_logprob``.

    Args:
        logprob, ref_logprob: the same shape (``[B, T]`` padded or ``[N]`` packed), float32,
            bfloat16, float16 or float64; both differentiable.
        kl_penalty: ``"kl"``/``"k1"``, ``"abs"``, ``"mse"``/``"k2"``, ``"low_var_kl"``/``"k3"``
            (clamped as verl: delta to [-20, 20], value to [-10, 10]); a trailing ``"+"`` keeps the
            value and takes the gradient of k2. Anything else raises ``NotImplementedError``, as
            verl does (``"full"`` included).

    Returns:
        a tensor of ``logprob.shape`` in the promoted dtype of the inputs, as verl's (computed in
        float32, or in float64 when an input is float64).

    Example: ``kld = kl_penalty(log_prob, ref_log_prob, "low_var_kl")``.
    """
    if not isinstance(kl_penalty, str):
        raise TypeError(f"kl_penalty must be a str, got {type(kl_penalty).__name__}")
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base not in _KL_NAMES:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not implemented; use one of {_KL_NAMES} (+)")
    if not (isinstance(logprob, torch.Tensor) and isinstance(ref_logprob, torch.Tensor)):
        return _lk_kl_penalty(logprob, ref_logprob, kl_penalty, clamp=True)  # raises the op's TypeError
    if _exact(logprob, ref_logprob):
        from lenkernels.reference.policy_loss import kl_penalty as reference_kl

        _checks.same_device(logprob, "logprob", ref_logprob, "ref_logprob")
        if tuple(logprob.shape) != tuple(ref_logprob.shape):
            raise ValueError(
                f"ref_logprob must have the shape of logprob {tuple(logprob.shape)}, got {tuple(ref_logprob.shape)}"
            )
        kl = reference_kl(logprob.to(F64), ref_logprob.to(F64), kl_penalty, clamp=True)
    else:
        kl = _lk_kl_penalty(logprob, ref_logprob, kl_penalty, clamp=True)
    return _cast(kl, _promote(logprob.dtype, ref_logprob.dtype))


def _as_count(value, device) -> Any:
    """A verl global normaliser (int, float or tensor) in the form policy_loss takes."""
    if value is None or not isinstance(value, torch.Tensor):
        return value
    return value.detach().reshape(1).to(device)


def _agg_kwargs(loss_agg_mode: str, device, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                loss_scale_factor=None) -> dict:  # fmt: skip
    """verl's ``agg_loss`` normalisers as ``policy_loss`` arguments (verl raises the same errors)."""
    if isinstance(dp_size, torch.Tensor):
        dp_size = int(dp_size)
    if loss_agg_mode not in _AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    kw: dict = {"agg": loss_agg_mode, "dp_size": int(dp_size)}
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        kw["num_tokens"] = _as_count(batch_num_tokens, device)
    elif loss_agg_mode.startswith("seq-mean"):
        if global_batch_size is None and dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        kw["num_seqs"] = _as_count(global_batch_size, device)
        if loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
            kw["norm_length"] = float(loss_scale_factor)
    return kw


def _agg_result(loss_dtype: torch.dtype, mask: torch.Tensor, loss_agg_mode: str, batch_num_tokens=None,
                global_batch_size=None) -> tuple[torch.dtype, tuple]:  # fmt: skip
    """The dtype and shape of verl's ``agg_loss`` result, by torch's promotion of its arithmetic:
    ``loss_mat * loss_mask`` (so a float mask promotes a bfloat16 loss); the seq-mean modes divide
    by float32 counts; a tensor normaliser promotes (and, with dimensions, broadcasts) the result."""
    p = _promote(loss_dtype, mask.dtype)
    if loss_agg_mode == "token-mean":
        return _divided(p, batch_num_tokens), _scalar_shape(batch_num_tokens)
    if loss_agg_mode == "token-sum":
        return p, ()
    q = _promote(p, torch.float32)  # seq_mask = (...).float()
    return _divided(q, global_batch_size), _scalar_shape(global_batch_size)


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
) -> torch.Tensor:
    """verl's ``agg_loss``: a ``[B, T]`` loss matrix reduced to the scalar loss, in one fused pass.

    Args:
        loss_mat: ``[B, T]`` float32/bfloat16/float16/float64 per-token values (entropy, KL,
            ...), differentiable; masked positions may hold anything. ``[N]`` counts as one sequence.
        loss_mask: ``[B, T]`` 0/1 (bool, int or float).
        loss_agg_mode: ``"token-mean"`` (sum / token count), ``"token-sum"``,
            ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"`` (over sequences with a token),
            ``"seq-mean-token-sum-norm"`` (divided by ``loss_scale_factor``, default T).
        dp_size: data-parallel size; the loss is multiplied by it. With ``dp_size > 1`` the global
            ``batch_num_tokens`` (token-mean) / ``global_batch_size`` (seq-mean-*) are required.
        batch_num_tokens, global_batch_size: global normalisers (int or one-element tensor).
        loss_scale_factor: the constant of ``seq-mean-token-sum-norm``.

    Returns:
        0-dim tensor in verl's dtype (``loss_mat * loss_mask`` promoted, float32 at least for the
        seq-mean modes; see :func:`_agg_result`): computed in float32, or in float64 when an input
        is float64. An empty ``loss_mat`` gives 0.

    Example: ``entropy_loss = agg_loss(entropy, response_mask, "token-mean", **config.global_batch_info)``.
    """
    kw = _agg_kwargs(loss_agg_mode, loss_mat.device, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    dtype, shape = _agg_result(loss_mat.dtype, loss_mask, loss_agg_mode, batch_num_tokens, global_batch_size)
    return _cast(_aggregate(loss_mat, loss_mask, **kw), dtype, shape)


# --- policy losses (core_algos POLICY_LOSS_REGISTRY) -----------------------------------------


def _cfg(config, name: str, default=None):
    """``config.name`` for verl's ActorConfig, an omegaconf DictConfig or a plain object."""
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(name, default)
        except (KeyError, AttributeError):
            return default
    return getattr(config, name, default)


def _require(config, loss: str):
    if config is None:
        raise ValueError(f"policy loss {loss!r} needs config (verl's ActorConfig), got None")
    return config


def _clip_ratios(config) -> tuple[float, float]:
    clip = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low")
    high = _cfg(config, "clip_ratio_high")
    return float(clip if low is None else low), float(clip if high is None else high)


_BATCH_INFO = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def _batch_info(config) -> dict:
    """``config.global_batch_info`` (verl's actor fills it each step): the agg_loss arguments."""
    info = _cfg(config, "global_batch_info", None) or {}
    return {k: info[k] for k in _BATCH_INFO if k in info}


def _floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """verl's metric dicts hold Python floats: one device-to-host copy for all of them."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].detach().to(F64).reshape(()) for k in keys]).tolist() if keys else []
    out = {k: (0.0 if isinstance(v, torch.Tensor) else float(v)) for k, v in metrics.items()}  # verl's key order
    out.update(zip(keys, values))
    return out


def _fresh(loss: torch.Tensor, like: tuple[torch.dtype, tuple]) -> torch.Tensor:
    """The loss in verl's dtype and shape ``like``, as a fresh tensor: verl adds the entropy and KL
    terms to the policy loss in place (``policy_loss -= ...``), which must not reach a tensor the
    op's backward saved."""
    dtype, shape = like
    return _cast(loss.clone() if loss.dtype == dtype else loss, dtype, shape)


def _loss(mode: str, old_log_prob, log_prob, advantages, response_mask, agg: str, config, rollout_is_weights,
          loss_terms, **kw) -> tuple[PolicyLoss, tuple[torch.dtype, tuple]]:  # fmt: skip
    """The fused loss, and the dtype and shape of verl's: its per-token loss has the promoted dtype
    of ``loss_terms`` (the tensors verl's formula multiplies), then ``agg_loss`` promotes it."""
    info = _batch_info(config)
    agg_kw = _agg_kwargs(agg, log_prob.device, **info)
    out = _policy_loss(log_prob, old_log_prob, advantages, response_mask, mode=mode,
                       importance_weights=rollout_is_weights,
                       exact=_exact(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights),
                       **agg_kw, **kw)  # fmt: skip
    like = _agg_result(_promote(*[t.dtype for t in loss_terms if t is not None]), response_mask, agg,
                       info.get("batch_num_tokens"), info.get("global_batch_size"))  # fmt: skip
    return out, like


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``vanilla`` policy loss (dual-clip PPO), fused: one pass forward and backward.

    Args:
        old_log_prob, log_prob: ``[B, T]`` float32 (bfloat16, float16, float64 too; ``log_prob``
            differentiable).
        advantages: ``[B, T]`` per token (``[B]`` per sequence also accepted).
        response_mask: ``[B, T]`` 0/1.
        loss_agg_mode: see :func:`agg_loss`; ``config.global_batch_info`` supplies ``dp_size``,
            ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``.
        config: verl ActorConfig: ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
            ``clip_ratio_c`` (dual clip, default 3.0, must be > 1).
        rollout_is_weights: ``[B, T]`` rollout-correction weights multiplying the policy term.

    Returns:
        ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``: a 0-dim
        tensor in verl's dtype (float32 for float32 inputs) and Python floats.

    Example (what verl's actor does)::

        pg_loss, metrics = get_policy_loss_fn("vanilla")(old_log_prob, log_prob, advantages,
                                                         response_mask, "token-mean", actor_config)
    """
    config = _require(config, "vanilla")
    low, high = _clip_ratios(config)
    dual = float(_cfg(config, "clip_ratio_c", 3.0))
    if not dual > 1.0:
        raise ValueError(f"clip_ratio_c (the dual-clip bound) must be > 1.0, got {dual}")
    out, like = _loss("ppo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, (log_prob, old_log_prob, advantages, rollout_is_weights),
                      clip_low=low, clip_high=high, clip_dual=dual)  # fmt: skip
    metrics = _floats({
        "actor/pg_clipfrac": out.clip_frac_low + out.clip_frac_high,
        "actor/ppo_kl": out.approx_kl,
        "actor/pg_clipfrac_lower": out.clip_frac_dual,
    })  # fmt: skip
    return _fresh(out.loss, like), metrics


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``gspo`` loss: the sequence ratio ``exp(mean_t (log_prob - old))`` in its token form,
    PPO-clipped with ``config.clip_ratio_low/high`` (no dual clip), aggregated by
    ``loss_agg_mode``. Arguments and return as :func:`compute_policy_loss_vanilla`
    (``actor/pg_clipfrac_lower`` is 0, as verl's). Example: ``get_policy_loss_fn("gspo")(...)``."""
    config = _require(config, "gspo")
    low, high = _clip_ratios(config)
    out, like = _loss("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, (log_prob, old_log_prob, advantages, rollout_is_weights),
                      clip_low=low, clip_high=high)  # fmt: skip
    metrics = _floats({
        "actor/pg_clipfrac": out.clip_frac_low + out.clip_frac_high,
        "actor/ppo_kl": out.approx_kl,
        "actor/pg_clipfrac_lower": 0.0,
    })  # fmt: skip
    return _fresh(out.loss, like), metrics


def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``sapo`` loss: ``-sigmoid(tau (r - 1)) 4/tau A`` with ``config.tau_pos`` (A > 0) /
    ``config.tau_neg``, always aggregated ``seq-mean-token-mean`` (verl ignores
    ``loss_agg_mode`` here). Arguments and return as :func:`compute_policy_loss_vanilla`; both clip
    fractions are 0. Example: ``get_policy_loss_fn("sapo")(...)``."""
    config = _require(config, "sapo")
    out, like = _loss("sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                      rollout_is_weights, (log_prob, old_log_prob, advantages, rollout_is_weights),
                      tau_pos=float(_cfg(config, "tau_pos", 1.0)),
                      tau_neg=float(_cfg(config, "tau_neg", 1.05)))  # fmt: skip
    metrics = _floats({"actor/pg_clipfrac": 0.0, "actor/ppo_kl": out.approx_kl, "actor/pg_clipfrac_lower": 0.0})
    return _fresh(out.loss, like), metrics


def compute_policy_loss_gpg(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``gpg`` loss ``-A log_prob`` (REINFORCE), aggregated by ``loss_agg_mode``; returns
    ``(pg_loss, {})`` like verl. Example: ``get_policy_loss_fn("gpg")(...)``."""
    config = _require(config, "gpg")
    out, like = _loss("reinforce", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, (log_prob, advantages, rollout_is_weights))  # fmt: skip
    return _fresh(out.loss, like), {}


def compute_policy_loss_reinforce(
    rollout_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-sum",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_reinforce`` (what ``bypass_mode`` dispatches to):
    ``-w A log_prob`` with the rollout weights ``w``, aggregated by ``loss_agg_mode``; returns
    ``(pg_loss, {"actor/ppo_kl": mean(rollout - new)})``.
    Example: ``compute_policy_loss_reinforce(rollout_lp, lp, adv, mask, config=actor_config)``."""
    config = _require(config, "reinforce")
    out, like = _loss("reinforce", rollout_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, (log_prob, advantages, rollout_is_weights))  # fmt: skip
    return _fresh(out.loss, like), _floats({"actor/ppo_kl": out.approx_kl})


def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``geo_mean`` (GMPO) loss: per sequence ``-mean_t(A) exp(mean_t clipped log-ratio)``
    (sign-aware clip of the log-ratio to ``[-clip_ratio_low, clip_ratio_high]``; rollout weights
    by their geometric mean), averaged over all B sequences (verl ignores ``loss_agg_mode`` and the
    global batch info here). Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"})`` where the fractions count tokens whose log-ratio lies outside
    the band with A > 0 / A < 0 (verl's definition). Example: ``get_policy_loss_fn("geo_mean")(...)``."""
    config = _require(config, "geo_mean")
    low, high = _clip_ratios(config)
    exact = _exact(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights)
    work = F64 if exact else torch.float32
    adv = advantages
    if rollout_is_weights is not None:
        # verl multiplies each sequence's loss by the geometric mean of its weights; a positive
        # factor per sequence is the same as scaling that sequence's advantages by it (the signs,
        # which steer GMPO's clip, are kept), which every backend computes alike (the CPU kernel
        # drops GMPO's importance weights at the time of writing)
        with torch.no_grad():
            valid = (response_mask != 0).to(work)
            log_w = torch.where(valid > 0, torch.log(rollout_is_weights.to(work) + 1e-10), 0.0)
            seq_w = torch.exp(log_w.sum(-1) / (valid.sum(-1) + 1e-8))
        adv = advantages * (seq_w if advantages.dim() == 1 else seq_w[:, None])
    out = _policy_loss(log_prob, old_log_prob, adv, response_mask, mode="gmpo", clip_low=low, clip_high=high,
                       agg="seq-mean-token-mean", num_seqs=log_prob.shape[0], exact=exact)  # fmt: skip
    # verl's dtype: its per-sequence means divide by ``response_mask.sum(-1) + 1e-8`` (float32 for
    # a bool/int mask) and it returns their plain mean, not agg_loss
    mask_sum = response_mask.dtype if response_mask.is_floating_point() else torch.float32
    dtype = _promote(log_prob.dtype, old_log_prob.dtype, advantages.dtype, response_mask.dtype, mask_sum,
                     None if rollout_is_weights is None else rollout_is_weights.dtype)  # fmt: skip
    with torch.no_grad():
        # verl counts a token as clipped when its log-ratio leaves the band, on either side; the
        # fused op's clip fractions count only the side that binds, so these two are computed here
        valid = response_mask != 0
        log_ratio = log_prob.detach() - old_log_prob
        outside = valid & ((log_ratio < -low) | (log_ratio > high))
        count = valid.sum() + 1e-8
        adv = advantages.reshape(-1, 1) if advantages.dim() == 1 else advantages
        high_frac = (outside & (adv > 0)).sum() / count
        low_frac = (outside & (adv < 0)).sum() / count
    metrics = _floats(
        {"actor/pg_clipfrac": high_frac, "actor/ppo_kl": out.approx_kl, "actor/pg_clipfrac_lower": low_frac}
    )
    return _fresh(out.loss, (dtype, ())), metrics


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``cispo`` loss ``-sg(clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) A log_prob``,
    aggregated by ``loss_agg_mode``; ``actor/pg_clipfrac`` is the fraction of tokens whose ratio
    was clipped (either side), ``actor/pg_clipfrac_lower`` 0. Arguments and return as
    :func:`compute_policy_loss_vanilla`. Example: ``get_policy_loss_fn("cispo")(...)``."""
    config = _require(config, "cispo")
    low, high = _clip_ratios(config)
    out, like = _loss("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, (log_prob, old_log_prob, advantages, rollout_is_weights),
                      clip_low=low, clip_high=high)  # fmt: skip
    metrics = _floats({
        "actor/pg_clipfrac": out.clip_frac_low + out.clip_frac_high,
        "actor/ppo_kl": out.approx_kl,
        "actor/pg_clipfrac_lower": 0.0,
    })  # fmt: skip
    return _fresh(out.loss, like), metrics


POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "geo_mean": compute_policy_loss_geo_mean,
    "cispo": compute_policy_loss_cispo,
}
"""verl registry name -> drop-in (``patch()`` puts these into ``POLICY_LOSS_REGISTRY``)."""


# --- outcome advantages (core_algos ADV_ESTIMATOR_REGISTRY) -----------------------------------


def _groups(index, n: int, device) -> tuple[torch.Tensor, np.ndarray]:
    """verl's ``index`` (numpy array of uid strings, ints, a list or a tensor) -> (group ids
    int64 ``[B]`` on ``device``, the size of each response's group on the host). The labels live
    on the host, so their factorisation costs no device sync."""
    if isinstance(index, torch.Tensor) and not index.is_floating_point() and not index.is_complex():
        labels = index.detach().cpu().reshape(-1).numpy()
    else:
        labels = np.asarray(index if not isinstance(index, torch.Tensor) else index.detach().cpu().numpy())
        labels = labels.reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"index must hold one group label per response ({n}), got {labels.shape[0]}")
    try:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    except TypeError:  # mixed label types: compare them as strings
        _, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return _to_device(torch.from_numpy(inverse), device), counts[inverse]


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Host data to ``device`` without waiting for the GPU's queue (pinned, asynchronous copy)."""
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _group_advantages(rewards: torch.Tensor, ids: torch.Tensor, method: str, eps: float, mask, **kw) -> torch.Tensor:
    """``group_advantages`` (float32), or for float64 rewards its float64 reference definition
    (verl then computes in float64)."""
    if isinstance(rewards, torch.Tensor) and rewards.dtype == F64:
        from lenkernels.reference.advantages import group_advantages as reference

        if rewards.dim() != 2 or mask is None or tuple(mask.shape) != tuple(rewards.shape):
            raise ValueError(
                f"token_level_rewards and response_mask must be [B, T] of one shape, got "
                f"{tuple(rewards.shape)} and {None if mask is None else tuple(mask.shape)}"
            )
        return reference(rewards, ids, method, eps=eps, mask=mask, dtype=F64, **kw)
    return group_advantages(rewards, ids, method=method, eps=eps, mask=mask, **kw)


def _adv_dtype(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *extra) -> torch.dtype:
    """verl's advantage dtype: the scores (the rewards' dtype, and ``extra`` where verl mixes in
    other tensors) times ``response_mask``, promoted."""
    return _promote(token_level_rewards.dtype, *extra, response_mask.dtype)


def _outcome(token_level_rewards, response_mask, index, method: str, eps: float, **kw) -> torch.Tensor:
    ids, _ = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv = _group_advantages(token_level_rewards, ids, method, eps, response_mask, **kw)
    return _cast(adv, _adv_dtype(token_level_rewards, response_mask))


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO outcome advantage without the Python loop over responses.

    Args:
        token_level_rewards: ``[B, T]``; the score of a response is the sum over all positions.
        response_mask: ``[B, T]`` 0/1.
        index: ``[B]`` group label per response (verl's ``uid`` strings, any order).
        epsilon: added to the group std.
        norm_adv_by_std_in_grpo: ``(s - mean_g) / (std_g + epsilon)``; False: ``s - mean_g``
            (Dr. GRPO). Groups of one: mean 0, std 1 (verl's convention).
        config: unused (verl's signature).

    Returns:
        ``(advantages, returns)``: the same ``[B, T]`` tensor twice (zero where masked), in verl's
        dtype (the rewards' times the mask's, promoted); computed in float32, or in float64 for
        float64 rewards.

    Example: ``adv, ret = compute_grpo_outcome_advantage(token_level_rewards, response_mask, uid)``.
    """
    adv = _outcome(
        token_level_rewards, response_mask, index, "grpo", epsilon, norm_by_std=bool(norm_adv_by_std_in_grpo)
    )
    return adv, adv


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``grpo_vectorized``: the same numbers as :func:`compute_grpo_outcome_advantage`, in
    that estimator's dtype (its group statistics are float32: at least float32)."""
    adv, _ = compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo)
    adv = _cast(adv, _adv_dtype(token_level_rewards, response_mask, torch.float32))
    return adv, adv


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's RLOO: ``s - mean of the other members`` (a group of one keeps its score); arguments
    and return as :func:`compute_grpo_outcome_advantage`. Example: ``get_adv_estimator_fn("rloo")(...)``."""
    adv = _outcome(token_level_rewards, response_mask, index, "rloo", epsilon)
    return adv, adv


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``rloo_vectorized``: RLOO, except that a group of one gets 0 (not its score). Its
    dtype: verl's ``torch.bincount`` of the scores is float64 for bfloat16/float16 rewards."""
    ids, sizes = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv = _group_advantages(token_level_rewards, ids, "rloo", epsilon, response_mask)
    if (sizes == 1).any():  # host-side labels: no device sync
        single = _to_device(torch.from_numpy(sizes == 1), adv.device)
        adv = torch.where(single[:, None], torch.zeros_like(adv), adv)
    # (the bincount of no responses is int64: the rewards' dtype then)
    half = token_level_rewards.dtype not in (torch.float32, F64) and token_level_rewards.shape[0] > 0
    binned = F64 if half else token_level_rewards.dtype
    adv = _cast(adv, _adv_dtype(token_level_rewards, response_mask, binned))
    return adv, adv


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's REINFORCE++-baseline: ``s - mean_g`` broadcast to the response tokens, whitened over
    all valid tokens of the batch (``(x - mean) * rsqrt(var + 1e-8)``, unbiased token variance).
    Needs at least two valid tokens (ValueError, as verl). Arguments and return as
    :func:`compute_grpo_outcome_advantage`."""
    adv = _outcome(token_level_rewards, response_mask, index, "reinforce_pp_baseline", epsilon)
    return adv, adv


def compute_opo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's OPO: ``s - sum(|y| s) / sum(|y|)`` over the group (length-weighted baseline, 0 for a
    group of one); lengths are the mask's row sums. Arguments and return as
    :func:`compute_grpo_outcome_advantage`."""
    adv = _outcome(token_level_rewards, response_mask, index, "opo", epsilon)
    return adv, adv


def compute_grpo_passk_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's Pass@k advantage: only the best response of a group gets ``r_max - r_second``
    (divided by ``std_g + epsilon`` when ``config.norm_adv_by_std_in_grpo``, default True: like
    verl, the config decides, not the argument). Every group needs two responses (ValueError).
    ``config`` is required, as in verl. Returns ``(advantages, returns)``, ``[B, T]`` in verl's dtype."""
    if config is None:
        raise ValueError("grpo_passk needs config (verl's AlgoConfig) for norm_adv_by_std_in_grpo, got None")
    norm = bool(_cfg(config, "norm_adv_by_std_in_grpo", True))
    ids, sizes = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    if (sizes < 2).any():
        raise ValueError(f"Pass@k requires at least 2 samples per group; a group has {int(sizes.min())}")
    adv = _group_advantages(token_level_rewards, ids, "grpo_passk", epsilon, response_mask, norm_by_std=norm)
    adv = _cast(adv, _adv_dtype(token_level_rewards, response_mask))
    return adv, adv


def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GPG advantage: ``alpha (s - mean_g) / f_norm`` with ``alpha = B / #(s != 0)`` (verl
    recomputes alpha and ignores the argument; a group of one has mean 0). Returns
    ``(advantages, returns)``, ``[B, T]`` in verl's dtype."""
    ids, _ = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv = _group_advantages(token_level_rewards, ids, "dr_grpo", epsilon, response_mask)
    with torch.no_grad():
        # verl's alpha: an int divided by an int tensor, i.e. a float32 number, in every dtype
        alpha = token_level_rewards.shape[0] / torch.count_nonzero(token_level_rewards.sum(dim=-1)).clamp(min=1)
    adv = adv * alpha.to(adv.dtype) / float(f_norm)
    adv = _cast(adv, _adv_dtype(token_level_rewards, response_mask))
    return adv, adv


ADVANTAGE_ESTIMATORS = {
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
}
"""verl registry name -> drop-in (``patch()`` puts these into ``ADV_ESTIMATOR_REGISTRY``)."""


# --- patching --------------------------------------------------------------------------------

_TF = "verl.utils.torch_functional"
_CORE = "verl.trainer.ppo.core_algos"


def _replacements() -> list[Replacement]:
    reps = [Replacement(_TF, name, globals()[name])
            for name in ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")]  # fmt: skip
    reps += [Replacement(_CORE, name, globals()[name]) for name in ("kl_penalty", "agg_loss")]
    reps += [Replacement(_CORE, f.__name__, f) for f in POLICY_LOSSES.values()]
    reps.append(Replacement(_CORE, "compute_policy_loss_reinforce", compute_policy_loss_reinforce))
    reps += [Replacement(_CORE, f.__name__, f) for f in ADVANTAGE_ESTIMATORS.values()]
    return reps


def _registries() -> list[dict]:
    import importlib

    core = importlib.import_module(_CORE)
    return [core.POLICY_LOSS_REGISTRY, core.ADV_ESTIMATOR_REGISTRY]


PATCHED_NAMES = tuple(
    ["logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking", "kl_penalty", "agg_loss"]
    + [f.__name__ for f in POLICY_LOSSES.values()]
    + ["compute_policy_loss_reinforce"]
    + [f.__name__ for f in ADVANTAGE_ESTIMATORS.values()]
)
"""The verl function names ``patch()`` replaces (pass any of them in ``exclude`` to keep verl's)."""

_PATCH = ModulePatch("verl", _replacements, _registries)


def patch(exclude=()) -> list[str]:
    """Swaps the lenkernels drop-ins into the installed verl (this process only).

    Args:
        exclude: names from ``PATCHED_NAMES`` to leave as verl's (e.g. ``("logprobs_from_logits",)``).

    Returns:
        The replaced attributes (``"verl.trainer.ppo.core_algos.agg_loss"``, registry entries, ...).

    Calls nest: each ``patch()`` needs an ``unpatch()``; verl's functions come back on the last.
    Raises ImportError when verl is not installed.
    """
    unknown = set(exclude) - set(PATCHED_NAMES)
    if unknown:
        raise ValueError(f"exclude holds names that patch() does not replace: {sorted(unknown)}")
    return _PATCH.apply(exclude)


def unpatch() -> None:
    """Restores verl's functions (everywhere ``patch()`` put the drop-ins)."""
    _PATCH.restore()


def patched(exclude=()):
    """Context manager: ``with patched(): ...`` runs the block with the drop-ins swapped in."""
    unknown = set(exclude) - set(PATCHED_NAMES)
    if unknown:
        raise ValueError(f"exclude holds names that patch() does not replace: {sorted(unknown)}")
    return _PATCH.scope(exclude)


def is_patched() -> bool:
    """Whether ``patch()`` is in effect in this process."""
    return _PATCH.active
