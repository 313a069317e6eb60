"""Configuration at run time: the settings an engine gives the kvbm-workers it starts
(kvbm/transfer/launcher.py: the child runs on the engine's resolved settings, whatever KVBM_* the
engine's environment holds, every tier size given in the environment reaching it in the engine's
unit); /dev/shm room checked before a large segment is made; kvbm-workers' usage errors as one line
and exit status 2."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest

from kvbm.cli import ask_status, build_parser, config_from_args
from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError
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


def test_the_disk_read_settings_reach_the_disk_worker(monkeypatch, tmp_path):
    """disk_read_blocks / disk_read_inflight (not the defaults) reach an embedded kvbm-workers
    through its environment, and its supervisor hands them to the disk worker's flags."""
    from kvbm.workers.supervisor import _disk_worker_args
    cfg = KvbmConfig(layout=LAYOUT, host_blocks=64, disk_blocks=8, disk_path=str(tmp_path / "g3"),
                     disk_read_blocks=4, disk_read_inflight=12, instance_id="readtest")
    proc = WorkersProcess(cfg, 64 * LAYOUT.block_bytes)
    env = proc.child_env()
    assert (env["KVBM_DISK_READ_BLOCKS"], env["KVBM_DISK_READ_INFLIGHT"]) == ("4", "12")
    for var in [v for v in os.environ if v.startswith("KVBM_")]:
        monkeypatch.delenv(var)
    for var in [v for v in env if v.startswith("KVBM_")]:
        monkeypatch.setenv(var, env[var])
    child = config_from_args(build_parser().parse_args(proc.command()[3:]))
    assert (child.disk_read_blocks, child.disk_read_inflight) == (4, 12)
    flags = _disk_worker_args(child, str(tmp_path / "g3"))
    assert flags[flags.index("--read-blocks") + 1] == "4" and flags[flags.index("--read-inflight") + 1] == "12"
    from kvbm.workers.disk_worker import parse_args
    worker = parse_args(["--path", "h2disk", "--gen", "1", "--endpoint", "ipc:///x", "--control", "ipc:///y",
                         "--keys-dir", str(tmp_path), "--segment", "s", "--segment-size", "1", *flags])
    assert (worker.read_blocks, worker.read_inflight) == (4, 12)


def _round_trip(kv: KvBlockManager) -> None:
    tensors = kv.create_device_tensors()
    kv.register_device_tensors(tensors, timeout=DEADLINE)
    for t in tensors:
        t.copy_(__import__("torch").randint(0, 256, t.shape, dtype=__import__("torch").uint8))
    before = kv.device_layout.block_bytes_of(tensors, 3)
    assert kv.offload([3], [42]).result(DEADLINE).value.moved == 1
    held = kv.pool(Tier.G2).lookup(np.array([42, *kv.keys([42])], np.uint64)).tolist()
    assert (held[0] >= 0, held[1] >= 0) == (not kv.config.salt, True)   # G2 holds the salted key
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
    engine and KVBM_HOST_BLOCKS from the environment it inherited. KVBM_SALT reaches G2's keys."""
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("KVBM_SALT", "model-a")
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


# ---- /dev/shm room ----------------------------------------------------------------------------------
def test_cpu_mode_device_larger_than_dev_shm_is_refused_with_the_numbers(embedded_env, monkeypatch):
    import kvbm.shm
    monkeypatch.setattr(kvbm.shm, "shm_space", lambda: (100 * 2**13, 10**9))   # room for 100 blocks
    with KvBlockManager(layout=LAYOUT, device_blocks=128, host_blocks=16) as kv:
        with pytest.raises(ConfigError, match=r"the CPU-mode emulated device \(128 blocks of 8192 bytes\) needs "
                                              r"0.001 GB of /dev/shm, which has 0.001 GB free of 1.000 GB"):
            kv.create_device_tensors()
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{kv.config.instance_id}-")]


