"""verl's outcome advantages (``verl.trainer.ppo.core_algos``, ``ADV_ESTIMATOR_REGISTRY``): the
drop-ins of ``grpo``, ``grpo_vectorized``, ``rloo``, ``rloo_vectorized``,
``reinforce_plus_plus_baseline``, ``opo``, ``grpo_passk`` and ``gpg`` with verl's signatures and
result dtypes. Import them from :mod:`lenkernels.integrations.verl`, which documents the
conventions and the differences."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from lenkernels.integrations import F64, _cast, _promote
from lenkernels.integrations._verl_losses import _cfg
from lenkernels.ops.advantages import group_advantages


def _groups(index, n: int, device) -> tuple[torch.Tensor, np.ndarray]:
    """verl's ``index`` (numpy array of uid strings, ints, a list or a tensor) -> (group ids
    int64 ``[B]`` on ``device``, the size of each response's group on the host). The labels live
    on the host, so their factorisation costs no device sync."""
    if isinstance(index, torch.Tensor) and not index.is_floating_point() and not index.is_complex():
        labels = index.detach().cpu().reshape(-1).numpy()
    else:
        labels = np.asarray(index if not isinstance(index, torch.Tensor) else index.detach().cpu().numpy())
        labels = labels.reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"index must hold one group label per response ({n}), got {labels.shape[0]}")
    try:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    except TypeError:  # mixed label types: compare them as strings
        _, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return _to_device(torch.from_numpy(inverse), device), counts[inverse]


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Host data to ``device`` without waiting for the GPU's queue (pinned, asynchronous copy)."""
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _group_advantages(rewards: torch.Tensor, ids: torch.Tensor, method: str, eps: float, mask, **kw) -> torch.Tensor:
    """``group_advantages`` (float32), or for float64 rewards its float64 reference definition
    (verl then computes in float64)."""
    if isinstance(rewards, torch.Tensor) and rewards.dtype == F64:
        from lenkernels.reference.advantages import group_advantages as reference

        if rewards.dim() != 2 or mask is None or tuple(mask.shape) != tuple(rewards.shape):
            raise ValueError(
                f"token_level_rewards and response_mask must be [B, T] of one shape, got "
                f"{tuple(rewards.shape)} and {None if mask is None else tuple(mask.shape)}"
            )
        return reference(rewards, ids, method, eps=eps, mask=mask, dtype=F64, **kw)
    return group_advantages(rewards, ids, method=method, eps=eps, mask=mask, **kw)


def _adv_dtype(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *extra) -> torch.dtype:
    """verl's advantage dtype: the scores (the rewards' dtype, and ``extra`` where verl mixes in
    other tensors) times ``response_mask``, promoted."""
    return _promote(token_level_rewards.dtype, *extra, response_mask.dtype)


