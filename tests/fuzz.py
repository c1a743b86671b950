"""Hypothesis profiles and strategies shared by the property-based tests.

Profiles: ``ci`` (default; a few thousand cases over the whole suite within CI's budget) and
``slow`` (selected by ``pytest --slow``, ten times more).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci", max_examples=150, deadline=None, derandomize=False, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("slow", max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

FLOAT_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def examples(n_ci: int):
    """Per-test example count: ``n_ci`` in CI, ten times that under --slow."""
    return settings(max_examples=n_ci * (10 if settings.default.max_examples > 150 else 1))


@st.composite
def leading_shapes(draw, max_dims: int = 3, max_size: int = 6):
    """Leading shapes including 0- and 1-sized dimensions."""
    dims = draw(st.integers(1, max_dims))
    return tuple(draw(st.integers(0, max_size)) for _ in range(dims))


def cheap_and_gpu(backends):
    """``(cheap, gpu)`` of a family's (backend, device) pairs: cpu and reference, and the rest
    (the placeholder ``("none", "none")`` where there is none: a strategy needs one value)."""
    cheap = [b for b in backends if b[0] in ("cpu", "reference")]
    return cheap, [b for b in backends if b[0] not in ("cpu", "reference")] or [("none", "none")]


def backend_fuzz_tests(run, cases, backends, n_cheap: int, n_gpu: int):
    """The two property tests of an op: ``run(case, backend, device)`` for ``cases`` (a strategy)
    on the cheap backends (``n_cheap`` examples in CI) and on the GPU backends (``n_gpu``; none
    here: it passes). Assign them to two ``test_*`` names of the test module."""
    cheap, gpu = cheap_and_gpu(backends)

    @examples(n_cheap)
    @given(case=cases, backend=st.sampled_from(cheap))
    def cheap_test(case, backend):
        run(case, *backend)

    @examples(n_gpu)
    @given(case=cases, backend=st.sampled_from(gpu))
    def gpu_test(case, backend):
        if backend[0] == "none":
            return
        run(case, *backend)

    return cheap_test, gpu_test
