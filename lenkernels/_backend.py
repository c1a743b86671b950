"""Backend selection: the one place that decides which implementation runs an op, and can say why
any other was not chosen.

Backends: ``triton`` (GPU kernels; on CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda``
(hand-written CUDA C++), ``cpu`` (C++/OpenMP) and ``reference`` (plain PyTorch, float64-capable).
``backend=None`` picks ``triton`` for CUDA tensors (``cuda`` when Triton is missing; a family may
declare another order, as token_stats does for its CUDA C++ kernels) and ``cpu`` for CPU tensors,
never the reference; ``LENKERNELS_BACKEND`` overrides that default for a whole process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

from lenkernels import _checks

BACKENDS = ("triton", "cuda", "cpu", "reference")

# op family -> backends that implement it (a family's module registers itself on import)
_FAMILIES: dict[str, tuple[str, ...]] = {}
_FAMILY_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {}
_MODULE: dict[str, str] = {}  # family -> the backend modules / compiled extensions implementing it


def register_family(
    family: str, backends: tuple[str, ...], *, prefer: dict[str, tuple[str, ...]] | None = None, module: str | None = None
) -> None:
    """Declares the backends of an op family; ``prefer`` overrides, per device type, the order in
    which ``backend=None`` tries the fast backends (default: triton, then cuda, on CUDA tensors);
    ``module`` names the backend modules when the family shares another's (default: the family)."""
    _FAMILIES[family] = tuple(backends)
    _MODULE[family] = module or family
    for device_type, order in (prefer or {}).items():
        _FAMILY_PREFERENCE[(family, device_type)] = tuple(order)


def implemented_backends(family: str) -> tuple[str, ...]:
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
    return _FAMILIES[family]


class BackendUnavailableError(ValueError):
    """Raised when a requested backend cannot run an op on the given device."""


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, bool, str]:
    """(importable, interpreter active, reason)."""
    if importlib.util.find_spec("triton") is None:
        return False, False, "triton is not installed (pip install triton)"
    try:
        from triton import knobs

        interpret = bool(knobs.runtime.interpret)
    except Exception:  # older Triton without knobs
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return True, interpret, ""


def _compiled_status(kind: str, family: str) -> tuple[bool, str]:
    if kind == "cpu":
        from lenkernels import cpu as loader
    else:
        from lenkernels import cuda as loader
    return loader.available(_MODULE.get(family, family))


def backend_status(family: str, device: torch.device | str) -> dict[str, tuple[bool, str]]:
    """``{backend: (usable, reason if not)}`` for an op family on a device."""
    device = torch.device(device)
    implemented = implemented_backends(family)
    out: dict[str, tuple[bool, str]] = {}
    for name in BACKENDS:
        if name not in implemented:
            out[name] = (False, f"{family} has no {name} implementation")
        elif name == "reference":
            out[name] = (True, "")
        elif name == "triton":
            importable, interpret, why = _triton_status()
            if not importable:
                out[name] = (False, why)
            elif device.type == "cuda" and not interpret:
                out[name] = (True, "")
            elif device.type == "cpu" and interpret:
                out[name] = (True, "")
            elif device.type == "cpu":
                out[name] = (False, "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import")
            else:
                out[name] = (False, f"triton cannot run on {device.type} tensors in this process")
        elif name == "cpu":
            out[name] = (
                _compiled_status("cpu", family) if device.type == "cpu" else (False, "cpu backend needs CPU tensors")
            )
        elif name == "cuda":
            out[name] = (
                _compiled_status("cuda", family)
                if device.type == "cuda"
                else (False, "cuda backend needs CUDA tensors")
            )
    return out


def kernels(backend: str, family: str) -> ModuleType:
    """The module that implements ``family`` for ``backend``: ``lenkernels.<backend>.<family>``.

    The one dispatch point of every op: each such module defines the family's host launchers with
    the same names and signatures on every backend (typed inputs, a frozen config of scalars, the
    outputs to write), so an op calls ``kernels(name, FAMILY).<launcher>(...)`` without branching
    on the backend's name. A new backend of a family is one new module.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return importlib.import_module(f"lenkernels.{backend}.{_MODULE.get(family, family)}")


def explain(family: str, device: torch.device | str = "cpu") -> str:
    """A human-readable table of which backends can run ``family`` on ``device`` and why not."""
    device = torch.device(device)
    try:
        default = _default(family, device)
    except BackendUnavailableError as exc:
        default = f"none ({exc})"
    lines = [f"{family} on {device}: default -> {default}"]
    for name, (ok, why) in backend_status(family, device).items():
        lines.append(f"  {name:9s} {'yes' if ok else 'no ':3s} {why}")
    return "\n".join(lines)


# The fast backends backend=None may pick, in order. The float64 reference is never a silent
# default: it is ~20x slower and holds [N, V] float64 temporaries (out of memory at 150k vocabularies).
_PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
_CHOOSE_REFERENCE = "set LENKERNELS_BACKEND=reference (or pass backend='reference') to run the slow float64 reference"


def _default(family: str, device: torch.device) -> str:
    env = os.environ.get("LENKERNELS_BACKEND")
    if env:
        return env
    status = backend_status(family, device)
    order = _FAMILY_PREFERENCE.get((family, device.type), _PREFERENCE.get(device.type, ()))
    preference = [n for n in order if n in implemented_backends(family)]
    for name in preference:
        if status[name][0]:
            return name
    if not preference:
        raise BackendUnavailableError(f"no compiled backend of {family} runs on {device}; {_CHOOSE_REFERENCE}")
    reasons = "; ".join(f"backend={n!r}: {status[n][1]}" for n in preference)
    raise BackendUnavailableError(f"no fast backend can run {family} on {device} ({reasons}); {_CHOOSE_REFERENCE}")


@torch.compiler.assume_constant_result
def resolve(backend: str | None, family: str, device: torch.device) -> str:
    """The backend that runs ``family`` on ``device``; raises BackendUnavailableError saying why not.

    ``backend=None`` takes ``LENKERNELS_BACKEND`` or the first usable fast backend (triton, then
    cuda, on CUDA tensors; cpu on CPU tensors) and raises when none is usable: it never falls back
    to the float64 reference. Runs once per trace under torch.compile (a constant of the graph).
    """
    _checks.no_functorch(family)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    name = backend or _default(family, device)
    if name not in BACKENDS:
        raise ValueError(f"LENKERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    ok, why = backend_status(family, device)[name]
    if not ok:
        hint = f"; {_CHOOSE_REFERENCE}" if name != "reference" else ""
        raise BackendUnavailableError(f"backend={name!r} cannot run {family} on {device}: {why}{hint}")
    return name
