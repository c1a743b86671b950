"""Drop-ins accept what the originals accept: every drop-in of lenkernels.integrations.verl and
lenkernels.integrations.trl is called with the installed original on the same float64, float32,
bfloat16 and float16 inputs (bool, integer and float masks), and must give the original's dtype,
shape and device, and its numbers: to float64 precision for float64 inputs (the drop-ins compute
those in float64), to a few units of the inputs' precision otherwise (the originals round every
bfloat16 intermediate; the drop-ins compute in float32 and round once).

The verl cases need verl (``pip install --no-deps verl==0.9.1`` plus what its algorithm modules
import), the TRL cases TRL; each set skips on its own without its trainer.
"""

from __future__ import annotations

import importlib.util
import math
import uuid

import numpy as np
import pytest
import torch

from lenkernels.integrations import trl as lk_trl
from lenkernels.integrations import verl as lk_verl
from tests.utils import assert_close

# each trainer's tests skip on their own when it is not installed; installed but not importing fails
VERL_MISSING = None if importlib.util.find_spec("verl") else "verl is not installed (pip install --no-deps verl==0.9.1)"
TRL_MISSING = None if importlib.util.find_spec("trl") else "trl is not installed (pip install trl)"
if VERL_MISSING is None:
    import verl.trainer.ppo.core_algos as core
    import verl.utils.torch_functional as verl_F
    import verl.workers.config as verl_config
    from verl.trainer.config import AlgoConfig
if TRL_MISSING is None:
    import trl.trainer.utils as trl_utils
needs_verl = pytest.mark.skipif(VERL_MISSING is not None, reason=str(VERL_MISSING))
needs_trl = pytest.mark.skipif(TRL_MISSING is not None, reason=str(TRL_MISSING))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.bool, torch.int64, torch.float32)
AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def tolerance(dtype: torch.dtype, scale: float) -> dict:
    """How far the original and the drop-in may be apart for inputs of ``dtype``; ``scale`` is the
    magnitude of the terms the result is made of (a cancelling sum is exact only to those)."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12 * (1.0 + scale))
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-6 * (1.0 + scale))
    eps = torch.finfo(dtype).eps  # the original rounds its intermediates to this precision
    return dict(rtol=4 * eps, atol=4 * eps * (1.0 + scale))


def same(ours, theirs, name: str, dtype: torch.dtype, scale: float = 0.0, **tol):
    """Same dtype, shape and device as the original's result, and close numbers."""
    assert isinstance(ours, torch.Tensor), f"{name}: {type(ours).__name__}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, the original's is {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)}, the original's is {tuple(theirs.shape)}"
    assert ours.device == theirs.device, f"{name}: device {ours.device}, the original's is {theirs.device}"
    kw = tolerance(dtype, scale)
    kw.update(tol)
    assert_close(ours.detach().double(), theirs.detach().double(), name=name, **kw)


def grads(fn, inputs: list, grad_of: int = 0, weight=None):
    """``fn(*inputs)`` and d(sum(weight * out))/d inputs[grad_of] (out: the first output)."""
    args = list(inputs)
    x = args[grad_of].detach().clone().requires_grad_(True)
    args[grad_of] = x
    out = fn(*args)
    first = out[0] if isinstance(out, tuple) else out
    w = torch.ones_like(first) if weight is None else weight.to(first.dtype)
    (first * w).sum().backward()
    return out, x.grad


# --- verl: token statistics ----------------------------------------------------------------------


def same_over_dtypes(calls, logits32, g, name: str, *, scale: float, grad_scale: float):
    """For every dtype of DTYPES: ``calls`` (ours, theirs) of ``logits32`` in it, their outputs and
    logits gradients (cotangent ``g``) the same in that dtype."""
    for dtype in DTYPES:
        logits = logits32.to(dtype)
        (out, d), (out_t, d_t) = (grads(f, [logits], weight=g) for f in calls)
        same(out, out_t, f"{dtype} {name}", dtype, scale=scale)
        same(d, d_t, f"{dtype} d logits", dtype, scale=grad_scale)


