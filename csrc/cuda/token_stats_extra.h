// The extra vocabulary statistics on the GPU (SPEC 7: sum_p2 / log_sum_p2, argmax / max_logprob,
// mean_logit, beside logprob, entropy, lse and mean_z): what each thread of the token_stats_extra
// kernels in token_stats.cu computes. LK_HOST_DEVICE throughout, so the host replays the kernels
// thread by thread (tests/cuda_host_replay_extra.cu).
//
// The plan, chunks, thread ownership, tile order and loads are token_stats.h's (so are its batch
// invariance argument and the two-block-count plan: 1 block a row, or one a chunk and a finalize
// kernel). Each thread carries, beside (m, S, U):
//   S2 = sum exp(2 (z - m)) against the same running max (rescaled by c^2 when the max moves), so
//        log_sum_p2 = log S2 - 2 log S has no cancellation;
//   the sum of the finite raw logits (times 1 / (T V) at the end);
//   the largest raw logit and the tile it came from (a tile's max that is strictly larger replaces
//   it: a thread's tiles come in index order), carried across the block's chunks; at the end each
//   thread loads that one tile again and finds the first element equal to it (the loop pays one
//   compare a tile instead of a search a logit; the re-read adds 1/(4 x chunks of the block) to its
//   bytes: 1/20 of a 151 936-bf16 row with one block a row, 1/4 of a chunk, read a few tiles before
//   and so from L2, with one block a chunk), and the block reduces (logit, id) pairs, larger logit
//   then lower id (a total order: any tree gives the same pair). A NaN max beats nothing: the argmax
//   of a row holding NaN (all of whose float statistics are NaN) is that of its other entries.
// The block reduction of the sums is chunk_reduce's (max, rebase, lane butterflies, warps in index
// order); the chunk states are merged left to right.
// Backward: one read + one write per logit, 1 exponential: q = softmax(2z)_j = p_j^2 / sum_p2, so
// every term is a polynomial in p_j (Triton's extra_grad_tile, same definition).
#pragma once

#include <climits>

#include "token_stats.h"

