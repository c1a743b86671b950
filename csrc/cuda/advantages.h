// Group advantages (SPEC 4) and per-group statistics on the GPU: what each block or warp of the
// kernels in advantages.cu computes. The maths is lenkernels/advantages.h, shared with the CPU
// backend; the bodies are templates over a Team (team.h), so the host emulation runs them as is.
//
// Segmented layout from lenkernels/_grouping.py (sorts and scans on the device): perm[B]
// (sorted position -> response), offsets[B + 1] (group starts) and the group count n_groups[1] in
// device memory; contiguous groups (an int group size) need neither perm nor offsets. Grids are
// sized on the host for the most groups B allows; warps past the device's count return: no host sync.
//   row sums     one block per response: sums of its [T] token rewards and of its mask row
//   groups       one warp per group: passes over the members (largest |s|, mean about the first
//                member, std, top-2), then one advantage per member, written in response order
//   gaussian     one warp per run of tied scores: the mean normal score of its ranks (fp64)
//   moments      one block: weighted (w, mean, m2) of fixed 4096-element chunks merged in order ->
//                (shift, scale) of batch / reinforce_pp_baseline
//   broadcast    one block per response: (adv - shift) * scale times its mask row
//   group stats  one warp per group: count/sum/mean/std/min/max of the selected members, per column
// Every sum runs in a fixed order (per-lane strides, then the team's fixed tree): no atomics,
// bitwise reproducible. Means and variances are of the values times 2^-e (2^e: the power of two of
// the largest |x|), multiplied back exactly: no overflow or underflow (advantages.h).
#pragma once

#include <cmath>

#include "lenkernels/advantages.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace advantages {

using namespace ::lk::adv;

constexpr int kThreads = 256;       // block kernels
constexpr int kWarpsPerBlock = 8;   // warp kernels: kThreads / 32 groups (runs) per block at a time
constexpr int kMomentChunk = 4096;  // as the CPU backend: chunking never depends on the GPU
constexpr int kBlocksPerSm = 16;    // cap of the grid-stride grids (row sums, broadcast)

