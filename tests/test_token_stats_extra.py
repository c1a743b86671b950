"""lenkernels.token_stats: the SPEC 7 vocabulary statistics (sum_p2 / log_sum_p2, argmax /
max_logprob, mean_logit) and their gradients, on every backend, against float64 definitions."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import lenkernels as lk
from lenkernels import _backend
from lenkernels.ops import token_stats as ops
from lenkernels.reference import token_stats as ref
from tests.utils import GRAD_ATOL, GRAD_RTOL, STAT_RTOL, assert_close, assert_compiled_like_eager, backend_params

BACKENDS = backend_params("token_stats")
ALL = ("logprob", "entropy", "sum_p2", "argmax", "mean_logit")
FLOAT_FIELDS = ("logprob", "entropy", "sum_p2", "log_sum_p2", "max_logprob", "mean_logit")
FIELDS_OF = {"logprob": ("logprob",), "entropy": ("entropy",), "sum_p2": ("sum_p2", "log_sum_p2"),
             "argmax": ("max_logprob",), "mean_logit": ("mean_logit",)}  # fmt: skip
# every non-empty combination of outputs
COMBOS = [c for r in range(1, len(ALL) + 1) for c in itertools.combinations(ALL, r)]


def _inputs(lead, vocab, dtype, device, scale=3.0, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = (torch.randn(*lead, vocab, generator=gen) * scale).to(dtype).to(device)
    ids = torch.randint(0, vocab, lead, generator=gen).to(device)
    return logits, ids


def _definitions(x, ids, temp, ignore_index=-100):
    """float64 outputs straight from SPEC 7's definitions, differentiable (autograd, not the closed forms)."""
    t = temp.double().cpu().expand(ids.shape).unsqueeze(-1) if torch.is_tensor(temp) else temp
    z = x.double() / t
    lp, ent = ref.token_logprobs_entropy(
        x.double(), ids.cpu(), temp.double().cpu().expand(ids.shape) if torch.is_tensor(temp) else temp, ignore_index
    )
    lse = torch.logsumexp(z, -1)
    log_sum_p2 = torch.logsumexp(2 * z, -1) - 2 * lse
    top = torch.argmax(z.detach(), -1)
    max_logprob = z.gather(-1, top.unsqueeze(-1)).squeeze(-1) - lse
    mean_logit = torch.where(torch.isfinite(z), z, torch.zeros_like(z)).sum(-1) / z.shape[-1]
    return {"logprob": lp, "entropy": ent, "sum_p2": torch.exp(log_sum_p2), "log_sum_p2": log_sum_p2,
            "argmax": top, "max_logprob": max_logprob, "mean_logit": mean_logit}  # fmt: skip


def _onehots(z, ids):
    """1 at each row's target (if not ignored) and at its argmax: the one-hot terms of the gradient."""
    hot = torch.zeros_like(z).scatter_(-1, torch.argmax(z, -1, keepdim=True), 1.0)
    keep = ids.cpu() >= 0
    return hot.scatter_add_(-1, torch.where(keep, ids.cpu(), 0).unsqueeze(-1), keep.unsqueeze(-1).to(z.dtype))


def _scale(logits, temp):
    """|z| magnitudes an fp32 reduction's error grows with (per row)."""
    t = temp.double().cpu().expand(logits.shape[:-1]).unsqueeze(-1) if torch.is_tensor(temp) else temp
    z = logits.double().cpu() / t
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return zf.abs().amax(-1) + 1.0, zf.abs().mean(-1)


def _check_forward(out, logits, ids, temp, wanted=ALL, ignore_index=-100):
    expected = _definitions(logits.cpu(), ids.cpu(), temp, ignore_index)
    big, mean_abs = _scale(logits, temp)
    for name in wanted:
        for field in FIELDS_OF.get(name, ()) + (("argmax",) if name == "argmax" else ()):
            got = getattr(out, field)
            assert got is not None, field
            if field == "argmax":
                assert got.dtype == torch.int64
                assert torch.equal(got.cpu(), expected["argmax"]), field
                continue
            assert got.dtype == torch.float32 and got.shape == ids.shape, field
            scale = mean_abs if field == "mean_logit" else big
            assert_close(got, expected[field], rtol=STAT_RTOL, scale=scale, name=field)
    for field in TokenStatsFields.difference(*[FIELDS_OF[n] for n in wanted], ["argmax"] if "argmax" in wanted else []):
        assert getattr(out, field) is None, field


TokenStatsFields = set(lk.TokenStats._fields)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,vocab", [((2, 3), 300), ((5,), 7), ((1,), 40_000), ((3,), 4_099)])
def test_forward_every_output(backend, device, dtype, lead, vocab):
    logits, ids = _inputs(lead, vocab, dtype, device)
    temp = torch.rand(lead).add(0.5).to(device)  # per-token temperature
    out = lk.token_stats(logits, ids, temperature=temp, outputs=ALL, backend=backend)
    _check_forward(out, logits, ids, temp)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("outputs", COMBOS, ids=lambda c: "+".join(c))
