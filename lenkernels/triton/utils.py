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
