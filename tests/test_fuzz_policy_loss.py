"""Property-based tests of policy_loss, kl_penalty and policy_loss_from_logits: random padded and
packed layouts (empty and one-token sequences, tokens outside every sequence), dtypes, strides,
modes, aggregations, clips, KL estimators, entropy terms, importance weights, normalisers and masks,
on every backend, against the float64 reference (value, every metric and both gradients).

The compiled backends are cheap and get many examples; the Triton interpreter costs ~0.5 s per
forward+backward, so it gets a few (on a GPU the same tests run the Triton and CUDA kernels).
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import lenkernels as lk
from lenkernels.reference import policy_loss as ref
from lenkernels.reference import token_stats as ref_tokens
from tests.fuzz import FLOAT_DTYPES, backend_fuzz_tests, examples, leading_shapes
from tests.utils import GRAD_ATOL, GRAD_RTOL, HAS_CUDA, STAT_RTOL, assert_close, assert_policy_stats, backend_params

BACKENDS = [p.values for p in backend_params("policy_loss") if not p.marks]
DUAL_MODES = ("ppo", "gspo", "luspo", "dppo_tv", "dppo_kl")  # dppo: clip_dual is the ratio truncation C
# a ratio this close (relatively) to a clip bound may fall on either side of it in fp32: the loss is
# continuous there but its gradient and the clip fractions are not, so such draws are discarded
BOUNDARY_MARGIN = 1e-5


@st.composite
def loss_cases(draw):
    packed = draw(st.booleans())
    if packed:
        # empty and one-token sequences on purpose; tokens after the last sequence belong to none
        lengths = draw(st.lists(st.sampled_from([0, 1, 2, 7, 33]), min_size=1, max_size=5))
        lead, extra = draw(st.integers(0, 2)), draw(st.integers(0, 3))
        shape = (lead + sum(lengths) + extra,)
        assume(shape[0] > 0)  # an empty batch is an error (test_bad_input)
    else:
        lengths = None
        shape = (draw(st.integers(1, 5)), draw(st.integers(1, 40)))  # T from 1 to past a warp
    mode = draw(st.sampled_from(ref.MODES))
    return {
        "shape": shape,
        "lengths": lengths,
        "lead": lead if packed else 0,
        "dtype": draw(FLOAT_DTYPES),
        "old_dtype": draw(st.sampled_from([None, torch.float32, torch.bfloat16])),  # None: logprobs' dtype
        "layout": draw(st.sampled_from(["contiguous", "row_stride", "transposed"])),
        "mode": mode,
        "agg": draw(st.sampled_from([None, *ref.AGGS])),
        "adv": draw(st.sampled_from(["seq", "seq_column", "token"])),
        "mask": draw(st.sampled_from(["none", "bool", "float", "int64", "uint8"])),
        "masked_share": draw(st.sampled_from([0.0, 0.3, 1.0])),
        # |logprob - old_logprob|: inside the clip range, across it, past the +-20 ratio clamp
        "spread": draw(st.sampled_from([0.01, 0.3, 2.0, 30.0])),
        "clip": draw(st.sampled_from([None, (0.2, None), (0.2, 0.28), (0.0, 0.0), (1.0, 3.0), (3e-4, 4e-4)])),
        "dual": draw(st.sampled_from([None, 1.5, 3.0])) if mode in DUAL_MODES else None,
        "dro_beta": draw(st.sampled_from([0.05, 1.0])) if mode == "dro" else None,
        "taus": draw(st.sampled_from([(1.0, 1.05), (0.3, 2.0)])),
        "kl": draw(st.sampled_from([None, "k1", "abs", "k2", "k3", "k3+", "low_var_kl", "mse+", "kl"])),
        "kl_coef": draw(st.sampled_from([0.0, 0.05, -0.3])),
        "kl_clamp": draw(st.booleans()),
        "entropy": draw(st.sampled_from(["none", "metric", "coef", "quantile", "threshold", "threshold_tensor"])),
        "weights": draw(st.booleans()),
        "norm": draw(st.sampled_from(["none", "number", "tensor"])),
        "norm_length": draw(st.sampled_from([None, 17.0])),
        "dp_size": draw(st.sampled_from([1, 4])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as a padded-layout view: rows of a wider buffer (garbage around them), or
    column-major (copied once by the op)."""
    if x.dim() != 2 or layout == "contiguous":
        return x
    if layout == "row_stride":
        fill = float("nan") if x.is_floating_point() else 1
        buf = torch.full((x.shape[0], x.shape[1] + 3), fill, dtype=x.dtype)
        buf[:, 1 : x.shape[1] + 1] = x
        return buf[:, 1 : x.shape[1] + 1]
    return x.t().contiguous().t()


