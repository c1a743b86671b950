"""The policy-loss family's typed arguments, shared by the op and every backend's launchers.

- :class:`PolicyInputs`: the op's tensors; :class:`PolicyConfig` / :class:`KLConfig`: frozen
  configs of scalars, codes as ``lenkernels._codes`` members.
- :class:`PolicyTokens` (:func:`kernel_tokens`): the tensors in the layout the launchers read.
- :func:`schema` / :func:`flatten` / :func:`unflatten`: the custom ops' flat schema and arguments,
  generated from the fields above (declared once, here).
- :func:`resolve`: the checks of :func:`lenkernels.policy_loss`'s arguments and their resolution
  into inputs and config (ValueError/TypeError naming the argument, no host sync on a device).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lenkernels import _checks
from lenkernels._codes import Agg, KLEstimator, Mode, NormSource, parse
from lenkernels.ops.quantile import quantile_threshold
from lenkernels.reference import policy_loss as ref

SEQ_MODES = (Mode.GSPO, Mode.LUSPO, Mode.GMPO)  # need per-sequence sums before the token pass
DPPO_MODES = (Mode.DPPO_TV, Mode.DPPO_KL)  # clip_low/high are divergence thresholds, clip_dual the truncation C
DUAL_MODES = (Mode.PPO, Mode.GSPO, Mode.LUSPO, *DPPO_MODES)  # accept clip_dual
DPPO_TRUNCATION = 20.0  # C of the dppo modes when clip_dual is not given (verl's fallback clip_ratio_c)
TOKEN_AGGS = (Agg.TOKEN_MEAN, Agg.TOKEN_SUM)


class PolicyInputs(NamedTuple):
    """The tensors of ``lenkernels::policy_loss`` (shapes as :func:`lenkernels.policy_loss` takes them)."""

    logprobs: torch.Tensor  # [B, T] padded or [N] packed; differentiable
    old_logprobs: torch.Tensor
    advantages: torch.Tensor  # per token (like logprobs) or per sequence ([B] or [B, 1])
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None  # int64 [B + 1]: packed layout
    ref_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # differentiable
    importance_weights: torch.Tensor | None = None
    threshold: torch.Tensor | None = None  # [1] float64 top-entropy threshold
    normaliser: torch.Tensor | None = None  # [1] float32 given normaliser (NormSource.NORM_TENSOR)


def _coerce_codes(config) -> None:
    """Codes arrive as plain ints through a custom op's schema: make them enum members again."""
    for field in dataclasses.fields(config):
        codes = _CODE_FIELDS.get(field.name)
        if codes is not None:
            object.__setattr__(config, field.name, codes(getattr(config, field.name)))


@dataclass(frozen=True)
class PolicyConfig:
    """The scalars of ``lenkernels::policy_loss`` (SPEC 3), resolved: mode defaults applied."""

    mode: Mode = Mode.PPO
    clip_low: float = 0.2  # eps_low (GMPO: log space; DPPO: divergence threshold)
    clip_high: float = 0.2
    clip_dual: float = 0.0  # dual-clip constant c > 1; 0: none (DPPO: the ratio truncation C > 0)
    tau_pos: float = 1.0  # SAPO temperatures
    tau_neg: float = 1.05
    agg: Agg = Agg.TOKEN_MEAN
    kl_est: KLEstimator = KLEstimator.K3
    kl_straight: bool = False  # the estimator's value with k2's gradient (a trailing "+")
    kl_clamp: bool = True  # verl's k3 clamps
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    norm_source: NormSource = NormSource.NORM_COUNTED
    norm_const: float = 0.0  # the normaliser of NormSource.NORM_CONSTANT
    norm_length: float = 0.0  # C of seq-mean-token-sum-norm
    dp_size: float = 1.0
    dro_beta: float = 0.0  # DRO's quadratic log-ratio penalty (> 0 for mode dro)

    def __post_init__(self):
        _coerce_codes(self)

    @property
    def lo(self) -> float:
        """Lower ratio bound ``1 - eps_low`` (GMPO: the log-ratio bound ``-eps_low``; DPPO: the
        divergence threshold ``eps_low`` itself)."""
        if self.mode in DPPO_MODES:
            return self.clip_low
        return -self.clip_low if self.mode == Mode.GMPO else 1.0 - self.clip_low

    @property
    def hi(self) -> float:
        if self.mode in DPPO_MODES:
            return self.clip_high
        return self.clip_high if self.mode == Mode.GMPO else 1.0 + self.clip_high

    @property
    def dual(self) -> bool:
        return self.clip_dual > 0

    @property
    def dual_c(self) -> float:
        return self.clip_dual

    @property
    def has_seq(self) -> bool:
        """Whether the forward needs per-sequence sums first (and writes ``seq``)."""
        return self.mode in SEQ_MODES or self.agg not in TOKEN_AGGS

    @property
    def scale(self) -> float:
        """dp_size (/ C for seq-mean-token-sum-norm): the factor of 1 / normaliser."""
        return self.dp_size / self.norm_length if self.agg == Agg.SEQ_MEAN_TOKEN_SUM_NORM else self.dp_size

    def kernel_scalars(self) -> dict:
        """The scalars the C++ kernels read by name (``parse_policy_scalars`` in
        csrc/include/lenkernels/policy_args.h): every field (codes as ints), generically, and the
        derived ``lo``, ``hi``, ``dual``, ``dual_c``, ``has_seq``, ``scale``."""
        out = dict(zip((f.name for f in dataclasses.fields(self)), flatten(self)))
        out.update(lo=self.lo, hi=self.hi, dual=self.dual, dual_c=self.dual_c, has_seq=self.has_seq, scale=self.scale)
        return out


