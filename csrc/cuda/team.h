// Cooperative reductions of the O(N) kernels (policy loss, advantages, phase statistics), and the
// host emulation that runs the very same kernel bodies on the CPU, thread by thread.
//
// A kernel body is a template over a Team: the threads that cooperate on one unit of work (a block
// on one sequence, a warp on one group). It uses only team.rank() and team.all_reduce(v, op, id),
// every thread of the team reaching every all_reduce (uniform control flow), so it runs unchanged
//   - on the GPU: BlockTeam<N> (warp butterflies, then one warp over the warps' results) or
//     WarpTeam (one butterfly), in a fixed order: bitwise reproducible, no atomics;
//   - on the host: HostTeam<N>, N std::threads meeting at a barrier, with the device's reduction
//     order replayed by thread 0. A body whose threads do not all reach a reduction (undefined
//     behaviour on the GPU) stalls the barrier, which reports it instead of hanging.
// Launchers pass device -1 to run a kernel through emulate() (lenkernels.cuda.host_emulation):
// this is how tests/test_cuda_compile.py checks every kernel against the float64 references on a
// machine without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cuda_utils.h"
#include "lenkernels/common.h"

namespace lk {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kSlotBytes = 128;  // the largest value a team reduces (16 doubles)

// --- typed scalar access -----------------------------------------------------------------------
// Per-token inputs arrive in their own dtype (no conversion copies); the code is uniform across a
// launch, so the switch costs a predictable branch per element.

// lenkernels/common.h DType codes: float32, bfloat16, float16.
LK_HOST_DEVICE float load_float(const void* base, int dtype, int64_t i) {
  if (dtype == kBFloat16) {
    uint16_t bits;
    memcpy(&bits, static_cast<const uint16_t*>(base) + i, 2);
    const uint32_t word = uint32_t(bits) << 16;  // exact, inf and NaN included
    float out;
    memcpy(&out, &word, 4);
    return out;
  }
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

// Rounds to nearest even (overflow to inf, NaN stays NaN), as torch's .to(dtype) does.
LK_HOST_DEVICE void store_float(void* base, int dtype, int64_t i, float v) {
  if (dtype == kBFloat16) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  } else if (dtype == kFloat16) {
    static_cast<__half*>(base)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(base)[i] = v;
  }
}

// Masks, lengths and weights (lk::Weight, lenkernels/_codes.py): the float codes above, then
// bool/uint8, int32, int64.
LK_HOST_DEVICE float load_weight(const void* base, int code, int64_t i) {
  if (code == int(Weight::kBool)) return float(static_cast<const uint8_t*>(base)[i]);
  if (code == int(Weight::kInt32)) return float(static_cast<const int32_t*>(base)[i]);
  if (code == int(Weight::kInt64)) return float(static_cast<const int64_t*>(base)[i]);
  return load_float(base, code, i);
}

LK_HOST_DEVICE int64_t load_index(const void* base, int bytes, int64_t i) {
  return bytes == 4 ? int64_t(static_cast<const int32_t*>(base)[i]) : static_cast<const int64_t*>(base)[i];
}

LK_HOST_DEVICE int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --- reduction operators (commutative; NaN handling stated) ------------------------------------

struct SumOp {
  template <class T>
  LK_HOST_DEVICE T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

// max / min that ignore NaN (std::max(acc, v) with the accumulator first, as the CPU kernels do).
struct MaxOp {
  template <class T>
  LK_HOST_DEVICE T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};

struct MinOp {
  template <class T>
  LK_HOST_DEVICE T operator()(const T& a, const T& b) const {
    return b < a ? b : a;
  }
};

// Replays the device's reduction order on an array of per-thread values (host emulation).
template <class T, class Op>
T butterfly(T* lanes, Op op) {
  T next[kWarpSize];
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) {
    for (int i = 0; i < kWarpSize; ++i) next[i] = op(lanes[i], lanes[i ^ mask]);
    for (int i = 0; i < kWarpSize; ++i) lanes[i] = next[i];
  }
  return lanes[0];
}

template <int N, class T, class Op>
T team_reduce_order(const T* values, Op op, const T& identity) {
  static_assert(N == kWarpSize || (N % kWarpSize == 0 && N <= kWarpSize * kWarpSize), "whole warps");
  T lanes[kWarpSize];
  T warps[kWarpSize];
  for (int w = 0; w < N / kWarpSize; ++w) {
    for (int i = 0; i < kWarpSize; ++i) lanes[i] = values[w * kWarpSize + i];
    warps[w] = butterfly(lanes, op);
  }
  if (N == kWarpSize) return warps[0];
  for (int i = 0; i < kWarpSize; ++i) lanes[i] = i < N / kWarpSize ? warps[i] : identity;
  return butterfly(lanes, op);
}

// --- device teams ----------------------------------------------------------------------------------

#if defined(__CUDACC__)
// __shfl_xor_sync of any trivially copyable value, one 32-bit word at a time.
template <class T>
__device__ __forceinline__ T shfl_words(const T& v, int lane_or_mask, bool xor_mode) {
  static_assert(sizeof(T) % 4 == 0, "reduced values are whole 32-bit words");
  constexpr int kWords = sizeof(T) / 4;
  uint32_t w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    w[k] = xor_mode ? __shfl_xor_sync(0xffffffffu, w[k], lane_or_mask) : __shfl_sync(0xffffffffu, w[k], lane_or_mask);
  }
  T out;
  memcpy(&out, w, sizeof(T));
  return out;
}

