"""verl's registry entries beyond the PPO family (``verl.trainer.ppo.core_algos``, tested with verl
0.9.1): DPPO-Binary-TV/-KL and DRO as modes of the fused policy loss, Clip-Cov and KL-Cov as a token
selection (``lenkernels.cov_select``, verl's draw replayed) followed by one fused loss. Same
conventions as ``_verl_losses`` (whose helpers these use); re-exported by ``integrations.verl``."""

from __future__ import annotations

import torch

from lenkernels.integrations import F64, _aggregate, _exact, _policy_loss, _promote
from lenkernels.integrations._verl_losses import (
    _agg_kwargs,
    _agg_result,
    _batch_info,
    _cfg,
    _clip_and_c,
    _clip_metrics,
    _clip_ratios,
    _floats,
    _fresh,
    _Fused,
    _kl_metric,
    _registered,
)

# --- the covariance losses: a token selection (lenkernels.cov_select), then one fused loss ------


def _policy_loss_config(config, loss: str):
    """``config.policy_loss`` (verl's PolicyLossConfig), which verl's covariance and DRO losses need."""
    pl = _cfg(config, "policy_loss", None)
    if pl is None:
        raise ValueError(f"policy loss {loss!r} needs config.policy_loss (verl's PolicyLossConfig), got None")
    return pl


def _or_default(config, name: str, default: float) -> float:
    value = _cfg(config, name, None)
    return float(default if value is None else value)


def _loss_like(terms, response_mask, agg: str, info: dict) -> tuple[torch.dtype, tuple]:
    """verl's dtype and shape of ``agg_loss`` of a loss matrix made of ``terms`` (None skipped)."""
    dtype = _promote(*[t.dtype for t in terms if t is not None])
    return _agg_result(dtype, response_mask, agg, info.get("batch_num_tokens"), info.get("global_batch_size"))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean`` (sum over the mask / (count + 1e-8)), detached, in float64."""
    m = mask.detach() != 0
    return torch.where(m, x.detach().to(F64), 0.0).sum() / (m.sum().to(F64) + 1e-8)


def _clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """Clip-Cov: verl's selection (``cov_select``, same RNG use), then PPO without dual clip with the
    selected tokens' terms zeroed: the 0/1 ``corr`` (times the rollout weights) is the fused op's
    ``importance_weights``, which multiply the policy term per token as verl's ``* corr``."""
    from lenkernels.ops.cov_select import cov_select

    pl = _policy_loss_config(config, "clip_cov")
    ratio = _or_default(pl, "clip_cov_ratio", 0.0002)
    if not ratio > 0:
        raise ValueError(f"clip_cov_ratio should be larger than 0, got {ratio}")
    low, high = _clip_ratios(config)
    selected = cov_select(log_prob, advantages, response_mask, method="clip_cov", ratio=ratio,
                          lb=_or_default(pl, "clip_cov_lb", 1.0), ub=_or_default(pl, "clip_cov_ub", 5.0),
                          old_logprobs=old_log_prob, clip_low=low, clip_high=high)  # fmt: skip
    exact = _exact(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights)
    corr = (~selected).to(F64 if exact else torch.float32)
    weights = corr if rollout_is_weights is None else corr * rollout_is_weights.detach()
    info = _batch_info(config)
    out = _policy_loss(log_prob, old_log_prob, advantages, response_mask, mode="ppo", clip_low=low, clip_high=high,
                       importance_weights=weights, exact=exact,
                       **_agg_kwargs(loss_agg_mode, log_prob.device, **info))  # fmt: skip
    like = _loss_like((log_prob, old_log_prob, advantages, rollout_is_weights), response_mask, loss_agg_mode, info)
    metrics = {"actor/pg_clipfrac": _masked_mean(selected, response_mask), "actor/ppo_kl": out.approx_kl}
    return _fresh(out.loss, like), _floats(metrics)


# ppo's clip bounds [1 - 1, 1 + 1e9] never bind: the op's ratio exp(clamp(l, +-20)) lies in
# [2e-9, 4.9e8], so max(-A r, -A clip(r)) is -A r with its gradient for either sign of A
_NO_CLIP = {"clip_low": 1.0, "clip_high": 1e9}


