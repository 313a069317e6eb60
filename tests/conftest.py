"""Shared fixtures and marker handling. Markers (gpu, stress, slow) are declared in pyproject.toml.

Kept free of hypothesis and pyzmq imports: the GPU machine runs tests/gpu without them.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvbm


def pytest_collection_modifyitems(config, items):
    if kvbm.cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: kvbm.cuda_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator per test, printed on failure through the test id."""
    return np.random.default_rng(0xC0FFEE)
