"""Argument checks shared by the public ops: each raises ValueError/TypeError naming the argument.

Checks of *values* (ids in range, positive temperatures) need the data: they run on CPU tensors,
where they cost no device synchronisation, and on CUDA tensors only in debug mode
(``LENKERNELS_DEBUG=1``), because a host sync per call would stall the training step. Without debug
mode the GPU kernels turn such values into NaN outputs, never into plausible numbers.
"""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int32, torch.int64)

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/include/lenkernels/common.h


def debug_enabled() -> bool:
    return os.environ.get("LENKERNELS_DEBUG") == "1"


def value_checks(device: torch.device) -> bool:
    """Whether data-dependent checks run for tensors on ``device`` (never while tracing)."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or debug_enabled()


def tensor(x, name: str, *, dtypes=None, min_dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def same_device(ref: torch.Tensor, ref_name: str, x: torch.Tensor, name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must share a device")


def logits_dtype(logits: torch.Tensor, backend: str, name: str = "logits") -> None:
    allowed = FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    if logits.dtype not in allowed:
        extra = " (float64 only with backend='reference')" if logits.dtype == torch.float64 else ""
        raise TypeError(f"{name} must be float32, bfloat16 or float16{extra}, got {logits.dtype}")


def ids_match(logits: torch.Tensor, ids: torch.Tensor, name: str = "ids") -> None:
    tensor(ids, name, dtypes=INT_DTYPES)
    same_device(logits, "logits", ids, name)
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} must have the leading shape of logits {tuple(logits.shape[:-1])}, got {tuple(ids.shape)}"
        )


def ids_in_range(ids: torch.Tensor, vocab: int, ignore_index: int, name: str = "ids") -> None:
    """Raises on the first id outside [0, vocab) that is not ignore_index (data-dependent)."""
    bad = ((ids < 0) | (ids >= vocab)) & (ids != ignore_index)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(
            f"{name} holds {int(ids.reshape(-1)[first])} at flat index {first}, outside the vocabulary "
            f"[0, {vocab}) and not ignore_index={ignore_index}"
        )


def temperature(temperature, ids: torch.Tensor, name: str = "temperature") -> torch.Tensor:
    """A float32 tensor of shape [1] (scalar) or [N] (per token, broadcast to ``ids``)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(temperature).__name__}")
    if not isinstance(temperature, torch.Tensor):
        t = float(temperature)
        if not (t > 0.0 and t < math.inf):  # comparisons, not math.isfinite: traceable as a SymFloat
            raise ValueError(f"{name} must be a positive finite number, got {temperature}")
        return torch.full((1,), t, dtype=torch.float32, device=ids.device)
    if not temperature.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {temperature.dtype}")
    same_device(ids, "ids", temperature, name)
    try:
        shape = torch.broadcast_shapes(temperature.shape, ids.shape)
    except RuntimeError:
        shape = None
    if shape != ids.shape:
        raise ValueError(f"{name} of shape {tuple(temperature.shape)} does not broadcast to ids {tuple(ids.shape)}")
    if value_checks(temperature.device):
        ok = (temperature > 0) & torch.isfinite(temperature)
        if not bool(ok.all()):
            raise ValueError(f"{name} must hold positive finite values, got {temperature[~ok].reshape(-1)[0].item()}")
    t = temperature.to(torch.float32)
    if t.numel() == 1:
        return t.reshape(1)
    return t.expand(ids.shape).reshape(-1)


def choice(value, name: str, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
