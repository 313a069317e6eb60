"""Who may register with a path worker beside whom: the shared G2's part of a path worker
(kvbm.workers.path_worker, kvbm.workers.disk_worker).

Parts:
  Member     an engine's membership of the shared G2 as its engine table says (slot, generation,
             namespace): never taken from the engine's message
  Admission  the worker's mixin: `_admit` (before a registration: may it stand beside the others?),
             `_membership` (the table's view of the engine, checked against its registration),
             `_hold` (marks the registration in the engine's slot before it is used), `_let_go`
             (once it is dropped with no copy of it left running)

Rules: with the shared G2 registry (the worker's --registry), an engine that is a live member of it
registers exactly its namespace's part of G2 and may overlap only members of the same namespace;
every other engine is alone on the instance (PathWorker._refuse_second_engine: the TP ranks of one
engine, each over its own G2 range, are one engine). Holding the registration in the engine's slot
keeps a dead engine's G2 blocks out of the pool while a copy of this worker may still write them
(kvbm.shared_g2: quarantine).

Order in a worker: _admit -> map the engine's memory -> _hold -> serve its transfers -> drop its
mappings (unregister, its death, a re-registration, the worker's exit) -> _let_go.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kvbm.errors import KvbmError, ProtocolError
from kvbm.layout import BlockLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Member:
    """An engine's membership of the shared G2, as its engine table says (SharedG2.member)."""
    slot: int
    generation: int
    namespace: int


class Admission:
    """Mixin of PathWorker. Uses its g2 (SharedG2 or None), g2_block_bytes, worker_bit, engines,
    host_segment, path, SHARED_ENGINES, _drop_dead_engines and _refuse_second_engine."""

    def _admit(self, engine: str, pid: int, group: str, host_offset: int, host: BlockLayout) -> Member | None:
        """Whether `engine` may register now, beside the engines registered already; its shared G2
        membership (None: an engine with a registry of its own). A member registers exactly its
        namespace's G2 range (_membership), and may overlap another registration only when the
        engine table says both are live members of one namespace (they share that namespace's
        registry); a member and an engine of its own never coexist. Anything else: ProtocolError,
        nothing registered."""
        self._drop_dead_engines()
        member = self._membership(engine, pid, host_offset, host)
        if member is None or not self.SHARED_ENGINES:
            self._refuse_second_engine(engine, group, host_offset, host)
            return member
        lo, hi = host_offset, host_offset + host.total_bytes
        for other, reg in self.engines.items():
            if other == engine:
                continue
            theirs = getattr(reg, "member", None)
            if theirs is None:
                raise ProtocolError(f"engine {other!r:.80} (pid {reg.pid}) is attached to this kvbm instance with a "
                                    f"G2 registry of its own (G2 segment {self.host_segment.name}); {engine!r:.80} "
                                    f"of the shared G2 would overwrite its host blocks. Close it first, or give "
                                    f"this engine its own instance_id")
            other_lo, other_hi = reg.host_offset, reg.host_offset + reg.host.total_bytes
            if lo < other_hi and other_lo < hi:
                ns = self.g2.namespace_of(theirs.slot, theirs.generation)
                if ns != member.namespace:
                    raise ProtocolError(f"{engine!r:.80} (shared G2 namespace {member.namespace}) asks for G2 "
                                        f"bytes [{lo}, {hi}), which overlap [{other_lo}, {other_hi}) of "
                                        f"{other!r:.80}, " + (f"of namespace {ns}" if ns >= 0 else
                                                              "no longer a live member of the shared G2")
                                        + ": only engines of one namespace share G2 blocks")
        return member

    def _membership(self, engine: str, pid: int, host_offset: int, host: BlockLayout) -> Member | None:
        """`engine`'s membership of the shared G2 from its engine table (None without a shared G2,
        or when the engine did not join it), checked against the registration: the same live pid,
        and a host layout that is exactly its namespace's partition of G2."""
        if self.g2 is None:
            return None
        m = self.g2.member(engine)
        if m is None:
            return None
        if pid <= 0 or pid != m["pid"] or not m["alive"]:
            raise ProtocolError(f"engine {engine!r:.80} registers as pid {pid}; the shared G2 has it as pid "
                                f"{m['pid']} ({'alive' if m['alive'] else 'gone'})")
        stride, lo = self.g2_block_bytes, m["block_offset"] * self.g2_block_bytes
        # With tensor-parallel ranks, G2 is g2_ranks regions of total_blocks blocks each: a rank's
        # part of the namespace lies at the same place in its own region.
        region = self.g2.total_blocks * stride
        ranks = getattr(self, "g2_ranks", 1)
        rank, rest = divmod(host_offset - lo, region) if region else (0, host_offset - lo)
        if host.block_stride != stride or host.num_blocks != m["num_blocks"] or rest or not 0 <= rank < ranks:
            raise ProtocolError(f"engine {engine!r:.80}: a host layout of {host.num_blocks} blocks of "
                                f"{host.block_stride} bytes at G2 byte {host_offset}; its shared G2 namespace "
                                f"{m['namespace']} is blocks [{m['block_offset']}, "
                                f"{m['block_offset'] + m['num_blocks']}) of {stride} bytes (G2 bytes [{lo}, "
                                f"{lo + m['num_blocks'] * stride})" + (f" in each of {ranks} rank regions of "
                                                                      f"{region} bytes)" if ranks > 1 else ")"))
        return Member(m["slot"], m["generation"], m["namespace"])

    def _hold(self, reg) -> None:
        """A member's registration is marked in its engine slot before it is used (ProtocolError
        when the engine left the shared G2 meanwhile: the caller drops its mappings)."""
        member = getattr(reg, "member", None)
        if member is not None and not self.g2.worker_hold(member.slot, member.generation, self.worker_bit):
            raise ProtocolError(f"engine {reg.engine!r:.80} left the shared G2 while registering")

    def _let_go(self, reg) -> None:
        """After a registration was dropped (no copy of it may still run: the caller finished them):
        its engine slot is let go of, and a retired engine's blocks go back to the pool once no
        worker holds it."""
        member = getattr(reg, "member", None)
        if member is not None and self.g2 is not None:
            try:
                self.g2.worker_let_go(member.slot, member.generation, self.worker_bit)
            except KvbmError:
                logger.error("%s worker: letting go of engine %s in the shared G2 failed", self.path.label,
                             reg.engine, exc_info=True)
