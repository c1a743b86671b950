// Phase-split statistics (SPEC 6) and per-sequence token statistics on the GPU, CUDA C++ backend.
//   phase_stats_fwd_kernel     grid (S): first delimiter occurrence, think/answer sums and counts
//   phase_stats_bwd_kernel     grid (S): d values of every token of every sequence
//   sequence_stats_fwd_kernel  grid (S): length, mean/min/max, fraction above a threshold, mask
// What a block computes is in phase_stats.h; the maths in lenkernels/phase_stats.h, shared with the
// CPU backend. Raw device pointers, sizes and the stream come from Python
// (lenkernels/cuda/phase_stats.py): no torch headers. device -1 runs the same bodies on the host (team.h).
#include <pybind11/pybind11.h>

#include <climits>
#include <string>

#include "cuda_utils.h"
#include "phase_stats.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace phase_stats {
namespace {

__global__ void __launch_bounds__(kThreads) phase_stats_fwd_kernel(const FwdArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  fwd_block(a, blockIdx.x, team);
}

__global__ void __launch_bounds__(kThreads) phase_stats_bwd_kernel(const BwdArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  bwd_block(a, blockIdx.x, team);
}

__global__ void __launch_bounds__(kThreads) sequence_stats_fwd_kernel(const SeqArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  sequence_block(a, blockIdx.x, team);
}

// An unknown dtype code raises: load_float would read it as float32.
void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) {
    throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype) + " (lenkernels._codes.DType)");
  }
}

// One block per sequence on the device (made current for the call), or the host emulation.
template <class Args, class Body>
void launch(void (*kernel)(Args), const Args& a, int64_t n_seq, const Body& body, int device, uintptr_t stream,
            const char* name) {
  if (n_seq < 0 || n_seq > INT_MAX) throw std::invalid_argument("the sequence count must be in [0, 2^31)");
  if (n_seq == 0) return;
  if (device < 0) {
    emulate<kThreads>(n_seq, [&](int64_t s, auto& team) { body(a, s, team); });
    return;
  }
  DeviceGuard guard(device);
  kernel<<<unsigned(n_seq), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
  check_cuda(cudaGetLastError(), name);
}

struct FwdBody {
  template <class Team>
  void operator()(const FwdArgs& a, int64_t s, Team& team) const {
    fwd_block(a, s, team);
  }
};

struct BwdBody {
  template <class Team>
  void operator()(const BwdArgs& a, int64_t s, Team& team) const {
    bwd_block(a, s, team);
  }
};

struct SeqBody {
  template <class Team>
  void operator()(const SeqArgs& a, int64_t s, Team& team) const {
    sequence_block(a, s, team);
  }
};

}  // namespace
}  // namespace phase_stats
}  // namespace cuda
}  // namespace lk

namespace py = pybind11;

