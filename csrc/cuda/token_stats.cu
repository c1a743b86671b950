// Token log-probabilities and entropy from logits on the GPU (SPEC 1), CUDA C++ backend.
//   token_stats_fwd_kernel       grid (N * n_splits): one read of the logits -> logprob, entropy,
//                                lse, mean_z ([N] fp32 each), or chunk states when n_splits > 1
//   token_stats_finalize_kernel  grid (N / 128): merges the chunk states of each row in order
//   token_stats_bwd_kernel       grid (N * n_splits): one read + one write per logit -> dlogits
//   token_stats_extra_{fwd,finalize,bwd}_kernel: the same plan with the SPEC 7 statistics besides
//                                (sum_p2, log_sum_p2, argmax, max_logprob, mean_logit; token_stats_extra.h)
// The per-thread work is in token_stats.h; the arithmetic in csrc/include/lenkernels/, shared with
// the CPU backend. Raw device pointers, sizes and the stream come from Python (lenkernels/cuda.py):
// no torch headers.
#include <climits>

#include "cuda_utils.h"
#include "lenkernels/binding.h"
#include "token_stats.h"
#include "token_stats_extra.h"

namespace lk {
namespace cuda {
namespace token_stats {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) token_stats_fwd_kernel(const FwdParams p) {
  const int64_t row = blockIdx.x / unsigned(p.n_splits);
  const int split = int(blockIdx.x % unsigned(p.n_splits));
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const float inv_t = inverse_temperature(p.temperature[row * p.temp_stride]);
  // the target logit is fetched before the sweep, so its latency hides behind it
  int64_t id = 0;
  float x_target = 0.0f;
  if (p.n_splits == 1 && threadIdx.x == 0) {
    id = load_id(p.ids, p.id_bytes, row);
    if (id >= 0 && id < p.vocab) x_target = load_early(x + id);
  }
  const int64_t n_chunks = chunk_count(p.vocab, sizeof(T));
  const int64_t first = p.n_splits == 1 ? 0 : split;
  const int64_t last = p.n_splits == 1 ? n_chunks : split + 1;
  const float tail = last == n_chunks ? tail_scalar(x, p.vocab, threadIdx.x) : kNegInf;
  const SoftmaxState total = aligned ? fold_chunks<T, true>(x, p.vocab, first, last, tail, inv_t)
                                     : fold_chunks<T, false>(x, p.vocab, first, last, tail, inv_t);
  if (threadIdx.x == 0) write_block_result(p, row, split, total, id, x_target * inv_t);
}

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) token_stats_finalize_kernel(const FwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (row < p.n_rows) finalize_row<T>(p, row);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) token_stats_bwd_kernel(const BwdParams p) {
  const int64_t row = blockIdx.x / unsigned(p.n_splits);
  const int split = int(blockIdx.x % unsigned(p.n_splits));
  const int64_t id = load_id(p.ids, p.id_bytes, row);
  const GradRow g = load_grad_row(p, row, id);
  bwd_thread<T>(static_cast<const T*>(p.logits) + row * p.row_stride,
                static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride, p.vocab, split, p.n_splits, threadIdx.x, id,
                g);
}

// Launch bounds of the extra forward: 2 blocks an SM (at most 128 registers a thread): the
// seven-value state beside the two tiles in flight spills at 80 (sm_80, bf16 and fp16); 16 warps an
// SM with 8 16-byte loads in flight a thread are still ~4x the bytes in flight HBM needs. The
// backward fits the two-output kernels' 64.
constexpr int kExtraFwdMinBlocksPerSm = 2;

template <typename T>
__global__ void __launch_bounds__(kThreads, kExtraFwdMinBlocksPerSm)
    token_stats_extra_fwd_kernel(const ExtraFwdParams p) {
  const int64_t row = blockIdx.x / unsigned(p.n_splits);
  const int split = int(blockIdx.x % unsigned(p.n_splits));
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const float inv_t = inverse_temperature(p.temperature[row * p.temp_stride]);
  int64_t id = 0;
  float x_target = 0.0f;
  if (p.n_splits == 1 && threadIdx.x == 0) {
    id = load_id(p.ids, p.id_bytes, row);
    if (id >= 0 && id < p.vocab) x_target = load_early(x + id);
  }
  const int64_t n_chunks = chunk_count(p.vocab, sizeof(T));
  const int64_t first = p.n_splits == 1 ? 0 : split;
  const int64_t last = p.n_splits == 1 ? n_chunks : split + 1;
  const float tail = last == n_chunks ? tail_scalar(x, p.vocab, threadIdx.x) : kNegInf;
  const ExtraState total = aligned ? fold_chunks_extra<T, true>(x, p.vocab, first, last, tail, inv_t)
                                   : fold_chunks_extra<T, false>(x, p.vocab, first, last, tail, inv_t);
  if (threadIdx.x == 0) write_block_result_extra(p, row, split, total, id, x_target * inv_t, inv_t);
}

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) token_stats_extra_finalize_kernel(const ExtraFwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (row < p.n_rows) finalize_row_extra<T>(p, row);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) token_stats_extra_bwd_kernel(const ExtraBwdParams p) {
  const int64_t row = blockIdx.x / unsigned(p.n_splits);
  const int split = int(blockIdx.x % unsigned(p.n_splits));
  const int64_t id = load_id(p.ids, p.id_bytes, row);
  const ExtraGradRow g = load_extra_grad_row(p, row, id);
  bwd_extra_thread<T>(static_cast<const T*>(p.logits) + row * p.row_stride,
                      static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride, p.vocab, split, p.n_splits, threadIdx.x,
                      id, p.argmax[row], g);
}

