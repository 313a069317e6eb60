"""The connector's worker side: one TP rank runs the scheduler side's plan (no vLLM types).

Parts:
  WorkerSide   binds a StepPlan, starts its loads (`start_loads`, before the forward pass), submits
               its stores (`submit_stores`, after it: the blocks' KV is computed by then), waits for
               the stores of preempted requests before vLLM reuses their blocks (`flush`), and
               collects what finished (`collect`): requests whose load is over (finished_recving),
               delayed requests whose stores are over (finished_sending), device blocks whose load
               failed (vLLM recomputes them), and the RankReport for the scheduler side.

Transfers go through kvbm.transfer.shard_transfers.ShardTransfers (this rank's registration with
the engine's kvbm-workers). A load is reported finished only once its future has resolved, and a
failed one always names its device blocks: a failed load is never reported as loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kvbm.errors import KvbmError
from kvbm.integrations.vllm.plan import LoadJob, RankReport, StepPlan, StoreJob

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: LoadJob | StoreJob
    future: object      # TransferFuture (None: failed at submission)
    error: str = ""
    reported: bool = False   # its device blocks were already named as failed (a layer-wise timeout)


@dataclass
class Collected:
    finished_sending: set[str]
    finished_recving: set[str]     # every asynchronous load that ended, failed ones included
    failed_recving: set[str]       # of those, the ones that failed (vLLM recomputes the request)
    failed_blocks: set[int]
    report: RankReport


class WorkerSide:
    def __init__(self, transfers, flush_timeout_s: float = 60.0) -> None:
        self.transfers = transfers          # ShardTransfers, attached
        self.flush_timeout_s = flush_timeout_s
        self.plan = StepPlan()
        self.loads: dict[int, _Pending] = {}
        self.stores: dict[int, _Pending] = {}
        self.awaiting_finish: set[str] = set()   # delayed requests: finished_sending once stored
        self.failed_blocks: set[int] = set()     # reported by the next collect

    def bind(self, plan: StepPlan) -> None:
        self.plan = plan
        self.awaiting_finish.update(plan.delayed_reqs)
        for job in plan.failed_loads:
            self.failed_blocks.update(job.device_blocks)
            self.loads[job.job] = _Pending(job, None, "G2 lost the blocks before the load")

    def start_loads(self) -> None:
        for job in self.plan.loads:
            self.loads[job.job] = self._submit(job, load=True)

    def submit_stores(self) -> None:
        for job in self.plan.stores:
            self.stores[job.job] = self._submit(job, load=False)

    def _submit(self, job, load: bool) -> _Pending:
        if not job.host_blocks:
            return _Pending(job, None)
        try:
            if load:
                fut = self.transfers.load(job.host_blocks, job.device_blocks, layers=True)
            else:
                fut = self.transfers.store(job.device_blocks, job.host_blocks)
        except (KvbmError, OSError) as err:
            logger.warning("kvbm: %s of request %s not submitted: %s", "load" if load else "store", job.req_id, err)
            return _Pending(job, None, f"{type(err).__name__}: {err}")
        return _Pending(job, fut)

    def flush(self, req_ids) -> None:
        """Wait (bounded) for the stores of these requests: vLLM is about to reuse their blocks. A
        store still running past the bound is abandoned: reported failed, never registered."""
        want = set(req_ids)
        for pending in self.stores.values():
            if pending.job.req_id in want and pending.future is not None and not pending.future.done():
                try:
                    pending.future.result(self.flush_timeout_s)
                except Exception as err:  # noqa: BLE001 - recorded; collect reports it
                    pending.error = pending.error or f"{type(err).__name__}: {err}"

    def wait_all(self, timeout: float) -> None:
        """Wait (each bounded by `timeout`) for every load and store in flight to settle; a
        failure is left for collect to report. For a caller that must not step on (tests that
        settle each step, an idle engine)."""
        for pending in list(self.loads.values()) + list(self.stores.values()):
            if pending.future is not None:
                try:
                    pending.future.result(timeout)
                except Exception:  # noqa: BLE001 - collect reports it
                    pass

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Synchronous loads: wait until `layer` has landed for every load of this step (a failed
        load is collected and reported, never raised into vLLM's forward pass)."""
        for job in self.plan.loads:
            pending = self.loads.get(job.job)
            if not job.layerwise or pending is None or pending.future is None:
                continue
            try:
                landed = pending.future.wait_layer(layer, timeout)
            except Exception:  # noqa: BLE001 - collect reports the failure with its blocks
                landed = True
            if not landed and not pending.error:
                # Past the bound the forward pass goes on without this layer: vLLM must hear of the
                # blocks in this very step (the job stays tracked until its future settles, so
                # its G2 blocks are released then).
                pending.error = f"layer {layer} not landed within {timeout} s"
                pending.reported = True
                self.failed_blocks.update(pending.job.device_blocks)

    def finish_layerwise(self) -> None:
        """The forward pass is over: this step's layer-wise loads have landed (their last layer was
        waited for) or failed; wait out the rest of each (bounded) so collect reports them now, in
        the step that used them, as vLLM requires of synchronous loads."""
        for job in self.plan.loads:
            pending = self.loads.get(job.job)
            if job.layerwise and pending is not None and pending.future is not None:
                try:
                    pending.future.result(self.flush_timeout_s)
                except Exception as err:  # noqa: BLE001 - collect reports it
                    pending.error = pending.error or f"{type(err).__name__}: {err}"

    def collect(self) -> Collected:
        report = RankReport()
        recving: set[str] = set()
        failed_reqs: set[str] = set()
        failed, self.failed_blocks = self.failed_blocks, set()
        for job_id, pending in list(self.loads.items()):
            ok = self._settled(pending)
            if ok is None:
                continue
            del self.loads[job_id]
            if not pending.job.layerwise:
                recving.add(pending.job.req_id)   # an asynchronous load: vLLM waits for this word
            if not pending.job.host_blocks and not pending.error:
                continue          # nothing to load (a lost-only plan is reported through failed_blocks)
            failed.update(pending.job.failed_blocks)   # a part planned as failed (G3 read not intact)
            if ok:
                report.done[job_id] = 1
                report.loaded_bytes += self._bytes(pending)
            else:
                if not pending.reported:   # (named again later, the blocks may be another request's)
                    failed.update(pending.job.device_blocks)
                if not pending.job.layerwise:
                    failed_reqs.add(pending.job.req_id)
                if pending.job.host_blocks:
                    report.failed[job_id] = 1
                report.errors.append(f"load of {pending.job.req_id}: {pending.error}")
        for job_id, pending in list(self.stores.items()):
            ok = self._settled(pending)
            if ok is None:
                continue
            del self.stores[job_id]
            if ok:
                report.done[job_id] = 1
                report.stored_bytes += self._bytes(pending)
            else:
                report.failed[job_id] = 1
                report.errors.append(f"store of {pending.job.req_id}: {pending.error}")
        busy = {p.job.req_id for p in self.stores.values()} | {p.job.req_id for p in self.loads.values()}
        sending = {r for r in self.awaiting_finish if r not in busy}
        self.awaiting_finish -= sending
        return Collected(sending, recving, failed_reqs, failed, report)

    @staticmethod
    def _settled(pending: _Pending) -> bool | None:
        """True: copied; False: failed; None: still running."""
        if pending.future is None:
            return not pending.error
        if not pending.future.done():
            return None
        err = pending.future.exception()
        if err is not None:
            pending.error = pending.error or f"{type(err).__name__}: {err}"
            return False
        return not pending.error

    def _bytes(self, pending: _Pending) -> int:
        layout = getattr(self.transfers, "device_layout", None)
        return len(pending.job.host_blocks) * (layout.config.block_bytes if layout is not None else 0)

    def busy(self) -> bool:
        return bool(self.loads or self.stores)
