"""ShardTransfers (kvbm/transfer/shard_transfers.py) against real kvbm-workers processes, CPU mode:
one rank's store -> poison -> load byte for byte (vLLM's per-layer shape and the cross-layer one),
layer progress, bad inputs refused before anything is submitted, TP 2 as two processes sharing
one kvbm-workers (their G2 regions checked in the segment), and what the workers refuse: a second
engine, overlapping ranks, a range past G2, a disk tier under a group of several ranks."""
from __future__ import annotations

import os

import pytest
import torch

from kvbm.errors import ConfigError, LayoutError, LifecycleError, TransferError
from kvbm.transfer.launcher import WorkersProcess
from kvbm.transfer.shard_transfers import ShardTransfers
from tests.support.shard_helpers import KINDS, fill, make_shard, rank_factory, round_trip, shard_config
from tests.support.shard_tp2 import tp2_two_processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ranks(tmp_path, request):
    """make(rank, world, group, host_blocks, **config) -> a ShardTransfers (shard_helpers.rank_factory)."""
    return rank_factory(tmp_path, request)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_rank_round_trip(ranks, kind, dtype):
    st = ranks()
    tensors = make_shard(st, kind, dtype, num_blocks=16)
    fill(tensors, kind, seed=7)
    st.attach(tensors)
    assert st.engine_id == "eng/r0" and st.host_offset == 0
    assert st.device_layout.config.dtype == str(dtype).removeprefix("torch.")
    out = round_trip(st, tensors, kind, [3, 0, 15, 8], [7, 2, 5, 0], into=[1, 4, 9, 12])
    assert out["after"] == out["before"]
    assert out["layers"] == st.device_layout.config.num_layers == 3
    assert out["blocks"] == 4
    assert st.stats()["failed"] == 0


def test_bad_inputs_are_refused_and_nothing_is_submitted(ranks):
    st = ranks(host_blocks=8)
    tensors = make_shard(st, "layer", torch.bfloat16, num_blocks=16)
    with pytest.raises(LifecycleError):
        st.store([0], [0])                       # not attached
    st.attach(tensors)
    submitted = st.stats()["submitted"]
    bad = [(st.store, [0, 1], [0]),              # unequal lengths
           (st.store, [0], [8]),                 # host block past host_blocks
           (st.store, [16], [0]),                # device block past num_blocks
           (st.store, [-1], [0]),
           (st.store, [[0, 1]], [[0, 1]]),       # not 1-D
           (st.store, [0.0], [1.0]),             # not integers
           (st.store, [0, 1], [2, 2]),           # a destination twice
           (st.load, [0], [16]),
           (st.load, [9], [0]),
           (st.load, [0, 1], [3])]
    for call, src, dst in bad:
        with pytest.raises(LayoutError):
            call(src, dst)
    assert st.stats()["submitted"] == submitted
    assert st.store([], []).result(10).blocks == 0


def test_ranks_other_than_zero_wait_for_rank_zero_and_name_the_instance(ranks):
    st = ranks(rank=1, world=2)
    tensors = make_shard(st, "layer", torch.bfloat16, num_blocks=4)
    with pytest.raises(LifecycleError, match=st.config.instance_id):
        st.attach(tensors, timeout=0.3)
    assert st.workers_process is None


def test_bad_construction():
    cfg = shard_config("/tmp/unused", "x")
    for rank, world, group, blocks in ((2, 2, "g", 4), (-1, 1, "g", 4), (0, 0, "g", 4), (0, 1, "", 4), (0, 1, "g", 0)):
        with pytest.raises(ConfigError):
            ShardTransfers(cfg, rank, world, group, blocks)
    with pytest.raises(ConfigError, match="tensor parallelism"):
        ShardTransfers(shard_config("/tmp/unused", "x", disk_path="/tmp/d", disk_blocks=8), 0, 2, "g", 4)


