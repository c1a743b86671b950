// Token log-probabilities and entropy on the GPU (SPEC 1): what each thread of the kernels in
// token_stats.cu computes. LK_HOST_DEVICE throughout, so the host can replay the kernels thread by
// thread (tests/test_cuda_compile.py).
//
// Forward, grid (N * n_splits) of kThreads. A row is cut into chunks of kChunkVecs 16-byte vectors,
// counted from the row's first element (vector k = elements [k * kPerVec, (k + 1) * kPerVec), the
// V % kPerVec elements past the last whole vector belong to the last chunk). Per chunk, each thread
// folds the vectors it owns (16-byte loads, the next tile's loads in flight while the current tile
// is folded) into an online-softmax state (m, S, U), and chunk_reduce() turns the block's states
// into the chunk's state. The row's state is the chunk states merged left to right.
// n_splits == 1: one block walks every chunk, thread 0 merges them and writes logprob, entropy, lse
// and mean_z. n_splits == n_chunks (rows too few to fill the GPU): block (row, c) writes chunk c's
// state and a second kernel merges a row's chunk states left to right and writes the outputs.
// Batch invariance (DESIGN.md): every reduction is a function of V and the dtype alone: which thread
// owns which element, the order each thread folds them in, the chunk reduction and the chunk merge
// order never depend on N, on the split, nor on the row's address (a row that does not start on a
// 16-byte boundary assembles the same vectors from 2- or 4-byte loads: slower, and only met when
// V * element size is not a multiple of 16 or the logits are an offset view), so a row's statistics
// are bitwise identical whatever else is in the batch.
// Backward, same grid: one read and one write of each logit (dlogits may alias logits); elementwise
// given the row's lse and mean_z, so any split gives the same bits.
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
constexpr int64_t kTileVecs = int64_t(kThreads) * kUnroll;
// 4 tiles: 32 768 bf16 / 16 384 fp32 logits (V = 151 936 bf16: 5 chunks); each chunk costs one
// block reduction, ~2 static instructions per logit around the ~10 of the loop (python -m
// lenkernels.bench.sass). Larger chunks cost less but give rows of few-row batches fewer blocks.
constexpr int64_t kChunkVecs = 4 * kTileVecs;

// What every token-statistics kernel reads of its rows (the first members of each family's
// parameters, initialised in this order): the logits, the ids and the temperatures.
struct RowParams {
  const void* logits;  // [n_rows, vocab], row_stride elements apart, unit stride along vocab
  int64_t n_rows, vocab, row_stride;
  const void* ids;  // [n_rows] int32 (id_bytes 4) or int64 (id_bytes 8)
  int id_bytes;
  const float* temperature;  // [n_rows] (temp_stride 1) or [1] (temp_stride 0)
  int64_t temp_stride, ignore_index;
};

struct FwdParams : RowParams {
  float *logprobs, *entropy, *lse, *mean_z;  // [n_rows] each; entropy may be null
  float *max_z, *log_s;                      // null, or [n_rows] each: the row's state (m, log S)
  float* partial;                            // [n_rows, n_splits, 3] (m, S, U) when n_splits > 1
  int n_splits;
};

struct BwdParams : RowParams {
  const float *lse, *mean_z;            // [n_rows] from the forward
  const float *g_logprobs, *g_entropy;  // [n_rows] with any stride (0 = broadcast); null = zero
  int64_t g_logprobs_stride, g_entropy_stride;
  void* dlogits;  // [n_rows, vocab] in the logits dtype; may be logits itself
  int64_t dlogits_row_stride;
  int n_splits;
};

// Chunks of a row (at least 1): a function of V and the element size only.
LK_HOST_DEVICE int64_t chunk_count(int64_t vocab, int64_t elem_bytes) {
  const int64_t n_vec = vocab * elem_bytes / 16;
  return n_vec <= kChunkVecs ? 1 : ceil_div(n_vec, kChunkVecs);
}

// Blocks per row: 1 when rows alone give several waves of blocks; otherwise one block per chunk, so
// the grid fills the GPU. The plan depends on N, the results do not (the chunks are the same).
inline int split_count(int64_t n_rows, int64_t vocab, int64_t elem_bytes, int64_t sm_count) {
  const int64_t target = 4 * sm_count * kMinBlocksPerSm;
  if (n_rows <= 0 || n_rows >= target) return 1;
  return int(chunk_count(vocab, elem_bytes));
}

