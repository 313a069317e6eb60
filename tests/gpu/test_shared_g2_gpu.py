"""Two engine processes on one kvbm-workers in CUDA mode, sharing one G2 and its registry (issue 15):
each engine's KV tensors on the GPU, reached by the path workers through its own CUDA IPC handles;
engine B matches and onboards, byte for byte into poisoned blocks, what engine A offloaded; then
both run seeded load over shared prompts at once. The CPU twin is
tests/integration/test_shared_g2_engines.py; both drive tests/support/shared_engine.py.

Needs pyzmq and msgpack; no hypothesis. Run: python -m pytest -q tests/gpu/test_shared_g2_gpu.py
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import uuid
from contextlib import contextmanager

import pytest

import kvbm
from kvbm.cli import ask_status
from kvbm.shared_g2 import SharedG2
from kvbm.transfer.launcher import WorkersProcess
from tests.support import shared_engine as E
from tests.support.shared_engine import ask, expect

pytestmark = pytest.mark.gpu

WAIT_S = 120.0
CTX = multiprocessing.get_context("spawn")


@contextmanager
def _node(host_blocks: int = 64, **extra):
    rundir = tempfile.mkdtemp(prefix="kvg-")   # short: unix socket paths have 107 bytes
    config = kvbm.KvbmConfig(instance_id=f"g{uuid.uuid4().hex[:10]}", runtime_dir=rundir, layout=E.LAYOUT,
                             device_blocks=E.DEVICE_BLOCKS, host_blocks=host_blocks, request_timeout_ms=20000,
                             **extra)
    workers = WorkersProcess(config, host_blocks * E.LAYOUT.block_stride, layout=E.LAYOUT)
    workers.start(WAIT_S)
    procs: list = []
    g2 = SharedG2.attach(ask_status(config)["tiers"]["g2"]["registry"]["segment"])

    def engine():
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=E.serve, args=(child, config), daemon=True)
        proc.start()
        child.close()
        procs.append(proc)
        return parent, expect(parent, "ready")

    try:
        yield config, g2, engine
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(WAIT_S)
        g2.close()
        workers.stop()
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def node():
    with _node() as made:
        yield made


def _nixl() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(m) is not None for m in ("nixl_cu13", "nixl", "nixl_cu12"))


@pytest.mark.skipif(not _nixl(), reason="the disk tier needs NIXL (pip install nixl-cu13==1.5.1)")
def test_cuda_engines_share_one_disk_tier(tmp_path):
    """Two CUDA engines on an instance with a disk tier (kvbm.shared_g3): B loads from G3, byte for
    byte into poisoned GPU blocks, what A wrote and B's own offloads pushed out of the shared G2."""
    with _node(32, disk_path=str(tmp_path / "g3"), disk_blocks=64, disk_admission="write-through") as made:
        config, g2, engine = made
        a, _ = engine()
        b, _ = engine()
        prefix = E.prompt_hashes(0, 8)
        assert ask(a, "offload", prefix, list(range(8)), True, tag="offloaded")["moved"] == 8
        assert ask(a, "flush", tag="flushed")["written"] == 8
        for p in range(1, 5):
            assert ask(b, "offload", E.prompt_hashes(p, 8), list(range(8)), True, tag="offloaded")["moved"] == 8
        ask(b, "flush", tag="flushed")
        assert ask(b, "tiers", prefix, tag="tiers") == {"G2": 0, "G3": 8}
        assert ask(b, "onboard_from", prefix, list(range(20, 28)), tag="onboarded") == (8, 0, 0, 8)
        g3 = SharedG2.attach(ask_status(config)["tiers"]["g3"]["registry"]["segment"])
        try:
            assert len(g3.engines()) == 2
            g3.check_invariants()
        finally:
            g3.close()
        g2.check_invariants()
        ask(a, "close", tag="closed")
        ask(b, "close", tag="closed")


def test_cuda_engine_b_onboards_what_engine_a_offloaded(node):
    config, g2, engine = node
    a, info_a = engine()
    b, info_b = engine()
    assert info_a["namespace"] == info_b["namespace"] and info_a["engine_id"] != info_b["engine_id"]
    prefix = E.prompt_hashes(0, 8)
    assert ask(a, "offload", prefix, list(range(8)), True, tag="offloaded") == {"moved": 8, "held": 0, "dropped": 0}
    assert ask(b, "match", prefix, tag="matched") == 8
    assert ask(b, "onboard", prefix, list(range(20, 28)), tag="onboarded") == (8, 0)   # poisoned, then checked
    # both at once: seeded requests over shared prompts, every onboarded block checked
    a.send(("load", 1, 30, 4, 8))
    b.send(("load", 2, 30, 4, 8))
    results = []
    for conn in (a, b):
        while True:
            assert conn.poll(WAIT_S), "no progress from an engine"
            got = conn.recv()
            if got[0] == "progress":
                continue
            assert got[0] == "done", got
            results.append(got[1])
            break
    assert all(r["mismatches"] == 0 and r["requests"] == 30 for r in results)
    assert sum(r["onboarded"] for r in results) > 0
    reg = ask_status(config)["tiers"]["g2"]["registry"]
    hits = {e["engine_id"]: e["match_hits"] for e in reg["engines"]}
    assert hits[info_b["engine_id"]] >= 8
    g2.check_invariants()
    ask(a, "close", tag="closed")
    ask(b, "close", tag="closed")
