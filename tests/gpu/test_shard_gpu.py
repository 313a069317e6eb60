"""ShardTransfers on CUDA (kvbm/transfer/shard_transfers.py): one rank's KV shard on the GPU shaped
as vLLM allocates it (per-layer [2, num_blocks, block_size, heads, head_dim], and one cross-layer
tensor), reached by kvbm-workers in CUDA mode through CUDA IPC handles; store -> poison -> load
byte for byte with layer progress. The CPU twin is tests/integration/test_shard_transfers.py; both
use tests/support/shard_helpers.py.

Needs pyzmq and msgpack; no hypothesis. Run: python -m pytest -q tests/gpu/test_shard_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from tests.support.shard_helpers import KINDS, fill, make_shard, rank_factory, round_trip
from tests.support.shard_tp2 import tp2_two_processes

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_rank(tmp_path, request):
    """make(host_blocks=...) -> a rank 0 of 1 on the GPU (shard_helpers.rank_factory)."""
    make = rank_factory(tmp_path, request, device="cuda")
    return lambda host_blocks=16: make(host_blocks=host_blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_rank_round_trip(cuda_rank, kind, dtype):
    st = cuda_rank()
    tensors = make_shard(st, kind, dtype, num_blocks=32, device="cuda")
    fill(tensors, kind, seed=11)
    st.attach(tensors)
    assert st.transfers.cuda
    out = round_trip(st, tensors, kind, [3, 0, 31, 8, 17], [7, 2, 5, 0, 15], into=[1, 4, 9, 12, 30])
    assert out["after"] == out["before"]
    assert out["layers"] == st.device_layout.config.num_layers


def test_cuda_tp2_two_processes_share_one_kvbm_workers(tmp_path, request):
    """TP 2 on the GPU: two rank processes, each its shard on the device, one kvbm-workers."""
    tp2_two_processes(tmp_path, request, "cuda")
