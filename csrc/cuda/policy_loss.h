// Fused policy losses and KL estimators on the GPU (SPEC 2-3): what each block of the kernels in
// policy_loss.cu computes. The per-token maths is lenkernels/policy_loss.h, shared with the CPU
// backend; the bodies are templates over a Team (team.h), so the host emulation runs them as is.
//
// Work is cut per sequence: block (b, split) of grid B * n_splits owns the contiguous token range
// split of sequence b (padded row b, or cu_seqlens[b] .. cu_seqlens[b + 1]), whole multiples of the
// block size, its threads striding over it (coalesced loads of every per-token column, each in its
// own dtype). Sequence sums therefore never need atomics:
//   seq stage       (GSPO/LUSPO/GMPO or a seq-mean aggregation) per-block sums of the valid tokens,
//                   log-ratios, advantages, log-weights and kept tokens -> seq_part[B, n_splits, 8]
//   forward stage   merges sequence b's seq_part left to right (its values, written to seq[B, 4] by
//                   split 0), then every token's loss terms and flags -> part[B * n_splits, 16]
//   finalize stage  one block: the rows of part summed in a fixed order in fp64 -> stats[16]
//   backward stage  d loss / d logprobs and d loss / d entropy of every token, one pass
#pragma once

#include <cmath>

#include "lenkernels/policy_loss.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace policy_loss {

using namespace ::lk::policy;

constexpr int kThreads = 256;           // per block, every stage
constexpr int kBlocksPerSm = 8;         // 2048 resident threads per SM on sm_80 / sm_90
constexpr int kMinBlocksPerSm = 4;      // launch bounds of the token stages: at most 64 registers
constexpr int kMinTokensPerThread = 4;  // a split below this costs more in launch than it saves
constexpr int kPartStride = kNumPartials;
constexpr int kSeqPartStride = kNumSeqPartials;

// Accurate expf on the GPU (a few instructions more than __expf; the CPU uses a ~1 ulp polynomial).
struct Exp {
  LK_HOST_DEVICE float operator()(float x) const { return expf(x); }
};

// One per-token input: element t of sequence b at p[b * rs + start_b + t] (packed: rs = 0).
struct Column {
  const void* p;
  int64_t rs;
  int dtype;
  LK_HOST_DEVICE float at(int64_t b, int64_t start, int64_t t) const { return load_float(p, dtype, b * rs + start + t); }
};

struct Args : PolicyScalars {  // the scalars (pp, agg, kl_coef, ...): parse_policy_scalars
  int64_t n_seqs, seq_len;  // seq_len: padded T (unused when packed)
  const int64_t* cu;        // [B + 1] cu_seqlens: packed layout when set
  Column lp, old, adv, ref, ent, w;  // ref, ent, w: p null when absent; adv per sequence: adv.p[b * adv.rs]
  bool adv_per_token;
  const uint8_t* mask;  // null: every token counts
  int64_t mask_rs;
  const double* thr;  // [1] top-entropy threshold, or null
  const float* norm;  // [1] given normaliser (norm_source == kNormTensor)
  int n_splits;
  float* seq_part;  // [B, n_splits, 8]
  float* part;      // [B * n_splits, 16]
  float* stats;     // [16] (Stat layout)
  float* seq;       // [B, 4] (SeqValue layout)
  // backward
  const float* g_stats;  // [16] cotangent of stats (only the loss is differentiable)
  void* dlp;
  int dlp_dtype;
  int64_t dlp_rs;
  void* dent;  // null: no entropy gradient
  int dent_dtype;
  int64_t dent_rs;

