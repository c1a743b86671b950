"""lenkernels.integrations.verl against the installed verl: every drop-in gives verl's outputs,
gradients and metric dicts on random inputs, and patch() swaps them in and out of verl's modules
and registries (including verl's own ppo_loss end to end).

Needs verl without its heavy dependencies: ``pip install --no-deps verl==0.9.1`` plus ray,
tensordict, omegaconf, hydra-core, codetiming, dill, pylatexenc, pandas, pyarrow.
"""

from __future__ import annotations

import math
import sys
import types
import uuid

import numpy as np
import pytest
import torch

from tests.utils import assert_close, trainer_close, trainer_module

verl_F = trainer_module("verl.utils.torch_functional")
core = trainer_module("verl.trainer.ppo.core_algos")
rollout_corr = trainer_module("verl.trainer.ppo.rollout_corr_helper")
verl_config = trainer_module("verl.workers.config")
from verl.trainer.config import AlgoConfig

from lenkernels.integrations import _verl_token_stats as lk_ts
from lenkernels.integrations import verl as lk_verl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def same_metrics(ours: dict, theirs: dict):
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    for key in theirs:
        assert isinstance(ours[key], float), (key, type(ours[key]))
        assert math.isclose(ours[key], theirs[key], rel_tol=1e-5, abs_tol=1e-6), (key, ours[key], theirs[key])


def actor_config(**kw):
    return verl_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **kw)


def batch(B, T, device, *, spread=0.6, seed_rows=True):
    """Padded [B, T] policy-loss inputs with an all-masked row and a one-token row on purpose;
    masked positions hold finite garbage (verl's eager gradient there is 0 only if they are finite)."""
    lp = -torch.rand(B, T) * 3
    old = lp + torch.randn(B, T) * spread  # ratios well outside any clip band, some beyond the dual clip 3
    adv = torch.randn(B, T)
    mask = torch.rand(B, T) > 0.3
    if seed_rows:
        mask[0] = False
        mask[1] = False
        mask[1, T // 2] = True
    weights = torch.rand(B, T) + 0.5
    return [x.to(device) for x in (lp, old, adv, mask.float(), weights)]


# --- token statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lead,vocab",
    [
        ((37,), 1_031),  # packed [total_nnz, V] (verl's remove-padding path), prime V
        ((3, 5), 257),  # padded [B, T, V], V one past a power of two
    ],
)
def test_logprobs_and_entropy_match_verl(device, lead, vocab):
    logits = (torch.randn(*lead, vocab) * 3).to(device)
    labels = torch.randint(0, vocab, lead, device=device)
    g_lp, g_h = torch.randn(lead, device=device), torch.randn(lead, device=device)

    def run(logprobs_fn, entropy_fn):
        x = logits.clone().requires_grad_(True)
        lp, h = logprobs_fn(x, labels, inplace_backward=False), entropy_fn(x)
        (lp * g_lp + h * g_h).sum().backward()
        return lp, h, x.grad

    lp, h, grad = run(lk_verl.logprobs_from_logits, lk_verl.entropy_from_logits)
    lp_v, h_v, grad_v = run(verl_F.logprobs_from_logits, verl_F.entropy_from_logits)
    assert lp.dtype == h.dtype == torch.float32
    trainer_close(lp, lp_v, "logprobs")
    trainer_close(h, h_v, "entropy")
    trainer_close(grad, grad_v, "d logits")

    flat = logits.reshape(-1, vocab)
    chunked = lk_verl.entropy_from_logits_with_chunking(flat, chunk_size=7)
    trainer_close(chunked, verl_F.entropy_from_logits_with_chunking(flat, chunk_size=7), "chunked entropy")


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_bf16_logits_match_verl_on_the_same_values(device):
    """bf16 logits: verl's dtype (bf16 from its eager path, float32 from flash-attn's kernel) holding
    verl's statistics of the same values computed in fp32, rounded once (verl's eager bf16 path
    rounds its log-softmax to bf16)."""
    logits = (torch.randn(23, 509) * 4).to(torch.bfloat16).to(device)
    labels = torch.randint(0, 509, (23,), device=device)
    lp, h = lk_verl.logprobs_from_logits(logits, labels), lk_verl.entropy_from_logits(logits)
    assert lp.dtype == verl_F.logprobs_from_logits(logits, labels).dtype
    assert h.dtype == verl_F.entropy_from_logits(logits).dtype == torch.bfloat16
    for ours, fp32, name in ((lp, verl_F.logprobs_from_logits(logits.float(), labels), "lp"),
                             (h, verl_F.entropy_from_logits(logits.float()), "entropy")):  # fmt: skip
        # one rounding to the result's dtype: half an ulp (bf16: 2^-9 relative), plus fp32 noise
        rtol = 2e-5 if ours.dtype == torch.float32 else 2.0**-8
        assert_close(ours.float(), fp32, rtol=rtol, atol=1e-5, name=name)


