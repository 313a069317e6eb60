"""The TransferManager's pieces that need no worker: the in-flight budget and the one accounting
(Prometheus counters, which stats() reads back)."""
from __future__ import annotations

import threading
import time

import pytest

from kvbm.errors import BackpressureError
from kvbm.metrics import TransferMetrics
from kvbm.transfer.budget import InflightBudget


def test_budget_refuses_without_waiting_and_lets_an_oversized_submission_go_alone():
    budget = InflightBudget(100)
    budget.take(60, block=False, timeout=None)
    with pytest.raises(BackpressureError, match="60 bytes in flight \\+ 50 requested exceeds the bound of 100"):
        budget.take(50, block=False, timeout=None)
    with pytest.raises(BackpressureError, match="waited 0.01 s for 50 bytes"):
        budget.take(50, block=True, timeout=0.01)
    budget.give_back(60)
    budget.take(500, block=False, timeout=None)      # larger than the bound, nothing else in flight
    assert budget.used == 500


def test_budget_waiter_proceeds_when_budget_comes_back():
    budget = InflightBudget(100)
    budget.take(100, block=False, timeout=None)
    took = threading.Event()

    def waiter():
        budget.take(40, block=True, timeout=30)
        took.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not took.wait(0.05)
    budget.give_back(100)
    assert took.wait(30)
    t.join(30)
    assert budget.used == 40


def test_totals_sum_counters_over_labels():
    m = TransferMetrics()
    assert m.totals() == {"submitted": 0, "completed": 0, "failed": 0, "bytes": 0, "requests": 0,
                          "worker_deaths": 0, "timeouts": 0}
    m.submitted.labels("d2h").inc(3)
    m.submitted.labels("h2d").inc()
    m.transfers.labels("d2h", "ok").inc(2)
    m.transfers.labels("h2d", "failed").inc()
    m.bytes.labels("d2h").inc(4096)
    m.requests.labels("h2d").inc(5)
    m.worker_deaths.labels("d2h").inc()
    m.timeouts.labels("h2d").inc()
    assert m.totals() == {"submitted": 4, "completed": 2, "failed": 1, "bytes": 4096, "requests": 5,
                          "worker_deaths": 1, "timeouts": 1}
    assert b'kvbm_transfers_total{path="h2d",status="failed"} 1.0' in m.render()


def test_budget_wakes_every_waiter_that_now_fits():
    budget = InflightBudget(100)
    budget.take(100, block=False, timeout=None)
    started = threading.Barrier(3)

    def waiter():
        started.wait(30)
        budget.take(30, block=True, timeout=30)

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(30)
    deadline = time.monotonic() + 30
    while budget._waiting < 2 and time.monotonic() < deadline:   # both wait, past the fast path
        time.sleep(0.001)
    assert budget._waiting == 2
    budget.give_back(100)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and budget.used == 60


def test_labelled_families_expose_what_prometheus_client_would():
    """kvbm.metrics.LabelledFamily (the cheap counters and histogram of the transfer path) renders
    the samples prometheus_client's own Counter and Histogram render for the same updates."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from kvbm.metrics import LATENCY_BUCKETS, LabelledFamily

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counters = (LabelledFamily("x_total_bytes", "doc", ["path", "status"], ours),
                Counter("x_total_bytes", "doc", ["path", "status"], registry=theirs))
    histograms = (LabelledFamily("x_latency_seconds", "doc", ["path"], ours, buckets=LATENCY_BUCKETS),
                  Histogram("x_latency_seconds", "doc", ["path"], buckets=LATENCY_BUCKETS, registry=theirs))
    for family in counters:
        family.labels("d2h", "ok").inc(3)
        family.labels("d2h", "ok").inc()
        family.labels("h2d", "failed").inc(2)
    for family in histograms:
        for value in (0.0, 50e-6, 51e-6, 0.003, 0.003, 7.5, 99.0):   # on a bound, past the last, ...
            family.labels("d2h").observe(value)

    def samples(registry):
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line and "_created" not in line and not line.startswith("#"))

    assert samples(ours) == samples(theirs)
    with pytest.raises(ValueError, match="labels"):
        counters[0].labels("d2h")