def test_second_engine_overlap_and_range_past_g2_are_refused(ranks):
    rank0 = ranks(rank=0, world=2, group="eng", host_blocks=8)
    rank0.attach(make_shard(rank0, "layer", torch.bfloat16, num_blocks=8))
    block = rank0.host_layout.config.block_stride
    # G2: 2 ranks x 8 blocks; rank 0 holds bytes [0, 8 blocks).
    other = ranks(rank=1, world=2, group="other", host_blocks=8)
    with pytest.raises(TransferError, match="already attached"):
        other.attach(make_shard(other, "layer", torch.bfloat16, num_blocks=8))
    overlap = ranks(rank=1, world=2, group="eng", host_blocks=4)        # [4, 8) blocks: inside rank 0's
    with pytest.raises(TransferError, match=f"overlap \\[0, {8 * block}\\)"):
        overlap.attach(make_shard(overlap, "layer", torch.bfloat16, num_blocks=8))
    past = ranks(rank=1, world=2, group="eng", host_blocks=9)           # [9, 18) blocks of a 16-block G2
    with pytest.raises(TransferError, match=f"segment holds {16 * block}"):
        past.attach(make_shard(past, "layer", torch.bfloat16, num_blocks=8))
    # rank 0 is untouched by all that
    tensors = rank0._shared.tensors
    fill(tensors, "layer", seed=3)
    out = round_trip(rank0, tensors, "layer", [0, 1], [6, 7], into=[5, 4])
    assert out["after"] == out["before"]


def test_disk_worker_refuses_a_group_of_several_ranks(ranks, tmp_path):
    """kvbm-workers with a disk tier (started here, as a shared instance would be); the ranks come
    with a config without one (ShardTransfers itself refuses TP with a disk tier). The ranks register
    with the D2H/H2D workers only (the disk worker sees the engine's scheduler side), so both attach;
    registrations of one group that do reach the disk worker are refused past the first."""
    from kvbm.hashing import layout_fingerprint, model_id
    from kvbm.transfer.launcher import connect_workers
    from kvbm.wire import protocol as P
    rank0 = ranks(rank=0, world=2, group="eng", host_blocks=8)
    disk_cfg = shard_config(rank0.config.runtime_dir, rank0.config.instance_id, disk_path=str(tmp_path / "disk"),
                            disk_blocks=16)
    tensors0 = make_shard(rank0, "layer", torch.bfloat16, num_blocks=8)
    from kvbm.layout import detect_layout
    g2 = 2 * 8 * detect_layout(tensors0).config.block_stride
    workers = WorkersProcess(disk_cfg, g2)
    tms = []
    try:
        workers.start(60)
        rank0.attach(tensors0)                 # offset 0, alone in its group: accepted, as an engine
        assert "h2disk" in {p.label for p in rank0.transfers.paths}
        rank1 = ranks(rank=1, world=2, group="eng", host_blocks=8)
        rank1.attach(make_shard(rank1, "layer", torch.bfloat16, num_blocks=8))   # D2H/H2D only: accepted
        layout, host = rank0.device_layout, rank0.host_layout
        store = {"blocks": 16, "fingerprint": layout_fingerprint(layout.config), "model": model_id(None),
                 "cold": False}
        for r in range(2):
            tms.append(connect_workers(disk_cfg, g2, "G2", start=False, engine_id=f"eng/d{r}")[0])
        tms[0].register(layout, host, None, 30, disk=store, group="eng", paths=P.DISK_PATHS)
        with pytest.raises(TransferError, match="disk tier with tensor parallelism is not supported"):
            tms[1].register(layout, host, None, 30, disk=store, group="eng", host_offset=host.total_bytes,
                            paths=P.DISK_PATHS)
    finally:
        for tm in tms:
            tm.close()
        for st in (rank0,):
            st.close()
        workers.stop()


# ---- TP 2 as two processes ----------------------------------------------------------------------

def test_tp2_two_processes_share_one_kvbm_workers(tmp_path, request):
    tp2_two_processes(tmp_path, request, "cpu")


def test_register_placement_fields_are_checked():
    from kvbm.errors import ProtocolError
    from kvbm.wire import protocol as P
    assert P.register_placement({}) == ("", 0)
    assert P.register_placement({"group": "eng", "host_offset": 4096}) == ("eng", 4096)
    for bad in ({"group": 3}, {"group": "g" * (P.MAX_ENGINE_ID + 1)}, {"host_offset": -1},
                {"host_offset": 1.0}, {"host_offset": True}, {"host_offset": 2**49}):
        with pytest.raises(ProtocolError):
            P.register_placement(bad)


