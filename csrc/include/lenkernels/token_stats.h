// Token log-probabilities and entropy (SPEC 1): the per-element and per-row arithmetic beyond the
// softmax state itself, shared by the compiled backends (g++ and nvcc, host and device).
//
// Tiles are folded in base 2:
//   w = (x / T - m) * log2(e),   e = 2^w = exp(z - m),   e * (z - m) = e * w * ln 2,
// so an element costs one FMA, one multiply and one exp2 (a single instruction on the GPU), and the
// state that leaves a tile is in natural units again, ready for softmax_state.h's merge(). The
// offset x / T - m is formed first (one FMA, rounded once, small): scaling x and m into base 2
// separately (x * log2(e) / T - m * log2(e)) would subtract two large rounded numbers, ~1e-3 off at
// |z| = 1e4.
#pragma once

#include <cmath>

#include "lenkernels/softmax_state.h"

#if defined(__CUDACC__)
#define LK_UNROLL _Pragma("unroll")
#else
#define LK_UNROLL
#endif

namespace lk {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// 2^x with ~2 ulp error; x = -inf gives 0, NaN gives NaN, results below 2^-126 flush to 0 on the GPU
// (as the CPU's fast_exp does below e^-87.3).
LK_HOST_DEVICE float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// Folds a tile of K logits into st. get(k) returns the raw (unscaled) logit k; raw_max is their
// NaN-propagating max. z = x * inv_t is monotonic in x, so max z = raw_max * inv_t exactly (the
// same value the CPU finds): each element costs one exp against the tile's final max and the
// running state is rescaled once per tile.
template <int K, typename Get>
LK_HOST_DEVICE SoftmaxState fold_tile(const SoftmaxState& st, float raw_max, float inv_t, const Get& get) {
  const float m_tile = raw_max * inv_t;
  if (m_tile == kNegInf) return st;  // a fully masked (or padding) tile contributes nothing
  const float m = max_nan(st.m, m_tile);
  float s, u;
  rescale(st, m, &s, &u);
  float s_tile = 0.0f, u_tile = 0.0f;
  LK_UNROLL
  for (int k = 0; k < K; ++k) {
    const float w = fmaf(get(k), inv_t, -m) * kLog2e;  // (z - m) * log2(e); -inf for a masked logit
    const float e = exp2_approx(w);
    s_tile += e;
    // weighted_offset(e, w) in two instructions: a masked logit has e = 0 and w = -inf, and
    // 0 * -FLT_MAX = 0 where 0 * -inf would be NaN (a NaN w has a NaN e, which poisons S anyway)
    u_tile = fmaf(e, fmaxf(w, -3.40282347e38f), u_tile);
  }
  return SoftmaxState{m, s + s_tile, u + u_tile * kLn2};
}

// logprob of the row's token (SPEC 1): 0 for ignore_index, NaN for any other id outside
// [0, vocab) (never a plausible number), (z_y - m) - log S otherwise (softmax_state.h's log_prob).
LK_HOST_DEVICE float token_logprob(float z_target, const RowStats& rs, int64_t id, int64_t ignore_index,
                                   int64_t vocab) {
  if (id == ignore_index) return 0.0f;
  return (id >= 0 && id < vocab) ? log_prob(z_target, rs) : __builtin_nanf("");
}

// Per-row constants of the backward: p_j = exp(z_j - lse) = 2^((x_j / T - lse) * log2(e)).
struct GradRow {
  float inv_t, lse, mean_z, g_lp, g_h;
};

// g_lp is the logprob cotangent; an ignored row passes none to the logits (its entropy still does).
LK_HOST_DEVICE GradRow grad_row(float inv_t, float lse, float mean_z, float g_lp, float g_h, int64_t id,
                                int64_t ignore_index) {
  return GradRow{inv_t, lse, mean_z, id == ignore_index ? 0.0f : g_lp, g_h};
}

// d logits of one element from its raw logit x (SPEC 1; softmax_state.h's token_stats_grad). The
// exponent is formed in natural units first, as in fold_tile: only the rounding of lse itself (half
// an ulp of |lse|, ~5e-4 relative in p at |z| = 1e4) reaches p.
LK_HOST_DEVICE float token_stats_grad_raw(float x, bool is_target, const GradRow& r) {
  const float p = exp2_approx(fmaf(x, r.inv_t, -r.lse) * kLog2e);
  return token_stats_grad(x * r.inv_t, is_target, r.mean_z, r.g_lp, r.g_h, r.inv_t, p);
}

}  // namespace lk
