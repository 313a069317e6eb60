"""Prometheus metrics of the transfer pipeline, one CollectorRegistry per owner (no global registry:
two managers in one process, or a test that builds many, never collide).

Parts:
  TransferMetrics    engine side (TransferManager): submissions, transfers and bytes by path and
                     status, wire requests, request latency histogram, in-flight bytes, queued
                     requests per path, worker deaths, timeouts; `totals()` is what stats() reports
  DiskMetrics        engine side, the disk tier (DiskTransfers): blocks written to G3 and loaded
                     from it by read path, blocks dropped (corrupt, failed reads), victims G2 lost
                     unwritten, load-or-recompute decisions, the read rate and prefill rate they use
  SupervisorMetrics  kvbm-workers: worker up/generation/restarts per path, G2 bytes, pre-fault and
                     pinning seconds, bytes moved per path (from the workers' stats)
  EngineMetrics      engine side, what the engine's connector sees: lookups and hits per tier,
                     matched tokens, blocks and bytes offloaded/onboarded per path, evictions per
                     tier, load failures, transfer latency per path; plus Dynamo KVBM's series under
                     Dynamo's exact names (DYNAMO_NAMES), so its dashboards keep working
  render / serve     text exposition of a registry; an HTTP endpoint on 127.0.0.1 when asked
  serve_engine       the engine's endpoint: any port (0: a free one), loopback unless told, closable

Dynamo KVBM's series (lib/llm/src/block_manager/metrics_kvbm.rs, names in dynamo_runtime's
prometheus_names.rs) are Rust `IntCounter`s exposed without a `_total` suffix, which
prometheus_client adds to every counter; EngineMetrics writes them through a collector of its own
as untyped samples under exactly Dynamo's names. Dynamo's "h2d" in offload_blocks_h2d is host to
disk and its "d2d" in onboard_blocks_d2d is disk to device; kvbm's path labels are those of
kvbm.wire.protocol.Path (d2h, h2d, h2disk, disk2d, disk2h).
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from bisect import bisect_left
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from kvbm.errors import ConfigError

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Updated for every request and submission: cheap families (LabelledFamily says why).
        self.submitted = LabelledFamily("kvbm_transfer_submissions", "Transfers submitted (non-empty)", ["path"], r)
        self.requests = LabelledFamily("kvbm_wire_requests", "Wire requests sent to path workers", ["path"], r)
        self.transfers = LabelledFamily("kvbm_transfers", "Transfer submissions settled, by path and outcome",
                                        ["path", "status"], r)
        self.bytes = LabelledFamily("kvbm_transfer_bytes", "Bytes moved by successful transfers", ["path"], r)
        self.blocks = LabelledFamily("kvbm_transfer_blocks", "Blocks moved by successful transfers", ["path"], r)
        self.latency = LabelledFamily("kvbm_request_latency_seconds", "Wire request round trip (send to done)",
                                      ["path"], r, buckets=LATENCY_BUCKETS)
        # Set to a function of the budget by its owner (TransferManager): read when scraped.
        self.inflight = Gauge("kvbm_inflight_bytes", "Bytes of submitted, unsettled transfers", registry=r)
        self.queued = Gauge("kvbm_queued_requests", "Requests waiting in the engine-side queue", ["path"], registry=r)
        self.worker_deaths = Counter("kvbm_worker_deaths", "Path worker deaths seen by this engine", ["path"],
                                     registry=r)
        self.timeouts = Counter("kvbm_request_timeouts", "Requests that missed their deadline", ["path"], registry=r)
        self._of: dict[str, PathMetrics] = {}

    def of(self, label: str) -> PathMetrics:
        """The hot-path children of one path, looked up once per label."""
        m = self._of.get(label)
        if m is None:
            m = self._of[label] = PathMetrics(self, label)
        return m

    def totals(self) -> dict[str, int]:
        """Every counter summed over its labels (transfers split by outcome), under the names
        TransferManager.stats() reports: one accounting, read back from Prometheus."""
        return {"submitted": _total(self.submitted), "completed": _total(self.transfers, status="ok"),
                "failed": _total(self.transfers, status="failed"), "bytes": _total(self.bytes),
                "requests": _total(self.requests), "worker_deaths": _total(self.worker_deaths),
                "timeouts": _total(self.timeouts)}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PathMetrics:
    """TransferMetrics' children for one path label (created on first use, as labels() would)."""

    __slots__ = ("submitted", "requests", "latency", "ok", "failed", "bytes", "blocks")

    def __init__(self, m: TransferMetrics, label: str) -> None:
        self.submitted = m.submitted.labels(label)
        self.requests = m.requests.labels(label)
        self.latency = m.latency.labels(label)
        self.ok = m.transfers.labels(label, "ok")
        self.failed = m.transfers.labels(label, "failed")
        self.bytes = m.bytes.labels(label)
        self.blocks = m.blocks.labels(label)


