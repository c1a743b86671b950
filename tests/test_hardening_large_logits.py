"""Hardening: log-probabilities stay exact at large logits, on every backend and path.

A logprob computed as ``z_y - lse`` subtracts two numbers of the size of the logits, and fp32
rounds ``lse = m + log S`` by half an ulp of that size: ``[1e4] * 4`` gave -1.3867188 instead of
-log 4 = -1.3862944, and logits of ~30 at T = 0.01 (|z| ~ 3 000) were ~6e-5 off. The contract:
logprob and entropy within ``STAT_RTOL`` of the float64 reference relative to ``|logprob| + 1``
(not to the size of z) for |z| up to 1e4 and T down to 0.01, through token_logprobs_entropy,
linear_logprobs_entropy, token_stats_with_phases, policy_loss_from_logits and the merge of
vocabulary parts (chunks, tensor-parallel shards: ``lenkernels.distributed.merge_stats``).

Inputs are built so that every z = logits / T is exact in fp32 (logits on a grid fine enough to be
interesting, coarse enough that the product with 1 / T needs no rounding): every backend and the
reference then see the same z, and the comparison measures the statistics alone, not the
conditioning of rounding z at |z| = 1e4 (an ulp there is 2^-10). The CUDA C++ kernels' per-thread
code is checked at large logits by tests/test_cuda_compile.py (host replay).
"""

from __future__ import annotations

import math

import pytest
import torch

import lenkernels as lk
from lenkernels import distributed as lkdist
from lenkernels.ops.token_stats import token_stats_fwd
from lenkernels.reference import linear_stats as ref_linear
from lenkernels.reference import token_stats as ref
from tests.utils import GRAD_ATOL, GRAD_RTOL, STAT_RTOL, assert_close, backend_params, token_grad_scale

BACKENDS = backend_params("token_stats")
LINEAR_BACKENDS = backend_params("linear_stats")
POLICY_BACKENDS = backend_params("policy_loss")
PHASE_BACKENDS = backend_params("phase_stats")

# (dtype, base, spread, quantum, temperature): logits = ±base + spread * N(0, 1) on a grid of
# `quantum`, |z| = base / T; each product x / T is exact in fp32 (and in the input dtype's grid)
CASES = [
    (torch.float32, 1e4, 3.0, 2.0**-9, 1.0),  # |z| = 1e4: lse rounded by up to 2^-11
    (torch.float32, 1e4, 30.0, 2.0**-9, 1.0),  # a peaked distribution at the same size
    (torch.float32, 1e3, 3.0, 2.0**-12, 1.0),
    (torch.float32, 30.0, 0.03, 2.0**-12, 0.01),  # the case: logits of 30 at T = 0.01
    (torch.float32, 100.0, 0.03, 2.0**-12, 0.01),  # |z| = 1e4 through the temperature
    (torch.bfloat16, 1e3, 8.0, None, 1.0),  # bf16 spacing 4 to 8 there: many exact ties at the max
    (torch.bfloat16, 30.0, 0.5, None, 0.01),
    (torch.float16, 1e4, 20.0, None, 1.0),  # fp16 spacing 8 at 1e4
]
CASE_IDS = [f"{str(d)[6:]}-{b:g}x{s:g}-T{t:g}" for d, b, s, _, t in CASES]


def _logits(lead, vocab, dtype, base, spread, quantum, gen):
    """Logits around +base or -base (per row), exact in ``dtype``, with every x / T exact in fp32."""
    n = math.prod(lead)
    sign = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)
    noise = torch.randn(n, vocab, generator=gen) * spread
    if quantum is not None:
        noise = torch.round(noise / quantum) * quantum
    x = (base * sign + noise).to(dtype)
    return x.reshape(*lead, vocab)


def _logits_and_ids(seed, lead, vocab, dtype, base, spread, quantum, low=0):
    """:func:`_logits` of a generator seeded with ``seed``, then ids in ``[low, vocab)``; the generator
    is returned too, for the test's further draws."""
    gen = torch.Generator().manual_seed(seed)
    logits = _logits(lead, vocab, dtype, base, spread, quantum, gen)
    return logits, torch.randint(low, vocab, lead, generator=gen), gen


def _check_stats(lp, ent, lp_ref, ent_ref, name=""):
    """The contract: STAT_RTOL relative to |logprob| + 1 and to entropy + 1, whatever the size of z."""
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=1.0, name=f"logprobs{name}")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name=f"entropy{name}")


