"""kvbm's connector in vLLM's own scheduler (CPU), with its worker side and a real kvbm-workers.

The engine here is vLLM's V1 Scheduler (tests/vllm/harness.py) whose SCHEDULER-role connector is
KvbmConnector, loaded by module path as `vllm serve` would; the WORKER-role connector is built by
vLLM's factory in this process, registers KV tensors shaped like vLLM's ([2, num_blocks, block_size,
heads, head_dim] per layer, plain CPU tensors that the connector moves into shared memory), and
runs each step's plan against kvbm-workers in CPU mode. The "forward pass" writes, into every block
a step computes, bytes that are a function of the block's vLLM hash and layer, so a load is checked
byte for byte against what was stored.

Covered: a full hit and a partial hit loaded byte for byte after vLLM's own prefix cache was reset,
a miss, a failed load that vLLM recomputes (the H2D worker stopped past the request deadline), an
abort while a load is in flight (blocks kept until it lands), preemption with stores in flight
(vLLM waits for them before reusing the blocks), events and metrics of the scheduler side.
"""
from __future__ import annotations

import os
import signal
import uuid

import numpy as np
import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import RequestStatus

from kvbm.integrations.vllm import KvbmConnector
from kvbm.integrations.vllm.connector import vllm_key
from tests.vllm import harness as H

BS = 16           # tokens per vLLM block
DEADLINE = 30.0


