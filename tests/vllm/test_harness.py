"""The harness proven on vLLM's own connectors: a real Scheduler runs requests to the end.

- ExampleConnector (vLLM's reference connector; its scheduler side only looks for a folder per prompt
  under shared_storage_path): a miss stores, a later engine with the folder present loads
  (synchronously), every request finishes and every GPU block comes back.
- OffloadingConnector (vLLM's CPU offloading, scheduler role only): a store job goes out in the
  connector metadata, its completion comes back as the workers' KVConnectorOutput, and a later
  request's asynchronous load holds it in WAITING_FOR_REMOTE_KVS until `finished_recving` says so.
"""
from __future__ import annotations

import pytest
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
from vllm.v1.engine import FinishReason
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import RequestStatus

from tests.vllm import harness

BLOCK = 16


def example_scheduler(model_dir, storage, num_blocks=64):
    config = harness.make_vllm_config(
        model_dir,
        kv_connector="ExampleConnector",
        kv_connector_extra_config={"shared_storage_path": str(storage)},
        block_size=BLOCK,
    )
    return harness.make_scheduler(config, harness.make_kv_cache_config(config, num_blocks))


def test_request_scheduled_generated_finished(model_dir, tmp_path):
    scheduler = example_scheduler(model_dir, tmp_path / "store")
    assert isinstance(scheduler.connector, ExampleConnector)
    prompt = harness.prompt(2 * BLOCK + 5)
    request = harness.make_request(scheduler, prompt, "r1", max_tokens=3)
    # vLLM's hasher ran: one hash per full block of the prompt.
    assert len(request.block_hashes) == 2
    scheduler.add_request(request)

    steps = harness.run_until_finished(scheduler)

    first = steps[0]
    assert first.scheduled == {"r1": len(prompt)}
    stores = first.kv_connector_metadata.requests
    assert [m.is_store for m in stores] == [True]
    assert len(stores[0].token_ids) == 2 * BLOCK  # the full blocks only
    assert harness.tokens(steps, "r1") == [harness.SAMPLED_TOKEN_ID] * 3
    assert harness.finish_reasons(steps) == {"r1": FinishReason.LENGTH}
    # prefill (samples the first token), two decode steps (the second finishes), one empty step that
    # tells the workers about the finished request
    assert [s.scheduled for s in steps] == [{"r1": len(prompt)}, {"r1": 1}, {"r1": 1}, {}]
    assert steps[2].finished == {"r1": FinishReason.LENGTH}
    assert steps[3].scheduler_output.finished_req_ids == {"r1"}
    harness.assert_scheduler_empty(scheduler)


def test_chunked_prefill_samples_only_at_the_end(model_dir, tmp_path):
    config = harness.make_vllm_config(
        model_dir,
        kv_connector="ExampleConnector",
        kv_connector_extra_config={"shared_storage_path": str(tmp_path)},
        max_num_batched_tokens=32,
    )
    scheduler = harness.make_scheduler(config, harness.make_kv_cache_config(config, 64))
    scheduler.add_request(harness.make_request(scheduler, harness.prompt(80), "long", max_tokens=2))
    steps = harness.run_until_finished(scheduler)
    assert [s.scheduled.get("long") for s in steps] == [32, 32, 16, 1, None]
    assert [s.new_tokens.get("long", []) for s in steps] == [[], [], [7], [7], []]
    harness.assert_scheduler_empty(scheduler)


def test_external_hit_loads_in_a_later_engine(model_dir, tmp_path):
    storage = tmp_path / "store"
    prompt = harness.prompt(3 * BLOCK + 1, seed=3)
    first = example_scheduler(model_dir, storage)
    first.add_request(harness.make_request(first, prompt, "a", max_tokens=1))
    store = harness.step(first).kv_connector_metadata.requests[0]
    assert store.is_store
    # Stand-in for the worker's save_kv_layer: the scheduler side only checks the prompt's folder.
    first.connector._generate_foldername_debug(store.token_ids, [], create_folder=True)
    harness.run_until_finished(first)
    harness.assert_scheduler_empty(first)

    # A new engine (empty GPU prefix cache) finds the 3 full blocks through the connector. (The
    # ExampleConnector keys a prompt by all its full blocks but one token, so the later prompt is the
    # first one plus a token, as in a multi-turn chat.)
    second = example_scheduler(model_dir, storage)
    second.add_request(harness.make_request(second, prompt + [5], "b", max_tokens=2))
    s = harness.step(second)
    loads = s.kv_connector_metadata.requests
    assert [m.is_store for m in loads] == [False]
    assert len(loads[0].token_ids) == 3 * BLOCK
    assert s.scheduled == {"b": len(prompt) + 1 - 3 * BLOCK}  # only the tail past the loaded blocks
    harness.run_until_finished(second)
    harness.assert_scheduler_empty(second)


