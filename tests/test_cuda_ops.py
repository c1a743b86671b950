"""The CUDA C++ kernels of the O(N) families (fused policy loss, group advantages, phase
statistics) through the public ops with ``backend="cuda"``, against the float64 references.

Every test runs on two targets:

- ``emulated`` (CPU tensors; needs nvcc, skipped saying so without it): ``lenkernels.cuda.host_emulation``
  runs the kernels' team bodies (csrc/cuda/team.h) on the host, one thread per GPU thread, meeting at
  the same reductions in the GPU's order, planned for a 4-SM GPU so that small shapes already split
  sequences across blocks. Everything but the hardware is exercised: which elements every thread
  reads and writes, the split plans, the reductions, the launchers (lenkernels/cuda.py) and the
  dispatch in lenkernels/ops. The modules come from the extension cache (built there on first use,
  or by tests/test_cuda_compile.py earlier in the session).
- ``gpu`` (CUDA tensors; skipped without a GPU): the same tests on the device.

GPU-only properties (stream order, graph capture, agreement with the Triton backend) come last; the
families' own test files run their whole suites on the cuda backend on a GPU as well.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import lenkernels as lk
from lenkernels import _backend, _build, _extensions
from lenkernels import cuda as lk_cuda
from lenkernels.cuda import phase_stats as lk_cuda_phase
from lenkernels.cuda import policy_loss as cuda_pl
from lenkernels.reference import advantages as ref_adv
from lenkernels.reference import policy_loss as ref_pl
from tests import utils as tu
from tests.utils import GRAD_ATOL, GRAD_RTOL, HAS_CUDA, STAT_RTOL, assert_close, nan_like

FAMILIES = ("policy_loss", "advantages", "phase_stats")
EMULATED_SMS = 4  # 32 blocks fill this "GPU": two sequences of 2 500 tokens already split in two


@pytest.fixture(scope="module")
def emulated_modules():
    """The three extension modules of the current sources (built in parallel when not cached yet)."""
    if _build.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA kernels cannot be built here")
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = dict(zip(FAMILIES, pool.map(lambda f: _build.build(f"_cuda_{f}", "cuda"), FAMILIES)))
    return {f: _extensions._from_path(f"_cuda_{f}", p) for f, p in paths.items()}


@pytest.fixture(params=["emulated", "gpu"])
def dev(request, monkeypatch):
    """The device of the test's tensors: "cpu" under the host emulation, or "cuda"."""
    if request.param == "gpu":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU")
        yield "cuda"
        return
    with cuda_emulation(request, monkeypatch):
        yield "cpu"


@contextlib.contextmanager
def cuda_emulation(request, monkeypatch):
    """The cuda backend on CPU tensors for the test: the ``emulated_modules`` (skips without nvcc)
    loaded, the backend resolver accepting CPU tensors for FAMILIES, and the kernel bodies run on the
    host (``lenkernels.cuda.host_emulation``)."""
    modules = request.getfixturevalue("emulated_modules")
    for family, module in modules.items():
        monkeypatch.setitem(_extensions._loaded, f"_cuda_{family}", module)
    real_status = _backend.backend_status

    def status(family, device):  # the cuda backend accepts CPU tensors while emulated
        out = real_status(family, device)
        if family in FAMILIES and torch.device(device).type == "cpu":
            out["cuda"] = (True, "")
        return out

    monkeypatch.setattr(_backend, "backend_status", status)
    with lk_cuda.host_emulation(sm_count=EMULATED_SMS):
        yield


def _sm_count(dev: str) -> int:
    return EMULATED_SMS if dev == "cpu" else torch.cuda.get_device_properties(0).multi_processor_count


# --- policy loss ------------------------------------------------------------------------------------


def _policy_batch(B, T, dev, **kw):
    """:func:`tests.utils.policy_batch` on ``dev``, ratios spread 0.8 in log space (B >= 2: row 1
    holds one token, row 2 has A = 0)."""
    return tu.policy_batch(B, T, device=dev, **{"spread": 0.8, **kw})


