// Replays the CUDA token-statistics kernels on the host, block by block and thread by thread, with
// the very per-thread functions the kernels run (csrc/cuda/token_stats.h). Only the block-wide
// chunk reduction, which needs shuffles, is re-enacted here, in the kernel's order.
// Built by tests/test_cuda_compile.py with nvcc as a plain shared library (called through ctypes):
// it checks which elements each thread touches (coverage, row edges, split ranges, misaligned and
// in-place rows) and the numbers, without a GPU.
#include <array>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "token_stats.h"
#include "cuda_host_replay.h"

using namespace lk;
using namespace lk::cuda;
using namespace lk::cuda::token_stats;

namespace {

// chunk_reduce() re-enacted: the chunk max, each thread's state rebased onto it, lane-butterfly sums
// per warp (a + b == b + a, so every lane of a warp holds the same sum), then the warps in order.
SoftmaxState chunk_reduce_replay(const std::vector<SoftmaxState>& states) {
  constexpr int kWarps = kThreads / 32;
  float warp_max[kWarps], warp_s[kWarps], warp_u[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    float m = states[32 * w].m;
    for (int i = 1; i < 32; ++i) m = nan_max(m, states[32 * w + i].m);
    warp_max[w] = m;
  }
  float m = warp_max[0];
  for (int w = 1; w < kWarps; ++w) m = nan_max(m, warp_max[w]);
  for (int w = 0; w < kWarps; ++w) {
    float s[32], u[32], next_s[32], next_u[32];
    for (int i = 0; i < 32; ++i) {
      const SoftmaxState r = rebase(states[32 * w + i], m);
      s[i] = r.s;
      u[i] = r.u;
    }
    for (int mask = 16; mask > 0; mask >>= 1) {
      for (int i = 0; i < 32; ++i) {
        next_s[i] = s[i] + s[i ^ mask];
        next_u[i] = u[i] + u[i ^ mask];
      }
      for (int i = 0; i < 32; ++i) {
        s[i] = next_s[i];
        u[i] = next_u[i];
      }
    }
    warp_s[w] = s[0];
    warp_u[w] = u[0];
  }
  float s = warp_s[0], u = warp_u[0];
  for (int w = 1; w < kWarps; ++w) {
    s += warp_s[w];
    u += warp_u[w];
  }
  return SoftmaxState{m, s, u};
}

template <typename T>
void forward(const FwdParams& p) {
  std::vector<SoftmaxState> states(kThreads);
  replay::Tiles cur(kThreads);
  const int64_t n_chunks = chunk_count(p.vocab, sizeof(T));
  if (p.n_splits != 1 && p.n_splits != n_chunks) throw std::invalid_argument("n_splits");
  replay::forward_blocks<T>(p, [&](int64_t row, int split, const FwdBlock<T>& b, int64_t end) {
    replay::load_first_tiles(cur, b, p.vocab, end);
    SoftmaxState total = empty_state();
    for (int64_t c = b.first; c < b.last; ++c) {
      const Chunk ch = chunk_at<T>(p.vocab, c);
      for (int tid = 0; tid < kThreads; ++tid) {
        const float tail = b.last == n_chunks ? tail_scalar(b.x, p.vocab, tid) : kNegInf;
        states[tid] = b.aligned ? fold_chunk<T, true>(b.x, ch, tail, end, tid, b.inv_t, replay::tile_of(cur, tid))
                                : fold_chunk<T, false>(b.x, ch, tail, end, tid, b.inv_t, replay::tile_of(cur, tid));
      }
      total = chain(total, chunk_reduce_replay(states), c == b.first);
    }
    write_block_result(p, row, split, total, b.id, b.x_target * b.inv_t);
  });
  if (p.n_splits > 1) {
    for (int64_t row = 0; row < p.n_rows; ++row) finalize_row<T>(p, row);
  }
}

template <typename T>
void backward(const BwdParams& p) {
  replay::backward_blocks<T>(
      p, load_grad_row, [&](const T* x, T* out, int64_t, int split, int tid, int64_t id, const GradRow& g) {
        bwd_thread<T>(x, out, p.vocab, split, p.n_splits, tid, id, g);
      });
}

}  // namespace

extern "C" {

int lk_replay_split_count(int64_t n_rows, int64_t vocab, int64_t elem_bytes, int64_t sm_count) {
  return split_count(n_rows, vocab, elem_bytes, sm_count);
}

int lk_replay_fwd(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, const void* ids,
                  int id_bytes, const float* temperature, int64_t temp_stride, int64_t ignore_index, float* logprobs,
                  float* entropy, float* lse, float* mean_z, float* max_z, float* log_s, int n_splits) {
  std::vector<float> partial(n_splits > 1 ? n_rows * n_splits * 3 : 0);
  const FwdParams p{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride, ignore_index,
                    logprobs, entropy, lse, mean_z, max_z, log_s, partial.data(), n_splits};
  return replay::status_of([&] { LK_CUDA_DISPATCH_DTYPE(dtype, T, forward<T>(p)); });
}

int lk_replay_bwd(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, const void* ids,
                  int id_bytes, const float* temperature, int64_t temp_stride, int64_t ignore_index, const float* lse,
                  const float* mean_z, const float* g_logprobs, int64_t g_logprobs_stride, const float* g_entropy,
                  int64_t g_entropy_stride, void* dlogits, int64_t dlogits_row_stride, int n_splits) {
  const BwdParams p{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride, ignore_index, lse,
                    mean_z, g_logprobs, g_entropy, g_logprobs_stride, g_entropy_stride, dlogits, dlogits_row_stride,
                    n_splits};
  return replay::status_of([&] { LK_CUDA_DISPATCH_DTYPE(dtype, T, backward<T>(p)); });
}

}  // extern "C"