@dataclass(frozen=True)
class KLConfig:
    """The scalars of ``lenkernels::kl_penalty`` (SPEC 2)."""

    est: KLEstimator = KLEstimator.K3
    straight: bool = False  # the value of ``est`` with the gradient of k2 (never set for k2 itself)
    clamp: bool = True  # verl's k3 clamps

    def __post_init__(self):
        _coerce_codes(self)


_CODE_FIELDS = {"mode": Mode, "agg": Agg, "kl_est": KLEstimator, "norm_source": NormSource, "est": KLEstimator}


def kl_config(estimator: str, clamp: bool) -> KLConfig:
    """``"k3+"`` -> ``KLConfig(K3, straight=True)`` (straight-through is k2's own gradient for k2)."""
    base, straight = ref.parse_kl_estimator(estimator)
    est = parse(KLEstimator, base, "kl_estimator")
    return KLConfig(est=est, straight=straight and est != KLEstimator.K2, clamp=clamp)


# --- the kernel layout ----------------------------------------------------------------------------------


class PolicyTokens(NamedTuple):
    """The per-token tensors as every backend's launchers read them: padded ``[B, T]`` with unit
    stride along T (any row stride) or packed ``[N]`` contiguous with ``cu_seqlens``; each column
    in its own dtype, the mask in its own (a launcher converts what its kernels cannot read)."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor  # per token (like logprobs) or per sequence [B]
    mask: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    importance_weights: torch.Tensor | None
    threshold: torch.Tensor | None  # [1] float64
    normaliser: torch.Tensor | None  # [1] float32
    cu_seqlens: torch.Tensor | None  # int64 [B + 1]
    adv_per_token: bool
    n_seqs: int
    seq_len: int  # padded T (0 for packed)


def kernel_layout(x: torch.Tensor | None, packed: bool) -> torch.Tensor | None:
    """Unit stride along the tokens (a copy only when needed)."""
    if x is None:
        return None
    if packed or x.dim() == 1:
        return x.contiguous()
    return x if x.stride(-1) == 1 else x.contiguous()


def adv_per_token(logprobs: torch.Tensor, advantages: torch.Tensor, cu_seqlens: torch.Tensor | None) -> bool:
    """Advantages per token (the layout of logprobs) or per sequence ([B] or [B, 1])."""
    if cu_seqlens is None:
        return advantages.dim() == 2 and tuple(advantages.shape) == tuple(logprobs.shape)
    # packed: [N] is per token; [B] per sequence unless B == N (then per token); [B, 1] per sequence
    return advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]


def kernel_tokens(x: PolicyInputs) -> PolicyTokens:
    packed = x.cu_seqlens is not None
    per_token = adv_per_token(x.logprobs, x.advantages, x.cu_seqlens)
    return PolicyTokens(
        logprobs=kernel_layout(x.logprobs, packed),
        old_logprobs=kernel_layout(x.old_logprobs, packed),
        advantages=kernel_layout(x.advantages, packed) if per_token else x.advantages.reshape(-1),
        mask=kernel_layout(x.mask, packed),
        ref_logprobs=kernel_layout(x.ref_logprobs, packed),
        entropy=kernel_layout(x.entropy, packed),
        importance_weights=kernel_layout(x.importance_weights, packed),
        threshold=None if x.threshold is None else x.threshold.to(torch.float64).reshape(1),
        normaliser=None if x.normaliser is None else x.normaliser.to(torch.float32).reshape(1),
        cu_seqlens=None if x.cu_seqlens is None else x.cu_seqlens.to(torch.int64).contiguous(),
        adv_per_token=per_token,
        n_seqs=x.cu_seqlens.shape[0] - 1 if packed else x.logprobs.shape[0],
        seq_len=0 if packed else x.logprobs.shape[1],
    )


# --- the custom ops' flat arguments, generated from the fields ------------------------------------------


def _schema_type(hint) -> str:
    if hint is torch.Tensor:
        return "Tensor"
    if hint == (torch.Tensor | None):
        return "Tensor?"
    for python, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):  # bool before int
        if isinstance(hint, type) and issubclass(hint, python):
            return name
    raise TypeError(f"no custom-op schema type for {hint!r}")


def _fields(cls) -> list[str]:
    names = cls._fields if hasattr(cls, "_fields") else [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    return [f"{_schema_type(hints[n])} {n}" for n in names]


def schema(*parts, returns: str) -> str:
    """A custom op's schema: ``parts`` are NamedTuple/dataclass types (their fields in order) or
    literal ``"Type name"`` strings."""
    args = [a for p in parts for a in ([p] if isinstance(p, str) else _fields(p))]
    return f"({', '.join(args)}) -> {returns}"


def flatten(config) -> tuple:
    """A config's fields in order, codes as plain ints (the schema's ``int``)."""
    values = (getattr(config, f.name) for f in dataclasses.fields(config))
    return tuple(int(v) if isinstance(v, enum.IntEnum) else v for v in values)


def unflatten(args, *types) -> list:
    """The inverse of ``(*inputs, *flatten(config), ...)``: one object per type, then the rest."""
    out, i = [], 0
    for cls in types:
        n = len(cls._fields) if hasattr(cls, "_fields") else len(dataclasses.fields(cls))
        out.append(cls(*args[i : i + n]))
        i += n
    return out + list(args[i:])


# --- argument checks ----------------------------------------------------------------------------------


def check_token_mask(mask, like: torch.Tensor, like_name: str, kinds: str, hint: str) -> None:
    """A token mask of the shape and device of ``like`` (named ``like_name``), of a real or bool
    dtype (``kinds`` says which in the TypeError), holding only 0 and 1 where value checks run
    (``hint`` ends the ValueError). Shared by policy_loss and rollout_correction."""
    _checks.tensor(mask, "mask")
    _checks.same_device(like, like_name, mask, "mask")
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be {kinds}, got {mask.dtype}")
    if mask.dtype != torch.bool and _checks.value_checks(mask.device) and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"mask must hold only 0 and 1 {hint}")


def _check_mask(mask, logprobs) -> None:
    check_token_mask(
        mask, logprobs, "logprobs", "bool, integer or floating", "(a weighting belongs in importance_weights)"
    )


def _check_layout(logprobs, cu_seqlens) -> torch.Tensor | None:
    """Padded ``[B, T]``, or packed ``[N]`` with cu_seqlens (returned as int64)."""
    if cu_seqlens is None:
        if logprobs.dim() != 2:
            raise ValueError(
                f"logprobs must be [B, T] (padded), or [N] with cu_seqlens (packed); got shape {tuple(logprobs.shape)}"
            )
        return None
    _checks.tensor(cu_seqlens, "cu_seqlens", dtypes=_checks.INT_DTYPES)
    if logprobs.dim() != 1:
        raise ValueError(f"with cu_seqlens (packed layout) logprobs must be [N], got shape {tuple(logprobs.shape)}")
    return _checks.cu_seqlens(cu_seqlens, logprobs.shape[0], logprobs, "logprobs", min_seqs=1)


def _check_advantages(advantages, logprobs, cu_seqlens, backend) -> None:
    _checks.float_input(advantages, "advantages", backend)
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


def _normaliser(value, name: str, logprobs) -> tuple[torch.Tensor | None, float]:
    """A global normaliser: a positive number (-> constant) or a one-element tensor on the device."""
    if value is None:
        return None, 0.0
    if isinstance(value, torch.Tensor):
        value, ok = _checks.scalar_tensor(value, name, logprobs, "logprobs", positive=True)
        # unchecked (GPU outside debug mode): a non-positive or non-finite normaliser becomes NaN
        return _checks.nan_unless(value.to(torch.float32), ok), 0.0
    return None, _checks.number(value, name, minimum=0.0, exclusive=True)


def _threshold(entropy, entropy_threshold, rho, valid, logprobs):
    """``(threshold [1] float64 or None, ok)``: a given threshold or the (1 - rho) quantile of the
    valid tokens' entropies; ``ok`` as :func:`lenkernels._checks.scalar_tensor` returns it."""
    if entropy is None:
        return None, None
    if entropy_threshold is not None:
        if isinstance(entropy_threshold, torch.Tensor):
            value, ok = _checks.scalar_tensor(entropy_threshold, "entropy_threshold", logprobs, "logprobs")
            return value.detach().to(torch.float64).reshape(1), ok
        value = _checks.number(entropy_threshold, "entropy_threshold")
        return torch.full((1,), value, dtype=torch.float64, device=logprobs.device), None
    if rho < 1.0:
        return quantile_threshold(entropy.detach(), valid(), 1.0 - rho).to(torch.float64), None
    return None, None


