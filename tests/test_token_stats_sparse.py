"""lenkernels.token_stats: the sparse SPEC 7 statistics (top-k, gathered, kept set, sampler replay)
and their gradients, on every backend, against float64 definitions (lenkernels/reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lenkernels as lk
from lenkernels import _checks
from lenkernels.ops import token_stats_select as select
from lenkernels.ops import token_stats_sparse as sparse
from lenkernels.reference import token_stats as ref
from tests.utils import GRAD_ATOL, GRAD_RTOL, STAT_RTOL, assert_close, assert_compiled_like_eager, backend_params

BACKENDS = backend_params("token_stats")
EXTRA_BACKENDS = backend_params("token_stats_extra")
SPARSE_FIELDS = ("topk_logprobs", "gathered_logprobs", "kept_logprob", "kept_entropy", "kept_log_mass")
# sampler settings: each step alone, the usual combinations, a set of one, and no truncation at all
SAMPLINGS = [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=20, top_p=0.9), dict(top_k=1),
             dict(top_k=10, top_p=0.7, min_p=0.05), dict(top_p=0.95, min_p=0.02),
             dict(top_p=1.0, top_k=-1)]  # fmt: skip


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(lead, vocab, dtype, seed, scale=3.0, ties=False):
    g = _gen(seed)
    x = torch.randn(*lead, vocab, generator=g) * scale
    if ties:  # few distinct values: ties everywhere, also at the k-th place
        x = torch.randint(0, 6, (*lead, vocab), generator=g).float()
    return x.to(dtype)


def _sample(mask, seed):
    """One id per row drawn among the row's kept set (a sampled token is always kept)."""
    w = mask.reshape(-1, mask.shape[-1]).double()
    return torch.multinomial(w, 1, generator=_gen(seed)).reshape(mask.shape[:-1])


def _kept_ids(ids, vocab, width, seed, pad=True):
    """Random kept sets holding each row's id, with -1 padding and a repeated id."""
    g = _gen(seed)
    k = torch.randint(0, vocab, (*ids.shape, width), generator=g)
    k[..., 0] = torch.where(ids >= 0, ids, 0)
    if width > 2:
        k[..., 1] = k[..., 0]  # a repeat counts once
    if pad and width > 3:
        k[..., -1] = -1
    return k[..., torch.randperm(width, generator=g)]


def _temp(lead, seed):
    return torch.rand(lead, generator=_gen(seed)).add(0.5)  # per-token temperature


def _definitions(x, ids, temp, *, top_k=0, gather_ids=None, kept_mask=None, ignore_index=-100):
    """float64 fields from the reference definitions, differentiable in ``x`` (autograd)."""
    out = {}
    lp, ent = ref.token_logprobs_entropy(x, ids, temp, ignore_index)
    out.update(logprob=lp, entropy=ent)
    if top_k:
        out["topk_ids"], out["topk_logprobs"] = ref.topk(x, temp, top_k)
    if gather_ids is not None:
        out["gathered_logprobs"] = ref.gathered_logprobs(x, temp, gather_ids)
    if kept_mask is not None:
        out["kept_logprob"], out["kept_entropy"], out["kept_log_mass"] = ref.kept_stats(
            x, ids, temp, kept_mask, ignore_index
        )
    return out


def _z_scale(x, temp):
    t = temp.double().unsqueeze(-1) if torch.is_tensor(temp) else temp
    z = x.double() / t
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return z, zf.abs().amax(-1) + 1.0


def _check_values(out, defs, x, temp, fields):
    _, big = _z_scale(x, temp)
    for f in fields:
        got, exp = getattr(out, f), defs[f]
        assert got is not None, f
        if f == "topk_ids":
            assert got.dtype == torch.int64 and torch.equal(got.cpu(), exp), f
            continue
        assert got.dtype == torch.float32 and got.shape == exp.shape, f
        scale = big.unsqueeze(-1) if got.dim() > big.dim() else big
        assert_close(got, exp, rtol=STAT_RTOL, scale=scale, name=f)


