// Token log-probabilities and entropy from logits on the CPU (SPEC 1).
//   forward:  one read of each [V] row -> logprob, entropy, lse, mean_z   (fp32, [N] each), and
//             optionally the row's state (max z, log S) for merging vocabulary parts
//   backward: one read + one write of each row -> dlogits in the logits dtype (may alias logits)
// A row is cut into fixed kChunk-element chunks; each chunk is reduced to an online-softmax state
// (a max sweep, then one exp2 sweep over the same L1-resident logits, while the next chunk is
// prefetched), and the states are merged left to right.  The chunk structure never depends on the
// thread count, so results are bitwise reproducible whether a row runs on one thread or is split
// across all of them (few rows, large V).
// Selection (SPEC 7, no gradient): the top-k ids of each row in one read (topk_select, topk_ties) and a
// sampler's kept set under top-p / min-p in at most three (sampler_kept); sections at the end.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_utils.h"
#include "lenkernels/selection.h"
#include "lenkernels/softmax_state.h"
#include "lenkernels/token_stats.h"

namespace lk {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;  // 8-16 KiB of logits: stays in L1 between the max and the exp sweep

// 2^w for w in [-127, 0] with ~1.5 ulp error (a degree-5 minimax polynomial on [-1/2, 1/2], exact
// at w = 0), in plain arithmetic so that it vectorises in every ISA clone: adding 1.5 * 2^23 + 127
// rounds w + 127 = n + 127 into the low mantissa bits, whose shift by 23 is 2^n's bit pattern; it is
// 0 (not a denormal) at n = -127: w = -127 (the clamp of a masked logit) gives exactly 0.  NaN stays NaN.
LK_ALWAYS_INLINE float exp2_clamped(float w) {
  constexpr float kShift = 12582912.0f + 127.0f;
  const float shifted = w + kShift;
  const float f = w - (shifted - kShift);
  float p = 1.326470869e-3f;
  p = p * f + 9.671511129e-3f;
  p = p * f + 5.550733954e-2f;
  p = p * f + 2.402224243e-1f;
  p = p * f + 6.931470037e-1f;
  p = p * f + 1.0f;
  return p * bits_to_float(float_to_bits(shifted) << 23);
}

// -127, hidden from the optimiser: with a literal, g++ if-converts the clamp below into masked
// copies of the whole exp2 (the constant branch folded), twice the instructions of one vmaxps.
LK_ALWAYS_INLINE float opaque_clamp_floor() {
  float lo = -127.0f;
#if defined(__x86_64__)
  asm("" : "+x"(lo));
#endif
  return lo;
}

// (z - m) * log2(e) = (x - x_max) * (log2(e) / T), clamped to lo = -127 (NaN kept): exactly 0 at
// the max, and x - x_max is exact for 16-bit inputs.
LK_ALWAYS_INLINE float log2_offset(float x, float x_max, float scale, float lo) {
  const float w = (x - x_max) * scale;
  return w < lo ? lo : w;
}

// Prefetches the byte at offset bytes of the element one chunk after p (the next chunk of the row,
// or the next row), for reading or, with kWrite, for writing; an address past the end of the logits
// is harmless (prefetches never fault).
template <bool kWrite = false, typename T>
LK_ALWAYS_INLINE void prefetch_ahead(const T* p, size_t offset) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kChunk * sizeof(T) + offset),
                     kWrite ? 1 : 0);
}

// Lanes of the exp sweep: two AVX-512 (four AVX2) registers of independent accumulators.
constexpr int kExpLanes = 32;

// The largest of n raw logits; a NaN may or may not be taken (the exp sweep catches it either way).
LK_ALWAYS_INLINE float raw_max(const float* x, int64_t n) {
  float mx[kExpLanes];
  for (int k = 0; k < kExpLanes; ++k) mx[k] = kNegInf;
  int64_t i = 0;
  for (; i + kExpLanes <= n; i += kExpLanes) {
#pragma omp simd
    for (int k = 0; k < kExpLanes; ++k) mx[k] = x[i + k] > mx[k] ? x[i + k] : mx[k];
  }
  for (int k = 0; i + k < n; ++k) mx[k] = x[i + k] > mx[k] ? x[i + k] : mx[k];
  for (int w = kExpLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) mx[k] = mx[k + w] > mx[k] ? mx[k + w] : mx[k];
  }
  return mx[0];
}

// 16-bit floats (sign-magnitude, like bf16 and fp16) as int16 keys in the same order: a max over
// 32 keys per AVX-512 register without converting to fp32. The map is its own inverse.
LK_ALWAYS_INLINE int16_t order_key(uint16_t bits) {
  const int16_t b = static_cast<int16_t>(bits);
  return static_cast<int16_t>(b ^ ((b >> 15) & 0x7fff));
}

template <typename T>
LK_ALWAYS_INLINE float raw_max(const T* x, int64_t n) {
  constexpr int kKeys = 64;
  int16_t mx[kKeys];
  for (int k = 0; k < kKeys; ++k) mx[k] = order_key(0xff80u);  // -inf
  int64_t i = 0;
  for (; i + kKeys <= n; i += kKeys) {
#pragma omp simd
    for (int k = 0; k < kKeys; ++k) {
      const int16_t key = order_key(x[i + k].bits);
      mx[k] = key > mx[k] ? key : mx[k];
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const int16_t key = order_key(x[i + k].bits);
    mx[k] = key > mx[k] ? key : mx[k];
  }
  for (int w = kKeys / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) mx[k] = mx[k + w] > mx[k] ? mx[k + w] : mx[k];
  }
  return to_float(T{static_cast<uint16_t>(order_key(static_cast<uint16_t>(mx[0])))});
}

// One chunk's online-softmax state, in two sweeps over the (L1-resident) logits: the raw max, then
// one exp2 per logit against that max, as fold_tile (lenkernels/token_stats.h):
//   w = (x - x_max) * log2(e) / T = (z - m) * log2(e),  e = 2^w,  S += e,  U += e * w  (U * ln 2 at the end);
// w is clamped at -127, where e is exactly 0 (terms below 2^-126 are dropped).
// NaN logits are not looked for in the max sweep (a plain max ignores them): they reach S and U
// as NaN through the exp sweep, and the state's m is made NaN too, as merge() expects.
// kExtra (the extended forward) adds two sums to the same sweep, from the same w and e, leaving the
// state's operations (and bits) as they are: S2 = sum e^2 (terms with w <= -62, e^2 < 2^-124, dropped:
// never a denormal product, and below an ulp of S2 >= 1) and D = sum (x - x_max) (-inf once a logit is).
struct SweepExtra {
  float x_max, s2, d;
};

template <typename T, bool kExtra = false>
LK_ALWAYS_INLINE SoftmaxState chunk_state(const T* x, int64_t n, float inv_t, SweepExtra* ex = nullptr) {
  const float x_max = raw_max(x, n);
  const float m = x_max * inv_t;  // z = x / T is monotonic in x (T > 0): the max of z, exactly
  if constexpr (kExtra) *ex = SweepExtra{x_max, 0.0f, 0.0f};
  if (m == kNegInf) {
    // fully masked, or only -inf and NaN: a NaN must still poison the row
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float(x[j]);
      if (v != v) return SoftmaxState{v, v, v};
    }
    return empty_state();  // a fully masked chunk contributes nothing
  }

  const float lo = opaque_clamp_floor();
  const float scale = inv_t * kLog2e;
  constexpr int kXLanes = kExtra ? kExpLanes : 1;
  constexpr float kS2Floor = -62.0f;
  float s[kExpLanes], u[kExpLanes], s2[kXLanes], sd[kXLanes];
  for (int k = 0; k < kExpLanes; ++k) s[k] = u[k] = 0.0f;
  for (int k = 0; k < kXLanes; ++k) s2[k] = sd[k] = 0.0f;
  int64_t i = 0;
  for (; i + kExpLanes <= n; i += kExpLanes) {
    // the same lines of the next chunk (or row): the memory system streams it in while this
    // L1-resident chunk is exponentiated
    for (size_t line = 0; line < kExpLanes * sizeof(T); line += 64) prefetch_ahead(x + i, line);
    if constexpr (std::is_same<T, bf16>::value) {
      // two bf16 logits per 32-bit word, unpacked with a shift and a mask (no widening shuffles):
      // lane k takes logit 2k, lane k + 16 logit 2k + 1
#pragma omp simd
      for (int k = 0; k < kExpLanes / 2; ++k) {
        uint32_t pair;
        std::memcpy(&pair, x + i + 2 * k, 4);
        const float x0 = bits_to_float(pair << 16), x1 = bits_to_float(pair & 0xffff0000u);
        const float w0 = log2_offset(x0, x_max, scale, lo);
        const float w1 = log2_offset(x1, x_max, scale, lo);
        const float e0 = exp2_clamped(w0), e1 = exp2_clamped(w1);
        s[k] += e0;
        u[k] += e0 * w0;
        s[k + kExpLanes / 2] += e1;
        u[k + kExpLanes / 2] += e1 * w1;
        if constexpr (kExtra) {
          s2[k] = w0 > kS2Floor ? s2[k] + e0 * e0 : s2[k];
          sd[k] += x0 - x_max;
          s2[k + kExpLanes / 2] = w1 > kS2Floor ? s2[k + kExpLanes / 2] + e1 * e1 : s2[k + kExpLanes / 2];
          sd[k + kExpLanes / 2] += x1 - x_max;
        }
      }
    } else {
#pragma omp simd
      for (int k = 0; k < kExpLanes; ++k) {
        const float v = to_float(x[i + k]);
        const float w = log2_offset(v, x_max, scale, lo);
        const float e = exp2_clamped(w);
        s[k] += e;
        u[k] += e * w;  // a masked logit: 0 * -127, not 0 * -inf
        if constexpr (kExtra) {
          s2[k] = w > kS2Floor ? s2[k] + e * e : s2[k];
          sd[k] += v - x_max;
        }
      }
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const float v = to_float(x[i + k]);
    const float w = log2_offset(v, x_max, scale, lo);
    const float e = exp2_clamped(w);
    s[k] += e;
    u[k] += e * w;
    if constexpr (kExtra) {
      s2[k] = w > kS2Floor ? s2[k] + e * e : s2[k];
      sd[k] += v - x_max;
    }
  }
  // pairwise lane reduction in a fixed order
  for (int w = kExpLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) {
      s[k] += s[k + w];
      u[k] += u[k + w];
    }
  }
  if constexpr (kExtra) {
    for (int w = kExpLanes / 2; w > 0; w /= 2) {
      for (int k = 0; k < w; ++k) {
        s2[k] += s2[k + w];
        sd[k] += sd[k + w];
      }
    }
    ex->s2 = s2[0];
    ex->d = sd[0];
  }
  // a NaN logit makes the state's m NaN as well (a +inf one leaves m = +inf, S = NaN), as before
  const float s_all = s[0];
  return SoftmaxState{(s_all != s_all && m < -kNegInf) ? s_all : m, s_all, u[0] * kLn2};
}

