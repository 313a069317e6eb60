"""A path worker process: one transfer path (D2H or H2D), one queue, one ROUTER socket.

Order of things:
  1. started by the supervisor with its path, generation, the G2 segment's name and the supervisor's
     pid; asks the kernel to kill it when the supervisor dies (PR_SET_PDEATHSIG), then checks that
     pid is still its parent (it may have died before prctl) and keeps checking every second
  2. maps G2 and, in CUDA mode, pins it with cudaHostRegister (timed: reported in READY)
  3. reads the instance's CURVE keys from the 0600 runtime dir, starts its ZAP Gatekeeper, binds
     its endpoint as a CURVE server (ipc socket file chmod 0600), tells the supervisor READY
  4. serves: drains every waiting message into a priority heap, answers control messages at once,
     runs the highest-priority copy, repeats. Engines first REGISTER their device memory and
     layouts, their host layout starting at host_offset of G2. Who may register beside whom
     (kvbm.workers.admission): with the shared G2 registry (--registry), an engine that is a live
     member of it (its id and pid in the registry's engine table, which the worker reads itself:
     the message is not trusted) registers exactly its namespace's range of G2, and engines of one
     namespace share theirs; every other engine is alone on the instance (the TP ranks of one
     engine register under one `group`, each over its own disjoint G2 range). A member's
     registration is held in its engine slot until it is dropped with no copy of it left running:
     a dead engine's G2 blocks are not reused while a copy may write them. XFER
     requests are validated against those (block indices in range, counts, caps) and
     against this worker's generation (a request meant for a dead predecessor is answered STALE
     and not executed, so nothing writes into blocks the engine already gave up on).
     A registration belongs to the connection (ROUTER routing id) that made it: xfer and
     unregister naming that engine from any other connection are refused, and so is a second
     register under its id from another connection while the engine lives. An engine may offer a
     shared-memory lane with its registration (kvbm.workers.lanes): its small requests then come
     through the lane's ring into the same heap, get the same checks, and are answered through
     its completion ring (errors and STALE still over ZeroMQ); an idle worker sleeps on its lanes'
     doorbell beside the socket (or polls them for lane_spin_us first). The queue is bounded
     in requests (MAX_QUEUED) and in bytes (MAX_QUEUED_BYTES); past either, ERROR at once.
Every failure inside a request becomes an ERROR completion, logged with exc_info; the loop goes on.
SIGTERM ends it cleanly (unpin, close); SIGINT is ignored, since the supervisor owns shutdown.
"""
from __future__ import annotations

import argparse
import ctypes
import heapq
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import zmq

from kvbm._fast.lane import FLAG_LAYERS, FLAG_RING_AHEAD
from kvbm._fast.lane import spin as spin_lanes
from kvbm.errors import KvbmError, ProtocolError
from kvbm.layout import BlockLayout, LayoutType
from kvbm.shared_g2 import SharedG2
from kvbm.shm import Segment, pid_alive
from kvbm.wire import protocol as P
from kvbm.wire.auth import ClientKeys, Gatekeeper, ServerKeys
from kvbm.wire.bell import Bell
from kvbm.wire.channel import bind_socket, connect_socket, make_context
from kvbm.workers.admission import Admission, Member
from kvbm.workers.copy import Copier, DeviceMemory
from kvbm.workers.lanes import LaneItem, WorkerBell, WorkerLane

logger = logging.getLogger(__name__)


@dataclass
class Registration:
    engine: str
    pid: int            # engine process (0: unknown); its registration goes when it dies
    device: BlockLayout
    host: BlockLayout
    memory: DeviceMemory
    copier: Copier
    ident: bytes        # routing id of the connection that registered: only it may use this
    group: str = ""     # the engine this registration is a TP rank of ("": an engine of its own)
    host_offset: int = 0  # byte of the G2 segment where its host layout starts
    lane: WorkerLane | None = None   # its shared-memory lane, when it offered one we could map
    member: Member | None = None     # its membership of the shared G2 (None: an engine of its own)


@dataclass
class WorkerStats:
    requests: int = 0
    blocks: int = 0
    bytes: int = 0
    errors: int = 0
    stale: int = 0
    malformed: int = 0
    busy_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "blocks": self.blocks, "bytes": self.bytes, "errors": self.errors,
                "stale": self.stale, "malformed": self.malformed, "busy_s": round(self.busy_s, 6),
                "uptime_s": round(time.monotonic() - self.started, 3)}


