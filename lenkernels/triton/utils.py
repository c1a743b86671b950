"""Helpers shared by the Triton kernels: the online-softmax state maths (the Triton twin of
``csrc/include/lenkernels/softmax_state.h``) and launch planning."""

from __future__ import annotations

import enum
import functools
import types

import torch
import triton
import triton.language as tl


def constexprs(codes: type[enum.IntEnum]) -> types.ModuleType:
    """An enum of ``lenkernels._codes`` as a namespace of ``tl.constexpr`` globals, the form Triton
    kernels may read: ``if MODE == MODES.GSPO:`` compiles to one branch per mode, with no literal."""
    namespace = types.ModuleType(codes.__name__)
    for member in codes:
        setattr(namespace, member.name, tl.constexpr(int(member)))
    return namespace


@triton.jit
def max_nan(a, b):
    """max that propagates NaN (a NaN logit must never disappear into the running max)."""
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def inverse_temperature(t):
    """1 / T, or NaN when T is not a positive finite number."""
    ok = (t > 0.0) & (t < float("inf"))
    return tl.where(ok, 1.0 / tl.where(ok, t, 1.0), float("nan"))


@triton.jit
def rescale_state(m_a, s_a, u_a, m_new):
    """(S, U) of a state re-expressed against max ``m_new``; an empty state (S = 0) stays empty."""
    delta = m_a - m_new
    c = tl.exp(delta)
    empty = s_a == 0.0
    s = tl.where(empty, 0.0, c * s_a)
    u = tl.where(empty, 0.0, c * (u_a + delta * s_a))
    return s, u


@triton.jit
def merge_state(m_a, s_a, u_a, m_b, s_b, u_b):
    m = max_nan(m_a, m_b)
    sa, ua = rescale_state(m_a, s_a, u_a, m)
    sb, ub = rescale_state(m_b, s_b, u_b, m)
    return m, sa + sb, ua + ub


@triton.jit
def tile_update(m, s, u, z):
    """Folds a tile of scaled logits ``z`` (masked lanes = -inf) into the running state."""
    m_new = max_nan(m, tl.max(z, 0))
    d = z - m_new
    e = tl.where(z == float("-inf"), 0.0, tl.exp(d))
    tile_s = tl.sum(e, 0)
    tile_u = tl.sum(tl.where(e > 0.0, e * d, 0.0), 0)
    s_old, u_old = rescale_state(m, s, u, m_new)
    return m_new, s_old + tile_s, u_old + tile_u


def rows_aligned(*matrices: torch.Tensor) -> bool:
    """Whether every row of these [N, V] tensors (unit stride along V) starts on a 16-byte boundary:
    the kernels' ``ALIGNED`` flag (16-byte loads and stores). One boolean, so a kernel compiles at
    most two variants for it, whatever the sizes; no host sync (pointer and stride arithmetic)."""
    return all(
        m.data_ptr() % 16 == 0 and (m.shape[0] <= 1 or m.stride(0) * m.element_size() % 16 == 0) for m in matrices
    )


