"""Block registry throughput: BlockRegistry (Cython) against ReferenceRegistry (plain Python).

Points (each at pool sizes --sizes):
  cycle        allocate(B) + complete + register(B fresh chained hashes, with parents) + release,
               in steady state: the pool is first filled with inactive registered blocks, so
               every allocate evicts B blocks in policy order.
  match        match(8192-hash prefix, acquire=True) of an inactive registered chain, in a pool
               otherwise filled with inactive chains (release of the same blocks afterwards,
               untimed).
  match-peek   match(8192-hash prefix, acquire=False).
  lookup       lookup(8192 hashes, half of them missing).

gc.collect() and a warm-up before each point; per-iteration timings, median and p99. The
reference runs the same operations in the same process, a bounded number of iterations (and, past
--ref-fill-limit blocks, without the pre-fill, which spares it the eviction work: its figures there
flatter it). Headline: ratio of the medians.

Policies (--policies, second table): the same points on the Cython registry under each eviction
policy, LRU first as the baseline. The policies run in alternation for --rounds rounds (each round
a fresh registry per policy), so that load on a shared machine hits both alike; per op, the median
of the per-round medians, and the ratio to LRU of those. In the cycle point the chains are
trimmed from the tail under LINEAGE: every eviction re-keys the victim's parent (children 1 -> 0),
and (default ghost table, G = num_blocks) records the victim in the ghost table, forgetting the
oldest entry, while every registration probes it (fresh hashes: a miss). `lineage-noghost` is
LINEAGE with ghost_blocks=0, to see the table's own cost. `adaptive` (ADAPTIVE, the same ghost
table) also refreshes 16 keys per eviction after each move of its credit (its sweep), and feeds
its shadow tuner at each release of a REGISTERED block: one use in R replayed on ten mini caches
(kvbm/_fast/_shadow.pxd; the match point times match alone, its release is outside the timing, so
the tuner's cost shows in the cycle point); `adaptive-fixed` is the same with the tuner off. The
headline the issue asks for: the adaptive/lru column at 10^4, 10^5 and 10^6 blocks (<= 1.10).

    .venv/bin/python bench/bench_registry.py                # full sweep (about two minutes)
    .venv/bin/python bench/bench_registry.py --sizes 10000 --iters 200
    .venv/bin/python bench/bench_registry.py --no-ref --rounds 5    # policy table only
    .venv/bin/python bench/bench_registry.py --no-ref --policies lru lineage lineage-noghost
    .venv/bin/python bench/bench_registry.py --no-ref --rounds 5 --policies lru adaptive   # issue 14
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import statistics
import subprocess
import time

import numpy as np

from kvbm._fast._reference import ReferenceRegistry
from kvbm._fast.registry import BlockRegistry
from kvbm.policy import EvictionPolicy, policy_names

OPS = ("cycle", "match", "match-peek", "lookup")

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import Cython
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores (load average {load}), Python "
            f"{platform.python_version()}, numpy {np.__version__}, Cython {Cython.__version__}")


class HashSource:
    """Fresh 64-bit hashes that look like xxh3 output: splitmix64 of a counter."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, k: int) -> np.ndarray:
        z = np.arange(self.next, self.next + k, dtype=np.uint64) * GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        self.next += k
        return z ^ (z >> np.uint64(31))


class Batches:
    """Chained hash batches (hashes, parent hashes, has-parent mask), generated ahead in chunks
    so that the timed cycle does registry work only."""

    def __init__(self, hs: HashSource, batch: int, chunk: int = 512) -> None:
        self.hs, self.batch, self.chunk = hs, batch, chunk
        self.items: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.items:
            hashes = self.hs.take(self.batch * self.chunk).reshape(self.chunk, self.batch)
            parents = np.zeros_like(hashes)
            parents[:, 1:] = hashes[:, :-1]
            mask = np.ones(self.batch, dtype=bool)
            mask[0] = False
            self.items = [(hashes[i], parents[i], mask) for i in range(self.chunk - 1, -1, -1)]
        return self.items.pop()


