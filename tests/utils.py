"""Shared test helpers: the backend/device matrix, the tolerance table, a comparison that
prints the worst element, and the checks and inputs that several test files share."""

from __future__ import annotations

import contextlib
import ctypes
import math
from types import SimpleNamespace

import pytest
import torch

import lenkernels as lk
from lenkernels import _backend
from lenkernels._codes import Agg, Mode
from lenkernels.ops.policy_loss import NUM_SEQ_VALUES, NUM_STATS
from lenkernels.ops.policy_loss_args import PolicyConfig, PolicyInputs, kernel_tokens
from lenkernels.reference import policy_loss as ref_pl

HAS_CUDA = torch.cuda.is_available()
GPU_BACKENDS = ("triton", "cuda")


def backend_params(family: str):
    """pytest params of (backend, device): GPU backends on CUDA tensors when a GPU is present (on
    the Triton interpreter otherwise), cpu and reference on CPU tensors. A backend that cannot run
    here is skipped with the reason the backend resolver gives."""
    params = []
    for name in _backend.BACKENDS:
        device = "cuda" if (name in GPU_BACKENDS and HAS_CUDA) else "cpu"
        ok, why = _backend.backend_status(family, device)[name]
        marks = () if ok else (pytest.mark.skip(reason=f"{name}: {why}"),)
        params.append(pytest.param(name, device, id=name, marks=marks))
    return params


# Statistics (fp32 outputs, accumulated in fp32) are compared with the float64 reference computed
# from the same (possibly low-precision) input values, so one tolerance serves every input dtype.
STAT_RTOL = 1e-5
# Gradients are written in the input dtype: rounding to it costs up to half an ulp.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float64: 1e-12}
# ... and probabilities below fp32's normal range (2^-126) may be flushed to zero (GPUs compute with
# FTZ; the CPU exp does the same), which the factor |z - mean_z| / T of the entropy gradient can
# lift by a few decades: 1e-30 absolute is far below any gradient that matters. fp16 outputs keep
# their subnormals (spacing 2^-24).
GRAD_ATOL = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 2.0**-24, torch.float64: 0.0}


