// Group advantages (SPEC 4) and per-group statistics on the CPU.
//   group_advantages   one group per OpenMP work item (dynamic schedule): row sums of token rewards
//                      and masks, group mean/std/top-2, one advantage per response
//   gaussian_rank      one run of tied scores per work item: mean normal score of its ranks
//   batch_shift_scale  weighted moments of fixed 4096-element chunks, merged left to right
//   broadcast          (adv - shift) * scale times the mask, masked tokens exactly 0
//   group_stats        count/sum/mean/std/min/max of the selected members of each group
// The segmentation (perm, offsets, runs) comes from lenkernels/_grouping.py.  Every sum runs
// in a fixed order inside one work item, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu_utils.h"
#include "lenkernels/advantages.h"
#include "lenkernels/advantages_args.h"

namespace lk {
namespace cpu {
namespace {

constexpr int64_t kMomentChunk = 4096;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Masks and lengths: float32/bf16/fp16 share the logits dtype codes; then bool/uint8, int32, int64.
LK_ALWAYS_INLINE float as_float(float x) { return x; }
LK_ALWAYS_INLINE float as_float(bf16 x) { return to_float(x); }
LK_ALWAYS_INLINE float as_float(fp16 x) { return to_float(x); }
LK_ALWAYS_INLINE float as_float(uint8_t x) { return float(x); }
LK_ALWAYS_INLINE float as_float(int32_t x) { return float(x); }
LK_ALWAYS_INLINE float as_float(int64_t x) { return float(x); }

int64_t elem_size(int code) {
  switch (static_cast<Weight>(code)) {
    case Weight::kBool:
      return 1;
    case Weight::kBFloat16:
    case Weight::kFloat16:
      return 2;
    case Weight::kFloat32:
    case Weight::kInt32:
      return 4;
    default:  // kInt64
      return 8;
  }
}

template <typename W>
LK_ALWAYS_INLINE float row_sum(const W* x, int64_t n) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = 0.0f;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) acc[k] += as_float(x[i + k]);
  }
  for (int k = 0; i + k < n; ++k) acc[k] += as_float(x[i + k]);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  }
  return acc[0];
}

// Sum of one row of token rewards or of a mask (the hot loop for [B, T] inputs).
LK_TARGET_CLONES float row_sum_any(int code, const void* x, int64_t n) {
  float out = 0.0f;
  LK_DISPATCH_WEIGHT(code, W, out = row_sum(static_cast<const W*>(x), n));
  return out;
}

// out[i] = base[rows[i]] as float, for i < n: one dtype dispatch per group, not per element.
void gather(int code, const void* base, const int64_t* rows, int64_t n, float* out) {
  LK_DISPATCH_WEIGHT(code, W, {
    const W* x = static_cast<const W*>(base);
    for (int64_t i = 0; i < n; ++i) out[i] = as_float(x[rows[i]]);
  });
}

float load_one(int code, const void* base, int64_t i) {
  float out = 0.0f;
  LK_DISPATCH_WEIGHT(code, W, out = as_float(static_cast<const W*>(base)[i]));
  return out;
}

const void* row_ptr(const void* base, int code, int64_t row, int64_t stride) {
  return static_cast<const char*>(base) + row * stride * elem_size(code);
}

struct GroupArgs {
  const void* rewards;
  int r_dtype;
  int64_t n, T, stride_r;  // T = 0: [B] scores
  const void* mask;        // lengths from the mask's row sums, when not null
  int m_dtype;
  int64_t Tm, stride_m;
  const void* lengths;  // [B] lengths, when not null
  int l_dtype;
  const int64_t *perm, *offsets, *n_groups;
  int64_t group_size;
  int method;
  float eps;
  bool norm;
  float ddof;
  float *adv, *raw, *w_out;
  int threads;
};

void group_bounds(const int64_t* offsets, int64_t group_size, int64_t g, int64_t* gs, int64_t* ge) {
  if (offsets) {
    *gs = offsets[g];
    *ge = offsets[g + 1];
  } else {
    *gs = g * group_size;
    *ge = *gs + group_size;
  }
}

// The rows of group g (perm[offsets[g]:offsets[g + 1]], or a contiguous run of group_size) into
// rows; returns their count.
int64_t group_rows(const int64_t* perm, const int64_t* offsets, int64_t group_size, int64_t g,
                   std::vector<int64_t>* rows) {
  int64_t gs, ge;
  group_bounds(offsets, group_size, g, &gs, &ge);
  const int64_t size = ge - gs;
  rows->resize(size);
  for (int64_t i = 0; i < size; ++i) (*rows)[i] = perm ? perm[gs + i] : gs + i;
  return size;
}

