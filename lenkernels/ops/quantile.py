"""TRL's top-entropy threshold (``get_high_entropy_mask``): the one implementation that
``policy_loss(top_entropy_quantile=)`` and ``sequence_stats(top_entropy_quantile=)`` share.

The threshold is ``torch.quantile(values[valid].float(), level)`` with ``level = 1 - rho``: the
float32 values of the valid tokens, linear interpolation in float32 (torch.quantile's arithmetic),
so a token is kept (``value >= threshold``) exactly when TRL keeps it. It is NaN, and keeps no token,
when there is no valid token or a valid value is NaN (torch.quantile returns NaN there).

Example (packed tokens, rho = 0.2)::

    valid = (mask != 0) & (torch.arange(N) >= cu[0]) & (torch.arange(N) < cu[-1])
    thr = quantile_threshold(entropy, valid, 1.0 - 0.2)      # float32 [1]
    keep = valid & (entropy >= thr)
"""

from __future__ import annotations

import torch

# --- exact order statistics over the ranks of a process group -----------------------------------------

_KEY_SPAN = 1 << 32


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2^32) with the order of the values (NaN above +inf)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, (~bits) & 0xFFFFFFFF, bits | (1 << 31))


def _from_keys(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= 1 << 31, keys - (1 << 31), (~keys) & 0xFFFFFFFF)
    return torch.where(bits >= 1 << 31, bits - _KEY_SPAN, bits).to(torch.int32).view(torch.float32)


def _kth_across_ranks(x: torch.Tensor, valid: torch.Tensor, ranks: torch.Tensor, group) -> torch.Tensor:
    """Exact order statistics (0-based ``ranks``) of the valid values of every rank: a bisection
    over the 2^32 float32 keys, one all_reduce of a count per step, no host synchronisation."""
    import torch.distributed as dist

    keys = torch.where(valid, _order_keys(x), torch.full_like(valid, _KEY_SPAN, dtype=torch.int64))
    lo = torch.zeros_like(ranks)
    hi = torch.full_like(ranks, _KEY_SPAN - 1)
    for _ in range(32):  # 2^32 candidate keys: 32 halvings leave one
        mid = (lo + hi) // 2
        count = (keys.unsqueeze(0) <= mid.unsqueeze(1)).sum(1)
        dist.all_reduce(count, group=group)
        enough = count > ranks
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return _from_keys(lo)


# --- the threshold ------------------------------------------------------------------------------------


def quantile_threshold(
    values: torch.Tensor, valid: torch.Tensor, level: float, process_group=None, host_select: bool | None = None
) -> torch.Tensor:
    """``torch.quantile(values[valid].float(), level)`` over every rank of ``process_group``, as a
    float32 ``[1]`` tensor.

    Args:
        values: per-token values (entropies), any float dtype and shape; read as float32.
        valid: bool, the shape of ``values``: the tokens the quantile is taken over.
        level: in [0, 1] (``1 - top_entropy_quantile``).
        process_group: take the quantile over the valid tokens of every rank of this group (ranks
            may hold different shapes; 33 small all_reduces, no host sync), like TRL's gather.
        host_select: None (default): CPU tensors outside torch.compile select on the host; False
            forces the sort + gather of the device path (for tests).

    Returns:
        float32 ``[1]``: the threshold, NaN when no token is valid or a valid value is NaN.
        No host sync on a device (a sort and a gather, or the bisection over ranks); host memory
        selects the two neighbours in one O(N) pass.
    """
    x = values.reshape(-1).to(torch.float32)
    valid = valid.reshape(-1)
    on_host = process_group is None and x.device.type == "cpu" and not torch.compiler.is_compiling()
    on_host = on_host if host_select is None else host_select and on_host
    if on_host:
        import numpy as np

        v = valid.numpy()
        keys = np.where(v, x.numpy(), np.float32(np.inf))  # invalid tokens order last
        counts = torch.tensor([np.count_nonzero(v), np.count_nonzero(np.isnan(keys))])
    else:
        keys = torch.where(valid, x, torch.full_like(x, float("inf")))
        counts = torch.stack([valid.sum(), torch.isnan(keys).sum()])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=process_group)
    n, n_nan = counts[0], counts[1]
    q = torch.full((), level, dtype=torch.float32, device=x.device)
    # the same float32 arithmetic as torch.quantile: rank = q * (n - 1), lerp between neighbours
    rank = q * (n - 1)
    below = rank.to(torch.int64)
    above = rank.ceil().to(torch.int64)
    weight = rank - below
    ranks = torch.stack([below, above]).clamp(min=0)
    if process_group is not None:
        neighbours = _kth_across_ranks(x, valid, ranks, process_group)
    elif x.numel() == 0:
        neighbours = torch.full((2,), float("nan"), device=x.device)
    elif on_host:
        picks = ranks.clamp(max=x.numel() - 1).tolist()
        neighbours = torch.from_numpy(np.partition(keys, picks)[picks])
    else:
        neighbours = torch.sort(keys).values.gather(0, ranks.clamp(max=x.numel() - 1))
    thr = neighbours[0].lerp(neighbours[1], weight)
    thr = torch.where((n == 0) | (n_nan > 0), torch.full_like(thr, float("nan")), thr)
    return thr.reshape(1)
