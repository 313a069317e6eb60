"""The settings an engine gives the kvbm-workers it starts (kvbm/transfer/launcher.py): the child
runs on the engine's resolved settings, whatever KVBM_* the engine's environment holds, and every
tier size given in the environment reaches it in the engine's unit."""
from __future__ import annotations

import os
import signal
import uuid

import numpy as np
import pytest

from kvbm.cli import ask_status, build_parser, config_from_args
from kvbm.config import KvbmConfig
from kvbm.layout import LayoutConfig
from kvbm.manager import KvBlockManager
from kvbm.pools import Tier
from kvbm.transfer.launcher import WorkersProcess
from tests.support.pipeline_harness import pid_alive

DEADLINE = 30.0
LAYOUT = LayoutConfig(num_layers=2, outer_dim=2, page_size=16, inner_dim=64, dtype="float16")  # 8 KiB blocks


def test_child_environment_holds_no_setting_of_the_engines(monkeypatch, tmp_path):
    for var, value in {"KVBM_HOST_BLOCKS": "64", "KVBM_HOST_GB": "1", "KVBM_DISK_BLOCKS": "8",
                       "KVBM_CONFIG": str(tmp_path / "none.toml"), "KVBM_POLICY": "lru", "KVBM_HOTS_GB": "2"}.items():
        monkeypatch.setenv(var, value)
    cfg = KvbmConfig(layout=LAYOUT, host_blocks=64, disk_blocks=8, disk_path=str(tmp_path / "g3"),
                     max_batch_blocks=32, copy_threads=2, worker_delay_ms=5, instance_id="envtest")
    proc = WorkersProcess(cfg, 64 * LAYOUT.block_bytes)
    env = proc.child_env()
    assert sorted(k for k in env if k.startswith("KVBM_")) == \
        ["KVBM_COPY_THREADS", "KVBM_MAX_BATCH_BLOCKS", "KVBM_WORKER_DELAY_MS"]
    assert (env["KVBM_MAX_BATCH_BLOCKS"], env["KVBM_COPY_THREADS"], env["KVBM_WORKER_DELAY_MS"]) == ("32", "2", "5")
    args = build_parser().parse_args(proc.command()[3:])    # after `python -m kvbm.cli`
    for var in [v for v in os.environ if v.startswith("KVBM_")]:   # the child's environment, as it loads
        monkeypatch.delenv(var)
    for var in ("KVBM_COPY_THREADS", "KVBM_MAX_BATCH_BLOCKS", "KVBM_WORKER_DELAY_MS"):
        monkeypatch.setenv(var, env[var])
    child = config_from_args(args)
    assert (child.host_size, child.host_blocks) == (64 * LAYOUT.block_bytes, None)
    assert (child.disk_blocks, child.disk_size, child.disk_path) == (8, None, str(tmp_path / "g3"))
    assert (child.max_batch_blocks, child.copy_threads, child.worker_delay_ms) == (32, 2, 5)


def _round_trip(kv: KvBlockManager) -> None:
    tensors = kv.create_device_tensors()
    kv.register_device_tensors(tensors, timeout=DEADLINE)
    for t in tensors:
        t.copy_(__import__("torch").randint(0, 256, t.shape, dtype=__import__("torch").uint8))
    before = kv.device_layout.block_bytes_of(tensors, 3)
    assert kv.offload([3], [42]).result(DEADLINE).value.moved == 1
    for t in tensors:
        t.zero_()
    assert kv.onboard([42], [7]).result(DEADLINE).value.loaded == 1
    assert kv.device_layout.block_bytes_of(tensors, 7) == before


@pytest.fixture
def embedded_env(monkeypatch, tmp_path):
    """CPU mode, sockets under tmp_path, and the engine's KVBM_* as a user would set them."""
    monkeypatch.setenv("KVBM_FORCE_CPU", "1")
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    for var in [v for v in os.environ if v.startswith("KVBM_") and v not in ("KVBM_FORCE_CPU", "KVBM_RUNTIME_DIR")]:
        monkeypatch.delenv(var)
    started: list[int] = []
    yield started
    for pid in started:   # the manager stops its child; this is for a failed assertion on the way
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("var, value, blocks", [("KVBM_HOST_BLOCKS", "24", 24),
                                                ("KVBM_HOST_SIZE", "256KiB", 32),
                                                ("KVBM_HOST_GB", "0.0004", 48)])
def test_embedded_start_with_the_host_size_in_the_environment(embedded_env, monkeypatch, var, value, blocks):
    """KVBM_HOST_BLOCKS, named in the README, used to stop the child: it got --host-size from the
    engine and KVBM_HOST_BLOCKS from the environment it inherited."""
    monkeypatch.setenv(var, value)
    with KvBlockManager(layout=LAYOUT, device_blocks=16, instance_id=f"e{uuid.uuid4().hex[:8]}") as kv:
        assert kv.pools[Tier.G2].num_blocks == blocks
        try:
            _round_trip(kv)
        finally:
            if kv.workers_process is not None:
                embedded_env.append(kv.workers_process.pid)
        assert ask_status(kv.config)["tiers"]["g2"]["bytes"] == blocks * LAYOUT.block_bytes


@pytest.mark.parametrize("var, value", [("KVBM_DISK_BLOCKS", "8"), ("KVBM_DISK_GB", "0.001")])
def test_embedded_start_with_the_disk_size_in_the_environment(embedded_env, monkeypatch, tmp_path, var, value):
    monkeypatch.setenv("KVBM_HOST_BLOCKS", "16")
    monkeypatch.setenv("KVBM_DISK_PATH", str(tmp_path / "g3"))
    monkeypatch.setenv(var, value)
    with KvBlockManager(layout=LAYOUT, device_blocks=16, instance_id=f"e{uuid.uuid4().hex[:8]}") as kv:
        try:
            _round_trip(kv)
        finally:
            if kv.workers_process is not None:
                embedded_env.append(kv.workers_process.pid)
        assert ask_status(kv.config)["tiers"]["g3"]["path"] == str(tmp_path / "g3")
    assert not np.any([pid_alive(pid) for pid in embedded_env])
