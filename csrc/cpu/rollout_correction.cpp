// Rollout correction (SPEC 8) on the CPU.
//   rollout_correction_fwd: per sequence, the scan (Σ δ, response tokens, veto) when the level or a
//                           veto needs it, then every token's weight and kept flag and the sums of
//                           the metrics; the sequences' sums merged pairwise in sequence order into
//                           the metrics vector (CorrectionStat layout)
// Sequences are independent and each is reduced by one thread in a fixed order (kLanes
// accumulators, pairwise lane reduction), so results do not depend on the thread count. The maths
// is lenkernels/rollout_correction.h, shared with the CUDA backend.
#include <string>
#include <vector>

#include "cpu_utils.h"
#include "lenkernels/rollout_correction.h"

namespace lk {
namespace cpu {
namespace {

using rollout::Params;
using rollout::Scan;
using rollout::SeqDecision;
using rollout::Sums;
using rollout::TokenResult;

// One element of a float32/bfloat16/float16 input (the code is uniform: a predictable branch).
LK_ALWAYS_INLINE float load_any(const void* base, int dtype, int64_t i) {
  if (dtype == kBFloat16) return to_float(static_cast<const bf16*>(base)[i]);
  if (dtype == kFloat16) return to_float(static_cast<const fp16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

struct FwdArgs {
  const void* old;  // [N]
  int old_dtype;
  const void* rollout;  // [N]
  int rollout_dtype;
  const uint8_t* valid;  // [N] 1 = response token
  int64_t n_tokens;
  const int64_t* cu_seqlens;  // [S + 1]
  int64_t n_seq;
  Params p;
  float* weights;  // [N] out
  uint8_t* keep;   // [N] out
  float* stats;    // [kNumCorrectionStats] out
  int threads;
};

LK_ALWAYS_INLINE float delta_at(const FwdArgs& a, int64_t t) {
  return load_any(a.old, a.old_dtype, t) - load_any(a.rollout, a.rollout_dtype, t);
}

// Pairwise merge of kLanes partial values into lanes[0].
template <class T, class Merge>
LK_ALWAYS_INLINE T merge_lanes(T* lanes, Merge merge) {
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) lanes[k] = merge(lanes[k], lanes[k + w]);
  }
  return lanes[0];
}

Sums correct_sequence(const FwdArgs& a, int64_t start, int64_t end) {
  SeqDecision seq{1.0f, 0};
  if (rollout::needs_scan(a.p)) {
    Scan lanes[kLanes];
    for (int k = 0; k < kLanes; ++k) lanes[k] = rollout::scan_empty();
    for (int64_t t = start; t < end; ++t) {
      if (a.valid[t]) rollout::scan_add(&lanes[(t - start) % kLanes], a.p, delta_at(a, t));
    }
    seq = rollout::decide_sequence(a.p, merge_lanes(lanes, rollout::scan_merge));
  }
  Sums lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = rollout::sums_empty();
  for (int64_t t = start; t < end; ++t) {
    if (!a.valid[t]) {  // not a response token: weight 1, never read (NaN there stays out)
      a.weights[t] = 1.0f;
      a.keep[t] = 0;
      continue;
    }
    const float delta = delta_at(a, t);
    const TokenResult r = rollout::correct_token(a.p, seq, delta);
    a.weights[t] = r.weight;
    a.keep[t] = r.kept ? 1 : 0;
    rollout::sums_add(&lanes[(t - start) % kLanes], delta, r);
  }
  Sums out = merge_lanes(lanes, rollout::sums_merge);
  rollout::sums_close_sequence(&out);
  return out;
}

void forward(const FwdArgs& a) {
  std::vector<Sums> seqs(size_t(a.n_seq > 0 ? a.n_seq : 0), rollout::sums_empty());
#pragma omp parallel for schedule(dynamic, 8) num_threads(a.threads)
  for (int64_t s = 0; s < a.n_seq; ++s) {
    int64_t start, end;
    rollout::sequence_span(a.cu_seqlens, s, a.n_tokens, &start, &end);
    seqs[size_t(s)] = correct_sequence(a, start, end);
  }
  // pairwise over the sequences in their order: fixed, whatever the thread count
  const size_t n = seqs.size();
  for (size_t w = 1; w < n; w *= 2) {
    for (size_t i = 0; i + w < n; i += 2 * w) seqs[i] = rollout::sums_merge(seqs[i], seqs[i + w]);
  }
  rollout::finalize_stats(n > 0 ? seqs[0] : rollout::sums_empty(), a.stats);
}

void define(py::module_& m) {
  def(m, "rollout_correction_fwd",
      "old old_dtype rollout rollout_dtype valid n_tokens cu_seqlens n_seq level mode lo hi log_clamp "
      "has_veto veto_lo veto_hi weights keep stats threads",
      [](Addr old, int old_dtype, Addr rollout, int rollout_dtype, Addr valid, int64_t n_tokens, Addr cu_seqlens,
         int64_t n_seq, int level, int mode, float lo, float hi, float log_clamp, bool has_veto, float veto_lo,
         float veto_hi, Addr weights, Addr keep, Addr stats, int threads) {
        check(rollout::invalid_args(old_dtype, rollout_dtype, level, mode));  // before any work
        const Params p{level, mode, lo, hi, log_clamp, has_veto ? 1 : 0, veto_lo, veto_hi};
        forward(FwdArgs{old, old_dtype, rollout, rollout_dtype, valid, n_tokens, cu_seqlens, n_seq, p, weights, keep,
                        stats, threads_for(threads)});
      },
      LK_NOGIL,
      "Writes weights ([N] fp32) and keep ([N] uint8) for every token of every sequence, and the metrics "
      "([kNumCorrectionStats] fp32, CorrectionStat layout).");
}

}  // namespace
}  // namespace cpu
}  // namespace lk

LK_MODULE(_cpu_rollout_correction,
          "lenkernels CPU kernels: rollout correction weights, masks and metrics (raw pointers)", lk::cpu::define)
