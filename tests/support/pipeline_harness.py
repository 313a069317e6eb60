"""A whole pipeline for tests: a real kvbm-workers (supervisor + path worker processes) and an engine
(KvBlockManager with CPU-mode "device" tensors in a shared segment), plus byte helpers.

Every process started here is recorded and SIGKILLed by pid in `kill_all()` (the fixtures' finalizer),
whatever state the test left it in. No hypothesis or zmq import at module level (tests/gpu uses it)."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np

import kvbm
from kvbm.layout import BlockLayout, InnerOrder, LayoutConfig, LayoutType

DEFAULT_LAYOUT = LayoutConfig(num_layers=4, outer_dim=2, page_size=16, inner_dim=64, dtype="bfloat16")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Polls predicate until it returns a truthy value; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Pipeline:
    def __init__(self, tmp_path, *, instance: str = "t", layout: LayoutConfig = DEFAULT_LAYOUT,
                 device_blocks: int = 1024, host_blocks: int = 2048, order: InnerOrder = InnerOrder.OUTER_MAJOR,
                 device: str = "cpu", layout_type: LayoutType = LayoutType.LAYER_SEPARATE, **config: Any) -> None:
        self.tmp_path = tmp_path
        self.runtime_dir = str(tmp_path / "run")
        self.pids: set[int] = set()
        # KVBM_TEST_TRANSPORT=tcp runs every pipeline test over authenticated loopback TCP.
        cfg = dict(instance_id=instance, runtime_dir=self.runtime_dir, host_blocks=host_blocks, layout=layout,
                   device_blocks=device_blocks, force_cpu=device == "cpu", request_timeout_ms=20000,
                   transport=os.environ.get("KVBM_TEST_TRANSPORT", "ipc"))
        cfg.update(config)
        self.config = kvbm.KvbmConfig(**cfg)
        self.device_layout = BlockLayout(layout, layout_type, device_blocks, order)
        self.device = device
        self.kv: kvbm.KvBlockManager | None = None
        self.tensors: list = []

    # ---- life ----------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Pipeline:
        self.kv = kvbm.KvBlockManager(self.config)
        self.tensors = self.kv.create_device_tensors(self.device_layout, device=self.device)
        try:
            self.kv.register_device_tensors(self.tensors, self.device_layout, timeout=timeout)
        finally:
            if self.kv.workers_process is not None and self.kv.workers_process.pid:
                self.pids.add(self.kv.workers_process.pid)
        self.pids.update(self.worker_pids().values())
        return self

    @property
    def keys(self):
        """The instance's CURVE client keys (what a raw test client needs to get any answer)."""
        from kvbm.wire.auth import ClientKeys
        return ClientKeys.read(self.config.resolved_runtime_dir())

    @property
    def supervisor_pid(self) -> int:
        return self.kv.workers_process.pid

    def status(self) -> dict:
        from kvbm.cli import ask_status
        return ask_status(self.config, timeout=5.0)

    def worker_pids(self) -> dict[str, int]:
        st = wait_for(lambda: self._status_ready(), 30, "both path workers up")
        pids = {label: w["pid"] for label, w in st["workers"].items() if "pid" in w}
        self.pids.update(pids.values())
        return pids

    def _status_ready(self) -> dict | None:
        st = self.status()
        ok = all(w.get("ready") for label, w in st["workers"].items() if label in ("d2h", "h2d"))
        return st if ok else None

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()
            self.kv = None

    def kill_all(self) -> None:
        """Finalizer: a clean shutdown first, then SIGKILL by pid whatever process this harness saw
        is still alive."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - finalizer: best effort after a failed test
            pass
        for pid in self.pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ---- bytes ---------------------------------------------------------------------------------
    def fill_random(self, blocks, rng: np.random.Generator) -> None:
        """Random bytes in every region of `blocks` of the device tensors."""
        view = self._regions()
        blocks = np.asarray(blocks, dtype=np.int64)
        view[:, :, blocks, :] = rng.integers(0, 256, size=(view.shape[0], view.shape[1], len(blocks), view.shape[3]),
                                             dtype=np.uint8)

    def snapshot(self, blocks) -> np.ndarray:
        """[n, layers, outer, region_bytes] copy of the device blocks."""
        view = self._regions()
        return np.ascontiguousarray(view[:, :, np.asarray(blocks, dtype=np.int64), :].transpose(2, 0, 1, 3))

    def poison(self, blocks=None, value: int = 0xA5) -> None:
        view = self._regions()
        if blocks is None:
            view[:, :, slice(None), :] = value
        else:
            view[:, :, np.asarray(blocks, dtype=np.int64), :] = value

    def _regions(self) -> np.ndarray:
        """[layers, outer, blocks, region_bytes] numpy view over the (CPU) device tensors."""
        lay = self.device_layout
        cfg = lay.config
        if self.device != "cpu":
            raise RuntimeError("byte helpers read CPU tensors; GPU tests copy to the host first")
        if lay.layout_type is LayoutType.FULLY_CONTIGUOUS:   # one tensor [block][layer][outer][region]
            whole = self.tensors[0].numpy().view(np.uint8)[:lay.total_bytes].reshape(
                lay.num_blocks, cfg.block_stride)[:, :cfg.block_bytes].reshape(
                lay.num_blocks, cfg.num_layers, cfg.outer_dim, cfg.region_bytes)
            return _StackedView([whole[:, layer].transpose(1, 0, 2) for layer in range(cfg.num_layers)])  # type: ignore[return-value]
        per_layer = []
        for t in self.tensors:
            arr = t.numpy()
            if lay.order is InnerOrder.OUTER_MAJOR:
                per_layer.append(arr.reshape(cfg.outer_dim, lay.num_blocks, cfg.region_bytes))
            else:
                per_layer.append(arr.reshape(lay.num_blocks, cfg.outer_dim, cfg.region_bytes).transpose(1, 0, 2))
        return _StackedView(per_layer)  # type: ignore[return-value]


class _StackedView:
    """Indexing [layer-slice, outer-slice, blocks, bytes] over per-layer arrays without copying them."""

    def __init__(self, layers: list[np.ndarray]) -> None:
        self.layers = layers
        self.shape = (len(layers),) + layers[0].shape

    def __getitem__(self, key):
        _, outer, blocks, rest = key
        return np.stack([layer[outer, blocks, rest] for layer in self.layers])

    def __setitem__(self, key, value):
        _, outer, blocks, rest = key
        value = np.asarray(value)
        for i, layer in enumerate(self.layers):
            layer[outer, blocks, rest] = value[i] if value.ndim == 4 else value
