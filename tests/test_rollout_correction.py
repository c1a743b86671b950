"""Rollout correction (SPEC 8): every level x mode x layout on every backend against the float64
reference, NaN/inf handling, empty sequences and tokens outside every sequence, determinism, and
the mappings of verl's and TRL's corrections pinned against the trainers' own formulas.

Backends: reference, cpu, triton (the interpreter on CPU tensors) and cuda on a GPU; without a GPU
the CUDA C++ kernels run on the host through ``lenkernels.cuda.host_emulation`` ("cuda-emulated",
skipped saying so where nvcc is absent): the very kernel bodies, thread by thread, with the GPU's
reduction order.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import lenkernels as lk
from lenkernels import _backend, _build
from lenkernels import cuda as lk_cuda
from lenkernels._codes import CorrectionLevel, CorrectionMode
from lenkernels.ops.rollout_correction import FAMILY, CorrectionConfig
from lenkernels.reference import rollout_correction as ref
from tests.utils import STAT_RTOL, assert_close, backend_params, nan_like, trainer_module

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")
METRICS = ref.STAT_NAMES
INF, NAN = float("inf"), float("nan")


def _backends():
    """(backend, device) fixture params: the family's backends, plus the emulated CUDA kernels."""
    params = [pytest.param(p.values, id=p.id, marks=p.marks) for p in backend_params(FAMILY)]
    marks = (
        ()
        if _build.find_nvcc() is not None
        else (pytest.mark.skip(reason="nvcc not found: no CUDA module to emulate"),)
    )
    if not torch.cuda.is_available():  # the CUDA kernels' bodies on the host
        params.append(pytest.param(("cuda-emulated", "cpu"), id="cuda-emulated", marks=marks))
    return params


@pytest.fixture(params=_backends())
def run(request, monkeypatch):
    """``run(*args, **kw)``: lk.rollout_correction on the parametrised backend (inputs moved to its
    device), results back on the CPU."""
    backend, device = request.param
    if backend == "cuda-emulated":
        real_status = _backend.backend_status

        def status(family, dev):  # the cuda backend accepts CPU tensors while emulated
            out = real_status(family, dev)
            if family == FAMILY and torch.device(dev).type == "cpu":
                out["cuda"] = (True, "")
            return out

        monkeypatch.setattr(_backend, "backend_status", status)

    def call(*args, **kw):
        args = [a.to(device) if torch.is_tensor(a) else a for a in args]
        kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
        out = lk.rollout_correction(*args, backend="cuda" if backend == "cuda-emulated" else backend, **kw)
        return lk.RolloutCorrection(*(t.cpu() for t in out))

    call.backend = backend
    # planned as for a 4-SM GPU; the bodies run one host thread per GPU thread
    with lk_cuda.host_emulation(sm_count=4) if backend == "cuda-emulated" else contextlib.nullcontext():
        yield call


# --- inputs ------------------------------------------------------------------------------------------


