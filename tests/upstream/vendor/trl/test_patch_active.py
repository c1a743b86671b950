"""lenkernels' own check, not vendored: the upstream tests beside this file really run against
lenkernels' drop-ins (tests/upstream/conftest.py patches around every test), so the suite cannot
silently test TRL's originals against themselves."""

from __future__ import annotations

from tests.utils import trainer_module

trl_utils = trainer_module("trl.trainer.utils")
grpo_trainer = trainer_module("trl.trainer.grpo_trainer")

from lenkernels.integrations import trl as lk_trl

# the vendored module, imported here at collection (unpatched), as pytest imports it
from . import test_utils

UTILS_NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")


def test_trl_modules_hold_lenkernels_functions():
    assert lk_trl.is_patched()
    for name in UTILS_NAMES:
        assert getattr(trl_utils, name) is getattr(lk_trl, name), name
    assert grpo_trainer.GRPOTrainer.__dict__["_compute_loss"] is lk_trl.grpo_compute_loss


def test_vendored_tests_call_lenkernels_functions():
    for name in ("selective_log_softmax", "entropy_from_logits"):
        assert vars(test_utils)[name] is getattr(lk_trl, name), f"{test_utils.__name__}.{name} is still TRL's"
