"""verl's rollout correction (``verl.trainer.ppo.rollout_corr_helper``, verl 0.9.1):
``compute_rollout_correction_and_rejection_mask`` and ``compute_offpolicy_metrics`` with verl's
signatures, return values and metric names.

``lenkernels.rollout_correction`` computes the importance weights (token or sequence level, the ±20
clamp) and the two KL estimates in one pass; the truncation (TIS), the IcePop zeroing, the rejection
options (``token_k*``, ``seq_sum_k*``, ``seq_mean_k*``, ``seq_max_k*``, chained) and every metric verl
logs are computed where the tensors are and come to the host in **one** transfer at the end. verl's
code calls ``.item()`` once per metric (about 40 host synchronisations for token IS with one
rejection option), and in ``bypass_mode`` it runs inside the policy loss, once per micro-batch.

The metrics follow verl's formulas term by term, through verl's own ``masked_mean`` /
``masked_sum`` (so the ``+ 1e-8`` of its denominators is kept); where verl branches on a value it
has synchronised (``if mask_count > 1``, ``if weights_mean > 1e-8``, the boolean selection of the
valid sequences) the branch is a ``torch.where`` or a masked reduction. Differences, deliberate
(``lenkernels.integrations.verl`` lists them with the others):

- ``k3_kl`` is ``mean(expm1(δ) − δ)`` (lenkernels' kernel), where verl computes ``exp(δ) − δ − 1``,
  which loses most of its digits to cancellation when ``|δ|`` is small (at ``δ ~ 1e-3`` in float32,
  about 10% of the value); ``kl`` and ``k3_kl`` of half-precision inputs are float32 sums (verl sums
  in the half dtype).
- ``rollout_is_eff_sample_size`` is ``inf`` where every applied weight is 0 (an IcePop band that
  rejects every token), where verl raises ZeroDivisionError.
- An all-zero ``response_mask`` raises the error verl raises, after the device work (it is read in
  the same transfer as the metrics).
"""

from __future__ import annotations

import importlib
import math

import torch

from lenkernels.integrations import _rollout_correction

HELPER_MODULE = "verl.trainer.ppo.rollout_corr_helper"
SAFETY_BOUND = 20.0  # verl's clamp of log weights (lenkernels.ops.rollout_correction.LOG_CLAMP)
PREFIX = "rollout_corr/"


def _verl():
    """(verl's rollout_corr_helper, verl.utils.torch_functional), imported at call time."""
    return importlib.import_module(HELPER_MODULE), importlib.import_module("verl.utils.torch_functional")


class _Metrics(dict):
    """Metric name -> 0-dim tensor or Python float, until :meth:`to_host` moves every tensor in one
    transfer. ``invert`` names the metrics verl reports as ``1.0 / value`` (host division)."""

    def __init__(self):
        super().__init__()
        self.invert: set[str] = set()

    def to_host(self, check: torch.Tensor | None = None, message: str = "", error=ValueError) -> dict[str, float]:
        """Python floats for every metric; raises ``error(message)`` when ``check`` (a 0-dim count,
        read in the same transfer) is 0."""
        names = [k for k, v in self.items() if isinstance(v, torch.Tensor)]
        tensors = [self[k].detach().reshape(()).to(torch.float64) for k in names]
        if check is not None:
            tensors.append(check.detach().reshape(()).to(torch.float64))
        values = torch.stack(tensors).tolist() if tensors else []
        if check is not None and values.pop() == 0:
            raise error(message)
        out = {k: (v if not isinstance(v, torch.Tensor) else None) for k, v in self.items()}
        for name, value in zip(names, values, strict=True):
            out[name] = value
        for name in self.invert:
            out[name] = 1.0 / out[name] if out[name] != 0 else math.inf
        return out


def _where(cond: torch.Tensor, value: torch.Tensor, other: float) -> torch.Tensor:
    return torch.where(cond, value, torch.full_like(value, other))


# --- the fused part: raw weights and KL estimates -------------------------------------------------


