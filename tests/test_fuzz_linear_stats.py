"""Property-based tests of linear_logprobs_entropy: random leading shapes (0- and 1-sized dims),
hidden sizes, vocabularies, dtypes, bias, strides and views, temperatures, ignored rows, int32/int64
ids, tile sizes (chunk_size) and frozen inputs, on every backend, against the float64 reference:
both outputs and the gradients of hidden, weight and bias for random cotangents.

bf16/fp16 inputs lie on a coarse grid whose dot products are exact in fp32, so every backend (and
the reference) rounds the same logits to the same bits and the comparison tests the statistics, not
a GEMM's summation order (test_linear_stats.py does the same).
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import lenkernels as lk
from lenkernels.reference import linear_stats as ref
from lenkernels.reference import token_stats as ref_tokens
from tests.fuzz import FLOAT_DTYPES, backend_fuzz_tests, leading_shapes
from tests.utils import STAT_RTOL, assert_close, backend_params

BACKENDS = [p.values for p in backend_params("linear_stats") if not p.marks]
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}


@st.composite
def linear_cases(draw):
    return {
        "lead": draw(leading_shapes(max_dims=2, max_size=5)),
        "dim": draw(st.sampled_from([1, 3, 16, 33])),  # 33: no multiple of any K step
        "vocab": draw(st.sampled_from([1, 2, 37, 129, 300])),  # 129, 300: masked column tails, several tiles
        "dtype": draw(FLOAT_DTYPES),
        "bias": draw(st.booleans()),
        "temp": draw(st.sampled_from(["one", "scalar", "per_token", "per_row"])),
        "ignore_share": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "ids_dtype": draw(st.sampled_from([torch.int64, torch.int32])),
        # None: one tile; smaller: row and vocabulary chunks whose softmax states are merged (tiles
        # of at least 16 columns: a Python loop visits each tile on the cpu/reference backends)
        "chunk": draw(st.sampled_from([None, 256, 1000])),
        "hidden_layout": draw(st.sampled_from(["contiguous", "row_stride", "transposed"])),
        "weight_layout": draw(st.sampled_from(["contiguous", "transposed"])),
        "frozen": draw(st.sampled_from([(), ("weight",), ("hidden",), ("bias",)])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    lead, dim, vocab, dtype = c["lead"], c["dim"], c["vocab"], c["dtype"]
    if dtype == torch.float32:
        hidden = torch.randn(*lead, dim, generator=g)
        weight = torch.randn(vocab, dim, generator=g) * (2.0 / math.sqrt(dim))
        bias = torch.randn(vocab, generator=g)
    else:
        hidden = torch.randint(-8, 9, (*lead, dim), generator=g) / 8.0
        weight = torch.randint(-8, 9, (vocab, dim), generator=g) / 16.0
        bias = torch.randint(-64, 65, (vocab,), generator=g) / 64.0
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    ids = torch.randint(0, vocab, lead, generator=g)
    ids = torch.where(torch.rand(lead, generator=g) < c["ignore_share"], torch.full_like(ids, -100), ids)
    if c["temp"] == "one":
        temp = 1.0
    elif c["temp"] == "scalar":
        temp = float(torch.rand((), generator=g)) * 2 + 0.2
    elif c["temp"] == "per_token":
        temp = torch.rand(lead, generator=g) * 2 + 0.2
    else:
        temp = (torch.rand(*lead[:-1], 1, generator=g) * 2 + 0.2) if lead else 0.5
    g_lp, g_h = torch.randn(lead, generator=g), torch.randn(lead, generator=g)
    return hidden, weight, (bias if c["bias"] else None), ids.to(c["ids_dtype"]), temp, g_lp, g_h


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf with the same values and another memory layout."""
    if layout == "row_stride" and x.dim() >= 1:
        buf = torch.full((*x.shape[:-1], x.shape[-1] + 3), float("nan"), dtype=x.dtype)
        buf[..., 2 : x.shape[-1] + 2] = x
        x = buf[..., 2 : x.shape[-1] + 2]
    elif layout == "transposed" and x.dim() >= 2:
        x = x.mT.contiguous().mT
    return x.detach().requires_grad_(True)


