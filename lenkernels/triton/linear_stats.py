"""Triton kernels for token log-probabilities and entropy from the last hidden state and the LM
head, never holding the ``[N, V]`` logits.

Forward, two launches:
  linear_stats_fwd_kernel       grid (row tiles, n_programs): a tiled matmul (tl.dot over D) whose
                                epilogue folds each [BLOCK_N, BLOCK_V] logits tile into the per-row
                                online-softmax state (m, S, U) and picks up z_y; each vocabulary chunk
                                (CHUNK_TILES tiles) is folded from the empty state into its own slot
                                -> state[N, n_chunks, 4] = (m, S, U, z_y part)
  linear_stats_finalize_kernel  grid (row blocks,): merges each row's chunk states in index order,
                                writes logprob, entropy, lse and mean_z, and the state (max z, log S)
Batch invariance (DESIGN.md): the reduction tree over a row's vocabulary is a function of V alone;
the split plan (more programs per row tile when rows are few) only assigns chunks to programs, and
tl.dot's MMA sums over D in one order for every element of a tile (the same instructions for every
row; checked on the interpreter, not yet on a GPU), so a row's statistics and dlogits are bitwise
identical whatever N, its place in a BLOCK_N tile, or padded vs packed input (on the CPU
interpreter, whose tl.dot is a position-dependent numpy matmul, the dot is an explicit fp32 sum).
Backward, per tile of rows x vocabulary columns (the host bounds the tile, and with it the memory):
  linear_stats_bwd_kernel       recomputes the logits tile with the forward's own code (same
                                blocks, same K order, rounded to the hidden dtype) and writes
                                dlogits (SPEC 1) in the hidden dtype; the host then accumulates
                                dhidden += dlogits @ W and dweight = dlogits^T @ h with GEMMs.
Why the backward GEMMs are not fused: without float atomics (DESIGN: deterministic) a fused
dweight/dhidden accumulation would re-read and re-write a [BLOCK_V, D] or [BLOCK_N, D] fp32 slab
once per tile pair, O(N V D / BLOCK) bytes of traffic; a bounded dlogits tile plus a GEMM moves
O(tile) bytes and runs at GEMM speed.

Ids are shard-local (``lenkernels.distributed``): -1 ignored, -2 target elsewhere, else a column.
Sizes, strides and the chunk plan are runtime values (do_not_specialize): no recompiles. The
launchers (``linear_stats_fwd``, ``linear_stats_bwd_tile``) are the ``backend="triton"``
implementation of the linear_stats family (same signatures as ``lenkernels/{cpu,reference}/linear_stats.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels import _backend
from lenkernels import distributed as lkdist
from lenkernels.triton.utils import grad_args, inverse_temperature, max_nan, merge_state, rescale_state, split_plan

NUM_WARPS = 8
# (BLOCK_N, BLOCK_V, BLOCK_K) per dtype: the largest tiles without register spills on sm_80 and
# sm_90 (the AOT test checks every variant); fp32 operands take twice the registers of 16-bit ones
TILES = {torch.bfloat16: (64, 128, 32), torch.float16: (64, 128, 32), torch.float32: (64, 64, 32)}
_FINALIZE_BLOCK = 128
# vocabulary tiles per chunk (1024 columns in 16-bit, 512 in fp32): the reduction tree over a row's
# vocabulary is a function of V alone (see linear_stats_fwd)
CHUNK_TILES = tl.constexpr(8)
# shard-local id of an ignored row (lenkernels.distributed; csrc/include/lenkernels/linear_stats.h)
IGNORED_ID = tl.constexpr(lkdist.IGNORED)


@triton.jit
def logits_tile(
    h_ptr,  # [n_rows, dim] hidden, unit stride along dim
    w_ptr,  # [vocab, dim] LM head, unit stride along dim
    b_ptr,  # [vocab] bias (read only when HAS_BIAS)
    rows,  # [BLOCK_N] int64 row indices
    cols,  # [BLOCK_V] int64 vocabulary indices
    n_rows,
    vocab,
    dim,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] logits in fp32, rounded through the hidden dtype like an eager
    ``F.linear`` in that dtype. Forward and backward both call this: identical bits."""
    row_ok = rows < n_rows
    col_ok = cols < vocab
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            # CPU interpreter only: its tl.dot multiplies bf16 bit patterns as integers, and is a
            # numpy matmul whose summation order depends on the row's position in the tile (BLAS
            # edge kernels). Products in fp32 (exact for 16-bit inputs) summed over K in one order
            # for every element: a row's logits do not depend on its place in the row tile.
            acc += tl.sum(h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], 1)
        else:
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if h_ptr.dtype.element_ty == tl.bfloat16:
        return round_to_bf16(acc)
    return acc.to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest bf16 (ties to even, as torch rounds), kept in fp32. Spelled out in integer
    ops because the CPU interpreter's own fp32 -> bf16 cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def fold_rows(m, s, u, z):
    """Folds a [BLOCK_N, BLOCK_V] tile of scaled logits (masked = -inf) into per-row states."""
    m_new = max_nan(m, tl.max(z, 1))
    masked = z == float("-inf")
    d = tl.where(masked, 0.0, z - m_new[:, None])  # no -inf * 0 below, even for all-masked rows
    e = tl.where(masked, 0.0, tl.exp(d))
    s_old, u_old = rescale_state(m, s, u, m_new)
    return m_new, s_old + tl.sum(e, 1), u_old + tl.sum(tl.where(e > 0.0, e * d, 0.0), 1)