// The ISA-specific entry points sit below the OpenMP regions: an outlined parallel body does not
// inherit the target of its enclosing function, so the clones must be the functions it calls.
LK_TARGET_CLONES SoftmaxState chunk_state_any(int dtype, const void* x, int64_t n, float inv_t) {
  SoftmaxState st = empty_state();
  LK_DISPATCH_FLOAT(dtype, T, st = chunk_state(static_cast<const T*>(x), n, inv_t));
  return st;
}

template <typename T>
LK_ALWAYS_INLINE SoftmaxState row_state(const T* row, int64_t vocab, float inv_t, int dtype) {
  SoftmaxState st = empty_state();
  for (int64_t c = 0; c < vocab; c += kChunk) {
    st = merge(st, chunk_state_any(dtype, row + c, std::min(kChunk, vocab - c), inv_t));
  }
  return st;
}

// The logits and targets every pass reads.
struct RowsArgs {
  const void* logits;
  int dtype;
  int64_t n_rows, vocab, row_stride;
  const int64_t* ids;
  const float* temperature;
  int64_t temp_stride, ignore_index;
};

struct FwdArgs : RowsArgs {
  float *logprobs, *entropy, *lse, *mean_z;
  float *max_z, *log_s;  // null, or [N] each: the row's state (lenkernels/distributed.py merge_stats)
  int threads;
  const int64_t* sparse = nullptr;  // null, or [N, n_sparse] ids (clamped into [0, vocab)) whose z
  int64_t n_sparse = 0;             // z_sparse [N, n_sparse] receives: x / T (ops/token_stats_sparse.py)
  float* z_sparse = nullptr;
};

// states[t] = chunk(x, n, c, inv_t) for every tile t = (row r, chunk at column c) of n logits x,
// in parallel (the rows' states are merged afterwards, left to right: a fixed order).
template <typename T, class State, class Chunk>
void tile_states(const FwdArgs& a, int64_t n_chunks, State* states, const Chunk& chunk) {
  const int64_t n_tiles = a.n_rows * n_chunks;
#pragma omp parallel num_threads(a.threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t r = t / n_chunks, c = (t % n_chunks) * kChunk;
      const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
      const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
      states[t] = chunk(row + c, std::min(kChunk, a.vocab - c), c, inv_t);
    }
  }
}

// Writes the outputs of one row; returns false when its id is out of range (logprob is NaN then).
template <typename T>
LK_ALWAYS_INLINE bool finish_row(const FwdArgs& a, int64_t r, const SoftmaxState& st) {
  const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
  const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
  const RowStats rs = finalize(st);
  const int64_t id = a.ids[r];
  const bool in_range = id >= 0 && id < a.vocab;
  const float z_target = in_range ? to_float(row[id]) * inv_t : 0.0f;
  const float lp = token_logprob(z_target, rs, id, a.ignore_index, a.vocab);
  const bool ok = in_range || id == a.ignore_index;
  a.logprobs[r] = lp;
  if (a.entropy) a.entropy[r] = rs.entropy;
  a.lse[r] = rs.lse;
  a.mean_z[r] = rs.mean_z;
  if (a.max_z) a.max_z[r] = rs.m;
  if (a.log_s) a.log_s[r] = rs.log_s;
  if (a.z_sparse) {  // while the row is in cache; a division, as torch's x.gather(...) / T
    const float t = a.temperature[r * a.temp_stride];
    const int64_t* s = a.sparse + r * a.n_sparse;
    float* z = a.z_sparse + r * a.n_sparse;
    for (int64_t m = 0; m < a.n_sparse; ++m) {
      z[m] = to_float(row[std::min(std::max<int64_t>(s[m], 0), a.vocab - 1)]) / t;
    }
  }
  return ok;
}

template <typename T>
LK_ALWAYS_INLINE int64_t forward_impl(const FwdArgs& a) {
  const int64_t n_chunks = (a.vocab + kChunk - 1) / kChunk;
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  if (a.n_rows >= a.threads || n_chunks == 1) {
#pragma omp parallel for schedule(static) num_threads(a.threads) reduction(min : first_bad)
    for (int64_t r = 0; r < a.n_rows; ++r) {
      const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
      const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
      if (!finish_row<T>(a, r, row_state(row, a.vocab, inv_t, a.dtype))) first_bad = std::min(first_bad, r);
    }
  } else {
    // Few rows: chunk states in parallel, then the same left-to-right merge per row.
    SoftmaxState* states = new SoftmaxState[a.n_rows * n_chunks];
    tile_states<T>(a, n_chunks, states, [&](const T* x, int64_t n, int64_t, float inv_t) {
      return chunk_state_any(a.dtype, x, n, inv_t);
    });
    for (int64_t r = 0; r < a.n_rows; ++r) {
      SoftmaxState st = empty_state();
      for (int64_t c = 0; c < n_chunks; ++c) st = merge(st, states[r * n_chunks + c]);
      if (!finish_row<T>(a, r, st)) first_bad = std::min(first_bad, r);
    }
    delete[] states;
  }
  return first_bad == std::numeric_limits<int64_t>::max() ? -1 : first_bad;
}

int64_t forward(const FwdArgs& a) {
  int64_t out = -1;
  LK_DISPATCH_FLOAT(a.dtype, T, out = forward_impl<T>(a));
  return out;
}

struct BwdArgs : RowsArgs {
  const float *lse, *mean_z, *g_logprobs, *g_entropy;
  int64_t g_logprobs_stride, g_entropy_stride;
  void* dlogits;
  int64_t dlogits_row_stride;
  int threads;
  const int64_t* sparse = nullptr;  // null, or [N, n_sparse] ids in [0, vocab) whose float64 terms
  const double* g_sparse = nullptr;  // g_sparse [N, n_sparse] are added to the gradient (repeats summed)
  int64_t n_sparse = 0;
};

// from_float<T> in a form that vectorises: fp16's (cpu_utils.h) branches keep a loop scalar, so the
// same round-to-nearest-even conversion is written here with selects (bitwise the same results).
template <typename T>
LK_ALWAYS_INLINE T store_value(float f) {
  return from_float<T>(f);
}
template <>
LK_ALWAYS_INLINE fp16 store_value<fp16>(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  const uint32_t special = u > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN -> quiet NaN, overflow -> inf
  const uint32_t denorm = float_to_bits(bits_to_float(u) + bits_to_float(126u << 23)) - (126u << 23);
  const uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const uint32_t out = u >= (143u << 23) ? special : (u < (113u << 23) ? denorm : normal);
  return fp16{uint16_t(out | (sign >> 16))};
}

// x * y rounded to float before anything else uses it: never contracted into an FMA with a
// following subtraction, so x / T - lse is the difference of the forward's own rounded z and lse
// (at the row's maximum with S = 1 it is exactly 0, p exactly 1 and the gradient exactly 0).
LK_ALWAYS_INLINE float rounded_product(float x, float y) {
#if defined(__has_builtin)
#if __has_builtin(__builtin_assoc_barrier)
  return __builtin_assoc_barrier(x * y);
#endif
#endif
  float p = x * y;
#if defined(__x86_64__)
  asm("" : "+x"(p));
#endif
  return p;
}

