"""Whole-pipeline benchmark: engine -> ZeroMQ -> path worker process -> copy -> completion -> registry.

Measures, in one run, against a kvbm-workers started for it (CPU mode without CUDA):
  latency     round trip of a one-block transfer (TransferManager.submit -> future resolved), p50/p99,
              D2H and H2D, as a ratio to the floor of its transport measured in the same run, in
              interleaved chunks: a bare pyzmq DEALER/ROUTER ping-pong over ipc:// with another
              process, msgpack messages the size of a 1-block xfer and its done (and the same with
              CURVE on, as kvbm's sockets are)
  submit      engine-side cost of one 1-block submit: bursts of 64 TransferManager.submit (and
              KvBlockManager.offload) calls timed on the engine's thread without waiting, per call
  throughput  batched offload (KvBlockManager.offload: lookup, allocate, D2H, register) and onboard
              (match, H2D, release) of --total-mib per point in batches of B blocks, all submitted at
              once; GB/s as the median of --repeats, and as a ratio to the copy alone (the path
              workers' Copier on the same layouts, same scattered blocks, same batches, in this
              process, without the pipeline around it: on CUDA its batches enqueued back to back
              with no event between them, the bare routine), the goal being >= 90% for B >= 64
  pinning     seconds per GB of cudaHostRegister over a /dev/shm segment (CUDA only), measured here
              and as reported by the workers
Prints the machine and a table; --markdown prints the rows for bench/RESULTS.md.

    python bench/bench_pipeline.py --markdown     # kvbm installed, or PYTHONPATH=. for this checkout
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from _common import cpu_model, pct

import kvbm
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.shm import Segment, segment_name
from kvbm.wire import protocol as P
from kvbm.workers.copy import Copier


def machine(cuda: bool) -> str:
    cpu = cpu_model()
    gpu = ""
    if cuda:
        import torch
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    import torch
    return (f"{cpu}, {os.cpu_count()} CPUs{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{'CUDA' if cuda else 'CPU'} mode; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def worker_stats(config) -> dict:
    from kvbm.cli import ask_status
    return ask_status(config)["workers"]



def latency(kv, path: P.Path, n: int, device_blocks: int, host_blocks: int, start: int = 0,
            warmup: int = 50, cpu: list[float] | None = None) -> list[float]:
    """Round trips; `cpu` gets the engine thread's CPU seconds inside each submit() call
    (time.thread_time: what the submit costs the engine, not the time it is descheduled)."""
    tm = kv.transfers
    out = []
    for i in range(start, start + n + warmup):
        src, dst = (i % device_blocks, i % host_blocks) if path is P.Path.D2H else (i % host_blocks, i % device_blocks)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fut = tm.submit(path, [src], [dst])
        c1 = time.thread_time()
        fut.result(30)
        if i >= start + warmup:
            out.append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.append(c1 - c0)
    return out


# ---- the transport's floor: a bare ZeroMQ + msgpack ping-pong between two processes -------------

def _pong_server(endpoint: str, reply: bytes, curve: tuple | None) -> None:
    """The worker's half of the floor: receive, decode, answer a reply of a done message's size."""
    import msgpack
    import zmq
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve[1]
    sock.bind(endpoint)
    while True:
        ident, payload = sock.recv_multipart()
        if msgpack.unpackb(payload, raw=False).get("t") == "quit":
            break
        sock.send_multipart([ident, reply])
    sock.close(0)
    ctx.term()


class PingPong:
    """A pyzmq DEALER (here) / ROUTER (another process) ping-pong over ipc://, msgpack both ways,
    with a request the size of a 1-block xfer and a reply the size of its done: what a 1-block round
    trip would cost if kvbm added nothing to its transport. `curve`: the same with CURVE on, as
    kvbm's sockets are (the issue's floor is the bare one)."""

    def __init__(self, rundir: str, request: dict, reply: dict, curve: bool = False) -> None:
        import multiprocessing

        import msgpack
        import zmq
        self.msgpack = msgpack
        self.request = request
        self.endpoint = f"ipc://{rundir}/pingpong-{'curve' if curve else 'bare'}.sock"
        keys = None
        if curve:
            server_pub, server_sec = zmq.curve_keypair()
            client_pub, client_sec = zmq.curve_keypair()
            keys = (server_pub, server_sec)
        # The bench's parent is not forked: spawn (the child imports this file as __mp_main__).
        mp = multiprocessing.get_context("spawn")
        self.proc = mp.Process(target=_pong_server, args=(self.endpoint, msgpack.packb(reply, use_bin_type=True), keys),
                               daemon=True)
        self.proc.start()
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve:
            self.sock.curve_serverkey = server_pub
            self.sock.curve_publickey = client_pub
            self.sock.curve_secretkey = client_sec
        self.sock.connect(self.endpoint)
        self.run(50)   # connects (the server may still be starting) and warms up

    def run(self, n: int) -> list[float]:
        out = []
        sock, packb, unpackb = self.sock, self.msgpack.packb, self.msgpack.unpackb
        for i in range(n):
            msg = dict(self.request, id=i + 1)
            t0 = time.perf_counter()
            sock.send(packb(msg, use_bin_type=True))
            unpackb(sock.recv(), raw=False)
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.sock.send(self.msgpack.packb({"t": "quit"}, use_bin_type=True))
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        self.sock.close(0)
        self.ctx.term()


def wire_sizes(engine_id: str, block: int) -> tuple[dict, dict]:
    """A 1-block xfer and its done, as the pipeline sends them (same fields, same sizes)."""
    request = P.make_xfer(1, engine_id, 1, P.Path.D2H, [12345], [23456])
    reply = P.make_done(1, P.Status.OK, nbytes=block, gen=1, queue_us=12, copy_us=345)
    return request, reply


def submit_cost(kv, n: int, nblocks: int, burst: int = 64) -> tuple[list[float], list[float]]:
    """Engine-side cost of one 1-block submit: bursts of `burst` submits timed on the engine's thread
    without waiting for any of them (then all are waited for, untimed). Per call, one value per
    burst: TransferManager.submit alone, and KvBlockManager.offload (registry lookup, allocation,
    submit)."""
    tm = kv.transfers
    raw, full = [], []
    rng = np.random.default_rng(2)
    burst = min(burst, nblocks)
    for r in range(max(30, n // burst) + 2):
        dev = rng.permutation(nblocks)[:burst].tolist()
        host = rng.permutation(nblocks)[:burst].tolist()
        gc.collect()
        t0 = time.perf_counter()
        futs = [tm.submit(P.Path.D2H, [dev[i]], [host[i]]) for i in range(burst)]
        t1 = time.perf_counter()
        for f in futs:
            f.result(30)
        hashes = rng.integers(1, 2**63, size=burst, dtype=np.int64).astype(np.uint64).tolist()
        gc.collect()
        t2 = time.perf_counter()
        futs = [kv.offload([dev[i]], [hashes[i]]) for i in range(burst)]
        t3 = time.perf_counter()
        for f in futs:
            f.result(30)
        if r >= 2:   # two warm-up bursts
            raw.append((t1 - t0) / burst)
            full.append((t3 - t2) / burst)
    return raw, full


class Baseline:
    """The path workers' copy (kvbm.workers.copy.Copier) on the same memory, in this process."""

    def __init__(self, kv, device_layout: BlockLayout, host_layout: BlockLayout, tensors, cuda: bool, threads: int):
        welcome = kv.transfers.welcome
        self.segment = Segment.attach(welcome["host"]["segment"])
        self.pin_s = self.segment.pin() if cuda else 0.0
        if cuda:
            ptrs = [t.data_ptr() for t in tensors]
        else:
            base = kv._shared.segment.address
            ptrs = [base + off for off in kv._shared.offsets]
        host_ptrs = [self.segment.address]
        self.offload = Copier(device_layout, ptrs, host_layout, host_ptrs, cuda, threads)
        self.onboard = Copier(host_layout, host_ptrs, device_layout, ptrs, cuda, threads)
        self.cuda = cuda
        # Touch every block both ways once (G2's pages fault in this process's mapping on first use;
        # the workers' mappings are populated): there and back leaves the bytes as they were.
        every = np.arange(device_layout.num_blocks, dtype=np.int64)
        self.run([(every, every)], True)
        self.run([(every, every)], False)

    def run(self, batches: list[tuple[np.ndarray, np.ndarray]], offload: bool) -> float:
        copier = self.offload if offload else self.onboard
        t0 = time.perf_counter()
        for dev_blocks, host_blocks in batches:
            s, d = (dev_blocks, host_blocks) if offload else (host_blocks, dev_blocks)
            if self.cuda:
                copier.enqueue(s, d)  # back to back, no event per batch: the bare routine
            else:
                copier.copy(s, d)
        if self.cuda:
            copier.stream.synchronize()
        return time.perf_counter() - t0

    def single(self, offload: bool, n: int, nblocks: int, start: int = 0) -> list[float]:
        """Seconds of each of n 1-block copies (the same blocks as latency()'s), one at a time."""
        copier = self.offload if offload else self.onboard
        out = []
        for i in range(start, start + n):
            s, d = np.array([i % nblocks], dtype=np.int64), np.array([i % nblocks], dtype=np.int64)
            t0 = time.perf_counter()
            if self.cuda:
                copier.enqueue(s, d)
                copier.stream.synchronize()
            else:
                copier.copy(s, d)
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.segment.close()


