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
  LK_DISPATCH_DTYPE(dtype, T, out = masked_sum(static_cast<const T*>(base) + offset, valid, n));
  return out;
}

struct FwdArgs {
  const void* values;  // [C, N] with channel_stride
  int dtype;
  int64_t n_channels, channel_stride;
  const int64_t* ids;    // [N]
  const uint8_t* valid;  // [N]
  int64_t n_tokens;
  const int64_t* cu_seqlens;  // [S + 1]
  int64_t n_seq;
  const int64_t* delim;  // [L]
  int64_t delim_len;
  float *think_mean, *think_sum, *answer_mean, *answer_sum;  // [C, S]
  int64_t *think_count, *answer_count, *k;                   // [S]
  uint8_t* found;                                            // [S]
  int threads;
};

void forward(const FwdArgs& a) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(a.threads)
  for (int64_t s = 0; s < a.n_seq; ++s) {
    int64_t start, end;
    sequence_bounds(a.cu_seqlens, s, a.n_tokens, &start, &end);
    const int64_t len = end - start;
    const int64_t k = find_delimiter(a.ids, a.valid, start, end, a.delim, a.delim_len);
    const int64_t answer_begin = std::min(len, k + a.delim_len);
    for (int64_t c = 0; c < a.n_channels; ++c) {
      const int64_t base = c * a.channel_stride + start;
      const MaskedSum think = masked_sum_any(a.dtype, a.values, base, a.valid + start, k);
      const MaskedSum answer =
          masked_sum_any(a.dtype, a.values, base + answer_begin, a.valid + start + answer_begin, len - answer_begin);
      const int64_t o = c * a.n_seq + s;
      a.think_sum[o] = think.sum;
      a.think_mean[o] = phase_mean(think.sum, think.count);
      a.answer_sum[o] = answer.sum;
      a.answer_mean[o] = phase_mean(answer.sum, answer.count);
      if (c == 0) {
        a.think_count[s] = think.count;
        a.answer_count[s] = answer.count;
      }
    }
    a.k[s] = k;
    a.found[s] = k < len ? 1 : 0;
  }
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
  LK_DISPATCH_DTYPE(dtype, T, fill_grad(static_cast<T*>(base) + offset, valid, n, g));
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
#pragma omp parallel for schedule(dynamic, 8) num_threads(a.threads)
  for (int64_t s = 0; s < a.n_seq; ++s) {
    int64_t start, end;
    sequence_bounds(a.cu_seqlens, s, a.n_tokens, &start, &end);
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
  }
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
    LK_DISPATCH_DTYPE(dtype, T,
                      out = (seq_stats<T, true>(static_cast<const T*>(base) + offset, valid, n, threshold, quantile,
                                                high)));
  } else {
    LK_DISPATCH_DTYPE(dtype, T,
                      out = (seq_stats<T, false>(static_cast<const T*>(base) + offset, valid, n, threshold, quantile,
                                                 nullptr)));
  }
  return out;
}

struct SeqArgs {
  const void* values;
  int dtype;
  const uint8_t* valid;
  int64_t n_tokens;
  const int64_t* cu_seqlens;
  int64_t n_seq;
  float threshold;
  const float* quantile;  // [1] or null: no high-value mask
  int64_t* length;
  float *mean, *min, *max, *frac_above;
  uint8_t* high;  // [N] or null
  int threads;
};

void sequence_stats(const SeqArgs& a) {
  const float quantile = a.quantile ? *a.quantile : std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel for schedule(dynamic, 8) num_threads(a.threads)
  for (int64_t s = 0; s < a.n_seq; ++s) {
    int64_t start, end;
    sequence_bounds(a.cu_seqlens, s, a.n_tokens, &start, &end);
    const SeqStats st = seq_stats_any(a.dtype, a.values, start, a.valid + start, end - start, a.threshold, quantile,
                                      a.high ? a.high + start : nullptr);
    const SeqStatsOut out = seq_stats_finalize(st);
    a.length[s] = st.count;
    a.mean[s] = out.mean;
    a.min[s] = out.min;
    a.max[s] = out.max;
    a.frac_above[s] = out.frac_above;
  }
}

