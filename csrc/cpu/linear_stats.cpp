// CPU side of linear_logprobs_entropy (token statistics from hidden states and the LM head).
// The host computes one [rows, cols] logits tile at a time with a GEMM and reduces it with the
// token_stats kernel; when the vocabulary is cut into several column chunks, these kernels carry
// each row's online-softmax state across the chunks:
//   fold:     state[r] = merge(state[r], state of chunk r), and z_y from the chunk that holds it
//   finalize: state -> logprob, entropy, lse, mean_z (SPEC 1), and the state's (max z, log S)
// Chunks are folded in column order, so results do not depend on the thread count.
#include <cmath>

#include "cpu_utils.h"
#include "lenkernels/linear_stats.h"

namespace lk {
namespace cpu {
namespace {

struct FoldArgs {
  int64_t n_rows;
  const float *max_z, *log_s, *entropy;  // [n_rows] statistics of this chunk alone
  const void* logits;                    // [n_rows, cols] chunk of logits, row stride row_stride
  int dtype;
  int64_t row_stride;
  const int64_t* chunk_ids;  // [n_rows] column of the target in this chunk, or < 0
  const float* temperature;
  int64_t temp_stride;
  float* state;  // [n_rows, 3] (m, S, U), updated
  float* z_y;    // [n_rows] target logit / T, written by the chunk that holds it
  int threads;
};

template <typename T>
void fold_impl(const FoldArgs& a) {
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t r = 0; r < a.n_rows; ++r) {
    float* st = a.state + 3 * r;
    const SoftmaxState chunk = state_from_stats(a.max_z[r], a.log_s[r], a.entropy[r]);
    const SoftmaxState merged = merge(SoftmaxState{st[0], st[1], st[2]}, chunk);
    st[0] = merged.m;
    st[1] = merged.s;
    st[2] = merged.u;
    const int64_t id = a.chunk_ids[r];
    if (id >= 0) {
      const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
      // the same product as the token_stats kernels: to_float(x) * (1 / T) in fp32
      a.z_y[r] = to_float(row[id]) * inverse_temperature(a.temperature[r * a.temp_stride]);
    }
  }
}

struct FinalizeArgs {
  int64_t n_rows;
  const float* state;
  const float* z_y;
  const int64_t* local_ids;  // [n_rows] shard-local ids
  float *logprobs, *entropy, *lse, *mean_z;
  float *max_z, *log_s;  // null, or [n_rows] each: the merged state (vocabulary-parallel merge)
  int threads;
};

void finalize_rows(const FinalizeArgs& a) {
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (int64_t r = 0; r < a.n_rows; ++r) {
    const float* st = a.state + 3 * r;
    const RowStats rs = finalize(SoftmaxState{st[0], st[1], st[2]});
    a.logprobs[r] = target_logprob(a.local_ids[r], a.z_y[r], rs);
    a.entropy[r] = rs.entropy;
    a.lse[r] = rs.lse;
    a.mean_z[r] = rs.mean_z;
    if (a.max_z) a.max_z[r] = rs.m;
    if (a.log_s) a.log_s[r] = rs.log_s;
  }
}

void define(py::module_& m) {
  m.def("linear_stats_fold", [](int64_t n_rows, Addr max_z, Addr log_s, Addr entropy, Addr logits, int dtype,
                                int64_t row_stride, Addr chunk_ids, Addr temperature, int64_t temp_stride, Addr state,
                                Addr z_y, int threads) {
    const FoldArgs a{n_rows, max_z, log_s, entropy, logits, dtype, row_stride, chunk_ids, temperature, temp_stride,
                     state, z_y, threads_for(threads)};
    LK_DISPATCH_FLOAT(a.dtype, T, fold_impl<T>(a));
  }, LK_NOGIL);
  m.def("linear_stats_finalize", [](int64_t n_rows, Addr state, Addr z_y, Addr local_ids, Addr logprobs,
                                    Addr entropy, Addr lse, Addr mean_z, Addr max_z, Addr log_s, int threads) {
    finalize_rows(FinalizeArgs{n_rows, state, z_y, local_ids, logprobs, entropy, lse, mean_z, max_z, log_s,
                               threads_for(threads)});
  }, LK_NOGIL);
}

}  // namespace
}  // namespace cpu
}  // namespace lk

LK_MODULE(_cpu_linear_stats,
          "lenkernels CPU kernels: online-softmax state carried across vocabulary chunks (raw pointers)",
          lk::cpu::define)