def _kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """KL-Cov: per token ``-A r`` (no clip), plus ``ppo_kl_coef |log_prob - old|`` on the tokens
    ``cov_select(method="kl_cov")`` picks, all times the rollout weights, aggregated.

    One fused call: mode ``"ppo"`` with bounds that never bind (``_NO_CLIP``) gives ``-A r``; the
    op's KL term with estimator ``"abs"`` against ``ref = where(selected, old_log_prob,
    log_prob.detach())`` gives ``|old - log_prob|`` on the selected tokens and ``|0| = 0`` with
    gradient 0 elsewhere (every backend takes sign(0) = 0). The op's importance weights multiply
    the policy term only, and verl's rollout weights multiply the KL term too: with weights the KL
    term is a second fused call (the aggregation op on ``coef w |l| [selected]``, whose terms add
    exactly as the aggregation is linear in the loss matrix)."""
    from lenkernels.ops.cov_select import cov_select

    pl = _policy_loss_config(config, "kl_cov")
    ratio = _or_default(pl, "kl_cov_ratio", 0.0002)
    if not ratio > 0:
        raise ValueError(f"kl_cov_ratio should be larger than 0, got {ratio}")
    coef = _or_default(pl, "ppo_kl_coef", 1.0)
    selected = cov_select(log_prob, advantages, response_mask, method="kl_cov", ratio=ratio)
    exact = _exact(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights)
    info = _batch_info(config)
    agg_kw = _agg_kwargs(loss_agg_mode, log_prob.device, **info)
    weighted = rollout_is_weights is not None
    kl_kw = {}
    if coef != 0.0 and not weighted:
        ref = torch.where(selected, old_log_prob.detach(), log_prob.detach())
        kl_kw = {"ref_logprobs": ref, "kl_coef": coef, "kl_estimator": "abs"}
    out = _policy_loss(log_prob, old_log_prob, advantages, response_mask, mode="ppo", **_NO_CLIP,
                       importance_weights=rollout_is_weights, exact=exact, **kl_kw, **agg_kw)  # fmt: skip
    loss = out.loss
    if coef != 0.0 and weighted:
        work = F64 if exact else torch.float32
        kl = (log_prob.to(work) - old_log_prob.detach().to(work)).abs()
        kl = kl * (coef * selected.to(work) * rollout_is_weights.detach().to(work))
        loss = loss + _aggregate(kl, response_mask, exact=exact, **agg_kw)
    like = _loss_like((log_prob, old_log_prob, advantages, rollout_is_weights), response_mask, loss_agg_mode, info)
    ppo_kl = _masked_mean((log_prob.detach() - old_log_prob.detach()).abs(), response_mask)
    return _fresh(loss, like), _floats({"actor/ppo_kl": ppo_kl})


compute_policy_loss_clip_cov = _registered(
    "clip_cov", "token-mean", _clip_cov,
    """verl's ``clip_cov`` (Clip-Cov) loss: PPO (``config.clip_ratio_low/high``, no dual clip) with the
    terms of a few high-covariance tokens zeroed, aggregated by ``loss_agg_mode``.

    The tokens: :func:`lenkernels.cov_select` with ``method="clip_cov"``,
    ``config.policy_loss.clip_cov_ratio`` (default 2e-4), ``clip_cov_lb`` / ``clip_cov_ub`` (1.0 /
    5.0): a random subset drawn from torch's global CPU generator exactly as verl draws it, so under
    the same seed the same tokens. The loss: one fused PPO call whose importance weights are the 0/1
    keep mask times ``rollout_is_weights``. Arguments as :func:`compute_policy_loss_vanilla`.

    Returns:
        ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl"})``: the fraction of valid tokens
        selected, the mean of ``old - new`` over valid tokens. Example:
        ``get_policy_loss_fn("clip_cov")(old_log_prob, log_prob, advantages, mask, "token-mean", cfg)``.
    """,
)  # fmt: skip