def test_logprobs_dtype_follows_verls_path(monkeypatch):
    """verl's logprobs are float32 where it runs flash-attn's cross-entropy (CUDA tensors, flash-attn
    importable, VERL_DISABLE_FLASH_ATTN_CE unset) and in the logits' dtype on its eager path: the
    drop-in reads the same switches (checked on CUDA tensors' metadata, without a GPU)."""

    class Fake:
        def __init__(self, device, dtype):
            self.device, self.dtype = torch.device(device), dtype

    for available in (True, False):
        monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", available)
        for disabled in ("0", "1"):
            monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", disabled)
            flash = available and disabled != "1"
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                assert lk_ts._logprobs_dtype(Fake("cuda", dtype)) == (torch.float32 if flash else dtype)
                assert lk_ts._logprobs_dtype(Fake("cpu", dtype)) == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_through_the_lm_head(device):
    """verl's default inplace_backward=True writes d logits into the logits buffer: the gradients
    that reach the LM head and the hidden states are still verl's."""
    N, D, V = 19, 16, 300  # odd N, V not a multiple of any block
    hidden = torch.randn(N, D, device=device)
    weight = torch.randn(V, D, device=device) * 0.3
    labels = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)

    def run(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        (fn(h @ w.t(), labels) * g).sum().backward()
        return h.grad, w.grad

    for ours, theirs, name in zip(run(lk_verl.logprobs_from_logits), run(verl_F.logprobs_from_logits), ("dh", "dW")):
        trainer_close(ours, theirs, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+", "k1+", "abs+"]
)
def test_kl_penalty_matches_verl(device, name):
    lp = -torch.rand(5, 37, device=device) * 4
    ref = lp + torch.randn(5, 37, device=device) * 2
    ref[0, :3] = lp[0, :3] + torch.tensor([25.0, -25.0, 0.0], device=device)  # verl's +-20 clamps and delta = 0
    g = torch.randn(5, 37, device=device)
    grads = []
    for fn in (lk_verl.kl_penalty, core.kl_penalty):
        a, b = lp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        out = fn(a, b, name)
        (out * g).sum().backward()
        grads.append((out, a.grad, b.grad))
    (ours, d_lp, d_ref), (theirs, d_lp_v, d_ref_v) = grads
    trainer_close(ours, theirs, f"{name} value")
    trainer_close(d_lp, d_lp_v, f"{name} d logprob")
    trainer_close(d_ref, d_ref_v, f"{name} d ref_logprob")


def test_kl_penalty_unknown_estimator_raises_like_verl():
    lp = torch.zeros(3)
    for name in ("full", "k4"):
        with pytest.raises(NotImplementedError):
            core.kl_penalty(lp, lp, name)
        with pytest.raises(NotImplementedError, match=name):
            lk_verl.kl_penalty(lp, lp, name)


# --- aggregation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", AGGS)
@pytest.mark.parametrize("dist", [False, True], ids=["local", "dp2"])
def test_agg_loss_matches_verl(device, mode, dist):
    B, T = 6, 29  # odd T; row 0 all masked: the seq-mean modes must skip it
    values = torch.randn(B, T, device=device)
    mask = (torch.rand(B, T, device=device) > 0.4).float()
    mask[0] = 0
    kw = dict(dp_size=2, batch_num_tokens=71, global_batch_size=9, loss_scale_factor=40) if dist else {}
    results = []
    for fn in (lk_verl.agg_loss, core.agg_loss):
        x = values.clone().requires_grad_(True)
        loss = fn(x, mask, mode, **kw)
        (loss * 0.7).backward()
        results.append((loss, x.grad))
    trainer_close(results[0][0], results[1][0], f"{mode} loss", scale=float(values.abs().max()))
    trainer_close(results[0][1], results[1][1], f"{mode} d loss_mat")


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float64])
@pytest.mark.parametrize("mode", AGGS)
def test_patched_compute_value_loss_float64(mode, mask_dtype):
    """verl's own compute_value_loss (float64 value predictions) under patch(): the patched
    agg_loss takes float64 and gives verl's float64 loss, value and gradient."""
    B, T = 6, 19
    vpreds = torch.randn(B, T, dtype=torch.float64)
    values = vpreds + torch.randn(B, T, dtype=torch.float64) * 0.3
    returns = values + torch.randn(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).to(mask_dtype)
    mask[0] = 0
    mask[1, 0] = 1
    kw = dict(cliprange_value=0.2, loss_agg_mode=mode, dp_size=2, batch_num_tokens=61, global_batch_size=9)

    def run():
        x = vpreds.clone().requires_grad_(True)
        loss, clipfrac = core.compute_value_loss(x, returns, values, mask, **kw)
        loss.backward()
        return loss, clipfrac, x.grad

    loss_v, frac_v, grad_v = run()
    with lk_verl.patched():
        assert core.agg_loss is lk_verl.agg_loss
        loss, frac, grad = run()
    # verl's seq-mean-token-mean divides each sequence by its count + 1e-8, which a float64 mask
    # keeps (an integer mask's count is a float32 number, where the 1e-8 rounds away): 1e-8 / n
    rtol = 2e-8 if mode == "seq-mean-token-mean" and mask_dtype == torch.float64 else 1e-12
    assert loss.dtype == loss_v.dtype == torch.float64 and loss.shape == loss_v.shape
    assert_close(loss, loss_v, rtol=rtol, atol=1e-15, name="value loss")
    assert_close(frac, frac_v, rtol=1e-12, atol=0.0, name="clip fraction")
    assert grad.dtype == torch.float64
    assert_close(grad, grad_v, rtol=rtol, atol=1e-15, name="d vpreds")


