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
"""

from __future__ import annotations

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


@functools.lru_cache(maxsize=None)
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


def _ids(ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    return ids.contiguous()


def token_stats_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z):
    """Host launcher of the forward.

    x: [N, V] float32/bfloat16/float16, unit stride along V, any row stride; ids: [N] int32/int64;
    temperature: fp32 [1] or [N]; writes logprobs, entropy, lse, mean_z (fp32 [N], contiguous).
    Out-of-range ids give NaN logprobs (checked on the host only with LENKERNELS_DEBUG=1).
    """
    _check_rows(x, "logits")
    n_rows, vocab = x.shape
    if n_rows == 0:
        return
    module = load("token_stats")
    device, sm_count, stream = _launch_context(x)
    dtype = _checks.DTYPE_CODES[x.dtype]
    ids = _ids(ids)
    temperature = temperature.to(torch.float32).contiguous()
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    # partial (m, S, U) states of each (row, split) when a row spans several blocks
    partial = torch.empty(n_rows * n_splits * 3, dtype=torch.float32, device=x.device) if n_splits > 1 else None
    for name, out in (("logprobs", logprobs), ("entropy", entropy), ("lse", lse), ("mean_z", mean_z)):
        if not (out.is_contiguous() and out.dtype == torch.float32 and out.numel() == n_rows):
            raise ValueError(f"{name} must be a contiguous float32 tensor of {n_rows} elements")
    module.token_stats_fwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        logprobs.data_ptr(), entropy.data_ptr(), lse.data_ptr(), mean_z.data_ptr(),
        0 if partial is None else partial.data_ptr(), n_splits, device, stream,
    )  # fmt: skip


def token_stats_bwd(x, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits):
    """Host launcher of the backward.

    x: [N, V] as in the forward; lse, mean_z: fp32 [N] from it; g_logprobs, g_entropy: fp32 [N] with
    any stride (0 = broadcast); writes dlogits ([N, V], x's dtype, unit stride along V, any row
    stride; may be x itself for the in-place backward).
    """
    _check_rows(x, "logits")
    _check_rows(dlogits, "dlogits")
    n_rows, vocab = x.shape
    if n_rows == 0:
        return
    if dlogits.shape != x.shape or dlogits.dtype != x.dtype:
        raise ValueError(
            f"dlogits must match logits {tuple(x.shape)} {x.dtype}, got {tuple(dlogits.shape)} {dlogits.dtype}"
        )
    module = load("token_stats")
    device, sm_count, stream = _launch_context(x)
    dtype = _checks.DTYPE_CODES[x.dtype]
    ids = _ids(ids)
    temperature = temperature.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    mean_z = mean_z.to(torch.float32).contiguous()
    g_lp = g_logprobs.to(torch.float32)
    g_h = g_entropy.to(torch.float32)
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    module.token_stats_bwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        lse.data_ptr(), mean_z.data_ptr(), g_lp.data_ptr(), g_lp.stride(0), g_h.data_ptr(), g_h.stride(0),
        dlogits.data_ptr(), dlogits.stride(0), n_splits, device, stream,
    )  # fmt: skip
