"""Reference rollout correction (SPEC 8): importance weights between the rollout engine's
log-probabilities and the trainer's old ones, truncated (TIS) or rejected (MIS, veto), with their
metrics. Plain PyTorch, float64: the definition every backend is tested against.

Everything works on the flat layout: ``[N]`` tokens, ``valid`` marking response tokens and offsets
``cu_seqlens`` ``[S + 1]`` (sequence ``s`` is ``cu_seqlens[s] <= t < cu_seqlens[s + 1]``; a padded
``[B, T]`` batch uses ``arange(B + 1) * T``).

Definition, per response token t of sequence b (``m`` = valid), ``δ_t = old_t − rollout_t``,
``L = log_clamp`` (verl's ``SAFETY_BOUND`` = 20; ``inf``: no clamp, as TRL):

- raw weight: token level ``w_t = exp(clamp(δ_t, ±L))``; sequence level
  ``w_b = exp(clamp(Σ_t δ_t m_t, ±L))``; geometric ``w_b = exp(clamp(Σ_t δ_t m_t / Σ_t m_t, ±L))``.
- veto (optional ``(veto_lo, veto_hi)``): a response token with ``exp(clamp(δ_t, ±L))`` outside
  ``[veto_lo, veto_hi]`` rejects every token of its sequence.
- ``truncate``: ``w ← min(max(w, lo), hi)``; a token is *truncated* when its raw weight was outside
  ``[lo, hi]``. ``mask``: a token (token level) or a whole sequence (sequence levels) whose raw
  weight is outside ``[lo, hi]`` is rejected.
- a rejected token gets mask 0 and weight 1; so does every token that is not a response token.
  Comparisons with NaN are false: a NaN weight is kept (never rejected) and propagates.
- metrics: mean/min/max of the final weights over kept tokens (0 when none is kept; NaN when one
  is NaN), the fractions of response tokens truncated and rejected, the fraction of sequences with
  a response token that lost at least one, the count of rejected response tokens, and over every
  response token ``kl_k1 = mean(−δ)`` and ``kl_k3 = mean(exp(δ) − δ − 1)`` (unclamped), verl's
  ``kl`` and ``k3_kl`` of ``compute_offpolicy_metrics``: KL(π_rollout ‖ π_old).
"""

from __future__ import annotations

import torch

from lenkernels._codes import CorrectionLevel, CorrectionMode, CorrectionStat

STAT_NAMES = ("weight_mean", "weight_min", "weight_max", "truncated_fraction", "masked_fraction",
              "masked_seq_fraction", "masked_tokens", "kl_k1", "kl_k3")  # fmt: skip
assert STAT_NAMES == tuple(m.name[len("STAT_") :].lower() for m in CorrectionStat if not m.name.startswith("NUM_"))


def padded_offsets(batch: int, length: int, device=None) -> torch.Tensor:
    """``cu_seqlens`` of a padded ``[batch, length]`` layout: ``arange(batch + 1) * length``."""
    return torch.arange(batch + 1, dtype=torch.int64, device=device) * length