// f(j) for j in [0, n), a cache line of logits at a time (vectorised within the line), the next
// line (read, and written in place) prefetched while this one is computed: the gradient sweeps.
template <typename T, typename F>
LK_ALWAYS_INLINE void stream_lines(const T* x, T* out, int64_t n, F&& f) {
  constexpr int64_t kBlock = 64 / sizeof(T);
  int64_t j0 = 0;
  for (; j0 + kBlock <= n; j0 += kBlock) {
    prefetch_ahead<true>(x + j0, 0);
    if (static_cast<const void*>(out) != static_cast<const void*>(x)) prefetch_ahead<true>(out + j0, 0);
#pragma omp simd
    for (int64_t j = j0; j < j0 + kBlock; ++j) f(j);
  }
  for (int64_t j = j0; j < n; ++j) f(j);
}

// The per-element sweep of both backwards (grad_chunk, extra_grad_chunk): with d = x / T - lse (the
// product rounded first: rounded_product) clamped at lo = -127 ln 2, where p = 2^(d log2 e) is exactly
// 0 (a masked logit gets 0, never 0 * -inf),
//   grad = -p (g_h d + k0 - c_q p) / T + [x finite] g_mean / T.
// The terms of kSq (c_q) and kMean (g_mean) cost instructions in the hot loop: the extended backward
// instantiates them only for rows whose cotangents make them non-zero, so a row without them runs the
// two-output sweep's instructions (and bits).
struct SweepRow {
  float inv_t, neg_inv_t, lse, lo, g_h, k0, c_q, g_mean_t;  // g_mean_t = g_mean / T
};

template <bool kSq, bool kMean>
LK_ALWAYS_INLINE float sweep_grad(float x, const SweepRow& r) {
  const float d = rounded_product(x, r.inv_t) - r.lse;
  const float dc = d < r.lo ? r.lo : d;
  const float p = exp2_clamped(dc * kLog2e);
  float t = r.g_h * dc + r.k0;
  if constexpr (kSq) t -= r.c_q * p;
  const float g = p * t * r.neg_inv_t;
  if constexpr (kMean) {
    // x finite as in the forward's mean (finite_offsets); a NaN or +inf x has a NaN p anyway
    return x > kNegInf ? g + r.g_mean_t : g;
  }
  return g;
}

// out[j] = sweep_grad(x[j]) over a chunk; the lambda is forced inline: in some of the extended
// backward's instantiations g++ otherwise leaves it as a call per element.
template <bool kSq, bool kMean, typename T>
LK_ALWAYS_INLINE void sweep_chunk(const T* x, T* out, int64_t n, const SweepRow& row) {
  stream_lines(x, out, n, [&](int64_t j) __attribute__((always_inline)) {
    out[j] = store_value<T>(sweep_grad<kSq, kMean>(to_float(x[j]), row));
  });
}

// One chunk of one row: d logits for n entries (SPEC 1). out may alias x (in-place backward).
// Off the target, grad = -p (g_lp + g_h (z - mean_z)) / T with z - mean_z = d + (lse - mean_z):
// sweep_grad with k0 = g_lp + g_h (lse - mean_z) and no extra terms.  The target is redone after.
template <typename T>
LK_ALWAYS_INLINE void grad_chunk(const T* x, T* out, int64_t n, int64_t local_id, float inv_t, float lse,
                                 float mean_z, float g_lp, float g_h) {
  // read the target logit before the sweep: with an in-place backward the sweep overwrites it
  const bool has_target = g_lp != 0.0f && local_id >= 0 && local_id < n;
  const float x_target = has_target ? to_float(x[local_id]) : 0.0f;
  const float lo = opaque_clamp_floor() * kLn2;
  const float k0 = g_lp + g_h * (lse - mean_z);  // lse - mean_z = H >= 0: no cancellation
  const SweepRow row{inv_t, -inv_t, lse, lo, g_h, k0, 0.0f, 0.0f};
  sweep_chunk<false, false>(x, out, n, row);
  if (has_target) {
    const float d = rounded_product(x_target, inv_t) - lse;
    const float p = exp2_clamped((d < lo ? lo : d) * kLog2e);
    out[local_id] = from_float<T>(token_stats_grad(x_target * inv_t, true, mean_z, g_lp, g_h, inv_t, p));
  }
}

LK_TARGET_CLONES void grad_chunk_any(int dtype, const void* x, void* out, int64_t n, int64_t local_id, float inv_t,
                                     float lse, float mean_z, float g_lp, float g_h) {
  LK_DISPATCH_FLOAT(dtype, T,
                    grad_chunk(static_cast<const T*>(x), static_cast<T*>(out), n, local_id, inv_t, lse, mean_z, g_lp,
                               g_h));
}

// dlogits[s[m]] += g[m] for the ids s[m] in [begin, begin + n), out = dlogits + begin (just written:
// in cache): the terms of repeated ids summed in double in the order given, one rounding per element
// (ops/token_stats_sparse.py _add_sparse).
template <typename T>
LK_ALWAYS_INLINE void add_sparse(T* out, int64_t begin, int64_t n, const int64_t* s, const double* g, int64_t m_n) {
  for (int64_t m = 0; m < m_n; ++m) {
    const int64_t j = s[m] - begin;
    if (j < 0 || j >= n) continue;
    bool repeat = false;
    for (int64_t k = 0; k < m && !repeat; ++k) repeat = s[k] == s[m];
    if (repeat) continue;
    double total = 0.0;
    for (int64_t k = m; k < m_n; ++k) {
      if (s[k] == s[m]) total += g[k];
    }
    out[j] = from_float<T>(static_cast<float>(static_cast<double>(to_float(out[j])) + total));
  }
}

void backward(const BwdArgs& a) {
  const int64_t n_chunks = (a.vocab + kChunk - 1) / kChunk;
  const int64_t n_tiles = a.n_rows * n_chunks;
  const int64_t elem = a.dtype == kFloat32 ? 4 : 2;
  if (a.dlogits != a.logits && a.dlogits_row_stride == a.vocab) advise_huge_pages(a.dlogits, a.n_rows * a.vocab * elem);
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t r = t / n_chunks, begin = (t % n_chunks) * kChunk;
    const int64_t id = a.ids[r];
    const float g_lp = (a.g_logprobs && id != a.ignore_index) ? a.g_logprobs[r * a.g_logprobs_stride] : 0.0f;
    const float g_h = a.g_entropy ? a.g_entropy[r * a.g_entropy_stride] : 0.0f;
    void* out = static_cast<char*>(a.dlogits) + (r * a.dlogits_row_stride + begin) * elem;
    const int64_t n = std::min(kChunk, a.vocab - begin);
    grad_chunk_any(a.dtype, static_cast<const char*>(a.logits) + (r * a.row_stride + begin) * elem, out, n,
                   id - begin, inverse_temperature(a.temperature[r * a.temp_stride]), a.lse[r], a.mean_z[r], g_lp,
                   g_h);
    if (a.g_sparse) {
      LK_DISPATCH_FLOAT(a.dtype, T,
                        add_sparse(static_cast<T*>(out), begin, n, a.sparse + r * a.n_sparse,
                                   a.g_sparse + r * a.n_sparse, a.n_sparse));
    }
  }
}


// --- extra vocabulary statistics (SPEC 7), run only when lenkernels.token_stats asks for them ------
// A separate entry point: the two-output kernels above keep their code and bits. Each chunk is
// reduced by the same chunk_state sweep (so logprob and entropy are the same fp32 operations), which
// also sums S2 = sum exp(2 (z - m)) = sum e^2 (log_sum_p2 = log S2 - 2 log S: no cancellation) and
// D = sum (x - x_max) from the same exponentials and offsets; the lowest index of the largest logit is
// found once per row, by comparing the first chunk that holds the row's max with it.

struct ExtraState {
  SoftmaxState st;
  float s2;
  float best;       // the largest raw logit
  int64_t best_id;  // its lowest index, -1 while only -inf was seen
  double sum_x;     // sum of the finite raw logits
  bool pending;     // best_id is the start of the chunk holding best, searched once the row is merged
};

