"""One G2 registry for every engine of a node, in a shared-memory segment.

Parts:
  SharedG2   the registry segment (kvbm.shm.Segment, 0600): `create` (the supervisor) sizes and
             initialises it, `attach` (engines, workers) maps it. `join` makes an engine a member
             of its namespace and hands back a Lease; `leave`, `reap` (engines whose process is
             gone), `engines`/`namespaces`/`status` (for `kvbm-workers --status`) and
             `check_invariants`.
  Lease      an engine's membership: its engine slot, its namespace's partition of G2 (block
             offset, number of blocks) and `registry`, a SharedBlockRegistry with BlockRegistry's
             API over that partition (kvbm/_fast/shared.pyx; block ids are local to the partition:
             G2 block = block_offset + id).

Namespaces are partitions. A namespace is (model/layout fingerprint, salt): engines that may share
blocks. The first engine of a namespace fixes its quota (the blocks it asks for, by default
total // max_namespaces) and gets a contiguous range of G2 blocks for it (first fit; ConfigError
when no range is free) with one BlockRegistry over it, whose table lives in the segment. Every later
engine of the namespace shares that table and those blocks fully; engines of other namespaces never
see them and can never evict them. The range is freed, and its table discarded, when the last
engine of the namespace leaves or is reaped.

Order of things:
  create -> attach (each process) -> join (reaps the dead first; makes the namespace if needed) ->
  path workers check its registration against its membership (`member`) and hold it
  (`worker_hold`) -> registry calls (each under the lock) -> leave, or death -> reap (by the next
  join, by `reap` (the supervisor, periodically), or by the recovery below), retired while a worker
  holds it -> workers let go -> the last engine gone frees the namespace (its cache with it).

Liveness: an engine slot records its pid and that pid's start time (kvbm.shm.process_start_time);
it is alive while /proc shows a process with that pid and that start time, so a reused pid is not
mistaken for the engine. Reaping an engine releases its holds (kvbm._fast.shared: per-engine pins):
blocks it allocated and never registered go back to the free list, registered ones become
inactive (still matchable), then its slot is freed.

Quarantine (a dead engine's copies). An offload's G2 blocks are allocated before its D2H copy and
registered after it: were they freed when the engine dies, another engine could be handed them
while a path worker still copies the dead engine's bytes into them. So each path worker that takes
an engine's registration marks itself in the engine's slot (`worker_hold`, a bit per worker in
`workers`) and clears its bit (`worker_let_go`) only once it has dropped the registration with no
copy of it left running; the supervisor clears a dead worker's bit (`worker_gone`). An engine that
leaves or is reaped while any bit is set is RETIRED, not freed: its holds stay, so none of its
blocks can be allocated, evicted or freed, until the last bit goes; then they are released as
above. Its namespace stays while it has retired engines.

Recovery. One process-shared robust mutex guards the whole segment (kvbm/_fast/shared.pyx says
why one lock and how it is taken). A mutation marks what it changes (a namespace, or the tables)
before its first write and clears the mark after its last. A locker that finds the mark set, or
gets EOWNERDEAD from the mutex, runs `_recover`: the tables are made consistent (a namespace left
half-made is freed, engine counts recounted), the marked namespace's table is rebuilt from its
per-block fields with refcounts recomputed from the live engines' pins (the dead holder's dropped:
BlockRegistry.rebuild, kvbm/_fast/_repair.pxi), its invariants are checked, and the dead engines
are reaped. A repair cut short by another death leaves the mark set, so the next locker repeats it.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kvbm._fast import shared as S
from kvbm._fast.registry import BlockRegistry
from kvbm.errors import ConfigError, KvbmError, LifecycleError, RegistryError
from kvbm.policy import BlockState, EvictionPolicy
from kvbm.shm import Segment, check_shm_room, process_start_time

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENGINES = 16
DEFAULT_MAX_NAMESPACES = 4
MAX_ENGINES = 1024
MAX_NAMESPACES = 256
MAX_NAME_BYTES = 63       # engine ids and fingerprint labels, NUL-padded to 64 in the tables
DIED_HOLDING_LOCK = 2**64 - 1   # start time written over an engine's that died holding the lock


@dataclass(frozen=True, slots=True)
class Lease:
    """An engine's membership of the shared G2 (SharedG2.join)."""
    engine_id: str
    slot: int             # engine slot in the segment's table
    generation: int       # the slot's generation at join: calls after a leave or reap are refused
    namespace: int        # namespace slot
    block_offset: int     # first G2 block of the namespace's partition
    num_blocks: int       # the partition's length (the namespace's quota)
    registry: S.SharedBlockRegistry
    g2: SharedG2 = field(repr=False)

    def leave(self) -> bool:
        """SharedG2.leave(self)."""
        return self.g2.leave(self)


def _paths_of(mask: int) -> list[int]:
    """The worker bits of an engine slot's `workers` mask, as path numbers (kvbm.wire.protocol.Path)."""
    return [i for i in range(64) if mask >> i & 1]


