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


def filled(pipe, rng, n: int):
    """Device blocks 0..n-1 filled with random bytes: (a random sequence hash each, their bytes)."""
    hashes = random_hashes(rng, n)
    pipe.fill_random(np.arange(n), rng)
    return hashes, pipe.snapshot(np.arange(n))


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


def offloaded_random(pipe, rng, n: int):
    """Device blocks 0..n-1 filled at random and offloaded in steps (offload_in_steps): (blocks,
    their hashes, their bytes)."""
    src = np.arange(n)
    hashes = random_hashes(rng, n)
    pipe.fill_random(src, rng)
    expected = pipe.snapshot(src)
    offload_in_steps(pipe.kv, src, hashes)
    return src, hashes, expected


def where(kv, hashes):
    """(in G2, in G3) masks."""
    with kv.lock:
        return kv.pool(Tier.G2).lookup(hashes) >= 0, kv.pool(Tier.G3).lookup(hashes) >= 0


@pytest.mark.parametrize("layout_type", [LayoutType.LAYER_SEPARATE, LayoutType.FULLY_CONTIGUOUS])
def test_g2_to_g3_to_g1_round_trip_is_byte_exact(make_pipeline, tmp_path, rng, layout_type):
    pipe = disk_pipeline(make_pipeline, tmp_path, layout_type=layout_type)
    kv = pipe.kv
    n = 64
    src, hashes, expected = offloaded_random(pipe, rng, n)
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
    hashes, expected = filled(pipe, rng, 24)
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
    hashes, expected = filled(pipe, rng, 64)
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


