"""Vocabulary-parallel (tensor-parallel) and data-parallel ops on 2 and 3 gloo ranks (CPU,
spawned processes) against the single-process results and the float64 reference.

One spawn per world size runs every check (a process start costs seconds, a check milliseconds);
each check is reported as its own test. Every rank builds the same full problem from a fixed
seed, keeps its shard, and compares the sharded result with the unsharded one.
"""

from __future__ import annotations

import datetime
import json
import math
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

# world size -> vocabulary shard sizes: unequal on purpose, one smaller than a Triton tile (13)
SHARDS = {2: [170, 131], 3: [37, 50, 13]}
BACKENDS = ("cpu", "reference", "triton")
CHECKS: dict[str, callable] = {}


def check(fn=None, *, worlds=tuple(SHARDS)):
    """Registers a check run on every rank of each world size in ``worlds``."""
    if fn is None:
        return lambda f: check(f, worlds=worlds)
    fn.worlds = worlds
    CHECKS[fn.__name__] = fn
    return fn


def check_grid(prefix: str, body, dtypes=None):
    """Registers ``body(backend, rank, world, group[, dtype])`` as one check per backend of BACKENDS
    (and per dtype of ``dtypes``), named ``<prefix>_<backend>[_<dtype>]``."""
    for backend in BACKENDS:
        for dtype in dtypes or (None,):
            extra = () if dtype is None else (dtype,)

            def fn(rank, world, group, _b=backend, _extra=extra):
                body(_b, rank, world, group, *_extra)

            fn.__name__ = f"{prefix}_{backend}" + ("" if dtype is None else f"_{str(dtype)[6:]}")
            check(fn)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _shard(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# --- reference GRPO advantages (SPEC 4): the single-process definition the helper must reproduce ---


def grpo_reference(scores: torch.Tensor, groups, eps: float = 1e-6) -> torch.Tensor:
    """(s - mean_g) / (std_g + eps), unbiased std; a group of one has mean 0 and std 1."""
    scores = scores.double()
    if isinstance(groups, int):
        groups = torch.arange(scores.shape[0]) // groups
    out = torch.empty_like(scores)
    for g in groups.unique().tolist():
        members = groups == g
        s = scores[members]
        if s.numel() == 1:
            out[members] = s
        else:
            out[members] = (s - s.mean()) / (s.std() + eps)
    return out.float()


def token_whitened_reference(scores, groups, mask):
    """A method that needs every rank's tokens: group baseline, broadcast over the mask, then
    whitened over all valid tokens of the batch (SPEC 4 reinforce_pp_baseline)."""
    base = scores - torch.stack([scores[groups == g].mean() for g in groups.tolist()])
    x = base[:, None] * mask
    valid = x[mask.bool()]
    return (x - valid.mean()) * torch.rsqrt(valid.var() + 1e-8) * mask


# --- checks (run on every rank; collectives first, assertions after, so a failure never
#     leaves a rank waiting in a collective) -------------------------------------------------------


def _vp_token_stats(backend, rank, world, group, dtype):
    from lenkernels.reference import token_stats as ref
    from tests.utils import GRAD_ATOL, GRAD_RTOL, STAT_RTOL, assert_close

    import lenkernels as lk

    sizes = SHARDS[world]
    vocab, n = sum(sizes), 23  # 23 rows: not a multiple of anything
    g = _gen(1)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    ids = torch.randint(0, vocab, (n,), generator=g)
    ids[[0, 5]] = -100
    ids[1], ids[2] = 0, vocab - 1  # the first and the last shard hold a target
    logits[3, : sizes[0]] = float("-inf")  # one shard fully masked for this row
    ids[3] = vocab - 1
    temp = torch.rand(n, generator=g) + 0.5
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    start, stop = _shard(sizes, rank)

    shard = logits[:, start:stop].clone().requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(shard, ids, temperature=temp, process_group=group, backend=backend)
    (d_shard,) = torch.autograd.grad((lp * g_lp + ent * g_h).sum(), shard)
    full = logits.clone().requires_grad_(True)
    lp1, ent1 = lk.token_logprobs_entropy(full, ids, temperature=temp, backend=backend)
    (d_full,) = torch.autograd.grad((lp1 * g_lp + ent1 * g_h).sum(), full)
    lp64, ent64 = ref.token_logprobs_entropy(logits, ids, temp)
    masked_all = logits.clone()
    masked_all[4] = float("-inf")  # every shard masked: NaN, never a number
    lp_nan, ent_nan = lk.token_logprobs_entropy(
        masked_all[:, start:stop], ids, process_group=group, backend=backend
    )  # fmt: skip

    lse = torch.logsumexp(logits.double() / temp.double()[:, None], -1).abs() + 1
    assert_close(lp, lp64, rtol=STAT_RTOL, scale=lse, name="logprobs vs float64")
    assert_close(ent, ent64, rtol=STAT_RTOL, scale=1.0, name="entropy vs float64")
    assert_close(lp, lp1, rtol=2 * STAT_RTOL, scale=lse, name="logprobs vs one process")
    assert_close(ent, ent1, rtol=2 * STAT_RTOL, scale=1.0, name="entropy vs one process")
    assert bool((lp[[0, 5]] == 0).all()), "ignored rows give logprob exactly 0"
    scale = d_full.abs().double() + d_full.abs().max().double() * 1e-3
    assert_close(d_shard, d_full[:, start:stop], rtol=2 * GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype],
                 scale=scale[:, start:stop], name="dlogits shard")  # fmt: skip
    assert torch.isnan(lp_nan[4]) and torch.isnan(ent_nan[4])
    assert bool(torch.isfinite(ent_nan[torch.arange(n) != 4]).all())


