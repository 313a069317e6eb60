"""research/eviction/trajectory.py: ADAPTIVE's per-epoch path on a validation case."""
from __future__ import annotations

import argparse

import pytest

from kvbm.policy import ADAPTIVE_OCTAVE as OCT
from research.eviction import hindsight, trajectory
from research.eviction import policy_sim as ps
from research.eviction import trace_replay as tr

pytest.importorskip("kvbm._fast.registry")


@pytest.fixture(scope="module")
def chat():
    return ps.chains_of(ps.generate_trace(seed=1, **ps.SYNTHETIC_SUITE["chat-z0.9"]))[:1500]


def test_epochs_follow_the_registry(chat):
    """A row per request that ended one of the tuner's epochs, the candidates' hits summing to the
    tuner's own counts, the same hit ratio as a plain replay, and no epoch with the tuner off."""
    rows, ratio = trajectory.epochs(chat, 200)
    eng = tr.RegistryEngine(200, "adaptive")
    total, hits = tr.replay(eng, chat)
    assert ratio == hits[0] / total
    state = eng.reg.adaptive
    assert 0.9 * state["epochs"] <= len(rows) <= state["epochs"] and len(rows) > 5
    assert all(sum(col) <= h for col, h in zip(zip(*(r["hits"] for r in rows)), state["hits"]))
    assert {r["w"] for r in rows} <= {0.0, *(2.0 ** (k - 4) for k in range(1, 10))}   # candidates only
    fixed, _ = trajectory.epochs(chat, 200, dict(level=5 * OCT, tune=False))
    assert fixed == []


def test_a_shape_case_is_generated_alone():
    """`shape/sSEED` names the same chains cases() builds, generated without the rest."""
    ap = argparse.ArgumentParser()
    want = ps.chains_of(ps.generate_trace(seed=2, **ps.SYNTHETIC_SUITE["chat-z0.9"]))
    assert trajectory.case_chains(ap, "chat-z0.9/s2", None) == want
    assert trajectory.case_chains(ap, "sessions/s3", None) == hindsight.shape_chains("sessions", 3)
    for bad in ("chat-z0.9", "chat-z0.9/sx", "nosuch/s1"):
        with pytest.raises(SystemExit):
            trajectory.case_chains(ap, bad, None)


def test_main_prints_the_table(capsys):
    trajectory.main(["chat-z0.9/s1", "300"])
    out = capsys.readouterr().out
    assert out.startswith("| request | W after |") and "chat-z0.9/s1 at 300 blocks: hit ratio" in out
    with pytest.raises(SystemExit):
        trajectory.main(["no-such-case", "300"])
