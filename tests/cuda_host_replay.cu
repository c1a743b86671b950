// Replays the CUDA token-statistics kernels on the host, block by block and thread by thread, with
// the very per-thread functions the kernels run (csrc/cuda/token_stats.h). Only the warp/block
// merge, which needs shuffles, is re-enacted here, in the kernels' butterfly order.
// Built by tests/test_cuda_compile.py with nvcc as a plain shared library (called through ctypes):
// it checks which elements each thread touches (coverage, row edges, split ranges, misaligned and
// in-place rows) and the numbers, without a GPU.
#include <cstdint>
#include <vector>

#include "token_stats.h"

using namespace lk;
using namespace lk::cuda;
using namespace lk::cuda::token_stats;

namespace {

void warp_merge_replay(SoftmaxState* lanes) {
  SoftmaxState next[32];
  for (int mask = 16; mask > 0; mask >>= 1) {
    for (int i = 0; i < 32; ++i) next[i] = merge(lanes[i], lanes[i ^ mask]);
    for (int i = 0; i < 32; ++i) lanes[i] = next[i];
  }
}

SoftmaxState block_merge_replay(std::vector<SoftmaxState>& states) {
  constexpr int kWarps = kThreads / 32;
  SoftmaxState lanes[32];
  for (int w = 0; w < kWarps; ++w) warp_merge_replay(&states[32 * w]);
  for (int i = 0; i < 32; ++i) lanes[i] = i < kWarps ? states[32 * i] : empty_state();
  warp_merge_replay(lanes);
  return lanes[0];
}

template <typename T>
void forward(const FwdParams& p) {
  std::vector<SoftmaxState> states(kThreads);
  for (int64_t block = 0; block < p.n_rows * p.n_splits; ++block) {
    const int64_t row = block / p.n_splits;
    const int split = int(block % p.n_splits);
    const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
    const float inv_t = inverse_temperature(p.temperature[row * p.temp_stride]);
    int64_t id = 0;
    float x_target = 0.0f;
    if (p.n_splits == 1) {
      id = load_id(p.ids, p.id_bytes, row);
      if (id >= 0 && id < p.vocab) x_target = load_early(x + id);
    }
    for (int tid = 0; tid < kThreads; ++tid) {
      states[tid] = fwd_thread_state<T>(x, p.vocab, split, p.n_splits, tid, inv_t);
    }
    write_block_result(p, row, split, block_merge_replay(states), id, x_target * inv_t);
  }
  if (p.n_splits > 1) {
    for (int64_t row = 0; row < p.n_rows; ++row) finalize_row<T>(p, row);
  }
}

template <typename T>
void backward(const BwdParams& p) {
  for (int64_t block = 0; block < p.n_rows * p.n_splits; ++block) {
    const int64_t row = block / p.n_splits;
    const int split = int(block % p.n_splits);
    const int64_t id = load_id(p.ids, p.id_bytes, row);
    const GradRow g = load_grad_row(p, row, id);
    for (int tid = 0; tid < kThreads; ++tid) {
      bwd_thread<T>(static_cast<const T*>(p.logits) + row * p.row_stride,
                    static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride, p.vocab, split, p.n_splits, tid, id, g);
    }
  }
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
  try {
    LK_CUDA_DISPATCH_DTYPE(dtype, T, forward<T>(p));
  } catch (...) {
    return 1;
  }
  return 0;
}

int lk_replay_bwd(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, const void* ids,
                  int id_bytes, const float* temperature, int64_t temp_stride, int64_t ignore_index, const float* lse,
                  const float* mean_z, const float* g_logprobs, int64_t g_logprobs_stride, const float* g_entropy,
                  int64_t g_entropy_stride, void* dlogits, int64_t dlogits_row_stride, int n_splits) {
  const BwdParams p{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride, ignore_index, lse,
                    mean_z, g_logprobs, g_entropy, g_logprobs_stride, g_entropy_stride, dlogits, dlogits_row_stride,
                    n_splits};
  try {
    LK_CUDA_DISPATCH_DTYPE(dtype, T, backward<T>(p));
  } catch (...) {
    return 1;
  }
  return 0;
}

}  // extern "C"