PYBIND11_MODULE(_cuda_phase_stats, m) {
  using namespace lk::cuda;
  using namespace lk::cuda::phase_stats;
  m.doc() = "lenkernels CUDA kernels: phase-split and per-sequence token statistics (raw device pointers)";
  // std::invalid_argument reaches Python as ValueError, std::runtime_error (CUDA errors) as RuntimeError
  m.def(
      "phase_stats_fwd",
      [](uintptr_t values, int dtype, int64_t n_channels, int64_t channel_stride, uintptr_t ids, int id_bytes,
         uintptr_t valid, int64_t n_tokens, uintptr_t cu_seqlens, int64_t n_seq, uintptr_t delim, int64_t delim_len,
         uintptr_t think_mean, uintptr_t think_sum, uintptr_t answer_mean, uintptr_t answer_sum, uintptr_t think_count,
         uintptr_t answer_count, uintptr_t k, uintptr_t found, int device, uintptr_t stream) {
        check_dtype(dtype);
        if (id_bytes != 4 && id_bytes != 8) throw std::invalid_argument("ids must be int32 or int64");
        if (n_channels < 0 || delim_len < 0) throw std::invalid_argument("n_channels and delim_len must be >= 0");
        const FwdArgs a{reinterpret_cast<const void*>(values), dtype, n_channels, channel_stride,
                        reinterpret_cast<const void*>(ids), id_bytes, ptr<const uint8_t>(valid), n_tokens,
                        ptr<const int64_t>(cu_seqlens), n_seq, ptr<const int64_t>(delim), delim_len,
                        ptr<float>(think_mean), ptr<float>(think_sum), ptr<float>(answer_mean), ptr<float>(answer_sum),
                        ptr<int64_t>(think_count), ptr<int64_t>(answer_count), ptr<int64_t>(k), ptr<uint8_t>(found)};
        py::gil_scoped_release release;  // a launch can block while the device queue is full
        launch(phase_stats_fwd_kernel, a, n_seq, FwdBody{}, device, stream, "launching phase_stats_fwd_kernel");
      },
      py::arg("values"), py::arg("dtype"), py::arg("n_channels"), py::arg("channel_stride"), py::arg("ids"),
      py::arg("id_bytes"), py::arg("valid"), py::arg("n_tokens"), py::arg("cu_seqlens"), py::arg("n_seq"),
      py::arg("delim"), py::arg("delim_len"), py::arg("think_mean"), py::arg("think_sum"), py::arg("answer_mean"),
      py::arg("answer_sum"), py::arg("think_count"), py::arg("answer_count"), py::arg("k"), py::arg("found"),
      py::arg("device"), py::arg("stream"),
      "Writes the think/answer means and sums ([C, S] fp32), counts and delimiter positions ([S] int64) and "
      "found ([S] uint8).");
  m.def(
      "phase_stats_bwd",
      [](uintptr_t valid, int64_t n_tokens, uintptr_t cu_seqlens, int64_t n_seq, uintptr_t k, uintptr_t think_count,
         uintptr_t answer_count, int64_t delim_len, uintptr_t g_think_mean, uintptr_t g_think_sum,
         uintptr_t g_answer_mean, uintptr_t g_answer_sum, uintptr_t dvalues, int dtype, int64_t n_channels,
         int64_t channel_stride, int device, uintptr_t stream) {
        check_dtype(dtype);
        const BwdArgs a{ptr<const uint8_t>(valid),       n_tokens,
                        ptr<const int64_t>(cu_seqlens),  n_seq,
                        ptr<const int64_t>(k),           ptr<const int64_t>(think_count),
                        ptr<const int64_t>(answer_count), delim_len,
                        ptr<const float>(g_think_mean),  ptr<const float>(g_think_sum),
                        ptr<const float>(g_answer_mean), ptr<const float>(g_answer_sum),
                        reinterpret_cast<void*>(dvalues), dtype,
                        n_channels,                      channel_stride};
        py::gil_scoped_release release;
        launch(phase_stats_bwd_kernel, a, n_seq, BwdBody{}, device, stream, "launching phase_stats_bwd_kernel");
      },
      py::arg("valid"), py::arg("n_tokens"), py::arg("cu_seqlens"), py::arg("n_seq"), py::arg("k"),
      py::arg("think_count"), py::arg("answer_count"), py::arg("delim_len"), py::arg("g_think_mean"),
      py::arg("g_think_sum"), py::arg("g_answer_mean"), py::arg("g_answer_sum"), py::arg("dvalues"), py::arg("dtype"),
      py::arg("n_channels"), py::arg("channel_stride"), py::arg("device"), py::arg("stream"),
      "Writes dvalues ([C, N], values dtype) for every token of every sequence.");
  m.def(
      "sequence_stats_fwd",
      [](uintptr_t values, int dtype, uintptr_t valid, int64_t n_tokens, uintptr_t cu_seqlens, int64_t n_seq,
         float threshold, uintptr_t quantile, uintptr_t length, uintptr_t mean, uintptr_t min, uintptr_t max,
         uintptr_t frac_above, uintptr_t high, int device, uintptr_t stream) {
        check_dtype(dtype);
        if ((quantile == 0) != (high == 0)) throw std::invalid_argument("quantile and high come together");
        const SeqArgs a{reinterpret_cast<const void*>(values),
                        dtype,
                        ptr<const uint8_t>(valid),
                        n_tokens,
                        ptr<const int64_t>(cu_seqlens),
                        n_seq,
                        threshold,
                        ptr<const float>(quantile),
                        ptr<int64_t>(length),
                        ptr<float>(mean),
                        ptr<float>(min),
                        ptr<float>(max),
                        ptr<float>(frac_above),
                        ptr<uint8_t>(high)};
        py::gil_scoped_release release;
        launch(sequence_stats_fwd_kernel, a, n_seq, SeqBody{}, device, stream, "launching sequence_stats_fwd_kernel");
      },
      py::arg("values"), py::arg("dtype"), py::arg("valid"), py::arg("n_tokens"), py::arg("cu_seqlens"),
      py::arg("n_seq"), py::arg("threshold"), py::arg("quantile"), py::arg("length"), py::arg("mean"), py::arg("min"),
      py::arg("max"), py::arg("frac_above"), py::arg("high"), py::arg("device"), py::arg("stream"),
      "Writes length ([S] int64), mean/min/max/frac_above ([S] fp32) and, with a quantile, high ([N] uint8).");
  m.attr("SOURCE_HASH") = LK_SOURCE_HASH;
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("BLOCK_THREADS") = kThreads;
}
