"""The disk worker: one supervised process serving the disk tier's two paths, H2DISK and DISK2H.

It is a PathWorker (kvbm.workers.path_worker: the same wire protocol, loop, priority heap, READY,
generations, STALE answers, SIGTERM handling) whose copies are disk
I/O through the instance's DiskStore (kvbm.workers.disk). The supervisor runs it in the slot of
Path.H2DISK and announces its `started` / `died` events for both paths.

Order of things:
  1. started like a path worker (its CURVE keys from --keys-dir, its ROUTER a CURVE server behind
     the ZAP Gatekeeper; a registration belongs to the connection that made it; the queue bounded
     in requests and bytes, its xfers allowed the per-block arrays of P.DISK_XFER_FIELDS), plus the
     disk folder, the instance id, the GDS mode and a test
     hook (a file size limit); ignores SIGXFSZ, so a size limit fails a write with EFBIG instead of
     killing the process; maps G2 (never pins it: NIXL POSIX moves host bytes through the kernel)
  2. an engine registers: the usual layouts (no device memory needed: a metadata-only engine, such
     as the vLLM connector's scheduler side, registers with this worker alone), plus {disk:
     {blocks, fingerprint, model, cold}}. The
     first such registration opens the DiskStore of this instance under disk_path with that slot
     count, layout fingerprint and model id: the journal is replayed (a warm restart), a journal
     of another layout or model refuses the registration with JournalMismatchError's text unless
     `cold`. Then the GDS probe (gds auto/on, CUDA mode only) and the size limit. Another
     registration of the same store keeps it open; one of another store reopens it when no other
     engine is registered, and is refused otherwise. With the shared G3 (--g3-registry,
     kvbm.shared_g3) every engine of the instance's model registers side by side, each a live
     member of its table (checked there, as path workers check G2's), and this worker holds each
     one's G3 slots until it has let go of its registration (a write of a dead engine may still
     land); an engine without a disk tier registers without and sends no disk transfer. The TP ranks
     of one engine (one `group`) are refused past the first: the disk tier with tensor
     parallelism is not built yet
  3. {t: entries}: the blocks the store holds (sequence hash, slot, checksum), and those of the
     other instances in the directory whose journal changed since the engine last saw it (peer
     journals are re-read when asked: the engine asks at registration and then every few seconds)
  4. xfer H2DISK: G2 blocks -> slots chosen by the engine (its G3 registry; with the shared G3 only
     slots it holds there), with the blocks' sequence hashes; DiskStore.put writes, fdatasyncs and
     journals them. The reply says, per block, OK or FAILED and the checksum recorded; a request
     that ran is answered OK even when some blocks failed (ENOSPC: those stay in G2 only), with the
     failure named
  5. xfer DISK2H: slots (this instance's, or a peer's: the "owner" array) -> G2 staging blocks,
     with the checksums the engine expects; every block is verified (DiskStore.get / read_peer).
     The reply says, per block, OK, FAILED or CORRUPT; any block not OK makes it an ERROR, so the
     engine never reports the load as done. Reads run before writes (their priority is higher)

Only the staged read path runs here: GDS reads straight into the device would land bytes whose
checksum nobody verified (that needs a checksum kernel on the device, not built), so the probe
result is reported (status, metrics) and the staged path is what "read_path" says.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from kvbm.config import DISK_READ_BLOCKS, DISK_READ_INFLIGHT
from kvbm.errors import (
    ConfigError,
    DiskError,
    DiskSpaceError,
    JournalMismatchError,
    KvbmError,
    LayoutError,
    ProtocolError,
)
from kvbm.layout import BlockLayout
from kvbm.shared_g2 import SharedG2
from kvbm.wire import protocol as P
from kvbm.workers.admission import Member
from kvbm.workers.path_worker import PathWorker, build_parser
from kvbm.workers.path_worker import main as worker_main

logger = logging.getLogger(__name__)

ENTRIES_PER_MESSAGE = 1 << 18    # 6 MiB of (hash, slot, checksum) per entries message, under the cap
GDS_MODES = ("auto", "on", "off")
READ_PATH = "staged"            # the read path this version runs (see the module docstring)


class _NoMemory:
    """The disk worker maps no engine memory of its own (only G2, mapped at start)."""

    kind = "none"

    def close(self) -> None:
        pass


@dataclass
class DiskRegistration:
    engine: str
    pid: int
    host: BlockLayout
    ident: bytes        # routing id of the connection that registered: only it may use this
    memory: _NoMemory = field(default_factory=_NoMemory)
    group: str = ""     # the engine this registration is a rank of (one rank at most here, see below)
    host_offset: int = 0  # byte of the G2 segment where its host layout starts
    member: Member | None = None   # its shared G2 membership (held: its staging blocks wait for our reads)
    g3_member: Member | None = None  # its shared G3 membership (held: its slots wait for our writes)


@dataclass
class DiskCounters:
    bytes_written: int = 0
    bytes_read: int = 0
    write_s: float = 0.0
    read_s: float = 0.0
    write_requests: int = 0
    read_requests: int = 0
    blocks_failed: int = 0       # blocks of requests that did not move (written or read)
    blocks_corrupt: int = 0


class DiskWorker(PathWorker):
    PIN_HOST = False
    # Members of one shared G2 namespace register side by side when the slot table is shared too
    # (--g3-registry, kvbm.shared_g3); without it one engine's registry picks the slots: one engine.
    SHARED_ENGINES = True
    LANES = False   # its requests carry per-block arrays and message fields: ZeroMQ only
    XFER_FIELDS = P.DISK_XFER_FIELDS

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.disk_path = args.disk_path
        self.instance_id = args.instance_id
        self.gds_mode = args.gds
        self.fsize_limit = args.fsize_limit
        self.read_blocks, self.read_inflight = args.read_blocks, args.read_inflight
        self.store = None                 # DiskStore, once an engine registered a disk tier
        self.g3 = SharedG2.attach(args.g3_registry) if args.g3_registry else None   # the shared G3's engine table
        self.store_key: tuple | None = None
        self.store_error = "no engine has registered a disk tier yet"
        self.gds_status = "off (gds=off)" if self.gds_mode == "off" else "not probed yet"
        self.counters = DiskCounters()
        self.last_error = ""              # the last failed write's or read's reason (status)
        # numpy's one-off first-call cost of np.unique (~9 ms) paid here, not inside the first
        # read's timed I/O (_read groups by owner with it), which the load-or-recompute rule would
        # take for a slow disk (the two-instance test of tests/integration/test_disk_tier.py).
        np.unique(np.zeros(2, np.int64))

    # ---- registration --------------------------------------------------------------------------
    def _check_owner(self, ident: bytes, reg, action: str) -> None:
        """As a path worker's, with the engine's two sockets here (H2DISK, DISK2H) one connection."""
        if reg is not None and P.connection_of(reg.ident) != P.connection_of(ident):
            raise ProtocolError(f"{action} refused: engine {reg.engine!r:.80} (pid {reg.pid}) is registered by "
                                f"another connection")

    def _register(self, ident: bytes, msg: dict) -> None:
        _, host_map, _ = P.validate_register(msg, need_memory=False)
        host, group, host_offset = self._host_placement(msg, host_map)
        engine = msg["engine"]
        member = self._admit(engine, int(msg.get("pid", 0)), group, host_offset, host)
        if self.g3 is None and member is not None:
            self._refuse_second_engine(engine, group, host_offset, host)
        # Only an engine with a disk tier joins the shared G3; one without registers for nothing here.
        g3_member = self._g3_membership(engine, int(msg.get("pid", 0))) if msg.get("disk") is not None else None
        # A member's G2 range starts at its namespace's first block, which is rank 0's place.
        ns_start = 0 if member is None else self.g2.member(engine)["block_offset"] * self.g2_block_bytes
        self._refuse_ranks(engine, group, host_offset - ns_start)
        self._check_owner(ident, self.engines.get(engine), "register")  # type: ignore[arg-type]
        disk = msg.get("disk")
        if disk is not None:
            self._open_store(host, disk, engine)
        old = self.engines.pop(engine, None)
        if old is not None:
            self._forget(old)
        reg = DiskRegistration(engine, int(msg.get("pid", 0)), host, ident, group=group, host_offset=host_offset,
                               member=member, g3_member=g3_member)
        self._hold(reg)
        self.engines[engine] = reg
        logger.info("disk worker gen %d: engine %s registered (%d host blocks, store %s)", self.gen, engine,
                    host.num_blocks, "open" if self.store is not None else "not open")
        self._reply(ident, {"t": P.MsgType.REGISTERED, "id": P.request_id_of(msg), "gen": self.gen,
                            "path": int(self.path), "pid": os.getpid(), "cuda": self.cuda,
                            "disk": self._disk_info()})

    def _g3_membership(self, engine: str, pid: int) -> Member | None:
        """With the shared G3 (kvbm.shared_g3), only its live members write and read the store: the
        slots they name come from its table. None without one."""
        if self.g3 is None:
            return None
        m = self.g3.member(engine)
        if m is None:
            raise ProtocolError(f"engine {engine!r:.80} is not a member of this instance's shared G3 "
                                f"({self.g3.name}): an engine joins it before registering with the disk worker")
        if pid <= 0 or pid != m["pid"] or not m["alive"]:
            raise ProtocolError(f"engine {engine!r:.80} registers as pid {pid}; the shared G3 has it as pid "
                                f"{m['pid']} ({'alive' if m['alive'] else 'gone'})")
        return Member(m["slot"], m["generation"], m["namespace"])

    def _hold(self, reg) -> None:
        """As a path worker's, and the engine's G3 slots too: a write of a dead engine may still be
        landing in them, so they are not handed to another engine until this worker lets go."""
        super()._hold(reg)
        g3m = getattr(reg, "g3_member", None)
        if g3m is not None and not self.g3.worker_hold(g3m.slot, g3m.generation, self.worker_bit):
            super()._let_go(reg)
            raise ProtocolError(f"engine {reg.engine!r:.80} left the shared G3 while registering")

    def _let_go(self, reg) -> None:
        super()._let_go(reg)
        g3m = getattr(reg, "g3_member", None)
        if g3m is not None and self.g3 is not None:
            try:
                self.g3.worker_let_go(g3m.slot, g3m.generation, self.worker_bit)
            except KvbmError:
                logger.error("disk worker: letting go of engine %s in the shared G3 failed", reg.engine,
                             exc_info=True)

    def _refuse_ranks(self, engine: str, group: str, host_offset: int) -> None:
        """One store holds one block per sequence hash, and a TP rank's block is only its shard: the
        store of a TP engine needs every rank's shard under one hash (not built). A group with one
        rank is an engine as before; a second rank, or a rank past the first (its G2 range starts
        past byte 0 of its part of G2: `host_offset` is from there), is refused."""
        if not group:
            return
        ranks = sorted(other for other, reg in self.engines.items() if reg.group == group and other != engine)
        if ranks or host_offset:
            raise ProtocolError(f"the disk tier with tensor parallelism is not supported yet: {engine!r:.80} is a "
                                f"rank of group {group!r:.80} (G2 byte {host_offset}, {len(ranks)} other rank(s) "
                                f"registered: {', '.join(ranks)[:200]}); run the disk tier with one rank, or "
                                f"without a disk tier")

    def _open_store(self, host: BlockLayout, disk: dict, engine: str) -> None:
        from kvbm.workers.disk import DiskStore
        if not isinstance(disk, dict):
            raise ProtocolError(f"disk: expected a map, got {type(disk).__name__}")
        blocks = P._int(disk, "blocks", 1, 2**40)
        fingerprint = P._int(disk, "fingerprint", 0, 2**64 - 1)
        model = P._int(disk, "model", 0, 2**64 - 1)
        cold = disk.get("cold", False)
        if not isinstance(cold, bool):
            raise ProtocolError(f"disk.cold: expected a bool, got {cold!r:.40}")
        key = (host.config.block_bytes, host.block_stride, blocks, fingerprint, model)
        if self.store is not None and key == self.store_key:
            return
        others = sorted(e for e in self.engines if e != engine)
        if self.store is not None and others:
            raise ProtocolError(f"{engine!r:.80} asks for a disk store of {key[2]} slots of {key[0]} bytes, layout "
                                f"{key[3]:#x}, model {key[4]:#x}; the store open is {self.store_key} and serves "
                                f"{', '.join(others)[:200]}: one store per instance")
        if self.store is not None:
            logger.info("disk worker: a registration of another store (%s, was %s); reopening", key, self.store_key)
            self.store.close()
            self.store = self.store_key = None
        try:
            self.store = DiskStore.open(self.disk_path, self.instance_id, host.config.block_bytes, blocks,
                                        fingerprint, model, cold=cold,
                                        host_regions=[(self.host_segment.address, self.host_segment.size)],
                                        read_blocks_per_request=self.read_blocks, read_inflight=self.read_inflight)
        except JournalMismatchError as err:
            self.store_error = f"{err} (disk_cold_start = true, or KVBM_DISK_COLD_START=1, discards them)"
            raise JournalMismatchError(self.store_error) from err
        except KvbmError as err:
            self.store_error = str(err)
            raise
        try:
            self.gds_status = self._probe_gds()
        except KvbmError as err:   # gds=on and no GDS: no store either, until a registration that fits
            self.store.close()
            self.store, self.store_error = None, str(err)
            raise
        self.store_key = key
        self.store_error = ""
        if self.fsize_limit:
            # Test hook: a file size limit (the ENOSPC path) on the data files, set once they exist.
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, self.fsize_limit))
            logger.warning("disk worker: file size limit %d bytes (test hook)", self.fsize_limit)

    def _probe_gds(self) -> str:
        if self.gds_mode == "off":
            return "off (gds=off)"
        if not self.cuda:
            if self.gds_mode == "on":
                raise ConfigError("gds=on needs CUDA; this kvbm-workers runs in CPU mode (use gds=auto or off)")
            return "unavailable: CPU mode"
        from kvbm.workers.disk.io import probe_gds
        why = probe_gds(self.store.files)
        if why and self.gds_mode == "on":
            raise ConfigError(f"gds=on: NIXL's GDS backend failed its probe read: {why}")
        status = (f"probe read passed; reads stay {READ_PATH} (no on-device checksum yet)" if not why
                  else f"unavailable: {why}")
        logger.info("disk worker: GDS %s", status)
        return status

    def _disk_info(self) -> dict:
        st = self.store
        info = {"open": st is not None, "read_path": READ_PATH, "gds": self.gds_status,
                "error": self.store_error[:P.MAX_ERROR_TEXT]}
        if st is not None:
            info.update(slots=st.geometry.num_slots, live=st.num_live, backend=st.io.backend,
                        direct=st.files.direct, replay_bad_records=st.stats.replay_bad_records,
                        replay_torn_bytes=st.stats.replay_torn_bytes)
        return info

    # ---- entries ------------------------------------------------------------------------------
    def _other_message(self, ident: bytes, kind: str, msg: dict) -> None:
        if kind != P.MsgType.ENTRIES:
            super()._other_message(ident, kind, msg)
            return
        rid = P.request_id_of(msg)
        st = self.store
        if st is None:
            self._reply(ident, {"t": P.MsgType.ENTRIES, "id": rid, "gen": self.gen, "last": True,
                                "error": f"the disk store is not open: {self.store_error}"})
            return
        known = msg.get("known") or {}
        if not isinstance(known, dict):
            raise ProtocolError(f"entries.known: expected a map, got {type(known).__name__}")
        if msg.get("own"):
            self._send_entries(ident, rid, "", None, *st.entries())
        present, skipped = [], {}
        for name in st.peers():
            version = st.peer_version(name)
            if version is None:
                continue
            present.append(name)
            if known.get(name) == version:
                continue  # its journal did not change since the engine read it
            try:
                hashes, slots, sums = st.peer_entries(name)
            except DiskError as err:  # another model, layout or block size, or a journal being created
                skipped[name] = str(err)[:200]
                continue
            self._send_entries(ident, rid, name, version, hashes, slots, sums)
        self._reply(ident, {"t": P.MsgType.ENTRIES, "id": rid, "gen": self.gen, "last": True,
                            "peers": present, "skipped": skipped})

    def _send_entries(self, ident: bytes, rid: int, instance: str, version, hashes, slots, sums) -> None:
        n = len(slots)
        parts = max(1, -(-n // ENTRIES_PER_MESSAGE))
        for part in range(parts):
            lo, hi = part * ENTRIES_PER_MESSAGE, min(n, (part + 1) * ENTRIES_PER_MESSAGE)
            self._reply(ident, {"t": P.MsgType.ENTRIES, "id": rid, "gen": self.gen, "instance": instance,
                                "version": version, "part": part, "parts": parts,
                                "hashes": P.pack_field("hashes", hashes[lo:hi]),
                                "sums": P.pack_field("sums", sums[lo:hi]), "slots": P.pack_blocks(slots[lo:hi])})

    # ---- transfers --------------------------------------------------------------------------
    def _execute(self, ident: bytes, msg: dict, t_recv: float) -> None:
        rid = P.request_id_of(msg)
        try:
            gen = msg.get("gen")
            if gen != self.gen:
                self.stats.stale += 1
                self._reply(ident, P.make_done(rid, P.Status.STALE, f"request for generation {gen!r}; this disk "
                                               f"worker is generation {self.gen}", gen=self.gen))
                return
            path = msg.get("path")
            if path not in (int(P.Path.H2DISK), int(P.Path.DISK2H)):
                raise ProtocolError(f"path {path!r} sent to the disk worker")
            reg = self.engines.get(msg.get("engine"))  # type: ignore[arg-type]
            if reg is None:
                raise ProtocolError(f"engine {msg.get('engine')!r:.60} has not registered with this worker")
            if self.store is None:
                raise ProtocolError(f"the disk store is not open: {self.store_error}")
            if self.g3 is not None and reg.g3_member is None:
                raise ProtocolError(f"engine {reg.engine!r:.80} registered without a disk tier (it is no member of "
                                    f"the shared G3): no disk transfers")
            hosts = reg.host.num_blocks
            if path == int(P.Path.H2DISK):
                src, dst = P.validate_xfer(msg, hosts, self.store.geometry.num_slots, self.max_batch)
                extra = {"hashes": P.unpack_field(msg, "hashes", len(src))}
                m = reg.g3_member
                if m is not None and not self.g3.holds(m.slot, m.generation, dst):
                    # A write goes only to slots the writer holds in the shared table: never over a
                    # block another engine wrote, or reads.
                    raise ProtocolError(f"engine {reg.engine!r:.80} writes G3 slots it does not hold in the shared "
                                        f"G3 table")
            else:
                src, dst = P.validate_xfer(msg, 2**62, hosts, self.max_batch)
                extra = {"sums": P.unpack_field(msg, "sums", len(src)), "owner": P.unpack_field(msg, "owner", len(src))}
                peers = msg.get("peers") or []
                if not isinstance(peers, list) or not all(isinstance(p, str) and 0 < len(p) <= 64 for p in peers):
                    raise ProtocolError("peers: expected a list of instance ids")
                if extra["owner"].size and int(extra["owner"].max()) > len(peers):
                    raise ProtocolError(f"owner {int(extra['owner'].max())} names no peer ({len(peers)} listed)")
                extra["peers"] = peers
            self._check_owner(ident, reg, "xfer")  # type: ignore[arg-type]  # after the checks, before any I/O
        except ProtocolError as err:
            self._malformed(ident, msg, err)
            return
        except Exception as err:  # noqa: BLE001 - the process boundary: no message may kill the worker
            self._failed(ident, rid, err)
            return
        t_start = time.monotonic()
        try:
            if self.delay_s:
                time.sleep(self.delay_s)  # test hook (KvbmConfig.worker_delay_ms): widen the in-flight window
            host_blocks = src if path == int(P.Path.H2DISK) else dst
            addrs = self.host_segment.address + reg.host_offset + \
                host_blocks.astype(np.uint64) * np.uint64(reg.host.block_stride)
            if path == int(P.Path.H2DISK):
                reply = self._write(rid, addrs, dst, extra["hashes"])
            else:
                reply = self._read(rid, src, addrs, extra["sums"], extra["owner"], extra["peers"])
        except Exception as err:  # noqa: BLE001 - any I/O failure becomes a failed completion
            self._failed(ident, rid, err)
            return
        t_end = time.monotonic()
        moved = int(reply.pop("moved"))
        nbytes = moved * self.store.geometry.block_bytes
        self.stats.requests += 1
        self.stats.blocks += moved
        self.stats.bytes += nbytes
        self.stats.busy_s += t_end - t_start
        if path == int(P.Path.H2DISK):
            self.counters.bytes_written += nbytes
            self.counters.write_s += t_end - t_start
            self.counters.write_requests += 1
        else:
            self.counters.bytes_read += nbytes
            self.counters.read_s += t_end - t_start
            self.counters.read_requests += 1
        status = reply.pop("status")
        if status is not P.Status.OK:
            self.stats.errors += 1
        self._reply(ident, P.make_done(rid, status, reply.pop("error"), nbytes=nbytes, gen=self.gen,
                                       queue_us=int((t_start - t_recv) * 1e6), copy_us=int((t_end - t_start) * 1e6),
                                       **reply))

    def _write(self, rid: int, addrs: np.ndarray, slots: np.ndarray, hashes: np.ndarray) -> dict:
        store = self.store
        error, no_space = "", False
        try:
            outcome = store.put(hashes, addrs, slots)
        except DiskError as err:
            outcome = err.slots if err.slots is not None else np.full(len(slots), -1, np.int64)
            error, no_space = str(err), isinstance(err, DiskSpaceError)
            self.last_error = error
            logger.error("disk worker gen %d: write request %d: %s", self.gen, rid, err)
        ok = np.asarray(outcome) >= 0
        state = np.where(ok, P.BlockState.OK, P.BlockState.FAILED).astype(np.uint8)
        sums = np.zeros(len(slots), np.uint64)
        if ok.any():
            sums[ok] = store.checksums_of(slots[ok])
        self.counters.blocks_failed += int((~ok).sum())
        return {"status": P.Status.OK, "error": error, "moved": int(ok.sum()), "state": state, "sums": sums,
                "no_space": no_space}

    def _read(self, rid: int, slots: np.ndarray, addrs: np.ndarray, sums: np.ndarray, owner: np.ndarray,
              peers: list[str]) -> dict:
        store = self.store
        n = len(slots)
        state = np.full(n, P.BlockState.FAILED, np.uint8)
        errors: list[str] = []
        for who in np.unique(owner).tolist():
            idx = np.flatnonzero(owner == who)
            if who == 0:
                inside = slots[idx] < store.geometry.num_slots
                if not inside.all():
                    errors.append(f"{int((~inside).sum())} slots outside this store's {store.geometry.num_slots}")
                idx = idx[inside]
                if idx.size == 0:
                    continue
                res = store.get(slots[idx], addrs[idx], sums[idx])
            else:
                name = peers[who - 1]
                if name == self.instance_id:
                    errors.append(f"peer {name} is this instance")
                    continue
                res = store.read_peer(name, slots[idx], addrs[idx], sums[idx])
            state[idx[res.ok]] = P.BlockState.OK
            if res.corrupt.size:
                state[idx[~res.ok & np.isin(slots[idx], res.corrupt)]] = P.BlockState.CORRUPT
            errors.extend(res.errors)
        ok = state == P.BlockState.OK
        corrupt = int((state == P.BlockState.CORRUPT).sum())
        self.counters.blocks_failed += int((~ok).sum()) - corrupt
        self.counters.blocks_corrupt += corrupt
        error = ""
        if not ok.all():
            error = (f"disk read: {int((~ok).sum())} of {n} blocks not loaded ({corrupt} failed their checksum): "
                     + "; ".join(errors[:4]))
            self.last_error = error
            logger.error("disk worker gen %d: read request %d: %s", self.gen, rid, error)
        return {"status": P.Status.OK if ok.all() else P.Status.ERROR, "error": error, "moved": int(ok.sum()),
                "state": state, "read_path": READ_PATH}

    # ---- reporting ----------------------------------------------------------------------------
    def _stats_extra(self) -> dict:
        st, c = self.store, self.counters
        disk: dict = {"open": int(st is not None), "bytes_written": c.bytes_written, "bytes_read": c.bytes_read,
                      "write_s": round(c.write_s, 6), "read_s": round(c.read_s, 6),
                      "write_requests": c.write_requests, "read_requests": c.read_requests,
                      "blocks_failed": c.blocks_failed, "blocks_corrupt": c.blocks_corrupt}
        if st is not None:
            s = st.stats
            disk.update(slots=st.geometry.num_slots, live=st.num_live, journal_bytes=st.journal.size,
                        journal_records=st.journal.records, journal_compactions=s.journal_compactions,
                        written=s.blocks_written, read=s.blocks_read, peer_read=s.peer_blocks_read,
                        write_failures=s.write_failures, read_failures=s.read_failures,
                        checksum_failures=s.checksum_failures)
        return {"disk": disk, "disk_text": {"read_path": READ_PATH, "gds": self.gds_status[:200],
                                            "backend": st.io.backend if st is not None else "",
                                            "error": (self.store_error or self.last_error)[:600]}}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        super().close()          # lets go of every registration, in the shared G3 too
        if self.g3 is not None:
            self.g3.close()
            self.g3 = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser(paths=(P.Path.H2DISK,), prog="kvbm-disk-worker")
    ap.add_argument("--disk-path", required=True, help="the G3 folder (shared by instances)")
    ap.add_argument("--instance-id", required=True, help="this instance's folder under --disk-path")
    ap.add_argument("--gds", choices=GDS_MODES, default="auto")
    ap.add_argument("--fsize-limit", type=int, default=0, help="test hook: RLIMIT_FSIZE once the store is open")
    ap.add_argument("--read-blocks", type=int, default=DISK_READ_BLOCKS, help="blocks per NIXL read request")
    ap.add_argument("--read-inflight", type=int, default=DISK_READ_INFLIGHT, help="NIXL read requests in flight")
    ap.add_argument("--g3-registry", default="", help="the shared G3 slot table's segment (its engine table)")
    args = ap.parse_args(argv)
    if not os.path.isabs(args.disk_path):
        raise LayoutError(f"--disk-path must be absolute, got {args.disk_path!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    # A write past a file size limit then fails with EFBIG (DiskSpaceError) instead of killing us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return worker_main(argv, worker_cls=DiskWorker, parse=parse_args)


if __name__ == "__main__":
    sys.exit(main())