def _check_policy(got, want, dev):
    out, d_lp, d_h = got
    exp, e_lp, e_h = want
    tu.assert_policy_stats(out, exp, dev)
    # gradients are rounded to their dtype once (fp16 keeps subnormals: GRAD_ATOL is their spacing)
    atol = 1e-7 * float(e_lp.abs().max()) + GRAD_ATOL[d_lp.dtype]
    assert_close(d_lp, e_lp, rtol=GRAD_RTOL[d_lp.dtype], atol=atol, name="dlogprobs")
    assert_close(d_h, e_h, rtol=GRAD_RTOL[d_h.dtype], atol=GRAD_ATOL[d_h.dtype], name="dentropy")
    assert bool(torch.isfinite(d_lp).all()), "masked positions get exactly 0, never NaN"


@pytest.mark.parametrize("mode", ref_pl.MODES)
def test_policy_loss_every_mode(dev, mode):
    """Every mode with every optional term (KL, entropy bonus, importance weights, dual clip where it
    applies) on 5 rows of 37 tokens: far below one block, so most threads of every block idle."""
    b = _policy_batch(5, 37, dev, per_token_adv=mode in ("gmpo", "cispo"))
    kw = dict(mode=mode, ref_logprobs=b.ref, kl_coef=0.05, entropy_coef=0.01, importance_weights=b.w,
              clip_dual=3.0 if mode in ("ppo", "gspo", "luspo") else None,
              dro_beta=0.3 if mode == "dro" else None)  # fmt: skip
    if mode in ("gspo", "luspo"):
        kw.update(clip_low=0.05, clip_high=0.08)  # both clips active on these sequence ratios
    _check_policy(tu.run_policy(b, "cuda", **kw), tu.expect_policy(b, **kw), dev)


@pytest.mark.parametrize("agg", ref_pl.AGGS)
@pytest.mark.parametrize("mode,per_token", [("ppo", True), ("gspo", False), ("gmpo", True)])
def test_policy_loss_split_sequences(dev, mode, per_token, agg):
    """Two sequences of 2 500 tokens: each spans two blocks (the plan says so), so the per-sequence
    sums of GSPO/GMPO and seq-mean are merged across blocks, and the finalize sums every block row."""
    b = _policy_batch(2, 2_500, dev, per_token_adv=per_token)
    assert lk_cuda.load("policy_loss").policy_loss_splits(2, 2_500, _sm_count(dev)) == 2
    kw = dict(mode=mode, agg=agg, ref_logprobs=b.ref, kl_coef=0.1, entropy_coef=0.02, top_entropy_quantile=0.7)
    _check_policy(tu.run_policy(b, "cuda", **kw), tu.expect_policy(b, **kw), dev)


def test_policy_loss_packed_low_precision(dev):
    """Packed sequences (one empty, one spanning two blocks, tokens after the last one belonging to
    none) of bf16 logprobs, fp16 old logprobs and entropy, fp32 [B, 1] advantages: each column is
    read in its own dtype, the gradients come back in their inputs' dtypes, and tokens outside every
    sequence get 0."""
    n = 2_600
    cu = torch.tensor([0, 40, 40, 2_500, 2_550], device=dev)
    mask = torch.rand(n) > 0.2
    mask[2_550:] = False  # (the op's quantile threshold would count valid tokens outside every sequence)
    lp = -torch.rand(n) * 3
    bad = torch.where(torch.rand(n) > 0.5, float("nan"), -float("inf"))
    flat = SimpleNamespace(
        lp=torch.where(mask, lp, bad).to(torch.bfloat16).to(dev),
        old=torch.where(mask, lp + torch.randn(n) * 0.8, bad).to(torch.float16).to(dev),
        ent=torch.where(mask, torch.rand(n) * 3, bad).to(torch.float16).to(dev),
        adv=torch.randn(4, 1, device=dev), mask=mask.to(dev),
    )  # fmt: skip
    kw = dict(mode="ppo", agg="seq-mean-token-mean", clip_dual=3.0, entropy_coef=0.01, cu_seqlens=cu,
              num_seqs=torch.tensor(6.0, device=dev), dp_size=2, top_entropy_quantile=0.5)  # fmt: skip
    got = tu.run_policy(flat, "cuda", **kw)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float16
    assert bool((got[1][2_550:] == 0).all()) and bool((got[2][2_550:] == 0).all())
    _check_policy(got, tu.expect_policy(flat, **kw), dev)


