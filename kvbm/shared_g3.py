"""One G3 for every engine of an instance: the disk tier's slot table shared like G2's (issue 15).

The disk worker keeps one store per instance (kvbm.workers.disk: one model and layout, slot =
block of the store). With several engines on the instance, which slot holds which block must be
one table that every engine's disk tier uses, or two engines would write the same slot.

Parts:
  create_g3   (the supervisor, with a disk tier and the model layout) a SharedG2 registry segment
              over the store's slots with one namespace (one store holds one model), and a checksum
              segment (0600): a u64 per slot, the checksum its block was written with.
  SharedG3    an engine's part of it: `join` (the G3 lease: its registry is the engine's G3 pool),
              `sums` (the checksum array every engine reads before a G3 read and writes after a
              write), `building` (the warm-restart rebuild, once per life of the namespace).

Rules:
  - The namespace is the model's (kvbm.shared_g2.layout_namespace and the salt); an engine of
    another model on the instance gets a ConfigError at join: its blocks would need a store of their
    own.
  - The checksum of a slot is written before the slot is registered and read while the slot is held
    (acquired), so a reader never sees one written for another block (the registry's lock orders
    them).
  - Rebuild once: the first engine to find the namespace unbuilt rebuilds it from the store's
    entries under an exclusive flock of the checksum segment, then records the namespace's
    generation in the segment's header as built. Until then no engine writes G3 (kvbm.transfer.
    disk_offload checks `built`), so the entries it read are the store's. An engine killed mid-build
    drops the flock; the next one (after reaping it) keeps what the dead one registered (each entry
    came from the store) and registers the entries whose slots are free.
  - A dead engine's G3 slots are held by it until the disk worker lets go of its registration
    (SharedG2's quarantine): a write in flight for it never lands in a slot given to another.
"""
from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from kvbm.errors import ConfigError, KvbmError
from kvbm.shared_g2 import Lease, SharedG2, layout_namespace
from kvbm.shm import G3_REGISTRY_KIND, G3_SUMS_KIND, Segment, segment_name

logger = logging.getLogger(__name__)

SUMS_MAGIC = 0x6B76626D47335331   # "kvbmG3S1"
HEADER_WORDS = 8                  # magic, built generation, reserved; then one u64 per slot


def create_g3(instance_id: str, blocks: int, *, max_engines: int, policy: str,
              ghost_ratio: float) -> tuple[SharedG2, Segment]:
    """The supervisor's G3 registry and checksum segments for a store of `blocks` slots."""
    reg = SharedG2.create(segment_name(instance_id, G3_REGISTRY_KIND), blocks, max_engines=max_engines,
                          max_namespaces=1, policy=policy, ghost_ratio=ghost_ratio, replace=True)
    try:
        sums = Segment.create(segment_name(instance_id, G3_SUMS_KIND), 8 * (HEADER_WORDS + blocks), replace=True)
        words = np.frombuffer(sums.map, np.uint64, HEADER_WORDS)
        words[1] = 0
        words[0] = SUMS_MAGIC
    except BaseException:
        reg.close()
        raise
    return reg, sums


def welcome_g3(welcome: dict | None) -> dict | None:
    """The shared G3 that kvbm-workers' welcome names (None: it has none)."""
    info = (welcome or {}).get("g3")
    return info if isinstance(info, dict) and info.get("segment") and info.get("sums") else None


class SharedG3:
    """An engine's membership of the instance's shared G3. See the module docstring."""

    def __init__(self, info: dict, engine_id: str, pid: int, layout, salt: bytes | str) -> None:
        self.registry_g2 = SharedG2.attach(info["segment"])
        self.sums_segment: Segment | None = None
        self.lease: Lease | None = None
        try:
            self.sums_segment = Segment.attach(info["sums"])
            words = np.frombuffer(self.sums_segment.map, np.uint64)
            total = self.registry_g2.total_blocks
            if words.shape[0] != HEADER_WORDS + total or int(words[0]) != SUMS_MAGIC:
                raise ConfigError(f"shared G3 {info['sums']}: not a checksum segment of {total} slots")
            self._header = words[:HEADER_WORDS]
            self.sums = words[HEADER_WORDS:]
            try:
                self.lease = self.registry_g2.join(engine_id, pid, layout_namespace(layout), salt, total)
            except ConfigError as err:
                raise ConfigError(f"the disk tier of this kvbm-workers instance holds another model's blocks (one "
                                  f"store per instance): {err}. Give this engine its own instance_id, or run it "
                                  f"without a disk tier") from err
        except BaseException:
            self.close()
            raise

    @property
    def num_blocks(self) -> int:
        return self.lease.num_blocks

    def _generation(self) -> int:
        return int(self.registry_g2.tables.namespaces["generation"][self.lease.namespace])

    @property
    def built(self) -> bool:
        """Whether this life of the namespace has been rebuilt from the store (writes may start)."""
        return int(self._header[1]) == self._generation()

    @contextmanager
    def building(self, timeout: float) -> Iterator[bool]:
        """Holds the build flock; yields True when this engine is to rebuild (then marks built on
        success), False when another did, or still holds the lock after `timeout` seconds."""
        fd = self.sums_segment.fileno()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    logger.warning("shared G3: another engine has been rebuilding the slot table for %.0f s; "
                                   "going on without waiting (no G3 writes until it is built)", timeout)
                    yield False
                    return
                time.sleep(0.01)
        try:
            self.registry_g2.reap()    # a builder that died: its holds go before the table is judged
            todo = not self.built
            yield todo
            if todo:
                self._header[1] = self._generation()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Leaves the G3 namespace (a failure is logged: the supervisor reaps the engine) and unmaps."""
        if self.lease is not None:
            try:
                self.lease.leave()
            except KvbmError:
                logger.error("leaving the shared G3 failed (kvbm-workers reaps the engine when it exits)",
                             exc_info=True)
            self.lease = None
        self.sums = self._header = None   # type: ignore[assignment]
        if self.sums_segment is not None:
            self.sums_segment.close()
            self.sums_segment = None
        if self.registry_g2 is not None:
            self.registry_g2.close()
            self.registry_g2 = None   # type: ignore[assignment]