namespace lk {
namespace cuda {
namespace token_stats {

constexpr int kExtraState = 7;  // m, S, U, S2, best, sum_x, best id (int32 bits) per (row, chunk)
constexpr int32_t kNoId = INT32_MAX;

struct ExtraState {
  SoftmaxState sm;
  float s2, best, sum_x;
  int32_t best_id;  // kNoId: nothing seen but -inf (or NaN)
};

LK_HOST_DEVICE ExtraState empty_extra() { return ExtraState{empty_state(), 0.0f, kNegInf, 0.0f, kNoId}; }

struct ExtraFwdParams : RowParams {
  // [n_rows] each, fp32 (argmax int64)
  float *logprobs, *entropy, *lse, *mean_z, *sum_p2, *log_sum_p2;
  int64_t* argmax;
  float *max_logprob, *mean_logit;
  float* partial;  // [n_rows, n_splits, kExtraState] when n_splits > 1
  int n_splits;
};

struct ExtraBwdParams : RowParams {
  const float *lse, *mean_z, *log_sum_p2;  // [n_rows] from the forward
  const int64_t* argmax;                   // [n_rows]
  // [6, n_rows] contiguous: g_logprobs, g_entropy, g_sum_p2, g_log_sum_p2, g_max_logprob, g_mean_logit
  const float* grads;
  void* dlogits;  // [n_rows, vocab] in the logits dtype; may be logits itself
  int64_t dlogits_row_stride;
  int n_splits;
};

// c^2 S2 of a state rescaled to max m (0 for a state that saw only -inf, as rescale()).
LK_HOST_DEVICE float rescale_s2(const ExtraState& a, float m) {
  if (a.sm.s == 0.0f) return 0.0f;
  const float c = expf(a.sm.m - m);
  return c * c * a.s2;
}

// (best, id) of two disjoint ranges: the larger logit, the lower id on a tie (in any order).
LK_HOST_DEVICE void take_best(float* best, int32_t* id, float b_best, int32_t b_id) {
  if (b_best > *best || (b_best == *best && b_id < *id)) {
    *best = b_best;
    *id = b_id;
  }
}

// a then b (b covers higher indices).
LK_HOST_DEVICE ExtraState merge_extra(const ExtraState& a, const ExtraState& b) {
  ExtraState out;
  out.sm = merge(a.sm, b.sm);
  out.s2 = rescale_s2(a, out.sm.m) + rescale_s2(b, out.sm.m);
  out.best = a.best;
  out.best_id = a.best_id;
  take_best(&out.best, &out.best_id, b.best, b.best_id);
  out.sum_x = a.sum_x + b.sum_x;
  return out;
}

LK_HOST_DEVICE ExtraState chain_extra(const ExtraState& total, const ExtraState& chunk, bool first) {
  return first ? chunk : merge_extra(total, chunk);
}

// Folds a tile of K raw logits (get(k): logit k) into st; raw_max is their NaN-propagating max.
// fold_tile's arithmetic for (m, S, U), plus S2 and the sum. The argmax only notes the tile (`tag`,
// the vector its thread's tile starts at) when its max beats the thread's best (a tie keeps the
// earlier tile, a NaN max beats nothing); resolve_argmax() finds the element once, at the end.
template <int K, typename Get>
LK_HOST_DEVICE ExtraState fold_tile_extra(const ExtraState& st, float raw_max, float inv_t, const Get& get,
                                          int32_t tag) {
  ExtraState out = st;
  if (raw_max > st.best) {
    out.best = raw_max;
    out.best_id = tag;
  }
  float sum_x = 0.0f;
  LK_UNROLL
  for (int k = 0; k < K; ++k) {
    const float x = get(k);
    if (fabsf(x) < -kNegInf) sum_x += x;
  }
  out.sum_x = st.sum_x + sum_x;
  const float m_tile = raw_max * inv_t;
  if (m_tile == kNegInf) return out;  // a fully masked (or padding) tile adds no mass
  const float m = max_nan(st.sm.m, m_tile);
  float s, u;
  rescale(st.sm, m, &s, &u);
  const float s2 = rescale_s2(st, m);
  float s_tile = 0.0f, u_tile = 0.0f, s2_tile = 0.0f;
  LK_UNROLL
  for (int k = 0; k < K; ++k) {
    const float w = fmaf(get(k), inv_t, -m) * kLog2e;
    const float e = exp2_approx(w);
    s_tile += e;
    u_tile = fmaf(e, fmaxf(w, -3.40282347e38f), u_tile);
    s2_tile = fmaf(e, e, s2_tile);
  }
  out.sm = SoftmaxState{m, s + s_tile, u + u_tile * kLn2};
  out.s2 = s2 + s2_tile;
  return out;
}

// fold_chunk with the extra state: the elements of chunk `ch` thread `tid` owns, in index order,
// from the empty state but for the thread's argmax, carried in from its earlier chunks (`best`,
// `tag`; the argmax of a range does not depend on how it is cut). The tail scalar adds to the sums
// here and to the argmax in resolve_argmax().
template <typename T, bool kAligned>
LK_HOST_DEVICE ExtraState fold_chunk_extra(const T* row, const Chunk& ch, float tail, int64_t end, int tid,
                                           float inv_t, Vec16 (&cur)[kUnroll], float best, int32_t tag) {
  static_assert(kChunkVecs % kTileVecs == 0, "whole tiles per chunk");
  using E = Elem<T>;
  constexpr int kVec = E::kPerVec;
  ExtraState st = empty_extra();
  st.best = best;
  st.best_id = tag;
  for (int64_t i = ch.begin + tid; i < ch.end; i += kTileVecs) {
    Vec16 ahead[kUnroll];
    load_tile<T, kAligned>(ahead, row, i + kTileVecs, end);  // in flight while `cur` is folded
    st = fold_tile_extra<kUnroll * kVec>(
        st, E::raw_max(cur), inv_t, [&](int k) { return E::get(cur[k / kVec], k % kVec); }, int32_t(i));
    LK_UNROLL
    for (int k = 0; k < kUnroll; ++k) cur[k] = ahead[k];
  }
  if (ch.last) {
    const ExtraState folded = fold_tile_extra<1>(st, tail, inv_t, [&](int) { return tail; }, kNoId);
    st = ExtraState{folded.sm, folded.s2, st.best, folded.sum_x, st.best_id};
  }
  return st;
}

// The argmax of the elements thread `tid` folded: the tile noted (`tag`, the vector it starts at)
// loaded again (the same vectors, masked by the same `end`; read once a block) and searched for the
// first element equal to `best`, then the tail scalar (a higher index: only a larger value wins).
template <typename T, bool kAligned>
LK_HOST_DEVICE void resolve_argmax(const T* row, int64_t vocab, int64_t end, int tid, float tail, float* best,
                                   int32_t* id) {
  using E = Elem<T>;
  constexpr int kVec = E::kPerVec;
  const int32_t tag = *id;
  if (tag != kNoId) {
    Vec16 v[kUnroll];
    load_tile<T, kAligned>(v, row, tag, end);
    int k_best = 0;
    LK_UNROLL
    for (int k = kUnroll * kVec - 1; k >= 0; --k) k_best = E::get(v[k / kVec], k % kVec) == *best ? k : k_best;
    *id = int32_t((int64_t(tag) + int64_t(k_best / kVec) * kThreads) * kVec + k_best % kVec);
  }
  if (tail > *best) {
    *best = tail;
    *id = int32_t(vocab / kVec * kVec + tid);
  }
}

// A thread's state against the chunk's max m (chunk_reduce's rebase, with S2).
LK_HOST_DEVICE ExtraState rebase_extra(const ExtraState& st, float m) {
  ExtraState out = st;
  out.sm = rebase(st.sm, m);
  out.s2 = rescale_s2(st, m);
  return out;
}

// The sums a block adds up after the rebase: S, U, S2, sum_x.
struct ExtraSums {
  float s, u, s2, x;
};

LK_HOST_DEVICE ExtraSums add_sums(const ExtraSums& a, const ExtraSums& b) {
  return ExtraSums{a.s + b.s, a.u + b.u, a.s2 + b.s2, a.x + b.x};
}

LK_HOST_DEVICE ExtraSums sums_of(const ExtraState& r) { return ExtraSums{r.sm.s, r.sm.u, r.s2, r.sum_x}; }

LK_HOST_DEVICE ExtraState with_sums(float m, const ExtraSums& s, float best, int32_t id) {
  return ExtraState{SoftmaxState{m, s.s, s.u}, s.s2, best, s.x, id};
}

// The row's outputs from its state.
template <class P>
LK_HOST_DEVICE void write_row_extra(const P& p, int64_t row, int64_t id, const ExtraState& st, float z_target,
                                    float inv_t) {
  const RowStats rs = finalize(st.sm);
  p.logprobs[row] = token_logprob(z_target, rs, id, p.ignore_index, p.vocab);
  p.entropy[row] = rs.entropy;
  p.lse[row] = rs.lse;
  p.mean_z[row] = rs.mean_z;
  const float log_sum_p2 = logf(st.s2) - 2.0f * rs.log_s;  // all -inf row: -inf - -inf = NaN
  p.sum_p2[row] = expf(log_sum_p2);
  p.log_sum_p2[row] = log_sum_p2;
  p.argmax[row] = st.best_id == kNoId ? 0 : int64_t(st.best_id);
  const bool has_mass = st.sm.s > 0.0f;  // false for an all -inf row and for NaN
  p.max_logprob[row] = has_mass ? -rs.log_s : __builtin_nanf("");  // m is the exact max: 0 - log S
  p.mean_logit[row] = has_mass ? st.sum_x * inv_t / float(p.vocab) : __builtin_nanf("");
}

LK_HOST_DEVICE void store_extra_state(float* out, const ExtraState& st) {
  out[0] = st.sm.m;
  out[1] = st.sm.s;
  out[2] = st.sm.u;
  out[3] = st.s2;
  out[4] = st.best;
  out[5] = st.sum_x;
  out[6] = bit_cast<float>(st.best_id);
}

LK_HOST_DEVICE ExtraState load_extra_state(const float* in) {
  return ExtraState{SoftmaxState{in[0], in[1], in[2]}, in[3], in[4], in[5], bit_cast<int32_t>(in[6])};
}

// What thread 0 of block (row, split) does with its state (write_block_result's extra twin).
LK_HOST_DEVICE void write_block_result_extra(const ExtraFwdParams& p, int64_t row, int split, const ExtraState& st,
                                             int64_t id, float z_target, float inv_t) {
  if (p.n_splits == 1) {
    write_row_extra(p, row, id, st, z_target, inv_t);
  } else {
    store_extra_state(p.partial + (row * p.n_splits + split) * kExtraState, st);
  }
}

// n_splits == n_chunks: a row's chunk states merged left to right, then its outputs.
template <typename T>
LK_HOST_DEVICE void finalize_row_extra(const ExtraFwdParams& p, int64_t row) {
  const float* part = p.partial + row * p.n_splits * kExtraState;
  ExtraState st = empty_extra();
  for (int c = 0; c < p.n_splits; ++c) st = chain_extra(st, load_extra_state(part + kExtraState * c), c == 0);
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const float inv_t = inverse_temperature(p.temperature[row * p.temp_stride]);
  const int64_t id = load_id(p.ids, p.id_bytes, row);
  const float z_target = (id >= 0 && id < p.vocab) ? Elem<T>::to_float(x[id]) * inv_t : 0.0f;
  write_row_extra(p, row, id, st, z_target, inv_t);
}

#if defined(__CUDACC__)
// chunk_reduce with the extra state, valid in thread 0: the chunk max, each thread's state rebased
// onto it, (S, U, S2, sum_x) summed by lane butterflies and then warp by warp in index order. Two
// __syncthreads; reusable as chunk_reduce. (The argmax is reduced once a block: block_argmax.)
template <int kBlock>
__device__ __forceinline__ ExtraState chunk_reduce_extra(const ExtraState& st) {
  constexpr int kWarps = kBlock / 32;
  __shared__ ExtraSums warp_sums[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float m = block_max<kBlock>(st.sm.m);
  ExtraSums s = sums_of(rebase_extra(st, m));
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    s.s += __shfl_xor_sync(0xffffffffu, s.s, mask);
    s.u += __shfl_xor_sync(0xffffffffu, s.u, mask);
    s.s2 += __shfl_xor_sync(0xffffffffu, s.s2, mask);
    s.x += __shfl_xor_sync(0xffffffffu, s.x, mask);
  }
  if (lane == 0) warp_sums[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    s = warp_sums[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s = add_sums(s, warp_sums[w]);
  }
  return with_sums(m, s, kNegInf, kNoId);
}

// The block's argmax, valid in thread 0: take_best is a total order (larger logit, then lower id),
// so any tree gives the same pair. Two __syncthreads.
template <int kBlock>
__device__ __forceinline__ void block_argmax(float* best, int32_t* id) {
  constexpr int kWarps = kBlock / 32;
  __shared__ float warp_best[kWarps];
  __shared__ int32_t warp_id[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    take_best(best, id, __shfl_xor_sync(0xffffffffu, *best, mask), __shfl_xor_sync(0xffffffffu, *id, mask));
  }
  if (lane == 0) {
    warp_best[warp] = *best;
    warp_id[warp] = *id;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 1; w < kWarps; ++w) take_best(best, id, warp_best[w], warp_id[w]);
  }
  __syncthreads();
}

// The state of chunks [first, last) of a row, valid in thread 0 (fold_chunks' extra twin): each
// chunk folded and reduced and the chunk states chained in index order; the threads' argmaxes
// carried across the chunks, resolved and reduced once.
template <typename T, bool kAligned>
__device__ __forceinline__ ExtraState fold_chunks_extra(const T* x, int64_t vocab, int64_t first, int64_t last,
                                                        float tail, float inv_t) {
  const int64_t end = chunk_at<T>(vocab, last - 1).end;
  Vec16 cur[kUnroll];
  load_tile<T, kAligned>(cur, x, chunk_at<T>(vocab, first).begin + threadIdx.x, end);
  ExtraState total = empty_extra();
  float best = kNegInf;
  int32_t id = kNoId;
  for (int64_t c = first; c < last; ++c) {
    const ExtraState st = fold_chunk_extra<T, kAligned>(x, chunk_at<T>(vocab, c), tail, end, threadIdx.x, inv_t,
                                                        cur, best, id);
    best = st.best;
    id = st.best_id;
    const ExtraState chunk = chunk_reduce_extra<kThreads>(st);
    if (threadIdx.x == 0) total = chain_extra(total, chunk, c == first);
  }
  resolve_argmax<T, kAligned>(x, vocab, end, threadIdx.x, tail, &best, &id);
  block_argmax<kThreads>(&best, &id);
  total.best = best;
  total.best_id = id;
  return total;
}
#endif

// --- backward --------------------------------------------------------------------------------------

// Per-row constants, the cotangents times 1 / T:
//   grad_j = [j=y] g_lp + [j=top] g_mlp + p (a2 p - p_coef) - g_h p (z - mean_z) + [z finite] g_mean,
// p_coef = g_lp + g_mlp + 2 g_lsp2 + 2 g_sp2 sum_p2 (every -p_j term) and a2 = 2 g_sp2 + 2 g_lsp2 / sum_p2
// (2 g_lsp2 q_j = 2 g_lsp2 p_j^2 / sum_p2: one exponential a logit); g_mean is already / V.
struct ExtraGradRow {
  float inv_t, lse, mean_z, g_lp, g_h, g_mlp, g_mean, p_coef, a2;
};

LK_HOST_DEVICE ExtraGradRow load_extra_grad_row(const ExtraBwdParams& p, int64_t row, int64_t id) {
  const float* g = p.grads + row;
  const int64_t n = p.n_rows;
  const float g_lp = id == p.ignore_index ? 0.0f : g[0];
  const float g_h = g[n], g_sp2 = g[2 * n], g_lsp2 = g[3 * n], g_mlp = g[4 * n];
  const float g_mean = g[5 * n] / float(p.vocab);
  const float log_sum_p2 = p.log_sum_p2[row];
  const float sum_p2 = expf(log_sum_p2);
  const float p_coef = g_lp + g_mlp + 2.0f * g_lsp2 + 2.0f * g_sp2 * sum_p2;
  const float a2 = 2.0f * g_sp2 + 2.0f * g_lsp2 * expf(-log_sum_p2);
  const float inv_t = inverse_temperature(p.temperature[row * p.temp_stride]);
  // the cotangents carry the final 1 / T (one multiply a row instead of one a logit)
  return ExtraGradRow{inv_t,         p.lse[row],     p.mean_z[row], g_lp * inv_t, g_h * inv_t, g_mlp * inv_t,
                      g_mean * inv_t, p_coef * inv_t, a2 * inv_t};
}

// d logits of one element from its raw logit x, before conversion to the logits dtype (the row's
// constants already carry the 1 / T).
LK_HOST_DEVICE float extra_grad_raw(float x, bool is_target, bool is_top, const ExtraGradRow& r) {
  const float p = exp2_approx(fmaf(x, r.inv_t, -r.lse) * kLog2e);
  const float z = x * r.inv_t;
  const float ent = p * fmaxf(z - r.mean_z, -3.40282347e38f);  // a masked logit: 0 * -FLT_MAX = 0
  float g = p * fmaf(r.a2, p, -r.p_coef) - r.g_h * ent;
  if (fabsf(z) < -kNegInf) g += r.g_mean;
  if (is_target) g += r.g_lp;
  if (is_top) g += r.g_mlp;
  return g;
}

// TokenGrad with two marked ids (the row's token y and its argmax `top`).
struct ExtraTokenGrad {
  int64_t id, top;
  const ExtraGradRow& g;
  struct Marks {
    int target, top;  // their places in the vector (-1: not in it)
  };
  LK_HOST_DEVICE float operator()(float x, int64_t j) const { return extra_grad_raw(x, j == id, j == top, g); }
  LK_HOST_DEVICE ExtraTokenGrad from(int64_t head) const { return ExtraTokenGrad{id - head, top - head, g}; }
  template <int kVec>
  LK_HOST_DEVICE Marks marks(int64_t first) const {
    const int64_t rel = id - first, rel_top = top - first;
    return Marks{(rel >= 0 && rel < kVec) ? int(rel) : -1, (rel_top >= 0 && rel_top < kVec) ? int(rel_top) : -1};
  }
  LK_HOST_DEVICE float operator()(float x, int e, const Marks& m) const {
    return extra_grad_raw(x, e == m.target, e == m.top, g);
  }
};

// bwd_thread with the extra statistics' gradient: each element is read and then written by the same
// thread, so dlogits may alias the logits.
template <typename T>
LK_HOST_DEVICE void bwd_extra_thread(const T* x, T* out, int64_t vocab, int split, int n_splits, int tid, int64_t id,
                                     int64_t top, const ExtraGradRow& g) {
  bwd_elements(x, out, vocab, split, n_splits, tid, ExtraTokenGrad{id, top, g});
}

}  // namespace token_stats
}  // namespace cuda
}  // namespace lk
