"""The TransferManager's records of one submission, from submit() to its future's result.

Parts:
  RequestState   QUEUED -> SENT -> SETTLED (a STALE reply puts a SENT request back to QUEUED once)
  Outcome        how a submission ended, handed to its `finalize` callback: ok, the error text,
                 whether a copy into its destination blocks may still be running, and what the
                 workers said per block (a disk request's outcome and checksums)
  Submission     one submit() call: its future, byte budget, priority, gate, finalize, requests
  Request        a slice of a submission of at most max_batch_blocks pairs
  WireRequest    what one xfer message carries: one request, or several queued requests of the same
                 priority coalesced (small submissions ride together)

A submission settles when every one of its requests has: all OK, or the first failure (the requests
not yet sent are settled with it and never sent).
"""
from __future__ import annotations

from array import array
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
    # Per-block arrays of the replies (protocol.BLOCK_FIELDS, in submission order) and the sums of
    # their numbers ("copy_us", "bytes"), when every request of the submission was answered.
    detail: dict[str, Any] | None = None


Finalize = Callable[[Outcome], Any]
# Block indices of a request: a flat int64 ndarray, or an array('q') for a short list (cheaper to
# build, check and pack than a numpy array of a few items).
Blocks = np.ndarray | array


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
    meta: dict[str, Any] | None = None   # message fields every wire request of it carries (disk reads: peers)
    charged: bool = True            # took in-flight budget (a chained part runs on its predecessor's)
    alone: bool = False             # never coalesced with another submission's requests (a pipelined chunk)

    def outcome(self) -> Outcome:
        return Outcome(self.error is None, self.error, self.maybe_written, self._detail())

    def _detail(self) -> dict[str, Any] | None:
        parts = [r.detail for r in self.requests]
        if not parts or any(p is None for p in parts):
            return None
        out: dict[str, Any] = {}
        for key in parts[0]:
            values = [p.get(key) for p in parts]
            if all(isinstance(v, np.ndarray) for v in values):
                out[key] = np.concatenate(values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out[key] = sum(values)
            else:
                out[key] = values[-1]
        return out


@dataclass(eq=False, slots=True)
class Request:
    rid: int
    sub: Submission
    src: Blocks
    dst: Blocks
    gen: int = 0                    # worker generation it was sent to
    deadline: float = 0.0           # while queued: when waiting for a worker fails it
    layers_done: int = 0
    state: RequestState = RequestState.QUEUED
    requeued: bool = False          # sent again once after a STALE reply (nothing had been copied)
    extra: dict[str, np.ndarray] | None = None   # per-block arrays sent with it (protocol.BLOCK_FIELDS)
    detail: dict[str, Any] | None = None         # what its reply said beyond the status (its slice)


@dataclass(eq=False, slots=True)
class WireRequest:
    rid: int
    members: list[Request]
    gen: int
    sent_at: float
    deadline: float
    timed_out: bool = False         # past its deadline: the manager asked for its worker's restart
    stopping: bool = False          # kvbm-workers said "stopping": failed on "died", or unsafely past deadline