@dataclass
class InFlight:
    """A CUDA request launched on the worker's stream and not yet answered."""
    ident: bytes
    rid: int
    blocks: int
    nbytes: int
    events: list        # (event, last layer landed when it fires): one per layer, or one in all
    layers: bool
    t_recv: float
    t_start: float
    copier: Copier      # whose events they are (recycled once answered)
    landed: int = 0     # events known complete
    lane: WorkerLane | None = None   # answered through this lane (None: over ZeroMQ)


# CUDA requests kept launched at once: enough to hide one request's host-side work behind the
# copies of the others (the engine keeps transfer.manager.WINDOW requests at a worker).
MAX_IN_FLIGHT = 4
# Copy requests waiting in the heap: what the engines' windows need many times over; past it a
# request is answered ERROR at once instead of growing this process without bound.
MAX_QUEUED = 4096
# The same bound in bytes (frame sizes of the queued requests; a request's fields are checked
# before it is queued, so what it keeps is about its frame's size). A normal request is
# 16 bytes per block pair (4 KiB for 256 pairs): 64 MiB is thousands of them, while 60 frames of
# 15 MiB once took a worker from 45 MiB to 1.47 GB.
MAX_QUEUED_BYTES = 64 << 20
SPIN_SLICE_US = 20.0   # an idle worker's lane spin checks ZeroMQ this often
WOKE_SOCKET, WOKE_BELL = 1, 2   # what ended a worker's sleep (_sleep)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: an orphaned worker would pin memory forever
    except OSError:
        logger.debug("prctl unavailable; relying on the parent-pid check")


