"""pytest-benchmark view of the lenkernels.bench suites: every suite x mode x provider at the
suite's default size. Run with ``python -m pytest benchmarks --benchmark-only`` (not part of the
test suite: CI does not time anything). ``python -m lenkernels.bench`` is the full report."""

from __future__ import annotations

import argparse

import pytest
import torch

from lenkernels.bench.core import SUITES, max_error
from lenkernels.bench.suites import load_all

load_all()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPTIONS = argparse.Namespace(tokens=None, vocab=None, dtype=None, full=False, device_type=DEVICE.type)


def _params():
    for suite in SUITES.values():
        for mode in suite.modes:
            for provider in suite.providers:
                if mode in provider.modes and not getattr(provider.fn, "mutates_inputs", False):
                    yield pytest.param(suite, mode, provider, id=f"{suite.name}-{mode}-{provider.name}")


@pytest.mark.parametrize("suite,mode,provider", list(_params()))
def test_benchmark(benchmark, suite, mode, provider):
    ok, why = provider.available(DEVICE)
    if not ok:
        pytest.skip(why)
    case = suite.cases(OPTIONS)[0]
    inputs = suite.make_inputs(case, DEVICE)
    err = max_error(provider.fn(inputs, mode), suite.expected(inputs, mode))
    assert err <= provider.tolerance, f"{provider.name} fails its correctness check: {err:.3g}"
    benchmark.extra_info.update(case=case, max_error=err)

    def call():
        provider.fn(inputs, mode)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