def _outcome(token_level_rewards, response_mask, index, epsilon: float, method: str, **kw) -> torch.Tensor:
    """The advantages of ``method`` over the groups of ``index``, in verl's dtype."""
    ids, _ = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv = _group_advantages(token_level_rewards, ids, method, epsilon, response_mask, **kw)
    return _cast(adv, _adv_dtype(token_level_rewards, response_mask))


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO outcome advantage without the Python loop over responses.

    Args:
        token_level_rewards: ``[B, T]``; the score of a response is the sum over all positions.
        response_mask: ``[B, T]`` 0/1.
        index: ``[B]`` group label per response (verl's ``uid`` strings, any order).
        epsilon: added to the group std.
        norm_adv_by_std_in_grpo: ``(s - mean_g) / (std_g + epsilon)``; False: ``s - mean_g``
            (Dr. GRPO). Groups of one: mean 0, std 1 (verl's convention).
        config: unused (verl's signature).

    Returns:
        ``(advantages, returns)``: the same ``[B, T]`` tensor twice (zero where masked), in verl's
        dtype (the rewards' times the mask's, promoted); computed in float32, or in float64 for
        float64 rewards.

    Example: ``adv, ret = compute_grpo_outcome_advantage(token_level_rewards, response_mask, uid)``.
    """
    adv = _outcome(
        token_level_rewards, response_mask, index, epsilon, "grpo", norm_by_std=bool(norm_adv_by_std_in_grpo)
    )
    return adv, adv


@functools.wraps(compute_grpo_outcome_advantage, assigned=())  # verl's grpo_vectorized takes grpo's arguments
def compute_grpo_vectorized_outcome_advantage(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``grpo_vectorized``: the arguments and numbers of :func:`compute_grpo_outcome_advantage`,
    in that estimator's dtype (its group statistics are float32: at least float32)."""
    adv, _ = compute_grpo_outcome_advantage(*args, **kwargs)
    adv = _cast(adv, _promote(adv.dtype, torch.float32))
    return adv, adv


def _estimator(name: str, compute: Callable, doc: str, index_type: str = "np.ndarray") -> Callable:
    """The drop-in ``compute_<name>_outcome_advantage`` with the signature verl's RLOO, OPO and
    REINFORCE++-baseline estimators share: ``(adv, adv)`` for ``adv = compute(token_level_rewards,
    response_mask, index, epsilon)`` (verl's ``config`` and extra keywords are unused)."""

    def drop_in(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: np.ndarray,
        epsilon: float = 1e-6,
        config=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        adv = compute(token_level_rewards, response_mask, index, epsilon)
        return adv, adv

    drop_in.__name__ = drop_in.__qualname__ = f"compute_{name}_outcome_advantage"
    drop_in.__annotations__["index"] = index_type  # verl annotates REINFORCE++-baseline's as a tensor
    drop_in.__doc__ = doc
    return drop_in


compute_rloo_outcome_advantage = _estimator(
    "rloo", functools.partial(_outcome, method="rloo"),
    """verl's RLOO: ``s - mean of the other members`` (a group of one keeps its score); arguments
    and return as :func:`compute_grpo_outcome_advantage`. Example: ``get_adv_estimator_fn("rloo")(...)``.""",
)  # fmt: skip


def _rloo_vectorized(token_level_rewards, response_mask, index, epsilon: float) -> torch.Tensor:
    ids, sizes = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv = _group_advantages(token_level_rewards, ids, "rloo", epsilon, response_mask)
    if (sizes == 1).any():  # host-side labels: no device sync
        single = _to_device(torch.from_numpy(sizes == 1), adv.device)
        adv = torch.where(single[:, None], torch.zeros_like(adv), adv)
    # (the bincount of no responses is int64: the rewards' dtype then)
    half = token_level_rewards.dtype not in (torch.float32, F64) and token_level_rewards.shape[0] > 0
    binned = F64 if half else token_level_rewards.dtype
    return _cast(adv, _adv_dtype(token_level_rewards, response_mask, binned))


compute_rloo_vectorized_outcome_advantage = _estimator(
    "rloo_vectorized", _rloo_vectorized,
    """verl's ``rloo_vectorized``: RLOO, except that a group of one gets 0 (not its score). Its
    dtype: verl's ``torch.bincount`` of the scores is float64 for bfloat16/float16 rewards.""",
)  # fmt: skip

compute_reinforce_plus_plus_baseline_outcome_advantage = _estimator(
    "reinforce_plus_plus_baseline", functools.partial(_outcome, method="reinforce_pp_baseline"),
    """verl's REINFORCE++-baseline: ``s - mean_g`` broadcast to the response tokens, whitened over
    all valid tokens of the batch (``(x - mean) * rsqrt(var + 1e-8)``, unbiased token variance).
    Needs at least two valid tokens (ValueError, as verl). Arguments and return as
    :func:`compute_grpo_outcome_advantage`.""",
    index_type="torch.Tensor",
)  # fmt: skip

compute_opo_outcome_advantage = _estimator(
    "opo", functools.partial(_outcome, method="opo"),
    """verl's OPO: ``s - sum(|y| s) / sum(|y|)`` over the group (length-weighted baseline, 0 for a
    group of one); lengths are the mask's row sums. Arguments and return as
    :func:`compute_grpo_outcome_advantage`.""",
)  # fmt: skip


def compute_grpo_passk_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's Pass@k advantage: only the best response of a group gets ``r_max - r_second``
    (divided by ``std_g + epsilon`` when ``config.norm_adv_by_std_in_grpo``, default True: like
    verl, the config decides, not the argument). Every group needs two responses (ValueError).
    ``config`` is required, as in verl. Returns ``(advantages, returns)``, ``[B, T]`` in verl's dtype."""
    if config is None:
        raise ValueError("grpo_passk needs config (verl's AlgoConfig) for norm_adv_by_std_in_grpo, got None")
    norm = bool(_cfg(config, "norm_adv_by_std_in_grpo", True))
    ids, sizes = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    if (sizes < 2).any():
        raise ValueError(f"Pass@k requires at least 2 samples per group; a group has {int(sizes.min())}")
    adv = _group_advantages(token_level_rewards, ids, "grpo_passk", epsilon, response_mask, norm_by_std=norm)
    adv = _cast(adv, _adv_dtype(token_level_rewards, response_mask))
    return adv, adv


def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GPG advantage: ``alpha (s - mean_g) / f_norm`` with ``alpha = B / #(s != 0)`` (verl
    recomputes alpha and ignores the argument; a group of one has mean 0). Returns
    ``(advantages, returns)``, ``[B, T]`` in verl's dtype."""
    ids, _ = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv = _group_advantages(token_level_rewards, ids, "dr_grpo", epsilon, response_mask)
    with torch.no_grad():
        # verl's alpha: an int divided by an int tensor, i.e. a float32 number, in every dtype
        alpha = token_level_rewards.shape[0] / torch.count_nonzero(token_level_rewards.sum(dim=-1)).clamp(min=1)
    adv = adv * alpha.to(adv.dtype) / float(f_norm)
    adv = _cast(adv, _adv_dtype(token_level_rewards, response_mask))
    return adv, adv


ADVANTAGE_ESTIMATORS = {
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
}
"""verl registry name -> drop-in (``patch()`` puts these into ``ADV_ESTIMATOR_REGISTRY``)."""
