"""CUDA IPC at shutdown (issue 12): an engine process that shared its KV tensors with the path
workers, moved blocks and closed exits without torch's "Producer process has been terminated before
all shared CUDA tensors released" (kvbm/transfer/memory_map.py: each registration message carries
shares of its own, dropped after the workers dropped their mappings). Both engine sides:
KvBlockManager, and ShardTransfers (a vLLM rank); and an engine whose D2H worker was SIGKILLed
while it held a share (released in its place once its death is confirmed), registered again with
the next generation. In a child process: the warning is printed at its exit.

Needs pyzmq and msgpack; no hypothesis. Run: python -m pytest -q tests/gpu/test_ipc_exit_gpu.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

WARNING = "Producer process has been terminated"

# {kill}: what happens between registering and the checked round trip.
ENGINE = """
import os, signal, sys, time, torch
import kvbm
from kvbm.cli import ask_status
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.wire import protocol as P
lc = LayoutConfig(num_layers=4, outer_dim=2, page_size=16, inner_dim=128, dtype="bfloat16")
cfg = kvbm.KvbmConfig(layout=lc, device_blocks=16, host_blocks=16, runtime_dir=sys.argv[1],
                      instance_id=sys.argv[2], request_timeout_ms=20000)
with kvbm.KvBlockManager(cfg) as kv:
    layout = BlockLayout(lc, LayoutType.LAYER_SEPARATE, 16)
    tensors = kv.create_device_tensors(layout, device="cuda")
    for t in tensors:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8))
    kv.register_device_tensors(tensors, layout)
    assert kv.transfers.cuda
{kill}
    before = layout.block_bytes_of(tensors, 3)
    kv.transfers.submit(P.Path.D2H, [3], [5]).result(60)
    for t in tensors:
        t.view(torch.uint8).fill_(0xA5)
    kv.transfers.submit(P.Path.H2D, [5], [9]).result(60)
    torch.cuda.synchronize()
    assert layout.block_bytes_of(tensors, 9) == before
print("ok", flush=True)
"""

# The D2H worker maps our shares, is SIGKILLed, and the next generation takes our registration.
KILL_D2H = """
    kv.transfers.submit(P.Path.D2H, [3], [6]).result(60)
    gen = kv.transfers.stats()["generations"]["d2h"]
    os.kill(ask_status(kv.config)["workers"]["d2h"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while kv.transfers.stats()["generations"]["d2h"] in (0, gen):
        assert time.monotonic() < deadline, "no new d2h generation registered"
        time.sleep(0.05)
"""

SHARD = """
import sys, torch
from tests.support.shard_helpers import fill, make_shard, round_trip, shard_config
from kvbm.transfer.shard_transfers import ShardTransfers
with ShardTransfers(shard_config(sys.argv[1], sys.argv[2], device="cuda"), 0, 1, "eng", 16) as st:
    tensors = make_shard(st, "layer", torch.bfloat16, num_blocks=16, device="cuda")
    fill(tensors, "layer", seed=5)
    st.attach(tensors)
    assert st.transfers.cuda
    out = round_trip(st, tensors, "layer", [3, 7], [0, 1], into=[9, 12])
    assert out["after"] == out["before"]
print("ok", flush=True)
"""


def _run(script: str, tmp_path, instance: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])   # for tests.support
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return subprocess.run([sys.executable, "-c", script, str(run_dir), instance], env=env, capture_output=True,
                          text=True, timeout=300)


SCRIPTS = {"kv_block_manager": ENGINE.format(kill=""), "shard_transfers": SHARD,
           "worker_killed": ENGINE.format(kill=KILL_D2H)}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_engine_exits_without_torch_ipc_warning(name, tmp_path):
    script = SCRIPTS[name]
    res = _run(script, tmp_path, f"ipc{os.getpid() % 10000}{list(SCRIPTS).index(name)}")
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), res.stdout + res.stderr
    assert WARNING not in res.stderr, res.stderr[-3000:]
