// Token log-probabilities and entropy from logits on the CPU (SPEC 1).
//   forward:  one read of each [V] row -> logprob, entropy, lse, mean_z   (fp32, [N] each), and
//             optionally the row's state (max z, log S) for merging vocabulary parts
//   backward: one read + one write of each row -> dlogits in the logits dtype (may alias logits)
// A row is cut into fixed kChunk-element chunks; each chunk is scaled into an L1-resident fp32
// buffer, reduced to an online-softmax state, and the states are merged left to right.  The chunk
// structure never depends on the thread count, so results are bitwise reproducible whether a row
// runs on one thread or is split across all of them (few rows, large V).
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_utils.h"
#include "lenkernels/softmax_state.h"
#include "lenkernels/token_stats.h"

namespace lk {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of fp32: stays in L1 between the max and the exp sweep

template <typename T>
LK_ALWAYS_INLINE SoftmaxState chunk_state(const T* x, int64_t n, float inv_t, float* buf) {
  float mx[kLanes];
  for (int k = 0; k < kLanes; ++k) mx[k] = kNegInf;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const float z = to_float(x[i + k]) * inv_t;
      buf[i + k] = z;
      mx[k] = max_nan(mx[k], z);
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const float z = to_float(x[i + k]) * inv_t;
    buf[i + k] = z;
    mx[k] = max_nan(mx[k], z);
  }
  float m = mx[0];
  for (int k = 1; k < kLanes; ++k) m = max_nan(m, mx[k]);
  if (m == kNegInf) return empty_state();  // a fully masked chunk contributes nothing

  float s[kLanes], u[kLanes];
  for (int k = 0; k < kLanes; ++k) s[k] = u[k] = 0.0f;
  for (i = 0; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const float d = buf[i + k] - m;
      const float e = fast_exp(d);
      s[k] += e;
      u[k] += weighted_offset(e, d);
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const float d = buf[i + k] - m;
    const float e = fast_exp(d);
    s[k] += e;
    u[k] += weighted_offset(e, d);
  }
  // pairwise lane reduction in a fixed order
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) {
      s[k] += s[k + w];
      u[k] += u[k + w];
    }
  }
  return SoftmaxState{m, s[0], u[0]};
}

// The ISA-specific entry points sit below the OpenMP regions: an outlined parallel body does not
// inherit the target of its enclosing function, so the clones must be the functions it calls.
LK_TARGET_CLONES SoftmaxState chunk_state_any(int dtype, const void* x, int64_t n, float inv_t, float* buf) {
  SoftmaxState st = empty_state();
  LK_DISPATCH_FLOAT(dtype, T, st = chunk_state(static_cast<const T*>(x), n, inv_t, buf));
  return st;
}

