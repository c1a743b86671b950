"""Reference policy losses and KL estimators (SPEC 2-3), float64-capable.

Written the way the trainers write them (verl's ``core_algos``: ``compute_policy_loss_*``,
``kl_penalty``, ``agg_loss``; TRL's ``GRPOTrainer._compute_loss``), with autograd supplying every
gradient, so the kernels' closed-form derivatives are tested against an independent definition.
Packed inputs are unpacked into a padded ``[B, T_max]`` layout first (a Python loop: this is a
definition, not a kernel). The launchers at the end are the ``backend="reference"`` implementation
of the policy_loss family (the signatures of ``lenkernels/{cpu,cuda,triton}/policy_loss.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch

from lenkernels._codes import Agg, Mode, NormSource, Stat, name_of, names
from lenkernels.reference.phase_stats import top_entropy_threshold

MODES = names(Mode)  # ("ppo", "gspo", "luspo", "cispo", "sapo", "gmpo", "reinforce", "dppo_tv", "dppo_kl", "dro")
AGGS = names(Agg)  # ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# public spellings of the estimators -> their names in _codes.KLEstimator
KL_ESTIMATORS = {"k1": "k1", "kl": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}

# What each entry of the statistics vector (``_codes.Stat``) is: the keys of :func:`policy_loss`'s
# dict and the fields of ``lenkernels.PolicyLoss``. num_seqs and inv_norm are the kernels' own
# (what the backward reads), not part of the definition.
STAT_NAMES = {
    Stat.STAT_LOSS: "loss", Stat.STAT_POLICY: "pg_loss", Stat.STAT_KL: "kl_loss", Stat.STAT_ENTROPY: "entropy_loss",
    Stat.STAT_CLIP_LOW: "clip_frac_low", Stat.STAT_CLIP_HIGH: "clip_frac_high", Stat.STAT_CLIP_DUAL: "clip_frac_dual",
    Stat.STAT_APPROX_KL: "approx_kl", Stat.STAT_RATIO_MIN: "ratio_min", Stat.STAT_RATIO_MEAN: "ratio_mean",
    Stat.STAT_RATIO_MAX: "ratio_max", Stat.STAT_ENTROPY_MEAN: "entropy_mean", Stat.STAT_TOKENS: "num_tokens",
    Stat.STAT_SEQS: "num_seqs", Stat.STAT_INV_NORM: "inv_norm", Stat.STAT_KEPT: "entropy_kept",
}  # fmt: skip

# Mode defaults: (clip_low, clip_high, aggregation). GSPO's eps from the GSPO paper (v2, 5.1);
# GMPO's bounds are on the log-ratio (the GMPO paper's (e^-0.4, e^0.4)); SAPO, GSPO and LUSPO
# aggregate seq-mean-token-mean as verl forces for them.
MODE_DEFAULTS = {
    "ppo": (0.2, None, "token-mean"),
    "gspo": (3e-4, 4e-4, "seq-mean-token-mean"),
    "luspo": (3e-4, 4e-4, "seq-mean-token-mean"),
    "cispo": (0.2, None, "token-mean"),
    "sapo": (0.2, None, "seq-mean-token-mean"),
    "gmpo": (0.4, None, "seq-mean-token-mean"),
    "reinforce": (0.2, None, "token-mean"),
    "dppo_tv": (0.2, None, "token-mean"),  # divergence thresholds: verl's clip_ratio
    "dppo_kl": (0.2, None, "token-mean"),
    "dro": (0.2, None, "token-mean"),
}
DPPO_TRUNCATION = 20.0  # verl's clip_ratio_c fallback in compute_policy_loss_dppo_*


def parse_kl_estimator(estimator: str) -> tuple[str, bool]:
    """``"k3+"`` -> ``("k3", True)``: the base estimator and whether the gradient is k2's."""
    if not isinstance(estimator, str):
        raise TypeError(f"kl_estimator must be a str, got {type(estimator).__name__}")
    straight = estimator.endswith("+")
    base = KL_ESTIMATORS.get(estimator[:-1] if straight else estimator)
    if base is None:
        names = tuple(KL_ESTIMATORS) + tuple(f"{k}+" for k in KL_ESTIMATORS)
        raise ValueError(f"kl_estimator must be one of {names}, got {estimator!r}")
    return base, straight


