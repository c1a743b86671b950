// Rollout correction (SPEC 8) on the GPU, CUDA C++ backend.
//   rollout_correction_fwd_kernel       grid (S): weights, kept flags and the sums of one sequence
//   rollout_correction_finalize_kernel  grid (1): the sequences' sums merged into the metrics
// What a block computes is in rollout_correction.h; the maths in lenkernels/rollout_correction.h,
// shared with the CPU backend. Raw device pointers, sizes and the stream come from Python
// (lenkernels/cuda/rollout_correction.py): no torch headers. device -1 runs the same bodies on the
// host (team.h).
#include <pybind11/pybind11.h>

#include <climits>
#include <string>

#include "cuda_utils.h"
#include "rollout_correction.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace rollout_correction {
namespace {

__global__ void __launch_bounds__(kThreads) rollout_correction_fwd_kernel(const FwdArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  fwd_block(a, blockIdx.x, team);
}

__global__ void __launch_bounds__(kThreads) rollout_correction_finalize_kernel(const FinalizeArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  finalize_block(a, team);
}

// Unknown codes raise before any launch: load_float would read an unknown dtype as float32.
void check_args(int old_dtype, int rollout_dtype, int level, int mode) {
  for (int dtype : {old_dtype, rollout_dtype}) {
    if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) {
      throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype) + " (lenkernels._codes.DType)");
    }
  }
  const std::string why = rollout::invalid_codes(level, mode);
  if (!why.empty()) throw std::invalid_argument(why);
}

void forward(const FwdArgs& a, const FinalizeArgs& f, int device, uintptr_t stream) {
  if (a.n_seq < 0 || a.n_seq > INT_MAX) throw std::invalid_argument("the sequence count must be in [0, 2^31)");
  if (device < 0) {  // host emulation: the same bodies, one host thread per GPU thread
    emulate<kThreads>(a.n_seq, [&](int64_t s, auto& team) { fwd_block(a, s, team); });
    emulate<kThreads>(1, [&](int64_t, auto& team) { finalize_block(f, team); });
    return;
  }
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  if (a.n_seq > 0) {
    rollout_correction_fwd_kernel<<<unsigned(a.n_seq), kThreads, 0, s>>>(a);
    check_cuda(cudaGetLastError(), "launching rollout_correction_fwd_kernel");
  }
  rollout_correction_finalize_kernel<<<1, kThreads, 0, s>>>(f);
  check_cuda(cudaGetLastError(), "launching rollout_correction_finalize_kernel");
}

}  // namespace
}  // namespace rollout_correction
}  // namespace cuda
}  // namespace lk

namespace py = pybind11;

PYBIND11_MODULE(_cuda_rollout_correction, m) {
  using namespace lk::cuda;
  using namespace lk::cuda::rollout_correction;
  m.doc() = "lenkernels CUDA kernels: rollout correction weights, masks and metrics (raw device pointers)";
  // std::invalid_argument reaches Python as ValueError, std::runtime_error (CUDA errors) as RuntimeError
  m.def(
      "rollout_correction_fwd",
      [](uintptr_t old, int old_dtype, uintptr_t rollout, int rollout_dtype, uintptr_t valid, int64_t n_tokens,
         uintptr_t cu_seqlens, int64_t n_seq, int level, int mode, float lo, float hi, float log_clamp, bool has_veto,
         float veto_lo, float veto_hi, uintptr_t weights, uintptr_t keep, uintptr_t part, uintptr_t count,
         uintptr_t stats, int device, uintptr_t stream) {
        check_args(old_dtype, rollout_dtype, level, mode);
        const lk::rollout::Params p{level, mode, lo, hi, log_clamp, has_veto ? 1 : 0, veto_lo, veto_hi};
        const FwdArgs a{reinterpret_cast<const void*>(old),
                        old_dtype,
                        reinterpret_cast<const void*>(rollout),
                        rollout_dtype,
                        ptr<const uint8_t>(valid),
                        n_tokens,
                        ptr<const int64_t>(cu_seqlens),
                        n_seq,
                        p,
                        ptr<float>(weights),
                        ptr<uint8_t>(keep),
                        ptr<float>(part),
                        ptr<int64_t>(count)};
        const FinalizeArgs f{ptr<const float>(part), ptr<const int64_t>(count), n_seq, ptr<float>(stats)};
        py::gil_scoped_release release;  // a launch can block while the device queue is full
        forward(a, f, device, stream);
      },
      py::arg("old"), py::arg("old_dtype"), py::arg("rollout"), py::arg("rollout_dtype"), py::arg("valid"),
      py::arg("n_tokens"), py::arg("cu_seqlens"), py::arg("n_seq"), py::arg("level"), py::arg("mode"), py::arg("lo"),
      py::arg("hi"), py::arg("log_clamp"), py::arg("has_veto"), py::arg("veto_lo"), py::arg("veto_hi"),
      py::arg("weights"), py::arg("keep"), py::arg("part"), py::arg("count"), py::arg("stats"), py::arg("device"),
      py::arg("stream"),
      "Writes weights ([N] fp32) and keep ([N] uint8) for every token of every sequence, the sequences' sums "
      "(part [S, 8] fp32, count [S, 8] int64) and the metrics ([9] fp32, CorrectionStat layout).");
  m.attr("SOURCE_HASH") = LK_SOURCE_HASH;
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("BLOCK_THREADS") = kThreads;
}
