"""The vLLM connector's sides with a disk tier, without vLLM: the scheduler side's G3 (its own
TransferManager registered with the disk worker only, KvBlockManager.attach_disk_tier) and
DiskTransfers.stage(), over a real kvbm-workers in CPU mode and the real NIXL package.

Request A's 4 blocks are stored into G2 and written to G3 (write-through), C's blocks push them out
of G2; B, with A's keys, finds them in G3 only: stage() reads them into G2, then B's one LoadJob
copies them to poisoned device blocks, byte for byte. A flipped byte in the G3 file: the stage
fails, B's blocks are planned as a failed load (never copied), the bad block leaves G3. Each side
registers only its paths: a submission to another path is refused with a clear error, and the
disk worker's register takes no device memory (the D2H/H2D workers still require it). G3's writes are
announced as BlockStored events of medium STORAGE.
"""
from __future__ import annotations

import dataclasses
import os
import uuid

import numpy as np
import pytest
import torch

from kvbm.errors import DiskError, LifecycleError, ProtocolError
from kvbm.integrations.events import BlockStored, PoolEventRecorder
from kvbm.integrations.vllm.scheduler_side import SchedulerSide
from kvbm.integrations.vllm.worker_side import WorkerSide
from kvbm.manager import KvBlockManager
from kvbm.pools import Tier
from kvbm.transfer.shard_transfers import ShardTransfers
from kvbm.wire import protocol as P
from kvbm.workers.disk.io import load_nixl
from tests.support.shard_helpers import BLOCK_SIZE, DEADLINE, block_bytes, fill, make_shard, poison, shard_config

try:
    load_nixl()
except DiskError as _err:
    pytest.skip(f"needs NIXL: {_err}", allow_module_level=True)

NUM_BLOCKS, HOST_BLOCKS, DISK_BLOCKS = 32, 8, 32


class DiskSides:
    """One engine: the rank's ShardTransfers (starts kvbm-workers with the disk worker), then the
    scheduler side's manager with G2 and G3, registered with the disk worker only."""

    def __init__(self, tmp_path, kind: str = "layer") -> None:
        self.kind = kind
        config = shard_config(str(tmp_path / "run"), f"g{uuid.uuid4().hex[:8]}", disk_path=str(tmp_path / "g3"),
                              disk_blocks=DISK_BLOCKS, disk_admission="write-through", prefill_tokens_per_s=1.0)
        self.transfers = ShardTransfers(config, 0, 1, config.instance_id, HOST_BLOCKS)
        self.manager = None
        try:
            self.tensors = make_shard(self.transfers, kind, torch.float32, NUM_BLOCKS)
            self.transfers.attach(self.tensors)
            self.manager = KvBlockManager(dataclasses.replace(config, host_blocks=HOST_BLOCKS, device_blocks=0))
            self.disk = self.manager.attach_disk_tier(self.transfers.device_layout,
                                                      engine_id=f"{config.instance_id}/sched",
                                                      group=config.instance_id)
        except BaseException:
            self.close()
            raise
        self.events = PoolEventRecorder(BLOCK_SIZE)
        self.side = SchedulerSide(self.manager, BLOCK_SIZE, world_size=1, events=self.events, disk=self.disk)
        self.worker = WorkerSide(self.transfers)

    def run_step(self, plan):
        w = self.worker
        w.bind(plan)
        w.start_loads()
        w.submit_stores()
        w.wait_all(DEADLINE)
        got = w.collect()
        self.side.report(got.report)
        return got

    def store(self, req: str, keys, device_blocks) -> None:
        self.side.scheduled(req, keys, list(device_blocks), True, len(keys) * BLOCK_SIZE)
        self.run_step(self.side.build())
        self.side.finished(req)
        self.disk.flush(DEADLINE)

    def where(self, keys):
        with self.manager.lock:
            return (self.manager.pool(Tier.G2).lookup(keys) >= 0, self.manager.pool(Tier.G3).lookup(keys) >= 0)

    def staged_plan(self):
        """build() until the staged load is planned (waiting on the G3 read in between)."""
        for st in list(self.side._staging):
            try:
                st.future.result(DEADLINE)
            except Exception:  # noqa: BLE001 - planned as a failure
                pass
        plan = self.side.build()
        assert not self.side._staging
        return plan

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        self.transfers.close()