def _weights_and_kl(old, rollout, response_mask, level: str):
    """``(raw, kl, k3)``: verl's raw importance weights ``exp(clamp(δ or Σδ, ±20)) * response_mask``
    (its dtype promotion), and the k1/k3 KL(π_rollout ‖ π_old) estimates over the response tokens,
    from one ``lenkernels.rollout_correction`` pass (float64 inputs: its float64 definition)."""
    rc = _rollout_correction(old, rollout, response_mask != 0, level=level, mode="truncate", log_clamp=SAFETY_BOUND)
    dtype = torch.promote_types(old.dtype, rollout.dtype)
    return rc.weights.to(dtype) * response_mask, rc.kl_k1, rc.kl_k3


_LEVELS = ("token", "sequence")  # verl's rollout_is levels


# --- importance weights (verl: compute_rollout_correction_weights + compute_is_metrics) ---------


def _is_weights(helper, vf, log_ratio, raw, response_mask, level, threshold_spec, batch_normalize, metrics):
    """verl's truncated / IcePop weights of ``raw`` and their metrics (into ``metrics``)."""
    upper, lower = helper._parse_rollout_is_threshold(threshold_spec)
    if lower is None:
        weights = raw.clamp(max=upper)
    else:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    _is_metrics(vf, weights, raw, log_ratio, response_mask, level, upper, lower, metrics)
    if lower is not None:
        oob = (raw < lower) | (raw > upper)
        metrics["rollout_is_oob_ratio"] = vf.masked_mean(oob.float(), response_mask)
    weights = weights.detach()
    if batch_normalize:
        weights = _batch_normalize(vf, weights, response_mask, level, metrics)
    return weights


def _is_metrics(vf, weights, raw, log_ratio, response_mask, level, upper, lower, metrics):
    lower_m = 1.0 / upper if lower is None else lower
    mask_bool = response_mask.bool()
    metrics["rollout_is_mean"] = vf.masked_mean(weights, response_mask)
    if level == "sequence":
        log_seq = vf.masked_sum(log_ratio, response_mask, axis=-1)  # every sequence, as verl's
        metrics["rollout_is_max"] = torch.exp(torch.clamp(log_seq.max(), max=SAFETY_BOUND))
        metrics["rollout_is_min"] = torch.exp(log_seq.min())
        dev = weights.device
        above = log_seq > torch.log(torch.tensor(upper, device=dev))
        below = log_seq < torch.log(torch.tensor(lower_m, device=dev))
        metrics["rollout_is_ratio_fraction_high"] = above.float().mean()
        metrics["rollout_is_ratio_fraction_low"] = below.float().mean()
    else:
        metrics["rollout_is_ratio_fraction_high"] = vf.masked_mean((raw > upper).float(), response_mask)
        metrics["rollout_is_ratio_fraction_low"] = vf.masked_mean((raw < lower_m).float(), response_mask)
        metrics["rollout_is_max"] = weights.masked_fill(~mask_bool, float("-inf")).max()
        metrics["rollout_is_min"] = weights.masked_fill(~mask_bool, float("inf")).min()
    bounded = weights.clamp(min=0.0, max=upper)
    metrics["rollout_is_std"] = _masked_std(vf, bounded, response_mask)
    normalized = bounded / (vf.masked_mean(bounded, response_mask) + 1e-8)
    metrics["rollout_is_eff_sample_size"] = vf.masked_mean(normalized.square(), response_mask)
    metrics.invert.add("rollout_is_eff_sample_size")
    seq_mean = vf.masked_mean(weights, response_mask, axis=-1)
    metrics["rollout_is_seq_mean"] = seq_mean.mean()
    metrics["rollout_is_seq_std"] = seq_mean.std() if seq_mean.numel() > 1 else 0.0
    metrics["rollout_is_seq_max"] = seq_mean.max()
    metrics["rollout_is_seq_min"] = seq_mean.min()
    metrics["rollout_is_seq_max_deviation"] = (seq_mean - 1.0).abs().max()
    raw_seq_mean = vf.masked_mean(raw, response_mask, axis=-1)
    metrics["rollout_is_seq_fraction_high"] = (raw_seq_mean > upper).float().mean()
    metrics["rollout_is_seq_fraction_low"] = (raw_seq_mean < lower_m).float().mean()


