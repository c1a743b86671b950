"""verl's rollout correction (``rollout_corr_helper.compute_rollout_correction_and_rejection_mask``
and ``compute_offpolicy_metrics``) against verl's own functions on fresh random inputs: weights,
rejection mask and every metric, over the IS levels, TIS/IcePop, batch normalisation and each
rejection option; the deliberate differences (k3 with expm1, ESS of all-zero weights); one host
transfer per call."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from tests.utils import trainer_module

helper = trainer_module("verl.trainer.ppo.rollout_corr_helper")

from lenkernels.integrations import verl as lk_verl

RS_CASES = [
    (None, None),
    ("token_k1", "0.5_2.0"),
    ("token_k2,token_k3", "0.05,0.04"),
    ("seq_sum_k1,seq_mean_k1", "0.2_5,0.7_1.4"),
    ("seq_sum_k2,seq_mean_k3,seq_max_k2", "0.8,0.05,0.5"),
    ("seq_sum_k3,seq_mean_k2,seq_max_k3", "0.9"),
]


def batch(seed: int, dtype=torch.float32, b: int = 6, t: int = 24, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5 - 2
    rollout = old + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
    mask = (torch.rand(b, t, generator=g) > 0.2).float()
    mask[1] = 0  # a sequence without response tokens
    mask[2] = 0
    mask[2, 3] = 1  # a sequence of one token
    return old.to(dtype), rollout.to(dtype), mask


def both(old, rollout, mask, **kw):
    return (helper.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **kw),
            lk_verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **kw))  # fmt: skip


def assert_same_result(ours, theirs, rtol):
    (w_v, m_v, d_v), (w_l, m_l, d_l) = theirs, ours
    assert m_l.dtype == m_v.dtype and torch.equal(m_l, m_v)
    assert (w_l is None) == (w_v is None)
    if w_v is not None:
        a, b = w_l.batch["rollout_is_weights"], w_v.batch["rollout_is_weights"]
        assert a.dtype == b.dtype and not a.requires_grad
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-1)
    assert sorted(d_l) == sorted(d_v)
    for key, value in d_v.items():
        assert isinstance(d_l[key], float), key
        # kl is a mean of differences (cancellation): absolute tolerance on the log-prob scale
        assert d_l[key] == pytest.approx(value, rel=rtol * 10, abs=rtol * 10), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rollout_is", [None, "token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, "0.5_1.5"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rs", RS_CASES, ids=lambda c: str(c[0]))
def test_matches_verl(dtype, rollout_is, threshold, normalize, rs):
    seed = zlib.crc32(repr((dtype, rollout_is, threshold, normalize, rs[0])).encode())
    # sequence weights multiply ~20 token ratios: a narrower spread keeps some inside the IcePop band
    old, rollout, mask = batch(seed, dtype, spread=0.05 if rollout_is == "sequence" else 0.3)
    kw = {"rollout_is": rollout_is, "rollout_is_threshold": threshold, "rollout_is_batch_normalize": normalize,
          "rollout_rs": rs[0], "rollout_rs_threshold": rs[1]}  # fmt: skip
    ours, theirs = both(old, rollout, mask, **kw)
    assert_same_result(ours, theirs, rtol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_mask_dtypes_and_wide_ratios(mask_dtype):
    """Log ratios past verl's ±20 clamp (token and sequence), masks of every dtype verl passes."""
    old, rollout, mask = batch(7, spread=12.0)
    ours, theirs = both(old, rollout, mask.to(mask_dtype), rollout_is="sequence", rollout_is_threshold=3.0,
                        rollout_rs="token_k1,seq_max_k2", rollout_rs_threshold="0.2_5,30")  # fmt: skip
    assert_same_result(ours, theirs, rtol=1e-5)


