"""TransferFuture is born running (kvbm.transfer.futures): what set_running_or_notify_cancel() would
have left, so that the standard library's functions treat it as any running Future."""
import concurrent.futures
import threading

import pytest

from kvbm.transfer.futures import TransferFuture
from kvbm.wire import protocol as P


def test_born_running_as_set_running_would_leave_it():
    mine = TransferFuture(P.Path.D2H, 1, 4)
    plain = concurrent.futures.Future()
    assert plain.set_running_or_notify_cancel()
    assert (mine.running(), mine.done(), mine.cancelled()) == (True, False, False)
    assert mine._state == plain._state
    assert mine.cancel() is False                      # a running future cannot be cancelled
    with pytest.raises(RuntimeError):
        mine.set_running_or_notify_cancel()            # as for any future already running


def test_the_standard_waits_see_it_resolve():
    futures = [TransferFuture(P.Path.H2D, 1, 4) for _ in range(3)]
    threading.Timer(0.01, lambda: [f.set_result(i) for i, f in enumerate(futures)]).start()
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert len(done) == 3 and not not_done
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == [0, 1, 2]