// Runs body(size, rows, f0, f1) for every group, rows its `size` rows and f0, f1 scratch buffers of
// the thread, on a.threads threads (groups are independent: any schedule gives the same result).
template <class Args, class Body>
void for_each_group(const Args& a, const Body& body) {
  const int64_t n_groups = a.n_groups[0];
#pragma omp parallel num_threads(a.threads)
  {
    std::vector<float> f0, f1;
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 16)
    for (int64_t g = 0; g < n_groups; ++g) body(group_rows(a.perm, a.offsets, a.group_size, g, &rows), rows, f0, f1);
  }
}

void group_advantages(const GroupArgs& a) {
  using namespace lk::adv;
  for_each_group(a, [&](int64_t size, const std::vector<int64_t>& rows, std::vector<float>& s, std::vector<float>& w) {
    s.resize(size);
    w.resize(size);
    if (a.T) {
      for (int64_t i = 0; i < size; ++i) {
        s[i] = row_sum_any(a.r_dtype, row_ptr(a.rewards, a.r_dtype, rows[i], a.stride_r), a.T);
      }
    } else {
      gather(a.r_dtype, a.rewards, rows.data(), size, s.data());
    }
    if (a.lengths) {
      gather(a.l_dtype, a.lengths, rows.data(), size, w.data());
    } else if (a.mask) {
      for (int64_t i = 0; i < size; ++i) {
        w[i] = row_sum_any(a.m_dtype, row_ptr(a.mask, a.m_dtype, rows[i], a.stride_m), a.Tm);
      }
    } else {
      std::fill(w.begin(), w.end(), 1.0f);
    }
    const float n = float(size);
    float max_abs = 0.0f;  // the sums and squares are of s * 2^-e (advantages.h)
    for (int64_t i = 0; i < size; ++i) max_abs = abs_max(max_abs, s[i]);
    const int e = scale_exponent(max_abs);
    const float down = pow2f(-e);
    const float shift = s[0] * down;  // all-equal group: mean == shift exactly
    float sum_d = 0.0f, wsum_d = 0.0f, wsum = 0.0f, r_max = -kInf;
    bool has_nan = false;
    for (int64_t i = 0; i < size; ++i) {
      const float d = s[i] * down - shift;
      sum_d += d;
      wsum_d += w[i] * d;
      wsum += w[i];
      r_max = std::max(r_max, s[i]);
      has_nan |= s[i] != s[i];
    }
    const float mean_s = shifted_mean(shift, sum_d, n);
    const float mean = mean_s * pow2f(e);
    const float baseline = a.method == kOpo ? opo_baseline(shift, wsum_d, wsum, n, e) : group_baseline(mean, n);
    float m2 = 0.0f, below = -kInf;
    int64_t n_top = 0, best = -1;
    for (int64_t i = 0; i < size; ++i) {
      const float c = s[i] * down - mean_s;
      m2 += c * c;
      if (s[i] == r_max) {
        if (best < 0) best = i;
        ++n_top;
      } else if (s[i] < r_max) {
        below = std::max(below, s[i]);
      }
    }
    const float std = group_std(m2, n, a.ddof, e);
    const float r_second = n <= 1.0f ? 0.0f : (n_top >= 2 ? r_max : below);
    for (int64_t i = 0; i < size; ++i) {
      float out;
      if (a.method == kGrpoPassk) {
        out = has_nan ? quiet_nan() : passk_advantage(i == best, r_max, r_second, std, a.eps, a.norm);
      } else {
        out = member_advantage(a.method, s[i], baseline, std, n, a.eps, a.norm);
      }
      a.adv[rows[i]] = out;
      if (a.raw) a.raw[rows[i]] = s[i];
      if (a.w_out) a.w_out[rows[i]] = w[i];
    }
  });
}

struct RunArgs {
  const float* keys;
  int64_t n;
  const int64_t *perm, *group_of, *group_offsets, *run_offsets, *n_runs;
  float* adv;
  int threads;
};

void gaussian_rank(const RunArgs& a) {
  using namespace lk::adv;
  const int64_t n_runs = a.n_runs[0];
#pragma omp parallel for schedule(dynamic, 64) num_threads(a.threads)
  for (int64_t r = 0; r < n_runs; ++r) {
    const int64_t rs = a.run_offsets[r], re = a.run_offsets[r + 1];
    const int64_t g = a.group_of[rs];
    const int64_t gs = a.group_offsets[g], ge = a.group_offsets[g + 1];
    const int64_t n = ge - gs, run_len = re - rs;
    float value = 0.0f;
    if (!gaussian_run_is_zero(run_len, n)) {
      double acc = 0.0;
      for (int64_t p = rs; p < re; ++p) acc += rank_normal_score(p - gs + 1, n);
      value = float(acc / double(run_len));
    }
    const float last = a.keys[a.perm[ge - 1]];  // NaN sorts last
    if (last != last) value = quiet_nan();
    for (int64_t p = rs; p < re; ++p) a.adv[a.perm[p]] = value;
  }
}

