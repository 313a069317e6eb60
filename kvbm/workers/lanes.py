"""A path worker's side of the shared-memory lanes (kvbm._fast.lane, issue 12).

An engine offers a lane in its register request: a 0600 segment it created, and the path of its
doorbell. The worker maps it (WorkerLane.attach: the segment must be ours and private, its header
well-formed and naming the registering engine, the bell a socket file in our runtime dir), drops
whatever a dead predecessor left in it, and from then on takes that engine's small requests from
the ring beside its ZeroMQ socket and answers them through the completion ring, ringing the
engine's bell only while the engine's I/O thread sleeps. Errors, STALE answers and a completion
the ring has no room for still go over ZeroMQ, with their text.

Parts:
  LaneItem      a request taken from a lane, queued in the worker's heap beside ZeroMQ requests
  WorkerLane    attach / take / complete / layer / close, and the worker's sleep protocol
  WorkerBell    the worker's own doorbell (kvbm.wire.bell) and the ringer for engines' bells
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from kvbm._fast.lane import DONE_LAYER, DONE_OK, Lane, LaneError
from kvbm.errors import KvbmError
from kvbm.shm import Segment
from kvbm.wire.bell import Bell, Ringer, bell_dir, check_bell_path

logger = logging.getLogger(__name__)

TAKE_LIMIT = 64        # lane requests taken per pass (the ring holds at most its slots anyway)
U32 = 0xFFFFFFFF


@dataclass(slots=True)
class LaneItem:
    lane: WorkerLane
    rid: int
    gen: int
    prio: int
    flags: int
    src: object
    dst: object


class WorkerBell:
    """This worker's doorbell (engines ring it when they post to a sleeping worker) and the one
    socket it rings engines' bells from."""

    def __init__(self, endpoint: str, label: str) -> None:
        self.dir = bell_dir(endpoint)
        self.bell = Bell(os.path.join(self.dir, f"bell-{label}.sock")) if self.dir else None
        self.ringer = Ringer()

    @property
    def path(self) -> str | None:
        return self.bell.path if self.bell else None

    def close(self) -> None:
        if self.bell is not None:
            self.bell.close()
        self.ringer.close()


class WorkerLane:
    def __init__(self, segment: Segment, ring: Lane, engine_bell: str, ringer: Ringer) -> None:
        self.segment = segment
        self.ring = ring
        self.engine_bell = engine_bell
        self.ringer = ringer
        self.broken: str | None = None

    @classmethod
    def attach(cls, offer: dict, engine: str, bells: WorkerBell) -> WorkerLane:
        if bells.dir is None or bells.bell is None:
            raise KvbmError("this worker serves a TCP endpoint: no lane (lanes need shared memory)")
        bell = check_bell_path(offer["bell"], bells.dir)
        segment = Segment.attach(offer["segment"], int(offer["size"]))
        try:
            ring = Lane(segment.address, segment.size, segment)
            if ring.engine != engine[:95]:
                raise LaneError(f"lane segment {offer['segment']} belongs to engine {ring.engine!r:.80}, "
                                f"not {engine!r:.80}")
            dropped = ring.skip()
            if dropped:
                logger.info("lane of engine %s: dropped %d request(s) meant for an earlier generation", engine, dropped)
        except BaseException:
            segment.close()
            raise
        return cls(segment, ring, bell, bells.ringer)

    def take(self) -> list[LaneItem]:
        if self.broken:
            return []
        try:
            recs = self.ring.take(TAKE_LIMIT)
        except LaneError as err:
            self._break(err)
            return []
        return [LaneItem(self, *rec) for rec in recs]

    def ring_ahead(self) -> None:
        """A flagged request's copy starts: ring a sleeping engine now (Lane.ring_engine_ahead)."""
        if not self.broken and self.ring.ring_engine_ahead() and not self._ring_engine():
            self.ring.take_engine_rung()   # no mark may stand without its ring: the DONE rings

    def complete(self, rid: int, nbytes: int, queue_us: int, copy_us: int) -> bool:
        """False when the ring had no room (the caller answers over ZeroMQ instead)."""
        return self._put(rid, DONE_OK, 0, nbytes, min(queue_us, U32), min(copy_us, U32))

    def layer(self, rid: int, layer: int) -> None:
        self._put(rid, DONE_LAYER, layer, 0, 0, 0)   # no room: the next record supersedes it

    def _put(self, rid: int, kind: int, layer: int, nbytes: int, queue_us: int, copy_us: int) -> bool:
        if self.broken:
            return False
        try:
            rc = self.ring.put_done(rid, kind, layer, nbytes, max(0, queue_us), max(0, copy_us))
        except LaneError as err:
            self._break(err)
            return False
        if rc == 2:
            self._ring_engine()
        return rc != 0

    def _ring_engine(self) -> bool:
        """False when the ring could not be sent (logged): the engine finds the record at its next
        timed turn. Never raises: a ring follows a CUDA launch, and an error there would answer a
        request whose copy is still running."""
        try:
            if self.ringer.ring(self.engine_bell):
                return True
            err = "no such bell (its engine is gone?)"
        except OSError as exc:
            err = exc
        logger.warning("ringing engine bell %s failed: %s", self.engine_bell, err)
        return False

    def _break(self, err: Exception) -> None:
        self.broken = str(err)
        logger.error("lane %s is corrupt (%s): its requests are no longer taken; the engine's requests go "
                     "over ZeroMQ once it re-registers", self.segment.name, err)

    def close(self) -> None:
        self.ringer.forget(self.engine_bell)   # engine bells are one per engine life: never rung again
        self.segment.close()
