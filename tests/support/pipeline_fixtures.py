"""Fixtures of the multi-process pipeline tests: `make_pipeline(**kw)` starts kvbm-workers and an
engine under tmp_path (ipc:// sockets there); every process is SIGKILLed by pid in the finalizer.
The conftest files of tests/integration and tests/stress re-export it."""
from __future__ import annotations

import uuid

import pytest

from tests.support.pipeline_harness import Pipeline


@pytest.fixture
def make_pipeline(tmp_path, request):
    made: list[Pipeline] = []

    def make(**kwargs) -> Pipeline:
        kwargs.setdefault("instance", f"t{uuid.uuid4().hex[:8]}")
        pipe = Pipeline(tmp_path / f"p{len(made)}", **kwargs)
        (tmp_path / f"p{len(made)}").mkdir()
        made.append(pipe)
        request.addfinalizer(pipe.kill_all)
        return pipe.start()

    return make
