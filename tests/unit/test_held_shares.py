"""memory_map.HeldShares: which worker generation holds which registration message's CUDA shares,
and the release in a dead generation's place (torch's counters themselves are checked on a GPU:
tests/gpu/test_ipc_exit_gpu.py). torch here is a recorder of _release_ipc_counter calls."""
from __future__ import annotations

import itertools
import sys
import types

import pytest

from kvbm.transfer import memory_map as M


@pytest.fixture
def released(monkeypatch):
    calls: list[tuple] = []
    storage = types.SimpleNamespace(_release_ipc_counter=lambda h, o, device: calls.append((h, o, device)))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(UntypedStorage=storage))
    return calls


def _source():
    counter = itertools.count()

    def make() -> dict:   # one message's shares: two buffers of one allocation, one of another
        n = next(counter)
        ipc = lambda handle, off: {"device": 0, "handle": handle, "storage_offset": 0,   # noqa: E731
                                   "ref_counter_handle": b"/rc", "ref_counter_offset": off}
        return {"kind": "cuda_ipc", "buffers": [{"ipc": ipc(b"A", 3 * n)}, {"ipc": ipc(b"A", 3 * n + 1)},
                                                {"ipc": ipc(b"B", 3 * n + 2)}]}
    return make


def test_each_message_gets_shares_of_its_own_and_a_dead_holder_is_released_for(released):
    book = M.HeldShares(_source())
    first = book.send(1)
    assert book.send(2) is not first                       # a resend carries new shares
    book.accepted(2, gen=1)
    book.died(2)                                           # not the holder: nothing released
    assert released == []
    book.died(1)
    # Torch's rebuild released the second buffer of allocation A at open (its cache): not again.
    assert released == [(b"/rc", 3, 0), (b"/rc", 5, 0)]
    book.died(1)                                           # once only
    assert len(released) == 2


def test_a_live_generation_that_took_a_later_registration_released_the_earlier(released):
    book = M.HeldShares(_source())
    book.send(1)
    book.accepted(1, gen=1)
    book.send(2)
    book.accepted(2, gen=1)                                # the worker dropped message 1's on taking 2
    book.died(1)
    assert released == [(b"/rc", 3, 0), (b"/rc", 5, 0)]   # message 2's (offsets 3..5), not message 1's
    book.send(3)
    book.accepted(1, gen=2)                                # a stale answer counts for nothing
    assert book.held is None and list(book.sent) == [3]