// The lowest index j < n with x[j] == x_max (a finite logit of the chunk; +0 and -0 both match 0),
// found 256 logits at a time (run once per row, on the chunk that holds the row's max).
template <typename T>
LK_ALWAYS_INLINE int64_t first_index_of(const T* x, int64_t n, float x_max) {
  constexpr int64_t kBlock = 256;  // one horizontal test per 256 compares
  uint16_t target = 0, mask = 0;
  if constexpr (!std::is_same<T, float>::value) {
    target = from_float<T>(x_max).bits;  // exact: x_max is one of the chunk's logits
    mask = x_max == 0.0f ? 0x7fffu : 0xffffu;
    target &= mask;
  }
  const auto hit = [&](int64_t j) {
    if constexpr (std::is_same<T, float>::value) {
      return x[j] == x_max;
    } else {
      return (x[j].bits & mask) == target;
    }
  };
  int64_t j0 = 0;
  for (; j0 + kBlock <= n; j0 += kBlock) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = j0; j < j0 + kBlock; ++j) any |= hit(j) ? 1 : 0;
    if (any) break;
  }
  for (int64_t j = j0; j < n; ++j) {
    if (hit(j)) return j;
  }
  return n;  // not reached for a logit of the chunk
}

// sum (x - x_max) over the finite logits and their count, in fixed lanes: a chunk with masked (-inf)
// logits besides a finite max. An fp32 x - x_max that overflows makes the sum -inf (then scan_extra).
template <typename T>
LK_ALWAYS_INLINE float finite_offsets(const T* x, int64_t n, float x_max, int64_t* count) {
  float sd[kExpLanes];
  int32_t cnt[kExpLanes];
  for (int k = 0; k < kExpLanes; ++k) {
    sd[k] = 0.0f;
    cnt[k] = 0;
  }
  int64_t i = 0;
  for (; i + kExpLanes <= n; i += kExpLanes) {
#pragma omp simd
    for (int k = 0; k < kExpLanes; ++k) {
      const float v = to_float(x[i + k]);
      const bool finite = v > kNegInf;  // no NaN or +inf here (the sweep's S is finite)
      sd[k] += finite ? v - x_max : 0.0f;
      cnt[k] += finite ? 1 : 0;
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const float v = to_float(x[i + k]);
    sd[k] += v > kNegInf ? v - x_max : 0.0f;
    cnt[k] += v > kNegInf ? 1 : 0;
  }
  for (int w = kExpLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) {
      sd[k] += sd[k + w];
      cnt[k] += cnt[k + w];
    }
  }
  *count = cnt[0];
  return sd[0];
}

// Argmax and the sum of the finite logits, one logit at a time in double: the general case
// (NaN or +inf logits, an all -inf chunk, or an fp32 x - x_max that overflows).
template <typename T>
LK_ALWAYS_INLINE void scan_extra(const T* x, int64_t n, int64_t base, ExtraState& e) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_float(x[j]);
    if (v > e.best || (e.best_id < 0 && v == kNegInf)) {
      e.best = v;
      e.best_id = base + j;
    }
    if (std::isfinite(v)) e.sum_x += v;
  }
}

// One chunk: chunk_state's sweep (the same state bits) with S2 and D carried along; sum_x = D + n x_max
// when every logit is finite, and the argmax is left pending: only the first chunk holding the row's
// max is searched for it (extra_forward_impl), not every chunk.
template <typename T>
LK_ALWAYS_INLINE ExtraState chunk_extra(const T* x, int64_t n, int64_t base, float inv_t) {
  SweepExtra sw;
  ExtraState e{chunk_state<T, true>(x, n, inv_t, &sw), 0.0f, kNegInf, -1, 0.0, false};
  if (e.st.s != 0.0f) e.s2 = sw.s2;
  // a finite max and S (no NaN, no +inf) and a finite D (no -inf): the common case
  if (e.st.s >= 1.0f && e.st.s <= static_cast<float>(n) && std::isfinite(sw.d)) {
    e.best = sw.x_max;
    e.best_id = base;
    e.pending = true;
    e.sum_x = static_cast<double>(sw.d) + static_cast<double>(n) * static_cast<double>(sw.x_max);
    return e;
  }
  if (e.st.s >= 1.0f && e.st.s <= static_cast<float>(n)) {
    // masked logits beside a finite max: a second sweep of the L1-resident chunk for the sum
    int64_t count = 0;
    const float d = finite_offsets(x, n, sw.x_max, &count);
    if (std::isfinite(d)) {
      e.best = sw.x_max;
      e.best_id = base;
      e.pending = true;
      e.sum_x = static_cast<double>(d) + static_cast<double>(count) * static_cast<double>(sw.x_max);
      return e;
    }
  }
  scan_extra(x, n, base, e);
  return e;
}

LK_TARGET_CLONES ExtraState chunk_extra_any(int dtype, const void* x, int64_t n, int64_t base, float inv_t) {
  ExtraState e{};
  LK_DISPATCH_FLOAT(dtype, T, e = chunk_extra(static_cast<const T*>(x), n, base, inv_t));
  return e;
}

LK_ALWAYS_INLINE float rescaled_s2(const ExtraState& a, float m) {
  if (a.st.s == 0.0f) return 0.0f;
  const float c = expf(a.st.m - m);
  return c * c * a.s2;
}

LK_ALWAYS_INLINE ExtraState merge_extra(const ExtraState& a, const ExtraState& b) {
  ExtraState r;
  r.st = merge(a.st, b.st);
  r.s2 = rescaled_s2(a, r.st.m) + rescaled_s2(b, r.st.m);
  const bool take = b.best > a.best || (a.best_id < 0 && b.best_id >= 0);  // b's ids are larger: ties keep a
  r.best = take ? b.best : a.best;
  r.best_id = take ? b.best_id : a.best_id;
  r.pending = take ? b.pending : a.pending;
  r.sum_x = a.sum_x + b.sum_x;
  return r;
}

struct ExtraFwdArgs {
  FwdArgs base;  // logprobs, entropy, lse, mean_z as in the two-output forward (max_z, log_s unused)
  float *sum_p2, *log_sum_p2;
  int64_t* argmax;
  float *max_logprob, *mean_logit;
};

// Merges a row's chunk states left to right from the empty state (as forward_impl), searches the
// chunk holding its max for the argmax, and writes the row; false when its id is out of range.
template <typename T>
LK_ALWAYS_INLINE bool finish_extra_row(const ExtraFwdArgs& e, int64_t r, const ExtraState* chunks, int64_t n_chunks) {
  const FwdArgs& a = e.base;
  ExtraState st{empty_state(), 0.0f, kNegInf, -1, 0.0, false};
  for (int64_t c = 0; c < n_chunks; ++c) st = merge_extra(st, chunks[c]);
  if (st.pending) {
    const T* chunk = static_cast<const T*>(a.logits) + r * a.row_stride + st.best_id;
    st.best_id += first_index_of(chunk, std::min(kChunk, a.vocab - st.best_id), st.best);
  }
  const bool ok = finish_row<T>(a, r, st.st);
  const float log_s = logf(st.st.s);
  const float log_sum_p2 = logf(st.s2) - 2.0f * log_s;  // all -inf row: -inf - -inf = NaN
  const bool has_mass = st.st.s > 0.0f;                  // false for an all -inf row and for NaN
  const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
  e.sum_p2[r] = expf(log_sum_p2);
  e.log_sum_p2[r] = log_sum_p2;
  e.argmax[r] = st.best_id < 0 ? 0 : st.best_id;
  e.max_logprob[r] = has_mass ? -log_s : __builtin_nanf("");  // m is the exact max: max z - lse = -log S
  e.mean_logit[r] = has_mass ? static_cast<float>(st.sum_x * inv_t / a.vocab) : __builtin_nanf("");
  return ok;
}

// One parallel region, as forward_impl: a row per iteration when there are enough rows, else the
// chunks of every row in parallel and the rows finished after.
template <typename T>
int64_t extra_forward_impl(const ExtraFwdArgs& e) {
  const FwdArgs& a = e.base;
  const int64_t n_chunks = (a.vocab + kChunk - 1) / kChunk;
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  if (a.n_rows >= a.threads || n_chunks == 1) {
#pragma omp parallel num_threads(a.threads) reduction(min : first_bad)
    {
      ExtraState* chunks = new ExtraState[n_chunks];
#pragma omp for schedule(static)
      for (int64_t r = 0; r < a.n_rows; ++r) {
        const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
        const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
        for (int64_t c = 0; c < n_chunks; ++c) {
          chunks[c] = chunk_extra_any(a.dtype, row + c * kChunk, std::min(kChunk, a.vocab - c * kChunk), c * kChunk,
                                      inv_t);
        }
        if (!finish_extra_row<T>(e, r, chunks, n_chunks)) first_bad = std::min(first_bad, r);
      }
      delete[] chunks;
    }
  } else {
    ExtraState* states = new ExtraState[a.n_rows * n_chunks];
    tile_states<T>(a, n_chunks, states, [&](const T* x, int64_t n, int64_t c, float inv_t) {
      return chunk_extra_any(a.dtype, x, n, c, inv_t);
    });
    for (int64_t r = 0; r < a.n_rows; ++r) {
      if (!finish_extra_row<T>(e, r, states + r * n_chunks, n_chunks)) first_bad = std::min(first_bad, r);
    }
    delete[] states;
  }
  return first_bad == std::numeric_limits<int64_t>::max() ? -1 : first_bad;
}

