"""`python -m kvbm.demo`: the README's main job. kvbm-workers plus a small engine-like driver,
through the whole pipeline (CPU mode when there is no GPU).

What the driver does, per request (requests share system-prompt prefixes):
  0. the request waits in a queue of --queue requests first; while it waits, kv.hint_waiting
     keeps the cached blocks it will read from being evicted early (kv.hint_done when it is served)
  1. hash the token blocks (kvbm.hashing: sequence hashes chained over the prefix)
  2. match the prefix in G1 (the device pool) -> reuse those blocks
  3. match the next stretch in G2 (the host pool) and then G3 (the disk tier, files under the
     demo's temp dir; --disk-blocks 0: none) -> allocate device blocks (possibly evicting old ones:
     those bytes are wiped first) and onboard them, one future for both tiers, waiting layer by
     layer as a model would. G3 holds what G2 evicted (its victim cache), when reading it beats
     recomputing it (the load rule)
  4. "prefill" the rest: KV computed from the block's sequence hash (so any block's right bytes are
     known), register everything in G1
  5. verify every block of the request byte for byte against the recomputed KV
  6. offload the request's blocks to G2, gated on the request's iteration (dedup: blocks G2 already
     holds move nothing); the device blocks are released once their offload has landed
and at the end prints counts, hit ratios per tier (G3's too) and GB/s, and shuts everything down.

`--engines N` (N > 1): N engine processes (data-parallel replicas of one model) against one
kvbm-workers that the demo starts first, sharing its G2 and its registry (kvbm.shared_g2: one
namespace, the same layout and salt). Each serves its own requests over the same shared prompts;
a block one engine offloaded is onboarded by another: those are the cross-engine hits. With G3
(the default) every engine writes its G2 victims to, and reads from, the instance's one store
through one slot table (kvbm.shared_g3).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import deque

import numpy as np

import kvbm
from kvbm.hashing import hash_token_blocks
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.pools import Tier
from kvbm.transfer.scheduler import Gate

DEMO_LAYOUT = LayoutConfig(num_layers=8, outer_dim=2, page_size=16, inner_dim=128, dtype="bfloat16")


class Model:
    """KV of a block as a pure function of its sequence hash: what recomputing it would give."""

    def __init__(self, layout: BlockLayout, tensors: list, device: str) -> None:
        self.layout = layout
        self.tensors = tensors
        self.device = device
        cfg = layout.config
        self.shape = (cfg.num_layers, cfg.outer_dim, cfg.region_bytes)

    def kv_of(self, seq_hash: int) -> np.ndarray:
        return np.random.default_rng(int(seq_hash)).integers(0, 256, size=self.shape, dtype=np.uint8)

    def _layer_view(self, layer: int):
        cfg, lay = self.layout.config, self.layout
        return self.tensors[layer].view(cfg.outer_dim, lay.num_blocks, cfg.region_bytes)  # OUTER_MAJOR

    def write(self, blocks, hashes) -> None:
        import torch
        if len(blocks) == 0:
            return
        kv = np.stack([self.kv_of(h) for h in hashes])          # [n, layers, outer, bytes]
        src = torch.from_numpy(kv).to(self.device)
        idx = torch.as_tensor(np.asarray(blocks), device=self.device)
        for layer in range(self.shape[0]):
            self._layer_view(layer)[:, idx, :] = src[:, layer].transpose(0, 1)

    def sync(self) -> None:
        if self.device != "cpu":
            import torch
            torch.cuda.synchronize()

    def wipe(self, blocks) -> None:
        import torch
        idx = torch.as_tensor(np.asarray(blocks, dtype=np.int64), device=self.device)
        for layer in range(self.shape[0]):
            self._layer_view(layer)[:, idx, :] = 0xA5

    def read(self, blocks) -> np.ndarray:
        import torch
        idx = torch.as_tensor(np.asarray(blocks, dtype=np.int64), device=self.device)
        out = [self._layer_view(layer)[:, idx, :].transpose(0, 1).cpu().numpy() for layer in range(self.shape[0])]
        return np.stack(out, axis=1)                             # [n, layers, outer, bytes]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvbm.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--prompts", type=int, default=8, help="distinct shared system prompts")
    ap.add_argument("--prompt-blocks", type=int, default=24)
    ap.add_argument("--device-blocks", type=int, default=160, help="G1 size (small, so that it evicts)")
    ap.add_argument("--host-blocks", type=int, default=256, help="G2 size (small, so that it evicts to G3)")
    ap.add_argument("--disk-blocks", type=int, default=4096, help="G3 size, files under the temp dir (0: no G3)")
    ap.add_argument("--queue", type=int, default=4, help="requests waiting ahead of the one served (hinted)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cpu", action="store_true", help="CPU mode even with a GPU")
    ap.add_argument("--engines", type=int, default=1,
                    help="engine processes sharing one kvbm-workers and its G2 (> 1: no G3)")
    args = ap.parse_args(argv)
    for name in ("requests", "prompts", "prompt_blocks", "device_blocks", "host_blocks", "engines"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.disk_blocks < 0:
        ap.error("--disk-blocks must be >= 0")
    if args.queue < 0:
        ap.error("--queue must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engines > 1:
        return main_engines(args)
    rng = np.random.default_rng(args.seed)
    cuda = kvbm.cuda_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    page = DEMO_LAYOUT.page_size
    print(f"kvbm demo: {DEMO_LAYOUT.num_layers} layers x K/V x {page}-token pages x {DEMO_LAYOUT.inner_dim} "
          f"{DEMO_LAYOUT.dtype} ({DEMO_LAYOUT.block_bytes // 1024} KiB per block); G1 {args.device_blocks} blocks "
          f"({device}), G2 {args.host_blocks} blocks, G3 {args.disk_blocks or 'none'}"
          f"{' blocks (disk)' if args.disk_blocks else ''}; {args.requests} requests over {args.prompts} "
          f"shared prompts")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvbm-demo-") as rundir:
        disk = dict(disk_path=os.path.join(rundir, "g3"), disk_blocks=args.disk_blocks) if args.disk_blocks else {}
        config = kvbm.KvbmConfig(layout=DEMO_LAYOUT, device_blocks=args.device_blocks, host_blocks=args.host_blocks,
                                 runtime_dir=rundir, force_cpu=not cuda, max_batch_blocks=64, **disk)
        with kvbm.KvBlockManager(config) as kv:
            layout = BlockLayout(DEMO_LAYOUT, LayoutType.LAYER_SEPARATE, args.device_blocks)
            tensors = kv.create_device_tensors(layout, device=device)
            kv.register_device_tensors(tensors, layout)
            print(f"kvbm demo: kvbm-workers up and device tensors registered in {time.perf_counter() - t_start:.2f} s "
                  f"({'CUDA IPC' if cuda else 'shared-memory emulated device'})")
            model = Model(layout, tensors, device)
            stats = run(kv, model, args, rng)
            g2 = kv.pool(Tier.G2).snapshot()
            disk_stats = kv.stats().get("disk")
            from kvbm.cli import ask_status
            status = ask_status(config)
            workers = status["workers"]
    wall = time.perf_counter() - t_start
    total = stats["blocks"]
    print(f"kvbm demo: {stats['requests']} requests, {total} blocks: {stats['g1_hits']} reused in G1, "
          f"{stats['g2_hits']} onboarded from G2, {stats['g3_hits']} onboarded from G3, {stats['computed']} computed")
    hits = stats["g1_hits"] + stats["g2_hits"] + stats["g3_hits"]
    print(f"kvbm demo: prefix hit ratio {hits / max(total, 1):.1%} (G1 {stats['g1_hits'] / max(total, 1):.1%}, "
          f"G2 {stats['g2_hits'] / max(total, 1):.1%}, G3 {stats['g3_hits'] / max(total, 1):.1%})")
    print(f"kvbm demo: offloaded {stats['moved']} blocks to G2 ({stats['held']} already held: not copied), "
          f"{stats['off_bytes'] / 1e6:.1f} MB at {_rate(stats['off_bytes'], stats['off_s'])}; onboarded "
          f"{stats['on_bytes'] / 1e6:.1f} MB at {_rate(stats['on_bytes'], stats['on_s'])} (per-transfer wall time)")
    for label in ("d2h", "h2d") + (("h2disk",) if args.disk_blocks else ()):
        w = workers[label]
        print(f"kvbm demo: {label} worker (pid {w['pid']}, gen {w['gen']}): {w['requests']} requests, "
              f"{w['bytes'] / 1e6:.1f} MB, copy rate {_rate(w['bytes'], w['busy_s'])}")
    print(f"kvbm demo: queue hint: up to {stats['max_waiting']} requests waited (hinted) while one was served; "
          f"{stats['hinted']} block hashes were hinted while waiting")
    print(f"kvbm demo: G2 holds {g2['inactive'] + g2['active']} of {g2['num_blocks']} blocks, evicted {g2['evicted']}; "
          f"{stats['wiped']} reused device blocks were wiped before use")
    if disk_stats is not None:
        g3, rule = status["tiers"]["g3"], disk_stats["load_rule"]
        print(f"kvbm demo: G3 holds {g3.get('live', 0)} of {g3.get('slots', 0)} blocks on disk: "
              f"{disk_stats['written']} G2 victims written ({disk_stats['victims_lost']} evicted before they "
              f"could be), "
              f"{disk_stats['loaded']} blocks onboarded from it in {disk_stats['loads']} loads (read path "
              f"{', '.join(disk_stats['read_paths']) or 'none'}; GDS {g3.get('gds', '?')}), "
              f"{g3.get('checksum_failures', 0)} checksum failures")
        print(f"kvbm demo: load rule: G3 read at {rule['read_bytes_per_s'] / 1e9:.2f} GB/s "
              f"({rule['measured_reads']} reads measured) = {rule['load_s_per_block'] * 1e6:.0f} us per block, "
              f"recompute at {rule['prefill_tokens_per_s']:.0f} tokens/s = {rule['recompute_s_per_block'] * 1e6:.0f} "
              f"us per block: {rule['offered']} G3 prefixes offered, {rule['declined']} declined")
    print(f"kvbm demo: verified {stats['verified']} blocks byte for byte, {stats['mismatches']} mismatches; "
          f"finished in {wall:.1f} s, everything shut down")
    ok = stats["mismatches"] == 0 and stats["g2_hits"] > 0 and (stats["g3_hits"] > 0 or not args.disk_blocks)
    return 0 if ok else 1


def main_engines(args: argparse.Namespace) -> int:
    """--engines N: kvbm-workers first (with the demo's layout: the shared G2 registry), then N
    engine processes; each prints its own line, engine 0 the shared registry's view."""
    import multiprocessing as mp

    from kvbm.transfer.launcher import WorkersProcess
    cuda = kvbm.cuda_available() and not args.cpu
    print(f"kvbm demo: {args.engines} engines (processes) share one kvbm-workers: G2 {args.host_blocks} blocks and "
          f"its registry; G1 {args.device_blocks} blocks each ({'cuda' if cuda else 'cpu'}); {args.requests} requests "
          f"each over {args.prompts} shared prompts; G3 {args.disk_blocks or 'none'}"
          f"{' blocks (disk), one slot table for every engine' if args.disk_blocks else ''}")
    t_start = time.perf_counter()
    results: dict[int, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="kvbm-demo-") as rundir:
        disk = dict(disk_path=os.path.join(rundir, "g3"), disk_blocks=args.disk_blocks) if args.disk_blocks else {}
        config = kvbm.KvbmConfig(layout=DEMO_LAYOUT, device_blocks=args.device_blocks, host_blocks=args.host_blocks,
                                 runtime_dir=rundir, force_cpu=not cuda, max_batch_blocks=64, **disk)
        workers = WorkersProcess(config, args.host_blocks * DEMO_LAYOUT.block_stride, layout=DEMO_LAYOUT)
        workers.start(60)
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(args.engines), ctx.Queue()
        procs = [ctx.Process(target=_engine_main, args=(i, args, config, cuda, barrier, out), daemon=True)
                 for i in range(args.engines)]
        try:
            for proc in procs:
                proc.start()
            deadline = time.monotonic() + 600
            while len(results) < args.engines and time.monotonic() < deadline:
                if not any(p.is_alive() for p in procs) and out.empty():
                    break
                try:
                    i, stats, status = out.get(timeout=1.0)
                except Exception:   # noqa: BLE001 - queue.Empty: check the processes again
                    continue
                results[i] = (stats, status)
            for proc in procs:
                proc.join(60)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            workers.stop()
    wall = time.perf_counter() - t_start
    ok = len(results) == args.engines
    cross = verified = mismatches = 0
    for i in range(args.engines):
        if i not in results:
            print(f"kvbm demo: engine {i} did not report")
            continue
        stats, _ = results[i]
        if "error" in stats:
            print(f"kvbm demo: engine {i} failed: {stats['error']}")
            ok = False
            continue
        cross += stats["cross_hits"]
        verified += stats["verified"]
        mismatches += stats["mismatches"]
        total = max(stats["blocks"], 1)
        print(f"kvbm demo: engine {i}: {stats['requests']} requests, {stats['blocks']} blocks: {stats['g1_hits']} "
              f"reused in G1, {stats['g2_hits']} onboarded from G2 and {stats['g3_hits']} from G3 "
              f"({stats['cross_hits']} of them offloaded by another engine), {stats['computed']} computed; "
              f"G2 hit ratio {stats['g2_hits'] / total:.1%}")
    status = results.get(0, ({}, None))[1]
    reg = (status or {}).get("tiers", {}).get("g2", {}).get("registry") or {}
    for ns in reg.get("namespaces", []):
        print(f"kvbm demo: shared G2 namespace {ns['namespace']}: {ns['engines']} engines, quota {ns['num_blocks']} "
              f"blocks, holds {ns['inactive'] + ns['active']}; matched {ns['match_hits']} of "
              f"{ns['match_queries']} hashes asked")
    for e in reg.get("engines", []):
        print(f"kvbm demo: shared G2 engine {e['engine_id']} (pid {e['pid']}): {e['registered']} blocks registered "
              f"(+{e['deduplicated']} another engine had), {e['match_hits']} matched")
    reg3 = (status or {}).get("tiers", {}).get("g3", {}).get("registry") or {}
    for ns in reg3.get("namespaces", []):
        print(f"kvbm demo: shared G3 slot table: {ns['engines']} engines, {ns['inactive'] + ns['active']} of "
              f"{ns['num_blocks']} slots hold blocks, written by " + ", ".join(
                  f"{e['engine_id']} {e['registered']}" for e in reg3.get("engines", [])))
    print(f"kvbm demo: {cross} cross-engine hits: blocks onboarded by an engine that never offloaded them")
    print(f"kvbm demo: verified {verified} blocks byte for byte, {mismatches} mismatches; finished in {wall:.1f} s, "
          f"everything shut down")
    return 0 if ok and mismatches == 0 and cross > 0 else 1


def _engine_main(index: int, args: argparse.Namespace, config: kvbm.KvbmConfig, cuda: bool, barrier, out) -> None:
    """One engine process of --engines: its requests through the shared kvbm-workers; engine 0
    asks for the status once every engine is done (their registry slots still live)."""
    status = None
    try:
        with kvbm.KvBlockManager(config) as kv:
            layout = BlockLayout(DEMO_LAYOUT, LayoutType.LAYER_SEPARATE, args.device_blocks)
            device = "cuda" if cuda else "cpu"
            tensors = kv.create_device_tensors(layout, device=device)
            kv.register_device_tensors(tensors, layout, start=False)
            stats = run(kv, Model(layout, tensors, device), args, np.random.default_rng(args.seed), engine=index)
            barrier.wait(300)
            if index == 0:
                from kvbm.cli import ask_status
                status = ask_status(config)
            barrier.wait(300)
    except BaseException as err:   # noqa: BLE001 - reported to the parent, which prints it
        out.put((index, {"error": f"{type(err).__name__}: {err}"}, None))
        barrier.abort()
        return
    out.put((index, stats, status))


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e9 / seconds:.2f} GB/s" if seconds > 0 else "n/a"


