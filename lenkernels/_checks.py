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

from lenkernels import _codes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int32, torch.int64)

DTYPE_CODES = {dtype: int(code) for dtype, code in _codes.DTYPE_OF.items()}  # lk::DType


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
        # comparisons, not math.isfinite: traceable as a SymFloat; the kernels divide in fp32, so the
        # value must be a normal fp32 number (1e39 would be inf, 1e-46 zero)
        if not (t >= FP32_TINY and t <= FP32_MAX):
            raise ValueError(f"{name} must be a positive finite number representable in float32, got {temperature}")
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
    t = temperature.to(torch.float32)
    if value_checks(temperature.device):
        ok = (t >= FP32_TINY) & torch.isfinite(t)  # checked after the fp32 cast the kernels see
        if not bool(ok.all()):
            bad = temperature.reshape(-1)[(~ok).reshape(-1).nonzero()[0]].item()
            raise ValueError(f"{name} must hold positive finite values representable in float32, got {bad}")
    if t.numel() == 1:
        return t.reshape(1)
    return t.expand(ids.shape).reshape(-1)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FP32_TINY, FP32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def index(value, name: str) -> int:
    """An int that fits in int64 (ignore_index, token ids): Python ints are unbounded, the kernels'
    are not, and a value past int64 would fail deep inside the custom op's schema."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 [-2**63, 2**63 - 1], got {value}")
    return value


class UnsupportedTransformError(RuntimeError):
    """Raised when a lenkernels op is called under a torch.func transform (grad, vjp, jacrev, vmap)."""


def no_functorch(what: str) -> None:
    """torch.func transforms need a vmap/jvp rule per op, which the fused kernels do not provide;
    without this check the caller gets torch's internal autograd.Function message instead."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.maybe_current_level() is not None:
        raise UnsupportedTransformError(
            f"lenkernels {what} does not support torch.func transforms (grad, vjp, jacrev, jacfwd, vmap); "
            "call it outside the transform and use torch.autograd (loss.backward() or torch.autograd.grad)"
        )