check_grid("vocab_parallel_token_stats", _vp_token_stats, dtypes=(torch.float32, torch.bfloat16))


@check
def vocab_parallel_inplace_backward(rank, world, group):
    import lenkernels as lk

    sizes = SHARDS[world]
    start, stop = _shard(sizes, rank)
    g = _gen(2)
    logits = torch.randn(9, sum(sizes), generator=g).to(torch.bfloat16)
    ids = torch.randint(0, sum(sizes), (9,), generator=g)
    grads = []
    for inplace in (False, True):
        base = logits[:, start:stop].clone().requires_grad_(True)
        z = base * 1  # a non-leaf, as from a matmul
        lp, ent = lk.token_logprobs_entropy(z, ids, process_group=group, inplace_backward=inplace)
        grads.append(torch.autograd.grad((lp - 0.3 * ent).sum(), base)[0])
    assert torch.equal(grads[0], grads[1])


@check
def vocab_parallel_policy_loss_from_logits(rank, world, group):
    """The fused loss under vocabulary parallelism: policy_loss_from_logits forwards the group."""
    import lenkernels as lk
    from tests.utils import assert_close

    sizes = SHARDS[world]
    start, stop = _shard(sizes, rank)
    g = _gen(5)
    b, t = 3, 5
    logits = torch.randn(b, t, sum(sizes), generator=g) * 2
    ids = torch.randint(0, sum(sizes), (b, t), generator=g)
    old = torch.log_softmax(logits + 0.3 * torch.randn(logits.shape, generator=g), -1).gather(-1, ids[..., None])[..., 0]
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.2).float()
    kw = {"temperature": 0.8, "entropy_coef": 0.01, "backend": "cpu"}
    shard = logits[..., start:stop].clone().requires_grad_(True)
    out = lk.policy_loss_from_logits(shard, ids, old, adv, mask, process_group=group, **kw)
    (d_shard,) = torch.autograd.grad(out.loss, shard)
    full = logits.clone().requires_grad_(True)
    out1 = lk.policy_loss_from_logits(full, ids, old, adv, mask, **kw)
    (d_full,) = torch.autograd.grad(out1.loss, full)
    assert_close(out.loss, out1.loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_close(d_shard, d_full[..., start:stop], rtol=1e-5, atol=1e-5 * d_full.abs().max().item(), name="dlogits")


def _linear_inputs(world, dtype, n=19, dim=24):
    sizes = SHARDS[world]
    vocab = sum(sizes)
    g = _gen(3)
    if dtype == torch.float32:
        hidden = torch.randn(n, dim, generator=g)
        weight = torch.randn(vocab, dim, generator=g) * (2 / math.sqrt(dim))
        bias = torch.randn(vocab, generator=g)
    else:  # a grid whose dot products are exact in fp32: every path rounds the same logits
        hidden = torch.randint(-8, 9, (n, dim), generator=g) / 8.0
        weight = torch.randint(-8, 9, (vocab, dim), generator=g) / 16.0
        bias = torch.randint(-64, 65, (vocab,), generator=g) / 64.0
    ids = torch.randint(0, vocab, (n,), generator=g)
    ids[4] = -100
    ids[0], ids[1] = 0, vocab - 1
    temp = torch.rand(n, generator=g) + 0.5
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return [t.to(dtype) for t in (hidden, weight, bias)] + [ids, temp, g_lp, g_h]


def _vp_linear(backend, rank, world, group, dtype):
    from tests.utils import STAT_RTOL, assert_close

    import lenkernels as lk

    hidden, weight, bias, ids, temp, g_lp, g_h = _linear_inputs(world, dtype)
    start, stop = _shard(SHARDS[world], rank)
    chunk = 150  # tiles of 12 rows x 12 columns: vocabulary chunks inside each shard as well

    def run(w, b, **kw):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, w, b))
        lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=b, temperature=temp, chunk_size=chunk,
                                             backend=backend, **kw)  # fmt: skip
        return (lp, ent, *torch.autograd.grad((lp * g_lp + ent * g_h).sum(), (h, w, b)))

    sharded = run(weight[start:stop], bias[start:stop], process_group=group)
    partial = run(weight[start:stop], bias[start:stop], process_group=group, reduce_hidden_grad=False)
    dh_sum = partial[2].float().clone()
    dist.all_reduce(dh_sum, group=group)
    single = run(weight, bias)

    lp, ent, dh, dw, db = sharded
    lp1, ent1, dh1, dw1, db1 = single
    assert_close(lp, lp1, rtol=2 * STAT_RTOL, scale=lp1.abs() + 10, name="logprobs vs one process")
    assert_close(ent, ent1, rtol=2 * STAT_RTOL, scale=1.0, name="entropy vs one process")
    assert lp[4] == 0
    rtol = 2e-5 if dtype == torch.float32 else 2.0**-7
    for name, a, e in (("dhidden", dh, dh1), ("dweight", dw, dw1[start:stop]), ("dbias", db, db1[start:stop])):
        assert a.dtype == dtype
        assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item(), name=name)
    assert torch.equal(partial[3], dw) and torch.equal(partial[4], db), "only the hidden gradient is reduced"
    assert_close(dh_sum, dh1, rtol=rtol, atol=rtol * dh1.abs().max().item(), name="sum of partial dhidden")