unsigned grid_size(int64_t n_rows, int n_splits) {
  if (n_splits < 1) throw std::invalid_argument("n_splits must be at least 1");
  if (n_rows > INT_MAX / n_splits) throw std::invalid_argument("too many rows for one launch (N * n_splits >= 2^31)");
  return unsigned(n_rows * n_splits);
}

// The checks both passes share, then their grid (N * n_splits blocks).
template <class Params>
unsigned checked_grid(const Params& p) {
  if (p.n_rows < 0 || p.vocab < 1) throw std::invalid_argument("need n_rows >= 0 and vocab >= 1");
  if (p.id_bytes != 4 && p.id_bytes != 8) throw std::invalid_argument("ids must be int32 or int64");
  return grid_size(p.n_rows, p.n_splits);
}

void forward(const FwdParams& p, int dtype, int device, cudaStream_t stream) {
  const unsigned blocks = checked_grid(p);
  if (p.n_splits > 1 && p.partial == nullptr) throw std::invalid_argument("n_splits > 1 needs a partial buffer");
  if (blocks == 0) return;
  DeviceGuard guard(device);
  LK_DISPATCH_FLOAT(dtype, T, {
    if (p.n_splits != 1 && p.n_splits != chunk_count(p.vocab, sizeof(T))) {
      throw std::invalid_argument("n_splits must be 1 or the row's chunk count (token_stats_splits)");
    }
    token_stats_fwd_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching token_stats_fwd_kernel");
    if (p.n_splits > 1) {
      const unsigned fin_blocks = unsigned(ceil_div(p.n_rows, kFinalizeThreads));
      token_stats_finalize_kernel<T><<<fin_blocks, kFinalizeThreads, 0, stream>>>(p);
      check_cuda(cudaGetLastError(), "launching token_stats_finalize_kernel");
    }
  });
}

void backward(const BwdParams& p, int dtype, int device, cudaStream_t stream) {
  const unsigned blocks = checked_grid(p);
  if (blocks == 0) return;
  DeviceGuard guard(device);
  LK_DISPATCH_FLOAT(dtype, T, {
    token_stats_bwd_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching token_stats_bwd_kernel");
  });
}

void extra_forward(const ExtraFwdParams& p, int dtype, int device, cudaStream_t stream) {
  const unsigned blocks = checked_grid(p);
  if (p.n_splits > 1 && p.partial == nullptr) throw std::invalid_argument("n_splits > 1 needs a partial buffer");
  if (blocks == 0) return;
  DeviceGuard guard(device);
  LK_DISPATCH_FLOAT(dtype, T, {
    if (p.n_splits != 1 && p.n_splits != chunk_count(p.vocab, sizeof(T))) {
      throw std::invalid_argument("n_splits must be 1 or the row's chunk count (token_stats_splits)");
    }
    token_stats_extra_fwd_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching token_stats_extra_fwd_kernel");
    if (p.n_splits > 1) {
      const unsigned fin_blocks = unsigned(ceil_div(p.n_rows, kFinalizeThreads));
      token_stats_extra_finalize_kernel<T><<<fin_blocks, kFinalizeThreads, 0, stream>>>(p);
      check_cuda(cudaGetLastError(), "launching token_stats_extra_finalize_kernel");
    }
  });
}

void extra_backward(const ExtraBwdParams& p, int dtype, int device, cudaStream_t stream) {
  const unsigned blocks = checked_grid(p);
  if (blocks == 0) return;
  DeviceGuard guard(device);
  LK_DISPATCH_FLOAT(dtype, T, {
    token_stats_extra_bwd_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching token_stats_extra_bwd_kernel");
  });
}

int64_t elem_bytes(int dtype) {
  int64_t out = 0;
  LK_DISPATCH_FLOAT(dtype, T, out = sizeof(T));
  return out;
}

