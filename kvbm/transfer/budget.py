"""InflightBudget: the bound on bytes of submitted, unsettled transfers (backpressure).

take() waits for room (or raises BackpressureError when the caller asked not to wait, or past its
timeout); give_back() returns it when a submission settles. A submission larger than the whole
bound goes alone rather than never.
"""
from __future__ import annotations

import threading
import time

from kvbm.errors import BackpressureError


class InflightBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        # A plain lock taken directly on the common paths (room at once; no one waiting): a
        # Condition's Python-level enter/exit and notify were a measurable part of a 1-block submit.
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._waiting = 0

    def take(self, nbytes: int, block: bool, timeout: float | None) -> None:
        with self._lock:
            if not self.used or self.used + nbytes <= self.limit:
                self.used += nbytes
                return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._room:
            while self.used and self.used + nbytes > self.limit:
                if not block:
                    raise BackpressureError(f"{self.used} bytes in flight + {nbytes} requested exceeds "
                                            f"the bound of {self.limit}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BackpressureError(f"waited {timeout} s for {nbytes} bytes of in-flight budget "
                                            f"({self.used} of {self.limit} in use)")
                self._waiting += 1
                try:
                    self._room.wait(remaining)
                finally:
                    self._waiting -= 1
            self.used += nbytes

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes
            if self._waiting:
                self._room.notify_all()
