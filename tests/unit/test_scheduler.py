"""Scheduler gates: exact release order across iterations and layers, and held items' deadlines."""
from __future__ import annotations

import pytest

from kvbm.errors import KvbmError
from kvbm.transfer.scheduler import Gate, Scheduler


def make(timeout_s: float = 60.0):
    released: list = []
    return Scheduler(released.extend, hold_timeout_s=timeout_s), released


def test_iteration_and_layer_gates_open_in_order():
    s, out = make()
    assert s.hold(Gate(iteration=1), "it1") and s.hold(Gate(iteration=0, layer=2), "it0l2")
    assert s.reached(layer=1) == 0 and out == []
    assert s.reached(layer=2) == 1 and out == ["it0l2"]
    assert s.reached(iteration=0) == 0 and len(s) == 1
    assert s.reached(iteration=1) == 1 and out == ["it0l2", "it1"]
    assert not s.hold(Gate(iteration=1), "late")  # already open: not parked


def test_layer_gate_opens_at_the_end_of_its_iteration():
    s, out = make()
    assert s.hold(Gate(layer=2), "a")
    assert s.reached(iteration=0) == 1 and out == ["a"]   # iteration 0 finished: every layer of it did
    s.reached(layer=3)
    assert not s.hold(Gate(layer=2), "open")               # layer 2 of iteration 1 already finished
    assert s.hold(Gate(layer=2), "b") is False
    s.reached(iteration=1)
    assert s.hold(Gate(layer=0), "c")                      # iteration 2, no layer yet
    assert s.reached(iteration=2) == 1 and out == ["a", "c"]


def test_layer_gate_held_across_several_iterations_is_released():
    s, out = make()
    assert s.hold(Gate(layer=3), "x")
    s.reached(iteration=0)
    s.reached(iteration=1)
    assert out == ["x"] and len(s) == 0


def test_expired_items_are_returned_once_and_not_released():
    s, out = make(timeout_s=5.0)
    s.hold(Gate(iteration=7), "old", now=100.0)
    s.hold(Gate(iteration=7), "new", now=103.0)
    assert s.expire(now=104.9) == []
    assert s.expire(now=105.0) == ["old"]
    assert s.expire(now=105.0) == []
    assert s.next_deadline() == 108.0
    s.reached(iteration=7)
    assert out == ["new"]
    assert s.next_deadline() is None


def test_bad_points_raise():
    s, _ = make()
    s.reached(iteration=3)
    with pytest.raises(KvbmError, match="iteration 1 reported after iteration 3"):
        s.reached(iteration=1)
    with pytest.raises(KvbmError, match="layer must be >= 0"):
        s.reached(layer=-1)
def test_closed_scheduler_parks_nothing():
    s, out = make()
    s.hold(Gate(iteration=1), "a")
    assert s.close() == ["a"]
    assert s.hold(Gate(iteration=5), "b") is False   # the caller fails it instead
    assert s.reached(iteration=5) == 0 and out == []


