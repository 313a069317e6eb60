"""KvBlockManager engines in processes of their own, against one kvbm-workers and its shared G2,
for tests/integration/test_shared_g2_engines.py (multiprocessing's spawn context: a fresh
interpreter per engine, nothing inherited).

  serve   an engine driven over a pipe. It connects (start=False: the test started kvbm-workers),
          says ("ready", lease info) or ("error", text), then answers one message per command:
            ("offload", hashes, blocks, wait)  writes content(hash) into the device blocks and
                                               offloads them (wait: for the result; else at once)
            ("onboard", hashes, blocks)        poisons the device blocks, onboards, compares every
                                               loaded block with content(hash): (loaded, mismatches)
            ("match", hashes)                  G2's prefix length
            ("tiers", hashes)                  {tier name: prefix length} (G3 with a disk tier)
            ("onboard_from", hashes, blocks)   as onboard: (loaded, mismatches, from_host, from_disk)
            ("flush",)                         waits for the G3 writes in flight (flush_disk)
            ("raw_write", g2_block, slot)      an H2DISK of one G2 block into G3 slot `slot`, sent as
                                               is (the registry not asked): the error text, or None
            ("load", seed, iterations, prompts, length)  seeded requests over shared prompts:
                                               match -> onboard (checked) -> offload the rest,
                                               a ("progress", i) after each; then ("done", stats)
            ("pinned",)                        this engine's holds in the shared G2
            ("close",)                         closes the manager (leaves the shared G2)

Device blocks hold content(hash) = the demo's Model.kv_of (a pure function of the hash): a block
onboarded under a hash whose bytes differ was served wrong. CPU mode (the config's force_cpu, or no
CUDA), or CUDA: the engine's tensors on the GPU, shared with the workers through CUDA IPC
(tests/gpu/test_shared_g2_gpu.py).
"""
from __future__ import annotations

import traceback

import numpy as np

from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.pools import Tier

LAYOUT = LayoutConfig(num_layers=2, outer_dim=2, page_size=4, inner_dim=32, dtype="float16")  # 1 KiB blocks
DEVICE_BLOCKS = 32
WAIT_S = 120.0


def _lease_info(kv) -> dict:
    lease = kv.shared_g2
    return {"engine_id": lease.engine_id, "slot": lease.slot, "namespace": lease.namespace,
            "block_offset": lease.block_offset, "num_blocks": lease.num_blocks}


def serve(conn, config) -> None:
    import kvbm
    from kvbm.demo import Model
    try:
        device = "cpu" if config.force_cpu or not kvbm.cuda_available() else "cuda"
        kv = kvbm.KvBlockManager(config)
        layout = BlockLayout(LAYOUT, LayoutType.LAYER_SEPARATE, DEVICE_BLOCKS)
        tensors = kv.create_device_tensors(layout, device=device)
        kv.register_device_tensors(tensors, layout, start=False, timeout=WAIT_S)
    except BaseException as err:   # noqa: BLE001 - the test reads the reason
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    model = Model(layout, tensors, device)
    conn.send(("ready", _lease_info(kv)))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        try:
            op = msg[0]
            if op == "offload":
                _, hashes, blocks, wait = msg
                model.write(blocks, hashes)
                model.sync()   # CUDA: the bytes are there before a worker's stream copies them
                fut = kv.offload(blocks, hashes)
                if wait:
                    res = fut.result(WAIT_S).value
                    conn.send(("offloaded", {"moved": res.moved, "held": res.held, "dropped": res.dropped}))
                else:
                    conn.send(("submitted", None))
            elif op == "onboard":
                _, hashes, blocks = msg
                conn.send(("onboarded", _onboard(kv, model, hashes, blocks)))
            elif op == "match":
                conn.send(("matched", int(kv.match(msg[1]).prefix.get(Tier.G2, 0))))
            elif op == "tiers":
                conn.send(("tiers", {t.name: int(k) for t, k in kv.match(msg[1]).prefix.items() if t.name != "G1"}))
            elif op == "onboard_from":
                _, hashes, blocks = msg
                got = {}
                loaded, wrong = _onboard(kv, model, hashes, blocks, got)
                conn.send(("onboarded", (loaded, wrong, got.get("from_host", 0), got.get("from_disk", 0))))
            elif op == "raw_write":
                _, g2_block, slot = msg
                conn.send(("written", _raw_write(kv, g2_block, slot)))
            elif op == "flush":
                kv.flush_disk(WAIT_S)
                conn.send(("flushed", kv.stats().get("disk")))
            elif op == "load":
                _, seed, iterations, prompts, length = msg
                conn.send(("done", _load(conn, kv, model, seed, iterations, prompts, length)))
            elif op == "pinned":
                conn.send(("pinned", int(kv.shared_g2.registry.pinned)))
            elif op == "close":
                kv.close()
                conn.send(("closed", None))
                return
            else:
                conn.send(("error", f"unknown op {op!r}"))
        except BaseException:   # noqa: BLE001 - the test reads the reason
            conn.send(("error", traceback.format_exc()))