  LK_HOST_DEVICE int64_t start(int64_t b) const { return cu ? cu[b] : 0; }
  LK_HOST_DEVICE int64_t length(int64_t b) const {
    const int64_t len = cu ? cu[b + 1] - cu[b] : seq_len;
    return len > 0 ? len : 0;
  }
  LK_HOST_DEVICE bool valid(int64_t b, int64_t s, int64_t t) const {
    return mask == nullptr || mask[b * mask_rs + s + t] != 0;
  }
  LK_HOST_DEVICE float advantage(int64_t b, int64_t s, int64_t t) const {
    return adv_per_token ? adv.at(b, s, t) : load_float(adv.p, adv.dtype, b * adv.rs);
  }
  LK_HOST_DEVICE bool kept(int64_t b, int64_t s, int64_t t) const {
    return thr == nullptr || double(ent.at(b, s, t)) >= *thr;
  }
};

// Blocks per sequence: 1 when sequences alone fill the GPU, else enough to fill it, each split
// keeping kMinTokensPerThread tokens per thread. A function of (B, mean length, SM count) only.
inline int split_count(int64_t n_seqs, int64_t mean_len, int64_t sm_count) {
  const int64_t target = sm_count * kBlocksPerSm;
  if (n_seqs <= 0 || n_seqs >= target) return 1;
  const int64_t most = mean_len / (int64_t(kThreads) * kMinTokensPerThread);
  const int64_t want = div_up(target, n_seqs);
  const int64_t splits = want < most ? want : most;
  return splits > 1 ? int(splits) : 1;
}

// Token range [begin, end) of split `split` of a sequence of `len` tokens: whole multiples of the
// block size (only the last split of a sequence has idle threads).
LK_HOST_DEVICE void split_bounds(int64_t len, int split, int n_splits, int64_t* begin, int64_t* end) {
  const int64_t per = div_up(div_up(len, n_splits), kThreads) * kThreads;
  const int64_t b = int64_t(split) * per < len ? int64_t(split) * per : len;
  *begin = b;
  *end = b + per < len ? b + per : len;
}

// Where block `block` of a stage works: sequence b (first token s), split `split` of a.n_splits,
// tokens [begin, end) of the sequence.
struct BlockSpan {
  int64_t b;
  int split;
  int64_t s, begin, end;
};

LK_HOST_DEVICE BlockSpan block_span(const Args& a, int64_t block) {
  BlockSpan p;
  p.b = block / a.n_splits;
  p.split = int(block % a.n_splits);
  p.s = a.start(p.b);
  split_bounds(a.length(p.b), p.split, a.n_splits, &p.begin, &p.end);
  return p;
}

// --- seq stage ---------------------------------------------------------------------------------------

struct SeqSums {
  float v[kNumSeqPartials];  // SeqPartial layout
};

struct SeqSumsOp {
  LK_HOST_DEVICE SeqSums operator()(const SeqSums& a, const SeqSums& b) const {
    SeqSums out;
    for (int k = 0; k < kNumSeqPartials; ++k) out.v[k] = a.v[k] + b.v[k];
    return out;
  }
};

template <class Team>
LK_HOST_DEVICE void seq_block(const Args& a, int64_t block, Team& team) {
  const BlockSpan span = block_span(a, block);
  const int64_t b = span.b, s = span.s, begin = span.begin, end = span.end;
  SeqSums acc = {};
  const int mode = a.pp.mode;
  for (int64_t t = begin + team.rank(); t < end; t += Team::kSize) {
    if (!a.valid(b, s, t)) continue;
    acc.v[kSeqTokens] += 1.0f;
    if (mode == kGSPO || mode == kLUSPO) {
      acc.v[kSeqLogRatio] += a.lp.at(b, s, t) - a.old.at(b, s, t);
    } else if (mode == kGMPO) {
      const float adv = a.advantage(b, s, t);
      acc.v[kSeqLogRatio] += gmpo_token(a.lp.at(b, s, t) - a.old.at(b, s, t), adv, a.pp.lo, a.pp.hi).log_ratio;
      acc.v[kSeqAdvantage] += adv;
      if (a.w.p) acc.v[kSeqLogWeight] += gmpo_log_weight(a.w.at(b, s, t));
      if (a.thr) acc.v[kSeqKept] += a.kept(b, s, t) ? 1.0f : 0.0f;
    }
  }
  acc = team.all_reduce(acc, SeqSumsOp{}, SeqSums{});
  if (team.rank() == 0) {
    float* out = a.seq_part + block * kSeqPartStride;
    for (int k = 0; k < kNumSeqPartials; ++k) out[k] = acc.v[k];
  }
}

