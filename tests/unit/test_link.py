"""PathLink, the registration state machine of one path, driven event by event without sockets:
first registration, restarts (started/died/stale), rejection with backoff and its limit, stopping."""
from __future__ import annotations

import pytest

from kvbm.transfer.link import REGISTER_BACKOFF_S, REGISTER_RETRIES, LinkState, PathLink
from kvbm.wire.protocol import Path


@pytest.fixture
def link() -> PathLink:
    return PathLink(Path.D2H, gen=1)


def registered(link: PathLink, rid: int = 7, gen: int = 1) -> PathLink:
    link.reset()
    link.begin_register(rid)
    link.accepted(rid, gen)
    return link


def test_first_registration_goes_down_registering_ready(link):
    assert link.state is LinkState.DOWN and not link.ready.is_set()
    link.reset()
    link.begin_register(7)
    assert link.state is LinkState.REGISTERING
    link.accepted(7, 1)
    assert link.state is LinkState.READY
    assert (link.registered_gen, link.gen, link.accepted_once) == (1, 1, True)
    assert link.ready.is_set()


def test_only_the_reply_to_the_latest_registration_counts(link):
    link.reset()
    link.begin_register(7)
    link.begin_register(8)          # re-sent (a generation started meanwhile)
    link.accepted(7, 1)
    assert link.state is LinkState.REGISTERING and not link.ready.is_set()
    link.accepted(8, 2)
    assert link.state is LinkState.READY and link.registered_gen == 2


def test_a_first_rejection_goes_to_register_and_is_not_retried(link):
    link.reset()
    link.begin_register(7)
    assert link.rejected("cannot map the segment", now=100.0) is False
    assert link.state is LinkState.REJECTED and link.error == "cannot map the segment"
    assert link.ready.is_set()
    assert link.retry_at == 0.0 and not link.refuses_work   # register() raises it; nothing queued yet


def test_death_of_the_registered_generation_asks_for_a_new_registration(link):
    registered(link)
    assert link.died(2) is False                 # another generation: nothing to do
    assert link.state is LinkState.READY
    assert link.died(1) is True
    assert link.state is LinkState.DOWN
    link.begin_register(9)
    assert link.state is LinkState.REGISTERING
    # The registration may have gone to a generation that died before answering: send it again.
    assert link.died(2) is True
    link.accepted(9, 3)
    assert link.state is LinkState.READY


def test_started_resends_only_for_a_newer_generation(link):
    registered(link, gen=2)
    assert link.started(1) is False and link.started(2) is False
    assert link.started(3) is True and link.gen == 3
    assert link.state is LinkState.READY      # generation 2 still holds our registration until 3 answers


def test_the_started_event_of_the_known_generation_sends_no_second_registration(link):
    link.reset()
    link.begin_register(7)                    # sent to generation 1, which the welcome named
    assert link.started(1) is False           # its `started` event arrives late: the same worker
    assert link.started(2) is True            # a newer one: send again
    link.begin_register(8)
    assert link.died(2) is True               # it died unanswered: died() sends again


def test_stale_reply_drops_the_registration_it_names(link):
    registered(link, gen=2)
    assert link.stale(wire_gen=1, worker_gen=3) is False   # sent under an older registration
    assert link.stale(wire_gen=2, worker_gen=3) is True
    assert link.state is LinkState.DOWN and link.gen == 3


def test_rejections_after_a_restart_back_off_then_refuse_work(link):
    registered(link)
    link.died(1)
    now = 10.0
    delays = []
    for attempt in range(1, REGISTER_RETRIES + 1):
        link.begin_register(100 + attempt)
        link.rejected("segment gone", now=now)
        assert link.state is LinkState.BACKOFF and not link.refuses_work
        delays.append(round(link.retry_at - now, 6))
        assert link.retry_due(link.retry_at - 1e-3) is False
        now = link.retry_at
        assert link.retry_due(now) is True and link.retry_at == 0.0
    assert delays == [round(REGISTER_BACKOFF_S * 2 ** i, 6) for i in range(REGISTER_RETRIES)]
    link.begin_register(200)
    link.rejected("segment gone", now=now)
    assert link.state is LinkState.REJECTED and link.refuses_work
    assert link.error == f"d2h worker rejected the registration {REGISTER_RETRIES + 1} times: segment gone"
    # A new generation clears the refusal and the count.
    assert link.started(2) is True
    assert link.error is None and link.attempts == 0 and not link.refuses_work


def test_an_accepted_registration_resets_the_backoff(link):
    registered(link)
    link.died(1)
    link.begin_register(8)
    link.rejected("busy", now=0.0)
    assert link.attempts == 1
    link.retry_due(link.retry_at)
    link.begin_register(9)
    link.accepted(9, 2)
    assert (link.attempts, link.retry_at, link.state) == (0, 0.0, LinkState.READY)


def test_stopping_takes_the_link_down_until_a_generation_starts(link):
    registered(link)
    link.stopped()
    assert link.state is LinkState.DOWN and link.registered_gen == 0
    assert link.started(2) is True