// An unknown dtype code raises before any work: with empty sequences the dispatch is never reached.
void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) {
    throw pybind11::value_error("unsupported dtype code " + std::to_string(dtype) + " (lenkernels._codes.DType)");
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lk

namespace py = pybind11;

PYBIND11_MODULE(_cpu_phase_stats, m) {
  m.doc() = "lenkernels CPU kernels: phase-split and per-sequence token statistics (raw pointers)";
  m.def("phase_stats_fwd", [](uintptr_t values, int dtype, int64_t n_channels, int64_t channel_stride, uintptr_t ids,
                              uintptr_t valid, int64_t n_tokens, uintptr_t cu_seqlens, int64_t n_seq,
                              uintptr_t delim, int64_t delim_len, uintptr_t think_mean, uintptr_t think_sum,
                              uintptr_t answer_mean, uintptr_t answer_sum, uintptr_t think_count,
                              uintptr_t answer_count, uintptr_t k, uintptr_t found, int threads) {
    using namespace lk::cpu;
    check_dtype(dtype);
    FwdArgs a{reinterpret_cast<const void*>(values), dtype, n_channels, channel_stride, ptr<const int64_t>(ids),
              ptr<const uint8_t>(valid), n_tokens, ptr<const int64_t>(cu_seqlens), n_seq, ptr<const int64_t>(delim),
              delim_len, ptr<float>(think_mean), ptr<float>(think_sum), ptr<float>(answer_mean),
              ptr<float>(answer_sum), ptr<int64_t>(think_count), ptr<int64_t>(answer_count), ptr<int64_t>(k),
              ptr<uint8_t>(found), threads_for(threads)};
    py::gil_scoped_release release;
    forward(a);
  });
  m.def("phase_stats_bwd", [](uintptr_t valid, int64_t n_tokens, uintptr_t cu_seqlens, int64_t n_seq, uintptr_t k,
                              uintptr_t think_count, uintptr_t answer_count, int64_t delim_len,
                              uintptr_t g_think_mean, uintptr_t g_think_sum, uintptr_t g_answer_mean,
                              uintptr_t g_answer_sum, uintptr_t dvalues, int dtype, int64_t n_channels,
                              int64_t channel_stride, int threads) {
    using namespace lk::cpu;
    check_dtype(dtype);
    BwdArgs a{ptr<const uint8_t>(valid), n_tokens, ptr<const int64_t>(cu_seqlens), n_seq, ptr<const int64_t>(k),
              ptr<const int64_t>(think_count), ptr<const int64_t>(answer_count), delim_len,
              ptr<const float>(g_think_mean), ptr<const float>(g_think_sum), ptr<const float>(g_answer_mean),
              ptr<const float>(g_answer_sum), reinterpret_cast<void*>(dvalues), dtype, n_channels, channel_stride,
              threads_for(threads)};
    py::gil_scoped_release release;
    backward(a);
  });
  m.def("sequence_stats_fwd", [](uintptr_t values, int dtype, uintptr_t valid, int64_t n_tokens,
                                 uintptr_t cu_seqlens, int64_t n_seq, float threshold, uintptr_t quantile,
                                 uintptr_t length, uintptr_t mean, uintptr_t min, uintptr_t max,
                                 uintptr_t frac_above, uintptr_t high, int threads) {
    using namespace lk::cpu;
    check_dtype(dtype);
    SeqArgs a{reinterpret_cast<const void*>(values), dtype, ptr<const uint8_t>(valid), n_tokens,
              ptr<const int64_t>(cu_seqlens), n_seq, threshold, ptr<const float>(quantile), ptr<int64_t>(length),
              ptr<float>(mean), ptr<float>(min), ptr<float>(max), ptr<float>(frac_above), ptr<uint8_t>(high),
              threads_for(threads)};
    py::gil_scoped_release release;
    sequence_stats(a);
  });
  m.attr("SOURCE_HASH") = LK_SOURCE_HASH;
}