// Sequence b's values: its partial sums merged left to right (fp64), as every thread needs them.
LK_HOST_DEVICE SeqValues merged_sequence_values(const Args& a, int64_t b) {
  double sums[kNumSeqPartials] = {};
  for (int s = 0; s < a.n_splits; ++s) {
    const float* row = a.seq_part + (b * a.n_splits + s) * kSeqPartStride;
    for (int k = 0; k < kNumSeqPartials; ++k) sums[k] += row[k];
  }
  return sequence_values(a.pp.mode, float(sums[kSeqTokens]), float(sums[kSeqLogRatio]), float(sums[kSeqAdvantage]),
                         float(sums[kSeqLogWeight]), float(sums[kSeqKept]), a.thr != nullptr, a.w.p != nullptr, Exp{});
}

LK_HOST_DEVICE SeqValues stored_sequence_values(const Args& a, int64_t b) {
  if (!a.has_seq) return SeqValues{0.0f, 0.0f, 1.0f, 1.0f};
  const float* v = a.seq + b * kNumSeqValues;
  return SeqValues{v[kSeqN], v[kSeqX], v[kSeqY], v[kSeqRatio]};
}

// --- forward stage -----------------------------------------------------------------------------------

struct TokenSums {
  float policy, kl, tokens, low, high, dual, neg_log_ratio, ratio_sum, entropy_sum, kept;
  float ratio_min, ratio_max;
};

struct TokenSumsOp {
  LK_HOST_DEVICE TokenSums operator()(const TokenSums& a, const TokenSums& b) const {
    return TokenSums{a.policy + b.policy, a.kl + b.kl,
                     a.tokens + b.tokens, a.low + b.low,
                     a.high + b.high, a.dual + b.dual,
                     a.neg_log_ratio + b.neg_log_ratio, a.ratio_sum + b.ratio_sum,
                     a.entropy_sum + b.entropy_sum, a.kept + b.kept,
                     MinOp{}(a.ratio_min, b.ratio_min), MaxOp{}(a.ratio_max, b.ratio_max)};
  }
};

LK_HOST_DEVICE TokenSums empty_token_sums() {
  return TokenSums{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, -kNegInf, kNegInf};
}

