// CUDA-side helpers every kernel module uses: 16-byte vector accesses with cache hints, element
// conversions, NaN-propagating packed maxima, warp/block merges of the softmax state, and the
// host plumbing (device guard, launch checks, dtype dispatch).
//
// What a thread computes on its own is LK_HOST_DEVICE, so the per-thread code of a kernel also
// compiles for the host, where tests/test_cuda_compile.py runs it thread by thread against the
// float64 reference (the development machines have no GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "lenkernels/dispatch.h"
#include "lenkernels/softmax_state.h"
#include "lenkernels/token_stats.h"

namespace lk {
namespace cuda {

// One 16-byte access: 4 fp32 or 8 bf16/fp16 elements.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

template <typename To, typename From>
LK_HOST_DEVICE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// max that propagates NaN: one instruction on sm_80+, softmax_state.h's max_nan on the host.
LK_HOST_DEVICE float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return max_nan(a, b);
#endif
}

// --- element types ------------------------------------------------------------------------------
// Elem<T>: elements per Vec16, unpacking (exact), packing (round to nearest even), a Vec16 of -inf
// (padding that folds to nothing), and the max of a tile of raw vectors.

template <typename T>
struct Elem;

// The max of a tile of raw vectors of a 16-bit type E, as Pair (its 2-element vector type): one
// packed NaN-propagating max per word on the device, then the larger of the two halves.
template <class E, class Pair, int N>
LK_HOST_DEVICE float packed_raw_max(const Vec16 (&v)[N]) {
#if defined(__CUDA_ARCH__)
  Pair m = bit_cast<Pair>(v[0].w[0]);
  LK_UNROLL
  for (int i = 0; i < N; ++i) {
    LK_UNROLL
    for (int q = 0; q < 4; ++q) m = __hmax2_nan(m, bit_cast<Pair>(v[i].w[q]));
  }
  const Vec16 halves{{bit_cast<uint32_t>(m), 0u, 0u, 0u}};
  return nan_max(E::get(halves, 0), E::get(halves, 1));
#else
  float m = E::get(v[0], 0);
  for (int i = 0; i < N; ++i) {
    for (int k = 0; k < E::kPerVec; ++k) m = nan_max(m, E::get(v[i], k));
  }
  return m;
#endif
}

template <>
struct Elem<float> {
  static constexpr int kPerVec = 4;
  static constexpr uint32_t kNegInfWord = 0xff800000u;
  LK_HOST_DEVICE static float to_float(float x) { return x; }
  LK_HOST_DEVICE static float from_float(float x) { return x; }
  LK_HOST_DEVICE static float get(const Vec16& v, int k) { return bit_cast<float>(v.w[k]); }
  LK_HOST_DEVICE static void put(Vec16& v, int k, float lo, float hi) {  // elements k, k + 1
    v.w[k] = bit_cast<uint32_t>(lo);
    v.w[k + 1] = bit_cast<uint32_t>(hi);
  }
  template <int N>
  LK_HOST_DEVICE static float raw_max(const Vec16 (&v)[N]) {
    float m = get(v[0], 0);
    LK_UNROLL
    for (int i = 0; i < N; ++i) {
      LK_UNROLL
      for (int k = 0; k < 4; ++k) m = nan_max(m, get(v[i], k));
    }
    return m;
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kPerVec = 8;
  static constexpr uint32_t kNegInfWord = 0xff80ff80u;
  LK_HOST_DEVICE static float to_float(__nv_bfloat16 x) { return bit_cast<float>(uint32_t(bit_cast<uint16_t>(x)) << 16); }
  LK_HOST_DEVICE static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  // bf16 -> fp32 is a shift into the high half: exact, inf and NaN included.
  LK_HOST_DEVICE static float get(const Vec16& v, int k) {
    const uint32_t word = v.w[k >> 1];
    return bit_cast<float>((k & 1) ? (word & 0xffff0000u) : (word << 16));
  }
  LK_HOST_DEVICE static void put(Vec16& v, int k, float lo, float hi) {
    v.w[k >> 1] = bit_cast<uint32_t>(__floats2bfloat162_rn(lo, hi));
  }
  template <int N>
  LK_HOST_DEVICE static float raw_max(const Vec16 (&v)[N]) {
    return packed_raw_max<Elem, __nv_bfloat162>(v);
  }
};

template <>
struct Elem<__half> {
  static constexpr int kPerVec = 8;
  static constexpr uint32_t kNegInfWord = 0xfc00fc00u;
  LK_HOST_DEVICE static float to_float(__half x) { return __half2float(x); }
  LK_HOST_DEVICE static __half from_float(float x) { return __float2half_rn(x); }
  LK_HOST_DEVICE static float get(const Vec16& v, int k) {
    const uint32_t word = v.w[k >> 1];
    return __half2float(bit_cast<__half>(uint16_t((k & 1) ? (word >> 16) : (word & 0xffffu))));
  }
  LK_HOST_DEVICE static void put(Vec16& v, int k, float lo, float hi) {
    v.w[k >> 1] = bit_cast<uint32_t>(__floats2half2_rn(lo, hi));
  }
  template <int N>
  LK_HOST_DEVICE static float raw_max(const Vec16 (&v)[N]) {
    return packed_raw_max<Elem, __half2>(v);
  }
};

template <typename T>
LK_HOST_DEVICE Vec16 neg_inf_vec() {
  constexpr uint32_t w = Elem<T>::kNegInfWord;
  return Vec16{{w, w, w, w}};
}

// --- global memory accesses ---------------------------------------------------------------------
// 16-byte loads ask L2 to fetch the whole 256-byte sector group (rows are streamed front to back)
// and do not allocate in L1 (no reuse). load_ro: data that nothing writes while the kernel runs
// (non-coherent path); load_stream/store_stream: data the kernel may overwrite in place
// (coherent path, evict-first).

LK_HOST_DEVICE Vec16 load_ro(const Vec16* p) {
#if defined(__CUDA_ARCH__)
  Vec16 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
      : "l"(p));
  return v;
#else
  return *p;
#endif
}

LK_HOST_DEVICE Vec16 load_stream(const Vec16* p) {
#if defined(__CUDA_ARCH__)
  Vec16 v;
  asm volatile("ld.global.cs.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "l"(p)
               : "memory");
  return v;
#else
  return *p;
#endif
}

LK_HOST_DEVICE void store_stream(Vec16* p, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]),
               "r"(v.w[3])
               : "memory");