void define(py::module_& m) {
  m.def(
      "token_stats_splits",
      [](int64_t n_rows, int64_t vocab, int dtype, int64_t sm_count) {
        return split_count(n_rows, vocab, elem_bytes(dtype), sm_count);
      },
      py::arg("n_rows"), py::arg("vocab"), py::arg("dtype"), py::arg("sm_count"),
      "Blocks per row of the forward and backward (the forward needs n_rows * n_splits * 3 floats of "
      "partial states when it is above 1).");
  m.def(
      "token_stats_fwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, int id_bytes,
         Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr logprobs, Addr entropy, Addr lse,
         Addr mean_z, Addr max_z, Addr log_s, Addr partial, int n_splits, int device, Addr stream) {
        forward(FwdParams{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride, ignore_index,
                          logprobs, entropy, lse, mean_z, max_z, log_s, partial, n_splits},
                dtype, device, stream);
      },
      LK_NOGIL,
      "Launches the forward on `stream`: writes logprobs, entropy, lse, mean_z ([n_rows] fp32), and the rows' "
      "states max_z, log_s (0 = not wanted; lse = max_z + log_s).");
  m.def(
      "token_stats_bwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, int id_bytes,
         Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr lse, Addr mean_z, Addr g_logprobs,
         int64_t g_logprobs_stride, Addr g_entropy, int64_t g_entropy_stride, Addr dlogits,
         int64_t dlogits_row_stride, int n_splits, int device, Addr stream) {
        backward(BwdParams{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride, ignore_index,
                           lse, mean_z, g_logprobs, g_entropy, g_logprobs_stride, g_entropy_stride, dlogits,
                           dlogits_row_stride, n_splits},
                 dtype, device, stream);
      },
      LK_NOGIL, "Launches the backward on `stream`: writes dlogits ([n_rows, vocab], logits dtype; may be logits).");
  m.def(
      "token_stats_extra_fwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, int id_bytes,
         Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr logprobs, Addr entropy, Addr lse,
         Addr mean_z, Addr sum_p2, Addr log_sum_p2, Addr argmax, Addr max_logprob, Addr mean_logit, Addr partial,
         int n_splits, int device, Addr stream) {
        extra_forward(ExtraFwdParams{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride,
                                     ignore_index, logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax,
                                     max_logprob, mean_logit, partial, n_splits},
                      dtype, device, stream);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"), py::arg("ids"),
      py::arg("id_bytes"), py::arg("temperature"), py::arg("temp_stride"), py::arg("ignore_index"),
      py::arg("logprobs"), py::arg("entropy"), py::arg("lse"), py::arg("mean_z"), py::arg("sum_p2"),
      py::arg("log_sum_p2"), py::arg("argmax"), py::arg("max_logprob"), py::arg("mean_logit"), py::arg("partial"),
      py::arg("n_splits"), py::arg("device"), py::arg("stream"),
      LK_NOGIL,
      "Launches the SPEC 7 forward on `stream`: logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax (int64), "
      "max_logprob, mean_logit ([n_rows] each); partial: n_rows * n_splits * 7 floats when n_splits > 1.");
  m.def(
      "token_stats_extra_bwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, int id_bytes,
         Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr lse, Addr mean_z, Addr log_sum_p2,
         Addr argmax, Addr grads, Addr dlogits, int64_t dlogits_row_stride, int n_splits, int device, Addr stream) {
        extra_backward(ExtraBwdParams{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride,
                                      ignore_index, lse, mean_z, log_sum_p2, argmax, grads, dlogits,
                                      dlogits_row_stride, n_splits},
                       dtype, device, stream);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"), py::arg("ids"),
      py::arg("id_bytes"), py::arg("temperature"), py::arg("temp_stride"), py::arg("ignore_index"), py::arg("lse"),
      py::arg("mean_z"), py::arg("log_sum_p2"), py::arg("argmax"), py::arg("grads"), py::arg("dlogits"),
      py::arg("dlogits_row_stride"), py::arg("n_splits"), py::arg("device"), py::arg("stream"),
      LK_NOGIL,
      "Launches the SPEC 7 backward on `stream`: grads is [6, n_rows] fp32 (g_logprobs, g_entropy, g_sum_p2, "
      "g_log_sum_p2, g_max_logprob, g_mean_logit); writes dlogits (logits dtype; may be logits).");
  m.attr("BLOCK_THREADS") = kThreads;
}

}  // namespace
}  // namespace token_stats
}  // namespace cuda
}  // namespace lk

LK_MODULE(_cuda_token_stats, "lenkernels CUDA kernels: token log-probabilities and entropy (raw device pointers)",
          lk::cuda::token_stats::define)