class PathWorker(Admission):
    PIN_HOST = True  # CUDA mode pins G2 in this process (the disk worker's NIXL POSIX I/O does not need it)
    SHARED_ENGINES = True  # members of one shared G2 namespace register side by side (the disk worker: one store)
    LANES = True     # takes small requests through shared-memory lanes (the disk worker's carry per-block arrays)
    XFER_FIELDS = P.XFER_FIELDS  # what an xfer may carry (the disk worker's carry per-block arrays too)

    def __init__(self, args: argparse.Namespace) -> None:
        self.path = P.Path[args.path.upper()]
        self.gen = args.gen
        self.cuda = bool(args.cuda)
        self.threads = args.copy_threads
        self.max_batch = min(args.max_batch_blocks, P.MAX_BATCH_BLOCKS)
        self.delay_s = args.delay_ms / 1000.0
        self.spin_s = max(0, getattr(args, "lane_spin_us", 0)) / 1e6
        self.parent = args.parent_pid or os.getppid()
        self.stats = WorkerStats()
        self.engines: dict[str, Registration] = {}
        self._stop = False
        self._queue: list = []
        self._queued_bytes = 0
        self._in_flight: list[InFlight] = []
        self._busy_until = 0.0
        self._seq = 0
        self.host_segment = Segment.attach(args.segment, args.segment_size, populate=True)
        registry = getattr(args, "registry", "")
        self.g2 = SharedG2.attach(registry) if registry else None   # the shared G2's engine table
        self.g2_block_bytes = getattr(args, "registry_block_bytes", 0)
        self.g2_ranks = max(1, getattr(args, "registry_ranks", 1))   # TP ranks' regions of G2
        self.worker_bit = 1 << int(self.path)   # this worker's bit in an engine slot's `workers`
        self.pin_s = self.host_segment.pin() if self.cuda and self.PIN_HOST else 0.0
        server_keys, client_keys = _read_keys(args.keys_dir)
        self.ctx = make_context()
        self.gate = Gatekeeper(self.ctx, server_keys).start()
        self.sock = bind_socket(self.ctx, zmq.ROUTER, args.endpoint, self.gate)
        self.control = connect_socket(self.ctx, zmq.DEALER, args.control, client_keys)
        self.bells = WorkerBell(args.endpoint, self.path.label) if self.LANES else None

    # ---- loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.control.send(P.encode({"t": P.MsgType.READY, "path": int(self.path), "gen": self.gen,
                                    "pid": os.getpid(), "pin_s": self.pin_s,
                                    "pinned_bytes": self.host_segment.size if self.cuda and self.PIN_HOST else 0}))
        # One socket and the lanes' doorbell: zmq_poll over a list built once costs less than a
        # Poller (~1.4 against ~3 us a call, paid on every request).
        items = [(self.sock, zmq.POLLIN)]
        bell = self.bells.bell if self.bells is not None else None
        if bell is not None:
            items.append((bell.fileno(), zmq.POLLIN))
        try:
            self._loop(items, bell)
        finally:
            # Whatever ends the loop, the mappings go before the process does: an engine counts
            # a worker that exits by itself (not by a signal) as having released its CUDA shares
            # (kvbm.transfer.memory_map.HeldShares).
            try:
                self._finish_in_flight()
            finally:
                self.close()

    def _loop(self, items: list, bell: Bell | None) -> None:
        next_check = time.monotonic() + 1.0
        while not self._stop:
            socket_ready = True
            if not self._queue and not self._in_flight:
                woke = self._sleep(items)
                if bell is not None and woke & WOKE_BELL:
                    bell.drain()
                if not woke:
                    if self._parent_gone():
                        break
                    continue
                # Woken by a lane's bell alone: no ZeroMQ receive that would only raise Again
                # (~3.5 us of a 1-block round trip); a message that comes meanwhile is taken on
                # the next turn (the turn after a launch checks the socket before waiting).
                socket_ready = bool(woke & WOKE_SOCKET)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 1.0
                if self._parent_gone():
                    break
                self._drop_dead_engines()
            if socket_ready:
                self._drain()
            self._take_lanes()
            while self._queue and len(self._in_flight) < MAX_IN_FLIGHT:
                _, _, ident, msg, t_recv, nbytes = heapq.heappop(self._queue)
                self._queued_bytes -= nbytes
                self._execute(ident, msg, t_recv)
            if self._in_flight:
                # Wait on the GPU only when there is nothing new to launch.
                self._progress(wait=len(self._in_flight) >= MAX_IN_FLIGHT
                               or not (zmq.zmq_poll(items[:1], 0) or self._lanes_pending()))

    def _sleep(self, items: list) -> int:
        """Blocks until a message, a doorbell or 200 ms; returns what woke it (WOKE_* bits, the
        socket's and the bell's from the poll; both when a lane had work before it slept), 0 on
        the timeout. Each lane is told first that we sleep (its engine rings our bell on its next
        post), and a lane posted to in between is not slept on at all."""
        maybe_all = WOKE_SOCKET | WOKE_BELL
        lanes = self._lanes()
        if lanes and self.spin_s:
            # Work that comes within the spin starts without a wake-up (the engine's next request
            # of a step usually does): the rings are polled without the GIL in slices, ZeroMQ
            # between them.
            rings = [lane.ring for lane in lanes]
            until = time.monotonic() + self.spin_s
            while time.monotonic() < until:
                if spin_lanes(rings, False, SPIN_SLICE_US) or zmq.zmq_poll(items[:1], 0):
                    return maybe_all
        if not all([lane.ring.worker_sleep() for lane in lanes]):
            for lane in lanes:
                lane.ring.worker_wake()
            return maybe_all
        try:
            woke = 0
            for item, _ in zmq.zmq_poll(items, 200):
                woke |= WOKE_SOCKET if item is self.sock else WOKE_BELL
            return woke
        finally:
            for lane in lanes:
                lane.ring.worker_wake()

    def _lanes(self) -> list[WorkerLane]:
        """The lanes in service (none in a worker that takes none: the disk worker's registrations
        have no lane)."""
        if self.bells is None:
            return []
        return [reg.lane for reg in self.engines.values() if reg.lane is not None and not reg.lane.broken]

    def _lanes_pending(self) -> bool:
        return any(lane.ring.has_requests() for lane in self._lanes())

    def _take_lanes(self) -> None:
        """Moves the lanes' requests into the heap beside ZeroMQ's, priorities and all."""
        if self.bells is None:
            return
        for reg in self.engines.values():
            if reg.lane is None:
                continue
            items = reg.lane.take()
            if items:
                t_recv = time.monotonic()
                for item in items:
                    self._seq += 1
                    heapq.heappush(self._queue, (-item.prio, self._seq, reg.ident, item, t_recv, 0))

    def _parent_gone(self) -> bool:
        if os.getppid() == self.parent:
            return False
        logger.error("%s worker: supervisor %d is gone; exiting", self.path.label, self.parent)
        return True

    def _request_stop(self) -> None:
        self._stop = True

    def _drain(self) -> None:
        """Takes every waiting message: control ones are answered now, copies go to the heap."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            t_recv = time.monotonic()
            if len(frames) != 2:
                self.stats.malformed += 1
                logger.warning("%s worker: dropped a message of %d frames (expected identity + payload)",
                               self.path.label, len(frames))
                if len(frames) >= 2:
                    self._reply(frames[0], P.make_done(-1, P.Status.ERROR,
                                                       f"expected 1 payload frame, got {len(frames) - 1}"))
                continue
            ident, payload = frames
            try:
                msg = P.decode(payload)
            except ProtocolError as err:
                self._malformed(ident, None, err)
                continue
            kind = msg["t"]
            try:
                engine = P.engine_of(msg)  # before any use as a dict key (an unhashable one would raise)
                if kind == P.MsgType.XFER:
                    P.check_xfer_fields(msg, self.XFER_FIELDS)  # nothing but the fields of a request stays queued
                    size = len(payload)
                    if len(self._queue) >= MAX_QUEUED or self._queued_bytes + size > MAX_QUEUED_BYTES:
                        self.stats.errors += 1
                        self._reply(ident, P.make_done(P.request_id_of(msg), P.Status.ERROR,
                                                       f"worker queue full: {len(self._queue)} requests, "
                                                       f"{self._queued_bytes} bytes queued (at most {MAX_QUEUED} "
                                                       f"requests, {MAX_QUEUED_BYTES} bytes); this one is "
                                                       f"{size} bytes", gen=self.gen))
                        continue
                    prio = msg.get("prio", 0)
                    prio = prio if isinstance(prio, int) and not isinstance(prio, bool) else 0
                    self._seq += 1
                    self._queued_bytes += size
                    heapq.heappush(self._queue, (-prio, self._seq, ident, msg, t_recv, size))
                elif kind == P.MsgType.REGISTER:
                    self._register(ident, msg)
                elif kind == P.MsgType.UNREGISTER:
                    self._check_owner(ident, self.engines.get(engine), "unregister")  # type: ignore[arg-type]
                    self._finish_in_flight()  # no copy may still read or write the mappings
                    reg = self.engines.pop(engine, None)  # type: ignore[arg-type]
                    if reg is not None:
                        self._forget(reg)
                    self._reply(ident, {"t": P.MsgType.PONG, "id": P.request_id_of(msg), "gen": self.gen,
                                        "dropped": reg is not None})
                elif kind == P.MsgType.STATS:
                    self._reply(ident, {"t": P.MsgType.STATS, "id": P.request_id_of(msg), "path": int(self.path),
                                        "gen": self.gen, "queue": len(self._queue), "pid": os.getpid(),
                                        "engines": len(self.engines), **self.stats.as_dict(),
                                        **self._stats_extra()})
                elif kind == P.MsgType.PING:
                    self._reply(ident, {"t": P.MsgType.PONG, "gen": self.gen, "id": P.request_id_of(msg)})
                else:
                    self._other_message(ident, kind, msg)
            except (KvbmError, OSError) as err:
                self._malformed(ident, msg, err)
            except Exception as err:  # noqa: BLE001 - the process boundary: no message may kill the worker
                self._failed(ident, P.request_id_of(msg), err)

    # Hooks of a worker with more to say (kvbm.workers.disk_worker).
    def _other_message(self, ident: bytes, kind: str, msg: dict) -> None:
        raise ProtocolError(f"unknown message type {kind!r:.40} for a path worker")

    def _stats_extra(self) -> dict:
        return {}

    def _malformed(self, ident: bytes, msg, err: Exception) -> None:
        self.stats.malformed += 1
        logger.warning("%s worker gen %d: rejected a message: %s", self.path.label, self.gen, err)
        self._reply(ident, P.make_done(P.request_id_of(msg), P.Status.ERROR, f"rejected: {err}", gen=self.gen))

    def _failed(self, ident: bytes, rid: int, err: Exception) -> None:
        self.stats.errors += 1
        logger.error("%s worker gen %d: request %d failed", self.path.label, self.gen, rid, exc_info=True)
        self._reply(ident, P.make_done(rid, P.Status.ERROR, f"{type(err).__name__}: {err}", gen=self.gen))

    def _reply(self, ident: bytes, msg: dict) -> None:
        try:
            self.sock.send_multipart([ident, P.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("%s worker: reply to a slow engine dropped (send queue full)", self.path.label)

    # ---- register --------------------------------------------------------------------------
    def _register(self, ident: bytes, msg: dict) -> None:
        device_map, host_map, memory = P.validate_register(msg)
        device = P.layout_from_wire(device_map)
        host, group, host_offset = self._host_placement(msg, host_map)
        engine = msg["engine"]
        member = self._admit(engine, int(msg.get("pid", 0)), group, host_offset, host)
        self._check_owner(ident, self.engines.get(engine), "register")
        self._finish_in_flight()
        old = self.engines.pop(engine, None)
        if old is not None:
            self._forget(old)     # a re-registration: the old mappings go in the same order as any other's
        mem = DeviceMemory(memory, device, self.cuda)
        try:
            host_ptrs = [self.host_segment.address + host_offset]
            if self.path is P.Path.D2H:
                copier = Copier(device, mem.ptrs, host, host_ptrs, self.cuda, self.threads, memory.get("device", 0))
            else:
                copier = Copier(host, host_ptrs, device, mem.ptrs, self.cuda, self.threads, memory.get("device", 0))
        except BaseException:
            mem.close()
            raise
        lane, lane_error = self._attach_lane(msg, engine)
        reg = Registration(engine, int(msg.get("pid", 0)), device, host, mem, copier, ident, group, host_offset,
                           lane, member)
        try:
            self._hold(reg)
        except ProtocolError:
            _drop(reg)
            raise
        self.engines[engine] = reg
        logger.info("%s worker gen %d: engine %s registered (%d device blocks, %d host blocks at G2 byte %d, %s%s)",
                    self.path.label, self.gen, engine, device.num_blocks, host.num_blocks, host_offset, mem.kind,
                    ", lane" if lane else "")
        reply = {"t": P.MsgType.REGISTERED, "id": P.request_id_of(msg), "gen": self.gen,
                 "path": int(self.path), "pid": os.getpid(), "cuda": self.cuda}
        if lane is not None:
            reply.update(lane=True, bell=self.bells.path)
        elif lane_error:
            reply["lane_error"] = lane_error
        self._reply(ident, reply)

    def _attach_lane(self, msg: dict, engine: str) -> tuple[WorkerLane | None, str]:
        """The lane the engine offers, mapped and checked; (None, why) when it cannot be used: the
        registration itself stands, and that engine's requests all go over ZeroMQ."""
        offer = P.register_lane(msg)
        if offer is None:
            return None, ""
        if self.bells is None:
            return None, f"the {self.path.label} worker takes no lanes"
        try:
            return WorkerLane.attach(offer, engine, self.bells), ""
        except (KvbmError, OSError, ValueError) as err:
            logger.warning("%s worker: the lane engine %s offered is refused: %s", self.path.label, engine, err)
            return None, str(err)

    def _host_placement(self, msg: dict, host_map: dict) -> tuple[BlockLayout, str, int]:
        """(host layout, group, host_offset) of a register request, the layout checked to fit in
        G2 from host_offset on."""
        host = P.layout_from_wire(host_map)
        if host.layout_type is not LayoutType.FULLY_CONTIGUOUS:
            raise ProtocolError("the host layout must be FULLY_CONTIGUOUS")
        group, host_offset = P.register_placement(msg)
        if host_offset + host.total_bytes > self.host_segment.size:
            raise ProtocolError(f"host layout of {host.num_blocks} blocks needs {host.total_bytes} bytes from G2 "
                                f"byte {host_offset} (to {host_offset + host.total_bytes}); the G2 segment holds "
                                f"{self.host_segment.size}")
        return host, group, host_offset

    def _forget(self, reg) -> None:
        """Drops a registration (no copy of it may still run: the caller finished them) and lets go
        of its engine slot in the shared G2."""
        _drop(reg)
        self._let_go(reg)

    def _refuse_second_engine(self, engine: str, group: str, host_offset: int, host: BlockLayout) -> None:
        """An engine's registry manages every G2 block its host layout covers, so two engines on one
        instance that do not share the G2 registry would overwrite each other's blocks: one live
        engine per instance: a dead one (pid gone) or one that unregistered frees the slot; the same
        engine registering again (worker restart) is fine. The TP ranks of one engine (registrations
        sharing one non-empty `group`) are one engine: they coexist, each over its own G2 range, and
        ranges that overlap are refused."""
        self._drop_dead_engines()
        for other, reg in self.engines.items():
            if other == engine:
                continue
            if not group or reg.group != group:
                raise ProtocolError(f"engine {other!r:.80} (pid {reg.pid}) is already attached to this kvbm "
                                    f"instance (G2 segment {self.host_segment.name}); a second engine would "
                                    f"overwrite its host blocks. Close it first, or give this engine its own "
                                    f"instance_id" + ("" if self.g2 is not None else
                                                      " (engines share an instance whose kvbm-workers runs with "
                                                      "the model's --layout: the shared G2 registry)"))
            lo, hi = host_offset, host_offset + host.total_bytes
            other_lo, other_hi = reg.host_offset, reg.host_offset + reg.host.total_bytes
            if lo < other_hi and other_lo < hi:
                raise ProtocolError(f"{engine!r:.80} of group {group!r:.80} asks for G2 bytes [{lo}, {hi}), which "
                                    f"overlap [{other_lo}, {other_hi}) of {other!r:.80}: the ranks of one engine "
                                    f"need disjoint host ranges")

    def _check_owner(self, ident: bytes, reg: Registration | None, action: str) -> None:
        """A registration is used, replaced or dropped only by the connection that made it (a
        dead engine's is dropped first, by _drop_dead_engines, so its successor may register)."""
        if reg is not None and reg.ident != ident:
            raise ProtocolError(f"{action} refused: engine {reg.engine!r:.80} (pid {reg.pid}) is registered by "
                                f"another connection")

    # ---- transfers -------------------------------------------------------------------------
    def _execute(self, ident: bytes, msg: dict | LaneItem, t_recv: float) -> None:
        if type(msg) is LaneItem:
            self._execute_lane(ident, msg, t_recv)
            return
        rid = P.request_id_of(msg)
        try:
            gen = msg.get("gen")
            if gen != self.gen:
                self.stats.stale += 1
                self._reply(ident, P.make_done(rid, P.Status.STALE,
                                               f"request for generation {gen!r}; this {self.path.label} worker is "
                                               f"generation {self.gen}", gen=self.gen))
                return
            if msg.get("path") != int(self.path):
                raise ProtocolError(f"path {msg.get('path')!r} sent to the {self.path.label} worker")
            reg = self.engines.get(msg.get("engine"))  # type: ignore[arg-type]
            if reg is None:
                raise ProtocolError(f"engine {msg.get('engine')!r:.60} has not registered with this worker")
            copier = reg.copier
            src, dst = P.validate_xfer(msg, copier.src.num_blocks, copier.dst.num_blocks, self.max_batch)
            self._check_owner(ident, reg, "xfer")  # after the checks that need no owner, before any copy
        except ProtocolError as err:
            self._malformed(ident, msg, err)
            return
        except Exception as err:  # noqa: BLE001 - the process boundary: no message may kill the worker
            self._failed(ident, rid, err)
            return
        self._run_copy(ident, rid, copier, src, dst, bool(msg.get("layers")), t_recv)

    def _execute_lane(self, ident: bytes, item: LaneItem, t_recv: float) -> None:
        """A lane request: the same checks as an xfer's (generation, owner, indices, distinct
        destinations), from fixed-size fields instead of msgpack. A failure is answered over
        ZeroMQ with its text, as any request's."""
        rid = item.rid
        reg = next((r for r in self.engines.values() if r.lane is item.lane), None)
        if reg is None:
            return   # its engine unregistered or died since: nobody waits for the answer
        try:
            if item.gen != self.gen:
                self.stats.stale += 1
                self._reply(ident, P.make_done(rid, P.Status.STALE,
                                               f"request for generation {item.gen}; this {self.path.label} worker "
                                               f"is generation {self.gen}", gen=self.gen))
                return
            copier = reg.copier
            src, dst = P.check_pair(P.check_blocks(item.src, "src", copier.src.num_blocks, self.max_batch),
                                    P.check_blocks(item.dst, "dst", copier.dst.num_blocks, self.max_batch))
        except ProtocolError as err:
            self._malformed(ident, {"id": rid}, err)
            return
        self._run_copy(ident, rid, copier, src, dst, bool(item.flags & FLAG_LAYERS), t_recv, item.lane,
                       bool(item.flags & FLAG_RING_AHEAD))

    def _run_copy(self, ident: bytes, rid: int, copier: Copier, src, dst, layers: bool, t_recv: float,
                  lane: WorkerLane | None = None, ring_ahead: bool = False) -> None:
        """`ring_ahead`: wake the engine's I/O thread as the copy starts (after the launch for CUDA,
        before the copy on the CPU), so that its wake-up overlaps the copy (FLAG_RING_AHEAD)."""
        t_start = time.monotonic()
        try:
            if self.delay_s:
                time.sleep(self.delay_s)  # test hook (KvbmConfig.worker_delay_ms): widen the in-flight window
            if copier.cuda:
                try:
                    events = copier.launch_groups(src, dst, layers)
                except BaseException:
                    copier.drain()  # layers enqueued before the failure must not land after the ERROR
                    raise
                self._in_flight.append(InFlight(ident, rid, int(src.shape[0]), int(src.shape[0]) * copier.block_bytes,
                                                events, layers, t_recv, t_start, copier, lane=lane))
                if ring_ahead:
                    lane.ring_ahead()
                return
            if ring_ahead:
                lane.ring_ahead()
            on_layer = (lambda layer: self._layer(ident, rid, layer, lane)) if layers else None
            nbytes = copier.copy(src, dst, on_layer)
        except Exception as err:  # noqa: BLE001 - any copy failure becomes a failed completion
            self._failed(ident, rid, err)
            return
        self._done(ident, rid, int(src.shape[0]), nbytes, t_recv, t_start, lane)

    def _layer(self, ident: bytes, rid: int, layer: int, lane: WorkerLane | None) -> None:
        if lane is not None:
            lane.layer(rid, layer)
        else:
            self._reply(ident, P.make_layer(rid, layer))

    def _done(self, ident: bytes, rid: int, blocks: int, nbytes: int, t_recv: float, t_start: float,
              lane: WorkerLane | None = None) -> None:
        t_end = time.monotonic()
        self.stats.requests += 1
        self.stats.blocks += blocks
        self.stats.bytes += nbytes
        # Launched copies overlap: count only the part of this one that no earlier one covered.
        self.stats.busy_s += max(0.0, t_end - max(t_start, self._busy_until))
        self._busy_until = t_end
        queue_us, copy_us = int((t_start - t_recv) * 1e6), int((t_end - t_start) * 1e6)
        if lane is not None and lane.complete(rid, nbytes, queue_us, copy_us):
            return
        self._reply(ident, P.make_done(rid, P.Status.OK, nbytes=nbytes, gen=self.gen,
                                       queue_us=queue_us, copy_us=copy_us))

    def _progress(self, wait: bool) -> None:
        """Answers launched requests in launch order (one stream: they complete in that order):
        layer messages as layers land, DONE when the last event fires. With `wait`, blocks until
        the oldest request's next event fires; a CUDA error there fails that request."""
        while self._in_flight:
            req = self._in_flight[0]
            try:
                landed = req.landed
                if wait and landed < len(req.events):
                    req.events[landed][0].synchronize()
                    wait = False
                    landed += 1      # fired: no query of it again
                while landed < len(req.events) and req.events[landed][0].query():
                    landed += 1
            except Exception as err:  # noqa: BLE001 - an asynchronous CUDA error fails the request
                self._in_flight.pop(0)
                self.stats.errors += 1
                logger.error("%s worker gen %d: request %d failed", self.path.label, self.gen, req.rid, exc_info=True)
                self._reply(req.ident, P.make_done(req.rid, P.Status.ERROR, f"{type(err).__name__}: {err}",
                                                   gen=self.gen))
                continue
            if req.layers and landed > req.landed and landed < len(req.events):
                self._layer(req.ident, req.rid, req.events[landed - 1][1], req.lane)  # every layer <= it is there
            req.landed = landed
            if landed < len(req.events):
                return
            self._in_flight.pop(0)
            req.copier.recycle(req.events, req.nbytes)
            self._done(req.ident, req.rid, req.blocks, req.nbytes, req.t_recv, req.t_start, req.lane)

    def _finish_in_flight(self) -> None:
        while self._in_flight:
            self._progress(wait=True)

    def _drop_dead_engines(self) -> None:
        """An engine that died without unregistering leaves mappings (a deleted shm segment's
        memory, CUDA IPC handles) that only this process still holds: drop them."""
        for engine, reg in list(self.engines.items()):
            if reg.pid and not pid_alive(reg.pid):
                self._finish_in_flight()
                logger.warning("%s worker: engine %s (pid %d) is gone; dropping its registration",
                               self.path.label, engine, reg.pid)
                self._forget(self.engines.pop(engine))

    def close(self) -> None:
        for reg in self.engines.values():
            self._forget(reg)
        self.engines.clear()
        self.sock.close(0)
        self.control.close(0)
        if self.bells is not None:
            self.bells.close()
        self.gate.stop()  # after the server socket: libzmq admits anyone while no handler is bound
        self.ctx.term()
        self.host_segment.close()
        if self.g2 is not None:
            self.g2.close()
            self.g2 = None