def test_agg_loss_errors_like_verl():
    x, m = torch.randn(2, 3), torch.ones(2, 3)
    for fn in (lk_verl.agg_loss, core.agg_loss):
        with pytest.raises(ValueError, match="batch_num_tokens is required"):
            fn(x, m, "token-mean", dp_size=2)
        with pytest.raises(ValueError, match="global_batch_size is required"):
            fn(x, m, "seq-mean-token-mean", dp_size=2)
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            fn(x, m, "sum-of-everything")


# --- policy losses -------------------------------------------------------------------------------


def _run_loss(fn, lp, *args, **kw):
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(args[0], x, *args[1:], **kw)
    (loss * 1.3).backward()
    return loss, metrics, x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(lk_verl.POLICY_LOSSES))
@pytest.mark.parametrize("mode", AGGS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "rollout_is"])
def test_policy_losses_match_verl(device, name, mode, weighted):
    lp, old, adv, mask, w = batch(5, 37, device)
    clip = (
        dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
        if name == "gspo"
        else dict(clip_ratio_low=0.2, clip_ratio_high=0.28)
    )
    cfg = actor_config(**clip, clip_ratio_c=2.5, tau_pos=1.1, tau_neg=1.3)
    weights = w if weighted else None
    ours = _run_loss(lk_verl.POLICY_LOSSES[name], lp, old, adv, mask, mode, cfg, weights)
    theirs = _run_loss(core.get_policy_loss_fn(name), lp, old, adv, mask, mode, cfg, weights)
    trainer_close(ours[0], theirs[0], f"{name} loss", scale=float(adv.abs().max()))
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    same_metrics(ours[1], theirs[1])
    trainer_close(ours[2], theirs[2], f"{name} d log_prob")
    assert bool((ours[2][mask == 0] == 0).all()), "masked tokens got a gradient"


