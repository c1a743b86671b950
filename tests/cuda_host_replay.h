// What the host replays of the token-statistics kernels (tests/cuda_host_replay.cu for the
// two-output kernels, tests/cuda_host_replay_extra.cu for the SPEC 7 ones) share: the grids walked
// block by block, each block's first tiles, and the C entry points' error code. Included after
// token_stats.h (or token_stats_extra.h).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace lk {
namespace cuda {
namespace token_stats {
namespace replay {

// Each thread's tile in flight (fold_chunk's `cur`), one per thread of a block.
using Tiles = std::vector<std::array<Vec16, kUnroll>>;

inline Vec16 (&tile_of(Tiles& cur, int tid))[kUnroll] {
  return *reinterpret_cast<Vec16(*)[kUnroll]>(cur[tid].data());
}

// fold_chunks' first load: each thread's first tile of chunk b.first, masked by `end`.
template <typename T>
void load_first_tiles(Tiles& cur, const FwdBlock<T>& b, int64_t vocab, int64_t end) {
  for (int tid = 0; tid < kThreads; ++tid) {
    const int64_t i = chunk_at<T>(vocab, b.first).begin + tid;
    if (b.aligned) {
      load_tile<T, true>(tile_of(cur, tid), b.x, i, end);
    } else {
      load_tile<T, false>(tile_of(cur, tid), b.x, i, end);
    }
  }
}

// The forward grid (FwdParams or ExtraFwdParams), block (row, split) by block: `block(row, split,
// b, end)` with b = fwd_block() as thread 0 sees it and `end` the end of the vectors it folds.
template <typename T, class P, class Block>
void forward_blocks(const P& p, const Block& block) {
  for (int64_t i = 0; i < p.n_rows * p.n_splits; ++i) {
    const int64_t row = i / p.n_splits;
    const int split = int(i % p.n_splits);
    const FwdBlock<T> b = fwd_block<T>(p, row, split, true);
    block(row, split, b, chunk_at<T>(p.vocab, b.last - 1).end);
  }
}

// The backward grid (BwdParams or ExtraBwdParams): per block the row's constants
// `grad_row(p, row, id)`, then `thread(x, out, row, split, tid, id, g)` for each thread.
template <typename T, class P, class GradRowOf, class Thread>
void backward_blocks(const P& p, const GradRowOf& grad_row, const Thread& thread) {
  for (int64_t i = 0; i < p.n_rows * p.n_splits; ++i) {
    const int64_t row = i / p.n_splits;
    const int split = int(i % p.n_splits);
    const int64_t id = load_id(p.ids, p.id_bytes, row);
    const auto g = grad_row(p, row, id);
    const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
    T* out = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
    for (int tid = 0; tid < kThreads; ++tid) thread(x, out, row, split, tid, id, g);
  }
}

// The C entry points' result: 0, or 1 when `run` throws (a bad dtype code or split count).
template <class Run>
int status_of(const Run& run) {
  try {
    run();
  } catch (...) {
    return 1;
  }
  return 0;
}

}  // namespace replay
}  // namespace token_stats
}  // namespace cuda
}  // namespace lk
