"""``python -m lenkernels.bench``: every op against the eager code trainers run today.

Suites live in ``lenkernels/bench/suites/`` (one module per op family, registered on import);
``core.py`` has the measurement method, ``report.py`` the outputs.
"""

from lenkernels.bench.core import SUITES, Provider, Result, Suite, register

__all__ = ["SUITES", "Provider", "Result", "Suite", "register"]
