"""Helpers of the registry tests (tests/unit/test_registry*.py)."""
from __future__ import annotations

import numpy as np


def advance(reg, k: int) -> None:
    """k ticks without touching any registered block: touch a scratch block, then free it."""
    b = reg.allocate(1)
    reg.touch(np.repeat(b, k))
    reg.release(b)
