// Policy losses, KL estimators and their derivatives (SPEC 2-3), shared by the CPU and CUDA backends.
// The Triton twin is lenkernels/triton/policy_loss.py; the definition is lenkernels/reference/policy_loss.py.
//
// Per token (l = logprob - old_logprob, A = advantage, m = mask):
//   T = w * e * P + kl_coef * K - entropy_coef * H
// P is the policy term of the mode, w the importance weight, e the top-entropy mask (H >= threshold),
// K the KL estimator against the reference policy, H the entropy. The loss is
//   loss = inv_norm * sum_t m_t * u_b * T_t
// with u_b = 1/|y_b| for seq-mean-token-mean (else 1) and inv_norm = dp_size / D (/ C for
// seq-mean-token-sum-norm), D the token count, the count of non-empty sequences or a given global
// normaliser. Functions that need exp() take it as a functor so each backend supplies its own
// (a vectorisable polynomial on the CPU, the hardware exp on the GPU).
#pragma once

#include <cmath>
#include <string>

#include "lenkernels/common.h"

namespace lk {
namespace policy {

enum Mode : int { kPPO = 0, kGSPO = 1, kLUSPO = 2, kCISPO = 3, kSAPO = 4, kGMPO = 5, kReinforce = 6, kDppoTV = 7,
    kDppoKL = 8, kDro = 9 };
enum KLEstimator : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };
enum Agg : int { kTokenMean = 0, kTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSum = 3, kSeqMeanTokenSumNorm = 4 };
enum NormSource : int { kNormCounted = 0, kNormTensor = 1, kNormConstant = 2 };

// Partial sums of one block of tokens (reduced in a fixed order into the statistics below).
enum Partial : int {
  kPartPolicy = 0,     // sum m u w e P
  kPartKL = 1,         // sum m u K
  kPartEntropy = 2,    // sum m u H
  kPartTokens = 3,     // sum m
  kPartClipLow = 4,    // sum m [low clip active]
  kPartClipHigh = 5,   // sum m [high clip active]
  kPartClipDual = 6,   // sum m [dual clip active]
  kPartNegLogRatio = 7,  // sum m (-l)
  kPartRatioMin = 8,
  kPartRatioSum = 9,
  kPartRatioMax = 10,
  kPartEntropySum = 11,  // sum m H
  kPartSeqs = 12,        // non-empty sequences
  kPartKept = 13,        // sum m e
  kNumPartials = 16
};

// The op's statistics vector (lenkernels/ops/policy_loss.py names them).
enum Stat : int { kStatLoss = 0, kStatPolicy = 1, kStatKL = 2, kStatEntropy = 3, kStatClipLow = 4, kStatClipHigh = 5,
    kStatClipDual = 6, kStatApproxKL = 7, kStatRatioMin = 8, kStatRatioMean = 9, kStatRatioMax = 10,
    kStatEntropyMean = 11, kStatTokens = 12, kStatSeqs = 13, kStatInvNorm = 14, kStatKept = 15, kNumStats = 16 };

// Per-sequence sums of the segment reduction, and the per-sequence values derived from them.
enum SeqPartial : int { kSeqTokens = 0, kSeqLogRatio = 1, kSeqAdvantage = 2, kSeqLogWeight = 3, kSeqKept = 4, kNumSeqPartials = 8 };
enum SeqValue : int { kSeqN = 0, kSeqX = 1, kSeqY = 2, kSeqRatio = 3, kNumSeqValues = 4 };
// The float hyper-parameters as the Triton kernels read them: one fp32 vector in this layout
// (lenkernels/_codes.py PolicyParam; the C++ kernels take them as PolicyScalars fields).
enum PolicyParam : int { kLo = 0, kHi = 1, kDualC = 2, kTauPos = 3, kTauNeg = 4, kKlCoef = 5,
    kEntropyCoef = 6, kNormConst = 7, kScale = 8, kDroBeta = 9, kNumPolicyParams = 10 };

// Host-side check of the codes a launch reads (declared in lenkernels/_codes.py): what is wrong, or
// an empty string when every code is a member of its enum. Run before any kernel or parallel region,
// so no branch on a code ever falls back to a default.
inline std::string invalid_kl_estimator(int est) {
  if (est < kK1 || est > kK3) {
    return "kl_est must be a lk::policy::KLEstimator code (0..3), got " + std::to_string(est);
  }
  return "";
}

inline std::string invalid_codes(int mode, int agg, int kl_est, int norm_source) {
  if (mode < kPPO || mode > kDro) {
    return "mode must be a lk::policy::Mode code (0.." + std::to_string(int(kDro)) + "), got " + std::to_string(mode);
  }
  if (agg < kTokenMean || agg > kSeqMeanTokenSumNorm) {
    return "agg must be a lk::policy::Agg code (0..4), got " + std::to_string(agg);
  }
  if (norm_source < kNormCounted || norm_source > kNormConstant) {
    return "norm_source must be a lk::policy::NormSource code (0..2), got " + std::to_string(norm_source);
  }
  return invalid_kl_estimator(kl_est);
}

constexpr float kLogRatioBound = 20.0f;   // r = exp(clamp(l, -20, 20))
constexpr float kSeqLogRatioMax = 10.0f;  // GSPO: log s_b clamped above (verl)
constexpr float kK3DeltaBound = 20.0f;    // verl's k3: delta clamped to +-20 ...
constexpr float kK3ValueMax = 10.0f;      // ... and the estimate to [-10, 10]
constexpr float kLogWeightEps = 1e-10f;   // GMPO: geometric mean of the importance weights (verl)
constexpr float kSeriesBound = 0.5f;      // |x| below which exp(x)-1 and exp(x)-1-x use their series
constexpr float kBinaryKLEps = 1e-8f;     // DPPO-Binary-KL: log((1 - p_old + eps) / (1 - p + eps)) (verl)

struct ValueGrad {
  float value;
  float grad;
};

// torch.clamp semantics: NaN passes through.
LK_HOST_DEVICE float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

LK_HOST_DEVICE float signf(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// 1 + s/3 (1 + s/4 (... (1 + s/9))) by Horner: the Taylor series of exp behind its first terms.
LK_HOST_DEVICE float exp_series_from3(float s) {
  float p = 1.0f + s * (1.0f / 9.0f);
  p = 1.0f + s * (1.0f / 8.0f) * p;
  p = 1.0f + s * (1.0f / 7.0f) * p;
  p = 1.0f + s * (1.0f / 6.0f) * p;
  p = 1.0f + s * (1.0f / 5.0f) * p;
  p = 1.0f + s * (1.0f / 4.0f) * p;
  return 1.0f + s * (1.0f / 3.0f) * p;
}

// exp(x) - 1 without the cancellation of exp(x) - 1 near 0 (Taylor series to x^9 for |x| < 0.5).
template <class Exp>
LK_HOST_DEVICE float expm1_accurate(float x, Exp exp_fn) {
  const bool small = fabsf(x) < kSeriesBound;
  const float s = small ? x : 0.0f;
  const float p = 1.0f + s * 0.5f * exp_series_from3(s);
  return small ? s * p : exp_fn(x) - 1.0f;
}

// exp(x) - 1 - x (the k3 estimator): fp32 exp(x) - 1 - x loses every digit for |x| ~ 1e-4,
// where the value is x^2/2 ~ 5e-9; the series keeps full relative precision there.
template <class Exp>
LK_HOST_DEVICE float expm1mx_accurate(float x, Exp exp_fn) {
  const bool small = fabsf(x) < kSeriesBound;
  const float s = small ? x : 0.0f;
  return small ? 0.5f * s * s * exp_series_from3(s) : (exp_fn(x) - 1.0f) - x;
}

// SPEC 2: which estimator, decided once per call. `straight_through` (the trailing "+"): the value
// of `est`, the gradient of k2. `clamp` applies verl's k3 clamps (delta to +-20, the estimate to
// [-10, 10]); TRL's k3 has none.
struct KLChoice {
  int est;
  bool straight_through, clamp;
};

LK_HOST_DEVICE KLChoice kl_choice(int est, bool straight_through, bool clamp) {
  return KLChoice{est, straight_through, clamp};
}

// The token's estimate and its derivative in logprob (d/d ref = -that); delta = ref - logprob.
// Only the chosen estimator is evaluated (the branches are uniform across tokens).
template <class Exp>
LK_HOST_DEVICE ValueGrad kl_estimator(float logprob, float ref_logprob, const KLChoice& c, Exp exp_fn) {
  const float delta = ref_logprob - logprob;
  float value, d_delta;
  if (c.est == kK1) {
    value = -delta;
    d_delta = -1.0f;
  } else if (c.est == kAbs) {
    value = fabsf(delta);
    d_delta = signf(delta);
  } else if (c.est == kK2) {
    value = 0.5f * delta * delta;
    d_delta = delta;
  } else if (c.clamp) {
    const float dc = clampf(delta, -kK3DeltaBound, kK3DeltaBound);
    const float v = expm1mx_accurate(dc, exp_fn);
    value = v > kK3ValueMax ? kK3ValueMax : v;
    const bool pass = (fabsf(delta) <= kK3DeltaBound) && (v <= kK3ValueMax);
    d_delta = pass ? expm1_accurate(dc, exp_fn) : 0.0f;
  } else {
    value = expm1mx_accurate(delta, exp_fn);
    d_delta = expm1_accurate(delta, exp_fn);
  }
  if (c.straight_through) d_delta = delta;
  return ValueGrad{value, -d_delta};
}

// r = exp(clamp(l, +-20)) and dr/dl (zero outside the clamp, torch.clamp semantics).
template <class Exp>
LK_HOST_DEVICE ValueGrad token_ratio(float l, Exp exp_fn) {
  const float r = exp_fn(clampf(l, -kLogRatioBound, kLogRatioBound));
  const bool pass = (l >= -kLogRatioBound) & (l <= kLogRatioBound);
  return ValueGrad{r, pass ? r : 0.0f};
}

// Clip indicators are 0/1 floats, summed into the clip fractions.
struct ClipResult {
  float value;
  float d_ratio;  // d value / d x
  float low, high, dual;
};

// PPO clip on a ratio x: max(-A x, -A clip(x, lo, hi)); with dual clip, for A < 0, min(that, -A c).
// A clip is "active" when the clipped branch wins strictly (its gradient is then zero).
LK_HOST_DEVICE ClipResult ppo_clip(float x, float a, float lo, float hi, int dual, float dual_c) {
  const float xc = clampf(x, lo, hi);
  const float l_unclipped = -a * x;
  const float l_clipped = -a * xc;
  const bool clipped = l_clipped > l_unclipped;
  float value = clipped ? l_clipped : l_unclipped;
  float grad = clipped ? 0.0f : -a;
  float on_dual = 0.0f;
  if (dual) {
    const float l_dual = -a * dual_c;
    const bool active = (a < 0.0f) && (value > l_dual);
    value = active ? l_dual : value;
    grad = active ? 0.0f : grad;
    on_dual = active ? 1.0f : 0.0f;
  }
  return ClipResult{value, grad, (clipped && a < 0.0f) ? 1.0f : 0.0f, (clipped && a > 0.0f) ? 1.0f : 0.0f, on_dual};
}

// GMPO (verl geo_mean): sign-aware token clip of the log-ratio, sgn(A) * min(sgn(A) l, sgn(A) clamp(l, lo, hi))
// with lo = -eps_low, hi = eps_high (log space). `pass`: d/dl of the clipped log-ratio is 1 (else 0).
struct GmpoToken {
  float log_ratio;
  bool pass;
  float low, high;
};

LK_HOST_DEVICE GmpoToken gmpo_token(float l, float a, float lo, float hi) {
  const float sgn = signf(a);
  const float lc = clampf(l, lo, hi);
  const bool clipped = sgn * lc < sgn * l;
  const float lmin = sgn == 0.0f ? 0.0f : (clipped ? lc : l);
  return GmpoToken{lmin, !clipped && sgn != 0.0f, (clipped && a < 0.0f) ? 1.0f : 0.0f,
                   (clipped && a > 0.0f) ? 1.0f : 0.0f};
}

LK_HOST_DEVICE float gmpo_log_weight(float w) { return logf(w + kLogWeightEps); }

// DPPO (arXiv 2602.04879, verl dppo_tv / dppo_kl): whether a token stays inside the binary trust region
// of its probability p = exp(logprob) against p_old = exp(old_logprob); eps_low / eps_high are divergence
// thresholds (not ratio bounds). TV: A > 0 keeps p - p_old <= eps_high, else p - p_old >= -eps_low.
// KL: D = p_old (log p_old - log p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8)); A > 0 keeps
// D <= eps_high or p <= p_old, else D <= eps_low or p >= p_old. Evaluated so that fp32 agrees with the
// float64 definition near p = 1, where fp32 exp rounds p to a multiple of 6e-8: p - p_old as
// p_old expm1(l) for |l| < 0.5, 1 - p as -expm1(logprob), p <= p_old as logprob <= old_logprob.
template <class Exp>
LK_HOST_DEVICE bool dppo_valid(int mode, float logprob, float old_logprob, float a, float eps_low, float eps_high,
                               Exp exp_fn) {
  const float p_old = exp_fn(old_logprob);
  if (mode == kDppoTV) {
    const float l = logprob - old_logprob;
    const float d = fabsf(l) < kSeriesBound ? p_old * expm1_accurate(l, exp_fn) : exp_fn(logprob) - p_old;
    return a > 0.0f ? (d <= eps_high) : (d >= -eps_low);
  }
  const float q = -expm1_accurate(logprob, exp_fn), q_old = -expm1_accurate(old_logprob, exp_fn);
  const float kl = p_old * (old_logprob - logprob) + q_old * logf((q_old + kBinaryKLEps) / (q + kBinaryKLEps));
  return a > 0.0f ? (kl <= eps_high || logprob <= old_logprob) : (kl <= eps_low || logprob >= old_logprob);
}

// Per-sequence values (SeqValue layout):
//   GSPO/LUSPO: x = log s_b = min(mean_t l, 10), y = 1 where the clamp passes the gradient, ratio = s_b
//   GMPO:       y = -A_b ratio_b w_b (the sequence's loss), x = y * kept_b / n_b (its backward factor),
//               ratio_b = exp(mean_t clipped l), A_b = mean_t A, w_b = geometric mean of the weights
struct SeqValues {
  float n, x, y, ratio;
};

template <class Exp>
LK_HOST_DEVICE SeqValues gspo_sequence(float n, float sum_log_ratio, Exp exp_fn) {
  const float mean = sum_log_ratio / (n > 1.0f ? n : 1.0f);
  const float log_s = mean > kSeqLogRatioMax ? kSeqLogRatioMax : mean;
  return SeqValues{n, log_s, mean <= kSeqLogRatioMax ? 1.0f : 0.0f, exp_fn(log_s)};
}

template <class Exp>
LK_HOST_DEVICE SeqValues gmpo_sequence(float n, float sum_log_ratio, float sum_advantage, float sum_log_weight,
                                       float kept, bool has_weights, Exp exp_fn) {
  const float inv_n = 1.0f / (n > 1.0f ? n : 1.0f);
  const float ratio = exp_fn(sum_log_ratio * inv_n);
  const float weight = has_weights ? exp_fn(sum_log_weight * inv_n) : 1.0f;
  const float value = -(sum_advantage * inv_n) * ratio * weight;
  return SeqValues{n, value * kept * inv_n, value, ratio};
}

// A sequence's values from its merged SeqPartial sums, for any mode (token-local modes need only n).
template <class Exp>
LK_HOST_DEVICE SeqValues sequence_values(int mode, float n, float sum_log_ratio, float sum_advantage,
                                         float sum_log_weight, float kept, bool has_threshold, bool has_weights,
                                         Exp exp_fn) {
  if (mode == kGSPO || mode == kLUSPO) return gspo_sequence(n, sum_log_ratio, exp_fn);
  if (mode == kGMPO) {
    return gmpo_sequence(n, sum_log_ratio, sum_advantage, sum_log_weight, has_threshold ? kept : n, has_weights,
                         exp_fn);
  }
  return SeqValues{n, 0.0f, 1.0f, 1.0f};
}

struct PolicyParams {
  int mode;
  float lo, hi;  // ratio bounds 1 - eps_low, 1 + eps_high (GMPO: log-space bounds -eps_low, eps_high;
                 // DPPO: the divergence thresholds eps_low, eps_high)
  int dual;      // 1: dual clip at dual_c (DPPO: always, dual_c = C truncates the ratio)
  float dual_c;
  float tau_pos, tau_neg;
  float dro_beta;  // DRO: weight of the quadratic log-ratio penalty
};

// Every scalar of the op the kernels read (both backends' Args derive from it): the one struct a new
// scalar hyper-parameter is added to, with one line in parse_policy_scalars (policy_args.h).
struct PolicyScalars {
  PolicyParams pp;
  int agg, kl_est;
  bool kl_straight, kl_clamp, has_seq;
  float kl_coef, entropy_coef;
  int norm_source;
  float norm_const, scale;  // scale: dp_size (/ C for seq-mean-token-sum-norm)
};

struct PolicyTerm {
  float value;  // P
  float grad;   // dP/d logprob (GMPO: the whole sequence's factor, already weighted; see gmpo_sequence)
  float ratio;  // the importance ratio the mode uses (for the ratio statistics)
  float low, high, dual;  // clip indicators (0/1)
};

// SPEC 3: the policy term of one token. `seq` holds the sequence's values (GSPO, LUSPO, GMPO).
template <class Exp>
LK_HOST_DEVICE PolicyTerm policy_term(const PolicyParams& p, float logprob, float old_logprob, float a,
                                      const SeqValues& seq, Exp exp_fn) {
  const float l = logprob - old_logprob;
  if (p.mode == kGSPO || p.mode == kLUSPO) {
    // s_{b,t} = sg(s_b) exp(logprob - sg(logprob)): value s_b, d/dlogprob = s_b (zero above the clamp)
    const ClipResult c = ppo_clip(seq.ratio, a, p.lo, p.hi, p.dual, p.dual_c);
    const float scale = p.mode == kLUSPO ? seq.n : 1.0f;
    return PolicyTerm{c.value * scale, c.d_ratio * seq.ratio * seq.y * scale, seq.ratio, c.low, c.high, c.dual};
  }
  if (p.mode == kGMPO) {
    const GmpoToken g = gmpo_token(l, a, p.lo, p.hi);
    return PolicyTerm{seq.y, g.pass ? seq.x : 0.0f, seq.ratio, g.low, g.high, 0.0f};
  }
  const ValueGrad r = token_ratio(l, exp_fn);
  if (p.mode == kCISPO) {
    // -sg(clip(r)) A logprob; the clip flags count weights outside the range whatever the sign of A
    const float rc = clampf(r.value, p.lo, p.hi);
    return PolicyTerm{-rc * a * logprob, -rc * a, r.value, r.value < p.lo ? 1.0f : 0.0f, r.value > p.hi ? 1.0f : 0.0f,
                      0.0f};
  }
  if (p.mode == kSAPO) {
    // -sigma(z) 4/tau A with z = tau (r - 1); d/dr = -4 sigma(z) sigma(-z) A = -4 e / (1 + e)^2 A with
    // e = exp(-|z|) <= 1: no overflow, no cancellation of 1 - sigma(z), exactly 0 where it underflows
    const float tau = a > 0.0f ? p.tau_pos : p.tau_neg;
    const float z = tau * (r.value - 1.0f);
    const float e = exp_fn(-fabsf(z));
    const float inv = 1.0f / (1.0f + e);
    const float sig = z >= 0.0f ? inv : e * inv;  // NaN z takes e * inv = NaN
    return PolicyTerm{-sig * (4.0f / tau) * a, -4.0f * (e * inv) * inv * a * r.grad, r.value, 0.0f, 0.0f, 0.0f};
  }
  if (p.mode == kReinforce) return PolicyTerm{-a * logprob, -a, r.value, 0.0f, 0.0f, 0.0f};
  if (p.mode == kDppoTV || p.mode == kDppoKL) {
    // -A sg(min(r, C)) logprob on the tokens inside the trust region (no gradient through it). Flags:
    // low / high = outside it with A <= 0 / A > 0 (their sum is verl's pg_clipfrac), dual = inside it
    // with r > C (verl's pg_clipfrac_lower)
    const bool valid = dppo_valid(p.mode, logprob, old_logprob, a, p.lo, p.hi, exp_fn);
    const float rc = r.value > p.dual_c ? p.dual_c : r.value;  // torch.clamp(max=C): NaN passes
    const float d = valid ? -a * rc : 0.0f;
    return PolicyTerm{d * logprob, d, r.value, (!valid && a <= 0.0f) ? 1.0f : 0.0f, (!valid && a > 0.0f) ? 1.0f : 0.0f,
                      (valid && r.value > p.dual_c) ? 1.0f : 0.0f};
  }
  if (p.mode == kDro) {
    // -(logprob A - beta/2 l^2), d/dlogprob = beta l - A (l unclamped, as verl)
    return PolicyTerm{-(logprob * a - 0.5f * p.dro_beta * l * l), p.dro_beta * l - a, r.value, 0.0f, 0.0f, 0.0f};
  }
  const ClipResult c = ppo_clip(r.value, a, p.lo, p.hi, p.dual, p.dual_c);
  return PolicyTerm{c.value, c.d_ratio * r.grad, r.value, c.low, c.high, c.dual};
}

LK_HOST_DEVICE bool mode_uses_sequences(int mode) { return mode == kGSPO || mode == kLUSPO || mode == kGMPO; }
LK_HOST_DEVICE bool agg_uses_sequences(int agg) { return agg >= kSeqMeanTokenMean; }

// u_b: the per-token aggregation weight of sequence b before the global normaliser.
LK_HOST_DEVICE float agg_token_weight(int agg, float n) {
  return agg == kSeqMeanTokenMean ? 1.0f / (n > 1.0f ? n : 1.0f) : 1.0f;
}

// dp_size / D (/ C), D: the given normaliser, else max(tokens, 1), 1 (token-sum) or max(non-empty sequences, 1).
LK_HOST_DEVICE float agg_inverse_norm(int agg, float tokens, float seqs, bool has_given, float given, float scale) {
  float d;
  if (has_given) {
    d = given;
  } else if (agg == kTokenMean) {
    d = tokens > 1.0f ? tokens : 1.0f;
  } else if (agg == kTokenSum) {
    d = 1.0f;
  } else {
    d = seqs > 1.0f ? seqs : 1.0f;
  }
  return scale / d;
}

// The statistics from the reduced partial sums (`p` in Partial layout; `out` in Stat layout).
LK_HOST_DEVICE void finalize_stats(const float* p, int agg, bool has_given, float given, float scale, float kl_coef,
                                   float entropy_coef, float* out) {
  const float inv_norm = agg_inverse_norm(agg, p[kPartTokens], p[kPartSeqs], has_given, given, scale);
  const float tokens = p[kPartTokens];
  const float inv_tokens = 1.0f / (tokens > 1.0f ? tokens : 1.0f);
  out[kStatLoss] = (p[kPartPolicy] + kl_coef * p[kPartKL] - entropy_coef * p[kPartEntropy]) * inv_norm;
  out[kStatPolicy] = p[kPartPolicy] * inv_norm;
  out[kStatKL] = p[kPartKL] * inv_norm;
  out[kStatEntropy] = p[kPartEntropy] * inv_norm;
  out[kStatClipLow] = p[kPartClipLow] * inv_tokens;
  out[kStatClipHigh] = p[kPartClipHigh] * inv_tokens;
  out[kStatClipDual] = p[kPartClipDual] * inv_tokens;
  out[kStatApproxKL] = p[kPartNegLogRatio] * inv_tokens;
  out[kStatRatioMin] = p[kPartRatioMin];
  out[kStatRatioMean] = p[kPartRatioSum] * inv_tokens;
  out[kStatRatioMax] = p[kPartRatioMax];
  out[kStatEntropyMean] = p[kPartEntropySum] * inv_tokens;
  out[kStatTokens] = tokens;
  out[kStatSeqs] = p[kPartSeqs];
  out[kStatInvNorm] = inv_norm;
  out[kStatKept] = p[kPartKept] * inv_tokens;
}

}  // namespace policy
}  // namespace lk