check_grid("vocab_parallel_linear", _vp_linear, dtypes=(torch.float32, torch.bfloat16))


def _vp_large_logits(backend, rank, world, group):
    """Logits of size 1e4 (and of 30 at T = 0.01): the merged logprob keeps fp32's relative
    precision, because shards are merged from their (max, log S) states and never from an lse
    rounded at the size of the logits (tests/test_hardening_large_logits.py has the single-process
    contract). Logits on a grid where every z = x / T is exact in fp32."""
    from lenkernels.reference import linear_stats as ref_linear
    from lenkernels.reference import token_stats as ref
    from tests.utils import STAT_RTOL, assert_close

    import lenkernels as lk

    sizes = SHARDS[world]
    vocab, n = sum(sizes), 6
    start, stop = _shard(sizes, rank)
    g = _gen(7)
    for base, spread, quantum, temp in ((1e4, 3.0, 2.0**-9, 1.0), (30.0, 0.03, 2.0**-12, 0.01)):
        noise = torch.round(torch.randn(n, vocab, generator=g) * spread / quantum) * quantum
        logits = base * torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0) + noise
        logits[0] = logits[0].max() - torch.arange(vocab) % 3  # every shard of comparable mass
        logits[1] = logits[1].max()  # all equal: logprob -log V
        ids = torch.randint(0, vocab, (n,), generator=g)
        ids[2] = -100
        lp, ent = lk.token_logprobs_entropy(logits[:, start:stop].clone(), ids, temperature=temp,
                                            process_group=group, backend=backend)  # fmt: skip
        lp_ref, ent_ref = ref.token_logprobs_entropy(logits, ids, temp)
        assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=1.0, name=f"logprobs at {base:g}, T = {temp:g}")
        assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name=f"entropy at {base:g}, T = {temp:g}")
        assert abs(lp[1].item() + math.log(vocab)) <= STAT_RTOL * (math.log(vocab) + 1)

    # LM head with logits near +-1e4: exact GEMM sums (small integers times multiples of 1/16)
    d = 12
    hidden = torch.randint(-3, 4, (n, d), generator=g).float()
    hidden[:, 0] = 1000.0 * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    weight = torch.randint(-16, 17, (vocab, d), generator=g) / 16.0
    weight[:, 0] = 10.0
    ids = torch.randint(0, vocab, (n,), generator=g)
    lp, ent = lk.linear_logprobs_entropy(hidden, weight[start:stop], ids, chunk_size=100, process_group=group,
                                         backend=backend)  # fmt: skip
    lp_ref, ent_ref = ref_linear.linear_logprobs_entropy(hidden, weight, ids)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=1.0, name="linear logprobs at 1e4")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="linear entropy at 1e4")