def _check_grad(out, defs, x, x64, fields, temp, sparse_ids, dtype, seed):
    """Random cotangents on every float field asked for (zero where the value is not finite), the
    gradient against float64 autograd of the definitions; the error scale is the |terms| summed:
    p (|z| + 4) over the row, and the one-hot terms at the sparse ids (and the anchor)."""
    g = _gen(seed)
    gs = {}
    for f in fields:
        v = defs[f].detach()
        gs[f] = torch.where(torch.isfinite(v), torch.randn(v.shape, generator=g, dtype=torch.float64), 0.0)
    loss = sum((getattr(out, f).double() * gs[f].to(getattr(out, f).device)).sum() for f in fields)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    loss64 = sum((torch.where(gs[f] != 0, defs[f], 0.0) * gs[f]).sum() for f in fields)
    (grad64,) = torch.autograd.grad(loss64, x64)
    z, _ = _z_scale(x64.detach(), temp)
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    p = torch.softmax(z, -1)
    hot = torch.zeros_like(z)
    hot.scatter_(-1, sparse_ids.clamp_min(0), 1.0)
    g_abs = sum(v.abs().reshape(*v.shape[: z.dim() - 1], -1).sum(-1) for v in gs.values()).unsqueeze(-1)
    t = temp.double().unsqueeze(-1) if torch.is_tensor(temp) else temp
    scale = g_abs * (p + hot) * (zf.abs() + 4) / t
    assert_close(grad, grad64, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# (2, 3): padded layout; (7,): packed with ignored rows; 1_003: a vocabulary past one kernel chunk... not a power of 2
@pytest.mark.parametrize("lead,vocab", [((2, 3), 300), ((7,), 1_003)])
def test_values_and_gradients(backend, device, dtype, lead, vocab):
    seed = 11 + vocab
    logits = _logits(lead, vocab, dtype, seed)
    logits.reshape(-1, vocab)[1, ::3] = float("-inf")  # a masked vocabulary
    ids = torch.randint(0, vocab, lead, generator=_gen(seed + 1))
    ids.view(-1)[-1] = -100  # an ignored row
    ids.view(-1)[1] = 2  # a target outside the masked entries of row 1 (3 is masked, 2 is not)
    temp = _temp(lead, seed)
    gather = torch.randint(-1, vocab, (*lead, 6), generator=_gen(seed + 2))
    kept = _kept_ids(ids, vocab, 8, seed + 3)
    kept.reshape(-1, 8)[1] = torch.where(kept.reshape(-1, 8)[1] % 3 == 0, 2, kept.reshape(-1, 8)[1])
    top_k = 7
    x = logits.clone().to(device).requires_grad_(True)
    outputs = ("logprob", "entropy", "topk", "gathered", "kept")
    out = lk.token_stats(x, ids.to(device), temperature=temp.to(device), outputs=outputs, top_k=top_k,
                         gather_ids=gather.to(device), kept_ids=kept.to(device), backend=backend)  # fmt: skip
    x64 = logits.double().requires_grad_(True)
    mask = ref.kept_mask_from_ids(kept, vocab)
    defs = _definitions(x64, ids, temp, top_k=top_k, gather_ids=gather, kept_mask=mask)
    fields = ("logprob", "entropy", "topk_ids", *SPARSE_FIELDS)
    _check_values(out, defs, logits, temp, fields)
    assert bool((out.logprob.view(-1)[-1] == 0) & (out.kept_logprob.view(-1)[-1] == 0))
    assert bool((out.gathered_logprobs.cpu()[gather == -1] == 0).all())
    assert out.argmax is None and out.sum_p2 is None
    sparse_ids = torch.cat([ids.clamp_min(0).unsqueeze(-1), defs["topk_ids"], gather, kept,
                            torch.zeros_like(ids).unsqueeze(-1)], -1)  # fmt: skip
    float_fields = [f for f in fields if f != "topk_ids"]
    _check_grad(out, defs, x, x64, float_fields, temp, sparse_ids, dtype, seed)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sampler_replay(backend, device, sampling):
    """The kept set of vLLM's sampler, against a float64 port of its masking, and the kept
    statistics at sampled ids (values and gradients)."""
    lead, vocab, dtype = (3, 4), 500, torch.float32
    seed = 5
    logits = _logits(lead, vocab, dtype, seed, scale=2.0)
    logits[0, 1, :200] = float("-inf")  # masked vocabulary: zero-mass ids are never kept
    logits[1, 2] = torch.randint(0, 3, (vocab,), generator=_gen(seed)).float()  # many ties
    temp = _temp(lead, seed)
    mask = ref.sampler_kept_mask(logits, temp, **sampling)
    kept = torch.ops.lenkernels.sampler_kept_ids(logits.to(device), temp.reshape(-1).to(device),
                                                 *sparse.sampling_args(sampling))  # fmt: skip
    assert torch.equal(ref.kept_mask_from_ids(kept.cpu(), vocab), mask)
    if sampling.get("top_k") == 1:
        assert bool((mask.sum(-1)[~torch.isclose(logits, logits.amax(-1, keepdim=True)).sum(-1).gt(1)] == 1).all())
    ids = _sample(mask, seed)
    ids[2, 3] = -100
    x = logits.clone().to(device).requires_grad_(True)
    out = lk.token_stats(x, ids.to(device), temperature=temp.to(device), outputs=("kept", "logprob"),
                         sampling=sampling, backend=backend)  # fmt: skip
    x64 = logits.double().requires_grad_(True)
    defs = _definitions(x64, ids, temp, kept_mask=mask)
    fields = ("logprob", "kept_logprob", "kept_entropy", "kept_log_mass")
    _check_values(out, defs, logits, temp, fields)
    if not (sampling.get("top_p", 1.0) < 1 or sampling.get("min_p", 0) > 0 or sampling.get("top_k", 0) > 0):
        assert torch.equal(out.kept_logprob, out.logprob) and bool((out.kept_log_mass == 0).all())
    sparse_ids = torch.cat([ids.clamp_min(0).unsqueeze(-1), kept.cpu(), torch.zeros_like(ids).unsqueeze(-1)], -1)
    _check_grad(out, defs, x, x64, fields, temp, sparse_ids, dtype, seed)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 8, 40, 64])
