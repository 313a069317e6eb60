"""routing.py: engine replicas behind a router, one shared cache against a private cache each
(trace_replay `--engines N --route ...`). The routing rules pinned; hit counts of small hand-made
traces computed by hand (in the comments), on the simulator and on kvbm's registry."""
from __future__ import annotations

import pytest

from research.eviction import policy_sim as ps
from research.eviction import routing as rt
from research.eviction import trace_replay as tr

ENGINES = ["sim"] + (["registry"] if tr.registry_available() else [])

# Two engines, C = 4 (shared) or 2 + 2 (private), LRU. Hash ids 1 and 3 are odd: first-block
# (id mod 2) sends every request to engine 1.
HAND = [[1, 2], [3, 4], [1, 2], [1, 2], [3, 4], [1, 2, 3, 4]]


def _held(table):
    return lambda e: table[e]


def test_round_robin_is_the_arrival_order_mod_n():
    r = rt.Router(3, "round-robin")
    picks = [r.pick(i, [7], _held([0, 9, 0])) for i in range(7)]   # what engines hold is not asked
    assert picks == [0, 1, 2, 0, 1, 2, 0]
    assert r.load == [3, 2, 2] and r.spread() == pytest.approx(9 / 7)


def test_first_block_routes_by_the_first_hash_id_mod_n():
    r = rt.Router(4, "first-block")
    assert [r.pick(i, ch, _held([9] * 4)) for i, ch in enumerate([[5, 1], [8], [5, 2, 3], [3]])] == [1, 0, 1, 3]
    assert r.pick(6, [], _held([0] * 4)) == 2          # an empty chain: round-robin (6 mod 4)
    assert r.load == [1, 2, 1, 1]


def test_prefix_route_longest_prefix_then_least_load_then_round_robin():
    r = rt.Router(3, "prefix")
    # nobody holds anything: least load, ties round-robin from the start
    assert [r.pick(i, [1], _held([0, 0, 0])) for i in range(4)] == [0, 1, 2, 0]
    assert r.load == [2, 1, 1]
    # engines 1 and 2 hold 2 blocks (engine 0 none): both load 1, the first after engine 0 -> 1
    assert r.pick(4, [1], _held([0, 2, 2])) == 1
    # again: engine 2 now has the least load
    assert r.pick(5, [1], _held([0, 2, 2])) == 2
    # equal loads [2, 2, 2], tie between 0 and 2: the first after engine 2 (the last pick) is 0
    assert r.pick(6, [1], _held([3, 0, 3])) == 0
    # the longest prefix wins however loaded its engine is
    assert [r.pick(i, [1], _held([5, 4, 0])) for i in (7, 8)] == [0, 0]
    assert r.load == [5, 2, 2]
    assert r.spread() == pytest.approx(5 * 3 / 9)


def test_router_refuses_unknown_rules_and_no_engines():
    with pytest.raises(ValueError, match="route 'hash'"):
        rt.Router(2, "hash")
    with pytest.raises(ValueError, match="at least 1 engine, got 0"):
        rt.Router(0, "prefix")


@pytest.mark.parametrize("kind", ENGINES)
def test_shared_against_private_by_hand(kind):
    """HAND, 2 engines, LRU (14 blocks requested):
    shared, one cache of 4: r0, r1 miss; r2, r3, r4 hit 2 each; r5 hits all 4 -> 10.
    private 2 + 2, round-robin (e0: r0 r2 r4, e1: r1 r3 r5): e0 r2 hits 2, r4 evicts [1, 2];
      e1 r3 evicts [3, 4], r5 hits [1, 2] and cannot add 3, 4 (both blocks pinned) -> 4.
    prefix: r0 -> e0 (all idle), r1 -> e1 (least load), r2, r3 -> e0 (hold [1, 2]; e0 is busier
      but the prefix wins), r4 -> e1 (holds [3, 4]), r5 -> e0 (holds 1, 2; e1 none) -> 2+2+2+2 = 8.
    first-block (ids 1, 3 odd: all on e1): r1 evicts [1, 2], r2 evicts [3, 4], r3 hits 2, r4
      evicts [1, 2], r5 finds 3, 4 but not 1 -> 2."""
    total, shared = tr.replay(rt.shared_node(kind, [4], "lru", 2, "round-robin"), HAND)
    assert (total, shared) == (14, [10])
    expect = {"round-robin": ([4], [3, 3]), "prefix": ([8], [4, 2]), "first-block": ([2], [0, 6])}
    for route, (hits, load) in expect.items():
        node = rt.private_node(kind, [4], "lru", 2, route)
        assert [e.name for e in node.engines] == [kind, kind]
        assert tr.replay(node, HAND) == (14, hits), route
        assert node.router.load == load, route
    # one shared cache sees every request in arrival order whatever the route
    assert tr.replay(rt.shared_node(kind, [4], "lru", 2, "prefix"), HAND)[1] == [10]


