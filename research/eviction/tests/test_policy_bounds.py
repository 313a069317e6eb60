"""policy_bounds.py: the clairvoyant window policy and the hazard-table eviction rule on
hand-made cases (the reference points of POLICY_ROUND3.md)."""
from __future__ import annotations

import pytest

from research.eviction import policy_bounds as pb
from research.eviction import policy_sim as ps


def test_oracle_window_keeps_what_the_next_requests_use():
    chains = [[1], [2], [1], [3], [2]]
    # 3 requests ahead of each release: 2 (released at 1) is used at 4, 1 (released at 2) is not
    # used again -> [3] evicts 1 and [2] hits
    c = ps.PrefixCache(2, pb.OracleWindow(3), future=chains)
    assert [c.access(ch, i, tail_partial=False) for i, ch in enumerate(chains)] == [0, 0, 1, 0, 1]
    # no look-ahead: plain LRU evicts the older 2
    c = ps.PrefixCache(2, pb.OracleWindow(0), future=chains)
    assert [c.access(ch, i, tail_partial=False) for i, ch in enumerate(chains)] == [0, 0, 1, 0, 0]


def test_hazard_table_counts_reads_over_exposure():
    t = pb.HazardTable(pb.FEATURES["count"], every=1)
    for i, ch in enumerate([[1], [2], [1]]):
        t.observe(ch, i)
    cell = (0, 1, 1)                  # one slice, used once, 1-2 requests since
    assert t.exposure[cell] == 3 and t.events[cell] == 1
    assert t.rate(cell) == pytest.approx(1.5 / 53)
    assert t.rate((0, 5, 7)) == 0.0   # never seen: ranks lowest under the default prior
    sliced = pb.HazardTable(pb.FEATURES["count"], slices=2, n_requests=3, every=1)
    for i, ch in enumerate([[1], [2], [1]]):
        sliced.observe(ch, i)
    assert sliced.exposure == {(0, 1, 1): 1, (1, 1, 1): 2} and sliced.events == {(1, 1, 1): 1}
    mean = pb.HazardTable(pb.FEATURES["count"], every=1, prior="mean")
    for i, ch in enumerate([[1], [2], [1]]):
        mean.observe(ch, i)
    assert 0.0 < mean.rate((0, 5, 7)) < 1.0
    with pytest.raises(ValueError, match="prior"):
        pb.HazardTable(pb.FEATURES["count"], prior="zero")


class FixedTable:
    """A hand-set hazard per use count (any age), for the eviction rule alone."""
    feature = staticmethod(pb.FEATURES["count"])

    def __init__(self, by_count):
        self.by_count = by_count

    def slice_of(self, now):
        return 0

    def rate(self, cell):
        return self.by_count[cell[1]]


@pytest.mark.parametrize("reused_rate, first_victims", [(0.5, [1]), (0.001, [2])])
def test_hazard_cache_evicts_the_lowest_hazard_class_head_after_tails(reused_rate, first_victims):
    chains = [[1, 11], [2, 22], [2, 23], [3, 33], [4, 44], [5, 55]]
    cache = pb.HazardCache(5, FixedTable({1: 0.01, 2: reused_rate}))
    hits = [cache.access(ch, i) for i, ch in enumerate(chains)]
    assert hits == [0, 0, 1, 0, 0, 0]
    evicted = list(cache.history)
    # partial tails go first, in release order; then the class with the lower hazard loses its
    # oldest block: the once-used document 1, or the reused 2 when reuse is rated below first use
    assert evicted[:5] == [11, 22, 23, 33, 44]
    assert evicted[5:6] == first_victims


def test_requests_without_blocks_and_repeated_hashes_are_replayed():
    chains = [[], [1, 2, 3], [1, 1, 2], [1, 2, 3, 4], [5]]
    for online in (False, True):
        h = pb.hazard_replay(chains, 3, "count*length*gap", online=online)
        assert 0.0 <= h <= 1.0
    assert ps.simulate(chains, 3, pb.OracleWindow(2)).requested == 11
