"""Triton kernels for token log-probabilities and entropy (SPEC 1).

Forward, two launches:
  token_stats_fwd_kernel       grid (N, n_programs): each program walks whole vocabulary chunks;
                               each thread folds its column of every tile of a chunk (runs of 16
                               bytes of adjacent logits) into its own online-softmax state (m, S, U)
                               (no cross-thread work in the loop), and the block reduces those once
                               per chunk -> state[N, n_chunks, 3]
  token_stats_finalize_kernel  grid (N,): merges a row's chunk states left to right, reads z_y,
                               writes logprob, entropy, lse and mean_z, and the state (max z, log S)
Backward, one launch:
  token_stats_bwd_kernel       grid (N, n_programs): one read of the logits, one write of dlogits in
                               the logits dtype (dlogits may alias logits: in-place backward)

Batch invariance (DESIGN.md): the reduction tree over a row is a function of V and the dtype alone.
A chunk is CHUNK_TILES tiles of BLOCK_V (both chosen from V), always folded from the empty state, and
the finalize merges the chunk states in index order. How many programs a row gets (more when rows are
too few to fill the device) only decides which program folds which chunk: one program walking all
chunks and ten programs taking one each run the same fp32 operations on the same values, so a row's
statistics are bitwise identical whatever N, its position, or padded vs packed input.
Sizes, strides, the ignore index and the program plan are runtime values (do_not_specialize): a new
length never recompiles. One compile-time flag, ALIGNED (rows_aligned: the rows' pointers and strides
are multiples of 16 bytes), lets the streaming kernels use 16-byte accesses: at most two variants per
dtype. It changes how a thread loads its logits, never which logits it folds in which order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels.triton.utils import (
    aligned_offset,
    grad_args,
    inverse_temperature,
    max_nan,
    merge_state,
    rows_aligned,
    split_plan,
)

_MAX_BLOCK_V = 4096
CHUNK_TILES = 8  # tiles per chunk: 32 768 logits at V >= 4096 (V = 151 936: 5 chunks)


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def column_max(x):
    """[GROUPS, VEC, COLS] -> [COLS]: a column is one thread's registers (no shuffle, no barrier),
    folded along VEC, then GROUPS."""
    return tl.max(tl.max(x, 1), 0)


@triton.jit
def column_sum(x):
    return tl.sum(tl.sum(x, 1), 0)


@triton.jit
def column_bcast(v):
    """[COLS] -> [1, 1, COLS], against a tile."""
    return v[None, None, :]


@triton.constexpr_function
def vector_width(bits, BLOCK_V, COLS):
    """Logits of ``bits`` bits a thread loads at once: 16 bytes' worth, or the whole column of a
    small tile. A function of the dtype and the tile alone: the reduction tree never depends on
    the rows' alignment (batch invariance)."""
    return min(128 // bits, BLOCK_V // COLS)


@triton.jit
def tile_offsets(BLOCK_V: tl.constexpr, COLS: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """[GROUPS, VEC, COLS] offsets of a tile's logits: element (g, k, j) is logit
    (g * COLS + j) * VEC + k, so column j (GROUPS runs of VEC adjacent logits, 16 bytes each) is one
    thread's and a warp's vectors are contiguous. Unaligned rows load the same elements 2 bytes at a
    time: the runs' contiguity is hidden from the compiler (it would spread a run over threads)."""
    GROUPS: tl.constexpr = BLOCK_V // (COLS * VEC)
    k = tl.arange(0, VEC)[None, :, None]
    if not ALIGNED:
        k = tl.max_contiguous(k, [1, 1, 1])
    return tl.arange(0, GROUPS)[:, None, None] * (COLS * VEC) + tl.arange(0, COLS)[None, None, :] * VEC + k


@triton.jit
def fold_columns(m, s, u, x, inv_t):
    """Folds a [GROUPS, VEC, COLS] tile of raw logits (padding = -inf) into per-column states:
    column j of every tile belongs to one thread, so the tile's max and sums are that thread's own
    registers (no shuffle, no barrier). m in natural units (max of x / T); s = sum 2^w and
    u = sum 2^w * w in base 2 with w = (x / T - m) * log2(e): one FMA, one multiply and one exp2 per
    logit, and one exp2 per column and tile to rescale. x / T - m is formed first (rounded once,
    small), as in csrc/include/lenkernels/token_stats.h: scaling x and m into base 2 apart would
    cancel two large rounded numbers at |z| = 1e4."""
    m_new = max_nan(m, column_max(x) * inv_t)  # max(x) / T == max(x / T): division by T > 0 is monotonic
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a column of -inf so far: w = -inf, not NaN
    w = (x * inv_t - column_bcast(ref)) * LOG2E
    e = tl.exp2(w)
    delta = (m - ref) * LOG2E
    c = tl.exp2(delta)
    empty = s == 0.0  # nothing but -inf so far: (m - ref) may be NaN, the state stays empty
    s_old = tl.where(empty, 0.0, c * s)
    u_old = tl.where(empty, 0.0, c * (u + delta * s))
    # a masked logit has e = 0 and w = -inf: 0 * -FLT_MAX = 0 where 0 * -inf would be NaN
    return m_new, s_old + column_sum(e), u_old + column_sum(e * tl.maximum(w, -FLT_MAX))


@triton.jit
def reduce_columns(m, s, u):
    """The chunk's state from the per-column states (u in base 2): the chunk max first (a max is the
    same in any order), every column rebased onto it (one exp), then S and U summed: a reduction
    tree fixed by the kernel's layout, with no exponential per step."""
    m_max = tl.max(m, 0)
    delta = m - m_max
    c = tl.exp(delta)
    empty = s == 0.0
    s_r = tl.where(empty, 0.0, c * s)
    u_r = tl.where(empty, 0.0, c * (u * LN2 + delta * s))
    return m_max, tl.sum(s_r, 0), tl.sum(u_r, 0)


@triton.jit
def chunk_state(row_ptr, tile_offs, start, stop, inv_t, BLOCK_V: tl.constexpr, COLS: tl.constexpr, TAIL: tl.constexpr):
    """(m, S, U) of logits [start, stop), folded tile by tile from the empty state. TAIL: the
    chunk ends in a partial tile (the row's last chunk when BLOCK_V does not divide V), folded last
    with a mask; every other tile is whole and loads without one."""
    m = tl.zeros([COLS], tl.float32) - float("inf")
    s = tl.zeros([COLS], tl.float32)
    u = tl.zeros([COLS], tl.float32)
    full = start + (stop - start) // BLOCK_V * BLOCK_V
    for tile in range(start, full, BLOCK_V):
        x = tl.load(row_ptr + tile + tile_offs).to(tl.float32)
        m, s, u = fold_columns(m, s, u, x, inv_t)
    if TAIL:
        offs = full + tile_offs
        x = tl.load(row_ptr + offs, mask=offs < stop, other=float("-inf")).to(tl.float32)
        m, s, u = fold_columns(m, s, u, x, inv_t)
    return reduce_columns(m, s, u)


@triton.jit
def chunk_plan(logits_ptr, temp_ptr, vocab, stride_row, temp_stride, n_chunks, chunks_per_program,
               BLOCK_V: tl.constexpr, COLS: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """What a forward program of the chunked plan folds: its row, 1/T, the row's pointer, the tile
    offsets, the chunks [first, last) it owns and whether the last of them is the row's partial
    (TAIL) chunk. The chunk with the row's partial tile (if any) is always the last, and always takes
    the TAIL path: which path folds a chunk is a function of V, whichever program folds it."""
    VEC: tl.constexpr = vector_width(logits_ptr.dtype.element_ty.primitive_bitwidth, BLOCK_V, COLS)
    row = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    inv_t = inverse_temperature(tl.load(temp_ptr + row * temp_stride))
    row_ptr = logits_ptr + aligned_offset(row, stride_row, logits_ptr, ALIGNED)
    tile_offs = tile_offsets(BLOCK_V, COLS, VEC, ALIGNED)
    first = program * chunks_per_program
    last = tl.minimum(first + chunks_per_program, n_chunks)
    tail = (vocab % BLOCK_V != 0) & (last == n_chunks)
    return row, inv_t, row_ptr, tile_offs, first, last, tail


@triton.jit(do_not_specialize=["vocab", "stride_row", "temp_stride", "n_chunks", "chunks_per_program"])
def token_stats_fwd_kernel(
    logits_ptr,  # [N, V] rows with stride_row, unit stride along V
    temp_ptr,  # [N] or [1] fp32
    state_ptr,  # [N, n_chunks, 3] fp32 out: (m, S, U) of each chunk
    vocab,
    stride_row,
    temp_stride,
    n_chunks,
    chunks_per_program,
    BLOCK_V: tl.constexpr,
    COLS: tl.constexpr,
    CHUNK_TILES: tl.constexpr,
    ALIGNED: tl.constexpr,  # rows start on 16 bytes (rows_aligned): 16-byte loads
):
    CHUNK: tl.constexpr = CHUNK_TILES * BLOCK_V
    row, inv_t, row_ptr, tile_offs, first, last, tail = chunk_plan(
        logits_ptr, temp_ptr, vocab, stride_row, temp_stride, n_chunks, chunks_per_program, BLOCK_V, COLS, ALIGNED
    )
    out = state_ptr + row * n_chunks * 3
    for chunk in range(first, last - tail.to(tl.int32)):
        # every chunk starts from the empty state: its (m, S, U) never depends on which program,
        # or after which other chunk, it was folded
        start = chunk * CHUNK
        stop = tl.minimum(start + CHUNK, vocab)  # whole tiles: the row's last chunk may hold fewer
        m, s, u = chunk_state(row_ptr, tile_offs, start, stop, inv_t, BLOCK_V, COLS, False)
        tl.store(out + chunk * 3, m)
        tl.store(out + chunk * 3 + 1, s)
        tl.store(out + chunk * 3 + 2, u)
    if tail:
        end = (n_chunks - 1).to(tl.int64)
        m, s, u = chunk_state(row_ptr, tile_offs, end * CHUNK, vocab, inv_t, BLOCK_V, COLS, True)
        tl.store(out + end * 3, m)
        tl.store(out + end * 3 + 1, s)
        tl.store(out + end * 3 + 2, u)


@triton.jit
def store_row_stats(row, m, s, u, logits_ptr, ids_ptr, temp_ptr, logprobs_ptr, entropy_ptr, lse_ptr, mean_z_ptr,
                    vocab, stride_row, temp_stride, ignore_index):  # fmt: skip
    """Writes a row's logprob, entropy, lse and mean_z from its merged (m, S, U) state; returns
    (log S, 1/T). Shared by every finalize kernel, so all paths give the same bits."""
    # all -inf row: s = 0 -> lse = -inf, entropy and logprob NaN (SPEC 1); NaN anywhere stays NaN
    log_s = tl.log(s)
    ratio = u / s
    inv_t = inverse_temperature(tl.load(temp_ptr + row * temp_stride))
    y = tl.load(ids_ptr + row).to(tl.int64)
    in_range = (y >= 0) & (y < vocab)
    z_y = tl.load(logits_ptr + row * stride_row + tl.where(in_range, y, 0)).to(tl.float32) * inv_t
    # (z_y - m) - log S: two small terms; z_y - lse would cancel two numbers of the logits' size
    # (lse rounded at |z| = 1e4 is ~4e-4 off)
    logprob = tl.where(y == ignore_index, 0.0, tl.where(in_range, (z_y - m) - log_s, float("nan")))
    tl.store(logprobs_ptr + row, logprob)
    tl.store(entropy_ptr + row, log_s - ratio)
    tl.store(lse_ptr + row, m + log_s)
    tl.store(mean_z_ptr + row, m + ratio)
    return log_s, inv_t


@triton.jit(do_not_specialize=["vocab", "stride_row", "temp_stride", "n_chunks", "ignore_index"])
def token_stats_finalize_kernel(
    logits_ptr,
    ids_ptr,  # [N] int32/int64
    temp_ptr,
    state_ptr,  # [N, n_chunks, 3]
    logprobs_ptr,  # [N] fp32 out
    entropy_ptr,
    lse_ptr,
    mean_z_ptr,
    max_z_ptr,  # [N] fp32 out: the row's state, lse = max z + log S (distributed.merge_stats)
    log_s_ptr,
    vocab,
    stride_row,
    temp_stride,
    n_chunks,
    ignore_index,
):
    row = tl.program_id(0).to(tl.int64)
    st = state_ptr + row * n_chunks * 3
    # chunk 0's state, then chunks 1, 2, ... merged in index order: a tree fixed by V
    m = tl.load(st)
    s = tl.load(st + 1)
    u = tl.load(st + 2)
    for i in range(1, n_chunks):
        m, s, u = merge_state(m, s, u, tl.load(st + 3 * i), tl.load(st + 3 * i + 1), tl.load(st + 3 * i + 2))
    log_s, _ = store_row_stats(row, m, s, u, logits_ptr, ids_ptr, temp_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
                               mean_z_ptr, vocab, stride_row, temp_stride, ignore_index)  # fmt: skip
    tl.store(max_z_ptr + row, m)
    tl.store(log_s_ptr + row, log_s)


@triton.jit
def tile_column(y, start, BLOCK_V: tl.constexpr):
    """Index y's column in the tile starting at ``start`` (int32), or -1 when y lies elsewhere: the
    per-logit comparisons are then 32-bit."""
    return tl.where((y >= start) & (y < start + BLOCK_V), y - start, -1).to(tl.int32)


@triton.jit
def grad_tile(x, hit, inv_t, lse, mean_z, a, b):
    """d logits of a tile of raw logits x (fp32): a = g_lp / T (0 on an ignored row), b = g_h / T,
    hit: the target's position. g_lp (1[j=y] - p) / T - g_h p (z - mean_z) / T with
    p = 2^((x / T - lse) log2(e)) as in csrc/include/lenkernels/token_stats.h (x / T - lse formed
    first, one FMA: no cancellation of two rounded large numbers): per logit one FMA, one multiply
    and one exp2 for p, then an FMA, a max, a multiply and two FMAs. A masked logit (-inf) has
    p = 0: its z - mean_z is clamped to -FLT_MAX so that p (z - mean_z) is 0, not NaN (the
    where(p > 0) of the definition)."""
    p = tl.exp2((x * inv_t - lse) * LOG2E)
    ent = p * tl.maximum(x * inv_t - mean_z, -FLT_MAX)
    return (tl.where(hit, a, 0.0) - p * a) - b * ent


@triton.jit
def tile_split(logits_ptr, dlogits_ptr, row, split, vocab, stride_row, stride_drow, tiles_per_split,
               BLOCK_V: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """A backward program's share of its row: the row's logits and gradient pointers and its tiles
    [first, last), of which [first, full) are whole (they load without a mask) and a partial last
    one, if any, is the row's last tile."""
    row_ptr = logits_ptr + aligned_offset(row, stride_row, logits_ptr, ALIGNED)
    out_ptr = dlogits_ptr + aligned_offset(row, stride_drow, dlogits_ptr, ALIGNED)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(vocab, BLOCK_V))
    full = tl.minimum(last, vocab // BLOCK_V)
    return row_ptr, out_ptr, first, last, full


@triton.jit(
    do_not_specialize=[
        "vocab",
        "stride_row",
        "stride_drow",
        "temp_stride",
        "g_lp_stride",
        "g_h_stride",
        "tiles_per_split",
        "ignore_index",
    ]
)
def token_stats_bwd_kernel(
    logits_ptr,
    dlogits_ptr,  # [N, V] out, logits dtype; may equal logits_ptr
    ids_ptr,
    temp_ptr,
    lse_ptr,
    mean_z_ptr,
    g_lp_ptr,  # [N] fp32 (any stride, 0 = broadcast)
    g_h_ptr,
    vocab,
    stride_row,
    stride_drow,
    temp_stride,
    g_lp_stride,
    g_h_stride,
    tiles_per_split,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ALIGNED: tl.constexpr,  # both rows start on 16 bytes (pointers and row strides): 16-byte accesses
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    inv_t = inverse_temperature(tl.load(temp_ptr + row * temp_stride))
    lse = tl.load(lse_ptr + row)
    mean_z = tl.load(mean_z_ptr + row)
    y = tl.load(ids_ptr + row).to(tl.int64)
    g_lp = tl.where(y == ignore_index, 0.0, tl.load(g_lp_ptr + row * g_lp_stride))
    a = g_lp * inv_t
    b = tl.load(g_h_ptr + row * g_h_stride) * inv_t
    row_ptr, out_ptr, first, last, full = tile_split(logits_ptr, dlogits_ptr, row, split, vocab, stride_row,
                                                     stride_drow, tiles_per_split, BLOCK_V, ALIGNED)  # fmt: skip
    cols = tl.arange(0, BLOCK_V)
    for tile in range(first, full):
        start = tile * BLOCK_V
        x = tl.load(row_ptr + start + cols).to(tl.float32)
        grad = grad_tile(x, cols == tile_column(y, start, BLOCK_V), inv_t, lse, mean_z, a, b)
        tl.store(out_ptr + start + cols, grad.to(dlogits_ptr.dtype.element_ty))
    if full < last:
        start = full * BLOCK_V
        valid = cols < vocab - start
        x = tl.load(row_ptr + start + cols, mask=valid, other=0.0).to(tl.float32)
        grad = grad_tile(x, cols == tile_column(y, start, BLOCK_V), inv_t, lse, mean_z, a, b)
        tl.store(out_ptr + start + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=valid)


def _block(vocab: int) -> tuple[int, int]:
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return block, (8 if block >= 2048 else 4)


def token_stats_fwd(logits, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, max_z=None, log_s=None):
    """Host launcher. logits [N, V] (unit stride along V), ids [N], temperature [N] or [1] fp32;
    writes the four [N] fp32 outputs, and the rows' states into max_z and log_s when given."""
    n_rows, vocab = logits.shape
    if max_z is None or log_s is None:  # always written: one kernel variant, 8 bytes a row
        # two allocations, not two rows of one: a row at an odd offset would change the pointer
        # alignment Triton specialises on (a second compiled variant)
        max_z, log_s = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(2))
    block, warps = _block(vocab)
    n_chunks = triton.cdiv(vocab, block * CHUNK_TILES)
    # the plan depends on N (few rows: several programs per row) but only picks who folds which chunk
    n_programs, chunks_per_program = split_plan(n_rows, n_chunks, logits.device)
    state = torch.empty((n_rows, n_chunks, 3), dtype=torch.float32, device=logits.device)
    # the row geometry both kernels read
    rows = {"logits_ptr": logits, "temp_ptr": temperature, "state_ptr": state, "vocab": vocab,
            "stride_row": logits.stride(0), "temp_stride": 0 if temperature.numel() == 1 else 1, "n_chunks": n_chunks}
    token_stats_fwd_kernel[(n_rows, n_programs)](
        **rows, chunks_per_program=chunks_per_program, BLOCK_V=block, COLS=min(block, 32 * warps),
        CHUNK_TILES=CHUNK_TILES, ALIGNED=rows_aligned(logits), num_warps=warps,  # ALIGNED: two variants at most
    )  # fmt: skip
    token_stats_finalize_kernel[(n_rows,)](
        **rows, ids_ptr=ids, logprobs_ptr=logprobs, entropy_ptr=entropy, lse_ptr=lse, mean_z_ptr=mean_z,
        max_z_ptr=max_z, log_s_ptr=log_s, ignore_index=ignore_index, num_warps=1,
    )  # fmt: skip


def token_stats_bwd(logits, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits):
    """Host launcher: writes dlogits [N, V] (logits dtype; may be ``logits`` itself)."""
    n_rows, vocab = logits.shape
    block, warps = _block(vocab)
    # elementwise given lse and mean_z: any split of the tiles gives the same bits
    n_splits, tiles_per_split = split_plan(n_rows, triton.cdiv(vocab, block), logits.device)
    token_stats_bwd_kernel[(n_rows, n_splits)](
        logits_ptr=logits,
        dlogits_ptr=dlogits,
        **grad_args(ids, temperature, lse, mean_z, g_logprobs, g_entropy),
        vocab=vocab,
        stride_row=logits.stride(0),
        stride_drow=dlogits.stride(0),
        tiles_per_split=tiles_per_split,
        ignore_index=ignore_index,
        BLOCK_V=block,
        ALIGNED=rows_aligned(logits, dlogits),  # two variants at most, whatever the sizes
        num_warps=warps,
    )


# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(dtype: torch.dtype, aligned: bool):
    """Forward (+ finalize) and backward of 2 rows at the largest tile (V >= 4096: BLOCK_V 4096, 8
    warps); ``aligned``: rows on 16-byte boundaries (V = 4096), else not (V = 4095)."""

    def run():
        n, vocab = 2, 4096 if aligned else 4095
        logits, ids, temp = torch.zeros((n, vocab), dtype=dtype), torch.zeros(n, dtype=torch.int64), torch.ones(1)
        lp, ent, lse, mean_z = (torch.empty(n) for _ in range(4))
        token_stats_fwd(logits, ids, temp, -100, lp, ent, lse, mean_z)
        token_stats_bwd(logits, ids, temp, lse, mean_z, lp, ent, -100, torch.empty_like(logits))

    return run


# every dtype, aligned and unaligned rows
AOT_CASES = [
    _aot_case(dtype, aligned) for dtype in (torch.bfloat16, torch.float16, torch.float32) for aligned in (True, False)
]


# the extra vocabulary statistics (lenkernels.token_stats(outputs=...)) live beside, same family
from lenkernels.triton.token_stats_extra import token_stats_extra_bwd, token_stats_extra_fwd  # noqa: F401
