"""Runs verl's and TRL's own unit tests (vendored, unchanged, under vendor/verl/ and vendor/trl/) with lenkernels'
drop-ins swapped in: the upstream tests are the contract the drop-ins must keep.

Every test under vendor/verl/ runs inside ``lenkernels.integrations.verl.patched()``, every test under vendor/trl/
inside ``lenkernels.integrations.trl.patched()`` (an autouse fixture, per test). ``patch()``
replaces the functions on verl's/TRL's modules, in their registries and in every loaded module of
the ``verl``/``trl`` packages that imported them by name. The vendored tests import them by name
too (``from verl.trainer.ppo.core_algos import agg_loss``), which binds verl's function into the
test module when it is imported, at collection, before any patch: a swap on verl's modules alone
would leave those names on verl's originals and the suite would test verl against itself. So the
fixture also rebinds, for the test's duration, every global of the ``tests.upstream.*`` modules that
holds a function the patch replaced (by identity, as ``patch()`` itself does), and puts the
originals back afterwards. Calls through the module (``core_algos.agg_loss(...)``, verl's own
``compute_value_loss`` calling ``agg_loss``, the registries) see the patch directly.

The fixture fails the test (it does not skip) when the swap did not happen: each name the
integration replaces must be lenkernels' function on verl's/TRL's module while the test runs, and
verl's again afterwards. tests/upstream/vendor/{verl,trl}/test_patch_active.py check the same from the
test side, including the vendored modules' rebound globals.

Marks: the vendored files stay byte-for-byte upstream's below their provenance header, so the
skip/xfail marks are applied here, from ``MARKS`` (to every case of a test, or to the cases whose
parameters match), and README.md lists each with its reason: skips for what cannot run here (the
multi-GPU tests, only where there are too few GPUs), ``xfail(strict=True)`` for the deliberate
lenkernels differences. A ``MARKS`` entry naming no test of its vendored file is a collection
error, so a renamed upstream test cannot leave a stale mark behind. A vendored module whose
imports need a package the test extra does not install is reported as skipped (``NEEDS``), as is
every vendored module when its trainer is not installed at all.

verl's ``TestRegisterAdvEst`` clears ``ADV_ESTIMATOR_REGISTRY`` and rebinds it to a dict of its own
(verl's suite runs it in a process of its own); the fixture restores both registries, objects and
contents, after every verl test, so later tests (lenkernels' included) see verl's real registries.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

HERE = Path(__file__).parent
VENDOR = HERE / "vendor"  # the vendored trees, one folder per trainer: vendor/verl, vendor/trl

# verl's / TRL's modules whose attributes patch() replaces (and the tests import from)
OWNERS = {
    "verl": ("verl.utils.torch_functional", "verl.trainer.ppo.core_algos", "verl.trainer.ppo.rollout_corr_helper"),
    "trl": ("trl.trainer.utils",),
}

_HALF = ("torch.float16", "torch.bfloat16")


class Mark(NamedTuple):
    """How a vendored test is marked: ``skip`` (cannot run here), ``xfail`` (a deliberate lenkernels
    difference: ``xfail(strict=True, raises=AssertionError)``, so the test must still fail, and on
    its assertion) or ``xfail_any`` (the same difference where the test compares a single rounded
    value, which the two roundings can agree on for some inputs: it may pass), for every case of the
    test or for the cases whose parameters satisfy ``when``."""

    kind: str
    reason: str
    when: Callable[[dict], bool] | None = None


def _too_few_gpus(params: dict) -> bool:
    import torch

    return torch.cuda.device_count() < params["world_size"]


def _half(params: dict) -> bool:
    return str(params.get("dtype")) in _HALF


def _half_rows(params: dict) -> bool:
    return _half(params) and len(params["shape"]) > 1


def _half_one_value(params: dict) -> bool:
    return _half(params) and len(params["shape"]) == 1


def _trl_half(compared_with: str) -> str:
    return (
        "deliberate (lenkernels/integrations/trl.py, 'Differences'): a float16/bfloat16 result is float32 maths "
        f"rounded once, the correctly rounded value; the test wants torch's eager half-precision {compared_with}, "
        "which rounds intermediates to the half dtype and is an ulp or more away"
    )


# (path under tests/upstream/vendor)::(test name without parameters) -> Mark, or a list of them
MARKS: dict[str, Mark | list[Mark]] = {
    "verl/test_torch_functional.py::test_distributed_mean_max_min_std": Mark(
        "skip",
        "spawns world_size (2/4) ranks that each take a CUDA device and join an NCCL group: needs that "
        "many GPUs; it tests verl's distributed_mean_max_min_std, which lenkernels does not replace",
        _too_few_gpus,
    ),
    "verl/test_torch_functional.py::test_distributed_masked_mean": Mark(
        "skip",
        "spawns world_size (2/4) ranks that each take a CUDA device and join an NCCL group: needs that "
        "many GPUs; it tests verl's distributed_masked_mean, which lenkernels does not replace",
        _too_few_gpus,
    ),
    "trl/test_utils.py::TestEntropyFromLogits::test_entropy_from_logits_2_dims": [
        Mark("xfail", _trl_half("log_softmax/exp/sum to within 1e-5"), _half_rows),
        Mark("xfail_any", _trl_half("log_softmax/exp/sum to within 1e-5") + " (one value here)", _half_one_value),
    ],
    "trl/test_utils.py::TestSelectiveLogSoftmax::test_selective_log_softmax": Mark(
        "xfail", _trl_half("log_softmax bit for bit (torch.equal)"), _half
    ),
    "trl/test_utils.py::TestSelectiveLogSoftmax::test_selective_log_softmax_multi_index": Mark(
        "xfail", _trl_half("log_softmax bit for bit (torch.equal)"), _half
    ),
}

# vendored module -> a module it imports whose own imports may need packages the test extra leaves out
NEEDS = {
    "verl/test_multi_trajectories_advantage_on_cpu.py": "verl.trainer.ppo.v1.utils",
}


def _trainer_of(path: Path) -> str | None:
    try:
        rel = Path(path).resolve().relative_to(VENDOR.resolve())
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in OWNERS else None


def _integration(trainer: str):
    return importlib.import_module(f"lenkernels.integrations.{trainer}")


# --- collection: trainers or dependencies that are not installed ---------------------------------


class _SkippedModule(pytest.Module):
    """A vendored module that cannot be imported here, reported as one skipped collector."""

    skip_reason = ""

    def collect(self):
        raise pytest.skip.Exception(self.skip_reason)


def _missing(module: str) -> str | None:
    """Why ``module`` cannot be imported (a package outside verl/TRL is missing), or None. A missing
    piece of verl/TRL themselves is an error, not a skip."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in OWNERS or not top:
            raise
        return (
            f"{module} imports {e.name!r}, which lenkernels' test extra does not install (verl is installed --no-deps)"
        )
    return None