def test_policy_loss_strided_rows(dev):
    """Padded rows of a wider buffer (row stride 300 for 211 tokens) and per-token advantages of
    another stride: the kernels read every column through its own row stride, without copies."""
    wide = _policy_batch(4, 300, dev, per_token_adv=True)
    b = SimpleNamespace(**{k: v[:, :211] if v.dim() == 2 else v for k, v in vars(wide).items()})
    b.adv = torch.randn(4, 400, device=dev)[:, 50:261].masked_fill_(~b.mask, float("nan"))
    assert b.lp.stride(0) == 300 and b.adv.stride(0) == 400
    kw = dict(mode="cispo", ref_logprobs=b.ref, kl_coef=0.03, kl_estimator="k3+", importance_weights=b.w)
    _check_policy(tu.run_policy(b, "cuda", **kw), tu.expect_policy(b, **kw), dev)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "k3+", "abs+"])
@pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "noclamp"])
def test_kl_penalty(dev, estimator, clamp):
    """Per-token KL forward and both gradients on 3 x 301 tokens (bf16 logprobs: read in their dtype),
    with deltas beyond verl's +-20 clamp and near 0 (k3's series)."""
    lp = (-torch.rand(3, 301) * 5).to(torch.bfloat16)
    ref = lp.float() + torch.randn(3, 301) * 2
    ref[0, :5] = lp[0, :5].float() + torch.tensor([25.0, -25.0, 1e-4, -1e-4, 0.0])
    x, r = lp.to(dev).requires_grad_(True), ref.to(dev).requires_grad_(True)
    out = lk.kl_penalty(x, r, estimator, clamp=clamp, backend="cuda")
    g = torch.randn(3, 301, device=dev)
    d_x, d_r = torch.autograd.grad(out, [x, r], g)
    x64, r64 = lp.double().requires_grad_(True), ref.double().requires_grad_(True)
    want = ref_pl.kl_penalty(x64, r64, estimator, clamp)
    e_x, e_r = torch.autograd.grad(want, [x64, r64], g.cpu().double())
    scale = (r64 - x64).detach().abs().clamp(max=20).exp() + 1
    assert out.dtype == torch.float32 and d_x.dtype == torch.bfloat16 and d_r.dtype == torch.float32
    assert_close(out, want, rtol=STAT_RTOL, scale=scale, name="kl")
    assert_close(d_x, e_x, rtol=GRAD_RTOL[torch.bfloat16], atol=1e-30, name="d logprobs")
    assert_close(d_r, e_r, rtol=2 * STAT_RTOL, atol=1e-30, scale=scale * g.abs().cpu().double(), name="d ref")


def test_policy_loss_launchers_write_every_output(dev):
    """Output buffers pre-filled with NaN: the launchers write every statistic, every sequence's
    values and every gradient element (masked ones as exact zeros)."""
    tu.assert_policy_kernels_write_every_output(cuda_pl, _policy_batch(3, 2_100, dev), dev)


def test_policy_loss_deterministic(dev):
    b = _policy_batch(2, 2_500, dev)
    kw = dict(mode="gmpo", ref_logprobs=b.ref, kl_coef=0.05, importance_weights=b.w, agg="seq-mean-token-sum")
    first, second = tu.run_policy(b, "cuda", **kw), tu.run_policy(b, "cuda", **kw)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    for name in ("loss", "clip_frac_low", "ratio_mean", "approx_kl"):
        assert torch.equal(getattr(first[0], name), getattr(second[0], name))


# --- group advantages ------------------------------------------------------------------------------

T_ADV = 7  # odd, below one warp: most lanes of every row idle


def _grouping():
    """Shuffled ids, unequal sizes with a group of one (verl's convention), one of two (rloo's
    n/(n-1) = 2) and one of 40 (more members than a warp has lanes), negative and spread-out ids."""
    sizes = [1, 2, 5, 40, 3, 4]
    values = torch.randperm(1000)[: len(sizes)] * 37 - 5000
    ids = torch.repeat_interleave(values, torch.tensor(sizes))
    return ids[torch.randperm(ids.numel())]


