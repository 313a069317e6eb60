"""Crashes that must recover: a SIGKILLed supervisor (the engine notices at once, fails what it held
without leaking G2 blocks, and the next start of the same instance comes up fresh in seconds), a
closed output pipe, a killed engine's device segment, `--status` of an instance that is starting.

Real processes in CPU mode; every process is killed by pid in a finalizer, every wait has a deadline.
Each test failed on the code before its fix."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

import kvbm
from kvbm.errors import KvbmError, LifecycleError, TransferError
from kvbm.shm import RuntimeDir, clean_stale_segments, segment_name
from kvbm.wire import protocol as P
from tests.support.pipeline_harness import DEFAULT_LAYOUT, Pipeline, pid_alive, wait_for

DEADLINE = 30.0


def random_hashes(rng, n):
    return rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64)


def _shm(instance: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{instance}-"))


def _kill(pids) -> None:
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- 1. the supervisor is SIGKILLed under an engine -------------------------------------------------

def test_engine_start_after_its_supervisor_was_killed_comes_up_fresh(make_pipeline, request, rng):
    from kvbm.transfer.launcher import find_instance
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    inst, rundir = pipe.config.instance_id, pipe.config.resolved_runtime_dir()
    dead = pipe.supervisor_pid
    workers = pipe.worker_pids()
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in workers.values()), DEADLINE, "path workers following it")
    # Its lock goes with its last thread (the workers' PR_SET_PDEATHSIG fires with its first).
    wait_for(lambda: find_instance(pipe.config).state == "dead", DEADLINE, "the instance lock released")
    assert os.path.exists(os.path.join(rundir, "endpoints.json"))  # what the old start waited on for 60 s
    with pytest.raises(LifecycleError, match=rf"instance {inst} \(pid {dead}\) is dead; its leftovers"):
        pipe.status()
    pipe.close()

    fresh = Pipeline(pipe.tmp_path, instance=inst, device_blocks=64, host_blocks=64)
    request.addfinalizer(fresh.kill_all)
    fresh.start(timeout=20.0)   # registration included; the old start timed out here
    assert fresh.supervisor_pid != dead and fresh.status()["pid"] == fresh.supervisor_pid
    kv = fresh.kv
    blocks, hashes = np.arange(16), random_hashes(rng, 16)
    fresh.fill_random(blocks, rng)
    expected = fresh.snapshot(blocks)
    assert kv.offload(blocks, hashes).result(DEADLINE).value.moved == 16
    fresh.poison()
    assert kv.onboard(hashes, blocks + 16).result(DEADLINE).value.loaded == 16
    assert np.array_equal(fresh.snapshot(blocks + 16), expected)
    fresh.close()
    assert not os.path.exists(rundir) and _shm(inst) == []


def test_supervisor_kill9_fails_transfers_within_one_timeout_and_leaks_no_g2_block(make_pipeline, rng):
    pipe = make_pipeline(device_blocks=512, host_blocks=512, worker_delay_ms=300, max_batch_blocks=16,
                         request_timeout_ms=10000)
    kv, tm = pipe.kv, pipe.kv.transfers
    host = kv.pool(2).registry
    workers = pipe.worker_pids()
    sup = pipe.supervisor_pid
    blocks, hashes = np.arange(512), random_hashes(rng, 512)
    pipe.fill_random(blocks, rng)
    assert kv.offload(blocks[:32], hashes[:32]).result(DEADLINE).value.moved == 32
    offloads = [kv.offload(blocks[i:i + 64], hashes[i:i + 64]) for i in range(64, 512, 64)]   # 28 requests
    onboard = kv.onboard(hashes[:32], blocks[:32])
    wait_for(lambda: all(tm._paths[p].outstanding for p in P.WORKER_PATHS), 10, "requests at both workers")

    os.kill(sup, signal.SIGKILL)
    # Within one request timeout (10 s); the old code failed them at three (30 s).
    deadline = time.monotonic() + 10.0
    for fut in [*offloads, onboard]:
        with pytest.raises(TransferError, match=rf"kvbm-workers \(pid {sup}\) died") as info:
            fut.result(max(0.01, deadline - time.monotonic()))
        assert not info.value.blocks_may_be_written
        # A request at a worker fails only once that worker is gone: nothing can write its blocks.
        assert not any(pid_alive(p) for p in workers.values())
    with pytest.raises(LifecycleError, match=rf"kvbm-workers \(pid {sup}\) died: no new transfers"):
        kv.offload(blocks[:4], random_hashes(rng, 4))
    with pytest.raises(LifecycleError, match=rf"kvbm-workers \(pid {sup}\) died: no new transfers"):
        kv.onboard(hashes[:4], blocks[:4])
    # 0 leaked: every host block is free, or registered and inactive (the first offload's 32).
    assert kv._host.leaked_host_blocks == 0
    assert host.num_active == 0 and host.num_registered == 32 and host.num_free == 512 - 32
    host.check_invariants()
    assert tm.inflight_bytes == 0


