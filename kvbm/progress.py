"""Progress of long start-up steps (allocating, pre-faulting, pinning the G2 pool): a bar redrawn in
place when stderr is a terminal, else one INFO log line every PERIOD_S; nothing for a step that
ends within its first period, so small pools stay quiet.

Order: Progress(what, total, logger) -> update(done) as often as convenient (it rate-limits itself)
from the thread that waits on the step -> finish() (clears the bar; the caller logs the result).
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

PERIOD_S = 2.0        # between log lines, and before the first line or bar of a step
BAR_PERIOD_S = 0.2    # between redraws of the bar
BAR_WIDTH = 30


class Progress:
    def __init__(self, what: str, total: int, log: logging.Logger, *, period_s: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.total = max(int(total), 1)
        self.log = log
        self.period_s = PERIOD_S if period_s is None else period_s
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.t0 = clock()
        self._next = self.t0 + self.period_s
        self._drawn = 0       # width of the bar on screen (0: none)
        try:
            self.tty = bool(self.stream.isatty()) and log.isEnabledFor(logging.INFO)
        except (AttributeError, ValueError, OSError):
            self.tty = False

    def update(self, done: int) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + (BAR_PERIOD_S if self.tty else self.period_s)
        frac = min(max(done / self.total, 0.0), 1.0)
        elapsed = now - self.t0
        if self.tty:
            fill = int(frac * BAR_WIDTH)
            line = (f"\r{self.what} [{'#' * fill}{'.' * (BAR_WIDTH - fill)}] {frac:4.0%} "
                    f"{done / 1e9:.2f}/{self.total / 1e9:.2f} GB {elapsed:.0f} s")
            try:
                self.stream.write(line)
                self.stream.flush()
                self._drawn = len(line)
            except (OSError, ValueError):  # a closed terminal: go on without the bar
                self.tty = False
        else:
            self.log.info("%s: %.0f%% (%.2f of %.2f GB) after %.1f s", self.what, 100 * frac, done / 1e9,
                          self.total / 1e9, elapsed)

    def finish(self) -> None:
        if self._drawn:
            try:
                self.stream.write("\r" + " " * self._drawn + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._drawn = 0
