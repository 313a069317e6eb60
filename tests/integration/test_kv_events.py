"""KV events: a real ZeroMQ subscriber receives the publisher's frames and decodes them, sequence
numbers count up from 0, the replay socket returns missed batches then the end marker; both
encodings round-trip; malformed payloads raise EventDecodeError; the recorder turns pool activity
into events (chains, evictions drained from a registry, clear, overflow)."""
from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq

from kvbm.errors import ConfigError, EventDecodeError, PermissionRefusedError
from kvbm.integrations.events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KvEventPublisher,
    PoolEventRecorder,
    decode_batch,
    decode_frames,
    encode_batch,
)
from kvbm.pools import BlockPool, Tier

DEADLINE_S = 10.0


def _batch(n: int) -> list:
    return [BlockStored([n, n + 1], None if n == 0 else n - 1, [], 16, None, "CPU", None), BlockRemoved([n], "GPU")]


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def publisher(ctx, tmp_path):
    pub = KvEventPublisher(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay", topic="kv", buffer_steps=8,
                           context=ctx, data_parallel_rank=3)
    yield pub
    pub.close()


def _subscriber(ctx, endpoint: str):
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(endpoint)
    return sub


def _recv(sock) -> list[bytes]:
    if not sock.poll(int(DEADLINE_S * 1000)):
        raise AssertionError(f"nothing received within {DEADLINE_S} s")
    return sock.recv_multipart()


