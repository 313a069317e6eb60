"""The vLLM connector's two sides without vLLM (kvbm/integrations/vllm/scheduler_side.py and
worker_side.py), driven as the adapter drives them, over a real kvbm-workers: shared by
tests/integration/test_connector_sides.py (CPU mode) and tests/gpu/test_connector_sides_gpu.py
(CUDA tensors shaped like vLLM's).

One engine step at a time: the scheduler side plans, the worker side binds the plan, starts its
loads (layer by layer when `layerwise`), submits its stores, collects; its report goes back to
the scheduler side. Request A computes 4 blocks (stored to G2); request B, with the same keys, finds
them in G2 and loads them into other, poisoned device blocks: byte for byte, and with layer-wise
loads, each layer complete as soon as wait_layer returns for it.
"""
from __future__ import annotations

import uuid

import numpy as np
import torch

from kvbm.integrations.vllm.plan import StepPlan
from kvbm.integrations.vllm.scheduler_side import SchedulerSide
from kvbm.integrations.vllm.worker_side import WorkerSide
from kvbm.manager import KvBlockManager
from kvbm.transfer.shard_transfers import ShardTransfers
from tests.support.shard_helpers import (
    BLOCK_SIZE,
    DEADLINE,
    LAYERS,
    block_bytes,
    fill,
    make_shard,
    poison,
    shard_config,
)

NUM_BLOCKS, HOST_BLOCKS = 32, 16


class Sides:
    def __init__(self, tmp_path, device: str, kind: str, dtype=torch.float16) -> None:
        self.kind = kind
        config = shard_config(str(tmp_path / "run"), f"c{uuid.uuid4().hex[:8]}", device=device)
        self.manager = KvBlockManager(host_blocks=HOST_BLOCKS, device_blocks=0)
        self.side = SchedulerSide(self.manager, BLOCK_SIZE, world_size=1)
        self.transfers = ShardTransfers(config, 0, 1, config.instance_id, HOST_BLOCKS)
        self.tensors = make_shard(self.transfers, kind, dtype, NUM_BLOCKS, device=device)
        self.transfers.attach(self.tensors)
        self.worker = WorkerSide(self.transfers)

    def run_step(self, plan: StepPlan, layer_check=None) -> None:
        w = self.worker
        w.bind(plan)
        w.start_loads()
        for layer in range(LAYERS):
            w.wait_layer(layer, DEADLINE)
            if layer_check is not None:
                layer_check(layer)
        w.finish_layerwise()
        w.submit_stores()
        for pending in list(w.stores.values()) + list(w.loads.values()):
            if pending.future is not None:
                pending.future.result(DEADLINE)
        got = w.collect()
        self.side.report(got.report)
        self.collected = got

    def close(self) -> None:
        self.transfers.close()
        self.manager.close()


def layer_bytes(sides: Sides, blocks, layer: int) -> list[bytes]:
    """One layer's bytes of each block (per-layer shape only)."""
    view = sides.tensors[layer].view(torch.uint8)
    return [view[:, b].cpu().numpy().tobytes() for b in blocks]


def store_then_load(sides: Sides, layerwise: bool) -> dict:
    keys = np.random.default_rng(7).integers(1, 2**63, size=4, dtype=np.uint64)
    tokens = 4 * BLOCK_SIZE + 3
    a_blocks, b_blocks = [3, 7, 9, 12], [20, 21, 22, 23, 24]
    fill(sides.tensors, sides.kind, seed=11)
    side = sides.side
    side.scheduled("A", keys, a_blocks, True, tokens)
    plan = side.build()
    assert [j.host_blocks for j in plan.stores] and not plan.loads
    sides.run_step(plan)
    assert side.stats.stored_blocks == 4 and not side.jobs
    want = block_bytes(sides.tensors, sides.kind, a_blocks)
    want_layers = ([layer_bytes(sides, a_blocks, layer) for layer in range(LAYERS)] if sides.kind == "layer"
                   else None)

    assert side.lookup(keys, 0, tokens) == 4 * BLOCK_SIZE
    assert side.lookup(keys, 0, 4 * BLOCK_SIZE) == 3 * BLOCK_SIZE      # the last token is always computed
    poison(sides.tensors, sides.kind, b_blocks)
    side.allocated("B", keys, b_blocks, 0, 4 * BLOCK_SIZE, layerwise=layerwise)
    assert side.pool.registry.num_active == 4                            # held while the load runs
    plan = side.build()
    seen = []

    def layer_check(layer: int) -> None:
        if layerwise and want_layers is not None:
            seen.append(layer_bytes(sides, b_blocks[:4], layer) == want_layers[layer])

    sides.run_step(plan, layer_check)
    return {"want": want, "got": block_bytes(sides.tensors, sides.kind, b_blocks[:4]), "layers_ok": seen,
            "recving": sides.collected.finished_recving, "failed": sides.collected.failed_blocks,
            "active": side.pool.registry.num_active, "loaded": side.stats.loaded_blocks}


def check_store_then_load(tmp_path, device: str, kind: str, layerwise: bool) -> None:
    """The whole test, for either device: both sides over a fresh kvbm-workers, closed after."""
    sides = Sides(tmp_path, device, kind)
    try:
        out = store_then_load(sides, layerwise)
    finally:
        sides.close()
    assert out["got"] == out["want"] and not out["failed"]
    assert out["recving"] == (set() if layerwise else {"B"})   # only an asynchronous load is "received"
    assert out["active"] == 0 and out["loaded"] == 4            # the G2 blocks are released once loaded
    if layerwise and kind == "layer":
        assert out["layers_ok"] == [True] * LAYERS               # each layer whole when its wait returned

