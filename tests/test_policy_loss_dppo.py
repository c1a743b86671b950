"""The verl 0.9.1 objectives ``dppo_tv``, ``dppo_kl`` (DPPO-Binary-TV / -KL, arXiv 2602.04879) and
``dro`` as policy_loss modes: every backend against the float64 reference (value, every metric,
both gradients) on fresh random inputs, the reference against verl's own
``compute_policy_loss_{dppo_tv,dppo_kl,dro}`` (called with a stand-in config), the trust region's
boundaries, p near 1 for the binary KL, the ratio truncation C (``clip_dual``), and the checks of
``dro_beta``.
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
from lenkernels.ops.policy_loss_args import PolicyConfig, PolicyInputs, kernel_tokens
from lenkernels.reference import policy_loss as ref
from tests.test_cuda_ops import cuda_emulation, emulated_modules  # noqa: F401 (a fixture cuda_emulation reads)
from tests.test_policy_loss import check, full_kwargs
from tests.utils import HAS_CUDA, assert_close, backend_params, expect_policy, policy_batch, run_policy, trainer_module

# without a GPU the CUDA kernels also run under the host emulation (tests/test_cuda_ops.py; -k emulated)
BACKENDS = backend_params("policy_loss") + ([] if HAS_CUDA else [pytest.param("cuda", "cpu", id="emulated")])
NEW_MODES = ("dppo_tv", "dppo_kl", "dro")
DPPO = ("dppo_tv", "dppo_kl")


@pytest.fixture(autouse=True)
def _emulated_cuda(request, monkeypatch):
    """The "emulated" backend param: the cuda backend on CPU tensors for the test (skips without nvcc)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "emulated" in callspec.id.split("-"):
        with cuda_emulation(request, monkeypatch):
            yield
    else:
        yield


def mode_kwargs(mode: str, **kw) -> dict:
    """The arguments a mode needs (dro: dro_beta)."""
    return {"mode": mode, **({"dro_beta": 0.3} if mode == "dro" else {}), **kw}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", ref.AGGS)
@pytest.mark.parametrize("mode", NEW_MODES)
def test_new_modes_every_aggregation(backend, device, mode, agg):
    """Each new mode under each aggregation with every optional term (KL, entropy bonus, importance
    weights), a mask with an all-masked and a one-token row and NaN/inf under it; per-token
    advantages for the token aggregations, per-sequence for the seq-mean ones. dppo: the truncation
    C = 2 caps part of the tokens (spread 1 in log space also puts tokens on both sides of the trust
    region); dro: beta = 0.3."""
    batch = policy_batch(5, 37, per_token_adv=agg in ("token-mean", "token-sum"), device=device)
    kw = full_kwargs(batch, **mode_kwargs(mode, agg=agg, clip_dual=2.0 if mode in DPPO else None))
    got = run_policy(batch, backend, **kw)
    check(got, expect_policy(batch, **kw), device, backend)
    if mode in DPPO:  # the grid exercises what it claims to
        out = got[0]
        assert float(out.clip_frac_low) + float(out.clip_frac_high) > 0 and float(out.clip_frac_dual) > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", NEW_MODES)
def test_new_modes_packed(backend, device, mode):
    """Packed [N] with cu_seqlens (an empty sequence, a one-token one, one long enough for several
    programs, tokens outside every sequence), per-sequence then per-token advantages, against the
    reference computed per sequence padded; tokens outside every sequence get 0."""
    lens = [0, 1, 260, 17]
    n = sum(lens) + 2
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    flat = policy_batch(1, n, garbage=False)
    mask = torch.rand(n) > 0.2
    bad = torch.where(torch.rand(n) > 0.5, float("nan"), -float("inf"))
    columns = {k: torch.where(mask, getattr(flat, k)[0], bad) for k in ("lp", "old", "ref", "ent", "w")}
    batch = SimpleNamespace(**columns, mask=mask, adv=torch.randn(len(lens)))
    for per_token in (False, True):
        b = SimpleNamespace(**vars(batch))
        if per_token:
            b.adv = torch.where(mask, torch.randn(n), bad)
        for key in ("lp", "old", "mask", "ref", "ent", "w", "adv"):
            setattr(b, key, getattr(b, key).to(device))
        kw = full_kwargs(b, **mode_kwargs(mode, cu_seqlens=cu.to(device), agg="seq-mean-token-mean"))
        got = run_policy(b, backend, **kw)
        check(got, expect_policy(b, **kw), device, backend)
        assert bool((got[1][sum(lens) :] == 0).all()), "tokens outside every sequence get no gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_low_precision_inputs(backend, device):
    """bf16 logprobs (gradient in bf16), fp16 old logprobs: each read in its own dtype."""
    batch = policy_batch(4, 19, device=device, dtype=torch.bfloat16)
    batch.old = batch.old.to(torch.float16)
    for mode in NEW_MODES:
        kw = full_kwargs(batch, **mode_kwargs(mode))
        got = run_policy(batch, backend, **kw)
        assert got[1].dtype == torch.bfloat16
        check(got, expect_policy(batch, **kw), device, backend)


