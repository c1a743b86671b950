"""verl's covariance, DPPO and DRO policy losses (``clip_cov``, ``kl_cov``, ``dppo_tv``,
``dppo_kl``, ``dro`` of ``POLICY_LOSS_REGISTRY``) against verl's own functions on fresh random
inputs: value, gradient, metrics and dtype, over the aggregation modes, masks and rollout weights;
and the selection op behind the covariance losses, ``lenkernels.cov_select``."""

from __future__ import annotations

import math
import types

import pytest
import torch

from tests.utils import backend_params, trainer_close, trainer_module

core = trainer_module("verl.trainer.ppo.core_algos")
verl_actor = trainer_module("verl.workers.config.actor")

import lenkernels
from lenkernels.integrations import verl as lk_verl
from lenkernels.integrations._verl_objectives import _NO_CLIP

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
COV = ("clip_cov", "kl_cov")


def actor_config(**policy_loss):
    return verl_actor.ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2, clip_ratio_high=0.28,
        policy_loss=verl_actor.PolicyLossConfig(**policy_loss),
    )  # fmt: skip


# ratios well above verl's 2e-4 default so that a test batch selects several tokens (the default
# selects one); clip_cov's band [0.1, 3] holds many of this batch's covariances
CONFIGS = {
    "clip_cov": dict(loss_mode="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.1, clip_cov_ub=3.0),
    "kl_cov": dict(loss_mode="kl_cov", kl_cov_ratio=0.05, ppo_kl_coef=0.7),
}

# the same losses with no selected token acting (clip_cov: a band no covariance reaches)
NOTHING = {"clip_cov": dict(clip_cov_lb=50.0, clip_cov_ub=60.0), "kl_cov": dict(ppo_kl_coef=0.0)}


def batch(B, T, device, *, seed=0):
    """Padded [B, T] inputs with an all-masked row and a one-token row on purpose; masked positions
    hold finite garbage. Log-ratios of spread 0.6 put tokens on both sides of the PPO band."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + torch.randn(B, T, generator=g) * 0.6
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False
    mask[1] = False
    mask[1, T // 2] = True
    w = torch.rand(B, T, generator=g) + 0.5
    return [x.to(device) for x in (lp, old, adv, mask.float(), w)]


def run(fn, old, lp, adv, mask, mode, cfg, w, *, seed=1234):
    """``fn``'s loss, metrics and d loss / d log_prob, with torch's RNG seeded (clip_cov draws from
    it); also the next draw of the RNG, which shows how much of it ``fn`` consumed."""
    x = lp.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss, metrics = fn(old, x, adv, mask, mode, cfg, w)
    after = torch.rand(4)
    (loss * 1.3).backward()
    return loss, metrics, x.grad, after


def both(name, old, lp, adv, mask, mode, cfg, w, **kw):
    """:func:`run` of the drop-in ``name`` and of verl's registry entry on the same inputs."""
    ours = run(lk_verl.EXTRA_POLICY_LOSSES[name], old, lp, adv, mask, mode, cfg, w, **kw)
    theirs = run(core.get_policy_loss_fn(name), old, lp, adv, mask, mode, cfg, w, **kw)
    return ours, theirs


def same_metrics(ours: dict, theirs: dict, name: str):
    assert list(ours) == list(theirs), (name, list(ours), list(theirs))
    for key, value in theirs.items():
        assert isinstance(ours[key], float), (name, key, type(ours[key]))
        assert math.isclose(ours[key], value, rel_tol=1e-5, abs_tol=1e-6), (name, key, ours[key], value)


def check(name, ours, theirs, mask, *, scale):
    trainer_close(ours[0], theirs[0], f"{name} loss", scale=scale)
    assert ours[0].dtype == theirs[0].dtype and ours[0].shape == theirs[0].shape, (ours[0].dtype, theirs[0].dtype)
    same_metrics(ours[1], theirs[1], name)
    trainer_close(ours[2], theirs[2], f"{name} d log_prob")
    assert bool((ours[2][mask == 0] == 0).all()), f"{name}: masked tokens got a gradient"
    assert torch.equal(ours[3], theirs[3]), f"{name}: the RNG was advanced differently from verl"


def config_for(name):
    """The test configuration of any loss of ``EXTRA_POLICY_LOSSES`` (``fused_config`` below)."""
    return actor_config(**CONFIGS[name]) if name in COV else fused_config(name)


def dtype_runs(name, dtype, mask_dtype, *, half_rtol):
    """Both losses on ``batch``'s inputs in ``dtype`` (mask in ``mask_dtype``), unweighted token-mean
    and weighted seq-mean-token-mean: the result dtypes compared, and the loss, gradient and metrics
    to float64/float32 precision; in half precision the loss only, within ``half_rtol``. Returns
    ``(label, ours, theirs)`` per mode for the loss's own checks."""
    lp, old, adv, mask, w = (x.to(dtype) for x in batch(5, 48, "cpu"))
    mask = mask.to(mask_dtype)
    cfg = config_for(name)
    runs = []
    for mode, weights in (("token-mean", None), ("seq-mean-token-mean", w)):
        ours, theirs = both(name, old, lp, adv, mask, mode, cfg, weights)
        label = f"{name} {dtype} {mask_dtype} {mode}"
        assert ours[0].dtype == theirs[0].dtype, (label, ours[0].dtype, theirs[0].dtype)
        assert ours[2].dtype == theirs[2].dtype
        if dtype in (torch.float64, torch.float32):
            rtol = 1e-12 if dtype == torch.float64 else 2e-5
            trainer_close(ours[0], theirs[0], f"{label} loss", rtol=rtol, scale=float(adv.abs().max()))
            trainer_close(ours[2], theirs[2], f"{label} d log_prob", rtol=rtol)
            same_metrics(ours[1], theirs[1], label)
        else:
            trainer_close(ours[0].float(), theirs[0].float(), f"{label} loss", rtol=half_rtol,
                          scale=float(adv.abs().max()))  # fmt: skip
        runs.append((label, ours, theirs))
    return runs


# --- the covariance losses -----------------------------------------------------------------------


@pytest.mark.parametrize("name", COV)
def test_cov_losses_default_config_and_seeds(name):
    """verl's defaults (ratio 2e-4: one token; clip_cov band [1, 5]) and several seeds of the draw:
    the same tokens as verl each time."""
    lp, old, adv, mask, w = batch(6, 300, "cpu", seed=3)
    adv = adv * 3  # covariances inside clip_cov's default band [1, 5]
    cfg = actor_config(loss_mode=name)
    for seed in range(4):
        ours, theirs = both(name, old, lp, adv, mask, "token-mean", cfg, w, seed=seed)
        check(f"{name} seed {seed}", ours, theirs, mask, scale=float(adv.abs().max()))
        if name == "clip_cov":  # the default band held candidates: the draw happened
            assert ours[1]["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("name", COV)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_cov_losses_dtypes(name, dtype, mask_dtype):
    """verl's result dtype for every input dtype; float64 to float64 precision. In half precision
    verl's ratio is rounded to the half dtype and the fused op's is not, which moves tokens across
    the PPO band (a kink of the loss): there the loss and dtype are compared, the selection too
    (through the metric), the gradient only by its dtype."""
    for label, ours, theirs in dtype_runs(name, dtype, mask_dtype, half_rtol=3e-2):
        assert torch.equal(ours[3], theirs[3]), label
        if name == "clip_cov" and dtype not in (torch.float64, torch.float32):
            # the fraction of selected tokens: the same selection
            assert ours[1]["actor/pg_clipfrac"] == pytest.approx(theirs[1]["actor/pg_clipfrac"], rel=1e-6)


def test_kl_cov_selects_verls_tokens_per_gradient():
    """The tokens KL-Cov selects carry the extra ``coef * sign(l)`` in their gradient: with A = 0
    (no policy gradient) the gradient is exactly that term, so its support is the selection."""
    lp, old, _, mask, _ = batch(6, 50, "cpu")
    adv = torch.zeros_like(lp)
    adv[:, ::3] = 1.0  # a covariance needs varying advantages; A = 0 tokens keep a pure KL gradient
    cfg = actor_config(loss_mode="kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.5)
    ours = run(lk_verl.compute_policy_loss_kl_cov, old, lp, adv, mask, "token-sum", cfg, None)
    theirs = run(core.compute_policy_loss_kl_cov, old, lp, adv, mask, "token-sum", cfg, None)
    check("kl_cov A=0", ours, theirs, mask, scale=1.0)
    sel = lenkernels.cov_select(lp, adv, mask, method="kl_cov", ratio=0.1)
    zero_a = adv == 0
    assert torch.equal((ours[2] != 0) & zero_a, sel & zero_a)


def test_cov_losses_no_valid_token():
    """A micro-batch whose mask is all 0: nothing selected; verl's token-mean is 0/0 (NaN) there and
    the drop-in's 0 (lenkernels/integrations/verl.py, 'Differences'); token-sum agrees."""
    lp, old, adv, _, w = batch(3, 9, "cpu")
    mask = torch.zeros_like(lp)
    for name in COV:
        cfg = actor_config(**CONFIGS[name])
        ours, theirs = both(name, old, lp, adv, mask, "token-sum", cfg, w)
        check(f"{name} empty", ours, theirs, mask, scale=1.0)
        loss, _ = lk_verl.EXTRA_POLICY_LOSSES[name](old, lp, adv, mask, "token-mean", cfg, w)
        assert float(loss) == 0.0


def test_cov_loss_errors():
    lp, old, adv, mask, _ = batch(2, 5, "cpu")
    cfg = actor_config(loss_mode="clip_cov")
    cfg_no_pl = types.SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, policy_loss=None,
                                      global_batch_info={})  # fmt: skip
    for name in COV:
        fn = lk_verl.EXTRA_POLICY_LOSSES[name]
        with pytest.raises(ValueError, match="needs config"):
            fn(old, lp, adv, mask)
        with pytest.raises(ValueError, match="policy_loss"):
            fn(old, lp, adv, mask, "token-mean", cfg_no_pl)
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            fn(old, lp, adv, mask, "mean", cfg)
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        lk_verl.compute_policy_loss_clip_cov(old, lp, adv, mask, config=actor_config(clip_cov_ratio=-0.1))
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        lk_verl.compute_policy_loss_kl_cov(old, lp, adv, mask, config=actor_config(kl_cov_ratio=0.0))


# --- DPPO and DRO: modes of the fused op --------------------------------------------------------

FUSED = ("dppo_tv", "dppo_kl", "dro")


def fused_config(name, **kw):
    """Thresholds that put tokens on both sides of DPPO's trust region for ``batch``'s inputs
    (probabilities moved by up to ~0.3), and a truncation C the ratio exceeds."""
    if name == "dro":
        return actor_config(loss_mode="dro", dro_beta=0.3)
    low, high = (0.1, 0.15) if name == "dppo_tv" else (0.05, 0.08)
    return verl_actor.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=low,
                                  clip_ratio_high=high, clip_ratio_c=1.3, **kw)  # fmt: skip


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_dppo_and_dro_dtypes(name, dtype, mask_dtype):
    """verl's result dtype for every input dtype (DPPO's is float32 at least: verl multiplies by
    the float32 region mask); float64 to float64 precision. In half precision verl computes the
    probabilities, their difference and the binary KL in the half dtype, the fused op in float32
    from the same values: a token at the region's edge may fall on the other side, so the loss
    is compared loosely and the gradient by its dtype."""
    dtype_runs(name, dtype, mask_dtype, half_rtol=5e-2)


def test_dppo_truncation_default_and_dict_config():
    """verl reads ``config.get("clip_ratio_c", 20.0)``: an omegaconf config without it truncates at
    20 (an ActorConfig carries 3.0)."""
    omegaconf = pytest.importorskip("omegaconf")
    lp, old, adv, mask, w = batch(5, 30, "cpu")
    old = lp - 3.5 * (torch.rand_like(lp) > 0.7)  # ratios e^3.5 ~ 33 > 20 on some tokens
    cfg = omegaconf.OmegaConf.create(dict(clip_ratio=0.5, clip_ratio_low=None, clip_ratio_high=None,
                                          global_batch_info={}))  # fmt: skip
    for name in ("dppo_tv", "dppo_kl"):
        ours, theirs = both(name, old, lp, adv, mask, "token-mean", cfg, w)
        check(f"{name} dict config", ours, theirs, mask, scale=float(adv.abs().max()))
        assert ours[1]["actor/pg_clipfrac_lower"] > 0.0


def test_dppo_and_dro_errors():
    lp, old, adv, mask, _ = batch(2, 5, "cpu")
    for name in FUSED:
        with pytest.raises(ValueError, match="needs config"):
            lk_verl.EXTRA_POLICY_LOSSES[name](old, lp, adv, mask)
    for beta in (None, 0.0, -1.0):
        with pytest.raises(ValueError, match="dro_beta"):  # verl's message
            lk_verl.compute_policy_loss_dro(old, lp, adv, mask, config=actor_config(loss_mode="dro", dro_beta=beta))
    bad_c = verl_actor.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_c=0.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        lk_verl.compute_policy_loss_dppo_tv(old, lp, adv, mask, config=bad_c)


@pytest.mark.parametrize("shape", [(0, 7), (3, 0)], ids=["no_rows", "no_columns"])
def test_empty_micro_batches_give_verls_results(shape):
    """An empty micro-batch: verl's results (a zero loss, zero metrics), not the fused op's
    empty-batch error."""
    x, mask = torch.zeros(shape), torch.ones(shape, dtype=torch.bool)
    for name, fn in lk_verl.EXTRA_POLICY_LOSSES.items():
        cfg = config_for(name)
        ours = fn(x, x, x, mask, "token-sum", cfg)
        theirs = core.get_policy_loss_fn(name)(x, x, x, mask, "token-sum", cfg)
        assert torch.equal(ours[0], theirs[0]) and ours[0].dtype == theirs[0].dtype, (name, ours[0], theirs[0])
        assert ours[1] == theirs[1], (name, ours[1], theirs[1])


# --- every loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", COV + FUSED)
@pytest.mark.parametrize("mode", AGGS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "rollout_is"])
def test_losses_match_verl(device, name, mode, weighted):
    lp, old, adv, mask, w = batch(8, 64, device)
    cfg = config_for(name)
    weights = w if weighted else None
    ours, theirs = both(name, old, lp, adv, mask, mode, cfg, weights)
    check(f"{name} {mode}", ours, theirs, mask, scale=float(adv.abs().max()))
    if name in COV:
        # the selection acted: selected tokens lose (clip_cov) or gain (kl_cov) a term, so the loss
        # differs from the same loss with nothing selected
        nothing = actor_config(**{**CONFIGS[name], **NOTHING[name]})
        plain = run(lk_verl.EXTRA_POLICY_LOSSES[name], old, lp, adv, mask, mode, nothing, weights)
        assert not torch.equal(plain[2], ours[2]), f"{name}: no token was selected in the test batch"
    elif name != "dro":  # both sides of the trust region and of the truncation are in the batch
        assert 0.0 < ours[1]["actor/pg_clipfrac"] < 0.9 and ours[1]["actor/pg_clipfrac_lower"] > 0.0, ours[1]


