"""Triton kernels for token log-probabilities and entropy (SPEC 1).

Forward, two launches:
  token_stats_fwd_kernel       grid (N, n_splits): each program folds its vocabulary range into an
                               online-softmax state (m, S, U) -> state[N, n_splits, 3]
  token_stats_finalize_kernel  grid (N,): merges a row's states left to right, reads z_y, writes
                               logprob, entropy, lse and mean_z, and the state (max z, log S)
Backward, one launch:
  token_stats_bwd_kernel       grid (N, n_splits): one read of the logits, one write of dlogits in
                               the logits dtype (dlogits may alias logits: in-place backward)
n_splits > 1 only when rows are too few to fill the device. Sizes, strides, the ignore index and
the split plan are runtime values (do_not_specialize): a new length never recompiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lenkernels.triton.utils import inverse_temperature, merge_state, split_plan, tile_update

_MAX_BLOCK_V = 4096


@triton.jit(do_not_specialize=["vocab", "stride_row", "temp_stride", "tiles_per_split", "n_splits"])
def token_stats_fwd_kernel(
    logits_ptr,  # [N, V] rows with stride_row, unit stride along V
    temp_ptr,  # [N] or [1] fp32
    state_ptr,  # [N, n_splits, 3] fp32 out: (m, S, U)
    vocab,
    stride_row,
    temp_stride,
    tiles_per_split,
    n_splits,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    inv_t = inverse_temperature(tl.load(temp_ptr + row * temp_stride))
    row_ptr = logits_ptr + row * stride_row
    m = tl.zeros([], tl.float32) - float("inf")
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    first = split * tiles_per_split * BLOCK_V
    for i in range(0, tiles_per_split):
        offs = first + i * BLOCK_V + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) * inv_t
        m, s, u = tile_update(m, s, u, z)
    out = state_ptr + (row * n_splits + split) * 3
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, u)


@triton.jit(do_not_specialize=["vocab", "stride_row", "temp_stride", "n_splits", "ignore_index"])
def token_stats_finalize_kernel(
    logits_ptr,
    ids_ptr,  # [N] int32/int64
    temp_ptr,
    state_ptr,  # [N, n_splits, 3]
    logprobs_ptr,  # [N] fp32 out
    entropy_ptr,
    lse_ptr,
    mean_z_ptr,
    max_z_ptr,  # [N] fp32 out: the row's state, lse = max z + log S (distributed.merge_stats)
    log_s_ptr,
    vocab,
    stride_row,
    temp_stride,
    n_splits,
    ignore_index,
):
    row = tl.program_id(0).to(tl.int64)
    st = state_ptr + row * n_splits * 3
    m = tl.load(st)
    s = tl.load(st + 1)
    u = tl.load(st + 2)
    for i in range(1, n_splits):
        m, s, u = merge_state(m, s, u, tl.load(st + 3 * i), tl.load(st + 3 * i + 1), tl.load(st + 3 * i + 2))
    # all -inf row: s = 0 -> lse = -inf, entropy and logprob NaN (SPEC 1); NaN anywhere stays NaN
    log_s = tl.log(s)
    ratio = u / s
    lse = m + log_s
    inv_t = inverse_temperature(tl.load(temp_ptr + row * temp_stride))
    y = tl.load(ids_ptr + row).to(tl.int64)
    in_range = (y >= 0) & (y < vocab)
    z_y = tl.load(logits_ptr + row * stride_row + tl.where(in_range, y, 0)).to(tl.float32) * inv_t
    # (z_y - m) - log S: two small terms; z_y - lse would cancel two numbers of the logits' size
    # (lse rounded at |z| = 1e4 is ~4e-4 off)
    logprob = tl.where(y == ignore_index, 0.0, tl.where(in_range, (z_y - m) - log_s, float("nan")))
    tl.store(logprobs_ptr + row, logprob)
    tl.store(entropy_ptr + row, log_s - ratio)
    tl.store(lse_ptr + row, lse)
    tl.store(mean_z_ptr + row, m + ratio)
    tl.store(max_z_ptr + row, m)
    tl.store(log_s_ptr + row, log_s)


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
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    inv_t = inverse_temperature(tl.load(temp_ptr + row * temp_stride))
    lse = tl.load(lse_ptr + row)
    mean_z = tl.load(mean_z_ptr + row)
    y = tl.load(ids_ptr + row).to(tl.int64)
    g_lp = tl.where(y == ignore_index, 0.0, tl.load(g_lp_ptr + row * g_lp_stride))
    g_h = tl.load(g_h_ptr + row * g_h_stride)
    row_ptr = logits_ptr + row * stride_row
    out_ptr = dlogits_ptr + row * stride_drow
    first = split * tiles_per_split * BLOCK_V
    for i in range(0, tiles_per_split):
        offs = first + i * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = offs < vocab
        z = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        ent = tl.where(p > 0.0, p * (z - mean_z), 0.0)
        onehot = tl.where(offs == y, 1.0, 0.0)
        grad = (g_lp * (onehot - p) - g_h * ent) * inv_t
        tl.store(out_ptr + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=valid)


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
    n_splits, tiles_per_split = split_plan(n_rows, triton.cdiv(vocab, block), logits.device)
    state = torch.empty((n_rows, n_splits, 3), dtype=torch.float32, device=logits.device)
    temp_stride = 0 if temperature.numel() == 1 else 1
    token_stats_fwd_kernel[(n_rows, n_splits)](
        logits_ptr=logits,
        temp_ptr=temperature,
        state_ptr=state,
        vocab=vocab,
        stride_row=logits.stride(0),
        temp_stride=temp_stride,
        tiles_per_split=tiles_per_split,
        n_splits=n_splits,
        BLOCK_V=block,
        num_warps=warps,
    )
    token_stats_finalize_kernel[(n_rows,)](
        logits_ptr=logits,
        ids_ptr=ids,
        temp_ptr=temperature,
        state_ptr=state,
        logprobs_ptr=logprobs,
        entropy_ptr=entropy,
        lse_ptr=lse,
        mean_z_ptr=mean_z,
        max_z_ptr=max_z,
        log_s_ptr=log_s,
        vocab=vocab,
        stride_row=logits.stride(0),
        temp_stride=temp_stride,
        n_splits=n_splits,
        ignore_index=ignore_index,
        num_warps=1,
    )


def token_stats_bwd(logits, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits):
    """Host launcher: writes dlogits [N, V] (logits dtype; may be ``logits`` itself)."""
    n_rows, vocab = logits.shape
    block, warps = _block(vocab)
    n_splits, tiles_per_split = split_plan(n_rows, triton.cdiv(vocab, block), logits.device)
    token_stats_bwd_kernel[(n_rows, n_splits)](
        logits_ptr=logits,
        dlogits_ptr=dlogits,
        ids_ptr=ids,
        temp_ptr=temperature,
        lse_ptr=lse,
        mean_z_ptr=mean_z,
        g_lp_ptr=g_logprobs,
        g_h_ptr=g_entropy,
        vocab=vocab,
        stride_row=logits.stride(0),
        stride_drow=dlogits.stride(0),
        temp_stride=0 if temperature.numel() == 1 else 1,
        g_lp_stride=g_logprobs.stride(0),
        g_h_stride=g_entropy.stride(0),
        tiles_per_split=tiles_per_split,
        ignore_index=ignore_index,
        BLOCK_V=block,
        num_warps=warps,
    )


_COMMON = {"vocab": "i32", "stride_row": "i64", "temp_stride": "i32"}
AOT_SPECS = [
    {
        "kernel": token_stats_fwd_kernel,
        "signature": {"logits_ptr": f"*{dt}", "temp_ptr": "*fp32", "state_ptr": "*fp32", **_COMMON,
                      "tiles_per_split": "i32", "n_splits": "i32", "BLOCK_V": "constexpr"},
        "constexprs": {"BLOCK_V": _MAX_BLOCK_V},
        "num_warps": 8,
    }
    for dt in ("bf16", "fp16", "fp32")
] + [
    {
        "kernel": token_stats_finalize_kernel,
        "signature": {"logits_ptr": "*bf16", "ids_ptr": "*i64", "temp_ptr": "*fp32", "state_ptr": "*fp32",
                      "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "mean_z_ptr": "*fp32",
                      "max_z_ptr": "*fp32", "log_s_ptr": "*fp32", **_COMMON, "n_splits": "i32", "ignore_index": "i64"},
        "num_warps": 1,
    },
] + [
    {
        "kernel": token_stats_bwd_kernel,
        "signature": {"logits_ptr": f"*{dt}", "dlogits_ptr": f"*{dt}", "ids_ptr": "*i64", "temp_ptr": "*fp32",
                      "lse_ptr": "*fp32", "mean_z_ptr": "*fp32", "g_lp_ptr": "*fp32", "g_h_ptr": "*fp32",
                      **_COMMON, "stride_drow": "i64", "g_lp_stride": "i64", "g_h_stride": "i64",
                      "tiles_per_split": "i32", "ignore_index": "i64", "BLOCK_V": "constexpr"},
        "constexprs": {"BLOCK_V": _MAX_BLOCK_V},
        "num_warps": 8,
    }
    for dt in ("bf16", "fp16", "fp32")
]  # fmt: skip