check_grid("vocab_parallel_large_logits", _vp_large_logits)


@check
def vocab_parallel_out_of_range_ids(rank, world, group):
    import lenkernels as lk

    sizes = SHARDS[world]
    start, stop = _shard(sizes, rank)
    logits = torch.randn(4, sum(sizes))
    ids = torch.tensor([0, 1, sum(sizes), 2])  # one past the global vocabulary (each shard's ids are global)
    for call in (
        lambda: lk.token_logprobs_entropy(logits[:, start:stop], ids, process_group=group),
        lambda: lk.linear_logprobs_entropy(torch.randn(4, 8), torch.randn(stop - start, 8), ids, process_group=group),
    ):
        with pytest.raises(ValueError, match="ids"):
            call()
    # the last global id is legal on every rank, whichever shard holds it
    lp, _ = lk.token_logprobs_entropy(logits[:, start:stop], torch.full((4,), sum(sizes) - 1), process_group=group)
    assert bool(torch.isfinite(lp).all())


@check(worlds=(2,))  # tracing does not depend on the world size: spare the CI a second compile
def vocab_parallel_compile_and_opcheck(rank, world, group):
    import lenkernels as lk

    hidden, weight, bias, ids, temp, g_lp, g_h = _linear_inputs(world, torch.float32, n=6, dim=8)
    start, stop = _shard(SHARDS[world], rank)
    logits_shard = F.linear(hidden, weight, bias)[:, start:stop].detach()

    def step(x, h, w, b):
        lp, ent = lk.token_logprobs_entropy(x, ids, temperature=0.9, process_group=group)
        lp2, ent2 = lk.linear_logprobs_entropy(h, w, ids, bias=b, process_group=group)
        return (lp * g_lp + ent * g_h).sum() + (lp2 - ent2).sum()

    inputs = (logits_shard, hidden, weight[start:stop], bias[start:stop])
    eager_in = [t.clone().requires_grad_(True) for t in inputs]
    compiled_in = [t.clone().requires_grad_(True) for t in inputs]
    out_eager = step(*eager_in)
    out_eager.backward()
    out_compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_in)
    out_compiled.backward()

    name = group.group_name
    t1 = torch.full((1,), 0.9)
    torch.library.opcheck(
        torch.ops.lenkernels.token_stats_vocab_parallel.default,
        (logits_shard.clone().requires_grad_(True), ids, t1, -100, False, "cpu", name),
    )
    torch.library.opcheck(
        torch.ops.lenkernels.linear_stats.default,
        (hidden.clone().requires_grad_(True), weight[start:stop].clone().requires_grad_(True),
         bias[start:stop].clone().requires_grad_(True), ids, t1, -100, 40, "cpu", name, True),
    )  # fmt: skip
    assert torch.equal(out_eager, out_compiled)
    for a, b in zip(eager_in, compiled_in):
        assert torch.equal(a.grad, b.grad)


# --- token_stats(process_group=...): every SPEC 7 output over a split vocabulary -------------------

# shards smaller than top_k (9) on purpose: a rank with fewer ids than k pads its candidates
VP_SHARDS = {2: [7, 13], 3: [13, 7, 5]}
VP_TOPK = 9
ALL_OUTPUTS = ("logprob", "entropy", "sum_p2", "argmax", "mean_logit", "topk", "gathered", "kept")