// Blocks of a grid-stride launch over `bound` items, `per_block` at a time.
inline int64_t grid_for(int64_t bound, int64_t per_block, int64_t sm_count) {
  const int64_t need = div_up(bound > 0 ? bound : 1, per_block);
  const int64_t cap = (sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  return need < cap ? need : cap;
}

// --- row sums of [B, T] token rewards and masks -------------------------------------------------

struct RowSumArgs {
  int64_t n;
  const void* x;  // [n, T_x] (row stride stride_x) of weight code x_code, or null
  int x_code;
  int64_t T_x, stride_x;
  float* x_out;   // [n]
  const void* m;  // [n, T_m] mask, or null
  int m_code;
  int64_t T_m, stride_m;
  float* m_out;  // [n]
};

struct Pair {
  float a, b;
};

struct PairSum {
  LK_HOST_DEVICE Pair operator()(const Pair& x, const Pair& y) const { return Pair{x.a + y.a, x.b + y.b}; }
};

template <class Team>
LK_HOST_DEVICE void row_sums_block(const RowSumArgs& a, int64_t block, int64_t n_blocks, Team& team) {
  for (int64_t row = block; row < a.n; row += n_blocks) {
    Pair acc{0.0f, 0.0f};
    if (a.x) {
      for (int64_t t = team.rank(); t < a.T_x; t += Team::kSize) acc.a += load_weight(a.x, a.x_code, row * a.stride_x + t);
    }
    if (a.m) {
      for (int64_t t = team.rank(); t < a.T_m; t += Team::kSize) acc.b += load_weight(a.m, a.m_code, row * a.stride_m + t);
    }
    acc = team.all_reduce(acc, PairSum{}, Pair{0.0f, 0.0f});
    if (team.rank() == 0) {
      if (a.x) a.x_out[row] = acc.a;
      if (a.m) a.m_out[row] = acc.b;
    }
  }
}

// --- group advantages ----------------------------------------------------------------------------

struct Groups {
  const int64_t* perm;     // null: contiguous groups of group_size
  const int64_t* offsets;  // [B + 1]
  const int64_t* n_groups;  // [1], device memory
  int64_t group_size;

  LK_HOST_DEVICE void bounds(int64_t g, int64_t* gs, int64_t* ge) const {
    if (offsets) {
      *gs = offsets[g];
      *ge = offsets[g + 1];
    } else {
      *gs = g * group_size;
      *ge = *gs + group_size;
    }
  }
  LK_HOST_DEVICE int64_t row(int64_t pos) const { return perm ? perm[pos] : pos; }
};

struct GroupArgs {
  const void* rewards;  // [B] scores (T == 0) in dtype r_dtype; token rewards come through score_buf
  int r_dtype;
  int64_t T;
  const float* score_buf;  // [B] row sums of the token rewards (T > 0)
  const float* len_buf;    // [B] row sums of the mask, or null
  const void* lengths;     // [B] lengths, or null (then len_buf, then 1)
  int l_dtype;
  Groups groups;
  int method;
  float eps;
  bool norm;
  float ddof;
  float *adv, *raw, *w_out;  // [B] response order; raw, w_out may be null
};

LK_HOST_DEVICE float score_of(const GroupArgs& a, int64_t row) {
  return a.T > 0 ? a.score_buf[row] : load_float(a.rewards, a.r_dtype, row);
}

LK_HOST_DEVICE float weight_of(const GroupArgs& a, int64_t row) {
  if (a.lengths) return load_weight(a.lengths, a.l_dtype, row);
  return a.len_buf ? a.len_buf[row] : 1.0f;
}

struct FirstPass {
  float sum_d, wsum_d, wsum, r_max, n_nan;
};

struct FirstPassOp {
  LK_HOST_DEVICE FirstPass operator()(const FirstPass& x, const FirstPass& y) const {
    return FirstPass{x.sum_d + y.sum_d, x.wsum_d + y.wsum_d, x.wsum + y.wsum, MaxOp{}(x.r_max, y.r_max),
                     x.n_nan + y.n_nan};
  }
};

struct SecondPass {
  float m2, n_top, below;
  int64_t best;  // first sorted position holding the maximum
};

struct SecondPassOp {
  LK_HOST_DEVICE SecondPass operator()(const SecondPass& x, const SecondPass& y) const {
    return SecondPass{x.m2 + y.m2, x.n_top + y.n_top, MaxOp{}(x.below, y.below), MinOp{}(x.best, y.best)};
  }
};

// Group g (warps past the device's group count return at once).
template <class Team>
LK_HOST_DEVICE void group_warp(const GroupArgs& a, int64_t g, Team& team) {
  if (g >= *a.groups.n_groups) return;
  int64_t gs, ge;
  a.groups.bounds(g, &gs, &ge);
  if (ge <= gs) return;
  const float n = float(ge - gs);

  // pass 0: the largest |s|: the sums and squares below are of s * 2^-e (no overflow, advantages.h)
  float max_abs = 0.0f;
  for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) max_abs = abs_max(max_abs, score_of(a, a.groups.row(i)));
  const int e = scale_exponent(team.all_reduce(max_abs, MaxOp{}, 0.0f));
  const float down = pow2f(-e);
  const float shift = score_of(a, a.groups.row(gs)) * down;  // all-equal group: mean == shift exactly

  FirstPass p1{0.0f, 0.0f, 0.0f, kNegInf, 0.0f};
  for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) {
    const int64_t row = a.groups.row(i);
    const float s = score_of(a, row), w = weight_of(a, row);
    const float d = s * down - shift;
    p1.sum_d += d;
    p1.wsum_d += w * d;
    p1.wsum += w;
    p1.r_max = MaxOp{}(p1.r_max, s);
    p1.n_nan += s != s ? 1.0f : 0.0f;
  }
  p1 = team.all_reduce(p1, FirstPassOp{}, FirstPass{0.0f, 0.0f, 0.0f, kNegInf, 0.0f});
  const float mean_s = shifted_mean(shift, p1.sum_d, n);
  const float baseline =
      a.method == kOpo ? opo_baseline(shift, p1.wsum_d, p1.wsum, n, e) : group_baseline(mean_s * pow2f(e), n);

  float std = 1.0f, r_second = 0.0f;
  int64_t best = ge;
  if (a.method == kGrpo || a.method == kGrpoPassk) {  // the only methods that read the std / top-2
    SecondPass p2{0.0f, 0.0f, kNegInf, ge};
    for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) {
      const float s = score_of(a, a.groups.row(i));
      const float c = s * down - mean_s;
      p2.m2 += c * c;
      if (s == p1.r_max) {
        p2.best = MinOp{}(p2.best, i);
        p2.n_top += 1.0f;
      } else if (s < p1.r_max) {
        p2.below = MaxOp{}(p2.below, s);
      }
    }
    p2 = team.all_reduce(p2, SecondPassOp{}, SecondPass{0.0f, 0.0f, kNegInf, ge});
    std = group_std(p2.m2, n, a.ddof, e);
    r_second = passk_runner_up(n, int64_t(p2.n_top), p1.r_max, p2.below);
    best = p2.best;
  }

  for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) {
    const int64_t row = a.groups.row(i);
    const float s = score_of(a, row);
    float out;
    if (a.method == kGrpoPassk) {
      out = p1.n_nan > 0.0f ? quiet_nan() : passk_advantage(i == best, p1.r_max, r_second, std, a.eps, a.norm);
    } else {
      out = member_advantage(a.method, s, baseline, std, n, a.eps, a.norm);
    }
    a.adv[row] = out;
    if (a.raw) a.raw[row] = s;
    if (a.w_out) a.w_out[row] = weight_of(a, row);
  }
}

