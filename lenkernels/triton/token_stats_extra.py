"""Triton kernels of the extra vocabulary statistics (SPEC 7: sum_p2, argmax, max_logprob,
mean_logit), launched only by ``lenkernels.token_stats`` when asked for; part of the token_stats
family (its launchers are re-exported by ``lenkernels.triton.token_stats``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels.triton.token_stats import (
    _MAX_BLOCK_V,
    CHUNK_TILES,
    FLT_MAX,
    LOG2E,
    _block,
    chunk_plan,
    column_bcast,
    column_max,
    column_sum,
    fold_columns,
    reduce_columns,
    store_row_stats,
    tile_column,
    tile_split,
)
from lenkernels.triton.utils import inverse_temperature, merge_state, rows_aligned, split_plan

# --- extra vocabulary statistics (SPEC 7), launched only by lenkernels.token_stats when asked for ----
# Separate kernels, so the two-output kernels above keep their code, bits and instruction count.
# (m, S, U) are folded by the same fold_columns / reduce_columns / merge_state, so logprob and
# entropy are the same fp32 operations on the same values as above. Carried besides, per column:
#   S2 = sum exp(2 (z - m)) against the same running max (lse2 = 2 m + log S2: log_sum_p2 =
#        log S2 - 2 log S has no cancellation), rescaled by c^2 when the max moves;
#   the largest raw logit and its lowest index (ties -> lower id); the sum of the finite logits.
INT_MAX = tl.constexpr(2147483647)
EXTRA_STATE = 6  # m, S, U, S2, best logit, sum of finite logits (+ the argmax in an int32 buffer)


@triton.jit
def fold_columns_extra(m, s, u, s2, best, best_id, sum_x, x, tile_ids, inv_t):
    m_new, s_new, u_new = fold_columns(m, s, u, x, inv_t)
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2((x * inv_t - column_bcast(ref)) * LOG2E)
    c = tl.exp2((m - ref) * LOG2E)
    s2_new = tl.where(s == 0.0, 0.0, c * c * s2) + column_sum(e * e)
    tile_max = column_max(x)
    # tile_ids: global index of every element; the lowest among a column's maxima (a NaN matches none)
    tile_id = tl.min(tl.min(tl.where(x == column_bcast(tile_max), tile_ids, INT_MAX), 1), 0)
    take = (tile_max > best) | ((tile_max == best) & (tile_id < best_id))
    best = tl.where(take, tile_max, best)
    best_id = tl.where(take, tile_id, best_id)
    sum_x = sum_x + column_sum(tl.where(tl.abs(x) < float("inf"), x, 0.0))
    return m_new, s_new, u_new, s2_new, best, best_id, sum_x


@triton.jit
def chunk_state_extra(row_ptr, tile_offs, start, stop, inv_t, BLOCK_V: tl.constexpr, COLS: tl.constexpr,
                      TAIL: tl.constexpr):  # fmt: skip
    m = tl.zeros([COLS], tl.float32) - float("inf")
    s = tl.zeros([COLS], tl.float32)
    u = tl.zeros([COLS], tl.float32)
    s2 = tl.zeros([COLS], tl.float32)
    best = tl.zeros([COLS], tl.float32) - float("inf")
    best_id = tl.zeros([COLS], tl.int32) + INT_MAX
    sum_x = tl.zeros([COLS], tl.float32)
    full = start + (stop - start) // BLOCK_V * BLOCK_V
    for tile in range(start, full, BLOCK_V):
        x = tl.load(row_ptr + tile + tile_offs).to(tl.float32)
        m, s, u, s2, best, best_id, sum_x = fold_columns_extra(
            m, s, u, s2, best, best_id, sum_x, x, (tile + tile_offs).to(tl.int32), inv_t
        )
    if TAIL:
        offs = full + tile_offs
        x = tl.load(row_ptr + offs, mask=offs < stop, other=float("-inf")).to(tl.float32)
        m, s, u, s2, best, best_id, sum_x = fold_columns_extra(
            m, s, u, s2, best, best_id, sum_x, x, offs.to(tl.int32), inv_t
        )
    m_c, s_c, u_c = reduce_columns(m, s, u)
    c = tl.exp(m - m_c)
    s2_c = tl.sum(tl.where(s == 0.0, 0.0, c * c * s2), 0)
    best_c = tl.max(best, 0)
    id_c = tl.min(tl.where(best == best_c, best_id, INT_MAX), 0)
    return m_c, s_c, u_c, s2_c, best_c, id_c, tl.sum(sum_x, 0)


@triton.jit
def store_extra(out, ids_out, chunk, m, s, u, s2, best, best_id, sum_x):
    tl.store(out + chunk * 6, m)
    tl.store(out + chunk * 6 + 1, s)
    tl.store(out + chunk * 6 + 2, u)
    tl.store(out + chunk * 6 + 3, s2)
    tl.store(out + chunk * 6 + 4, best)
    tl.store(out + chunk * 6 + 5, sum_x)
    tl.store(ids_out + chunk, best_id)


@triton.jit(do_not_specialize=["vocab", "stride_row", "temp_stride", "n_chunks", "chunks_per_program"])
def token_stats_extra_fwd_kernel(
    logits_ptr,
    temp_ptr,
    state_ptr,  # [N, n_chunks, 6] fp32 out
    argmax_ptr,  # [N, n_chunks] int32 out: each chunk's argmax
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
    """token_stats_fwd_kernel's plan (fixed chunks, any program folds any chunk from the empty
    state) and tile layout, with the extra per-column state."""
    CHUNK: tl.constexpr = CHUNK_TILES * BLOCK_V
    row, inv_t, row_ptr, tile_offs, first, last, tail = chunk_plan(
        logits_ptr, temp_ptr, vocab, stride_row, temp_stride, n_chunks, chunks_per_program, BLOCK_V, COLS, ALIGNED
    )
    out = state_ptr + row * n_chunks * 6
    ids_out = argmax_ptr + row * n_chunks
    for chunk in range(first, last - tail.to(tl.int32)):
        start = chunk * CHUNK
        stop = tl.minimum(start + CHUNK, vocab)
        m, s, u, s2, best, best_id, sum_x = chunk_state_extra(row_ptr, tile_offs, start, stop, inv_t, BLOCK_V,
                                                              COLS, False)  # fmt: skip
        store_extra(out, ids_out, chunk, m, s, u, s2, best, best_id, sum_x)
    if tail:
        end = (n_chunks - 1).to(tl.int64)
        m, s, u, s2, best, best_id, sum_x = chunk_state_extra(row_ptr, tile_offs, end * CHUNK, vocab, inv_t,
                                                              BLOCK_V, COLS, True)  # fmt: skip
        store_extra(out, ids_out, end, m, s, u, s2, best, best_id, sum_x)


@triton.jit(do_not_specialize=["vocab", "stride_row", "temp_stride", "n_chunks", "ignore_index"])
def token_stats_extra_finalize_kernel(
    logits_ptr,
    ids_ptr,
    temp_ptr,
    state_ptr,  # [N, n_chunks, 6]
    chunk_argmax_ptr,  # [N, n_chunks] int32
    logprobs_ptr,  # [N] fp32 outs ...
    entropy_ptr,
    lse_ptr,
    mean_z_ptr,
    sum_p2_ptr,
    log_sum_p2_ptr,
    argmax_ptr,  # [N] int64 out
    max_logprob_ptr,
    mean_logit_ptr,
    vocab,
    stride_row,
    temp_stride,
    n_chunks,
    ignore_index,
):
    row = tl.program_id(0).to(tl.int64)
    st = state_ptr + row * n_chunks * 6
    ids_in = chunk_argmax_ptr + row * n_chunks
    m = tl.load(st)
    s = tl.load(st + 1)
    u = tl.load(st + 2)
    s2 = tl.load(st + 3)
    best = tl.load(st + 4)
    sum_x = tl.load(st + 5)
    best_id = tl.load(ids_in)
    for i in range(1, n_chunks):
        m_b = tl.load(st + 6 * i)
        s_b = tl.load(st + 6 * i + 1)
        s2_b = tl.load(st + 6 * i + 3)
        m_new, s_new, u = merge_state(m, s, u, m_b, s_b, tl.load(st + 6 * i + 2))
        c_a = tl.exp(m - m_new)
        c_b = tl.exp(m_b - m_new)
        s2 = tl.where(s == 0.0, 0.0, c_a * c_a * s2) + tl.where(s_b == 0.0, 0.0, c_b * c_b * s2_b)
        m = m_new
        s = s_new
        best_b = tl.load(st + 6 * i + 4)
        take = best_b > best  # a later chunk's ids are larger: a tie keeps the earlier one
        best_id = tl.where(take, tl.load(ids_in + i), best_id)
        best = tl.where(take, best_b, best)
        sum_x += tl.load(st + 6 * i + 5)
    log_s, inv_t = store_row_stats(row, m, s, u, logits_ptr, ids_ptr, temp_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
                                   mean_z_ptr, vocab, stride_row, temp_stride, ignore_index)  # fmt: skip
    log_sum_p2 = tl.log(s2) - 2.0 * log_s  # all -inf row: -inf - -inf = NaN
    tl.store(sum_p2_ptr + row, tl.exp(log_sum_p2))
    tl.store(log_sum_p2_ptr + row, log_sum_p2)
    tl.store(argmax_ptr + row, tl.where(best_id == INT_MAX, 0, best_id).to(tl.int64))
    has_mass = s > 0.0  # false for an all -inf row and for NaN
    tl.store(max_logprob_ptr + row, tl.where(has_mass, -log_s, float("nan")))  # m is the exact max: 0 - log S
    tl.store(mean_logit_ptr + row, tl.where(has_mass, sum_x * inv_t / vocab.to(tl.float32), float("nan")))


@triton.jit(
    do_not_specialize=[
        "n_rows", "vocab", "stride_row", "stride_drow", "temp_stride", "tiles_per_split", "ignore_index",
    ]
)  # fmt: skip
def token_stats_extra_bwd_kernel(
    logits_ptr,
    dlogits_ptr,
    ids_ptr,
    temp_ptr,
    lse_ptr,
    mean_z_ptr,
    log_sum_p2_ptr,
    argmax_ptr,  # [N] int64
    grads_ptr,  # [6, N] fp32 contiguous: g_lp, g_h, g_sum_p2, g_log_sum_p2, g_max_logprob, g_mean_logit
    n_rows,
    vocab,
    stride_row,
    stride_drow,
    temp_stride,
    tiles_per_split,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ALIGNED: tl.constexpr,  # both rows start on 16 bytes (rows_aligned): 16-byte accesses
):
    """One read of the logits, one write of dlogits, whatever outputs carry a gradient (in z, / T):
    g_lp (1[j=y] - p) - g_h p (z - mean_z) + 2 g_sp2 p (p - sum_p2) + 2 g_lsp2 (q - p)
    + g_mlp (1[j=argmax] - p) + g_mean 1[z finite] / V, with q = softmax(2z) = exp(2 (z - lse) - log_sum_p2)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    inv_t = inverse_temperature(tl.load(temp_ptr + row * temp_stride))
    lse = tl.load(lse_ptr + row)
    mean_z = tl.load(mean_z_ptr + row)
    log_sum_p2 = tl.load(log_sum_p2_ptr + row)
    sum_p2 = tl.exp(log_sum_p2)
    y = tl.load(ids_ptr + row).to(tl.int64)
    top = tl.load(argmax_ptr + row)
    g_lp = tl.where(y == ignore_index, 0.0, tl.load(grads_ptr + row))
    g_h = tl.load(grads_ptr + n_rows + row)
    g_sp2 = tl.load(grads_ptr + 2 * n_rows + row)
    g_lsp2 = tl.load(grads_ptr + 3 * n_rows + row)
    g_mlp = tl.load(grads_ptr + 4 * n_rows + row)
    g_mean = tl.load(grads_ptr + 5 * n_rows + row) / vocab.to(tl.float32)
    p_coef = g_lp + g_mlp + 2.0 * g_lsp2 + 2.0 * g_sp2 * sum_p2  # every -p_j term together
    row_ptr, out_ptr, first, last, full = tile_split(logits_ptr, dlogits_ptr, row, split, vocab, stride_row,
                                                     stride_drow, tiles_per_split, BLOCK_V, ALIGNED)  # fmt: skip
    cols = tl.arange(0, BLOCK_V)
    for tile in range(first, full):
        start = tile * BLOCK_V
        x = tl.load(row_ptr + start + cols).to(tl.float32)
        grad = extra_grad_tile(x, cols, start, y, top, inv_t, lse, mean_z, log_sum_p2, g_lp, g_h, g_sp2, g_lsp2,
                               g_mlp, g_mean, p_coef, BLOCK_V)  # fmt: skip
        tl.store(out_ptr + start + cols, grad.to(dlogits_ptr.dtype.element_ty))
    if full < last:
        start = full * BLOCK_V
        valid = cols < vocab - start
        x = tl.load(row_ptr + start + cols, mask=valid, other=0.0).to(tl.float32)
        grad = extra_grad_tile(x, cols, start, y, top, inv_t, lse, mean_z, log_sum_p2, g_lp, g_h, g_sp2, g_lsp2,
                               g_mlp, g_mean, p_coef, BLOCK_V)  # fmt: skip
        tl.store(out_ptr + start + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=valid)