@pytest.mark.parametrize("name", COV + FUSED)
def test_losses_with_global_batch_info(name):
    """verl's global normalisers (config.global_batch_info) and dp_size."""
    lp, old, adv, mask, w = batch(4, 40, "cpu")
    cfg = config_for(name)
    cfg.global_batch_info.update(dp_size=3, batch_num_tokens=97, global_batch_size=11, loss_scale_factor=64)
    for mode in ("token-mean", "seq-mean-token-sum-norm"):
        ours, theirs = both(name, old, lp, adv, mask, mode, cfg, w)
        check(f"{name} {mode}", ours, theirs, mask, scale=float(adv.abs().max()))


# --- the kl_cov composition on every backend of the fused op ---------------------------------------


@pytest.mark.parametrize("backend,device", backend_params("policy_loss"))
def test_kl_cov_fused_form_on_every_backend(backend, device):
    """``-A r + c |l| [selected]`` as one policy_loss call: ppo with bounds that never bind and the
    ``abs`` KL against ``where(selected, old, logprobs)``; the unselected tokens' |0| must have
    gradient 0 on every backend (and |l| its sign elsewhere). Log-ratios up to +-8 reach far outside
    any PPO band."""
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(4, 13, generator=g) * 3).to(device)
    old = lp + (torch.randn(4, 13, generator=g) * 4).clamp(-8, 8).to(device)
    adv = torch.randn(4, 13, generator=g).to(device)
    mask = (torch.rand(4, 13, generator=g) > 0.2).to(device)
    sel = (torch.rand(4, 13, generator=g) > 0.6).to(device) & mask
    coef = 0.7
    x = lp.clone().requires_grad_(True)
    ref = torch.where(sel, old, x.detach())
    out = lenkernels.policy_loss(x, old, adv, mask, mode="ppo", **_NO_CLIP, ref_logprobs=ref, kl_coef=coef,
                                 kl_estimator="abs", agg="token-sum", backend=backend)  # fmt: skip
    out.loss.backward()
    y = lp.double().clone().requires_grad_(True)
    l = y - old.double()
    eager = (-adv.double() * torch.exp(l) + coef * l.abs() * sel) * mask
    eager.sum().backward()
    trainer_close(out.loss.double(), eager.sum().detach(), "kl_cov fused loss", rtol=2e-5)
    trainer_close(x.grad.double(), y.grad, "kl_cov fused d log_prob", rtol=2e-5)
    # an unselected token whose log-ratio is 0 gets exactly -A (no KL gradient at |0|)
    x2 = old.clone().requires_grad_(True)
    out2 = lenkernels.policy_loss(x2, old, adv, mask, mode="ppo", **_NO_CLIP, ref_logprobs=x2.detach(), kl_coef=coef,
                                  kl_estimator="abs", agg="token-sum", backend=backend)  # fmt: skip
    out2.loss.backward()
    assert torch.equal(x2.grad, torch.where(mask, -adv, 0.0)), "the abs KL gave a gradient at |0|"


