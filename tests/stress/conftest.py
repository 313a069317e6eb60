"""Stress runs reuse the integration harness (real kvbm-workers, CPU-mode engine)."""
from __future__ import annotations

from tests.support.pipeline_fixtures import make_pipeline  # noqa: F401