int64_t extra_forward(const ExtraFwdArgs& e) {
  int64_t out = -1;
  LK_DISPATCH_FLOAT(e.base.dtype, T, out = extra_forward_impl<T>(e));
  return out;
}

// d logits of every float output (see lenkernels/triton/token_stats_extra.py token_stats_extra_bwd_kernel);
// elementwise given the row's scalars, so out may alias x. sweep_grad (the two-output sweep) with
//   k0 = c_p + g_h (lse - mean_z),  c_p = g_lp + g_mlp + 2 g_lsp2 + 2 g_sp2 S2,  c_q = 2 g_sp2 + 2 g_lsp2 / S2
// (S2 = sum p^2, q = p^2 / S2) off the one-hots, c_q p^2 as p (c_q p) inside sweep_grad's FMA (no p^2,
// so no denormal product); kSq only where c_q != 0, kMean only where g_mean != 0. The target and the
// argmax (the one-hot terms g_lp / T, g_mlp / T) are redone after the sweep, from logits read before it.
template <bool kSq, bool kMean, typename T>
LK_ALWAYS_INLINE void extra_grad_chunk(const T* x, T* out, int64_t n, int64_t local_id, int64_t local_top,
                                       const SweepRow& row, float g_lp, float g_mlp) {
  const bool has_id = local_id >= 0 && local_id < n, has_top = local_top >= 0 && local_top < n;
  // read before the sweep: an in-place backward overwrites them
  const float x_id = has_id ? to_float(x[local_id]) : 0.0f, x_top = has_top ? to_float(x[local_top]) : 0.0f;
  sweep_chunk<kSq, kMean>(x, out, n, row);
  if (has_id) {
    const float hot = g_lp + (local_id == local_top ? g_mlp : 0.0f);
    out[local_id] = from_float<T>(sweep_grad<kSq, kMean>(x_id, row) + hot * row.inv_t);
  }
  if (has_top && local_top != local_id) {
    out[local_top] = from_float<T>(sweep_grad<kSq, kMean>(x_top, row) + g_mlp * row.inv_t);
  }
}

template <typename T>
LK_ALWAYS_INLINE void extra_grad_chunk(const T* x, T* out, int64_t n, int64_t local_id, int64_t local_top,
                                       const SweepRow& row, float g_lp, float g_mlp) {
  const bool sq = row.c_q != 0.0f, mean = row.g_mean_t != 0.0f;  // a NaN takes the general sweep
  if (sq && mean) {
    extra_grad_chunk<true, true>(x, out, n, local_id, local_top, row, g_lp, g_mlp);
  } else if (sq) {
    extra_grad_chunk<true, false>(x, out, n, local_id, local_top, row, g_lp, g_mlp);
  } else if (mean) {
    extra_grad_chunk<false, true>(x, out, n, local_id, local_top, row, g_lp, g_mlp);
  } else {
    extra_grad_chunk<false, false>(x, out, n, local_id, local_top, row, g_lp, g_mlp);
  }
}

LK_TARGET_CLONES void extra_grad_chunk_any(int dtype, const void* x, void* out, int64_t n, int64_t local_id,
                                           int64_t local_top, const SweepRow& row, float g_lp, float g_mlp) {
  LK_DISPATCH_FLOAT(dtype, T,
                    extra_grad_chunk(static_cast<const T*>(x), static_cast<T*>(out), n, local_id, local_top, row,
                                     g_lp, g_mlp));
}

// The sweep constants of row r (g: its six cotangents, g_lp already 0 on an ignored row).
LK_ALWAYS_INLINE SweepRow extra_sweep_row(float inv_t, float lse, float mean_z, float log_sum_p2, const float* g,
                                          int64_t vocab) {
  const float g_lp = g[0], g_h = g[1], g_sp2 = g[2], g_lsp2 = g[3], g_mlp = g[4], g_mean = g[5];
  const float sum_p2 = expf(log_sum_p2);
  const float c_p = g_lp + g_mlp + 2.0f * g_lsp2 + 2.0f * g_sp2 * sum_p2;
  const float c_q = 2.0f * g_sp2 + 2.0f * g_lsp2 * expf(-log_sum_p2);
  const float k0 = c_p + g_h * (lse - mean_z);  // lse - mean_z = H >= 0
  return SweepRow{inv_t, -inv_t, lse, opaque_clamp_floor() * kLn2, g_h, k0, c_q,
                  g_mean / static_cast<float>(vocab) * inv_t};
}

struct ExtraBwdArgs {
  BwdArgs base;  // g_logprobs / g_entropy unused: grads holds all six cotangents
  const float* log_sum_p2;
  const int64_t* argmax;
  const float* grads;  // [6, N]: g_lp, g_h, g_sum_p2, g_log_sum_p2, g_max_logprob, g_mean_logit
};

void extra_backward(const ExtraBwdArgs& e) {
  const BwdArgs& a = e.base;
  const int64_t n_chunks = (a.vocab + kChunk - 1) / kChunk;
  const int64_t n_tiles = a.n_rows * n_chunks;
  const int64_t elem = a.dtype == kFloat32 ? 4 : 2;
  if (a.dlogits != a.logits && a.dlogits_row_stride == a.vocab) advise_huge_pages(a.dlogits, a.n_rows * a.vocab * elem);
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t r = t / n_chunks, begin = (t % n_chunks) * kChunk;
    const int64_t id = a.ids[r];
    float g[6];
    for (int k = 0; k < 6; ++k) g[k] = e.grads[k * a.n_rows + r];
    if (id == a.ignore_index) g[0] = 0.0f;
    const SweepRow row = extra_sweep_row(inverse_temperature(a.temperature[r * a.temp_stride]), a.lse[r],
                                         a.mean_z[r], e.log_sum_p2[r], g, a.vocab);
    extra_grad_chunk_any(a.dtype, static_cast<const char*>(a.logits) + (r * a.row_stride + begin) * elem,
                         static_cast<char*>(a.dlogits) + (r * a.dlogits_row_stride + begin) * elem,
                         std::min(kChunk, a.vocab - begin), id - begin, e.argmax[r] - begin, row, g[0], g[4]);
  }
}

// --- selection (SPEC 7 top-k, a sampler's top-k): the k first ids of each row in rank order --------
// One read of a row. Rank keys (lenkernels/selection.h: value descending, id ascending, NaN first) are
// unique, so ties are exact by construction. Entries whose value reaches the current bound (the k-th
// value so far) are appended to a buffer of select_slack(k) keys past k; a full buffer is cut back to
// its k best (nth_element, O(k): O(1) a key), which raises the bound. A block of kSelectBlock logits
// costs one vectorised compare against the bound and is skipped when none reaches it (most blocks of a
// row). Entries equal to the bound that are left out are counted as they go: the tie count of the k-th
// value is exact at the end. A row of at least kSelectBlocksPerK * k blocks of kFloorBlock logits first
// takes the max of each block (the same read): the k-th largest is a floor under the k-th value, and
// only the blocks that reach it, about k, are visited (again, from cache) with the test above.

constexpr int64_t kSelectBlock = 64;
LK_ALWAYS_INLINE int64_t select_slack(int64_t k) { return std::max<int64_t>(k, 32); }
constexpr int64_t kFloorBlock = 256;      // the blocks of the floor under the k-th value (topk_row)
constexpr int64_t kSelectBlocksPerK = 4;  // rows of at least this many floor blocks per k take the floor

// kExpLanes logits as fp32, in an order of their own: 16-bit ones two per 32-bit load (lane k takes
// logit 2k, lane k + kExpLanes / 2 logit 2k + 1, as chunk_state's bf16 sweep), so that the loop that
// uses them runs on full-width fp32 vectors.
template <typename T>
LK_ALWAYS_INLINE void load_lanes(const T* x, float* v) {
  if constexpr (std::is_same<T, float>::value) {
#pragma omp simd
    for (int k = 0; k < kExpLanes; ++k) v[k] = x[k];
  } else {
#pragma omp simd
    for (int k = 0; k < kExpLanes / 2; ++k) {
      uint32_t pair;
      std::memcpy(&pair, x + 2 * k, 4);
      v[k] = to_float(T{static_cast<uint16_t>(pair & 0xffffu)});
      v[k + kExpLanes / 2] = to_float(T{static_cast<uint16_t>(pair >> 16)});
    }
  }
}

// visit(j + i), in order, for each i < kSelectBlock with flags[i] set (0 or 1): a word of 8 flags at a time.
template <class Visit>
LK_ALWAYS_INLINE void visit_flagged(int64_t j, const uint8_t* flags, const Visit& visit) {
  for (int w = 0; w < kSelectBlock; w += 8) {
    uint64_t word;
    std::memcpy(&word, flags + w, 8);
    for (; word; word &= word - 1) visit(j + w + (__builtin_ctzll(word) >> 3));
  }
}