template <typename T>
LK_ALWAYS_INLINE SoftmaxState row_state(const T* row, int64_t vocab, float inv_t, float* buf, int dtype) {
  SoftmaxState st = empty_state();
  for (int64_t c = 0; c < vocab; c += kChunk) {
    st = merge(st, chunk_state_any(dtype, row + c, std::min(kChunk, vocab - c), inv_t, buf));
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

// states[t] = chunk(x, n, c, inv_t, buf) for every tile t = (row r, chunk at column c) of n logits x,
// in parallel (the rows' states are merged afterwards, left to right: a fixed order).
template <typename T, class State, class Chunk>
void tile_states(const FwdArgs& a, int64_t n_chunks, State* states, const Chunk& chunk) {
  const int64_t n_tiles = a.n_rows * n_chunks;
#pragma omp parallel num_threads(a.threads)
  {
    alignas(64) float buf[kChunk];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t r = t / n_chunks, c = (t % n_chunks) * kChunk;
      const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
      const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
      states[t] = chunk(row + c, std::min(kChunk, a.vocab - c), c, inv_t, buf);
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
      alignas(64) float buf[kChunk];
      const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
      const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
      if (!finish_row<T>(a, r, row_state(row, a.vocab, inv_t, buf, a.dtype))) first_bad = std::min(first_bad, r);
    }
  } else {
    // Few rows: chunk states in parallel, then the same left-to-right merge per row.
    SoftmaxState* states = new SoftmaxState[a.n_rows * n_chunks];
    tile_states<T>(a, n_chunks, states, [&](const T* x, int64_t n, int64_t, float inv_t, float* buf) {
      return chunk_state_any(a.dtype, x, n, inv_t, buf);
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

// One chunk of one row: d logits for n entries (SPEC 1). out may alias x (in-place backward).
template <typename T>
LK_ALWAYS_INLINE void grad_chunk(const T* x, T* out, int64_t n, int64_t local_id, float inv_t, float lse,
                                 float mean_z, float g_lp, float g_h) {
  // read the target logit before the sweep: with an in-place backward the sweep overwrites it
  const bool has_target = g_lp != 0.0f && local_id >= 0 && local_id < n;
  const float z_target = has_target ? to_float(x[local_id]) * inv_t : 0.0f;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float z = to_float(x[j]) * inv_t;
    const float p = fast_exp(z - lse);
    out[j] = from_float<T>(token_stats_grad(z, false, mean_z, g_lp, g_h, inv_t, p));
  }
  if (has_target) {
    const float p = fast_exp(z_target - lse);
    out[local_id] = from_float<T>(token_stats_grad(z_target, true, mean_z, g_lp, g_h, inv_t, p));
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
// reduced by the same chunk_state (so logprob and entropy are the same fp32 operations), then its
// L1-resident fp32 copy is swept again for S2 = sum exp(2 (z - m)) (log_sum_p2 = log S2 - 2 log S:
// no cancellation), the lowest index of the largest logit and the sum of the finite logits.

struct ExtraState {
  SoftmaxState st;
  float s2;
  float best;       // the largest raw logit
  int64_t best_id;  // its lowest index, -1 while only -inf was seen
  double sum_x;     // sum of the finite raw logits
};

template <typename T>
LK_ALWAYS_INLINE ExtraState chunk_extra(const T* x, int64_t n, int64_t base, float inv_t, float* buf) {
  ExtraState e{chunk_state(x, n, inv_t, buf), 0.0f, kNegInf, -1, 0.0};
  if (e.st.s != 0.0f) {
    float s2[kLanes];
    for (int k = 0; k < kLanes; ++k) s2[k] = 0.0f;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) {
        const float p = fast_exp(buf[i + k] - e.st.m);
        s2[k] += p * p;
      }
    }
    for (int k = 0; i + k < n; ++k) {
      const float p = fast_exp(buf[i + k] - e.st.m);
      s2[k] += p * p;
    }
    for (int w = kLanes / 2; w > 0; w /= 2) {
      for (int k = 0; k < w; ++k) s2[k] += s2[k + w];
    }
    e.s2 = s2[0];
  }
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_float(x[j]);
    if (v > e.best || (e.best_id < 0 && v == kNegInf)) {
      e.best = v;
      e.best_id = base + j;
    }
    if (std::isfinite(v)) e.sum_x += v;
  }
  return e;
}

LK_TARGET_CLONES ExtraState chunk_extra_any(int dtype, const void* x, int64_t n, int64_t base, float inv_t,
                                            float* buf) {
  ExtraState e{};
  LK_DISPATCH_FLOAT(dtype, T, e = chunk_extra(static_cast<const T*>(x), n, base, inv_t, buf));
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
  r.sum_x = a.sum_x + b.sum_x;
  return r;
}

struct ExtraFwdArgs {
  FwdArgs base;  // logprobs, entropy, lse, mean_z as in the two-output forward (max_z, log_s unused)
  float *sum_p2, *log_sum_p2;
  int64_t* argmax;
  float *max_logprob, *mean_logit;
};

template <typename T>
int64_t extra_forward_impl(const ExtraFwdArgs& e) {
  const FwdArgs& a = e.base;
  const int64_t n_chunks = (a.vocab + kChunk - 1) / kChunk;
  ExtraState* states = new ExtraState[a.n_rows * n_chunks];
  tile_states<T>(a, n_chunks, states, [&](const T* x, int64_t n, int64_t c, float inv_t, float* buf) {
    return chunk_extra_any(a.dtype, x, n, c, inv_t, buf);
  });
  int64_t first_bad = std::numeric_limits<int64_t>::max();
#pragma omp parallel for schedule(static) num_threads(a.threads) reduction(min : first_bad)
  for (int64_t r = 0; r < a.n_rows; ++r) {
    // chunks merged left to right from the empty state, as in forward_impl
    ExtraState st{empty_state(), 0.0f, kNegInf, -1, 0.0};
    for (int64_t c = 0; c < n_chunks; ++c) st = merge_extra(st, states[r * n_chunks + c]);
    if (!finish_row<T>(a, r, st.st)) first_bad = std::min(first_bad, r);
    const float log_s = logf(st.st.s);
    const float log_sum_p2 = logf(st.s2) - 2.0f * log_s;  // all -inf row: -inf - -inf = NaN
    const bool has_mass = st.st.s > 0.0f;                  // false for an all -inf row and for NaN
    const float inv_t = inverse_temperature(a.temperature[r * a.temp_stride]);
    e.sum_p2[r] = expf(log_sum_p2);
    e.log_sum_p2[r] = log_sum_p2;
    e.argmax[r] = st.best_id < 0 ? 0 : st.best_id;
    e.max_logprob[r] = has_mass ? -log_s : __builtin_nanf("");  // m is the exact max: max z - lse = -log S
    e.mean_logit[r] = has_mass ? static_cast<float>(st.sum_x * inv_t / a.vocab) : __builtin_nanf("");
  }
  delete[] states;
  return first_bad == std::numeric_limits<int64_t>::max() ? -1 : first_bad;
}

int64_t extra_forward(const ExtraFwdArgs& e) {
  int64_t out = -1;
  LK_DISPATCH_FLOAT(e.base.dtype, T, out = extra_forward_impl<T>(e));
  return out;
}

// d logits of every float output (see lenkernels/triton/token_stats.py token_stats_extra_bwd_kernel);
// elementwise given the row's scalars, so out may alias x.
template <typename T>
LK_ALWAYS_INLINE void extra_grad_chunk(const T* x, T* out, int64_t n, int64_t local_id, int64_t local_top,
                                       float inv_t, float lse, float mean_z, float log_sum_p2, const float* g) {
  const float g_lp = g[0], g_h = g[1], g_sp2 = g[2], g_lsp2 = g[3], g_mlp = g[4], g_mean = g[5];
  const float p_coef = g_lp + g_mlp + 2.0f * g_lsp2 + 2.0f * g_sp2 * expf(log_sum_p2);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float z = to_float(x[j]) * inv_t;
    const float d = z - lse;
    const float p = fast_exp(d);
    const float q = fast_exp(2.0f * d - log_sum_p2);
    const float ent = p > 0.0f ? p * (z - mean_z) : 0.0f;
    const float grad = (j == local_id ? g_lp : 0.0f) + (j == local_top ? g_mlp : 0.0f) - p_coef * p - g_h * ent +
                       2.0f * g_sp2 * p * p + 2.0f * g_lsp2 * q + (std::fabs(z) < -kNegInf ? g_mean : 0.0f);
    out[j] = from_float<T>(grad * inv_t);
  }
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
