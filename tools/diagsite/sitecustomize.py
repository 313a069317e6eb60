"""Diagnostic only (PYTHONPATH=tools/diagsite, for tools/diag_timeline.py): every DONE a path
worker sends carries t_abs, its time.monotonic() when the DONE was built (~ the worker's t_end).
CLOCK_MONOTONIC is one clock for every process of the machine, so the engine can place worker
intervals on its own timeline."""
import time

try:
    from kvbm.wire import protocol as _P

    _orig = _P.make_done

    def make_done(*a, **k):
        msg = _orig(*a, **k)
        msg["t_abs"] = time.monotonic()
        return msg

    _P.make_done = make_done
except Exception:  # noqa: BLE001
    pass
