"""Starting and finding kvbm-workers from the engine's process.

Parts:
  WorkersProcess    a kvbm-workers started by this engine (the embedded default): spawned with the
                    engine's settings, asked to exit with it (PR_SET_PDEATHSIG -> SIGTERM), stopped
                    with SIGTERM (SIGKILL past a deadline)
  control_endpoint  where a running instance listens (ipc path or tcp port from the config, else its
                    endpoints.json)

Order: the manager asks control_endpoint() first; only when no instance answers for its
instance_id does it start a WorkersProcess and wait for its endpoints.json.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from kvbm.config import KvbmConfig
from kvbm.errors import KvbmError, KvbmTimeoutError
from kvbm.wire.channel import Endpoints

logger = logging.getLogger(__name__)


def _package_root() -> str:
    import kvbm
    return os.path.dirname(os.path.dirname(os.path.abspath(kvbm.__file__)))


def control_endpoint(config: KvbmConfig, timeout: float = 0.0) -> str | None:
    rundir = config.resolved_runtime_dir()
    deadline = time.monotonic() + timeout
    while True:
        found = Endpoints.read(rundir)
        if found is not None:
            return found.control
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


class WorkersProcess:
    """kvbm-workers as a child of the engine."""

    def __init__(self, config: KvbmConfig, host_bytes: int, log_level: str = "WARNING") -> None:
        self.config = config
        self.host_bytes = host_bytes
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", c.instance_id, "--host-size", str(self.host_bytes),
               "--transport", c.transport, "--tcp-port", str(c.tcp_port), "--interval", "0",
               "--exit-with-parent", "--parent-pid", str(os.getpid()), "--log-level", self.log_level]
        if c.runtime_dir:
            cmd += ["--runtime-dir", c.runtime_dir]
        if c.force_cpu:
            cmd.append("--force-cpu")
        if c.disk_path and (c.disk_blocks or c.disk_size):
            cmd += ["--disk-path", c.disk_path, "--disk-size", str(c.disk_size or 0)]
        return cmd

    def start(self, timeout: float = 60.0) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = _package_root() + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("KVBM_CONFIG", None)  # this engine's resolved settings travel as flags and these vars
        env.update({"KVBM_MAX_BATCH_BLOCKS": str(self.config.max_batch_blocks),
                    "KVBM_COPY_THREADS": str(self.config.copy_threads),
                    "KVBM_WORKER_DELAY_MS": str(self.config.worker_delay_ms)})
        if self.config.disk_blocks:
            env["KVBM_DISK_BLOCKS"] = str(self.config.disk_blocks)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KvbmError(f"kvbm-workers exited with code {self.proc.returncode} during start-up")
            found = Endpoints.read(self.config.resolved_runtime_dir())
            if found is not None:
                return found.control
            time.sleep(0.02)
        self.stop()
        raise KvbmTimeoutError(f"kvbm-workers did not come up within {timeout} s")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("kvbm-workers pid %d ignored SIGTERM for %.0f s; killing it", self.proc.pid, timeout)
                self.proc.kill()
                self.proc.wait(5)
        code, self.proc = self.proc.returncode, None
        return code
