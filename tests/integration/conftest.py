"""Fixtures of the multi-process pipeline tests (defined in conftest_shared.py, shared with tests/stress)."""
from __future__ import annotations

from conftest_shared import make_pipeline  # noqa: F401
