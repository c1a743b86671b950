"""Where verl and TRL differ, an argument of policy_loss selects the convention; each test pins one
to the trainer's own formula, written out here from the trainer's code and documentation (verl
``core_algos``: ``compute_policy_loss_{vanilla,gspo,geo_mean,sapo,cispo}``, ``agg_loss``,
``kl_penalty``, and the actor's loss composition; TRL ``GRPOTrainer._compute_loss`` and
``get_high_entropy_mask``), evaluated in float64 with autograd: value and d loss / d logprobs.
"""

from __future__ import annotations

import pytest
import torch

import lenkernels as lk
from tests.utils import assert_close, backend_params, policy_batch

BACKENDS = backend_params("policy_loss")


def ours(batch, backend, device, **kw):
    x = batch.lp.clone().to(device).requires_grad_(True)
    dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    out = lk.policy_loss(x, batch.old.to(device), batch.adv.to(device), batch.mask.to(device), backend=backend, **dev)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def theirs(formula, batch, **kw):
    """The trainer's formula in float64 on the same values: (loss, d loss / d logprobs, extras)."""
    lp = batch.lp.double().requires_grad_(True)
    loss, extra = formula(lp, batch.old.double(), batch.adv.double(), batch.mask.double(), **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, extra


def same(out, grad, want, name="loss"):
    loss, e_grad, _ = want
    assert_close(out.loss, loss, rtol=2e-5, atol=1e-6 * max(1.0, abs(float(loss))), name=name)
    assert_close(grad, e_grad, rtol=2e-5, atol=1e-6 * float(e_grad.abs().max()), name=f"d{name}")


def _batch(device, B=5, T=33, per_token_adv=False):
    return policy_batch(B, T, per_token_adv=per_token_adv, garbage=False)  # trainers multiply by the mask: no NaN


# --- verl ---------------------------------------------------------------------------------------


def verl_agg_loss(loss_mat, loss_mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):  # fmt: skip
    """verl agg_loss (data-parallel form): token-mean divides by the (global) token count; the
    seq-mean modes by the (global) count of sequences with a token, times dp_size."""
    if mode == "token-mean":
        n = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * loss_mask).sum() / n * dp_size
    counts = loss_mask.sum(-1)
    seq_mask = (counts > 0).to(loss_mat.dtype)
    gbs = seq_mask.sum() if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-mean":
        return ((loss_mat * loss_mask).sum(-1) / (counts + 1e-8) * seq_mask).sum() / gbs * dp_size
    loss = ((loss_mat * loss_mask).sum(-1) * seq_mask).sum() / gbs * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def verl_vanilla(lp, old, adv, mask, clip_low, clip_high, clip_ratio_c, agg="token-mean", is_weights=None, **agg_kw):
    """verl compute_policy_loss_vanilla: ratio of the clamped log-ratio, clip, dual clip for A < 0."""
    neg_kl = torch.clamp(lp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * clip_ratio_c
    c2 = torch.min(l3, c1)
    pg = torch.where(adv < 0, c2, c1)
    if is_weights is not None:
        pg = pg * is_weights
    metrics = {
        "pg_clipfrac": (torch.gt(l2, l1).double() * mask).sum() / mask.sum(),
        "pg_clipfrac_lower": ((torch.gt(c1, l3) & (adv < 0)).double() * mask).sum() / mask.sum(),
        "ppo_kl": (-neg_kl * mask).sum() / mask.sum(),
    }
    return verl_agg_loss(pg, mask, agg, **agg_kw), metrics


def verl_kl_penalty(lp, ref, kind):
    """verl kl_penalty: low_var_kl clamps; a trailing '+' takes k2's gradient (straight through)."""
    base = kind.rstrip("+")
    if base in ("kl", "k1"):
        forward = lp - ref
    elif base in ("mse", "k2"):
        forward = 0.5 * (lp - ref).square()
    else:
        kl = torch.clamp(ref - lp, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kind.endswith("+"):
        return forward
    backward = 0.5 * (lp - ref).square()
    return backward - backward.detach() + forward.detach()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_verl_vanilla_dual_clip_and_global_token_mean(backend, device):
    """verl vanilla PPO: clip_ratio_c = 3 (our clip_dual), clip-higher, token-mean over the global
    batch (batch_num_tokens, dp_size); its metrics pg_clipfrac = our low + high clip fractions,
    pg_clipfrac_lower = our dual clip fraction, ppo_kl = our approx_kl."""
    batch = _batch(device, per_token_adv=True)
    batch.old = batch.lp + torch.randn_like(batch.lp) * 1.5  # ratios up to e^4: dual clip active
    want = theirs(verl_vanilla, batch, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, dp_size=4,
                  batch_num_tokens=500.0)  # fmt: skip
    out, grad = ours(batch, backend, device, clip_low=0.2, clip_high=0.28, clip_dual=3.0, num_tokens=500, dp_size=4)
    same(out, grad, want)
    metrics = want[2]
    assert float(metrics["pg_clipfrac_lower"]) > 0
    assert_close(out.clip_frac_low + out.clip_frac_high, metrics["pg_clipfrac"], rtol=1e-6, atol=1e-6)
    assert_close(out.clip_frac_dual, metrics["pg_clipfrac_lower"], rtol=1e-6, atol=1e-6)
    assert_close(out.approx_kl, metrics["ppo_kl"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_verl_actor_composition(backend, device):
    """verl's actor: pg_loss (rollout IS weights multiply the policy term only) - entropy_coeff *
    agg(entropy) + kl_loss_coef * agg(kl_penalty(low_var_kl)), one loss_agg_mode for all three;
    seq-mean-token-sum-norm with global_batch_size and loss_scale_factor (Dr. GRPO's constant)."""
    batch = _batch(device)
    batch.ref[:, :2] = batch.lp[:, :2] + torch.tensor([25.0, -25.0])  # hits both k3 clamps
    ent, w = batch.ent.double(), batch.w.double()
    agg_kw = dict(dp_size=2, global_batch_size=16.0, loss_scale_factor=512.0)

    def formula(lp, old, adv, mask):
        pg, _ = verl_vanilla(lp, old, adv, mask, 0.2, 0.2, 3.0, "seq-mean-token-sum-norm", is_weights=w, **agg_kw)
        entropy_loss = verl_agg_loss(ent, mask, "seq-mean-token-sum-norm", **agg_kw)
        kl_loss = verl_agg_loss(verl_kl_penalty(lp, batch.ref.double(), "low_var_kl"), mask, "seq-mean-token-sum-norm",
                                **agg_kw)  # fmt: skip
        return pg - 0.01 * entropy_loss + 0.1 * kl_loss, None

    want = theirs(formula, batch)
    out, grad = ours(batch, backend, device, clip_dual=3.0, importance_weights=batch.w, entropy=batch.ent,
                     entropy_coef=0.01, ref_logprobs=batch.ref, kl_coef=0.1, kl_estimator="low_var_kl",
                     agg="seq-mean-token-sum-norm", num_seqs=16, norm_length=512, dp_size=2)  # fmt: skip
    same(out, grad, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_verl_kl_straight_through(backend, device):
    """verl "k3+": the value of low_var_kl with the gradient of k2 (added to a GPG policy term)."""
    batch = _batch(device)

    def formula(lp, old, adv, mask):
        pg = verl_agg_loss(-lp * adv.unsqueeze(-1), mask, "token-mean")  # verl compute_policy_loss_gpg
        return pg + verl_agg_loss(verl_kl_penalty(lp, batch.ref.double(), "k3+"), mask, "token-mean"), None

    out, grad = ours(batch, backend, device, mode="reinforce", ref_logprobs=batch.ref, kl_coef=1.0,
                     kl_estimator="k3+")  # fmt: skip
    same(out, grad, theirs(formula, batch))


def verl_gspo(lp, old, adv, mask, clip_low, clip_high):
    """verl compute_policy_loss_gspo: token form sg(s) * pi / sg(pi) with log s clamped at 10,
    aggregated seq-mean-token-mean whatever loss_agg_mode says."""
    neg_kl = lp - old
    seq_len = mask.sum(-1).clamp(min=1)
    neg_kl_seq = (neg_kl * mask).sum(-1) / seq_len
    log_s = torch.clamp(lp - lp.detach() + neg_kl_seq.detach().unsqueeze(-1), max=10.0)
    s = torch.exp(log_s)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    pg = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - clip_low, 1 + clip_high))
    return verl_agg_loss(pg, mask, "seq-mean-token-mean"), None


def verl_geo_mean(lp, old, adv, mask, clip_low, clip_high, is_weights=None):
    """verl compute_policy_loss_geo_mean (GMPO): sign-aware token clip of the log-ratio, sequence
    ratio = exp(masked mean), loss = torch.mean over every sequence of -A_seq * ratio."""
    neg_kl = lp - old
    adv = adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv
    sgn = torch.sign(adv)
    clamped = torch.clamp(neg_kl, -clip_low, clip_high)
    lmin = sgn * torch.min(sgn * neg_kl, sgn * clamped)
    n = mask.sum(-1)
    ratio = torch.exp((lmin * mask).sum(-1) / (n + 1e-8))
    seq_adv = (adv * mask).sum(-1) / (n + 1e-8)
    pg = -seq_adv * ratio
    if is_weights is not None:
        pg = pg * torch.exp((torch.log(is_weights + 1e-10) * mask).sum(-1) / (n + 1e-8))
    return torch.mean(pg), None


def verl_sapo(lp, old, adv, mask, tau_pos, tau_neg):
    """verl compute_policy_loss_sapo: gate sigmoid(tau (r - 1)) 4/tau, seq-mean-token-mean."""
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    taus = torch.where(adv > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    pg = -torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus) * adv
    return verl_agg_loss(pg, mask, "seq-mean-token-mean"), None


def verl_cispo(lp, old, adv, mask, clip_low, clip_high):
    """verl compute_policy_loss_cispo: -sg(clip(r)) A logprob; pg_clipfrac = mean(r != clip(r))."""
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    pg = -clipped.detach() * adv * lp
    return verl_agg_loss(pg, mask, "token-mean"), {"pg_clipfrac": ((ratio != clipped).double() * mask).sum() / mask.sum()}


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_verl_sequence_level_losses(backend, device):
    """GSPO (seq-mean-token-mean over non-empty sequences), GMPO (torch.mean over every sequence:
    num_seqs = B; IS weights folded in by their geometric mean), SAPO, CISPO."""
    batch = _batch(device)
    batch.old = batch.lp + torch.randn_like(batch.lp) * 0.3
    B = batch.lp.shape[0]
    same(*ours(batch, backend, device, mode="gspo", clip_low=3e-3, clip_high=4e-3),
         theirs(verl_gspo, batch, clip_low=3e-3, clip_high=4e-3), "gspo")  # fmt: skip
    same(*ours(batch, backend, device, mode="gmpo", clip_low=0.4, num_seqs=B, importance_weights=batch.w),
         theirs(verl_geo_mean, batch, clip_low=0.4, clip_high=0.4, is_weights=batch.w.double()), "gmpo")  # fmt: skip
    same(*ours(batch, backend, device, mode="sapo", tau_pos=1.0, tau_neg=1.05),
         theirs(verl_sapo, batch, tau_pos=1.0, tau_neg=1.05), "sapo")  # fmt: skip
    out, grad = ours(batch, backend, device, mode="cispo", clip_low=0.1, clip_high=0.15)
    want = theirs(verl_cispo, batch, clip_low=0.1, clip_high=0.15)
    same(out, grad, want, "cispo")
    assert_close(out.clip_frac_low + out.clip_frac_high, want[2]["pg_clipfrac"], rtol=1e-6, atol=1e-6)


# --- TRL ----------------------------------------------------------------------------------------


def trl_grpo(lp, old, adv, mask, *, loss_type, epsilon=0.2, epsilon_high=None, beta=0.0, ref=None, delta=None,
             level="token", max_completion_length=None, num_items_in_batch=None, num_processes=1,
             entropy_mask=None, is_ratio=None):  # fmt: skip
    """TRL GRPOTrainer._compute_loss: coef_1 = exp(log importance weight) (token or sequence
    level, no clamp), -min(coef_1 A, coef_2 A) (cispo: -sg(min(coef_1, epsilon_high)) A logprob),
    entropy mask, vLLM importance-sampling correction, + beta * k3 (unclamped), then the loss
    type's normalisation."""
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    log_ratio = lp - old
    if level == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_iw)
    adv = adv.unsqueeze(1)
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped * adv * lp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token_loss = per_token_loss + beta * kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "cispo"):
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / (num_items_in_batch / num_processes)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask.sum(-1, keepdim=True)).mean()
    return loss, None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_trl_loss_types(backend, device):
    """TRL's loss types with DAPO's clip-higher and TRL's unclamped k3 (kl_clamp=False):
    grpo = seq-mean-token-mean over every sequence (num_seqs=B, empty ones count), bnpo =
    token-mean, dr_grpo = seq-mean-token-sum-norm with B * max_completion_length, dapo = token-mean
    over num_items_in_batch / num_processes (num_tokens, dp_size)."""
    batch = _batch(device)
    B, T = batch.lp.shape
    ref = batch.ref.double()
    common = dict(clip_low=0.2, clip_high=0.28, ref_logprobs=batch.ref, kl_coef=0.04, kl_clamp=False)
    trl = dict(epsilon=0.2, epsilon_high=0.28, beta=0.04, ref=ref)
    cases = [
        ("grpo", dict(agg="seq-mean-token-mean", num_seqs=B), {}),
        ("bnpo", dict(agg="token-mean"), {}),
        ("dr_grpo", dict(agg="seq-mean-token-sum-norm", num_seqs=B, norm_length=256), dict(max_completion_length=256)),
        ("dapo", dict(agg="token-mean", num_tokens=300, dp_size=4), dict(num_items_in_batch=300, num_processes=4)),
    ]
    for loss_type, kw, extra in cases:
        same(*ours(batch, backend, device, **common, **kw), theirs(trl_grpo, batch, loss_type=loss_type, **trl, **extra),
             loss_type)  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_trl_gspo_luspo_cispo_delta(backend, device):
    """TRL GSPO (importance_sampling_level="sequence", loss_type grpo), LUSPO (|y| times the
    sequence loss, mean over B), CISPO (ratio capped at epsilon_high: our clip_low=1,
    clip_high=epsilon_high-1) and two-sided GRPO (delta: our dual clip)."""
    batch = _batch(device)
    batch.old = batch.lp + torch.randn_like(batch.lp) * 0.05
    B = batch.lp.shape[0]
    same(*ours(batch, backend, device, mode="gspo", clip_low=3e-4, clip_high=4e-4, num_seqs=B),
         theirs(trl_grpo, batch, loss_type="grpo", level="sequence", epsilon=3e-4, epsilon_high=4e-4), "gspo")  # fmt: skip
    same(*ours(batch, backend, device, mode="luspo", clip_low=3e-4, clip_high=4e-4, num_seqs=B),
         theirs(trl_grpo, batch, loss_type="luspo", level="sequence", epsilon=3e-4, epsilon_high=4e-4), "luspo")  # fmt: skip
    batch.old = batch.lp + torch.randn_like(batch.lp) * 1.5
    same(*ours(batch, backend, device, mode="cispo", clip_low=1.0, clip_high=4.0),
         theirs(trl_grpo, batch, loss_type="cispo", epsilon_high=5.0), "cispo")  # fmt: skip
    same(*ours(batch, backend, device, clip_low=0.2, clip_high=0.28, clip_dual=4.0),
         theirs(trl_grpo, batch, loss_type="bnpo", epsilon=0.2, epsilon_high=0.28, delta=4.0), "delta")  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_trl_top_entropy_quantile_and_is_correction(backend, device):
    """TRL get_high_entropy_mask: threshold = torch.quantile of the valid tokens' entropies at
    1 - top_entropy_quantile, keep H >= threshold; the mask and vLLM's importance_sampling_ratio
    multiply the policy term only, before beta * KL is added."""
    batch = _batch(device)
    ent = batch.ent.double()
    threshold = torch.quantile(ent[batch.mask], 1 - 0.2)
    entropy_mask = ((ent * batch.mask >= threshold) & batch.mask).double()
    want = theirs(trl_grpo, batch, loss_type="bnpo", beta=0.04, ref=batch.ref.double(), entropy_mask=entropy_mask,
                  is_ratio=batch.w.double())  # fmt: skip
    out, grad = ours(batch, backend, device, entropy=batch.ent, top_entropy_quantile=0.2, importance_weights=batch.w,
                     ref_logprobs=batch.ref, kl_coef=0.04, kl_clamp=False)  # fmt: skip
    same(out, grad, want)
    kept = (entropy_mask.sum() / batch.mask.sum()).float()
    assert_close(out.entropy_kept, kept, rtol=1e-6, atol=1e-7, name="entropy_kept")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_k3_clamp_conventions(backend, device):
    """verl's low_var_kl clamps delta to +-20 and the value to [-10, 10]; TRL's k3 does not."""
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    ref = lp + torch.tensor([[25.0, -25.0, 2.5, 1e-4]])
    verl = verl_kl_penalty(lp.double(), ref.double(), "low_var_kl")
    trl = torch.exp(ref.double() - lp.double()) - (ref.double() - lp.double()) - 1
    got_verl = lk.kl_penalty(lp.to(device), ref.to(device), "low_var_kl", backend=backend)
    got_trl = lk.kl_penalty(lp.to(device), ref.to(device), "k3", clamp=False, backend=backend)
    assert float(got_verl[0, 0]) == 10.0 and float(got_trl[0, 0]) > 1e10
    assert_close(got_verl, verl, rtol=1e-5, name="verl")
    assert_close(got_trl, trl, rtol=1e-5, name="trl")