def cycle_once(reg, batches: Batches) -> None:
    hashes, parents, mask = batches.next()
    blocks = reg.allocate(hashes.shape[0])
    reg.complete(blocks)
    canon = reg.register(blocks, hashes, parents=parents, has_parent=mask)
    reg.release(canon)


def fill(reg, batches: Batches, reserve: int = 0) -> None:
    """Registers chains and releases them until fewer than `reserve` + one batch blocks are free
    (with reserve 0, every later allocate evicts)."""
    while reg.num_free >= batches.batch + reserve:
        cycle_once(reg, batches)


def timed(fn, iters: int, warmup: int, budget_s: float, after=None) -> np.ndarray:
    """Microseconds per fn() call; after(result), when given, runs after each call, untimed."""
    gc.collect()
    for _ in range(warmup):
        got = fn()
        if after is not None:
            after(got)
    times = []
    deadline = time.perf_counter() + budget_s
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        got = fn()
        times.append(time.perf_counter_ns() - t0)
        if after is not None:
            after(got)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return np.array(times, dtype=np.float64) / 1e3


GHOST_VARIANTS = {"lineage-noghost": 0, "lineage-ghost2": 2, "lineage-ghost4": 4}
FIXED_VARIANTS = ("adaptive-fixed",)   # ADAPTIVE with its tuner off (set after creation: bench_point)


def policy_kwargs(name: str, n: int) -> dict:
    """--policies names: an EvictionPolicy member (lineage = LINEAGE with its default ghost table),
    or LINEAGE with a ghost table of 0, 2 or 4 times num_blocks entries (lineage-noghost,
    lineage-ghost2, lineage-ghost4)."""
    if name in GHOST_VARIANTS:
        return dict(policy=int(EvictionPolicy.LINEAGE), ghost_blocks=GHOST_VARIANTS[name] * n)
    if name in FIXED_VARIANTS:
        return dict(policy=int(EvictionPolicy.ADAPTIVE), adaptive_tune=False)
    return dict(policy=int(EvictionPolicy.from_name(name)))


def bench_point(impl, n: int, args, fill_pool: bool, adaptive_tune: bool | None = None,
                **reg_kwargs) -> dict[str, np.ndarray]:
    reg = impl(n, **reg_kwargs)
    if adaptive_tune is not None:
        reg.set_adaptive(tune=adaptive_tune)
    hs = HashSource()
    prefix = min(args.prefix, n)
    res = {}
    if fill_pool:   # a full index and heap, as in steady state; room left for the chain
        fill(reg, Batches(hs, args.batch), reserve=prefix)
    # a chain of `prefix` registered blocks (inactive) to match against
    chain = hs.take(prefix)
    blocks = reg.allocate(prefix)
    reg.complete(blocks)
    parents = np.concatenate([[np.uint64(0)], chain[:-1]]).astype(np.uint64)
    mask = np.ones(prefix, dtype=bool)
    mask[0] = False
    reg.release(reg.register(blocks, chain, parents=parents, has_parent=mask))
    budget = args.budget if impl is BlockRegistry else args.ref_budget
    iters = args.iters if impl is BlockRegistry else args.ref_iters
    warm = args.warmup if impl is BlockRegistry else 1

    def release_matched(got):
        assert got.shape[0] == prefix
        reg.release(got)

    # match with acquire; the release after each timed call is outside the timing
    res["match"] = timed(lambda: reg.match(chain), iters, warm, budget, after=release_matched)
    res["match-peek"] = timed(lambda: reg.match(chain, acquire=False), iters, warm, budget)
    probe = chain.copy()
    probe[1::2] = hs.take(probe[1::2].shape[0])   # half misses
    res["lookup"] = timed(lambda: reg.lookup(probe), iters, warm, budget)
    if fill_pool:
        fill(reg, Batches(hs, args.batch))
    batches = Batches(hs, args.batch, chunk=iters + warm + 1)
    batches.items.append(batches.next())   # all timed batches generated before timing
    res["cycle"] = timed(lambda: cycle_once(reg, batches), iters, warm, budget)
    reg.check_invariants()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--batch", type=int, default=256, help="blocks per allocate/register/release cycle")
    ap.add_argument("--prefix", type=int, default=8192, help="hashes per match/lookup")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per point (Cython)")
    ap.add_argument("--ref-iters", type=int, default=30)
    ap.add_argument("--ref-budget", type=float, default=4.0, help="seconds per point (reference)")
    ap.add_argument("--ref-fill-limit", type=int, default=1_000_000,
                    help="larger pools: the reference skips the pre-fill (no eviction)")
    ap.add_argument("--policies", nargs="+", default=["lru", "lineage", "adaptive"],
                    choices=[*policy_names(), *GHOST_VARIANTS, *FIXED_VARIANTS],
                    help="eviction policies of the policy table (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per policy and size")
    ap.add_argument("--no-ref", action="store_true", help="skip the reference table")
    args = ap.parse_args()

    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(f"# batch {args.batch}, prefix {args.prefix}; times in microseconds per call")
    if not args.no_ref:
        reference_table(args)
    if len(args.policies) > 1:
        policy_table(args)