def _adv_scale(method, rewards, ids, eps, mask=None, lengths=None):
    """|s| and the group's largest |s| times the factor applied to them: the magnitude of the terms an
    fp32 advantage combines (its error grows with it, not with the possibly tiny result)."""
    s = ref_adv.scores(rewards.cpu())
    ids = ref_adv.group_ids(ids, s.shape[0])
    out = torch.empty_like(s)
    for g in ids.unique():
        idx = (ids == g).nonzero().reshape(-1)
        x = s[idx]
        big = x.abs() + x.abs().max()
        if method in ("grpo", "grpo_passk"):
            big = big / ((x.std() if x.numel() > 1 else 1.0) + eps)
        elif method == "rloo" and x.numel() > 1:
            big = big * x.numel() / (x.numel() - 1)
        out[idx] = big
    if method == "batch":
        out = out / (s.std() + eps)
    elif method == "reinforce_pp_baseline":
        x = ref_adv.group_advantages(rewards.cpu(), ids, "dr_grpo")
        w = lengths.cpu().double() if lengths is not None else (
            mask.cpu().double().sum(-1) if mask is not None else torch.ones_like(s))  # fmt: skip
        mean = (w * x).sum() / w.sum()
        out = (out + mean.abs()) / torch.sqrt((w * (x - mean) ** 2).sum() / (w.sum() - 1) + 1e-8)
    elif method == "gaussian":
        out = torch.full_like(s, 4.0)
    return out if mask is None else out.unsqueeze(-1) * mask.cpu().double().abs()


@pytest.mark.parametrize("layout", ["scores", "tokens+mask", "lengths", "group_size"])
@pytest.mark.parametrize("method", list(ref_adv.METHODS))
def test_group_advantages(dev, method, layout):
    """Every method on every input layout, into a NaN-filled out buffer (unwritten elements show);
    "group_size" is an int group size: contiguous groups, no sort."""
    ids = _grouping() if layout != "group_size" else torch.arange(54) // 3
    n = ids.numel()
    rewards = torch.randint(0, 2, (n,)).float() + 0.25 * torch.randn(n)  # ties inside groups, and spread
    kw = {}
    if layout == "tokens+mask":  # the score sums every position's reward, masked ones too (verl)
        rewards = torch.randn(n, T_ADV) * 0.5
        kw["mask"] = (torch.rand(n, T_ADV) > 0.3).to(torch.int64)
        kw["mask"][:, 0] = 1
    elif layout == "lengths" or method == "opo":  # opo weights by length: it needs some
        kw["lengths"] = torch.randint(0 if layout == "lengths" else 1, 50, (n,), dtype=torch.int32)
    shape = kw["mask"].shape if "mask" in kw else (n,)
    out = nan_like(torch.empty(shape, device=dev))
    res = lk.group_advantages(rewards.to(dev), 3 if layout == "group_size" else ids.to(dev), method=method, out=out,
                              backend="cuda", **{k: v.to(dev) for k, v in kw.items()})  # fmt: skip
    assert res is out
    expected = ref_adv.group_advantages(rewards, ids, method, mask=kw.get("mask"), lengths=kw.get("lengths"))
    scale = _adv_scale(method, rewards, ids, 1e-6, kw.get("mask"), kw.get("lengths"))
    assert_close(out, expected, rtol=STAT_RTOL, scale=scale, name=f"{method} advantages")
    if "mask" in kw:
        assert bool((out.cpu()[kw["mask"] == 0] == 0).all()), "masked tokens are exactly 0"


@pytest.mark.parametrize("method", ["batch", "reinforce_pp_baseline"])
def test_batch_moments_over_two_chunks(dev, method):
    """4 103 responses: the batch moments span two 4 096-element chunks merged in order; bf16
    scores, int64 lengths as the token weights of reinforce_pp_baseline."""
    n = 4_103
    ids = torch.randint(0, 900, (n,))
    rewards = (torch.randint(0, 2, (n,)).float() + 0.3 * torch.randn(n)).to(torch.bfloat16)
    lengths = torch.randint(1, 300, (n,))
    kw = {"lengths": lengths} if method == "reinforce_pp_baseline" else {}
    out = lk.group_advantages(rewards.to(dev), ids.to(dev), method=method, backend="cuda",
                              **{k: v.to(dev) for k, v in kw.items()})  # fmt: skip
    expected = ref_adv.group_advantages(rewards, ids, method, **kw)
    assert_close(out, expected, rtol=STAT_RTOL, scale=_adv_scale(method, rewards, ids, 1e-6, None, kw.get("lengths")),
                 name=method)  # fmt: skip