def test_offpolicy_metrics_matches_verl():
    old, rollout, mask = batch(11)
    for r in (rollout, None):
        theirs = helper.compute_offpolicy_metrics(old, r, mask)
        ours = lk_verl.compute_offpolicy_metrics(old, r, mask)
        assert sorted(ours) == sorted(theirs)
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_weights_against_float64_definition():
    """Token and sequence TIS weights of float32 inputs: exp(clamp(δ or Σδ, ±20)) ∧ C on the
    response tokens, 0 elsewhere, computed in float64 from the same float32 values."""
    old, rollout, mask = batch(3, spread=2.0)
    d = old.double() - rollout.double()
    for level, log_w in (("token", d), ("sequence", (d * mask).sum(-1, keepdim=True).expand_as(d))):
        proto, _, _ = lk_verl.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, rollout_is=level, rollout_is_threshold=2.5
        )
        want = (log_w.clamp(-20, 20).exp() * mask).clamp(max=2.5)
        torch.testing.assert_close(proto.batch["rollout_is_weights"].double(), want, rtol=2e-6, atol=0)


def test_k3_is_accurate_for_small_log_ratios():
    """Deliberate: k3_kl = mean(expm1(δ) − δ), correct to float32 precision where verl's
    exp(δ) − δ − 1 cancels (δ ~ 1e-3: verl's float32 value is off by a few percent)."""
    old, rollout, mask = batch(5, spread=1e-3)
    d = (old.double() - rollout.double())[mask.bool()]
    exact = (torch.expm1(d) - d).mean().item()
    ours = lk_verl.compute_offpolicy_metrics(old, rollout, mask)["k3_kl"]
    assert ours == pytest.approx(exact, rel=1e-4)


def test_all_rejected_icepop_ess_is_inf():
    """Deliberate: every weight outside the IcePop band -> ESS inf (verl: ZeroDivisionError)."""
    old, rollout, mask = batch(9)
    _, _, metrics = lk_verl.compute_rollout_correction_and_rejection_mask(
        old, rollout + 50.0, mask, rollout_is="token", rollout_is_threshold="0.5_2.0"
    )
    assert metrics["rollout_corr/rollout_is_eff_sample_size"] == math.inf
    assert metrics["rollout_corr/rollout_is_oob_ratio"] == pytest.approx(1.0)


def test_one_host_transfer(monkeypatch):
    """Every metric comes to the host in one transfer: no .item() and one .tolist()."""
    old, rollout, mask = batch(13)
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting(name, fn):
        def wrapped(self, *a, **k):
            calls[name] += 1
            return fn(self, *a, **k)

        return wrapped

    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", tolist))
    lk_verl.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is="token", rollout_is_threshold=2.0, rollout_is_batch_normalize=True,
        rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.5_2,0.1",
    )  # fmt: skip
    assert calls == {"item": 0, "tolist": 1}


def test_bad_input():
    old, rollout, mask = batch(1)
    with pytest.raises(ValueError, match="response_mask must contain at least one valid token"):
        lk_verl.compute_rollout_correction_and_rejection_mask(old, rollout, torch.zeros_like(mask), rollout_is="token")
    with pytest.raises(AssertionError, match="at least one valid token"):
        lk_verl.compute_offpolicy_metrics(old, rollout, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="does not match rollout_log_prob shape"):
        lk_verl.compute_rollout_correction_and_rejection_mask(old, rollout[:, 1:], mask)
    with pytest.raises(ValueError, match="Invalid rollout_is"):
        lk_verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_is="geometric")
    with pytest.raises(ValueError, match="Invalid rollout_rs option"):
        lk_verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_rs="seq_max_k1",
                                                              rollout_rs_threshold="2")  # fmt: skip
    with pytest.raises(ValueError, match="rollout_rs_threshold must be explicitly provided"):
        lk_verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_rs="token_k1")
    with pytest.raises(TypeError, match="not a boolean"):
        lk_verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_is="token",
                                                              rollout_is_threshold=True)  # fmt: skip
