// Group advantages (SPEC 4) and per-group statistics on the GPU, CUDA C++ backend.
//   advantages_row_sums_kernel   one block per response: sums of token rewards and of the mask
//   group_advantages_kernel      one warp per group (grid-stride over the device's group count)
//   gaussian_rank_kernel         one warp per run of tied scores
//   batch_moments_kernel         one block: (shift, scale) of batch / reinforce_pp_baseline
//   advantages_broadcast_kernel  one block per response row (or elementwise without a mask)
//   group_stats_kernel           one warp per group, every column
// What the teams compute is in advantages.h; the maths in lenkernels/advantages.h, shared with the
// CPU backend. Raw device pointers, sizes and the stream come from Python
// (lenkernels/cuda/advantages.py): no torch headers. device -1 runs the same bodies on the host
// (team.h). Method and dtype codes are checked before any launch.
#include <pybind11/pybind11.h>

#include <climits>
#include <optional>

#include "advantages.h"
#include "cuda_utils.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace advantages {
namespace {

constexpr int kWarpThreads = kWarpsPerBlock * kWarpSize;

__global__ void __launch_bounds__(kThreads) advantages_row_sums_kernel(const RowSumArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  row_sums_block(a, blockIdx.x, gridDim.x, team);
}

// One warp per group (run): warp w of block b takes item b * kWarpsPerBlock + w.
__device__ __forceinline__ int64_t global_warp() { return int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; }

__global__ void __launch_bounds__(kWarpThreads) group_advantages_kernel(const GroupArgs a) {
  WarpTeam team;
  group_warp(a, global_warp(), team);
}

__global__ void __launch_bounds__(kWarpThreads) gaussian_rank_kernel(const RunArgs a) {
  WarpTeam team;
  gaussian_warp(a, global_warp(), team);
}

__global__ void __launch_bounds__(kThreads) batch_moments_kernel(const MomentArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  moments_block(a, team);
}

__global__ void __launch_bounds__(kThreads) advantages_broadcast_kernel(const BroadcastArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  broadcast_block(a, blockIdx.x, gridDim.x, team);
}

__global__ void __launch_bounds__(kWarpThreads) group_stats_kernel(const StatArgs a) {
  WarpTeam team;
  group_stats_warp(a, global_warp(), team);
}

void row_sums(const RowSumArgs& a, int64_t sm_count, int device, cudaStream_t stream) {
  if (a.n <= 0 || (a.x == nullptr && a.m == nullptr)) return;
  const int64_t blocks = grid_for(a.n, 1, sm_count * 4);
  if (device < 0) {
    emulate<kThreads>(blocks, [&](int64_t i, auto& team) { row_sums_block(a, i, blocks, team); });
    return;
  }
  advantages_row_sums_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "launching advantages_row_sums_kernel");
}

// Launches a warp kernel with one warp for each of up to `bound` items (groups, runs: the device
// holds the actual count), or emulates those warps one after the other.
template <class Args, class Body>
void warp_launch(void (*kernel)(Args), const Args& a, const Body& body, int64_t bound, int device,
                 cudaStream_t stream, const char* name) {
  const int64_t blocks = div_up(bound > 0 ? bound : 1, kWarpsPerBlock);
  if (blocks > INT_MAX) throw std::invalid_argument("too many groups for one launch");
  if (device < 0) {
    emulate<kWarpSize>(blocks * kWarpsPerBlock, [&](int64_t w, auto& team) { body(a, w, team); });
    return;
  }
  kernel<<<unsigned(blocks), kWarpThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), name);
}

struct GroupBody {
  template <class Team>
  void operator()(const GroupArgs& a, int64_t g, Team& team) const {
    group_warp(a, g, team);
  }
};

struct GaussianBody {
  template <class Team>
  void operator()(const RunArgs& a, int64_t r, Team& team) const {
    gaussian_warp(a, r, team);
  }
};

struct StatsBody {
  template <class Team>
  void operator()(const StatArgs& a, int64_t g, Team& team) const {
    group_stats_warp(a, g, team);
  }
};

// The launch's device, current for the call (nothing to do for the host emulation, device -1).
struct LaunchDevice {
  explicit LaunchDevice(int device) {
    if (device >= 0) guard.emplace(device);
  }
  std::optional<DeviceGuard> guard;
};

void check_n(int64_t n) {
  if (n < 0) throw std::invalid_argument("the batch size must be non-negative");
}

// Codes from Python (lenkernels/_codes.py) are checked before any launch: an unknown one raises
// instead of running as some default.
void check_method(int method) {
  if (!known_method(method)) throw std::invalid_argument("unknown advantage method code " + std::to_string(method));
}

void check_batch_method(int method) {
  if (!batch_level_method(method)) {
    throw std::invalid_argument("the batch-level step is that of batch or reinforce_pp_baseline, got method code " +
                                std::to_string(method));
  }
}

void check_dtype(int code, const char* name) {
  if (!known_dtype(code)) {
    throw std::invalid_argument(std::string("unknown ") + name + " dtype code " + std::to_string(code));
  }
}