def pytest_pycollect_makemodule(module_path, parent):
    trainer = _trainer_of(module_path)
    if trainer is None or not Path(module_path).name.startswith("test_"):
        return None
    reason = None
    if importlib.util.find_spec(trainer) is None:
        reason = f"{trainer} is not installed"
    else:
        rel = Path(module_path).resolve().relative_to(VENDOR.resolve()).as_posix()
        if rel in NEEDS:
            reason = _missing(NEEDS[rel])
    if reason is None:
        return None
    module = _SkippedModule.from_parent(parent, path=Path(module_path))
    module.skip_reason = reason
    return module


def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        if _trainer_of(item.path) is None:
            continue
        rel = Path(item.path).resolve().relative_to(VENDOR.resolve()).as_posix()
        modules.setdefault(rel, getattr(item, "module", None))
        marks = MARKS.get(f"{rel}::{item.nodeid.split('::', 1)[1].split('[', 1)[0]}", [])
        params = getattr(getattr(item, "callspec", None), "params", {})
        for mark in marks if isinstance(marks, list) else [marks]:
            if mark.when is not None and not mark.when(params):
                continue
            if mark.kind == "skip":
                item.add_marker(pytest.mark.skip(reason=mark.reason))
            else:
                strict = mark.kind == "xfail"
                item.add_marker(pytest.mark.xfail(strict=strict, raises=AssertionError, reason=mark.reason))
    # a mark whose test no longer exists upstream (checked on the module, whatever was selected)
    stale = []
    for key in MARKS:
        rel, _, name = key.partition("::")
        obj = modules.get(rel)
        if obj is None:
            continue
        for part in name.split("::"):
            obj = getattr(obj, part, None)
        if obj is None:
            stale.append(key)
    if stale:
        raise pytest.UsageError(f"tests/upstream/conftest.py MARKS entries name no test of the vendored files: {stale}")


# --- running: the patch, the rebinding, the registries -------------------------------------------


def _owner_functions(trainer: str) -> dict[tuple[str, str], object]:
    names = _integration(trainer).PATCHED_NAMES
    found = {}
    for owner in OWNERS[trainer]:
        module = importlib.import_module(owner)
        for name in names:
            if name in vars(module):
                found[(owner, name)] = vars(module)[name]
    return found


def _rebind(swaps: dict[int, tuple[object, object]]) -> list[tuple[object, str, object]]:
    """Rebinds the ``tests.upstream.*`` globals whose value is a key of ``swaps``; returns what to undo."""
    undo = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith(__package__ + "."):
            continue
        for attr, value in list(vars(module).items()):
            hit = swaps.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(module, attr, hit[1])
                undo.append((module, attr, value))
    return undo


@contextlib.contextmanager
def _verl_registries():
    core = importlib.import_module("verl.trainer.ppo.core_algos")
    saved = [(name, getattr(core, name), dict(getattr(core, name)))
             for name in ("POLICY_LOSS_REGISTRY", "ADV_ESTIMATOR_REGISTRY")]  # fmt: skip
    try:
        yield
    finally:
        for name, registry, contents in saved:
            registry.clear()
            registry.update(contents)
            setattr(core, name, registry)


@contextlib.contextmanager
def patched_for_upstream(trainer: str):
    """``lenkernels.integrations.<trainer>.patched()``, checked, with the vendored tests' imported
    names rebound (see the module docstring)."""
    lk = _integration(trainer)
    before = _owner_functions(trainer)
    with contextlib.ExitStack() as stack:
        if trainer == "verl":
            stack.enter_context(_verl_registries())
        stack.enter_context(lk.patched())
        after = _owner_functions(trainer)
        not_ours = [f"{owner}.{name}" for (owner, name), fn in after.items() if fn is not getattr(lk, name)]
        if not lk.is_patched() or not_ours:
            pytest.fail(f"lenkernels' {trainer} patch is not in effect; still upstream's: {not_ours}", pytrace=False)
        swaps = {id(before[key]): (before[key], after[key]) for key in before if after[key] is not before[key]}
        undo = _rebind(swaps)
        try:
            yield
        finally:
            for module, attr, value in reversed(undo):
                setattr(module, attr, value)
    if lk.is_patched() or any(_owner_functions(trainer)[key] is not fn for key, fn in before.items()):
        pytest.fail(f"lenkernels' {trainer} patch did not restore upstream's functions", pytrace=False)


@pytest.fixture(autouse=True)
def _lenkernels_patch(request):
    trainer = _trainer_of(request.node.path)
    if trainer is None:
        yield
        return
    with patched_for_upstream(trainer):
        yield
