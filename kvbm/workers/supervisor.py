"""The kvbm-workers supervisor: owns G2 and the G3 folder, runs and restarts the path workers.

Order of things:
  1. take the instance lock in the 0700 runtime dir; leftovers of a killed predecessor (socket
     files, endpoints.json, the G2 segment and the shared registries' segments, device segments of
     dead engines) are removed
  2. create the G2 segment (0600), pre-fault it on threads (timed), create/validate the G3 folder;
     with the model layout known (--layout), the shared G2 registry's segment too
     (kvbm.shared_g2: host_bytes // block_stride blocks, partitioned among the engines' namespaces),
     named in the welcome and given to every worker (each checks engines against its engine table);
     with a disk tier as well, the shared G3's slot table and checksum segments (kvbm.shared_g3:
     every engine of the model reads and writes the one store through them), named in the welcome
     and given to the disk worker. A killed supervisor's segments go at the next start (1.)
  3. write the instance's CURVE keys (0600) and start the ZAP Gatekeeper (kvbm.wire.auth), bind
     the control ROUTER and the event PUB socket as CURVE servers, write endpoints.json: only a
     peer that read the keys from the 0600 runtime dir gets an answer or an event
  4. start one process per worker path (D2H, H2D), and with a disk tier the disk worker (H2DISK and
     DISK2H in one process, kvbm.workers.disk_worker; same restart rules; same CURVE keys). Each
     maps and, in CUDA mode, pins G2 itself and says READY (with its pinning time); the supervisor
     then publishes {event started, path, gen} (for each path the process serves). Without a disk
     tier the control socket answers disk requests "no disk tier".
  5. serve: answer hello/status/stats/restart on the control socket, poll workers for stats every
     second, reap the shared registry's dead engines every sweep, log one summary line per
     interval; a worker that exits is reported ({event died, path, gen, exitcode}: engines fail
     what they sent to that generation) and restarted as gen+1.
     A restart is taken only from the connection an engine reports its stats on, for the
     generation that engine's report says its transfers use (and that is still running).
  6. SIGINT/SIGTERM: stop workers (SIGTERM, then SIGKILL past a deadline) and reap them, publish
     {died, path, gen} for each and then stopping, unlink the segments, remove sockets, lock and folder.

Why D2H and H2D are separate processes: each has its own CUDA stream and queue, so an offload
burst never delays an onboard the engine is waiting on; a CUDA context per process costs
GPU memory (typically a few hundred MB; not yet measured in this repo), which is the price of that
isolation (and of restarting one path without the other).
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import zmq

import kvbm
from kvbm.config import KvbmConfig, lane_spin_default
from kvbm.errors import ConfigError, KvbmError, ProtocolError
from kvbm.progress import PERIOD_S, Progress
from kvbm.shared_g2 import SharedG2
from kvbm.shared_g3 import create_g3
from kvbm.shm import (
    REGISTRY_KIND,
    RuntimeDir,
    Segment,
    clean_dead_device_segments,
    clean_stale_segments,
    segment_name,
)
from kvbm.wire import protocol as P
from kvbm.wire.auth import ClientKeys, Gatekeeper, create_keys
from kvbm.wire.channel import Endpoints, bind_socket, connect_socket, make_context, pending

logger = logging.getLogger(__name__)

RESTART_WINDOW_S = 30.0
RESTART_BURST = 5          # deaths within the window before restarts are delayed
RESTART_BACKOFF_S = 1.0
STOP_GRACE_S = 5.0
STATS_PERIOD_S = 1.0
SWEEP_PERIOD_S = 2.0
# An engine's STATS report as kept here: numbers, and maps of numbers (or of maps of numbers) with
# short keys; anything else an engine sends is dropped, so a report cannot grow this process.
WORKER_FIELDS = frozenset({"id", "queue", "requests", "blocks", "bytes", "errors", "stale", "malformed", "busy_s",
                           "uptime_s", "engines", "pid"})
ENGINE_NUMBERS = ("inflight_bytes", "held")
ENGINE_MAPS = ("queues", "pools", "counters", "generations")
MAX_ENGINES = 256
MAX_MAP_KEYS = 16
MAX_KEY_CHARS = 32


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and \
        abs(value) < 2**63


def _numeric_map(value: object, depth: int) -> dict | None:
    """`value` if it is a small map of numbers (nested `depth` more levels), else None."""
    if not isinstance(value, dict) or len(value) > MAX_MAP_KEYS:
        return None
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            return None
        if _number(item):
            out[key] = item
        elif depth > 0 and (inner := _numeric_map(item, depth - 1)) is not None:
            out[key] = inner
        else:
            return None
    return out


def engine_report(msg: dict) -> dict:
    """The whitelisted fields of an engine's STATS message."""
    report: dict = {key: msg[key] for key in ENGINE_NUMBERS if _number(msg.get(key))}
    for key in ENGINE_MAPS:
        value = _numeric_map(msg.get(key), 1)
        if value is not None:
            report[key] = value
    return report