LK_HOST_DEVICE int64_t load_id(const void* ids, int id_bytes, int64_t row) {
  return id_bytes == 4 ? int64_t(static_cast<const int32_t*>(ids)[row]) : static_cast<const int64_t*>(ids)[row];
}

// --- forward ---------------------------------------------------------------------------------------

// Vector k of a row (elements [k * kPerVec, (k + 1) * kPerVec)): one 16-byte load when the row
// starts on a 16-byte boundary, else the same bytes from 4- or 2-byte loads (the same vector either
// way, so the fold does not depend on where the row lies).
template <typename T, bool kAligned>
LK_HOST_DEVICE Vec16 load_vec(const T* row, int64_t k) {
  if constexpr (kAligned) return load_ro(reinterpret_cast<const Vec16*>(row) + k);
  Vec16 v;
  if constexpr (sizeof(T) == 4) {
    const uint32_t* x = reinterpret_cast<const uint32_t*>(row) + k * 4;
    LK_UNROLL
    for (int q = 0; q < 4; ++q) v.w[q] = x[q];
  } else {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(row) + k * 8;
    LK_UNROLL
    for (int q = 0; q < 4; ++q) v.w[q] = uint32_t(x[2 * q]) | (uint32_t(x[2 * q + 1]) << 16);
  }
  return v;
}

// Vectors i, i + kThreads, ..., i + (kUnroll - 1) * kThreads of a row; -inf outside [i, end).
template <typename T, bool kAligned>
LK_HOST_DEVICE void load_tile(Vec16 (&tile)[kUnroll], const T* row, int64_t i, int64_t end) {
  LK_UNROLL
  for (int k = 0; k < kUnroll; ++k) {
    const int64_t idx = i + int64_t(k) * kThreads;
    tile[k] = idx < end ? load_vec<T, kAligned>(row, idx) : neg_inf_vec<T>();
  }
}

// What block (row, split) of a forward (FwdParams or ExtraFwdParams) knows before its sweep: its
// row, 1 / T, and chunks [first, last) of the row's n_chunks; in the block's `leader` with
// n_splits == 1, the target id and its raw logit, fetched first so their latency hides behind the
// sweep (id 0 and 0 elsewhere).
template <typename T>
struct FwdBlock {
  const T* x;
  bool aligned;  // the row starts on a 16-byte boundary
  float inv_t;
  int64_t id;
  float x_target;
  int64_t n_chunks, first, last;
};

template <typename T, class P>
LK_HOST_DEVICE FwdBlock<T> fwd_block(const P& p, int64_t row, int split, bool leader) {
  FwdBlock<T> b;
  b.x = static_cast<const T*>(p.logits) + row * p.row_stride;
  b.aligned = reinterpret_cast<uintptr_t>(b.x) % 16 == 0;
  b.inv_t = inverse_temperature(p.temperature[row * p.temp_stride]);
  b.id = 0;
  b.x_target = 0.0f;
  if (p.n_splits == 1 && leader) {
    b.id = load_id(p.ids, p.id_bytes, row);
    if (b.id >= 0 && b.id < p.vocab) b.x_target = load_early(b.x + b.id);
  }
  b.n_chunks = chunk_count(p.vocab, sizeof(T));
  b.first = p.n_splits == 1 ? 0 : split;
  b.last = p.n_splits == 1 ? b.n_chunks : split + 1;
  return b;
}

// Where chunk c lies: vectors [begin, end) of the row, and whether it holds the scalar tail.
struct Chunk {
  int64_t begin, end;
  bool last;
};

template <typename T>
LK_HOST_DEVICE Chunk chunk_at(int64_t vocab, int64_t c) {
  const int64_t n_vec = vocab / Elem<T>::kPerVec;
  const int64_t n_chunks = chunk_count(vocab, sizeof(T));
  const int64_t begin = c * kChunkVecs;
  const int64_t end = begin + kChunkVecs < n_vec ? begin + kChunkVecs : n_vec;
  return Chunk{begin < n_vec ? begin : n_vec, end, c == n_chunks - 1};
}

// The scalar past the row's last whole vector that thread `tid` owns (-inf if none), loaded early.
template <typename T>
LK_HOST_DEVICE float tail_scalar(const T* row, int64_t vocab, int tid) {
  constexpr int64_t kVec = Elem<T>::kPerVec;
  const int64_t first = vocab / kVec * kVec;
  return first + tid < vocab ? load_early(row + first + tid) : kNegInf;
}

