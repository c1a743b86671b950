"""The eager PyTorch code RL trainers run today, written out for the benchmark.

These follow the public source of verl and TRL (their documented functions, re-expressed here so
the benchmark needs neither package installed); lenkernels.integrations tests compare against the
real packages where those are installed.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F


def _selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The logprob of ``ids`` as verl's ``logprobs_from_logits`` and TRL's ``selective_log_softmax``
    compute it: logsumexp per row for fp32/fp64, log_softmax per row for bf16/fp16."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        logprobs = picked - lse
    else:
        rows = []
        for row, label in zip(logits, ids):
            row_logp = F.log_softmax(row, dim=-1)
            rows.append(row_logp.gather(-1, label.unsqueeze(-1)).squeeze(-1))
        logprobs = torch.stack(rows)
    return logprobs


def verl_logprobs_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """verl's actor: logits divided by the temperature in their dtype, ``logprobs_from_logits``
    (without flash-attn: logsumexp per row for fp32, log_softmax per row for bf16/fp16) and
    ``entropy_from_logits`` (softmax, logsumexp and the product in the logits dtype)."""
    logits = logits / temperature
    logprobs = _selective_log_softmax(logits, ids)
    pd = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    return logprobs, entropy


def trl_logprobs_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, chunk: int = 128):
    """TRL's GRPO trainer: logits divided by the temperature, ``selective_log_softmax`` (logsumexp
    per row for fp32, log_softmax per row for bf16/fp16) and the chunked ``entropy_from_logits``."""
    logits = logits / temperature
    logprobs = _selective_log_softmax(logits, ids)
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for c in flat.split(chunk, dim=0):
        logp = F.log_softmax(c.float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    entropy = torch.cat(parts).reshape(logits.shape[:-1])
    return logprobs, entropy


def fp32_logprobs_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """The common upcast form: one float32 log_softmax, gather, and entropy from it."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    logprobs = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


# --- policy loss (verl's vanilla PPO loss with agg_loss, its k3 KL and entropy bonus) ------------


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def verl_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, *, clip=0.2, clip_c=3.0,
                     kl_coef=1e-3, entropy_coef=1e-3):  # fmt: skip
    """verl's actor loss with token-mean aggregation: compute_policy_loss_vanilla (dual clip),
    kl_penalty("low_var_kl") and the entropy bonus, each aggregated by agg_loss; plus its metrics."""
    mask = mask.to(logprobs.dtype)
    neg_kl = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = _masked_mean(-neg_kl, mask)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    clipped1 = torch.maximum(loss1, loss2)
    clipfrac = _masked_mean(torch.gt(loss2, loss1).float(), mask)
    loss3 = -advantages * clip_c
    clipped2 = torch.min(loss3, clipped1)
    clipfrac_lower = _masked_mean(torch.gt(clipped1, loss3).float() * (advantages < 0).float(), mask)
    pg = torch.where(advantages < 0, clipped2, clipped1)
    pg_loss = _masked_mean(pg, mask)
    kl = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    kld = torch.clamp(torch.exp(kl) - kl - 1, -10.0, 10.0)
    kl_loss = _masked_mean(kld, mask)
    entropy_loss = _masked_mean(entropy, mask)
    loss = pg_loss - entropy_coef * entropy_loss + kl_coef * kl_loss
    return loss, {"pg_clipfrac": clipfrac, "ppo_kl": ppo_kl, "pg_clipfrac_lower": clipfrac_lower}


# --- group advantages -----------------------------------------------------------------------------


def verl_grpo_advantages(token_rewards, mask, index, eps: float = 1e-6):
    """verl's compute_grpo_outcome_advantage: a Python loop over samples building per-uid score
    lists (host syncs through the dict keys), then one more loop to normalise."""
    scores = token_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            else:
                group = torch.stack(id2score[idx])
                id2mean[idx] = torch.mean(group)
                id2std[idx] = torch.std(group)
        scores = scores.clone()
        for i in range(scores.shape[0]):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
        return scores.unsqueeze(-1) * mask


def vectorized_grpo_advantages(token_rewards, mask, groups, eps: float = 1e-6):
    """The vectorised eager form (scatter-add group sums; what TRL does for contiguous groups,
    generalised to any ids)."""
    scores = token_rewards.sum(dim=-1).double()
    uniq, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(uniq), dtype=torch.float64, device=scores.device).index_add_(0, inverse, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, inverse, scores)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    mean = torch.where(count > 1, mean, 0.0)
    std = torch.where(count > 1, std, 1.0)
    adv = ((scores - mean[inverse]) / (std[inverse] + eps)).float()
    return adv.unsqueeze(-1) * mask


# --- phase entropy --------------------------------------------------------------------------------


def eager_phase_entropy(entropy, ids, mask, delimiter):
    """What a trainer writes today: per sequence, find the first delimiter occurrence with
    unfold/compare, then masked means of the two phases (one small kernel chain per sequence)."""
    d = torch.as_tensor(delimiter, device=ids.device)
    out_think, out_answer = [], []
    for b in range(ids.shape[0]):
        valid = mask[b].bool()
        row, ent = ids[b][valid], entropy[b][valid]
        hits = (row.unfold(0, len(d), 1) == d).all(-1).nonzero() if row.numel() >= len(d) else row.new_zeros(0, 1)
        k = int(hits[0]) if hits.numel() else row.numel()
        think, answer = ent[:k], ent[k + len(d):] if hits.numel() else ent[:0]
        out_think.append(think.mean() if think.numel() else ent.new_zeros(()))
        out_answer.append(answer.mean() if answer.numel() else ent.new_zeros(()))
    return torch.stack(out_think), torch.stack(out_answer)


def eager_linear_logprobs_entropy(hidden, weight, ids):
    """The logits materialised by the LM head, then the fp32 upcast statistics."""
    logits = hidden @ weight.t()
    return fp32_logprobs_entropy(logits, ids)
