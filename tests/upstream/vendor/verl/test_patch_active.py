"""lenkernels' own check, not vendored: the upstream tests beside this file really run against
lenkernels' drop-ins (tests/upstream/conftest.py patches around every test), so the suite cannot
silently test verl's originals against themselves."""

from __future__ import annotations

import pytest

from tests.utils import trainer_module

core = trainer_module("verl.trainer.ppo.core_algos")
verl_F = trainer_module("verl.utils.torch_functional")
rollout_corr = trainer_module("verl.trainer.ppo.rollout_corr_helper")

from lenkernels.integrations import verl as lk_verl

# the vendored modules, imported here at collection (unpatched), as pytest imports them; each with
# the replaced functions it imports by name (the rest reach them through verl's own code)
from . import (
    test_core_algos_on_cpu,
    test_dynamic_policy_losses_on_cpu,
    test_loss_aggregation_on_cpu,
    test_rollout_corr,
    test_rollout_corr_integration,
    test_torch_functional,
    test_value_loss_normalization_on_cpu,
)

IMPORTED_BY_NAME = {
    test_core_algos_on_cpu: (
        "compute_grpo_outcome_advantage",
        "compute_grpo_vectorized_outcome_advantage",
        "compute_rloo_outcome_advantage",
        "compute_rloo_vectorized_outcome_advantage",
        "kl_penalty",
    ),
    test_loss_aggregation_on_cpu: ("agg_loss",),
    test_rollout_corr: ("compute_offpolicy_metrics", "compute_rollout_correction_and_rejection_mask"),
    test_rollout_corr_integration: (
        "compute_offpolicy_metrics",
        "compute_policy_loss_vanilla",
        "compute_rollout_correction_and_rejection_mask",
    ),
    test_dynamic_policy_losses_on_cpu: ("compute_policy_loss_dro",),
    test_value_loss_normalization_on_cpu: (),
    test_torch_functional: (),
}


def test_verl_modules_and_registries_hold_lenkernels_functions():
    assert lk_verl.is_patched()
    for name in lk_verl.PATCHED_NAMES:
        owner = next(m for m in (verl_F, core, rollout_corr) if hasattr(m, name))
        assert getattr(owner, name) is getattr(lk_verl, name), name
    for key, fn in lk_verl.POLICY_LOSSES.items():
        assert core.get_policy_loss_fn(key) is fn, key
    for key, fn in lk_verl.ADVANTAGE_ESTIMATORS.items():
        assert core.get_adv_estimator_fn(key) is fn, key
    # verl's own code calls the drop-ins through its module globals
    assert core.compute_value_loss.__globals__["agg_loss"] is lk_verl.agg_loss
    # bypass_mode's loss imports the rollout correction from its module when it runs
    assert (
        rollout_corr.compute_rollout_correction_and_rejection_mask
        is lk_verl.compute_rollout_correction_and_rejection_mask
    )


@pytest.mark.parametrize("module", list(IMPORTED_BY_NAME), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_vendored_tests_call_lenkernels_functions(module):
    replaced = [name for name in lk_verl.PATCHED_NAMES if name in vars(module)]
    assert sorted(replaced) == sorted(IMPORTED_BY_NAME[module])
    for name in replaced:
        assert vars(module)[name] is getattr(lk_verl, name), f"{module.__name__}.{name} is still verl's"
