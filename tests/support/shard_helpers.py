"""Shared by tests/integration/test_shard_transfers.py, tests/gpu/test_shard_gpu.py and the rank
script tests/support/shard_rank.py: one TP rank's KV shard shaped as vLLM allocates it, filled with
random bytes, poisoned, and read back per block; the round trip store -> poison -> load.

Shapes ("kind"):
  "layer"   vLLM's per-layer list: LAYERS tensors of [2, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM]
  "cross"   one cross-layer tensor [num_blocks, LAYERS, 2, BLOCK_SIZE, HEADS, HEAD_DIM]
Kept free of hypothesis and pyzmq imports (the GPU machine has neither).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kvbm.config import KvbmConfig
from kvbm.transfer.shard_transfers import ShardTransfers

LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 4, 2, 16
KINDS = ("layer", "cross")
POISON = 0xA5
DEADLINE = 60.0


def shard_config(run_dir: str, instance: str, device: str = "cpu", **extra) -> KvbmConfig:
    return KvbmConfig(instance_id=instance, runtime_dir=run_dir, force_cpu=device == "cpu",
                      request_timeout_ms=20000, transport=os.environ.get("KVBM_TEST_TRANSPORT", "ipc"), **extra)


def shard_shape(kind: str, num_blocks: int) -> tuple[tuple[int, ...], int]:
    """(shape of one tensor, how many tensors) of a `kind` shard of num_blocks blocks."""
    if kind == "layer":
        return (2, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM), LAYERS
    if kind == "cross":
        return (num_blocks, LAYERS, 2, BLOCK_SIZE, HEADS, HEAD_DIM), 1
    raise ValueError(kind)


def make_shard(st: ShardTransfers, kind: str, dtype: torch.dtype, num_blocks: int, device: str = "cpu"):
    """The rank's KV tensors: in a shared segment (CPU) or on the GPU; what attach() takes (a list
    of per-layer tensors, or the one cross-layer tensor)."""
    shape, count = shard_shape(kind, num_blocks)
    if device == "cpu":
        tensors = st.shared_tensors(shape, dtype, count)
    else:
        tensors = [torch.empty(shape, dtype=dtype, device=device) for _ in range(count)]
    return tensors if kind == "layer" else tensors[0]


def _blocks_view(tensors, kind: str) -> list[torch.Tensor]:
    """uint8 views whose block index is dim 1 (layer: [2, blocks, ...]) or dim 0 (cross)."""
    if kind == "layer":
        return [t.view(torch.uint8) for t in tensors]
    return [tensors.view(torch.uint8)]


def fill(tensors, kind: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for view in _blocks_view(tensors, kind):
        view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8, generator=gen).to(view.device))


def poison(tensors, kind: str, blocks) -> None:
    index = torch.as_tensor(np.asarray(blocks, dtype=np.int64))
    for view in _blocks_view(tensors, kind):
        if kind == "layer":
            view[:, index.to(view.device)] = POISON
        else:
            view[index.to(view.device)] = POISON


def block_bytes(tensors, kind: str, blocks) -> list[bytes]:
    """Every byte of each block (all layers, K and V), in one fixed order."""
    views = _blocks_view(tensors, kind)
    return [b"".join((view[:, b] if kind == "layer" else view[b]).cpu().numpy().tobytes() for view in views)
            for b in np.asarray(blocks, dtype=np.int64).tolist()]


def host_image(st: ShardTransfers, tensors, blocks) -> list[bytes]:
    """What each device block looks like in G2 (the FULLY_CONTIGUOUS host layout: layer, outer, region)."""
    buffers = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
    return [st.device_layout.block_bytes_of(buffers, int(b)) for b in blocks]


def round_trip(st: ShardTransfers, tensors, kind: str, device_blocks, host_blocks, into) -> dict:
    """store(device_blocks -> host_blocks), poison `into`, load(host_blocks -> into) with layer
    progress; returns what the test checks: the bytes before and after, the layers reached."""
    before = block_bytes(tensors, kind, device_blocks)
    st.store(device_blocks, host_blocks).result(DEADLINE)
    poison(tensors, kind, into)
    assert all(b == bytes([POISON]) * len(b) for b in block_bytes(tensors, kind, into))
    fut = st.load(host_blocks, into)
    for layer in range(st.device_layout.config.num_layers):
        assert fut.wait_layer(layer, DEADLINE)
    result = fut.result(DEADLINE)
    if (tensors[0] if isinstance(tensors, (list, tuple)) else tensors).is_cuda:
        torch.cuda.synchronize()
    return {"before": before, "after": block_bytes(tensors, kind, into), "layers": fut.layers_ready,
            "blocks": result.blocks}


def rank_factory(tmp_path, request, device: str = "cpu"):
    """make(rank, world, group, host_blocks, **config) -> a ShardTransfers of one instance per
    test (its runtime dir under tmp_path, on `device`); each closed, and every kvbm-workers killed
    by pid, at the end. What the CPU and the CUDA tests' fixtures return."""
    import signal
    import uuid

    from tests.support.pipeline_harness import pid_alive
    instance = f"s{uuid.uuid4().hex[:8]}"
    made: list[ShardTransfers] = []

    def make(rank=0, world=1, group="eng", host_blocks=8, shared_g2=False, **config) -> ShardTransfers:
        cfg = shard_config(str(tmp_path / "run"), instance, device=device, **config)
        st = ShardTransfers(cfg, rank, world, group, host_blocks, shared_g2=shared_g2)
        made.append(st)
        return st

    def finish():
        pids = [st.workers_process.pid for st in made if st.workers_process is not None]
        for st in reversed(made):
            st.close()
        for pid in pids:
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    request.addfinalizer(finish)
    return make