@triton.jit
def aligned_offset(row, stride, base_ptr, ALIGNED: tl.constexpr):
    """``row * stride`` (elements) from ``base_ptr``; with ALIGNED (rows_aligned() held at launch:
    the stride is a multiple of 16 bytes) written so that the compiler can prove it, which with the
    base pointer's own 16-byte specialisation (Triton's launcher marks any such pointer) makes the
    accesses along a row 16 bytes wide. A tl.multiple_of hint would be lost when Triton merges the
    address additions; a product with a constant is not."""
    if ALIGNED:
        VEC: tl.constexpr = 128 // base_ptr.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
        return row * (stride // VEC) * VEC
    else:
        return row * stride


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_target(device: torch.device) -> int:
    """How many programs keep the device busy (a few per SM); small on the CPU interpreter."""
    if device.type == "cuda":
        return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def split_plan(n_rows: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """``(n_splits, tiles_per_split)``: split each row's tiles across programs when rows are few."""
    want = max(1, -(-program_target(device) // max(n_rows, 1)))
    n_splits = min(n_tiles, want)
    tiles_per_split = -(-n_tiles // n_splits)
    return -(-n_tiles // tiles_per_split), tiles_per_split


@triton.jit
def sequence_bounds(cu_ptr, seq, n_tokens):
    """[start, end) of packed sequence ``seq`` from cu_seqlens, clamped into [0, n_tokens] (a
    malformed cu_seqlens stays in bounds)."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq), 0), n_tokens)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1), start), n_tokens)
    return start, end


@triton.jit
def persistent_range(count_ptr):
    """``(first, count, step)`` of a persistent program's loop ``for i in range(first, count, step)``
    over a count read from device memory (int64 [1]): this program's share, 64-bit."""
    return tl.program_id(0).to(tl.int64), tl.load(count_ptr), tl.num_programs(0).to(tl.int64)


@triton.jit
def column_value(v, cols, k: tl.constexpr):
    """Element ``k`` of a small vector ``v`` indexed by ``cols`` (0 / 0.0 elsewhere, then summed)."""
    return tl.sum(tl.where(cols == k, v, 0), 0)


@triton.jit
def column_sums(ptr, n_rows, N_COLS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Column sums [N_COLS] of a row-major [n_rows, N_COLS] table in its own dtype (N_COLS a power
    of two): blocks of BLOCK_R rows, in order (a fixed reduction order)."""
    cols = tl.arange(0, N_COLS)
    total = tl.zeros([N_COLS], ptr.dtype.element_ty)
    for r0 in range(0, n_rows, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        ok = r < n_rows
        total += tl.sum(tl.load(ptr + r[:, None] * N_COLS + cols[None, :], mask=ok[:, None], other=0), 0)
    return cols, total


@triton.jit
def column_stats(ptr, n_rows, N_COLS: tl.constexpr, BLOCK_R: tl.constexpr):
    """(cols, sum, min, max) [N_COLS] fp32 of the columns of a row-major [n_rows, N_COLS] fp32 table,
    in blocks of BLOCK_R rows, in order; an empty table gives (0, inf, -inf)."""
    cols = tl.arange(0, N_COLS)
    total = tl.zeros([N_COLS], tl.float32)
    low = tl.full([N_COLS], float("inf"), tl.float32)
    high = tl.full([N_COLS], float("-inf"), tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        ok = r < n_rows
        tile = tl.load(ptr + r[:, None] * N_COLS + cols[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(tile, 0)
        low = tl.minimum(low, tl.min(tl.where(ok[:, None], tile, float("inf")), 0))
        high = tl.maximum(high, tl.max(tl.where(ok[:, None], tile, float("-inf")), 0))
    return cols, total, low, high


@triton.jit
def sequence_tile(valid_ptr, first, end, BLOCK: tl.constexpr):
    """Tokens first.. of a packed sequence ending at ``end``: (pos, in_seq, valid), valid from the
    uint8 token mask (False past the end)."""
    pos = first + tl.arange(0, BLOCK)
    in_seq = pos < end
    return pos, in_seq, tl.load(valid_ptr + pos, mask=in_seq, other=0) != 0


def grad_args(ids, temperature, lse, mean_z, g_logprobs, g_entropy) -> dict:
    """The per-row inputs of a token-statistics backward kernel (token_stats, linear_stats), by the
    kernels' argument names: ids, 1/T source, the forward's lse and mean_z, the two cotangents."""
    return {"ids_ptr": ids, "temp_ptr": temperature, "lse_ptr": lse, "mean_z_ptr": mean_z, "g_lp_ptr": g_logprobs,
            "g_h_ptr": g_entropy, "temp_stride": 0 if temperature.numel() == 1 else 1,
            "g_lp_stride": g_logprobs.stride(0), "g_h_stride": g_entropy.stride(0)}  # fmt: skip
