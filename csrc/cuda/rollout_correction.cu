// Rollout correction (SPEC 8) on the GPU, CUDA C++ backend.
//   rollout_correction_fwd_kernel       grid (S): weights, kept flags and the sums of one sequence
//   rollout_correction_finalize_kernel  grid (1): the sequences' sums merged into the metrics
// What a block computes is in rollout_correction.h; the maths in lenkernels/rollout_correction.h,
// shared with the CPU backend. Raw device pointers, sizes and the stream come from Python
// (lenkernels/cuda/rollout_correction.py): no torch headers. device -1 runs the same bodies on the
// host (team.h).
#include <climits>
#include <string>

#include "cuda_utils.h"
#include "lenkernels/binding.h"
#include "rollout_correction.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace rollout_correction {
namespace {

LK_BLOCK_KERNEL(rollout_correction_fwd_kernel, (kThreads), FwdArgs, fwd_block(a, block, team))
LK_BLOCK_KERNEL(rollout_correction_finalize_kernel, (kThreads), FinalizeArgs, finalize_block(a, team))

void define(py::module_& m) {
  def(m, "rollout_correction_fwd",
      "old old_dtype rollout rollout_dtype valid n_tokens cu_seqlens n_seq level mode lo hi log_clamp "
      "has_veto veto_lo veto_hi weights keep part count stats device stream",
      [](Addr old, int old_dtype, Addr rollout, int rollout_dtype, Addr valid, int64_t n_tokens, Addr cu_seqlens,
         int64_t n_seq, int level, int mode, float lo, float hi, float log_clamp, bool has_veto, float veto_lo,
         float veto_hi, Addr weights, Addr keep, Addr part, Addr count, Addr stats, int device, Addr stream) {
        check(rollout::invalid_args(old_dtype, rollout_dtype, level, mode));  // before any work
        const lk::rollout::Params p{level, mode, lo, hi, log_clamp, has_veto ? 1 : 0, veto_lo, veto_hi};
        const FwdArgs a{old, old_dtype, rollout, rollout_dtype, valid, n_tokens, cu_seqlens, n_seq, p, weights, keep,
                        part, count};
        require(n_seq >= 0 && n_seq <= INT_MAX, "the sequence count must be in [0, 2^31)");
        LK_LAUNCH(rollout_correction_fwd_kernel, a, n_seq, device, stream);
        LK_LAUNCH(rollout_correction_finalize_kernel, (FinalizeArgs{part, count, n_seq, stats}), 1, device, stream);
      },
      LK_NOGIL,
      "Writes weights ([N] fp32) and keep ([N] uint8) for every token of every sequence, the sequences' sums "
      "(part [S, 8] fp32, count [S, 8] int64) and the metrics ([9] fp32, CorrectionStat layout).");
  m.attr("BLOCK_THREADS") = kThreads;
}

}  // namespace
}  // namespace rollout_correction
}  // namespace cuda
}  // namespace lk

LK_MODULE(_cuda_rollout_correction,
          "lenkernels CUDA kernels: rollout correction weights, masks and metrics (raw device pointers)",
          lk::cuda::rollout_correction::define)