def test_gradient_every_combination(backend, device, outputs):
    """Random cotangents on every float output asked for, against float64 autograd of the definitions."""
    lead, vocab, dtype, temp = (2, 3), 300, torch.float32, 0.8
    logits, ids = _inputs(lead, vocab, dtype, device)
    ids.view(-1)[1] = -100
    logits[0, 2, ::5] = float("-inf")  # a masked vocabulary (the target outside it)
    ids[0, 2] = 1
    x = logits.clone().requires_grad_(True)
    out = lk.token_stats(x, ids, temperature=temp, outputs=outputs, backend=backend)
    _check_forward(out, logits.detach(), ids, temp, outputs)
    fields = [f for n in outputs for f in FIELDS_OF[n]]
    gs = {f: torch.randn(lead) for f in fields}
    loss = sum((getattr(out, f) * gs[f].to(device)).sum() for f in fields)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype and grad.shape == logits.shape

    x64 = logits.detach().cpu().double().requires_grad_(True)
    defs = _definitions(x64, ids.cpu(), temp)
    loss64 = sum((torch.nan_to_num(defs[f]) * gs[f].double()).sum() for f in fields)
    (grad64,) = torch.autograd.grad(loss64, x64)
    grad64 = torch.where(torch.isneginf(x64), torch.zeros_like(grad64), grad64)
    # the magnitude of the summed terms: p-scaled terms, |z| for the entropy, one-hots, 1/V
    z = x64.detach() / temp
    p = torch.softmax(z, -1)
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    g_abs = sum(gs[f].double().abs() for f in fields).unsqueeze(-1)
    scale = g_abs * (p * (zf.abs() + 4) + 2 * torch.softmax(2 * z, -1) + 1.0 / vocab + _onehots(z, ids)) / temp
    assert_close(grad, grad64, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_bf16_packed(backend, device):
    logits, ids = _inputs((6,), 1_000, torch.bfloat16, device)
    temp = torch.rand(6).add(0.5).to(device)
    x = logits.clone().requires_grad_(True)
    out = lk.token_stats(x, ids, temperature=temp, outputs=ALL, backend=backend)
    gs = {f: torch.randn(6) for f in FLOAT_FIELDS}
    (grad,) = torch.autograd.grad(sum((getattr(out, f) * gs[f].to(device)).sum() for f in FLOAT_FIELDS), x)
    x64 = logits.detach().cpu().double().requires_grad_(True)
    defs = _definitions(x64, ids.cpu(), temp)
    (grad64,) = torch.autograd.grad(sum((defs[f] * gs[f].double()).sum() for f in FLOAT_FIELDS), x64)
    z = x64.detach() / temp.double().cpu().unsqueeze(-1)
    g_abs = sum(gs[f].double().abs() for f in FLOAT_FIELDS).unsqueeze(-1)
    scale = (
        g_abs
        * (torch.softmax(z, -1) * (z.abs() + 4) + 2 * torch.softmax(2 * z, -1) + 1e-3 + _onehots(z, ids))
        / temp.cpu().double().unsqueeze(-1)
    )
    assert_close(
        grad, grad64, rtol=GRAD_RTOL[torch.bfloat16], atol=GRAD_ATOL[torch.bfloat16], scale=scale, name="dlogits"
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_argmax_ties_masks_and_degenerate_rows(backend, device):
    vocab = 50
    logits = torch.randn(6, vocab)
    logits[0, [3, 17, 40]] = 9.0  # a tie: the lowest id wins
    logits[1] = 2.0  # every entry tied
    logits[2, :10] = float("-inf")  # masked vocabulary, max after the mask
    logits[2, 30] = logits[2, 31] = 7.0
    logits[3] = float("-inf")  # all -inf: NaN statistics, argmax 0
    logits[4, ::2] = float("-inf")
    logits[5, 49] = 100.0  # one dominant entry: sum_p2 -> 1 without cancellation
    ids = torch.tensor([3, 0, -100, 5, 1, 49])
    top4 = int(torch.argmax(logits[4]))
    logits, ids = logits.to(device), ids.to(device)
    out = lk.token_stats(logits, ids, outputs=ALL, backend=backend)
    assert out.argmax.cpu().tolist() == [3, 0, 30, 0, top4, 49]
    assert out.logprob[2].item() == 0.0  # ignored row: logprob 0, other statistics defined
    assert all(torch.isfinite(getattr(out, f)[2]) for f in FLOAT_FIELDS)
    assert all(torch.isnan(getattr(out, f)[3]) for f in FLOAT_FIELDS)
    assert abs(out.sum_p2[1].item() - 1 / vocab) < 1e-7
    assert out.max_logprob[1].item() == pytest.approx(-torch.log(torch.tensor(float(vocab))).item(), rel=1e-6)
    ok = torch.tensor([0, 1, 2, 4, 5])
    sub = lk.TokenStats(*(None if v is None else v.cpu()[ok] for v in out))
    _check_forward(sub, logits.cpu()[ok], ids.cpu()[ok], 1.0)
    assert out.log_sum_p2[5].item() > -1e-30 - 1e-6  # log(1 - tiny): no cancellation


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_padded_and_packed_bitwise(backend, device):
    """A row's statistics do not depend on the layout or the batch (fixed chunks)."""
    logits, ids = _inputs((2, 3), 5_000, torch.float32, device)
    padded = lk.token_stats(logits, ids, temperature=0.7, outputs=ALL, backend=backend)
    packed = lk.token_stats(logits.reshape(6, -1), ids.reshape(6), temperature=0.7, outputs=ALL, backend=backend)
    single = lk.token_stats(logits[1, 2:], ids[1, 2:], temperature=0.7, outputs=ALL, backend=backend)
    for f in lk.TokenStats._fields:
        if getattr(padded, f) is None:  # the sparse fields (test_token_stats_sparse.py)
            continue
        assert torch.equal(getattr(padded, f).reshape(6), getattr(packed, f)), f
        assert torch.equal(getattr(padded, f)[1, 2:], getattr(single, f)), f


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_default_outputs_are_token_logprobs_entropy(backend, device):
    """outputs=("logprob", "entropy") runs the two-output path; the extended kernels give the same bits."""
    logits, ids = _inputs((4,), 3_000, torch.bfloat16, device)
    ids[1] = -100
    lp, ent = lk.token_logprobs_entropy(logits, ids, temperature=0.9, backend=backend)
    plain = lk.token_stats(logits, ids, temperature=0.9, backend=backend)
    assert torch.equal(plain.logprob, lp) and torch.equal(plain.entropy, ent) and plain.sum_p2 is None
    extra = lk.token_stats(logits, ids, temperature=0.9, outputs=ALL, backend=backend)
    assert torch.equal(extra.logprob, lp) and torch.equal(extra.entropy, ent)
    only = lk.token_stats(logits, ids, outputs=("entropy",), backend=backend)
    assert only.logprob is None and only.entropy is not None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    x = torch.randn(0, 3, 7, device=device, requires_grad=True)
    out = lk.token_stats(x, torch.zeros(0, 3, dtype=torch.long, device=device), outputs=ALL, backend=backend)
    assert out.argmax.shape == (0, 3) and out.sum_p2.shape == (0, 3)
    (out.sum_p2.sum() + out.mean_logit.sum()).backward()
    assert x.grad.shape == x.shape


def test_bad_arguments():
    x, ids = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown"):
        lk.token_stats(x, ids, outputs=("logprob", "nope"))
    with pytest.raises(ValueError, match="at least one"):
        lk.token_stats(x, ids, outputs=())
    with pytest.raises(TypeError, match="outputs"):
        lk.token_stats(x, ids, outputs="sum_p2")


def test_every_compiled_backend_has_the_extra_launchers():
    """cuda included (csrc/cuda/token_stats_extra.h; checked without a GPU by
    tests/test_cuda_token_stats_extra.py), and it is the default on CUDA tensors."""
    for name in ("triton", "cuda", "cpu", "reference"):
        if name == "triton" and importlib.util.find_spec("triton") is None:
            continue
        kernels = ops._extra_kernels(name)
        assert callable(kernels.token_stats_extra_fwd) and callable(kernels.token_stats_extra_bwd), name
    assert "cuda" in _backend.implemented_backends(ops.EXTRA_FAMILY)
    assert _backend._FAMILY_PREFERENCE[(ops.EXTRA_FAMILY, "cuda")] == ("cuda", "triton")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    logits, ids = _inputs((3,), 300, torch.float32, device)
    temp = torch.full((1,), 0.9, device=device)
    torch.library.opcheck(
        torch.ops.lenkernels.token_stats_extra.default, (logits.requires_grad_(True), ids, temp, -100, backend)
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    logits, ids = _inputs((2, 3), 500, torch.float32, device)

    def step(x, y):
        s = lk.token_stats(x, y, temperature=0.9, outputs=ALL, backend=backend)
        return s.logprob.sum() - 0.1 * s.entropy.mean() + s.sum_p2.sum() + s.max_logprob.sum() + s.mean_logit.sum()

    assert_compiled_like_eager(step, logits, ids)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_logits_no_cancellation(backend, device):
    """|z| = 1e4: log_sum_p2 (log S2 - 2 log S) and max_logprob (-log S) keep fp32's relative
    precision; lse2 - 2 lse would cancel numbers of 2e4 (ulp 2^-9 in fp32)."""
    logits = (torch.randn(4, 2_000) * 2 + 1e4).to(device)
    ids = torch.randint(0, 2_000, (4,)).to(device)
    out = lk.token_stats(logits, ids, outputs=ALL, backend=backend)
    expected = _definitions(logits.cpu(), ids.cpu(), 1.0)
    for f in ("log_sum_p2", "sum_p2", "max_logprob", "entropy"):
        assert_close(getattr(out, f), expected[f], rtol=STAT_RTOL, scale=1.0, name=f)
    assert_close(out.mean_logit, expected["mean_logit"], rtol=STAT_RTOL, name="mean_logit")
