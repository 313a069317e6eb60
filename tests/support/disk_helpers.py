"""Helpers of the disk tier tests: host memory standing in for G2, block contents derived from their
hash (so a reader can check any block without the writer's state), and the child processes that
are killed or limited mid-write (run as `python -c "from tests.support.disk_helpers import ..."`)."""
from __future__ import annotations

import json
import mmap
import os
import resource
import signal
import sys

import numpy as np

from kvbm.errors import DiskError
from kvbm.workers.disk import DiskStore

FINGERPRINT = 0x5EED_F00D
MODEL_ID = 0x00DE_11A5


class HostBuffer:
    """Page-aligned anonymous memory cut into blocks, as the G2 segment is."""

    def __init__(self, num_blocks: int, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self._mm = mmap.mmap(-1, num_blocks * block_bytes)
        self.blocks = np.frombuffer(self._mm, dtype=np.uint8).reshape(num_blocks, block_bytes)
        self.base = self.blocks.ctypes.data
        self.nbytes = num_blocks * block_bytes

    @property
    def region(self) -> tuple[int, int]:
        return (self.base, self.nbytes)

    def addrs(self, idx) -> np.ndarray:
        return self.base + np.asarray(idx, dtype=np.uint64) * np.uint64(self.block_bytes)

    def poison(self, idx) -> None:
        self.blocks[np.asarray(idx)] = 0xA5


def content(seq_hash: int, block_bytes: int) -> np.ndarray:
    return np.random.default_rng(int(seq_hash)).integers(0, 256, block_bytes, dtype=np.uint8)


def open_store(disk_path: str, instance: str, block_bytes: int, num_slots: int, host: HostBuffer,
               **kw) -> DiskStore:
    return DiskStore.open(disk_path, instance, block_bytes, num_slots, FINGERPRINT, MODEL_ID,
                          host_regions=[host.region], **kw)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def writer_loop(disk_path: str, instance: str, block_bytes: int, num_slots: int, batch: int) -> None:
    """Writes rounds of `batch` blocks over the slots round-robin (so LIVE slots are overwritten),
    printing "put <r>" before each round's put and "round <r>" once it returned, until killed
    (at most 100000 rounds)."""
    host = HostBuffer(batch, block_bytes)
    store = open_store(disk_path, instance, block_bytes, num_slots, host)
    for r in range(100000):
        ids = r * batch + np.arange(batch)
        hashes = (ids + 1).astype(np.uint64)
        for i, h in enumerate(hashes):
            host.blocks[i] = content(h, block_bytes)
        print(f"put {r}", flush=True)
        store.put(hashes, host.addrs(range(batch)), ids % num_slots)
        print(f"round {r}", flush=True)


def limited_writer(disk_path: str, instance: str, block_bytes: int, num_slots: int, first_hash: int, count: int,
                   limit: int) -> None:
    """Puts `count` blocks under RLIMIT_FSIZE=limit (SIGXFSZ ignored, as the disk worker does);
    prints "RESULT <json>" with the outcome (NIXL logs to stdout as well)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    host = HostBuffer(count, block_bytes)
    hashes = np.arange(first_hash, first_hash + count, dtype=np.uint64)
    for i, h in enumerate(hashes):
        host.blocks[i] = content(h, block_bytes)
    out: dict = {}
    try:
        store = open_store(disk_path, instance, block_bytes, num_slots, host)
    except DiskError as err:
        out = {"open_error": type(err).__name__, "message": str(err)}
    else:
        try:
            out = {"slots": store.put(hashes, host.addrs(range(count))).tolist()}
        except DiskError as err:
            out = {"error": type(err).__name__, "message": str(err), "slots": err.slots.tolist()}
        out["free"] = store.num_free
        out["live"] = store.num_live
        store.close()
    print("RESULT", json.dumps(out), flush=True)