def _wait_connected(pub: KvEventPublisher, sub) -> tuple[bytes, int, KVEventBatch]:
    """PUB drops what it sends before the subscription arrives (the slow-joiner): publish probes
    until one is received, with a deadline. Returns the first message received."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        pub.publish([AllBlocksCleared()])
        if sub.poll(50):
            return decode_frames(sub.recv_multipart())
    raise AssertionError(f"subscriber not connected within {DEADLINE_S} s")


def test_subscriber_receives_frames_in_order(publisher, ctx):
    sub = _subscriber(ctx, publisher.endpoint)
    try:
        topic, first, batch = _wait_connected(publisher, sub)
        assert topic == b"kv" and batch.events == [AllBlocksCleared()] and batch.data_parallel_rank == 3
        for n in range(5):
            assert publisher.publish(_batch(n))
        got = []
        while len(got) < 5:
            frames = _recv(sub)
            assert len(frames) == 3 and len(frames[1]) == 8
            topic, seq, batch = decode_frames(frames)
            if batch.events == [AllBlocksCleared()]:
                continue          # a late probe
            got.append((seq, batch))
        seqs = [s for s, _ in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] > first
        assert [b.events for _, b in got] == [_batch(n) for n in range(5)]
        assert all(b.ts > 0 for _, b in got)
    finally:
        sub.close(linger=0)


def _replay(ctx, endpoint: str, start: int) -> list[tuple[int, KVEventBatch]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart((b"", start.to_bytes(8, "big")))
        out = []
        while True:
            frames = _recv(dealer)
            assert frames[0] == b""
            if frames[2] == END_SEQ:
                assert frames[1:] == [b"", END_SEQ, b""]
                return out
            _, seq, batch = decode_frames(frames[1:])
            out.append((seq, batch))
    finally:
        dealer.close(linger=0)


def test_replay_returns_missed_batches_then_the_end_marker(publisher, ctx):
    for n in range(12):                       # nobody subscribed: every batch is "missed"
        publisher.publish(_batch(n))
    deadline = time.monotonic() + DEADLINE_S
    while publisher.published < 12:
        assert time.monotonic() < deadline, f"{publisher.published} of 12 batches sent"
        time.sleep(0.01)
    # seq 0..11 sent, the buffer keeps the last 8 (4..11)
    got = _replay(ctx, publisher.replay_endpoint, 6)
    assert [s for s, _ in got] == list(range(6, 12))
    assert [b.events for _, b in got] == [_batch(n) for n in range(6, 12)]
    assert [s for s, _ in _replay(ctx, publisher.replay_endpoint, 0)] == list(range(4, 12))
    assert _replay(ctx, publisher.replay_endpoint, 12) == []
    assert publisher.replays == 3


def test_replay_ignores_a_malformed_request(publisher, ctx):
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(publisher.replay_endpoint)
    try:
        dealer.send_multipart((b"", b"abc"))           # not 8 bytes: no answer
        assert not dealer.poll(200)
    finally:
        dealer.close(linger=0)
    publisher.publish(_batch(0))
    assert _replay(ctx, publisher.replay_endpoint, 0)[0][0] == 0   # the thread still serves


def test_tcp_port_zero_binds_a_free_loopback_port(ctx):
    with KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", context=ctx) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith(":0")
        assert pub.replay_endpoint != pub.endpoint
        sub = _subscriber(ctx, pub.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            _, seq, _ = _wait_connected(pub, sub)
            assert seq >= 0
        finally:
            sub.close(linger=0)


def test_endpoints_are_checked(ctx):
    with pytest.raises(PermissionRefusedError, match="not a loopback address"):
        KvEventPublisher("tcp://0.0.0.0:0", context=ctx)
    with pytest.raises(ConfigError, match="expected tcp://HOST:PORT"):
        KvEventPublisher("udp://127.0.0.1:5", context=ctx)
    with pytest.raises(ConfigError, match="buffer_steps must be an int >= 1"):
        KvEventPublisher("tcp://127.0.0.1:0", buffer_steps=0, context=ctx)


def test_full_queue_drops_and_counts(ctx, tmp_path):
    pub = KvEventPublisher(f"ipc://{tmp_path}/e", max_queue=1, context=ctx)
    try:
        results = [pub.publish(_batch(n)) for n in range(200)]
        assert results.count(False) == pub.dropped       # each refusal counted, none blocked
    finally:
        pub.close()


# ---- encoding ---------------------------------------------------------------------------------
BATCH = KVEventBatch(1700000000.25, [
    BlockStored([1, 2**64 - 1, 7], 99, list(range(48)), 16, None, "CPU", None),
    BlockStored([b"\x01" * 32], None, [], 16, 5, "STORAGE", "adapter", {"group_idx": 2}),
    BlockRemoved([2**63, 3], "GPU"),
    BlockRemoved([4], None, {"group_idx": 1}),
    AllBlocksCleared(),
], 0)


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_round_trip(encoding):
    assert decode_batch(encode_batch(BATCH, encoding)) == BATCH


def test_map_encoding_is_vllms_shape():
    obj = msgpack.unpackb(encode_batch(BATCH, "map"), raw=False)
    assert obj[0] == 1700000000.25 and obj[2] == 0
    assert obj[1][0] == {"type": "BlockStored", "block_hashes": [1, 2**64 - 1, 7], "parent_block_hash": 99,
                         "token_ids": list(range(48)), "block_size": 16, "lora_id": None, "medium": "CPU",
                         "lora_name": None}
    assert obj[1][1]["group_idx"] == 2 and "extra_keys" not in obj[1][1]   # defaults omitted
    assert obj[1][2] == {"type": "BlockRemoved", "block_hashes": [2**63, 3], "medium": "GPU"}
    assert obj[1][4] == {"type": "AllBlocksCleared"}


def test_array_encoding_is_the_earlier_shape():
    obj = msgpack.unpackb(encode_batch(BATCH, "array"), raw=False)
    assert obj[1][0] == ["BlockStored", [1, 2**64 - 1, 7], 99, list(range(48)), 16, None, "CPU"]
    assert obj[1][1] == ["BlockStored", [b"\x01" * 32], None, [], 16, 5, "STORAGE", "adapter", None, 2]
    assert obj[1][2] == ["BlockRemoved", [2**63, 3], "GPU"]
    assert obj[1][3] == ["BlockRemoved", [4], None, 1]
    assert obj[1][4] == ["AllBlocksCleared"]


def test_decoder_accepts_earlier_forms():
    # the first array events (no medium), a batch without data_parallel_rank, a batch as a map
    old = msgpack.packb([2.0, [["BlockStored", [5], None, [1, 2], 2, None], ["BlockRemoved", [5]]]])
    assert decode_batch(old) == KVEventBatch(2.0, [BlockStored([5], None, [1, 2], 2), BlockRemoved([5])], None)
    as_map = msgpack.packb({"ts": 3, "events": [{"type": "BlockRemoved", "block_hashes": [1], "medium": "CPU",
                                                 "ownership": "x"}], "data_parallel_rank": 1})
    assert decode_batch(as_map) == KVEventBatch(3.0, [BlockRemoved([1], "CPU", {"ownership": "x"})], 1)


@pytest.mark.parametrize("payload, message", [
    (b"\xc1", "not one msgpack value"),
    (msgpack.packb([1.0, []]) + b"\x00", "not one msgpack value"),
    (msgpack.packb("batch"), "expected an array or a map, got str"),
    (msgpack.packb([1.0]), "got 1 elements"),
    (msgpack.packb(["now", []]), "ts must be a number"),
    (msgpack.packb([1.0, {}]), "events must be an array"),
    (msgpack.packb([1.0, [], "r0"]), "data_parallel_rank must be an int or nil"),
    (msgpack.packb([1.0, [{"type": "BlockMoved"}]]), "kv event 0: unknown type 'BlockMoved'"),
    (msgpack.packb([1.0, [7]]), "kv event 0: expected a tagged map or a tagged array"),
    (msgpack.packb([1.0, [{"type": "BlockRemoved"}]]), r"kv event 0 \(BlockRemoved\): missing block_hashes"),
    (msgpack.packb([1.0, [["BlockStored", [1]]]]), r"expected 4 to 15 fields, got 1"),
    (msgpack.packb([1.0, [["BlockRemoved", [1.5]]]]), "a hash is an int or bytes"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, ["a"], 16]]]), "token_ids must be an array of ints"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, [], -1]]]), "block_size must be an int >= 0"),
    (msgpack.packb([1.0, [["BlockRemoved", [1], 5]]]), "medium must be str or nil"),
    (msgpack.packb([1.0, [["AllBlocksCleared", 1]]]), "AllBlocksCleared has no fields"),
])
def test_malformed_payloads_raise(payload, message):
    with pytest.raises(EventDecodeError, match=message):
        decode_batch(payload)


def test_malformed_frames_raise():
    with pytest.raises(EventDecodeError, match="expected 3 frames"):
        decode_frames([b"", b"\x00" * 8])
    with pytest.raises(EventDecodeError, match="seq must be 8 bytes"):
        decode_frames([b"", b"\x00", encode_batch(BATCH)])


# ---- pool activity --------------------------------------------------------------------------------
def test_recorder_splits_registrations_into_chains():
    rec = PoolEventRecorder(block_size=2)
    h = np.array([10, 11, 12, 20, 21], np.uint64)
    parents = np.array([9, 10, 11, 0, 20], np.uint64)
    has_parent = np.array([True, True, True, False, True])
    assert rec.stored(Tier.G2, h, parents, has_parent, token_ids=list(range(10))) == 2
    rec.removed(Tier.G1, np.array([5], np.uint64))
    rec.cleared()
    assert rec.take() == [BlockStored([10, 11, 12], 9, [0, 1, 2, 3, 4, 5], 2, None, "CPU"),
                          BlockStored([20, 21], None, [6, 7, 8, 9], 2, None, "CPU"),
                          BlockRemoved([5], "GPU"), AllBlocksCleared()]
    assert rec.take() == []
    assert rec.stored(Tier.G3, [1, 2]) == 1
    assert rec.take() == [BlockStored([1, 2], None, [], 2, None, "STORAGE")]
    with pytest.raises(ConfigError, match="3 token ids for 1 blocks of 2 tokens"):
        rec.stored(Tier.G2, [1], token_ids=[1, 2, 3])


def test_recorder_drains_evictions_from_a_pool():
    pool = BlockPool(Tier.G2, 4)
    rec = PoolEventRecorder(block_size=16)
    blocks = pool.allocate(4)
    pool.complete(blocks)
    hashes = np.arange(100, 104, dtype=np.uint64)
    pool.register(blocks, hashes)
    rec.stored(pool.tier, hashes)
    pool.release(blocks)
    again = pool.allocate(2)                  # evicts two registered blocks, LRU first
    assert again is not None
    assert rec.drain(pool) == 2
    assert rec.drain(pool) == 0
    events = rec.take()
    assert events[0] == BlockStored([100, 101, 102, 103], None, [], 16, None, "CPU")
    assert events[1] == BlockRemoved([100, 101], "CPU")


def test_recorder_overflow_becomes_all_blocks_cleared():
    rec = PoolEventRecorder(block_size=1, max_pending=3)
    rec.stored(Tier.G1, [1, 2])
    rec.removed(Tier.G1, [1, 2])
    assert rec.take() == [AllBlocksCleared()] and rec.overflows == 1