def _raw_write(kv, g2_block: int, slot: int) -> str | None:
    from kvbm.errors import KvbmError
    from kvbm.wire import protocol as P
    try:
        kv.transfers.submit(P.Path.H2DISK, np.array([g2_block], np.int64), np.array([slot], np.int64),
                            extra={"hashes": np.array([12345], np.uint64)}).result(WAIT_S)
    except KvbmError as err:
        return str(err)
    return None


def _onboard(kv, model, hashes, blocks, tiers: dict | None = None) -> tuple[int, int]:
    """Onboards into poisoned device blocks; (blocks loaded, loaded blocks whose bytes are wrong).
    tiers: filled with from_host and from_disk (with a disk tier)."""
    blocks = np.asarray(blocks, np.int64)
    model.wipe(blocks)
    model.sync()   # CUDA: the poison lands before the onboard's copy, never after
    res = kv.onboard(hashes, blocks).result(WAIT_S).value
    if tiers is not None:
        tiers.update(from_host=res.loaded if res.from_host < 0 else res.from_host, from_disk=res.from_disk)
    k = res.loaded
    if k == 0:
        return 0, 0
    got = model.read(blocks[:k])
    wrong = sum(1 for i in range(k) if not np.array_equal(got[i], model.kv_of(int(hashes[i]))))
    return k, wrong


def prompt_hashes(prompt: int, length: int) -> list[int]:
    """The hashes of shared prompt `prompt` (every engine's): distinct, never 0."""
    return [(prompt + 1) << 20 | j for j in range(length)]


def _load(conn, kv, model, seed, iterations, prompts, length) -> dict:
    rng = np.random.default_rng(seed)
    stats = {"requests": 0, "onboarded": 0, "mismatches": 0, "offloaded": 0}
    blocks = np.arange(length, dtype=np.int64)
    for i in range(iterations):
        hashes = prompt_hashes(int(rng.integers(prompts)), length)[:int(rng.integers(length // 2, length + 1))]
        loaded, wrong = _onboard(kv, model, hashes, blocks[:len(hashes)])
        stats["onboarded"] += loaded
        stats["mismatches"] += wrong
        rest = hashes[loaded:]
        if rest:
            model.write(blocks[loaded:len(hashes)], rest)
            model.sync()
            res = kv.offload(blocks[loaded:len(hashes)], rest).result(WAIT_S).value
            stats["offloaded"] += res.moved
        stats["requests"] += 1
        conn.send(("progress", i))
    return stats


def expect(conn, tag: str):
    """The engine's next answer, which must be `tag` (an "error" answer fails the test with its text)."""
    import pytest
    assert conn.poll(WAIT_S), f"no {tag!r} from the engine within {WAIT_S} s"
    got = conn.recv()
    if got[0] == "error":
        pytest.fail(f"engine failed:\n{got[1]}")
    assert got[0] == tag, got
    return got[1]


def ask(conn, *cmd, tag: str):
    conn.send(cmd)
    return expect(conn, tag)