// The online-softmax state of the elements of chunk `ch` that thread `tid` owns, folded tile by
// tile from the empty state. `cur` holds the thread's first tile of the chunk on entry and its next
// tile past the chunk on exit, loaded while the chunk's last tile is folded: chunks but the row's
// last are whole multiples of the tile, so that is the first tile of the next chunk, masked by
// `end`, the end of the vectors the block folds. kAligned: the row starts on a 16-byte boundary
// (two loops, neither with a branch on it).
template <typename T, bool kAligned>
LK_HOST_DEVICE SoftmaxState fold_chunk(const T* row, const Chunk& ch, float tail, int64_t end, int tid, float inv_t,
                                       Vec16 (&cur)[kUnroll]) {
  static_assert(kChunkVecs % kTileVecs == 0, "whole tiles per chunk");
  using E = Elem<T>;
  constexpr int kVec = E::kPerVec;
  SoftmaxState st = empty_state();
  for (int64_t i = ch.begin + tid; i < ch.end; i += kTileVecs) {
    Vec16 ahead[kUnroll];
    load_tile<T, kAligned>(ahead, row, i + kTileVecs, end);  // in flight while `cur` is folded
    st = fold_tile<kUnroll * kVec>(st, E::raw_max(cur), inv_t,
                                   [&](int k) { return E::get(cur[k / kVec], k % kVec); });
    LK_UNROLL
    for (int k = 0; k < kUnroll; ++k) cur[k] = ahead[k];
  }
  if (ch.last) st = fold_tile<1>(st, tail, inv_t, [&](int) { return tail; });
  return st;
}

// A thread's chunk state against the chunk's max m: (S, U) both relative to m, so the block can
// add them up in a fixed order (chunk_reduce) with no further exponential.
LK_HOST_DEVICE SoftmaxState rebase(const SoftmaxState& st, float m) {
  SoftmaxState out{m, 0.0f, 0.0f};
  rescale(st, m, &out.s, &out.u);
  return out;
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

// The row's state from its chunk states in index order: the first chunk's state, then merge()
// with each next one (the finalize kernel's order too).
LK_HOST_DEVICE SoftmaxState chain(const SoftmaxState& total, const SoftmaxState& chunk, bool first) {
  return first ? chunk : merge(total, chunk);
}

#if defined(__CUDACC__)
// The chunk state of the block's thread states, valid in thread 0: the chunk's max m (a max is the
// same in any order), each thread's (S, U) rebased onto m (one exponential), then S and U summed by
// a lane butterfly in each warp and warp by warp in index order. The tree is fixed, and cheaper than
// a butterfly of merge()s (no exponential per step). Two __syncthreads; the shared arrays are safe
// to reuse by the next call without a third (every read of one call precedes a barrier every
// write of the next one follows).
// The block's max of the threads' m, in every thread: a lane butterfly, then warp by warp in
// index order (NaN wins, as nan_max). One __syncthreads; the caller's next barrier must come before
// the next call writes the shared array again (chunk_reduce and chunk_reduce_extra have one).
template <int kBlock>
__device__ __forceinline__ float block_max(float m) {
  constexpr int kWarps = kBlock / 32;
  __shared__ float warp_max[kWarps];
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, mask));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  m = warp_max[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = nan_max(m, warp_max[w]);
  return m;
}

template <int kBlock>
__device__ __forceinline__ SoftmaxState chunk_reduce(const SoftmaxState& st) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "whole warps");
  constexpr int kWarps = kBlock / 32;
  __shared__ float warp_s[kWarps];
  __shared__ float warp_u[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float m = block_max<kBlock>(st.m);
  const SoftmaxState r = rebase(st, m);
  float s = r.s, u = r.u;
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, mask);
    u += __shfl_xor_sync(0xffffffffu, u, mask);
  }
  if (lane == 0) {
    warp_s[warp] = s;
    warp_u[warp] = u;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    s = warp_s[0];
    u = warp_u[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      s += warp_s[w];
      u += warp_u[w];
    }
  }
  return SoftmaxState{m, s, u};
}