@pytest.fixture
def sides(tmp_path):
    made = []

    def make(**kw) -> DiskSides:
        made.append(DiskSides(tmp_path / f"s{len(made)}", **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def pushed_out(s: DiskSides):
    rng = np.random.default_rng(3)
    keys = rng.integers(1, 2**63, size=4, dtype=np.uint64)
    fill(s.tensors, s.kind, seed=5)
    a_blocks = [3, 7, 9, 12]
    want = block_bytes(s.tensors, s.kind, a_blocks)
    s.store("A", keys, a_blocks)
    in2, in3 = s.where(keys)
    assert in2.all() and in3.all()
    s.store("C", rng.integers(1, 2**63, size=HOST_BLOCKS, dtype=np.uint64), range(14, 14 + HOST_BLOCKS))
    in2, in3 = s.where(keys)
    assert not in2.any() and in3.all()
    return keys, want


@pytest.mark.parametrize("kind", ["layer", "cross"])
def test_g3_blocks_are_staged_into_g2_then_loaded_byte_for_byte(sides, kind):
    s = sides(kind=kind)
    keys, want = pushed_out(s)
    tokens = 4 * BLOCK_SIZE + 3
    assert s.side.lookup_tiers(keys, 0, tokens) == (0, 4 * BLOCK_SIZE)
    b_blocks = [24, 25, 26, 27]
    poison(s.tensors, s.kind, b_blocks)
    s.side.allocated("B", keys, b_blocks + [28], 0, 4 * BLOCK_SIZE)
    assert s.side.hit_tiers("B", 4 * BLOCK_SIZE) == (0, 4 * BLOCK_SIZE)
    plan = s.staged_plan()
    assert len(plan.loads) == 1 and not plan.failed_loads
    job = plan.loads[0]
    assert job.device_blocks == b_blocks and not job.layerwise and not job.failed_blocks
    assert s.manager.pool(Tier.G2).registry.num_active == 4      # staged blocks held for the copy
    got = s.run_step(plan)
    assert block_bytes(s.tensors, s.kind, b_blocks) == want
    assert got.finished_recving == {"B"} and not got.failed_blocks
    st = s.side.stats
    assert (st.staged_blocks, st.loaded_blocks, st.stage_failures) == (4, 4, 0)
    assert s.manager.pool(Tier.G2).registry.num_active == 0
    assert s.where(keys)[0].all()                                # registered in G2 by the stage
    assert s.disk.stats()["loaded"] == 4
    # G3's writes were announced as BlockStored of medium STORAGE (taken by the builds since).
    stored = {h for e in s.events.take() if isinstance(e, BlockStored) and e.medium == "STORAGE"
              for h in e.block_hashes}
    assert set(keys.tolist()) <= stored


def test_a_corrupt_g3_block_fails_the_stage_and_nothing_is_copied(sides):
    s = sides()
    keys, _ = pushed_out(s)
    with s.manager.lock:
        slot = int(s.manager.pool(Tier.G3).lookup(keys[2:3])[0])
    folder = os.path.join(s.manager.config.disk_path, s.manager.config.instance_id)
    slot_bytes = -(-s.transfers.device_layout.config.block_bytes // 4096) * 4096
    path, off = os.path.join(folder, f"data.{slot % 4:03d}"), (slot // 4) * slot_bytes + 17
    with open(path, "r+b") as fh:
        fh.seek(off)
        byte = fh.read(1)[0]
        fh.seek(off)
        fh.write(bytes([byte ^ 0x01]))
    b_blocks = [24, 25, 26, 27]
    poison(s.tensors, s.kind, b_blocks)
    before = block_bytes(s.tensors, s.kind, b_blocks)
    s.side.allocated("B", keys, b_blocks + [28], 0, 4 * BLOCK_SIZE)
    plan = s.staged_plan()
    assert not plan.loads and [j.device_blocks for j in plan.failed_loads] == [b_blocks]
    got = s.run_step(plan)
    assert got.failed_blocks == set(b_blocks) and got.failed_recving == {"B"}
    assert block_bytes(s.tensors, s.kind, b_blocks) == before    # never loaded
    st = s.side.stats
    assert (st.staged_blocks, st.loaded_blocks, st.stage_failures) == (0, 0, 1)
    assert s.where(keys)[1].tolist() == [True, True, False, True]
    assert s.manager.pool(Tier.G2).registry.num_active == 0
    assert not s.side.requests or s.side.requests["B"].load is None


def test_each_side_registers_only_its_paths(sides):
    s = sides()
    with pytest.raises(LifecycleError, match="registered with.*cannot submit to h2disk"):
        s.transfers.transfers.submit(P.Path.H2DISK, [0], [0])
    with pytest.raises(LifecycleError, match="cannot submit to d2h"):
        s.manager.transfers.submit(P.Path.D2H, [0], [0])
    msg = {"engine": "e", "device": {"config": {"num_layers": 1}, "type": 0, "num_blocks": 1},
           "host": {"config": {"num_layers": 1}, "type": 1, "num_blocks": 1}}
    with pytest.raises(ProtocolError, match="memory: this worker copies"):
        P.validate_register(msg)
    assert P.validate_register(msg, need_memory=False)[2] is None