# --- cov_select ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_cov_select_properties(device):
    lp, old, adv, mask, _ = batch(6, 40, device)
    valid = mask > 0
    n = int(valid.sum())
    sel = lenkernels.cov_select(lp, adv, mask, method="kl_cov", ratio=0.1)
    assert sel.dtype == torch.bool and sel.shape == lp.shape
    assert not bool((sel & ~valid).any()), "a masked token was selected"
    assert int(sel.sum()) == max(1, int(n * 0.1))
    a, l = adv[valid], lp[valid]
    cov = (a - a.mean()) * (l - l.mean())
    assert float(cov[sel[valid]].min()) >= float(cov[~sel[valid]].max()), "not the largest covariances"
    gen = torch.Generator().manual_seed(0)
    sel = lenkernels.cov_select(lp, adv, mask, method="clip_cov", ratio=0.05, lb=0.1, ub=3.0, old_logprobs=old,
                                clip_low=0.2, clip_high=0.28, generator=gen)  # fmt: skip
    assert not bool((sel & ~valid).any())
    assert 1 <= int(sel.sum()) <= max(int(0.05 * n), 1)
    r = torch.exp(lp - old)
    clipped = (-adv * r.clamp(0.8, 1.28)) > (-adv * r)
    assert not bool((sel & clipped).any()), "a token the PPO clip already clips was selected"
    cov = (adv - adv[valid].mean()) * (lp - lp[valid].mean())
    assert bool(((cov[sel] > 0.1) & (cov[sel] < 3.0)).all()), "a token outside the band was selected"