def _drop(reg: Registration) -> None:
    """An engine's mappings go, in order: nothing of ours may still run on its memory (the copier's
    stream drained: torch's release of an IPC mapping waits only for the current stream, and ours
    is another), then the CUDA IPC tensors are dropped (which tells the engine's torch, through its
    ref counters, that this consumer is done) or the CPU-mode segment unmapped. The disk worker's
    registrations have no copier and no device memory (a _NoMemory)."""
    copier = getattr(reg, "copier", None)
    if copier is not None:
        copier.drain()
    reg.memory.close()
    lane = getattr(reg, "lane", None)
    if lane is not None:
        lane.close()


def _read_keys(keys_dir: str) -> tuple[ServerKeys, ClientKeys]:
    server = ServerKeys.read(keys_dir) if keys_dir else None
    client = ClientKeys.read(keys_dir) if keys_dir else None
    if server is None or client is None:
        raise KvbmError(f"no CURVE keys in {keys_dir or '(no --keys-dir)'}: a path worker serves only "
                        f"authenticated peers")
    return server, client


def build_parser(paths=P.WORKER_PATHS, prog: str = "kvbm-path-worker") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="kvbm path worker (started by kvbm-workers)")
    ap.add_argument("--path", required=True, choices=[p.label for p in paths])
    ap.add_argument("--gen", type=int, required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--keys-dir", default="", help="the 0600 runtime dir holding the instance's CURVE keys")
    ap.add_argument("--segment", required=True)
    ap.add_argument("--segment-size", type=int, required=True)
    ap.add_argument("--cuda", type=int, default=0)
    ap.add_argument("--copy-threads", type=int, default=0)
    ap.add_argument("--max-batch-blocks", type=int, default=P.MAX_BATCH_BLOCKS)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--lane-spin-us", type=int, default=0,
                    help="keep polling the lanes this long before sleeping on the doorbell")
    ap.add_argument("--registry", default="", help="the shared G2 registry's segment (its engine table)")
    ap.add_argument("--registry-block-bytes", type=int, default=0, help="bytes of one G2 block of the shared registry")
    ap.add_argument("--registry-ranks", type=int, default=1,
                    help="G2 regions (tensor-parallel ranks) the shared registry's blocks span")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--parent-pid", type=int, default=0,
                    help="the supervisor's pid: a worker whose parent is no longer it exits (default: getppid())")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None, worker_cls: type[PathWorker] | None = None, parse=parse_args) -> int:
    _die_with_parent()
    args = parse(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {args.path}[{os.getpid()}] gen{args.gen} %(levelname)s %(message)s")
    if args.parent_pid and os.getppid() != args.parent_pid:
        # The supervisor died before prctl ran: PR_SET_PDEATHSIG will never fire for it.
        logger.error("%s worker: supervisor %d is gone before this worker started; exiting", args.path, args.parent_pid)
        return 0
    try:
        worker = (worker_cls or PathWorker)(args)
    except (KvbmError, OSError, zmq.ZMQError):
        logger.critical("%s worker failed to start", args.path, exc_info=True)
        return 2
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
