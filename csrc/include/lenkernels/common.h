// Shared by the CPU (g++) and CUDA (nvcc) backends: every piece of arithmetic that both compiled
// backends perform lives in headers under this folder, so the two cannot drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace lk {

// dtype codes shared with lenkernels/_dtypes.py
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr float kNegInf = -__builtin_huge_valf();

// NaN-propagating max: once a NaN is seen it wins, so a NaN logit can never vanish into a
// plausible number through the running maximum.
LK_HOST_DEVICE float max_nan(float a, float b) {
  const bool take_b = (b > a) | (b != b);  // non-short-circuit: stays branch-free in SIMD loops
  return take_b ? b : a;
}

}  // namespace lk
