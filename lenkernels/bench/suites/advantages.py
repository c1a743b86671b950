"""group_advantages (GRPO, shuffled group ids, token broadcast) against verl's loop and a
vectorised eager form."""

from __future__ import annotations

import torch

import lenkernels as lk
from lenkernels.bench import eager
from lenkernels.bench.core import Provider, Suite, register
from lenkernels.bench.suites.common import lenkernels_providers
from lenkernels.reference import advantages as ref


def cases(options):
    if options.tokens:
        return [{"responses": n, "groups": max(1, n // 16), "seqlen": 256} for n in options.tokens]
    if options.full:
        return [{"responses": n, "groups": n // 16, "seqlen": 256} for n in (4096, 16384, 65536)]
    if options.device_type == "cuda":
        return [{"responses": 65_536, "groups": 4_096, "seqlen": 256}]
    return [{"responses": 4_096, "groups": 256, "seqlen": 256}]


def make_inputs(case, device):
    b, t = case["responses"], case["seqlen"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t).expand(b, t) < lengths.unsqueeze(1)).float()
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = (torch.rand(b, generator=g) < 0.5).float()  # outcome reward
    groups = torch.randperm(b, generator=g) % case["groups"]  # shuffled, non-contiguous groups
    out = {"rewards": rewards.to(device), "mask": mask.to(device), "groups": groups.to(device)}
    out["index"] = groups.numpy()  # verl passes uids as a numpy array
    return out


def expected(inputs, mode):
    return {"advantages": ref.group_advantages(inputs["rewards"].cpu(), inputs["groups"].cpu(), "grpo",
                                               mask=inputs["mask"].cpu())}  # fmt: skip


def _lenkernels(backend):
    def fn(inputs, mode):
        return {"advantages": lk.group_advantages(inputs["rewards"], inputs["groups"], mask=inputs["mask"],
                                                  backend=backend)}  # fmt: skip

    return fn


register(
    Suite(
        name="advantages",
        description="GRPO advantages, shuffled group ids (16 per group), token rewards [B, T] -> [B, T]",
        cases=cases,
        make_inputs=make_inputs,
        expected=expected,
        providers=[
            Provider("eager-verl-loop", lambda x, m: {"advantages": eager.verl_grpo_advantages(
                x["rewards"], x["mask"], x["index"])}, baseline=True, tolerance=1e-4,
                note="compute_grpo_outcome_advantage: Python loops over samples"),
            Provider("eager-vectorized", lambda x, m: {"advantages": eager.vectorized_grpo_advantages(
                x["rewards"], x["mask"], x["groups"])}, tolerance=1e-4, note="unique + index_add"),
            *lenkernels_providers("advantages", _lenkernels, tolerance=1e-4),
        ],
        bytes_moved=lambda case, mode: case["responses"] * case["seqlen"] * 4 * 3,
        modes=("fwd",),
    )
)  # fmt: skip
