"""memory_map.HeldShares: which worker generation holds which registration message's CUDA shares,
and the release in a killed generation's place (torch's counters themselves are checked on a GPU:
tests/gpu/test_ipc_exit_gpu.py). torch here is a recorder of _release_ipc_counter calls."""
from __future__ import annotations

import itertools
import sys
import types

import pytest

from kvbm.transfer import memory_map as M


@pytest.fixture
def released(monkeypatch):
    calls: list[int] = []
    storage = types.SimpleNamespace(_release_ipc_counter=lambda h, o, device: calls.append(o))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(UntypedStorage=storage))
    return calls


def _source(fail_after: int | None = None):
    counter = itertools.count()

    def make() -> dict:   # message n's shares: two buffers of one allocation (3n, 3n+1), one of another (3n+2)
        n = next(counter)
        if fail_after is not None and n > fail_after:
            raise RuntimeError("sharing refused")
        ipc = lambda handle, off: {"device": 0, "handle": handle, "storage_offset": 0,   # noqa: E731
                                   "ref_counter_handle": b"/rc", "ref_counter_offset": off}
        return {"kind": "cuda_ipc", "buffers": [{"ipc": ipc(b"A", 3 * n)}, {"ipc": ipc(b"A", 3 * n + 1)},
                                                {"ipc": ipc(b"B", 3 * n + 2)}]}
    return make


def test_each_message_gets_shares_of_its_own_and_a_killed_holder_is_released_for(released):
    book = M.HeldShares(_source())
    first = book.send(1, 1)
    assert book.send(2, 1) is not first                       # a resend carries new shares
    book.accepted(2, gen=1)
    book.died(2, killed=True)                              # not a holder: nothing released
    assert released == []
    book.died(1, killed=True)
    # Torch's rebuild released the second buffer of allocation A at open (its cache): not again.
    assert released == [3, 5]
    book.died(1, killed=True)                              # once only
    assert released == [3, 5]


def test_a_worker_that_exits_by_itself_has_released_its_shares(released):
    book = M.HeldShares(_source())
    book.send(1, 1)
    book.accepted(1, gen=1)
    book.died(1, killed=False)                             # a clean stop: its own close released them
    assert released == [] and book.held == {}


def test_a_later_message_taken_replaces_the_held_one_and_late_answers_count(released):
    book = M.HeldShares(_source())
    book.send(1, 1)
    book.accepted(1, gen=1)
    book.send(2, 1)
    book.accepted(2, gen=1)                                # the worker dropped message 1's on taking 2
    book.died(1, killed=True)
    assert released == [3, 5]                              # message 2's, not message 1's
    book.send(3, 2)
    book.died(2, killed=True)                              # generation 2 is killed before its answer ...
    book.accepted(3, gen=2)                                # ... which is read afterwards: released at once
    assert released == [3, 5, 6, 8]
    book.accepted(77, gen=3)                               # an id this book never sent: ignored
    book.send(4, 3)
    book.refused(4, None)                                  # refused: forgotten, never released here
    assert book.sent == {} and book.held == {}


def test_register_again_keeps_what_the_generations_hold(released):
    source = _source()
    old = M.HeldShares(source)
    old.send(1, 1)
    old.accepted(1, gen=1)
    new = M.HeldShares(source, old)                        # register() again: gen 1 still holds message 1
    new.died(1, killed=True)
    assert released == [0, 2]


def test_a_failed_share_is_raised_and_nothing_is_recorded(released):
    book = M.HeldShares(_source(fail_after=0))
    book.send(1, 1)                                        # the one made at register()
    with pytest.raises(RuntimeError, match="sharing refused"):
        book.send(2, 1)
    assert list(book.sent) == [1]


def test_a_generation_killed_with_a_later_message_unanswered_is_not_released_for(released):
    """It may have taken the later message (releasing the held one) with its answer lost or not
    read yet: releasing the held one could count twice, so it leaks; the late answer, if it
    comes, releases the one it took."""
    book = M.HeldShares(_source())
    book.send(1, 1)
    book.accepted(1, gen=1)
    book.send(2, 1)                                        # a re-registration to the same generation
    book.died(1, killed=True)
    assert released == []
    book.accepted(2, gen=1)                                # its answer, read after the death
    assert released == [3, 5]


def test_a_refusal_drops_what_its_generation_held(released):
    book = M.HeldShares(_source())
    book.send(1, 1)
    book.accepted(1, gen=1)
    book.send(2, 1)
    book.refused(2, 1)                                     # it dropped message 1 before refusing 2
    book.died(1, killed=True)
    assert released == []


def test_register_again_keeps_unanswered_messages_and_releases_an_unsent_one(released):
    source = _source()
    old = M.HeldShares(source)                             # its first message's shares, never sent
    new = M.HeldShares(source, old)
    assert released == [0, 1, 2]                           # nobody opened them: every share released
    new.send(1, 1)
    newer = M.HeldShares(source, new)                      # message 1 still unanswered
    newer.accepted(1, gen=1)
    newer.died(1, killed=True)
    assert released == [0, 1, 2, 3, 5]
