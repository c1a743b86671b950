"""phase_entropy (think/answer split at a three-token delimiter) against a per-sequence eager loop."""

from __future__ import annotations

import torch

import lenkernels as lk
from lenkernels.bench import eager
from lenkernels.bench.core import Provider, Suite, register
from lenkernels.bench.suites.common import lenkernels_providers
from lenkernels.reference import phase_stats as ref

DELIMITER = (151_667, 9, 10)


def cases(options):
    if options.tokens:
        return [{"batch": max(1, n // 2048), "seqlen": min(n, 2048)} for n in options.tokens]
    if options.full:
        return [{"batch": b, "seqlen": 4096} for b in (64, 256, 1024)]
    return [{"batch": 512, "seqlen": 8192}] if options.device_type == "cuda" else [{"batch": 128, "seqlen": 2048}]


def make_inputs(case, device):
    b, t = case["batch"], case["seqlen"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (b, t), generator=g)
    where = torch.randint(0, t, (b,), generator=g)
    for i in range(b):  # a delimiter in most responses, at a random place (some run past the end)
        if i % 5:
            k = int(where[i])
            ids[i, k : k + 3] = torch.tensor(DELIMITER)[: t - k]
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t).expand(b, t) < lengths.unsqueeze(1)
    entropy = torch.rand(b, t, generator=g) * 3
    return {"entropy": entropy.to(device), "ids": ids.to(device), "mask": mask.to(device)}


def expected(inputs, mode):
    ent, ids, mask = (inputs[k].cpu() for k in ("entropy", "ids", "mask"))
    b, t = ids.shape
    out = ref.phase_stats(ent.reshape(-1), ids.reshape(-1), mask.reshape(-1), ref.padded_offsets(b, t), DELIMITER)
    return {"think_mean": out[0], "answer_mean": out[2]}


def _lenkernels(backend):
    def fn(inputs, mode):
        r = lk.phase_entropy(inputs["entropy"], inputs["ids"], inputs["mask"], delimiter=DELIMITER, backend=backend)
        return {"think_mean": r.think_mean, "answer_mean": r.answer_mean}

    return fn


def _eager(inputs, mode):
    think, answer = eager.eager_phase_entropy(inputs["entropy"], inputs["ids"], inputs["mask"], DELIMITER)
    return {"think_mean": think, "answer_mean": answer}


register(
    Suite(
        name="phase_entropy",
        description="think/answer entropy per sequence, 3-token delimiter, padded [B, T]",
        cases=cases,
        make_inputs=make_inputs,
        expected=expected,
        providers=[
            Provider("eager-loop", _eager, baseline=True, tolerance=1e-4, note="per-sequence unfold + masked means"),
            *lenkernels_providers("phase_stats", _lenkernels, tolerance=1e-4),
        ],
        bytes_moved=lambda case, mode: case["batch"] * case["seqlen"] * (4 + 8 + 1),
        modes=("fwd",),
    )
)  # fmt: skip
