"""A PathWorker without its process and sockets, for driving its receive step (`_drain`) by hand:
its router reads frames from a list, its replies are collected."""
from __future__ import annotations

import zmq

from kvbm.wire import protocol as P


class FakeRouter:
    """recv_multipart from a list of frames, then zmq.Again (what _drain reads)."""

    def __init__(self, frames: list[list[bytes]]) -> None:
        self.frames = frames

    def recv_multipart(self, flags=0, copy=True):
        if not self.frames:
            raise zmq.Again()
        return self.frames.pop(0)


def bare_path_worker(frames: list[list[bytes]]):
    """(worker, replies): a D2H PathWorker of generation 1 that will read `frames`."""
    from kvbm.workers import path_worker as W
    worker = W.PathWorker.__new__(W.PathWorker)  # no process, no sockets: just the drain step
    worker.path, worker.gen, worker.stats, worker.engines = P.Path.D2H, 1, W.WorkerStats(), {}
    worker._queue, worker._seq, worker._in_flight, worker._queued_bytes = [], 0, [], 0
    replies: list[dict] = []
    worker._reply = lambda ident, msg: replies.append(msg)
    worker.sock = FakeRouter(frames)
    return worker, replies
