// Phase-split statistics (SPEC 6) and per-sequence token statistics on the CPU.
//   phase_stats_fwd:    per sequence, find the first delimiter occurrence, then sum each of C value
//                       channels over the think range [0, k) and the answer range [k + L, len)
//   phase_stats_bwd:    per token, g_mean / count + g_sum of its phase (0 for delimiter/padding)
//   sequence_stats_fwd: per sequence, length, mean/min/max, fraction above a threshold, and the
//                       high-value token mask against a quantile threshold
// Sequences are independent and each is reduced by one thread in a fixed order (kLanes
// accumulators, pairwise lane reduction), so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "cpu_utils.h"
#include "lenkernels/phase_stats.h"

namespace lk {
namespace cpu {
namespace {

struct MaskedSum {
  float sum;
  int64_t count;
};

template <typename T>
LK_ALWAYS_INLINE MaskedSum masked_sum(const T* x, const uint8_t* valid, int64_t n) {
  float acc[kLanes];
  int64_t cnt[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    acc[k] = 0.0f;
    cnt[k] = 0;
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const bool ok = valid[i + k] != 0;
      const float v = to_float(x[i + k]);
      acc[k] += ok ? v : 0.0f;  // a select, not a product: NaN in padding must not leak in
      cnt[k] += ok ? 1 : 0;
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const bool ok = valid[i + k] != 0;
    acc[k] += ok ? to_float(x[i + k]) : 0.0f;
    cnt[k] += ok ? 1 : 0;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) {
      acc[k] += acc[k + w];
      cnt[k] += cnt[k + w];
    }
  }
  return MaskedSum{acc[0], cnt[0]};
}

LK_TARGET_CLONES MaskedSum masked_sum_any(int dtype, const void* base, int64_t offset, const uint8_t* valid,
                                          int64_t n) {
  MaskedSum out{0.0f, 0};
  if (n <= 0) return out;
  LK_DISPATCH_FLOAT(dtype, T, out = masked_sum(static_cast<const T*>(base) + offset, valid, n));
  return out;
}

// Runs body(s, start, end) for every sequence s, tokens [start, end), on a.threads threads
// (sequences are independent and each is reduced by one thread in a fixed order).
template <class Args, class Body>
void for_each_sequence(const Args& a, const Body& body) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(a.threads)
  for (int64_t s = 0; s < a.n_seq; ++s) {
    int64_t start, end;
    sequence_bounds(a.cu_seqlens, s, a.n_tokens, &start, &end);
    body(s, start, end);
  }
}

struct FwdArgs : PhaseFwdArgs {
  const void* values;  // [C, N] with channel_stride
  int dtype;
  int64_t n_channels, channel_stride;
  const int64_t* ids;  // [N]
  int threads;
};

void forward(const FwdArgs& a) {
  for_each_sequence(a, [&](int64_t s, int64_t start, int64_t end) {
    const int64_t len = end - start;
    const int64_t k = find_delimiter(a.ids, a.valid, start, end, a.delim, a.delim_len);
    const int64_t answer_begin = std::min(len, k + a.delim_len);
    for (int64_t c = 0; c < a.n_channels; ++c) {
      const int64_t base = c * a.channel_stride + start;
      const MaskedSum think = masked_sum_any(a.dtype, a.values, base, a.valid + start, k);
      const MaskedSum answer =
          masked_sum_any(a.dtype, a.values, base + answer_begin, a.valid + start + answer_begin, len - answer_begin);
      write_phase_sums(a, c, s, think.sum, think.count, answer.sum, answer.count);
      if (c == 0) {
        a.think_count[s] = think.count;
        a.answer_count[s] = answer.count;
      }
    }
    a.k[s] = k;
    a.found[s] = k < len ? 1 : 0;
  });
}

template <typename T>
LK_ALWAYS_INLINE void fill_grad(T* out, const uint8_t* valid, int64_t n, float g) {
  const T g_t = from_float<T>(g);
  const T zero = from_float<T>(0.0f);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = valid[i] ? g_t : zero;
}

LK_TARGET_CLONES void fill_grad_any(int dtype, void* base, int64_t offset, const uint8_t* valid, int64_t n, float g) {
  if (n <= 0) return;
  LK_DISPATCH_FLOAT(dtype, T, fill_grad(static_cast<T*>(base) + offset, valid, n, g));
}

struct BwdArgs {
  const uint8_t* valid;
  int64_t n_tokens;
  const int64_t* cu_seqlens;
  int64_t n_seq;
  const int64_t *k, *think_count, *answer_count;
  int64_t delim_len;
  const float *g_think_mean, *g_think_sum, *g_answer_mean, *g_answer_sum;  // [C, S] contiguous
  void* dvalues;                                                           // [C, N], values dtype
  int dtype;
  int64_t n_channels, channel_stride;
  int threads;
};

void backward(const BwdArgs& a) {
  for_each_sequence(a, [&](int64_t s, int64_t start, int64_t end) {
    const int64_t len = end - start;
    const int64_t k = std::min(std::max(a.k[s], int64_t(0)), len);
    const int64_t answer_begin = std::min(len, k + a.delim_len);
    for (int64_t c = 0; c < a.n_channels; ++c) {
      const int64_t o = c * a.n_seq + s, base = c * a.channel_stride + start;
      const float g_think = phase_token_grad(a.g_think_mean[o], a.g_think_sum[o], a.think_count[s]);
      const float g_answer = phase_token_grad(a.g_answer_mean[o], a.g_answer_sum[o], a.answer_count[s]);
      fill_grad_any(a.dtype, a.dvalues, base, a.valid + start, k, g_think);
      fill_grad_any(a.dtype, a.dvalues, base + k, a.valid + start + k, answer_begin - k, 0.0f);
      fill_grad_any(a.dtype, a.dvalues, base + answer_begin, a.valid + start + answer_begin, len - answer_begin,
                    g_answer);
    }
  });
}

template <typename T, bool kWriteMask>
LK_ALWAYS_INLINE SeqStats seq_stats(const T* x, const uint8_t* valid, int64_t n, float threshold, float quantile,
                                    uint8_t* high) {
  SeqStats lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = seq_stats_empty();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const bool ok = valid[i + k] != 0;
      const float v = to_float(x[i + k]);
      if (ok) seq_stats_add(&lanes[k], v, threshold);
      if (kWriteMask) high[i + k] = high_value_token(ok, v, quantile) ? 1 : 0;
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const bool ok = valid[i + k] != 0;
    const float v = to_float(x[i + k]);
    if (ok) seq_stats_add(&lanes[k], v, threshold);
    if (kWriteMask) high[i + k] = high_value_token(ok, v, quantile) ? 1 : 0;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) lanes[k] = seq_stats_merge(lanes[k], lanes[k + w]);
  }
  return lanes[0];
}

