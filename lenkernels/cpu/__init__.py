"""Loader of the CPU extensions (C++17 + OpenMP, one module per op family in ``csrc/cpu/``).

Kernels take raw data pointers, sizes and strides; no torch C++ ABI is involved, so the modules
build with pybind11 and g++ alone and work with any torch version.
"""

from __future__ import annotations

from types import ModuleType

import torch

from lenkernels import _checks, _extensions


def load(family: str) -> ModuleType:
    """The compiled CPU module of an op family, e.g. ``load("token_stats")``."""
    return _extensions.load(f"_cpu_{family}", "cpu")


def available(family: str) -> tuple[bool, str]:
    """``(True, "")`` when the family's CPU module loads, else ``(False, why)``."""
    try:
        load(family)
    except ImportError as exc:
        return False, str(exc)
    return True, ""


def threads_for(n_elements: int, per_thread: int) -> int:
    """OpenMP threads for ``n_elements`` of streaming work: one per ``per_thread`` elements (below
    that another thread costs more in fork/join, or a descheduled straggler on a busy host, than the
    work it takes over), at most ``torch.get_num_threads()``."""
    return max(1, min(torch.get_num_threads(), n_elements // per_thread))


def dtype_code(x: torch.Tensor, name: str) -> int:
    """The ``_codes.DType`` code of a float32/bfloat16/float16 input; ValueError naming ``name`` otherwise."""
    if x.dtype not in _checks.DTYPE_CODES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for backend='cpu', got {x.dtype}")
    return _checks.DTYPE_CODES[x.dtype]
