"""Many engine threads offloading and onboarding random blocks through one kvbm-workers, for a fixed
number of operations (bounded in time); invariants and bytes checked at the end, figures printed.

Every block's content is a pure function of its hash, so any onboarded block can be checked without
bookkeeping; each thread owns a disjoint slice of the device blocks."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from kvbm.errors import TransferError
from kvbm.pools import Tier
from tests.support.pipeline_harness import wait_for

pytestmark = pytest.mark.stress

THREADS = 8
OPS_PER_THREAD = 300
TIME_BUDGET_S = 60.0


def content(h: int, shape) -> np.ndarray:
    return np.random.default_rng(int(h)).integers(0, 256, size=shape, dtype=np.uint8)


def run_stress(pipe, kill_d2h_at: int | None = None) -> dict:
    kv = pipe.kv
    lay = pipe.device_layout
    cfg = lay.config
    shape = (cfg.num_layers, cfg.outer_dim, cfg.region_bytes)
    per_thread = lay.num_blocks // THREADS
    known: list[int] = []
    known_lock = threading.Lock()
    figures = dict(offloads=0, onboards=0, moved=0, held=0, loaded=0, verified=0, mismatches=0, failed=0,
                   bytes=0, latency=[])
    fig_lock = threading.Lock()
    errors: list[BaseException] = []
    ops_done = [0]
    deadline = time.monotonic() + TIME_BUDGET_S
    layers = pipe._regions().layers  # [outer, blocks, bytes] per layer

    def write(blocks, hashes):
        for b, h in zip(blocks, hashes):
            kvb = content(h, shape)
            for layer in range(cfg.num_layers):
                layers[layer][:, b, :] = kvb[layer]

    def read(b):
        return np.stack([layers[layer][:, b, :] for layer in range(cfg.num_layers)])

    def worker(tid: int) -> None:
        rng = np.random.default_rng(1000 + tid)
        mine = np.arange(tid * per_thread, (tid + 1) * per_thread)
        try:
            for _ in range(OPS_PER_THREAD):
                if time.monotonic() > deadline:
                    break
                n = int(rng.integers(1, 33))
                blocks = rng.choice(mine, size=n, replace=False)
                t0 = time.perf_counter()
                with known_lock:
                    pool = list(known)
                if rng.random() < 0.5 or len(pool) < 64:
                    reuse = int(rng.integers(0, min(n, len(pool)) + 1)) if pool else 0
                    hashes = [int(h) for h in rng.integers(1, 2**63, size=n - reuse)]
                    hashes += [pool[i] for i in rng.integers(0, len(pool), size=reuse)] if reuse else []
                    write(blocks, hashes)
                    try:
                        res = kv.offload(blocks, np.array(hashes, dtype=np.uint64),
                                         priority=int(rng.integers(0, 3))).result(30).value
                    except TransferError:
                        with fig_lock:
                            figures["failed"] += 1
                        continue
                    with known_lock:
                        known.extend(hashes[:n - reuse])
                    with fig_lock:
                        figures["offloads"] += 1
                        figures["moved"] += res.moved
                        figures["held"] += res.held
                        figures["bytes"] += res.bytes
                else:
                    recent = pool[-384:]  # most of these are still in G2 (512 blocks, evicting)
                    hashes = [recent[i] for i in rng.integers(0, len(recent), size=n)]
                    pipe_blocks = blocks
                    for b in pipe_blocks:
                        for layer in range(cfg.num_layers):
                            layers[layer][:, b, :] = 0xA5
                    try:
                        fut = kv.onboard(np.array(hashes, dtype=np.uint64), pipe_blocks,
                                         priority=int(rng.integers(0, 3)))
                        res = fut.result(30).value
                    except TransferError:
                        with fig_lock:
                            figures["failed"] += 1
                        continue
                    bad = 0
                    for i in range(res.loaded):
                        if not np.array_equal(read(pipe_blocks[i]), content(hashes[i], shape)):
                            bad += 1
                    with fig_lock:
                        figures["onboards"] += 1
                        figures["loaded"] += res.loaded
                        figures["verified"] += res.loaded
                        figures["mismatches"] += bad
                        figures["bytes"] += res.bytes
                with fig_lock:
                    figures["latency"].append(time.perf_counter() - t0)
                    ops_done[0] += 1
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    if kill_d2h_at is not None:
        wait_for(lambda: ops_done[0] >= kill_d2h_at, TIME_BUDGET_S, f"{kill_d2h_at} operations")
        os.kill(pipe.worker_pids()["d2h"], signal.SIGKILL)
    for t in threads:
        t.join(max(1.0, deadline + 30 - time.monotonic()))
        assert not t.is_alive(), "a stress thread is stuck past its deadline"
    figures["seconds"] = time.perf_counter() - t_start
    assert not errors, errors[0]
    return figures


def check_end_state(pipe, figures: dict) -> None:
    kv = pipe.kv
    reg = kv.pool(Tier.G2).registry
    reg.check_invariants()
    assert reg.num_active == 0, "leaked host block references"
    assert reg.num_free + reg.num_inactive == reg.num_blocks
    tm = kv.transfers
    wait_for(lambda: tm.inflight_bytes == 0, 10, "in-flight bytes back to 0")
    assert figures["mismatches"] == 0
    lat = np.array(figures["latency"]) * 1e3
    print(f"\nstress: {THREADS} threads, {len(lat)} ops in {figures['seconds']:.1f} s; {figures['offloads']} offloads "
          f"({figures['moved']} moved, {figures['held']} already held), {figures['onboards']} onboards "
          f"({figures['loaded']} blocks loaded and verified), {figures['failed']} failed; "
          f"{figures['bytes'] / 1e6:.1f} MB, {figures['bytes'] / 1e9 / figures['seconds']:.2f} GB/s; "
          f"op latency p50 {np.percentile(lat, 50):.1f} ms p99 {np.percentile(lat, 99):.1f} ms; "
          f"G2 {reg.num_inactive}/{reg.num_blocks} blocks held; transfer stats {tm.stats()}")


def test_many_threads_offload_and_onboard(make_pipeline):
    pipe = make_pipeline(device_blocks=THREADS * 128, host_blocks=512, max_batch_blocks=16,
                         max_inflight_bytes=64 * 16384)
    figures = run_stress(pipe)
    assert figures["failed"] == 0
    assert figures["offloads"] > 0 and figures["onboards"] > 0 and figures["loaded"] > 0
    check_end_state(pipe, figures)


def test_many_threads_with_a_worker_killed(make_pipeline):
    pipe = make_pipeline(device_blocks=THREADS * 128, host_blocks=512, max_batch_blocks=16)
    figures = run_stress(pipe, kill_d2h_at=OPS_PER_THREAD * THREADS // 3)
    check_end_state(pipe, figures)
    assert pipe.status()["workers"]["d2h"]["restarts"] == 1