def slot_place(pipe, h) -> tuple[str, int]:
    """(data file, byte offset) of the G3 slot holding hash h in this instance's store."""
    import os
    with pipe.kv.lock:
        slot = int(pipe.kv.pool(Tier.G3).lookup(np.array([h], np.uint64))[0])
    assert slot >= 0
    bb = pipe.device_layout.config.block_bytes        # a multiple of 4 KiB here: slot = block
    folder = os.path.join(pipe.config.disk_path, pipe.config.instance_id)
    return os.path.join(folder, f"data.{slot % 4:03d}"), (slot // 4) * bb


@pytest.mark.parametrize("damage", ["flipped byte", "truncated file"])
def test_a_damaged_block_fails_the_load_is_dropped_and_recomputed(make_pipeline, tmp_path, rng, damage):
    pipe = disk_pipeline(make_pipeline, tmp_path)
    kv = pipe.kv
    hashes, expected = filled(pipe, rng, 64)
    offload_in_steps(kv, np.arange(64), hashes)
    in2, in3 = where(kv, hashes)
    run = hashes[:8]
    assert in3[:8].all() and not in2[:8].any()
    path, off = slot_place(pipe, run[5])
    if damage == "flipped byte":
        with open(path, "r+b") as fh:
            fh.seek(off + 4321)
            byte = fh.read(1)[0]
            fh.seek(off + 4321)
            fh.write(bytes([byte ^ 0x40]))
    else:
        # Cuts this slot and every later one of that file. The cleaner may extend the file again
        # with a later slot before the read: this one is then a hole of zeros, a checksum failure.
        import os
        os.truncate(path, off)
    pipe.poison()
    fut = kv.onboard(run, np.arange(100, 108))
    with pytest.raises(TransferError, match="1 failed their checksum" if damage == "flipped byte"
                       else "truncated|1 failed their checksum"):
        fut.result(DEADLINE)
    assert (pipe.snapshot(np.arange(100, 108)) == 0xA5).all()      # nothing was reported, nothing landed
    st = kv.stats()["disk"]
    assert (st["loads"], st["loads_failed"], st["loaded"]) == (0, 1, 0)
    assert st["dropped_corrupt"] + st["dropped_failed"] == 1
    assert st["dropped_corrupt"] == 1 or damage == "truncated file"
    # Dropped from G3: match and onboard stop before it; the engine recomputes it and what follows.
    _, still = where(kv, run)
    assert still.tolist() == [True] * 5 + [False] + [True] * 2
    m = kv.match(run)
    assert (m.prefix[Tier.G3], m.onboardable) == (5, 5)
    res = kv.onboard(run, np.arange(100, 108)).result(DEADLINE).value
    assert (res.loaded, res.from_disk) == (5, 5)
    assert np.array_equal(pipe.snapshot(np.arange(100, 105)), expected[:5])
    assert (pipe.snapshot(np.arange(105, 108)) == 0xA5).all()
    text = kv.transfers.metrics.render().decode()
    reason = "corrupt" if st["dropped_corrupt"] else "failed"
    assert f'kvbm_g3_blocks_dropped_total{{reason="{reason}"}} 1.0' in text
    with kv.lock:
        kv.pool(Tier.G3).registry.check_invariants()
        assert kv.pool(Tier.G3).registry.num_active == 0


def test_a_full_disk_loses_nothing_and_the_blocks_stay_in_g2(make_pipeline, tmp_path, rng):
    """A file size limit on the disk worker (EFBIG, the ENOSPC path): slots past 32 KiB of each file
    cannot be written. Those blocks stay in G2, nothing is journaled for them, what landed reads back."""
    pipe = disk_pipeline(make_pipeline, tmp_path, host_blocks=64, disk_admission="write-through",
                         disk_fsize_limit=32768)
    kv = pipe.kv
    hashes, expected = filled(pipe, rng, 24)
    kv.offload(np.arange(24), hashes).result(DEADLINE)
    kv.flush_disk(DEADLINE)
    in2, in3 = where(kv, hashes)
    assert in2.all()                                               # every block still in G2
    with kv.lock:
        slots = kv.pool(Tier.G3).lookup(hashes[in3])
    assert in3.sum() == 8 and sorted(slots.tolist()) == list(range(8))   # slots 0..7: offsets < 32 KiB
    st = kv.stats()["disk"]
    assert (st["written"], st["write_failed"], st["no_space"]) == (8, 16, 1)
    g3 = pipe.status()["tiers"]["g3"]
    assert (g3["live"], g3["write_failures"], g3["journal_records"]) == (8, 16, 1 + 8)
    assert "File too large" in g3["error"], g3["error"]
    assert pipe.status()["workers"]["h2disk"]["restarts"] == 0    # SIGXFSZ ignored: the worker lives
    other = random_hashes(rng, 64)                                  # G2 taken by other blocks
    kv.offload(np.arange(100, 164), other).result(DEADLINE)
    kv.flush_disk(DEADLINE)
    assert kv.stats()["disk"]["write_skipped"] == 64             # the disk was full a moment ago: not tried
    held = hashes[in3]
    pipe.poison()
    res = kv.onboard(held, np.arange(200, 208)).result(DEADLINE).value
    assert (res.loaded, res.from_disk) == (8, 8)
    assert np.array_equal(pipe.snapshot(np.arange(200, 208)), expected[in3])


def test_a_victim_whose_write_fails_goes_back_to_g2(make_pipeline, tmp_path, rng):
    """Victim admission under a full disk: the victims the cleaner could not write are registered
    in G2 again (their bytes never left their blocks); the cleaner then rests."""
    pipe = disk_pipeline(make_pipeline, tmp_path, disk_fsize_limit=16384)  # only slots 0..3 fit
    kv = pipe.kv
    hashes = random_hashes(rng, 64)
    pipe.fill_random(np.arange(64), rng)
    for i in range(0, 64, 4):
        offload_in_steps(kv, np.arange(i, i + 4), hashes[i:i + 4])
        st = kv.stats()["disk"]
        if st["no_space"]:
            break
    assert st["no_space"] == 1 and st["write_failed"] > 0, st
    assert 0 < st["written"] <= 4 and st["victims_lost"] == 0, st
    in2, in3 = where(kv, hashes[:i + 4])
    assert in3.sum() == st["written"] and (in2 | in3).all()         # nothing lost


def test_two_instances_sharing_one_directory_onboard_each_others_blocks(make_pipeline, tmp_path, rng):
    """Instances a and b, each with its own kvbm-workers, share disk_path: b's disk worker reads a's
    journal (refresh_disk, or match every few seconds) and b onboards the blocks a wrote, checksums
    verified. a's file cut: b's load fails cleanly and b forgets those entries; a is unaffected."""
    disk = str(tmp_path / "shared")
    a = disk_pipeline(make_pipeline, tmp_path, disk_path=disk)
    b = disk_pipeline(make_pipeline, tmp_path, disk_path=disk)
    hashes = random_hashes(rng, 64)
    a.fill_random(np.arange(64), rng)
    expected = a.snapshot(np.arange(64))
    offload_in_steps(a.kv, np.arange(64), hashes)
    _, in3 = where(a.kv, hashes)
    held = hashes[in3]
    assert held.size >= 16
    b.kv.refresh_disk(DEADLINE)
    m = b.kv.match(held)
    assert (m.prefix[Tier.G2], m.prefix[Tier.G3], m.onboardable) == (0, held.size, held.size)
    res = b.kv.onboard(held[:12], np.arange(12)).result(DEADLINE).value
    assert (res.loaded, res.from_disk) == (12, 12)
    assert np.array_equal(b.snapshot(np.arange(12)), expected[in3][:12])
    st = b.kv.stats()["disk"]
    assert (st["peers"], st["peer_blocks"], st["loaded_peer"]) == (1, held.size, 12)
    assert b.status()["tiers"]["g3"]["peer_read"] == 12
    assert b.kv.pool(Tier.G3).registry.num_registered == 0         # nothing of a's was copied into b's G3

    # a's data files cut short: b's load of a's blocks fails cleanly, b forgets those entries.
    import os
    folder = os.path.join(disk, a.config.instance_id)
    for f in range(4):
        os.truncate(os.path.join(folder, f"data.{f:03d}"), 0)
    b.poison()
    with pytest.raises(TransferError, match="truncated|failed their checksum"):
        b.kv.onboard(held[12:16], np.arange(20, 24)).result(DEADLINE)
    assert (b.snapshot(np.arange(20, 24)) == 0xA5).all()
    st = b.kv.stats()["disk"]
    assert st["peer_forgotten"] == 4 and st["loads_failed"] == 1 and st["peer_blocks"] == held.size - 4
    assert b.kv.match(held[12:16]).prefix[Tier.G3] == 0
    assert a.kv.match(held).prefix[Tier.G3] == held.size          # a's own view is unchanged


def test_kill_9_of_the_disk_worker_mid_write_serves_nothing_torn(make_pipeline, tmp_path, rng):
    """The disk worker SIGKILLed with writes in flight: those writes fail (their G2 blocks stay in
    G2), the supervisor restarts it, the engine registers again and goes on; every block G3 holds,
    then and after a warm restart, reads back byte for byte (checksums verified on every read)."""
    disk = str(tmp_path / "g3")
    pipe = disk_pipeline(make_pipeline, tmp_path, instance="k9", disk_path=disk, host_blocks=96,
                         disk_admission="write-through", worker_delay_ms=150)
    kv = pipe.kv
    hashes, expected = filled(pipe, rng, 64)
    old = pipe.status()["workers"]["h2disk"]["pid"]
    futs = [kv.offload(np.arange(i, i + 8), hashes[i:i + 8]) for i in range(0, 64, 8)]
    q = kv.transfers._paths[P.Path.H2DISK]
    from tests.support.pipeline_harness import wait_for
    wait_for(lambda: q.outstanding, DEADLINE, "a disk write at the disk worker")
    import os
    import signal
    os.kill(old, signal.SIGKILL)
    for f in futs:
        f.result(DEADLINE)
    kv.flush_disk(DEADLINE)
    st = wait_for(lambda: (s := pipe.status())["workers"]["h2disk"]["ready"] and s, DEADLINE, "the new disk worker")
    w = st["workers"]["h2disk"]
    assert w["pid"] != old and w["restarts"] == 1 and w["gen"] == 2
    pipe.pids.add(w["pid"])
    d = kv.stats()["disk"]
    assert d["write_failed"] >= 1 and d["written"] + d["write_failed"] + d["write_skipped"] == 64, d
    in2, in3 = where(kv, hashes)
    assert in2.all() and in3.sum() == d["written"]                # write-through: every block still in G2
    more = random_hashes(rng, 16)                                 # the new generation writes
    pipe.fill_random(np.arange(64, 80), rng)
    expected = np.concatenate([expected, pipe.snapshot(np.arange(64, 80))])
    kv.offload(np.arange(64, 80), more).result(DEADLINE)
    kv.flush_disk(DEADLINE)
    hashes = np.concatenate([hashes, more])
    in3 = where(kv, hashes)[1]
    assert in3[64:].all()
    pipe.close()

    again = disk_pipeline(make_pipeline, tmp_path, instance="k9", disk_path=disk, host_blocks=96)
    found = where(again.kv, hashes)[1]
    # Everything the engine had, and possibly a block whose write was journaled just before the
    # kill while its reply never came (the engine freed that slot; the store still vouches for it).
    assert (found | ~in3).all() and found.sum() <= in3.sum() + 8
    idx = np.flatnonzero(found)
    for i in range(0, idx.size, 16):                              # staging fits in G2 16 at a time
        part = idx[i:i + 16]
        res = again.kv.onboard(hashes[part], part).result(DEADLINE).value
        assert (res.loaded, res.from_disk) == (part.size, part.size)
    assert np.array_equal(again.snapshot(idx), expected[idx])
    g3 = again.status()["tiers"]["g3"]
    assert g3["checksum_failures"] == 0 and g3["read"] == idx.size


def test_a_full_g3_evicts_by_its_own_policy_and_rewrites_slots(make_pipeline, tmp_path, rng):
    """G3 of 16 slots behind a G2 of 48: G3 evicts its oldest blocks to take G2's newer victims and
    the disk worker rewrites those slots (a durable DELETE first); whatever G3 holds at the end reads
    back byte for byte, and after a warm restart exactly that is found."""
    disk = str(tmp_path / "g3")
    pipe = disk_pipeline(make_pipeline, tmp_path, instance="full3", disk_path=disk, disk_blocks=16)
    kv = pipe.kv
    hashes, expected = filled(pipe, rng, 96)
    offload_in_steps(kv, np.arange(96), hashes)
    in2, in3 = where(kv, hashes)
    st = kv.stats()
    assert in3.sum() == 16 and st["G3"]["evicted"] > 0 and st["disk"]["written"] > 16
    assert not in3[:8].any()                                      # the oldest victims gave way
    idx = np.flatnonzero(in3)
    res = kv.onboard(hashes[idx], idx).result(DEADLINE).value    # (a run of G3 only: none of it in G2)
    assert (res.loaded, res.from_disk) == (16, 16)
    assert np.array_equal(pipe.snapshot(idx), expected[idx])
    kv.flush_disk(DEADLINE)
    held = where(kv, hashes)[1]
    pipe.close()
    again = disk_pipeline(make_pipeline, tmp_path, instance="full3", disk_path=disk, disk_blocks=16)
    assert np.array_equal(where(again.kv, hashes)[1], held)
    g3 = again.status()["tiers"]["g3"]
    assert g3["live"] == 16 and g3["journal_records"] <= 1 + 2 * st["disk"]["written"] + 16


def test_a_g3_run_longer_than_g2_can_stage_is_cut_there_and_the_rest_recomputed(make_pipeline, tmp_path, rng):
    """A G3 run of 32 blocks while only 8 G2 blocks can take its bytes (the rest of G2 held by
    other loads): the onboard reads the first 8 into G2 and stops, one future, no wait for room;
    the device blocks after them stay untouched (the engine recomputes them). With no G2 block free
    at all it stops before G3. Once G2 has room again, the whole run loads."""
    pipe = disk_pipeline(make_pipeline, tmp_path, host_blocks=48, disk_admission="write-through")
    kv = pipe.kv
    hashes, expected = filled(pipe, rng, 96)
    offload_in_steps(kv, np.arange(96), hashes, step=8)
    in2, in3 = where(kv, hashes)
    assert in3.all() and not in2[:48].any() and in2[48:].all()    # write-through: all on disk, G2 the newest
    run = hashes[:32]
    with kv.lock:
        g2 = kv.pool(Tier.G2)
        held = np.asarray(g2.match(hashes[56:], acquire=True))        # 40 of G2's 48 blocks in use
        assert held.size == 40 and g2.registry.num_free + g2.registry.num_inactive == 8
    m = kv.match(run)
    assert (m.prefix[Tier.G2], m.prefix[Tier.G3], m.onboardable) == (0, 32, 32)   # match cannot know G2's room
    pipe.poison()
    res = kv.onboard(run, np.arange(100, 132)).result(DEADLINE)
    assert res.path is P.Path.DISK2D
    assert (res.value.requested, res.value.loaded, res.value.from_disk) == (32, 8, 8)
    assert np.array_equal(pipe.snapshot(np.arange(100, 108)), expected[:8])
    assert (pipe.snapshot(np.arange(108, 132)) == 0xA5).all()
    with kv.lock:
        assert (g2.lookup(run[:8]) >= 0).all()                       # the staged 8 are G2's now
        more = np.asarray(g2.match(run[:8], acquire=True))           # ... and now in use as well
        assert g2.registry.num_free + g2.registry.num_inactive == 0
    res = kv.onboard(run[8:], np.arange(140, 164)).result(DEADLINE)
    assert (res.value.loaded, res.value.from_disk) == (0, 0)         # no G2 room at all: stops before G3
    assert (pipe.snapshot(np.arange(140, 164)) == 0xA5).all()
    with kv.lock:
        g2.release(np.concatenate([held, more]))
    res = kv.onboard(run, np.arange(100, 132)).result(DEADLINE).value
    assert (res.loaded, res.from_host, res.from_disk) == (32, 8, 24)
    assert np.array_equal(pipe.snapshot(np.arange(100, 132)), expected[:32])
    st = kv.stats()["disk"]
    assert (st["loads"], st["loaded"], st["loads_failed"]) == (2, 32, 0)
    with kv.lock:
        for tier in (Tier.G2, Tier.G3):
            kv.pool(tier).registry.check_invariants()
            assert kv.pool(tier).registry.num_active == 0


def spy_submissions(kv, monkeypatch, fail_read: int | None = None):
    """Records the G3 onboard's submissions in order: ("read", n) when a DISK2H is submitted,
    ("landed", n) when its read settled (its finalize, before it runs), ("h2d", n) when an H2D is
    submitted. fail_read: the DISK2H submission of that index raises BackpressureError instead."""
    from kvbm.errors import BackpressureError
    events: list[tuple[str, int]] = []
    tm = kv.transfers
    submit = tm.submit

    def spy(path, src, dst, **kw):
        n = len(src)
        if path == P.Path.DISK2H:
            if fail_read is not None and sum(e[0] == "read" for e in events) == fail_read:
                events.append(("refused", n))
                raise BackpressureError("test: no budget for this chunk")
            events.append(("read", n))
            fin = kw["finalize"]

            def landed(outcome, fin=fin, n=n):
                events.append(("landed", n))
                return fin(outcome)
            kw["finalize"] = landed
        elif path == P.Path.H2D:
            events.append(("h2d", n))
        return submit(path, src, dst, **kw)
    monkeypatch.setattr(tm, "submit", spy)
    return events


def test_a_g3_run_is_read_in_chunks_each_copied_to_the_device_as_it_lands(make_pipeline, tmp_path, rng,
                                                                         monkeypatch):
    """disk_onboard_chunk_blocks=3: a run of 16 G3 blocks behind 8 of G2 is read as 6 chunks (3 or
    2 blocks), all submitted by onboard() and each its own request at the disk worker; each chunk's
    H2D is submitted as its read lands (before any later chunk's has), the G2 prefix's first. One
    future, layer progress, byte for byte, every staging block promoted, nothing left held."""
    pipe = disk_pipeline(make_pipeline, tmp_path, disk_onboard_chunk_blocks=3)
    kv = pipe.kv
    n = 64
    hashes, expected = filled(pipe, rng, n)
    offload_in_steps(kv, np.arange(n), hashes)
    in2, in3 = where(kv, hashes)
    assert in2[-8:].all() and in3[:16].all() and not in2[:16].any()
    reads_before = pipe.status()["tiers"]["g3"]["read_requests"]
    events = spy_submissions(kv, monkeypatch)
    q = np.concatenate([hashes[-8:], hashes[:16]])
    pipe.poison()
    dst = np.arange(100, 124)
    fut = kv.onboard(q, dst)
    sizes = [2, 3, 3, 2, 3, 3]                       # 16 blocks in 6 chunks, evenly split
    assert events[:7] == [("h2d", 8)] + [("read", s) for s in sizes]   # every read submitted at once
    for layer in range(pipe.device_layout.config.num_layers):
        assert fut.wait_layer(layer, DEADLINE)
    res = fut.result(DEADLINE)
    assert (res.value.loaded, res.value.from_host, res.value.from_disk, res.value.read_path) == (24, 8, 16, "staged")
    after = [e for e in events[1:] if e[0] != "read"]
    assert after == [e for s in sizes for e in (("landed", s), ("h2d", s))]   # each H2D as its read landed
    assert np.array_equal(pipe.snapshot(dst), expected[np.r_[n - 8:n, 0:16]])
    assert (pipe.snapshot(np.arange(124, 140)) == 0xA5).all()
    from tests.support.pipeline_harness import wait_for
    wait_for(lambda: pipe.status()["tiers"]["g3"]["read_requests"] == reads_before + 6, DEADLINE,
             "6 read requests at the disk worker (the chunks were not coalesced)")
    st = kv.stats()["disk"]
    assert (st["loads"], st["loaded"], st["promoted"], st["loads_failed"]) == (1, 16, 16, 0)
    assert where(kv, hashes[:16])[0].all()
    kv.flush_disk(DEADLINE)
    with kv.lock:
        for tier in (Tier.G2, Tier.G3):
            kv.pool(tier).registry.check_invariants()
            assert kv.pool(tier).registry.num_active == 0


def test_a_corrupt_block_in_a_middle_chunk_fails_the_whole_onboard(make_pipeline, tmp_path, rng, monkeypatch):
    """Chunks of 2; block 5 of an 8-block G3 run flipped (chunk 3 of 4): the onboard fails (nothing
    reported loaded, one failed load), the last chunk, read after the failure, is not copied to the
    device; the chunks read intact are G2's now, the corrupt block is dropped from G3, every staging
    block is released, and the next onboard loads the 5 blocks before the dropped one."""
    pipe = disk_pipeline(make_pipeline, tmp_path, disk_onboard_chunk_blocks=2)
    kv = pipe.kv
    hashes, expected = filled(pipe, rng, 64)
    offload_in_steps(kv, np.arange(64), hashes)
    run = hashes[:8]
    assert where(kv, run)[1].all() and not where(kv, run)[0].any()
    path, off = slot_place(pipe, run[5])
    with open(path, "r+b") as fh:
        fh.seek(off + 99)
        byte = fh.read(1)[0]
        fh.seek(off + 99)
        fh.write(bytes([byte ^ 0x01]))
    events = spy_submissions(kv, monkeypatch)
    pipe.poison()
    fut = kv.onboard(run, np.arange(100, 108))
    with pytest.raises(TransferError, match="1 failed their checksum"):
        fut.result(DEADLINE)
    assert events == [("read", 2)] * 4 + [("landed", 2), ("h2d", 2)] * 2 + [("landed", 2)] * 2
    assert (pipe.snapshot(np.arange(106, 108)) == 0xA5).all()      # read after the failure: not copied
    st = kv.stats()["disk"]
    assert (st["loads"], st["loads_failed"], st["loaded"], st["dropped_corrupt"]) == (0, 1, 0, 1)
    in2, in3 = where(kv, run)
    assert in2.tolist() == [True] * 4 + [False] * 2 + [True] * 2   # the intact chunks were promoted
    assert in3.tolist() == [True] * 5 + [False] + [True] * 2
    kv.flush_disk(DEADLINE)
    with kv.lock:
        for tier in (Tier.G2, Tier.G3):
            kv.pool(tier).registry.check_invariants()
            assert kv.pool(tier).registry.num_active == 0
    m = kv.match(run)
    assert m.onboardable == 5
    res = kv.onboard(run, np.arange(110, 118)).result(DEADLINE).value
    assert (res.loaded, res.from_host, res.from_disk) == (5, 4, 1)
    assert np.array_equal(pipe.snapshot(np.arange(110, 115)), expected[:5])


def test_a_chunk_not_submitted_fails_the_onboard_after_the_ones_in_flight(make_pipeline, tmp_path, rng,
                                                                        monkeypatch):
    """The third chunk's read refused at submission (the first two in flight): onboard() still
    returns its future, which fails once the first two have settled (never before: their bytes may
    still be landing), one failed load counted; the refused chunks' staging and G3 blocks are
    released at once, the others' as they settle (read intact: promoted to G2)."""
    pipe = disk_pipeline(make_pipeline, tmp_path, disk_onboard_chunk_blocks=2)
    kv = pipe.kv
    hashes = random_hashes(rng, 64)
    pipe.fill_random(np.arange(64), rng)
    offload_in_steps(kv, np.arange(64), hashes)
    run = hashes[:8]
    events = spy_submissions(kv, monkeypatch, fail_read=2)
    fut = kv.onboard(run, np.arange(100, 108))
    with pytest.raises(TransferError, match="chunk 3 of 4 not submitted: BackpressureError"):
        fut.result(DEADLINE)
    assert events[:3] == [("read", 2), ("read", 2), ("refused", 2)]
    # The first two ran to the end; each copied to the device only if it landed before the refusal.
    assert events[3:].count(("landed", 2)) == 2 and len(events) - 3 - 2 == events[3:].count(("h2d", 2))
    st = kv.stats()["disk"]
    assert (st["loads"], st["loads_failed"], st["loaded"]) == (0, 1, 0)
    assert where(kv, run)[0].tolist() == [True] * 4 + [False] * 4
    kv.flush_disk(DEADLINE)
    with kv.lock:
        for tier in (Tier.G2, Tier.G3):
            kv.pool(tier).registry.check_invariants()
            assert kv.pool(tier).registry.num_active == 0


def test_the_disk_worker_killed_with_chunks_in_flight_fails_the_onboard_without_a_hang(make_pipeline, tmp_path,
                                                                                     rng):
    """Chunks of 2 at a slow disk worker (each request held 0.5 s), SIGKILLed while they are there:
    the onboard settles (no hang); if it failed (the kill came before the last chunk landed, as it
    does unless this machine stalls a second), nothing is reported loaded and one load counted
    failed (the chunks that failed are dropped from G3, as any failed read's blocks are); either way
    every staging and G3 block is released and the restarted worker serves what is left byte for
    byte."""
    pipe = disk_pipeline(make_pipeline, tmp_path, instance="k9r", host_blocks=16, disk_admission="write-through",
                         disk_onboard_chunk_blocks=2, worker_delay_ms=500)
    kv = pipe.kv
    hashes, expected = filled(pipe, rng, 32)
    offload_in_steps(kv, np.arange(32), hashes, step=8)
    in2, in3 = where(kv, hashes)
    assert in3.all() and not in2[:6].any()
    run = hashes[:6]
    old = pipe.status()["workers"]["h2disk"]["pid"]
    fut = kv.onboard(run, np.arange(100, 106))
    q = kv.transfers._paths[P.Path.DISK2H]
    from tests.support.pipeline_harness import wait_for
    wait_for(lambda: q.outstanding, DEADLINE, "a chunk's read at the disk worker")
    import os
    import signal
    os.kill(old, signal.SIGKILL)
    try:
        res = fut.result(DEADLINE)
    except TransferError:
        st = kv.stats()["disk"]
        assert (st["loads"], st["loads_failed"], st["loaded"]) == (0, 1, 0)
    else:
        assert res.value.from_disk == 6
    st = wait_for(lambda: (s := pipe.status())["workers"]["h2disk"]["ready"] and s, DEADLINE, "the new disk worker")
    pipe.pids.add(st["workers"]["h2disk"]["pid"])
    with kv.lock:
        for tier in (Tier.G2, Tier.G3):
            kv.pool(tier).registry.check_invariants()
            assert kv.pool(tier).registry.num_active == 0
    m = kv.match(run)
    res = kv.onboard(run, np.arange(110, 116)).result(DEADLINE).value
    assert res.loaded == m.onboardable
    assert np.array_equal(pipe.snapshot(np.arange(110, 110 + res.loaded)), expected[:res.loaded])


def test_a_g3_block_evicted_between_plan_and_acquire_cuts_the_run(make_pipeline, tmp_path, rng, monkeypatch):
    """With a shared G3, another engine can evict a block of the run between an onboard's plan and
    its acquire (this engine's lock does not stop it). The eviction is made to happen right there
    (plan wrapped); the onboard then loads the run up to that block, byte for byte, and reports that
    many loaded, instead of failing."""
    pipe = disk_pipeline(make_pipeline, tmp_path)
    kv = pipe.kv
    n = 64
    src, hashes, expected = offloaded_random(pipe, rng, n)
    in2, in3 = where(kv, hashes[:16])
    assert not in2.any() and in3.all()
    disk = kv.disk
    plan = disk.plan

    def plan_then_lose_one(q, count=False):
        got = plan(q, count)
        g3 = kv.pool(Tier.G3)
        g3.drop(g3.match(q[got[0] + 5:got[0] + 6], acquire=True))   # the run's 6th block leaves G3 now
        return got

    monkeypatch.setattr(disk, "plan", plan_then_lose_one)
    pipe.poison()
    res = kv.onboard(hashes[:16], np.arange(100, 116)).result(DEADLINE).value
    assert (res.loaded, res.from_host, res.from_disk) == (5, 0, 5)
    assert np.array_equal(pipe.snapshot(np.arange(100, 105)), expected[:5])
    kv.flush_disk(DEADLINE)   # the staging took G2 room: victims being written are held until written
    with kv.lock:
        for tier in (Tier.G2, Tier.G3):
            kv.pool(tier).registry.check_invariants()
            assert kv.pool(tier).registry.num_active == 0