def namespace_key(fingerprint: str, salt: bytes | str = b"") -> tuple[int, int]:
    """The namespace of (fingerprint, salt) as two uint64: blake2b-128 over both."""
    if isinstance(salt, str):
        salt = salt.encode()
    digest = hashlib.blake2b(fingerprint.encode() + b"\0" + bytes(salt), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def layout_namespace(layout) -> str:
    """The fingerprint string a model's layout (kvbm.layout.LayoutConfig) joins under: engines of
    one model and salt share a namespace, whichever process computes it (KvBlockManager, a vLLM
    rank's ShardTransfers, the vLLM scheduler side)."""
    from kvbm.hashing import layout_fingerprint
    return (f"{layout.num_layers}x{layout.outer_dim}x{layout.page_size}x{layout.inner_dim} {layout.dtype} "
            f"{layout_fingerprint(layout):016x}")


def _map_pages(view) -> None:
    """Reads a byte of every page of `view` (memory the namespace reserved): this process maps
    them now, instead of taking a page fault inside the first calls that reach each one."""
    np.frombuffer(view, np.uint8)[::mmap.PAGESIZE].sum()


def _name_bytes(value: str, what: str) -> bytes:
    raw = value.encode()
    if not 1 <= len(raw) <= MAX_NAME_BYTES or b"\0" in raw:
        raise ConfigError(f"{what} must be 1 to {MAX_NAME_BYTES} bytes without NUL, got "
                          f"{len(raw)} bytes: {value!r:.80}")
    return raw


# A waiter for the registry's lock retries for this long before it blocks (kvbm._fast.shared: the
# woken waiter otherwise loses the lock to an engine calling in a loop). Only with cores to spare: on
# fewer than 4, a spinning waiter takes the core a preempted holder needs.
LOCK_SPIN_NS = 200_000


def lock_spin_ns() -> int:
    return LOCK_SPIN_NS if (os.cpu_count() or 1) >= 4 else 0


def welcome_registry(welcome: dict | None, block_stride: int, instance_id: str,
                     ranks: int | None = None) -> dict | None:
    """The shared G2 registry kvbm-workers' welcome names (None: it runs without one), checked to
    hold blocks of `block_stride` bytes and, for a rank (`ranks` given), that many rank regions
    (ConfigError otherwise). A metadata-only engine picks block ids for every region: no `ranks`."""
    info = (welcome or {}).get("registry")
    if not info:
        return None
    if info.get("block_bytes") != block_stride or (ranks is not None and info.get("ranks", 1) != ranks):
        raise ConfigError(f"kvbm-workers {instance_id} shares a G2 of {info.get('block_bytes')}-byte blocks in "
                          f"{info.get('ranks', 1)} rank region(s); this engine's blocks are {block_stride} bytes"
                          + (f", of {ranks} rank(s)" if ranks is not None else "") + ": start it with this "
                          "model's --layout (and --g2-ranks), or give this engine its own instance_id")
    return info


def join_segment(segment: str, engine_id: str, layout, salt: bytes | str, blocks: int) -> tuple[SharedG2, Lease]:
    """Maps the shared G2 `segment` and joins, as this process, the namespace of `layout` (a
    LayoutConfig) and `salt` (its quota `blocks` if it is the first); (the mapping, the lease)."""
    g2 = SharedG2.attach(segment)
    try:
        return g2, g2.join(engine_id, os.getpid(), layout_namespace(layout), salt, blocks)
    except BaseException:
        g2.close()
        raise


def leave_segment(g2: SharedG2 | None, lease: Lease | None, who: str) -> None:
    """Leaves (a failure is logged: kvbm-workers reaps the engine when it exits) and unmaps."""
    if lease is None or g2 is None:
        return
    try:
        lease.leave()
    except KvbmError:
        logger.error("%s: leaving the shared G2 failed (its supervisor reaps it when it exits)", who, exc_info=True)
    finally:
        g2.close()


class SharedG2:
    """The shared G2 registry segment of one kvbm instance. See the module docstring."""

    def __init__(self, segment: Segment, tables: S.SharedTables, owner: bool) -> None:
        self.segment = segment
        self.tables = tables
        self.owner = owner
        self._regs: dict[int, tuple[int, BlockRegistry]] = {}   # namespace -> (generation, table)
        tables.on_recover = self._recover
        tables.lock_spin_ns = lock_spin_ns()
        try:
            # Huge pages for the tables where /dev/shm allows them (shmem_enabled "advise"): a
            # match walks random index slots, and on 4 KiB pages its TLB misses cost ~15% of it.
            segment.map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            logger.debug("shared G2 %s: no MADV_HUGEPAGE here", segment.name)
        hdr = tables.header[0]
        self.total_blocks = int(hdr["total_blocks"])
        self.max_engines = int(hdr["max_engines"])
        self.max_namespaces = int(hdr["max_namespaces"])
        self.policy = int(hdr["policy"])
        self.ghost_per_mille = int(hdr["ghost_per_mille"])

    # ---- create / attach / close ----------------------------------------------------------------

    @classmethod
    def create(cls, name: str, total_blocks: int, *, max_engines: int = DEFAULT_MAX_ENGINES,
               max_namespaces: int = DEFAULT_MAX_NAMESPACES, policy: str = "lru",
               ghost_ratio: float = 1.0, replace: bool = False) -> SharedG2:
        """A new segment `name` (0600) for `total_blocks` G2 blocks. Only its tables are reserved
        now; each namespace's table and each engine's pins claim their memory when made. policy,
        ghost_ratio: every namespace's registry (kvbm.config's `policy` and `ghost_ratio`)."""
        if not 1 <= max_engines <= MAX_ENGINES or not 1 <= max_namespaces <= MAX_NAMESPACES:
            raise ConfigError(f"shared G2: max_engines {max_engines} must be in [1, {MAX_ENGINES}], "
                              f"max_namespaces {max_namespaces} in [1, {MAX_NAMESPACES}]")
        if total_blocks < 1 or total_blocks > 2147483646:
            raise ConfigError(f"shared G2: total_blocks must be in [1, 2147483646], got {total_blocks}")
        if not 0 <= ghost_ratio <= 64:
            raise ConfigError(f"shared G2: ghost_ratio must be in [0, 64], got {ghost_ratio}")
        pol = int(EvictionPolicy.from_name(policy))
        ghost = round(ghost_ratio * 1000)        # LINEAGE's ghost entries, thousandths of a quota
        lay = S.layout(total_blocks, max_engines, max_namespaces, pol, ghost)
        check_shm_room(lay["reserved_bytes"], "the shared G2 registry's tables")
        seg = Segment.create(name, lay["segment_bytes"], replace=replace, reserve=lay["reserved_bytes"])
        try:
            tables = S.SharedTables(seg.map, True, total_blocks, max_engines, max_namespaces, pol,
                                    ghost, time.time_ns())
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        logger.info("shared G2 registry %s: %d blocks, %d engine and %d namespace slots, %s; "
                    "%.1f MB of address space, %.3f MB reserved", name, total_blocks, max_engines,
                    max_namespaces, policy, lay["segment_bytes"] / 1e6, lay["reserved_bytes"] / 1e6)
        return cls(seg, tables, owner=True)

    @classmethod
    def attach(cls, name: str) -> SharedG2:
        """Maps an existing segment (made by `create`, in another process)."""
        seg = Segment.attach(name)
        try:
            tables = S.SharedTables(seg.map)
        except BaseException:
            seg.close()
            raise
        return cls(seg, tables, owner=False)

    def close(self) -> None:
        """Unmaps the segment (leases of this process stop working); the creator also unlinks it."""
        self._regs.clear()
        if self.tables is not None:
            self.tables.on_recover = None
            self.tables = None   # type: ignore[assignment]
        if self.segment is not None:
            self.segment.close()
            if self.owner:
                self.segment.unlink()
            self.segment = None   # type: ignore[assignment]

    def __enter__(self) -> SharedG2:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.segment.name

    # ---- the lock -------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[S.SharedTables]:
        """The segment's lock, recovery included. A body that raises after marking a mutation
        leaves the mark, so that the next locker repairs what it half did."""
        t = self.tables
        if t is None:
            raise LifecycleError("shared G2: used after close")
        t.acquire()
        t.mark(S.OTHER, t.holder_ns)
        clean = False
        try:
            yield t
            clean = True
        finally:
            t.release(clean)

    # ---- join / leave / reap --------------------------------------------------------------------

    def join(self, engine_id: str, pid: int, fingerprint: str, salt: bytes | str = b"",
             blocks: int | None = None, *, start_time: int | None = None) -> Lease:
        """Makes engine `engine_id` (process `pid`) a member of the namespace (fingerprint, salt),
        making the namespace (with a quota of `blocks`, default total // max_namespaces) when it is
        the first. `start_time`: the pid's start time (default: read from /proc now). Raises
        ConfigError when no engine slot, namespace slot or range of G2 blocks is free, and
        LifecycleError when `engine_id` is already a live member or `pid` is not running."""
        eid = _name_bytes(engine_id, "engine id")
        label = fingerprint.encode()[:MAX_NAME_BYTES]
        if start_time is None:
            start_time = process_start_time(pid)
            if start_time is None:
                raise LifecycleError(f"join: engine {engine_id!r}: pid {pid} is not a running process")
        key = namespace_key(fingerprint, salt)
        with self._locked() as t:
            self._reap_locked()
            eng, nss = t.engines, t.namespaces
            live = eng["state"] == S.ENGINE_LIVE
            same = np.flatnonzero(live & (eng["engine_id"] == eid))
            if same.size:
                s = int(same[0])
                raise LifecycleError(f"join: engine {engine_id!r} is already a member (slot {s}, "
                                     f"pid {int(eng['pid'][s])}); leave first")
            free = np.flatnonzero(eng["state"] == S.ENGINE_FREE)
            if free.size == 0:
                raise ConfigError(f"join: all {self.max_engines} engine slots of the shared G2 are taken")
            slot = int(free[0])
            ns = self._find_namespace(key)
            if ns < 0:
                ns = self._make_namespace(t, key, label, blocks)
            elif blocks is not None and blocks != int(nss["num_blocks"][ns]):
                logger.info("join: engine %s asked for %d blocks; namespace %d (%s) has its quota of "
                            "%d already", engine_id, blocks, ns, label.decode(errors="replace"),
                            int(nss["num_blocks"][ns]))
            off, n = int(nss["block_offset"][ns]), int(nss["num_blocks"][ns])
            t.mark(S.OTHER, S.TABLES)
            h = t.header[0]
            self.segment.reserve(int(h["pins_off"]) + slot * int(h["pins_stride"]) + 4 * off, 4 * n)
            t.pins[slot, off:off + n] = 0     # writing maps the pages of this process's row, too
            for name in ("match_calls", "match_queries", "match_hits", "allocated", "registered",
                         "deduplicated", "released", "pinned", "workers"):
                eng[name][slot] = 0
            eng["ns"][slot] = ns
            eng["pid"][slot] = pid
            eng["start_time"][slot] = start_time
            eng["joined_ns"][slot] = time.time_ns()
            eng["engine_id"][slot] = eid
            eng["generation"][slot] += 1
            eng["state"][slot] = S.ENGINE_LIVE       # last: a slot is live only once filled in
            nss["engines"][ns] += 1
            t.header["generation"] += 1
            t.mark(-1, S.CLEAN)
            gen = int(eng["generation"][slot])
            reg = self._registry(ns)
        logger.info("shared G2 %s: engine %s (pid %d) joined as slot %d, namespace %d (%s): "
                    "blocks [%d, %d)", self.name, engine_id, pid, slot, ns,
                    label.decode(errors="replace"), off, off + n)
        return Lease(engine_id, slot, gen, ns, off, n, S.SharedBlockRegistry(t, slot, gen, reg, self), self)

    def leave(self, lease: Lease) -> bool:
        """Ends a membership: the engine's remaining holds are released (logged when there are
        any), its slot freed, and its namespace with it when it was the last. False (nothing done)
        when the lease had already ended (left, or reaped)."""
        with self._locked() as t:
            eng = t.engines
            if int(eng["state"][lease.slot]) != S.ENGINE_LIVE or \
                    int(eng["generation"][lease.slot]) != lease.generation:
                return False
            info = self._retire(t, lease.slot, dead=False)
        if info["released"]:
            logger.warning("shared G2 %s: engine %s left holding %d blocks; released them", self.name,
                           lease.engine_id, info["released"])
        return True

    def reap(self) -> list[dict]:
        """Reaps every engine whose process is gone; returns what each was (engines() entries,
        plus `released`: its holds given back)."""
        with self._locked():
            return self._reap_locked()

    def _reap_locked(self) -> list[dict]:
        t = self.tables
        out = []
        for slot in np.flatnonzero(t.engines["state"] == S.ENGINE_LIVE).tolist():
            if not self._alive(slot):
                info = self._retire(t, slot, dead=True)
                out.append(info)
                logger.warning("shared G2 %s: reaped engine %s (slot %d, pid %d, gone): released "
                               "%d holds", self.name, info["engine_id"], slot, info["pid"],
                               info["released"])
        return out

    # ---- path workers ---------------------------------------------------------------------------

    def member(self, engine_id: str) -> dict | None:
        """The live membership of `engine_id`: {slot, generation, pid, alive, namespace,
        block_offset, num_blocks}; None when no live slot has that id. What a path worker checks
        an engine's registration against (the table, never the engine's message)."""
        eid = engine_id.encode()
        with self._locked() as t:
            eng, nss = t.engines, t.namespaces
            hit = np.flatnonzero((eng["state"] == S.ENGINE_LIVE) & (eng["engine_id"] == eid))
            if hit.size == 0:
                return None
            slot = int(hit[0])
            ns = int(eng["ns"][slot])
            return {"slot": slot, "generation": int(eng["generation"][slot]), "pid": int(eng["pid"][slot]),
                    "alive": self._alive(slot), "namespace": ns,
                    "block_offset": int(nss["block_offset"][ns]), "num_blocks": int(nss["num_blocks"][ns])}

    def namespace_of(self, slot: int, generation: int) -> int:
        """The namespace of engine slot `slot` while it is live at `generation`; -1 otherwise."""
        with self._locked() as t:
            eng = t.engines
            if int(eng["state"][slot]) != S.ENGINE_LIVE or int(eng["generation"][slot]) != generation:
                return -1
            return int(eng["ns"][slot])

    def holds(self, slot: int, generation: int, blocks) -> bool:
        """Whether engine slot `slot`, live or retired at `generation`, holds every one of `blocks`
        (ids within its namespace). The disk worker checks a shared G3 write's slots with it."""
        blocks = np.asarray(blocks, np.int64)
        with self._locked() as t:
            eng = t.engines
            if int(eng["state"][slot]) == S.ENGINE_FREE or int(eng["generation"][slot]) != generation:
                return False
            ns = int(eng["ns"][slot])
            off, n = int(t.namespaces["block_offset"][ns]), int(t.namespaces["num_blocks"][ns])
            if blocks.size and (int(blocks.min()) < 0 or int(blocks.max()) >= n):
                return False
            return bool((t.pins[slot, off:off + n][blocks] > 0).all())

    def worker_hold(self, slot: int, generation: int, worker_bit: int) -> bool:
        """A path worker (bit `worker_bit`) holds the registration of engine slot `slot`: from now
        on the slot's holds outlive the engine until the worker lets go (worker_let_go). False
        (nothing done) when the slot is no longer live at `generation`."""
        with self._locked() as t:
            eng = t.engines
            if int(eng["state"][slot]) != S.ENGINE_LIVE or int(eng["generation"][slot]) != generation:
                return False
            eng["workers"][slot] |= np.uint64(worker_bit)
            return True

    def worker_let_go(self, slot: int, generation: int, worker_bit: int) -> dict | None:
        """The worker dropped the registration, with no copy of it left running: a retired slot
        that no worker holds any more gives its holds back (returned, as `_retire` says)."""
        with self._locked() as t:
            return self._let_go(t, slot, generation, worker_bit)

    def worker_gone(self, worker_bit: int) -> list[dict]:
        """The worker of `worker_bit` died (the supervisor saw it exit): none of its copies runs
        any more, so it holds no registration; the retired slots it was the last to hold are freed."""
        with self._locked() as t:
            eng = t.engines
            out = []
            for slot in np.flatnonzero((eng["state"] != S.ENGINE_FREE)
                                       & ((eng["workers"] & np.uint64(worker_bit)) != 0)).tolist():
                info = self._let_go(t, slot, int(eng["generation"][slot]), worker_bit)
                if info is not None:
                    out.append(info)
            return out

    def _let_go(self, t: S.SharedTables, slot: int, generation: int, worker_bit: int) -> dict | None:
        eng = t.engines
        if int(eng["state"][slot]) == S.ENGINE_FREE or int(eng["generation"][slot]) != generation:
            return None
        eng["workers"][slot] &= ~np.uint64(worker_bit)
        if int(eng["state"][slot]) != S.ENGINE_RETIRED or int(eng["workers"][slot]):
            return None
        info = self._retire(t, slot, dead=True)
        logger.info("shared G2 %s: retired engine %s (slot %d): no worker holds its registration; "
                    "released its %d holds", self.name, info["engine_id"], slot, info["released"])
        return info

    def _alive(self, slot: int) -> bool:
        eng = self.tables.engines
        return process_start_time(int(eng["pid"][slot])) == int(eng["start_time"][slot])

    def _retire(self, t: S.SharedTables, slot: int, dead: bool) -> dict:
        # Lock held. Releases the slot's holds through the namespace's table, frees the slot and,
        # with its last engine, the namespace.
        eng, nss = t.engines, t.namespaces
        ns = int(eng["ns"][slot])
        off, n = int(nss["block_offset"][ns]), int(nss["num_blocks"][ns])
        info = self._engine_info(slot)
        if int(eng["workers"][slot]) and int(eng["state"][slot]) == S.ENGINE_LIVE:
            # A path worker still holds its registration: a copy of its may still write the blocks
            # it holds (an offload's G2 blocks, allocated and not yet registered). They stay held
            # (quarantined) until the last such worker has dropped it (worker_detach, or
            # worker_gone when that worker died), and only then go back to the pool.
            t.mark(S.OTHER, S.TABLES)
            eng["state"][slot] = S.ENGINE_RETIRED
            t.header["generation"] += 1
            if dead:
                t.header["reaped"] += 1
            t.mark(-1, S.CLEAN)
            info["released"] = 0
            info["quarantined"] = info["pinned"]
            logger.info("shared G2 %s: engine %s (slot %d) retired while path workers %s hold its "
                        "registration: its %d holds stay until they drop it", self.name,
                        info["engine_id"], slot, _paths_of(int(eng["workers"][slot])), info["pinned"])
            return info
        t.mark(S.OTHER, ns)
        held = t.pins[slot, off:off + n]
        released = int(held.sum(dtype=np.uint64))
        if released:
            self._registry(ns).release(np.repeat(np.arange(n, dtype=np.int64), held))
            held[:] = 0
        info["released"] = released
        nss["retired_hits"][ns] += eng["match_hits"][slot]
        nss["retired_queries"][ns] += eng["match_queries"][slot]
        retired = int(eng["state"][slot]) == S.ENGINE_RETIRED   # counted when it retired
        self._free_engine(t, slot)
        if nss["engines"][ns] > 0:
            nss["engines"][ns] -= 1
        if nss["engines"][ns] == 0:
            self._free_namespace(t, ns)
        t.header["generation"] += 1
        if dead and not retired:
            t.header["reaped"] += 1
        t.mark(-1, S.CLEAN)      # consistent again
        return info

    def _free_engine(self, t: S.SharedTables, slot: int) -> None:
        eng = t.engines
        eng["state"][slot] = S.ENGINE_FREE
        eng["generation"][slot] += 1
        eng["pid"][slot] = 0
        eng["start_time"][slot] = 0
        eng["engine_id"][slot] = b""
        eng["workers"][slot] = 0
        ns = int(eng["ns"][slot])
        if int(t.namespaces["drainer"][ns]) == slot + 1:
            t.namespaces["drainer"][ns] = 0       # the next engine to drain takes the ring over
        h = t.header[0]
        self.segment.discard(int(h["pins_off"]) + slot * int(h["pins_stride"]), int(h["pins_stride"]))

    # ---- namespaces -----------------------------------------------------------------------------

    def _find_namespace(self, key: tuple[int, int]) -> int:
        nss = self.tables.namespaces
        hit = np.flatnonzero((nss["state"] == S.LIVE) & (nss["key0"] == key[0]) & (nss["key1"] == key[1]))
        return int(hit[0]) if hit.size else -1

    def _make_namespace(self, t: S.SharedTables, key: tuple[int, int], label: bytes,
                        blocks: int | None) -> int:
        nss = t.namespaces
        quota = blocks if blocks is not None else max(1, self.total_blocks // self.max_namespaces)
        if not 1 <= quota <= self.total_blocks:
            raise ConfigError(f"join: a namespace of {quota} blocks does not fit a G2 of "
                              f"{self.total_blocks} blocks")
        free = np.flatnonzero(nss["state"] == S.FREE)
        if free.size == 0:
            labels = [x.decode(errors="replace") for x in nss["label"].tolist()]
            raise ConfigError(f"join: all {self.max_namespaces} namespaces of the shared G2 are in "
                              f"use ({', '.join(labels)})")
        ns = int(free[0])
        offset, free_blocks, largest = self._first_fit(quota)
        if offset < 0:
            raise ConfigError(f"join: G2 has no room for a namespace of {quota} blocks: {free_blocks} "
                              f"of {self.total_blocks} blocks are free, the largest free range has "
                              f"{largest}")
        g = S.ghost_blocks_for(quota, self.policy, self.ghost_per_mille)
        t.mark(S.OTHER, ns)
        nss["state"][ns] = S.INIT          # a half-made namespace is freed by the recovery
        nss["key0"][ns], nss["key1"][ns] = key
        nss["block_offset"][ns] = offset
        nss["num_blocks"][ns] = quota
        nss["ghost_blocks"][ns] = g
        nss["engines"][ns] = 0
        nss["retired_hits"][ns] = 0
        nss["retired_queries"][ns] = 0
        nss["created_ns"][ns] = time.time_ns()
        nss["label"][ns] = label
        nss["drainer"][ns] = 0
        nss["generation"][ns] += 1
        h = t.header[0]
        self.segment.reserve(int(h["regs_off"]) + ns * int(h["reg_stride"]),
                             BlockRegistry.bytes_needed(quota, g))
        BlockRegistry(quota, t.registry_buffer(ns), self.policy, g)
        nss["state"][ns] = S.LIVE
        t.mark(-1, S.CLEAN)
        logger.info("shared G2 %s: namespace %d (%s) made: blocks [%d, %d)", self.name, ns,
                    label.decode(errors="replace"), offset, offset + quota)
        return ns

    def _first_fit(self, quota: int) -> tuple[int, int, int]:
        """(offset of the first free range of `quota` blocks or -1, free blocks, largest range)."""
        nss = self.tables.namespaces
        used = sorted((int(nss["block_offset"][i]), int(nss["num_blocks"][i]))
                      for i in np.flatnonzero(nss["state"] != S.FREE).tolist())
        pos, found, largest, free = 0, -1, 0, 0
        for off, n in [*used, (self.total_blocks, 0)]:
            gap = off - pos
            free += gap
            largest = max(largest, gap)
            if found < 0 and gap >= quota:
                found = pos
            pos = max(pos, off + n)
        return found, free, largest

    def _free_namespace(self, t: S.SharedTables, ns: int) -> None:
        nss = t.namespaces
        nss["state"][ns] = S.FREE
        nss["key0"][ns] = nss["key1"][ns] = 0
        nss["engines"][ns] = 0
        nss["generation"][ns] += 1
        self._regs.pop(ns, None)
        h = t.header[0]
        self.segment.discard(int(h["regs_off"]) + ns * int(h["reg_stride"]), int(h["reg_stride"]))
        logger.info("shared G2 %s: namespace %d (%s) freed: blocks [%d, %d)", self.name, ns,
                    nss["label"][ns].decode(errors="replace"), int(nss["block_offset"][ns]),
                    int(nss["block_offset"][ns]) + int(nss["num_blocks"][ns]))

    def _registry(self, ns: int) -> BlockRegistry:
        """This process's BlockRegistry over namespace `ns`'s table (attached once per generation
        of the namespace)."""
        nss = self.tables.namespaces
        gen = int(nss["generation"][ns])
        cached = self._regs.get(ns)
        if cached is not None and cached[0] == gen:
            return cached[1]
        buf = self.tables.registry_buffer(ns)
        _map_pages(buf[:BlockRegistry.bytes_needed(int(nss["num_blocks"][ns]), int(nss["ghost_blocks"][ns]))])
        reg = BlockRegistry.attach(buf)
        if reg.num_blocks != int(nss["num_blocks"][ns]):
            raise RegistryError(f"namespace {ns}: its table has {reg.num_blocks} blocks, its entry "
                                f"{int(nss['num_blocks'][ns])}")
        self._regs[ns] = (gen, reg)
        return reg

    # ---- recovery -------------------------------------------------------------------------------

    def _recover(self, owner_died: bool) -> None:
        # Run by SharedTables with the lock held (and the mutex made consistent), when the last
        # holder died or left its mark. Idempotent: a repair cut short is repeated from scratch.
        t = self.tables
        holder, dirty = t.holder, t.holder_ns
        t.header["repairs"] += 1
        logger.warning("shared G2 %s: %s (holder %d, mark %d); repairing", self.segment.name,
                       "the lock's holder died" if owner_died else "a holder left its mark", holder, dirty)
        eng, nss = t.engines, t.namespaces
        for ns in np.flatnonzero(nss["state"] == S.INIT).tolist():
            self._free_namespace(t, ns)      # half-made: nobody can have used it
        used = np.flatnonzero(eng["state"] != S.ENGINE_FREE).tolist()
        for slot in used:
            if nss["state"][int(eng["ns"][slot])] != S.LIVE:
                self._free_engine(t, slot)
        used = np.flatnonzero(eng["state"] != S.ENGINE_FREE).tolist()
        live = np.flatnonzero(eng["state"] == S.ENGINE_LIVE).tolist()
        nss["engines"][:] = 0
        for slot in used:
            nss["engines"][int(eng["ns"][slot])] += 1
        # EOWNERDEAD says the holder died even while /proc still shows its process exiting; the
        # mark on its slot keeps saying so should this repair be cut short and repeated
        gone = holder if owner_died and holder >= 0 and holder in live else -1
        if gone >= 0:
            eng["start_time"][gone] = DIED_HOLDING_LOCK
        if dirty >= 0 and nss["state"][dirty] == S.LIVE:
            off, n = int(nss["block_offset"][dirty]), int(nss["num_blocks"][dirty])
            # Only a dead holder's pins are in doubt (it died mid-call): every other engine's,
            # dead or alive, are whole; the dead ones are reaped after, quarantine and all.
            members = [s for s in used if int(eng["ns"][s]) == dirty]
            suspect = holder if holder in live and holder in members and \
                (holder == gone or not self._alive(holder)) else -1
            dead = [suspect] if suspect >= 0 else []
            keep = [s for s in members if s not in dead]
            counts = t.pins[keep, off:off + n].sum(axis=0, dtype=np.uint64) if keep \
                else np.zeros(n, np.uint64)
            reg = self._registry(dirty)
            if suspect >= 0 and int(eng["workers"][suspect]):
                # Blocks the holder allocated by calls that finished may be under a copy: its holds
                # on allocated, unregistered blocks stay (its other holds are dropped: a cut call
                # may have half-moved them, and nothing writes a registered block).
                states = S.table_states(reg)
                row = t.pins[suspect, off:off + n]
                row[(states != BlockState.PARTIAL) & (states != BlockState.COMPLETE)] = 0
                counts += row
                dead, keep = [], members
            if counts.size and int(counts.max()) > 0xFFFFFFFF:
                raise RegistryError(f"recover: namespace {dirty}: a block is held {int(counts.max())} times")
            summary = reg.rebuild(counts.astype(np.uint32))
            reg.check_invariants()
            for s in dead:
                t.pins[s, off:off + n] = 0     # their holds are not in the rebuilt refcounts
            for s in keep:
                eng["pinned"][s] = int(t.pins[s, off:off + n].sum(dtype=np.uint64))
            logger.warning("shared G2 %s: namespace %d rebuilt without the holds of dead engine "
                           "slots %s: %s", self.segment.name, dirty, dead, summary)
        t.mark(-1, S.CLEAN)
        if gone >= 0:
            info = self._retire(t, gone, dead=True)
            logger.warning("shared G2 %s: reaped engine %s (slot %d, pid %d, died holding the lock): "
                           "released %d holds", self.segment.name, info["engine_id"], gone, info["pid"],
                           info["released"])
        self._reap_locked()     # the other dead engines (their namespaces are consistent)

    # ---- status and checks ----------------------------------------------------------------------

    def _engine_info(self, slot: int) -> dict:
        e = self.tables.engines[slot]
        ns = int(e["ns"])
        return {"slot": slot, "engine_id": e["engine_id"].decode(errors="replace"), "pid": int(e["pid"]),
                "namespace": ns, "label": self.tables.namespaces["label"][ns].decode(errors="replace"),
                "pinned": int(e["pinned"]), "match_calls": int(e["match_calls"]),
                "match_queries": int(e["match_queries"]), "match_hits": int(e["match_hits"]),
                "allocated": int(e["allocated"]), "registered": int(e["registered"]),
                "deduplicated": int(e["deduplicated"]), "released": int(e["released"]),
                "joined_ns": int(e["joined_ns"]), "workers": _paths_of(int(e["workers"])),
                "state": "retired" if int(e["state"]) == S.ENGINE_RETIRED else "live"}

    def engines(self) -> list[dict]:
        """The engine slots in use (counters, holds, the path workers holding its registration,
        whether the process is alive now, and `state`: live, or retired: left or dead, its holds
        kept until no worker holds its registration)."""
        with self._locked() as t:
            out = []
            for slot in np.flatnonzero(t.engines["state"] != S.ENGINE_FREE).tolist():
                info = self._engine_info(slot)
                info["alive"] = self._alive(slot)
                out.append(info)
            return out

    def namespaces(self) -> list[dict]:
        """The live namespaces: partition, quota, occupancy and hits."""
        with self._locked() as t:
            nss, eng = t.namespaces, t.engines
            out = []
            for ns in np.flatnonzero(nss["state"] == S.LIVE).tolist():
                reg = self._registry(ns)
                members = (eng["state"] != S.ENGINE_FREE) & (eng["ns"] == ns)
                hits = int(nss["retired_hits"][ns]) + int(eng["match_hits"][members].sum())
                queries = int(nss["retired_queries"][ns]) + int(eng["match_queries"][members].sum())
                out.append({"namespace": ns, "label": nss["label"][ns].decode(errors="replace"),
                            "key": f"{int(nss['key0'][ns]):016x}", "block_offset": int(nss["block_offset"][ns]),
                            "num_blocks": int(nss["num_blocks"][ns]), "engines": int(nss["engines"][ns]),
                            "free": reg.num_free, "inactive": reg.num_inactive, "active": reg.num_active,
                            "registered": reg.num_registered, "match_queries": queries, "match_hits": hits})
            return out

    def status(self) -> dict:
        """What `kvbm-workers --status` shows of the shared G2."""
        namespaces = self.namespaces()
        h = self.tables.header[0]
        return {"segment": self.name, "total_blocks": self.total_blocks,
                "unpartitioned": self.total_blocks - sum(ns["num_blocks"] for ns in namespaces),
                "namespaces": namespaces, "engines": self.engines(), "repairs": int(h["repairs"]),
                "reaped": int(h["reaped"]), "lock": self.tables.lock_stats}

    def check_invariants(self) -> None:
        """Raises RegistryError (with the numbers) unless: partitions lie in G2 without overlap,
        engine counts and live engines agree, every live namespace's table passes its own checks,
        and each block's refcount is the sum of its holds over the namespace's live engines (the
        pins of each engine summing to its `pinned`)."""
        with self._locked() as t:
            nss, eng = t.namespaces, t.engines
            if t.holder_ns != S.CLEAN:
                raise RegistryError(f"mark {t.holder_ns} left set after recovery")
            spans = []
            for ns in np.flatnonzero(nss["state"] != S.FREE).tolist():
                if nss["state"][ns] != S.LIVE:
                    raise RegistryError(f"namespace {ns} is in state {int(nss['state'][ns])} outside a mutation")
                off, n = int(nss["block_offset"][ns]), int(nss["num_blocks"][ns])
                if off < 0 or n < 1 or off + n > self.total_blocks:
                    raise RegistryError(f"namespace {ns}: blocks [{off}, {off + n}) outside G2's {self.total_blocks}")
                spans.append((off, off + n, ns))
                members = np.flatnonzero((eng["state"] != S.ENGINE_FREE) & (eng["ns"] == ns)).tolist()
                if len(members) != int(nss["engines"][ns]) or not members:
                    raise RegistryError(f"namespace {ns}: {len(members)} engines (live or retired), its count says "
                                        f"{int(nss['engines'][ns])}")
                reg = self._registry(ns)
                reg.check_invariants()
                total = np.zeros(n, np.uint64)
                for s in members:
                    row = t.pins[s, off:off + n]
                    if int(row.sum(dtype=np.uint64)) != int(eng["pinned"][s]):
                        raise RegistryError(f"engine slot {s}: pins sum to {int(row.sum(dtype=np.uint64))}, "
                                            f"pinned says {int(eng['pinned'][s])}")
                    total += row
                refc = S.table_refcounts(reg)
                bad = np.flatnonzero(refc != total)
                if bad.size:
                    b = int(bad[0])
                    raise RegistryError(f"namespace {ns}: block {b} has refcount {int(refc[b])} but its "
                                        f"engines hold it {int(total[b])} times ({bad.size} such blocks)")
            spans.sort()
            for (_, hi, a), (lo, _, b) in zip(spans, spans[1:]):
                if lo < hi:
                    raise RegistryError(f"namespaces {a} and {b} overlap at block {lo}")
            for s in np.flatnonzero(eng["state"] != S.ENGINE_FREE).tolist():
                if nss["state"][int(eng["ns"][s])] != S.LIVE:
                    raise RegistryError(f"engine slot {s} is in namespace {int(eng['ns'][s])}, which is not live")


__all__ = ["Lease", "SharedG2", "namespace_key"]
