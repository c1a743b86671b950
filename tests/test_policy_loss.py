"""policy_loss and kl_penalty against the float64 reference (SPEC 2-3), on every backend.

The Triton interpreter costs ~0.5 s per forward+backward here, so shapes are small and each
test covers many options at once; conventions pinned to the trainers' formulas live in
test_policy_loss_conventions.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import lenkernels as lk
from lenkernels import _backend
from lenkernels._codes import Agg, KLEstimator, Mode, NormSource
from lenkernels.ops import policy_loss as ops
from lenkernels.ops.policy_loss_args import KLConfig, PolicyConfig, PolicyInputs
from lenkernels.reference import policy_loss as ref
from tests.utils import (
    GRAD_RTOL,
    HAS_CUDA,
    STAT_RTOL,
    assert_close,
    assert_policy_kernels_write_every_output,
    assert_policy_stats,
    backend_params,
    expect_policy,
    policy_batch,
    run_policy,
)

BACKENDS = backend_params("policy_loss")

# (B, T): why each is in the grid
SHAPES = {
    "odd": (5, 37),  # T below any tile, not a multiple of anything; row 0 all-masked, row 1 one token
    "split": (2, 300),  # few long rows: several programs per sequence, merged left to right
}


def check(got, want, device, backend=None):
    out, d_lp, d_h = got
    exp, e_lp, e_h = want
    assert_policy_stats(out, exp, device, detached=True)
    tol = GRAD_RTOL[d_lp.dtype]
    if backend == "triton" and not HAS_CUDA and d_lp.dtype != torch.float32:
        tol *= 2  # the interpreter truncates fp32 -> bf16/fp16 (one ulp); the GPU rounds to nearest
    assert_close(d_lp, e_lp, rtol=tol, atol=1e-7 * float(e_lp.abs().max()) + 1e-30, name="dlogprobs")
    if e_h is not None:
        assert_close(d_h, e_h, rtol=tol, atol=1e-30, name="dentropy")
    assert bool(torch.isfinite(d_lp).all()), "masked positions must get exactly 0, never NaN"


def full_kwargs(batch, **kw):
    return {"ref_logprobs": batch.ref, "kl_coef": 0.05, "entropy_coef": 0.01, "importance_weights": batch.w, **kw}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ref.MODES)
def test_modes_match_reference(backend, device, mode):
    """Every mode with every optional term at once (KL, entropy bonus, importance weights; dual clip
    where it applies, DPPO's ratio truncation at 2 so that it caps some tokens) on per-sequence
    advantages; GMPO also on per-token advantages."""
    batch = policy_batch(*SHAPES["odd"], per_token_adv=mode in ("gmpo", "cispo"), device=device)
    dual = {"ppo": 3.0, "gspo": 3.0, "luspo": 3.0, "dppo_tv": 2.0, "dppo_kl": 2.0}.get(mode)
    kw = full_kwargs(batch, mode=mode, clip_dual=dual, dro_beta=0.3 if mode == "dro" else None)
    if mode in ("gspo", "luspo"):
        kw.update(clip_low=0.05, clip_high=0.08)  # both clips active on these ratios
    check(run_policy(batch, backend, **kw), expect_policy(batch, **kw), device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", ref.AGGS)
@pytest.mark.parametrize("mode,per_token", [("ppo", True), ("gspo", False)])
def test_aggregations(backend, device, agg, mode, per_token):
    """Every aggregation on a token-local mode with per-token advantages and on a sequence-level
    mode with per-sequence advantages; the long rows take the multi-program path."""
    batch = policy_batch(*SHAPES["split" if mode == "gspo" else "odd"], per_token_adv=per_token, device=device)
    kw = dict(mode=mode, agg=agg, ref_logprobs=batch.ref, kl_coef=0.1, entropy_coef=0.02, clip_low=0.1)
    check(run_policy(batch, backend, **kw), expect_policy(batch, **kw), device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_normalisers(backend, device):
    """num_tokens / num_seqs as numbers and as device tensors, dp_size, norm_length."""
    batch = policy_batch(4, 29, device=device)
    cases = [
        dict(agg="token-mean", num_tokens=123.0, dp_size=4),
        dict(agg="token-mean", num_tokens=torch.tensor(77, device=device), dp_size=2),
        dict(agg="seq-mean-token-mean", num_seqs=torch.tensor([16.0], device=device), dp_size=8),
        dict(agg="seq-mean-token-sum-norm", num_seqs=6, norm_length=4096, dp_size=2),
        dict(agg="token-sum", dp_size=3),
    ]
    for kw in cases:
        check(run_policy(batch, backend, **kw), expect_policy(batch, **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}),
              device)  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kl_estimators_in_loss(backend, device):
    """Each KL estimator (aliases, straight-through forms, verl's clamps and TRL's none) as the loss's
    KL term: value and gradient. A few tokens have |delta| > 20 to hit verl's clamps."""
    batch = policy_batch(3, 41, device=device)
    batch.ref[:, :4] = batch.lp[:, :4] + torch.tensor([25.0, -25.0, 3.0, -3.0], device=device)
    for est, clamp in [("k1", True), ("abs", True), ("mse", True), ("low_var_kl", True), ("k3", False),
                       ("k3+", True), ("k1+", True)]:  # fmt: skip
        kw = dict(mode="reinforce", ref_logprobs=batch.ref, kl_coef=0.5, kl_estimator=est, kl_clamp=clamp,
                  with_entropy=False)  # fmt: skip
        check(run_policy(batch, backend, **kw), expect_policy(batch, **kw), device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "k3+", "abs+", "kl", "mse", "low_var_kl"])
@pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "noclamp"])
def test_kl_penalty(backend, device, estimator, clamp):
    """Per-token values and both gradients. delta spans the k3 clamp (|delta| > 20), the value clamp
    (exp(delta) - delta - 1 > 10) and tiny |delta| ~ 1e-4, where fp32 exp(d) - 1 - d cancels
    completely; the series keeps 1e-5 relative there."""
    lp = -torch.rand(7, 13) * 5
    delta = torch.randn(7, 13) * 2
    delta[0] = torch.tensor([25.0, -25.0, 15.0, -15.0, 3.0, -3.0, 1e-4, -1e-4, 3e-3, -7e-3, 0.4, -0.6, 0.0])
    ref_lp = lp + delta
    x, r = lp.to(device).requires_grad_(True), ref_lp.to(device).requires_grad_(True)
    value = lk.kl_penalty(x, r, estimator, clamp=clamp, backend=backend)
    g = torch.randn(7, 13)
    d_x, d_r = torch.autograd.grad(value, (x, r), g.to(device))
    x64, r64 = lp.double().requires_grad_(True), ref_lp.double().requires_grad_(True)
    v64 = ref.kl_penalty(x64, r64, estimator, clamp)
    e_x, e_r = torch.autograd.grad(v64, (x64, r64), g.double())
    assert value.dtype == torch.float32 and value.shape == lp.shape
    # fp32 rounds delta = ref - lp once (relative 6e-8); k3 amplifies that by delta * K'/K <= ~25 here
    assert_close(value, v64, rtol=STAT_RTOL, name="kl")
    assert_close(d_x, e_x, rtol=GRAD_RTOL[torch.float32], atol=1e-6 * g.abs().max().item(), name="dlogprobs")
    assert_close(d_r, e_r, rtol=GRAD_RTOL[torch.float32], atol=1e-6 * g.abs().max().item(), name="dref")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_packed_matches_reference(backend, device):
    """Packed [N] with cu_seqlens: an empty sequence, a one-token sequence, a long one split over
    programs, and trailing tokens that belong to no sequence (ignored, zero gradient). Per-sequence
    and per-token advantages; the reference unpacks and computes each sequence padded."""
    lens = [0, 1, 260, 17, 33]
    n = sum(lens) + 3
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    flat = policy_batch(1, n, garbage=False)
    mask = torch.rand(n) > 0.2
    bad = torch.where(torch.rand(n) > 0.5, float("nan"), -float("inf"))
    batch = SimpleNamespace(
        **{k: torch.where(mask, getattr(flat, k)[0], bad) for k in ("lp", "old", "ref", "ent", "w")},
        mask=mask, adv=torch.randn(len(lens)),
    )  # fmt: skip
    for key in ("lp", "old", "mask", "ref", "ent", "w", "adv"):
        setattr(batch, key, getattr(batch, key).to(device))
    for mode, agg, adv in [("gspo", None, "seq"), ("ppo", "token-mean", "tok"), ("gmpo", "seq-mean-token-sum-norm", "seq")]:
        b = SimpleNamespace(**vars(batch))
        if adv == "tok":
            b.adv = torch.randn(n).to(device)
        kw = full_kwargs(b, mode=mode, agg=agg, cu_seqlens=cu.to(device))
        if agg == "seq-mean-token-sum-norm":
            kw["norm_length"] = 300
        got = run_policy(b, backend, **kw)
        check(got, expect_policy(b, **kw), device)
        assert bool((got[1][sum(lens):] == 0).all()), "tokens outside every sequence get no gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_top_entropy_quantile(backend, device):
    """The (1 - rho) quantile threshold computed on the device matches torch.quantile on the valid
    tokens; with a given threshold, the same mask; the kept fraction is reported."""
    batch = policy_batch(4, 45, device=device)
    for kw in (dict(top_entropy_quantile=0.2), dict(top_entropy_quantile=0.8, mode="gmpo"),
               dict(entropy_threshold=1.5, mode="gspo")):  # fmt: skip
        kw = full_kwargs(batch, **kw)
        got = run_policy(batch, backend, **kw)
        check(got, expect_policy(batch, **kw), device)
        assert 0.0 < float(got[0].entropy_kept) < 1.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_ratios_and_zero_advantages(backend, device):
    """|l| > 20 (ratio clamp: zero gradient), GSPO mean log-ratio > 10 (clamp: zero gradient),
    A = 0 everywhere (only the KL and entropy terms remain)."""
    batch = policy_batch(3, 23, device=device, garbage=False)
    batch.old[:, :3] = batch.lp[:, :3] + torch.tensor([25.0, -25.0, 19.0], device=device)
    for kw in (dict(mode="ppo"), dict(mode="sapo"), dict(mode="cispo")):
        check(run_policy(batch, backend, **kw), expect_policy(batch, **kw), device)
    far = policy_batch(3, 23, device=device, garbage=False)
    far.old = far.lp - 12.0  # mean log-ratio 12 > 10
    check(run_policy(far, backend, mode="gspo"), expect_policy(far, mode="gspo"), device)
    assert float(run_policy(far, backend, mode="gspo")[1].abs().max()) == 0.0
    zero = policy_batch(3, 23, device=device)
    zero.adv = torch.zeros_like(zero.adv)
    kw = full_kwargs(zero, mode="ppo")
    got = run_policy(zero, backend, **kw)
    check(got, expect_policy(zero, **kw), device)
    assert float(got[0].pg_loss) == 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_masked_batch(backend, device):
    """No valid token: loss 0 and zero gradients (not NaN), counts 0, ratio_min/max +inf/-inf."""
    batch = policy_batch(3, 11, device=device)
    batch.mask = torch.zeros_like(batch.mask)
    for mode in ("ppo", "gmpo"):
        out, d_lp, d_h = run_policy(batch, backend, **full_kwargs(batch, mode=mode, agg="seq-mean-token-mean"))
        assert float(out.loss.detach()) == 0.0 and float(out.num_tokens) == 0.0
        assert float(out.ratio_min) == math.inf and float(out.ratio_max) == -math.inf
        assert bool((d_lp == 0).all()) and bool((d_h == 0).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_low_precision_and_strided_inputs(backend, device):
    """bf16 logprobs (gradient in bf16) with fp16 old logprobs, rows that are slices of a wider
    buffer (row stride != T, as in logits[:, -T:]) and a column-strided tensor (copied once)."""
    batch = policy_batch(4, 19, device=device, dtype=torch.bfloat16)
    batch.old = batch.old.to(torch.float16)
    wide = torch.full((4, 40), float("nan"), device=device)
    wide[:, 7:26] = batch.ref.float()
    batch.ref = wide[:, 7:26]
    batch.w = batch.w.float().t().contiguous().t()  # column stride 4
    kw = full_kwargs(batch, mode="ppo", clip_dual=2.5)
    got = run_policy(batch, backend, **kw)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    check(got, expect_policy(batch, **kw), device, backend)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "reference"])
