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


# linear_logprobs_entropy is the two-output form of linear_token_stats: the fused op, the same bits.
FUSED_BACKENDS = backend_params("linear_stats")
THIN_FORM_CASES = [
    # lead, dtype, kwargs: why each is in the grid
    ((11,), torch.float32, {}),  # the defaults, with a bias (every fifth id ignored, as in _inputs)
    # padded layout, per-token temperature, row tiles of 3
    ((2, 5), torch.bfloat16, {"temperature": "per_token", "return_entropy": False, "chunk_size": 3 * 29}),
    ((7,), torch.float32, {"bias": None, "temperature": 0.6, "chunk_size": 1}),  # one logit a tile
]


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group (the vocabulary is whole on it), torn down after the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _thin_and_main(h, w, b, ids, kwargs, backend):
    """(values, gradients) of linear_logprobs_entropy and of linear_token_stats on the same inputs."""
    return_entropy = kwargs.pop("return_entropy", True)
    gen = torch.Generator().manual_seed(5)
    g_lp, g_h = torch.randn(ids.shape, generator=gen), torch.randn(ids.shape, generator=gen)
    results = []
    for thin in (True, False):
        params = [x.detach().clone().requires_grad_() for x in (h, w, b) if x is not None]
        bias = params[2] if b is not None else None
        if thin:
            lp, ent = lk.linear_logprobs_entropy(*params[:2], ids, bias=bias, return_entropy=return_entropy,
                                                 backend=backend, **kwargs)  # fmt: skip
            assert (ent is None) == (not return_entropy)
        else:
            st = lk.linear_token_stats(*params[:2], ids, bias=bias, backend=backend, **kwargs)
            lp, ent = st.logprob, (st.entropy if return_entropy else None)
        loss = (lp * g_lp.to(lp.device)).sum() + (0 if ent is None else (ent * g_h.to(ent.device)).sum())
        results.append([lp.detach(), None if ent is None else ent.detach(), *torch.autograd.grad(loss, params)])
    return results


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
@pytest.mark.parametrize("lead,dtype,kwargs", THIN_FORM_CASES, ids=["defaults", "bf16_padded", "no_bias_tiny_tiles"])
def test_linear_logprobs_entropy_is_linear_token_stats(backend, device, lead, dtype, kwargs):
    kwargs = dict(kwargs)
    h, w, b, ids, temp = (None if x is None else x.to(device) for x in _inputs(lead, 16, 29, dtype, True, seed=9))
    if kwargs.get("temperature") == "per_token":
        kwargs["temperature"] = temp
    b = kwargs.pop("bias", b)
    thin, main = _thin_and_main(h, w, b, ids, kwargs, backend)
    for got, want in zip(thin, main):
        assert (got is None and want is None) or torch.equal(got, want)


def test_process_group_on_the_fused_path(one_rank_group):
    """Under a process group the thin form and the main entry run the same fused op; what the fused
    op cannot produce raises, naming the argument, rather than running another path."""
    h, w, b, ids, temp = _inputs((6,), 16, 29, torch.float32, True, seed=11)
    for reduce_hidden_grad in (True, False):
        kwargs = {"temperature": temp, "process_group": one_rank_group, "reduce_hidden_grad": reduce_hidden_grad}
        thin, main = _thin_and_main(h, w, b, ids, kwargs, "cpu")
        for got, want in zip(thin, main):
            assert torch.equal(got, want)
    plain = lk.linear_token_stats(h, w, ids, bias=b, temperature=temp, backend="cpu")
    vp = lk.linear_token_stats(h, w, ids, bias=b, temperature=temp, process_group=one_rank_group, backend="cpu")
    assert torch.equal(vp.logprob, plain.logprob) and torch.equal(vp.entropy, plain.entropy)
    for bad, name in (({"outputs": ("logprob", "sum_p2")}, "sum_p2"), ({"softcap": 30.0}, "softcap"),
                      ({"logit_scale": 0.5}, "logit_scale"), ({"compute_dtype": torch.bfloat16}, "compute_dtype"),
                      ({"outputs": ("topk",), "top_k": 2}, "topk")):  # fmt: skip
        with pytest.raises(NotImplementedError, match=f"process_group.*{name}"):
            lk.linear_token_stats(h, w, ids, process_group=one_rank_group, **bad)


def test_process_group_argument_errors():
    h, w, _, ids, _ = _inputs((4,), 8, 11, torch.float32, False, seed=4)
    with pytest.raises(TypeError, match="process_group"):
        lk.linear_token_stats(h, w, ids, process_group=object())
    with pytest.raises(TypeError, match="reduce_hidden_grad"):
        lk.linear_token_stats(h, w, ids, reduce_hidden_grad="no")
    with pytest.raises(TypeError, match="return_entropy"):
        lk.linear_logprobs_entropy(h, w, ids, return_entropy=1)
