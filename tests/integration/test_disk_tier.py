"""The disk tier (G3) end to end in CPU mode: an engine (KvBlockManager) and a real kvbm-workers
with its disk worker, I/O through the real NIXL package, files under tmp_path.

G2 -> G3 -> G1 round trips byte for byte (both device layouts; destinations poisoned first),
blocks G2 evicted onboarded from G3, match across G1/G2/G3, write-through admission, the load rule
stopping at G2 when the disk is too slow, warm restart, a flipped byte and a truncated file caught
(the load fails, the block is dropped and counted, the engine recomputes), a file size limit
losing nothing, two instances sharing one directory, and kill -9 of the disk worker mid-write.
No timing thresholds: every wait has a deadline and waits on a condition.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvbm.errors import DiskError, TransferError
from kvbm.layout import LayoutType
from kvbm.pools import Tier
from kvbm.wire import protocol as P
from kvbm.workers.disk.io import load_nixl

try:
    load_nixl()
except DiskError as _err:
    pytest.skip(f"needs NIXL: {_err}", allow_module_level=True)

DEADLINE = 30.0


def random_hashes(rng, n):
    return rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64)


def disk_pipeline(make_pipeline, tmp_path, **kw):
    kw.setdefault("device_blocks", 256)
    kw.setdefault("host_blocks", 48)
    kw.setdefault("disk_blocks", 256)
    kw.setdefault("disk_path", str(tmp_path / "g3"))
    return make_pipeline(**kw)


def offload_in_steps(kv, blocks, hashes, step: int = 4) -> None:
    """Offloads in small steps, each one's G3 writes landed before the next: the victim cleaner
    then writes every block G2 evicts (none is evicted before the cleaner gets to it)."""
    for i in range(0, len(hashes), step):
        kv.offload(blocks[i:i + step], hashes[i:i + step]).result(DEADLINE)
        kv.flush_disk(DEADLINE)


def where(kv, hashes):
    """(in G2, in G3) masks."""
    with kv.lock:
        return kv.pool(Tier.G2).lookup(hashes) >= 0, kv.pool(Tier.G3).lookup(hashes) >= 0


@pytest.mark.parametrize("layout_type", [LayoutType.LAYER_SEPARATE, LayoutType.FULLY_CONTIGUOUS])
def test_g2_to_g3_to_g1_round_trip_is_byte_exact(make_pipeline, tmp_path, rng, layout_type):
    pipe = disk_pipeline(make_pipeline, tmp_path, layout_type=layout_type)
    kv = pipe.kv
    n = 64
    src = np.arange(n)
    hashes = random_hashes(rng, n)
    pipe.fill_random(src, rng)
    expected = pipe.snapshot(src)
    offload_in_steps(kv, src, hashes)
    in2, in3 = where(kv, hashes)
    assert (in2 | in3).all()
    assert not in2[:16].any() and in3[:16].all()           # the oldest left G2 for G3
    assert in2[-8:].all()
    st = kv.stats()["disk"]
    assert st["victims_lost"] == 0 and st["written"] == int(in3.sum()) and st["write_failed"] == 0

    # G2 part then G3 part, one future: 8 blocks G2 holds, then 8 only G3 holds.
    q = np.concatenate([hashes[-8:], hashes[:8]])
    m = kv.match(q)
    assert (m.prefix[Tier.G2], m.prefix[Tier.G3], m.onboardable) == (8, 0, 16)
    pipe.poison()
    dst = np.arange(100, 116)
    fut = kv.onboard(q, dst)
    for layer in range(pipe.device_layout.config.num_layers):
        assert fut.wait_layer(layer, DEADLINE)
    res = fut.result(DEADLINE)
    assert fut.path is P.Path.DISK2D
    assert (res.value.loaded, res.value.from_host, res.value.from_disk, res.value.read_path) == (16, 8, 8, "staged")
    assert np.array_equal(pipe.snapshot(dst), expected[np.r_[n - 8:n, 0:8]])
    assert (pipe.snapshot(np.arange(116, 140)) == 0xA5).all()

    # G3 alone, and the loaded blocks are now G2's too (promoted from their staging blocks).
    res = kv.onboard(hashes[8:16], np.arange(150, 158)).result(DEADLINE).value
    assert (res.loaded, res.from_host, res.from_disk) == (8, 0, 8)
    assert np.array_equal(pipe.snapshot(np.arange(150, 158)), expected[8:16])
    in2, _ = where(kv, hashes[:16])
    assert in2.all()
    st = kv.stats()["disk"]
    assert (st["loads"], st["loaded"], st["promoted"], st["read_paths"]) == (2, 16, 16, {"staged": 16})
    kv.flush_disk(DEADLINE)   # staging blocks took G2 room: the cleaner writes more victims meanwhile
    with kv.lock:
        for tier in (Tier.G2, Tier.G3):
            kv.pool(tier).registry.check_invariants()
            assert kv.pool(tier).registry.num_active == 0    # every load released what it held
    g3 = pipe.status()["tiers"]["g3"]
    assert g3["live"] == kv.pool(Tier.G3).registry.num_registered > int(in3.sum())
    assert g3["read"] == 16 and g3["read_path"] == "staged"
    from kvbm.cli import format_status  # what kvbm-workers --status prints
    text = format_status(pipe.status())
    assert f"  G3 {tmp_path / 'g3'} {g3['live']}/256 blocks, journal {g3['journal_bytes']} B" in text, text
    assert "0 peer blocks read, 0 checksum failures; read path staged, GDS unavailable: CPU mode" in text, text


def test_match_reports_the_prefix_across_g1_g2_g3(make_pipeline, tmp_path, rng):
    pipe = disk_pipeline(make_pipeline, tmp_path)
    kv = pipe.kv
    hashes = random_hashes(rng, 64)
    pipe.fill_random(np.arange(64), rng)
    offload_in_steps(kv, np.arange(64), hashes)
    with kv.lock:
        g1 = kv.pool(Tier.G1)
        blocks = g1.allocate(4)
        g1.complete(blocks)
        g1.release(g1.register(blocks, hashes[:4]))
    m = kv.match(hashes)
    in2, in3 = where(kv, hashes)
    first2 = int(np.argmax(in2))
    assert m.prefix[Tier.G1] == 4 and m.prefix[Tier.G2] == 0
    assert m.prefix[Tier.G3] == first2 and m.onboardable == first2     # G3 holds everything G2 does not
    assert m.load_rule["offered"] and m.load_rule["blocks"] == first2
    assert m.load_rule["load_s"] < m.load_rule["recompute_s"]
    assert kv.match(hashes[first2:]).prefix[Tier.G2] == 64 - first2


def test_write_through_writes_every_block_registered_in_g2(make_pipeline, tmp_path, rng):
    pipe = disk_pipeline(make_pipeline, tmp_path, host_blocks=64, disk_admission="write-through")
    kv = pipe.kv
    hashes = random_hashes(rng, 24)
    pipe.fill_random(np.arange(24), rng)
    expected = pipe.snapshot(np.arange(24))
    kv.offload(np.arange(24), hashes).result(DEADLINE)
    kv.flush_disk(DEADLINE)
    in2, in3 = where(kv, hashes)
    assert in2.all() and in3.all()
    assert kv.stats()["disk"]["written"] == 24
    with kv.lock:
        assert kv.pool(Tier.G2).registry.num_active == 0     # held only while being written
    again = kv.offload(np.arange(24), hashes).result(DEADLINE).value
    kv.flush_disk(DEADLINE)
    assert again.held == 24 and kv.stats()["disk"]["written"] == 24   # nothing written twice
    # Read back from disk: G2 emptied by other blocks first.
    other = random_hashes(rng, 64)
    kv.offload(np.arange(100, 164), other).result(DEADLINE)
    kv.flush_disk(DEADLINE)
    assert not where(kv, hashes)[0].any()
    pipe.poison()
    res = kv.onboard(hashes, np.arange(200, 224)).result(DEADLINE).value
    assert (res.loaded, res.from_disk) == (24, 24)
    assert np.array_equal(pipe.snapshot(np.arange(200, 224)), expected)


def test_disk_requests_need_a_disk_tier_on_both_sides(make_pipeline, tmp_path):
    pipe = make_pipeline(device_blocks=64, host_blocks=64)
    assert P.Path.H2DISK not in pipe.kv.transfers.paths
    fut = pipe.kv.transfers.submit(P.Path.DISK2H, [0], [1])
    with pytest.raises(TransferError, match="no disk tier"):
        fut.result(5)


def test_a_disk_slower_than_recomputing_is_not_offered(make_pipeline, tmp_path, rng):
    """prefill_tokens_per_s so high that no disk can beat it: G3 holds the blocks, match says so,
    but neither match nor onboard offers them; the decision and its inputs are in the stats."""
    pipe = disk_pipeline(make_pipeline, tmp_path, prefill_tokens_per_s=1e15)
    kv = pipe.kv
    hashes = random_hashes(rng, 64)
    pipe.fill_random(np.arange(64), rng)
    expected = pipe.snapshot(np.arange(64))
    offload_in_steps(kv, np.arange(64), hashes)
    in2, in3 = where(kv, hashes)
    q = np.concatenate([hashes[-8:], hashes[:8]])              # 8 in G2, then 8 only G3 holds
    m = kv.match(q)
    assert (m.prefix[Tier.G2], m.prefix[Tier.G3], m.onboardable) == (8, 0, 8)
    assert kv.match(hashes[:8]).prefix[Tier.G3] == 8 and kv.match(hashes[:8]).onboardable == 0
    assert m.load_rule["blocks"] == 8 and not m.load_rule["offered"]
    assert m.load_rule["load_s"] > m.load_rule["recompute_s"]
    pipe.poison()
    res = kv.onboard(q, np.arange(100, 116)).result(DEADLINE)
    assert res.path is P.Path.H2D
    assert (res.value.loaded, res.value.from_disk) == (8, 0)  # stops at G2: the rest is recomputed
    assert np.array_equal(pipe.snapshot(np.arange(100, 108)), expected[-8:])
    assert (pipe.snapshot(np.arange(108, 116)) == 0xA5).all()
    rule = kv.stats()["disk"]["load_rule"]
    assert (rule["offered"], rule["declined"], rule["measured_reads"]) == (0, 1, 0)
    assert rule["prefill_tokens_per_s"] == 1e15 and not rule["offers"]
    text = kv.transfers.metrics.render().decode()
    assert 'kvbm_g3_load_decisions_total{decision="recompute"} 1.0' in text
    assert "kvbm_g3_prefill_tokens_per_second 1e+15" in text


def test_warm_restart_finds_every_block_and_another_layout_or_model_is_refused(make_pipeline, tmp_path, rng):
    disk = str(tmp_path / "g3")
    first = disk_pipeline(make_pipeline, tmp_path, instance="warm", disk_path=disk)
    kv = first.kv
    hashes = random_hashes(rng, 64)
    first.fill_random(np.arange(64), rng)
    expected = first.snapshot(np.arange(64))
    offload_in_steps(kv, np.arange(64), hashes)
    _, in3 = where(kv, hashes)
    held = hashes[in3]
    assert held.size >= 16
    first.close()                                            # kvbm-workers and engine gone

    second = disk_pipeline(make_pipeline, tmp_path, instance="warm", disk_path=disk)
    kv = second.kv
    _, in3_again = where(kv, hashes)
    assert np.array_equal(in3_again, in3)                    # the G3 registry rebuilt from the journal
    assert kv.pool(Tier.G3).registry.num_registered == held.size
    assert kv.match(held).prefix[Tier.G3] == held.size
    res = kv.onboard(held, np.arange(held.size)).result(DEADLINE).value
    assert (res.loaded, res.from_disk) == (held.size, held.size)
    assert np.array_equal(second.snapshot(np.arange(held.size)), expected[in3])
    assert second.status()["tiers"]["g3"]["live"] == held.size
    second.close()

    from kvbm.layout import LayoutConfig
    other = LayoutConfig(num_layers=4, outer_dim=2, page_size=16, inner_dim=32, dtype="bfloat16")
    for kw, what in ((dict(layout=other), "fingerprint"), (dict(salt="another-model"), "model_id")):
        with pytest.raises(TransferError) as info:
            disk_pipeline(make_pipeline, tmp_path, instance="warm", disk_path=disk, **kw)
        text = str(info.value)
        assert f"holds {held.size} blocks of another store" in text and what in text, text
        assert "disk_cold_start" in text, text
    cold = disk_pipeline(make_pipeline, tmp_path, instance="warm", disk_path=disk, salt="another-model",
                         disk_cold_start=True)
    assert cold.kv.pool(Tier.G3).registry.num_registered == 0
    assert cold.status()["tiers"]["g3"]["live"] == 0