struct MomentArgs {
  const float* x;
  int64_t n;
  const void* w;  // weights, or null for 1 each
  int w_dtype;
  int method;
  float eps;
  float* stats;  // [2] out: shift, scale
  int threads;
};

void batch_shift_scale(const MomentArgs& a) {
  using namespace lk::adv;
  const int64_t n_chunks = (a.n + kMomentChunk - 1) / kMomentChunk;
  std::vector<Moments> parts(n_chunks);
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t begin = c * kMomentChunk, end = std::min(a.n, begin + kMomentChunk);
    float wsum = 0.0f, max_abs = 0.0f;  // the chunk's moments are those of x * 2^-e (advantages.h)
    for (int64_t i = begin; i < end; ++i) {
      const float w = a.w ? load_one(a.w_dtype, a.w, i) : 1.0f;
      wsum += w;
      if (w != 0.0f) max_abs = abs_max(max_abs, a.x[i]);
    }
    const int e = scale_exponent(max_abs);
    const float down = pow2f(-e);
    float wx = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const float w = a.w ? load_one(a.w_dtype, a.w, i) : 1.0f;
      if (w != 0.0f) wx += w * (a.x[i] * down);
    }
    const float mean = wsum > 0.0f ? wx / wsum : 0.0f;
    float m2 = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const float w = a.w ? load_one(a.w_dtype, a.w, i) : 1.0f;
      const float d = a.x[i] * down - mean;
      if (w != 0.0f) m2 += w * d * d;
    }
    parts[c] = Moments{wsum, mean, m2, e};
  }
  Moments total = parts[0];
  for (int64_t c = 1; c < n_chunks; ++c) total = merge(total, parts[c]);
  global_shift_scale(a.method, total, a.eps, &a.stats[0], &a.stats[1]);
}

struct BroadcastArgs {
  const float* adv;
  int64_t n;
  const float* stats;  // (shift, scale), or null
  const void* mask;    // [n, T], or null: out is [n]
  int m_dtype;
  int64_t T, stride_m;
  float* out;
  int64_t stride_o;
  int threads;
};

template <typename W>
void broadcast_rows(const BroadcastArgs& a) {
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t r = 0; r < a.n; ++r) {
    float v = a.adv[r];
    if (a.stats) v = lk::adv::apply_global(v, a.stats[0], a.stats[1]);
    const W* m = static_cast<const W*>(a.mask) + r * a.stride_m;
    float* o = a.out + r * a.stride_o;
#pragma omp simd
    for (int64_t t = 0; t < a.T; ++t) {
      const float mt = as_float(m[t]);
      o[t] = mt != 0.0f ? v * mt : 0.0f;
    }
  }
}

void broadcast(const BroadcastArgs& a) {
  if (a.mask) {
    if (a.stride_o == a.T) advise_huge_pages(a.out, a.n * a.T * int64_t(sizeof(float)));
    LK_DISPATCH_WEIGHT(a.m_dtype, W, broadcast_rows<W>(a));
    return;
  }
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t r = 0; r < a.n; ++r) {
    a.out[r] = a.stats ? lk::adv::apply_global(a.adv[r], a.stats[0], a.stats[1]) : a.adv[r];
  }
}

struct StatArgs {
  const float* values;  // [n, c_in]
  int64_t n, c_in, c_out;
  const float* where;  // [n, c_out] 0/1, or null
  const void* mask;    // [n, T]: row sums become column c_in
  int m_dtype;
  int64_t T, stride_m;
  const int64_t *perm, *offsets, *n_groups;
  int64_t group_size;
  float* stats;    // [n, c_out, 6]
  float* lengths;  // [n]
  int threads;
};

