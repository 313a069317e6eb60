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

Disk -> Device end to end (--mode device), per block size and per --e2e-inflight value (NIXL read
requests in flight in the disk worker: KvbmConfig.disk_read_inflight, one kvbm-workers each):
  a KvBlockManager (CUDA when available, else CPU mode: the same code) with G2 and G3, admission
  write-through. Two sets of --total-mib of blocks, A and B, are offloaded and flushed to G3; G2
  holds --total-mib, so B's offload evicts A from G2. Each timed onboard then asks
  for the set G2 does not hold (A, B, A, ...): kv.onboard sees a G3-only prefix and returns one
  future (NIXL reads into G2 staging blocks, checksums verified, then H2D); the onboard that
  promoted it evicts the other set from G2. e2e = kv.onboard() to result(), every block of every
  pass checked to come from G3, the device bytes checked once per point. disk = the disk worker's
  own DISK2H time (NIXL reads and checksums, no messaging or H2D). The baseline: raw@T threads of
  os.preadv on O_DIRECT fds of the store's own data files, at the slots holding those blocks, into
  page-aligned host memory, interleaved with the onboards in the same passes. The load rule is
  disabled (prefill rate 1 token/s): the bench measures the load, not the decision.
  --e2e-chunk-blocks: KvbmConfig.disk_onboard_chunk_blocks (the G3 run is read in chunks of that
  many blocks, each chunk's H2D starting when it has landed; 0: the default, read blocks x in
  flight; 256: one chunk, the unpipelined onboard), one kvbm-workers per value too.
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

from kvbm.config import DISK_READ_BLOCKS, DISK_READ_INFLIGHT
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


class StoreSlots:
    """Raw O_DIRECT reads of given slots of a store's own data files (the e2e baseline)."""

    def __init__(self, folder: str, geometry) -> None:
        self.geometry = geometry
        self.fds = [os.open(os.path.join(folder, f"data.{f:03d}"), os.O_RDONLY | os.O_DIRECT)
                    for f in range(geometry.num_files)]

    def read(self, slots: np.ndarray, dst: np.ndarray, threads: int) -> None:
        fidx, offs = self.geometry.locate(slots)
        n, bb = len(slots), self.geometry.block_bytes

        def run(t: int) -> None:
            for i in range(t, n, threads):
                done = os.preadv(self.fds[int(fidx[i])], [dst[i]], int(offs[i]))
                if done != bb:
                    raise OSError(f"short read: {done} of {bb} bytes")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, range(threads)))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def e2e_layout(bb: int, layers: int, inner: int):
    """A Llama-3-8B-shaped layout (32 layers, K and V, 8 KV heads x 128, bf16) whose block is bb bytes."""
    from kvbm.layout import LayoutConfig
    page, rest = divmod(bb, layers * 2 * inner * 2)
    if rest or page < 1:
        raise SystemExit(f"a {bb}-byte block is not a whole number of {layers}x2x{inner} bf16 tokens")
    return LayoutConfig(num_layers=layers, outer_dim=2, page_size=page, inner_dim=inner, dtype="bfloat16")