def resolve(logprobs, old_logprobs, advantages, mask, *, mode, clip_low, clip_high, clip_dual, tau_pos, tau_neg,
            dro_beta, ref_logprobs, kl_coef, kl_estimator, kl_clamp, entropy, entropy_coef, top_entropy_quantile,
            entropy_threshold, importance_weights, agg, num_tokens, num_seqs, norm_length, dp_size, cu_seqlens,
            backend: str) -> tuple[PolicyInputs, PolicyConfig, torch.Tensor | None]:  # fmt: skip
    """:func:`lenkernels.policy_loss`'s arguments checked and resolved (``backend`` already chosen):
    ``(inputs, config, threshold_ok)``; ``threshold_ok`` is a 0-dim bool tensor when a tensor
    ``entropy_threshold`` could not be checked without a host sync (None otherwise)."""
    _checks.float_input(logprobs, "logprobs", backend)
    mode_code = parse(Mode, mode, "mode")
    cu_seqlens = _check_layout(logprobs, cu_seqlens)
    if logprobs.numel() == 0:
        raise ValueError(f"empty batch: logprobs of shape {tuple(logprobs.shape)} holds no tokens")
    _checks.float_input(old_logprobs, "old_logprobs", backend, logprobs, "logprobs")
    _check_advantages(advantages, logprobs, cu_seqlens, backend)
    if mask is not None:
        _check_mask(mask, logprobs)
    for x, x_name in ((ref_logprobs, "ref_logprobs"), (entropy, "entropy"), (importance_weights, "importance_weights")):
        if x is not None:
            _checks.float_input(x, x_name, backend, logprobs, "logprobs")

    agg_code = parse(Agg, ref.MODE_DEFAULTS[mode][2] if agg is None else agg, "agg")
    for value, v_name in ((clip_low, "clip_low"), (clip_high, "clip_high")):
        if value is not None:
            _checks.number(value, v_name, minimum=0.0)
    low, high = ref.resolve_clip(mode, clip_low, clip_high)
    if mode_code != Mode.GMPO and mode_code not in DPPO_MODES and low > 1.0:
        raise ValueError(f"clip_low must be <= 1 (the lower ratio bound is 1 - clip_low), got {low}")
    dual = DPPO_TRUNCATION if mode_code in DPPO_MODES else 0.0
    if clip_dual is not None:
        if mode_code not in DUAL_MODES:
            raise ValueError(f"clip_dual applies to mode in {tuple(m.name.lower() for m in DUAL_MODES)}, not {mode!r}")
        # a dual clip needs c > 1; DPPO's truncation min(r, C) any C > 0
        dual = _checks.number(clip_dual, "clip_dual", minimum=0.0 if mode_code in DPPO_MODES else 1.0, exclusive=True)
    beta = 0.0
    if mode_code == Mode.DRO:
        if dro_beta is None:
            raise ValueError("dro_beta is required for mode 'dro' (a positive float, verl's policy_loss.dro_beta)")
        beta = _checks.number(dro_beta, "dro_beta", minimum=0.0, exclusive=True)
    elif dro_beta is not None:
        raise ValueError(f"dro_beta applies to mode 'dro', not {mode!r}")
    tau_pos = _checks.number(tau_pos, "tau_pos", minimum=0.0, exclusive=True)
    tau_neg = _checks.number(tau_neg, "tau_neg", minimum=0.0, exclusive=True)
    kl_coef = _checks.number(kl_coef, "kl_coef")
    kl = kl_config(kl_estimator, kl_clamp)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    entropy_coef = _checks.number(entropy_coef, "entropy_coef")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy is required when entropy_coef != 0")
    rho = _checks.number(top_entropy_quantile, "top_entropy_quantile", minimum=0.0, maximum=1.0, exclusive=True)
    if (rho < 1.0 or entropy_threshold is not None) and entropy is None:
        raise ValueError("entropy is required for top_entropy_quantile < 1 or entropy_threshold")
    token_mean, seq_mean = agg_code == Agg.TOKEN_MEAN, agg_code not in TOKEN_AGGS
    if num_tokens is not None and not token_mean:
        raise ValueError(f"num_tokens is the token-mean normaliser; agg={agg!r} takes num_seqs or nothing")
    if num_seqs is not None and not seq_mean:
        raise ValueError(f"num_seqs is the normaliser of the seq-mean-* aggregations, not of agg={agg!r}")
    given = num_tokens if num_tokens is not None else num_seqs
    normaliser, norm_const = _normaliser(given, "num_tokens" if num_tokens is not None else "num_seqs", logprobs)
    if norm_length is not None:
        if agg_code != Agg.SEQ_MEAN_TOKEN_SUM_NORM:
            raise ValueError(f"norm_length is the constant of seq-mean-token-sum-norm, not of agg={agg!r}")
        norm_length = _checks.number(norm_length, "norm_length", minimum=0.0, exclusive=True)
    elif agg_code == Agg.SEQ_MEAN_TOKEN_SUM_NORM:
        if cu_seqlens is not None:
            raise ValueError("norm_length is required for seq-mean-token-sum-norm with packed inputs (cu_seqlens)")
        norm_length = float(logprobs.shape[1])
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")

    def valid() -> torch.Tensor:  # the tokens the quantile is taken over
        out = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else mask != 0
        if cu_seqlens is not None:  # packed tokens outside every sequence are no one's tokens
            t = torch.arange(logprobs.shape[0], device=logprobs.device)
            out = out & (t >= cu_seqlens[0]) & (t < cu_seqlens[-1])
        return out

    threshold, threshold_ok = _threshold(entropy, entropy_threshold, rho, valid, logprobs)
    if normaliser is not None:
        source = NormSource.NORM_TENSOR
    else:
        source = NormSource.NORM_CONSTANT if norm_const > 0 else NormSource.NORM_COUNTED
    inputs = PolicyInputs(logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, entropy,
                          importance_weights, threshold, normaliser)  # fmt: skip
    config = PolicyConfig(
        mode=mode_code, clip_low=low, clip_high=high, clip_dual=dual, tau_pos=tau_pos, tau_neg=tau_neg, agg=agg_code,
        kl_est=kl.est, kl_straight=kl.straight, kl_clamp=kl_clamp, kl_coef=kl_coef, entropy_coef=entropy_coef,
        norm_source=source, norm_const=norm_const, norm_length=float(norm_length or 0.0), dp_size=float(dp_size),
        dro_beta=beta,
    )  # fmt: skip
    return inputs, config, threshold_ok