def kl_penalty(logprobs, ref_logprobs, estimator: str = "k3", clamp: bool = True) -> torch.Tensor:
    """SPEC 2, per token, delta = ref - logprob: k1 ``-delta``; abs ``|delta|``; k2 ``delta^2/2``;
    k3 ``exp(delta) - delta - 1`` (``clamp``: verl's delta in [-20, 20], value in [-10, 10]; TRL
    clamps nothing). A trailing ``+``: the value of the estimator with the gradient of k2."""
    base, straight = parse_kl_estimator(estimator)
    delta = ref_logprobs - logprobs
    if base == "k1":
        value = logprobs - ref_logprobs
    elif base == "abs":
        value = delta.abs()
    elif base == "k2":
        value = 0.5 * delta.square()
    elif clamp:  # expm1: exp(d) - 1 - d cancels even in float64 (5e-5 relative at |d| ~ 3e-6)
        d = delta.clamp(-20.0, 20.0)
        value = (torch.expm1(d) - d).clamp(-10.0, 10.0)
    else:
        value = torch.expm1(delta) - delta
    if straight and base != "k2":
        k2 = 0.5 * delta.square()
        value = k2 - k2.detach() + value.detach()
    return value


def resolve_clip(mode: str, clip_low, clip_high) -> tuple[float, float]:
    default_low, default_high, _ = MODE_DEFAULTS[mode]
    low = default_low if clip_low is None else float(clip_low)
    if clip_high is not None:
        high = float(clip_high)
    elif clip_low is None and default_high is not None:
        high = default_high
    else:
        high = low
    return low, high


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, fill=0.0) -> torch.Tensor:
    """Packed ``[N]`` -> padded ``[B, T_max]`` (differentiable; pad with ``fill``)."""
    bounds = cu_seqlens.tolist()
    rows = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    width = max([b - a for a, b in zip(bounds[:-1], bounds[1:])] + [1])
    out = [torch.cat([r, torch.full((width - r.shape[0],), fill, dtype=x.dtype, device=x.device)]) for r in rows]
    return torch.stack(out) if out else x.new_zeros((0, width))


def entropy_quantile_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float):
    """TRL's ``get_high_entropy_mask`` threshold: ``torch.quantile`` of the float32 entropies of the
    valid tokens at ``1 - rho`` (linear interpolation, float32 as TRL computes it); tokens with
    ``H >= threshold`` keep their policy term. NaN (no token kept) without valid tokens or with a
    NaN entropy among them."""
    return top_entropy_threshold(entropy, mask, top_entropy_quantile)


