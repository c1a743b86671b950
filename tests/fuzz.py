"""Hypothesis profiles and strategies shared by the property-based tests.

Profiles: ``ci`` (default; a few thousand cases over the whole suite within CI's budget) and
``slow`` (selected by ``pytest --slow``, ten times more).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
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