def test_topk_ties_bf16(backend, device, k):
    """bf16 logits of a few distinct values: ties at the k-th place in most rows; the ids must be the
    lowest ones, in descending order of z then ascending id (exactly the stable sort)."""
    vocab = 64
    logits = _logits((9,), vocab, torch.bfloat16, 3, ties=True)
    logits[0] = 1.0  # every entry tied
    logits[1, 5:] = float("-inf")  # fewer finite entries than k
    logits[2, 10] = 9.0
    ids = torch.zeros(9, dtype=torch.long)
    out = lk.token_stats(
        logits.to(device), ids.to(device), temperature=0.7, outputs=("topk",), top_k=k, backend=backend
    )
    exp_ids, exp_lp = ref.topk(logits, 0.7, k)
    assert torch.equal(out.topk_ids.cpu(), exp_ids)
    assert torch.equal(out.topk_ids.cpu()[0], torch.arange(k))
    assert_close(out.topk_logprobs, exp_lp, rtol=STAT_RTOL, scale=10.0, name="topk_logprobs")
    assert bool((out.topk_logprobs[:-1, :-1] >= out.topk_logprobs[:-1, 1:]).all())


@pytest.mark.parametrize("sampling", [dict(top_p=0.9), dict(top_p=0.999, min_p=0.01), dict(min_p=0.2),
                                      dict(top_k=3, top_p=0.5003), dict(top_k=700)], ids=str)  # fmt: skip
# (p * 3000 not an integer: in the row of 3000 equal values a prefix of mass exactly p would be a
# rounding boundary, where vLLM's fp32 cumulative sum, the float64 port and the op may each differ)
def test_sampler_sets_wider_than_the_first_candidates(sampling):
    """Sets of hundreds of ids (top-p of a flat distribution: the candidates grow 256 -> 1024 -> V)
    and bf16 ties cut by the candidate list or straddling the k-th place, against the float64 port."""
    vocab = 3_000
    x = _logits((5,), vocab, torch.float32, 21, scale=0.3)
    x[1] = torch.randint(0, 4, (vocab,), generator=_gen(2)).float()  # ties everywhere
    x[2, 100:] = float("-inf")
    x[3] = 1.0  # one value: every id tied
    x = x.to(torch.bfloat16)
    temp = _temp((5,), 2)
    kept = select.sampler_kept_rows(x, temp, *sparse.sampling_args(sampling))
    mask = ref.sampler_kept_mask(x, temp, **sampling)
    assert torch.equal(ref.kept_mask_from_ids(kept, vocab), mask)
    assert int(mask.sum(-1).max()) > 256


