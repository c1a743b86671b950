"""Loader of the CPU extensions (C++17 + OpenMP, one module per op family in ``csrc/cpu/``).

Kernels take raw data pointers, sizes and strides; no torch C++ ABI is involved, so the modules
build with pybind11 and g++ alone and work with any torch version.
"""

from __future__ import annotations

from types import ModuleType

from lenkernels import _extensions


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
