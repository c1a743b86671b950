"""Shaping from token entropies: PEAR's phase-entropy reward and CEEH's difficulty-aware entropy
bonus (SPEC 5, 6). Arguments as in ``lenkernels.shaping``."""

from __future__ import annotations

import torch

from lenkernels import _checks
from lenkernels.shaping._args import _correct, _nan_guard, _real, _score, _vector


@_nan_guard("correct")
def pear_reward(
    correct: torch.Tensor,
    think_entropy: torch.Tensor,
    answer_entropy: torch.Tensor,
    *,
    alpha: float = 1.0,
    score: torch.Tensor | float = 1.0,
    format_reward: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """PEAR (SPEC 5): phase-entropy penalty ``P = max(0, H_think - alpha * H_answer)`` (alpha 1) on the
    mean token entropies of the two phases (``lenkernels.phase_entropy``); correct -> ``min(1, s - P)``
    (s = 1), wrong -> ``format_reward`` (0). float32 ``[B]``."""
    ok = _correct(correct)
    n, device = ok.shape[0], ok.device
    think = _vector(think_entropy, "think_entropy", n, device).to(torch.float32)
    answer = _vector(answer_entropy, "answer_entropy", n, device).to(torch.float32)
    penalty = torch.clamp(think - _checks.number(alpha, "alpha") * answer, min=0.0)
    s = _score(score, ok)
    fmt = _score(format_reward, ok, "format_reward")
    return torch.where(ok, torch.clamp(s - penalty, max=1.0), fmt)


def ceeh_advantages(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    difficulty: torch.Tensor,
    *,
    alpha: float = 0.4,
    kappa: float = 2.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """CEEH difficulty-aware entropy bonus (SPEC 5): ``A + min(alpha * sg(H), |A| / kappa) * scale * d_q``
    (alpha 0.4, kappa 2). ``entropy`` broadcasts to ``advantages`` (per token ``[B, T]`` or per
    response ``[B]``), ``difficulty`` d_q is per response ``[B]``. The entropy is detached (sg): the
    bonus is not differentiated. float32, the shape of ``advantages``."""
    a = _real(advantages, "advantages", min_dim=1).detach().to(torch.float32)
    h = _real(entropy, "entropy").detach().to(torch.float32)
    d = _vector(difficulty, "difficulty", a.shape[0], a.device).to(torch.float32)
    _checks.same_device(a, "advantages", h, "entropy")
    if h.dim() == 1 and a.dim() == 2 and h.shape[0] == a.shape[0]:
        h = h[:, None]  # per-response entropy, broadcast over the tokens
    try:
        torch.broadcast_shapes(h.shape, a.shape)
    except RuntimeError:
        raise ValueError(f"entropy of shape {tuple(entropy.shape)} does not broadcast to advantages {tuple(a.shape)}") from None
    d = d.reshape(-1, *([1] * (a.dim() - 1)))
    alpha, kappa = _checks.number(alpha, "alpha"), _checks.number(kappa, "kappa", minimum=0.0, exclusive=True)
    bonus = torch.minimum(alpha * h, a.abs() / kappa)
    return a + bonus * _checks.number(scale, "scale") * d