// visit(j), in order, for every j < n whose (x_j - shift) * scale is not below *bound (NaN is not):
// a block of kSelectBlock logits none of which is costs one vectorised test. visit may raise *bound
// (read once a block: the test is loose, never tight; visit rechecks exactly).
template <typename T, class Visit>
LK_ALWAYS_INLINE void sweep_reached(const T* x, int64_t n, float shift, float scale, const float* bound,
                                    const Visit& visit) {
  int64_t j = 0;
  for (; j + kSelectBlock <= n; j += kSelectBlock) {
    const float b = *bound;
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int i = 0; i < kSelectBlock; ++i) hit |= !((to_float(x[j + i]) - shift) * scale < b);
    if (hit) {
      uint8_t flags[kSelectBlock];
#pragma omp simd
      for (int i = 0; i < kSelectBlock; ++i) flags[i] = !((to_float(x[j + i]) - shift) * scale < b);
      visit_flagged(j, flags, visit);
    }
  }
  for (; j < n; ++j) {
    if (!((to_float(x[j]) - shift) * scale < *bound)) visit(j);
  }
}

struct TopkRow {
  int64_t count;  // #{j : x_j >= the k-th value} (0 when the k-th value is NaN: NaN >= NaN is false)
  int64_t ties;   // entries equal to the k-th value left out of the k (0 when it is NaN)
};

// The k best of the n >= k rank keys in buf, moved to its front. `bound` (the order key of the k-th
// best) and `ties` (entries of that value left out) are updated: the bound never falls, and ties of a
// bound that rose are below it now.
LK_ALWAYS_INLINE void cut_to_best(uint64_t* buf, int64_t n, int64_t k, int32_t& bound, int64_t& ties) {
  if (n > k) std::nth_element(buf, buf + k - 1, buf + n, std::greater<uint64_t>());
  const int32_t next = rank_order_key(buf[k - 1]);
  int64_t dropped = 0;
  for (int64_t i = k; i < n; ++i) dropped += rank_order_key(buf[i]) == next;
  ties = (next == bound ? ties : 0) + dropped;
  bound = next;
}

// ids[0, k) <- the k first ids of row x[0, vocab) in rank order (1 <= k <= vocab); buf: k + select_slack(k)
// scratch keys, block_keys: 2 * (vocab / kFloorBlock).
template <typename T>
LK_ALWAYS_INLINE TopkRow topk_row(const T* x, int64_t vocab, int64_t k, uint64_t* buf, int32_t* block_keys,
                                  int64_t* ids) {
  const int64_t cap = k + select_slack(k);
  int32_t bound = std::numeric_limits<int32_t>::min();  // below every order key: the first k enter
  float bound_value = kNegInf;                           // the block filter's bound; NaN lets every block through
  int64_t n = 0, ties = 0;
  const auto visit = [&](int64_t j) {
    const int32_t key = value_order_key(to_float(x[j]));
    if (key < bound) return;
    if (key == bound) {  // a later id of the bound's value: below the k it is the bound of
      ++ties;
      return;
    }
    buf[n++] = rank_key(key, j);
    if (n == cap) {
      cut_to_best(buf, n, k, bound, ties);
      n = k;
      bound_value = to_float(x[rank_id(buf[k - 1])]);
    }
  };
  const int64_t n_blocks = vocab / kFloorBlock;
  if (n_blocks >= kSelectBlocksPerK * k) {
    // The k-th largest block max first: a floor under the k-th value (k blocks hold an entry at or
    // above it), so only the blocks that reach it are visited, ~k of them, in order.
    for (int64_t b = 0; b < n_blocks; ++b) {
      const T* xb = x + b * kFloorBlock;
      float mx[kExpLanes];
      int nan = 0;
      for (int l = 0; l < kExpLanes; ++l) mx[l] = kNegInf;
      for (int h = 0; h < kFloorBlock; h += kExpLanes) {
        float v[kExpLanes];
        load_lanes(xb + h, v);
#pragma omp simd reduction(| : nan)
        for (int l = 0; l < kExpLanes; ++l) {
          mx[l] = v[l] > mx[l] ? v[l] : mx[l];
          nan |= v[l] != v[l];
        }
      }
      for (int w = kExpLanes / 2; w > 0; w /= 2) {
        for (int l = 0; l < w; ++l) mx[l] = mx[l + w] > mx[l] ? mx[l + w] : mx[l];
      }
      block_keys[b] = nan ? kNanOrderKey : value_order_key(mx[0]);
    }
    std::copy(block_keys, block_keys + n_blocks, block_keys + n_blocks);
    std::nth_element(block_keys + n_blocks, block_keys + n_blocks + k - 1, block_keys + 2 * n_blocks,
                     std::greater<int32_t>());
    const int32_t floor_key = block_keys[n_blocks + k - 1];
    for (int64_t b = 0; b < n_blocks; ++b) {
      if (block_keys[b] < std::max(floor_key, bound)) continue;
      for (int64_t j = b * kFloorBlock; j < (b + 1) * kFloorBlock; j += kSelectBlock) {
        const int32_t f = std::max(floor_key, bound);
        uint8_t flags[kSelectBlock];
#pragma omp simd
        for (int i = 0; i < kSelectBlock; ++i) flags[i] = value_order_key(to_float(x[j + i])) >= f;
        visit_flagged(j, flags, visit);
      }
    }
    for (int64_t j = n_blocks * kFloorBlock; j < vocab; ++j) visit(j);
  } else {
    sweep_reached(x, vocab, 0.0f, 1.0f, &bound_value, visit);  // x - 0 and * 1 are exact
  }
  cut_to_best(buf, n, k, bound, ties);
  std::sort(buf, buf + k, std::greater<uint64_t>());
  int64_t nan = 0;
  for (int64_t i = 0; i < k; ++i) {
    ids[i] = rank_id(buf[i]);
    nan += rank_order_key(buf[i]) == kNanOrderKey;
  }
  if (bound == kNanOrderKey) return TopkRow{0, 0};
  return TopkRow{k - nan + ties, ties};
}

LK_TARGET_CLONES TopkRow topk_row_any(int dtype, const void* x, int64_t vocab, int64_t k, uint64_t* buf,
                                      int32_t* block_keys, int64_t* ids) {
  TopkRow out{0, 0};
  LK_DISPATCH_FLOAT(dtype, T, out = topk_row(static_cast<const T*>(x), vocab, k, buf, block_keys, ids));
  return out;
}

// out[0, n) <- the first n ids after `after` whose value equals x[after] (as the order compares them).
template <typename T>
LK_ALWAYS_INLINE void tied_ids(const T* x, int64_t vocab, int64_t after, int64_t n, int64_t* out) {
  const int32_t key = value_order_key(to_float(x[after]));
  int64_t m = 0;
  for (int64_t j = after + 1; j < vocab && m < n; ++j) {
    if (value_order_key(to_float(x[j])) == key) out[m++] = j;
  }
}

LK_TARGET_CLONES void tied_ids_any(int dtype, const void* x, int64_t vocab, int64_t after, int64_t n, int64_t* out) {
  LK_DISPATCH_FLOAT(dtype, T, tied_ids(static_cast<const T*>(x), vocab, after, n, out));
}

struct TopkArgs {
  const void* logits;
  int dtype;
  int64_t n_rows, vocab, row_stride, k;
  int64_t *ids, ids_stride;  // [N, >= k]
  int64_t *count, *ties;     // [N] each
  int threads;
};

void topk_select(const TopkArgs& a) {
  const int64_t elem = a.dtype == kFloat32 ? 4 : 2;
#pragma omp parallel num_threads(a.threads)
  {
    std::vector<uint64_t> buf(a.k + select_slack(a.k));
    std::vector<int32_t> block_keys(2 * (a.vocab / kFloorBlock));
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < a.n_rows; ++r) {
      const TopkRow out = topk_row_any(a.dtype, static_cast<const char*>(a.logits) + r * a.row_stride * elem, a.vocab,
                                       a.k, buf.data(), block_keys.data(), a.ids + r * a.ids_stride);
      a.count[r] = out.count;
      a.ties[r] = out.ties;
    }
  }
}

// Appends each row's ties[r] left-out ties of its k-th value after ids[r, k - 1] (ids[r, k:]).
void topk_ties(const TopkArgs& a) {
  const int64_t elem = a.dtype == kFloat32 ? 4 : 2;
#pragma omp parallel for schedule(dynamic, 1) num_threads(a.threads)
  for (int64_t r = 0; r < a.n_rows; ++r) {
    int64_t* ids = a.ids + r * a.ids_stride;
    if (a.ties[r] > 0) {
      tied_ids_any(a.dtype, static_cast<const char*>(a.logits) + r * a.row_stride * elem, a.vocab, ids[a.k - 1],
                   a.ties[r], ids + a.k);
    }
  }
}