template <class Team>
LK_HOST_DEVICE void fwd_block(const Args& a, int64_t block, Team& team) {
  const BlockSpan span = block_span(a, block);
  const int64_t b = span.b, s = span.s, begin = span.begin, end = span.end;
  const int split = span.split;
  SeqValues sv{0.0f, 0.0f, 1.0f, 1.0f};
  if (a.has_seq) {
    sv = merged_sequence_values(a, b);
    if (split == 0 && team.rank() == 0) {
      float* out = a.seq + b * kNumSeqValues;
      out[kSeqN] = sv.n;
      out[kSeqX] = sv.x;
      out[kSeqY] = sv.y;
      out[kSeqRatio] = sv.ratio;
    }
  }
  const KLChoice kl_value = kl_choice(a.kl_est, false, a.kl_clamp);  // the forward reports the plain estimate
  TokenSums acc = empty_token_sums();
  for (int64_t t = begin + team.rank(); t < end; t += Team::kSize) {
    if (!a.valid(b, s, t)) continue;
    const float lp = a.lp.at(b, s, t), old = a.old.at(b, s, t);
    const PolicyTerm pt = policy_term(a.pp, lp, old, a.advantage(b, s, t), sv, Exp{});
    float p = pt.value;
    if (a.pp.mode != kGMPO && a.w.p) p *= a.w.at(b, s, t);
    bool keep = true;
    if (a.ent.p) {
      acc.entropy_sum += a.ent.at(b, s, t);
      keep = a.kept(b, s, t);
    }
    if (keep) {
      acc.policy += p;
      acc.kept += 1.0f;
    }
    if (a.ref.p) acc.kl += kl_estimator(lp, a.ref.at(b, s, t), kl_value, Exp{}).value;
    acc.tokens += 1.0f;
    acc.low += pt.low;
    acc.high += pt.high;
    acc.dual += pt.dual;
    acc.neg_log_ratio += old - lp;
    acc.ratio_sum += pt.ratio;
    acc.ratio_min = MinOp{}(acc.ratio_min, pt.ratio);
    acc.ratio_max = MaxOp{}(acc.ratio_max, pt.ratio);
  }
  acc = team.all_reduce(acc, TokenSumsOp{}, empty_token_sums());
  if (team.rank() == 0) {
    const float u = agg_token_weight(a.agg, sv.n);
    float* out = a.part + block * kPartStride;
    out[kPartPolicy] = acc.policy * u;
    out[kPartKL] = acc.kl * u;
    out[kPartEntropy] = acc.entropy_sum * u;
    out[kPartTokens] = acc.tokens;
    out[kPartClipLow] = acc.low;
    out[kPartClipHigh] = acc.high;
    out[kPartClipDual] = acc.dual;
    out[kPartNegLogRatio] = acc.neg_log_ratio;
    out[kPartRatioMin] = acc.ratio_min;
    out[kPartRatioSum] = acc.ratio_sum;
    out[kPartRatioMax] = acc.ratio_max;
    out[kPartEntropySum] = acc.entropy_sum;
    out[kPartSeqs] = (a.has_seq && split == 0 && sv.n > 0.0f) ? 1.0f : 0.0f;
    out[kPartKept] = acc.kept;
    out[14] = 0.0f;
    out[15] = 0.0f;
  }
}

// --- finalize stage ----------------------------------------------------------------------------------

struct Totals {
  double v[kNumPartials];  // Partial layout: sums, except the ratio min and max
};

struct TotalsOp {
  LK_HOST_DEVICE Totals operator()(const Totals& a, const Totals& b) const {
    Totals out;
    for (int k = 0; k < kNumPartials; ++k) out.v[k] = a.v[k] + b.v[k];
    out.v[kPartRatioMin] = MinOp{}(a.v[kPartRatioMin], b.v[kPartRatioMin]);
    out.v[kPartRatioMax] = MaxOp{}(a.v[kPartRatioMax], b.v[kPartRatioMax]);
    return out;
  }
};

LK_HOST_DEVICE Totals empty_totals() {
  Totals t = {};
  t.v[kPartRatioMin] = -double(kNegInf);
  t.v[kPartRatioMax] = double(kNegInf);
  return t;
}

// One block: thread i folds rows i, i + N, ... in order, then the fixed reduction tree.
template <class Team>
LK_HOST_DEVICE void finalize_block(const Args& a, Team& team) {
  const int64_t n_rows = a.n_seqs * a.n_splits;
  Totals acc = empty_totals();
  for (int64_t r = team.rank(); r < n_rows; r += Team::kSize) {
    Totals row;
    for (int k = 0; k < kNumPartials; ++k) row.v[k] = a.part[r * kPartStride + k];
    acc = TotalsOp{}(acc, row);
  }
  acc = team.all_reduce(acc, TotalsOp{}, empty_totals());
  if (team.rank() == 0) {
    float p[kNumPartials];
    for (int k = 0; k < kNumPartials; ++k) p[k] = float(acc.v[k]);
    const bool has_given = a.norm_source != kNormCounted;
    const float given = a.norm_source == kNormTensor ? *a.norm : a.norm_const;
    finalize_stats(p, a.agg, has_given, given, a.scale, a.kl_coef, a.entropy_coef, a.stats);
  }
}

