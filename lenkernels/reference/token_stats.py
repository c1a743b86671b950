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


# --- launchers of the reference backend (the signatures of lenkernels/{cpu,cuda,triton}/token_stats.py)


def token_stats_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, max_z=None, log_s=None):
    """Writes the statistics of rows ``x`` ``[N, V]`` into the fp32 ``[N]`` outputs given."""
    outs = [logprobs, entropy, lse, mean_z] + ([max_z, log_s] if max_z is not None else [])
    for out, value in zip(outs, token_stats_forward(x, ids, temperature, ignore_index, state=max_z is not None)):
        out.copy_(value)


def token_stats_bwd(x, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits):
    """Writes ``dlogits`` ``[N, V]`` (SPEC 1's closed form in float64; ``lse``/``mean_z`` unused)."""
    dlogits.copy_(token_stats_backward(x, ids, temperature, g_logprobs, g_entropy, ignore_index))


# --- extra vocabulary statistics (SPEC 7): sum_p2 / log_sum_p2, argmax / max_logprob, mean_logit ----


def token_stats_extra_forward(logits2d, ids1d, temperature1d, ignore_index):
    """Float64 definitions of every output of ``lenkernels.token_stats``, as float32 (argmax int64):
    ``(logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit)``.

    z = logits / T, p = softmax(z): log_sum_p2 = logsumexp(2z) - 2 lse, sum_p2 = exp(log_sum_p2);
    argmax = lowest index among the maxima of z (0 for an all -inf row); max_logprob = max z - lse;
    mean_logit = (1/V) sum of the finite z. A row whose lse is not finite gives NaN in every float
    statistic (argmax stays defined).
    """
    temp = temperature1d.to(torch.float64).expand(ids1d.shape)
    logprobs, entropy = token_logprobs_entropy(logits2d, ids1d, temp, ignore_index)
    z = _scaled(logits2d, temp, torch.float64)
    shift = z.amax(-1, keepdim=True)
    finite_shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    zs = z - finite_shift  # lse and lse2 against the max: no cancellation at |z| = 1e4
    log_s = torch.logsumexp(zs, -1)
    lse = log_s + finite_shift.squeeze(-1)
    mean_z = lse - entropy
    log_sum_p2 = torch.logsumexp(2 * zs, -1) - 2 * log_s
    finite = torch.isfinite(lse)
    nan = torch.full_like(lse, float("nan"))
    argmax = torch.argmax(z, -1)
    max_logprob = torch.where(finite, -log_s, nan)
    vocab = z.shape[-1]
    mean_logit = torch.where(torch.isfinite(z), z, torch.zeros_like(z)).sum(-1) / vocab
    mean_logit = torch.where(finite, mean_logit, nan)
    log_sum_p2 = torch.where(finite, log_sum_p2, nan)
    f32 = torch.float32
    return (logprobs.to(f32), entropy.to(f32), lse.to(f32), mean_z.to(f32), torch.exp(log_sum_p2).to(f32),
            log_sum_p2.to(f32), argmax, max_logprob.to(f32), mean_logit.to(f32))  # fmt: skip


def token_stats_extra_backward(logits2d, ids1d, temperature1d, grads, ignore_index):
    """Float64 d logits of ``token_stats``'s float outputs. ``grads``: cotangents ``(g_logprobs,
    g_entropy, g_sum_p2, g_log_sum_p2, g_max_logprob, g_mean_logit)``, fp32 ``[N]`` each.

    In z (then / T): lp: 1[j=y] - p_j; H: -p_j (z_j - E_p z); sum_p2: 2 p_j (p_j - sum_p2);
    log_sum_p2: 2 q_j - 2 p_j with q = softmax(2z); max_logprob: 1[j=argmax] - p_j;
    mean_logit: 1/V on finite z_j.
    """
    _, _, g_sp2, g_lsp2, g_mlp, g_mean = (g.to(torch.float64).unsqueeze(-1) for g in grads)
    base = token_stats_backward(logits2d.to(torch.float64), ids1d, temperature1d, grads[0], grads[1], ignore_index)
    temp = temperature1d.to(torch.float64).expand(ids1d.shape).unsqueeze(-1)
    z = logits2d.to(torch.float64) / temp
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(z - lse)
    q = torch.exp(2 * z - torch.logsumexp(2 * z, -1, keepdim=True))
    sum_p2 = (p * p).sum(-1, keepdim=True)
    onehot = torch.zeros_like(z)
    onehot.scatter_(-1, torch.argmax(z, -1, keepdim=True), 1.0)
    finite = torch.isfinite(z).to(z.dtype)
    extra = g_sp2 * 2 * p * (p - sum_p2) + g_lsp2 * 2 * (q - p) + g_mlp * (onehot - p) + g_mean * finite / z.shape[-1]
    return (base.to(torch.float64) + extra / temp).to(logits2d.dtype)


def token_stats_extra_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2,
                          argmax, max_logprob, mean_logit):  # fmt: skip
    """Writes every statistic of rows ``x`` ``[N, V]`` into the ``[N]`` outputs given."""
    outs = (logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit)
    for out, value in zip(outs, token_stats_extra_forward(x, ids, temperature, ignore_index)):
        out.copy_(value)