def test_kernels_write_every_output(backend, device):
    """Output buffers pre-filled with NaN: the kernels write every statistic, every sequence's
    values and every gradient element (masked ones as exact zeros)."""
    batch = policy_batch(*SHAPES["split"], device=device)
    assert_policy_kernels_write_every_output(_backend.kernels(backend, "policy_loss"), batch, device)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "reference"])
def test_deterministic(backend, device):
    """Bitwise identical across runs and (cpu) across thread counts."""
    batch = policy_batch(*SHAPES["split"], device=device)
    kw = full_kwargs(batch, mode="gspo")
    threads = torch.get_num_threads()
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            out, d_lp, d_h = run_policy(batch, backend, **kw)
        finally:
            torch.set_num_threads(threads)
        runs.append((torch.stack(list(out.metrics().values())), d_lp, d_h))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_from_logits(backend, device):
    """policy_loss_from_logits = token_logprobs_entropy + policy_loss: value and d logits against the
    float64 composition of the two references; in-place backward gives the same gradient."""
    from lenkernels.reference import token_stats as ref_stats

    B, T, V = 3, 9, 301
    logits = torch.randn(B, T, V) * 2
    ids = torch.randint(0, V, (B, T))
    batch = policy_batch(B, T, garbage=False)
    kw = dict(mode="ppo", ref_logprobs=batch.ref, kl_coef=0.1, entropy_coef=0.05, top_entropy_quantile=0.5)
    dev = lambda x: x.to(device)  # noqa: E731
    x = dev(logits).requires_grad_(True)
    out = lk.policy_loss_from_logits(x, dev(ids), dev(batch.old), dev(batch.adv), dev(batch.mask), temperature=0.8,
                                     backend=backend, **{**kw, "ref_logprobs": dev(batch.ref)})  # fmt: skip
    (d_x,) = torch.autograd.grad(out.loss, x)
    x64 = logits.double().requires_grad_(True)
    lp64, h64 = ref_stats.token_logprobs_entropy(x64, ids, 0.8)
    exp = ref.policy_loss(lp64, batch.old.double(), batch.adv.double(), batch.mask, entropy=h64,
                          **{**kw, "ref_logprobs": batch.ref.double()})  # fmt: skip
    (e_x,) = torch.autograd.grad(exp["loss"], x64)
    assert_close(out.loss, exp["loss"], rtol=STAT_RTOL, scale=exp["scales"]["loss"], name="loss")
    assert_close(d_x, e_x, rtol=1e-5, atol=1e-7 * float(e_x.abs().max()), name="dlogits")
    y = dev(logits) * 1.0
    y.requires_grad_(True)
    z = y * 1.0  # non-leaf logits, as from a matmul: written in place
    out2 = lk.policy_loss_from_logits(z, dev(ids), dev(batch.old), dev(batch.adv), dev(batch.mask), temperature=0.8,
                                      inplace_backward=True, backend=backend, **{**kw, "ref_logprobs": dev(batch.ref)})  # fmt: skip
    (d_y,) = torch.autograd.grad(out2.loss, y)
    assert torch.equal(d_y, d_x)


