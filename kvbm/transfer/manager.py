"""TransferManager: the engine's side of the pipeline. Queues, batching, priorities, backpressure,
futures; one I/O thread owns every socket.

Parts:
  TransferFuture    (futures.py) a concurrent.futures.Future for one submission, plus layer progress
                    (`wait_layer(l)`, `add_layer_callback`) for onboards that asked for it
  TransferManager   `connect()` (hello -> welcome), `register(device, host, memory)` with every path
                    worker, `submit(path, src, dst, ...)` -> TransferFuture, `close()`

Life of a submission:
  submit   -> in-flight byte budget taken (wait with timeout, or BackpressureError when block=False
              or when called on the I/O thread, e.g. from a callback; never a silent drop) -> split into requests of <= max_batch_blocks pairs
           -> held by the Scheduler while its gate is closed (failed with "gate never opened" past
              gate_timeout_s, its budget returned) -> the path's priority queue
  I/O thread: keeps <= WINDOW requests per path at the worker (so priorities still matter), each
              tagged with the worker generation it was registered with
  worker   -> {layer} messages (progress) and one {done}; a request of a dead generation is failed
              when the supervisor publishes {event died, gen}; a request past its deadline makes the
              manager ask the supervisor to kill that generation, and fails on the died event (so no
              late write can land in blocks the caller already gave back); past HARD_DEADLINE_FACTOR
              without one, or stop_grace_s after "stopping", it fails with MAY_STILL_BE_WRITTEN in the
              text and TransferError.blocks_may_be_written set
  settle   -> once every request of the submission is settled, the budget is returned, then
              `finalize(ok, error)` runs (the host pool registers on success, releases unregistered
              on failure), and the future resolves: a result, or TransferError with the reason.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from kvbm.errors import BackpressureError, KvbmError, LayoutError, ProtocolError, TransferError
from kvbm.wire import protocol as P
from kvbm.wire.channel import connect_socket, make_context, pending
from kvbm.transfer.futures import TransferFuture, TransferResult
from kvbm.transfer.scheduler import Gate, Scheduler

logger = logging.getLogger(__name__)

WINDOW = 4               # requests outstanding per path worker
STATS_REPORT_S = 1.0     # engine -> supervisor occupancy reports
HARD_DEADLINE_FACTOR = 3  # a timed-out request whose worker never dies is failed at this multiple
SMALL_CHECK = 64         # submissions up to this many blocks are checked with plain ints
STOP_GRACE_S = 10.0       # after "stopping", how long requests at a worker wait for its "died" event
# In the error text of a request failed while its worker may still run it (hard deadline, "stopping"
# without a "died", close()): finalize() and callers must not hand the destination blocks out again.
MAY_STILL_BE_WRITTEN = "the destination blocks may still be written"
REGISTER_RETRIES = 5      # a re-registration the worker rejects is retried this often, then queued work fails
REGISTER_BACKOFF_S = 0.1  # first retry delay; doubles each retry (0.1 + 0.2 + ... + 1.6 s in all)


@dataclass(eq=False)
class _Submission:
    path: P.Path
    future: TransferFuture
    nbytes: int
    priority: int
    layers: bool
    gate: Gate | None
    finalize: Callable[[bool, str | None], Any] | None
    t_submit: float
    requests: list["_Request"] = field(default_factory=list)
    pending: int = 0
    error: str | None = None
    moved: int = 0
    maybe_written: bool = False   # failed while a copy into its destination may still be running


@dataclass(eq=False)
class _Request:
    rid: int
    sub: _Submission
    src: np.ndarray
    dst: np.ndarray
    gen: int = 0
    sent_at: float = 0.0
    deadline: float = 0.0
    layers_done: int = 0
    state: str = "queued"   # queued -> sent -> settled (or cancelled)
    requeued: bool = False  # sent again once after a STALE reply (nothing had been copied)


@dataclass(eq=False)
class _Wire:
    """One request on the wire: one or more queued requests of the same priority coalesced
    (small submissions ride together up to max_batch_blocks pairs)."""
    rid: int
    members: list[_Request]
    gen: int
    sent_at: float
    deadline: float
    timed_out: bool = False
    stopping: bool = False   # kvbm-workers said "stopping": failed on "died", or unsafely past deadline


@dataclass
class _PathState:
    path: P.Path
    endpoint: str
    sock: zmq.Socket | None = None
    gen: int = 0                  # generation announced by the supervisor
    registered_gen: int = 0       # generation our registration was accepted by (0: none)
    register_rid: int = 0
    register_error: str | None = None
    register_pending: bool = False
    register_attempts: int = 0    # rejections since the last accepted registration
    register_retry_at: float = 0.0  # when to send the next registration after a rejection (0: none)
    accepted_once: bool = False   # a first registration is answered by register(); later ones retry
    ready: threading.Event = field(default_factory=threading.Event)
    heap: list = field(default_factory=list)
    outstanding: dict[int, _Wire] = field(default_factory=dict)
    down_since: float = 0.0


class TransferManager:
    def __init__(self, control_endpoint: str, *, engine_id: str | None = None,
                 max_inflight_bytes: int = 4 << 30, max_batch_blocks: int = 256,
                 request_timeout_s: float = 30.0, stats_fn: Callable[[], dict] | None = None,
                 gate_timeout_s: float = 120.0) -> None:
        self.engine_id = engine_id or f"eng-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.control_endpoint = control_endpoint
        self.max_inflight_bytes = max_inflight_bytes
        self.max_batch_blocks = max_batch_blocks
        self.request_timeout_s = request_timeout_s
        self.stats_fn = stats_fn
        self.welcome: dict | None = None
        self.block_bytes = 0
        self.num_layers = 0
        self._ctx = make_context()
        self._control: zmq.Socket | None = None
        self._events: zmq.Socket | None = None
        self._paths: dict[P.Path, _PathState] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._lock = threading.Lock()              # incoming queue, counters
        self._incoming: list[_Request] = []
        self._budget = threading.Condition()
        self._inflight_bytes = 0
        self._register_msg: dict | None = None
        self._limits: dict[P.Path, tuple[int, int]] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False          # kvbm-workers said "stopping" and no worker started since
        self.stop_grace_s = STOP_GRACE_S
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.scheduler = Scheduler(self._release_gated, hold_timeout_s=gate_timeout_s)
        from kvbm.metrics import TransferMetrics
        self.metrics = TransferMetrics()
        self.counters = {"submitted": 0, "completed": 0, "failed": 0, "bytes": 0, "requests": 0,
                         "worker_deaths": 0, "timeouts": 0}
        self._latency_us: list[int] = []

    # ---- set-up ------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> dict:
        """hello -> welcome on the control socket; connects to the event socket and every worker."""
        self._control = connect_socket(self._ctx, zmq.DEALER, self.control_endpoint)
        self._control.send(P.encode({"t": P.MsgType.HELLO, "id": 0, "engine": self.engine_id}))
        if not self._control.poll(int(timeout * 1000)):
            self.close()
            raise KvbmError(f"kvbm-workers at {self.control_endpoint} did not answer hello within {timeout} s")
        welcome = P.decode(self._control.recv())
        if welcome.get("t") != P.MsgType.WELCOME:
            self.close()
            raise ProtocolError(f"expected welcome, got {welcome!r:.200}")
        self.welcome = welcome
        self.max_batch_blocks = max(1, min(self.max_batch_blocks, int(welcome.get("max_batch_blocks") or P.MAX_BATCH_BLOCKS)))
        self._events = connect_socket(self._ctx, zmq.SUB, welcome["events"])
        for label, info in welcome["workers"].items():
            path = P.Path(info["path"])
            state = _PathState(path, info["endpoint"], gen=int(info["gen"]))
            state.sock = connect_socket(self._ctx, zmq.DEALER, info["endpoint"])
            self._paths[path] = state
        self._thread = threading.Thread(target=self._run, name=f"kvbm-transfer-{self.engine_id}", daemon=True)
        self._thread.start()
        return welcome

    @property
    def cuda(self) -> bool:
        return bool(self.welcome and self.welcome.get("cuda"))

    def register(self, device_layout, host_layout, memory: dict, timeout: float = 30.0) -> None:
        """Hands every path worker the layouts and the device memory; waits for all of them."""
        if self._thread is None:
            raise KvbmError("register() before connect()")
        self.block_bytes = device_layout.config.block_bytes
        self.num_layers = device_layout.config.num_layers
        # Index bounds of each path's (source, destination), checked by submit().
        dev, host = int(device_layout.num_blocks), int(host_layout.num_blocks)
        self._limits = {P.Path.D2H: (dev, host), P.Path.H2D: (host, dev)}
        self._register_msg = {"t": P.MsgType.REGISTER, "engine": self.engine_id, "pid": os.getpid(),
                              "device": P.layout_to_wire(device_layout), "host": P.layout_to_wire(host_layout),
                              "memory": memory}
        for state in self._paths.values():
            state.ready.clear()
            state.registered_gen = 0
            state.register_error = None
            state.accepted_once = False
        self._wake(("register", None))
        deadline = time.monotonic() + timeout
        for state in self._paths.values():
            if not state.ready.wait(max(0.0, deadline - time.monotonic())):
                raise KvbmError(f"{state.path.label} worker did not accept the registration within {timeout} s"
                                + (f": {state.register_error}" if state.register_error else ""))
            if state.register_error:
                raise KvbmError(f"{state.path.label} worker rejected the registration: {state.register_error}")

    # ---- submit ------------------------------------------------------------------------------
    def submit(self, path: P.Path, src, dst, *, priority: int = 0, gate: Gate | None = None,
               layers: bool = False, block: bool = True, timeout: float | None = None,
               finalize: Callable[[bool, str | None], Any] | None = None) -> TransferFuture:
        """Copies block src[i] to dst[i] along `path`. The future resolves to a TransferResult, or
        fails with TransferError. `finalize(ok, error)` runs before the future resolves, once every
        byte has landed or every request has settled as failed; its return value is result.value."""
        path = P.Path(path)
        src = np.ascontiguousarray(np.asarray(src, dtype=np.int64)).reshape(-1)
        dst = np.ascontiguousarray(np.asarray(dst, dtype=np.int64)).reshape(-1)
        if src.shape != dst.shape:
            raise KvbmError(f"submit: {src.shape[0]} source blocks but {dst.shape[0]} destination blocks")
        if self._closing:
            raise TransferError("transfer manager is closed")
        future = TransferFuture(path, int(src.shape[0]), self.num_layers)
        future.set_running_or_notify_cancel()
        n = int(src.shape[0])
        nbytes = n * self.block_bytes
        sub = _Submission(path, future, nbytes, priority, layers, gate, finalize, time.monotonic())
        if n == 0:
            self._resolve(sub)
            return future
        if path in P.DISK_PATHS:
            sub.error = P.DISK_NOT_IMPLEMENTED
            self._resolve(sub)
            return future
        if path not in self._paths:
            raise KvbmError(f"no worker for path {path.label}; connect() first")
        self._check_blocks(path, src, dst)
        if threading.current_thread() is self._thread:
            # On the I/O thread (a layer or done callback, a finalize): waiting would stop the
            # very thread that returns budget.
            block = False
        self._take_budget(nbytes, block, timeout)
        for lo in range(0, n, self.max_batch_blocks):
            sub.requests.append(_Request(next(self._ids), sub, src[lo:lo + self.max_batch_blocks],
                                         dst[lo:lo + self.max_batch_blocks]))
        sub.pending = len(sub.requests)
        with self._lock:
            self.counters["submitted"] += 1
        if not self.scheduler.hold(gate, sub):
            self._wake(("submit", sub))
        return future

    def _check_blocks(self, path: P.Path, src: np.ndarray, dst: np.ndarray) -> None:
        """Before anything is queued: a bad index would make the worker reject the whole wire
        request, and with it the unrelated submissions coalesced into it."""
        # Small submissions are the common case and numpy's per-call cost would dominate them
        # (a 1-block submit paid ~4 array reductions): plain ints below SMALL_CHECK elements.
        small = src.shape[0] <= SMALL_CHECK
        limits = self._limits.get(path)
        if limits is not None:
            for name, arr, limit in (("source", src, limits[0]), ("destination", dst, limits[1])):
                values = arr.tolist() if small else None
                lo, hi = (min(values), max(values)) if small else (int(arr.min()), int(arr.max()))
                if lo < 0 or hi >= limit:
                    bad = lo if lo < 0 else hi
                    raise LayoutError(f"submit {path.label}: {name} block {bad} out of range [0, {limit})")
        distinct = len(set(dst.tolist())) if small else int(np.unique(dst).shape[0])
        if distinct != dst.shape[0]:
            raise LayoutError(f"submit {path.label}: {dst.shape[0] - distinct} destination "
                              f"block(s) named more than once; destinations must be distinct")

    def _take_budget(self, nbytes: int, block: bool, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._budget:
            # A submission larger than the whole bound goes alone rather than never.
            while self._inflight_bytes and self._inflight_bytes + nbytes > self.max_inflight_bytes:
                if not block:
                    raise BackpressureError(f"{self._inflight_bytes} bytes in flight + {nbytes} requested exceeds "
                                            f"the bound of {self.max_inflight_bytes}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BackpressureError(f"waited {timeout} s for {nbytes} bytes of in-flight budget "
                                            f"({self._inflight_bytes} of {self.max_inflight_bytes} in use)")
                self._budget.wait(remaining)
            self._inflight_bytes += nbytes

    def _return_budget(self, nbytes: int) -> None:
        with self._budget:
            self._inflight_bytes -= nbytes
            self._budget.notify_all()

    def _release_gated(self, subs: list[_Submission]) -> None:
        for sub in subs:
            self._wake(("submit", sub))

    def _wake(self, item: tuple) -> None:
        """Hands item to the I/O thread; once closing, fails a submission here instead (the I/O
        thread has drained, or is draining, _incoming for the last time; the eventfd may be
        closed). _closing changes under _lock, so no item slips in after that drain."""
        with self._lock:
            closing = self._closing
            if not closing:
                # Only the first item since the I/O thread last took the list wakes it: a burst of
                # submissions costs one eventfd write and one wake-up, not one each (each wake-up
                # makes the I/O thread contend for the GIL with the submitting thread).
                if not self._incoming:
                    os.eventfd_write(self._wake_fd, 1)
                self._incoming.append(item)
        if closing and item[0] == "submit":
            self._fail_submission(item[1], "transfer manager is closed")

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    # ---- I/O thread --------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_fd, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        by_sock = {}
        for state in self._paths.values():
            poller.register(state.sock, zmq.POLLIN)
            by_sock[state.sock] = state
        next_report = time.monotonic()
        while not self._closing:
            try:
                timeout_ms = self._poll_timeout_ms()
                ready = dict(poller.poll(timeout_ms))
                if self._wake_fd in ready:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                    self._take_incoming()
                if self._events in ready:
                    self._read_events()
                if self._control in ready:
                    self._read_control()
                for sock, state in by_sock.items():
                    if sock in ready:
                        self._read_worker(state)
                self._check_deadlines()
                for state in self._paths.values():
                    self._pump(state)
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + STATS_REPORT_S
                    self._report()
            except Exception:  # noqa: BLE001 - the I/O thread must survive anything; log and go on
                logger.exception("transfer manager I/O loop error")
        self._fail_everything("transfer manager closed")

    def _poll_timeout_ms(self) -> int:
        soonest = time.monotonic() + 0.25
        for state in self._paths.values():
            if state.register_retry_at:
                soonest = min(soonest, state.register_retry_at)
            for wire in state.outstanding.values():
                soonest = min(soonest, wire.deadline)
        return max(0, int((soonest - time.monotonic()) * 1000) + 1)

    def _take_incoming(self) -> None:
        with self._lock:
            items, self._incoming = self._incoming, []
        now = time.monotonic()
        for kind, payload in items:
            if kind == "submit":
                sub: _Submission = payload
                state = self._paths[sub.path]
                if self._stopped:
                    self._fail_submission(sub, "kvbm-workers stopped")
                    continue
                if state.register_error and state.accepted_once and not state.register_pending \
                        and not state.register_retry_at:
                    self._fail_submission(sub, state.register_error)
                    continue
                for req in sub.requests:
                    req.deadline = now + self.request_timeout_s  # covers waiting for a restarted worker too
                    heapq.heappush(state.heap, (-sub.priority, next(self._seq), req))
            elif kind == "register":
                for state in self._paths.values():
                    self._send_register(state)

    def _send_register(self, state: _PathState) -> None:
        if self._register_msg is None:
            return
        state.register_rid = next(self._ids)
        state.register_pending = True
        msg = dict(self._register_msg, id=state.register_rid)
        # A DEALER queues this while the worker is down; the next generation gets it when it binds.
        state.sock.send(P.encode(msg), zmq.NOBLOCK)

    def _pump(self, state: _PathState) -> None:
        """Sends queued requests while the worker is registered and the window has room; queued
        requests of the same priority behind the first are coalesced into it up to max_batch_blocks."""
        while state.heap and state.registered_gen and len(state.outstanding) < WINDOW:
            _, _, lead = heapq.heappop(state.heap)
            if lead.state != "queued":
                continue
            if lead.sub.error is not None:  # a sibling failed: do not start more of this submission
                self._settle(lead, None)
                continue
            members, total = [lead], int(lead.src.shape[0])
            dsts = set(lead.dst.tolist())
            while state.heap:
                _, _, nxt = state.heap[0]
                if nxt.state != "queued":
                    heapq.heappop(state.heap)
                    continue
                if (nxt.sub.priority != lead.sub.priority or nxt.sub.layers != lead.sub.layers
                        or nxt.sub.error is not None or total + nxt.src.shape[0] > self.max_batch_blocks
                        or not dsts.isdisjoint(nxt.dst.tolist())):
                    # Overlapping destinations in one wire request are refused by the worker whole.
                    break
                heapq.heappop(state.heap)
                dsts.update(nxt.dst.tolist())
                members.append(nxt)
                total += int(nxt.src.shape[0])
            gen = state.registered_gen
            rid = lead.rid if len(members) == 1 else next(self._ids)
            src = members[0].src if len(members) == 1 else np.concatenate([m.src for m in members])
            dst = members[0].dst if len(members) == 1 else np.concatenate([m.dst for m in members])
            gate = lead.sub.gate.to_wire() if lead.sub.gate else None
            msg = P.make_xfer(rid, self.engine_id, gen, state.path, src, dst, lead.sub.priority, lead.sub.layers, gate)
            try:
                state.sock.send(P.encode(msg), zmq.NOBLOCK)
            except zmq.Again:
                for m in members:
                    heapq.heappush(state.heap, (-m.sub.priority, next(self._seq), m))
                return
            now = time.monotonic()
            for m in members:
                m.state, m.gen, m.sent_at = "sent", gen, now
            state.outstanding[rid] = _Wire(rid, members, gen, now, now + self.request_timeout_s)
            with self._lock:
                self.counters["requests"] += 1

    def _settle_wire(self, state: _PathState, wire: _Wire, error: str | None) -> None:
        state.outstanding.pop(wire.rid, None)
        for m in wire.members:
            self._settle(m, error)

    def _read_worker(self, state: _PathState) -> None:
        for payload in pending(state.sock):
            try:
                msg = P.decode(payload)
                kind = msg["t"]
                if kind == P.MsgType.DONE:
                    P.validate_done(msg)
                    self._on_done(state, msg)
                elif kind == P.MsgType.LAYER:
                    wire = state.outstanding.get(msg.get("id"))
                    layer = msg.get("layer")
                    if wire is not None and isinstance(layer, int) and not isinstance(layer, bool):
                        for m in wire.members:
                            m.layers_done = max(m.layers_done, min(layer + 1, self.num_layers))
                        for sub in {id(m.sub): m.sub for m in wire.members}.values():
                            if sub.error is None:
                                self._layer_progress(sub)
                elif kind == P.MsgType.REGISTERED:
                    if msg.get("id") == state.register_rid:
                        state.register_pending = False
                        state.register_attempts = 0
                        state.register_retry_at = 0.0
                        state.register_error = None
                        state.accepted_once = True
                        state.registered_gen = int(msg["gen"])
                        state.gen = max(state.gen, state.registered_gen)
                        state.down_since = 0.0
                        state.ready.set()
                else:
                    logger.warning("%s worker sent an unexpected %r message", state.path.label, kind)
            except (ProtocolError, KeyError, TypeError, ValueError) as err:
                logger.warning("bad message from the %s worker: %s", state.path.label, err)

    def _on_done(self, state: _PathState, msg: dict) -> None:
        rid = msg["id"]
        if rid == state.register_rid and rid != 0:
            self._register_rejected(state, msg.get("error") or "registration failed")
            return
        wire = state.outstanding.get(rid)
        if wire is None:
            return  # already failed (worker death, deadline) or a stale reply
        status = P.Status(msg["status"])
        if status is P.Status.OK:
            self._record_latency(state.path, wire)
            for m in wire.members:
                m.sub.moved += int(m.src.shape[0]) * self.block_bytes
                m.layers_done = self.num_layers
            self._settle_wire(state, wire, None)
            return
        error = f"{state.path.label} worker gen {wire.gen}: {msg.get('error') or status.name}"
        if status is P.Status.STALE:
            # Never executed by the new generation; our registration is stale: register again,
            # and queue the requests again (once) for the generation that accepts it.
            if state.registered_gen == wire.gen:
                state.registered_gen = 0
                state.gen = max(state.gen, int(msg.get("gen") or 0))
                self._send_register(state)
            state.outstanding.pop(wire.rid, None)
            now = time.monotonic()
            for m in wire.members:
                if m.requeued or m.sub.error is not None:
                    self._settle(m, error if m.requeued else None)
                    continue
                m.requeued, m.state, m.layers_done = True, "queued", 0
                m.deadline = now + self.request_timeout_s
                heapq.heappush(state.heap, (-m.sub.priority, next(self._seq), m))
            return
        self._settle_wire(state, wire, error)

    def _register_rejected(self, state: _PathState, error: str) -> None:
        """The first registration's rejection goes to register(); after a restart the engine has no
        caller to tell, so it logs, retries with backoff and, past REGISTER_RETRIES, fails what waits."""
        state.register_pending = False
        if not state.accepted_once:
            state.register_error = error
            state.ready.set()
            return
        state.register_attempts += 1
        if state.register_attempts <= REGISTER_RETRIES:
            delay = REGISTER_BACKOFF_S * 2 ** (state.register_attempts - 1)
            logger.error("%s worker gen %d rejected the registration (%s); retry %d of %d in %.1f s",
                         state.path.label, state.gen, error, state.register_attempts, REGISTER_RETRIES, delay)
            state.register_retry_at = time.monotonic() + delay
            return
        state.register_error = (f"{state.path.label} worker rejected the registration "
                                f"{state.register_attempts} times: {error}")
        logger.error("%s; failing its queued transfers until a new generation starts", state.register_error)
        self._fail_queued(state, state.register_error)

    def _fail_queued(self, state: _PathState, reason: str) -> None:
        for _, _, req in list(state.heap):
            self._settle(req, reason)
        state.heap.clear()

    def _record_latency(self, path: P.Path, wire: _Wire) -> None:
        lat = int((time.monotonic() - wire.sent_at) * 1e6)
        self.metrics.latency.labels(path.label).observe(lat / 1e6)
        with self._lock:
            self._latency_us.append(lat)
            if len(self._latency_us) > 100_000:
                del self._latency_us[:50_000]

    def _layer_progress(self, sub: _Submission) -> None:
        ready = min(r.layers_done for r in sub.requests)
        sub.future._advance(ready)

    def _read_events(self) -> None:
        for payload in pending(self._events):
            try:
                msg = P.decode(payload)
            except ProtocolError as err:
                logger.warning("bad event: %s", err)
                continue
            kind, path, gen = msg.get("kind"), msg.get("path"), msg.get("gen")
            if kind == "stopping":
                self._on_stopping()
                continue
            try:
                state = self._paths[P.Path(path)]
            except (ValueError, KeyError):
                continue
            if kind == "died":
                self._worker_died(state, int(gen), msg)
            elif kind == "started" and isinstance(gen, int) and gen > state.registered_gen:
                self._stopped = False
                # Always (re)send, even with one pending: the generation it went to may have died
                # unanswered. A duplicate is harmless: only a reply to the latest register_rid counts.
                state.gen = max(state.gen, gen)
                state.register_attempts = 0
                state.register_error = None
                self._send_register(state)

    def _worker_died(self, state: _PathState, gen: int, msg: dict) -> None:
        with self._lock:
            self.counters["worker_deaths"] += 1
        self.metrics.worker_deaths.labels(state.path.label).inc()
        reason = (f"{state.path.label} worker generation {gen} (pid {msg.get('pid')}) died "
                  f"(exit code {msg.get('exitcode')}) with this transfer in flight; the blocks were not loaded")
        for wire in [w for w in state.outstanding.values() if w.gen == gen]:
            self._settle_wire(state, wire, ("timed out, then " if wire.timed_out else "") + reason)
        if state.registered_gen == gen:
            state.registered_gen = 0
            state.down_since = time.monotonic()
            self._send_register(state)
        elif state.register_pending and not state.registered_gen:
            # The registration may have gone to the generation that just died: send it again.
            self._send_register(state)
        logger.error("%s", reason)

    def _read_control(self) -> None:
        while True:
            try:
                self._control.recv(zmq.NOBLOCK)  # restart acknowledgements; nothing to do
            except zmq.Again:
                return

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for sub in self.scheduler.expire(now):
            self._fail_submission(sub, f"{sub.path.label} transfer held for {self.scheduler.hold_timeout_s:.1f} s: "
                                       f"gate {sub.gate} never opened (scheduler at iteration "
                                       f"{self.scheduler.iteration}, layer {self.scheduler.layer})")
        for state in self._paths.values():
            if state.register_retry_at and now >= state.register_retry_at:
                state.register_retry_at = 0.0
                self._send_register(state)
            for wire in list(state.outstanding.values()):
                if now < wire.deadline:
                    continue
                if wire.stopping:
                    logger.error("%s request %d: no died event for gen %d within %.1f s of stopping",
                                 state.path.label, wire.rid, wire.gen, self.stop_grace_s)
                    self._settle_unsafe(state, wire, f"kvbm-workers stopped and gen {wire.gen} was not reported "
                                                     f"dead within {self.stop_grace_s:.1f} s")
                elif not wire.timed_out:
                    # Ask for the worker to be replaced; fail on its death event, so that no late
                    # write can land in blocks the caller already reused.
                    wire.timed_out = True
                    wire.deadline = now + self.request_timeout_s * (HARD_DEADLINE_FACTOR - 1)
                    with self._lock:
                        self.counters["timeouts"] += 1
                    self.metrics.timeouts.labels(state.path.label).inc()
                    logger.error("%s request %d missed its %.1f s deadline; asking for gen %d to be replaced",
                                 state.path.label, wire.rid, self.request_timeout_s, wire.gen)
                    self._control.send(P.encode({"t": P.MsgType.RESTART, "path": int(state.path), "gen": wire.gen,
                                                 "engine": self.engine_id, "reason": f"request {wire.rid} timed out"}),
                                       zmq.NOBLOCK)
                else:
                    logger.error("%s request %d: worker gen %d neither answered nor died; failing it",
                                 state.path.label, wire.rid, wire.gen)
                    self._settle_unsafe(state, wire, f"timed out after "
                                                     f"{self.request_timeout_s * HARD_DEADLINE_FACTOR:.1f} s")
            # Queued requests waiting for a worker that does not come back.
            if state.heap and not state.registered_gen:
                for _, _, req in list(state.heap):
                    if req.state == "queued" and now >= req.deadline:
                        self._settle(req, f"{state.path.label} worker unavailable for {self.request_timeout_s:.1f} s")

    def _settle(self, req: _Request, error: str | None) -> None:
        if req.state == "settled":
            return
        req.state = "settled"
        sub = req.sub
        if error is not None and sub.error is None:
            sub.error = error
            # Siblings not yet sent will never be: settle them now (lazy removal from the heap).
            for other in sub.requests:
                if other.state == "queued" and other is not req:
                    other.state = "settled"
                    sub.pending -= 1
        sub.pending -= 1
        if sub.pending <= 0:
            self._resolve(sub)
        elif sub.layers and sub.error is None:
            self._layer_progress(sub)

    def _resolve(self, sub: _Submission) -> None:
        if sub.future.done():
            return
        ok = sub.error is None
        value, error = None, sub.error
        if sub.requests:
            # Before finalize: it takes the pool lock, and a thread holding that lock may be
            # waiting in submit() for exactly this budget.
            self._return_budget(sub.nbytes)
        if sub.finalize is not None:
            try:
                value = sub.finalize(ok, error)
            except Exception as err:  # noqa: BLE001 - surfaces to the caller through the future
                logger.error("finalize of a %s transfer failed", sub.path.label, exc_info=True)
                ok, error = False, f"finalize failed: {type(err).__name__}: {err}"
        with self._lock:
            self.counters["completed" if ok else "failed"] += 1
            if ok:
                self.counters["bytes"] += sub.moved
        label = sub.path.label
        self.metrics.transfers.labels(label, "ok" if ok else "failed").inc()
        if ok:
            self.metrics.bytes.labels(label).inc(sub.moved)
            self.metrics.blocks.labels(label).inc(sub.future.num_blocks)
        self.metrics.inflight.set(self._inflight_bytes)
        if ok:
            sub.future._advance(self.num_layers if sub.layers else 0)
            sub.future.set_result(TransferResult(sub.path, sub.future.num_blocks, sub.moved,
                                                 time.monotonic() - sub.t_submit, value))
        else:
            exc = TransferError(error or "transfer failed")
            # Callers (and finalize, through the text) must not reuse the destination blocks blindly.
            exc.blocks_may_be_written = sub.maybe_written
            sub.future.set_exception(exc)
            sub.future._wake_layers()

    def _on_stopping(self) -> None:
        """kvbm-workers is going away. What no worker holds fails now; a request at a worker fails
        on that generation's "died" event (published before or after "stopping"), so no copy can
        still write into blocks its caller was handed back, or, past stop_grace_s without one,
        fails with MAY_STILL_BE_WRITTEN."""
        reason = "kvbm-workers stopped"
        self._stopped = True
        self._fail_unsent(reason)
        now = time.monotonic()
        waiting = 0
        for state in self._paths.values():
            state.registered_gen = 0
            for wire in state.outstanding.values():
                wire.stopping = True
                wire.deadline = min(wire.deadline, now + self.stop_grace_s)
                waiting += 1
        logger.error("kvbm-workers is stopping; failed what no worker held, %d request(s) at workers wait "
                     "for their worker's death (at most %.1f s)", waiting, self.stop_grace_s)

    def _fail_unsent(self, reason: str, closing: bool = False) -> None:
        """Fails held, incoming and queued work: none of it reached a worker."""
        for sub in (self.scheduler.close() if closing else self.scheduler.drop_all()):
            self._fail_submission(sub, reason)
        with self._lock:
            items, self._incoming = self._incoming, []
        for kind, sub in items:
            if kind == "submit":
                self._fail_submission(sub, reason)
        for state in self._paths.values():
            self._fail_queued(state, reason)

    def _settle_unsafe(self, state: _PathState, wire: _Wire, why: str) -> None:
        """Fails a request whose worker generation may still be copying it."""
        for m in wire.members:
            m.sub.maybe_written = True
        self._settle_wire(state, wire, f"{state.path.label} request {wire.rid}: {why}; worker generation "
                                       f"{wire.gen} may still be running the copy: {MAY_STILL_BE_WRITTEN}")

    def _fail_everything(self, reason: str) -> None:
        """At close: nothing will read replies any more."""
        self._fail_unsent(reason, closing=True)
        for state in self._paths.values():
            for wire in list(state.outstanding.values()):
                self._settle_unsafe(state, wire, reason)
            state.registered_gen = 0

    def _fail_submission(self, sub: _Submission, reason: str) -> None:
        for req in sub.requests:
            if req.state != "settled":
                self._settle(req, reason)

    def _report(self) -> None:
        if self._control is None:
            return
        self.metrics.inflight.set(self._inflight_bytes)
        for s in self._paths.values():
            self.metrics.queued.labels(s.path.label).set(len(s.heap))
        report = {"t": P.MsgType.STATS, "engine": self.engine_id, "inflight_bytes": self._inflight_bytes,
                  "queues": {s.path.label: {"queued": len(s.heap), "outstanding": len(s.outstanding)}
                             for s in self._paths.values()},
                  "held": len(self.scheduler), "counters": dict(self.counters)}
        if self.stats_fn is not None:
            try:
                report["pools"] = self.stats_fn()
            except Exception:  # noqa: BLE001 - a report is best effort
                logger.debug("stats_fn failed", exc_info=True)
        try:
            self._control.send(P.encode(report), zmq.NOBLOCK)
        except zmq.Again:
            pass

    # ---- inspection and shutdown -----------------------------------------------------------
    def latencies_us(self) -> list[int]:
        with self._lock:
            return list(self._latency_us)

    def stats(self) -> dict:
        with self._lock:
            counters = dict(self.counters)
        return counters | {"inflight_bytes": self._inflight_bytes, "held": len(self.scheduler),
                           "queued": {s.path.label: len(s.heap) for s in self._paths.values()},
                           "generations": {s.path.label: s.registered_gen for s in self._paths.values()}}

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._closing and self._thread is None:
                return
            self._closing = True
        if self._thread is not None:
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join(timeout)
            alive = self._thread.is_alive()
            self._thread = None
            if not alive and self._register_msg is not None:
                self._unregister(min(timeout, 1.0))
                _collect_cuda_ipc()
        for state in self._paths.values():
            if state.sock is not None:
                state.sock.close(0)
                state.sock = None
        for sock in (self._control, self._events):
            if sock is not None:
                sock.close(0)
        self._control = self._events = None
        self._ctx.term()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def _unregister(self, timeout: float) -> None:
        """Asks every worker to drop this engine's mappings; bounded wait, best effort."""
        deadline = time.monotonic() + timeout
        for state in self._paths.values():
            if state.sock is None:
                continue
            try:
                state.sock.send(P.encode({"t": P.MsgType.UNREGISTER, "id": 0, "engine": self.engine_id}), zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            while (left := deadline - time.monotonic()) > 0 and state.sock.poll(int(left * 1000) + 1):
                try:
                    reply = P.decode(state.sock.recv(zmq.NOBLOCK))
                except (zmq.Again, ProtocolError):
                    continue
                if reply.get("t") == P.MsgType.PONG and "dropped" in reply:
                    break

    def __enter__(self) -> "TransferManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _collect_cuda_ipc() -> None:
    """Once the workers dropped their CUDA IPC mappings of our KV tensors, let torch free its
    bookkeeping of those shares; otherwise it warns at exit that a consumer still holds them."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.ipc_collect()
