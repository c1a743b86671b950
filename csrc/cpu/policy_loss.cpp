// Fused policy losses and KL estimators on the CPU (SPEC 2-3); the maths is in
// lenkernels/policy_loss.h (shared with the CUDA backend).
//   forward:  [per-sequence sums (GSPO/LUSPO/GMPO, seq-mean aggregations)] -> per-token terms and
//             partial sums per tile -> statistics (loss, metrics, 1 / normaliser) and seq[B, 4]
//   backward: d loss / d logprobs and d loss / d entropy per token
// Work is cut into tiles of kTile tokens of one sequence; partial sums are kept per tile and
// reduced in tile order, so results are bitwise reproducible for any thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu_utils.h"
#include "lenkernels/policy_args.h"
#include "lenkernels/policy_loss.h"

namespace lk {
namespace cpu {
namespace {

using namespace ::lk::policy;

constexpr int64_t kTile = 4096;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct CpuExp {
  LK_ALWAYS_INLINE float operator()(float x) const { return fast_exp(x); }
};

// One per-token input: element t of sequence b is p[b * rs + start_b + t] (packed: rs = 0).
struct Column {
  const float* p = nullptr;
  int64_t rs = 0;
  LK_ALWAYS_INLINE float at(int64_t b, int64_t start, int64_t t) const { return p[b * rs + start + t]; }
};

struct Args : PolicyScalars {  // the scalars (pp, agg, kl_coef, ...) from parse_policy_scalars
  int64_t n_seqs = 0, seq_len = 0;
  const int64_t* cu = nullptr;  // packed layout when set
  Column lp, old, adv, ref, ent, w;
  bool adv_per_token = true;
  const uint8_t* mask = nullptr;
  int64_t mask_rs = 0;
  const double* thr = nullptr;
  const float* norm = nullptr;
  int threads = 1;

