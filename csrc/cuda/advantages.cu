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
#include <climits>

#include "advantages.h"
#include "lenkernels/advantages_args.h"
#include "lenkernels/binding.h"
#include "cuda_utils.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace advantages {
namespace {

constexpr int kWarpThreads = kWarpsPerBlock * kWarpSize;

LK_BLOCK_KERNEL(advantages_row_sums_kernel, (kThreads), RowSumArgs, row_sums_block(a, block, n_blocks, team))
LK_BLOCK_KERNEL(batch_moments_kernel, (kThreads), MomentArgs, moments_block(a, team))
LK_BLOCK_KERNEL(advantages_broadcast_kernel, (kThreads), BroadcastArgs, broadcast_block(a, block, n_blocks, team))

// One warp per group (run): warp w of block b takes item b * kWarpsPerBlock + w.
#define LK_WARP_KERNEL(name, Args, ...)                                                              \
  LK_TEAM_BODY(name, Args, __VA_ARGS__)                                                              \
  __global__ void __launch_bounds__(kWarpThreads) name(const Args a) {                               \
    WarpTeam team;                                                                                   \
    name##_body{}(a, int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize, 0, team);       \
  }

LK_WARP_KERNEL(group_advantages_kernel, GroupArgs, group_warp(a, block, team))
LK_WARP_KERNEL(gaussian_rank_kernel, RunArgs, gaussian_warp(a, block, team))
LK_WARP_KERNEL(group_stats_kernel, StatArgs, group_stats_warp(a, block, team))

void row_sums(const RowSumArgs& a, int64_t sm_count, int device, cudaStream_t stream) {
  if (a.n <= 0 || (a.x == nullptr && a.m == nullptr)) return;
  LK_LAUNCH(advantages_row_sums_kernel, a, grid_for(a.n, 1, sm_count * 4), device, stream);
}

// Launches a warp kernel with one warp for each of up to `bound` items (groups, runs: the device
// holds the actual count), or emulates those warps one after the other.
#define LK_WARP_LAUNCH(kernel, a, bound, device, stream) \
  warp_launch(kernel, kernel##_body{}, a, bound, device, stream, "launching " #kernel)

template <class Args, class Body>
void warp_launch(void (*kernel)(Args), const Body& body, const Args& a, int64_t bound, int device,
                 cudaStream_t stream, const char* name) {
  const int64_t blocks = div_up(bound > 0 ? bound : 1, kWarpsPerBlock);
  require(blocks <= INT_MAX, "too many groups for one launch");
  if (device < 0) {
    emulate<kWarpSize>(blocks * kWarpsPerBlock, [&](int64_t w, auto& team) { body(a, w, 0, team); });
    return;
  }
  DeviceGuard guard(device);
  kernel<<<unsigned(blocks), kWarpThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), name);
}

Groups groups_of(Addr perm, Addr offsets, Addr n_groups, int64_t group_size) {
  require(bool(n_groups), "n_groups (a device scalar) is required");
  require(!perm == !offsets, "perm and offsets come together");
  require(perm || group_size >= 1, "contiguous groups need group_size >= 1");
  return Groups{perm, offsets, n_groups, group_size};
}