def _masked_std(vf, values, response_mask):
    """verl's clamped-statistic std: ``sqrt(max(E[v²] − E[v]², 0))`` over the mask, 0 for at most
    one token (verl's ``if mask_count > 1``)."""
    mean = vf.masked_mean(values, response_mask)
    var = vf.masked_mean(values.square(), response_mask) - mean.square()
    return _where(response_mask.sum() > 1, torch.sqrt(torch.clamp(var, min=0.0)), 0.0)


def _batch_normalize(vf, weights, response_mask, level, metrics):
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if level == "token":
        mask = response_mask.to(dtype=weights.dtype)
        mean = vf.distributed_masked_mean(weights, mask) if distributed else vf.masked_mean(weights, response_mask)
    else:
        seq_weights = vf.masked_mean(weights, response_mask, axis=-1)
        seq_mask = (response_mask.sum(dim=-1) > 0).to(dtype=weights.dtype)
        if distributed:
            mean = vf.distributed_masked_mean(seq_weights, seq_mask)
        else:
            mean = (seq_weights * seq_mask).sum() / seq_mask.sum().clamp_min(1e-8)
    usable = mean > 1e-8
    metrics["rollout_is_batch_norm_factor"] = _where(usable, mean, 1.0)
    return torch.where(usable, weights / mean, weights)


# --- rejection (verl: compute_rollout_rejection_mask + compute_rs_metrics) ----------------------


def _option_statistic(vf, option, k, response_mask):
    """``(per-token statistic, per-sequence statistic or None)`` of one rejection option."""
    if option.startswith("token_"):
        return k, None
    if option.startswith("seq_sum"):
        seq = vf.masked_sum(k, response_mask, axis=-1)
    elif option.startswith("seq_mean"):
        seq = vf.masked_mean(k, response_mask, axis=-1)
    else:  # seq_max: verl's max over the response tokens, 0 for a sequence without any
        masked = k.masked_fill(~response_mask.bool(), float("-inf"))
        seq = masked.max(dim=-1).values
        seq = torch.where(seq == float("-inf"), torch.zeros_like(seq), seq)
    return seq.unsqueeze(-1).expand_as(response_mask), seq


def _rejection_mask(helper, vf, log_ratio, response_mask, options_spec, threshold_spec, metrics):
    if options_spec is None or not isinstance(options_spec, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    if threshold_spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    options = list(dict.fromkeys(opt.strip() for opt in options_spec.split(",") if opt.strip()))
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option.")
    for opt in options:
        if opt not in helper.SUPPORTED_ROLLOUT_RS_OPTIONS:
            raise ValueError(
                f"Invalid rollout_rs option: {opt}. Must be one of {sorted(helper.SUPPORTED_ROLLOUT_RS_OPTIONS)}."
            )
    thresholds = helper._parse_rollout_rs_thresholds(options, threshold_spec)

    safe = torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)
    per_kind = {"k1": -safe, "k2": 0.5 * safe**2, "k3": torch.exp(safe) - 1.0 - safe}
    mask_bool = response_mask.bool()
    seq_valid = response_mask.sum(dim=-1) > 0
    combined = torch.ones_like(response_mask, dtype=log_ratio.dtype)
    for opt in options:
        is_k1 = opt.endswith("k1")
        upper, lower = thresholds[opt]["upper"], thresholds[opt]["lower"]
        hi, lo = (math.log(upper), math.log(lower)) if is_k1 else (upper, 0.0)
        stat, seq = _option_statistic(vf, opt, per_kind[opt[-2:]], response_mask)
        keep = (stat >= lo) & (stat <= hi) if is_k1 else stat <= hi
        _rs_metrics(vf, f"rollout_rs_{opt}", stat, seq, response_mask, seq_valid, hi, lo, is_k1, metrics)
        keep_mask = keep.to(dtype=log_ratio.dtype)
        combined = combined * keep_mask
        seq_keep = (~((~keep) & mask_bool)).all(dim=-1)
        metrics[f"rollout_rs_{opt}_masked_fraction"] = vf.masked_mean(1 - keep_mask, response_mask)
        seq_valid_f = seq_valid.float()
        lost = ((1.0 - seq_keep.to(dtype=log_ratio.dtype)) * seq_valid_f).sum()
        metrics[f"rollout_rs_{opt}_seq_masked_fraction"] = lost / seq_valid_f.sum()
    metrics["rollout_rs_masked_fraction"] = vf.masked_mean(1 - combined, response_mask)
    final_keep = (combined > 0.5) & mask_bool
    metrics["rollout_rs_seq_masked_fraction"] = (~final_keep & mask_bool).any(dim=-1).float().mean()
    return (response_mask * combined).to(dtype=response_mask.dtype)


