// Token log-probabilities and entropy from logits on the CPU (SPEC 1).
//   forward:  one read of each [V] row -> logprob, entropy, lse, mean_z   (fp32, [N] each), and
//             optionally the row's state (max z, log S) for merging vocabulary parts
//   backward: one read + one write of each row -> dlogits in the logits dtype (may alias logits)
// A row is cut into fixed kChunk-element chunks; each chunk is reduced to an online-softmax state
// (a max sweep, then one exp2 sweep over the same L1-resident logits, while the next chunk is
// prefetched), and the states are merged left to right.  The chunk structure never depends on the
// thread count, so results are bitwise reproducible whether a row runs on one thread or is split
// across all of them (few rows, large V).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_utils.h"
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

// One chunk of one row: d logits for n entries (SPEC 1). out may alias x (in-place backward).
// Off the target, grad = -p (g_lp + g_h (z - mean_z)) / T with z - mean_z = d + (lse - mean_z) and
// d = x / T - lse (the product rounded first: rounded_product) clamped at -127 ln 2, where
// p = 2^(d log2 e) is exactly 0: a masked logit gets 0, never 0 * -inf.  The target is redone after.
template <typename T>
LK_ALWAYS_INLINE void grad_chunk(const T* x, T* out, int64_t n, int64_t local_id, float inv_t, float lse,
                                 float mean_z, float g_lp, float g_h) {
  // read the target logit before the sweep: with an in-place backward the sweep overwrites it
  const bool has_target = g_lp != 0.0f && local_id >= 0 && local_id < n;
  const float x_target = has_target ? to_float(x[local_id]) : 0.0f;
  const float lo = opaque_clamp_floor() * kLn2;
  const float k0 = g_lp + g_h * (lse - mean_z);  // lse - mean_z = H >= 0: no cancellation
  const float neg_inv_t = -inv_t;
  const auto grad = [&](int64_t j) {
    const float d = rounded_product(to_float(x[j]), inv_t) - lse;
    const float dc = d < lo ? lo : d;
    const float p = exp2_clamped(dc * kLog2e);
    out[j] = store_value<T>(p * (g_h * dc + k0) * neg_inv_t);
  };
  stream_lines(x, out, n, grad);
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
    grad_chunk_any(a.dtype, static_cast<const char*>(a.logits) + (r * a.row_stride + begin) * elem,
                   static_cast<char*>(a.dlogits) + (r * a.dlogits_row_stride + begin) * elem,
                   std::min(kChunk, a.vocab - begin), id - begin,
                   inverse_temperature(a.temperature[r * a.temp_stride]), a.lse[r], a.mean_z[r], g_lp, g_h);
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

// d logits of every float output (see lenkernels/triton/token_stats.py token_stats_extra_bwd_kernel);
// elementwise given the row's scalars, so out may alias x. As grad_chunk: one exp2 per logit, with
// d = z - lse clamped at -127 ln 2 (p exactly 0 there), and
//   grad = (-p (c_p + g_h (d + lse - mean_z)) + c_q p^2 + [z finite] g_mean) / T  off the one-hots,
// c_p = g_lp + g_mlp + 2 g_lsp2 + 2 g_sp2 S2 and c_q = 2 g_sp2 + 2 g_lsp2 / S2 (S2 = sum p^2, q = p^2 / S2);
// p^2 is dropped below 2^-124 (p < 2^-62: never a denormal product). The target and the argmax (the
// one-hot terms) are redone after the sweep, from logits read before it.
template <typename T>
LK_ALWAYS_INLINE void extra_grad_chunk(const T* x, T* out, int64_t n, int64_t local_id, int64_t local_top,
                                       float inv_t, float lse, float mean_z, float log_sum_p2, const float* g) {
  const float g_lp = g[0], g_h = g[1], g_sp2 = g[2], g_lsp2 = g[3], g_mlp = g[4], g_mean = g[5];
  const float sum_p2 = expf(log_sum_p2);
  const float c_p = g_lp + g_mlp + 2.0f * g_lsp2 + 2.0f * g_sp2 * sum_p2;
  const float c_q = 2.0f * g_sp2 + 2.0f * g_lsp2 * expf(-log_sum_p2);
  const float k0 = c_p + g_h * (lse - mean_z);  // lse - mean_z = H >= 0
  const float lo = opaque_clamp_floor() * kLn2;
  constexpr float kQFloor = -62.0f * kLn2;
  const bool has_id = local_id >= 0 && local_id < n, has_top = local_top >= 0 && local_top < n;
  // read before the sweep: an in-place backward overwrites them
  const float x_id = has_id ? to_float(x[local_id]) : 0.0f, x_top = has_top ? to_float(x[local_top]) : 0.0f;
  const auto value = [&](float v) {
    const float z = rounded_product(v, inv_t);  // as grad_chunk: d = 0 exactly at a max with S = 1
    const float d = z - lse;
    const float dc = d < lo ? lo : d;
    const float p = exp2_clamped(dc * kLog2e);
    const float pp = dc > kQFloor ? p * p : 0.0f;
    return -p * (g_h * dc + k0) + c_q * pp + (std::fabs(z) < -kNegInf ? g_mean : 0.0f);
  };
  stream_lines(x, out, n, [&](int64_t j) { out[j] = store_value<T>(value(to_float(x[j])) * inv_t); });
  if (has_id) {
    const float hot = g_lp + (local_id == local_top ? g_mlp : 0.0f);
    out[local_id] = from_float<T>((hot + value(x_id)) * inv_t);
  }
  if (has_top && local_top != local_id) out[local_top] = from_float<T>((g_mlp + value(x_top)) * inv_t);
}

LK_TARGET_CLONES void extra_grad_chunk_any(int dtype, const void* x, void* out, int64_t n, int64_t local_id,
                                           int64_t local_top, float inv_t, float lse, float mean_z, float log_sum_p2,
                                           const float* g) {
  LK_DISPATCH_FLOAT(dtype, T,
                    extra_grad_chunk(static_cast<const T*>(x), static_cast<T*>(out), n, local_id, local_top, inv_t,
                                     lse, mean_z, log_sum_p2, g));
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
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t r = t / n_chunks, begin = (t % n_chunks) * kChunk;
    const int64_t id = a.ids[r];
    float g[6];
    for (int k = 0; k < 6; ++k) g[k] = e.grads[k * a.n_rows + r];
    if (id == a.ignore_index) g[0] = 0.0f;
    g[5] /= static_cast<float>(a.vocab);
    extra_grad_chunk_any(a.dtype, static_cast<const char*>(a.logits) + (r * a.row_stride + begin) * elem,
                         static_cast<char*>(a.dlogits) + (r * a.dlogits_row_stride + begin) * elem,
                         std::min(kChunk, a.vocab - begin), id - begin, e.argmax[r] - begin,
                         inverse_temperature(a.temperature[r * a.temp_stride]), a.lse[r], a.mean_z[r],
                         e.log_sum_p2[r], g);
  }
}

