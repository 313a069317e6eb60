"""The disk tier with kvbm-workers in CUDA mode: G2 pinned in the D2H/H2D workers (not in the disk
worker), engine KV tensors on the GPU through CUDA IPC; G2 -> G3 -> GPU byte for byte through the
staged path (NIXL read into G2, then H2D), the GDS probe's verdict reported in the worker's status.

Needs pyzmq, msgpack and NIXL. Run: python -m pytest -q tests/gpu/test_disk_gpu.py
"""
from __future__ import annotations

import numpy as np
import pytest

from kvbm.errors import DiskError
from kvbm.pools import Tier
from kvbm.workers.disk.io import load_nixl
from tests.gpu.test_pipeline_gpu import cuda_pipeline, fill_random, gather, poison  # noqa: F401

pytestmark = pytest.mark.gpu
DEADLINE = 60.0

try:
    load_nixl()
except DiskError as _err:
    pytest.skip(f"needs NIXL: {_err}", allow_module_level=True)


def test_g2_to_g3_to_gpu_round_trip_is_byte_exact(cuda_pipeline, tmp_path):  # noqa: F811
    pipe = cuda_pipeline(device_blocks=256, host_blocks=48, disk_blocks=256, disk_path=str(tmp_path / "g3"))
    kv = pipe.kv
    fill_random(pipe, 11)
    rng = np.random.default_rng(5)
    hashes = rng.integers(1, 2**63, size=64, dtype=np.int64).astype(np.uint64)
    expected = gather(pipe, np.arange(64))
    for i in range(0, 64, 4):
        kv.offload(np.arange(i, i + 4), hashes[i:i + 4]).result(DEADLINE)
        kv.flush_disk(DEADLINE)
    with kv.lock:
        in3 = kv.pool(Tier.G3).lookup(hashes) >= 0
        in2 = kv.pool(Tier.G2).lookup(hashes) >= 0
    assert in3[:16].all() and not in2[:16].any()
    poison(pipe)
    q = np.concatenate([hashes[-8:], hashes[:16]])
    fut = kv.onboard(q, np.arange(100, 124))
    for layer in range(pipe.device_layout.config.num_layers):
        assert fut.wait_layer(layer, DEADLINE)
    res = fut.result(DEADLINE).value
    assert (res.loaded, res.from_host, res.from_disk, res.read_path) == (24, 8, 16, "staged")
    got = gather(pipe, np.arange(100, 124))
    assert (got.numpy() == expected[:, :, np.r_[56:64, 0:16]].numpy()).all()
    st = pipe.status()
    g3 = st["tiers"]["g3"]
    print("GDS:", g3["gds"], "| read path:", g3["read_path"], "| backend:", g3["backend"])
    assert g3["read_path"] == "staged" and g3["gds"].startswith(("unavailable", "probe read passed"))
    assert st["workers"]["h2disk"]["pin_s"] == 0.0 and st["workers"]["h2d"]["pin_s"] > 0.0
