"""Shared test helpers: the backend/device matrix, the tolerance table and a comparison that
prints the worst element."""

from __future__ import annotations

import pytest
import torch

from lenkernels import _backend

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
