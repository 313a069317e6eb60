"""G1 <-> G2 block transfer benchmark: the path workers' Copier (kvbm_cuda_copy_blocks) against the
bulk-copy roofline.

Measures, on one GPU, in one run:
  roofline   one 1 GiB pinned<->device `copy_` each way, and both at once on two streams
  loop       one cudaMemcpyAsync per (block, layer, outer) region (KVBM_COPY_DMA_LOOP)
  kernel@S   the SM kernel limited to S SMs (sweep), 16-byte UVA accesses
  dma        the merged region list through cudaMemcpyBatchAsync (copy engines, no SMs)
  staged     SM gather/scatter (8 SMs) into 32 MiB device staging slots + one DMA per whole G2 block
  auto       what KVBM_COPY_AUTO picks (csrc/cuda/copy.cu's rule)
for a model of --layers layers x --outer outer regions, region sizes --sizes, --blocks scattered
blocks (fewer where the copy would pass --max-gib), engine layout layer-separate outer-major
([outer, blocks, region] per layer, vLLM) <-> G2 fully contiguous. Directions: D2H (offload),
H2D (onboard), and both at once on two streams. Every copy goes through kvbm.workers.copy.Copier,
as the D2H and H2D path workers run it (one Copier per direction and method, each on its own
stream, one launch and one event per copy), over layouts built by kvbm.layout.BlockLayout. Each
point: warm-up, then the median (and worst) of --repeats timings by CUDA events; every method's
copy is checked on two pairs first.
Prints the card, a full table, and a compact table last; writes both to --out (default $OUT).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

from kvbm._fast import native
from kvbm.layout import BlockLayout, InnerOrder, LayoutConfig, LayoutType
from kvbm.workers.copy import Copier

M = native.CopyMethod

GIB = 1 << 30


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * mult


def fmt_size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def time_events(enqueue, streams, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of enqueue(), timed from an event on streams[0] (that the others wait on)
    to an event on streams[0] after it has waited for every other stream."""
    out = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(streams[0])
        for s in streams[1:]:
            s.wait_stream(streams[0])
        enqueue()
        for s in streams[1:]:
            streams[0].wait_stream(s)
        end.record(streams[0])
        end.synchronize()
        if i >= warmup:
            out.append(start.elapsed_time(end) / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--outer", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--max-gib", type=float, default=1.0, help="cap on bytes moved per copy")
    ap.add_argument("--sizes", default="16K,32K,64K,128K,256K,512K,1M,2M")
    ap.add_argument("--sms", default="2,4,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="", help="comma list of variant names to run (e.g. kernel@8)")
    ap.add_argument("--tag", default="", help="label printed in the header (e.g. a kernel variant)")
    args = ap.parse_args()
    if not native.cuda_available():
        sys.exit("bench_transfer: needs a CUDA build and a GPU (kvbm.cuda_available() is False)")

    L, O = args.layers, args.outer
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    sms_list = [int(s) for s in args.sms.split(",")]
    props = torch.cuda.get_device_properties(0)
    card = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / GIB:.0f} GiB"
    header = (f"{args.tag + '; ' if args.tag else ''}card: {card}; "
              f"torch {torch.__version__} (CUDA {torch.version.cuda}); "
              f"host {platform.node()} {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    lines = [header]
    results: dict = {"card": card, "header": header, "points": []}

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    # ---- roofline: 1 GiB bulk copies ----------------------------------------------------------
    d_big = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    d_big2 = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    h_big = torch.empty(GIB, dtype=torch.uint8).pin_memory()
    h_big2 = torch.empty(GIB, dtype=torch.uint8).pin_memory()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    d_big.random_(0, 256)
    torch.cuda.synchronize()

    def bulk(dst, src, s):
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)

    roof = {}
    t = time_events(lambda: bulk(h_big, d_big, s1), [s1], args.warmup, args.repeats)
    roof["d2h"] = GIB / statistics.median(t) / 1e9
    t = time_events(lambda: bulk(d_big2, h_big2, s1), [s1], args.warmup, args.repeats)
    roof["h2d"] = GIB / statistics.median(t) / 1e9
    t = time_events(lambda: (bulk(h_big, d_big, s1), bulk(d_big2, h_big2, s2)), [s1, s2],
                    args.warmup, args.repeats)
    roof["bidi"] = 2 * GIB / statistics.median(t) / 1e9
    emit(f"roofline (1 GiB pinned copy_): D2H {roof['d2h']:.1f} GB/s, H2D {roof['h2d']:.1f} GB/s, "
         f"both at once {roof['bidi']:.1f} GB/s")
    results["roofline"] = roof
    d_big2 = h_big2 = None
    gc.collect()
    torch.cuda.empty_cache()

    # One device pool and one host pool, re-viewed for every region size.
    pool_bytes = int(2 * args.max_gib * GIB)
    dev_raw = torch.empty(pool_bytes, dtype=torch.uint8, device="cuda")
    dev_raw.random_(0, 256)
    host_raw = h_big if pool_bytes <= GIB else torch.empty(pool_bytes, dtype=torch.uint8).pin_memory()
    if pool_bytes > GIB:
        host_raw.copy_(dev_raw)
    torch.cuda.synchronize()
    d_big = None
    sm_used = {s: native.cuda_kernel_sms(s) for s in sms_list}
    emit("kernel SMs used for max_sms " + ", ".join(f"{s} -> {u}" for s, u in sm_used.items()) +
         f" (default {native.cuda_kernel_sms(0)})")

    gen = torch.Generator().manual_seed(0)
    full_rows = []
    for region in sizes:
        per_block = L * O * region
        n = min(args.blocks, int(args.max_gib * GIB) // per_block)
        nb = 2 * n
        if nb * per_block > pool_bytes:
            continue
        layer_bytes = O * nb * region
        dev_layers = [dev_raw[l * layer_bytes:(l + 1) * layer_bytes].view(O, nb, region) for l in range(L)]
        host = host_raw[:nb * per_block].view(nb, L, O, region)
        config = LayoutConfig(L, O, 1, region, "uint8")
        dev_lay = BlockLayout(config, LayoutType.LAYER_SEPARATE, nb, InnerOrder.OUTER_MAJOR)
        host_lay = BlockLayout(config, LayoutType.FULLY_CONTIGUOUS, nb)
        dev_ptrs, host_ptrs = [lt.data_ptr() for lt in dev_layers], [host.data_ptr()]
        copiers: dict = {}

        def copiers_for(method, sms):
            """(offload, onboard) Copiers for one method, made once per region size."""
            if (method, sms) not in copiers:
                copiers[method, sms] = (
                    Copier(dev_lay, dev_ptrs, host_lay, host_ptrs, True, method=method, max_sms=sms),
                    Copier(host_lay, host_ptrs, dev_lay, dev_ptrs, True, method=method, max_sms=sms))
            return copiers[method, sms]

        perm_d = torch.randperm(nb, generator=gen)
        perm_h = torch.randperm(nb, generator=gen)
        off_src, on_dst = perm_d[:n].numpy().copy(), perm_d[n:].numpy().copy()
        off_dst, on_src = perm_h[:n].numpy().copy(), perm_h[n:].numpy().copy()
        nbytes = n * per_block
        auto_c_off, auto_c_on = copiers_for(M.AUTO, 0)
        auto_off = native.cuda_pick_method(auto_c_off.src_region, auto_c_off.dst_region, off_src, off_dst,
                                           auto_c_off.stream.cuda_stream)
        auto_on = native.cuda_pick_method(auto_c_on.src_region, auto_c_on.dst_region, on_src, on_dst,
                                          auto_c_on.stream.cuda_stream)

        def off(method, sms=0):
            copiers_for(method, sms)[0].launch(off_src, off_dst, layers=False)

        def on(method, sms=0):
            copiers_for(method, sms)[1].launch(on_src, on_dst, layers=False)

        def check(direction, name, run_once):
            # Two pairs, poisoned first, compared after one copy.
            if direction in ("d2h", "bidi"):
                for i in (0, n - 1):
                    host[int(off_dst[i])].fill_(0xA5)
            if direction in ("h2d", "bidi"):
                for i in (0, n - 1):
                    for lt in dev_layers:
                        lt[:, int(on_dst[i])].fill_(0x5A)
            torch.cuda.synchronize()
            run_once()
            torch.cuda.synchronize()
            pairs = []
            if direction in ("d2h", "bidi"):
                pairs += [("d2h", int(off_src[i]), int(off_dst[i])) for i in (0, n - 1)]
            if direction in ("h2d", "bidi"):
                pairs += [("h2d", int(on_dst[i]), int(on_src[i])) for i in (0, n - 1)]
            for _, d, h in pairs:
                want = torch.stack([lt[:, d] for lt in dev_layers]).cpu()
                if not torch.equal(host[h], want):
                    raise SystemExit(f"bench_transfer: {name} {direction} copied wrong bytes (region {region})")

        variants = [("loop", M.DMA_LOOP, 0)]
        variants += [(f"kernel@{s}", M.KERNEL, s) for s in sms_list]
        variants += [("dma", M.DMA, 0), ("staged", M.STAGED, 8), ("auto", M.AUTO, 0)]
        row = {"region": region, "blocks": n, "bytes": nbytes,
               "auto": {"d2h": auto_off, "h2d": auto_on}}
        for direction in ("d2h", "h2d", "bidi"):
            vs = variants if direction != "bidi" else [
                ("loop", M.DMA_LOOP, 0), ("kernel@8", M.KERNEL, 8), ("dma", M.DMA, 0),
                ("staged", M.STAGED, 8), ("auto", M.AUTO, 0)]
            only = [x for x in args.only.split(",") if x]
            for name, method, sms in vs:
                if only and name not in only:
                    continue
                if name == "staged" and per_block > (32 << 20):
                    continue  # a block larger than a staging slot: the staged path does not apply
                c_off, c_on = copiers_for(method, sms)
                if direction == "d2h":
                    def run_once(m=method, k=sms): off(m, k)
                    streams, moved = [c_off.stream], nbytes
                elif direction == "h2d":
                    def run_once(m=method, k=sms): on(m, k)
                    streams, moved = [c_on.stream], nbytes
                else:
                    def run_once(m=method, k=sms): (off(m, k), on(m, k))
                    streams, moved = [c_off.stream, c_on.stream], 2 * nbytes
                gc.collect()
                check(direction, name, run_once)
                ts = time_events(run_once, streams, args.warmup, args.repeats)
                med, worst = statistics.median(ts), max(ts)
                gbs = moved / med / 1e9
                ratio = gbs / roof[direction]
                row[f"{direction}:{name}"] = {"gbs": gbs, "ratio": ratio, "median_s": med, "worst_s": worst,
                                              "best_s": min(ts), "all_s": ts}
                line = (f"{fmt_size(region):>5} x{n:>4} blk {direction:>4} {name:<13} {gbs:6.1f} GB/s "
                        f"{100 * ratio:5.1f}% of roof  median {med * 1e3:7.2f} ms  worst {worst * 1e3:7.2f} ms")
                emit(line)
        full_rows.append(row)
        results["points"].append(row)
        dev_layers = host = copiers = None

    # ---- compact table ------------------------------------------------------------------------
    mname = {M.KERNEL: "K", M.DMA: "D", M.STAGED: "S"}
    emit("")
    emit(f"card: {card}; {L} layers x {O} outer, layer-separate outer-major <-> fully contiguous G2; "
         f"GB/s (% of roofline D2H {roof['d2h']:.1f} / H2D {roof['h2d']:.1f} / both {roof['bidi']:.1f})")
    cols = ["loop", "kernel@2", "kernel@4", "kernel@8", "kernel@16", "dma", "staged", "auto"]
    for direction in ("d2h", "h2d"):
        emit(f"{direction.upper():<4} region blk  " + "  ".join(f"{c:>13}" for c in cols) + "  auto=")
        for row in full_rows:
            cells = []
            for c in cols:
                p = row.get(f"{direction}:{c}")
                cells.append(f"{p['gbs']:5.1f} ({100 * p['ratio']:3.0f}%)" if p else f"{'-':>13}")
            emit(f"     {fmt_size(row['region']):>6} {row['blocks']:>4}  " + "  ".join(f"{x:>13}" for x in cells)
                 + f"  {mname.get(row['auto'][direction], '?')}")
    bcols = ["loop", "kernel@8", "dma", "staged", "auto"]
    emit("BIDI region blk  " + "  ".join(f"{c:>13}" for c in bcols))
    for row in full_rows:
        cells = []
        for c in bcols:
            p = row.get(f"bidi:{c}")
            cells.append(f"{p['gbs']:5.1f} ({100 * p['ratio']:3.0f}%)" if p else f"{'-':>13}")
        emit(f"     {fmt_size(row['region']):>6} {row['blocks']:>4}  " + "  ".join(f"{x:>13}" for x in cells))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_transfer.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(args.out, "bench_transfer.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
