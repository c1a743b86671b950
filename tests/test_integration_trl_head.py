"""TRL's fused LM head (``add_fused_lm_head``, TRL 1.16) with ``lenkernels.integrations.trl.patch()``:
the head's ``ChunkedLogProbFunction`` is lenkernels' (``linear_token_stats``), and a tiny random
Qwen2 gives TRL's numbers for every output TRL offers, with a soft cap and a logit scale, and the
same gradients in the model's weights."""

from __future__ import annotations

import copy

import pytest
import torch

from lenkernels.integrations import trl as lk_trl
from tests.utils import assert_close, assert_same_training, grpo_run, trainer_module

trl_utils = trainer_module("trl.trainer.utils")
trl_kernels = trainer_module("trl.kernels")

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _model(softcap=None, logit_scale=None, bias=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    if softcap is not None:
        config.final_logit_softcapping = softcap
    if logit_scale is not None:
        config.logit_scale = logit_scale
    model = Qwen2ForCausalLM(config)
    if bias:  # an LM head with a bias (as some models have)
        model.lm_head = torch.nn.Linear(32, 97, bias=True)
    return model


def _run(model, input_ids, labels, patch: bool):
    with lk_trl.patched() if patch else _nothing():
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        loss = out.log_probs.sum() * 0.3 + (0 if out.entropy is None else out.entropy.sum() * 0.7)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return out, grads


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize(
    "softcap,logit_scale,bias,outputs",
    [(None, None, False, ALL), (4.0, 0.5, True, ALL), (None, 2.0, False, ("log_probs", "entropy")),
     (None, None, True, ("log_probs", "entropy")), (7.0, None, False, ("log_probs", "is_top1"))],
)  # fmt: skip
def test_fused_head_matches_trl(softcap, logit_scale, bias, outputs):
    torch.manual_seed(hash((softcap, logit_scale, bias, len(outputs))) % 2**31)
    theirs = _model(softcap, logit_scale, bias)
    ours = copy.deepcopy(theirs)
    trl_utils.add_fused_lm_head(theirs, temperature=0.8, outputs=outputs)
    trl_utils.add_fused_lm_head(ours, temperature=0.8, outputs=outputs)
    input_ids = torch.randint(0, 97, (3, 11))
    labels = input_ids.clone()
    labels[0, :4] = -100  # prompt positions, as GRPOTrainer masks them
    labels[2, -3:] = -100
    out_t, grads_t = _run(theirs, input_ids, labels, patch=False)
    calls = []
    real = lk_trl.ChunkedLogProbFunction.apply
    lk_trl.ChunkedLogProbFunction.apply = staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        out, grads = _run(ours, input_ids, labels, patch=True)
    finally:
        lk_trl.ChunkedLogProbFunction.apply = staticmethod(real)
    assert calls, "the patched head did not call lenkernels"
    for name in ALL:
        got, want = getattr(out, name), getattr(out_t, name)
        if name not in outputs:
            assert got is None and want is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if name == "is_top1":
            assert torch.equal(got, want)
            continue
        assert_close(got, want, rtol=1e-5, scale=want.abs().amax() + 1, name=name)
    assert_close(out.loss, out_t.loss, rtol=1e-5, name="loss")
    for g, gt in zip(grads, grads_t):
        assert_close(g, gt, rtol=1e-4, scale=gt.abs().amax() + 1e-6, name="weight grad")


def test_patch_swaps_every_reference_and_restores():
    original = trl_kernels.ChunkedLogProbFunction
    with lk_trl.patched():
        assert trl_kernels.ChunkedLogProbFunction is lk_trl.ChunkedLogProbFunction
        assert trl_utils._ChunkedLogProbFunction is lk_trl.ChunkedLogProbFunction
    assert trl_kernels.ChunkedLogProbFunction is original
    assert trl_utils._ChunkedLogProbFunction is original
    with lk_trl.patched(exclude=("ChunkedLogProbFunction",)):
        assert trl_utils._ChunkedLogProbFunction is original


def test_real_grpo_trainer_runs_lenkernels_in_its_fused_head(tmp_path):
    """TRL's own GRPOTrainer (tiny random Qwen2, beta > 0 with its reference model, mu = 2) trains two
    steps unpatched and with the whole patch (fused head and fused loss): the same logged metrics and
    the same weights; lenkernels' head ran on every forward. In float32 (``bf16=False``: under
    autocast both heads write bfloat16 logit-gradient tiles, where an fp32 ulp of difference in a
    probability flips a rounding now and then, 2**-8 of that entry; the head test covers autocast)
    and under plain SGD (Adam, TRL's default, turns an ulp into a full step wherever a gradient is
    near its eps)."""
    pytest.importorskip("datasets", reason="GRPOTrainer needs the datasets package")
    config = dict(loss_type="dapo", beta=0.02, num_iterations=2, epsilon_high=0.28, learning_rate=1e-1, optim="sgd",
                  bf16=False)  # fmt: skip
    expected = grpo_run(tmp_path / "trl", None, **config)
    calls = []
    real = lk_trl.ChunkedLogProbFunction.apply
    lk_trl.ChunkedLogProbFunction.apply = staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        run = grpo_run(tmp_path / "lk", lk_trl.patched(), **config)
    finally:
        lk_trl.ChunkedLogProbFunction.apply = staticmethod(real)
    assert len(calls) >= 4, calls  # the policy (old and new log-probs) and the reference model, both steps
    assert_same_training(run, expected, "dapo", rtol=1e-4)


@pytest.mark.parametrize("softcap,outputs", [(None, ("entropy",)), (5.0, ALL[1:])])
def test_fused_head_under_autocast(softcap, outputs):
    """Under bfloat16 autocast (TRL's trainers on a bf16 machine) both heads run the GEMM in bfloat16
    from float32 parameters and compute in fp32 from the rounded logits; the gradients of the fp32
    hidden states and LM head come from bfloat16 logit-gradient tiles, summed in fp32 and returned
    in fp32, not rounded to bfloat16 on the way back (as ``F.linear(h.to(bf16), w.to(bf16))`` would).
    (Without a bias: with one, lenkernels' logits are ``F.linear``'s, one rounding as in the model's
    own forward, where TRL's head rounds the product, then the sum: a bfloat16 ulp apart.)"""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, 32, generator=gen)
    weight = torch.randn(97, 32, generator=gen) * 0.3
    targets = torch.randint(0, 97, (37,), generator=gen)
    g_lp, g_ent = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    results = []
    for fn in (trl_kernels.ChunkedLogProbFunction, lk_trl.ChunkedLogProbFunction):
        h, w = (x.clone().requires_grad_() for x in (hidden, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn.apply(h, w, None, targets, 0.9, 4096, softcap, 1.5, outputs)
        loss = (out[0] * g_lp).sum() + (out[1] * g_ent).sum()
        results.append((out, torch.autograd.grad(loss, (h, w))))
    (out_t, grads_t), (out, grads) = results
    for name, got, want in zip(ALL, out, out_t):
        if want is None:
            assert got is None, name
        elif name == "is_top1":
            assert torch.equal(got, want)
        else:
            assert got.dtype == want.dtype == torch.float32, name
            assert_close(got, want, rtol=1e-5, scale=want.abs().amax() + 1, name=name)
    for name, g, gt in zip(("hidden", "weight"), grads, grads_t):
        assert g.dtype == gt.dtype == torch.float32
        assert_close(g, gt, rtol=1e-5, scale=gt.abs().amax(), name=name)
