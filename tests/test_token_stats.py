"""token_logprobs_entropy against the float64 reference (SPEC 1), on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import lenkernels as lk
from lenkernels.reference import token_stats as ref
from tests.utils import (
    GRAD_ATOL,
    GRAD_RTOL,
    STAT_RTOL,
    assert_close,
    assert_compiled_like_eager,
    backend_params,
    token_grad_scale,
)

BACKENDS = backend_params("token_stats")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading shape, V): why each is in the grid
SHAPES = [
    ((1,), 151_936),  # Qwen vocab, one row: split-vocab path, V not a multiple of any block
    ((3,), 50_257),  # GPT-2 vocab, odd size, few rows
    ((2, 5), 1_000),  # padded [B, T] layout
    ((17,), 7),  # tiny V smaller than any block, more rows than programs
    ((4, 3, 2), 4_099),  # 3 leading dims; V one past a block multiple
]


def _inputs(lead, vocab, dtype, device, scale=3.0):
    logits = (torch.randn(*lead, vocab, dtype=torch.float32) * scale).to(dtype).to(device)
    ids = torch.randint(0, vocab, lead).to(device)
    return logits, ids


def _lse(logits, temperature=1.0):
    z = logits.double() / (temperature.double().unsqueeze(-1) if torch.is_tensor(temperature) else temperature)
    return torch.logsumexp(z, -1)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab", SHAPES)
def test_forward_matches_reference(backend, device, dtype, lead, vocab):
    logits, ids = _inputs(lead, vocab, dtype, device)
    lp, ent = lk.token_logprobs_entropy(logits, ids, backend=backend)
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits.cpu(), ids.cpu())
    lse = _lse(logits.cpu()).abs()
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == ids.shape
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=lse + 1, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")
    # properties: entropy in [0, log V], logprob <= 0
    assert bool((ent >= -1e-5).all()) and bool((ent <= math.log(vocab) + 1e-4).all())
    assert bool((lp <= 1e-6).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_worse_than_eager_fp32(backend, device):
    """At V = 151 936 the kernel's error against float64 stays below eager fp32's (log_softmax,
    softmax * z) by construction of the (m, S, U) state."""
    logits, ids = _inputs((4,), 151_936, torch.float32, device, scale=5.0)
    lp, ent = lk.token_logprobs_entropy(logits, ids, backend=backend)
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits.cpu(), ids.cpu())
    x = logits.cpu()
    logp = torch.log_softmax(x, -1)
    eager_ent = -(logp.exp() * logp).sum(-1)
    eager_err = (eager_ent.double() - ent_ref).abs().max().item()
    ours = (ent.cpu().double() - ent_ref).abs().max().item()
    assert ours <= max(2 * eager_err, 1e-5), (ours, eager_err)
    assert (lp.cpu().double() - lp_ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["scalar", "per_token", "per_sequence"])
def test_temperature(backend, device, kind):
    logits, ids = _inputs((3, 4), 3_000, torch.bfloat16, device)
    if kind == "scalar":
        temp = 0.7
    elif kind == "per_token":
        temp = (torch.rand(3, 4) + 0.3).to(device)
    else:
        temp = (torch.rand(3, 1) + 0.3).to(device)
    lp, ent = lk.token_logprobs_entropy(logits, ids, temperature=temp, backend=backend)
    t_ref = temp.cpu().expand(3, 4) if torch.is_tensor(temp) else temp
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits.cpu(), ids.cpu(), t_ref)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=_lse(logits.cpu(), t_ref).abs() + 1, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab", [((1,), 151_936), ((2, 3), 1_000), ((5,), 7)])
@pytest.mark.parametrize("outputs", ["both", "logprobs", "entropy"])
def test_backward_matches_reference(backend, device, dtype, lead, vocab, outputs):
    logits, ids = _inputs(lead, vocab, dtype, device)
    ids.view(-1)[0] = -100  # one ignored row: entropy gradient only
    temp = 0.8
    x = logits.clone().requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(x, ids, temperature=temp, backend=backend)
    g_lp = torch.randn(lead) if outputs != "entropy" else torch.zeros(lead)
    g_h = torch.randn(lead) if outputs != "logprobs" else torch.zeros(lead)
    loss = (lp * g_lp.to(device)).sum() * (outputs != "entropy") + (ent * g_h.to(device)).sum() * (
        outputs != "logprobs"
    )
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype and grad.shape == logits.shape

    x64 = logits.detach().cpu().double().requires_grad_(True)
    lp64, ent64 = ref.token_logprobs_entropy(x64, ids.cpu(), temp)
    (grad64,) = torch.autograd.grad((lp64 * g_lp.double()).sum() + (ent64 * g_h.double()).sum(), x64)
    scale = token_grad_scale(logits.cpu(), ids, temp, g_lp, g_h, -100)
    assert_close(grad, grad64, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignore_index_rows(backend, device):
    logits, ids = _inputs((6,), 5_000, torch.float32, device)
    ids[::2] = -7
    x = logits.clone().requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(x, ids, ignore_index=-7, backend=backend)
    assert bool((lp[::2] == 0).all()), "ignored rows must give logprob exactly 0"
    assert bool(torch.isfinite(ent).all())
    lp.sum().backward()
    assert bool((x.grad[::2] == 0).all()), "ignored rows get no logprob gradient"
    assert bool((x.grad[1::2] != 0).any())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_vocab_and_degenerate_rows(backend, device):
    vocab = 9_000
    logits = torch.randn(5, vocab) * 2
    logits[0, 100:] = float("-inf")  # masked vocabulary: whole blocks of -inf
    logits[1, ::3] = float("-inf")
    logits[2] = float("-inf")  # all -inf -> NaN, never 0
    logits[3, 17] = float("nan")  # NaN propagates
    ids = torch.tensor([5, 1, 3, 4, 8])
    x = logits.to(device).requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(x, ids.to(device), backend=backend)
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits, ids)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2]) and torch.isnan(lp[3]) and torch.isnan(ent[3])
    assert_close(lp[[0, 1, 4]], lp_ref[[0, 1, 4]], rtol=STAT_RTOL, scale=20.0, name="logprobs")
    assert_close(ent[[0, 1, 4]], ent_ref[[0, 1, 4]], rtol=STAT_RTOL, scale=1.0, name="entropy")
    (lp[[0, 1, 4]].sum() + ent[[0, 1, 4]].sum()).backward()
    g = x.grad.cpu()
    assert bool(torch.isfinite(g[[0, 1, 4]]).all())
    assert bool((g[0, 100:] == 0).all()) and bool((g[1, ::3] == 0).all()), "masked logits get zero gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_probabilities_sum_to_one(backend, device):
    vocab = 7
    row = torch.randn(vocab) * 4
    logits = row.expand(vocab, vocab).contiguous().to(device)  # the same row, every id once
    lp, _ = lk.token_logprobs_entropy(logits, torch.arange(vocab).to(device), backend=backend)
    assert abs(lp.double().exp().sum().item() - 1.0) < 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inplace_backward(backend, device):
    logits, ids = _inputs((3, 4), 2_500, torch.bfloat16, device)
    g_lp, g_h = torch.randn(3, 4).to(device), torch.randn(3, 4).to(device)
    a = logits.clone().requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(a * 1, ids, backend=backend)  # non-leaf logits, as from a matmul
    (expected,) = torch.autograd.grad((lp * g_lp + ent * g_h).sum(), a)

    b = logits.clone().requires_grad_(True)
    z = b * 1
    lp, ent = lk.token_logprobs_entropy(z, ids, inplace_backward=True, backend=backend)
    ptr = z.data_ptr()
    (got,) = torch.autograd.grad((lp * g_lp + ent * g_h).sum(), b)
    assert torch.equal(got, expected)
    assert torch.equal(z.detach(), expected), "the gradient is written into the logits buffer"
    assert z.data_ptr() == ptr


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_logits(backend, device):
    base = torch.randn(3, 2_000, 4).to(device)
    logits = base[..., 1]  # stride 4 along V: copied once
    sliced = torch.randn(6, 3_000).to(device)[::2, :2_500]  # row stride 3000, unit stride along V: a view
    for x in (logits, sliced):
        ids = torch.randint(0, x.shape[-1], x.shape[:-1]).to(device)
        lp, ent = lk.token_logprobs_entropy(x, ids, backend=backend)
        lp_ref, ent_ref = ref.token_logprobs_entropy(x.cpu(), ids.cpu())
        assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=20.0, name="logprobs")
        assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_int32_ids_and_one_output_forms(backend, device):
    logits, ids = _inputs((4,), 1_234, torch.float32, device)
    lp, ent = lk.token_logprobs_entropy(logits, ids.int(), backend=backend)
    assert torch.equal(lk.token_logprobs(logits, ids, backend=backend), lp)
    assert torch.equal(lk.token_entropy(logits, backend=backend), ent)
    assert lk.token_logprobs_entropy(logits, ids, return_entropy=False, backend=backend)[1] is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    logits, ids = _inputs((2,), 151_936, torch.bfloat16, device)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        lp, ent = lk.token_logprobs_entropy(x, ids, backend=backend)
        (lp.sum() + ent.sum()).backward()
        runs.append((lp, ent, x.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    logits = torch.randn(0, 5, 100).to(device).requires_grad_(True)
    ids = torch.zeros(0, 5, dtype=torch.long).to(device)
    lp, ent = lk.token_logprobs_entropy(logits, ids, backend=backend)
    assert lp.shape == (0, 5) and ent.shape == (0, 5)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input(backend, device, monkeypatch):
    # value checks (ids in range, positive temperatures) need a host sync on CUDA: debug mode only
    monkeypatch.setenv("LENKERNELS_DEBUG", "1")
    logits, ids = _inputs((4,), 100, torch.float32, device)
    with pytest.raises(ValueError, match="ids"):
        lk.token_logprobs_entropy(logits, ids[:3], backend=backend)
    with pytest.raises(TypeError, match="ids"):
        lk.token_logprobs_entropy(logits, ids.float(), backend=backend)
    with pytest.raises(TypeError, match="logits"):
        lk.token_logprobs_entropy(logits.to(torch.int32), ids, backend=backend)
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            lk.token_logprobs_entropy(logits, ids, temperature=t, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        lk.token_logprobs_entropy(
            logits, ids, temperature=torch.tensor([1.0, 0.0, 1.0, 1.0]).to(device), backend=backend
        )
    with pytest.raises(ValueError, match="temperature"):
        lk.token_logprobs_entropy(logits, ids, temperature=torch.ones(3).to(device), backend=backend)
    bad = ids.clone()
    bad[2] = 100
    with pytest.raises(ValueError, match="ids"):
        lk.token_logprobs_entropy(logits, bad, backend=backend)
    bad[2] = -1
    with pytest.raises(ValueError, match="ids"):
        lk.token_logprobs_entropy(logits, bad, backend=backend)
    with pytest.raises(ValueError, match="vocabulary"):
        lk.token_logprobs_entropy(torch.empty(4, 0).to(device), ids, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        lk.token_logprobs_entropy(logits, ids, backend="tpu")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_values_without_debug_mode_give_nan(backend, device, monkeypatch):
    """Without debug mode a GPU kernel cannot raise: an out-of-range id or a bad temperature must
    still never produce a plausible number (CPU tensors raise regardless)."""
    monkeypatch.delenv("LENKERNELS_DEBUG", raising=False)
    logits, ids = _inputs((4,), 100, torch.float32, device)
    ids[1] = 100
    temp = torch.tensor([1.0, 1.0, 0.0, -1.0]).to(device)
    if device == "cpu":
        with pytest.raises(ValueError, match="ids"):
            lk.token_logprobs_entropy(logits, ids, backend=backend)
        return
    lp, ent = lk.token_logprobs_entropy(logits, ids, temperature=temp, backend=backend)
    lp, ent = lp.cpu(), ent.cpu()
    assert torch.isnan(lp[1]) and torch.isfinite(lp[0])
    assert torch.isnan(lp[2]) and torch.isnan(ent[2]) and torch.isnan(lp[3]) and torch.isnan(ent[3])


def test_unavailable_backend_says_why():
    with pytest.raises(lk.BackendUnavailableError, match="cuda"):
        lk.token_logprobs_entropy(torch.randn(2, 10), torch.zeros(2, dtype=torch.long), backend="cuda")
    assert "token_stats" in lk.explain_backend("token_stats", "cpu")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    logits, ids = _inputs((3,), 300, torch.float32, device)
    temp = torch.full((1,), 0.9, device=device)
    torch.library.opcheck(
        torch.ops.lenkernels.token_stats.default,
        (logits.requires_grad_(True), ids, temp, -100, False, backend),
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    logits, ids = _inputs((2, 3), 500, torch.float32, device)

    def step(x, y):
        lp, ent = lk.token_logprobs_entropy(x, y, temperature=0.9, backend=backend)
        return (lp * 2).sum() - 0.1 * ent.mean()

    assert_compiled_like_eager(step, logits, ids)


# token_logprobs_entropy is the two-output form of token_stats: the same op, so the same bits.
THIN_FORM_CASES = [
    # kwargs: why each is in the grid
    {},  # the defaults
    {"temperature": "per_token", "ignore_index": 3, "return_entropy": False},  # tensor temperature, ignored rows
    {"temperature": 0.7, "inplace_backward": True},  # the gradient written over the logits
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kwargs", THIN_FORM_CASES, ids=["defaults", "temperature_ignore", "inplace"])
def test_token_logprobs_entropy_is_token_stats(backend, device, kwargs):
    logits, ids = _inputs((3, 4), 1_000, torch.bfloat16, device)
    kwargs = dict(kwargs)
    if kwargs.get("temperature") == "per_token":
        kwargs["temperature"] = (torch.rand(3, 4) + 0.5).to(device)
    return_entropy = kwargs.pop("return_entropy", True)
    g_lp, g_h = torch.randn(3, 4).to(device), torch.randn(3, 4).to(device)
    results = []
    for thin in (True, False):
        leaf = logits.clone().requires_grad_(True)
        z = leaf * 1  # non-leaf logits, as from a matmul (in-place backward refuses a leaf)
        if thin:
            lp, ent = lk.token_logprobs_entropy(z, ids, return_entropy=return_entropy, backend=backend, **kwargs)
            assert (ent is None) == (not return_entropy)
        else:
            st = lk.token_stats(z, ids, outputs=("logprob", "entropy"), backend=backend, **kwargs)
            lp, ent = st.logprob, (st.entropy if return_entropy else None)
        loss = (lp * g_lp).sum() + (0 if ent is None else (ent * g_h).sum())
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((lp.detach(), None if ent is None else ent.detach(), grad))
    for got, want in zip(*results):
        assert (got is None and want is None) or torch.equal(got, want)


def test_token_stats_inplace_backward_only_with_two_outputs():
    """The extended and sparse kernels have no in-place backward: refused, not silently ignored."""
    logits, ids = _inputs((2, 3), 50, torch.float32, "cpu")
    z = logits.requires_grad_(True) * 1
    with pytest.raises(NotImplementedError, match="inplace_backward"):
        lk.token_stats(z, ids, outputs=("logprob", "sum_p2"), inplace_backward=True)
    with pytest.raises(NotImplementedError, match="inplace_backward"):
        lk.token_stats(z, ids, outputs=("topk",), top_k=2, inplace_backward=True)
    with pytest.raises(TypeError, match="inplace_backward"):
        lk.token_stats(z, ids, inplace_backward="no")
    st = lk.token_stats(z, ids, outputs=("entropy",), inplace_backward=True)
    assert st.logprob is None and st.entropy.shape == (2, 3)
