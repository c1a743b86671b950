"""Group advantages (SPEC 4) and the per-group statistics behind ``lenkernels.shaping``, as segmented
kernels over any grouping.

Chain of names: ``group_advantages`` (public) -> ``lenkernels::group_advantages`` (custom op; an
``_out`` variant writes into a given buffer) -> ``group_advantages_fwd`` (host launcher) -> the
backend's ``group_advantages_fwd`` (``lenkernels/{reference,cpu,cuda,triton}/advantages.py``, one
signature) -> kernels (``triton/advantages.py``, ``csrc/cpu/advantages.cpp``,
``csrc/cuda/advantages.cu``). ``group_stats`` follows the same chain. Advantages are not
differentiable (rewards are data): there is no backward.

The compiled backends group on the device without host syncs and run their kernels in stages
(group step or gaussian rank map, batch-level shift/scale, broadcast over the mask):
``lenkernels/_grouping.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenkernels import _backend, _checks, _codes, _grouping
from lenkernels._codes import Method
from lenkernels.ops import _library

FAMILY = "advantages"
_backend.register_family(FAMILY, ("triton", "cuda", "cpu", "reference"))

METHODS = _codes.names(Method)  # the public method strings, in code order
_GLOBAL = tuple(_codes.name_of(m) for m in _grouping.GLOBAL_METHODS)  # normalised over the whole batch
MASK_DTYPES = tuple(_codes.WEIGHT_OF) + (torch.float64,)


@dataclass(frozen=True)
class AdvantageConfig:
    """The scalars of one ``group_advantages`` call, as every backend's launcher reads them."""

    method: Method
    eps: float
    norm_by_std: bool
    unbiased: bool

    @property
    def ddof(self) -> int:
        """Delta degrees of freedom of the group std: 1 unbiased (verl, TRL), 0 population."""
        return 1 if self.unbiased else 0


# --- host launchers --------------------------------------------------------------------------


def group_advantages_fwd(
    rewards, groups, group_size, mask, lengths, task_ids, method, eps, norm_by_std, unbiased, backend, out
) -> None:
    """Host launcher: writes ``out`` (fp32, ``[B]`` or ``mask.shape``)."""
    if rewards.shape[0] == 0:
        return
    cfg = AdvantageConfig(_codes.parse(Method, method, "method"), float(eps), bool(norm_by_std), bool(unbiased))
    _backend.kernels(backend, FAMILY).group_advantages_fwd(
        rewards, groups, group_size, mask, lengths, task_ids, cfg, out
    )


def group_stats_fwd(values, where, groups, group_size, mask, backend, stats, lengths) -> None:
    """Host launcher of the per-group statistics: writes stats [B, C, 6] and lengths [B] (with a mask)."""
    if values.shape[0] == 0:
        return
    _backend.kernels(backend, FAMILY).group_stats_fwd(values, where, groups, group_size, mask, stats, lengths)


# --- torch.library registration -------------------------------------------------------------


def _out_shape(rewards, mask):
    return tuple(mask.shape) if mask is not None else (rewards.shape[0],)


def _group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor | None,
    group_size: int,
    mask: torch.Tensor | None,
    lengths: torch.Tensor | None,
    task_ids: torch.Tensor | None,
    method: str,
    eps: float,
    norm_by_std: bool,
    unbiased: bool,
    backend: str,
) -> torch.Tensor:
    out = torch.empty(_out_shape(rewards, mask), dtype=torch.float32, device=rewards.device)
    group_advantages_fwd(
        rewards, groups, group_size, mask, lengths, task_ids, method, eps, norm_by_std, unbiased, backend, out
    )
    return out


_group_advantages_out = _library.writing_twin(
    "lenkernels::group_advantages_out", _group_advantages, group_advantages_fwd, mutates="out",
    doc="Writes the advantages into ``out`` (fp32, ``[B]`` or ``mask.shape``, rows of unit stride).",
)  # fmt: skip
_group_advantages = torch.library.custom_op("lenkernels::group_advantages", _group_advantages, mutates_args=())


@_group_advantages.register_fake
def _(rewards, groups, group_size, mask, lengths, task_ids, method, eps, norm_by_std, unbiased, backend):
    return torch.empty(_out_shape(rewards, mask), dtype=torch.float32, device=rewards.device)