@pytest.mark.parametrize("name", sorted(lk_verl.POLICY_LOSSES))
def test_policy_losses_with_global_batch_info(name):
    """verl's global normalisers (set by its actor on config.global_batch_info) and dp_size."""
    lp, old, adv, mask, w = batch(4, 23, "cpu")
    cfg = actor_config(loss_scale_factor=64)
    cfg.global_batch_info.update(dp_size=3, batch_num_tokens=97, global_batch_size=11, loss_scale_factor=64)
    for mode in ("token-mean", "seq-mean-token-sum-norm"):
        ours = _run_loss(lk_verl.POLICY_LOSSES[name], lp, old, adv, mask, mode, cfg, w)
        theirs = _run_loss(core.get_policy_loss_fn(name), lp, old, adv, mask, mode, cfg, w)
        trainer_close(ours[0], theirs[0], f"{name} {mode} loss", scale=float(adv.abs().max()))
        trainer_close(ours[2], theirs[2], f"{name} {mode} d log_prob")
        same_metrics(ours[1], theirs[1])


def test_reinforce_loss_matches_verl():
    lp, old, adv, mask, w = batch(6, 31, "cpu")
    cfg = actor_config()
    for weights in (None, w):
        ours = _run_loss(
            lk_verl.compute_policy_loss_reinforce, lp, old, adv, mask, config=cfg, rollout_is_weights=weights
        )
        theirs = _run_loss(
            core.compute_policy_loss_reinforce, lp, old, adv, mask, config=cfg, rollout_is_weights=weights
        )
        trainer_close(ours[0], theirs[0], "loss", scale=float(adv.abs().max()))
        trainer_close(ours[2], theirs[2], "d log_prob")
        same_metrics(ours[1], theirs[1])


def test_policy_loss_argument_errors():
    lp, old, adv, mask, _ = batch(2, 5, "cpu", seed_rows=False)
    with pytest.raises(ValueError, match="needs config"):
        lk_verl.compute_policy_loss_vanilla(old, lp, adv, mask)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        lk_verl.compute_policy_loss_vanilla(old, lp, adv, mask, config=actor_config(clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        lk_verl.compute_policy_loss_gpg(old, lp, adv, mask, "mean", config=actor_config())


# --- outcome advantages --------------------------------------------------------------------------


def verl_batch(sizes, T, device, *, dense=False):
    """Token rewards, masks and shuffled uid strings for groups of the given sizes (a group of one
    on purpose: verl's baseline 0 / std 1). Rewards sit on the last response token like verl's
    reward managers, or everywhere (``dense``: verl sums every position, masked ones included)."""
    labels = [str(uuid.uuid4()) for _ in sizes]
    index = np.array([labels[g] for g, n in enumerate(sizes) for _ in range(n)], dtype=object)
    order = np.random.default_rng(int(torch.randint(0, 2**31, ()))).permutation(len(index))
    index = index[order]
    B = len(index)
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rewards = torch.zeros(B, T)
    if dense:
        rewards = torch.randn(B, T) * 0.3
    else:
        rewards[torch.arange(B), lengths - 1] = torch.randint(0, 3, (B,)).float() * 0.5  # ties on purpose
    return rewards.to(device), mask.to(device), index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(lk_verl.ADVANTAGE_ESTIMATORS))
@pytest.mark.parametrize("dense", [False, True], ids=["outcome", "dense"])
def test_advantages_match_verl(device, name, dense):
    sizes = [3, 1, 4, 2, 5] if name != "grpo_passk" else [3, 2, 4, 2, 5]  # Pass@k needs two per group
    rewards, mask, index = verl_batch(sizes, 13, device, dense=dense)
    kwargs = dict(response_mask=mask, index=index, config=AlgoConfig())
    adv, ret = lk_verl.ADVANTAGE_ESTIMATORS[name](token_level_rewards=rewards.clone(), **kwargs)
    adv_v, ret_v = core.get_adv_estimator_fn(name)(token_level_rewards=rewards.clone(), **kwargs)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    trainer_close(adv, adv_v, f"{name} advantages", rtol=1e-5)
    trainer_close(ret, ret_v, f"{name} returns", rtol=1e-5)
    assert bool((adv[mask == 0] == 0).all())


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_without_std_and_passk_config(norm):
    rewards, mask, index = verl_batch([3, 2, 4], 9, "cpu")
    ours = lk_verl.compute_grpo_outcome_advantage(rewards.clone(), mask, index, norm_adv_by_std_in_grpo=norm)[0]
    theirs = core.compute_grpo_outcome_advantage(rewards.clone(), mask, index, norm_adv_by_std_in_grpo=norm)[0]
    trainer_close(ours, theirs, "grpo")
    cfg = AlgoConfig(norm_adv_by_std_in_grpo=norm)
    ours = lk_verl.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, index, config=cfg)[0]
    theirs = core.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, index, config=cfg)[0]
    trainer_close(ours, theirs, "grpo_passk")


