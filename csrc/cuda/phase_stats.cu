// Phase-split statistics (SPEC 6) and per-sequence token statistics on the GPU, CUDA C++ backend.
//   phase_stats_fwd_kernel     grid (S): first delimiter occurrence, think/answer sums and counts
//   phase_stats_bwd_kernel     grid (S): d values of every token of every sequence
//   sequence_stats_fwd_kernel  grid (S): length, mean/min/max, fraction above a threshold, mask
// What a block computes is in phase_stats.h; the maths in lenkernels/phase_stats.h, shared with the
// CPU backend. Raw device pointers, sizes and the stream come from Python
// (lenkernels/cuda/phase_stats.py): no torch headers. device -1 runs the same bodies on the host (team.h).
#include <climits>
#include <string>

#include "cuda_utils.h"
#include "lenkernels/binding.h"
#include "phase_stats.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace phase_stats {
namespace {

LK_BLOCK_KERNEL(phase_stats_fwd_kernel, (kThreads), FwdArgs, fwd_block(a, block, team))
LK_BLOCK_KERNEL(phase_stats_bwd_kernel, (kThreads), BwdArgs, bwd_block(a, block, team))
LK_BLOCK_KERNEL(sequence_stats_fwd_kernel, (kThreads), SeqArgs, sequence_block(a, block, team))

// One block per sequence.
int64_t seq_blocks(int64_t n_seq) {
  require(n_seq >= 0 && n_seq <= INT_MAX, "the sequence count must be in [0, 2^31)");
  return n_seq;
}

void define(py::module_& m) {
  def(m, "phase_stats_fwd",
      "values dtype n_channels channel_stride ids id_bytes valid n_tokens cu_seqlens n_seq delim delim_len "
      "think_mean think_sum answer_mean answer_sum think_count answer_count k found device stream",
      [](Addr values, int dtype, int64_t n_channels, int64_t channel_stride, Addr ids, int id_bytes, Addr valid,
         int64_t n_tokens, Addr cu_seqlens, int64_t n_seq, Addr delim, int64_t delim_len, Addr think_mean,
         Addr think_sum, Addr answer_mean, Addr answer_sum, Addr think_count, Addr answer_count, Addr k, Addr found,
         int device, Addr stream) {
        check_float_dtype(dtype);
        require(id_bytes == 4 || id_bytes == 8, "ids must be int32 or int64");
        require(n_channels >= 0 && delim_len >= 0, "n_channels and delim_len must be >= 0");
        const PhaseFwdArgs seqs{valid, n_tokens, cu_seqlens, n_seq, delim, delim_len, think_mean,
                                think_sum, answer_mean, answer_sum, think_count, answer_count, k, found};
        const FwdArgs a{seqs, values, dtype, n_channels, channel_stride, ids, id_bytes};
        LK_LAUNCH(phase_stats_fwd_kernel, a, seq_blocks(n_seq), device, stream);
      },
      LK_NOGIL,
      "Writes the think/answer means and sums ([C, S] fp32), counts and delimiter positions ([S] int64) and "
      "found ([S] uint8).");
  def(m, "phase_stats_bwd",
      "valid n_tokens cu_seqlens n_seq k think_count answer_count delim_len g_think_mean g_think_sum "
      "g_answer_mean g_answer_sum dvalues dtype n_channels channel_stride device stream",
      [](Addr valid, int64_t n_tokens, Addr cu_seqlens, int64_t n_seq, Addr k, Addr think_count, Addr answer_count,
         int64_t delim_len, Addr g_think_mean, Addr g_think_sum, Addr g_answer_mean, Addr g_answer_sum, Addr dvalues,
         int dtype, int64_t n_channels, int64_t channel_stride, int device, Addr stream) {
        check_float_dtype(dtype);
        const BwdArgs a{valid, n_tokens, cu_seqlens, n_seq, k, think_count,
                        answer_count, delim_len, g_think_mean, g_think_sum, g_answer_mean,
                        g_answer_sum, dvalues, dtype, n_channels, channel_stride};
        LK_LAUNCH(phase_stats_bwd_kernel, a, seq_blocks(n_seq), device, stream);
      },
      LK_NOGIL,
      "Writes dvalues ([C, N], values dtype) for every token of every sequence.");
  def(m, "sequence_stats_fwd",
      "values dtype valid n_tokens cu_seqlens n_seq threshold quantile length mean min max frac_above high "
      "device stream",
      [](Addr values, int dtype, Addr valid, int64_t n_tokens, Addr cu_seqlens, int64_t n_seq, float threshold,
         Addr quantile, Addr length, Addr mean, Addr min, Addr max, Addr frac_above, Addr high, int device,
         Addr stream) {
        check_float_dtype(dtype);
        require(!quantile == !high, "quantile and high come together");
        const SeqArgs a{values, dtype, valid, n_tokens, cu_seqlens, n_seq, threshold,
                        quantile, length, mean, min, max, frac_above, high};
        LK_LAUNCH(sequence_stats_fwd_kernel, a, seq_blocks(n_seq), device, stream);
      },
      LK_NOGIL,
      "Writes length ([S] int64), mean/min/max/frac_above ([S] fp32) and, with a quantile, high ([N] uint8).");
  m.attr("BLOCK_THREADS") = kThreads;
}

}  // namespace
}  // namespace phase_stats
}  // namespace cuda
}  // namespace lk

LK_MODULE(_cuda_phase_stats,
          "lenkernels CUDA kernels: phase-split and per-sequence token statistics (raw device pointers)",
          lk::cuda::phase_stats::define)
