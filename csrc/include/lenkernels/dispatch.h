// The dtype dispatch shared by the CPU (g++) and CUDA (nvcc) backends: one switch over the dtype
// codes of lenkernels/_codes.py (common.h DType, Weight) that instantiates a template for each.
// No pybind11 here (tests/cuda_host_replay.cu includes it through csrc/cuda/cuda_utils.h); an
// unknown code throws std::invalid_argument, which reaches Python as ValueError.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "lenkernels/common.h"

namespace lk {

// The storage type of a dtype code. float32 and the integer codes are the same on every backend;
// each backend specialises the 16-bit floats with its own types (cpu_utils.h, cuda_utils.h).
template <int Code>
struct FloatOf;
template <>
struct FloatOf<kFloat32> {
  using type = float;
};
template <Weight Code>
struct WeightOf {
  using type = typename FloatOf<int(Code)>::type;  // kFloat32, kBFloat16, kFloat16 share the DType codes
};
template <>
struct WeightOf<Weight::kBool> {
  using type = uint8_t;  // bool (and uint8) masks read as bytes
};
template <>
struct WeightOf<Weight::kInt32> {
  using type = int32_t;
};
template <>
struct WeightOf<Weight::kInt64> {
  using type = int64_t;
};

}  // namespace lk

#define LK_DISPATCH_CASE(label, T, Type, ...) \
  case label: {                              \
    using T = Type;                          \
    __VA_ARGS__;                             \
    break;                                   \
  }

// LK_DISPATCH_FLOAT(code, T, body): runs body with T the storage type of DType `code`
// (float32, bfloat16, float16), e.g. LK_DISPATCH_FLOAT(dtype, T, out = sizeof(T)).
#define LK_DISPATCH_FLOAT(code, T, ...)                                               \
  switch (code) {                                                                     \
    LK_DISPATCH_CASE(::lk::kFloat32, T, float, __VA_ARGS__)                           \
    LK_DISPATCH_CASE(::lk::kBFloat16, T, ::lk::FloatOf<::lk::kBFloat16>::type, __VA_ARGS__) \
    LK_DISPATCH_CASE(::lk::kFloat16, T, ::lk::FloatOf<::lk::kFloat16>::type, __VA_ARGS__)   \
    default:                                                                          \
      throw std::invalid_argument("unsupported logits dtype code");                   \
  }

// LK_DISPATCH_WEIGHT(code, W, body): the same over the Weight codes of masks and lengths.
#define LK_DISPATCH_WEIGHT_CASE(label, W, ...) \
  LK_DISPATCH_CASE(label, W, ::lk::WeightOf<label>::type, __VA_ARGS__)
#define LK_DISPATCH_WEIGHT(code, W, ...)                                  \
  switch (static_cast<::lk::Weight>(code)) {                              \
    LK_DISPATCH_WEIGHT_CASE(::lk::Weight::kFloat32, W, __VA_ARGS__)      \
    LK_DISPATCH_WEIGHT_CASE(::lk::Weight::kBFloat16, W, __VA_ARGS__)     \
    LK_DISPATCH_WEIGHT_CASE(::lk::Weight::kFloat16, W, __VA_ARGS__)      \
    LK_DISPATCH_WEIGHT_CASE(::lk::Weight::kBool, W, __VA_ARGS__)         \
    LK_DISPATCH_WEIGHT_CASE(::lk::Weight::kInt32, W, __VA_ARGS__)        \
    LK_DISPATCH_WEIGHT_CASE(::lk::Weight::kInt64, W, __VA_ARGS__)        \
    default:                                                              \
      throw std::invalid_argument("unsupported mask/lengths dtype code"); \
  }
