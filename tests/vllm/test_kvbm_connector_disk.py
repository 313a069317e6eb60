"""The disk tier (G3) through kvbm's connector, in vLLM's own scheduler (CPU, TP 1).

The engine of tests/vllm/test_kvbm_connector.py with a disk tier set through
kv_connector_extra_config (KvbmConfig fields): disk_path under tmp_path, write-through admission, a
G2 small enough that another request pushes the first one's blocks out of it. The workers' kvbm-
workers runs the disk worker; the scheduler side registers with it and keeps G3's registry.

Covered: blocks stored, written to G3, evicted from G2, vLLM's prefix cache reset, then loaded from
G3 byte for byte (a DISK hit for vLLM's stats); a flipped byte in the G3 file fails the load, which
vLLM recomputes (nothing is counted loaded, the bad block leaves G3, the retry loads the intact
block before it and computes the rest; the request finishes); a warm restart (a new
scheduler, worker and kvbm-workers on the same disk_path and instance_id) finds the blocks in G3
and loads them.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.request import RequestStatus

from kvbm.pools import Tier
from tests.vllm import harness as H
from tests.vllm.test_kvbm_connector import BS, DEADLINE, Engine, first_run


def _nixl() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(m) is not None for m in ("nixl_cu13", "nixl", "nixl_cu12"))


# The disk worker (a child of this Python) moves blocks through NIXL, which vLLM's venv does not
# pull in: requirements-vllm.txt would need nixl-cu13 (as kvbm[disk] does).
pytestmark = pytest.mark.skipif(not _nixl(), reason="the disk tier needs NIXL (pip install nixl-cu13==1.5.1)")

HOST_BLOCKS = 8
DISK_BLOCKS = 64


def disk_settings(tmp_path, **kw) -> dict:
    return {"host_blocks": HOST_BLOCKS, "disk_path": str(tmp_path / "g3"), "disk_blocks": DISK_BLOCKS,
            "disk_admission": "write-through", "prefill_tokens_per_s": 1.0,   # loading always beats recomputing
            **kw}




def keys_of(e: Engine, request, n: int) -> np.ndarray:
    return e.scheduler.connector._request_keys(request)[:n]


def where(e: Engine, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(held in G2, held in G3) per key, as the scheduler side's registries say."""
    kv = e.scheduler.connector._manager
    with kv.lock:
        return (np.asarray(kv.pool(Tier.G2).lookup(keys)) >= 0, np.asarray(kv.pool(Tier.G3).lookup(keys)) >= 0)


