// Rollout correction (SPEC 8), shared by the CPU (g++) and CUDA (nvcc) backends: the importance
// weights between the rollout engine's and the trainer's log-probabilities, their truncation or
// rejection, and the per-sequence partial sums of the metrics.
//
// A sequence is the token range [start, end) of a flat [N] layout (a padded [B, T] batch is the
// packed layout with start = b * T); `valid` marks its response tokens. For each sequence:
//   scan     (sequence levels or a veto only) n = Σ valid, Σ δ over valid tokens, and whether a valid
//            token's own weight falls outside the veto range
//   decide   the sequence weight exp(clamp(Σ δ or Σ δ / n)) and whether the whole sequence is rejected
//   tokens   each valid token's weight, kept flag and truncation flag; the sums of the metrics
// δ = old_logprob - rollout_logprob in fp32; weights exp(clamp(log w, ±log_clamp)) (verl's
// SAFETY_BOUND = 20). NaN is never rejected (every comparison with it is false): it stays in the
// weights and the metrics.
#pragma once

#include <math.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "lenkernels/common.h"
#include "lenkernels/policy_loss.h"  // expm1mx_accurate: verl's k3 without the cancellation near 0

namespace lk {
namespace rollout {

// Codes declared in lenkernels/_codes.py (tests/test_codes.py checks them).
enum CorrectionLevel : int { kToken = 0, kSequence = 1, kGeometric = 2 };
enum CorrectionMode : int { kTruncate = 0, kMask = 1 };
enum CorrectionPartial : int { kPartWeightSum = 0, kPartWeightMin = 1, kPartWeightMax = 2, kPartNegLogRatioSum = 3,
    kPartK3Sum = 4, kNumCorrectionPartials = 8 };
enum CorrectionCount : int { kCountTokens = 0, kCountKept = 1, kCountTruncated = 2, kCountNan = 3, kCountSeqs = 4,
    kCountMaskedSeqs = 5, kNumCorrectionCounts = 8 };
enum CorrectionStat : int { kStatWeightMean = 0, kStatWeightMin = 1, kStatWeightMax = 2, kStatTruncatedFraction = 3,
    kStatMaskedFraction = 4, kStatMaskedSeqFraction = 5, kStatMaskedTokens = 6, kStatKlK1 = 7, kStatKlK3 = 8,
    kNumCorrectionStats = 9 };

// Host-side check of the codes a launch reads: what is wrong, or an empty string. Run before any
// kernel or parallel region, so no branch on a code falls back to a default.
inline std::string invalid_codes(int level, int mode) {
  if (level < kToken || level > kGeometric) {
    return "level must be a lk::rollout::CorrectionLevel code (0..2), got " + std::to_string(level);
  }
  if (mode < kTruncate || mode > kMask) {
    return "mode must be a lk::rollout::CorrectionMode code (0..1), got " + std::to_string(mode);
  }
  return "";
}

// invalid_codes, after the dtype codes of the two logprob inputs.
inline std::string invalid_args(int old_dtype, int rollout_dtype, int level, int mode) {
  for (int dtype : {old_dtype, rollout_dtype}) {
    if (!invalid_dtype(dtype).empty()) return invalid_dtype(dtype);
  }
  return invalid_codes(level, mode);
}

// The scalars of one call (lenkernels/ops/rollout_correction.py CorrectionConfig). lo <= hi; an
// absent bound is 0 (lower) or +inf (upper).
struct Params {
  int level, mode;
  float lo, hi;         // weights outside [lo, hi] are truncated or rejected
  float log_clamp;      // log weights are clamped to [-log_clamp, log_clamp] before exp
  int has_veto;         // a valid token whose own weight is outside [veto_lo, veto_hi] rejects its sequence
  float veto_lo, veto_hi;
};

struct ExpF {
  LK_HOST_DEVICE float operator()(float x) const { return expf(x); }
};

// torch.clamp semantics: NaN passes through.
LK_HOST_DEVICE float clamp_log_weight(float x, float bound) { return x < -bound ? -bound : (x > bound ? bound : x); }

LK_HOST_DEVICE float token_weight(float delta, float log_clamp) { return expf(clamp_log_weight(delta, log_clamp)); }

// Outside [lo, hi]; false for NaN (a NaN weight is kept and propagates).
LK_HOST_DEVICE bool outside(float w, float lo, float hi) { return (w < lo) | (w > hi); }

LK_HOST_DEVICE bool needs_scan(const Params& p) { return p.level != kToken || p.has_veto != 0; }

// Sequence bounds from the offsets, clamped into [0, n_tokens] so a malformed cu_seqlens (validated
// only on CPU or in debug mode) never addresses memory outside the inputs.
LK_HOST_DEVICE void sequence_span(const int64_t* cu_seqlens, int64_t seq, int64_t n_tokens, int64_t* start,
                                  int64_t* end) {
  int64_t s = cu_seqlens[seq], e = cu_seqlens[seq + 1];
  s = s < 0 ? 0 : (s > n_tokens ? n_tokens : s);
  e = e < s ? s : (e > n_tokens ? n_tokens : e);
  *start = s;
  *end = e;
}

// --- the scan of a sequence (sequence levels, veto) --------------------------------------------------

struct Scan {
  float sum_delta;
  int64_t n;       // valid tokens
  int64_t vetoed;  // valid tokens outside the veto range
};

LK_HOST_DEVICE Scan scan_empty() { return Scan{0.0f, 0, 0}; }

LK_HOST_DEVICE void scan_add(Scan* s, const Params& p, float delta) {
  s->sum_delta += delta;
  s->n += 1;
  if (p.has_veto) s->vetoed += outside(token_weight(delta, p.log_clamp), p.veto_lo, p.veto_hi) ? 1 : 0;
}

LK_HOST_DEVICE Scan scan_merge(const Scan& a, const Scan& b) {
  return Scan{a.sum_delta + b.sum_delta, a.n + b.n, a.vetoed + b.vetoed};
}

struct SeqDecision {
  float weight;  // the sequence weight before truncation (sequence levels)
  int reject;    // every valid token of the sequence is rejected
};

LK_HOST_DEVICE SeqDecision decide_sequence(const Params& p, const Scan& s) {
  float log_w = 0.0f;
  if (p.level == kSequence) {
    log_w = s.sum_delta;
  } else if (p.level == kGeometric) {
    log_w = s.n > 0 ? s.sum_delta / float(s.n) : 0.0f;
  }
  const float w = token_weight(log_w, p.log_clamp);
  bool reject = s.vetoed > 0;
  if (p.level != kToken && p.mode == kMask) reject = reject || outside(w, p.lo, p.hi);
  return SeqDecision{w, reject ? 1 : 0};
}

// --- one valid token -----------------------------------------------------------------------------------

struct TokenResult {
  float weight;  // 1 for a rejected token
  bool kept, truncated;
};

LK_HOST_DEVICE TokenResult correct_token(const Params& p, const SeqDecision& seq, float delta) {
  const float raw = p.level == kToken ? token_weight(delta, p.log_clamp) : seq.weight;
  const bool out = outside(raw, p.lo, p.hi);
  if (p.mode == kMask) {
    const bool kept = !(seq.reject || out);
    return TokenResult{kept ? raw : 1.0f, kept, false};
  }
  const float w = raw > p.hi ? p.hi : (raw < p.lo ? p.lo : raw);  // NaN passes
  const bool kept = !seq.reject;
  return TokenResult{kept ? w : 1.0f, kept, kept && out};
}

// --- sums of the metrics ---------------------------------------------------------------------------------

// Weight sums and extrema run over kept tokens (NaN weights counted apart: min/max skip them and
// the finalize turns a count > 0 into NaN); the KL sums over every valid token.
struct Sums {
  float weight_sum, weight_min, weight_max, neg_log_ratio, k3;
  int64_t tokens, kept, truncated, nan, seqs, masked_seqs;
};

LK_HOST_DEVICE Sums sums_empty() {
  const float inf = __builtin_huge_valf();
  return Sums{0.0f, inf, -inf, 0.0f, 0.0f, 0, 0, 0, 0, 0, 0};
}

LK_HOST_DEVICE void sums_add(Sums* s, float delta, const TokenResult& r) {
  s->tokens += 1;
  s->neg_log_ratio += -delta;
  s->k3 += policy::expm1mx_accurate(delta, ExpF{});  // exp(δ) - δ - 1, unclamped (verl compute_offpolicy_metrics)
  if (!r.kept) return;
  s->kept += 1;
  s->truncated += r.truncated ? 1 : 0;
  s->weight_sum += r.weight;
  if (r.weight != r.weight) {
    s->nan += 1;
  } else {
    s->weight_min = r.weight < s->weight_min ? r.weight : s->weight_min;
    s->weight_max = r.weight > s->weight_max ? r.weight : s->weight_max;
  }
}

LK_HOST_DEVICE Sums sums_merge(const Sums& a, const Sums& b) {
  return Sums{a.weight_sum + b.weight_sum,
              b.weight_min < a.weight_min ? b.weight_min : a.weight_min,
              b.weight_max > a.weight_max ? b.weight_max : a.weight_max,
              a.neg_log_ratio + b.neg_log_ratio, a.k3 + b.k3,
              a.tokens + b.tokens, a.kept + b.kept,
              a.truncated + b.truncated, a.nan + b.nan,
              a.seqs + b.seqs, a.masked_seqs + b.masked_seqs};
}

// A sequence's sums once its tokens are in: whether it has response tokens, and any rejected.
LK_HOST_DEVICE void sums_close_sequence(Sums* s) {
  s->seqs = s->tokens > 0 ? 1 : 0;
  s->masked_seqs = s->kept < s->tokens ? 1 : 0;
}

// One sequence's row of the [S, kNumCorrectionPartials] fp32 and [S, kNumCorrectionCounts] int64 buffers.
LK_HOST_DEVICE void store_sums(const Sums& s, float* part, int64_t* count) {
  part[kPartWeightSum] = s.weight_sum;
  part[kPartWeightMin] = s.weight_min;
  part[kPartWeightMax] = s.weight_max;
  part[kPartNegLogRatioSum] = s.neg_log_ratio;
  part[kPartK3Sum] = s.k3;
  for (int j = kPartK3Sum + 1; j < kNumCorrectionPartials; ++j) part[j] = 0.0f;
  count[kCountTokens] = s.tokens;
  count[kCountKept] = s.kept;
  count[kCountTruncated] = s.truncated;
  count[kCountNan] = s.nan;
  count[kCountSeqs] = s.seqs;
  count[kCountMaskedSeqs] = s.masked_seqs;
  for (int j = kCountMaskedSeqs + 1; j < kNumCorrectionCounts; ++j) count[j] = 0;
}

LK_HOST_DEVICE Sums load_sums(const float* part, const int64_t* count) {
  return Sums{part[kPartWeightSum], part[kPartWeightMin],  part[kPartWeightMax],  part[kPartNegLogRatioSum],
              part[kPartK3Sum],     count[kCountTokens],   count[kCountKept],     count[kCountTruncated],
              count[kCountNan],     count[kCountSeqs],     count[kCountMaskedSeqs]};
}

LK_HOST_DEVICE float ratio_or_zero(float num, int64_t den) { return den > 0 ? num / float(den) : 0.0f; }

// The metrics (CorrectionStat layout) from the batch's merged sums. Means over an empty set are 0
// (as TRL reports them); a NaN weight makes the weight statistics NaN.
LK_HOST_DEVICE void finalize_stats(const Sums& s, float* stats) {
  const float nan = __builtin_nanf("");
  const int64_t masked = s.tokens - s.kept;
  stats[kStatWeightMean] = ratio_or_zero(s.weight_sum, s.kept);
  stats[kStatWeightMin] = s.nan > 0 ? nan : (s.kept > 0 ? s.weight_min : 0.0f);
  stats[kStatWeightMax] = s.nan > 0 ? nan : (s.kept > 0 ? s.weight_max : 0.0f);
  stats[kStatTruncatedFraction] = ratio_or_zero(float(s.truncated), s.tokens);
  stats[kStatMaskedFraction] = ratio_or_zero(float(masked), s.tokens);
  stats[kStatMaskedSeqFraction] = ratio_or_zero(float(s.masked_seqs), s.seqs);
  stats[kStatMaskedTokens] = float(masked);
  stats[kStatKlK1] = ratio_or_zero(s.neg_log_ratio, s.tokens);
  stats[kStatKlK3] = ratio_or_zero(s.k3, s.tokens);
}

}  // namespace rollout
}  // namespace lk
