"""Test configuration.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
Triton (and so lenkernels) is imported, hence here. With a GPU the same tests run the triton and
cuda backends on CUDA tensors.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="run the slow cases too")


def pytest_configure(config):
    from hypothesis import settings

    import tests.fuzz  # noqa: F401  (registers the profiles)

    settings.load_profile("slow" if config.getoption("--slow") else "ci")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible stream per test: failures can be replayed by test id (crc32, not
    # hash(): str hashes are salted per process unless PYTHONHASHSEED is set)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