def bench_e2e(folder: str, bb: int, inflight: int, chunk: int, args) -> list[dict]:
    import torch

    import kvbm
    from kvbm.cli import ask_status
    from kvbm.layout import BlockLayout, LayoutType
    from kvbm.pools import Tier
    from kvbm.workers.disk.files import Geometry

    cfg = e2e_layout(bb, args.e2e_layers, args.e2e_inner)
    n = max(1, args.total_mib * MIB // bb)
    cuda = kvbm.cuda_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    disk_blocks = 2 * n + 8
    inst = f"bench-e2e-{bb >> 10}k-q{inflight}-c{chunk}-{os.getpid()}"
    config = kvbm.KvbmConfig(instance_id=inst, runtime_dir=os.path.join(folder, "run"), layout=cfg,
                             device_blocks=2 * n, host_blocks=n, disk_blocks=disk_blocks,
                             disk_path=os.path.join(folder, "g3"), disk_admission="write-through",
                             force_cpu=not cuda, prefill_tokens_per_s=1.0, disk_read_inflight=inflight,
                             disk_read_blocks=args.e2e_read_blocks, disk_onboard_chunk_blocks=chunk,
                             request_timeout_ms=600_000, log_level="WARNING")
    lay = BlockLayout(cfg, LayoutType.LAYER_SEPARATE, 2 * n)
    kv = kvbm.KvBlockManager(config)
    threads = [int(t) for t in args.threads.split(",")]
    times: dict[tuple, list[float]] = {}
    disk_s: list[float] = []
    raw = None
    try:
        tensors = kv.create_device_tensors(lay, device=device)
        kv.register_device_tensors(tensors, lay, timeout=120)

        def view(t):   # [outer, blocks, region bytes] of one layer's buffer (OUTER_MAJOR)
            return t[:lay.config.outer_dim * 2 * n * cfg.region_bytes].view(cfg.outer_dim, 2 * n, cfg.region_bytes)

        def snapshot(blocks):
            idx = torch.as_tensor(blocks, device=device)
            return [view(t).index_select(1, idx).clone() for t in tensors]

        src, dst = np.arange(n), np.arange(n, 2 * n)
        gen = torch.Generator(device=device).manual_seed(bb + inflight)
        sets, expected = [], []
        for k in range(2):   # sets A and B: filled, offloaded, written through to G3
            for t in tensors:
                view(t)[:, :n] = torch.randint(0, 256, (cfg.outer_dim, n, cfg.region_bytes), dtype=torch.uint8,
                                               device=device, generator=gen)
            hashes = np.arange(1, n + 1, dtype=np.uint64) + np.uint64(k * (1 << 40) + bb)
            for lo in range(0, n, 32):
                kv.offload(src[lo:lo + 32], hashes[lo:lo + 32]).result(600)
            kv.flush_disk(600)
            sets.append(hashes)
            expected.append(snapshot(src))
        with kv.lock:
            in2 = [kv.pool(Tier.G2).lookup(h) >= 0 for h in sets]
            in3 = [kv.pool(Tier.G3).lookup(h) for h in sets]
        if in2[0].any() or not all((s >= 0).all() for s in in3):
            raise SystemExit(f"set-up: A in G2 {int(in2[0].sum())}/{n}, in G3 {[int((s >= 0).sum()) for s in in3]}")
        geometry = Geometry.of(bb, disk_blocks, 4)
        raw = StoreSlots(os.path.join(config.disk_path, inst), geometry)
        mm = mmap.mmap(-1, n * bb)
        host = np.frombuffer(mm, dtype=np.uint8).reshape(n, bb)
        turn = [0]
        checked = [False]

        def disk_counters():
            g3 = ask_status(config, timeout=10.0)["tiers"]["g3"]
            return g3.get("bytes_read", 0), g3.get("read_s", 0.0)

        def e2e(_):
            k = turn[0] % 2          # the set G2 does not hold now
            if device != "cpu":
                torch.cuda.synchronize()
            b0, s0 = disk_counters()
            t0 = time.perf_counter()
            res = kv.onboard(sets[k], dst).result(600).value
            seconds = time.perf_counter() - t0
            b1, s1 = disk_counters()
            if (res.loaded, res.from_disk) != (n, n):
                raise SystemExit(f"onboard loaded {res.loaded}, {res.from_disk} from G3, of {n}")
            if b1 - b0 != n * bb:
                raise SystemExit(f"the disk worker read {b1 - b0} bytes for {n * bb}")
            disk_s.append(s1 - s0)
            if not checked[0]:
                got = snapshot(dst)
                if not all(torch.equal(a, b) for a, b in zip(got, expected[k])):
                    raise SystemExit("the device holds other bytes than were offloaded")
                checked[0] = True
            turn[0] += 1
            return seconds

        def raw_read(t):
            host[:] = 0
            return timed(lambda: raw.read(in3[turn[0] % 2], host, t))

        points = [(("raw", t), raw_read, t) for t in threads] + [(("e2e", inflight), e2e, None)]
        for rep in range(args.repeats + 1):
            gc.collect()
            for key, fn, arg in points[rep % len(points):] + points[:rep % len(points)]:
                seconds = fn(arg)
                if rep > 0:
                    times.setdefault(key, []).append(seconds)
        host = None   # the view's export would keep the mmap from closing
        mm.close()
        read_path = kv.stats()["disk"]["read_paths"]
    finally:
        if raw is not None:
            raw.close()
        kv.close()
    total = n * bb
    raw_rows = [(t, times[("raw", t)]) for t in threads]
    best_t, best = min(raw_rows, key=lambda r: statistics.median(r[1]))
    rows = [dict(block=bb, op="read", who=f"raw@{t} (q={inflight} run)", gbs=total / statistics.median(ts) / 1e9,
                 p99=total / pct(ts, 99) / 1e9, ratio=None, paired=None, best=(t == best_t)) for t, ts in raw_rows]
    disk_times = disk_s[-args.repeats:]
    rows.append(dict(block=bb, op="read", who=f"disk worker DISK2H q={inflight} k={args.e2e_read_blocks}",
                     gbs=total / statistics.median(disk_times) / 1e9, p99=total / pct(disk_times, 99) / 1e9,
                     ratio=statistics.median(best) / statistics.median(disk_times),
                     paired=statistics.median([b / x for b, x in zip(best, disk_times)]), best=False))
    ts = times[("e2e", inflight)]
    chunks = chunk or args.e2e_read_blocks * inflight
    rows.append(dict(block=bb, op="disk->device",
                     who=f"onboard G3->{device} q={inflight} chunk={chunks} ({'/'.join(read_path)})",
                     gbs=total / statistics.median(ts) / 1e9, p99=total / pct(ts, 99) / 1e9,
                     ratio=statistics.median(best) / statistics.median(ts),
                     paired=statistics.median([b / x for b, x in zip(best, ts)]), best=False))
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        mark = " (best raw)" if r["best"] else ""
        ratio = f"{r['ratio']:.2f} | {r['paired']:.2f}" if r["ratio"] is not None else " | "
        print(f"| {r['block'] >> 10} KiB | {r['op']} | {r['who']}{mark} | {r['gbs']:.2f} | {r['p99']:.2f} "
              f"| {ratio} |", flush=True)


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
    ap.add_argument("--mode", default="host,device",
                    help="host: Host<->Disk through DiskStore; device: Disk->Device through a KvBlockManager")
    ap.add_argument("--e2e-inflight", default=str(DISK_READ_INFLIGHT),
                    help="device mode: NIXL read requests in flight in the disk worker (one kvbm-workers each)")
    ap.add_argument("--e2e-read-blocks", type=int, default=DISK_READ_BLOCKS, help="device mode: blocks per NIXL read")
    ap.add_argument("--e2e-chunk-blocks", default="0",
                    help="device mode: blocks per chunk of an onboard's G3 run (0: read blocks x in flight)")
    ap.add_argument("--e2e-layers", type=int, default=32)
    ap.add_argument("--e2e-inner", type=int, default=1024, help="KV heads x head dim")
    ap.add_argument("--cpu", action="store_true", help="device mode: CPU mode even with a GPU")
    args = ap.parse_args()
    modes = set(args.mode.split(","))
    if not modes or modes - {"host", "device"}:
        ap.error("--mode: host, device or both")
    logging.basicConfig(level=logging.WARNING)
    folder = tempfile.mkdtemp(prefix="kvbm-bench-disk-", dir=args.dir or "/tmp")
    try:
        print(f"machine: {machine(folder)}")
        print(f"{args.total_mib} MiB per pass, {args.repeats} passes after a warm-up, {args.files} files; "
              f"ratio = store median / best raw median")
        print("| block | op | who | median GB/s | p99 GB/s | ratio to raw | paired ratio |")
        print("|---|---|---|---|---|---|---|")
        for size in args.block_sizes.split(","):
            if "host" in modes:
                print_rows(bench_size(folder, parse_size(size), args))
            if "device" in modes:
                for q in args.e2e_inflight.split(","):
                    for c in args.e2e_chunk_blocks.split(","):
                        print_rows(bench_e2e(folder, parse_size(size), int(q), int(c), args))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