# (rows, with labels) of each function; both compute in the logits' dtype
TOKEN_FNS = {"logprobs_from_logits": ((3, 5), True), "entropy_from_logits": ((4, 3), False)}


@needs_verl
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", TOKEN_FNS)
def test_verl_token_stats_dtypes(device, fn):
    """verl returns the logits' dtype: logprobs on its eager path (float32 from flash-attn's kernel on
    CUDA), entropy on every device."""
    rows, with_labels = TOKEN_FNS[fn]
    logits32 = torch.randn(*rows, 64, device=device) * 3
    labels = torch.randint(0, 64, rows, device=device) if with_labels else None
    g = torch.randn(*rows, device=device)
    if with_labels:
        calls = [
            lambda x, f=f: f(x, labels, inplace_backward=False)
            for f in (lk_verl.logprobs_from_logits, verl_F.logprobs_from_logits)
        ]
    else:
        calls = [lk_verl.entropy_from_logits, verl_F.entropy_from_logits]
    same_over_dtypes(calls, logits32, g, fn, scale=9.0, grad_scale=float(g.abs().max()))


@needs_verl
@pytest.mark.parametrize("device", DEVICES)
def test_verl_entropy_with_chunking_dtypes(device):
    """verl's chunked entropy computes in float32 and returns float32 for every logits dtype."""
    logits32 = torch.randn(11, 64, device=device) * 3
    for dtype in DTYPES:
        logits = logits32.to(dtype)
        ours = lk_verl.entropy_from_logits_with_chunking(logits, chunk_size=4)
        theirs = verl_F.entropy_from_logits_with_chunking(logits, chunk_size=4)
        # both are float32 maths of the same values
        same(ours, theirs, f"{dtype} chunked entropy", torch.float32, scale=9.0)
    empty = torch.randn(0, 64, device=device)
    same(lk_verl.entropy_from_logits_with_chunking(empty), verl_F.entropy_from_logits_with_chunking(empty), "empty",
         torch.float32)  # fmt: skip


# --- verl: KL, aggregation, policy losses ----------------------------------------------------------


@needs_verl
@pytest.mark.parametrize("device", DEVICES)
def test_verl_kl_penalty_dtypes(device):
    """verl's KL has the promoted dtype of its two inputs (mixed dtypes included)."""
    lp32 = -torch.rand(4, 13, device=device) * 3
    ref32 = lp32 + torch.randn(4, 13, device=device)
    g = torch.randn(4, 13, device=device)
    pairs = [(d, d) for d in DTYPES] + [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)]
    for lp_dtype, ref_dtype in pairs:
        lp, ref = lp32.to(lp_dtype), ref32.to(ref_dtype)
        for name in ("kl", "abs", "mse", "low_var_kl", "k3+"):
            (kl, d), (kl_v, d_v) = (grads(lambda x, f=f: f(x, ref, name), [lp], weight=g)
                                    for f in (lk_verl.kl_penalty, core.kl_penalty))  # fmt: skip
            # verl computes in the promoted dtype; k3's exp(delta) - delta - 1 cancels terms of size
            # e^|delta| (delta up to ~4)
            dtype = torch.promote_types(lp_dtype, ref_dtype)
            same(kl, kl_v, f"{lp_dtype}/{ref_dtype} {name}", dtype, scale=60.0)
            grad_dtype = lp_dtype if lp_dtype in (torch.bfloat16, torch.float16) else dtype  # rounded to lp's
            same(d, d_v, f"{lp_dtype}/{ref_dtype} {name} d logprob", grad_dtype, scale=60.0)