def _aggregate(x, m, n, agg, num_tokens, num_seqs, norm_length, dp_size):
    """verl's ``agg_loss`` (with TRL's clamp(min=1) guards): ``x`` [B, T] (finite where m), ``m`` bool."""
    xm = torch.where(m, x, torch.zeros_like(x))
    if agg == "token-mean":
        d = num_tokens if num_tokens is not None else m.sum().clamp(min=1)
        return xm.sum() / d * dp_size
    if agg == "token-sum":
        return xm.sum() * dp_size
    d = num_seqs if num_seqs is not None else (n > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (xm.sum(-1) / n.clamp(min=1)).sum() / d * dp_size
    per_seq = xm.sum(-1).sum() / d * dp_size
    if agg == "seq-mean-token-sum":
        return per_seq
    return per_seq / norm_length


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask=None,
    *,
    mode="ppo",
    clip_low=None,
    clip_high=None,
    clip_dual=None,
    tau_pos=1.0,
    tau_neg=1.05,
    dro_beta=None,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    kl_clamp=True,
    entropy=None,
    entropy_coef=0.0,
    top_entropy_quantile=1.0,
    entropy_threshold=None,
    importance_weights=None,
    agg=None,
    num_tokens=None,
    num_seqs=None,
    norm_length=None,
    dp_size=1,
    cu_seqlens=None,
    dtype=torch.float64,
) -> dict:
    """SPEC 3: the loss and metrics as a dict of 0-dim tensors in ``dtype``; ``loss`` is
    differentiable in ``logprobs`` and ``entropy`` (autograd). Same arguments as
    ``lenkernels.policy_loss`` (see its docstring for the conventions). ``out["scales"]`` holds,
    per reduced quantity, the same reduction of the absolute terms (for error bounds)."""
    clip_low, clip_high = resolve_clip(mode, clip_low, clip_high)
    agg = agg or MODE_DEFAULTS[mode][2]
    if cu_seqlens is not None:
        n_seq, n_tok = cu_seqlens.numel() - 1, logprobs.shape[0]
        # [B, 1] is per sequence; [B] too, unless B == N (then per token, like every [N] tensor)
        seq_adv = tuple(advantages.shape) == (n_seq, 1) or (tuple(advantages.shape) == (n_seq,) and n_seq != n_tok)

        def pad(x, fill=0.0):
            return None if x is None else unpack(x, cu_seqlens, fill)

        valid = pad(torch.ones_like(logprobs) if mask is None else (mask != 0).to(logprobs.dtype)) != 0
        logprobs, old_logprobs, ref_logprobs, entropy, importance_weights = map(
            pad, (logprobs, old_logprobs, ref_logprobs, entropy, importance_weights)
        )
        advantages = advantages.reshape(-1, 1) if seq_adv else pad(advantages)
        if agg == "seq-mean-token-sum-norm" and norm_length is None:
            raise ValueError("norm_length is required for seq-mean-token-sum-norm with packed inputs")
    else:
        valid = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else mask != 0
    m = valid
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    if isinstance(num_tokens, torch.Tensor):
        num_tokens = num_tokens.to(dtype).reshape(())
    if isinstance(num_seqs, torch.Tensor):
        num_seqs = num_seqs.to(dtype).reshape(())

    def clean(x):  # padded positions may hold anything (NaN, inf): never let them reach a gradient
        return torch.where(m, x.to(dtype), zero)

    lp = clean(logprobs)
    old = clean(old_logprobs)
    adv = advantages.to(dtype)
    adv = clean(adv.reshape(-1, 1).expand_as(lp) if adv.dim() == 1 or adv.shape[-1] == 1 else adv)
    n = m.sum(-1).to(dtype)
    neg_kl = lp - old  # verl's negative_approx_kl
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    low = high = dual = torch.zeros_like(m)

    def ppo_clip(ratio):
        nonlocal low, high, dual
        pg1 = -adv * ratio
        pg2 = -adv * ratio.clamp(lo, hi)
        loss = torch.maximum(pg1, pg2)
        low, high = (pg2 > pg1) & (adv < 0), (pg2 > pg1) & (adv > 0)
        if clip_dual is not None:
            pg3 = -adv * clip_dual
            dual = (loss > pg3) & (adv < 0)
            loss = torch.where(adv < 0, torch.minimum(pg3, loss), loss)
        return loss

    if mode in ("ppo", "cispo", "sapo", "reinforce", "dppo_tv", "dppo_kl", "dro"):
        ratio = neg_kl.clamp(-20.0, 20.0).exp()
    if mode == "ppo":
        pg = ppo_clip(ratio)
    elif mode in ("gspo", "luspo"):
        seq_log_ratio = (neg_kl * m).sum(-1) / n.clamp(min=1)
        log_s = (lp - lp.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(max=10.0)
        ratio = log_s.exp()
        pg = ppo_clip(ratio)
        if mode == "luspo":  # TRL: (per_token_loss * completion_mask.sum(-1, keepdim=True))
            pg = pg * n.unsqueeze(-1)
    elif mode == "cispo":
        clipped = ratio.clamp(lo, hi)
        pg = -clipped.detach() * adv * lp
        low, high = ratio < lo, ratio > hi
    elif mode == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
        # exp(logsigmoid(x)), not sigmoid(x): autograd's sigmoid backward, s * (1 - s), cancels to 0
        # past x ~ 37 (and loses digits from x ~ 20) even in float64, where the kernels do not
        pg = -torch.exp(torch.nn.functional.logsigmoid(tau * (ratio - 1.0))) * (4.0 / tau) * adv
    elif mode == "gmpo":
        sgn = torch.sign(adv)
        clamped = neg_kl.clamp(-clip_low, clip_high)
        lmin = sgn * torch.minimum(sgn * neg_kl, sgn * clamped)
        seq_ratio = torch.exp((lmin * m).sum(-1) / (n + 1e-8))
        seq_adv = (adv * m).sum(-1) / (n + 1e-8)
        seq_loss = -seq_adv * seq_ratio
        if importance_weights is not None:
            w = clean(importance_weights)
            seq_loss = seq_loss * torch.exp((torch.log(w + 1e-10) * m).sum(-1) / (n + 1e-8))
        pg = seq_loss.unsqueeze(-1).expand_as(lp)
        ratio = seq_ratio.unsqueeze(-1).expand_as(lp)
        low, high = (adv < 0) & (neg_kl < -clip_low), (adv > 0) & (neg_kl > clip_high)
    elif mode == "reinforce":
        pg = -adv * lp
    elif mode in ("dppo_tv", "dppo_kl"):  # verl compute_policy_loss_dppo_tv / _kl
        c = DPPO_TRUNCATION if clip_dual is None else clip_dual
        truncated = ratio.clamp(max=c).detach()
        prob, old_prob = lp.exp(), old.exp()
        if mode == "dppo_tv":
            valid_pos = (prob - old_prob) <= clip_high
            valid_neg = (prob - old_prob) >= -clip_low
        else:
            binary_kl = old_prob * (old - lp) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
            )
            valid_pos = (binary_kl <= clip_high) | (prob <= old_prob)
            valid_neg = (binary_kl <= clip_low) | (prob >= old_prob)
        valid_tok = torch.where(adv > 0, valid_pos, valid_neg).detach()
        pg = -adv * truncated * lp * valid_tok.to(dtype)
        # verl: pg_clipfrac = mean(1 - valid) (= low + high), pg_clipfrac_lower = mean((r > C) * valid)
        low, high, dual = ~valid_tok & (adv <= 0), ~valid_tok & (adv > 0), valid_tok & (ratio > c)
    elif mode == "dro":  # verl compute_policy_loss_dro
        if dro_beta is None or not dro_beta > 0:
            raise ValueError(f"dro_beta must be a positive number for mode 'dro', got {dro_beta!r}")
        pg = -(lp * adv - 0.5 * dro_beta * neg_kl.square())
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    if importance_weights is not None and mode != "gmpo":
        pg = pg * clean(importance_weights)
    ent = clean(entropy) if entropy is not None else None
    kept = None
    if ent is not None and (entropy_threshold is not None or top_entropy_quantile < 1.0):
        thr = entropy_threshold
        if thr is None:
            thr = entropy_quantile_threshold(ent.detach(), m, top_entropy_quantile)
        # entropies compared as float32 (TRL's dtype, what every kernel reads): with float64 inputs a
        # token at the float32 quantile must not fall below it by the rounding of its own value
        h32 = ent.detach().float().to(torch.float64)
        kept = m & (h32 >= torch.as_tensor(thr, dtype=torch.float64).to(ent.device))
        pg = pg * kept
    total = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(lp, clean(ref_logprobs).detach(), kl_estimator, kl_clamp)
        total = total + kl_coef * kl
    if ent is not None:
        total = total - entropy_coef * ent

    if norm_length is None:
        norm_length = m.shape[-1]
    agg_args = (m, n, agg, num_tokens, num_seqs, norm_length, dp_size)
    count = m.sum().to(dtype)
    denom = count.clamp(min=1)

    def mean(x):
        return torch.where(m, x.to(dtype), zero).sum() / denom

    inf = torch.tensor(math.inf, dtype=dtype, device=lp.device)
    ratio_d = ratio.detach()
    out = {
        "loss": _aggregate(total, *agg_args),
        "pg_loss": _aggregate(pg, *agg_args).detach(),
        "kl_loss": None if kl is None else _aggregate(kl, *agg_args).detach(),
        "entropy_loss": None if ent is None else _aggregate(ent, *agg_args).detach(),
        "clip_frac_low": mean(low),
        "clip_frac_high": mean(high),
        "clip_frac_dual": mean(dual),
        "approx_kl": mean(-neg_kl).detach(),
        "ratio_min": torch.where(m, ratio_d, inf).min() if m.numel() else inf,
        "ratio_mean": mean(ratio_d),
        "ratio_max": torch.where(m, ratio_d, -inf).max() if m.numel() else -inf,
        "entropy_mean": None if ent is None else mean(ent).detach(),
        "entropy_kept": None if kept is None else mean(kept),
        "num_tokens": count,
    }
    # the magnitude of the terms each reduction summed: an fp32 sum's error grows with it
    absolute = {"loss": total, "pg_loss": pg, "kl_loss": kl, "entropy_loss": ent}
    out["scales"] = {k: None if v is None else _aggregate(v.detach().abs(), *agg_args) for k, v in absolute.items()}
    out["scales"].update(approx_kl=mean(neg_kl.detach().abs()), ratio_mean=mean(ratio_d.abs()),
                         entropy_mean=None if ent is None else mean(ent.detach().abs()))
    return out


