"""G3 store benchmark: Host->Disk and Disk->Host through DiskStore against raw O_DIRECT I/O of the
same blocks on the same disk, in the same run.

Per block size (--block-sizes), over --total-mib of blocks in page-aligned host memory:
  raw@T     T threads (sweep --threads) each doing os.pwritev / os.preadv of whole blocks on
            O_DIRECT fds of preallocated files (as many files as the store has, blocks spread the
            same way), the writes followed by one fdatasync per file (the store's durability). The
            baseline is the best T.
  store     DiskStore.put (checksums in C, NIXL POSIX writes, fdatasync, journal append + fdatasync)
            into free slots, and DiskStore.get (NIXL reads, checksums verified), for each
            (--requests blocks per NIXL request, --inflight requests in flight).
Each point: a warm-up pass (the first write of a preallocated extent converts it, so it is not
timed), then --repeats timed passes of every point, raw and store interleaved and each pass
starting one point later, every store read checked byte for byte once. Throughput in GB/s (1e9
bytes); median and p99 (the slow end) of the passes. ratio = store median / best raw median;
paired ratio = the median over passes of (best raw time / store time) in the same pass, which a
shared disk's drift moves less. The disk here may be shared with other jobs: compare ratios, not
absolute figures.
"""
from __future__ import annotations

import argparse
import gc
import logging
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from _common import cpu_model, pct

from kvbm.workers.disk import DiskStore

MIB = 1 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * mult


def machine(path: str) -> str:
    cpu = cpu_model()
    fs = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=False).stdout.splitlines()[-1:]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} CPUs (load average {load}), kernel {platform.release()}; "
            f"disk: {' '.join(fs[0].split()[:2]) if fs else '?'} at {path}; Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")



