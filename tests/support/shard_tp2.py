"""TP 2 as two processes (tests/support/shard_rank.py), shared by tests/integration/test_shard_transfers.py
(CPU mode) and tests/gpu/test_shard_gpu.py (the shards on the GPU)."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid

import numpy as np

from kvbm.shm import Segment
from tests.support.pipeline_harness import pid_alive
from tests.support.shard_rank import DEVICE_BLOCKS, HOST_BLOCKS_USED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Rank:
    """A rank process (tests/support/shard_rank.py); its JSON lines come through a queue."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.shard_rank", *args], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put({"error": f"exited with {self.proc.wait()}"})

    def next(self, timeout: float = 90.0) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"rank pid {self.proc.pid} said nothing within {timeout} s") from None
        assert "error" not in msg, msg["error"]
        return msg

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def tp2_two_processes(tmp_path, request, device: str) -> None:
    """Two rank processes of one engine (rank 1 started first: it waits for rank 0's kvbm-workers),
    each storing its own shard's contents to the same host block ids; each rank's bytes land in its
    own G2 region (read here from the segment), and both load them back byte for byte."""
    instance = f"s{uuid.uuid4().hex[:8]}"
    run_dir = str(tmp_path / "run")
    pids: list[int] = []

    def kill():
        for pid in pids:
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    request.addfinalizer(kill)
    host_blocks = 8
    # Rank 1 first: it waits for the kvbm-workers rank 0 starts.
    procs = {}
    for rank in (1, 0):
        procs[rank] = Rank([run_dir, instance, "eng", str(rank), "2", str(host_blocks), "layer", "bfloat16",
                            str(100 + rank), str(tmp_path), device])
        pids.append(procs[rank].proc.pid)
    stored = {rank: p.next() for rank, p in procs.items()}
    pids.append(stored[0]["workers_pid"])
    assert stored[1]["workers_pid"] is None
    stride, nbytes = stored[0]["stride"], stored[0]["block_bytes"]
    assert stored[0]["offset"] == 0 and stored[1]["offset"] == host_blocks * stride
    assert stored[0]["size"] == 2 * host_blocks * stride

    # Both ranks stored to host blocks HOST_BLOCKS_USED; each one's bytes are in its own region.
    images = {rank: np.load(tmp_path / f"rank{rank}.npy") for rank in procs}
    assert not np.array_equal(images[0], images[1])
    seg = Segment.attach(stored[0]["segment"], stored[0]["size"])
    try:
        g2 = seg.tensor().numpy()
        for rank in procs:
            base = stored[rank]["offset"]
            for i, h in enumerate(HOST_BLOCKS_USED):
                at = base + h * stride
                assert np.array_equal(g2[at:at + nbytes], images[rank][i]), (rank, h)
            unused = sorted(set(range(host_blocks)) - set(HOST_BLOCKS_USED))
            assert unused and all(not g2[base + h * stride:base + h * stride + nbytes].any() for h in unused)
        del g2
    finally:
        seg.close()

    for p in procs.values():
        p.send("load")
    for rank, p in procs.items():
        loaded = p.next()
        assert loaded["equal"] and loaded["layers"] == 3 and loaded["blocks"] == len(DEVICE_BLOCKS), (rank, loaded)
    for rank in (1, 0):                          # rank 0 last: it stops kvbm-workers
        procs[rank].send("close")
        assert procs[rank].proc.wait(60) == 0
        procs[rank].proc.stdin.close()
    assert not pid_alive(stored[0]["workers_pid"])