@torch.library.custom_op("lenkernels::group_stats", mutates_args=())
def _group_stats(
    values: torch.Tensor,
    where: torch.Tensor | None,
    groups: torch.Tensor | None,
    group_size: int,
    mask: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = values.shape
    cols = c + (mask is not None)
    stats = torch.empty((n, cols, 6), dtype=torch.float32, device=values.device)
    lengths = torch.empty((n if mask is not None else 0,), dtype=torch.float32, device=values.device)
    group_stats_fwd(values, where, groups, group_size, mask, backend, stats, lengths)
    return stats, lengths


@_group_stats.register_fake
def _(values, where, groups, group_size, mask, backend):
    n, c = values.shape
    cols = c + (mask is not None)
    stats = torch.empty((n, cols, 6), dtype=torch.float32, device=values.device)
    lengths = torch.empty((n if mask is not None else 0,), dtype=torch.float32, device=values.device)
    return stats, lengths


# --- argument checks -------------------------------------------------------------------------


def _check_groups(groups, n: int, ref_tensor: torch.Tensor, name: str = "groups") -> tuple[torch.Tensor | None, int]:
    """``(ids tensor or None, group size or 0)``."""
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int group size or an int tensor of group ids, got {type(groups).__name__}")
    if isinstance(groups, int):
        if groups <= 0:
            raise ValueError(f"{name} (a group size) must be positive, got {groups}")
        if n % groups:
            raise ValueError(f"{name}={groups} does not divide the batch of {n} responses into whole groups")
        return None, groups
    _checks.tensor(groups, name, dtypes=_checks.INT_DTYPES)
    _checks.same_device(ref_tensor, "rewards", groups, name)
    if tuple(groups.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), one id per response, got {tuple(groups.shape)}")
    return groups, 0


def _check_mask(mask, ref_tensor, n, token_shape=None, name="mask", ref_name="rewards"):
    """A [B, T] mask on ``ref_tensor``'s device; ``token_shape``: the shape it must equal, if any."""
    if mask is None:
        return None
    _checks.tensor(mask, name, dtypes=MASK_DTYPES)
    _checks.same_device(ref_tensor, ref_name, mask, name)
    if mask.dim() != 2 or mask.shape[0] != n:
        raise ValueError(f"{name} must have shape [B, T] with B = {n}, got {tuple(mask.shape)}")
    if token_shape is not None and tuple(mask.shape) != tuple(token_shape):
        raise ValueError(f"{name} must have the shape of the token rewards {tuple(token_shape)}, got {tuple(mask.shape)}")
    return mask


def _check_lengths(lengths, rewards, n, name="lengths"):
    if lengths is None:
        return None
    _checks.tensor(lengths, name, dtypes=MASK_DTYPES)
    _checks.same_device(rewards, "rewards", lengths, name)
    if tuple(lengths.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), one length per response, got {tuple(lengths.shape)}")
    if _checks.value_checks(lengths.device) and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    return lengths


def _check_finite(x: torch.Tensor, name: str) -> None:
    """Data-dependent: where value checks run (CPU tensors, LENKERNELS_DEBUG=1), non-finite values are
    an error naming the first bad response; elsewhere they propagate NaN to their group. A row of
    token rewards is checked through its sum (NaN and inf survive a sum; so does an overflow)."""
    if x.numel() and _checks.value_checks(x.device):
        per_response = x if x.dim() == 1 else x.sum(-1, dtype=torch.float32)
        bad = ~torch.isfinite(per_response)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(f"{name} holds a non-finite value (NaN or inf) for response {first}")


# --- public API --------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor | int,
    *,
    method: str = "grpo",
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    norm_by_std: bool = True,
    unbiased: bool = True,
    task_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Group-normalised advantages of RL trainers (SPEC 4), for any grouping, without host syncs.

    Args:
        rewards: ``[B]`` score per response, or ``[B, T]`` token-level rewards whose sum over every
            position is the score (verl's convention, masked positions included). float32, bfloat16
            or float16 (float64 with ``backend="reference"``). Not differentiable: advantages are data.
        groups: ``[B]`` int32/int64 group ids in any order (non-contiguous, unequal sizes, any
            values), or an int group size: contiguous groups ``[0, n), [n, 2n), ...`` (must divide B).
        method: one of
            ``"grpo"``: ``(s - mean_g) / (std_g + eps)`` (``s - mean_g`` with ``norm_by_std=False``);
            ``"dr_grpo"``: ``s - mean_g``;
            ``"rloo"``: ``s - mean of the other members = n/(n-1) (s - mean_g)``;
            ``"reinforce_pp_baseline"``: ``s - mean_g`` broadcast to tokens, then whitened over all
            valid tokens of the batch (token-weighted mean, unbiased variance with the token count,
            ``(x - mean) * rsqrt(var + 1e-8)``; verl / DLER);
            ``"batch"``: ``(s - mean_g) / (std_batch + eps)``, std of the raw scores of the batch
            (TRL ``scale_rewards="batch"``);
            ``"gaussian"``: G^2RPO's rank map, rank k of n gets ``Phi^-1((k - 0.5) / n)``, tied scores
            share the mean of their ranks' values, groups of one give 0; with ``task_ids`` the same
            map runs a second time over all responses of each task id;
            ``"grpo_passk"``: only the best member (first of equal maxima) gets ``r_max - r_second``
            (divided by ``std_g + eps`` when ``norm_by_std``), the others 0;
            ``"opo"``: ``s - sum(|y| s) / sum(|y|)`` (length-weighted baseline; needs ``mask`` or
            ``lengths``; a group with no tokens has baseline 0).
            Groups of one follow verl everywhere: baseline 0 and std 1 (grpo gives ``s / (1 + eps)``,
            rloo/dr_grpo/opo/rpp the raw score, grpo_passk compares with 0). A group whose members are
            all equal gets exactly 0 (also with ``eps=0``).
        eps: added to the std (default 1e-6 as verl; TRL uses 1e-4).
        mask: optional ``[B, T]`` response mask (bool, uint8, int or float; used as token weights).
            The result is then ``[B, T]``: ``adv[b] * mask[b, t]``, exactly 0 where the mask is 0.
            Response lengths ``|y_b| = sum_t mask[b, t]`` are computed inside the kernel (opo and the
            token weights of reinforce_pp_baseline).
        lengths: optional ``[B]`` response lengths, used instead of the mask's row sums (packed layouts).
        norm_by_std: divide by the group std (grpo, grpo_passk); verl's ``norm_adv_by_std_in_grpo``.
        unbiased: unbiased (n - 1) group std, as verl and TRL; False for the population std.
        task_ids: ``[B]`` int task ids for the gaussian method's second pass.
        out: optional float32 buffer of the result's shape (rows of unit stride) to write into.
        backend: ``None`` (triton on CUDA, cpu on CPU), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        float32 ``[B]``, or ``[B, T]`` with a mask. Bitwise deterministic: group sums run in a fixed
        order from sorted offsets, no atomics.

    Non-finite rewards: on CPU tensors (and on CUDA with ``LENKERNELS_DEBUG=1``) a NaN or inf reward
    raises ValueError naming the response; otherwise (no host sync) the whole group of a NaN score
    is NaN, and for ``batch`` / ``reinforce_pp_baseline`` the whole batch (masked tokens stay 0).
    An empty batch (B = 0) returns an empty result. ``batch`` and ``reinforce_pp_baseline`` need at
    least two responses / valid tokens (ValueError where value checks run; NaN otherwise).

    Example (verl layout: token rewards, uid per response, any order)::

        uid = torch.tensor([3, 1, 3, 1, 7])                      # groups of 2, 2 and 1
        adv = group_advantages(token_level_rewards, uid, mask=response_mask)   # [B, T]

    Example (packed layout: scores per response, lengths from ``cu_seqlens``)::

        lengths = cu_seqlens.diff()                              # [B]
        adv = group_advantages(scores, uid, method="opo", lengths=lengths)     # [B]
        adv_tokens = adv.repeat_interleave(lengths, output_size=n_tokens)      # [N]
    """
    _checks.flags(norm_by_std=norm_by_std, unbiased=unbiased)
    _checks.tensor(rewards, "rewards", min_dim=1)
    name = _backend.resolve(backend, FAMILY, rewards.device)
    _checks.float_input(rewards, "rewards", name)
    if rewards.dim() > 2:
        raise ValueError(f"rewards must be [B] scores or [B, T] token rewards, got shape {tuple(rewards.shape)}")
    _checks.choice(method, "method", METHODS)
    n = rewards.shape[0]
    ids, group_size = _check_groups(groups, n, rewards)
    mask = _check_mask(mask, rewards, n, rewards.shape if rewards.dim() == 2 else None)
    lengths = _check_lengths(lengths, rewards, n)
    eps = _checks.number(eps, "eps", minimum=0.0)
    if method == "opo" and mask is None and lengths is None:
        raise ValueError("method='opo' weights the baseline by response length: pass mask or lengths")
    if task_ids is not None:
        if method != "gaussian":
            raise ValueError("task_ids (the second pass of the rank map) is only used by method='gaussian'")
        task_ids, _ = _check_groups(task_ids, n, rewards, "task_ids")
    if method in _GLOBAL and n == 1:
        raise ValueError(f"method={method!r} normalises over the batch and needs at least two responses")
    rewards = rewards.detach()
    _check_finite(rewards, "rewards")
    if method == "reinforce_pp_baseline" and n and _checks.value_checks(rewards.device):
        w = lengths if lengths is not None else (mask.sum(-1) if mask is not None else None)
        if w is not None and float(w.to(torch.float64).sum()) <= 1.0:
            raise ValueError("reinforce_pp_baseline whitens over the valid tokens: mask/lengths hold fewer than two")
    args = (rewards, ids, group_size, mask, lengths, task_ids, method, eps, bool(norm_by_std), bool(unbiased), name)
    if out is None:
        return torch.ops.lenkernels.group_advantages(*args)
    _checks.tensor(out, "out", dtypes=(torch.float32,))
    _checks.same_device(rewards, "rewards", out, "out")
    if tuple(out.shape) != _out_shape(rewards, mask) or (out.numel() and out.stride(-1) != 1):
        raise ValueError(f"out must be float32 of shape {_out_shape(rewards, mask)} with unit stride along the last dim")
    torch.ops.lenkernels.group_advantages_out(*args, out)
    return out


def group_stats(
    values: torch.Tensor,
    groups: torch.Tensor | int,
    *,
    where: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group statistics of one or more per-response columns, broadcast back to the responses.

    Args:
        values: ``[B]`` or ``[B, C]`` per-response values (any float dtype; computed in float32).
        groups: ``[B]`` int group ids in any order, or an int group size (contiguous groups).
        where: optional ``[B, C']`` bool/0-1 selection of the members each column's statistics use
            (``C' = C``, plus one for the length column when ``mask`` is given); all members when None.
        mask: optional ``[B, T]`` response mask: its row sums (the response lengths, computed inside
            the kernel) become an extra last column.
        backend: as for ``group_advantages``.

    Returns:
        ``(stats, lengths)``: stats float32 ``[B, C', 6]`` holding, for each response and column, the
        statistics of the selected members of the response's group: ``count, sum, mean, std
        (unbiased, 0 with fewer than two), min, max`` (empty selection: 0, 0, 0, 0, +inf, -inf; a NaN
        among the selected makes mean, std, min and max NaN); lengths float32 ``[B]`` with a mask,
        else None.

    Example (accuracy of each prompt and the mean length of its correct responses)::

        stats, length = group_stats(correct.float(), uid, mask=response_mask,
                                    where=torch.stack([torch.ones_like(correct), correct], 1))
        acc, mean_len_correct = stats[:, 0, 2], stats[:, 1, 2]
    """
    _checks.tensor(values, "values", min_dim=1)
    name = _backend.resolve(backend, FAMILY, values.device)
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating tensor, got {values.dtype}")
    if values.dim() > 2:
        raise ValueError(f"values must be [B] or [B, C], got shape {tuple(values.shape)}")
    v = values.detach() if values.dim() == 2 else values.detach()[:, None]  # (a reshape fails for B = 0)
    n = v.shape[0]
    ids, group_size = _check_groups(groups, n, values)
    mask = _check_mask(mask, values, n, ref_name="values")
    cols = v.shape[1] + (mask is not None)
    if where is not None:
        _checks.tensor(where, "where")
        _checks.same_device(values, "values", where, "where")
        where = where[:, None] if where.dim() == 1 else where
        if tuple(where.shape) != (n, cols):
            raise ValueError(f"where must have shape ({n}, {cols}) (one column per statistic column), got {tuple(where.shape)}")
        where = where.detach()
    stats, lengths = torch.ops.lenkernels.group_stats(v, where, ids, group_size, mask, name)
    return stats, (lengths if mask is not None else None)
