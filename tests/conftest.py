"""Shared fixtures and marker handling. Markers (gpu, stress, slow, vllm) are declared in pyproject.toml.

Kept free of hypothesis and pyzmq imports: the GPU machine runs tests/gpu without them.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import kvbm

# tests/vllm runs in vLLM's own venv (scripts/setup_vllm.sh); elsewhere it is not even imported.
# find_spec answers without importing vLLM.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]


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
