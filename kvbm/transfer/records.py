"""The TransferManager's records of one submission, from submit() to its future's result.

Parts:
  RequestState   QUEUED -> SENT -> SETTLED (a STALE reply puts a SENT request back to QUEUED once)
  Outcome        how a submission ended, handed to its `finalize` callback: ok, the error text, and
                 whether a copy into its destination blocks may still be running
  Submission     one submit() call: its future, byte budget, priority, gate, finalize, requests
  Request        a slice of a submission of at most max_batch_blocks pairs
  WireRequest    what one xfer message carries: one request, or several queued requests of the same
                 priority coalesced (small submissions ride together)

A submission settles when every one of its requests has: all OK, or the first failure (the requests
not yet sent are settled with it and never sent).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from kvbm.transfer.futures import TransferFuture
from kvbm.transfer.scheduler import Gate
from kvbm.wire.protocol import Path


class RequestState(IntEnum):
    QUEUED = 0    # in the path's priority queue (or held by the scheduler, or incoming)
    SENT = 1      # part of a wire request at a worker
    SETTLED = 2   # done, failed, or dropped with its failed submission


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `finalize` is told. When `may_still_be_written` is set, a worker generation that was
    never reported dead may still be copying into the destination blocks: the caller must not hand
    them out again (HostTransfers leaks such host blocks rather than reuse them)."""

    ok: bool
    error: str | None = None
    may_still_be_written: bool = False


Finalize = Callable[[Outcome], Any]


@dataclass(eq=False, slots=True)
class Submission:
    path: Path
    future: TransferFuture
    nbytes: int                     # budget taken at submit, returned when it settles
    priority: int
    layers: bool                    # report per-layer progress
    gate: Gate | None
    finalize: Finalize | None
    t_submit: float
    requests: list[Request] = field(default_factory=list)
    pending: int = 0                # requests not yet settled
    error: str | None = None        # the first failure
    moved: int = 0                  # bytes of requests that completed OK
    maybe_written: bool = False     # failed while a copy into its destination may still be running

    def outcome(self) -> Outcome:
        return Outcome(self.error is None, self.error, self.maybe_written)


@dataclass(eq=False, slots=True)
class Request:
    rid: int
    sub: Submission
    src: np.ndarray
    dst: np.ndarray
    gen: int = 0                    # worker generation it was sent to
    deadline: float = 0.0           # while queued: when waiting for a worker fails it
    layers_done: int = 0
    state: RequestState = RequestState.QUEUED
    requeued: bool = False          # sent again once after a STALE reply (nothing had been copied)


@dataclass(eq=False, slots=True)
class WireRequest:
    rid: int
    members: list[Request]
    gen: int
    sent_at: float
    deadline: float
    timed_out: bool = False         # past its deadline: the manager asked for its worker's restart
    stopping: bool = False          # kvbm-workers said "stopping": failed on "died", or unsafely past deadline
