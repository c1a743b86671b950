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
import math
import sys
import threading
import types
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


def _export(namespace: dict) -> None:
    """Makes the public integration module whose globals are ``namespace`` the home (``__module__``)
    of the functions and classes of its ``__all__`` that the integrations' private modules define,
    so that they are documented, pickled and reported under the public import path."""
    for name in namespace["__all__"]:
        obj = namespace[name]
        if isinstance(obj, (types.FunctionType, type)) and obj.__module__.startswith(f"{__name__}._"):
            obj.__module__ = namespace["__name__"]


def _check_exclude(exclude: Iterable[str], names: Iterable[str]) -> None:
    """``patch(exclude=...)`` takes only names that the patch replaces (``names``)."""
    unknown = set(exclude) - set(names)
    if unknown:
        raise ValueError(f"exclude holds names that patch() does not replace: {sorted(unknown)}")


# --- shared by the integrations ----------------------------------------------------------------
#
# A drop-in returns the dtype its original returns. The kernels compute in float32 whatever the
# input dtype (bfloat16/float16 inputs are read as they are, float32 outputs are then cast as the
# original's eager arithmetic would type them). float64 inputs, which the kernels do not take, go
# to lenkernels' float64 reference definitions (plain autograd code): the original computes those
# in float64, and so does the drop-in, to float64 precision.

F64 = torch.float64


def _promote(*dtypes) -> torch.dtype:
    """torch's type promotion of tensors of these dtypes (all dimensioned, or all 0-dim); Nones skipped."""
    out = None
    for d in dtypes:
        if d is not None:
            out = d if out is None else torch.promote_types(out, d)
    return out


def _exact(*tensors) -> bool:
    """Whether any of the (optional) tensors is float64: the original then computes in float64."""
    return any(isinstance(t, torch.Tensor) and t.dtype == F64 for t in tensors)


def _divided(dtype: torch.dtype, divisor) -> torch.dtype:
    """The dtype of a 0-dim ``dtype`` (floating) tensor divided (or multiplied) by ``divisor``, by
    torch's rules: a Python number keeps it, a 0-dim tensor promotes with it, a dimensioned
    floating tensor's dtype wins (same category: the dimensioned operand decides)."""
    if not isinstance(divisor, torch.Tensor):
        return dtype
    if divisor.dim() == 0:
        return torch.promote_types(dtype, divisor.dtype)
    return divisor.dtype if divisor.is_floating_point() else dtype


def _scalar_shape(*normalisers) -> tuple:
    """The shape a 0-dim loss takes when divided by these (a dimensioned tensor broadcasts it)."""
    shape: tuple = ()
    for n in normalisers:
        if isinstance(n, torch.Tensor):
            shape = tuple(torch.broadcast_shapes(shape, n.shape))
    return shape


def _cast(x: torch.Tensor, dtype: torch.dtype, shape: tuple | None = None) -> torch.Tensor:
    x = x if x.dtype == dtype else x.to(dtype)
    return x if shape is None or tuple(x.shape) == tuple(shape) else x.reshape(shape)


def _token_stats(logits: torch.Tensor, ids: torch.Tensor | None, *, temperature=1.0, ignore_index: int = -100,
                 inplace_backward: bool = False, want: str = "both"):  # fmt: skip
    """``(logprobs, entropy)`` of ``token_logprobs_entropy``: float32 from the kernels, float64
    (exactly, through the float64 reference definition) for float64 logits. ``want``: ``"both"``,
    ``"logprobs"`` or ``"entropy"`` (the other output is None; ``ids`` may be None for the entropy)."""
    from lenkernels.ops import token_stats as ops

    if isinstance(logits, torch.Tensor) and logits.dtype == F64:
        from lenkernels.reference.token_stats import token_logprobs_entropy

        if ids is None:
            ids = torch.full(logits.shape[:-1], ignore_index, dtype=torch.int64, device=logits.device)
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if tuple(ids.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"ids must have the shape of logits without V {tuple(logits.shape[:-1])}, got {tuple(ids.shape)}"
            )
        if logits.dim() == 0 or logits.shape[-1] == 0:
            raise ValueError("logits must have a non-empty vocabulary (last) dimension")
        _check_exact_args(ids, logits.shape[-1], temperature, ignore_index)
        lp, ent = token_logprobs_entropy(logits, ids, temperature, ignore_index, dtype=F64)
        return (None if want == "entropy" else lp), (None if want == "logprobs" else ent)
    if want == "logprobs":
        return ops.token_logprobs(logits, ids, temperature=temperature, ignore_index=ignore_index,
                                  inplace_backward=inplace_backward), None  # fmt: skip
    if want == "entropy":
        return None, ops.token_entropy(logits, ids=ids, temperature=temperature, ignore_index=ignore_index)
    return ops.token_logprobs_entropy(logits, ids, temperature=temperature, ignore_index=ignore_index,
                                      inplace_backward=inplace_backward)  # fmt: skip


