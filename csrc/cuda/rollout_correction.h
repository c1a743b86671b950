// Rollout correction (SPEC 8) on the GPU: what each block of the kernels in rollout_correction.cu
// computes. The maths (weights, truncation, rejection, veto, the sums of the metrics and their
// merge) is lenkernels/rollout_correction.h, shared with the CPU backend; the bodies are templates
// over a Team (team.h), so the host emulation runs them as is.
//
//   forward    one block per sequence [start, end) of the flat [N] layout: the scan (Σ δ, response
//              tokens, veto) when the level or a veto needs it, one block reduction, the sequence's
//              decision; then every token's weight and kept flag, and one block reduction of the
//              sums of the metrics into the sequence's fp32 and int64 rows
//   finalize   one block: the rows merged (thread-strided, then one block reduction) into the metrics
// Threads stride over the sequence (coalesced); reductions in a fixed order: no atomics.
#pragma once

#include "lenkernels/rollout_correction.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace rollout_correction {

constexpr int kThreads = 256;

struct FwdArgs {
  const void* old;  // [N] float32/bfloat16/float16 (old_dtype)
  int old_dtype;
  const void* rollout;  // [N] (rollout_dtype)
  int rollout_dtype;
  const uint8_t* valid;  // [N] 1 = response token
  int64_t n_tokens;
  const int64_t* cu_seqlens;  // [S + 1]
  int64_t n_seq;
  rollout::Params p;
  float* weights;   // [N] out
  uint8_t* keep;    // [N] out
  float* part;      // [S, kNumCorrectionPartials] out
  int64_t* count;   // [S, kNumCorrectionCounts] out
};

struct ScanOp {
  LK_HOST_DEVICE rollout::Scan operator()(const rollout::Scan& a, const rollout::Scan& b) const {
    return rollout::scan_merge(a, b);
  }
};

struct SumsOp {
  LK_HOST_DEVICE rollout::Sums operator()(const rollout::Sums& a, const rollout::Sums& b) const {
    return rollout::sums_merge(a, b);
  }
};

LK_HOST_DEVICE float delta_at(const FwdArgs& a, int64_t t) {
  return load_float(a.old, a.old_dtype, t) - load_float(a.rollout, a.rollout_dtype, t);
}

template <class Team>
LK_HOST_DEVICE void fwd_block(const FwdArgs& a, int64_t seq, Team& team) {
  int64_t start, end;
  rollout::sequence_span(a.cu_seqlens, seq, a.n_tokens, &start, &end);
  rollout::SeqDecision decision{1.0f, 0};
  if (rollout::needs_scan(a.p)) {  // uniform: every thread reaches the reduction
    rollout::Scan scan = rollout::scan_empty();
    for (int64_t t = start + team.rank(); t < end; t += Team::kSize) {
      if (a.valid[t]) rollout::scan_add(&scan, a.p, delta_at(a, t));
    }
    scan = team.all_reduce(scan, ScanOp{}, rollout::scan_empty());
    decision = rollout::decide_sequence(a.p, scan);
  }
  rollout::Sums sums = rollout::sums_empty();
  for (int64_t t = start + team.rank(); t < end; t += Team::kSize) {
    if (!a.valid[t]) {  // not a response token: weight 1, its values never read (NaN there stays out)
      a.weights[t] = 1.0f;
      a.keep[t] = 0;
      continue;
    }
    const float delta = delta_at(a, t);
    const rollout::TokenResult r = rollout::correct_token(a.p, decision, delta);
    a.weights[t] = r.weight;
    a.keep[t] = r.kept ? 1 : 0;
    rollout::sums_add(&sums, delta, r);
  }
  sums = team.all_reduce(sums, SumsOp{}, rollout::sums_empty());
  if (team.rank() == 0) {
    rollout::sums_close_sequence(&sums);
    rollout::store_sums(sums, a.part + seq * rollout::kNumCorrectionPartials,
                        a.count + seq * rollout::kNumCorrectionCounts);
  }
}

struct FinalizeArgs {
  const float* part;     // [S, kNumCorrectionPartials]
  const int64_t* count;  // [S, kNumCorrectionCounts]
  int64_t n_seq;
  float* stats;  // [kNumCorrectionStats] out
};

template <class Team>
LK_HOST_DEVICE void finalize_block(const FinalizeArgs& a, Team& team) {
  rollout::Sums sums = rollout::sums_empty();
  for (int64_t r = team.rank(); r < a.n_seq; r += Team::kSize) {
    sums = rollout::sums_merge(sums, rollout::load_sums(a.part + r * rollout::kNumCorrectionPartials,
                                                        a.count + r * rollout::kNumCorrectionCounts));
  }
  sums = team.all_reduce(sums, SumsOp{}, rollout::sums_empty());
  if (team.rank() == 0) rollout::finalize_stats(sums, a.stats);
}

}  // namespace rollout_correction
}  // namespace cuda
}  // namespace lk
