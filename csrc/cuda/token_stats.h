// Token log-probabilities and entropy on the GPU (SPEC 1): what each thread of the kernels in
// token_stats.cu computes. LK_HOST_DEVICE throughout, so the host can replay the kernels thread by
// thread (tests/test_cuda_compile.py).
//
// Forward, grid (N * n_splits) of kThreads: block (row, split) streams its share of the row once
// with 16-byte loads (the next tile's loads in flight while the current tile is folded), each thread
// folds its tiles into an online-softmax state (m, S, U), and the block merges the states
// (warp shuffles, then one warp over the warps' states). n_splits == 1: thread 0 writes logprob,
// entropy, lse and mean_z. n_splits > 1 (rows too few to fill the GPU): each block writes its
// partial state and a second kernel merges a row's states left to right and writes the outputs.
// Backward, same grid: one read and one write of each logit (dlogits may alias logits).
#pragma once

#include "cuda_utils.h"
#include "lenkernels/token_stats.h"

namespace lk {
namespace cuda {
namespace token_stats {

constexpr int kThreads = 256;       // per block, forward and backward
constexpr int kMinBlocksPerSm = 4;  // launch bounds: at most 64 registers per thread
constexpr int kUnroll = 4;          // 16-byte loads per thread per tile
constexpr int kFinalizeThreads = 128;

struct FwdParams {
  const void* logits;  // [n_rows, vocab], row_stride elements apart, unit stride along vocab
  int64_t n_rows, vocab, row_stride;
  const void* ids;  // [n_rows] int32 (id_bytes 4) or int64 (id_bytes 8)
  int id_bytes;
  const float* temperature;  // [n_rows] (temp_stride 1) or [1] (temp_stride 0)
  int64_t temp_stride, ignore_index;
  float *logprobs, *entropy, *lse, *mean_z;  // [n_rows] each; entropy may be null
  float *max_z, *log_s;                      // null, or [n_rows] each: the row's state (m, log S)
  float* partial;                            // [n_rows, n_splits, 3] (m, S, U) when n_splits > 1
  int n_splits;
};

struct BwdParams {
  const void* logits;
  int64_t n_rows, vocab, row_stride;
  const void* ids;
  int id_bytes;
  const float* temperature;
  int64_t temp_stride, ignore_index;
  const float *lse, *mean_z;            // [n_rows] from the forward
  const float *g_logprobs, *g_entropy;  // [n_rows] with any stride (0 = broadcast); null = zero
  int64_t g_logprobs_stride, g_entropy_stride;
  void* dlogits;  // [n_rows, vocab] in the logits dtype; may be logits itself
  int64_t dlogits_row_stride;
  int n_splits;
};

// Blocks per row: 1 when rows alone give several waves of blocks; otherwise the vocabulary is split
// so the grid fills the GPU, each split keeping at least one full tile per thread. A function of
// (N, V, dtype, SM count) only, so results never depend on anything else.
inline int split_count(int64_t n_rows, int64_t vocab, int64_t elem_bytes, int64_t sm_count) {
  const int64_t target = 4 * sm_count * kMinBlocksPerSm;
  if (n_rows <= 0 || n_rows >= target) return 1;
  const int64_t n_vec = vocab * elem_bytes / 16;
  const int64_t most = n_vec / (int64_t(kThreads) * kUnroll);
  const int64_t want = ceil_div(target, n_rows);
  const int64_t splits = want < most ? want : most;
  return splits > 1 ? int(splits) : 1;
}

LK_HOST_DEVICE int64_t load_id(const void* ids, int id_bytes, int64_t row) {
  return id_bytes == 4 ? int64_t(static_cast<const int32_t*>(ids)[row]) : static_cast<const int64_t*>(ids)[row];
}

// --- forward ---------------------------------------------------------------------------------------

// Vectors i, i + kThreads, ..., i + (kUnroll - 1) * kThreads of a row; -inf past `end`.
template <typename T>
LK_HOST_DEVICE void load_tile(Vec16 (&tile)[kUnroll], const Vec16* vec, int64_t i, int64_t end) {
  LK_UNROLL
  for (int k = 0; k < kUnroll; ++k) {
    const int64_t idx = i + int64_t(k) * kThreads;
    tile[k] = idx < end ? load_ro(vec + idx) : neg_inf_vec<T>();
  }
}

// The online-softmax state of the elements thread `tid` of block (row, split) owns.
template <typename T>
LK_HOST_DEVICE SoftmaxState fwd_thread_state(const T* row, int64_t vocab, int split, int n_splits, int tid,
                                             float inv_t) {
  using E = Elem<T>;
  constexpr int kVec = E::kPerVec;
  const RowSpan span = row_span(row, vocab);
  const Range range = split_range(span.n_vec, split, n_splits, kThreads);
  // the unaligned edges: loaded first, folded last, so their latency hides behind the main loop
  float edge[2] = {kNegInf, kNegInf};
  if (split == 0 && tid < span.head) edge[0] = load_early(row + tid);
  if (split == n_splits - 1 && tid < span.tail) edge[1] = load_early(row + span.head + span.n_vec * kVec + tid);

  const Vec16* vec = reinterpret_cast<const Vec16*>(row + span.head);
  SoftmaxState st = empty_state();
  int64_t i = range.begin + tid;
  Vec16 cur[kUnroll];
  load_tile<T>(cur, vec, i, range.end);
  while (i < range.end) {
    const int64_t next = i + int64_t(kUnroll) * kThreads;
    Vec16 ahead[kUnroll];
    load_tile<T>(ahead, vec, next, range.end);  // in flight while `cur` is folded
    st = fold_tile<kUnroll * kVec>(st, E::raw_max(cur), inv_t,
                                   [&](int k) { return E::get(cur[k / kVec], k % kVec); });
    LK_UNROLL
    for (int k = 0; k < kUnroll; ++k) cur[k] = ahead[k];
    i = next;
  }
  return fold_tile<2>(st, nan_max(edge[0], edge[1]), inv_t, [&](int k) { return edge[k]; });
}

LK_HOST_DEVICE void write_row(const FwdParams& p, int64_t row, int64_t id, const SoftmaxState& st, float z_target) {
  const RowStats rs = finalize(st);
  p.logprobs[row] = token_logprob(z_target, rs, id, p.ignore_index, p.vocab);
  if (p.entropy) p.entropy[row] = rs.entropy;
  p.lse[row] = rs.lse;
  p.mean_z[row] = rs.mean_z;
  if (p.max_z) p.max_z[row] = rs.m;
  if (p.log_s) p.log_s[row] = rs.log_s;
}

// What thread 0 of block (row, split) does with the block's merged state: the row's outputs, or its
// partial state for token_stats_finalize_kernel.
LK_HOST_DEVICE void write_block_result(const FwdParams& p, int64_t row, int split, const SoftmaxState& st, int64_t id,
                                       float z_target) {
  if (p.n_splits == 1) {
    write_row(p, row, id, st, z_target);
  } else {
    float* out = p.partial + (row * p.n_splits + split) * 3;
    out[0] = st.m;
    out[1] = st.s;
    out[2] = st.u;
  }
}

// n_splits > 1: merges a row's partial states left to right and writes its outputs.
template <typename T>
LK_HOST_DEVICE void finalize_row(const FwdParams& p, int64_t row) {
  const float* part = p.partial + row * p.n_splits * 3;
  SoftmaxState st{part[0], part[1], part[2]};
  for (int s = 1; s < p.n_splits; ++s) st = merge(st, SoftmaxState{part[3 * s], part[3 * s + 1], part[3 * s + 2]});
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const float inv_t = inverse_temperature(p.temperature[row * p.temp_stride]);
  const int64_t id = load_id(p.ids, p.id_bytes, row);
  const float z_target = (id >= 0 && id < p.vocab) ? Elem<T>::to_float(x[id]) * inv_t : 0.0f;
  write_row(p, row, id, st, z_target);
}

// --- backward --------------------------------------------------------------------------------------

LK_HOST_DEVICE GradRow load_grad_row(const BwdParams& p, int64_t row, int64_t id) {
  const float g_lp = p.g_logprobs ? p.g_logprobs[row * p.g_logprobs_stride] : 0.0f;
  const float g_h = p.g_entropy ? p.g_entropy[row * p.g_entropy_stride] : 0.0f;
  return grad_row(inverse_temperature(p.temperature[row * p.temp_stride]), p.lse[row], p.mean_z[row], g_lp, g_h,
                  id, p.ignore_index);
}

// dlogits of the elements thread `tid` of block (row, split) owns: each element is read and then
// written by the same thread, so dlogits may alias the logits.
template <typename T>
LK_HOST_DEVICE void bwd_thread(const T* x, T* out, int64_t vocab, int split, int n_splits, int tid, int64_t id,
                               const GradRow& g) {
  using E = Elem<T>;
  constexpr int kVec = E::kPerVec;
  const RowSpan span = row_span(x, vocab);
  if (span.head != row_span(out, vocab).head) {
    // input and output rows sit differently against 16-byte boundaries: scalar accesses
    const Range range = split_range(vocab, split, n_splits, kThreads);
    for (int64_t j = range.begin + tid; j < range.end; j += kThreads) {
      out[j] = E::from_float(token_stats_grad_raw(E::to_float(x[j]), j == id, g));
    }
    return;
  }
  if (split == 0 && tid < span.head) {
    const int64_t j = tid;
    out[j] = E::from_float(token_stats_grad_raw(E::to_float(x[j]), j == id, g));
  }
  if (split == n_splits - 1 && tid < span.tail) {
    const int64_t j = span.head + span.n_vec * kVec + tid;
    out[j] = E::from_float(token_stats_grad_raw(E::to_float(x[j]), j == id, g));
  }
  const Vec16* vx = reinterpret_cast<const Vec16*>(x + span.head);
  Vec16* vo = reinterpret_cast<Vec16*>(out + span.head);
  const int64_t id_rel = id - span.head;  // the target's index counted from the first vector
  const Range range = split_range(span.n_vec, split, n_splits, kThreads);
  for (int64_t i = range.begin + tid; i < range.end; i += int64_t(kUnroll) * kThreads) {
    Vec16 v[kUnroll];
    LK_UNROLL
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t idx = i + int64_t(k) * kThreads;
      if (idx < range.end) v[k] = load_stream(vx + idx);
    }
    LK_UNROLL
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t idx = i + int64_t(k) * kThreads;
      if (idx >= range.end) break;
      const int64_t rel = id_rel - idx * kVec;
      const int target = (rel >= 0 && rel < kVec) ? int(rel) : -1;
      Vec16 o;
      LK_UNROLL
      for (int e = 0; e < kVec; e += 2) {
        E::put(o, e, token_stats_grad_raw(E::get(v[k], e), e == target, g),
               token_stats_grad_raw(E::get(v[k], e + 1), e + 1 == target, g));
      }
      store_stream(vo + idx, o);
    }
  }
}

}  // namespace token_stats
}  // namespace cuda
}  // namespace lk