@needs_verl
@pytest.mark.parametrize("device", DEVICES)
def test_verl_agg_loss_dtypes(device):
    """agg_loss's dtype is verl's promotion of ``loss_mat * loss_mask`` (float32 at least in the
    seq-mean modes), divided by its normalisers; bool, integer and float masks."""
    B, T = 5, 17
    values32 = torch.randn(B, T, device=device)
    keep = torch.rand(B, T, device=device) > 0.3
    keep[0] = False  # an all-masked row
    keep[1, 0] = True
    for dtype in DTYPES:
        values = values32.to(dtype)
        for mask_dtype in MASK_DTYPES:
            mask = keep.to(mask_dtype)
            for mode in AGGS:
                normalisers = [{}, dict(batch_num_tokens=torch.tensor(40, device=device),
                                        global_batch_size=torch.tensor(7.0, device=device), dp_size=2)]  # fmt: skip
                for kw in normalisers:
                    name = f"{dtype} mask {mask_dtype} {mode} {sorted(kw)}"
                    (loss, d), (loss_v, d_v) = (grads(lambda x, f=f: f(x, mask, mode, **kw), [values])
                                                for f in (lk_verl.agg_loss, core.agg_loss))  # fmt: skip
                    same(loss, loss_v, f"{name} loss", dtype, scale=float(T))
                    same(d, d_v, f"{name} d loss_mat", dtype)


def actor_config(**kw):
    return verl_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **kw)


def same_metrics(ours: dict, theirs: dict, name: str):
    assert list(ours) == list(theirs), (name, list(ours), list(theirs))
    for key in theirs:
        assert isinstance(ours[key], float), (name, key, type(ours[key]))
        assert math.isclose(ours[key], theirs[key], rel_tol=1e-5, abs_tol=1e-6), (name, key, ours[key], theirs[key])


@needs_verl
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(lk_verl.POLICY_LOSSES) + ["reinforce"])
def test_verl_policy_losses_dtypes(device, name):
    """The policy losses return verl's dtype (its per-token loss's promoted through agg_loss; the
    geometric mean's plain mean) for every input dtype, with bool and float masks."""
    B, T = 5, 23
    lp32 = -torch.rand(B, T, device=device) * 3
    old32 = lp32 + torch.randn(B, T, device=device) * 0.3
    adv32 = torch.randn(B, T, device=device)
    w32 = torch.rand(B, T, device=device) + 0.5
    keep = torch.rand(B, T, device=device) > 0.3
    keep[1] = False
    keep[1, 3] = True
    clip = dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4) if name == "gspo" else {}
    cfg = actor_config(**clip)
    ours_fn = lk_verl.compute_policy_loss_reinforce if name == "reinforce" else lk_verl.POLICY_LOSSES[name]
    their_fn = core.compute_policy_loss_reinforce if name == "reinforce" else core.get_policy_loss_fn(name)
    for dtype in DTYPES:
        lp, old, adv, w = (x.to(dtype) for x in (lp32, old32, adv32, w32))
        for mask_dtype in (torch.bool, torch.float32 if dtype != torch.float64 else torch.float64):
            mask = keep.to(mask_dtype)
            for mode, weights in (("token-mean", None), ("seq-mean-token-mean", w)):
                label = f"{name} {dtype} mask {mask_dtype} {mode}"
                tol = {}
                if dtype == torch.float64 and (name in ("geo_mean", "sapo") or mode.startswith("seq-mean")):
                    # verl's per-sequence means divide by ``mask.sum(-1) + 1e-8``: n + 1e-8 with a
                    # float64 mask, a float32 n otherwise (the 1e-8 rounds away); the float64
                    # definition divides by n (geo_mean: by n + 1e-8). Each sequence's term is a
                    # relative 1e-8 / n apart (sapo always aggregates seq-mean-token-mean).
                    tol = dict(rtol=2e-8, atol=2e-8 * 10.0)
                ours, theirs = (grads(lambda x, f=f: f(old, x, adv, mask, mode, cfg, weights), [lp])
                                for f in (ours_fn, their_fn))  # fmt: skip
                (loss, metrics), d = ours
                (loss_v, metrics_v), d_v = theirs
                same(loss, loss_v, f"{label} loss", dtype, scale=10.0, **tol)
                if dtype in (torch.float64, torch.float32):
                    same(d, d_v, f"{label} d log_prob", dtype, scale=1.0, **tol)
                    same_metrics(metrics, metrics_v, label)
                else:  # half-precision ratios move tokens across clip bounds: the loss is continuous
                    # there, its gradient and the clip fractions are not
                    assert d.dtype == d_v.dtype and d.shape == d_v.shape, (label, d.dtype, d_v.dtype)