  LK_ALWAYS_INLINE int64_t start(int64_t b) const { return cu ? cu[b] : 0; }
  LK_ALWAYS_INLINE int64_t length(int64_t b) const { return cu ? cu[b + 1] - cu[b] : seq_len; }
  LK_ALWAYS_INLINE bool valid(int64_t b, int64_t s, int64_t t) const {
    return mask == nullptr || mask[b * mask_rs + s + t] != 0;
  }
  LK_ALWAYS_INLINE float advantage(int64_t b, int64_t s, int64_t t) const {
    return adv_per_token ? adv.at(b, s, t) : adv.p[b * adv.rs];
  }
  LK_ALWAYS_INLINE bool kept(int64_t b, int64_t s, int64_t t) const {
    return thr == nullptr || double(ent.at(b, s, t)) >= *thr;
  }
};

struct Tile {
  int64_t seq, begin, end;
};

std::vector<Tile> make_tiles(const Args& a) {
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < a.n_seqs; ++b) {
    const int64_t len = a.length(b);
    for (int64_t t = 0; t < len; t += kTile) tiles.push_back(Tile{b, t, std::min(len, t + kTile)});
  }
  return tiles;
}

// --- per-sequence sums (SeqPartial layout) ---------------------------------------------------------

LK_TARGET_CLONES void sequence_tile(const Args& a, const Tile& tile, double* out) {
  const int64_t b = tile.seq, s = a.start(b);
  double n = 0, sum_l = 0, sum_a = 0, sum_w = 0, kept = 0;
  const int mode = a.pp.mode;
  for (int64_t t = tile.begin; t < tile.end; ++t) {
    if (!a.valid(b, s, t)) continue;
    n += 1;
    if (mode == kGSPO || mode == kLUSPO) {
      sum_l += a.lp.at(b, s, t) - a.old.at(b, s, t);
    } else if (mode == kGMPO) {
      const float adv = a.advantage(b, s, t);
      sum_l += gmpo_token(a.lp.at(b, s, t) - a.old.at(b, s, t), adv, a.pp.lo, a.pp.hi).log_ratio;
      sum_a += adv;
      if (a.w.p) sum_w += gmpo_log_weight(a.w.at(b, s, t));
      if (a.thr) kept += a.kept(b, s, t) ? 1 : 0;
    }
  }
  out[kSeqTokens] = n;
  out[kSeqLogRatio] = sum_l;
  out[kSeqAdvantage] = sum_a;
  out[kSeqLogWeight] = sum_w;
  out[kSeqKept] = kept;
}

SeqValues merged_values(const Args& a, const double* sums) {
  return sequence_values(a.pp.mode, float(sums[kSeqTokens]), float(sums[kSeqLogRatio]), float(sums[kSeqAdvantage]),
                         float(sums[kSeqLogWeight]), float(sums[kSeqKept]), a.thr != nullptr, a.w.p != nullptr,
                         CpuExp{});
}

// --- forward token pass (Partial layout) ------------------------------------------------------------

template <int MODE>
LK_ALWAYS_INLINE void forward_tile_impl(const Args& a, const Tile& tile, const SeqValues& sv, double* out) {
  const int64_t b = tile.seq, s = a.start(b);
  PolicyParams pp = a.pp;
  pp.mode = MODE;  // a constant: the compiler keeps only this mode's branch
  const KLChoice kl = kl_choice(a.kl_est, false, a.kl_clamp);  // the forward reports the plain estimate
  double s_p = 0, s_k = 0, s_h = 0, s_n = 0, low = 0, high = 0, dual = 0, nlr = 0, s_r = 0, kept = 0;
  float r_min = kInf, r_max = -kInf;
  for (int64_t t = tile.begin; t < tile.end; ++t) {
    if (!a.valid(b, s, t)) continue;
    const float lp = a.lp.at(b, s, t), old = a.old.at(b, s, t);
    const PolicyTerm pt = policy_term(pp, lp, old, a.advantage(b, s, t), sv, CpuExp{});
    float p = pt.value;
    if (MODE != kGMPO && a.w.p) p *= a.w.at(b, s, t);
    bool keep = true;
    if (a.ent.p) {
      s_h += a.ent.at(b, s, t);
      keep = a.kept(b, s, t);
    }
    if (keep) {
      s_p += p;
      kept += 1;
    }
    if (a.ref.p) s_k += kl_estimator(lp, a.ref.at(b, s, t), kl, CpuExp{}).value;
    s_n += 1;
    low += pt.low;
    high += pt.high;
    dual += pt.dual;
    nlr += old - lp;
    s_r += pt.ratio;
    r_min = std::min(r_min, pt.ratio);
    r_max = std::max(r_max, pt.ratio);
  }
  const double u = agg_token_weight(a.agg, sv.n);
  out[kPartPolicy] = s_p * u;
  out[kPartKL] = s_k * u;
  out[kPartEntropy] = s_h * u;
  out[kPartTokens] = s_n;
  out[kPartClipLow] = low;
  out[kPartClipHigh] = high;
  out[kPartClipDual] = dual;
  out[kPartNegLogRatio] = nlr;
  out[kPartRatioMin] = r_min;
  out[kPartRatioSum] = s_r;
  out[kPartRatioMax] = r_max;
  out[kPartEntropySum] = s_h;
  out[kPartSeqs] = 0;
  out[kPartKept] = kept;
}

// The mode as a compile-time constant M. parse() has already refused an unknown code (an exception
// must not leave an OpenMP region), so the default case is the last line of defence, not a fallback.
#define LK_MODE_CASE(code, M, ...) \
  case code: {                      \
    constexpr int M = code;         \
    __VA_ARGS__;                    \
    break;                          \
  }
#define LK_DISPATCH_MODE(mode, M, ...)                                                              \
  switch (mode) {                                                                                   \
    LK_MODE_CASE(kGSPO, M, __VA_ARGS__) LK_MODE_CASE(kLUSPO, M, __VA_ARGS__)                        \
    LK_MODE_CASE(kCISPO, M, __VA_ARGS__) LK_MODE_CASE(kSAPO, M, __VA_ARGS__)                        \
    LK_MODE_CASE(kGMPO, M, __VA_ARGS__) LK_MODE_CASE(kReinforce, M, __VA_ARGS__)                    \
    LK_MODE_CASE(kDppoTV, M, __VA_ARGS__) LK_MODE_CASE(kDppoKL, M, __VA_ARGS__)                     \
    LK_MODE_CASE(kDro, M, __VA_ARGS__) LK_MODE_CASE(kPPO, M, __VA_ARGS__)                           \
    default:                                                                                        \
      throw pybind11::value_error("mode must be a lk::policy::Mode code");                          \
  }

LK_TARGET_CLONES void forward_tile(const Args& a, const Tile& tile, const SeqValues& sv, double* out) {
  LK_DISPATCH_MODE(a.pp.mode, M, forward_tile_impl<M>(a, tile, sv, out));
}

void forward(const Args& a, float* stats, float* seq) {
  const std::vector<Tile> tiles = make_tiles(a);
  const int64_t n_tiles = int64_t(tiles.size());
  std::vector<SeqValues> values(a.n_seqs, SeqValues{0.0f, 0.0f, 1.0f, 1.0f});
  if (a.has_seq) {
    std::vector<double> sums(n_tiles * kNumSeqPartials, 0.0);
#pragma omp parallel for schedule(static) num_threads(a.threads)
    for (int64_t i = 0; i < n_tiles; ++i) sequence_tile(a, tiles[i], &sums[i * kNumSeqPartials]);
    // merge each sequence's tiles in order (tiles are sequence-major)
    std::vector<double> per_seq(a.n_seqs * kNumSeqPartials, 0.0);
    for (int64_t i = 0; i < n_tiles; ++i) {
      for (int k = 0; k < kNumSeqPartials; ++k) per_seq[tiles[i].seq * kNumSeqPartials + k] += sums[i * kNumSeqPartials + k];
    }
    for (int64_t b = 0; b < a.n_seqs; ++b) {
      values[b] = merged_values(a, &per_seq[b * kNumSeqPartials]);
      seq[b * kNumSeqValues + kSeqN] = values[b].n;
      seq[b * kNumSeqValues + kSeqX] = values[b].x;
      seq[b * kNumSeqValues + kSeqY] = values[b].y;
      seq[b * kNumSeqValues + kSeqRatio] = values[b].ratio;
    }
  }
  std::vector<double> parts(n_tiles * kNumPartials, 0.0);
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t i = 0; i < n_tiles; ++i) forward_tile(a, tiles[i], values[tiles[i].seq], &parts[i * kNumPartials]);

