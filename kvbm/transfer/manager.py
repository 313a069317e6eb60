"""TransferManager: the engine's side of the pipeline. Submit API, per-path queues and the one I/O
thread that owns every socket.

Parts (each concept in its own module):
  records.py   Submission / Request / WireRequest, RequestState, Outcome (what finalize is told)
  path_queue   PathQueue: one path's link, socket, priority queue (coalescing) and requests at the worker
  lane.py      EngineLane: the path's shared-memory lane (small requests posted from the submitting
               thread while the queue is empty and the window has room; completions read by the
               I/O thread, which sleeps on its doorbell only after telling every lane, or by a
               thread waiting on a small request's result(), see _settle_waiting)
  link.py      PathLink: our registration with one path worker across its generations
  budget.py    InflightBudget: the bound on bytes in flight (backpressure)
  futures.py   TransferFuture (layer progress) and TransferResult
  metrics      kvbm.metrics.TransferMetrics: the one accounting; stats() reads it
  settle.py    Settlement: a request settles, its submission resolves (budget, finalize, future)
  here         TransferManager: connect / register / submit / close, and the I/O loop

Life of a submission:
  submit   -> in-flight byte budget taken (wait with timeout, or BackpressureError when block=False
              or when called on the I/O thread, e.g. from a callback; never a silent drop) -> split
              into requests of <= max_batch_blocks pairs
           -> held by the Scheduler while its gate is closed (failed with "gate never opened" past
              gate_timeout_s, its budget returned) -> the path's priority queue
  I/O thread: keeps <= WINDOW wire requests per path at the worker (so priorities still matter),
              each tagged with the worker generation that accepted our registration
  worker   -> {layer} messages (progress) and one {done}; a request of a dead generation is failed
              when the supervisor publishes {event died, gen}; a request past its deadline makes the
              manager ask the supervisor to kill that generation, and fails on the died event (so no
              late write can land in blocks the caller already gave back); past HARD_DEADLINE_FACTOR
              without one, or stop_grace_s after "stopping", it fails with Outcome.may_still_be_written
              and TransferError.blocks_may_be_written set
  settle   -> once every request of the submission is settled, the budget is returned, then
              `finalize(outcome)` runs (the host pool registers on success, releases unregistered
              on failure), and the future resolves: a result, or TransferError with the reason.

Disk paths (H2DISK, DISK2H) go to the one disk worker, as any path does (two queues, one process):
their requests carry per-block arrays (`extra`: sequence hashes, expected checksums, owners) and
message fields (`meta`), and their replies per-block outcomes, which finalize finds in
Outcome.detail. `ask(path, msg, on_reply)` sends a non-transfer request (the disk worker's
entries) and hands every reply with its id to on_reply, on the I/O thread. A submission chained
on another one's completion (`charge=False`) runs on its predecessor's budget.

Death of kvbm-workers itself: the manager holds a pidfd of the supervisor (polled by the I/O thread
with the sockets), so a SIGKILLed supervisor is noticed at once, not by deadlines. What no worker
holds fails then; new work is refused (LifecycleError). A request at a worker fails once that
worker's process is seen gone too (a pidfd opened when its generation accepted our registration;
path workers die with their supervisor, PR_SET_PDEATHSIG), so its blocks may be reused safely; a
worker not seen gone within min(stop_grace_s, request_timeout_s) fails its requests with
may_still_be_written.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from array import array
from collections import Counter
from functools import partial

import numpy as np
import zmq

from kvbm._fast.lane import DONE_LAYER, DONE_OK, LaneError, eventfd_kick
from kvbm._fast.lane import spin as spin_lanes
from kvbm.errors import KvbmError, KvbmTimeoutError, LayoutError, LifecycleError, ProtocolError, TransferError
from kvbm.metrics import TransferMetrics
from kvbm.transfer.budget import InflightBudget
from kvbm.transfer.futures import TransferFuture
from kvbm.transfer.lane import EngineLane
from kvbm.transfer.link import PathLink
from kvbm.transfer.memory_map import HeldShares
from kvbm.transfer.path_queue import PathQueue
from kvbm.transfer.records import Blocks, Finalize, Request, RequestState, Submission, WireRequest
from kvbm.transfer.scheduler import Gate, Scheduler
from kvbm.transfer.settle import Settlement
from kvbm.wire import protocol as P
from kvbm.wire.auth import ClientKeys
from kvbm.wire.bell import Bell, Ringer, bell_dir, check_bell_path
from kvbm.wire.channel import connect_socket, make_context, pending

logger = logging.getLogger(__name__)

# Wire requests outstanding per path worker. 8 rather than 4: with 4, a worker copying 32 MiB
# requests (64 blocks of 512 KiB, ~0.65 ms each on an H200) had ~2.6 ms of work queued, less than
# the 5 ms an engine thread busy submitting may hold the GIL before the I/O thread that settles
# DONEs and sends more gets it. Batch 64 offload on an H200 read 89 and 96 % of the copy alone with
# 4, 91-101 % over five runs with 8: weak evidence, kept because nothing read worse (bench/RESULTS.md,
# issue 12). The worker orders what waits by priority, so priorities still hold.
WINDOW = 8
STATS_REPORT_S = 1.0     # engine -> supervisor occupancy reports
HARD_DEADLINE_FACTOR = 3  # a timed-out request whose worker never dies is failed at this multiple
SMALL_CHECK = 64         # submissions up to this many blocks are checked with plain ints
# A result() waiter settles its own lane request (_settle_waiting) only for requests up to this
# size: a copy of it takes tens of microseconds, what the spin is for; a larger one's waiter sleeps.
WAIT_SPIN_BYTES = 4 << 20
WAIT_SPIN_SLICE_US = 50.0   # the waiter's spin checks its future (done by the I/O thread?) this often
# Lane requests up to this size, settled by the I/O thread, ask their worker to ring ahead of the
# DONE (FLAG_RING_AHEAD); the I/O thread, so rung, spins up to AHEAD_SPIN_US for it (a 512 KiB
# block copy takes ~65 us on one core of the 2-core CI machine; a slower one's DONE rings as usual
# once the spin ends). 300 us measured a worse p99 there than 150 (a spinning thread on 2 cores).
RING_AHEAD_BYTES = 1 << 20
AHEAD_SPIN_US = 150.0
STOP_GRACE_S = 10.0       # after "stopping", how long requests at a worker wait for its "died" event
QUEUED, SENT, SETTLED = RequestState.QUEUED, RequestState.SENT, RequestState.SETTLED


class TransferManager:
    def __init__(self, control_endpoint: str, *, engine_id: str | None = None,
                 max_inflight_bytes: int = 4 << 30, max_batch_blocks: int = 256,
                 request_timeout_s: float = 30.0, stats_fn=None, gate_timeout_s: float = 120.0,
                 supervisor_pid: int | None = None, keys: ClientKeys | None = None, lanes: bool = True,
                 lane_spin_us: int = 0, wait_spin_us: int = 0) -> None:
        self.engine_id = engine_id or f"eng-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.control_endpoint = control_endpoint
        # CURVE keys of the instance (kvbm.wire.auth; None only for a test's plain fake server), and
        # the routing id of every socket of ours: workers bind our registration to it, the supervisor
        # our restart requests, and it survives a reconnect (a made-up one would not).
        self._keys = keys
        self._routing_id = b"kvbm-" + secrets.token_hex(16).encode()
        self.max_batch_blocks = max_batch_blocks
        self.request_timeout_s = request_timeout_s
        self.stats_fn = stats_fn
        self.welcome: dict | None = None
        self.block_bytes = 0
        self.num_layers = 0
        self.budget = InflightBudget(max_inflight_bytes)
        self.metrics = TransferMetrics()
        self.metrics.inflight.set_function(lambda: self.budget.used)   # read when scraped
        self._settlement = Settlement(self.budget, self.metrics)
        self.scheduler = Scheduler(self._release_gated, hold_timeout_s=gate_timeout_s)
        self.stop_grace_s = STOP_GRACE_S
        self._ctx = make_context()
        self._control: zmq.Socket | None = None
        self._events: zmq.Socket | None = None
        self._paths: dict[P.Path, PathQueue] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()              # _incoming, _register_asked, _closing
        self._incoming: list[Submission] = []
        self._register_asked = False
        self._register_msg: dict | None = None
        self._registered: frozenset[P.Path] = frozenset()   # the paths register() registered with
        # CUDA: each registration message's memory description has shares of its own
        # (memory_map.worker_memory), tracked per path until released (memory_map.HeldShares).
        self._held_shares: dict[P.Path, HeldShares] = {}
        self._limits: dict[P.Path, tuple[int, int]] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False          # kvbm-workers said "stopping" and no worker started since
        self.supervisor_pid = supervisor_pid  # None: the pid its welcome names
        self._supervisor_fd = -1       # pidfd of the supervisor: readable once it is gone
        self._dead: str | None = None  # "kvbm-workers (pid N) died": no new work from then on
        self._poller: zmq.Poller | None = None
        self._watched: dict[int, tuple[PathQueue, int]] = {}  # worker pidfd -> (path, gen), once the supervisor died
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._next_tick = 0.0          # I/O thread: when _check_deadlines runs next (_soonest, _due)
        self.unregistered = False      # close(): every worker said it dropped this engine's mappings
        self._asks: dict[int, object] = {}           # rid -> on_reply of ask(), while its replies come
        self._outgoing: list[tuple[P.Path, dict]] = []  # ask() messages for the I/O thread to send
        # Shared-memory lanes (kvbm.transfer.lane): one per device path, offered at register();
        # our doorbell (the workers ring it while the I/O thread sleeps) and the socket that rings theirs.
        self.use_lanes = lanes
        self.lane_spin_us = max(0, lane_spin_us)   # the I/O thread's spin on completions (KvbmConfig)
        self.wait_spin_us = max(0, wait_spin_us)   # a result() waiter's spin on its lane (KvbmConfig)
        # Held by the I/O thread for every turn of its loop but the poll: a waiting thread that
        # takes it (_settle_waiting) may read a lane and settle, as the I/O thread would.
        self._io_lock = threading.Lock()
        self._settler: threading.Thread | None = None   # the waiter holding _io_lock, while it settles
        self._settler_ident = -1       # its ident, and the I/O thread's: submit() compares idents
        self._io_ident = -1
        self._spinners = 0     # waiters spinning on a lane (under _lock): close() unmaps lanes after them
        self._bell: Bell | None = None
        self._ringer: Ringer | None = None
        self._bell_dir: str | None = None

    # ---- set-up ------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> dict:
        """hello -> welcome on the control socket; connects to the event socket and every worker."""
        self._control = connect_socket(self._ctx, zmq.DEALER, self.control_endpoint, self._keys, self._routing_id)
        self._control.send(P.encode({"t": P.MsgType.HELLO, "id": 0, "engine": self.engine_id}))
        if not self._control.poll(int(timeout * 1000)):
            self.close()
            raise KvbmTimeoutError(f"kvbm-workers at {self.control_endpoint} did not answer hello within {timeout} s")
        welcome = P.decode(self._control.recv())
        if welcome.get("t") != P.MsgType.WELCOME:
            self.close()
            raise ProtocolError(f"expected welcome, got {welcome!r:.200}")
        self.welcome = welcome
        self._watch_supervisor(welcome)
        cap = int(welcome.get("max_batch_blocks") or P.MAX_BATCH_BLOCKS)
        self.max_batch_blocks = max(1, min(self.max_batch_blocks, cap))
        self._events = connect_socket(self._ctx, zmq.SUB, welcome["events"], self._keys)
        for info in welcome["workers"].values():
            path = P.Path(info["path"])
            # The disk worker serves two paths at one endpoint: one socket each, and a ROUTER takes
            # only one connection per routing id, so theirs carry the path (P.connection_of).
            rid = self._routing_id + b"/" + path.label.encode() if path in P.DISK_PATHS else self._routing_id
            sock = connect_socket(self._ctx, zmq.DEALER, info["endpoint"], self._keys, rid)
            self._paths[path] = PathQueue(PathLink(path, gen=int(info["gen"])), info["endpoint"], sock)
        self._open_bell(welcome)
        self._thread = threading.Thread(target=self._run, name=f"kvbm-transfer-{self.engine_id}", daemon=True)
        self._thread.start()
        return welcome

    def _open_bell(self, welcome: dict) -> None:
        """Our doorbell beside the workers' ipc endpoints (no lanes over TCP: no shared memory)."""
        if not self.use_lanes or not isinstance(welcome.get("instance"), str):
            return
        dirs = {bell_dir(info["endpoint"]) for info in welcome["workers"].values()
                if P.Path(info["path"]) in P.WORKER_PATHS}
        if len(dirs) != 1 or None in dirs:
            return
        self._bell_dir = dirs.pop()
        try:
            self._bell = Bell(os.path.join(self._bell_dir, f"bell-e{os.getpid()}-{secrets.token_hex(4)}.sock"))
        except OSError as err:
            logger.warning("no transfer lanes: cannot bind a doorbell in %s (%s)", self._bell_dir, err)
            return
        self._ringer = Ringer()

    def _watch_supervisor(self, welcome: dict) -> None:
        pid = self.supervisor_pid or welcome.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            logger.warning("kvbm-workers did not say its pid: its death is noticed only by request deadlines")
            return
        self.supervisor_pid = pid
        try:
            self._supervisor_fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._dead = f"kvbm-workers (pid {pid}) died"  # between its welcome and now
        except OSError as err:
            logger.warning("cannot watch kvbm-workers pid %d (%s): its death is noticed only by request "
                           "deadlines", pid, err)

    @property
    def cuda(self) -> bool:
        return bool(self.welcome and self.welcome.get("cuda"))

    def register(self, device_layout, host_layout, memory: dict | None, timeout: float = 30.0,
                 disk: dict | None = None, *, group: str = "", host_offset: int = 0,
                 paths=None) -> None:
        """Hands every path worker the layouts and the device memory; waits for all of them.
        `disk`: the G3 store the disk worker opens ({blocks, fingerprint, model, cold}).
        `group`: the engine this is a TP rank of (its ranks share the workers); `host_offset`: the
        byte of the G2 segment where this registration's host layout starts. `paths`: register with
        these paths' workers only (default: every path kvbm-workers serves); a submission to another
        path is refused. `memory` None: no device memory (only for the disk paths, whose worker
        maps none: a metadata-only engine, such as the vLLM connector's scheduler side). `memory` a
        callable: called for each registration message of a device path, for a description of its
        own (CUDA IPC: torch counts one consumer per share, and each worker releases what it opened:
        one share read by two workers, or by two generations of one, is released twice, its counter
        wraps below zero and torch holds it for good; memory_map.HeldShares)."""
        if self._thread is None:
            raise LifecycleError("register() before connect()")
        if self._dead:
            raise LifecycleError(f"{self._dead}: close this manager and start a new one")
        chosen = tuple(self._paths) if paths is None else tuple(P.Path(p) for p in paths)
        missing = [p.label for p in chosen if p not in self._paths]
        if missing or not chosen:
            raise LifecycleError(f"register: kvbm-workers serves {[p.label for p in self._paths]}, not "
                                 f"{missing or 'an empty set of paths'}")
        if memory is None and any(p not in P.DISK_PATHS for p in chosen):
            raise LayoutError(f"register: the {', '.join(p.label for p in chosen if p not in P.DISK_PATHS)} "
                              f"worker(s) copy device memory, and none was given")
        books: dict[P.Path, HeldShares] = {}
        if callable(memory):
            # Before any state changes (a failed share leaves the old registration whole), under
            # _io_lock: the I/O thread updates the previous books, which the new ones carry on.
            with self._io_lock:
                books = {p: HeldShares(memory, self._held_shares.get(p)) for p in chosen if p not in P.DISK_PATHS}
        self._registered = frozenset(chosen)
        self.block_bytes = device_layout.config.block_bytes
        self.num_layers = self._settlement.num_layers = device_layout.config.num_layers
        # Index bounds of each path's (source, destination), checked by submit().
        dev, host = int(device_layout.num_blocks), int(host_layout.num_blocks)
        self._limits = {P.Path.D2H: (dev, host), P.Path.H2D: (host, dev)}
        if disk is not None:   # reads name slots of other instances' stores too: checked by the worker
            self._limits.update({P.Path.H2DISK: (host, int(disk["blocks"])), P.Path.DISK2H: (2**62, host)})
        msg = {"t": P.MsgType.REGISTER, "engine": self.engine_id, "pid": os.getpid(),
               "device": P.layout_to_wire(device_layout), "host": P.layout_to_wire(host_layout)}
        if memory is not None and not callable(memory):
            msg["memory"] = memory
        if disk is not None:
            msg["disk"] = dict(disk)
        if group or host_offset:
            msg.update(group=group, host_offset=int(host_offset))
        with self._io_lock:   # the I/O thread sends the message with its path's book: both at once
            self._register_msg, self._held_shares = msg, books
        for q in self._registered_queues():
            q.link.reset()
            if q.lane is not None:
                q.lane.gen = 0
            elif self._bell is not None and q.path in P.WORKER_PATHS:
                try:
                    q.lane = EngineLane(self.welcome["instance"], self.engine_id, self.max_batch_blocks)
                except (OSError, KvbmError) as err:
                    logger.warning("%s: no transfer lane (%s); its requests go over ZeroMQ", q.path.label, err)
        with self._lock:
            self._register_asked = True
        self._wake()
        deadline = time.monotonic() + timeout
        for q in self._registered_queues():
            link = q.link
            if not link.ready.wait(max(0.0, deadline - time.monotonic())):
                raise KvbmTimeoutError(f"{link.path.label} worker did not accept the registration within {timeout} s"
                                       + (f": {link.error}" if link.error else ""))
            if link.error:
                raise TransferError(f"{link.path.label} worker rejected the registration: {link.error}")

    # ---- submit ------------------------------------------------------------------------------
    def submit(self, path: P.Path, src, dst, *, priority: int = 0, gate: Gate | None = None,
               layers: bool = False, block: bool = True, timeout: float | None = None,
               finalize: Finalize | None = None, extra: dict | None = None, meta: dict | None = None,
               charge: bool = True, alone: bool = False) -> TransferFuture:
        """Copies block src[i] to dst[i] along `path`. The future resolves to a TransferResult, or
        fails with TransferError. `finalize(outcome)` runs before the future resolves, once every
        byte has landed or every request has settled as failed; its return value is result.value.
        `extra`: per-block arrays sent with the blocks (protocol.BLOCK_FIELDS); `meta`: fields of
        every wire request; `charge=False`: no in-flight budget taken (a part chained on another
        submission's completion, within the bytes that one was charged); `alone=True`: its requests
        are never coalesced with other submissions' (each chunk of a pipelined read lands on its own)."""
        path = path if type(path) is P.Path else P.Path(path)
        src, dst = _blocks(src), _blocks(dst)
        n = len(src)
        if len(dst) != n:
            raise LayoutError(f"submit: {n} source blocks but {len(dst)} destination blocks")
        if self._closing:
            raise TransferError("transfer manager is closed")
        if self._dead:
            raise LifecycleError(f"{self._dead}: no new transfers are taken; close the KvBlockManager "
                                 f"and start a new one (its start cleans up after the dead instance)")
        future = TransferFuture(path, n, self.num_layers)
        nbytes = n * self.block_bytes
        if extra:
            extra = {k: np.ascontiguousarray(v).reshape(-1) for k, v in extra.items()}
            for key, arr in extra.items():
                if key not in P.BLOCK_FIELDS or arr.shape[0] != n:
                    raise LayoutError(f"submit {path.label}: extra {key!r} of {arr.shape[0]} values for {n} "
                                      f"blocks (known: {sorted(P.BLOCK_FIELDS)})")
        sub = Submission(path, future, nbytes if charge else 0, priority, layers, gate, finalize, time.monotonic(),
                         meta=meta, charged=charge, alone=alone)
        if n == 0:
            self._settlement.resolve(sub)
            return future
        if path in P.DISK_PATHS and path not in self._paths:
            sub.error = P.NO_DISK_TIER
            self._settlement.resolve(sub)
            return future
        if path not in self._paths:
            raise LifecycleError(f"no worker for path {path.label}; connect() first")
        if self._register_msg is not None and path not in self._registered:
            raise LifecycleError(self._unregistered_text(path))
        self._check_blocks(path, src, dst)
        if threading.get_ident() in (self._io_ident, self._settler_ident):
            # On the I/O thread, or a waiter settling in its place (a layer or done callback, a
            # finalize): waiting would stop the very thread that returns budget.
            block = False
        if charge:
            self.budget.take(nbytes, block, timeout)
        q = self._paths[path]
        if (q.lane is not None and gate is None and not extra and not meta and not alone
                and n <= q.lane.max_blocks and self._post_lane(q, sub, src, dst)):
            return future
        if n <= self.max_batch_blocks and not extra:
            sub.requests.append(Request(next(self._ids), sub, src, dst))
        else:
            for lo in range(0, n, self.max_batch_blocks):
                hi = lo + self.max_batch_blocks
                sub.requests.append(Request(next(self._ids), sub, src[lo:hi], dst[lo:hi],
                                            extra={k: v[lo:hi] for k, v in (extra or {}).items()} or None))
        sub.pending = len(sub.requests)
        if gate is not None:
            # Counted here: it may wait in the scheduler. Ungated ones are counted by the I/O thread
            # as it takes them in, one inc() per turn rather than one per submit (_take_incoming).
            self.metrics.of(path.label).submitted.inc()
        if not self.scheduler.hold(gate, sub):
            self._enqueue(sub)
        return future

    def _post_lane(self, q: PathQueue, sub: Submission, src: Blocks, dst: Blocks) -> bool:
        """Straight into the lane from this thread (kvbm.transfer.lane): only while nothing of this
        path waits in the queue and the window has room (so priorities still order what waits at
        the engine, as with ZeroMQ), for the generation that mapped the lane. False: the queue's
        way (the I/O thread sends it, through the lane too when it can)."""
        lane = q.lane
        gen = lane.gen
        if not gen or gen != q.link.registered_gen or q.heap or self._incoming or lane.broken or self._stopped:
            return False
        if len(q.outstanding) + len(lane.posted) >= WINDOW:
            return False   # a burst's tail: lane.post would say so under its lock, after two records built
        req = Request(next(self._ids), sub, src, dst)
        sub.requests.append(req)
        sub.pending = 1
        now = time.monotonic()
        req.deadline = now + self.request_timeout_s
        nbytes = len(src) * self.block_bytes
        waiter_settles = self.wait_spin_us and nbytes <= WAIT_SPIN_BYTES
        # No waiter will spin for it: the I/O thread settles it, woken by the worker as the copy
        # starts (a short copy hides that wake-up) rather than by its DONE.
        ahead = not waiter_settles and nbytes <= RING_AHEAD_BYTES
        if not lane.post(WireRequest(req.rid, [req], gen, now, req.deadline), self._ringer, q.outstanding, WINDOW,
                         ahead):
            sub.requests.clear()
            sub.pending = 0
            return False
        if waiter_settles:
            sub.future._settle_here = partial(self._settle_waiting, q)
        return True

    def _settle_waiting(self, q: PathQueue, future: TransferFuture, timeout: float | None) -> None:
        """result() of a small lane request: the waiting thread spins on the lane (without the GIL)
        and, once a completion is there and the I/O thread is between turns, reads the lane and
        settles what it finds as the I/O thread would (under _io_lock: callbacks and finalize run
        here then). The result comes without the bell, the I/O thread's wake-up and the hand-off
        back to this thread. Gives up, leaving it to the I/O thread, after wait_spin_us (or the
        timeout), or when the I/O thread is in a turn. The spin runs in slices, the future checked
        between them, and counted in _spinners: close() unmaps no lane while one spins on it."""
        lane = q.lane
        spin_us = self.wait_spin_us if timeout is None else min(self.wait_spin_us, max(0.0, timeout) * 1e6)
        end = time.monotonic() + spin_us / 1e6
        with self._counted_spin() as allowed:
            while allowed and not future.done():
                left_us = (end - time.monotonic()) * 1e6
                if left_us <= 0 or lane is None or lane.broken or q.lane is not lane or self._closing:
                    return
                if not spin_lanes([lane.ring], True, min(left_us, WAIT_SPIN_SLICE_US)):
                    continue
                if not self._io_lock.acquire(blocking=False):
                    return
                try:
                    if self._closing or q.lane is not lane:
                        return
                    self._settler = threading.current_thread()
                    self._settler_ident = self._settler.ident
                    self._read_lane(q)
                    lane.waiter_settled += future.done()
                    if q.heap:
                        self._wake()   # the window has room again: the I/O thread sends what waits
                finally:
                    self._settler = None
                    self._settler_ident = -1
                    self._io_lock.release()

    @contextlib.contextmanager
    def _counted_spin(self):
        """Counts a thread spinning on lanes in _spinners (close() unmaps no lane while one does);
        yields False, and counts nothing, once closing."""
        with self._lock:
            allowed = not self._closing
            if allowed:
                self._spinners += 1
        if not allowed:
            yield False
            return
        try:
            yield True
        finally:
            with self._lock:
                self._spinners -= 1

    def _check_blocks(self, path: P.Path, src: Blocks, dst: Blocks) -> None:
        """Before anything is queued: a bad index would make the worker reject the whole wire
        request, and with it the unrelated submissions coalesced into it."""
        # Small submissions are the common case and numpy's per-call cost would dominate them
        # (a 1-block submit paid ~4 array reductions): plain ints below SMALL_CHECK elements.
        if len(src) == 1:
            self._check_one(path, src[0], dst[0])
            return
        small = len(src) <= SMALL_CHECK
        limits = self._limits.get(path)
        if limits is not None:
            for name, arr, limit in (("source", src, limits[0]), ("destination", dst, limits[1])):
                values = arr.tolist() if small else None
                lo, hi = (min(values), max(values)) if small else (int(arr.min()), int(arr.max()))
                if lo < 0 or hi >= limit:
                    bad = lo if lo < 0 else hi
                    raise LayoutError(f"submit {path.label}: {name} block {bad} out of range [0, {limit})")
        distinct = len(set(dst.tolist())) if small else int(np.unique(dst).shape[0])
        if distinct != len(dst):
            raise LayoutError(f"submit {path.label}: {len(dst) - distinct} destination "
                              f"block(s) named more than once; destinations must be distinct")

    def _check_one(self, path: P.Path, src: int, dst: int) -> None:
        """_check_blocks of a 1-block submission (the engines' most frequent one), in plain ints."""
        limits = self._limits.get(path)
        if limits is not None:
            for name, value, limit in (("source", src, limits[0]), ("destination", dst, limits[1])):
                if not 0 <= value < limit:
                    raise LayoutError(f"submit {path.label}: {name} block {value} out of range [0, {limit})")

    def _release_gated(self, subs: list[Submission]) -> None:
        for sub in subs:
            self._enqueue(sub)

    def _enqueue(self, sub: Submission) -> None:
        """Hands a submission to the I/O thread; once closing, fails it here instead (the I/O
        thread has drained, or is draining, _incoming for the last time; the eventfd may be
        closed). _closing changes under _lock, so no submission slips in after that drain."""
        with self._lock:
            closing = self._closing
            if not closing:
                # Only the first submission since the I/O thread last took the list wakes it: a
                # burst costs one eventfd write and one wake-up, not one each (each wake-up makes
                # the I/O thread contend for the GIL with the submitting thread).
                if not self._incoming and not self._register_asked:
                    eventfd_kick(self._wake_fd)
                self._incoming.append(sub)
        if closing:
            self._count_submitted([sub])
            self._settlement.fail_submission(sub, "transfer manager is closed")

    def ask(self, path: P.Path, msg: dict, on_reply) -> int:
        """Sends `msg` (given an id here) to the worker of `path` from the I/O thread; every reply
        carrying that id goes to on_reply(reply) on the I/O thread until it returns True (the
        last). Returns the id. LifecycleError when there is no such worker or the manager closed."""
        path = P.Path(path)
        if path not in self._paths:
            raise LifecycleError(P.NO_DISK_TIER if path in P.DISK_PATHS else f"no worker for path {path.label}")
        if self._register_msg is not None and path not in self._registered:
            raise LifecycleError(self._unregistered_text(path))
        if self._closing or self._dead:
            raise LifecycleError(self._dead or "transfer manager is closed")
        rid = next(self._ids)
        with self._lock:
            self._asks[rid] = on_reply
            self._outgoing.append((path, dict(msg, id=rid, engine=self.engine_id)))
        self._wake()
        return rid

    def forget(self, rid: int) -> None:
        """No more replies to ask() `rid` are wanted (its caller gave up waiting)."""
        with self._lock:
            self._asks.pop(rid, None)

    def _send_outgoing(self) -> None:
        with self._lock:
            out, self._outgoing = self._outgoing, []
        for path, msg in out:
            try:
                self._paths[path].sock.send(P.encode(msg), zmq.NOBLOCK)
            except zmq.ZMQError as err:
                logger.warning("%s: a %r request could not be sent: %s", path.label, msg.get("t"), err)

    def _on_answer(self, msg: dict) -> None:
        rid = msg.get("id")
        with self._lock:
            on_reply = self._asks.get(rid) if isinstance(rid, int) else None
        if on_reply is None:
            return
        try:
            last = on_reply(msg)
        except Exception:  # noqa: BLE001 - a reply handler must not kill the I/O thread
            logger.exception("reply handler of request %s failed", rid)
            last = True
        if last:
            self.forget(rid)

    def _wake(self) -> None:
        with self._lock:
            if not self._closing:
                eventfd_kick(self._wake_fd)

    def _registered_queues(self) -> list[PathQueue]:
        return [q for p, q in self._paths.items() if p in self._registered]

    def _unregistered_text(self, path: P.Path) -> str:
        return (f"{path.label}: this transfer manager registered with {sorted(p.label for p in self._registered)} "
                f"only (register(paths=...)); it cannot submit to {path.label}")

    @property
    def paths(self) -> tuple[P.Path, ...]:
        """The paths kvbm-workers serves (its welcome's)."""
        return tuple(self._paths)

    def worker_info(self, path: P.Path) -> dict:
        """What the worker of `path` said of itself when it accepted our registration."""
        q = self._paths.get(P.Path(path))
        return dict(q.info) if q is not None else {}

    @property
    def inflight_bytes(self) -> int:
        return self.budget.used

    # ---- I/O thread --------------------------------------------------------------------------
    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        poller = self._poller = zmq.Poller()
        poller.register(self._wake_fd, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        if self._supervisor_fd >= 0:
            poller.register(self._supervisor_fd, zmq.POLLIN)
        bell_fd = self._bell.fileno() if self._bell is not None else -1
        if bell_fd >= 0:
            poller.register(bell_fd, zmq.POLLIN)
        by_sock = {}
        for q in self._paths.values():
            poller.register(q.sock, zmq.POLLIN)
            by_sock[q.sock] = q
        next_report = time.monotonic()
        self._next_tick = 0.0
        if self._dead:
            self._supervisor_died()
        while not self._closing:
            try:
                lanes = [q for q in self._paths.values() if q.lane is not None]
                ready = dict(poller.poll(self._sleep_lanes(lanes, max(0, int((self._next_tick - time.monotonic())
                                                                                * 1000) + 1))))
                with self._io_lock:
                    next_report, ahead = self._turn(ready, lanes, by_sock, bell_fd, next_report)
                if ahead:
                    self._spin_ahead(ahead)
            except Exception:  # noqa: BLE001 - the I/O thread must survive anything; log and go on
                logger.exception("transfer manager I/O loop error")
        try:
            with self._io_lock:
                self._fail_everything("transfer manager closed")
        finally:
            self._io_ident = -1   # idents are reused once a thread has ended

    def _turn(self, ready: dict, lanes: list[PathQueue], by_sock: dict, bell_fd: int,
              next_report: float) -> tuple[float, list]:
        """One turn of the I/O loop after its poll (under _io_lock); returns when to report next,
        and the lanes to spin on for a DONE rung ahead of."""
        for q in lanes:
            q.lane.ring.engine_wake()
            # Before any event: a death fails what its worker held, lane requests included.
            self._absorb_posted(q)
        rung = [False] * len(lanes)
        if bell_fd in ready and self._bell.drain():
            rung = [q.lane.ring.take_engine_rung() for q in lanes]   # every lane's mark, drained
        if self._supervisor_fd in ready and not self._dead:
            self._supervisor_died()
        if self._wake_fd in ready:
            try:
                os.eventfd_read(self._wake_fd)
            except BlockingIOError:
                pass
            self._take_incoming()
            self._send_outgoing()
        if self._events in ready:
            self._read_events()
        # After the events: a worker's "died" (its exit code) or kvbm-workers' "stopping" says more
        # than its process being gone, and forgets its pidfd.
        for fd in [fd for fd in self._watched if fd in ready]:
            self._worker_gone(fd)
        if self._control in ready:
            self._read_control()
        for sock, q in by_sock.items():
            if sock in ready:
                self._read_worker(q)
        for q in lanes:
            self._read_lane(q)
        # Rung ahead of a completion (FLAG_RING_AHEAD) and woken by nothing else: its copy is under
        # way; _run waits for its DONE (no GIL, no _io_lock) rather than sleep again and need a
        # second ring. Not when the DONE came already (read just above).
        ahead = [q.lane.ring for q, r in zip(lanes, rung) if r and q.outstanding] if len(ready) == 1 else []
        now = time.monotonic()
        if now >= self._next_tick:
            # Deadlines are checked when the soonest one is due (at least every 0.25 s),
            # not on every wake-up: a 1-block round trip wakes this loop twice.
            self._check_deadlines()
            self._next_tick = self._soonest()
        for q in self._paths.values():
            self._pump(q)
        if now >= next_report and not self._dead:
            next_report = now + STATS_REPORT_S
            self._report()
        return next_report, ahead

    # ---- lanes -------------------------------------------------------------------------------
    def _sleep_lanes(self, lanes: list[PathQueue], timeout_ms: int) -> int:
        """The poll timeout: 0 when a lane has completions, else `timeout_ms` once every lane knows
        we sleep (its worker rings our bell on its next completion). Posted wires are taken after
        the poll (the loop's _absorb_posted, and _read_lane for a completion that comes first)."""
        if not timeout_ms or not lanes:
            return timeout_ms
        # Requests out: catch their completions spinning (no GIL held) rather than be rung awake.
        if self.lane_spin_us and any(q.outstanding or q.lane.posted for q in lanes) and \
                spin_lanes([q.lane.ring for q in lanes], True, self.lane_spin_us):
            return 0
        if not all([q.lane.ring.engine_sleep() for q in lanes]):
            return 0
        return timeout_ms

    def _spin_ahead(self, rings: list) -> None:
        """Waits up to AHEAD_SPIN_US for a DONE rung ahead of, without _io_lock, counted like a
        waiter's spin."""
        with self._counted_spin() as allowed:
            if allowed:
                spin_lanes(rings, True, AHEAD_SPIN_US)

    def _absorb_posted(self, q: PathQueue) -> None:
        """Lane requests the submitting threads posted become outstanding requests of the path,
        as a ZeroMQ request does when it is sent. One posted to a generation that has gone since
        (died, stale) was never run by any other (a new generation drops what its predecessor
        left in the lane, or answers it STALE): it goes to the queue again, once. (The loop takes
        them after every poll, before reading events, so a death fails every request posted
        before it was read, as it fails ZeroMQ ones; only one posted since then is requeued.)"""
        posted = self._take_posted(q, q.outstanding)
        for wire in posted:
            if wire.gen == q.link.registered_gen or self._stopped or self._dead or wire.members[0].requeued:
                if self._stopped or self._dead:
                    grace = min(self.stop_grace_s, self.request_timeout_s)
                    wire.stopping = True
                    wire.deadline = min(wire.deadline, time.monotonic() + grace)
                continue
            q.outstanding.pop(wire.rid, None)
            req = wire.members[0]
            req.requeued, req.state, req.layers_done = True, QUEUED, 0
            q.push(req)

    def _take_posted(self, q: PathQueue, into: dict | None = None, final: bool = False) -> list[WireRequest]:
        """EngineLane.take_posted, counted: each lane post is one wire request and one submission
        (submit() leaves a lane post's count to the thread that takes it)."""
        posted = q.lane.take_posted(into, final)
        if posted:
            counts = self.metrics.of(q.path.label)
            counts.requests.inc(len(posted))
            counts.submitted.inc(len(posted))
        return posted

    def _read_lane(self, q: PathQueue) -> None:
        lane = q.lane
        if lane.broken:
            return
        try:
            completions = lane.ring.take_done()
        except LaneError as err:
            lane.broken = str(err)
            logger.error("%s lane: %s; its requests in flight fail by their deadline, new ones go over ZeroMQ",
                         q.path.label, err)
            return
        if lane.unread:
            completions, lane.unread = lane.unread + completions, []
        for i, (rid, kind, layer, _nbytes, _queue_us, _copy_us) in enumerate(completions):
            try:
                wire = q.outstanding.get(rid)
                if wire is None:
                    self._absorb_posted(q)   # posted after this loop last took them
                    wire = q.outstanding.get(rid)
                    if wire is None:
                        continue             # already failed (a death, a deadline), or not ours
                if kind == DONE_OK:
                    self._wire_ok(q, wire)
                elif kind == DONE_LAYER:
                    self._layer_landed(wire, layer)
            except BaseException:
                # Taken off the ring, not settled yet (an interrupt on a settling waiter's thread):
                # the next reader settles them first.
                lane.unread = completions[i + 1:]
                raise

    def _lane_accepted(self, q: PathQueue, gen: int, msg: dict) -> None:
        lane = q.lane
        if lane is None:
            return
        lane.gen = 0
        lane.ring.take_engine_rung()   # a killed predecessor's mark may have no ring behind it
        if msg.get("lane") is True:
            try:
                lane.worker_bell = check_bell_path(msg.get("bell"), self._bell_dir or "")
            except (ValueError, OSError) as err:
                logger.warning("%s worker gen %d named an unusable doorbell (%s): no lane", q.path.label, gen, err)
                return
            lane.gen = gen
        elif msg.get("lane_error"):
            logger.warning("%s worker gen %d refused our transfer lane (%.200s); requests go over ZeroMQ",
                           q.path.label, gen, msg.get("lane_error"))

    def _soonest(self) -> float:
        """When _check_deadlines must run next: the soonest wire deadline or registration retry,
        and at least every 0.25 s (held gates, queued requests waiting for a worker). Whatever
        sets an earlier deadline between two checks lowers _next_tick itself (_due)."""
        soonest = time.monotonic() + 0.25
        for q in self._paths.values():
            if q.link.retry_at:
                soonest = min(soonest, q.link.retry_at)
            for wire in q.outstanding.values():
                soonest = min(soonest, wire.deadline)
        return soonest

    def _due(self, when: float) -> None:
        if when < self._next_tick:
            self._next_tick = when

    def _take_incoming(self) -> None:
        with self._lock:
            subs, self._incoming = self._incoming, []
            register, self._register_asked = self._register_asked, False
        if register:
            for q in self._paths.values():
                self._send_register(q)
        now = time.monotonic()
        self._count_submitted(subs)
        for sub in subs:
            q = self._paths[sub.path]
            if self._dead:
                self._settlement.fail_submission(sub, f"{self._dead}; the transfer never reached a worker")
                continue
            if self._stopped:
                self._settlement.fail_submission(sub, "kvbm-workers stopped")
                continue
            if q.link.refuses_work:
                self._settlement.fail_submission(sub, q.link.error)
                continue
            for req in sub.requests:
                req.deadline = now + self.request_timeout_s  # covers waiting for a restarted worker too
                q.push(req)

    def _send_register(self, q: PathQueue) -> None:
        if self._register_msg is None or q.path not in self._registered:
            return
        rid = next(self._ids)
        msg = dict(self._register_msg, id=rid)
        book = self._held_shares.get(q.path)
        if book is not None:
            try:
                msg["memory"] = book.send(rid, q.link.gen)
            except Exception as err:  # noqa: BLE001 - the I/O thread: retried as a refused registration
                logger.exception("%s: sharing the device memory for a registration failed", q.path.label)
                self._registration_refused(q, f"sharing the device memory failed: {type(err).__name__}: {err}")
                return
        q.link.begin_register(rid)
        if q.lane is not None and self._bell is not None:
            msg["lane"] = q.lane.offer(self._bell.path)
        # A DEALER queues this while the worker is down; the next generation gets it when it binds.
        q.sock.send(P.encode(msg), zmq.NOBLOCK)

    def _registration_refused(self, q: PathQueue, error: str) -> None:
        q.link.rejected(error)
        self._due(0.0)   # its retry time is set now
        if q.link.refuses_work:
            self._fail_queued(q, q.link.error)

    def _pump(self, q: PathQueue) -> None:
        """Sends queued requests while the worker is registered and the window has room; queued
        requests of the same priority behind the first are coalesced into it up to max_batch_blocks.
        Under the lane's lock, if there is a lane: submitting threads check the same window."""
        if q.lane is None:
            self._pump_locked(q)
            return
        if q.heap:
            with q.lane.lock:
                self._pump_locked(q)

    def _pump_locked(self, q: PathQueue) -> None:
        posted = q.lane.posted if q.lane is not None else ()   # lane wires not yet absorbed are in the window
        while q.heap and q.link.registered_gen and len(q.outstanding) + len(posted) < WINDOW and not self._dead:
            lead = q.pop_lead()
            if lead is None:
                return
            if lead.sub.error is not None:  # a sibling failed: do not start more of this submission
                self._settlement.settle(lead, None)
                continue
            members = q.coalesce(lead, self.max_batch_blocks)
            gen = q.link.registered_gen
            single = len(members) == 1
            rid = lead.rid if single else next(self._ids)
            src = lead.src if single else np.concatenate([m.src for m in members])
            dst = lead.dst if single else np.concatenate([m.dst for m in members])
            gate = lead.sub.gate.to_wire() if lead.sub.gate else None
            fields = dict(lead.sub.meta or {})
            if lead.extra:
                fields.update({k: v if single else np.concatenate([m.extra[k] for m in members])
                               for k, v in lead.extra.items()})
            now = time.monotonic()
            wire = WireRequest(rid, members, gen, now, now + self.request_timeout_s)
            if not self._pump_lane(q, wire, src, dst, gate, fields):
                msg = P.make_xfer(rid, self.engine_id, gen, q.path, src, dst, lead.sub.priority, lead.sub.layers,
                                  gate, **fields)
                try:
                    q.sock.send(P.encode(msg), zmq.NOBLOCK)
                except zmq.Again:
                    for m in members:
                        q.push(m)
                    return
            for m in members:
                m.state, m.gen = SENT, gen
            q.outstanding[rid] = wire
            self._due(now + self.request_timeout_s)
            self.metrics.of(q.path.label).requests.inc()

    def _pump_lane(self, q: PathQueue, wire: WireRequest, src: Blocks, dst: Blocks, gate, fields: dict) -> bool:
        """Sends a wire request through the lane when it can carry it (no gate, no extra fields);
        the I/O thread reads completions only after this returns, so the wire is outstanding by then."""
        lane = q.lane
        if (lane is None or gate is not None or fields or lane.broken or lane.gen != wire.gen
                or len(src) > lane.max_blocks):
            return False
        lead = wire.members[0]
        return lane.post_wire(wire.rid, wire.gen, lead.sub.priority, lead.sub.layers, src, dst, self._ringer)

    # ---- replies and events ------------------------------------------------------------------
    def _read_worker(self, q: PathQueue) -> None:
        for payload in pending(q.sock):
            try:
                msg = P.decode(payload)
                kind = msg["t"]
                if kind == P.MsgType.DONE:
                    P.validate_done(msg)
                    self._on_done(q, msg)
                elif kind == P.MsgType.LAYER:
                    self._on_layer(q, msg)
                elif kind == P.MsgType.REGISTERED:
                    gen = int(msg["gen"])
                    q.link.accepted(msg.get("id"), gen)
                    book = self._held_shares.get(q.path)
                    if book is not None and type(msg.get("id")) is int:
                        book.accepted(msg["id"], gen)   # any message it took: it holds those shares now
                    if q.link.registered_gen == gen:
                        self._track_worker(q, gen, msg.get("pid"))
                        self._lane_accepted(q, gen, msg)
                        if isinstance(msg.get("disk"), dict):
                            q.info = msg["disk"]
                elif kind == P.MsgType.ENTRIES:
                    self._on_answer(msg)
                else:
                    logger.warning("%s worker sent an unexpected %r message", q.path.label, kind)
            except (ProtocolError, KeyError, TypeError, ValueError) as err:
                logger.warning("bad message from the %s worker: %s", q.path.label, err)

    def _on_layer(self, q: PathQueue, msg: dict) -> None:
        wire = q.outstanding.get(msg.get("id"))
        layer = msg.get("layer")
        if wire is None or not isinstance(layer, int) or isinstance(layer, bool):
            return
        self._layer_landed(wire, layer)

    def _layer_landed(self, wire: WireRequest, layer: int) -> None:
        for m in wire.members:
            m.layers_done = max(m.layers_done, min(layer + 1, self.num_layers))
        for sub in {id(m.sub): m.sub for m in wire.members}.values():
            if sub.error is None:
                self._settlement.layer_progress(sub)

    def _on_done(self, q: PathQueue, msg: dict) -> None:
        rid = msg["id"]
        if rid == q.link.rid and rid != 0:
            book = self._held_shares.get(q.path)
            if book is not None:
                gen = msg.get("gen")
                book.refused(rid, gen if type(gen) is int else None)
            self._registration_refused(q, msg.get("error") or "registration failed")
            return
        wire = q.outstanding.get(rid)
        if wire is None:
            return  # already failed (worker death, deadline) or a stale reply
        status = P.Status(msg["status"])
        if status is not P.Status.STALE:
            self._attach_detail(q, wire, msg)
        if status is P.Status.OK:
            self._wire_ok(q, wire)
            return
        error = f"{q.path.label} worker gen {wire.gen}: {msg.get('error') or status.name}"
        if status is P.Status.STALE:
            # Never executed by the new generation; our registration is stale: register again,
            # and queue the requests again (once) for the generation that accepts it.
            if q.link.stale(wire.gen, int(msg.get("gen") or 0)) and not self._dead:
                self._send_register(q)
            q.outstanding.pop(wire.rid, None)
            now = time.monotonic()
            for m in wire.members:
                if m.requeued or m.sub.error is not None or self._dead:
                    self._settlement.settle(m, error if m.requeued or self._dead else None)
                    continue
                m.requeued, m.state, m.layers_done = True, QUEUED, 0
                m.deadline = now + self.request_timeout_s
                q.push(m)
            return
        self._settlement.settle_wire(q, wire, error)

    def _wire_ok(self, q: PathQueue, wire: WireRequest) -> None:
        self.metrics.of(q.path.label).latency.observe(time.monotonic() - wire.sent_at)
        for m in wire.members:
            m.sub.moved += len(m.src) * self.block_bytes
            m.layers_done = self.num_layers
        self._settlement.settle_wire(q, wire, None)

    def _attach_detail(self, q: PathQueue, wire: WireRequest, msg: dict) -> None:
        """Per-block arrays of a reply (a disk request's), sliced to each member request."""
        total = sum(len(m.src) for m in wire.members)
        arrays = {}
        for key in P.BLOCK_FIELDS:
            if key in msg:
                try:
                    arrays[key] = P.unpack_field(msg, key, total)
                except ProtocolError as err:
                    logger.warning("%s reply %d: %s", q.path.label, wire.rid, err)
        scalars = {k: msg[k] for k in ("copy_us", "bytes") if isinstance(msg.get(k), int)}
        texts = {k: msg[k] for k in ("read_path", "error") if isinstance(msg.get(k), str)}
        if isinstance(msg.get("no_space"), bool):
            texts["no_space"] = msg["no_space"]
        lo = 0
        for i, m in enumerate(wire.members):
            n = len(m.src)
            m.detail = {k: v[lo:lo + n] for k, v in arrays.items()} | texts | \
                (scalars if i == 0 else dict.fromkeys(scalars, 0))
            lo += n

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
                q = self._paths[P.Path(path)]
            except (ValueError, KeyError):
                continue
            if kind == "died":
                self._worker_died(q, int(gen), msg)
            elif kind == "started" and isinstance(gen, int):
                if q.link.started(gen):
                    self._stopped = False
                    self._send_register(q)

    def _worker_died(self, q: PathQueue, gen: int, msg: dict) -> None:
        self.metrics.worker_deaths.labels(q.path.label).inc()
        death = f"{q.path.label} worker generation {gen} (pid {msg.get('pid')}) died (exit code {msg.get('exitcode')})"
        reason = f"{death} with this transfer in flight; the blocks were not loaded"
        failed = [w for w in q.outstanding.values() if w.gen == gen]
        for wire in failed:
            self._settlement.settle_wire(q, wire, ("timed out, then " if wire.timed_out else "") + reason)
        self._forget_worker(q, gen)
        book = self._held_shares.get(q.path)
        if book is not None:   # its process is gone; killed by a signal, it released nothing itself
            exitcode = msg.get("exitcode")
            book.died(gen, killed=type(exitcode) is int and exitcode < 0)
        if q.link.died(gen):
            self._send_register(q)
        if failed:
            logger.error("%s with %d request(s) of this engine in flight; they failed, the blocks were not loaded",
                         death, len(failed))
        else:
            logger.warning("%s; no request of this engine was in flight", death)

    # ---- kvbm-workers' own death -------------------------------------------------------------
    def _track_worker(self, q: PathQueue, gen: int, pid: object) -> None:
        """Keeps a pidfd of the generation that accepted our registration: if the supervisor dies,
        it is how we learn that this worker can no longer write (no "died" event will come)."""
        for old in [g for g in q.worker_fds if g < gen and not any(w.gen == g for w in q.outstanding.values())]:
            os.close(q.worker_fds.pop(old))
        if gen in q.worker_fds or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return
        try:
            q.worker_fds[gen] = os.pidfd_open(pid)
        except OSError as err:  # already gone, or no pidfd: a supervisor death then waits for the grace
            logger.debug("cannot watch the %s worker pid %d: %s", q.path.label, pid, err)

    def _forget_worker(self, q: PathQueue, gen: int) -> None:
        fd = q.worker_fds.pop(gen, -1)
        if fd >= 0:
            if fd in self._watched:
                self._watched.pop(fd)
                self._poller.unregister(fd)
            os.close(fd)

    def _supervisor_died(self) -> None:
        """The supervisor is gone (its pidfd is readable): no events, no restarts from now on.
        Unsent work fails now; each request at a worker fails once that worker is seen gone (its
        copy can no longer land), or unsafely when it is not within the grace."""
        self._dead = self._dead or f"kvbm-workers (pid {self.supervisor_pid}) {'stopped' if self._stopped else 'died'}"
        self._fail_unsent(f"{self._dead}; the transfer never reached a worker")
        now = time.monotonic()
        grace = min(self.stop_grace_s, self.request_timeout_s)
        waiting = 0
        for q in self._paths.values():
            q.link.stopped()
            for wire in q.outstanding.values():
                wire.stopping = True
                wire.deadline = min(wire.deadline, now + grace)
                waiting += 1
            for gen, fd in q.worker_fds.items():
                self._watched[fd] = (q, gen)
                self._poller.register(fd, zmq.POLLIN)
        self._due(0.0)
        logger.error("%s; queued transfers failed, %d request(s) at workers fail once their worker is gone "
                     "(at most %.1f s); new transfers are refused", self._dead, waiting, grace)

    def _worker_gone(self, fd: int) -> None:
        q, gen = self._watched[fd]
        book = self._held_shares.get(q.path)
        if book is not None:
            # kvbm-workers died: its workers are SIGKILLed with it (PR_SET_PDEATHSIG). After its
            # "stopping" they were stopped with SIGTERM instead and closed their mappings.
            book.died(gen, killed=not self._stopped)
        failed = [w for w in q.outstanding.values() if w.gen == gen]
        for wire in failed:
            self._settlement.settle_wire(q, wire, f"{self._dead}; its {q.path.label} worker generation {gen} "
                                                  f"exited with this transfer in flight; the blocks were not loaded")
        self._forget_worker(q, gen)
        if failed:
            logger.error("%s worker generation %d exited after kvbm-workers died; %d request(s) failed",
                         q.path.label, gen, len(failed))

    def _read_control(self) -> None:
        while True:
            try:
                self._control.recv(zmq.NOBLOCK)  # restart acknowledgements; nothing to do
            except zmq.Again:
                return

    def _on_stopping(self) -> None:
        """kvbm-workers is going away. What no worker holds fails now; a request at a worker fails
        on that generation's "died" event (published before or after "stopping"), so no copy can
        still write into blocks its caller was handed back, or, past stop_grace_s without one,
        fails with may_still_be_written."""
        self._stopped = True
        self._fail_unsent("kvbm-workers stopped")
        now = time.monotonic()
        waiting = 0
        for q in self._paths.values():
            q.link.stopped()
            for wire in q.outstanding.values():
                wire.stopping = True
                wire.deadline = min(wire.deadline, now + self.stop_grace_s)
                waiting += 1
        self._due(0.0)
        logger.error("kvbm-workers is stopping; failed what no worker held, %d request(s) at workers wait "
                     "for their worker's death (at most %.1f s)", waiting, self.stop_grace_s)

    # ---- deadlines ---------------------------------------------------------------------------
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for sub in self.scheduler.expire(now):
            self._settlement.fail_submission(sub, f"{sub.path.label} transfer held for "
                                             f"{self.scheduler.hold_timeout_s:.1f} s: "
                                             f"gate {sub.gate} never opened (scheduler at iteration "
                                             f"{self.scheduler.iteration}, layer {self.scheduler.layer})")
        for q in self._paths.values():
            if q.link.retry_due(now) and not self._dead:
                self._send_register(q)
            for wire in list(q.outstanding.values()):
                if now >= wire.deadline:
                    self._wire_overdue(q, wire, now)
            # Queued requests waiting for a worker that does not come back.
            if q.heap and not q.link.registered_gen:
                for req in q.queued_past(now):
                    self._settlement.settle(req, f"{q.path.label} worker unavailable for "
                                                 f"{self.request_timeout_s:.1f} s")

    def _wire_overdue(self, q: PathQueue, wire: WireRequest, now: float) -> None:
        label = q.path.label
        if wire.stopping and self._dead:
            grace = min(self.stop_grace_s, self.request_timeout_s)
            logger.error("%s request %d: %s and its gen %d worker was not seen exiting within %.1f s",
                         label, wire.rid, self._dead, wire.gen, grace)
            self._settlement.settle_unsafe(q, wire, f"{self._dead} and its gen {wire.gen} worker was not seen "
                                                    f"exiting within {grace:.1f} s")
        elif wire.stopping:
            logger.error("%s request %d: no died event for gen %d within %.1f s of stopping",
                         label, wire.rid, wire.gen, self.stop_grace_s)
            self._settlement.settle_unsafe(q, wire, f"kvbm-workers stopped and gen {wire.gen} was not reported "
                                         f"dead within {self.stop_grace_s:.1f} s")
        elif not wire.timed_out:
            # Ask for the worker to be replaced; fail on its death event, so that no late write
            # can land in blocks the caller already reused.
            wire.timed_out = True
            wire.deadline = now + self.request_timeout_s * (HARD_DEADLINE_FACTOR - 1)
            self.metrics.timeouts.labels(label).inc()
            logger.error("%s request %d missed its %.1f s deadline; asking for gen %d to be replaced",
                         label, wire.rid, self.request_timeout_s, wire.gen)
            # The supervisor takes a restart only for the generation our latest report names, from
            # the connection we report on: report now, so that it is current (it goes every second).
            self._report()
            self._control.send(P.encode({"t": P.MsgType.RESTART, "path": int(q.path), "gen": wire.gen,
                                         "engine": self.engine_id, "reason": f"request {wire.rid} timed out"}),
                               zmq.NOBLOCK)
        else:
            logger.error("%s request %d: worker gen %d neither answered nor died; failing it",
                         label, wire.rid, wire.gen)
            self._settlement.settle_unsafe(q, wire,
                                           f"timed out after {self.request_timeout_s * HARD_DEADLINE_FACTOR:.1f} s")

    # ---- failing what waits -----------------------------------------------------------------
    def _fail_queued(self, q: PathQueue, reason: str) -> None:
        for req in q.drain():
            self._settlement.settle(req, reason)

    def _count_submitted(self, subs: list[Submission]) -> None:
        """Submissions taken from _incoming, counted one inc() per path rather than one per submit
        (submit() counted the gated ones, which may have waited in the scheduler)."""
        for path, count in Counter(sub.path for sub in subs if sub.gate is None).items():
            self.metrics.of(path.label).submitted.inc(count)

    def _fail_unsent(self, reason: str, closing: bool = False) -> None:
        """Fails held, incoming and queued work: none of it reached a worker."""
        for sub in (self.scheduler.close() if closing else self.scheduler.drop_all()):
            self._settlement.fail_submission(sub, reason)
        with self._lock:
            subs, self._incoming = self._incoming, []
        self._count_submitted(subs)
        for sub in subs:
            self._settlement.fail_submission(sub, reason)
        for q in self._paths.values():
            self._fail_queued(q, reason)

    def _fail_everything(self, reason: str) -> None:
        """At close: nothing will read replies any more."""
        self._fail_unsent(reason, closing=True)
        for q in self._paths.values():
            if q.lane is not None:
                self._take_posted(q, q.outstanding)
            for wire in list(q.outstanding.values()):
                self._settlement.settle_unsafe(q, wire, reason)
            q.link.stopped()

    # ---- inspection and shutdown -----------------------------------------------------------
    def _report(self) -> None:
        if self._control is None:
            return
        for q in self._paths.values():
            self.metrics.queued.labels(q.path.label).set(len(q.heap))
        report = {"t": P.MsgType.STATS, "engine": self.engine_id, "inflight_bytes": self.budget.used,
                  "queues": {q.path.label: {"queued": len(q.heap), "outstanding": len(q.outstanding)}
                             for q in self._paths.values()},
                  "held": len(self.scheduler), "counters": self.metrics.totals(),
                  # what the supervisor checks a restart request against
                  "generations": {q.path.label: q.link.registered_gen for q in self._paths.values()}}
        if self.stats_fn is not None:
            try:
                report["pools"] = self.stats_fn()
            except Exception:  # noqa: BLE001 - a report is best effort
                logger.debug("stats_fn failed", exc_info=True)
        try:
            self._control.send(P.encode(report), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def stats(self) -> dict:
        return self.metrics.totals() | {
            "inflight_bytes": self.budget.used, "held": len(self.scheduler),
            "queued": {q.path.label: len(q.heap) for q in self._paths.values()},
            "generations": {q.path.label: q.link.registered_gen for q in self._paths.values()},
            "links": {q.path.label: q.link.state.name.lower() for q in self._paths.values()},
            # requests that went through each path's shared-memory lane, and whether it serves now
            "lanes": {q.path.label: {"requests": q.lane.ring.counts[0], "gen": q.lane.gen,
                                     "broken": q.lane.broken, "waiter_settled": q.lane.waiter_settled}
                      for q in self._paths.values() if q.lane is not None}}

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._closing and self._thread is None:
                return
            self._closing = True
        if self._thread is not None:
            eventfd_kick(self._wake_fd)
            self._thread.join(timeout)
            alive = self._thread.is_alive()
            self._thread = None
            if not alive and self._register_msg is not None and not self._dead:
                self.unregistered = self._unregister(min(timeout, 1.0))
                _collect_cuda_ipc()
        # A waiter settling its own lane request (_settle_waiting) finishes first, and none spins on
        # a lane when it is unmapped; bounded: a settling thread that called close() from a callback
        # holds the lock itself, and one stuck in a callback must not hang close().
        deadline = time.monotonic() + max(timeout, 1.0)
        mine = self._settler is threading.current_thread()
        locked = not mine and self._io_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
        while locked and self._spinners and time.monotonic() < deadline:
            time.sleep(0.001)   # spins last at most wait_spin_us (<= 0.1 s)
        safe = locked and not self._spinners
        try:
            for q in self._paths.values():
                q.sock.close(0)
                if q.lane is not None:
                    # The last take: posted while the I/O thread stopped (a submit racing close is
                    # refused from here on, so nothing lands in a lane no one reads).
                    for wire in self._take_posted(q, final=True):
                        if locked:
                            self._settlement.settle_unsafe(q, wire, "transfer manager closed")
                        else:
                            logger.warning("%s lane request %d posted at close: not settled (a thread held "
                                           "the I/O lock)", q.path.label, wire.rid)
                    if safe:
                        q.lane.close()
                    else:
                        logger.warning("%s lane: a thread still uses it at close; unlinked, left mapped",
                                       q.path.label)
                        q.lane.segment.unlink()
                    q.lane = None
        finally:
            if locked:
                self._io_lock.release()
        for end in (self._bell, self._ringer):
            if end is not None:
                end.close()
        self._bell = self._ringer = None
        for sock in (self._control, self._events):
            if sock is not None:
                sock.close(0)
        self._control = self._events = None
        self._ctx.term()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
        for q in self._paths.values():
            for fd in q.worker_fds.values():
                os.close(fd)
            q.worker_fds.clear()
        self._watched.clear()
        if self._supervisor_fd >= 0:
            os.close(self._supervisor_fd)
            self._supervisor_fd = -1

    def _unregister(self, timeout: float) -> bool:
        """Asks every worker to drop this engine's mappings, all at once, and waits (bounded) for
        each to say it did; True when every one answered (best effort: False is logged, not raised)."""
        deadline = time.monotonic() + timeout
        waiting = {}
        for q in self._registered_queues():
            try:
                q.sock.send(P.encode({"t": P.MsgType.UNREGISTER, "id": 0, "engine": self.engine_id}), zmq.NOBLOCK)
                waiting[q.sock] = q
            except zmq.ZMQError as err:
                logger.warning("%s: unregister not sent: %s", q.path.label, err)
        poller = zmq.Poller()
        for sock in waiting:
            poller.register(sock, zmq.POLLIN)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000) + 1):
                for payload in pending(sock):
                    try:
                        reply = P.decode(payload)
                    except ProtocolError:
                        continue
                    if reply.get("t") == P.MsgType.PONG and "dropped" in reply and sock in waiting:
                        del waiting[sock]
                        poller.unregister(sock)
                        break
        if waiting:
            logger.warning("unregister: no answer from the %s worker(s) within %.1f s; their mappings of this "
                           "engine's memory go when they exit", ", ".join(q.path.label for q in waiting.values()),
                           timeout)
        return not waiting

    def __enter__(self) -> TransferManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _blocks(values) -> Blocks:
    """Block indices of a submit: a short list or tuple of ints becomes an array('q') (numpy's
    per-call cost would be most of a 1-block submit), anything else a flat int64 ndarray."""
    if type(values) in (list, tuple) and len(values) <= SMALL_CHECK:
        try:
            return array("q", values)
        except (TypeError, OverflowError):
            pass   # floats, nested lists, ...: numpy's conversion (and its errors), as before
    return np.ascontiguousarray(np.asarray(values, dtype=np.int64)).reshape(-1)


def _collect_cuda_ipc() -> None:
    """Once the workers dropped their CUDA IPC mappings of our KV tensors, let torch free its
    bookkeeping of those shares; otherwise it warns at exit that a consumer still holds them."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.ipc_collect()
