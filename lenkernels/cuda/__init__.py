"""Loader and host launchers of the CUDA C++ backend (``csrc/cuda/``, one module per op family).

``backend="cuda"`` runs hand-written kernels instead of the Triton ones: explicit 16-byte vector
loads, loads in flight while the previous tile is reduced, warp-shuffle and block merges of the
online-softmax state, and split-vocab grids for few rows. The kernels share their arithmetic with
the CPU backend through ``csrc/include/lenkernels/`` and take raw device pointers, sizes, strides
and the current CUDA stream: no torch C++ headers, so the module works with any torch build.

Building (each ``csrc/cuda/<family>.cu`` becomes ``lenkernels._cuda_<family>``, for sm_80 and sm_90
plus sm_90 PTX; flags in ``lenkernels/_build.py``):

- ``pip install -e .`` builds the modules when ``nvcc`` is found (``CUDA_HOME``/``CUDA_PATH`` or
  ``PATH``); ``LENKERNELS_SKIP_CUDA=1 pip install -e .`` skips them (no CUDA toolchain needed).
- Otherwise a module is compiled with ``nvcc`` on first use into ``~/.cache/lenkernels``
  (``LENKERNELS_CACHE`` overrides), keyed by a hash of its sources, so an edited kernel is rebuilt
  and a stale build is never loaded. ``LENKERNELS_FORCE_JIT=1`` ignores an installed module.
- ``available(family)`` says whether the module loads and, when not, why and how to fix it;
  ``lenkernels.explain_backend(family, "cuda")`` prints it for every backend.

Example (packed layout: the N response tokens of all sequences as rows)::

    logits = model(input_ids).logits[0, :-1]        # [N, V] bf16 on a GPU
    lp, ent = lenkernels.token_logprobs_entropy(logits, input_ids[0, 1:], temperature=0.7, backend="cuda")

The O(N) families (policy loss, group advantages, phase statistics) write their kernels as bodies
over a team of cooperating threads (``csrc/cuda/team.h``); under :func:`host_emulation` their
launchers accept CPU tensors and run those very bodies on the host, thread by thread, with the
GPU's reduction order (slow: for checking the kernels where there is no GPU).
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType

import torch

from lenkernels import _build, _checks, _extensions

_HOW_TO_BUILD = (
    "the CUDA backend is compiled with nvcc: install the CUDA toolkit (nvcc) and either "
    "reinstall with `pip install -e .` or let it build on first use (set CUDA_HOME if nvcc is not on PATH)"
)


def load(family: str) -> ModuleType:
    """The compiled CUDA module of an op family, e.g. ``load("token_stats")`` (built if needed)."""
    return _extensions.load(f"_cuda_{family}", "cuda")


def available(family: str) -> tuple[bool, str]:
    """``(True, "")`` when the family's CUDA module loads, else ``(False, why)`` with how to fix it."""
    if f"_cuda_{family}" not in _build.cuda_modules():
        try:
            import importlib

            importlib.import_module(f"lenkernels._cuda_{family}")
            return True, ""
        except ImportError:
            return False, f"no CUDA C++ kernels for {family} in this build"
    try:
        load(family)
    except ImportError as exc:
        return False, f"{exc}; {_HOW_TO_BUILD}"
    return True, ""


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_context(x: torch.Tensor) -> tuple[int, int, int]:
    """(device index, SM count, current stream handle) for a launch on ``x``'s device."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return index, _sm_count(index), torch.cuda.current_stream(index).cuda_stream


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in _checks.DTYPE_CODES:
        raise ValueError(f"{name} must be [N, V] float32/bfloat16/float16 with unit stride along V")
    if x.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for backend='cuda', got {x.device}")


def _check_grad_rows(x: torch.Tensor, dlogits: torch.Tensor) -> tuple[int, int]:
    """The backward launchers' checks of the logits and dlogits (same shape and dtype, checked when
    there are rows); returns (N, V)."""
    _check_rows(x, "logits")
    _check_rows(dlogits, "dlogits")
    n_rows, vocab = x.shape
    if n_rows and (dlogits.shape != x.shape or dlogits.dtype != x.dtype):
        raise ValueError(
            f"dlogits must match logits {tuple(x.shape)} {x.dtype}, got {tuple(dlogits.shape)} {dlogits.dtype}"
        )
    return n_rows, vocab


def _token_stats_launch(x: torch.Tensor, ids: torch.Tensor) -> tuple:
    """What every token-statistics launcher over logits ``x`` starts from: (device, sm_count, stream,
    x's dtype code, ids as a contiguous int32/int64 tensor)."""
    device, sm_count, stream = _launch_context(x)
    return device, sm_count, stream, _checks.DTYPE_CODES[x.dtype], _ids(ids)


def _ids(ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    return ids.contiguous()


# --- the O(N) families: policy loss, group advantages, phase statistics ------------------------------

_emulated_sm_count: int | None = None


@contextlib.contextmanager
def host_emulation(sm_count: int = 4):
    """Within this context the launchers of the policy-loss, advantage and phase-statistics kernels
    accept CPU tensors and run the kernels' bodies on the host: one thread per GPU thread, meeting
    at the same reductions in the same order (``csrc/cuda/team.h``), planned as for a GPU with
    ``sm_count`` SMs (small values split sequences across blocks sooner). For tests and debugging
    without a GPU; CUDA tensors still run on their device.

    Example::

        with lenkernels.cuda.host_emulation():
            lenkernels.cuda.phase_stats.phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, *outs)
    """
    global _emulated_sm_count
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    previous, _emulated_sm_count = _emulated_sm_count, sm_count
    try:
        yield
    finally:
        _emulated_sm_count = previous


def _target(x: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(device index, SM count, stream) for a launch on ``x``'s device; device -1 (host emulation)
    for a CPU tensor inside :func:`host_emulation`."""
    if x.device.type == "cuda":
        return _launch_context(x)
    if x.device.type == "cpu" and _emulated_sm_count is not None:
        return -1, _emulated_sm_count, 0
    raise ValueError(f"{name} must be a CUDA tensor for backend='cuda', got {x.device}")


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _dtype_code(x: torch.Tensor, name: str) -> int:
    if x.dtype not in _checks.DTYPE_CODES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for backend='cuda', got {x.dtype}")
    return _checks.DTYPE_CODES[x.dtype]


def _as_u8(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 byte view of a mask: bool/uint8/int8 as they are, any other dtype through ``!= 0``."""
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8):
        mask = mask != 0
    return mask.view(torch.uint8)
