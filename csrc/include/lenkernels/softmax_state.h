// Online-softmax state over a vocabulary row, carried in fp32 (DESIGN.md "Kernel design notes").
//   m = running max of z, S = sum exp(z - m), U = sum exp(z - m) * (z - m)   (U <= 0)
// States of disjoint vocabulary ranges merge associatively, so chunked rows, split-vocab
// programs and tensor-parallel shards all use merge() below.  From a state:
//   lse = m + log S,  mean_z = E_p[z] = m + U / S,  H = log S - U / S  (two non-negative terms),
//   log p_y = (z_y - m) - log S  (never z_y - lse: see log_prob below).
#pragma once

#include <cmath>

#include "lenkernels/common.h"

namespace lk {

struct SoftmaxState {
  float m;
  float s;
  float u;
};

LK_HOST_DEVICE SoftmaxState empty_state() { return SoftmaxState{kNegInf, 0.0f, 0.0f}; }

// Rescales state a to the reference max m_new.  A state that has seen only -inf (s == 0)
// contributes nothing; guarding it avoids exp(-inf - -inf) = NaN.
LK_HOST_DEVICE void rescale(const SoftmaxState& a, float m_new, float* s, float* u) {
  if (a.s == 0.0f) {
    *s = 0.0f;
    *u = 0.0f;
    return;
  }
  const float delta = a.m - m_new;  // <= 0, or NaN when a NaN is involved
  const float c = expf(delta);
  *s = c * a.s;
  *u = c * (a.u + delta * a.s);
}

LK_HOST_DEVICE SoftmaxState merge(const SoftmaxState& a, const SoftmaxState& b) {
  const float m = max_nan(a.m, b.m);
  float sa, ua, sb, ub;
  rescale(a, m, &sa, &ua);
  rescale(b, m, &sb, &ub);
  return SoftmaxState{m, sa + sb, ua + ub};
}

// Contribution of one logit z (already divided by the temperature) relative to max m.
// exp(-inf) * (-inf) would be NaN: a masked logit contributes exactly zero instead.
LK_HOST_DEVICE float weighted_offset(float e, float d) { return e > 0.0f ? e * d : 0.0f; }

struct RowStats {
  float lse;
  float mean_z;
  float entropy;
  float m;      // the state's max: lse = m + log_s in real numbers (not after rounding to fp32)
  float log_s;  // log S, in [0, log V]
};

// No special cases: an all -inf row has s == 0, so lse = -inf and U / S = NaN (entropy NaN, every
// logprob NaN, SPEC 1); a NaN or +inf logit makes s NaN and poisons every statistic.
LK_HOST_DEVICE RowStats finalize(const SoftmaxState& st) {
  const float log_s = logf(st.s);
  const float ratio = st.u / st.s;
  return RowStats{st.m + log_s, st.m + ratio, log_s - ratio, st.m, log_s};
}

// log p of a logit z (already divided by T) of the row: (z - m) - log S. Both terms are small, so
// the result keeps fp32's relative precision. z - lse would subtract two numbers of the size of the
// logits instead: lse = m + log S is rounded at that size (ulp(1e4) = 2^-10 in fp32), which costs
// ~4e-4 absolute at |z| = 1e4 and ~6e-5 at |z| = 3 000 (logits of 30 at T = 0.01).
LK_HOST_DEVICE float log_prob(float z, const RowStats& rs) { return (z - rs.m) - rs.log_s; }

// 1 / T in fp32; a temperature that is not a positive finite number poisons the row with NaN
// instead of silently producing a plausible distribution.
LK_HOST_DEVICE float inverse_temperature(float t) {
  return (t > 0.0f && t < -kNegInf) ? 1.0f / t : __builtin_nanf("");
}

// d logits_j (SPEC 1), before conversion to the logits dtype.
//   p = exp(z - lse); grad = (g_lp * (1[j=y] - p) - g_h * p * (z - mean_z)) / T
LK_HOST_DEVICE float token_stats_grad(float z, bool is_target, float mean_z, float g_lp, float g_h,
                                       float inv_t, float p) {
  const float ent_term = p > 0.0f ? p * (z - mean_z) : 0.0f;
  return (g_lp * ((is_target ? 1.0f : 0.0f) - p) - g_h * ent_term) * inv_t;
}

}  // namespace lk
