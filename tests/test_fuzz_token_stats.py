"""Property-based tests of token_logprobs_entropy: random shapes (0/1-sized dims), dtypes,
strides and views, temperatures and ignored rows, on every backend, against float64."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import lenkernels as lk
from lenkernels.reference import token_stats as ref
from tests.fuzz import FLOAT_DTYPES, examples, leading_shapes
from tests.utils import GRAD_ATOL, GRAD_RTOL, STAT_RTOL, assert_close, backend_params, token_grad_scale

BACKENDS = [p.values for p in backend_params("token_stats") if not p.marks]


@st.composite
def token_cases(draw):
    lead = draw(leading_shapes(max_size=4))  # <= 64 rows: the Triton interpreter runs every program in Python
    vocab = draw(st.one_of(st.integers(1, 70), st.integers(2040, 2060), st.just(4097)))
    dtype = draw(FLOAT_DTYPES)
    layout = draw(st.sampled_from(["contiguous", "row_stride", "transposed", "expanded_temp"]))
    temp_kind = draw(st.sampled_from(["one", "scalar", "per_token", "per_row"]))
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    ignore_share = draw(st.sampled_from([0.0, 0.3, 1.0]))
    masked_share = draw(st.sampled_from([0.0, 0.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    backend = draw(st.sampled_from(BACKENDS))
    return lead, vocab, dtype, layout, temp_kind, scale, ignore_share, masked_share, seed, backend


def _build(lead, vocab, dtype, layout, temp_kind, scale, ignore_share, masked_share, seed, device):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    if layout == "row_stride":  # rows of a wider buffer: a view with row stride > V
        logits = (torch.randn(*lead, vocab + 5, generator=g) * scale)[..., 2 : vocab + 2]
    elif layout == "transposed":  # unit stride along a leading dim: copied once
        logits = (torch.randn(vocab, *lead, generator=g) * scale).movedim(0, -1)
    else:
        logits = torch.randn(*lead, vocab, generator=g) * scale
    if masked_share and vocab > 1:
        drop = torch.rand(*lead, vocab, generator=g) < masked_share
        drop[..., 0] = False  # keep one finite logit per row
        logits = logits.masked_fill(drop, float("-inf"))
    logits = logits.to(dtype)
    ids = torch.randint(0, vocab, lead, generator=g)
    finite = torch.isfinite(logits).reshape(n, vocab)
    flat = ids.reshape(-1)
    flat.copy_(torch.where(finite[torch.arange(n), flat], flat, torch.zeros_like(flat)))
    ids = torch.where(torch.rand(lead, generator=g) < ignore_share, torch.full_like(ids, -100), ids)
    if temp_kind == "one":
        temp = 1.0
    elif temp_kind == "scalar":
        temp = float(torch.rand((), generator=g)) * 2 + 0.2
    elif temp_kind == "per_token":
        temp = torch.rand(lead, generator=g) * 2 + 0.2
    else:
        temp = (torch.rand(*lead[:-1], 1, generator=g) * 2 + 0.2) if lead else 0.5
    if device != "cpu":
        logits, ids = logits.to(device), ids.to(device)
        temp = temp.to(device) if torch.is_tensor(temp) else temp
    return logits, ids, temp


@examples(40)
@given(token_cases())
def test_fuzz_values_and_grads(case):
    *spec, (backend, device) = case
    logits, ids, temp = _build(*spec, device)
    x = logits.detach().clone().requires_grad_(True) if logits.is_contiguous() else logits.detach().requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(x, ids, temperature=temp, backend=backend)
    assert lp.shape == ids.shape and ent.shape == ids.shape
    t_ref = temp.cpu().expand(ids.shape) if torch.is_tensor(temp) else temp
    x64 = logits.detach().cpu().double().requires_grad_(True)
    lp64, ent64 = ref.token_logprobs_entropy(x64, ids.cpu(), t_ref)
    lse = torch.logsumexp(x64.detach() / (t_ref.unsqueeze(-1) if torch.is_tensor(t_ref) else t_ref), -1).abs()
    assert_close(lp, lp64, rtol=STAT_RTOL, scale=lse + 1, name="logprobs")
    assert_close(ent, ent64, rtol=STAT_RTOL, scale=lse + 1, name="entropy")
    assert bool((lp.cpu()[ids.cpu() == -100] == 0).all())
    if ids.numel() == 0:
        return
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    (grad,) = torch.autograd.grad((lp * g_lp.to(lp.device)).sum() + (ent * g_h.to(lp.device)).sum(), x)
    (grad64,) = torch.autograd.grad((lp64 * g_lp.double()).sum() + (ent64 * g_h.double()).sum(), x64)
    dtype = logits.dtype
    scale = token_grad_scale(logits.detach().cpu(), ids.cpu(), t_ref, g_lp, g_h, -100)
    assert_close(grad, grad64, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")
