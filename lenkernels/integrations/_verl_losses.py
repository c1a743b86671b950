"""verl's KL, aggregation and policy losses (``verl.trainer.ppo.core_algos``): ``kl_penalty``,
``agg_loss``, the drop-ins of ``POLICY_LOSS_REGISTRY`` and ``compute_policy_loss_reinforce``, with
verl's signatures, metric dicts and result dtypes. Import them from
:mod:`lenkernels.integrations.verl`, which documents the conventions and the differences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch

from lenkernels import _checks
from lenkernels.integrations import F64, _aggregate, _cast, _divided, _exact, _policy_loss, _promote, _scalar_shape
from lenkernels.ops.policy_loss import PolicyLoss
from lenkernels.ops.policy_loss import kl_penalty as _lk_kl_penalty

_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_NAMES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


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
#
# verl's registered losses share one signature, written once in _registered; each drop-in is that
# signature around a _Fused spec (the fused op's mode and options, verl's metric dict) or, for
# geo_mean, clip_cov and kl_cov, a function of the same arguments.


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


class _Fused(NamedTuple):
    """A verl policy loss as one call of the fused ``policy_loss`` op."""

    mode: str
    """The op's ``mode``."""
    options: Callable[[Any], dict]
    """verl's config -> the mode's arguments (clip bounds, temperatures), checked as verl checks them."""
    metrics: Callable[[PolicyLoss], dict]
    """The op's result -> verl's metric dict, in verl's key order (tensors become Python floats)."""
    ratio: bool = True
    """Whether verl's per-token loss multiplies the ratio to ``old_log_prob`` (whose dtype then
    promotes the loss's dtype); REINFORCE's does not."""
    agg: str | None = None
    """The aggregation verl applies whatever ``loss_agg_mode`` says (sapo's), else None."""
    factor: torch.dtype | None = None
    """The dtype of a dimensioned factor of verl's per-token loss beyond the inputs (dppo's
    ``valid_mask.float()``: float32), which promotes its dtype; None: none."""

    def __call__(self, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str, config,
                 rollout_is_weights) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        """verl's ``(pg_loss, metrics)``: the loss in verl's dtype and shape, of the promoted dtype of
        the tensors verl's formula multiplies, then promoted as ``agg_loss`` promotes it."""
        options = self.options(config)
        agg = self.agg or loss_agg_mode
        info = _batch_info(config)
        agg_kw = _agg_kwargs(agg, log_prob.device, **info)
        out = _policy_loss(log_prob, old_log_prob, advantages, response_mask, mode=self.mode,
                           importance_weights=rollout_is_weights,
                           exact=_exact(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights),
                           **agg_kw, **options)  # fmt: skip
        terms = (log_prob, old_log_prob if self.ratio else None, advantages, rollout_is_weights)
        dtypes = [t.dtype for t in terms if t is not None] + ([self.factor] if self.factor is not None else [])
        like = _agg_result(_promote(*dtypes), response_mask, agg, info.get("batch_num_tokens"),
                           info.get("global_batch_size"))  # fmt: skip
        return _fresh(out.loss, like), _floats(self.metrics(out))


def _no_options(config) -> dict:
    return {}


def _clip(config) -> dict:
    low, high = _clip_ratios(config)
    return {"clip_low": low, "clip_high": high}


def _clip_and_c(config, default: float, floor: float, what: str) -> dict:
    """The clip ratios and ``clip_dual`` from ``config.clip_ratio_c`` (``default`` when absent),
    which must exceed ``floor`` (ValueError naming ``what`` the bound is)."""
    options = _clip(config)
    c = float(_cfg(config, "clip_ratio_c", default))
    if not c > floor:
        raise ValueError(f"clip_ratio_c ({what}) must be > {floor}, got {c}")
    return {**options, "clip_dual": c}


def _dual_clip(config) -> dict:
    return _clip_and_c(config, 3.0, 1.0, "the dual-clip bound")


def _sapo_temperatures(config) -> dict:
    return {"tau_pos": float(_cfg(config, "tau_pos", 1.0)), "tau_neg": float(_cfg(config, "tau_neg", 1.05))}


def _clip_metrics(out: PolicyLoss) -> dict:
    """vanilla's: the fraction of tokens clipped (either side), the approximate KL, the dual clip's fraction."""
    return {
        "actor/pg_clipfrac": out.clip_frac_low + out.clip_frac_high,
        "actor/ppo_kl": out.approx_kl,
        "actor/pg_clipfrac_lower": out.clip_frac_dual,
    }


def _single_clip_metrics(out: PolicyLoss) -> dict:
    """gspo's and cispo's: no dual clip, so ``actor/pg_clipfrac_lower`` is 0."""
    return {**_clip_metrics(out), "actor/pg_clipfrac_lower": 0.0}


