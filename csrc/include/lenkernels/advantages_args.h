// The codes of the advantages bindings, checked by the CPU and CUDA bindings (csrc/cpu/advantages.cpp,
// csrc/cuda/advantages.cu) before any work: an unknown one raises (ValueError in Python) instead of
// running as some default (and a throw inside the CPU kernels' OpenMP regions would abort the process).
// Host-only.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lenkernels/advantages.h"

namespace lk {
namespace adv {

inline void check_n(int64_t n) {
  if (n < 0) throw std::invalid_argument("the batch size must be non-negative");
}

inline void check_method(int method) {
  if (!known_method(method)) throw std::invalid_argument("unknown advantage method code " + std::to_string(method));
}

inline void check_batch_method(int method) {
  if (!batch_level_method(method)) {
    throw std::invalid_argument("the batch-level step is that of batch or reinforce_pp_baseline, got method code " +
                                std::to_string(method));
  }
}

inline void check_dtype(int code, const char* name) {
  if (!known_dtype(code)) {
    throw std::invalid_argument(std::string("unknown ") + name + " dtype code " + std::to_string(code));
  }
}

// Only where the tensor is given (its address non-zero).
inline void check_weight(const void* p, int code, const char* name) {
  if (p && !known_weight(code)) {
    throw std::invalid_argument(std::string("unknown ") + name + " dtype code " + std::to_string(code));
  }
}

}  // namespace adv
}  // namespace lk
