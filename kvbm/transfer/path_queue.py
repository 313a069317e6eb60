"""PathQueue: one path worker as the TransferManager's I/O thread sees it.

It holds the link (our registration, kvbm.transfer.link), the socket, the priority queue of requests
waiting to be sent and the wire requests at the worker. Sending coalesces: queued requests of the
same priority and progress mode behind the first ride in one wire request up to max_batch_blocks
pairs, as long as their destinations do not overlap (the worker refuses such a request whole) and
their message fields (Submission.meta) are equal, and neither submission asked to go alone
(Submission.alone: the chunks of a pipelined G3 onboard, each of which must land on its own).
Only the I/O thread touches it.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import zmq

from kvbm.transfer.lane import EngineLane
from kvbm.transfer.link import PathLink
from kvbm.transfer.records import Request, RequestState, WireRequest
from kvbm.wire.protocol import Path

_seq = itertools.count()   # FIFO among equal priorities


@dataclass(eq=False)
class PathQueue:
    link: PathLink
    endpoint: str
    sock: zmq.Socket
    heap: list = field(default_factory=list)            # (-priority, seq, Request)
    outstanding: dict[int, WireRequest] = field(default_factory=dict)
    worker_fds: dict[int, int] = field(default_factory=dict)  # gen -> pidfd of the worker that registered us
    info: dict = field(default_factory=dict)   # what the worker's last `registered` said of itself (disk: store)
    lane: EngineLane | None = None    # the shared-memory lane to this worker (kvbm.transfer.lane)

    @property
    def path(self) -> Path:
        return self.link.path

    def push(self, req: Request) -> None:
        heapq.heappush(self.heap, (-req.sub.priority, next(_seq), req))

    def pop_lead(self) -> Request | None:
        """The next request still QUEUED (settled ones are dropped lazily here)."""
        while self.heap:
            _, _, req = heapq.heappop(self.heap)
            if req.state is RequestState.QUEUED:
                return req
        return None

    def coalesce(self, lead: Request, max_blocks: int) -> list[Request]:
        """lead and the queued requests right behind it that may share its wire request."""
        members, total = [lead], len(lead.src)
        dsts = set(lead.dst.tolist())
        while self.heap:
            _, _, nxt = self.heap[0]
            if nxt.state is not RequestState.QUEUED:
                heapq.heappop(self.heap)
                continue
            if (lead.sub.alone or nxt.sub.alone
                    or nxt.sub.priority != lead.sub.priority or nxt.sub.layers != lead.sub.layers
                    or nxt.sub.meta != lead.sub.meta or (nxt.extra is None) != (lead.extra is None)
                    or nxt.sub.error is not None or total + len(nxt.src) > max_blocks
                    or not dsts.isdisjoint(nxt.dst.tolist())):
                break
            heapq.heappop(self.heap)
            dsts.update(nxt.dst.tolist())
            members.append(nxt)
            total += len(nxt.src)
        return members

    def queued_past(self, now: float) -> list[Request]:
        """Queued requests whose wait for a (re)registered worker has run out."""
        return [req for _, _, req in self.heap if req.state is RequestState.QUEUED and now >= req.deadline]

    def drain(self) -> list[Request]:
        reqs = [req for _, _, req in self.heap]
        self.heap.clear()
        return reqs
