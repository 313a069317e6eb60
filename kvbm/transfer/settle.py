"""Settlement: how requests settle and their submissions resolve.

A request settles once: OK, or failed with the first error of its submission (its siblings not yet
sent settle with it and are never sent). When the last request of a submission has settled, its
budget goes back, `finalize(outcome)` runs, the metrics count it, and the future resolves: a
TransferResult, or TransferError (with blocks_may_be_written when a worker that was never reported
dead may still copy into the destination blocks). Runs on the TransferManager's I/O thread, and on
the submitting thread for submissions that never reach it (empty, disk paths).
"""
from __future__ import annotations

import logging
import time

from kvbm.errors import TransferError
from kvbm.metrics import TransferMetrics
from kvbm.transfer.budget import InflightBudget
from kvbm.transfer.futures import TransferResult
from kvbm.transfer.path_queue import PathQueue
from kvbm.transfer.records import Request, RequestState, Submission, WireRequest

logger = logging.getLogger(__name__)
QUEUED, SETTLED = RequestState.QUEUED, RequestState.SETTLED


class Settlement:
    """The I/O thread's settling of requests, and the resolution of their submissions."""

    def __init__(self, budget: InflightBudget, metrics: TransferMetrics) -> None:
        self.budget = budget
        self.metrics = metrics
        self.num_layers = 0   # of the registered layout: a successful layered future reports them all

    def layer_progress(self, sub: Submission) -> None:
        sub.future._advance(min(r.layers_done for r in sub.requests))

    def settle_wire(self, q: PathQueue, wire: WireRequest, error: str | None) -> None:
        q.outstanding.pop(wire.rid, None)
        for m in wire.members:
            self.settle(m, error)

    def settle_unsafe(self, q: PathQueue, wire: WireRequest, why: str) -> None:
        """Fails a request whose worker generation may still be copying it."""
        for m in wire.members:
            m.sub.maybe_written = True
        self.settle_wire(q, wire, f"{q.path.label} request {wire.rid}: {why}; worker generation "
                                  f"{wire.gen} may still be running the copy: the destination blocks "
                                  f"may still be written")

    def settle(self, req: Request, error: str | None) -> None:
        if req.state is SETTLED:
            return
        req.state = SETTLED
        sub = req.sub
        if error is not None and sub.error is None:
            sub.error = error
            # Siblings not yet sent will never be: settle them now (lazy removal from the heap).
            for other in sub.requests:
                if other.state is QUEUED and other is not req:
                    other.state = SETTLED
                    sub.pending -= 1
        sub.pending -= 1
        if sub.pending <= 0:
            self.resolve(sub)
        elif sub.layers and sub.error is None:
            self.layer_progress(sub)

    def resolve(self, sub: Submission) -> None:
        if sub.future.done():
            return
        ok, error, value = sub.error is None, sub.error, None
        if sub.requests:
            # Before finalize: it takes the pool lock, and a thread holding that lock may be
            # waiting in submit() for exactly this budget.
            self.budget.give_back(sub.nbytes)
        if sub.finalize is not None:
            try:
                value = sub.finalize(sub.outcome())
            except Exception as err:  # noqa: BLE001 - surfaces to the caller through the future
                logger.error("finalize of a %s transfer failed", sub.path.label, exc_info=True)
                ok, error = False, f"finalize failed: {type(err).__name__}: {err}"
        m = self.metrics.of(sub.path.label)
        (m.ok if ok else m.failed).inc()
        if ok:
            m.bytes.inc(sub.moved)
            m.blocks.inc(sub.future.num_blocks)
            if sub.layers:
                sub.future._advance(self.num_layers)
            sub.future.set_result(TransferResult(sub.path, sub.future.num_blocks, sub.moved,
                                                 time.monotonic() - sub.t_submit, value))
        else:
            # Callers must not reuse the destination blocks blindly.
            sub.future.set_exception(TransferError(error or "transfer failed",
                                                   blocks_may_be_written=sub.maybe_written))
            sub.future._wake_layers()

    def fail_submission(self, sub: Submission, reason: str) -> None:
        for req in sub.requests:
            if req.state is not SETTLED:
                self.settle(req, reason)
