"""Loader of the CUDA C++ extensions (``csrc/cuda/``, one module per op family).

Built by ``pip install`` when ``nvcc`` is present, or on first use (needs ``nvcc``). Kernels take
raw device pointers, sizes and the current CUDA stream; no torch C++ headers are involved.
"""

from __future__ import annotations

from types import ModuleType

from lenkernels import _build, _extensions


def load(family: str) -> ModuleType:
    """The compiled CUDA module of an op family, e.g. ``load("token_stats")``."""
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
        return False, f"{exc} (install nvcc and `pip install -e .`, or set CUDA_HOME)"
    return True, ""