class RawFiles:
    """Preallocated O_DIRECT files, blocks spread as the store spreads slots (block i in file i % N)."""

    def __init__(self, folder: str, num_files: int, block_bytes: int, num_blocks: int) -> None:
        self.block_bytes = block_bytes
        self.num_files = num_files
        per_file = -(-num_blocks // num_files)
        self.fds = []
        for f in range(num_files):
            fd = os.open(os.path.join(folder, f"raw.{f}"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
            os.posix_fallocate(fd, 0, per_file * block_bytes)
            self.fds.append(fd)

    def _io(self, write: bool, blocks: np.ndarray, threads: int) -> None:
        n, nf, bb = blocks.shape[0], self.num_files, self.block_bytes

        def run(t: int) -> None:
            for i in range(t, n, threads):
                fd, off = self.fds[i % nf], (i // nf) * bb
                done = os.pwritev(fd, [blocks[i]], off) if write else os.preadv(fd, [blocks[i]], off)
                if done != bb:
                    raise OSError(f"short {'write' if write else 'read'}: {done} of {bb} bytes")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, range(threads)))
        if write:
            for fd in self.fds:
                os.fdatasync(fd)

    def write(self, blocks: np.ndarray, threads: int) -> None:
        self._io(True, blocks, threads)

    def read(self, blocks: np.ndarray, threads: int) -> None:
        self._io(False, blocks, threads)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(folder: str, bb: int, args) -> list[dict]:
    n = max(1, args.total_mib * MIB // bb)
    mm = mmap.mmap(-1, 2 * n * bb)
    host = np.frombuffer(mm, dtype=np.uint8).reshape(2 * n, bb)
    host[:n] = np.random.default_rng(bb).integers(0, 256, (n, bb), dtype=np.uint8)
    src, dst = host[:n], host[n:]
    base = host.ctypes.data
    src_addrs = base + np.arange(n, dtype=np.uint64) * np.uint64(bb)
    dst_addrs = src_addrs + np.uint64(n * bb)
    hashes = np.arange(1, n + 1, dtype=np.uint64)
    slots = np.arange(n, dtype=np.int64)
    threads = [int(t) for t in args.threads.split(",")]
    configs = [(int(k), int(q)) for k in args.requests.split(",") for q in args.inflight.split(",")]
    raw = RawFiles(folder, args.files, bb, n)
    stores = {}
    for k, q in configs:
        stores[(k, q)] = DiskStore.open(folder, f"bench-{bb >> 10}k-{k}-{q}", bb, n, 1, 1,
                                        host_regions=[(base, 2 * n * bb)], cold=True, num_files=args.files,
                                        backend=args.backend, blocks_per_request=k, max_inflight=q)
    times: dict[tuple, list[float]] = {}
    checked = set()

    def raw_write(t):
        return timed(lambda: raw.write(src, t))

    def raw_read(t):
        dst[:] = 0
        return timed(lambda: raw.read(dst, t))

    def store_write(store):
        store.drop(slots)  # puts go to free slots, as G2 offloads do (not timed)
        return timed(lambda: store.put(hashes, src_addrs, slots=slots))

    def store_read(store):
        dst[:] = 0
        res = []
        seconds = timed(lambda: res.append(store.get(slots, dst_addrs)))
        if not res[0].all_ok:
            raise SystemExit(f"store read failed: {res[0].errors}")
        if id(store) not in checked:
            if not np.array_equal(src, dst):
                raise SystemExit("store read returned other bytes")
            checked.add(id(store))
        return seconds

    points = [(("raw", t, "write"), raw_write, t) for t in threads] + \
             [(("raw", t, "read"), raw_read, t) for t in threads] + \
             [(("store", key, "write"), store_write, st) for key, st in stores.items()] + \
             [(("store", key, "read"), store_read, st) for key, st in stores.items()]
    try:
        for rep in range(args.repeats + 1):
            gc.collect()
            # Each pass starts one point later, so that no point always follows the same one.
            for key, fn, arg in points[rep % len(points):] + points[:rep % len(points)]:
                seconds = fn(arg)
                if rep > 0:  # the first pass is the warm-up
                    times.setdefault(key, []).append(seconds)
        backends = {s.io.backend for s in stores.values()}
    finally:
        raw.close()
        for s in stores.values():
            s.close()
    rows = []
    total = n * bb
    for op in ("write", "read"):
        raw_rows = [(t, times[("raw", t, op)]) for t in threads]
        best_t, best = min(raw_rows, key=lambda r: statistics.median(r[1]))
        for t, ts in raw_rows:
            rows.append(dict(block=bb, op=op, who=f"raw@{t}", gbs=total / statistics.median(ts) / 1e9,
                             p99=total / pct(ts, 99) / 1e9, ratio=None, paired=None, best=(t == best_t)))
        for key in stores:
            ts = times[("store", key, op)]
            gbs = total / statistics.median(ts) / 1e9
            rows.append(dict(block=bb, op=op, who=f"store k={key[0]} q={key[1]} ({'/'.join(sorted(backends))})",
                             gbs=gbs, p99=total / pct(ts, 99) / 1e9,
                             ratio=statistics.median(best) / statistics.median(ts),
                             paired=statistics.median([b / x for b, x in zip(best, ts)]), best=False))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: a new one under /tmp)")
    ap.add_argument("--block-sizes", default="1M,2M")
    ap.add_argument("--total-mib", type=int, default=192, help="MiB of blocks per pass")
    ap.add_argument("--threads", default="1,4,16", help="raw baseline thread counts")
    ap.add_argument("--requests", default="16,64", help="blocks per NIXL request")
    ap.add_argument("--inflight", default="4", help="NIXL requests in flight")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--backend", default="auto", help="auto, uring, aio or posix_aio")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = tempfile.mkdtemp(prefix="kvbm-bench-disk-", dir=args.dir or "/tmp")
    try:
        print(f"machine: {machine(folder)}")
        print(f"{args.total_mib} MiB per pass, {args.repeats} passes after a warm-up, {args.files} files; "
              f"ratio = store median / best raw median")
        print("| block | op | who | median GB/s | p99 GB/s | ratio to raw | paired ratio |")
        print("|---|---|---|---|---|---|---|")
        for size in args.block_sizes.split(","):
            for r in bench_size(folder, parse_size(size), args):
                mark = " (best raw)" if r["best"] else ""
                ratio = f"{r['ratio']:.2f} | {r['paired']:.2f}" if r["ratio"] is not None else " | "
                print(f"| {r['block'] >> 10} KiB | {r['op']} | {r['who']}{mark} | {r['gbs']:.2f} | {r['p99']:.2f} "
                      f"| {ratio} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