def choice(value, name: str, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def names(value, name: str, options) -> frozenset:
    """A non-empty tuple or list of names among ``options`` (the statistics an op is asked for)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple or list of names among {tuple(options)}, got {value!r}")
    for item in value:
        if item not in options:
            raise ValueError(f"unknown {name} entry {item!r}: expected names among {tuple(options)}")
    if not value:
        raise ValueError(f"{name} must name at least one of {tuple(options)}")
    return frozenset(value)


def flags(**values) -> None:
    """Each keyword must be a real bool: ``inplace_backward="no"`` is truthy and would overwrite
    the logits, so strings, ints and tensors are refused rather than coerced."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def _saves(node, x: torch.Tensor) -> bool:
    """Whether autograd node ``node`` saved a tensor sharing ``x``'s storage (tanh, exp, softmax
    results...): overwriting ``x`` would corrupt that node's backward."""
    storage = x.untyped_storage().data_ptr()
    for attr in dir(node):
        if attr.startswith("_saved_"):
            try:
                value = getattr(node, attr)
            except RuntimeError:  # already freed
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == storage:
                    return True
    return False


def inplace_hazard(x: torch.Tensor, name: str = "logits") -> str | None:
    """Why overwriting ``x`` with its gradient (``inplace_backward=True``) would destroy data the
    caller or autograd still needs, or None when it is safe: a leaf (its data would become its own
    gradient), a view of a leaf, or a tensor whose producing op saved it for its backward. Other
    later uses that saved ``x`` are caught by autograd's version counter (the write bumps it)."""
    if not x.requires_grad or torch.compiler.is_compiling():
        return None
    base = x._base if x._base is not None else x
    if base.is_leaf:
        return f"{name} is {'a leaf tensor' if base is x else 'a view of a leaf tensor'}"
    for t in {id(x): x, id(base): base}.values():
        if t.grad_fn is not None and _saves(t.grad_fn, t):
            return f"{t.grad_fn.name()} saved {name} for its own backward"
    return None


def inplace_target(x: torch.Tensor, name: str = "logits") -> None:
    """Raises ValueError when ``inplace_backward=True`` must not overwrite ``x`` (inplace_hazard)."""
    why = inplace_hazard(x, name)
    if why is not None:
        raise ValueError(
            f"inplace_backward=True would overwrite {name} with its gradient, but {why}; pass "
            f"inplace_backward=False (in-place backward is for logits made inside the graph, e.g. model outputs)"
        )


def scalar_tensor(value: torch.Tensor, name: str, like: torch.Tensor, like_name: str, *, positive: bool = False):
    """A one-element real tensor hyper-parameter (a threshold, a global normaliser), checked like its
    float form: finite (and > 0 with ``positive``) where value checks run. Returns ``(value, ok)``:
    ``ok`` is None when checked, else a 0-dim bool tensor (no host sync) that the caller folds into
    its result as NaN, so an unchecked bad value never becomes a plausible number."""
    same_device(like, like_name, value, name)
    if value.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(value.shape)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real number tensor, got {value.dtype}")
    v = value.detach().reshape(())
    ok = torch.isfinite(v) & (v > 0) if positive else torch.isfinite(v)
    if value_checks(value.device):
        if not bool(ok):
            raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {v.item()}")
        return value, None
    return value, ok


def nan_unless(x: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
    """``x`` where ``ok`` (a 0-dim bool tensor, or None = checked), NaN elsewhere: one elementwise op."""
    if ok is None:
        return x
    return torch.where(ok, x, torch.full_like(x, float("nan")))


def float_input(x, name: str, backend: str, like: torch.Tensor | None = None, like_name: str = "") -> torch.Tensor:
    """A float32/bfloat16/float16 tensor (float64 too on the reference backend); with ``like``, on
    its device and of its shape."""
    tensor(x, name)
    allowed = FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    if x.dtype not in allowed:
        extra = " (float64 only with backend='reference')" if x.dtype == torch.float64 else ""
        raise TypeError(f"{name} must be float32, bfloat16 or float16{extra}, got {x.dtype}")
    if like is not None:
        same_device(like, like_name, x, name)
        if tuple(x.shape) != tuple(like.shape):
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}")
    return x


def lm_head(hidden, weight, bias, ids, backend: str) -> None:
    """The inputs of an op on the last hidden state: ``hidden`` ``[..., D]`` float, ``weight``
    ``[V, D]`` (V >= 1) and optional ``bias`` ``[V]`` of its dtype and device, int ``ids`` of its
    leading shape."""
    float_input(hidden, "hidden", backend)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least 1 dimension (the hidden size), got a 0-d tensor")
    tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, {hidden.shape[-1]}] (the last dim of hidden), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    same_device(hidden, "hidden", weight, "weight")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None:
        tensor(bias, "bias")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        same_device(hidden, "hidden", bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (the rows of weight), got {tuple(bias.shape)}")
    tensor(ids, "ids", dtypes=INT_DTYPES)
    same_device(hidden, "hidden", ids, "ids")
    if tuple(ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"ids must have the leading shape of hidden {tuple(hidden.shape[:-1])}, got {tuple(ids.shape)}"
        )


def number(value, name: str, *, minimum=None, maximum=None, exclusive: bool = False, finite: bool = True) -> float:
    """A real Python number (not a bool), finite unless ``finite=False``, within ``[minimum,
    maximum]`` (open at ``minimum`` with ``exclusive``); returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or (finite and not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def cu_seqlens(cu: torch.Tensor, n_tokens: int, like: torch.Tensor, like_name: str, *, min_seqs: int = 0):
    """Packed-layout offsets: int ``[B + 1]`` (B >= ``min_seqs``), non-decreasing within
    ``[0, n_tokens]`` (checked where value checks run). Returns them as int64."""
    tensor(cu, "cu_seqlens", dtypes=INT_DTYPES)
    same_device(like, like_name, cu, "cu_seqlens")
    if cu.dim() != 1 or cu.shape[0] < min_seqs + 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1] with B >= {min_seqs}, got shape {tuple(cu.shape)}")
    if value_checks(cu.device) and cu.numel() > 0:
        lo, hi = int(cu[0]), int(cu[-1])
        if lo < 0 or hi > n_tokens or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must be non-decreasing offsets within [0, {n_tokens}] (the number of tokens), "
                f"got {cu.tolist()[:16]}"
            )
    return cu.to(torch.int64)