# --- verl: advantages ---------------------------------------------------------------------------------


def verl_batch(sizes, T, device):
    """Dense random token rewards, and outcome rewards (one per response, on its last token) that
    half precision holds exactly, all distinct: verl sums half rewards in half precision, which
    would reorder near-equal scores (Pass@k's best response)."""
    labels = [str(uuid.uuid4()) for _ in sizes]
    index = np.array([labels[g] for g, n in enumerate(sizes) for _ in range(n)], dtype=object)
    B = len(index)
    lengths = torch.randint(1, T + 1, (B,))
    keep = torch.arange(T)[None] < lengths[:, None]
    dense = torch.randn(B, T) * 0.5
    outcome = torch.zeros(B, T)
    outcome[torch.arange(B), lengths - 1] = torch.randperm(B).float() * 0.25 - 1.0
    return dense.to(device), outcome.to(device), keep.to(device), index


@needs_verl
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(lk_verl.ADVANTAGE_ESTIMATORS))
def test_verl_advantages_dtypes(device, name):
    """The advantages have verl's dtype: the rewards' times the mask's, promoted (grpo_vectorized:
    at least float32; rloo_vectorized: float64 for half rewards, from verl's bincount)."""
    sizes = [3, 2, 4, 2] if name == "grpo_passk" else [3, 1, 4, 2]
    dense, outcome, keep, index = verl_batch(sizes, 11, device)
    for dtype in DTYPES:
        rewards = (dense if dtype in (torch.float64, torch.float32) else outcome).to(dtype)
        # float64 rewards come with a float64 mask: verl then computes everything in float64
        # (with a float32 mask its whitening's Bessel factor is a float32 number)
        masks = (torch.float64, torch.bool) if dtype == torch.float64 else (torch.float32, torch.bool)
        for mask_dtype in masks:
            mask = keep.to(mask_dtype)
            kw = dict(response_mask=mask, index=index, config=AlgoConfig())
            adv, ret = lk_verl.ADVANTAGE_ESTIMATORS[name](token_level_rewards=rewards.clone(), **kw)
            adv_v, _ = core.get_adv_estimator_fn(name)(token_level_rewards=rewards.clone(), **kw)
            tol = {}
            if dtype == torch.float64:
                if name == "grpo_vectorized":
                    tol = dict(rtol=1e-6, atol=1e-6)  # verl rounds its group means and stds to float32
                elif name == "grpo":
                    tol = dict(rtol=1e-7)  # verl's std of a group of one: a float32 1.0, so 1 + eps in float32
                elif name == "reinforce_plus_plus_baseline" and mask_dtype == torch.bool:
                    tol = dict(rtol=1e-6, atol=1e-6)  # the Bessel factor of a bool mask's count: float32 in verl
                elif name == "reinforce_plus_plus_baseline":
                    tol = dict(rtol=1e-8, atol=1e-9)  # verl's masked means divide by the count + 1e-8
            same(adv, adv_v, f"{name} {dtype} mask {mask_dtype}", dtype, scale=10.0, **tol)
            assert ret is adv


# --- verl: empty batches -------------------------------------------------------------------------------


