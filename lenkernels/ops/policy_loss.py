"""Fused policy losses (SPEC 3) and KL estimators (SPEC 2): ratio, clipping, dual clip, KL,
entropy bonus, importance weights, top-entropy mask, aggregation and metrics in one fused pass.

Chain of names: ``policy_loss`` (public) -> ``lenkernels::policy_loss`` (custom op with autograd)
-> ``policy_loss_fwd`` / ``policy_loss_bwd`` (host launchers) -> one call of
``_backend.kernels(backend, "policy_loss")``: ``lenkernels/{triton,cuda,cpu,reference}/policy_loss.py``,
the same launchers on every backend (typed tensors, a frozen config, the outputs to write) -> kernels
(``triton/policy_loss.py``, ``csrc/cpu/policy_loss.cpp``, ``csrc/cuda/policy_loss.cu``; the maths
shared by the compiled backends is ``csrc/include/lenkernels/policy_loss.h``). ``kl_penalty``
follows the same chain. ``policy_loss_from_logits`` composes ``token_logprobs_entropy`` with the loss.
The arguments' types, checks and the custom ops' schemas are ``ops/policy_loss_args.py``.

The op returns a statistics vector (loss and metrics, ``_codes.Stat`` layout) and the
per-sequence values its backward needs; only the loss is differentiable.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lenkernels import _backend, _checks
from lenkernels._codes import NormSource, SeqValue, Stat
from lenkernels.ops import policy_loss_args as args
from lenkernels.ops.policy_loss_args import KLConfig, PolicyConfig, PolicyInputs, kernel_tokens
from lenkernels.ops.token_stats import token_logprobs_entropy
from lenkernels.reference import policy_loss as ref

FAMILY = "policy_loss"
_backend.register_family(FAMILY, ("triton", "cuda", "cpu", "reference"))

MODES = ref.MODES
AGGS = ref.AGGS
STAT_NAMES = tuple(ref.STAT_NAMES[code] for code in sorted(ref.STAT_NAMES))  # in _codes.Stat order
NUM_STATS = int(Stat.NUM_STATS)
NUM_SEQ_VALUES = int(SeqValue.NUM_SEQ_VALUES)
_STAT_OF = {name: int(code) for code, name in ref.STAT_NAMES.items()}


class PolicyLoss(NamedTuple):
    """Result of :func:`policy_loss`: 0-dim float32 tensors on the input device (no host sync).

    Only ``loss`` is differentiable; every other field is detached. Fields that need an optional
    input are None without it.
    """

    loss: torch.Tensor
    """The aggregated loss: ``agg(w e P + kl_coef K - entropy_coef H)``."""
    pg_loss: torch.Tensor
    """The policy term alone, aggregated (with importance weights and the top-entropy mask)."""
    kl_loss: torch.Tensor | None
    """The KL estimator aggregated like the loss (without ``kl_coef``); None without ref_logprobs."""
    entropy_loss: torch.Tensor | None
    """The entropy aggregated like the loss (without ``entropy_coef``); None without entropy."""
    clip_frac_low: torch.Tensor
    """Fraction of valid tokens whose low clip is active (A < 0 and ratio < 1 - eps_low). dppo_tv,
    dppo_kl: tokens outside the trust region with A <= 0 (``clip_frac_low + clip_frac_high`` is
    verl's ``pg_clipfrac``)."""
    clip_frac_high: torch.Tensor
    """Fraction of valid tokens whose high clip is active (A > 0 and ratio > 1 + eps_high). dppo_tv,
    dppo_kl: tokens outside the trust region with A > 0."""
    clip_frac_dual: torch.Tensor
    """Fraction of valid tokens whose dual clip is active (A < 0 and ratio > clip_dual; verl's
    ``pg_clipfrac_lower``). dppo_tv, dppo_kl: tokens inside the trust region whose ratio the
    truncation C caps (ratio > C: verl's ``pg_clipfrac_lower`` of those modes)."""
    approx_kl: torch.Tensor
    """Mean over valid tokens of ``old_logprob - logprob`` (verl's ppo_kl; verl clamps the log-ratio
    to +-20 first, except for dro: the two differ only where ``|l| > 20``)."""
    ratio_min: torch.Tensor
    """Smallest importance ratio over valid tokens (+inf without valid tokens)."""
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    """Largest importance ratio over valid tokens (-inf without valid tokens)."""
    entropy_mean: torch.Tensor | None
    """Mean entropy over valid tokens; None without entropy."""
    entropy_kept: torch.Tensor | None
    """Fraction of valid tokens the top-entropy mask keeps; None without that mask."""
    num_tokens: torch.Tensor
    """Number of valid tokens (float32)."""

    def metrics(self) -> dict[str, torch.Tensor]:
        """The fields that are set, as ``{name: 0-dim tensor}`` (detached), for logging."""
        return {k: v.detach() for k, v in self._asdict().items() if v is not None}


# --- host launchers: allocate, then one call of the backend's launcher ---------------------------


def _n_seqs(inputs: PolicyInputs) -> int:
    return inputs.cu_seqlens.shape[0] - 1 if inputs.cu_seqlens is not None else inputs.logprobs.shape[0]


def _check_consistent(inputs: PolicyInputs, config: PolicyConfig) -> None:
    """The optional tensors the config reads are there (a direct call of the op could omit them)."""
    if (config.norm_source == NormSource.NORM_TENSOR) != (inputs.normaliser is not None):
        raise ValueError("normaliser must be given exactly when norm_source is NormSource.NORM_TENSOR")
    if inputs.threshold is not None and inputs.entropy is None:
        raise ValueError("an entropy threshold needs the entropy")


def policy_loss_fwd(inputs: PolicyInputs, config: PolicyConfig, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Host launcher: ``(stats [16] fp32, seq [B, 4] fp32)`` (``_codes.Stat`` / ``SeqValue`` layouts;
    ``seq`` stays 0 where the mode and aggregation need no per-sequence values)."""
    _check_consistent(inputs, config)
    device = inputs.logprobs.device
    stats = torch.empty(NUM_STATS, dtype=torch.float32, device=device)
    seq = torch.zeros((_n_seqs(inputs), NUM_SEQ_VALUES), dtype=torch.float32, device=device)
    _backend.kernels(backend, FAMILY).policy_loss_fwd(kernel_tokens(inputs), config, stats, seq)
    return stats, seq


def policy_loss_bwd(inputs: PolicyInputs, config: PolicyConfig, backend: str, stats, seq, g_stats,
                    need_dentropy: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Host launcher: ``(dlogprobs, dentropy)`` in the dtypes and shapes of their inputs
    (``dentropy`` is an empty tensor when not needed)."""
    _check_consistent(inputs, config)
    logprobs, entropy = inputs.logprobs, inputs.entropy
    alloc = torch.zeros if inputs.cu_seqlens is not None else torch.empty  # packed: tokens outside sequences get 0
    d_lp = alloc(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    d_ent = alloc(entropy.shape, dtype=entropy.dtype, device=logprobs.device) if need_dentropy else None
    g_stats = g_stats.to(torch.float32).contiguous()
    _backend.kernels(backend, FAMILY).policy_loss_bwd(kernel_tokens(inputs), config, stats, seq, g_stats, d_lp, d_ent)
    return d_lp, (d_ent if need_dentropy else logprobs.new_empty(0))


def kl_penalty_fwd(logprobs, ref_logprobs, config: KLConfig, backend: str) -> torch.Tensor:
    """Host launcher: the per-token estimate, fp32 of ``logprobs.shape``."""
    out = torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    if logprobs.numel() > 0:
        _backend.kernels(backend, FAMILY).kl_penalty_fwd(logprobs.contiguous(), ref_logprobs.contiguous(), config, out)
    return out


def kl_penalty_bwd(grad, logprobs, ref_logprobs, config: KLConfig, backend: str):
    """Host launcher: ``(d logprobs, d ref_logprobs)`` in the dtypes of their inputs."""
    d_lp = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    d_rf = torch.empty(ref_logprobs.shape, dtype=ref_logprobs.dtype, device=logprobs.device)
    if logprobs.numel() > 0:
        _backend.kernels(backend, FAMILY).kl_penalty_bwd(
            logprobs.contiguous(), ref_logprobs.contiguous(), grad.contiguous(), config, d_lp, d_rf
        )
    return d_lp, d_rf


# --- torch.library registration: flat schemas generated from the fields of the typed arguments ----------

_N_INPUTS = len(PolicyInputs._fields)
_LOGPROBS, _ENTROPY = PolicyInputs._fields.index("logprobs"), PolicyInputs._fields.index("entropy")


def op_args(inputs: PolicyInputs, config: PolicyConfig, backend: str) -> tuple:
    """The flat arguments of ``lenkernels::policy_loss``: ``(*inputs, *config fields, backend)``."""
    return (*inputs, *args.flatten(config), backend)


def kl_op_args(logprobs, ref_logprobs, config: KLConfig, backend: str) -> tuple:
    """The flat arguments of ``lenkernels::kl_penalty``."""
    return (logprobs, ref_logprobs, *args.flatten(config), backend)


def _policy_loss(*flat):
    inputs, config, backend = args.unflatten(flat, PolicyInputs, PolicyConfig)
    return policy_loss_fwd(inputs, config, backend)


def _policy_loss_fake(*flat):
    inputs = PolicyInputs(*flat[:_N_INPUTS])
    lp = inputs.logprobs
    f32 = {"dtype": torch.float32, "device": lp.device}
    return torch.empty(NUM_STATS, **f32), torch.empty((_n_seqs(inputs), NUM_SEQ_VALUES), **f32)


def _policy_loss_backward(g_stats, stats, seq, *flat):
    inputs, config, backend, need_dentropy = args.unflatten(flat, PolicyInputs, PolicyConfig)
    return policy_loss_bwd(inputs, config, backend, stats, seq, g_stats, need_dentropy)


def _policy_loss_backward_fake(g_stats, stats, seq, *flat):
    inputs, need_dentropy = PolicyInputs(*flat[:_N_INPUTS]), flat[-1]
    lp, ent = inputs.logprobs, inputs.entropy
    d_ent = torch.empty(ent.shape, dtype=ent.dtype, device=lp.device) if need_dentropy else lp.new_empty(0)
    return torch.empty(lp.shape, dtype=lp.dtype, device=lp.device), d_ent


def _setup_context(ctx, inputs, output):
    stats, seq = output
    ctx.save_for_backward(*inputs[:_N_INPUTS], stats, seq)
    ctx.scalars = inputs[_N_INPUTS:]


def _backward(ctx, g_stats, g_seq):
    *tensors, stats, seq = ctx.saved_tensors
    need_dentropy = tensors[_ENTROPY] is not None and ctx.needs_input_grad[_ENTROPY]
    d_lp, d_ent = torch.ops.lenkernels.policy_loss_backward(g_stats, stats, seq, *tensors, *ctx.scalars, need_dentropy)
    grads = [None] * (_N_INPUTS + len(ctx.scalars))
    grads[_LOGPROBS] = d_lp
    if need_dentropy:
        grads[_ENTROPY] = d_ent
    return tuple(grads)


_policy_loss_op = torch.library.custom_op(
    "lenkernels::policy_loss", _policy_loss, mutates_args=(),
    schema=args.schema(PolicyInputs, PolicyConfig, "str backend", returns="(Tensor, Tensor)"),
)  # fmt: skip
_policy_loss_op.register_fake(_policy_loss_fake)
_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)
torch.library.custom_op(
    "lenkernels::policy_loss_backward", _policy_loss_backward, mutates_args=(),
    schema=args.schema("Tensor g_stats", "Tensor stats", "Tensor seq", PolicyInputs, PolicyConfig, "str backend",
                       "bool need_dentropy", returns="(Tensor, Tensor)"),
).register_fake(_policy_loss_backward_fake)  # fmt: skip


def _kl_penalty(logprobs, ref_logprobs, *flat):
    config, backend = args.unflatten(flat, KLConfig)
    return kl_penalty_fwd(logprobs, ref_logprobs, config, backend)


def _kl_penalty_fake(logprobs, ref_logprobs, *flat):
    return torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)


def _kl_penalty_backward(grad, logprobs, ref_logprobs, *flat):
    config, backend = args.unflatten(flat, KLConfig)
    return kl_penalty_bwd(grad, logprobs, ref_logprobs, config, backend)


def _kl_penalty_backward_fake(grad, logprobs, ref_logprobs, *flat):
    return (torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device),
            torch.empty(ref_logprobs.shape, dtype=ref_logprobs.dtype, device=logprobs.device))  # fmt: skip