def _build(c, device):
    """(kwargs of lk.policy_loss, kwargs of the float64 reference on the very same values)."""
    g = torch.Generator().manual_seed(c["seed"])
    shape, dtype = c["shape"], c["dtype"]
    lp = -torch.rand(shape, generator=g) * 3
    old = lp + torch.randn(shape, generator=g) * c["spread"]
    ref_lp = lp + torch.randn(shape, generator=g) * 0.5
    k = min(2, lp.numel())
    ref_lp.view(-1)[:k] = lp.view(-1)[:k] + torch.tensor([25.0, -25.0])[:k]  # |delta| > 20: verl's k3 clamps
    ent = torch.rand(shape, generator=g) * 3
    w = torch.rand(shape, generator=g) + 0.5
    if c["lengths"] is not None:
        cu = c["lead"] + torch.tensor([0] + torch.tensor(c["lengths"]).cumsum(0).tolist())
        n_seqs = len(c["lengths"])
    else:
        cu, n_seqs = None, shape[0]
    adv = {"seq": torch.randn(n_seqs, generator=g), "seq_column": torch.randn(n_seqs, 1, generator=g),
           "token": torch.randn(shape, generator=g)}[c["adv"]]  # fmt: skip
    if c["adv"] == "seq" and cu is not None and n_seqs == shape[0]:
        adv = adv[:, None]  # packed with B == N: [B] would mean per token
    adv.view(-1)[0] = 0.0  # A = 0: neither clip side, sgn(A) = 0 (GMPO)

    valid = torch.rand(shape, generator=g) >= c["masked_share"]
    kind = c["mask"]
    mask = None
    if kind != "none":
        mask = valid.to({"bool": torch.bool, "float": torch.float32, "int64": torch.int64, "uint8": torch.uint8}[kind])
        bad = torch.where(torch.rand(shape, generator=g) > 0.5, float("nan"), float("inf"))
        for x in (lp, old, ref_lp, ent, w) + ((adv,) if c["adv"] == "token" else ()):
            x.copy_(torch.where(valid, x, bad))  # masked positions may hold anything

    def to_op(x, dt):
        return _strided(x.to(dt), c["layout"]).to(device)

    got = {"logprobs": to_op(lp, dtype), "old_logprobs": to_op(old, c["old_dtype"] or dtype),
           "advantages": to_op(adv, torch.float32), "mask": None if mask is None else to_op(mask, mask.dtype),
           "mode": c["mode"], "agg": c["agg"], "tau_pos": c["taus"][0], "tau_neg": c["taus"][1],
           "dp_size": c["dp_size"]}  # fmt: skip
    if cu is not None:
        got["cu_seqlens"] = cu.to(device)
    if c["clip"] is not None:
        got["clip_low"], got["clip_high"] = c["clip"]
        if c["mode"] == "gmpo":
            got["clip_low"] = min(got["clip_low"], 0.5)  # bounds on the log-ratio
    if c["dual"] is not None:
        got["clip_dual"] = c["dual"]
    if c["dro_beta"] is not None:
        got["dro_beta"] = c["dro_beta"]
    if c["kl"] is not None:
        got.update(ref_logprobs=to_op(ref_lp, dtype), kl_coef=c["kl_coef"], kl_estimator=c["kl"], kl_clamp=c["kl_clamp"])
    if c["entropy"] != "none":
        got["entropy"] = to_op(ent, dtype)
        extra = {"coef": {"entropy_coef": 0.02}, "quantile": {"top_entropy_quantile": 0.4},
                 "threshold": {"entropy_threshold": 1.3},
                 "threshold_tensor": {"entropy_threshold": torch.tensor([1.7], device=device)}}  # fmt: skip
        got.update(extra.get(c["entropy"], {}))
    if c["weights"]:
        got["importance_weights"] = to_op(w, dtype)
    agg = c["agg"] or ref.MODE_DEFAULTS[c["mode"]][2]
    if c["norm"] != "none" and agg != "token-sum":
        value = 5.0 + c["seed"] % 50
        key = "num_tokens" if agg == "token-mean" else "num_seqs"
        got[key] = value if c["norm"] == "number" else torch.tensor(value, device=device)
    if agg == "seq-mean-token-sum-norm" and (cu is not None or c["norm_length"] is not None):
        got["norm_length"] = c["norm_length"] or 17.0

    # the reference sees exactly the values the op sees (low-precision inputs rounded first)
    want = {k: (v.detach().cpu().to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in got.items()}  # fmt: skip
    want["mask"] = mask
    if cu is not None:
        want["cu_seqlens"] = cu
    return got, want


def _overflow(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Past the dtype's range the correctly rounded gradient is +-inf (fp16: unclamped k3 at |delta| > 20)."""
    return torch.where(e.abs() > torch.finfo(dtype).max, e.to(dtype).double(), e)


def _invalid(want) -> torch.Tensor:
    """Positions that are no token of any sequence: masked, or packed and outside every sequence."""
    lp = want["logprobs"]
    bad = torch.zeros_like(lp, dtype=torch.bool) if want["mask"] is None else want["mask"] == 0
    if want.get("cu_seqlens") is not None:
        t = torch.arange(lp.shape[0])
        bad |= (t < want["cu_seqlens"][0]) | (t >= want["cu_seqlens"][-1])
    return bad


def _margin(want) -> float:
    """Smallest relative distance of a valid token's (or sequence's) ratio to a clip bound or a clamp."""
    lp, old = want["logprobs"], want["old_logprobs"]
    mask = want["mask"]
    valid = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask != 0
    if want.get("cu_seqlens") is not None:
        lp, old = ref.unpack(lp, want["cu_seqlens"]), ref.unpack(old, want["cu_seqlens"])
        valid = ref.unpack(valid.to(torch.float64), want["cu_seqlens"]) != 0
    lp, old = torch.where(valid, lp, 0.0), torch.where(valid, old, 0.0)
    mode = want["mode"]
    low, high = ref.resolve_clip(mode, want.get("clip_low"), want.get("clip_high"))
    l = lp - old
    logs = [l[valid]]
    if mode in ("gspo", "luspo", "gmpo"):
        n = valid.sum(-1).clamp(min=1)
        logs.append((l * valid).sum(-1)[valid.any(-1)] / n[valid.any(-1)])
    logs = torch.cat([x.reshape(-1) for x in logs])
    if mode == "gmpo":
        bounds = [-low, high, -20.0, 20.0]
    else:
        ratio_bounds = [1.0 - low, 1.0 + high] + ([want["clip_dual"]] if want.get("clip_dual") else [])
        bounds = [math.log(b) for b in ratio_bounds if b > 0] + [-20.0, 20.0, 10.0]
    if mode in ("dppo_tv", "dppo_kl"):
        bounds.append(math.log(want.get("clip_dual") or ref.DPPO_TRUNCATION))
    dist = (logs[:, None] - torch.tensor(bounds, dtype=torch.float64)).abs()
    dist = dist[dist > 0]  # on a bound exactly (l = 0 against eps = 0): exact in fp32 as well
    margin = float(dist.min()) if dist.numel() else math.inf
    if mode in ("dppo_tv", "dppo_kl"):  # the trust region's divergence against its thresholds
        p, p_old = lp[valid].exp(), old[valid].exp()
        if mode == "dppo_tv":
            div = p - p_old
            bounds = [-low, high]
        else:
            div = p_old * (old[valid] - lp[valid]) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
            bounds = [low, high]
        dist = (div[:, None] - torch.tensor(bounds, dtype=torch.float64)).abs()
        dist = dist[dist > 0]  # exactly on it (l = 0 against eps = 0): exact in fp32 as well
        if dist.numel():
            margin = min(margin, float(dist.min()))
    return margin


def _check(got, want, backend, device, g):
    x = got["logprobs"].detach().clone().requires_grad_(True) if got["logprobs"].is_contiguous() else \
        got["logprobs"].detach().requires_grad_(True)  # fmt: skip
    h = got.get("entropy")
    if h is not None:
        h = h.detach().clone().requires_grad_(True)
    args = {k: v for k, v in got.items() if k not in ("logprobs", "old_logprobs", "advantages", "mask", "entropy")}
    out = lk.policy_loss(x, got["old_logprobs"], got["advantages"], got["mask"], entropy=h, backend=backend, **args)
    grads = torch.autograd.grad(out.loss * g, [x] + ([h] if h is not None else []))

    x64 = want["logprobs"].clone().requires_grad_(True)
    h64 = None if want.get("entropy") is None else want["entropy"].clone().requires_grad_(True)
    rargs = {k: v for k, v in want.items() if k not in ("logprobs", "old_logprobs", "advantages", "mask", "entropy")}
    exp = ref.policy_loss(x64, want["old_logprobs"], want["advantages"], want["mask"], entropy=h64, **rargs)
    e_grads = torch.autograd.grad(exp["loss"] * g, [x64] + ([h64] if h64 is not None else []))

    assert_policy_stats(out, exp, device)
    for d, e, name in zip(grads, e_grads, ("dlogprobs", "dentropy")):
        assert d.dtype == got["logprobs"].dtype if name == "dlogprobs" else d.dtype == got["entropy"].dtype
        tol = GRAD_RTOL[d.dtype]
        if backend == "triton" and not HAS_CUDA and d.dtype != torch.float32:
            tol *= 2  # the interpreter truncates fp32 -> bf16/fp16 (one ulp); a GPU rounds to nearest
        e = _overflow(e, d.dtype)
        # fp16 gradients keep their subnormals (spacing 2^-24): half of it is a correct rounding
        atol = GRAD_ATOL[d.dtype] + 1e-7 * float(torch.nan_to_num(e, posinf=0.0, neginf=0.0).abs().max()) + 1e-30
        assert_close(d, e, rtol=tol, atol=atol, name=name)
        assert bool((d.cpu()[_invalid(want)] == 0).all()), f"{name}: masked positions must get exactly 0, never NaN"


def _run_case(case, backend, device):
    got, want = _build(case, device)
    assume(_margin(want) > BOUNDARY_MARGIN)
    _check(got, want, backend, device, g=0.7 + case["seed"] % 3)


test_fuzz_policy_loss_compiled_and_reference, test_fuzz_policy_loss_gpu_backends = backend_fuzz_tests(
    _run_case, loss_cases(), BACKENDS, 300, 8
)


# --- kl_penalty ------------------------------------------------------------------------------------


def _run(draw) -> dict:
    """A case's input seed and its (backend, device)."""
    return {"seed": draw(st.integers(0, 2**31 - 1)), "backend": draw(st.sampled_from(BACKENDS))}


@st.composite
def kl_cases(draw):
    return {
        "lead": draw(leading_shapes(max_size=5)),
        "dtype": draw(FLOAT_DTYPES),
        "ref_dtype": draw(FLOAT_DTYPES),
        "estimator": draw(st.sampled_from(sorted(ref.KL_ESTIMATORS) + [k + "+" for k in ref.KL_ESTIMATORS])),
        "clamp": draw(st.booleans()),
        # delta = ref - logprob: tiny (the k3 series), moderate, past verl's clamps
        "spread": draw(st.sampled_from([1e-4, 0.5, 3.0, 30.0])),
        "transposed": draw(st.booleans()),
        **_run(draw),
    }


@examples(200)
@given(kl_cases())
def test_fuzz_kl_penalty(c):
    backend, device = c["backend"]
    if backend == "triton" and not HAS_CUDA and math.prod(c["lead"]) > 64:
        return  # the interpreter: keep it small
    g = torch.Generator().manual_seed(c["seed"])
    lp = (-torch.rand(c["lead"], generator=g) * 5).to(c["dtype"])
    rf = (lp.double() + torch.randn(c["lead"], generator=g, dtype=torch.float64) * c["spread"]).to(c["ref_dtype"])
    if c["transposed"] and lp.dim() >= 2:
        lp, rf = lp.mT.contiguous().mT, rf.mT.contiguous().mT  # column-major views: copied once
    x, r = lp.to(device).requires_grad_(True), rf.to(device).requires_grad_(True)
    value = lk.kl_penalty(x, r, c["estimator"], clamp=c["clamp"], backend=backend)
    assert value.dtype == torch.float32 and value.shape == lp.shape
    x64, r64 = lp.double().requires_grad_(True), rf.double().requires_grad_(True)
    v64 = ref.kl_penalty(x64, r64, c["estimator"], c["clamp"])
    assert_close(value, v64, rtol=STAT_RTOL, atol=1e-30, name="kl")
    if lp.numel() == 0:
        return
    cot = torch.randn(c["lead"], generator=g)
    d_x, d_r = torch.autograd.grad(value, (x, r), cot.to(device))
    e_x, e_r = torch.autograd.grad(v64, (x64, r64), cot.double())
    assert d_x.dtype == c["dtype"] and d_r.dtype == c["ref_dtype"]
    for d, e, name in ((d_x, e_x, "dlogprobs"), (d_r, e_r, "dref_logprobs")):
        e = _overflow(e, d.dtype)
        tol = GRAD_RTOL[d.dtype] * (2 if backend == "triton" and not HAS_CUDA and d.dtype != torch.float32 else 1)
        assert_close(d, e, rtol=tol, atol=GRAD_ATOL[d.dtype] + 1e-6 * float(cot.abs().max()), name=name)


# --- policy_loss_from_logits ---------------------------------------------------------------------


@st.composite
def logits_cases(draw):
    return {
        "shape": draw(st.sampled_from([(1, 1), (2, 5), (3, 4)])),
        "vocab": draw(st.sampled_from([1, 7, 70])),
        "dtype": draw(FLOAT_DTYPES),
        "mode": draw(st.sampled_from(ref.MODES)),
        "temperature": draw(st.sampled_from([1.0, 0.6, "per_token"])),
        "entropy_coef": draw(st.sampled_from([0.0, 0.03])),
        "quantile": draw(st.sampled_from([1.0, 0.5])),
        "ignored": draw(st.booleans()),
        **_run(draw),
    }


@examples(12)
@given(logits_cases())
def test_fuzz_policy_loss_from_logits(c):
    """The composition token_logprobs_entropy -> policy_loss against the two float64 references
    composed; d loss / d logits through both the logprob and the entropy paths."""
    backend, device = c["backend"]
    g = torch.Generator().manual_seed(c["seed"])
    (B, T), V = c["shape"], c["vocab"]
    logits = (torch.randn(B, T, V, generator=g) * 2).to(c["dtype"])
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    if c["ignored"]:
        ids[~mask] = -100  # masked rows ignored by the logprob too (their logprob is 0)
    old = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    temp = (torch.rand(B, T, generator=g) + 0.5) if c["temperature"] == "per_token" else c["temperature"]
    kw = dict(mode=c["mode"], entropy_coef=c["entropy_coef"], top_entropy_quantile=c["quantile"])
    if c["mode"] == "dro":
        kw["dro_beta"] = 0.5
    dev = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
    x = dev(logits).requires_grad_(True)
    out = lk.policy_loss_from_logits(x, dev(ids), dev(old), dev(adv), dev(mask), temperature=dev(temp),
                                     backend=backend, **kw)  # fmt: skip
    (d_x,) = torch.autograd.grad(out.loss, x)
    x64 = logits.double().requires_grad_(True)
    lp64, h64 = ref_tokens.token_logprobs_entropy(x64, ids, temp)
    exp = ref.policy_loss(lp64, old.double(), adv.double(), mask, entropy=h64, **kw)
    (e_x,) = torch.autograd.grad(exp["loss"], x64)
    assert_close(out.loss, exp["loss"], rtol=STAT_RTOL, scale=exp["scales"]["loss"] + 1e-6, name="loss")
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}[c["dtype"]]
    assert d_x.dtype == c["dtype"]
    assert_close(d_x, e_x, rtol=tol, atol=GRAD_ATOL[c["dtype"]] + 1e-6 * float(e_x.abs().max()) + 1e-30, name="dlogits")


def test_packed_quantile_ignores_tokens_outside_sequences():
    """Tokens outside [cu_seqlens[0], cu_seqlens[-1]) belong to no sequence (the documented contract):
    they must not move the (1 - rho) entropy quantile either."""
    lp = -torch.rand(6)
    ent = torch.tensor([0.5, 1.0, 2.0, 3.0, 9.0, 9.0])  # the last two tokens belong to no sequence
    cu = torch.tensor([0, 2, 4])
    kw = dict(entropy=ent, top_entropy_quantile=0.5, cu_seqlens=cu, backend="cpu")
    out = lk.policy_loss(lp, lp - 0.1, torch.ones(2), **kw)
    inside = lk.policy_loss(lp[:4], lp[:4] - 0.1, torch.ones(2), **{**kw, "entropy": ent[:4]})
    assert torch.equal(out.entropy_kept, inside.entropy_kept)