class Engine:
    """vLLM's scheduler + kvbm's scheduler-side connector, one worker-side connector (TP 1)."""

    def __init__(self, model_dir, tmp_path, *, num_blocks: int = 48, host_blocks: int = 64, settle: bool = True,
                 dp: tuple[int, int] = (1, 0), **extra) -> None:
        settings = {"host_blocks": host_blocks, "force_cpu": True, "runtime_dir": str(tmp_path / "run"),
                    "instance_id": f"v{uuid.uuid4().hex[:8]}", **extra}
        self.vllm_config = H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                                              kv_connector_module_path="kvbm.integrations.vllm",
                                              kv_connector_extra_config=settings,
                                              data_parallel_size=dp[0], data_parallel_rank=dp[1])
        kv_cache_config = H.make_kv_cache_config(self.vllm_config, num_blocks)
        shape = (2, num_blocks, BS, H.NUM_KV_HEADS, H.HEAD_SIZE)
        self.kv = {name: torch.zeros(shape, dtype=torch.float16) for name in H.LAYER_NAMES}   # vLLM's own tensors
        if settings.get("disk_path") or dp[0] > 1:
            # As vLLM's EngineCore: the workers register their KV caches, then the scheduler is
            # built (its connector connects to the running kvbm-workers' disk worker).
            self.worker = H.make_connector(self.vllm_config, KVConnectorRole.WORKER, kv_cache_config)
            self.worker.register_kv_caches(self.kv)
            self.scheduler = H.make_scheduler(self.vllm_config, kv_cache_config)
        else:
            self.scheduler = H.make_scheduler(self.vllm_config, kv_cache_config)
            self.worker = H.make_connector(self.vllm_config, KVConnectorRole.WORKER, kv_cache_config)
            self.worker.register_kv_caches(self.kv)
        assert isinstance(self.scheduler.connector, KvbmConnector) and isinstance(self.worker, KvbmConnector)
        self.settle = settle

    @property
    def side(self):
        return self.scheduler.connector.scheduler

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.connector.shutdown()

    # ---- the model --------------------------------------------------------------------------
    def content(self, request, index: int, layer: int) -> torch.Tensor:
        """The KV bytes of block `index` of `request` in `layer`: a function of its vLLM hash."""
        seed = (vllm_key(request.block_hashes[index]) ^ (layer * 0x9E3779B97F4A7C15)) & (2**63 - 1)
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 2**16, size=(2, BS, H.NUM_KV_HEADS, H.HEAD_SIZE), dtype=np.uint16)
        return torch.from_numpy(data.view(np.float16))

    def block_table(self, req_id: str) -> list[int]:
        return self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]

    def forward(self, so) -> None:
        """Layer by layer, as the attention layers do: wait for the layer's loads, then write every
        full block this step computes (never one loaded or computed before)."""
        for layer, name in enumerate(H.LAYER_NAMES):
            self.worker.wait_for_layer_load(name)
            for req_id, n in so.num_scheduled_tokens.items():
                request = self.scheduler.requests[req_id]
                after = request.num_computed_tokens
                table = self.block_table(req_id)
                for i in range((after - n) // BS, min(after // BS, len(request.block_hashes))):
                    self.kv[name][:, table[i]] = self.content(request, i, layer)

    def poison(self) -> None:
        for t in self.kv.values():
            t.view(torch.uint16).fill_(0xFFFF)

    def check_blocks(self, req_id: str, count: int) -> None:
        request = self.scheduler.requests[req_id]
        table = self.block_table(req_id)
        for i in range(count):
            for layer, name in enumerate(H.LAYER_NAMES):
                got = self.kv[name][:, table[i]].view(torch.uint16)
                want = self.content(request, i, layer).view(torch.uint16)
                assert torch.equal(got, want), f"block {i} of {req_id}, layer {layer}: bytes differ"

    # ---- one step of the worker side ----------------------------------------------------------
    def run_worker(self, so) -> KVConnectorOutput:
        w = self.worker
        meta = so.kv_connector_metadata
        w.bind_connector_metadata(meta)
        w.handle_preemptions(meta)
        w.start_load_kv(None)
        self.forward(so)
        w.wait_for_save()
        if self.settle:
            self.wait_transfers()
        # What vLLM's model runner does after the forward pass (kv_connector_model_runner_mixin).
        results = w.get_transfer_results(so.finished_req_ids)
        errors = w.get_block_ids_with_load_errors()
        worker_meta = w.build_connector_worker_meta()
        w.clear_connector_metadata()
        return KVConnectorOutput(finished_sending=results.finished_sending, finished_recving=results.finished_recving,
                                 failed_recving=results.failed_recving, invalid_block_ids=errors,
                                 kv_connector_worker_meta=worker_meta)

    def wait_transfers(self) -> None:
        for staging in list(getattr(self.side, "_staging", ())):   # G3 reads into G2 (disk tier)
            try:
                staging.future.result(DEADLINE)
            except Exception:  # noqa: BLE001 - the scheduler side plans the failure
                pass
        self.worker.worker.wait_all(DEADLINE)

    def step(self):
        return H.step(self.scheduler, self.run_worker)

    def run(self, max_steps: int = 200) -> list:
        steps = []
        while self.scheduler.has_requests():
            steps.append(self.step())
            if not steps[-1].scheduled:
                self.wait_transfers()   # an idle engine step takes time: let the copies in flight land
            assert len(steps) < max_steps, "the engine did not finish"
        return steps

    def add(self, tokens, req_id: str, max_tokens: int = 3):
        request = H.make_request(self.scheduler, tokens, req_id, max_tokens=max_tokens)
        self.scheduler.add_request(request)
        return request


def first_run(steps, req_id: str) -> int:
    """Tokens vLLM computed for the request the first time it ran: the prompt less what it loaded."""
    return next(st.scheduled[req_id] for st in steps if req_id in st.scheduled)


def _stored_then_reset(e: Engine, tokens) -> None:
    e.add(tokens, "A")
    e.run()
    assert e.side.stats.stored_blocks == len(tokens) // BS, e.side.stats
    assert e.scheduler.reset_prefix_cache()     # vLLM's G1 forgets: only kvbm's G2 can serve the prefix
    e.poison()


def test_full_hit_is_loaded_byte_for_byte_after_the_prefix_cache_is_reset(engine):
    e = engine()
    tokens = H.prompt(4 * BS + 5)
    _stored_then_reset(e, tokens)
    req = e.add(tokens, "B")
    first = e.step()
    assert "B" not in first.scheduled and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    steps = [first] + e.run()
    assert first_run(steps, "B") == 5       # the 64 loaded tokens are not computed again
    assert H.finish_reasons(steps)["B"] is not None
    assert e.side.stats.loaded_blocks == 4 and e.side.stats.load_failures == 0


def test_loaded_blocks_hold_what_was_stored(engine):
    e = engine()
    tokens = H.prompt(4 * BS + 5, seed=3)
    _stored_then_reset(e, tokens)
    e.add(tokens, "B")
    e.step()                          # B waits for its load
    while e.scheduler.requests["B"].status == RequestStatus.WAITING_FOR_REMOTE_KVS:
        e.step()
    e.check_blocks("B", 4)            # landed, before B's own forward writes anything
    e.run()


def test_partial_hit_loads_the_shared_blocks_only(engine):
    e = engine()
    shared = H.prompt(2 * BS, seed=5)
    _stored_then_reset(e, shared + H.prompt(2 * BS + 3, seed=6))
    e.add(shared + H.prompt(2 * BS + 3, seed=7), "B")
    assert first_run(e.run(), "B") == 2 * BS + 3
    assert e.side.stats.loaded_blocks == 2


def test_a_miss_loads_nothing(engine):
    e = engine()
    _stored_then_reset(e, H.prompt(3 * BS + 1, seed=8))
    e.add(H.prompt(3 * BS + 1, seed=9), "B")
    assert first_run(e.run(), "B") == 3 * BS + 1 and e.side.stats.loads == 0


def test_g2_never_offers_the_last_token(engine):
    e = engine()
    tokens = H.prompt(4 * BS, seed=10)         # an exact multiple: the last block must be computed
    _stored_then_reset(e, tokens)
    e.add(tokens, "B")
    assert first_run(e.run(), "B") == BS


def _kill(pid: int, sig: int) -> None:
    """Signal a path worker that kvbm may already have replaced (a missed deadline kills it)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _h2d_worker_pid(e: Engine) -> int:
    from kvbm.cli import ask_status
    return ask_status(e.worker.config, timeout=10.0)["workers"]["h2d"]["pid"]


def test_a_failed_load_is_reported_and_vllm_recomputes(engine):
    # The H2D worker is stopped: the load misses its deadline, kvbm replaces the worker and reports
    # the load failed (failed_recving and the blocks); vLLM drops the request's computed tokens to 0
    # and asks again: G2 still holds the prefix, and the retry loads it through the new worker.
    e = engine(request_timeout_ms=1500)
    tokens = H.prompt(4 * BS + 5, seed=11)
    _stored_then_reset(e, tokens)
    pid = _h2d_worker_pid(e)
    os.kill(pid, signal.SIGSTOP)            # the load cannot land before its deadline
    req = e.add(tokens, "B")
    steps = []
    try:
        while not any("B" in (st.model_runner_output.kv_connector_output.failed_recving or ()) for st in steps):
            steps.append(e.step())
            assert len(steps) < 100
    finally:
        _kill(pid, signal.SIGKILL)          # never let the stopped copy write later (kvbm did already)
    failed = steps[-1].model_runner_output.kv_connector_output
    assert "B" in failed.finished_recving and len(failed.invalid_block_ids) == 4
    assert req.num_computed_tokens == 0 and "B" not in steps[-1].scheduled   # nothing counted as loaded
    assert e.side.stats.load_failures == 1 and e.side.pool.registry.num_active == 0
    while req.status in (RequestStatus.WAITING, RequestStatus.WAITING_FOR_REMOTE_KVS):
        steps.append(e.step())
        assert len(steps) < 100
    e.check_blocks("B", 4)                  # the retry's bytes, through the replaced worker
    steps += e.run()
    assert H.finish_reasons(steps)["B"] is not None and e.side.stats.loaded_blocks == 4
    assert e.scheduler.connector.metrics.load_failures.labels("G2")._value.get() == 4
    H.assert_scheduler_empty(e.scheduler)


def test_an_abort_during_a_load_keeps_the_blocks_until_it_lands(engine):
    e = engine()
    tokens = H.prompt(4 * BS + 5, seed=12)
    _stored_then_reset(e, tokens)
    pid = _h2d_worker_pid(e)
    os.kill(pid, signal.SIGSTOP)
    e.settle = False
    try:
        e.add(tokens, "B")
        e.step()
        assert e.scheduler.requests["B"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
        blocks = list(e.block_table("B"))
        H.abort(e.scheduler, "B")
        e.step()
        pool = e.scheduler.kv_cache_manager.block_pool
        assert all(pool.blocks[b].ref_cnt > 0 for b in blocks[:4]), "freed while the load still writes them"
    finally:
        _kill(pid, signal.SIGCONT)
    e.settle = True
    e.wait_transfers()
    e.run()
    for _ in range(3):
        if not e.scheduler.has_requests() and not e.worker.worker.busy():
            break
        e.step()
    assert e.side.pool.registry.num_active == 0
    H.assert_scheduler_empty(e.scheduler)


def test_stores_of_a_preempted_request_finish_before_its_blocks_are_reused(engine):
    # Few device blocks and long decodes: vLLM preempts one request while its stores are in flight
    # (each copy is delayed), waits for them in handle_preemptions, and both finish.
    e = engine(num_blocks=14, worker_delay_ms=30)
    e.settle = False
    a = e.add(H.prompt(4 * BS, seed=13), "A", max_tokens=3 * BS)
    b = e.add(H.prompt(4 * BS, seed=14), "B", max_tokens=3 * BS)
    steps = e.run(max_steps=400)
    reasons = H.finish_reasons(steps)
    assert reasons["A"] is not None and reasons["B"] is not None
    assert a.num_preemptions + b.num_preemptions >= 1, "the test needs a preemption"
    e.wait_transfers()
    e.step() if e.scheduler.has_requests() else None
    # Every block G2 registered holds what its request computed: load them all into fresh blocks.
    assert e.side.stats.store_failures == 0
    assert e.scheduler.reset_prefix_cache()
    e.poison()
    e.settle = True
    for name, tokens in (("A2", a.all_token_ids[:4 * BS + 1]), ("B2", b.all_token_ids[:4 * BS + 1])):
        req = e.add(list(tokens), name)
        e.step()
        while e.scheduler.requests[name].status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            e.step()
        e.check_blocks(name, req.num_computed_tokens // BS)
        e.run()


def test_events_reach_a_subscriber_and_metrics_are_served(engine):
    """A router's view: kvbm's publisher (events_endpoint) on a real ZeroMQ SUB socket, decoded with
    vLLM's own classes; the engine metrics scraped over HTTP."""
    import urllib.request

    import msgspec
    import zmq
    from vllm.distributed import kv_events as vk
    e = engine(host_blocks=6, events_endpoint="tcp://127.0.0.1:0", engine_metrics_port=0)
    connector = e.scheduler.connector
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(connector._publisher.endpoint)
    decoder = msgspec.msgpack.Decoder(vk.KVEventBatch)

    def received() -> list:
        events = []
        while sub.poll(2000):
            _topic, _seq, payload = sub.recv_multipart()
            events += decoder.decode(payload).events
        return events

    try:
        e.add(H.prompt(1), "warm-up")          # the subscription settles before the events that count
        e.run()
        received()
        tokens = H.prompt(4 * BS + 1, seed=15)
        e.add(tokens, "A")
        e.run()
        stored = [ev for ev in received() if isinstance(ev, vk.BlockStored)]
        keys = [vllm_key(h) for h in H.make_request(e.scheduler, tokens, "x").block_hashes[:4]]
        assert [h for ev in stored for h in ev.block_hashes] == keys     # the hashes vLLM's own events use
        assert all(ev.medium == vk.MEDIUM_CPU for ev in stored)
        e.add(H.prompt(4 * BS + 1, seed=16), "C")   # 4 more blocks into a G2 of 6: 2 evicted
        e.run()
        removed = [h for ev in received() if isinstance(ev, vk.BlockRemoved) for h in ev.block_hashes]
        assert len(removed) == 2 and set(removed) <= set(keys)
    finally:
        sub.close(0)
        ctx.term()
    with urllib.request.urlopen(connector._metrics_server.url, timeout=10) as page:
        text = page.read().decode()
    assert "kvbm_offload_blocks_d2h 8.0" in text, text[:2000]
    assert 'kvbm_offloaded_bytes_total{path="d2h"}' in text and 'kvbm_evicted_blocks_total{tier="G2"} 2.0' in text


def test_layerwise_load_runs_the_request_in_the_same_step(engine):
    e = engine(vllm_load="layerwise")
    tokens = H.prompt(4 * BS + 5, seed=17)
    _stored_then_reset(e, tokens)
    e.add(tokens, "B")
    first = e.step()
    assert first.scheduled.get("B") == 5          # the 64 loaded tokens count as computed already
    e.check_blocks("B", 4)
    e.run()
    assert e.side.stats.loaded_blocks == 4


def test_layerwise_failure_is_reported_in_the_step_and_recomputed(engine):
    e = engine(vllm_load="layerwise", request_timeout_ms=1500)
    tokens = H.prompt(4 * BS + 5, seed=18)
    _stored_then_reset(e, tokens)
    pid = _h2d_worker_pid(e)
    os.kill(pid, signal.SIGSTOP)
    try:
        e.add(tokens, "B")
        first = e.step()
        assert first.model_runner_output.kv_connector_output.invalid_block_ids   # named in the same step
        steps = [first] + e.run()
    finally:
        _kill(pid, signal.SIGKILL)
    assert H.finish_reasons(steps)["B"] is not None
    assert e.side.stats.load_failures == 1
    H.assert_scheduler_empty(e.scheduler)


def test_dynamo_connector_is_kvbms_connector(model_dir, tmp_path):
    config = H.make_vllm_config(model_dir, kv_connector="DynamoConnector",
                                kv_connector_module_path="kvbm.vllm_integration.connector",
                                kv_connector_extra_config={"host_blocks": 8, "force_cpu": True,
                                                           "runtime_dir": str(tmp_path)})
    scheduler = H.make_scheduler(config, H.make_kv_cache_config(config, 16))
    try:
        assert isinstance(scheduler.connector, KvbmConnector)
    finally:
        scheduler.connector.shutdown()


def test_unknown_extra_settings_are_refused(model_dir, tmp_path):
    config = H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                                kv_connector_module_path="kvbm.integrations.vllm",
                                kv_connector_extra_config={"host_blokcs": 8})
    with pytest.raises(Exception, match="host_blokcs"):
        H.make_scheduler(config, H.make_kv_cache_config(config, 16))


