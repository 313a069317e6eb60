"""The wire both sides speak: the engine side (kvbm.transfer) and the worker side (kvbm.workers)
build on it, side by side, and never import each other.

  protocol   message types, msgpack encoding with a size cap, one validator per message
  channel    ZeroMQ sockets and the endpoints of one instance (ipc:// in the 0700 runtime dir, or
             tcp://127.0.0.1)
  auth       CURVE keys kept in the 0600 runtime dir and the ZAP Gatekeeper: every socket of both
             sides takes only peers that hold them
"""
