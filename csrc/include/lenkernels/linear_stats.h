// Merging the statistics of vocabulary ranges (chunks of an LM head, tensor-parallel shards) into
// those of the whole vocabulary: linear_logprobs_entropy and the vocab-parallel ops.
// A finished range is summarised by (lse_r, H_r), i.e. the state (m, S, U) = (lse_r, 1, -H_r);
// states merge with softmax_state.h's merge(), so a range's statistics and a kernel's running
// state combine with the same maths (lenkernels/distributed.py is the torch twin of this file).
#pragma once

#include <cstdint>

#include "lenkernels/softmax_state.h"

namespace lk {

// Shard-local target ids (lenkernels/distributed.py): kIgnoredId marks an ignored row (logprob
// 0), kElsewhereId a row whose target is not in this shard; ids >= 0 are columns of the shard.
constexpr int64_t kIgnoredId = -1;
constexpr int64_t kElsewhereId = -2;

// A fully masked range (lse = -inf) contributes nothing; it would otherwise merge as
// exp(-inf) * (-inf) = NaN.  A NaN lse stays NaN and poisons the merged row.
LK_HOST_DEVICE SoftmaxState state_from_stats(float lse, float entropy) {
  return lse == kNegInf ? empty_state() : SoftmaxState{lse, 1.0f, -entropy};
}

// Logprob of a row from its merged lse and its target logit z_y (already divided by T).
LK_HOST_DEVICE float target_logprob(int64_t local_id, float z_y, float lse) {
  if (local_id == kIgnoredId) return 0.0f;
  return local_id >= 0 ? z_y - lse : __builtin_nanf("");
}

}  // namespace lk
