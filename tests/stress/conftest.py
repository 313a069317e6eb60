"""Stress runs reuse the integration harness (real kvbm-workers, CPU-mode engine)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from conftest_shared import make_pipeline  # noqa: E402,F401
