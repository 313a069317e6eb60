"""Data-parallel vLLM replicas sharing one kvbm-workers, one G2 and its registry (issue 15): each
replica is vLLM's scheduler with kvbm's connector and a worker-side connector (TP 1 here), as in
tests/vllm/test_kvbm_connector.py, built with data_parallel_size 2 and its own data_parallel_rank;
both name one kvbm instance. What replica 0 stored, replica 1 finds in G2 and loads byte for byte
(its own vLLM prefix cache never saw the prompt); both replicas' ranks and scheduler sides are
engines of one namespace of the shared G2; with a disk tier they share its store and slot table
too: what one replica wrote to G3, another loads from it.
"""
from __future__ import annotations

import uuid
from contextlib import contextmanager

from vllm.v1.request import RequestStatus

from kvbm.cli import ask_status
from kvbm.config import KvbmConfig
from kvbm.integrations.vllm.connector import connector_settings, dp_shares_g2
from kvbm.pools import Tier
from tests.vllm import harness as H
from tests.vllm.test_kvbm_connector import BS, DEADLINE, Engine, first_run


@contextmanager
def _two_replicas(model_dir, tmp_path):
    """Two DP replicas (ranks 0 and 1) naming one kvbm instance: (instance id, replica 0, replica 1);
    closed in reverse order."""
    instance = f"d{uuid.uuid4().hex[:8]}"
    replicas = []
    try:
        for rank in (0, 1):
            replicas.append(Engine(model_dir, tmp_path, dp=(2, rank), instance_id=instance))
        yield instance, *replicas
    finally:
        for e in reversed(replicas):
            e.close()


def test_a_replica_loads_what_another_replica_stored(model_dir, tmp_path):
    with _two_replicas(model_dir, tmp_path) as (instance, a, b):
        assert a.scheduler.connector.shared_g2 and b.scheduler.connector.shared_g2
        tokens = H.prompt(4 * BS + 5, seed=11)
        a.add(tokens, "A")
        a.run()
        assert a.side.stats.stored_blocks == 4, a.side.stats
        b.poison()
        req = b.add(tokens, "B")
        steps = [b.step()]
        assert "B" not in steps[0].scheduled and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        while b.scheduler.requests["B"].status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            steps.append(b.step())
        b.check_blocks("B", 4)                    # replica 0's bytes, in replica 1's device blocks
        steps += b.run()
        assert first_run(steps, "B") == 5
        assert b.side.stats.loaded_blocks == 4 and a.side.stats.loaded_blocks == 0
        reg = ask_status(a.scheduler.connector.config)["tiers"]["g2"]["registry"]
        engines = {e["engine_id"]: e for e in reg["engines"]}
        assert {f"{instance}-dp0/sched", f"{instance}-dp1/sched", f"{instance}-dp0/r0",
                f"{instance}-dp1/r0"} <= set(engines)
        assert len({e["namespace"] for e in engines.values()}) == 1
        assert engines[f"{instance}-dp1/sched"]["match_hits"] >= 4


def test_replicas_with_a_disk_tier_share_it(model_dir, tmp_path):
    """Replicas with a disk tier share the instance, its G2 and its G3 (kvbm.shared_g3): what replica
    0 stored, written to disk and pushed out of G2, replica 1 loads from G3 byte for byte."""
    from tests.vllm.test_kvbm_connector_disk import HOST_BLOCKS, disk_settings, keys_of, load_b, where
    instance = f"d{uuid.uuid4().hex[:8]}"
    replicas = []
    try:
        for rank in (0, 1):
            replicas.append(Engine(model_dir, tmp_path, dp=(2, rank), instance_id=instance,
                                   **disk_settings(tmp_path)))
        a, b = replicas
        assert a.scheduler.connector.shared_g2 and b.scheduler.connector.shared_g2
        g3_logs = {e: _spy_g2_events(e.side, Tier.G3) for e in replicas}
        tokens = H.prompt(4 * BS + 5, seed=12)
        req_a = a.add(tokens, "A")
        a.run()
        a.side.disk.flush(DEADLINE)
        keys = keys_of(a, req_a, 4)
        a.add(H.prompt(HOST_BLOCKS * BS + 3, seed=98), "C")      # fills the shared G2: A's blocks leave it
        a.run()
        a.side.disk.flush(DEADLINE)
        in2, in3 = where(b, keys)                  # replica 1's own view: one G2, one G3
        assert not in2.any() and in3.all(), (in2, in3)
        b.poison()
        req, steps = load_b(b, tokens)
        b.check_blocks("B", 4)                     # replica 0's bytes, read from disk by replica 1
        steps += b.run()
        assert first_run(steps, "B") == 5
        assert b.side.stats.staged_blocks == 4 and b.side.disk.stats()["loaded"] == 4
        # G3's KV events per replica: each announces the blocks it wrote, none drains the shared ring
        assert set(keys.tolist()) <= set(_keys(g3_logs[a], "stored")) and _keys(g3_logs[b], "stored") == []
        assert _keys(g3_logs[a], "removed") == _keys(g3_logs[b], "removed") == []
        g3 = ask_status(a.scheduler.connector.config)["tiers"]["g3"]["registry"]
        assert {e["engine_id"] for e in g3["engines"]} == {f"{instance}-dp0/sched", f"{instance}-dp1/sched"}
    finally:
        for e in reversed(replicas):
            e.close()
    plain = H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                               kv_connector_module_path="kvbm.integrations.vllm",
                               data_parallel_size=2, data_parallel_rank=1)
    settings = connector_settings(plain, {})
    assert dp_shares_g2(plain, settings) and not settings.instance_id.endswith("-dp1")
    assert isinstance(settings, KvbmConfig)


def _spy_g2_events(side, tier: Tier = Tier.G2) -> list[tuple[str, int]]:
    """(kind, key) of every event of `tier` that `side` records, as it records them (vLLM takes the
    recorder's events each step)."""
    log = []
    for kind in ("stored", "removed"):
        record = getattr(side.events, kind)

        def spy(tier_of, hashes, *args, _record=record, _kind=kind, **kwargs):
            if Tier(tier_of) is tier:
                log.extend((_kind, int(h)) for h in hashes)
            return _record(tier_of, hashes, *args, **kwargs)

        setattr(side.events, kind, spy)
    return log


def _keys(log, kind) -> list[int]:
    return sorted(key for k, key in log if k == kind)


def test_each_replica_announces_removed_what_it_announced_stored(model_dir, tmp_path):
    """KV events of a shared G2: a replica's allocation may evict another's blocks, and the
    namespace's eviction ring is one for all; each replica still announces removed exactly the G2
    blocks it announced stored (checked each step), never another replica's, and once."""
    with _two_replicas(model_dir, tmp_path) as (_, a, b):
        replicas = (a, b)
        logs = {e: _spy_g2_events(e.side) for e in replicas}
        for engine, seed, name in ((a, 21, "A"), (b, 22, "B")):
            engine.add(H.prompt(4 * BS + 5, seed=seed), name)
            engine.run()
        stored = {e: _keys(logs[e], "stored") for e in replicas}
        assert len(stored[a]) == len(stored[b]) == 4 and not set(stored[a]) & set(stored[b])
        assert _keys(logs[a], "removed") == _keys(logs[b], "removed") == []
        with b.side.manager.lock:   # B's side empties the namespace: A's blocks go too
            b.side.pool.evict(b.side.pool.registry.num_inactive)
        for _ in range(3):
            for engine in replicas:
                engine.step()       # idle steps: each build() checks what its replica announced
        assert _keys(logs[a], "removed") == stored[a] and _keys(logs[b], "removed") == stored[b]