// --- a sampler's kept set without top-k (top-p and/or min-p): at most three reads of a row ---------
// u = (x - x_max) log2(e) / T = log2(p_j / max p), in fp32 as the dense sweep forms it.
//   read 1: the row's max;
//   read 2 (top-p): chunk by chunk, as the dense sweep (an exp2 sweep of the L1-resident chunk, then a
//           vectorised test of it): the fp32 mass of the entries with u <= -kKeptFine (the tail) and
//           the rank keys of the others (a peaked row has few). Their mass per bucket of u (kKeptPerUnit
//           a unit) gives the bucket where the cumulative mass reaches p S; the set's candidates are
//           the keys above the next bucket edge (one bucket of margin);
//   read 3: only where the cut lies in the tail (or min-p alone: read 2), the ids with u above the
//           bound (every finite id; u > log2(min_p) less a bucket).
// The candidates are sorted by rank key and the set decided on them as the torch path decides it, in
// float64: r = exp(z - max z), keep j while S - sum_{before j} r > (1 - p) S, r_j >= min_p, z_j > -inf,
// with S = the exact sum over the candidates plus the fp32 mass of the rest (S's rounding is that of the
// mass left out, not of the row's). A row with a NaN, a max that is not finite, or a set that would run
// past its candidates (a cut within rounding of a bucket edge) is left to the caller: size -1.
// Moves the kept ones of the candidates out[0, n) (rank order; r_i = exp(z_i - max z), S = mass) to the
// front of out and returns how many: keep i while S - sum_{before i} r > (1 - p) S (top_p < 1),
// r_i >= min_p (min_p > 0) and z_i > -inf.
template <typename T>
LK_ALWAYS_INLINE int64_t keep_prefix(const T* x, int64_t* out, int64_t n, const double* ratios, double mass,
                                     double temp, double top_p, double min_p) {
  double cum = 0.0;
  int64_t size = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = out[i];
    const double r = ratios[i];
    cum += r;
    bool keep = static_cast<double>(to_float(x[id])) / temp > -std::numeric_limits<double>::infinity();
    if (top_p < 1.0) keep &= mass - (cum - r) > (1.0 - top_p) * mass;
    if (min_p > 0.0) keep &= r >= min_p;
    if (keep) out[size++] = id;
  }
  return size;
}

constexpr int kKeptPerUnit = 8;  // a power of two: the bucket of u, floor(-u * 8), is exact
constexpr int kKeptFine = 16;    // p_j / max p > 2^-16: keys; below: the tail
constexpr int kKeptBuckets = kKeptFine * kKeptPerUnit;

// The bucket edge above which the set's candidates lie for top-p (-inf: every finite id).
LK_ALWAYS_INLINE float top_p_edge(const double* fine, double tail, double top_p) {
  double mass = tail;
  for (int b = 0; b < kKeptBuckets; ++b) mass += fine[b];
  const double target = top_p * mass;
  double acc = 0.0;
  for (int b = 0; b < kKeptBuckets; ++b) {
    acc += fine[b];  // bucket b: u in (-(b + 1) / R, -b / R]
    if (acc >= target) return -static_cast<float>(std::min(b + 2, kKeptBuckets)) / kKeptPerUnit;
  }
  return kNegInf;
}

// One read, chunk by chunk: the tail's mass (u <= -kKeptFine; NaN when a NaN is met) and the rank keys
// of the others, against the row's max x_max (finite).
template <typename T>
LK_ALWAYS_INLINE double tail_and_keys(const T* x, int64_t vocab, float x_max, float scale,
                                      std::vector<uint64_t>& keys) {
  const float lo = opaque_clamp_floor();
  const float bound = -kKeptFine;
  double tail = 0.0;
  keys.clear();
  for (int64_t c = 0; c < vocab; c += kChunk) {
    const int64_t n = std::min(kChunk, vocab - c);
    const T* xc = x + c;
    // two sweeps of the L1-resident chunk, as chunk_state: the tail's exp2 (branch free), then the keys
    float lanes[kExpLanes];
    for (int k = 0; k < kExpLanes; ++k) lanes[k] = 0.0f;
    int64_t j = 0;
    for (; j + kExpLanes <= n; j += kExpLanes) {
      for (size_t line = 0; line < kExpLanes * sizeof(T); line += 64) prefetch_ahead(xc + j, line);
      float v[kExpLanes];
      load_lanes(xc + j, v);
#pragma omp simd
      for (int k = 0; k < kExpLanes; ++k) {
        const float u = log2_offset(v[k], x_max, scale, lo);  // NaN stays NaN: the tail too
        lanes[k] += u > bound ? 0.0f : exp2_clamped(u);
      }
    }
    for (int k = 0; j + k < n; ++k) {
      const float u = log2_offset(to_float(xc[j + k]), x_max, scale, lo);
      lanes[k] += u > bound ? 0.0f : exp2_clamped(u);
    }
    for (int k = 0; k < kExpLanes; ++k) tail += lanes[k];
    sweep_reached(xc, n, x_max, scale, &bound, [&](int64_t i) {
      const float v = to_float(xc[i]);
      if ((v - x_max) * scale > bound) keys.push_back(rank_key(value_order_key(v), c + i));
    });
  }
  return tail;
}

template <typename T>
LK_ALWAYS_INLINE int64_t kept_row(const T* x, int64_t vocab, double temp, double top_p, double min_p,
                                  std::vector<uint64_t>& keys, std::vector<double>& ratios, int64_t* out,
                                  int64_t capacity) {
  const float scale = static_cast<float>(1.0 / temp) * kLog2e;
  float x_max = kNegInf, u_lo = kNegInf;  // the candidates: u > u_lo
  double fine[kKeptBuckets] = {}, tail = 0.0;
  for (int64_t c = 0; c < vocab; c += kChunk) x_max = max_nan(x_max, raw_max(x + c, std::min(kChunk, vocab - c)));
  if (!(std::fabs(x_max) < -kNegInf)) return -1;  // all -inf, +inf, or a NaN raw_max took (else found below)
  if (top_p < 1.0) {
    tail = tail_and_keys(x, vocab, x_max, scale, keys);
    if (tail != tail) return -1;
    for (const uint64_t key : keys) {
      const float u = (to_float(x[rank_id(key)]) - x_max) * scale;  // in (-kKeptFine, 0]
      fine[static_cast<int>(-u * kKeptPerUnit)] += exp2_clamped(u);
    }
    u_lo = top_p_edge(fine, tail, top_p);
  }
  bool bounded_by_min_p = false;  // the ids left out all fail min-p
  if (min_p > 0.0) {
    float u_min = static_cast<float>(std::log2(min_p)) - 1.0f / kKeptPerUnit;
    if (top_p < 1.0) {  // a bucket edge at or below it, so that the mass beyond is known
      u_min = u_min > -kKeptFine ? std::floor(u_min * kKeptPerUnit) / kKeptPerUnit : kNegInf;
    }
    bounded_by_min_p = u_min >= u_lo;
    u_lo = std::max(u_lo, u_min);
  }
  if (top_p < 1.0 && u_lo >= -kKeptFine) {  // the candidates are among the keys
    size_t kept = 0;
    for (const uint64_t key : keys) {
      if ((to_float(x[rank_id(key)]) - x_max) * scale > u_lo) keys[kept++] = key;
    }
    keys.resize(kept);
  } else {  // read the row (again) for them
    keys.clear();
    bool nan = false;
    const auto collect = [&](int64_t j) {
      const float v = to_float(x[j]);
      nan |= v != v;
      if ((v - x_max) * scale > u_lo) keys.push_back(rank_key(value_order_key(v), j));
    };
    sweep_reached(x, vocab, x_max, scale, &u_lo, collect);
    if (nan) return -1;
  }
  if (static_cast<int64_t>(keys.size()) > capacity) return -2;
  std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());
  const double z_max = static_cast<double>(x_max) / temp;
  // S: the candidates' exact ratios and the fp32 mass of the rest (the tail, the buckets below u_lo)
  double mass = u_lo == kNegInf ? 0.0 : tail;
  for (int b = u_lo == kNegInf ? kKeptBuckets : static_cast<int>(-u_lo * kKeptPerUnit); b < kKeptBuckets; ++b) {
    mass += fine[b];
  }
  const double rest = mass;
  const int64_t n = static_cast<int64_t>(keys.size());
  ratios.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = rank_id(keys[i]);
    ratios[i] = std::exp(static_cast<double>(to_float(x[out[i]])) / temp - z_max);
    mass += ratios[i];
  }
  // the first id left out would be kept: the cut ran past the candidates
  if (top_p < 1.0 && !bounded_by_min_p && rest > (1.0 - top_p) * mass) return -1;
  return keep_prefix(x, out, n, ratios.data(), mass, temp, top_p, min_p);
}

