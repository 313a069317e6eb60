"""PathLink: the engine's registration with one path worker, across the worker's generations.

A path worker only runs requests of an engine that registered with it (layouts and memory), and
every restart of the worker (a new generation) forgets those registrations. The link tracks which
generation accepted ours and decides when to (re)send it. It owns no socket and no queue: each
event method answers whether the manager must send a registration now, and the manager sends it
(`begin_register(rid)` records the id of the one it sent; only the reply to that id counts).

States (LinkState, derived from the fields):
  DOWN         nothing accepted, nothing on its way (before register(); after "stopping")
  REGISTERING  a registration is on its way (a DEALER queues it while the worker is down)
  READY        generation `registered_gen` accepted it: requests may be sent
  BACKOFF      a re-registration after a restart was rejected: retry at `retry_at`
  REJECTED     the first registration was rejected (register() raises it), or re-registrations
               were rejected REGISTER_RETRIES times: queued and new work on this path fails until
               a new generation starts

Events: started(gen) from the supervisor's event socket, accepted/rejected from the worker's reply,
died(gen), stale(gen) (the worker answered a request for a generation it is not), stopped(), and
retry_due(now) from the manager's clock.
"""
from __future__ import annotations

import logging
import threading
import time
from enum import IntEnum

from kvbm.wire.protocol import Path

logger = logging.getLogger(__name__)

REGISTER_RETRIES = 5      # a re-registration the worker rejects is retried this often, then queued work fails
REGISTER_BACKOFF_S = 0.1  # first retry delay; doubles each retry (0.1 + 0.2 + ... + 1.6 s in all)


class LinkState(IntEnum):
    DOWN = 0
    REGISTERING = 1
    READY = 2
    BACKOFF = 3
    REJECTED = 4


class PathLink:
    def __init__(self, path: Path, gen: int = 0) -> None:
        self.path = path
        self.gen = gen                 # newest generation announced by the supervisor
        self.sent_gen = 0              # self.gen when the pending registration was sent
        self.registered_gen = 0        # generation our registration was accepted by (0: none)
        self.rid = 0                   # id of the registration last sent
        self.pending = False           # that registration has not been answered yet
        self.error: str | None = None  # why it was rejected
        self.attempts = 0              # rejections since the last accepted registration
        self.retry_at = 0.0            # when to send the next registration after a rejection (0: none)
        self.accepted_once = False     # a first registration is answered by register(); later ones retry
        self.ready = threading.Event()  # the first registration was answered (accepted or rejected)

    @property
    def state(self) -> LinkState:
        if self.registered_gen:
            return LinkState.READY
        if self.pending:
            return LinkState.REGISTERING
        if self.retry_at:
            return LinkState.BACKOFF
        if self.error is not None:
            return LinkState.REJECTED
        return LinkState.DOWN

    @property
    def refuses_work(self) -> bool:
        """Rejected past its retries after a restart: new work fails at once rather than wait for a
        deadline (a first rejection is register()'s to raise)."""
        return self.accepted_once and self.error is not None and not self.pending and not self.retry_at

    # ---- the manager's actions -------------------------------------------------------------
    def reset(self) -> None:
        """register() is called (again): the next answer goes to it."""
        self.ready.clear()
        self.registered_gen = 0
        self.error = None
        self.accepted_once = False

    def begin_register(self, rid: int) -> None:
        self.rid = rid
        self.pending = True
        self.sent_gen = self.gen        # the newest generation known when it was sent

    # ---- events: each returns True when a registration must be sent now --------------------
    def accepted(self, rid: int, gen: int) -> bool:
        """A `registered` reply; only the one to the latest registration counts."""
        if rid != self.rid:
            return False
        self.pending = False
        self.attempts = 0
        self.retry_at = 0.0
        self.error = None
        self.accepted_once = True
        self.registered_gen = gen
        self.gen = max(self.gen, gen)
        self.ready.set()
        return False

    def rejected(self, error: str, now: float | None = None) -> bool:
        """The worker refused the latest registration. The first refusal goes to register(); after a
        restart nobody waits, so retry with backoff, then refuse work (the manager fails the queue
        when the state becomes REJECTED)."""
        self.pending = False
        if not self.accepted_once:
            self.error = error
            self.ready.set()
            return False
        self.attempts += 1
        if self.attempts <= REGISTER_RETRIES:
            delay = REGISTER_BACKOFF_S * 2 ** (self.attempts - 1)
            logger.error("%s worker gen %d rejected the registration (%s); retry %d of %d in %.1f s",
                         self.path.label, self.gen, error, self.attempts, REGISTER_RETRIES, delay)
            self.retry_at = (time.monotonic() if now is None else now) + delay
            return False
        self.error = f"{self.path.label} worker rejected the registration {self.attempts} times: {error}"
        logger.error("%s; failing its queued transfers until a new generation starts", self.error)
        return False

    def started(self, gen: int) -> bool:
        """A new generation is up: (re)send, even with one pending, unless the pending one was sent
        when this generation was already known (the supervisor's `started` of the generation the
        welcome named arrives after connect: a second registration would make the worker map the
        engine's memory twice for nothing). A generation that died unanswered is died()'s to resend."""
        if gen <= self.registered_gen or (self.pending and gen <= self.sent_gen):
            return False
        self.gen = max(self.gen, gen)
        self.attempts = 0
        self.error = None
        return True

    def died(self, gen: int) -> bool:
        if self.registered_gen == gen:
            self.registered_gen = 0
            return True
        # The registration may have gone to the generation that just died: send it again.
        return self.pending and not self.registered_gen

    def stale(self, wire_gen: int, worker_gen: int) -> bool:
        """The worker answered STALE to a request sent under `wire_gen`: it is generation
        `worker_gen` and never saw our registration."""
        if self.registered_gen != wire_gen:
            return False
        self.registered_gen = 0
        self.gen = max(self.gen, worker_gen)
        return True

    def stopped(self) -> None:
        """kvbm-workers is going away: nothing is sent until a generation starts again."""
        self.registered_gen = 0

    def retry_due(self, now: float) -> bool:
        if self.retry_at and now >= self.retry_at:
            self.retry_at = 0.0
            return True
        return False
