"""token_logprobs_entropy against the eager verl / TRL / fp32 code, forward and forward+backward."""

from __future__ import annotations

import torch

import lenkernels as lk
from lenkernels.bench import eager
from lenkernels.bench.core import Provider, Suite, register
from lenkernels.bench.suites.common import DTYPES, grads, lenkernels_providers, model_output, vocab_cases
from lenkernels.reference import token_stats as ref

TEMPERATURE = 0.9


def cases(options):
    cuda = options.device_type == "cuda"
    return vocab_cases(options, full=[1024, 4096, 8192, 16384] if cuda else [256, 512, 1024, 2048],
                       default=[8192] if cuda else [32])  # fmt: skip


def make_inputs(case, device):
    n, v = case["tokens"], case["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, v, generator=gen) * 2).to(DTYPES[case["dtype"]]).to(device)
    ids = torch.randint(0, v, (n,), generator=gen).to(device)
    g_lp = torch.randn(n, generator=gen).to(device)
    g_h = torch.randn(n, generator=gen).to(device)
    return {"logits": logits, "ids": ids, "g_lp": g_lp, "g_h": g_h}


def expected(inputs, mode):
    x = inputs["logits"].detach().cpu().double().requires_grad_(mode == "fwd+bwd")
    lp, ent = ref.token_logprobs_entropy(x, inputs["ids"].cpu(), TEMPERATURE)
    out = {"logprobs": lp.detach(), "entropy": ent.detach()}
    if mode == "fwd+bwd":
        out["dlogits"] = grads((lp, ent), (inputs["g_lp"].cpu().double(), inputs["g_h"].cpu().double()), x)
    return out


def _wrap(compute, inplace=False):
    """Provider fn from ``compute(logits, ids) -> (logprobs, entropy)``; ``inplace``: the logits
    are a model's output (a non-leaf), whose buffer the backward may overwrite."""

    def fn(inputs, mode):
        logits = inputs["logits"]
        if mode == "fwd":
            with torch.no_grad():
                lp, ent = compute(logits, inputs["ids"])
            return {"logprobs": lp, "entropy": ent}
        x = model_output(logits) if inplace else logits.detach().requires_grad_(True)
        lp, ent = compute(x, inputs["ids"])
        return {"logprobs": lp, "entropy": ent, "dlogits": grads((lp, ent), (inputs["g_lp"], inputs["g_h"]), x)}

    return fn


def _lenkernels(backend, inplace=False):
    def compute(x, ids):
        return lk.token_logprobs_entropy(x, ids, temperature=TEMPERATURE, backend=backend, inplace_backward=inplace)

    fn = _wrap(compute, inplace)
    fn.mutates_inputs = inplace
    return fn


def _inplace_provider(backend):
    from lenkernels.bench.suites.common import backend_available

    return Provider(
        f"lenkernels-{backend}-inplace",
        _lenkernels(backend, inplace=True),
        backend_available("token_stats", backend),
        tolerance=1e-4,
        modes=("fwd+bwd",),
        note="gradient written into the logits buffer",
    )


def _bytes(case, mode):
    elem = torch.finfo(DTYPES[case["dtype"]]).bits // 8
    logits = case["tokens"] * case["vocab"] * elem
    return logits if mode == "fwd" else 3 * logits  # fwd read; bwd read + write


# bf16 gradients are compared after rounding to bf16 (2^-8 relative), eager bf16 maths is looser still
register(
    Suite(
        name="token_stats",
        description="log-probabilities + entropy of sampled tokens from [N, V] logits (T = 0.9)",
        cases=cases,
        make_inputs=make_inputs,
        expected=expected,
        providers=[
            Provider("eager-verl", _wrap(lambda x, y: eager.verl_logprobs_entropy(x, y, TEMPERATURE)), tolerance=0.1,
                     baseline=True, note="verl logprobs_from_logits_v2 + entropy_from_logits"),
            Provider("eager-trl", _wrap(lambda x, y: eager.trl_logprobs_entropy(x, y, TEMPERATURE)), tolerance=0.1,
                     note="TRL selective_log_softmax + entropy_from_logits"),
            Provider("eager-fp32", _wrap(lambda x, y: eager.fp32_logprobs_entropy(x, y, TEMPERATURE)), tolerance=1e-2,
                     note="float32 log_softmax + gather"),
            *lenkernels_providers("token_stats", _lenkernels, tolerance=1e-4),
            _inplace_provider("triton"),
            _inplace_provider("cpu"),
        ],
        bytes_moved=_bytes,
    )
)  # fmt: skip