def test_advantage_errors_like_verl():
    rewards, mask, index = verl_batch([2, 1], 5, "cpu")
    for fn in (lk_verl.compute_grpo_passk_outcome_advantage, core.compute_grpo_passk_outcome_advantage):
        with pytest.raises(ValueError, match="at least 2"):
            fn(rewards.clone(), mask, index, config=AlgoConfig())
    with pytest.raises(ValueError, match="needs config"):
        lk_verl.compute_grpo_passk_outcome_advantage(rewards, mask, index)
    with pytest.raises(ValueError, match="one group label per response"):
        lk_verl.compute_grpo_outcome_advantage(rewards, mask, index[:2])


def test_index_forms():
    """uid strings, integer arrays, lists and tensors group the same way."""
    rewards, mask, index = verl_batch([2, 3, 1], 6, "cpu")
    codes = {u: i * 7 for i, u in enumerate(dict.fromkeys(index))}
    as_int = np.array([codes[u] for u in index])
    expected = core.compute_rloo_outcome_advantage(rewards.clone(), mask, index)[0]
    for form in (index, list(index), as_int, torch.from_numpy(as_int)):
        trainer_close(
            lk_verl.compute_rloo_outcome_advantage(rewards, mask, form)[0], expected, f"{type(form).__name__}"
        )


# --- torch.compile -------------------------------------------------------------------------------


def test_token_ops_trace_under_torch_compile():
    """The drop-ins trace into one graph (torch.compile fullgraph), the KL and aggregation included."""
    torch._dynamo.reset()
    logits, labels = torch.randn(11, 97), torch.randint(0, 97, (11,))
    ref_lp = torch.randn(11)
    mask = torch.rand(1, 11) > 0.2

    def step(x):
        lp = lk_verl.logprobs_from_logits(x, labels, inplace_backward=False)
        ent = lk_verl.entropy_from_logits(x)
        kl = lk_verl.kl_penalty(lp, ref_lp, "low_var_kl")
        return lk_verl.agg_loss(kl[None], mask, "token-mean") + ent.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(logits)
    trainer_close(compiled, step(logits), "compiled step")


def test_entropy_under_verls_compile():
    """verl's engines call torch.compile(entropy_from_logits, dynamic=True) (no fullgraph): new
    lengths reuse the graph and the gradient flows."""
    torch._dynamo.reset()
    compiled = torch.compile(lk_verl.entropy_from_logits, dynamic=True, backend="aot_eager")
    for n in (7, 19, 33):  # three lengths: dynamic shapes, not one graph per length
        x = torch.randn(n, 131, requires_grad=True)
        h = compiled(x)
        trainer_close(h, verl_F.entropy_from_logits(x.detach()), f"entropy n={n}")
        h.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


# --- patch() -------------------------------------------------------------------------------------


def _owner(name: str):
    """The verl module a PATCHED_NAMES function lives in."""
    return next(m for m in (core, verl_F, rollout_corr) if hasattr(m, name))


def _originals():
    return {name: getattr(_owner(name), name) for name in lk_verl.PATCHED_NAMES}


