"""The wire both sides speak: the engine side (kvbm.transfer) and the worker side (kvbm.workers)
build on it, side by side, and never import each other.

  protocol   message types, msgpack encoding with a size cap, one validator per message
  channel    ZeroMQ sockets and the endpoints of one instance (ipc:// in the 0700 runtime dir, or
             tcp://127.0.0.1)
"""
