// Phase-split statistics (SPEC 6) and per-sequence token statistics, shared by the CPU (g++) and
// CUDA (nvcc) backends.
//
// A sequence is the token range [start, end) of a flat [N] layout (a padded [B, T] batch is the
// packed layout with start = b * T).  `valid` marks response tokens.  The delimiter d[0..L) occurs
// at offset k when the L tokens k .. k+L-1 are all response tokens and equal d; the first such k
// splits the sequence:
//   think  = response tokens at offsets < k
//   answer = response tokens at offsets >= k + L      (the delimiter tokens belong to neither)
// No occurrence: k = end - start (the sequence length), so the same two rules make every response
// token think and none answer.  Sums are fp32; an empty phase has mean 0 (never NaN).
#pragma once

#include <cstdint>

#include "lenkernels/common.h"

namespace lk {

enum Phase : int { kNoPhase = 0, kThink = 1, kAnswer = 2 };

// Sequence bounds from the offsets, clamped into [0, n_tokens] so a malformed cu_seqlens (only
// validated on CPU or in debug mode) can never address memory outside the inputs.
LK_HOST_DEVICE void sequence_bounds(const int64_t* cu_seqlens, int64_t seq, int64_t n_tokens, int64_t* start,
                                    int64_t* end) {
  int64_t s = cu_seqlens[seq], e = cu_seqlens[seq + 1];
  s = s < 0 ? 0 : (s > n_tokens ? n_tokens : s);
  e = e < s ? s : (e > n_tokens ? n_tokens : e);
  *start = s;
  *end = e;
}

// Whether the delimiter occurs at flat position t of a sequence ending at `end` (exclusive): all
// of its tokens inside the sequence, all response tokens.  A partial match at the end of the
// response, or one that runs into padding, does not count.
template <typename Id>
LK_HOST_DEVICE bool delimiter_at(const Id* ids, const uint8_t* valid, int64_t t, int64_t end, const int64_t* delim,
                                 int64_t delim_len) {
  if (t + delim_len > end) return false;
  for (int64_t j = 0; j < delim_len; ++j) {
    if (!valid[t + j] || static_cast<int64_t>(ids[t + j]) != delim[j]) return false;
  }
  return true;
}

// Offset of the first occurrence inside [start, end), or end - start when there is none.
template <typename Id>
LK_HOST_DEVICE int64_t find_delimiter(const Id* ids, const uint8_t* valid, int64_t start, int64_t end,
                                      const int64_t* delim, int64_t delim_len) {
  for (int64_t t = start; t + delim_len <= end; ++t) {
    if (delimiter_at(ids, valid, t, end, delim, delim_len)) return t - start;
  }
  return end - start;
}

// Phase of the token at offset `pos` of its sequence.
LK_HOST_DEVICE int token_phase(bool is_valid, int64_t pos, int64_t k, int64_t delim_len) {
  return !is_valid ? kNoPhase : (pos < k ? kThink : (pos >= k + delim_len ? kAnswer : kNoPhase));
}

LK_HOST_DEVICE float phase_mean(float sum, int64_t count) { return count > 0 ? sum / static_cast<float>(count) : 0.0f; }

// The packed sequences, the delimiter and the outputs of phase_stats_fwd: the part of both
// backends' forward arguments after the values and ids.
struct PhaseFwdArgs {
  const uint8_t* valid;  // [N] 1 = response token
  int64_t n_tokens;
  const int64_t* cu_seqlens;  // [S + 1]
  int64_t n_seq;
  const int64_t* delim;  // [L]
  int64_t delim_len;
  float *think_mean, *think_sum, *answer_mean, *answer_sum;  // [C, S]
  int64_t *think_count, *answer_count, *k;                   // [S]
  uint8_t* found;                                            // [S]
};

// The arguments of sequence_stats_fwd on both backends (the CPU adds its thread count).
struct SeqStatsArgs {
  const void* values;  // [N]
  int dtype;
  const uint8_t* valid;
  int64_t n_tokens;
  const int64_t* cu_seqlens;
  int64_t n_seq;
  float threshold;
  const float* quantile;  // [1], or null: no high-value mask
  int64_t* length;
  float *mean, *min, *max, *frac_above;
  uint8_t* high;  // [N], or null
};

// Channel c of sequence s: the think/answer sums and means ([C, S] outputs of a backend's FwdArgs).
template <class Out>
LK_HOST_DEVICE void write_phase_sums(const Out& a, int64_t c, int64_t s, float think, int64_t think_n, float answer,
                                     int64_t answer_n) {
  const int64_t o = c * a.n_seq + s;
  a.think_sum[o] = think;
  a.think_mean[o] = phase_mean(think, think_n);
  a.answer_sum[o] = answer;
  a.answer_mean[o] = phase_mean(answer, answer_n);
}

// d(loss)/d(value) for every token of one phase: each of its `count` tokens gets g_mean / count
// from the mean and g_sum from the sum (a phase without tokens has no gradient to give).
LK_HOST_DEVICE float phase_token_grad(float g_mean, float g_sum, int64_t count) {
  return count > 0 ? g_mean / static_cast<float>(count) + g_sum : 0.0f;
}

// ---- per-sequence token statistics (response length, mean/min/max, fraction above a threshold)

LK_HOST_DEVICE float min_nan(float a, float b) {
  const bool take_b = (b < a) | (b != b);
  return take_b ? b : a;
}

struct SeqStats {
  int64_t count;
  int64_t above;  // tokens with value > threshold (strictly)
  float sum;
  float min;
  float max;
};

LK_HOST_DEVICE SeqStats seq_stats_empty() { return SeqStats{0, 0, 0.0f, -kNegInf, kNegInf}; }

LK_HOST_DEVICE void seq_stats_add(SeqStats* st, float v, float threshold) {
  st->count += 1;
  st->above += v > threshold ? 1 : 0;
  st->sum += v;
  st->min = min_nan(st->min, v);
  st->max = max_nan(st->max, v);
}

LK_HOST_DEVICE SeqStats seq_stats_merge(const SeqStats& a, const SeqStats& b) {
  return SeqStats{a.count + b.count, a.above + b.above, a.sum + b.sum, min_nan(a.min, b.min), max_nan(a.max, b.max)};
}

struct SeqStatsOut {
  float mean;
  float min;
  float max;
  float frac_above;
};

// An empty sequence reports zeros (not NaN, not +-inf): loggers average these per step.
LK_HOST_DEVICE SeqStatsOut seq_stats_finalize(const SeqStats& st) {
  if (st.count == 0) return SeqStatsOut{0.0f, 0.0f, 0.0f, 0.0f};
  const float n = static_cast<float>(st.count);
  return SeqStatsOut{st.sum / n, st.min, st.max, static_cast<float>(st.above) / n};
}

// Sequence s's outputs of sequence_stats_fwd from its reduced statistics.
LK_HOST_DEVICE void write_seq_stats(const SeqStatsArgs& a, int64_t s, const SeqStats& st) {
  const SeqStatsOut out = seq_stats_finalize(st);
  a.length[s] = st.count;
  a.mean[s] = out.mean;
  a.min[s] = out.min;
  a.max[s] = out.max;
  a.frac_above[s] = out.frac_above;
}

// TRL's top_entropy_quantile mask: a response token whose value is >= the quantile threshold
// (a NaN threshold, from an empty batch or a NaN value, selects nothing).
LK_HOST_DEVICE bool high_value_token(bool is_valid, float v, float quantile_threshold) {
  return is_valid && v >= quantile_threshold;
}

}  // namespace lk
