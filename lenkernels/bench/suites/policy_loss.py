"""policy_loss (PPO dual clip + k3 KL + entropy bonus, token-mean) against verl's eager loss,
and policy_loss_from_logits against eager logits -> logprobs -> loss."""

from __future__ import annotations

import torch

import lenkernels as lk
from lenkernels.bench import eager
from lenkernels.bench.core import Provider, Suite, register
from lenkernels.bench.suites.common import DTYPES, lenkernels_providers, vocab_cases
from lenkernels.reference import policy_loss as ref
from lenkernels.reference import token_stats as ref_tokens

LOSS_ARGS = dict(clip_low=0.2, clip_dual=3.0, kl_coef=1e-3, kl_estimator="low_var_kl", entropy_coef=1e-3,
                 agg="token-mean")  # fmt: skip


def _batch_cases(options, gpu_default, cpu_default, full):
    if options.tokens:
        out = []
        for n in options.tokens:
            t = min(n, 4096)
            out.append({"batch": max(1, n // t), "seqlen": t})
        return out
    if options.full:
        return full
    return [gpu_default if options.device_type == "cuda" else cpu_default]


def cases(options):
    return _batch_cases(
        options, {"batch": 256, "seqlen": 4096}, {"batch": 64, "seqlen": 1024},
        [{"batch": 256, "seqlen": t} for t in (1024, 4096, 16384)],
    )  # fmt: skip


def make_inputs(case, device):
    b, t = case["batch"], case["seqlen"]
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(b, t, generator=g) * 3
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    inputs = {
        "logprobs": lp,
        "old_logprobs": lp + torch.randn(b, t, generator=g) * 0.1,
        "ref_logprobs": lp + torch.randn(b, t, generator=g) * 0.1,
        "entropy": torch.rand(b, t, generator=g) * 4,
        "advantages": torch.randn(b, 1, generator=g).expand(b, t).contiguous(),
        "mask": torch.arange(t).expand(b, t) < lengths.unsqueeze(1),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def expected(inputs, mode):
    x = {k: v.detach().cpu() for k, v in inputs.items()}
    lp = x["logprobs"].double().requires_grad_(True)
    ent = x["entropy"].double().requires_grad_(True)
    out = ref.policy_loss(lp, x["old_logprobs"], x["advantages"], x["mask"], ref_logprobs=x["ref_logprobs"],
                          entropy=ent, **LOSS_ARGS)  # fmt: skip
    res = {"loss": out["loss"].detach()}
    if mode == "fwd+bwd":
        d_lp, d_ent = torch.autograd.grad(out["loss"], (lp, ent))
        res.update(d_logprobs=d_lp, d_entropy=d_ent)
    return res


def _run(compute):
    def fn(inputs, mode):
        lp = inputs["logprobs"].detach().requires_grad_(mode == "fwd+bwd")
        ent = inputs["entropy"].detach().requires_grad_(mode == "fwd+bwd")
        loss = compute(inputs, lp, ent)
        if mode == "fwd":
            return {"loss": loss.detach()}
        d_lp, d_ent = torch.autograd.grad(loss, (lp, ent))
        return {"loss": loss.detach(), "d_logprobs": d_lp, "d_entropy": d_ent}

    return fn


def _verl(inputs, lp, ent):
    return eager.verl_policy_loss(lp, inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                                  inputs["ref_logprobs"], ent)[0]  # fmt: skip


def _lenkernels(backend):
    def compute(inputs, lp, ent):
        return lk.policy_loss(lp, inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                              ref_logprobs=inputs["ref_logprobs"], entropy=ent, backend=backend, **LOSS_ARGS).loss  # fmt: skip

    return _run(compute)


def _bytes(case, mode):
    n = case["batch"] * case["seqlen"]
    fwd = n * (5 * 4 + 1)  # five fp32 per-token inputs and the bool mask
    return fwd if mode == "fwd" else 2 * fwd + 2 * 4 * n  # backward re-reads them and writes two grads


register(
    Suite(
        name="policy_loss",
        description="PPO dual-clip loss + k3 KL + entropy bonus with metrics, token-mean, [B, T] fp32",
        cases=cases,
        make_inputs=make_inputs,
        expected=expected,
        providers=[
            Provider("eager-verl", _run(_verl), baseline=True, tolerance=1e-4,
                     note="compute_policy_loss_vanilla + kl_penalty + agg_loss"),
            *lenkernels_providers("policy_loss", _lenkernels, tolerance=1e-4),
        ],
        bytes_moved=_bytes,
    )
)  # fmt: skip


# --- the whole path from logits to the loss ------------------------------------------------------


def logits_cases(options):
    cuda = options.device_type == "cuda"
    return vocab_cases(options, full=[1024, 4096, 8192] if cuda else [256, 1024], default=[8192] if cuda else [32])


def logits_inputs(case, device):
    n, v = case["tokens"], case["vocab"]
    g = torch.Generator().manual_seed(0)
    seq = 128 if n >= 128 else n
    b = n // seq
    logits = (torch.randn(b, seq, v, generator=g) * 2).to(DTYPES[case["dtype"]])
    ids = torch.randint(0, v, (b, seq), generator=g)
    lp = ref_tokens.token_logprobs_entropy(logits, ids, 1.0, dtype=torch.float32)[0]
    inputs = {
        "logits": logits,
        "ids": ids,
        "old_logprobs": lp + torch.randn(b, seq, generator=g) * 0.1,
        "ref_logprobs": lp + torch.randn(b, seq, generator=g) * 0.1,
        "advantages": torch.randn(b, 1, generator=g).expand(b, seq).contiguous(),
        "mask": torch.rand(b, seq, generator=g) < 0.9,
    }
    return {k: v.to(device) for k, v in inputs.items()}


def logits_expected(inputs, mode):
    x = {k: v.detach().cpu() for k, v in inputs.items()}
    logits = x["logits"].double().requires_grad_(mode == "fwd+bwd")
    lp, ent = ref_tokens.token_logprobs_entropy(logits, x["ids"])
    out = ref.policy_loss(lp, x["old_logprobs"], x["advantages"], x["mask"], ref_logprobs=x["ref_logprobs"],
                          entropy=ent, **LOSS_ARGS)  # fmt: skip
    res = {"loss": out["loss"].detach()}
    if mode == "fwd+bwd":
        (res["dlogits"],) = torch.autograd.grad(out["loss"], logits)
    return res


def _logits_run(compute):
    def fn(inputs, mode):
        logits = inputs["logits"].detach().requires_grad_(mode == "fwd+bwd")
        loss = compute(inputs, logits)
        if mode == "fwd":
            return {"loss": loss.detach()}
        (d,) = torch.autograd.grad(loss, logits)
        return {"loss": loss.detach(), "dlogits": d}

    return fn


def _verl_logits(inputs, logits):
    b, t, v = logits.shape
    lp, ent = eager.verl_logprobs_entropy(logits.reshape(b * t, v), inputs["ids"].reshape(-1))
    return eager.verl_policy_loss(lp.reshape(b, t), inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                                  inputs["ref_logprobs"], ent.reshape(b, t))[0]  # fmt: skip


def _lenkernels_logits(backend):
    def compute(inputs, logits):
        return lk.policy_loss_from_logits(logits, inputs["ids"], inputs["old_logprobs"], inputs["advantages"],
                                          inputs["mask"], ref_logprobs=inputs["ref_logprobs"], backend=backend,
                                          **LOSS_ARGS).loss  # fmt: skip

    return _logits_run(compute)


def _logits_bytes(case, mode):
    elem = torch.finfo(DTYPES[case["dtype"]]).bits // 8
    logits = case["tokens"] * case["vocab"] * elem
    return logits if mode == "fwd" else 3 * logits


register(
    Suite(
        name="loss_from_logits",
        description="logits -> logprobs, entropy -> PPO loss (k3 KL, entropy bonus), one op vs eager verl",
        cases=logits_cases,
        make_inputs=logits_inputs,
        expected=logits_expected,
        providers=[
            Provider("eager-verl", _logits_run(_verl_logits), baseline=True, tolerance=0.1,
                     note="verl logprobs/entropy in the logits dtype + its loss"),
            *lenkernels_providers("policy_loss", _lenkernels_logits, tolerance=1e-4),
        ],
        bytes_moved=_logits_bytes,
    )
)  # fmt: skip