def _kl_setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, *scalars = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.scalars = scalars


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    d_lp, d_rf = torch.ops.lenkernels.kl_penalty_backward(grad, logprobs, ref_logprobs, *ctx.scalars)
    return (d_lp, d_rf) + (None,) * len(ctx.scalars)


_kl_op = torch.library.custom_op(
    "lenkernels::kl_penalty", _kl_penalty, mutates_args=(),
    schema=args.schema("Tensor logprobs", "Tensor ref_logprobs", KLConfig, "str backend", returns="Tensor"),
)  # fmt: skip
_kl_op.register_fake(_kl_penalty_fake)
_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup_context)
torch.library.custom_op(
    "lenkernels::kl_penalty_backward", _kl_penalty_backward, mutates_args=(),
    schema=args.schema("Tensor grad", "Tensor logprobs", "Tensor ref_logprobs", KLConfig, "str backend",
                       returns="(Tensor, Tensor)"),
).register_fake(_kl_penalty_backward_fake)  # fmt: skip


# --- public API -------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    mode: str = "ppo",
    clip_low: float | None = None,
    clip_high: float | None = None,
    clip_dual: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: bool = True,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    entropy_threshold=None,
    importance_weights: torch.Tensor | None = None,
    agg: str | None = None,
    num_tokens=None,
    num_seqs=None,
    norm_length: float | None = None,
    dp_size: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> PolicyLoss:
    """Policy loss of SPEC 3 with its metrics, fused. Forward: one pass over the tokens (two for
    gspo/luspo/gmpo and the seq-mean-* aggregations, which need per-sequence sums first) and a
    one-program reduction of fixed-order partial sums; backward: one pass. No host sync.

    Per valid token (``l = logprob - old_logprob``, ``r = exp(clamp(l, -20, 20))``):
    ``T = w * e * P + kl_coef * K - entropy_coef * H``, aggregated by ``agg``. ``P`` by ``mode``:

    - ``"ppo"`` (verl vanilla, TRL grpo/bnpo/dr_grpo/dapo): ``max(-A r, -A clip(r, 1-eps_low,
      1+eps_high))``; with ``clip_dual = c > 1``, for A < 0: ``min(that, -A c)`` (verl's
      ``clip_ratio_c``; TRL's ``delta`` gives the same loss).
    - ``"gspo"``: sequence ratio ``s_b = exp(min(mean_t l, 10))`` in the token form
      ``sg(s_b) exp(logprob - sg(logprob))``, PPO-clipped. ``"luspo"``: GSPO times ``|y_b|``.
    - ``"cispo"``: ``-sg(clip(r, 1-eps_low, 1+eps_high)) A logprob`` (TRL's CISPO, whose bound is
      ``r <= epsilon_high``: ``clip_low=1.0, clip_high=epsilon_high - 1``).
    - ``"sapo"``: ``-sigmoid(tau (r - 1)) 4/tau A``, tau = ``tau_pos`` if A > 0 else ``tau_neg``.
    - ``"gmpo"`` (verl geo_mean): ``-mean_t(A) exp(mean_t sgn(A) min(sgn(A) l, sgn(A) clamp(l,
      -eps_low, eps_high)))`` per sequence (bounds on the log-ratio), importance weights folded in
      by their geometric mean per sequence (verl).
    - ``"reinforce"`` (verl gpg): ``-A logprob``.
    - ``"dppo_tv"``, ``"dppo_kl"`` (verl's DPPO-Binary-TV / -KL, arXiv 2602.04879):
      ``-A sg(min(r, C)) logprob`` on the tokens inside a trust region of the sampled token's
      probability ``p = exp(logprob)`` against ``p_old = exp(old_logprob)`` (no gradient through
      it; C = ``clip_dual``, default 20). dppo_tv keeps ``p - p_old <= eps_high`` where A > 0,
      ``p - p_old >= -eps_low`` elsewhere; dppo_kl keeps ``D <= eps_high or p <= p_old`` where
      A > 0, ``D <= eps_low or p >= p_old`` elsewhere, with the binary KL ``D = p_old (old_logprob -
      logprob) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))``. Metrics: ``clip_frac_low``
      / ``clip_frac_high`` count the tokens outside the region (A <= 0 / A > 0; their sum is verl's
      ``pg_clipfrac``), ``clip_frac_dual`` those inside it with r > C (verl's ``pg_clipfrac_lower``).
    - ``"dro"`` (verl's Direct Reward Optimization): ``-(logprob A - dro_beta / 2 l^2)``.

    Args:
        logprobs: ``[B, T]`` padded or ``[N]`` packed (with ``cu_seqlens``) log-probabilities of
            the sampled tokens, float32/bfloat16/float16 (float64 with ``backend="reference"``).
            Differentiable. Any row stride (unit stride along T avoids a copy).
        old_logprobs: the behaviour policy's log-probabilities, like ``logprobs``.
        advantages: per token (the shape of ``logprobs``) or per sequence (``[B]`` or ``[B, 1]``;
            packed with B == N: pass ``[B, 1]`` for per sequence).
        mask: response-token mask (bool, integer or float holding 0/1) like ``logprobs``; None: all
            tokens count. Masked positions may hold anything (NaN, inf): they never reach a result.
        mode: ``"ppo"``, ``"gspo"``, ``"luspo"``, ``"cispo"``, ``"sapo"``, ``"gmpo"``, ``"reinforce"``,
            ``"dppo_tv"``, ``"dppo_kl"``, ``"dro"``.
        clip_low, clip_high: eps_low / eps_high. Default per mode: ppo, cispo 0.2/0.2; gspo, luspo
            3e-4/4e-4 (GSPO paper); gmpo 0.4/0.4 (log space); dppo_tv, dppo_kl 0.2/0.2 (divergence
            thresholds, verl's clip_ratio_low/high; clip_low may exceed 1 there); ``clip_high``
            defaults to ``clip_low`` when only that is given (DAPO clip-higher: ``clip_high=0.28``).
        clip_dual: dual-clip constant c > 1 (ppo, gspo, luspo) or None (no dual clip; verl's
            default is 3.0, pass it explicitly). dppo_tv, dppo_kl: the truncation C > 0 of the
            ratio, ``min(r, C)`` (verl's ``clip_ratio_c``); None: 20, verl's fallback when the
            config has none (a verl ActorConfig carries clip_ratio_c = 3.0: pass it to match).
        tau_pos, tau_neg: SAPO temperatures (1.0, 1.05).
        dro_beta: dro's quadratic log-ratio penalty beta > 0 (verl's ``policy_loss.dro_beta``);
            required for mode ``"dro"``, refused for every other mode.
        ref_logprobs: reference-policy log-probabilities (not differentiated), for the KL term and
            the ``kl_loss`` metric. Required when ``kl_coef != 0``.
        kl_coef: weight of the KL term.
        kl_estimator: ``"k1"``/``"kl"``, ``"abs"``, ``"k2"``/``"mse"``, ``"k3"``/``"low_var_kl"``;
            a trailing ``"+"`` keeps the value and takes the gradient of k2 (verl).
        kl_clamp: verl's k3 clamps (delta to +-20, value to [-10, 10]); False for TRL's k3.
        entropy: per-token entropy like ``logprobs`` (e.g. from ``token_logprobs_entropy``).
            Differentiable through the ``entropy_coef`` term; required for ``entropy_coef``, the
            top-entropy mask and the entropy metrics.
        entropy_coef: weight of the entropy bonus (subtracted).
        top_entropy_quantile: rho in (0, 1]; < 1 keeps the policy term only on tokens whose entropy
            is >= the (1 - rho) quantile of the valid tokens' entropies (TRL, linear interpolation;
            computed with a sort on the device, no host sync).
        entropy_threshold: a given threshold (number or one-element tensor) instead of the
            quantile, e.g. TRL's quantile over all data-parallel ranks.
        importance_weights: rollout-correction weights like ``logprobs`` (not differentiated);
            they multiply the policy term only (as in verl and TRL), not KL or entropy.
        agg: ``"token-mean"``, ``"token-sum"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"``,
            ``"seq-mean-token-sum-norm"``; None: the mode's (seq-mean-token-mean for gspo, luspo,
            sapo, gmpo; token-mean otherwise).
        num_tokens: token-mean normaliser (number or one-element tensor, e.g. the global token count
            of the step) instead of this batch's valid-token count (verl batch_num_tokens, TRL dapo
            num_items_in_batch).
        num_seqs: seq-mean-* normaliser instead of this batch's count of non-empty sequences (verl
            global_batch_size; TRL's grpo/dr_grpo/luspo divide by every sequence: pass B).
        norm_length: the constant C of seq-mean-token-sum-norm (default T; required for packed
            inputs; TRL dr_grpo: max_completion_length; verl: loss_scale_factor).
        dp_size: the loss is multiplied by it (verl's ``* dp_size`` with global normalisers, TRL's
            ``num_items_in_batch / num_processes``), so the data-parallel gradient mean is the
            global normalisation.
        cu_seqlens: ``[B + 1]`` int offsets of the packed sequences (non-decreasing, within [0, N];
            tokens outside every sequence are ignored).
        backend: ``None`` (triton on CUDA, cpu on CPU), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        :class:`PolicyLoss`: 0-dim float32 tensors on the input device; ``loss`` is differentiable
        in ``logprobs`` and ``entropy``. Metrics are over valid tokens (0 when there are none;
        ``ratio_min``/``ratio_max`` are then +inf/-inf). An all-masked batch gives loss 0.

    Raises:
        ValueError / TypeError naming the argument; an empty batch (no tokens) is a ValueError.

    Example (packed layout, GRPO advantages per sequence, verl's k3 KL and dual clip)::

        cu = torch.tensor([0, 120, 300, 301], device="cuda")       # 3 responses, N = 301 tokens
        out = policy_loss(lp, old_lp, adv_per_seq, response_mask, cu_seqlens=cu, clip_dual=3.0,
                          ref_logprobs=ref_lp, kl_coef=1e-3, kl_estimator="low_var_kl")
        out.loss.backward()
        log({k: v.item() for k, v in out.metrics().items()})        # after the step: no sync inside
    """
    _checks.flags(kl_clamp=kl_clamp)
    _checks.tensor(logprobs, "logprobs")
    name = _backend.resolve(backend, FAMILY, logprobs.device)
    inputs, config, threshold_ok = args.resolve(
        logprobs, old_logprobs, advantages, mask, mode=mode, clip_low=clip_low, clip_high=clip_high,
        clip_dual=clip_dual, tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta, ref_logprobs=ref_logprobs,
        kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp, entropy=entropy, entropy_coef=entropy_coef,
        top_entropy_quantile=top_entropy_quantile, entropy_threshold=entropy_threshold,
        importance_weights=importance_weights, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
        norm_length=norm_length, dp_size=dp_size, cu_seqlens=cu_seqlens, backend=name,
    )  # fmt: skip
    stats, _ = torch.ops.lenkernels.policy_loss(*op_args(inputs, config, name))
    fields = {k: stats[_STAT_OF[k]].detach() for k in PolicyLoss._fields if k != "loss"}
    # a fresh tensor, not a view of the saved stats: trainers update the loss in place
    # (verl: ``policy_loss -= entropy_coeff * entropy_loss``)
    fields["loss"] = stats[_STAT_OF["loss"]].clone()
    if threshold_ok is not None:  # an unchecked NaN/inf threshold keeps no token: say NaN, not 0
        fields["loss"] = _checks.nan_unless(fields["loss"], threshold_ok)
    if ref_logprobs is None:
        fields["kl_loss"] = None
    if entropy is None:
        fields["entropy_loss"] = fields["entropy_mean"] = None
    if inputs.threshold is None:
        fields["entropy_kept"] = None
    return PolicyLoss(**fields)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    *,
    clamp: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate of SPEC 2 between the policy and a reference, delta = ref - logprob.

    Args:
        logprobs: ``[...]`` float32/bfloat16/float16 (float64 with ``backend="reference"``);
            differentiable.
        ref_logprobs: the same shape; differentiable too.
        estimator: ``"k1"``/``"kl"`` (``-delta``), ``"abs"`` (``|delta|``), ``"k2"``/``"mse"``
            (``delta^2 / 2``), ``"k3"``/``"low_var_kl"`` (``exp(delta) - delta - 1``); a trailing
            ``"+"`` (``"k3+"``): that value with the gradient of k2 (verl's straight-through form).
        clamp: verl's k3 clamps (delta to [-20, 20], value to [-10, 10]); False: TRL's plain k3.
            k3 is evaluated with a series near delta = 0, where fp32 ``exp(d) - d - 1`` cancels.
        backend: ``None``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        float32 tensor of ``logprobs.shape``.

    Example (packed layout: any shape works, the estimate is per token)::

        kl = kl_penalty(lp, ref_lp, "low_var_kl")                  # lp, ref_lp: [N]
        kl_loss = (kl * mask).sum() / mask.sum()
    """
    _checks.flags(clamp=clamp)
    _checks.tensor(logprobs, "logprobs")
    name = _backend.resolve(backend, FAMILY, logprobs.device)
    _checks.float_input(logprobs, "logprobs", name)
    _checks.float_input(ref_logprobs, "ref_logprobs", name, logprobs, "logprobs")
    config = args.kl_config(estimator, clamp)
    return torch.ops.lenkernels.kl_penalty(*kl_op_args(logprobs, ref_logprobs, config, name))


def policy_loss_from_logits(
    logits: torch.Tensor,
    ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature=1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group=None,
    backend: str | None = None,
    **loss_kwargs,
) -> PolicyLoss:
    """:func:`policy_loss` straight from the logits: ``token_logprobs_entropy`` (one read of the
    logits forward; its backward reads them once and writes d logits once, combining the
    log-probability and entropy gradients, SPEC 1) composed with the fused loss.

    Args:
        logits: ``[B, T, V]`` padded or ``[N, V]`` packed (then pass ``cu_seqlens=``), float32,
            bfloat16 or float16.
        ids: ``[B, T]`` / ``[N]`` sampled token ids (ignored rows, ``ignore_index``, get logprob 0:
            mask them out).
        old_logprobs, advantages, mask: as in :func:`policy_loss`.
        temperature: float or tensor broadcastable to ``ids``, applied in fp32 to the logits.
        inplace_backward: write d loss / d logits into ``logits`` (saves an ``[N, V]`` buffer).
        process_group: vocabulary-parallel group, passed to ``token_logprobs_entropy`` when set.
        backend: for both ops (``None``: each op's default).
        **loss_kwargs: every other :func:`policy_loss` argument (``mode``, ``clip_*``, ``kl_*``,
            ``entropy_coef``, ``agg``, ``cu_seqlens``, ...). ``entropy`` is the logits' own.

    Returns:
        :class:`PolicyLoss`; ``loss`` is differentiable in ``logits``.

    Example (packed)::

        out = policy_loss_from_logits(logits, ids, old_lp, adv, mask, cu_seqlens=cu, temperature=0.7,
                                      entropy_coef=1e-3, inplace_backward=True)
    """
    _checks.flags(inplace_backward=inplace_backward)
    if "entropy" in loss_kwargs:
        raise TypeError("policy_loss_from_logits computes the entropy itself; do not pass entropy")
    extra = {} if process_group is None else {"process_group": process_group}
    logprobs, entropy = token_logprobs_entropy(
        logits, ids, temperature=temperature, ignore_index=ignore_index, inplace_backward=inplace_backward,
        backend=backend, **extra,
    )  # fmt: skip
    return policy_loss(logprobs, old_logprobs, advantages, mask, entropy=entropy, backend=backend, **loss_kwargs)
