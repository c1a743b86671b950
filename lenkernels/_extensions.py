"""Loading of the compiled extensions (shared by ``cpu.py`` and ``cuda.py``).

An extension is taken from the installed package when its recorded source hash matches the
sources beside it (or when no sources ship, as in a wheel); otherwise it is built into the user
cache on first use (``_build.build``). Loading is thread safe and happens once per module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from types import ModuleType

from lenkernels import _build

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def _from_path(name: str, path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lenkernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed_file(name: str) -> str | None:
    spec = importlib.util.find_spec(f"lenkernels.{name}")
    return spec.origin if spec is not None and spec.origin else None


def _load_uncached(name: str, kind: str) -> ModuleType:
    modules = _build.cpu_modules() if kind == "cpu" else _build.cuda_modules()
    have_sources = name in modules
    installed = None if os.environ.get("LENKERNELS_FORCE_JIT") == "1" else _installed_file(name)
    if installed is not None:
        # The source hash is a string literal inside the binary: check it without loading the
        # module (a stale module, once loaded, would shadow a rebuilt one of the same name).
        if not have_sources:
            return importlib.import_module(f"lenkernels.{name}")
        with open(installed, "rb") as f:
            if _build.source_hash(modules[name]).encode() in f.read():
                return importlib.import_module(f"lenkernels.{name}")
    if not have_sources:
        raise ImportError(
            f"lenkernels.{name} is not installed and its sources are not available to build it; "
            f"reinstall with `pip install -e .` from a checkout"
        )
    return _from_path(name, _build.build(name, kind))


def load(name: str, kind: str) -> ModuleType:
    """Returns extension module ``name`` (``_cpu_<family>`` or ``_cuda_<family>``), building it if needed.

    Raises ImportError with the reason when it cannot be had; the reason is remembered so a
    backend query does not retry a failed build on every call.
    """
    module = _loaded.get(name)
    if module is not None:
        return module
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            raise ImportError(_failed[name])
        try:
            module = _load_uncached(name, kind)
        except Exception as exc:  # build errors, missing toolchain, bad .so
            _failed[name] = f"cannot load lenkernels.{name}: {exc}"
            raise ImportError(_failed[name]) from exc
        _loaded[name] = module
        return module
