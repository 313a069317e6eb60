"""What the connector's two sides tell each other, in plain data (no vLLM types).

Parts:
  LoadJob / StoreJob   one transfer of one request between G2 host blocks and device blocks
  StepPlan             the scheduler side's word to every rank for one engine step: loads to start,
                       stores to submit after the forward pass, preempted requests whose stores must
                       finish before their blocks are reused, finished requests whose blocks vLLM
                       keeps until their stores are done
  RankReport           a rank's word back: jobs finished or failed (vLLM sums the ranks' reports
                       with `merge`, so a job is over once `world_size` ranks have reported it)

Block ids are lists of ints: vLLM's executor carries these objects between its processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadJob:
    job: int
    req_id: str
    host_blocks: list[int]
    device_blocks: list[int]
    layerwise: bool = False   # the request runs in this very step: its layers are waited for one by one
    failed_blocks: list[int] = field(default_factory=list)   # device blocks of the request this load will
    #   not fill (a G3 part that failed to stage): reported failed with the job, vLLM recomputes from there


@dataclass
class StoreJob:
    job: int
    req_id: str
    device_blocks: list[int]
    host_blocks: list[int]


@dataclass
class StepPlan:
    loads: list[LoadJob] = field(default_factory=list)
    stores: list[StoreJob] = field(default_factory=list)
    flush_reqs: list[str] = field(default_factory=list)     # preempted: wait for their stores now
    delayed_reqs: list[str] = field(default_factory=list)   # finished: report finished_sending when stored
    failed_loads: list[LoadJob] = field(default_factory=list)  # nothing to copy: report the blocks as failed

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.flush_reqs or self.delayed_reqs or self.failed_loads)


@dataclass
class RankReport:
    done: dict[int, int] = field(default_factory=dict)      # job -> ranks that completed it
    failed: dict[int, int] = field(default_factory=dict)    # job -> ranks on which it failed
    loaded_bytes: int = 0
    stored_bytes: int = 0
    errors: list[str] = field(default_factory=list)         # first words of each failure, for the log

    def merge(self, other: RankReport) -> RankReport:
        out = RankReport(dict(self.done), dict(self.failed), self.loaded_bytes + other.loaded_bytes,
                         self.stored_bytes + other.stored_bytes, (self.errors + other.errors)[:16])
        for src, dst in ((other.done, out.done), (other.failed, out.failed)):
            for job, n in src.items():
                dst[job] = dst.get(job, 0) + n
        return out

    def is_empty(self) -> bool:
        return not (self.done or self.failed)