@triton.jit
def extra_grad_tile(x, cols, start, y, top, inv_t, lse, mean_z, log_sum_p2, g_lp, g_h, g_sp2, g_lsp2, g_mlp, g_mean,
                    p_coef, BLOCK_V: tl.constexpr):  # fmt: skip
    """token_stats_extra_bwd_kernel's gradient of one tile of raw logits x (fp32)."""
    z = x * inv_t
    d = z - lse
    p = tl.exp(d)
    q = tl.exp(2.0 * d - log_sum_p2)
    # a masked logit (-inf) has p = 0: z - mean_z clamped so that p (z - mean_z) is 0, not NaN
    ent = p * tl.maximum(z - mean_z, -FLT_MAX)
    grad = (
        tl.where(cols == tile_column(y, start, BLOCK_V), g_lp, 0.0)
        + tl.where(cols == tile_column(top, start, BLOCK_V), g_mlp, 0.0) - p_coef * p - g_h * ent
        + 2.0 * g_sp2 * p * p + 2.0 * g_lsp2 * q + tl.where(tl.abs(z) < float("inf"), g_mean, 0.0)
    )  # fmt: skip
    return grad * inv_t


def token_stats_extra_fwd(logits, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, sum_p2,
                          log_sum_p2, argmax, max_logprob, mean_logit):  # fmt: skip
    """Host launcher of every SPEC 7 statistic (fp32 [N] outputs, argmax int64 [N])."""
    n_rows, vocab = logits.shape
    block, warps = _block(vocab)
    chunk_tiles = CHUNK_TILES
    if logits.dtype == torch.float32 and block == _MAX_BLOCK_V:
        # 16 fp32 logits a thread beside the seven column states: ptxas spills the unaligned
        # variant (sm_90); half-width tiles, twice as many a chunk (the same 32 768-logit chunks)
        block, chunk_tiles = block // 2, CHUNK_TILES * 2
    n_chunks = triton.cdiv(vocab, block * chunk_tiles)
    n_programs, chunks_per_program = split_plan(n_rows, n_chunks, logits.device)
    state = torch.empty((n_rows, n_chunks, EXTRA_STATE), dtype=torch.float32, device=logits.device)
    chunk_argmax = torch.empty((n_rows, n_chunks), dtype=torch.int32, device=logits.device)
    temp_stride = 0 if temperature.numel() == 1 else 1
    token_stats_extra_fwd_kernel[(n_rows, n_programs)](
        logits, temperature, state, chunk_argmax, vocab, logits.stride(0), temp_stride, n_chunks,
        chunks_per_program, BLOCK_V=block, COLS=min(block, 32 * warps), CHUNK_TILES=chunk_tiles,
        ALIGNED=rows_aligned(logits), num_warps=warps,
    )  # fmt: skip
    token_stats_extra_finalize_kernel[(n_rows,)](
        logits, ids, temperature, state, chunk_argmax, logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2,
        argmax, max_logprob, mean_logit, vocab, logits.stride(0), temp_stride, n_chunks, ignore_index, num_warps=1,
    )  # fmt: skip


