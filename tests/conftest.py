"""Test setup. TRITON_INTERPRET must be set before anything imports `rgt`, because @triton.jit reads it at
definition time: without CUDA the Triton kernels run in the CPU interpreter."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    slow_ok = os.environ.get("RGT_SLOW_TESTS", "0") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(pytest.mark.skip(reason="slow test: set RGT_SLOW_TESTS=1 to run"))


@pytest.fixture(autouse=True)
def seeded_global_rng(request):
    """Each test starts torch's global generator from a seed of its own name. The process seeds it at random
    (initial_seed() differs per run), so a test that draws from it (default weight init, torch.rand without a
    generator) would see new values on every run and depend on what ran before."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def tiny():
    """A tiny x2 RGT with seeded random weights, on the reference ops (fast on CPU, no interpreter)."""
    from _utils import TINY

    import rgt

    torch.manual_seed(0)
    return rgt.RGT(**TINY, kernels="reference").eval()