def test_import_does_not_patch():
    assert not lk_verl.is_patched()
    for name, fn in _originals().items():
        assert fn is not getattr(lk_verl, name), f"verl's {name} was replaced without patch()"
    assert core.POLICY_LOSS_REGISTRY["vanilla"] is core.compute_policy_loss_vanilla


def test_patch_and_unpatch_swap_every_reference(monkeypatch):
    losses = trainer_module("verl.workers.utils.losses")
    before = _originals()
    registries = (dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY))
    assert losses.agg_loss is before["agg_loss"]  # bound there with `from ... import`
    replaced = lk_verl.patch()
    try:
        assert "verl.workers.utils.losses.agg_loss" in replaced
        assert "verl.trainer.ppo.core_algos.compute_policy_loss_vanilla" in replaced
        for name in lk_verl.PATCHED_NAMES:
            assert getattr(_owner(name), name) is getattr(lk_verl, name), name
        assert losses.agg_loss is lk_verl.agg_loss and losses.kl_penalty is lk_verl.kl_penalty
        for name, fn in lk_verl.POLICY_LOSSES.items():
            assert core.get_policy_loss_fn(name) is fn
        for name, fn in lk_verl.ADVANTAGE_ESTIMATORS.items():
            assert core.get_adv_estimator_fn(name) is fn
        assert core.get_policy_loss_fn("bypass_mode") is registries[0]["bypass_mode"]  # not covered: verl's
        # a verl module imported while patched binds the drop-in; unpatch() must reach it too
        late = types.ModuleType("verl._lenkernels_probe")
        late.logprobs_from_logits = verl_F.logprobs_from_logits
        monkeypatch.setitem(sys.modules, late.__name__, late)
    finally:
        lk_verl.unpatch()
    assert not lk_verl.is_patched()
    assert _originals() == before
    assert (dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY)) == registries
    assert losses.agg_loss is before["agg_loss"]
    assert late.logprobs_from_logits is before["logprobs_from_logits"]


def test_patch_nests_excludes_and_restores_on_error():
    before = _originals()
    with lk_verl.patched(exclude=("logprobs_from_logits", "compute_policy_loss_gspo")):
        assert verl_F.logprobs_from_logits is before["logprobs_from_logits"]
        assert core.POLICY_LOSS_REGISTRY["gspo"] is before["compute_policy_loss_gspo"]
        assert verl_F.entropy_from_logits is lk_verl.entropy_from_logits
        lk_verl.patch()  # nested: a no-op that needs its own unpatch
        lk_verl.unpatch()
        assert verl_F.entropy_from_logits is lk_verl.entropy_from_logits
    assert _originals() == before
    with pytest.raises(RuntimeError, match="boom"), lk_verl.patched():
        raise RuntimeError("boom")
    assert _originals() == before and not lk_verl.is_patched()
    with pytest.raises(ValueError, match="does not replace"):
        lk_verl.patch(exclude=("compute_policy_loss_bypass_mode",))
    assert not lk_verl.is_patched()