# --- verl's own functions ------------------------------------------------------------------------


class VerlConfig(dict):
    """What verl's compute_policy_loss_* read of an ActorConfig: attributes and ``.get``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.__dict__ = self


def verl_loss(mode, batch, agg, clip_low, clip_high, clip_ratio_c=None, dro_beta=None, weights=None):
    """verl's function in float64 on the batch: (loss, d loss / d logprobs, metrics)."""
    core = trainer_module("verl.trainer.ppo.core_algos")
    fn = {"dppo_tv": core.compute_policy_loss_dppo_tv, "dppo_kl": core.compute_policy_loss_dppo_kl,
          "dro": core.compute_policy_loss_dro}[mode]  # fmt: skip
    cfg = VerlConfig(clip_ratio=clip_low, clip_ratio_low=clip_low, clip_ratio_high=clip_high, global_batch_info={},
                     policy_loss=SimpleNamespace(dro_beta=dro_beta))  # fmt: skip
    if clip_ratio_c is not None:
        cfg["clip_ratio_c"] = clip_ratio_c  # absent: verl's fallback 20
    lp = batch.lp.double().requires_grad_(True)
    adv = batch.adv.double()
    adv = adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv
    w = None if weights is None else weights.double()
    loss, metrics = fn(batch.old.double(), lp, adv, batch.mask.double(), loss_agg_mode=agg, config=cfg,
                       rollout_is_weights=w)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", NEW_MODES)
def test_matches_verl(backend, device, mode):
    """Loss, gradient and verl's metrics against verl 0.9.1's own compute_policy_loss_* (float64):
    pg_clipfrac = clip_frac_low + clip_frac_high, pg_clipfrac_lower = clip_frac_dual, ppo_kl =
    approx_kl (|l| < 20 here, where verl's clamp is the identity). Asymmetric thresholds, rollout
    IS weights; C = 1.5 and verl's fallback C = 20 (no clip_ratio_c in the config)."""
    batch = policy_batch(5, 33, spread=1.5, garbage=False)  # verl multiplies by the mask: no NaN
    batch.old[3, :4] = batch.lp[3, :4] - torch.tensor([4.0, 5.0, 3.5, 6.0])  # r > 20 ...
    batch.mask[3, :4], batch.adv[3] = True, -1.0  # ... inside the region (A < 0, p > p_old)
    cases = [("token-mean", 0.15, 0.25, 1.5), ("seq-mean-token-mean", 0.2, 0.2, None),
             ("seq-mean-token-sum-norm", 0.1, 0.3, 3.0)]  # fmt: skip
    for agg, low, high, c in cases:
        beta = {"dro": 0.4}.get(mode)
        want, e_grad, metrics = verl_loss(mode, batch, agg, low, high, c, beta, weights=batch.w)
        kw = dict(mode=mode, agg=agg, importance_weights=batch.w.to(device), with_entropy=False)
        kw.update(dict(clip_low=low, clip_high=high, clip_dual=c) if mode in DPPO else dict(dro_beta=beta))
        dev = SimpleNamespace(**{k: v.to(device) for k, v in vars(batch).items()})
        out, grad, _ = run_policy(dev, backend, g=1.0, **kw)
        assert_close(out.loss, want, rtol=2e-5, atol=1e-6 * max(1.0, abs(float(want))), name=f"{agg} loss")
        assert_close(grad, e_grad, rtol=2e-5, atol=1e-6 * float(e_grad.abs().max()), name=f"{agg} dlogprobs")
        assert_close(out.approx_kl, torch.tensor(metrics["actor/ppo_kl"]), rtol=1e-5, atol=1e-6, name="ppo_kl")
        if mode in DPPO:
            clipfrac = out.clip_frac_low + out.clip_frac_high
            assert_close(clipfrac, torch.tensor(metrics["actor/pg_clipfrac"]), rtol=1e-5, atol=1e-7, name="clipfrac")
            assert_close(out.clip_frac_dual, torch.tensor(metrics["actor/pg_clipfrac_lower"]), rtol=1e-5, atol=1e-7,
                         name="clipfrac_lower")  # fmt: skip
            assert 0.0 < float(clipfrac) < 1.0 and float(out.clip_frac_dual) > 0.0