// --- gaussian rank map -----------------------------------------------------------------------------

struct RunArgs {
  const float* keys;  // [B] scores, response order
  const int64_t *perm, *group_of, *group_offsets, *run_offsets, *n_runs;
  float* adv;
};

// Run r of tied scores (warps past the device's run count return at once).
template <class Team>
LK_HOST_DEVICE void gaussian_warp(const RunArgs& a, int64_t r, Team& team) {
  if (r >= *a.n_runs) return;
  const int64_t rs = a.run_offsets[r], re = a.run_offsets[r + 1];
  const int64_t g = a.group_of[rs];
  const int64_t gs = a.group_offsets[g], ge = a.group_offsets[g + 1];
  const int64_t n = ge - gs, run_len = re - rs;
  const bool zero = gaussian_run_is_zero(run_len, n);
  double acc = 0.0;
  if (!zero) {
    for (int64_t p = rs + team.rank(); p < re; p += Team::kSize) acc += rank_normal_score(p - gs + 1, n);
  }
  acc = team.all_reduce(acc, SumOp{}, 0.0);
  float value = zero ? 0.0f : float(acc / double(run_len));
  const float last = a.keys[a.perm[ge - 1]];  // NaN sorts last: its group is NaN throughout
  if (last != last) value = quiet_nan();
  for (int64_t p = rs + team.rank(); p < re; p += Team::kSize) a.adv[a.perm[p]] = value;
}

// --- batch moments (batch, reinforce_pp_baseline) --------------------------------------------------

struct MomentArgs {
  const float* x;  // [n]
  int64_t n;
  const void* w;  // [n] weights, or null for 1 each
  int w_code;
  int method;
  float eps;
  float* stats;  // [2] out: shift, scale
};

struct SumMax {
  LK_HOST_DEVICE Pair operator()(const Pair& x, const Pair& y) const { return Pair{x.a + y.a, MaxOp{}(x.b, y.b)}; }
};

// One block over the whole vector, chunk after chunk: chunk moments as the CPU backend forms them
// (of x * 2^-e, e from the chunk's largest |x|; weighted mean first, then the weighted squares
// about it), merged left to right.
template <class Team>
LK_HOST_DEVICE void moments_block(const MomentArgs& a, Team& team) {
  const int64_t n_chunks = div_up(a.n, kMomentChunk);
  Moments total = empty_moments();
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t begin = c * kMomentChunk, end = begin + kMomentChunk < a.n ? begin + kMomentChunk : a.n;
    Pair acc{0.0f, 0.0f};  // (sum w, largest |x| of w != 0)
    for (int64_t i = begin + team.rank(); i < end; i += Team::kSize) {
      const float w = a.w ? load_weight(a.w, a.w_code, i) : 1.0f;
      acc.a += w;
      if (w != 0.0f) acc.b = abs_max(acc.b, a.x[i]);
    }
    acc = team.all_reduce(acc, SumMax{}, Pair{0.0f, 0.0f});
    const int e = scale_exponent(acc.b);
    const float down = pow2f(-e);
    float wx = 0.0f;
    for (int64_t i = begin + team.rank(); i < end; i += Team::kSize) {
      const float w = a.w ? load_weight(a.w, a.w_code, i) : 1.0f;
      if (w != 0.0f) wx += w * (a.x[i] * down);
    }
    wx = team.all_reduce(wx, SumOp{}, 0.0f);
    const float mean = acc.a > 0.0f ? wx / acc.a : 0.0f;
    float m2 = 0.0f;
    for (int64_t i = begin + team.rank(); i < end; i += Team::kSize) {
      const float w = a.w ? load_weight(a.w, a.w_code, i) : 1.0f;
      const float d = a.x[i] * down - mean;
      if (w != 0.0f) m2 += w * d * d;
    }
    m2 = team.all_reduce(m2, SumOp{}, 0.0f);
    const Moments part{acc.a, mean, m2, e};
    total = c == 0 ? part : merge(total, part);
  }
  if (team.rank() == 0) global_shift_scale(a.method, total, a.eps, &a.stats[0], &a.stats[1]);
}

// --- broadcast over the mask -----------------------------------------------------------------------

struct BroadcastArgs {
  const float* adv;  // [n]
  int64_t n;
  const float* stats;  // (shift, scale), or null
  const void* mask;    // [n, T] (row stride stride_m), or null: out is [n]
  int m_code;
  int64_t T, stride_m;
  float* out;
  int64_t stride_o;
};

