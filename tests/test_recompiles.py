"""No recompiles: 50 sequence lengths, vocabularies within a bucket and hyper-parameter values
compile a bounded number of Triton kernels (counted from Triton's own cache keys, no GPU needed)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_bounded_specializations():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.specializations"], capture_output=True, text=True, env=env, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts, "no launch was recorded"
    # two logits dtypes (bf16, fp32) were launched: one kernel each, whatever the sizes/values
    too_many = {name: n for name, n in counts.items() if n > 2}
    assert not too_many, f"kernels recompiled per size or value: {too_many}"