@triton.jit(
    do_not_specialize=[
        "n_rows",
        "vocab",
        "dim",
        "stride_h",
        "stride_w",
        "temp_stride",
        "chunks_per_program",
        "n_chunks",
    ]
)
def linear_stats_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,  # [N] int64 shard-local ids
    temp_ptr,  # [N] or [1] fp32
    state_ptr,  # [N, n_chunks, 4] fp32 out: (m, S, U, z_y or 0) of each vocabulary chunk
    n_rows,
    vocab,
    dim,
    stride_h,
    stride_w,
    temp_stride,
    chunks_per_program,
    n_chunks,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    inv_t = inverse_temperature(tl.load(temp_ptr + rows * temp_stride, mask=row_ok, other=1.0))
    y = tl.load(ids_ptr + rows, mask=row_ok, other=IGNORED_ID).to(tl.int64)
    n_tiles = tl.cdiv(vocab, BLOCK_V)
    first = program * chunks_per_program
    last = tl.minimum(first + chunks_per_program, n_chunks)
    for chunk in range(first, last):
        # every chunk starts from the empty state and lands in its own slot: its (m, S, U) never
        # depends on which program, or after which other chunk, folded it
        m = tl.zeros([BLOCK_N], tl.float32) - float("inf")
        s = tl.zeros([BLOCK_N], tl.float32)
        u = tl.zeros([BLOCK_N], tl.float32)
        z_y = tl.zeros([BLOCK_N], tl.float32)
        for tile in range(chunk * CHUNK_TILES, tl.minimum(chunk * CHUNK_TILES + CHUNK_TILES, n_tiles)):
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            logits = logits_tile(
                h_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, dim, stride_h, stride_w,
                HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST_DOT,
            )  # fmt: skip
            z = tl.where((cols < vocab)[None, :], logits * inv_t[:, None], float("-inf"))
            # exactly one column of one chunk holds the target: the other terms are exact zeros
            z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
            m, s, u = fold_rows(m, s, u, z)
        out = state_ptr + (rows * n_chunks + chunk) * 4
        tl.store(out, m, mask=row_ok)
        tl.store(out + 1, s, mask=row_ok)
        tl.store(out + 2, u, mask=row_ok)
        tl.store(out + 3, z_y, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "vocab", "n_splits"])