# --- the example ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("value", [1e4, -1e4, 3e4])
def test_equal_large_logits_give_exactly_log_v(backend, device, value):
    """[1e4] * 4 -> logprob -log 4 (was -1.3867188: z_y - lse with lse rounded to a 2^-10 grid)."""
    logits = torch.full((3, 4), value, device=device)
    logits[1] = torch.tensor([value, value, value - 1.0, value - 2.0])
    logits[2, 3] = float("-inf")  # a masked entry next to large ones
    ids = torch.tensor([0, 2, 1], device=device)
    lp, ent = lk.token_logprobs_entropy(logits, ids, backend=backend)
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits.cpu(), ids.cpu())
    assert abs(lp[0].item() + math.log(4)) <= STAT_RTOL * (math.log(4) + 1)
    _check_stats(lp, ent, lp_ref, ent_ref)


# --- token_logprobs_entropy ------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,base,spread,quantum,temp", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lead,vocab", [((2, 3), 1_000), ((3,), 5_000)])  # 5 000: chunks / splits merged
def test_token_logprobs_entropy_large_logits(backend, device, dtype, base, spread, quantum, temp, lead, vocab):
    logits, ids, _ = _logits_and_ids(0, lead, vocab, dtype, base, spread, quantum)
    ids.view(-1)[-1] = logits.reshape(-1, vocab)[-1].float().argmax()  # a likely token: logprob near 0
    lp, ent = lk.token_logprobs_entropy(logits.to(device), ids.to(device), temperature=temp, backend=backend)
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits, ids, temp)
    _check_stats(lp, ent, lp_ref, ent_ref)
    # per-token temperature tensor (fp32 0.01 is not 1/100 exactly: the reference divides by it)
    temps = torch.full(lead, temp)
    lp_t, ent_t = lk.token_logprobs_entropy(logits.to(device), ids.to(device), temperature=temps.to(device),
                                            backend=backend)  # fmt: skip
    lp_ref_t, ent_ref_t = ref.token_logprobs_entropy(logits, ids, temps)
    _check_stats(lp_t, ent_t, lp_ref_t, ent_ref_t, " (temperature tensor)")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,base,spread,quantum,temp", [CASES[i] for i in (0, 4, 5)],
                         ids=[CASE_IDS[i] for i in (0, 4, 5)])