def _expected(hidden, weight, bias, ids, temp, g_lp, g_h):
    """float64 outputs, gradients, and the magnitude of the terms each gradient sums (the scale a
    correct fp32 accumulation's error grows with)."""
    exact = hidden.dtype == torch.float32
    h, w, b = (None if t is None else (t.double() if exact else t) for t in (hidden, weight, bias))
    lp, ent = ref.linear_logprobs_entropy(h, w, ids, b, temp)
    logits = ref.linear_logits(h, w, b).double().reshape(-1, w.shape[0]).requires_grad_(True)
    t = temp.double().reshape(-1) if torch.is_tensor(temp) else temp
    if torch.is_tensor(temp) and temp.numel() != ids.numel():
        t = temp.double().expand(ids.shape).reshape(-1)
    lp2, ent2 = ref_tokens.token_logprobs_entropy(logits, ids.reshape(-1).long(), t)
    loss = (lp2 * g_lp.double().reshape(-1)).sum() + (ent2 * g_h.double().reshape(-1)).sum()
    (dl,) = torch.autograd.grad(loss, logits) if logits.numel() else (torch.zeros_like(logits),)
    with torch.no_grad():
        tt = t.unsqueeze(-1) if torch.is_tensor(t) else t
        z = logits / tt
        p = torch.softmax(z, -1)
        mean_z = (p * z).sum(-1, keepdim=True)
        glp = g_lp.double().reshape(-1, 1).abs() * (ids.reshape(-1, 1) != -100)
        s = (glp * (p + 1e-300) + g_h.double().reshape(-1, 1).abs() * p * ((z - mean_z).abs() + 1)) / tt + dl.abs()
    h2, w2 = h.double().reshape(-1, w.shape[1]), w.double()
    grads = {"hidden": (dl @ w2).reshape(hidden.shape), "weight": dl.T @ h2, "bias": dl.sum(0)}
    scales = {"hidden": (s @ w2.abs()).reshape(hidden.shape), "weight": s.T @ h2.abs(), "bias": s.sum(0)}
    return lp, ent, grads, scales


def _run(c, backend, device):
    hidden, weight, bias, ids, temp, g_lp, g_h = _inputs(c)
    lp_ref, ent_ref, grads, scales = _expected(hidden, weight, bias, ids, temp, g_lp, g_h)
    dev = lambda x: x.to(device) if torch.is_tensor(x) else x  # noqa: E731
    h = _layout(dev(hidden), c["hidden_layout"]) if "hidden" not in c["frozen"] else dev(hidden)
    w = _layout(dev(weight), c["weight_layout"]) if "weight" not in c["frozen"] else dev(weight)
    b = None if bias is None else (dev(bias).requires_grad_(True) if "bias" not in c["frozen"] else dev(bias))
    lp, ent = lk.linear_logprobs_entropy(h, w, dev(ids), bias=b, temperature=dev(temp), chunk_size=c["chunk"],
                                         backend=backend)  # fmt: skip
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == ids.shape
    exact = hidden.dtype == torch.float32
    h64, w64, b64 = (None if t is None else (t.double() if exact else t) for t in (hidden, weight, bias))
    logits = ref.linear_logits(h64, w64, b64).double()
    t = temp.double().unsqueeze(-1) if torch.is_tensor(temp) else temp
    lse = torch.logsumexp(logits / t, -1).abs() if logits.numel() else torch.zeros(ids.shape, dtype=torch.float64)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=lse + 1, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=lse + 1, name="entropy")
    assert bool((lp.cpu()[ids == -100] == 0).all()), "ignored rows get logprob 0"

    inputs = {name: x for name, x in (("hidden", h), ("weight", w), ("bias", b)) if x is not None and x.requires_grad}
    got = torch.autograd.grad((lp * dev(g_lp)).sum() + (ent * dev(g_h)).sum(), list(inputs.values()), allow_unused=True)
    for (name, x), d in zip(inputs.items(), got):
        if d is None:  # no row (N = 0): nothing flows back
            assert ids.numel() == 0, name
            continue
        assert d.dtype == c["dtype"] and d.shape == x.shape, name
        # fp16 d logits keep subnormals (spacing 2^-24) before the GEMM sums up to N (or V) of them
        atol = 2.0**-24 * max(ids.numel(), c["vocab"]) if c["dtype"] == torch.float16 else 1e-30
        assert_close(d, grads[name], rtol=GRAD_RTOL[c["dtype"]], atol=atol, scale=scales[name], name=f"d{name}")


test_fuzz_linear_logprobs_entropy, test_fuzz_linear_logprobs_entropy_gpu_backends = backend_fuzz_tests(
    _run, linear_cases(), BACKENDS, 100, 8
)