  double total[kNumPartials] = {0};
  double r_min = kInf, r_max = -kInf;
  for (int64_t i = 0; i < n_tiles; ++i) {
    const double* p = &parts[i * kNumPartials];
    for (int k = 0; k < kNumPartials; ++k) total[k] += p[k];
    r_min = std::min(r_min, p[kPartRatioMin]);
    r_max = std::max(r_max, p[kPartRatioMax]);
  }
  double seqs = 0;
  if (a.has_seq) {
    for (int64_t b = 0; b < a.n_seqs; ++b) seqs += values[b].n > 0.0f ? 1 : 0;
  }
  float p[kNumPartials];
  for (int k = 0; k < kNumPartials; ++k) p[k] = float(total[k]);
  p[kPartRatioMin] = float(r_min);
  p[kPartRatioMax] = float(r_max);
  p[kPartSeqs] = float(seqs);
  const bool has_given = a.norm_source != kNormCounted;
  const float given = a.norm_source == kNormTensor ? *a.norm : a.norm_const;
  finalize_stats(p, a.agg, has_given, given, a.scale, a.kl_coef, a.entropy_coef, stats);
}

// --- backward ---------------------------------------------------------------------------------------

template <int MODE>
LK_ALWAYS_INLINE void backward_tile_impl(const Args& a, const Tile& tile, const SeqValues& sv, float g, float* dlp,
                                         int64_t dlp_rs, float* dent, int64_t dent_rs) {
  const int64_t b = tile.seq, s = a.start(b);
  PolicyParams pp = a.pp;
  pp.mode = MODE;
  const float gu = g * agg_token_weight(a.agg, sv.n);
  const KLChoice kl = kl_choice(a.kl_est, a.kl_straight, a.kl_clamp);
  for (int64_t t = tile.begin; t < tile.end; ++t) {
    float d_lp = 0.0f, d_h = 0.0f;
    if (a.valid(b, s, t)) {
      const float lp = a.lp.at(b, s, t);
      float d = policy_term(pp, lp, a.old.at(b, s, t), a.advantage(b, s, t), sv, CpuExp{}).grad;
      if (MODE != kGMPO) {  // GMPO's factor already holds its weights and kept-token count
        if (a.w.p) d *= a.w.at(b, s, t);
        if (!a.kept(b, s, t)) d = 0.0f;
      }
      if (a.ref.p) d += a.kl_coef * kl_estimator(lp, a.ref.at(b, s, t), kl, CpuExp{}).grad;
      d_lp = gu * d;
      d_h = -gu * a.entropy_coef;
    }
    dlp[b * dlp_rs + s + t] = d_lp;
    if (dent) dent[b * dent_rs + s + t] = d_h;
  }
}

LK_TARGET_CLONES void backward_tile(const Args& a, const Tile& tile, const SeqValues& sv, float g, float* dlp,
                                    int64_t dlp_rs, float* dent, int64_t dent_rs) {
  LK_DISPATCH_MODE(a.pp.mode, M, backward_tile_impl<M>(a, tile, sv, g, dlp, dlp_rs, dent, dent_rs));
}

void backward(const Args& a, const float* stats, const float* seq, const float* g_stats, float* dlp, int64_t dlp_rs,
              float* dent, int64_t dent_rs) {
  const std::vector<Tile> tiles = make_tiles(a);
  const int64_t n_tiles = int64_t(tiles.size());
  const float g = g_stats[kStatLoss] * stats[kStatInvNorm];
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t i = 0; i < n_tiles; ++i) {
    const int64_t b = tiles[i].seq;
    const SeqValues sv = a.has_seq ? SeqValues{seq[b * kNumSeqValues + kSeqN], seq[b * kNumSeqValues + kSeqX],
                                               seq[b * kNumSeqValues + kSeqY], seq[b * kNumSeqValues + kSeqRatio]}
                                   : SeqValues{0.0f, 0.0f, 1.0f, 1.0f};
    backward_tile(a, tiles[i], sv, g, dlp, dlp_rs, dent, dent_rs);
  }
}