def test_abort_frees_everything(model_dir, tmp_path):
    scheduler = example_scheduler(model_dir, tmp_path)
    for i in range(3):
        scheduler.add_request(harness.make_request(scheduler, harness.prompt(40, seed=i), f"r{i}", max_tokens=50))
    harness.step(scheduler)
    harness.abort(scheduler, ["r0", "r2"])
    assert sorted(scheduler.requests) == ["r1"]
    steps = harness.run_until_finished(scheduler)
    assert harness.finish_reasons(steps) == {"r1": FinishReason.LENGTH}
    harness.assert_scheduler_empty(scheduler)


def test_block_hashes_follow_the_configured_algorithm(model_dir, tmp_path):
    prompt = harness.prompt(2 * BLOCK)
    hashes = {}
    for algo in ("sha256", "sha256_cbor"):
        config = harness.make_vllm_config(
            model_dir,
            kv_connector="ExampleConnector",
            kv_connector_extra_config={"shared_storage_path": str(tmp_path)},
            prefix_caching_hash_algo=algo,
        )
        scheduler = harness.make_scheduler(config, harness.make_kv_cache_config(config, 16))
        hashes[algo] = harness.make_request(scheduler, prompt, "r").block_hashes
        # Deterministic for a fixed algorithm: the same prompt gives the same chain again.
        assert harness.make_request(scheduler, prompt, "again").block_hashes == hashes[algo]
        assert len(hashes[algo]) == 2
    assert hashes["sha256"] != hashes["sha256_cbor"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_aggregate_waits_for_every_rank(model_dir, tmp_path, world_size):
    scheduler = example_scheduler(model_dir, tmp_path)
    aggregator = KVOutputAggregator.from_connector(scheduler.connector, world_size)
    empty = KVConnectorOutput()
    rank0_done = [KVConnectorOutput(finished_recving={"r"})] + [empty] * (world_size - 1)
    merged = harness.aggregate_kv_outputs(scheduler, rank0_done, aggregator)
    assert merged.finished_recving == ({"r"} if world_size == 1 else None)
    if world_size == 2:  # rank 1 reports a step later: only then is the load complete
        merged = harness.aggregate_kv_outputs(scheduler, [empty, KVConnectorOutput(finished_recving={"r"})], aggregator)
        assert merged.finished_recving == {"r"}


def offloading_answer(log):
    """The workers' side of OffloadingConnector, as a step's kv_connector_output: every load and store
    job of this step's metadata completes at once (one rank); a finished load is `finished_recving`."""

    def answer(scheduler_output):
        meta = scheduler_output.kv_connector_metadata
        log.append(meta)
        done = OffloadingWorkerMetadata()
        for job_id in [*meta.load_jobs, *meta.store_jobs]:
            done.mark_completed(job_id)
        loaded = {job.req_id for job in meta.load_jobs.values()}
        return KVConnectorOutput(kv_connector_worker_meta=done, finished_recving=loaded or None)

    return answer


def test_offloading_connector_stores_then_loads_asynchronously(model_dir):
    config = harness.make_vllm_config(
        model_dir, kv_connector="OffloadingConnector", kv_connector_extra_config={"cpu_bytes_to_use": 1 << 22}
    )
    scheduler = harness.make_scheduler(config, harness.make_kv_cache_config(config, 64))
    prompt = harness.prompt(3 * BLOCK + 1, seed=5)
    log = []
    scheduler.add_request(harness.make_request(scheduler, prompt, "a", max_tokens=2))
    steps = harness.run_until_finished(scheduler, offloading_answer(log))
    assert [s.scheduled for s in steps] == [{"a": len(prompt)}, {"a": 1}, {}]
    assert [len(m.store_jobs) for m in log] == [1, 0, 0] and not any(m.load_jobs for m in log)
    harness.assert_scheduler_empty(scheduler)

    # Drop vLLM's own prefix cache: the 3 full blocks now come only from the connector's CPU copy.
    assert scheduler.reset_prefix_cache()
    log.clear()
    scheduler.add_request(harness.make_request(scheduler, prompt, "b", max_tokens=2))
    held = harness.step(scheduler)  # the workers report nothing yet
    assert held.scheduled == {}
    assert [job.req_id for job in held.kv_connector_metadata.load_jobs.values()] == ["b"]
    assert scheduler.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert harness.step(scheduler).scheduled == {}  # still waiting: no completion came back
    # Now the workers answer the load job (its id from the metadata that carried it).
    job_id = next(iter(held.kv_connector_metadata.load_jobs))
    done = OffloadingWorkerMetadata(completed_jobs={job_id: 1})
    harness.step(scheduler, KVConnectorOutput(kv_connector_worker_meta=done, finished_recving={"b"}))
    steps = harness.run_until_finished(scheduler, offloading_answer(log))
    assert steps[0].scheduled == {"b": len(prompt) - 3 * BLOCK}  # only the token past the loaded blocks
    assert harness.tokens(steps, "b") == [harness.SAMPLED_TOKEN_ID] * 2
    assert harness.finish_reasons(steps) == {"b": FinishReason.LENGTH}
    harness.assert_scheduler_empty(scheduler)
