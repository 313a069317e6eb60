"""Starting and finding kvbm-workers from the engine's process.

Parts:
  WorkersProcess    a kvbm-workers started by this engine (the embedded default): spawned with the
                    engine's settings, asked to exit with it (PR_SET_PDEATHSIG -> SIGTERM), stopped
                    with SIGTERM (SIGKILL past a deadline)
  find_instance     the state of the instance named by the config: running (its lock is held and
                    its endpoints.json written), starting (lock held, no endpoints yet), dead (the
                    lock's holder is gone: a killed supervisor's leftovers), or absent
  control_endpoint  where a running instance listens (its endpoints.json); None when none runs
  connect_workers   what an engine (KvBlockManager) or a TP rank (ShardTransfers) does to reach its
                    instance: find it or start it (or wait for another process to start it), read
                    its client keys, connect a TransferManager

Order: the manager asks control_endpoint() first; only when no live instance owns its instance_id
does it start a WorkersProcess (whose supervisor removes a dead owner's leftovers when it takes the
lock) and wait for the endpoints.json written by that child. A TP rank other than 0 starts nothing:
it waits for rank 0's instance to run.

The embedded default gets the shared G2 registry too (--layout, from the engine's layout): engines
that connect to it later share its G2 and its cache. It lives as long as the engine that started
it, except one started for data-parallel replicas (idle_exit_s: ShardTransfers with shared_g2),
which stops once no engine has been attached for that long.

Settings: the child runs on the engine's resolved settings alone. They travel as flags (the G2 size
in bytes, as the engine sized it; the disk tier in the unit it was given) and as the three KVBM_*
variables set in child_env(); every other KVBM_* of the engine's environment, KVBM_CONFIG included,
is removed, so the child never reads a second time what the engine already resolved (an inherited
KVBM_HOST_BLOCKS beside the --host-size flag would give the child two host sizes).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from kvbm.config import DISK_READ_BLOCKS, DISK_READ_INFLIGHT, KvbmConfig, lane_spin_default, wait_spin_default
from kvbm.errors import KvbmError, KvbmTimeoutError, LifecycleError
from kvbm.layout import LayoutConfig
from kvbm.shm import RuntimeDir, check_shm_room
from kvbm.transfer.manager import TransferManager
from kvbm.wire.auth import ClientKeys
from kvbm.wire.channel import Endpoints

logger = logging.getLogger(__name__)


def layout_spec(layout: LayoutConfig) -> str:
    """The --layout flag of kvbm-workers for `layout` (kvbm.cli.parse_layout reads it back)."""
    return (f"layers={layout.num_layers},outer={layout.outer_dim},page={layout.page_size},"
            f"inner={layout.inner_dim},dtype={layout.dtype},alignment={layout.alignment}")


def _package_root() -> str:
    import kvbm
    return os.path.dirname(os.path.dirname(os.path.abspath(kvbm.__file__)))


@dataclass(frozen=True, slots=True)
class InstanceState:
    state: str                       # "running", "starting", "dead" or "absent"
    pid: int                         # the supervisor holding (or, when dead, last holding) the lock; 0: unknown
    endpoints: Endpoints | None      # when running


def find_instance(config: KvbmConfig) -> InstanceState:
    """What owns the config's instance now. The lock decides, not endpoints.json: a killed
    supervisor leaves its endpoints.json behind, and connecting to it would wait for nobody."""
    rundir = RuntimeDir(config.resolved_runtime_dir())
    pid, alive = rundir.owner()
    if alive:
        endpoints = Endpoints.read(rundir.path)
        return InstanceState("running" if endpoints is not None else "starting", pid, endpoints)
    leftovers = os.path.isdir(rundir.path) and bool(os.listdir(rundir.path))
    return InstanceState("dead" if leftovers else "absent", pid, None)


def control_endpoint(config: KvbmConfig, timeout: float = 0.0) -> str | None:
    """The control endpoint of the live instance of `config` (waiting up to `timeout` for one
    that is starting to write its endpoints); None when no live supervisor owns the instance."""
    deadline = time.monotonic() + timeout
    while True:
        found = find_instance(config)
        if found.state == "running":
            return found.endpoints.control
        if found.state == "dead":
            logger.warning("kvbm-workers of instance %s (pid %s) is dead; a fresh start removes its leftovers in %s",
                           config.instance_id, found.pid or "?", config.resolved_runtime_dir())
            return None
        if found.state == "absent" or time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def await_instance(config: KvbmConfig, timeout: float) -> str:
    """The control endpoint of the instance another process starts (TP rank 0 for the other
    ranks), waiting up to `timeout` while none runs yet; LifecycleError naming the instance past it."""
    deadline = time.monotonic() + timeout
    while True:
        found = find_instance(config)
        if found.state == "running":
            return found.endpoints.control
        if time.monotonic() >= deadline:
            raise LifecycleError(f"no kvbm-workers came up for instance {config.instance_id} within {timeout} s "
                                 f"({config.resolved_runtime_dir()}: {found.state}); rank 0 starts it")
        time.sleep(0.05)


def connect_workers(config: KvbmConfig, host_bytes: int, what: str, *, start: bool = True, wait: bool = False,
                    timeout: float = 60.0, engine_id: str | None = None, stats_fn=None,
                    layout: LayoutConfig | None = None, idle_exit_s: float = 0.0,
                    g2_ranks: int = 1) -> tuple[TransferManager, WorkersProcess | None]:
    """A TransferManager connected to the instance of `config`, and the WorkersProcess started for
    it (None when one ran already). With `start`, an instance that does not run is started with a
    G2 of `host_bytes` (`what` names it in a /dev/shm shortage) and, given the engine's `layout`,
    the shared G2 registry over it (kvbm.shared_g2: one block of G2 is one block of that layout);
    with `wait`, it is waited for (another process starts it); with neither, LifecycleError. The
    caller stops the process."""
    workers = None
    if wait:
        endpoint = await_instance(config, timeout)
    else:
        # A live instance (one that is starting is waited for); a dead one's leftovers are removed
        # by the supervisor started here when it takes the instance lock.
        endpoint = control_endpoint(config, timeout)
    if endpoint is None:
        if not start:
            raise LifecycleError(f"no kvbm-workers runs for instance {config.instance_id} "
                                 f"({config.resolved_runtime_dir()})")
        check_shm_room(host_bytes, what)
        workers = WorkersProcess(config, host_bytes, layout=layout, idle_exit_s=idle_exit_s, g2_ranks=g2_ranks)
        endpoint = workers.start(timeout)
        supervisor_pid = workers.pid
    else:
        supervisor_pid = find_instance(config).pid or None  # the lock file's, not the welcome's word
    try:
        keys = ClientKeys.read(config.resolved_runtime_dir())
        if keys is None:
            raise LifecycleError(f"kvbm-workers at {endpoint} left no client keys in "
                                 f"{config.resolved_runtime_dir()}; it serves only peers that have them")
        tm = TransferManager(endpoint, engine_id=engine_id, max_inflight_bytes=config.max_inflight_bytes,
                             max_batch_blocks=config.max_batch_blocks,
                             request_timeout_s=config.request_timeout_ms / 1000.0,
                             stats_fn=stats_fn, supervisor_pid=supervisor_pid, keys=keys, lanes=config.lanes,
                             lane_spin_us=lane_spin_default(config.lane_spin_us),
                             wait_spin_us=wait_spin_default(config.wait_spin_us))
        tm.connect(timeout)
    except BaseException:
        if workers is not None:
            workers.stop()
        raise
    return tm, workers


class WorkersProcess:
    """kvbm-workers as a child of the engine."""

    def __init__(self, config: KvbmConfig, host_bytes: int, log_level: str | None = None,
                 layout: LayoutConfig | None = None, idle_exit_s: float = 0.0, g2_ranks: int = 1) -> None:
        self.config = config
        self.g2_ranks = g2_ranks   # tensor-parallel ranks' regions of G2 under the shared registry
        # > 0: an instance several engines share (data-parallel replicas): it does not follow the
        # engine that started it, and stops after this long with no engine attached instead.
        self.idle_exit_s = idle_exit_s
        self.host_bytes = host_bytes
        self.layout = layout if layout is not None else config.layout   # G2's blocks: the shared registry's
        self.log_level = log_level or config.log_level
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "kvbm.cli", "--instance-id", c.instance_id, "--host-size", str(self.host_bytes),
               "--transport", c.transport, "--tcp-port", str(c.tcp_port), "--interval", "0",
               "--log-level", self.log_level]
        cmd += ["--exit-when-idle", str(self.idle_exit_s)] if self.idle_exit_s > 0 else \
            ["--exit-with-parent", "--parent-pid", str(os.getpid())]
        if c.runtime_dir:
            cmd += ["--runtime-dir", c.runtime_dir]
        if self.layout is not None:
            cmd += ["--layout", layout_spec(self.layout), "--policy", c.policy, "--ghost-ratio", str(c.ghost_ratio)]
            if self.g2_ranks > 1:
                cmd += ["--g2-ranks", str(self.g2_ranks)]
        if c.force_cpu:
            cmd.append("--force-cpu")
        if c.disk_path and c.disk_blocks:
            cmd += ["--disk-path", os.path.abspath(c.disk_path), "--disk-blocks", str(c.disk_blocks)]
        elif c.disk_path and c.disk_size:
            cmd += ["--disk-path", os.path.abspath(c.disk_path), "--disk-size", str(c.disk_size)]
        if c.gds != "auto":
            cmd += ["--gds", c.gds]
        return cmd

    def child_env(self) -> dict[str, str]:
        """The engine's environment without its KVBM_* settings, plus the ones set here."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KVBM_")}
        env["PYTHONPATH"] = _package_root() + os.pathsep + env.get("PYTHONPATH", "")
        env.update({"KVBM_MAX_BATCH_BLOCKS": str(self.config.max_batch_blocks),
                    "KVBM_COPY_THREADS": str(self.config.copy_threads),
                    "KVBM_WORKER_DELAY_MS": str(self.config.worker_delay_ms)})
        for var, value, default in (("KVBM_DISK_READ_BLOCKS", self.config.disk_read_blocks, DISK_READ_BLOCKS),
                                    ("KVBM_DISK_READ_INFLIGHT", self.config.disk_read_inflight, DISK_READ_INFLIGHT)):
            if value != default:   # the disk worker's NIXL reads, when not the defaults: no flag for them
                env[var] = str(value)
        if self.config.disk_fsize_limit:   # a test hook, like the copy delay: no flag for it
            env["KVBM_DISK_FSIZE_LIMIT"] = str(self.config.disk_fsize_limit)
        return env

    def start(self, timeout: float = 60.0) -> str:
        # Shared (idle_exit_s): a session of its own, so a signal to the starting engine's process
        # group (a Ctrl-C) does not take the other engines' instance down with it.
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, env=self.child_env(),
                                     start_new_session=self.idle_exit_s > 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KvbmError(f"kvbm-workers exited with code {self.proc.returncode} during start-up")
            # Only the endpoints our child wrote: a killed predecessor's endpoints.json stays until
            # the child has taken the lock and removed it.
            found = find_instance(self.config)
            if found.state == "running" and found.pid == self.proc.pid:
                return found.endpoints.control
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