def _vp_stats_inputs(world, dtype):
    """Logits on a grid of quarters (ties everywhere), with ties across shard boundaries for
    argmax and at the k-th place of top-k, a partly masked row, ignored rows, -1 padding."""
    sizes = VP_SHARDS[world]
    vocab, n = sum(sizes), 11
    g = _gen(50)
    logits = torch.round(torch.randn(n, vocab, generator=g) * 8) / 4
    b = sizes[0]  # the first id of the second shard
    logits[0, b - 1] = logits[0, b] = logits[0].max() + 1  # argmax tie across a boundary: id b - 1
    logits[1] = torch.arange(vocab) % 3 * 0.5  # 3 values only: the k-th place ties across every shard
    logits[2, -1] = logits[2, 0] = logits[2].max() + 0.5  # tie between the first and the last id
    logits[3, :4] = float("-inf")  # a masked part of the vocabulary
    ids = torch.randint(4, vocab, (n,), generator=g)
    ids[[4, 9]] = -100
    ids[5], ids[6] = b - 1, b  # targets on both sides of a boundary
    gather = torch.randint(4, vocab, (n, 5), generator=g)
    gather[:, 0] = b
    gather[[2, 7], 3:] = -1  # padding
    kept = torch.randint(4, vocab, (n, 6), generator=g)
    kept[:, 0] = torch.where(ids >= 0, ids, 5)  # the sampled id is kept
    kept[:, 1] = kept[:, 2]  # a repeat counts once
    kept[[0, 8], 4:] = -1
    temp = torch.rand(n, generator=g) + 0.5
    return sizes, logits.to(dtype), ids, gather, kept, temp


def _float_fields(st):
    return {k: v for k, v in st._asdict().items() if v is not None and v.is_floating_point()}


def _vp_token_stats_all(backend, rank, world, group):
    import lenkernels as lk
    from tests.utils import GRAD_RTOL, assert_close

    dtype = torch.float32
    sizes, logits, ids, gather, kept, temp = _vp_stats_inputs(world, dtype)
    start, stop = _shard(sizes, rank)
    vocab = sum(sizes)
    g = _gen(51)
    calls = {
        "all": {"outputs": ALL_OUTPUTS, "top_k": VP_TOPK, "gather_ids": gather, "kept_ids": kept},
        "dense": {"outputs": ("sum_p2", "argmax", "mean_logit", "entropy")},
        "two": {"outputs": ("logprob", "entropy")},
        "topk_all": {"outputs": ("topk", "logprob"), "top_k": vocab},  # every id: some ranks hold fewer than k
    }  # fmt: skip
    # the sampler replay: the sampled ids are argmaxes (always kept); top-k ties at the k-th place
    amax_ids = torch.argmax(logits, -1)
    amax_ids[4] = -100
    sampled = {
        "sample_k": {"outputs": ("kept", "argmax"), "sampling": {"top_k": 4}},
        "sample_kpm": {"outputs": ("kept",), "sampling": {"top_k": 6, "top_p": 0.8, "min_p": 0.1}},
        "sample_none": {"outputs": ("kept",), "sampling": {"top_k": 0}},  # no truncation: the dense path
    }
    results = {}
    for name, kw in {**calls, **sampled}.items():
        y = amax_ids if name in sampled else ids
        shard = logits[:, start:stop].clone().requires_grad_(True)
        full = logits.clone().requires_grad_(True)
        st = lk.token_stats(shard, y, temperature=temp, process_group=group, backend=backend, **kw)
        st1 = lk.token_stats(full, y, temperature=temp, backend=backend, **kw)
        fields, fields1 = _float_fields(st), _float_fields(st1)
        cot = {k: torch.randn(v.shape, generator=g) for k, v in fields1.items()}
        (d_shard,) = torch.autograd.grad(sum((fields[k] * cot[k]).sum() for k in fields), shard)
        (d_full,) = torch.autograd.grad(sum((fields1[k] * cot[k]).sum() for k in fields1), full)
        d_all = torch.cat(dist_all_gather_cols(d_shard, group, sizes), -1)
        results[name] = (st, st1, d_all, d_full)
    with pytest.raises(NotImplementedError, match="process_group"):
        lk.token_stats(logits[:, start:stop], amax_ids, outputs=("kept",), sampling={"top_p": 0.9},
                       process_group=group, backend=backend)  # fmt: skip
    bad = gather.clone()
    bad[0, 0] = vocab  # one past the global vocabulary, whichever rank holds the last id
    with pytest.raises(ValueError, match="gather_ids"):
        lk.token_stats(logits[:, start:stop], ids, outputs=("gathered",), gather_ids=bad, process_group=group,
                       backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match="top_k"):
        lk.token_stats(logits[:, start:stop], ids, outputs=("topk",), top_k=vocab + 1, process_group=group)
    with pytest.raises(ValueError, match="gather_ids"):  # the two-output path checks the sparse arguments too
        lk.token_stats(logits[:, start:stop], ids, gather_ids=gather, process_group=group)
    empty = lk.token_stats(logits[:0, start:stop], ids[:0], process_group=group, backend=backend, **calls["all"] | {
        "gather_ids": gather[:0], "kept_ids": kept[:0]})  # fmt: skip

    for name, (st, st1, d_all, d_full) in results.items():
        for field, v1 in st1._asdict().items():
            v = getattr(st, field)
            assert (v is None) == (v1 is None), f"{name}.{field}: asked for in one call only"
            if v1 is None:
                continue
            assert v.shape == v1.shape and v.dtype == v1.dtype, f"{name}.{field}: {v.shape}/{v.dtype} vs {v1.shape}"
            if not v1.is_floating_point():
                assert torch.equal(v, v1), f"{name}.{field}: {v} != {v1}"
                continue
            assert_close(v, v1, rtol=1e-5, atol=1e-6, scale=1.0, name=f"{name}.{field}")
        if st1.logprob is not None:
            assert bool((st.logprob[ids == -100] == 0).all()) or name.startswith("sample")
        rtol = 2 * GRAD_RTOL[dtype]
        assert_close(d_all, d_full, rtol=rtol, atol=1e-6 * d_full.abs().max().item(), name=f"{name} dlogits")
    assert empty.topk_ids.shape == (0, VP_TOPK) and empty.gathered_logprobs.shape == (0, 5)
    assert empty.logprob.shape == empty.argmax.shape == empty.kept_logprob.shape == (0,)
    ar, ar1 = results["all"][0], results["all"][1]
    assert ar.argmax[0] == sizes[0] - 1 and ar.argmax[2] == 0, "ties across shards go to the lower id"
    assert torch.equal(ar.topk_ids, ar1.topk_ids)