def _rs_metrics(vf, prefix, stat, seq, response_mask, seq_valid, hi, lo, apply_lower, metrics):
    """verl's ``compute_rs_metrics`` for one option (sequence statistics over the sequences with a
    response token, as masked reductions)."""
    mask_bool = response_mask.bool()
    token_level = seq is None
    if token_level:
        seq = vf.masked_mean(stat, response_mask, axis=-1)
    n_seq = seq_valid.sum()
    seq_max = seq.masked_fill(~seq_valid, float("-inf")).max()
    seq_min = seq.masked_fill(~seq_valid, float("inf")).min()

    def seq_share(cond):
        return (cond & seq_valid).sum() / n_seq

    metrics[f"{prefix}_mean"] = vf.masked_mean(stat, response_mask)
    if token_level:
        metrics[f"{prefix}_max"] = stat.masked_fill(~mask_bool, float("-inf")).max()
        metrics[f"{prefix}_min"] = stat.masked_fill(~mask_bool, float("inf")).min()
        metrics[f"{prefix}_fraction_high"] = vf.masked_mean((stat > hi).float(), response_mask)
        low = vf.masked_mean((stat < lo).float(), response_mask) if apply_lower else 0.0
    else:
        metrics[f"{prefix}_max"], metrics[f"{prefix}_min"] = seq_max, seq_min
        metrics[f"{prefix}_fraction_high"] = seq_share(seq > hi)
        low = seq_share(seq < lo) if apply_lower else 0.0
    metrics[f"{prefix}_fraction_low"] = low
    metrics[f"{prefix}_std"] = _masked_std(vf, stat.clamp(min=lo if apply_lower else 0.0, max=hi), response_mask)
    seq_mean = torch.where(seq_valid, seq, torch.zeros_like(seq)).sum() / n_seq
    centred = torch.where(seq_valid, seq - seq_mean, torch.zeros_like(seq))
    seq_std = torch.sqrt(centred.square().sum() / (n_seq - 1).clamp(min=1))
    metrics[f"{prefix}_seq_mean"] = seq_mean
    metrics[f"{prefix}_seq_std"] = _where(n_seq > 1, seq_std, 0.0)
    metrics[f"{prefix}_seq_max"], metrics[f"{prefix}_seq_min"] = seq_max, seq_min
    metrics[f"{prefix}_seq_max_deviation"] = seq.abs().masked_fill(~seq_valid, float("-inf")).max()
    metrics[f"{prefix}_seq_fraction_high"] = seq_share(seq > hi)
    if apply_lower:
        metrics[f"{prefix}_seq_fraction_low"] = seq_share(seq < lo)


# --- off-policy diagnostics (verl: compute_offpolicy_metrics) ----------------------------------


def _offpolicy_metrics(vf, old, rollout, response_mask, metrics, kl=None, k3=None, log_ratio=None):
    mean_old = vf.masked_mean(old, response_mask, axis=-1)
    metrics["training_ppl"] = torch.exp(-mean_old).mean()
    metrics["training_log_ppl"] = (-mean_old).mean()
    if rollout is None:
        return
    if kl is None:
        _, kl, k3 = _weights_and_kl(old, rollout, response_mask, "token")
    metrics["kl"], metrics["k3_kl"] = kl, k3
    mean_rollout = vf.masked_mean(rollout, response_mask, axis=-1)
    metrics["rollout_ppl"] = torch.exp(-mean_rollout).mean()
    metrics["rollout_log_ppl"] = (-mean_rollout).mean()
    log_ppl_diff = mean_rollout - mean_old
    metrics["log_ppl_diff"] = log_ppl_diff.mean()
    metrics["log_ppl_abs_diff"] = log_ppl_diff.abs().mean()
    metrics["log_ppl_diff_max"] = log_ppl_diff.max()
    metrics["log_ppl_diff_min"] = log_ppl_diff.min()
    metrics["ppl_ratio"] = torch.exp(log_ppl_diff).mean()
    log_ratio = old - rollout if log_ratio is None else log_ratio
    rho = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND))
    metrics["chi2_token"] = vf.masked_mean(rho.square(), response_mask) - 1.0
    log_seq = torch.clamp(vf.masked_sum(log_ratio, response_mask, axis=-1), min=-SAFETY_BOUND, max=SAFETY_BOUND)
    metrics["chi2_seq"] = torch.exp(2.0 * log_seq).mean() - 1.0