class LabelledFamily:
    """A labelled Prometheus counter (or, with `buckets`, histogram) whose children cost a lock and
    an add: the transfer pipeline updates several for every settled request, where
    prometheus_client's own children cost ~0.7 us an inc() and ~2 us an observe() (their checks,
    and a lock per value), a measurable part of a 1-block round trip. Exposed through the
    registry under the same names and labels (a counter's sample ends in _total; no _created)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry,
                 buckets: tuple[float, ...] | None = None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        # +Inf is always the last bucket (a tuple that names it gets it once, as prometheus_client)
        self.buckets = tuple(b for b in buckets if b != float("inf")) if buckets else None
        self._children: dict[tuple[str, ...], _Count | _Histogram] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values) -> _Count | _Histogram:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, _Histogram(self.buckets) if self.buckets else _Count())
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self):
        family = self._family()
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            if self.buckets is None:
                family.add_metric(list(key), child.value)
            else:
                counts, total = child.snapshot()
                cumulative, running = [], 0
                for bound, count in zip((*map(floatToGoString, self.buckets), "+Inf"), counts):
                    running += count
                    cumulative.append((bound, running))
                family.add_metric(list(key), cumulative, total)
        yield family

    def _family(self) -> Metric:
        if self.buckets is None:
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _Count:
    __slots__ = ("value", "_lock")

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up: inc({amount})")
        with self._lock:
            self.value += amount


class _Histogram:
    __slots__ = ("_bounds", "_counts", "_sum", "_lock")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)   # the last: past every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)      # the first bucket whose upper bound is >= value
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


def _total(counter: Counter | LabelledFamily, **labels: str) -> int:
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return int(total)


class DiskMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.written = Counter("kvbm_g3_blocks_written", "Blocks written to G3 and registered there", registry=r)
        self.write_failed = Counter("kvbm_g3_write_failures", "Blocks whose G3 write failed (they stay in G2)",
                                    registry=r)
        self.loaded = Counter("kvbm_g3_blocks_loaded", "Blocks onboarded from G3, by read path", ["read_path"],
                              registry=r)
        self.dropped = Counter("kvbm_g3_blocks_dropped", "G3 blocks dropped after a failed load, by reason",
                               ["reason"], registry=r)
        self.victims_lost = Counter("kvbm_g3_victims_lost", "G2 victims evicted before the cleaner wrote them",
                                    registry=r)
        self.decisions = Counter("kvbm_g3_load_decisions", "G3 prefixes offered (load) or declined (recompute)",
                                 ["decision"], registry=r)
        self.read_rate = Gauge("kvbm_g3_read_bytes_per_second", "Measured G3 read rate (EWMA; the default "
                               "before any read)", registry=r)
        self.prefill_rate = Gauge("kvbm_g3_prefill_tokens_per_second", "The engine's recompute estimate",
                                  registry=r)


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.up = Gauge("kvbm_worker_up", "1 while the path worker is ready", ["path"], registry=r)
        self.generation = Gauge("kvbm_worker_generation", "Current worker generation", ["path"], registry=r)
        self.restarts = Counter("kvbm_worker_restarts", "Path worker restarts", ["path"], registry=r)
        self.worker_bytes = Gauge("kvbm_worker_bytes", "Bytes copied by the current worker generation", ["path"],
                                  registry=r)
        self.worker_queue = Gauge("kvbm_worker_queue", "Requests queued inside the path worker", ["path"], registry=r)
        self.host_bytes = Gauge("kvbm_host_pool_bytes", "Size of the G2 segment", registry=r)
        self.prefault_seconds = Gauge("kvbm_host_prefault_seconds", "Time to pre-fault G2", registry=r)
        self.pin_seconds = Gauge("kvbm_host_pin_seconds", "Time to pin G2 (cudaHostRegister) in a worker",
                                 ["path"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def serve(registry: CollectorRegistry, port: int) -> None:
    """Serves the registry at http://127.0.0.1:port/metrics (loopback only). A port that cannot be
    bound (in use, out of range, privileged) is a ConfigError naming it."""
    if not 0 < port < 65536:
        raise ConfigError(f"metrics port: expected 1..65535, got {port}")
    try:
        start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as err:
        raise ConfigError(f"metrics port {port} on 127.0.0.1: {err.strerror or err}; pick another "
                          "--metrics-port") from err


# kvbm.wire.protocol.Path labels (this layer cannot import wire): which way each path moves blocks.
OFFLOAD_PATHS = ("d2h", "h2disk")
ONBOARD_PATHS = ("h2d", "disk2d", "disk2h")
TIERS = ("G1", "G2", "G3")
# Dynamo KVBM's name -> the kvbm path it counts (None: a path kvbm does not have; always 0).
DYNAMO_NAMES = {
    "kvbm_offload_blocks_d2h": "d2h",        # device -> host
    "kvbm_offload_blocks_h2d": "h2disk",     # host -> disk
    "kvbm_offload_blocks_d2d": None,         # device -> disk, bypassing host: kvbm always stages in G2
    "kvbm_onboard_blocks_h2d": "h2d",        # host -> device
    "kvbm_onboard_blocks_d2d": "disk2d",     # disk -> device
}
HIT_RATE_WINDOW = 1000     # lookups in Dynamo's sliding-window hit rates


class EngineMetrics:
    """What the engine's connector records, once per lookup, transfer completion or eviction batch
    (never per block). `registry`: share the TransferManager's (`kv.transfers.metrics.registry`) so
    one endpoint serves both."""

    def __init__(self, registry: CollectorRegistry | None = None, window: int = HIT_RATE_WINDOW) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lookup_blocks = Counter("kvbm_lookup_blocks", "Blocks asked for by prefix lookups", registry=r)
        self.hit_blocks = Counter("kvbm_hit_blocks", "Blocks of matched prefixes, by the tier that held them",
                                  ["tier"], registry=r)
        self.offloaded_blocks = Counter("kvbm_offloaded_blocks", "Blocks offloaded, by path", ["path"], registry=r)
        self.offloaded_bytes = Counter("kvbm_offloaded_bytes", "Bytes offloaded, by path", ["path"], registry=r)
        self.onboarded_blocks = Counter("kvbm_onboarded_blocks", "Blocks onboarded, by path", ["path"], registry=r)
        self.onboarded_bytes = Counter("kvbm_onboarded_bytes", "Bytes onboarded, by path", ["path"], registry=r)
        self.evicted_blocks = Counter("kvbm_evicted_blocks", "Registered blocks evicted, by tier", ["tier"],
                                      registry=r)
        self.load_failures = Counter("kvbm_load_failures", "Blocks whose load failed (the engine recomputes "
                                     "them), by the tier read", ["tier"], registry=r)
        self.transfer_latency = Histogram("kvbm_transfer_latency_seconds", "Transfer job, submitted to completed "
                                          "as the connector sees it, by path", ["path"], buckets=LATENCY_BUCKETS,
                                          registry=r)
        self._lock = threading.Lock()
        self._dynamo = dict.fromkeys(DYNAMO_NAMES, 0)
        self._matched_tokens = 0
        self._window: deque[tuple[int, int, int]] = deque(maxlen=window)   # (queried, host hits, disk hits)
        self._sums = [0, 0, 0]
        r.register(_DynamoCollector(self))

    def record_match(self, queried_blocks: int, matched_tokens: int, *, device: int = 0, host: int = 0,
                     disk: int = 0) -> None:
        """One lookup: `queried_blocks` asked for, the prefix found per tier, the tokens it covers."""
        self.lookup_blocks.inc(queried_blocks)
        for tier, n in (("G1", device), ("G2", host), ("G3", disk)):
            if n:
                self.hit_blocks.labels(tier).inc(n)
        with self._lock:
            self._matched_tokens += matched_tokens
            if len(self._window) == self._window.maxlen:
                old = self._window[0]
                self._sums = [a - b for a, b in zip(self._sums, old)]
            self._window.append((queried_blocks, host, disk))
            self._sums = [self._sums[0] + queried_blocks, self._sums[1] + host, self._sums[2] + disk]

    def record_transfer(self, path: str, blocks: int, nbytes: int, seconds: float | None = None) -> None:
        """A completed transfer job on `path` (kvbm.wire.protocol.Path.label)."""
        if path in OFFLOAD_PATHS:
            self.offloaded_blocks.labels(path).inc(blocks)
            self.offloaded_bytes.labels(path).inc(nbytes)
        elif path in ONBOARD_PATHS:
            self.onboarded_blocks.labels(path).inc(blocks)
            self.onboarded_bytes.labels(path).inc(nbytes)
        else:
            raise ConfigError(f"transfer path: expected one of {OFFLOAD_PATHS + ONBOARD_PATHS}, got {path!r}")
        if seconds is not None:
            self.transfer_latency.labels(path).observe(seconds)
        with self._lock:
            for name, counted in DYNAMO_NAMES.items():
                if counted == path:
                    self._dynamo[name] += blocks

    def record_eviction(self, tier: str, blocks: int) -> None:
        if blocks:
            self.evicted_blocks.labels(_tier(tier)).inc(blocks)

    def record_load_failure(self, tier: str, blocks: int) -> None:
        if blocks:
            self.load_failures.labels(_tier(tier)).inc(blocks)

    def hit_rates(self) -> tuple[float, float]:
        """(host, disk) hit rate over the last `window` lookups; 0 before any."""
        with self._lock:
            queried, host, disk = self._sums
        return (host / queried, disk / queried) if queried else (0.0, 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _tier(tier) -> str:
    name = getattr(tier, "name", tier)   # kvbm.pools.Tier or its name
    if name not in TIERS:
        raise ConfigError(f"tier: expected one of {TIERS}, got {tier!r}")
    return name


class _DynamoCollector:
    """Dynamo KVBM's series under its exact names (see the module docstring)."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        with m._lock:
            values = dict(m._dynamo)
            values["kvbm_matched_tokens"] = m._matched_tokens
        for name, value in values.items():
            path = DYNAMO_NAMES.get(name)
            help_ = "The number of matched tokens" if name == "kvbm_matched_tokens" else \
                f"Blocks moved on kvbm path {path} (Dynamo KVBM's name)" if path else \
                "Device to disk bypassing host: kvbm has no such path (always 0)"
            metric = Metric(name, help_, "unknown")
            metric.add_sample(name, {}, float(value))
            yield metric
        host, disk = m.hit_rates()
        yield GaugeMetricFamily("kvbm_host_cache_hit_rate", "Host cache hit rate (0.0-1.0) over the last "
                                f"{m._window.maxlen} lookups", value=host)
        yield GaugeMetricFamily("kvbm_disk_cache_hit_rate", "Disk cache hit rate (0.0-1.0) over the last "
                                f"{m._window.maxlen} lookups", value=disk)

    def describe(self):
        return list(self.collect())


class MetricsServer:
    """A running metrics endpoint: `url`, `port` (the bound one), `close()`."""

    def __init__(self, server, thread, host: str) -> None:
        self._server, self._thread = server, thread
        self.host = host
        self.port = server.server_port
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_engine(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serves the registry at http://host:port/metrics from a thread of this process (port 0: a
    free one). A host other than loopback is logged (Dynamo's endpoint listens on every address;
    kvbm's only when told). An unbindable port or host is a ConfigError naming it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ConfigError(f"engine metrics port: expected 0..65535, got {port!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError as err:
        raise ConfigError(f"engine metrics host: expected an IP address, got {host!r}") from err
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(f"engine metrics port {port} on {host}: {err.strerror or err}; pick another "
                          "engine_metrics_port") from err
    served = MetricsServer(server, thread, host)
    (logger.info if loopback else logger.warning)("engine metrics at %s%s", served.url,
                                                  "" if loopback else " (reachable from other hosts)")
    return served
