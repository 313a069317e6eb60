"""Protocol and Scheduler semantics without processes: encoding, validation messages, gates."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from kvbm.errors import KvbmError, ProtocolError
from kvbm.layout import BlockLayout, InnerOrder, LayoutConfig, LayoutType
from kvbm.transfer.scheduler import Gate, Scheduler
from kvbm.wire import protocol as P


def test_blocks_are_packed_little_endian_int64():
    data = P.pack_blocks([1, 2, 2**40])
    assert data == np.array([1, 2, 2**40], dtype="<i8").tobytes()
    assert P.unpack_blocks(data, "src", 2**41).tolist() == [1, 2, 2**40]
    with pytest.raises(ProtocolError, match=r"range \[1, 1099511627776\] outside \[0, 100\)"):
        P.unpack_blocks(data, "src", 100)
    with pytest.raises(ProtocolError, match="not a whole number"):
        P.unpack_blocks(b"\x00" * 9, "src", 100)
    with pytest.raises(ProtocolError, match="expected 1..4"):
        P.unpack_blocks(P.pack_blocks(range(5)), "src", 100, max_count=4)


def test_xfer_round_trip_and_validation():
    msg = P.decode(P.encode(P.make_xfer(3, "eng", 1, P.Path.H2D, [0, 1], [5, 6], priority=2, layers=True)))
    src, dst = P.validate_xfer(msg, 10, 10, 64)
    assert src.tolist() == [0, 1] and dst.tolist() == [5, 6]
    for key, value, text in (("gen", -1, "gen"), ("prio", True, "prio"), ("engine", "", "engine"),
                             ("layers", 1, "layers"), ("gate", [1], "gate"), ("id", "x", "id")):
        bad = dict(msg, **{key: value})
        with pytest.raises(ProtocolError, match=text):
            P.validate_xfer(bad, 10, 10, 64)
    with pytest.raises(ProtocolError, match="destinations must be distinct"):
        P.validate_xfer(dict(msg, dst=P.pack_blocks([4, 4])), 10, 10, 64)


def test_decode_rejects_versions_types_and_sizes():
    with pytest.raises(ProtocolError, match="version"):
        P.decode(msgpack.packb({"v": 2, "t": "xfer"}))
    with pytest.raises(ProtocolError, match="map"):
        P.decode(msgpack.packb([1, 2]))
    with pytest.raises(ProtocolError, match="exceeds"):
        P.decode(b"\x80" * 100, max_bytes=10)
    with pytest.raises(ProtocolError, match="undecodable"):
        P.decode(b"\xc1")
    assert P.request_id_of({"id": 5}) == 5 and P.request_id_of({"id": True}) == -1 and P.request_id_of(None) == -1


def test_layouts_cross_the_wire():
    lay = BlockLayout(LayoutConfig(4, 2, 16, 64), LayoutType.LAYER_SEPARATE, 100, InnerOrder.BLOCK_MAJOR)
    back = P.layout_from_wire(msgpack.unpackb(msgpack.packb(P.layout_to_wire(lay))))
    assert back == lay
    with pytest.raises(ProtocolError, match="bad layout"):
        P.layout_from_wire({"config": {"num_layers": 0}, "type": 0, "num_blocks": 1})


def test_scheduler_gates():
    released = []
    sched = Scheduler(released.extend)
    assert sched.hold(None, "now") is False
    assert sched.hold(Gate(iteration=0), "it0") and sched.hold(Gate(iteration=1), "it1")
    assert sched.hold(Gate(layer=3), "l3") and sched.hold(Gate(iteration=1, layer=0), "it1l0")
    assert sched.reached(layer=2) == 0
    assert sched.reached(layer=3) == 1 and released == ["l3"]
    assert sched.reached(iteration=0) == 1 and released[-1] == "it0"
    assert (sched.iteration, sched.layer) == (1, -1)
    assert sched.reached(layer=0) == 1 and released[-1] == "it1l0"
    assert sched.hold(Gate(iteration=0), "late") is False  # already passed
    assert sched.reached(iteration=1) == 1 and released[-1] == "it1"
    assert len(sched) == 0
    with pytest.raises(KvbmError):
        sched.reached(iteration=0)
    with pytest.raises(KvbmError):
        Gate()