@pytest.mark.skipif(not tr.registry_available(), reason="kvbm._fast.registry not built")
def test_shared_g2_under_private_g1s_by_hand():
    """Two engines, each with its own G1 of 2 blocks; G2 shared (4) or private (2 + 2); LRU,
    round-robin. r0 [1, 2] -> e0, r1 [3, 4] -> e1: both miss, every block offloaded to G2.
    r2 [3, 4] -> e0: its G1 holds [1, 2]; shared G2 holds 3, 4 (2 G2 hits), e0's own G2 does not.
    r3 [1, 2] -> e1: the same from the other side. Shared: 4 G2 hits; private: none."""
    chains = [[1, 2], [3, 4], [3, 4], [1, 2]]
    assert tr.replay(rt.shared_node("registry", [2, 4], "lru", 2, "round-robin"), chains) == (8, [0, 4])
    assert tr.replay(rt.private_node("registry", [2, 4], "lru", 2, "round-robin"), chains) == (8, [0, 0])
    # a prefix-aware router sees an engine's own tiers: G1 only when G2 is shared, G1 and G2 when private
    shared = rt.shared_node("registry", [2, 4], "lru", 2, "prefix")
    tr.replay(shared, chains[:2])                       # r0 -> e0, r1 -> e1
    assert [e.prefix_held([3, 4]) for e in shared.engines] == [0, 2]
    assert shared.engines[0].lower is shared.engines[1].lower
    private = rt.private_node("registry", [1, 4], "lru", 2, "prefix")
    tr.replay(private, chains[:1])                      # G1 of 1 keeps block 1; G2 takes 1 and 2
    assert private.engines[0].prefix_held([1, 2]) == 2
    assert private.engines[0].g1.prefix_held([1, 2]) == 1
    with pytest.raises(ValueError, match="hold \\[4\\] blocks"):
        tr.TieredRegistryEngine([2, 8], "lru", share_below=shared.engines[0])


def test_capacity_split_and_refusals():
    assert rt.split(8000, 8) == [1000] * 8
    assert rt.split(10, 4) == [3, 3, 2, 2]
    with pytest.raises(SystemExit, match="3 blocks cannot be split over 4"):
        rt.split(3, 4)
    with pytest.raises(SystemExit, match="future"):
        rt.private_node("sim", [100], "belady", 2, "prefix")
    with pytest.raises(SystemExit, match="exclusive"):
        rt.shared_node("sim", [10, 40], "lru", 2, "prefix")
    node = rt.private_node("sim", [10], "lru", 4, "round-robin")
    assert [e.tc.tiers[0].capacity for e in node.engines] == [3, 3, 2, 2]


@pytest.mark.skipif(not tr.registry_available(), reason="kvbm._fast.registry not built")
def test_simulator_and_registry_agree_on_every_route():
    """The same routed replay on both engines: LRU gives the same hits and the same routing; the
    registry's lineage without its ghost table gives the simulator's lineage."""
    chains = ps.chains_of(ps.generate_trace("mixed", n_requests=300, seed=7))
    for n, cap in ((2, 300), (4, 600)):
        for route in rt.ROUTES:
            for sim_p, reg_p in (("lru", "lru"), ("lineage", "lineage-noghost")):
                sim = rt.private_node("sim", [cap], sim_p, n, route)
                reg = rt.private_node("registry", [cap], reg_p, n, route)
                assert tr.replay(sim, chains) == tr.replay(reg, chains), (n, cap, route, sim_p)
                assert sim.router.load == reg.router.load
        assert tr.replay(rt.shared_node("sim", [cap], "lru", n, "prefix"), chains) == \
            tr.replay(rt.shared_node("registry", [cap], "lru", n, "prefix"), chains)


def test_cli_table(tmp_path, capsys):
    path = tmp_path / "hand.jsonl"
    ps.save_trace(str(path), [dict(timestamp=i, hash_ids=ch) for i, ch in enumerate(HAND)])
    argv = ["--trace", str(path), "--engines", "2", "--capacity", "4", "--policy", "lru",
            "--route", "round-robin", "prefix", "first-block"]
    assert tr.main(argv) == 0
    out = capsys.readouterr().out
    assert "## 2 engines, 4 blocks: shared 1 x 4 vs private 2 x 2" in out
    assert "| lru | - | round-robin | 0.7143 | 0.2857 | 2.50 | 1.00 |" in out      # 10/14, 4/14
    assert "| lru | - | prefix | 0.7143 | 0.5714 | 1.25 | 1.33 |" in out           # 8/14; loads 4, 2
    assert "| lru | - | first-block | 0.7143 | 0.1429 | 5.00 | 2.00 |" in out      # 2/14; loads 0, 6
    with pytest.raises(SystemExit, match="future"):
        tr.main(argv[:6] + ["--policy", "belady"])
    with pytest.raises(SystemExit, match="queue"):
        tr.main(argv + ["--engine", "registry", "--queue-depth", "4"])


def _shared_trace():
    try:
        return ps.chains_of(ps.load_trace(ps.find_trace()))
    except FileNotFoundError:
        return None


def test_issue_15_figures_on_the_shared_trace():
    """The issue's figures, LRU, 8 engines, 8,000 blocks: shared 0.372, round-robin 0.063, its
    "prefix-aware router" 0.347 = first-block; the longest-prefix router gets 0.354."""
    chains = _shared_trace()
    if chains is None:
        pytest.skip("the shared trace is not here (ps.TRACE_HELP)")
    assert tr.replay(rt.shared_node("sim", [8000], "lru", 8, "prefix"), chains) == (121877, [45381])
    got = {r: tr.replay(rt.private_node("sim", [8000], "lru", 8, r), chains)[1][0] for r in rt.ROUTES}
    assert got == {"round-robin": 7669, "prefix": 43177, "first-block": 42321}
