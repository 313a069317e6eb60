"""What every bench script prints the same way: the CPU it ran on and percentiles.

Imported as a sibling module (`python bench/bench_<thing>.py` puts bench/ first on sys.path).
"""
from __future__ import annotations

import numpy as np


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "?"."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))
