// Group-advantage and group-statistics maths (SPEC 4), shared by the CPU and CUDA backends; the
// Triton twin is lenkernels/triton/advantages.py.  Everything here is per member or per group:
// the kernels decide how members are visited (sorted offsets, one group or run per worker) and
// reduce in a fixed order, so results never depend on thread timing.
//
// Conventions (verl's, SPEC 4):
//   - a group of one has baseline 0 and std 1, so grpo/rloo/rpp/opo give the raw score;
//   - std is unbiased (ddof = 1) unless the caller passes ddof = 0;
//   - means are taken relative to a shift (the group's first member), mean = shift + sum(s - shift)/n,
//     so a group whose members are all equal has mean == each member exactly and advantage 0;
//   - means and variances are formed of the values times 2^-e, 2^e the power of two of the set's
//     largest magnitude, and multiplied back by 2^e (see "power-of-two scaling" below), so no sum
//     or square overflows or underflows where the mean and the std are representable.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lenkernels/common.h"

namespace lk {
namespace adv {

// method codes: lenkernels/_codes.py Method
enum Method : int {
  kGrpo = 0,
  kDrGrpo = 1,
  kRloo = 2,
  kReinforcePPBaseline = 3,  // group baseline, then whitening over the batch's valid tokens
  kBatch = 4,        // group baseline, then divided by the batch std of the raw scores
  kGaussian = 5,     // rank -> normal quantile, ties averaged (separate kernel)
  kGrpoPassk = 6,
  kOpo = 7,
};

// where per-response lengths come from (opo, reinforce_pp_baseline): lenkernels/_codes.py LenSource
enum LenSource : int { kLenNone = 0, kLenMask = 1, kLenTensor = 2 };

// Codes arrive from Python as ints: the bindings check them with these before any work, so an unknown
// method or dtype raises instead of running as some default.
LK_HOST_DEVICE bool known_method(int code) { return code >= kGrpo && code <= kOpo; }
// The batch-level (shift, scale) exists for these two methods only (global_shift_scale).
LK_HOST_DEVICE bool batch_level_method(int code) { return code == kBatch || code == kReinforcePPBaseline; }
// lk::DType of rewards; lk::Weight of masks, lengths and weights.
LK_HOST_DEVICE bool known_dtype(int code) { return code >= kFloat32 && code <= kFloat16; }
LK_HOST_DEVICE bool known_weight(int code) { return code >= int(Weight::kFloat32) && code <= int(Weight::kInt64); }

// Whitening epsilon of verl's masked_whiten (reinforce_pp_baseline).
constexpr float kWhitenEps = 1e-8f;

LK_HOST_DEVICE float quiet_nan() { return __builtin_nanf(""); }

// --- power-of-two scaling -----------------------------------------------------------------------------
// fp32 squares leave the range past |x| ~ 1.8e19 (inf) and below ~1e-19 (subnormal, then 0): the
// sum of squares of [1e20, -1e20, 5e19, 0] overflows although its std, 2.3e20, is an ordinary
// number (and the advantages would collapse to a plausible 0). Every mean and variance below is
// therefore formed of x * 2^-e, where 2^e <= (the set's largest |x|) < 2^(e+1), so |x * 2^-e| < 2,
// and the mean and std are multiplied back by 2^e. Multiplying by a power of two is exact (short of
// subnormal results), and so is every rounding of the scaled sums: where the squares fit, results
// keep the bits of the unscaled formulas; scaled inputs give bitwise scaled results.

constexpr int kMaxScaleExp = 126;  // |e| <= 126: 2^e and 2^-e are both normal floats

// 2^e for -126 <= e <= 127, exactly (built from its bits).
LK_HOST_DEVICE float pow2f(int e) {
  const uint32_t bits = uint32_t(e + 127) << 23;
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

// Running maximum of |x| that skips NaN (a NaN reaches the results through the sums anyway): a plain
// comparison, so the maximum does not depend on the order the values come in.
LK_HOST_DEVICE float abs_max(float m, float x) {
  const float a = fabsf(x);
  return a > m ? a : m;
}

// The exponent e of a set whose largest |x| is max_abs (2^e <= max_abs < 2^(e+1)), clamped to
// [-126, 126]: 0 and subnormal maxima give -126, inf gives 126.
LK_HOST_DEVICE int scale_exponent(float max_abs) {
  uint32_t bits;
  memcpy(&bits, &max_abs, 4);
  const int e = int((bits >> 23) & 0xffu) - 127;
  return e < -kMaxScaleExp ? -kMaxScaleExp : (e > kMaxScaleExp ? kMaxScaleExp : e);
}

// x * 2^k for -504 <= k <= 0 (a scaled sum brought to a larger exponent), in steps of normal powers of
// two: exact while the result is normal, then the small value it is next to the larger set.
LK_HOST_DEVICE float scale_down(float x, int k) {
  for (int i = 0; i < 4; ++i) {
    const int step = k < -kMaxScaleExp ? -kMaxScaleExp : k;
    x *= pow2f(step);
    k -= step;
  }
  return x;
}

// --- group statistics (scaled: shift, sums and m2 of s * 2^-e) -------------------------------------------

// mean = shift + sum_shifted / n (of s * 2^-e: times pow2f(e) for the mean itself): exact when every
// member equals the shift.
LK_HOST_DEVICE float shifted_mean(float shift, float sum_shifted, float n) { return shift + sum_shifted / n; }

// sqrt(m2 / (n - ddof)) * 2^e from the scaled m2; a group of one has std 1 by convention.
LK_HOST_DEVICE float group_std(float m2, float n, float ddof, int e) {
  return n <= 1.0f ? 1.0f : sqrtf(m2 / (n - ddof)) * pow2f(e);
}

// Group baseline: 0 for a group of one.
LK_HOST_DEVICE float group_baseline(float mean, float n) { return n <= 1.0f ? 0.0f : mean; }

// Length-weighted baseline of opo: shift + sum w (s - shift) / sum w (scaled, then times 2^e); 0 when
// the group has one member or no tokens at all (no length information to weight by).
LK_HOST_DEVICE float opo_baseline(float shift, float wsum_shifted, float wsum, float n, int e) {
  return (n <= 1.0f || wsum == 0.0f) ? 0.0f : (shift + wsum_shifted / wsum) * pow2f(e);
}

// d / (std + eps), with an exact 0 for d == 0 (all-equal groups stay 0 even with eps = 0).
LK_HOST_DEVICE float scaled(float d, float std, float eps) { return d == 0.0f ? 0.0f : d / (std + eps); }

// Advantage of one member from its group's statistics, for the mean-baseline methods.
//   s: the member's score; baseline: group_baseline() or opo_baseline(); std: group_std();
//   n: group size.  batch and reinforce_pp_baseline return the centred score: their batch-level
//   scaling is applied afterwards (apply_global()).
LK_HOST_DEVICE float member_advantage(int method, float s, float baseline, float std, float n, float eps, bool norm) {
  const float d = s - baseline;
  switch (method) {
    case kGrpo:
      return norm ? scaled(d, std, eps) : d;
    case kRloo:
      return n <= 1.0f ? s : d * n / (n - 1.0f);
    default:  // dr_grpo, reinforce_pp_baseline, batch, opo
      return d;
  }
}

// Pass@k: only the group's best member (first of equal maxima) gets r_max - r_second; a group of
// one has r_second = 0 (its baseline) and std 1.
LK_HOST_DEVICE float passk_advantage(bool is_best, float r_max, float r_second, float std, float eps, bool norm) {
  if (!is_best) return 0.0f;
  const float d = r_max - r_second;
  return norm ? scaled(d, std, eps) : d;
}

// The runner-up of pass@k: a tied maximum counts twice (r_second = r_max), a group of one compares
// with its baseline 0; `below` is the largest score under the maximum.
LK_HOST_DEVICE float passk_runner_up(float n, int64_t n_top, float r_max, float below) {
  return n <= 1.0f ? 0.0f : (n_top >= 2 ? r_max : below);
}

// Unbiased std (times 2^e, from the scaled m2) of the k selected members of a group statistic
// (group_stats), 0 with fewer than two.
LK_HOST_DEVICE float selected_std(float m2, float k, int e) {
  return k >= 2.0f ? sqrtf(m2 / (k - 1.0f)) * pow2f(e) : 0.0f;
}

// --- weighted moments, merged associatively (Chan et al.) -----------------------------------------
// (w, mean, m2) of a set of weighted values x, as those of x * 2^-e; disjoint chunks (each with the
// exponent of its own largest |x|) merge in a fixed order at the larger exponent, so the batch
// statistics of batch/reinforce_pp_baseline are bitwise reproducible.
struct Moments {
  float w;
  float mean;  // of x * 2^-e
  float m2;    // of x * 2^-e
  int e;
};

LK_HOST_DEVICE Moments empty_moments() { return Moments{0.0f, 0.0f, 0.0f, -kMaxScaleExp}; }

LK_HOST_DEVICE Moments merge(const Moments& a, const Moments& b) {
  const float w = a.w + b.w;
  if (b.w == 0.0f) return a;
  if (a.w == 0.0f) return b;
  const int e = a.e > b.e ? a.e : b.e;
  const float a_mean = scale_down(a.mean, a.e - e), a_m2 = scale_down(a.m2, 2 * (a.e - e));
  const float b_mean = scale_down(b.mean, b.e - e), b_m2 = scale_down(b.m2, 2 * (b.e - e));
  const float delta = b_mean - a_mean;
  const float frac = b.w / w;
  return Moments{w, a_mean + delta * frac, a_m2 + b_m2 + delta * delta * a.w * frac, e};
}

// Unbiased variance (of x * 2^-e) with the total weight as the count (verl's masked_var): m2 / (w - 1).
LK_HOST_DEVICE float unbiased_var(const Moments& m) { return m.m2 / (m.w - 1.0f); }

constexpr float kFloatMax = 3.40282347e38f;

// Batch-level (shift, scale) applied as (x - shift) * scale after the group step.
//   reinforce_pp_baseline: token-weighted whitening, shift = mean, scale = rsqrt(var + 1e-8) (a var
//     past fp32's range swamps the 1e-8: then 1 / std, from the scaled var);
//   batch: shift = 0, scale = 1 / (std of the raw scores + eps).
LK_HOST_DEVICE void global_shift_scale(int method, const Moments& m, float eps, float* shift, float* scale) {
  const float var = unbiased_var(m);
  const float up = pow2f(m.e);
  if (method == kReinforcePPBaseline) {
    *shift = m.mean * up;
    const float var_x = var * up * up;
    const bool past = var_x > kFloatMax && var <= kFloatMax;
    *scale = past ? 1.0f / sqrtf(var) * pow2f(-m.e) : 1.0f / sqrtf(var_x + kWhitenEps);
  } else {
    *shift = 0.0f;
    *scale = 1.0f / (sqrtf(var) * up + eps);
  }
}

LK_HOST_DEVICE float apply_global(float x, float shift, float scale) { return (x - shift) * scale; }

// --- the rank -> normal map of G^2RPO (gaussian) ------------------------------------------------------
// Inverse standard normal CDF for 0 < p <= 0.5 (P. J. Acklam's rational approximation, relative
// error < 1.2e-9).  Evaluated in double: in float the central rational loses ~1e-4 near p = 0.025.
LK_HOST_DEVICE double norm_ppf_lower(double p) {
  if (p < 0.02425) {
    const double q = sqrt(-2.0 * log(p));
    const double num = ((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e+00) * q -
                         2.549732539343734e+00) * q + 4.374664141464968e+00) * q + 2.938163982698783e+00;
    const double den =
        (((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e+00) * q + 3.754408661907416e+00) *
            q + 1.0;
    return num / den;
  }
  const double q = p - 0.5;
  const double r = q * q;
  const double num = (((((-3.969683028665376e+01 * r + 2.209460984245205e+02) * r - 2.759285104469687e+02) * r +
                        1.383577518672690e+02) * r - 3.066479806614716e+01) * r + 2.506628277459239e+00) * q;
  const double den = ((((-5.447609879822406e+01 * r + 1.615858368580409e+02) * r - 1.556989798598866e+02) * r +
                       6.680131188771972e+01) * r - 1.328068155288572e+01) * r + 1.0;
  return num / den;
}

// Normal score of rank k (1-based) among n: Phi^-1((k - 0.5) / n).  Ranks k and n + 1 - k use the
// same p and opposite signs, so the map is exactly antisymmetric and the middle rank is exactly 0.
LK_HOST_DEVICE double rank_normal_score(int64_t k, int64_t n) {
  const int64_t mirror = n + 1 - k;
  const int64_t j = k < mirror ? k : mirror;
  const double v = norm_ppf_lower((double(j) - 0.5) / double(n));
  return k > mirror ? -v : v;
}

// Value shared by a run of tied rewards at ranks first..last (1-based, inclusive) of a group of n:
// the mean of their normal scores; 0 for n <= 1 and for a run that is the whole group.
LK_HOST_DEVICE bool gaussian_run_is_zero(int64_t run_len, int64_t n) { return n <= 1 || run_len == n; }

}  // namespace adv
}  // namespace lk