# --- the trust region's edges ----------------------------------------------------------------------


def _binary_kl(p, p_old):
    return p_old * (math.log(p_old) - math.log(p)) + (1 - p_old) * math.log((1 - p_old + 1e-8) / (1 - p + 1e-8))


def _solve(f, target, a, b):
    """p in [a, b] with f(p) = target (f monotone there), by bisection in float64."""
    fa = f(a) - target
    for _ in range(200):
        m = 0.5 * (a + b)
        if (f(m) - target > 0) == (fa > 0):
            a, fa = m, f(m) - target
        else:
            b = m
    return 0.5 * (a + b)


def _edge_batch(mode, device, eps_low=0.2, eps_high=0.2, delta=1e-3):
    """One row per side of the region: A > 0 with p above p_old, A < 0 with p below, each token just
    inside (divergence eps - delta) or just outside (eps + delta), p_old in {0.3, 0.5, 0.7}; returns
    the batch and the expected inside flags."""
    lp, old, adv, inside = [], [], [], []
    for sign, eps in ((1.0, eps_high), (-1.0, eps_low)):
        for p_old in (0.3, 0.5, 0.7):
            for target, keep in ((eps - delta, True), (eps + delta, False)):
                if mode == "dppo_tv":
                    p = p_old + sign * target
                    if not 0.0 < p < 1.0:
                        continue
                elif sign > 0:
                    p = _solve(lambda q, p_old=p_old: _binary_kl(q, p_old), target, p_old, 1.0 - 1e-12)
                else:
                    p = _solve(lambda q, p_old=p_old: -_binary_kl(q, p_old), -target, 1e-12, p_old)
                lp.append(math.log(p))
                old.append(math.log(p_old))
                adv.append(sign * 0.8)
                inside.append(keep)

    def f32(x):
        return torch.tensor([x], dtype=torch.float32).to(device)

    batch = SimpleNamespace(lp=f32(lp), old=f32(old), adv=f32(adv), mask=torch.ones(1, len(lp), dtype=torch.bool,
                            device=device), ent=f32([1.0] * len(lp)))  # fmt: skip
    return batch, torch.tensor(inside)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", DPPO)
def test_trust_region_edges(backend, device, mode):
    """Tokens 1e-3 inside and outside each threshold (eps_low on the A < 0 side, eps_high on the
    A > 0 side): exactly the inside ones keep a gradient (-A sg(r)), and the clip fractions count the
    outside ones by the sign of A."""
    batch, inside = _edge_batch(mode, device, eps_low=0.15, eps_high=0.25)
    kw = dict(mode=mode, clip_low=0.15, clip_high=0.25, with_entropy=False)
    out, grad, _ = run_policy(batch, backend, g=1.0, **kw)
    check((out, grad, None), expect_policy(batch, g=1.0, **kw), device, backend)
    kept = grad[0].cpu() != 0
    assert torch.equal(kept, inside), f"kept {kept.tolist()} != expected {inside.tolist()}"
    adv = batch.adv[0].cpu()
    n = inside.numel()
    assert float(out.clip_frac_high) == pytest.approx(float((~inside & (adv > 0)).sum()) / n, abs=1e-7)
    assert float(out.clip_frac_low) == pytest.approx(float((~inside & (adv < 0)).sum()) / n, abs=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", DPPO)
def test_threshold_zero_is_inclusive(backend, device, mode):
    """eps = 0 with logprob == old_logprob on every token: the divergence is exactly 0 in any
    precision and the comparisons are inclusive (<=, >=), so every token is inside (none clipped)
    and the loss equals reinforce's (r = 1, no truncation); A = 0 takes the A <= 0 side."""
    batch = policy_batch(3, 17, per_token_adv=True, device=device)
    batch.old = batch.lp.clone()
    batch.adv[2, :5] = 0.0
    kw = dict(mode=mode, clip_low=0.0, clip_high=0.0)
    out, grad, d_h = run_policy(batch, backend, **kw)
    check((out, grad, d_h), expect_policy(batch, **kw), device, backend)
    assert float(out.clip_frac_low) == 0.0 and float(out.clip_frac_high) == 0.0 and float(out.clip_frac_dual) == 0.0
    base, base_grad, _ = run_policy(batch, backend, mode="reinforce")
    assert_close(out.loss, base.loss, rtol=1e-6, name="loss vs reinforce")
    assert_close(grad, base_grad, rtol=1e-6, atol=1e-30, name="dlogprobs vs reinforce")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_binary_kl_near_p_one(backend, device):
    """p and p_old within 1e-5 of 1 (logprobs in -[1e-8, 1e-5]), where fp32 exp rounds p to a
    multiple of 6e-8 and verl's formula evaluated in fp32 misclassifies tokens: the kernels (1 - p
    as -expm1(logprob), p <= p_old as logprob <= old_logprob) agree with the float64 definition.
    The threshold is the median divergence; tokens within 1e-3 (relative) of it are masked out."""
    g = torch.Generator().manual_seed(7)
    n = 600
    lp = (-(10 ** (-torch.rand(4, n, generator=g, dtype=torch.float64) * 3 - 5))).float()
    old = (-(10 ** (-torch.rand(4, n, generator=g, dtype=torch.float64) * 3 - 5))).float()
    adv = torch.randn(4, n, generator=g)

    def binary_kl(lp, old):  # verl's expression
        p, p_old = lp.exp(), old.exp()
        return p_old * (old - lp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))

    def inside(lp, old, eps):
        kl, p, p_old = binary_kl(lp, old), lp.exp(), old.exp()
        return torch.where(adv > 0, (kl <= eps) | (p <= p_old), (kl <= eps) | (p >= p_old))

    kl64 = binary_kl(lp.double(), old.double())
    eps = float(kl64.median())
    mask = (kl64 - eps).abs() > 1e-3 * eps
    want = inside(lp.double(), old.double(), eps)
    naive = inside(lp, old, eps)  # verl's formula in fp32
    assert int((naive != want)[mask].sum()) > 10, "the batch must be one that fp32 gets wrong"
    batch = SimpleNamespace(lp=lp.to(device), old=old.to(device), adv=adv.to(device), mask=mask.to(device),
                            ent=torch.ones(4, n, device=device))  # fmt: skip
    kw = dict(mode="dppo_kl", clip_low=eps, clip_high=eps, agg="token-sum", with_entropy=False)
    out, grad, _ = run_policy(batch, backend, g=1.0, **kw)
    check((out, grad, None), expect_policy(batch, g=1.0, **kw), device, backend)
    kept = (grad.cpu() != 0) & mask
    assert torch.equal(kept, want & mask)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", DPPO)
