"""The connector's scheduler side: kvbm's G2 metadata in vLLM's scheduler process (no vLLM types).

Parts:
  SchedulerSide   per request: what G2 holds beyond vLLM's own prefix (`lookup`, side-effect free),
                  the G2 blocks acquired for a load once vLLM allocated device blocks (`allocated`),
                  the device block table as vLLM grows it (`scheduled`), stores of newly full
                  blocks planned each step (`build`), and jobs settled from the ranks' reports
                  (`report`); `finished` says whether vLLM must keep a request's blocks until its
                  stores are done.

Order of one step (vLLM calls the adapter, the adapter calls this): lookup -> allocated (for each
request vLLM schedules with an external hit) -> scheduled (every scheduled request) -> build ->
[workers run the plan] -> report / sent -> finished (when vLLM ends a request).

With a disk tier (`disk`: the DiskTransfers of the manager's G3, registered with the disk worker by
KvBlockManager.attach_disk_tier; TP 1 only): lookup answers G2's prefix, then the run after it that
G3 holds when the LoadRule offers it. allocated() acquires the G2 part and starts `disk.stage()`
for the G3 part (DISK2H into G2 staging blocks, checksums verified); the request's LoadJob waits
in `_staging` until that future is done, checked by each build(): staged -> one LoadJob over the
G2 part and the staged blocks (all acquired in G2); not intact (a flipped byte, a vanished file) ->
the LoadJob of the G2 part alone, the G3 part's device blocks named in its `failed_blocks` (vLLM
recomputes from there), or, with no G2 part, a failed load (vLLM recomputes the request). Such a
request always loads asynchronously. Admission as kvbm.transfer.host_offload does it: after each
G2 allocation `disk.host_allocated()` (the victim cleaner), after each G2 registration
`disk.host_registered(keys)` (write-through), under the manager's lock. Events: G3's writes and
evictions as medium STORAGE; G2's evictions are drained here only when the disk tier is not in
victim admission (then its cleaner drains G2's eviction ring to count the victims it lost; G2
BlockRemoved are not sent then). A replica of a shared
G2 (data parallel, kvbm.shared_g2) does not drain the namespace's ring: it announces removed the
keys it announced stored, once a check finds them gone (_reconcile_removed); the same for the G3
blocks it wrote when G3 is shared too (kvbm.shared_g3).

A block of G2 is one vLLM block of every rank (kvbm block = vLLM block: the device layout has no
bigger contiguous unit, and a 16-token block of an 8B model is already 2 MiB). Keys are vLLM's block
hashes folded to u64 and salted by the manager (KvBlockManager.keys). G2 bookkeeping follows
kvbm.transfer.host_offload: a stored block is registered only after every rank reported its copy;
a loaded block is acquired from allocation to the last rank's report, so eviction cannot take it
mid-copy.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from kvbm.errors import KvbmError
from kvbm.integrations.events import PoolEventRecorder
from kvbm.integrations.vllm.plan import LoadJob, RankReport, StepPlan, StoreJob
from kvbm.manager import KvBlockManager
from kvbm.metrics import EngineMetrics
from kvbm.pools import Tier

logger = logging.getLogger(__name__)

RECONCILE_KEYS = 512   # announced G2 keys a replica of a shared G2 checks per step (_reconcile_removed)


@dataclass
class _Request:
    keys: np.ndarray                                  # u64 keys of the request's full blocks so far
    block_table: list[int] = field(default_factory=list)
    considered: int = 0                               # leading full blocks already stored or skipped
    computed_tokens: int = 0
    pending: set[int] = field(default_factory=set)    # store jobs not settled yet
    load: LoadJob | None = None
    finished: bool = False
    staging: bool = False                             # a G3 part is being read into G2 (its load waits)
    disk_blocks: int = 0                              # blocks of the last load that came from G3

    def idle(self) -> bool:
        return not self.pending and self.load is None and not self.staging


@dataclass
class _Staging:
    req_id: str
    host: np.ndarray                 # the G2 part, acquired at allocation
    device: list[int]                # device blocks of the whole external range
    future: object                   # DiskTransfers.stage(): the staged G2 blocks, acquired
    started: float


@dataclass
class _Job:
    req_id: str
    kind: str                        # "load" or "store"
    host_blocks: np.ndarray
    keys: np.ndarray | None = None   # stores: what the blocks are registered under
    parents: np.ndarray | None = None
    has_parent: np.ndarray | None = None
    done: int = 0
    failed: int = 0
    started: float = 0.0


@dataclass
class SideStats:
    lookups: int = 0
    matched_tokens: int = 0
    loads: int = 0
    loaded_blocks: int = 0
    load_failures: int = 0
    stores: int = 0
    stored_blocks: int = 0
    store_failures: int = 0
    store_dropped: int = 0           # full blocks with no room in G2 (all held by transfers)
    store_held: int = 0              # full blocks G2 already held (or another store was moving)
    staged_blocks: int = 0           # G3 blocks read into G2 for a load
    stage_failures: int = 0          # G3 reads that were not intact (their blocks recomputed)


class SchedulerSide:
    def __init__(self, manager: KvBlockManager, block_tokens: int, world_size: int = 1, block_bytes: int = 0,
                 events: PoolEventRecorder | None = None, metrics: EngineMetrics | None = None,
                 disk=None) -> None:
        if Tier.G2 not in manager.pools:
            raise ValueError("the connector's scheduler side needs a G2 pool (host_blocks or host_size)")
        self.manager = manager
        self.pool = manager.pools[Tier.G2]
        self.block_tokens = block_tokens
        self.world_size = world_size
        self.block_bytes = block_bytes          # one G2 block, every rank's shard
        self.events = events                    # BlockStored / BlockRemoved of G2, taken by vLLM each step
        self.metrics = metrics
        self.disk = disk                        # DiskTransfers over G2 and G3, or None (G2 only)
        if disk is not None:
            if world_size != 1:
                raise ValueError(f"the disk tier through the connector needs TP 1, got world_size {world_size}")
            disk.stored_log = []                # G3 writes, taken by each build() (events, metrics)
        self._staging: list[_Staging] = []
        self.requests: dict[str, _Request] = {}
        self.jobs: dict[int, _Job] = {}
        self.storing: dict[int, int] = {}      # key -> store job moving it (not registered yet)
        self._next_job = 1
        self._plan = StepPlan()
        self.stats = SideStats()
        # A shared G2 (kvbm.shared_g2) or G3 (kvbm.shared_g3): per tier, the keys this replica
        # announced stored and has not yet announced removed, oldest check first (ordered sets;
        # see _reconcile_removed).
        self._announced: dict[Tier, dict[int, None]] = {Tier.G2: {}, Tier.G3: {}}

    # ---- lookups and loads ----------------------------------------------------------------------
    def lookup(self, keys: np.ndarray, num_computed_tokens: int, num_tokens: int) -> int:
        """Tokens beyond `num_computed_tokens` whose blocks G2 (then G3) holds, as whole blocks,
        leaving at least the last token to compute (vLLM needs one to sample from). Nothing is
        acquired."""
        host, disk = self.lookup_tiers(keys, num_computed_tokens, num_tokens)
        return host + disk

    def lookup_tiers(self, keys: np.ndarray, num_computed_tokens: int, num_tokens: int) -> tuple[int, int]:
        """lookup() split: (tokens G2 holds, tokens of the G3 run after them that the LoadRule offers)."""
        bt = self.block_tokens
        if num_computed_tokens % bt:
            return 0, 0
        first = num_computed_tokens // bt
        last = min(len(keys), (num_tokens - 1) // bt)
        if last <= first:
            return 0, 0
        k3 = 0
        with self.manager.lock:
            if self.disk is None:
                k2 = len(self.pool.registry.match(keys[first:last], False))
            else:
                k2, k3, offered = self.disk.plan(keys[first:last])
                k3 = k3 if offered else 0
        if self.disk is not None:
            self.disk.maybe_refresh()
        self.stats.lookups += 1
        return k2 * bt, k3 * bt

    def allocated(self, req_id: str, keys: np.ndarray, device_blocks: list[int], num_computed_tokens: int,
                  num_external_tokens: int, layerwise: bool = False) -> None:
        """vLLM allocated `device_blocks` (the request's whole table) after lookup promised
        `num_external_tokens`: acquire the G2 blocks and plan their load; with a disk tier, blocks
        past G2's prefix are staged from G3 first (asynchronous loads only: the caller passes
        layerwise=False for a request whose lookup had a G3 part). Blocks G2 lost since the
        lookup (it cannot, within one schedule() call, but a caller may interleave) are planned as
        failed loads: vLLM recomputes them."""
        req = self._track(req_id, keys)
        req.block_table = list(device_blocks)
        # What is computed in this table is vLLM's local prefix only (a preempted request's
        # earlier count is stale): the blocks being loaded must not be planned as stores.
        req.computed_tokens = num_computed_tokens
        req.considered = min(req.considered, num_computed_tokens // self.block_tokens)
        if num_external_tokens <= 0:
            return
        bt = self.block_tokens
        first, n = num_computed_tokens // bt, num_external_tokens // bt
        with self.manager.lock:
            host = np.asarray(self.pool.match(keys[first:first + n], acquire=True), dtype=np.int64)
        got = len(host)
        if got < n and self.disk is not None and not layerwise:   # (a layer-wise load runs now: no waiting)
            self._stage(req, req_id, keys[first + got:first + n], host, list(device_blocks[first:first + n]))
            self.stats.matched_tokens += num_external_tokens
            return
        req.disk_blocks = 0
        self.stats.matched_tokens += num_external_tokens
        if self.metrics is not None:
            self.metrics.record_match(len(keys), num_external_tokens, host=got)
        lost = list(device_blocks[first + got:first + n])
        if lost:
            logger.warning("request %s: %d of %d G2 blocks went between lookup and allocation; vLLM recomputes them",
                           req_id, n - got, n)
        if not got:
            self._plan.failed_loads.append(LoadJob(self._new_job(req_id, "lost", host), req_id, [], lost, layerwise))
            return
        # One job per request (the lost blocks ride along as failed_blocks): vLLM hears of the
        # request's load once, when all of it is over.
        job = self._new_job(req_id, "load", host)
        load = LoadJob(job, req_id, host.tolist(), list(device_blocks[first:first + got]), layerwise, lost)
        self.jobs[job].started = time.monotonic()
        req.load = load
        self._plan.loads.append(load)
        self.stats.loads += 1

    def _stage(self, req: _Request, req_id: str, g3_keys: np.ndarray, host: np.ndarray, device: list[int]) -> None:
        """The G3 part of a load: read into G2 (DiskTransfers.stage); the LoadJob waits for it."""
        try:
            future = self.disk.stage(g3_keys)
        except KvbmError as err:   # refused at submission (budget full, disk worker gone): recomputed
            logger.warning("request %s: the G3 read of %d blocks was not started (%s); vLLM recomputes them",
                           req_id, len(g3_keys), err)
            future = _failed_future(err)
        req.staging = True
        req.disk_blocks = len(g3_keys)   # what the lookup offered; the staged count once read
        self._staging.append(_Staging(req_id, host, device, future, time.monotonic()))

    def _finish_staging(self) -> None:
        """Loads whose G3 part is over (see the module docstring): planned now."""
        still = []
        for st in self._staging:
            if not st.future.done():
                still.append(st)
                continue
            err = st.future.exception()
            staged = np.empty(0, np.int64)
            if err is None:
                value = st.future.result().value
                staged = np.asarray(value if value is not None else (), dtype=np.int64)
            self._plan_staged(st, staged, err)
        self._staging = still

    def _plan_staged(self, st: _Staging, staged: np.ndarray, err) -> None:
        req = self.requests.get(st.req_id)
        k2, m, n = len(st.host), len(staged), len(st.device)
        host = np.concatenate([st.host, staged]).astype(np.int64)
        rest = list(st.device[k2 + m:])
        if err is not None:
            self.stats.stage_failures += 1
            if self.metrics is not None:
                self.metrics.record_load_failure("G3", n - k2)
            logger.warning("request %s: the G3 read of %d blocks failed (%s); vLLM recomputes them", st.req_id,
                           n - k2, err)
        else:
            self.stats.staged_blocks += m
            if m:
                self._record("disk2h", m, _Job(st.req_id, "stage", staged, started=st.started))
        if self.metrics is not None:
            queried = len(req.keys) if req is not None else n
            self.metrics.record_match(queried, (k2 + m) * self.block_tokens, host=k2, disk=m)
        if req is not None:
            req.staging = False
            req.disk_blocks = m
        if not len(host):
            lost = LoadJob(self._new_job(st.req_id, "lost", host), st.req_id, [], rest)
            self._plan.failed_loads.append(lost)
            if req is not None and req.finished and req.idle():
                del self.requests[st.req_id]
            return
        job = self._new_job(st.req_id, "load", host)
        self.jobs[job].started = st.started
        load = LoadJob(job, st.req_id, host.tolist(), list(st.device[:k2 + m]), False, rest)
        if req is not None:
            req.load = load
        self._plan.loads.append(load)
        self.stats.loads += 1

    def hit_tiers(self, req_id: str, num_external_tokens: int) -> tuple[int, int]:
        """(tokens from G2, tokens from G3) of the request's last load (the G3 share known once staged:
        until then, what the lookup said)."""
        req = self.requests.get(req_id)
        disk = min(num_external_tokens, req.disk_blocks * self.block_tokens) if req is not None else 0
        return num_external_tokens - disk, disk

    # ---- stores ---------------------------------------------------------------------------------
    def scheduled(self, req_id: str, keys: np.ndarray, new_block_ids: list[int] | None, full_table: bool,
                  computed_tokens: int) -> None:
        """A request ran in this step: its keys so far, the device blocks vLLM added (or its whole
        table when `full_table`: new or resumed), and its computed tokens after this step."""
        req = self._track(req_id, keys)
        if full_table:
            req.block_table = []
        if new_block_ids:
            req.block_table.extend(new_block_ids)
        req.computed_tokens = computed_tokens

    def preempted(self, req_id: str) -> None:
        """vLLM freed the request's blocks: its stores must finish before they are reused, and it
        resumes with a new table."""
        req = self.requests.get(req_id)
        if req is None:
            return
        if req.pending:
            self._plan.flush_reqs.append(req_id)
        # Its new table is empty until vLLM gives it one; nothing of it is computed until it runs again.
        req.block_table, req.considered, req.computed_tokens = [], 0, 0

    def build(self) -> StepPlan:
        """This step's plan: loads planned since the last build, and a store for every block that
        became full (and computed) and that G2 neither holds nor is receiving."""
        if self._staging:
            self._finish_staging()
        for req_id, req in self.requests.items():
            if not req.finished:
                self._plan_stores(req_id, req)
        if self.disk is not None:
            self._disk_events()
        for tier, announced in self._announced.items():
            if announced:
                # Another replica's allocation may have evicted what this one announced: checked
                # each step, not only when this replica allocates (as its own ring drain is).
                with self.manager.lock:
                    self._reconcile_removed(tier)
        plan, self._plan = self._plan, StepPlan()
        return plan

    def _plan_stores(self, req_id: str, req: _Request) -> None:
        if req.load is not None or req.staging:
            return   # its device blocks are being loaded: none of them is stored before it has run
        full = min(len(req.keys), len(req.block_table), req.computed_tokens // self.block_tokens)
        if full <= req.considered:
            return
        idx = np.arange(req.considered, full)
        keys = req.keys[idx]
        with self.manager.lock:
            held = np.asarray(self.pool.lookup(keys)) >= 0
            if self.storing:
                held |= np.fromiter((int(k) in self.storing for k in keys.tolist()), bool, len(keys))
            todo = idx[~held]
            host = self.pool.allocate(len(todo)) if len(todo) else None
            if host is None and len(todo):
                free = self.pool.registry.num_free + self.pool.registry.num_inactive
                host = self.pool.allocate(min(len(todo), free)) if free else None
            if self.disk is not None and len(todo):
                self.disk.host_allocated()
            self._drain_evictions()
        req.considered = full
        self.stats.store_held += int(held.sum())
        if host is None or len(host) == 0:
            self.stats.store_dropped += len(todo)
            return
        host = np.asarray(host, dtype=np.int64)
        self.stats.store_dropped += len(todo) - len(host)
        todo = todo[:len(host)]
        has_parent = todo > 0
        parents = np.where(has_parent, req.keys[np.maximum(todo - 1, 0)], 0).astype(np.uint64)
        job = self._new_job(req_id, "store", host, req.keys[todo], parents, has_parent)
        self.jobs[job].started = time.monotonic()
        for k in req.keys[todo].tolist():
            self.storing[k] = job
        req.pending.add(job)
        self._plan.stores.append(StoreJob(job, req_id, [req.block_table[i] for i in todo.tolist()], host.tolist()))
        self.stats.stores += 1

    # ---- reports from the ranks -----------------------------------------------------------------
    def report(self, report: RankReport) -> None:
        for jobs, ok in ((report.done, True), (report.failed, False)):
            for job_id, n in jobs.items():
                job = self.jobs.get(job_id)
                if job is None:
                    logger.warning("a rank reported job %d, which is not pending (ignored)", job_id)
                    continue
                if ok:
                    job.done += n
                else:
                    job.failed += n
                if job.done + job.failed >= self.world_size:
                    self._settle(job_id, job)
        for err in report.errors:
            logger.warning("kvbm transfer failed on a rank: %s", err)

    def _settle(self, job_id: int, job: _Job) -> None:
        del self.jobs[job_id]
        ok = job.failed == 0
        req = self.requests.get(job.req_id)
        with self.manager.lock:
            n = len(job.host_blocks)
            if job.kind == "load":
                self.pool.release(job.host_blocks)
                if ok:
                    self.stats.loaded_blocks += n
                    self._record("h2d", n, job)
                else:
                    self.stats.load_failures += 1
                    if self.metrics is not None:
                        self.metrics.record_load_failure("G2", n)
                if req is not None and req.load is not None and req.load.job == job_id:
                    req.load = None
            elif job.kind == "store":
                for k in job.keys.tolist():
                    self.storing.pop(k, None)
                if req is not None:
                    req.pending.discard(job_id)
                if not ok:
                    self.pool.release(job.host_blocks)      # never registered: back to the free list
                    self.stats.store_failures += 1
                    return
                self.pool.complete(job.host_blocks)
                canonical = self.pool.register(job.host_blocks, job.keys, job.parents, job.has_parent)
                if self.disk is not None:
                    self.disk.host_registered(job.keys)    # write-through admission (held until written)
                self.pool.release(canonical)               # inactive and matchable
                self.stats.stored_blocks += n
                self._record("d2h", n, job)
                if self.events is not None:
                    self.events.stored(Tier.G2, job.keys, job.parents, job.has_parent)
                if (self.events is not None or self.metrics is not None) and self._shared_g2():
                    self._announced[Tier.G2].update(dict.fromkeys(job.keys.tolist()))
        if req is not None and req.finished and req.idle():
            del self.requests[job.req_id]

    # ---- request ends ---------------------------------------------------------------------------
    def finished(self, req_id: str) -> bool:
        """vLLM ends the request: True when its blocks must stay until its transfers are done (the
        ranks then report it finished_sending)."""
        req = self.requests.get(req_id)
        if req is None:
            return False
        req.finished = True
        if req.load is not None or req.staging:
            # An asynchronous load still writes its blocks: vLLM frees them only once the ranks
            # report it received; a finished_sending too would free them twice.
            return False
        if req.pending:
            # A store still reads its device blocks: vLLM keeps them until the ranks report the
            # request sent. (An asynchronous load still writing them needs nothing here: vLLM
            # frees an aborted request's blocks only once the ranks report it received.)
            self._plan.delayed_reqs.append(req_id)
            return True
        if req.idle():
            del self.requests[req_id]
        return False

    def reset(self) -> bool:
        """vLLM's reset_prefix_cache(reset_connector=True) (e.g. new weights): G2 forgets every
        block. Refused (False) while a transfer runs or with a disk tier (G3's blocks outlive this
        process; clear disk_path or change the salt instead)."""
        if self.jobs or self._staging or self.disk is not None:
            return False
        with self.manager.lock:
            registry = self.pool.registry
            if registry.num_active:
                return False
            self.pool.evict(registry.num_inactive)
            if self._shared_g2():
                self._announced[Tier.G2].clear()   # AllBlocksCleared below says it
            else:
                self._drain_evictions()
        if self.events is not None:
            self.events.cleared()
        return True

    def sent(self, req_ids) -> None:
        """vLLM freed the blocks of these delayed requests (every rank reported them)."""
        for req_id in req_ids:
            req = self.requests.get(req_id)
            if req is not None and req.idle():
                del self.requests[req_id]

    # ---- helpers --------------------------------------------------------------------------------
    def _track(self, req_id: str, keys: np.ndarray) -> _Request:
        req = self.requests.get(req_id)
        if req is None:
            req = self.requests[req_id] = _Request(keys)
        else:
            req.keys = keys
        return req

    def _new_job(self, req_id: str, kind: str, host: np.ndarray, keys=None, parents=None, has_parent=None) -> int:
        job = self._next_job
        self._next_job += 1
        if kind != "lost":
            self.jobs[job] = _Job(req_id, kind, host, keys, parents, has_parent)
        return job

    def _shared_g2(self) -> bool:
        return getattr(self.pool.registry, "namespace", None) is not None

    def _drain_evictions(self) -> None:
        if self.disk is not None and self.disk.admission == "victim":
            return    # the disk cleaner drains G2's eviction ring (see the module docstring)
        if self._shared_g2():
            return    # not the namespace's ring: build() checks this replica's announced keys
        evicted = self.pool.registry.drain_evicted()
        if len(evicted):
            if self.events is not None:
                self.events.removed(Tier.G2, evicted)
            if self.metrics is not None:
                self.metrics.record_eviction("G2", len(evicted))

    def _reconcile_removed(self, tier: Tier) -> None:
        """A shared G2's (or G3's) BlockRemoved, per replica. Its eviction ring is the namespace's (any
        replica's allocation evicts any replica's blocks) and one drain takes every entry, so no
        replica can learn its own removals from it. Instead each replica checks, a slice a step,
        whether the keys it announced stored are still in G2, and announces the gone ones removed
        on its own stream: every BlockRemoved follows a BlockStored of the same replica, and none
        stays announced for good (a router would keep routing to it). Late by up to
        len(_announced) / RECONCILE_KEYS steps; a gone key is then looked for elsewhere, which
        costs the router a miss, never a wrong block. Called by build() when any key is announced."""
        announced = self._announced[tier]
        pool = self.pool if tier == Tier.G2 else self.disk.g3
        keys = list(islice(announced, RECONCILE_KEYS))
        held = np.asarray(pool.lookup(np.fromiter(keys, np.uint64, len(keys)))) >= 0
        gone = []
        for key, present in zip(keys, held.tolist()):
            del announced[key]
            if present:
                announced[key] = None   # checked again after the others
            else:
                gone.append(key)
        if gone:
            if self.events is not None:
                self.events.removed(tier, np.array(gone, np.uint64))
            if self.metrics is not None:
                self.metrics.record_eviction(tier.name, len(gone))

    def _disk_events(self) -> None:
        """G3's writes since the last step (BlockStored, STORAGE) and its evictions (BlockRemoved)."""
        disk = self.disk
        shared = disk.g3.shared     # the ring is every replica's: see _reconcile_removed
        with self.manager.lock:
            written, disk.stored_log = (disk.stored_log, []) if disk.stored_log else (None, disk.stored_log)
            evicted = np.empty(0, np.uint64) if shared else disk.g3.registry.drain_evicted()
        if written:
            hashes = np.concatenate(written)
            if shared and (self.events is not None or self.metrics is not None):
                self._announced[Tier.G3].update(dict.fromkeys(hashes.tolist()))
            if self.events is not None:
                self.events.stored(Tier.G3, hashes)
            if self.metrics is not None:
                self.metrics.record_transfer("h2disk", len(hashes), len(hashes) * self.block_bytes)
        if len(evicted):
            if self.events is not None:
                self.events.removed(Tier.G3, evicted)
            if self.metrics is not None:
                self.metrics.record_eviction("G3", len(evicted))

    def _record(self, path: str, n: int, job: _Job) -> None:
        if self.metrics is not None:
            self.metrics.record_transfer(path, n, n * self.block_bytes, time.monotonic() - job.started)

    def pending_jobs(self) -> int:
        return len(self.jobs) + len(self._staging)


def _failed_future(err: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(err)
    return future