void define(py::module_& m) {
  m.def(
      "token_stats_fwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, Addr temperature,
         int64_t temp_stride, int64_t ignore_index, Addr logprobs, Addr entropy, Addr lse, Addr mean_z, Addr max_z,
         Addr log_s, int threads) {
        return forward(FwdArgs{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index},
                               logprobs, entropy, lse, mean_z, max_z, log_s, threads_for(threads)});
      },
      LK_NOGIL,
      "Returns -1, or the first row whose id is outside [0, vocab) and not ignore_index. max_z and log_s "
      "(0 = not wanted) receive each row's online-softmax state: lse = max_z + log_s.");
  m.def("token_stats_bwd", [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids,
                              Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr lse, Addr mean_z,
                              Addr g_logprobs, int64_t g_logprobs_stride, Addr g_entropy, int64_t g_entropy_stride,
                              Addr dlogits, int64_t dlogits_row_stride, int threads) {
    backward(BwdArgs{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index}, lse,
                     mean_z, g_logprobs, g_entropy, g_logprobs_stride, g_entropy_stride, dlogits, dlogits_row_stride,
                     threads_for(threads)});
  }, LK_NOGIL);
  m.def(
      "token_stats_extra_fwd",
      [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, Addr ids, Addr temperature,
         int64_t temp_stride, int64_t ignore_index, Addr logprobs, Addr entropy, Addr lse, Addr mean_z, Addr sum_p2,
         Addr log_sum_p2, Addr argmax, Addr max_logprob, Addr mean_logit, int threads) {
        const FwdArgs base{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index},
                           logprobs, entropy, lse, mean_z, nullptr, nullptr, threads_for(threads)};
        return extra_forward(ExtraFwdArgs{base, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit});
      },
      LK_NOGIL, "Every SPEC 7 statistic of lenkernels.token_stats; returns -1 or the first row with a bad id.");
  m.def("token_stats_extra_bwd", [](Addr logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                                    Addr ids, Addr temperature, int64_t temp_stride, int64_t ignore_index, Addr lse,
                                    Addr mean_z, Addr log_sum_p2, Addr argmax, Addr grads, Addr dlogits,
                                    int64_t dlogits_row_stride, int threads) {
    const BwdArgs base{{logits, dtype, n_rows, vocab, row_stride, ids, temperature, temp_stride, ignore_index}, lse,
                       mean_z, nullptr, nullptr, 0, 0, dlogits, dlogits_row_stride, threads_for(threads)};
    extra_backward(ExtraBwdArgs{base, log_sum_p2, argmax, grads});
  }, LK_NOGIL);
}

}  // namespace
}  // namespace cpu
}  // namespace lk

LK_MODULE(_cpu_token_stats, "lenkernels CPU kernels: token log-probabilities and entropy (raw pointers)",
          lk::cpu::define)
