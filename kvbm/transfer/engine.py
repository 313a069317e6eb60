"""Engine-side wiring of the transfer pipeline: start or find kvbm-workers, describe the engine's KV
memory for registration, and offload/onboard over the host pool's registry.

Parts:
  WorkersProcess   a kvbm-workers started by this engine (the embedded default): spawned with the
                   engine's settings, asked to exit with it (PR_SET_PDEATHSIG -> SIGTERM), stopped
                   with SIGTERM (SIGKILL past a deadline)
  control_endpoint where a running instance listens (ipc path or tcp port from the config, else its
                   endpoints.json)
  describe_memory  the register message's memory map: CUDA IPC handle fields of each KV tensor's
                   storage (torch `_share_cuda_`, sent as msgpack bytes/ints; no pickle), or the
                   CPU-mode shared segment the tensors were allocated in (SharedBuffers)
  HostTransfers    offload(device_blocks, hashes) G1->G2 and onboard(hashes, device_blocks) G2->G1
                   over a host pool with the registry API (lookup/allocate/complete/register/
                   release/match), returning TransferFutures

Offload order: lookup (hashes already held move nothing) -> allocate host blocks -> D2H ->
on success complete + register (dedup) + release (inactive, matchable); on failure release the
host blocks unregistered (freed), except when the failure says a copy may still write them
(MAY_STILL_BE_WRITTEN: hard deadline, kvbm-workers stopped without reporting the worker dead):
those stay allocated and unregistered for good (leaked_host_blocks, a logged warning), the safe
choice over a free list a late write could corrupt. A block is registered in G2 only after its
bytes are there.
Onboard order: match the longest held prefix (acquiring the host blocks, so eviction cannot take
them mid-copy) -> H2D layer by layer -> release the host blocks whatever the outcome (a late read
of a reused host block cannot hurt it; the device blocks of a failure with
TransferError.blocks_may_be_written are the engine's to quarantine).
The pool lock is never held while waiting for in-flight budget (finalize runs on the I/O thread and
takes it).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.errors import KvbmError, LayoutError
from kvbm.shm import SharedBuffers
from kvbm.transfer import protocol as P
from kvbm.transfer.channel import Endpoints
from kvbm.transfer.manager import MAY_STILL_BE_WRITTEN, TransferFuture, TransferManager, TransferResult
from kvbm.transfer.scheduler import Gate

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
        raise KvbmError(f"kvbm-workers did not come up within {timeout} s")

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


def describe_memory(tensors: Sequence[Any], layout, shared: SharedBuffers | None = None) -> dict:
    """The register message's memory map for the engine's KV buffers (one per layout buffer)."""
    tensors = list(tensors)
    if len(tensors) != layout.num_buffers():
        raise LayoutError(f"{len(tensors)} tensors for a layout of {layout.num_buffers()} buffers")
    if tensors[0].is_cuda:
        return _describe_cuda(tensors)
    if shared is None:
        raise LayoutError("CPU-mode device tensors must live in shared memory the workers can map: allocate "
                          "them with KvBlockManager.create_device_tensors() (kvbm.shm.SharedBuffers)")
    lo, hi = shared.segment.address, shared.segment.address + shared.segment.size
    buffers = []
    for t in tensors:
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if not (lo <= ptr and ptr + nbytes <= hi):
            raise LayoutError(f"tensor at {ptr:#x} (+{nbytes}) is outside the shared segment {shared.segment.name}")
        buffers.append({"offset": ptr - lo, "nbytes": nbytes})
    return {"kind": "shm", "segment": shared.segment.name, "size": shared.segment.size, "buffers": buffers}


def _describe_cuda(tensors: Sequence[Any]) -> dict:
    buffers = []
    for t in tensors:
        storage = t.untyped_storage()
        (device, handle, storage_size, storage_offset, ref_handle, ref_offset, event_handle,
         event_sync) = storage._share_cuda_()
        buffers.append({"offset": t.data_ptr() - storage.data_ptr(), "nbytes": t.numel() * t.element_size(),
                        "ipc": {"device": int(device), "handle": bytes(handle), "storage_size": int(storage_size),
                                "storage_offset": int(storage_offset), "ref_counter_handle": bytes(ref_handle),
                                "ref_counter_offset": int(ref_offset),
                                "event_handle": bytes(event_handle) if event_handle else b"",
                                "event_sync_required": bool(event_sync)}})
    return {"kind": "cuda_ipc", "device": int(tensors[0].device.index or 0), "buffers": buffers}


@dataclass(frozen=True, slots=True)
class OffloadResult:
    requested: int    # hashes asked for (after removing repeats)
    moved: int        # blocks copied into G2 and registered
    held: int         # hashes G2 already held (or another offload is moving): nothing copied
    dropped: int      # blocks that found no room in G2 (out of capacity is an outcome, not an error)
    bytes: int


@dataclass(frozen=True, slots=True)
class OnboardResult:
    requested: int    # hashes asked for
    loaded: int       # leading blocks copied into the device blocks (the rest: recompute)
    bytes: int


def _done_future(path: P.Path, value: Any, num_layers: int) -> TransferFuture:
    fut = TransferFuture(path, 0, num_layers)
    fut.set_running_or_notify_cancel()
    fut._advance(num_layers)
    fut.set_result(TransferResult(path, 0, 0, 0.0, value))
    return fut


class HostTransfers:
    """offload / onboard between the engine's device blocks and a host pool, through a TransferManager."""

    def __init__(self, tm: TransferManager, host_pool: Any, lock: threading.RLock | None = None) -> None:
        self.tm = tm
        self.pool = host_pool
        self.lock = lock or threading.RLock()
        # Hashes whose offload is in flight: a second offload of one copies nothing (counted as held).
        self._offloading: set[int] = set()
        # Host blocks of offloads failed while a copy into them may still run: never freed.
        self.leaked_host_blocks = 0

    def _capacity(self) -> int:
        reg = getattr(self.pool, "registry", self.pool)  # a BlockPool, or a bare registry
        free = getattr(reg, "num_free", None)
        inactive = getattr(reg, "num_inactive", None)
        free = free() if callable(free) else free
        inactive = inactive() if callable(inactive) else inactive
        return int(free or 0) + int(inactive or 0)

    def offload(self, device_blocks, hashes, *, parents=None, priority: int = 0, gate: Gate | None = None,
                block: bool = True, timeout: float | None = None) -> TransferFuture:
        device_blocks = np.asarray(device_blocks, dtype=np.int64).reshape(-1)
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        if device_blocks.shape != hashes.shape:
            raise KvbmError(f"offload: {device_blocks.shape[0]} device blocks but {hashes.shape[0]} hashes")
        if parents is not None:
            parents = np.asarray(parents, dtype=np.uint64).reshape(-1)
            if parents.shape != hashes.shape:
                raise KvbmError(f"offload: {parents.shape[0]} parents for {hashes.shape[0]} hashes")
        _, first = np.unique(hashes, return_index=True)
        first.sort()
        device_blocks, hashes = device_blocks[first], hashes[first]
        if parents is not None:
            parents = parents[first]
        with self.lock:
            in_flight = np.zeros(len(hashes), bool)
            if self._offloading:
                in_flight = np.fromiter((int(h) in self._offloading for h in hashes.tolist()), bool, len(hashes))
            held_mask = (np.asarray(self.pool.lookup(hashes)) >= 0) | in_flight
            todo = np.flatnonzero(~held_mask)
            want = int(todo.shape[0])
            host = self.pool.allocate(want) if want else np.empty(0, np.int64)
            if host is None:
                fit = min(want, self._capacity())
                host = self.pool.allocate(fit) if fit else np.empty(0, np.int64)
                if host is None:
                    host = np.empty(0, np.int64)
            host = np.asarray(host, dtype=np.int64)
            n = int(host.shape[0])
            todo = todo[:n]
            claimed = [int(h) for h in hashes[todo].tolist()]
            self._offloading.update(claimed)
            # Making room may have evicted blocks counted as held a moment ago: they are neither
            # held nor copied now, so they are reported as dropped, never as held.
            still_held = (np.asarray(self.pool.lookup(hashes)) >= 0) | in_flight
            lost = int((held_mask & ~still_held).sum())
        held = int(held_mask.sum()) - lost
        dropped = want - n + lost
        todo_hashes = hashes[todo]
        todo_parents = parents[todo] if parents is not None else None
        requested = int(hashes.shape[0])
        bytes_per_block = self.tm.block_bytes
        if n == 0:
            return _done_future(P.Path.D2H, OffloadResult(requested, 0, held, dropped, 0), self.tm.num_layers)

        def finalize(ok: bool, error: str | None):
            with self.lock:
                self._offloading.difference_update(claimed)
                if not ok:
                    if error and MAY_STILL_BE_WRITTEN in error:
                        # A copy may still land in these host blocks: on the free list the next
                        # offload could register them and a late write would corrupt that data.
                        # They stay allocated and unregistered (never matched, never handed out):
                        # leaked, with a warning, rather than reused unsafely.
                        self.leaked_host_blocks += n
                        logger.warning("offload failed while its copy may still run; leaving %d host blocks "
                                       "allocated (leaked, %d in all): %s", n, self.leaked_host_blocks, error)
                        return None
                    self.pool.release(host)   # never registered: back to the free list
                    return None
                try:
                    self.pool.complete(host)
                    canonical = self.pool.register(host, todo_hashes, todo_parents) if todo_parents is not None \
                        else self.pool.register(host, todo_hashes)
                except BaseException:
                    # Not registered: hand them back (else they stay allocated, refcount 1, for
                    # good); the error fails the submission through the manager.
                    self.pool.release(host)
                    raise
                self.pool.release(canonical)  # inactive and matchable; duplicates were freed by register
            return OffloadResult(requested, n, held, dropped, n * bytes_per_block)

        try:
            return self.tm.submit(P.Path.D2H, device_blocks[todo], host, priority=priority, gate=gate,
                                  block=block, timeout=timeout, finalize=finalize)
        except BaseException:
            with self.lock:
                self._offloading.difference_update(claimed)
                self.pool.release(host)
            raise

    def onboard(self, hashes, device_blocks, *, priority: int = 1, gate: Gate | None = None, layers: bool = True,
                block: bool = True, timeout: float | None = None) -> TransferFuture:
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        device_blocks = np.asarray(device_blocks, dtype=np.int64).reshape(-1)
        if device_blocks.shape[0] < hashes.shape[0]:
            raise KvbmError(f"onboard: {hashes.shape[0]} hashes but only {device_blocks.shape[0]} device blocks")
        requested = int(hashes.shape[0])
        with self.lock:
            host = np.asarray(self.pool.match(hashes, acquire=True), dtype=np.int64)
        k = int(host.shape[0])
        if k == 0:
            return _done_future(P.Path.H2D, OnboardResult(requested, 0, 0), self.tm.num_layers)
        bytes_per_block = self.tm.block_bytes

        def finalize(ok: bool, error: str | None):
            with self.lock:
                self.pool.release(host)
            return OnboardResult(requested, k, k * bytes_per_block) if ok else None

        try:
            return self.tm.submit(P.Path.H2D, host, device_blocks[:k], priority=priority, gate=gate,
                                  layers=layers, block=block, timeout=timeout, finalize=finalize)
        except BaseException:
            with self.lock:
                self.pool.release(host)
            raise


def wait_all(futures: Sequence[concurrent.futures.Future], timeout: float) -> list:
    """Results of every future (raising the first error), with one deadline for all."""
    done, not_done = concurrent.futures.wait(futures, timeout=timeout)
    if not_done:
        raise KvbmError(f"{len(not_done)} of {len(futures)} transfers still running after {timeout} s")
    return [f.result() for f in futures]
