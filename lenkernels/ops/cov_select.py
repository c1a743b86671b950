"""Covariance token selection of Clip-Cov and KL-Cov ("The Entropy Mechanism of Reinforcement
Learning for Reasoning Language Models", Cui et al. 2025; verl's ``clip_cov`` / ``kl_cov`` policy
losses): the few tokens whose centred advantage times centred log-probability is largest, which
those losses then exclude from the gradient (Clip-Cov) or pull back with a KL term (KL-Cov).

The selection is a global, data-dependent choice over the batch (a count taken from the data, a
random subset or a top-k), so it is torch code on the detached ``[B, T]`` inputs, not a kernel:
cheap next to the loss, which :func:`lenkernels.policy_loss` then computes fused (see
``lenkernels.integrations.verl``'s ``compute_policy_loss_clip_cov`` / ``_kl_cov``).
"""

from __future__ import annotations

import torch

from lenkernels import _checks
from lenkernels.ops.policy_loss_args import check_token_mask

METHODS = ("clip_cov", "kl_cov")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean`` (``verl.utils.torch_functional``), operation for operation, so the
    selection is verl's bit for bit on the same device."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def _check(logprobs, advantages, mask, method, ratio, lb, ub, old_logprobs, clip_low, clip_high, generator):
    _checks.float_input(logprobs, "logprobs", "reference")
    _checks.choice(method, "method", METHODS)
    _checks.float_input(advantages, "advantages", "reference")
    _checks.same_device(logprobs, "logprobs", advantages, "advantages")
    seq_shapes = ((logprobs.shape[0],), (logprobs.shape[0], 1)) if logprobs.dim() == 2 else ()
    if tuple(advantages.shape) != tuple(logprobs.shape) and tuple(advantages.shape) not in seq_shapes:
        raise ValueError(
            f"advantages must have the shape of logprobs {tuple(logprobs.shape)} (per token) or [B] / [B, 1] "
            f"(per sequence, [B, T] logprobs), got {tuple(advantages.shape)}"
        )
    if mask is not None:
        check_token_mask(mask, logprobs, "logprobs", "bool, integer or floating", "(a 0/1 token mask)")
    ratio = _checks.number(ratio, "ratio", minimum=0.0, exclusive=True, maximum=1.0 if method == "kl_cov" else None)
    if method == "clip_cov":
        lb = _checks.number(lb, "lb", finite=False)
        ub = _checks.number(ub, "ub", finite=False)
        if old_logprobs is None:
            raise ValueError("old_logprobs is required for method='clip_cov' (its already-clipped test)")
        _checks.float_input(old_logprobs, "old_logprobs", "reference", logprobs, "logprobs")
        clip_low = _checks.number(clip_low, "clip_low", minimum=0.0, maximum=1.0)
        clip_high = clip_low if clip_high is None else _checks.number(clip_high, "clip_high", minimum=0.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return ratio, lb, ub, clip_low, clip_high


def cov_select(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    method: str = "clip_cov",
    ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    old_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The tokens Clip-Cov / KL-Cov act on, selected exactly as verl 0.9.1's ``clip_cov`` /
    ``kl_cov`` losses select them.

    With ``cov_t = (A_t - mean A) (logprob_t - mean logprob)`` (means over the valid tokens; the
    inputs are detached):

    - ``"clip_cov"``: of the valid tokens with ``lb < cov_t < ub`` whose PPO clip (``clip_low`` /
      ``clip_high``, ratio ``exp(logprob - old_logprob)``) does not already bind, a uniformly random
      subset of ``max(int(ratio * n_valid), 1)`` tokens, drawn with ``torch.randperm`` on the CPU
      generator (``generator``, default torch's global one, which verl uses): under the same seed
      the same tokens as verl, and the generator advanced as verl advances it (one ``randperm`` of
      the number of candidates, none when there is no candidate).
    - ``"kl_cov"``: the ``max(1, int(ratio * n_valid))`` valid tokens of largest ``cov_t``
      (``torch.topk``); none when no token is valid.

    The arithmetic is verl's, in the inputs' dtypes (verl's masked means, its promotion), so the
    selection is verl's bit for bit on the same device. verl computes the KL-Cov covariances on the
    CPU; here they are computed where the inputs are, so on a GPU a rounding difference of a mean
    can change the choice between tokens whose covariances tie to within an ulp.

    Args:
        logprobs: ``[B, T]`` padded or any-shape packed log-probabilities (float32, bfloat16,
            float16 or float64); read detached.
        advantages: per token (the shape of ``logprobs``), or per sequence ``[B]`` / ``[B, 1]``
            for ``[B, T]`` logprobs (broadcast over T first).
        mask: 0/1 token mask like ``logprobs`` (bool, integer or floating); None: every token.
        method: ``"clip_cov"`` or ``"kl_cov"``.
        ratio: the fraction of valid tokens to select, > 0 (verl's ``clip_cov_ratio`` /
            ``kl_cov_ratio``, default 2e-4); at most 1 for ``"kl_cov"``.
        lb, ub: clip_cov's covariance band (verl's ``clip_cov_lb`` / ``clip_cov_ub``: 1.0 / 5.0).
        old_logprobs: the behaviour policy's log-probabilities like ``logprobs``; required for
            ``"clip_cov"`` (tokens the PPO clip already clips are not candidates).
        clip_low, clip_high: clip_cov's PPO bounds ``1 - clip_low`` / ``1 + clip_high``
            (``clip_high`` defaults to ``clip_low``).
        generator: the CPU ``torch.Generator`` of clip_cov's draw; None: torch's default one.

    Returns:
        a bool tensor of ``logprobs.shape``: True on the selected tokens (always valid ones).

    Costs a host synchronisation (the number of tokens to select depends on the data), as verl's,
    so it is eager torch code, not a ``torch.library`` op: under ``torch.compile`` it breaks the
    graph (``fullgraph=True`` refuses it).

    Example (padded; packed ``[N]`` inputs work the same, the covariance is over all their tokens)::

        sel = lenkernels.cov_select(logprobs, advantages, mask, method="kl_cov", ratio=2e-3)
    """
    ratio, lb, ub, clip_low, clip_high = _check(logprobs, advantages, mask, method, ratio, lb, ub, old_logprobs,
                                                clip_low, clip_high, generator)  # fmt: skip
    with torch.no_grad():
        lp = logprobs.detach()
        adv = advantages.detach()
        if adv.shape != lp.shape:
            adv = adv.reshape(-1, 1).expand(lp.shape)
        if mask is None:
            mask = torch.ones(lp.shape, dtype=torch.bool, device=lp.device)
        selected = torch.zeros(lp.shape, dtype=torch.bool, device=lp.device)
        flat = selected.view(-1)
        if method == "clip_cov":
            r = torch.exp(lp - old_logprobs.detach())
            pg1 = -adv * r
            pg2 = -adv * torch.clamp(r, 1 - clip_low, 1 + clip_high)
            clipped = (pg2 > pg1) & (mask > 0)
            cov = (adv - _masked_mean(adv, mask)) * (lp - _masked_mean(lp, mask))
            candidates = (cov < ub) & (cov > lb) & (mask > 0) & ~clipped
            # verl's count, ``int(ratio * mask.sum())``, of the 0/1 mask's tokens (a NaN mask entry,
            # possible where value checks do not run, counts as one)
            count = max(int(ratio * int((mask != 0).sum())), 1)
            idx = torch.nonzero(candidates.reshape(-1)).reshape(-1)  # row-major, as verl's [B, T] nonzero
            if idx.numel() > 0:
                perm = torch.randperm(idx.numel(), generator=generator)  # CPU, as verl's
                flat[idx[perm[: min(count, idx.numel())].to(idx.device)]] = True
        else:
            valid = mask > 0
            idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
            if idx.numel() > 0:
                a, lv = adv.reshape(-1)[idx], lp.reshape(-1)[idx]  # verl's adv[valid]: the same values, in order
                cov = (a - a.mean()) * (lv - lv.mean())
                top = torch.topk(cov, max(1, int(cov.numel() * ratio)), largest=True).indices
                flat[idx[top]] = True
    return selected
