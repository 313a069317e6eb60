"""The whole pipeline in CPU mode, with real processes and sockets: offload -> poison -> onboard is
byte-exact, dedup moves nothing, a killed path worker fails what it held and comes back, gates and
layer progress, backpressure, disk paths answered "no disk tier" when there is none."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from kvbm.errors import BackpressureError, LayoutError, TransferError
from kvbm.layout import InnerOrder
from kvbm.transfer import manager as M
from kvbm.transfer.scheduler import Gate
from kvbm.wire import protocol as P
from tests.support.pipeline_harness import wait_for

DEADLINE = 30.0


def random_hashes(rng, n):
    return rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64)


@pytest.mark.parametrize("order", [InnerOrder.OUTER_MAJOR, InnerOrder.BLOCK_MAJOR])
def test_offload_poison_onboard_is_byte_exact(make_pipeline, rng, order):
    pipe = make_pipeline(device_blocks=4096, host_blocks=4096, order=order, max_batch_blocks=128)
    kv = pipe.kv
    n = 3000
    src = rng.permutation(4096)[:n]
    hashes = random_hashes(rng, n)
    pipe.fill_random(src, rng)
    expected = pipe.snapshot(src)

    futures = [kv.offload(src[i:i + 500], hashes[i:i + 500]) for i in range(0, n, 500)]
    results = [f.result(DEADLINE).value for f in futures]
    assert sum(r.moved for r in results) == n and sum(r.held for r in results) == 0
    assert kv.pool(2).registry.num_inactive == n

    pipe.poison()
    dst = rng.permutation(4096)[:n]  # somewhere else entirely
    fut = kv.onboard(hashes, dst)
    res = fut.result(DEADLINE).value
    assert (res.requested, res.loaded) == (n, n)
    assert fut.layers_ready == pipe.device_layout.config.num_layers
    got = pipe.snapshot(dst)
    assert np.array_equal(got, expected)
    untouched = np.setdiff1d(np.arange(4096), dst)
    assert (pipe.snapshot(untouched[:64]) == 0xA5).all()
    kv.pool(2).registry.check_invariants()
    assert kv.pool(2).registry.num_active == 0  # onboard released what it acquired


def test_dedup_moves_nothing_already_held(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=512, host_blocks=1024)
    kv = pipe.kv
    blocks = np.arange(200)
    hashes = random_hashes(rng, 200)
    pipe.fill_random(blocks, rng)
    first = kv.offload(blocks, hashes).result(DEADLINE).value
    assert (first.moved, first.held) == (200, 0)
    again = kv.offload(blocks, hashes).result(DEADLINE).value
    assert (again.moved, again.held, again.bytes) == (0, 200, 0)
    more = random_hashes(rng, 50)
    mixed = kv.offload(np.arange(150, 250), np.concatenate([hashes[150:], more])).result(DEADLINE).value
    assert (mixed.moved, mixed.held) == (50, 50)
    repeated = kv.offload([300, 301, 302], [more[0] + 7, more[0] + 7, more[0] + 7]).result(DEADLINE).value
    assert (repeated.requested, repeated.moved) == (1, 1)
    assert kv.pool(2).registry.num_registered == 251
    kv.pool(2).registry.check_invariants()


def test_held_blocks_evicted_to_make_room_are_reported_dropped(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=64, host_blocks=4)
    kv = pipe.kv
    hashes = random_hashes(rng, 5)
    pipe.fill_random(np.arange(5), rng)
    kv.offload([0, 1], hashes[:2]).result(DEADLINE)       # G2: 2 held (inactive), 2 free
    res = kv.offload(np.arange(5), hashes).result(DEADLINE).value
    # Room for 3 new blocks evicts the least recent held one (hashes[0]): it is not held any more.
    assert (res.requested, res.moved, res.held, res.dropped) == (5, 3, 1, 1)
    assert (kv.pool(2).lookup(hashes) >= 0).tolist() == [False, True, True, True, True]
    kv.pool(2).registry.check_invariants()


def test_prefix_onboard_stops_at_first_miss(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=256, host_blocks=256)
    kv = pipe.kv
    hashes = random_hashes(rng, 10)
    pipe.fill_random(np.arange(10), rng)
    expected = pipe.snapshot(np.arange(6))
    kv.offload(np.arange(6), hashes[:6]).result(DEADLINE)
    pipe.poison()
    res = kv.onboard(hashes, np.arange(100, 110)).result(DEADLINE).value
    assert (res.requested, res.loaded) == (10, 6)
    assert np.array_equal(pipe.snapshot(np.arange(100, 106)), expected)
    assert (pipe.snapshot(np.arange(106, 110)) == 0xA5).all()
    miss = kv.onboard(random_hashes(rng, 3), [0, 1, 2]).result(DEADLINE).value
    assert miss.loaded == 0


def test_out_of_host_capacity_is_a_short_count(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=256, host_blocks=64)
    kv = pipe.kv
    hashes = random_hashes(rng, 100)
    res = kv.offload(np.arange(100), hashes).result(DEADLINE).value
    assert (res.moved, res.dropped) == (64, 36)
    kv.pool(2).registry.check_invariants()


def test_worker_killed_mid_transfer_fails_cleanly_and_restarts(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=1024, host_blocks=1024, worker_delay_ms=400, max_batch_blocks=64)
    kv = pipe.kv
    pids = pipe.worker_pids()
    host = kv.pool(2).registry
    blocks = np.arange(512)
    hashes = random_hashes(rng, 512)
    pipe.fill_random(blocks, rng)
    expected = pipe.snapshot(blocks)

    fut = kv.offload(blocks, hashes)  # 8 requests of 64 blocks, 400 ms each at the worker
    tm = kv.transfers
    # Sent is enough: whether the worker has begun copying it or not, it dies holding it.
    wait_for(lambda: tm._paths[P.Path.D2H].outstanding, 10, "a D2H request in flight at the worker")
    os.kill(pids["d2h"], signal.SIGKILL)
    with pytest.raises(TransferError, match=r"d2h worker generation 1 .*died"):
        fut.result(DEADLINE)
    # Nothing was registered, every allocated host block went back to the free list.
    assert (host.lookup(hashes) == -1).all()
    assert host.num_free == 1024 and host.num_registered == 0
    host.check_invariants()

    new = wait_for(lambda: (p := pipe.worker_pids())["d2h"] != pids["d2h"] and p, DEADLINE, "a new d2h worker")
    assert new["h2d"] == pids["h2d"]
    assert pipe.status()["workers"]["d2h"]["restarts"] == 1
    # Later transfers succeed, byte-exact.
    res = kv.offload(blocks, hashes).result(DEADLINE).value
    assert res.moved == 512
    pipe.poison()
    assert kv.onboard(hashes, blocks).result(DEADLINE).value.loaded == 512
    assert np.array_equal(pipe.snapshot(blocks), expected)
    assert kv.transfers.stats()["generations"]["d2h"] == 2


def test_onboard_worker_killed_reports_failure_not_loaded(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=256, host_blocks=256, worker_delay_ms=400)
    kv = pipe.kv
    hashes = random_hashes(rng, 32)
    pipe.fill_random(np.arange(32), rng)
    kv.offload(np.arange(32), hashes).result(DEADLINE)
    pids = pipe.worker_pids()
    fut = kv.onboard(hashes, np.arange(100, 132))
    wait_for(lambda: kv.transfers._paths[P.Path.H2D].outstanding, 10, "an H2D request in flight")
    os.kill(pids["h2d"], signal.SIGKILL)
    with pytest.raises(TransferError, match="h2d worker generation 1"):
        fut.result(DEADLINE)
    with pytest.raises(TransferError):
        fut.wait_layer(0, timeout=1)
    assert kv.pool(2).registry.num_active == 0  # the acquired host blocks were released
    assert kv.onboard(hashes, np.arange(100, 132)).result(DEADLINE).value.loaded == 32


def test_gates_hold_until_reached_and_layers_report(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=256, host_blocks=256)
    kv = pipe.kv
    hashes = random_hashes(rng, 16)
    pipe.fill_random(np.arange(16), rng)
    gated = kv.offload(np.arange(16), hashes, gate=Gate(iteration=3))
    # Held or not is decided synchronously (submit, reached); done() could not tell: the copy is async.
    held = lambda: kv.transfers.stats()["held"]  # noqa: E731
    assert held() == 1
    kv.scheduler.reached(iteration=2)
    assert held() == 1
    kv.scheduler.reached(layer=1)
    assert held() == 1
    kv.scheduler.reached(iteration=3)
    assert held() == 0
    assert gated.result(DEADLINE).value.moved == 16

    layer_gated = kv.onboard(hashes, np.arange(50, 66), gate=Gate(layer=2))
    kv.scheduler.reached(layer=1)
    assert held() == 1
    seen = []
    layer_gated.add_layer_callback(seen.append)
    kv.scheduler.reached(layer=2)
    assert held() == 0
    assert layer_gated.wait_layer(3, timeout=DEADLINE)
    layer_gated.result(DEADLINE)
    assert seen == [0, 1, 2, 3]

    # A layer gate held when its iteration ends opens then, not at that layer of a later iteration.
    across = kv.onboard(hashes, np.arange(70, 86), gate=Gate(layer=3))
    assert held() == 1
    kv.scheduler.reached(iteration=4)
    kv.scheduler.reached(iteration=5)
    assert held() == 0
    assert across.result(DEADLINE).value.loaded == 16


def test_backpressure_blocks_then_raises(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=256, host_blocks=256, worker_delay_ms=300,
                         max_inflight_bytes=40 * 16384)  # 40 blocks of 16 KiB
    kv = pipe.kv
    first = kv.offload(np.arange(32), random_hashes(rng, 32))
    with pytest.raises(BackpressureError, match="exceeds the bound"):
        kv.offload(np.arange(32, 64), random_hashes(rng, 32), block=False)
    t0 = time.monotonic()
    with pytest.raises(BackpressureError, match="waited 0.1 s"):
        kv.offload(np.arange(32, 64), random_hashes(rng, 32), timeout=0.1)
    assert time.monotonic() - t0 < 2
    blocked = kv.offload(np.arange(64, 96), random_hashes(rng, 32))  # waits for `first`, then runs
    assert first.result(DEADLINE).value.moved == 32
    assert blocked.result(DEADLINE).value.moved == 32
    # Refused submissions left no allocated host block behind.
    assert kv.pool(2).registry.num_active == 0 and kv.pool(2).registry.num_inactive == 64


def test_disk_paths_without_a_disk_tier_answer_so(make_pipeline):
    """Without a disk tier (no disk_path), disk paths fail at once, engine side and control socket
    alike (with one, kvbm.workers.disk_worker serves them: tests/integration/test_disk_tier.py)."""
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    tm = pipe.kv.transfers
    fut = tm.submit(P.Path.H2DISK, [1], [2])
    with pytest.raises(TransferError, match="no disk tier"):
        fut.result(5)
    import zmq

    from kvbm.wire.channel import connect_socket, make_context
    ctx = make_context()
    sock = connect_socket(ctx, zmq.DEALER, tm.control_endpoint, pipe.keys)
    try:
        sock.send(P.encode(P.make_xfer(9, "x", 1, P.Path.DISK2H, [0], [0])))
        assert sock.poll(5000)
        reply = P.decode(sock.recv())
        assert (reply["id"], reply["status"], reply["error"]) == (9, P.Status.ERROR, P.NO_DISK_TIER)
    finally:
        sock.close(0)
        ctx.term()


def test_tcp_loopback_transport(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=128, host_blocks=128, transport="tcp", tcp_port=0)
    assert pipe.kv.transfers.control_endpoint.startswith("tcp://127.0.0.1:")
    hashes = random_hashes(rng, 20)
    pipe.fill_random(np.arange(20), rng)
    expected = pipe.snapshot(np.arange(20))
    pipe.kv.offload(np.arange(20), hashes).result(DEADLINE)
    pipe.poison()
    pipe.kv.onboard(hashes, np.arange(20)).result(DEADLINE)
    assert np.array_equal(pipe.snapshot(np.arange(20)), expected)


def test_deadline_kills_a_stuck_worker_and_fails_on_its_death(make_pipeline, rng):
    # Every copy sleeps 3 s; the deadline is 0.5 s: the manager asks the supervisor to replace the
    # worker and fails the transfer only once that generation is dead (no late write can land).
    pipe = make_pipeline(device_blocks=64, host_blocks=64, worker_delay_ms=3000, request_timeout_ms=500)
    kv = pipe.kv
    pids = pipe.worker_pids()
    t0 = time.monotonic()
    fut = kv.offload(np.arange(4), random_hashes(rng, 4))
    with pytest.raises(TransferError, match=r"timed out, then d2h worker generation 1 .*died"):
        fut.result(DEADLINE)
    assert time.monotonic() - t0 < 3.0  # well before the stuck copy would have finished
    assert kv.transfers.stats()["timeouts"] == 1
    assert kv.pool(2).registry.num_free == 64
    wait_for(lambda: pipe.worker_pids()["d2h"] != pids["d2h"], DEADLINE, "a replacement d2h worker")


def test_priorities_overtake_queued_work(make_pipeline, rng):
    """A high-priority offload submitted behind queued low-priority ones is sent before them.

    The D2H worker is gated (SIGSTOP) while the queue is built, so nothing depends on thread
    timing: the engine fills its window of WINDOW wire requests with lows, the rest wait in its
    queue, then the high one joins them; once the worker runs again, the high one takes the first
    free place in the window (the worker may also run it before lows it already holds). The lows
    get distinct priorities below the high one's, so that none are coalesced into one wire
    request (that would change how many fit in the window, not the order under test)."""
    from kvbm.transfer.manager import WINDOW

    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    kv = pipe.kv
    queue = kv.transfers._paths[P.Path.D2H]
    order = []
    d2h = pipe.worker_pids()["d2h"]
    os.kill(d2h, signal.SIGSTOP)
    try:
        low = [kv.offload([i], random_hashes(rng, 1), priority=-1 - i) for i in range(2 * WINDOW)]
        wait_for(lambda: len(queue.outstanding) == WINDOW and len(queue.heap) == WINDOW, DEADLINE,
                 "the window full of lows, the rest queued")
        queued = {id(req.sub.future) for _, _, req in list(queue.heap)}
        high = kv.offload([20], random_hashes(rng, 1), priority=10)
        wait_for(lambda: len(queue.heap) == WINDOW + 1, DEADLINE, "the high offload queued")
        for i, f in enumerate(low):
            f.add_done_callback(lambda _f, i=i: order.append(f"low{i}"))
        high.add_done_callback(lambda _f: order.append("high"))
    finally:
        os.kill(d2h, signal.SIGCONT)
    for f in low + [high]:
        f.result(DEADLINE)
    # At most the lows already at the worker were ahead of it; every low still queued came after it.
    assert len(order) == 2 * WINDOW + 1 and len(queued) == WINDOW
    first = order.index("high")
    assert first <= WINDOW, order
    assert all(order.index(f"low{i}") > first for i, f in enumerate(low) if id(f) in queued), order


def test_engine_connects_to_a_running_kvbm_workers(tmp_path, rng):
    import subprocess
    import sys
    import uuid

    import kvbm
    from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
    from tests.support.pipeline_harness import pid_alive

    inst = f"x{uuid.uuid4().hex[:8]}"
    layout = LayoutConfig(num_layers=2, outer_dim=2, page_size=16, inner_dim=64)
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "--instance-id", inst, "--runtime-dir", str(tmp_path),
                             "--host-size", "4MB", "--force-cpu", "--interval", "0"])
    try:
        config = kvbm.KvbmConfig(instance_id=inst, runtime_dir=str(tmp_path), layout=layout, device_blocks=64,
                                 host_blocks=64, force_cpu=True)
        with kvbm.KvBlockManager(config) as kv:
            dev = BlockLayout(layout, LayoutType.LAYER_SEPARATE, 64)
            tensors = kv.create_device_tensors(dev, device="cpu")
            wait_for(lambda: os.path.exists(tmp_path / f"kvbm-{inst}" / "endpoints.json"), DEADLINE, "kvbm-workers up")
            kv.register_device_tensors(tensors, dev, start=False)
            assert kv.workers_process is None  # connected, did not start its own
            for t in tensors:
                t.copy_(__import__("torch").randint(0, 256, t.shape, dtype=__import__("torch").uint8))
            before = dev.block_bytes_of(tensors, 3)
            kv.offload([3], [42]).result(DEADLINE)
            for t in tensors:
                t.zero_()
            kv.onboard([42], [7]).result(DEADLINE)
            assert dev.block_bytes_of(tensors, 7) == before
        assert proc.poll() is None  # the engine leaving does not stop a kvbm-workers it did not start
        from kvbm.cli import ask_status
        workers = ask_status(config)["workers"]
        assert workers["d2h"]["engines"] == 0 and workers["h2d"]["engines"] == 0  # it unregistered
        # An engine that dies without unregistering: the workers drop its mappings on their own.
        script = (
            "import sys, kvbm; from kvbm.layout import BlockLayout, LayoutConfig, LayoutType\n"
            f"lc = LayoutConfig(2, 2, 16, 64); cfg = kvbm.KvbmConfig(instance_id={inst!r}, "
            f"runtime_dir={str(tmp_path)!r}, layout=lc, device_blocks=64, host_blocks=64, force_cpu=True)\n"
            "kv = kvbm.KvBlockManager(cfg); lay = BlockLayout(lc, LayoutType.LAYER_SEPARATE, 64)\n"
            "kv.register_device_tensors(kv.create_device_tensors(lay, device='cpu'), lay, start=False)\n"
            "print('registered', flush=True); sys.stdin.read()\n")
        eng = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert eng.stdout.readline().strip() == "registered"
            wait_for(lambda: ask_status(config)["workers"]["d2h"]["engines"] == 1, DEADLINE, "the engine registered")
            eng.kill()
            eng.wait(10)
            wait_for(lambda: all(ask_status(config)["workers"][p]["engines"] == 0 for p in ("d2h", "h2d")),
                     DEADLINE, "the dead engine's registration dropped")
            wait_for(lambda: not [n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{inst}-dev-")],
                     DEADLINE, "the dead engine's device segment removed")
        finally:
            if eng.poll() is None:
                eng.kill()
                eng.wait(10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(DEADLINE) == 0
        assert not os.path.exists(tmp_path / f"kvbm-{inst}")
    finally:
        if pid_alive(proc.pid):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_a_burst_of_submissions_wakes_the_io_thread_once(make_pipeline, rng, monkeypatch):
    """Only the first submission queued since the I/O thread last took its list writes the
    eventfd; the rest ride along (and none is lost: all complete once the thread takes them).
    Without lanes: a lane post writes no eventfd, and how many fit the window would depend on how
    fast the worker answers."""
    pipe = make_pipeline(device_blocks=64, host_blocks=64, lanes=False)
    kv, tm = pipe.kv, pipe.kv.transfers
    writes = []
    real_kick = M.eventfd_kick

    def counting_kick(fd):
        if fd == tm._wake_fd:
            writes.append(1)
        real_kick(fd)

    monkeypatch.setattr(M, "eventfd_kick", counting_kick)
    tm._take_incoming = lambda: None          # the I/O thread wakes but leaves the list alone
    futures = [kv.offload([i], random_hashes(rng, 1)) for i in range(10)]
    assert len(writes) == 1
    del tm._take_incoming                     # the real method again
    real_kick(tm._wake_fd)
    assert [f.result(DEADLINE).value.moved for f in futures] == [1] * 10


@pytest.mark.parametrize("salt", ["", "tenant-a"])
def test_one_block_offloads_in_plain_ints_match_the_array_path(make_pipeline, rng, salt, monkeypatch):
    """A one-block offload given as plain ints (or one-element integer arrays) takes
    kvbm.transfer.host_offload's scalar path; it keys, dedups, drops, fails and lands exactly as
    the array path does."""
    pipe = make_pipeline(device_blocks=16, host_blocks=4, salt=salt)
    kv = pipe.kv
    scalar_claims = []
    claim_one = kv._host._claim_one
    monkeypatch.setattr(kv._host, "_claim_one", lambda *a: scalar_claims.append(a) or claim_one(*a))
    hashes = [int(h) for h in random_hashes(rng, 6)]
    pipe.fill_random(list(range(6)), rng)
    expected = pipe.snapshot([0, 1])

    def moved_held_dropped(fut):
        res = fut.result(DEADLINE).value
        return res.requested, res.moved, res.held, res.dropped

    first = kv.offload([0], [hashes[0]])                        # scalar path
    again = kv.offload((0,), (hashes[0],))                      # in flight or held: copies nothing
    assert moved_held_dropped(first) == (1, 1, 0, 0) and moved_held_dropped(again) == (1, 0, 1, 0)
    array_path = kv.offload([np.int64(0)], [np.uint64(hashes[0])])   # numpy scalars: the array path
    assert moved_held_dropped(array_path) == (1, 0, 1, 0)
    assert moved_held_dropped(kv.offload([1], [hashes[1]], parents=[hashes[0]])) == (1, 1, 0, 0)
    assert kv.match(hashes[:2]).prefix[2] == 2                  # keyed as keys() keys them, salt included
    assert np.array_equal(kv.keys(hashes[:2]), kv.keys(np.array(hashes[:2], np.uint64)))

    with pytest.raises(LayoutError, match="source block 99 out of range"):
        kv.offload([99], [hashes[2]])
    with pytest.raises(LayoutError, match="non-negative"):
        kv.offload([5], [-3])                                   # not a u64: the array path's error
    assert kv._host._offloading == set() and kv.pool(2).registry.num_active == 0   # nothing kept

    registry = kv.pool(2).registry
    held = registry.match(kv.keys(hashes[:2]))                  # pin both: 2 of 4 blocks left
    assert [moved_held_dropped(kv.offload([i], [hashes[i]])) for i in (2, 3)] == [(1, 1, 0, 0)] * 2
    pinned_more = registry.match(kv.keys(hashes[2:4]))
    assert moved_held_dropped(kv.offload([4], [hashes[4]])) == (1, 0, 0, 1)   # no room: dropped
    registry.release(pinned_more)
    registry.release(held)

    pipe.poison()
    res = kv.onboard(hashes[:2], [10, 11]).result(DEADLINE).value
    assert res.loaded == 2 and np.array_equal(pipe.snapshot([10, 11]), expected)
    one_element = kv.offload(np.array([5]), np.array([hashes[5]], np.uint64))   # the scalar path too
    assert moved_held_dropped(one_element) == (1, 1, 0, 0)                     # (evicting the oldest)
    registry.check_invariants()
    assert len(scalar_claims) == 8   # every plain-int or one-element one above; not the numpy scalars'
