"""The disk tier (G3) on the worker side: an instance's files, journal and NIXL I/O, tied by DiskStore.

  files    the instance's private folder under disk_path and its preallocated O_DIRECT data files
  journal  the append-only record of which block each slot holds, written once its bytes are durable
  io       NIXL (POSIX backend: io_uring, else AIO) moving blocks between host memory and the files
  store    DiskStore: open (replay the journal: warm restart), put, get (checksums verified), drop,
           entries, and reads of other instances' blocks in a shared directory

Only `io` imports NIXL, and only when a store opens, so kvbm runs without it until a disk tier is
configured. Runs in a kvbm-workers process; never imports the engine side.
"""
from __future__ import annotations

from kvbm.workers.disk.store import DiskStore, ReadResult, SlotState, StoreStats

__all__ = ["DiskStore", "ReadResult", "SlotState", "StoreStats"]
