"""EngineLane: the engine's side of one path's shared-memory lane (kvbm._fast.lane, issue 12).

What it buys: a small submission is written into the lane by the thread that submits it, and the
worker answers into the lane, so a round trip has no msgpack, no ZeroMQ I/O threads and no hand-off
to the TransferManager's I/O thread on the way out. The I/O thread still settles every request
(budget, finalize, future), so everything after a completion is as before.

Parts and order:
  create     at register(): a 0600 segment kvbm-<instance>-lane-<pid>-<n> (held with a shared flock,
             so a sweep removes it only once this process is dead), formatted; offered to the
             worker in the register request with the path of the engine's doorbell
  accepted   the worker's `registered` reply says it mapped the lane and names its own doorbell;
             the lane serves that worker generation only (`gen`)
  post       from the submitting thread, under `lock`: the WireRequest goes into `posted` first,
             then the record into the ring, so that the I/O thread, which moves `posted` into the
             path's outstanding requests before it reads completions, always finds it; a full ring
             posts nothing (the caller takes the ZeroMQ way)
  completions  the I/O thread's take_done(); it sleeps only after telling the lane (engine_sleep); or
             a thread waiting on a small request's result(), between the I/O thread's turns
  close      unlink; a killed engine's lanes are swept with its device segments (kvbm.shm)
"""
from __future__ import annotations

import itertools
import logging
import os
import threading

from kvbm._fast.lane import FLAG_LAYERS, FLAG_RING_AHEAD, Lane, LaneError, bytes_needed
from kvbm.shm import Segment, segment_name
from kvbm.transfer.records import RequestState, WireRequest
from kvbm.wire.bell import Ringer

logger = logging.getLogger(__name__)

REQ_SLOTS = 64       # lane requests in flight per path (a bound of its own, beside WINDOW's ZeroMQ one)
DONE_SLOTS = 256     # completions (>= 2 x REQ_SLOTS: a DONE always finds room, layer records leave room)
_seq = itertools.count()


class EngineLane:
    def __init__(self, instance_id: str, engine_id: str, max_blocks: int) -> None:
        size = bytes_needed(REQ_SLOTS, DONE_SLOTS, max_blocks)
        self.segment = Segment.create(segment_name(instance_id, f"lane-{os.getpid()}-{next(_seq)}"), size)
        try:
            self.segment.hold()
            self.ring = Lane.init(self.segment.address, size, engine_id, REQ_SLOTS, DONE_SLOTS, max_blocks,
                                  self.segment)
        except BaseException:
            self.segment.close()
            self.segment.unlink()
            raise
        self.max_blocks = max_blocks
        # Guards `posted` and the ring's producer side; with the I/O thread's window check and its
        # move of posted wires into the path's outstanding ones, so that a submitting thread never
        # sees the window emptier than it is (re-entrant: _pump posts while holding it).
        self.lock = threading.RLock()
        self.posted: list[WireRequest] = []    # posted, not yet seen by the I/O thread
        self.gen = 0                  # worker generation that mapped this lane (0: none yet)
        self.worker_bell: str | None = None
        self.broken: str | None = None   # a completion ring we could not read: no more posts
        self.waiter_settled = 0          # results settled by their waiting thread (TransferManager._settle_waiting)
        self.unread: list = []           # completions taken off the ring, not settled (an interrupted reader)
        self.closed = False              # the manager's last take_posted is done: nothing more is posted

    def offer(self, bell: str) -> dict:
        return {"segment": self.segment.name, "size": self.segment.size, "bell": bell}

    def post(self, wire: WireRequest, ringer: Ringer, outstanding: dict, window: int, ahead: bool = False) -> bool:
        """False: the window (`outstanding` requests of the path and those posted here) is full,
        or the ring is; nothing posted, the caller queues it. `ahead`: the worker rings our bell
        when the copy starts, if the I/O thread sleeps (no thread waits on the lane for it)."""
        req = wire.members[0]
        sub = req.sub
        with self.lock:
            if self.closed or len(outstanding) + len(self.posted) >= window:
                return False
            self.posted.append(wire)
            rc = self._write(wire.rid, wire.gen, sub.priority,
                             (FLAG_LAYERS if sub.layers else 0) | (FLAG_RING_AHEAD if ahead else 0), req.src, req.dst)
            if rc == 0:
                self.posted.pop()
                return False
            req.state, req.gen = RequestState.SENT, wire.gen
        self._wake(rc, ringer)
        return True

    def post_wire(self, rid: int, gen: int, priority: int, layers: bool, src, dst, ringer: Ringer) -> bool:
        """The I/O thread's send of a (possibly coalesced) queued request; False: the ring is full."""
        with self.lock:
            rc = 0 if self.closed else self._write(rid, gen, priority, FLAG_LAYERS if layers else 0, src, dst)
        self._wake(rc, ringer)
        return rc != 0

    def _write(self, rid: int, gen: int, priority: int, flags: int, src, dst) -> int:
        """The ring's answer to one record (under the lock): 0 full, or blocks it cannot hold (the
        queue's way then), 1 posted, 2 posted while the worker sleeps."""
        try:
            return self.ring.post(rid, gen, priority, flags, src, dst)
        except (LaneError, ValueError) as err:
            logger.debug("lane post refused: %s", err)
            return 0

    def _wake(self, rc: int, ringer: Ringer) -> None:
        """Rings the worker's bell after a post it slept through (outside the lock: a syscall).
        Never raises: the record is posted, so the request is the I/O thread's to settle whatever
        happens here; a ring that could not be sent (logged) leaves the worker to its next wake-up
        (another ring, a ZeroMQ message, or its timed poll), and the request its deadline."""
        if rc == 2 and self.worker_bell is not None:
            try:
                ringer.ring(self.worker_bell)
            except OSError as err:
                logger.warning("ringing worker bell %s failed: %s", self.worker_bell, err)

    def take_posted(self, into: dict | None = None, final: bool = False) -> list[WireRequest]:
        """The wires posted since the last call, moved into `into` (the path's outstanding
        requests) under the lock. `final`: the manager's last take at close; posts after it are
        refused (they take the queue's way, which fails them as closed), so none lands in a lane
        that no one reads any more, or that is about to be unmapped."""
        with self.lock:
            self.closed |= final
            posted, self.posted = self.posted, []
            if into is not None:
                into.update((w.rid, w) for w in posted)
        return posted

    def close(self) -> None:
        self.segment.close()
        self.segment.unlink()
