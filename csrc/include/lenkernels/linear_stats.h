// Merging the statistics of vocabulary ranges (chunks of an LM head, tensor-parallel shards) into
// those of the whole vocabulary: linear_logprobs_entropy and the vocab-parallel ops.
// A finished range is summarised by its max m_r, log S_r and H_r, i.e. the state (m, S, U) =
// (m_r, S_r, S_r (log S_r - H_r)); states merge with softmax_state.h's merge(), so a range's
// statistics and a kernel's running state combine with the same maths (lenkernels/distributed.py
// is the torch twin of this file). Not (lse_r, 1, -H_r): lse_r is rounded at the size of the
// logits, and the merged logprob would inherit that error (~4e-4 at |z| = 1e4).
#pragma once

#include <cstdint>

#include "lenkernels/softmax_state.h"

namespace lk {

// Shard-local target ids (lenkernels/distributed.py): kIgnoredId marks an ignored row (logprob
// 0), kElsewhereId a row whose target is not in this shard; ids >= 0 are columns of the shard.
constexpr int64_t kIgnoredId = -1;
constexpr int64_t kElsewhereId = -2;

// A fully masked range (m = -inf) contributes nothing; it would otherwise merge as
// exp(-inf) * (-inf) = NaN.  A NaN m or log S stays NaN and poisons the merged row.
LK_HOST_DEVICE SoftmaxState state_from_stats(float m, float log_s, float entropy) {
  if (m == kNegInf) return empty_state();
  const float s = expf(log_s);
  return SoftmaxState{m, s, s * (log_s - entropy)};
}

// Logprob of a row from its merged statistics and its target logit z_y (already divided by T).
LK_HOST_DEVICE float target_logprob(int64_t local_id, float z_y, const RowStats& rs) {
  if (local_id == kIgnoredId) return 0.0f;
  return local_id >= 0 ? log_prob(z_y, rs) : __builtin_nanf("");
}

}  // namespace lk
