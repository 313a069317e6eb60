"""Differential tests: BlockRegistry (Cython) against ReferenceRegistry (plain Python).

Both are driven with the same operation sequences; every return value is compared, both run
check_invariants, and every call that one of them rejects must be rejected by the other with
RegistryError and leave the Cython buffer byte for byte unchanged.

Two drivers: a hypothesis state machine (small hash universe, so dedup, eviction and ties are
frequent; pools of 1 to 10^4 blocks) and a seeded random walk of a few thousand operations. Both
run under every eviction policy (LRU, LINEAGE, ADAPTIVE); LINEAGE with its default ghost table
(G = num_blocks), a small one (G = 3: entries forgotten in FIFO order all the time) and none;
ADAPTIVE with its defaults, and with a tuner that forgets every epoch (decay 0: the level moves
all the time and the heap mixes keys of many credits), without the leaf bit, from a level that is
no candidate with a small ghost table, and with the tuner off; the walk also changes the setting
(set_adaptive: level, leaf bit, tuner on or off, decay) now and then.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvbm._fast._reference import ReferenceRegistry
from kvbm._fast.registry import BlockRegistry
from kvbm.errors import RegistryError
from kvbm.policy import ADAPTIVE_OCTAVE, POLICY_ADAPTIVE, POLICY_LINEAGE, POLICY_LRU, BlockState

POOL_SIZES = [1, 2, 3, 5, 8, 16, 64, 300, 10_000]
# name -> (policy, ghost_blocks, ADAPTIVE's set_adaptive keyword arguments or None)
POLICIES = {"lru": (POLICY_LRU, None, None), "lineage": (POLICY_LINEAGE, None, None),
            "lineage-g3": (POLICY_LINEAGE, 3, None), "lineage-g0": (POLICY_LINEAGE, 0, None),
            "adaptive": (POLICY_ADAPTIVE, None, None),
            "adaptive-fast": (POLICY_ADAPTIVE, None, dict(level=3 * ADAPTIVE_OCTAVE, decay=0)),
            "adaptive-noleaf": (POLICY_ADAPTIVE, None, dict(level=6 * ADAPTIVE_OCTAVE, leaf_first=False,
                                                            decay=16384)),
            "adaptive-g3": (POLICY_ADAPTIVE, 3, dict(level=5 * ADAPTIVE_OCTAVE + ADAPTIVE_OCTAVE // 2,
                                                     decay=65536)),
            "adaptive-fixed": (POLICY_ADAPTIVE, None, dict(level=2 * ADAPTIVE_OCTAVE, tune=False))}


class Pair:
    """Runs each call on both registries and compares the outcomes."""

    def __init__(self, num_blocks: int, policy: int = POLICY_LRU, ghost_blocks: int | None = None,
                 adaptive: dict | None = None) -> None:
        self.fast = BlockRegistry(num_blocks, policy=policy, ghost_blocks=ghost_blocks)
        self.ref = ReferenceRegistry(num_blocks, policy=policy, ghost_blocks=ghost_blocks)
        self.n = num_blocks
        self.held: list[int] = []   # one entry per reference the driver holds
        if adaptive is not None:
            self.call("set_adaptive", **adaptive)

    def call(self, name: str, *args, **kwargs):
        before = bytes(self.fast.buffer)
        ref_err = fast_err = None
        try:
            want = getattr(self.ref, name)(*args, **kwargs)
        except RegistryError as err:
            ref_err = err
        try:
            got = getattr(self.fast, name)(*args, **kwargs)
        except RegistryError as err:
            fast_err = err
        assert (ref_err is None) == (fast_err is None), (name, args, kwargs, ref_err, fast_err)
        if fast_err is not None:
            assert bytes(self.fast.buffer) == before, f"failed {name} changed the table"
            return fast_err
        if want is None or got is None:
            assert want is None and got is None, (name, want, got)
            return got
        for g, w in zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,))), strict=True):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype, (name, g, w)
            np.testing.assert_array_equal(g, w, err_msg=name)
        return got

    def expect_error(self, name: str, *args, **kwargs) -> None:
        assert isinstance(self.call(name, *args, **kwargs), RegistryError), (name, args, kwargs)

    def compare(self, full: bool) -> None:
        for attr in ("num_blocks", "num_free", "num_inactive", "num_active", "num_registered",
                     "tick", "num_evicted_dropped", "ghost_blocks", "num_ghosts", "adaptive"):
            assert getattr(self.fast, attr) == getattr(self.ref, attr), attr
        blocks = range(self.n) if full else set(self.held[:64])
        for b in blocks:
            assert self.fast.info(b) == self.ref.info(b), b

    def state(self, b: int) -> BlockState:
        return self.ref.info(b)["state"]

    def free_block(self) -> int | None:
        for b in range(self.n):
            if self.state(b) == BlockState.RESET:
                return b
        return None


class RegistryMachine(RuleBasedStateMachine):
    """Random operation sequences over a small hash universe (LRU; LineageMachine below)."""
    policy = POLICY_LRU
    ghost_blocks: int | None = None
    adaptive: dict | None = None

    @initialize(n=st.sampled_from(POOL_SIZES))
    def setup(self, n: int) -> None:
        self.p = Pair(n, self.policy, self.ghost_blocks, self.adaptive)

    def _held_in(self, state: BlockState) -> list[int]:
        return sorted({b for b in self.p.held if self.p.state(b) == state})

    @rule(k=st.integers(0, 12), big=st.booleans())
    def allocate(self, k, big):
        k = k + self.p.n - 6 if big else k
        out = self.p.call("allocate", max(k, 0))
        if out is not None:
            self.p.held.extend(out.tolist())

    @rule(data=st.data())
    def complete(self, data):
        blocks = self._held_in(BlockState.PARTIAL)
        if blocks:
            blocks = data.draw(st.lists(st.sampled_from(blocks), unique=True, max_size=8))
        self.p.call("complete", np.array(blocks, dtype=np.int64))

    @rule(data=st.data())
    def register(self, data):
        blocks = self._held_in(BlockState.COMPLETE)
        if blocks:
            blocks = data.draw(st.lists(st.sampled_from(blocks), unique=True, max_size=8))
        k = len(blocks)
        hashes = data.draw(st.lists(st.integers(0, 40), min_size=k, max_size=k))
        kwargs = {}
        if data.draw(st.booleans()):
            kwargs["parents"] = np.array(data.draw(st.lists(st.integers(0, 40), min_size=k, max_size=k)),
                                         dtype=np.uint64)
            if data.draw(st.booleans()):
                kwargs["has_parent"] = np.array(data.draw(st.lists(st.booleans(), min_size=k,
                                                                   max_size=k)), dtype=bool)
        if data.draw(st.booleans()):
            kwargs["priorities"] = data.draw(st.lists(st.integers(-2, 2), min_size=k, max_size=k))
        out = self.p.call("register", blocks, np.array(hashes, dtype=np.uint64), **kwargs)
        for b, canon in zip(blocks, out.tolist()):
            self.p.held.remove(b)
            self.p.held.append(canon)

    @rule(hashes=st.lists(st.integers(0, 40), max_size=10), acquire=st.booleans())
    def match(self, hashes, acquire):
        out = self.p.call("match", np.array(hashes, dtype=np.uint64), acquire=acquire)
        if acquire:
            self.p.held.extend(out.tolist())

    @rule(hashes=st.lists(st.integers(0, 40), max_size=10))
    def lookup(self, hashes):
        self.p.call("lookup", hashes)

    @precondition(lambda self: self.p.held)
    @rule(data=st.data())
    def touch(self, data):
        blocks = data.draw(st.lists(st.sampled_from(self.p.held), max_size=6))
        self.p.call("touch", np.array(blocks, dtype=np.int64))

    @precondition(lambda self: self.p.held)
    @rule(data=st.data())
    def release(self, data):
        idx = data.draw(st.lists(st.integers(0, len(self.p.held) - 1), unique=True, max_size=8))
        blocks = [self.p.held[i] for i in idx]
        self.p.call("release", np.array(blocks, dtype=np.int64))
        for b in blocks:
            self.p.held.remove(b)

    @precondition(lambda self: self.p.held)
    @rule(data=st.data())
    def set_priority(self, data):
        blocks = data.draw(st.lists(st.sampled_from(self.p.held), max_size=6))
        prios = data.draw(st.lists(st.integers(-2, 2), min_size=len(blocks), max_size=len(blocks)))
        self.p.call("set_priority", np.array(blocks, dtype=np.int64), np.array(prios, dtype=np.int32))

    @rule(k=st.integers(0, 6))
    def evict(self, k):
        self.p.call("evict", k)

    @rule()
    def drain(self):
        self.p.call("drain_evicted")

    @rule(k=st.integers(0, 6))
    def take_victims(self, k):
        out = self.p.call("take_victims", k)
        self.p.held.extend(out[0].tolist())

    @rule(data=st.data(), which=st.integers(0, 13))
    def bad_call(self, data, which):
        """A call with one bad element: both reject it and nothing changes."""
        p = self.p
        n = p.n
        free = p.free_block()
        registered = self._held_in(BlockState.REGISTERED)
        partial = self._held_in(BlockState.PARTIAL)
        complete = self._held_in(BlockState.COMPLETE)
        bad_id = data.draw(st.sampled_from([-1, n, n + 7]))
        if which == 0:
            p.expect_error("complete", partial + [bad_id])
        elif which == 1 and (complete or registered or free is not None):
            other = (complete + registered + ([free] if free is not None else []))[0]
            p.expect_error("complete", partial + [other])
        elif which == 2 and partial:
            p.expect_error("complete", partial + partial[:1])
        elif which == 3 and (partial or registered):
            p.expect_error("register", complete + (partial + registered)[:1],
                           list(range(100, 101 + len(complete))))
        elif which == 4:
            p.expect_error("register", complete, list(range(100, 101 + len(complete))))
        elif which == 5 and complete:
            hashes = list(range(100, 100 + len(complete)))
            hashes[-1] = -5
            p.expect_error("register", complete, hashes)
        elif which == 6 and complete:
            p.expect_error("register", complete, np.zeros(len(complete), np.float64))
        elif which == 7 and p.held:
            b = p.held[0]
            p.expect_error("release", [b] * (p.ref.info(b)["refcount"] + 1))
        elif which == 8 and free is not None:
            p.expect_error("release", p.held[:2] + [free])
        elif which == 9 and free is not None:
            p.expect_error("touch", p.held[:2] + [free])
        elif which == 10:
            p.expect_error("set_priority", p.held[:2] + [bad_id], [0] * (len(p.held[:2]) + 1))
        elif which == 11 and p.held:
            p.expect_error("set_priority", p.held[:1], [2 ** 31])
        elif which == 12:
            p.expect_error(data.draw(st.sampled_from(["allocate", "evict"])), -1)
        elif which == 13:
            p.expect_error(data.draw(st.sampled_from(["match", "lookup"])), [[1, 2]])

    @invariant()
    def consistent(self):
        p = self.p
        p.fast.check_invariants()
        if p.n <= 300:
            p.ref.check_invariants()
        p.compare(full=p.n <= 64)


class LineageMachine(RegistryMachine):
    """The same sequences under POLICY_LINEAGE: keys read children counts and use counts, so
    dedup, chains (parents) and touches of inactive blocks all re-key."""
    policy = POLICY_LINEAGE


class LineageGhost3Machine(RegistryMachine):
    """LINEAGE with a ghost table of 3 entries: restores and FIFO expiry on every few evictions."""
    policy = POLICY_LINEAGE
    ghost_blocks = 3


class AdaptiveMachine(RegistryMachine):
    """ADAPTIVE with a small ghost table and a tuner that forgets every epoch (decay 0), so the
    level moves within a few operations and heap keys carry different credits."""
    policy = POLICY_ADAPTIVE
    ghost_blocks = 3
    adaptive = dict(level=4 * ADAPTIVE_OCTAVE, decay=0)


_MACHINE_SETTINGS = settings(max_examples=120, stateful_step_count=40, deadline=None,
                             derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = _MACHINE_SETTINGS
TestLineageMachine = LineageMachine.TestCase
TestLineageMachine.settings = _MACHINE_SETTINGS
TestLineageGhost3Machine = LineageGhost3Machine.TestCase
TestLineageGhost3Machine.settings = _MACHINE_SETTINGS
TestAdaptiveMachine = AdaptiveMachine.TestCase
TestAdaptiveMachine.settings = _MACHINE_SETTINGS


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("n,ops,seed", [(1, 400, 1), (7, 1500, 2), (50, 1500, 3), (10_000, 2500, 4)])
def test_random_walk(n: int, ops: int, seed: int, policy: str) -> None:
    """Seeded random walk: longer sequences than the state machine, bigger batches, lineage chains."""
    rnd = random.Random(seed)
    p = Pair(n, *POLICIES[policy])
    universe = max(8, n // 2)

    def chain(k: int) -> list[int]:
        start = rnd.randrange(universe)
        return [(start + i) % universe for i in range(k)]

    for step in range(ops):
        op = rnd.random()
        if op < 0.25:
            k = rnd.randint(0, max(1, n // 4))
            out = p.call("allocate", k)
            if out is None:
                continue
            p.held.extend(out.tolist())
            if rnd.random() < 0.8 and k:
                p.call("complete", out)
                hashes = chain(k)
                parents = [(h - 1) % universe for h in hashes]
                mask = [rnd.random() < 0.9 for _ in hashes]
                canon = p.call("register", out, np.array(hashes, np.uint64),
                               parents=np.array(parents, np.uint64),
                               has_parent=np.array(mask, bool),
                               priorities=[rnd.randint(-1, 1) for _ in hashes] if rnd.random() < 0.3 else None)
                for b, c in zip(out.tolist(), canon.tolist()):
                    p.held.remove(b)
                    p.held.append(c)
        elif op < 0.45:
            if p.held:
                rnd.shuffle(p.held)
                k = rnd.randint(1, len(p.held))
                p.call("release", p.held[:k])
                del p.held[:k]
        elif op < 0.6:
            acquire = rnd.random() < 0.7
            out = p.call("match", chain(rnd.randint(0, 40)), acquire=acquire)
            if acquire:
                p.held.extend(out.tolist())
        elif op < 0.7:
            p.call("lookup", chain(rnd.randint(0, 40)))
        elif op < 0.8:
            if p.held:
                p.call("touch", rnd.choices(p.held, k=rnd.randint(1, 8)))
        elif op < 0.88:
            if p.held:
                blocks = rnd.choices(p.held, k=rnd.randint(1, 8))
                p.call("set_priority", blocks, [rnd.randint(-3, 3) for _ in blocks])
        elif op < 0.93:
            p.call("evict", rnd.randint(0, max(1, n // 8)))
        elif op < 0.95:
            p.held.extend(p.call("take_victims", rnd.randint(0, max(1, n // 8)))[0].tolist())
        elif op < 0.995 or POLICIES[policy][0] != POLICY_ADAPTIVE:
            p.call("drain_evicted")
        else:                                  # a new setting: every inactive block re-keyed
            level = rnd.choice([-1, rnd.randint(1, 9) * ADAPTIVE_OCTAVE, rnd.randint(0, 9 * ADAPTIVE_OCTAVE)])
            p.call("set_adaptive", level, rnd.random() < 0.7, tune=rnd.random() < 0.8,
                   decay=rnd.choice([0, 1, 32768, 65535, 65536]))
        if step % 250 == 0 or step == ops - 1:
            p.fast.check_invariants()
            p.ref.check_invariants()
            p.compare(full=n <= 64)
