"""Plain-Python twin of ADAPTIVE's shadow tuner (kvbm/_fast/_shadow.pxd): the spec, integers only,
so that the registry and its twin (_reference.py) choose the same credit at the same access.

ADAPTIVE keys inactive blocks by last tick + credit * f(use count) (kvbm/policy.py). The tuner picks
the credit online by miniature simulation (Waldspurger et al., ATC 2017): a 1-in-R hash sample of
the block uses is replayed on one small cache of M = N / R blocks per candidate credit, and the
registry runs at the candidate whose small cache has hit most lately. The study behind it:
research/eviction/POLICY_ADAPTIVE.md §13.

Parts:
  shape         R (a power of two) and M for N blocks: M = N // R in [mini_blocks, 2 mini_blocks)
                once N >= mini_blocks, else R = 1 and M = N.
  sampled       a block use is in the sample when the top 24 bits of hash * MIX, modulo R, are 0.
  MiniCache     one candidate: M blocks keyed by (has a child << 63 | last tick + credit_of(M,
                level) * f(use count), last tick), smallest first: leaves first as in the registry,
                a block's child bit the registry's at its last use (the registry's leaf bit under
                leaves-first, else 0); a ring of the last M evictions (hash, use count): a hash
                used again while in it gets its use count back (the entry is consumed and its
                position stays empty until the ring wraps). No priority.
  ShadowTuner   the K = 10 candidates (W = 0, 1/8, ..., 32: the fixed-setting family of
                research/eviction/hindsight.py, leaves first) over one sample and one clock (two
                ticks per use, as the registry ticks at the use and at its release). Every M / 2
                evictions of candidate 0 (an epoch, as the registry's N / 2), each candidate's hits
                of the epoch join its score, decayed: score = score * decay / 2**16 + hits * 2**16
                (hits at most 2**30, the score at most 2**46: saturating, as the registry's).
                The registry moves to the best score's level (the current one on a tie, else the
                lowest W).
"""
from __future__ import annotations

import heapq

from kvbm.policy import ADAPTIVE_OCTAVE

MIX = 0x9E3779B97F4A7C15
U64 = (1 << 64) - 1
U63 = (1 << 63) - 1      # a mini key's time part saturates here; bit 63 is the child bit
SHADOW_LEVELS = (-1, *(k * ADAPTIVE_OCTAVE for k in range(1, 10)))   # W = 0, 1/8, 1/4, ..., 32
ONE = 1 << 16                                                        # the score's unit and decay's
EPOCH_HITS_MAX = 1 << 30          # an epoch's hits counted into a score at most
SCORE_MAX = 1 << 46               # a score saturates here (the registry's int64 never overflows)


def credit_of(n: int, level: int) -> int:
    """ADAPTIVE's ticks of credit per frequency step for n blocks at `level` (_adapt.pxd; the
    registry's twin uses it too): N * 2**(level/2**16 - 4), linear between octaves (2**q * (1 +
    r/2**16) for level = 2**16 q + r); 0 for level -1."""
    if level < 0:
        return 0
    return (n * (ONE + level % ONE) << (level >> 16)) >> 20


def f_of(count: int) -> int:
    """Frequency steps of a use count: 0 below 2, else its bit length (LINEAGE's and ADAPTIVE's)."""
    return count.bit_length() if count >= 2 else 0


def shape(n: int, mini_blocks: int) -> tuple[int, int]:
    """(R, M): the sample rate, a power of two, and the blocks of each mini cache."""
    rate = 1
    while rate * 2 * mini_blocks <= n:
        rate *= 2
    return rate, n // rate


def sampled(h: int, rate: int) -> bool:
    return ((h * MIX) & U64) >> 40 & (rate - 1) == 0


class MiniCache:
    """One candidate's small cache (see the module docstring)."""

    def __init__(self, m: int, level: int):
        self.m = m
        self.credit = credit_of(m, level)
        self.blocks: dict[int, list[int]] = {}      # hash -> [use count, last tick, key]
        self.heap: list[tuple[int, int, int]] = []  # (key, last tick, hash); stale ones skipped
        self.ring: list[tuple[int, int] | None] = [None] * m   # (hash, use count) of the last M victims
        self.ring_pos: dict[int, int] = {}          # hash -> its position in the ring
        self.head = 0
        self.hits = 0
        self.evictions = 0

    def use(self, h: int, tick: int, child: bool = False) -> None:
        blk = self.blocks.get(h)
        if blk is not None:
            self.hits += 1
            count = min(blk[0] + 1, 0xFFFFFFFF)
        else:
            pos = self.ring_pos.pop(h, None)
            count = 1
            if pos is not None:
                count = min(self.ring[pos][1] + 1, 0xFFFFFFFF)
                self.ring[pos] = None
            if len(self.blocks) == self.m:
                self._evict()
        key = int(child) << 63 | min(tick + self.credit * f_of(count), U63)
        self.blocks[h] = [count, tick, key]
        heapq.heappush(self.heap, (key, tick, h))
        if len(self.heap) > 4 * self.m + 64:     # each hit leaves a stale entry: drop them now and then
            self.heap = [e for e in self.heap if self.blocks.get(e[2], (0, -1))[1] == e[1]]
            heapq.heapify(self.heap)

    def _evict(self) -> None:
        while True:
            key, tick, h = heapq.heappop(self.heap)
            blk = self.blocks.get(h)
            if blk is not None and blk[1] == tick:      # each use has its own tick: the live entry
                break
        del self.blocks[h]
        old = self.ring[self.head]
        if old is not None:
            del self.ring_pos[old[0]]
        self.ring[self.head] = (h, blk[0])
        self.ring_pos[h] = self.head
        self.head = (self.head + 1) % self.m
        self.evictions += 1


class ShadowTuner:
    """K mini caches over one sample; `use(h, child)` returns the level to move to, or None."""

    def __init__(self, n: int, mini_blocks: int, decay: int, level: int):
        self.rate, self.m = shape(n, mini_blocks)
        self.decay = decay
        self.minis = [MiniCache(self.m, lv) for lv in SHADOW_LEVELS]
        self.tick = 0
        self.epoch = max(self.m // 2, 1)
        self.next_epoch = self.epoch
        self.score = [0] * len(SHADOW_LEVELS)
        self.last_hits = [0] * len(SHADOW_LEVELS)
        self.current = SHADOW_LEVELS.index(level) if level in SHADOW_LEVELS else -1
        self.epochs = 0

    def use(self, h: int, child: bool = False) -> int | None:
        if not sampled(h, self.rate):
            return None
        self.tick += 2
        for mini in self.minis:
            mini.use(h, self.tick, child)
        if self.minis[0].evictions < self.next_epoch:
            return None
        self.next_epoch += self.epoch
        self.epochs += 1
        for k, mini in enumerate(self.minis):
            hits = min(mini.hits - self.last_hits[k], EPOCH_HITS_MAX)
            self.score[k] = min((self.score[k] * self.decay >> 16) + (hits << 16), SCORE_MAX)
            self.last_hits[k] = mini.hits
        top = max(self.score)
        if self.current >= 0 and self.score[self.current] == top:
            return None
        self.current = self.score.index(top)
        return SHADOW_LEVELS[self.current]
