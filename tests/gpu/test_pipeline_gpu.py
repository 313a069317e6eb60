"""The whole pipeline on CUDA: kvbm-workers in CUDA mode (G2 pinned with cudaHostRegister in each path
worker), the engine's KV tensors on the GPU reached through CUDA IPC handles, offload -> poison ->
onboard byte-exact, layer progress, and a killed worker re-registering the tensors in its successor.

Needs pyzmq and msgpack; no hypothesis. Run: python -m pytest -q tests/gpu/test_pipeline_gpu.py
"""
from __future__ import annotations

import os
import signal
import uuid

import numpy as np
import pytest

from kvbm.errors import TransferError
from kvbm.layout import InnerOrder, LayoutConfig
from kvbm.pools import Tier
from tests.support.pipeline_harness import Pipeline, wait_for

pytestmark = pytest.mark.gpu

LAYOUT = LayoutConfig(num_layers=8, outer_dim=2, page_size=16, inner_dim=256, dtype="bfloat16")  # 128 KiB blocks
DEADLINE = 60.0


@pytest.fixture
def cuda_pipeline(tmp_path, request):
    made = []

    def make(**kwargs):
        kwargs.setdefault("layout", LAYOUT)
        (tmp_path / f"p{len(made)}").mkdir()
        pipe = Pipeline(tmp_path / f"p{len(made)}", instance=f"g{uuid.uuid4().hex[:8]}", device="cuda", **kwargs)
        made.append(pipe)
        request.addfinalizer(pipe.kill_all)
        return pipe.start()

    return make


def layer_views(pipe):
    """[outer, blocks, region_bytes] uint8 CUDA view of each layer tensor."""
    lay, cfg = pipe.device_layout, pipe.device_layout.config
    if lay.order is InnerOrder.OUTER_MAJOR:
        return [t.view(cfg.outer_dim, lay.num_blocks, cfg.region_bytes) for t in pipe.tensors]
    return [t.view(lay.num_blocks, cfg.outer_dim, cfg.region_bytes).transpose(0, 1) for t in pipe.tensors]


def gather(pipe, blocks):
    import torch
    idx = torch.as_tensor(np.asarray(blocks, dtype=np.int64), device=pipe.tensors[0].device)
    return torch.stack([v[:, idx, :] for v in layer_views(pipe)]).cpu()


def fill_random(pipe, seed: int) -> None:
    import torch
    gen = torch.Generator(device=pipe.tensors[0].device)
    gen.manual_seed(seed)
    for t in pipe.tensors:
        t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=t.device, generator=gen))
    torch.cuda.synchronize()


def poison(pipe) -> None:
    import torch
    for t in pipe.tensors:
        t.fill_(0xA5)
    torch.cuda.synchronize()


@pytest.mark.parametrize("order", [InnerOrder.OUTER_MAJOR, InnerOrder.BLOCK_MAJOR])
def test_cuda_offload_poison_onboard_is_byte_exact(cuda_pipeline, order):
    import torch
    pipe = cuda_pipeline(device_blocks=4096, host_blocks=4096, order=order, max_batch_blocks=256)
    kv = pipe.kv
    assert kv.transfers.cuda, "kvbm-workers should run in CUDA mode here"
    rng = np.random.default_rng(5)
    n = 3000
    src = rng.permutation(4096)[:n]
    hashes = rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    fill_random(pipe, 11)
    expected = gather(pipe, src)
    res = kv.offload(src, hashes).result(DEADLINE).value
    assert (res.moved, res.held) == (n, 0)
    again = kv.offload(src, hashes).result(DEADLINE).value
    assert (again.moved, again.held) == (0, n)
    poison(pipe)
    dst = rng.permutation(4096)[:n]
    fut = kv.onboard(hashes, dst)
    assert fut.wait_layer(0, timeout=DEADLINE)
    assert fut.result(DEADLINE).value.loaded == n
    assert fut.layers_ready == LAYOUT.num_layers
    assert torch.equal(gather(pipe, dst), expected)
    untouched = np.setdiff1d(np.arange(4096), dst)[:32]
    assert bool((gather(pipe, untouched) == 0xA5).all())
    kv.pool(Tier.G2).registry.check_invariants()


def test_cuda_workers_pin_g2(cuda_pipeline):
    pipe = cuda_pipeline(device_blocks=256, host_blocks=2048)
    st = pipe.status()
    assert st["cuda"] is True
    for label in ("d2h", "h2d"):
        assert st["workers"][label]["pin_s"] > 0
    gb = 2048 * LAYOUT.block_stride / 1e9
    print(f"\npinning {gb:.3f} GB: d2h {st['workers']['d2h']['pin_s']:.4f} s, "
          f"h2d {st['workers']['h2d']['pin_s']:.4f} s")


def test_cuda_worker_killed_then_reregistered(cuda_pipeline):
    import torch
    pipe = cuda_pipeline(device_blocks=1024, host_blocks=1024, worker_delay_ms=400, max_batch_blocks=64)
    kv = pipe.kv
    pids = pipe.worker_pids()
    rng = np.random.default_rng(9)
    blocks = np.arange(512)
    hashes = rng.integers(1, 2**63, size=512, dtype=np.int64).astype(np.uint64)
    fill_random(pipe, 3)
    expected = gather(pipe, blocks)
    fut = kv.offload(blocks, hashes)
    from kvbm.wire import protocol as P
    wait_for(lambda: kv.transfers._paths[P.Path.D2H].outstanding, 10, "a D2H request at the worker")
    os.kill(pids["d2h"], signal.SIGKILL)
    with pytest.raises(TransferError, match="died"):
        fut.result(DEADLINE)
    assert (kv.pool(Tier.G2).registry.lookup(hashes) == -1).all()
    wait_for(lambda: pipe.worker_pids()["d2h"] != pids["d2h"], DEADLINE, "a new d2h worker")
    assert kv.offload(blocks, hashes).result(DEADLINE).value.moved == 512
    poison(pipe)
    assert kv.onboard(hashes, blocks).result(DEADLINE).value.loaded == 512
    assert torch.equal(gather(pipe, blocks), expected)
