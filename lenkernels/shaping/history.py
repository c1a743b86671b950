"""HAPO's history-aware length reward (Huang et al., 2025): a per-prompt record of the shortest
correct response, kept on the device across steps. Arguments as in ``lenkernels.shaping``."""

from __future__ import annotations

import math

import torch

from lenkernels import _checks
from lenkernels.shaping._args import _correct, _lengths, _nan_guard, _score, _vector


class HAPOHistory:
    """Per-prompt history of HAPO (Huang et al., 2025): ``min_length[p]`` is the shortest correct
    response seen so far for prompt ``p`` (+inf: none yet). A float32 device tensor the caller keeps
    across steps: compute ``hapo_reward`` with it, then ``update`` it with the step's responses.

    Args:
        num_prompts: prompt ids must lie in ``[0, num_prompts)`` (e.g. dataset indices).
        device: where the history lives (the device of the rollouts).
    """

    def __init__(self, num_prompts: int, device=None):
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
            raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
        self.min_length = torch.full((num_prompts,), float("inf"), dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self.min_length.device

    def to(self, device) -> HAPOHistory:
        self.min_length = self.min_length.to(device)
        return self

    def state_dict(self) -> dict:
        return {"min_length": self.min_length}

    def load_state_dict(self, state: dict) -> None:
        self.min_length = state["min_length"].to(device=self.device, dtype=torch.float32)

    def _ids(self, prompt_ids, n):
        ids = _vector(prompt_ids, "prompt_ids", n, self.device)
        if ids.dtype not in _checks.INT_DTYPES:
            raise TypeError(f"prompt_ids must be int32/int64, got {ids.dtype}")
        size = self.min_length.shape[0]
        valid = (ids >= 0) & (ids < size)
        if _checks.value_checks(ids.device) and not bool(valid.all()):
            raise ValueError(f"prompt_ids must lie in [0, {size}) (the history's num_prompts)")
        return torch.where(valid, ids, 0).to(torch.int64), valid

    def update(self, correct, prompt_ids, *, lengths=None, mask=None) -> None:
        """``min_length[p] = min(min_length[p], shortest correct response of p in this step)``: a
        scatter-min, exact and order-independent (deterministic)."""
        ok = _correct(correct)
        n = ok.shape[0]
        if ok.device != self.device:
            raise ValueError(f"correct is on {ok.device} but the history is on {self.device}")
        length = _lengths(lengths, mask, n, ok.device)
        ids, valid = self._ids(prompt_ids, n)
        value = torch.where(ok & valid, length, float("inf"))
        self.min_length.scatter_reduce_(0, ids, value, reduce="amin")


@_nan_guard("correct", "lengths", "mask")
def hapo_reward(
    correct: torch.Tensor,
    prompt_ids: torch.Tensor,
    history: HAPOHistory,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    clip: float = 0.7,
    weight: float = 1.0,
    score: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """HAPO length reward against the history ``h`` of each prompt (Huang et al., 2025):
    ``f = cos(pi/2 * L / h)`` if ``L < 2h`` else -1; correct -> ``max(-clip, f)`` (clip 0.7), wrong
    -> ``min(0, f)``; no history yet -> 0. Returns ``score + weight * reward``; a prompt id outside
    the history is an error on CPU (LENKERNELS_DEBUG on CUDA) and NaN otherwise. Update the history
    afterwards with ``history.update(...)``. float32 ``[B]``."""
    ok = _correct(correct)
    n = ok.shape[0]
    if not isinstance(history, HAPOHistory):
        raise TypeError(f"history must be a HAPOHistory, got {type(history).__name__}")
    if ok.device != history.device:
        raise ValueError(f"correct is on {ok.device} but the history is on {history.device}")
    length = _lengths(lengths, mask, n, ok.device)
    ids, valid = history._ids(prompt_ids, n)
    h = history.min_length[ids]
    ratio = length / torch.where(h > 0, h, 1.0)
    f = torch.where((h > 0) & (length < 2 * h), torch.cos((math.pi / 2) * ratio), -1.0)
    reward = torch.where(ok, torch.clamp(f, min=-_checks.number(clip, "clip")), torch.clamp(f, max=0.0))
    reward = torch.where(torch.isinf(h), 0.0, reward)
    out = _score(score, ok) + _checks.number(weight, "weight") * reward
    return torch.where(valid, out, float("nan"))