def test_vllms_fail_policy_becomes_recompute(model_dir, tmp_path):
    # vLLM's default ends a request whose load failed; for a cache that is a miss to recompute.
    config = H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                                kv_connector_module_path="kvbm.integrations.vllm", kv_load_failure_policy="fail",
                                kv_connector_extra_config={"host_blocks": 8, "force_cpu": True,
                                                           "runtime_dir": str(tmp_path)})
    scheduler = H.make_scheduler(config, H.make_kv_cache_config(config, 16))
    try:
        assert scheduler.recompute_kv_load_failures
        assert not KvbmConnector.supports_sleep_mode(config.kv_transfer_config)    # IPC mappings cannot follow
        assert KvbmConnector.get_required_kvcache_layout(config) == "NHD"
    finally:
        scheduler.connector.shutdown()


def test_reset_with_the_connector_forgets_g2(engine):
    e = engine()
    tokens = H.prompt(4 * BS + 5, seed=19)
    e.add(tokens, "A")
    e.run()
    assert e.side.pool.registry.num_registered == 4
    assert e.scheduler.reset_prefix_cache(reset_connector=True)     # e.g. new weights: old KV is wrong now
    assert e.side.pool.registry.num_registered == 0
    e.add(tokens, "B")
    assert first_run(e.run(), "B") == 4 * BS + 5                    # nothing loaded: recomputed


def test_keys_follow_block_hashes_that_vllm_recomputes(engine):
    e = engine()
    connector = e.scheduler.connector
    req = H.make_request(e.scheduler, H.prompt(3 * BS, seed=20), "R")
    first = connector._request_keys(req).copy()
    other = H.make_request(e.scheduler, H.prompt(3 * BS, seed=21), "S")
    req.block_hashes[:] = other.block_hashes        # vLLM cleared and rebuilt them (other tokens now)
    again = connector._request_keys(req)
    assert len(first) == len(again) == 3 and not np.array_equal(first, again)
    assert [vllm_key(h) for h in other.block_hashes] == again.tolist()