void group_stats(const StatArgs& a) {
  const int64_t c = a.c_out;
  for_each_group(a, [&](int64_t size, const std::vector<int64_t>& rows, std::vector<float>& x,
                        std::vector<float>& sel) {
    x.resize(size * c);
    sel.resize(size * c);
    for (int64_t i = 0; i < size; ++i) {
      const int64_t row = rows[i];
      for (int64_t j = 0; j < a.c_in; ++j) x[i * c + j] = a.values[row * a.c_in + j];
      if (a.mask) {
        const float len = row_sum_any(a.m_dtype, row_ptr(a.mask, a.m_dtype, row, a.stride_m), a.T);
        x[i * c + a.c_in] = len;
        a.lengths[row] = len;
      }
      for (int64_t j = 0; j < c; ++j) sel[i * c + j] = a.where ? a.where[row * c + j] : 1.0f;
    }
    for (int64_t j = 0; j < c; ++j) {
      float k = 0.0f, total = 0.0f, lo = kInf, hi = -kInf;
      bool has_nan = false;
      for (int64_t i = 0; i < size; ++i) {
        if (sel[i * c + j] == 0.0f) continue;
        const float v = x[i * c + j];
        k += 1.0f;
        total += v;
        lo = std::min(lo, v);
        hi = std::max(hi, v);
        has_nan |= v != v;
      }
      // sums and squares of x * 2^-e (advantages.h), e from the largest |x| selected
      const int e = lk::adv::scale_exponent(lk::adv::abs_max(lk::adv::abs_max(0.0f, lo), hi));
      const float down = lk::adv::pow2f(-e);
      const float shift = k > 0.0f ? hi * down : 0.0f;  // exact mean when the selected are all equal
      float sum_d = 0.0f;
      for (int64_t i = 0; i < size; ++i) {
        if (sel[i * c + j] != 0.0f) sum_d += x[i * c + j] * down - shift;
      }
      const float mean_s = k > 0.0f ? shift + sum_d / k : 0.0f;
      float m2 = 0.0f;
      for (int64_t i = 0; i < size; ++i) {
        if (sel[i * c + j] == 0.0f) continue;
        const float d = x[i * c + j] * down - mean_s;
        m2 += d * d;
      }
      const float mean = mean_s * lk::adv::pow2f(e);
      float std = lk::adv::selected_std(m2, k, e);
      if (has_nan) lo = hi = std = lk::adv::quiet_nan();
      for (int64_t i = 0; i < size; ++i) {
        float* o = a.stats + (rows[i] * c + j) * 6;
        o[0] = k;
        o[1] = total;
        o[2] = mean;
        o[3] = std;
        o[4] = lo;
        o[5] = hi;
      }
    }
  });
}

// The codes are checked before any work (lenkernels/advantages_args.h): a throw inside the kernels'
// OpenMP regions would abort the process.
void define(py::module_& m) {
  using namespace lk::adv;
  m.def("group_advantages", [](Addr rewards, int r_dtype, int64_t n, int64_t T, int64_t stride_r, Addr mask,
                               int m_dtype, int64_t Tm, int64_t stride_m, Addr lengths, int l_dtype, Addr perm,
                               Addr offsets, Addr n_groups, int64_t group_size, int method, float eps, bool norm,
                               float ddof, Addr adv, Addr raw, Addr w_out, int threads) {
    check_dtype(r_dtype, "rewards");
    check_weight(mask, m_dtype, "mask");
    check_weight(lengths, l_dtype, "lengths");
    check_method(method);
    group_advantages(GroupArgs{rewards, r_dtype, n, T, stride_r, mask, m_dtype, Tm, stride_m, lengths, l_dtype, perm,
                               offsets, n_groups, group_size, method, eps, norm, ddof, adv, raw, w_out,
                               threads_for(threads)});
  }, LK_NOGIL);
  m.def("gaussian_rank", [](Addr keys, int64_t n, Addr perm, Addr group_of, Addr group_offsets, Addr run_offsets,
                            Addr n_runs, Addr adv, int threads) {
    gaussian_rank(RunArgs{keys, n, perm, group_of, group_offsets, run_offsets, n_runs, adv, threads_for(threads)});
  }, LK_NOGIL);
  m.def("batch_shift_scale", [](Addr x, int64_t n, Addr w, int w_dtype, int method, float eps, Addr stats,
                                int threads) {
    check_weight(w, w_dtype, "weights");
    check_batch_method(method);
    batch_shift_scale(MomentArgs{x, n, w, w_dtype, method, eps, stats, threads_for(threads)});
  }, LK_NOGIL);
  m.def("broadcast", [](Addr adv, int64_t n, Addr stats, Addr mask, int m_dtype, int64_t T, int64_t stride_m,
                        Addr out, int64_t stride_o, int threads) {
    check_weight(mask, m_dtype, "mask");
    broadcast(BroadcastArgs{adv, n, stats, mask, m_dtype, T, stride_m, out, stride_o, threads_for(threads)});
  }, LK_NOGIL);
  m.def("group_stats", [](Addr values, int64_t n, int64_t c_in, int64_t c_out, Addr where, Addr mask, int m_dtype,
                          int64_t T, int64_t stride_m, Addr perm, Addr offsets, Addr n_groups, int64_t group_size,
                          Addr stats, Addr lengths, int threads) {
    check_weight(mask, m_dtype, "mask");
    group_stats(StatArgs{values, n, c_in, c_out, where, mask, m_dtype, T, stride_m, perm, offsets, n_groups,
                         group_size, stats, lengths, threads_for(threads)});
  }, LK_NOGIL);
}

}  // namespace
}  // namespace cpu
}  // namespace lk

LK_MODULE(_cpu_advantages, "lenkernels CPU kernels: group advantages and per-group statistics (raw pointers)",
          lk::cpu::define)
