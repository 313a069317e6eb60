"""Tensor parallelism 2: vLLM's scheduler with kvbm's connector here, two ranks in two processes
(tests/vllm/tp_rank.py, vLLM's own distributed state over gloo), one kvbm-workers started by rank 0.

Each rank registers its own shard with the one kvbm-workers; a block's store and load complete only
when both ranks have reported them (vLLM's KVOutputAggregator merges the ranks' outputs, our
worker metadata sums the job counts). Every rank's shard of every block holds different bytes, so a
load is checked byte for byte on both ranks after vLLM's own prefix cache was reset.
"""
from __future__ import annotations

import multiprocessing as mp
import socket
import uuid

import pytest
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.v1.request import RequestStatus

from kvbm.integrations.vllm.connector import vllm_key
from tests.vllm import harness as H
from tests.vllm.tp_rank import BS, serve

WORLD = 2
NUM_BLOCKS = 48
DEADLINE = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPEngine:
    """vLLM's scheduler with kvbm's connector, and WORLD ranks (tests/vllm/tp_rank.py); `dp`: this
    engine is replica dp[1] of dp[0] data-parallel replicas (the ranks are started before the
    scheduler then, as vLLM's EngineCore does, so that the scheduler side finds their instance)."""

    def __init__(self, model_dir, tmp_path, dp: tuple[int, int] = (1, 0), instance_id: str | None = None) -> None:
        self.extra = {"host_blocks": 64, "force_cpu": True, "runtime_dir": str(tmp_path / "run"),
                      "instance_id": instance_id or f"tp{uuid.uuid4().hex[:8]}"}
        self.config = H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                                         kv_connector_module_path="kvbm.integrations.vllm",
                                         kv_connector_extra_config=self.extra, tensor_parallel_size=WORLD,
                                         data_parallel_size=dp[0], data_parallel_rank=dp[1])
        self.pipes, self.procs = [], []
        if dp[0] > 1:
            self._start_ranks(model_dir, dp)
        self.scheduler = H.make_scheduler(self.config, H.make_kv_cache_config(self.config, NUM_BLOCKS))
        self.aggregator = KVOutputAggregator.from_connector(self.scheduler.connector, WORLD)
        if dp[0] == 1:
            self._start_ranks(model_dir, dp)

    def _start_ranks(self, model_dir, dp) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        for rank in range(WORLD):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=serve, args=(rank, WORLD, port, str(model_dir), self.extra, NUM_BLOCKS, theirs,
                                                   dp), daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
        for rank in range(WORLD):
            assert self._recv(rank)[0] == "ready"

    def _recv(self, rank: int):
        pipe = self.pipes[rank]
        assert pipe.poll(DEADLINE), f"rank {rank} did not answer within {DEADLINE} s"
        reply = pipe.recv()
        assert reply[0] != "error", reply[1]
        return reply

    def ask_all(self, *cmd) -> list:
        for pipe in self.pipes:
            pipe.send(cmd)
        return [self._recv(rank) for rank in range(WORLD)]

    def writes(self, so) -> list[tuple[int, int]]:
        out = []
        for req_id, n in so.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            table = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            after = request.num_computed_tokens
            for i in range((after - n) // BS, min(after // BS, len(request.block_hashes))):
                out.append((table[i], vllm_key(request.block_hashes[i])))
        return out

    def run_ranks(self, so):
        replies = self.ask_all("step", so.kv_connector_metadata, self.writes(so), so.finished_req_ids)
        return H.aggregate_kv_outputs(self.scheduler, [r[1] for r in replies], self.aggregator)

    def step(self):
        return H.step(self.scheduler, self.run_ranks)

    def run(self, max_steps: int = 200) -> list:
        steps = []
        while self.scheduler.has_requests():
            steps.append(self.step())
            assert len(steps) < max_steps
        return steps

    def add(self, tokens, req_id: str):
        request = H.make_request(self.scheduler, tokens, req_id, max_tokens=3)
        self.scheduler.add_request(request)
        return request

    def close(self) -> None:
        for rank in reversed(range(WORLD)):        # rank 0 started kvbm-workers: it goes last
            try:
                self.pipes[rank].send(("close",))
            except OSError:
                pass
            self.procs[rank].join(30)
            if self.procs[rank].is_alive():
                self.procs[rank].kill()
        self.scheduler.connector.shutdown()


@pytest.fixture
def tp_engine(model_dir, tmp_path):
    e = TPEngine(model_dir, tmp_path)
    yield e
    e.close()


def _load_b_and_check_both_shards(e: TPEngine, tokens) -> list:
    """Request "B" over `tokens` into poisoned tensors: its 4 blocks load (asynchronously), each
    rank's shard is checked byte for byte, then it runs to the end; the steps."""
    e.ask_all("poison")
    req = e.add(tokens, "B")
    steps = [e.step()]
    while req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
        steps.append(e.step())
        assert len(steps) < 50
    table = e.scheduler.kv_cache_manager.get_block_ids("B")[0]
    blocks = [(table[i], vllm_key(req.block_hashes[i])) for i in range(4)]
    assert [r[1] for r in e.ask_all("check", blocks)] == [0, 0]
    return steps + e.run()


def test_tp2_stores_and_loads_every_ranks_shard_byte_for_byte(tp_engine):
    e = tp_engine
    tokens = H.prompt(4 * BS + 5, seed=21)
    e.add(tokens, "A")
    e.run()
    side = e.scheduler.connector.scheduler
    assert side.stats.stored_blocks == 4 and not side.jobs      # both ranks reported every store
    assert e.scheduler.reset_prefix_cache()
    steps = _load_b_and_check_both_shards(e, tokens)   # both shards, from their own G2 regions
    assert H.finish_reasons(steps)["B"] is not None
    assert side.stats.loaded_blocks == 4 and side.stats.load_failures == 0
    H.assert_scheduler_empty(e.scheduler)


def test_dp2_tp2_a_replica_loads_every_ranks_shard_that_another_replica_stored(model_dir, tmp_path):
    """Data parallel 2 x tensor parallel 2 (issue 15): two vLLM schedulers with kvbm's connector,
    each with two rank processes, one kvbm-workers and one G2 of a region per rank. What replica 0
    stored, replica 1 loads, each of its ranks its own shard from its own region, byte for byte
    into poisoned tensors; its own vLLM prefix cache never saw the prompt."""
    instance = f"dt{uuid.uuid4().hex[:8]}"
    replicas = []
    try:
        for k in (0, 1):
            replicas.append(TPEngine(model_dir, tmp_path, dp=(2, k), instance_id=instance))
        a, b = replicas
        assert a.scheduler.connector.shared_g2 and b.scheduler.connector.shared_g2
        tokens = H.prompt(4 * BS + 5, seed=23)
        a.add(tokens, "A")
        a.run()
        assert a.scheduler.connector.scheduler.stats.stored_blocks == 4
        steps = _load_b_and_check_both_shards(b, tokens)   # both of replica 1's ranks
        assert H.finish_reasons(steps)["B"] is not None
        side = b.scheduler.connector.scheduler
        assert side.stats.loaded_blocks == 4 and side.stats.load_failures == 0
        H.assert_scheduler_empty(b.scheduler)
    finally:
        for e in reversed(replicas):
            e.close()
