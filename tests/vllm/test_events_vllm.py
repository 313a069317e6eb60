"""kvbm's KV events read by vLLM's own classes (vllm.distributed.kv_events, msgspec decoders), and
vLLM's own publisher read by kvbm's decoder: payloads, frames and replay. Runs only where vLLM is
installed (the vLLM venv); elsewhere the module is skipped at import."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm")
msgspec = pytest.importorskip("msgspec")
zmq = pytest.importorskip("zmq")

from vllm.distributed import kv_events as vk  # noqa: E402

from kvbm.integrations import events as ke  # noqa: E402
from kvbm.pools import Tier  # noqa: E402

DEADLINE_S = 10.0

BATCH = ke.KVEventBatch(1700000000.5, [
    ke.BlockStored([1, 2**64 - 1, 7], 99, list(range(48)), 16, None, "CPU", None),
    ke.BlockStored([b"\x01" * 32], None, [], 16, 5, "STORAGE", "adapter", {"group_idx": 2}),
    ke.BlockRemoved([2**63, 3], "GPU"),
    ke.AllBlocksCleared(),
], 0)


def _as_vllm(batch: ke.KVEventBatch) -> vk.KVEventBatch:
    return vk.KVEventBatch(ts=batch.ts, events=ke.to_vllm(batch.events, vk),
                           data_parallel_rank=batch.data_parallel_rank)


def test_vllm_decodes_kvbm_payloads():
    decoded = msgspec.msgpack.Decoder(vk.KVEventBatch).decode(ke.encode_batch(BATCH))
    assert decoded == _as_vllm(BATCH)
    assert [type(e).__name__ for e in decoded.events] == ["BlockStored", "BlockStored", "BlockRemoved",
                                                          "AllBlocksCleared"]
    assert decoded.events[0].medium == vk.MEDIUM_CPU and decoded.events[1].medium == vk.MEDIUM_STORAGE
    assert ke.TIER_MEDIUM[Tier.G1] == vk.MEDIUM_GPU


def test_kvbm_decodes_vllm_payloads():
    payload = msgspec.msgpack.Encoder().encode(_as_vllm(BATCH))
    assert ke.decode_batch(payload) == BATCH


def test_recorder_events_decode_in_vllm():
    rec = ke.PoolEventRecorder(block_size=4)
    rec.stored(Tier.G2, [10, 11], [9, 10], [True, True], token_ids=list(range(8)))
    rec.removed(Tier.G3, [12])
    events = rec.take()
    payload = ke.encode_batch(ke.KVEventBatch(1.0, events, 0))
    decoded = msgspec.msgpack.Decoder(vk.KVEventBatch).decode(payload)
    expected = [vk.BlockStored(block_hashes=[10, 11], parent_block_hash=9, token_ids=list(range(8)), block_size=4,
                               lora_id=None, medium="CPU", lora_name=None),
                vk.BlockRemoved(block_hashes=[12], medium="STORAGE")]
    assert decoded.events == expected and ke.to_vllm(events, vk) == expected


# The array shape of earlier vLLM releases: their classes, as vLLM's own subscriber example of
# that time declared them (KVCacheEvent array_like); vLLM 0.33's decoder takes maps only.
class _OldEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class _OldKVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(_OldKVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(_OldKVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None


class AllBlocksCleared(_OldKVCacheEvent):
    pass


class _OldKVEventBatch(_OldEventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def test_array_encoding_decodes_with_the_earlier_classes():
    batch = ke.KVEventBatch(2.0, [ke.BlockStored([1, 2], 0, [5, 6], 1, None, "GPU"), ke.BlockRemoved([1], "CPU"),
                                  ke.AllBlocksCleared()], None)
    payload = ke.encode_batch(batch, "array")
    old = msgspec.msgpack.Decoder(_OldKVEventBatch).decode(payload)
    assert old.events == [BlockStored([1, 2], 0, [5, 6], 1, None, "GPU"), BlockRemoved([1], "CPU"),
                          AllBlocksCleared()]
    assert ke.decode_batch(msgspec.msgpack.encode(old)) == batch


def _recv(sock) -> list[bytes]:
    assert sock.poll(int(DEADLINE_S * 1000)), f"nothing received within {DEADLINE_S} s"
    return sock.recv_multipart()


def test_vllm_subscriber_reads_kvbm_publisher(tmp_path):
    ctx = zmq.Context()
    pub = ke.KvEventPublisher(f"ipc://{tmp_path}/ev", f"ipc://{tmp_path}/replay", topic="kv", context=ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(pub.endpoint)
    decoder = msgspec.msgpack.Decoder(vk.KVEventBatch)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not sub.poll(50):                       # PUB drops until the subscription arrives
            assert time.monotonic() < deadline, "subscriber not connected"
            pub.publish([ke.AllBlocksCleared()])
        sub.recv_multipart()
        pub.publish(BATCH.events, ts=BATCH.ts)
        while True:
            topic, seq, payload = _recv(sub)
            got = decoder.decode(payload)
            if got.events != [vk.AllBlocksCleared()]:
                break
        assert topic == b"kv" and got == _as_vllm(BATCH)
        # vLLM's replay protocol: REQ-style (empty delimiter, 8-byte start), answers then END_SEQ
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart((b"", seq))
        frames = _recv(dealer)
        assert frames[1:3] == [b"kv", seq] and decoder.decode(frames[3]) == _as_vllm(BATCH)
        assert _recv(dealer)[2] == vk.ZmqEventPublisher.END_SEQ
        dealer.close(linger=0)
    finally:
        sub.close(linger=0)
        pub.close()
        ctx.term()


def test_kvbm_reads_vllm_publisher(tmp_path):
    vpub = vk.ZmqEventPublisher(data_parallel_rank=0, endpoint=f"ipc://{tmp_path}/vev",
                                replay_endpoint=f"ipc://{tmp_path}/vreplay", topic="kv")
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        vpub.publish(_as_vllm(BATCH))
        deadline = time.monotonic() + DEADLINE_S
        dealer.connect(f"ipc://{tmp_path}/vreplay")
        while True:                                   # the buffer fills on vLLM's thread
            dealer.send_multipart((b"", (0).to_bytes(8, "big")))
            frames = _recv(dealer)
            if frames[2] != ke.END_SEQ:
                break
            assert time.monotonic() < deadline, "vLLM's publisher buffered nothing"
            time.sleep(0.05)
        topic, seq, batch = ke.decode_frames(frames[1:])
        assert (topic, seq) == (b"kv", 0) and batch == BATCH
        assert _recv(dealer)[2] == ke.END_SEQ
    finally:
        dealer.close(linger=0)
        vpub.shutdown()
        ctx.term()