def _padded(B=6, T=53, spread=0.5, dtype=torch.float32):
    """Padded inputs with the awkward cases on purpose: row 0 has no response token, row 1 one; row 2
    holds a token 30 nats off each way (past verl's ±20 clamp); NaN/inf at non-response positions
    (never read). ``spread`` is the std of δ (small for sequence levels: a sum of T of them)."""
    old = -torch.rand(B, T) * 3
    rollout = old - torch.randn(B, T) * spread
    mask = torch.rand(B, T) > 0.2
    mask[0] = False
    mask[1] = False
    mask[1, T // 3] = True
    rollout[2, 5], rollout[2, 9] = old[2, 5] - 30.0, old[2, 9] + 30.0
    mask[2, 5] = mask[2, 9] = True
    bad = torch.where(torch.rand(B, T) > 0.5, NAN, -INF)
    old = torch.where(mask, old, bad)
    rollout = torch.where(mask, rollout, bad.flip(0))
    return old.to(dtype), rollout.to(dtype), mask


def _packed(spread=0.5, dtype=torch.float32):
    """Packed [N] inputs: an empty sequence, a one-token one, one without response tokens, and
    tokens after the last sequence (they belong to none)."""
    n = 300
    old = -torch.rand(n) * 3
    rollout = old - torch.randn(n) * spread
    mask = torch.rand(n) > 0.2
    cu = torch.tensor([0, 40, 40, 41, 120, 200, 250, 290])
    mask[200:250] = False
    rollout[60] = old[60] - 30.0
    mask[60] = True
    bad = torch.where(torch.rand(n) > 0.5, NAN, INF)
    old, rollout = torch.where(mask, old, bad), torch.where(mask, rollout, -bad)
    return old.to(dtype), rollout.to(dtype), mask, cu


def _flat(old, rollout, mask, cu=None):
    cu = ref.padded_offsets(old.shape[0], old.shape[1]) if cu is None else cu
    return old.reshape(-1), rollout.reshape(-1), mask.reshape(-1), cu


def _expected(old, rollout, mask, cu, **kw):
    """The float64 reference from the same (possibly low-precision) values, flat."""
    o, r, m, c = _flat(old, rollout, mask, cu)
    hi = kw.get("threshold", 2.0)
    cfg = dict(level=CorrectionLevel[kw.get("level", "token").upper()],
               mode=CorrectionMode[kw.get("mode", "truncate").upper()], lo=kw.get("threshold_low") or 0.0,
               hi=INF if hi is None else hi, log_clamp=kw.get("log_clamp", 20.0))  # fmt: skip
    veto = kw.get("veto")
    if veto is not None:
        veto = (veto[0] or 0.0, INF if veto[1] is None else veto[1])
    return ref.rollout_correction(o.double(), r.double(), m, c, veto=veto, **cfg), (o, r, m, c)


def _error_scale(flat, level: str):
    """Per token: the magnitude fp32 rounding of a correct kernel grows with, relative to the
    weight: |δ| (token), Σ|δ| of the sequence (sequence), that over its response tokens (geometric)."""
    o, r, m, c = flat
    delta = (o.double() - r.double()).abs()
    delta = torch.where(m, delta, torch.zeros_like(delta))
    if level == "token":
        return 1.0 + delta
    seq = ref.sequence_of_token(c, o.numel())
    idx = seq.clamp(min=0)
    inside = (seq >= 0) & m
    total = torch.zeros(c.numel() - 1, dtype=torch.float64).index_add(0, idx, torch.where(inside, delta, 0.0))
    n = torch.zeros(c.numel() - 1, dtype=torch.float64).index_add(0, idx, inside.double())
    per = total if level == "sequence" else total / n.clamp(min=1)
    return 1.0 + (per[idx] if per.numel() else delta)


def _check(got, want, flat, level, name=""):
    """Weights within the scaled fp32 tolerance, identical masks and counts, metrics within theirs."""
    e = _error_scale(flat, level)
    w = want["weights"]
    assert torch.equal(got.mask.reshape(-1), want["mask"]), (
        f"{name}: masks differ at {(got.mask.reshape(-1) != want['mask']).nonzero()[:5].tolist()}"
    )
    assert_close(got.weights.reshape(-1), w, rtol=STAT_RTOL, scale=w.abs() * e, name=f"{name} weights")
    kept = want["mask"]
    scale_kept = torch.where(kept, w.abs() * e, torch.zeros_like(w))
    n_kept = max(int(kept.sum()), 1)
    o, r, m, _ = flat
    delta = torch.where(m, o.double() - r.double(), torch.zeros_like(w))
    n_tok = max(int(m.sum()), 1)
    scales = {
        "weight_mean": float(scale_kept.sum()) / n_kept,
        "weight_min": float(scale_kept.max()) if kept.any() else 0.0,
        "weight_max": float(scale_kept.max()) if kept.any() else 0.0,
        "kl_k1": float(delta.abs().sum()) / n_tok,
        "kl_k3": float((torch.expm1(delta) - delta).abs().sum() + (delta * torch.expm1(delta)).abs().sum()) / n_tok,
    }
    for metric in METRICS:
        value = getattr(got, metric)
        assert value.shape == () and value.dtype == torch.float32, metric
        assert_close(value, want[metric], rtol=STAT_RTOL, scale=scales.get(metric, 0.0), name=f"{name} {metric}")


# --- against the float64 reference ------------------------------------------------------------------


# (threshold_low, threshold) per level: a share of the weights falls outside on each side (the
# geometric mean of T token weights spreads ~1/sqrt(T) as much as one of them)
BOUNDS = {"token": (0.6, 1.4), "sequence": (0.4, 2.5), "geometric": (0.97, 1.03)}


@pytest.mark.parametrize("veto", [None, (0.25, 4.0)], ids=["no_veto", "veto"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_matches_reference(run, level, mode, layout, veto):
    """Fresh random inputs; thresholds chosen so that a good share of the weights is truncated or
    rejected; the veto catches the tokens 30 nats off."""
    spread = 0.5 if level == "token" else 0.12
    if layout == "padded":
        old, rollout, mask = _padded(spread=spread)
        cu, kw_layout = None, {}
    else:
        old, rollout, mask, cu = _packed(spread=spread)
        kw_layout = {"cu_seqlens": cu}
    lo, hi = BOUNDS[level]
    kw = dict(level=level, mode=mode, threshold=hi, threshold_low=lo, veto=veto)
    got = run(old, rollout, mask, **kw, **kw_layout)
    want, flat = _expected(old, rollout, mask, cu, **kw)
    _check(got, want, flat, level, f"{level}/{mode}/{layout}")
    assert got.weights.shape == old.shape and got.mask.shape == old.shape and got.mask.dtype == torch.bool
    # properties beside allclose: rejected and non-response tokens have weight exactly 1
    assert bool((got.weights[~got.mask] == 1.0).all())
    kept_w = got.weights[got.mask]
    if mode == "truncate":
        assert bool(((kept_w >= lo) & (kept_w <= hi)).all())
    if mode == "mask" and kept_w.numel():
        assert bool(((kept_w >= lo * (1 - 1e-6)) & (kept_w <= hi * (1 + 1e-6))).all())
    assert not bool(got.mask[~mask].any()), "only response tokens are kept"
    if level != "token":  # one weight per sequence
        rows = [got.weights.reshape(-1)[s:e][got.mask.reshape(-1)[s:e]] for s, e in _spans(old, cu)]
        assert all(bool((r == r[0]).all()) for r in rows if r.numel())


def _spans(old, cu):
    if cu is None:
        T = old.shape[1]
        return [(b * T, (b + 1) * T) for b in range(old.shape[0])]
    return list(zip(cu[:-1].tolist(), cu[1:].tolist()))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                    (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp16_fp32", "fp32_bf16"])  # fmt: skip
@pytest.mark.parametrize("level", LEVELS)
def test_low_precision_inputs(run, level, dtypes):
    """Each input in its own dtype, read as is (no conversion copies): the statistics of the same
    low-precision values within the fp32 tolerance."""
    old, rollout, mask = _padded(spread=0.5 if level == "token" else 0.12)
    old, rollout = old.to(dtypes[0]), rollout.to(dtypes[1])
    kw = dict(level=level, mode="mask", threshold=1.5, threshold_low=0.5)
    got = run(old, rollout, mask, **kw)
    want, flat = _expected(old, rollout, mask, None, **kw)
    _check(got, want, flat, level, str(dtypes))


def test_float64_on_the_reference_backend():
    old, rollout, mask = _padded()
    out = lk.rollout_correction(old.double(), rollout.double(), mask, backend="reference")
    assert out.weights.dtype == torch.float32
    with pytest.raises(TypeError, match="old_logprobs"):
        lk.rollout_correction(old.double(), rollout.double(), mask, backend="cpu")


# --- NaN, inf, empty sequences ----------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_nan_propagates_to_its_token_or_sequence(run, level):
    """A NaN log-prob of a response token is never rejected: its weight (token level) or its
    sequence's (sequence levels) is NaN and kept, the weight statistics and the KL are NaN; every
    other row keeps the bits it has without the NaN. Garbage at non-response positions changes nothing."""
    old, rollout, mask = _padded(spread=0.5 if level == "token" else 0.12)
    mask[3, 7] = True
    old[3, 7], rollout[3, 7] = -1.0, -1.1
    kw = dict(level=level, mode="mask", threshold=1.5, threshold_low=0.5)
    base = run(old, rollout, mask, **kw)
    bad = old.clone()
    bad[3, 7] = NAN
    got = run(bad, rollout, mask, **kw)
    nan_tokens = torch.zeros_like(mask)
    if level == "token":
        nan_tokens[3, 7] = True
    else:
        nan_tokens[3] = mask[3]
    assert bool(torch.isnan(got.weights[nan_tokens]).all()) and bool(got.mask[nan_tokens].all())
    assert torch.equal(got.weights[~nan_tokens], base.weights[~nan_tokens])
    assert torch.equal(got.mask[~nan_tokens], base.mask[~nan_tokens])
    for metric in ("weight_mean", "weight_min", "weight_max", "kl_k1", "kl_k3"):
        assert math.isnan(float(getattr(got, metric))), metric
    assert float(got.masked_tokens) == float((mask & ~got.mask).sum())
    # the garbage at non-response positions of _padded (NaN, -inf) is never read
    scrubbed = run(torch.where(mask, old, 0.0), torch.where(mask, rollout, 0.0), mask, **kw)
    assert torch.equal(scrubbed.weights, base.weights) and torch.equal(scrubbed.mask, base.mask)
    assert all(torch.equal(getattr(scrubbed, m), getattr(base, m)) for m in METRICS)


def test_infinite_logprobs(run):
    """δ = ±inf is a legal value (a token the other side gives probability 0): clamped to ±20 by
    default (weight exp(20) truncated to the threshold, exp(-20) kept), rejected in mask mode
    without a clamp; the KL estimates say inf / NaN (verl's exp(δ) - δ - 1 of +inf is NaN)."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5]])
    rollout = torch.tensor([[-INF, -2.0, -0.5, -1.5]])
    got = run(old, rollout, level="token", mode="truncate", threshold=2.0)
    assert got.weights.tolist() == [[2.0, 1.0, 1.0, 1.0]] and bool(got.mask.all())
    assert float(got.truncated_fraction) == 0.25 and float(got.kl_k1) == -INF and math.isnan(float(got.kl_k3))
    got = run(old, rollout, level="token", mode="mask", threshold=2.0, log_clamp=INF)
    assert got.mask.tolist() == [[False, True, True, True]] and got.weights.tolist() == [[1.0] * 4]
    got = run(rollout, old, level="sequence", mode="truncate", threshold=2.0)  # δ = -inf: exp(-20)
    assert_close(got.weights, torch.full((1, 4), math.exp(-20)), rtol=STAT_RTOL, name="exp(-20)")
    assert float(got.kl_k1) == INF and float(got.kl_k3) == INF


def test_empty_sequences_and_tokens_outside_every_sequence(run):
    """Packed offsets with empty sequences and tokens before/after them: those tokens get weight 1
    and mask 0; an all-masked batch has metrics 0 (no kept token, no response token)."""
    old, rollout, mask, _ = _packed()
    cu = torch.tensor([10, 10, 50, 50, 200])
    got = run(old, rollout, mask, cu_seqlens=cu, level="geometric", mode="mask", threshold=1.3)
    outside = torch.ones(old.shape[0], dtype=torch.bool)
    outside[10:200] = False
    assert bool((got.weights[outside] == 1.0).all()) and not bool(got.mask[outside].any())
    want, flat = _expected(old, rollout, mask, cu, level="geometric", mode="mask", threshold=1.3)
    _check(got, want, flat, "geometric", "packed subset")
    none = run(old, rollout, torch.zeros_like(mask), cu_seqlens=cu, level="sequence", mode="mask")
    assert bool((none.weights == 1.0).all()) and not bool(none.mask.any())
    assert all(float(getattr(none, m)) == 0.0 for m in METRICS)
    no_seq = run(old, rollout, mask, cu_seqlens=torch.tensor([0]), level="token")
    assert bool((no_seq.weights == 1.0).all()) and all(float(getattr(no_seq, m)) == 0.0 for m in METRICS)


def test_padded_equals_packed_bitwise(run):
    """A row's weights, masks and the metrics do not depend on the layout: the padded batch and
    its packed form (cu_seqlens = arange(B + 1) * T) run the same per-sequence reductions."""
    old, rollout, mask = _padded(spread=0.12)
    for level in LEVELS:
        kw = dict(level=level, mode="truncate", threshold=1.3, threshold_low=0.8, veto=(0.1, 10.0))
        padded = run(old, rollout, mask, **kw)
        packed = run(*_flat(old, rollout, mask)[:3], cu_seqlens=ref.padded_offsets(*old.shape), **kw)
        assert torch.equal(padded.weights.reshape(-1), packed.weights) and torch.equal(
            padded.mask.reshape(-1), packed.mask
        )
        assert all(torch.equal(getattr(padded, m), getattr(packed, m)) for m in METRICS), level


def test_deterministic(run):
    old, rollout, mask = _padded(spread=0.12)
    a = run(old, rollout, mask, level="sequence", mode="mask", threshold=3.0, veto=(0.2, None))
    b = run(old, rollout, mask, level="sequence", mode="mask", threshold=3.0, veto=(0.2, None))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cpu_independent_of_thread_count():
    """Each sequence is reduced by one thread in a fixed order and the sequences merge pairwise in
    order: the bits do not depend on the thread count (2^18 tokens: several threads engage)."""
    B, T = 512, 512
    old = -torch.rand(B, T) * 3
    rollout = old - torch.randn(B, T) * 0.1
    mask = torch.rand(B, T) > 0.1
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(lk.rollout_correction(old, rollout, mask, level="geometric", threshold=1.05, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for out in outs[1:] for x, y in zip(outs[0], out))


def test_launcher_writes_every_output(run):
    """The backend launcher fills NaN-initialised weights and stats completely (a padded layout: every
    token belongs to a sequence)."""
    backend = "cuda" if run.backend == "cuda-emulated" else run.backend
    device = "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"
    old, rollout, mask = _padded()
    o, r, m, cu = (t.to(device) for t in _flat(torch.where(mask, old, 0.0), torch.where(mask, rollout, 0.0), mask))
    weights, stats = nan_like(o.float()), torch.full((9,), NAN, device=device)
    keep = torch.ones_like(m)
    cfg = CorrectionConfig(CorrectionLevel.SEQUENCE, CorrectionMode.MASK, 0.5, 2.0, 20.0, True, 0.1, 10.0)
    _backend.kernels(backend, FAMILY).rollout_correction_fwd(o, r, m, cu, cfg, weights, keep, stats)
    assert not bool(torch.isnan(weights).any()) and not bool(torch.isnan(stats).any())
    assert not bool(keep[~m].any())
    with pytest.raises(ValueError):  # a code outside its enum raises, on every backend
        bad = CorrectionConfig(7, CorrectionMode.MASK)
        _backend.kernels(backend, FAMILY).rollout_correction_fwd(o, r, m, cu, bad, weights, keep, stats)


def test_weights_carry_no_gradient():
    old, rollout, mask = _padded()
    old = torch.where(mask, old, 0.0).requires_grad_(True)
    out = lk.rollout_correction(old, rollout, mask, backend="cpu")
    assert not out.weights.requires_grad and not out.weight_mean.requires_grad


def test_opcheck_and_torch_compile():
    old, rollout, mask = _padded()
    o, r, m, cu = _flat(torch.where(mask, old, 0.0), torch.where(mask, rollout, 0.0), mask)
    args = (o, r, m, cu, 1, 1, 0.5, 2.0, 20.0, True, 0.1, 10.0, False, "cpu")
    torch.library.opcheck(torch.ops.lenkernels.rollout_correction.default, args)

    def step(old, rollout, mask):
        rc = lk.rollout_correction(old, rollout, mask, level="sequence", mode="mask", threshold=2.0, backend="cpu")
        return rc.weights * rc.mask, rc.kl_k3

    eager = step(old, rollout, mask)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(old, rollout, mask)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# --- the trainers' formulas ------------------------------------------------------------------------


def _trainer_batch(level):
    """fp32 inputs with every response token finite and a guaranteed response token (verl refuses
    none); non-response positions zero-filled (verl multiplies by the mask: NaN there would leak)."""
    old, rollout, mask = _padded(spread=0.5 if level == "token" else 0.12)
    zero = torch.zeros_like(old)
    return torch.where(mask, old, zero), torch.where(mask, rollout, zero), mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, "0.5_2.0"], ids=["tis", "icepop"])
def test_verl_is_weights(level, threshold):
    """verl 0.9.1 trainer/ppo/rollout_corr_helper.py ``compute_rollout_correction_weights``
    (rollout_is=token|sequence): TIS float thresholds are mode="truncate" (verl's weights are ours
    times the mask); the IcePop "lo_hi" string is mode="mask" (verl zeroes the weight, ours rejects)."""
    helper = trainer_module("verl.trainer.ppo.rollout_corr_helper")
    old, rollout, mask = _trainer_batch(level)
    verl_w, metrics = helper.compute_rollout_correction_weights(
        old - rollout, mask.float(), rollout_is=level, rollout_is_threshold=threshold
    )
    if isinstance(threshold, float):
        ours = lk.rollout_correction(old, rollout, mask, level=level, mode="truncate", threshold=threshold)
        mine = ours.weights * mask
        for name, key in (("weight_mean", "rollout_is_mean"), ("weight_max", "rollout_is_max"),
                          ("weight_min", "rollout_is_min")):  # fmt: skip
            if level == "token" or name == "weight_mean":  # verl's sequence min/max are unclamped log-space values
                assert_close(getattr(ours, name), torch.tensor(metrics[key]), rtol=1e-5, name=key)
    else:
        ours = lk.rollout_correction(old, rollout, mask, level=level, mode="mask", threshold_low=0.5, threshold=2.0)
        mine = torch.where(ours.mask, ours.weights, 0.0)
    scale = 1.0 + (old - rollout).abs().sum(-1, keepdim=True) if level == "sequence" else 1.0
    assert_close(mine, verl_w, rtol=1e-5, scale=verl_w.abs() * scale, name="verl rollout_is_weights")


# bounds that reject some tokens and keep others: a sequence's mean log ratio varies ~1/sqrt(T) as much
@pytest.mark.parametrize("option,level,lo,hi", [("token_k1", "token", 0.7, 1.6), ("seq_sum_k1", "sequence", 0.7, 1.6),
                                                ("seq_mean_k1", "geometric", 0.98, 1.02)])  # fmt: skip
def test_verl_rejection_mask(option, level, lo, hi):
    """verl ``compute_rollout_rejection_mask`` with a k1 option and "lo_hi": k1 = -log_ratio bounds
    π_rollout/π_old to [lo, hi], i.e. our weight to [1/hi, 1/lo]; verl's modified mask is ours."""
    helper = trainer_module("verl.trainer.ppo.rollout_corr_helper")
    old, rollout, mask = _trainer_batch("token" if level == "token" else "sequence")
    verl_mask, metrics = helper.compute_rollout_rejection_mask(old - rollout, mask.float(), rollout_rs=option,
                                                               rollout_rs_threshold=f"{lo}_{hi}")  # fmt: skip
    ours = lk.rollout_correction(old, rollout, mask, level=level, mode="mask", threshold_low=1 / hi, threshold=1 / lo)
    assert torch.equal(ours.mask, verl_mask.bool())
    assert 0.0 < float(ours.masked_fraction) < 1.0, "the thresholds must reject some tokens and keep others"
    assert_close(ours.masked_fraction, torch.tensor(metrics["rollout_rs_masked_fraction"]), rtol=1e-6, name="masked")


def test_verl_offpolicy_kl():
    """verl ``compute_offpolicy_metrics``: ``kl`` = mean(rollout - old) and ``k3_kl`` =
    mean(exp(log_ratio) - log_ratio - 1) over response tokens are ``kl_k1`` and ``kl_k3``."""
    helper = trainer_module("verl.trainer.ppo.rollout_corr_helper")
    old, rollout, mask = _trainer_batch("token")
    mask[2, 5] = mask[2, 9] = False  # verl's fp32 exp(30) - 30 - 1 is 1e13: keep the comparison about the mean
    metrics = helper.compute_offpolicy_metrics(old, rollout, mask.float())
    ours = lk.rollout_correction(old, rollout, mask)
    delta = torch.where(mask, old - rollout, 0.0).double()
    assert_close(ours.kl_k1, torch.tensor(metrics["kl"]), rtol=1e-5, scale=float(delta.abs().mean()), name="kl")
    k3_scale = float((delta.abs() * torch.expm1(delta).abs()).sum() / mask.sum())
    assert_close(ours.kl_k3, torch.tensor(metrics["k3_kl"]), rtol=1e-5, atol=1e-7, scale=k3_scale, name="k3_kl")


def _trl_importance_sampling_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions, the
    ``if self.use_vllm and self.vllm_importance_sampling_correction:`` block (not an importable
    function; its lines, with ``completion_mask`` as the mask and no tool mask)."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


@pytest.mark.parametrize("clip_min", [None, 0.5])
@pytest.mark.parametrize("trl_mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_trl_vllm_importance_sampling(trl_mode, clip_min):
    """TRL's ``vllm_importance_sampling_mode`` (clip_max default 3.0, clip_min default None) is
    level=token|sequence, mode=truncate|mask, threshold=clip_max, threshold_low=clip_min,
    log_clamp=inf; its ratio on response tokens is ``weights`` (truncate) or ``where(mask, weights,
    0)`` (mask); in token_truncate its logged min/mean/max are ``weight_min/mean/max``."""
    trl_module = trainer_module("trl")
    assert trl_module.__version__.startswith("1.16"), f"the pinned lines are TRL 1.16's, got {trl_module.__version__}"
    level, mode = trl_mode.split("_")
    old, rollout, mask = _trainer_batch(level)
    trl_ratio = _trl_importance_sampling_ratio(old, rollout, mask.float(), trl_mode, clip_min, 3.0)
    ours = lk.rollout_correction(old, rollout, mask, level=level, mode=mode, threshold=3.0, threshold_low=clip_min,
                                 log_clamp=math.inf)  # fmt: skip
    mine = ours.weights if mode == "truncate" else torch.where(ours.mask, ours.weights, 0.0)
    expected = trl_ratio.expand_as(old)
    scale = 1.0 + (old - rollout).abs().sum(-1, keepdim=True) if level == "sequence" else 1.0
    assert_close(mine[mask], expected[mask], rtol=1e-5, scale=(expected.abs() * scale)[mask], name=trl_mode)
    if trl_mode == "token_truncate":
        flat = trl_ratio[mask]
        for name, value in (("weight_min", flat.min()), ("weight_mean", flat.mean()), ("weight_max", flat.max())):
            assert_close(getattr(ours, name), value, rtol=1e-5, name=name)
