"""Engine metrics scraped over HTTP: a real GET to 127.0.0.1 on a free port, the names (kvbm's and
Dynamo KVBM's exact ones) and the values after recorded activity; one endpoint serves the
TransferManager's registry and the engine's together."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbm.errors import ConfigError
from kvbm.metrics import DYNAMO_NAMES, EngineMetrics, TransferMetrics, serve_engine
from kvbm.pools import Tier


def _scrape(url: str) -> tuple[str, dict[tuple[str, tuple], float]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    return text, samples


@pytest.fixture
def served():
    transfer = TransferMetrics()               # the engine's registry: one endpoint for both
    metrics = EngineMetrics(transfer.registry, window=2)
    server = serve_engine(metrics.registry, 0)
    yield metrics, transfer, server
    server.close()


def test_scrape_names_and_values(served):
    metrics, transfer, server = served
    assert server.url == f"http://127.0.0.1:{server.port}/metrics" and server.port > 0
    metrics.record_match(8, 48, device=2, host=3, disk=1)
    metrics.record_match(4, 0)
    metrics.record_transfer("d2h", 5, 5 * 4096, 0.004)
    metrics.record_transfer("d2h", 1, 4096, 0.002)
    metrics.record_transfer("h2disk", 2, 8192)
    metrics.record_transfer("h2d", 3, 3 * 4096, 0.001)
    metrics.record_transfer("disk2d", 1, 4096, 0.5)
    metrics.record_eviction(Tier.G2, 7)
    metrics.record_eviction("G3", 2)
    metrics.record_load_failure(Tier.G3, 1)
    transfer.submitted.labels("d2h").inc()

    text, s = _scrape(server.url)
    # Dynamo KVBM's names, exactly (no _total suffix), untyped as prometheus_client writes an IntCounter
    for name in (*DYNAMO_NAMES, "kvbm_matched_tokens"):
        assert f"# TYPE {name} untyped\n" in text
    assert s[("kvbm_offload_blocks_d2h", ())] == 6
    assert s[("kvbm_offload_blocks_h2d", ())] == 2          # Dynamo's "h2d" offload: host -> disk
    assert s[("kvbm_offload_blocks_d2d", ())] == 0
    assert s[("kvbm_onboard_blocks_h2d", ())] == 3
    assert s[("kvbm_onboard_blocks_d2d", ())] == 1          # Dynamo's "d2d" onboard: disk -> device
    assert s[("kvbm_matched_tokens", ())] == 48
    assert s[("kvbm_host_cache_hit_rate", ())] == 3 / 12
    assert s[("kvbm_disk_cache_hit_rate", ())] == 1 / 12
    # kvbm's own
    assert s[("kvbm_lookup_blocks_total", ())] == 12
    assert s[("kvbm_hit_blocks_total", (("tier", "G1"),))] == 2
    assert s[("kvbm_hit_blocks_total", (("tier", "G2"),))] == 3
    assert s[("kvbm_hit_blocks_total", (("tier", "G3"),))] == 1
    assert s[("kvbm_offloaded_blocks_total", (("path", "d2h"),))] == 6
    assert s[("kvbm_offloaded_bytes_total", (("path", "d2h"),))] == 6 * 4096
    assert s[("kvbm_offloaded_bytes_total", (("path", "h2disk"),))] == 8192
    assert s[("kvbm_onboarded_blocks_total", (("path", "disk2d"),))] == 1
    assert s[("kvbm_onboarded_bytes_total", (("path", "h2d"),))] == 3 * 4096
    assert s[("kvbm_evicted_blocks_total", (("tier", "G2"),))] == 7
    assert s[("kvbm_evicted_blocks_total", (("tier", "G3"),))] == 2
    assert s[("kvbm_load_failures_total", (("tier", "G3"),))] == 1
    assert s[("kvbm_transfer_latency_seconds_count", (("path", "d2h"),))] == 2
    assert s[("kvbm_transfer_latency_seconds_sum", (("path", "d2h"),))] == pytest.approx(0.006)
    assert s[("kvbm_transfer_latency_seconds_bucket", (("le", "0.005"), ("path", "d2h")))] == 2
    assert s[("kvbm_transfer_latency_seconds_bucket", (("le", "0.2"), ("path", "disk2d")))] == 0
    assert s[("kvbm_transfer_submissions_total", (("path", "d2h"),))] == 1   # the TransferManager's, same scrape

    # the hit-rate window holds the last 2 lookups: a third pushes the first out
    metrics.record_match(4, 16, host=4)
    _, s = _scrape(server.url)
    assert s[("kvbm_host_cache_hit_rate", ())] == 4 / 8 and s[("kvbm_disk_cache_hit_rate", ())] == 0
    assert s[("kvbm_matched_tokens", ())] == 64


def test_bad_arguments_are_config_errors(served):
    metrics, _, server = served
    with pytest.raises(ConfigError, match="transfer path: expected one of"):
        metrics.record_transfer("d2disk", 1, 1)
    with pytest.raises(ConfigError, match="tier: expected one of"):
        metrics.record_eviction("G4", 1)
    with pytest.raises(ConfigError, match=f"engine metrics port {server.port} on 127.0.0.1: "):
        serve_engine(metrics.registry, server.port)            # in use
    with pytest.raises(ConfigError, match="expected 0..65535"):
        serve_engine(metrics.registry, 70000)
    with pytest.raises(ConfigError, match="expected an IP address"):
        serve_engine(metrics.registry, 0, host="example.org")