def linear_stats_finalize_kernel(
    state_ptr,  # [N, n_splits, 4]
    ids_ptr,  # [N] int64 shard-local ids
    logprobs_ptr,  # [N] fp32 out: (z_y - m) - log S; 0 for id -1; NaN for a target not in this shard
    entropy_ptr,
    lse_ptr,
    mean_z_ptr,
    max_z_ptr,  # [N] fp32 out: the row's state, lse = max z + log S (distributed.merge_stats)
    log_s_ptr,
    n_rows,
    vocab,
    n_splits,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    st = state_ptr + rows * n_splits * 4
    m = tl.load(st, mask=ok, other=0.0)
    s = tl.load(st + 1, mask=ok, other=1.0)
    u = tl.load(st + 2, mask=ok, other=0.0)
    z_y = tl.load(st + 3, mask=ok, other=0.0)
    for i in range(1, n_splits):
        m, s, u = merge_state(
            m, s, u,
            tl.load(st + 4 * i, mask=ok, other=0.0),
            tl.load(st + 4 * i + 1, mask=ok, other=1.0),
            tl.load(st + 4 * i + 2, mask=ok, other=0.0),
        )  # fmt: skip
        z_y += tl.load(st + 4 * i + 3, mask=ok, other=0.0)
    # all -inf row: s = 0 -> lse = -inf, entropy and logprob NaN (SPEC 1)
    log_s = tl.log(s)
    ratio = u / s
    lse = m + log_s
    y = tl.load(ids_ptr + rows, mask=ok, other=IGNORED_ID)
    held = (y >= 0) & (y < vocab)
    # two small terms: z_y - lse would cancel two numbers of the logits' size (~4e-4 off at 1e4)
    logprob = tl.where(y == IGNORED_ID, 0.0, tl.where(held, (z_y - m) - log_s, float("nan")))
    tl.store(logprobs_ptr + rows, logprob, mask=ok)
    tl.store(entropy_ptr + rows, log_s - ratio, mask=ok)
    tl.store(lse_ptr + rows, lse, mask=ok)
    tl.store(mean_z_ptr + rows, m + ratio, mask=ok)
    tl.store(max_z_ptr + rows, m, mask=ok)
    tl.store(log_s_ptr + rows, log_s, mask=ok)


@triton.jit(
    do_not_specialize=[
        "row_start", "row_stop", "col_start", "col_stop", "dim", "stride_h", "stride_w", "stride_d", "temp_stride",
        "g_lp_stride", "g_h_stride",
    ]
)  # fmt: skip
def linear_stats_bwd_kernel(
    h_ptr,  # [N, dim] all rows (the tile is rows [row_start, row_stop))
    w_ptr,  # [V, dim] all of this shard's vocabulary (the tile is columns [col_start, col_stop))
    b_ptr,
    ids_ptr,  # [N] int64 shard-local ids: -1 ignored, -2 target elsewhere, else a column
    temp_ptr,  # [N] or [1] fp32
    lse_ptr,  # [N] fp32, of the whole vocabulary
    mean_z_ptr,
    g_lp_ptr,  # [N] fp32 (any stride)
    g_h_ptr,
    dlogits_ptr,  # [row_stop - row_start, col_stop - col_start] out, hidden dtype, row stride stride_d
    row_start,
    row_stop,
    col_start,
    col_stop,
    dim,
    stride_h,
    stride_w,
    stride_d,
    temp_stride,
    g_lp_stride,
    g_h_stride,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # base pointers plus runtime offsets (not sliced tensors): tile positions never change the
    # pointer alignment Triton specialises on, so no tile triggers a recompile
    rows = row_start + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_start + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < row_stop
    col_ok = cols < col_stop
    logits = logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, row_stop, col_stop, dim, stride_h, stride_w,
        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST_DOT,
    )  # fmt: skip
    inv_t = inverse_temperature(tl.load(temp_ptr + rows * temp_stride, mask=row_ok, other=1.0))
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mean_z = tl.load(mean_z_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(ids_ptr + rows, mask=row_ok, other=IGNORED_ID).to(tl.int64)
    g_lp = tl.where(y == IGNORED_ID, 0.0, tl.load(g_lp_ptr + rows * g_lp_stride, mask=row_ok, other=0.0))
    g_h = tl.load(g_h_ptr + rows * g_h_stride, mask=row_ok, other=0.0)
    z = logits * inv_t[:, None]
    p = tl.exp(z - lse[:, None])
    ent = tl.where(p > 0.0, p * (z - mean_z[:, None]), 0.0)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    grad = (g_lp[:, None] * (onehot - p) - g_h[:, None] * ent) * inv_t[:, None]
    if dlogits_ptr.dtype.element_ty == tl.bfloat16:
        grad = round_to_bf16(grad)  # exact from here on: the cast below only drops zero bits
    tl.store(
        dlogits_ptr + (rows - row_start)[:, None] * stride_d + (cols - col_start)[None, :],
        grad.to(dlogits_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, so the kernel rounds like the eager logits path
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _common(hidden, weight, bias):
    return {
        "h_ptr": hidden,
        "w_ptr": weight,
        "b_ptr": weight if bias is None else bias,  # never read without a bias
        "dim": hidden.shape[1],
        "stride_h": hidden.stride(0),
        "stride_w": weight.stride(0),
        "HAS_BIAS": bias is not None,
        **dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_K"), TILES[hidden.dtype])),
        "DOT_PRECISION": _dot_precision(hidden.dtype),
        "UPCAST_DOT": _backend._triton_status()[1],  # the interpreter, every dtype
    }


def linear_stats_fwd(hidden, weight, bias, ids, temperature, chunk_size, logprobs, entropy, lse, mean_z, max_z,
                     log_s):  # fmt: skip
    """Host launcher. hidden [N, D], weight [V, D] (unit stride along D), bias [V] or None,
    ids [N] int64 shard-local, temperature [N] or [1] fp32; writes the six [N] fp32 outputs
    (statistics, then the rows' states max_z, log_s). ``chunk_size`` does not apply: the forward
    holds no logits (the state is folded in the matmul's epilogue)."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    block_n, block_v, _ = TILES[hidden.dtype]
    row_tiles = triton.cdiv(n_rows, block_n)
    n_chunks = triton.cdiv(triton.cdiv(vocab, block_v), CHUNK_TILES.value)
    # batch invariance: chunks of CHUNK_TILES tiles, each folded from the empty state into its own
    # slot and merged in index order by the finalize (a tree fixed by V); the plan, which depends on
    # N, only decides how many programs share a row tile's chunks
    n_programs, chunks_per_program = split_plan(row_tiles, n_chunks, hidden.device)
    state = torch.empty((n_rows, n_chunks, 4), dtype=torch.float32, device=hidden.device)
    linear_stats_fwd_kernel[(row_tiles, n_programs)](
        ids_ptr=ids,
        temp_ptr=temperature,
        state_ptr=state,
        n_rows=n_rows,
        vocab=vocab,
        temp_stride=0 if temperature.numel() == 1 else 1,
        chunks_per_program=chunks_per_program,
        n_chunks=n_chunks,
        num_warps=NUM_WARPS,
        **_common(hidden, weight, bias),
    )
    linear_stats_finalize_kernel[(triton.cdiv(n_rows, _FINALIZE_BLOCK),)](
        state_ptr=state,
        ids_ptr=ids,
        logprobs_ptr=logprobs,
        entropy_ptr=entropy,
        lse_ptr=lse,
        mean_z_ptr=mean_z,
        max_z_ptr=max_z,
        log_s_ptr=log_s,
        n_rows=n_rows,
        vocab=vocab,
        n_splits=n_chunks,
        BLOCK=_FINALIZE_BLOCK,
        num_warps=4,
    )


def linear_stats_bwd_tile(
    hidden, weight, bias, ids, temperature, lse, mean_z, g_logprobs, g_entropy, rows, cols, dlogits
):  # fmt: skip
    """Host launcher for one tile: rows ``[r0, r1)`` x vocabulary columns ``[v0, v1)`` of the
    shard (``rows``/``cols`` are the pairs). All other tensors are whole ([N, D], [V, D], [N]);
    writes dlogits [r1 - r0, v1 - v0] (hidden dtype, unit stride along the vocabulary)."""
    (r0, r1), (v0, v1) = rows, cols
    block_n, block_v, _ = TILES[hidden.dtype]
    linear_stats_bwd_kernel[(triton.cdiv(r1 - r0, block_n), triton.cdiv(v1 - v0, block_v))](
        **grad_args(ids, temperature, lse, mean_z, g_logprobs, g_entropy),
        dlogits_ptr=dlogits,
        row_start=r0,
        row_stop=r1,
        col_start=v0,
        col_stop=v1,
        stride_d=dlogits.stride(0),
        num_warps=NUM_WARPS,
        **_common(hidden, weight, bias),
    )


# --- ahead-of-time compilation cases (lenkernels/triton/aot.py) -----------------------------------


def _aot_case(dtype: torch.dtype, has_bias: bool, tf32: bool = False):
    """Forward (+ finalize) and one backward tile of 4 rows x 256 columns, D = 64, in ``dtype``;
    ``tf32``: fp32 with torch's tf32 matmul setting on (the tf32 dot)."""

    def run():
        n, v, d = 4, 256, 64
        h, w = torch.zeros((n, d), dtype=dtype), torch.zeros((v, d), dtype=dtype)
        b = torch.zeros(v, dtype=dtype) if has_bias else None
        ids, temp = torch.zeros(n, dtype=torch.int64), torch.ones(1)
        stats = [torch.empty(n) for _ in range(6)]
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            linear_stats_fwd(h, w, b, ids, temp, 0, *stats)
            linear_stats_bwd_tile(h, w, b, ids, temp, stats[2], stats[3], stats[0], stats[1], (0, n), (0, v),
                                  torch.empty((n, v), dtype=dtype))  # fmt: skip
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved

    return run


# every dtype and dot precision with a bias (the longer code path); bf16 without one as well
AOT_CASES = [
    _aot_case(torch.bfloat16, has_bias=False),
    _aot_case(torch.bfloat16, has_bias=True),
    _aot_case(torch.float16, has_bias=True),
    _aot_case(torch.float32, has_bias=True),
    _aot_case(torch.float32, has_bias=True, tf32=True),
]