def test_cov_select_packed_and_per_sequence_advantages():
    """The selection looks at the valid tokens only: packed [N] inputs (the valid tokens in order)
    select the same tokens as the padded batch; [B] advantages act as [B, T] ones."""
    lp, old, adv, mask, _ = batch(6, 40, "cpu")
    valid = mask > 0
    padded = lenkernels.cov_select(lp, adv, mask, method="kl_cov", ratio=0.1)
    packed = lenkernels.cov_select(lp[valid], adv[valid], method="kl_cov", ratio=0.1)
    assert torch.equal(padded[valid], packed)
    seq_adv = torch.randn(6)
    a = lenkernels.cov_select(lp, seq_adv, mask, method="kl_cov", ratio=0.1)
    b = lenkernels.cov_select(lp, seq_adv[:, None].expand(6, 40).contiguous(), mask, method="kl_cov", ratio=0.1)
    assert torch.equal(a, b)
    for seed in range(3):  # clip_cov's draw: the same generator state, the same tokens
        kw = dict(method="clip_cov", ratio=0.05, lb=0.1, ub=3.0, clip_low=0.2)
        x = lenkernels.cov_select(lp, adv, mask, old_logprobs=old, generator=torch.Generator().manual_seed(seed), **kw)
        y = lenkernels.cov_select(lp[valid], adv[valid], old_logprobs=old[valid],
                                  generator=torch.Generator().manual_seed(seed), **kw)  # fmt: skip
        assert torch.equal(x[valid], y)