compute_policy_loss_kl_cov = _registered(
    "kl_cov", "token-mean", _kl_cov,
    """verl's ``kl_cov`` (KL-Cov) loss: per token ``-A r`` (no clip), plus
    ``config.policy_loss.ppo_kl_coef`` (default 1) ``* |log_prob - old_log_prob|`` on the
    ``max(1, int(kl_cov_ratio * n_valid))`` valid tokens of largest covariance
    (:func:`lenkernels.cov_select`, ``method="kl_cov"``, ``kl_cov_ratio`` default 2e-4), times
    ``rollout_is_weights``, aggregated by ``loss_agg_mode``. The fused composition is described in
    ``_kl_cov``. Arguments as :func:`compute_policy_loss_vanilla`.

    Returns:
        ``(pg_loss, {"actor/ppo_kl"})``: the mean of ``|log_prob - old_log_prob|`` over valid tokens
        (verl's definition for this loss). Example: ``get_policy_loss_fn("kl_cov")(...)``.
    """,
)  # fmt: skip


# --- DPPO and DRO: modes of the fused op --------------------------------------------------------


def _dppo(config) -> dict:
    """DPPO's divergence thresholds (verl's clip_ratio_low/high, default clip_ratio) and the
    truncation C of the detached ratio: ``config.get("clip_ratio_c", 20.0)`` as verl reads it (a
    verl ActorConfig carries clip_ratio_c = 3.0)."""
    return _clip_and_c(config, 20.0, 0, "DPPO's ratio truncation")


def _dro(config) -> dict:
    beta = _cfg(_policy_loss_config(config, "dro"), "dro_beta", None)
    if beta is None or not float(beta) > 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return {"dro_beta": float(beta)}


compute_policy_loss_dppo_tv = _registered(
    "dppo_tv", "token-mean", _Fused("dppo_tv", _dppo, _clip_metrics, factor=torch.float32),
    """verl's ``dppo_tv`` (DPPO-Binary-TV, arXiv 2602.04879) loss, fused: per token
    ``-A sg(min(r, C)) log_prob`` on the tokens whose probability moved less than the TV threshold
    (``p - p_old <= clip_ratio_high`` where A > 0, ``>= -clip_ratio_low`` elsewhere; both default
    ``clip_ratio``), 0 elsewhere, times ``rollout_is_weights``, aggregated by ``loss_agg_mode``;
    ``C = config.clip_ratio_c`` (verl's ``config.get("clip_ratio_c", 20.0)``). Arguments as
    :func:`compute_policy_loss_vanilla`.

    Returns:
        ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``: the
        fraction of valid tokens outside the trust region, the mean of ``old - new``, the fraction
        inside it whose ratio exceeds C. The loss is float32 at least (verl multiplies by the
        float32 region mask). Example: ``get_policy_loss_fn("dppo_tv")(...)``.
    """,
)  # fmt: skip

compute_policy_loss_dppo_kl = _registered(
    "dppo_kl", "token-mean", _Fused("dppo_kl", _dppo, _clip_metrics, factor=torch.float32),
    """verl's ``dppo_kl`` (DPPO-Binary-KL) loss: as :func:`compute_policy_loss_dppo_tv` with the
    trust region of the binary KL ``D = p_old (old - new) + (1 - p_old) log((1 - p_old + 1e-8) /
    (1 - p + 1e-8))``: kept where ``D <= clip_ratio_high or p <= p_old`` (A > 0), ``D <=
    clip_ratio_low or p >= p_old`` (else). Same metrics. Example: ``get_policy_loss_fn("dppo_kl")(...)``.""",
)  # fmt: skip

compute_policy_loss_dro = _registered(
    "dro", "token-mean", _Fused("dro", _dro, _kl_metric),
    """verl's ``dro`` (Direct Reward Optimization) loss, fused: per token ``-(log_prob A - beta/2
    (log_prob - old_log_prob)^2)`` with ``beta = config.policy_loss.dro_beta`` (required, > 0:
    ValueError otherwise, as verl), times ``rollout_is_weights``, aggregated by ``loss_agg_mode``.
    Arguments as :func:`compute_policy_loss_vanilla`. Returns ``(pg_loss, {"actor/ppo_kl"})`` (the
    mean of ``old - new``). Example: ``get_policy_loss_fn("dro")(...)``.""",
)  # fmt: skip


EXTRA_POLICY_LOSSES = {
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "dro": compute_policy_loss_dro,
}
"""More of verl's registry entries, patched like ``POLICY_LOSSES``; kept apart because a plain call
with a default ActorConfig does not reproduce verl's result: ``clip_cov`` draws from torch's RNG
(the same draw as verl's only from the same generator state) and ``dro`` needs
``config.policy_loss.dro_beta``."""
