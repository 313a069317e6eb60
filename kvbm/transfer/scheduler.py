"""Scheduler: holds transfers until the engine says their data is ready.

Parts:
  Gate        (iteration, layer): a transfer is held until the engine reports that point reached
  Scheduler   `hold(gate, item)` parks an item; `reached(iteration=i)` / `reached(layer=l)` releases
              what those points unblock, in submission order, through the `release` callback;
              `expire(now)` hands back items held past `hold_timeout_s` (the owner fails them)

Semantics (the engine's forward pass is a sequence of iterations, each running layers 0..L-1):
  - reached(iteration=i): iteration i finished, every layer of it included; the current iteration
    becomes i+1 and its layer count restarts at -1.
  - reached(layer=l): layer l of the current iteration finished.
  - Gate(iteration=i): released once iteration i finished.
  - Gate(layer=l): released once layer l of the iteration running when it was held (or any later
    point, such as the end of that iteration) finished: hold() pins it to that iteration.
  - Gate(iteration=i, layer=l): released once layer l of iteration i (or any later point) finished.
An offload gated on the iteration that wrote its blocks never reads half-written KV; layer gates let
an offload of layer l's regions start while layer l+1 is still computing.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvbm.errors import KvbmError, LifecycleError


@dataclass(frozen=True, slots=True)
class Gate:
    iteration: int | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.iteration is None and self.layer is None:
            raise KvbmError("a Gate needs an iteration, a layer or both")
        for name in ("iteration", "layer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise KvbmError(f"Gate.{name} must be an int >= 0, got {value!r}")

    def to_wire(self) -> list:
        return [self.iteration, self.layer]


class Scheduler:
    def __init__(self, release: Callable[[list[Any]], None], hold_timeout_s: float = 60.0) -> None:
        self._release = release
        self.hold_timeout_s = hold_timeout_s
        self._lock = threading.Lock()
        self._done_iteration = -1      # last iteration reported finished
        self._layer = -1               # last layer finished of iteration _done_iteration + 1
        self._held: list[tuple[Gate, Any, float]] = []   # (gate, item, deadline), in hold order
        self._closed = False           # after close(), hold() parks nothing (the owner fails the item)

    @property
    def iteration(self) -> int:
        """The iteration now running (the one after the last finished)."""
        return self._done_iteration + 1

    @property
    def layer(self) -> int:
        return self._layer

    def _open(self, gate: Gate) -> bool:
        current = self._done_iteration + 1
        if gate.iteration is not None:
            if gate.iteration < current:
                return True
            if gate.layer is None or gate.iteration > current:
                return False
            return gate.layer <= self._layer
        return gate.layer <= self._layer  # layer of the current iteration

    def hold(self, gate: Gate | None, item: Any, now: float | None = None) -> bool:
        """Parks item until gate opens or hold_timeout_s passes; False (not parked) when it is
        already open."""
        if gate is None:
            return False
        with self._lock:
            if self._closed:
                return False
            if gate.iteration is None:
                # "Layer l of the current iteration": without the iteration, reached(iteration=i)
                # resets the layer count and the gate would wait for layer l of some later one.
                gate = Gate(iteration=self._done_iteration + 1, layer=gate.layer)
            if self._open(gate):
                return False
            now = time.monotonic() if now is None else now
            self._held.append((gate, item, now + self.hold_timeout_s))
            return True

    def expire(self, now: float | None = None) -> list[Any]:
        """Removes and returns the items held past their deadline (the caller fails them)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if not any(deadline <= now for _, _, deadline in self._held):
                return []
            out = [item for _, item, deadline in self._held if deadline <= now]
            self._held = [h for h in self._held if h[2] > now]
        return out

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((deadline for _, _, deadline in self._held), default=None)

    def reached(self, iteration: int | None = None, layer: int | None = None) -> int:
        """The engine reached a point; releases what it unblocks. Returns how many were released."""
        if iteration is None and layer is None:
            raise KvbmError("reached() needs iteration= or layer=")
        with self._lock:
            if iteration is not None:
                if iteration < self._done_iteration:
                    raise LifecycleError(f"iteration {iteration} reported after iteration {self._done_iteration}")
                self._done_iteration = iteration
                self._layer = -1
            if layer is not None:
                if layer < 0:
                    raise KvbmError(f"layer must be >= 0, got {layer}")
                self._layer = max(self._layer, layer)
            keep, out = [], []
            for held in self._held:
                (out if self._open(held[0]) else keep).append(held)
            self._held = keep
        if out:
            self._release([item for _, item, _ in out])
        return len(out)

    def drop_all(self) -> list[Any]:
        with self._lock:
            items, self._held = [item for _, item, _ in self._held], []
        return items

    def close(self) -> list[Any]:
        """drop_all(), and nothing is parked from now on."""
        with self._lock:
            self._closed = True
            items, self._held = [item for _, item, _ in self._held], []
        return items

    def __len__(self) -> int:
        return len(self._held)