# --- launchers of the reference backend (the signatures of lenkernels/{cpu,cuda,triton}/policy_loss.py)


def _definition(t, cfg, logprobs=None, entropy=None) -> dict:
    """:func:`policy_loss` in float64 on the op's tensors ``t`` (``PolicyTokens``) and config
    ``cfg`` (``PolicyConfig``); ``logprobs`` / ``entropy`` replace those inputs when given (the
    primals of ``torch.func.vjp``)."""

    def f64(x):
        return None if x is None else x.detach().to(torch.float64)

    norm = {
        NormSource.NORM_COUNTED: None,
        NormSource.NORM_TENSOR: None if t.normaliser is None else f64(t.normaliser).reshape(()),
        NormSource.NORM_CONSTANT: cfg.norm_const,
    }[cfg.norm_source]
    seq_mean = cfg.agg not in (Agg.TOKEN_MEAN, Agg.TOKEN_SUM)
    # per-sequence advantages as [B, 1]: a packed [B] with B == N would read as per token
    adv = t.advantages if t.adv_per_token else t.advantages.reshape(-1, 1)
    # the config's scalars named like an argument of policy_loss pass by name (tau_pos, kl_coef,
    # dro_beta, ...: a new one needs no line here); codes and encoded values are translated below
    same = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in _BY_NAME}
    return policy_loss(
        f64(t.logprobs) if logprobs is None else logprobs, f64(t.old_logprobs), f64(adv), t.mask, **same,
        mode=name_of(Mode(int(cfg.mode))), clip_dual=cfg.clip_dual if cfg.clip_dual > 0 else None,
        ref_logprobs=f64(t.ref_logprobs), kl_estimator=name_of(cfg.kl_est) + ("+" if cfg.kl_straight else ""),
        entropy=f64(t.entropy) if entropy is None else entropy,
        entropy_threshold=None if t.threshold is None else f64(t.threshold).reshape(()),
        importance_weights=f64(t.importance_weights), agg=name_of(cfg.agg),
        num_tokens=norm if cfg.agg == Agg.TOKEN_MEAN else None, num_seqs=norm if seq_mean else None,
        cu_seqlens=t.cu_seqlens, dtype=torch.float64,
    )  # fmt: skip


