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
same run. CUDA only.

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


if __name__ == "__main__":
    main()