// --- backward stage ----------------------------------------------------------------------------------

template <class Team>
LK_HOST_DEVICE void bwd_block(const Args& a, int64_t block, Team& team) {
  const BlockSpan span = block_span(a, block);
  const int64_t b = span.b, s = span.s, begin = span.begin, end = span.end;
  const SeqValues sv = stored_sequence_values(a, b);
  const float g = a.g_stats[kStatLoss] * a.stats[kStatInvNorm];
  const float gu = g * agg_token_weight(a.agg, sv.n);
  const KLChoice kl = kl_choice(a.kl_est, a.kl_straight, a.kl_clamp);
  for (int64_t t = begin + team.rank(); t < end; t += Team::kSize) {
    float d_lp = 0.0f, d_h = 0.0f;
    if (a.valid(b, s, t)) {
      const float lp = a.lp.at(b, s, t);
      float d = policy_term(a.pp, lp, a.old.at(b, s, t), a.advantage(b, s, t), sv, Exp{}).grad;
      if (a.pp.mode != kGMPO) {  // GMPO's factor already holds its weights and kept-token count
        if (a.w.p) d *= a.w.at(b, s, t);
        if (!a.kept(b, s, t)) d = 0.0f;
      }
      if (a.ref.p) {
        d += a.kl_coef * kl_estimator(lp, a.ref.at(b, s, t), kl, Exp{}).grad;
      }
      d_lp = gu * d;
      d_h = -gu * a.entropy_coef;
    }
    store_float(a.dlp, a.dlp_dtype, b * a.dlp_rs + s + t, d_lp);
    if (a.dent) store_float(a.dent, a.dent_dtype, b * a.dent_rs + s + t, d_h);
  }
}

// --- KL estimator, elementwise -----------------------------------------------------------------------

struct KlArgs {
  const void* lp;
  int lp_dtype;
  const void* ref;
  int ref_dtype;
  const void* grad;  // backward: cotangent of the estimate
  int grad_dtype;
  float* out;  // forward: [n] fp32
  void* dlp;   // backward: [n] in dlp_dtype, and d ref = -d logprob
  int dlp_dtype;
  void* dref;
  int dref_dtype;
  int64_t n;
  int est;
  bool straight, clamp;
};

template <class Team>
LK_HOST_DEVICE void kl_fwd_block(const KlArgs& a, int64_t block, int64_t n_blocks, Team& team) {
  const KLChoice c = kl_choice(a.est, false, a.clamp);
  for (int64_t i = block * Team::kSize + team.rank(); i < a.n; i += n_blocks * Team::kSize) {
    const float lp = load_float(a.lp, a.lp_dtype, i), ref = load_float(a.ref, a.ref_dtype, i);
    a.out[i] = kl_estimator(lp, ref, c, Exp{}).value;
  }
}

template <class Team>
LK_HOST_DEVICE void kl_bwd_block(const KlArgs& a, int64_t block, int64_t n_blocks, Team& team) {
  const KLChoice c = kl_choice(a.est, a.straight, a.clamp);
  for (int64_t i = block * Team::kSize + team.rank(); i < a.n; i += n_blocks * Team::kSize) {
    const float lp = load_float(a.lp, a.lp_dtype, i), ref = load_float(a.ref, a.ref_dtype, i);
    const float d = load_float(a.grad, a.grad_dtype, i) * kl_estimator(lp, ref, c, Exp{}).grad;
    store_float(a.dlp, a.dlp_dtype, i, d);
    store_float(a.dref, a.dref_dtype, i, -d);
  }
}

// Blocks of an elementwise grid-stride launch over n elements.
inline int64_t elementwise_blocks(int64_t n, int64_t sm_count) {
  const int64_t cap = (sm_count > 0 ? sm_count : 1) * kBlocksPerSm * 4;
  const int64_t need = div_up(n, kThreads);
  return need < cap ? need : cap;
}

}  // namespace policy_loss
}  // namespace cuda
}  // namespace lk