def test_from_logits_passes_process_group(monkeypatch):
    """process_group reaches token_logprobs_entropy only when it is set."""
    seen = []

    def fake(logits, ids, **kwargs):
        seen.append("process_group" in kwargs and kwargs["process_group"])
        return -torch.rand(ids.shape), torch.rand(ids.shape)

    monkeypatch.setattr(ops, "token_logprobs_entropy", fake)
    args = (torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2))
    ops.policy_loss_from_logits(*args)
    ops.policy_loss_from_logits(*args, process_group="group")
    assert seen == [False, "group"]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    batch = policy_batch(3, 10, device=device, garbage=False)
    torch.library.opcheck(
        torch.ops.lenkernels.policy_loss.default,
        ops.op_args(PolicyInputs(batch.lp.requires_grad_(True), batch.old, batch.adv, batch.mask, None, batch.ref,
                                 batch.ent.requires_grad_(True), batch.w, None, None),
                    PolicyConfig(Mode.PPO, 0.2, 0.28, 3.0, 1.0, 1.05, Agg.TOKEN_MEAN, KLEstimator.K3, True, True, 0.1,
                                 0.01, NormSource.NORM_COUNTED, 0.0, 0.0, 1.0), backend),
    )  # fmt: skip
    cu = torch.tensor([0, 4, 4, 10], device=device)
    lp = batch.lp.detach().reshape(-1)[:10].clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.lenkernels.policy_loss.default,
        ops.op_args(PolicyInputs(lp, lp.detach() + 0.1, torch.randn(3, device=device), None, cu, None, None, None,
                                 None, torch.tensor([5.0], device=device)),
                    PolicyConfig(Mode.GSPO, 3e-4, 4e-4, 0.0, 1.0, 1.05, Agg.SEQ_MEAN_TOKEN_MEAN, KLEstimator.K3, False,
                                 True, 0.0, 0.0, NormSource.NORM_TENSOR, 0.0, 0.0, 2.0), backend),
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.lenkernels.kl_penalty.default,
        ops.kl_op_args(batch.lp.requires_grad_(True), batch.ref, KLConfig(KLEstimator.K3, True, True), backend),
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    batch = policy_batch(3, 12, device=device, garbage=False)

    def step(lp, ent, num_tokens):
        out = lk.policy_loss(lp, batch.old, batch.adv, batch.mask, mode="ppo", clip_high=0.28, clip_dual=3.0,
                             ref_logprobs=batch.ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01,
                             top_entropy_quantile=0.5, num_tokens=num_tokens, backend=backend)  # fmt: skip
        kl = lk.kl_penalty(lp, batch.ref, "k3", backend=backend)
        return out.loss + 0.5 * kl.mean(), out.clip_frac_high

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    n = torch.tensor(40.0, device=device)
    results = []
    for fn in (step, compiled):
        lp, ent = batch.lp.clone().requires_grad_(True), batch.ent.clone().requires_grad_(True)
        loss, clip = fn(lp, ent, n)
        loss.backward()
        results.append((loss.detach(), clip, lp.grad, ent.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input(backend, device):
    batch = policy_batch(3, 8, device=device)
    lp, old, adv, mask = batch.lp, batch.old, batch.adv, batch.mask

    def call(**kw):
        args = {"logprobs": lp, "old_logprobs": old, "advantages": adv, "mask": mask, "backend": backend, **kw}
        return lk.policy_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"),
                              args.pop("mask"), **args)  # fmt: skip

    cases = [
        (ValueError, "empty batch", dict(logprobs=lp[:0], old_logprobs=old[:0], advantages=adv[:0], mask=mask[:0])),
        (ValueError, "empty batch", dict(logprobs=lp[:, :0], old_logprobs=old[:, :0], mask=mask[:, :0])),
        (TypeError, "logprobs", dict(logprobs=lp.long())),
        (ValueError, "logprobs", dict(logprobs=lp.reshape(-1), old_logprobs=old.reshape(-1), mask=None)),
        (ValueError, "old_logprobs", dict(old_logprobs=old[:, :5])),
        (TypeError, "old_logprobs", dict(old_logprobs=old.int())),
        (ValueError, "advantages", dict(advantages=adv[:2])),
        (ValueError, "mask", dict(mask=mask[:, 1:])),
        (ValueError, "mode", dict(mode="trpo")),
        (ValueError, "agg", dict(agg="mean")),
        (ValueError, "clip_low", dict(clip_low=-0.1)),
        (ValueError, "clip_low", dict(clip_low=1.5)),
        (TypeError, "clip_high", dict(clip_high="0.2")),
        (ValueError, "clip_dual", dict(clip_dual=0.9)),
        (ValueError, "clip_dual", dict(mode="sapo", clip_dual=3.0)),
        (ValueError, "tau_neg", dict(tau_neg=0.0)),
        (ValueError, "ref_logprobs", dict(kl_coef=0.1)),
        (ValueError, "ref_logprobs", dict(ref_logprobs=batch.ref[:2])),
        (ValueError, "kl_estimator", dict(ref_logprobs=batch.ref, kl_estimator="k4")),
        (ValueError, "entropy", dict(entropy_coef=0.1)),
        (ValueError, "entropy", dict(top_entropy_quantile=0.5)),
        (ValueError, "top_entropy_quantile", dict(entropy=batch.ent, top_entropy_quantile=1.5)),
        (ValueError, "num_tokens", dict(agg="seq-mean-token-mean", num_tokens=5)),
        (ValueError, "num_seqs", dict(num_seqs=5)),
        (ValueError, "num_tokens", dict(num_tokens=0)),
        (ValueError, "num_tokens", dict(num_tokens=torch.ones(2, device=device))),
        (ValueError, "norm_length", dict(norm_length=10)),
        (ValueError, "dp_size", dict(dp_size=0)),
        (ValueError, "importance_weights", dict(importance_weights=batch.w.t())),
        (ValueError, "backend", dict(backend="tpu")),
        (ValueError, "cu_seqlens", dict(cu_seqlens=torch.tensor([0, 3], device=device))),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    flat, flat_old = lp.reshape(-1), old.reshape(-1)
    for cu in ([0, 5, 3, 24], [0, 5, 30], [-1, 5, 24]):  # decreasing, past N, negative
        with pytest.raises(ValueError, match="cu_seqlens"):
            call(logprobs=flat, old_logprobs=flat_old, advantages=adv[:2], mask=None,
                 cu_seqlens=torch.tensor(cu, device=device))  # fmt: skip
    with pytest.raises(ValueError, match="norm_length"):
        call(logprobs=flat, old_logprobs=flat_old, advantages=adv[:2], mask=None, agg="seq-mean-token-sum-norm",
             cu_seqlens=torch.tensor([0, 5, 24], device=device))  # fmt: skip
    with pytest.raises(ValueError, match="mask"):
        call(mask=mask.float() * 0.5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        lk.kl_penalty(lp, batch.ref[:1], backend=backend)
    with pytest.raises(ValueError, match="kl_estimator"):
        lk.kl_penalty(lp, batch.ref, "k5", backend=backend)
    with pytest.raises(TypeError, match="entropy"):
        lk.policy_loss_from_logits(torch.randn(3, 8, 5, device=device), torch.zeros(3, 8, dtype=torch.long,
                                   device=device), old, adv, mask, entropy=batch.ent, backend=backend)  # fmt: skip


def test_unavailable_backend_says_why():
    with pytest.raises(lk.BackendUnavailableError, match="cuda"):
        lk.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), backend="cuda")
    assert "policy_loss" in lk.explain_backend("policy_loss", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_batch_accuracy(backend, device):
    """fp32 accumulation over ~1e5 tokens stays within the derived tolerance."""
    batch = policy_batch(64, 2000, device=device)
    for mode in ("ppo", "gspo", "gmpo"):
        kw = full_kwargs(batch, mode=mode)
        check(run_policy(batch, backend, **kw), expect_policy(batch, **kw), device)