def policy_table(args) -> None:
    base = args.policies[0]
    others = args.policies[1:]
    print(f"\n# policies: {', '.join(args.policies)}; median of {args.rounds} per-round medians "
          f"(each round: every policy once, alternating); ratio = policy / {base}")
    cols = " | ".join(f"{p} median | {p} p99 | {p}/{base}" for p in others)
    print(f"| op | pool | {base} median | {base} p99 | {cols} |")
    print("|" + "---|" * (4 + 3 * len(others)))
    for n in args.sizes:
        med = {p: {op: [] for op in OPS} for p in args.policies}
        p99 = {p: {op: [] for op in OPS} for p in args.policies}
        for r in range(args.rounds):
            order = args.policies if r % 2 == 0 else args.policies[::-1]
            for p in order:
                res = bench_point(BlockRegistry, n, args, fill_pool=True, **policy_kwargs(p, n))
                for op in OPS:
                    med[p][op].append(float(np.median(res[op])))
                    p99[p][op].append(float(np.percentile(res[op], 99)))
                del res
                gc.collect()
        for op in OPS:
            b = statistics.median(med[base][op])
            cells = [f"{b:.1f}", f"{statistics.median(p99[base][op]):.1f}"]
            for p in others:
                m = statistics.median(med[p][op])
                cells += [f"{m:.1f}", f"{statistics.median(p99[p][op]):.1f}", f"{m / b:.3f}"]
            print(f"| {op} | {n:,} | " + " | ".join(cells) + " |", flush=True)


def reference_table(args) -> None:
    header = ("| op | pool | fast median | fast p99 | ref median | ref p99 | ref iters | "
              "fast ns/block | speedup |")
    print(header)
    print("|" + "---|" * 9)
    for n in args.sizes:
        fast = bench_point(BlockRegistry, n, args, fill_pool=True)
        ref_fill = n <= args.ref_fill_limit
        ref = bench_point(ReferenceRegistry, n, args, fill_pool=ref_fill)
        for op in OPS:
            f, r = fast[op], ref[op]
            per = args.batch if op == "cycle" else min(args.prefix, n)
            note = "" if ref_fill or op != "cycle" else " (ref: no eviction)"
            print(f"| {op}{note} | {n:,} | {np.median(f):.1f} | {np.percentile(f, 99):.1f} | "
                  f"{np.median(r):.1f} | {np.percentile(r, 99):.1f} | {len(r)} | "
                  f"{np.median(f) * 1e3 / per:.1f} | {np.median(r) / np.median(f):.0f}x |",
                  flush=True)
        del fast, ref
        gc.collect()


if __name__ == "__main__":
    main()