# Engine slots of the shared G2: data-parallel vLLM replicas take one per rank and one per scheduler
# side (8 GPUs: DP 8 x TP 1 is 16), and a replica restarting before its dead entries are reaped
# needs as many again.
REGISTRY_ENGINES = 32


@dataclass
class WorkerSlot:
    path: P.Path
    gen: int = 0
    proc: subprocess.Popen | None = None
    ready: bool = False
    restarts: int = 0
    pin_s: float = 0.0
    deaths: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RESTART_BURST))
    restart_at: float = 0.0
    stats: dict = field(default_factory=dict)
    dealer: zmq.Socket | None = None
    prev_bytes: int = 0
    spawned_at: float = 0.0       # monotonic time of the last spawn: "still pinning" lines until READY
    waiting_logged: float = 0.0   # when the last of those lines was logged


class Supervisor:
    def __init__(self, config: KvbmConfig, host_bytes: int, cuda: bool, interval: float = 10.0,
                 log_level: str = "INFO") -> None:
        if host_bytes <= 0:
            raise ConfigError(f"the host pool needs a size > 0 bytes, got {host_bytes}")
        self.config = config
        self.host_bytes = host_bytes
        self.cuda = cuda
        self.interval = interval
        self.log_level = log_level
        self.rundir = RuntimeDir(config.resolved_runtime_dir())
        self.endpoints = Endpoints.for_config(self.rundir.path, config.transport, config.tcp_port)
        self.slots = {p: WorkerSlot(p) for p in P.WORKER_PATHS}
        if config.disk_path and (config.disk_blocks or config.disk_size):
            self.slots[P.Path.H2DISK] = WorkerSlot(P.Path.H2DISK)  # the disk worker: H2DISK and DISK2H
        self.segment: Segment | None = None
        self.registry: SharedG2 | None = None      # the shared G2 registry, when the layout is known
        self.g3: SharedG2 | None = None            # the shared G3 slot table (kvbm.shared_g3), with a disk tier
        self._g3_sums = None                       # its checksum segment
        self.engines: dict[str, dict] = {}
        self._engine_conn: dict[str, bytes] = {}   # engine -> routing id of the connection it reports on
        self.prefault_s = 0.0
        self.started = time.monotonic()
        self._stop = False
        self._ctx: zmq.Context | None = None
        self._control: zmq.Socket | None = None
        self._events: zmq.Socket | None = None
        self._gate: Gatekeeper | None = None
        self._client_keys: ClientKeys | None = None
        self._disk_dir: str | None = None
        self._stats_seq = 0
        self.parent_pid = 0     # embedded mode (--exit-with-parent): stop once this is not our parent
        self.idle_exit_s = 0.0  # shared embedded mode (--exit-when-idle): stop after this long with no engine
        self.g2_ranks = 1       # G2 regions of tensor-parallel ranks under the shared registry (--g2-ranks)
        from kvbm.metrics import SupervisorMetrics
        self.metrics = SupervisorMetrics()

    # ---- start -------------------------------------------------------------------------------
    def start(self) -> None:
        removed = self.rundir.acquire()
        try:
            removed += clean_stale_segments(self.config.instance_id, include_host_pool=True)
            removed += [n for n in clean_dead_device_segments() if n not in removed]
            if removed:
                logger.warning("cleaned up after a previous run: %s", ", ".join(sorted(removed)))
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        name = segment_name(self.config.instance_id)
        gb = self.host_bytes / 1e9
        t0 = time.perf_counter()
        progress = Progress(f"allocating G2 ({gb:.2f} GB)", self.host_bytes, logger)
        self.segment = Segment.create(name, self.host_bytes, progress=progress.update)  # fallocate'd
        progress.finish()
        alloc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        import torch  # noqa: F401 - the pre-fault's memset; imported first so that its clock starts after it
        logger.debug("import torch took %.2f s", time.perf_counter() - t0)
        progress = Progress(f"pre-faulting G2 ({gb:.2f} GB)", self.host_bytes, logger)
        self.prefault_s = self.segment.prefault(progress=progress.update)  # the touching only, not import torch
        progress.finish()
        self.metrics.host_bytes.set(self.host_bytes)
        self.metrics.prefault_seconds.set(self.prefault_s)
        logger.info("G2 host pool %.3f GB in /dev/shm/%s: allocated in %.3f s, pre-faulted in %.3f s (%.1f GB/s)",
                    gb, self.segment.name, alloc_s, self.prefault_s, gb / max(self.prefault_s, 1e-9))
        self._make_registry()
        if self.config.disk_path and (self.config.disk_blocks or self.config.disk_size):
            self._disk_dir = self._prepare_disk(self.config.disk_path)
            self._make_g3()
        self._ctx = make_context()
        server_keys, self._client_keys = create_keys(self.rundir.path)  # before endpoints.json names the sockets
        self._gate = Gatekeeper(self._ctx, server_keys).start()
        self._control = bind_socket(self._ctx, zmq.ROUTER, self.endpoints.control, self._gate)
        self._events = bind_socket(self._ctx, zmq.PUB, self.endpoints.events, self._gate)
        self.endpoints.write(self.rundir.path)
        for slot in self.slots.values():
            slot.dealer = connect_socket(self._ctx, zmq.DEALER, self.endpoints.worker(slot.path), self._client_keys)
            self._spawn(slot)

    def _make_registry(self) -> None:
        """The shared G2 registry's segment: one block of G2 is one block_stride of the layout, so
        it needs the layout; without one there is none (engines keep their own registries)."""
        layout = self.config.layout
        if layout is None:
            logger.info("no shared G2 registry: the G2 block size is unknown without the model layout (--layout)")
            return
        # With tensor-parallel ranks (g2_ranks), G2 is g2_ranks regions, one per rank, each a
        # shard of every block: a registry block is one block in every region.
        blocks = self.host_bytes // (layout.block_stride * self.g2_ranks)
        if blocks < 1:
            raise ConfigError(f"G2 of {self.host_bytes} bytes holds no block of {layout.block_stride} bytes")
        self.registry = SharedG2.create(segment_name(self.config.instance_id, REGISTRY_KIND), blocks,
                                        max_engines=REGISTRY_ENGINES, policy=self.config.policy,
                                        ghost_ratio=self.config.ghost_ratio)

    def _make_g3(self) -> None:
        """With the shared G2 registry, the disk tier's slot table is shared too (kvbm.shared_g3):
        every engine of the instance writes and reads one store through one table."""
        if self.registry is None:
            return
        blocks = self.config.disk_blocks_for(self.config.layout)
        self.g3, self._g3_sums = create_g3(self.config.instance_id, blocks, max_engines=REGISTRY_ENGINES,
                                           policy=self.config.policy, ghost_ratio=self.config.ghost_ratio)

    def _registries(self) -> list[tuple[str, SharedG2]]:
        return [(name, reg) for name, reg in (("G2", self.registry), ("G3", self.g3)) if reg is not None]

    @staticmethod
    def _prepare_disk(path: str) -> str:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            if not os.path.isdir(path):
                raise NotADirectoryError(20, "not a directory")
            # A file made and removed: access() misses what only a write finds (root on a mode-0500
            # folder may pass, an immutable folder or a read-only mount does not).
            fd, probe = tempfile.mkstemp(prefix=".kvbm-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ConfigError(f"disk tier folder {path} is not a writable directory: {err.strerror or err} "
                              f"(disk_path; give a folder this user can write, or no disk tier)") from err
        logger.info("G3 folder %s ready (the disk worker opens its store when an engine registers)", path)
        return os.path.abspath(path)

    def _spawn(self, slot: WorkerSlot) -> None:
        slot.gen += 1
        slot.ready = False
        assert self.segment is not None
        module = "kvbm.workers.disk_worker" if slot.path in P.DISK_PATHS else "kvbm.workers.path_worker"
        cmd = [sys.executable, "-m", module, "--path", slot.path.label,
               "--gen", str(slot.gen), "--endpoint", self.endpoints.worker(slot.path),
               "--control", self.endpoints.control, "--keys-dir", self.rundir.path, "--segment", self.segment.name,
               "--segment-size", str(self.segment.size), "--cuda", str(int(self.cuda)),
               "--copy-threads", str(self.config.copy_threads),
               "--max-batch-blocks", str(self.config.max_batch_blocks),
               "--delay-ms", str(self.config.worker_delay_ms), "--log-level", self.log_level,
               "--lane-spin-us", str(lane_spin_default(self.config.lane_spin_us)),
               "--parent-pid", str(os.getpid())]
        if slot.path in P.DISK_PATHS:
            cmd += _disk_worker_args(self.config, self._disk_dir)
        if self.registry is not None:
            cmd += ["--registry", self.registry.name, "--registry-block-bytes", str(self.config.layout.block_stride),
                    "--registry-ranks", str(self.g2_ranks)]
        if self.g3 is not None and slot.path in P.DISK_PATHS:
            cmd += ["--g3-registry", self.g3.name]
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(kvbm.__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        slot.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True, env=env)
        slot.spawned_at = slot.waiting_logged = time.monotonic()
        logger.info("started %s worker gen %d pid %d", slot.path.label, slot.gen, slot.proc.pid)

    # ---- serve -------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop = True

    def serve(self, duration: float | None = None) -> None:
        assert self._control is not None
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        for slot in self.slots.values():
            poller.register(slot.dealer, zmq.POLLIN)
        deadline = None if duration is None else time.monotonic() + duration
        next_stats = next_summary = next_sweep = time.monotonic()
        next_summary += self.interval
        busy_at = time.monotonic()
        while not self._stop and (deadline is None or time.monotonic() < deadline):
            if self.parent_pid and os.getppid() != self.parent_pid:
                logger.error("the engine that started kvbm-workers (pid %d) is gone; stopping", self.parent_pid)
                break
            if self.idle_exit_s:
                now = time.monotonic()
                if self._attached():
                    busy_at = now
                elif now - busy_at >= self.idle_exit_s:
                    logger.info("no engine attached for %.0f s; stopping", now - busy_at)
                    break
            events = dict(poller.poll(50))
            if self._control in events:
                self._serve_control()
            for slot in self.slots.values():
                if slot.dealer in events:
                    self._read_stats(slot)
            self._check_children()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_PERIOD_S
                for slot in self.slots.values():
                    if slot.ready:
                        self._ask_stats(slot, {"t": P.MsgType.STATS})
                    elif slot.proc is not None and now - slot.waiting_logged >= PERIOD_S:
                        slot.waiting_logged = now  # mapping (and pinning) a large G2 takes seconds
                        logger.info("%s worker gen %d (pid %d) is still mapping%s G2 (%.0f s so far)",
                                    slot.path.label, slot.gen, slot.proc.pid, " and pinning" if self.cuda else "",
                                    now - slot.spawned_at)
            if now >= next_sweep:
                # Device segments of engines that died without closing (their workers drop the
                # mappings on their own; the names are ours to remove).
                next_sweep = now + SWEEP_PERIOD_S
                gone = clean_stale_segments(self.config.instance_id, include_host_pool=False)
                if gone:
                    logger.warning("removed the device segments of dead engines: %s", ", ".join(gone))
                self._live_engines()  # drops engines that stopped reporting, status asked or not
                self._reap_registry()
            if self.interval > 0 and now >= next_summary:
                next_summary = now + self.interval
                logger.info("%s", self.summary_line())

    def _worker_gone(self, path: P.Path) -> None:
        """A dead worker runs no copy any more: it holds no engine's registration in the shared
        registry (retired engines it was the last to hold give their blocks back)."""
        for name, reg in self._registries():
            try:
                reg.worker_gone(1 << int(path))
            except KvbmError:
                logger.error("shared %s registry: clearing the %s worker's holds failed", name, path.label,
                             exc_info=True)

    def _reap_registry(self) -> None:
        """Frees the shared registry's slots (and holds) of engines whose process is gone: an
        engine that dies without calling into the registry again is found here (shared_g2 logs
        each)."""
        for name, reg in self._registries():
            try:
                reg.reap()
            except KvbmError:
                # A repair that fails is retried by the next locker; the supervisor goes on serving.
                logger.error("shared %s registry: reaping failed", name, exc_info=True)

    def _serve_control(self) -> None:
        assert self._control is not None
        while True:
            try:
                frames = self._control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                logger.warning("control: rejected a message of %d frames (expected identity + payload)", len(frames))
                if len(frames) > 2:  # answered like the path workers do: the sender learns why
                    self._reply(frames[0], P.make_done(-1, P.Status.ERROR,
                                                       f"expected 1 payload frame, got {len(frames) - 1}"))
                continue
            ident, payload = frames
            msg = None
            try:
                msg = P.decode(payload)
                reply = self._handle_control(msg, ident)
            except (ProtocolError, KvbmError) as err:
                logger.warning("control: rejected a message: %s", err)
                reply = P.make_done(P.request_id_of(msg), P.Status.ERROR, f"rejected: {err}")
            except Exception as err:  # noqa: BLE001 - no message may take the supervisor (and its workers) down
                logger.error("control: a %r message failed", msg.get("t") if isinstance(msg, dict) else None,
                             exc_info=True)
                reply = P.make_done(P.request_id_of(msg), P.Status.ERROR, f"failed: {type(err).__name__}: {err}")
            if reply is not None:
                reply.setdefault("id", P.request_id_of(msg))
                self._reply(ident, reply)

    def _reply(self, ident: bytes, reply: dict) -> None:
        try:
            self._control.send_multipart([ident, P.encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("control: reply to a slow client dropped (send queue full)")

    def _handle_control(self, msg: dict, ident: bytes = b"") -> dict | None:
        kind = msg["t"]
        if kind == P.MsgType.HELLO:
            return self.welcome()
        if kind == P.MsgType.STATUS:
            self._refresh_stats()
            return self.status()
        if kind == P.MsgType.READY:
            self._worker_ready(msg)
            return None
        if kind == P.MsgType.STATS:  # an engine's periodic report: pool occupancy, queue depths
            engine = msg.get("engine")
            if isinstance(engine, str) and 0 < len(engine) <= P.MAX_ENGINE_ID and \
                    (engine in self.engines or len(self.engines) < MAX_ENGINES):
                if engine in self._live_engines() and self._engine_conn.get(engine) != ident:
                    logger.warning("control: ignored a report for engine %.80r from a connection other than "
                                   "the one it reports on", engine)
                    return None
                self.engines[engine] = engine_report(msg) | {"at": time.time()}
                self._engine_conn[engine] = ident
            return None
        if kind == P.MsgType.RESTART:
            return {"t": P.MsgType.PONG, "restarted": self._restart_request(msg, ident)}
        if kind == P.MsgType.XFER:
            path = msg.get("path")
            if path in [int(p) for p in P.DISK_PATHS] and P.Path.H2DISK not in self.slots:
                return P.make_done(P.request_id_of(msg), P.Status.ERROR, P.NO_DISK_TIER)
            raise ProtocolError(f"xfer for path {path!r} sent to the control socket; send it to the path worker")
        if kind == P.MsgType.PING:
            return {"t": P.MsgType.PONG}
        raise ProtocolError(f"unknown control message type {kind!r:.40}")

    def welcome(self) -> dict:
        assert self.segment is not None
        return {"t": P.MsgType.WELCOME, "instance": self.config.instance_id, "pid": os.getpid(),
                "cuda": self.cuda, "host": {"segment": self.segment.name, "size": self.segment.size},
                "registry": None if self.registry is None else {
                    "segment": self.registry.name, "blocks": self.registry.total_blocks,
                    "block_bytes": self.config.layout.block_stride if self.config.layout else 0,
                    "ranks": self.g2_ranks},
                "disk": self._disk_dir, "events": self.endpoints.events,
                "g3": None if self.g3 is None else {"segment": self.g3.name, "sums": self._g3_sums.name,
                                                    "blocks": self.g3.total_blocks},
                "max_batch_blocks": self.config.max_batch_blocks,
                "workers": {p.label: {"path": int(p), "endpoint": self.endpoints.worker(s.path),
                                      "gen": s.gen, "ready": s.ready}
                            for s in self.slots.values() for p in _served(s.path)}}

    def _worker_ready(self, msg: dict) -> None:
        """READY counts only from the current generation's process of that path (its pid), with
        every field of the right type; anything else is rejected before it touches the slot."""
        path = msg.get("path")
        if not isinstance(path, int) or isinstance(path, bool) or path not in [int(p) for p in self.slots]:
            raise ProtocolError(f"READY from an unknown path {path!r:.40}")
        slot = self.slots[P.Path(path)]
        gen, pid = msg.get("gen"), msg.get("pid")
        if (gen != slot.gen or isinstance(gen, bool) or slot.proc is None or pid != slot.proc.pid
                or isinstance(pid, bool)):
            raise ProtocolError(f"READY from {slot.path.label} gen {gen!r:.40} pid {pid!r:.40}; expected gen "
                                f"{slot.gen} pid {slot.proc.pid if slot.proc else None}")
        pin_s, pinned = msg.get("pin_s", 0.0), msg.get("pinned_bytes", 0)
        if not _number(pin_s) or not 0 <= pin_s < 1e6:
            raise ProtocolError(f"READY pin_s: expected seconds >= 0, got {pin_s!r:.40}")
        if not isinstance(pinned, int) or isinstance(pinned, bool) or not 0 <= pinned < 2**62:
            raise ProtocolError(f"READY pinned_bytes: expected an int >= 0, got {pinned!r:.40}")
        slot.ready = True
        slot.pin_s = float(pin_s)
        self.metrics.up.labels(slot.path.label).set(1)
        self.metrics.generation.labels(slot.path.label).set(slot.gen)
        self.metrics.pin_seconds.labels(slot.path.label).set(slot.pin_s)
        if pinned:
            logger.info("%s worker gen %d pinned %.3f GB in %.3f s (%.1f GB/s)", slot.path.label, slot.gen,
                        pinned / 1e9, slot.pin_s, pinned / 1e9 / max(slot.pin_s, 1e-9))
        for path in _served(slot.path):
            self._publish(P.make_event("started", path, slot.gen, pid=msg.get("pid"),
                                       endpoint=self.endpoints.worker(slot.path)))

    def _restart_request(self, msg: dict, ident: bytes) -> bool:
        """Kills the worker an engine found unresponsive. Only an engine whose transfers use that
        worker may ask: the request comes from the connection the engine reports its stats on,
        and names the generation its latest report says it is registered with, which must still
        be the running one (an older one is dead already). True when a worker was killed."""
        try:
            slot = self.slots[P.Path(msg.get("path"))]
        except (ValueError, KeyError, TypeError):
            raise ProtocolError(f"restart of an unknown path {msg.get('path')!r:.40}") from None
        engine, gen = msg.get("engine"), msg.get("gen")
        report = self._live_engines().get(engine) if isinstance(engine, str) else None
        if report is None or self._engine_conn.get(engine) != ident:
            raise ProtocolError(f"restart of the {slot.path.label} worker refused: {engine!r:.80} is not an engine "
                                f"reporting on this connection")
        used = report.get("generations", {}).get(slot.path.label)
        if gen != used or isinstance(gen, bool):
            raise ProtocolError(f"restart of the {slot.path.label} worker gen {gen!r:.40} refused: engine "
                                f"{engine!r:.80} reports its transfers use gen {used!r}")
        if gen == slot.gen and slot.proc is not None and slot.proc.poll() is None:
            logger.error("engine %s reports %s worker gen %d unresponsive (%s); killing it",
                         engine, slot.path.label, slot.gen, msg.get("reason"))
            slot.proc.kill()
            return True
        return False

    def _refresh_stats(self, timeout: float = 0.3) -> None:
        """Asks every ready worker for fresh stats and waits (bounded) for the answers, so that a
        status reply is current rather than up to STATS_PERIOD_S old."""
        self._stats_seq += 1
        want = {}
        for slot in self.slots.values():
            if (slot.ready and slot.dealer is not None
                    and self._ask_stats(slot, {"t": P.MsgType.STATS, "id": self._stats_seq})):
                want[slot.path] = slot
        deadline = time.monotonic() + timeout
        while want and time.monotonic() < deadline:
            for path, slot in list(want.items()):
                if slot.dealer.poll(10):
                    self._read_stats(slot)
                    if slot.stats.get("id") == self._stats_seq:
                        del want[path]

    @staticmethod
    def _ask_stats(slot: WorkerSlot, msg: dict) -> bool:
        try:
            slot.dealer.send(P.encode(msg), zmq.NOBLOCK)
        except zmq.Again:  # a stuck worker's queue is full; the deadline logic deals with it
            logger.warning("%s worker gen %d: stats request dropped (send queue full)", slot.path.label, slot.gen)
            return False
        return True

    def _read_stats(self, slot: WorkerSlot) -> None:
        for payload in pending(slot.dealer):
            try:
                msg = P.decode(payload)
            except ProtocolError:
                continue
            if msg.get("t") == P.MsgType.STATS and msg.get("gen") == slot.gen:
                slot.stats = {k: v for k, v in msg.items() if k in WORKER_FIELDS and _number(v)}
                slot.stats.update(_disk_stats(msg))
                self.metrics.worker_bytes.labels(slot.path.label).set(int(slot.stats.get("bytes", 0)))
                self.metrics.worker_queue.labels(slot.path.label).set(int(slot.stats.get("queue", 0)))

    def _check_children(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            proc = slot.proc
            if proc is None:
                if slot.restart_at and now >= slot.restart_at:
                    slot.restart_at = 0.0
                    self._spawn(slot)
                continue
            code = proc.poll()
            if code is None:
                continue
            logger.error("%s worker gen %d (pid %d) died with exit code %d; restarting",
                         slot.path.label, slot.gen, proc.pid, code)
            for path in _served(slot.path):
                self._publish(P.make_event("died", path, slot.gen, pid=proc.pid, exitcode=code))
            self._worker_gone(slot.path)
            slot.proc = None
            slot.ready = False
            slot.restarts += 1
            slot.stats = {}
            self.metrics.up.labels(slot.path.label).set(0)
            self.metrics.restarts.labels(slot.path.label).inc()
            slot.deaths.append(now)
            if len(slot.deaths) == RESTART_BURST and now - slot.deaths[0] < RESTART_WINDOW_S:
                slot.restart_at = now + RESTART_BACKOFF_S
                logger.error("%s worker died %d times in %.0f s; next start in %.1f s",
                             slot.path.label, RESTART_BURST, now - slot.deaths[0], RESTART_BACKOFF_S)
            else:
                self._spawn(slot)

    def _publish(self, msg: dict) -> None:
        if self._events is not None:
            self._events.send(P.encode(msg))

    # ---- reporting ---------------------------------------------------------------------------
    def _attached(self) -> bool:
        """Whether any engine uses this instance: one reported lately, or the shared G2 has one live
        (a metadata-only engine reports nothing)."""
        if self._live_engines():
            return True
        if self.registry is None:
            return False
        try:
            return any(e["state"] == "live" for e in self.registry.engines())
        except KvbmError:
            return True   # cannot tell: stay

    def _live_engines(self) -> dict[str, dict]:
        """Engines that reported in the last few seconds (they report every second)."""
        cutoff = time.time() - 5 * STATS_PERIOD_S
        for name in [n for n, r in self.engines.items() if r["at"] < cutoff]:
            del self.engines[name]
            self._engine_conn.pop(name, None)
        return self.engines

    def status(self) -> dict:
        workers = {}
        for slot in self.slots.values():
            workers[slot.path.label] = {
                "gen": slot.gen, "pid": slot.proc.pid if slot.proc else None, "ready": slot.ready,
                "restarts": slot.restarts, "pin_s": slot.pin_s,
                "queue": slot.stats.get("queue", 0), "requests": slot.stats.get("requests", 0),
                "bytes": slot.stats.get("bytes", 0), "errors": slot.stats.get("errors", 0),
                "malformed": slot.stats.get("malformed", 0), "busy_s": slot.stats.get("busy_s", 0.0),
                "engines": slot.stats.get("engines", 0),
                "uptime_s": slot.stats.get("uptime_s", 0.0)}
        disk = self.slots.get(P.Path.H2DISK)
        if disk is None:
            workers["h2disk"] = {"state": P.NO_DISK_TIER}
        return {"t": P.MsgType.STATUS, "instance": self.config.instance_id, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 3), "cuda": self.cuda,
                "tiers": {"g2": {"segment": self.segment.name if self.segment else None,
                                 "bytes": self.host_bytes, "prefault_s": round(self.prefault_s, 4),
                                 "registry": self._registry_status(self.registry)},
                          "g3": {"path": self._disk_dir, **(disk.stats.get("disk", {}) if disk else {}),
                                 **(disk.stats.get("disk_text", {}) if disk else {}),
                                 "registry": self._registry_status(self.g3)}},
                "workers": workers, "engines": self._live_engines()}

    @staticmethod
    def _registry_status(reg: SharedG2 | None) -> dict | None:
        if reg is None:
            return None
        try:
            return reg.status()
        except KvbmError as err:
            logger.error("shared registry %s: status failed", reg.name, exc_info=True)
            return {"segment": reg.name, "error": str(err)}

    def summary_line(self) -> str:
        parts = []
        for slot in self.slots.values():
            total = int(slot.stats.get("bytes", 0))
            delta = max(0, total - slot.prev_bytes)
            slot.prev_bytes = total
            parts.append(f"{slot.path.label} gen{slot.gen} {'up' if slot.ready else 'DOWN'} "
                         f"req {slot.stats.get('requests', 0)} q {slot.stats.get('queue', 0)} "
                         f"{total / 1e9:.2f} GB {delta / 1e9 / max(self.interval, 1e-9):.2f} GB/s "
                         f"err {slot.stats.get('errors', 0)} restarts {slot.restarts}")
        occupancy = ""
        for name, report in self._live_engines().items():
            g2 = report.get("pools", {}).get("g2")  # engine_report kept only maps of numbers
            if isinstance(g2, dict) and g2:
                occupancy += f" | engine {name} g2 {g2.get('used', '?')}/{g2.get('blocks', '?')} blocks"
        return f"kvbm-workers [{self.config.instance_id}] up {time.monotonic() - self.started:.0f}s | " + \
            " | ".join(parts) + occupancy

    # ---- stop --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Workers first (SIGTERM: they finish their in-flight copies; SIGKILL past the grace),
        reaped; only then "died" per path and "stopping" last, so that no copy can still write
        after an engine was told its transfers failed."""
        slots = [s for s in self.slots.values() if s.proc is not None]
        for slot in slots:
            if slot.proc.poll() is None:
                slot.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for slot in slots:
            proc = slot.proc
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, STOP_GRACE_S)
                proc.kill()
                proc.wait()  # reaped whatever it takes: a copy must not outlive the "died" event
        for slot in slots:
            for path in _served(slot.path):
                self._publish(P.make_event("died", path, slot.gen, pid=slot.proc.pid, exitcode=slot.proc.returncode))
        self._publish(P.make_event("stopping", None, 0))
        if self._events is not None:
            self._events.setsockopt(zmq.LINGER, 1000)  # let these last events reach the engines
        for slot in self.slots.values():
            slot.proc = None
            if slot.dealer is not None:
                slot.dealer.close(0)
                slot.dealer = None
        for sock in (self._control, self._events):
            if sock is not None:
                sock.close(0)
        self._control = self._events = None
        if self._gate is not None:
            self._gate.stop()  # after the server sockets: libzmq admits anyone while no handler is bound
            self._gate = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.segment is not None:
            self.segment.close()
            self.segment.unlink()
            self.segment = None
        if self.registry is not None:
            self.registry.close()      # the creator: unlinks it
            self.registry = None
        if self.g3 is not None:
            self.g3.close()
            self._g3_sums.close()
            self._g3_sums.unlink()
            self.g3 = self._g3_sums = None
        if self.rundir.held:
            # The engine that started us may have been killed: its device segment is ours to remove.
            gone = clean_stale_segments(self.config.instance_id, include_host_pool=False)
            if gone:
                logger.warning("removed the device segments of dead engines: %s", ", ".join(gone))
        self.rundir.release_and_remove()


def _served(path: P.Path) -> tuple[P.Path, ...]:
    """The wire paths one worker process serves: its own, or both disk paths for the disk worker."""
    return P.DISK_PATHS if path in P.DISK_PATHS else (path,)


def _disk_worker_args(config: KvbmConfig, disk_dir: str | None) -> list[str]:
    return ["--disk-path", disk_dir or os.path.abspath(config.disk_path), "--instance-id", config.instance_id,
            "--gds", config.gds, "--fsize-limit", str(config.disk_fsize_limit),
            "--read-blocks", str(config.disk_read_blocks), "--read-inflight", str(config.disk_read_inflight)]


def _disk_stats(msg: dict) -> dict:
    """The disk worker's own report ("disk": numbers, "disk_text": short strings), kept whitelisted."""
    out = {}
    numbers = msg.get("disk")
    if isinstance(numbers, dict) and len(numbers) <= 2 * MAX_MAP_KEYS:
        out["disk"] = {k: v for k, v in numbers.items() if isinstance(k, str) and len(k) <= MAX_KEY_CHARS
                       and _number(v)}
    text = msg.get("disk_text")
    if isinstance(text, dict) and len(text) <= MAX_MAP_KEYS:
        out["disk_text"] = {k: v[:600] for k, v in text.items()
                            if isinstance(k, str) and len(k) <= MAX_KEY_CHARS and isinstance(v, str)}
    return out


def install_signal_handlers(sup: Supervisor) -> None:
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