// Only where the tensor is given (its pointer non-null).
void check_weight(uintptr_t p, int code, const char* name) {
  if (p && !known_weight(code)) {
    throw std::invalid_argument(std::string("unknown ") + name + " dtype code " + std::to_string(code));
  }
}

Groups groups_of(uintptr_t perm, uintptr_t offsets, uintptr_t n_groups, int64_t group_size) {
  if (n_groups == 0) throw std::invalid_argument("n_groups (a device scalar) is required");
  if ((perm == 0) != (offsets == 0)) throw std::invalid_argument("perm and offsets come together");
  if (perm == 0 && group_size < 1) throw std::invalid_argument("contiguous groups need group_size >= 1");
  return Groups{ptr<const int64_t>(perm), ptr<const int64_t>(offsets), ptr<const int64_t>(n_groups), group_size};
}

}  // namespace
}  // namespace advantages
}  // namespace cuda
}  // namespace lk

namespace py = pybind11;

PYBIND11_MODULE(_cuda_advantages, m) {
  using namespace lk::cuda;
  using namespace lk::cuda::advantages;
  m.doc() = "lenkernels CUDA kernels: group advantages and per-group statistics (raw device pointers)";
  // std::invalid_argument reaches Python as ValueError, std::runtime_error (CUDA errors) as RuntimeError
  m.def(
      "group_advantages",
      [](uintptr_t rewards, int r_dtype, int64_t n, int64_t T, int64_t stride_r, uintptr_t mask, int m_dtype,
         int64_t Tm, int64_t stride_m, uintptr_t lengths, int l_dtype, uintptr_t perm, uintptr_t offsets,
         uintptr_t n_groups, int64_t group_size, int64_t bound, int method, float eps, bool norm, float ddof,
         uintptr_t adv, uintptr_t raw, uintptr_t w_out, uintptr_t score_buf, uintptr_t len_buf, int64_t sm_count,
         int device, uintptr_t stream) {
        check_n(n);
        check_dtype(r_dtype, "rewards");
        check_weight(mask, m_dtype, "mask");
        check_weight(lengths, l_dtype, "lengths");
        check_method(method);
        if ((T > 0 && score_buf == 0) || (mask != 0 && len_buf == 0)) {
          throw std::invalid_argument("token rewards need score_buf and a mask needs len_buf ([B] fp32 scratch)");
        }
        const Groups groups = groups_of(perm, offsets, n_groups, group_size);
        const RowSumArgs sums{n,      reinterpret_cast<const void*>(T > 0 ? rewards : 0), r_dtype, T, stride_r,
                              ptr<float>(score_buf), reinterpret_cast<const void*>(mask), m_dtype, Tm, stride_m,
                              ptr<float>(len_buf)};
        const GroupArgs a{reinterpret_cast<const void*>(rewards), r_dtype, T, ptr<const float>(score_buf),
                          mask ? ptr<const float>(len_buf) : nullptr, reinterpret_cast<const void*>(lengths), l_dtype,
                          groups, method, eps, norm, ddof, ptr<float>(adv), ptr<float>(raw), ptr<float>(w_out)};
        py::gil_scoped_release release;
        const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
        if (n == 0) return;
        LaunchDevice on(device);
        row_sums(sums, sm_count, device, s);
        warp_launch(group_advantages_kernel, a, GroupBody{}, bound, device, s,
                    "launching group_advantages_kernel");
      },
      py::arg("rewards"), py::arg("r_dtype"), py::arg("n"), py::arg("T"), py::arg("stride_r"), py::arg("mask"),
      py::arg("m_dtype"), py::arg("Tm"), py::arg("stride_m"), py::arg("lengths"), py::arg("l_dtype"), py::arg("perm"),
      py::arg("offsets"), py::arg("n_groups"), py::arg("group_size"), py::arg("bound"), py::arg("method"),
      py::arg("eps"), py::arg("norm"), py::arg("ddof"), py::arg("adv"), py::arg("raw"), py::arg("w_out"),
      py::arg("score_buf"), py::arg("len_buf"), py::arg("sm_count"), py::arg("device"), py::arg("stream"),
      "Writes adv[B] (and raw scores / lengths when raw / w_out != 0) in response order.");
  m.def(
      "gaussian_rank",
      [](uintptr_t keys, int64_t n, uintptr_t perm, uintptr_t group_of, uintptr_t group_offsets, uintptr_t run_offsets,
         uintptr_t n_runs, uintptr_t adv, int64_t sm_count, int device, uintptr_t stream) {
        check_n(n);
        const RunArgs a{ptr<const float>(keys),          ptr<const int64_t>(perm),        ptr<const int64_t>(group_of),
                        ptr<const int64_t>(group_offsets), ptr<const int64_t>(run_offsets), ptr<const int64_t>(n_runs),
                        ptr<float>(adv)};
        py::gil_scoped_release release;
        if (n == 0) return;
        LaunchDevice on(device);
        warp_launch(gaussian_rank_kernel, a, GaussianBody{}, n, device,
                    reinterpret_cast<cudaStream_t>(stream), "launching gaussian_rank_kernel");
      },
      py::arg("keys"), py::arg("n"), py::arg("perm"), py::arg("group_of"), py::arg("group_offsets"),
      py::arg("run_offsets"), py::arg("n_runs"), py::arg("adv"), py::arg("sm_count"), py::arg("device"),
      py::arg("stream"), "Writes adv[B]: the mean normal score of each run of tied scores, response order.");
  m.def(
      "batch_shift_scale",
      [](uintptr_t x, int64_t n, uintptr_t w, int w_dtype, int method, float eps, uintptr_t stats, int device,
         uintptr_t stream) {
        check_n(n);
        check_weight(w, w_dtype, "weights");
        check_batch_method(method);
        const MomentArgs a{ptr<const float>(x), n, reinterpret_cast<const void*>(w), w_dtype, method, eps,
                           ptr<float>(stats)};
        py::gil_scoped_release release;
        if (device < 0) {
          emulate<kThreads>(1, [&](int64_t, auto& team) { moments_block(a, team); });
          return;
        }
        DeviceGuard guard(device);
        batch_moments_kernel<<<1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
        check_cuda(cudaGetLastError(), "launching batch_moments_kernel");
      },
      py::arg("x"), py::arg("n"), py::arg("w"), py::arg("w_dtype"), py::arg("method"), py::arg("eps"),
      py::arg("stats"), py::arg("device"), py::arg("stream"), "Writes stats[2] = (shift, scale).");
  m.def(
      "broadcast",
      [](uintptr_t adv, int64_t n, uintptr_t stats, uintptr_t mask, int m_dtype, int64_t T, int64_t stride_m,
         uintptr_t out, int64_t stride_o, int64_t sm_count, int device, uintptr_t stream) {
        check_n(n);
        check_weight(mask, m_dtype, "mask");
        const BroadcastArgs a{ptr<const float>(adv), n, ptr<const float>(stats), reinterpret_cast<const void*>(mask),
                              m_dtype, T, stride_m, ptr<float>(out), stride_o};
        const int64_t blocks = mask ? grid_for(n, 1, sm_count * 4) : grid_for(n, kThreads, sm_count);
        py::gil_scoped_release release;
        if (n == 0) return;
        if (device < 0) {
          emulate<kThreads>(blocks, [&](int64_t i, auto& team) { broadcast_block(a, i, blocks, team); });
          return;
        }
        DeviceGuard guard(device);
        advantages_broadcast_kernel<<<unsigned(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
        check_cuda(cudaGetLastError(), "launching advantages_broadcast_kernel");
      },
      py::arg("adv"), py::arg("n"), py::arg("stats"), py::arg("mask"), py::arg("m_dtype"), py::arg("T"),
      py::arg("stride_m"), py::arg("out"), py::arg("stride_o"), py::arg("sm_count"), py::arg("device"),
      py::arg("stream"), "Writes out = (adv - shift) * scale, times the mask row when given (masked: 0).");
  m.def(
      "group_stats",
      [](uintptr_t values, int64_t n, int64_t c_in, int64_t c_out, uintptr_t where, uintptr_t mask, int m_dtype,
         int64_t T, int64_t stride_m, uintptr_t perm, uintptr_t offsets, uintptr_t n_groups, int64_t group_size,
         int64_t bound, uintptr_t stats, uintptr_t lengths, int64_t sm_count, int device, uintptr_t stream) {
        check_n(n);
        check_weight(mask, m_dtype, "mask");
        if (c_out != c_in + (mask ? 1 : 0)) throw std::invalid_argument("c_out must be c_in (+ 1 with a mask)");
        if (mask && lengths == 0) throw std::invalid_argument("a mask needs the lengths output");
        const Groups groups = groups_of(perm, offsets, n_groups, group_size);
        const RowSumArgs sums{n, nullptr, 0, 0, 0, nullptr, reinterpret_cast<const void*>(mask), m_dtype, T, stride_m,
                              ptr<float>(lengths)};
        const StatArgs a{ptr<const float>(values), n,      c_in, c_out, ptr<const float>(where),
                         ptr<const float>(lengths), groups, ptr<float>(stats)};
        py::gil_scoped_release release;
        const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
        if (n == 0) return;
        LaunchDevice on(device);
        row_sums(sums, sm_count, device, s);
        warp_launch(group_stats_kernel, a, StatsBody{}, bound, device, s, "launching group_stats_kernel");
      },
      py::arg("values"), py::arg("n"), py::arg("c_in"), py::arg("c_out"), py::arg("where"), py::arg("mask"),
      py::arg("m_dtype"), py::arg("T"), py::arg("stride_m"), py::arg("perm"), py::arg("offsets"), py::arg("n_groups"),
      py::arg("group_size"), py::arg("bound"), py::arg("stats"), py::arg("lengths"), py::arg("sm_count"),
      py::arg("device"), py::arg("stream"),
      "Writes stats[B, c_out, 6] (count, sum, mean, std, min, max per response and column) and lengths[B].");
  m.attr("SOURCE_HASH") = LK_SOURCE_HASH;
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("BLOCK_THREADS") = kThreads;
}
