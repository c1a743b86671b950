"""TRL's vLLM importance-sampling correction (``lenkernels.integrations.trl.vllm_importance_sampling``)
against a float64 restatement of the block TRL 1.16 runs inline in
``GRPOTrainer._generate_and_score_completions`` (the ratio and the five metrics it logs), on fresh
random inputs: every mode, bounds on either side, NaN sampling log-probs, a tool mask, rows without
completion tokens, float32/bfloat16/float64 inputs."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from tests.utils import backend_params, trainer_module

trainer_module("trl")

from lenkernels.integrations import trl as lk_trl
from lenkernels.integrations._trl_vllm_correction import MODES


def trl_reference(old, sampling, completion_mask, mode, clip_min, clip_max, tool_mask=None):
    """TRL 1.16's code for the correction and its metrics, in float64."""
    old, sampling = old.double(), sampling.double()
    mask = completion_mask if tool_mask is None else completion_mask * tool_mask
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    sequence = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence else diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = clip_min if clip_min is not None else -math.inf
        hi = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    delta = torch.abs(old - sampling)
    bmask = mask.bool()
    delta = delta[bmask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence else ratio[bmask]

    def stat(fn, x):
        return fn(x) if x.numel() else torch.tensor(0.0, dtype=torch.float64)

    return ratio, [stat(torch.mean, delta), stat(torch.max, delta), stat(torch.min, flat), stat(torch.mean, flat),
                   stat(torch.max, flat)]  # fmt: skip


def inputs(seed, dtype=torch.float32, b=5, t=17, spread=0.2):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=g, dtype=torch.float64) - 1.5
    sampling = old + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
    mask = (torch.rand(b, t, generator=g) > 0.25).long()
    mask[0] = 0  # a completion of no tokens
    sampling[1, 2] = float("nan")  # vLLM could not score this token
    return old.to(dtype), sampling.to(dtype), mask


BOUNDS = [(None, 3.0), (0.5, 2.0), (0.9, None), (None, 1.05)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bounds", BOUNDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(("backend", "device"), backend_params("rollout_correction"))
def test_matches_trl(mode, bounds, dtype, backend, device):
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 inputs take the float64 definition whatever the backend")
    seed = zlib.crc32(repr((mode, bounds, dtype, backend)).encode())
    old, sampling, mask = inputs(seed, dtype, spread=0.02 if mode.startswith("seq") else 0.2)
    old, sampling, mask = old.to(device), sampling.to(device), mask.to(device)
    tool = torch.ones_like(mask)
    tool[2, :5] = 0
    got = lk_trl.vllm_importance_sampling(old, sampling, mask, mode=mode, clip_min=bounds[0], clip_max=bounds[1],
                                          tool_mask=tool, backend=backend)  # fmt: skip
    ratio, metrics = trl_reference(old.cpu(), sampling.cpu(), mask.cpu(), mode, *bounds, tool_mask=tool.cpu())
    assert got.ratio.dtype == dtype and got.ratio.shape == ratio.shape
    # the ratio: float32 maths of the dtype's values, rounded to the dtype once
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got.ratio.cpu().double(), ratio, rtol=tol, atol=tol)
    for value, want in zip(got[1:], metrics, strict=True):
        assert value.dim() == 0  # a mean of values of the dtype, rounded to it: two ulps
        assert float(value) == pytest.approx(float(want), rel=2 * tol, abs=2 * tol)


def test_nan_token_has_ratio_one_and_is_left_out_of_the_difference():
    old, sampling, mask = inputs(3)
    mask[1, 2] = 1
    got = lk_trl.vllm_importance_sampling(old, sampling, mask, mode="token_truncate", clip_max=3.0)
    assert float(got.ratio[1, 2]) == 1.0
    assert math.isfinite(float(got.logp_difference_mean)) and math.isfinite(float(got.logp_difference_max))


def test_mask_modes_count_rejected_ratios_as_zero():
    old, sampling, mask = inputs(4, spread=2.0)
    got = lk_trl.vllm_importance_sampling(old, sampling, mask, mode="token_mask", clip_min=0.5, clip_max=2.0)
    kept = got.ratio[mask.bool()]
    assert bool((kept == 0).any()) and float(got.ratio_min) == 0.0


def test_bad_input():
    old, sampling, mask = inputs(5)
    with pytest.raises(ValueError, match="Unknown vLLM importance sampling level"):
        lk_trl.vllm_importance_sampling(old, sampling, mask, mode="geometric_mask")
    with pytest.raises(ValueError, match="must both be \\[B, T\\]"):
        lk_trl.vllm_importance_sampling(old, sampling[:, 1:], mask)
    with pytest.raises(ValueError, match="completion_mask"):
        lk_trl.vllm_importance_sampling(old, sampling, mask[:, 1:])
