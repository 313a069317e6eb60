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
  render / serve     text exposition of a registry; an HTTP endpoint on 127.0.0.1 when asked
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from kvbm.errors import ConfigError

LATENCY_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.submitted = Counter("kvbm_transfer_submissions", "Transfers submitted (non-empty)", ["path"],
                                 registry=r)
        self.requests = Counter("kvbm_wire_requests", "Wire requests sent to path workers", ["path"], registry=r)
        self.transfers = Counter("kvbm_transfers", "Transfer submissions settled, by path and outcome",
                                 ["path", "status"], registry=r)
        self.bytes = Counter("kvbm_transfer_bytes", "Bytes moved by successful transfers", ["path"], registry=r)
        self.blocks = Counter("kvbm_transfer_blocks", "Blocks moved by successful transfers", ["path"], registry=r)
        self.latency = Histogram("kvbm_request_latency_seconds", "Wire request round trip (send to done)",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("kvbm_inflight_bytes", "Bytes of submitted, unsettled transfers", registry=r)
        self.queued = Gauge("kvbm_queued_requests", "Requests waiting in the engine-side queue", ["path"], registry=r)
        self.worker_deaths = Counter("kvbm_worker_deaths", "Path worker deaths seen by this engine", ["path"],
                                     registry=r)
        self.timeouts = Counter("kvbm_request_timeouts", "Requests that missed their deadline", ["path"], registry=r)
        self._of: dict[str, PathMetrics] = {}

    def of(self, label: str) -> PathMetrics:
        """The hot-path children of one path, looked up once: `labels()` takes a lock and builds a
        key on every call, a cost a 1-block transfer pays several times."""
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


def _total(counter: Counter, **labels: str) -> int:
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