// --- KL estimator, elementwise ------------------------------------------------------------------

LK_TARGET_CLONES void kl_chunk(const float* lp, const float* ref, float* out, int64_t n, int est, bool clamp) {
  const KLChoice kl = kl_choice(est, false, clamp);
  for (int64_t i = 0; i < n; ++i) out[i] = kl_estimator(lp[i], ref[i], kl, CpuExp{}).value;
}

LK_TARGET_CLONES void kl_grad_chunk(const float* lp, const float* ref, const float* g, float* dlp, float* dref,
                                    int64_t n, int est, bool straight, bool clamp) {
  const KLChoice kl = kl_choice(est, straight, clamp);
  for (int64_t i = 0; i < n; ++i) {
    const float d = g[i] * kl_estimator(lp[i], ref[i], kl, CpuExp{}).grad;
    dlp[i] = d;
    dref[i] = -d;
  }
}

// The kernel-side view of the op's inputs (lenkernels/cpu/policy_loss.py _args); the codes are
// checked here, before any OpenMP region.
Args parse(const pybind11::dict& d) {
  Args a;
  parse_policy_inputs(d, a, [](const pybind11::dict& dd, const std::string& name) {
    return Column{dict_ptr<const float>(dd, name), dd[(name + "_rs").c_str()].cast<int64_t>()};
  });
  a.threads = threads_for(d["threads"].cast<int>());
  return a;
}

void define(py::module_& m) {
  m.def(
      "policy_loss_fwd",
      [](const py::dict& args, Addr stats, Addr seq) {
        const Args a = parse(args);
        py::gil_scoped_release release;
        forward(a, stats, seq);
      },
      "Writes stats[16] (lk::policy::Stat layout) and seq[B, 4] (SeqValue layout).");
  m.def(
      "policy_loss_bwd",
      [](const py::dict& args, Addr stats, Addr seq, Addr g_stats, Addr dlp, int64_t dlp_rs, Addr dent,
         int64_t dent_rs) {
        const Args a = parse(args);
        py::gil_scoped_release release;
        backward(a, stats, seq, g_stats, dlp, dlp_rs, dent, dent_rs);
      },
      "Writes d loss / d logprobs (and d loss / d entropy when dent != 0), fp32, every token of every sequence.");
  m.def("kl_penalty_fwd", [](Addr lp, Addr ref, Addr out, int64_t n, int est, bool clamp, int threads) {
    check(invalid_kl_estimator(est));
    const int64_t chunk = 1 << 14;
#pragma omp parallel for schedule(static) num_threads(threads_for(threads))
    for (int64_t i = 0; i < n; i += chunk) {
      kl_chunk(static_cast<const float*>(lp) + i, static_cast<const float*>(ref) + i, static_cast<float*>(out) + i,
               std::min(chunk, n - i), est, clamp);
    }
  }, LK_NOGIL);
  m.def("kl_penalty_bwd", [](Addr lp, Addr ref, Addr g, Addr dlp, Addr dref, int64_t n, int est, bool straight,
                             bool clamp, int threads) {
    check(invalid_kl_estimator(est));
    const int64_t chunk = 1 << 14;
#pragma omp parallel for schedule(static) num_threads(threads_for(threads))
    for (int64_t i = 0; i < n; i += chunk) {
      kl_grad_chunk(static_cast<const float*>(lp) + i, static_cast<const float*>(ref) + i,
                    static_cast<const float*>(g) + i, static_cast<float*>(dlp) + i, static_cast<float*>(dref) + i,
                    std::min(chunk, n - i), est, straight, clamp);
    }
  }, LK_NOGIL);
}

}  // namespace
}  // namespace cpu
}  // namespace lk

LK_MODULE(_cpu_policy_loss, "lenkernels CPU kernels: fused policy losses and KL estimators (raw pointers, fp32)",
          lk::cpu::define)