@needs_verl
def test_verl_empty_batches_give_verls_results():
    """Empty loss matrices: verl sums nothing (0); the fused op's empty-batch error must not
    reach verl (a micro-batch can be empty)."""
    cfg = actor_config()
    for shape in ((0, 7), (3, 0)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x, mask = torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=torch.bool)
            same(lk_verl.agg_loss(x, mask, "token-sum"), core.agg_loss(x, mask, "token-sum"), "token-sum", dtype)
            kw = dict(batch_num_tokens=5, global_batch_size=2)
            # (with T = 0 verl's seq-mean-token-sum-norm divides by T: NaN; the drop-in gives 0)
            for mode in AGGS if shape[1] else AGGS[:-1]:
                same(lk_verl.agg_loss(x, mask, mode, **kw), core.agg_loss(x, mask, mode, **kw), mode, dtype)
            for name in ("vanilla", "gpg", "cispo"):
                ours = lk_verl.POLICY_LOSSES[name](x, x, x, mask, "token-sum", cfg)
                theirs = core.get_policy_loss_fn(name)(x, x, x, mask, "token-sum", cfg)
                same(ours[0], theirs[0], f"{name} {shape}", dtype)


# --- TRL: token statistics -----------------------------------------------------------------------


def trl_logits(device, lead=(3, 7), vocab=48):
    return torch.randn(*lead, vocab, device=device) * 3, torch.randint(0, vocab, lead, device=device)


@needs_trl
@pytest.mark.parametrize("device", DEVICES)
def test_trl_selective_log_softmax_dtypes(device):
    """TRL returns the logits' dtype on its eager path (CPU, float64, top-K ids, float row masks)
    and float32 from its fused Triton kernel (CUDA); one id or K ids per row, row masks of every
    dtype, a temperature."""
    logits32, index = trl_logits(device)
    topk = torch.randint(0, logits32.shape[-1], (3, 7, 4), device=device)
    keep = torch.rand(3, 7, device=device) > 0.3
    g = torch.randn(3, 7, device=device)
    for dtype in DTYPES:
        logits = logits32.to(dtype)
        for row_mask in (None, keep, keep.long(), keep.float()):
            for idx in (index, topk):
                rm = row_mask if row_mask is None or idx.dim() == 2 else row_mask[..., None].expand(idx.shape)
                weight = g if idx.dim() == 2 else g[..., None].expand(idx.shape)
                label = f"{dtype} row_mask {None if rm is None else rm.dtype} ids {tuple(idx.shape)}"
                fns = (lk_trl.selective_log_softmax, trl_utils.selective_log_softmax)
                (lp, d), (lp_t, d_t) = (grads(lambda x, f=f: f(x, idx, 0.7, rm), [logits], weight=weight)
                                        for f in fns)  # fmt: skip
                same(lp, lp_t, f"{label} logprobs", dtype, scale=15.0)
                same(d, d_t, f"{label} d logits", dtype, scale=4.0)


@needs_trl
@pytest.mark.parametrize("device", DEVICES)
def test_trl_entropy_from_logits_dtypes(device):
    logits32, _ = trl_logits(device)
    g = torch.randn(3, 7, device=device)
    calls = (lk_trl.entropy_from_logits, trl_utils.entropy_from_logits)
    same_over_dtypes(calls, logits32, g, "entropy", scale=15.0, grad_scale=4.0)


@needs_trl
@pytest.mark.parametrize("device", DEVICES)
def test_trl_selective_log_softmax_and_entropy_dtypes(device):
    logits32, index = trl_logits(device)
    keep = torch.rand(3, 7, device=device) > 0.3
    g = torch.randn(3, 7, device=device)
    for dtype in DTYPES:
        logits = logits32.to(dtype)
        for row_mask in (None, keep, keep.float()):
            label = f"{dtype} row_mask {None if row_mask is None else row_mask.dtype}"

            def run(fn):
                x = logits.detach().clone().requires_grad_(True)
                lp, h = fn(x, index, True, 0.7, row_mask)
                ((lp.double() + 0.5 * h.double()) * g.double()).sum().backward()
                return lp, h, x.grad

            ours = run(lk_trl.selective_log_softmax_and_entropy)
            theirs = run(trl_utils.selective_log_softmax_and_entropy)
            for a, b, what, scale in zip(ours, theirs, ("logprobs", "entropy", "d logits"), (15.0, 15.0, 4.0)):
                same(a, b, f"{label} {what}", dtype, scale=scale)