template <class Team>
LK_HOST_DEVICE void broadcast_block(const BroadcastArgs& a, int64_t block, int64_t n_blocks, Team& team) {
  if (a.mask == nullptr) {
    for (int64_t i = block * Team::kSize + team.rank(); i < a.n; i += n_blocks * Team::kSize) {
      a.out[i] = a.stats ? apply_global(a.adv[i], a.stats[0], a.stats[1]) : a.adv[i];
    }
    return;
  }
  for (int64_t row = block; row < a.n; row += n_blocks) {
    const float v = a.stats ? apply_global(a.adv[row], a.stats[0], a.stats[1]) : a.adv[row];
    for (int64_t t = team.rank(); t < a.T; t += Team::kSize) {
      const float mt = load_weight(a.mask, a.m_code, row * a.stride_m + t);
      a.out[row * a.stride_o + t] = mt != 0.0f ? v * mt : 0.0f;  // masked tokens exactly 0, even for NaN
    }
  }
}

// --- per-group statistics (lenkernels.shaping) -----------------------------------------------------

struct StatArgs {
  const float* values;  // [n, c_in]
  int64_t n, c_in, c_out;
  const float* where;    // [n, c_out] 0/1, or null
  const float* lengths;  // [n] mask row sums: column c_in (when c_out > c_in)
  Groups groups;
  float* stats;  // [n, c_out, 6]: count, sum, mean, std, min, max
};

struct ColumnPass {
  float k, total, lo, hi, n_nan;
};

struct ColumnPassOp {
  LK_HOST_DEVICE ColumnPass operator()(const ColumnPass& x, const ColumnPass& y) const {
    return ColumnPass{x.k + y.k, x.total + y.total, MinOp{}(x.lo, y.lo), MaxOp{}(x.hi, y.hi), x.n_nan + y.n_nan};
  }
};

LK_HOST_DEVICE float stat_value(const StatArgs& a, int64_t row, int64_t j) {
  return j < a.c_in ? a.values[row * a.c_in + j] : a.lengths[row];
}

LK_HOST_DEVICE bool selected(const StatArgs& a, int64_t row, int64_t j) {
  return a.where == nullptr || a.where[row * a.c_out + j] != 0.0f;
}

// Group g, every column (warps past the device's group count return at once).
template <class Team>
LK_HOST_DEVICE void group_stats_warp(const StatArgs& a, int64_t g, Team& team) {
  if (g >= *a.groups.n_groups) return;
  int64_t gs, ge;
  a.groups.bounds(g, &gs, &ge);
  for (int64_t j = 0; j < a.c_out; ++j) {
    const ColumnPass empty{0.0f, 0.0f, -kNegInf, kNegInf, 0.0f};
    ColumnPass p = empty;
    for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) {
      const int64_t row = a.groups.row(i);
      if (!selected(a, row, j)) continue;
      const float v = stat_value(a, row, j);
      p.k += 1.0f;
      p.total += v;
      p.lo = MinOp{}(p.lo, v);
      p.hi = MaxOp{}(p.hi, v);
      p.n_nan += v != v ? 1.0f : 0.0f;
    }
    p = team.all_reduce(p, ColumnPassOp{}, empty);
    if (p.n_nan > 0.0f) p.lo = p.hi = quiet_nan();  // a NaN among the selected: min, max, mean, std NaN
    // sums and squares of x * 2^-e, e from the largest selected |x| (no overflow, advantages.h)
    const int e = scale_exponent(abs_max(abs_max(0.0f, p.lo), p.hi));
    const float down = pow2f(-e);
    const float shift = p.k > 0.0f ? p.hi * down : 0.0f;  // exact mean when the selected are all equal
    float sum_d = 0.0f;
    for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) {
      const int64_t row = a.groups.row(i);
      if (selected(a, row, j)) sum_d += stat_value(a, row, j) * down - shift;
    }
    sum_d = team.all_reduce(sum_d, SumOp{}, 0.0f);
    const float mean_s = p.k > 0.0f ? shift + sum_d / p.k : 0.0f;
    float m2 = 0.0f;
    for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) {
      const int64_t row = a.groups.row(i);
      if (!selected(a, row, j)) continue;
      const float d = stat_value(a, row, j) * down - mean_s;
      m2 += d * d;
    }
    m2 = team.all_reduce(m2, SumOp{}, 0.0f);
    const float mean = mean_s * pow2f(e);
    // (the NaN test before the division keeps fewer values live across its slow path: no spill)
    const float std = p.hi != p.hi ? p.hi : selected_std(m2, p.k, e), lo = p.lo, hi = p.hi;
    for (int64_t i = gs + team.rank(); i < ge; i += Team::kSize) {
      float* o = a.stats + (a.groups.row(i) * a.c_out + j) * 6;
      o[0] = p.k;
      o[1] = p.total;
      o[2] = mean;
      o[3] = std;
      o[4] = lo;
      o[5] = hi;
    }
  }
}

}  // namespace advantages
}  // namespace cuda
}  // namespace lk