// Butterfly over the 32 lanes in a fixed order (lane i combines op(own, partner)), then lane 0's
// value to every lane: all lanes hold the same bits whatever the operator.
template <class T, class Op>
__device__ __forceinline__ T warp_all_reduce(T v, Op op) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) v = op(v, shfl_words(v, mask, true));
  return shfl_words(v, 0, false);
}
#endif

// Shared memory of a BlockTeam, declared by the kernel (__shared__) and handed to the team.
template <int N>
struct TeamScratch {
  alignas(16) unsigned char warps[N / kWarpSize][kSlotBytes];
  alignas(16) unsigned char result[kSlotBytes];
};

template <int N>
struct BlockTeam {
  static constexpr int kSize = N;
  TeamScratch<N>* scratch;

  LK_HOST_DEVICE int rank() const {
#if defined(__CUDA_ARCH__)
    return int(threadIdx.x);
#else
    return 0;  // device only
#endif
  }

  // Every thread gets op over the N threads' values. Contains two __syncthreads.
  template <class T, class Op>
  LK_HOST_DEVICE T all_reduce(T v, Op op, const T& identity) {
    static_assert(sizeof(T) <= kSlotBytes && alignof(T) <= 16, "value too large for a team slot");
#if defined(__CUDA_ARCH__)
    const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
    v = warp_all_reduce(v, op);
    if (lane == 0) *reinterpret_cast<T*>(scratch->warps[warp]) = v;
    __syncthreads();
    if (warp == 0) {
      v = lane < N / kWarpSize ? *reinterpret_cast<const T*>(scratch->warps[lane]) : identity;
      v = warp_all_reduce(v, op);
      if (lane == 0) *reinterpret_cast<T*>(scratch->result) = v;
    }
    __syncthreads();
    return *reinterpret_cast<const T*>(scratch->result);
#else
    (void)op;
    (void)identity;
    return v;  // device only
#endif
  }
};

struct WarpTeam {
  static constexpr int kSize = kWarpSize;

  LK_HOST_DEVICE int rank() const {
#if defined(__CUDA_ARCH__)
    return int(threadIdx.x) % kWarpSize;
#else
    return 0;  // device only
#endif
  }

  template <class T, class Op>
  LK_HOST_DEVICE T all_reduce(T v, Op op, const T& identity) {
    (void)identity;
#if defined(__CUDA_ARCH__)
    return warp_all_reduce(v, op);
#else
    (void)op;
    return v;  // device only
#endif
  }
};

// --- host emulation ----------------------------------------------------------------------------------

// What the threads of one emulated team share: a reusable barrier and the reduction slots.
class HostTeamState {
 public:
  explicit HostTeamState(int n) : n_(n), slots_(size_t(n) * kSlotBytes) {}

  // Waits for all n threads; throws when the team failed or the others never arrive (a reduction
  // that not every thread reaches).
  void barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    if (failed_) throw Abandoned();
    const uint64_t gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const bool done = cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != gen || failed_; });
    if (failed_) throw Abandoned();
    if (!done) {
      fail_locked("an emulated team waited 60 s at a reduction that not all of its threads reached");
      throw Abandoned();
    }
  }

  void fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_locked(why);
  }

  std::string error() {
    std::lock_guard<std::mutex> lock(mu_);
    return failed_ ? error_ : std::string();
  }

  unsigned char* slot(int rank) { return slots_.data() + size_t(rank) * kSlotBytes; }
  unsigned char* result() { return result_; }

  struct Abandoned {};

 private:
  void fail_locked(const std::string& why) {
    if (!failed_) error_ = why;
    failed_ = true;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool failed_ = false;
  std::string error_;
  std::vector<unsigned char> slots_;
  alignas(16) unsigned char result_[kSlotBytes];
};