def dist_all_gather_cols(x, group, sizes):
    """Every rank's ``[n, V_r]`` shard, in rank order (shards of unequal width)."""
    from lenkernels.distributed import all_gather_variable

    cols = all_gather_variable(x.detach().t().contiguous(), sizes=sizes, process_group=group)
    return [c.t() for c in cols.split(sizes)]


for _backend in ("cpu", "reference"):

    def _fn(rank, world, group, _b=_backend):
        _vp_token_stats_all(_b, rank, world, group)

    _fn.__name__ = f"vocab_parallel_token_stats_all_{_backend}"
    check(_fn)


@check
def vocab_parallel_token_stats_bf16(rank, world, group):
    """bf16 shards with every output: the statistics compared with one process on the same bf16
    logits; the gradient with one process on their fp32 copy (the shards' gradient is rounded to
    bf16 once, one process's twice where it adds the sparse terms to a bf16 dense gradient)."""
    import lenkernels as lk
    from tests.utils import GRAD_RTOL, assert_close

    sizes, logits, ids, gather, kept, temp = _vp_stats_inputs(world, torch.bfloat16)
    start, stop = _shard(sizes, rank)
    kw = {"outputs": ALL_OUTPUTS, "top_k": VP_TOPK, "gather_ids": gather, "kept_ids": kept, "temperature": temp,
          "backend": "cpu"}  # fmt: skip
    shard = logits[:, start:stop].clone().requires_grad_(True)
    full = logits.float().requires_grad_(True)
    st = lk.token_stats(shard, ids, process_group=group, **kw)
    st1 = lk.token_stats(logits, ids, **kw)
    loss = sum(v.sum() for v in _float_fields(st).values())
    loss1 = sum(v.sum() for v in _float_fields(lk.token_stats(full, ids, **kw)).values())
    (d_shard,) = torch.autograd.grad(loss, shard)
    (d_full,) = torch.autograd.grad(loss1, full)
    d_all = torch.cat(dist_all_gather_cols(d_shard, group, sizes), -1)
    for field, v1 in _float_fields(st1).items():
        assert_close(getattr(st, field), v1, rtol=1e-5, atol=1e-5, scale=1.0, name=field)
    assert torch.equal(st.argmax, st1.argmax) and torch.equal(st.topk_ids, st1.topk_ids)
    assert d_shard.dtype == torch.bfloat16
    assert_close(d_all, d_full, rtol=2 * GRAD_RTOL[torch.bfloat16], atol=1e-6 * d_full.abs().max().item(),
                 name="dlogits")  # fmt: skip