def store_and_push_out(e: Engine, tokens) -> np.ndarray:
    """A's blocks stored in G2 and written to G3, then pushed out of G2 by C; vLLM's prefix cache
    reset and its KV poisoned: only G3 can serve A's prefix. Returns A's keys."""
    a = e.add(tokens, "A")
    e.run()
    disk = e.side.disk
    disk.flush(DEADLINE)
    keys = keys_of(e, a, len(tokens) // BS)
    in2, in3 = where(e, keys)
    assert in2.all() and in3.all(), (in2, in3)
    e.add(H.prompt(HOST_BLOCKS * BS + 3, seed=99), "C")      # fills G2 with C's blocks
    e.run()
    disk.flush(DEADLINE)
    in2, in3 = where(e, keys)
    assert not in2.any() and in3.all(), (in2, in3)
    assert e.scheduler.reset_prefix_cache()
    e.poison()
    return keys


def load_b(e: Engine, tokens):
    req = e.add(tokens, "B")
    first = e.step()
    assert "B" not in first.scheduled and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    steps = [first]
    while e.scheduler.requests["B"].status == RequestStatus.WAITING_FOR_REMOTE_KVS:
        e.wait_transfers()
        steps.append(e.step())
        assert len(steps) < 50, "B's load never ended"
    return req, steps


def test_blocks_pushed_out_of_g2_load_from_g3_byte_for_byte(engine, tmp_path):
    e = engine(**disk_settings(tmp_path))
    tokens = H.prompt(4 * BS + 5, seed=5)
    store_and_push_out(e, tokens)
    req, steps = load_b(e, tokens)
    assert e.scheduler.connector.get_external_cache_hit_sources(req, 4 * BS) == {CacheHitSource.DISK: 4 * BS}
    e.check_blocks("B", 4)                  # landed from G3, before B's own forward writes anything
    steps += e.run()
    assert first_run(steps, "B") == 5       # the 64 loaded tokens are not computed again
    assert H.finish_reasons(steps)["B"] is not None
    st = e.side.stats
    assert (st.staged_blocks, st.loaded_blocks, st.load_failures, st.stage_failures) == (4, 4, 0, 0)
    disk = e.side.disk.stats()
    assert disk["loaded"] == 4 and disk["loads_failed"] == 0
    H.assert_scheduler_empty(e.scheduler)
    # The staged blocks were registered in G2: the next hit is a G2 one.
    in2, _ = where(e, keys_of(e, req, 4))
    assert in2.all()


def test_a_flipped_byte_in_g3_fails_the_load_and_vllm_recomputes(engine, tmp_path):
    e = engine(**disk_settings(tmp_path))
    tokens = H.prompt(4 * BS + 5, seed=6)
    keys = store_and_push_out(e, tokens)
    kv = e.scheduler.connector._manager
    with kv.lock:
        slot = int(kv.pool(Tier.G3).lookup(keys[1:2])[0])
    bb = e.scheduler.connector.shard_block_bytes            # 4 KiB here: a slot is a block
    folder = os.path.join(kv.config.disk_path, kv.config.instance_id)
    with open(os.path.join(folder, f"data.{slot % 4:03d}"), "r+b") as fh:
        fh.seek((slot // 4) * bb + 1234)
        byte = fh.read(1)[0]
        fh.seek((slot // 4) * bb + 1234)
        fh.write(bytes([byte ^ 0x40]))
    e.add(tokens, "B")
    st = e.side.stats
    steps = [e.step()]
    while not st.stage_failures:
        e.wait_transfers()
        steps.append(e.step())
        assert len(steps) < 50, "B's G3 read never ended"
    assert (st.loaded_blocks, st.staged_blocks, st.loads) == (0, 0, 0)   # the load failed: nothing loaded
    disk = e.side.disk.stats()
    assert (disk["loaded"], disk["loads_failed"], disk["dropped_corrupt"]) == (0, 1, 1)
    assert where(e, keys)[1].tolist() == [True, False, True, True]   # the bad block left G3
    steps += e.run()
    assert H.finish_reasons(steps)["B"] is not None       # B still finishes
    # vLLM rescheduled B from token 0; its new lookup stops at the dropped block: block 0 comes
    # from G3 again, the rest is computed.
    assert first_run(steps[1:], "B") == len(tokens) - BS
    assert (st.loaded_blocks, st.staged_blocks, st.stage_failures) == (1, 1, 1)
    H.assert_scheduler_empty(e.scheduler)


def test_warm_restart_finds_the_blocks_in_g3_and_loads_them(engine, tmp_path):
    settings = disk_settings(tmp_path, instance_id=f"w{uuid.uuid4().hex[:8]}", runtime_dir=str(tmp_path / "run"))
    e1 = engine(**settings)
    tokens = H.prompt(4 * BS + 5, seed=7)
    a = e1.add(tokens, "A")
    e1.run()
    e1.side.disk.flush(DEADLINE)
    keys = keys_of(e1, a, 4)
    assert where(e1, keys)[1].all()
    e1.close()
    e2 = engine(**settings)
    in2, in3 = where(e2, keys)
    assert in3.all() and not in2.any()                    # rebuilt from the journal
    _req, steps = load_b(e2, tokens)
    e2.check_blocks("B", 4)
    steps += e2.run()
    assert first_run(steps, "B") == 5
    assert (e2.side.stats.staged_blocks, e2.side.stats.loaded_blocks) == (4, 4)
