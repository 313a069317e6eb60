"""trace_replay.py on kvbm's own registry: the registry engine gives exactly the simulators' hits
(the ghost table), the queue hint through kvbm.pools.WaitingHints, and the prefill server whose
waiting queue is hinted (`--queue-depth`, `--load`)."""
from __future__ import annotations

import pytest

from research.eviction import policy_sim as ps
from research.eviction import trace_replay as tr


def test_ghost_lineage_equals_the_research_simulator():
    """The registry-engine replay of a small synthetic trace gives exactly the hits of
    policy_research.GhostLineage with the same G (1x and 3x the capacity) in the registry's
    allocation order (trace_replay.ghost_lineage_sim), and of plain lineage without a table."""
    chains = ps.chains_of(ps.generate_trace("rag", n_requests=400, seed=3))
    for cap in (60, 200):
        for mult in (1, 3):
            sim = tr.ghost_lineage_sim(chains, cap, mult * cap)
            eng = tr.RegistryEngine(cap, "lineage", ghost_blocks=mult * cap)
            total, hits = tr.replay(eng, chains)
            assert total == sim.requested and hits[0] == sim.hits, (cap, mult, hits, sim.hits)
            assert eng.reg.num_ghosts == mult * cap
        eng = tr.RegistryEngine(cap, "lineage", ghost_blocks=0)
        assert tr.replay(eng, chains)[1][0] == ps.simulate(chains, cap, "lineage").hits


def test_replay_queue_hint_on_the_registry_engine():
    """trace_replay's registry engine with --queue-depth: deterministic, and the hint raises the
    hit count on a small synthetic trace; depth 0 is the plain policy."""
    chains = ps.chains_of(ps.generate_trace("rag", n_requests=300, seed=3))
    plain = tr.replay(tr.RegistryEngine(300, "lineage"), chains)[1][0]
    assert plain == 2813
    assert tr.replay(tr.RegistryEngine(300, "lineage", queue_depth=0, chains=chains), chains)[1][0] == plain
    hinted = [tr.replay(tr.RegistryEngine(300, "lineage", queue_depth=k, chains=chains), chains)[1][0]
              for k in (4, 16, 64)]
    assert hinted == [2962, 3335, 3564]
    eng = tr.RegistryEngine(300, "lineage", queue_depth=16, chains=chains)
    tr.replay(eng, chains)
    assert not eng.hints.waiting and not eng.hints.counts   # the queue drained at the end


def test_prefill_server_queue_timing():
    """PrefillServer: FIFO, the rate from the trace and the load, hits shorten a request."""
    trace = [dict(timestamp=0, input_length=1000, hash_ids=[1, 2]),
             dict(timestamp=0, input_length=1000, hash_ids=[3, 4]),
             dict(timestamp=10_000, input_length=1000, hash_ids=[5, 6])]
    srv = tr.PrefillServer(trace, load=1.0, block_tokens=250)
    assert srv.rate == pytest.approx(300.0)           # 3000 tokens over 10 s, utilisation 1
    assert srv.start(0) == 1                          # request 1 has arrived too: it waits
    srv.finish(0, hit_blocks=0)                       # 1000 tokens at 300/s
    assert srv.start(1) == 1                          # request 2 arrives at 10 s, not yet
    assert srv.waits[1] == pytest.approx(1000 / 300)
    srv.finish(1, hit_blocks=2)                       # 500 of its tokens cached
    assert srv.free_at == pytest.approx(1500 / 300)
    assert srv.start(2) == 2 and srv.waits[2] == 0.0  # the server was idle when it came
    srv.finish(2, hit_blocks=9)                       # more hits than tokens: no time, not negative
    assert srv.free_at == pytest.approx(10.0)
    assert srv.depths == [1, 0, 0]
    assert "queue 0.3 deep" in srv.summary()
    for load in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="load"):
            tr.PrefillServer(trace, load=load)
    with pytest.raises(ValueError, match="must not decrease"):
        tr.PrefillServer(list(reversed(trace)), load=1.0)
    with pytest.raises(ValueError, match="span no time"):
        tr.PrefillServer([dict(t, timestamp=5) for t in trace], load=1.0)
    with pytest.raises(ValueError, match="timestamp"):
        tr.PrefillServer([dict(hash_ids=[1])], load=1.0)
    with pytest.raises(ValueError, match="at least one"):
        tr.PrefillServer([], load=1.0)
    alone = tr.PrefillServer(trace[:1], load=1.0)      # one request: it never waits
    assert alone.start(0) == 0 and alone.waits == [0.0]


def test_replay_behind_a_prefill_server_hints_its_queue():
    """--load: the waiting queue the server builds up is hinted; deeper under more load, more
    hits than without the hint, deterministic, and the queue drains at the end."""
    trace = ps.generate_trace("rag", n_requests=300, seed=3)
    chains = ps.chains_of(trace)
    plain = tr.replay(tr.RegistryEngine(300, "lineage"), chains)[1][0]
    runs = {}
    for load in (0.5, 2.0):
        srv = tr.PrefillServer(trace, load)
        eng = tr.RegistryEngine(300, "lineage", chains=chains, server=srv)
        runs[load] = (tr.replay(eng, chains)[1][0], sum(srv.depths) / len(srv.depths))
        assert not eng.hints.waiting and not eng.hints.counts
    assert runs[0.5][1] < runs[2.0][1]
    assert runs[2.0][0] > plain
    again = tr.PrefillServer(trace, 2.0)
    assert tr.replay(tr.RegistryEngine(300, "lineage", chains=chains, server=again), chains)[1][0] == runs[2.0][0]


def test_g3_admission_rules_on_the_tiered_registry_engine():
    """The admissions to G3 of TieredRegistryEngine (the disk tier's candidates): write-through
    writes blocks newly registered in G2 (those G3 lacks), the victim cache what G2 evicts, a
    frequency threshold only blocks read by K or more requests; G1 and G2 hits do not depend on it."""
    import numpy as np
    chains = ps.chains_of(ps.generate_trace("rag", n_requests=300, seed=3))
    runs = {}
    for adm in ("all", "write-through", "freq2", "victim-freq2"):
        eng = tr.TieredRegistryEngine([60, 200, 800], "lineage", adm)
        _, hits = tr.replay(eng, chains)
        runs[adm] = (hits, eng.writes(), eng)
    assert len({tuple(h[:2]) for h, _, _ in runs.values()}) == 1      # G1, G2 unaffected by G3's admission
    for adm, (_, writes, _) in runs.items():
        assert 0 < writes[2] <= writes[1], adm                         # G3 writes come from G2's blocks
    assert runs["freq2"][1][2] < runs["all"][1][2] and runs["victim-freq2"][1][2] < runs["all"][1][2]
    for adm in ("freq2", "victim-freq2"):
        eng = runs[adm][2]
        keys = np.array(list(eng.count), dtype=np.uint64)
        held = keys[eng.lower[1].lookup(keys) >= 0]
        assert held.size and all(eng.count[int(h)] >= 2 for h in held.tolist()), adm
    with pytest.raises(SystemExit, match="reused"):
        tr.TieredRegistryEngine([60, 200, 800], "lineage", "reused")
