"""Fixtures of the multi-process pipeline tests (tests/support/pipeline_fixtures.py, shared with tests/stress)."""
from __future__ import annotations

from tests.support.pipeline_fixtures import make_pipeline  # noqa: F401