def test_gaussian_with_task_ids_and_nan(dev):
    """The rank map once (a long run of ties, a group of one) and twice (groups, then task ids); a NaN
    score makes its group NaN (through the launcher: the public op refuses NaN on CPU tensors)."""
    ids = torch.tensor([0] * 45 + [1] * 6 + [2])
    rewards = torch.cat([torch.zeros(30), torch.ones(15), torch.tensor([1.0, 2.0, 2.0, 3.0, float("nan"), 0.5, 4.0])])
    perm = torch.randperm(ids.numel())
    ids, rewards = ids[perm], rewards[perm]
    out = nan_like(torch.empty(ids.numel(), device=dev))
    from lenkernels.ops import advantages as adv_ops

    adv_ops.group_advantages_fwd(rewards.to(dev), ids.to(dev), 0, None, None, None, "gaussian", 1e-6, True, True,
                                 "cuda", out)  # fmt: skip
    want = ref_adv.group_advantages(rewards.double(), ids, "gaussian")
    assert_close(out, want, rtol=STAT_RTOL, atol=1e-6, name="gaussian")  # NaN exactly where the reference has it
    assert bool(torch.isnan(out.cpu()[ids == 1]).all())
    finite = ~torch.isnan(rewards)
    tasks = torch.arange(ids.numel())[finite] % 4
    got = lk.group_advantages(rewards[finite].to(dev), ids[finite].to(dev), method="gaussian",
                              task_ids=tasks.to(dev), backend="cuda")  # fmt: skip
    want = ref_adv.group_advantages(rewards[finite].double(), ids[finite], "gaussian", task_ids=tasks)
    assert_close(got, want, rtol=STAT_RTOL, atol=1e-6, name="gaussian, task ids")


def test_group_stats(dev):
    """Several columns, a where selection, the mask's row sums as the last column, a NaN value in one
    selected member (its group's mean/std/min/max NaN), and members past one warp's lanes."""
    ids = _grouping()
    n = ids.numel()
    values = torch.randn(n, 2)
    values[(ids == ids[0]).nonzero()[0], 1] = float("nan")
    where = (torch.rand(n, 3) > 0.3).float()
    where[(ids == ids[0]).nonzero()[0], 1] = 1.0
    mask = torch.rand(n, 9) > 0.4
    stats, lengths = lk.group_stats(values.to(dev), ids.to(dev), where=where.to(dev), mask=mask.to(dev), backend="cuda")
    want, want_len = lk.group_stats(values.double(), ids, where=where, mask=mask, backend="reference")
    assert_close(lengths, want_len, rtol=0.0, name="lengths")
    cols = torch.cat([values.double(), mask.double().sum(-1, keepdim=True)], 1).nan_to_num(0.0)
    big = (cols.abs().max() + 1) * n * torch.ones_like(want)  # a sum of up to n members' values
    assert_close(stats, want, rtol=STAT_RTOL, scale=big, name="group stats")
    assert bool(torch.isnan(stats.cpu()[ids == ids[0], 1, 2:]).all()), "a NaN member: mean, std, min, max NaN"


# --- phase statistics ------------------------------------------------------------------------------

DELIM = [3, 3, 4]  # repeats its first token: "3 3 3 4" matches one token late


def _phase_rows(T: int):
    """Rows of filler ids (10..19) with the delimiter placed where the search's tiles meet (1 024
    positions per step): straddling positions 1 023..1 025, starting exactly at 1 024, at 5 (first
    tile), nowhere (every response token is think), preceded by an extra 3, and broken by a masked
    gap (no occurrence)."""
    ids = torch.randint(10, 20, (6, T))
    mask = torch.rand(6, T) > 0.1
    for row, pos in ((0, 1_023), (1, 1_024), (2, 5), (4, 700), (5, 40)):
        ids[row, pos : pos + 3] = torch.tensor(DELIM)
        mask[row, pos : pos + 3] = True
    ids[4, 699] = 3
    mask[4, 699] = True
    mask[5, 41] = False
    return ids, mask