def sequence_of_token(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The sequence index of every token, -1 for tokens outside all sequences (offsets clamped into
    ``[0, n_tokens]`` as the kernels clamp them)."""
    cu = cu_seqlens.to(torch.int64).clamp(0, n_tokens)
    t = torch.arange(n_tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    inside = (t >= cu[0]) & (seq < cu.numel() - 1)
    return torch.where(inside, seq, torch.full_like(seq, -1))


def rollout_correction(old_logprobs, rollout_logprobs, valid, cu_seqlens, *, level, mode, lo=0.0, hi=float("inf"),
                       log_clamp=20.0, veto=None, dtype=torch.float64) -> dict:  # fmt: skip
    """SPEC 8 on the flat layout in ``dtype``. Returns ``{"weights": [N], "mask": bool [N], metric:
    0-dim, ...}`` (metric names: ``STAT_NAMES``) and ``"scales"``: the magnitude of the terms each
    reduced metric summed, for tolerances."""
    level, mode = CorrectionLevel(level), CorrectionMode(mode)
    n = old_logprobs.numel()
    dev = old_logprobs.device
    delta = old_logprobs.reshape(-1).to(dtype) - rollout_logprobs.reshape(-1).to(dtype)
    seq = sequence_of_token(cu_seqlens, n)
    n_seq = cu_seqlens.numel() - 1
    member = valid.reshape(-1).to(torch.bool) & (seq >= 0)
    idx = seq.clamp(min=0)
    zero = torch.zeros((), dtype=dtype, device=dev)
    one = torch.ones((), dtype=dtype, device=dev)

    def per_seq(x):  # segment sums over response tokens (a select, not a product: NaN outside stays out)
        out = torch.zeros(n_seq, dtype=x.dtype, device=dev)
        return out.index_add(0, idx, torch.where(member, x, 0)) if n_seq else out

    def clamp(x):
        return x.clamp(-log_clamp, log_clamp)  # NaN passes (torch.clamp)

    n_tok = per_seq(torch.ones_like(delta, dtype=torch.int64))
    sum_delta = per_seq(delta)
    w_token = torch.exp(clamp(delta))
    vetoed = torch.zeros(n_seq, dtype=torch.bool, device=dev)
    if veto is not None:
        outside_veto = (w_token < veto[0]) | (w_token > veto[1])
        vetoed = per_seq(outside_veto.to(torch.int64)) > 0
    if level == CorrectionLevel.TOKEN:
        raw = w_token
        seq_reject = vetoed
    else:
        log_w = sum_delta if level == CorrectionLevel.SEQUENCE else sum_delta / n_tok.clamp(min=1).to(dtype)
        w_seq = torch.exp(clamp(log_w))
        raw = w_seq[idx] if n_seq else w_token
        seq_reject = vetoed | ((w_seq < lo) | (w_seq > hi)) & (mode == CorrectionMode.MASK)
    out = (raw < lo) | (raw > hi)
    reject = (seq_reject[idx] if n_seq else member) | (out & (mode == CorrectionMode.MASK))
    kept = member & ~reject
    if mode == CorrectionMode.TRUNCATE:
        w = torch.where(raw > hi, hi * one, torch.where(raw < lo, lo * one, raw))
        truncated = kept & out
    else:
        w = raw
        truncated = torch.zeros_like(kept)
    weights = torch.where(kept, w, one)

    tokens = member.sum()
    n_kept = kept.sum()
    inf = torch.tensor(float("inf"), dtype=dtype, device=dev)
    w_kept = torch.where(kept, w, zero)
    kept_seq = per_seq(kept.to(torch.int64))
    seqs = n_tok > 0

    def mean_over(total, count):
        return torch.where(count > 0, total / count.clamp(min=1).to(dtype), zero)

    neg_log_ratio = torch.where(member, -delta, zero)
    k3 = torch.where(member, torch.expm1(delta) - delta, zero)
    out = {
        "weights": weights,
        "mask": kept,
        "weight_mean": mean_over(w_kept.sum(), n_kept),
        "weight_min": torch.where(n_kept > 0, torch.where(kept, w, inf).amin(), zero) if n else zero,
        "weight_max": torch.where(n_kept > 0, torch.where(kept, w, -inf).amax(), zero) if n else zero,
        "truncated_fraction": mean_over(truncated.sum().to(dtype), tokens),
        "masked_fraction": mean_over((tokens - n_kept).to(dtype), tokens),
        "masked_seq_fraction": mean_over((seqs & (kept_seq < n_tok)).sum().to(dtype), seqs.sum()),
        "masked_tokens": (tokens - n_kept).to(dtype),
        "kl_k1": mean_over(neg_log_ratio.sum(), tokens),
        "kl_k3": mean_over(k3.sum(), tokens),
    }
    out["scales"] = {
        "weight_mean": mean_over(w_kept.abs().sum(), n_kept),
        "kl_k1": mean_over(neg_log_ratio.abs().sum(), tokens),
        "kl_k3": mean_over(k3.abs().sum(), tokens),
    }
    return out


# --- the launcher of the reference backend (the signature of lenkernels/{cpu,cuda,triton}/rollout_correction.py)


def rollout_correction_fwd(old_logprobs, rollout_logprobs, valid, cu_seqlens, cfg, weights, keep, stats) -> None:
    """Writes ``weights`` (fp32 ``[N]``) and ``keep`` (bool ``[N]``) for every token of every
    sequence (tokens outside all sequences are left as they are) and ``stats`` (fp32
    ``[NUM_CORRECTION_STATS]``, ``CorrectionStat`` layout); float64 maths. ``cfg``: the op's
    ``CorrectionConfig``."""
    veto = (cfg.veto_lo, cfg.veto_hi) if cfg.has_veto else None
    res = rollout_correction(old_logprobs, rollout_logprobs, valid, cu_seqlens, level=cfg.level, mode=cfg.mode,
                             lo=cfg.lo, hi=cfg.hi, log_clamp=cfg.log_clamp, veto=veto)  # fmt: skip
    inside = sequence_of_token(cu_seqlens, valid.numel()) >= 0
    weights.copy_(torch.where(inside, res["weights"].to(weights.dtype), weights))
    keep.copy_(torch.where(inside, res["mask"], keep))
    stats.copy_(torch.stack([res[name] for name in STAT_NAMES]).to(stats.dtype))