# --- patch ------------------------------------------------------------------------------------------


def test_patch_swaps_the_registry_entries():
    with lk_verl.patched():
        for key, fn in lk_verl.EXTRA_POLICY_LOSSES.items():
            assert core.get_policy_loss_fn(key) is fn, key
            assert getattr(core, fn.__name__) is fn, key
    for key, fn in lk_verl.EXTRA_POLICY_LOSSES.items():
        assert core.get_policy_loss_fn(key) is not fn, key
    with lk_verl.patched(exclude=("compute_policy_loss_dro", "compute_policy_loss_clip_cov")):
        assert core.get_policy_loss_fn("dro") is core.compute_policy_loss_dro is not lk_verl.compute_policy_loss_dro
        assert core.get_policy_loss_fn("clip_cov") is not lk_verl.compute_policy_loss_clip_cov
        assert core.get_policy_loss_fn("kl_cov") is lk_verl.compute_policy_loss_kl_cov


def test_patched_verl_calls_through_the_registry():
    """verl's actor looks the loss up by ``policy_loss.loss_mode``: under patch() that is the drop-in,
    and it returns what verl's own function returns (same seed)."""
    lp, old, adv, mask, w = batch(6, 40, "cpu")
    for name in lk_verl.EXTRA_POLICY_LOSSES:
        cfg = config_for(name)
        theirs = run(core.get_policy_loss_fn(name), old, lp, adv, mask, "token-mean", cfg, w)
        with lk_verl.patched():
            ours = run(core.get_policy_loss_fn(name), old, lp, adv, mask, "token-mean", cfg, w)
        check(f"patched {name}", ours, theirs, mask, scale=float(adv.abs().max()))