void define(py::module_& m) {
  def(m, "group_advantages",
      "rewards r_dtype n T stride_r mask m_dtype Tm stride_m lengths l_dtype perm offsets n_groups "
      "group_size bound method eps norm ddof adv raw w_out score_buf len_buf sm_count device stream",
      [](Addr rewards, int r_dtype, int64_t n, int64_t T, int64_t stride_r, Addr mask, int m_dtype, int64_t Tm,
         int64_t stride_m, Addr lengths, int l_dtype, Addr perm, Addr offsets, Addr n_groups, int64_t group_size,
         int64_t bound, int method, float eps, bool norm, float ddof, Addr adv, Addr raw, Addr w_out, Addr score_buf,
         Addr len_buf, int64_t sm_count, int device, Addr stream) {
        check_n(n);
        check_dtype(r_dtype, "rewards");
        check_weight(mask, m_dtype, "mask");
        check_weight(lengths, l_dtype, "lengths");
        check_method(method);
        require(!(T > 0 && !score_buf) && !(mask && !len_buf),
                "token rewards need score_buf and a mask needs len_buf ([B] fp32 scratch)");
        const Groups groups = groups_of(perm, offsets, n_groups, group_size);
        const void* token_rewards = T > 0 ? static_cast<const void*>(rewards) : nullptr;
        const RowSumArgs sums{n, token_rewards, r_dtype, T, stride_r, score_buf, mask, m_dtype, Tm, stride_m, len_buf};
        const float* lens = mask ? static_cast<const float*>(len_buf) : nullptr;
        const GroupArgs a{rewards, r_dtype, T,      score_buf, lens,     lengths,     l_dtype, groups,
                          method,  eps,     norm,   ddof,      adv,      raw,         w_out};
        if (n == 0) return;
        row_sums(sums, sm_count, device, stream);
        LK_WARP_LAUNCH(group_advantages_kernel, a, bound, device, stream);
      },
      LK_NOGIL,
      "Writes adv[B] (and raw scores / lengths when raw / w_out != 0) in response order.");
  def(m, "gaussian_rank",
      "keys n perm group_of group_offsets run_offsets n_runs adv sm_count device stream",
      [](Addr keys, int64_t n, Addr perm, Addr group_of, Addr group_offsets, Addr run_offsets, Addr n_runs, Addr adv,
         int64_t sm_count, int device, Addr stream) {
        check_n(n);
        const RunArgs a{keys, perm, group_of, group_offsets, run_offsets, n_runs, adv};
        if (n == 0) return;
        LK_WARP_LAUNCH(gaussian_rank_kernel, a, n, device, stream);
      },
      LK_NOGIL, "Writes adv[B]: the mean normal score of each run of tied scores, response order.");
  def(m, "batch_shift_scale",
      "x n w w_dtype method eps stats device stream",
      [](Addr x, int64_t n, Addr w, int w_dtype, int method, float eps, Addr stats, int device, Addr stream) {
        check_n(n);
        check_weight(w, w_dtype, "weights");
        check_batch_method(method);
        LK_LAUNCH(batch_moments_kernel, (MomentArgs{x, n, w, w_dtype, method, eps, stats}), 1, device, stream);
      },
      LK_NOGIL, "Writes stats[2] = (shift, scale).");
  def(m, "broadcast",
      "adv n stats mask m_dtype T stride_m out stride_o sm_count device stream",
      [](Addr adv, int64_t n, Addr stats, Addr mask, int m_dtype, int64_t T, int64_t stride_m, Addr out,
         int64_t stride_o, int64_t sm_count, int device, Addr stream) {
        check_n(n);
        check_weight(mask, m_dtype, "mask");
        const BroadcastArgs a{adv, n, stats, mask, m_dtype, T, stride_m, out, stride_o};
        const int64_t blocks = mask ? grid_for(n, 1, sm_count * 4) : grid_for(n, kThreads, sm_count);
        if (n == 0) return;
        LK_LAUNCH(advantages_broadcast_kernel, a, blocks, device, stream);
      },
      LK_NOGIL, "Writes out = (adv - shift) * scale, times the mask row when given (masked: 0).");
  def(m, "group_stats",
      "values n c_in c_out where mask m_dtype T stride_m perm offsets n_groups group_size bound stats "
      "lengths sm_count device stream",
      [](Addr values, int64_t n, int64_t c_in, int64_t c_out, Addr where, Addr mask, int m_dtype, int64_t T,
         int64_t stride_m, Addr perm, Addr offsets, Addr n_groups, int64_t group_size, int64_t bound, Addr stats,
         Addr lengths, int64_t sm_count, int device, Addr stream) {
        check_n(n);
        check_weight(mask, m_dtype, "mask");
        require(c_out == c_in + (mask ? 1 : 0), "c_out must be c_in (+ 1 with a mask)");
        require(!mask || lengths, "a mask needs the lengths output");
        const Groups groups = groups_of(perm, offsets, n_groups, group_size);
        const RowSumArgs sums{n, nullptr, 0, 0, 0, nullptr, mask, m_dtype, T, stride_m, lengths};
        const StatArgs a{values, n, c_in, c_out, where, lengths, groups, stats};
        if (n == 0) return;
        row_sums(sums, sm_count, device, stream);
        LK_WARP_LAUNCH(group_stats_kernel, a, bound, device, stream);
      },
      LK_NOGIL,
      "Writes stats[B, c_out, 6] (count, sum, mean, std, min, max per response and column) and lengths[B].");
  m.attr("BLOCK_THREADS") = kThreads;
}

}  // namespace
}  // namespace advantages
}  // namespace cuda
}  // namespace lk

LK_MODULE(_cuda_advantages, "lenkernels CUDA kernels: group advantages and per-group statistics (raw device pointers)",
          lk::cuda::advantages::define)