def test_topk_rows_ties_at_scale():
    """The exact selection itself on a wide bf16 vocabulary: ties straddle the k-th place."""
    x = torch.randint(0, 40, (6, 151_936), generator=_gen(0)).to(torch.bfloat16)
    for k in (1, 20, 1000):
        got = select.topk_rows(x, k)
        assert torch.equal(got, torch.sort(x.float(), dim=1, descending=True, stable=True).indices[:, :k]), k


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kept_set_of_one_and_padding(backend, device):
    """K = {y} among -1 padding: kept_logprob = 0, kept_entropy = 0, kept_log_mass = logprob, and no
    gradient from the first two (also on the ignored row, whose kept set is {0})."""
    vocab = 40
    logits = _logits((4,), vocab, torch.float32, 9)
    ids = torch.tensor([3, 7, 0, -100])
    kept = torch.full((4, 5), -1)
    kept[:, 2] = ids.clamp_min(0)
    x = logits.clone().to(device).requires_grad_(True)
    out = lk.token_stats(x, ids.to(device), outputs=("logprob", "kept"), kept_ids=kept.to(device), backend=backend)
    assert bool((out.kept_logprob == 0).all()) and bool((out.kept_entropy == 0).all())
    assert_close(out.kept_log_mass[:3], out.logprob[:3], rtol=STAT_RTOL, scale=10.0, name="kept_log_mass")
    (grad,) = torch.autograd.grad((out.kept_logprob + out.kept_entropy).sum(), x)
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignored_rows_and_all_inf(backend, device):
    """Ignored rows: logprob-type outputs exactly 0 without gradient, the others computed; a row of
    all -inf gives NaN in every float field."""
    vocab = 30
    logits = _logits((3,), vocab, torch.float32, 4)
    logits[2] = float("-inf")
    ids = torch.tensor([-100, 4, 5])
    gather = torch.tensor([[1, 2], [3, -1], [0, 1]])
    x = logits.clone().to(device).requires_grad_(True)
    out = lk.token_stats(x, ids.to(device), outputs=("logprob", "gathered", "topk", "kept"), top_k=2,
                         gather_ids=gather.to(device), kept_ids=ids.clamp_min(0).unsqueeze(-1).to(device),
                         backend=backend)  # fmt: skip
    assert out.logprob[0].item() == 0 and out.kept_logprob[0].item() == 0
    assert bool(torch.isfinite(out.gathered_logprobs[0]).all()) and bool(torch.isfinite(out.topk_logprobs[0]).all())
    for f in ("logprob", "kept_logprob", "kept_entropy", "kept_log_mass"):
        assert torch.isnan(getattr(out, f)[2]), f
    assert bool(torch.isnan(out.gathered_logprobs[2]).all()) and bool(torch.isnan(out.topk_logprobs[2]).all())
    (grad,) = torch.autograd.grad((out.logprob[:1] + out.kept_logprob[:1]).sum(), x)
    assert bool((grad[:2] == 0).all())  # (the all -inf row's gradient is NaN, as the dense kernels' is)