def _check_exact_args(ids: torch.Tensor, vocab: int, temperature, ignore_index: int) -> None:
    """The value checks of ``token_logprobs_entropy`` for the float64 path (ids in range, a positive
    temperature), run where the op runs them (CPU tensors, or debug mode)."""
    from lenkernels import _checks

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating tensor, got {temperature.dtype}")
        _checks.same_device(ids, "ids", temperature, "temperature")
        try:
            shape = torch.broadcast_shapes(temperature.shape, ids.shape)
        except RuntimeError:
            shape = None
        if shape != ids.shape:
            raise ValueError(
                f"temperature of shape {tuple(temperature.shape)} does not broadcast to ids {tuple(ids.shape)}"
            )
    elif not (0.0 < float(temperature) < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if _checks.value_checks(ids.device):
        _checks.ids_in_range(ids, vocab, ignore_index)
        if isinstance(temperature, torch.Tensor) and not bool(((temperature > 0) & torch.isfinite(temperature)).all()):
            raise ValueError("temperature must hold positive finite values")


def _check_mask01(mask: torch.Tensor) -> None:
    """The 0/1 check of the fused op, for the float64 path (which does not go through it)."""
    from lenkernels import _checks

    if mask.dtype != torch.bool and _checks.value_checks(mask.device) and mask.numel():
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (a weighting belongs in importance_weights)")


def _policy_loss(logprobs, old_logprobs, advantages, mask=None, *, exact: bool = False, **kw):
    """``lenkernels.policy_loss`` (float32 results), or with ``exact`` (float64 inputs) or an empty
    batch (which the fused op refuses) the float64 reference definition of the same loss: a
    :class:`~lenkernels.ops.policy_loss.PolicyLoss` of float64 0-dim tensors, ``loss``
    differentiable in ``logprobs`` (and ``entropy``) by autograd."""
    from lenkernels.ops.policy_loss import PolicyLoss, policy_loss

    empty = isinstance(logprobs, torch.Tensor) and logprobs.numel() == 0
    if not exact and not empty:
        return policy_loss(logprobs, old_logprobs, advantages, mask, **kw)
    from lenkernels.reference import policy_loss as ref

    kw.pop("backend", None)
    if mask is not None:
        if tuple(mask.shape) != tuple(logprobs.shape):
            raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
        _check_mask01(mask)
    for name in ("ref_logprobs", "importance_weights"):  # not differentiated, as in the fused op
        if kw.get(name) is not None:
            kw[name] = kw[name].detach()
    out = ref.policy_loss(logprobs, old_logprobs.detach(), advantages.detach(), mask, dtype=F64, **kw)
    fields = {k: (out[k] if k == "loss" or out[k] is None else out[k].detach()) for k in PolicyLoss._fields}
    return PolicyLoss(**fields)


def _rollout_correction(old: torch.Tensor, rollout: torch.Tensor, valid: torch.Tensor, *, level: str, mode: str,
                        threshold=None, threshold_low=None, log_clamp: float, backend=None):  # fmt: skip
    """``lenkernels.rollout_correction`` of padded ``[B, T]`` log-probabilities (float32 weights and
    metrics), or for float64 inputs its float64 reference definition (float64 weights and metrics,
    the same fields)."""
    from lenkernels._codes import CorrectionLevel, CorrectionMode
    from lenkernels.ops.rollout_correction import RolloutCorrection, rollout_correction

    if not _exact(old, rollout):
        dtype = _promote(old.dtype, rollout.dtype)  # the op takes one dtype: the wider of the two, as torch's `-`
        return rollout_correction(old.to(dtype), rollout.to(dtype), valid, level=level, mode=mode, threshold=threshold,
                                  threshold_low=threshold_low, log_clamp=log_clamp, backend=backend)  # fmt: skip
    from lenkernels.reference import rollout_correction as ref

    b, t = old.shape
    out = ref.rollout_correction(
        old, rollout, valid.reshape(-1) != 0, ref.padded_offsets(b, t, old.device),
        level=CorrectionLevel[level.upper()], mode=CorrectionMode[mode.upper()],
        lo=0.0 if threshold_low is None else threshold_low, hi=math.inf if threshold is None else threshold,
        log_clamp=log_clamp, dtype=F64,
    )  # fmt: skip
    fields = {k: out[k] for k in RolloutCorrection._fields}
    return RolloutCorrection(**{**fields, "weights": out["weights"].reshape(b, t), "mask": out["mask"].reshape(b, t)})


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Trainer loss matrices are ``[B, T]``; ``[N]`` is one row, more dims fold into rows."""
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


def _aggregate(loss_mat: torch.Tensor, loss_mask: torch.Tensor, *, exact: bool | None = None, **agg) -> torch.Tensor:
    """``agg(loss_mat)`` over ``loss_mask`` (a 0-dim tensor, differentiable in ``loss_mat``): float32,
    or float64 when ``exact`` (default: when either input is float64); ``agg`` holds policy_loss's
    aggregation arguments (``agg``, ``num_tokens``, ``num_seqs``, ``norm_length``, ``dp_size``).
    An empty ``loss_mat`` gives 0."""
    # The fused policy-loss op with mode="reinforce" and A = -1 per sequence computes exactly
    # agg(loss_mat) (its per-token term -A * x is x), with every aggregation mode, the global
    # normalisers and the backward into loss_mat: lenkernels has no separate aggregation op.
    exact = _exact(loss_mat, loss_mask) if exact is None else exact
    x = _rows(loss_mat)
    mask = _rows(loss_mask)
    if x.numel() == 0:  # nothing to sum (the fused op refuses an empty batch)
        return x.sum().to(F64 if exact else torch.float32)
    minus_one = torch.full((x.shape[0],), -1.0, dtype=F64 if exact else torch.float32, device=x.device)
    # .clone(): trainers update their losses in place (verl: ``policy_loss -= entropy_coeff * entropy_loss``),
    # which must never reach a tensor the op saved for its backward
    return _policy_loss(x, x.detach(), minus_one, mask, mode="reinforce", exact=exact, **agg).loss.clone()
