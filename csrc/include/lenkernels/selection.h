// The order of the vocabulary selections (SPEC 7 top-k, a sampler's top-k): value descending, ties
// to the lower id, NaN above +inf (all NaNs equal), +0 and -0 equal -- the order of
// torch.sort(descending=True, stable=True). Each entry gets a rank key, an unsigned 64-bit integer
// unique per id, so selection compares integers and ties are exact by construction:
//   high 32 bits: the value's order key (a float's bits made monotone, sign bit flipped),
//   low 32 bits:  ~id (the lower id ranks higher among equal values).
#pragma once

#include <cstdint>
#include <cstring>

#include "lenkernels/common.h"

namespace lk {

constexpr int32_t kNanOrderKey = 0x7fffffff;  // above +inf's 0x7f800000

// A signed integer in the order of the float values (NaN largest, -0 as +0).
LK_HOST_DEVICE int32_t value_order_key(float v) {
  uint32_t u;
  const float canonical = v + 0.0f;  // -0 + 0 = +0 (round to nearest): one key for both zeros
  std::memcpy(&u, &canonical, 4);
  const int32_t b = static_cast<int32_t>(u);
  const int32_t key = b ^ static_cast<int32_t>(static_cast<uint32_t>(b >> 31) >> 1);  // negatives: magnitude flipped
  return v != v ? kNanOrderKey : key;
}

// The rank key of id (< 2^32) of order key `key`: a larger rank key comes first.
LK_HOST_DEVICE uint64_t rank_key(int32_t key, int64_t id) {
  const uint64_t high = static_cast<uint32_t>(key) ^ 0x80000000u;
  return (high << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}

LK_HOST_DEVICE int64_t rank_id(uint64_t rank) { return int64_t(0xffffffffu - static_cast<uint32_t>(rank)); }

LK_HOST_DEVICE int32_t rank_order_key(uint64_t rank) {
  return static_cast<int32_t>(static_cast<uint32_t>(rank >> 32) ^ 0x80000000u);
}

}  // namespace lk