def test_g2_larger_than_dev_shm_is_refused_before_kvbm_workers_starts(embedded_env, monkeypatch):
    import kvbm.shm
    with KvBlockManager(layout=LAYOUT, device_blocks=16, host_blocks=4096) as kv:
        tensors = kv.create_device_tensors()
        monkeypatch.setattr(kvbm.shm, "shm_space", lambda: (2**20, 2**30))
        with pytest.raises(ConfigError, match=r"G2 \(4096 blocks of 8192 bytes\) needs 0.034 GB of /dev/shm"):
            kv.register_device_tensors(tensors, timeout=DEADLINE)
        assert kv.workers_process is None


def test_a_segment_taking_most_of_dev_shm_is_logged_with_the_numbers(embedded_env, monkeypatch, caplog):
    import kvbm.shm
    monkeypatch.setattr(kvbm.shm, "shm_space", lambda: (3 * 2**20, 2**30))   # 3 MiB free; the device takes 1 MiB
    with KvBlockManager(layout=LAYOUT, device_blocks=128, host_blocks=16) as kv, \
            caplog.at_level("WARNING", logger="kvbm.shm"):
        kv.create_device_tensors()
    assert "takes 0.001 GB of /dev/shm" not in caplog.text          # a third of what is free: no word
    caplog.clear()
    monkeypatch.setattr(kvbm.shm, "shm_space", lambda: (int(1.5 * 2**20), 2**30))
    with KvBlockManager(layout=LAYOUT, device_blocks=128, host_blocks=16) as kv, \
            caplog.at_level("WARNING", logger="kvbm.shm"):
        kv.create_device_tensors()
    assert "the CPU-mode emulated device (128 blocks of 8192 bytes) takes 0.001 GB of /dev/shm: 67% of the " \
           "0.002 GB free (1.074 GB in all)" in caplog.text


# ---- kvbm-workers: usage errors --------------------------------------------------------------------
def _cli(tmp_path, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", "kvbm.cli", "--runtime-dir", str(tmp_path), "--force-cpu",
                           "--interval", "0", "--instance-id", f"c{uuid.uuid4().hex[:8]}", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _one_line_usage_error(out: subprocess.CompletedProcess, text: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_metrics_port_in_use_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _cli(tmp_path, "--host-size", "4MB", "--duration", "5", "--metrics-port", str(port))
    _one_line_usage_error(out, f"metrics port {port} on 127.0.0.1: Address already in use; pick another --metrics-port")
    assert os.listdir(tmp_path) == []   # refused before anything was made


@pytest.mark.parametrize("layout, text", [
    ("layers=abc,outer=2,page=16,inner=64", "--layout: layers expects an integer, got 'abc'"),
    ("layers=2,outer=2", "--layout: 'layers=2,outer=2' lacks inner, page"),
    ("layers=2,outer=2,page=16,inner=64,dtype=float17", "unsupported KV dtype 'float17'"),
    ("layers=2,outr=2,page=16,inner=64", "--layout: unknown key 'outr'"),
])
def test_bad_layout_is_one_line_and_exit_2(tmp_path, layout, text):
    _one_line_usage_error(_cli(tmp_path, "--duration", "3", "--host-blocks", "4", "--layout", layout), text)


@pytest.mark.parametrize("args, text", [
    (("--log-level", "loud"), "log_level: expected one of"),
    (("--copy-threads", "100000"), "copy_threads: expected an integer in [0, 1024], got 100000"),
    (("--host-size", "nan"), "host_size: expected a size like '64GB' or '512MiB', got 'nan'"),
    (("--host-size", "0"), "host_size: 0 gives no host tier"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, args, text):
    size = ["--host-size", "4MB"] if "--host-size" not in args else []
    _one_line_usage_error(_cli(tmp_path, "--duration", "3", *size, *args), text)


def test_non_finite_seconds_are_refused_by_argparse(tmp_path):
    out = _cli(tmp_path, "--host-size", "4MB", "--duration", "inf")
    assert out.returncode == 2 and "argument --duration: expected a finite number of seconds >= 0, got 'inf'" \
        in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_lower_case_log_level_is_taken(tmp_path):
    out = _cli(tmp_path, "--host-size", "4MB", "--duration", "0.3", "--log-level", "debug")
    assert out.returncode == 0 and " DEBUG " in out.stderr and "Traceback" not in out.stderr, out.stderr
