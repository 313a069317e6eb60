"""LoadRule, the disk tier's load-or-recompute decision: a G3 prefix is offered only where reading it
(at the measured read rate, an EWMA; a slow default before any read) beats recomputing its tokens
at the engine's prefill rate. Exact arithmetic, no clocks."""
from __future__ import annotations

import pytest

from kvbm.transfer.disk_index import DEFAULT_READ_BPS, READ_EWMA_ALPHA, LoadRule

MIB = 1 << 20


def test_default_rate_until_measured_then_ewma():
    rule = LoadRule(block_bytes=2 * MIB, page_size=16, prefill_tokens_per_s=25_000)
    assert rule.read_bytes_per_s == DEFAULT_READ_BPS and rule.measured_reads == 0
    rule.observe(4 * MIB, 0.002)                       # the first read replaces the default
    assert rule.read_bytes_per_s == pytest.approx(2 * MIB / 0.001)
    rule.observe(2 * MIB, 0.002)                       # then an EWMA
    assert rule.read_bytes_per_s == pytest.approx(2 * MIB / 0.001 + READ_EWMA_ALPHA * (MIB / 0.001 - 2 * MIB / 0.001))
    rule.observe(0, 1.0)
    rule.observe(MIB, 0.0)                             # nothing moved, or no time: ignored
    assert rule.measured_reads == 2


def test_offered_only_where_loading_beats_recomputing():
    # An 8B model's 16-token block is ~2 MiB: at 25k tokens/s recomputing it takes 640 us, which a
    # disk beats above ~3.3 GB/s.
    rule = LoadRule(block_bytes=2 * MIB, page_size=16, prefill_tokens_per_s=25_000)
    assert rule.recompute_s(10) == pytest.approx(10 * 16 / 25_000)
    assert rule.load_s(10) == pytest.approx(10 * 2 * MIB / DEFAULT_READ_BPS)
    assert not rule.offers(10)                         # 0.5 GB/s assumed: recompute
    rule.observe(2 * MIB, 2 * MIB / 2.1e9)             # the H200 machine's disk, 2.1 GB/s
    assert not rule.offers(10)
    rule.observe(2 * MIB, 2 * MIB / 20e9)              # an NVMe array
    rule.observe(2 * MIB, 2 * MIB / 20e9)
    assert rule.read_bytes_per_s > 3.4e9 and rule.offers(10)
    assert not rule.offers(0)                          # nothing to load is never "offered"
    assert (rule.offered, rule.declined) == (1, 2)
    d = rule.describe()
    assert d["offers"] and d["offered"] == 1 and d["declined"] == 2   # describe() counts nothing
    assert d["load_s_per_block"] < d["recompute_s_per_block"] == pytest.approx(16 / 25_000)