// A sampler's kept set with top-k (0 < k < vocab): the survivors (every id >= the k-th value, in rank
// order: topk_row's k and the tied ids past them) in one read, then top-p / min-p among them as the
// torch path (_truncate) decides it: r = exp(z - z_first), S = the survivors' sum. A row with NaN among
// the k or a first value that is not finite is left to the caller: -1.
template <typename T>
LK_ALWAYS_INLINE int64_t kept_topk_row(const T* x, int64_t vocab, int64_t k, double temp, double top_p,
                                       double min_p, uint64_t* buf, int32_t* block_keys, std::vector<double>& ratios,
                                       int64_t* out, int64_t capacity) {
  const TopkRow top = topk_row(x, vocab, k, buf, block_keys, out);
  if (top.count != k + top.ties) return -1;  // a NaN among the k, or the k-th value NaN
  if (top.count > capacity) return -2;
  if (top.ties > 0) tied_ids(x, vocab, out[k - 1], top.ties, out + k);
  const double z_max = static_cast<double>(to_float(x[out[0]])) / temp;
  if (!(std::fabs(z_max) < std::numeric_limits<double>::infinity())) return -1;
  ratios.resize(top.count);
  double mass = 0.0;
  for (int64_t i = 0; i < top.count; ++i) {
    ratios[i] = std::exp(static_cast<double>(to_float(x[out[i]])) / temp - z_max);
    mass += ratios[i];
  }
  return keep_prefix(x, out, top.count, ratios.data(), mass, temp, top_p, min_p);
}

LK_TARGET_CLONES int64_t kept_row_any(int dtype, const void* x, int64_t vocab, int64_t top_k, double temp,
                                      double top_p, double min_p, std::vector<uint64_t>& keys,
                                      std::vector<int32_t>& block_keys, std::vector<double>& ratios, int64_t* out,
                                      int64_t capacity) {
  int64_t size = -1;
  if (top_k > 0) {
    LK_DISPATCH_FLOAT(dtype, T,
                      size = kept_topk_row(static_cast<const T*>(x), vocab, top_k, temp, top_p, min_p, keys.data(),
                                           block_keys.data(), ratios, out, capacity));
  } else {
    LK_DISPATCH_FLOAT(dtype, T,
                      size = kept_row(static_cast<const T*>(x), vocab, temp, top_p, min_p, keys, ratios, out,
                                      capacity));
  }
  return size;
}

struct KeptArgs {
  const void* logits;
  int dtype;
  int64_t n_rows, vocab, row_stride, top_k;  // top_k: 0 (none) or in (0, vocab)
  const double* temperature;
  int64_t temp_stride;
  double top_p, min_p;
  int64_t *out, out_stride;  // [N, out_stride]: row r's kept ids in out[r, :sizes[r]]; slots for its candidates
  int64_t* sizes;            // [N]; -1: left to the caller, -2: more than out_stride candidates
  int threads;
};

void sampler_kept(const KeptArgs& a) {
  const int64_t elem = a.dtype == kFloat32 ? 4 : 2;
#pragma omp parallel num_threads(a.threads)
  {
    std::vector<uint64_t> keys(a.top_k > 0 ? a.top_k + select_slack(a.top_k) : 0);
    std::vector<int32_t> block_keys(a.top_k > 0 ? 2 * (a.vocab / kFloorBlock) : 0);
    std::vector<double> ratios;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < a.n_rows; ++r) {
      a.sizes[r] = kept_row_any(a.dtype, static_cast<const char*>(a.logits) + r * a.row_stride * elem, a.vocab,
                                a.top_k, a.temperature[r * a.temp_stride], a.top_p, a.min_p, keys, block_keys,
                                ratios, a.out + r * a.out_stride, a.out_stride);
    }
  }
}

void define(py::module_& m) {
  m.def(
      "token_stats_fwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, Addr temperature,
         int64_t temp_stride, int64_t ignore_index, Addr logprobs, Addr entropy, Addr lse, Addr mean_z, Addr max_z,
         Addr log_s, int threads, Addr sparse, int64_t n_sparse, Addr z_sparse) {
        return forward(FwdArgs{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index},
                               logprobs, entropy, lse, mean_z, max_z, log_s, threads_for(threads), sparse, n_sparse,
                               z_sparse});
      },
      LK_NOGIL,
      "Returns -1, or the first row whose id is outside [0, vocab) and not ignore_index. max_z and log_s "
      "(0 = not wanted) receive each row's online-softmax state: lse = max_z + log_s. z_sparse (0 = not "
      "wanted; [N, n_sparse] fp32) receives x / T at the int64 ids sparse [N, n_sparse], clamped into [0, vocab).");
  m.def("token_stats_bwd", [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids,
                              Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr lse, Addr mean_z,
                              Addr g_logprobs, int64_t g_logprobs_stride, Addr g_entropy, int64_t g_entropy_stride,
                              Addr dlogits, int64_t dlogits_row_stride, int threads, Addr sparse, int64_t n_sparse,
                              Addr g_sparse) {
    backward(BwdArgs{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index}, lse,
                     mean_z, g_logprobs, g_entropy, g_logprobs_stride, g_entropy_stride, dlogits, dlogits_row_stride,
                     threads_for(threads), sparse, g_sparse, n_sparse});
  }, LK_NOGIL);
  m.def(
      "token_stats_extra_fwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, Addr temperature,
         int64_t temp_stride, int64_t ignore_index, Addr logprobs, Addr entropy, Addr lse, Addr mean_z, Addr sum_p2,
         Addr log_sum_p2, Addr argmax, Addr max_logprob, Addr mean_logit, int threads) {
        const FwdArgs base{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index},
                           logprobs, entropy, lse, mean_z, nullptr, nullptr, threads_for(threads), nullptr, 0, nullptr};
        return extra_forward(ExtraFwdArgs{base, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit});
      },
      LK_NOGIL, "Every SPEC 7 statistic of lenkernels.token_stats; returns -1 or the first row with a bad id.");
  m.def(
      "topk_select",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, int64_t k, Addr ids,
         int64_t ids_stride, Addr count, Addr ties, int threads) {
        check_float_dtype(dtype);
        require(k >= 1 && k <= vocab && vocab <= int64_t(0xffffffffu) && ids_stride >= k,
                "topk_select needs 1 <= k <= vocab < 2^32 and ids_stride >= k");
        topk_select(TopkArgs{logits, dtype, n_rows, vocab, row_stride, k, ids, ids_stride, count, ties,
                             threads_for(threads)});
      },
      LK_NOGIL,
      "ids[r, :k] <- the k first ids of row r by (value descending, id ascending, NaN first); count[r] <- "
      "#{j : x_j >= the k-th value}, ties[r] <- the ids of that value left out (both 0 when it is NaN).");
  m.def(
      "topk_ties",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, int64_t k, Addr ids,
         int64_t ids_stride, Addr ties, int threads) {
        check_float_dtype(dtype);
        require(k >= 1 && k <= vocab, "topk_ties needs 1 <= k <= vocab");
        topk_ties(TopkArgs{logits, dtype, n_rows, vocab, row_stride, k, ids, ids_stride, nullptr, ties,
                           threads_for(threads)});
      },
      LK_NOGIL,
      "ids[r, k : k + ties[r]] <- the ids after ids[r, k - 1] of its value, ascending (topk_select's ties; "
      "ids_stride >= k + max(ties)).");
  m.def(
      "sampler_kept",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, int64_t top_k, Addr temperature,
         int64_t temp_stride, double top_p, double min_p, Addr out, int64_t out_stride, Addr sizes, int threads) {
        check_float_dtype(dtype);
        require(vocab <= int64_t(0xffffffffu) && top_k >= 0 && top_k < vocab &&
                    out_stride >= std::max<int64_t>(top_k, 1) && top_p > 0.0 && top_p <= 1.0 && min_p >= 0.0 &&
                    min_p <= 1.0,
                "sampler_kept needs vocab < 2^32, top_k in [0, vocab), out_stride >= max(top_k, 1), top_p in (0, 1], "
                "min_p in [0, 1]");
        sampler_kept(KeptArgs{logits, dtype, n_rows, vocab, row_stride, top_k, temperature, temp_stride, top_p, min_p,
                              out, out_stride, sizes, threads_for(threads)});
      },
      LK_NOGIL,
      "out[r, :sizes[r]] <- row r's kept ids under top-k (0: none), top-p, min-p, by (z descending, id "
      "ascending); sizes[r] = -1 where the row is left to the caller (NaN, a max that is not finite, a cut "
      "past the collected ids), -2 where its candidates need more than out_stride slots (vocab always "
      "suffices). temperature: float64.");
  m.def("token_stats_extra_bwd", [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                                    Addr ids, Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr lse,
                                    Addr mean_z, Addr log_sum_p2, Addr argmax, Addr grads, Addr dlogits,
                                    int64_t dlogits_row_stride, int threads) {
    const BwdArgs base{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index}, lse,
                       mean_z, nullptr, nullptr, 0, 0, dlogits, dlogits_row_stride, threads_for(threads), nullptr,
                       nullptr, 0};
    extra_backward(ExtraBwdArgs{base, log_sum_p2, argmax, grads});
  }, LK_NOGIL);
}

}  // namespace
}  // namespace cpu
}  // namespace lk

LK_MODULE(_cpu_token_stats,
          "lenkernels CPU kernels: token log-probabilities and entropy, vocabulary selections (raw pointers)",
          lk::cpu::define)