def test_backward_at_large_logits(backend, device, dtype, base, spread, quantum, temp):
    """The backward reads the saved lse: p_j = exp(z_j - lse) loses about |lse| * 2^-24 relative
    (lse is rounded at the size of the logits), nothing more, and nothing becomes NaN."""
    lead, vocab = (4,), 3_000
    logits, ids, gen = _logits_and_ids(1, lead, vocab, dtype, base, spread, quantum)
    g_lp, g_h = torch.randn(lead, generator=gen), torch.randn(lead, generator=gen)
    x = logits.to(device).requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(x, ids.to(device), temperature=temp, backend=backend)
    (dx,) = torch.autograd.grad((lp * g_lp.to(device) + ent * g_h.to(device)).sum(), x)
    assert bool(torch.isfinite(dx).all())
    temps = torch.full(lead, temp)
    expected = ref.token_stats_backward(logits.reshape(-1, vocab), ids, temps, g_lp, g_h, -100)
    lse = (logits.double() / temp).logsumexp(-1).abs().max().item()
    rtol = GRAD_RTOL[dtype] + 4 * lse * 2.0**-24
    scale = token_grad_scale(logits, ids, temps, g_lp, g_h, -100)
    assert_close(dx, expected, rtol=rtol, atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")


# --- the merge of vocabulary parts (chunks, tensor-parallel shards) ----------------------------------


def _merged_parts(logits, ids, temp, sizes, backend, device):
    """Each part's statistics from the kernels (token_stats_fwd with state=True), merged with
    lenkernels.distributed.merge_stats as the vocab-parallel op does (dim=0 instead of a group)."""
    temp1 = torch.full((logits.shape[0],), float(temp), device=device)
    parts, held = [], []
    start = 0
    for size in sizes:
        local = lkdist.shard_local_ids(ids.to(device), torch.tensor([start], device=device), size, -100)
        fwd_ids = lkdist.chunk_ids(local, 0, size, for_backward=False)
        shard = logits[:, start : start + size].to(device)
        lp, ent, _, _, max_z, log_s = token_stats_fwd(shard, fwd_ids, temp1, lkdist.IGNORED, backend, state=True)
        parts.append(torch.stack([max_z, log_s, ent, lp]))
        held.append(local >= 0)
        start += size
    stacked = torch.stack(parts, 1)  # [4, parts, N]
    return lkdist.merge_stats(*stacked, torch.stack(held), dim=0, state=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,base,spread,quantum,temp", [CASES[i] for i in (0, 3, 5)],
                         ids=[CASE_IDS[i] for i in (0, 3, 5)])
def test_merge_stats_of_shards_at_large_logits(backend, device, dtype, base, spread, quantum, temp):
    sizes = [37, 150, 13]  # unequal; one smaller than any tile
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(2)
    logits = _logits((6,), vocab, dtype, base, spread, quantum, gen)
    # shards of comparable mass (their lse differ by less than 1): the rounding of a shard's lse
    # would shift every weight against the others
    peak = logits[0].float().max()
    logits[0] = (peak - torch.arange(vocab) % 3).to(dtype)
    logits[1] = logits[1].float().max().to(dtype)  # all equal: the merged logprob is exactly -log V
    logits[2, : sizes[0]] = float("-inf")  # a fully masked shard
    ids = torch.randint(0, vocab, (6,), generator=gen)
    ids[2] = vocab - 1
    ids[3] = -100
    lp, ent, lse, mean_z, max_z, log_s = _merged_parts(logits, ids, temp, sizes, backend, device)
    lp = torch.where(ids.to(device) == -100, torch.zeros_like(lp), lp)
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits, ids, temp)
    _check_stats(lp, ent, lp_ref, ent_ref)
    assert abs(lp[1].item() + math.log(vocab)) <= STAT_RTOL * (math.log(vocab) + 1)
    z = logits.double() / temp
    lse_ref = z.logsumexp(-1)
    assert_close(max_z.double() + log_s.double(), lse_ref, rtol=STAT_RTOL, scale=1.0, name="max_z + log_s")
    assert_close(lse, lse_ref, rtol=STAT_RTOL, scale=0.0, name="lse")
    assert_close(mean_z, lse_ref - ent_ref, rtol=STAT_RTOL, scale=1.0, name="mean_z")


def test_merge_stats_all_masked_and_nan():
    """The state form keeps the special cases: a row masked in every part has NaN statistics (lse
    -inf, like one kernel's), a NaN part poisons every statistic."""
    inf = float("inf")
    max_z = torch.tensor([[-inf, 5.0], [-inf, float("nan")]])  # [parts, rows]
    log_s = torch.tensor([[-inf, 0.0], [-inf, 0.0]])
    ent = torch.tensor([[float("nan"), 0.0], [float("nan"), 0.0]])
    lp = torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])
    held = torch.tensor([[True, True], [False, False]])
    lp, ent, lse, mean_z = lkdist.merge_stats(max_z, log_s, ent, lp, held, dim=0)
    for t in (lp, ent, mean_z):
        assert bool(torch.isnan(t).all()), t
    assert lse[0] == -inf and torch.isnan(lse[1])


# --- linear_logprobs_entropy ------------------------------------------------------------------------


def _linear_inputs(dtype, base_h, w0, w_quantum, n=7, dim=16, vocab=300, gen=None):
    """hidden[:, 0] = ±base_h and weight[:, 0] = w0 put every logit near ±base_h * w0; the other
    columns are small integers times multiples of ``w_quantum``, so every partial sum of the GEMM,
    hence each logit, is exact in fp32 (and the bf16 rounding of a logit is the same everywhere)."""
    hidden = torch.randint(-3, 4, (n, dim), generator=gen).float()
    hidden[:, 0] = base_h * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    weight = torch.randint(-16, 17, (vocab, dim), generator=gen) * w_quantum
    weight[:, 0] = w0
    bias = torch.randint(-64, 65, (vocab,), generator=gen) * (w_quantum / 4)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    ids[1] = -100
    return [t.to(dtype) for t in (hidden, weight, bias)] + [ids]


