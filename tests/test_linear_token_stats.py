"""lenkernels.linear_token_stats: the token_stats outputs from the last hidden state and the LM head
(logit scale, soft cap, per-token temperature, bias, chunks), values and gradients in hidden,
weight and bias against the float64 definition through autograd, on every backend."""

from __future__ import annotations

import pytest
import torch

import lenkernels as lk
from tests.utils import GRAD_RTOL, STAT_RTOL, assert_close, backend_params

BACKENDS = backend_params("token_stats")
ALL = ("logprob", "entropy", "sum_p2", "argmax", "mean_logit")


def _definition(h, w, b, ids, temp, scale, softcap, ignore_index=-100):
    """float64 statistics of z = transform(h @ w.T + b) / T, differentiable through autograd."""
    y = (h.double() @ w.double().T + (0 if b is None else b.double())) * scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    z = y / (temp.double().unsqueeze(-1) if torch.is_tensor(temp) else temp)
    lse = torch.logsumexp(z, -1)
    logp = z - lse.unsqueeze(-1)
    keep = ids != ignore_index
    lp = torch.where(keep, logp.gather(-1, torch.where(keep, ids, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    p = logp.exp()
    top = z.detach().argmax(-1)
    return {"logprob": lp, "entropy": -(p * logp).sum(-1), "sum_p2": (p * p).sum(-1),
            "log_sum_p2": torch.logsumexp(2 * logp, -1), "argmax": top,
            "max_logprob": logp.gather(-1, top.unsqueeze(-1)).squeeze(-1), "mean_logit": z.mean(-1)}  # fmt: skip


def _inputs(lead, hidden_size, vocab, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, hidden_size, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.25).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    ids = torch.randint(0, vocab, lead, generator=gen)
    ids.view(-1)[::5] = -100
    temp = torch.rand(lead, generator=gen) + 0.5
    return h, w, b, ids, temp


CASES = [
    # lead, outputs, logit_scale, softcap, bias, rows per chunk
    ((13,), ALL, 1.0, None, True, 4),
    ((3, 5), ALL, 0.25, 4.0, False, 2),
    ((9,), ("sum_p2", "mean_logit"), 2.0, None, True, 64),
    ((2, 7), ("logprob", "entropy"), 1.0, 2.5, True, 3),
    ((11,), ("logprob", "entropy"), 1.0, None, True, 5),  # the fused linear_logprobs_entropy path
    ((6,), ("entropy",), 1.0, None, False, 1),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lead,outputs,scale,softcap,bias,rows", CASES)
def test_values_and_gradients(backend, device, lead, outputs, scale, softcap, bias, rows):
    vocab, hidden_size = 37, 16
    inputs = _inputs(lead, hidden_size, vocab, torch.float32, bias, seed=len(lead) * 31 + rows)
    h, w, b, ids, temp = (None if x is None else x.to(device) for x in inputs)
    params = [x.requires_grad_() for x in (h, w, b) if x is not None]
    st = lk.linear_token_stats(h, w, ids, bias=b, temperature=temp, outputs=outputs, logit_scale=scale,
                               softcap=softcap, chunk_size=rows * vocab, backend=backend)  # fmt: skip
    ref_params = [x.detach().cpu().double().requires_grad_() for x in params]
    hh, ww = ref_params[:2]
    bb = ref_params[2] if b is not None else None
    ids, temp = ids.cpu(), temp.cpu()
    exp = _definition(hh, ww, bb, ids, temp, scale, softcap)
    loss, ref_loss = 0.0, 0.0
    gen = torch.Generator().manual_seed(7)
    for field, value in st._asdict().items():
        wanted = {"log_sum_p2": "sum_p2", "max_logprob": "argmax"}.get(field, field) in outputs
        if not wanted:
            assert value is None, field
            continue
        assert value.shape == ids.shape, field
        value = value.cpu()
        if field == "argmax":
            assert value.dtype == torch.int64 and torch.equal(value, exp["argmax"])
            continue
        assert value.dtype == torch.float32, field
        assert_close(value, exp[field], rtol=STAT_RTOL, scale=exp[field].detach().abs().amax() + 1, name=field)
        g = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
        loss = loss + (value.double() * g).sum()
        ref_loss = ref_loss + (exp[field] * g).sum()
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == torch.float32
        assert_close(got.cpu(), want, rtol=GRAD_RTOL[torch.float32] * 10, scale=want.abs().amax() + 1e-3, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_the_eager_gemm_rounded(dtype):
    """The chunked path's logits are F.linear in the hidden dtype, as linear_logprobs_entropy's."""
    h, w, b, ids, temp = _inputs((10,), 16, 29, dtype, True, seed=3)
    st = lk.linear_token_stats(h, w, ids, bias=b, temperature=temp, outputs=ALL, chunk_size=29 * 3, backend="cpu")
    logits = torch.nn.functional.linear(h, w, b)
    want = lk.token_stats(logits, ids, temperature=temp, outputs=ALL, backend="cpu")
    for field, value in st._asdict().items():
        if value is None:  # a field not asked for (the sparse ones: tests/test_token_stats_sparse.py)
            assert getattr(want, field) is None, field
            continue
        assert torch.equal(value, getattr(want, field)), field


def test_no_grad_and_empty_batch():
    h, w, b, ids, temp = _inputs((0,), 8, 11, torch.float32, True, seed=1)
    st = lk.linear_token_stats(h, w, ids, bias=b, temperature=temp, outputs=ALL, softcap=5.0)
    assert all(v.shape == (0,) for v in st if v is not None)
    h, w, b, ids, temp = _inputs((4,), 8, 11, torch.float32, True, seed=2)
    with torch.no_grad():
        st = lk.linear_token_stats(h.requires_grad_(), w, ids, bias=b, outputs=ALL, logit_scale=0.5)
    assert not st.logprob.requires_grad


def test_argument_errors():
    h, w, b, ids, _ = _inputs((4,), 8, 11, torch.float32, True, seed=4)
    with pytest.raises(ValueError, match="softcap"):
        lk.linear_token_stats(h, w, ids, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        lk.linear_token_stats(h, w, ids, logit_scale=float("nan"))
    with pytest.raises(TypeError, match="outputs"):
        lk.linear_token_stats(h, w, ids, outputs="logprob")
    with pytest.raises(ValueError, match="outputs"):
        lk.linear_token_stats(h, w, ids, outputs=("topk",))
    with pytest.raises(ValueError, match="weight must have shape"):
        lk.linear_token_stats(h, w[:, :5], ids)
    with pytest.raises(TypeError, match="bias must have the dtype"):
        lk.linear_token_stats(h, w, ids, bias=b.double())
    with pytest.raises(ValueError, match="ids must have the leading shape"):
        lk.linear_token_stats(h, w, ids[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        lk.linear_token_stats(h, w, ids, chunk_size=0, outputs=ALL)