def token_stats_extra_bwd(x, ids, temperature, lse, mean_z, log_sum_p2, argmax, grads, ignore_index, dlogits):
    """Writes ``dlogits`` ``[N, V]`` (closed forms in float64; the saved row scalars are unused)."""
    dlogits.copy_(token_stats_extra_backward(x, ids, temperature, grads, ignore_index))


# --- sparse vocabulary statistics (SPEC 7): top-k, gathered, kept set, sampler replay ------------------


def _z_lse(logits, temperature):
    """float64 ``z = logits / T`` and ``lse`` ``[..., 1]`` (T a float or a tensor of the leading shape)."""
    z = _scaled(logits, temperature, torch.float64)
    return z, torch.logsumexp(z, -1, keepdim=True)


def topk(logits: torch.Tensor, temperature, k: int):
    """``(ids, logprobs)`` ``[..., k]``: the k largest z, descending, ties to the lower id (a stable
    sort of the whole row), and ``z - lse`` there (float64, differentiable)."""
    z, lse = _z_lse(logits, temperature)
    ids = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    return ids, z.gather(-1, ids) - lse


def gathered_logprobs(logits: torch.Tensor, temperature, gather_ids: torch.Tensor) -> torch.Tensor:
    """``z_g - lse`` at ``gather_ids`` ``[..., K]``; 0 (no gradient) at -1 padding (float64)."""
    z, lse = _z_lse(logits, temperature)
    pad = gather_ids == -1
    value = z.gather(-1, torch.where(pad, 0, gather_ids).long()) - lse
    return torch.where(pad, torch.zeros_like(value), value)


def kept_mask_from_ids(kept_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[..., V]`` bool: the ids of each row's ``kept_ids`` (-1 padding, repeats once)."""
    mask = torch.zeros(*kept_ids.shape[:-1], vocab + 1, dtype=torch.bool, device=kept_ids.device)
    mask.scatter_(-1, torch.where(kept_ids < 0, vocab, kept_ids).long(), True)
    return mask[..., :vocab]


def sampler_kept_mask(logits: torch.Tensor, temperature, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """``[..., V]`` bool: the kept set of vLLM's sampler (V0 order: top-k, top-p, min-p) at z = logits / T.

    A port of vLLM's masking in float64: ascending sort (z ascending, ties by id descending: the
    reverse of z descending, ties by id ascending), top-k masks z < the k-th largest, top-p masks
    where the cumulative softmax of the survivors <= 1 - p (never the largest), min-p masks
    softmax < min_p * max softmax. Ids of zero probability (z = -inf) are never kept.
    """
    z, _ = _z_lse(logits.detach(), temperature)
    vocab = z.shape[-1]
    flipped = z.flip(-1)
    zs, order = torch.sort(flipped, dim=-1, stable=True)  # ascending; ties: flipped position ascending = id descending
    ids = vocab - 1 - order
    neg = torch.full_like(zs, float("-inf"))
    if 0 < top_k < vocab:
        zs = torch.where(zs < zs[..., vocab - top_k : vocab - top_k + 1], neg, zs)
    if top_p < 1.0:
        cum = torch.softmax(zs, -1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        zs = torch.where(drop, neg, zs)
    keep = zs > float("-inf")
    if min_p > 0.0:
        probs = torch.softmax(zs, -1)
        keep &= probs >= min_p * probs.amax(-1, keepdim=True)
    return torch.zeros_like(keep).scatter(-1, ids, keep)


def kept_stats(logits: torch.Tensor, ids: torch.Tensor, temperature, kept_mask: torch.Tensor, ignore_index: int = -100):
    """``(kept_logprob, kept_entropy, kept_log_mass)`` float64 for the kept sets ``kept_mask`` ``[..., V]``.

    kept_logprob = z_y - logsumexp_K z (0 where ids == ignore_index); kept_entropy = the entropy of
    softmax(z) restricted to K; kept_log_mass = logsumexp_K z - lse. A valid id outside its set gives
    NaN in all three.
    """
    z, lse = _z_lse(logits, temperature)
    zk = torch.where(kept_mask, z, torch.full_like(z, float("-inf")))
    lse_k = torch.logsumexp(zk, -1)
    q = torch.softmax(zk, -1)
    ent = lse_k - (q * torch.where(zk > float("-inf"), zk, torch.zeros_like(zk))).sum(-1)
    valid = ids != ignore_index
    y = torch.where(valid, ids, torch.zeros_like(ids)).long().unsqueeze(-1)
    outside = valid & ~kept_mask.gather(-1, y).squeeze(-1)
    nan = torch.full_like(lse_k, float("nan"))
    lp = torch.where(valid, torch.where(outside, nan, z.gather(-1, y).squeeze(-1) - lse_k), torch.zeros_like(lse_k))
    return lp, torch.where(outside, nan, ent), torch.where(outside, nan, lse_k - lse.squeeze(-1))
