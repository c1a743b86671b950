"""Fused policy losses (SPEC 3) and KL estimators (SPEC 2): ratio, clipping, dual clip, KL,
entropy bonus, importance weights, top-entropy mask, aggregation and metrics in one fused pass.

Chain of names: ``policy_loss`` (public) -> ``lenkernels::policy_loss`` (custom op with autograd)
-> ``policy_loss_fwd`` / ``policy_loss_bwd`` (host launchers, one per backend) -> kernels
(``triton/policy_loss.py``, ``csrc/cpu/policy_loss.cpp``; the maths shared by the compiled
backends is ``csrc/include/lenkernels/policy_loss.h``). ``kl_penalty`` follows the same chain.
``policy_loss_from_logits`` composes ``token_logprobs_entropy`` with the loss.

The op returns a statistics vector (loss and metrics, ``lk::policy::Stat`` layout) and the
per-sequence values its backward needs; only the loss is differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from lenkernels import _backend, _checks
from lenkernels.ops.token_stats import token_logprobs_entropy
from lenkernels.reference import policy_loss as ref

FAMILY = "policy_loss"
_backend.register_family(FAMILY, ("triton", "cuda", "cpu", "reference"))

MODES = ref.MODES
AGGS = ref.AGGS
_MODE_CODES = {name: i for i, name in enumerate(MODES)}  # lk::policy::Mode
_AGG_CODES = {name: i for i, name in enumerate(AGGS)}  # lk::policy::Agg
_KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}  # lk::policy::KLEstimator
_NORM_COUNTED, _NORM_TENSOR, _NORM_CONSTANT = 0, 1, 2
_SEQ_MODES = ("gspo", "luspo", "gmpo")
_DUAL_MODES = ("ppo", "gspo", "luspo")

# lk::policy::Stat
STAT_NAMES = (
    "loss", "pg_loss", "kl_loss", "entropy_loss", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl",
    "ratio_min", "ratio_mean", "ratio_max", "entropy_mean", "num_tokens", "num_seqs", "inv_norm", "entropy_kept",
)  # fmt: skip
_STAT = {name: i for i, name in enumerate(STAT_NAMES)}
NUM_STATS = len(STAT_NAMES)
NUM_SEQ_VALUES = 4


class PolicyLoss(NamedTuple):
    """Result of :func:`policy_loss`: 0-dim float32 tensors on the input device (no host sync).

    Only ``loss`` is differentiable; every other field is detached. Fields that need an optional
    input are None without it.
    """

    loss: torch.Tensor
    """The aggregated loss: ``agg(w e P + kl_coef K - entropy_coef H)``."""
    pg_loss: torch.Tensor
    """The policy term alone, aggregated (with importance weights and the top-entropy mask)."""
    kl_loss: Optional[torch.Tensor]
    """The KL estimator aggregated like the loss (without ``kl_coef``); None without ref_logprobs."""
    entropy_loss: Optional[torch.Tensor]
    """The entropy aggregated like the loss (without ``entropy_coef``); None without entropy."""
    clip_frac_low: torch.Tensor
    """Fraction of valid tokens whose low clip is active (A < 0 and ratio < 1 - eps_low)."""
    clip_frac_high: torch.Tensor
    """Fraction of valid tokens whose high clip is active (A > 0 and ratio > 1 + eps_high)."""
    clip_frac_dual: torch.Tensor
    """Fraction of valid tokens whose dual clip is active (A < 0 and ratio > clip_dual)."""
    approx_kl: torch.Tensor
    """Mean over valid tokens of ``old_logprob - logprob`` (verl's ppo_kl)."""
    ratio_min: torch.Tensor
    """Smallest importance ratio over valid tokens (+inf without valid tokens)."""
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    """Largest importance ratio over valid tokens (-inf without valid tokens)."""
    entropy_mean: Optional[torch.Tensor]
    """Mean entropy over valid tokens; None without entropy."""
    entropy_kept: Optional[torch.Tensor]
    """Fraction of valid tokens the top-entropy mask keeps; None without that mask."""
    num_tokens: torch.Tensor
    """Number of valid tokens (float32)."""

    def metrics(self) -> dict[str, torch.Tensor]:
        """The fields that are set, as ``{name: 0-dim tensor}`` (detached), for logging."""
        return {k: v.detach() for k, v in self._asdict().items() if v is not None}


# --- kernel-side view of the inputs -------------------------------------------------------------


@dataclass
class _Config:
    mode: int
    lo: float
    hi: float
    dual: bool
    dual_c: float
    tau_pos: float
    tau_neg: float
    agg: int
    kl_est: int
    kl_straight: bool
    kl_clamp: bool
    kl_coef: float
    entropy_coef: float
    has_seq: bool
    norm_source: int
    norm_const: float
    scale: float


@dataclass
class _Tokens:
    """The per-token tensors in the layout the kernels read: padded ``[B, T]`` with unit column
    stride (any row stride) or packed ``[N]`` contiguous with ``cu_seqlens``."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor  # per token (like logprobs) or per sequence [B]
    mask: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    importance_weights: Optional[torch.Tensor]
    threshold: Optional[torch.Tensor]  # [1] float64
    normaliser: Optional[torch.Tensor]  # [1] float32
    cu_seqlens: Optional[torch.Tensor]
    adv_per_token: bool
    n_seqs: int
    seq_len: int  # padded T (0 for packed)


def _config(mode, clip_low, clip_high, clip_dual, tau_pos, tau_neg, kl_coef, kl_estimator, kl_clamp, entropy_coef,
            agg, norm_const, norm_length, dp_size, has_normaliser) -> _Config:  # fmt: skip
    est, straight = ref.parse_kl_estimator(kl_estimator)
    lo, hi = (-clip_low, clip_high) if mode == "gmpo" else (1.0 - clip_low, 1.0 + clip_high)
    if has_normaliser:
        source = _NORM_TENSOR
    elif norm_const > 0:
        source = _NORM_CONSTANT
    else:
        source = _NORM_COUNTED
    scale = dp_size / norm_length if agg == "seq-mean-token-sum-norm" else dp_size
    return _Config(
        mode=_MODE_CODES[mode], lo=lo, hi=hi, dual=clip_dual > 0, dual_c=clip_dual, tau_pos=tau_pos, tau_neg=tau_neg,
        agg=_AGG_CODES[agg], kl_est=_KL_CODES[est], kl_straight=straight and est != "k2", kl_clamp=kl_clamp,
        kl_coef=kl_coef, entropy_coef=entropy_coef, has_seq=mode in _SEQ_MODES or agg.startswith("seq-mean"),
        norm_source=source, norm_const=norm_const, scale=scale,
    )  # fmt: skip


def _kernel_layout(x: Optional[torch.Tensor], packed: bool, dtype=None) -> Optional[torch.Tensor]:
    """Unit stride along tokens (a copy only when needed); optionally converted to ``dtype``."""
    if x is None:
        return None
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if packed or x.dim() == 1:
        return x.contiguous()
    return x if x.stride(-1) == 1 else x.contiguous()


def _tokens(logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, entropy, importance_weights,
            threshold, normaliser, *, for_cpu: bool) -> _Tokens:  # fmt: skip
    packed = cu_seqlens is not None
    per_token = _per_token(logprobs, advantages, cu_seqlens)
    f32 = torch.float32 if for_cpu else None
    if mask is not None:
        if for_cpu:
            mask = (mask if mask.dtype in (torch.bool, torch.uint8, torch.int8) else mask != 0).view(torch.uint8)
        mask = _kernel_layout(mask, packed)
    adv = _kernel_layout(advantages, packed, f32) if per_token else advantages.reshape(-1)
    if not per_token and for_cpu:
        adv = adv.to(torch.float32)
    return _Tokens(
        logprobs=_kernel_layout(logprobs, packed, f32),
        old_logprobs=_kernel_layout(old_logprobs, packed, f32),
        advantages=adv,
        mask=mask,
        ref_logprobs=_kernel_layout(ref_logprobs, packed, f32),
        entropy=_kernel_layout(entropy, packed, f32),
        importance_weights=_kernel_layout(importance_weights, packed, f32),
        threshold=None if threshold is None else threshold.to(torch.float64).reshape(1),
        normaliser=None if normaliser is None else normaliser.to(torch.float32).reshape(1),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous(),
        adv_per_token=per_token,
        n_seqs=cu_seqlens.shape[0] - 1 if packed else logprobs.shape[0],
        seq_len=0 if packed else logprobs.shape[1],
    )


def _per_token(logprobs, advantages, cu_seqlens) -> bool:
    """Advantages per token (the layout of logprobs) or per sequence ([B] or [B, 1])."""
    if cu_seqlens is None:
        return advantages.dim() == 2 and tuple(advantages.shape) == tuple(logprobs.shape)
    # packed: [N] is per token; [B] per sequence unless B == N (then per token); [B, 1] per sequence
    return advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]


def _cpu_args(t: _Tokens, cfg: _Config) -> dict:
    def p(x):
        return 0 if x is None else x.data_ptr()

    def rs(x):
        return 0 if (x is None or t.cu_seqlens is not None) else x.stride(0)

    return {
        "n_seqs": t.n_seqs, "seq_len": t.seq_len, "cu_seqlens": p(t.cu_seqlens),
        "logprobs": p(t.logprobs), "logprobs_rs": rs(t.logprobs),
        "old_logprobs": p(t.old_logprobs), "old_logprobs_rs": rs(t.old_logprobs),
        "advantages": p(t.advantages), "advantages_rs": rs(t.advantages) if t.adv_per_token else t.advantages.stride(0),
        "adv_per_token": t.adv_per_token, "mask": p(t.mask), "mask_rs": rs(t.mask),
        "ref_logprobs": p(t.ref_logprobs), "ref_logprobs_rs": rs(t.ref_logprobs),
        "entropy": p(t.entropy), "entropy_rs": rs(t.entropy),
        "importance_weights": p(t.importance_weights), "importance_weights_rs": rs(t.importance_weights),
        "threshold": p(t.threshold), "normaliser": p(t.normaliser),
        "mode": cfg.mode, "lo": cfg.lo, "hi": cfg.hi, "dual": cfg.dual, "dual_c": cfg.dual_c,
        "tau_pos": cfg.tau_pos, "tau_neg": cfg.tau_neg, "agg": cfg.agg, "kl_est": cfg.kl_est,
        "kl_straight": cfg.kl_straight, "kl_clamp": cfg.kl_clamp, "has_seq": cfg.has_seq, "kl_coef": cfg.kl_coef,
        "entropy_coef": cfg.entropy_coef, "norm_source": cfg.norm_source, "norm_const": cfg.norm_const,
        "scale": cfg.scale, "threads": torch.get_num_threads(),
    }  # fmt: skip


# --- host launchers ---------------------------------------------------------------------------


def _reference_loss(inputs, params, logprobs=None, entropy=None, dtype=torch.float64):
    """The reference backend: the float64 definition on the op's arguments (``logprobs`` and
    ``entropy`` replace the inputs of those names when given, for torch.func.vjp)."""
    (lp_in, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, ent_in, importance_weights, threshold,
     normaliser) = inputs  # fmt: skip
    (mode, clip_low, clip_high, clip_dual, tau_pos, tau_neg, kl_coef, kl_estimator, kl_clamp, entropy_coef, agg,
     norm_const, norm_length, dp_size) = params  # fmt: skip

    def cast(x):
        return None if x is None else x.detach().to(dtype)

    norm = normaliser.to(dtype).reshape(()) if normaliser is not None else (norm_const if norm_const > 0 else None)
    return ref.policy_loss(
        cast(lp_in) if logprobs is None else logprobs, cast(old_logprobs), cast(advantages), mask, mode=mode,
        clip_low=clip_low, clip_high=clip_high, clip_dual=clip_dual if clip_dual > 0 else None, tau_pos=tau_pos,
        tau_neg=tau_neg, ref_logprobs=cast(ref_logprobs), kl_coef=kl_coef, kl_estimator=kl_estimator,
        kl_clamp=kl_clamp, entropy=cast(ent_in) if entropy is None else entropy, entropy_coef=entropy_coef,
        entropy_threshold=None if threshold is None else threshold.reshape(()).to(torch.float64),
        importance_weights=cast(importance_weights), agg=agg,
        num_tokens=norm if agg == "token-mean" else None, num_seqs=norm if agg.startswith("seq-mean") else None,
        norm_length=norm_length, dp_size=dp_size, cu_seqlens=cu_seqlens, dtype=dtype,
    )  # fmt: skip


def policy_loss_fwd(inputs, params, backend: str):
    """Host launcher: ``(stats [16] fp32, seq [B, 4] fp32)`` (``lk::policy`` Stat / SeqValue layouts)."""
    logprobs, cu_seqlens = inputs[0], inputs[4]
    device = logprobs.device
    n_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else logprobs.shape[0]
    stats = torch.empty(NUM_STATS, dtype=torch.float32, device=device)
    seq = torch.zeros((n_seqs, NUM_SEQ_VALUES), dtype=torch.float32, device=device)
    if backend == "reference":
        out = _reference_loss(inputs, params)
        values = [out.get(name) for name in STAT_NAMES]
        values[_STAT["num_seqs"]] = None
        values[_STAT["inv_norm"]] = None
        stats.copy_(torch.stack([torch.zeros((), dtype=torch.float64) if v is None else v.detach().cpu().to(torch.float64)
                                 for v in values]).to(torch.float32))  # fmt: skip
        return stats, seq
    cfg = _config(*params, has_normaliser=inputs[9] is not None)
    t = _tokens(*inputs, for_cpu=backend == "cpu")
    if backend == "cpu":
        from lenkernels import cpu

        cpu.load(FAMILY).policy_loss_fwd(_cpu_args(t, cfg), stats.data_ptr(), seq.data_ptr())
    elif backend == "cuda":
        from lenkernels import cuda

        cuda.policy_loss_fwd(t, cfg, stats, seq)
    else:
        from lenkernels.triton.policy_loss import policy_loss_fwd as launch

        launch(t, cfg, stats, seq)
    return stats, seq


def policy_loss_bwd(inputs, params, backend: str, stats, seq, g_stats, need_dentropy: bool):
    """Host launcher: ``(dlogprobs, dentropy)`` in the dtypes and shapes of their inputs
    (``dentropy`` is an empty tensor when not needed)."""
    logprobs, entropy, cu_seqlens = inputs[0], inputs[6], inputs[4]
    empty = logprobs.new_empty(0)
    if backend == "reference":
        # a custom op's body runs below autograd: differentiate the definition with torch.func
        primals = (logprobs.detach().to(torch.float64),) + (
            (entropy.detach().to(torch.float64),) if need_dentropy else ()
        )

        def loss(*xs):
            return _reference_loss(inputs, params, *xs)["loss"]

        _, vjp = torch.func.vjp(loss, *primals)
        grads = vjp(g_stats[0].to(torch.float64))
        d_lp = grads[0].to(logprobs.dtype)
        d_ent = grads[1].to(entropy.dtype) if need_dentropy else empty
        return d_lp, d_ent
    cfg = _config(*params, has_normaliser=inputs[9] is not None)
    packed = cu_seqlens is not None
    t = _tokens(*inputs, for_cpu=backend == "cpu")
    g_stats = g_stats.to(torch.float32).contiguous()
    alloc = torch.zeros if packed else torch.empty  # packed: tokens outside every sequence get 0
    if backend == "cpu":
        from lenkernels import cpu

        d_lp = alloc(logprobs.shape, dtype=torch.float32, device=logprobs.device)
        d_ent = alloc(entropy.shape, dtype=torch.float32, device=logprobs.device) if need_dentropy else None
        cpu.load(FAMILY).policy_loss_bwd(
            _cpu_args(t, cfg), stats.data_ptr(), seq.data_ptr(), g_stats.data_ptr(), d_lp.data_ptr(),
            0 if packed else d_lp.stride(0), 0 if d_ent is None else d_ent.data_ptr(),
            0 if (packed or d_ent is None) else d_ent.stride(0),
        )  # fmt: skip
        d_lp = d_lp.to(logprobs.dtype)
        d_ent = d_ent.to(entropy.dtype) if need_dentropy else empty
        return d_lp, d_ent
    if backend == "cuda":
        from lenkernels import cuda

        d_lp = alloc(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
        d_ent = alloc(entropy.shape, dtype=entropy.dtype, device=logprobs.device) if need_dentropy else None
        cuda.policy_loss_bwd(t, cfg, stats, seq, g_stats, d_lp, d_ent)
        return d_lp, (d_ent if need_dentropy else empty)
    from lenkernels.triton.policy_loss import policy_loss_bwd as launch

    d_lp = alloc(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    d_ent = alloc(entropy.shape, dtype=entropy.dtype, device=logprobs.device) if need_dentropy else None
    launch(t, cfg, stats, seq, g_stats, d_lp, d_ent)
    return d_lp, (d_ent if need_dentropy else empty)


# --- torch.library registration -------------------------------------------------------------


@torch.library.custom_op("lenkernels::policy_loss", mutates_args=())
def _policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    importance_weights: Optional[torch.Tensor],
    entropy_threshold: Optional[torch.Tensor],
    normaliser: Optional[torch.Tensor],
    mode: str,
    clip_low: float,
    clip_high: float,
    clip_dual: float,
    tau_pos: float,
    tau_neg: float,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: bool,
    entropy_coef: float,
    agg: str,
    norm_const: float,
    norm_length: float,
    dp_size: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = (logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, entropy, importance_weights,
              entropy_threshold, normaliser)  # fmt: skip
    params = (mode, clip_low, clip_high, clip_dual, tau_pos, tau_neg, kl_coef, kl_estimator, kl_clamp, entropy_coef,
              agg, norm_const, norm_length, dp_size)  # fmt: skip
    return policy_loss_fwd(inputs, params, backend)


@_policy_loss.register_fake
def _(logprobs, old_logprobs, advantages, mask, cu_seqlens, *args):
    n_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else logprobs.shape[0]
    return (
        logprobs.new_empty(NUM_STATS, dtype=torch.float32),
        logprobs.new_empty((n_seqs, NUM_SEQ_VALUES), dtype=torch.float32),
    )


@torch.library.custom_op("lenkernels::policy_loss_backward", mutates_args=())
def _policy_loss_backward(
    g_stats: torch.Tensor,
    stats: torch.Tensor,
    seq: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    importance_weights: Optional[torch.Tensor],
    entropy_threshold: Optional[torch.Tensor],
    normaliser: Optional[torch.Tensor],
    mode: str,
    clip_low: float,
    clip_high: float,
    clip_dual: float,
    tau_pos: float,
    tau_neg: float,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: bool,
    entropy_coef: float,
    agg: str,
    norm_const: float,
    norm_length: float,
    dp_size: float,
    backend: str,
    need_dentropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = (logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, entropy, importance_weights,
              entropy_threshold, normaliser)  # fmt: skip
    params = (mode, clip_low, clip_high, clip_dual, tau_pos, tau_neg, kl_coef, kl_estimator, kl_clamp, entropy_coef,
              agg, norm_const, norm_length, dp_size)  # fmt: skip
    return policy_loss_bwd(inputs, params, backend, stats, seq, g_stats, need_dentropy)


@_policy_loss_backward.register_fake
def _(g_stats, stats, seq, logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, entropy, *args):
    need_dentropy = args[-1]
    d_ent = torch.empty_like(entropy) if need_dentropy else logprobs.new_empty(0)
    return torch.empty_like(logprobs), d_ent


_N_INPUTS = 25


def _setup_context(ctx, inputs, output):
    stats, seq = output
    ctx.save_for_backward(*inputs[:10], stats, seq)
    ctx.scalars = inputs[10:]


def _backward(ctx, g_stats, g_seq):
    saved = ctx.saved_tensors
    tensors, stats, seq = saved[:10], saved[10], saved[11]
    entropy = tensors[6]
    need_dentropy = entropy is not None and ctx.needs_input_grad[6]
    d_lp, d_ent = torch.ops.lenkernels.policy_loss_backward(
        g_stats, stats, seq, *tensors, *ctx.scalars, need_dentropy
    )
    grads = [None] * _N_INPUTS
    grads[0] = d_lp
    if need_dentropy:
        grads[6] = d_ent
    return tuple(grads)


_policy_loss.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lenkernels::kl_penalty", mutates_args=())
def _kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: bool, backend: str) -> torch.Tensor:
    return kl_penalty_fwd(logprobs, ref_logprobs, estimator, clamp, backend)


@_kl_penalty.register_fake
def _(logprobs, ref_logprobs, estimator, clamp, backend):
    return torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)


@torch.library.custom_op("lenkernels::kl_penalty_backward", mutates_args=())
def _kl_penalty_backward(
    grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return kl_penalty_bwd(grad, logprobs, ref_logprobs, estimator, clamp, backend)


@_kl_penalty_backward.register_fake
def _(grad, logprobs, ref_logprobs, estimator, clamp, backend):
    return torch.empty_like(logprobs), torch.empty_like(ref_logprobs)


def kl_penalty_fwd(logprobs, ref_logprobs, estimator: str, clamp: bool, backend: str) -> torch.Tensor:
    """Host launcher: the per-token estimate, fp32 of ``logprobs.shape``."""
    base, _ = ref.parse_kl_estimator(estimator)
    if backend == "reference":
        return ref.kl_penalty(logprobs.double(), ref_logprobs.double(), base, clamp).to(torch.float32)
    out = torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    if logprobs.numel() == 0:
        return out
    if backend == "cpu":
        from lenkernels import cpu

        lp = logprobs.to(torch.float32).contiguous()
        rf = ref_logprobs.to(torch.float32).contiguous()
        cpu.load(FAMILY).kl_penalty_fwd(
            lp.data_ptr(), rf.data_ptr(), out.data_ptr(), lp.numel(), _KL_CODES[base], clamp, torch.get_num_threads()
        )
    elif backend == "cuda":
        from lenkernels import cuda

        cuda.kl_penalty_fwd(logprobs, ref_logprobs, _KL_CODES[base], clamp, out)
    else:
        from lenkernels.triton.policy_loss import kl_penalty_fwd as launch

        launch(logprobs.contiguous(), ref_logprobs.contiguous(), _KL_CODES[base], clamp, out)
    return out


def kl_penalty_bwd(grad, logprobs, ref_logprobs, estimator: str, clamp: bool, backend: str):
    """Host launcher: ``(d logprobs, d ref_logprobs)`` in the dtypes of their inputs."""
    base, straight = ref.parse_kl_estimator(estimator)
    if backend == "reference":
        _, vjp = torch.func.vjp(
            lambda a, b: ref.kl_penalty(a, b, estimator, clamp), logprobs.detach().double(), ref_logprobs.detach().double()
        )
        d_lp, d_rf = vjp(grad.double())
        return d_lp.to(logprobs.dtype), d_rf.to(ref_logprobs.dtype)
    if logprobs.numel() == 0:
        return torch.zeros_like(logprobs), torch.zeros_like(ref_logprobs)
    est = _KL_CODES[base]
    straight = straight and base != "k2"
    if backend == "cpu":
        from lenkernels import cpu

        lp = logprobs.to(torch.float32).contiguous()
        rf = ref_logprobs.to(torch.float32).contiguous()
        g = grad.to(torch.float32).contiguous()
        d_lp = torch.empty(lp.shape, dtype=torch.float32)
        d_rf = torch.empty(lp.shape, dtype=torch.float32)
        cpu.load(FAMILY).kl_penalty_bwd(
            lp.data_ptr(), rf.data_ptr(), g.data_ptr(), d_lp.data_ptr(), d_rf.data_ptr(), lp.numel(), est, straight,
            clamp, torch.get_num_threads(),
        )  # fmt: skip
        return d_lp.to(logprobs.dtype), d_rf.to(ref_logprobs.dtype)
    if backend == "cuda":
        from lenkernels import cuda

        d_lp = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
        d_rf = torch.empty(ref_logprobs.shape, dtype=ref_logprobs.dtype, device=logprobs.device)
        cuda.kl_penalty_bwd(logprobs, ref_logprobs, grad, est, straight, clamp, d_lp, d_rf)
        return d_lp, d_rf
    from lenkernels.triton.policy_loss import kl_penalty_bwd as launch

    d_lp = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    d_rf = torch.empty(ref_logprobs.shape, dtype=ref_logprobs.dtype, device=logprobs.device)
    launch(logprobs.contiguous(), ref_logprobs.contiguous(), grad.contiguous(), est, straight, clamp, d_lp, d_rf)
    return d_lp, d_rf


def _kl_setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, estimator, clamp, backend = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.args = (estimator, clamp, backend)


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    d_lp, d_rf = torch.ops.lenkernels.kl_penalty_backward(grad, logprobs, ref_logprobs, *ctx.args)
    return d_lp, d_rf, None, None, None


_kl_penalty.register_autograd(_kl_backward, setup_context=_kl_setup_context)


# --- argument checks --------------------------------------------------------------------------


def _float_input(x, name: str, backend: str, like: Optional[torch.Tensor] = None, like_name: str = "logprobs"):
    allowed = _checks.FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    _checks.tensor(x, name)
    if x.dtype not in allowed:
        extra = " (float64 only with backend='reference')" if x.dtype == torch.float64 else ""
        raise TypeError(f"{name} must be float32, bfloat16 or float16{extra}, got {x.dtype}")
    if like is not None:
        _checks.same_device(like, like_name, x, name)
        if tuple(x.shape) != tuple(like.shape):
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}")
    return x


def _number(value, name: str, *, minimum=None, exclusive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}")
    return value


def _normaliser(value, name: str, device) -> tuple[Optional[torch.Tensor], float]:
    """A global normaliser: a positive number (-> constant) or a one-element tensor on the device."""
    if value is None:
        return None, 0.0
    if isinstance(value, torch.Tensor):
        value, ok = _checks.scalar_tensor(value, name, torch.empty(0, device=device), "logprobs", positive=True)
        # unchecked (GPU outside debug mode): a non-positive or non-finite normaliser becomes NaN
        return _checks.nan_unless(value.to(torch.float32), ok), 0.0
    return None, _number(value, name, minimum=0.0, exclusive=True)


def _check_mask(mask, logprobs):
    _checks.tensor(mask, "mask")
    _checks.same_device(logprobs, "logprobs", mask, "mask")
    if tuple(mask.shape) != tuple(logprobs.shape):
        raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    if mask.dtype != torch.bool and _checks.value_checks(mask.device):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (a weighting belongs in importance_weights)")


def _check_cu_seqlens(cu_seqlens, logprobs):
    _checks.tensor(cu_seqlens, "cu_seqlens", dtypes=_checks.INT_DTYPES)
    _checks.same_device(logprobs, "logprobs", cu_seqlens, "cu_seqlens")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if logprobs.dim() != 1:
        raise ValueError(f"with cu_seqlens (packed layout) logprobs must be [N], got shape {tuple(logprobs.shape)}")
    if _checks.value_checks(cu_seqlens.device):
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) < 0 or bool((steps < 0).any()) or int(cu_seqlens[-1]) > logprobs.shape[0]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing offsets within [0, N={logprobs.shape[0]}], got {cu_seqlens.tolist()}"
            )


def _check_advantages(advantages, logprobs, cu_seqlens, backend):
    _float_input(advantages, "advantages", backend)
    _checks.same_device(logprobs, "logprobs", advantages, "advantages")
    shape = tuple(advantages.shape)
    if cu_seqlens is None:
        b, t = logprobs.shape
        ok = shape in ((b, t), (b,), (b, 1))
        expected = f"[B, T] = {(b, t)} (per token), [B] or [B, 1] = ({b},) (per sequence)"
    else:
        b, n = cu_seqlens.shape[0] - 1, logprobs.shape[0]
        ok = shape in ((n,), (b,), (b, 1))
        expected = f"[N] = ({n},) (per token), [B] or [B, 1] = ({b},) (per sequence)"
    if not ok:
        raise ValueError(f"advantages must be {expected}, got {shape}")


# --- public API -------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    mode: str = "ppo",
    clip_low: Optional[float] = None,
    clip_high: Optional[float] = None,
    clip_dual: Optional[float] = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: bool = True,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    entropy_threshold=None,
    importance_weights: Optional[torch.Tensor] = None,
    agg: Optional[str] = None,
    num_tokens=None,
    num_seqs=None,
    norm_length: Optional[float] = None,
    dp_size: int = 1,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
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

    Args:
        logprobs: ``[B, T]`` padded or ``[N]`` packed (with ``cu_seqlens``) log-probabilities of
            the sampled tokens, float32/bfloat16/float16 (float64 with ``backend="reference"``).
            Differentiable. Any row stride (unit stride along T avoids a copy).
        old_logprobs: the behaviour policy's log-probabilities, like ``logprobs``.
        advantages: per token (the shape of ``logprobs``) or per sequence (``[B]`` or ``[B, 1]``;
            packed with B == N: pass ``[B, 1]`` for per sequence).
        mask: response-token mask (bool, integer or float holding 0/1) like ``logprobs``; None: all
            tokens count. Masked positions may hold anything (NaN, inf): they never reach a result.
        mode: ``"ppo"``, ``"gspo"``, ``"luspo"``, ``"cispo"``, ``"sapo"``, ``"gmpo"``, ``"reinforce"``.
        clip_low, clip_high: eps_low / eps_high. Default per mode: ppo, cispo 0.2/0.2; gspo, luspo
            3e-4/4e-4 (GSPO paper); gmpo 0.4/0.4 (log space); ``clip_high`` defaults to ``clip_low``
            when only that is given (DAPO clip-higher: ``clip_high=0.28``).
        clip_dual: dual-clip constant c > 1 (ppo, gspo, luspo) or None (no dual clip; verl's
            default is 3.0, pass it explicitly).
        tau_pos, tau_neg: SAPO temperatures (1.0, 1.05).
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
    _float_input(logprobs, "logprobs", name)
    _checks.choice(mode, "mode", MODES)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, logprobs)
    elif logprobs.dim() != 2:
        raise ValueError(
            f"logprobs must be [B, T] (padded), or [N] with cu_seqlens (packed); got shape {tuple(logprobs.shape)}"
        )
    if logprobs.numel() == 0:
        raise ValueError(f"empty batch: logprobs of shape {tuple(logprobs.shape)} holds no tokens")
    _float_input(old_logprobs, "old_logprobs", name, logprobs)
    _check_advantages(advantages, logprobs, cu_seqlens, name)
    if mask is not None:
        _check_mask(mask, logprobs)
    for x, x_name in ((ref_logprobs, "ref_logprobs"), (entropy, "entropy"), (importance_weights, "importance_weights")):
        if x is not None:
            _float_input(x, x_name, name, logprobs)

    agg = ref.MODE_DEFAULTS[mode][2] if agg is None else agg
    _checks.choice(agg, "agg", AGGS)
    for value, v_name in ((clip_low, "clip_low"), (clip_high, "clip_high")):
        if value is not None:
            _number(value, v_name, minimum=0.0)
    low, high = ref.resolve_clip(mode, clip_low, clip_high)
    if mode != "gmpo" and low > 1.0:
        raise ValueError(f"clip_low must be <= 1 (the lower ratio bound is 1 - clip_low), got {low}")
    dual = 0.0
    if clip_dual is not None:
        if mode not in _DUAL_MODES:
            raise ValueError(f"clip_dual applies to mode in {_DUAL_MODES}, not {mode!r}")
        dual = _number(clip_dual, "clip_dual", minimum=1.0, exclusive=True)
    tau_pos = _number(tau_pos, "tau_pos", minimum=0.0, exclusive=True)
    tau_neg = _number(tau_neg, "tau_neg", minimum=0.0, exclusive=True)
    kl_coef = _number(kl_coef, "kl_coef")
    ref.parse_kl_estimator(kl_estimator)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    if not isinstance(kl_clamp, bool):
        raise TypeError(f"kl_clamp must be a bool, got {type(kl_clamp).__name__}")
    entropy_coef = _number(entropy_coef, "entropy_coef")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy is required when entropy_coef != 0")
    rho = _number(top_entropy_quantile, "top_entropy_quantile", minimum=0.0, exclusive=True)
    if rho > 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {rho}")
    if (rho < 1.0 or entropy_threshold is not None) and entropy is None:
        raise ValueError("entropy is required for top_entropy_quantile < 1 or entropy_threshold")
    if num_tokens is not None and agg != "token-mean":
        raise ValueError(f"num_tokens is the token-mean normaliser; agg={agg!r} takes num_seqs or nothing")
    if num_seqs is not None and not agg.startswith("seq-mean"):
        raise ValueError(f"num_seqs is the normaliser of the seq-mean-* aggregations, not of agg={agg!r}")
    normaliser, norm_const = _normaliser(num_tokens if num_tokens is not None else num_seqs,
                                         "num_tokens" if num_tokens is not None else "num_seqs", logprobs.device)  # fmt: skip
    if norm_length is not None:
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(f"norm_length is the constant of seq-mean-token-sum-norm, not of agg={agg!r}")
        norm_length = _number(norm_length, "norm_length", minimum=0.0, exclusive=True)
    elif agg == "seq-mean-token-sum-norm":
        if cu_seqlens is not None:
            raise ValueError("norm_length is required for seq-mean-token-sum-norm with packed inputs (cu_seqlens)")
        norm_length = float(logprobs.shape[1])
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")

    threshold, threshold_ok = None, None
    if entropy is not None:
        if entropy_threshold is not None:
            if isinstance(entropy_threshold, torch.Tensor):
                value, threshold_ok = _checks.scalar_tensor(entropy_threshold, "entropy_threshold", logprobs, "logprobs")
                threshold = value.detach().to(torch.float64).reshape(1)
            else:
                value = _number(entropy_threshold, "entropy_threshold")
                threshold = torch.full((1,), value, dtype=torch.float64, device=logprobs.device)
        elif rho < 1.0:
            valid = mask
            if cu_seqlens is not None:  # packed tokens outside every sequence are no one's tokens
                t = torch.arange(logprobs.shape[0], device=logprobs.device)
                inside = (t >= cu_seqlens[0]) & (t < cu_seqlens[-1])
                valid = inside if mask is None else inside & (mask != 0)
            threshold = _entropy_threshold(entropy.detach(), valid, 1.0 - rho)

    stats, _ = torch.ops.lenkernels.policy_loss(
        logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, entropy, importance_weights, threshold,
        normaliser, mode, low, high, dual, tau_pos, tau_neg, kl_coef, kl_estimator, kl_clamp, entropy_coef, agg,
        norm_const, float(norm_length or 0.0), float(dp_size), name,
    )  # fmt: skip
    fields = {k: stats[_STAT[k]].detach() for k in PolicyLoss._fields if k != "loss"}
    # a fresh tensor, not a view of the saved stats: trainers update the loss in place
    # (verl: ``policy_loss -= entropy_coeff * entropy_loss``)
    fields["loss"] = stats[_STAT["loss"]].clone()
    if threshold_ok is not None:  # an unchecked NaN/inf threshold keeps no token: say NaN, not 0
        fields["loss"] = _checks.nan_unless(fields["loss"], threshold_ok)
    if ref_logprobs is None:
        fields["kl_loss"] = None
    if entropy is None:
        fields["entropy_loss"] = fields["entropy_mean"] = None
    if threshold is None:
        fields["entropy_kept"] = None
    return PolicyLoss(**fields)


def _entropy_threshold(entropy: torch.Tensor, mask: Optional[torch.Tensor], q: float) -> torch.Tensor:
    """The q-quantile (linear interpolation, torch.quantile's) of the valid tokens' entropies, as a
    [1] float64 tensor, with fixed shapes: a sort with invalid tokens at +inf, no host sync."""
    valid = torch.ones_like(entropy, dtype=torch.bool) if mask is None else mask != 0
    values = torch.where(valid, entropy.to(torch.float64), torch.full_like(entropy, math.inf, dtype=torch.float64))
    ordered = torch.sort(values.reshape(-1)).values
    rank = ((valid.sum() - 1).clamp(min=0).to(torch.float64) * q).reshape(1)
    below = rank.floor().to(torch.int64)
    above = rank.ceil().to(torch.int64)
    return torch.lerp(ordered.gather(0, below), ordered.gather(0, above), rank - below.to(torch.float64))


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    *,
    clamp: bool = True,
    backend: Optional[str] = None,
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
    _float_input(logprobs, "logprobs", name)
    _float_input(ref_logprobs, "ref_logprobs", name, logprobs)
    ref.parse_kl_estimator(estimator)
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp must be a bool, got {type(clamp).__name__}")
    return torch.ops.lenkernels.kl_penalty(logprobs, ref_logprobs, estimator, clamp, name)


def policy_loss_from_logits(
    logits: torch.Tensor,
    ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature=1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group=None,
    backend: Optional[str] = None,
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