def test_data_parallel_replicas_share_g2_and_the_instance_outlives_its_starter(ranks):
    """shared_g2 (the vLLM connector's data-parallel replicas, TP 1): two replicas' ranks on one
    kvbm-workers, each joined to the shared G2 with its scheduler side (a metadata-only
    KvBlockManager): what replica 0 stored, replica 1 matches and loads byte for byte. Replica 0
    closing first (it started the instance) leaves it running for replica 1; once replica 1 has
    left too, it stops by itself (shared_idle_exit_s)."""
    import dataclasses
    import time

    from kvbm.manager import KvBlockManager
    from kvbm.transfer.launcher import find_instance
    from tests.support.shard_helpers import block_bytes

    sides = []
    for dp in (0, 1):
        st = ranks(group=f"inst-dp{dp}", host_blocks=16, shared_g2=True, shared_idle_exit_s=1)
        tensors = make_shard(st, "layer", torch.float16, num_blocks=16)
        fill(tensors, "layer", seed=40 + dp)
        st.attach(tensors)
        kv = KvBlockManager(dataclasses.replace(st.config, host_blocks=16, device_blocks=0))
        kv.join_shared_g2(st.device_layout.config, engine_id=f"inst-dp{dp}/sched", timeout=30)
        assert kv.shared_g2.namespace == st._lease.namespace and kv.shared_g2.block_offset == st._lease.block_offset
        sides.append((st, tensors, kv))
    (a, ta, ka), (b, tb, kb) = sides
    hashes = [101, 102]
    host = ka.shared_g2.registry.allocate(2)
    a.store([3, 9], host).result(30)
    ka.shared_g2.registry.complete(host)
    ka.shared_g2.registry.register(host, hashes)
    ka.shared_g2.registry.release(host)
    got = kb.shared_g2.registry.match(hashes)          # replica 1 finds replica 0's blocks
    assert len(got) == 2
    b.load(got, [5, 6]).result(30)
    assert block_bytes(tb, "layer", [5, 6]) == block_bytes(ta, "layer", [3, 9])
    kb.shared_g2.registry.release(got)

    a.close()                                            # the starter goes; replica 1 stays attached
    ka.close()
    assert find_instance(b.config).state == "running"
    b.store([1], [0]).result(30)                        # and its transfers still run
    b.close()
    kb.close()
    deadline = time.monotonic() + 30
    while find_instance(b.config).state == "running":
        assert time.monotonic() < deadline, "the shared instance did not stop once idle"
        time.sleep(0.1)


def test_data_parallel_replicas_of_two_tensor_parallel_ranks_share_g2_rank_by_rank(ranks):
    """shared_g2 with TP 2: G2 is a region per rank; rank r of every replica registers its
    namespace's part of region r. Replica 0's two ranks store their shards of two blocks, replica
    1's scheduler side matches them and its two ranks load each its own shard, byte for byte; the
    path workers refuse a rank that asks for another region's bytes."""
    import dataclasses

    from kvbm.manager import KvBlockManager
    from tests.support.shard_helpers import block_bytes

    replicas = []
    for dp in (0, 1):
        rank_sides = []
        for rank in (0, 1):
            st = ranks(rank=rank, world=2, group=f"tp-dp{dp}", host_blocks=8, shared_g2=True, shared_idle_exit_s=1)
            tensors = make_shard(st, "layer", torch.float16, num_blocks=8)
            fill(tensors, "layer", seed=60 + 2 * dp + rank)
            st.attach(tensors)
            rank_sides.append((st, tensors))
        r0, r1 = rank_sides[0][0], rank_sides[1][0]
        assert r1.host_offset - r0.host_offset == 8 * r0.host_layout.block_stride   # a region of 8 blocks each
        kv = KvBlockManager(dataclasses.replace(rank_sides[0][0].config, host_blocks=8, device_blocks=0))
        kv.join_shared_g2(rank_sides[0][0].device_layout.config, engine_id=f"tp-dp{dp}/sched", timeout=30)
        replicas.append((rank_sides, kv))
    (ranks_a, ka), (ranks_b, kb) = replicas
    host = ka.shared_g2.registry.allocate(2)
    for st, _ in ranks_a:
        st.store([2, 6], host).result(30)
    ka.shared_g2.registry.complete(host)
    ka.shared_g2.registry.register(host, [7, 8])
    got = kb.shared_g2.registry.match([7, 8])
    assert len(got) == 2
    for (st_b, tb), (_, ta) in zip(ranks_b, ranks_a):
        st_b.load(got, [0, 1]).result(30)
        assert block_bytes(tb, "layer", [0, 1]) == block_bytes(ta, "layer", [2, 6])   # its own rank's shard
    kb.shared_g2.registry.release(got)
    ka.shared_g2.registry.release(host)
    for rank_sides, kv in reversed(replicas):
        for st, _ in reversed(rank_sides):
            st.close()
        kv.close()
