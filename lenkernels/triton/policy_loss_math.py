"""The per-token maths of the fused policy losses and KL estimators (SPEC 2-3) as Triton
functions: the twin of ``csrc/include/lenkernels/policy_loss.h`` (same names, same layouts), used
by the kernels of ``lenkernels/triton/policy_loss.py``. Codes and layouts are the members of
``lenkernels._codes`` as constexpr globals (``MODE == MODES.GSPO``), never literals.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lenkernels._codes import KLEstimator, Mode, PolicyParam, SeqPartial
from lenkernels.triton.utils import constexprs

MODES = constexprs(Mode)
ESTS = constexprs(KLEstimator)
SEQP = constexprs(SeqPartial)
PARAMS = constexprs(PolicyParam)


@triton.jit
def _clamp(x, lo, hi):
    """torch.clamp semantics (NaN passes through)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _exp_series(x):
    """(|x| < 0.5, s = x there else 0, p) with exp(s) = 1 + s + s^2 / 2 * p (series to s^9): the
    shared tail of exp(x) - 1 and exp(x) - 1 - x without cancellation near 0."""
    small = tl.abs(x) < 0.5
    s = tl.where(small, x, 0.0)
    p = 1.0 + s * (1.0 / 9.0)
    p = 1.0 + s * (1.0 / 8.0) * p
    p = 1.0 + s * (1.0 / 7.0) * p
    p = 1.0 + s * (1.0 / 6.0) * p
    p = 1.0 + s * (1.0 / 5.0) * p
    p = 1.0 + s * (1.0 / 4.0) * p
    p = 1.0 + s * (1.0 / 3.0) * p
    return small, s, p


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (series to x^9 for |x| < 0.5)."""
    small, s, p = _exp_series(x)
    p = 1.0 + s * 0.5 * p
    return tl.where(small, s * p, tl.exp(x) - 1.0)


@triton.jit
def expm1mx(x):
    """exp(x) - 1 - x (k3) with full relative precision for small |x|."""
    small, s, p = _exp_series(x)
    return tl.where(small, 0.5 * s * s * p, (tl.exp(x) - 1.0) - x)


@triton.jit
def kl_estimator(lp, ref, EST: tl.constexpr, STRAIGHT: tl.constexpr, CLAMP: tl.constexpr):
    """(K, dK/dlogprob) of SPEC 2; delta = ref - logprob."""
    delta = ref - lp
    if EST == ESTS.K1:
        value = -delta
        d_delta = delta * 0.0 - 1.0
    elif EST == ESTS.ABS:
        value = tl.abs(delta)
        d_delta = tl.where(delta > 0.0, 1.0, tl.where(delta < 0.0, -1.0, 0.0))
    elif EST == ESTS.K2:
        value = 0.5 * delta * delta
        d_delta = delta
    else:  # K3
        if CLAMP:
            dc = _clamp(delta, -20.0, 20.0)
            v = expm1mx(dc)
            value = tl.where(v > 10.0, 10.0, v)
            d_delta = tl.where((tl.abs(delta) <= 20.0) & (v <= 10.0), _expm1(dc), 0.0)
        else:
            value = expm1mx(delta)
            d_delta = _expm1(delta)
    if STRAIGHT:
        d_delta = delta
    return value, -d_delta


@triton.jit
def _token_ratio(l):
    """r = exp(clamp(l, +-20)), dr/dl."""
    r = tl.exp(_clamp(l, -20.0, 20.0))
    return r, tl.where((l >= -20.0) & (l <= 20.0), r, 0.0)


@triton.jit
def _ppo_clip(x, a, lo, hi, dual_c, DUAL: tl.constexpr):
    """max(-A x, -A clip(x, lo, hi)) (+ dual clip): value, d/dx and the low/high/dual flags."""
    xc = _clamp(x, lo, hi)
    l_unclipped = -a * x
    l_clipped = -a * xc
    clipped = l_clipped > l_unclipped
    value = tl.where(clipped, l_clipped, l_unclipped)
    grad = tl.where(clipped, 0.0, -a)
    low = tl.where(clipped & (a < 0.0), 1.0, 0.0)
    high = tl.where(clipped & (a > 0.0), 1.0, 0.0)
    dual = low * 0.0
    if DUAL:
        l_dual = -a * dual_c
        active = (a < 0.0) & (value > l_dual)
        value = tl.where(active, l_dual, value)
        grad = tl.where(active, 0.0, grad)
        dual = tl.where(active, 1.0, 0.0)
    return value, grad, low, high, dual


@triton.jit
def gmpo_token(l, a, lo, hi):
    """verl geo_mean: sgn(A) * min(sgn(A) l, sgn(A) clamp(l, lo, hi)); pass = d/dl is 1."""
    sgn = tl.where(a > 0.0, 1.0, tl.where(a < 0.0, -1.0, 0.0))
    lc = _clamp(l, lo, hi)
    clipped = sgn * lc < sgn * l
    lmin = tl.where(sgn == 0.0, 0.0, tl.where(clipped, lc, l))
    passes = tl.where(clipped | (sgn == 0.0), 0.0, 1.0)
    low = tl.where(clipped & (a < 0.0), 1.0, 0.0)
    high = tl.where(clipped & (a > 0.0), 1.0, 0.0)
    return lmin, passes, low, high


@triton.jit
def dppo_valid(lp, old, a, eps_low, eps_high, MODE: tl.constexpr):
    """DPPO's trust region (dppo_valid in policy_loss.h): TV keeps p - p_old <= eps_high where A > 0,
    >= -eps_low elsewhere; KL keeps D <= eps_high or p <= p_old where A > 0, D <= eps_low or
    p >= p_old elsewhere. p - p_old as p_old expm1(l) for |l| < 0.5, 1 - p as -expm1(logprob), p <=
    p_old as logprob <= old_logprob: fp32 agrees with the float64 definition near p = 1."""
    p_old = tl.exp(old)
    if MODE == MODES.DPPO_TV:
        l = lp - old
        d = tl.where(tl.abs(l) < 0.5, p_old * _expm1(l), tl.exp(lp) - p_old)
        valid = tl.where(a > 0.0, d <= eps_high, d >= -eps_low)
    else:  # MODES.DPPO_KL
        q = -_expm1(lp)
        q_old = -_expm1(old)
        kl = p_old * (old - lp) + q_old * tl.log((q_old + 1e-8) / (q + 1e-8))
        valid = tl.where(a > 0.0, (kl <= eps_high) | (lp <= old), (kl <= eps_low) | (lp >= old))
    return valid


@triton.jit
def policy_term(lp, old, a, seq_n, seq_x, seq_y, seq_ratio, params_ptr, MODE: tl.constexpr, DUAL: tl.constexpr):
    """(P, dP/dlogprob, ratio, low, high, dual) of one tile (policy_term in policy_loss.h); the
    hyper-parameters are read from ``params_ptr`` (fp32, ``PolicyParam`` layout)."""
    l = lp - old
    lo = tl.load(params_ptr + PARAMS.LO)
    hi = tl.load(params_ptr + PARAMS.HI)
    dual_c = tl.load(params_ptr + PARAMS.DUAL_C)
    if MODE == MODES.GSPO or MODE == MODES.LUSPO:  # s_{b,t} has value s_b and d/dlogprob = s_b
        value, d, low, high, dual = _ppo_clip(seq_ratio + l * 0.0, a, lo, hi, dual_c, DUAL)
        grad = d * seq_ratio * seq_y
        if MODE == MODES.LUSPO:
            value = value * seq_n
            grad = grad * seq_n
        ratio = seq_ratio + l * 0.0
    elif MODE == MODES.GMPO:  # the sequence's value; the gradient factor only where the clip passes
        _, passes, low, high = gmpo_token(l, a, lo, hi)
        value = seq_y + l * 0.0
        grad = passes * seq_x
        ratio = seq_ratio + l * 0.0
        dual = low * 0.0
    else:
        ratio, dr = _token_ratio(l)
        if MODE == MODES.CISPO:
            rc = _clamp(ratio, lo, hi)
            value = -rc * a * lp
            grad = -rc * a
            low = tl.where(ratio < lo, 1.0, 0.0)
            high = tl.where(ratio > hi, 1.0, 0.0)
            dual = low * 0.0
        elif MODE == MODES.SAPO:
            tau = tl.where(a > 0.0, tl.load(params_ptr + PARAMS.TAU_POS), tl.load(params_ptr + PARAMS.TAU_NEG))
            z = tau * (ratio - 1.0)
            e = tl.exp(-tl.abs(z))  # <= 1: sigma(z) sigma(-z) = e / (1 + e)^2, no 1 - sigma cancellation
            inv = 1.0 / (1.0 + e)
            sig = tl.where(z >= 0.0, inv, e * inv)
            value = -sig * (4.0 / tau) * a
            grad = -4.0 * (e * inv) * inv * a * dr
            low = l * 0.0
            high = low
            dual = low
        elif MODE == MODES.REINFORCE:  # verl's GPG
            value = -a * lp
            grad = -a
            low = l * 0.0
            high = low
            dual = low
        elif MODE == MODES.DPPO_TV or MODE == MODES.DPPO_KL:  # -A sg(min(r, C)) logprob inside the region
            valid = dppo_valid(lp, old, a, lo, hi, MODE)  # lo, hi: the divergence thresholds eps_low, eps_high
            grad = tl.where(valid, -a * tl.where(ratio > dual_c, dual_c, ratio), 0.0)  # C = dual_c
            value = grad * lp
            outside = tl.where(valid, 0.0, 1.0)
            low = tl.where(a <= 0.0, outside, 0.0)
            high = tl.where(a > 0.0, outside, 0.0)
            dual = tl.where(valid & (ratio > dual_c), 1.0, 0.0)
        elif MODE == MODES.DRO:  # -(logprob A - beta/2 l^2), l unclamped
            beta = tl.load(params_ptr + PARAMS.DRO_BETA)
            value = -(lp * a - 0.5 * beta * l * l)
            grad = beta * l - a
            low = l * 0.0
            high = low
            dual = low
        else:  # MODES.PPO
            value, d, low, high, dual = _ppo_clip(ratio, a, lo, hi, dual_c, DUAL)
            grad = d * dr
    return value, grad, ratio, low, high, dual


@triton.jit
def span(cu_ptr, b, seq_len, PACKED: tl.constexpr):
    """(first token, length) of sequence b: packed from cu_seqlens, padded row b of seq_len."""
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        length = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    else:
        start = b * 0
        length = b * 0 + seq_len
    return start, length


@triton.jit
def load_tokens(ptr, base, offs, in_seq):
    return tl.load(ptr + base + offs, mask=in_seq, other=0.0).to(tl.float32)


@triton.jit
def valid_tokens(mask_ptr, base, offs, in_seq, HAS_MASK: tl.constexpr):
    valid = in_seq
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + base + offs, mask=in_seq, other=0) != 0)
    return valid


@triton.jit
def advantage(adv_ptr, b, adv_rs, start, offs, in_seq, valid, ADV_PER_TOKEN: tl.constexpr):
    if ADV_PER_TOKEN:
        a = load_tokens(adv_ptr, b * adv_rs + start, offs, in_seq)
    else:
        a = tl.load(adv_ptr + b * adv_rs).to(tl.float32) + tl.zeros(offs.shape, tl.float32)
    return tl.where(valid, a, 0.0)


@triton.jit
def sequence_values(seq_part_ptr, b, n_splits, MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_THR: tl.constexpr):
    """Merges sequence b's partial sums left to right -> (n, x, y, ratio) (SeqValue layout)."""
    n = tl.zeros([], tl.float32)
    s_l = tl.zeros([], tl.float32)
    s_a = tl.zeros([], tl.float32)
    s_w = tl.zeros([], tl.float32)
    s_e = tl.zeros([], tl.float32)
    for i in range(n_splits):
        row = seq_part_ptr + (b * n_splits + i) * SEQP.NUM_SEQ_PARTIALS
        n += tl.load(row + SEQP.SEQ_TOKENS)
        s_l += tl.load(row + SEQP.SEQ_LOG_RATIO)
        s_a += tl.load(row + SEQP.SEQ_ADVANTAGE)
        s_w += tl.load(row + SEQP.SEQ_LOG_WEIGHT)
        s_e += tl.load(row + SEQP.SEQ_KEPT)
    x = tl.zeros([], tl.float32)
    y = x + 1.0
    ratio = x + 1.0
    if MODE == MODES.GSPO or MODE == MODES.LUSPO:
        mean = s_l / tl.maximum(n, 1.0)
        log_s = tl.where(mean > 10.0, 10.0, mean)
        x = log_s
        y = tl.where(mean <= 10.0, 1.0, 0.0)
        ratio = tl.exp(log_s)
    elif MODE == MODES.GMPO:
        inv_n = 1.0 / tl.maximum(n, 1.0)
        ratio = tl.exp(s_l * inv_n)
        weight = x + 1.0
        if HAS_W:
            weight = tl.exp(s_w * inv_n)
        kept = n
        if HAS_THR:
            kept = s_e
        y = -(s_a * inv_n) * ratio * weight
        x = y * kept * inv_n
    return n, x, y, ratio