@check
def global_token_count(rank, world, group):
    from lenkernels.distributed import global_token_count

    masks = [torch.rand(r + 2, 7, generator=_gen(10 + r)) > 0.4 for r in range(world)]
    weights = [torch.rand(r + 3, generator=_gen(20 + r)) for r in range(world)]
    n = global_token_count(masks[rank], process_group=group)
    w = global_token_count(weights[rank])
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == sum(int(m.sum()) for m in masks)
    assert w.dtype == torch.float64 and abs(float(w) - sum(float(x.double().sum()) for x in weights)) < 1e-9


@check
def all_gather_variable(rank, world, group):
    from lenkernels.distributed import all_gather_variable

    parts = [torch.randn(r + 2, 3, generator=_gen(30 + r)) for r in range(world)]  # 2, 3, 4 rows
    got = all_gather_variable(parts[rank], process_group=group)
    known = all_gather_variable(parts[rank], sizes=[p.shape[0] for p in parts], process_group=group)
    flags = all_gather_variable(parts[rank][:, 0] > 0)
    empty = all_gather_variable(parts[rank][:0] if rank == 0 else parts[rank])
    bad = torch.zeros(2, 4 if rank == world - 1 else 3)
    with pytest.raises(ValueError, match="x must have the same"):
        all_gather_variable(bad, process_group=group)
    expected = torch.cat(parts)
    assert torch.equal(got, expected) and torch.equal(known, expected)
    assert flags.dtype == torch.bool and torch.equal(flags, expected[:, 0] > 0)
    assert torch.equal(empty, torch.cat(parts[1:]))


@check
def group_advantages_across_ranks(rank, world, group):
    from lenkernels.distributed import group_advantages_across_ranks

    g = _gen(40)
    n, size = 24, 4
    scores = torch.randint(0, 3, (n,), generator=g).float()  # ties happen
    groups = torch.randperm(n, generator=g) // size  # members of a group scattered over the ranks
    scores[groups == groups[0]] = 1.0  # an all-equal group
    groups[23] = 99  # a group of one
    mask = (torch.rand(n, 5, generator=g) > 0.3).float()
    counts = {2: [11, 13], 3: [5, 9, 10]}[world]  # unequal per-rank batches
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])

    adv = group_advantages_across_ranks(scores[rows], groups[rows], grpo_reference, process_group=group)
    adv_known = group_advantages_across_ranks(scores[rows], groups[rows], grpo_reference, sizes=counts)
    contiguous = group_advantages_across_ranks(scores[rows], size, grpo_reference)
    tokens = group_advantages_across_ranks(
        scores[rows], groups[rows], token_whitened_reference, per_sample={"mask": mask[rows]}
    )
    expected = grpo_reference(scores, groups)
    assert torch.equal(adv, expected[rows]) and torch.equal(adv_known, expected[rows])
    assert torch.equal(contiguous, grpo_reference(scores, size)[rows])
    assert torch.equal(tokens, token_whitened_reference(scores, groups, mask)[rows])
    # the reference's own conventions (SPEC 4): all-equal group -> exactly 0, group of one -> raw score
    assert bool((expected[groups == groups[0]] == 0).all()) and expected[23] == scores[23]
    with pytest.raises(TypeError, match="groups"):
        group_advantages_across_ranks(scores[rows], 0, grpo_reference)


# --- the spawned workers and the pytest side ------------------------------------------------------


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # 2 to 3 ranks share the CI machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    results = {}
    for name, fn in CHECKS.items():
        if world not in fn.worlds:
            continue
        torch.manual_seed(0)
        try:
            fn(rank, world, dist.group.WORLD)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(SHARDS), ids=lambda w: f"{w}ranks")
def rank_results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"gloo{world}")
    mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("name", list(CHECKS))
def test_distributed(rank_results, name):
    if name not in rank_results[0]:
        pytest.skip(f"{name} runs on {CHECKS[name].worlds} ranks only")
    failures = [f"--- rank {r} ---\n{res[name]}" for r, res in enumerate(rank_results) if res[name] != "ok"]
    assert not failures, "\n".join(failures)
