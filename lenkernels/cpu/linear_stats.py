"""Host launchers of ``linear_logprobs_entropy`` on the CPU: the ``backend="cpu"`` implementation of
the linear_stats family (same launcher signatures as ``lenkernels/{triton,reference}/linear_stats.py``).

Each tile of logits is an eager GEMM (``reference.linear_stats.tile_logits``) reduced by the C++
token-statistics kernels (``lenkernels.cpu.token_stats``); when the vocabulary is cut into column
chunks, ``csrc/cpu/linear_stats.cpp`` carries each row's online-softmax state across them.
"""

from __future__ import annotations

import torch

from lenkernels import _checks
from lenkernels import distributed as lkdist
from lenkernels.cpu import load
from lenkernels.cpu import token_stats as cpu_token_stats
from lenkernels.reference import linear_stats as tiles

FAMILY = "linear_stats"

# The fold and finalize are O(N) per chunk: threads only pay off for many rows.
_ROWS_FOR_THREADS = 1 << 15


def linear_stats_fwd(hidden, weight, bias, local_ids, temperature, chunk_size: int, logprobs, entropy, lse, mean_z,
                     max_z, log_s) -> None:  # fmt: skip
    """Writes the statistics of this shard's vocabulary, fp32 ``[N]`` each (logprobs, entropy, lse,
    mean_z and the rows' state max_z, log_s), from hidden ``[N, D]``, weight ``[V, D]``, bias ``[V]``
    or None (unit stride along D), int64 shard-local ids ``[N]`` and fp32 temperature ``[N]`` or
    ``[1]``, holding at most ``chunk_size`` logits at once."""
    outs = (logprobs, entropy, lse, mean_z, max_z, log_s)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    rows, cols = tiles.tile_plan(n_rows, vocab, chunk_size)
    if cols >= vocab:
        tiles.whole_rows_fwd(cpu_token_stats, hidden, weight, bias, local_ids, temperature, rows, outs)
        return
    module = load(FAMILY)
    threads = torch.get_num_threads() if n_rows >= _ROWS_FOR_THREADS else 1
    running = torch.tensor([float("-inf"), 0.0, 0.0]).repeat(n_rows, 1)  # empty online-softmax states
    z_y = torch.zeros(n_rows, dtype=torch.float32)
    for v0, v1 in tiles.spans(vocab, cols):  # column order per row: reproducible merges
        for r0, r1 in tiles.spans(n_rows, rows):
            logits = tiles.tile_logits(hidden, weight, bias, r0, r1, v0, v1)
            ids = lkdist.chunk_ids(local_ids[r0:r1], v0, v1, for_backward=False)
            temp = tiles.row_slice(temperature, r0, r1)
            stats = [torch.empty(r1 - r0, dtype=torch.float32) for _ in range(6)]
            cpu_token_stats.token_stats_fwd(logits, ids, temp, lkdist.IGNORED, *stats)
            _, ent, _, _, part_max_z, part_log_s = stats  # this chunk's entropy and softmax state
            module.linear_stats_fold(
                r1 - r0, part_max_z.data_ptr(), part_log_s.data_ptr(), ent.data_ptr(), logits.data_ptr(),
                _checks.DTYPE_CODES[logits.dtype], logits.stride(0), ids.data_ptr(), temp.data_ptr(),
                0 if temp.numel() == 1 else 1, running[r0:r1].data_ptr(), z_y[r0:r1].data_ptr(), threads,
            )  # fmt: skip
    module.linear_stats_finalize(
        n_rows, running.data_ptr(), z_y.data_ptr(), local_ids.data_ptr(), *(o.data_ptr() for o in outs), threads
    )


def linear_stats_bwd_tile(hidden, weight, bias, local_ids, temperature, lse, mean_z, g_logprobs, g_entropy, rows,
                          cols, dlogits) -> None:  # fmt: skip
    """Writes dlogits of one tile, rows ``[r0, r1)`` x columns ``[v0, v1)`` of the shard, in the
    hidden dtype (unit stride along the vocabulary): the forward's logits recomputed into
    ``dlogits``, then the token-statistics backward over them in place."""
    (r0, r1), (v0, v1) = rows, cols
    tiles.tile_logits(hidden, weight, bias, r0, r1, v0, v1, dlogits)
    ids = lkdist.chunk_ids(local_ids[r0:r1], v0, v1, for_backward=True)
    cpu_token_stats.token_stats_bwd(
        dlogits, ids, tiles.row_slice(temperature, r0, r1), lse[r0:r1], mean_z[r0:r1], g_logprobs[r0:r1],
        g_entropy[r0:r1], lkdist.IGNORED, dlogits,
    )  # fmt: skip