def token_stats_extra_bwd(logits, ids, temperature, lse, mean_z, log_sum_p2, argmax, grads, ignore_index, dlogits):
    """Host launcher: writes dlogits [N, V] from the six cotangents ``grads`` (fp32 [N] each)."""
    n_rows, vocab = logits.shape
    block, warps = _block(vocab)
    n_splits, tiles_per_split = split_plan(n_rows, triton.cdiv(vocab, block), logits.device)
    g = torch.stack([x.reshape(-1).to(torch.float32) for x in grads])
    token_stats_extra_bwd_kernel[(n_rows, n_splits)](
        logits, dlogits, ids, temperature, lse, mean_z, log_sum_p2, argmax, g, n_rows, vocab, logits.stride(0),
        dlogits.stride(0), 0 if temperature.numel() == 1 else 1, tiles_per_split, ignore_index, BLOCK_V=block,
        ALIGNED=rows_aligned(logits, dlogits), num_warps=warps,
    )  # fmt: skip


# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(dtype: torch.dtype, aligned: bool):
    """Every SPEC 7 statistic, forward (+ finalize) and backward, of 2 rows at the largest tile
    (BLOCK_V 4096, 8 warps); ``aligned``: rows on 16-byte boundaries (V = 4096), else not (4095)."""

    def run():
        n, vocab = 2, 4096 if aligned else 4095
        logits, ids, temp = torch.zeros((n, vocab), dtype=dtype), torch.zeros(n, dtype=torch.int64), torch.ones(1)
        outs = [torch.empty(n) for _ in range(6)]  # logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2
        argmax = torch.empty(n, dtype=torch.int64)
        token_stats_extra_fwd(logits, ids, temp, -100, *outs, argmax, torch.empty(n), torch.empty(n))
        dlogits = torch.empty_like(logits)
        token_stats_extra_bwd(logits, ids, temp, outs[2], outs[3], outs[5], argmax, outs, -100, dlogits)

    return run


# every dtype, aligned and unaligned rows
AOT_CASES = [
    _aot_case(dtype, aligned) for dtype in (torch.bfloat16, torch.float16, torch.float32) for aligned in (True, False)
]
