// Shared by the CPU (g++) and CUDA (nvcc) backends: every piece of arithmetic that both compiled
// backends perform lives in headers under this folder, so the two cannot drift apart.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace lk {

// Codes declared in lenkernels/_codes.py (tests/test_codes.py checks these enums against it).
// Element type of a floating input.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// Element type of a mask or length tensor (uint8 masks read as bool).
enum class Weight : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kBool = 3, kInt32 = 4, kInt64 = 5 };

// Host-side check of a DType code: what is wrong, or an empty string (a kernel would read an
// unknown code as float32).
inline std::string invalid_dtype(int code) {
  if (code == kFloat32 || code == kBFloat16 || code == kFloat16) return "";
  return "unsupported dtype code " + std::to_string(code) + " (lenkernels._codes.DType)";
}

constexpr float kNegInf = -__builtin_huge_valf();

// NaN-propagating max: once a NaN is seen it wins, so a NaN logit can never vanish into a
// plausible number through the running maximum.
LK_HOST_DEVICE float max_nan(float a, float b) {
  const bool take_b = (b > a) | (b != b);  // non-short-circuit: stays branch-free in SIMD loops
  return take_b ? b : a;
}

}  // namespace lk
