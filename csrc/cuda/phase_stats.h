// Phase-split statistics (SPEC 6) and per-sequence token statistics on the GPU: what each block of
// the kernels in phase_stats.cu computes. The maths (delimiter match, phase of a token, gradients,
// the per-sequence statistics and their merge) is lenkernels/phase_stats.h, shared with the CPU
// backend; the bodies are templates over a Team (team.h), so the host emulation runs them as is.
//
// One block per sequence [start, end) of the flat [N] layout (a padded [B, T] batch is the packed
// layout with start = b * T):
//   forward    the first delimiter occurrence k (positions tested kSearchTile at a time, in order,
//              stopping at the first tile that holds one), then for each of the C value channels the
//              sums and counts of the think [0, k) and answer [k + L, len) response tokens
//   backward   every token of the sequence: g_mean / count + g_sum of its phase, 0 elsewhere
//   sequence   count, sum, min, max, tokens above a threshold (NaN-propagating), and the
//              high-value token mask against a quantile threshold
// Threads stride over the sequence (coalesced); block reductions in a fixed order: no atomics.
#pragma once

#include "lenkernels/phase_stats.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace phase_stats {

constexpr int kThreads = 256;
constexpr int kSearchUnroll = 4;  // positions each thread tests per step of the delimiter search
constexpr int kSearchTile = kThreads * kSearchUnroll;

LK_HOST_DEVICE float load_value(const void* base, int dtype, int64_t i) { return load_float(base, dtype, i); }

// The first occurrence at or after flat position `from` in a sequence ending at `end`: positions
// from + rank + j * N for j < kSearchUnroll, the earliest hit of the whole tile after one reduction.
template <typename Id, class Team>
LK_HOST_DEVICE int64_t first_delimiter(const Id* ids, const uint8_t* valid, int64_t start, int64_t end,
                                       const int64_t* delim, int64_t delim_len, Team& team) {
  const int64_t len = end - start;
  for (int64_t base = start; base < end; base += int64_t(Team::kSize) * kSearchUnroll) {
    int64_t hit = len;
    for (int j = kSearchUnroll - 1; j >= 0; --j) {  // the earliest of this thread's positions wins
      const int64_t t = base + team.rank() + int64_t(j) * Team::kSize;
      if (t < end && delimiter_at(ids, valid, t, end, delim, delim_len)) hit = t - start;
    }
    hit = team.all_reduce(hit, MinOp{}, len);
    if (hit < len) return hit;  // uniform: every thread holds the same reduced value
  }
  return len;
}

struct FwdArgs : PhaseFwdArgs {
  const void* values;  // [C, N], channel_stride apart, unit stride along N
  int dtype;
  int64_t n_channels, channel_stride;
  const void* ids;  // [N] int32 (id_bytes 4) or int64 (8)
  int id_bytes;
};

struct PhaseSums {
  float think, answer;
  int64_t think_n, answer_n;
};

struct PhaseSumsOp {
  LK_HOST_DEVICE PhaseSums operator()(const PhaseSums& a, const PhaseSums& b) const {
    return PhaseSums{a.think + b.think, a.answer + b.answer, a.think_n + b.think_n, a.answer_n + b.answer_n};
  }
};