@pytest.mark.parametrize("backend,device", EXTRA_BACKENDS)
def test_with_extended_outputs(backend, device):
    """Sparse and extended outputs together: one dense kernel, every field as asked for alone."""
    vocab = 257
    logits = _logits((2, 3), vocab, torch.bfloat16, 8).to(device)
    ids = torch.randint(0, vocab, (2, 3), generator=_gen(8)).to(device)
    gather = torch.randint(-1, vocab, (2, 3, 4), generator=_gen(9)).to(device)
    both = lk.token_stats(logits, ids, outputs=("logprob", "sum_p2", "argmax", "gathered", "topk"), top_k=3,
                          gather_ids=gather, temperature=0.8, backend=backend)  # fmt: skip
    dense = lk.token_stats(logits, ids, outputs=("logprob", "sum_p2", "argmax"), temperature=0.8, backend=backend)
    alone = lk.token_stats(logits, ids, outputs=("gathered", "topk"), top_k=3, gather_ids=gather, temperature=0.8,
                           backend=backend)  # fmt: skip
    for f in ("logprob", "sum_p2", "log_sum_p2", "argmax", "max_logprob"):
        assert torch.equal(getattr(both, f), getattr(dense, f)), f
    for f in ("gathered_logprobs", "topk_ids", "topk_logprobs"):
        assert torch.equal(getattr(both, f), getattr(alone, f)), f
    assert torch.equal(both.topk_ids[..., 0], both.argmax)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_outside_kept_set(backend, device, monkeypatch):
    logits = _logits((3,), 20, torch.float32, 1).to(device)
    ids = torch.tensor([1, 2, 3], device=device)
    kept = torch.tensor([[1, 5], [4, 5], [3, -1]], device=device)
    with pytest.raises(ValueError, match="ids holds 2 at flat index 1, outside its kept set"):
        lk.token_stats(logits, ids, outputs=("kept",), kept_ids=kept, backend=backend)
    with pytest.raises(ValueError, match="outside its kept set"):
        lk.token_stats(logits, ids, outputs=("kept",), sampling=dict(top_k=1), backend=backend)
    monkeypatch.setattr(_checks, "value_checks", lambda device: False)
    out = lk.token_stats(logits, ids, outputs=("kept",), kept_ids=kept, backend=backend)
    assert torch.isnan(out.kept_logprob[1]) and torch.isnan(out.kept_entropy[1]) and torch.isnan(out.kept_log_mass[1])
    assert bool(torch.isfinite(out.kept_logprob[[0, 2]]).all())
    bad = lk.token_stats(logits, ids, outputs=("gathered",), gather_ids=torch.tensor([[0], [99], [-1]], device=device),
                         backend=backend)  # fmt: skip
    assert torch.isnan(bad.gathered_logprobs[1, 0]) and bad.gathered_logprobs[2, 0].item() == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    x = torch.randn(0, 3, 7, device=device, requires_grad=True)
    ids = torch.zeros(0, 3, dtype=torch.long, device=device)
    out = lk.token_stats(x, ids, outputs=("topk", "gathered", "kept"), top_k=2, backend=backend,
                         gather_ids=torch.zeros(0, 3, 4, dtype=torch.long, device=device),
                         kept_ids=torch.zeros(0, 3, 2, dtype=torch.long, device=device))  # fmt: skip
    assert (
        out.topk_ids.shape == (0, 3, 2)
        and out.gathered_logprobs.shape == (0, 3, 4)
        and out.kept_entropy.shape == (0, 3)
    )
    (out.topk_logprobs.sum() + out.kept_log_mass.sum()).backward()
    assert x.grad.shape == x.shape
    out = lk.token_stats(x, ids, outputs=("kept",), sampling=dict(top_p=0.5), backend=backend)
    assert out.kept_logprob.shape == (0, 3)


