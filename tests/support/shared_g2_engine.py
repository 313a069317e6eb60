"""Engines of the shared G2 in processes of their own, for tests/integration/test_shared_g2_processes.py
(started through multiprocessing's spawn context: a fresh interpreter, nothing inherited).

  serve      an engine driven over a pipe: ("register", hashes), ("match", hashes), ("release",),
             ("lock",) (take the segment's lock and mark the engine's namespace, then wait to be
             killed), ("leave",), ("exit",); each answers one message
  hammer     an engine running seeded random offloads and onboards over shared chains of hashes,
             every matched block compared byte for byte while it is held; optionally armed to
             SIGKILL itself at a chosen point of its n-th call of an op (kvbm._fast.shared
             .set_test_kill)
  hold_lock  a non-engine that takes the lock, marks a namespace, says so and waits to be killed

The G2 "bytes": a second segment of BLOCK_BYTES per G2 block. An engine writes content(hash) into
a block it allocated (it alone holds it) before registering it, and checks content(hash) in every
block it matched, while it holds them. Hashes start at 1 (a block of zeros is never valid content).
"""
from __future__ import annotations

import os
import traceback

import numpy as np

from kvbm._fast import shared as S
from kvbm.shared_g2 import SharedG2
from kvbm.shm import Segment

BLOCK_BYTES = 64
CHAIN = 8          # hammer: hashes per chain (a request's prefix)
WAIT_S = 120.0     # every wait for the parent has a deadline


def content(h: int) -> bytes:
    return (np.uint64(h) * np.arange(1, BLOCK_BYTES // 8 + 1, dtype=np.uint64)).tobytes()


class Engine:
    """A lease plus the data segment view: offload (write, register) and onboard (match, check)."""

    def __init__(self, name: str, data_name: str, engine_id: str, fingerprint: str, salt: bytes,
                 blocks: int | None) -> None:
        self.g2 = SharedG2.attach(name)
        self.data_seg = Segment.attach(data_name)
        self.lease = self.g2.join(engine_id, os.getpid(), fingerprint, salt, blocks)
        self.reg = self.lease.registry
        whole = np.frombuffer(self.data_seg.map, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
        self.data = whole[self.lease.block_offset:self.lease.block_offset + self.lease.num_blocks]

    def offload(self, hashes: list[int], parents: list[int] | None = None) -> list[int]:
        """Registers the hashes not held yet (as many as fit); returns the canonical blocks."""
        hashes_a = np.asarray(hashes, np.uint64)
        missing = np.flatnonzero(self.reg.lookup(hashes_a) < 0)
        if missing.size == 0:
            return []
        blocks = self.reg.allocate(int(missing.size))
        if blocks is None:
            return []
        for b, i in zip(blocks.tolist(), missing.tolist()):
            self.data[b] = np.frombuffer(content(hashes[i]), np.uint8)
        self.reg.complete(blocks)
        if parents is None:
            canon = self.reg.register(blocks, hashes_a[missing])
        else:
            par = np.asarray(parents, np.uint64)[missing]
            canon = self.reg.register(blocks, hashes_a[missing], parents=par, has_parent=par != 0)
        self.reg.release(canon)
        return canon.tolist()

    def onboard(self, hashes: list[int]) -> tuple[np.ndarray, int]:
        """Matches (holding the blocks); returns them and how many hold the wrong bytes."""
        got = self.reg.match(np.asarray(hashes, np.uint64))
        bad = sum(self.data[b].tobytes() != content(hashes[i]) for i, b in enumerate(got.tolist()))
        return got, bad

    def close(self) -> None:
        self.data = None
        self.g2.close()
        self.data_seg.close()


def serve(conn, name: str, data_name: str, engine_id: str, fingerprint: str, salt: bytes = b"",
          blocks: int | None = None) -> None:
    try:
        eng = Engine(name, data_name, engine_id, fingerprint, salt, blocks)
        conn.send(("joined", {"slot": eng.lease.slot, "namespace": eng.lease.namespace,
                              "block_offset": eng.lease.block_offset, "num_blocks": eng.lease.num_blocks}))
    except Exception:  # noqa: BLE001 - the test reads the reason
        conn.send(("error", traceback.format_exc()))
        return
    held: list[int] = []
    while True:
        if not conn.poll(WAIT_S):
            return
        cmd, *args = conn.recv()
        try:
            if cmd == "register":
                conn.send(("ok", eng.offload(*args)))
            elif cmd == "match":
                got, bad = eng.onboard(*args)
                held += got.tolist()
                conn.send(("ok", {"blocks": got.tolist(), "bad": bad}))
            elif cmd == "allocate":
                got = eng.reg.allocate(*args)
                if got is not None:
                    held += got.tolist()
                conn.send(("ok", None if got is None else got.tolist()))
            elif cmd == "release":
                eng.reg.release(held)
                held = []
                conn.send(("ok", None))
            elif cmd == "lock":
                eng.g2.tables.acquire()
                eng.g2.tables.mark(eng.lease.slot, eng.lease.namespace)
                conn.send(("ok", "held"))
                conn.poll(WAIT_S)      # killed here
                return
            elif cmd == "leave":
                conn.send(("ok", eng.lease.leave()))
            elif cmd == "exit":
                eng.close()
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


def hammer(conn, name: str, data_name: str, engine_id: str, fingerprint: str, seed: int, iters: int,
           chains: int, kill: tuple[str, str, int] | None = None, halfway: bool = False) -> None:
    """Seeded random offloads and onboards of prefixes of `chains` shared chains. Says "joined",
    waits for "go", runs `iters` operations, says ("done", counts) and waits for "leave". A victim
    runs on until it dies: armed with `kill` it kills itself, with `halfway` it says so after
    iters // 2 and is killed from outside (100 * iters operations without dying is an error)."""
    try:
        eng = Engine(name, data_name, engine_id, fingerprint, b"", None)
        if kill is not None:
            S.set_test_kill(*kill)
        conn.send(("joined", eng.lease.slot))
        if not conn.poll(WAIT_S) or conn.recv() != "go":
            return
        rng = np.random.default_rng(seed)
        counts = {"offloads": 0, "registered": 0, "onboards": 0, "hits": 0, "bad": 0}
        held: list[np.ndarray] = []
        i = 0
        victim = kill is not None or halfway
        while i < iters or victim:
            if halfway and i == iters // 2:
                conn.send(("halfway", i))
            if victim and i == 100 * iters:
                conn.send(("error", f"victim {engine_id} still alive after {i} operations"))
                return
            c = int(rng.integers(chains))
            k = int(rng.integers(1, CHAIN + 1))
            hashes = [c * CHAIN + j + 1 for j in range(k)]
            if rng.random() < 0.5:
                counts["registered"] += len(eng.offload(hashes, [0] + hashes[:-1]))
                counts["offloads"] += 1
            else:
                got, bad = eng.onboard(hashes)
                counts["onboards"] += 1
                counts["hits"] += int(got.size)
                counts["bad"] += bad
                held.append(got)
                if len(held) > 3:
                    eng.reg.release(held.pop(0))
            i += 1
        for got in held:
            eng.reg.release(got)
        counts["pinned_at_end"] = eng.reg.pinned
        conn.send(("done", counts))
        if conn.poll(WAIT_S) and conn.recv() == "leave":
            conn.send(("left", eng.lease.leave()))
        eng.close()
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


def hold_lock(conn, name: str, namespace: int) -> None:
    g2 = SharedG2.attach(name)
    g2.tables.acquire()
    g2.tables.mark(S.OTHER, namespace)
    conn.send("held")
    conn.poll(WAIT_S)       # killed here
