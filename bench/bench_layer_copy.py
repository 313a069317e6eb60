"""Onboard with per-layer progress, the copy alone: where the layered onboard loses against one call.

bench_pipeline's "batch 64 onboard with per-layer progress" runs at 58-65 % of the whole-copy
routine on the H200 (bench/RESULTS.md, "Lanes"), and the worker's own copy rate is what drops.
This takes the pipeline out: one kvbm.workers.copy.Copier (G2 fully contiguous, pinned -> the
engine's layer-separate layout on the GPU, bench_pipeline's model), requests of --blocks scattered
blocks, --inflight of them launched at once as the H2D worker keeps them, for each variant:

  whole            one call per request, one event (the baseline: what "copy alone" runs)
  layers           what the worker runs for layers=True: one call staging the block ids once,
                   a kernel and an event per layer (kvbm_cuda_copy_layers)
  layers@S         the same with the kernel on S SMs
  layers-sync      `layers`, waited on as the worker waits: each event synchronized in turn
  percall-auto     before: a call of its own per layer (AUTO), an event after each
  percall-kernel   the same with method KERNEL
  percall-dma      the same with the batched DMA

GB/s of each (median of --repeats rounds of --requests requests) and its ratio to `whole` in the
same run. Then small copies, one at a time as a 1-block round trip issues them: microseconds from
launch to the event's completion (spin-waited, as the worker waits for copies this small) for
--small-blocks blocks by method (KERNEL, STAGED, DMA, AUTO). CUDA only.

    python3 bench/bench_layer_copy.py [--blocks 64] [--requests 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from kvbm._fast import native
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.workers.copy import Copier

M = native.CopyMethod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--inner", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=64, help="blocks per request")
    ap.add_argument("--requests", type=int, default=64, help="requests per round")
    ap.add_argument("--inflight", type=int, default=4, help="requests launched at once (the worker's MAX_IN_FLIGHT)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sms", default="8,16,32")
    ap.add_argument("--small-blocks", default="1,2,4,8,16,32", help="blocks per copy for the latency table")
    ap.add_argument("--small-n", type=int, default=300, help="copies per latency point")
    args = ap.parse_args()

    lc = LayoutConfig(num_layers=args.layers, outer_dim=2, page_size=16, inner_dim=args.inner, dtype="bfloat16")
    nblocks = args.blocks * 8
    dev_layout = BlockLayout(lc, LayoutType.LAYER_SEPARATE, nblocks)
    host_layout = BlockLayout(lc, LayoutType.FULLY_CONTIGUOUS, nblocks)
    dev = [torch.zeros(dev_layout.buffer_bytes, dtype=torch.uint8, device="cuda")
           for _ in range(dev_layout.num_buffers())]
    host = torch.randint(0, 256, (host_layout.buffer_bytes,), dtype=torch.uint8).pin_memory()
    rng = np.random.default_rng(3)
    reqs = [(rng.choice(nblocks, args.blocks, replace=False).astype(np.int64),
             rng.choice(nblocks, args.blocks, replace=False).astype(np.int64)) for _ in range(args.requests)]
    nbytes = args.requests * args.blocks * lc.block_bytes

    def copier(method=M.AUTO, sms=0) -> Copier:
        return Copier(host_layout, [host.data_ptr()], dev_layout, [t.data_ptr() for t in dev], cuda=True,
                      method=method, max_sms=sms)

    def percall(cp: Copier, method) -> callable:
        def launch(src, dst):   # the Copier's per-layer way before kvbm_cuda_copy_layers
            events = []
            for s_lay, d_lay in zip(cp.src_layers, cp.dst_layers):
                native.copy_blocks_cuda(s_lay, d_lay, src, dst, method, 0, cp.stream.cuda_stream)
                ev = torch.cuda.Event(blocking=True)
                ev.record(cp.stream)
                events.append(ev)
            return events
        return launch

    auto = copier()
    variants = {"whole": (lambda s, d: auto.launch(s, d, False), False),
                "layers": (lambda s, d: auto.launch(s, d, True), False),
                "layers-sync": (lambda s, d: auto.launch(s, d, True), True)}
    for sms in [int(x) for x in args.sms.split(",") if x]:
        cp = copier(M.KERNEL, sms)
        variants[f"layers@{sms}"] = ((lambda c: lambda s, d: c.launch(s, d, True))(cp), False)
    variants["percall-auto"] = (percall(copier(), M.AUTO), False)
    variants["percall-kernel"] = (percall(copier(), M.KERNEL), False)
    variants["percall-dma"] = (percall(copier(), M.DMA), False)

    def one_round(launch, sync_each: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        launched: list[list] = []
        for src, dst in reqs:
            if len(launched) >= args.inflight:
                events = launched.pop(0)
                if sync_each:
                    for ev in events:
                        ev.synchronize()
                else:
                    events[-1].synchronize()
            launched.append(launch(src, dst))
        for events in launched:
            events[-1].synchronize()
        return time.perf_counter() - t0

    # every variant's copy lands byte for byte (a poisoned destination, one request)
    src0, dst0 = reqs[0]
    for name, (launch, _) in variants.items():
        for t in dev:
            t.fill_(0xA5)
        launch(src0, dst0)[-1].synchronize()
        want = [host_layout.block_bytes_of([host], int(b)) for b in src0[:3]]
        got = [dev_layout.block_bytes_of(dev, int(b)) for b in dst0[:3]]
        assert got == want, f"{name}: copied bytes differ"

    print(f"GPU {torch.cuda.get_device_name()}; {args.requests} requests of {args.blocks} blocks of "
          f"{lc.block_bytes >> 10} KiB ({nbytes >> 20} MiB a round), {args.inflight} in flight, "
          f"{lc.num_layers} layers; whole copy: AUTO picks "
          f"{M(native.cuda_pick_method(auto.src_region, auto.dst_region, src0, dst0, auto.stream.cuda_stream)).name}; "
          f"median of {args.repeats}")
    rates = {}
    order = list(variants)
    for name in order:     # warm-up: staging slots, metadata rings, streams
        one_round(*variants[name])
    samples: dict[str, list[float]] = {n: [] for n in order}
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):   # alternate: drift falls on all
            samples[name].append(nbytes / one_round(*variants[name]) / 1e9)
    for name in order:
        rates[name] = statistics.median(samples[name])
    print(f"{'variant':<14} {'GB/s':>7} {'/ whole':>8}")
    for name in order:
        print(f"{name:<14} {rates[name]:7.2f} {rates[name] / rates['whole']:8.1%}")
    small_copies(args, host_layout, dev_layout, host, dev)


def small_copies(args, host_layout, dev_layout, host, dev) -> None:
    """Launch -> event complete, one copy at a time, median and p90 in microseconds (H2D and D2H)."""
    nblocks = dev_layout.num_blocks
    sizes = [int(x) for x in args.small_blocks.split(",") if x]
    methods = {"kernel": M.KERNEL, "staged": M.STAGED, "dma": M.DMA, "auto": M.AUTO}
    dev_ptrs = [t.data_ptr() for t in dev]
    print(f"\nsmall copies: launch -> event complete, one at a time (median / p90 us of {args.small_n})")
    print(f"{'blocks':>6} {'dir':>4} " + " ".join(f"{m:>13}" for m in methods) + "   AUTO picks")
    rng = np.random.default_rng(5)
    for n in sizes:
        for label, (sl, sp, dl, dp) in (("h2d", (host_layout, [host.data_ptr()], dev_layout, dev_ptrs)),
                                        ("d2h", (dev_layout, dev_ptrs, host_layout, [host.data_ptr()]))):
            cells, picked = [], ""
            for method in methods.values():
                cp = Copier(sl, sp, dl, dp, cuda=True, method=method)
                times = []
                for i in range(args.small_n + 20):
                    src = rng.choice(nblocks, n, replace=False).astype(np.int64)
                    dst = rng.choice(nblocks, n, replace=False).astype(np.int64)
                    t0 = time.perf_counter()
                    cp.launch(src, dst, False)[-1].synchronize()
                    if i >= 20:
                        times.append((time.perf_counter() - t0) * 1e6)
                times.sort()
                cells.append(f"{times[len(times) // 2]:6.0f} / {times[len(times) * 9 // 10]:4.0f}")
                if method == M.AUTO:
                    picked = M(native.cuda_pick_method(cp.src_region, cp.dst_region, src, dst,
                                                       cp.stream.cuda_stream)).name
            print(f"{n:>6} {label:>4} " + " ".join(f"{c:>13}" for c in cells) + f"   {picked}")


if __name__ == "__main__":
    main()
