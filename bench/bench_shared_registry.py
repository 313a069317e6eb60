"""Shared G2 registry (kvbm.shared_g2) with 1, 2, 4, 8 engine processes hammering one namespace,
against the in-process BlockRegistry measured in the same run.

Per engine and iteration, in a loop (each call timed on its own):
  match    match(8192-hash chain, acquire=True): the engine's own chain, registered and inactive
           (priority 1, so that the cycles never evict it)
  release  release of those 8192 blocks
  cycle    allocate(256) + complete + register(256 fresh hashes) + release, in steady state: the
           pool is filled with inactive blocks first, so every allocate evicts
The engines are separate processes (spawn), joined to one namespace (data-parallel replicas), all
starting together; their per-call times are pooled (median, p99). The baseline runs the same loop
on an in-process BlockRegistry of the same size (one process, no lock, no pins). Rounds alternate
baseline and shared runs; the figures are medians of per-round medians, the ratio is shared /
in-process. A second baseline puts the in-process table in a /dev/shm segment, as the shared one
is (4 KiB pages where the numpy buffer may get transparent huge pages): shared / that is the cost
of the lock and the pins alone. `contended` is the share of lock acquisitions that had to wait.

A second table: nanoseconds per uncontended lock+unlock pair of the robust process-shared mutex
(the one used), a process-shared mutex without robustness, and flock(2) on a file.

    .venv/bin/python bench/bench_shared_registry.py                     # about two minutes
    .venv/bin/python bench/bench_shared_registry.py --engines 1 8 --iters 500 --rounds 5
    .venv/bin/python bench/bench_shared_registry.py --pace-us 1000   # engines with work between calls

On a machine with fewer cores than engines the engines time-share the cores: a call's time then
includes waiting for a process the scheduler preempted while it held the lock, and the p99 shows
it (the figures say how many cores they ran on).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_registry import HashSource, machine  # noqa: E402

from kvbm._fast import shared as S  # noqa: E402
from kvbm._fast.registry import BlockRegistry  # noqa: E402
from kvbm.shared_g2 import SharedG2  # noqa: E402
from kvbm.shm import Segment  # noqa: E402

OPS = ("match", "release", "cycle")
WAIT_S = 300.0


class Batches:
    """Fresh hashes, `batch` per cycle, from a source of this engine's own (no dedup across engines)."""

    def __init__(self, base: int, batch: int) -> None:
        self.hs = HashSource()
        self.hs.next = base
        self.batch = batch

    def take(self, count: int) -> list[np.ndarray]:
        return list(self.hs.take(self.batch * count).reshape(count, self.batch))


def cycle_once(reg, hashes: np.ndarray) -> None:
    blocks = reg.allocate(hashes.shape[0])
    reg.complete(blocks)
    reg.release(reg.register(blocks, hashes))


def fill(reg, source: Batches) -> None:
    """Inactive registered blocks until fewer than a batch are free."""
    while reg.num_free >= source.batch:
        cycle_once(reg, source.take(1)[0])


def chain_of(index: int, prefix: int) -> np.ndarray:
    hs = HashSource()
    hs.next = (index + 1) << 40
    return hs.take(prefix)


def register_chain(reg, chain: np.ndarray) -> None:
    """Registered inactive, with priority 1: the cycles (priority 0) evict other blocks, however
    the engines' loops interleave."""
    blocks = reg.allocate(chain.shape[0])
    reg.complete(blocks)
    reg.release(reg.register(blocks, chain, priorities=np.ones(chain.shape[0], np.int32)))


def run_loop(reg, chain: np.ndarray, source: Batches, iters: int, warmup: int,
             pace_s: float = 0.0) -> dict[str, np.ndarray]:
    """The timed loop (microseconds per call); `pace_s` of sleep after each iteration (an engine
    does other work between its registry calls; 0 hammers)."""
    batches = source.take(iters + warmup)
    out = {op: np.empty(iters) for op in OPS}
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for it in range(iters + warmup):
            t0 = clock()
            got = reg.match(chain)
            t1 = clock()
            reg.release(got)
            t2 = clock()
            cycle_once(reg, batches[it])
            t3 = clock()
            if got.shape[0] != chain.shape[0]:
                raise RuntimeError(f"matched {got.shape[0]} of {chain.shape[0]}: the chain was evicted")
            if it >= warmup:
                k = it - warmup
                out["match"][k] = (t1 - t0) / 1e3
                out["release"][k] = (t2 - t1) / 1e3
                out["cycle"][k] = (t3 - t2) / 1e3
            if pace_s:
                time.sleep(pace_s)
    finally:
        gc.enable()
    return out


def engine(conn, name: str, index: int, prefix: int, batch: int, iters: int, warmup: int, pace_s: float) -> None:
    """One engine process: join, say ready, wait for go, run the loop, send the times, leave."""
    g2 = SharedG2.attach(name)
    lease = g2.join(f"bench-{index}", os.getpid(), "bench")
    try:
        chain = chain_of(index, prefix)
        source = Batches((index + 1) << 48, batch)
        conn.send("ready")
        if not conn.poll(WAIT_S) or conn.recv() != "go":
            return
        conn.send(run_loop(lease.registry, chain, source, iters, warmup, pace_s))
    finally:
        lease.leave()
        g2.close()