def assert_close(actual, expected, *, rtol, atol=0.0, scale=None, name="value"):
    """|actual - expected| <= atol + rtol * (|expected| + scale), elementwise; NaNs must coincide.

    ``scale`` is the magnitude of the terms a reduction summed (|z_y| + |lse| for a logprob, say):
    the error a correct fp32 computation makes grows with it, not with the result.
    """
    out_dtype = actual.dtype
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if out_dtype.is_floating_point and out_dtype != torch.float64:
        # a value past the output dtype's range is inf once rounded to it (exp(100) in fp32)
        big = expected.abs() > torch.finfo(out_dtype).max
        expected = torch.where(big, expected.to(out_dtype).to(torch.float64), expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN mismatch at {idx}: actual {actual[tuple(idx)]}, expected {expected[tuple(idx)]}")
    ok = ~nan_e
    a, e = actual[ok], expected[ok]
    if e.numel() == 0:
        return
    s = torch.zeros_like(e) if scale is None else torch.as_tensor(scale, dtype=torch.float64).cpu().expand(expected.shape)[ok]
    same = a == e  # covers equal infinities
    err = torch.where(same, torch.zeros_like(a), (a - e).abs())
    bound = atol + rtol * (e.abs() + s)
    ratio = torch.where(same, torch.zeros_like(err), err / bound)
    worst = int(ratio.argmax())
    if ratio[worst] > 1:
        flat = ok.reshape(-1).nonzero().reshape(-1)[worst]
        idx = list(torch.unravel_index(flat, expected.shape)) if expected.dim() else []
        raise AssertionError(
            f"{name}: worst element {[int(i) for i in idx]}: actual {a[worst].item():.9g}, expected "
            f"{e[worst].item():.9g}, |diff| {err[worst].item():.3g} > bound {bound[worst].item():.3g} "
            f"({int((ratio > 1).sum())} of {e.numel()} elements out of tolerance)"
        )


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """A buffer filled with NaN so elements a kernel forgets to write show up."""
    return torch.full_like(x, float("nan"))


def token_grad_scale(logits, ids, temp, g_lp, g_h, ignore_index):
    """Sum of |terms| of SPEC 1's gradient per element: the scale its fp32 error grows with."""
    z = logits.double().cpu() / (temp.double().cpu().unsqueeze(-1) if torch.is_tensor(temp) else temp)
    p = torch.softmax(z, -1)
    mean_z = (p * torch.where(torch.isneginf(z), 0, z)).sum(-1, keepdim=True)
    valid = (ids.cpu() != ignore_index).unsqueeze(-1)
    glp = (g_lp.double().cpu().unsqueeze(-1) * valid).abs()
    onehot = torch.zeros_like(z).scatter_(-1, torch.where(valid, ids.cpu().unsqueeze(-1), 0), 1.0) * valid
    ent = torch.where(p > 0, p * ((z - mean_z).abs() + 1), 0)
    inv_t = 1 / temp.double().cpu().unsqueeze(-1) if torch.is_tensor(temp) else 1 / temp
    return (glp * (onehot + p) + g_h.double().cpu().unsqueeze(-1).abs() * ent) * inv_t



def load_replay(path):
    """The host replay of the CUDA token-statistics kernels (tests/cuda_host_replay.cu, built as the
    shared library ``path``), its entry points typed for ctypes."""
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.lk_replay_split_count.argtypes = [i64, i64, i64, i64]
    lib.lk_replay_fwd.argtypes = [ptr, i32, i64, i64, i64, ptr, i32, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.lk_replay_bwd.argtypes = [
        ptr, i32, i64, i64, i64, ptr, i32, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i32,
    ]  # fmt: skip
    return lib

def trainer_close(actual, expected, name, rtol=2e-5, scale=0.0):
    """A drop-in's result against the trainer's original. Both sides are fp32 computations of one
    formula: they may differ by a few ulps of the largest term, hence an absolute floor at 1e-6 of
    the largest expected magnitude, or of ``scale``: the size of the terms a scalar loss summed
    (they may cancel to a tiny result)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(float(expected.detach().abs().max()) if expected.numel() else 0.0, scale)
    assert_close(actual, expected, rtol=rtol, atol=1e-6 * scale + 1e-12, name=name)


def grpo_run(workdir, patch, **config):
    """Trains ``lenkernels.bench.trl_grpo.tiny_grpo_trainer(workdir, **config)`` inside ``patch`` (a
    context manager, e.g. ``lk_trl.patched()``, or None): its logged entries and final weights."""
    from lenkernels.bench.trl_grpo import tiny_grpo_trainer

    trainer = tiny_grpo_trainer(str(workdir), **config)
    with patch if patch is not None else contextlib.nullcontext():
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same_training(run, expected, name, rtol):
    """Two ``grpo_run`` results: the same logged metrics (but the step time) to ``rtol``, the same
    weights within ``trainer_close``."""
    (logs, weights), (logs_t, weights_t) = run, expected
    assert len(logs) == len(logs_t), (len(logs), len(logs_t))
    for ours, theirs in zip(logs, logs_t):
        assert ours.keys() == theirs.keys()
        for key in theirs.keys() - {"step_time"}:  # losses, grad norm, kl, entropy, clip ratios, rewards
            assert math.isclose(ours[key], theirs[key], rel_tol=rtol, abs_tol=1e-6), (name, key, ours, theirs)
    for param, w in weights_t.items():
        trainer_close(weights[param], w, f"{name} {param}", rtol=rtol)


def trainer_module(name: str):
    """A module of verl or TRL for the comparison tests: skipped when the trainer is not installed
    at all, an error when it is installed but does not import (a dependency missing from the test
    extra must fail the run, not turn every comparison into a silent skip)."""
    import importlib
    import importlib.util

    top = name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        pytest.skip(f"{top} is not installed", allow_module_level=True)
    return importlib.import_module(name)


def advantage_scale(method, s, ids, eps, w, mask=None):
    """Per-element magnitude of the terms an fp32 computation of the advantage combines: |s| and the
    group's largest |s| (the mean), times the factor applied to them (1/(std+eps), n/(n-1), the batch
    scale). The fp32 error of a correct kernel grows with this, not with the (possibly tiny) result.

    ``s``: float64 ``[B]`` scores; ``ids``: ``[B]`` group ids; ``w``: ``[B]`` response weights of
    reinforce_pp_baseline (lengths, mask row sums or ones); ``mask``: ``[B, T]`` or None (the scale
    then comes back ``[B, T]``)."""
    from lenkernels.reference import advantages as ref

    out = torch.empty_like(s)
    for idx in ref._members(ids):
        x = s[idx]
        k = x.numel()
        big = x.abs() + x.abs().max()
        if method in ("grpo", "grpo_passk"):
            big = big / ((x.std() if k > 1 else 1.0) + eps)
        elif method == "rloo" and k > 1:
            big = big * k / (k - 1)
        out[idx] = big
    if method == "batch":
        out = out / (s.std() + eps)
    elif method == "reinforce_pp_baseline":
        x = ref.group_advantages(s, ids, "dr_grpo")
        wv = w[w != 0]
        mean = (wv * x[w != 0]).sum() / wv.sum()
        var = (wv * (x[w != 0] - mean) ** 2).sum() / (wv.sum() - 1)
        out = (out + mean.abs()) / torch.sqrt(var + 1e-8)
    elif method == "gaussian":
        out = torch.full_like(s, 4.0)  # |Phi^-1| <= ~5 for n <= 10^6
    if mask is not None:
        out = out.unsqueeze(-1) * mask.double().abs()
    return out


def assert_policy_stats(out, exp, device, *, detached=False):
    """Every field of a ``lenkernels.PolicyLoss`` against the float64 reference's dict ``exp``: None
    where the reference has None, else an fp32 scalar on ``device`` within STAT_RTOL, of the summed
    terms' magnitude ``exp["scales"][name]`` for the reduced values (1e-6 absolute for the rest).
    ``detached``: every field but ``loss`` must carry no gradient."""
    for name in type(out)._fields:
        value, expected = getattr(out, name), exp[name]
        if expected is None:
            assert value is None, f"{name} should be None"
            continue
        assert value.shape == () and value.dtype == torch.float32 and value.device.type == torch.device(device).type
        if detached:
            assert name == "loss" or not value.requires_grad, f"{name} must be detached"
        scale = exp["scales"].get(name)  # the magnitude of the summed terms, for the reduced values
        assert_close(value, expected, rtol=STAT_RTOL, atol=1e-6 if scale is None else 0.0, scale=scale, name=name)


def assert_compiled_like_eager(step, logits, ids):
    """``step(logits, ids)`` (a scalar loss) and its gradient in ``logits`` under
    ``torch.compile(fullgraph=True, backend="aot_eager")``, allclose to eager."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    out_eager = step(x1, ids)
    out_compiled = compiled(x2, ids)
    out_eager.backward()
    out_compiled.backward()
    assert torch.allclose(out_eager, out_compiled)
    assert torch.allclose(x1.grad, x2.grad)


# --- policy loss ----------------------------------------------------------------------------------


def policy_batch(B, T, *, per_token_adv=False, spread=1.0, dtype=torch.float32, device="cpu", garbage=True):
    """Random inputs with the awkward cases on purpose: an all-masked row, a one-token row, a row
    with A = 0, ratios far outside any clip range (spread ~ 1 in log space), and NaN/inf in every
    masked position (they must never reach a result)."""
    lp = -torch.rand(B, T) * 3
    old = lp + torch.randn(B, T) * spread
    adv = torch.randn(B, T) if per_token_adv else torch.randn(B)
    mask = torch.rand(B, T) > 0.25
    mask[0] = False
    if B > 1:
        mask[1] = False
        mask[1, T // 2] = True
    if B > 2:
        adv[2] = 0.0
    ref_lp = lp + torch.randn(B, T) * 0.3
    ent = torch.rand(B, T) * 3
    w = torch.rand(B, T) + 0.5
    if garbage:
        bad = torch.where(torch.rand(B, T) > 0.5, float("nan"), float("inf"))
        for x in (lp, old, ref_lp, ent, w) + ((adv,) if per_token_adv else ()):
            x.copy_(torch.where(mask, x, bad))
    cast = lambda x: x.to(dtype).to(device)
    return SimpleNamespace(lp=cast(lp), old=cast(old), adv=cast(adv), mask=mask.to(device), ref=cast(ref_lp),
                           ent=cast(ent), w=cast(w))  # fmt: skip


def run_policy(batch, backend, g=0.7, **kw):
    """``lenkernels.policy_loss``: (PolicyLoss, d logprobs, d entropy) for the cotangent g of the loss."""
    x = batch.lp.clone().requires_grad_(True)
    h = None
    if kw.pop("with_entropy", True):
        h = batch.ent.clone().requires_grad_(True)
    out = lk.policy_loss(x, batch.old, batch.adv, batch.mask, entropy=h, backend=backend, **kw)
    grads = torch.autograd.grad(out.loss * g, [x] + ([h] if h is not None else []))
    return out, grads[0], (grads[1] if h is not None else None)


def expect_policy(batch, g=0.7, **kw):
    """The float64 reference on the same (possibly low-precision) values, as :func:`run_policy` returns them."""
    f64 = lambda x: None if x is None else x.detach().cpu().to(torch.float64)
    x = f64(batch.lp).requires_grad_(True)
    h = None
    if kw.pop("with_entropy", True):
        h = f64(batch.ent).requires_grad_(True)
    for key in ("ref_logprobs", "importance_weights", "cu_seqlens"):
        if isinstance(kw.get(key), torch.Tensor):
            kw[key] = kw[key].cpu() if key == "cu_seqlens" else f64(kw[key])
    out = ref_pl.policy_loss(x, f64(batch.old), f64(batch.adv), batch.mask.cpu(), entropy=h, **kw)
    grads = torch.autograd.grad(out["loss"] * g, [x] + ([h] if h is not None else []))
    return out, grads[0], (grads[1] if h is not None else None)


def assert_policy_kernels_write_every_output(kernels, batch, device):
    """Output buffers pre-filled with NaN: the launchers ``kernels.policy_loss_fwd`` and
    ``policy_loss_bwd`` (a backend's policy_loss module) write every statistic, every sequence's
    values and every gradient element (masked ones as exact zeros), for gspo and ppo."""
    for mode in ("gspo", "ppo"):
        inputs = PolicyInputs(batch.lp, batch.old, batch.adv, batch.mask, None, batch.ref, batch.ent, batch.w)
        low, high = ref_pl.resolve_clip(mode, None, None)
        cfg = PolicyConfig(mode=Mode[mode.upper()], clip_low=low, clip_high=high, kl_coef=0.05, entropy_coef=0.01,
                           agg=Agg.SEQ_MEAN_TOKEN_MEAN)  # fmt: skip
        t = kernel_tokens(inputs)
        stats = torch.full((NUM_STATS,), float("nan"), device=device)
        seq = torch.full((batch.lp.shape[0], NUM_SEQ_VALUES), float("nan"), device=device)
        g = torch.zeros(NUM_STATS, device=device)
        g[0] = 1.0
        d_lp, d_h = nan_like(t.logprobs), nan_like(t.entropy)
        kernels.policy_loss_fwd(t, cfg, stats, seq)
        kernels.policy_loss_bwd(t, cfg, stats, seq, g, d_lp, d_h)
        assert not bool(torch.isnan(stats).any()) and not bool(torch.isnan(seq).any())
        assert not bool(torch.isnan(d_lp).any()) and not bool(torch.isnan(d_h).any())
        assert bool((d_lp[~batch.mask] == 0).all()) and bool((d_h[~batch.mask] == 0).all())