template <class Team>
LK_HOST_DEVICE void fwd_block(const FwdArgs& a, int64_t seq, Team& team) {
  int64_t start, end;
  sequence_bounds(a.cu_seqlens, seq, a.n_tokens, &start, &end);
  const int64_t len = end - start;
  const int64_t k = a.id_bytes == 4 ? first_delimiter(static_cast<const int32_t*>(a.ids), a.valid, start, end,
                                                      a.delim, a.delim_len, team)
                                    : first_delimiter(static_cast<const int64_t*>(a.ids), a.valid, start, end,
                                                      a.delim, a.delim_len, team);
  // one pass per channel (a pass counting the phases alone when there is no channel)
  const int64_t passes = a.n_channels > 0 ? a.n_channels : 1;
  for (int64_t c = 0; c < passes; ++c) {
    const int64_t base = c * a.channel_stride;
    PhaseSums acc{0.0f, 0.0f, 0, 0};
    for (int64_t t = start + team.rank(); t < end; t += Team::kSize) {
      const int phase = token_phase(a.valid[t] != 0, t - start, k, a.delim_len);
      if (phase == kNoPhase) continue;  // a select, not a product: NaN outside the phases stays out
      const float x = a.n_channels > 0 ? load_value(a.values, a.dtype, base + t) : 0.0f;
      if (phase == kThink) {
        acc.think += x;
        acc.think_n += 1;
      } else {
        acc.answer += x;
        acc.answer_n += 1;
      }
    }
    acc = team.all_reduce(acc, PhaseSumsOp{}, PhaseSums{0.0f, 0.0f, 0, 0});
    if (team.rank() == 0) {
      if (a.n_channels > 0) write_phase_sums(a, c, seq, acc.think, acc.think_n, acc.answer, acc.answer_n);
      if (c == 0) {
        a.think_count[seq] = acc.think_n;
        a.answer_count[seq] = acc.answer_n;
        a.k[seq] = k;
        a.found[seq] = k < len ? 1 : 0;
      }
    }
  }
}

struct BwdArgs {
  const uint8_t* valid;
  int64_t n_tokens;
  const int64_t* cu_seqlens;
  int64_t n_seq;
  const int64_t *k, *think_count, *answer_count;  // [S] from the forward
  int64_t delim_len;
  const float *g_think_mean, *g_think_sum, *g_answer_mean, *g_answer_sum;  // [C, S] contiguous
  void* dvalues;  // [C, N] in dtype, channel_stride apart
  int dtype;
  int64_t n_channels, channel_stride;
};

template <class Team>
LK_HOST_DEVICE void bwd_block(const BwdArgs& a, int64_t seq, Team& team) {
  int64_t start, end;
  sequence_bounds(a.cu_seqlens, seq, a.n_tokens, &start, &end);
  const int64_t len = end - start;
  int64_t k = a.k[seq];
  k = k < 0 ? 0 : (k > len ? len : k);
  for (int64_t c = 0; c < a.n_channels; ++c) {
    const int64_t o = c * a.n_seq + seq, base = c * a.channel_stride;
    const float g_think = phase_token_grad(a.g_think_mean[o], a.g_think_sum[o], a.think_count[seq]);
    const float g_answer = phase_token_grad(a.g_answer_mean[o], a.g_answer_sum[o], a.answer_count[seq]);
    for (int64_t t = start + team.rank(); t < end; t += Team::kSize) {
      const int phase = token_phase(a.valid[t] != 0, t - start, k, a.delim_len);
      store_float(a.dvalues, a.dtype, base + t, phase == kThink ? g_think : (phase == kAnswer ? g_answer : 0.0f));
    }
  }
}

using SeqArgs = SeqStatsArgs;

struct SeqStatsOp {
  LK_HOST_DEVICE SeqStats operator()(const SeqStats& a, const SeqStats& b) const { return seq_stats_merge(a, b); }
};

template <class Team>
LK_HOST_DEVICE void sequence_block(const SeqArgs& a, int64_t seq, Team& team) {
  int64_t start, end;
  sequence_bounds(a.cu_seqlens, seq, a.n_tokens, &start, &end);
  const float quantile = a.quantile ? *a.quantile : __builtin_nanf("");
  SeqStats st = seq_stats_empty();
  for (int64_t t = start + team.rank(); t < end; t += Team::kSize) {
    const bool ok = a.valid[t] != 0;
    const float v = load_value(a.values, a.dtype, t);
    if (ok) seq_stats_add(&st, v, a.threshold);
    if (a.high) a.high[t] = high_value_token(ok, v, quantile) ? 1 : 0;
  }
  st = team.all_reduce(st, SeqStatsOp{}, seq_stats_empty());
  if (team.rank() == 0) write_seq_stats(a, seq, st);
}

}  // namespace phase_stats
}  // namespace cuda
}  // namespace lk
