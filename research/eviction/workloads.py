"""More workload shapes for the adaptive policy's validation set (POLICY_ADAPTIVE.md), beside
policy_sim.generate_trace's rag / sysprompt / chat / agent / mixed. Each is a seeded generator of a
Mooncake-format trace (timestamp ms, input_length, output_length, hash_ids) with tree-consistent
block ids (policy_sim._Hasher: a block's id is its chain prefix's), small enough to replay in
well under a second.

Shapes (`generate(shape, n_requests, seed, **kw)`):
  sessions   chat sessions with a life cycle: a session opens on one of a few system prompts, runs a
             geometric number of turns (each re-sends the whole conversation and appends the
             answer and a new question), then ends; `concurrent` sessions interleave.
  rag-shared retrieval with shared documents: system prompt, then k documents drawn from a Zipf pool
             in canonical order (sorted ids, as RAG stacks do to share prefixes), then a question.
  agent-loop agents with long tool loops: system prompt + tool specs (shared), a task (unique),
             then a loop of steps, each re-reading the whole context and appending a tool call and
             its result; `concurrent` agents interleave.
  sysprompt-heavy many tenants with long system prompts (Zipf popular), few-shot blocks shared per
             tenant, short one-shot user content.
  scan-mix   a Zipf-popular RAG core interleaved with one-shot long documents (scans), the case
             where a frequency credit matters most.
Every request ends with a unique partial block, as in policy_sim (its hash changes when it fills).
"""
from __future__ import annotations

import random
from collections.abc import Callable

from research.eviction import policy_sim as ps

SHAPES = ("sessions", "rag-shared", "agent-loop", "sysprompt-heavy", "scan-mix")


class _Trace:
    """Accumulates requests: labels -> ids through one hasher, Poisson arrivals."""

    def __init__(self, rng: random.Random, rate_ms: float = 250.0):
        self.rng = rng
        self.hasher = ps._Hasher()
        self.rate_ms = rate_ms
        self.t = 0.0
        self.out: list[dict] = []
        self.uniq = 0

    def fresh(self, n: int) -> list[tuple]:
        labels = [("u", self.uniq + i) for i in range(n)]
        self.uniq += n
        return labels

    def add(self, labels: list) -> None:
        ids = self.hasher.chain(labels + self.fresh(1))
        self.t += self.rng.expovariate(1.0 / self.rate_ms)
        self.out.append({"timestamp": int(self.t), "input_length": 512 * len(ids) - 1 - self.rng.randrange(511),
                         "output_length": self.rng.randint(1, 400), "hash_ids": ids})


def _sessions(tr: _Trace, n: int, *, concurrent: int = 120, n_system: int = 6, mean_turns: float = 8,
              turn_len: float = 3, zipf_s: float = 1.0) -> None:
    rng = tr.rng
    pick_sys = ps._zipf_sampler(rng, n_system, zipf_s)
    sys_lens = [ps._lognormal_len(rng, 10, 0.4) for _ in range(n_system)]
    live: list[list] = []
    while len(tr.out) < n:
        if len(live) < concurrent or rng.random() < 1.0 / mean_turns:
            s = pick_sys()
            conv = [("s", s, i) for i in range(sys_lens[s])] + tr.fresh(ps._lognormal_len(rng, turn_len * 2, 0.7))
            if len(live) >= concurrent:
                live.pop(rng.randrange(len(live)))      # a session ends
            live.append(conv)
            tr.add(conv)
            continue
        i = rng.randrange(len(live))
        live[i] = live[i] + tr.fresh(ps._lognormal_len(rng, turn_len, 0.7))
        if len(live[i]) > 300:
            live.pop(i)
            continue
        tr.add(live[i])


def _rag_shared(tr: _Trace, n: int, *, n_docs: int = 3000, k: tuple[int, int] = (1, 3), doc_len: float = 12,
                zipf_s: float = 0.9, sys_len: int = 6) -> None:
    rng = tr.rng
    pick = ps._zipf_sampler(rng, n_docs, zipf_s)
    lens = [ps._lognormal_len(rng, doc_len, 0.7) for _ in range(n_docs)]
    system = [("s", 0, i) for i in range(sys_len)]
    while len(tr.out) < n:
        docs = sorted({pick() for _ in range(rng.randint(*k))})
        labels = list(system)
        for d in docs:
            labels += [("d", d, i) for i in range(lens[d])]
        tr.add(labels + tr.fresh(rng.randint(1, 2)))


def _agent_loop(tr: _Trace, n: int, *, concurrent: int = 40, n_system: int = 4, mean_steps: float = 20,
                step_len: float = 2, task_len: float = 6) -> None:
    rng = tr.rng
    sys_lens = [ps._lognormal_len(rng, 16, 0.3) for _ in range(n_system)]
    live: list[tuple[list, int]] = []
    while len(tr.out) < n:
        if len(live) < concurrent:
            s = rng.randrange(n_system)
            ctx = ([("s", s, i) for i in range(sys_lens[s])] + [("tools", s, i) for i in range(6)]
                   + tr.fresh(ps._lognormal_len(rng, task_len, 0.6)))
            live.append((ctx, max(1, int(rng.expovariate(1.0 / mean_steps)))))
        i = rng.randrange(len(live))
        ctx, left = live[i]
        tr.add(ctx)
        ctx = ctx + tr.fresh(ps._lognormal_len(rng, step_len, 0.8))
        if left <= 1 or len(ctx) > 300:
            live.pop(i)
        else:
            live[i] = (ctx, left - 1)


def _sysprompt_heavy(tr: _Trace, n: int, *, n_tenants: int = 64, sys_len: float = 40, zipf_s: float = 1.1,
                     user_len: float = 3) -> None:
    rng = tr.rng
    pick = ps._zipf_sampler(rng, n_tenants, zipf_s)
    lens = [ps._lognormal_len(rng, sys_len, 0.5) for _ in range(n_tenants)]
    while len(tr.out) < n:
        s = pick()
        labels = [("s", s, i) for i in range(lens[s])]
        if rng.random() < 0.5:                  # the tenant's few-shot block set, one of 3
            labels += [("f", s, rng.randrange(3), i) for i in range(4)]
        tr.add(labels + tr.fresh(ps._lognormal_len(rng, user_len, 0.7)))


def _scan_mix(tr: _Trace, n: int, *, n_docs: int = 400, doc_len: float = 15, zipf_s: float = 1.0,
              scan_share: float = 0.3, scan_len: float = 60) -> None:
    rng = tr.rng
    pick = ps._zipf_sampler(rng, n_docs, zipf_s)
    lens = [ps._lognormal_len(rng, doc_len, 0.6) for _ in range(n_docs)]
    while len(tr.out) < n:
        if rng.random() < scan_share:
            tr.add(tr.fresh(ps._lognormal_len(rng, scan_len, 0.5)))
        else:
            d = pick()
            tr.add([("d", d, i) for i in range(lens[d])] + tr.fresh(rng.randint(1, 2)))


_GENERATORS: dict[str, Callable] = {"sessions": _sessions, "rag-shared": _rag_shared, "agent-loop": _agent_loop,
                                    "sysprompt-heavy": _sysprompt_heavy, "scan-mix": _scan_mix}


def generate(shape: str, n_requests: int = 4000, seed: int = 0, **kw) -> list[dict]:
    """A trace of `shape` (SHAPES); kw are the shape's parameters (see its function)."""
    if shape not in _GENERATORS:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    tr = _Trace(random.Random(seed))
    _GENERATORS[shape](tr, n_requests, **kw)
    return tr.out[:n_requests]
