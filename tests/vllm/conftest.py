"""Fixtures of the `vllm` tests, which run in vLLM's own venv (scripts/setup_vllm.sh).

Without vLLM: the main suite never enters this folder (tests/conftest.py ignores it), and a run
given this folder by name collects nothing here (collect_ignore_glob below) instead of failing on
an import; this file itself imports no vLLM. Every test here gets the `vllm` marker.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["*.py"]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's config folder (no weights, no tokenizer, no download)."""
    from tests.vllm import harness  # here, not at the top: this conftest loads without vLLM

    return harness.write_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def engine(model_dir, tmp_path):
    """make(**settings) -> an Engine of tests/vllm/test_kvbm_connector.py (vLLM's scheduler with
    kvbm's connector, one worker-side connector, a kvbm-workers); every one closed after the test."""
    from tests.vllm.test_kvbm_connector import Engine  # here: this conftest loads without vLLM
    made = []

    def make(**kw):
        e = Engine(model_dir, tmp_path / f"e{len(made)}", **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()

