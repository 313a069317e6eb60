"""Data-parallel vLLM replicas sharing one kvbm-workers, one G2 and its registry (issue 15): each
replica is vLLM's scheduler with kvbm's connector and a worker-side connector (TP 1 here), as in
tests/vllm/test_kvbm_connector.py, built with data_parallel_size 2 and its own data_parallel_rank;
both name one kvbm instance. What replica 0 stored, replica 1 finds in G2 and loads byte for byte
(its own vLLM prefix cache never saw the prompt); both replicas' ranks and scheduler sides are
engines of one namespace of the shared G2; replicas that cannot share (a disk tier) keep an
instance each.
"""
from __future__ import annotations

import uuid

from vllm.v1.request import RequestStatus

from kvbm.cli import ask_status
from kvbm.config import KvbmConfig
from kvbm.integrations.vllm.connector import connector_settings, dp_shares_g2
from tests.vllm import harness as H
from tests.vllm.test_kvbm_connector import BS, Engine, first_run


def test_a_replica_loads_what_another_replica_stored(model_dir, tmp_path):
    instance = f"d{uuid.uuid4().hex[:8]}"
    replicas = []
    try:
        for rank in (0, 1):
            replicas.append(Engine(model_dir, tmp_path, dp=(2, rank), instance_id=instance))
        a, b = replicas
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
    finally:
        for e in reversed(replicas):
            e.close()


def test_replicas_with_a_disk_tier_keep_an_instance_each(model_dir, tmp_path):
    for rank in (0, 1):
        config = H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                                    kv_connector_module_path="kvbm.integrations.vllm",
                                    data_parallel_size=2, data_parallel_rank=rank,
                                    kv_connector_extra_config={"disk_path": str(tmp_path / "g3"),
                                                               "disk_blocks": 8})
        settings = connector_settings(config, config.kv_transfer_config.kv_connector_extra_config)
        assert not dp_shares_g2(config, settings) and settings.instance_id.endswith(f"-dp{rank}")
    plain = H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                               kv_connector_module_path="kvbm.integrations.vllm",
                               data_parallel_size=2, data_parallel_rank=1)
    settings = connector_settings(plain, {})
    assert dp_shares_g2(plain, settings) and not settings.instance_id.endswith("-dp1")
    assert isinstance(settings, KvbmConfig)
