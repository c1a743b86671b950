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
#include <type_traits>

#include "cuda_utils.h"
#include "lenkernels/binding.h"
#include "token_stats.h"
#include "token_stats_extra.h"

namespace lk {
namespace cuda {
namespace token_stats {
namespace {

// The kernel bodies, one for both families (FwdParams / BwdParams: token_stats.h; ExtraFwdParams /
// ExtraBwdParams: token_stats_extra.h): grid (N * n_splits) for the forward and the backward (under
// 2^31 blocks: 32-bit division), (N / kFinalizeThreads) for the finalize.
template <class Params>
constexpr bool kExtra = std::is_same<Params, ExtraFwdParams>::value || std::is_same<Params, ExtraBwdParams>::value;

template <typename T, class Params>
__device__ __forceinline__ void forward_block(const Params& p) {
  const int64_t row = blockIdx.x / unsigned(p.n_splits);
  const int split = int(blockIdx.x % unsigned(p.n_splits));
  const FwdBlock<T> b = fwd_block<T>(p, row, split, threadIdx.x == 0);
  const float tail = b.last == b.n_chunks ? tail_scalar(b.x, p.vocab, threadIdx.x) : kNegInf;
  if constexpr (kExtra<Params>) {
    const ExtraState total = b.aligned ? fold_chunks_extra<T, true>(b.x, p.vocab, b.first, b.last, tail, b.inv_t)
                                       : fold_chunks_extra<T, false>(b.x, p.vocab, b.first, b.last, tail, b.inv_t);
    if (threadIdx.x == 0) write_block_result_extra(p, row, split, total, b.id, b.x_target * b.inv_t, b.inv_t);
  } else {
    const SoftmaxState total = b.aligned ? fold_chunks<T, true>(b.x, p.vocab, b.first, b.last, tail, b.inv_t)
                                         : fold_chunks<T, false>(b.x, p.vocab, b.first, b.last, tail, b.inv_t);
    if (threadIdx.x == 0) write_block_result(p, row, split, total, b.id, b.x_target * b.inv_t);
  }
}

template <typename T, class Params>
__device__ __forceinline__ void finalize_block(const Params& p) {
  const int64_t row = int64_t(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (row >= p.n_rows) return;
  if constexpr (kExtra<Params>) {
    finalize_row_extra<T>(p, row);
  } else {
    finalize_row<T>(p, row);
  }
}

// The elements of block (row, split) this thread owns, each read and then written by it.
template <typename T, class Params>
__device__ __forceinline__ void backward_block(const Params& p) {
  const int64_t row = blockIdx.x / unsigned(p.n_splits);
  const int split = int(blockIdx.x % unsigned(p.n_splits));
  const int64_t id = load_id(p.ids, p.id_bytes, row);
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  T* out = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
  if constexpr (kExtra<Params>) {
    const ExtraGradRow g = load_extra_grad_row(p, row, id);
    bwd_extra_thread<T>(x, out, p.vocab, split, p.n_splits, threadIdx.x, id, p.argmax[row], g);
  } else {
    bwd_thread<T>(x, out, p.vocab, split, p.n_splits, threadIdx.x, id, load_grad_row(p, row, id));
  }
}

// Launch bounds of the extra forward: 2 blocks an SM (at most 128 registers a thread): the
// seven-value state beside the two tiles in flight spills at 80 (sm_80, bf16 and fp16); 16 warps an
// SM with 8 16-byte loads in flight a thread are still ~4x the bytes in flight HBM needs. The
// backward fits the two-output kernels' 64.
constexpr int kExtraFwdMinBlocksPerSm = 2;

// One kernel launch and the name its launch errors carry.
template <class Params>
struct Launch {
  void (*kernel)(Params);
  const char* what;  // "launching <kernel>"
  void operator()(unsigned blocks, int threads, cudaStream_t stream, const Params& p) const {
    kernel<<<blocks, threads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), what);
  }
};

// The kernels of a pass, picked by its parameters: the pass kernel (grid N * n_splits) and, for a
// forward, the kernel that merges each row's chunk states when n_splits > 1.
template <class Params>
struct Kernels {
  Launch<Params> pass, finalize;
};

// The three kernels of a family, <name>_fwd_kernel, <name>_finalize_kernel and <name>_bwd_kernel
// (their names are what the SASS report and the tests look up), over the bodies above, and
// kernels<T>(params), which picks them for the launchers below.
#define LK_TOKEN_STATS_KERNELS(name, FwdP, BwdP, fwd_min_blocks)                                  \
  template <typename T>                                                                           \
  __global__ void __launch_bounds__(kThreads, fwd_min_blocks) name##_fwd_kernel(const FwdP p) {   \
    forward_block<T>(p);                                                                          \
  }                                                                                               \
  template <typename T>                                                                           \
  __global__ void __launch_bounds__(kFinalizeThreads) name##_finalize_kernel(const FwdP p) {      \
    finalize_block<T>(p);                                                                         \
  }                                                                                               \
  template <typename T>                                                                           \
  __global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) name##_bwd_kernel(const BwdP p) {  \
    backward_block<T>(p);                                                                         \
  }                                                                                               \
  template <typename T>                                                                           \
  Kernels<FwdP> kernels(const FwdP&) {                                                            \
    return {{name##_fwd_kernel<T>, "launching " #name "_fwd_kernel"},                             \
            {name##_finalize_kernel<T>, "launching " #name "_finalize_kernel"}};                  \
  }                                                                                               \
  template <typename T>                                                                           \
  Kernels<BwdP> kernels(const BwdP&) {                                                            \
    return {{name##_bwd_kernel<T>, "launching " #name "_bwd_kernel"}, {}};                        \
  }

LK_TOKEN_STATS_KERNELS(token_stats, FwdParams, BwdParams, kMinBlocksPerSm)
LK_TOKEN_STATS_KERNELS(token_stats_extra, ExtraFwdParams, ExtraBwdParams, kExtraFwdMinBlocksPerSm)
#undef LK_TOKEN_STATS_KERNELS

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

// The forward (FwdParams or ExtraFwdParams): the pass, then the finalize kernel when n_splits > 1.
template <class Params>
void forward(const Params& p, int dtype, int device, cudaStream_t stream) {
  const unsigned blocks = checked_grid(p);
  if (p.n_splits > 1 && p.partial == nullptr) throw std::invalid_argument("n_splits > 1 needs a partial buffer");
  if (blocks == 0) return;
  DeviceGuard guard(device);
  LK_DISPATCH_FLOAT(dtype, T, {
    if (p.n_splits != 1 && p.n_splits != chunk_count(p.vocab, sizeof(T))) {
      throw std::invalid_argument("n_splits must be 1 or the row's chunk count (token_stats_splits)");
    }
    const Kernels<Params> k = kernels<T>(p);
    k.pass(blocks, kThreads, stream, p);
    if (p.n_splits > 1) k.finalize(unsigned(ceil_div(p.n_rows, kFinalizeThreads)), kFinalizeThreads, stream, p);
  });
}

// The backward (BwdParams or ExtraBwdParams): one pass.
template <class Params>
void backward(const Params& p, int dtype, int device, cudaStream_t stream) {
  const unsigned blocks = checked_grid(p);
  if (blocks == 0) return;
  DeviceGuard guard(device);
  LK_DISPATCH_FLOAT(dtype, T, kernels<T>(p).pass(blocks, kThreads, stream, p));
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
        forward(ExtraFwdParams{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride,
                               ignore_index, logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax, max_logprob,
                               mean_logit, partial, n_splits},
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
        backward(ExtraBwdParams{logits, n_rows, vocab, row_stride, ids, id_bytes, temperature, temp_stride,
                                ignore_index, lse, mean_z, log_sum_p2, argmax, grads, dlogits, dlogits_row_stride,
                                n_splits},
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