def _sapo_metrics(out: PolicyLoss) -> dict:
    return {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": out.approx_kl, "actor/pg_clipfrac_lower": 0.0}


def _no_metrics(out: PolicyLoss) -> dict:
    return {}


def _kl_metric(out: PolicyLoss) -> dict:
    return {"actor/ppo_kl": out.approx_kl}


def _registered(name: str, default_agg: str, compute: Callable, doc: str) -> Callable:
    """The drop-in for verl's ``POLICY_LOSS_REGISTRY[name]``: the signature verl's registered losses
    share (``loss_agg_mode`` defaulting to ``default_agg``), ``config`` required, then
    ``compute(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
    rollout_is_weights)`` (a :class:`_Fused`, or a function of those arguments)."""

    def drop_in(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = default_agg,
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        config = _require(config, name)
        return compute(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)

    drop_in.__name__ = drop_in.__qualname__ = f"compute_policy_loss_{name}"
    drop_in.__doc__ = doc
    return drop_in


compute_policy_loss_vanilla = _registered(
    "vanilla", "token-mean", _Fused("ppo", _dual_clip, _clip_metrics),
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
    """,
)  # fmt: skip

compute_policy_loss_gspo = _registered(
    "gspo", "seq-mean-token-mean", _Fused("gspo", _clip, _single_clip_metrics),
    """verl's ``gspo`` loss: the sequence ratio ``exp(mean_t (log_prob - old))`` in its token form,
    PPO-clipped with ``config.clip_ratio_low/high`` (no dual clip), aggregated by
    ``loss_agg_mode``. Arguments and return as :func:`compute_policy_loss_vanilla`
    (``actor/pg_clipfrac_lower`` is 0, as verl's). Example: ``get_policy_loss_fn("gspo")(...)``.""",
)  # fmt: skip

compute_policy_loss_sapo = _registered(
    "sapo", "seq-mean-token-mean", _Fused("sapo", _sapo_temperatures, _sapo_metrics, agg="seq-mean-token-mean"),
    """verl's ``sapo`` loss: ``-sigmoid(tau (r - 1)) 4/tau A`` with ``config.tau_pos`` (A > 0) /
    ``config.tau_neg``, always aggregated ``seq-mean-token-mean`` (verl ignores
    ``loss_agg_mode`` here). Arguments and return as :func:`compute_policy_loss_vanilla`; both clip
    fractions are 0. Example: ``get_policy_loss_fn("sapo")(...)``.""",
)  # fmt: skip

compute_policy_loss_gpg = _registered(
    "gpg", "token-mean", _Fused("reinforce", _no_options, _no_metrics, ratio=False),
    """verl's ``gpg`` loss ``-A log_prob`` (REINFORCE), aggregated by ``loss_agg_mode``; returns
    ``(pg_loss, {})`` like verl. Example: ``get_policy_loss_fn("gpg")(...)``.""",
)  # fmt: skip


def _geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """GMPO: the fused op's ``gmpo`` mode, the rollout weights folded into the advantages, verl's
    dtype and its clip fractions (which count differently from the op's)."""
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


compute_policy_loss_geo_mean = _registered(
    "geo_mean", "token-mean", _geo_mean,
    """verl's ``geo_mean`` (GMPO) loss: per sequence ``-mean_t(A) exp(mean_t clipped log-ratio)``
    (sign-aware clip of the log-ratio to ``[-clip_ratio_low, clip_ratio_high]``; rollout weights
    by their geometric mean), averaged over all B sequences (verl ignores ``loss_agg_mode`` and the
    global batch info here). Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"})`` where the fractions count tokens whose log-ratio lies outside
    the band with A > 0 / A < 0 (verl's definition). Example: ``get_policy_loss_fn("geo_mean")(...)``.""",
)  # fmt: skip

compute_policy_loss_cispo = _registered(
    "cispo", "token-mean", _Fused("cispo", _clip, _single_clip_metrics),
    """verl's ``cispo`` loss ``-sg(clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) A log_prob``,
    aggregated by ``loss_agg_mode``; ``actor/pg_clipfrac`` is the fraction of tokens whose ratio
    was clipped (either side), ``actor/pg_clipfrac_lower`` 0. Arguments and return as
    :func:`compute_policy_loss_vanilla`. Example: ``get_policy_loss_fn("cispo")(...)``.""",
)  # fmt: skip

_REINFORCE = _Fused("reinforce", _no_options, _kl_metric, ratio=False)


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
    return _REINFORCE(rollout_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)


POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "geo_mean": compute_policy_loss_geo_mean,
    "cispo": compute_policy_loss_cispo,
}
"""verl registry name -> drop-in (``patch()`` puts these into ``POLICY_LOSS_REGISTRY``)."""
