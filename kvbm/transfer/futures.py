"""Futures of the transfer pipeline.

Parts:
  TransferFuture   a concurrent.futures.Future for one submission, plus layer progress for onboards
                   that asked for it: `layers_ready`, `wait_layer(l, timeout)`, `add_layer_callback`
                   (callbacks run in layer order, one delivery at a time: layers already landed
                   on the adding thread, later ones on the TransferManager's I/O thread, or on
                   the thread whose result() settled a small lane request itself)
  TransferResult   what a successful future resolves to
  CompositeFuture  one TransferFuture over several submissions ("parts"), some submitted only when
                   an earlier one finished (a disk read, then its H2D): layer progress is the
                   least of the parts that report layers (a part not submitted yet: none), the
                   result comes once every part is done, and any failed part fails it
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvbm.errors import TransferError
from kvbm.wire import protocol as P

logger = logging.getLogger(__name__)

_RUNNING = concurrent.futures._base.RUNNING


class TransferFuture(concurrent.futures.Future):
    """Future of one submission; onboards with layers=True also report per-layer arrival."""

    def __init__(self, path: P.Path, num_blocks: int, num_layers: int) -> None:
        super().__init__()
        # Born running (every submission starts at once; none is ever cancelled): the state is set
        # here, where no other thread can hold this future yet, rather than through
        # set_running_or_notify_cancel(), whose condition lock is a measurable part of a 1-block
        # submit (tests/unit/test_futures.py holds this to what that call would have left).
        self._state = _RUNNING
        self.path = path
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self._layers_ready = 0
        self._lcond: threading.Condition | None = None   # made by the first layer user (_layer_cond)
        self._layer_callbacks: list[Callable[[int], None]] = []
        # Callbacks run one delivery at a time, so a late add_layer_callback's catch-up (on the
        # caller's thread) and the I/O thread's later layers never interleave. Whoever finds a
        # delivery running leaves its work to it instead of waiting: the I/O thread never blocks
        # on a user callback running elsewhere.
        self._delivering = False
        self._delivered = 0     # layers every active callback has been called for
        self._new_callbacks: list[Callable[[int], None]] = []
        # A small lane request's waiter settles its own completion (TransferManager._settle_waiting):
        # fn(future, timeout), called once by the first result() that finds it not done.
        self._settle_here: Callable[[TransferFuture, float | None], None] | None = None

    @property
    def _layer_cond(self) -> threading.Condition:
        """Layer progress's condition, made on first use: most futures never report layers, and
        a Condition is a measurable part of a 1-block submit. Two first users agree on one under
        the future's own condition."""
        cond = self._lcond
        if cond is None:
            with self._condition:
                if self._lcond is None:
                    self._lcond = threading.Condition()
                cond = self._lcond
        return cond

    def result(self, timeout: float | None = None):
        settle, self._settle_here = self._settle_here, None
        if settle is not None and not self.done():
            settle(self, timeout)
        return super().result(timeout)

    @property
    def layers_ready(self) -> int:
        """How many leading layers have landed in every destination block."""
        return self._layers_ready

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """True once layer `layer` has landed; raises TransferError if the transfer failed first;
        False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._layer_cond:
            while self._layers_ready <= layer and not self.done():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._layer_cond.wait(remaining)
        if self._layers_ready > layer:
            return True
        self.result(0)  # raises the transfer's error
        return True

    def add_layer_callback(self, fn: Callable[[int], None]) -> None:
        """fn(layer) for every layer landed so far and every later one, in layer order, one call
        at a time: on this thread, or on the I/O thread when it is delivering layers right now."""
        with self._layer_cond:
            self._new_callbacks.append(fn)
        self._deliver()

    def _advance(self, ready: int) -> None:
        with self._layer_cond:
            if ready <= self._layers_ready:
                return
            self._layers_ready = ready
            self._layer_cond.notify_all()
        self._deliver()

    def _deliver(self) -> None:
        with self._layer_cond:
            if self._delivering:
                return            # the running delivery picks this work up before it stops
            self._delivering = True
        try:
            while True:
                with self._layer_cond:
                    new, self._new_callbacks = self._new_callbacks, []
                    old, ready = self._delivered, self._layers_ready
                    if not new and old >= ready:
                        self._delivering = False
                        return
                    self._layer_callbacks.extend(new)
                    callbacks = list(self._layer_callbacks)
                    self._delivered = ready
                for fn in new:                     # catch up on what landed before fn was added
                    for layer in range(old):
                        self._call(fn, layer)
                for layer in range(old, ready):
                    for fn in callbacks:
                        self._call(fn, layer)
        except BaseException:
            with self._layer_cond:
                self._delivering = False
            raise

    @staticmethod
    def _call(fn: Callable[[int], None], layer: int) -> None:
        try:
            fn(layer)
        except Exception:  # noqa: BLE001 - a user callback must not kill the I/O thread
            logger.exception("layer callback failed")

    def _wake_layers(self) -> None:
        if self._lcond is None:
            return    # nobody ever waited on a layer (a waiter makes it first)
        with self._lcond:
            self._lcond.notify_all()


@dataclass
class TransferResult:
    path: P.Path
    blocks: int
    bytes: int
    seconds: float
    value: Any = None      # what finalize returned (offload/onboard summaries)


class CompositeFuture(TransferFuture):
    """A TransferFuture over `layer_parts` + other parts, attached as they are submitted.

    attach(part, layers) adds a submission's future; close() says no more parts will come (a part
    failed before the rest could be submitted). Resolves once every expected part was attached (or
    close() was called) and every attached part is done: TransferError with the first failure
    (blocks_may_be_written if any part's says so), else a TransferResult whose value is
    finish(results) (an exception from finish fails it)."""

    def __init__(self, path: P.Path, num_blocks: int, num_layers: int, parts: int, layer_parts: int,
                 finish: Callable[[list[TransferResult]], Any]) -> None:
        super().__init__(path, num_blocks, num_layers)
        self._lock = threading.Lock()
        self._expected = parts
        self._layer_expected = layer_parts
        self._parts: list[tuple[TransferFuture, bool]] = []
        self._finish = finish
        self._finishing = False
        self._t0 = time.monotonic()

    def attach(self, part: TransferFuture, layers: bool) -> None:
        with self._lock:
            self._parts.append((part, layers))
        if layers:
            part.add_layer_callback(lambda _layer: self._progress())
        part.add_done_callback(lambda _f: self._maybe_finish())

    def close(self) -> None:
        """No further part will be attached."""
        with self._lock:
            self._expected = len(self._parts)
            self._layer_expected = sum(1 for _, lay in self._parts if lay)
        self._maybe_finish()

    def _progress(self) -> None:
        with self._lock:
            layered = [p for p, lay in self._parts if lay]
            ready = 0 if len(layered) < self._layer_expected or not layered else \
                min(p.layers_ready for p in layered)
        if not self.done():
            self._advance(ready)

    def _maybe_finish(self) -> None:
        with self._lock:
            if len(self._parts) < self._expected or not all(p.done() for p, _ in self._parts) or self._finishing:
                return
            self._finishing = True
            parts = [p for p, _ in self._parts]
        errors = [p.exception() for p in parts if p.exception() is not None]
        if errors:
            written = any(getattr(e, "blocks_may_be_written", False) for e in errors)
            self.set_exception(TransferError(str(errors[0]), blocks_may_be_written=written))
            self._wake_layers()
            return
        results = [p.result() for p in parts]
        try:
            value = self._finish(results)
        except Exception as err:  # noqa: BLE001 - surfaces to the caller through the future
            logger.error("finishing a %s transfer failed", self.path.label, exc_info=True)
            self.set_exception(TransferError(f"finish failed: {type(err).__name__}: {err}"))
            self._wake_layers()
            return
        self._advance(self.num_layers if self._layer_expected else 0)
        self.set_result(TransferResult(self.path, self.num_blocks, sum(r.bytes for r in results),
                                       time.monotonic() - self._t0, value))
