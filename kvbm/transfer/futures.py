"""Futures of the transfer pipeline.

Parts:
  TransferFuture   a concurrent.futures.Future for one submission, plus layer progress for onboards
                   that asked for it: `layers_ready`, `wait_layer(l, timeout)`, `add_layer_callback`
                   (callbacks run on the TransferManager's I/O thread, in layer order)
  TransferResult   what a successful future resolves to
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from kvbm.transfer import protocol as P

logger = logging.getLogger(__name__)


class TransferFuture(concurrent.futures.Future):
    """Future of one submission; onboards with layers=True also report per-layer arrival."""

    def __init__(self, path: P.Path, num_blocks: int, num_layers: int) -> None:
        super().__init__()
        self.path = path
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self._layers_ready = 0
        self._layer_cond = threading.Condition()
        self._layer_callbacks: list[Callable[[int], None]] = []

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
        """fn(layer) for every layer that lands from now on (on the manager's I/O thread)."""
        with self._layer_cond:
            self._layer_callbacks.append(fn)
            ready = self._layers_ready
        for layer in range(ready):
            fn(layer)

    def _advance(self, ready: int) -> None:
        with self._layer_cond:
            if ready <= self._layers_ready:
                return
            old, self._layers_ready = self._layers_ready, ready
            callbacks = list(self._layer_callbacks)
            self._layer_cond.notify_all()
        for layer in range(old, ready):
            for fn in callbacks:
                try:
                    fn(layer)
                except Exception:  # noqa: BLE001 - a user callback must not kill the I/O thread
                    logger.exception("layer callback failed")

    def _wake_layers(self) -> None:
        with self._layer_cond:
            self._layer_cond.notify_all()


@dataclass
class TransferResult:
    path: P.Path
    blocks: int
    bytes: int
    seconds: float
    value: Any = None      # what finalize returned (offload/onboard summaries)