def run(kv: kvbm.KvBlockManager, model: Model, args: argparse.Namespace, rng: np.random.Generator,
        engine: int = 0) -> dict:
    """`engine`: which of --engines this is: the prompts are every engine's (drawn first from
    `rng`), the requests over them its own (engine 0 keeps drawing from `rng`)."""
    page = DEMO_LAYOUT.page_size
    g1 = kv.pool(Tier.G1)
    g2 = kv.pool(Tier.G2)
    prompts = [rng.integers(0, 32000, size=args.prompt_blocks * page, dtype=np.uint32) for _ in range(args.prompts)]
    if engine:
        rng = np.random.default_rng([args.seed, engine])
    popularity = rng.zipf(1.3, size=args.requests) % args.prompts
    stats = dict(requests=0, blocks=0, g1_hits=0, g2_hits=0, g3_hits=0, computed=0, moved=0, held=0, verified=0,
                 mismatches=0, wiped=0, off_bytes=0, off_s=0.0, on_bytes=0, on_s=0.0, hinted=0, max_waiting=0,
                 cross_hits=0)
    offered: set[int] = set()   # hashes this engine offloaded: a G2 hit outside it is another engine's block
    queue: deque[tuple[int, np.ndarray]] = deque()    # (request id, its sequence hashes), oldest first

    def arrive(it: int) -> None:
        prompt = prompts[popularity[it]]
        cut = int(rng.integers(args.prompt_blocks // 2, args.prompt_blocks + 1)) * page
        suffix = rng.integers(0, 32000, size=int(rng.integers(2, 9)) * page, dtype=np.uint32)
        _, hashes = hash_token_blocks(np.concatenate([prompt[:cut], suffix]), page, salt="demo-model")
        if args.queue:                                    # --queue 0: served on arrival, never waits
            stats["hinted"] += kv.hint_waiting(it, hashes)
        queue.append((it, hashes))
    pending: list[tuple] = []   # (offload future, G1 blocks to release once it landed)

    def settle(wait: bool) -> None:
        keep = []
        for fut, blocks in pending:
            if wait or fut.done():
                res = fut.result(60).value
                stats["moved"] += res.moved
                stats["held"] += res.held
                stats["off_bytes"] += res.bytes
                stats["off_s"] += fut.result().seconds if res.bytes else 0.0
                g1.release(blocks)
            else:
                keep.append((fut, blocks))
        pending[:] = keep

    for it in range(min(args.queue, args.requests)):
        arrive(it)
    for it in range(args.requests):
        settle(wait=False)
        if it + args.queue < args.requests:
            arrive(it + args.queue)
        served, hashes = queue.popleft()
        if args.queue:
            kv.hint_done(served)                              # scheduled: no longer waiting
        stats["max_waiting"] = max(stats["max_waiting"], kv.num_waiting)
        n = len(hashes)

        hit1 = g1.match(hashes)                               # acquired
        k1 = len(hit1)
        rest = hashes[k1:]
        k2 = kv.match(rest).onboardable                       # G2's prefix, then the run G3 holds
        need = n - k1
        new = g1.allocate(need)
        while new is None and pending:                        # G1 full of blocks still being offloaded
            settle(wait=True)
            new = g1.allocate(need)
        if new is None:
            g1.release(hit1)
            continue
        model.wipe(new)                                       # whatever an evicted block held is gone
        stats["wiped"] += need
        if k2:
            fut = kv.onboard(rest[:k2], new[:k2])
            for layer in range(DEMO_LAYOUT.num_layers):       # a model would run layer l right here
                fut.wait_layer(layer, timeout=60)
            res = fut.result(60)
            from_disk = res.value.from_disk
            stats["g2_hits"] += res.value.loaded - from_disk
            stats["cross_hits"] += sum(1 for h in rest[:res.value.loaded].tolist() if h not in offered)
            stats["g3_hits"] += from_disk
            stats["on_bytes"] += res.value.bytes
            stats["on_s"] += res.seconds
            k2 = res.value.loaded
        model.write(new[k2:], rest[k2:])                      # prefill of the blocks nobody held
        g1.complete(new)
        canonical = g1.register(new, rest)
        blocks = np.concatenate([hit1, canonical])

        got = model.read(blocks)
        for i, h in enumerate(hashes):
            stats["verified"] += 1
            if not np.array_equal(got[i], model.kv_of(h)):
                stats["mismatches"] += 1
        stats["requests"] += 1
        stats["blocks"] += n
        stats["g1_hits"] += k1
        stats["computed"] += n - k1 - k2

        offered.update(hashes.tolist())
        fut = kv.offload(blocks, hashes, gate=Gate(iteration=it))
        model.sync()                                          # the forward pass's writes are done...
        kv.scheduler.reached(iteration=it)                    # ...so this iteration's offloads may read
        pending.append((fut, blocks))
    settle(wait=True)
    if kv.num_waiting:
        raise RuntimeError(f"{kv.num_waiting} requests still hinted as waiting after the run")
    g1.registry.check_invariants()
    g2.registry.check_invariants()
    return stats


if __name__ == "__main__":
    sys.exit(main())