def test_patched_verl_ppo_loss_end_to_end():
    """verl's own actor loss (workers/utils/losses.ppo_loss: padding of packed outputs, the policy
    loss from the registry, the entropy bonus and the low-variance KL through agg_loss) with its
    log-probs and entropy from verl_F: patched and unpatched give the same loss, metrics and
    d loss / d logits."""
    losses = trainer_module("verl.workers.utils.losses")
    from verl.utils import tensordict_utils as tu

    B, P, R, V = 4, 5, 9, 211  # left-padded prompts of unequal length, ragged responses, odd V
    prompt_len, response_len = torch.tensor([5, 2, 3, 1]), torch.tensor([9, 1, 4, 6])
    attention = torch.zeros(B, P + R, dtype=torch.long)
    for b in range(B):
        attention[b, P - prompt_len[b] : P] = 1
        attention[b, P : P + response_len[b]] = 1
    response_mask = (torch.arange(R)[None] < response_len[:, None]).long()
    data = tu.get_tensordict(
        {"prompts": torch.randint(0, V, (B, P)), "responses": torch.randint(0, V, (B, R)), "attention_mask": attention,
         "response_mask": response_mask, "old_log_probs": -torch.rand(B, R) * 4, "advantages": torch.randn(B, R),
         "ref_log_prob": -torch.rand(B, R) * 4},
        {"dp_size": 1, "batch_num_tokens": int(response_mask.sum()), "global_batch_size": B},
    )  # fmt: skip
    nnz = int(attention.sum())
    logits, ids = torch.randn(nnz, V) * 2, torch.randint(0, V, (nnz,))

    def run(loss_mode):
        cfg = actor_config(use_kl_loss=True, kl_loss_type="low_var_kl", entropy_coeff=0.01,
                           policy_loss=verl_config.PolicyLossConfig(loss_mode=loss_mode))  # fmt: skip
        x = logits.clone().requires_grad_(True)
        out = {"log_probs": verl_F.logprobs_from_logits(x, ids, inplace_backward=False),
               "entropy": verl_F.entropy_from_logits(x)}  # fmt: skip
        loss, metrics = losses.ppo_loss(cfg, out, data)
        loss.backward()
        values = {k: (m.aggregate() if hasattr(m, "aggregate") else m) for k, m in metrics.items()}
        return loss, x.grad, {k: float(v) for k, v in values.items()}

    for loss_mode in ("vanilla", "gspo", "geo_mean"):
        loss_v, grad_v, metrics_v = run(loss_mode)
        with lk_verl.patched():
            loss, grad, metrics = run(loss_mode)
        trainer_close(loss, loss_v, f"{loss_mode} loss")
        trainer_close(grad, grad_v, f"{loss_mode} d logits")
        assert list(metrics) == list(metrics_v)
        for k in metrics_v:
            assert math.isclose(metrics[k], metrics_v[k], rel_tol=1e-5, abs_tol=1e-6), (k, metrics[k], metrics_v[k])


def test_patched_bypass_mode_dispatches_to_the_drop_ins():
    """bypass_mode (not replaced) looks compute_policy_loss_vanilla/_reinforce up in core_algos at
    call time, so it runs the drop-ins once patched; the numbers stay verl's."""
    from verl.trainer.config import RolloutCorrectionConfig

    lp, old, adv, mask, _ = batch(5, 17, "cpu")
    for loss_type in ("ppo_clip", "reinforce"):
        rc = RolloutCorrectionConfig(loss_type=loss_type, rollout_is="token", rollout_is_threshold=2.0)
        cfg = actor_config(policy_loss=verl_config.PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc))
        theirs = _run_loss(core.get_policy_loss_fn("bypass_mode"), lp, old, adv, mask, "token-mean", cfg)
        with lk_verl.patched():
            assert core.compute_policy_loss_vanilla is lk_verl.compute_policy_loss_vanilla
            ours = _run_loss(core.get_policy_loss_fn("bypass_mode"), lp, old, adv, mask, "token-mean", cfg)
        trainer_close(ours[0], theirs[0], f"{loss_type} loss", scale=float(adv.abs().max()))
        trainer_close(ours[2], theirs[2], f"{loss_type} d log_prob")
        same_metrics(ours[1], theirs[1])


@pytest.mark.slow
def test_ray_worker_setup_hook_patches_every_worker():
    """The one-line swap for a verl run: Ray calls patch() in each worker process it starts (verl's
    ``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=lenkernels.integrations.verl.patch``)."""
    ray = pytest.importorskip("ray", reason="ray is not installed")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "lenkernels.integrations.verl.patch"})  # fmt: skip
    try:

        @ray.remote
        def probe():
            import verl.trainer.ppo.core_algos as worker_core
            import verl.utils.torch_functional as worker_F

            return worker_F.logprobs_from_logits.__module__, worker_core.get_policy_loss_fn("vanilla").__module__

        assert ray.get(probe.remote()) == (lk_verl.__name__, lk_verl.__name__)
    finally:
        ray.shutdown()
    assert not lk_verl.is_patched()  # only the workers were patched


def test_importing_the_integrations_imports_no_trainer():
    """verl and TRL are optional: the integration modules import neither (only patch() does)."""
    import subprocess

    code = ("import sys, lenkernels.integrations.verl, lenkernels.integrations.trl; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('verl', 'trl')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