# PolicyConfig fields passed to policy_loss unchanged: those named like one of its arguments, but the
# codes and the encoded clip_dual (0: none)
_BY_NAME = frozenset(inspect.signature(policy_loss).parameters) - {"mode", "agg", "clip_dual"}


def policy_loss_fwd(t, cfg, stats: torch.Tensor, seq: torch.Tensor) -> None:
    """Writes ``stats`` (fp32 ``[16]``, Stat layout; num_seqs and inv_norm 0) from the float64
    definition; ``seq`` (the kernels' per-sequence values) is left as given."""
    out = _definition(t, cfg)
    zero = torch.zeros((), dtype=torch.float64)
    values = []
    for code in sorted(STAT_NAMES):
        value = None if code in (Stat.STAT_SEQS, Stat.STAT_INV_NORM) else out.get(STAT_NAMES[code])
        values.append(zero if value is None else value.detach().cpu().to(torch.float64))
    stats.copy_(torch.stack(values).to(torch.float32))


def policy_loss_bwd(t, cfg, stats, seq, g_stats, dlogprobs: torch.Tensor, dentropy: torch.Tensor | None) -> None:
    """Writes d loss / d logprobs (and d loss / d entropy when ``dentropy`` is given): the custom
    op's body runs below autograd, so the definition is differentiated with torch.func."""
    primals = (t.logprobs.detach().to(torch.float64),)
    if dentropy is not None:
        primals += (t.entropy.detach().to(torch.float64),)

    def loss(*xs):
        return _definition(t, cfg, *xs)["loss"]

    _, vjp = torch.func.vjp(loss, *primals)
    grads = vjp(g_stats[Stat.STAT_LOSS].to(torch.float64))
    dlogprobs.copy_(grads[0])
    if dentropy is not None:
        dentropy.copy_(grads[1])


def kl_penalty_fwd(logprobs, ref_logprobs, cfg, out: torch.Tensor) -> None:
    """Writes the per-token estimate (``cfg``: ``KLConfig``) into ``out`` (fp32)."""
    out.copy_(kl_penalty(logprobs.double(), ref_logprobs.double(), name_of(cfg.est), cfg.clamp))


def kl_penalty_bwd(logprobs, ref_logprobs, grad, cfg, dlogprobs: torch.Tensor, dref: torch.Tensor) -> None:
    """Writes d logprobs and d ref_logprobs from the cotangent ``grad`` of the estimate."""
    estimator = name_of(cfg.est) + ("+" if cfg.straight else "")
    _, vjp = torch.func.vjp(
        lambda a, b: kl_penalty(a, b, estimator, cfg.clamp), logprobs.detach().double(), ref_logprobs.detach().double()
    )
    d_lp, d_rf = vjp(grad.double())
    dlogprobs.copy_(d_lp)
    dref.copy_(d_rf)