def pipeline_round(kv, batches: list[tuple[np.ndarray, np.ndarray]], hashes: list[np.ndarray], offload: bool,
                   layers: bool = False) -> tuple[float, float]:
    """(seconds for the whole round, seconds until the last submission had returned)."""
    t0 = time.perf_counter()
    if offload:
        futures = [kv.offload(dev, h) for (dev, _), h in zip(batches, hashes)]
    else:
        futures = [kv.onboard(h, dev, layers=layers) for (dev, _), h in zip(batches, hashes)]
    submitted = time.perf_counter() - t0
    results = [f.result(120).value for f in futures]
    elapsed = time.perf_counter() - t0
    moved = sum(r.moved if offload else r.loaded for r in results)
    expect = sum(len(h) for h in hashes)
    if moved != expect:
        raise RuntimeError(f"{'offload' if offload else 'onboard'} moved {moved} of {expect} blocks")
    return elapsed, submitted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--inner", type=int, default=512, help="elements per token per (layer, K/V)")
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--batches", default="1,16,64,256", help="blocks per transfer")
    ap.add_argument("--total-mib", type=int, default=512, help="data moved per throughput point")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--copy-threads", type=int, default=0)
    ap.add_argument("--pin-gib", type=float, default=4.0, help="segment size for the pinning figure (CUDA)")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even with a GPU")
    ap.add_argument("--lanes", choices=["on", "off"], default="on",
                    help="small transfers through shared-memory lanes (KvbmConfig.lanes), or all over ZeroMQ")
    ap.add_argument("--lane-spin-us", type=int, default=-1, help="KvbmConfig.lane_spin_us (-1: auto)")
    ap.add_argument("--wait-spin-us", type=int, default=-1,
                    help="KvbmConfig.wait_spin_us: a result() waiter settles its own small request (-1: auto)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)

    cuda = kvbm.cuda_available() and not args.cpu
    lc = LayoutConfig(num_layers=args.layers, outer_dim=2, page_size=args.page, inner_dim=args.inner, dtype="bfloat16")
    block = lc.block_bytes
    per_point = max(1, (args.total_mib << 20) // block)
    sizes = [int(b) for b in args.batches.split(",")]
    nblocks = max(per_point, max(sizes))
    print(f"machine: {machine(cuda)}")
    print(f"model: {lc.num_layers} layers x 2 x {lc.page_size} tokens x {lc.inner_dim} bf16 "
          f"= {block // 1024} KiB per block "
          f"({lc.num_layers * 2} regions of {lc.region_bytes // 1024} KiB); {nblocks} blocks "
          f"({nblocks * block / 2**20:.0f} MiB) per point; G1 and G2 {nblocks} blocks each; lanes {args.lanes}"
          f" (spin {args.lane_spin_us} us, wait spin {args.wait_spin_us} us)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbm-bench-") as rundir:
        config = kvbm.KvbmConfig(layout=lc, device_blocks=nblocks, host_blocks=nblocks, runtime_dir=rundir,
                                 force_cpu=not cuda, max_batch_blocks=max(sizes), copy_threads=args.copy_threads,
                                 max_inflight_bytes=2 * nblocks * block, lanes=args.lanes == "on",
                                 lane_spin_us=args.lane_spin_us,
                                 wait_spin_us=args.wait_spin_us)
        with kvbm.KvBlockManager(config) as kv:
            dev_layout = BlockLayout(lc, LayoutType.LAYER_SEPARATE, nblocks)
            host_layout = BlockLayout(lc, LayoutType.FULLY_CONTIGUOUS, nblocks)
            tensors = kv.create_device_tensors(dev_layout, device="cuda" if cuda else "cpu")
            for t in tensors:
                t.fill_(7)
            kv.register_device_tensors(tensors, dev_layout)
            base = Baseline(kv, dev_layout, host_layout, tensors, cuda, args.copy_threads)
            gc.collect()

            # ---- latency, against the transport's floor in the same run -----------------------
            # Chunks of each, interleaved: the machine's noise falls on the floor and the pipeline
            # alike.
            request, reply = wire_sizes(kv.transfers.engine_id, block)
            floors = {"bare": PingPong(rundir, request, reply), "curve": PingPong(rundir, request, reply, curve=True)}
            lats: dict[str, list[float]] = {k: [] for k in ("bare", "curve", "d2h", "h2d", "d2h copy", "h2d copy")}
            submit_cpu: list[float] = []
            chunk = 100
            for lo in range(0, args.latency_n, chunk):
                n = min(chunk, args.latency_n - lo)
                for name, pp in floors.items():
                    lats[name] += pp.run(n)
                for path in (P.Path.D2H, P.Path.H2D):
                    lats[path.label] += latency(kv, path, n, nblocks, nblocks, start=lo, warmup=50 if lo == 0 else 5,
                                                cpu=submit_cpu)
                    lats[path.label + " copy"] += base.single(path is P.Path.D2H, n, nblocks, lo)
            for pp in floors.values():
                pp.close()
            us = {k: (pct(v, 50) * 1e6, pct(v, 99) * 1e6) for k, v in lats.items()}
            fb50, fb99 = us["bare"]
            print(f"floor: bare pyzmq DEALER/ROUTER ping-pong over ipc://, msgpack, two processes, "
                  f"{len(P.encode(dict(request)))} B request / {len(P.encode(dict(reply)))} B reply: "
                  f"p50 {fb50:.0f} us  p99 {fb99:.0f} us; with CURVE (as kvbm's sockets): "
                  f"p50 {us['curve'][0]:.0f} us  p99 {us['curve'][1]:.0f} us  (n={len(lats['bare'])})")
            rows.append(("zmq ping-pong floor (bare)", f"p50 {fb50:.0f} us", f"p99 {fb99:.0f} us", ""))
            rows.append(("zmq ping-pong floor (CURVE)", f"p50 {us['curve'][0]:.0f} us",
                         f"p99 {us['curve'][1]:.0f} us", f"{us['curve'][0] / fb50:.2f}x"))
            for label in ("d2h", "h2d"):
                p50, p99 = us[label]
                rows.append((f"1-block round trip {label}", f"p50 {p50:.0f} us",
                             f"p99 {p99:.0f} us; p50 / floor p50", f"{p50 / fb50:.2f}x"))
                rows.append((f"1-block round trip {label} p99", f"{p99:.0f} us", "p99 / floor p99",
                             f"{p99 / fb99:.2f}x"))
                c50 = us[label + " copy"][0]
                rows.append((f"1-block copy alone {label}", f"p50 {c50:.1f} us",
                             "the copy routine in this process, same blocks; round trip minus it / floor p50",
                             f"{(p50 - c50) / fb50:.2f}x"))
                print(f"latency {label}: p50 {p50:.0f} us ({p50 / fb50:.2f}x floor)  p99 {p99:.0f} us "
                      f"({p99 / fb99:.2f}x floor)  (n={len(lats[label])}, one {block // 1024} KiB block)")

            # ---- engine-side cost of a 1-block submit -----------------------------------------
            c50 = statistics.median(submit_cpu) * 1e6
            rows.append(("engine CPU of a 1-block submit", f"{c50:.1f} us",
                         f"time.thread_time inside each submit() of the round trips above (n={len(submit_cpu)}); "
                         f"p90 {pct(submit_cpu, 90) * 1e6:.1f} us", ""))
            print(f"engine CPU of a 1-block submit: {c50:.1f} us (thread_time per call of the round trips; "
                  f"p90 {pct(submit_cpu, 90) * 1e6:.1f} us)")
            raw, full = submit_cost(kv, args.latency_n, nblocks)
            for name, vals in (("submit", raw), ("offload", full)):
                rows.append((f"engine cost of a 1-block {name}", f"{statistics.median(vals) * 1e6:.1f} us",
                             f"per call, bursts of 64 without waiting, on the engine's thread; "
                             f"max {max(vals) * 1e6:.1f} us", ""))
                print(f"engine cost of a 1-block {name}: {statistics.median(vals) * 1e6:.1f} us per call "
                      f"(median of {len(vals)} bursts of 64; min {min(vals) * 1e6:.1f}, max {max(vals) * 1e6:.1f})")

            # ---- throughput -----------------------------------------------------------------
            rng = np.random.default_rng(1)
            print(f"{'batch':>6} {'dir':>14} {'pipeline GB/s':>14} {'copy GB/s':>10} {'ratio':>7} {'min pipe':>9} "
                  f"{'worker GB/s':>11} {'submitted at':>12}")
            for b in sizes:
                count = max(1, per_point // b)
                n = count * b
                modes = [(True, False), (False, False)] + ([(False, True)] if b == 64 else [])
                for offload, layers in modes:
                    pipe_t, copy_t, sub_frac = [], [], []
                    label = "d2h" if offload else "h2d"
                    w0 = None
                    for rep in range(args.repeats + 1):
                        if rep == 1:
                            w0 = worker_stats(config)[label]
                        dev = rng.permutation(nblocks)[:n]
                        hashes = rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64)
                        batches = [(dev[i:i + b], None) for i in range(0, n, b)]
                        hs = [hashes[i:i + b] for i in range(0, n, b)]
                        host = rng.permutation(nblocks)[:n]   # the baseline's G2 blocks: scattered too
                        cb = [(dev[i:i + b], host[i:i + b]) for i in range(0, n, b)]
                        if not offload:
                            kv.offload(dev, hashes).result(120)   # something to onboard (fresh hashes;
                                                                  # the previous round's get evicted)
                        gc.collect()
                        if rep % 2:  # alternate the order: neither always runs on caches the other warmed
                            t_copy = base.run(cb, offload)
                            t_pipe, t_sub = pipeline_round(kv, batches, hs, offload, layers)
                        else:
                            t_pipe, t_sub = pipeline_round(kv, batches, hs, offload, layers)
                            t_copy = base.run(cb, offload)
                        if rep:  # the first round is the warm-up
                            sub_frac.append(t_sub / t_pipe)
                            pipe_t.append(n * block / t_pipe / 1e9)
                            copy_t.append(n * block / t_copy / 1e9)
                    w1 = worker_stats(config)[label]
                    moved = w1["bytes"] - w0["bytes"]
                    busy = w1["busy_s"] - w0["busy_s"]
                    wrate = moved / busy / 1e9 if busy > 0 else 0.0
                    pm, cm = statistics.median(pipe_t), statistics.median(copy_t)
                    name = "offload" if offload else ("onboard+layers" if layers else "onboard")
                    print(f"{b:>6} {name:>14} {pm:>14.2f} {cm:>10.2f} {pm / cm:>7.1%} {min(pipe_t):>9.2f} "
                          f"{wrate:>11.2f} {statistics.median(sub_frac):>12.0%}")
                    rows.append((f"batch {b} {name}", f"{pm:.2f} GB/s", f"copy alone {cm:.2f} GB/s; copy inside the "
                                 f"worker {wrate:.2f} GB/s", f"{pm / cm:.0%}"))

            # ---- pinning --------------------------------------------------------------------
            if cuda:
                st = __import__("kvbm.cli", fromlist=["ask_status"]).ask_status(config)
                g2_gb = host_layout.total_bytes / 1e9
                for label in ("d2h", "h2d"):
                    pin = st["workers"][label]["pin_s"]
                    rows.append((f"pin G2 in {label} worker", f"{pin / g2_gb:.3f} s/GB", f"{g2_gb:.2f} GB", ""))
                seg = Segment.create(segment_name(config.instance_id, f"pinbench-{os.getpid()}"),
                                     int(args.pin_gib * 2**30))
                try:
                    fault = seg.prefault()
                    pin = seg.pin()
                finally:
                    seg.close()
                    seg.unlink()
                gb = args.pin_gib * 2**30 / 1e9
                print(f"pinning: {gb:.2f} GB pre-faulted in {fault:.2f} s, cudaHostRegister {pin:.3f} s "
                      f"= {pin / gb:.3f} s/GB ({gb / pin:.1f} GB/s)")
                rows.append(("cudaHostRegister", f"{pin / gb:.3f} s/GB", f"{gb:.1f} GB segment",
                             f"{gb / pin:.0f} GB/s"))
            base.close()
    if args.markdown:
        print("\n| measurement | value | baseline / detail | ratio |\n|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
