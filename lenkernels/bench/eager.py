"""The eager PyTorch code RL trainers run today, written out for the benchmark.

These follow the public source of verl and TRL (their documented functions, re-expressed here so
the benchmark needs neither package installed); lenkernels.integrations tests compare against the
real packages where those are installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def verl_logprobs_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """verl's actor: logits divided by the temperature in their dtype, ``logprobs_from_logits``
    (without flash-attn: logsumexp per row for fp32, log_softmax per row for bf16/fp16) and
    ``entropy_from_logits`` (softmax, logsumexp and the product in the logits dtype)."""
    logits = logits / temperature
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
    pd = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    return logprobs, entropy


def trl_logprobs_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, chunk: int = 128):
    """TRL's GRPO trainer: logits divided by the temperature, ``selective_log_softmax`` (logsumexp
    per row for fp32, log_softmax per row for bf16/fp16) and the chunked ``entropy_from_logits``."""
    logits = logits / temperature
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
