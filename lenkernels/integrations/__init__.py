"""Drop-in replacements for the trainer functions of verl and TRL.

``lenkernels.integrations.verl`` and ``lenkernels.integrations.trl`` hold functions with the exact
signatures and return conventions of the trainer functions they replace; each one calls the
lenkernels ops. Their ``patch()`` swaps them into the installed package at run time and
``unpatch()`` restores it; ``patched()`` is the scoped form::

    from lenkernels.integrations import verl as lk_verl

    with lk_verl.patched():          # or lk_verl.patch() ... lk_verl.unpatch()
        trainer.fit()

Importing these modules imports neither verl nor TRL and patches nothing: patching happens only
when ``patch()`` is called, in the process that calls it (a Ray worker must call it itself).

:class:`ModulePatch` below is the mechanism both use: it replaces attributes by identity on every
loaded module of the package (so names bound with ``from ... import`` are replaced too), in the
registries it is given and on given classes, and puts the originals back.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

__all__ = ["ModulePatch", "Replacement"]


class Replacement(NamedTuple):
    """One function to swap: ``owner.name`` (a module path or a class) is replaced by ``new``."""

    owner: str
    """Dotted path of the module (``"verl.utils.torch_functional"``) or class (``"trl.GRPOTrainer"``)."""
    name: str
    new: Callable


def _resolve(path: str):
    """Imports ``a.b.c`` as a module, or as attribute ``c`` of module ``a.b`` (a class)."""
    import importlib

    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, attr = path.rpartition(".")
        if not module:
            raise
        return getattr(importlib.import_module(module), attr)


class ModulePatch:
    """Reversible swap of functions inside an installed package.

    ``apply()`` resolves each :class:`Replacement`, remembers the original object and then
    replaces every reference to it (by identity) in the loaded modules of ``package``, in the
    ``registries`` (dicts such as verl's ``POLICY_LOSS_REGISTRY``) and on the owner itself.
    ``restore()`` puts the originals back, including in modules first imported while patched.
    Calls nest: ``apply`` twice needs ``restore`` twice; the originals come back on the last one.
    """

    def __init__(self, package: str, replacements: Callable[[], list[Replacement]],
                 registries: Callable[[], list[dict]] = lambda: []):  # fmt: skip
        self.package = package
        self._replacements = replacements
        self._registries = registries
        self._lock = threading.RLock()
        self._depth = 0
        self._swaps: dict[int, tuple[object, Callable]] = {}  # id(original) -> (original, new)
        self._owners: list[tuple[object, str, object]] = []  # (owner, name, original) set on classes/modules

    @property
    def active(self) -> bool:
        return self._depth > 0

    def _modules(self) -> list:
        prefix = self.package + "."
        return [m for name, m in list(sys.modules.items())
                if m is not None and (name == self.package or name.startswith(prefix))]  # fmt: skip

    def _rebind(self, table: dict[int, tuple[object, object]]) -> list[str]:
        """Rebinds every module global and registry entry whose value is a key of ``table``."""
        done = []
        for module in self._modules():
            namespace = getattr(module, "__dict__", None)
            if namespace is None:
                continue
            for attr, value in list(namespace.items()):
                hit = table.get(id(value))
                if hit is not None and hit[0] is value:
                    setattr(module, attr, hit[1])
                    done.append(f"{module.__name__}.{attr}")
        for registry in self._registries():
            for key, value in list(registry.items()):
                hit = table.get(id(value))
                if hit is not None and hit[0] is value:
                    registry[key] = hit[1]
                    done.append(f"registry[{key!r}]")
        return done

    def apply(self, exclude: Iterable[str] = ()) -> list[str]:
        """Swaps the replacements in (except the names in ``exclude``); returns what was replaced
        (``"module.attr"`` / ``"Class.attr"`` / ``"registry['name']"``)."""
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return []
            try:
                skip = set(exclude)
                done = []
                for rep in self._replacements():
                    if rep.name in skip or f"{rep.owner}.{rep.name}" in skip:
                        continue
                    owner = _resolve(rep.owner)
                    original = owner.__dict__.get(rep.name) if isinstance(owner, type) else getattr(owner, rep.name)
                    if original is None:
                        raise AttributeError(f"{rep.owner} has no attribute {rep.name!r} to replace")
                    self._swaps[id(original)] = (original, rep.new)
                    self._owners.append((owner, rep.name, original))
                    setattr(owner, rep.name, rep.new)
                    done.append(f"{rep.owner}.{rep.name}")
                done += self._rebind(self._swaps)
                return sorted(set(done))
            except BaseException:
                self._depth = 1
                self._restore()
                raise

    def _restore(self) -> None:
        for owner, name, original in reversed(self._owners):
            current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if current is self._swaps[id(original)][1]:
                setattr(owner, name, original)
        self._rebind({id(new): (new, original) for original, new in self._swaps.values()})
        self._swaps.clear()
        self._owners.clear()
        self._depth = 0

    def restore(self) -> None:
        """Undoes one :meth:`apply`; the originals are back after the outermost one."""
        with self._lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth == 0:
                self._depth = 1
                self._restore()

    @contextlib.contextmanager
    def scope(self, exclude: Iterable[str] = ()) -> Iterator[list[str]]:
        replaced = self.apply(exclude)
        try:
            yield replaced
        finally:
            self.restore()


# --- shared by the integrations ----------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Trainer loss matrices are ``[B, T]``; ``[N]`` is one row, more dims fold into rows."""
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


def _aggregate(loss_mat: torch.Tensor, loss_mask: torch.Tensor, **agg) -> torch.Tensor:
    """``agg(loss_mat)`` over ``loss_mask`` (a 0-dim float32 tensor, differentiable in
    ``loss_mat``); ``agg`` holds policy_loss's aggregation arguments (``agg``, ``num_tokens``,
    ``num_seqs``, ``norm_length``, ``dp_size``)."""
    from lenkernels.ops.policy_loss import policy_loss

    # The fused policy-loss op with mode="reinforce" and A = -1 per sequence computes exactly
    # agg(loss_mat) (its per-token term -A * x is x), with every aggregation mode, the global
    # normalisers and the backward into loss_mat: lenkernels has no separate aggregation op.
    x = _rows(loss_mat)
    mask = _rows(loss_mask)
    minus_one = torch.full((x.shape[0],), -1.0, dtype=torch.float32, device=x.device)
    # .clone(): the op's loss is a view of an output saved for its backward, and trainers update
    # their losses in place (verl: ``policy_loss -= entropy_coeff * entropy_loss``)
    return policy_loss(x, x.detach(), minus_one, mask, mode="reinforce", **agg).loss.clone()