# --- drop-ins ---------------------------------------------------------------------------------------

_EMPTY_MASK = "response_mask must contain at least one valid token (1)."


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str | None = None,
    rollout_is_threshold: str | float | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: str | float | None = None,
):
    """Drop-in for verl's ``compute_rollout_correction_and_rejection_mask``: IS weights (``rollout_is``
    ``"token"``/``"sequence"``, TIS for a float threshold, IcePop for ``"lower_upper"``, optional batch
    normalisation), the rejection mask of ``rollout_rs`` (comma-separated ``token_k{1,2,3}``,
    ``seq_sum_k{1,2,3}``, ``seq_mean_k{1,2,3}``, ``seq_max_k{2,3}``) and verl's metrics.

    Returns verl's tuple ``(DataProto with "rollout_is_weights" or None, modified response_mask,
    {"rollout_corr/...": float})``. Weights and KL estimates from one ``lenkernels.rollout_correction``
    pass; one host transfer for every metric.
    """
    helper, vf = _verl()
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(
            f"old_log_prob shape {old_log_prob.shape} does not match rollout_log_prob shape {rollout_log_prob.shape}."
        )
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(
            f"log_prob shape {old_log_prob.shape} does not match response_mask shape {response_mask.shape}."
        )
    if rollout_is is not None and rollout_is not in _LEVELS:
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {set(_LEVELS)}.")
    if old_log_prob.dim() != 2:  # verl's code is written for [batch, length] (its sequence sums are over dim -1)
        raise ValueError(f"old_log_prob must be [batch_size, seq_length], got shape {tuple(old_log_prob.shape)}")
    with torch.no_grad():
        log_ratio = old_log_prob - rollout_log_prob
        metrics = _Metrics()
        with_is = rollout_is is not None and rollout_is_threshold is not None
        raw, kl, k3 = _weights_and_kl(old_log_prob, rollout_log_prob, response_mask, rollout_is if with_is else "token")
        weights = None
        if with_is:
            weights = _is_weights(helper, vf, log_ratio, raw, response_mask, rollout_is, rollout_is_threshold,
                                  rollout_is_batch_normalize, metrics)  # fmt: skip
        new_mask = response_mask.clone()
        if rollout_rs is not None:
            if rollout_rs_threshold is None:
                raise ValueError(
                    "rollout_rs_threshold must be explicitly provided when rollout_rs is enabled. "
                    "Set rollout_rs_threshold to the desired threshold value."
                )
            new_mask = _rejection_mask(helper, vf, log_ratio, response_mask, rollout_rs, rollout_rs_threshold, metrics)
        _offpolicy_metrics(vf, old_log_prob, rollout_log_prob, response_mask, metrics, kl, k3, log_ratio)
        values = metrics.to_host(check=(response_mask != 0).any(), message=_EMPTY_MASK)
    proto = None
    if weights is not None:
        from verl.protocol import DataProto

        proto = DataProto.from_dict(tensors={"rollout_is_weights": weights})
    return proto, new_mask, {f"{PREFIX}{k}": v for k, v in values.items()}


def compute_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask) -> dict:
    """Drop-in for verl's ``compute_offpolicy_metrics`` (perplexities, KL k1/k3, log-PPL differences,
    χ²): the KL estimates from one ``lenkernels.rollout_correction`` pass, one host transfer."""
    _, vf = _verl()
    with torch.no_grad():
        metrics = _Metrics()
        _offpolicy_metrics(vf, old_log_prob, rollout_log_prob, response_mask, metrics)
        return metrics.to_host(
            check=(response_mask != 0).any(),
            message="Expected at least one valid token in response_mask",
            error=AssertionError,
        )