def test_truncation(backend, device, mode):
    """min(r, C) with no gradient through it: C = clip_dual, default 20. Tokens with r in (20, e^20]
    (and one past the +-20 log-ratio clamp) are truncated at 20 with the default, counted in
    clip_frac_dual when inside the region; A < 0 keeps them inside (p - p_old >= 0 > -eps)."""
    batch = policy_batch(2, 9, device=device, garbage=False)
    batch.mask[:] = True
    batch.adv = torch.tensor([-1.0, -0.5], device=device)
    batch.lp = torch.full((2, 9), -0.5, device=device)
    batch.old = batch.lp - torch.tensor([0.0, 0.5, 1.0, 2.0, 3.5, 5.0, 10.0, 19.0, 25.0], device=device)
    for c in (None, 1.5):
        kw = dict(mode=mode, clip_dual=c, with_entropy=False)
        out, grad, _ = run_policy(batch, backend, g=1.0, **kw)
        check((out, grad, None), expect_policy(batch, g=1.0, **kw), device, backend)
        ratio = (batch.lp - batch.old).clamp(-20, 20).exp().cpu()
        cap = 20.0 if c is None else c
        want = -batch.adv.cpu()[:, None] * ratio.clamp(max=cap) / 18  # token-mean over 18 tokens
        assert_close(grad.cpu(), want, rtol=1e-5, name="dlogprobs")
        assert float(out.clip_frac_dual) == pytest.approx(float((ratio > cap).sum()) / 18, abs=1e-7)
        assert float(out.clip_frac_low) == 0.0 and float(out.clip_frac_high) == 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dro_unclamped_log_ratio(backend, device):
    """dro's penalty uses the log-ratio unclamped (verl): |l| up to 30, gradient beta l - A; the
    ratio statistics use the clamped ratio like every token mode; no clip fractions."""
    batch = policy_batch(3, 21, device=device)
    batch.old[:, :4] = batch.lp[:, :4] - torch.tensor([30.0, -30.0, 21.0, 0.0], device=device)
    for beta in (1e-3, 0.5, 4.0):
        kw = full_kwargs(batch, mode="dro", dro_beta=beta)
        out, grad, d_h = run_policy(batch, backend, **kw)
        check((out, grad, d_h), expect_policy(batch, **kw), device, backend)
        assert float(out.clip_frac_low) == float(out.clip_frac_high) == float(out.clip_frac_dual) == 0.0


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input(backend, device):
    """dro_beta: required (> 0, finite, a real number) for dro, refused elsewhere; clip_dual of the
    dppo modes is a truncation C > 0; clip_low above 1 is a valid divergence threshold there."""
    batch = policy_batch(3, 8, device=device)

    def call(**kw):
        return lk.policy_loss(batch.lp, batch.old, batch.adv, batch.mask, backend=backend, **kw)

    cases = [
        (ValueError, "dro_beta", dict(mode="dro")),
        (ValueError, "dro_beta", dict(mode="dro", dro_beta=None)),
        (ValueError, "dro_beta", dict(mode="dro", dro_beta=-0.1)),
        (ValueError, "dro_beta", dict(mode="dro", dro_beta=0.0)),
        (ValueError, "dro_beta", dict(mode="dro", dro_beta=float("nan"))),
        (ValueError, "dro_beta", dict(mode="dro", dro_beta=float("inf"))),
        (TypeError, "dro_beta", dict(mode="dro", dro_beta=True)),
        (TypeError, "dro_beta", dict(mode="dro", dro_beta="0.1")),
        (TypeError, "dro_beta", dict(mode="dro", dro_beta=torch.tensor(0.1))),
        (ValueError, "dro_beta", dict(mode="ppo", dro_beta=0.1)),
        (ValueError, "dro_beta", dict(mode="dppo_tv", dro_beta=0.1)),
        (ValueError, "clip_dual", dict(mode="dro", dro_beta=0.1, clip_dual=3.0)),
        (ValueError, "clip_dual", dict(mode="dppo_tv", clip_dual=0.0)),
        (ValueError, "clip_dual", dict(mode="dppo_kl", clip_dual=-2.0)),
        (ValueError, "clip_dual", dict(mode="dppo_kl", clip_dual=float("nan"))),
        (TypeError, "clip_dual", dict(mode="dppo_kl", clip_dual=True)),
        (ValueError, "clip_low", dict(mode="dppo_kl", clip_low=-0.1)),
        (ValueError, "mode", dict(mode="dppo")),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    assert torch.isfinite(call(mode="dppo_kl", clip_low=1.5, clip_high=2.0, clip_dual=0.5).loss)
    assert torch.isfinite(call(mode="dro", dro_beta=2).loss)  # an int is a number


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unknown_mode_code_raises(backend, device):
    """A mode code outside the enum (a config built around the checks) raises on every backend's
    launcher instead of falling back to some mode."""
    batch = policy_batch(2, 8, device=device)
    t = kernel_tokens(PolicyInputs(batch.lp, batch.old, batch.adv, batch.mask))
    cfg = PolicyConfig(mode=Mode.DRO, dro_beta=0.5)
    object.__setattr__(cfg, "mode", max(Mode) + 1)
    stats = torch.zeros(ops.NUM_STATS, device=device)
    seq = torch.zeros((2, ops.NUM_SEQ_VALUES), device=device)
    with pytest.raises(ValueError, match=r"(?i)mode"):
        _backend.kernels(backend, "policy_loss").policy_loss_fwd(t, cfg, stats, seq)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_and_compile(backend, device):
    """The custom op's schema carries dro_beta (the last PolicyConfig field): opcheck on dro and
    dppo_kl, and torch.compile(fullgraph=True) of a dppo_tv step matches eager."""
    batch = policy_batch(3, 10, device=device, garbage=False)
    for mode, extra in ((Mode.DRO, dict(dro_beta=0.7)), (Mode.DPPO_KL, dict(clip_dual=20.0))):
        cfg = PolicyConfig(mode=mode, clip_low=0.2, clip_high=0.28, agg=Agg.TOKEN_MEAN, kl_est=KLEstimator.K3,
                           kl_coef=0.1, entropy_coef=0.01, norm_source=NormSource.NORM_COUNTED, **extra)  # fmt: skip
        inputs = PolicyInputs(batch.lp.clone().requires_grad_(True), batch.old, batch.adv, batch.mask, None, batch.ref,
                              batch.ent.clone().requires_grad_(True), batch.w, None, None)  # fmt: skip
        torch.library.opcheck(torch.ops.lenkernels.policy_loss.default, ops.op_args(inputs, cfg, backend))

    def step(lp):
        out = lk.policy_loss(lp, batch.old, batch.adv, batch.mask, mode="dppo_tv", clip_dual=3.0, backend=backend)
        return out.loss, out.clip_frac_high

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        lp = batch.lp.clone().requires_grad_(True)
        loss, clip = fn(lp)
        loss.backward()
        results.append((loss.detach(), clip, lp.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
