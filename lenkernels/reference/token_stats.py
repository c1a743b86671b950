"""Reference token log-probabilities and entropy (SPEC 1)."""

from __future__ import annotations

import torch


def _scaled(logits: torch.Tensor, temperature, dtype) -> torch.Tensor:
    z = logits.to(dtype)
    if isinstance(temperature, torch.Tensor):
        return z / temperature.to(dtype).unsqueeze(-1)
    return z / temperature


def token_logprobs_entropy(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature=1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy)`` of shape ``ids.shape`` in ``dtype``; differentiable in ``logits``.

    z = logits / T; logprob = z_y - logsumexp(z) (0 where ids == ignore_index);
    entropy = logsumexp(z) - sum_j p_j z_j. Rows with a non-finite lse (all -inf, NaN, +inf) give NaN.
    Temperature is a float or a tensor broadcastable to ``ids``.

    Evaluated on z - max z (the statistics do not depend on the shift, nor their gradients): the
    differences then never cancel numbers of the logits' size, exact to ~1e-16 relative even at
    |z| = 1e4.
    """
    z = _scaled(logits, temperature, dtype)
    shift = z.detach().amax(-1, keepdim=True)
    z = z - torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    # masked (-inf) logits have p = 0; zero them in the product so neither value nor grad is NaN
    z_finite = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    entropy = lse - (p * z_finite).sum(-1)
    valid = ids != ignore_index
    target = torch.where(valid, ids, torch.zeros_like(ids)).long()
    z_y = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    finite = torch.isfinite(lse)
    nan = torch.full_like(lse, float("nan"))
    logprobs = torch.where(valid, torch.where(finite, z_y - lse, nan), torch.zeros_like(lse))
    entropy = torch.where(finite, entropy, nan)
    return logprobs, entropy


def token_stats_forward(logits2d, ids1d, temperature1d, ignore_index, state: bool = False):
    """The ``reference`` backend's forward: float64 maths, float32 outputs (logprobs, entropy, lse, mean_z).

    ``state=True`` adds each row's online-softmax state ``(max_z, log_s)``, the form
    ``lenkernels.distributed.merge_stats`` merges: ``max_z`` is the row max rounded to fp32 and
    ``log_s = log sum exp(z - max_z)`` in float64 against that rounded value, so ``max_z + log_s``
    is the float64 lse although fp32 cannot hold it at |z| = 1e4.
    """
    temp = temperature1d.to(torch.float64).expand(ids1d.shape)
    logprobs, entropy = token_logprobs_entropy(logits2d, ids1d, temp, ignore_index)
    z = _scaled(logits2d, temp, torch.float64)
    lse = torch.logsumexp(z, dim=-1)
    mean_z = lse - entropy
    f32 = torch.float32
    out = (logprobs.to(f32), entropy.to(f32), lse.to(f32), mean_z.to(f32))
    if not state:
        return out
    max_z = z.amax(-1).to(f32)
    anchor = max_z.to(torch.float64)
    # an all -inf row keeps (-inf, -inf): the empty state (z - anchor would be NaN there)
    log_s = torch.logsumexp(z - torch.where(torch.isfinite(anchor), anchor, torch.zeros_like(anchor)).unsqueeze(-1), -1)
    return (*out, max_z, log_s.to(f32))


def token_stats_backward(logits2d, ids1d, temperature1d, g_logprobs, g_entropy, ignore_index):
    """The ``reference`` backend's backward: SPEC 1's closed form, evaluated in float64."""
    temp = temperature1d.to(torch.float64).expand(ids1d.shape).unsqueeze(-1)
    z = logits2d.to(torch.float64) / temp
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    z_finite = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    mean_z = (p * z_finite).sum(-1, keepdim=True)
    valid = (ids1d != ignore_index).unsqueeze(-1)
    g_lp = torch.where(valid, g_logprobs.to(torch.float64).unsqueeze(-1), torch.zeros_like(lse))
    g_h = g_entropy.to(torch.float64).unsqueeze(-1)
    onehot = torch.zeros_like(z)
    onehot.scatter_(-1, torch.where(valid, ids1d.unsqueeze(-1), 0).long(), 1.0)
    onehot = onehot * valid
    ent = torch.where(p > 0, p * (z_finite - mean_z), torch.zeros_like(p))
    return ((g_lp * (onehot - p) - g_h * ent) / temp).to(logits2d.dtype)