LK_TARGET_CLONES SeqStats seq_stats_any(int dtype, const void* base, int64_t offset, const uint8_t* valid, int64_t n,
                                        float threshold, float quantile, uint8_t* high) {
  SeqStats out = seq_stats_empty();
  if (high) {
    LK_DISPATCH_FLOAT(dtype, T,
                      out = (seq_stats<T, true>(static_cast<const T*>(base) + offset, valid, n, threshold, quantile,
                                                high)));
  } else {
    LK_DISPATCH_FLOAT(dtype, T,
                      out = (seq_stats<T, false>(static_cast<const T*>(base) + offset, valid, n, threshold, quantile,
                                                 nullptr)));
  }
  return out;
}

struct SeqArgs : SeqStatsArgs {
  int threads;
};

void sequence_stats(const SeqArgs& a) {
  const float quantile = a.quantile ? *a.quantile : std::numeric_limits<float>::quiet_NaN();
  for_each_sequence(a, [&](int64_t s, int64_t start, int64_t end) {
    const SeqStats st = seq_stats_any(a.dtype, a.values, start, a.valid + start, end - start, a.threshold, quantile,
                                      a.high ? a.high + start : nullptr);
    write_seq_stats(a, s, st);
  });
}

// The Python bindings; dtype codes are checked before any work (with empty sequences the
// dispatch is never reached).
void define(py::module_& m) {
  m.def("phase_stats_fwd", [](Addr values, int dtype, int64_t n_channels, int64_t channel_stride, Addr ids,
                              Addr valid, int64_t n_tokens, Addr cu_seqlens, int64_t n_seq, Addr delim,
                              int64_t delim_len, Addr think_mean, Addr think_sum, Addr answer_mean,
                              Addr answer_sum, Addr think_count, Addr answer_count, Addr k, Addr found,
                              int threads) {
    check_float_dtype(dtype);
    const PhaseFwdArgs seqs{valid, n_tokens, cu_seqlens, n_seq, delim, delim_len, think_mean,
                            think_sum, answer_mean, answer_sum, think_count, answer_count, k, found};
    forward(FwdArgs{seqs, values, dtype, n_channels, channel_stride, ids, threads_for(threads)});
  }, LK_NOGIL);
  m.def("phase_stats_bwd", [](Addr valid, int64_t n_tokens, Addr cu_seqlens, int64_t n_seq, Addr k,
                              Addr think_count, Addr answer_count, int64_t delim_len, Addr g_think_mean,
                              Addr g_think_sum, Addr g_answer_mean, Addr g_answer_sum, Addr dvalues, int dtype,
                              int64_t n_channels, int64_t channel_stride, int threads) {
    check_float_dtype(dtype);
    backward(BwdArgs{valid, n_tokens, cu_seqlens, n_seq, k, think_count, answer_count, delim_len, g_think_mean,
                     g_think_sum, g_answer_mean, g_answer_sum, dvalues, dtype, n_channels, channel_stride,
                     threads_for(threads)});
  }, LK_NOGIL);
  m.def("sequence_stats_fwd", [](Addr values, int dtype, Addr valid, int64_t n_tokens, Addr cu_seqlens,
                                 int64_t n_seq, float threshold, Addr quantile, Addr length, Addr mean, Addr min,
                                 Addr max, Addr frac_above, Addr high, int threads) {
    check_float_dtype(dtype);
    sequence_stats(SeqArgs{{values, dtype, valid, n_tokens, cu_seqlens, n_seq, threshold, quantile, length, mean, min,
                            max, frac_above, high},
                           threads_for(threads)});
  }, LK_NOGIL);
}

}  // namespace
}  // namespace cpu
}  // namespace lk

LK_MODULE(_cpu_phase_stats, "lenkernels CPU kernels: phase-split and per-sequence token statistics (raw pointers)",
          lk::cpu::define)