#else
  *p = v;
#endif
}

// A scalar load pinned where it is written (volatile): issued at a kernel's start so its latency
// hides behind the main loop instead of being sunk to its use after it.
template <typename T>
LK_HOST_DEVICE float load_early(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    uint32_t r;
    asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(r) : "l"(p));
    return bit_cast<float>(r);
  } else {
    uint16_t r;
    asm volatile("ld.global.nc.b16 %0, [%1];" : "=h"(r) : "l"(p));
    return Elem<T>::to_float(bit_cast<T>(r));
  }
#else
  return Elem<T>::to_float(*p);
#endif
}

// --- where a row lies relative to 16-byte boundaries ----------------------------------------------
// [head scalars][n_vec aligned Vec16][tail scalars]: any row start (any row stride, any storage
// offset) gets 16-byte accesses for all but at most 2 * (kPerVec - 1) elements.
struct RowSpan {
  int64_t head, n_vec, tail;
};

template <typename T>
LK_HOST_DEVICE RowSpan row_span(const T* row, int64_t vocab) {
  constexpr int64_t kVec = Elem<T>::kPerVec;
  const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(row) % 16) / int64_t(sizeof(T));
  int64_t head = misaligned == 0 ? 0 : kVec - misaligned;
  head = head < vocab ? head : vocab;
  const int64_t n_vec = (vocab - head) / kVec;
  return RowSpan{head, n_vec, vocab - head - n_vec * kVec};
}

LK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The vectors [begin, end) of a row that split `split` of n_splits handles: whole multiples of the
// block size, so every block but the last of a row runs its loop without idle threads.
struct Range {
  int64_t begin, end;
};

LK_HOST_DEVICE Range split_range(int64_t n, int split, int n_splits, int threads) {
  const int64_t per = ceil_div(ceil_div(n, n_splits), threads) * threads;
  const int64_t begin = split * per < n ? split * per : n;
  const int64_t end = begin + per < n ? begin + per : n;
  return Range{begin, end};
}

// --- block-wide merge of softmax states -----------------------------------------------------------
#if defined(__CUDACC__)
__device__ __forceinline__ SoftmaxState shfl_xor(const SoftmaxState& st, int mask) {
  return SoftmaxState{__shfl_xor_sync(0xffffffffu, st.m, mask), __shfl_xor_sync(0xffffffffu, st.s, mask),
                      __shfl_xor_sync(0xffffffffu, st.u, mask)};
}

// Butterfly over the 32 lanes in a fixed order: bitwise reproducible.
__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) st = merge(st, shfl_xor(st, mask));
  return st;
}

// The merged state of all kThreads threads, valid in thread 0. Contains a __syncthreads.
template <int kThreads>
__device__ __forceinline__ SoftmaxState block_merge(SoftmaxState st) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  constexpr int kWarps = kThreads / 32;
  __shared__ SoftmaxState warp_states[kWarps];
  st = warp_merge(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_states[lane] : empty_state();
    st = warp_merge(st);
  }
  return st;
}
#endif

// --- host plumbing ------------------------------------------------------------------------------

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lenkernels CUDA: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the launches of one call and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace cuda

// The CUDA storage of the 16-bit dtype codes (LK_DISPATCH_FLOAT, LK_DISPATCH_WEIGHT in dispatch.h).
template <>
struct FloatOf<kBFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct FloatOf<kFloat16> {
  using type = __half;
};

}  // namespace lk

// tests/cuda_host_replay.cu spells the shared dispatch this way.
#define LK_CUDA_DISPATCH_DTYPE LK_DISPATCH_FLOAT
