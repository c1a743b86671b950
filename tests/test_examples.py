"""The examples run and assert what they claim (each in its own process, as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_grpo_step_eager_and_lenkernels_agree():
    """examples/grpo_step.py: a GRPO step with a tiny random Qwen2 (rollout, rule reward, phase
    entropy, shaped rewards, advantages, two clipped-loss updates) in eager PyTorch and with
    lenkernels; the script itself asserts equal rewards, losses, gradients and weights."""
    pytest.importorskip("transformers", reason="the example builds its model with transformers")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grpo_step.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "OK: eager and lenkernels agree" in proc.stdout, output[-4000:]
    assert "iteration 1:" in proc.stdout  # both policy updates ran
