// CPU-only helpers: dtype loads/stores, a vectorisable fp32 exp, ISA multiversioning and the
// OpenMP/pybind plumbing every CPU kernel module uses.
#pragma once

#include <omp.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "lenkernels/binding.h"
#include "lenkernels/common.h"
#include "lenkernels/dispatch.h"

// Each hot loop is compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time, so
// one wheel is portable and still uses the widest vectors the machine has.
#if defined(__x86_64__) && !defined(LK_NO_MULTIVERSION)
#define LK_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LK_TARGET_CLONES
#endif

#define LK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace lk {
namespace cpu {

// Lanes of independent fp32 accumulators: fixes the summation order (bitwise reproducible on
// every ISA clone) while letting the compiler map the lanes onto SIMD registers.
constexpr int kLanes = 16;

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

LK_ALWAYS_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
LK_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

LK_ALWAYS_INLINE float to_float(float x) { return x; }
LK_ALWAYS_INLINE float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
// Branch-free half -> float (exact, incl. subnormals, inf and NaN): shift the exponent/mantissa
// into place, rescale by 2^112, and restore the all-ones exponent of inf/NaN.
LK_ALWAYS_INLINE float to_float(fp16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  float f = bits_to_float(em << 13) * 0x1p112f;
  uint32_t u = float_to_bits(f);
  u = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : u;
  return bits_to_float(u | sign);
}

template <typename T>
LK_ALWAYS_INLINE T from_float(float f);

template <>
LK_ALWAYS_INLINE float from_float<float>(float f) {
  return f;
}
// Round to nearest even; NaN stays a quiet NaN.
template <>
LK_ALWAYS_INLINE bf16 from_float<bf16>(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16{uint16_t(f != f ? 0x7fc0u : rounded)};
}
// Round to nearest even float -> half (F. Giesen's float_to_half_fast3_rtne, branch-free form).
template <>
LK_ALWAYS_INLINE fp16 from_float<fp16>(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= (143u << 23)) {  // overflow to inf, or NaN
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // subnormal or zero: let the FPU round via a magic add
    const float denorm = bits_to_float(u) + bits_to_float(126u << 23);
    out = uint16_t(float_to_bits(denorm) - (126u << 23));
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    out = uint16_t(u >> 13);
  }
  return fp16{uint16_t(out | (sign >> 16))};
}

// exp for x <= ~88 with ~1 ulp error (Cephes polynomial), written without branches or libm calls
// so loops over it vectorise.  x = -inf gives 0, NaN gives NaN.
LK_ALWAYS_INLINE float fast_exp(float x) {
  const float lo = -87.33654475f;
  const float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no SSE4.1 needed for a vector round)
  const float shifter = 12582912.0f;
  const float fn = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t n = int32_t(fn);
  const float scale = bits_to_float(uint32_t(n + 127) << 23);
  const float out = y * scale;
  return x < lo ? 0.0f : (x != x ? x : out);
}

// Asks for transparent huge pages on a large output buffer before its first write: a fresh
// [N, V] gradient otherwise costs one page fault per 4 KiB, which on CPU can exceed the kernel
// itself. A hint only: without THP (or off Linux) nothing changes.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

LK_ALWAYS_INLINE int threads_for(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

}  // namespace cpu

// The CPU storage of the 16-bit dtype codes (LK_DISPATCH_FLOAT, LK_DISPATCH_WEIGHT in dispatch.h).
template <>
struct FloatOf<kBFloat16> {
  using type = cpu::bf16;
};
template <>
struct FloatOf<kFloat16> {
  using type = cpu::fp16;
};

}  // namespace lk
