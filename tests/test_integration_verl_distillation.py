"""verl's top-K on-policy distillation loss (``verl.trainer.distillation.fsdp.losses
.compute_forward_kl_topk``) against verl's own function on fresh random inputs: every output, its
dtype and the gradient of the loss in the student's logits, with and without the log-prob clamp,
through both of verl's paths (``use_chunked_topk``), and reached through verl's loss dispatch with
``patch()`` active."""

from __future__ import annotations

import pytest
import torch

from tests.utils import trainer_module

fsdp_losses = trainer_module("verl.trainer.distillation.fsdp.losses")
distill_losses = trainer_module("verl.trainer.distillation.losses")
dconfig = trainer_module("verl.workers.config")

from lenkernels.integrations import verl as lk_verl


def config(chunked: bool = False, clamp: float | None = -10.0, k: int = 8):
    loss = dconfig.DistillationLossConfig(loss_mode="forward_kl_topk", use_policy_gradient=False, topk=k,
                                          use_chunked_topk=chunked, log_prob_min_clamp=clamp)  # fmt: skip
    return dconfig.DistillationConfig(distillation_loss=loss)


def batch(seed: int, dtype, n: int = 41, v: int = 257, k: int = 8, lengths=(13, 28)):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(1, n, v, generator=g) * 3).to(dtype)
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1)
    t_lp, t_ids = teacher.float().topk(k, dim=-1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    nested = torch.nested.nested_tensor_from_jagged
    return student, nested(t_lp, cu), nested(t_ids, cu)


def run(fn, student, t_lp, t_ids, cfg, cotangent):
    x = student.detach().clone().requires_grad_()
    out = fn(x, t_lp, t_ids, cfg, "thd")
    (out["distillation_losses"] * cotangent).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("clamp", [-10.0, -2.0, None], ids=str)
def test_matches_verl(dtype, clamp):
    student, t_lp, t_ids = batch(int(clamp or 0) + 3 * (dtype == torch.bfloat16), dtype)
    cotangent = torch.randn(1, student.shape[1])
    # the student's log-probs: lenkernels computes them in float32 (float64 for float64 logits) and
    # rounds once to the logits' dtype. verl's default path takes log_softmax in the logits' dtype
    # (the same for float32 and float64); its chunked path computes in float32 (the same for bf16)
    chunked = dtype == torch.bfloat16
    theirs, g_theirs = run(fsdp_losses.compute_forward_kl_topk, student, t_lp, t_ids, config(chunked, clamp), cotangent)
    ours, g_ours = run(lk_verl.compute_forward_kl_topk, student, t_lp, t_ids, config(False, clamp), cotangent)
    assert sorted(ours) == sorted(theirs)
    tol = 2e-6  # verl's KL is float32 whatever the logits' dtype
    for key, want in theirs.items():
        got = ours[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=key)
    # the gradient: float32 maths rounded once to the logits' dtype (verl rounds its float32 chunk
    # gradient through the bf16 cast and log_softmax's backward: an ulp apart)
    gtol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # through verl's float32 KL
    torch.testing.assert_close(g_ours.double(), g_theirs.double(), rtol=gtol, atol=gtol * g_theirs.abs().max().item())


def test_student_topk_overlap_counts_ties_to_lower_id():
    """A student row of equal logits: its top-K are ids 0..K-1 (verl's torch.topk picks any K)."""
    student, t_lp, t_ids = batch(5, torch.float32)
    student[0, 0] = 0.0
    out = lk_verl.compute_forward_kl_topk(student, t_lp, t_ids, config(), "thd")
    want = (t_ids.values()[0].unsqueeze(-1) == torch.arange(8)).any(-1).sum()
    assert int(out["overlap_count"][0, 0]) == int(want)


def test_patch_reaches_verl_loss_dispatch():
    student, t_lp, t_ids = batch(7, torch.float32)
    actor = trainer_module("verl.workers.config.actor").ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1
    )
    data = {"teacher_logprobs": t_lp, "teacher_ids": t_ids}
    with lk_verl.patched():
        assert fsdp_losses.compute_forward_kl_topk is lk_verl.compute_forward_kl_topk
        out = distill_losses.compute_topk_loss(actor, config(), data, student, "thd")
    assert fsdp_losses.compute_forward_kl_topk is not lk_verl.compute_forward_kl_topk
    want = lk_verl.compute_forward_kl_topk(student, t_lp, t_ids, config(), "thd")
    for key in want:
        assert torch.equal(out[key], want[key]), key


def test_bad_input():
    student, t_lp, t_ids = batch(9, torch.float32)
    with pytest.raises(ValueError, match="nested"):
        lk_verl.compute_forward_kl_topk(student, t_lp.values()[None], t_ids.values()[None], config(), "thd")
    with pytest.raises(ValueError, match="same tokens"):
        lk_verl.compute_forward_kl_topk(student[:, 1:], t_lp, t_ids, config(), "thd")