// The state of chunks [first, last) of a row, valid in thread 0: each chunk folded and reduced, the
// chunk states chained in index order.
template <typename T, bool kAligned>
__device__ __forceinline__ SoftmaxState fold_chunks(const T* x, int64_t vocab, int64_t first, int64_t last, float tail,
                                                    float inv_t) {
  const int64_t end = chunk_at<T>(vocab, last - 1).end;
  Vec16 cur[kUnroll];
  load_tile<T, kAligned>(cur, x, chunk_at<T>(vocab, first).begin + threadIdx.x, end);
  SoftmaxState total = empty_state();
  for (int64_t c = first; c < last; ++c) {
    const SoftmaxState st = fold_chunk<T, kAligned>(x, chunk_at<T>(vocab, c), tail, end, threadIdx.x, inv_t, cur);
    const SoftmaxState chunk = chunk_reduce<kThreads>(st);
    if (threadIdx.x == 0) total = chain(total, chunk, c == first);
  }
  return total;
}
#endif

// What thread 0 of block (row, split) does with its state: the row's outputs (n_splits == 1: the
// whole row), or chunk `split`'s state for token_stats_finalize_kernel.
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

// n_splits == n_chunks: merges a row's chunk states left to right and writes its outputs.
template <typename T>
LK_HOST_DEVICE void finalize_row(const FwdParams& p, int64_t row) {
  const float* part = p.partial + row * p.n_splits * 3;
  SoftmaxState st = empty_state();
  for (int c = 0; c < p.n_splits; ++c) st = chain(st, SoftmaxState{part[3 * c], part[3 * c + 1], part[3 * c + 2]}, c == 0);
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
// written by the same thread, so dlogits may alias the logits. `grad` gives an element's gradient
// before conversion to the logits dtype: grad(x, j) for element j; grad.from(head), the same with the
// marked ids counted from element `head`; grad.marks<kVec>(first), where they fall in the vector that
// starts at element `first`, and grad(x, e, marks) for its element e (TokenGrad; ExtraTokenGrad in
// token_stats_extra.h).
template <typename T, class Grad>
LK_HOST_DEVICE void bwd_elements(const T* x, T* out, int64_t vocab, int split, int n_splits, int tid,
                                 const Grad& grad) {
  using E = Elem<T>;
  constexpr int kVec = E::kPerVec;
  const RowSpan span = row_span(x, vocab);
  if (span.head != row_span(out, vocab).head) {
    // input and output rows sit differently against 16-byte boundaries: scalar accesses
    const Range range = split_range(vocab, split, n_splits, kThreads);
    for (int64_t j = range.begin + tid; j < range.end; j += kThreads) {
      out[j] = E::from_float(grad(E::to_float(x[j]), j));
    }
    return;
  }
  if (split == 0 && tid < span.head) {
    const int64_t j = tid;
    out[j] = E::from_float(grad(E::to_float(x[j]), j));
  }
  if (split == n_splits - 1 && tid < span.tail) {
    const int64_t j = span.head + span.n_vec * kVec + tid;
    out[j] = E::from_float(grad(E::to_float(x[j]), j));
  }
  const Vec16* vx = reinterpret_cast<const Vec16*>(x + span.head);
  Vec16* vo = reinterpret_cast<Vec16*>(out + span.head);
  const Grad rel = grad.from(span.head);  // the marked ids counted from the first vector
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
      const auto marks = rel.template marks<kVec>(idx * kVec);
      Vec16 o;
      LK_UNROLL
      for (int e = 0; e < kVec; e += 2) {
        E::put(o, e, rel(E::get(v[k], e), e, marks), rel(E::get(v[k], e + 1), e + 1, marks));
      }
      store_stream(vo + idx, o);
    }
  }
}

// The two-output gradient of an element: the row's constants and its token id.
struct TokenGrad {
  int64_t id;
  const GradRow& g;
  LK_HOST_DEVICE float operator()(float x, int64_t j) const { return token_stats_grad_raw(x, j == id, g); }
  LK_HOST_DEVICE TokenGrad from(int64_t head) const { return TokenGrad{id - head, g}; }
  template <int kVec>
  LK_HOST_DEVICE int marks(int64_t first) const {  // the target's place in the vector (-1: not in it)
    const int64_t rel = id - first;
    return (rel >= 0 && rel < kVec) ? int(rel) : -1;
  }
  LK_HOST_DEVICE float operator()(float x, int e, int target) const { return token_stats_grad_raw(x, e == target, g); }
};

template <typename T>
LK_HOST_DEVICE void bwd_thread(const T* x, T* out, int64_t vocab, int split, int n_splits, int tid, int64_t id,
                               const GradRow& g) {
  bwd_elements(x, out, vocab, split, n_splits, tid, TokenGrad{id, g});
}

}  // namespace token_stats
}  // namespace cuda
}  // namespace lk