def baseline(args, shm: bool) -> dict[str, np.ndarray]:
    """The loop on an in-process BlockRegistry: its own numpy buffer (as today), or (shm) a buffer
    in a /dev/shm segment like the shared one's, to tell the cost of the memory from the cost of
    the lock and the pins."""
    seg = Segment.create(f"kvbm-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}-base",
                         BlockRegistry.bytes_needed(args.blocks, 0)) if shm else None
    try:
        reg = BlockRegistry(args.blocks, seg.map if seg else None)
        register_chain(reg, chain_of(0, args.prefix))
        fill(reg, Batches(1 << 56, args.batch))
        res = run_loop(reg, chain_of(0, args.prefix), Batches(1 << 48, args.batch), args.iters, args.warmup,
                       args.pace_us / 1e6)
        reg.check_invariants()
        del reg
        return res
    finally:
        if seg is not None:
            seg.close()
            seg.unlink()


def shared(args, k: int) -> tuple[dict[str, np.ndarray], float]:
    """Times pooled over k engine processes, and the contended share of lock acquisitions."""
    ctx = multiprocessing.get_context("spawn")
    name = f"kvbm-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}-g2reg"
    g2 = SharedG2.create(name, args.blocks, max_namespaces=1)
    procs = []
    try:
        setup = g2.join("bench-setup", os.getpid(), "bench")   # keeps the namespace while engines come
        for i in range(k):
            register_chain(setup.registry, chain_of(i, args.prefix))
        fill(setup.registry, Batches(1 << 56, args.batch))
        for i in range(k):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=engine, args=(child, name, i, args.prefix, args.batch, args.iters,
                                                    args.warmup, args.pace_us / 1e6), daemon=True)
            proc.start()
            procs.append((proc, parent))
        for _, conn in procs:
            if not conn.poll(WAIT_S) or conn.recv() != "ready":
                raise RuntimeError("an engine did not get ready")
        before = g2.tables.lock_stats
        for _, conn in procs:
            conn.send("go")
        results = []
        for _, conn in procs:
            if not conn.poll(WAIT_S):
                raise RuntimeError("an engine did not finish")
            results.append(conn.recv())
        after = g2.tables.lock_stats
        for proc, _ in procs:
            proc.join(WAIT_S)
        g2.check_invariants()
        setup.leave()
        contended = (after["contended"] - before["contended"]) / max(1, after["acquired"] - before["acquired"])
        return {op: np.concatenate([r[op] for r in results]) for op in OPS}, contended
    finally:
        for proc, _ in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(WAIT_S)
        g2.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=200_000, help="blocks of the namespace (and of the baseline)")
    ap.add_argument("--prefix", type=int, default=8192, help="hashes per match")
    ap.add_argument("--batch", type=int, default=256, help="blocks per allocate/register/release cycle")
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4, 8], help="engine counts (distinct)")
    ap.add_argument("--iters", type=int, default=200, help="timed iterations per engine and round")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pace-us", type=float, default=0.0,
                    help="sleep after each iteration, per engine (0: engines hammer the registry back to back)")
    ap.add_argument("--lock-iters", type=int, default=2_000_000)
    args = ap.parse_args()
    args.engines = sorted(set(args.engines))
    if max(args.engines) * args.prefix + (max(args.engines) + 1) * args.batch > args.blocks:
        ap.error(f"--blocks {args.blocks} cannot hold {max(args.engines)} chains of {args.prefix} and their cycles")

    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(f"# namespace of {args.blocks:,} blocks, match of {args.prefix} hashes, cycle of {args.batch}; "
          f"{args.iters} iterations per engine, {args.rounds} rounds, pace {args.pace_us:g} us; microseconds per call")
    med = {(key, op): [] for key in ("base", "shm", *args.engines) for op in OPS}
    p99 = {(key, op): [] for key in ("base", "shm", *args.engines) for op in OPS}
    cont = {k: [] for k in args.engines}
    for r in range(args.rounds):
        for key in ("base", "shm"):
            res = baseline(args, shm=key == "shm")
            for op in OPS:
                med[(key, op)].append(float(np.median(res[op])))
                p99[(key, op)].append(float(np.percentile(res[op], 99)))
        for k in (args.engines if r % 2 == 0 else args.engines[::-1]):   # alternate: load drifts
            res, c = shared(args, k)
            cont[k].append(c)
            for op in OPS:
                med[(k, op)].append(float(np.median(res[op])))
                p99[(k, op)].append(float(np.percentile(res[op], 99)))
    print("| op | engines | shared median | shared p99 | in-process median | in-process p99 | shared / in-process "
          "| in-process, table in /dev/shm: median | shared / that | contended |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for op in OPS:
        b, bp = statistics.median(med[("base", op)]), statistics.median(p99[("base", op)])
        sh = statistics.median(med[("shm", op)])
        for k in args.engines:
            m, mp = statistics.median(med[(k, op)]), statistics.median(p99[(k, op)])
            print(f"| {op} | {k} | {m:.1f} | {mp:.1f} | {b:.1f} | {bp:.1f} | {m / b:.2f} | {sh:.1f} | {m / sh:.2f} | "
                  f"{100 * statistics.median(cont[k]):.0f}% |", flush=True)
    with tempfile.TemporaryFile() as fh:
        costs = S.lock_costs(args.lock_iters, fh.fileno())
    print(f"\n# uncontended lock+unlock pair, {args.lock_iters:,} pairs, one process; ns per pair")
    print("| robust process-shared mutex (used) | process-shared mutex | flock(2) |")
    print("|---|---|---|")
    print(f"| {costs['robust_mutex']:.1f} | {costs['plain_mutex']:.1f} | {costs['flock']:.1f} |")


if __name__ == "__main__":
    main()
