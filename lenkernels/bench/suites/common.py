"""Helpers shared by the suites: lenkernels providers per backend, dtype parsing, gradients."""

from __future__ import annotations

import torch

from lenkernels import _backend
from lenkernels.bench.core import Provider

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def vocab_cases(options, *, full: list[int], default: list[int]) -> list[dict]:
    """The ``{"tokens", "vocab", "dtype"}`` cases of a suite over ``[N, V]`` logits: the sizes of
    ``--tokens``, else ``full`` under ``--full``, else ``default``; bf16 and a 151,936-word
    vocabulary unless ``--dtype`` / ``--vocab`` say otherwise."""
    dtype, vocab = options.dtype or "bf16", options.vocab or 151_936
    sizes = options.tokens or (full if options.full else default)
    return [{"tokens": n, "vocab": vocab, "dtype": dtype} for n in sizes]


def backend_available(family: str, backend: str):
    def check(device: torch.device) -> tuple[bool, str]:
        return _backend.backend_status(family, device)[backend]

    return check


def lenkernels_providers(family: str, fn_for_backend, *, tolerance: float = 1e-4, backends=("triton", "cuda", "cpu")):
    """One provider per compiled/GPU backend of ``family``; ``fn_for_backend(name)`` -> provider fn."""
    return [
        Provider(f"lenkernels-{name}", fn_for_backend(name), backend_available(family, name), tolerance=tolerance)
        for name in backends
    ]


class _ModelOutput(torch.autograd.Function):
    """Marks a tensor as the output of an op of the graph, in place (no copy): what a model's
    logits are. An in-place backward refuses leaf tensors (it would overwrite the caller's data)."""

    @staticmethod
    def forward(ctx, x, anchor):
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad, *_):
        return grad, None


_ANCHOR = torch.zeros((), requires_grad=True)


def model_output(x: torch.Tensor) -> torch.Tensor:
    """``x``'s storage as a non-leaf tensor requiring grad (like a model's logits), without a copy."""
    return _ModelOutput.apply(x.detach(), _ANCHOR)


def grads(outputs: tuple[torch.Tensor, ...], cotangents: tuple[torch.Tensor, ...], wrt: torch.Tensor) -> torch.Tensor:
    """d(sum_i <outputs_i, cotangents_i>)/d(wrt)."""
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents))
    (g,) = torch.autograd.grad(loss, wrt)
    return g