def test_bad_arguments():
    x, ids = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    g = torch.zeros(2, 3, dtype=torch.long)
    cases = [
        (ValueError, "top_k", dict(outputs=("topk",), top_k=-1)),
        (ValueError, "top_k", dict(outputs=("topk",), top_k=6)),
        (TypeError, "top_k", dict(outputs=("topk",), top_k=2.0)),
        (ValueError, "top_k", dict(outputs=("topk",))),
        (ValueError, "topk", dict(outputs=("logprob",), top_k=2)),
        (ValueError, "gather_ids", dict(outputs=("gathered",))),
        (ValueError, "gathered", dict(outputs=("logprob",), gather_ids=g)),
        (TypeError, "gather_ids", dict(outputs=("gathered",), gather_ids=g.float())),
        (TypeError, "gather_ids", dict(outputs=("gathered",), gather_ids=g.tolist())),
        (ValueError, "gather_ids", dict(outputs=("gathered",), gather_ids=g[0])),
        (ValueError, "gather_ids", dict(outputs=("gathered",), gather_ids=g.unsqueeze(0))),
        (ValueError, "gather_ids", dict(outputs=("gathered",), gather_ids=g + 5)),
        (ValueError, "gather_ids", dict(outputs=("gathered",), gather_ids=g - 2)),
        (ValueError, "gather_ids", dict(outputs=("gathered",), gather_ids=g.to("meta"))),
        (ValueError, "kept_ids", dict(outputs=("kept",), kept_ids=g[:, :0])),
        (ValueError, "kept_ids", dict(outputs=("kept",), kept_ids=g + 7)),
        (ValueError, "not both", dict(outputs=("kept",), kept_ids=g, sampling=dict(top_k=2))),
        (ValueError, "kept", dict(outputs=("kept",))),
        (ValueError, "kept", dict(outputs=("logprob",), kept_ids=g)),
        (ValueError, "kept", dict(outputs=("logprob",), sampling=dict(top_p=0.5))),
        (TypeError, "sampling", dict(outputs=("kept",), sampling=[("top_k", 2)])),
        (ValueError, "sampling", dict(outputs=("kept",), sampling=dict(top_n=2))),
        (ValueError, "top_k", dict(outputs=("kept",), sampling=dict(top_k=-2))),
        (ValueError, "top_k", dict(outputs=("kept",), sampling=dict(top_k=1.5))),
        (ValueError, "top_p", dict(outputs=("kept",), sampling=dict(top_p=0.0))),
        (ValueError, "top_p", dict(outputs=("kept",), sampling=dict(top_p=1.5))),
        (ValueError, "top_p", dict(outputs=("kept",), sampling=dict(top_p=float("nan")))),
        (TypeError, "top_p", dict(outputs=("kept",), sampling=dict(top_p="0.9"))),
        (ValueError, "min_p", dict(outputs=("kept",), sampling=dict(min_p=-0.1))),
        (ValueError, "min_p", dict(outputs=("kept",), sampling=dict(min_p=2.0))),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            lk.token_stats(x, ids, **kw)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    logits = _logits((3,), 300, torch.float32, 2).to(device).requires_grad_(True)
    ids = torch.tensor([1, 2, 3], device=device)
    sparse_ids = torch.tensor([[1, 5, 5], [0, 299, 7], [3, 3, 1]], device=device)
    temp = torch.tensor([0.9, 1.1, 0.7], device=device)
    for extra in (False, True) if backend != "cuda" else (False,):
        torch.library.opcheck(
            torch.ops.lenkernels.token_stats_sparse.default, (logits, ids, temp, sparse_ids, extra, backend)
        )
    torch.library.opcheck(torch.ops.lenkernels.topk_ids.default, (logits.detach(), 4))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    logits = _logits((2, 3), 200, torch.float32, 6).to(device)
    ids = logits.argmax(-1)
    gather = torch.randint(-1, 200, (2, 3, 4), generator=_gen(1)).to(device)

    def step(x, y):
        s = lk.token_stats(x, y, temperature=0.9, outputs=("logprob", "topk", "gathered", "kept"), top_k=4,
                           gather_ids=gather, kept_ids=torch.cat([y.unsqueeze(-1), gather], -1),
                           backend=backend)  # fmt: skip
        return s.logprob.sum() + s.topk_logprobs.sum() + s.gathered_logprobs.sum() + s.kept_entropy.sum()

    assert_compiled_like_eager(step, logits, ids)

    def replay(x, y):
        s = lk.token_stats(
            x, y, temperature=0.9, outputs=("kept",), sampling=dict(top_k=10, top_p=0.9), backend=backend
        )
        return s.kept_logprob.sum() + s.kept_entropy.sum() - s.kept_log_mass.sum()

    assert_compiled_like_eager(replay, logits, ids)


@pytest.mark.parametrize("backend,device", EXTRA_BACKENDS)
def test_linear_token_stats_passes_them_through(backend, device):
    """The chunked path of linear_token_stats: the same fields as token_stats of the logits."""
    g = _gen(3)
    hidden = torch.randn(2, 5, 8, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(50, 8, generator=g).to(device).requires_grad_(True)
    logits = F.linear(hidden, weight)
    ids = logits.detach().argmax(-1)
    ids[0, 1] = -100
    gather = torch.randint(-1, 50, (2, 5, 3), generator=g).to(device)
    kw = dict(outputs=("logprob", "sum_p2", "topk", "gathered", "kept"), top_k=3, gather_ids=gather,
              sampling=dict(top_k=5, top_p=0.8), temperature=0.9, backend=backend)  # fmt: skip
    lin = lk.linear_token_stats(hidden, weight, ids, chunk_size=3 * 50, **kw)
    full = lk.token_stats(logits, ids, **kw)
    loss = 0
    for f in lk.TokenStats._fields:
        a, b = getattr(lin, f), getattr(full, f)
        assert (a is None) == (b is None), f
        if a is None:
            continue
        assert a.shape == b.shape, f
        if a.is_floating_point():
            assert_close(a, b, rtol=1e-5, atol=1e-5, name=f)
            loss = loss + a.sum() - b.sum()
        else:
            assert torch.equal(a, b), f
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert float(dh.abs().max()) < 1e-4 and float(dw.abs().max()) < 1e-4


# --- the CPU selection kernels (csrc/cpu/token_stats.cpp) against torch.sort and the torch path -----

SELECT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _select_rows(dtype, vocab, seed):
    """Rows that stress the order: few distinct values (ties at every place), a row of one value,
    masked (-inf) entries with fewer finite ones than most k, signed zeros, NaN (ranked first, as
    torch.sort ranks it), +-inf, and plain Gaussian rows."""
    g = _gen(seed)
    x = torch.randn(9, vocab, generator=g) * 3
    x[0] = torch.randint(0, 4, (vocab,), generator=g).float()
    x[1] = 1.0
    x[2, 5:] = float("-inf")
    x[3, ::2], x[3, 1::2] = 0.0, -0.0
    x[4, ::7] = float("nan")
    x[5, ::11], x[5, 1::13] = float("inf"), float("-inf")
    x[6] = float("-inf")
    return x.to(dtype)


def _with_torch_selection(monkeypatch):
    """The selection functions' torch path (other devices, float64) on CPU tensors."""
    monkeypatch.setattr(select, "_selects_on_cpu", lambda x: False)


def test_cpu_selection_is_used():
    """CPU rows of the three kernel dtypes go to the C++ kernel (the tests below compare it with the
    torch path; that comparison must not be the torch path against itself); float64 stays on torch."""
    for dtype in SELECT_DTYPES:
        assert select._selects_on_cpu(torch.zeros(2, 5, dtype=dtype)), dtype
    assert not select._selects_on_cpu(torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("dtype", SELECT_DTYPES, ids=str)
# 1: one entry; 67: a partial block (the kernel tests 64 logits at a time); 4_099: past one 4 096 chunk
@pytest.mark.parametrize("vocab", [1, 67, 4_099])
def test_cpu_topk_rows_is_the_stable_sort(dtype, vocab):
    """topk_rows = the first k of torch.sort(descending, stable): value descending, ties to the lower
    id, NaN first; k = 1, k past the finite entries, k = V."""
    x = _select_rows(dtype, vocab, 7 + vocab)
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    for k in sorted({1, min(vocab, 3), min(vocab, 40), vocab}):
        got = select.topk_rows(x, k)
        assert got.dtype == torch.int64 and torch.equal(got, order[:, :k]), k


@pytest.mark.parametrize("dtype", SELECT_DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [67, 4_099])
def test_cpu_top_candidates_match_the_torch_path(dtype, vocab, monkeypatch):
    """count = #{x >= the k-th value} (0 where it is NaN), and the first count ids in rank order,
    also where the ties of the k-th value run far past k (rows 0, 1, 3): the same as the torch path's."""
    x = _select_rows(dtype, vocab, 3 + vocab)
    got = {k: select.top_candidates(x, k) for k in (1, 2, 20, vocab)}
    _with_torch_selection(monkeypatch)
    for k, (ids, count) in got.items():
        exp_ids, exp_count = select.top_candidates(x, k)
        assert ids.shape[1] >= max(k, int(count.max())), k
        assert torch.equal(count, exp_count), k
        for r in range(x.shape[0]):
            c = int(count[r])
            assert torch.equal(ids[r, :c], exp_ids[r, :c]), (k, r)


def test_cpu_topk_strided_rows():
    """Rows with a row stride past V (a slice of wider logits) and rows with no unit stride."""
    wide = _logits((6,), 300, torch.bfloat16, 4)
    x = wide[:, 10:250]
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    assert torch.equal(select.topk_rows(x, 17), order[:, :17])
    xt = x.t().contiguous().t()  # column major: stride(1) != 1
    assert torch.equal(select.topk_rows(xt, 17), order[:, :17])


@pytest.mark.parametrize("dtype", SELECT_DTYPES, ids=str)
@pytest.mark.parametrize("sampling", [{"top_p": 0.9}, {"top_p": 0.5, "min_p": 0.05}, {"min_p": 0.2}, {"top_p": 0.99},
                                      {"top_p": 0.3, "top_k": -1}, {"top_p": 0.99, "min_p": 1e-7}], ids=str)  # fmt: skip
def test_cpu_sampler_kept_rows_match_the_torch_path(dtype, sampling, monkeypatch):
    """Top-p / min-p without top-k from the C++ kernel (at most three reads a row) against the torch
    path (torch.topk rounds) and the float64 port of vLLM's masking: peaked rows (a set of a few ids),
    flat rows (a set of most of the vocabulary: the cut below the kernel's histogram), ties, masked
    entries, a cut in the far tail (the row read once more); rows the kernel leaves to the torch path
    (NaN, +inf, all -inf) come out as there."""
    vocab = 5_000
    g = _gen(11)
    x = torch.randn(10, vocab, generator=g) * 2
    x[0, :40] += 14 + torch.arange(40.0) / 8  # peaked
    x[1] *= 0.05  # flat
    x[2] = torch.randint(0, 3, (vocab,), generator=g).float()  # ties at every cut
    x[3, ::3] = float("-inf")
    x[4] = 1.0
    x[5, 7] = float("nan")
    x[6, 9] = float("inf")
    x[7] = float("-inf")
    x[8, 1:] = float("-inf")  # one finite entry
    x[9] = 0.0
    x[9, 0] = 12.5  # at T = 1 the rest is 2^-18 of it, 2% of the mass: a top-p 0.99 cut there, read again
    x = x.to(dtype)
    temp = _temp((10,), 3)
    temp[9] = 1.0
    args = sparse.sampling_args(sampling)
    kept = select.sampler_kept_rows(x, temp, *args)
    clean = [0, 1, 2, 3, 4, 8, 9]
    mask = ref.sampler_kept_mask(x[clean], temp[clean], **sampling)
    assert torch.equal(ref.kept_mask_from_ids(kept[clean], vocab), mask)
    _with_torch_selection(monkeypatch)
    exp = select.sampler_kept_rows(x, temp, *args)
    assert kept.shape == exp.shape and torch.equal(kept, exp)  # the same ids in the same order


@pytest.mark.parametrize("dtype", SELECT_DTYPES, ids=str)
# 1 row (with 2 threads, of 2 chunks): the kernel's path of chunk states merged per row; 9: whole rows
@pytest.mark.parametrize("rows", [1, 9])
def test_cpu_forward_gathers_the_torch_bits(dtype, rows):
    """The CPU kernel's z at the sparse ids, read while each row is in cache, is _gather_z's: the same
    fp32 bits (a division by T, not a product with 1 / T) at -1 padding, repeats and ids past V too,
    with a scalar and a per-row temperature; the dense outputs are the token_stats kernel's."""
    vocab = 4_099
    logits = _logits((rows,), vocab, dtype, 12)
    ids = torch.randint(0, vocab, (rows,), generator=_gen(13))
    s = torch.randint(-1, vocab, (rows, 7), generator=_gen(14))
    s[:, 1] = s[:, 0]
    s[0, 2], s[-1, 3] = vocab + 5, vocab - 1  # clamped, as _gather_z clamps
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for temp in (torch.tensor([0.7]), torch.rand(rows, generator=_gen(15)) + 0.3):
            out = torch.ops.lenkernels.token_stats_sparse(logits, ids, temp, s, False, "cpu")
            dense, z = out[:4], out[-1]
            assert torch.equal(z, sparse._gather_z(logits, s, temp)), temp
            exp = lk.ops.token_stats.token_stats_fwd(logits, ids, temp, sparse.NO_IGNORE, "cpu")
            assert all(torch.equal(a, e) for a, e in zip(dense, exp)), temp
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", SELECT_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 9])
def test_cpu_backward_adds_the_torch_bits(dtype, rows):
    """The CPU backward kernel's sparse terms, added while each chunk of the gradient is in cache, are
    _add_sparse's: the same bits after the same dense gradient, with ids repeated up to three times
    (their float64 terms summed in order, one rounding) and ids on both sides of a 4 096 chunk edge."""
    vocab = 4_099
    logits = _logits((rows,), vocab, dtype, 16)
    ids = torch.randint(0, vocab, (rows,), generator=_gen(17))
    temp = torch.tensor([0.8])
    _, _, lse, mean_z = lk.ops.token_stats.token_stats_fwd(logits, ids, temp, sparse.NO_IGNORE, "cpu")
    g_lp, g_h = torch.randn(rows, generator=_gen(18)), torch.randn(rows, generator=_gen(19))
    idx = torch.randint(0, vocab, (rows, 9), generator=_gen(20))
    idx[:, 1] = idx[:, 4] = idx[:, 0]
    idx[:, 2], idx[:, 3], idx[:, 5] = 4_095, 4_096, ids
    g = torch.randn(rows, 9, generator=_gen(21), dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        exp = torch.empty_like(logits)
        lk.cpu.token_stats.token_stats_bwd(logits, ids, temp, lse, mean_z, g_lp, g_h, sparse.NO_IGNORE, exp)
        sparse._add_sparse(exp, idx, g)
        got = torch.full_like(logits, float("nan"))
        lk.cpu.token_stats.token_stats_bwd(logits, ids, temp, lse, mean_z, g_lp, g_h, sparse.NO_IGNORE, got,
                                           sparse_ids=idx, g_sparse=g)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, exp)
