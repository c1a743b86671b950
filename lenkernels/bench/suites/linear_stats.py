"""linear_logprobs_entropy (hidden states + LM head, no [N, V] logits) against the eager
matmul + log_softmax path."""

from __future__ import annotations

import torch

import lenkernels as lk
from lenkernels.bench import eager
from lenkernels.bench.core import Provider, Suite, register
from lenkernels.bench.suites.common import DTYPES, lenkernels_providers
from lenkernels.reference import linear_stats as ref


def cases(options):
    dtype = options.dtype or "bf16"
    if options.device_type == "cuda":
        vocab, hidden = options.vocab or 151_936, 4096
        sizes = options.tokens or ([2048, 8192] if options.full else [8192])
    else:
        vocab, hidden = options.vocab or 32_000, 256
        sizes = options.tokens or ([128, 512] if options.full else [128])
    return [{"tokens": n, "hidden": hidden, "vocab": vocab, "dtype": dtype} for n in sizes]


def make_inputs(case, device):
    g = torch.Generator().manual_seed(0)
    n, d, v = case["tokens"], case["hidden"], case["vocab"]
    dt = DTYPES[case["dtype"]]
    return {
        "hidden": (torch.randn(n, d, generator=g)).to(dt).to(device),
        "weight": (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dt).to(device),
        "ids": torch.randint(0, v, (n,), generator=g).to(device),
        "g_lp": torch.randn(n, generator=g).to(device),
        "g_h": torch.randn(n, generator=g).to(device),
    }


def expected(inputs, mode, chunk: int = 1024):
    """float64 on the inputs' device, in row chunks so [N, V] float64 never exists at once."""
    h_all, w = inputs["hidden"], inputs["weight"]
    w64 = w.detach().double().requires_grad_(mode == "fwd+bwd")
    lps, ents, dhs = [], [], []
    dw = torch.zeros_like(w64) if mode == "fwd+bwd" else None
    for s in range(0, h_all.shape[0], chunk):
        h = h_all[s : s + chunk].detach().double().requires_grad_(mode == "fwd+bwd")
        logits = ref.linear_logits(h_all[s : s + chunk], w)  # rounded to the input dtype, as the op does
        logits = logits.double() + (h @ w64.t() - (h @ w64.t()).detach())  # same values, float64 gradient path
        from lenkernels.reference import token_stats as ref_tokens

        lp, ent = ref_tokens.token_logprobs_entropy(logits, inputs["ids"][s : s + chunk])
        lps.append(lp.detach())
        ents.append(ent.detach())
        if mode == "fwd+bwd":
            loss = (lp * inputs["g_lp"][s : s + chunk].double()).sum() + (ent * inputs["g_h"][s : s + chunk].double()).sum()
            dh, dwc = torch.autograd.grad(loss, (h, w64))
            dhs.append(dh)
            dw += dwc
    out = {"logprobs": torch.cat(lps), "entropy": torch.cat(ents)}
    if mode == "fwd+bwd":
        out.update(dhidden=torch.cat(dhs), dweight=dw)
    return out


def _run(compute):
    def fn(inputs, mode):
        h = inputs["hidden"].detach().requires_grad_(mode == "fwd+bwd")
        w = inputs["weight"].detach().requires_grad_(mode == "fwd+bwd")
        lp, ent = compute(h, w, inputs["ids"])
        if mode == "fwd":
            return {"logprobs": lp.detach(), "entropy": ent.detach()}
        loss = (lp * inputs["g_lp"]).sum() + (ent * inputs["g_h"]).sum()
        dh, dw = torch.autograd.grad(loss, (h, w))
        return {"logprobs": lp.detach(), "entropy": ent.detach(), "dhidden": dh, "dweight": dw}

    return fn


def _lenkernels(backend):
    return _run(lambda h, w, ids: lk.linear_logprobs_entropy(h, w, ids, backend=backend))


register(
    Suite(
        name="linear_stats",
        description="logprobs + entropy from hidden states and the LM head (the [N, V] logits never held)",
        cases=cases,
        make_inputs=make_inputs,
        expected=expected,
        providers=[
            Provider("eager-matmul", _run(eager.eager_linear_logprobs_entropy), baseline=True, tolerance=0.1,
                     note="hidden @ W.T, then float32 log_softmax"),
            # bf16 logits: a different matmul summation order may round a logit to the neighbouring
            # bf16 value, hence the looser check here (tests/test_linear_stats.py is the precise one)
            *lenkernels_providers("linear_stats", _lenkernels, tolerance=0.1),
        ],
        bytes_moved=lambda case, mode: (case["vocab"] * case["hidden"] + case["tokens"] * case["hidden"])
        * (torch.finfo(DTYPES[case["dtype"]]).bits // 8) * (1 if mode == "fwd" else 3),
    )
)  # fmt: skip
