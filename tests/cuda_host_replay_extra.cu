// Replays the CUDA kernels of the extra token statistics (SPEC 7; csrc/cuda/token_stats_extra.h) on
// the host, block by block and thread by thread, with the very per-thread functions the kernels run.
// Only the block-wide chunk reduction, which needs shuffles, is re-enacted here, in the kernel's
// order (chunk_reduce_extra). Built by tests/test_cuda_token_stats_extra.py with nvcc as a plain
// shared library called through ctypes, as tests/cuda_host_replay.cu is for the two-output kernels.
#include <array>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "token_stats_extra.h"
#include "cuda_host_replay.h"

using namespace lk;
using namespace lk::cuda;
using namespace lk::cuda::token_stats;

namespace {

// chunk_reduce_extra() re-enacted: the chunk max, each state rebased onto it, lane butterflies per
// warp (lane i adds its partner's value to its own), then the warps in index order.
ExtraState chunk_reduce_extra_replay(const std::vector<ExtraState>& states) {
  constexpr int kWarps = kThreads / 32;
  float warp_max[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    float m = states[32 * w].sm.m;
    for (int i = 1; i < 32; ++i) m = nan_max(m, states[32 * w + i].sm.m);
    warp_max[w] = m;
  }
  float m = warp_max[0];
  for (int w = 1; w < kWarps; ++w) m = nan_max(m, warp_max[w]);
  ExtraSums warp_sums[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    ExtraSums s[32], next[32];
    for (int i = 0; i < 32; ++i) s[i] = sums_of(rebase_extra(states[32 * w + i], m));
    for (int mask = 16; mask > 0; mask >>= 1) {
      for (int i = 0; i < 32; ++i) next[i] = add_sums(s[i], s[i ^ mask]);
      for (int i = 0; i < 32; ++i) s[i] = next[i];
    }
    warp_sums[w] = s[0];
  }
  ExtraSums s = warp_sums[0];
  for (int w = 1; w < kWarps; ++w) s = add_sums(s, warp_sums[w]);
  return with_sums(m, s, kNegInf, kNoId);
}

template <typename T>
void forward(const ExtraFwdParams& p) {
  std::vector<ExtraState> states(kThreads);
  replay::Tiles cur(kThreads);
  const int64_t n_chunks = chunk_count(p.vocab, sizeof(T));
  if (p.n_splits != 1 && p.n_splits != n_chunks) throw std::invalid_argument("n_splits");
  replay::forward_blocks<T>(p, [&](int64_t row, int split, const FwdBlock<T>& b, int64_t end) {
    replay::load_first_tiles(cur, b, p.vocab, end);
    ExtraState total = empty_extra();
    std::vector<float> best(kThreads, kNegInf);
    std::vector<int32_t> best_id(kThreads, kNoId);
    for (int64_t c = b.first; c < b.last; ++c) {
      const Chunk ch = chunk_at<T>(p.vocab, c);
      for (int tid = 0; tid < kThreads; ++tid) {
        const float tail = b.last == n_chunks ? tail_scalar(b.x, p.vocab, tid) : kNegInf;
        Vec16(&tile)[kUnroll] = replay::tile_of(cur, tid);
        states[tid] = b.aligned
                          ? fold_chunk_extra<T, true>(b.x, ch, tail, end, tid, b.inv_t, tile, best[tid], best_id[tid])
                          : fold_chunk_extra<T, false>(b.x, ch, tail, end, tid, b.inv_t, tile, best[tid], best_id[tid]);
        best[tid] = states[tid].best;
        best_id[tid] = states[tid].best_id;
      }
      total = chain_extra(total, chunk_reduce_extra_replay(states), c == b.first);
    }
    // block_argmax(): any order gives the same pair (take_best is a total order)
    total.best = kNegInf;
    total.best_id = kNoId;
    for (int tid = 0; tid < kThreads; ++tid) {
      const float tail = b.last == n_chunks ? tail_scalar(b.x, p.vocab, tid) : kNegInf;
      if (b.aligned) {
        resolve_argmax<T, true>(b.x, p.vocab, end, tid, tail, &best[tid], &best_id[tid]);
      } else {
        resolve_argmax<T, false>(b.x, p.vocab, end, tid, tail, &best[tid], &best_id[tid]);
      }
      take_best(&total.best, &total.best_id, best[tid], best_id[tid]);
    }
    write_block_result_extra(p, row, split, total, b.id, b.x_target * b.inv_t, b.inv_t);
  });
  if (p.n_splits > 1) {
    for (int64_t row = 0; row < p.n_rows; ++row) finalize_row_extra<T>(p, row);
  }
}

template <typename T>
void backward(const ExtraBwdParams& p) {
  replay::backward_blocks<T>(
      p, load_extra_grad_row, [&](const T* x, T* out, int64_t row, int split, int tid, int64_t id,
                                  const ExtraGradRow& g) {
        bwd_extra_thread<T>(x, out, p.vocab, split, p.n_splits, tid, id, p.argmax[row], g);
      });
}

}  // namespace

extern "C" {

int lk_replay_split_count(int64_t n_rows, int64_t vocab, int64_t elem_bytes, int64_t sm_count) {
  return split_count(n_rows, vocab, elem_bytes, sm_count);
}

// outs: logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2 (fp32), argmax (int64), max_logprob,
// mean_logit (fp32), [n_rows] each.
int lk_replay_extra_fwd(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                        const void* ids, int id_bytes, const float* temperature, int64_t temp_stride,
                        int64_t ignore_index, float* logprobs, float* entropy, float* lse, float* mean_z,
                        float* sum_p2, float* log_sum_p2, int64_t* argmax, float* max_logprob, float* mean_logit,
                        int n_splits) {
  std::vector<float> partial(n_splits > 1 ? n_rows * n_splits * kExtraState : 0);
  const ExtraFwdParams p{logits,   n_rows,     vocab,      row_stride, ids,         id_bytes,      temperature,
                         temp_stride, ignore_index, logprobs, entropy, lse,         mean_z,        sum_p2,
                         log_sum_p2, argmax,    max_logprob, mean_logit, partial.data(), n_splits};
  return replay::status_of([&] { LK_CUDA_DISPATCH_DTYPE(dtype, T, forward<T>(p)); });
}

int lk_replay_extra_bwd(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                        const void* ids, int id_bytes, const float* temperature, int64_t temp_stride,
                        int64_t ignore_index, const float* lse, const float* mean_z, const float* log_sum_p2,
                        const int64_t* argmax, const float* grads, void* dlogits, int64_t dlogits_row_stride,
                        int n_splits) {
  const ExtraBwdParams p{logits,       n_rows, vocab,  row_stride, ids,        id_bytes, temperature,
                         temp_stride, ignore_index, lse, mean_z, log_sum_p2, argmax,  grads,
                         dlogits,      dlogits_row_stride, n_splits};
  return replay::status_of([&] { LK_CUDA_DISPATCH_DTYPE(dtype, T, backward<T>(p)); });
}

}  // extern "C"