template <int N>
struct HostTeam {
  static constexpr int kSize = N;
  HostTeamState* state;
  int thread;

  LK_HOST_DEVICE int rank() const { return thread; }

  template <class T, class Op>
  LK_HOST_DEVICE T all_reduce(T v, Op op, const T& identity) {
    static_assert(sizeof(T) <= kSlotBytes && alignof(T) <= 16, "value too large for a team slot");
#if defined(__CUDA_ARCH__)
    (void)op;
    (void)identity;
    return v;  // host only
#else
    memcpy(state->slot(thread), &v, sizeof(T));
    state->barrier();
    if (thread == 0) {
      T values[N];
      for (int i = 0; i < N; ++i) memcpy(&values[i], state->slot(i), sizeof(T));
      const T out = team_reduce_order<N>(values, op, identity);
      memcpy(state->result(), &out, sizeof(T));
    }
    state->barrier();
    T out;
    memcpy(&out, state->result(), sizeof(T));
    return out;
#endif
  }
};

// Runs body(team_index, team) for team_index = 0 .. n_teams - 1 with N host threads per team, one
// team after the other (blocks of a grid are independent, so any order is a valid schedule).
template <int N, class Body>
void emulate(int64_t n_teams, const Body& body) {
  if (n_teams <= 0) return;
  HostTeamState state(N);
  std::vector<std::thread> threads;
  threads.reserve(N);
  for (int r = 0; r < N; ++r) {
    threads.emplace_back([&state, &body, n_teams, r] {
      HostTeam<N> team{&state, r};
      try {
        for (int64_t i = 0; i < n_teams; ++i) {
          body(i, team);
          state.barrier();  // the next team starts when every thread left this one
        }
      } catch (const HostTeamState::Abandoned&) {
      } catch (const std::exception& e) {
        state.fail(e.what());
      } catch (...) {
        state.fail("unknown exception in an emulated thread");
      }
    });
  }
  for (auto& t : threads) t.join();
  const std::string error = state.error();
  if (!error.empty()) throw std::runtime_error("lenkernels CUDA host emulation: " + error);
}

// --- kernels and their launches ------------------------------------------------------------------
// Runs kernel on n_blocks blocks of kThreads threads on `device` (current for the call) and `stream`,
// or with device -1 the same body(a, block, n_blocks, team) through emulate(). LK_LAUNCH names both.
template <int kThreads, class Args, class Body>
void launch_blocks(void (*kernel)(Args), const Body& body, const Args& a, int64_t n_blocks, int device,
                   cudaStream_t stream, const char* what) {
  if (n_blocks <= 0) return;
  if (device < 0) {
    emulate<kThreads>(n_blocks, [&](int64_t i, auto& team) { body(a, i, n_blocks, team); });
    return;
  }
  DeviceGuard guard(device);
  kernel<<<unsigned(n_blocks), kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), what);
}

}  // namespace cuda
}  // namespace lk

// LK_TEAM_BODY(name, Args, body): name##_body, whose call runs the statement `body` over a (the
// kernel's Args), block, n_blocks (this block's index and the grid's size) and team.
#define LK_TEAM_BODY(name, Args, ...)                                                               \
  struct name##_body {                                                                             \
    template <class Team>                                                                          \
    LK_HOST_DEVICE void operator()(const Args& a, int64_t block, int64_t n_blocks, Team& team) const { \
      (void)block;                                                                                 \
      (void)n_blocks;                                                                              \
      __VA_ARGS__;                                                                                 \
    }                                                                                              \
  };

// LK_BLOCK_KERNEL(name, (launch bounds), Args, body): the kernel `name`, one BlockTeam<kThreads> per
// block running body, and name##_body, the same body for the host emulation.
#define LK_BLOCK_KERNEL(name, bounds, Args, ...)    \
  LK_TEAM_BODY(name, Args, __VA_ARGS__)             \
  __global__ void __launch_bounds__ bounds name(const Args a) { \
    __shared__ TeamScratch<kThreads> scratch;       \
    BlockTeam<kThreads> team{&scratch};             \
    name##_body{}(a, blockIdx.x, gridDim.x, team);  \
  }

// LK_LAUNCH(kernel, a, n_blocks, device, stream): launch_blocks of an LK_BLOCK_KERNEL.
#define LK_LAUNCH(kernel, a, n_blocks, device, stream) \
  ::lk::cuda::launch_blocks<kThreads>(kernel, kernel##_body{}, a, n_blocks, device, stream, "launching " #kernel)