LINEAR_CASES = [
    (torch.float32, 1000.0, 10.0, 2.0**-4, 1.0),  # logits ~ ±1e4
    (torch.float32, 100.0, 10.0, 2.0**-4, 1.0),  # ~ ±1e3
    (torch.float32, 30.0, 1.0, 2.0**-10, 0.01),  # ~ ±30 at T = 0.01: |z| ~ 3 000
    (torch.bfloat16, 100.0, 10.0, 2.0**-4, 1.0),
]


@pytest.mark.parametrize("backend,device", LINEAR_BACKENDS)
@pytest.mark.parametrize("dtype,base_h,w0,w_quantum,temp", LINEAR_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1] * c[2]:g}-T{c[4]:g}" for c in LINEAR_CASES])  # fmt: skip
@pytest.mark.parametrize("chunk_size", [None, 700])  # 700: vocabulary chunks merged (states carried)
def test_linear_logprobs_entropy_large_logits(backend, device, dtype, base_h, w0, w_quantum, temp, chunk_size):
    gen = torch.Generator().manual_seed(3)
    hidden, weight, bias, ids = _linear_inputs(dtype, base_h, w0, w_quantum, gen=gen)
    lp, ent = lk.linear_logprobs_entropy(
        hidden.to(device), weight.to(device), ids.to(device), bias=bias.to(device), temperature=temp,
        chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    lp_ref, ent_ref = ref_linear.linear_logprobs_entropy(hidden, weight, ids, bias, temp)
    assert ref_linear.linear_logits(hidden, weight, bias).float().abs().min() > 0.5 * base_h * w0
    _check_stats(lp, ent, lp_ref, ent_ref)


# --- compositions: phases and the loss from logits ---------------------------------------------------


@pytest.mark.parametrize("backend,device", PHASE_BACKENDS)
@pytest.mark.parametrize("dtype,base,spread,quantum,temp", [CASES[0], CASES[3]], ids=[CASE_IDS[i] for i in (0, 3)])
def test_token_stats_with_phases_large_logits(backend, device, dtype, base, spread, quantum, temp):
    b, t, vocab = 2, 6, 500
    logits, ids, _ = _logits_and_ids(4, (b, t), vocab, dtype, base, spread, quantum, low=4)
    ids[:, 2] = 3  # the delimiter
    out = lk.token_stats_with_phases(logits.to(device), ids.to(device), delimiter=[3], temperature=temp,
                                     backend=backend)  # fmt: skip
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits, ids, temp)
    _check_stats(out.logprobs, out.entropy, lp_ref, ent_ref)
    expected = lk.phase_stats(lp_ref.float(), ids, delimiter=[3], backend="reference")
    scale = lp_ref.abs().sum(-1) + 1
    for name in ("think_sum", "answer_sum", "think_mean", "answer_mean"):
        got = getattr(out.logprob_phases, name)
        assert_close(got, getattr(expected, name), rtol=STAT_RTOL, scale=scale, name=f"logprob {name}")


@pytest.mark.parametrize("backend,device", POLICY_BACKENDS)
@pytest.mark.parametrize("dtype,base,spread,quantum,temp", [CASES[0], CASES[4]], ids=[CASE_IDS[i] for i in (0, 4)])
def test_policy_loss_from_logits_large_logits(backend, device, dtype, base, spread, quantum, temp):
    b, t, vocab = 3, 5, 400
    logits, ids, gen = _logits_and_ids(5, (b, t), vocab, dtype, base, spread, quantum)
    lp_ref, _ = ref.token_logprobs_entropy(logits, ids, temp)
    old = (lp_ref + 0.05 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()
    adv = torch.randn(b, generator=gen)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    out = lk.policy_loss_from_logits(logits.to(device), ids.to(device), old.to(device), adv.to(device),
                                     mask.to(device), temperature=temp, backend=backend)  # fmt: skip
    expected = lk.policy_loss(lp_ref.float(), old, adv, mask, backend="reference")
    # d loss / d logprob_t = -A r / n per token: the loss errs by mean |A| times the logprob error
    scale = (adv.abs()[:, None] * (lp_ref.abs() + 1) * mask).sum() / mask.sum()
    assert_close(out.loss, expected.loss, rtol=STAT_RTOL, scale=scale, name="loss")
    assert_close(out.approx_kl, expected.approx_kl, rtol=STAT_RTOL, scale=(lp_ref.abs() + 1).mean(), name="approx_kl")