@pytest.mark.parametrize("layout", ["right", "packed"])
def test_phase_stats(dev, layout):
    """Two bf16 statistics split at once, forward and backward with random cotangents, against the
    reference backend in float64."""
    T = 1_100
    ids, mask = _phase_rows(T)
    values = (torch.randn(2, 6, T) * 2).to(torch.bfloat16)
    values[:, ~mask] = float("nan")  # non-response values never reach a statistic
    kw = {}
    if layout == "packed":  # 6 rows end to end, cut into sequences of other lengths (one empty)
        ids, mask, values = ids.reshape(-1), mask.reshape(-1), values.reshape(2, -1)
        kw["cu_seqlens"] = torch.tensor([0, 1_100, 1_100, 2_900, 4_000, 6_000])
    x = values.to(dev).requires_grad_(True)
    got = lk.phase_stats(x, ids.to(dev), mask.to(dev), delimiter=DELIM, backend="cuda",
                         **{k: v.to(dev) for k, v in kw.items()})  # fmt: skip
    x64 = values.double().requires_grad_(True)
    want = lk.phase_stats(x64, ids, mask, delimiter=DELIM, backend="reference", **kw)
    for name in ("think_count", "answer_count", "delimiter_pos", "found"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    magnitude = lk.phase_stats(values.double().abs(), ids, mask, delimiter=DELIM, backend="reference", **kw)
    for name in ("think_mean", "think_sum", "answer_mean", "answer_sum"):  # error scale: the sum of |terms|
        assert_close(getattr(got, name), getattr(want, name), rtol=STAT_RTOL, scale=getattr(magnitude, name),
                     name=name)  # fmt: skip
    cot = [torch.randn(2, got.think_mean.shape[1]) for _ in range(4)]
    loss = sum((c.to(dev) * getattr(got, f)).sum() for c, f in zip(cot, ("think_mean", "think_sum", "answer_mean",
                                                                       "answer_sum")))  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    loss64 = sum((c.double() * getattr(want, f)).sum() for c, f in zip(cot, ("think_mean", "think_sum", "answer_mean",
                                                                          "answer_sum")))  # fmt: skip
    (grad64,) = torch.autograd.grad(loss64, x64)
    assert grad.dtype == torch.bfloat16
    assert_close(grad, grad64, rtol=GRAD_RTOL[torch.bfloat16], atol=1e-30, name="d values")


def test_sequence_stats(dev):
    """Packed sequences (one empty, one holding a NaN entropy) with the top-entropy token mask."""
    n = 3_000
    ent = torch.rand(n) * 3
    ent[2_500] = float("nan")
    mask = torch.rand(n) > 0.2
    mask[2_500] = True
    cu = torch.tensor([0, 700, 700, 2_100, 2_950])
    got = lk.sequence_stats(ent.to(dev), mask.to(dev), cu_seqlens=cu.to(dev), threshold=1.5,
                            top_entropy_quantile=0.3, backend="cuda")  # fmt: skip
    # the quantile of a batch holding a NaN is NaN (selects nothing): check the mask without it too
    ok = torch.arange(n) != 2_500
    cu_ok = torch.tensor([0, 700, 700, 2_100, 2_949])
    got_ok = lk.sequence_stats(ent[ok].to(dev), mask[ok].to(dev), cu_seqlens=cu_ok.to(dev), threshold=1.5,
                               top_entropy_quantile=0.3, backend="cuda")  # fmt: skip
    for out, (e, m, c) in ((got, (ent, mask, cu)), (got_ok, (ent[ok], mask[ok], cu_ok))):
        want = lk.sequence_stats(e.double(), m, cu_seqlens=c, threshold=1.5, top_entropy_quantile=0.3,
                                 backend="reference")  # fmt: skip
        assert torch.equal(out.length.cpu(), want.length)
        for name in ("entropy_mean", "entropy_min", "entropy_max", "frac_above_threshold"):
            assert_close(getattr(out, name), getattr(want, name), rtol=STAT_RTOL, scale=3.0, name=name)
        assert torch.equal(out.high_entropy_mask.cpu(), want.high_entropy_mask)
    assert not bool(got.high_entropy_mask.any()), "a NaN threshold selects no token"
    assert math.isnan(float(got.entropy_mean[3])) and float(got.entropy_mean[1]) == 0.0


def test_phase_launchers_write_every_output(dev):
    """Host launchers fill NaN/sentinel-initialised outputs completely: every sequence's statistics,
    every token's gradient of a padded batch, every token's mask flag."""
    T = 1_100
    ids, mask = _phase_rows(T)
    flat_ids, valid = ids.reshape(-1).to(dev), mask.reshape(-1).to(dev)
    cu = (torch.arange(7) * T).to(dev)
    values = torch.randn(1, 6 * T, device=dev)
    outs = [torch.full((1, 6), float("nan"), device=dev) for _ in range(4)]
    outs += [torch.full((6,), -7, dtype=torch.int64, device=dev) for _ in range(3)]
    found = torch.full((6,), 7, dtype=torch.uint8, device=dev)
    delim = torch.tensor(DELIM, device=dev)
    lk_cuda_phase.phase_stats_fwd(values, flat_ids, valid, cu, delim, *outs, found)
    assert not any(bool(torch.isnan(o).any()) for o in outs[:4]) and not any(bool((o == -7).any()) for o in outs[4:])
    assert found.cpu().tolist() == [1, 1, 1, 0, 1, 0]
    assert outs[6].cpu().tolist() == [1_023, 1_024, 5, T, 700, T]
    dvalues = nan_like(values)
    grads = [torch.randn(1, 6, device=dev)] * 4
    lk_cuda_phase.phase_stats_bwd(valid, cu, outs[6], outs[4], outs[5], 3, *grads, dvalues)
    assert not bool(torch.isnan(dvalues).any())
    seq_outs = [torch.full((6,), -7, dtype=torch.int64, device=dev)]
    seq_outs += [torch.full((6,), float("nan"), device=dev) for _ in range(4)]
    high = torch.full((6 * T,), 7, dtype=torch.uint8, device=dev)
    quantile = torch.tensor([0.3], device=dev)
    lk_cuda_phase.sequence_stats_fwd(values.reshape(-1), valid, cu, 0.5, quantile, *seq_outs, high)
    assert not bool((seq_outs[0] == -7).any()) and not any(bool(torch.isnan(o).any()) for o in seq_outs[1:])
    assert bool((high <= 1).all()) and not bool(high[~valid].any())


# --- on a GPU only ---------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@gpu_only
def test_gpu_stream_order_and_graph_capture():
    """Launches go to the caller's current stream; a captured graph replays the same bits (no host
    synchronisation, no allocation outside the caching allocator)."""
    b = _policy_batch(8, 1_000, "cuda")
    ids = torch.randint(0, 100, (4_096,), device="cuda")
    rewards = torch.randn(4_096, device="cuda")

    def step():
        out = lk.policy_loss(b.lp, b.old, b.adv, b.mask, mode="gspo", entropy=b.ent, ref_logprobs=b.ref, kl_coef=0.1,
                             backend="cuda")  # fmt: skip
        adv = lk.group_advantages(rewards, ids, method="reinforce_pp_baseline", backend="cuda")
        return out.loss, out.ratio_mean, adv

    first = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        second = step()
    torch.cuda.current_stream().wait_stream(side)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, c in zip(first, captured):
        assert torch.equal(a, c)


@gpu_only
def test_gpu_matches_triton_backend():
    """The two GPU backends agree on a trainer-sized step (64 x 2 048 tokens, 4 096 responses)."""
    pytest.importorskip("triton")
    b = _policy_batch(64, 2_048, "cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (4_096,), device="cuda")
    rewards = torch.randn(4_096, 300, device="cuda")
    mask = torch.rand(4_096, 300, device="cuda") > 0.3
    res = {}
    for backend in ("cuda", "triton"):
        x = b.lp.clone().requires_grad_(True)
        out = lk.policy_loss(x, b.old, b.adv, b.mask, mode="ppo", clip_dual=3.0, ref_logprobs=b.ref, kl_coef=0.01,
                             entropy=b.ent, entropy_coef=0.01, backend=backend)  # fmt: skip
        (d_lp,) = torch.autograd.grad(out.loss, x)
        adv = lk.group_advantages(rewards, ids, method="opo", mask=mask, backend=backend)
        res[backend] = (out.loss, out.clip_frac_high, d_lp, adv)
    for a, c, name in zip(res["cuda"], res["triton"], ("loss", "clip_frac_high", "dlogprobs", "advantages")):
        assert_close(a, c, rtol=4 * GRAD_RTOL[torch.bfloat16] if name == "dlogprobs" else 1e-4, atol=1e-6, name=name)
